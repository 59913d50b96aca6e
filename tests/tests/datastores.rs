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

const STORE_PASSWORD: &str = "kspan-store-secret";

/// The service under test. `/redis` makes a fixed sequence of Redis calls, `/redis-light` three;
/// `/pg` and `/my` a transaction, a query, a failing one and a prepared statement; `/pg-light`
/// and `/my-light` one query; `/pg-big` a megabyte result. Each store's pool is made on first
/// use (`…-warm`).
const APP: &str = r#"
import http.server, os, sys, threading
PORT = int(sys.argv[1])
PASSWORD = os.environ["STORE_PASSWORD"]
pools, lock = {}, threading.RLock()
def pool(name, make):
    with lock:
        if name not in pools:
            pools[name] = make()
        return pools[name]
def redis_client():
    import redis
    return redis.Redis(connection_pool=pool("redis", lambda: redis.ConnectionPool(
        host="127.0.0.1", port=int(os.environ["REDIS_PORT"]), password=PASSWORD, db=2, protocol=2)))
def pg():
    import psycopg2.pool
    return pool("pg", lambda: psycopg2.pool.ThreadedConnectionPool(1, 30, host="127.0.0.1",
        port=int(os.environ["PG_PORT"]), user="shop", password=PASSWORD, dbname="shopdb"))
def pg3():
    import psycopg
    return pool("pg3", lambda: psycopg.connect(host="127.0.0.1", port=int(os.environ["PG_PORT"]),
        user="shop", password=PASSWORD, dbname="shopdb", autocommit=True))
def my():
    import pymysql
    return pool("my", lambda: pymysql.connect(host="127.0.0.1", port=int(os.environ["MY_PORT"]),
        user="shop", password=PASSWORD, database="shopdb"))
def my_prepared():
    import mysql.connector
    return pool("myc", lambda: mysql.connector.connect(host="127.0.0.1",
        port=int(os.environ["MY_PORT"]), user="shop", password=PASSWORD, database="shopdb",
        use_pure=True, ssl_disabled=True, autocommit=True))
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        trace = self.headers.get("x-b3-traceid", "")
        if self.path == "/redis":
            r = redis_client()
            r.set("cart:42", "secret-value")
            r.get("cart:42")
            p = r.pipeline(transaction=False)
            for i in range(10):
                p.incr("n:%d" % i)
            p.execute()
            r.rpush("list", "a")
            try:
                r.incr("list")
            except Exception:
                pass
        elif self.path == "/redis-light":
            r = redis_client()
            r.set("k:" + trace, "v")
            r.get("k:" + trace)
            r.delete("k:" + trace)
        elif self.path == "/redis-warm":
            redis_client().ping()
        elif self.path in ("/pg", "/pg-light", "/pg-warm", "/pg-big"):
            conns = pg()
            conn = conns.getconn()
            try:
                cur = conn.cursor()
                if self.path == "/pg":
                    cur.execute("INSERT INTO orders (id, item) VALUES (%s, %s)", (int(trace[-4:], 16), "secret-item"))
                    cur.execute("UPDATE orders SET item = %s WHERE id = %s", ("book", int(trace[-4:], 16)))
                    conn.commit()
                    cur.execute("SELECT item FROM orders WHERE id = %s", (int(trace[-4:], 16),))
                    cur.fetchall()
                    conn.commit()
                    try:
                        cur.execute("SELECT * FROM no_such_table")
                    except Exception:
                        conn.rollback()
                    with pg3().cursor() as c3:
                        c3.execute("SELECT count(*) FROM orders WHERE item = %s", ("book",), prepare=True)
                        c3.fetchall()
                elif self.path == "/pg-big":
                    c3 = pg3()
                    c3.execute("SELECT repeat('x', 200) FROM generate_series(1, 5000)").fetchall()
                    c3.execute("SELECT 1").fetchall()
                elif self.path == "/pg-light":
                    cur.execute("SELECT item FROM orders WHERE item = %s", ("k" + trace,))
                    cur.fetchall()
                    conn.commit()
                else:
                    cur.execute("SELECT 1")
                    conn.commit()
                    pg3().execute("SELECT 1")
            finally:
                conns.putconn(conn)
        elif self.path in ("/my", "/my-warm", "/my-light"):
            with lock:
                conn = my()
                cur = conn.cursor()
                if self.path == "/my":
                    cur.execute("INSERT INTO orders (id, item) VALUES (%s, %s)", (int(trace[-4:], 16), "secret-item"))
                    cur.execute("SELECT item FROM orders WHERE id = %s", (int(trace[-4:], 16),))
                    cur.fetchall()
                    conn.commit()
                    try:
                        cur.execute("SELECT * FROM no_such_table")
                    except Exception:
                        conn.rollback()
                    c = my_prepared().cursor(prepared=True)
                    c.execute("SELECT item FROM orders WHERE id = %s", (int(trace[-4:], 16),))
                    c.fetchall()
                    c.close()
                elif self.path == "/my-light":
                    cur.execute("SELECT item FROM orders WHERE id = %s", (int(trace[-4:], 16),))
                    cur.fetchall()
                    conn.commit()
                else:
                    cur.execute("SELECT 1")
                    cur.fetchall()
                    c = my_prepared().cursor(buffered=True)
                    c.execute("SELECT 1")
                    c.fetchall()
                    c.close()
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", PORT), H).serve_forever()
"#;

