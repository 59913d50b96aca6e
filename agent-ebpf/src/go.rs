//! Goroutines, for linking a Go service's outgoing calls to the request that made them: Go
//! moves goroutines between threads, so the thread of a syscall says nothing. Socket records
//! carry the goroutine register instead (`EventHeader::goroutine`); these probes, placed by
//! userspace on instructions the kernel emulates (`agent/src/golang.rs`), report who created
//! each goroutine and which goroutine each HTTP/1 client write is made for.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, uprobe},
    maps::LruHashMap,
    programs::ProbeContext,
};
use kspan_common::{GoRecord, kind};

use crate::{
    arch::{REG_GO_ARG0, REG_GO_ARG1, REG_GO_G},
    emit,
};

/// The creator passed to `runtime.newproc1`, by thread, until the new goroutine is queued.
/// (Both happen on the creating thread's system stack, with nothing in between that could
/// migrate it.) LRU: a probe missed in between leaves no entry for ever.
#[map]
static GO_SPAWNING: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

#[inline(always)]
fn reg(ctx: &ProbeContext, offset: usize) -> u64 {
    // SAFETY: a constant offset inside the probe's `struct pt_regs` context.
    unsafe { core::ptr::read_volatile((ctx.regs as *const u8).add(offset) as *const u64) }
}

#[inline(always)]
fn report(kind: u32, goroutine: u64, related: u64) {
    let record = GoRecord {
        kind,
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        goroutine,
        related,
    };
    emit(&record);
}

/// At `newproc.func1`'s call of `runtime.newproc1(fn, callergp, callerpc)`.
#[uprobe]
pub fn kspan_go_newproc(ctx: ProbeContext) -> u32 {
    let _ = GO_SPAWNING.insert(&bpf_get_current_pid_tgid(), &reg(&ctx, REG_GO_ARG1), 0);
    0
}

/// At `newproc.func1`'s call of `runtime.runqput(pp, newg, next)`: the goroutine is ready.
#[uprobe]
pub fn kspan_go_runqput(ctx: ProbeContext) -> u32 {
    let thread = bpf_get_current_pid_tgid();
    if let Some(parent) = GO_SPAWNING.get_ptr(&thread) {
        // SAFETY: pointer from a successful lookup, read before the entry is removed.
        let parent = unsafe { *parent };
        let _ = GO_SPAWNING.remove(&thread);
        report(kind::GO_SPAWN, reg(&ctx, REG_GO_ARG1), parent);
    }
    0
}

/// At the start of `net/http.(*persistConn).roundTrip(pc, req)`: this goroutine's request goes
/// to connection `pc`.
#[uprobe]
pub fn kspan_go_round_trip(ctx: ProbeContext) -> u32 {
    report(kind::GO_CALL, reg(&ctx, REG_GO_G), reg(&ctx, REG_GO_ARG0));
    0
}

/// At the start of `net/http.(*persistConn).writeLoop(pc)`: this goroutine writes `pc`'s
/// requests for as long as the connection lives.
#[uprobe]
pub fn kspan_go_write_loop(ctx: ProbeContext) -> u32 {
    report(kind::GO_WRITER, reg(&ctx, REG_GO_G), reg(&ctx, REG_GO_ARG0));
    0
}
