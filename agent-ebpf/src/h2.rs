//! HTTP/2 frame walk: keeps framing across syscalls of any size.
//!
//! A prefix copy loses HTTP/2 for good as soon as a frame header falls beyond the copy cap (a
//! multiplexed read easily holds hundreds of frames), since HTTP/2 has no resynchronisation
//! point. So for HTTP/2 connections the kernel follows the frame headers itself: it copies
//! every frame header and the payloads userspace decodes (header blocks and control frames),
//! and only counts DATA payloads. The record's payload is then a sequence of chunks
//! `[u32 copied][u32 skipped][copied bytes]`: copied bytes, followed by bytes not copied. A
//! syscall that needs more than one record's worth of copies is split over several records.
use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    helpers::generated::bpf_probe_read_user as probe_read_user_raw,
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use kspan_common::{EventHeader, H2_CHUNK_HEADER, MAX_PAYLOAD, event_flags, stat};

use crate::{
    SCRATCH, bump, emit, iovec_entry,
    looping::{BOUNDED_H2_STEPS, repeat},
};

/// The HTTP/2 client connection preface, walked as if it were one frame's payload.
const PREFACE_LEN: u32 = 24;
const FRAME_HEADER: u32 = 9;
/// Steps one syscall may take (a step copies or skips a run, reads a frame header or moves to
/// the next iovec segment). Beyond it the rest is reported uncopied and framing is given up.
const MAX_STEPS: u32 = 8192;

/// One direction of a connection's frame stream, between syscalls.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Side {
    /// Payload bytes of the current frame still to come; 0 means a frame header is next.
    left: u32,
    /// Whether the current frame's payload is copied (1) or only counted (0).
    copy: u8,
    /// Bytes of a frame header split across syscalls seen so far.
    hdr_have: u8,
    /// Framing could not be followed: this side falls back to prefix copies.
    lost: u8,
    _pad: u8,
    /// The split header's first bytes (length and type are all the walk needs).
    hdr: [u8; 8],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Framing {
    /// Generation of the connection this belongs to: socket addresses are reused.
    generation: u64,
    /// Indexed by `direction`.
    sides: [Side; 2],
}

#[map]
static H2_FRAMING: LruHashMap<u64, Framing> = LruHashMap::with_max_entries(65_536, 0);

/// The walk's state lives in a map, not on the stack: the verifier tracks stack values
/// precisely and would explore every iteration of the loop separately, while values loaded
/// from a map are unknown to it, so one pass over [`step`] covers them all (every offset is
/// bounded by explicit masks instead).
#[map]
static WALK: PerCpuArray<Walk> = PerCpuArray::with_max_entries(1, 0);

/// Starts following a connection that was just recognised as HTTP/2. `preface_dir` is the
/// direction that begins with the client preface (none for a connection found mid-life).
pub fn start(sock: u64, generation: u64, preface_dir: Option<u8>) {
    let mut f = Framing {
        generation,
        ..Default::default()
    };
    if let Some(d) = preface_dir {
        f.sides[(d & 1) as usize].left = PREFACE_LEN;
        f.sides[(d & 1) as usize].copy = 1;
    }
    let _ = H2_FRAMING.insert(&sock, &f, 0);
}

pub fn forget(sock: u64) {
    let _ = H2_FRAMING.remove(&sock);
}

/// Where the syscall's bytes are.
///
/// A struct whose fields are all always written, not an enum: 5.10's verifier rejects reading
/// a stack slot no path wrote, and the compiler copies an enum whole, unused fields included.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Source {
    pub kind: u64,
    /// The buffer (`FLAT`) or the iovec array (`IOV`).
    pub addr: u64,
    /// iovec entries (`IOV`).
    pub count: u64,
}

impl Source {
    /// One buffer.
    pub const FLAT: u64 = 0;
    /// An iovec array of `count` entries.
    pub const IOV: u64 = 1;
    /// Moved inside the kernel (sendfile): only the count is known.
    pub const UNREADABLE: u64 = 2;

