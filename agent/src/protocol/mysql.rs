//! MySQL and MariaDB (client/server protocol 4.1): each COM_QUERY and COM_STMT_EXECUTE is an
//! exchange, answered by one reply (several result sets when the server says more follow).
//! Prepared statements are mapped back to their text through COM_STMT_PREPARE's reply; result
//! sets of any size are skipped by packet length.
use std::{collections::VecDeque, sync::Arc};

use rustc_hash::FxHashMap as HashMap;

use super::{Call, DbCall, Decoder, MAX_IN_FLIGHT, Out, Outcome, Segment, Step};

/// Bytes kept of a client packet (statement text beyond it is cut).
const MAX_CLIENT_BODY: usize = 4096;
/// Bytes kept of a server packet: enough for OK, EOF and column counts; more for ERR.
const SERVER_HEAD: usize = 16;
const MAX_ERROR: usize = 512;
/// Prepared statements remembered per connection.
const MAX_STATEMENTS: usize = 256;
/// The largest packet; one of this length continues in the next.
const MAX_PACKET: u32 = 0xff_ffff;

const COM_QUIT: u8 = 0x01;
const COM_INIT_DB: u8 = 0x02;
const COM_QUERY: u8 = 0x03;
const COM_STMT_PREPARE: u8 = 0x16;
const COM_STMT_EXECUTE: u8 = 0x17;
const COM_STMT_SEND_LONG_DATA: u8 = 0x18;
const COM_STMT_CLOSE: u8 = 0x19;
const COM_CHANGE_USER: u8 = 0x11;

const CLIENT_CONNECT_WITH_DB: u32 = 0x8;
const CLIENT_SSL: u32 = 0x800;
const CLIENT_SECURE_CONNECTION: u32 = 0x8000;
const CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA: u32 = 1 << 21;
const CLIENT_QUERY_ATTRIBUTES: u32 = 1 << 27;
const SERVER_MORE_RESULTS_EXISTS: u16 = 0x8;

/// One packet, its body cut to what matters.
#[derive(Debug, Default)]
struct Packet {
    seq: u8,
    len: u32,
    body: Vec<u8>,
    /// The body continues a packet of the maximum length (its first byte is no header).
    continued: bool,
}

/// One direction's packet stream.
#[derive(Default)]
struct Reader {
    header: [u8; 4],
    header_len: usize,
    current: Packet,
    body_left: u64,
    /// Bytes of the current body to keep; decided by its first byte.
    keep: usize,
    /// The previous packet had the maximum length.
    continues: bool,
}

impl Reader {
    /// Reads `data` then `missing` uncaptured bytes; false once a packet header fell in the
    /// uncaptured bytes. `keep` says how much of a body to keep, given its first byte.
    fn feed(
        &mut self,
        mut data: &[u8],
        missing: u64,
        keep: impl Fn(u8) -> usize,
        done: &mut Vec<Packet>,
    ) -> bool {
        while !data.is_empty() {
            if self.body_left > 0 {
                if self.current.body.is_empty() && self.keep == usize::MAX {
                    self.keep = keep(data[0]);
                }
                let n = self.body_left.min(data.len() as u64) as usize;
                let room = self.keep.saturating_sub(self.current.body.len());
                self.current.body.extend_from_slice(&data[..n.min(room)]);
                self.body_left -= n as u64;
                data = &data[n..];
                if self.body_left == 0 {
                    self.finish(done);
                }
                continue;
            }
            let n = (4 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len < 4 {
                break;
            }
            self.header_len = 0;
            let h = self.header;
            let len = u32::from_le_bytes([h[0], h[1], h[2], 0]);
            self.current = Packet {
                seq: h[3],
                len,
                body: Vec::new(),
                continued: self.continues,
            };
            self.keep = usize::MAX;
            self.body_left = len as u64;
            if len == 0 {
                self.finish(done);
            }
        }
        if missing == 0 {
            return true;
        }
        if missing <= self.body_left && self.header_len == 0 {
            self.body_left -= missing;
            if self.body_left == 0 {
                self.finish(done);
            }
            return true;
        }
        false
    }

    fn finish(&mut self, done: &mut Vec<Packet>) {
        self.continues = self.current.len == MAX_PACKET;
        done.push(std::mem::take(&mut self.current));
    }
}

/// Where the connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the client's handshake response to the server's greeting.
    Greeting,
    /// Authenticating: commands start after the server's OK.
    Auth,
    Command,
}

