//! Closing every inherited file descriptor at or above 3.

use super::status::ProcStatus;
use std::io;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::FdCloseMethod;
use sandpool_protocol::FdAccess;

/// How [`close_inherited_fds`] goes about it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FdCloseStrategy {
    /// `close_range(3, ~0, 0)`, falling back to a `/proc/self/fd` walk only if
    /// the kernel lacks the syscall (ENOSYS).
    #[default]
    Auto,
    /// Always walk `/proc/self/fd` (for testing the reported slow path).
    ProcWalk,
}

/// What [`close_inherited_fds`] did. The helper reports it in its Hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdCloseReport {
    /// The method that was used.
    pub method: FdCloseMethod,
    /// How many fds at or above 3 were open and got closed.
    pub closed: u32,
    /// Time spent counting and closing.
    pub elapsed: Duration,
}

/// Why inherited fds could not be closed. The helper must not go on.
#[derive(Debug, Error)]
pub enum CloseFdsError {
    /// `close_range` failed with something other than ENOSYS.
    #[error("close_range(3, ~0, 0) failed: {0}")]
    CloseRange(io::Error),
    /// The fallback could not list `/proc/self/fd`.
    #[error("listing /proc/self/fd for the close_range fallback failed: {0}")]
    ProcWalk(io::Error),
    /// The fallback could not close one fd.
    #[error("closing inherited fd {fd} failed: {source}")]
    Close {
        /// The fd.
        fd: i32,
        /// The error.
        source: io::Error,
    },
}

/// Closes every file descriptor at or above 3 and reports how.
///
/// This is a process-startup routine: call it before anything in the process
/// opens a file, a pipe or a socket of its own, because every fd at or above 3
/// is closed whoever holds it. The sandpool helper runtime calls it first thing
/// (after mapping its shared region), when the only fds are the inherited ones
/// and the protocol's stdin, stdout and stderr.
pub fn close_inherited_fds(strategy: FdCloseStrategy) -> Result<FdCloseReport, CloseFdsError> {
    close_inherited_fds_with(strategy, &ProcStatus::read())
}

/// [`close_inherited_fds`], counting the fds it closes up to the fd table's
/// size in `status`: a reading taken since this process last opened an fd
/// (the table never shrinks, so a reading from before the close is exact
/// for the count). The report's time covers counting and closing, not the
/// reading.
pub fn close_inherited_fds_with(
    strategy: FdCloseStrategy,
    status: &ProcStatus,
) -> Result<FdCloseReport, CloseFdsError> {
    let start = Instant::now();
    let open = count_open_fds_from(3, status.fd_size);
    let method = match strategy {
        FdCloseStrategy::Auto => match close_range_from(3) {
            Ok(()) => FdCloseMethod::CloseRange,
            Err(err) if err.raw_os_error() == Some(libc::ENOSYS) => {
                walk_and_close()?;
                FdCloseMethod::ProcSelfFdWalk
            }
            Err(err) => return Err(CloseFdsError::CloseRange(err)),
        },
        FdCloseStrategy::ProcWalk => {
            walk_and_close()?;
            FdCloseMethod::ProcSelfFdWalk
        }
    };
    Ok(FdCloseReport {
        method,
        closed: open,
        elapsed: start.elapsed(),
    })
}

/// `close_range(first, ~0, 0)`: closes every fd from `first` up.
///
/// # References
/// - <https://man7.org/linux/man-pages/man2/close_range.2.html>
fn close_range_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range takes two integers and a flag word and touches no
    // memory of ours. Closing fds is not a memory-safety hazard in itself; the
    // I/O-safety hazard (closing an fd some Rust object owns) is excluded by
    // the documented contract of `close_inherited_fds`: it runs at startup,
    // before the process owns any fd at or above `first`.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The reported slow path: list `/proc/self/fd`, then close each fd >= 3.
