//! The userspace pipeline: decoded kernel events in, finished spans out. Synchronous and free
//! of I/O except procfs reads, so live capture, replay, tests and benchmarks share it.
use rustc_hash::FxHashMap as HashMap;

use crate::{
    capture::event::{ConnId, Direction, Event, EventKind, Role, first_bytes, pieces},
    config::Filter,
    conn::{Conn, Protocol},
    conn::{H2, H2Stream},
    metrics::red::Red,
    process::ProcessCache,
    protocol::{
        http1::{Headers, Message, RequestHead},
        http2 as h2,
    },
    trace::{
        linker::{RequestStart, Tracer},
        privacy::Privacy,
        sampler::Sampler,
        span::{SpanKind, SpanRecord},
    },
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipelineStats {
    pub events: u64,
    pub bytes: u64,
    pub conns_opened: u64,
    pub conns_filtered: u64,
    pub conns_unsupported: u64,
    pub conns_evicted: u64,
    pub desyncs: u64,
    /// Events of connections whose kernel events were partly lost.
    pub gaps: u64,
    pub requests: u64,
    /// HTTP/2 streams whose request headers were not captured (no span possible).
    pub h2_headers_lost: u64,
    /// HTTP/2 connections joined mid-way (spans may be partial).
    pub h2_joined_late: u64,
    /// HTTP/2 directions that resumed framing after lost events.
    pub h2_resyncs: u64,
}

pub struct PipelineOptions {
    pub filter: Filter,
    pub linger_ns: u64,
    pub max_open_spans: usize,
    pub max_conns: usize,
    pub clock_offset_ns: i128,
    pub privacy: Privacy,
    pub sampler: Sampler,
}

pub struct Pipeline {
    conns: HashMap<ConnId, Conn>,
    /// Connections the filters excluded (kept so their later events are dropped cheaply).
    excluded: HashMap<ConnId, u64>,
    tracer: Tracer,
    procs: ProcessCache,
    filter: Filter,
    max_conns: usize,
    /// Request headers to keep beyond those spans need.
    captured: &'static [&'static str],
    messages: Vec<Message>,
    h2_messages: Vec<h2::Message>,
    /// RED metrics and service-graph edges of every finished request.
    pub red: Red,
    /// Connections userspace wants the kernel to stop reporting.
    pub to_ignore: Vec<ConnId>,
    pub stats: PipelineStats,
}

/// Connections silent for this long are forgotten (their close was never seen).
const IDLE_NS: u64 = 300_000_000_000;

impl Pipeline {
    pub fn new(opts: PipelineOptions, procs: ProcessCache) -> Self {
        Self {
            conns: HashMap::default(),
            excluded: HashMap::default(),
            tracer: Tracer::new(
                opts.linger_ns,
                opts.max_open_spans,
                opts.clock_offset_ns,
                opts.privacy,
                opts.sampler,
            ),
            captured: opts.privacy.captured,
            procs,
            filter: opts.filter,
            max_conns: opts.max_conns,
            messages: Vec::new(),
            h2_messages: Vec::new(),
            red: Red::default(),
            to_ignore: Vec::new(),
            stats: PipelineStats::default(),
        }
    }

    pub fn tracer_stats(&self) -> crate::trace::linker::TracerStats {
        self.tracer.stats
    }

    pub fn conns(&self) -> usize {
        self.conns.len()
    }

    pub fn open_spans(&self) -> usize {
        self.tracer.open_spans()
    }

