//! HTTP/2 and gRPC end to end: grpcio services (grpc's C core) and nghttp2 over h2c, spans
//! received over OTLP/gRPC.
use kspan_tests::{Got, GrpcService, Val, env, grpc_call, nghttpd, one, trace_id};

/// Waits for `n` spans of trace `t`.
fn trace_of(n: usize, t: u128) -> Vec<Got> {
    env().trace(t, n)
}

#[test]
fn grpc_unary_chain_linked_through_b3_metadata() {
    // The agent must be running before the connections under test open.
    env();
    let cart = GrpcService::start("cart", None);
    let gateway = GrpcService::start("gateway", Some(cart.port));
    let t = trace_id(21);
    assert_eq!(
        grpc_call(
            gateway.port,
            "Get",
            "apple",
            &format!("{t:032x}-a2fb4a1d1a96d312-1")
        ),
        "item:apple"
    );
    let spans = trace_of(4, t);
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let shopper = one(&spans, "CLIENT", "shopper");
    let gs = one(&spans, "SERVER", "gateway");
    let gc = one(&spans, "CLIENT", "gateway");
    let cs = one(&spans, "SERVER", "cart");
    assert_eq!(shopper.parent, Some(0xa2fb4a1d1a96d312));
    assert_eq!(gs.parent, Some(shopper.span_id));
    assert_eq!(gc.parent, Some(gs.span_id));
    assert_eq!(cs.parent, Some(gc.span_id));
    for (p, c) in [(shopper, gs), (gs, gc), (gc, cs)] {
        assert!(p.contains(c), "parent covers child:\n{p:#?}\n{c:#?}");
    }
    for s in &spans {
        assert_eq!(s.name, "shop.Cart/Get");
        assert_eq!(s.attr("rpc.system").s(), "grpc");
        assert_eq!(s.attr("rpc.service").s(), "shop.Cart");
        assert_eq!(s.attr("rpc.method").s(), "Get");
        assert_eq!(s.attr("rpc.grpc.status_code").i(), 0);
        assert_eq!(s.attr("network.protocol.version").s(), "2");
        assert_eq!(s.attr("http.response.status_code").i(), 200);
        assert_eq!(s.status, 0);
        assert!(
            !s.attrs.contains_key("kspan.partial"),
            "connections opened under the agent are exact"
        );
    }
    assert_eq!(cs.attr("server.port").i(), cart.port as i64);
    // Request: 5-byte gRPC prefix + "apple"; reply: prefix + "item:apple".
    assert_eq!(cs.attr("http.request.body.size").i(), 10);
    assert_eq!(cs.attr("http.response.body.size").i(), 15);
}

#[test]
fn grpc_server_streaming_ends_at_the_trailers() {
    // The agent must be running before the connections under test open.
    env();
    let cart = GrpcService::start("cart", None);
    let t = trace_id(22);
    assert_eq!(
        grpc_call(
            cart.port,
            "List",
            "x",
            &format!("{t:032x}-00000000000000aa-1")
        ),
        "3"
    );
    let spans = trace_of(2, t);
    let client = one(&spans, "CLIENT", "shopper");
    let server = one(&spans, "SERVER", "cart");
    assert_eq!(server.parent, Some(client.span_id));
    assert_eq!(server.name, "shop.Cart/List");
    // All three messages (5-byte prefix + "partN" each) are inside the span.
    assert_eq!(server.attr("http.response.body.size").i(), 30);
    assert_eq!(client.attr("http.response.body.size").i(), 30);
    assert_eq!(server.attr("rpc.grpc.status_code").i(), 0);
}

#[test]
fn grpc_error_statuses_follow_the_conventions() {
    // The agent must be running before the connections under test open.
    env();
    let cart = GrpcService::start("cart", None);
    let (missing, boom) = (trace_id(23), trace_id(24));
    assert_eq!(
        grpc_call(
            cart.port,
            "Get",
            "missing",
            &format!("{missing:032x}-00000000000000bb-1")
        ),
        "NOT_FOUND"
    );
    assert_eq!(
        grpc_call(
            cart.port,
            "Get",
            "boom",
            &format!("{boom:032x}-00000000000000cc-1")
        ),
        "INTERNAL"
    );
    let spans = trace_of(2, missing);
    assert_eq!(
        one(&spans, "CLIENT", "shopper")
            .attr("rpc.grpc.status_code")
            .i(),
        5
    );
    assert_eq!(
        one(&spans, "CLIENT", "shopper").status,
        2,
        "any non-OK status is a client error"
    );
    assert_eq!(
        one(&spans, "SERVER", "cart").status,
        0,
        "NOT_FOUND is not a server fault"
    );
    let spans = trace_of(2, boom);
    assert_eq!(
        one(&spans, "SERVER", "cart")
            .attr("rpc.grpc.status_code")
            .i(),
        13
    );
    assert_eq!(
        one(&spans, "SERVER", "cart").status,
        2,
        "INTERNAL is a server fault"
    );
    assert_eq!(one(&spans, "CLIENT", "shopper").status, 2);
}

