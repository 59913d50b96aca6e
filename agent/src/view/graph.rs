//! The service map: the service-graph series `/metrics` serves, turned into rates, error ratios
//! and percentiles over the last minute (from the difference between two snapshots of the same
//! cumulative counters, as Prometheus' `rate` and `histogram_quantile` would compute them).
use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use rustc_hash::FxHashMap as HashMap;
use serde_json::{Value, json};

use crate::metrics::red::{BOUNDS, EdgeTotals};

/// How far back rates and percentiles look.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Snapshots of every edge's totals, oldest first, spanning a little over [`WINDOW`].
#[derive(Default)]
pub struct GraphHistory {
    snapshots: VecDeque<(Instant, Vec<EdgeTotals>)>,
}

impl GraphHistory {
    pub fn record(&mut self, now: Instant, edges: Vec<EdgeTotals>) {
        self.snapshots.push_back((now, edges));
        // Keep one snapshot at least WINDOW old: the window's start.
        while self
            .snapshots
            .get(1)
            .is_some_and(|(t, _)| now.duration_since(*t) >= WINDOW)
        {
            self.snapshots.pop_front();
        }
    }

    /// Nodes and edges, each edge with its totals and, over the window, its rate, error ratio
    /// (`null` when no request ended in the window) and p50/p99 in ms (since start when none
    /// did, as `latency_over` says).
    pub fn to_json(&self) -> Value {
        let Some((now, latest)) = self.snapshots.back() else {
            return json!({"window_seconds": 0, "nodes": [], "edges": []});
        };
        let (then, earlier) = match self.snapshots.front() {
            Some((t, e)) if t < now => (*t, e.as_slice()),
            _ => (*now, &[][..]),
        };
        let seconds = now.duration_since(then).as_secs_f64();
        // Looked up per edge: up to the series cap of them.
        let earlier: HashMap<(&str, &str), &EdgeTotals> = earlier
            .iter()
            .map(|b| ((b.client.as_str(), b.server.as_str()), b))
            .collect();
        let mut nodes: BTreeMap<&str, &str> = BTreeMap::new();
        let mut edges = Vec::new();
        for e in latest {
            nodes.entry(&e.client).or_insert("service");
            let kind = match e.connection_type.as_str() {
                "" => "service",
                other => other,
            };
            nodes.insert(&e.server, kind);
            let before = earlier
                .get(&(e.client.as_str(), e.server.as_str()))
                .copied();
            edges.push(edge_json(e, before, seconds));
        }
        let nodes: Vec<Value> = nodes
            .into_iter()
            .map(|(id, kind)| json!({"id": id, "kind": kind}))
            .collect();
        json!({"window_seconds": seconds.round(), "nodes": nodes, "edges": edges})
    }

    /// Jaeger's `/api/dependencies` shape: parent, child and calls since start.
    pub fn dependencies(&self) -> Value {
        let edges = self.snapshots.back().map_or(&[][..], |(_, e)| e.as_slice());
        let data: Vec<Value> = edges
            .iter()
            .map(|e| json!({"parent": e.client, "child": e.server, "callCount": e.requests}))
            .collect();
        json!({ "data": data })
    }
}

fn edge_json(e: &EdgeTotals, before: Option<&EdgeTotals>, seconds: f64) -> Value {
    let (requests, failed, buckets) = match before {
        Some(b) => (
            e.requests.saturating_sub(b.requests),
            e.failed.saturating_sub(b.failed),
            std::array::from_fn(|i| e.buckets[i].saturating_sub(b.buckets[i])),
        ),
        None => (e.requests, e.failed, e.buckets),
    };
    let rate = if seconds > 0.0 {
        requests as f64 / seconds
    } else {
        0.0
    };
    // An edge quiet in the window still shows how its requests went: since start.
    let (latency_over, buckets) = if requests > 0 {
        ("window", buckets)
    } else {
        ("start", e.buckets)
    };
    let ms = |q: f64| quantile(&buckets, q).map(|s| (s * 1e6).round() / 1e3);
    json!({
        "client": e.client,
        "server": e.server,
        "connection_type": e.connection_type,
        "requests_total": e.requests,
        "failed_total": e.failed,
        "requests": requests,
        "rate": (rate * 100.0).round() / 100.0,
        "error_ratio": (requests > 0).then(|| failed as f64 / requests as f64),
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "latency_over": latency_over,
    })
}

