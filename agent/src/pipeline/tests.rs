//! Linking scenarios driven through the whole pure pipeline with synthetic kernel events.
use super::*;
use crate::{
    capture::event::{Direction, Endpoints},
    trace::span::AttrValue,
};

const LOOPBACK_NS: u32 = 4026531840;

struct Sim {
    p: Pipeline,
    ts: u64,
    gens: u64,
    /// Events carry TLS plaintext.
    tls: bool,
}

/// One TCP connection as both processes see it.
#[derive(Clone, Copy)]
struct Link {
    client: ConnId,
    server: ConnId,
    client_pid: u32,
    server_pid: u32,
    client_addr: &'static str,
    server_addr: &'static str,
}

impl Sim {
    fn new(filter: Filter) -> Self {
        Self::with_sampler(filter, Default::default())
    }

    fn with_sampler(filter: Filter, sampler: crate::trace::sampler::Sampler) -> Self {
        let opts = PipelineOptions {
            // Every attribute, so tests can check the opt-in ones too.
            privacy: crate::trace::privacy::Privacy {
                opt_in_attributes: true,
                ..Default::default()
            },
            sampler,
            filter,
            linger_ns: 1_000,
            max_linger_bytes: usize::MAX,
            max_open_spans: 1000,
            max_conns: 1000,
            clock_offset_ns: 0,
            db_server_spans: false,
        };
        Self {
            p: Pipeline::new(opts, ProcessCache::new("/nonexistent")),
            ts: 1_000,
            gens: 0,
            tls: false,
        }
    }

    fn connect(
        &mut self,
        client_pid: u32,
        server_pid: u32,
        client_addr: &'static str,
        server_addr: &'static str,
    ) -> Link {
        self.gens += 1;
        Link {
            // Each end is its own socket.
            client: ConnId {
                sock: 0x1000 + client_pid as u64,
                generation: self.gens,
            },
            server: ConnId {
                sock: 0x2000 + server_pid as u64,
                generation: self.gens + 1000,
            },
            client_pid,
            server_pid,
            client_addr,
            server_addr,
        }
    }

    fn event(&mut self, l: Link, client_side: bool, dir: Direction, bytes: &[u8]) {
        self.ts += 10;
        self.event_at(self.ts, l, client_side, dir, bytes);
    }

    fn event_at(&mut self, ts: u64, l: Link, client_side: bool, dir: Direction, bytes: &[u8]) {
        let (conn, pid, role, local, peer) = if client_side {
            (
                l.client,
                l.client_pid,
                Role::Client,
                l.client_addr,
                l.server_addr,
            )
        } else {
            (
                l.server,
                l.server_pid,
                Role::Server,
                l.server_addr,
                l.client_addr,
            )
        };
        self.p.handle(Event {
            conn,
            tgid: pid,
            tid: pid,
            ts_ns: ts,
            role,
            endpoints: Some(Endpoints {
                local: local.parse().unwrap(),
                peer: peer.parse().unwrap(),
                netns: LOOPBACK_NS,
            }),
            comm: [0; 16],
            discovered: false,
            opener: Default::default(),
            protocol: 0,
            tls: self.tls,
            goroutine: 0,
            kind: EventKind::Data {
                direction: dir,
                total_len: bytes.len() as u64,
                payload: bytes,
                framed: false,
                frame_start: false,
                gap: false,
                tail: false,
            },
        });
    }

    /// Client writes, server reads (or the reverse order when `server_first`).
    fn send_request(&mut self, l: Link, req: &[u8], server_first: bool) {
        if server_first {
            self.event(l, false, Direction::Ingress, req);
            self.event(l, true, Direction::Egress, req);
        } else {
            self.event(l, true, Direction::Egress, req);
            self.event(l, false, Direction::Ingress, req);
        }
    }

    /// Server writes, client reads; by default in the order seen on real kernels where the
    /// reader's syscall can return before the writer's.
    fn send_response(&mut self, l: Link, resp: &[u8]) {
        self.event(l, true, Direction::Ingress, resp);
        self.event(l, false, Direction::Egress, resp);
    }

    /// The kernel destroyed the socket: it reports that from no particular process.
    fn destroy(&mut self, conn: ConnId) {
        self.ts += 10;
        self.p.handle(Event {
            conn,
            tgid: 0,
            tid: 0,
            ts_ns: self.ts,
            role: Role::Unknown,
            endpoints: None,
            comm: [0; 16],
            discovered: false,
            opener: Default::default(),
            protocol: 0,
            tls: false,
            goroutine: 0,
            kind: EventKind::Close,
        });
    }

