//! The agent as a program: privileges, configuration errors, shutdown, filters, OTLP/HTTP.
use std::{os::unix::process::CommandExt as _, process::Command, time::Duration};

use kspan_tests::{
    Agent, PyService, assert_root, curl, http_collector, kspan_bin, runtime, trace_id, unique_path,
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

/// SIGTERM must flush spans still lingering; `--port` keeps only matching connections; the
/// OTLP/HTTP (protobuf) exporter delivers to a spec-conforming receiver.
#[test]
fn sigterm_flushes_filtered_spans_over_otlp_http() {
    assert_root();
    let rt = runtime();
    let (collector, spans) = http_collector(&rt);
    let back = PyService::start("backend", None);
    let front = PyService::start("frontend", Some(back.port));
    let port = front.port.to_string();
    let agent = Agent::start(
        "kspan-http",
        // A linger far longer than the test: only the shutdown flush can deliver these spans.
        &["--linger-ms", "60000", "--port", &port],
        &[
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                format!("http://{collector}/v1/traces"),
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
        ],
    );
    let path = unique_path("flush");
    let t = trace_id(9);
    curl(&[
        "-H",
        &format!("b3: {t:032x}-000000000000f100-1"),
        &format!("http://127.0.0.1:{port}{path}"),
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
        [("CLIENT", "curl"), ("SERVER", "frontend")],
        "only connections on port {port}: {got:#?}"
    );
    let server = got.iter().find(|g| g.kind == "SERVER").unwrap();
    let client = got.iter().find(|g| g.kind == "CLIENT").unwrap();
    assert_eq!(server.parent, Some(client.span_id));
    assert_eq!(client.parent, Some(0xf100));
    assert_eq!(server.attr("url.path").s(), path);
    drop(rt);
}
