//! One helper connection: the [`Helper`] handle, its call table, the
//! completion of each call, the hang rule and the checks on every reply.
//!
//! # The rule: who reads, who writes, who judges
//!
//! - **Writes.** A caller writes its own request frames, non-blocking,
//!   under the connection's lock, while nothing is queued before them. A
//!   frame that does not go out whole is finished by its caller if that is
//!   a thread (it waits anyway; no copy), and otherwise, or once that
//!   caller's deadline comes, belongs to the connection's outbound queue,
//!   which only the reactor writes (on EPOLLOUT), to the end: a frame is
//!   never cut, whoever gives up. Frames sent meanwhile queue behind it.
//! - **Reads.** At any moment exactly one party reads the helper's stdout,
//!   named by [`Reading`]: nobody (`Idle`: nothing is owed), the caller whose
//!   request was the only one owed when it was sent (`Inline`: it reads its
//!   own reply, with `spin_wait`, and the reactor leaves the helper alone),
//!   or the reactor (`Reactor`). The inline reader hands the reading to the
//!   reactor when it is done and anything is still owed, or when it stops
//!   early (its deadline, a read failure); the reactor gives it up when it
//!   finds the table empty. While the reactor reads, a waiting caller (a
//!   thread before it parks, and while it spins; an async call each time it
//!   is polled) may also take, under the lock, a non-blocking pass over
//!   what has arrived: the reactor holds the reading and keeps its watch,
//!   but when replies come as fast as callers send, the callers read them
//!   and nobody waits for the reactor to wake. Such a pass never gives the
//!   reading up (an empty table stays the reactor's until it looks, so the
//!   next request needs no wake-up) and never judges. Whoever reads checks
//!   every frame against the call table and completes the call it answers.
//! - **Judging.** Only the reactor decides that a helper is hung, by the
//!   hang rule ([`table::Entry::overdue_at`]): at the moment the helper
//!   becomes overdue on the reply it owes first, with everything that has
//!   arrived read, it is killed. A caller's deadline only makes that caller
//!   leave (`QueueTimeout`; a request not yet on the wire is taken back,
//!   one already sent has its reply discarded when it comes). A caller
//!   whose own request is the one overdue waits for the verdict instead,
//!   which comes at once. A frame that breaks the protocol, EOF or a write
//!   error retires the helper whoever sees it.
//! - **Failing.** A failing helper is killed through its pidfd and reaped
//!   by the reactor (no thread waits on it); only then are its calls in
//!   flight completed, all with the same error, so a caller that sees a
//!   failure never sees the process still there.
//!
//! Lock order: the pool's state, then a connection's lock, then the
//! reactor's kick queue or timer list, the kernel log's reader (at a
//! seccomp kill), an `Event`'s or a completion's own lock (innermost, each
//! held for a push or a swap). Completions are
//! completed after the connection's lock is released. No lock is held
//! across a blocking read, write or wait; the reactor's reads and writes
//! under a connection's lock are non-blocking.

mod call;
pub(crate) mod completion;
pub(crate) mod frames;
mod service;
pub(crate) mod sync;
pub(crate) mod table;

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use event_listener::Event;
use parking_lot::Mutex;
use sandpool_protocol::{Hello, Kind, decode_bind};

use crate::error::{CallError, ExitStatus, RetireReason};
use crate::launch::process::Process;
use crate::reactor::stderr::{StderrHub, StderrStream};
use crate::reactor::{Reactor, ReactorLink};
use crate::region::HostRegion;
use completion::Completion;
use frames::{FrameReader, drain_tail};
use table::{CallTable, RequestIds};

pub(crate) use call::Deadline;
pub(crate) use service::{Events, Interest, earliest};

/// How much of a failed helper's stderr is read (the rest is discarded).
const STDERR_DRAIN_CAP: usize = 256 * 1024;
/// How much of it is kept in the error.
const STDERR_TAIL: usize = 2048;

/// A call's outcome.
pub(crate) type CallResult = Result<Vec<u8>, CallError>;
/// Calls to complete once the connection's lock is released.
type Done = smallvec::SmallVec<[(Arc<Completion<CallResult>>, CallResult, bool); 4]>;

/// Who reads the helper's stdout (see the module's rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reading {
    Idle,
    Inline,
    Reactor,
}

/// Why a dying helper is dying.
#[derive(Debug)]
enum Dying {
    /// The host retired it with this error and killed it.
    Failed(CallError),
    /// It closed its stdout (or its stdin) and is, presumably, exiting.
    Exiting { stdin: bool },
}

