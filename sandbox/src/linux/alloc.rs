//! A global allocator for helpers whose libc's malloc does not suit a
//! sandboxed helper: musl's (mallocng) maps and unmaps its slot groups as
//! they fill and empty, which took about a quarter of the reference
//! helper's start-up CPU here.
//!
//! Small blocks come from dlmalloc (pure Rust, std's allocator on wasm).
//! dlmalloc alone keeps large blocks inside its heap segments and hands a
//! freed segment back only now and then, so a helper that once held a large
//! payload kept its memory, and growing one copied it into a new segment:
//! the memory limits (`max_helper_memory`, the address-space rlimit) were
//! reached at about half the payload a glibc helper handles. So, as glibc's
//! malloc does above its mmap threshold, each block of at least
//! [`MMAP_THRESHOLD`] bytes gets a mapping of its own: `munmap` when it is
//! freed, `mremap` when it grows or shrinks (the kernel moves the pages, no
//! copy). Every call it makes (`mmap` without `PROT_EXEC`, `mremap`,
//! `munmap`) is in the helper's default seccomp policy.

use std::alloc::{GlobalAlloc, Layout};

/// Blocks of at least this size get a mapping of their own.
pub const MMAP_THRESHOLD: usize = 256 * 1024;

/// The alignment every mapping has (the smallest page size).
const PAGE: usize = 4096;

/// The allocator: `#[global_allocator] static ALLOCATOR: HelperAllocator =
/// HelperAllocator;` in a helper's binary (the reference helper sets it on
/// musl). See the module documentation.
#[derive(Clone, Copy, Debug, Default)]
pub struct HelperAllocator;

/// Where the small blocks come from.
static SMALL: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// Whether a block of `layout` has a mapping of its own. A function of the
/// layout alone, so `dealloc` and `realloc` (which get the layout the block
/// was allocated with) always agree with `alloc`.
fn is_mapped(layout: &Layout) -> bool {
    layout.size() >= MMAP_THRESHOLD && layout.align() <= PAGE
}

/// A fresh private anonymous mapping of `size` bytes (zeroed), or null.
fn map(size: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping at an address of the kernel's
    // choosing touches no existing memory; the result is checked for
    // MAP_FAILED before use.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        std::ptr::null_mut()
    } else {
        ptr.cast()
    }
}