/// A PostgreSQL server of its own (the server refuses to run as root: it runs as `postgres`),
/// with user `shop` owning database `shopdb` and its table `orders`.
fn postgres(port: u16) -> Proc {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .expect("postgresql is installed (cargo xtask setup)")
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .max()
        .expect("a postgresql version");
    let dir = std::env::temp_dir().join(format!("kspan-pg-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("pg dir");
    let mut chown = Command::new("chown");
    chown.args(["postgres:postgres", &dir.display().to_string()]);
    run_ok(chown);
    let data = dir.join("data").display().to_string();
    let pwfile = dir.join("pw");
    std::fs::write(&pwfile, STORE_PASSWORD).expect("pwfile");
    let as_postgres = |program: &str| {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(program));
        c
    };
    let mut initdb = as_postgres("initdb");
    initdb.args([
        "-D",
        &data,
        "-U",
        "postgres",
        "--auth=scram-sha-256",
        "--pwfile",
    ]);
    initdb.arg(&pwfile);
    run_ok(initdb);
    let mut server = as_postgres("postgres");
    server.args([
        "-D",
        &data,
        "-p",
        &port.to_string(),
        "-k",
        &dir.display().to_string(),
    ]);
    server.args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]);
    let proc = Proc::listening("postgres", server, port);
    psql(
        port,
        "postgres",
        &format!("CREATE USER shop PASSWORD '{STORE_PASSWORD}'"),
    );
    psql(port, "postgres", "CREATE DATABASE shopdb OWNER shop");
    psql(
        port,
        "shopdb",
        "CREATE TABLE orders (id int PRIMARY KEY, item text); ALTER TABLE orders OWNER TO shop;",
    );
    proc
}

