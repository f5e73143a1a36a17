//! The shared memory region a host may hand the helper as fd 3.

use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use nix::sys::mman::{MapFlags, ProtFlags, mmap};
use thiserror::Error;

/// The fd number the host places the region at.
pub const REGION_FD: i32 = 3;

/// The region could not be mapped, or an access fell outside it.
#[derive(Debug, Error)]
pub enum RegionError {
    /// fd 3 is not open: the host did not pass a region.
    #[error("the shared region fd {REGION_FD} is not open")]
    NotPassed,
    /// The size is zero or does not fit this address space.
    #[error("invalid shared region size {0}")]
    BadSize(u64),
    /// fd 3 is not a memfd of at least the announced size, sealed against
    /// shrinking: mapping it could fault.
    #[error("fd {REGION_FD} is not a sealed shared region of {size} bytes ({detail})")]
    NotARegion {
        /// The size announced in the spec.
        size: u64,
        /// What is wrong.
        detail: String,
    },
    /// mmap failed.
    #[error("mapping the shared region failed: {0}")]
    Map(nix::errno::Errno),
    /// An access outside the region.
    #[error("region access {offset}+{len} is outside its {size} bytes")]
    OutOfBounds {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Region size.
        size: usize,
    },
}

/// A shared, writable mapping of the region. Accessed only by copying
/// bytes in and out (never through references), because the host may
/// change the bytes at any time.
#[derive(Debug)]
pub struct SharedRegion {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; it is only read
// and written through raw byte copies, which are as thread-safe as the
// callers' own synchronisation (the helper runtime is single-threaded).
unsafe impl Send for SharedRegion {}

impl SharedRegion {
    /// Maps fd 3 (`size` bytes, shared, read-write, never executable). Call
    /// it before [`crate::close_inherited_fds`], which closes fd 3; the
    /// mapping outlives the fd.
    pub fn map_passed(size: u64) -> Result<SharedRegion, RegionError> {
        let len = usize::try_from(size)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or(RegionError::BadSize(size))?;
        // SAFETY: fcntl(F_GETFD) on a raw number only reads descriptor flags.
        if unsafe { libc::fcntl(REGION_FD, libc::F_GETFD) } < 0 {
            return Err(RegionError::NotPassed);
        }
        // SAFETY: fd 3 is open (checked just above) and stays open while this
        // function runs, which is all this borrow is used for.
        let fd = unsafe { BorrowedFd::borrow_raw(REGION_FD) };
        // Only a file that is at least `size` long and cannot shrink can be
        // mapped without risking SIGBUS on a later access.
        let not_region = |detail: String| RegionError::NotARegion { size, detail };
        let stat = nix::sys::stat::fstat(fd).map_err(|e| not_region(format!("fstat: {e}")))?;
        if (stat.st_size as u64) < size {
            return Err(not_region(format!("it is {} bytes", stat.st_size)));
        }
        let seals = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GET_SEALS)
            .map_err(|e| not_region(format!("F_GET_SEALS: {e}")))?;
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(not_region("it is not sealed against shrinking".into()));
        }
        // SAFETY: a fresh mapping chosen by the kernel (no address hint), so
        // it aliases no memory Rust knows about. The host sealed the memfd
        // against shrinking, so no page of it can vanish under us (no SIGBUS).
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }
        .map_err(RegionError::Map)?;
        Ok(SharedRegion {
            ptr: ptr.cast(),
            len: len.get(),
        })
    }

    /// The region's size.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never: mapping requires a size).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: u64, len: u64) -> Result<usize, RegionError> {
        let out = || RegionError::OutOfBounds {
            offset,
            len,
            size: self.len,
        };
        let start = usize::try_from(offset).map_err(|_| out())?;
        let count = usize::try_from(len).map_err(|_| out())?;
        match start.checked_add(count) {
            Some(end) if end <= self.len => Ok(start),
            _ => Err(out()),
        }
    }

    /// Copies `len` bytes at `offset` into `out` (replacing its contents).
    pub fn read_into(&self, offset: u64, len: u64, out: &mut Vec<u8>) -> Result<(), RegionError> {
        let start = self.check(offset, len)?;
        out.clear();
        out.resize(len as usize, 0);
        // SAFETY: `start..start+len` lies within the mapping (checked) and the
        // destination is a distinct, initialised buffer of `len` bytes. The
        // host (another process) could write the source meanwhile; Rust's
        // memory model cannot express that, so the copy is treated as
        // producing arbitrary bytes, which is all `u8` needs.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().wrapping_add(start),
                out.as_mut_ptr(),
                len as usize,
            )
        };
        Ok(())
    }

    /// Copies `bytes` to `offset`.
    pub fn write(&self, offset: u64, bytes: &[u8]) -> Result<(), RegionError> {
        let start = self.check(offset, bytes.len() as u64)?;
        // SAFETY: the destination range lies within the mapping (checked)
        // and cannot overlap `bytes`, which is memory of this process's own;
        // the host reads it only after the frame that grants it arrives.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.as_ptr().wrapping_add(start),
                bytes.len(),
            )
        };
        Ok(())
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `map_passed`,
        // unmapped once, here; nothing borrows it (access is by copy only).
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
}
