//! HTTPS and HTTP/2 over TLS, read at the TLS library (uprobes on OpenSSL): the same exact
//! trees, attributes and linking as plaintext, `url.scheme=https`; a TLS library kspan does
//! not hook is counted, never decoded as garbage. Real peers: curl, nginx, Python's `ssl`,
//! nghttpd, wget (GnuTLS).
use std::{path::PathBuf, process::Command, sync::OnceLock};

use kspan_tests::{
    Got, Nginx, Proc, PyService, certificates, curl, env, free_port, one, run_ok, trace_id,
    unique_path,
};

/// A private CA and a certificate it signed for 127.0.0.1, as files shared by every test.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
}

fn certs() -> &'static Certs {
    static CERTS: OnceLock<Certs> = OnceLock::new();
    CERTS.get_or_init(|| {
        let (ca, cert, key) = certificates();
        let dir = std::env::temp_dir().join(format!("kspan-https-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), ca).unwrap();
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        Certs { dir }
    })
}

/// The test suite's Python service over HTTPS (`PyService`'s `TLS_*` variables), calling the
/// HTTPS service `next`.
struct TlsService {
    port: u16,
    _service: PyService,
}

impl TlsService {
    fn start(name: &str, next: Option<u16>) -> Self {
        Self::start_with(name, next, Command::new("python3"))
    }

    /// The service run by `python` (a command that runs Python given its arguments).
    fn start_with(name: &str, next: Option<u16>, mut python: Command) -> Self {
        let c = certs();
        python
            .env("TLS_CA", c.ca())
            .env("TLS_CERT", c.cert())
            .env("TLS_KEY", c.key());
        let next = next.map(|n| format!("https://127.0.0.1:{n}"));
        let service = PyService::run(name, Some(name), next, python);
        Self {
            port: service.port,
            _service: service,
        }
    }
}

fn https_curl(args: &[&str]) -> String {
    let ca = certs().ca();
    let mut all = vec!["--cacert", ca.to_str().unwrap()];
    all.extend_from_slice(args);
    curl(&all)
}

/// The four spans of curl → `front` → `back`, each the parent of the next.
fn chain<'a>(spans: &'a [Got], front: &str, back: &str) -> [&'a Got; 4] {
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let tree = [
        one(spans, "CLIENT", "curl"),
        one(spans, "SERVER", front),
        one(spans, "CLIENT", front),
        one(spans, "SERVER", back),
    ];
    for pair in tree.windows(2) {
        assert_eq!(pair[1].parent, Some(pair[0].span_id), "{spans:#?}");
    }
    tree
}

/// No attribute of any span carries `secret`.
fn assert_no_secret(spans: &[Got], secret: &str) {
    for s in spans {
        for (k, v) in &s.attrs {
            assert!(!format!("{v:?}").contains(secret), "{k} leaks: {s:#?}");
        }
    }
}

/// curl (started after the agent, gone in milliseconds) → Python front → Python back, both
/// hops HTTPS, B3 forwarded by the front: the exact tree of the plaintext test, with https
/// URLs, and no secret from the headers or query.
#[test]
fn curl_through_two_tls_hops() {
    let e = env();
    let back = TlsService::start("tls-back", None);
    let front = TlsService::start("tls-front", Some(back.port));
    let t = trace_id(120);
    let path = unique_path("tls");
    let out = https_curl(&[
        "-H",
        &format!("X-B3-TraceId: {t:032x}"),
        "-H",
        "X-B3-SpanId: 0000000000000c01",
        "-H",
        "X-B3-Sampled: 1",
        "-H",
        "Authorization: Bearer tls-s3cret",
        &format!("https://127.0.0.1:{}{path}?token=tls-s3cret", front.port),
    ]);
    assert_eq!(out, "leaf\n");
    let spans = e.trace(t, 4);
    let [curl, fs, fc, bs] = chain(&spans, "tls-front", "tls-back");
    assert_eq!(curl.parent, Some(0xc01));
    for (p, c) in [(curl, fs), (fs, fc), (fc, bs)] {
        assert!(p.contains(c), "parent must cover child:\n{p:#?}\n{c:#?}");
    }
    for s in &spans {
        assert_eq!(s.attr("http.request.method").s(), "GET");
        assert_eq!(s.attr("http.response.status_code").i(), 200);
        assert_eq!(s.status, 0);
    }
    for server in [fs, bs] {
        assert_eq!(server.attr("url.scheme").s(), "https");
        assert_eq!(server.attr("url.path").s(), path);
        assert_eq!(server.attr("client.address").s(), "127.0.0.1");
    }
    assert_eq!(fs.attr("server.port").i(), front.port as i64);
    assert_eq!(
        curl.attr("url.full").s(),
        format!("https://127.0.0.1:{}{path}?token=REDACTED", front.port)
    );
    assert_eq!(
        fc.attr("url.full").s(),
        format!("https://127.0.0.1:{}{path}?token=REDACTED", back.port)
    );
    assert_eq!(
        fs.attr("client.port").i(),
        curl.attr("network.local.port").i(),
        "both ends of the TLS connection are one socket pair"
    );
    assert_no_secret(&spans, "tls-s3cret");
}

