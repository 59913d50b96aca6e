//! HTTP/2 (RFC 9113) framing seen from the side: both directions of one connection, decoded
//! into per-stream header blocks, data counts and stream ends.
//!
//! Uncaptured bytes (beyond the per-syscall copy cap) are fine inside DATA payloads, which are
//! only counted. Inside a header block they make that block's dynamic-table changes unknown
//! ([`hpack::Decoder::lost_block`]); inside a frame header they lose framing for good, since
//! HTTP/2 has no resynchronisation point.
use super::{
    hpack,
    http1::{self, Headers, Text},
};

pub mod exchanges;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether bytes begin with a plausible HTTP/2 frame header (mirrors the kernel's check for
/// sockets found mid-life).
pub fn frame_start(data: &[u8]) -> bool {
    let [len_hi, _, _, kind, _, s0, s1, s2, s3, ..] = *data else {
        return false;
    };
    let stream_zero = [s0, s1, s2, s3] == [0, 0, 0, 0];
    len_hi == 0
        && s0 & 0x80 == 0
        && match kind {
            SETTINGS | 0x6 | GOAWAY => stream_zero,
            DATA | HEADERS | 0x2 | RST_STREAM | PUSH_PROMISE | CONTINUATION => !stream_zero,
            0x8 => true,
            _ => false,
        }
}

/// Whether the first bytes one side sends open an HTTP/2 connection: the client preface, or
/// the SETTINGS frame that is the server's preface (which servers often send first).
pub fn starts_connection(data: &[u8], from_client: bool) -> bool {
    if from_client {
        return data.starts_with(&PREFACE[..14]);
    }
    matches!(data, [0, len_hi, len_lo, SETTINGS, flags, 0, 0, 0, 0, ..]
        if (u16::from_be_bytes([*len_hi, *len_lo]) % 6 == 0) && flags & !ACK == 0)
}
/// Largest frame payload buffered (the protocol maximum is 16 MiB; real header blocks are far
/// smaller, and DATA is never buffered).
const MAX_BUFFERED: usize = 1 << 20;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// A complete header block (HEADERS plus any CONTINUATION).
    Headers {
        from_client: bool,
        stream: u32,
        /// What the exchanges read of the fields that could be decoded; references we cannot
        /// resolve are left out.
        block: Block,
        end_stream: bool,
        /// Some fields could not be decoded (joined late, or an earlier block was lost).
        partial: bool,
        /// Time of the first byte of the block.
        start_ns: u64,
    },
    /// A header block whose bytes were not all captured: the stream's headers are unknown.
    HeadersLost {
        from_client: bool,
        stream: u32,
        end_stream: bool,
    },
    Data {
        from_client: bool,
        stream: u32,
        len: u64,
        end_stream: bool,
    },
    Reset {
        stream: u32,
        code: u32,
    },
    GoAway {
        last_stream: u32,
        code: u32,
    },
    /// Framing is lost for the rest of the connection.
    Broken {
        from_client: bool,
    },
}

