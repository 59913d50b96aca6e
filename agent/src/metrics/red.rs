//! RED metrics (rate, errors, duration) and service-graph edges from every finished request,
//! sampled or not, in Prometheus text form.
//!
//! Names follow the OpenTelemetry semantic conventions as Prometheus exporters write them
//! (`http.server.request.duration` in seconds → `http_server_request_duration_seconds`), and
//! the service graph follows Grafana Tempo's series (`traces_service_graph_request_total`, …),
//! so existing dashboards work. Cardinality is bounded: paths become heuristic routes (id-like
//! segments are replaced), routes per service and series per family are capped, and what does
//! not fit is counted in `kspan_metric_series_dropped_total`.
use std::fmt::Write as _;

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::trace::span::{Observation, SpanKind};

/// Bucket bounds in seconds (the conventions' advice for HTTP durations).
pub const BOUNDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// Distinct routes kept per service; later ones are reported as `/{other}`.
const MAX_ROUTES_PER_SERVICE: usize = 200;
pub const DEFAULT_MAX_SERIES: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Family {
    HttpServer,
    HttpClient,
    RpcServer,
    RpcClient,
    DbClient,
    GraphServer,
    GraphClient,
}

impl Family {
    const ALL: [Family; 7] = [
        Family::HttpServer,
        Family::HttpClient,
        Family::RpcServer,
        Family::RpcClient,
        Family::DbClient,
        Family::GraphServer,
        Family::GraphClient,
    ];

    fn name(self) -> &'static str {
        match self {
            Family::HttpServer => "http_server_request_duration_seconds",
            Family::HttpClient => "http_client_request_duration_seconds",
            Family::RpcServer => "rpc_server_duration_seconds",
            Family::RpcClient => "rpc_client_duration_seconds",
            Family::DbClient => "db_client_operation_duration_seconds",
            Family::GraphServer => "traces_service_graph_request_server_seconds",
            Family::GraphClient => "traces_service_graph_request_client_seconds",
        }
    }

    fn help(self) -> &'static str {
        match self {
            Family::HttpServer => {
                "Duration of HTTP server requests (http.server.request.duration)."
            }
            Family::HttpClient => {
                "Duration of HTTP client requests (http.client.request.duration)."
            }
            Family::RpcServer => "Duration of RPC server calls (rpc.server.duration).",
            Family::RpcClient => "Duration of RPC client calls (rpc.client.duration).",
            Family::DbClient => "Duration of data-store calls (db.client.operation.duration).",
            Family::GraphServer => "Service graph: request duration measured at the server.",
            Family::GraphClient => "Service graph: request duration measured at the client.",
        }
    }

    fn labels(self) -> &'static [&'static str] {
        match self {
            Family::HttpServer => &[
                "service_name",
                "http_request_method",
                "http_route",
                "http_response_status_code",
                "error_type",
            ],
            Family::HttpClient => &[
                "service_name",
                "http_request_method",
                "server_address",
                "server_port",
                "http_response_status_code",
                "error_type",
            ],
            Family::RpcServer | Family::RpcClient => &[
                "service_name",
                "rpc_system",
                "rpc_service",
                "rpc_method",
                "rpc_grpc_status_code",
            ],
            Family::DbClient => &[
                "service_name",
                "db_system_name",
                "db_operation_name",
                "db_collection_name",
                "error_type",
            ],
            Family::GraphServer | Family::GraphClient => &["client", "server", "connection_type"],
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Histogram {
    /// Per bucket (not cumulative); the last one is +Inf.
    buckets: [u64; BOUNDS.len() + 1],
    sum: f64,
    count: u64,
    /// Service graph: requests that failed as the caller sees them.
    failed: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64, failed: bool) {
        let i = BOUNDS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(BOUNDS.len());
        self.buckets[i] += 1;
        self.sum += seconds;
        self.count += 1;
        self.failed += failed as u64;
    }
}

/// One series as `render` reads it: family, label values (in `Family::labels` order), histogram.
type Series<'a> = (Family, Vec<&'a str>, &'a Histogram);

pub struct Red {
    /// Keyed by family and label values in one contiguous key (see `series_key`): finding the
    /// series of an observation costs one comparison of bytes already together in memory, not
    /// one per label in separate allocations.
    series: HashMap<Box<[u8]>, Histogram>,
    /// Reused buffer for the key of the observation at hand.
    key: Vec<u8>,
    /// Series per family (indexed by `Family as usize`).
    per_family: [usize; Family::ALL.len()],
    routes: HashMap<String, HashSet<String>>,
    /// Reused buffer for the route of the observation at hand.
    route: String,
    max_series: usize,
    /// Observations not recorded because their family's series cap was reached.
    pub dropped: u64,
}

impl Default for Red {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_SERIES)
    }
}

