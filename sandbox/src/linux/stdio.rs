//! The protocol's pipes: stdin carries frames from the host, stdout frames to it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
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

/// One of the protocol's stdio pipes (fd 0 or fd 1), unbuffered.
///
/// It never closes its fd, not even when dropped: std assumes fds 0, 1 and 2
/// stay open for the life of the process (a later `println!` must not write
/// into whatever file would reuse number 1).
#[derive(Debug)]
pub struct StdioPipe(ManuallyDrop<File>);

impl Read for StdioPipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.0).read(buf)
    }
}

impl Write for StdioPipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&*self.0).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Takes fd 0 (frames in) and fd 1 (frames out) as unbuffered pipes, once
/// per process. Reading and writing them costs exactly one `read`/`write`
/// syscall per call, on the only fds the seccomp policy lets the helper read
/// (0) and write (1, 2).
///
/// Also sets SIGPIPE to ignored, so that a write to a host that has gone
/// fails with `EPIPE` (and the helper exits with its protocol code) instead
/// of killing the helper: std's runtime does this for a `fn main`, but a
/// helper started without it (`#![no_main]`, or a C `main`) has the
/// default disposition the host's spawn gave it.
pub fn take_protocol_stdio() -> Result<(StdioPipe, StdioPipe), StdioError> {
    for fd in [0, 1] {
        check_open(fd)?;
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(StdioError::AlreadyTaken);
    }
    // SAFETY: SIG_IGN installs no handler, so no code of ours can run in
    // signal context; `signal` only changes this process's disposition of
    // SIGPIPE. It cannot fail for a valid signal number.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    // SAFETY: fd 0 is open (checked above). The `File` is wrapped in
    // `ManuallyDrop` and never dropped, so it never closes fd 0: it acts as a
    // borrow of fd 0 for the rest of the process, which is how std's own
    // `Stdin` treats it. `TAKEN` makes this the only such handle.
    let input = unsafe { OwnedFd::from_raw_fd(0) };
    // SAFETY: as for fd 0, with std's `Stdout` in the place of `Stdin`.
    let output = unsafe { OwnedFd::from_raw_fd(1) };
    Ok((
        StdioPipe(ManuallyDrop::new(File::from(input))),
        StdioPipe(ManuallyDrop::new(File::from(output))),
    ))
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
