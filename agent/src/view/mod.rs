//! The built-in viewer: recent traces as waterfalls and the service map, served by the agent
//! on its metrics address, from memory and embedded assets (no backend, no network).
//!
//! The pipeline thread offers each tick's finished spans (the records exporters get, so nothing
//! is shown that would not be exported) and, once a second, the service graph's totals.
pub mod api;
pub mod graph;
pub mod store;

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};

use crate::{metrics::red::EdgeTotals, trace::span::SpanRecord};
use api::ResourceView;
use graph::GraphHistory;
use store::{Limits, StoreStats, TraceStore};

/// The page, its script and styles inline: served from the binary, nothing fetched elsewhere.
const PAGE: &str = include_str!("page.html");

pub struct Viewer {
    store: Mutex<TraceStore>,
    graph: Mutex<GraphHistory>,
    resource: ResourceView,
}

impl Viewer {
    pub fn new(limits: Limits, resource: ResourceView) -> Self {
        Self {
            store: Mutex::new(TraceStore::new(limits, Instant::now())),
            graph: Mutex::new(GraphHistory::default()),
            resource,
        }
    }

    /// Keeps the spans of admitted traces (see [`store`]).
    pub fn offer(&self, spans: &[SpanRecord]) {
        if !spans.is_empty() {
            lock(&self.store).offer(spans, Instant::now());
        }
    }

    pub fn record_graph(&self, edges: Vec<EdgeTotals>) {
        lock(&self.graph).record(Instant::now(), edges);
    }

    pub fn stats(&self) -> StoreStats {
        lock(&self.store).stats()
    }

    /// The page and its API.
    pub fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .route("/", get(page))
            .route("/map", get(page))
            .route("/trace/{id}", get(page))
            .route("/api/traces", get(search))
            .route("/api/traces/{id}", get(one_trace))
            .route("/api/services", get(services))
            .route("/api/services/{service}/operations", get(operations))
            .route("/api/graph", get(graph_json))
            .route("/api/dependencies", get(dependencies))
            .with_state(self)
    }
}

/// A poisoned lock still holds consistent data here (every update is one call).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Shared = State<Arc<Viewer>>;

async fn page() -> Response {
    ([(header::CACHE_CONTROL, "no-cache")], Html(PAGE)).into_response()
}

fn error(code: StatusCode, msg: &str) -> Response {
    (code, Json(api::error_json(code.as_u16(), msg))).into_response()
}

async fn search(State(v): Shared, Query(params): Query<Vec<(String, String)>>) -> Response {
    let q = match api::query(&params) {
        Ok(q) => q,
        Err(msg) => return error(StatusCode::BAD_REQUEST, &msg),
    };
    // Serialised under the lock: the pipeline waits at most this long to offer spans, and
    // copying the traces out would cost as much.
    let body = {
        let store = lock(&v.store);
        api::traces_json(&store.search(&q), q.limit, &v.resource)
    };
    Json(body).into_response()
}

async fn one_trace(State(v): Shared, Path(id): Path<String>) -> Response {
    let Some(trace_id) = store::parse_trace_id(&id) else {
        return error(
            StatusCode::BAD_REQUEST,
            "a trace id is 16 or 32 hex digits (or a traceparent / b3 header)",
        );
    };
    let store = lock(&v.store);
    match store.get(trace_id) {
        Some(t) => {
            let body = api::traces_json(&[t], 1, &v.resource);
            drop(store);
            Json(body).into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            "trace not found: not seen by this agent, or no longer in its memory",
        ),
    }
}

async fn services(State(v): Shared) -> Response {
    let names = lock(&v.store).services();
    Json(api::names_json(names)).into_response()
}

async fn operations(State(v): Shared, Path(service): Path<String>) -> Response {
    let ops = lock(&v.store).operations(&service);
    Json(api::names_json(ops)).into_response()
}

async fn graph_json(State(v): Shared) -> Response {
    Json(lock(&v.graph).to_json()).into_response()
}

async fn dependencies(State(v): Shared) -> Response {
    Json(lock(&v.graph).dependencies()).into_response()
}
