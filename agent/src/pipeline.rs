//! The userspace pipeline: decoded kernel events in, finished spans out. Synchronous and free
//! of I/O except procfs reads, so live capture, replay, tests and benchmarks share it.
use std::{net::SocketAddr, sync::Arc};

use kspan_common::proto;
use rustc_hash::FxHashMap as HashMap;

use crate::{
    capture::event::{ConnId, Event, EventKind, Role, first_bytes},
    config::Filter,
    conn::{Conn, carries_requests},
    metrics::red::Red,
    process::{ProcessCache, ProcessInfo},
    protocol::{
        Call, Out, Segment, Step,
        registry::{self, Join},
    },
    tls::{Coverage, Uncovered},
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
    /// Connections whose close was lost with ring-buffer records, dropped once the kernel no
    /// longer tracked their socket.
    pub conns_close_lost: u64,
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
    /// Data-store connections seen from the server's side, not decoded by configuration.
    pub conns_db_server: u64,
    /// Connections that spoke TLS.
    pub conns_tls: u64,
    /// TLS connections that ended without any plaintext seen, by why
    /// ([`Uncovered::index`]).
    pub conns_tls_unsupported: [u64; Uncovered::COUNT],
}

pub struct PipelineOptions {
    pub filter: Filter,
    pub linger_ns: u64,
    /// Bytes finished spans may hold while they linger.
    pub max_linger_bytes: usize,
    pub max_open_spans: usize,
    pub max_conns: usize,
    pub clock_offset_ns: i128,
    pub privacy: Privacy,
    pub sampler: Sampler,
    /// SERVER spans for data-store servers too (`--db-server-spans`).
    pub db_server_spans: bool,
}

pub struct Pipeline {
    conns: HashMap<ConnId, Conn>,
    /// Connections the filters excluded (kept so their later events are dropped cheaply).
    excluded: HashMap<ConnId, u64>,
    tracer: Tracer,
    procs: ProcessCache,
    filter: Filter,
    max_conns: usize,
    decoders: registry::Settings,
    /// What decoders found in the current event (kept to reuse its allocation).
    steps: Vec<Step>,
    /// RED metrics and service-graph edges of every finished request.
    pub red: Red,
    /// Data-store servers by listening address, learnt from the server side of connections
    /// that are not decoded: a client's calls to one are an edge to its service.
    db_servers: HashMap<ServerKey, Arc<ProcessInfo>>,
    /// Connections userspace wants the kernel to stop reporting.
    pub to_ignore: Vec<ConnId>,
    /// TLS connections whose plaintext has not shown yet, with the process that opened them.
    tls_waiting: HashMap<ConnId, (u32, u64)>,
    /// Whether each process's TLS library is hooked, as the capture's attacher found.
    tls_coverage: HashMap<u32, Coverage>,
    /// Processes seen speaking TLS since the last drain: where the attacher looks for libraries.
    pub tls_seen: Vec<u32>,
    /// Processes that exec'ed since the last drain: the attacher looks at what they load.
    pub execs: Vec<u32>,
    pub stats: PipelineStats,
}

/// Connections silent for this long are forgotten (their close was never seen).
const IDLE_NS: u64 = 300_000_000_000;
/// Data-store server addresses remembered (forgotten all at once beyond).
const MAX_DB_SERVERS: usize = 4096;
/// TLS connections awaiting plaintext, and processes' TLS coverage, remembered (forgotten all
/// at once beyond: the cost is a miscounted reason, never a span).
const MAX_TLS_WAITING: usize = 65_536;
const MAX_TLS_PROCESSES: usize = 4096;
/// Processes the capture is asked to look at between two drains.
const MAX_PENDING_PROCESSES: usize = 4096;

/// A server's address; loopback addresses repeat in every network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ServerKey {
    addr: SocketAddr,
    netns: u32,
}

impl ServerKey {
    fn new(addr: SocketAddr, netns: u32) -> Self {
        let netns = if addr.ip().is_loopback() { netns } else { 0 };
        Self { addr, netns }
    }
}