impl Message {
    /// Swaps which side the message is attributed to (for connections joined mid-way, whose
    /// sides are learnt after decoding starts).
    pub fn flip_direction(&mut self) {
        match self {
            Message::Headers { from_client, .. }
            | Message::HeadersLost { from_client, .. }
            | Message::Data { from_client, .. }
            | Message::Broken { from_client } => *from_client = !*from_client,
            Message::Reset { .. } | Message::GoAway { .. } => {}
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct FrameHeader {
    len: u32,
    kind: u8,
    flags: u8,
    stream: u32,
}

#[derive(Debug)]
enum Payload {
    /// Buffering a frame we need to read.
    Read {
        header: FrameHeader,
        buf: Vec<u8>,
        start_ns: u64,
        lost: bool,
    },
    /// Counting past bytes we do not need.
    Skip(u64),
}

/// What the exchanges read of a decoded header block, typed as it is decoded: only the path,
/// the authority and kept headers are copied out of the HPACK tables, the method and statuses
/// are not (a `String` per field and a field list per block were a third of HTTP/2's
/// allocations).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Block {
    pub method: Option<Text>,
    pub path: Option<String>,
    pub status: Option<u16>,
    pub grpc_status: Option<i64>,
    /// The authority (as `host`) and the request headers HTTP/1 keeps, in block order.
    pub headers: Headers,
}

impl Block {
    fn read(&mut self, name: &str, value: &str, captured: &'static [&'static str]) {
        match name {
            ":method" => self.method = Some(http1::method_text(value)),
            ":path" => self.path = Some(value.to_string()),
            ":authority" => self.headers.insert_kept("host", value.to_string()),
            ":status" => self.status = value.parse().ok(),
            "grpc-status" => self.grpc_status = value.parse().ok(),
            // Kept headers are request headers; a response's pseudo-headers come first
            // (RFC 9113 §8.3), so its status is known by its regular fields.
            _ if self.status.is_some() => {}
            _ => self.headers.insert_with(name, value, captured),
        }
    }
}

/// What a header block's frames said of it, beside its bytes.
#[derive(Clone, Copy)]
struct BlockHead {
    /// 0 for a PUSH_PROMISE's block (decoded for the table, no stream of its own).
    stream: u32,
    end_stream: bool,
    /// Time of the first byte of the block.
    start_ns: u64,
    /// Some of its bytes were not captured.
    lost: bool,
}

/// One direction's frame stream.
struct Side {
    from_client: bool,
    preface_left: usize,
    header: [u8; 9],
    header_len: usize,
    payload: Option<Payload>,
    /// HEADERS awaiting CONTINUATION, with the fragments so far.
    block: Option<(BlockHead, Vec<u8>)>,
    hpack: hpack::Decoder,
    /// Request headers kept beyond those spans need (configured capture list).
    captured: &'static [&'static str],
    broken: bool,
    /// Bytes of this side were lost: nothing is decoded until a frame starts again.
    awaiting_frame: bool,
}

pub struct Http2Conn {
    client: Side,
    server: Side,
    /// Joined after the connection started: earlier state is unknown.
    pub joined_late: bool,
}

impl Http2Conn {
    /// `joined_late`: the connection predates the agent (no preface, unknown HPACK tables).
    pub fn new(joined_late: bool) -> Self {
        Self::with_captured(joined_late, &[])
    }

    /// A decoder that also keeps the request headers named in `captured`.
    pub fn with_captured(joined_late: bool, captured: &'static [&'static str]) -> Self {
        let side = |from_client: bool| Side {
            captured,
            from_client,
            preface_left: if from_client && !joined_late {
                PREFACE.len()
            } else {
                0
            },
            header: [0; 9],
            header_len: 0,
            payload: None,
            block: None,
            hpack: if joined_late {
                hpack::Decoder::joined_late()
            } else {
                hpack::Decoder::new()
            },
            broken: false,
            awaiting_frame: false,
        };
        Self {
            client: side(true),
            server: side(false),
            joined_late,
        }
    }

    /// Events of this connection were lost: each side waits for a record that starts with a
    /// frame header ([`Self::resume_at_frame`]); until then its bytes are not decoded.
    pub fn lose_sync(&mut self) {
        self.client.awaiting_frame = true;
        self.server.awaiting_frame = true;
    }

    pub fn awaiting_frame(&self, from_client: bool) -> bool {
        if from_client {
            self.client.awaiting_frame
        } else {
            self.server.awaiting_frame
        }
    }

    /// The next bytes of this side start a frame: framing resumes, and since header blocks
    /// were lost, its HPACK table is known only as far as a late joiner's would be.
    pub fn resume_at_frame(&mut self, from_client: bool) {
        let side = if from_client {
            &mut self.client
        } else {
            &mut self.server
        };
        side.preface_left = 0;
        side.header_len = 0;
        side.payload = None;
        side.block = None;
        side.broken = false;
        side.awaiting_frame = false;
        side.hpack = hpack::Decoder::joined_late();
    }

    pub fn feed(
        &mut self,
        from_client: bool,
        data: &[u8],
        missing: u64,
        ts: u64,
        out: &mut Vec<Message>,
    ) {
        let (side, other) = if from_client {
            (&mut self.client, &mut self.server)
        } else {
            (&mut self.server, &mut self.client)
        };
        side.feed(data, missing, ts, out, other);
    }
}

impl Side {
    fn broken(&mut self, out: &mut Vec<Message>) {
        self.broken = true;
        out.push(Message::Broken {
            from_client: self.from_client,
        });
    }

