//! Records `agent/tests/data/corpus.kspan`, the kernel events the exporters' differential test
//! replays: real traffic of every kind of span kspan exports. HTTP/1.1 through nginx and two
//! Python services forwarding B3 (200, 404, 500), HTTP/2 (h2c, nghttpd), gRPC (OK, NOT_FOUND,
//! INTERNAL, a stream, and a channel older than the agent: partial spans) and Redis (commands
//! and an error). Run as root: `KSPAN_BIN=target/debug/kspan cargo run -p kspan-tests
//! --bin record-corpus -- agent/tests/data/corpus.kspan`.
use std::{process::Command, time::Duration};

use kspan_tests::{
    Agent, GrpcService, Nginx, Proc, PyService, assert_root, curl, free_port, grpc_call,
    nghttp_get, nghttpd,
};

fn main() {
    assert_root();
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "agent/tests/data/corpus.kspan".to_string());
    let out = std::path::absolute(out).expect("a path");
    let back = PyService::start("corpus-backend", None);
    let front = PyService::start("corpus-front", Some(back.port));
    let nginx = Nginx::start(front.port);
    let grpc = GrpcService::start("corpus-grpc", None);
    let dir = std::env::temp_dir().join(format!("kspan-corpus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("hello"), "hello over h2\n").expect("file");
    let (h2, _nghttpd) = nghttpd(&dir);
    let redis_port = free_port();
    let mut redis = Command::new("redis-server");
    redis.args([
        "--port",
        &redis_port.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
    ]);
    let _redis = Proc::listening("redis", redis, redis_port);

    // A gRPC channel already carrying calls when the agent starts: the agent joins its HTTP/2
    // connection mid-way (no HPACK context), so those spans are partial.
    let poller = r#"
import grpc, sys, time
ident = lambda b: b
with grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}") as ch:
    call = ch.unary_unary("/shop.Cart/Get", request_serializer=ident, response_deserializer=ident)
    for i in range(200):
        call(b"pear", timeout=5)
        time.sleep(0.05)
"#;
    let mut cmd = Command::new("python3");
    cmd.args(["-c", poller, &grpc.port.to_string()])
        .env("OTEL_SERVICE_NAME", "poller");
    let _poller = Proc::spawn("poller", cmd);
    std::thread::sleep(Duration::from_millis(1500));

    let ports = [nginx.port, front.port, back.port, grpc.port, h2, redis_port]
        .map(|p| p.to_string())
        .join(",");
    let record = out.display().to_string();
    let agent = Agent::start(
        "kspan-corpus",
        &[
            "--port",
            &ports,
            "--record",
            &record,
            "--traces-exporter",
            "none",
        ],
        &[],
    );
    let b3 = |n: u32| format!("X-B3-TraceId: 463ac35c9f6413ad48485a3953bb{n:04x}");
    for (i, path) in ["/shop/items?id=7", "/status/404", "/status/500"]
        .iter()
        .enumerate()
    {
        curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-H",
            &b3(i as u32),
            "-H",
            "X-B3-SpanId: a2fb4a1d1a96d312",
            "-H",
            "X-Tenant: acme",
            "-A",
            "corpus/1.0",
            &format!("http://127.0.0.1:{}{path}", nginx.port),
        ]);
    }
    let h2_url = format!("http://127.0.0.1:{h2}/hello");
    nghttp_get(
        &h2_url,
        "463ac35c9f6413ad48485a3953bb1000-a2fb4a1d1a96d312-1",
    );
    for (method, payload) in [
        ("Get", "7"),
        ("Get", "missing"),
        ("Get", "boom"),
        ("List", "x"),
    ] {
        grpc_call(grpc.port, method, payload, "");
    }
    let cli = |args: &[&str]| {
        let _ = Command::new("redis-cli")
            .args(["-p", &redis_port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
    };
    cli(&["SET", "cart:42", "3"]);
    cli(&["GET", "cart:42"]);
    cli(&["NOSUCHCOMMAND", "x"]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(agent.terminate().success());
    let _ = std::fs::remove_dir_all(&dir);
    let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    println!("recorded {size} bytes to {}", out.display());
}