fn walk_and_close() -> Result<(), CloseFdsError> {
    let mut fds = Vec::new();
    // The directory stream holds an fd of its own while it is open; it is in
    // the listing too, and is closed (dropped) before the loop below runs.
    for entry in std::fs::read_dir("/proc/self/fd").map_err(CloseFdsError::ProcWalk)? {
        let entry = entry.map_err(CloseFdsError::ProcWalk)?;
        if let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
            && fd >= 3
        {
            fds.push(fd);
        }
    }
    for fd in fds {
        // SAFETY: close takes an integer and touches no memory of ours; the fds
        // are inherited ones nothing in this process owns (contract of
        // `close_inherited_fds`). The directory's own fd is already closed, so
        // its EBADF is expected and ignored below.
        let rc = unsafe { libc::close(fd) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EBADF) {
                return Err(CloseFdsError::Close { fd, source: err });
            }
        }
    }
    Ok(())
}

/// Why an open fd could not be described.
#[derive(Debug, Error)]
pub enum DescribeFdError {
    /// `fcntl(F_GETFL)` failed: the fd is not open.
    #[error("fd {fd} is not open: {source}")]
    NotOpen {
        /// The fd.
        fd: i32,
        /// The error.
        source: io::Error,
    },
    /// `/proc/self/fd/N` could not be read.
    #[error("reading /proc/self/fd/{fd} failed: {source}")]
    Readlink {
        /// The fd.
        fd: i32,
        /// The error.
        source: io::Error,
    },
    /// The access mode bits were not one of read, write, read-write.
    #[error("fd {fd} has access mode {bits:#o}, not read, write or read-write")]
    Access {
        /// The fd.
        fd: i32,
        /// `flags & O_ACCMODE`.
        bits: u32,
    },
}

/// What open fd `fd` of this process refers to (the target of
/// `/proc/self/fd/N`, as the host will read it in `/proc/PID/fd/N`) and
/// how it was opened (`fcntl(F_GETFL) & O_ACCMODE`).
pub fn describe_fd(fd: i32) -> Result<(Vec<u8>, FdAccess), DescribeFdError> {
    // SAFETY: fcntl(F_GETFL) takes an integer and a command, touches no
    // memory of ours and changes nothing: on a closed fd it fails (EBADF).
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(DescribeFdError::NotOpen {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    let bits = (flags & libc::O_ACCMODE) as u32;
    let access = FdAccess::from_accmode(bits).ok_or(DescribeFdError::Access { fd, bits })?;
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|source| DescribeFdError::Readlink { fd, source })?;
    Ok((target.into_os_string().into_encoded_bytes(), access))
}

/// How many fds at or above 3 are open now (after [`close_inherited_fds`]:
/// any that a library opened since and kept).
pub fn count_open_fds_above_stdio() -> u32 {
    count_open_fds_from(3, ProcStatus::read().fd_size)
}

/// Counts the open fds from `first` up to the size of the fd table, with
/// `poll` on batches of 1024 descriptors: a closed fd comes back POLLNVAL.
/// One syscall per 1024 slots of the table, no fd opened for the count.
///
/// The table size (`table_size`, `FDSize` in `/proc/self/status`) grows with
/// the highest fd the host ever had open, so the count costs about what
/// posix_spawn already paid to copy that table; the soft `RLIMIT_NOFILE`
/// (often 20,000 or more) is only the fallback bound if the status file
/// could not be read.
fn count_open_fds_from(first: i32, table_size: Option<u64>) -> u32 {
    let limit = table_size
        .or_else(|| {
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .ok()
                .map(|(soft, _)| soft)
        })
        .unwrap_or(1024)
        .min(1 << 20) as i32;
    let mut batch = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 1024];
    let mut open = 0u32;
    let mut next = first;
    while next < limit {
        let n = ((limit - next) as usize).min(batch.len());
        for (i, slot) in batch[..n].iter_mut().enumerate() {
            *slot = libc::pollfd {
                fd: next + i as i32,
                events: 0,
                revents: 0,
            };
        }
        // SAFETY: `batch[..n]` is a valid, initialised array of `n` pollfd
        // structs that lives across the call; poll writes only their
        // `revents` fields. A zero timeout means it never blocks.
        let rc = unsafe { libc::poll(batch.as_mut_ptr(), n as libc::nfds_t, 0) };
        if rc < 0 {
            break;
        }
        open += batch[..n]
            .iter()
            .filter(|slot| slot.revents & libc::POLLNVAL == 0)
            .count() as u32;
        next += n as i32;
    }
    open
}
