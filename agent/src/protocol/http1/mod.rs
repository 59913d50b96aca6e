//! Incremental HTTP/1.x decoding of one connection, both directions.
//!
//! Input is what the kernel saw per syscall: a captured prefix plus the true byte count. Bytes
//! that were not captured are fine inside bodies (they are counted, not parsed); inside a head
//! they break framing, and the direction resynchronises at the next chunk that starts like a
//! message. Only the headers spans need are kept, so decoding allocates little.
use std::{borrow::Cow, collections::VecDeque, mem::MaybeUninit};

pub mod exchanges;
mod response;

/// Longest head we buffer before declaring the stream garbage.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 96;
/// Request headers kept (lower-case); responses keep none (their framing is read in place).
const KEPT: &[&str] = &[
    "host",
    "user-agent",
    "content-type",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "traceparent",
    "tracestate",
];

/// Kept request headers. Host and User-Agent, which every span reads, have places of their
/// own: most requests keep no other header, and then keeping them allocates no list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    host: Option<String>,
    user_agent: Option<String>,
    /// The others, and any repeat of those two, in arrival order.
    others: Vec<(&'static str, String)>,
}

impl Headers {
    fn place(&mut self, name: &str) -> Option<&mut Option<String>> {
        match name {
            "host" => Some(&mut self.host),
            "user-agent" => Some(&mut self.user_agent),
            _ => None,
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find_map(|(n, v)| (n == name).then_some(v))
    }

    pub fn insert(&mut self, name: &str, value: &str) {
        self.insert_with(name, value, &[]);
    }

    /// Keeps the header if spans need it or it is one of `captured` (lower-case names the
    /// configuration asked to export).
    pub fn insert_with(&mut self, name: &str, value: &str, captured: &'static [&'static str]) {
        if let Some(kept) = kept_name(name, captured) {
            self.insert_kept(kept, value.to_string());
        }
    }

    /// Keeps `value` under `kept`, a name [`kept_name`] gave.
    pub fn insert_kept(&mut self, kept: &'static str, value: String) {
        match self.place(kept) {
            Some(place @ None) => *place = Some(value),
            _ => self.others.push((kept, value)),
        }
    }

    /// Moves a header's value out (the span keeps it; no copy).
    pub fn take(&mut self, name: &str) -> Option<String> {
        if let Some(v) = self.place(name).and_then(Option::take) {
            return Some(v);
        }
        let i = self.others.iter().position(|(n, _)| *n == name)?;
        Some(self.others.swap_remove(i).1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let own = [("host", &self.host), ("user-agent", &self.user_agent)];
        own.into_iter()
            .filter_map(|(n, v)| Some((n, v.as_deref()?)))
            .chain(self.others.iter().map(|(n, v)| (*n, v.as_str())))
    }
}

/// Text that is most often one of a few fixed words (a method, a span name).
pub type Text = Cow<'static, str>;

/// The standard request methods (RFC 9110 §9 and PATCH).
const METHODS: [&str; 9] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

/// A request method as [`Text`]: the standard ones are fixed words, not copied per request.
pub fn method_text(m: &str) -> Text {
    match METHODS.iter().find(|k| **k == m) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(m.to_string()),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Text,
    pub target: String,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Headers,
    pub start_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub version: u8,
    pub start_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    RequestHead(RequestHead),
    /// The request (head and body) is complete.
    RequestEnd {
        end_ns: u64,
        body_len: u64,
    },
    /// A final (non-1xx) response head.
    ResponseHead(ResponseHead),
    ResponseEnd {
        end_ns: u64,
        body_len: u64,
    },
    /// Framing was lost in this direction (garbage, or a head that was not captured).
    Desync {
        requests: bool,
    },
    /// `101 Switching Protocols`: the connection is no longer HTTP/1.
    Upgraded,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    Length(u64),
    Chunked(Chunk),
    /// Until the connection closes (HTTP/1.0-style responses).
    UntilClose,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line; `value` so far, `ext` once past digits.
    Size {
        value: u64,
        digits: u8,
        ext: bool,
    },
    SizeLf {
        value: u64,
        digits: u8,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines until an empty one. `blank` is true at line start.
    Trailer {
        blank: bool,
    },
    TrailerLf {
        blank: bool,
    },
}

#[derive(Debug)]
enum State {
    /// Between messages.
    Idle,
    Head,
    Body {
        body: Body,
        len: u64,
    },
    /// Lost framing: wait for a chunk that starts a message.
    Desync,
    /// After an upgrade: ignore everything.
    Done,
}

/// One direction of a connection.
#[derive(Debug)]
struct Decoder {
    requests: bool,
    /// Extra request headers to keep (configured capture list).
    captured: &'static [&'static str],
    state: State,
    head: Vec<u8>,
    head_start_ns: u64,
}

#[derive(Debug)]
pub struct Http1Conn {
    req: Decoder,
    resp: Decoder,
    /// For each request whose response is still to come: was it HEAD (no response body)?
    awaiting: VecDeque<bool>,
}

impl Default for Http1Conn {
    fn default() -> Self {
        Self::new()
    }
}

impl Http1Conn {
    pub fn new() -> Self {
        Self::with_captured(&[])
    }

