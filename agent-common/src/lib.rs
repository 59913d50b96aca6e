//! Layouts shared by the kernel programs (`kspan-ebpf`) and the userspace agent.
//!
//! Everything here is `#[repr(C)]` and plain data: the kernel writes these bytes into maps and
//! the ring buffer, userspace reads them back. Field order is chosen so no implicit padding
//! exists (explicit `_pad` fields), which keeps the layout identical on both sides.
#![cfg_attr(not(any(feature = "user", test)), no_std)]

/// Hard upper bound on payload bytes copied per syscall (the 2x scratch record must fit the
/// kernel's 32 KiB per-CPU value limit). The runtime cap
/// ([`Config::payload_cap`]) may only lower it.
pub const MAX_PAYLOAD: usize = 8192;
/// Default runtime cap on payload bytes copied per syscall.
pub const DEFAULT_PAYLOAD_CAP: u32 = 4096;
/// iovec segments walked for readv/writev/recvmsg/sendmsg. gRPC's C core, for one, writes a
/// frame per segment, so a handful is not enough to reach the first header block.
pub const MAX_IOV: usize = 64;

/// The syscalls the kernel programs handle, by their kernel names (the function behind each is
/// `__x64_sys_<name>` on x86_64). Where the kernel allows fexit, one program is attached to each:
/// `fexit_<name>`, or `fexit_<name>_bounded` where `bpf_loop` is missing. The `dup` family
/// rebinds an fd number (dup2 and dup3 close what it held without a close()).
pub const SOCKET_SYSCALLS: [&str; 16] = [
    "read",
    "write",
    "readv",
    "writev",
    "recvfrom",
    "sendto",
    "recvmsg",
    "sendmsg",
    "sendfile64",
    "accept",
    "accept4",
    "connect",
    "close",
    "dup",
    "dup2",
    "dup3",
];

pub mod role {
    /// The socket came from accept(): we are the server on it.
    pub const SERVER: u8 = 1;
    /// The socket was connect()ed: we are the client on it.
    pub const CLIENT: u8 = 2;
}

pub mod sniff;

/// A connection's protocol as the kernel recognised it ([`sniff::sniff`]).
pub mod proto {
    /// No payload seen yet.
    pub const UNKNOWN: u8 = 0;
    pub const HTTP1: u8 = 1;
    pub const HTTP2: u8 = 2;
    /// First payload was no protocol kspan decodes: the kernel ignores this connection from
    /// then on.
    pub const OTHER: u8 = 3;
    /// Userspace excluded this connection (filters, or a data-store server's side).
    pub const IGNORED: u8 = 4;
    pub const REDIS: u8 = 5;
    pub const POSTGRES: u8 = 6;
    pub const MYSQL: u8 = 7;
    /// TLS records: the kernel never passes the ciphertext on. The plaintext, read at the TLS
    /// library (uprobes), is recognised on its own ([`super::ConnInfo::inner`]).
    pub const TLS: u8 = 8;
}

pub mod direction {
    /// Bytes the traced process received (read, recv*).
    pub const INGRESS: u8 = 0;
    /// Bytes the traced process sent (write, send*, sendfile).
    pub const EGRESS: u8 = 1;
}

pub mod kind {
    pub const DATA: u32 = 1;
    /// The socket was released (its last fd closed and TCP done with it), not one fd closed.
    pub const CLOSE: u32 = 2;
    /// A process exec'ed (`tgid` is it): the TLS library it loads may be new to the agent.
    pub const EXEC: u32 = 3;
    /// A Go goroutine was created ([`GoRecord`]: `goroutine` the new one, `related` its
    /// creator).
    pub const GO_SPAWN: u32 = 4;
    /// A goroutine hands a request to an HTTP/1 client connection (`related`: net/http's
    /// `*persistConn`), whose own writer goroutine will send it.
    pub const GO_CALL: u32 = 5;
    /// A goroutine starts writing for an HTTP/1 client connection (`related`: `*persistConn`).
    pub const GO_WRITER: u32 = 6;
}

/// Record of the Go runtime probes (kinds `GO_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoRecord {
    pub kind: u32,
    pub tgid: u32,
    pub ts_ns: u64,
    /// The goroutine's `g` address (unique among live goroutines of the process).
    pub goroutine: u64,
    pub related: u64,
}

