//! The userspace pipeline: decoded kernel events in, finished spans out. Synchronous and free
//! of I/O except procfs reads, so live capture, replay, tests and benchmarks share it.
use rustc_hash::FxHashMap as HashMap;

use crate::{
    capture::event::{ConnId, Event, EventKind, Role},
    config::Filter,
    conn::{Conn, Protocol},
    process::ProcessCache,
    protocol::http1::Message,
    trace::{
        linker::{RequestStart, Tracer},
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
}

pub struct PipelineOptions {
    pub filter: Filter,
    pub linger_ns: u64,
    pub max_open_spans: usize,
    pub max_conns: usize,
    pub clock_offset_ns: i128,
}

pub struct Pipeline {
    conns: HashMap<ConnId, Conn>,
    /// Connections the filters excluded (kept so their later events are dropped cheaply).
    excluded: HashMap<ConnId, u64>,
    tracer: Tracer,
    procs: ProcessCache,
    filter: Filter,
    max_conns: usize,
    messages: Vec<Message>,
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
            tracer: Tracer::new(opts.linger_ns, opts.max_open_spans, opts.clock_offset_ns),
            procs,
            filter: opts.filter,
            max_conns: opts.max_conns,
            messages: Vec::new(),
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
            let process = self.procs.get(ev.conn.tgid, &ev.comm);
            if !self.filter.admits(&process, ev.endpoints.as_ref()) {
                self.stats.conns_filtered += 1;
                self.excluded.insert(ev.conn, ev.ts_ns);
                self.to_ignore.push(ev.conn);
                return;
            }
            // A socket found mid-life joins at the first message start that shows its side.
            let role = match (ev.role, &ev.kind) {
                (
                    Role::Unknown,
                    EventKind::Data {
                        direction, payload, ..
                    },
                ) => match Conn::infer_role(*direction, payload) {
                    Some(role) => role,
                    None => return,
                },
                (role, _) => role,
            };
            if self.conns.len() >= self.max_conns {
                self.evict_oldest();
            }
            self.stats.conns_opened += 1;
            let mut conn = Conn::new(role, ev.endpoints, process, ev.ts_ns);
            conn.discovered = ev.discovered;
            self.conns.insert(ev.conn, conn);
        }
        let Some(conn) = self.conns.get_mut(&ev.conn) else {
            return;
        };
        conn.last_seen_ns = ev.ts_ns;
        let mut sink = Sink {
            tracer: &mut self.tracer,
            stats: &mut self.stats,
        };
        match ev.kind {
            EventKind::Close => {
                conn.http.close(ev.ts_ns, &mut self.messages);
                sink.apply(conn, &mut self.messages, ev.conn, ev.tid, ev.ts_ns);
                for id in conn.in_flight.drain(..).flatten() {
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
                gap,
            } => {
                sink.stats.bytes += total_len;
                if conn.protocol == Protocol::Unsupported {
                    return;
                }
                if gap {
                    sink.stats.gaps += 1;
                    sink.restart(conn);
                }
                if conn.requests == 0 && payload.starts_with(b"PRI * HTTP/2.0") {
                    conn.protocol = Protocol::Unsupported;
                    sink.stats.conns_unsupported += 1;
                    return;
                }
                let requests = conn.carries_requests(direction);
                let missing = total_len.saturating_sub(payload.len() as u64);
                conn.http
                    .feed(requests, payload, missing, ev.ts_ns, &mut self.messages);
                sink.apply(conn, &mut self.messages, ev.conn, ev.tid, ev.ts_ns);
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

/// The parts of the pipeline that decoded messages act on, borrowed apart from the connection
/// table so a connection can be updated in place.
struct Sink<'a> {
    tracer: &'a mut Tracer,
    stats: &'a mut PipelineStats,
}

impl Sink<'_> {
    /// Applies decoded messages of one connection to the tracer.
    fn apply(
        &mut self,
        conn: &mut Conn,
        messages: &mut Vec<Message>,
        id: ConnId,
        tid: u32,
        ts_ns: u64,
    ) {
        for msg in messages.drain(..) {
            match msg {
                Message::RequestHead(head) => {
                    self.stats.requests += 1;
                    let span = self.tracer.request_started(RequestStart {
                        conn: id,
                        tid,
                        kind: if conn.role == Role::Server {
                            SpanKind::Server
                        } else {
                            SpanKind::Client
                        },
                        endpoints: conn.endpoints,
                        seq: (!conn.discovered).then_some(conn.requests),
                        process: conn.process.clone(),
                        head: &head,
                    });
                    conn.requests += 1;
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

    /// Requests and responses can no longer be paired: drop what is in flight (counted) and
    /// resume at the next message boundary on both sides.
    fn restart(&mut self, conn: &mut Conn) {
        for span in conn.in_flight.drain(..).flatten() {
            self.tracer.abandon(span);
        }
        conn.http.resync();
    }
}

#[cfg(test)]
mod tests;