    /// A decoder that also keeps the request headers named in `captured`.
    pub fn with_captured(captured: &'static [&'static str]) -> Self {
        Self {
            req: Decoder::new(true, captured),
            resp: Decoder::new(false, &[]),
            awaiting: VecDeque::new(),
        }
    }

    /// Feeds one syscall's worth of bytes. `missing` counts bytes moved but not captured
    /// (they follow `data`).
    pub fn feed(
        &mut self,
        requests: bool,
        data: &[u8],
        missing: u64,
        ts_ns: u64,
        out: &mut Vec<Message>,
    ) {
        let d = if requests {
            &mut self.req
        } else {
            &mut self.resp
        };
        d.feed(data, missing, ts_ns, &mut self.awaiting, out);
    }

    /// Framing was lost: skip to the next chunk that starts a message, on both sides.
    pub fn resync(&mut self) {
        for d in [&mut self.req, &mut self.resp] {
            d.head.clear();
            d.state = State::Desync;
        }
        self.awaiting.clear();
    }

    /// The connection closed: finishes a response delimited by close.
    pub fn close(&mut self, ts_ns: u64, out: &mut Vec<Message>) {
        if let State::Body {
            body: Body::UntilClose,
            len,
        } = self.resp.state
        {
            out.push(Message::ResponseEnd {
                end_ns: ts_ns,
                body_len: len,
            });
            self.resp.state = State::Idle;
        }
    }
}

/// Whether `data` begins an HTTP/1 request (or response, when `requests` is false).
pub fn starts_message(data: &[u8], requests: bool) -> bool {
    if requests {
        METHODS.iter().any(|m| {
            data.strip_prefix(m.as_bytes())
                .is_some_and(|rest| rest.first() == Some(&b' '))
        })
    } else {
        data.starts_with(b"HTTP/1.")
    }
}

