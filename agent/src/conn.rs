//! Per-connection state: which side we are, the HTTP decoder, and the exchanges in flight.
use std::{collections::VecDeque, sync::Arc};

use crate::{
    capture::event::{Direction, Endpoints, Role},
    process::ProcessInfo,
    protocol::http1::Http1Conn,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// Recognised but not decoded by this version (HTTP/2 prior knowledge); counted, skipped.
    Unsupported,
}

pub struct Conn {
    pub role: Role,
    pub endpoints: Option<Endpoints>,
    pub process: Arc<ProcessInfo>,
    pub protocol: Protocol,
    pub http: Http1Conn,
    /// Span ids of requests awaiting their response, oldest first (`None`: not traced).
    pub in_flight: VecDeque<Option<u64>>,
    /// Requests seen so far on this connection.
    pub requests: u64,
    pub last_seen_ns: u64,
}

impl Conn {
    pub fn new(
        role: Role,
        endpoints: Option<Endpoints>,
        process: Arc<ProcessInfo>,
        ts_ns: u64,
    ) -> Self {
        Self {
            role,
            endpoints,
            process,
            protocol: Protocol::Http1,
            http: Http1Conn::new(),
            in_flight: VecDeque::new(),
            requests: 0,
            last_seen_ns: ts_ns,
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
