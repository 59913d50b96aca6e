//! Per-connection state: which side we are, the protocol decoder, and the exchanges in flight.
use std::sync::Arc;

use rustc_hash::FxHashMap as HashMap;

use crate::{
    capture::event::{Direction, Endpoints, Role},
    process::ProcessInfo,
    protocol::Decoder,
};

pub struct Conn {
    pub role: Role,
    pub endpoints: Option<Endpoints>,
    /// The process that moved the connection's latest bytes: a socket can be served by
    /// another process than the one that accepted it (a forked child, an inetd-style server).
    pub tgid: u32,
    pub process: Arc<ProcessInfo>,
    /// `None` once nothing more can be decoded (upgraded, framing lost for good).
    pub decoder: Option<Box<dyn Decoder>>,
    /// Span of each exchange in flight, by the decoder's exchange id (`None`: not traced).
    pub open: HashMap<u64, Option<u64>>,
    /// Exchange ids pair with the other end's: false for a connection opened before the agent
    /// started (exchanges before the first one seen are unknown), and for one whose other end
    /// is not decoded (a data store's server side).
    pub pairs: bool,
    pub last_seen_ns: u64,
}

impl Conn {
    pub fn new(
        role: Role,
        endpoints: Option<Endpoints>,
        tgid: u32,
        process: Arc<ProcessInfo>,
        decoder: Box<dyn Decoder>,
        ts_ns: u64,
    ) -> Self {
        Self {
            role,
            endpoints,
            tgid,
            process,
            decoder: Some(decoder),
            open: HashMap::default(),
            pairs: false,
            last_seen_ns: ts_ns,
        }
    }
}

/// Whether bytes moving in `dir` are requests (as opposed to responses) for a process on the
/// `role` side.
pub fn carries_requests(role: Role, dir: Direction) -> bool {
    matches!(
        (role, dir),
        (Role::Server, Direction::Ingress) | (Role::Client, Direction::Egress)
    )
}
