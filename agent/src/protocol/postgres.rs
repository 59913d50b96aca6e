//! PostgreSQL (frontend/backend protocol 3.0): each simple Query, and each Execute of the
//! extended protocol, is an exchange. Prepared statements are mapped back to their text
//! through Parse and Bind; replies are matched to requests in order, as the server answers
//! them; rows and COPY data are skipped by length.
use std::{collections::VecDeque, sync::Arc};

use rustc_hash::FxHashMap as HashMap;

use super::{Call, DbCall, Decoder, MAX_IN_FLIGHT, Out, Outcome, Segment, Step};

/// Bytes kept of a message body (statement text beyond it is cut).
const MAX_BODY: usize = 4096;
/// Prepared statements and portals remembered per connection.
const MAX_NAMED: usize = 256;
/// Protocol 3.0 in a StartupMessage; the SSLRequest and GSSENCRequest codes.
const PROTOCOL_3: u32 = 0x0003_0000;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
/// The last bytes of a ReadyForQuery, which ends every reply: `Z`, length 5, status.
const READY: [u8; 5] = [b'Z', 0, 0, 0, 5];

/// One message, its body cut at [`MAX_BODY`]. `kind` 0: a message without a type byte (the
/// client's StartupMessage and requests before it).
#[derive(Debug, Default)]
struct Message {
    kind: u8,
    body: Vec<u8>,
}

/// One direction's message stream.
#[derive(Default)]
struct Reader {
    /// The next message has no type byte.
    untyped: bool,
    /// The next byte is the server's one-byte answer to SSLRequest or GSSENCRequest.
    answer_byte: bool,
    header: [u8; 5],
    header_len: usize,
    current: Message,
    /// Body bytes of the current message still to come.
    body_left: u64,
    /// The current body is kept (bodies of messages that matter).
    keep: bool,
}

impl Reader {
    fn header_size(&self) -> usize {
        if self.untyped { 4 } else { 5 }
    }

    /// Reads `data` then `missing` uncaptured bytes; false once the stream cannot be followed
    /// (a message header fell in the uncaptured bytes, or a length is impossible).
    fn feed(
        &mut self,
        mut data: &[u8],
        missing: u64,
        keep: impl Fn(u8) -> bool,
        done: &mut Vec<Message>,
    ) -> bool {
        while !data.is_empty() {
            if self.answer_byte {
                self.answer_byte = false;
                done.push(Message {
                    kind: b'!',
                    body: vec![data[0]],
                });
                data = &data[1..];
                continue;
            }
            if self.body_left > 0 {
                let n = self.body_left.min(data.len() as u64) as usize;
                if self.keep {
                    let room = MAX_BODY.saturating_sub(self.current.body.len());
                    self.current.body.extend_from_slice(&data[..n.min(room)]);
                }
                self.body_left -= n as u64;
                data = &data[n..];
                if self.body_left == 0 {
                    done.push(std::mem::take(&mut self.current));
                }
                continue;
            }
            let size = self.header_size();
            let n = (size - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len < size {
                break;
            }
            self.header_len = 0;
            let (kind, len) = if self.untyped {
                (
                    0,
                    u32::from_be_bytes([
                        self.header[0],
                        self.header[1],
                        self.header[2],
                        self.header[3],
                    ]),
                )
            } else {
                let h = self.header;
                (h[0], u32::from_be_bytes([h[1], h[2], h[3], h[4]]))
            };
            // The length counts itself; nothing real comes near 1 GiB.
            if !(4..1 << 30).contains(&len) || (kind != 0 && !kind.is_ascii_graphic()) {
                return false;
            }
            self.current = Message {
                kind,
                body: Vec::new(),
            };
            self.keep = keep(kind);
            self.body_left = len as u64 - 4;
            if self.body_left == 0 {
                done.push(std::mem::take(&mut self.current));
            }
        }
        if missing == 0 {
            return true;
        }
        if missing <= self.body_left && self.header_len == 0 {
            self.body_left -= missing;
            if self.body_left == 0 {
                done.push(std::mem::take(&mut self.current));
            }
            return true;
        }
        false
    }

    fn reset(&mut self) {
        let untyped = self.untyped;
        *self = Self::default();
        self.untyped = untyped;
    }
}

/// A reply the server owes, in the order requests were sent.
#[derive(Debug)]
enum Owed {
    /// A simple Query: everything up to ReadyForQuery; the first error is its outcome.
    Query {
        id: u64,
        error: Option<Outcome>,
    },
    Execute {
        id: u64,
    },
    Parse,
    Bind,
    Describe,
    Close,
    Sync,
}

pub struct Exchanges {
    client: Reader,
    server: Reader,
    owed: VecDeque<Owed>,
    /// Texts by name, shared with the calls that run them.
    statements: HashMap<Vec<u8>, Arc<str>>,
    portals: HashMap<Vec<u8>, Arc<str>>,
    database: Option<Arc<str>>,
    next_id: u64,
    messages: Vec<Message>,
    /// The server's position in its stream is unknown: replies resume after a read that ends
    /// with ReadyForQuery.
    server_lost: bool,
    /// The client's position is unknown: requests resume at a read that starts a message.
    client_lost: bool,
    /// The server asked for COPY data: until it answers, the client sends nothing but data,
    /// which can be lost without losing track of what is owed.
    copy_in: bool,
    gone: bool,
}

impl Exchanges {
    /// `joined_late`: the connection predates the agent (no StartupMessage to come).
    pub fn new(joined_late: bool) -> Self {
        let mut e = Self {
            client: Reader::default(),
            server: Reader::default(),
            owed: VecDeque::new(),
            statements: HashMap::default(),
            portals: HashMap::default(),
            database: None,
            next_id: 0,
            messages: Vec::new(),
            server_lost: false,
            client_lost: false,
            copy_in: false,
            gone: false,
        };
        e.client.untyped = !joined_late;
        e
    }

