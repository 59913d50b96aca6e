//! Spans out: a bounded queue from the pipeline thread to an async worker that batches them
//! to OTLP, Zipkin and/or the stdout tree printer. A full queue drops spans and counts them.
//!
//! When kspan's OTLP encoder is the only exporter, spans enter the queue already encoded: a
//! span's protobuf is about a third of its record's memory, and the records are freed on the
//! thread that made them. Concatenated `ExportTraceServiceRequest` encodings are one request
//! (protobuf merges repeated fields by appending), so the exporter joins queued chunks into
//! batches without decoding them.
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

use crate::{export::otlp::encode::Encoder, metrics::Metrics, trace::span::SpanRecord};

const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// The queue between the pipeline and the exporters, bounded in spans and in bytes. The
/// pipeline hands over each tick's spans at once: one channel message and at most one wake-up
/// of the exporter per tick, not per span.
pub struct SpanQueue {
    tx: mpsc::Sender<Batch>,
    held: Arc<Held>,
    max_spans: usize,
    max_bytes: usize,
    metrics: Arc<Metrics>,
    /// Set when the OTLP encoder is the only exporter: spans are queued encoded.
    encoder: Option<Encoder>,
    /// Bytes per span of the last encoded chunk: the next chunk's buffer is sized from it
    /// instead of growing (each growth copied the chunk so far).
    span_bytes: usize,
}

/// Spans in the queue, and their bytes.
#[derive(Default)]
struct Held {
    spans: AtomicUsize,
    bytes: AtomicUsize,
}

enum Batch {
    Records {
        spans: Vec<SpanRecord>,
        bytes: usize,
    },
    Encoded(Vec<Encoded>),
}

/// Up to [`BATCH`] spans as an `ExportTraceServiceRequest` body.
pub struct Encoded {
    pub body: Vec<u8>,
    pub spans: usize,
}