/// nginx terminating HTTPS and proxying to an HTTPS upstream over kept-alive connections.
#[test]
fn nginx_https_to_an_https_upstream() {
    let e = env();
    let back = TlsService::start("tls-upstream", None);
    let c = certs();
    let nginx = Nginx::https(back.port, &c.cert(), &c.key());
    for (i, tag) in [121u16, 122].into_iter().enumerate() {
        let t = trace_id(tag);
        let path = unique_path("nginx-tls");
        https_curl(&[
            "-H",
            &format!("b3: {t:032x}-0000000000000c0{i}-1"),
            &format!("https://127.0.0.1:{}{path}", nginx.port),
        ]);
        let spans = e.trace(t, 4);
        let [_, ns, nc, bs] = chain(&spans, "nginx", "tls-upstream");
        assert_eq!(ns.attr("url.scheme").s(), "https");
        assert_eq!(bs.attr("url.path").s(), path);
        assert!(nc.attr("url.full").s().starts_with("https://"), "{nc:#?}");
    }
}

/// HTTP/2 negotiated by ALPN over TLS: curl → nghttpd, frames and HPACK from the plaintext.
#[test]
fn http2_over_tls() {
    let e = env();
    let c = certs();
    let port = free_port();
    let docroot = c.dir.join("h2root");
    std::fs::create_dir_all(&docroot).unwrap();
    std::fs::write(docroot.join("index.html"), "h2 over tls\n").unwrap();
    let mut cmd = Command::new("nghttpd");
    cmd.arg("-d").arg(&docroot).arg(port.to_string());
    cmd.arg(c.key()).arg(c.cert());
    let _server = Proc::listening("nghttpd", cmd, port);
    let t = trace_id(123);
    let out = https_curl(&[
        "--http2",
        "-H",
        &format!("b3: {t:032x}-0000000000000c10-1"),
        &format!("https://127.0.0.1:{port}/index.html"),
    ]);
    assert_eq!(out, "h2 over tls\n");
    let spans = e.trace(t, 2);
    let client = one(&spans, "CLIENT", "curl");
    let server = one(&spans, "SERVER", "nghttpd");
    assert_eq!(server.parent, Some(client.span_id));
    for s in [client, server] {
        assert_eq!(s.attr("network.protocol.version").s(), "2");
        assert_eq!(s.attr("http.response.status_code").i(), 200);
    }
    assert_eq!(server.attr("url.scheme").s(), "https");
    assert_eq!(server.attr("url.path").s(), "/index.html");
    assert_eq!(
        client.attr("url.full").s(),
        format!("https://127.0.0.1:{port}/index.html")
    );
}

