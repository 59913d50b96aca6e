//! Spans out: a bounded queue from the pipeline thread to an async worker that batches them
//! to OTLP, Zipkin and/or the stdout tree printer. A full queue drops spans and counts them.
pub mod otlp;
pub mod resource;
pub mod retry;
pub mod tree;
pub mod zipkin;

use std::{
    io::Write as _,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::{metrics::Metrics, trace::span::SpanRecord};

const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// The queue between the pipeline and the exporters, bounded in spans and in bytes.
#[derive(Clone)]
pub struct SpanQueue {
    tx: mpsc::Sender<SpanRecord>,
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    metrics: Arc<Metrics>,
}

/// The receiving end; gives back the byte budget of what it takes.
pub struct QueueRx {
    rx: mpsc::Receiver<SpanRecord>,
    bytes: Arc<AtomicUsize>,
}

impl SpanQueue {
    pub fn new(capacity: usize, max_bytes: usize, metrics: Arc<Metrics>) -> (Self, QueueRx) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let bytes = Arc::new(AtomicUsize::new(0));
        let queue = Self {
            tx,
            bytes: bytes.clone(),
            max_bytes,
            metrics,
        };
        (queue, QueueRx { rx, bytes })
    }

    /// Never blocks the pipeline: a full queue drops the span (counted).
    pub fn push(&self, span: SpanRecord) {
        let size = span.footprint();
        let before = self.bytes.fetch_add(size, Relaxed);
        if before + size > self.max_bytes || self.tx.try_send(span).is_err() {
            self.bytes.fetch_sub(size, Relaxed);
            self.metrics.spans_queue_dropped.fetch_add(1, Relaxed);
        }
    }
}

impl QueueRx {
    async fn recv_many(&mut self, batch: &mut Vec<SpanRecord>, limit: usize) -> usize {
        let from = batch.len();
        let n = self.rx.recv_many(batch, limit).await;
        let freed: usize = batch[from..].iter().map(SpanRecord::footprint).sum();
        self.bytes.fetch_sub(freed, Relaxed);
        n
    }
}

pub struct Sinks {
    pub otlp: Option<otlp::OtlpSink>,
    pub zipkin: Option<zipkin::ZipkinSink>,
    pub tree: Option<tree::TreePrinter>,
}

/// Runs until every `SpanQueue` is dropped, then flushes what is left.
pub async fn run(mut rx: QueueRx, mut sinks: Sinks, metrics: Arc<Metrics>) {
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

/// Hands a batch to every sink. Delivery is counted per exporter, so with two network
/// exporters each span counts twice in `kspan_spans_exported_total`.
async fn flush(sinks: &mut Sinks, batch: &mut Vec<SpanRecord>, metrics: &Metrics) {
    if batch.is_empty() {
        return;
    }
    let n = batch.len() as u64;
    let mut spans = std::mem::take(batch);
    let failed = |e: &dyn std::fmt::Display| {
        log::warn!("{e}");
        metrics.spans_export_failed.fetch_add(n, Relaxed);
    };
    if let Some(z) = sinks.zipkin.as_mut() {
        match z.export(&spans).await {
            Ok(sent) => {
                metrics.spans_exported.fetch_add(sent as u64, Relaxed);
            }
            Err(e) => failed(&e),
        }
    }
    if let Some(o) = sinks.otlp.as_mut() {
        // The reference encoder consumes its batch; the printer then needs a copy.
        let for_otlp = match (o.consumes(), &sinks.tree) {
            (true, Some(_)) => spans.clone(),
            (true, None) => std::mem::take(&mut spans),
            (false, _) => Vec::new(),
        };
        match o.export(for_otlp, &spans).await {
            Ok(d) => {
                metrics
                    .spans_exported
                    .fetch_add(d.sent as u64 - d.rejected, Relaxed);
                metrics.spans_export_rejected.fetch_add(d.rejected, Relaxed);
                metrics
                    .spans_export_failed
                    .fetch_add(n - d.sent as u64, Relaxed);
            }
            Err(e) => failed(&e),
        }
    }
    if sinks.otlp.is_none() && sinks.zipkin.is_none() {
        metrics.spans_exported.fetch_add(n, Relaxed);
    }
    if let Some(t) = sinks.tree.as_mut() {
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
