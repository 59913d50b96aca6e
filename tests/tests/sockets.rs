//! A connection is a socket, not (process, fd). Real servers that accept in one process and
//! serve in another (busybox httpd and a Python `ForkingMixIn` server fork per connection;
//! busybox serves through the socket dup'ed onto stdin and stdout), Apache's prefork MPM, a
//! server handed its listening socket over `SCM_RIGHTS`, a worker handed each accepted
//! connection over `SCM_RIGHTS`, and a child that serves through
//! `dup2`'ed fds and exits without closing them. Each request gives one exact SERVER span
//! under its CLIENT span, with and without trace headers, under the right service name, and
//! once the servers are gone no connection or span stays open in the agent.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use kspan_tests::{
    Agent, CHURN_CLIENTS, Got, Nginx, Proc, Spans, assert_root, busybox_httpd, churn, curl,
    free_port, grpc_collector, one, otlp_grpc, rss_kib, runtime, trace_id, unique_path,
    wait_metric,
};

/// A collector and an agent tracing only `ports` (so its gauges count only the servers under
/// test).
struct Rig {
    _rt: tokio::runtime::Runtime,
    spans: Spans,
    agent: Agent,
}

impl Rig {
    fn start(name: &str, ports: &[u16]) -> Self {
        assert_root();
        let rt = runtime();
        let (collector, spans) = grpc_collector(&rt);
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let mut args = vec!["--linger-ms", "50"];
        for p in &ports {
            args.extend(["--port", p.as_str()]);
        }
        let agent = Agent::start(name, &args, &otlp_grpc(collector));
        Self {
            _rt: rt,
            spans,
            agent,
        }
    }

    /// The servers are gone: every socket was released, every span exported.
    fn assert_idle(self) {
        wait_metric(self.agent.metrics, "kspan_open_connections", |v| v == 0);
        wait_metric(self.agent.metrics, "kspan_open_spans", |v| v == 0);
        assert!(self.agent.terminate().success());
    }
}

