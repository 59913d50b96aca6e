//! kspan's kernel side: one body run at the exit of the socket syscalls.
//!
//! At syscall exit the saved registers still hold the syscall's arguments, and the return value
//! tells how many bytes moved, so one hook sees everything a pair of enter/exit hooks would, at
//! half the cost. Work is ordered cheapest-first: syscall number, then the connection table,
//! then payload copies only for connections that sniffed as HTTP.
//!
//! The body has three kinds of entry point, the cheapest the kernel allows chosen at start:
//! - `fexit` on each socket syscall (`__x64_sys_read`, …): only those syscalls run a program.
//! - `tp_btf` on `sys_exit`: every syscall of every process runs it; registers are plain loads
//!   the verifier checks against the kernel's BTF. For kernels that refuse fexit (this project's
//!   CI host answers EPERM).
//! - the raw `sys_exit` tracepoint: a helper call per register; for kernels that refuse both.
//!
//! Each entry point is built twice, with `bpf_loop` and with bounded loops (see `looping`).
//!
//! A connection is a socket, not an fd: the table is keyed by the `struct sock` behind the fd,
//! so a socket accepted by one process and served by a forked child, or dup'ed onto stdin and
//! stdout, is one connection. It ends when the kernel destroys the socket (`tcp_destroy_sock`),
//! which happens once every fd of every process is closed, exit included, and TCP is done.
//!
//! Every call chain's combined stack must stay under the verifier's 512 bytes on every kernel
//! of the matrix (older verifiers add up whole frames): large records are built in per-CPU
//! scratch maps, and globals are read field by field instead of copied whole.
#![no_std]
#![no_main]

mod arch;
mod go;
mod h2;
mod looping;
mod tls;

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_user,
        generated::bpf_probe_read_user as probe_read_user_raw,
    },
    macros::{btf_tracepoint, fexit, map, raw_tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, FExitContext, RawTracePointContext},
};
use kspan_common::{
    Config, ConnInfo, ConnKey, DISCOVERY_SNIFFS, DataEvent, EventHeader, KernelOffsets, MAX_IOV,
    MAX_PAYLOAD, TAIL_LEN, Tuple, direction, event_flags, kind, proto, role,
    sniff::{SNIFF_LEN, sniff},
    stat,
};

use arch::*;
use looping::{BOUNDED_IOV, repeat};

/// Filled by userspace before load (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    self_tgid: 0,
    payload_cap: kspan_common::DEFAULT_PAYLOAD_CAP,
    wakeup_bytes: 0,
    _pad: 0,
};

/// Filled by userspace before load from the running kernel's BTF.
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
    task_files: 0,
    files_fdt: 0,
    fdt_fd: 0,
    fdt_max_fds: 0,
    file_private_data: 0,
    socket_sk: 0,
    skc_family: 0,
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_dport: 0,
    skc_num: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_net: 0,
    net_ns_inum: 0,
    socket_type: 0,
    socket_file: 0,
    task_real_parent: 0,
    task_tgid: 0,
    valid: 0,
};

/// Tracked TCP sockets by `struct sock` address. Entries leave when the socket is destroyed;
/// LRU in case a destruction is ever missed.
#[map]
static CONNS: LruHashMap<u64, ConnInfo> = LruHashMap::with_max_entries(131_072, 0);

/// fds checked and found not to be TCP sockets, so each is walked once, not on every read.
/// Cleared whenever the fd number is (re)bound: close, accept, connect, dup*.
#[map]
static NOT_SOCKETS: LruHashMap<ConnKey, u8> = LruHashMap::with_max_entries(65_536, 0);

/// Size is overridden by userspace (`--ring-buffer-mb`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Per-CPU scratch record: too large for the 512-byte BPF stack.
#[map]
static SCRATCH: PerCpuArray<DataEvent> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU slot where a new connection's table entry is built: a `ConnInfo` on the stack
/// would push the deepest call chain past the verifier's limit.
#[map]
static NEW_CONN: PerCpuArray<ConnInfo> = PerCpuArray::with_max_entries(1, 0);

const HEADER_LEN: usize = size_of::<EventHeader>();