impl Red {
    pub fn new(max_series: usize) -> Self {
        Self {
            series: HashMap::default(),
            key: Vec::new(),
            per_family: [0; Family::ALL.len()],
            routes: HashMap::default(),
            route: String::new(),
            max_series,
            dropped: 0,
        }
    }

    pub fn series(&self) -> usize {
        self.per_family.iter().sum()
    }

    pub fn observe(&mut self, o: &Observation) {
        let seconds = o.duration_ns as f64 / 1e9;
        let service = o.process.service_name.as_str();
        let (mut status_buf, mut port_buf, mut code_buf) = (
            itoa::Buffer::new(),
            itoa::Buffer::new(),
            itoa::Buffer::new(),
        );
        let status = o.status.map_or("", |s| status_buf.format(s));
        let error_type = match (o.error, o.status) {
            (false, _) => "",
            (true, Some(_)) => status,
            // No response: the conventions' catch-all.
            (true, None) => "_OTHER",
        };
        match (&o.db, &o.grpc, o.kind) {
            (Some(db), _, _) => {
                let error_type = if o.error && db.error_code.is_empty() {
                    "_OTHER"
                } else {
                    &db.error_code
                };
                self.add(
                    Family::DbClient,
                    [
                        service,
                        db.system,
                        db.operation.as_deref().unwrap_or_default(),
                        db.collection.as_deref().unwrap_or_default(),
                        error_type,
                    ],
                    seconds,
                    false,
                );
            }
            (None, Some(g), kind) => {
                let family = if kind == SpanKind::Server {
                    Family::RpcServer
                } else {
                    Family::RpcClient
                };
                let code = g.status.map_or("", |c| code_buf.format(c));
                self.add(
                    family,
                    [service, "grpc", &g.service, &g.method, code],
                    seconds,
                    false,
                );
            }
            (None, None, SpanKind::Server) => {
                let mut route = std::mem::take(&mut self.route);
                self.route_into(service, o.path, &mut route);
                self.add(
                    Family::HttpServer,
                    [service, o.method, &route, status, error_type],
                    seconds,
                    false,
                );
                self.route = route;
            }
            (None, None, SpanKind::Client) => {
                let (addr, port) = o.server.as_ref().map_or(("", 0), |(a, p)| (a.as_ref(), *p));
                let port = port_buf.format(port);
                self.add(
                    Family::HttpClient,
                    [service, o.method, addr, port, status, error_type],
                    seconds,
                    false,
                );
            }
        }
        // Edges: a linked pair is counted once, at its server; a client whose server this agent
        // did not see is an edge to a virtual node named by address. A data-store call is
        // counted at its client (the store makes no spans), to the store's service when this
        // agent saw the store's process, else to its address.
        let database = o.db.is_some();
        match (o.kind, &o.peer_process) {
            (SpanKind::Server, Some(client)) => self.add(
                Family::GraphServer,
                [&client.service_name, service, ""],
                seconds,
                o.failed,
            ),
            (SpanKind::Client, Some(server)) => self.add(
                Family::GraphClient,
                [
                    service,
                    &server.service_name,
                    if database { "database" } else { "" },
                ],
                seconds,
                o.failed,
            ),
            (SpanKind::Client, None) => {
                let peer = o
                    .server
                    .as_ref()
                    .map_or_else(String::new, |(a, p)| format!("{a}:{p}"));
                let kind = if database { "database" } else { "virtual_node" };
                self.add(
                    Family::GraphClient,
                    [service, &peer, kind],
                    seconds,
                    o.failed,
                );
            }
            (SpanKind::Server, None) => {}
        }
    }

