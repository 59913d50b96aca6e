//! kspan's kernel side: one hook on the `sys_exit` tracepoint.
//!
//! At syscall exit the saved registers still hold the syscall number and its arguments, and the
//! return value tells how many bytes moved, so a single hook sees everything a pair of
//! enter/exit hooks would, at half the cost. Work is ordered cheapest-first: syscall number,
//! then the connection table, then payload copies only for connections that sniffed as HTTP.
//!
//! The same body has two entry points. The BTF-typed one (`tp_btf`) reads the registers with
//! plain loads the verifier checks against the kernel's BTF; the raw tracepoint needs a helper
//! call per register. The hook runs on every syscall of every process, and the loads made it a
//! third cheaper for the syscalls it filters out; the raw one is the fallback for kernels that
//! refuse BTF-typed tracing programs.
#![no_std]
#![no_main]

mod arch;
mod h2;

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_loop, bpf_probe_read_user as probe_read_user_raw},
    },
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use kspan_common::{
    Config, ConnInfo, ConnKey, DISCOVERY_SNIFFS, DataEvent, EventHeader, KernelOffsets, MAX_IOV,
    MAX_PAYLOAD, Tuple, direction, event_flags, kind, proto, role, stat,
};

use arch::*;

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
    file_f_inode: 0,
    inode_i_mode: 0,
    socket_type: 0,
    valid: 0,
};

/// Tracked TCP sockets. LRU so that sockets of processes that exit without close() age out
/// instead of filling the table.
#[map]
static CONNS: LruHashMap<ConnKey, ConnInfo> = LruHashMap::with_max_entries(131_072, 0);

/// fds checked and found not to be TCP sockets, so each is walked once, not on every read.
/// Cleared on close/accept/connect of the same fd number.
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

const HEADER_LEN: usize = size_of::<EventHeader>();

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Output flags: wake the reader only when a backlog has built up (see `Config::wakeup_bytes`).
#[inline(always)]
fn wakeup_flags() -> u64 {
    // SAFETY: read of a read-only global.
    let threshold = unsafe { core::ptr::read_volatile(&CONFIG) }.wakeup_bytes as u64;
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= threshold {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[btf_tracepoint(function = "sys_exit")]
pub fn kspan_sys_exit(ctx: BtfTracePointContext) -> i32 {
    let _ = try_sys_exit(BtfRegs(ctx.arg(0)), ctx.arg(1));
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn kspan_sys_exit_raw(ctx: RawTracePointContext) -> i32 {
    let _ = try_sys_exit(RawRegs(ctx.arg(0)), ctx.arg(1));
    0
}

/// The syscall's saved registers (`struct pt_regs *`), read at the offsets in `arch`.
trait Regs: core::marker::Copy {
    fn get<T>(self, offset: usize) -> Result<T, i32>;
}

/// From `tp_btf`: a BTF-typed pointer, so a field is a plain load.
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

#[inline(always)]
fn try_sys_exit(regs: impl Regs, ret: i64) -> Result<(), i32> {
    let nr: i64 = regs.get(REG_NR)?;

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
            on_close(fd as u32);
            return Ok(());
        }
        _ => return Ok(()),
    };
    if ret <= 0 {
        return Ok(());
    }
    let fd: u64 = regs.get(REG_ARG0)?;
    on_data(regs, fd as u32, ret as u64, dir, copy)
}

#[inline(always)]
fn tgid_tid() -> (u32, u32) {
    let v = bpf_get_current_pid_tgid();
    ((v >> 32) as u32, v as u32)
}

#[inline(always)]
fn is_self() -> bool {
    // SAFETY: read of a read-only global.
    let cfg = unsafe { core::ptr::read_volatile(&CONFIG) };
    tgid_tid().0 == cfg.self_tgid
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; tracepoint programs (tp_btf and raw) run with migration disabled.
        unsafe { *p += 1 };
    }
}