/// One field of a read-only global. Userspace rewrites the globals before load, so the
/// compiler must not fold their initial values; a whole-struct copy would cost stack.
macro_rules! global {
    ($global:ident . $field:ident) => {{
        // SAFETY: read of a field of a read-only global.
        #[allow(unused_unsafe)]
        let v = unsafe { core::ptr::read_volatile(&raw const $global.$field) };
        v
    }};
}

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Output flags: wake the reader only when a backlog has built up (see `Config::wakeup_bytes`).
#[inline(always)]
fn wakeup_flags() -> u64 {
    let threshold = global!(CONFIG.wakeup_bytes) as u64;
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= threshold {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Entry points at `sys_exit`: the syscall number comes from the saved registers.
macro_rules! sys_exit_programs {
    ($($attr:meta, $ctx:ty, $regs:ident: $helper:ident, $bounded:ident;)*) => {$(
        #[$attr]
        pub fn $helper(ctx: $ctx) -> i32 {
            on_sys_exit::<true>($regs(ctx.arg(0)), ctx.arg(1))
        }

        #[$attr]
        pub fn $bounded(ctx: $ctx) -> i32 {
            on_sys_exit::<false>($regs(ctx.arg(0)), ctx.arg(1))
        }
    )*};
}

#[inline(always)]
fn on_sys_exit<const BPF_LOOP: bool>(regs: impl Regs, ret: i64) -> i32 {
    if let Ok(nr) = regs.get(REG_NR) {
        let _ = on_syscall::<BPF_LOOP>(nr, regs, ret);
    }
    0
}

sys_exit_programs! {
    btf_tracepoint(function = "sys_exit"), BtfTracePointContext, BtfRegs:
        kspan_sys_exit, kspan_sys_exit_bounded;
    raw_tracepoint(tracepoint = "sys_exit"), RawTracePointContext, RawRegs:
        kspan_sys_exit_raw, kspan_sys_exit_raw_bounded;
}

/// Entry points at the exit of one socket syscall each (`fexit` on its `__<arch>_sys_*`
/// function, whose one argument is the saved registers). Userspace attaches `fexit_<name>`
/// (or `fexit_<name>_bounded`) to each syscall `<name>` of `kspan_common::SOCKET_SYSCALLS`.
macro_rules! fexit_programs {
    ($($helper:ident, $bounded:ident => $nr:ident;)*) => {$(
        #[fexit]
        pub fn $helper(ctx: FExitContext) -> i32 {
            let _ = on_syscall::<true>($nr, BtfRegs(ctx.arg(0)), ctx.arg(1));
            0
        }

        #[fexit]
        pub fn $bounded(ctx: FExitContext) -> i32 {
            let _ = on_syscall::<false>($nr, BtfRegs(ctx.arg(0)), ctx.arg(1));
            0
        }
    )*};
}

fexit_programs! {
    fexit_read, fexit_read_bounded => NR_READ;
    fexit_write, fexit_write_bounded => NR_WRITE;
    fexit_readv, fexit_readv_bounded => NR_READV;
    fexit_writev, fexit_writev_bounded => NR_WRITEV;
    fexit_recvfrom, fexit_recvfrom_bounded => NR_RECVFROM;
    fexit_sendto, fexit_sendto_bounded => NR_SENDTO;
    fexit_recvmsg, fexit_recvmsg_bounded => NR_RECVMSG;
    fexit_sendmsg, fexit_sendmsg_bounded => NR_SENDMSG;
    fexit_sendfile64, fexit_sendfile64_bounded => NR_SENDFILE;
    fexit_accept, fexit_accept_bounded => NR_ACCEPT;
    fexit_accept4, fexit_accept4_bounded => NR_ACCEPT4;
    fexit_connect, fexit_connect_bounded => NR_CONNECT;
    fexit_close, fexit_close_bounded => NR_CLOSE;
    fexit_dup, fexit_dup_bounded => NR_DUP;
    fexit_dup2, fexit_dup2_bounded => NR_DUP2;
    fexit_dup3, fexit_dup3_bounded => NR_DUP3;
}

/// The kernel destroys a TCP socket once no fd refers to it and TCP is done with it: the
/// connection's end, whichever process held it and however its fds went away. Attached as
/// tp_btf, or as a raw tracepoint where the sys_exit hook is one.
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn kspan_sock_destroy(ctx: BtfTracePointContext) -> i32 {
    on_destroy(ctx.arg(0));
    0
}

#[raw_tracepoint(tracepoint = "tcp_destroy_sock")]
pub fn kspan_sock_destroy_raw(ctx: RawTracePointContext) -> i32 {
    on_destroy(ctx.arg(0));
    0
}

/// A process exec'ed: userspace looks for a TLS library in it (an executable with OpenSSL
/// inside, a container's own libssl) before its first connection. Attached like the
/// destruction hook.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn kspan_exec(_ctx: BtfTracePointContext) -> i32 {
    on_exec();
    0
}

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn kspan_exec_raw(_ctx: RawTracePointContext) -> i32 {
    on_exec();
    0
}

#[inline(always)]
fn on_exec() {
    let (tgid, tid) = tgid_tid();
    let header = EventHeader {
        kind: kind::EXEC,
        tgid,
        tid,
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        ..EventHeader::default()
    };
    emit(&header);
}

/// The syscall's saved registers (`struct pt_regs *`), read at the offsets in `arch`.
trait Regs: core::marker::Copy {
    fn get<T>(self, offset: usize) -> Result<T, i32>;
}

/// From `tp_btf` or `fexit`: a BTF-typed pointer, so a field is a plain load.
#[derive(Clone, Copy)]
struct BtfRegs(*const u8);

impl Regs for BtfRegs {
    #[inline(always)]
    fn get<T>(self, offset: usize) -> Result<T, i32> {
        // SAFETY: the verifier checks each load against struct pt_regs in the kernel's BTF.
        Ok(unsafe { core::ptr::read_volatile(self.0.add(offset) as *const T) })
    }
}

/// From a raw tracepoint: an untyped kernel pointer, read through the fault-tolerant helper.
#[derive(Clone, Copy)]
struct RawRegs(*const u8);

impl Regs for RawRegs {
    #[inline(always)]
    fn get<T>(self, offset: usize) -> Result<T, i32> {
        // SAFETY: bpf_probe_read_kernel tolerates any address; a bad one returns an error.
        unsafe { bpf_probe_read_kernel(self.0.add(offset) as *const T) }
    }
}

enum Copy {
    /// `buf` argument points at the bytes.
    Flat,
    /// `buf` argument points at an iovec array of `arg2` entries.
    Iov,
    /// `buf` argument points at a msghdr.
    Msg,
    /// Bytes moved in kernel (sendfile): count only.
    None,
}

/// Handles the exit of syscall `nr`, which returned `ret`.
#[inline(always)]
fn on_syscall<const BPF_LOOP: bool>(nr: i64, regs: impl Regs, ret: i64) -> Result<(), i32> {
    // Cheapest rejection first: most syscalls on a busy host are none of these.
    let (dir, copy) = match nr {
        NR_READ | NR_RECVFROM => (direction::INGRESS, Copy::Flat),
        NR_WRITE | NR_SENDTO => (direction::EGRESS, Copy::Flat),
        NR_READV => (direction::INGRESS, Copy::Iov),
        NR_WRITEV => (direction::EGRESS, Copy::Iov),
        NR_RECVMSG => (direction::INGRESS, Copy::Msg),
        NR_SENDMSG => (direction::EGRESS, Copy::Msg),
        NR_SENDFILE => (direction::EGRESS, Copy::None),
        NR_ACCEPT | NR_ACCEPT4 => {
            if ret >= 0 && !is_self() {
                on_open(ret as u32, role::SERVER);
            }
            return Ok(());
        }
        NR_CONNECT => {
            if (ret == 0 || ret == -EINPROGRESS) && !is_self() {
                let fd: u64 = regs.get(REG_ARG0)?;
                on_open(fd as u32, role::CLIENT);
            }
            return Ok(());
        }
        NR_CLOSE => {
            let fd: u64 = regs.get(REG_ARG0)?;
            forget_fd(fd as u32);
            return Ok(());
        }
        NR_DUP | NR_DUP2 | NR_DUP3 => {
            if ret >= 0 {
                forget_fd(ret as u32);
            }
            return Ok(());
        }
        _ => return Ok(()),
    };
    if ret <= 0 {
        return Ok(());
    }
    let fd: u64 = regs.get(REG_ARG0)?;
    on_data::<BPF_LOOP>(regs, fd as u32, ret as u64, dir, copy)
}

#[inline(always)]
fn tgid_tid() -> (u32, u32) {
    let v = bpf_get_current_pid_tgid();
    ((v >> 32) as u32, v as u32)
}

#[inline(always)]
fn is_self() -> bool {
    tgid_tid().0 == global!(CONFIG.self_tgid)
}

/// Sends a record to userspace, counted as sent or as lost (ring buffer full).
#[inline(always)]
fn emit<T: ?Sized>(record: &T) -> bool {
    let sent = EVENTS.output::<T>(record, wakeup_flags()).is_ok();
    bump(if sent {
        stat::EVENTS
    } else {
        stat::LOST_RINGBUF
    });
    sent
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; tracepoint programs (tp_btf and raw) run with migration disabled.
        unsafe { *p += 1 };
    }
}