    fn add<const N: usize>(&mut self, family: Family, labels: [&str; N], s: f64, failed: bool) {
        series_key(&mut self.key, family, &labels);
        if let Some(h) = self.series.get_mut(self.key.as_slice()) {
            h.observe(s, failed);
            return;
        }
        if self.per_family[family as usize] >= self.max_series {
            self.dropped += 1;
            return;
        }
        self.per_family[family as usize] += 1;
        let mut hist = Histogram::default();
        hist.observe(s, failed);
        self.series.insert(self.key.as_slice().into(), hist);
    }

    /// The heuristic route of a path for one service, capped per service.
    fn route_into(&mut self, service: &str, path: &str, route: &mut String) {
        route_of_into(path, route);
        let known = match self.routes.get_mut(service) {
            Some(k) => k,
            None => self.routes.entry(service.to_string()).or_default(),
        };
        if known.contains(route.as_str()) {
            return;
        }
        if known.len() >= MAX_ROUTES_PER_SERVICE {
            route.clear();
            route.push_str("/{other}");
            return;
        }
        known.insert(route.clone());
    }

    /// Appends every series in Prometheus text exposition format.
    pub fn render(&self, out: &mut String) {
        let mut all: Vec<Series> = self
            .series
            .iter()
            .filter_map(|(k, h)| {
                let (family, labels) = parse_key(k)?;
                Some((family, labels, h))
            })
            .collect();
        all.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        for family in Family::ALL {
            let name = family.name();
            let of_family: Vec<&Series> = all.iter().filter(|e| e.0 == family).collect();
            if of_family.is_empty() {
                continue;
            }
            let _ = writeln!(
                out,
                "# HELP {name} {}\n# TYPE {name} histogram",
                family.help()
            );
            for (_, values, h) in of_family {
                let labels = render_labels(family.labels(), values);
                let mut cumulative = 0;
                for (i, n) in h.buckets.iter().enumerate() {
                    cumulative += n;
                    let le = BOUNDS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
                    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
                }
                let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
                let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
            }
        }
        // The graph's request and failure counters: once per request, at the server for a
        // linked pair, at the client for a virtual node or a data store.
        let mut edges: Vec<(&[&str], u64, u64)> = all
            .iter()
            .filter(|(f, v, _)| counted_once(*f, v))
            .map(|(_, v, h)| (&v[..], h.count, h.failed))
            .collect();
        edges.sort();
        for (name, help, failed) in [
            (
                "traces_service_graph_request_total",
                "Service graph: requests from client to server.",
                false,
            ),
            (
                "traces_service_graph_request_failed_total",
                "Service graph: requests that failed as the client sees them.",
                true,
            ),
        ] {
            if edges.is_empty() {
                break;
            }
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (values, n, f) in &edges {
                let labels = render_labels(Family::GraphServer.labels(), values);
                let _ = writeln!(out, "{name}{{{labels}}} {}", if failed { f } else { n });
            }
        }
    }
}

/// One service-graph edge's totals since start, counted as `traces_service_graph_request_total`
/// counts them (once per request), with the duration histogram of the same series.
#[derive(Clone, Debug, PartialEq)]
pub struct EdgeTotals {
    pub client: String,
    pub server: String,
    /// Empty for two services, else `virtual_node` or `database`.
    pub connection_type: String,
    pub requests: u64,
    pub failed: u64,
    /// Per bucket of [`BOUNDS`] (not cumulative); the last one is +Inf.
    pub buckets: [u64; BOUNDS.len() + 1],
}

impl Red {
    /// Every service-graph edge, for the viewer's map.
    pub fn edges(&self) -> Vec<EdgeTotals> {
        self.series
            .iter()
            .filter_map(|(k, h)| {
                let (family, labels) = parse_key(k)?;
                let [client, server, kind] = labels.as_slice() else {
                    return None;
                };
                counted_once(family, &labels).then(|| EdgeTotals {
                    client: client.to_string(),
                    server: server.to_string(),
                    connection_type: kind.to_string(),
                    requests: h.count,
                    failed: h.failed,
                    buckets: h.buckets,
                })
            })
            .collect()
    }
}

/// Whether a graph series counts its edge's requests (once per request): at the server for a
/// linked pair, at the client for a virtual node or a data store.
fn counted_once(family: Family, labels: &[&str]) -> bool {
    family == Family::GraphServer
        || (family == Family::GraphClient
            && matches!(labels.get(2).copied(), Some("virtual_node" | "database")))
}

