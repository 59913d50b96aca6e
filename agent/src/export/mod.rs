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

/// The queue between the pipeline and the exporters, bounded in spans and in bytes. The
/// pipeline hands over each tick's spans at once: one channel message and at most one wake-up
/// of the exporter per tick, not per span.
#[derive(Clone)]
pub struct SpanQueue {
    tx: mpsc::Sender<Batch>,
    held: Arc<Held>,
    max_spans: usize,
    max_bytes: usize,
    metrics: Arc<Metrics>,
}

/// Spans in the queue, and their bytes.
#[derive(Default)]
struct Held {
    spans: AtomicUsize,
    bytes: AtomicUsize,
}

struct Batch {
    spans: Vec<SpanRecord>,
    bytes: usize,
}

/// The receiving end; gives the budget back as spans leave for the exporters, so spans taken
/// from the channel but not yet exported still count.
pub struct QueueRx {
    rx: mpsc::Receiver<Batch>,
    held: Arc<Held>,
}

/// Ticks' batches in the channel at most (the span and byte bounds are the real ones).
const BATCHES: usize = 4096;

impl SpanQueue {
    pub fn new(max_spans: usize, max_bytes: usize, metrics: Arc<Metrics>) -> (Self, QueueRx) {
        let (tx, rx) = mpsc::channel(BATCHES);
        let held = Arc::new(Held::default());
        let queue = Self {
            tx,
            held: held.clone(),
            max_spans: max_spans.max(1),
            max_bytes,
            metrics,
        };
        (queue, QueueRx { rx, held })
    }

    /// Takes every span of `out`. Never blocks the pipeline: what does not fit is dropped
    /// (counted).
    pub fn push_all(&self, out: &mut Vec<SpanRecord>) {
        if out.is_empty() {
            return;
        }
        let (queued, queued_bytes) = (self.held.spans.load(Relaxed), self.held.bytes.load(Relaxed));
        let room = self.max_spans.saturating_sub(queued);
        let mut bytes = 0;
        let mut taken = 0;
        for s in out.iter() {
            let size = s.footprint();
            if taken == room || queued_bytes + bytes + size > self.max_bytes {
                break;
            }
            bytes += size;
            taken += 1;
        }
        let dropped = out.len() - taken;
        out.truncate(taken);
        let spans = std::mem::take(out);
        self.held.spans.fetch_add(taken, Relaxed);
        self.held.bytes.fetch_add(bytes, Relaxed);
        let lost = match self.tx.try_send(Batch { spans, bytes }) {
            Ok(()) => dropped,
            Err(e) => {
                let batch = e.into_inner();
                self.held.spans.fetch_sub(batch.spans.len(), Relaxed);
                self.held.bytes.fetch_sub(batch.bytes, Relaxed);
                dropped + batch.spans.len()
            }
        };
        if lost > 0 {
            self.metrics
                .spans_queue_dropped
                .fetch_add(lost as u64, Relaxed);
        }
    }
}

impl QueueRx {
    /// Appends the next batches' spans to `pending`; 0 once every sender is gone.
    async fn recv(&mut self, pending: &mut Vec<SpanRecord>) -> usize {
        let mut batches = Vec::new();
        let n = self.rx.recv_many(&mut batches, 64).await;
        for b in batches {
            pending.extend(b.spans);
        }
        n
    }

    /// `spans` leave for the exporters: their room is the pipeline's again.
    fn release(&self, spans: &[SpanRecord]) {
        let bytes: usize = spans.iter().map(SpanRecord::footprint).sum();
        self.held.spans.fetch_sub(spans.len(), Relaxed);
        self.held.bytes.fetch_sub(bytes, Relaxed);
    }
}

pub struct Sinks {
    pub otlp: Option<otlp::OtlpSink>,
    pub zipkin: Option<zipkin::ZipkinSink>,
    pub tree: Option<tree::TreePrinter>,
}

/// Runs until every `SpanQueue` is dropped, then flushes what is left.
pub async fn run(mut rx: QueueRx, mut sinks: Sinks, metrics: Arc<Metrics>) {
    let mut pending = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last_flush = Instant::now();
    let mut open = true;
    while open {
        tokio::select! {
            n = rx.recv(&mut pending) => open = n > 0,
            _ = tick.tick() => {}
        }
        if pending.len() >= BATCH {
            // Whole batches leave from the front; moving each span once (draining a batch
            // at a time from the front shifted the rest each time: 5% of the agent's CPU at
            // HTTP/2 rates).
            let tail = pending.split_off(pending.len() / BATCH * BATCH);
            let mut full = std::mem::replace(&mut pending, tail).into_iter();
            while full.len() > 0 {
                let mut batch: Vec<SpanRecord> = full.by_ref().take(BATCH).collect();
                rx.release(&batch);
                flush(&mut sinks, &mut batch, &metrics).await;
                last_flush = Instant::now();
            }
        }
        if !pending.is_empty() && (last_flush.elapsed() >= FLUSH_EVERY || !open) {
            rx.release(&pending);
            flush(&mut sinks, &mut pending, &metrics).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_queue_is_bounded_in_spans_and_bytes_and_counts_drops() {
        let spans = otlp::tests::corpus_spans(false);
        let metrics = Arc::new(Metrics::default());
        let (queue, mut rx) = SpanQueue::new(4, usize::MAX, metrics.clone());
        let mut out = spans[..10].to_vec();
        queue.push_all(&mut out);
        assert!(out.is_empty(), "the queue takes the batch's spans");
        assert_eq!(metrics.spans_queue_dropped.load(Relaxed), 6);
        let mut pending = Vec::new();
        rx.recv(&mut pending).await;
        assert_eq!(pending.len(), 4);
        assert_eq!(
            queue.held.spans.load(Relaxed),
            4,
            "received but not yet exported still counts"
        );
        rx.release(&pending);
        assert_eq!(
            queue.held.spans.load(Relaxed),
            0,
            "exporting gives the room back"
        );
        assert_eq!(queue.held.bytes.load(Relaxed), 0);

        let metrics = Arc::new(Metrics::default());
        let same: Vec<SpanRecord> = (0..5).map(|_| spans[0].clone()).collect();
        // A clone's strings are only as long as they need to be.
        let one = same[0].footprint();
        let (queue, _rx) = SpanQueue::new(100, 2 * one + one / 2, metrics.clone());
        queue.push_all(&mut same.clone());
        assert_eq!(
            metrics.spans_queue_dropped.load(Relaxed),
            3,
            "two fit in the bytes"
        );
        assert_eq!(queue.held.bytes.load(Relaxed), 2 * one);
    }
}