/// Where a record comes from: the socket, and the fd and thread that moved the bytes.
struct Origin {
    sock: u64,
    fd: u32,
    tid: u32,
    /// Plaintext read at the TLS library, not bytes at the socket.
    tls: bool,
    /// Go's goroutine register at the syscall (see `EventHeader::goroutine`).
    goroutine: u64,
}

#[inline(never)]
fn on_open(fd: u32, role: u8) {
    forget_fd(fd);
    let socket = fd_socket(fd);
    let sk = socket_sk(socket);
    if sk == 0 {
        return;
    }
    h2::forget(sk);
    let Some(info) = new_conn(sk, role) else {
        return;
    };
    // Unix sockets and anything else that is not TCP/IP carry no HTTP we can attribute.
    let family = info.tuple.family;
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    if CONNS.insert(&sk, info, 0).is_ok() {
        bump(stat::CONNS_TRACKED);
    } else {
        bump(stat::CONN_INSERT_FAILED);
    }
}

/// The fd number was closed or rebound: what was known of it no longer holds.
#[inline(always)]
fn forget_fd(fd: u32) {
    let key = ConnKey {
        tgid: tgid_tid().0,
        fd,
    };
    let _ = NOT_SOCKETS.remove(&key);
}

/// Builds the table entry of a socket just opened or discovered in the per-CPU slot; `None`
/// when its addresses cannot be read.
#[inline(always)]
fn new_conn(sk: u64, role: u8) -> Option<&'static ConnInfo> {
    let info = NEW_CONN.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, exclusively ours for this program run.
    let info = unsafe { &mut *info };
    info.tuple = Tuple::default();
    read_tuple(sk, &mut info.tuple).ok()?;
    // SAFETY: helper without preconditions.
    info.generation = unsafe { bpf_ktime_get_ns() };
    info.role = role;
    info.proto = proto::UNKNOWN;
    info.gap_pending = 0;
    info.discovered = (role == 0) as u8;
    info.sniff_left = if role == 0 { DISCOVERY_SNIFFS } else { 0 };
    info.inner = proto::UNKNOWN;
    info.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    info.opener_tgid = tgid_tid().0;
    info.opener_parent_tgid = parent_tgid();
    Some(info)
}

