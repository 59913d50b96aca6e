//! Loops every verifier of the kernel matrix accepts.
//!
//! `bpf_loop` (5.17+) has the verifier check a loop body once, however many times it runs, so
//! long walks (every HTTP/2 frame of a large read) are cheap to verify. Older kernels reject a
//! program that so much as references it ("number of funcs in func_info doesn't match number of
//! subprogs" on 5.10), so each entry point is also built with plain bounded loops, which the
//! verifier unrolls: those walk fewer steps (see the `BOUNDED_*` limits), and userspace loads
//! that build only where the helper is missing.
use core::ffi::c_void;

use aya_ebpf::helpers::generated::bpf_loop;

/// A loop body: gets the iteration index and the caller's context; returns 1 to stop.
pub type Body = extern "C" fn(u32, *mut c_void) -> i64;

/// iovec segments the bounded build walks (the helper build walks `kspan_common::MAX_IOV`).
pub const BOUNDED_IOV: u32 = 8;
/// HTTP/2 walk steps per syscall in the bounded build (the helper build takes 8192).
pub const BOUNDED_H2_STEPS: u32 = 32;

/// Runs `body` up to `helper_n` times through `bpf_loop` when `BPF_LOOP`, else up to
/// `bounded_n` times in a bounded loop.
#[inline(always)]
pub fn repeat<const BPF_LOOP: bool>(helper_n: u32, bounded_n: u32, body: Body, ctx: *mut c_void) {
    if BPF_LOOP {
        // SAFETY: `body` is a BPF subprogram with the callback signature the helper expects.
        unsafe { bpf_loop(helper_n, body as *mut c_void, ctx, 0) };
    } else {
        let mut i = 0;
        while i < bounded_n {
            if body(i, ctx) != 0 {
                break;
            }
            i += 1;
        }
    }
}
