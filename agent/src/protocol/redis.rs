//! Redis (RESP2 and RESP3): each command is an exchange that ends at its own reply, so a
//! pipeline of N commands in one write is N spans. Bulk strings are skipped by length, so
//! replies of any size cost nothing but their headers.
use std::collections::VecDeque;

use super::{Call, DbCall, Decoder, MAX_IN_FLIGHT, Out, Outcome, Segment, Step};

/// Arguments of a command kept for its text; the rest are counted.
const MAX_ARGS: usize = 8;
/// Bytes kept of one argument.
const MAX_ARG: usize = 64;
/// Longest header line (type byte to CRLF) before the stream is judged not RESP.
const MAX_LINE: usize = 4096;
/// Deepest aggregate nesting followed.
const MAX_DEPTH: usize = 32;

/// Commands whose arguments are credentials: never kept, whatever the configuration.
const SECRET: &[&str] = &["AUTH", "HELLO", "MIGRATE", "CONFIG", "ACL"];

/// One complete top-level value of one direction.
#[derive(Debug, Default, PartialEq, Eq)]
struct Value {
    /// The type byte (`*`, `+`, `-`, …); `b' '` for an inline command.
    kind: u8,
    /// Bulk strings directly inside a top-level array (a command's name and arguments), first
    /// [`MAX_ARGS`] of them, each cut at [`MAX_ARG`] bytes.
    args: Vec<Vec<u8>>,
    /// Elements of that array in all.
    arg_count: u64,
    /// Simple or blob error text.
    error: Option<Vec<u8>>,
}

/// One direction's RESP stream.
#[derive(Default)]
struct Reader {
    line: Vec<u8>,
    /// Bytes of the current bulk string still to come (its CRLF included).
    bulk_left: u64,
    /// The current bulk string is kept (a command argument, or a blob error).
    keep: bool,
    /// Elements still to read in each open aggregate, outermost first.
    stack: Vec<u64>,
    value: Value,
}

impl Reader {
    fn reset(&mut self) {
        *self = Self::default();
    }

    /// Reads `data` (followed by `missing` uncaptured bytes); complete top-level values go to
    /// `done`. Returns false when the stream can no longer be followed.
    fn feed(&mut self, mut data: &[u8], missing: u64, done: &mut Vec<Value>) -> bool {
        while !data.is_empty() {
            if self.bulk_left > 0 {
                let n = (self.bulk_left.min(data.len() as u64)) as usize;
                if self.keep {
                    // The CRLF closing the string is not part of it.
                    let content = n.min(self.bulk_left.saturating_sub(2) as usize);
                    self.keep_bytes(&data[..content]);
                }
                self.bulk_left -= n as u64;
                data = &data[n..];
                if self.bulk_left == 0 {
                    self.element_done(done);
                }
                continue;
            }
            let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                if self.line.len() + data.len() > MAX_LINE {
                    return false;
                }
                self.line.extend_from_slice(data);
                break;
            };
            if self.line.len() + nl > MAX_LINE {
                return false;
            }
            self.line.extend_from_slice(&data[..nl]);
            data = &data[nl + 1..];
            if !self.header(done) {
                return false;
            }
            self.line.clear();
        }
        if missing == 0 {
            return true;
        }
        // Uncaptured bytes can only be followed inside a bulk string.
        if missing <= self.bulk_left {
            self.bulk_left -= missing;
            if self.bulk_left == 0 {
                self.element_done(done);
            }
            return true;
        }
        false
    }

    fn keep_bytes(&mut self, bytes: &[u8]) {
        let target = match (self.value.kind, self.value.error.as_mut()) {
            (b'!', Some(e)) => e,
            _ => match self.value.args.last_mut() {
                Some(a) => a,
                None => return,
            },
        };
        let room = MAX_ARG.saturating_sub(target.len());
        target.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// A complete header line.
    fn header(&mut self, done: &mut Vec<Value>) -> bool {
        let line = match self.line.strip_suffix(b"\r") {
            Some(l) => l,
            None => &self.line[..],
        };
        let Some((&kind, rest)) = line.split_first() else {
            return self.stack.is_empty() && self.value.kind == 0; // a bare CRLF between values
        };
        let top = self.stack.is_empty();
        if top {
            self.value = Value {
                kind,
                ..Value::default()
            };
        }
        let number = || std::str::from_utf8(rest).ok()?.parse::<i64>().ok();
        match kind {
            b'*' | b'%' | b'~' | b'>' | b'|' => {
                let Some(n) = number() else { return false };
                let n = if matches!(kind, b'%' | b'|') {
                    n.saturating_mul(2)
                } else {
                    n
                };
                if top && kind == b'*' {
                    self.value.arg_count = n.max(0) as u64;
                }
                if n <= 0 {
                    self.element_done(done);
                } else if self.stack.len() >= MAX_DEPTH {
                    return false;
                } else {
                    self.stack.push(n as u64);
                }
            }
            b'$' | b'!' | b'=' => {
                let Some(n) = number() else { return false };
                if n < 0 {
                    self.element_done(done);
                    return true;
                }
                let argument = self.stack.len() == 1 && self.value.kind == b'*';
                self.keep = (argument && self.value.args.len() < MAX_ARGS) || (top && kind == b'!');
                if argument && self.keep {
                    self.value.args.push(Vec::new());
                }
                if top && kind == b'!' {
                    self.value.error = Some(Vec::new());
                }
                self.bulk_left = n as u64 + 2;
            }
            b'-' => {
                if top {
                    self.value.error = Some(rest.to_vec());
                }
                self.element_done(done);
            }
            b'+' | b':' | b',' | b'_' | b'#' | b'(' => self.element_done(done),
            // An inline command (`PING\r\n`), which only a client sends.
            _ if top && kind.is_ascii_alphabetic() => {
                self.value.kind = b' ';
                self.value.args = line
                    .split(|b| b.is_ascii_whitespace())
                    .filter(|a| !a.is_empty())
                    .take(MAX_ARGS)
                    .map(|a| a[..a.len().min(MAX_ARG)].to_vec())
                    .collect();
                self.value.arg_count = self.value.args.len() as u64;
                self.element_done(done);
            }
            _ => return false,
        }
        true
    }

    /// One element finished: closes every aggregate it completes, and the top-level value.
    fn element_done(&mut self, done: &mut Vec<Value>) {
        self.keep = false;
        loop {
            match self.stack.last_mut() {
                None => {
                    done.push(std::mem::take(&mut self.value));
                    return;
                }
                Some(left) => {
                    *left -= 1;
                    if *left > 0 {
                        return;
                    }
                    self.stack.pop();
                }
            }
        }
    }
}