#[derive(Debug)]
enum Health {
    Serving,
    /// The host closed its stdin (shutdown, quiesce): calls were failed.
    Closed,
    /// Killed or exiting; calls in flight fail once it has been reaped, or
    /// at `until` the next step is taken.
    Dying {
        cause: Dying,
        until: Instant,
    },
    /// Reaped; every call failed.
    Dead,
}

/// A frame, or the rest of one, still to be written by the reactor.
#[derive(Debug)]
struct OutFrame {
    /// Its request id (0 for Bind).
    id: u64,
    bytes: Vec<u8>,
    /// How much of `bytes` has been written.
    offset: usize,
    /// Part of the frame is on the wire: it cannot be taken back.
    started: bool,
}

/// Everything of a connection that changes, under its one lock.
#[derive(Debug)]
struct State {
    table: CallTable<Arc<Completion<CallResult>>>,
    ids: RequestIds,
    reading: Reading,
    /// The stdout reader; taken out by an inline reader while it reads.
    frames: Option<FrameReader>,
    /// Shared with a caller finishing its own partly written frame, so
    /// closing it here never closes an fd that caller is writing to.
    stdin: Option<Arc<OwnedFd>>,
    outbound: VecDeque<OutFrame>,
    /// A thread caller is finishing its own frame that did not go out whole
    /// (it writes it, without a copy, while it waits anyway): the outbound
    /// queue waits behind it.
    own_writer: bool,
    /// Region slots free to grant.
    free_slots: Vec<u32>,
    health: Health,
    /// The first failure, for the calls that come after it.
    failure: Option<CallError>,
    bound: bool,
    /// The Bind frame, held to go out in the same write as the first frame
    /// after it (one wake-up of the helper for both, not two).
    pending_bind: Option<Vec<u8>>,
    /// Completions of finished calls, for reuse: a warm call allocates
    /// nothing but its reply. At most as many as the table holds calls.
    completions: Vec<Arc<Completion<CallResult>>>,
    /// When the reactor will next look at this helper on its own (the
    /// timer it has armed for the hang rule), as of its last service: a
    /// waiter that reads a reply, and with it moves the front of the
    /// table, wakes the reactor only if the new front becomes overdue
    /// before this.
    next_look: Option<Instant>,
}

/// Where a helper's stderr goes: read only when it fails (a lone helper), or
/// forwarded to the log as it arrives (a pool's helpers).
#[derive(Debug)]
enum StderrSink {
    Pipe(OwnedFd),
    Hub {
        stream: StderrStream,
        hub: Arc<StderrHub>,
    },
}

impl StderrSink {
    fn tail(&self) -> String {
        match self {
            StderrSink::Pipe(fd) => stderr_tail(fd),
            StderrSink::Hub { stream, hub } => stream.tail(hub),
        }
    }
}

pub(crate) fn stderr_tail(stderr: &OwnedFd) -> String {
    String::from_utf8_lossy(&drain_tail(stderr, STDERR_DRAIN_CAP, STDERR_TAIL)).into_owned()
}

/// The shared part of a helper: what callers and the reactor both use.
#[derive(Debug)]
pub(crate) struct Conn {
    pid: u32,
    token: u64,
    link: ReactorLink,
    stdout: OwnedFd,
    process: Process,
    stderr: StderrSink,
    region: Option<HostRegion>,
    /// Size of one region slot in each half (0 without a region).
    region_slot: u64,
    region_threshold: usize,
    max_frame: u32,
    spin: Duration,
    address_space: Option<u64>,
    /// The capacity of the helper's stdin pipe in bytes (`F_GETPIPE_SZ`):
    /// how much of a batch a caller can write whole and then read inline.
    stdin_capacity: usize,
    state: Mutex<State>,
    /// Notified when room frees up in the table or the region, and when
    /// the helper stops serving.
    room: Event,
    calls: AtomicU64,
    retired: AtomicBool,
}

/// What the launch hands over to make a connection.
pub(crate) struct Parts {
    pub(crate) pid: u32,
    pub(crate) process: Process,
    pub(crate) stdin: OwnedFd,
    pub(crate) stdout: OwnedFd,
    pub(crate) stderr: OwnedFd,
    pub(crate) frames: FrameReader,
    pub(crate) region: Option<HostRegion>,
    pub(crate) region_slots: usize,
    pub(crate) region_threshold: usize,
    pub(crate) max_frame: u32,
    pub(crate) max_in_flight: usize,
    pub(crate) spin: Duration,
    /// The helper's address-space limit, to name an allocation failure.
    pub(crate) address_space: Option<u64>,
}

