//! Plaintext at the TLS library's boundary: uprobes on OpenSSL's (and BoringSSL's, which
//! exports the same names) `SSL_read`, `SSL_write` and their `_ex` forms, or on the internal
//! function they share (userspace chooses: `agent/src/tls/placement.rs`).
//!
//! The entry probe stashes the call's arguments by thread; the return probe reads how many
//! bytes moved and copies them from the caller's buffer, through the same capture path as
//! socket bytes. Which connection a call belongs to comes from the socket syscall the library
//! makes inside the call on the same thread (the `sys_exit` hook sees the ciphertext and
//! records its socket in the stash), and is remembered per session (`SSL *`) for calls that
//! make none: a read served from an already-decrypted record, or a runtime that moves the
//! ciphertext itself through a memory BIO (Node.js), where the session is bound to the last
//! TLS socket its thread moved ciphertext on (see `TLS_LAST`).
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, LruHashMap},
    programs::{ProbeContext, RetProbeContext},
};
use kspan_common::{direction, proto, stat};

use crate::{CONNS, Origin, bump, capture, h2};

/// One TLS call in progress on a thread.
#[repr(C)]
#[derive(Clone, Copy)]
struct Call {
    ssl: u64,
    buf: u64,
    /// `size_t *` that receives the byte count (`_ex` forms); 0 when the return value is it.
    count: u64,
    /// The socket the call moved ciphertext on (0 until it does), and through which fd.
    sock: u64,
    fd: u32,
    dir: u8,
    _pad: [u8; 3],
}

/// A session in one process: `SSL *` values are only unique within an address space.
#[repr(C)]
#[derive(Clone, Copy)]
struct Session {
    tgid: u32,
    _pad: u32,
    ssl: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Bound {
    sock: u64,
    fd: u32,
    _pad: u32,
}

/// Calls in progress, by thread (`pid_tgid`). A thread is in at most one TLS call at a time;
/// entries leave at the call's return.
#[map]
static TLS_CALLS: HashMap<u64, Call> = HashMap::with_max_entries(16_384, 0);

/// The socket each session was last seen on. LRU: sessions freed without `SSL_free` (a
/// process killed) age out.
#[map]
static TLS_SESSIONS: LruHashMap<Session, Bound> = LruHashMap::with_max_entries(65_536, 0);

/// The TLS socket each thread last moved ciphertext on outside a TLS call. A memory-BIO
/// runtime (Node.js) reads a socket's ciphertext, then decrypts it with `SSL_read`: that
/// binds the session for good. Before its first read, a session's `SSL_write` is taken to be
/// for the socket the thread last touched (its handshake's), without binding it.
#[map]
static TLS_LAST: LruHashMap<u64, Bound> = LruHashMap::with_max_entries(16_384, 0);

#[inline(always)]
fn begin(ssl: u64, buf: u64, count: u64, dir: u8) {
    let call = Call {
        ssl,
        buf,
        count,
        sock: 0,
        fd: 0,
        dir,
        _pad: [0; 3],
    };
    if TLS_CALLS
        .insert(&bpf_get_current_pid_tgid(), &call, 0)
        .is_err()
    {
        bump(stat::TLS_CALLS_DROPPED);
    }
}

#[uprobe]
pub fn kspan_ssl_read(ctx: ProbeContext) -> u32 {
    begin(arg(&ctx, 0), arg(&ctx, 1), 0, direction::INGRESS);
    0
}

#[uprobe]
pub fn kspan_ssl_read_ex(ctx: ProbeContext) -> u32 {
    begin(arg(&ctx, 0), arg(&ctx, 1), arg(&ctx, 3), direction::INGRESS);
    0
}

#[uprobe]
pub fn kspan_ssl_write(ctx: ProbeContext) -> u32 {
    begin(arg(&ctx, 0), arg(&ctx, 1), 0, direction::EGRESS);
    0
}

#[uprobe]
pub fn kspan_ssl_write_ex(ctx: ProbeContext) -> u32 {
    begin(arg(&ctx, 0), arg(&ctx, 1), arg(&ctx, 3), direction::EGRESS);
    0
}

/// OpenSSL ≥ 3.3's `ssl_write_internal`, which takes a flags argument before the count
/// pointer.
#[uprobe]
pub fn kspan_ssl_write_ex2(ctx: ProbeContext) -> u32 {
    begin(arg(&ctx, 0), arg(&ctx, 1), arg(&ctx, 4), direction::EGRESS);
    0
}

/// `SSL_free`: the session's binding goes with it (its address will be reused).
#[uprobe]
pub fn kspan_ssl_free(ctx: ProbeContext) -> u32 {
    let session = Session {
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
        ssl: arg(&ctx, 0),
    };
    let _ = TLS_SESSIONS.remove(&session);
    0
}

#[uretprobe]
pub fn kspan_ssl_ret(ctx: RetProbeContext) -> u32 {
    on_return::<true>(ctx.ret::<i64>() as i32);
    0
}

#[uretprobe]
pub fn kspan_ssl_ret_bounded(ctx: RetProbeContext) -> u32 {
    on_return::<false>(ctx.ret::<i64>() as i32);
    0
}

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg(n).unwrap_or(0)
}

