//! HTTP/1.x end to end: real probes, real servers, spans received over OTLP/gRPC.
//! Run through `cargo xtask test` (root, KSPAN_BIN set).
use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use kspan_tests::{Got, Nginx, PyService, Val, curl, env, one, trace_id, trace_id_64, unique_path};

const S: u64 = 0xa2fb4a1d1a96d312;

/// curl → frontend → backend: checks the exact tree, attributes and timing nesting.
fn assert_chain(spans: &[Got], front: &PyService, back: &PyService, path: &str) -> u64 {
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let curl = one(spans, "CLIENT", "curl");
    let fs = one(spans, "SERVER", "frontend");
    let fc = one(spans, "CLIENT", "frontend");
    let bs = one(spans, "SERVER", "backend");
    assert_eq!(
        fs.parent,
        Some(curl.span_id),
        "frontend SERVER is the child of curl's CLIENT span"
    );
    assert_eq!(
        fc.parent,
        Some(fs.span_id),
        "frontend's call is made while serving"
    );
    assert_eq!(
        bs.parent,
        Some(fc.span_id),
        "backend SERVER is the child of frontend's CLIENT span"
    );
    for (p, c) in [(curl, fs), (fs, fc), (fc, bs)] {
        assert!(p.contains(c), "parent must cover child:\n{p:#?}\n{c:#?}");
    }
    for s in spans {
        assert_eq!(s.name, "GET");
        assert_eq!(s.attr("http.request.method").s(), "GET");
        assert_eq!(s.attr("http.response.status_code").i(), 200);
        assert_eq!(s.status, 0, "no error status on 200");
        assert!(s.end > s.start && s.end - s.start < 5_000_000_000);
    }
    assert_eq!(fs.attr("url.path").s(), path);
    assert_eq!(fs.attr("server.port").i(), front.port as i64);
    assert_eq!(fs.attr("client.address").s(), "127.0.0.1");
    assert_eq!(
        fs.attr("client.port").i(),
        curl.attr("network.local.port").i(),
        "both ends saw the same connection"
    );
    assert!(fs.attr("user_agent.original").s().starts_with("curl/"));
    assert_eq!(
        curl.attr("url.full").s(),
        format!("http://127.0.0.1:{}{path}", front.port)
    );
    assert_eq!(
        fc.attr("url.full").s(),
        format!("http://127.0.0.1:{}{path}", back.port)
    );
    assert_eq!(fc.attr("server.port").i(), back.port as i64);
    assert_eq!(bs.attr("http.response.body.size").i(), 5, "b\"leaf\\n\"");
    assert_eq!(
        fs.resource.get("process.pid"),
        Some(&Val::I(front.proc.pid() as i64))
    );
    curl.parent.unwrap_or(0)
}

fn chain() -> (PyService, PyService) {
    let back = PyService::start("backend", None);
    let front = PyService::start("frontend", Some(back.port));
    (front, back)
}

/// Sends one request carrying `header` through a fresh chain and checks the whole tree;
/// returns the parent of curl's span (the span id the header named).
fn chain_with_header(tag: &str, header: &str, trace: u128) -> u64 {
    let e = env();
    let (front, back) = chain();
    let path = unique_path(tag);
    curl(&[
        "-H",
        header,
        &format!("http://127.0.0.1:{}{path}", front.port),
    ]);
    let spans = e.trace(trace, 4);
    assert_chain(&spans, &front, &back, &path)
}

#[test]
fn b3_multi_headers() {
    // A 64-bit B3 trace id is widened to 128 bits with zero high bits.
    let t64 = trace_id_64(1);
    let e = env();
    let (front, back) = chain();
    let path = unique_path("multi");
    let url = format!("http://127.0.0.1:{}{path}", front.port);
    curl(&[
        "-H",
        &format!("X-B3-TraceId: {t64:016x}"),
        "-H",
        "X-B3-SpanId: a2fb4a1d1a96d312",
        "-H",
        "X-B3-Sampled: 1",
        &url,
    ]);
    let spans = e.trace(t64 as u128, 4);
    assert_eq!(
        assert_chain(&spans, &front, &back, &path),
        S,
        "the B3 span id curl sent is its span's parent"
    );
}

#[test]
fn b3_single_header() {
    let t = trace_id(2);
    let parent = chain_with_header(
        "single",
        &format!("b3: {t:032x}-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90"),
        t,
    );
    assert_eq!(parent, 0xe457b5a2e4d86bd1);
}

