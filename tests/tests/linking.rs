//! Zero-code linking (README rule 2) is right or silent: a gateway that forwards no headers,
//! serving 40 overlapping requests, each calling a slow backend. Where the runtime's threads
//! say which request made a call (Python, one thread per request), or its goroutines do (Go,
//! followed through the runtime probes), every call is under its own request; where nothing
//! does (Node.js serves every request on one event loop) no call is put under another
//! request: it is left without a parent, marked `kspan.link=ambiguous` and counted. With B3
//! forwarded, all three are exact.
use std::{collections::HashMap, path::PathBuf, process::Command};

use kspan_tests::{Got, Proc, PyService, env, free_port, run_ok, unique_path};

const REQUESTS: usize = 40;

/// A backend slow enough (300 ms) for all of the gateway's requests to be open at once.
const SLOW: &str = r#"
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        time.sleep(0.3)
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"leaf\n")
    def log_message(self, *a): pass
class S(http.server.ThreadingHTTPServer):
    # 80 connections arrive at once in the fan-out case; the default backlog (5) drops SYNs,
    # and their retransmissions (1, 3, 7, 15, 31 s) can outlast the client's timeout.
    request_queue_size = 128
S(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// 40 threads released together, one GET each; with `b3`, each request starts its own trace.
const LOAD: &str = r#"
import sys, threading, urllib.request
port, prefix, b3, n = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
gate = threading.Barrier(n)
failed = []
def one(i):
    headers = {"b3": "%032x-%016x-1" % (0x51ab0000 + i, 0x5a00 + i)} if b3 else {}
    gate.wait()
    try:
        urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:%s%s/%d" % (port, prefix, i), headers=headers), timeout=30).read()
    except Exception as e:
        failed.append(e)
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
if failed:
    sys.exit("%d of %d requests failed: %r" % (len(failed), n, failed[:3]))
"#;

/// net/http with the default client: the handler's goroutine hands the request to the
/// transport's own goroutines, which move between OS threads. With `fanout`, each request
/// calls the backend twice at once, from two goroutines of its own (`?a` and `?b`).
const GO_GATEWAY: &str = include_str!("../go/gateway.go");

const NODE_GATEWAY: &str = r#"
const http = require("http");
const [port, next, forward] = process.argv.slice(1);
const agent = new http.Agent({ keepAlive: true });
http.createServer((req, res) => {
  const headers = {};
  if (forward === "1")
    for (const [k, v] of Object.entries(req.headers))
      if (k === "b3" || k.startsWith("x-b3-")) headers[k] = v;
  http.get(next + req.url, { headers, agent }, (r) => {
    let body = "";
    r.on("data", (d) => (body += d));
    r.on("end", () => res.end(body));
  }).on("error", (e) => { res.statusCode = 502; res.end(String(e)); });
}).listen(+port, "127.0.0.1");
"#;

/// The Go gateway, built once from the standard library (no network needed).
fn go_gateway_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("kspan-go-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            std::fs::write(dir.join("gateway.go"), GO_GATEWAY).expect("write source");
            let mut build = Command::new("go");
            build
                .args(["build", "-o", "gateway", "gateway.go"])
                .current_dir(&dir)
                .env("GOCACHE", dir.join("cache"))
                .env("GOPATH", dir.join("gopath"))
                .env("GO111MODULE", "off")
                .env("GOFLAGS", "");
            run_ok(build);
            dir.join("gateway")
        })
        .clone()
}

enum Runtime {
    Python,
    Go,
    Node,
}

/// Starts `runtime`'s gateway in front of `backend`, named `name`.
fn gateway(
    runtime: &Runtime,
    name: &str,
    backend: u16,
    forward: bool,
    fanout: bool,
) -> (u16, Option<Proc>, Option<PyService>) {
    let next = format!("http://127.0.0.1:{backend}");
    let port = free_port();
    let fwd = if forward { "1" } else { "0" };
    let mut cmd = match runtime {
        // The Python service always forwards B3 that it received; without headers sent there
        // is nothing to forward.
        Runtime::Python => return (0, None, Some(PyService::start(name, Some(backend)))),
        Runtime::Go => {
            let mut c = Command::new(go_gateway_binary());
            c.args([
                port.to_string(),
                next,
                fwd.into(),
                u8::from(fanout).to_string(),
            ]);
            c
        }
        Runtime::Node => {
            let mut c = Command::new("node");
            c.arg("-e")
                .arg(NODE_GATEWAY)
                .args([&port.to_string(), &next, fwd]);
            c
        }
    };
    cmd.env("OTEL_SERVICE_NAME", name);
    (port, Some(Proc::listening(name, cmd, port)), None)
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    right: usize,
    wrong: usize,
    ambiguous: usize,
}

