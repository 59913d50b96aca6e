//! Userspace pipeline throughput: recorded kernel events → decode → connection streams →
//! HTTP/1 → linked spans → OTLP `SpanData` (then dropped). One thread; reports HTTP messages
//! per second of that thread's CPU time.
//!
//! `cargo bench -p kspan --bench replay -- [RECORDING] [CPU-SECONDS]`; without a recording it
//! synthesises keep-alive traffic with B3 headers.
use std::{fs::File, hint::black_box, io::BufReader, time::Duration};

use kspan::{
    capture::{
        event::{self, ConnId, Direction, Endpoints, Event, EventKind, Role},
        replay::Player,
    },
    config::Filter,
    export::otlp,
    pipeline::{Pipeline, PipelineOptions},
    process::ProcessCache,
};

// Same allocator as the agent binary, so the numbers transfer.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

fn main() {
    // cargo passes `--bench`; everything else is ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let (records, source) = match args.first() {
        Some(path) => (load(path), format!("recording of real traffic ({path})")),
        None => (
            synthesise(),
            "synthetic keep-alive traffic with B3 headers".to_string(),
        ),
    };
    let budget = Duration::from_secs_f64(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3.0));
    let scope = otlp::scope();
    let (mut events, mut messages, mut spans) = (0u64, 0u64, 0u64);
    let start = thread_cpu();
    let mut out = Vec::new();
    while thread_cpu() - start < budget {
        let opts = PipelineOptions {
            privacy: Default::default(),
            sampler: Default::default(),
            filter: Filter::default(),
            linger_ns: 0,
            max_open_spans: 100_000,
            max_conns: 65_536,
            clock_offset_ns: 0,
            db_server_spans: false,
        };
        let mut p = Pipeline::new(opts, ProcessCache::new("/proc"));
        let mut last_ts = 0;
        for (i, r) in records.iter().enumerate() {
            if let Ok(ev) = event::decode(r) {
                last_ts = ev.ts_ns;
                p.handle(ev);
            }
            if i % 256 == 255 {
                p.tick(last_ts, &mut out);
                spans += out.len() as u64;
                out.drain(..)
                    .for_each(|s| drop(black_box(otlp::to_span_data(s, &scope))));
            }
        }
        p.tick(u64::MAX, &mut out);
        spans += out.len() as u64;
        out.drain(..)
            .for_each(|s| drop(black_box(otlp::to_span_data(s, &scope))));
        events += records.len() as u64;
        // Every decoded request has a response in these workloads: two messages per request.
        messages += 2 * p.stats.requests;
    }
    let cpu = (thread_cpu() - start).as_secs_f64();
    println!("Replay benchmark (userspace pipeline on one thread, {source}):\n");
    println!("| events/s | HTTP messages/s per core | spans/s | events replayed | CPU s |");
    println!("|---|---|---|---|---|");
    println!(
        "| {:.0} | **{:.0}** | {:.0} | {events} | {cpu:.2} |",
        events as f64 / cpu,
        messages as f64 / cpu,
        spans as f64 / cpu
    );
}