/// What a command's reply is expected to hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum What {
    /// An exchange (COM_QUERY, COM_STMT_EXECUTE) with its id.
    Call(u64),
    /// COM_STMT_PREPARE: its OK carries the statement id.
    Prepare,
    /// COM_INIT_DB: the database changes on OK.
    InitDb,
    /// Any other command answered by one OK, ERR or EOF.
    Plain,
}

/// How far the reply to the oldest command has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    Start,
    /// Definition packets left in a group, and what follows the group.
    Defs {
        left: u64,
        then: AfterDefs,
    },
    /// A group is done: an EOF may close it (older servers, or no CLIENT_DEPRECATE_EOF).
    MaybeEof(AfterDefs),
    Rows,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterDefs {
    Rows,
    /// A prepared statement's parameters, then this many columns.
    PrepareColumns(u64),
    Done,
}

struct Owed {
    what: What,
    reply: Reply,
    /// COM_STMT_PREPARE: the text; COM_INIT_DB: the database.
    text: Option<Arc<str>>,
}

pub struct Exchanges {
    client: Reader,
    server: Reader,
    phase: Phase,
    owed: VecDeque<Owed>,
    /// Texts by statement id, shared with the calls that run them.
    statements: HashMap<u32, Arc<str>>,
    database: Option<Arc<str>>,
    query_attributes: bool,
    next_id: u64,
    packets: Vec<Packet>,
    server_lost: bool,
    client_lost: bool,
    gone: bool,
}

impl Exchanges {
    /// `joined_late`: the connection predates the agent (it is past authentication).
    pub fn new(joined_late: bool) -> Self {
        Self {
            client: Reader::default(),
            server: Reader::default(),
            phase: if joined_late {
                Phase::Command
            } else {
                Phase::Greeting
            },
            owed: VecDeque::new(),
            statements: HashMap::default(),
            database: None,
            query_attributes: false,
            next_id: 0,
            packets: Vec::new(),
            server_lost: false,
            client_lost: false,
            gone: false,
        }
    }

    fn give_up(&mut self, out: &mut Out<'_>) {
        self.gone = true;
        out.push(Step::AbandonAll);
        out.push(Step::GiveUp { ignore: true });
    }

    fn client_packet(&mut self, p: Packet, ts_ns: u64, out: &mut Out<'_>) {
        match self.phase {
            Phase::Greeting => return self.handshake_response(&p.body, out),
            // Authentication data (scrambles, or a clear-text password): never kept.
            Phase::Auth => return,
            Phase::Command => {}
        }
        if p.continued {
            return;
        }
        if self.owed.len() >= MAX_IN_FLIGHT {
            return self.lose(out);
        }
        let Some((&command, rest)) = p.body.split_first() else {
            return;
        };
        let owed = |what, text| Owed {
            what,
            reply: Reply::Start,
            text,
        };
        match command {
            COM_QUERY => {
                let text = String::from_utf8_lossy(self.query_text(rest));
                let id = self.begin(text.into(), ts_ns, out);
                self.owed.push_back(owed(What::Call(id), None));
            }
            COM_STMT_EXECUTE => {
                let text = statement_id(rest)
                    .and_then(|s| self.statements.get(&s).cloned())
                    .unwrap_or_default();
                let id = self.begin(text, ts_ns, out);
                self.owed.push_back(owed(What::Call(id), None));
            }
            COM_STMT_PREPARE => {
                let text = String::from_utf8_lossy(rest);
                self.owed.push_back(owed(What::Prepare, Some(text.into())));
            }
            COM_INIT_DB => {
                let db = String::from_utf8_lossy(rest);
                self.owed.push_back(owed(What::InitDb, Some(db.into())));
            }
            COM_STMT_CLOSE => {
                if let Some(s) = statement_id(rest) {
                    self.statements.remove(&s);
                }
            }
            // No reply to these.
            COM_QUIT | COM_STMT_SEND_LONG_DATA => {}
            // Re-authenticates mid-connection: followed no further.
            COM_CHANGE_USER => self.give_up(out),
            _ => self.owed.push_back(owed(What::Plain, None)),
        }
    }