#[test]
fn traceparent_header() {
    let t = trace_id(3);
    let parent = chain_with_header(
        "w3c",
        &format!("traceparent: 00-{t:032x}-00f067aa0ba902b7-01"),
        t,
    );
    assert_eq!(parent, 0x00f067aa0ba902b7);
}

#[test]
fn no_headers_start_a_new_trace() {
    let e = env();
    let (front, back) = chain();
    let path = unique_path("none");
    curl(&[&format!("http://127.0.0.1:{}{path}", front.port)]);
    let all = e.wait_spans("the header-less chain", |s| {
        s.iter().any(|g| {
            g.service() == "backend" && g.attrs.get("url.path") == Some(&Val::S(path.clone()))
        })
    });
    let trace = all
        .iter()
        .find(|g| {
            g.service() == "backend" && g.attrs.get("url.path") == Some(&Val::S(path.clone()))
        })
        .unwrap()
        .trace_id;
    let spans = e.trace(trace, 4);
    assert_eq!(
        assert_chain(&spans, &front, &back, &path),
        0,
        "curl's span is the root"
    );
}

#[test]
fn sampled_zero_exports_nothing_and_flags_force() {
    let e = env();
    let (front, _back) = chain();
    let unsampled_before = e.metric("kspan_spans_unsampled_total");
    let url = format!(
        "http://127.0.0.1:{}{}",
        front.port,
        unique_path("unsampled")
    );
    let (unsampled, debug) = (trace_id(4), trace_id(5));
    curl(&[
        "-H",
        &format!("X-B3-TraceId: {unsampled:032x}"),
        "-H",
        "X-B3-SpanId: 000000000000abcd",
        "-H",
        "X-B3-Sampled: 0",
        &url,
    ]);
    curl(&["-H", "b3: 0", &url]);
    // Debug flag overrides sampled=0; its spans arriving later proves the earlier ones had
    // every chance to arrive too.
    curl(&[
        "-H",
        &format!("X-B3-TraceId: {debug:032x}"),
        "-H",
        "X-B3-SpanId: 000000000000dbd0",
        "-H",
        "X-B3-Sampled: 0",
        "-H",
        "X-B3-Flags: 1",
        &url,
    ]);
    let spans = e.trace(debug, 4);
    assert_eq!(spans.len(), 4);
    std::thread::sleep(Duration::from_millis(500));
    let all = e.wait_spans("nothing", |_| true);
    assert!(
        all.iter().all(|g| g.trace_id != unsampled),
        "sampled=0 spans must not be exported"
    );
    assert!(
        all.iter().all(
            |g| g.attrs.get("url.full").map(Val::s) != Some(url.as_str()) || g.trace_id == debug
        ),
        "b3: 0 spans must not be exported"
    );
    // Both unsampled chains (4 spans each) are counted, not silently gone.
    e.wait_metric("kspan_spans_unsampled_total", |v| v >= unsampled_before + 8);
}

#[test]
fn keep_alive_connection_with_several_requests() {
    let e = env();
    let (front, _back) = chain();
    let base = format!("http://127.0.0.1:{}", front.port);
    let paths: Vec<String> = (0..3).map(|_| unique_path("ka")).collect();
    let urls: Vec<String> = paths.iter().map(|p| format!("{base}{p}")).collect();
    // One curl invocation reuses one connection for all three.
    curl(&[&urls[0], &urls[1], &urls[2]]);
    let mut client_ports = Vec::new();
    for p in &paths {
        let all = e.wait_spans(&format!("request {p}"), |s| {
            s.iter()
                .any(|g| g.service() == "backend" && g.attrs.get("url.path").map(Val::s) == Some(p))
        });
        let trace = all
            .iter()
            .find(|g| g.service() == "backend" && g.attrs.get("url.path").map(Val::s) == Some(p))
            .unwrap()
            .trace_id;
        let spans = e.trace(trace, 4);
        let curl_span = one(&spans, "CLIENT", "curl");
        let fs = one(&spans, "SERVER", "frontend");
        assert_eq!(fs.parent, Some(curl_span.span_id));
        assert_eq!(fs.attr("url.path").s(), p);
        client_ports.push(curl_span.attr("network.local.port").i());
    }
    assert!(
        client_ports.windows(2).all(|w| w[0] == w[1]),
        "all three went over one connection: {client_ports:?}"
    );
}