/// A MariaDB server of its own, running as `mysql`, with user `shop` owning database `shopdb`
/// and its table `orders`.
fn mariadb(port: u16) -> Proc {
    let dir = std::env::temp_dir().join(format!("kspan-my-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mariadb dir");
    let mut chown = Command::new("chown");
    chown.args(["mysql:mysql", &dir.display().to_string()]);
    run_ok(chown);
    let data = format!("--datadir={}", dir.join("data").display());
    let socket = format!("--socket={}", dir.join("sock").display());
    let mut install = Command::new("mariadb-install-db");
    install.args([
        "--no-defaults",
        &data,
        "--user=mysql",
        "--auth-root-authentication-method=socket",
    ]);
    run_ok(install);
    let mut server = Command::new("mariadbd");
    server.args([
        "--no-defaults",
        &data,
        &socket,
        "--user=mysql",
        "--bind-address=127.0.0.1",
    ]);
    server.args([
        &format!("--port={port}"),
        "--skip-log-bin",
        "--innodb-buffer-pool-size=16M",
    ]);
    let proc = Proc::listening("mariadbd", server, port);
    let setup = format!(
        "CREATE DATABASE shopdb; CREATE USER 'shop'@'127.0.0.1' IDENTIFIED BY '{STORE_PASSWORD}'; \
         GRANT ALL ON shopdb.* TO 'shop'@'127.0.0.1'; \
         CREATE TABLE shopdb.orders (id int PRIMARY KEY, item text);"
    );
    let mut client = Command::new("mariadb");
    client.args(["--no-defaults", &socket, "-u", "root", "-e", &setup]);
    run_ok(client);
    proc
}

/// A MariaDB global status counter (`Com_select`, …).
fn mariadb_status(port: u16, name: &str) -> u64 {
    let mut c = Command::new("mariadb");
    c.args([
        "--no-defaults",
        "-h",
        "127.0.0.1",
        "-P",
        &port.to_string(),
        "-u",
        "shop",
    ]);
    c.args([&format!("-p{STORE_PASSWORD}"), "-N", "-B", "-e"]);
    c.arg(format!("SHOW GLOBAL STATUS LIKE '{name}'"));
    let out = String::from_utf8_lossy(&run_ok(c)).into_owned();
    out.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {out:?}"))
}

fn psql(port: u16, db: &str, sql: &str) {
    let mut c = Command::new("psql");
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "postgres",
        "-d",
        db,
    ]);
    c.args(["-v", "ON_ERROR_STOP=1", "-q", "-c", sql]);
    c.env("PGPASSWORD", STORE_PASSWORD);
    run_ok(c);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Store {
    Redis,
    Postgres,
    MariaDb,
}

struct Rig {
    _rt: tokio::runtime::Runtime,
    spans: Spans,
    agent: Agent,
    app: u16,
    store: u16,
    /// The store's server, then the service.
    procs: Vec<Proc>,
}

impl Rig {
    fn start(name: &str, store: Store) -> Self {
        Self::start_with(name, store, &[], false)
    }

    /// `agent_args` are added to the agent's command line. `pool_first`: the service connects
    /// its pool before the agent starts (the agent finds those connections mid-life).
    fn start_with(name: &str, store: Store, agent_args: &[&str], pool_first: bool) -> Self {
        assert_root();
        let port = free_port();
        let (server, env, warm) = match store {
            Store::Redis => {
                let mut server = Command::new("redis-server");
                server.args(["--port", &port.to_string(), "--bind", "127.0.0.1"]);
                server.args(["--save", "", "--appendonly", "no"]);
                server.args(["--requirepass", STORE_PASSWORD]);
                let server = Proc::listening("redis-server", server, port);
                (server, "REDIS_PORT", "/redis-warm")
            }
            Store::Postgres => (postgres(port), "PG_PORT", "/pg-warm"),
            Store::MariaDb => (mariadb(port), "MY_PORT", "/my-warm"),
        };
        let rt = runtime();
        let (collector, spans) = grpc_collector(&rt);
        let app = free_port();
        let (app_arg, store_arg) = (app.to_string(), port.to_string());
        let start_app = || {
            let mut cmd = Command::new("python3");
            cmd.args(["-c", APP, &app_arg]);
            cmd.env("OTEL_SERVICE_NAME", "shop");
            cmd.env("STORE_PASSWORD", STORE_PASSWORD)
                .env(env, &store_arg);
            let app_proc = Proc::listening("shop", cmd, app);
            // The pool's connection is made (authentication, SELECT, client info) outside
            // the traces of the test.
            get(app, warm, None);
            app_proc
        };
        let early = pool_first.then(start_app);
        let mut args = vec![
            "--linger-ms",
            "50",
            "--port",
            &app_arg,
            "--port",
            &store_arg,
        ];
        args.extend(agent_args);
        let agent = Agent::start(name, &args, &otlp_grpc(collector));
        let app_proc = early.unwrap_or_else(start_app);
        Self {
            _rt: rt,
            spans,
            agent,
            app,
            store: port,
            procs: vec![server, app_proc],
        }
    }

