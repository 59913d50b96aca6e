//! Turns request/response lifecycles into spans and links them into trees.
//!
//! Linking rules (README "How spans are linked"):
//! 1. A SERVER span takes trace id and parent from the B3/traceparent context it received;
//!    without one it starts a new trace.
//! 2. A CLIENT span's parent is the SERVER span of the same process that is open at that moment
//!    with the same trace id (any open one when the request carries no context), preferring
//!    the same thread. When the outgoing span id differs from the one the server received, the
//!    application made its own span in between, and that id is the parent.
//! 3. A SERVER span whose connection's other end is a CLIENT span this agent saw (same address
//!    pair, same request number on the connection) is that CLIENT span's child. This beats
//!    rule 1, because applications that merely forward B3 headers pass on their caller's span
//!    id, not an id for their own outgoing call.
//!
//! The kernel reports each process's syscalls when they return, so across processes events can
//! arrive slightly out of causal order: either side of rule 3 may be seen first, and a parent
//! may appear to end microseconds before its child. Finished spans therefore linger briefly
//! before export, and a CLIENT span is stretched to cover its linked SERVER child; a pair whose
//! ends have both finished in a trace that can no longer change leaves at once.
use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use super::{
    context::{self, Sampling},
    db::{DbExchange, FactsCache},
    goroutines::{Goroutines, MAX_DEPTH, Step},
    privacy::Privacy,
    sampler::Sampler,
    span::{
        AttrValue, DbObservation, Exchange, Grpc, HttpExchange, Observation, SpanKind, SpanRecord,
    },
};
use crate::{
    capture::event::{Endpoints, GoEvent},
    process::ProcessInfo,
    protocol::{Call, Outcome},
};

/// Identifies one request on one TCP connection from either end. The ends are plain integers:
/// hashing the `SocketAddr`s themselves (enums, read back at other widths than they had been
/// written) stalled on store forwarding, ~3% of the agent's time at line rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct LinkKey {
    client: (u128, u16),
    server: (u128, u16),
    /// Loopback addresses repeat in every network namespace; others are unique as they are.
    netns: u32,
    seq: u64,
}

impl LinkKey {
    fn new(client: SocketAddr, server: SocketAddr, netns: u32, seq: u64) -> Self {
        let netns = if client.ip().is_loopback() { netns } else { 0 };
        Self {
            client: wide(client),
            server: wide(server),
            netns,
            seq,
        }
    }
}

/// An address and port as integers, IPv4 in its IPv4-mapped IPv6 form.
fn wide(a: SocketAddr) -> (u128, u16) {
    let ip = match a.ip() {
        IpAddr::V4(v) => u128::from(v.to_ipv6_mapped()),
        IpAddr::V6(v) => u128::from(v),
    };
    (ip, a.port())
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracerStats {
    pub spans_started: u64,
    pub spans_finished: u64,
    pub spans_unsampled: u64,
    /// Requests not traced because too many spans were open.
    pub spans_dropped_overflow: u64,
    /// Open spans abandoned (stream desync, or no response for too long).
    pub spans_abandoned: u64,
    pub bad_context: u64,
    /// Parent links made through rule 3.
    pub links_same_agent: u64,
    /// CLIENT spans left without a parent because several requests of their process could
    /// have made them and nothing told which (rule 2 does not guess).
    pub links_ambiguous: u64,
    /// Spans exported with `kspan.partial=true`.
    pub spans_partial: u64,
    /// Spans exported before their linger ended, lingering spans having reached their bytes.
    pub spans_linger_cut: u64,
}

struct Open {
    kind: SpanKind,
    tgid: u32,
    tid: u32,
    /// SERVER of a process whose goroutines are followed: the goroutine serving it.
    goroutine: Option<u64>,
    trace_id: u128,
    parent: Option<u64>,
    sampling: Sampling,
    /// Sampling came from this request's own headers (not inherited).
    explicit_sampling: bool,
    /// SERVER: the span id its caller sent.
    inbound_span_id: Option<u64>,
    start_ns: u64,
    end_ns: Option<u64>,
    exchange: Exchange,
    error: Option<String>,
    process: Arc<ProcessInfo>,
    /// SERVER: CLIENT spans made while serving.
    children: Vec<u64>,
    /// CLIENT: the SERVER span at the other end of the connection (rule 3).
    linked_server: Option<u64>,
    /// CLIENT: end of its linked SERVER span when that one left first, so the parent still
    /// covers its child.
    cover_end_ns: u64,
    /// The process at the other end of the connection, when rule 3 linked both ends.
    peer_process: Option<Arc<ProcessInfo>>,
    /// CLIENT: several open requests of its process could have made it; no parent was guessed.
    ambiguous: bool,
    /// Rule 3 may pair it with the other end of its connection (it has a link key).
    linkable: bool,
    /// Finished and lingering: its entry's place in the order of all entries ever lingering.
    linger_slot: Option<u64>,
}

/// Which open SERVER span made an outgoing call (rule 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pick {
    Server(u64),
    /// Several could have, and nothing tells which.
    Ambiguous,
    None,
}

/// What the connection layer knows when a request begins.
pub struct RequestStart {
    /// The process and thread that moved the request's first bytes.
    pub tgid: u32,
    pub tid: u32,
    /// The goroutine register at that syscall (see `Event::goroutine`).
    pub goroutine: u64,
    pub kind: SpanKind,
    pub endpoints: Option<Endpoints>,
    /// 0-based index of this request on its connection; `None` when earlier requests were
    /// not seen (a connection older than the agent), which rules out pairing by order.
    pub seq: Option<u64>,
    pub process: Arc<ProcessInfo>,
    pub call: Call,
    /// The connection's bytes were read at a TLS library.
    pub tls: bool,
}

pub struct Tracer {
    /// Boxed: a table sized for a burst keeps its buckets, which then hold a pointer each, not
    /// a whole span.
    spans: HashMap<u64, Box<Open>>,
    open_servers: HashMap<u32, Vec<u64>>,
    /// Processes whose threads do not each serve one request at a time: a thread was seen
    /// starting a request while its previous one was open (an event loop, a work-stealing
    /// scheduler), so which thread makes a call does not tell which request it serves.
    multiplexed: HashSet<u32>,
    goroutines: Goroutines,
    clients_by_key: HashMap<LinkKey, (u64, u64)>,
    waiting_servers: HashMap<LinkKey, (u64, u64)>,
    /// Finished spans waiting out the linger: (ready at, id, bytes held); id 0 for a span
    /// that left early (see [`Tracer::unlinger`]).
    lingering: VecDeque<(u64, u64, usize)>,
    /// Entries taken from `lingering` so far: a span's `linger_slot` less it is its index.
    lingering_taken: u64,
    /// Finished spans nothing can change any more (see [`Tracer::settled`]): they leave at
    /// the next flush instead of lingering.
    ready: VecDeque<u64>,
    lingering_bytes: usize,
    /// Beyond it the oldest lingering spans leave early.
    max_linger_bytes: usize,
    /// When the link tables are next swept of entries whose other end never came.
    next_link_sweep_ns: u64,
    linger_ns: u64,
    max_open: usize,
    /// Monotonic → Unix epoch offset.
    clock_offset_ns: i128,
    privacy: Privacy,
    sampler: Sampler,
    sql_facts: FactsCache,
    pub stats: TracerStats,
}

