//! HTTP/1.x messages as exchanges: requests are answered in order, so an exchange's id is its
//! request's position on the connection.
use super::{Http1Conn, Message};
use crate::protocol::{Call, Decoder, Out, Outcome, Segment, Step};

pub struct Exchanges {
    conn: Http1Conn,
    messages: Vec<Message>,
    /// Id of the next request, and of the oldest one still awaiting its response.
    next_request: u64,
    next_response: u64,
    upgraded: bool,
}

impl Exchanges {
    /// `captured`: request headers to keep beyond those spans need.
    pub fn new(captured: &'static [&'static str]) -> Self {
        Self {
            conn: Http1Conn::with_captured(captured),
            messages: Vec::new(),
            next_request: 0,
            next_response: 0,
            upgraded: false,
        }
    }

    fn awaiting(&self) -> bool {
        self.next_response < self.next_request
    }

    /// Requests and responses can no longer be paired: drop what is in flight and resume at
    /// the next message start on both sides.
    fn restart(&mut self, out: &mut Out<'_>) {
        out.push(Step::AbandonAll);
        self.next_response = self.next_request;
        self.conn.resync();
    }

    fn apply(&mut self, ts_ns: u64, out: &mut Out<'_>) {
        let mut messages = std::mem::take(&mut self.messages);
        for msg in messages.drain(..) {
            match msg {
                Message::RequestHead(head) => {
                    let id = self.next_request;
                    self.next_request += 1;
                    let call = Call::Http(head);
                    out.push(Step::Begin {
                        id,
                        call,
                        partial: false,
                    });
                }
                Message::RequestEnd { body_len, .. } if self.awaiting() => {
                    let id = self.next_request - 1;
                    out.push(Step::RequestDone { id, body: body_len });
                }
                Message::ResponseHead(head) if self.awaiting() => {
                    let outcome = Outcome::HttpStatus(head.status);
                    out.push(Step::Outcome {
                        id: self.next_response,
                        outcome,
                    });
                }
                Message::ResponseEnd { end_ns, body_len } if self.awaiting() => {
                    let id = self.next_response;
                    self.next_response += 1;
                    out.push(Step::End {
                        id,
                        end_ns,
                        body: body_len,
                        error: None,
                    });
                }
                Message::Desync { .. } => {
                    out.stats.desyncs += 1;
                    self.restart(out);
                }
                Message::Upgraded => {
                    if self.awaiting() {
                        let id = self.next_response;
                        self.next_response += 1;
                        out.push(Step::Outcome {
                            id,
                            outcome: Outcome::HttpStatus(101),
                        });
                        out.push(Step::End {
                            id,
                            end_ns: ts_ns,
                            body: 0,
                            error: None,
                        });
                    }
                    self.upgraded = true;
                    out.push(Step::GiveUp { ignore: false });
                }
                _ => {}
            }
        }
        self.messages = messages;
    }
}

impl Decoder for Exchanges {
    fn feed(&mut self, seg: &Segment<'_>, out: &mut Out<'_>) {
        if seg.gap {
            self.restart(out);
        }
        for (bytes, missing) in seg.pieces() {
            self.conn
                .feed(seg.requests, bytes, missing, seg.ts_ns, &mut self.messages);
            self.apply(seg.ts_ns, out);
            if self.upgraded {
                return;
            }
        }
    }

    fn close(&mut self, ts_ns: u64, out: &mut Out<'_>) {
        self.conn.close(ts_ns, &mut self.messages);
        self.apply(ts_ns, out);
    }
}
