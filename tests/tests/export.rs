//! The exporters against collectors that misbehave on purpose: gzip on both OTLP transports,
//! retries only where the specification allows them (and spans arriving once), partial
//! success counted, and Zipkin v2 JSON checked against the schema.
use std::time::{Duration, Instant};

use kspan_tests::{
    Agent, Got, PyService, Spans, assert_root, curl, grpc_collector, http_collector, http_env,
    metric,
    receivers::{Answer, zipkin_receiver},
    runtime, trace_id, trace_id_64, unique_path, wait_metric,
};

/// One traced request to a leaf service: a CLIENT (curl) and a SERVER span.
fn traced(port: u16, t: u128) {
    curl(&[
        "-s",
        "-H",
        &format!("b3: {t:032x}-000000000000e5e5-1"),
        &format!("http://127.0.0.1:{port}{}", unique_path("export")),
    ]);
}

/// The spans of trace `t` once `n` arrived and nothing more came for a while (duplicates
/// would show up as more than `n`).
fn settled(spans: &Spans, t: u128, n: usize, secs: u64) -> Vec<Got> {
    spans.wait_trace(t, n, secs);
    std::thread::sleep(Duration::from_secs(3));
    spans
        .all()
        .into_iter()
        .filter(|g| g.trace_id == t)
        .collect()
}

fn agent(name: &str, port: u16, extra: &[&str], env: &[(&str, String)]) -> Agent {
    let port = port.to_string();
    let mut args = vec!["--port", port.as_str(), "--linger-ms", "50"];
    args.extend_from_slice(extra);
    Agent::start(name, &args, env)
}

/// OTLP/HTTP, gzipped; the collector answers 503 with `Retry-After: 1` once, then 200: the
/// batch is sent again after the pause and its spans arrive exactly once.
#[test]
fn otlp_http_gzip_retries_after_503_and_delivers_once() {
    assert_root();
    let rt = runtime();
    let (collector, spans) = http_collector(&rt);
    spans.script().answer([Answer::Http {
        status: 503,
        retry_after: Some(1),
    }]);
    let back = PyService::start("backend", None);
    let mut env = http_env(collector).to_vec();
    env.push(("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip".into()));
    let agent = agent("kspan-503", back.port, &[], &env);
    let t = trace_id(60);
    let started = Instant::now();
    traced(back.port, t);
    let got = settled(&spans, t, 2, 20);
    assert_eq!(got.len(), 2, "delivered once: {got:#?}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the retry waited as told"
    );
    let (requests, gzipped) = spans.script().requests();
    assert!(requests >= 2, "{requests} requests");
    assert_eq!(gzipped, requests, "every request gzipped");
    assert_eq!(metric(agent.metrics, "kspan_spans_export_failed_total"), 0);
    assert!(agent.terminate().success());
}

/// A 400 means the data itself was refused: never sent again, counted as failed; the next
/// batch goes through. (The trace's two spans may leave in one batch or two: either way each
/// is delivered or counted, and a refused one never arrives later.)
#[test]
fn otlp_http_400_is_not_retried_and_is_counted() {
    assert_root();
    let rt = runtime();
    let (collector, spans) = http_collector(&rt);
    spans.script().answer([Answer::Http {
        status: 400,
        retry_after: None,
    }]);
    let back = PyService::start("backend", None);
    let agent = agent("kspan-400", back.port, &[], &http_env(collector));
    let refused = trace_id(61);
    traced(back.port, refused);
    // A retry would be answered 200: its spans would arrive and never count as failed.
    let failed = wait_metric(agent.metrics, "kspan_spans_export_failed_total", |v| v > 0);
    let t = trace_id(62);
    traced(back.port, t);
    // Longer than the first backoff: a retry of the refused batch would have come by now.
    assert_eq!(
        settled(&spans, t, 2, 15).len(),
        2,
        "the next batch is delivered"
    );
    let refused_got = spans.all().iter().filter(|g| g.trace_id == refused).count();
    assert_eq!(
        refused_got as u64 + failed,
        2,
        "each span of the trace delivered once or counted as failed, never both"
    );
    assert!(agent.terminate().success());
}

/// OTLP/gRPC, gzipped: UNAVAILABLE then OK delivers once; a partial success is counted in
/// `kspan_spans_export_rejected_total`.
#[test]
fn otlp_grpc_gzip_retries_unavailable_and_counts_rejections() {
    assert_root();
    let rt = runtime();
    let (collector, spans) = grpc_collector(&rt);
    spans
        .script()
        .answer([Answer::Grpc(tonic::Code::Unavailable)]);
    let back = PyService::start("backend", None);
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}")),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip".into()),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "5000".into()),
    ];
    let agent = agent("kspan-unavailable", back.port, &[], &env);
    let t = trace_id(63);
    traced(back.port, t);
    assert_eq!(settled(&spans, t, 2, 20).len(), 2, "delivered once");
    let (requests, gzipped) = spans.script().requests();
    assert!(requests >= 2);
    assert_eq!(gzipped, requests);

    spans.script().answer([Answer::Reject(1)]);
    traced(back.port, trace_id(64));
    let rejected = wait_metric(agent.metrics, "kspan_spans_export_rejected_total", |v| {
        v > 0
    });
    assert_eq!(rejected, 1);
    assert!(agent.terminate().success());
}

/// `OTEL_TRACES_EXPORTER=zipkin`: Zipkin v2 JSON that the schema accepts, B3 ids one to one
/// (a 64-bit trace id stays 16 digits), the service as local endpoint.
#[test]
fn zipkin_exporter_speaks_v2() {
    assert_root();
    let rt = runtime();
    let (receiver, got) = zipkin_receiver(&rt);
    let back = PyService::start("zipkin-backend", None);
    let agent = agent(
        "kspan-zipkin",
        back.port,
        &[],
        &[
            ("OTEL_TRACES_EXPORTER", "zipkin".into()),
            (
                "OTEL_EXPORTER_ZIPKIN_ENDPOINT",
                format!("http://{receiver}/api/v2/spans"),
            ),
        ],
    );
    let t = trace_id_64(65);
    curl(&[
        "-s",
        "-H",
        &format!("X-B3-TraceId: {t:016x}"),
        "-H",
        "X-B3-SpanId: 000000000000e5e5",
        &format!("http://127.0.0.1:{}/status/503", back.port),
    ]);
    let want = format!("{t:016x}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mine = loop {
        let mine: Vec<serde_json::Value> = got
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s["traceId"] == want.as_str())
            .cloned()
            .collect();
        if mine.len() >= 2 || Instant::now() > deadline {
            break mine;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(got.violations.lock().unwrap().clone(), Vec::<String>::new());
    assert_eq!(mine.len(), 2, "{mine:#?}");
    let server = mine.iter().find(|s| s["kind"] == "SERVER").expect("SERVER");
    let client = mine.iter().find(|s| s["kind"] == "CLIENT").expect("CLIENT");
    assert_eq!(client["parentId"], "000000000000e5e5");
    assert_eq!(server["parentId"], client["id"]);
    assert_eq!(server["localEndpoint"]["serviceName"], "zipkin-backend");
    assert_eq!(server["tags"]["http.response.status_code"], "503");
    assert_eq!(server["tags"]["otel.status_code"], "ERROR");
    assert_eq!(client["remoteEndpoint"]["port"], back.port);
    assert!(agent.terminate().success());
}