/// wget speaks TLS through GnuTLS, which kspan does not hook: its connection is counted with
/// that reason and yields no span (its ciphertext is never decoded); the Python server's side
/// of the same connection (OpenSSL) is still traced.
#[test]
fn a_tls_library_kspan_does_not_hook_is_counted() {
    let e = env();
    const GNUTLS: &str = "kspan_connections_tls_unsupported_total{reason=\"gnutls\"}";
    let before = kspan_tests::metric_or_zero(e.metrics, GNUTLS);
    let server = TlsService::start("tls-for-wget", None);
    let path = unique_path("wget");
    let mut wget = Command::new("wget");
    wget.args(["-q", "-O", "-", "--tries=1", "--timeout=10"]);
    wget.arg(format!("--ca-certificate={}", certs().ca().display()));
    wget.arg(format!("https://127.0.0.1:{}{path}", server.port));
    assert_eq!(run_ok(wget), b"leaf\n");
    e.wait_metric(GNUTLS, |n| n > before);
    let spans = e.wait_spans("the server's span of wget's request", |s| {
        s.iter()
            .any(|g| g.attrs.get("url.path").is_some_and(|p| p.s() == path))
    });
    let server_span = spans
        .iter()
        .find(|g| g.attrs.get("url.path").is_some_and(|p| p.s() == path))
        .unwrap();
    assert_eq!(server_span.kind, "SERVER");
    assert_eq!(server_span.service(), "tls-for-wget");
    assert!(
        spans.iter().all(|g| g.service() != "wget"),
        "nothing decoded from wget's ciphertext"
    );
}

/// Node.js: OpenSSL inside the `node` executable (found at exec, before its first
/// connection), and a memory BIO: `SSL_write` makes no syscall, libuv moves the ciphertext
/// later. An HTTPS server and a keep-alive client in one process, B3 from the caller.
const NODE: &str = r#"
const https = require('https'), fs = require('fs');
const [port, ca, cert, key, trace] = process.argv.slice(1);
const srv = https.createServer({key: fs.readFileSync(key), cert: fs.readFileSync(cert)}, (req, res) => {
  res.writeHead(200, {'content-type': 'text/plain'}); res.end('node ' + req.url + '\n');
});
srv.listen(+port, '127.0.0.1', async () => {
  const agent = new https.Agent({keepAlive: true, ca: fs.readFileSync(ca)});
  const get = (p, i) => new Promise((ok, fail) => https.get({host: '127.0.0.1', port: +port, path: p, agent,
      headers: {b3: `${trace}-00000000000000d${i}-1`}}, res => {
    let b = ''; res.on('data', d => b += d); res.on('end', () => ok(b)); }).on('error', fail));
  for (let i = 0; i < 3; i++) process.stdout.write(await get('/node' + i, i));
  process.exit(0);
});
"#;

#[test]
fn node_https_server_and_client() {
    let e = env();
    let c = certs();
    let t = trace_id(124);
    let mut node = Command::new("node");
    node.arg("-e").arg(NODE).arg(free_port().to_string());
    node.args([c.ca(), c.cert(), c.key()]);
    node.arg(format!("{t:032x}"));
    let out = String::from_utf8(run_ok(node)).unwrap();
    assert_eq!(out, "node /node0\nnode /node1\nnode /node2\n");
    let spans = e.trace(t, 6);
    assert_eq!(spans.len(), 6, "{spans:#?}");
    for i in 0..3u64 {
        let client = spans
            .iter()
            .find(|s| s.kind == "CLIENT" && s.parent == Some(0xd0 + i))
            .unwrap_or_else(|| panic!("client span of request {i}: {spans:#?}"));
        let server = spans
            .iter()
            .find(|s| s.kind == "SERVER" && s.parent == Some(client.span_id))
            .unwrap_or_else(|| panic!("server span of request {i}: {spans:#?}"));
        assert!(client.contains(server));
        assert_eq!(server.attr("url.path").s(), format!("/node{i}"));
        assert_eq!(server.attr("url.scheme").s(), "https");
        assert!(
            client
                .attr("url.full")
                .s()
                .starts_with("https://127.0.0.1:")
        );
        assert_eq!(client.service(), "node");
    }
}

/// Debian's other OpenSSL builds, fetched by `cargo xtask test` (`vm::tls_libraries`).
fn tls_libs() -> PathBuf {
    PathBuf::from(std::env::var_os("KSPAN_TLS_LIBS").expect(
        "KSPAN_TLS_LIBS: run through `cargo xtask test`, which fetches OpenSSL 1.1.1 and 3.5",
    ))
}