    /// The kernel's notice that a socket speaks TLS (its ciphertext is not passed on).
    fn tls_notice(&mut self, conn: ConnId, pid: u32, role: Role) {
        self.ts += 10;
        self.p.handle(Event {
            conn,
            tgid: pid,
            tid: pid,
            ts_ns: self.ts,
            role,
            endpoints: None,
            comm: [0; 16],
            discovered: false,
            opener: Default::default(),
            protocol: proto::TLS,
            tls: false,
            goroutine: 0,
            kind: EventKind::Data {
                direction: Direction::Egress,
                total_len: 517,
                payload: &[],
                framed: false,
                frame_start: false,
                gap: false,
                tail: false,
            },
        });
    }

    fn spans(&mut self) -> Vec<SpanRecord> {
        let mut out = Vec::new();
        self.p.tick(u64::MAX, &mut out);
        out
    }
}

fn str_attr<'a>(s: &'a SpanRecord, key: &str) -> &'a str {
    match s.attr(key).and_then(AttrValue::as_str) {
        Some(v) => v,
        None => panic!("{key}: {:?}", s.attr(key)),
    }
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

fn find(spans: &[SpanRecord], kind: SpanKind, pid: u32) -> &SpanRecord {
    spans
        .iter()
        .find(|s| s.kind == kind && s.process.pid == pid)
        .unwrap_or_else(|| panic!("no {kind:?} span of {pid}: {spans:#?}"))
}

/// curl (pid 1) → front (pid 2) → back (pid 3), front forwarding the B3 headers it got.
fn chain(headers: &str, server_first: bool) -> Vec<SpanRecord> {
    let mut s = Sim::new(Filter::default());
    let a = s.connect(1, 2, "127.0.0.1:40000", "127.0.0.1:8080");
    let b = s.connect(2, 3, "127.0.0.1:40001", "127.0.0.1:8081");
    let req_a = format!("GET /front HTTP/1.1\r\nHost: localhost:8080\r\n{headers}\r\n");
    let req_b = format!("GET /back HTTP/1.1\r\nHost: localhost:8081\r\n{headers}\r\n");
    s.send_request(a, req_a.as_bytes(), server_first);
    s.send_request(b, req_b.as_bytes(), server_first);
    s.send_response(b, OK);
    s.send_response(a, OK);
    s.spans()
}

fn assert_chain_shape(spans: &[SpanRecord]) {
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let curl = find(spans, SpanKind::Client, 1);
    let front_srv = find(spans, SpanKind::Server, 2);
    let front_cli = find(spans, SpanKind::Client, 2);
    let back_srv = find(spans, SpanKind::Server, 3);
    for sp in spans {
        assert_eq!(sp.trace_id, curl.trace_id, "one trace");
    }
    assert_eq!(front_srv.parent_span_id, Some(curl.span_id));
    assert_eq!(front_cli.parent_span_id, Some(front_srv.span_id));
    assert_eq!(back_srv.parent_span_id, Some(front_cli.span_id));
    // Parents cover their children even though the kernel saw the client read first.
    for (parent, child) in [
        (curl, front_srv),
        (front_srv, front_cli),
        (front_cli, back_srv),
    ] {
        assert!(
            parent.start_unix_ns <= child.start_unix_ns && child.end_unix_ns <= parent.end_unix_ns,
            "{parent:#?} {child:#?}"
        );
    }
}