#[test]
fn pipelined_requests_through_nginx() {
    let e = env();
    let back = PyService::start("backend", None);
    let nginx = Nginx::start(back.port);
    let (p1, p3) = (unique_path("pipe"), unique_path("pipe"));
    // Three requests in one write; nginx answers them in order.
    let mut s = TcpStream::connect(("127.0.0.1", nginx.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (b1, b2, b3) = (trace_id(6), trace_id(7), trace_id(8));
    let reqs = format!(
        "GET {p1} HTTP/1.1\r\nHost: shop\r\nX-B3-TraceId: {b1:032x}\r\nX-B3-SpanId: 0000000000000b01\r\n\r\n\
         GET /teapot HTTP/1.1\r\nHost: shop\r\nX-B3-TraceId: {b2:032x}\r\nX-B3-SpanId: 0000000000000b02\r\n\r\n\
         GET /status/503{p3} HTTP/1.1\r\nHost: shop\r\nConnection: close\r\nX-B3-TraceId: {b3:032x}\r\nX-B3-SpanId: 0000000000000b03\r\n\r\n"
    );
    s.write_all(reqs.as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert_eq!(resp.matches("HTTP/1.1 ").count(), 3, "{resp}");

    // Proxied request: test CLIENT → nginx SERVER → nginx CLIENT → backend SERVER.
    let t1 = e.trace(b1, 4);
    let test_client = t1
        .iter()
        .find(|g| g.kind == "CLIENT" && g.service() != "nginx")
        .expect("test process CLIENT span");
    let ns = one(&t1, "SERVER", "nginx");
    let nc = one(&t1, "CLIENT", "nginx");
    let bs = one(&t1, "SERVER", "backend");
    assert_eq!(test_client.parent, Some(0xb01));
    assert_eq!(ns.parent, Some(test_client.span_id));
    assert_eq!(nc.parent, Some(ns.span_id));
    assert_eq!(bs.parent, Some(nc.span_id));
    assert_eq!(ns.attr("server.address").s(), "shop");
    assert_eq!(bs.attr("url.path").s(), p1);
    assert!(ns.contains(nc) && nc.contains(bs));

    // Answered by nginx itself: 418 is a client error for the client only.
    let t2 = e.trace(b2, 2);
    let ns2 = one(&t2, "SERVER", "nginx");
    assert_eq!(ns2.attr("http.response.status_code").i(), 418);
    assert_eq!(ns2.status, 0, "4xx is not a server error");
    let tc2 = t2.iter().find(|g| g.kind == "CLIENT").unwrap();
    assert_eq!(tc2.status, 2, "4xx is a client error");
    assert_eq!(ns2.parent, Some(tc2.span_id));

    // Proxied 503: an error on every span.
    let t3 = e.trace(b3, 4);
    for g in &t3 {
        assert_eq!(g.attr("http.response.status_code").i(), 503);
        assert_eq!(
            g.status, 2,
            "5xx is an error for servers and clients: {g:#?}"
        );
    }
    // The three test-side CLIENT spans share one connection.
    let port = |t: &[Got]| {
        t.iter()
            .find(|g| g.kind == "CLIENT" && g.service() != "nginx")
            .unwrap()
            .attr("network.local.port")
            .i()
    };
    assert_eq!(port(&t1), port(&t2));
    assert_eq!(port(&t2), port(&t3));
}

#[test]
fn agent_reports_health() {
    let e = env();
    assert!(
        kspan_tests::http_get(e.metrics, "/readyz")
            .unwrap()
            .starts_with("HTTP/1.1 200")
    );
    // Traffic from the other tests (and this request) has gone through the kernel.
    let _ = e.metric("kspan_kernel_events_total");
    assert_eq!(e.metric("kspan_kernel_lost_events_total"), 0);
    assert_eq!(e.metric("kspan_event_decode_errors_total"), 0);
    // The agent never traces itself: the /metrics requests above were answered by it, and the
    // test's CLIENT spans of them arrive, but no span of the agent's own process does.
    let agent = e.agent_pid() as i64;
    let all = e.wait_spans("this test's /metrics CLIENT spans", |s| {
        s.iter().any(|g| {
            g.kind == "CLIENT"
                && g.attrs.get("server.port").map(Val::i) == Some(e.metrics.port() as i64)
        })
    });
    assert!(
        all.iter()
            .all(|g| g.resource.get("process.pid") != Some(&Val::I(agent))),
        "spans from the agent itself"
    );
}