    /// COM_QUERY's text, past the query attributes a client may send first (none, here).
    fn query_text<'b>(&self, rest: &'b [u8]) -> &'b [u8] {
        match (self.query_attributes, rest) {
            // Zero parameters in one parameter set.
            (true, [0, 1, text @ ..]) => text,
            _ => rest,
        }
    }

    fn begin(&mut self, text: Arc<str>, ts_ns: u64, out: &mut Out<'_>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let call = Call::Db(DbCall {
            system: "mysql",
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

    /// HandshakeResponse41: capabilities, user, auth data, then the database. A short one
    /// asking for TLS means nothing more can be read.
    fn handshake_response(&mut self, body: &[u8], out: &mut Out<'_>) {
        let Some(caps) = body
            .get(..4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        else {
            return;
        };
        if caps & CLIENT_SSL != 0 && body.len() <= 32 {
            return self.give_up(out);
        }
        self.phase = Phase::Auth;
        self.query_attributes = caps & CLIENT_QUERY_ATTRIBUTES != 0;
        let Some(rest) = body.get(32..) else { return };
        let Some(user_end) = rest.iter().position(|&b| b == 0) else {
            return;
        };
        let rest = &rest[user_end + 1..];
        let auth_len = if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
            lenenc(rest).and_then(|(n, used)| usize::try_from(n).ok()?.checked_add(used))
        } else if caps & CLIENT_SECURE_CONNECTION != 0 {
            rest.first().map(|&n| n as usize + 1)
        } else {
            rest.iter().position(|&b| b == 0).map(|p| p + 1)
        };
        if caps & CLIENT_CONNECT_WITH_DB != 0
            && let Some(db) = auth_len.and_then(|n| rest.get(n..))
        {
            let name = db.split(|&b| b == 0).next().unwrap_or_default();
            if !name.is_empty() {
                self.database = Some(String::from_utf8_lossy(name).into());
            }
        }
    }

    fn server_packet(&mut self, p: Packet, ts_ns: u64, out: &mut Out<'_>) {
        match self.phase {
            // Protocol version 10 (the kernel may have judged the greeting by its header).
            Phase::Greeting if p.seq == 0 && p.body.first() != Some(&10) => {
                return self.give_up(out);
            }
            Phase::Greeting => return,
            Phase::Auth => {
                if p.body.first() == Some(&0) {
                    self.phase = Phase::Command;
                }
                return;
            }
            Phase::Command => {}
        }
        let Some(front) = self.owed.front_mut() else {
            return;
        };
        if p.continued {
            return;
        }
        let first = p.body.first().copied().unwrap_or(0);
        // An EOF: `FE` and a short packet (a row starting `FE` is at least 16 MiB).
        let eof = first == 0xfe && p.len < MAX_PACKET;
        match front.reply {
            Reply::MaybeEof(then) => {
                front.reply = match then {
                    AfterDefs::Rows => Reply::Rows,
                    AfterDefs::PrepareColumns(n) if n > 0 => Reply::Defs {
                        left: n,
                        then: AfterDefs::Done,
                    },
                    _ => {
                        // The reply is over; an EOF closing it is its last packet, and
                        // anything else answers the next command.
                        if eof && p.seq != 1 {
                            return self.finish(None, ts_ns, out);
                        }
                        self.finish(None, ts_ns, out);
                        return self.server_packet(p, ts_ns, out);
                    }
                };
                if !(eof && p.len == 5) {
                    self.server_packet(p, ts_ns, out);
                }
            }
            Reply::Defs { left, then } => {
                front.reply = if left > 1 {
                    Reply::Defs {
                        left: left - 1,
                        then,
                    }
                } else {
                    Reply::MaybeEof(then)
                };
            }
            Reply::Rows if first == 0xff => self.finish(Some(error_outcome(&p.body)), ts_ns, out),
            Reply::Rows if eof => {
                if more_results(&p.body) {
                    front.reply = Reply::Start;
                } else {
                    self.finish(None, ts_ns, out);
                }
            }
            Reply::Rows => {}
            Reply::Start => self.reply_start(p, ts_ns, out),
        }
    }

    /// The first packet of a reply (or of a further result set).
    fn reply_start(&mut self, p: Packet, ts_ns: u64, out: &mut Out<'_>) {
        let Some(front) = self.owed.front_mut() else {
            return;
        };
        match p.body.first() {
            Some(0xff) => self.finish(Some(error_outcome(&p.body)), ts_ns, out),
            Some(0x00) if front.what == What::Prepare && p.body.len() >= 9 => {
                let b = &p.body;
                let id = u32::from_le_bytes([b[1], b[2], b[3], b[4]]);
                let columns = u16::from_le_bytes([b[5], b[6]]) as u64;
                let params = u16::from_le_bytes([b[7], b[8]]) as u64;
                if let Some(text) = front.text.take()
                    && self.statements.len() < MAX_STATEMENTS
                {
                    self.statements.insert(id, text);
                }
                front.reply = match (params, columns) {
                    (0, 0) => return self.finish(None, ts_ns, out),
                    (0, c) => Reply::Defs {
                        left: c,
                        then: AfterDefs::Done,
                    },
                    (p, c) => Reply::Defs {
                        left: p,
                        then: AfterDefs::PrepareColumns(c),
                    },
                };
            }
            Some(0x00) | Some(0xfe) => {
                if p.body[0] == 0 && more_results(&p.body) {
                    return;
                }
                if front.what == What::InitDb {
                    self.database = front.text.take();
                }
                self.finish(None, ts_ns, out);
            }
            // LOCAL INFILE: the client sends a file; followed no further.
            Some(0xfb) => self.give_up(out),
            _ => match lenenc(&p.body) {
                Some((columns, _)) if columns > 0 => {
                    front.reply = Reply::Defs {
                        left: columns,
                        then: AfterDefs::Rows,
                    };
                }
                _ => self.lose(out),
            },
        }
    }

    /// The oldest command's reply is complete.
    fn finish(&mut self, error: Option<Outcome>, ts_ns: u64, out: &mut Out<'_>) {
        let Some(owed) = self.owed.pop_front() else {
            return;
        };
        if let What::Call(id) = owed.what {
            if let Some(outcome) = error {
                out.push(Step::Outcome { id, outcome });
            }
            out.push(Step::End {
                id,
                end_ns: ts_ns,
                body: 0,
                error: None,
            });
        }
    }

    fn lose(&mut self, out: &mut Out<'_>) {
        out.stats.desyncs += 1;
        out.push(Step::AbandonAll);
        self.owed.clear();
        self.server_lost = true;
        self.client_lost = true;
    }

    /// The reply stream, lost: one command is answered by one reply, so a read that ends with
    /// a reply's closing OK or EOF ends the oldest command's reply.
    fn resync_server(&mut self, bytes: &[u8], missing: u64, ts_ns: u64, out: &mut Out<'_>) {
        if missing == 0 && ends_reply(bytes) {
            if let Some(&Owed {
                what: What::Call(id),
                ..
            }) = self.owed.front()
            {
                out.push(Step::Partial { id });
            }
            self.finish(None, ts_ns, out);
            self.server = Reader::default();
            self.server_lost = false;
        }
    }
}