    fn begin(&mut self, text: Arc<str>, ts_ns: u64, out: &mut Out<'_>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let call = Call::Db(DbCall {
            system: "postgresql",
            operation: None,
            text,
            namespace: self.database.clone(),
            batch: 1,
            start_ns: ts_ns,
        });
        out.push(Step::Begin {
            id,
            call,
            partial: false,
        });
        id
    }

    fn client_message(&mut self, m: Message, ts_ns: u64, out: &mut Out<'_>) {
        if self.owed.len() >= MAX_IN_FLIGHT {
            return self.lose(out);
        }
        let mut fields = m.body.split(|&b| b == 0);
        let mut cstr = || fields.next().unwrap_or_default();
        let text = |t: &[u8]| Arc::<str>::from(String::from_utf8_lossy(t));
        match m.kind {
            0 => self.startup(&m.body),
            b'Q' => {
                let id = self.begin(text(cstr()), ts_ns, out);
                self.owed.push_back(Owed::Query { id, error: None });
            }
            b'P' => {
                let (name, sql) = (cstr(), cstr());
                if name.is_empty() || self.statements.len() < MAX_NAMED {
                    self.statements.insert(name.to_vec(), text(sql));
                }
                self.owed.push_back(Owed::Parse);
            }
            b'B' => {
                let (portal, statement) = (cstr(), cstr());
                let text = self.statements.get(statement).cloned().unwrap_or_default();
                if portal.is_empty() || self.portals.len() < MAX_NAMED {
                    self.portals.insert(portal.to_vec(), text);
                }
                self.owed.push_back(Owed::Bind);
            }
            b'E' => {
                let portal = cstr();
                let text = self.portals.get(portal).cloned().unwrap_or_default();
                let id = self.begin(text, ts_ns, out);
                self.owed.push_back(Owed::Execute { id });
            }
            b'D' => self.owed.push_back(Owed::Describe),
            b'C' => {
                if let [b'S', name @ ..] = &m.body[..] {
                    self.statements
                        .remove(name.strip_suffix(&[0]).unwrap_or(name));
                }
                self.owed.push_back(Owed::Close);
            }
            b'S' => self.owed.push_back(Owed::Sync),
            // Flush, COPY data, password and SASL messages (never kept), Terminate.
            _ => {}
        }
    }

    /// The StartupMessage names the database (`db.namespace`); an SSLRequest or
    /// GSSENCRequest is answered with one byte.
    fn startup(&mut self, body: &[u8]) {
        let Some(code) = body
            .get(..4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        else {
            return;
        };
        match code {
            SSL_REQUEST | GSSENC_REQUEST => self.server.answer_byte = true,
            PROTOCOL_3 => {
                self.client.untyped = false;
                let mut params = body[4..].split(|&b| b == 0);
                let (mut user, mut database) = (None, None);
                while let (Some(k), Some(v)) = (params.next(), params.next()) {
                    match k {
                        b"user" => user = Some(String::from_utf8_lossy(v).into_owned()),
                        b"database" => database = Some(String::from_utf8_lossy(v).into_owned()),
                        _ => {}
                    }
                }
                // The server's default database is the user's name.
                self.database = database.or(user).map(Into::into);
            }
            _ => {}
        }
    }

    fn server_message(&mut self, m: Message, ts_ns: u64, out: &mut Out<'_>) {
        let kind = m.kind;
        // Asynchronous: notices, parameter changes, notifications.
        if matches!(kind, b'N' | b'S' | b'A') {
            return;
        }
        if kind == b'!' {
            // TLS or GSS encryption accepted: nothing more can be read (counted).
            if matches!(m.body.first(), Some(b'S' | b'G')) {
                self.gone = true;
                out.push(Step::GiveUp { ignore: true });
            }
            return;
        }
        let Some(front) = self.owed.front_mut() else {
            return;
        };
        match (front, kind) {
            (Owed::Query { error, .. }, b'E') => {
                self.copy_in = false;
                if error.is_none() {
                    *error = Some(error_outcome(&m.body));
                }
            }
            (Owed::Query { id, error }, b'Z') => {
                let (id, error) = (*id, error.take());
                self.owed.pop_front();
                self.copy_in = false;
                end(id, error, ts_ns, out);
            }
            (Owed::Query { .. }, b'G') => self.copy_in = true,
            (Owed::Query { .. }, b'C') => self.copy_in = false,
            (Owed::Query { .. }, _) => {}
            (Owed::Execute { id }, b'C' | b's' | b'I') => {
                let id = *id;
                self.owed.pop_front();
                end(id, None, ts_ns, out);
            }
            (Owed::Execute { .. }, b'D' | b'd' | b'c' | b'G' | b'H' | b'W') => {}
            (Owed::Parse, b'1') | (Owed::Bind, b'2') | (Owed::Close, b'3') | (Owed::Sync, b'Z') => {
                self.owed.pop_front();
            }
            (Owed::Describe, b't') => {}
            (Owed::Describe, b'T' | b'n') => {
                self.owed.pop_front();
            }
            (_, b'E') => self.failed(error_outcome(&m.body), ts_ns, out),
            // A reply that answers nothing owed: the streams no longer line up.
            _ => self.lose(out),
        }
    }

    /// After an error the server skips every request up to Sync: an Execute among them fails
    /// with the same error.
    fn failed(&mut self, outcome: Outcome, ts_ns: u64, out: &mut Out<'_>) {
        while let Some(owed) = self.owed.front() {
            match owed {
                Owed::Sync => break,
                &Owed::Execute { id } | &Owed::Query { id, .. } => {
                    end(id, Some(outcome.clone()), ts_ns, out);
                }
                _ => {}
            }
            self.owed.pop_front();
        }
    }

    /// Requests and replies can no longer be paired: what is owed is abandoned (counted).
    fn lose(&mut self, out: &mut Out<'_>) {
        out.stats.desyncs += 1;
        out.push(Step::AbandonAll);
        self.owed.clear();
        self.server_lost = true;
        self.client_lost = true;
    }

    /// The server's reply stream, lost: a read that ends with ReadyForQuery closes every
    /// reply up to the Query or Sync it answers, and the next read starts a message.
    fn resync_server(&mut self, bytes: &[u8], missing: u64, ts_ns: u64, out: &mut Out<'_>) {
        let ends_ready = missing == 0
            && bytes.len() >= 6
            && bytes[bytes.len() - 6..bytes.len() - 1] == READY
            && matches!(bytes[bytes.len() - 1], b'I' | b'T' | b'E');
        if !ends_ready {
            return;
        }
        while let Some(owed) = self.owed.pop_front() {
            match owed {
                Owed::Query { id, .. } => {
                    out.push(Step::Partial { id });
                    end(id, None, ts_ns, out);
                    break;
                }
                Owed::Execute { id } => {
                    out.push(Step::Partial { id });
                    end(id, None, ts_ns, out);
                }
                Owed::Sync => break,
                _ => {}
            }
        }
        self.server.reset();
        self.server_lost = false;
    }
}