impl Pipeline {
    pub fn new(opts: PipelineOptions, procs: ProcessCache) -> Self {
        Self {
            conns: HashMap::default(),
            excluded: HashMap::default(),
            tracer: Tracer::new(
                opts.linger_ns,
                opts.max_open_spans,
                opts.max_linger_bytes,
                opts.clock_offset_ns,
                opts.privacy,
                opts.sampler,
            ),
            decoders: registry::Settings {
                captured: opts.privacy.captured,
                keep_db_literals: opts.privacy.keep_db_literals,
                db_server_spans: opts.db_server_spans,
            },
            procs,
            filter: opts.filter,
            max_conns: opts.max_conns,
            steps: Vec::new(),
            red: Red::default(),
            db_servers: HashMap::default(),
            to_ignore: Vec::new(),
            tls_waiting: HashMap::default(),
            tls_coverage: HashMap::default(),
            tls_seen: Vec::new(),
            execs: Vec::new(),
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
        let tls_socket = match ev.kind {
            EventKind::Close => !self.tls_waiting.is_empty(),
            EventKind::Data { .. } => ev.protocol == proto::TLS,
            EventKind::Exec => {
                // Bounded for drivers that never drain it (replay).
                if self.execs.len() < MAX_PENDING_PROCESSES {
                    self.execs.push(ev.tgid);
                }
                self.tracer.process_exec(ev.tgid);
                return;
            }
            EventKind::Go(go) => {
                self.tracer
                    .goroutine_event(ev.tgid, ev.goroutine, go, ev.ts_ns);
                return;
            }
        };
        if tls_socket && self.tls_ciphertext(&ev) {
            return;
        }
        if self.excluded.contains_key(&ev.conn) {
            if ev.kind == EventKind::Close {
                self.excluded.remove(&ev.conn);
            }
            return;
        }
        if !self.conns.contains_key(&ev.conn) && !self.open_conn(&ev) {
            return;
        }
        let Some(conn) = self.conns.get_mut(&ev.conn) else {
            return;
        };
        conn.last_seen_ns = ev.ts_ns;
        if ev.tgid != 0 && ev.tgid != conn.tgid {
            conn.tgid = ev.tgid;
            conn.process = self.procs.get(ev.tgid, &ev.comm, ev.opener);
        }
        let mut out = Out {
            steps: &mut self.steps,
            stats: &mut self.stats,
        };
        let closed = match ev.kind {
            // Handled on entry.
            EventKind::Exec | EventKind::Go(_) => return,
            EventKind::Close => {
                if let Some(d) = conn.decoder.as_mut() {
                    d.close(ev.ts_ns, &mut out);
                }
                true
            }
            EventKind::Data {
                direction,
                total_len,
                payload,
                framed,
                frame_start,
                gap,
                tail,
            } => {
                out.stats.bytes += total_len;
                out.stats.gaps += gap as u64;
                if let Some(decoder) = conn.decoder.as_mut() {
                    let seg = Segment {
                        direction,
                        requests: carries_requests(conn.role, direction),
                        payload,
                        total_len,
                        framed,
                        frame_start,
                        gap,
                        tail,
                        ts_ns: ev.ts_ns,
                    };
                    decoder.feed(&seg, &mut out);
                }
                false
            }
        };
        let mut sink = Sink {
            tracer: &mut self.tracer,
            stats: &mut self.stats,
            to_ignore: &mut self.to_ignore,
            db_servers: &self.db_servers,
        };
        let actor = Actor {
            tid: ev.tid,
            goroutine: ev.goroutine,
        };
        sink.apply(conn, ev.conn, &mut self.steps, actor);
        if closed {
            for span in conn.open.drain() {
                let why = Some("connection closed before the response completed");
                sink.tracer.finished(span, ev.ts_ns, 0, why);
            }
            self.conns.remove(&ev.conn);
        }
    }

    /// Starts tracking a connection at its first event; false when the event is dropped
    /// (filtered out, a close, or a socket found mid-message).
    fn open_conn(&mut self, ev: &Event<'_>) -> bool {
        let EventKind::Data {
            direction,
            payload,
            framed,
            ..
        } = ev.kind
        else {
            return false;
        };
        let Some(process) = self.admitted(ev) else {
            return false;
        };
        let first = first_bytes(payload, framed);
        let (role, decoder, both_ends) = match registry::join(
            ev.protocol,
            ev.role,
            direction,
            first,
            ev.discovered,
            &self.decoders,
            &mut self.stats,
        ) {
            Join::Decode {
                role,
                decoder,
                both_ends,
            } => (role, decoder, both_ends),
            Join::Skip => {
                self.stats.conns_db_server += 1;
                if let Some(e) = ev.endpoints {
                    if self.db_servers.len() >= MAX_DB_SERVERS {
                        self.db_servers.clear();
                    }
                    self.db_servers
                        .insert(ServerKey::new(e.local, e.netns), process);
                }
                self.exclude(ev.conn, ev.ts_ns);
                return false;
            }
            Join::Wait => return false,
        };
        if self.conns.len() >= self.max_conns {
            self.evict_oldest();
        }
        self.stats.conns_opened += 1;
        let mut conn = Conn::new(role, ev.endpoints, ev.tgid, process, decoder, ev.ts_ns);
        conn.pairs = !ev.discovered && both_ends;
        conn.tls = ev.tls;
        if ev.tls {
            self.tls_waiting.remove(&ev.conn);
        }
        self.conns.insert(ev.conn, conn);
        true
    }

    /// The process of a connection's first event, when the filters admit the connection;
    /// otherwise the connection is excluded (counted, and the kernel told to drop it).
    fn admitted(&mut self, ev: &Event<'_>) -> Option<Arc<ProcessInfo>> {
        let process = self.procs.get(ev.tgid, &ev.comm, ev.opener);
        if self.filter.admits(&process, ev.endpoints.as_ref()) {
            return Some(process);
        }
        self.stats.conns_filtered += 1;
        self.exclude(ev.conn, ev.ts_ns);
        None
    }

    /// Drops a connection for good: its later events are ignored here and in the kernel.
    fn exclude(&mut self, conn: ConnId, ts_ns: u64) {
        self.excluded.insert(conn, ts_ns);
        self.to_ignore.push(conn);
    }

    /// What the kernel says of a TLS socket itself (not its plaintext): that it speaks TLS, or
    /// that it closed. True when that is all there is to do.
    fn tls_ciphertext(&mut self, ev: &Event<'_>) -> bool {
        match ev.kind {
            EventKind::Data { .. } => {
                if self.conns.contains_key(&ev.conn) || self.excluded.contains_key(&ev.conn) {
                    return true;
                }
                if self.admitted(ev).is_none() {
                    return true;
                }
                self.stats.conns_tls += 1;
                if self.tls_waiting.len() >= MAX_TLS_WAITING {
                    self.tls_waiting.clear();
                }
                self.tls_waiting.insert(ev.conn, (ev.tgid, ev.ts_ns));
                if self.tls_seen.len() < MAX_PENDING_PROCESSES {
                    self.tls_seen.push(ev.tgid);
                }
                true
            }
            EventKind::Exec | EventKind::Go(_) => false,
            EventKind::Close => match self.tls_waiting.remove(&ev.conn) {
                Some((tgid, _)) => {
                    let why = match self.tls_coverage.get(&tgid) {
                        Some(Coverage::Hooked) => Uncovered::NoPlaintext,
                        Some(Coverage::Not(why)) => *why,
                        None => Uncovered::Unclassified,
                    };
                    self.stats.conns_tls_unsupported[why.index()] += 1;
                    true
                }
                None => false,
            },
        }
    }

    /// Records whether process `tgid`'s TLS library is hooked (from the capture's attacher).
    pub fn set_tls_coverage(&mut self, tgid: u32, coverage: Coverage) {
        if self.tls_coverage.len() >= MAX_TLS_PROCESSES {
            self.tls_coverage.clear();
        }
        self.tls_coverage.insert(tgid, coverage);
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
        if self.forget(id) {
            self.stats.conns_evicted += 1;
        }
    }

    /// Removes a connection without its close: whatever it had open is abandoned.
    fn forget(&mut self, id: ConnId) -> bool {
        let Some(mut c) = self.conns.remove(&id) else {
            return false;
        };
        for span in c.open.drain() {
            self.tracer.abandon(span);
        }
        true
    }

    /// After ring-buffer losses: drops the connections quiet since `quiet_since_ns` whose
    /// socket the kernel no longer tracks (`tracked`), since their close went with the lost
    /// records; left to the idle timeout they (and their open spans) would stay for minutes.
    pub fn reconcile(&mut self, quiet_since_ns: u64, mut tracked: impl FnMut(ConnId) -> bool) {
        let gone: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(id, c)| c.last_seen_ns < quiet_since_ns && !tracked(**id))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if self.forget(id) {
                self.stats.conns_close_lost += 1;
            }
        }
    }

    /// Periodic work: export lingering spans, forget idle connections.
    pub fn tick(&mut self, now_ns: u64, out: &mut Vec<SpanRecord>) {
        self.tick_at_most(now_ns, out, usize::MAX);
    }

    /// [`Pipeline::tick`] with at most `max` spans in `out`; true when more are ready (call
    /// again once `out` is handed on). A tick's spans otherwise all exist at once: at
    /// pipelined-Redis rates that was ~16k records, whose memory the allocator then kept.
    pub fn tick_at_most(&mut self, now_ns: u64, out: &mut Vec<SpanRecord>, max: usize) -> bool {
        let red = &mut self.red;
        self.tracer
            .flush_at_most(now_ns, out, max, &mut |o| red.observe(o))
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
        self.tls_waiting.retain(|_, (_, ts)| *ts >= cutoff);
        self.tracer.expire(now_ns);
    }
}