    pub fn handle(&mut self, ev: Event<'_>) {
        self.stats.events += 1;
        if self.excluded.contains_key(&ev.conn) {
            if ev.kind == EventKind::Close {
                self.excluded.remove(&ev.conn);
            }
            return;
        }
        if !self.conns.contains_key(&ev.conn) {
            if ev.kind == EventKind::Close {
                return;
            }
            let process = self.procs.get(ev.tgid, &ev.comm, ev.opener);
            if !self.filter.admits(&process, ev.endpoints.as_ref()) {
                self.stats.conns_filtered += 1;
                self.excluded.insert(ev.conn, ev.ts_ns);
                self.to_ignore.push(ev.conn);
                return;
            }
            // A socket found mid-life joins at the first message start that shows its side, or,
            // for HTTP/2, at a frame boundary (its side is learnt from the first request).
            let mut h2_late = false;
            let role = match (ev.role, &ev.kind) {
                (
                    Role::Unknown,
                    EventKind::Data {
                        direction,
                        payload,
                        framed,
                        ..
                    },
                ) => match Conn::infer_role(*direction, first_bytes(payload, *framed)) {
                    Some(role) => role,
                    None if h2::frame_start(first_bytes(payload, *framed)) => {
                        h2_late = true;
                        Role::Unknown
                    }
                    None => return,
                },
                (role, _) => role,
            };
            if self.conns.len() >= self.max_conns {
                self.evict_oldest();
            }
            self.stats.conns_opened += 1;
            let mut conn = Conn::new(
                role,
                ev.endpoints,
                ev.tgid,
                process,
                ev.ts_ns,
                self.captured,
            );
            conn.discovered = ev.discovered;
            if h2_late {
                conn.protocol = Protocol::Http2;
                conn.h2 = Some(Box::new(H2::new(true)));
                self.stats.h2_joined_late += 1;
            }
            self.conns.insert(ev.conn, conn);
        }
        let Some(conn) = self.conns.get_mut(&ev.conn) else {
            return;
        };
        conn.last_seen_ns = ev.ts_ns;
        if ev.tgid != 0 && ev.tgid != conn.tgid {
            conn.tgid = ev.tgid;
            conn.process = self.procs.get(ev.tgid, &ev.comm, ev.opener);
        }
        let mut sink = Sink {
            tracer: &mut self.tracer,
            stats: &mut self.stats,
            captured: self.captured,
        };
        match ev.kind {
            EventKind::Close => {
                conn.http.close(ev.ts_ns, &mut self.messages);
                sink.apply(conn, &mut self.messages, ev.tid, ev.ts_ns);
                let open_streams = conn
                    .h2
                    .as_mut()
                    .map(|h| std::mem::take(&mut h.streams))
                    .unwrap_or_default();
                let spans = conn
                    .in_flight
                    .drain(..)
                    .flatten()
                    .chain(open_streams.into_values().filter_map(|s| s.span));
                for id in spans.collect::<Vec<_>>() {
                    sink.tracer.finished(
                        id,
                        ev.ts_ns,
                        0,
                        Some("connection closed before the response completed"),
                    );
                }
                self.conns.remove(&ev.conn);
            }
            EventKind::Data {
                direction,
                total_len,
                payload,
                framed,
                frame_start,
                gap,
            } => {
                sink.stats.bytes += total_len;
                if conn.protocol == Protocol::Unsupported {
                    return;
                }
                if gap {
                    sink.stats.gaps += 1;
                    match conn.h2.as_mut() {
                        // The kernel marks where frames start: HTTP/2 can resume there.
                        Some(_) if framed => sink.h2_lost_sync(conn),
                        _ => sink.restart(conn),
                    }
                }
                let requests = conn.carries_requests(direction);
                if conn.protocol == Protocol::Http1
                    && conn.requests == 0
                    && conn.h2.is_none()
                    && h2::starts_connection(first_bytes(payload, framed), requests)
                {
                    conn.protocol = Protocol::Http2;
                    conn.h2 = Some(Box::new(H2::new(false)));
                }
                let mut h2_lost = false;
                for (i, (bytes, missing)) in pieces(payload, framed, total_len).enumerate() {
                    match conn.h2.as_mut() {
                        Some(h) => {
                            // A late-joined connection's frame decoders stay keyed by direction
                            // (egress stands in for "client"); its messages are flipped once its
                            // side is known.
                            let from_client = if h.frames.joined_late {
                                direction == Direction::Egress
                            } else {
                                requests
                            };
                            if h.frames.awaiting_frame(from_client) {
                                if !framed {
                                    // The kernel stopped following frames: no way back.
                                    sink.restart(conn);
                                    h2_lost = true;
                                    break;
                                }
                                if i > 0 || !frame_start {
                                    break;
                                }
                                h.frames.resume_at_frame(from_client);
                                sink.stats.h2_resyncs += 1;
                            }
                            h.frames.feed(
                                from_client,
                                bytes,
                                missing,
                                ev.ts_ns,
                                &mut self.h2_messages,
                            );
                            sink.apply_h2(conn, &mut self.h2_messages, ev.tid, ev.ts_ns);
                            h2_lost = conn.protocol == Protocol::Unsupported;
                        }
                        None => {
                            conn.http
                                .feed(requests, bytes, missing, ev.ts_ns, &mut self.messages);
                            sink.apply(conn, &mut self.messages, ev.tid, ev.ts_ns);
                        }
                    }
                    if conn.protocol == Protocol::Unsupported {
                        break;
                    }
                }
                // HTTP/2 framing lost: the kernel can stop sending this connection's bytes.
                if h2_lost {
                    self.to_ignore.push(ev.conn);
                }
            }
        }
    }