/// Sends the overlapping requests through `runtime`'s gateway and classifies the parent of
/// each of its CLIENT spans.
fn overlapping(runtime: Runtime, name: &str, forward: bool) -> Tally {
    overlapping_calls(runtime, name, forward, 1)
}

/// As [`overlapping`], with `calls` backend calls per request (2: the Go gateway fans out).
fn overlapping_calls(runtime: Runtime, name: &str, forward: bool, calls: usize) -> Tally {
    let e = env();
    let backend_port = free_port();
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(SLOW).arg(backend_port.to_string());
    cmd.env("OTEL_SERVICE_NAME", format!("{name}-backend"));
    let _backend = Proc::listening(&format!("{name}-backend"), cmd, backend_port);
    let (port, _proc, py) = gateway(&runtime, name, backend_port, forward, calls > 1);
    let port = py.as_ref().map_or(port, |p| p.port);
    let prefix = unique_path(name);
    let ambiguous_before = e.metric("kspan_links_ambiguous_total");
    let mut load = Command::new("python3");
    load.arg("-c").arg(LOAD).args([
        port.to_string(),
        prefix.clone(),
        u8::from(forward).to_string(),
        REQUESTS.to_string(),
    ]);
    run_ok(load);
    let ours = |g: &Got| g.service() == name && g.path().is_some_and(|p| p.starts_with(&prefix));
    let spans = e.wait_spans(
        &format!("{REQUESTS} SERVER and CLIENT spans of {name}"),
        |s| {
            let mine = s.iter().filter(|g| ours(g));
            mine.clone().filter(|g| g.kind == "SERVER").count() == REQUESTS
                && mine.filter(|g| g.kind == "CLIENT").count() == calls * REQUESTS
        },
    );
    let servers: HashMap<u64, String> = spans
        .iter()
        .filter(|g| ours(g) && g.kind == "SERVER")
        .filter_map(|g| Some((g.span_id, g.path()?)))
        .collect();
    let mut tally = Tally::default();
    for c in spans.iter().filter(|g| ours(g) && g.kind == "CLIENT") {
        match c.parent {
            Some(p) if servers.get(&p) == c.path().as_ref() => tally.right += 1,
            Some(_) => tally.wrong += 1,
            None => {
                assert_eq!(c.attr("kspan.link").s(), "ambiguous", "{c:#?}");
                tally.ambiguous += 1;
            }
        }
    }
    eprintln!("{name}: {tally:?}");
    if tally.ambiguous > 0 {
        e.wait_metric("kspan_links_ambiguous_total", |n| {
            n >= ambiguous_before + tally.ambiguous as u64
        });
    }
    tally
}

/// Every call under its own request.
const EXACT: Tally = Tally {
    right: REQUESTS,
    wrong: 0,
    ambiguous: 0,
};

/// No call under another request; the requests overlapped, so some calls were ambiguous.
fn assert_right_or_silent(t: &Tally) {
    assert_eq!(t.wrong, 0, "{t:?}");
    assert_eq!(t.right + t.ambiguous, REQUESTS, "{t:?}");
    assert!(t.ambiguous > 0, "the requests overlapped: {t:?}");
}

#[test]
fn python_threads_link_every_call_to_its_own_request() {
    let t = overlapping(Runtime::Python, "py-gateway", false);
    assert_eq!(t, EXACT);
}

/// Goroutines are followed (the Go runtime probes): every call under its own request.
#[test]
fn go_without_headers_links_every_call_to_its_own_request() {
    let t = overlapping(Runtime::Go, "go-gateway", false);
    assert_eq!(t, EXACT);
}

/// A handler that calls two backends at once from goroutines of its own: both calls are
/// under their request.
#[test]
fn go_fan_out_in_goroutines_links_both_calls_to_their_request() {
    let t = overlapping_calls(Runtime::Go, "go-fanout-gateway", false, 2);
    assert_eq!(
        t,
        Tally {
            right: 2 * REQUESTS,
            ..EXACT
        }
    );
}

#[test]
fn node_without_headers_never_links_a_call_to_another_request() {
    let t = overlapping(Runtime::Node, "node-gateway", false);
    assert_right_or_silent(&t);
}

#[test]
fn go_and_node_with_b3_forwarded_are_exact() {
    for (runtime, name) in [
        (Runtime::Go, "go-b3-gateway"),
        (Runtime::Node, "node-b3-gateway"),
    ] {
        let t = overlapping(runtime, name, true);
        assert_eq!(t, EXACT, "{name}");
    }
}
