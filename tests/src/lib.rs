//! Harness for kspan's integration tests: the real agent binary with its real probes, real
//! uninstrumented servers (python http.server, nginx) and a real OTLP/gRPC collector.
//!
//! These tests need root and a BPF-capable kernel. They fail, never skip, when either is
//! missing: a green run must mean the kernel side was exercised.
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
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

pub mod receivers;

#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    S(String),
    I(i64),
    B(bool),
    A(Vec<String>),
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
        self.attrs
            .get(k)
            .unwrap_or_else(|| panic!("span has no {k}: {self:#?}"))
    }
    pub fn service(&self) -> &str {
        self.resource
            .get("service.name")
            .map(Val::s)
            .unwrap_or_default()
    }
    pub fn contains(&self, child: &Got) -> bool {
        self.start <= child.start && child.end <= self.end
    }
    /// The request path without its query: a SERVER span's `url.path`, the path of a CLIENT
    /// span's `url.full`.
    pub fn path(&self) -> Option<String> {
        if let Some(p) = self.attrs.get("url.path") {
            return Some(p.s().to_string());
        }
        let full = self.attrs.get("url.full")?.s();
        let rest = full.split_once("://")?.1;
        let path = &rest[rest.find('/')?..];
        Some(path.split('?').next().unwrap_or(path).to_string())
    }
}

fn val(v: &Option<AnyValue>) -> Val {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Val::S(s.clone()),
        Some(any_value::Value::IntValue(i)) => Val::I(*i),
        Some(any_value::Value::BoolValue(b)) => Val::B(*b),
        Some(any_value::Value::ArrayValue(a)) => Val::A(
            a.values
                .iter()
                .map(|v| match val(&Some(v.clone())) {
                    Val::S(s) => s,
                    other => format!("{other:?}"),
                })
                .collect(),
        ),
        other => Val::S(format!("{other:?}")),
    }
}

fn kv(list: &[KeyValue]) -> HashMap<String, Val> {
    list.iter()
        .map(|k| (k.key.clone(), val(&k.value)))
        .collect()
}

/// What a collector received, and how it is told to answer.
#[derive(Clone, Default)]
struct Store(Arc<Mutex<Vec<Got>>>, receivers::Script);

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let gzip = req
            .metadata()
            .get("grpc-encoding")
            .is_some_and(|v| v == "gzip");
        let partial_success = match self.1.next(gzip) {
            Some(receivers::Answer::Grpc(code)) => {
                return Err(tonic::Status::new(code, "scripted failure"));
            }
            Some(receivers::Answer::Reject(n)) => Some(receivers::rejected(n)),
            _ => None,
        };
        self.add(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success,
        }))
    }
}