    fn get(&self, path: &str, trace: Option<u128>) {
        get(self.app, path, trace);
    }

    /// The data-store calls of one request, in order, each checked to be the child of the
    /// request's SERVER span and within it, made by the service to this rig's store (of
    /// `system`), in `namespace`.
    fn calls_of<'a>(&self, spans: &'a [Got], system: &str, namespace: &str) -> Vec<&'a Got> {
        let server = one(spans, "SERVER", "shop");
        let db = db_spans(spans);
        for s in &db {
            assert_eq!(s.parent, Some(server.span_id), "{s:#?}");
            assert!(server.contains(s), "{s:#?} outside {server:#?}");
            assert_eq!(s.service(), "shop");
            assert_eq!(s.attr("db.system.name").s(), system);
            assert_eq!(s.attr("db.namespace").s(), namespace);
            assert_eq!(s.attr("server.port").i(), self.store as i64);
            assert_eq!(s.attr("server.address").s(), "127.0.0.1");
        }
        db
    }

    /// The password crossed the wire when the pool connected, and `literal` in a statement:
    /// neither appears in any span.
    fn assert_no_secrets(&self, literal: &str) {
        let everything = format!("{:?}", self.spans.all());
        assert!(!everything.contains(STORE_PASSWORD), "{everything}");
        assert!(!everything.contains(literal), "literals are sanitised");
    }
}

/// A request to the service on `app`, with B3 headers naming `trace`.
fn get(app: u16, path: &str, trace: Option<u128>) {
    let url = format!("http://127.0.0.1:{}{path}", app);
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "--max-time", "10", &url]);
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

/// The data-store spans of a trace, in call order.
fn db_spans(spans: &[Got]) -> Vec<&Got> {
    let mut db: Vec<&Got> = spans
        .iter()
        .filter(|s| s.attrs.contains_key("db.system.name"))
        .collect();
    db.sort_by_key(|s| s.start);
    db
}

#[test]
fn redis_calls_are_children_of_the_request_that_made_them() {
    let rig = Rig::start("agent-redis", Store::Redis);
    let t = trace_id(0x4ed1);
    rig.get("/redis", Some(t));
    // curl's CLIENT, the SERVER, then SET, GET, 10 pipelined INCRBY, RPUSH and INCRBY (a type
    // error).
    let spans = rig.spans.exactly(t, 16, 20, Duration::from_millis(500));
    let server = one(&spans, "SERVER", "shop");
    assert_eq!(server.parent, Some(one(&spans, "CLIENT", "curl").span_id));
    // "2": the pool's SELECT 2.
    let db = rig.calls_of(&spans, "redis", "2");
    assert_eq!(db.len(), 14);
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

    rig.assert_no_secrets("secret-value");
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
    // The service graph: an edge from the service to the store's own process, named like any
    // process by its executable (Debian's redis-server is a link to redis-check-rdb).
    let exe = std::fs::read_link(format!("/proc/{}/exe", rig.procs[0].pid())).expect("exe");
    let store = exe
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let edge = format!(
        "traces_service_graph_request_total{{client=\"shop\",server=\"{store}\",\
         connection_type=\"database\"}}"
    );
    wait_metric(rig.agent.metrics, &edge, |v| v >= 14);
}

#[test]
fn overlapping_requests_each_own_their_redis_calls() {
    // The key names the trace: each call's text shows whose it is.
    overlapping(
        Store::Redis,
        "/redis-light",
        &["SET", "GET", "DEL"],
        &["AUTH", "SELECT", "CLIENT"],
        true,
    );
}