#[test]
fn h2c_prior_knowledge_with_nghttp2() {
    // The agent must be running before the connections under test open.
    env();
    let dir = std::env::temp_dir().join(format!("kspan-h2c-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("page.txt"), vec![b'k'; 3000]).unwrap();
    let (port, _server) = nghttpd(&dir);
    let t = trace_id(25);
    kspan_tests::nghttp_get(
        &format!("http://127.0.0.1:{port}/page.txt"),
        &format!("{t:032x}-00000000000000dd-1"),
    );
    let spans = trace_of(2, t);
    let client = one(&spans, "CLIENT", "nghttp");
    let server = one(&spans, "SERVER", "nghttpd");
    assert_eq!(server.parent, Some(client.span_id));
    assert_eq!(client.parent, Some(0xdd));
    for s in [client, server] {
        assert_eq!(s.name, "GET");
        assert_eq!(s.attr("http.request.method").s(), "GET");
        assert_eq!(s.attr("http.response.status_code").i(), 200);
        assert_eq!(s.attr("http.response.body.size").i(), 3000);
        assert_eq!(s.attr("network.protocol.version").s(), "2");
        assert!(!s.attrs.contains_key("rpc.system"));
    }
    assert_eq!(server.attr("url.path").s(), "/page.txt");
    assert_eq!(
        client.attr("url.full").s(),
        format!("http://127.0.0.1:{port}/page.txt")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Multiplexed load: each read carries many frames, far beyond the bytes copied per syscall.
/// The kernel follows the frame headers, so no stream is lost (a prefix copy loses framing,
/// and with it every later stream of the connection, as soon as a frame header falls beyond
/// the copy cap).
#[test]
fn multiplexed_reads_larger_than_the_copy_cap_keep_every_stream() {
    env();
    let dir = std::env::temp_dir().join(format!("kspan-h2mux-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let name = format!("bulk-{}.txt", std::process::id());
    std::fs::write(dir.join(&name), vec![b'm'; 1500]).unwrap();
    let (port, _server) = nghttpd(&dir);
    const REQUESTS: usize = 2000;
    // 2 connections × 100 concurrent streams: ~150 KB of responses in flight per connection.
    let out = std::process::Command::new("h2load")
        .args(["-n", &REQUESTS.to_string(), "-c", "2", "-m", "100"])
        .arg(format!("http://127.0.0.1:{port}/{name}"))
        .output()
        .expect("h2load (nghttp2-client)");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains(&format!("{REQUESTS} succeeded")),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = format!("/{name}");
    let text = |s: &Got, k: &str| match s.attrs.get(k) {
        Some(Val::S(v)) => v.clone(),
        _ => String::new(),
    };
    let ours = |s: &Got| {
        (s.kind == "SERVER" && s.service() == "nghttpd" && text(s, "url.path") == path)
            || (s.kind == "CLIENT"
                && s.service() == "h2load"
                && text(s, "url.full").ends_with(&path))
    };
    let spans: Vec<Got> = env()
        .wait_spans(&format!("{REQUESTS} client and server spans"), |all| {
            all.iter().filter(|s| ours(s)).count() >= 2 * REQUESTS
        })
        .into_iter()
        .filter(ours)
        .collect();
    let clients: std::collections::HashSet<u64> = spans
        .iter()
        .filter(|s| s.kind == "CLIENT")
        .map(|s| s.span_id)
        .collect();
    assert_eq!(clients.len(), REQUESTS);
    for s in &spans {
        assert_eq!(s.attr("http.response.status_code").i(), 200, "{s:#?}");
        assert_eq!(s.attr("http.response.body.size").i(), 1500, "{s:#?}");
        assert!(!s.attrs.contains_key("kspan.partial"), "{s:#?}");
        if s.kind == "SERVER" {
            // Paired with its client stream by stream id (rule 3).
            assert!(s.parent.is_some_and(|p| clients.contains(&p)), "{s:#?}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
