//! The global allocator: mimalloc, asked for a plain block whenever a plain block is aligned
//! enough. The `mimalloc` crate sends every request through `mi_malloc_aligned`, and
//! mimalloc 3 serves that from its fast path only while the size class's current page has a
//! free block; otherwise, unless the size is a power of two, it over-allocates (a block of a
//! larger class, aligned inside) and never refills the class's own page, so every later request
//! of that size takes the slow path too.
use std::alloc::{GlobalAlloc, Layout};

use libmimalloc_sys as mi;

/// mimalloc's blocks of 16 bytes or more are 16-aligned, smaller ones 8-aligned: size classes
/// are whole words, two-word multiples from 16 up, and a page's first block is 16-aligned
/// (`MI_MAX_ALIGN_SIZE`, `MI_PAGE_MIN_START_BLOCK_ALIGN` on 64-bit).
const PLAIN_ALIGN: usize = 16;

/// A plain block of `size` bytes has the alignment (a block is at least as aligned as the
/// largest power of two not above its size, up to 16).
fn plain(align: usize, size: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

pub struct MiMalloc;

// SAFETY: every method hands the layout's size and alignment to the mimalloc function made for
// it, and mimalloc returns null on failure as `GlobalAlloc` requires; `plain` asks for a plain
// block only when one is aligned as the layout needs (above). mimalloc frees and resizes
// blocks from either kind of allocation.
unsafe impl GlobalAlloc for MiMalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: see the impl.
        unsafe {
            if plain(align, size) {
                mi::mi_malloc(size).cast()
            } else {
                mi::mi_malloc_aligned(size, align).cast()
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: see the impl.
        unsafe {
            if plain(align, size) {
                mi::mi_zalloc(size).cast()
            } else {
                mi::mi_zalloc_aligned(size, align).cast()
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract).
        unsafe { mi::mi_free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        // SAFETY: see the impl; `ptr` came from this allocator (the caller's contract).
        unsafe {
            if plain(align, new_size) {
                mi::mi_realloc(ptr.cast(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast(), new_size, align).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size class a span's allocations use, at every alignment up to past the plain
    /// limit, many times each so that pages fill and new ones are taken.
    #[test]
    fn blocks_are_aligned_and_keep_their_contents_when_resized() {
        let a = MiMalloc;
        for align in [1, 2, 4, 8, 16, 32, 64] {
            for size in (1..600).chain([1000, 1024, 1500, 4096, 5000, 70_000]) {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                let mut live = Vec::new();
                for i in 0..300 {
                    // SAFETY: a non-zero size; each block is freed with its layout below.
                    let p = unsafe { a.alloc(layout) };
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    // SAFETY: `size` bytes were allocated at `p`.
                    unsafe { p.write_bytes(i as u8, size) };
                    live.push(p);
                }
                for (i, p) in live.into_iter().enumerate() {
                    let grown = size * 3 + 5;
                    // SAFETY: `p` was allocated with `layout`; `grown` is not zero.
                    let q = unsafe { a.realloc(p, layout, grown) };
                    assert_eq!(q as usize % align, 0, "resized {size} align {align}");
                    // SAFETY: the first `size` bytes were kept by the resize.
                    let kept = unsafe { std::slice::from_raw_parts(q, size) };
                    assert!(kept.iter().all(|&b| b == i as u8));
                    let z = Layout::from_size_align(grown, align).expect("valid");
                    // SAFETY: `q` is the resized block of layout `z`.
                    unsafe { a.dealloc(q, z) };
                }
                // SAFETY: as above.
                let z = unsafe { a.alloc_zeroed(layout) };
                assert_eq!(z as usize % align, 0);
                // SAFETY: `size` zeroed bytes at `z`, then freed with its layout.
                unsafe {
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
