//! The viewer's memory: the most recent traces, bounded in count and in bytes.
//!
//! Under load the pipeline finishes tens of thousands of traces a second; keeping all of them
//! would cost a copy of every span for traces nobody opens, and 10k traces would cover a fraction
//! of a second. So new traces are admitted at a bounded rate and the spans of an admitted trace
//! are all kept: a trace shown is whole as far as this agent saw it. Spans of a trace that was
//! not admitted are told apart for two admission windows (every span of a trace normally leaves
//! within one), so the trace is not admitted later in part.
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::trace::span::{AttrValue, SpanKind, SpanRecord};

/// Bounds of the store.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Traces kept at most; the oldest leave first.
    pub traces: usize,
    /// Bytes their spans may hold (as the export queue counts them), plus each trace's entry.
    pub bytes: usize,
    /// New traces admitted per second at most.
    pub per_sec: u32,
}

/// Spans kept per trace: a trace id reused by every request of a client (some load tools send
/// one fixed B3 header) must not grow one trace without bound.
pub const MAX_SPANS_PER_TRACE: usize = 1_000;

/// Bytes a trace's entry holds beyond its spans (table slot, order slot, span vector).
const TRACE_OVERHEAD: usize = 96;

/// Bits of one window's table of trace ids turned away (128 KiB).
const TURNED_BITS: usize = 1 << 20;

const WINDOW: Duration = Duration::from_secs(1);

/// What the store did, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub traces: usize,
    pub bytes: usize,
    /// Traces not kept because the admission rate was reached.
    pub traces_skipped: u64,
    /// Traces evicted to stay inside the bounds.
    pub traces_evicted: u64,
    /// Spans of kept traces past [`MAX_SPANS_PER_TRACE`].
    pub spans_cut: u64,
}

pub struct Trace {
    pub spans: Vec<SpanRecord>,
    bytes: usize,
}

impl Trace {
    pub fn has_error(&self) -> bool {
        self.spans.iter().any(|s| s.error.is_some())
    }
}

/// A search: the Jaeger query API's parameters that kspan's page uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    /// A span of this service.
    pub service: Option<String>,
    /// A span with this name (of `service` when given).
    pub operation: Option<String>,
    /// A matching span lasting at least this long.
    pub min_duration_ns: u64,
    /// A matching span lasting at most this long (0: no bound).
    pub max_duration_ns: u64,
    /// A span with an error status.
    pub errors_only: bool,
    /// A call from `service` to this peer: a service seen here, or the `address:port` of one
    /// that is not (a service-graph edge's server).
    pub peer: Option<String>,
    pub limit: usize,
}

pub struct TraceStore {
    limits: Limits,
    traces: HashMap<u128, Trace>,
    /// Trace ids oldest first (admission order); eviction takes from the front.
    order: VecDeque<u128>,
    bytes: usize,
    admission: Admission,
    stats: StoreStats,
}