#[test]
fn overlapping_requests_each_own_their_postgres_calls() {
    overlapping(
        Store::Postgres,
        "/pg-light",
        &["BEGIN", "SELECT orders", "COMMIT"],
        &[],
        false,
    );
}

/// 20 requests at once on the threaded service, whose pool grows under the burst: every call
/// is under its own request's SERVER span. `setup`: calls a request that opens a pool
/// connection also makes (under that request).
fn overlapping(store: Store, path: &'static str, calls: &[&str], setup: &[&str], keyed: bool) {
    let rig = Arc::new(Rig::start("agent-concurrent", store));
    const N: u16 = 20;
    let barrier = Arc::new(Barrier::new(N as usize));
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let (rig, barrier) = (rig.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                rig.get(path, Some(trace_id(0x5000 + i)));
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    for i in 0..N {
        let t = trace_id(0x5000 + i);
        rig.spans.wait_trace(t, 2 + calls.len(), 20);
        std::thread::sleep(Duration::from_millis(300));
        let spans: Vec<Got> = rig
            .spans
            .all()
            .into_iter()
            .filter(|s| s.trace_id == t)
            .collect();
        let server = one(&spans, "SERVER", "shop");
        let db = db_spans(&spans);
        let names: Vec<&str> = db
            .iter()
            .map(|s| s.name.as_str())
            .filter(|n| !setup.contains(n))
            .collect();
        assert_eq!(names, calls, "trace {t:032x}");
        let key = format!("k:{t:032x}");
        for s in &db {
            assert_eq!(s.parent, Some(server.span_id), "{s:#?}");
            if keyed && !setup.contains(&s.name.as_str()) {
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
    // A ring deep enough that the debug-build agent, sharing two cores with the load, does not
    // fall behind: this test counts calls; losses under contention are counted elsewhere.
    let rig = Rig::start_with(
        "agent-redis-benchmark",
        Store::Redis,
        &["--ring-buffer-mb", "128"],
        false,
    );
    const CALLS: u64 = 3000;
    // One command per write, 16 per write, and 20 kB values (commands and replies larger than
    // the copy cap, skipped by length).
    for (pipeline, size) in [("1", "3"), ("16", "3"), ("1", "20000")] {
        let mut bench = Command::new("redis-benchmark");
        bench.args(["-p", &rig.store.to_string(), "-a", STORE_PASSWORD, "-q"]);
        bench.args([
            "-n",
            &CALLS.to_string(),
            "-c",
            "4",
            "-P",
            pipeline,
            "-d",
            size,
        ]);
        bench.args(["-t", "set,get"]);
        run_ok(bench);
    }
    // The server's own count: a pipelining client sends whole batches, a few more than -n.
    let mut info = Command::new("redis-cli");
    info.args([
        "-p",
        &rig.store.to_string(),
        "-a",
        STORE_PASSWORD,
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
        assert!(calls >= 3 * CALLS, "{op}: {calls}");
        wait_metric(rig.agent.metrics, &series(op), |v| v == calls);
    }
    assert_eq!(
        metric(rig.agent.metrics, "kspan_kernel_lost_events_total"),
        0
    );
}

#[test]
fn postgres_calls_are_children_of_the_request_that_made_them() {
    let rig = Rig::start("agent-postgres", Store::Postgres);
    let t = trace_id(0x9a01);
    rig.get("/pg", Some(t));
    let spans = rig.spans.exactly(t, 13, 20, Duration::from_millis(500));
    let db = rig.calls_of(&spans, "postgresql", "shopdb");
    let names: Vec<&str> = db.iter().map(|s| s.name.as_str()).collect();
    // psycopg2 opens each transaction with BEGIN; psycopg 3 runs the last one as a prepared
    // statement (Parse, then Bind and Execute).
    assert_eq!(
        names,
        [
            "BEGIN",
            "INSERT orders",
            "UPDATE orders",
            "COMMIT",
            "BEGIN",
            "SELECT orders",
            "COMMIT",
            "BEGIN",
            "SELECT no_such_table",
            "ROLLBACK",
            "SELECT orders"
        ]
    );
    assert_eq!(
        db[1].attr("db.query.text").s(),
        "INSERT INTO orders (id, item) VALUES (?, ?)"
    );
    assert_eq!(db[1].attr("db.collection.name").s(), "orders");
    assert_eq!(db[1].attr("db.operation.name").s(), "INSERT");
    let failed = db[8];
    assert_eq!(failed.status, 2, "{failed:#?}");
    assert_eq!(failed.attr("db.response.status_code").s(), "42P01");
    assert!(db.iter().filter(|s| s.status == 2).count() == 1);
    assert_eq!(
        db[10].attr("db.query.text").s(),
        "SELECT count(*) FROM orders WHERE item = $1",
        "the prepared statement's text, from its Parse"
    );
    rig.assert_no_secrets("secret-item");
    assert!(metric(rig.agent.metrics, "kspan_connections_db_server_total") >= 1);
}

#[test]
fn pgbench_calls_are_counted_exactly() {
    let rig = Rig::start("agent-pgbench", Store::Postgres);
    let pgbench = |args: &[&str]| {
        let mut c = Command::new("pgbench");
        c.args([
            "-h",
            "127.0.0.1",
            "-p",
            &rig.store.to_string(),
            "-U",
            "shop",
        ]);
        c.args(args).arg("shopdb").env("PGPASSWORD", STORE_PASSWORD);
        run_ok(c);
    };
    pgbench(&["-i", "-q", "-s", "1"]);
    const PER_CLIENT: u64 = 500;
    for mode in ["simple", "extended", "prepared"] {
        pgbench(&[
            "-S",
            "-n",
            "-M",
            mode,
            "-c",
            "2",
            "-t",
            &PER_CLIENT.to_string(),
        ]);
    }
    let series = "db_client_operation_duration_seconds_count{service_name=\"pgbench\",\
                  db_system_name=\"postgresql\",db_operation_name=\"SELECT\",\
                  db_collection_name=\"pgbench_accounts\"}";
    wait_metric(rig.agent.metrics, series, |v| v == 3 * 2 * PER_CLIENT);
    // pgbench -i loads its 100,000 accounts with COPY: megabytes skipped by length, one call.
    let copy = "db_client_operation_duration_seconds_count{service_name=\"pgbench\",\
                db_system_name=\"postgresql\",db_operation_name=\"COPY\"}";
    assert_eq!(metric(rig.agent.metrics, copy), 1);
    assert_eq!(
        metric(rig.agent.metrics, "kspan_kernel_lost_events_total"),
        0
    );
    assert_eq!(metric(rig.agent.metrics, "kspan_stream_desyncs_total"), 0);
}

#[test]
fn a_result_set_larger_than_the_capture_ends_at_its_last_byte() {
    // Each read's first 256 bytes and last 64 are copied: the rows' headers are skipped.
    let rig = Rig::start_with(
        "agent-postgres-big",
        Store::Postgres,
        &["--payload-cap", "256"],
        false,
    );
    let t = trace_id(0x9b01);
    rig.get("/pg-big", Some(t));
    let spans = rig.spans.exactly(t, 4, 20, Duration::from_millis(300));
    let server = one(&spans, "SERVER", "shop");
    let db = db_spans(&spans);
    let names: Vec<&str> = db.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["SELECT", "SELECT"]);
    assert!(db[0].end <= db[1].start, "{db:#?}");
    for s in &db {
        assert_eq!(s.parent, Some(server.span_id));
        assert_eq!(s.status, 0);
    }
    assert!(db[0].end - db[0].start > db[1].end - db[1].start, "{db:#?}");
    assert_eq!(metric(rig.agent.metrics, "kspan_spans_abandoned_total"), 0);
}

#[test]
fn mariadb_calls_are_children_of_the_request_that_made_them() {
    let rig = Rig::start("agent-mariadb", Store::MariaDb);
    let t = trace_id(0x3a01);
    rig.get("/my", Some(t));
    let spans = rig.spans.exactly(t, 8, 20, Duration::from_millis(500));
    let db = rig.calls_of(&spans, "mysql", "shopdb");
    let names: Vec<&str> = db.iter().map(|s| s.name.as_str()).collect();
    // PyMySQL's queries, then mysql-connector's prepared statement (COM_STMT_PREPARE makes no
    // span; its COM_STMT_EXECUTE does, under the statement's text).
    assert_eq!(
        names,
        [
            "INSERT orders",
            "SELECT orders",
            "COMMIT",
            "SELECT no_such_table",
            "ROLLBACK",
            "SELECT orders"
        ]
    );
    assert_eq!(
        db[0].attr("db.query.text").s(),
        "INSERT INTO orders (id, item) VALUES (?, ?)"
    );
    let failed = db[3];
    assert_eq!(failed.status, 2, "{failed:#?}");
    assert_eq!(failed.attr("db.response.status_code").s(), "1146");
    assert_eq!(db.iter().filter(|s| s.status == 2).count(), 1);
    assert_eq!(
        db[5].attr("db.query.text").s(),
        "SELECT item FROM orders WHERE id = ?"
    );
    rig.assert_no_secrets("secret-item");
}

#[test]
fn mariadb_slap_calls_are_counted_exactly() {
    let rig = Rig::start("agent-mariadb-slap", Store::MariaDb);
    let before = mariadb_status(rig.store, "Com_select");
    let mut slap = Command::new("mariadb-slap");
    slap.args([
        "--no-defaults",
        "-h",
        "127.0.0.1",
        "-P",
        &rig.store.to_string(),
        "-u",
        "shop",
    ]);
    slap.args([&format!("-p{STORE_PASSWORD}"), "--create-schema=shopdb"]);
    slap.args([
        "--query=SELECT id FROM orders WHERE id = 1",
        "--concurrency=2",
    ]);
    slap.args(["--number-of-queries=2000", "--iterations=1"]);
    run_ok(slap);
    let served = mariadb_status(rig.store, "Com_select") - before;
    assert!(served >= 2000, "{served}");
    let series = "db_client_operation_duration_seconds_count{service_name=\"mariadb-slap\",\
                  db_system_name=\"mysql\",db_operation_name=\"SELECT\",\
                  db_collection_name=\"orders\"}";
    wait_metric(rig.agent.metrics, series, |v| v == served);
    assert_eq!(
        metric(rig.agent.metrics, "kspan_kernel_lost_events_total"),
        0
    );
    assert_eq!(metric(rig.agent.metrics, "kspan_stream_desyncs_total"), 0);
}

/// A pool connected before the agent started: each store's connection is recognised at its
/// next request and its calls are traced under their request (the database a connection
/// chose before the agent started is unknown, and left out).
#[test]
fn pools_older_than_the_agent_are_picked_up() {
    for (store, path, calls) in [
        (Store::Redis, "/redis-light", &["SET", "GET", "DEL"][..]),
        (
            Store::Postgres,
            "/pg-light",
            &["BEGIN", "SELECT orders", "COMMIT"],
        ),
        (Store::MariaDb, "/my-light", &["SELECT orders", "COMMIT"]),
    ] {
        let rig = Rig::start_with("agent-old-pool", store, &[], true);
        let t = trace_id(0x7a00 + store as u16);
        rig.get(path, Some(t));
        let spans = rig
            .spans
            .exactly(t, 2 + calls.len(), 20, Duration::from_millis(300));
        let server = one(&spans, "SERVER", "shop");
        let db = db_spans(&spans);
        let names: Vec<&str> = db.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, calls);
        for s in &db {
            assert_eq!(s.parent, Some(server.span_id), "{s:#?}");
            assert!(!s.attrs.contains_key("db.namespace"), "{s:#?}");
        }
        let discovered = "kspan_kernel_connections_discovered_total";
        wait_metric(rig.agent.metrics, discovered, |v| v >= 1);
    }
}
