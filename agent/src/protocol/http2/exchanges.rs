//! HTTP/2 frames as exchanges: one per stream, whose id is the stream id (both ends number
//! streams identically).
use rustc_hash::FxHashMap as HashMap;

use super::{Block, Http2Conn, Message};
use crate::{
    capture::event::{Direction, Role},
    protocol::{Call, Decoder, Out, Outcome, Segment, Step, http1::RequestHead},
};

/// What a stream in flight has shown so far.
#[derive(Default)]
struct Stream {
    status_seen: bool,
    request_body: u64,
    response_body: u64,
}

pub struct Exchanges {
    frames: Http2Conn,
    streams: HashMap<u32, Stream>,
    messages: Vec<Message>,
    /// For a connection joined mid-way the process's side is unknown at first: both
    /// directions are decoded with egress standing in for "client", and this records whether
    /// that must be flipped once a request header block shows which side asks (`None` until).
    flip: Option<bool>,
    gone: bool,
}

impl Exchanges {
    /// `joined_late`: the connection predates the agent (no preface seen, HPACK state unknown).
    pub fn new(joined_late: bool, captured: &'static [&'static str]) -> Self {
        Self {
            frames: Http2Conn::with_captured(joined_late, captured),
            streams: HashMap::default(),
            messages: Vec::new(),
            flip: (!joined_late).then_some(false),
            gone: false,
        }
    }

    /// HTTP/2 has no resynchronisation point of its own: without the kernel's frame-start
    /// marks the connection is given up (counted).
    fn give_up(&mut self, out: &mut Out<'_>) {
        self.streams.clear();
        self.gone = true;
        out.push(Step::AbandonAll);
        out.push(Step::GiveUp { ignore: true });
    }

    /// Events were lost: streams in flight can no longer be finished, and decoding resumes
    /// where the kernel marks a frame start.
    fn lose_sync(&mut self, out: &mut Out<'_>) {
        for (stream, _) in self.streams.drain() {
            out.push(Step::Abandon { id: stream as u64 });
        }
        self.frames.lose_sync();
    }

    fn apply(&mut self, ts_ns: u64, out: &mut Out<'_>) {
        let mut messages = std::mem::take(&mut self.messages);
        for mut msg in messages.drain(..) {
            if self.gone {
                break;
            }
            let flip = match self.flip {
                Some(flip) => flip,
                None => match &msg {
                    // The side that sends a request header block is the client.
                    Message::Headers {
                        from_client: egress,
                        block,
                        ..
                    } if block.method.is_some() => {
                        out.push(Step::Role(if *egress {
                            Role::Client
                        } else {
                            Role::Server
                        }));
                        self.flip = Some(!egress);
                        !egress
                    }
                    Message::Broken { .. } => false,
                    // Before that, nothing can be attributed.
                    _ => continue,
                },
            };
            if flip {
                msg.flip_direction();
            }
            self.message(msg, ts_ns, out);
        }
        self.messages = messages;
    }

    fn message(&mut self, msg: Message, ts_ns: u64, out: &mut Out<'_>) {
        match msg {
            Message::Headers {
                from_client: true,
                stream,
                block,
                end_stream,
                partial,
                start_ns,
            } => {
                let id = stream as u64;
                if let Some(s) = self.streams.get(&stream) {
                    // Request trailers.
                    if end_stream {
                        out.push(Step::RequestDone {
                            id,
                            body: s.request_body,
                        });
                    }
                    return;
                }
                let call = Call::Http(request_head(block, start_ns));
                out.push(Step::Begin { id, call, partial });
                if end_stream {
                    out.push(Step::RequestDone { id, body: 0 });
                }
                self.streams.insert(stream, Stream::default());
            }
            Message::Headers {
                from_client: false,
                stream,
                block,
                end_stream,
                partial,
                ..
            } => self.response_headers(stream, &block, end_stream, partial, ts_ns, out),
            Message::HeadersLost {
                from_client,
                stream,
                end_stream,
            } => match self.streams.get(&stream) {
                None if from_client => out.stats.h2_headers_lost += 1,
                Some(s) => {
                    let id = stream as u64;
                    out.push(Step::Partial { id });
                    if end_stream && !from_client {
                        let body = s.response_body;
                        self.streams.remove(&stream);
                        out.push(Step::End {
                            id,
                            end_ns: ts_ns,
                            body,
                            error: None,
                        });
                    }
                }
                None => {}
            },
            Message::Data {
                from_client,
                stream,
                len,
                end_stream,
            } => {
                let Some(s) = self.streams.get_mut(&stream) else {
                    return;
                };
                let id = stream as u64;
                if from_client {
                    s.request_body += len;
                    if end_stream {
                        out.push(Step::RequestDone {
                            id,
                            body: s.request_body,
                        });
                    }
                } else {
                    s.response_body += len;
                    if end_stream {
                        let body = s.response_body;
                        self.streams.remove(&stream);
                        out.push(Step::End {
                            id,
                            end_ns: ts_ns,
                            body,
                            error: None,
                        });
                    }
                }
            }
            Message::Reset { stream, code } => {
                if let Some(s) = self.streams.remove(&stream) {
                    let error = Some(format!("stream reset (HTTP/2 error code {code})"));
                    let body = s.response_body;
                    out.push(Step::End {
                        id: stream as u64,
                        end_ns: ts_ns,
                        body,
                        error,
                    });
                }
            }
            Message::GoAway { last_stream, .. } => {
                let refused: Vec<u32> = self
                    .streams
                    .keys()
                    .copied()
                    .filter(|&id| id > last_stream)
                    .collect();
                for stream in refused {
                    self.streams.remove(&stream);
                    let error = Some("stream refused by GOAWAY".to_string());
                    out.push(Step::End {
                        id: stream as u64,
                        end_ns: ts_ns,
                        body: 0,
                        error,
                    });
                }
            }
            Message::Broken { .. } => {
                out.stats.desyncs += 1;
                self.give_up(out);
            }
        }
    }

    fn response_headers(
        &mut self,
        stream: u32,
        block: &Block,
        end_stream: bool,
        partial: bool,
        ts_ns: u64,
        out: &mut Out<'_>,
    ) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        let id = stream as u64;
        if !s.status_seen {
            match block.status {
                Some(status) if (100..200).contains(&status) => return,
                Some(status) => {
                    s.status_seen = true;
                    out.push(Step::Outcome {
                        id,
                        outcome: Outcome::HttpStatus(status),
                    });
                }
                None => {}
            }
        }
        if let Some(code) = block.grpc_status {
            out.push(Step::Outcome {
                id,
                outcome: Outcome::GrpcStatus(code),
            });
        }
        if partial {
            out.push(Step::Partial { id });
        }
        if end_stream {
            let body = s.response_body;
            self.streams.remove(&stream);
            out.push(Step::End {
                id,
                end_ns: ts_ns,
                body,
                error: None,
            });
        }
    }
}