impl TraceStore {
    pub fn new(limits: Limits, now: Instant) -> Self {
        Self {
            limits,
            traces: HashMap::default(),
            order: VecDeque::new(),
            bytes: 0,
            admission: Admission::new(limits.per_sec, now),
            stats: StoreStats::default(),
        }
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            traces: self.traces.len(),
            bytes: self.bytes,
            traces_skipped: self.admission.skipped,
            ..self.stats
        }
    }

    /// Keeps copies of the spans of admitted traces.
    pub fn offer(&mut self, spans: &[SpanRecord], now: Instant) {
        for s in spans {
            self.offer_one(s, now);
        }
        self.evict();
    }

    fn offer_one(&mut self, s: &SpanRecord, now: Instant) {
        let trace = match self.traces.get_mut(&s.trace_id) {
            Some(t) => t,
            None => {
                if !self.admission.admit(s.trace_id, now) {
                    return;
                }
                self.order.push_back(s.trace_id);
                self.bytes += TRACE_OVERHEAD;
                self.traces.entry(s.trace_id).or_insert(Trace {
                    spans: Vec::new(),
                    bytes: TRACE_OVERHEAD,
                })
            }
        };
        if trace.spans.len() >= MAX_SPANS_PER_TRACE {
            self.stats.spans_cut += 1;
            return;
        }
        let size = s.footprint();
        trace.spans.push(s.clone());
        trace.bytes += size;
        self.bytes += size;
    }

    fn evict(&mut self) {
        while self.traces.len() > self.limits.traces || self.bytes > self.limits.bytes {
            let Some(id) = self.order.pop_front() else {
                break;
            };
            if let Some(t) = self.traces.remove(&id) {
                self.bytes -= t.bytes;
                self.stats.traces_evicted += 1;
            }
        }
    }

    pub fn get(&self, id: u128) -> Option<&Trace> {
        self.traces.get(&id)
    }

    /// Matching traces, most recently admitted first.
    pub fn search(&self, q: &Query) -> Vec<&Trace> {
        self.order
            .iter()
            .rev()
            .filter_map(|id| self.traces.get(id))
            .filter(|t| matches(t, q))
            .take(q.limit)
            .collect()
    }

    /// Service names of the kept spans, sorted.
    pub fn services(&self) -> Vec<String> {
        self.distinct(|s| Some(s.process.service_name.as_str()))
    }

    /// Span names of `service`'s kept spans, sorted.
    pub fn operations(&self, service: &str) -> Vec<String> {
        self.distinct(|s| (s.process.service_name == service).then_some(&*s.name))
    }

    fn distinct<'a>(&'a self, pick: impl Fn(&'a SpanRecord) -> Option<&'a str>) -> Vec<String> {
        let names: HashSet<&str> = self
            .traces
            .values()
            .flat_map(|t| &t.spans)
            .filter_map(pick)
            .collect();
        let mut out: Vec<String> = names.into_iter().map(str::to_string).collect();
        out.sort();
        out
    }
}

fn matches(t: &Trace, q: &Query) -> bool {
    if q.errors_only && !t.has_error() {
        return false;
    }
    if let Some(peer) = &q.peer
        && !t
            .spans
            .iter()
            .any(|s| calls(t, s, q.service.as_deref(), peer))
    {
        return false;
    }
    let wanted = |s: &&SpanRecord| {
        let duration = s.end_unix_ns.saturating_sub(s.start_unix_ns);
        q.service
            .as_deref()
            .is_none_or(|x| s.process.service_name == x)
            && q.operation.as_deref().is_none_or(|x| s.name == x)
            && duration >= q.min_duration_ns
            && (q.max_duration_ns == 0 || duration <= q.max_duration_ns)
    };
    t.spans.iter().any(|s| wanted(&s))
}

/// Whether `s` is a call from `client` (any service when `None`) to `peer`: a SERVER span of
/// `peer` whose parent belongs to `client`, or a CLIENT span of `client` to `peer`'s address.
fn calls(t: &Trace, s: &SpanRecord, client: Option<&str>, peer: &str) -> bool {
    let is_client = |name: &str| client.is_none_or(|c| c == name);
    match s.kind {
        SpanKind::Server => {
            s.process.service_name == peer
                && s.parent_span_id
                    .and_then(|p| t.spans.iter().find(|x| x.span_id == p))
                    .is_some_and(|parent| is_client(&parent.process.service_name))
        }
        SpanKind::Client => {
            is_client(&s.process.service_name)
                && match (s.attr("server.address"), s.attr("server.port")) {
                    (Some(a), Some(AttrValue::Int(p))) => peer
                        .strip_prefix(a.as_str().unwrap_or_default())
                        .and_then(|rest| rest.strip_prefix(':'))
                        .is_some_and(|port| port.parse() == Ok(*p)),
                    _ => false,
                }
        }
    }
}

