//! Harness for kspan's integration tests: the real agent binary with its real probes, real
//! uninstrumented servers (python http.server, nginx) and a real OTLP/gRPC collector.
//!
//! These tests need root and a BPF-capable kernel. They fail, never skip, when either is
//! missing: a green run must mean the kernel side was exercised.
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
};

#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    S(String),
    I(i64),
    B(bool),
}

impl Val {
    pub fn s(&self) -> &str {
        match self {
            Val::S(s) => s,
            other => panic!("not a string: {other:?}"),
        }
    }
    pub fn i(&self) -> i64 {
        match self {
            Val::I(i) => *i,
            other => panic!("not an int: {other:?}"),
        }
    }
}

/// One span as the collector received it.
#[derive(Clone, Debug)]
pub struct Got {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent: Option<u64>,
    /// "SERVER" or "CLIENT".
    pub kind: &'static str,
    pub name: String,
    pub start: u64,
    pub end: u64,
    pub attrs: HashMap<String, Val>,
    pub resource: HashMap<String, Val>,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status: i32,
}

impl Got {
    pub fn attr(&self, k: &str) -> &Val {
        self.attrs.get(k).unwrap_or_else(|| panic!("span has no {k}: {self:#?}"))
    }
    pub fn service(&self) -> &str {
        self.resource.get("service.name").map(Val::s).unwrap_or_default()
    }
    pub fn contains(&self, child: &Got) -> bool {
        self.start <= child.start && child.end <= self.end
    }
}

fn val(v: &Option<AnyValue>) -> Val {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Val::S(s.clone()),
        Some(any_value::Value::IntValue(i)) => Val::I(*i),
        Some(any_value::Value::BoolValue(b)) => Val::B(*b),
        other => Val::S(format!("{other:?}")),
    }
}

fn kv(list: &[KeyValue]) -> HashMap<String, Val> {
    list.iter().map(|k| (k.key.clone(), val(&k.value))).collect()
}

#[derive(Clone, Default)]
struct Store(Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in req.into_inner().resource_spans {
            let resource = kv(&rs.resource.map(|r| r.attributes).unwrap_or_default());
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let id = |b: &[u8]| b.iter().fold(0u128, |a, &x| a << 8 | x as u128);
                    got.push(Got {
                        trace_id: id(&s.trace_id),
                        span_id: id(&s.span_id) as u64,
                        parent: (!s.parent_span_id.is_empty()).then(|| id(&s.parent_span_id) as u64),
                        kind: match s.kind {
                            2 => "SERVER",
                            3 => "CLIENT",
                            _ => "OTHER",
                        },
                        name: s.name,
                        start: s.start_time_unix_nano,
                        end: s.end_time_unix_nano,
                        attrs: kv(&s.attributes),
                        resource: resource.clone(),
                        status: s.status.map(|st| st.code).unwrap_or(0),
                    });
                }
            }
        }
        self.0.lock().unwrap().extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// Processes started by the harness, killed when the test binary exits.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

extern "C" fn kill_children() {
    if let Ok(list) = CHILDREN.lock() {
        for &pid in list.iter() {
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

fn track(child: &Child) {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(kill_children) };
    });
    CHILDREN.lock().unwrap().push(child.id());
}