/// A directory served over HTTP, writable by the servers' unprivileged users.
fn docroot(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kspan-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("docroot");
    set_mode(&dir, 0o755);
    dir
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A file of its own for one request, so its spans can be found without trace headers.
fn page(root: &Path) -> String {
    let path = format!("{}.txt", unique_path("page"));
    let file = root.join(&path[1..]);
    std::fs::write(&file, "page\n").expect("page");
    set_mode(&file, 0o644);
    path
}

/// A trace id no other request of this process uses.
fn next_trace() -> u128 {
    static TAG: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
    trace_id(TAG.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// All spans of one trace once `n` arrived, after a pause that lets any extra one arrive too.
fn exactly(spans: &Spans, t: u128, n: usize) -> Vec<Got> {
    spans.exactly(t, n, 15, Duration::from_millis(300))
}

/// The SERVER span of the request for `path`, once it arrived.
fn server_for(spans: &Spans, path: &str) -> Got {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let found = spans
            .all()
            .into_iter()
            .find(|g| g.kind == "SERVER" && g.attrs.get("url.path").is_some_and(|p| p.s() == path));
        if let Some(g) = found {
            return g;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no SERVER span for {path}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `rounds` requests from curl carrying B3, and `rounds` without: each is exactly curl's
/// CLIENT span and `service`'s SERVER span under it, which it covers.
fn exact_pairs(spans: &Spans, port: u16, root: &Path, service: &str, rounds: u16) {
    for _ in 0..rounds {
        let t = next_trace();
        let path = page(root);
        curl(&[
            "-H",
            &format!("b3: {t:032x}-00000000000000f1-1"),
            &format!("http://127.0.0.1:{port}{path}"),
        ]);
        let got = exactly(spans, t, 2);
        let (client, server) = (one(&got, "CLIENT", "curl"), one(&got, "SERVER", service));
        assert_eq!(client.parent, Some(0xf1), "{got:#?}");
        assert_pair(client, server);

        let path = page(root);
        curl(&[&format!("http://127.0.0.1:{port}{path}")]);
        let server = server_for(spans, &path);
        let got = exactly(spans, server.trace_id, 2);
        let client = one(&got, "CLIENT", "curl");
        assert_eq!(client.parent, None, "no headers: curl's span is the root");
        assert_pair(client, one(&got, "SERVER", service));
    }
}

fn assert_pair(client: &Got, server: &Got) {
    assert_eq!(
        server.parent,
        Some(client.span_id),
        "{client:#?} {server:#?}"
    );
    assert!(
        client.contains(server),
        "{client:#?} must cover {server:#?}"
    );
    for s in [client, server] {
        assert_eq!(s.attr("http.response.status_code").i(), 200, "{s:#?}");
    }
}

#[test]
fn busybox_httpd_forks_and_serves_through_stdin_and_stdout() {
    let root = docroot("busybox");
    let (port, server) = busybox_httpd(&root);
    let rig = Rig::start("kspan-busybox", &[port]);
    exact_pairs(&rig.spans, port, &root, "busybox", 3);
    drop(server);
    rig.assert_idle();
}

/// Python servers that move a socket between processes; `mode` picks how (see the script).
const HANDOVER: &str = r#"
import http.server, os, signal, socket, socketserver, sys
mode, port = sys.argv[1], int(sys.argv[2])
BODY = b"page\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n" + BODY
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *a): pass
if mode == "forking":
    # Accept in the parent, serve in a child forked per connection.
    class S(socketserver.ForkingMixIn, http.server.HTTPServer): pass
    S(("127.0.0.1", port), H).serve_forever()
elif mode == "dup2":
    # The parent accepts; a child moves the socket onto stdin and stdout, closes the original
    # fd, answers, and exits without closing either copy.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    listener = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            os.dup2(conn.fileno(), 0)
            os.dup2(conn.fileno(), 1)
            conn.close()
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = os.read(0, 4096)
                if not chunk:
                    break
                data += chunk
            os.write(1, RESPONSE)
            os._exit(0)
        conn.close()
elif mode == "pass_conn":
    # A front process accepts and passes each accepted connection over a unix socket to a
    # worker that was started before it listened (the zero-downtime handover pattern); the
    # front closes its copy at once.
    ours, theirs = socket.socketpair(socket.AF_UNIX)
    if os.fork() == 0:
        ours.close()
        while True:
            _, fds, _, _ = socket.recv_fds(theirs, 16, 1)
            if not fds:
                os._exit(0)
            conn = socket.socket(fileno=fds[0])
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            conn.sendall(RESPONSE)
            conn.close()
    theirs.close()
    listener = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = listener.accept()
        socket.send_fds(ours, [b"conn"], [conn.fileno()])
        conn.close()
elif mode == "scm_rights":
    # Another process makes the listening socket and hands it over a unix socket, the way
    # socket activation and zero-downtime restarts pass listeners; this one serves it.
    ours, theirs = socket.socketpair(socket.AF_UNIX)
    if os.fork() == 0:
        ours.close()
        listener = socket.create_server(("127.0.0.1", port))
        socket.send_fds(theirs, [b"listener"], [listener.fileno()])
        os._exit(0)
    theirs.close()
    _, fds, _, _ = socket.recv_fds(ours, 64, 1)
    os.wait()
    server = http.server.HTTPServer(("127.0.0.1", port), H, bind_and_activate=False)
    server.socket.close()
    server.socket = socket.socket(fileno=fds[0])
    server.serve_forever()
"#;

fn handover(mode: &str, service: &str) -> (u16, Proc) {
    let port = free_port();
    let mut cmd = Command::new("python3");
    cmd.args(["-c", HANDOVER, mode, &port.to_string()])
        .env("OTEL_SERVICE_NAME", service);
    (port, Proc::listening(mode, cmd, port))
}

/// Starts the `mode` server named `service`, traces `rounds` of [`exact_pairs`] through it,
/// stops it and checks the agent is left idle.
fn handover_traced(mode: &str, service: &str, rounds: u16) {
    let (port, server) = handover(mode, service);
    let rig = Rig::start(&format!("kspan-{mode}"), &[port]);
    exact_pairs(&rig.spans, port, &docroot(mode), service, rounds);
    drop(server);
    rig.assert_idle();
}

/// Each child may exit before the agent reads its /proc entry: it still carries the
/// service name of the process that accepted its socket.
#[test]
fn python_forking_server_links_and_names_every_child() {
    handover_traced("forking", "forker", 5);
}

#[test]
fn a_child_serving_through_dup2_and_exiting_without_close() {
    handover_traced("dup2", "inetd-style", 3);
}

#[test]
fn a_listening_socket_received_over_scm_rights() {
    handover_traced("scm_rights", "handed-over", 3);
}

/// Each accepted connection is served by another, unrelated process that receives it over
/// `SCM_RIGHTS` after the acceptor closed its own fd.
#[test]
fn accepted_connections_passed_over_scm_rights() {
    handover_traced("pass_conn", "handed-conns", 3);
}

/// Apache with the prefork MPM: the children accept on the shared listener themselves.
struct Apache {
    port: u16,
    root: PathBuf,
    _proc: Proc,
}

impl Apache {
    /// Serves `root` and proxies `/up/` to `upstream`.
    fn prefork(upstream: u16) -> Self {
        let port = free_port();
        let dir = docroot("apache");
        let root = dir.join("htdocs");
        std::fs::create_dir_all(&root).expect("htdocs");
        set_mode(&root, 0o755);
        let m = "/usr/lib/apache2/modules";
        let d = dir.display();
        let conf = format!(
            "LoadModule mpm_prefork_module {m}/mod_mpm_prefork.so\n\
             LoadModule authz_core_module {m}/mod_authz_core.so\n\
             LoadModule proxy_module {m}/mod_proxy.so\n\
             LoadModule proxy_http_module {m}/mod_proxy_http.so\n\
             ServerName localhost\nListen 127.0.0.1:{port}\nUser www-data\nGroup www-data\n\
             PidFile {d}/httpd.pid\nErrorLog {d}/error.log\nDefaultRuntimeDir {d}\nMutex file:{d}\n\
             DocumentRoot {r}\n<Directory {r}>\n Require all granted\n</Directory>\n\
             StartServers 2\nMinSpareServers 2\nMaxSpareServers 4\n\
             ProxyPass /up/ http://127.0.0.1:{upstream}/\n",
            r = root.display()
        );
        std::fs::write(dir.join("httpd.conf"), conf).expect("httpd.conf");
        let mut cmd = Command::new("/usr/sbin/apache2");
        cmd.arg("-f")
            .arg(dir.join("httpd.conf"))
            .arg("-DFOREGROUND");
        Self {
            port,
            root,
            _proc: Proc::listening("apache2", cmd, port),
        }
    }
}

#[test]
fn apache_prefork_static_and_proxied() {
    let upstream = Nginx::leaf();
    let apache = Apache::prefork(upstream.port);
    let rig = Rig::start("kspan-apache", &[apache.port, upstream.port]);
    exact_pairs(&rig.spans, apache.port, &apache.root, "apache2", 3);

    // Proxied: apache forwards the B3 header it got; without one, its outbound call is
    // related to the request its (single-threaded) child serves.
    for _ in 0..3 {
        let t = next_trace();
        let path = format!("/up{}", unique_path("proxied"));
        let url = format!("http://127.0.0.1:{}{path}", apache.port);
        assert_eq!(
            curl(&["-H", &format!("b3: {t:032x}-00000000000000f1-1"), &url]),
            "leaf\n"
        );
        proxied_chain(&exactly(&rig.spans, t, 4));

        let path = format!("/up{}", unique_path("proxied"));
        curl(&[&format!("http://127.0.0.1:{}{path}", apache.port)]);
        let server = server_for(&rig.spans, &path);
        proxied_chain(&exactly(&rig.spans, server.trace_id, 4));
    }
    drop(apache);
    drop(upstream);
    rig.assert_idle();
}

/// curl → apache → nginx: four spans, each under the one before.
fn proxied_chain(got: &[Got]) {
    let client = one(got, "CLIENT", "curl");
    let front = one(got, "SERVER", "apache2");
    let out = one(got, "CLIENT", "apache2");
    let back = one(got, "SERVER", "nginx");
    assert_pair(client, front);
    assert_eq!(out.parent, Some(front.span_id), "{got:#?}");
    assert_pair(out, back);
    assert!(front.contains(out), "{got:#?}");
}

/// The 100k short connections fault test against a forking server (busybox httpd: a process
/// per connection): the agent's memory stays bounded and its tables return to idle.
#[test]
fn a_hundred_thousand_forked_connections_leave_nothing_behind() {
    const PER_CLIENT: usize = 100_000 / CHURN_CLIENTS;
    let root = docroot("churn");
    std::fs::write(root.join("c.txt"), "c\n").expect("page");
    set_mode(&root.join("c.txt"), 0o644);
    let (port, server) = busybox_httpd(&root);
    let rig = Rig::start("kspan-fork-churn", &[port]);
    let pid = rig.agent.proc.pid();
    let before = rss_kib(pid);
    let started = std::time::Instant::now();
    let peak = churn(&port.to_string(), "/c.txt", PER_CLIENT, || rss_kib(pid)).max(before);
    let all = 2 * (CHURN_CLIENTS * PER_CLIENT) as u64;
    let requests = wait_metric(rig.agent.metrics, "kspan_requests_total", |v| v >= all);
    wait_metric(rig.agent.metrics, "kspan_spans_unsampled_total", |v| {
        v >= all
    });
    println!(
        "100k forked connections in {:?}: {requests} requests decoded, RSS {before} KiB before, peak {peak} KiB",
        started.elapsed()
    );
    assert!(peak < 256 * 1024, "peak RSS {peak} KiB");
    drop(server);
    rig.assert_idle();
}