/// A command awaiting its reply.
struct Pending {
    id: u64,
    /// `SELECT n`: the database the connection uses once this succeeds.
    select: Option<String>,
    subscribe: bool,
}

pub struct Exchanges {
    requests: Reader,
    replies: Reader,
    pending: VecDeque<Pending>,
    next_id: u64,
    /// The selected database (`db.namespace`); unknown on a connection joined mid-way.
    db: Option<String>,
    keep_literals: bool,
    values: Vec<Value>,
    /// Framing was lost: waiting for a write that starts a command.
    lost: bool,
    gone: bool,
}

impl Exchanges {
    /// `joined_late`: the connection predates the agent (its database is unknown).
    /// `keep_literals`: keep argument values in the text (never for credentials).
    pub fn new(joined_late: bool, keep_literals: bool) -> Self {
        Self {
            requests: Reader::default(),
            replies: Reader::default(),
            pending: VecDeque::new(),
            next_id: 0,
            db: (!joined_late).then(|| "0".to_string()),
            keep_literals,
            values: Vec::new(),
            lost: false,
            gone: false,
        }
    }

    fn lose(&mut self, out: &mut Out<'_>) {
        out.stats.desyncs += 1;
        out.push(Step::AbandonAll);
        self.pending.clear();
        self.requests.reset();
        self.replies.reset();
        self.lost = true;
    }

    fn commands(&mut self, start_ns: u64, out: &mut Out<'_>) {
        if self.pending.len() + self.values.len() > MAX_IN_FLIGHT {
            self.values.clear();
            return self.lose(out);
        }
        let batch = self.values.len() as u32;
        for v in self.values.drain(..) {
            let Some(name) = v.args.first() else { continue };
            let op = String::from_utf8_lossy(name).to_ascii_uppercase();
            let id = self.next_id;
            self.next_id += 1;
            let arg = |i: usize| {
                v.args
                    .get(i)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
            };
            self.pending.push_back(Pending {
                id,
                select: (op == "SELECT").then(|| arg(1)).flatten(),
                subscribe: matches!(op.as_str(), "SUBSCRIBE" | "PSUBSCRIBE" | "SSUBSCRIBE"),
            });
            let text = command_text(&op, &v, self.keep_literals);
            let call = Call::Db(DbCall {
                system: "redis",
                operation: Some(op),
                text,
                namespace: self.db.clone(),
                batch,
                start_ns,
            });
            out.push(Step::Begin {
                id,
                call,
                partial: false,
            });
        }
    }