    fn feed(
        &mut self,
        mut data: &[u8],
        mut missing: u64,
        ts: u64,
        out: &mut Vec<Message>,
        other: &mut Side,
    ) {
        while !self.broken && !self.awaiting_frame {
            if self.preface_left > 0 {
                let at = PREFACE.len() - self.preface_left;
                let n = self.preface_left.min(data.len());
                if data[..n] != PREFACE[at..at + n] || (n == 0 && missing > 0) {
                    return self.broken(out);
                }
                self.preface_left -= n;
                data = &data[n..];
                if data.is_empty() && missing == 0 {
                    return;
                }
                continue;
            }
            match self.payload.take() {
                Some(Payload::Skip(left)) => {
                    let from_data = (left.min(data.len() as u64)) as usize;
                    data = &data[from_data..];
                    let mut left = left - from_data as u64;
                    let from_missing = left.min(missing);
                    missing -= from_missing;
                    left -= from_missing;
                    if left > 0 {
                        self.payload = Some(Payload::Skip(left));
                        return;
                    }
                }
                Some(Payload::Read {
                    header,
                    mut buf,
                    start_ns,
                    mut lost,
                }) => {
                    let total = header.len as usize;
                    let n = (total - buf.len()).min(data.len());
                    buf.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if buf.len() < total && data.is_empty() && missing > 0 {
                        // The rest of this frame (or part of it) was not captured; `buf` keeps
                        // counting consumed bytes so framing continues after it.
                        let m = ((total - buf.len()) as u64).min(missing);
                        missing -= m;
                        buf.resize(buf.len() + m as usize, 0);
                        lost = true;
                    }
                    if buf.len() < total {
                        self.payload = Some(Payload::Read {
                            header,
                            buf,
                            start_ns,
                            lost,
                        });
                        return;
                    }
                    self.frame(header, &buf, lost, start_ns, out, other);
                }
                None => {
                    let n = (9 - self.header_len).min(data.len());
                    self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
                    self.header_len += n;
                    data = &data[n..];
                    if self.header_len < 9 {
                        if missing > 0 {
                            return self.broken(out);
                        }
                        return;
                    }
                    self.header_len = 0;
                    let h = &self.header;
                    let header = FrameHeader {
                        len: u32::from_be_bytes([0, h[0], h[1], h[2]]),
                        kind: h[3],
                        flags: h[4],
                        stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
                    };
                    if self.block.is_some() && header.kind != CONTINUATION {
                        // RFC 9113 §6.10: nothing may interleave a header block.
                        return self.broken(out);
                    }
                    self.payload = match header.kind {
                        HEADERS | CONTINUATION | SETTINGS | RST_STREAM | GOAWAY | PUSH_PROMISE => {
                            let len = header.len as usize;
                            if len > MAX_BUFFERED {
                                return self.broken(out);
                            }
                            if let Some((payload, rest)) = data.split_at_checked(len) {
                                // The whole frame is here (the usual case): read where it
                                // lies. Buffering every HEADERS frame was 3% of the agent's
                                // CPU at HTTP/2 saturation.
                                data = rest;
                                self.frame(header, payload, false, ts, out, other);
                                None
                            } else {
                                Some(Payload::Read {
                                    header,
                                    buf: Vec::with_capacity(len),
                                    start_ns: ts,
                                    lost: false,
                                })
                            }
                        }
                        _ => {
                            if header.kind == DATA && header.stream != 0 {
                                out.push(Message::Data {
                                    from_client: self.from_client,
                                    stream: header.stream,
                                    len: header.len as u64,
                                    end_stream: header.flags & END_STREAM != 0,
                                });
                            }
                            Some(Payload::Skip(header.len as u64))
                        }
                    };
                }
            }
            if data.is_empty() && missing == 0 && self.payload.is_none() {
                return;
            }
        }
    }