impl Conn {
    pub(crate) fn token(&self) -> u64 {
        self.token
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn stdout(&self) -> BorrowedFd<'_> {
        self.stdout.as_fd()
    }

    pub(crate) fn pidfd(&self) -> BorrowedFd<'_> {
        self.process.pidfd()
    }

    /// Runs `f` with the helper's stdin, if still open.
    pub(crate) fn with_stdin<R>(&self, f: impl FnOnce(Option<BorrowedFd<'_>>) -> R) -> R {
        let state = self.state.lock();
        f(state.stdin.as_deref().map(AsFd::as_fd))
    }

    pub(crate) fn stderr_stream(&self) -> Option<&StderrStream> {
        match &self.stderr {
            StderrSink::Hub { stream, .. } => Some(stream),
            StderrSink::Pipe(_) => None,
        }
    }

    fn poke(&self) {
        self.link.poke(self.token);
    }

    /// A completion for a new call: a reused one if any is free. A
    /// finished call's completion may still be held for a moment by the
    /// party that completed it (a caller spinning on it can finish first),
    /// so only one nobody else holds is reset and reused.
    fn completion(st: &mut State) -> Arc<Completion<CallResult>> {
        match st
            .completions
            .iter()
            .position(|completion| Arc::strong_count(completion) == 1)
        {
            Some(at) => {
                let completion = st.completions.swap_remove(at);
                completion.reset();
                completion
            }
            None => Arc::new(Completion::new()),
        }
    }

    /// Keeps a finished call's completion for reuse.
    fn recycle(&self, completion: Arc<Completion<CallResult>>) {
        let mut st = self.state.lock();
        if st.completions.len() < st.table.len() + st.table.room() {
            st.completions.push(completion);
        }
    }

    /// The error of a call that finds the helper no longer serving before
    /// it sent anything.
    fn not_sent(&self, st: &State) -> CallError {
        CallError::NotSent {
            pid: self.pid,
            failure: st.failure.clone().map(Box::new),
        }
    }

    /// The error of a call that was waiting on this helper (for room, a
    /// region slot) when it stopped serving: the helper's failure itself,
    /// as every call in flight gets it.
    fn failure_for_waiter(&self, st: &State) -> CallError {
        st.failure.clone().unwrap_or_else(|| self.not_sent(st))
    }

    /// Completes calls outside the lock.
    fn complete_all(&self, done: &mut Done) {
        let freed = !done.is_empty();
        for (completion, result, failed) in done.drain(..) {
            // A call whose caller gave up has its reply dropped here.
            let _ = completion.complete(result, failed);
        }
        if freed {
            self.room.notify(usize::MAX);
        }
    }
}

/// A running, verified helper.
///
/// Calls take `&self` and may come from many threads and tasks at once; up
/// to `max_in_flight` of them are pipelined. After a timeout, a protocol
/// violation or the helper's death the helper is *retired*: the process is
/// killed and reaped, every call in flight fails with the same error, and
/// every later call returns [`CallError::NotSent`]. Dropping the handle
/// kills and reaps the process if it is still running.
#[derive(Debug)]
pub struct Helper {
    conn: Arc<Conn>,
    reactor: Reactor,
    hello: Hello,
    launch_time: Duration,
    /// `calls` when the helper was bound (a spare's warm-up came before).
    calls_at_bind: AtomicU64,
    /// Whether a call of its tenant has succeeded yet.
    tenant_success: AtomicBool,
    /// Pool callers holding this helper for a call right now.
    users: AtomicUsize,
    /// The pool has counted this helper's failure (once in its life).
    failure_counted: AtomicBool,
    /// What the keeper's last sample of the process saw.
    pub(crate) usage: Usage,
    /// The host-wide slot this helper holds (`Config.host`), if any. The
    /// last field, and never touched by `Drop for Helper`: fields drop
    /// after that body has killed and reaped the process, so the slot is
    /// released only once the helper is dead.
    host_slot: Option<crate::host::HostSlot>,
}

/// The keeper's samples of one helper's memory and CPU time (atomics: the
/// keeper writes them, `stats()` and eviction read them).
#[derive(Debug)]
pub(crate) struct Usage {
    /// Resident bytes at the last sample (0 before the first).
    pub(crate) resident: AtomicU64,
    /// CPU time (ns) at the last sample, or `NO_BASE` before the first.
    pub(crate) last_cpu: AtomicU64,
    /// Owed time (ns, see [`Helper::owed_time`]) at the last sample.
    pub(crate) last_owed: AtomicU64,
    /// Idle CPU (ns) summed since the first sample after the last reply.
    pub(crate) idle_cpu: AtomicU64,
    /// `calls()` at the last sample: a reply since starts a new stretch.
    pub(crate) last_calls: AtomicU64,
}

