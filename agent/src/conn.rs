//! Per-connection state: which side we are, the HTTP decoder, and the exchanges in flight.
use std::{collections::VecDeque, sync::Arc};

use crate::{
    capture::event::{Direction, Endpoints, Role},
    process::ProcessInfo,
    protocol::{http1::Http1Conn, http2::Http2Conn},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// No longer decodable (upgraded to another protocol, or HTTP/2 framing lost); skipped.
    Unsupported,
}

/// HTTP/2 state: the frame decoder and the streams in flight.
pub struct H2 {
    pub frames: Http2Conn,
    pub streams: rustc_hash::FxHashMap<u32, H2Stream>,
    /// For a connection joined mid-way the process's side is unknown at first: both
    /// directions are decoded with egress standing in for "client", and this records whether
    /// that must be flipped once a request header block shows which side asks (`None` until).
    pub flip: Option<bool>,
}

impl H2 {
    pub fn new(joined_late: bool) -> Self {
        Self {
            frames: Http2Conn::new(joined_late),
            streams: Default::default(),
            flip: (!joined_late).then_some(false),
        }
    }
}

#[derive(Default)]
pub struct H2Stream {
    /// `None` when the request was not traced (span table full).
    pub span: Option<u64>,
    pub status_seen: bool,
    pub request_body: u64,
    pub response_body: u64,
}

pub struct Conn {
    pub role: Role,
    pub endpoints: Option<Endpoints>,
    /// The process that moved the connection's latest bytes: a socket can be served by
    /// another process than the one that accepted it (a forked child, an inetd-style server).
    pub tgid: u32,
    pub process: Arc<ProcessInfo>,
    pub protocol: Protocol,
    pub http: Http1Conn,
    /// Set once the connection shows the HTTP/2 preface.
    pub h2: Option<Box<H2>>,
    /// Span ids of requests awaiting their response, oldest first (`None`: not traced).
    pub in_flight: VecDeque<Option<u64>>,
    /// Requests seen so far on this connection.
    pub requests: u64,
    /// Opened before the agent started: requests before the first one seen are unknown, so
    /// request order cannot pair it with its other end.
    pub discovered: bool,
    pub last_seen_ns: u64,
}

impl Conn {
    /// `captured`: request headers to keep beyond those spans need (configured capture list).
    pub fn new(
        role: Role,
        endpoints: Option<Endpoints>,
        tgid: u32,
        process: Arc<ProcessInfo>,
        ts_ns: u64,
        captured: &'static [&'static str],
    ) -> Self {
        Self {
            role,
            endpoints,
            tgid,
            process,
            protocol: Protocol::Http1,
            http: Http1Conn::with_captured(captured),
            h2: None,
            in_flight: VecDeque::new(),
            requests: 0,
            discovered: false,
            last_seen_ns: ts_ns,
        }
    }

    /// Which side a socket found mid-life is on, from the first message it carries.
    pub fn infer_role(dir: Direction, payload: &[u8]) -> Option<Role> {
        let request = crate::protocol::http1::starts_message(payload, true);
        let response = crate::protocol::http1::starts_message(payload, false);
        match (request, response, dir) {
            (true, _, Direction::Egress) | (_, true, Direction::Ingress) => Some(Role::Client),
            (true, _, Direction::Ingress) | (_, true, Direction::Egress) => Some(Role::Server),
            _ => None,
        }
    }

    /// Whether bytes moving in `dir` are requests (as opposed to responses).
    pub fn carries_requests(&self, dir: Direction) -> bool {
        matches!(
            (self.role, dir),
            (Role::Server, Direction::Ingress) | (Role::Client, Direction::Egress)
        )
    }
}