    fn frame(
        &mut self,
        h: FrameHeader,
        p: &[u8],
        lost: bool,
        start_ns: u64,
        out: &mut Vec<Message>,
        other: &mut Side,
    ) {
        match h.kind {
            HEADERS | PUSH_PROMISE => {
                let mut frag = p;
                if h.flags & PADDED != 0 && !lost {
                    let pad = *frag.first().unwrap_or(&0) as usize;
                    if pad + 1 > frag.len() {
                        return self.broken(out);
                    }
                    frag = &frag[1..frag.len() - pad];
                }
                if h.kind == PUSH_PROMISE {
                    frag = frag.get(4..).unwrap_or_default();
                } else if h.flags & PRIORITY != 0 {
                    frag = frag.get(5..).unwrap_or_default();
                }
                let end_stream = h.kind == HEADERS && h.flags & END_STREAM != 0;
                // Promised streams' blocks still change the table; decode, then drop them.
                let head = BlockHead {
                    stream: if h.kind == HEADERS { h.stream } else { 0 },
                    end_stream,
                    start_ns,
                    lost,
                };
                if h.flags & END_HEADERS != 0 {
                    // A block in one frame, the usual case, is decoded where it lies.
                    self.end_block(head, frag, out);
                } else {
                    self.block = Some((head, frag.to_vec()));
                }
            }
            CONTINUATION => match self.block.as_mut() {
                Some((head, fragments)) => {
                    fragments.extend_from_slice(p);
                    head.lost |= lost;
                    if h.flags & END_HEADERS != 0
                        && let Some((head, block)) = self.block.take()
                    {
                        self.end_block(head, &block, out);
                    }
                }
                None => self.broken(out),
            },
            SETTINGS if h.flags & ACK == 0 && !lost => {
                // The sender's SETTINGS_HEADER_TABLE_SIZE bounds the table the *other*
                // direction's encoder may use.
                for entry in p.chunks_exact(6) {
                    if u16::from_be_bytes([entry[0], entry[1]]) == 1 {
                        other.hpack.set_limit(u32::from_be_bytes([
                            entry[2], entry[3], entry[4], entry[5],
                        ]) as usize);
                    }
                }
            }
            RST_STREAM if p.len() >= 4 && !lost => out.push(Message::Reset {
                stream: h.stream,
                code: u32::from_be_bytes([p[0], p[1], p[2], p[3]]),
            }),
            GOAWAY if p.len() >= 8 && !lost => out.push(Message::GoAway {
                last_stream: u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff,
                code: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
            }),
            _ => {}
        }
    }

    fn end_block(&mut self, head: BlockHead, block: &[u8], out: &mut Vec<Message>) {
        let BlockHead {
            stream,
            end_stream,
            start_ns,
            lost,
        } = head;
        let (mut read, mut partial) = (Block::default(), false);
        let captured = self.captured;
        let decoded = !lost
            && self
                .hpack
                .decode_with(block, |f| match f {
                    Some((name, value)) => read.read(name, value, captured),
                    None => partial = true,
                })
                .is_ok();
        // A block not captured in full, or one we cannot parse, leaves the table in an unknown
        // state and the stream's headers unknown.
        if !decoded {
            self.hpack.lost_block();
            if stream != 0 {
                out.push(Message::HeadersLost {
                    from_client: self.from_client,
                    stream,
                    end_stream,
                });
            }
            return;
        }
        if stream == 0 {
            return;
        }
        out.push(Message::Headers {
            from_client: self.from_client,
            stream,
            block: read,
            end_stream,
            partial,
            start_ns,
        });
    }
}