/// Spans whose records are made together (see [`Tracer::warm`]).
const AHEAD: usize = 16;

/// Asks for the cache lines of `span` and of the strings `record` reads from it.
fn prefetch(span: &Open) {
    prefetch_bytes((span as *const Open).cast(), size_of::<Open>());
    if let Exchange::Http(h) = &span.exchange {
        prefetch_bytes(h.target.as_ptr(), h.target.len().min(128));
        if let Some(host) = &h.host {
            prefetch_bytes(host.as_ptr(), 1);
        }
    }
}

/// A hint to load `len` bytes from `p`: no fault, no effect on what the code reads.
fn prefetch_bytes(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        for offset in (0..len).step_by(64) {
            // SAFETY: a prefetch dereferences nothing and never faults; SSE is in x86_64's
            // baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(offset).cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

const LINK_TTL_NS: u64 = 10_000_000_000;
const LINK_SWEEP_NS: u64 = 1_000_000_000;
const MAX_LINK_ENTRIES: usize = 65_536;

/// Spans a trace correction walks at most (and ancestors a finality check climbs).
const MAX_PASS_DOWN: usize = 1024;

/// What a lingering span holds beyond its fields and strings, counted against
/// `--linger-mb` so that the bound is one of memory: its entries in the span, link and linger
/// tables, the allocator's size-class rounding, and what churn leaves unused in the
/// allocator's pages. Measured at HTTP/2 saturation, where lingering spans sat at the bound:
/// RSS grew 1,067 bytes per lingering span (16.6k spans fewer for 8 MiB less), of which the
/// fields and strings counted 504.
const LINGER_OVERHEAD: usize = 560;
/// An exchange with no response after this long is given up.
const OPEN_TTL_NS: u64 = 600_000_000_000;

/// Gives back most of a table's room once it holds a quarter or less of it.
fn shrink<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>) {
    if m.capacity() > 4 * m.len().max(1024) {
        m.shrink_to(2 * m.len());
    }
}

fn new_span_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

fn new_trace_id() -> u128 {
    loop {
        let id: u128 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

impl Tracer {
    pub fn new(
        linger_ns: u64,
        max_open: usize,
        max_linger_bytes: usize,
        clock_offset_ns: i128,
        privacy: Privacy,
        sampler: Sampler,
    ) -> Self {
        Self {
            spans: HashMap::default(),
            open_servers: HashMap::default(),
            multiplexed: HashSet::default(),
            goroutines: Goroutines::default(),
            clients_by_key: HashMap::default(),
            waiting_servers: HashMap::default(),
            lingering: VecDeque::new(),
            lingering_taken: 0,
            ready: VecDeque::new(),
            lingering_bytes: 0,
            max_linger_bytes,
            next_link_sweep_ns: 0,
            linger_ns,
            max_open,
            clock_offset_ns,
            privacy,
            sampler,
            sql_facts: FactsCache::default(),
            stats: TracerStats::default(),
        }
    }

    pub fn open_spans(&self) -> usize {
        self.spans.len()
    }

    /// Starts a span for a request; `None` when the span table is full (counted).
    pub fn request_started(&mut self, r: RequestStart) -> Option<u64> {
        if self.spans.len() >= self.max_open {
            self.stats.spans_dropped_overflow += 1;
            return None;
        }
        let (ctx, start_ns, exchange) = match r.call {
            Call::Http(mut head) => {
                let ctx = match context::extract(&head.headers) {
                    Ok(c) => c,
                    Err(_) => {
                        self.stats.bad_context += 1;
                        None
                    }
                };
                let exchange = HttpExchange {
                    grpc: Grpc::from_request(&head.target, head.headers.get("content-type")),
                    host: head.headers.take("host"),
                    user_agent: head.headers.take("user-agent"),
                    local: r.endpoints.map(|e| e.local),
                    peer: r.endpoints.map(|e| e.peer),
                    captured_headers: head
                        .headers
                        .iter()
                        .filter(|(n, _)| self.privacy.captured.contains(n))
                        .map(|(n, v)| (n, v.to_string()))
                        .collect(),
                    method: head.method,
                    target: head.target,
                    version: head.version,
                    tls: r.tls,
                    ..Default::default()
                };
                (ctx, head.start_ns, Exchange::Http(exchange))
            }
            Call::Db(call) => {
                let start_ns = call.start_ns;
                let exchange = DbExchange {
                    sql: self.sql_facts.get(&call),
                    call,
                    peer: r.endpoints.map(|e| e.peer),
                    ..Default::default()
                };
                (None, start_ns, Exchange::Db(exchange))
            }
        };
        let id = new_span_id();
        let explicit = ctx.map(|c| c.sampling).unwrap_or(Sampling::Unset);
        let ids = ctx.and_then(|c| c.ids);
        let mut span = Open {
            kind: r.kind,
            tgid: r.tgid,
            tid: r.tid,
            goroutine: None,
            trace_id: 0,
            parent: None,
            sampling: explicit,
            explicit_sampling: explicit != Sampling::Unset,
            inbound_span_id: None,
            start_ns,
            end_ns: None,
            exchange,
            error: None,
            process: r.process,
            children: Vec::new(),
            linked_server: None,
            cover_end_ns: 0,
            peer_process: None,
            ambiguous: false,
            linkable: r.endpoints.is_some() && r.seq.is_some(),
            linger_slot: None,
        };
        match r.kind {
            SpanKind::Server => {
                match ids {
                    Some(ids) => {
                        span.trace_id = ids.trace_id;
                        span.parent = Some(ids.span_id);
                        span.inbound_span_id = Some(ids.span_id);
                    }
                    None => span.trace_id = new_trace_id(),
                }
                self.note_threading(r.tgid, r.tid);
                if self.goroutines.follows(r.tgid) {
                    span.goroutine = Some(self.goroutines.acting(r.tgid, r.goroutine));
                }
                self.spans.insert(id, Box::new(span));
                self.open_servers.entry(r.tgid).or_default().push(id);
                if let (Some(e), Some(seq)) = (r.endpoints, r.seq) {
                    let key = LinkKey::new(e.peer, e.local, e.netns, seq);
                    match self.clients_by_key.remove(&key) {
                        Some((client, _)) => self.link(id, client),
                        None => self.insert_link(true, key, id, start_ns),
                    }
                }
            }
            SpanKind::Client => {
                let caller = (r.tgid, r.tid, r.goroutine);
                let server = match self.pick_server(caller, ids.map(|i| i.trace_id)) {
                    Pick::Server(s) => Some(s),
                    Pick::Ambiguous => {
                        self.stats.links_ambiguous += 1;
                        span.ambiguous = true;
                        None
                    }
                    Pick::None => None,
                };
                match (ids, server) {
                    (Some(ids), Some(s)) => {
                        span.trace_id = ids.trace_id;
                        let inbound = self.spans.get(&s).and_then(|o| o.inbound_span_id);
                        span.parent = Some(if inbound == Some(ids.span_id) {
                            s
                        } else {
                            ids.span_id
                        });
                    }
                    (Some(ids), None) => {
                        span.trace_id = ids.trace_id;
                        span.parent = Some(ids.span_id);
                    }
                    (None, Some(s)) => {
                        span.parent = Some(s);
                        span.trace_id = self
                            .spans
                            .get(&s)
                            .map(|o| o.trace_id)
                            .unwrap_or_else(new_trace_id);
                    }
                    (None, None) => span.trace_id = new_trace_id(),
                }
                if let Some(s) = server.and_then(|s| self.spans.get_mut(&s)) {
                    s.children.push(id);
                    if !span.explicit_sampling {
                        span.sampling = s.sampling;
                    }
                }
                self.spans.insert(id, Box::new(span));
                if let (Some(e), Some(seq)) = (r.endpoints, r.seq) {
                    let key = LinkKey::new(e.local, e.peer, e.netns, seq);
                    match self.waiting_servers.remove(&key) {
                        Some((srv, _)) => self.link(srv, id),
                        None => self.insert_link(false, key, id, start_ns),
                    }
                }
            }
        }
        self.stats.spans_started += 1;
        Some(id)
    }

    fn insert_link(&mut self, server_side: bool, key: LinkKey, id: u64, ts: u64) {
        let map = if server_side {
            &mut self.waiting_servers
        } else {
            &mut self.clients_by_key
        };
        if map.len() < MAX_LINK_ENTRIES {
            map.insert(key, (id, ts));
        }
    }

    /// The open SERVER span of `tgid` that made an outgoing request. With a trace id, the
    /// open span of that trace (the trace is right whichever is chosen; the same thread, then
    /// the most recent). Without one, in a process whose goroutines are followed: by goroutine
    /// ([`Tracer::pick_by_goroutine`]). Otherwise the only open span of the process, else the
    /// only one started on the calling thread, when the process's threads serve one request at
    /// a time and it is not a Go program; else nobody knows, and no parent is guessed.
    fn pick_server(&self, (tgid, tid, g): (u32, u32, u64), trace_id: Option<u128>) -> Pick {
        let Some(candidates) = self.open_servers.get(&tgid) else {
            return Pick::None;
        };
        let open = candidates
            .iter()
            .filter_map(|&id| self.spans.get(&id).map(|s| (id, s)));
        if let Some(t) = trace_id {
            return open
                .filter(|(_, s)| s.trace_id == t)
                .max_by_key(|(id, s)| (s.tid == tid, s.start_ns, *id))
                .map_or(Pick::None, |(id, _)| Pick::Server(id));
        }
        if self.goroutines.follows(tgid) {
            return self.pick_by_goroutine(tgid, g, candidates);
        }
        // One pass, no allocation: this runs for every outgoing call.
        let (mut count, mut last, mut on_thread) = (0, None, (0, 0));
        let multiplexed = self.multiplexed.contains(&tgid);
        for (id, s) in open {
            count += 1;
            last = Some((id, s));
            if s.tid == tid {
                on_thread = (on_thread.0 + 1, id);
            }
            // Where threads tell nothing, a second open request settles it: an event loop
            // has all its connections' requests open, each a cache miss to look at.
            if count > 1 && (multiplexed || s.process.go()) {
                return Pick::Ambiguous;
            }
        }
        match (count, last, on_thread) {
            (_, None, _) => Pick::None,
            (1, Some((id, _)), _) => Pick::Server(id),
            (_, Some(_), (1, id)) => Pick::Server(id),
            _ => Pick::Ambiguous,
        }
    }

    /// Rule 2 in a process whose goroutines are followed: the open SERVER span served by the
    /// goroutine the call was made for, else by its creator (created while that span was
    /// open), and so on up. Nothing found while requests are open: nobody knows.
    fn pick_by_goroutine(&self, tgid: u32, g: u64, candidates: &[u64]) -> Pick {
        let acting = self.goroutines.acting(tgid, g);
        let mut chain = [Step::default(); MAX_DEPTH];
        let mut depth = 0;
        for (slot, step) in chain.iter_mut().zip(self.goroutines.lineage(tgid, acting)) {
            *slot = step;
            depth += 1;
        }
        let chain = &chain[..depth];
        // One pass over the open spans: the nearest step that owns one, and how many it owns.
        let (mut nearest, mut owners, mut owner) = (usize::MAX, 0, 0);
        for &id in candidates {
            let Some(s) = self.spans.get(&id) else {
                continue;
            };
            let Some(at) = chain
                .iter()
                .position(|c| s.goroutine == Some(c.g) && s.start_ns <= c.since_ns)
            else {
                continue;
            };
            if at < nearest {
                (nearest, owners, owner) = (at, 1, id);
            } else if at == nearest {
                owners += 1;
            }
        }
        match owners {
            1 => Pick::Server(owner),
            0 if candidates.is_empty() => Pick::None,
            _ => Pick::Ambiguous,
        }
    }

    /// What the Go runtime probes saw (goroutine lineage and hand-offs).
    pub fn goroutine_event(&mut self, tgid: u32, g: u64, ev: GoEvent, ts_ns: u64) {
        self.goroutines.observe(tgid, g, ev, ts_ns);
    }

    /// Process `tgid` exec'ed: what was known of its goroutines is void.
    pub fn process_exec(&mut self, tgid: u32) {
        self.goroutines.forget(tgid);
    }

    /// A request starting on a thread whose previous request is still open shows that the
    /// process's threads do not each serve one request.
    fn note_threading(&mut self, tgid: u32, tid: u32) {
        if self.multiplexed.contains(&tgid) {
            return;
        }
        let busy = self.open_servers.get(&tgid).is_some_and(|ids| {
            ids.iter()
                .any(|id| self.spans.get(id).is_some_and(|s| s.tid == tid))
        });
        if busy {
            if self.multiplexed.len() >= MAX_LINK_ENTRIES {
                self.multiplexed.clear();
            }
            self.multiplexed.insert(tgid);
        }
    }

    /// A finished span that no later event can change, so it need not linger: a CLIENT span
    /// that rule 3 cannot pair (a data-store call whose server side is not decoded) and whose
    /// trace is final ([`Tracer::trace_final`]).
    fn settled(&self, id: u64) -> bool {
        self.spans
            .get(&id)
            .is_some_and(|s| s.kind == SpanKind::Client && !s.linkable && self.trace_final(s))
    }

    /// Both ends of a rule-3 pair have finished in a trace that is final: no later event
    /// changes either (the client is stretched over its server when it leaves, first).
    fn pair_settled(&self, client: u64, server: u64) -> bool {
        let (Some(c), Some(s)) = (self.spans.get(&client), self.spans.get(&server)) else {
            return false;
        };
        c.linked_server == Some(server)
            && s.parent == Some(client)
            && c.end_ns.is_some()
            && s.end_ns.is_some()
            && self.trace_final(c)
    }

    /// A CLIENT span's trace can no longer change: it has no parent here, or a SERVER parent
    /// that is unpairable or paired with a caller whose own trace is final (a later pairing
    /// above would hand the corrected trace down, [`Tracer::pass_down`]).
    fn trace_final(&self, client: &Open) -> bool {
        let mut c = client;
        for _ in 0..MAX_PASS_DOWN {
            let Some(p) = c.parent.and_then(|p| self.spans.get(&p)) else {
                return true;
            };
            if p.kind != SpanKind::Server || (p.linkable && p.peer_process.is_none()) {
                return false;
            }
            // Paired, so its trace is its caller's: final when the caller's is.
            match p.parent.and_then(|x| self.spans.get(&x)) {
                Some(caller) if p.linkable && caller.kind == SpanKind::Client => c = caller,
                _ => return true,
            }
        }
        false
    }

    /// Rule 3: `server` is the far end of `client`.
    fn link(&mut self, server: u64, client: u64) {
        let Some(c) = self.spans.get_mut(&client) else {
            return;
        };
        c.linked_server = Some(server);
        let (trace_id, sampling, explicit) = (c.trace_id, c.sampling, c.explicit_sampling);
        let client_process = c.process.clone();
        let Some(s) = self.spans.get_mut(&server) else {
            return;
        };
        s.parent = Some(client);
        s.peer_process = Some(client_process);
        let server_process = s.process.clone();
        s.trace_id = trace_id;
        if explicit || !s.explicit_sampling {
            s.sampling = sampling;
        }
        self.pass_down(server, trace_id);
        if let Some(c) = self.spans.get_mut(&client) {
            c.peer_process = Some(server_process);
        }
        self.stats.links_same_agent += 1;
    }

    /// Outgoing calls a SERVER span made before its trace was corrected inherit the trace,
    /// and so do the servers those calls reached (rule 3), and their calls, down the tree.
    fn pass_down(&mut self, server: u64, trace_id: u128) {
        let (mut at, mut pending) = (Some(server), Vec::new());
        // A bound on the walk: pairing can never make a cycle, but a bug must not hang here.
        let mut walked = 0;
        while let Some(id) = at.take().or_else(|| pending.pop()) {
            if walked == MAX_PASS_DOWN {
                break;
            }
            walked += 1;
            let Some(s) = self.spans.get(&id) else {
                continue;
            };
            let (children, sampling) = (s.children.clone(), s.sampling);
            for child in children {
                let Some(ch) = self.spans.get_mut(&child) else {
                    continue;
                };
                ch.trace_id = trace_id;
                if !ch.explicit_sampling {
                    ch.sampling = sampling;
                }
                let (explicit, sampling) = (ch.explicit_sampling, ch.sampling);
                let Some((next, far)) = ch
                    .linked_server
                    .and_then(|n| Some((n, self.spans.get_mut(&n)?)))
                else {
                    continue;
                };
                far.trace_id = trace_id;
                if explicit || !far.explicit_sampling {
                    far.sampling = sampling;
                }
                pending.push(next);
            }
        }
    }

    pub fn request_ended(&mut self, id: u64, body_len: u64) {
        if let Some(s) = self.spans.get_mut(&id) {
            s.exchange.set_request_body(body_len);
        }
    }

    /// The exchange's outcome as its protocol states it (status, gRPC status, store error).
    pub fn outcome(&mut self, id: u64, outcome: Outcome) {
        if let Some(s) = self.spans.get_mut(&id) {
            s.exchange.set_outcome(outcome);
        }
    }

    /// The process at the other end, when known otherwise than by linking (a data store's
    /// server, which makes no spans).
    pub fn peer_process(&mut self, id: u64, process: &Arc<ProcessInfo>) {
        if let Some(s) = self.spans.get_mut(&id) {
            s.peer_process.get_or_insert_with(|| process.clone());
        }
    }

    /// Part of the exchange could not be decoded; the span says so instead of guessing.
    pub fn mark_partial(&mut self, id: u64) {
        if let Some(s) = self.spans.get_mut(&id) {
            s.exchange.set_partial();
        }
    }

    /// The exchange is over (`error` set when it ended without a complete response).
    pub fn finished(&mut self, id: u64, end_ns: u64, response_body: u64, error: Option<&str>) {
        let Some(s) = self.spans.get_mut(&id) else {
            return;
        };
        if s.end_ns.is_some() {
            return;
        }
        s.end_ns = Some(end_ns.max(s.start_ns));
        s.exchange.set_response_body(response_body);
        s.error = error.map(str::to_string);
        let bytes = LINGER_OVERHEAD + size_of::<Open>() + s.exchange.heap_bytes();
        let pair = match s.kind {
            SpanKind::Server => s.parent.map(|client| (client, id)),
            _ => s.linked_server.map(|server| (id, server)),
        };
        if s.kind == SpanKind::Server {
            let tgid = s.tgid;
            self.close_server(tgid, id);
        }
        if let Some((client, server)) = pair {
            self.clamp_server_end(client, server);
        }
        if self.settled(id) {
            self.ready.push_back(id);
            return;
        }
        if let Some((client, server)) = pair
            && self.pair_settled(client, server)
        {
            // Neither waits out the linger: read while still in the cache, and not held.
            self.unlinger(if id == client { server } else { client });
            self.ready.push_back(client);
            self.ready.push_back(server);
            return;
        }
        let slot = self.lingering_taken + self.lingering.len() as u64;
        if let Some(s) = self.spans.get_mut(&id) {
            s.linger_slot = Some(slot);
        }
        self.lingering_bytes += bytes;
        self.lingering
            .push_back((end_ns.saturating_add(self.linger_ns), id, bytes));
    }

    /// Takes a lingering span out of the linger (its entry stays, emptied, until its turn).
    fn unlinger(&mut self, id: u64) {
        let Some(slot) = self.spans.get_mut(&id).and_then(|s| s.linger_slot.take()) else {
            return;
        };
        let Some(entry) = slot
            .checked_sub(self.lingering_taken)
            .and_then(|i| self.lingering.get_mut(usize::try_from(i).ok()?))
            .filter(|e| e.1 == id)
        else {
            return;
        };
        self.lingering_bytes -= entry.2;
        (entry.1, entry.2) = (0, 0);
    }

    /// Ends are stamped when a syscall returns, and a writer can be preempted on its way out
    /// after its reader was already woken: a server's response can be stamped after the client
    /// read it. The bytes were sent before they were read, so a SERVER span ends no later than
    /// the CLIENT span (rule 3) that received its complete response.
    fn clamp_server_end(&mut self, client: u64, server: u64) {
        let Some(c) = self.spans.get(&client) else {
            return;
        };
        let client_end = match (c.linked_server == Some(server), c.end_ns, &c.error) {
            (true, Some(end), None) => end,
            _ => return,
        };
        if let Some(s) = self.spans.get_mut(&server)
            && let Some(end) = s.end_ns.filter(|&e| e > client_end)
        {
            s.end_ns = Some(client_end.max(s.start_ns).min(end));
        }
    }

    /// A SERVER span stops being a candidate parent for outgoing calls.
    fn close_server(&mut self, tgid: u32, id: u64) {
        if let Some(list) = self.open_servers.get_mut(&tgid) {
            list.retain(|&x| x != id);
            if list.is_empty() {
                self.open_servers.remove(&tgid);
            }
        }
    }

    /// Drops an exchange whose outcome can never be known (counted).
    pub fn abandon(&mut self, id: u64) {
        // Finished spans are already on their way out; only open ones can be abandoned.
        if self.spans.get(&id).is_none_or(|s| s.end_ns.is_some()) {
            return;
        }
        if let Some(s) = self.spans.remove(&id) {
            self.close_server(s.tgid, id);
            self.stats.spans_abandoned += 1;
        }
    }

    /// Emits spans whose linger expired by `now_ns` (monotonic) and expires stale state, with
    /// no metrics.
    #[cfg(test)]
    pub fn flush(&mut self, now_ns: u64, out: &mut Vec<SpanRecord>) {
        self.flush_at_most(now_ns, out, usize::MAX, &mut |_| {});
    }

    /// Emits spans whose linger expired by `now_ns` (monotonic), until `out` holds `max`;
    /// `observe` sees every finished request, sampled or not. True when more are ready.
    pub fn flush_at_most(
        &mut self,
        now_ns: u64,
        out: &mut Vec<SpanRecord>,
        max: usize,
        observe: &mut impl FnMut(&Observation<'_>),
    ) -> bool {
        let mut batch = [0; AHEAD];
        loop {
            let room = max.saturating_sub(out.len()).min(AHEAD);
            let n = self.leaving(now_ns, &mut batch[..room]);
            if n == 0 {
                break;
            }
            self.warm(&batch[..n]);
            for &id in &batch[..n] {
                if let Some(rec) = self.record(id, observe) {
                    out.push(rec);
                }
            }
        }
        if out.len() >= max && self.next_leaves(now_ns) {
            return true;
        }
        // A scan of up to MAX_LINK_ENTRIES: once a second is enough for a 10 s lifetime.
        if now_ns >= self.next_link_sweep_ns {
            self.next_link_sweep_ns = now_ns.saturating_add(LINK_SWEEP_NS);
            let cutoff = now_ns.saturating_sub(LINK_TTL_NS);
            self.clients_by_key.retain(|_, (_, ts)| *ts >= cutoff);
            self.waiting_servers.retain(|_, (_, ts)| *ts >= cutoff);
        }
        false
    }

    /// Gives up on exchanges open longer than the limit (call rarely: it scans).
    pub fn expire(&mut self, now_ns: u64) {
        let cutoff = now_ns.saturating_sub(OPEN_TTL_NS);
        let stale: Vec<u64> = self
            .spans
            .iter()
            .filter(|(_, s)| s.end_ns.is_none() && s.start_ns < cutoff)
            .map(|(&id, _)| id)
            .collect();
        for id in stale {
            self.abandon(id);
        }
        // A burst leaves the tables sized for it (hashbrown never shrinks by itself): at
        // HTTP/2 saturation the span table reached 2^19 buckets and kept them idle.
        shrink(&mut self.spans);
        shrink(&mut self.clients_by_key);
        shrink(&mut self.waiting_servers);
        if self.lingering.capacity() > 4 * self.lingering.len().max(1024) {
            self.lingering.shrink_to(2 * self.lingering.len());
        }
        if self.ready.capacity() > 4 * self.ready.len().max(1024) {
            self.ready.shrink_to(2 * self.ready.len());
        }
    }

    /// Takes the next spans to leave (settled ones first, then those whose linger is over or
    /// that the bytes bound pushes out) into `ids`; how many.
    fn leaving(&mut self, now_ns: u64, ids: &mut [u64]) -> usize {
        let mut n = 0;
        while n < ids.len() {
            if let Some(id) = self.ready.pop_front() {
                ids[n] = id;
                n += 1;
                continue;
            }
            if !self.next_leaves(now_ns) {
                break;
            }
            let Some((ready, id, bytes)) = self.lingering.pop_front() else {
                break;
            };
            self.lingering_taken += 1;
            if id == 0 {
                continue;
            }
            if ready > now_ns {
                self.stats.spans_linger_cut += 1;
            }
            self.lingering_bytes -= bytes;
            ids[n] = id;
            n += 1;
        }
        n
    }

    /// Whether a span would leave now.
    fn next_leaves(&self, now_ns: u64) -> bool {
        !self.ready.is_empty()
            || self.lingering.front().is_some_and(|&(ready, ..)| {
                ready <= now_ns || self.lingering_bytes > self.max_linger_bytes
            })
    }

    /// Brings the spans about to leave, and the linked spans `record` reads with them, into
    /// the cache together. Finished spans wait out the linger while a third of a second of
    /// traffic passes through: each was a chain of four cache misses (table entry, span,
    /// linked entry, linked span) that `record` stalled on in turn, half its time live.
    /// Looked up in a short loop of their own, the chains of several spans overlap.
    fn warm(&self, ids: &[u64]) {
        for id in ids {
            let Some(s) = self.spans.get(id) else {
                continue;
            };
            prefetch(s);
            for other in [s.parent, s.linked_server].into_iter().flatten() {
                if let Some(o) = self.spans.get(&other) {
                    prefetch_bytes((&**o as *const Open).cast(), size_of::<Open>());
                }
            }
        }
    }

    fn record(
        &mut self,
        id: u64,
        observe: &mut impl FnMut(&Observation<'_>),
    ) -> Option<SpanRecord> {
        let s = self.spans.remove(&id)?;
        let mut start = s.start_ns;
        let mut end = s.end_ns.unwrap_or(start).max(s.cover_end_ns);
        if let Some(server) = s.linked_server.and_then(|x| self.spans.get(&x)) {
            start = start.min(server.start_ns);
            end = end.max(server.end_ns.unwrap_or(end));
        }
        // A SERVER span can be exported before the CLIENT span it is linked to (its end was
        // processed first, though the client's read returned a few ns earlier): hand its
        // bounds to the client, which is then stretched when it leaves.
        if let Some(client) = s
            .parent
            .and_then(|p| self.spans.get_mut(&p))
            .filter(|c| c.linked_server == Some(id))
        {
            client.start_ns = client.start_ns.min(start);
            client.cover_end_ns = client.cover_end_ns.max(end);
        }
        self.stats.spans_finished += 1;
        let error = s.error.clone().or_else(|| s.exchange.error(s.kind));
        let failed = s.error.is_some() || s.exchange.error(SpanKind::Client).is_some();
        // Metrics first, from the exchange as it is; the attributes then take its strings.
        observe(&observation(
            &s,
            end.saturating_sub(start),
            error.is_some(),
            failed,
        ));
        if !self.sampler.exports(s.sampling, s.trace_id) {
            self.stats.spans_unsampled += 1;
            return None;
        }
        if s.exchange.partial() {
            self.stats.spans_partial += 1;
        }
        let to_unix = |ns: u64| (ns as i128 + self.clock_offset_ns).max(0) as u64;
        let name = s.exchange.span_name();
        let mut attributes = s.exchange.attributes(s.kind, &self.privacy);
        if s.ambiguous {
            attributes.push(("kspan.link", AttrValue::Static("ambiguous")));
        }
        Some(SpanRecord {
            trace_id: s.trace_id,
            span_id: id,
            parent_span_id: s.parent,
            kind: s.kind,
            name,
            start_unix_ns: to_unix(start),
            end_unix_ns: to_unix(end),
            attributes,
            error,
            process: s.process,
        })
    }
}

/// What metrics read of a finished span.
fn observation(s: &Open, duration_ns: u64, error: bool, failed: bool) -> Observation<'_> {
    let mut o = Observation {
        kind: s.kind,
        process: &s.process,
        peer_process: s.peer_process.as_deref(),
        method: "",
        path: "",
        status: None,
        grpc: None,
        server: None,
        duration_ns,
        error,
        failed,
        db: None,
    };
    match &s.exchange {
        Exchange::Http(exchange) => {
            o.server = (s.kind == SpanKind::Client).then(|| exchange.server_endpoint());
            o.method = &exchange.method;
            o.path = exchange.path();
            o.status = exchange.status;
            o.grpc = exchange.grpc.as_ref();
        }
        Exchange::Db(d) => {
            o.server = d
                .peer
                .map(|p| (super::span::ip_string(p.ip()).into(), p.port()));
            o.db = Some(DbObservation {
                system: d.call.system,
                operation: d.operation(),
                collection: d.collection(),
                error_code: d
                    .error
                    .as_ref()
                    .map(|(code, _)| code.clone())
                    .unwrap_or_default(),
            });
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::http1::{Headers, RequestHead};

    fn tracer() -> Tracer {
        Tracer::new(
            0,
            1024,
            usize::MAX,
            0,
            Privacy::default(),
            Sampler::default(),
        )
    }

    fn process(go: bool) -> Arc<ProcessInfo> {
        Arc::new(ProcessInfo {
            pid: 7,
            comm: "svc".into(),
            exe: "/usr/bin/svc".into(),
            command_line: String::new(),
            service_name: "svc".into(),
            cgroup: Default::default(),
            k8s: None,
            runtime: crate::process::Runtime::known(go),
        })
    }

    fn start(t: &mut Tracer, kind: SpanKind, tid: u32, go: bool, b3: Option<&str>, at: u64) -> u64 {
        start_on(t, kind, (tid, 0), go, b3, at)
    }

    /// As `start`, with the goroutine register of the syscall.
    fn start_on(
        t: &mut Tracer,
        kind: SpanKind,
        (tid, goroutine): (u32, u64),
        go: bool,
        b3: Option<&str>,
        at: u64,
    ) -> u64 {
        let mut headers = Headers::default();
        if let Some(b3) = b3 {
            headers.insert("b3", b3);
        }
        let r = RequestStart {
            tid,
            goroutine,
            process: process(go),
            ..get(kind, 7, headers, at)
        };
        t.request_started(r).expect("room")
    }

    /// A `GET /` of process `tgid` on its thread `tgid`, on a connection with no known ends.
    fn get(kind: SpanKind, tgid: u32, headers: Headers, at: u64) -> RequestStart {
        RequestStart {
            tgid,
            tid: tgid,
            goroutine: 0,
            kind,
            endpoints: None,
            seq: None,
            process: process(false),
            call: Call::Http(RequestHead {
                method: "GET".into(),
                target: "/".into(),
                version: 1,
                headers,
                start_ns: at,
            }),
            tls: false,
        }
    }

    fn parent(t: &Tracer, id: u64) -> Option<u64> {
        t.spans.get(&id).and_then(|s| s.parent)
    }

    /// An HTTP request on a connection both of whose ends this agent decodes (rule 3 may pair
    /// it): `kind` CLIENT is the end at `a`, SERVER the end at `b`.
    fn start_paired(t: &mut Tracer, kind: SpanKind, tgid: u32, at: u64) -> u64 {
        start_nth(t, kind, tgid, at, 0)
    }

    /// As `start_paired`, request `seq` of the connection.
    fn start_nth(t: &mut Tracer, kind: SpanKind, tgid: u32, at: u64, seq: u64) -> u64 {
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        let (local, peer) = match kind {
            SpanKind::Client => (a, b),
            SpanKind::Server => (b, a),
        };
        let r = RequestStart {
            endpoints: Some(Endpoints {
                local,
                peer,
                netns: 1,
            }),
            seq: Some(seq),
            ..get(kind, tgid, Headers::default(), at)
        };
        t.request_started(r).expect("room")
    }

    fn lingering_tracer() -> Tracer {
        Tracer::new(
            1_000_000_000,
            1024,
            usize::MAX,
            0,
            Privacy::default(),
            Sampler::default(),
        )
    }

    /// Both ends of a pair, once finished in a final trace, leave at the next flush whichever
    /// finished first, the client stretched over its server; the first one's linger entry is
    /// emptied (no bytes held, no early leave counted).
    #[test]
    fn finished_pairs_leave_without_lingering() {
        let mut t = lingering_tracer();
        let mut out = Vec::new();
        for (server_first, at) in [(true, 100), (false, 1_000)] {
            let client = start_paired(&mut t, SpanKind::Client, 8, at + 10);
            let server = start_paired(&mut t, SpanKind::Server, 7, at);
            let (first, second) = if server_first {
                (server, client)
            } else {
                (client, server)
            };
            t.finished(first, at + 50, 0, None);
            t.flush(at + 60, &mut out);
            assert!(out.is_empty(), "the first end waits for its pair");
            assert!(t.lingering_bytes > 0);
            t.finished(second, at + 70, 0, None);
            t.flush(at + 80, &mut out);
            let ids: Vec<u64> = out.iter().map(|s| s.span_id).collect();
            assert_eq!(ids, [client, server], "server first: {server_first}");
            assert_eq!(out[0].start_unix_ns, out[1].start_unix_ns, "stretched");
            assert_eq!(out[1].parent_span_id, Some(client));
            assert_eq!(out[1].trace_id, out[0].trace_id);
            assert_eq!(t.lingering_bytes, 0);
            out.clear();
        }
        t.flush(u64::MAX, &mut out);
        assert!(out.is_empty(), "nothing left twice");
        assert_eq!(t.stats.spans_linger_cut, 0);
        assert_eq!(t.stats.spans_finished, 4);
    }

    /// The walk down a trace is bounded: a loop in the links (which pairing never makes) ends.
    #[test]
    fn passing_a_trace_down_ends_on_a_loop() {
        let mut t = lingering_tracer();
        let server = start_paired(&mut t, SpanKind::Server, 7, 100);
        // Two calls back to their own server: the walk's queue grows at every step.
        let calls = [110, 120].map(|at| start(&mut t, SpanKind::Client, 7, false, None, at));
        for call in calls {
            t.spans.get_mut(&call).expect("open").linked_server = Some(server);
        }
        assert_eq!(t.spans[&server].children, calls);
        t.pass_down(server, 42);
        assert_eq!(t.spans[&server].trace_id, 42);
        assert!(calls.iter().all(|c| t.spans[c].trace_id == 42));
    }

    /// A pair below a server whose caller is not seen yet waits: pairing the server later
    /// corrects the trace of its call and of the server that call reached.
    #[test]
    fn pairs_in_a_trace_still_open_to_correction_linger_and_take_it() {
        let mut t = lingering_tracer();
        let mut out = Vec::new();
        let middle = start_nth(&mut t, SpanKind::Server, 7, 100, 0);
        let call = start_nth(&mut t, SpanKind::Client, 7, 110, 1);
        let leaf = start_nth(&mut t, SpanKind::Server, 9, 115, 1);
        assert_eq!(
            (parent(&t, call), parent(&t, leaf)),
            (Some(middle), Some(call))
        );
        t.finished(leaf, 120, 0, None);
        t.finished(call, 130, 0, None);
        t.flush(140, &mut out);
        assert!(out.is_empty(), "the pair's trace may still change");
        let caller = start_nth(&mut t, SpanKind::Client, 8, 90, 0);
        t.finished(middle, 150, 0, None);
        t.finished(caller, 160, 0, None);
        t.flush(170, &mut out);
        let ids: Vec<u64> = out.iter().map(|s| s.span_id).collect();
        assert_eq!(ids, [caller, middle], "the top pair leaves at once");
        t.flush(u64::MAX, &mut out);
        assert_eq!(out.len(), 4);
        let trace = out[0].trace_id;
        assert!(
            out.iter().all(|s| s.trace_id == trace),
            "one trace, down to the leaf"
        );
    }

    /// A call that nothing can pair (a data-store call: its server's side is not decoded)
    /// leaves at the next flush instead of lingering; one whose parent may still be paired
    /// lingers, and leaves with the trace its parent is given when the pairing comes.
    #[test]
    fn unpairable_calls_leave_at_once_unless_their_parent_may_change() {
        let linger = 1_000_000_000;
        let mut t = Tracer::new(
            linger,
            1024,
            usize::MAX,
            0,
            Privacy::default(),
            Sampler::default(),
        );
        let mut out = Vec::new();
        let lone = start(&mut t, SpanKind::Client, 1, false, None, 10);
        t.finished(lone, 20, 0, None);
        t.flush(30, &mut out);
        assert_eq!(out.iter().map(|s| s.span_id).collect::<Vec<_>>(), [lone]);

        // tgid 7's server, whose caller (tgid 8) is seen after the call it makes has ended.
        let server = start_paired(&mut t, SpanKind::Server, 7, 100);
        let call = start(&mut t, SpanKind::Client, 7, false, None, 110);
        assert_eq!(parent(&t, call), Some(server));
        t.finished(call, 120, 0, None);
        t.flush(130, &mut out);
        assert_eq!(
            out.len(),
            1,
            "the call waits: its parent may still be paired"
        );
        let caller = start_paired(&mut t, SpanKind::Client, 8, 90);
        assert_eq!(parent(&t, server), Some(caller));
        t.finished(server, 140, 0, None);
        t.finished(caller, 150, 0, None);
        t.flush(u64::MAX, &mut out);
        let trace = |id| {
            out.iter()
                .find(|s| s.span_id == id)
                .expect("exported")
                .trace_id
        };
        assert_eq!(
            trace(call),
            trace(caller),
            "the call is in its caller's trace"
        );

        // A parent that nothing can pair (a connection older than the agent) changes no more.
        let server = start(&mut t, SpanKind::Server, 9, false, None, 200);
        let call = start(&mut t, SpanKind::Client, 9, false, None, 210);
        assert_eq!(parent(&t, call), Some(server));
        t.finished(call, 220, 0, None);
        out.clear();
        t.flush(230, &mut out);
        assert_eq!(out.iter().map(|s| s.span_id).collect::<Vec<_>>(), [call]);
    }

    /// After a burst the tables give their room back at the next expiry scan.
    #[test]
    fn a_burst_s_table_room_is_given_back() {
        let mut t = Tracer::new(
            0,
            1 << 20,
            usize::MAX,
            0,
            Privacy::default(),
            Sampler::default(),
        );
        let ids: Vec<u64> = (0..5_000)
            .map(|i| start(&mut t, SpanKind::Server, i, false, None, 10))
            .collect();
        let burst = t.spans.capacity();
        for &id in &ids {
            t.finished(id, 20, 0, None);
        }
        let mut out = Vec::new();
        t.flush(30, &mut out);
        assert_eq!((out.len(), t.spans.len()), (ids.len(), 0));
        assert!(burst > 4096, "a burst-sized table: {burst}");
        t.expire(40);
        assert!(
            t.spans.capacity() < 2048 && t.lingering.capacity() < 4096,
            "room kept: {} spans, {} lingering",
            t.spans.capacity(),
            t.lingering.capacity()
        );
    }

    /// Ready spans leave a few at a time when asked, oldest first, none lost or repeated.
    #[test]
    fn ready_spans_leave_at_most_so_many_at_a_time() {
        let mut t = tracer();
        let ids: Vec<u64> = (0..5)
            .map(|i| start(&mut t, SpanKind::Server, i, false, None, 10))
            .collect();
        for &id in &ids {
            t.finished(id, 20, 0, None);
        }
        let mut got = Vec::new();
        let mut out = Vec::new();
        let mut calls = 0;
        while t.flush_at_most(u64::MAX, &mut out, 2, &mut |_| {}) {
            assert_eq!(out.len(), 2);
            got.extend(out.drain(..).map(|s| s.span_id));
            calls += 1;
        }
        got.extend(out.drain(..).map(|s| s.span_id));
        assert_eq!((got, calls), (ids, 2));
        assert!(!t.flush_at_most(u64::MAX, &mut out, 2, &mut |_| {}) && out.is_empty());
    }

    #[test]
    fn lingering_spans_leave_early_beyond_their_bytes() {
        let one = LINGER_OVERHEAD + size_of::<Open>() + 16;
        let mut t = Tracer::new(
            1_000_000_000,
            1024,
            3 * one,
            0,
            Privacy::default(),
            Sampler::default(),
        );
        let ids: Vec<u64> = (0..5)
            .map(|i| start(&mut t, SpanKind::Server, i, false, None, 10))
            .collect();
        for &id in &ids {
            t.finished(id, 20, 0, None);
        }
        let mut out = Vec::new();
        t.flush(30, &mut out);
        // Each holds the span and its method and target (4 bytes): 3 fit in 3 × one.
        assert_eq!(out.len(), 2, "the oldest left early");
        assert_eq!(
            out.iter().map(|s| s.span_id).collect::<Vec<_>>(),
            ids[..2].to_vec()
        );
        assert_eq!(t.stats.spans_linger_cut, 2);
        assert!(t.lingering_bytes <= 3 * one);
        t.flush(2_000_000_000, &mut out);
        assert_eq!(out.len(), 5, "the rest when their linger ends");
        assert_eq!((t.lingering_bytes, t.stats.spans_linger_cut), (0, 2));
    }

    #[test]
    fn one_request_per_thread_parents_by_thread() {
        let mut t = tracer();
        let a = start(&mut t, SpanKind::Server, 1, false, None, 1);
        let b = start(&mut t, SpanKind::Server, 2, false, None, 2);
        let from_a = start(&mut t, SpanKind::Client, 1, false, None, 3);
        let from_b = start(&mut t, SpanKind::Client, 2, false, None, 4);
        assert_eq!(parent(&t, from_a), Some(a));
        assert_eq!(parent(&t, from_b), Some(b));
        assert_eq!(t.stats.links_ambiguous, 0);
    }

    #[test]
    fn an_event_loop_with_two_open_requests_gets_no_guessed_parent() {
        let mut t = tracer();
        let a = start(&mut t, SpanKind::Server, 1, false, None, 1);
        start(&mut t, SpanKind::Server, 1, false, None, 2);
        let call = start(&mut t, SpanKind::Client, 1, false, None, 3);
        assert_eq!(parent(&t, call), None);
        assert_eq!(t.stats.links_ambiguous, 1);
        // Its trace is its own, not the most recent request's.
        let traces: Vec<u128> = [a, call].iter().map(|i| t.spans[i].trace_id).collect();
        assert_ne!(traces[0], traces[1]);
        // Marked on export.
        t.finished(call, 5, 0, None);
        let mut out = Vec::new();
        t.flush(u64::MAX, &mut out);
        let rec = out.iter().find(|r| r.span_id == call).expect("exported");
        assert_eq!(
            rec.attr("kspan.link"),
            Some(&AttrValue::Static("ambiguous"))
        );
    }

    #[test]
    fn once_a_thread_serves_two_requests_threads_tell_nothing() {
        let mut t = tracer();
        start(&mut t, SpanKind::Server, 1, false, None, 1);
        start(&mut t, SpanKind::Server, 1, false, None, 2);
        let b = start(&mut t, SpanKind::Server, 2, false, None, 3);
        // Thread 2 has one open request, but work moves between this process's threads.
        let call = start(&mut t, SpanKind::Client, 2, false, None, 4);
        assert_eq!(parent(&t, call), None);
        assert_ne!(parent(&t, call), Some(b));
    }

    #[test]
    fn go_threads_never_tell_but_the_only_open_request_does() {
        let mut t = tracer();
        let a = start(&mut t, SpanKind::Server, 1, true, None, 1);
        let alone = start(&mut t, SpanKind::Client, 5, true, None, 2);
        assert_eq!(parent(&t, alone), Some(a), "one open request made it");
        start(&mut t, SpanKind::Server, 2, true, None, 3);
        let call = start(&mut t, SpanKind::Client, 1, true, None, 4);
        assert_eq!(parent(&t, call), None, "goroutines move between threads");
        assert_eq!(t.stats.links_ambiguous, 1);
    }

    #[test]
    fn goroutines_tell_which_request_made_a_call() {
        let mut t = tracer();
        let (server, client) = (SpanKind::Server, SpanKind::Client);
        let go = |t: &mut Tracer, g, ev, at| t.goroutine_event(7, g, ev, at);
        // Connection goroutines 0x10 and 0x20, created by the accept loop 0x1, serve a and b.
        go(&mut t, 0x10, GoEvent::Spawned { parent: 0x1 }, 1);
        go(&mut t, 0x20, GoEvent::Spawned { parent: 0x1 }, 1);
        let a = start_on(&mut t, server, (1, 0x10), true, None, 2);
        let b = start_on(&mut t, server, (1, 0x20), true, None, 3);
        // a's handler calls out; client connection 0xc0's writer goroutine 0x90 writes it.
        go(&mut t, 0x90, GoEvent::Writes { conn: 0xc0 }, 0);
        go(&mut t, 0x10, GoEvent::Calls { conn: 0xc0 }, 4);
        let call_a = start_on(&mut t, client, (2, 0x90), true, None, 5);
        assert_eq!(
            parent(&t, call_a),
            Some(a),
            "the writer wrote for a's goroutine"
        );
        // b fans out: goroutine 0x30, created while b is served, calls on the same connection.
        go(&mut t, 0x30, GoEvent::Spawned { parent: 0x20 }, 6);
        go(&mut t, 0x30, GoEvent::Calls { conn: 0xc0 }, 7);
        let call_b = start_on(&mut t, client, (2, 0x90), true, None, 8);
        assert_eq!(
            parent(&t, call_b),
            Some(b),
            "created by b's goroutine while b was open"
        );
        // Created by b's goroutine before b began: left over from an earlier request.
        go(&mut t, 0x40, GoEvent::Spawned { parent: 0x20 }, 2);
        let stale = start_on(&mut t, client, (1, 0x40), true, None, 9);
        assert_eq!(parent(&t, stale), None);
        assert_eq!(
            t.stats.links_ambiguous, 1,
            "requests were open: not known, not guessed"
        );
        // One goroutine serving two requests at once (an HTTP/2 connection's reader).
        start_on(&mut t, server, (1, 0x50), true, None, 10);
        start_on(&mut t, server, (1, 0x50), true, None, 11);
        let shared = start_on(&mut t, client, (1, 0x50), true, None, 12);
        assert_eq!(parent(&t, shared), None);
        assert_eq!(t.stats.links_ambiguous, 2);
        t.process_exec(7);
        let after_exec = start_on(&mut t, client, (1, 0x10), true, None, 10);
        assert_eq!(
            parent(&t, after_exec),
            None,
            "another program: goroutines unknown"
        );
    }

    #[test]
    fn a_forwarded_trace_id_picks_its_request_on_an_event_loop() {
        let mut t = tracer();
        let tid_a = "0af7651916cd43dd8448eb211c80319c";
        let a = start(
            &mut t,
            SpanKind::Server,
            1,
            false,
            Some(&format!("{tid_a}-00000000000000a1-1")),
            1,
        );
        start(
            &mut t,
            SpanKind::Server,
            1,
            false,
            Some("1af7651916cd43dd8448eb211c80319c-00000000000000b1-1"),
            2,
        );
        let call = start(
            &mut t,
            SpanKind::Client,
            1,
            false,
            Some(&format!("{tid_a}-00000000000000a1-1")),
            3,
        );
        assert_eq!(parent(&t, call), Some(a));
        assert_eq!(t.stats.links_ambiguous, 0);
    }
}
