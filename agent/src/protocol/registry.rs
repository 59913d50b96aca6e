//! Which decoder a connection gets: the protocol the kernel recognised (or, for a payload too
//! short for the kernel to judge, the same sniff here), then the first bytes it carries.
use kspan_common::{
    proto, role as kernel_role,
    sniff::{SNIFF_LEN, sniff},
};

use super::{Decoder, http1, http2, mysql, postgres, redis};
use crate::{
    capture::event::{Direction, Role},
    conn::carries_requests,
    pipeline::PipelineStats,
};

/// What decoders are configured with.
#[derive(Clone, Copy, Debug, Default)]
pub struct Settings {
    /// Request headers to keep beyond those spans need.
    pub captured: &'static [&'static str],
    /// Keep literal values in data-store query text.
    pub keep_db_literals: bool,
    /// Decode the server side of data-store connections too (SERVER spans for redis-server,
    /// postgres, …). Off by default: the client's view is the one wanted, at half the cost.
    pub db_server_spans: bool,
}

/// How a connection's first data event is handled.
pub enum Join {
    Decode {
        /// `Role::Unknown` only for a decoder that learns the side itself (a late-joined
        /// HTTP/2 connection).
        role: Role,
        decoder: Box<dyn Decoder>,
        /// The other end of the connection is decoded too when this agent sees it (not a
        /// data store's server side unless `db_server_spans`): exchanges may pair with it.
        both_ends: bool,
    },
    /// Not decoded, by configuration (a data store's server side): the kernel may stop
    /// reporting it.
    Skip,
    /// Decoding cannot start at this event (a socket found mid-life, mid-message).
    Wait,
}

/// The first data event of a connection: `protocol` as the kernel recognised it, `first` the
/// first bytes it moved in `dir`, `joined_late` for a socket older than the agent.
pub fn join(
    protocol: u8,
    role: Role,
    dir: Direction,
    first: &[u8],
    joined_late: bool,
    settings: &Settings,
    stats: &mut PipelineStats,
) -> Join {
    let protocol = match protocol {
        proto::UNKNOWN => sniff_here(role, dir, first).unwrap_or(proto::HTTP1),
        p => p,
    };
    match protocol {
        // Commands come from the client, and the kernel only recognises commands.
        proto::REDIS => data_store(role, dir, Direction::Egress, settings, || {
            Box::new(redis::Exchanges::new(
                joined_late,
                settings.keep_db_literals,
            ))
        }),
        proto::POSTGRES => data_store(role, dir, Direction::Egress, settings, || {
            Box::new(postgres::Exchanges::new(joined_late))
        }),
        // The server speaks first (its greeting); on a socket found mid-life the kernel
        // recognised a client's command.
        proto::MYSQL => {
            let as_client = if first.get(4) == Some(&10) {
                Direction::Ingress
            } else {
                Direction::Egress
            };
            data_store(role, dir, as_client, settings, || {
                Box::new(mysql::Exchanges::new(joined_late))
            })
        }
        _ => join_http(role, dir, first, settings.captured, stats),
    }
}

/// A data-store connection: the client's side is decoded; the server's only when configured
/// (`db_server_spans`), and only then can both ends pair.
fn data_store(
    role: Role,
    dir: Direction,
    as_client: Direction,
    settings: &Settings,
    decoder: impl FnOnce() -> Box<dyn Decoder>,
) -> Join {
    let role = known_or(role, dir, as_client);
    if role == Role::Server && !settings.db_server_spans {
        return Join::Skip;
    }
    Join::Decode {
        role,
        decoder: decoder(),
        both_ends: settings.db_server_spans,
    }
}

/// The side of a socket found mid-life: the client's when its first bytes moved `as_client`.
fn known_or(role: Role, dir: Direction, as_client: Direction) -> Role {
    match role {
        Role::Unknown if dir == as_client => Role::Client,
        Role::Unknown => Role::Server,
        role => role,
    }
}

/// The kernel's sniff, for a first payload it passed on undecided.
fn sniff_here(role: Role, dir: Direction, first: &[u8]) -> Option<u8> {
    let mut head = [0u8; SNIFF_LEN];
    let n = first.len().min(SNIFF_LEN);
    head[..n].copy_from_slice(&first[..n]);
    let role = match role {
        Role::Client => kernel_role::CLIENT,
        Role::Server => kernel_role::SERVER,
        Role::Unknown => 0,
    };
    sniff(&head, first.len(), dir == Direction::Egress, role)
}

fn join_http(
    role: Role,
    dir: Direction,
    first: &[u8],
    captured: &'static [&'static str],
    stats: &mut PipelineStats,
) -> Join {
    let role = match role {
        Role::Unknown => match infer_http_role(dir, first) {
            Some(role) => role,
            // A socket found mid-life joins HTTP/2 at a frame boundary; its side is learnt
            // from the first request.
            None if http2::frame_start(first) => {
                stats.h2_joined_late += 1;
                let decoder = Box::new(http2::exchanges::Exchanges::new(true, captured));
                return Join::Decode {
                    role,
                    decoder,
                    both_ends: true,
                };
            }
            None => return Join::Wait,
        },
        role => role,
    };
    let decoder: Box<dyn Decoder> = if http2::starts_connection(first, carries_requests(role, dir))
    {
        Box::new(http2::exchanges::Exchanges::new(false, captured))
    } else {
        Box::new(http1::exchanges::Exchanges::new(captured))
    };
    Join::Decode {
        role,
        decoder,
        both_ends: true,
    }
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
