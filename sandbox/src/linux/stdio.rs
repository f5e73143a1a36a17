//! The protocol's pipes: stdin carries frames from the host, stdout frames to it.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use thiserror::Error;

static TAKEN: AtomicBool = AtomicBool::new(false);

/// The protocol's stdin or stdout could not be taken.
#[derive(Debug, Error)]
pub enum StdioError {
    /// Already taken once in this process.
    #[error("the protocol stdio was already taken")]
    AlreadyTaken,
    /// The fd is not open: the helper was not launched by a sandpool host.
    #[error("fd {fd} is not open ({source}): was this helper launched by a sandpool host?")]
    NotOpen {
        /// The fd.
        fd: i32,
        /// The error from `fcntl(F_GETFD)`.
        source: Errno,
    },
}

/// Takes ownership of fd 0 (frames in) and fd 1 (frames out) as unbuffered
/// `File`s, once per process. Reading and writing them costs exactly one
/// `read`/`write` syscall per call, on the only fds the seccomp policy lets
/// the helper read (0) and write (1, 2).
pub fn take_protocol_stdio() -> Result<(File, File), StdioError> {
    for fd in [0, 1] {
        check_open(fd)?;
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(StdioError::AlreadyTaken);
    }
    // SAFETY: fd 0 is open (checked above) and owned by no Rust object: std's
    // `Stdin` handle borrows fd 0 without ever closing it, and the `TAKEN`
    // flag makes this the only `OwnedFd` ever built for it in this process.
    let input = unsafe { OwnedFd::from_raw_fd(0) };
    // SAFETY: as for fd 0, with std's `Stdout` in the place of `Stdin`.
    let output = unsafe { OwnedFd::from_raw_fd(1) };
    Ok((File::from(input), File::from(output)))
}

fn check_open(fd: i32) -> Result<(), StdioError> {
    // SAFETY: fcntl(F_GETFD) on a raw number only reads the descriptor flags
    // and touches no memory of ours; on a closed fd it fails with EBADF. No
    // `BorrowedFd` is built, since the fd may not be open.
    let rc = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if rc < 0 {
        return Err(StdioError::NotOpen {
            fd,
            source: Errno::last(),
        });
    }
    Ok(())
}
