//! The agent's HTTP endpoint: `/metrics` (Prometheus text), `/readyz`, and the built-in viewer
//! unless it is turned off.
use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;

use crate::{metrics::Metrics, view::Viewer};

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Everything served at the metrics address.
pub fn router(metrics: Arc<Metrics>, viewer: Option<Arc<Viewer>>) -> Router {
    let own = Router::new()
        .route("/metrics", get(prometheus))
        .route("/readyz", get(ready))
        .with_state(metrics);
    match viewer {
        Some(v) => own.merge(v.routes()),
        None => own,
    }
}

/// Serves until the listener fails.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, viewer: Option<Arc<Viewer>>) {
    if let Err(e) = axum::serve(listener, router(metrics, viewer)).await {
        log::error!("the metrics endpoint stopped: {e}");
    }
}

async fn prometheus(State(m): State<Arc<Metrics>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.render(),
    )
        .into_response()
}

async fn ready(State(m): State<Arc<Metrics>>) -> Response {
    if m.ready.load(Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{
        process::ProcessInfo,
        trace::span::{SpanKind, SpanRecord},
        view::{api::ResourceView, store::Limits},
    };

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    async fn start(viewer: Option<Arc<Viewer>>) -> (SocketAddr, Arc<Metrics>) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Arc::new(Metrics::default());
        tokio::spawn(serve(listener, m.clone(), viewer));
        (addr, m)
    }

    #[tokio::test]
    async fn serves_metrics_and_readiness() {
        let (addr, m) = start(None).await;
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        m.ready.store(true, Relaxed);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let metrics = get(addr, "/metrics").await;
        assert!(metrics.contains("kspan_spans_exported_total 0"));
        assert!(metrics.contains("content-type: text/plain; version=0.0.4"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        assert!(
            get(addr, "/api/traces").await.starts_with("HTTP/1.1 404"),
            "no viewer, no API"
        );
    }

    #[tokio::test]
    async fn serves_the_viewer_and_its_api() {
        let limits = Limits {
            traces: 10,
            bytes: usize::MAX,
            per_sec: 10,
        };
        let viewer = Arc::new(Viewer::new(limits, ResourceView::default()));
        viewer.offer(&[SpanRecord {
            trace_id: 0x77,
            span_id: 1,
            parent_span_id: None,
            kind: SpanKind::Server,
            name: "GET /x".into(),
            start_unix_ns: 1_000,
            end_unix_ns: 2_000,
            attributes: vec![],
            error: None,
            process: Arc::new(ProcessInfo {
                service_name: "front".into(),
                ..ProcessInfo::default()
            }),
        }]);
        viewer.record_graph(vec![]);
        let (addr, _) = start(Some(viewer)).await;
        let page = get(addr, "/trace/0000000000000077").await;
        assert!(page.starts_with("HTTP/1.1 200") && page.contains("<title>kspan</title>"));
        assert!(get(addr, "/").await.contains("text/html"));
        let one = get(addr, "/api/traces/77").await;
        assert!(
            one.starts_with("HTTP/1.1 400"),
            "not 16 or 32 digits: {one}"
        );
        let one = get(addr, "/api/traces/0000000000000077").await;
        assert!(one.contains(r#""traceID":"0000000000000077""#), "{one}");
        let missing = get(addr, "/api/traces/0000000000000078").await;
        assert!(missing.starts_with("HTTP/1.1 404") && missing.contains(r#""code":404"#));
        let found = get(addr, "/api/traces?service=front&minDuration=1us").await;
        assert!(found.contains(r#""total":1"#), "{found}");
        let bad = get(addr, "/api/traces?minDuration=fast").await;
        assert!(
            bad.starts_with("HTTP/1.1 400") && bad.contains("needs a unit"),
            "{bad}"
        );
        assert!(
            get(addr, "/api/services")
                .await
                .contains(r#""data":["front"]"#)
        );
        assert!(
            get(addr, "/api/services/front/operations")
                .await
                .contains(r#""data":["GET /x"]"#)
        );
        assert!(get(addr, "/api/graph").await.contains(r#""edges":[]"#));
        assert!(
            get(addr, "/api/dependencies")
                .await
                .contains(r#""data":[]"#)
        );
    }
}
