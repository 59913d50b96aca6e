//! Data-store calls as CLIENT spans under the request that made them: an uninstrumented
//! Python HTTP service (threaded, one shared connection pool per store) calls a real
//! redis-server; each call's span is a child of the SERVER span of its request, in the trace
//! its B3 headers named, with the conventions' attributes, sanitised text, error statuses and
//! no password anywhere. A real benchmark client's call count is matched exactly.
use std::{
    process::Command,
    sync::{Arc, Barrier},
    time::Duration,
};

use kspan_tests::{
    Agent, Got, Proc, Spans, assert_root, free_port, grpc_collector, metric, one, otlp_grpc,
    run_ok, runtime, trace_id, wait_metric,
};

const REDIS_PASSWORD: &str = "kspan-redis-secret";

/// The service under test: `/redis` makes a fixed sequence of Redis calls, `/redis-light` three.
const APP: &str = r#"
import http.server, sys, redis
PORT, REDIS = int(sys.argv[1]), int(sys.argv[2])
pool = redis.ConnectionPool(host="127.0.0.1", port=REDIS, password=sys.argv[3], db=2, protocol=2)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        r = redis.Redis(connection_pool=pool)
        if self.path == "/redis":
            r.set("cart:42", "secret-value")
            r.get("cart:42")
            p = r.pipeline(transaction=False)
            for i in range(10):
                p.incr("n:%d" % i)
            p.execute()
            r.rpush("list", "a")
            try:
                r.incr("list")
            except redis.ResponseError:
                pass
        elif self.path == "/redis-light":
            r.set("k:" + self.headers["x-b3-traceid"], "v")
            r.get("k:" + self.headers["x-b3-traceid"])
            r.delete("k:" + self.headers["x-b3-traceid"])
        else:
            r.ping()
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", PORT), H).serve_forever()
"#;

struct Rig {
    _rt: tokio::runtime::Runtime,
    spans: Spans,
    agent: Agent,
    app: u16,
    redis: u16,
    _procs: Vec<Proc>,
}

impl Rig {
    fn start(name: &str) -> Self {
        assert_root();
        let redis = free_port();
        let mut server = Command::new("redis-server");
        server.args([
            "--port",
            &redis.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ]);
        server.args(["--appendonly", "no", "--requirepass", REDIS_PASSWORD]);
        let redis_proc = Proc::listening("redis-server", server, redis);
        let rt = runtime();
        let (collector, spans) = grpc_collector(&rt);
        let app = free_port();
        let (app_arg, redis_arg) = (app.to_string(), redis.to_string());
        let args = [
            "--linger-ms",
            "50",
            "--port",
            &app_arg,
            "--port",
            &redis_arg,
        ];
        let agent = Agent::start(name, &args, &otlp_grpc(collector));
        let mut cmd = Command::new("python3");
        cmd.args(["-c", APP, &app_arg, &redis_arg, REDIS_PASSWORD]);
        cmd.env("OTEL_SERVICE_NAME", "shop");
        let app_proc = Proc::listening("shop", cmd, app);
        let rig = Self {
            _rt: rt,
            spans,
            agent,
            app,
            redis,
            _procs: vec![redis_proc, app_proc],
        };
        // The pool's connection is made (AUTH, SELECT, client info) outside the traces below.
        rig.get("/warm", None);
        rig
    }

    fn get(&self, path: &str, trace: Option<u128>) {
        let url = format!("http://127.0.0.1:{}{path}", self.app);
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", &url]);
        if let Some(t) = trace {
            cmd.args(["-H", &format!("X-B3-TraceId: {t:032x}")]);
            cmd.args([
                "-H",
                "X-B3-SpanId: 00000000000000aa",
                "-H",
                "X-B3-Sampled: 1",
            ]);
        }
        run_ok(cmd);
    }
}

/// The data-store spans of a trace, in call order.
fn redis_spans(spans: &[Got]) -> Vec<&Got> {
    let mut db: Vec<&Got> = spans
        .iter()
        .filter(|s| s.attrs.contains_key("db.system.name"))
        .collect();
    db.sort_by_key(|s| s.start);
    db
}