/// A child process killed on drop (or at exit, if the test panics while it runs).
pub struct Proc {
    child: Child,
    pub name: String,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Self {
        let log = std::env::temp_dir().join(format!("kspan-test-{name}-{}.log", std::process::id()));
        let file = std::fs::File::create(&log).expect("log file");
        cmd.stdout(file.try_clone().expect("dup")).stderr(file).stdin(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
        track(&child);
        Self { child, name: name.to_string(), log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log if the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited with {status}:\n{}", self.name, self.log());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

pub fn wait_for_port(p: &mut Proc, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        p.assert_running();
        assert!(Instant::now() < deadline, "{} never listened on {port}:\n{}", p.name, p.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An uninstrumented Python HTTP/1.1 service. It forwards trace headers to `next`, the way
/// applications using a B3 propagation library without a tracer do. `/status/N` answers N.
const APP: &str = r#"
import http.server, sys, urllib.request, urllib.error
PORT = int(sys.argv[1]); NEXT = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
FWD = ("x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3", "traceparent")
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        code, body = 200, b"leaf\n"
        if self.path.startswith("/status/"):
            code = int(self.path.split("/")[2])
        elif NEXT:
            req = urllib.request.Request(NEXT + self.path, headers={k: v for k, v in self.headers.items() if k.lower() in FWD})
            try:
                body = urllib.request.urlopen(req, timeout=10).read()
            except urllib.error.HTTPError as e:
                code, body = e.code, e.read()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", PORT), H).serve_forever()
"#;

pub struct PyService {
    pub port: u16,
    pub proc: Proc,
}

impl PyService {
    pub fn start(service_name: &str, next: Option<u16>) -> Self {
        let port = free_port();
        let mut cmd = Command::new("python3");
        cmd.arg("-c").arg(APP).arg(port.to_string());
        cmd.arg(next.map(|n| format!("http://127.0.0.1:{n}")).unwrap_or_default());
        cmd.env("OTEL_SERVICE_NAME", service_name);
        let mut proc = Proc::spawn(service_name, cmd);
        wait_for_port(&mut proc, port);
        Self { port, proc }
    }
}

/// nginx proxying `/` to `upstream` (HTTP/1.1 keep-alive upstream), with `/teapot` answered
/// by nginx itself.
pub struct Nginx {
    pub port: u16,
    pub proc: Proc,
    _dir: PathBuf,
}

impl Nginx {
    pub fn start(upstream: u16) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("kspan-nginx-{port}"));
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let conf = format!(
            "worker_processes 1;\nerror_log {d}/logs/error.log;\npid {d}/nginx.pid;\nevents {{ worker_connections 64; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
             upstream app {{ server 127.0.0.1:{upstream}; keepalive 4; }}\n\
             server {{\n  listen 127.0.0.1:{port};\n  location /teapot {{ return 418 \"short and stout\\n\"; }}\n\
               location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n }}\n}}\n",
            d = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let mut cmd = Command::new(nginx_binary());
        cmd.arg("-p").arg(&dir).arg("-c").arg(dir.join("nginx.conf")).arg("-g").arg("daemon off;");
        let mut proc = Proc::spawn("nginx", cmd);
        wait_for_port(&mut proc, port);
        Self { port, proc, _dir: dir }
    }
}

fn nginx_binary() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("nginx is not installed: run `cargo xtask setup`")
}

/// The shared agent and collector for every test in this binary.
pub struct Env {
    pub rt: tokio::runtime::Runtime,
    store: Store,
    pub collector: SocketAddr,
    pub metrics: SocketAddr,
    agent: Mutex<Proc>,
}

pub fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        // SAFETY: plain syscall.
        assert_eq!(unsafe { libc::geteuid() }, 0, "kspan's integration tests load eBPF programs and must run as root");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let store = Store::default();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("collector bind");
        let collector = listener.local_addr().expect("addr");
        let svc = TraceServiceServer::new(store.clone());
        rt.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .expect("collector");
        });
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let bin = std::env::var("KSPAN_BIN").expect("KSPAN_BIN must point at the kspan binary (`cargo xtask test` sets it)");
        let mut cmd = Command::new(bin);
        cmd.arg("--metrics-addr").arg(metrics.to_string()).arg("--linger-ms").arg("200");
        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}"));
        cmd.env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc");
        cmd.env("RUST_LOG", "info");
        let mut agent = Proc::spawn("kspan", cmd);
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(metrics, "/readyz").map(|r| !r.starts_with("HTTP/1.1 200")).unwrap_or(true) {
            agent.assert_running();
            assert!(Instant::now() < deadline, "kspan never became ready:\n{}", agent.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        Env { rt, store, collector, metrics, agent: Mutex::new(agent) }
    })
}

/// Minimal HTTP GET used for the agent's own endpoints (this process is traced too, which is
/// fine: these requests carry no trace context the tests look for).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: kspan\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

impl Env {
    /// Waits until `pred` holds over the spans received so far, and returns them.
    pub fn wait_spans(&self, what: &str, pred: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let spans = self.store.0.lock().unwrap().clone();
            if pred(&spans) {
                return spans;
            }
            self.agent.lock().unwrap().assert_running();
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; received {} spans:\n{spans:#?}\nagent log:\n{}", spans.len(), self.agent.lock().unwrap().log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// All spans of one trace, once `n` of them arrived.
    pub fn trace(&self, trace_id: u128, n: usize) -> Vec<Got> {
        self.wait_spans(&format!("{n} spans of trace {trace_id:032x}"), |s| s.iter().filter(|g| g.trace_id == trace_id).count() >= n)
            .into_iter()
            .filter(|g| g.trace_id == trace_id)
            .collect()
    }

    /// Waits (bounded) until a metric satisfies `pred`: the agent publishes counters once a
    /// second, so a fresh value may lag the spans that caused it.
    pub fn wait_metric(&self, name: &str, pred: impl Fn(u64) -> bool) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.metric(name);
            if pred(v) {
                return v;
            }
            assert!(Instant::now() < deadline, "metric {name} stuck at {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn metric(&self, name: &str) -> u64 {
        let body = http_get(self.metrics, "/metrics").expect("metrics endpoint");
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
    }
}

/// Runs curl and returns its stdout; fails the test on a non-zero exit.
pub fn curl(args: &[&str]) -> String {
    let out = Command::new("curl").args(["-sS", "--max-time", "10"]).args(args).output().expect("curl is not installed");
    assert!(out.status.success(), "curl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A unique path so tests can find their own spans when no trace id is known up front.
pub fn unique_path(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("/{tag}-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}