impl Decoder {
    fn new(requests: bool, captured: &'static [&'static str]) -> Self {
        Self {
            requests,
            captured,
            state: State::Idle,
            head: Vec::new(),
            head_start_ns: 0,
        }
    }

    fn desync(&mut self, out: &mut Vec<Message>) {
        self.head.clear();
        self.state = State::Desync;
        out.push(Message::Desync {
            requests: self.requests,
        });
    }

    fn feed(
        &mut self,
        mut data: &[u8],
        mut missing: u64,
        ts: u64,
        awaiting: &mut VecDeque<bool>,
        out: &mut Vec<Message>,
    ) {
        if matches!(self.state, State::Desync) {
            if starts_message(data, self.requests) {
                self.state = State::Idle;
            } else {
                return;
            }
        }
        loop {
            match &mut self.state {
                State::Done | State::Desync => return,
                State::Idle => {
                    if data.is_empty() {
                        if missing > 0 {
                            // A message began with bytes we never saw.
                            self.desync(out);
                        }
                        return;
                    }
                    self.head_start_ns = ts;
                    self.state = State::Head;
                }
                State::Head => {
                    let before = self.head.len();
                    // A head that arrives whole (the usual case) is parsed where it lies;
                    // only a head split across syscalls is gathered first.
                    let parsed = if before == 0 {
                        let parsed = self.parse_head(data, awaiting, out);
                        if let Ok(None) = parsed {
                            let take = data.len().min(MAX_HEAD);
                            self.head.extend_from_slice(&data[..take]);
                        }
                        parsed
                    } else {
                        let take = data.len().min(MAX_HEAD - before);
                        self.head.extend_from_slice(&data[..take]);
                        let head = std::mem::take(&mut self.head);
                        let parsed = self.parse_head(&head, awaiting, out);
                        self.head = head;
                        parsed
                    };
                    match parsed {
                        Ok(Some(used)) => {
                            let consumed = used - before;
                            data = &data[consumed..];
                            self.head.clear();
                            if let State::Body {
                                body: Body::Length(0),
                                ..
                            } = self.state
                            {
                                self.finish(0, ts, out);
                            }
                        }
                        Ok(None) => {
                            if self.head.len() >= MAX_HEAD || missing > 0 {
                                self.desync(out);
                            }
                            return;
                        }
                        Err(()) => {
                            self.desync(out);
                            return;
                        }
                    }
                }
                State::Body { body, len } => {
                    if data.is_empty() && missing == 0 {
                        return;
                    }
                    match body {
                        Body::Length(remaining) => {
                            let avail = data.len() as u64 + missing;
                            let used = avail.min(*remaining);
                            *remaining -= used;
                            *len += used;
                            let from_data = used.min(data.len() as u64) as usize;
                            data = &data[from_data..];
                            missing -= used - from_data as u64;
                            if *remaining == 0 {
                                let n = *len;
                                self.finish(n, ts, out);
                            } else {
                                return;
                            }
                        }
                        Body::UntilClose => {
                            *len += data.len() as u64 + missing;
                            return;
                        }
                        Body::Chunked(chunk) => match step_chunked(chunk, data, missing) {
                            Ok((used_data, used_missing, body_bytes, done)) => {
                                *len += body_bytes;
                                data = &data[used_data..];
                                missing -= used_missing;
                                if done {
                                    let n = *len;
                                    self.finish(n, ts, out);
                                } else if data.is_empty() && missing == 0 {
                                    return;
                                }
                            }
                            Err(()) => {
                                self.desync(out);
                                return;
                            }
                        },
                    }
                }
            }
        }
    }

    fn finish(&mut self, body_len: u64, ts: u64, out: &mut Vec<Message>) {
        out.push(if self.requests {
            Message::RequestEnd {
                end_ns: ts,
                body_len,
            }
        } else {
            Message::ResponseEnd {
                end_ns: ts,
                body_len,
            }
        });
        self.state = State::Idle;
    }

    /// Parses a head from `buf`. `Ok(Some(n))`: complete, its first `n` bytes were the head.
    fn parse_head(
        &mut self,
        buf: &[u8],
        awaiting: &mut VecDeque<bool>,
        out: &mut Vec<Message>,
    ) -> Result<Option<usize>, ()> {
        if self.requests {
            // Left uninitialised: zeroing 96 headers cost more than parsing a typical head.
            let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut []);
            let n = match req.parse_with_uninit_headers(buf, &mut raw) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(_) => return Err(()),
            };
            let mut headers = Headers::default();
            let framing = collect(req.headers, &mut headers, self.captured)?;
            let method = method_text(req.method.ok_or(())?);
            let body = match framing {
                Framing::Chunked => Body::Chunked(Chunk::Size {
                    value: 0,
                    digits: 0,
                    ext: false,
                }),
                Framing::Length(n) => Body::Length(n),
                // Requests without framing headers have no body (RFC 9112 §6.3).
                Framing::None => Body::Length(0),
            };
            awaiting.push_back(method.eq_ignore_ascii_case("HEAD"));
            out.push(Message::RequestHead(RequestHead {
                method,
                target: req.path.ok_or(())?.to_string(),
                version: req.version.ok_or(())?,
                headers,
                start_ns: self.head_start_ns,
            }));
            self.state = State::Body { body, len: 0 };
            Ok(Some(n))
        } else {
            let Some(response::Head {
                len: n,
                version,
                status,
                framing,
            }) = response::scan(buf)?
            else {
                return Ok(None);
            };
            if status == 101 {
                awaiting.pop_front();
                out.push(Message::Upgraded);
                self.state = State::Done;
                return Ok(Some(n));
            }
            if (100..200).contains(&status) {
                // Interim response: the final one for the same request follows.
                self.state = State::Idle;
                return Ok(Some(n));
            }
            let was_head = awaiting.pop_front().unwrap_or(false);
            let body = if was_head || status == 204 || status == 304 {
                Body::Length(0)
            } else {
                match framing {
                    Framing::Chunked => Body::Chunked(Chunk::Size {
                        value: 0,
                        digits: 0,
                        ext: false,
                    }),
                    Framing::Length(n) => Body::Length(n),
                    Framing::None => Body::UntilClose,
                }
            };
            out.push(Message::ResponseHead(ResponseHead {
                status,
                version,
                start_ns: self.head_start_ns,
            }));
            self.state = State::Body { body, len: 0 };
            Ok(Some(n))
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

impl Framing {
    /// Takes in one header (RFC 9112 §6: chunked wins over a length).
    fn read(&mut self, name: &[u8], value: &[u8]) -> Result<(), ()> {
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.transfer_encoding(value);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            self.content_length(value)?;
        }
        Ok(())
    }

    fn transfer_encoding(&mut self, value: &[u8]) {
        let value = value.trim_ascii_end();
        let tail = value.len().saturating_sub(b"chunked".len());
        if value[tail..].eq_ignore_ascii_case(b"chunked") {
            *self = Framing::Chunked;
        }
    }

    fn content_length(&mut self, value: &[u8]) -> Result<(), ()> {
        if *self != Framing::Chunked {
            // Digits only (RFC 9110 §8.6).
            *self = Framing::Length(super::decimal(value.trim_ascii()).ok_or(())?);
        }
        Ok(())
    }
}

