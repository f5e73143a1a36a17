//! The reactor's side of a connection, and what every reader does with a
//! frame: check it against the call table, complete the call it answers,
//! or retire the helper. Also retiring and reaping.

use std::io::IoSlice;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sandpool_protocol::{Header, Kind, RegionRef};
use tracing::debug;

use super::frames::{IoFailure, write_now};
use super::{CallResult, Conn, Done, Dying, Health, Reading, State};
use crate::error::{CallError, ExitStatus, ProtocolViolation};

/// How long a helper whose pipe closed gets to become reapable: its stdout
/// closes a moment before it exits.
const EXIT_GRACE: Duration = Duration::from_millis(100);
/// After SIGKILL the exit is imminent (even for a stopped process); if it
/// still cannot be reaped after this, something outside sandpool
/// interferes, and the calls fail without a status.
const REAP_GRACE: Duration = Duration::from_secs(10);
/// At most this many frames per read pass, so one chatty helper cannot
/// hold the reactor (it is re-armed and comes back at once).
const FRAMES_PER_PASS: usize = 64;

/// What happened on a helper's fds.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Events {
    pub(crate) readable: bool,
    pub(crate) writable: bool,
    pub(crate) exited: bool,
}

/// What the reactor is to watch for a helper next.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Interest {
    /// Its stdout (the reactor owns the reading).
    pub(crate) read: bool,
    /// Its stdin (frames wait in the outbound queue).
    pub(crate) write: bool,
    /// Its pidfd (it is dying: reap it).
    pub(crate) exit: bool,
    /// Look again at this moment (the hang rule, or the next step of dying).
    pub(crate) timer: Option<Instant>,
    /// Look again at once: a read pass stopped at its cap with frames still
    /// waiting (they may be in the read-ahead buffer, where no epoll event
    /// will announce them).
    pub(crate) again: bool,
}