    fn replies(&mut self, end_ns: u64, out: &mut Out<'_>) {
        for v in self.values.drain(..) {
            // Out-of-band pushes (RESP3) and attributes answer no command.
            if matches!(v.kind, b'>' | b'|') {
                continue;
            }
            let Some(p) = self.pending.pop_front() else {
                continue;
            };
            match &v.error {
                Some(e) => {
                    let text = String::from_utf8_lossy(e);
                    let (code, _) = text.split_once(' ').unwrap_or((&text, ""));
                    let outcome = Outcome::DbError {
                        code: code.to_string(),
                        message: text.to_string(),
                    };
                    out.push(Step::Outcome { id: p.id, outcome });
                }
                None => {
                    if p.select.is_some() {
                        self.db = p.select;
                    }
                }
            }
            out.push(Step::End {
                id: p.id,
                end_ns,
                body: 0,
                error: None,
            });
            // Subscribed: what follows are messages, not replies. Spans stop here rather than
            // one per message.
            if p.subscribe {
                self.gone = true;
                out.push(Step::AbandonAll);
                out.push(Step::GiveUp { ignore: true });
                return;
            }
        }
    }
}

/// The command as exported: its name, its key (the first argument), and `?` for each other
/// argument unless literals are kept. Credentials never appear.
fn command_text(op: &str, v: &Value, keep_literals: bool) -> String {
    let mut text = op.to_string();
    let secret = SECRET.contains(&op);
    for i in 1..v.arg_count as usize {
        text.push(' ');
        match v.args.get(i) {
            Some(a) if !secret && (i == 1 || keep_literals) => {
                text.push_str(&String::from_utf8_lossy(a));
            }
            _ => text.push('?'),
        }
        if text.len() > 4 * MAX_ARG * MAX_ARGS {
            text.push_str(" …");
            break;
        }
    }
    text
}

impl Decoder for Exchanges {
    fn feed(&mut self, seg: &Segment<'_>, out: &mut Out<'_>) {
        if self.gone {
            return;
        }
        if seg.gap {
            self.lose(out);
        }
        if self.lost {
            // A client writes whole commands: a write that starts with one resynchronises
            // both sides (replies to abandoned commands are then the only risk, and rare).
            let first = seg.pieces().next();
            if !seg.requests || first.is_none_or(|(b, _)| b.first() != Some(&b'*')) {
                return;
            }
            self.lost = false;
        }
        for (bytes, missing) in seg.pieces() {
            let reader = if seg.requests {
                &mut self.requests
            } else {
                &mut self.replies
            };
            let ok = reader.feed(bytes, missing, &mut self.values);
            if seg.requests {
                self.commands(seg.ts_ns, out);
            } else {
                self.replies(seg.ts_ns, out);
            }
            if self.gone || self.lost {
                return;
            }
            if !ok {
                self.values.clear();
                return self.lose(out);
            }
        }
    }