    fn evict_oldest(&mut self) {
        // Rare (only at the cap): a scan is cheaper than keeping an ordered index.
        let mut ages: Vec<(u64, ConnId)> = self
            .conns
            .iter()
            .map(|(id, c)| (c.last_seen_ns, *id))
            .collect();
        ages.sort_unstable();
        for (_, id) in ages.into_iter().take(self.max_conns / 10 + 1) {
            self.drop_conn(id);
        }
    }

    fn drop_conn(&mut self, id: ConnId) {
        if let Some(mut c) = self.conns.remove(&id) {
            self.stats.conns_evicted += 1;
            for span in c.in_flight.drain(..).flatten() {
                self.tracer.abandon(span);
            }
        }
    }

    /// Periodic work: export lingering spans, forget idle connections.
    pub fn tick(&mut self, now_ns: u64, out: &mut Vec<SpanRecord>) {
        self.tracer.flush(now_ns, out);
        for o in self.tracer.observations.drain(..) {
            self.red.observe(&o);
        }
    }

    /// Slow periodic work (scans): idle connections and stale exchanges.
    pub fn expire(&mut self, now_ns: u64) {
        let cutoff = now_ns.saturating_sub(IDLE_NS);
        let idle: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.last_seen_ns < cutoff)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            self.drop_conn(id);
        }
        self.excluded.retain(|_, ts| *ts >= cutoff);
        self.tracer.expire(now_ns);
    }
}

/// An HTTP/2 request's header block as the linker's request head (version 2).
fn request_head(
    fields: Vec<(String, String)>,
    start_ns: u64,
    captured: &'static [&'static str],
) -> RequestHead {
    let mut head = RequestHead {
        method: String::new(),
        target: String::new(),
        version: 2,
        headers: Headers::default(),
        start_ns,
    };
    for (name, value) in fields {
        match name.as_str() {
            ":method" => head.method = value,
            ":path" => head.target = value,
            ":authority" => head.headers.insert("host", &value),
            _ => head.headers.insert_with(&name, &value, captured),
        }
    }
    head
}

/// The parts of the pipeline that decoded messages act on, borrowed apart from the connection
/// table so a connection can be updated in place.
struct Sink<'a> {
    tracer: &'a mut Tracer,
    stats: &'a mut PipelineStats,
    captured: &'static [&'static str],
}