    #[inline(always)]
    pub fn flat(buf: u64) -> Self {
        Self {
            kind: Self::FLAT,
            addr: buf,
            count: 0,
        }
    }

    #[inline(always)]
    pub fn iov(iov: u64, count: u64) -> Self {
        Self {
            kind: Self::IOV,
            addr: iov,
            count,
        }
    }

    #[inline(always)]
    pub fn unreadable() -> Self {
        Self {
            kind: Self::UNREADABLE,
            addr: 0,
            count: 0,
        }
    }
}

/// Walk state shared with [`step`] across `bpf_loop` iterations.
#[repr(C)]
pub struct Walk {
    side: Side,
    iov: u64,
    iov_count: u64,
    iov_next: u64,
    readable: u64,
    seg_base: u64,
    seg_left: u64,
    /// Syscall bytes not walked yet.
    total_left: u64,
    /// Syscall bytes this record describes.
    covered: u64,
    /// Payload bytes written to the record (chunk headers included).
    out: u64,
    /// Offset of the open chunk's header, and its counts.
    chunk_at: u64,
    chunk_copied: u64,
    chunk_skipped: u64,
    /// Bytes one record may carry.
    cap: u64,
    /// The last record could not be output.
    gap: u64,
    /// The record being built starts with a frame header: after lost records, userspace can
    /// resume framing there.
    at_frame: u64,
}

/// Follows the frames of one syscall's bytes and emits one or more chunked records. The
/// scratch record's header must already be filled in. Returns whether the last record could
/// not be output (the connection then owes userspace a gap flag), or `None` when this
/// connection has no framing state (or lost it): the caller then copies a plain prefix.
#[inline(always)]
pub fn walk<const BPF_LOOP: bool>(
    sock: u64,
    generation: u64,
    dir: u8,
    total: u64,
    src: &Source,
    cap: u64,
) -> Option<bool> {
    let f = H2_FRAMING.get_ptr_mut(&sock)?;
    // SAFETY: pointer from a successful lookup; the LRU map keeps it valid for this program run.
    let f = unsafe { &mut *f };
    let d = (dir & 1) as usize;
    if f.generation != generation || f.sides[d].lost != 0 {
        return None;
    }
    let (seg_base, seg_left, iov, iov_count, readable) = match src.kind {
        Source::FLAT => (src.addr, total, 0, 0, 1),
        Source::IOV => (0, 0, src.addr, src.count, 1),
        _ => (0, total, 0, 0, 0),
    };
    let w = WALK.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, exclusively ours for this program run.
    let w = unsafe { &mut *w };
    *w = Walk {
        side: f.sides[d],
        iov,
        iov_count,
        iov_next: 0,
        readable,
        seg_base,
        seg_left,
        total_left: total,
        covered: 0,
        out: H2_CHUNK_HEADER as u64,
        chunk_at: 0,
        chunk_copied: 0,
        chunk_skipped: 0,
        cap: if cap < 64 { 64 } else { cap },
        gap: 0,
        at_frame: 0,
    };
    w.at_frame = at_frame_start(&w.side);
    // `step` finds its state in WALK.
    repeat::<BPF_LOOP>(MAX_STEPS, BOUNDED_H2_STEPS, step, core::ptr::null_mut());
    if w.total_left > 0 {
        // Out of steps, or bytes that cannot be read where a frame header is due: report the
        // rest as uncopied (userspace counts the lost framing) and stop following this side.
        w.covered += w.total_left;
        w.side.lost = 1;
    }
    if w.covered > 0 {
        flush(w);
    }
    f.sides[d] = w.side;
    Some(w.gap != 0)
}

/// Whether the next byte of this side starts a frame header.
#[inline(always)]
fn at_frame_start(side: &Side) -> u64 {
    (side.left == 0 && side.hdr_have == 0) as u64
}