/// What the exporter has taken from the queue and not yet sent.
#[derive(Default)]
struct Pending {
    records: Vec<SpanRecord>,
    encoded: std::collections::VecDeque<Encoded>,
    encoded_spans: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.records.is_empty() && self.encoded.is_empty()
    }

    /// Joins queued chunks into one request of at least `min` spans (any number with 0).
    fn take_encoded(&mut self, min: usize) -> Option<Encoded> {
        if self.encoded_spans == 0 || self.encoded_spans < min {
            return None;
        }
        let mut out = self.encoded.pop_front()?;
        while let Some(next) = self.encoded.front()
            && out.spans + next.spans <= BATCH
        {
            let next = self.encoded.pop_front()?;
            out.body.extend_from_slice(&next.body);
            out.spans += next.spans;
        }
        self.encoded_spans -= out.spans;
        Some(out)
    }
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
    /// `encoder`: queue spans encoded (see the module's notes); only when that encoder's
    /// OTLP exporter is the only one.
    pub fn new(
        max_spans: usize,
        max_bytes: usize,
        metrics: Arc<Metrics>,
        encoder: Option<Encoder>,
    ) -> (Self, QueueRx) {
        let (tx, rx) = mpsc::channel(BATCHES);
        let held = Arc::new(Held::default());
        let queue = Self {
            tx,
            held: held.clone(),
            max_spans: max_spans.max(1),
            max_bytes,
            metrics,
            encoder,
            span_bytes: 0,
        };
        (queue, QueueRx { rx, held })
    }

    /// Spans and bytes in the queue now.
    pub fn held(&self) -> (usize, usize) {
        (self.held.spans.load(Relaxed), self.held.bytes.load(Relaxed))
    }

    /// Takes every span of `out`. Never blocks the pipeline: what does not fit is dropped
    /// (counted).
    pub fn push_all(&mut self, out: &mut Vec<SpanRecord>) {
        if out.is_empty() {
            return;
        }
        if self.encoder.is_some() {
            return self.push_encoded(out);
        }
        let (queued, queued_bytes) = self.held();
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
        let lost = match self.tx.try_send(Batch::Records { spans, bytes }) {
            Ok(()) => dropped,
            Err(e) => dropped + self.unsend(e.into_inner()),
        };
        self.count_dropped(lost);
    }

    /// Encodes `out` in chunks of [`BATCH`] spans; a chunk that does not fit is dropped.
    fn push_encoded(&mut self, out: &mut Vec<SpanRecord>) {
        let queued = self.held();
        let Some(encoder) = self.encoder.as_mut() else {
            return;
        };
        let (mut spans, mut bytes) = queued;
        let (mut chunks, mut dropped) = (Vec::new(), 0);
        for chunk in out.chunks(BATCH) {
            if spans + chunk.len() > self.max_spans {
                dropped += chunk.len();
                continue;
            }
            // An eighth more than the last chunk's size: rarely grown, little left unused.
            let mut body = Vec::with_capacity(chunk.len() * self.span_bytes * 9 / 8);
            encoder.encode(chunk, &mut body);
            self.span_bytes = body.len() / chunk.len();
            if bytes + body.len() > self.max_bytes {
                dropped += chunk.len();
                continue;
            }
            spans += chunk.len();
            bytes += body.len();
            chunks.push(Encoded {
                body,
                spans: chunk.len(),
            });
        }
        self.held.spans.fetch_add(spans - queued.0, Relaxed);
        self.held.bytes.fetch_add(bytes - queued.1, Relaxed);
        out.clear();
        // The pipeline reuses `out`: keep no burst-sized buffer.
        out.shrink_to(BATCH);
        if !chunks.is_empty()
            && let Err(e) = self.tx.try_send(Batch::Encoded(chunks))
        {
            dropped += self.unsend(e.into_inner());
        }
        self.count_dropped(dropped);
    }

    /// Gives back the room of a batch the channel refused; its span count.
    fn unsend(&self, batch: Batch) -> usize {
        let (spans, bytes) = batch.size();
        self.held.spans.fetch_sub(spans, Relaxed);
        self.held.bytes.fetch_sub(bytes, Relaxed);
        spans
    }

    fn count_dropped(&self, n: usize) {
        if n > 0 {
            self.metrics
                .spans_queue_dropped
                .fetch_add(n as u64, Relaxed);
        }
    }
}

impl Batch {
    /// Spans and queue bytes.
    fn size(&self) -> (usize, usize) {
        match self {
            Batch::Records { spans, bytes } => (spans.len(), *bytes),
            Batch::Encoded(chunks) => chunks
                .iter()
                .fold((0, 0), |(s, b), c| (s + c.spans, b + c.body.len())),
        }
    }
}

impl QueueRx {
    /// Appends the next batches' spans to `pending`; 0 once every sender is gone.
    async fn recv(&mut self, pending: &mut Pending) -> usize {
        let mut batches = Vec::new();
        let n = self.rx.recv_many(&mut batches, 64).await;
        for b in batches {
            match b {
                Batch::Records { spans, .. } => pending.records.extend(spans),
                Batch::Encoded(chunks) => {
                    pending.encoded_spans += chunks.iter().map(|c| c.spans).sum::<usize>();
                    pending.encoded.extend(chunks);
                }
            }
        }
        n
    }

    /// `spans` leave for the exporters: their room is the pipeline's again.
    fn release(&self, spans: &[SpanRecord]) {
        let bytes: usize = spans.iter().map(SpanRecord::footprint).sum();
        self.held.spans.fetch_sub(spans.len(), Relaxed);
        self.held.bytes.fetch_sub(bytes, Relaxed);
    }

    fn release_encoded(&self, e: &Encoded) {
        self.held.spans.fetch_sub(e.spans, Relaxed);
        self.held.bytes.fetch_sub(e.body.len(), Relaxed);
    }
}