fn end(id: u64, error: Option<Outcome>, end_ns: u64, out: &mut Out<'_>) {
    if let Some(outcome) = error {
        out.push(Step::Outcome { id, outcome });
    }
    out.push(Step::End {
        id,
        end_ns,
        body: 0,
        error: None,
    });
}

/// An ErrorResponse's SQLSTATE (`C` field) and message (`M`).
fn error_outcome(body: &[u8]) -> Outcome {
    let (mut code, mut message) = (String::new(), String::new());
    for field in body.split(|&b| b == 0) {
        match field.split_first() {
            Some((b'C', v)) => code = String::from_utf8_lossy(v).into_owned(),
            Some((b'M', v)) => message = String::from_utf8_lossy(v).into_owned(),
            _ => {}
        }
    }
    Outcome::DbError { code, message }
}

/// Client messages whose bodies matter (the rest, COPY data and passwords included, are only
/// counted past).
fn client_keeps(kind: u8) -> bool {
    matches!(kind, 0 | b'Q' | b'P' | b'B' | b'E' | b'C')
}

fn server_keeps(kind: u8) -> bool {
    kind == b'E'
}

/// Whether a client read can start with a message: a known type and a plausible length.
fn starts_client_message(bytes: &[u8]) -> bool {
    match bytes {
        [kind, a, b, _, _, ..] => {
            matches!(
                kind,
                b'Q' | b'P' | b'B' | b'E' | b'D' | b'C' | b'S' | b'H' | b'X' | b'c' | b'f'
            ) && *a == 0
                && *b == 0
        }
        _ => false,
    }
}