impl Sink<'_> {
    /// Applies decoded messages of one connection to the tracer.
    fn apply(&mut self, conn: &mut Conn, messages: &mut Vec<Message>, tid: u32, ts_ns: u64) {
        for msg in messages.drain(..) {
            match msg {
                Message::RequestHead(head) => {
                    let seq = conn.requests;
                    let span = self.start_request(conn, tid, seq, &head);
                    conn.in_flight.push_back(span);
                }
                Message::RequestEnd { body_len, .. } => {
                    if let Some(Some(span)) = conn.in_flight.back() {
                        self.tracer.request_ended(*span, body_len);
                    }
                }
                Message::ResponseHead(head) => {
                    if let Some(Some(span)) = conn.in_flight.front() {
                        self.tracer.response_started(*span, head.status);
                    }
                }
                Message::ResponseEnd { end_ns, body_len } => {
                    if let Some(Some(span)) = conn.in_flight.pop_front() {
                        self.tracer.finished(span, end_ns, body_len, None);
                    }
                }
                Message::Desync { .. } => {
                    self.stats.desyncs += 1;
                    self.restart(conn);
                }
                Message::Upgraded => {
                    if let Some(Some(span)) = conn.in_flight.pop_front() {
                        self.tracer.response_started(span, 101);
                        self.tracer.finished(span, ts_ns, 0, None);
                    }
                    conn.protocol = Protocol::Unsupported;
                }
            }
        }
    }

    /// Starts the span of a request; `seq` pairs it with the other end of the connection
    /// (request number for HTTP/1, stream id for HTTP/2) unless earlier traffic was missed.
    fn start_request(
        &mut self,
        conn: &mut Conn,
        tid: u32,
        seq: u64,
        head: &RequestHead,
    ) -> Option<u64> {
        self.stats.requests += 1;
        conn.requests += 1;
        self.tracer.request_started(RequestStart {
            tgid: conn.tgid,
            tid,
            kind: if conn.role == Role::Server {
                SpanKind::Server
            } else {
                SpanKind::Client
            },
            endpoints: conn.endpoints,
            seq: (!conn.discovered).then_some(seq),
            process: conn.process.clone(),
            head,
        })
    }

    /// Requests and responses can no longer be paired: drop what is in flight (counted) and
    /// resume at the next message boundary on both sides.
    fn restart(&mut self, conn: &mut Conn) {
        for span in conn.in_flight.drain(..).flatten() {
            self.tracer.abandon(span);
        }
        conn.http.resync();
        // HTTP/2 has no resynchronisation point of its own; without the kernel's frame-start
        // marks (see `h2_lost_sync`) the connection is given up (counted).
        if let Some(h) = conn.h2.take() {
            for span in h.streams.into_values().filter_map(|s| s.span) {
                self.tracer.abandon(span);
            }
            conn.protocol = Protocol::Unsupported;
            self.stats.conns_unsupported += 1;
        }
    }

    /// Events of an HTTP/2 connection were lost: streams in flight can no longer be finished
    /// (abandoned, counted), and decoding resumes where the kernel marks a frame start.
    fn h2_lost_sync(&mut self, conn: &mut Conn) {
        if let Some(h) = conn.h2.as_mut() {
            for span in h.streams.drain().filter_map(|(_, s)| s.span) {
                self.tracer.abandon(span);
            }
            h.frames.lose_sync();
        }
    }

    /// Applies decoded HTTP/2 messages: one span per stream.
    fn apply_h2(&mut self, conn: &mut Conn, messages: &mut Vec<h2::Message>, tid: u32, ts_ns: u64) {
        for mut msg in messages.drain(..) {
            let Some(h) = conn.h2.as_mut() else { return };
            let flip = match h.flip {
                Some(flip) => flip,
                None => match &msg {
                    // The side that sends a request header block is the client.
                    h2::Message::Headers {
                        from_client: egress,
                        fields,
                        ..
                    } if fields.iter().any(|(n, _)| n == ":method") => {
                        conn.role = if *egress { Role::Client } else { Role::Server };
                        h.flip = Some(!egress);
                        !egress
                    }
                    h2::Message::Broken { .. } => false,
                    // Before that, nothing can be attributed.
                    _ => continue,
                },
            };
            if flip {
                msg.flip_direction();
            }
            match msg {
                h2::Message::Headers {
                    from_client: true,
                    stream,
                    fields,
                    end_stream,
                    partial,
                    start_ns,
                } => {
                    if let Some(s) = h.streams.get_mut(&stream) {
                        // Request trailers.
                        if let (true, Some(span)) = (end_stream, s.span) {
                            self.tracer.request_ended(span, s.request_body);
                        }
                        continue;
                    }
                    let head = request_head(fields, start_ns, self.captured);
                    // Both ends number streams identically, which pairs them exactly.
                    let span = self.start_request(conn, tid, stream as u64, &head);
                    if let Some(span) = span {
                        if partial {
                            self.tracer.mark_partial(span);
                        }
                        if end_stream {
                            self.tracer.request_ended(span, 0);
                        }
                    }
                    // Re-borrowed: starting the span needed the whole connection.
                    let Some(h) = conn.h2.as_mut() else { return };
                    h.streams.insert(
                        stream,
                        H2Stream {
                            span,
                            ..Default::default()
                        },
                    );
                }
                h2::Message::Headers {
                    from_client: false,
                    stream,
                    fields,
                    end_stream,
                    partial,
                    ..
                } => {
                    let Some(s) = h.streams.get_mut(&stream) else {
                        continue;
                    };
                    let Some(span) = s.span else {
                        if end_stream {
                            h.streams.remove(&stream);
                        }
                        continue;
                    };
                    let value = |name: &str| {
                        fields
                            .iter()
                            .find(|(n, _)| n == name)
                            .map(|(_, v)| v.as_str())
                    };
                    if !s.status_seen {
                        match value(":status").and_then(|v| v.parse::<u16>().ok()) {
                            Some(status) if (100..200).contains(&status) => continue,
                            Some(status) => {
                                s.status_seen = true;
                                self.tracer.response_started(span, status);
                            }
                            None => {}
                        }
                    }
                    if let Some(code) = value("grpc-status").and_then(|v| v.parse::<i64>().ok()) {
                        self.tracer.grpc_status(span, code);
                    }
                    if partial {
                        self.tracer.mark_partial(span);
                    }
                    if end_stream {
                        let body = s.response_body;
                        h.streams.remove(&stream);
                        self.tracer.finished(span, ts_ns, body, None);
                    }
                }
                h2::Message::HeadersLost {
                    from_client,
                    stream,
                    end_stream,
                } => match h.streams.get(&stream) {
                    None if from_client => self.stats.h2_headers_lost += 1,
                    Some(s) => {
                        if let Some(span) = s.span {
                            self.tracer.mark_partial(span);
                            if end_stream && !from_client {
                                let body = s.response_body;
                                h.streams.remove(&stream);
                                self.tracer.finished(span, ts_ns, body, None);
                            }
                        }
                    }
                    None => {}
                },
                h2::Message::Data {
                    from_client,
                    stream,
                    len,
                    end_stream,
                } => {
                    let Some(s) = h.streams.get_mut(&stream) else {
                        continue;
                    };
                    if from_client {
                        s.request_body += len;
                        if let (true, Some(span)) = (end_stream, s.span) {
                            self.tracer.request_ended(span, s.request_body);
                        }
                    } else {
                        s.response_body += len;
                        if end_stream {
                            let (span, body) = (s.span, s.response_body);
                            h.streams.remove(&stream);
                            if let Some(span) = span {
                                self.tracer.finished(span, ts_ns, body, None);
                            }
                        }
                    }
                }
                h2::Message::Reset { stream, code } => {
                    if let Some(s) = h.streams.remove(&stream)
                        && let Some(span) = s.span
                    {
                        let why = format!("stream reset (HTTP/2 error code {code})");
                        self.tracer
                            .finished(span, ts_ns, s.response_body, Some(&why));
                    }
                }
                h2::Message::GoAway { last_stream, .. } => {
                    let refused: Vec<u32> = h
                        .streams
                        .keys()
                        .copied()
                        .filter(|&id| id > last_stream)
                        .collect();
                    for stream in refused {
                        if let Some(span) = h.streams.remove(&stream).and_then(|s| s.span) {
                            self.tracer
                                .finished(span, ts_ns, 0, Some("stream refused by GOAWAY"));
                        }
                    }
                }
                h2::Message::Broken { .. } => {
                    self.stats.desyncs += 1;
                    self.restart(conn);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