/// The current process's parent (0 when unreadable).
#[inline(always)]
fn parent_tgid() -> u32 {
    // SAFETY: every dereference goes through bpf_probe_read_kernel, which tolerates bad addresses.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let parent: Result<*const u8, _> =
            bpf_probe_read_kernel(task.add(global!(OFFSETS.task_real_parent) as usize) as *const _);
        match parent {
            Ok(p) => {
                bpf_probe_read_kernel(p.add(global!(OFFSETS.task_tgid) as usize) as *const u32)
                    .unwrap_or(0)
            }
            Err(_) => 0,
        }
    }
}

/// The socket `sk` is being destroyed: its connection is over for every process that held it.
#[inline(always)]
fn on_destroy(sk: u64) {
    let Some(info) = CONNS.get_ptr(&sk) else {
        return;
    };
    // SAFETY: pointer from a successful lookup, copied before the entry is removed.
    let conn = unsafe { *info };
    let _ = CONNS.remove(&sk);
    if conn.proto == proto::HTTP2 || conn.inner == proto::HTTP2 {
        h2::forget(sk);
    }
    // Userspace holds state for every recognised protocol (and remembers the connections it
    // excluded), none for the rest.
    if conn.proto == proto::UNKNOWN || conn.proto == proto::OTHER {
        return;
    }
    // Built on the stack, not in SCRATCH: from softirq this can interrupt a syscall's program
    // on the same CPU while that one fills SCRATCH.
    let header = EventHeader {
        kind: kind::CLOSE,
        tgid: 0,
        tid: 0,
        fd: 0,
        sock: sk,
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        conn,
        total_len: 0,
        captured_len: 0,
        direction: 0,
        flags: 0,
        _pad: [0; 2],
        goroutine: 0,
    };
    emit(&header);
}

#[inline(always)]
fn on_data<const BPF_LOOP: bool>(
    regs: impl Regs,
    fd: u32,
    total: u64,
    dir: u8,
    copy: Copy,
) -> Result<(), i32> {
    let (tgid, tid) = tgid_tid();
    let key = ConnKey { tgid, fd };
    if NOT_SOCKETS.get_ptr(&key).is_some() {
        return Ok(());
    }
    let socket = fd_socket(fd);
    let sk = socket_sk(socket);
    if sk == 0 {
        let _ = NOT_SOCKETS.insert(&key, &0, 0);
        return Ok(());
    }
    let info = match CONNS.get_ptr_mut(&sk) {
        Some(info) => info,
        None => match discover(&key, socket, sk) {
            Some(info) => info,
            None => return Ok(()),
        },
    };
    // SAFETY: pointer from a successful lookup; the LRU map keeps it valid for this program run.
    let info = unsafe { &mut *info };
    match info.proto {
        proto::OTHER | proto::IGNORED => return Ok(()),
        // Ciphertext: its plaintext comes from the TLS library's probes.
        proto::TLS => {
            tls::ciphertext(sk, fd);
            return Ok(());
        }
        _ => {}
    }
    let buf: u64 = regs.get(REG_ARG1)?;
    let src = match copy {
        Copy::Flat => h2::Source::flat(buf),
        Copy::Iov => h2::Source::iov(buf, regs.get(REG_ARG2)?),
        Copy::Msg => {
            let msg = buf as *const u8;
            // SAFETY: user pointers read through the fault-tolerant helper.
            let iov: u64 = unsafe { bpf_probe_read_user(msg.add(MSGHDR_IOV) as *const u64) }?;
            let count: u64 = unsafe { bpf_probe_read_user(msg.add(MSGHDR_IOVLEN) as *const u64) }?;
            h2::Source::iov(iov, count)
        }
        Copy::None => h2::Source::unreadable(),
    };
    let at = Origin {
        sock: sk,
        fd,
        tid,
        tls: false,
        goroutine: regs.get(REG_GO_G).unwrap_or(0),
    };
    capture::<BPF_LOOP>(info, &at, total, dir, src);
    Ok(())
}

/// The protocol of the bytes a record of `at` carries: the socket's, or for plaintext from a
/// TLS library the one recognised in it.
#[inline(always)]
fn carried(info: &ConnInfo, at: &Origin) -> u8 {
    if at.tls { info.inner } else { info.proto }
}

#[inline(always)]
fn set_carried(info: &mut ConnInfo, at: &Origin, p: u8) {
    if at.tls {
        info.inner = p;
    } else {
        info.proto = p;
    }
}