/// Whether a read ends with the last packet of a reply: an EOF (`05 00 00 seq FE`, 2 bytes of
/// warnings, 2 of status) or an OK closing a result set (`FE`, then affected rows, insert id,
/// status and warnings), with no further result set announced.
fn ends_reply(bytes: &[u8]) -> bool {
    let status_done = |s: &[u8]| u16::from_le_bytes([s[0], s[1]]) & SERVER_MORE_RESULTS_EXISTS == 0;
    let n = bytes.len();
    let eof = n >= 9 && bytes[n - 9..n - 6] == [5, 0, 0] && bytes[n - 5] == 0xfe;
    if eof {
        return status_done(&bytes[n - 2..]);
    }
    // The usual closing OK: zero affected rows and insert id, status, warnings.
    n >= 11
        && bytes[n - 11..n - 8] == [7, 0, 0]
        && bytes[n - 7] == 0xfe
        && bytes[n - 6..n - 4] == [0, 0]
        && status_done(&bytes[n - 4..n - 2])
}

/// An OK or EOF packet's "more results follow" status.
fn more_results(body: &[u8]) -> bool {
    let status = match body.first() {
        // EOF: warnings, then status.
        Some(0xfe) if body.len() == 5 => body.get(3..5),
        _ => {
            let Some((_, a)) = body.get(1..).and_then(lenenc) else {
                return false;
            };
            let Some((_, b)) = body.get(1 + a..).and_then(lenenc) else {
                return false;
            };
            body.get(1 + a + b..3 + a + b)
        }
    };
    status.is_some_and(|s| u16::from_le_bytes([s[0], s[1]]) & SERVER_MORE_RESULTS_EXISTS != 0)
}

