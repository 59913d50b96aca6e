//! Which decoder a connection gets, from the first bytes it carries.
use super::{Decoder, http1, http2};
use crate::{
    capture::event::{Direction, Role},
    conn::carries_requests,
    pipeline::PipelineStats,
};

/// A connection's side and decoder, once its first bytes show them.
pub struct Joined {
    /// `Role::Unknown` only for a decoder that learns the side itself (a late-joined HTTP/2
    /// connection).
    pub role: Role,
    pub decoder: Box<dyn Decoder>,
}

/// The decoder for a connection whose first data event moved `first` in `dir`; `None` when
/// decoding cannot start at this event (a socket found mid-life, mid-message).
/// `captured`: request headers to keep beyond those spans need.
pub fn join(
    role: Role,
    dir: Direction,
    first: &[u8],
    captured: &'static [&'static str],
    stats: &mut PipelineStats,
) -> Option<Joined> {
    let role = match role {
        Role::Unknown => match infer_http_role(dir, first) {
            Some(role) => role,
            // A socket found mid-life joins HTTP/2 at a frame boundary; its side is learnt
            // from the first request.
            None if http2::frame_start(first) => {
                stats.h2_joined_late += 1;
                let decoder = Box::new(http2::exchanges::Exchanges::new(true, captured));
                return Some(Joined { role, decoder });
            }
            None => return None,
        },
        role => role,
    };
    let decoder: Box<dyn Decoder> = if http2::starts_connection(first, carries_requests(role, dir))
    {
        Box::new(http2::exchanges::Exchanges::new(false, captured))
    } else {
        Box::new(http1::exchanges::Exchanges::new(captured))
    };
    Some(Joined { role, decoder })
}

/// Which side a socket found mid-life is on, from an HTTP/1 message start.
fn infer_http_role(dir: Direction, payload: &[u8]) -> Option<Role> {
    let request = http1::starts_message(payload, true);
    let response = http1::starts_message(payload, false);
    match (request, response, dir) {
        (true, _, Direction::Egress) | (_, true, Direction::Ingress) => Some(Role::Client),
        (true, _, Direction::Ingress) | (_, true, Direction::Egress) => Some(Role::Server),
        _ => None,
    }
}
