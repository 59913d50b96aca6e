//! Userspace throughput, one thread, per second of that thread's CPU time:
//! - replay: recorded kernel events → decode → connection streams → HTTP → linked spans →
//!   OTLP protobuf (kspan's encoder), in HTTP messages/s;
//! - encoding alone, side by side: the same spans through the OpenTelemetry SDK path
//!   (`SpanData`, opentelemetry-proto's conversion, prost encoding: what opentelemetry-otlp
//!   does before sending) and through kspan's encoder, in spans/s.
//!
//! `cargo bench -p kspan --bench replay -- [RECORDING] [CPU-SECONDS] [replay]`; without a recording
//! (or with `synthetic` in its place) it synthesises keep-alive traffic with B3 headers.
use std::{fs::File, hint::black_box, io::BufReader, time::Duration};

use kspan::{
    capture::{
        event::{self, ConnId, Direction, Endpoints, Event, EventKind, Role},
        replay::Player,
    },
    config::Filter,
    export::otlp::{encode::Encoder, sdk},
    pipeline::{Pipeline, PipelineOptions},
    process::ProcessCache,
    trace::span::SpanRecord,
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::{
    common::tonic::ResourceAttributesWithSchema, trace::tonic::group_spans_by_resource_and_scope,
};
use prost::Message as _;

// Same allocator as the agent binary, so the numbers transfer.
#[global_allocator]
static ALLOC: kspan::allocator::MiMalloc = kspan::allocator::MiMalloc;

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn load(path: &str) -> Vec<Vec<u8>> {
    let file = File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut player = Player::new(BufReader::new(file)).expect("a kspan recording");
    let mut out = Vec::new();
    while let Some(r) = player.next_record().expect("readable recording") {
        out.push(r.to_vec());
    }
    out
}

/// 64 client/server connection pairs, 50 keep-alive requests each.
fn synthesise() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut ts = 1_000_000;
    let req = b"GET /api/v1/items?id=42 HTTP/1.1\r\nHost: shop.internal:8080\r\nUser-Agent: bench/1.0\r\nAccept: */*\r\nX-B3-TraceId: 463ac35c9f6413ad48485a3953bb6124\r\nX-B3-SpanId: a2fb4a1d1a96d312\r\nX-B3-Sampled: 1\r\n\r\n";
    let resp = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n{\"id\":42,\"name\":\"kspan\"}\r\n";
    for c in 0..64u32 {
        let client = ConnId {
            sock: 0x1000 + c as u64,
            generation: c as u64,
        };
        let server = ConnId {
            sock: 0x2000 + c as u64,
            generation: 1000 + c as u64,
        };
        let cli_addr = format!("127.0.0.1:{}", 40000 + c).parse().unwrap();
        let srv_addr = "127.0.0.1:8080".parse().unwrap();
        for _ in 0..50 {
            for (conn, tgid, role, dir, bytes, local, peer) in [
                (
                    client,
                    1000,
                    Role::Client,
                    Direction::Egress,
                    &req[..],
                    cli_addr,
                    srv_addr,
                ),
                (
                    server,
                    2000,
                    Role::Server,
                    Direction::Ingress,
                    &req[..],
                    srv_addr,
                    cli_addr,
                ),
                (
                    server,
                    2000,
                    Role::Server,
                    Direction::Egress,
                    &resp[..],
                    srv_addr,
                    cli_addr,
                ),
                (
                    client,
                    1000,
                    Role::Client,
                    Direction::Ingress,
                    &resp[..],
                    cli_addr,
                    srv_addr,
                ),
            ] {
                ts += 5_000;
                out.push(event::encode(&Event {
                    conn,
                    tgid,
                    tid: tgid,
                    ts_ns: ts,
                    role,
                    endpoints: Some(Endpoints {
                        local,
                        peer,
                        netns: 1,
                    }),
                    comm: *b"bench\0\0\0\0\0\0\0\0\0\0\0",
                    discovered: false,
                    opener: Default::default(),
                    protocol: 0,
                    tls: false,
                    goroutine: 0,
                    kind: EventKind::Data {
                        direction: dir,
                        total_len: bytes.len() as u64,
                        payload: bytes,
                        framed: false,
                        frame_start: false,
                        gap: false,
                        tail: false,
                    },
                }));
            }
        }
    }
    out
}

fn options() -> PipelineOptions {
    PipelineOptions {
        privacy: Default::default(),
        sampler: Default::default(),
        filter: Filter::default(),
        linger_ns: 0,
        max_linger_bytes: usize::MAX,
        max_open_spans: 100_000,
        max_conns: 65_536,
        clock_offset_ns: 0,
        db_server_spans: false,
    }
}

const BATCH: usize = 512;

/// Replays `records` until `budget` of CPU is spent, encoding every span to OTLP.
fn replay(records: &[Vec<u8>], budget: Duration) -> String {
    let (mut events, mut messages, mut spans, mut bytes) = (0u64, 0u64, 0u64, 0u64);
    let mut encoder = Encoder::new("bench-host".into(), false);
    let mut body = Vec::new();
    let start = thread_cpu();
    let mut out = Vec::new();
    let mut encode = |out: &mut Vec<SpanRecord>, force: bool| {
        if out.len() >= BATCH || (force && !out.is_empty()) {
            body.clear();
            encoder.encode(out, &mut body);
            bytes += black_box(body.len()) as u64;
            spans += out.len() as u64;
            out.clear();
        }
    };
    // At least one pass: a budget of 0 replays the recording once (for instruction counts).
    loop {
        let mut p = Pipeline::new(options(), ProcessCache::new("/proc"));
        let mut last_ts = 0;
        for (i, r) in records.iter().enumerate() {
            if let Ok(ev) = event::decode(r) {
                last_ts = ev.ts_ns;
                p.handle(ev);
            }
            if i % 256 == 255 {
                p.tick(last_ts, &mut out);
                encode(&mut out, false);
            }
        }
        p.tick(u64::MAX, &mut out);
        encode(&mut out, true);
        events += records.len() as u64;
        // Every decoded request has a response in these workloads: two messages per request.
        messages += 2 * p.stats.requests;
        if thread_cpu() - start >= budget {
            break;
        }
    }
    let cpu = (thread_cpu() - start).as_secs_f64();
    format!(
        "| events/s | HTTP messages/s per core (spans encoded to OTLP) | spans/s | OTLP bytes per span | events replayed | CPU s |\n|---|---|---|---|---|---|\n| {:.0} | **{:.0}** | {:.0} | {:.0} | {events} | {cpu:.2} |\n",
        events as f64 / cpu,
        messages as f64 / cpu,
        spans as f64 / cpu,
        bytes as f64 / spans.max(1) as f64,
    )
}

/// The spans one pass over `records` makes.
fn spans_of(records: &[Vec<u8>]) -> Vec<SpanRecord> {
    let mut p = Pipeline::new(options(), ProcessCache::new("/proc"));
    let mut out = Vec::new();
    for r in records {
        if let Ok(ev) = event::decode(r) {
            let ts = ev.ts_ns;
            p.handle(ev);
            p.tick(ts, &mut out);
        }
    }
    p.tick(u64::MAX, &mut out);
    out
}

/// Encoding alone: batches of `spans` through the SDK path and through kspan's encoder, each
/// for `budget` of CPU; spans/s of each.
fn encoding(spans: &[SpanRecord], budget: Duration) -> String {
    let batches: Vec<&[SpanRecord]> = spans.chunks(BATCH).collect();
    let scope = sdk::scope();
    let mut sdk_cpu = Duration::ZERO;
    let mut sdk_spans = 0u64;
    let resources: Vec<_> = batches
        .iter()
        .map(|b| {
            ResourceAttributesWithSchema::from(&sdk::resource(&b[0].process, "bench-host", false))
        })
        .collect();
    while sdk_cpu < budget {
        for (batch, resource) in batches.iter().zip(&resources) {
            // The SDK exporter consumes its batch: the copy is made outside the clock.
            let owned = batch.to_vec();
            let t = thread_cpu();
            let data = owned
                .into_iter()
                .map(|s| sdk::to_span_data(s, &scope))
                .collect();
            let req = ExportTraceServiceRequest {
                resource_spans: group_spans_by_resource_and_scope(data, resource),
            };
            black_box(req.encode_to_vec());
            sdk_cpu += thread_cpu() - t;
            sdk_spans += batch.len() as u64;
        }
    }
    let mut encoder = Encoder::new("bench-host".into(), false);
    let mut body = Vec::new();
    let mut ours_spans = 0u64;
    let t = thread_cpu();
    while thread_cpu() - t < budget {
        for batch in &batches {
            body.clear();
            encoder.encode(batch, &mut body);
            black_box(&body);
            ours_spans += batch.len() as u64;
        }
    }
    let ours_cpu = thread_cpu() - t;
    let sdk_rate = sdk_spans as f64 / sdk_cpu.as_secs_f64();
    let ours_rate = ours_spans as f64 / ours_cpu.as_secs_f64();
    format!(
        "| encoder | spans/s per core | CPU s |\n|---|---|---|\n| OpenTelemetry SDK path (SpanData → opentelemetry-proto → prost) | {sdk_rate:.0} | {:.2} |\n| kspan's encoder (records → protobuf) | **{ours_rate:.0}** | {:.2} |\n\nkspan's encoder / SDK path: **{:.1}×** (batches of {BATCH}, {} distinct spans).\n",
        sdk_cpu.as_secs_f64(),
        ours_cpu.as_secs_f64(),
        ours_rate / sdk_rate,
        spans.len(),
    )
}

fn main() {
    // cargo passes `--bench`; everything else is ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let (records, source) = match args.first() {
        Some(path) if path != "synthetic" => {
            (load(path), format!("recording of real traffic ({path})"))
        }
        _ => (
            synthesise(),
            "synthetic keep-alive traffic with B3 headers".to_string(),
        ),
    };
    let budget = Duration::from_secs_f64(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3.0));
    println!("Replay benchmark (userspace pipeline and OTLP encoding on one thread, {source}):\n");
    println!("{}", replay(&records, budget));
    // A third argument `replay` stops here (for profiling the pipeline alone).
    if args.get(2).is_some_and(|a| a == "replay") {
        return;
    }
    println!("Encoding alone, the same spans both ways (one thread):\n");
    println!("{}", encoding(&spans_of(&records), budget));
}