/// Who moved an event's bytes: the thread, and in a Go process the goroutine.
#[derive(Clone, Copy)]
struct Actor {
    tid: u32,
    goroutine: u64,
}

/// The parts of the pipeline that decoded exchanges act on, borrowed apart from the connection
/// table so a connection can be updated in place.
struct Sink<'a> {
    tracer: &'a mut Tracer,
    stats: &'a mut PipelineStats,
    to_ignore: &'a mut Vec<ConnId>,
    db_servers: &'a HashMap<ServerKey, Arc<ProcessInfo>>,
}

impl Sink<'_> {
    /// Applies what a connection's decoder found to the tracer.
    fn apply(&mut self, conn: &mut Conn, id: ConnId, steps: &mut Vec<Step>, actor: Actor) {
        for step in steps.drain(..) {
            let span = |conn: &Conn, id: u64| conn.open.get(id).flatten();
            match step {
                Step::Begin { id, call, partial } => {
                    let span = self.start(conn, actor, id, call);
                    if let (true, Some(span)) = (partial, span) {
                        self.tracer.mark_partial(span);
                    }
                    conn.open.insert(id, span);
                }
                Step::RequestDone { id, body } => {
                    if let Some(span) = span(conn, id) {
                        self.tracer.request_ended(span, body);
                    }
                }
                Step::Outcome { id, outcome } => {
                    if let Some(span) = span(conn, id) {
                        self.tracer.outcome(span, outcome);
                    }
                }
                Step::Partial { id } => {
                    if let Some(span) = span(conn, id) {
                        self.tracer.mark_partial(span);
                    }
                }
                Step::End {
                    id,
                    end_ns,
                    body,
                    error,
                } => {
                    if let Some(Some(span)) = conn.open.remove(id) {
                        // Looked up at the end: a server reads a connection's first call
                        // after its client sent it.
                        if let Some(server) = (!self.db_servers.is_empty())
                            .then_some(conn.endpoints)
                            .flatten()
                            .and_then(|e| self.db_servers.get(&ServerKey::new(e.peer, e.netns)))
                        {
                            self.tracer.peer_process(span, server);
                        }
                        self.tracer.finished(span, end_ns, body, error.as_deref());
                    }
                }
                Step::Abandon { id } => {
                    if let Some(Some(span)) = conn.open.remove(id) {
                        self.tracer.abandon(span);
                    }
                }
                Step::AbandonAll => {
                    for span in conn.open.drain() {
                        self.tracer.abandon(span);
                    }
                }
                Step::Role(role) => conn.role = role,
                Step::GiveUp { ignore } => {
                    conn.decoder = None;
                    self.stats.conns_unsupported += 1;
                    if ignore {
                        self.to_ignore.push(id);
                    }
                }
            }
        }
    }

    /// Starts the span of an exchange; `id` pairs it with the other end of the connection
    /// unless earlier traffic was missed.
    fn start(&mut self, conn: &Conn, actor: Actor, id: u64, call: Call) -> Option<u64> {
        self.stats.requests += 1;
        self.tracer.request_started(RequestStart {
            tgid: conn.tgid,
            tid: actor.tid,
            goroutine: actor.goroutine,
            kind: if conn.role == Role::Server {
                SpanKind::Server
            } else {
                SpanKind::Client
            },
            endpoints: conn.endpoints,
            seq: conn.pairs.then_some(id),
            process: conn.process.clone(),
            call,
            tls: conn.tls,
        })
    }
}

#[cfg(test)]
mod tests;
