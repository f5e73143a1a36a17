//! Owning a helper process until it has been reaped.
//!
//! Signals go through the pidfd, never a bare pid, and the process is reaped
//! through the pidfd too: no pid-reuse race, and no zombie left behind. Drop
//! kills and reaps a process that is still running. Every method takes
//! `&self`: the status sits behind a lock held only for a non-blocking
//! `waitid`, so whoever reaps first (the reactor, a caller's `kill`, the
//! keeper) records the status, and a blocking wait never holds the lock.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};

use crate::error::ExitStatus;

/// A child process, owned through its pidfd until reaped.
#[derive(Debug)]
pub(crate) struct Process {
    pid: u32,
    pidfd: OwnedFd,
    status: Mutex<Option<ExitStatus>>,
}

impl Process {
    pub(crate) fn new(pid: u32, pidfd: OwnedFd) -> Self {
        Process {
            pid,
            pidfd,
            status: Mutex::new(None),
        }
    }

    /// The pidfd (readable once the process has exited).
    pub(crate) fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Sends SIGKILL through the pidfd. A process that already exited (even if
    /// not yet reaped) is not an error.
    pub(crate) fn kill(&self) {
        if self.status.lock().is_some() {
            return;
        }
        // ESRCH means it has exited already; nothing else can fail for our own
        // child with a valid pidfd.
        let _ = rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL);
    }

    /// Sends a signal through the pidfd (for tests and stop/continue).
    pub(crate) fn signal(&self, signal: nix::sys::signal::Signal) -> std::io::Result<()> {
        if self.status.lock().is_some() {
            return Err(std::io::Error::from_raw_os_error(Errno::ESRCH as i32));
        }
        let signal = rustix::process::Signal::from_named_raw(signal as i32)
            .ok_or_else(|| std::io::Error::from_raw_os_error(Errno::EINVAL as i32))?;
        rustix::process::pidfd_send_signal(&self.pidfd, signal).map_err(Into::into)
    }

    /// Reaps the process if it has exited, without blocking.
    pub(crate) fn try_wait(&self) -> Option<ExitStatus> {
        let mut status = self.status.lock();
        if status.is_none() {
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG;
            *status = match waitid(Id::PIDFd(self.pidfd.as_fd()), flags) {
                Ok(WaitStatus::Exited(_, code)) => Some(ExitStatus::Exited(code)),
                Ok(WaitStatus::Signaled(_, signal, _)) => Some(ExitStatus::Signaled(signal as i32)),
                // ECHILD: reaped by someone else (a host that waits on -1);
                // there is nothing left to wait for.
                Err(Errno::ECHILD) => Some(ExitStatus::Unknown),
                // EINVAL: a kernel with pidfd_open but without P_PIDFD (5.3);
                // the child is still ours and unreaped, so its pid is safe.
                Err(Errno::EINVAL) => {
                    let pid = nix::unistd::Pid::from_raw(self.pid as i32);
                    match nix::sys::wait::waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                        Ok(WaitStatus::Exited(_, code)) => Some(ExitStatus::Exited(code)),
                        Ok(WaitStatus::Signaled(_, signal, _)) => {
                            Some(ExitStatus::Signaled(signal as i32))
                        }
                        Err(Errno::ECHILD) => Some(ExitStatus::Unknown),
                        _ => None,
                    }
                }
                _ => None,
            };
        }
        *status
    }

    /// Waits up to `timeout` for the process to exit, and reaps it.
    pub(crate) fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            // The pidfd becomes readable when the process exits.
            let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, poll_timeout(left));
        }
    }

    /// Kills the process (if still running) and reaps it.
    pub(crate) fn kill_and_reap(&self) -> ExitStatus {
        if let Some(status) = self.try_wait() {
            return status;
        }
        self.kill();
        // After SIGKILL the exit is imminent (even for a stopped process). If
        // it still cannot be reaped after ten seconds something outside
        // sandpool is interfering; give up rather than hang the caller.
        for _ in 0..10 {
            if let Some(status) = self.wait_timeout(Duration::from_secs(1)) {
                return status;
            }
            self.kill();
        }
        tracing::error!(pid = self.pid, "helper could not be reaped after SIGKILL");
        *self.status.lock() = Some(ExitStatus::Unknown);
        ExitStatus::Unknown
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// Converts a remaining duration into a poll timeout, rounding up to whole
/// milliseconds so a poll never returns just before its deadline.
pub(crate) fn poll_timeout(left: Duration) -> PollTimeout {
    let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128);
    PollTimeout::try_from(ms as i32).unwrap_or(PollTimeout::MAX)
}