#[test]
fn redis_calls_are_children_of_the_request_that_made_them() {
    let rig = Rig::start("agent-redis");
    let t = trace_id(0x4ed1);
    rig.get("/redis", Some(t));
    // curl's CLIENT, the SERVER, then SET, GET, 10 pipelined INCRBY, RPUSH and INCRBY (a type
    // error).
    let spans = rig.spans.exactly(t, 16, 20, Duration::from_millis(500));
    let server = one(&spans, "SERVER", "shop");
    assert_eq!(server.parent, Some(one(&spans, "CLIENT", "curl").span_id));
    let db = redis_spans(&spans);
    assert_eq!(db.len(), 14);
    for s in &db {
        assert_eq!(s.parent, Some(server.span_id), "{s:#?}");
        assert!(server.contains(s), "{s:#?} outside {server:#?}");
        assert_eq!(s.service(), "shop");
        assert_eq!(s.attr("db.system.name").s(), "redis");
        assert_eq!(s.attr("db.namespace").s(), "2", "SELECT 2 of the pool");
        assert_eq!(s.attr("server.port").i(), rig.redis as i64);
        assert_eq!(s.attr("server.address").s(), "127.0.0.1");
    }
    let names: Vec<&str> = db.iter().map(|s| s.name.as_str()).collect();
    let mut want = vec!["SET", "GET"];
    want.extend(["INCRBY"; 10]);
    want.extend(["RPUSH", "INCRBY"]);
    assert_eq!(names, want);
    assert_eq!(db[0].attr("db.query.text").s(), "SET cart:42 ?");
    assert_eq!(db[1].attr("db.query.text").s(), "GET cart:42");
    // The pipeline went out in one write: its calls say so, and each ends at its own reply.
    for s in &db[2..12] {
        assert_eq!(s.attr("db.operation.batch.size").i(), 10, "{s:#?}");
        assert_eq!(s.status, 0);
    }
    assert!(db[2..12].windows(2).all(|w| w[0].end <= w[1].end));
    let failed = db[13];
    assert_eq!(failed.status, 2, "{failed:#?}");
    assert_eq!(failed.attr("db.response.status_code").s(), "WRONGTYPE");
    assert_eq!(failed.attr("error.type").s(), "WRONGTYPE");

    // The password crossed the wire when the pool connected, and appears in no span.
    let everything = format!("{:?}", rig.spans.all());
    assert!(!everything.contains(REDIS_PASSWORD), "{everything}");
    assert!(
        !everything.contains("secret-value"),
        "literals are sanitised"
    );
    let auth = rig.spans.all().into_iter().find(|s| s.name == "AUTH");
    assert_eq!(
        auth.expect("the pool's AUTH").attr("db.query.text").s(),
        "AUTH ?"
    );
    // The data store's own side makes no spans by default.
    assert!(
        rig.spans
            .all()
            .iter()
            .all(|s| s.kind != "SERVER" || s.service() == "shop")
    );
    assert!(metric(rig.agent.metrics, "kspan_connections_db_server_total") >= 1);
}

#[test]
fn overlapping_requests_each_own_their_calls() {
    let rig = Arc::new(Rig::start("agent-redis-concurrent"));
    const N: u16 = 20;
    let barrier = Arc::new(Barrier::new(N as usize));
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let (rig, barrier) = (rig.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                rig.get("/redis-light", Some(trace_id(0x5000 + i)));
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    for i in 0..N {
        let t = trace_id(0x5000 + i);
        rig.spans.wait_trace(t, 5, 20);
        std::thread::sleep(Duration::from_millis(300));
        let spans: Vec<Got> = rig
            .spans
            .all()
            .into_iter()
            .filter(|s| s.trace_id == t)
            .collect();
        let server = one(&spans, "SERVER", "shop");
        let db = redis_spans(&spans);
        // The pool grows under the burst: a request that opens a connection also makes its
        // handshake calls, under that request.
        let names: Vec<&str> = db
            .iter()
            .map(|s| s.name.as_str())
            .filter(|n| !matches!(*n, "AUTH" | "SELECT" | "CLIENT"))
            .collect();
        assert_eq!(names, ["SET", "GET", "DEL"], "trace {t:032x}");
        let key = format!("k:{t:032x}");
        for s in &db {
            assert_eq!(s.parent, Some(server.span_id), "{s:#?}");
            if !matches!(s.name.as_str(), "AUTH" | "SELECT" | "CLIENT") {
                assert!(s.attr("db.query.text").s().contains(&key), "{s:#?}");
            }
        }
        assert_eq!(
            spans.len(),
            2 + db.len(),
            "curl, the server and the calls: {spans:#?}"
        );
    }
}

#[test]
fn redis_benchmark_calls_are_counted_exactly() {
    let rig = Rig::start("agent-redis-benchmark");
    const CALLS: u64 = 3000;
    for pipeline in ["1", "16"] {
        let mut bench = Command::new("redis-benchmark");
        bench.args(["-p", &rig.redis.to_string(), "-a", REDIS_PASSWORD, "-q"]);
        bench.args([
            "-n",
            &CALLS.to_string(),
            "-c",
            "4",
            "-P",
            pipeline,
            "-t",
            "set,get",
        ]);
        run_ok(bench);
    }
    // The server's own count: a pipelining client sends whole batches, a few more than -n.
    let mut info = Command::new("redis-cli");
    info.args([
        "-p",
        &rig.redis.to_string(),
        "-a",
        REDIS_PASSWORD,
        "--no-auth-warning",
    ]);
    info.args(["INFO", "commandstats"]);
    let info = String::from_utf8_lossy(&run_ok(info)).into_owned();
    let served = |op: &str| -> u64 {
        let line = format!("cmdstat_{}:calls=", op.to_ascii_lowercase());
        info.lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {line} in {info}"))
    };
    let series = |op: &str| {
        format!(
            "db_client_operation_duration_seconds_count{{service_name=\"redis-benchmark\",\
             db_system_name=\"redis\",db_operation_name=\"{op}\"}}"
        )
    };
    for op in ["SET", "GET"] {
        let calls = served(op);
        assert!(calls >= 2 * CALLS, "{op}: {calls}");
        wait_metric(rig.agent.metrics, &series(op), |v| v == calls);
    }
    assert_eq!(
        metric(rig.agent.metrics, "kspan_kernel_lost_events_total"),
        0
    );
}