pub mod event_flags {
    /// Bytes were sent but not copied (sendfile): only the count is known.
    pub const NO_PAYLOAD: u8 = 1;
    /// Earlier events of this connection were lost (ring buffer full): the stream has a gap.
    pub const GAP: u8 = 2;
    /// The payload is a sequence of chunks (HTTP/2 frame walk), not a plain prefix: each chunk
    /// is a [`super::H2_CHUNK_HEADER`]-byte header `[u32 copied][u32 skipped]` (little-endian)
    /// followed by `copied` bytes, which the syscall's stream continues past with `skipped`
    /// bytes that were not copied. `total_len` is the bytes the record describes.
    pub const FRAMED: u8 = 4;
    /// A framed record whose first byte starts an HTTP/2 frame header: where userspace can
    /// resume framing after lost records.
    pub const FRAME_START: u8 = 8;
    /// A plain payload larger than the copy cap whose last [`super::TAIL_LEN`] bytes are the
    /// syscall's last bytes, not the prefix's: a reply's end (PostgreSQL's ReadyForQuery,
    /// MySQL's closing OK) shows even when its middle is skipped.
    pub const TAIL: u8 = 16;
    /// Plaintext read at a TLS library's boundary (`SSL_read`/`SSL_write`), not at the socket.
    /// With [`NO_PAYLOAD`] and protocol `TLS`: the notice that a connection speaks TLS.
    pub const TLS: u8 = 32;
}

/// Bytes at the end of a large plain payload copied from the syscall's end
/// ([`event_flags::TAIL`]).
pub const TAIL_LEN: usize = 64;

/// Size of a chunk header in a [`event_flags::FRAMED`] payload.
pub const H2_CHUNK_HEADER: usize = 8;

/// Payloads a discovered socket may show before the kernel decides it is not HTTP.
pub const DISCOVERY_SNIFFS: u8 = 8;

/// Indexes into the per-CPU `STATS` array.
pub mod stat {
    /// Events written to the ring buffer.
    pub const EVENTS: u32 = 0;
    /// Events lost because the ring buffer was full.
    pub const LOST_RINGBUF: u32 = 1;
    /// Syscalls whose payload exceeded the copy cap (the byte count is still exact).
    pub const TRUNCATED: u32 = 2;
    /// Connections inserted into the tracking table.
    pub const CONNS_TRACKED: u32 = 3;
    /// Connections dropped in kernel because their first bytes were not HTTP.
    pub const CONNS_NOT_HTTP: u32 = 4;
    /// Payload copies from user memory that faulted.
    pub const READ_FAULTS: u32 = 5;
    /// Connection table inserts that failed.
    pub const CONN_INSERT_FAILED: u32 = 6;
    /// Sockets found already open (opened before the agent started) and now tracked.
    pub const CONNS_DISCOVERED: u32 = 7;
    /// TLS library calls whose connection could not be told (no socket syscall inside the
    /// call, and the session never seen on one): their plaintext was dropped.
    pub const TLS_UNBOUND: u32 = 8;
    /// TLS library calls that found their per-thread slot taken or the table full.
    pub const TLS_CALLS_DROPPED: u32 = 9;
    pub const COUNT: u32 = 10;
}

/// One fd number in one process: the key of the table of fds known not to be TCP sockets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub tgid: u32,
    pub fd: u32,
}

/// Addresses of a TCP socket as the kernel sees them, read once when the socket is opened.
/// Ports are in host byte order. IPv4 addresses occupy the first 4 bytes of the arrays.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tuple {
    /// AF_INET (2) or AF_INET6 (10); 0 when the kernel offsets were unavailable.
    pub family: u16,
    pub local_port: u16,
    pub peer_port: u16,
    pub _pad: u16,
    pub local_addr: [u8; 16],
    pub peer_addr: [u8; 16],
    /// Inode of the socket's network namespace: loopback addresses are only unique within one.
    pub netns: u32,
    pub _pad2: u32,
}