pub struct Sinks {
    pub otlp: Option<otlp::OtlpSink>,
    pub zipkin: Option<zipkin::ZipkinSink>,
    pub tree: Option<tree::TreePrinter>,
}

impl Sinks {
    /// The encoder the queue should encode with: kspan's OTLP encoder when it is the only
    /// exporter.
    pub fn queue_encoder(&self) -> Option<Encoder> {
        match (&self.otlp, &self.zipkin, &self.tree) {
            (Some(o), None, None) => o.encoder(),
            _ => None,
        }
    }
}

/// Runs until every `SpanQueue` is dropped, then flushes what is left.
pub async fn run(mut rx: QueueRx, mut sinks: Sinks, metrics: Arc<Metrics>) {
    let mut pending = Pending::default();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last_flush = Instant::now();
    let mut open = true;
    while open {
        tokio::select! {
            n = rx.recv(&mut pending) => open = n > 0,
            _ = tick.tick() => {}
        }
        let records = &mut pending.records;
        if records.len() >= BATCH {
            // Whole batches leave from the front; moving each span once (draining a batch
            // at a time from the front shifted the rest each time: 5% of the agent's CPU at
            // HTTP/2 rates).
            let tail = records.split_off(records.len() / BATCH * BATCH);
            let mut full = std::mem::replace(records, tail).into_iter();
            while full.len() > 0 {
                let mut batch: Vec<SpanRecord> = full.by_ref().take(BATCH).collect();
                rx.release(&batch);
                flush(&mut sinks, &mut batch, &metrics).await;
                last_flush = Instant::now();
            }
        }
        while let Some(e) = pending.take_encoded(BATCH) {
            rx.release_encoded(&e);
            flush_encoded(&mut sinks, e, &metrics).await;
            last_flush = Instant::now();
        }
        if !pending.is_empty() && (last_flush.elapsed() >= FLUSH_EVERY || !open) {
            rx.release(&pending.records);
            flush(&mut sinks, &mut pending.records, &metrics).await;
            while let Some(e) = pending.take_encoded(0) {
                rx.release_encoded(&e);
                flush_encoded(&mut sinks, e, &metrics).await;
            }
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

/// Sends an encoded batch (queued so only when OTLP is the only exporter).
async fn flush_encoded(sinks: &mut Sinks, e: Encoded, metrics: &Metrics) {
    let Some(o) = sinks.otlp.as_mut() else {
        return;
    };
    let spans = e.spans;
    match o.export_encoded(e.body, spans).await {
        Ok(d) => count_delivered(metrics, spans as u64, &d),
        Err(err) => count_failed(metrics, spans as u64, &err),
    }
}

fn count_failed(metrics: &Metrics, n: u64, e: &dyn std::fmt::Display) {
    log::warn!("{e}");
    metrics.spans_export_failed.fetch_add(n, Relaxed);
}

fn count_delivered(metrics: &Metrics, n: u64, d: &otlp::Delivered) {
    metrics
        .spans_exported
        .fetch_add(d.sent as u64 - d.rejected, Relaxed);
    metrics.spans_export_rejected.fetch_add(d.rejected, Relaxed);
    metrics
        .spans_export_failed
        .fetch_add(n - d.sent as u64, Relaxed);
}

/// Hands a batch to every sink. Delivery is counted per exporter, so with two network
/// exporters each span counts twice in `kspan_spans_exported_total`.
async fn flush(sinks: &mut Sinks, batch: &mut Vec<SpanRecord>, metrics: &Metrics) {
    if batch.is_empty() {
        return;
    }
    let n = batch.len() as u64;
    let mut spans = std::mem::take(batch);
    let failed = |e: &dyn std::fmt::Display| count_failed(metrics, n, e);
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
            Ok(d) => count_delivered(metrics, n, &d),
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
        let (mut queue, mut rx) = SpanQueue::new(4, usize::MAX, metrics.clone(), None);
        let mut out = spans[..10].to_vec();
        queue.push_all(&mut out);
        assert!(out.is_empty(), "the queue takes the batch's spans");
        assert_eq!(metrics.spans_queue_dropped.load(Relaxed), 6);
        let mut pending = Pending::default();
        rx.recv(&mut pending).await;
        let pending = pending.records;
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
        let (mut queue, _rx) = SpanQueue::new(100, 2 * one + one / 2, metrics.clone(), None);
        queue.push_all(&mut same.clone());
        assert_eq!(
            metrics.spans_queue_dropped.load(Relaxed),
            3,
            "two fit in the bytes"
        );
        assert_eq!(queue.held.bytes.load(Relaxed), 2 * one);
    }

    /// Queued encoded, the spans arrive whole: the joined chunks decode to every span pushed,
    /// in order, under their processes' resources; the byte bound drops whole chunks.
    #[tokio::test]
    async fn encoded_chunks_join_into_requests_holding_every_span() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message as _;

        // The corpus repeated past a few chunks (ids repeat: compared as a multiset).
        let corpus = otlp::tests::corpus_spans(false);
        let spans: Vec<SpanRecord> = corpus.iter().cycle().take(3 * BATCH + 5).cloned().collect();
        let metrics = Arc::new(Metrics::default());
        let encoder = Encoder::new("host".into(), false);
        let (mut queue, mut rx) =
            SpanQueue::new(usize::MAX, usize::MAX, metrics.clone(), Some(encoder));
        let mut pending = Pending::default();
        // Small ticks, as the pipeline makes them: chunks are joined up to a batch.
        for tick in spans.chunks(7) {
            queue.push_all(&mut tick.to_vec());
            rx.recv(&mut pending).await;
        }
        let mut ids = Vec::new();
        while let Some(e) = pending.take_encoded(0) {
            assert!(e.spans <= BATCH);
            rx.release_encoded(&e);
            let req = ExportTraceServiceRequest::decode(e.body.as_slice()).expect("protobuf");
            let in_request: Vec<_> = req
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .flat_map(|s| &s.spans)
                .map(|s| s.span_id.clone())
                .collect();
            assert_eq!(in_request.len(), e.spans);
            ids.extend(in_request);
        }
        let want: Vec<_> = spans
            .iter()
            .map(|s| s.span_id.to_be_bytes().to_vec())
            .collect();
        let (mut got, mut want) = (ids, want);
        got.sort();
        want.sort();
        assert_eq!(got, want, "every span once");
        assert_eq!(queue.held.spans.load(Relaxed), 0);
        assert_eq!(queue.held.bytes.load(Relaxed), 0);
        assert_eq!(metrics.spans_queue_dropped.load(Relaxed), 0);

        // Queued encoded, a span takes under half its record's memory (the reason to queue it
        // so; 43 kB against 92 kB for this corpus).
        let mut body = Vec::new();
        Encoder::new("host".into(), false).encode(&corpus, &mut body);
        let records: usize = corpus.iter().map(SpanRecord::footprint).sum();
        assert!(
            2 * body.len() < records,
            "{} encoded, {records} as records",
            body.len()
        );

        // Room for one chunk's bytes: the second chunk is dropped whole, and counted.
        let mut one = Vec::new();
        Encoder::new("host".into(), false).encode(&spans[..BATCH], &mut one);
        let metrics = Arc::new(Metrics::default());
        let encoder = Encoder::new("host".into(), false);
        let (mut queue, _rx) =
            SpanQueue::new(usize::MAX, one.len() + 10, metrics.clone(), Some(encoder));
        queue.push_all(&mut spans[..2 * BATCH].to_vec());
        assert_eq!(metrics.spans_queue_dropped.load(Relaxed), BATCH as u64);
        assert_eq!(queue.held.spans.load(Relaxed), BATCH);
    }
}