/// `family` as one byte, then each label as its length (u32, little-endian) and bytes.
fn series_key(key: &mut Vec<u8>, family: Family, labels: &[&str]) {
    key.clear();
    key.push(family as u8);
    for l in labels {
        key.extend_from_slice(&(l.len() as u32).to_le_bytes());
        key.extend_from_slice(l.as_bytes());
    }
}

/// The family and labels a key was made of.
fn parse_key(mut key: &[u8]) -> Option<(Family, Vec<&str>)> {
    let (&family, rest) = key.split_first()?;
    let family = *Family::ALL.get(family as usize)?;
    key = rest;
    let mut labels = Vec::with_capacity(6);
    while let Some((len, rest)) = key.split_first_chunk::<4>() {
        let (label, rest) = rest.split_at_checked(u32::from_le_bytes(*len) as usize)?;
        labels.push(std::str::from_utf8(label).ok()?);
        key = rest;
    }
    Some((family, labels))
}

fn render_labels(names: &[&str], values: &[&str]) -> String {
    names
        .iter()
        .zip(values)
        .filter(|(_, v)| !v.is_empty())
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
        .collect::<Vec<_>>()
        .join(",")
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A low-cardinality stand-in for a route template: segments that look like identifiers
/// (numbers, UUIDs, long hex or mixed tokens) become `{id}`.
pub fn route_of(path: &str) -> String {
    let mut route = String::new();
    route_of_into(path, &mut route);
    route
}

fn route_of_into(path: &str, route: &mut String) {
    route.clear();
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if path.is_empty() || !path.starts_with('/') {
        route.push('/');
        return;
    }
    for seg in path.split('/').skip(1).take(8) {
        route.push('/');
        route.push_str(if looks_like_id(seg) { "{id}" } else { seg });
    }
}

fn looks_like_id(s: &str) -> bool {
    let digits = s.bytes().filter(u8::is_ascii_digit).count();
    let hex = s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    !s.is_empty()
        && (digits == s.len()
            || (hex && s.len() >= 16 && digits > 0)
            || (s.len() >= 20
                && digits > 0
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{process::ProcessInfo, trace::span::Grpc};

    /// A process for the test's observations to borrow (as they borrow their span's).
    fn process(name: &str) -> &'static ProcessInfo {
        Box::leak(Box::new(ProcessInfo {
            pid: 1,
            comm: String::new(),
            exe: String::new(),
            command_line: String::new(),
            service_name: name.into(),
            cgroup: Default::default(),
            k8s: None,
            runtime: Default::default(),
        }))
    }

    fn obs<'a>(
        kind: SpanKind,
        service: &str,
        path: &'a str,
        status: u16,
        ms: u64,
    ) -> Observation<'a> {
        Observation {
            kind,
            process: process(service),
            peer_process: None,
            method: "GET",
            path,
            status: Some(status),
            grpc: None,
            server: (kind == SpanKind::Client).then(|| ("backend".into(), 8081)),
            duration_ns: ms * 1_000_000,
            error: status >= 500,
            failed: status >= 400,
            db: None,
        }
    }

    #[test]
    fn data_store_calls_have_their_own_histogram_and_edge() {
        let mut red = Red::default();
        let mut o = obs(SpanKind::Client, "shop", "", 0, 3);
        o.server = Some(("127.0.0.1".into(), 6379));
        o.db = Some(crate::trace::span::DbObservation {
            system: "redis",
            operation: Some("GET".into()),
            collection: None,
            error_code: "WRONGTYPE".into(),
        });
        red.observe(&o);
        let mut text = String::new();
        red.render(&mut text);
        assert!(
            text.contains(r#"db_client_operation_duration_seconds_count{service_name="shop",db_system_name="redis",db_operation_name="GET",error_type="WRONGTYPE"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"traces_service_graph_request_client_seconds_count{client="shop",server="127.0.0.1:6379",connection_type="database"} 1"#), "{text}");
        assert!(text.contains(r#"traces_service_graph_request_total{client="shop",server="127.0.0.1:6379",connection_type="database"} 1"#), "{text}");
        assert!(!text.contains("http_client_request"), "{text}");
    }

    #[test]
    fn routes_hide_identifiers() {
        assert_eq!(route_of("/users/12345/orders"), "/users/{id}/orders");
        assert_eq!(
            route_of("/o/0f8e2b9a-1c3d-4e5f-8a7b-6c5d4e3f2a1b?x=1"),
            "/o/{id}"
        );
        assert_eq!(route_of("/blob/4b1a5e3c9d2f8e7a"), "/blob/{id}");
        assert_eq!(route_of("/api/v2/health"), "/api/v2/health");
        assert_eq!(route_of("/static/app.js"), "/static/app.js");
        assert_eq!(route_of(""), "/");
        assert_eq!(route_of("*"), "/");
    }

    #[test]
    fn histograms_and_edges_render_as_prometheus_text() {
        let mut red = Red::default();
        let mut server = obs(SpanKind::Server, "cart", "/items/42", 200, 3);
        server.peer_process = Some(process("gateway"));
        red.observe(&server);
        let mut failed = obs(SpanKind::Server, "cart", "/items/43", 503, 30);
        failed.peer_process = Some(process("gateway"));
        red.observe(&failed);
        red.observe(&obs(SpanKind::Client, "gateway", "/x", 404, 1));
        let grpc = Grpc {
            service: "shop.Cart".into(),
            method: "Get".into(),
            status: Some(5),
        };
        let mut rpc = obs(SpanKind::Server, "cart", "/shop.Cart/Get", 200, 2);
        rpc.grpc = Some(&grpc);
        red.observe(&rpc);
        let mut text = String::new();
        red.render(&mut text);
        let has = |line: &str| assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        has("# TYPE http_server_request_duration_seconds histogram");
        has(
            r#"http_server_request_duration_seconds_bucket{service_name="cart",http_request_method="GET",http_route="/items/{id}",http_response_status_code="200",le="0.005"} 1"#,
        );
        has(
            r#"http_server_request_duration_seconds_bucket{service_name="cart",http_request_method="GET",http_route="/items/{id}",http_response_status_code="503",error_type="503",le="0.025"} 0"#,
        );
        has(
            r#"http_server_request_duration_seconds_bucket{service_name="cart",http_request_method="GET",http_route="/items/{id}",http_response_status_code="503",error_type="503",le="0.05"} 1"#,
        );
        has(
            r#"http_server_request_duration_seconds_count{service_name="cart",http_request_method="GET",http_route="/items/{id}",http_response_status_code="200"} 1"#,
        );
        has(
            r#"http_client_request_duration_seconds_count{service_name="gateway",http_request_method="GET",server_address="backend",server_port="8081",http_response_status_code="404"} 1"#,
        );
        has(
            r#"rpc_server_duration_seconds_count{service_name="cart",rpc_system="grpc",rpc_service="shop.Cart",rpc_method="Get",rpc_grpc_status_code="5"} 1"#,
        );
        has(r#"traces_service_graph_request_total{client="gateway",server="cart"} 2"#);
        has(r#"traces_service_graph_request_failed_total{client="gateway",server="cart"} 1"#);
        has(
            r#"traces_service_graph_request_total{client="gateway",server="backend:8081",connection_type="virtual_node"} 1"#,
        );
        has(
            r#"traces_service_graph_request_failed_total{client="gateway",server="backend:8081",connection_type="virtual_node"} 1"#,
        );
    }

    #[test]
    fn cardinality_is_bounded_and_counted() {
        let mut red = Red::new(5);
        for i in 0..1000 {
            // Distinct non-id paths: routes are capped per service, series per family.
            red.observe(&obs(
                SpanKind::Server,
                "s",
                &format!("/page-{}", "x".repeat(i % 300)),
                200,
                1,
            ));
            red.observe(&obs(SpanKind::Client, "s", "/", 200 + (i % 50) as u16, 1));
        }
        assert!(red.series() <= 5 * Family::ALL.len(), "{}", red.series());
        assert!(red.dropped > 0);
        assert!(red.routes["s"].len() <= MAX_ROUTES_PER_SERVICE);
        let mut text = String::new();
        red.render(&mut text);
        assert!(text.contains("http_server_request_duration_seconds_count"));
    }
}