/// `Usage::last_cpu` before the first sample.
pub(crate) const NO_BASE: u64 = u64::MAX;

impl Usage {
    fn new() -> Usage {
        Usage {
            resident: AtomicU64::new(0),
            last_cpu: AtomicU64::new(NO_BASE),
            last_owed: AtomicU64::new(0),
            idle_cpu: AtomicU64::new(0),
            last_calls: AtomicU64::new(0),
        }
    }
}

impl Helper {
    /// Makes the connection of a launched, verified helper and has the
    /// reactor watch it.
    pub(crate) fn new(
        parts: Parts,
        hello: Hello,
        launch_time: Duration,
        reactor: &Reactor,
    ) -> std::io::Result<Helper> {
        let stderr = match reactor.stderr() {
            Some(hub) => StderrSink::Hub {
                stream: hub.stream(parts.pid, parts.stderr),
                hub: hub.clone(),
            },
            None => StderrSink::Pipe(parts.stderr),
        };
        let region_slot = parts.region.as_ref().map_or(0, |region| {
            region.len() / 2 / parts.region_slots.max(1) as u64
        });
        let conn = Arc::new(Conn {
            pid: parts.pid,
            token: reactor.new_token(),
            link: reactor.link(),
            stdout: parts.stdout,
            process: parts.process,
            stderr,
            region: parts.region,
            region_slot,
            region_threshold: parts.region_threshold,
            max_frame: parts.max_frame,
            spin: parts.spin,
            address_space: parts.address_space,
            // The kernel's default where it cannot be read: a wrong guess
            // costs a batch the reactor path, never a frame.
            stdin_capacity: rustix::pipe::fcntl_getpipe_size(&parts.stdin).unwrap_or(65_536),
            state: Mutex::new(State {
                table: CallTable::new(parts.max_in_flight),
                ids: RequestIds::new(),
                reading: Reading::Idle,
                frames: Some(parts.frames),
                stdin: Some(Arc::new(parts.stdin)),
                outbound: VecDeque::new(),
                own_writer: false,
                free_slots: (0..parts.region_slots as u32).rev().collect(),
                health: Health::Serving,
                failure: None,
                bound: false,
                pending_bind: None,
                // Two: a call may start while the last one's completer
                // still holds its completion for a moment.
                completions: (0..2).map(|_| Arc::new(Completion::new())).collect(),
                next_look: None,
            }),
            room: Event::new(),
            calls: AtomicU64::new(0),
            retired: AtomicBool::new(false),
        });
        reactor.register(conn.clone())?;
        Ok(Helper {
            conn,
            reactor: reactor.clone(),
            hello,
            launch_time,
            calls_at_bind: AtomicU64::new(0),
            tenant_success: AtomicBool::new(false),
            users: AtomicUsize::new(0),
            failure_counted: AtomicBool::new(false),
            usage: Usage::new(),
            host_slot: None,
        })
    }

    /// Gives the helper the host-wide slot taken for its launch; it is
    /// released after the helper has been killed and reaped.
    pub(crate) fn hold_host_slot(&mut self, slot: crate::host::HostSlot) {
        self.host_slot = Some(slot);
    }

    /// The helper's pid.
    pub fn pid(&self) -> u32 {
        self.conn.pid
    }

    /// The verified Hello.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Time from spawn to a verified Hello.
    pub fn launch_time(&self) -> Duration {
        self.launch_time
    }

    /// Whether an earlier failure (or a shutdown) retired this helper.
    pub fn is_retired(&self) -> bool {
        self.conn.retired.load(Ordering::Acquire)
    }

    /// Replies the helper has sent so far (answers and handler errors, a
    /// reply whose caller had given up included).
    pub fn calls(&self) -> u64 {
        self.conn.calls.load(Ordering::Relaxed)
    }

    /// Calls answered since the helper was bound to its tenant (a spare's
    /// warm-up call does not count).
    pub fn tenant_calls(&self) -> u64 {
        self.calls()
            .saturating_sub(self.calls_at_bind.load(Ordering::Relaxed))
    }

