//! Decodes ring-buffer records into owned events. Pure: also used by replay.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use kspan_common::{
    EventHeader, GoRecord, H2_CHUNK_HEADER, TAIL_LEN, Tuple, direction, event_flags, kind, role,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than the event header")]
    Short(usize),
    #[error("record claims {claimed} payload bytes but carries {actual}")]
    PayloadLength { claimed: usize, actual: usize },
    #[error("unknown record kind {0}")]
    Kind(u32),
    #[error("framed payload is malformed (chunks do not add up to the record)")]
    Chunks,
}

/// Identity of one connection for its whole life: the socket (its kernel address, shared by
/// every fd and process holding it), and a generation, since addresses are reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub sock: u64,
    pub generation: u64,
}

/// The process that accepted, connected or first used a socket, and its parent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Opener {
    pub tgid: u32,
    pub parent: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
    /// A socket found already open: the first message tells which side we are.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Bytes the process received.
    Ingress,
    /// Bytes the process sent.
    Egress,
}

/// Socket addresses as seen from the traced process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoints {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub netns: u32,
}

/// Borrows its payload from the ring buffer (or recording): the hot path copies nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind<'a> {
    Data {
        direction: Direction,
        /// Bytes the syscall moved (for a framed record: the part it describes); `payload` may
        /// hold fewer (copy cap, sendfile, uncopied HTTP/2 DATA).
        total_len: u64,
        payload: &'a [u8],
        /// `payload` is a sequence of chunks from the kernel's HTTP/2 frame walk, not a plain
        /// prefix: read it through [`pieces`].
        framed: bool,
        /// A framed record that starts with an HTTP/2 frame header (a resynchronisation point).
        frame_start: bool,
        /// A plain payload whose last `TAIL_LEN` bytes are the syscall's last bytes.
        tail: bool,
        /// Earlier events of this connection were lost.
        gap: bool,
    },
    Close,
    /// Process `tgid` exec'ed (no connection: `conn` is zero).
    Exec,
    /// What the Go runtime probes saw goroutine `Event::goroutine` do (no connection).
    Go(GoEvent),
}

/// Goroutine lineage and hand-offs, from the Go runtime probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoEvent {
    /// The goroutine was created by `parent`.
    Spawned { parent: u64 },
    /// The goroutine handed a request to HTTP/1 client connection `conn` (a `*persistConn`).
    Calls { conn: u64 },
    /// The goroutine writes client connection `conn`'s requests.
    Writes { conn: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event<'a> {
    pub conn: ConnId,
    /// The process and thread that moved the bytes (0 for `Close`).
    pub tgid: u32,
    pub tid: u32,
    pub ts_ns: u64,
    pub role: Role,
    /// `None` when the kernel could not read the socket's addresses.
    pub endpoints: Option<Endpoints>,
    /// `comm` of the thread that opened the connection (NUL-padded).
    pub comm: [u8; 16],
    /// The socket predates the agent: its request order is unknown.
    pub discovered: bool,
    pub opener: Opener,
    /// The protocol the kernel recognised (`kspan_common::proto`); `UNKNOWN` when the first
    /// payload was too short to tell. For TLS plaintext, the plaintext's protocol; `TLS` on
    /// the notice that a connection speaks TLS, and on the close of one.
    pub protocol: u8,
    /// The payload is TLS plaintext read at the library's boundary.
    pub tls: bool,
    /// The goroutine (`g` address) that made the syscall, in a Go process; meaningless in
    /// others. For [`EventKind::Go`], the goroutine it is about.
    pub goroutine: u64,
    pub kind: EventKind<'a>,
}

const HEADER_LEN: usize = size_of::<EventHeader>();

fn addr(family: u16, raw: [u8; 16]) -> Option<IpAddr> {
    match family {
        2 => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        10 => {
            let v6 = Ipv6Addr::from(raw);
            // Dual-stack listeners see IPv4 peers as ::ffff:a.b.c.d; the other side of the same
            // connection sees plain IPv4, and both must compare equal.
            Some(
                v6.to_ipv4_mapped()
                    .map(IpAddr::V4)
                    .unwrap_or(IpAddr::V6(v6)),
            )
        }
        _ => None,
    }
}