/// One step of the walk; returns 1 to stop.
#[inline(never)]
extern "C" fn step(_i: u32, _ctx: *mut c_void) -> i64 {
    let Some(w) = WALK.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU slot, exclusively ours for this program run.
    let w = unsafe { &mut *w };
    if w.total_left == 0 {
        return 1;
    }
    if w.seg_left == 0 {
        return next_segment(w);
    }
    if w.side.left > 0 {
        let mut n = w.side.left as u64;
        if n > w.seg_left {
            n = w.seg_left;
        }
        if w.side.copy != 0 && w.readable != 0 {
            return copy_run(w, n);
        }
        w.chunk_skipped += n;
        advance(w, n);
        w.side.left -= n as u32;
        return 0;
    }
    if w.readable == 0 {
        // A frame header inside bytes we cannot see: framing is lost.
        return 1;
    }
    frame_header(w)
}

#[inline(always)]
fn advance(w: &mut Walk, n: u64) {
    w.seg_base += n;
    w.seg_left -= n;
    w.total_left -= n;
    w.covered += n;
}

fn next_segment(w: &mut Walk) -> i64 {
    if w.iov_next >= w.iov_count {
        return 1;
    }
    let Some((base, len)) = iovec_entry(w.iov, w.iov_next) else {
        // The rest cannot be read: counted on like sendfile bytes, or framing is lost.
        w.readable = 0;
        w.seg_left = w.total_left;
        return 0;
    };
    w.iov_next += 1;
    w.seg_base = base;
    w.seg_left = if len < w.total_left {
        len
    } else {
        w.total_left
    };
    0
}

/// Room left in the record for `n` more copied bytes (a new chunk header may be needed).
#[inline(always)]
fn room(w: &Walk) -> u64 {
    let cap = if w.cap > MAX_PAYLOAD as u64 {
        MAX_PAYLOAD as u64
    } else {
        w.cap
    };
    let used = w.out + H2_CHUNK_HEADER as u64;
    if used >= cap { 0 } else { cap - used }
}

/// Copies `n` bytes at the current position into the record (as many as fit).
fn copy_run(w: &mut Walk, n: u64) -> i64 {
    let mut n = n;
    let r = room(w);
    if r == 0 {
        flush(w);
        return 0;
    }
    if n > r {
        n = r;
    }
    if !append(w, n) {
        // Unreadable user memory: count the run as uncopied; a header block loses its tail.
        w.chunk_skipped += n;
    }
    advance(w, n);
    w.side.left -= n as u32;
    0
}

/// Reads (the rest of) a frame header, copying it into the record.
fn frame_header(w: &mut Walk) -> i64 {
    let mut n = (FRAME_HEADER - w.side.hdr_have as u32) as u64;
    if n > w.seg_left {
        n = w.seg_left;
    }
    if room(w) < FRAME_HEADER as u64 {
        flush(w);
        return 0;
    }
    if !append(w, n) {
        // Framing cannot go on without the header's bytes.
        return 1;
    }
    advance(w, n);
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // The header's bytes now end the record. Remember those that carry length and type; the
    // rest of the header is not needed here.
    let at = (w.out - n) & (MAX_PAYLOAD as u64 - 1);
    // SAFETY: `at` < MAX_PAYLOAD and `i` < 16 stay inside the 2x scratch payload.
    let base = unsafe { (*ev).payload.as_ptr().add(at as usize) };
    let have = w.side.hdr_have as u64;
    let mut i = 0u64;
    while i < 4 {
        let h = have + i;
        if i < n && h < 4 {
            // SAFETY: as above.
            w.side.hdr[(h & 3) as usize] = unsafe { *base.add((i & 15) as usize) };
        }
        i += 1;
    }
    if have + n < FRAME_HEADER as u64 {
        w.side.hdr_have = (have + n) as u8;
        return 0;
    }
    let h = w.side.hdr;
    w.side.hdr_have = 0;
    w.side.left = (h[0] as u32) << 16 | (h[1] as u32) << 8 | h[2] as u32;
    // Userspace decodes HEADERS, RST_STREAM, SETTINGS, PUSH_PROMISE, GOAWAY and CONTINUATION;
    // DATA, PRIORITY, PING, WINDOW_UPDATE and unknown types are only counted.
    w.side.copy = matches!(h[3], 1 | 3 | 4 | 5 | 7 | 9) as u8;
    0
}