/// Python run against trixie's OpenSSL 3.5 and C library, through that library's loader.
fn python_with_openssl_3_5() -> Command {
    let libs = tls_libs();
    let libc = libs.join("libc6/usr/lib/x86_64-linux-gnu");
    let ssl = libs.join("libssl3t64/usr/lib/x86_64-linux-gnu");
    let mut cmd = Command::new(libc.join("ld-linux-x86-64.so.2"));
    cmd.arg("--library-path")
        .arg(format!("{}:{}", libc.display(), ssl.display()))
        .arg("/usr/bin/python3");
    cmd
}

/// Every OpenSSL build at hand is probed on instructions the kernel emulates: a
/// single-stepped probe costs tens of µs per call under a hypervisor (see
/// `agent/src/tls/placement.rs`). OpenSSL's wrappers open with a stack adjustment, so their
/// shared internal function is hooked; Node's exported functions open with a push.
/// The shared agent has its probes on the host's files meanwhile: the plan must be made from
/// the bytes on disk, not from a mapping that shows the breakpoints.
#[test]
fn openssl_builds_are_probed_without_single_steps() {
    use kspan::tls::placement::Abi::{Read, ReadEx, Write, WriteEx, WriteEx2};
    let libs = tls_libs();
    for (file, abis) in [
        (
            PathBuf::from("/usr/lib/x86_64-linux-gnu/libssl.so.3"),
            vec![ReadEx, WriteEx],
        ),
        (
            libs.join("libssl1.1/usr/lib/x86_64-linux-gnu/libssl.so.1.1"),
            vec![ReadEx, WriteEx],
        ),
        // 3.5's `ssl_write_internal` takes flags before the count pointer.
        (
            libs.join("libssl3t64/usr/lib/x86_64-linux-gnu/libssl.so.3"),
            vec![ReadEx, WriteEx2],
        ),
        (
            PathBuf::from("/usr/bin/node"),
            vec![Read, ReadEx, Write, WriteEx],
        ),
    ] {
        let plan = kspan::tls::library::plan(&file)
            .expect("readable")
            .unwrap_or_else(|| panic!("{} exports OpenSSL", file.display()));
        assert_eq!(plan.stepped(), 0, "{}: {plan:?}", file.display());
        let got: Vec<_> = plan.calls.iter().map(|h| h.abi).collect();
        assert_eq!(got, abis, "{}", file.display());
        assert!(plan.free.is_some(), "{}", file.display());
    }
}

/// A service on OpenSSL 3.5 (a library file the host does not have, loaded when Python
/// imports `ssl`, as in a container), whose `SSL_write_ex` reaches the hooked internal
/// function through `SSL_write_ex2`: its SERVER and CLIENT spans are exact, in the tree of
/// curl → it → a service on the host's OpenSSL 3.0.
#[test]
fn a_service_on_openssl_3_5() {
    let e = env();
    let back = TlsService::start("tls35-back", None);
    let front = TlsService::start_with("tls35-front", Some(back.port), python_with_openssl_3_5());
    let url = |path: &str| format!("https://127.0.0.1:{}{path}", front.port);
    // The file is probed at the process's first TLS handshake; the exchange on that
    // connection may run before the probes are in (README, "Which library").
    https_curl(&[&url("/warm-up")]);
    let t = trace_id(126);
    let path = unique_path("tls35");
    let out = https_curl(&[
        "-H",
        &format!("b3: {t:032x}-0000000000000c35-1"),
        &url(&path),
    ]);
    assert_eq!(out, "leaf\n");
    let spans = e.trace(t, 4);
    let [_, fs, fc, _] = chain(&spans, "tls35-front", "tls35-back");
    assert_eq!(fs.attr("url.path").s(), path);
    assert_eq!(
        fc.attr("url.full").s(),
        format!("https://127.0.0.1:{}{path}", back.port)
    );
    assert_eq!(fc.attr("http.response.status_code").i(), 200);
    assert_eq!(fs.attr("http.response.status_code").i(), 200);
}