pub fn endpoints(t: &Tuple) -> Option<Endpoints> {
    Some(Endpoints {
        local: SocketAddr::new(addr(t.family, t.local_addr)?, t.local_port),
        peer: SocketAddr::new(addr(t.family, t.peer_addr)?, t.peer_port),
        netns: t.netns,
    })
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    if let Some(ev) = decode_go(bytes)? {
        return Ok(ev);
    }
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Short(bytes.len()));
    }
    // SAFETY: EventHeader is plain old data of exactly HEADER_LEN bytes; read_unaligned copes
    // with any alignment of the record.
    let h: EventHeader = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let conn = ConnId {
        sock: h.sock,
        generation: h.conn.generation,
    };
    let role = match h.conn.role {
        role::SERVER => Role::Server,
        role::CLIENT => Role::Client,
        _ => Role::Unknown,
    };
    let kind = match h.kind {
        kind::DATA => {
            let payload = &bytes[HEADER_LEN..];
            let claimed = h.captured_len as usize;
            if claimed > payload.len() {
                return Err(DecodeError::PayloadLength {
                    claimed,
                    actual: payload.len(),
                });
            }
            let payload = &payload[..claimed];
            let framed = h.flags & event_flags::FRAMED != 0;
            if framed && !chunks_valid(payload, h.total_len) {
                return Err(DecodeError::Chunks);
            }
            EventKind::Data {
                direction: if h.direction == direction::EGRESS {
                    Direction::Egress
                } else {
                    Direction::Ingress
                },
                total_len: h.total_len,
                payload,
                framed,
                frame_start: framed && h.flags & event_flags::FRAME_START != 0,
                tail: !framed
                    && h.flags & event_flags::TAIL != 0
                    && payload.len() >= 2 * TAIL_LEN
                    && h.total_len > payload.len() as u64,
                gap: h.flags & event_flags::GAP != 0,
            }
        }
        kind::CLOSE => EventKind::Close,
        kind::EXEC => EventKind::Exec,
        other => return Err(DecodeError::Kind(other)),
    };
    Ok(Event {
        conn,
        tgid: h.tgid,
        tid: h.tid,
        ts_ns: h.ts_ns,
        role,
        endpoints: endpoints(&h.conn.tuple),
        comm: h.conn.comm,
        discovered: h.conn.discovered != 0,
        opener: Opener {
            tgid: h.conn.opener_tgid,
            parent: h.conn.opener_parent_tgid,
        },
        protocol: h.conn.proto,
        tls: h.flags & event_flags::TLS != 0,
        goroutine: h.goroutine,
        kind,
    })
}

/// A record of the Go runtime probes, which is shorter than the others.
fn decode_go(bytes: &[u8]) -> Result<Option<Event<'_>>, DecodeError> {
    let Some(k) = bytes.first_chunk::<4>().map(|k| u32::from_ne_bytes(*k)) else {
        return Err(DecodeError::Short(bytes.len()));
    };
    if !matches!(k, kind::GO_SPAWN | kind::GO_CALL | kind::GO_WRITER) {
        return Ok(None);
    }
    if bytes.len() < size_of::<GoRecord>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    // SAFETY: GoRecord is plain old data; the length was checked.
    let r: GoRecord = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let go = match k {
        kind::GO_SPAWN => GoEvent::Spawned { parent: r.related },
        kind::GO_CALL => GoEvent::Calls { conn: r.related },
        _ => GoEvent::Writes { conn: r.related },
    };
    Ok(Some(Event {
        conn: ConnId {
            sock: 0,
            generation: 0,
        },
        tgid: r.tgid,
        tid: 0,
        ts_ns: r.ts_ns,
        role: Role::Unknown,
        endpoints: None,
        comm: [0; 16],
        discovered: false,
        opener: Opener::default(),
        protocol: 0,
        tls: false,
        goroutine: r.goroutine,
        kind: EventKind::Go(go),
    }))
}