    /// Records a successful tenant call; true the first time.
    pub(crate) fn note_tenant_success(&self) -> bool {
        !self.tenant_success.swap(true, Ordering::Relaxed)
    }

    /// Requests in flight right now: sent or queued for the wire, their
    /// replies not yet read (a request whose caller gave up included: the
    /// helper is still busy with it).
    pub fn in_flight(&self) -> usize {
        self.conn.state.lock().table.len()
    }

    /// Whether nobody uses the helper: no pool caller holds it and nothing
    /// is in flight on it.
    pub(crate) fn is_unused(&self) -> bool {
        self.users.load(Ordering::Acquire) == 0 && self.in_flight() == 0
    }

    /// Whether a pool caller holds the helper for a call.
    pub(crate) fn has_users(&self) -> bool {
        self.users.load(Ordering::Acquire) > 0
    }

    /// Marks the helper used by a pool caller until the guard drops; the
    /// caller got it at `ready` (see [`InUse::ready`]).
    pub(crate) fn use_guard(self: &Arc<Self>, ready: Instant) -> InUse {
        self.users.fetch_add(1, Ordering::AcqRel);
        InUse(self.clone(), ready)
    }

    /// Whether this is the first time the pool counts this helper's
    /// failure (it is counted once, whoever notices it).
    pub(crate) fn take_failure_count(&self) -> bool {
        !self.failure_counted.swap(true, Ordering::AcqRel)
    }

    /// The failure that retired the helper, if it failed (not if it was
    /// shut down or is still serving).
    pub(crate) fn failure(&self) -> Option<CallError> {
        let st = self.conn.state.lock();
        match st.health {
            Health::Serving | Health::Closed => None,
            Health::Dying { .. } | Health::Dead => st.failure.clone(),
        }
    }

    /// Whether the helper is failing and not yet reaped (its failure is
    /// known once it is).
    pub(crate) fn is_dying(&self) -> bool {
        matches!(self.conn.state.lock().health, Health::Dying { .. })
    }

    /// Binds this helper to a tenant: at most once in its life. The label is
    /// validated here; nothing is sent for an invalid label or a second bind.
    /// On an idle helper the Bind frame is held and goes out in the same
    /// write as the next frame (its tenant's first request: one wake-up of
    /// the helper, not two); otherwise it is written without waiting (the
    /// reactor finishes it if the pipe is full).
    pub fn bind(&self, tenant: &[u8]) -> Result<(), CallError> {
        decode_bind(tenant).map_err(CallError::InvalidTenant)?;
        self.conn.send_control(Kind::Bind, tenant)?;
        self.calls_at_bind.store(self.calls(), Ordering::Relaxed);
        if let Some(stream) = self.conn.stderr_stream() {
            stream.set_tenant(tenant);
        }
        Ok(())
    }

    /// Sends `request` and waits until `deadline` for its reply.
    pub fn call(&self, request: &[u8], deadline: Instant) -> Result<Vec<u8>, CallError> {
        let now = Instant::now();
        self.conn.call(request, deadline, now, now)
    }

    /// [`call`](Self::call) for a call that started at `started` and got
    /// this helper at `ready`.
    pub(crate) fn call_from(
        &self,
        request: &[u8],
        deadline: Instant,
        started: Instant,
        ready: Instant,
    ) -> Result<Vec<u8>, CallError> {
        self.conn.call(request, deadline, started, ready)
    }

    /// Sends every request, pipelined from this thread (as many frames in
    /// one `writev` as the table has room for, more as replies free room),
    /// and waits until `deadline` for all the replies. Results come in the
    /// order of `requests`; each fails or succeeds on its own.
    pub fn call_batch(
        &self,
        requests: &[&[u8]],
        deadline: Instant,
    ) -> Vec<Result<Vec<u8>, CallError>> {
        let now = Instant::now();
        self.conn.call_batch(requests, deadline, now, now)
    }

    pub(crate) fn call_batch_from(
        &self,
        requests: &[&[u8]],
        deadline: Instant,
        started: Instant,
        ready: Instant,
    ) -> Vec<Result<Vec<u8>, CallError>> {
        self.conn.call_batch(requests, deadline, started, ready)
    }