// SAFETY: `alloc` returns null or a block of at least `layout.size()`
// bytes aligned to `layout.align()`, which nothing else uses until it is
// given back: dlmalloc's blocks by dlmalloc's own contract, a mapped block
// by being a fresh mapping (page-aligned, and mapped only for alignments up
// to a page). `dealloc` and `realloc` route a block by its layout exactly as
// `alloc` did (`is_mapped`), so each block goes back to where it came from.
unsafe impl GlobalAlloc for HelperAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_mapped(&layout) {
            map(layout.size())
        } else {
            // SAFETY: the caller's contract for `alloc` (a non-zero size)
            // is the one dlmalloc's needs.
            unsafe { SMALL.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_mapped(&layout) {
            // A fresh anonymous mapping reads as zeroes.
            map(layout.size())
        } else {
            // SAFETY: as in `alloc`.
            unsafe { SMALL.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_mapped(&layout) {
            // SAFETY: the caller gives back a block this allocator
            // returned for `layout`, so a mapping of `layout.size()` bytes
            // (rounded up to pages by the kernel, as at `mmap`) at `ptr`
            // that nothing uses any more.
            unsafe { libc::munmap(ptr.cast(), layout.size()) };
        } else {
            // SAFETY: a block dlmalloc returned for `layout`.
            unsafe { SMALL.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees that `new_size`, rounded up to
        // `layout.align()`, does not overflow isize, and the alignment is
        // `layout`'s, a valid one.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (is_mapped(&layout), is_mapped(&new_layout)) {
            (false, false) => {
                // SAFETY: a block dlmalloc returned for `layout`, under the
                // caller's contract for `realloc`.
                unsafe { SMALL.realloc(ptr, layout, new_size) }
            }
            (true, true) => {
                // SAFETY: `ptr` is this allocator's mapping of
                // `layout.size()` bytes; MREMAP_MAYMOVE lets the kernel move
                // it (the caller uses only the returned pointer after a
                // success, and the old one stays valid after a failure).
                let moved = unsafe {
                    libc::mremap(ptr.cast(), layout.size(), new_size, libc::MREMAP_MAYMOVE)
                };
                if moved == libc::MAP_FAILED {
                    std::ptr::null_mut()
                } else {
                    moved.cast()
                }
            }
            _ => {
                // Across the threshold: a block of the other kind, the
                // bytes copied, the old block given back.
                // SAFETY: `new_layout` has a non-zero size (the caller's
                // contract for `realloc`).
                let new = unsafe { self.alloc(new_layout) };
                if !new.is_null() {
                    // SAFETY: both blocks are live, distinct and at least
                    // this long.
                    unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
                    // SAFETY: the old block, given back with the layout it
                    // was allocated with, and not used after.
                    unsafe { self.dealloc(ptr, layout) };
                }
                new
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The mappings of this process that contain `ptr` (by /proc/self/maps).
    fn mapping_of(ptr: *const u8) -> Option<(usize, usize)> {
        let addr = ptr as usize;
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter_map(|line| {
                let range = line.split_whitespace().next()?;
                let (start, end) = range.split_once('-')?;
                Some((
                    usize::from_str_radix(start, 16).ok()?,
                    usize::from_str_radix(end, 16).ok()?,
                ))
            })
            .find(|(start, end)| (*start..*end).contains(&addr))
    }

    #[test]
    fn blocks_keep_their_bytes_through_every_kind_of_realloc() {
        let allocator = HelperAllocator;
        let sizes = [
            16,
            4000,
            MMAP_THRESHOLD - 1,
            MMAP_THRESHOLD,
            3 * MMAP_THRESHOLD + 5,
            1 << 20,
            100,
        ];
        let align = 16;
        let mut layout = Layout::from_size_align(sizes[0], align).unwrap();
        // SAFETY: non-zero size; the block is used within its length.
        let mut ptr = unsafe { allocator.alloc(layout) };
        assert!(!ptr.is_null());
        // SAFETY: `ptr` holds `layout.size()` bytes.
        unsafe { std::ptr::write_bytes(ptr, 0xA5, layout.size()) };
        for &size in &sizes[1..] {
            // SAFETY: a live block of `layout`, a non-zero new size.
            let grown = unsafe { allocator.realloc(ptr, layout, size) };
            assert!(!grown.is_null(), "{} -> {size}", layout.size());
            assert_eq!(grown as usize % align, 0);
            let kept = layout.size().min(size);
            // SAFETY: `grown` holds at least `kept` bytes.
            let bytes = unsafe { std::slice::from_raw_parts(grown, kept) };
            assert!(
                bytes.iter().all(|b| *b == 0xA5),
                "{} -> {size}",
                layout.size()
            );
            // SAFETY: `grown` holds `size` bytes.
            unsafe { std::ptr::write_bytes(grown, 0xA5, size) };
            ptr = grown;
            layout = Layout::from_size_align(size, align).unwrap();
        }
        // SAFETY: the live block and its layout.
        unsafe { allocator.dealloc(ptr, layout) };
    }

    /// Runs in a child process of its own (this test binary again, this
    /// test alone): in the test process, another test's thread could map
    /// memory into the hole the free leaves before the check.
    #[test]
    #[allow(clippy::disallowed_methods)] // runs this test binary, not a helper
    fn a_large_block_is_a_mapping_of_its_own_and_is_gone_when_freed() {
        const CHILD: &str = "SANDPOOL_ALLOC_TEST_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "linux::alloc::tests::a_large_block_is_a_mapping_of_its_own_and_is_gone_when_freed",
                    "--test-threads=1",
                ])
                .env(CHILD, "1")
                .status()
                .unwrap();
            assert!(status.success(), "{status}");
            return;
        }
        let allocator = HelperAllocator;
        let layout = Layout::from_size_align(4 * MMAP_THRESHOLD, 8).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { allocator.alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        assert_eq!(ptr as usize % PAGE, 0, "page-aligned");
        // SAFETY: `ptr` holds `layout.size()` bytes.
        let bytes = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
        assert!(bytes.iter().all(|b| *b == 0), "zeroed");
        // The kernel may merge it with a neighbouring anonymous mapping, so
        // only its being mapped whole is checked.
        let (_, end) = mapping_of(ptr).unwrap();
        assert!(end >= ptr as usize + layout.size());
        // SAFETY: the live block and its layout.
        unsafe { allocator.dealloc(ptr, layout) };
        assert_eq!(mapping_of(ptr), None, "unmapped when freed");
    }

    #[test]
    fn small_and_over_aligned_blocks_come_from_the_heap() {
        let allocator = HelperAllocator;
        for layout in [
            Layout::from_size_align(64, 8).unwrap(),
            Layout::from_size_align(MMAP_THRESHOLD, 2 * PAGE).unwrap(),
        ] {
            assert!(!is_mapped(&layout));
            // SAFETY: non-zero size.
            let ptr = unsafe { allocator.alloc(layout) };
            assert!(!ptr.is_null());
            assert_eq!(ptr as usize % layout.align(), 0);
            // SAFETY: the live block and its layout.
            unsafe { allocator.dealloc(ptr, layout) };
        }
    }
}