impl Decoder for Exchanges {
    fn feed(&mut self, seg: &Segment<'_>, out: &mut Out<'_>) {
        if self.gone {
            return;
        }
        if seg.gap {
            self.lose(out);
        }
        for (i, (bytes, missing)) in seg.pieces().enumerate() {
            if seg.requests {
                if self.client_lost {
                    if i > 0 || !starts_client_message(bytes) {
                        return;
                    }
                    self.client.reset();
                    self.client.untyped = false;
                    self.client_lost = false;
                }
                let ok = self
                    .client
                    .feed(bytes, missing, client_keeps, &mut self.messages);
                // Drained, not dropped: the buffer's allocation serves every segment.
                let mut messages = std::mem::take(&mut self.messages);
                for m in messages.drain(..) {
                    self.client_message(m, seg.ts_ns, out);
                }
                self.messages = messages;
                if !ok && self.copy_in {
                    self.client_lost = true;
                } else if !ok {
                    self.lose(out);
                }
            } else {
                if self.server_lost {
                    self.resync_server(bytes, missing, seg.ts_ns, out);
                    continue;
                }
                let ok = self
                    .server
                    .feed(bytes, missing, server_keeps, &mut self.messages);
                let mut messages = std::mem::take(&mut self.messages);
                for m in messages.drain(..) {
                    self.server_message(m, seg.ts_ns, out);
                    if self.gone || self.server_lost {
                        break;
                    }
                }
                self.messages = messages;
                if self.gone {
                    return;
                }
                if !ok && !self.server_lost {
                    // Only this side lost its place: the client's next requests still line up
                    // once the replies owed so far are closed by a ReadyForQuery.
                    self.server_lost = true;
                    out.stats.desyncs += 1;
                }
            }
        }
    }

    fn close(&mut self, _ts_ns: u64, _out: &mut Out<'_>) {}
}

#[cfg(test)]
mod tests;