/// Value of the connection table, whose key is the socket itself (its `struct sock` address):
/// every fd and every process holding the socket share the entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnInfo {
    /// Kernel time the socket was first seen: with the socket's address it tells a socket
    /// apart from a later one allocated at the same address.
    pub generation: u64,
    pub tuple: Tuple,
    /// `role::SERVER`, `role::CLIENT`, or 0 for a socket discovered mid-life (opened before
    /// the agent started): userspace infers the role from the first message it sees.
    pub role: u8,
    pub proto: u8,
    /// Set by the kernel when an event of this connection could not be output.
    pub gap_pending: u8,
    /// Non-zero for sockets discovered mid-life: their first bytes may sit mid-message.
    pub discovered: u8,
    /// Discovered sockets get a few payloads to show an HTTP message start before the kernel
    /// gives up on them.
    pub sniff_left: u8,
    /// For a `proto::TLS` connection: the protocol its plaintext speaks, recognised at the TLS
    /// library's boundary (`proto::UNKNOWN` until then). Records of that plaintext carry it as
    /// their protocol.
    pub inner: u8,
    pub _pad: [u8; 2],
    /// The opening thread's `comm`: names the process even when it exits before userspace
    /// can read its /proc entry (short-lived clients such as curl).
    pub comm: [u8; 16],
    /// The process that accepted, connected or first used the socket, and its parent: who a
    /// forked child that served the socket and exited before /proc was read belongs to.
    pub opener_tgid: u32,
    pub opener_parent_tgid: u32,
}

/// Fixed head of every ring-buffer record; `DATA` records are followed by `captured_len`
/// payload bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventHeader {
    pub kind: u32,
    /// The process and thread that made the syscall (0 for `CLOSE`, which the kernel may
    /// report from softirq context).
    pub tgid: u32,
    pub tid: u32,
    pub fd: u32,
    /// The socket's `struct sock` address: with `conn.generation`, the connection's identity.
    pub sock: u64,
    /// CLOCK_MONOTONIC nanoseconds at syscall exit.
    pub ts_ns: u64,
    pub conn: ConnInfo,
    /// Bytes the syscall actually transferred (its return value).
    pub total_len: u64,
    pub captured_len: u32,
    pub direction: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
    /// The register Go keeps the running goroutine in (r14 on amd64, x28 on arm64) when the
    /// syscall was made: the goroutine's `g` in a Go process, meaningless elsewhere.
    pub goroutine: u64,
}

/// Scratch layout used by the kernel to assemble a record before output.
#[repr(C)]
pub struct DataEvent {
    pub header: EventHeader,
    /// Twice the maximum so bounded-offset writes of vectored I/O always stay in range for the
    /// verifier; only the first `MAX_PAYLOAD` bytes are ever submitted.
    pub payload: [u8; MAX_PAYLOAD * 2],
}

/// Byte offsets of kernel struct fields, resolved from the running kernel's BTF by userspace
/// and written into the program as a read-only global before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_fd: u32,
    pub fdt_max_fds: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    pub skc_family: u32,
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_net: u32,
    pub net_ns_inum: u32,
    pub socket_type: u32,
    /// `socket.file`: a socket points back at its file, which tells a socket's file from
    /// any other without reading its inode.
    pub socket_file: u32,
    pub task_real_parent: u32,
    pub task_tgid: u32,
    /// Non-zero once userspace has filled the struct; the kernel skips address reads otherwise.
    pub valid: u32,
}

/// Runtime settings written into the program as read-only globals before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The agent's own tgid: it never traces itself.
    pub self_tgid: u32,
    /// Payload bytes copied per syscall, at most [`MAX_PAYLOAD`].
    pub payload_cap: u32,
    /// Wake the reader only once this many bytes wait in the ring buffer; below it the reader
    /// polls on a timer. Waking it per event costs more than everything else the agent does.
    pub wakeup_bytes: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are #[repr(C)], Copy, and made of integers and byte arrays with explicit
    // padding, so every bit pattern is valid.
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::ConnInfo {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::Config {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Tuple>(), 2 * 4 + 32 + 8);
        assert_eq!(size_of::<ConnInfo>(), 8 + size_of::<Tuple>() + 8 + 16 + 8);
        assert_eq!(size_of::<EventHeader>(), 32 + size_of::<ConnInfo>() + 24);
        assert_eq!(size_of::<EventHeader>() % 8, 0);
        assert_eq!(size_of::<GoRecord>(), 32);
    }
}