/// At most `per_sec` new traces a second; ids turned away are remembered for two windows.
struct Admission {
    per_sec: u32,
    window_start: Instant,
    admitted: u32,
    turned_now: Turned,
    turned_before: Turned,
    skipped: u64,
}

impl Admission {
    fn new(per_sec: u32, now: Instant) -> Self {
        Self {
            per_sec,
            window_start: now,
            admitted: 0,
            turned_now: Turned::default(),
            turned_before: Turned::default(),
            skipped: 0,
        }
    }

    fn admit(&mut self, id: u128, now: Instant) -> bool {
        if now.duration_since(self.window_start) >= WINDOW {
            self.window_start = now;
            self.admitted = 0;
            std::mem::swap(&mut self.turned_now, &mut self.turned_before);
            self.turned_now.clear();
        }
        if self.turned_now.contains(id) || self.turned_before.contains(id) {
            return false;
        }
        if self.admitted < self.per_sec {
            self.admitted += 1;
            return true;
        }
        self.turned_now.insert(id);
        self.skipped += 1;
        false
    }
}

/// Trace ids turned away in one window, as bits picked by a hash of the id: a lookup is a load
/// from 128 KiB, where a set of the ids was a cache miss or two per span (4% of the agent's
/// time at line rate). A new trace whose id shares a bit with one turned away is turned away
/// too, and not counted: at 100k new traces a second beyond the quota, about one in ten.
struct Turned {
    words: Vec<u64>,
    /// Any bit set (clearing an untouched table is skipped).
    used: bool,
}

impl Default for Turned {
    fn default() -> Self {
        Self {
            words: vec![0; TURNED_BITS / 64],
            used: false,
        }
    }
}

