//! The kernel matrix's smoke set. `cargo xtask vm` runs it inside a VM of each kernel, and on
//! the host: the agent picks its hook by itself, then is forced onto each fallback below that
//! choice, and onto its choice with the bounded-loop build of the programs where it chose the
//! bpf_loop one (older kernels with fexit, 5.15-class, run that pair). With each: the probes
//! load and attach, an nginx proxy chain carrying B3 gives
//! its exact 4-span tree, an h2c call its 2 linked spans, busybox httpd (a child forked per
//! connection serves it through stdin and stdout) its 2 linked spans, redis-benchmark's calls
//! (pipelined, with replies larger than the copy cap) are counted exactly, curl → nginx over
//! HTTPS gives its 2 linked spans (the TLS uprobes on OpenSSL load and read the plaintext), a
//! Go gateway's overlapping calls are each under their own request (the goroutine probes), no
//! kernel event or span is lost, and the agent exits cleanly on SIGTERM.
//!
//! It prints `kspan-vm: …` lines (xtask reads them off the serial console) and exits 1 if any
//! check failed.
use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    time::Duration,
};

use std::process::Command;

use kspan_tests::{
    Agent, Got, Nginx, Proc, Spans, busybox_httpd, curl, free_port, grpc_collector, metric,
    nghttp_get, nghttpd, one, otlp_grpc, runtime, trace_id,
};

use crate::{HOOKS, LOAD_BOUND, hook_words, kernel_release, panic_text, probes_line, say};
/// Spans of a trace must all arrive within this (emulated guests are slow).
const SPAN_WAIT_SECS: u64 = 30;

