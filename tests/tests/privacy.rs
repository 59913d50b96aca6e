//! What never leaves the agent: credentials in headers, URL userinfo and query values, process
//! command lines (unless asked for), while explicitly captured headers do.
use kspan_tests::{
    Agent, PyService, Val, assert_root, curl, grpc_collector, runtime, trace_id, unique_path,
};

#[test]
fn credentials_query_values_and_command_lines_never_leave_the_agent() {
    assert_root();
    let rt = runtime();
    let (collector, spans) = grpc_collector(&rt);
    let server = PyService::start("vault", None);
    let port = server.port.to_string();
    let agent = Agent::start(
        "kspan-privacy",
        &[
            "--linger-ms",
            "100",
            "--port",
            &port,
            // Asking for credential headers is refused; x-tenant is captured.
            "--capture-header",
            "x-tenant,authorization,cookie,x-api-key",
            "--redact-header",
            "X-Api-Key",
        ],
        &kspan_tests::otlp_grpc(collector),
    );
    let t = trace_id(31);
    let path = unique_path("vault");
    curl(&[
        "-H",
        &format!("b3: {t:032x}-00000000000000ee-1"),
        "-H",
        "Authorization: Bearer s3cret-bearer",
        "-H",
        "Cookie: session=s3cret-cookie",
        "-H",
        "X-Api-Key: s3cret-key",
        "-H",
        "X-Tenant: acme",
        &format!("http://127.0.0.1:{port}{path}?token=s3cret-query&page=2"),
    ]);
    let got = spans.wait_trace(t, 2, 15);
    assert_eq!(got.len(), 2, "{got:#?}");
    for s in &got {
        let everything = format!("{s:?}");
        assert!(
            !everything.contains("s3cret"),
            "a secret left the agent: {s:#?}"
        );
        assert!(!s.resource.contains_key("process.command_line"), "{s:#?}");
        assert_eq!(
            s.attrs.get("http.request.header.x-tenant"),
            Some(&Val::A(vec!["acme".into()])),
            "{s:#?}"
        );
        for denied in ["authorization", "cookie", "x-api-key"] {
            assert!(
                !s.attrs
                    .contains_key(&format!("http.request.header.{denied}")),
                "{s:#?}"
            );
        }
    }
    let server_span = got
        .iter()
        .find(|s| s.kind == "SERVER")
        .expect("server span");
    assert_eq!(
        server_span.attr("url.query").s(),
        "token=REDACTED&page=REDACTED"
    );
    let client_span = got
        .iter()
        .find(|s| s.kind == "CLIENT")
        .expect("client span");
    assert_eq!(
        client_span.attr("url.full").s(),
        format!("http://127.0.0.1:{port}{path}?token=REDACTED&page=REDACTED")
    );
    let log = agent.proc.log();
    for refused in ["\"authorization\"", "\"cookie\"", "\"x-api-key\""] {
        assert!(
            log.contains(&format!("not capturing header {refused}")),
            "{log}"
        );
    }
}
