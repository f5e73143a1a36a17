//! Helper stderr, forwarded to the log line by line.
//!
//! The pool's reactor watches every helper's stderr with its epoll and reads
//! whatever arrives, so no helper ever blocks on a full stderr pipe. Each
//! complete line becomes a `tracing` event (target `sandpool::helper`) with
//! the helper's pid and tenant. A helper gets a byte budget: a token bucket
//! (`stderr_bytes_per_second`, bursts of four seconds' worth) and a lifetime
//! cap (`stderr_max_bytes_per_helper`); lines beyond them, and the part of a
//! line beyond [`MAX_LINE`], are read and dropped, and counted. Memory per
//! helper is bounded: one partial line and the [`TAIL`] bytes kept for the
//! error a dying helper's calls report.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use nix::errno::Errno;
use parking_lot::Mutex;
use tracing::info;

use crate::telemetry::Counter;

/// Longest line forwarded; the rest of a longer line is dropped.
pub(crate) const MAX_LINE: usize = 1024;
/// Bytes of a helper's stderr kept for its error report.
pub(crate) const TAIL: usize = 2048;

/// The per-helper byte budgets.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Budget {
    pub(crate) bytes_per_second: u64,
    pub(crate) max_bytes_per_helper: u64,
}

/// One helper's stderr.
#[derive(Debug)]
pub(crate) struct StderrStream {
    pid: u32,
    tenant: Mutex<Option<String>>,
    state: Mutex<StreamState>,
}

#[derive(Debug)]
struct StreamState {
    fd: Option<OwnedFd>,
    line: Vec<u8>,
    /// The current line is past MAX_LINE: drop until the newline.
    truncating: bool,
    tail: VecDeque<u8>,
    tokens: f64,
    refilled: Instant,
    forwarded: u64,
}

/// What every forwarded stream of a pool shares: the budgets and the
/// counters. The reactor reads the streams; this only says how.
#[derive(Debug)]
pub(crate) struct StderrHub {
    budget: Budget,
    lines: Counter,
    dropped: Counter,
}

impl StderrHub {
    pub(crate) fn new(budget: Budget, lines: Counter, dropped: Counter) -> StderrHub {
        StderrHub {
            budget,
            lines,
            dropped,
        }
    }

    /// A stream for a helper's stderr (non-blocking read end).
    pub(crate) fn stream(&self, pid: u32, fd: OwnedFd) -> StderrStream {
        StderrStream {
            pid,
            tenant: Mutex::new(None),
            state: Mutex::new(StreamState {
                fd: Some(fd),
                line: Vec::new(),
                truncating: false,
                tail: VecDeque::new(),
                tokens: (self.budget.bytes_per_second * 4) as f64,
                refilled: Instant::now(),
                forwarded: 0,
            }),
        }
    }
}

impl StderrStream {
    /// Tags later lines with the tenant the helper was bound to.
    pub(crate) fn set_tenant(&self, tenant: &[u8]) {
        *self.tenant.lock() = Some(String::from_utf8_lossy(tenant).into_owned());
    }

    /// The fd, for the reactor's registration.
    pub(crate) fn with_fd<R>(&self, f: impl FnOnce(Option<std::os::fd::BorrowedFd<'_>>) -> R) -> R {
        let state = self.state.lock();
        f(state.fd.as_ref().map(AsFd::as_fd))
    }

    /// Reads what is available now (forwarding complete lines) and returns
    /// the last [`TAIL`] bytes the helper wrote.
    pub(crate) fn tail(&self, hub: &StderrHub) -> String {
        let mut chunk = vec![0u8; 16 * 1024];
        self.pump(hub, &mut chunk);
        let state = self.state.lock();
        let (a, b) = state.tail.as_slices();
        let mut bytes = a.to_vec();
        bytes.extend_from_slice(b);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Reads until EAGAIN; returns true at EOF (the fd is then closed).
    pub(crate) fn pump(&self, hub: &StderrHub, chunk: &mut [u8]) -> bool {
        let mut state = self.state.lock();
        loop {
            let Some(fd) = &state.fd else {
                return true;
            };
            match nix::unistd::read(fd.as_fd(), chunk) {
                Ok(0) => {
                    self.flush_line(&mut state, hub);
                    state.fd = None;
                    return true;
                }
                Ok(n) => self.consume(&mut state, &chunk[..n], hub),
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return false,
                Err(_) => {
                    state.fd = None;
                    return true;
                }
            }
        }
    }

    fn consume(&self, state: &mut StreamState, bytes: &[u8], hub: &StderrHub) {
        state.tail.extend(bytes);
        let excess = state.tail.len().saturating_sub(TAIL);
        state.tail.drain(..excess);
        for piece in bytes.split_inclusive(|b| *b == b'\n') {
            let (body, ends_line) = match piece.strip_suffix(b"\n") {
                Some(body) => (body, true),
                None => (piece, false),
            };
            if !state.truncating {
                let room = MAX_LINE - state.line.len();
                state.line.extend_from_slice(&body[..body.len().min(room)]);
                if body.len() > room {
                    hub.dropped.increment((body.len() - room) as u64);
                    state.truncating = true;
                }
            } else {
                hub.dropped.increment(body.len() as u64);
            }
            if ends_line {
                self.flush_line(state, hub);
            }
        }
    }

    /// Forwards the line in progress, within the budgets.
    fn flush_line(&self, state: &mut StreamState, hub: &StderrHub) {
        state.truncating = false;
        if state.line.is_empty() {
            return;
        }
        let line = std::mem::take(&mut state.line);
        let now = Instant::now();
        let budget = hub.budget;
        let burst = (budget.bytes_per_second * 4) as f64;
        state.tokens = (state.tokens
            + now.duration_since(state.refilled).as_secs_f64() * budget.bytes_per_second as f64)
            .min(burst);
        state.refilled = now;
        let cost = line.len() as f64;
        if state.tokens < cost || state.forwarded + line.len() as u64 > budget.max_bytes_per_helper
        {
            hub.dropped.increment(line.len() as u64);
            return;
        }
        state.tokens -= cost;
        state.forwarded += line.len() as u64;
        hub.lines.increment(1);
        let tenant = self.tenant.lock().clone().unwrap_or_default();
        info!(target: "sandpool::helper", pid = self.pid, tenant = %tenant, "{}", String::from_utf8_lossy(&line));
    }
}
