//! The host's mapping of a helper's shared region: the only unsafe code of
//! this crate (a mapping, raw byte copies into and out of it, the unmap),
//! each block with its SAFETY comment.
#![allow(unsafe_code)]

use std::os::fd::OwnedFd;

use nix::errno::Errno;

use crate::error::LaunchError;
use crate::launch::spawn::lift_above_spawn_targets;

/// The host's mapping of a helper's shared region: a memfd sealed against
/// shrinking and growing (a hostile helper cannot truncate it under the
/// host's feet), mapped shared and read-write. Accessed only by copying
/// bytes in and out, never through references: the helper can change the
/// bytes at any moment, so the host copies them out before it looks at them.
#[derive(Debug)]
pub(crate) struct HostRegion {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the value owns its mapping outright (made in `create`, unmapped
// only in Drop) and holds no thread-bound state; the raw pointer is just its
// address. Moving it to another thread moves that ownership.
unsafe impl Send for HostRegion {}
// SAFETY: `&HostRegion` offers only `write` and `read`, which copy bytes
// between the mapping and private buffers. Which bytes a thread may touch is
// decided outside: a request slot is written only by the caller that holds
// it (slots are handed out under the connection's lock), and a response
// window is read only by the party completing that slot's call. Even an
// overlap would not be undefined behaviour of the host's own memory: the
// mapping is shared with another process that may write it at any time, so
// every copy out is already treated as yielding arbitrary bytes, and no
// reference into the mapping is ever created.
unsafe impl Sync for HostRegion {}

impl HostRegion {
    /// Creates the sealed memfd of `size` bytes and maps it; returns the
    /// memfd (numbered 4 or above, for the dup2 onto the helper's fd 3).
    pub(crate) fn create(size: u64) -> Result<(OwnedFd, HostRegion), LaunchError> {
        let err = |what: &'static str, source: std::io::Error| LaunchError::Region { what, source };
        let len = usize::try_from(size)
            .ok()
            .and_then(std::num::NonZeroUsize::new)
            .ok_or_else(|| {
                err(
                    "size",
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, size.to_string()),
                )
            })?;
        let memfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .close_on_exec(true)
            .create("sandpool-region")
            .map_err(|e| err("memfd_create", std::io::Error::other(e)))?;
        memfd
            .as_file()
            .set_len(size)
            .map_err(|e| err("ftruncate", e))?;
        memfd
            .add_seals(&[
                memfd::FileSeal::SealShrink,
                memfd::FileSeal::SealGrow,
                memfd::FileSeal::SealSeal,
            ])
            .map_err(|e| err("seal", std::io::Error::other(e)))?;
        // SAFETY: a fresh mapping chosen by the kernel (no address hint), so
        // it aliases nothing Rust knows about; the memfd is sealed against
        // shrinking, so no page can vanish under the mapping (no SIGBUS).
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                len,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                memfd.as_file(),
                0,
            )
        }
        .map_err(|e| err("mmap", e.into()))?;
        let region = HostRegion {
            ptr: ptr.cast(),
            len: len.get(),
        };
        let memfd = lift_above_spawn_targets(memfd.as_file()).map_err(|e| err("dup", e))?;
        Ok((memfd, region))
    }

    pub(crate) fn len(&self) -> u64 {
        self.len as u64
    }

    fn range(&self, offset: u64, len: u64) -> Option<usize> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        (end <= self.len).then_some(start)
    }

    /// Copies `bytes` to `offset`; EFAULT if that leaves the region.
    pub(crate) fn write(&self, offset: u64, bytes: &[u8]) -> Result<(), Errno> {
        let start = self
            .range(offset, bytes.len() as u64)
            .ok_or(Errno::EFAULT)?;
        // SAFETY: the destination lies within the mapping (checked) and
        // cannot overlap `bytes`, which is this process's own memory. The
        // helper may read those bytes meanwhile; it gets whatever it gets,
        // and only from the request half, which is not granted to it yet.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.as_ptr().wrapping_add(start),
                bytes.len(),
            )
        };
        Ok(())
    }

    /// Copies `len` bytes at `offset` out into a new buffer. The caller has
    /// bounds-checked the range against the response half; a range outside
    /// the mapping is refused anyway (EFAULT), and a buffer that cannot be
    /// allocated is an error (ENOMEM), never an abort of the host.
    pub(crate) fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, Errno> {
        let start = self.range(offset, len).ok_or(Errno::EFAULT)?;
        let count = len as usize;
        let mut out = Vec::new();
        out.try_reserve_exact(count).map_err(|_| Errno::ENOMEM)?;
        // SAFETY: the source lies within the mapping (checked) and the
        // destination is the reserved, unaliased spare capacity of `out`,
        // `count` bytes long. The helper, another process, may be writing
        // the source bytes during the copy: Rust's memory model cannot
        // express a writer in another process, so the copy is treated as
        // producing arbitrary bytes, which is all `u8` needs, and the bytes
        // are only interpreted after they have landed in this private buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().wrapping_add(start),
                out.as_mut_ptr(),
                count,
            )
        };
        // SAFETY: the copy above initialised exactly `count` bytes of the
        // capacity reserved for them.
        unsafe { out.set_len(count) };
        Ok(out)
    }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `create`, unmapped once, here;
        // it was only ever accessed by copies, so nothing borrows it.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
}
