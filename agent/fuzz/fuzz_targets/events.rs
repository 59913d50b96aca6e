//! Kernel events through the whole pipeline (connections, HTTP/1, HTTP/2, chunked HTTP/2
//! records, TLS notices and plaintext, linking, metrics). Raw records exercise the decoder, which must turn malformed
//! ones into errors; structured events built from the input reach deep into the pipeline.
//! Nothing may panic.
#![no_main]
use kspan::{
    capture::event::{self, ConnId, Direction, Endpoints, Event, EventKind, Role},
    config::Filter,
    pipeline::{Pipeline, PipelineOptions},
    process::ProcessCache,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut pipeline = Pipeline::new(
        PipelineOptions {
            filter: Filter::default(),
            linger_ns: 1_000,
            max_linger_bytes: usize::MAX,
            max_open_spans: 64,
            max_conns: 16,
            clock_offset_ns: 0,
            db_server_spans: false,
            privacy: Default::default(),
            sampler: Default::default(),
        },
        ProcessCache::new("/nonexistent"),
    );
    let mut spans = Vec::new();
    let mut rest = data;
    let mut ts = 1_000;
    // Each item: [op][len lo][len hi][len bytes].
    while let [op, lo, hi, tail @ ..] = rest {
        let n = (u16::from_le_bytes([*lo, *hi]) as usize).min(tail.len());
        let (bytes, next) = tail.split_at(n);
        rest = next;
        ts += 10;
        if op & 0x80 != 0 {
            if let Ok(ev) = event::decode(bytes) {
                pipeline.handle(ev);
            }
        } else {
            // Two processes talking over one of four connections, from either end.
            let pair = (op & 3) as u32;
            let server_side = op & 4 != 0;
            let (tgid, local, peer) = if server_side {
                (2, 8080, 40000 + pair as u16)
            } else {
                (1, 40000 + pair as u16, 8080)
            };
            let kind = if op & 0x40 != 0 && bytes.is_empty() {
                EventKind::Close
            } else {
                EventKind::Data {
                    direction: if op & 8 != 0 {
                        Direction::Egress
                    } else {
                        Direction::Ingress
                    },
                    total_len: bytes.len() as u64 + ((op >> 4) & 1) as u64 * 100,
                    payload: bytes,
                    framed: op & 0x20 != 0,
                    frame_start: op & 0x30 == 0x30,
                    gap: op & 0x40 != 0,
                    tail: false,
                }
            };
            pipeline.handle(Event {
                conn: ConnId {
                    sock: (tgid as u64) << 8 | pair as u64,
                    generation: pair as u64,
                },
                tgid,
                tid: tgid,
                ts_ns: ts,
                role: match (op >> 4) & 3 {
                    0 => Role::Unknown,
                    _ if server_side => Role::Server,
                    _ => Role::Client,
                },
                endpoints: Some(Endpoints {
                    local: ([127, 0, 0, 1], local).into(),
                    peer: ([127, 0, 0, 1], peer).into(),
                    netns: 1,
                }),
                comm: *b"fuzz\0\0\0\0\0\0\0\0\0\0\0\0",
                discovered: op & 0x30 == 0,
                opener: Default::default(),
                // An empty record with this bit is a TLS socket's notice (or its close); a
                // payload whose first byte has its high bit set is TLS plaintext.
                protocol: if bytes.is_empty() && op & 0x10 != 0 {
                    kspan_common::proto::TLS
                } else {
                    0
                },
                tls: bytes.first().is_some_and(|b| b & 0x80 != 0),
                // Goroutine records (decoded above) may name these.
                goroutine: u64::from(op & 3),
                kind,
            });
        }
        pipeline.tick(ts, &mut spans);
        spans.clear();
    }
    pipeline.expire(u64::MAX);
    pipeline.tick(u64::MAX, &mut spans);
    let mut text = String::new();
    pipeline.red.render(&mut text);
});