    fn close(&mut self, _ts_ns: u64, _out: &mut Out<'_>) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testing::{self, ended};

    type Run = testing::Run<Exchanges>;

    fn run() -> Run {
        Run::new(Exchanges::new(false, false))
    }

    fn cmd(args: &[&str]) -> Vec<u8> {
        let mut v = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            v.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
        v
    }

    fn begun(steps: &[Step]) -> Vec<(u64, String, u32)> {
        testing::calls(steps)
            .into_iter()
            .map(|(id, c)| (id, c.text.clone(), c.batch))
            .collect()
    }

    #[test]
    fn pipelined_commands_end_at_their_own_replies() {
        let mut r = run();
        let mut write = cmd(&["SET", "cart:42", "secret-value"]);
        write.extend(cmd(&["GET", "cart:42"]));
        write.extend(cmd(&["LRANGE", "list", "0", "-1"]));
        r.feed(true, &write, 0, 10);
        let steps = r.take();
        assert_eq!(
            begun(&steps),
            vec![
                (0, "SET cart:42 ?".into(), 3),
                (1, "GET cart:42".into(), 3),
                (2, "LRANGE list ? ?".into(), 3)
            ]
        );
        // Replies split across reads, a big bulk string mostly uncaptured.
        let mut replies = b"+OK\r\n$100000\r\n".to_vec();
        replies.extend_from_slice(&[b'x'; 100]);
        r.feed(false, &replies, 100_002 - 100, 20);
        r.feed(false, b"*2\r\n$1\r\na\r\n$", 0, 30);
        r.feed(false, b"1\r\nb\r\n", 0, 40);
        assert_eq!(ended(&r.take()), vec![(0, 20), (1, 20), (2, 40)]);
    }

    #[test]
    fn errors_select_and_credentials() {
        let mut r = run();
        r.feed(true, &cmd(&["AUTH", "default", "hunter2"]), 0, 1);
        r.feed(false, b"+OK\r\n", 0, 2);
        r.feed(true, &cmd(&["SELECT", "3"]), 0, 3);
        r.feed(false, b"+OK\r\n", 0, 4);
        r.feed(true, &cmd(&["INCR", "name"]), 0, 5);
        r.feed(
            false,
            b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
            0,
            6,
        );
        let steps = r.take();
        let texts: Vec<String> = begun(&steps).into_iter().map(|b| b.1).collect();
        assert_eq!(texts, ["AUTH ? ?", "SELECT 3", "INCR name"]);
        assert!(!format!("{steps:?}").contains("hunter2"));
        let namespace = steps.iter().find_map(|s| match s {
            Step::Begin {
                id: 2,
                call: Call::Db(c),
                ..
            } => c.namespace.clone(),
            _ => None,
        });
        assert_eq!(namespace.as_deref(), Some("3"));
        assert!(steps.contains(&Step::Outcome {
            id: 2,
            outcome: Outcome::DbError {
                code: "WRONGTYPE".into(),
                message: "WRONGTYPE Operation against a key holding the wrong kind of value".into()
            }
        }));
    }

    #[test]
    fn commands_without_replies_are_bounded() {
        let mut r = run();
        let write: Vec<u8> = (0..100).flat_map(|_| cmd(&["PING"])).collect();
        for ts in 0..(MAX_IN_FLIGHT / 100 + 1) as u64 {
            r.feed(true, &write, 0, ts);
        }
        assert!(r.d.pending.len() <= MAX_IN_FLIGHT);
        assert_eq!(r.stats.desyncs, 1);
        assert!(r.take().contains(&Step::AbandonAll));
    }

    #[test]
    fn transactions_end_each_command_at_its_own_reply() {
        let mut r = run();
        let mut write = cmd(&["MULTI"]);
        write.extend(cmd(&["INCR", "a"]));
        write.extend(cmd(&["INCR", "b"]));
        write.extend(cmd(&["EXEC"]));
        r.feed(true, &write, 0, 1);
        r.feed(false, b"+OK\r\n+QUEUED\r\n+QUEUED\r\n", 0, 2);
        r.feed(false, b"*2\r\n:1\r\n:1\r\n", 0, 3);
        let steps = r.take();
        let names: Vec<String> = begun(&steps).into_iter().map(|b| b.1).collect();
        assert_eq!(names, ["MULTI", "INCR a", "INCR b", "EXEC"]);
        assert_eq!(ended(&steps), vec![(0, 2), (1, 2), (2, 2), (3, 3)]);
    }

    #[test]
    fn resp3_pushes_attributes_and_maps() {
        let mut r = run();
        r.feed(true, &cmd(&["HELLO", "3", "AUTH", "u", "p"]), 0, 1);
        r.feed(false, b"%2\r\n+server\r\n+redis\r\n+proto\r\n:3\r\n", 0, 2);
        r.feed(true, &cmd(&["GET", "k"]), 0, 3);
        // An invalidation push, then an attribute, then the reply.
        r.feed(
            false,
            b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n|1\r\n+ttl\r\n:5\r\n_\r\n",
            0,
            4,
        );
        let steps = r.take();
        assert_eq!(begun(&steps)[0].1, "HELLO ? ? ? ?");
        assert_eq!(ended(&steps), vec![(0, 2), (1, 4)]);
    }

    #[test]
    fn subscribe_stops_spans_and_lost_bytes_resync() {
        let mut r = run();
        r.feed(true, &cmd(&["SUBSCRIBE", "news"]), 0, 1);
        r.feed(
            false,
            b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n",
            0,
            2,
        );
        let steps = r.take();
        assert_eq!(ended(&steps), vec![(0, 2)]);
        assert!(steps.contains(&Step::GiveUp { ignore: true }));
        r.feed(
            false,
            b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n",
            0,
            3,
        );
        assert!(r.take().is_empty(), "messages make no spans");

        let mut r = run();
        r.feed(true, &cmd(&["GET", "a"]), 0, 1);
        assert_eq!(begun(&r.take()).len(), 1);
        // A reply header lost in uncaptured bytes: nothing can be paired until a new command.
        r.feed(false, b"*900\r\n$1\r\nx\r\n", 5000, 2);
        assert_eq!(r.take(), vec![Step::AbandonAll]);
        r.feed(false, b"$1\r\ny\r\n", 0, 3);
        r.feed(true, &cmd(&["GET", "b"]), 0, 4);
        r.feed(false, b"$1\r\nz\r\n", 0, 5);
        let steps = r.take();
        assert_eq!(begun(&steps), vec![(1, "GET b".into(), 1)]);
        assert_eq!(ended(&steps), vec![(1, 5)]);
        assert_eq!(r.stats.desyncs, 1);
    }
}