/// Frame builders shared by this crate's tests.
#[cfg(test)]
pub(crate) mod testing {
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A literal header field without indexing, new name (no Huffman).
    pub fn lit(name: &str, value: &str) -> Vec<u8> {
        let mut b = vec![0x00, name.len() as u8];
        b.extend_from_slice(name.as_bytes());
        b.push(value.len() as u8);
        b.extend_from_slice(value.as_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::{testing::*, *};

    fn feed(c: &mut Http2Conn, from_client: bool, bytes: &[u8]) -> Vec<Message> {
        let mut out = Vec::new();
        c.feed(from_client, bytes, 0, 7, &mut out);
        out
    }

    fn request_block() -> Vec<u8> {
        // :method POST (static 3), :scheme http (6), :path literal, content-type literal.
        let mut b = vec![0x83, 0x86, 0x44, 0x13];
        b.extend_from_slice(b"/helloworld.G/SayHi");
        b.extend(lit("content-type", "application/grpc"));
        b
    }

    #[test]
    fn grpc_unary_exchange_with_every_frame_type() {
        let mut c = Http2Conn::new(false);
        let mut client = PREFACE.to_vec();
        client.extend(frame(SETTINGS, 0, 0, &[0, 1, 0, 0, 0x10, 0]));
        client.extend(frame(0x8, 0, 0, &[0, 0, 0x10, 0])); // WINDOW_UPDATE
        client.extend(frame(0x6, 0, 0, &[0; 8])); // PING
        client.extend(frame(0x2, 0, 1, &[0, 0, 0, 0, 16])); // PRIORITY
        let block = request_block();
        // HEADERS (padded, with priority) split into a CONTINUATION.
        let mut headers = vec![2u8, 0, 0, 0, 0, 16];
        headers.extend_from_slice(&block[..5]);
        headers.extend_from_slice(&[0, 0]);
        client.extend(frame(HEADERS, PADDED | PRIORITY, 1, &headers));
        client.extend(frame(CONTINUATION, END_HEADERS, 1, &block[5..]));
        client.extend(frame(
            DATA,
            END_STREAM | PADDED,
            1,
            &[1, 0, 0, 0, 0, 2, b'h', b'i', 0],
        ));
        // Fed one byte at a time: framing must not depend on read boundaries.
        let mut out = Vec::new();
        for b in &client {
            c.feed(true, std::slice::from_ref(b), 0, 7, &mut out);
        }
        assert_eq!(out.len(), 2, "{out:?}");
        match &out[0] {
            Message::Headers {
                stream: 1,
                block,
                end_stream: false,
                partial: false,
                ..
            } => {
                assert_eq!(block.path.as_deref(), Some("/helloworld.G/SayHi"));
                assert_eq!(block.headers.get("content-type"), Some("application/grpc"));
                assert_eq!(block.method.as_deref(), Some("POST"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            out[1],
            Message::Data {
                from_client: true,
                stream: 1,
                len: 9,
                end_stream: true
            }
        );

        let mut server = frame(SETTINGS, 0, 0, &[]);
        server.extend(frame(SETTINGS, ACK, 0, &[]));
        server.extend(frame(HEADERS, END_HEADERS, 1, &[0x88])); // :status 200
        server.extend(frame(DATA, 0, 1, &[0, 0, 0, 0, 1, b'x']));
        let mut trailers = lit("grpc-status", "0");
        trailers.extend(lit("grpc-message", ""));
        server.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &trailers));
        server.extend(frame(RST_STREAM, 0, 3, &8u32.to_be_bytes()));
        server.extend(frame(GOAWAY, 0, 0, &[0, 0, 0, 1, 0, 0, 0, 0]));
        let out = feed(&mut c, false, &server);
        assert!(
            matches!(&out[0], Message::Headers { block, end_stream: false, .. } if block.status == Some(200))
        );
        assert_eq!(
            out[1],
            Message::Data {
                from_client: false,
                stream: 1,
                len: 6,
                end_stream: false
            }
        );
        assert!(
            matches!(&out[2], Message::Headers { block, end_stream: true, .. } if block.grpc_status == Some(0))
        );
        assert_eq!(out[3], Message::Reset { stream: 3, code: 8 });
        assert_eq!(
            out[4],
            Message::GoAway {
                last_stream: 1,
                code: 0
            }
        );
    }

    #[test]
    fn uncaptured_data_is_counted_but_lost_headers_are_reported() {
        let mut c = Http2Conn::new(false);
        feed(&mut c, true, PREFACE);
        let mut out = Vec::new();
        // A 20000-byte DATA frame of which only the first 100 payload bytes were captured.
        let mut f = frame(DATA, END_STREAM, 5, &vec![0; 20000]);
        f.truncate(109);
        c.feed(true, &f, 20000 - 100, 1, &mut out);
        assert_eq!(
            out,
            [Message::Data {
                from_client: true,
                stream: 5,
                len: 20000,
                end_stream: true
            }]
        );
        out.clear();
        // A HEADERS frame whose tail was not captured: the block is reported lost.
        let f = frame(HEADERS, END_HEADERS, 7, &request_block());
        c.feed(true, &f[..15], (f.len() - 15) as u64, 2, &mut out);
        assert_eq!(
            out,
            [Message::HeadersLost {
                from_client: true,
                stream: 7,
                end_stream: false
            }]
        );
        // A frame header that falls in uncaptured bytes loses framing for good.
        out.clear();
        c.feed(true, &frame(DATA, 0, 9, &[1, 2])[..3], 20, 3, &mut out);
        assert_eq!(out, [Message::Broken { from_client: true }]);
    }

    #[test]
    fn late_join_marks_unresolvable_headers_partial() {
        let mut c = Http2Conn::new(true);
        // Indexed dynamic entry 62 (unknown to a late observer) and :status 200.
        let out = feed(
            &mut c,
            false,
            &frame(HEADERS, END_HEADERS, 11, &[0xbe, 0x88]),
        );
        assert!(
            matches!(&out[0], Message::Headers { partial: true, block, .. } if *block == Block { status: Some(200), ..Block::default() })
        );
    }

    #[test]
    fn garbage_breaks_framing_without_panicking() {
        let cases: &[(&[u8], bool)] = &[
            (b"GET / HTTP/1.1\r\n\r\n", true), // not the preface
            (
                &[0, 0, 4, HEADERS, 0x4, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff],
                false,
            ), // bad HPACK
            (&[0xff, 0xff, 0xff, HEADERS, 0, 0, 0, 0, 1], false), // oversized frame
            (
                &[
                    0, 0, 1, HEADERS, 0, 0, 0, 0, 1, 0x82, 0, 0, 0, DATA, 0, 0, 0, 0, 1,
                ],
                false,
            ), // interleaved block
            (
                &[0, 0, 2, HEADERS, PADDED | END_HEADERS, 0, 0, 0, 1, 9, 0],
                false,
            ), // padding too long
        ];
        for (bytes, from_client) in cases {
            let mut c = Http2Conn::new(!from_client);
            let out = feed(&mut c, *from_client, bytes);
            assert!(
                out.iter()
                    .any(|m| matches!(m, Message::Broken { .. } | Message::HeadersLost { .. })),
                "{bytes:?}: {out:?}"
            );
        }
    }
}

#[cfg(test)]
mod recognition_tests {
    use super::{testing::*, *};

    #[test]
    fn recognises_connection_starts_and_frame_boundaries() {
        assert!(starts_connection(PREFACE, true));
        assert!(starts_connection(
            &frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]),
            false
        ));
        assert!(
            !starts_connection(&frame(SETTINGS, 0, 0, &[0, 3, 0]), false),
            "length not a multiple of 6"
        );
        assert!(!starts_connection(b"HTTP/1.1 200 OK\r\n", false));
        assert!(frame_start(&frame(HEADERS, END_HEADERS, 5, &[0x82])));
        assert!(frame_start(&frame(0x8, 0, 0, &[0, 0, 1, 0])));
        assert!(
            !frame_start(&frame(HEADERS, 0, 0, &[0x82])),
            "HEADERS needs a stream"
        );
        assert!(
            !frame_start(&frame(SETTINGS, 0, 3, &[])),
            "SETTINGS is connection-level"
        );
        assert!(!frame_start(b"GET / HTTP/1.1\r\n"));
        assert!(!frame_start(&[0, 0]));
    }

    #[test]
    fn push_promise_blocks_update_the_table_but_make_no_stream() {
        let mut c = Http2Conn::new(false);
        let mut block = 5u32.to_be_bytes().to_vec(); // promised stream id
        block.extend([0x40, 0x02, b'b', b'3', 0x01, b'v']); // literal with indexing: b3: v
        let mut bytes = frame(PUSH_PROMISE, END_HEADERS, 1, &block);
        // A later block references the pushed entry by its dynamic index (a request's, whose
        // headers are kept).
        bytes.extend(frame(HEADERS, END_HEADERS, 1, &[0x82, 0xbe]));
        // A response's are not kept.
        bytes.extend(frame(HEADERS, END_HEADERS, 3, &[0x88, 0xbe]));
        let mut out = Vec::new();
        c.feed(false, &bytes, 0, 1, &mut out);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(&out[1], Message::Headers { stream: 3, block, .. }
            if block.status == Some(200) && block.headers == Headers::default()));
        assert!(
            matches!(&out[0], Message::Headers { stream: 1, block, partial: false, .. }
            if block.method.as_deref() == Some("GET") && block.headers.get("b3") == Some("v"))
        );
    }
}