struct Peers {
    spans: Spans,
    collector_env: [(&'static str, String); 2],
}

/// The servers under test, started after the agent so that every connection they open is
/// seen from its start (a keep-alive connection older than the agent is linked more
/// carefully, and would test something else).
struct Servers {
    front: Nginx,
    back: Nginx,
    h2_port: u16,
    _h2_server: kspan_tests::Proc,
    forking_port: u16,
    _forking_server: kspan_tests::Proc,
    redis_port: u16,
    _redis: kspan_tests::Proc,
    https: Nginx,
    ca: std::path::PathBuf,
}

impl Servers {
    fn start() -> Self {
        let back = Nginx::leaf();
        let front = Nginx::start(back.port);
        let dir = std::env::temp_dir().join(format!("kspan-vm-h2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("h2 docroot");
        std::fs::write(dir.join("page.txt"), vec![b'k'; 3000]).expect("h2 page");
        let (h2_port, h2_server) = nghttpd(&dir);
        let (forking_port, forking_server) = busybox_httpd(&dir);
        let redis_port = free_port();
        let mut redis = Command::new("redis-server");
        redis.args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"]);
        redis.args(["--save", "", "--appendonly", "no"]);
        let redis = kspan_tests::Proc::listening("redis-server", redis, redis_port);
        let (ca, cert, key) = kspan_tests::certificates();
        for (name, pem) in [("ca.pem", ca), ("cert.pem", cert), ("key.pem", key)] {
            std::fs::write(dir.join(name), pem).expect("certificates");
        }
        let https = Nginx::https_leaf(&dir.join("cert.pem"), &dir.join("key.pem"));
        Self {
            https,
            ca: dir.join("ca.pem"),
            front,
            back,
            h2_port,
            _h2_server: h2_server,
            forking_port,
            _forking_server: forking_server,
            redis_port,
            _redis: redis,
        }
    }
}

pub fn run() {
    let rt = runtime();
    let (collector, spans) = grpc_collector(&rt);
    let peers = Peers {
        spans,
        collector_env: otlp_grpc(collector),
    };
    say(&format!("kernel {}", kernel_release()));

    let mut results = Results::default();
    let chosen = match with_hook(&peers, "auto", &["--hook", "auto"], 0, &mut results) {
        Some(line) => line,
        None => {
            results.finish();
            return;
        }
    };
    let chosen_index = HOOKS.iter().position(|h| chosen.contains(hook_words(h)));
    say(&format!("auto chose: {chosen}"));
    for (i, hook) in HOOKS.iter().enumerate() {
        match chosen_index {
            Some(c) if i == c => continue,
            // Cheaper than the automatic choice: the kernel refused it there.
            Some(c) if i < c => {
                match catch_unwind(AssertUnwindSafe(|| start_agent(&peers, &["--hook", hook]))) {
                    Ok(agent) => {
                        results.fail(hook, "start", "the kernel accepts it, yet auto skipped it");
                        drop(agent);
                    }
                    Err(e) => say(&format!(
                        "hook {hook} unavailable here (as auto found): {}",
                        first_line(&panic_text(e))
                    )),
                }
            }
            _ => {
                with_hook(
                    &peers,
                    hook,
                    &["--hook", hook],
                    (i as u16 + 1) * 16,
                    &mut results,
                );
            }
        }
    }
    if let Some(c) = chosen_index.filter(|_| chosen.contains("bpf_loop")) {
        let hook = HOOKS[c];
        let args = ["--hook", hook, "--kernel-loops", "bounded"];
        with_hook(&peers, &format!("{hook}+bounded"), &args, 64, &mut results);
    }
    results.finish();
}

/// Runs the checks with the agent started with `args` (reported as `hook`); returns the
/// agent's description of its probes.
fn with_hook(
    peers: &Peers,
    hook: &str,
    args: &[&str],
    tag: u16,
    results: &mut Results,
) -> Option<String> {
    let agent = match catch_unwind(AssertUnwindSafe(|| start_agent(peers, args))) {
        Ok(agent) => agent,
        Err(e) => {
            results.fail(hook, "load", &panic_text(e));
            return None;
        }
    };
    let log = agent.proc.log();
    let probes = probes_line(&log);
    results.pass(hook, "load", &probes);
    // Why a cheaper hook was refused: the verifier's last words.
    say_record(&log, "tp_btf unavailable");
    let servers = Servers::start();
    results.run(hook, "http1-nginx-chain", &agent, || {
        http1_chain(peers, &servers, tag + 1)
    });
    results.run(hook, "h2c-nghttp", &agent, || {
        h2c_call(peers, &servers, tag + 2)
    });
    results.run(hook, "forked-busybox", &agent, || {
        forked_call(peers, &servers, tag + 3)
    });
    results.run(hook, "redis-benchmark", &agent, || {
        redis_calls(&agent, &servers)
    });
    results.run(hook, "https-curl", &agent, || {
        https_call(peers, &servers, &agent, tag + 4)
    });
    results.run(hook, "go-goroutines", &agent, || {
        go_goroutines(peers, &agent, tag + 5)
    });
    results.run(hook, "no-losses", &agent, || {
        for m in [
            "kspan_kernel_lost_events_total",
            "kspan_spans_queue_dropped_total",
            "kspan_spans_export_failed_total",
        ] {
            assert_eq!(metric(agent.metrics, m), 0, "{m}");
        }
        assert!(metric(agent.metrics, "kspan_kernel_events_total") > 0);
    });
    let status = agent.terminate();
    if status.success() {
        results.pass(hook, "clean-exit", "");
    } else {
        results.fail(hook, "clean-exit", &format!("{status}"));
    }
    Some(probes)
}

fn start_agent(peers: &Peers, args: &[&str]) -> Agent {
    let mut args = args.to_vec();
    args.extend(["--linger-ms", "200"]);
    Agent::start_within("kspan", &args, &peers.collector_env, LOAD_BOUND)
}

/// curl → nginx (proxy) → nginx (leaf), B3 from curl: the exact tree of 4 spans.
fn http1_chain(peers: &Peers, servers: &Servers, tag: u16) {
    let t = trace_id(tag);
    let body = curl(&[
        "-H",
        &format!("b3: {t:032x}-00000000000000f1-1"),
        &format!("http://127.0.0.1:{}/chain", servers.front.port),
    ]);
    assert_eq!(body, "leaf\n");
    let got = exactly(&peers.spans, t, 4);
    let client = one(&got, "CLIENT", "curl");
    let front_server = server_on(&got, servers.front.port);
    let front_client = one(&got, "CLIENT", "nginx");
    let back_server = server_on(&got, servers.back.port);
    assert_eq!(
        client.parent,
        Some(0xf1),
        "curl's span is the header's child"
    );
    assert_eq!(front_server.parent, Some(client.span_id));
    assert_eq!(front_client.parent, Some(front_server.span_id));
    assert_eq!(back_server.parent, Some(front_client.span_id));
    for (outer, inner) in [
        (client, front_server),
        (front_server, front_client),
        (front_client, back_server),
    ] {
        assert!(outer.contains(inner), "{outer:#?} must cover {inner:#?}");
    }
    for s in &got {
        assert_eq!(s.attr("http.response.status_code").i(), 200, "{s:#?}");
    }
    assert_eq!(back_server.attr("url.path").s(), "/chain");
}

/// curl → nginx over HTTPS, B3 from curl: both spans read at OpenSSL, linked.
fn https_call(peers: &Peers, servers: &Servers, agent: &Agent, tag: u16) {
    // What the agent said of TLS, for a failure here.
    let log = agent.proc.log();
    say_record(&log, "TLS plaintext will not be read");
    let t = trace_id(tag);
    let body = curl(&[
        "--cacert",
        servers.ca.to_str().expect("path"),
        "-H",
        &format!("b3: {t:032x}-0000000000000e01-1"),
        &format!("https://127.0.0.1:{}/tls", servers.https.port),
    ]);
    assert_eq!(body, "leaf\n");
    let got = exactly(&peers.spans, t, 2);
    let client = one(&got, "CLIENT", "curl");
    let server = one(&got, "SERVER", "nginx");
    assert_eq!(client.parent, Some(0xe01));
    assert_eq!(server.parent, Some(client.span_id));
    assert_eq!(server.attr("url.scheme").s(), "https");
    assert_eq!(server.attr("url.path").s(), "/tls");
}

/// A Go gateway (net/http, forwarding no headers) in front of a Go backend that answers after
/// 300 ms, 4 requests at once: each call is under its own request, which only the goroutine
/// probes can tell (with them missing, the overlapping calls are left ambiguous).
fn go_goroutines(peers: &Peers, agent: &Agent, tag: u16) {
    const CALLS: usize = 4;
    let exe = std::env::var("KSPAN_GO_GATEWAY").expect("KSPAN_GO_GATEWAY names the Go gateway");
    let backend = free_port();
    let mut slow = Command::new(&exe);
    slow.args([backend.to_string(), "slow".into()]);
    let _backend = Proc::listening("go-backend", slow, backend);
    let port = free_port();
    let mut gateway = Command::new(&exe);
    gateway.args([port.to_string(), format!("http://127.0.0.1:{backend}")]);
    gateway
        .args(["0", "0"])
        .env("OTEL_SERVICE_NAME", "go-vm-gateway");
    let _gateway = Proc::listening("go-gateway", gateway, port);
    let probed = std::time::Instant::now() + Duration::from_secs(SPAN_WAIT_SECS);
    while !agent.proc.log().contains("following the goroutines of") {
        assert!(std::time::Instant::now() < probed, "{}", agent.proc.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let prefix = format!("/go{tag}/");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let requests: Vec<_> = (0..CALLS)
        .map(|i| {
            let path = format!("{prefix}{i}");
            std::thread::spawn(move || kspan_tests::http_get(addr, &path))
        })
        .collect();
    for r in requests {
        let answer = r.join().expect("request thread").expect("request");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let ours = |g: &Got| {
        g.service() == "go-vm-gateway" && g.path().is_some_and(|p| p.starts_with(&prefix))
    };
    let got = peers
        .spans
        .wait_for("the Go gateway's spans", SPAN_WAIT_SECS, |s| {
            s.iter().filter(|g| ours(g)).count() == 2 * CALLS
        });
    let servers: Vec<&Got> = got
        .iter()
        .filter(|g| ours(g) && g.kind == "SERVER")
        .collect();
    for call in got.iter().filter(|g| ours(g) && g.kind == "CLIENT") {
        let own = servers.iter().find(|s| s.path() == call.path());
        assert_eq!(call.parent, own.map(|s| s.span_id), "{call:#?}");
    }
}

/// nghttp → nghttpd over h2c prior knowledge, B3 from the client.
fn h2c_call(peers: &Peers, servers: &Servers, tag: u16) {
    let t = trace_id(tag);
    nghttp_get(
        &format!("http://127.0.0.1:{}/page.txt", servers.h2_port),
        &format!("{t:032x}-00000000000000dd-1"),
    );
    let got = exactly(&peers.spans, t, 2);
    let client = one(&got, "CLIENT", "nghttp");
    let server = one(&got, "SERVER", "nghttpd");
    assert_eq!(client.parent, Some(0xdd));
    assert_eq!(server.parent, Some(client.span_id));
    for s in [client, server] {
        assert_eq!(s.attr("network.protocol.version").s(), "2");
        assert_eq!(s.attr("http.response.status_code").i(), 200);
    }
    assert_eq!(server.attr("url.path").s(), "/page.txt");
}

/// curl → busybox httpd, whose child forked after accept() answers through its stdin and
/// stdout: one connection, the child's SERVER span under curl's.
fn forked_call(peers: &Peers, servers: &Servers, tag: u16) {
    let t = trace_id(tag);
    curl(&[
        "-H",
        &format!("b3: {t:032x}-00000000000000fb-1"),
        &format!("http://127.0.0.1:{}/page.txt", servers.forking_port),
    ]);
    let got = exactly(&peers.spans, t, 2);
    let client = one(&got, "CLIENT", "curl");
    let server = one(&got, "SERVER", "busybox");
    assert_eq!(server.parent, Some(client.span_id));
    assert!(
        client.contains(server),
        "{client:#?} must cover {server:#?}"
    );
    assert_eq!(server.attr("http.response.status_code").i(), 200);
}

/// redis-benchmark's SETs and GETs of 20 kB values (commands and replies larger than the copy
/// cap, skipped by length): each call decoded once.
fn redis_calls(agent: &Agent, servers: &Servers) {
    const CALLS: u64 = 200;
    let series = |op: &str| {
        format!(
            "db_client_operation_duration_seconds_count{{service_name=\"redis-benchmark\",\
             db_system_name=\"redis\",db_operation_name=\"{op}\"}}"
        )
    };
    let mut bench = Command::new("redis-benchmark");
    bench.args(["-p", &servers.redis_port.to_string(), "-q", "-t", "set,get"]);
    bench.args(["-n", &CALLS.to_string(), "-c", "2", "-d", "20000"]);
    let out = bench.output().expect("redis-benchmark runs");
    assert!(out.status.success(), "redis-benchmark: {out:?}");
    let calls = |op: &str| kspan_tests::metric_or_zero(agent.metrics, &series(op));
    let deadline = std::time::Instant::now() + Duration::from_secs(SPAN_WAIT_SECS);
    while (calls("SET"), calls("GET")) != (CALLS, CALLS) {
        if std::time::Instant::now() > deadline {
            let all = kspan_tests::http_get(agent.metrics, "/metrics").unwrap_or_default();
            let related: Vec<&str> = all
                .lines()
                .filter(|l| {
                    l.starts_with("db_client_operation_duration_seconds_count")
                        || (l.starts_with("kspan_") && !l.ends_with(" 0"))
                })
                .collect();
            panic!(
                "SET/GET calls {:?}, want {CALLS} each:\n{}",
                (calls("SET"), calls("GET")),
                related.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The spans of trace `t`, which must be exactly `n` (a late extra span fails too).
fn exactly(spans: &Spans, t: u128, n: usize) -> Vec<Got> {
    spans.exactly(t, n, SPAN_WAIT_SECS, Duration::from_secs(1))
}

fn server_on(spans: &[Got], port: u16) -> &Got {
    let found: Vec<&Got> = spans
        .iter()
        .filter(|s| s.kind == "SERVER" && s.attr("server.port").i() == port as i64)
        .collect();
    assert_eq!(found.len(), 1, "one SERVER span on port {port}: {spans:#?}");
    found[0]
}

fn first_line(s: &str) -> &str {
    s.lines()
        .find(|l| l.contains("kspan:"))
        .or_else(|| s.lines().next())
        .unwrap_or_default()
}

#[derive(Default)]
struct Results {
    passed: usize,
    failed: usize,
}

impl Results {
    fn run(&mut self, hook: &str, check: &str, agent: &Agent, f: impl FnOnce()) {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(()) => self.pass(hook, check, ""),
            Err(e) => {
                let log = agent.proc.log();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                self.fail(
                    hook,
                    check,
                    &format!("{}\nagent log tail:\n{}", panic_text(e), tail.join("\n")),
                );
            }
        }
    }

    fn pass(&mut self, hook: &str, check: &str, detail: &str) {
        self.passed += 1;
        say(&format!("PASS {hook} {check} {detail}"));
    }

    fn fail(&mut self, hook: &str, check: &str, why: &str) {
        self.failed += 1;
        say(&format!("FAIL {hook} {check}: {why}"));
    }

    fn finish(&self) {
        say(&format!("{} passed, {} failed", self.passed, self.failed));
        if self.failed > 0 || self.passed == 0 {
            std::process::exit(1);
        }
    }
}

/// Says the agent's log record whose first line contains `marker`: that line and the last
/// lines of the record (a verifier log ends with the reason).
fn say_record(log: &str, marker: &str) {
    let lines: Vec<&str> = log.lines().collect();
    if let Some(at) = lines.iter().position(|l| l.contains(marker)) {
        let end = lines[at + 1..]
            .iter()
            .position(|l| l.starts_with('['))
            .map_or(lines.len(), |e| at + 1 + e);
        let tail = &lines[end.saturating_sub(12).max(at + 1)..end];
        say(&format!("agent said: {}\n{}", lines[at], tail.join("\n")));
    }
}