/// Copies `total` bytes moved on a tracked connection from `src` into a record and outputs
/// it: the HTTP/2 frame walk where the bytes are HTTP/2, else a prefix (and tail). The first
/// bytes of a connection decide its protocol, from a peek at their head, so that the frame
/// walk and the prefix copy each have one call site: every inlined copy is verified anew, and
/// a second walk took the bounded build past 5.10's 1M-instruction limit.
#[inline(always)]
fn capture<const BPF_LOOP: bool>(
    info: &mut ConnInfo,
    at: &Origin,
    total: u64,
    dir: u8,
    src: h2::Source,
) {
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch slot, exclusively ours for this program run.
    let ev = unsafe { &mut *ev };

    let mut cap = global!(CONFIG.payload_cap) as u64;
    if cap > MAX_PAYLOAD as u64 {
        cap = MAX_PAYLOAD as u64;
    }

    if carried(info, at) == proto::UNKNOWN {
        let len = peek_head(ev, &src, if total < cap { total } else { cap });
        match first_bytes(ev, info, at, len, dir) {
            First::Decided => {}
            First::Wait => return,
            First::Tls => {
                tls::ciphertext(at.sock, at.fd);
                fill_header(
                    ev,
                    info,
                    at,
                    total,
                    dir,
                    event_flags::NO_PAYLOAD | event_flags::TLS,
                );
                output(ev, info, 0);
                return;
            }
        }
        if carried(info, at) == proto::HTTP2 {
            // The direction that opens with the client preface; a connection found mid-life
            // starts at a frame boundary on both sides.
            let preface = if info.discovered != 0 {
                None
            } else if ev.payload[..4] == *b"PRI " {
                Some(dir)
            } else {
                Some(dir ^ 1)
            };
            h2::start(at.sock, info.generation, preface);
        }
    }
    // HTTP/2 framing must survive reads of any size: follow the frames instead of a prefix.
    if carried(info, at) == proto::HTTP2 && h2_walk::<BPF_LOOP>(ev, info, at, total, dir, &src, cap)
    {
        return;
    }
    let (captured, flags) = copy_prefix::<BPF_LOOP>(ev, total, &src, cap);
    fill_header(ev, info, at, total, dir, flags);
    output(ev, info, captured);
}

/// Copies the head of the bytes at `src` (up to [`SNIFF_LEN`], from the first iovec segment
/// only) for the sniff, zeroing the rest of it; returns `len`, the bytes a prefix copy would
/// hold, or 0 when nothing could be read.
#[inline(always)]
fn peek_head(ev: &mut DataEvent, src: &h2::Source, len: u64) -> u64 {
    ev.payload[..SNIFF_LEN].fill(0);
    let (base, seg) = match src.kind {
        h2::Source::FLAT => (src.addr, len),
        h2::Source::IOV if src.count > 0 => match iovec_entry(src.addr, 0) {
            Some(e) => e,
            None => return 0,
        },
        _ => return 0,
    };
    let mut n = if seg < len { seg } else { len };
    if n > SNIFF_LEN as u64 {
        n = SNIFF_LEN as u64;
    }
    if copy_flat(ev, base as *const u8, n) == 0 {
        return 0;
    }
    len
}

/// Copies the first bytes of `total` (at most `cap`), and of a large flat buffer its last
/// bytes too: (bytes in the record, flags).
#[inline(always)]
fn copy_prefix<const BPF_LOOP: bool>(
    ev: &mut DataEvent,
    total: u64,
    src: &h2::Source,
    cap: u64,
) -> (u64, u8) {
    let want = if total < cap { total } else { cap };
    let mut flags = 0u8;
    let mut captured = match src.kind {
        h2::Source::FLAT => copy_flat(ev, src.addr as *const u8, want),
        h2::Source::IOV => copy_iov::<BPF_LOOP>(src.addr as *const u8, src.count, want),
        _ => {
            flags |= event_flags::NO_PAYLOAD;
            0
        }
    };
    if total > captured && flags & event_flags::NO_PAYLOAD == 0 {
        bump(stat::TRUNCATED);
    }
    // A reply's end shows where a protocol's next message starts when its middle is skipped.
    if src.kind == h2::Source::FLAT && total > captured && captured >= 2 * TAIL_LEN as u64 {
        if copy_tail(ev, src.addr, total, captured) {
            flags |= event_flags::TAIL;
        } else {
            // A failed read zeroed the end of the prefix.
            captured -= TAIL_LEN as u64;
        }
    }
    (captured, flags)
}

enum First {
    /// The connection's protocol is now known (or left for userspace to judge).
    Decided,
    /// Not yet: wait for more bytes.
    Wait,
    /// The connection speaks TLS: only a notice of it is output.
    Tls,
}