/// Copies `n` user bytes to the end of the record, opening a new chunk after skipped bytes.
fn append(w: &mut Walk, n: u64) -> bool {
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    if w.chunk_skipped > 0 {
        close_chunk(w);
        w.chunk_at = w.out;
        w.out += H2_CHUNK_HEADER as u64;
        w.chunk_copied = 0;
        w.chunk_skipped = 0;
    }
    let o = (w.out & (MAX_PAYLOAD as u64 - 1)) as usize;
    let len = (n & (MAX_PAYLOAD as u64 - 1)) as u32;
    if len == 0 {
        return true;
    }
    // SAFETY: `o` < MAX_PAYLOAD and `len` < MAX_PAYLOAD, inside the 2x scratch payload; the
    // helper checks the user source.
    let r = unsafe {
        probe_read_user_raw(
            (*ev).payload.as_mut_ptr().add(o) as *mut c_void,
            len,
            w.seg_base as *const c_void,
        )
    };
    if r != 0 {
        bump(stat::READ_FAULTS);
        return false;
    }
    w.out += len as u64;
    w.chunk_copied += len as u64;
    true
}

fn close_chunk(w: &mut Walk) {
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let at = (w.chunk_at & (MAX_PAYLOAD as u64 - 1)) as usize;
    let mut hdr = [0u8; 8];
    hdr[..4].copy_from_slice(&(w.chunk_copied as u32).to_le_bytes());
    hdr[4..].copy_from_slice(&(w.chunk_skipped as u32).to_le_bytes());
    // SAFETY: `at` < MAX_PAYLOAD, so the 8 bytes stay inside the 2x scratch payload.
    unsafe { core::ptr::write_unaligned((*ev).payload.as_mut_ptr().add(at) as *mut [u8; 8], hdr) };
}

/// Emits the record built so far and starts the next one. A record that cannot be output
/// makes the next one carry the gap flag, so userspace knows its stream has a hole.
fn flush(w: &mut Walk) {
    close_chunk(w);
    if let Some(ev) = SCRATCH.get_ptr_mut(0) {
        // SAFETY: per-CPU scratch slot, exclusively ours for this program run.
        let ev = unsafe { &mut *ev };
        ev.header.total_len = w.covered;
        ev.header.captured_len = w.out as u32;
        ev.header.flags |= event_flags::FRAMED;
        if w.at_frame != 0 {
            ev.header.flags |= event_flags::FRAME_START;
        } else {
            ev.header.flags &= !event_flags::FRAME_START;
        }
        let mut len = size_of::<EventHeader>() as u64 + w.out;
        if len > (size_of::<EventHeader>() + MAX_PAYLOAD) as u64 {
            len = (size_of::<EventHeader>() + MAX_PAYLOAD) as u64;
        }
        // SAFETY: `len` is bounded by the size of the scratch record.
        let bytes =
            unsafe { core::slice::from_raw_parts(ev as *const _ as *const u8, len as usize) };
        if emit(bytes) {
            ev.header.flags &= !event_flags::GAP;
            w.gap = 0;
        } else {
            ev.header.flags |= event_flags::GAP;
            w.gap = 1;
        }
    }
    w.covered = 0;
    w.at_frame = at_frame_start(&w.side);
    w.out = H2_CHUNK_HEADER as u64;
    w.chunk_at = 0;
    w.chunk_copied = 0;
    w.chunk_skipped = 0;
}