impl Store {
    fn add(&self, req: ExportTraceServiceRequest) {
        let mut got = Vec::new();
        for rs in req.resource_spans {
            let resource = kv(&rs.resource.map(|r| r.attributes).unwrap_or_default());
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let id = |b: &[u8]| b.iter().fold(0u128, |a, &x| a << 8 | x as u128);
                    got.push(Got {
                        trace_id: id(&s.trace_id),
                        span_id: id(&s.span_id) as u64,
                        parent: (!s.parent_span_id.is_empty())
                            .then(|| id(&s.parent_span_id) as u64),
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
    }
}

/// Processes started by the harness, killed when the test binary exits.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Kills a child's whole process group (nginx workers outlive a killed master otherwise).
fn kill_group(pid: u32) {
    // SAFETY: plain syscall; every child leads its own process group.
    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
}

extern "C" fn kill_children() {
    if let Ok(list) = CHILDREN.lock() {
        list.iter().copied().for_each(kill_group);
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
        let log =
            std::env::temp_dir().join(format!("kspan-test-{name}-{}.log", std::process::id()));
        let file = std::fs::File::create(&log).expect("log file");
        cmd.stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .stdin(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        track(&child);
        Self {
            child,
            name: name.to_string(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status, once the process has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
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
        kill_group(self.child.id());
        let _ = self.child.wait();
        CHILDREN
            .lock()
            .map(|mut l| l.retain(|&p| p != self.child.id()))
            .ok();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Proc {
    /// A server started from `cmd`, once it accepts connections on `port` (bounded).
    pub fn listening(name: &str, cmd: Command, port: u16) -> Self {
        let mut p = Self::spawn(name, cmd);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            p.assert_running();
            assert!(
                Instant::now() < deadline,
                "{} never listened on {port}:\n{}",
                p.name,
                p.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }
}

/// An uninstrumented Python HTTP/1.1 service. It forwards trace headers to `next`, the way
/// applications using a B3 propagation library without a tracer do. `/status/N` answers N.
/// With `TLS_CERT`, `TLS_KEY` and `TLS_CA` (PEM files) in its environment it serves HTTPS and
/// trusts that CA for `next` (the `ssl` module: OpenSSL's `SSL_read_ex` and `SSL_write_ex`).
const APP: &str = r#"
import http.server, os, ssl, sys, urllib.request, urllib.error
PORT = int(sys.argv[1]); NEXT = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
FWD = ("x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3", "traceparent")
CA, CERT, KEY = (os.environ.get(k) for k in ("TLS_CA", "TLS_CERT", "TLS_KEY"))
client = ssl.create_default_context(cafile=CA) if CA else None
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        code, body = 200, b"leaf\n"
        if self.path.startswith("/status/"):
            code = int(self.path.split("/")[2])
        elif NEXT:
            req = urllib.request.Request(NEXT + self.path, headers={k: v for k, v in self.headers.items() if k.lower() in FWD})
            try:
                body = urllib.request.urlopen(req, timeout=10, context=client).read()
            except urllib.error.HTTPError as e:
                code, body = e.code, e.read()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
# Bursts of connections (40 at once in the linking tests) outgrow the default backlog of 5.
http.server.ThreadingHTTPServer.request_queue_size = 128
server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), H)
if CERT:
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(CERT, KEY)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

pub struct PyService {
    pub port: u16,
    pub proc: Proc,
}

impl PyService {
    pub fn start(service_name: &str, next: Option<u16>) -> Self {
        Self::start_with(service_name, Some(service_name), next)
    }

    /// `otel_service_name: None` leaves the process to be named by the agent.
    pub fn start_with(name: &str, otel_service_name: Option<&str>, next: Option<u16>) -> Self {
        let next = next.map(|n| format!("http://127.0.0.1:{n}"));
        Self::run(name, otel_service_name, next, Command::new("python3"))
    }

    /// The service run by `python` (a command that runs Python given its arguments, with the
    /// environment the service should see), calling `next` (a base URL).
    pub fn run(
        name: &str,
        otel_service_name: Option<&str>,
        next: Option<String>,
        mut cmd: Command,
    ) -> Self {
        let port = free_port();
        cmd.arg("-c").arg(APP).arg(port.to_string());
        cmd.arg(next.unwrap_or_default());
        cmd.env_remove("OTEL_SERVICE_NAME");
        if let Some(n) = otel_service_name {
            cmd.env("OTEL_SERVICE_NAME", n);
        }
        let proc = Proc::listening(name, cmd, port);
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
        Self::with_locations(
            &format!("upstream app {{ server 127.0.0.1:{upstream}; keepalive 4; }}\n",),
            "location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }",
        )
    }

    /// nginx answering every path itself: `200 leaf\n` (and `/teapot` like [`Nginx::start`]).
    pub fn leaf() -> Self {
        Self::with_locations("", "location / { return 200 \"leaf\\n\"; }")
    }

    /// nginx serving HTTPS with `cert`/`key` (PEM files) and proxying `/` to the HTTPS
    /// `upstream` over keep-alive connections.
    pub fn https(upstream: u16, cert: &Path, key: &Path) -> Self {
        Self::with_listen(
            " ssl",
            &format!("upstream app {{ server 127.0.0.1:{upstream}; keepalive 4; }}\n"),
            &format!(
                "ssl_certificate {}; ssl_certificate_key {};\n\
                 location / {{ proxy_pass https://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_ssl_session_reuse on; }}",
                cert.display(),
                key.display()
            ),
        )
    }

    /// nginx answering every path itself over HTTPS (`cert`/`key`: PEM files).
    pub fn https_leaf(cert: &Path, key: &Path) -> Self {
        Self::with_listen(
            " ssl",
            "",
            &format!(
                "ssl_certificate {}; ssl_certificate_key {};\nlocation / {{ return 200 \"leaf\\n\"; }}",
                cert.display(),
                key.display()
            ),
        )
    }

    fn with_locations(http: &str, locations: &str) -> Self {
        Self::with_listen("", http, locations)
    }

    fn with_listen(listen: &str, http: &str, locations: &str) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("kspan-nginx-{port}"));
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let conf = format!(
            "worker_processes 1;\nerror_log {d}/logs/error.log;\npid {d}/nginx.pid;\nevents {{ worker_connections 64; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
             {http}\
             server {{\n  listen 127.0.0.1:{port}{listen};\n  location /teapot {{ return 418 \"short and stout\\n\"; }}\n\
               {locations}\n }}\n}}\n",
            d = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let mut cmd = Command::new(nginx_binary());
        cmd.arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-g")
            .arg("daemon off;");
        let proc = Proc::listening("nginx", cmd, port);
        Self {
            port,
            proc,
            _dir: dir,
        }
    }
}

fn nginx_binary() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("nginx is not installed: run `cargo xtask setup`")
}

/// The standard variables that point an agent at an OTLP/gRPC collector.
pub fn otlp_grpc(collector: SocketAddr) -> [(&'static str, String); 2] {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}")),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
    ]
}

/// A real OTLP/gRPC collector (opentelemetry-proto's generated service on tonic).
pub fn grpc_collector(rt: &tokio::runtime::Runtime) -> (SocketAddr, Spans) {
    grpc_collector_at(rt, "127.0.0.1:0".parse().expect("address"))
}

/// [`grpc_collector`] on a chosen address (e.g. one an agent was already told to use).
pub fn grpc_collector_at(rt: &tokio::runtime::Runtime, at: SocketAddr) -> (SocketAddr, Spans) {
    grpc_collector_with(rt, at, None)
}

/// [`grpc_collector_at`], behind TLS with this PEM certificate and key when given.
pub fn grpc_collector_with(
    rt: &tokio::runtime::Runtime,
    at: SocketAddr,
    tls: Option<(&str, &str)>,
) -> (SocketAddr, Spans) {
    let store = Store::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(at))
        .expect("collector bind");
    let addr = listener.local_addr().expect("addr");
    let svc = TraceServiceServer::new(store.clone())
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    let mut server = tonic::transport::Server::builder();
    if let Some((cert, key)) = tls {
        server = server
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(cert, key)),
            )
            .expect("collector TLS");
    }
    rt.spawn(async move {
        server
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("collector");
    });
    (addr, Spans(store))
}

/// The agent's environment for exporting OTLP/HTTP (protobuf) to [`http_collector`]'s address.
pub fn http_env(collector: SocketAddr) -> [(&'static str, String); 2] {
    [
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            format!("http://{collector}/v1/traces"),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
    ]
}

/// A real OTLP/HTTP collector: POST /v1/traces with a protobuf body, as the spec defines.
pub fn http_collector(rt: &tokio::runtime::Runtime) -> (SocketAddr, Spans) {
    http_collector_with(rt, None)
}

/// [`http_collector`] behind TLS when `tls` is given (an `https://` endpoint).
pub fn http_collector_with(
    rt: &tokio::runtime::Runtime,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (SocketAddr, Spans) {
    let store = Store::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("collector bind");
    let addr = listener.local_addr().expect("addr");
    let shared = store.clone();
    rt.spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let (store, tls) = (shared.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    Some(acceptor) => {
                        if let Ok(sock) = acceptor.accept(sock).await {
                            serve_otlp_http(sock, store).await;
                        }
                    }
                    None => serve_otlp_http(sock, store).await,
                }
            });
        }
    });
    (addr, Spans(store))
}

/// One OTLP/HTTP connection: POST /v1/traces with protobuf bodies, one request at a time.
async fn serve_otlp_http<S>(mut sock: S, store: Store)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use prost::Message as _;
    use tokio::io::AsyncWriteExt as _;
    let mut buf = Vec::new();
    while let Some((head, mut body)) = receivers::next_request(&mut sock, &mut buf).await {
        let gzip = head.contains("content-encoding: gzip");
        if gzip {
            body = receivers::gunzip(&body);
        }
        let ok = head.starts_with("post /v1/traces ")
            && head.contains("content-type: application/x-protobuf");
        let (mut status, mut extra, mut partial_success) =
            ("200 OK".to_string(), String::new(), None);
        match store.1.next(gzip) {
            Some(receivers::Answer::Http {
                status: code,
                retry_after,
            }) => {
                status = format!("{code} Scripted");
                if let Some(secs) = retry_after {
                    extra = format!("Retry-After: {secs}\r\n");
                }
            }
            Some(receivers::Answer::Reject(n)) => partial_success = Some(receivers::rejected(n)),
            _ => {}
        }
        if status.starts_with("200") {
            match ExportTraceServiceRequest::decode(&body[..]) {
                Ok(req) if ok => store.add(req),
                _ => status = "400 Bad Request".to_string(),
            }
        }
        let resp = ExportTraceServiceResponse { partial_success }.encode_to_vec();
        let head = format!(
            "HTTP/1.1 {status}\r\n{extra}Content-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
            resp.len()
        );
        if sock.write_all(head.as_bytes()).await.is_err() || sock.write_all(&resp).await.is_err() {
            return;
        }
    }
}

/// Spans a collector received.
#[derive(Clone)]
pub struct Spans(Store);

impl Spans {
    /// How the collector answers its next requests, and what it was sent.
    pub fn script(&self) -> &receivers::Script {
        &self.0.1
    }

    pub fn all(&self) -> Vec<Got> {
        self.0.0.lock().unwrap().clone()
    }

    /// The spans of trace `t` once `n` arrived within `secs`, after `settle` more, which must
    /// still be exactly `n` (a late extra span fails too).
    pub fn exactly(&self, t: u128, n: usize, secs: u64, settle: Duration) -> Vec<Got> {
        self.wait_trace(t, n, secs);
        std::thread::sleep(settle);
        let got: Vec<Got> = self.all().into_iter().filter(|g| g.trace_id == t).collect();
        assert_eq!(got.len(), n, "{got:#?}");
        got
    }

    /// All spans received, once `pred` holds over them (fails after `secs`).
    pub fn wait_for(&self, what: &str, secs: u64, pred: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.all();
            if pred(&got) {
                return got;
            }
            assert!(Instant::now() < deadline, "{what}: {got:#?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_trace(&self, t: u128, n: usize, secs: u64) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got: Vec<Got> = self.all().into_iter().filter(|g| g.trace_id == t).collect();
            if got.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "trace {t:032x}: {got:#?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A running agent, stopped (SIGKILL) on drop.
pub struct Agent {
    pub proc: Proc,
    pub metrics: SocketAddr,
}

impl Agent {
    /// Starts the agent and waits until `/readyz` says it is ready.
    pub fn start(name: &str, args: &[&str], env: &[(&str, String)]) -> Self {
        Self::start_within(name, args, env, Duration::from_secs(30))
    }

    /// [`Agent::start`] with another bound on loading: an emulated guest verifies slowly.
    pub fn start_within(
        name: &str,
        args: &[&str],
        env: &[(&str, String)],
        bound: Duration,
    ) -> Self {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(kspan_bin());
        cmd.arg("--metrics-addr")
            .arg(metrics.to_string())
            .args(args);
        cmd.env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut proc = Proc::spawn(name, cmd);
        let deadline = Instant::now() + bound;
        while http_get(metrics, "/readyz")
            .map(|r| !r.starts_with("HTTP/1.1 200"))
            .unwrap_or(true)
        {
            proc.assert_running();
            assert!(
                Instant::now() < deadline,
                "kspan never became ready:\n{}",
                proc.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { proc, metrics }
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: plain syscall.
        unsafe { libc::kill(self.proc.pid() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "kspan did not exit after SIGTERM:\n{}",
                self.proc.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn kspan_bin() -> String {
    std::env::var("KSPAN_BIN")
        .expect("KSPAN_BIN must point at the kspan binary (`cargo xtask test` sets it)")
}

/// The shared agent and collector for every test in one test binary.
pub struct Env {
    pub rt: tokio::runtime::Runtime,
    spans: Spans,
    pub collector: SocketAddr,
    pub metrics: SocketAddr,
    agent: Mutex<Agent>,
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

pub fn assert_root() {
    // SAFETY: plain syscall.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "kspan's integration tests load eBPF programs and must run as root"
    );
}

pub fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        assert_root();
        let rt = runtime();
        let (collector, spans) = grpc_collector(&rt);
        // Every attribute: the protocol tests check connection identity and body sizes, which
        // the conventions make opt-in.
        let agent = Agent::start(
            "kspan",
            &["--linger-ms", "200", "--opt-in-attributes"],
            &otlp_grpc(collector),
        );
        Env {
            rt,
            spans,
            collector,
            metrics: agent.metrics,
            agent: Mutex::new(agent),
        }
    })
}

/// Minimal HTTP GET used for the agent's own endpoints (this process is traced too, which is
/// fine: these requests carry no trace context the tests look for).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: kspan\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

impl Env {
    /// Waits until `pred` holds over the spans received so far, and returns them.
    pub fn wait_spans(&self, what: &str, pred: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let spans = self.spans.all();
            if pred(&spans) {
                return spans;
            }
            self.agent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .proc
                .assert_running();
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; received {} spans:\n{spans:#?}\nagent log:\n{}",
                    spans.len(),
                    self.agent
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .proc
                        .log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn agent_pid(&self) -> u32 {
        self.agent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .proc
            .pid()
    }

    /// All spans of one trace, once `n` of them arrived.
    pub fn trace(&self, trace_id: u128, n: usize) -> Vec<Got> {
        self.wait_spans(&format!("{n} spans of trace {trace_id:032x}"), |s| {
            s.iter().filter(|g| g.trace_id == trace_id).count() >= n
        })
        .into_iter()
        .filter(|g| g.trace_id == trace_id)
        .collect()
    }

    /// See [`wait_metric`].
    pub fn wait_metric(&self, name: &str, pred: impl Fn(u64) -> bool) -> u64 {
        wait_metric(self.metrics, name, pred)
    }

    pub fn metric(&self, name: &str) -> u64 {
        metric(self.metrics, name)
    }
}

/// Waits (bounded) until an agent's metric satisfies `pred`: agents publish counters once a
/// second, so a fresh value may lag the spans that caused it.
/// A series not exported yet (a labelled series before its first observation) reads as 0.
pub fn wait_metric(agent: SocketAddr, name: &str, pred: impl Fn(u64) -> bool) -> u64 {
    let [v] = wait_metrics(agent, [name], Duration::from_secs(10), |[v]| pred(*v));
    v
}

/// Waits (bounded) until several metrics, read from one scrape, satisfy `pred` together:
/// a relation between counters (every decoded request ended once) holds only in a scrape
/// taken once the agent has caught up, and values read one by one may straddle a publish.
pub fn wait_metrics<const N: usize>(
    agent: SocketAddr,
    names: [&str; N],
    timeout: Duration,
    pred: impl Fn(&[u64; N]) -> bool,
) -> [u64; N] {
    let deadline = Instant::now() + timeout;
    loop {
        let body = http_get(agent, "/metrics").expect("metrics endpoint");
        let values = names.map(|n| series(&body, n).unwrap_or(0));
        if pred(&values) {
            return values;
        }
        if Instant::now() >= deadline {
            let counters: Vec<&str> = body
                .lines()
                .filter(|l| l.starts_with("kspan_") && !l.ends_with(" 0"))
                .collect();
            panic!(
                "metrics {names:?} stuck at {values:?}; the agent's other series:\n{}",
                counters.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn metric(agent: SocketAddr, name: &str) -> u64 {
    let body = http_get(agent, "/metrics").expect("metrics endpoint");
    series(&body, name).unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
}

/// A metric, 0 while its series does not exist yet.
pub fn metric_or_zero(agent: SocketAddr, name: &str) -> u64 {
    let body = http_get(agent, "/metrics").expect("metrics endpoint");
    series(&body, name).unwrap_or(0)
}

fn series(body: &str, name: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// The one span of `kind` from `service`; fails the test if there are none or several.
pub fn one<'a>(spans: &'a [Got], kind: &str, service: &str) -> &'a Got {
    let found: Vec<&Got> = spans
        .iter()
        .filter(|s| s.kind == kind && s.service() == service)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} span of {service}: {spans:#?}"
    );
    found[0]
}

/// Runs curl and returns its stdout; fails the test on a non-zero exit.
pub fn curl(args: &[&str]) -> String {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10"]).args(args);
    String::from_utf8_lossy(&run_ok(cmd)).into_owned()
}

/// Runs a client to completion and returns its stdout; fails the test if it cannot start or
/// exits non-zero.
pub fn run_ok(mut cmd: Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} could not start (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `nghttp -n` (h2c, prior knowledge) fetching `url` with a `b3` header; fails the test on a
/// non-zero exit.
pub fn nghttp_get(url: &str, b3: &str) {
    let mut cmd = Command::new("nghttp");
    cmd.args(["-n", "-H", &format!("b3: {b3}"), url]);
    run_ok(cmd);
}

/// Trace ids unique to this test process. Every agent sees all traffic on the host, so two
/// suites running at once must never share ids.
pub fn trace_id(tag: u16) -> u128 {
    (nonce() as u128) << 64 | tag as u128
}

/// A 64-bit B3 trace id unique to this test process.
pub fn trace_id_64(tag: u16) -> u64 {
    nonce() << 16 | tag as u64
}

fn nonce() -> u64 {
    static NONCE: OnceLock<u64> = OnceLock::new();
    *NONCE.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        // 40 bits: leaves room for the tag in 64-bit ids, never zero.
        ((t ^ (std::process::id() as u64) << 20) & 0xff_ffff_ffff) | 1
    })
}

/// A unique path so tests can find their own spans when no trace id is known up front.
pub fn unique_path(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "/{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// An uninstrumented gRPC service (grpcio, generic handlers: no generated code). `Get` answers
/// `item:<payload>` (or calls `next`, forwarding B3 metadata), `missing` → NOT_FOUND,
/// `boom` → INTERNAL; `List` streams three messages.
const GRPC_SERVER: &str = r#"
import grpc, sys
from concurrent import futures
PORT = int(sys.argv[1]); NEXT = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
FWD = ("x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3", "traceparent")
ident = lambda b: b
chan = grpc.insecure_channel(NEXT) if NEXT else None
def get(req, ctx):
    md = [(k, v) for k, v in ctx.invocation_metadata() if k in FWD]
    if req == b"missing":
        ctx.abort(grpc.StatusCode.NOT_FOUND, "no such item")
    if req == b"boom":
        ctx.abort(grpc.StatusCode.INTERNAL, "broken")
    if chan:
        return chan.unary_unary("/shop.Cart/Get", request_serializer=ident, response_deserializer=ident)(req, metadata=md, timeout=10)
    return b"item:" + req
def list_(req, ctx):
    for i in range(3):
        yield b"part%d" % i
h = grpc.method_handlers_generic_handler("shop.Cart", {
    "Get": grpc.unary_unary_rpc_method_handler(get, request_deserializer=ident, response_serializer=ident),
    "List": grpc.unary_stream_rpc_method_handler(list_, request_deserializer=ident, response_serializer=ident)})
s = grpc.server(futures.ThreadPoolExecutor(4))
s.add_generic_rpc_handlers((h,))
s.add_insecure_port(f"127.0.0.1:{PORT}")
s.start()
s.wait_for_termination()
"#;

const GRPC_CLIENT: &str = r#"
import grpc, sys
port, method, payload = sys.argv[1], sys.argv[2], sys.argv[3].encode()
md = [("b3", sys.argv[4])] if len(sys.argv) > 4 and sys.argv[4] else []
ident = lambda b: b
with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
    try:
        if method == "List":
            print(len(list(ch.unary_stream("/shop.Cart/List", request_serializer=ident, response_deserializer=ident)(payload, metadata=md, timeout=10))))
        else:
            print(ch.unary_unary("/shop.Cart/Get", request_serializer=ident, response_deserializer=ident)(payload, metadata=md, timeout=10).decode())
    except grpc.RpcError as e:
        print(e.code().name)
"#;

pub struct GrpcService {
    pub port: u16,
    pub proc: Proc,
}

impl GrpcService {
    pub fn start(service_name: &str, next: Option<u16>) -> Self {
        let port = free_port();
        let mut cmd = Command::new("python3");
        cmd.arg("-c").arg(GRPC_SERVER).arg(port.to_string());
        cmd.arg(next.map(|n| format!("127.0.0.1:{n}")).unwrap_or_default());
        cmd.env("OTEL_SERVICE_NAME", service_name);
        let proc = Proc::listening(service_name, cmd, port);
        Self { port, proc }
    }
}

/// Runs one gRPC call from a fresh python process (service name `shopper`); returns what the
/// client printed (the reply, the stream length, or the status name).
pub fn grpc_call(port: u16, method: &str, payload: &str, b3: &str) -> String {
    let out = Command::new("python3")
        .args(["-c", GRPC_CLIENT, &port.to_string(), method, payload, b3])
        .env("OTEL_SERVICE_NAME", "shopper")
        .output()
        .expect("python3 with grpcio (`cargo xtask setup` installs it)");
    assert!(
        out.status.success(),
        "grpc client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// nghttpd serving `dir` over h2c (prior knowledge, no TLS).
pub fn nghttpd(dir: &std::path::Path) -> (u16, Proc) {
    let port = free_port();
    let mut cmd = Command::new("nghttpd");
    cmd.args(["--no-tls", "-d"]).arg(dir).arg(port.to_string());
    (port, Proc::listening("nghttpd", cmd, port))
}

/// busybox httpd serving `root`: a child forked per connection serves it through the socket
/// dup'ed onto its stdin and stdout, in a process that never accepted.
pub fn busybox_httpd(root: &std::path::Path) -> (u16, Proc) {
    let port = free_port();
    let mut cmd = Command::new("busybox");
    cmd.args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
        .arg(root);
    (port, Proc::listening("busybox-httpd", cmd, port))
}

/// Resident memory of a process, in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Client processes [`churn`] runs side by side.
pub const CHURN_CLIENTS: usize = 4;

/// Each of [`CHURN_CLIENTS`] processes opens `per_client` connections to `port`, one at a time:
/// one `GET path` (sampled out through B3, so no collector has to hold the spans; the agent
/// still does all the work), the whole response (until the server closes, or until a body
/// ending `short and stout\n`, nginx's teapot), then an abortive close (no TIME_WAIT, so the
/// connections fit the ephemeral port range). Samples `probe` (an agent's RSS) while it
/// waits; returns the peak it saw. Bounded to 5 minutes.
pub fn churn(port: &str, path: &str, per_client: usize, mut probe: impl FnMut() -> u64) -> u64 {
    let client = r#"
import socket, struct, sys
port, path, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
req = b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nX-B3-TraceId: 463ac35c9f6413ad\r\nX-B3-SpanId: 0000000000000001\r\nX-B3-Sampled: 0\r\n\r\n"
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(req)
    got = b""
    while not got.endswith(b"short and stout\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    assert got.startswith(b"HTTP/1."), got
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
"#;
    let started = Instant::now();
    let mut clients: Vec<Proc> = (0..CHURN_CLIENTS)
        .map(|i| {
            let mut cmd = Command::new("python3");
            cmd.args(["-c", client, port, path, &per_client.to_string()]);
            Proc::spawn(&format!("churn{i}"), cmd)
        })
        .collect();
    let mut peak = 0;
    for c in &mut clients {
        loop {
            peak = peak.max(probe());
            match c.try_wait() {
                Some(status) => {
                    assert!(status.success(), "{}", c.log());
                    break;
                }
                None => {
                    assert!(
                        started.elapsed() < Duration::from_secs(300),
                        "churn too slow"
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
    peak
}

/// A CA, and a certificate it signed for localhost and 127.0.0.1: (CA PEM, cert PEM, key PEM).
pub fn certificates() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "kspan test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into().unwrap()),
        SanType::IpAddress("127.0.0.1".parse().unwrap()),
    ];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}