impl Decoder for Exchanges {
    fn feed(&mut self, seg: &Segment<'_>, out: &mut Out<'_>) {
        if self.gone {
            return;
        }
        if seg.gap {
            // The kernel marks where frames start: HTTP/2 can resume there.
            if seg.framed {
                self.lose_sync(out);
            } else {
                return self.give_up(out);
            }
        }
        for (i, (bytes, missing)) in seg.pieces().enumerate() {
            // A late-joined connection's frame decoders stay keyed by direction (egress stands
            // in for "client"); its messages are flipped once its side is known.
            let from_client = if self.frames.joined_late {
                seg.direction == Direction::Egress
            } else {
                seg.requests
            };
            if self.frames.awaiting_frame(from_client) {
                if !seg.framed {
                    // The kernel stopped following frames: no way back.
                    return self.give_up(out);
                }
                if i > 0 || !seg.frame_start {
                    break;
                }
                self.frames.resume_at_frame(from_client);
                out.stats.h2_resyncs += 1;
            }
            self.frames
                .feed(from_client, bytes, missing, seg.ts_ns, &mut self.messages);
            self.apply(seg.ts_ns, out);
            if self.gone {
                return;
            }
        }
    }

    fn close(&mut self, _ts_ns: u64, _out: &mut Out<'_>) {}
}

/// An HTTP/2 request's header block as a request head (version 2); a block joined mid-way
/// may lack the method or path, left empty.
fn request_head(block: Block, start_ns: u64) -> RequestHead {
    RequestHead {
        method: block.method.unwrap_or_default(),
        target: block.path.unwrap_or_default(),
        version: 2,
        headers: block.headers,
        start_ns,
    }
}