fn on_open(fd: u32, role: u8) {
    let key = ConnKey {
        tgid: tgid_tid().0,
        fd,
    };
    let _ = NOT_SOCKETS.remove(&key);
    h2::forget(&key);
    let Ok(tuple) = read_tuple(fd, false) else {
        return;
    };
    // Unix sockets and anything else that is not TCP/IP carry no HTTP we can attribute.
    if tuple.family != 0 && tuple.family != AF_INET && tuple.family != AF_INET6 {
        return;
    }
    let info = ConnInfo {
        // SAFETY: helper without preconditions.
        generation: unsafe { bpf_ktime_get_ns() },
        tuple,
        role,
        proto: proto::UNKNOWN,
        gap_pending: 0,
        discovered: 0,
        sniff_left: 0,
        _pad: [0; 3],
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    if CONNS.insert(&key, &info, 0).is_ok() {
        bump(stat::CONNS_TRACKED);
    } else {
        bump(stat::CONN_INSERT_FAILED);
    }
}

fn on_close(fd: u32) {
    let (tgid, tid) = tgid_tid();
    let key = ConnKey { tgid, fd };
    let _ = NOT_SOCKETS.remove(&key);
    let Some(info) = CONNS.get_ptr(&key) else {
        return;
    };
    // SAFETY: pointer from a successful lookup, read before the entry is removed.
    let info = unsafe { *info };
    let _ = CONNS.remove(&key);
    if info.proto == proto::HTTP2 {
        h2::forget(&key);
    }
    if info.proto != proto::HTTP1 && info.proto != proto::HTTP2 {
        return;
    }
    let header = EventHeader {
        kind: kind::CLOSE,
        tgid,
        tid,
        fd,
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        conn: info,
        total_len: 0,
        captured_len: 0,
        direction: 0,
        flags: if info.gap_pending != 0 {
            event_flags::GAP
        } else {
            0
        },
        _pad: [0; 2],
    };
    if EVENTS
        .output::<EventHeader>(&header, wakeup_flags())
        .is_ok()
    {
        bump(stat::EVENTS);
    } else {
        bump(stat::LOST_RINGBUF);
    }
}

#[inline(always)]
fn on_data(regs: impl Regs, fd: u32, total: u64, dir: u8, copy: Copy) -> Result<(), i32> {
    let (tgid, tid) = tgid_tid();
    let key = ConnKey { tgid, fd };
    let info = match CONNS.get_ptr_mut(&key) {
        Some(info) => info,
        None => match discover(&key) {
            Some(info) => info,
            None => return Ok(()),
        },
    };
    // SAFETY: pointer from a successful lookup; the LRU map keeps it valid for this program run.
    let info = unsafe { &mut *info };
    if info.proto == proto::OTHER || info.proto == proto::IGNORED {
        return Ok(());
    }
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: per-CPU scratch slot, exclusively ours for this program run.
    let ev = unsafe { &mut *ev };

    // SAFETY: read of a read-only global.
    let cfg = unsafe { core::ptr::read_volatile(&CONFIG) };
    let mut cap = cfg.payload_cap as u64;
    if cap > MAX_PAYLOAD as u64 {
        cap = MAX_PAYLOAD as u64;
    }
    let buf: u64 = regs.get(REG_ARG1)?;
    let src = match copy {
        Copy::Flat => h2::Source::Flat(buf),
        Copy::Iov => h2::Source::Iov {
            iov: buf,
            count: regs.get(REG_ARG2)?,
        },
        Copy::Msg => {
            let msg = buf as *const u8;
            // SAFETY: user pointers read through the fault-tolerant helper.
            let iov: u64 = unsafe { bpf_probe_read_user(msg.add(MSGHDR_IOV) as *const u64) }?;
            let count: u64 = unsafe { bpf_probe_read_user(msg.add(MSGHDR_IOVLEN) as *const u64) }?;
            h2::Source::Iov { iov, count }
        }
        Copy::None => h2::Source::Unreadable,
    };

    // HTTP/2 framing must survive reads of any size: follow the frames instead of a prefix.
    if info.proto == proto::HTTP2 && h2_walk(ev, info, &key, tid, total, dir, &src, cap) {
        return Ok(());
    }

    let want = if total < cap { total } else { cap };
    let mut flags = 0u8;
    let captured = match src {
        h2::Source::Flat(buf) => copy_flat(ev, buf as *const u8, want),
        h2::Source::Iov { iov, count } => copy_iov(iov as *const u8, count, want),
        h2::Source::Unreadable => {
            flags |= event_flags::NO_PAYLOAD;
            0
        }
    };
    if total > captured && flags & event_flags::NO_PAYLOAD == 0 {
        bump(stat::TRUNCATED);
    }

    if info.proto == proto::UNKNOWN {
        // A byte count alone tells nothing about the protocol: wait for real bytes. Fewer than
        // four are passed on undecided and userspace judges them.
        if captured == 0 {
            return Ok(());
        }
        match if captured < 4 {
            Some(proto::UNKNOWN)
        } else {
            sniff(&ev.payload)
        } {
            Some(p) => info.proto = p,
            // A socket found mid-life may already speak HTTP/2 past its preface: a payload
            // that starts with a plausible frame header is passed on for userspace to judge.
            None if info.discovered != 0 && captured >= 9 && h2_frame_start(&ev.payload) => {
                info.proto = proto::HTTP2
            }
            // A socket found mid-life may be mid-message: give it a few more payloads.
            None if info.sniff_left > 0 => {
                info.sniff_left -= 1;
                return Ok(());
            }
            None => {
                info.proto = proto::OTHER;
                bump(stat::CONNS_NOT_HTTP);
                return Ok(());
            }
        }
        if info.proto == proto::HTTP2 {
            // The direction that opens with the client preface; a connection found mid-life
            // starts at a frame boundary on both sides.
            let preface = if info.discovered != 0 {
                None
            } else if ev.payload[..4] == *b"PRI " {
                Some(dir)
            } else {
                Some(dir ^ 1)
            };
            h2::start(&key, info.generation, preface);
            if h2_walk(ev, info, &key, tid, total, dir, &src, cap) {
                return Ok(());
            }
        }
    }

    fill_header(ev, info, tid, fd, total, dir, flags);
    ev.header.captured_len = captured as u32;
    let mut len = HEADER_LEN as u64 + captured;
    if len > (HEADER_LEN + MAX_PAYLOAD) as u64 {
        len = (HEADER_LEN + MAX_PAYLOAD) as u64;
    }
    // SAFETY: `len` is bounded by the size of the scratch record.
    let bytes =
        unsafe { core::slice::from_raw_parts(ev as *const DataEvent as *const u8, len as usize) };
    if EVENTS.output::<[u8]>(bytes, wakeup_flags()).is_ok() {
        info.gap_pending = 0;
        bump(stat::EVENTS);
    } else {
        info.gap_pending = 1;
        bump(stat::LOST_RINGBUF);
    }
    Ok(())
}

/// The record header of a data event (`captured_len` is set by whoever fills the payload).
#[inline(always)]
fn fill_header(
    ev: &mut DataEvent,
    info: &ConnInfo,
    tid: u32,
    fd: u32,
    total: u64,
    dir: u8,
    flags: u8,
) {
    let mut flags = flags;
    if info.gap_pending != 0 {
        flags |= event_flags::GAP;
    }
    ev.header = EventHeader {
        kind: kind::DATA,
        tgid: tgid_tid().0,
        tid,
        fd,
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        conn: *info,
        total_len: total,
        captured_len: 0,
        direction: dir,
        flags,
        _pad: [0; 2],
    };
}

/// Emits an HTTP/2 connection's bytes as followed frames; false when its framing is not
/// followed (state evicted or lost), so the caller falls back to a prefix copy.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn h2_walk(
    ev: &mut DataEvent,
    info: &mut ConnInfo,
    key: &ConnKey,
    tid: u32,
    total: u64,
    dir: u8,
    src: &h2::Source,
    cap: u64,
) -> bool {
    fill_header(ev, info, tid, key.fd, total, dir, 0);
    match h2::walk(key, info.generation, dir, total, src, cap) {
        Some(gap) => {
            info.gap_pending = gap as u8;
            true
        }
        None => false,
    }
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

/// Walks up to MAX_IOV iovec entries copying at most `want` bytes in order. `bpf_loop` has
/// the verifier check one segment's copy once, instead of an unrolled loop per call site.
#[inline(always)]
fn copy_iov(iov: *const u8, count: u64, want: u64) -> u64 {
    let mut walk = IovWalk {
        iov: iov as u64,
        count,
        want,
        off: 0,
    };
    // SAFETY: the callback is a BPF subprogram and the context lives on this stack frame.
    unsafe {
        bpf_loop(
            MAX_IOV as u32,
            iov_step as *mut c_void,
            &mut walk as *mut IovWalk as *mut c_void,
            0,
        )
    };
    walk.off
}

/// One iovec segment; returns 1 to stop the walk.
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

/// A socket the agent did not see being opened (it predates the agent): track it if it is a
/// TCP stream, remember the answer otherwise so the walk happens once per fd.
#[inline(always)]
fn discover(key: &ConnKey) -> Option<*mut ConnInfo> {
    if NOT_SOCKETS.get_ptr(key).is_some() || is_self() {
        return None;
    }
    let tuple = match read_tuple(key.fd, true) {
        Ok(t) if t.family == AF_INET || t.family == AF_INET6 => t,
        _ => {
            let _ = NOT_SOCKETS.insert(key, &0, 0);
            return None;
        }
    };
    let info = ConnInfo {
        // SAFETY: helper without preconditions.
        generation: unsafe { bpf_ktime_get_ns() },
        tuple,
        role: 0,
        proto: proto::UNKNOWN,
        gap_pending: 0,
        discovered: 1,
        sniff_left: DISCOVERY_SNIFFS,
        _pad: [0; 3],
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    if CONNS.insert(key, &info, 0).is_err() {
        bump(stat::CONN_INSERT_FAILED);
        return None;
    }
    bump(stat::CONNS_DISCOVERED);
    CONNS.get_ptr_mut(key)
}

/// Recognises the first bytes of an HTTP/1.x request or response, or the HTTP/2 preface.
#[inline(always)]
fn sniff(p: &[u8]) -> Option<u8> {
    let b = [p[0], p[1], p[2], p[3]];
    match &b {
        b"GET " | b"POST" | b"PUT " | b"HEAD" | b"DELE" | b"OPTI" | b"PATC" | b"CONN" | b"TRAC"
        | b"HTTP" => Some(proto::HTTP1),
        b"PRI " => Some(proto::HTTP2),
        // An HTTP/2 server's preface is a SETTINGS frame, often sent before it reads the
        // client's: length a multiple of 6 below 64 KiB, type 4, stream 0.
        _ if p[0] == 0
            && p[2] % 6 == 0
            && p[3] == 4
            && p[4] & !1 == 0
            && p[5..9] == [0, 0, 0, 0] =>
        {
            Some(proto::HTTP2)
        }
        _ => None,
    }
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

/// Reads the socket's addresses by walking task → files → fdtable → file → socket → sock with
/// offsets resolved from BTF. A failed walk yields family 0 so the connection is still tracked.
/// With `verify`, the fd is first proven to be a stream socket (for fds of unknown kind).
fn read_tuple(fd: u32, verify: bool) -> Result<Tuple, i32> {
    // SAFETY: read of a read-only global.
    let o = unsafe { core::ptr::read_volatile(&OFFSETS) };
    let mut t = Tuple::default();
    if o.valid == 0 {
        return Ok(t);
    }
    // SAFETY: every dereference goes through bpf_probe_read_kernel, which tolerates bad addresses.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let files: *const u8 = bpf_probe_read_kernel(task.add(o.task_files as usize) as *const _)?;
        let fdt: *const u8 = bpf_probe_read_kernel(files.add(o.files_fdt as usize) as *const _)?;
        let max_fds: u32 = bpf_probe_read_kernel(fdt.add(o.fdt_max_fds as usize) as *const _)?;
        if fd >= max_fds {
            return Ok(t);
        }
        let fds: *const *const u8 = bpf_probe_read_kernel(fdt.add(o.fdt_fd as usize) as *const _)?;
        let file: *const u8 = bpf_probe_read_kernel(fds.add(fd as usize))?;
        let socket: *const u8 =
            bpf_probe_read_kernel(file.add(o.file_private_data as usize) as *const _)?;
        if verify {
            const S_IFMT: u16 = 0o170000;
            const S_IFSOCK: u16 = 0o140000;
            const SOCK_STREAM: u16 = 1;
            let inode: *const u8 =
                bpf_probe_read_kernel(file.add(o.file_f_inode as usize) as *const _)?;
            let mode: u16 = bpf_probe_read_kernel(inode.add(o.inode_i_mode as usize) as *const _)?;
            let kind: u16 = bpf_probe_read_kernel(socket.add(o.socket_type as usize) as *const _)?;
            if mode & S_IFMT != S_IFSOCK || kind != SOCK_STREAM {
                return Err(-1);
            }
        }
        let sk: *const u8 = bpf_probe_read_kernel(socket.add(o.socket_sk as usize) as *const _)?;
        let family: u16 = bpf_probe_read_kernel(sk.add(o.skc_family as usize) as *const _)?;
        t.family = family;
        let dport: u16 = bpf_probe_read_kernel(sk.add(o.skc_dport as usize) as *const _)?;
        t.peer_port = u16::from_be(dport);
        t.local_port = bpf_probe_read_kernel(sk.add(o.skc_num as usize) as *const _)?;
        if family == AF_INET {
            let d: [u8; 4] = bpf_probe_read_kernel(sk.add(o.skc_daddr as usize) as *const _)?;
            let s: [u8; 4] = bpf_probe_read_kernel(sk.add(o.skc_rcv_saddr as usize) as *const _)?;
            t.peer_addr[..4].copy_from_slice(&d);
            t.local_addr[..4].copy_from_slice(&s);
        } else if family == AF_INET6 && o.skc_v6_daddr != 0 {
            t.peer_addr = bpf_probe_read_kernel(sk.add(o.skc_v6_daddr as usize) as *const _)?;
            t.local_addr = bpf_probe_read_kernel(sk.add(o.skc_v6_rcv_saddr as usize) as *const _)?;
        }
        let net: *const u8 = bpf_probe_read_kernel(sk.add(o.skc_net as usize) as *const _)?;
        t.netns = bpf_probe_read_kernel(net.add(o.net_ns_inum as usize) as *const _)?;
    }
    Ok(t)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