/// The kept name `name` matches, case-insensitively: one of [`KEPT`] or of `captured`.
pub(crate) fn kept_name(name: &str, captured: &'static [&'static str]) -> Option<&'static str> {
    KEPT.iter()
        .chain(captured)
        .find(|k| k.len() == name.len() && k.eq_ignore_ascii_case(name))
        .copied()
}

/// How the message's body is delimited (RFC 9112 §6).
fn framing(raw: &[httparse::Header<'_>]) -> Result<Framing, ()> {
    let mut framing = Framing::None;
    for h in raw {
        framing.read(h.name.as_bytes(), h.value)?;
    }
    Ok(framing)
}

/// Keeps the request headers spans need (and the `captured` ones); returns the framing.
fn collect(
    raw: &[httparse::Header<'_>],
    headers: &mut Headers,
    captured: &'static [&'static str],
) -> Result<Framing, ()> {
    for h in raw {
        if let Some(kept) = kept_name(h.name, captured) {
            let value = std::str::from_utf8(h.value).map_err(|_| ())?.trim();
            headers.insert_kept(kept, value.to_string());
        }
    }
    framing(raw)
}

/// Advances the chunked-body state machine. Returns (data bytes used, missing bytes used,
/// body payload bytes, message complete). Uncaptured bytes may only fall inside chunk data.
fn step_chunked(c: &mut Chunk, data: &[u8], missing: u64) -> Result<(usize, u64, u64, bool), ()> {
    let mut i = 0;
    let mut body = 0u64;
    let mut used_missing = 0u64;
    loop {
        if let Chunk::Data(remaining) = c {
            let avail = (data.len() - i) as u64;
            let take = avail.min(*remaining);
            i += take as usize;
            *remaining -= take;
            body += take;
            if *remaining > 0 && i == data.len() {
                let m = (missing - used_missing).min(*remaining);
                used_missing += m;
                *remaining -= m;
                body += m;
            }
            if *remaining == 0 {
                *c = Chunk::DataCr;
            } else {
                return Ok((i, used_missing, body, false));
            }
            continue;
        }
        let Some(&b) = data.get(i) else {
            if missing > used_missing {
                return Err(());
            }
            return Ok((i, used_missing, body, false));
        };
        i += 1;
        *c = match *c {
            Chunk::Size { value, digits, ext } => match b {
                b'\r' => Chunk::SizeLf { value, digits },
                b'\n' => after_size(value, digits)?,
                _ if ext => Chunk::Size { value, digits, ext },
                b';' | b' ' | b'\t' => Chunk::Size {
                    value,
                    digits,
                    ext: true,
                },
                _ => {
                    let v = (b as char).to_digit(16).ok_or(())? as u64;
                    if digits >= 15 {
                        return Err(());
                    }
                    Chunk::Size {
                        value: value * 16 + v,
                        digits: digits + 1,
                        ext,
                    }
                }
            },
            Chunk::SizeLf { value, digits } => {
                if b != b'\n' {
                    return Err(());
                }
                after_size(value, digits)?
            }
            Chunk::DataCr => match b {
                b'\r' => Chunk::DataLf,
                b'\n' => Chunk::Size {
                    value: 0,
                    digits: 0,
                    ext: false,
                },
                _ => return Err(()),
            },
            Chunk::DataLf => {
                if b != b'\n' {
                    return Err(());
                }
                Chunk::Size {
                    value: 0,
                    digits: 0,
                    ext: false,
                }
            }
            Chunk::Trailer { blank } => match b {
                b'\r' => Chunk::TrailerLf { blank },
                b'\n' if blank => return Ok((i, used_missing, body, true)),
                b'\n' => Chunk::Trailer { blank: true },
                _ => Chunk::Trailer { blank: false },
            },
            Chunk::TrailerLf { blank } => {
                if b != b'\n' {
                    return Err(());
                }
                if blank {
                    return Ok((i, used_missing, body, true));
                }
                Chunk::Trailer { blank: true }
            }
            // Handled before reading a byte.
            Chunk::Data(r) => Chunk::Data(r),
        };
    }
}

fn after_size(value: u64, digits: u8) -> Result<Chunk, ()> {
    if digits == 0 {
        return Err(());
    }
    Ok(if value == 0 {
        Chunk::Trailer { blank: true }
    } else {
        Chunk::Data(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(c: &mut Http1Conn, requests: bool, data: &[u8], ts: u64) -> Vec<Message> {
        let mut out = Vec::new();
        c.feed(requests, data, 0, ts, &mut out);
        out
    }

    fn req_head(m: &Message) -> &RequestHead {
        match m {
            Message::RequestHead(h) => h,
            other => panic!("expected request head, got {other:?}"),
        }
    }

    #[test]
    fn kept_headers_keep_repeats_in_order() {
        let mut h = Headers::default();
        for (name, value) in [
            ("Host", "a"),
            ("b3", "x"),
            ("HOST", "b"),
            ("User-Agent", "u"),
        ] {
            h.insert(name, value);
        }
        h.insert("cookie", "never kept");
        assert_eq!(
            h.iter().collect::<Vec<_>>(),
            [
                ("host", "a"),
                ("user-agent", "u"),
                ("b3", "x"),
                ("host", "b")
            ]
        );
        assert_eq!(
            (h.get("host"), h.get("b3"), h.get("cookie")),
            (Some("a"), Some("x"), None)
        );
        assert_eq!(h.take("host").as_deref(), Some("a"));
        assert_eq!(h.take("host").as_deref(), Some("b"));
        assert_eq!(h.take("host"), None);
        assert_eq!(h.get("user-agent"), Some("u"));
    }

    #[test]
    fn request_split_across_reads_keeps_first_byte_time() {
        let mut c = Http1Conn::new();
        assert!(feed(&mut c, true, b"GET /a?x=1 HTTP/1.1\r\nHo", 10).is_empty());
        let out = feed(
            &mut c,
            true,
            b"st: svc\r\nX-B3-TraceId: abc\r\nCookie: s\r\n\r\n",
            20,
        );
        let h = req_head(&out[0]);
        assert_eq!(
            (&*h.method, h.target.as_str(), h.start_ns),
            ("GET", "/a?x=1", 10)
        );
        assert_eq!(h.headers.get("host"), Some("svc"));
        assert_eq!(h.headers.get("x-b3-traceid"), Some("abc"));
        assert_eq!(
            h.headers.get("cookie"),
            None,
            "only needed headers are kept"
        );
        assert_eq!(
            out[1],
            Message::RequestEnd {
                end_ns: 20,
                body_len: 0
            }
        );
    }

    #[test]
    fn keep_alive_and_content_length_bodies() {
        let mut c = Http1Conn::new();
        let out = feed(
            &mut c,
            true,
            b"POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nab",
            1,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(
            feed(&mut c, true, b"cde", 2),
            vec![Message::RequestEnd {
                end_ns: 2,
                body_len: 5
            }]
        );
        let out = feed(
            &mut c,
            false,
            b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nxyz",
            3,
        );
        assert!(matches!(&out[0], Message::ResponseHead(h) if h.status == 201));
        assert_eq!(
            out[1],
            Message::ResponseEnd {
                end_ns: 3,
                body_len: 3
            }
        );
        // Second exchange on the same connection.
        let out = feed(&mut c, true, b"GET /q HTTP/1.1\r\n\r\n", 4);
        assert_eq!(req_head(&out[0]).target, "/q");
        let out = feed(
            &mut c,
            false,
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            5,
        );
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn pipelined_requests_and_responses() {
        let mut c = Http1Conn::new();
        let out = feed(
            &mut c,
            true,
            b"GET /1 HTTP/1.1\r\n\r\nHEAD /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n",
            1,
        );
        let targets: Vec<_> = out
            .iter()
            .filter_map(|m| match m {
                Message::RequestHead(h) => Some(h.target.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(targets, ["/1", "/2", "/3"]);
        // The HEAD response announces a length but carries no body.
        let out = feed(
            &mut c,
            false,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nHTTP/1.1 500 E\r\nContent-Length: 1\r\n\r\n!",
            2,
        );
        let ends: Vec<_> = out
            .iter()
            .filter_map(|m| match m {
                Message::ResponseEnd { body_len, .. } => Some(*body_len),
                _ => None,
            })
            .collect();
        assert_eq!(ends, [2, 0, 1]);
    }

    #[test]
    fn chunked_body_split_everywhere() {
        let body = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nX-T: 1\r\n\r\n";
        // Every split point must give the same result.
        for split in 1..body.len() {
            let mut c = Http1Conn::new();
            feed(&mut c, true, b"GET / HTTP/1.1\r\n\r\n", 0);
            let mut out = feed(&mut c, false, &body[..split], 1);
            out.extend(feed(&mut c, false, &body[split..], 2));
            assert_eq!(
                out.last(),
                Some(&Message::ResponseEnd {
                    end_ns: 2,
                    body_len: 21
                }),
                "split at {split}"
            );
        }
    }

    #[test]
    fn interim_responses_are_skipped() {
        let mut c = Http1Conn::new();
        feed(
            &mut c,
            true,
            b"PUT /u HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            0,
        );
        assert!(feed(&mut c, false, b"HTTP/1.1 100 Continue\r\n\r\n", 1).is_empty());
        feed(&mut c, true, b"z", 2);
        let out = feed(&mut c, false, b"HTTP/1.1 204 No Content\r\n\r\n", 3);
        assert!(matches!(&out[0], Message::ResponseHead(h) if h.status == 204));
        assert_eq!(
            out[1],
            Message::ResponseEnd {
                end_ns: 3,
                body_len: 0
            }
        );
    }

    #[test]
    fn uncaptured_body_bytes_are_counted() {
        let mut c = Http1Conn::new();
        feed(&mut c, true, b"GET / HTTP/1.1\r\n\r\n", 0);
        let mut out = Vec::new();
        // 4096 bytes captured of a 100000-byte write; the rest is body.
        let head_len = b"HTTP/1.1 200 OK\r\nContent-Length: 99959\r\n\r\n".len() as u64;
        let mut first = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            100_000 - head_len
        )
        .into_bytes();
        assert_eq!(first.len() as u64, head_len);
        first.resize(4096, b'x');
        c.feed(false, &first, 100_000 - 4096, 5, &mut out);
        assert_eq!(
            out[1],
            Message::ResponseEnd {
                end_ns: 5,
                body_len: 100_000 - head_len
            }
        );
    }

    #[test]
    fn lost_head_desyncs_then_recovers() {
        let mut c = Http1Conn::new();
        let mut out = Vec::new();
        c.feed(
            true,
            b"GET /big HTTP/1.1\r\nX-Long: aaaa",
            60_000,
            1,
            &mut out,
        );
        assert_eq!(out, vec![Message::Desync { requests: true }]);
        out.clear();
        c.feed(true, b"more header bytes\r\n\r\n", 0, 2, &mut out);
        assert!(out.is_empty(), "bytes of the lost message are skipped");
        c.feed(true, b"GET /next HTTP/1.1\r\n\r\n", 0, 3, &mut out);
        assert_eq!(req_head(&out[0]).target, "/next");
    }

    #[test]
    fn close_delimited_response() {
        let mut c = Http1Conn::new();
        feed(&mut c, true, b"GET / HTTP/1.0\r\n\r\n", 0);
        let out = feed(&mut c, false, b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nabc", 1);
        assert_eq!(out.len(), 1);
        feed(&mut c, false, b"defg", 2);
        let mut out = Vec::new();
        c.close(3, &mut out);
        assert_eq!(
            out,
            vec![Message::ResponseEnd {
                end_ns: 3,
                body_len: 7
            }]
        );
    }

    #[test]
    fn upgrade_stops_decoding() {
        let mut c = Http1Conn::new();
        feed(
            &mut c,
            true,
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            0,
        );
        assert_eq!(
            feed(
                &mut c,
                false,
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x05hello",
                1
            ),
            vec![Message::Upgraded]
        );
        assert!(feed(&mut c, false, b"HTTP/1.1 200 OK\r\n\r\n", 2).is_empty());
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let cases: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
            b"GET\x00 / HTTP/1.1\r\n\r\n",
            b"\xff\xfe\xfd garbage",
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        ];
        for case in cases {
            let mut c = Http1Conn::new();
            let out = feed(&mut c, true, case, 0);
            assert!(
                out.contains(&Message::Desync { requests: true }),
                "{:?}: {out:?}",
                String::from_utf8_lossy(case)
            );
        }
        // A head that never ends is bounded.
        let mut c = Http1Conn::new();
        let mut out = feed(&mut c, true, b"GET / HTTP/1.1\r\n", 0);
        for _ in 0..20 {
            out.extend(feed(&mut c, true, &[b'a'; 4096], 0));
        }
        assert!(out.contains(&Message::Desync { requests: true }));
    }
}