/// The chunk header at the start of `bytes`: (copied, skipped).
fn chunk_header(bytes: &[u8]) -> Option<(usize, u64)> {
    let h = bytes.get(..H2_CHUNK_HEADER)?;
    let copied = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let skipped = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as u64;
    Some((copied, skipped))
}

/// Whether a framed payload is whole chunks describing no more than `total_len` bytes.
fn chunks_valid(mut bytes: &[u8], total_len: u64) -> bool {
    let mut covered = 0u64;
    while !bytes.is_empty() {
        let Some((copied, skipped)) = chunk_header(bytes) else {
            return false;
        };
        let Some(rest) = bytes.get(H2_CHUNK_HEADER + copied..) else {
            return false;
        };
        covered += copied as u64 + skipped;
        bytes = rest;
    }
    covered <= total_len
}

/// The bytes of a data event as runs of copied bytes, each followed by how many bytes the
/// stream continues with that were not copied. A plain prefix is one run (two with a `tail`:
/// the prefix, then the syscall's last bytes); a framed payload one run per chunk. Bytes the
/// record describes beyond its chunks follow the last run.
pub fn pieces(payload: &[u8], framed: bool, tail: bool, total_len: u64) -> Pieces<'_> {
    Pieces {
        rest: payload,
        framed,
        tail: tail && !framed && payload.len() >= TAIL_LEN,
        left: total_len,
        done: false,
    }
}

pub struct Pieces<'a> {
    rest: &'a [u8],
    framed: bool,
    /// The last `TAIL_LEN` bytes of `rest` end the record.
    tail: bool,
    /// Bytes of the record not yet yielded (copied or not).
    left: u64,
    done: bool,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = (&'a [u8], u64);

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let (copied, mut skipped) = if self.framed {
            let (copied, skipped) = chunk_header(self.rest).unwrap_or((0, 0));
            let body = self.rest.get(H2_CHUNK_HEADER..).unwrap_or_default();
            let copied = &body[..copied.min(body.len())];
            self.rest = &body[copied.len()..];
            (copied, skipped)
        } else if self.tail {
            self.tail = false;
            let (prefix, tail) = self.rest.split_at(self.rest.len() - TAIL_LEN);
            self.rest = tail;
            let skipped = self.left.saturating_sub((prefix.len() + TAIL_LEN) as u64);
            (prefix, skipped)
        } else {
            (std::mem::take(&mut self.rest), 0)
        };
        self.left = self.left.saturating_sub(copied.len() as u64);
        if self.rest.is_empty() {
            self.done = true;
            skipped = self.left;
        }
        self.left = self.left.saturating_sub(skipped);
        Some((copied, skipped))
    }
}

/// The first run of copied bytes: where a connection's first message shows its protocol.
pub fn first_bytes(payload: &[u8], framed: bool) -> &[u8] {
    pieces(payload, framed, false, 0)
        .next()
        .map_or(&[], |p| p.0)
}

/// Encodes an event back into the kernel's record layout (used by recording and tests).
pub fn encode(ev: &Event<'_>) -> Vec<u8> {
    let h = EventHeader {
        tgid: ev.tgid,
        sock: ev.conn.sock,
        tid: ev.tid,
        ts_ns: ev.ts_ns,
        goroutine: ev.goroutine,
        ..Default::default()
    };
    encode_header(ev, h)
}

fn encode_go(ev: &Event<'_>, go: GoEvent) -> Vec<u8> {
    let (kind, related) = match go {
        GoEvent::Spawned { parent } => (kind::GO_SPAWN, parent),
        GoEvent::Calls { conn } => (kind::GO_CALL, conn),
        GoEvent::Writes { conn } => (kind::GO_WRITER, conn),
    };
    let r = GoRecord {
        kind,
        tgid: ev.tgid,
        ts_ns: ev.ts_ns,
        goroutine: ev.goroutine,
        related,
    };
    // SAFETY: GoRecord is plain old data without implicit padding.
    unsafe {
        std::slice::from_raw_parts((&r as *const GoRecord).cast::<u8>(), size_of::<GoRecord>())
    }
    .to_vec()
}