/// Judges the first payload of a connection (or of its TLS plaintext).
#[inline(always)]
fn first_bytes(ev: &DataEvent, info: &mut ConnInfo, at: &Origin, captured: u64, dir: u8) -> First {
    // A byte count alone tells nothing about the protocol: wait for real bytes. Fewer than
    // four are passed on undecided and userspace judges them.
    if captured == 0 {
        return First::Wait;
    }
    // SAFETY: the payload array is far longer than the sniffed head.
    let head = unsafe { &*(ev.payload.as_ptr() as *const [u8; SNIFF_LEN]) };
    let sniffed = if captured < 4 {
        // A TLS record's first byte alone (nginx peeks at one to tell TLS from plaintext):
        // the record header comes next.
        if head[0] == 0x16 && !at.tls {
            return First::Wait;
        }
        Some(proto::UNKNOWN)
    } else {
        sniff(head, captured as usize, dir == direction::EGRESS, info.role)
    };
    match sniffed {
        // TLS inside TLS is no plaintext kspan reads.
        Some(proto::TLS) if at.tls => {}
        Some(proto::TLS) => {
            info.proto = proto::TLS;
            return First::Tls;
        }
        Some(p) => {
            set_carried(info, at, p);
            return First::Decided;
        }
        // Bytes moved inside a TLS library call are ciphertext, whatever they look like (a
        // socket found mid-record).
        None if !at.tls && tls::in_call() => {
            info.proto = proto::TLS;
            return First::Tls;
        }
        // A socket found mid-life may already speak HTTP/2 past its preface: a payload
        // that starts with a plausible frame header is passed on for userspace to judge.
        None if info.discovered != 0 && captured >= 9 && h2_frame_start(&ev.payload) => {
            set_carried(info, at, proto::HTTP2);
            return First::Decided;
        }
        // A socket found mid-life may be mid-message: give it a few more payloads.
        None if info.discovered != 0 && info.sniff_left > 0 => {
            info.sniff_left -= 1;
            return First::Wait;
        }
        None => {}
    }
    if at.tls {
        // The socket stays TLS; only its plaintext is of no protocol kspan decodes.
        info.inner = proto::OTHER;
    } else {
        info.proto = proto::OTHER;
    }
    bump(stat::CONNS_NOT_HTTP);
    First::Wait
}

/// Outputs the scratch record with `captured` payload bytes.
#[inline(always)]
fn output(ev: &mut DataEvent, info: &mut ConnInfo, captured: u64) {
    ev.header.captured_len = captured as u32;
    let mut len = HEADER_LEN as u64 + captured;
    if len > (HEADER_LEN + MAX_PAYLOAD) as u64 {
        len = (HEADER_LEN + MAX_PAYLOAD) as u64;
    }
    // SAFETY: `len` is bounded by the size of the scratch record.
    let bytes =
        unsafe { core::slice::from_raw_parts(ev as *const DataEvent as *const u8, len as usize) };
    info.gap_pending = u8::from(!emit(bytes));
}

/// The record header of a data event (`captured_len` is set by whoever fills the payload).
#[inline(always)]
fn fill_header(ev: &mut DataEvent, info: &ConnInfo, at: &Origin, total: u64, dir: u8, flags: u8) {
    let mut flags = flags;
    if info.gap_pending != 0 {
        flags |= event_flags::GAP;
    }
    let tgid = tgid_tid().0;
    ev.header = EventHeader {
        kind: kind::DATA,
        tgid,
        tid: at.tid,
        fd: at.fd,
        sock: at.sock,
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        conn: *info,
        total_len: total,
        captured_len: 0,
        direction: dir,
        flags,
        _pad: [0; 2],
        goroutine: at.goroutine,
    };
    if at.tls {
        ev.header.conn.proto = info.inner;
        ev.header.flags |= event_flags::TLS;
    }
    // The process moving the bytes may not be the one that opened the socket (a forked child,
    // an exec'ed inetd service): its own name stands in for it if it exits before /proc is read.
    // The opener's name is already in the entry, so the common case needs no helper call.
    if tgid != info.opener_tgid
        && let Ok(comm) = bpf_get_current_comm()
    {
        ev.header.conn.comm = comm;
    }
}

/// Emits an HTTP/2 connection's bytes as followed frames; false when its framing is not
/// followed (state evicted or lost), so the caller falls back to a prefix copy.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn h2_walk<const BPF_LOOP: bool>(
    ev: &mut DataEvent,
    info: &mut ConnInfo,
    at: &Origin,
    total: u64,
    dir: u8,
    src: &h2::Source,
    cap: u64,
) -> bool {
    fill_header(ev, info, at, total, dir, 0);
    match h2::walk::<BPF_LOOP>(at.sock, info.generation, dir, total, src, cap) {
        Some(gap) => {
            info.gap_pending = gap as u8;
            true
        }
        None => false,
    }
}