/// A length-encoded integer and the bytes it took.
fn lenenc(b: &[u8]) -> Option<(u64, usize)> {
    let wide = |n: usize| {
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(b.get(1..1 + n)?);
        Some((u64::from_le_bytes(v), 1 + n))
    };
    match *b.first()? {
        n @ 0..=0xfa => Some((n as u64, 1)),
        0xfc => wide(2),
        0xfd => wide(3),
        0xfe => wide(8),
        _ => None,
    }
}

fn statement_id(rest: &[u8]) -> Option<u32> {
    rest.get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// An ERR packet: `FF`, error number, `#` and SQLSTATE, message. The conventions' status code
/// for MySQL is the error number.
fn error_outcome(body: &[u8]) -> Outcome {
    let code = body
        .get(1..3)
        .map(|c| u16::from_le_bytes([c[0], c[1]]).to_string())
        .unwrap_or_default();
    let message = match body.get(3..) {
        Some([b'#', rest @ ..]) => rest.get(5..).unwrap_or_default(),
        Some(rest) => rest,
        None => &[],
    };
    Outcome::DbError {
        code,
        message: String::from_utf8_lossy(message).into_owned(),
    }
}

fn client_keeps(_first: u8) -> usize {
    MAX_CLIENT_BODY
}

fn server_keeps(first: u8) -> usize {
    if first == 0xff {
        MAX_ERROR
    } else {
        SERVER_HEAD
    }
}

/// Whether a client read is one whole command packet (where a lost client stream resumes).
fn whole_command(bytes: &[u8], missing: u64) -> bool {
    match bytes {
        [a, b, c, 0, _, ..] => {
            u32::from_le_bytes([*a, *b, *c, 0]) as u64 + 4 == bytes.len() as u64 + missing
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
                    if i > 0 || !whole_command(bytes, missing) {
                        return;
                    }
                    self.client = Reader::default();
                    self.client_lost = false;
                }
                let ok = self
                    .client
                    .feed(bytes, missing, client_keeps, &mut self.packets);
                // Drained, not dropped: the buffer's allocation serves every segment.
                let mut packets = std::mem::take(&mut self.packets);
                for p in packets.drain(..) {
                    self.client_packet(p, seg.ts_ns, out);
                }
                self.packets = packets;
                if !ok {
                    self.lose(out);
                }
            } else {
                if self.server_lost {
                    self.resync_server(bytes, missing, seg.ts_ns, out);
                    continue;
                }
                let ok = self
                    .server
                    .feed(bytes, missing, server_keeps, &mut self.packets);
                let mut packets = std::mem::take(&mut self.packets);
                for p in packets.drain(..) {
                    self.server_packet(p, seg.ts_ns, out);
                    if self.gone || self.server_lost {
                        break;
                    }
                }
                self.packets = packets;
                if self.gone {
                    return;
                }
                if !ok && !self.server_lost {
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
