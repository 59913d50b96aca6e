//! The agent as a program: privileges, configuration errors, shutdown, filters, OTLP/HTTP.
use std::{os::unix::process::CommandExt as _, process::Command, time::Duration};

use kspan_tests::{
    Agent, PyService, assert_root, curl, http_collector, http_env, kspan_bin, runtime, trace_id,
    unique_path,
};

fn run_kspan(args: &[&str], uid: Option<u32>) -> (i32, String) {
    let mut cmd = Command::new(kspan_bin());
    cmd.args(args)
        .args(["--metrics-addr", "127.0.0.1:0", "--duration-secs", "5"]);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let out = cmd.output().expect("running kspan");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("panicked"),
        "no panics on bad input: {stderr}"
    );
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn refuses_to_start_without_privileges() {
    assert_root();
    // A copy nobody can execute wherever the build tree lives.
    let dir = std::env::temp_dir().join(format!("kspan-unpriv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("kspan");
    std::fs::copy(kspan_bin(), &bin).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = Command::new(&bin)
        .args(["--metrics-addr", "127.0.0.1:0"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one sentence: {stderr}");
    assert!(
        stderr.contains("kspan needs root (or CAP_BPF + CAP_PERFMON"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_configuration_is_one_clear_error() {
    assert_root();
    for (args, expect) in [
        (
            &[
                "--otlp-endpoint",
                "http://127.0.0.1:4318",
                "--otlp-protocol",
                "http/json",
            ][..],
            "unsupported OTLP protocol \"http/json\"",
        ),
        (
            &["--otlp-endpoint", "collector:4317"][..],
            "expected an http:// or https:// URL",
        ),
        (
            &["--payload-cap", "10"][..],
            "--payload-cap must be between 64 and 8192",
        ),
        (
            &["--ring-buffer-mb", "3"][..],
            "--ring-buffer-mb must be a power of two",
        ),
        (
            &["--replay", "/nonexistent/recording"][..],
            "opening recording /nonexistent/recording",
        ),
    ] {
        let (code, stderr) = run_kspan(args, None);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
}

/// `--port` keeps only matching connections; a pair whose two ends this agent saw finish
/// leaves at once, not after the linger; the OTLP/HTTP (protobuf) exporter delivers to a
/// spec-conforming receiver.
#[test]
fn finished_pairs_leave_at_once_filtered_by_port_over_otlp_http() {
    assert_root();
    let rt = runtime();
    let (collector, spans) = http_collector(&rt);
    let back = PyService::start("backend", None);
    let front = PyService::start("frontend", Some(back.port));
    let port = front.port.to_string();
    let agent = Agent::start(
        "kspan-http",
        // A linger far longer than the test: only a pair's leaving at once delivers in time.
        &["--linger-ms", "60000", "--port", &port],
        &http_env(collector),
    );
    let path = unique_path("pair");
    let t = trace_id(9);
    curl(&[
        "-H",
        &format!("b3: {t:032x}-000000000000f100-1"),
        &format!("http://127.0.0.1:{port}{path}"),
    ]);
    let got = spans.wait_trace(t, 2, 15);
    let mut seen: Vec<(&str, &str)> = got.iter().map(|g| (g.kind, g.service())).collect();
    seen.sort();
    assert_eq!(
        seen,
        [("CLIENT", "curl"), ("SERVER", "frontend")],
        "only connections on port {port}: {got:#?}"
    );
    let server = got.iter().find(|g| g.kind == "SERVER").unwrap();
    let client = got.iter().find(|g| g.kind == "CLIENT").unwrap();
    assert_eq!(server.parent, Some(client.span_id));
    assert_eq!(client.parent, Some(0xf100));
    assert_eq!(server.attr("url.path").s(), path);
    // The default attribute set: the conventions' required and recommended ones only.
    assert_eq!(server.attr("http.request.method").s(), "GET");
    assert_eq!(server.attr("client.address").s(), "127.0.0.1");
    assert_eq!(server.attr("network.protocol.version").s(), "1.1");
    assert!(client.attr("url.full").s().ends_with(&path));
    for opt_in in [
        "client.port",
        "network.local.port",
        "network.transport",
        "http.response.body.size",
    ] {
        assert!(
            !server.attrs.contains_key(opt_in) && !client.attrs.contains_key(opt_in),
            "{opt_in} is opt-in: {got:#?}"
        );
    }
    let status = agent.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    drop(rt);
}

/// SIGTERM must flush spans still lingering: here the frontend's, whose other ends are not
/// traced (`--pid`), so they wait for a pairing that never comes.
#[test]
fn sigterm_flushes_lingering_spans() {
    assert_root();
    let rt = runtime();
    let (collector, spans) = http_collector(&rt);
    let back = PyService::start("backend", None);
    let front = PyService::start("frontend", Some(back.port));
    let pid = front.proc.pid().to_string();
    let agent = Agent::start(
        "kspan-sigterm",
        // A linger far longer than the test: only the shutdown flush can deliver these spans.
        &["--linger-ms", "60000", "--pid", &pid],
        &http_env(collector),
    );
    let t = trace_id(10);
    curl(&[
        "-H",
        &format!("b3: {t:032x}-000000000000f200-1"),
        &format!("http://127.0.0.1:{}{}", front.port, unique_path("flush")),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        spans.all().iter().all(|g| g.trace_id != t),
        "spans wait out the linger before SIGTERM"
    );
    let status = agent.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    let got: Vec<_> = spans
        .all()
        .into_iter()
        .filter(|g| g.trace_id == t)
        .collect();
    let mut seen: Vec<(&str, &str)> = got.iter().map(|g| (g.kind, g.service())).collect();
    seen.sort();
    assert_eq!(
        seen,
        [("CLIENT", "frontend"), ("SERVER", "frontend")],
        "the frontend's spans only: {got:#?}"
    );
    let server = got.iter().find(|g| g.kind == "SERVER").unwrap();
    let call = got.iter().find(|g| g.kind == "CLIENT").unwrap();
    assert_eq!(server.parent, Some(0xf200));
    assert_eq!(call.parent, Some(server.span_id));
    drop(rt);
}

/// A keep-alive connection opened before the agent started is found on its next use.
#[test]
fn connections_older_than_the_agent_are_picked_up() {
    use std::io::{Read as _, Write as _};
    assert_root();
    let rt = runtime();
    let (collector, spans) = kspan_tests::grpc_collector(&rt);
    let back = PyService::start("backend", None);
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", back.port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut exchange = |extra: &str| {
        conn.write_all(
            format!(
                "GET {} HTTP/1.1\r\nHost: back\r\n{extra}\r\n",
                unique_path("old")
            )
            .as_bytes(),
        )
        .unwrap();
        // The service answers "leaf\n" with a Content-Length header.
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"leaf\n") {
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed early");
            got.extend_from_slice(&buf[..n]);
        }
    };
    exchange("");
    let port = back.port.to_string();
    let agent = Agent::start(
        "kspan-late",
        &["--port", &port],
        &kspan_tests::otlp_grpc(collector),
    );
    let t = trace_id(10);
    exchange(&format!(
        "X-B3-TraceId: {t:032x}\r\nX-B3-SpanId: 00000000000a11ce\r\n"
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let got = loop {
        let got: Vec<_> = spans
            .all()
            .into_iter()
            .filter(|g| g.trace_id == t)
            .collect();
        if got.len() >= 2 || std::time::Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut kinds: Vec<&str> = got.iter().map(|g| g.kind).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        ["CLIENT", "SERVER"],
        "both ends of the old connection: {got:#?}\n{}",
        agent.proc.log()
    );
    for g in &got {
        assert_eq!(g.parent, Some(0xa11ce), "linked by its headers: {g:#?}");
        assert_eq!(g.attr("http.response.status_code").i(), 200);
    }
    let server = got.iter().find(|g| g.kind == "SERVER").unwrap();
    assert_eq!(server.service(), "backend");
    kspan_tests::wait_metric(
        agent.metrics,
        "kspan_kernel_connections_discovered_total",
        |v| v >= 2,
    );
    assert!(agent.terminate().success());
}

/// An HTTP/2 (gRPC) connection busy before the agent started: joined mid-way, its spans carry
/// what HPACK's static table and literals allow, are marked `kspan.partial`, and never hold a
/// wrong value.
#[test]
fn grpc_connection_older_than_the_agent_gives_partial_but_never_wrong_spans() {
    assert_root();
    let rt = runtime();
    let (collector, spans) = kspan_tests::grpc_collector(&rt);
    let cart = kspan_tests::GrpcService::start("cart", None);
    // One channel, calls every 50 ms for a few seconds; the first ones predate the agent.
    let script = r#"
import grpc, sys, time
ident = lambda b: b
with grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}") as ch:
    call = ch.unary_unary("/shop.Cart/Get", request_serializer=ident, response_deserializer=ident)
    for i in range(120):
        call(b"pear", timeout=5)
        time.sleep(0.05)
"#;
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", script, &cart.port.to_string()])
        .env("OTEL_SERVICE_NAME", "poller");
    let _client = kspan_tests::Proc::spawn("poller", cmd);
    std::thread::sleep(Duration::from_millis(1500));
    let port = cart.port.to_string();
    let agent = Agent::start(
        "kspan-h2-late",
        &["--port", &port, "--linger-ms", "100"],
        &kspan_tests::otlp_grpc(collector),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let got = loop {
        let got = spans.all();
        let sides = |kind: &str| got.iter().filter(|g| g.kind == kind).count();
        if (sides("SERVER") >= 3 && sides("CLIENT") >= 3) || std::time::Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        got.iter()
            .any(|g| g.kind == "SERVER" && g.service() == "cart"),
        "{got:#?}\n{}",
        agent.proc.log()
    );
    assert!(
        got.iter()
            .any(|g| g.kind == "CLIENT" && g.service() == "poller"),
        "{got:#?}"
    );
    assert!(
        got.iter()
            .any(|g| g.attrs.get("kspan.partial") == Some(&kspan_tests::Val::B(true))),
        "joined mid-way: {got:#?}"
    );
    for g in &got {
        // Whatever was decoded must be right.
        if let Some(v) = g.attrs.get("http.request.method") {
            assert_eq!(v.s(), "POST", "{g:#?}");
        }
        if let Some(v) = g.attrs.get("url.path") {
            assert_eq!(v.s(), "/shop.Cart/Get", "{g:#?}");
        }
        if let Some(v) = g.attrs.get("rpc.method") {
            assert_eq!(v.s(), "Get", "{g:#?}");
        }
        if let Some(v) = g.attrs.get("http.response.status_code") {
            assert_eq!(v.i(), 200, "{g:#?}");
        }
    }
    kspan_tests::wait_metric(agent.metrics, "kspan_spans_partial_total", |v| v >= 1);
    assert!(agent.terminate().success());
}

/// Flags beat environment variables, which beat the configuration file, which beats defaults;
/// a bad file is one clear error.
#[test]
fn configuration_file_precedence() {
    let dir = std::env::temp_dir().join(format!("kspan-conf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("kspan.toml");
    std::fs::write(
        &file,
        "port = [8080]\nexe = [\"nginx\"]\nlinger-ms = 50\ncapture-header = [\"x-tenant\"]\n",
    )
    .unwrap();
    let out = Command::new(kspan_bin())
        .args(["--print-config", "--linger-ms", "70"])
        .env("KSPAN_CONFIG", &file)
        .env("KSPAN_EXE", "python3")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let compact: String = text.split_whitespace().collect();
    for want in [
        "port:[8080,]",                   // file over default
        "exe:[\"python3\",]",             // environment over file
        "linger_ms:70,",                  // flag over file
        "capture_header:[\"x-tenant\",]", // file
        "ring_buffer_mb:16,",             // default
    ] {
        assert!(compact.contains(want), "{want} in {text}");
    }
    std::fs::write(&file, "prot = [8080]\n").unwrap();
    let (code, stderr) = run_kspan(&["--config", file.to_str().unwrap()], None);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("unknown key \"prot\""), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// OTEL_TRACES_SAMPLER is honoured: under parentbased_always_off only traces that carry a
/// decision to export leave the agent, and the RED metrics still count every request.
#[test]
fn traces_sampler_from_the_standard_variables() {
    assert_root();
    let rt = runtime();
    let (collector, spans) = kspan_tests::grpc_collector(&rt);
    let name = format!("sampled-{}", std::process::id());
    let back = PyService::start(&name, None);
    let port = back.port.to_string();
    let agent = Agent::start(
        "kspan-sampler",
        &["--port", &port, "--linger-ms", "50"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
            ("OTEL_TRACES_SAMPLER", "parentbased_always_off".into()),
        ],
    );
    let (quiet, loud) = (unique_path("quiet"), unique_path("loud"));
    for _ in 0..3 {
        curl(&[&format!("http://127.0.0.1:{port}{quiet}")]);
    }
    let t = trace_id(11);
    curl(&[
        "-H",
        &format!("b3: {t:032x}-0000000000000c0c-1"),
        &format!("http://127.0.0.1:{port}{loud}"),
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while spans.all().iter().filter(|g| g.trace_id == t).count() < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", agent.proc.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Everything before the sampled request has been flushed by now.
    kspan_tests::wait_metric(agent.metrics, "kspan_spans_unsampled_total", |n| n >= 6);
    let quiet_spans = spans
        .all()
        .iter()
        .filter(|g| format!("{g:?}").contains(&quiet))
        .count();
    assert_eq!(quiet_spans, 0, "sampled out");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = kspan_tests::http_get(agent.metrics, "/metrics").unwrap();
        let count: u64 = metrics
            .lines()
            .filter(|l| {
                l.starts_with("http_server_request_duration_seconds_count")
                    && l.contains(&format!("service_name=\"{name}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        if count == 4 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "every request is in the metrics, got {count}:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(agent.terminate().success());
}

/// The raw-tracepoint hook, the fallback for kernels that refuse BTF-typed programs, captures
/// and links a whole chain like the default tp_btf hook the other tests run with.
#[test]
fn raw_tracepoint_hook_traces_a_linked_chain() {
    assert_root();
    let rt = runtime();
    let (collector, spans) = kspan_tests::grpc_collector(&rt);
    let back = PyService::start("backend", None);
    let front = PyService::start("frontend", Some(back.port));
    let agent = Agent::start(
        "kspan-raw",
        &["--hook", "raw-tracepoint", "--linger-ms", "200"],
        &kspan_tests::otlp_grpc(collector),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !agent.proc.log().contains("(sys_exit raw tracepoint, ") {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not report the raw tracepoint hook:\n{}",
            agent.proc.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = trace_id(21);
    let path = unique_path("raw-hook");
    curl(&[
        "-H",
        &format!("b3: {t:032x}-000000000000f200-1"),
        &format!("http://127.0.0.1:{}{path}", front.port),
    ]);
    let got = spans.wait_trace(t, 4, 15);
    let curl_span = kspan_tests::one(&got, "CLIENT", "curl");
    let front_server = kspan_tests::one(&got, "SERVER", "frontend");
    let front_client = kspan_tests::one(&got, "CLIENT", "frontend");
    let back_server = kspan_tests::one(&got, "SERVER", "backend");
    assert_eq!(curl_span.parent, Some(0xf200));
    assert_eq!(front_server.parent, Some(curl_span.span_id));
    assert_eq!(front_client.parent, Some(front_server.span_id));
    assert_eq!(back_server.parent, Some(front_client.span_id));
    assert_eq!(front_server.attr("url.path").s(), path);
    assert_eq!(back_server.attr("http.response.status_code").i(), 200);
    drop(agent);
    drop(rt);
}
