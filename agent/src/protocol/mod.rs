//! Application protocols, decoded from connection byte streams. Nothing here knows about BPF.
//!
//! Every protocol has the same shape: a [`Decoder`] turns the two byte streams of one
//! connection into [`Step`]s (an exchange began, got its outcome, ended), and the pipeline,
//! linker, metrics and exporters treat every exchange alike. Adding a protocol is one module
//! here, one entry in [`registry`], and one sniff in `kspan_common::sniff` that the kernel and
//! userspace share.
pub mod hpack;
pub mod http1;
pub mod http2;
pub mod mysql;
pub mod postgres;
pub mod redis;
pub mod registry;
pub mod sql;
#[cfg(test)]
pub mod testing;

use std::sync::Arc;

use crate::{
    capture::event::{Direction, Role},
    pipeline::PipelineStats,
};

/// Decimal digits and nothing else (no sign, no space) as a number; `None` when empty or
/// beyond `u64::MAX`. Read from the bytes, without first checking they are UTF-8.
pub fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit()
            .then_some(())
            .and_then(|()| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
    })
}

/// Requests awaiting their replies on one connection. Beyond it (a client streaming commands
/// whose replies were lost, say) the connection's exchanges are abandoned, counted, and
/// decoding resynchronises: memory stays bounded.
pub const MAX_IN_FLIGHT: usize = 4096;

/// One data event of a connection, as a decoder sees it.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    pub direction: Direction,
    /// The bytes flow client → server, by the connection's role as known so far.
    pub requests: bool,
    pub payload: &'a [u8],
    /// Bytes the syscall moved; `payload` may hold fewer (see `capture::event::pieces`).
    pub total_len: u64,
    /// `payload` is chunked by the kernel's HTTP/2 frame walk.
    pub framed: bool,
    pub frame_start: bool,
    /// Events of this connection were lost just before this one.
    pub gap: bool,
    /// The payload ends with the syscall's last bytes (see `capture::event::pieces`).
    pub tail: bool,
    pub ts_ns: u64,
}

impl<'a> Segment<'a> {
    /// A plain payload followed by `missing` bytes that were not copied, on a connection
    /// whose process is the client (requests are its writes): what decoder tests and fuzz
    /// targets feed.
    pub fn plain(requests: bool, payload: &'a [u8], missing: u64, ts_ns: u64) -> Self {
        Self {
            direction: if requests {
                Direction::Egress
            } else {
                Direction::Ingress
            },
            requests,
            payload,
            total_len: payload.len() as u64 + missing,
            framed: false,
            frame_start: false,
            gap: false,
            tail: false,
            ts_ns,
        }
    }

    /// The payload as runs of copied bytes, each followed by the count of bytes not copied.
    pub fn pieces(&self) -> crate::capture::event::Pieces<'a> {
        crate::capture::event::pieces(self.payload, self.framed, self.tail, self.total_len)
    }
}

/// What a request asked, as far as spans need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Http(http1::RequestHead),
    Db(DbCall),
}

/// A data-store command or query. Text is kept as sent; sanitising is the span's job.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DbCall {
    /// `db.system.name`: "redis", "postgresql", "mysql".
    pub system: &'static str,
    /// `db.operation.name` as the protocol names it (a Redis command); `None` when it comes
    /// from the query text.
    pub operation: Option<Arc<str>>,
    /// The statement (SQL text, or the Redis command with its arguments); a prepared
    /// statement's calls share their text.
    pub text: Arc<str>,
    /// `db.namespace` (database, or Redis database index) when known; shared by the
    /// connection's calls.
    pub namespace: Option<Arc<str>>,
    /// Commands sent as one batch (a Redis pipeline's share is 1 per span).
    pub batch: u32,
    pub start_ns: u64,
}

/// How an exchange came out, as its protocol states it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    HttpStatus(u16),
    GrpcStatus(i64),
    /// A data-store error: its code (SQLSTATE, MySQL error number, Redis error prefix) and
    /// message.
    DbError {
        code: String,
        message: String,
    },
}

/// What decoding one segment found. `id` is the decoder's own name for an exchange; both ends
/// of a connection seen from its start give the same exchange the same id (request order,
/// HTTP/2 stream id), which is how the linker pairs a CLIENT span with its SERVER span.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Begin {
        id: u64,
        call: Call,
        partial: bool,
    },
    /// The request (body included) is complete.
    RequestDone {
        id: u64,
        body: u64,
    },
    Outcome {
        id: u64,
        outcome: Outcome,
    },
    /// Part of the exchange could not be decoded; the span says so instead of guessing.
    Partial {
        id: u64,
    },
    /// `error` when it ended without a complete response.
    End {
        id: u64,
        end_ns: u64,
        body: u64,
        error: Option<String>,
    },
    /// This exchange's outcome can never be known (counted).
    Abandon {
        id: u64,
    },
    /// Requests and responses can no longer be paired: every exchange in flight is abandoned.
    AbandonAll,
    /// The decoder learnt which side of the connection the process is on.
    Role(Role),
    /// Nothing more can be decoded (an upgrade, framing lost for good). `ignore`: the kernel
    /// may stop reporting the connection.
    GiveUp {
        ignore: bool,
    },
}

/// Where a decoder puts what it found.
pub struct Out<'a> {
    pub steps: &'a mut Vec<Step>,
    pub stats: &'a mut PipelineStats,
}

impl Out<'_> {
    pub fn push(&mut self, step: Step) {
        self.steps.push(step);
    }
}

/// One connection's decoder, both directions.
pub trait Decoder: Send {
    fn feed(&mut self, seg: &Segment<'_>, out: &mut Out<'_>);
    /// The socket is gone: finish what its close delimits; what is still open is then ended
    /// as unanswered by the pipeline.
    fn close(&mut self, ts_ns: u64, out: &mut Out<'_>);
}

#[cfg(test)]
mod tests {
    use super::decimal;

    #[test]
    fn decimals_are_digits_only() {
        assert_eq!(decimal(b"0"), Some(0));
        assert_eq!(decimal(b"615"), Some(615));
        assert_eq!(decimal(b"008080"), Some(8080));
        assert_eq!(decimal(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"+5",
            b"-5",
            b"5 5",
            b"0x10",
            b"18446744073709551616",
        ] {
            assert_eq!(decimal(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