/// The earlier of two moments, either of which may be none.
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether a reactor that next looks at a helper at `next_look` (never:
/// `None`) looks too late for the hang rule on a front of its table that
/// becomes overdue at `overdue` (nothing owed: `None`, never too late).
pub(super) fn looks_too_late(overdue: Option<Instant>, next_look: Option<Instant>) -> bool {
    overdue.is_some_and(|at| next_look.is_none_or(|look| look > at))
}

impl Conn {
    /// Everything the reactor does for a helper, whatever woke it: writes
    /// what waits in the outbound queue, reads and completes the replies
    /// that have arrived (while it owns the reading), applies the hang
    /// rule, reaps a dying helper. Returns what to watch next.
    ///
    /// `armed`: the hang-rule timer the reactor still has set for this
    /// helper, if any; the one it will have after this is kept in
    /// `next_look`.
    pub(crate) fn service(&self, _events: Events, armed: Option<Instant>) -> Interest {
        let mut done = Done::new();
        let mut st = self.state.lock();
        // Read once the lock is held: a waiter may have held it, and a
        // reply read now must not be dated before (its successor's turn
        // would start early, shortening its budget by the wait).
        let now = Instant::now();
        if matches!(st.health, Health::Serving)
            && !st.outbound.is_empty()
            && let Err(failure) = self.drain_outbound(&mut st)
        {
            self.io_failed(&mut st, failure, now);
        }
        let mut again = false;
        if matches!(st.health, Health::Serving) && st.reading == Reading::Reactor {
            again = self.read_pass(&mut st, now, &mut done);
        }
        if matches!(st.health, Health::Serving) && st.reading == Reading::Reactor {
            // The hang rule, with everything that has arrived read.
            if let Some(front) = st.table.front()
                && front.overdue_at() <= now
            {
                let err = CallError::Timeout {
                    pid: self.pid,
                    after: now.saturating_duration_since(front.sent),
                };
                self.retire(&mut st, err);
            }
        }
        if let Health::Dying { until, .. } = st.health {
            if let Some(status) = self.process.try_wait() {
                self.finalize(&mut st, status, &mut done);
            } else if now >= until {
                self.next_dying_step(&mut st, now, &mut done);
            }
        }
        let serving = matches!(st.health, Health::Serving);
        let interest = Interest {
            read: serving && st.reading == Reading::Reactor,
            write: serving && !st.outbound.is_empty() && !st.own_writer,
            exit: matches!(st.health, Health::Dying { .. }),
            timer: match &st.health {
                Health::Serving if st.reading == Reading::Reactor => st.table.front_overdue_at(),
                Health::Dying { until, .. } => Some(*until),
                _ => None,
            },
            again: again && serving && st.reading == Reading::Reactor,
        };
        st.next_look = earliest(armed, interest.timer);
        drop(st);
        self.complete_all(&mut done);
        interest
    }

    /// A dying helper has not been reaped by its step's deadline.
    fn next_dying_step(&self, st: &mut State, now: Instant, done: &mut Done) {
        let Health::Dying { cause, until } = &mut st.health else {
            return;
        };
        match cause {
            Dying::Exiting { stdin } => {
                // It closed a pipe and did not exit: on purpose.
                let violation = if *stdin {
                    ProtocolViolation::ClosedStdin
                } else {
                    ProtocolViolation::ClosedStdout
                };
                *cause = Dying::Failed(CallError::Protocol {
                    pid: self.pid,
                    violation,
                });
                *until = now + REAP_GRACE;
                self.process.kill();
            }
            Dying::Failed(_) => {
                tracing::error!(pid = self.pid, "helper could not be reaped after SIGKILL");
                self.finalize(st, ExitStatus::Unknown, done);
            }
        }
    }

    /// Writes what the outbound queue holds, in order, until the pipe is
    /// full (not while a caller finishes its own frame ahead of it).
    fn drain_outbound(&self, st: &mut State) -> Result<(), IoFailure> {
        if st.own_writer {
            return Ok(());
        }
        let Some(stdin) = st.stdin.clone() else {
            return Ok(());
        };
        while !st.outbound.is_empty() {
            let bufs: smallvec::SmallVec<[IoSlice<'_>; 16]> = st
                .outbound
                .iter()
                .take(16)
                .map(|frame| IoSlice::new(&frame.bytes[frame.offset..]))
                .collect();
            let mut n = write_now(stdin.as_fd(), &bufs)?;
            drop(bufs);
            if n == 0 {
                return Ok(());
            }
            while n > 0 {
                let Some(frame) = st.outbound.front_mut() else {
                    break;
                };
                let take = n.min(frame.bytes.len() - frame.offset);
                frame.offset += take;
                frame.started = true;
                n -= take;
                if frame.offset == frame.bytes.len() {
                    st.outbound.pop_front();
                }
            }
        }
        Ok(())
    }

    /// Reads and handles the complete frames that have arrived, at most
    /// `FRAMES_PER_PASS`; true if it stopped at that cap (more may wait).
    /// Gives the reading up if nothing is owed after it.
    pub(super) fn read_pass(&self, st: &mut State, now: Instant, done: &mut Done) -> bool {
        let capped = self.read_arrived_frames(st, now, done);
        if st.table.is_empty() && matches!(st.health, Health::Serving) {
            st.reading = Reading::Idle;
        }
        capped
    }

    /// [`read_pass`](Self::read_pass), keeping the reading where it is.
    pub(super) fn read_arrived_frames(
        &self,
        st: &mut State,
        now: Instant,
        done: &mut Done,
    ) -> bool {
        let Some(mut frames) = st.frames.take() else {
            return false;
        };
        let mut capped = true;
        for _ in 0..FRAMES_PER_PASS {
            match frames.poll_frame(self.stdout(), self.max_frame) {
                Ok(Some((header, payload))) => {
                    if let Err(err) = self.on_frame(st, header, payload, now, done) {
                        self.retire(st, err);
                        capped = false;
                        break;
                    }
                }
                Ok(None) => {
                    capped = false;
                    break;
                }
                Err(failure) => {
                    self.io_failed(st, failure, now);
                    capped = false;
                    break;
                }
            }
        }
        st.frames = Some(frames);
        capped
    }

    /// Checks a frame against the call table and completes the call it
    /// answers (into `done`, to be completed outside the lock). `Err`: the
    /// helper broke the protocol (the caller retires it).
    pub(super) fn on_frame(
        &self,
        st: &mut State,
        header: Header,
        payload: Vec<u8>,
        now: Instant,
        done: &mut Done,
    ) -> Result<(), CallError> {
        if !matches!(st.health, Health::Serving) {
            // Closing or failing: whatever still comes is nobody's.
            return Ok(());
        }
        let violation = |violation| CallError::Protocol {
            pid: self.pid,
            violation,
        };
        let expected = st.table.front().map(|entry| (entry.id, entry.slot));
        let result: CallResult = match header.kind {
            Kind::Response | Kind::Error | Kind::ResponseInRegion
                if Some(header.id) != expected.map(|(id, _)| id) =>
            {
                return Err(violation(match expected {
                    Some((expected, _)) => ProtocolViolation::UnexpectedId {
                        expected,
                        got: header.id,
                    },
                    None => ProtocolViolation::Unsolicited {
                        kind: header.kind,
                        id: header.id,
                    },
                }));
            }
            Kind::Response => Ok(payload),
            Kind::ResponseInRegion => {
                let (Some(region), Some((_, Some(slot)))) = (self.region.as_ref(), expected) else {
                    return Err(violation(ProtocolViolation::RegionNotGranted(header.id)));
                };
                // Only the window this request was granted.
                let start = region.len() / 2 + u64::from(slot) * self.region_slot;
                let end = start + self.region_slot;
                // Bounds first, then copy out: the helper may rewrite the
                // bytes at any moment after this.
                let at = RegionRef::decode(&payload, start, end)
                    .map_err(|err| violation(ProtocolViolation::Region(err)))?;
                match region.read(at.offset, at.len) {
                    Ok(bytes) => Ok(bytes),
                    Err(errno) => {
                        return Err(CallError::Io {
                            pid: self.pid,
                            source: Arc::new(errno.into()),
                        });
                    }
                }
            }
            Kind::Error => match String::from_utf8(payload) {
                Ok(message) => Err(CallError::Helper(message)),
                Err(_) => return Err(violation(ProtocolViolation::ErrorNotUtf8)),
            },
            Kind::Hello => return Err(violation(ProtocolViolation::SecondHello)),
            // Host-to-helper kinds are refused by the decoder already.
            kind => {
                return Err(violation(ProtocolViolation::Unsolicited {
                    kind,
                    id: header.id,
                }));
            }
        };
        let Some(entry) = st.table.pop_front(now) else {
            unreachable!("the id matched the front entry");
        };
        if let Some(slot) = entry.slot {
            // The granted reply is consumed (copied out, if it came
            // through the region): the next large call may have the slot.
            st.free_slots.push(slot);
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        done.push((entry.completion, result, false));
        Ok(())
    }

    /// A read or write failed: EOF or EPIPE means the helper is exiting
    /// (wait for its status); anything else retires it.
    pub(super) fn io_failed(&self, st: &mut State, failure: IoFailure, now: Instant) {
        let stdin = match failure {
            IoFailure::StdoutClosed => false,
            IoFailure::StdinClosed => true,
            IoFailure::Decode(err) => {
                let err = CallError::Protocol {
                    pid: self.pid,
                    violation: ProtocolViolation::Frame(err),
                };
                return self.retire(st, err);
            }
            IoFailure::Os(errno) => {
                let err = CallError::Io {
                    pid: self.pid,
                    source: Arc::new(errno.into()),
                };
                return self.retire(st, err);
            }
            IoFailure::Timeout => {
                let err = CallError::Timeout {
                    pid: self.pid,
                    after: Duration::ZERO,
                };
                return self.retire(st, err);
            }
        };
        if matches!(st.health, Health::Serving) {
            st.health = Health::Dying {
                cause: Dying::Exiting { stdin },
                until: now + EXIT_GRACE,
            };
            self.retired.store(true, Ordering::Release);
            self.room.notify(usize::MAX);
        }
    }

    /// Retires the helper with `error` (the first failure wins) and kills
    /// it; its calls fail once it has been reaped (see `service`).
    pub(super) fn retire(&self, st: &mut State, error: CallError) {
        match st.health {
            Health::Serving | Health::Closed => {}
            Health::Dying { .. } | Health::Dead => return,
        }
        debug!(pid = self.pid, %error, "helper retired");
        st.failure.get_or_insert(error.clone());
        st.health = Health::Dying {
            cause: Dying::Failed(error),
            until: Instant::now() + REAP_GRACE,
        };
        self.retired.store(true, Ordering::Release);
        self.process.kill();
        self.room.notify(usize::MAX);
    }

    /// The error of a helper that ended with `status`: `Died`, with the end
    /// of its stderr and, for a seccomp kill, the syscall the kernel logged
    /// killing it for.
    pub(super) fn died(&self, status: ExitStatus, stderr: String) -> CallError {
        let syscall = status
            .is_seccomp_kill()
            .then(|| self.link.seccomp_kill_syscall(self.pid))
            .flatten();
        if status.is_seccomp_kill() {
            debug!(pid = self.pid, ?syscall, "helper killed by seccomp");
        }
        CallError::Died {
            pid: self.pid,
            status,
            stderr,
            syscall,
        }
    }

    /// The dying helper has been reaped with `status`: every call in flight
    /// fails with the same error.
    pub(super) fn finalize(&self, st: &mut State, status: ExitStatus, done: &mut Done) {
        let cause = match std::mem::replace(&mut st.health, Health::Dead) {
            Health::Dying { cause, .. } => cause,
            other => {
                st.health = other;
                return;
            }
        };
        let error = match cause {
            Dying::Failed(error) => error,
            Dying::Exiting { .. } => {
                let stderr = self.stderr.tail();
                match self.address_space {
                    Some(max) if is_allocation_abort(status, &stderr) => CallError::LimitExceeded {
                        pid: self.pid,
                        limit: crate::error::Limit::AddressSpace { max },
                        stderr,
                    },
                    _ => self.died(status, stderr),
                }
            }
        };
        if st.failure.is_none() || matches!(st.failure, Some(CallError::Retired { .. })) {
            st.failure = Some(error.clone());
        }
        st.stdin = None;
        st.outbound.clear();
        for entry in st.table.drain() {
            done.push((entry.completion, Err(error.clone()), true));
        }
        if !done.is_empty() {
            debug!(pid = self.pid, %error, calls = done.len(), "helper failed with calls in flight");
        }
    }
}

/// Whether a helper that ended with `status` aborted because an allocation
/// failed, as its stderr says: Rust's allocator prints `memory allocation of
/// N bytes failed` and aborts (SIGABRT). The helper's own account: a
/// hostile helper could fake it, which changes only the error's label.
fn is_allocation_abort(status: ExitStatus, stderr: &str) -> bool {
    status == ExitStatus::Signaled(nix::sys::signal::Signal::SIGABRT as i32)
        && stderr
            .lines()
            .rev()
            .take(4)
            .any(|line| line.starts_with("memory allocation of ") && line.ends_with(" failed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_look_is_the_earlier_timer() {
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        assert_eq!(earliest(None, None), None);
        assert_eq!(earliest(Some(now), None), Some(now));
        assert_eq!(earliest(None, Some(later)), Some(later));
        assert_eq!(earliest(Some(later), Some(now)), Some(now));
        assert_eq!(earliest(Some(now), Some(later)), Some(now));
    }

    #[test]
    fn a_reactor_looks_too_late_only_after_the_front_is_overdue() {
        let now = Instant::now();
        let soon = now + Duration::from_millis(100);
        let later = now + Duration::from_secs(30);
        // A front overdue before the reactor's timer (a short call behind a
        // long one, whose reply a waiter read): wake it.
        assert!(looks_too_late(Some(soon), Some(later)));
        // No timer at all (the reactor looked when nothing was owed).
        assert!(looks_too_late(Some(later), None));
        // Its timer comes first, or at that very moment: it re-plans then.
        assert!(!looks_too_late(Some(later), Some(soon)));
        assert!(!looks_too_late(Some(soon), Some(soon)));
        // Nothing owed: nothing to judge.
        assert!(!looks_too_late(None, None));
        assert!(!looks_too_late(None, Some(soon)));
    }

    #[test]
    fn only_an_abort_after_an_allocation_failure_is_named_a_memory_limit() {
        let abort = ExitStatus::Signaled(nix::sys::signal::Signal::SIGABRT as i32);
        let said = "memory allocation of 3221225472 bytes failed\n";
        assert!(is_allocation_abort(abort, said));
        assert!(!is_allocation_abort(ExitStatus::Exited(1), said));
        assert!(!is_allocation_abort(abort, "thread panicked\n"));
        assert!(!is_allocation_abort(
            ExitStatus::Signaled(nix::sys::signal::Signal::SIGKILL as i32),
            said
        ));
    }
}