/// Whether the current thread is inside a TLS library call.
#[inline(always)]
pub fn in_call() -> bool {
    TLS_CALLS.get_ptr(&bpf_get_current_pid_tgid()).is_some()
}

/// Ciphertext moved on TLS socket `sock` through `fd`: inside a TLS call it names the call's
/// connection; outside, it is where the thread's next memory-BIO read comes from.
#[inline(always)]
pub fn ciphertext(sock: u64, fd: u32) {
    let id = bpf_get_current_pid_tgid();
    if let Some(call) = TLS_CALLS.get_ptr_mut(&id) {
        // SAFETY: pointer from a successful lookup, used within this program run.
        let call = unsafe { &mut *call };
        if call.sock == 0 {
            call.sock = sock;
            call.fd = fd;
        }
    } else {
        let bound = Bound { sock, fd, _pad: 0 };
        let _ = TLS_LAST.insert(&id, &bound, 0);
    }
}

#[inline(always)]
/// `ret` is the call's `int` result: the register's upper half is not part of it.
fn on_return<const BPF_LOOP: bool>(ret: i32) {
    let id = bpf_get_current_pid_tgid();
    let Some(call) = TLS_CALLS.get_ptr(&id) else {
        return;
    };
    // SAFETY: pointer from a successful lookup, copied before the entry is removed.
    let call = unsafe { *call };
    let _ = TLS_CALLS.remove(&id);
    let total = if call.count != 0 {
        // SAFETY: user pointer read through the fault-tolerant helper.
        match (ret, unsafe {
            bpf_probe_read_user(call.count as *const u64)
        }) {
            (1, Ok(n)) => n,
            _ => return,
        }
    } else if ret > 0 {
        ret as u64
    } else {
        return;
    };
    let Some(bound) = bind(&call, id) else {
        bump(stat::TLS_UNBOUND);
        return;
    };
    let Some(info) = CONNS.get_ptr_mut(&bound.sock) else {
        bump(stat::TLS_UNBOUND);
        return;
    };
    // SAFETY: pointer from a successful lookup; the LRU map keeps it valid for this program run.
    let info = unsafe { &mut *info };
    // A binding outlived its socket (the address now holds another), or userspace excluded it.
    if info.proto != proto::TLS || info.inner == proto::OTHER || info.inner == proto::IGNORED {
        return;
    }
    let at = Origin {
        sock: bound.sock,
        fd: bound.fd,
        tid: id as u32,
        tls: true,
        goroutine: 0,
    };
    capture::<BPF_LOOP>(info, &at, total, call.dir, h2::Source::flat(call.buf));
}

/// The connection of a returning call, remembered for the session's later calls.
#[inline(always)]
fn bind(call: &Call, id: u64) -> Option<Bound> {
    let session = Session {
        tgid: (id >> 32) as u32,
        _pad: 0,
        ssl: call.ssl,
    };
    if call.sock != 0 {
        let bound = Bound {
            sock: call.sock,
            fd: call.fd,
            _pad: 0,
        };
        let _ = TLS_SESSIONS.insert(&session, &bound, 0);
        return Some(bound);
    }
    if let Some(bound) = TLS_SESSIONS.get_ptr(&session) {
        // SAFETY: pointer from a successful lookup, copied at once.
        return Some(unsafe { *bound });
    }
    // SAFETY: pointer from a successful lookup, copied at once.
    let bound = unsafe { *TLS_LAST.get_ptr(&id)? };
    if call.dir == direction::INGRESS {
        let _ = TLS_SESSIONS.insert(&session, &bound, 0);
    }
    Some(bound)
}