/// The `q` quantile in seconds, interpolated linearly inside its bucket as Prometheus'
/// `histogram_quantile` does (the first bucket starts at 0; the +Inf bucket reads as the highest
/// bound).
pub fn quantile(buckets: &[u64; BOUNDS.len() + 1], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &n) in buckets.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let Some(&upper) = BOUNDS.get(i) else {
                return BOUNDS.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { BOUNDS[i - 1] };
            return Some(lower + (upper - lower) * (rank - below as f64) / n as f64);
        }
        below += n;
    }
    BOUNDS.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(client: &str, server: &str, kind: &str, requests: u64, failed: u64) -> EdgeTotals {
        let mut buckets = [0; BOUNDS.len() + 1];
        // All in the 10–25 ms bucket.
        buckets[2] = requests;
        EdgeTotals {
            client: client.into(),
            server: server.into(),
            connection_type: kind.into(),
            requests,
            failed,
            buckets,
        }
    }

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let mut b = [0; BOUNDS.len() + 1];
        b[0] = 50; // ≤ 5 ms
        b[1] = 50; // 5–10 ms
        assert_eq!(quantile(&b, 0.5), Some(0.005));
        let p99 = quantile(&b, 0.99).unwrap();
        assert!((p99 - 0.0099).abs() < 1e-9, "{p99}");
        b[BOUNDS.len()] = 1000;
        assert_eq!(
            quantile(&b, 0.99),
            Some(10.0),
            "+Inf reads as the top bound"
        );
        assert_eq!(quantile(&[0; BOUNDS.len() + 1], 0.5), None);
    }

    #[test]
    fn rates_and_ratios_come_from_the_window() {
        let t0 = Instant::now();
        let mut g = GraphHistory::default();
        g.record(t0, vec![edge("front", "back", "", 100, 0)]);
        g.record(
            t0 + Duration::from_secs(10),
            vec![
                edge("front", "back", "", 300, 20),
                edge("back", "10.0.0.9:6379", "database", 40, 0),
            ],
        );
        let v = g.to_json();
        assert_eq!(v["window_seconds"], 10.0);
        let front = &v["edges"][0];
        assert_eq!(front["client"], "front");
        assert_eq!(front["requests"], 200);
        assert_eq!(front["requests_total"], 300);
        assert_eq!(front["rate"], 20.0);
        assert_eq!(front["error_ratio"], 0.1);
        assert!(
            front["p50_ms"]
                .as_f64()
                .is_some_and(|ms| (10.0..=25.0).contains(&ms))
        );
        assert_eq!(front["latency_over"], "window");
        // An edge new in the window counts from zero.
        assert_eq!(v["edges"][1]["requests"], 40);
        // A quiet edge: no rate nor ratio, its latency since start.
        let mut quiet = GraphHistory::default();
        for s in [0, 10] {
            quiet.record(
                t0 + Duration::from_secs(s),
                vec![edge("front", "back", "", 300, 20)],
            );
        }
        let quiet = &quiet.to_json()["edges"][0];
        assert_eq!(quiet["rate"], 0.0);
        assert_eq!(quiet["error_ratio"], Value::Null);
        assert_eq!(quiet["latency_over"], "start");
        assert!(
            quiet["p99_ms"]
                .as_f64()
                .is_some_and(|ms| (10.0..=25.0).contains(&ms))
        );
        assert_eq!(
            v["nodes"],
            json!([
                {"id": "10.0.0.9:6379", "kind": "database"},
                {"id": "back", "kind": "service"},
                {"id": "front", "kind": "service"},
            ])
        );
        assert_eq!(
            g.dependencies(),
            json!({"data": [
                {"parent": "front", "child": "back", "callCount": 300},
                {"parent": "back", "child": "10.0.0.9:6379", "callCount": 40},
            ]})
        );
    }

    #[test]
    fn history_keeps_about_one_window() {
        let t0 = Instant::now();
        let mut g = GraphHistory::default();
        for s in 0..200 {
            g.record(t0 + Duration::from_secs(s), vec![edge("a", "b", "", s, 0)]);
        }
        assert!(g.snapshots.len() <= WINDOW.as_secs() as usize + 2);
        assert_eq!(g.to_json()["window_seconds"], WINDOW.as_secs() as f64);
    }
}