    /// The call as a future, for async callers: no thread waits for room,
    /// the reply or the deadline (the reactor wakes the task). Dropping the
    /// future cancels the call: a request not yet sent is never sent, one
    /// already sent has its reply discarded when it comes, and the helper
    /// is not blamed.
    pub fn call_async<'a>(
        &'a self,
        request: &'a [u8],
        deadline: Instant,
    ) -> impl Future<Output = Result<Vec<u8>, CallError>> + Send + 'a {
        let now = Instant::now();
        self.conn.call_async(request, deadline, now, now)
    }

    pub(crate) fn call_async_from<'a>(
        &'a self,
        request: &'a [u8],
        deadline: Instant,
        started: Instant,
        ready: Instant,
    ) -> impl Future<Output = Result<Vec<u8>, CallError>> + Send + 'a {
        self.conn.call_async(request, deadline, started, ready)
    }

    /// Sends a signal to the helper through its pidfd (e.g. SIGSTOP in tests).
    pub fn signal(&self, signal: crate::Signal) -> std::io::Result<()> {
        self.conn.process.signal(signal)
    }

    /// Retires the helper and ends it gracefully: closes its stdin (its cue
    /// to exit), waits up to `grace` for it to exit, then kills it; always
    /// reaps it. Calls still in flight fail. Returns how it ended.
    pub fn shutdown(&self, grace: Duration) -> ExitStatus {
        self.close_stdin();
        match self.conn.process.wait_timeout(grace) {
            Some(status) => status,
            None => self.conn.process.kill_and_reap(),
        }
    }

    /// Reaps the helper if it has exited, without blocking.
    pub(crate) fn try_wait(&self) -> Option<ExitStatus> {
        self.conn.process.try_wait()
    }

    /// Kills and reaps the helper (it was already retired).
    pub(crate) fn kill_and_reap(&self) -> ExitStatus {
        self.conn.process.kill_and_reap()
    }

    /// Closes the helper's stdin: it sees EOF and exits. Calls in flight
    /// fail with [`CallError::Retired`]; later calls are refused.
    pub(crate) fn close_stdin(&self) {
        self.conn.close_stdin();
    }

    /// Kills and reaps the helper now. Calls in flight fail with
    /// [`CallError::Retired`].
    pub fn kill(&self) -> ExitStatus {
        self.conn.kill(RetireReason::Killed)
    }

    /// Something that tells when the helper's fds are all closed (its
    /// connection dropped by every holder, the reactor included).
    pub(crate) fn fds_closed_probe(&self) -> impl Fn() -> bool + use<> {
        let conn = Arc::downgrade(&self.conn);
        move || conn.strong_count() == 0
    }

    /// Wall time during which at least one reply was owed by this helper,
    /// over its life.
    pub(crate) fn owed_time(&self) -> Duration {
        self.conn.state.lock().table.owed_time(Instant::now())
    }

    /// Retires the helper with `error` (a resource limit the keeper saw it
    /// go over) and kills it; calls in flight fail with `error` once the
    /// reactor has reaped it. Returns false if it was no longer serving.
    pub(crate) fn kill_for(&self, error: CallError) -> bool {
        let killed = {
            let mut st = self.conn.state.lock();
            let serving = matches!(st.health, Health::Serving);
            if serving {
                self.conn.retire(&mut st, error);
            }
            serving
        };
        if killed {
            self.conn.poke();
        }
        killed
    }

    /// If the process has exited (e.g. while idle), retires the helper and
    /// returns how, as a [`CallError::Died`]. Does not block.
    pub(crate) fn check_exit(&self) -> Option<CallError> {
        self.conn.check_exit()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.conn.kill(RetireReason::Dropped);
        self.reactor.deregister(self.conn.token);
    }
}

/// A pool caller's hold on a helper (see [`Helper::use_guard`]).
#[derive(Debug)]
pub(crate) struct InUse(Arc<Helper>, Instant);

impl InUse {
    pub(crate) fn helper(&self) -> &Arc<Helper> {
        &self.0
    }

    /// When the caller stopped waiting for other callers: its call's start
    /// if it did not wait (no second clock read), else the end of its wait
    /// for room under `max_helpers` or for another caller's launch. A
    /// launch for this call comes after it: that is the call's own time.
    /// A request's turn can begin no earlier: the time before was other
    /// callers', never charged to the helper (see
    /// `table::Entry::overdue_at`).
    pub(crate) fn ready(&self) -> Instant {
        self.1
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.0.users.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `start + after`, or a year after `start` (standing for "no deadline")
/// where that would overflow.
pub(crate) fn deadline_from(start: Instant, after: Duration) -> Instant {
    start
        .checked_add(after)
        .unwrap_or_else(|| start + Duration::from_secs(86_400 * 365))
}

/// `now + after`, as [`deadline_from`].
pub(crate) fn deadline_after(after: Duration) -> Instant {
    deadline_from(Instant::now(), after)
}
