//! Helper stderr, forwarded to the log line by line.
//!
//! One thread per pool watches every helper's stderr with epoll and reads
//! whatever arrives, so no helper ever blocks on a full stderr pipe. Each
//! complete line becomes a `tracing` event (target `sandpool::helper`) with
//! the helper's pid and tenant. A helper gets a byte budget: a token bucket
//! (`stderr_bytes_per_second`, bursts of four seconds' worth) and a lifetime
//! cap (`stderr_max_bytes_per_helper`); lines beyond them, and the part of a
//! line beyond [`MAX_LINE`], are read and dropped, and counted. Memory per
//! helper is bounded: one partial line and the [`TAIL`] bytes kept for the
//! error a dying helper's calls report.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use metrics::Counter;
use nix::errno::Errno;
use nix::poll::PollTimeout;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use parking_lot::Mutex;
use tracing::{info, warn};

/// Longest line forwarded; the rest of a longer line is dropped.
pub(crate) const MAX_LINE: usize = 1024;
/// Bytes of a helper's stderr kept for its error report.
pub(crate) const TAIL: usize = 2048;

const WAKE_TOKEN: u64 = u64::MAX;

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

/// The hub: an epoll thread that owns nothing but the registrations.
pub(crate) struct StderrHub {
    shared: Arc<HubShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct HubShared {
    epoll: Epoll,
    wake: EventFd,
    streams: Mutex<HashMap<u64, Arc<StderrStream>>>,
    next_token: AtomicU64,
    stop: AtomicBool,
    budget: Budget,
    lines: Counter,
    dropped: Counter,
}

impl std::fmt::Debug for StderrHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StderrHub").finish_non_exhaustive()
    }
}

impl StderrHub {
    pub(crate) fn start(
        budget: Budget,
        lines: Counter,
        dropped: Counter,
    ) -> std::io::Result<StderrHub> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        epoll.add(
            wake.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN),
        )?;
        let shared = Arc::new(HubShared {
            epoll,
            wake,
            streams: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            budget,
            lines,
            dropped,
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("sandpool-stderr".into())
            .spawn(move || thread_shared.run())?;
        Ok(StderrHub {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Takes over a helper's stderr (non-blocking read end).
    pub(crate) fn register(&self, pid: u32, fd: OwnedFd) -> Arc<StderrStream> {
        let token = self.shared.next_token.fetch_add(1, Ordering::Relaxed);
        let registered = self
            .shared
            .epoll
            .add(fd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, token));
        let stream = Arc::new(StderrStream {
            pid,
            tenant: Mutex::new(None),
            state: Mutex::new(StreamState {
                fd: Some(fd),
                line: Vec::new(),
                truncating: false,
                tail: VecDeque::new(),
                tokens: (self.shared.budget.bytes_per_second * 4) as f64,
                refilled: Instant::now(),
                forwarded: 0,
            }),
        });
        match registered {
            Ok(()) => {
                self.shared.streams.lock().insert(token, stream.clone());
            }
            // Without a registration the stream is still drained when the
            // helper fails (`tail`); it is just not forwarded live.
            Err(err) => warn!(pid, %err, "cannot watch helper stderr"),
        }
        stream
    }

    /// Stops the thread. Streams still registered are read one last time.
    pub(crate) fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.wake.write(1);
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

impl Drop for StderrHub {
    fn drop(&mut self) {
        self.stop();
    }
}

impl HubShared {
    fn run(&self) {
        let mut events = vec![EpollEvent::empty(); 256];
        let mut chunk = vec![0u8; 64 * 1024];
        while !self.stop.load(Ordering::Acquire) {
            let n = match self.epoll.wait(&mut events, PollTimeout::NONE) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(err) => {
                    warn!(%err, "helper stderr forwarding stopped");
                    return;
                }
            };
            for event in &events[..n] {
                let token = event.data();
                if token == WAKE_TOKEN {
                    let _ = self.wake.read();
                    continue;
                }
                let Some(stream) = self.streams.lock().get(&token).cloned() else {
                    continue;
                };
                if stream.pump(self, &mut chunk) {
                    // EOF: the helper is gone; stop watching, close the fd.
                    self.streams.lock().remove(&token);
                    if let Some(fd) = stream.state.lock().fd.take() {
                        let _ = self.epoll.delete(fd.as_fd());
                    }
                }
            }
        }
        let streams: Vec<_> = self.streams.lock().drain().map(|(_, s)| s).collect();
        for stream in streams {
            stream.pump(self, &mut chunk);
        }
    }
}

impl StderrStream {
    /// Tags later lines with the tenant the helper was bound to.
    pub(crate) fn set_tenant(&self, tenant: &[u8]) {
        *self.tenant.lock() = Some(String::from_utf8_lossy(tenant).into_owned());
    }

    /// Reads what is available now (forwarding complete lines) and returns
    /// the last [`TAIL`] bytes the helper wrote.
    pub(crate) fn tail(&self, hub: &StderrHub) -> String {
        let mut chunk = vec![0u8; 16 * 1024];
        self.pump(&hub.shared, &mut chunk);
        let state = self.state.lock();
        let (a, b) = state.tail.as_slices();
        let mut bytes = a.to_vec();
        bytes.extend_from_slice(b);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Reads until EAGAIN; returns true at EOF.
    fn pump(&self, hub: &HubShared, chunk: &mut [u8]) -> bool {
        let mut state = self.state.lock();
        loop {
            let Some(fd) = &state.fd else {
                return true;
            };
            match nix::unistd::read(fd.as_fd(), chunk) {
                Ok(0) => {
                    self.flush_line(&mut state, hub);
                    return true;
                }
                Ok(n) => self.consume(&mut state, &chunk[..n], hub),
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return false,
                Err(_) => return true,
            }
        }
    }

    fn consume(&self, state: &mut StreamState, bytes: &[u8], hub: &HubShared) {
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
    fn flush_line(&self, state: &mut StreamState, hub: &HubShared) {
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