/// Ratio sampling keeps or drops whole traces (linked spans share the decision), keeps about
/// the ratio, honours a carried decision, and never hides requests from the RED metrics.
#[test]
fn ratio_sampling_is_all_or_nothing_per_trace() {
    use crate::trace::sampler::{Root, Sampler};
    let mut s = Sim::with_sampler(
        Filter::default(),
        Sampler::ParentBased(Root::TraceIdRatio(0.5)),
    );
    const CHAINS: usize = 400;
    let mut spans = Vec::new();
    for i in 0..CHAINS {
        let a = s.connect(1, 2, "127.0.0.1:40000", "127.0.0.1:8080");
        let b = s.connect(2, 3, "127.0.0.1:40001", "127.0.0.1:8081");
        s.gens += 2;
        // Every tenth chain carries an explicit decision to export.
        let headers = if i % 10 == 0 {
            "X-B3-Sampled: 1\r\n"
        } else {
            ""
        };
        let req_a = format!("GET /front HTTP/1.1\r\nHost: f\r\n{headers}\r\n");
        let req_b = format!("GET /back HTTP/1.1\r\nHost: b\r\n{headers}\r\n");
        s.send_request(a, req_a.as_bytes(), false);
        s.send_request(b, req_b.as_bytes(), false);
        s.send_response(b, OK);
        s.send_response(a, OK);
        spans.extend(s.spans());
    }
    let mut per_trace: HashMap<u128, usize> = HashMap::default();
    for sp in &spans {
        *per_trace.entry(sp.trace_id).or_default() += 1;
    }
    assert!(
        per_trace.values().all(|&n| n == 4),
        "a trace is exported whole or not at all: {per_trace:?}"
    );
    let kept = per_trace.len();
    let forced = CHAINS / 10;
    let expected = forced + (CHAINS - forced) / 2;
    assert!(
        (expected - 60..expected + 60).contains(&kept),
        "{kept} of {CHAINS} traces kept"
    );
    assert_eq!(
        s.p.tracer_stats().spans_unsampled as usize,
        4 * (CHAINS - kept)
    );
    let mut text = String::new();
    s.p.red.render(&mut text);
    let back_requests: u64 = text
        .lines()
        .filter(|l| {
            l.starts_with("http_server_request_duration_seconds_count") && l.contains("/back")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(
        back_requests, CHAINS as u64,
        "metrics count sampled-out requests too"
    );
}

#[test]
fn forwarded_b3_headers_link_the_chain() {
    for server_first in [false, true] {
        let spans = chain(
            "X-B3-TraceId: 463ac35c9f6413ad\r\nX-B3-SpanId: a2fb4a1d1a96d312\r\nX-B3-Sampled: 1\r\n",
            server_first,
        );
        assert_chain_shape(&spans);
        let curl = find(&spans, SpanKind::Client, 1);
        assert_eq!(curl.trace_id, 0x463ac35c9f6413ad);
        assert_eq!(
            curl.parent_span_id,
            Some(0xa2fb4a1d1a96d312),
            "curl's own headers name its parent"
        );
        let back = find(&spans, SpanKind::Server, 3);
        assert_eq!(back.attr("url.path"), Some(&AttrValue::from("/back")));
        assert_eq!(
            back.attr("http.response.status_code"),
            Some(&AttrValue::Int(200))
        );
    }
}

/// The server's write returns after the client's read (stamped later) but is processed first,
/// so the SERVER span is exported before its CLIENT parent: the parent must still cover it.
#[test]
fn client_covers_a_server_child_that_is_exported_first() {
    let mut s = Sim::new(Filter::default());
    let a = s.connect(1, 2, "127.0.0.1:40000", "127.0.0.1:8080");
    s.send_request(a, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false);
    let t = s.ts;
    s.event_at(t + 20, a, false, Direction::Egress, OK);
    // Exports the server span alone: the client has not finished yet.
    let mut early = Vec::new();
    s.p.tick(t + 20 + 1_000, &mut early);
    s.event_at(t + 10, a, true, Direction::Ingress, OK);
    let late = s.spans();
    let (server, client) = (
        find(&early, SpanKind::Server, 2),
        find(&late, SpanKind::Client, 1),
    );
    assert_eq!(server.parent_span_id, Some(client.span_id));
    assert_eq!(server.end_unix_ns, t + 20);
    assert_eq!(client.end_unix_ns, t + 20, "stretched to its child's end");
    assert!(client.start_unix_ns <= server.start_unix_ns);
}

/// The back server's write returns (and is stamped) after the front already read the
/// response and answered curl: the writer was preempted on its way out of the syscall (seen
/// on a 2-CPU guest). Its span ends when the front read the response, so every parent still
/// covers its child instead of the front's CLIENT span poking out of its SERVER span.
#[test]
fn a_late_stamped_server_write_ends_when_its_client_read_it() {
    let mut s = Sim::new(Filter::default());
    let a = s.connect(1, 2, "127.0.0.1:40000", "127.0.0.1:8080");
    let b = s.connect(2, 3, "127.0.0.1:40001", "127.0.0.1:8081");
    s.send_request(a, b"GET /front HTTP/1.1\r\nHost: f\r\n\r\n", false);
    s.send_request(b, b"GET /back HTTP/1.1\r\nHost: b\r\n\r\n", false);
    let t = s.ts;
    s.event_at(t + 10, b, true, Direction::Ingress, OK);
    s.event_at(t + 20, a, false, Direction::Egress, OK);
    s.event_at(t + 30, a, true, Direction::Ingress, OK);
    s.event_at(t + 800, b, false, Direction::Egress, OK);
    let spans = s.spans();
    assert_chain_shape(&spans);
    assert_eq!(find(&spans, SpanKind::Server, 3).end_unix_ns, t + 10);
    assert_eq!(find(&spans, SpanKind::Client, 2).end_unix_ns, t + 10);
}

#[test]
fn single_b3_header_and_traceparent() {
    let spans = chain(
        "b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1\r\n",
        false,
    );
    assert_chain_shape(&spans);
    assert_eq!(spans[0].trace_id, 0x80f198ee56343ba864fe8b2a57d3eff7);
    let spans = chain(
        "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n",
        false,
    );
    assert_chain_shape(&spans);
    assert_eq!(spans[0].trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
}

#[test]
fn no_headers_make_one_new_trace() {
    for server_first in [false, true] {
        let spans = chain("", server_first);
        assert_chain_shape(&spans);
        assert_eq!(
            find(&spans, SpanKind::Client, 1).parent_span_id,
            None,
            "curl's span is the root"
        );
    }
}

#[test]
fn sampled_zero_is_honoured_and_debug_forces() {
    let spans = chain(
        "X-B3-TraceId: 463ac35c9f6413ad\r\nX-B3-SpanId: a2fb4a1d1a96d312\r\nX-B3-Sampled: 0\r\n",
        false,
    );
    assert!(spans.is_empty(), "{spans:#?}");
    let spans = chain("b3: 0\r\n", false);
    assert!(spans.is_empty(), "{spans:#?}");
    let spans = chain(
        "X-B3-TraceId: 463ac35c9f6413ad\r\nX-B3-SpanId: a2fb4a1d1a96d312\r\nX-B3-Sampled: 0\r\nX-B3-Flags: 1\r\n",
        false,
    );
    assert_chain_shape(&spans);
}

#[test]
fn instrumented_app_span_id_becomes_the_parent() {
    let mut s = Sim::new(Filter {
        pids: vec![2, 3],
        ..Default::default()
    });
    let a = s.connect(1, 2, "127.0.0.1:40000", "127.0.0.1:8080");
    let b = s.connect(2, 3, "127.0.0.1:40001", "127.0.0.1:8081");
    s.send_request(a, b"GET / HTTP/1.1\r\nX-B3-TraceId: 463ac35c9f6413ad\r\nX-B3-SpanId: a2fb4a1d1a96d312\r\n\r\n", false);
    // The app made its own span 1111… and propagated it.
    s.send_request(b, b"GET / HTTP/1.1\r\nX-B3-TraceId: 463ac35c9f6413ad\r\nX-B3-SpanId: 1111111111111111\r\n\r\n", false);
    s.send_response(b, OK);
    s.send_response(a, OK);
    let spans = s.spans();
    assert_eq!(spans.len(), 3, "pid filter drops curl's span: {spans:#?}");
    let front_srv = find(&spans, SpanKind::Server, 2);
    assert_eq!(
        front_srv.parent_span_id,
        Some(0xa2fb4a1d1a96d312),
        "no CLIENT span seen for it: header parent"
    );
    assert_eq!(
        find(&spans, SpanKind::Client, 2).parent_span_id,
        Some(0x1111111111111111)
    );
    assert_eq!(s.p.stats.conns_filtered, 1);
    assert_eq!(s.p.to_ignore.len(), 1);
}

#[test]
fn keep_alive_and_pipelining_pair_requests_in_order() {
    let mut s = Sim::new(Filter::default());
    let a = s.connect(1, 2, "127.0.0.1:40000", "127.0.0.1:8080");
    // Pipelined: both requests in one write, answered in one write.
    s.send_request(a, b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n", false);
    s.send_response(a, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n");
    // Keep-alive: a third request later on the same connection.
    s.send_request(a, b"GET /3 HTTP/1.1\r\n\r\n", false);
    s.send_response(a, OK);
    let spans = s.spans();
    assert_eq!(spans.len(), 6);
    let servers: Vec<_> = spans
        .iter()
        .filter(|x| x.kind == SpanKind::Server)
        .collect();
    for srv in &servers {
        let parent = spans
            .iter()
            .find(|c| Some(c.span_id) == srv.parent_span_id)
            .expect("linked to its client span");
        assert!(
            str_attr(parent, "url.full").ends_with(str_attr(srv, "url.path")),
            "{parent:#?} {srv:#?}"
        );
        assert_eq!(parent.trace_id, srv.trace_id);
    }
    let busy = servers
        .iter()
        .find(|x| x.attr("url.path") == Some(&AttrValue::from("/2")))
        .unwrap();
    assert_eq!(busy.error.as_deref(), Some("HTTP 503"));
}

/// An inetd-style or forking server: the parent (pid 2) accepted the socket, a child (pid 5)
/// reads the request through its stdin and writes the response through its stdout. It is
/// one connection and one exchange, the child's, linked to its client through both ends;
/// the socket's destruction then leaves nothing open.
#[test]
fn a_socket_served_by_a_forked_child_is_one_exchange_of_the_child() {
    let mut s = Sim::new(Filter::default());
    let mut a = s.connect(1, 2, "127.0.0.1:40000", "127.0.0.1:8080");
    s.event(
        a,
        true,
        Direction::Egress,
        b"GET /cgi HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    a.server_pid = 5;
    s.event(
        a,
        false,
        Direction::Ingress,
        b"GET /cgi HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    s.event(a, false, Direction::Egress, OK);
    s.event(a, true, Direction::Ingress, OK);
    assert_eq!(s.p.conns(), 2);
    s.destroy(a.client);
    s.destroy(a.server);
    let spans = s.spans();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let server = find(&spans, SpanKind::Server, 5);
    let client = find(&spans, SpanKind::Client, 1);
    assert_eq!(server.parent_span_id, Some(client.span_id));
    assert!(server.error.is_none(), "{server:#?}");
    assert_eq!((s.p.conns(), s.p.open_spans()), (0, 0));
}

#[test]
fn close_without_response_is_an_error_span() {
    let mut s = Sim::new(Filter::default());
    let a = s.connect(1, 2, "127.0.0.1:40000", "127.0.0.1:8080");
    s.send_request(a, b"GET /slow HTTP/1.1\r\n\r\n", false);
    s.destroy(a.server);
    let spans = s.spans();
    let srv = find(&spans, SpanKind::Server, 2);
    assert!(srv.error.as_deref().unwrap().contains("closed"));
    assert_eq!(s.p.conns(), 1, "client side still open");
}

/// Closes lost with ring-buffer records: connections the kernel no longer tracks are forgotten
/// once quiet, their open spans abandoned; tracked or recently active ones stay.
#[test]
fn connections_whose_close_was_lost_are_reconciled_with_the_kernel() {
    let mut s = Sim::new(Filter::default());
    let a = s.connect(1, 2, "127.0.0.1:40000", "127.0.0.1:8080");
    s.send_request(a, b"GET /a HTTP/1.1\r\n\r\n", false);
    let quiet_since = s.ts + 1;
    let b = s.connect(3, 4, "127.0.0.1:40001", "127.0.0.1:8080");
    s.send_request(b, b"GET /b HTTP/1.1\r\n\r\n", false);
    assert_eq!((s.p.conns(), s.p.open_spans()), (4, 4));
    // The kernel still tracks a's client end; nothing of b is old enough to judge.
    s.p.reconcile(quiet_since, |id| id == a.client);
    assert_eq!(s.p.conns(), 3, "a's server end is gone");
    assert_eq!(s.p.stats.conns_close_lost, 1);
    assert_eq!(s.p.tracer_stats().spans_abandoned, 1);
    s.p.reconcile(u64::MAX, |_| false);
    assert_eq!((s.p.conns(), s.p.open_spans()), (0, 0));
    assert_eq!(s.p.stats.conns_close_lost, 4);
    assert!(
        s.spans().is_empty(),
        "nothing guessed about the unanswered requests"
    );
}

#[test]
fn gaps_and_garbage_are_counted_not_guessed() {
    let mut s = Sim::new(Filter::default());
    let a = s.connect(1, 2, "127.0.0.1:40000", "127.0.0.1:8080");
    s.event(a, false, Direction::Ingress, b"GET /a HTTP/1.1\r\n\r\n");
    s.event(
        a,
        false,
        Direction::Ingress,
        b"\x00\x01garbage that is not http\r\n\r\n",
    );
    s.event(a, false, Direction::Egress, OK);
    assert!(
        s.spans().is_empty(),
        "the request's pairing is unknown after garbage"
    );
    assert_eq!(s.p.stats.desyncs, 1);
    assert_eq!(s.p.tracer_stats().spans_abandoned, 1);
    // The stream resynchronises on the next request.
    s.event(a, false, Direction::Ingress, b"GET /b HTTP/1.1\r\n\r\n");
    s.event(a, false, Direction::Egress, OK);
    assert_eq!(s.spans().len(), 1);
}

#[test]
fn discovered_connections_join_at_a_message_start_and_never_pair_by_order() {
    let mut s = Sim::new(Filter::default());
    let ep = |local: &str, peer: &str| {
        Some(Endpoints {
            local: local.parse().unwrap(),
            peer: peer.parse().unwrap(),
            netns: LOOPBACK_NS,
        })
    };
    let client = ConnId {
        sock: 0x1001,
        generation: 1,
    };
    let server = ConnId {
        sock: 0x2002,
        generation: 2,
    };
    let send = |s: &mut Sim, conn: ConnId, dir: Direction, bytes: &[u8]| {
        s.ts += 10;
        let (local, peer) = if conn == client {
            ("127.0.0.1:40000", "127.0.0.1:8080")
        } else {
            ("127.0.0.1:8080", "127.0.0.1:40000")
        };
        let pid = if conn == client { 1 } else { 2 };
        s.p.handle(Event {
            conn,
            tgid: pid,
            tid: pid,
            ts_ns: s.ts,
            role: Role::Unknown,
            endpoints: ep(local, peer),
            comm: [0; 16],
            discovered: true,
            opener: Default::default(),
            protocol: 0,
            tls: false,
            goroutine: 0,
            kind: EventKind::Data {
                direction: dir,
                total_len: bytes.len() as u64,
                payload: bytes,
                framed: false,
                frame_start: false,
                gap: false,
                tail: false,
            },
        });
    };
    // Joined mid-body: nothing to attribute yet.
    send(
        &mut s,
        server,
        Direction::Egress,
        b"tail of an earlier response body",
    );
    assert_eq!(s.p.conns(), 0);
    let req = b"GET /x HTTP/1.1\r\nX-B3-TraceId: 463ac35c9f6413ad\r\nX-B3-SpanId: a2fb4a1d1a96d312\r\n\r\n";
    send(&mut s, client, Direction::Egress, req);
    send(&mut s, server, Direction::Ingress, req);
    send(&mut s, client, Direction::Ingress, OK);
    send(&mut s, server, Direction::Egress, OK);
    let spans = s.spans();
    assert_eq!(spans.len(), 2);
    let srv = find(&spans, SpanKind::Server, 2);
    let cli = find(&spans, SpanKind::Client, 1);
    // Earlier requests on this connection were not seen: "request n on both ends" is unknown,
    // so only the headers link them.
    assert_eq!(srv.parent_span_id, Some(0xa2fb4a1d1a96d312));
    assert_eq!(cli.parent_span_id, Some(0xa2fb4a1d1a96d312));
    assert_eq!(s.p.tracer_stats().links_same_agent, 0);
}

mod http2 {
    use super::*;
    use crate::protocol::http2::{
        PREFACE,
        testing::{frame, lit},
    };

    const HEADERS: u8 = 1;
    const END_STREAM: u8 = 1;
    const END_HEADERS: u8 = 4;

    fn request(stream: u32, path: &str, b3: &str) -> Vec<u8> {
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
        block.extend(lit(":path", path));
        block.extend(lit(":authority", "greeter:50051"));
        block.extend(lit("content-type", "application/grpc"));
        block.extend(lit("b3", b3));
        let mut f = frame(HEADERS, END_HEADERS, stream, &block);
        f.extend(frame(0, END_STREAM, stream, &[0, 0, 0, 0, 2, 1, 2]));
        f
    }

    fn response(stream: u32, messages: usize, status: &str) -> Vec<Vec<u8>> {
        let mut out = vec![frame(HEADERS, END_HEADERS, stream, &[0x88])];
        for _ in 0..messages {
            out.push(frame(0, 0, stream, &[0, 0, 0, 0, 1, 9]));
        }
        let mut trailers = lit("grpc-status", status);
        trailers.extend(lit("grpc-message", "x"));
        out.push(frame(HEADERS, END_HEADERS | END_STREAM, stream, &trailers));
        out
    }

    /// A record from the kernel's frame walk: one chunk of copied bytes, then `skipped`.
    fn framed(
        s: &mut Sim,
        l: Link,
        dir: Direction,
        bytes: &[u8],
        skipped: u32,
        start: bool,
        gap: bool,
    ) {
        s.ts += 10;
        let mut payload = (bytes.len() as u32).to_le_bytes().to_vec();
        payload.extend(skipped.to_le_bytes());
        payload.extend_from_slice(bytes);
        s.p.handle(Event {
            conn: l.server,
            tgid: l.server_pid,
            tid: l.server_pid,
            ts_ns: s.ts,
            role: Role::Server,
            endpoints: Some(Endpoints {
                local: l.server_addr.parse().unwrap(),
                peer: l.client_addr.parse().unwrap(),
                netns: LOOPBACK_NS,
            }),
            comm: [0; 16],
            discovered: false,
            opener: Default::default(),
            protocol: 0,
            tls: false,
            goroutine: 0,
            kind: EventKind::Data {
                direction: dir,
                total_len: bytes.len() as u64 + skipped as u64,
                payload: &payload,
                framed: true,
                frame_start: start,
                gap,
                tail: false,
            },
        });
    }

    #[test]
    fn lost_events_resume_at_the_next_frame_start() {
        let mut s = Sim::new(Filter::default());
        let l = s.connect(1, 2, "127.0.0.1:40000", "127.0.0.1:50051");
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(4, 0, 0, &[]));
        framed(&mut s, l, Direction::Ingress, &hello, 0, false, false);
        framed(
            &mut s,
            l,
            Direction::Egress,
            &frame(4, 0, 0, &[]),
            0,
            true,
            false,
        );
        framed(
            &mut s,
            l,
            Direction::Ingress,
            &request(1, "/shop.Cart/List", "1-2-1"),
            0,
            true,
            false,
        );
        // Events were lost: stream 1 can never finish. The next record starts mid-frame and
        // is not decoded; one that starts a frame is.
        framed(
            &mut s,
            l,
            Direction::Ingress,
            &[0xde, 0xad],
            40,
            false,
            true,
        );
        framed(&mut s, l, Direction::Egress, &[0xbe, 0xef], 9, false, false);
        let t = "463ac35c9f6413ad-00000000000000aa-1";
        framed(
            &mut s,
            l,
            Direction::Ingress,
            &request(5, "/shop.Cart/Get", t),
            0,
            true,
            false,
        );
        for f in response(5, 1, "0") {
            framed(&mut s, l, Direction::Egress, &f, 0, true, false);
        }
        let spans = s.spans();
        assert_eq!(spans.len(), 1, "{spans:#?}");
        let srv = find(&spans, SpanKind::Server, 2);
        assert_eq!(srv.name, "shop.Cart/Get");
        assert_eq!(srv.parent_span_id, Some(0xaa));
        assert_eq!(srv.attr("rpc.grpc.status_code"), Some(&AttrValue::Int(0)));
        assert_eq!(
            srv.attr("kspan.partial"),
            None,
            "literal fields decode exactly after a resync"
        );
        assert_eq!(s.p.stats.h2_resyncs, 2, "both directions resumed");
        assert_eq!(s.p.tracer_stats().spans_abandoned, 1, "stream 1");
        assert_eq!(
            s.p.stats.conns_unsupported, 0,
            "the connection was not given up"
        );
    }

    #[test]
    fn grpc_streams_become_linked_spans_ending_at_trailers() {
        let mut s = Sim::new(Filter::default());
        let l = s.connect(1, 2, "127.0.0.1:40000", "127.0.0.1:50051");
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(4, 0, 0, &[]));
        s.send_request(l, &hello, false);
        s.send_response(l, &frame(4, 0, 0, &[]));
        // Two concurrent streams; the server answers stream 3 first.
        s.send_request(
            l,
            &request(1, "/shop.Cart/List", "463ac35c9f6413ad-a2fb4a1d1a96d312-1"),
            false,
        );
        s.send_request(
            l,
            &request(3, "/shop.Cart/Get", "463ac35c9f6413ad-a2fb4a1d1a96d312-1"),
            true,
        );
        for f in response(3, 1, "5") {
            s.send_response(l, &f);
        }
        let first_frames = response(1, 3, "0");
        s.send_response(l, &first_frames[0]);
        let mut spans = s.spans();
        // Response headers alone do not end a streaming RPC: only Get (stream 3) is done.
        assert_eq!(spans.len(), 2);
        assert!(
            spans
                .iter()
                .all(|x| x.attr("rpc.method") == Some(&AttrValue::from("Get")))
        );
        for f in &first_frames[1..] {
            s.send_response(l, f);
        }
        spans.extend(s.spans());
        assert_eq!(spans.len(), 4, "{spans:#?}");
        for method in ["List", "Get"] {
            let pick = |kind| {
                spans
                    .iter()
                    .find(|x| {
                        x.kind == kind && x.attr("rpc.method") == Some(&AttrValue::from(method))
                    })
                    .unwrap_or_else(|| panic!("{kind:?} {method}: {spans:#?}"))
            };
            let (cli, srv) = (pick(SpanKind::Client), pick(SpanKind::Server));
            assert_eq!(srv.parent_span_id, Some(cli.span_id), "linked by stream id");
            assert_eq!(cli.parent_span_id, Some(0xa2fb4a1d1a96d312));
            assert_eq!(cli.trace_id, 0x463ac35c9f6413ad);
            assert_eq!(srv.name, format!("shop.Cart/{method}"));
            assert_eq!(srv.attr("rpc.system"), Some(&AttrValue::from("grpc")));
            assert_eq!(srv.attr("rpc.service"), Some(&AttrValue::from("shop.Cart")));
            assert_eq!(
                srv.attr("network.protocol.version"),
                Some(&AttrValue::from("2"))
            );
            assert_eq!(
                srv.attr("server.address"),
                Some(&AttrValue::from("greeter"))
            );
        }
        let status = |m: &str, k| {
            spans
                .iter()
                .find(|x| x.kind == k && x.attr("rpc.method") == Some(&AttrValue::from(m)))
                .unwrap()
        };
        assert_eq!(
            status("Get", SpanKind::Client).attr("rpc.grpc.status_code"),
            Some(&AttrValue::Int(5))
        );
        assert_eq!(
            status("Get", SpanKind::Client).error.as_deref(),
            Some("gRPC status 5")
        );
        assert_eq!(
            status("Get", SpanKind::Server).error,
            None,
            "NOT_FOUND is not a server fault"
        );
        assert_eq!(
            status("List", SpanKind::Server).attr("http.response.body.size"),
            Some(&AttrValue::Int(18)),
            "3 DATA frames of 6 bytes"
        );
    }

    #[test]
    fn reset_streams_are_errors() {
        let mut s = Sim::new(Filter::default());
        let l = s.connect(1, 2, "127.0.0.1:40000", "127.0.0.1:50051");
        s.send_request(l, PREFACE, false);
        s.send_request(l, &request(1, "/shop.Cart/List", "1"), false);
        s.send_response(l, &frame(3, 0, 1, &8u32.to_be_bytes()));
        let spans = s.spans();
        assert_eq!(spans.len(), 2);
        assert!(
            spans
                .iter()
                .all(|x| x.error.as_deref() == Some("stream reset (HTTP/2 error code 8)"))
        );
    }
}

mod http2_late {
    use super::*;
    use crate::protocol::http2::testing::{frame, lit};

    #[test]
    fn joined_mid_connection_learns_its_side_and_marks_spans_partial() {
        let mut s = Sim::new(Filter::default());
        let server = ConnId {
            sock: 0x2002,
            generation: 9,
        };
        let send = |s: &mut Sim, dir: Direction, bytes: &[u8]| {
            s.ts += 10;
            s.p.handle(Event {
                conn: server,
                tgid: 2,
                tid: 2,
                ts_ns: s.ts,
                role: Role::Unknown,
                endpoints: Some(Endpoints {
                    local: "127.0.0.1:50051".parse().unwrap(),
                    peer: "127.0.0.1:40000".parse().unwrap(),
                    netns: LOOPBACK_NS,
                }),
                comm: [0; 16],
                discovered: true,
                opener: Default::default(),
                protocol: 0,
                tls: false,
                goroutine: 0,
                kind: EventKind::Data {
                    direction: dir,
                    total_len: bytes.len() as u64,
                    payload: bytes,
                    framed: false,
                    frame_start: false,
                    gap: false,
                    tail: false,
                },
            });
        };
        // The tail of a response already in flight, then a PING: nothing attributable yet.
        send(&mut s, Direction::Egress, &frame(0, 1, 1, &[0, 0, 0, 0, 0]));
        send(&mut s, Direction::Ingress, &frame(6, 0, 0, &[0; 8]));
        // A request whose :path sits in the dynamic table we never saw; :method is static.
        let mut block = vec![0x83, 0xbe];
        block.extend(lit("b3", "463ac35c9f6413ad-a2fb4a1d1a96d312-1"));
        send(&mut s, Direction::Ingress, &frame(1, 4 | 1, 3, &block));
        send(&mut s, Direction::Egress, &frame(1, 4 | 1, 3, &[0x88]));
        let spans = s.spans();
        assert_eq!(spans.len(), 1, "{spans:#?}");
        let span = &spans[0];
        assert_eq!(span.kind, SpanKind::Server, "the peer sent the request");
        assert_eq!(span.attr("kspan.partial"), Some(&AttrValue::Bool(true)));
        assert_eq!(
            span.attr("url.path"),
            None,
            "an unknown path is left out, not guessed"
        );
        assert_eq!(
            span.attr("http.request.method"),
            Some(&AttrValue::from("POST"))
        );
        assert_eq!(
            span.attr("http.response.status_code"),
            Some(&AttrValue::Int(200))
        );
        assert_eq!(
            span.trace_id, 0x463ac35c9f6413ad,
            "literal fields still carry the context"
        );
        assert_eq!(s.p.stats.h2_joined_late, 1);
        assert_eq!(s.p.tracer_stats().spans_partial, 1);
    }
}

#[test]
fn https_is_traced_like_http_and_unread_tls_is_counted_by_why() {
    use crate::tls::{Coverage, Uncovered};
    let mut s = Sim::new(Filter::default());
    let a = s.connect(1, 2, "127.0.0.1:40000", "127.0.0.1:443");
    s.tls_notice(a.client, 1, Role::Client);
    s.tls_notice(a.server, 2, Role::Server);
    assert_eq!(
        s.p.tls_seen,
        vec![1, 2],
        "the attacher looks at both processes"
    );
    s.tls = true;
    s.send_request(a, b"GET /pay?card=1 HTTP/1.1\r\nHost: shop\r\n\r\n", false);
    s.send_response(a, OK);
    let spans = s.spans();
    let client = find(&spans, SpanKind::Client, 1);
    let server = find(&spans, SpanKind::Server, 2);
    assert_eq!(
        str_attr(client, "url.full"),
        "https://shop/pay?card=REDACTED"
    );
    assert_eq!(str_attr(server, "url.scheme"), "https");
    assert_eq!(server.parent_span_id, Some(client.span_id));

    // Plaintext never shows: counted at the close, with the reason the attacher gave.
    s.tls = false;
    let b = s.connect(3, 4, "127.0.0.1:40001", "127.0.0.1:8443");
    s.tls_notice(b.client, 3, Role::Client);
    s.p.set_tls_coverage(3, Coverage::Not(Uncovered::Go));
    s.destroy(b.client);
    let c = s.connect(5, 4, "127.0.0.1:40002", "127.0.0.1:8443");
    s.tls_notice(c.client, 5, Role::Client);
    s.destroy(c.client);
    s.destroy(a.client);
    let counted = s.p.stats.conns_tls_unsupported;
    assert_eq!(counted[Uncovered::Go.index()], 1);
    assert_eq!(counted[Uncovered::Unclassified.index()], 1);
    assert_eq!(
        counted.iter().sum::<u64>(),
        2,
        "the read connection is not counted"
    );
    assert_eq!(s.p.stats.conns_tls, 4);
}