impl Turned {
    fn bit(id: u128) -> (usize, u64) {
        let mixed = ((id as u64) ^ ((id >> 64) as u64)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let bit = (mixed >> (64 - TURNED_BITS.trailing_zeros())) as usize;
        (bit / 64, 1 << (bit % 64))
    }

    fn contains(&self, id: u128) -> bool {
        let (word, mask) = Self::bit(id);
        self.words[word] & mask != 0
    }

    fn insert(&mut self, id: u128) {
        let (word, mask) = Self::bit(id);
        self.words[word] |= mask;
        self.used = true;
    }

    fn clear(&mut self) {
        if std::mem::take(&mut self.used) {
            self.words.fill(0);
        }
    }
}

/// A trace id as people paste it: 16 or 32 hex digits (B3, Jaeger), a W3C `traceparent`, or a
/// B3 single header (`{trace}-{span}-{sampled}`).
pub fn parse_trace_id(text: &str) -> Option<u128> {
    let text = text.trim();
    let id = match text.split('-').collect::<Vec<_>>().as_slice() {
        [one] => *one,
        // traceparent: version-traceid-parentid-flags.
        [version, trace, _, _] if version.len() == 2 && trace.len() == 32 => trace,
        [trace, ..] => trace,
        [] => return None,
    };
    if !(id.len() == 16 || id.len() == 32) || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(id, 16).ok().filter(|&v| v != 0)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::process::ProcessInfo;

    fn span(trace: u128, id: u64, parent: Option<u64>, service: &str) -> SpanRecord {
        SpanRecord {
            trace_id: trace,
            span_id: id,
            parent_span_id: parent,
            kind: if parent.is_some() {
                SpanKind::Server
            } else {
                SpanKind::Client
            },
            name: "GET /x".into(),
            start_unix_ns: 1_000 + id,
            end_unix_ns: 2_000 + id,
            attributes: vec![("http.request.method", AttrValue::Static("GET"))],
            error: None,
            process: Arc::new(ProcessInfo {
                service_name: service.into(),
                ..ProcessInfo::default()
            }),
        }
    }

    fn limits(traces: usize, bytes: usize, per_sec: u32) -> Limits {
        Limits {
            traces,
            bytes,
            per_sec,
        }
    }

    #[test]
    fn the_oldest_traces_leave_at_the_count_bound() {
        let now = Instant::now();
        let mut store = TraceStore::new(limits(3, usize::MAX, 100), now);
        for t in 1..=5u128 {
            store.offer(&[span(t, 1, None, "a"), span(t, 2, Some(1), "b")], now);
        }
        let kept: Vec<u128> = store
            .search(&Query {
                limit: 10,
                ..Query::default()
            })
            .iter()
            .map(|t| t.spans[0].trace_id)
            .collect();
        assert_eq!(kept, vec![5, 4, 3], "newest first, the two oldest evicted");
        assert_eq!(store.stats().traces_evicted, 2);
        assert_eq!(store.get(5).map(|t| t.spans.len()), Some(2));
    }

    #[test]
    fn the_byte_bound_holds_and_is_given_back_on_eviction() {
        let now = Instant::now();
        let one = span(1, 1, None, "a").footprint() + TRACE_OVERHEAD;
        let mut store = TraceStore::new(limits(1000, 3 * one, 100), now);
        for t in 1..=10u128 {
            store.offer(&[span(t, 1, None, "a")], now);
            assert!(store.stats().bytes <= 3 * one);
        }
        assert_eq!(store.stats().traces, 3);
        assert_eq!(store.stats().bytes, 3 * one);
        assert_eq!(store.stats().traces_evicted, 7);
    }

    /// The cost of keeping turned-away ids in bits, measured: at 100k a second, about one new
    /// trace in ten is turned away (and left uncounted) for sharing a bit.
    #[test]
    fn turned_away_ids_collide_about_one_in_ten_at_100k_a_second() {
        let t0 = Instant::now();
        let mut a = Admission::new(1, t0);
        let ids = |from: u128| {
            (from..from + 100_000)
                .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835))
        };
        assert!(a.admit(u128::MAX, t0), "the window's one admission");
        for id in ids(0) {
            assert!(!a.admit(id, t0));
        }
        let counted = a.skipped as f64 / 100_000.0;
        assert!((0.94..0.97).contains(&counted), "counted {counted}");
        // Next window: new ids are admitted unless they share a bit with last window's.
        let later = t0 + WINDOW;
        a.admit(0, later);
        a.per_sec = u32::MAX;
        let shared = ids(1 << 40).filter(|&id| !a.admit(id, later)).count() as f64 / 100_000.0;
        assert!((0.07..0.12).contains(&shared), "shared {shared}");
    }

    #[test]
    fn admission_is_per_trace_so_kept_traces_are_whole() {
        let t0 = Instant::now();
        let mut store = TraceStore::new(limits(1000, usize::MAX, 2), t0);
        // Three new traces in one window: the third is turned away, and so is its later span.
        store.offer(&[span(1, 1, None, "a"), span(2, 1, None, "a")], t0);
        store.offer(&[span(3, 1, None, "a")], t0);
        let later = t0 + Duration::from_millis(1500);
        store.offer(&[span(3, 2, Some(1), "b"), span(1, 2, Some(1), "b")], later);
        assert!(store.get(3).is_none(), "not admitted in part later");
        assert_eq!(store.get(1).map(|t| t.spans.len()), Some(2), "whole");
        assert_eq!(
            store.stats().traces_skipped,
            1,
            "one trace turned away, counted once"
        );
        // A new window admits new traces again.
        store.offer(&[span(4, 1, None, "a")], later);
        assert!(store.get(4).is_some());
    }

    #[test]
    fn one_trace_holds_a_bounded_number_of_spans() {
        let now = Instant::now();
        let mut store = TraceStore::new(limits(10, usize::MAX, 10), now);
        let spans: Vec<_> = (1..=MAX_SPANS_PER_TRACE as u64 + 5)
            .map(|i| span(7, i, None, "a"))
            .collect();
        store.offer(&spans, now);
        assert_eq!(
            store.get(7).map(|t| t.spans.len()),
            Some(MAX_SPANS_PER_TRACE)
        );
        assert_eq!(store.stats().spans_cut, 5);
    }

    #[test]
    fn filters_select_by_service_operation_duration_error_and_peer() {
        let now = Instant::now();
        let mut store = TraceStore::new(limits(100, usize::MAX, 100), now);
        let mut slow = span(1, 2, Some(1), "back");
        slow.end_unix_ns = slow.start_unix_ns + 50_000_000;
        slow.name = "GET /slow".into();
        store.offer(&[span(1, 1, None, "front"), slow], now);
        let mut failed = span(2, 1, None, "front");
        failed.error = Some("500".into());
        failed
            .attributes
            .push(("server.address", AttrValue::Static("10.0.0.9")));
        failed
            .attributes
            .push(("server.port", AttrValue::Int(6379)));
        store.offer(&[failed], now);
        let ids = |q: Query| -> Vec<u128> {
            store
                .search(&Query {
                    limit: if q.limit == 0 { 10 } else { q.limit },
                    ..q
                })
                .iter()
                .map(|t| t.spans[0].trace_id)
                .collect()
        };
        let by = |s: &str| Some(s.to_string());
        assert_eq!(
            ids(Query {
                service: by("back"),
                ..Query::default()
            }),
            vec![1]
        );
        assert_eq!(
            ids(Query {
                service: by("front"),
                ..Query::default()
            }),
            vec![2, 1]
        );
        assert_eq!(
            ids(Query {
                operation: by("GET /slow"),
                ..Query::default()
            }),
            vec![1]
        );
        assert_eq!(
            ids(Query {
                service: by("front"),
                min_duration_ns: 10_000_000,
                ..Query::default()
            }),
            Vec::<u128>::new(),
            "the slow span is back's"
        );
        assert_eq!(
            ids(Query {
                min_duration_ns: 10_000_000,
                ..Query::default()
            }),
            vec![1]
        );
        assert_eq!(
            ids(Query {
                errors_only: true,
                ..Query::default()
            }),
            vec![2]
        );
        // Edges: a linked pair (front → back) and a call to an address seen from one end.
        assert_eq!(
            ids(Query {
                service: by("front"),
                peer: by("back"),
                ..Query::default()
            }),
            vec![1]
        );
        assert_eq!(
            ids(Query {
                service: by("front"),
                peer: by("10.0.0.9:6379"),
                ..Query::default()
            }),
            vec![2]
        );
        assert_eq!(
            ids(Query {
                service: by("back"),
                peer: by("front"),
                ..Query::default()
            }),
            Vec::<u128>::new(),
            "edges have a direction"
        );
        assert_eq!(
            ids(Query {
                limit: 1,
                ..Query::default()
            }),
            vec![2]
        );
        let services = store.services();
        assert_eq!(services[0], "back");
        assert_eq!(store.operations("back"), vec!["GET /slow".to_string()]);
        assert_eq!(services[1], "front");
    }

    #[test]
    fn trace_ids_are_read_as_people_paste_them() {
        let id = 0x4bf92f3577b34da6a3ce929d0e0e4736u128;
        assert_eq!(parse_trace_id("4bf92f3577b34da6a3ce929d0e0e4736"), Some(id));
        assert_eq!(
            parse_trace_id(" 4BF92F3577B34DA6A3CE929D0E0E4736 "),
            Some(id)
        );
        assert_eq!(
            parse_trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some(id)
        );
        assert_eq!(parse_trace_id("a3ce929d0e0e4736"), Some(0xa3ce929d0e0e4736));
        assert_eq!(
            parse_trace_id("a3ce929d0e0e4736-00f067aa0ba902b7-1"),
            Some(0xa3ce929d0e0e4736),
            "B3 single header"
        );
        for bad in [
            "",
            "xyz",
            "123",
            "00000000000000000000000000000000",
            "4bf92f3577b34da6a3ce929d0e0e473g",
        ] {
            assert_eq!(parse_trace_id(bad), None, "{bad:?}");
        }
    }
}