/// Overwrites the last [`TAIL_LEN`] bytes of a `captured`-byte prefix with the last bytes of the
/// `total`-byte buffer at `src`.
#[inline(always)]
fn copy_tail(ev: &mut DataEvent, src: u64, total: u64, captured: u64) -> bool {
    if captured < TAIL_LEN as u64 || captured > MAX_PAYLOAD as u64 {
        return false;
    }
    let at = captured - TAIL_LEN as u64;
    // The mask proves to every verifier of the matrix that the write stays in the 2x payload
    // (a range check alone was dropped by the compiler, which knew the caller's bounds, or not
    // followed to the pointer by 5.10). Read back opaquely so the mask is not dropped either;
    // it never changes `at`, which is below MAX_PAYLOAD.
    // SAFETY: read of a local.
    let at = unsafe { core::ptr::read_volatile(&at) } as usize & (MAX_PAYLOAD - 1);
    // SAFETY: `at + TAIL_LEN` ≤ MAX_PAYLOAD, within the scratch payload; the helper checks src.
    let r = unsafe {
        probe_read_user_raw(
            ev.payload.as_mut_ptr().add(at) as *mut c_void,
            TAIL_LEN as u32,
            (src + total - TAIL_LEN as u64) as *const c_void,
        )
    };
    if r != 0 {
        bump(stat::READ_FAULTS);
    }
    r == 0
}

/// Copies `want` (≤ MAX_PAYLOAD) bytes from user memory; returns how many were copied.
#[inline(always)]
fn copy_flat(ev: &mut DataEvent, src: *const u8, want: u64) -> u64 {
    let mut n = want;
    if n > MAX_PAYLOAD as u64 {
        n = MAX_PAYLOAD as u64;
    }
    if n == 0 {
        return 0;
    }
    // SAFETY: destination has 2*MAX_PAYLOAD bytes and n ≤ MAX_PAYLOAD; the helper checks src.
    let r = unsafe {
        probe_read_user_raw(
            ev.payload.as_mut_ptr() as *mut c_void,
            n as u32,
            src as *const c_void,
        )
    };
    if r == 0 {
        n
    } else {
        bump(stat::READ_FAULTS);
        0
    }
}

/// State shared with [`iov_step`] across `bpf_loop` iterations.
#[repr(C)]
struct IovWalk {
    iov: u64,
    count: u64,
    want: u64,
    off: u64,
}

/// Walks up to MAX_IOV (bounded build: `BOUNDED_IOV`) iovec entries copying at most `want`
/// bytes in order. `bpf_loop` has the verifier check one segment's copy once, instead of an
/// unrolled loop per call site.
#[inline(always)]
fn copy_iov<const BPF_LOOP: bool>(iov: *const u8, count: u64, want: u64) -> u64 {
    let mut walk = IovWalk {
        iov: iov as u64,
        count,
        want,
        off: 0,
    };
    repeat::<BPF_LOOP>(
        MAX_IOV as u32,
        BOUNDED_IOV,
        iov_step,
        &mut walk as *mut IovWalk as *mut c_void,
    );
    walk.off
}

/// One iovec segment; returns 1 to stop the walk.
#[inline(never)]
extern "C" fn iov_step(i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the IovWalk passed by copy_iov.
    let w = unsafe { &mut *(ctx as *mut IovWalk) };
    if i as u64 >= w.count || w.off >= w.want || w.off >= MAX_PAYLOAD as u64 {
        return 1;
    }
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    let Some((base, len)) = iovec_entry(w.iov, i as u64) else {
        return 1;
    };
    let mut s = w.want - w.off;
    if len < s {
        s = len;
    }
    // Masks prove to the verifier what the checks above guarantee: off < MAX_PAYLOAD and
    // s ≤ MAX_PAYLOAD, so off + s stays inside the 2x scratch payload.
    let o = (w.off as usize) & (MAX_PAYLOAD - 1);
    if s > MAX_PAYLOAD as u64 {
        s = MAX_PAYLOAD as u64;
    }
    if s > 0 {
        // SAFETY: in bounds as shown above; the helper checks the user source.
        let r = unsafe {
            probe_read_user_raw(
                (*ev).payload.as_mut_ptr().add(o) as *mut c_void,
                s as u32,
                base as *const c_void,
            )
        };
        if r != 0 {
            bump(stat::READ_FAULTS);
            return 1;
        }
    }
    w.off += s;
    0
}

/// Entry `i` of a user iovec array: (base, len). A fault is counted and gives `None`.
#[inline(always)]
fn iovec_entry(iov: u64, i: u64) -> Option<(u64, u64)> {
    let entry = (iov as *const u8).wrapping_add(i as usize * IOVEC_SIZE);
    // SAFETY: user pointers read through the fault-tolerant helper.
    match unsafe {
        (
            bpf_probe_read_user(entry as *const u64),
            bpf_probe_read_user(entry.wrapping_add(8) as *const u64),
        )
    } {
        (Ok(b), Ok(l)) => Some((b, l)),
        _ => {
            bump(stat::READ_FAULTS);
            None
        }
    }
}