fn encode_header(ev: &Event<'_>, mut h: EventHeader) -> Vec<u8> {
    h.conn.generation = ev.conn.generation;
    h.conn.comm = ev.comm;
    h.conn.role = match ev.role {
        Role::Server => role::SERVER,
        Role::Client => role::CLIENT,
        Role::Unknown => 0,
    };
    h.conn.discovered = ev.discovered as u8;
    h.conn.opener_tgid = ev.opener.tgid;
    h.conn.opener_parent_tgid = ev.opener.parent;
    h.conn.proto = ev.protocol;
    if let Some(e) = &ev.endpoints {
        let put = |a: IpAddr, out: &mut [u8; 16]| match a {
            IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => *out = v6.octets(),
        };
        h.conn.tuple.family = if e.local.is_ipv4() { 2 } else { 10 };
        h.conn.tuple.local_port = e.local.port();
        h.conn.tuple.peer_port = e.peer.port();
        h.conn.tuple.netns = e.netns;
        put(e.local.ip(), &mut h.conn.tuple.local_addr);
        put(e.peer.ip(), &mut h.conn.tuple.peer_addr);
    }
    let payload: &[u8] = match &ev.kind {
        EventKind::Data {
            direction: d,
            total_len,
            payload,
            framed,
            frame_start,
            gap,
            tail,
        } => {
            h.kind = kind::DATA;
            h.direction = if *d == Direction::Egress {
                direction::EGRESS
            } else {
                direction::INGRESS
            };
            h.total_len = *total_len;
            h.captured_len = payload.len() as u32;
            if *gap {
                h.flags |= event_flags::GAP;
            }
            if *framed {
                h.flags |= event_flags::FRAMED;
            }
            if *frame_start {
                h.flags |= event_flags::FRAME_START;
            }
            if *tail {
                h.flags |= event_flags::TAIL;
            }
            if payload.is_empty() && *total_len > 0 {
                h.flags |= event_flags::NO_PAYLOAD;
            }
            payload
        }
        EventKind::Close => {
            h.kind = kind::CLOSE;
            &[]
        }
        EventKind::Exec => {
            h.kind = kind::EXEC;
            &[]
        }
        EventKind::Go(go) => return encode_go(ev, *go),
    };
    if ev.tls {
        h.flags |= event_flags::TLS;
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    // SAFETY: EventHeader is plain old data without implicit padding.
    out.extend_from_slice(unsafe {
        std::slice::from_raw_parts((&h as *const EventHeader).cast::<u8>(), HEADER_LEN)
    });
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Event<'static> {
        Event {
            conn: ConnId {
                sock: 0xffff_8880_1234_5600,
                generation: 99,
            },
            tgid: 7,
            tid: 8,
            ts_ns: 1234,
            role: Role::Server,
            endpoints: Some(Endpoints {
                local: "[2001:db8::2]:8080".parse().unwrap(),
                peer: "[2001:db8::1]:5555".parse().unwrap(),
                netns: 4026531840,
            }),
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            discovered: true,
            opener: Opener { tgid: 6, parent: 1 },
            protocol: 0,
            tls: false,
            goroutine: 0x00c0_0000_21c0,
            kind: EventKind::Data {
                direction: Direction::Ingress,
                total_len: 10_000,
                payload: b"GET / HTTP/1.1\r\n",
                framed: false,
                frame_start: false,
                gap: true,
                tail: false,
            },
        }
    }

    #[test]
    fn roundtrips() {
        let ev = sample();
        assert_eq!(decode(&encode(&ev)).unwrap(), ev);
        let close = Event {
            kind: EventKind::Close,
            ..sample()
        };
        assert_eq!(decode(&encode(&close)).unwrap(), close);
    }

    #[test]
    fn goroutine_records_roundtrip_without_a_connection() {
        for go in [
            GoEvent::Spawned {
                parent: 0x00c0_0000_0680,
            },
            GoEvent::Calls {
                conn: 0x00c0_001e_0000,
            },
            GoEvent::Writes {
                conn: 0x00c0_001e_0000,
            },
        ] {
            let ev = Event {
                conn: ConnId {
                    sock: 0,
                    generation: 0,
                },
                tid: 0,
                role: Role::Unknown,
                endpoints: None,
                comm: [0; 16],
                discovered: false,
                opener: Opener::default(),
                kind: EventKind::Go(go),
                ..sample()
            };
            let bytes = encode(&ev);
            assert_eq!(bytes.len(), size_of::<GoRecord>());
            assert_eq!(decode(&bytes), Ok(ev));
            assert_eq!(decode(&bytes[..20]), Err(DecodeError::Short(20)));
        }
    }

    fn chunk(copied: &[u8], skipped: u32) -> Vec<u8> {
        let mut c = (copied.len() as u32).to_le_bytes().to_vec();
        c.extend(skipped.to_le_bytes());
        c.extend_from_slice(copied);
        c
    }

    #[test]
    fn a_tail_is_the_last_run_after_the_uncopied_middle() {
        let payload: Vec<u8> = (0..200u8).collect();
        let runs: Vec<_> = pieces(&payload, false, true, 1000).collect();
        assert_eq!(runs, [(&payload[..136], 800), (&payload[136..], 0)]);
        // Too short to carry a tail: decoded as a plain prefix.
        let mut h = EventHeader {
            kind: kind::DATA,
            total_len: 1000,
            captured_len: 100,
            flags: event_flags::TAIL,
            ..Default::default()
        };
        h.conn.tuple.family = 2;
        let mut record = unsafe {
            std::slice::from_raw_parts(&h as *const EventHeader as *const u8, HEADER_LEN)
        }
        .to_vec();
        record.extend([b'x'; 100]);
        let EventKind::Data { tail, .. } = decode(&record).unwrap().kind else {
            panic!("data");
        };
        assert!(!tail);
    }

    #[test]
    fn framed_payloads_yield_runs_and_uncopied_counts() {
        let mut payload = chunk(b"abc", 100);
        payload.extend(chunk(b"de", 0));
        let framed = Event {
            kind: EventKind::Data {
                direction: Direction::Ingress,
                total_len: 110,
                payload: &payload,
                framed: true,
                frame_start: true,
                gap: false,
                tail: false,
            },
            ..sample()
        };
        assert_eq!(decode(&encode(&framed)).unwrap(), framed);
        // The 5 bytes the record describes beyond its chunks follow the last run.
        let runs: Vec<_> = pieces(&payload, true, false, 110).collect();
        assert_eq!(runs, [(&b"abc"[..], 100), (&b"de"[..], 5)]);
        assert_eq!(first_bytes(&payload, true), b"abc");
        let plain: Vec<_> = pieces(b"GET /", false, false, 9).collect();
        assert_eq!(plain, [(&b"GET /"[..], 4)]);
        assert_eq!(
            pieces(b"", false, false, 7).collect::<Vec<_>>(),
            [(&b""[..], 7)]
        );
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for (payload, total) in [
            (chunk(b"abc", 100)[..6].to_vec(), 200),  // cut chunk header
            (chunk(b"abc", 100)[..10].to_vec(), 200), // cut copied bytes
            (chunk(b"abc", 100), 50),                 // more than the record describes
        ] {
            let ev = Event {
                kind: EventKind::Data {
                    direction: Direction::Egress,
                    total_len: total,
                    payload: &payload,
                    framed: true,
                    frame_start: false,
                    gap: false,
                    tail: false,
                },
                ..sample()
            };
            assert_eq!(
                decode(&encode(&ev)),
                Err(DecodeError::Chunks),
                "{payload:?}"
            );
        }
    }

    #[test]
    fn v4_mapped_addresses_become_v4() {
        let mut raw = [0u8; 16];
        raw[10] = 0xff;
        raw[11] = 0xff;
        raw[12..].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(addr(10, raw), Some("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn malformed_records_are_errors() {
        assert_eq!(decode(&[0; 8]), Err(DecodeError::Short(8)));
        let mut bytes = encode(&sample());
        bytes.truncate(bytes.len() - 1);
        assert!(matches!(
            decode(&bytes),
            Err(DecodeError::PayloadLength { .. })
        ));
        let mut bytes = encode(&sample());
        bytes[0] = 9;
        assert_eq!(decode(&bytes), Err(DecodeError::Kind(9)));
    }
}
