//! Per-connection state: which side we are, the protocol decoder, and the exchanges in flight.
use std::sync::Arc;

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
    pub open: InFlight,
    /// Exchange ids pair with the other end's: false for a connection opened before the agent
    /// started (exchanges before the first one seen are unknown), and for one whose other end
    /// is not decoded (a data store's server side).
    pub pairs: bool,
    /// Its bytes are TLS plaintext read at the library (the socket carries ciphertext).
    pub tls: bool,
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
            open: InFlight::default(),
            pairs: false,
            tls: false,
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

/// Exchanges in flight on one connection: nearly always one or a few (a stream-multiplexing
/// connection rarely more than a hundred), so a short list beats a hash table, which cost the
/// HTTP/1 pipeline a tenth of its throughput.
#[derive(Default)]
pub struct InFlight(Vec<(u64, Option<u64>)>);

impl InFlight {
    pub fn get(&self, id: u64) -> Option<Option<u64>> {
        self.0.iter().find(|(i, _)| *i == id).map(|(_, s)| *s)
    }

    pub fn insert(&mut self, id: u64, span: Option<u64>) {
        match self.0.iter_mut().find(|(i, _)| *i == id) {
            Some(e) => e.1 = span,
            None => self.0.push((id, span)),
        }
    }

    pub fn remove(&mut self, id: u64) -> Option<Option<u64>> {
        let at = self.0.iter().position(|(i, _)| *i == id)?;
        Some(self.0.swap_remove(at).1)
    }

    /// Every traced span in flight, emptying the list.
    pub fn drain(&mut self) -> impl Iterator<Item = u64> + '_ {
        self.0.drain(..).filter_map(|(_, s)| s)
    }
}
