//! Spans out: a bounded queue from the pipeline thread to an async worker that batches them
//! to OTLP and/or the stdout tree printer. A full queue drops spans and counts them.
pub mod otlp;
pub mod tree;

use std::{
    io::Write as _,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::{metrics::Metrics, trace::span::SpanRecord};

const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct SpanQueue {
    tx: mpsc::Sender<SpanRecord>,
    metrics: Arc<Metrics>,
}

impl SpanQueue {
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> (Self, mpsc::Receiver<SpanRecord>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Self { tx, metrics }, rx)
    }

    /// Never blocks the pipeline: a full queue drops the span (counted).
    pub fn push(&self, span: SpanRecord) {
        if self.tx.try_send(span).is_err() {
            self.metrics.spans_queue_dropped.fetch_add(1, Relaxed);
        }
    }
}

pub struct Sinks {
    pub otlp: Option<otlp::OtlpSink>,
    pub tree: Option<tree::TreePrinter>,
}

/// Runs until every `SpanQueue` is dropped, then flushes what is left.
pub async fn run(mut rx: mpsc::Receiver<SpanRecord>, mut sinks: Sinks, metrics: Arc<Metrics>) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last_flush = Instant::now();
    let mut open = true;
    while open {
        tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => open = n > 0,
            _ = tick.tick() => {}
        }
        if batch.len() >= BATCH
            || (!batch.is_empty() && last_flush.elapsed() >= FLUSH_EVERY)
            || !open
        {
            flush(&mut sinks, &mut batch, &metrics).await;
            last_flush = Instant::now();
        }
        if let Some(t) = sinks.tree.as_mut() {
            print(t.take_ready(Instant::now(), !open));
        }
    }
    if let Some(o) = sinks.otlp.as_mut() {
        o.shutdown();
    }
}

async fn flush(sinks: &mut Sinks, batch: &mut Vec<SpanRecord>, metrics: &Metrics) {
    if batch.is_empty() {
        return;
    }
    let n = batch.len() as u64;
    let spans = std::mem::take(batch);
    // Exporting consumes the spans; the printer gets a copy only when both sinks are on.
    let (for_otlp, for_tree) = match (&sinks.otlp, &sinks.tree) {
        (Some(_), Some(_)) => (spans.clone(), Some(spans)),
        (Some(_), None) => (spans, None),
        (None, _) => (Vec::new(), Some(spans)),
    };
    match sinks.otlp.as_mut() {
        Some(o) => match o.export(for_otlp).await {
            Ok(sent) => {
                metrics.spans_exported.fetch_add(sent as u64, Relaxed);
                metrics
                    .spans_export_failed
                    .fetch_add(n - sent as u64, Relaxed);
            }
            Err(e) => {
                log::warn!("{e}");
                metrics.spans_export_failed.fetch_add(n, Relaxed);
            }
        },
        None => {
            metrics.spans_exported.fetch_add(n, Relaxed);
        }
    }
    if let (Some(t), Some(spans)) = (sinks.tree.as_mut(), for_tree) {
        t.add(spans, Instant::now());
    }
}

fn print(traces: Vec<String>) {
    if traces.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    for t in traces {
        let _ = writeln!(out, "{t}");
    }
    let _ = out.flush();
}