/// A socket the agent did not see being opened (it predates the agent, or arrived over
/// SCM_RIGHTS from a process that predates it): track it if it is a TCP stream, remember the
/// answer otherwise so the walk happens once per fd.
#[inline(never)]
fn discover(key: &ConnKey, socket: u64, sk: u64) -> Option<*mut ConnInfo> {
    if is_self() {
        return None;
    }
    let info = match new_conn(sk, 0) {
        Some(i)
            if is_stream(socket) && (i.tuple.family == AF_INET || i.tuple.family == AF_INET6) =>
        {
            i
        }
        _ => {
            let _ = NOT_SOCKETS.insert(key, &0, 0);
            return None;
        }
    };
    if CONNS.insert(&sk, info, 0).is_err() {
        bump(stat::CONN_INSERT_FAILED);
        return None;
    }
    bump(stat::CONNS_DISCOVERED);
    CONNS.get_ptr_mut(&sk)
}

/// Whether bytes look like an HTTP/2 frame header: a defined type, a length within the
/// default maximum frame size, the reserved bit clear, and a stream id consistent with the type.
#[inline(always)]
fn h2_frame_start(p: &[u8]) -> bool {
    let (len_hi, kind, stream_hi) = (p[0], p[3], p[5]);
    let stream_zero = p[5] == 0 && p[6] == 0 && p[7] == 0 && p[8] == 0;
    let len_ok = len_hi == 0; // < 64 KiB; the default maximum is 16 KiB
    len_ok
        && stream_hi & 0x80 == 0
        && match kind {
            // SETTINGS, PING, GOAWAY: connection-level only.
            4 | 6 | 7 => stream_zero,
            // DATA, HEADERS, PRIORITY, RST_STREAM, PUSH_PROMISE, CONTINUATION: on a stream.
            0 | 1 | 2 | 3 | 5 | 9 => !stream_zero,
            // WINDOW_UPDATE may be either.
            8 => true,
            _ => false,
        }
}

macro_rules! field {
    ($base:expr, $off:ident) => {
        bpf_probe_read_kernel($base.add(global!(OFFSETS.$off) as usize) as *const _)
    };
}

/// The `struct socket` behind `fd` of the current process, 0 when the fd is no socket:
/// task → files → fdtable → file → private_data, which is a socket when the socket points back
/// at the file. Offsets come from the kernel's BTF.
#[inline(never)]
fn fd_socket(fd: u32) -> u64 {
    if global!(OFFSETS.valid) == 0 {
        return 0;
    }
    // SAFETY: every dereference goes through bpf_probe_read_kernel, which tolerates bad addresses.
    let socket: Result<*const u8, i64> = unsafe {
        (|| {
            let task = bpf_get_current_task() as *const u8;
            let files: *const u8 = field!(task, task_files)?;
            let fdt: *const u8 = field!(files, files_fdt)?;
            let max_fds: u32 = field!(fdt, fdt_max_fds)?;
            if fd >= max_fds {
                return Err(-1);
            }
            let fds: *const *const u8 = field!(fdt, fdt_fd)?;
            let file: *const u8 = bpf_probe_read_kernel(fds.add(fd as usize))?;
            let socket: *const u8 = field!(file, file_private_data)?;
            let back: *const u8 = field!(socket, socket_file)?;
            if back != file || socket.is_null() {
                return Err(-1);
            }
            Ok(socket)
        })()
    };
    socket.map(|s| s as u64).unwrap_or(0)
}

/// The `struct sock` of a socket (0 for none).
#[inline(always)]
fn socket_sk(socket: u64) -> u64 {
    if socket == 0 {
        return 0;
    }
    // SAFETY: read through the fault-tolerant helper.
    unsafe { field!((socket as *const u8), socket_sk) }.unwrap_or(0)
}

/// Whether a socket is a stream socket (TCP, or a unix stream the family check then drops).
#[inline(always)]
fn is_stream(socket: u64) -> bool {
    const SOCK_STREAM: u16 = 1;
    // SAFETY: read through the fault-tolerant helper.
    let kind: Result<u16, _> = unsafe { field!((socket as *const u8), socket_type) };
    kind == Ok(SOCK_STREAM)
}

/// Reads the addresses of socket `sk` into `t`.
#[inline(always)]
fn read_tuple(sk: u64, t: &mut Tuple) -> Result<(), i64> {
    let sk = sk as *const u8;
    // SAFETY: every dereference goes through bpf_probe_read_kernel, which tolerates bad addresses.
    unsafe {
        let family: u16 = field!(sk, skc_family)?;
        t.family = family;
        let dport: u16 = field!(sk, skc_dport)?;
        t.peer_port = u16::from_be(dport);
        t.local_port = field!(sk, skc_num)?;
        if family == AF_INET {
            let d: [u8; 4] = field!(sk, skc_daddr)?;
            let s: [u8; 4] = field!(sk, skc_rcv_saddr)?;
            t.peer_addr[..4].copy_from_slice(&d);
            t.local_addr[..4].copy_from_slice(&s);
        } else if family == AF_INET6 && global!(OFFSETS.skc_v6_daddr) != 0 {
            t.peer_addr = field!(sk, skc_v6_daddr)?;
            t.local_addr = field!(sk, skc_v6_rcv_saddr)?;
        }
        let net: *const u8 = field!(sk, skc_net)?;
        t.netns = field!(net, net_ns_inum)?;
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
