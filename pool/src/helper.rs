//! One helper process: launch, verified Hello, pipelined calls, shutdown.
//!
//! Calls take `&self`, so one helper can be shared by many threads (the pool
//! holds it in an `Arc`). Concurrent calls are pipelined: each caller writes
//! its own request under the writer lock, then collects its reply. One caller
//! at a time has the reading role and reads frames off the pipe until its own
//! reply comes; a reply for another caller is parked in a small map and that
//! caller, asleep as a parked thread, is woken: that one and no other. When
//! the reader's own reply comes, it passes the role to a caller still
//! waiting. Waiting callers never spin on a lock the reader holds while it
//! sleeps in `read`. In the common case (one caller) the calling thread does
//! its own pipe I/O with no thread hop at all.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::Thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use sandpool_protocol::{HEADER_LEN, Header, Hello, Kind, RegionRef, RegionRequest, decode_bind};
use tracing::{debug, warn};

use crate::config::HelperConfig;
use crate::error::{CallError, ExitStatus, LaunchError, ProtocolViolation};
use crate::io::{FrameReader, IoFailure, drain_tail, readable_now, write_all_vectored};
use crate::launcher::{HostRegion, LaunchPlan, spawn};
use crate::process::Process;
use crate::stderr::{StderrHub, StderrStream};
use crate::verify::verify_hello;

/// Writes to a pipe of at most this many bytes are atomic: all or nothing.
const PIPE_BUF: usize = nix::libc::PIPE_BUF;
/// How much of a failed helper's stderr is read (the rest is discarded).
const STDERR_DRAIN_CAP: usize = 256 * 1024;
/// How much of it is kept in the error.
const STDERR_TAIL: usize = 2048;
/// How long a helper whose pipe closed gets to become reapable, whatever is
/// left of the call's deadline: its stdout closes a moment before it exits.
const EXIT_GRACE: Duration = Duration::from_millis(100);

/// Launches helpers from one configuration (validated once).
#[derive(Debug)]
pub struct Launcher {
    config: HelperConfig,
    plan: LaunchPlan,
    stderr_hub: Option<Arc<StderrHub>>,
}

impl Launcher {
    /// Validates `config` and prepares the launch (argv, environment).
    pub fn new(config: HelperConfig) -> Result<Launcher, LaunchError> {
        let plan = LaunchPlan::new(&config)?;
        Ok(Launcher {
            config,
            plan,
            stderr_hub: None,
        })
    }

    /// Forwards the stderr of every helper launched from now on through `hub`.
    pub(crate) fn forward_stderr(&mut self, hub: Arc<StderrHub>) {
        self.stderr_hub = Some(hub);
    }

    /// The configuration.
    pub fn config(&self) -> &HelperConfig {
        &self.config
    }

    /// Spawns a helper and waits (up to `spawn_timeout`) for a Hello that
    /// proves the startup contract. On any failure the child is killed and
    /// reaped before the error is returned.
    pub fn launch(&self) -> Result<Helper, LaunchError> {
        self.launch_until(Instant::now() + self.config.spawn_timeout)
    }

    /// Like [`launch`](Self::launch), but gives up at `deadline` if that
    /// comes before `spawn_timeout` does.
    pub fn launch_until(&self, deadline: Instant) -> Result<Helper, LaunchError> {
        let started = Instant::now();
        let deadline = deadline.min(started + self.config.spawn_timeout);
        let spawned = spawn(&self.plan)?;
        let pid = spawned.pid;
        let mut process = Process::new(pid, spawned.pidfd);
        let mut reader = FrameReader::new(self.config.spin_wait);
        let first = reader.read_frame(&spawned.stdout, deadline, self.config.max_frame);
        let refuse = |process: &mut Process, violation| {
            process.kill_and_reap();
            LaunchError::Protocol { pid, violation }
        };
        let (header, payload) = match first {
            Ok(frame) => frame,
            Err(failure) => {
                let stderr = || stderr_tail(&spawned.stderr);
                return Err(match failure {
                    IoFailure::Timeout => {
                        process.kill_and_reap();
                        LaunchError::HelloTimeout {
                            pid,
                            waited: started.elapsed(),
                            stderr: stderr(),
                        }
                    }
                    IoFailure::StdoutClosed | IoFailure::StdinClosed => {
                        match process.wait_timeout(EXIT_GRACE) {
                            Some(status) => LaunchError::ExitedBeforeHello {
                                pid,
                                status,
                                stderr: stderr(),
                            },
                            None => refuse(&mut process, ProtocolViolation::ClosedStdout),
                        }
                    }
                    IoFailure::Decode(err) => refuse(&mut process, ProtocolViolation::Frame(err)),
                    IoFailure::Os(source) => {
                        process.kill_and_reap();
                        LaunchError::Io { pid, source }
                    }
                });
            }
        };
        if header.kind != Kind::Hello {
            return Err(refuse(
                &mut process,
                ProtocolViolation::NoHello(header.kind),
            ));
        }
        let hello = match Hello::decode(&payload) {
            Ok(hello) => hello,
            Err(err) => return Err(refuse(&mut process, ProtocolViolation::Hello(err))),
        };
        if let Err(refusal) = verify_hello(&hello, pid, &self.config.sandbox) {
            process.kill_and_reap();
            warn!(pid, %refusal, "helper refused");
            return Err(LaunchError::HelloRefused { pid, refusal });
        }
        let launch_time = started.elapsed();
        debug!(
            pid,
            fds_closed = hello.fds_closed,
            fd_close_us = hello.fd_close_nanos / 1000,
            launch_us = launch_time.as_micros() as u64,
            "helper ready"
        );
        let stdin_capacity = nix::fcntl::fcntl(&spawned.stdin, nix::fcntl::FcntlArg::F_GETPIPE_SZ)
            .map_or(0, |size| usize::try_from(size).unwrap_or(0));
        let region_slot = spawned.region.as_ref().map_or(0, |region| {
            region.len() / 2 / self.config.region_slots.max(1) as u64
        });
        let stderr = match &self.stderr_hub {
            Some(hub) => StderrSink::Hub {
                stream: hub.register(pid, spawned.stderr),
                hub: hub.clone(),
            },
            None => StderrSink::Pipe(spawned.stderr),
        };
        Ok(Helper {
            pid,
            hello,
            launch_time,
            max_frame: self.config.max_frame,
            max_in_flight: self.config.max_in_flight,
            writer: Mutex::new(Writer {
                stdin: Some(spawned.stdin),
                ids: RequestIds::new(),
                bound: false,
            }),
            reader: Mutex::new(Reader {
                stdout: spawned.stdout,
                frames: reader,
            }),
            replies: Mutex::new(Replies::default()),
            outstanding: Mutex::new(Outstanding {
                free_slots: (0..self.config.region_slots as u32).rev().collect(),
                ..Outstanding::default()
            }),
            in_flight: Mutex::new(0),
            slot_freed: Condvar::new(),
            failure: Mutex::new(None),
            retired: AtomicBool::new(false),
            process: Mutex::new(process),
            stderr,
            region: spawned.region,
            region_free: Condvar::new(),
            region_threshold: self.config.region_threshold,
            stdin_capacity,
            region_slot,
            calls: AtomicU64::new(0),
            calls_at_bind: AtomicU64::new(0),
            tenant_success: AtomicBool::new(false),
        })
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

fn stderr_tail(stderr: &OwnedFd) -> String {
    String::from_utf8_lossy(&drain_tail(stderr, STDERR_DRAIN_CAP, STDERR_TAIL)).into_owned()
}

/// Where a helper's stderr goes: read only when it fails (a lone helper), or
/// forwarded to the log as it arrives (a pool's helpers).
#[derive(Debug)]
enum StderrSink {
    Pipe(OwnedFd),
    Hub {
        stream: Arc<StderrStream>,
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

#[derive(Debug)]
struct Writer {
    stdin: Option<OwnedFd>,
    ids: RequestIds,
    bound: bool,
}

/// Request ids: unique among the calls in flight, and unpredictable to the
/// helper. The high half counts calls (unique while fewer than 2^32 are in
/// flight); the low half is a SipHash of the count under a key the helper
/// never sees. A helper that answers a request before it is sent must guess
/// 32 random bits, and a wrong guess is a protocol violation that kills it:
/// the host need not look at the pipe before every send to catch it.
#[derive(Debug)]
struct RequestIds {
    count: u64,
    key: std::hash::RandomState,
}

impl RequestIds {
    fn new() -> Self {
        RequestIds {
            count: 0,
            key: std::hash::RandomState::new(),
        }
    }

    fn next(&mut self) -> u64 {
        use std::hash::BuildHasher;
        self.count = self.count.wrapping_add(1);
        let noise = self.key.hash_one(self.count) as u32;
        // Never 0: that id belongs to Hello, Bind and Shutdown.
        ((self.count << 32) | u64::from(noise)).max(1)
    }
}

/// The helper's stdout. Only the caller with the reading role locks it
/// (and, with nothing in flight, a sender checking for stray bytes).
#[derive(Debug)]
struct Reader {
    stdout: OwnedFd,
    frames: FrameReader,
}

/// Who reads, and the replies read for callers who did not.
#[derive(Debug, Default)]
struct Replies {
    /// A caller has the reading role.
    reading: bool,
    /// Replies read by one caller on behalf of another, by request id, for
    /// callers still waiting (a reply whose caller gave up is never parked,
    /// or is dropped when it gives up): at most `max_in_flight`.
    parked: HashMap<u64, Result<Vec<u8>, CallError>>,
    /// Callers asleep until their reply is parked or the reading role is
    /// theirs to take; at most `max_in_flight` (each holds an in-flight slot).
    waiting: Vec<(u64, Thread)>,
    /// Ids whose callers gave up after their reply was read but before it
    /// was parked: dropped when it is. Rarely more than one.
    gave_up: HashSet<u64>,
}

impl Replies {
    /// Wakes a waiting caller to take the reading role, if any waits.
    fn wake_next_reader(&self) {
        if let Some((_, thread)) = self.waiting.first() {
            thread.unpark();
        }
    }

    fn stop_waiting(&mut self, id: u64) {
        self.waiting.retain(|(waiting, _)| *waiting != id);
    }

    /// A waiting caller leaves without reading. The role may have been
    /// passed to it (a wake-up for its parked reply and one for the role
    /// merge into one), so if nobody reads it passes the role on.
    fn leave_unread(&mut self, id: u64) {
        self.stop_waiting(id);
        if !self.reading {
            self.wake_next_reader();
        }
    }
}

/// A request written to the helper and not yet answered.
#[derive(Debug)]
struct Owed {
    id: u64,
    /// Its caller's deadline.
    deadline: Instant,
    /// When it was written.
    sent: Instant,
    /// When it became the first reply owed (the helper's turn to answer it).
    front_since: Option<Instant>,
    /// Its caller gave up: the reply is dropped when it comes.
    abandoned: bool,
}

impl Owed {
    /// When the helper, owing this reply first, is overdue on it: at its
    /// caller's deadline, or, if its turn came late (behind another
    /// caller's slow request), as long after its turn as its caller allowed
    /// it in all.
    fn overdue_at(&self) -> Instant {
        let budget = self.deadline.saturating_duration_since(self.sent);
        let turn = self.front_since.unwrap_or(self.sent);
        turn.checked_add(budget)
            .map_or(self.deadline, |late| late.max(self.deadline))
    }
}

/// Requests in flight, and the region's slots.
#[derive(Debug, Default)]
struct Outstanding {
    /// Requests written and not yet answered, in the order they were written
    /// (the order the helper must answer them in).
    queue: VecDeque<Owed>,
    /// Requests in flight through the region, with the slot each was
    /// granted (its part of the request half and of the response half).
    granted: Vec<(u64, u32)>,
    /// Region slots free to claim. A slot is in use from the claim of a
    /// caller about to send until the reply to its request is consumed.
    free_slots: Vec<u32>,
}

impl Outstanding {
    /// Whether a region slot is held by a request whose caller gave up.
    fn orphaned_slot(&self) -> bool {
        self.queue
            .iter()
            .any(|owed| owed.abandoned && self.granted.iter().any(|(id, _)| *id == owed.id))
    }
}

/// A caller's claim on a region slot, released on drop unless it was
/// handed over to the request in flight (then the reply's consumption
/// releases it).
struct RegionClaim<'a> {
    helper: &'a Helper,
    slot: u32,
    armed: bool,
}

impl Drop for RegionClaim<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.helper.release_slot(self.slot);
        }
    }
}

/// A running, verified helper.
///
/// Calls take `&self` and may come from many threads at once; up to
/// `max_in_flight` of them are pipelined. After a timeout, a protocol
/// violation or the helper's death the helper is *retired*: the process has
/// been killed and reaped, every call in flight fails with the same error,
/// and every later call returns [`CallError::Retired`]. Dropping the handle
/// kills and reaps the process if it is still running.
#[derive(Debug)]
pub struct Helper {
    pid: u32,
    hello: Hello,
    launch_time: Duration,
    max_frame: u32,
    max_in_flight: usize,
    writer: Mutex<Writer>,
    reader: Mutex<Reader>,
    replies: Mutex<Replies>,
    outstanding: Mutex<Outstanding>,
    in_flight: Mutex<usize>,
    slot_freed: Condvar,
    failure: Mutex<Option<CallError>>,
    retired: AtomicBool,
    process: Mutex<Process>,
    stderr: StderrSink,
    /// The shared region for large payloads, if configured.
    region: Option<HostRegion>,
    /// Signalled (with `outstanding`) when the region becomes free.
    region_free: Condvar,
    region_threshold: usize,
    /// Capacity of the helper's stdin pipe (0 if unknown: then a large frame
    /// waits until nothing earlier is owed).
    stdin_capacity: usize,
    /// Size of one region slot in each half (0 without a region).
    region_slot: u64,
    calls: AtomicU64,
    /// `calls` when the helper was bound (a spare's warm-up came before).
    calls_at_bind: AtomicU64,
    /// Whether a call of its tenant has succeeded yet.
    tenant_success: AtomicBool,
}

/// A reply read off the pipe: its request id, whether its caller gave up on
/// it, and its outcome.
type Reply = (u64, bool, Result<Vec<u8>, CallError>);

/// A claimed in-flight slot, released on drop.
struct Slot<'a>(&'a Helper);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.0.in_flight.lock();
        *in_flight -= 1;
        drop(in_flight);
        self.0.slot_freed.notify_one();
    }
}

impl Helper {
    /// The helper's pid.
    pub fn pid(&self) -> u32 {
        self.pid
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
        self.retired.load(Ordering::Acquire)
    }

    /// Calls answered so far (successfully or with a handler error).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
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

    /// Calls in flight right now.
    pub fn in_flight(&self) -> usize {
        *self.in_flight.lock()
    }

    /// Binds this helper to a tenant: at most once in its life. The label is
    /// validated here; nothing is sent for an invalid label or a second bind.
    pub fn bind(&self, tenant: &[u8], deadline: Instant) -> Result<(), CallError> {
        decode_bind(tenant).map_err(CallError::InvalidTenant)?;
        let mut writer = self.lock_writer(deadline, Instant::now())?;
        if writer.bound {
            return Err(CallError::AlreadyBound { pid: self.pid });
        }
        self.send(&mut writer, Kind::Bind, 0, tenant, deadline, Instant::now())?;
        writer.bound = true;
        self.calls_at_bind.store(self.calls(), Ordering::Relaxed);
        if let StderrSink::Hub { stream, .. } = &self.stderr {
            stream.set_tenant(tenant);
        }
        Ok(())
    }

    /// Sends `request` and waits until `deadline` for its reply.
    pub fn call(&self, request: &[u8], deadline: Instant) -> Result<Vec<u8>, CallError> {
        self.call_from(request, deadline, Instant::now())
    }

    /// [`call`](Self::call) for a call that started at `started`.
    pub(crate) fn call_from(
        &self,
        request: &[u8],
        deadline: Instant,
        started: Instant,
    ) -> Result<Vec<u8>, CallError> {
        self.check_retired()?;
        // Large requests go through the shared region, one per slot: a slot
        // stays claimed until the reply has been consumed.
        let region = self.region.as_ref().filter(|_| {
            request.len() >= self.region_threshold && request.len() as u64 <= self.region_slot
        });
        if region.is_none() && request.len() > self.max_frame as usize {
            return Err(CallError::RequestTooLarge {
                len: request.len(),
                max: self.max_frame,
            });
        }
        let _slot = self.claim_slot(deadline)?;
        let mut claim = match region {
            Some(region) => {
                let claim = self.claim_region(deadline, started)?;
                // Outside the writer lock: a large copy must not make other
                // callers wait for the pipe (they would blame the helper).
                region.write(u64::from(claim.slot) * self.region_slot, request);
                Some(claim)
            }
            None => None,
        };
        let id = {
            let mut writer = self.lock_writer(deadline, started)?;
            let id = writer.ids.next();
            if let (Some(claim), Some(region)) = (&claim, &self.region) {
                let slot_at = u64::from(claim.slot) * self.region_slot;
                let at = RegionRequest {
                    request: RegionRef {
                        offset: slot_at,
                        len: request.len() as u64,
                    },
                    reply: RegionRef {
                        offset: region.len() / 2 + slot_at,
                        len: self.region_slot,
                    },
                };
                // Granted before it is sent: the reply may be read by
                // another caller the moment the frame is out.
                self.outstanding.lock().granted.push((id, claim.slot));
                self.send(
                    &mut writer,
                    Kind::RequestInRegion,
                    id,
                    &at.encode(),
                    deadline,
                    started,
                )?;
            } else {
                self.send(&mut writer, Kind::Request, id, request, deadline, started)?;
            }
            id
        };
        if let Some(claim) = claim.as_mut() {
            // Sent: the region now belongs to request `id` until its reply
            // is consumed (by whichever caller reads it) or the helper fails.
            claim.armed = false;
        }
        let result = self.collect(id, deadline, started);
        if matches!(result, Ok(_) | Err(CallError::Helper(_))) {
            self.calls.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Waits (until `deadline`) for a region slot to be free and claims it.
    fn claim_region(
        &self,
        deadline: Instant,
        started: Instant,
    ) -> Result<RegionClaim<'_>, CallError> {
        let mut outstanding = self.outstanding.lock();
        loop {
            if self.is_retired() {
                drop(outstanding);
                self.check_retired()?;
                return Err(CallError::Retired {
                    pid: self.pid,
                    reason: "retired".into(),
                });
            }
            if let Some(slot) = outstanding.free_slots.pop() {
                return Ok(RegionClaim {
                    helper: self,
                    slot,
                    armed: true,
                });
            }
            // A slot waits for the reply of a call that gave up: nobody else
            // may ever read it, so this caller reads (and drops) it.
            if outstanding.orphaned_slot() {
                drop(outstanding);
                if self.take_reading_role() {
                    let outcome = self.read_orphans(deadline, started);
                    self.leave_reading_role();
                    outcome?;
                    outstanding = self.outstanding.lock();
                    continue;
                }
                // Somebody reads already: wait for it like anyone else.
                outstanding = self.outstanding.lock();
            }
            // Otherwise whoever reads the pipe frees it; look again now and
            // then in case that reader leaves before the reply comes.
            let wake = deadline.min(Instant::now() + Duration::from_millis(5));
            let _ = self.region_free.wait_until(&mut outstanding, wake);
            if Instant::now() >= deadline {
                return Err(self.queue_timeout(started));
            }
        }
    }

    /// With the reading role, for a caller that has sent nothing: reads
    /// replies while an abandoned region call's reply is still to come and
    /// no slot is free. Its timeouts are judged as any reader's (see
    /// `read_reply`).
    fn read_orphans(&self, deadline: Instant, started: Instant) -> Result<(), CallError> {
        let mut reader = self.reader.lock();
        loop {
            {
                let outstanding = self.outstanding.lock();
                if !outstanding.orphaned_slot() || !outstanding.free_slots.is_empty() {
                    return Ok(());
                }
            }
            self.read_for_others(&mut reader, deadline, started)?;
        }
    }

    /// Whether the request the helper must answer next is past its caller's
    /// deadline.
    fn first_owed_is_overdue(&self) -> bool {
        self.first_owed_overdue_at()
            .is_some_and(|at| at <= Instant::now())
    }

    /// When the helper is overdue on the reply it owes first, if it owes any.
    fn first_owed_overdue_at(&self) -> Option<Instant> {
        self.outstanding.lock().queue.front().map(Owed::overdue_at)
    }

    /// Frees a region slot for the next large call.
    fn release_slot(&self, slot: u32) {
        let mut outstanding = self.outstanding.lock();
        outstanding.granted.retain(|(_, granted)| *granted != slot);
        outstanding.free_slots.push(slot);
        drop(outstanding);
        self.region_free.notify_one();
    }

    fn check_retired(&self) -> Result<(), CallError> {
        if self.is_retired() {
            let reason = self
                .failure
                .lock()
                .as_ref()
                .map_or_else(|| "retired".to_owned(), ToString::to_string);
            return Err(CallError::Retired {
                pid: self.pid,
                reason,
            });
        }
        Ok(())
    }

    fn claim_slot(&self, deadline: Instant) -> Result<Slot<'_>, CallError> {
        let mut in_flight = self.in_flight.lock();
        while *in_flight >= self.max_in_flight {
            if self
                .slot_freed
                .wait_until(&mut in_flight, deadline)
                .timed_out()
            {
                return Err(CallError::Saturated {
                    pid: self.pid,
                    in_flight: *in_flight,
                });
            }
        }
        *in_flight += 1;
        Ok(Slot(self))
    }

    fn lock_writer(
        &self,
        deadline: Instant,
        started: Instant,
    ) -> Result<MutexGuard<'_, Writer>, CallError> {
        // The writer lock is held while a frame is written (and, while
        // replies are owed, while its writer waits for room to write it
        // whole). A caller that merely queued behind it has sent nothing
        // and blames nobody.
        self.writer
            .try_lock_until(deadline)
            .ok_or_else(|| self.queue_timeout(started))
    }

    /// Writes one frame. Before a frame goes out with nothing else in flight,
    /// checks that no bytes beyond the last reply were read with it (a
    /// duplicate answer). Bytes the helper sends later, unasked, are caught
    /// when they are read as the next reply: their id cannot match the next
    /// request's (see [`RequestIds`]).
    fn send(
        &self,
        writer: &mut Writer,
        kind: Kind,
        id: u64,
        payload: &[u8],
        deadline: Instant,
        started: Instant,
    ) -> Result<(), CallError> {
        self.check_retired()?;
        let outstanding = self.outstanding.lock();
        if outstanding.queue.is_empty() {
            if let Some(mut guard) = self.reader.try_lock() {
                let reader = &mut *guard;
                if reader.frames.has_buffered() {
                    let unsolicited =
                        reader
                            .frames
                            .read_frame(&reader.stdout, Instant::now(), self.max_frame);
                    drop(guard);
                    drop(outstanding);
                    return Err(match unsolicited {
                        Ok((header, _)) => self.fail_violation(ProtocolViolation::Unsolicited {
                            kind: header.kind,
                            id: header.id,
                        }),
                        Err(IoFailure::Timeout) => {
                            self.fail_violation(ProtocolViolation::UnsolicitedPartial)
                        }
                        Err(failure) => self.fail_io(failure, started),
                    });
                }
            }
        }
        let Some(len) = u32::try_from(payload.len())
            .ok()
            .filter(|len| *len <= self.max_frame)
        else {
            return Err(CallError::RequestTooLarge {
                len: payload.len(),
                max: self.max_frame,
            });
        };
        let head = Header { kind, id, len }.encode();
        let Some(stdin) = &writer.stdin else {
            return Err(CallError::Retired {
                pid: self.pid,
                reason: "stdin already closed".into(),
            });
        };
        // While the helper still owes earlier replies it may be busy with
        // another caller's request for a while. A frame cut by this
        // caller's deadline would leave the stream mid-frame (only
        // retiring the helper ends that), so while anything is owed a frame
        // goes out whole or not at all: a small one (PIPE_BUF, atomic) is
        // tried once without waiting, and any that does not go out waits,
        // sending nothing, until it fits the pipe.
        let queued = matches!(kind, Kind::Request | Kind::RequestInRegion);
        let owes_earlier = !outstanding.queue.is_empty();
        drop(outstanding);
        // One clock read serves this check and the request's send time,
        // unless it has to wait before it goes out.
        let mut checked = queued.then(Instant::now);
        if checked.is_some_and(|now| now >= deadline) {
            // Its time ran out in the queue for the writer: a request the
            // helper could never answer in time is not sent at all.
            return Err(self.queue_timeout(started));
        }
        let frame_len = HEADER_LEN + payload.len();
        let mut frame = [std::io::IoSlice::new(&head), std::io::IoSlice::new(payload)];
        let stdin = stdin.as_fd();
        let enqueue = |at: Option<Instant>| {
            if queued {
                let now = at.unwrap_or_else(Instant::now);
                let mut outstanding = self.outstanding.lock();
                let front_since = outstanding.queue.is_empty().then_some(now);
                outstanding.queue.push_back(Owed {
                    id,
                    deadline,
                    sent: now,
                    front_since,
                    abandoned: false,
                });
            }
        };
        // Called with the writer lock held, so the id is the last queued.
        let take_back = || {
            if queued {
                self.outstanding.lock().queue.retain(|owed| owed.id != id);
            }
        };
        if owes_earlier {
            if frame_len <= PIPE_BUF {
                // All or nothing (it needs one free pipe slot): try without
                // waiting (`started` has passed), and between tries let the
                // helper take in more of its stdin.
                loop {
                    enqueue(checked.take());
                    match write_all_vectored(stdin, &mut frame, started) {
                        Ok(()) => return Ok(()),
                        Err((IoFailure::Timeout, 0)) => take_back(),
                        Err((failure, _)) => return Err(self.fail_io(failure, started)),
                    }
                    if !self.wait_for_stdin(deadline, started)? {
                        break;
                    }
                }
            } else {
                self.wait_for_room(stdin, frame_len, deadline, started)?;
                checked = None;
            }
        }
        enqueue(checked);
        match write_all_vectored(stdin, &mut frame, deadline) {
            Ok(()) => Ok(()),
            // Nothing of the frame went out, and the helper is busy with an
            // earlier request still within its caller's deadline: take the
            // request back and blame nobody.
            Err((IoFailure::Timeout, 0)) if owes_earlier && !self.overdue_and_silent() => {
                take_back();
                Err(self.queue_timeout(started))
            }
            Err((failure, _)) => Err(self.fail_io(failure, started)),
        }
    }

    /// Waits, sending nothing, until a frame of `len` bytes surely fits the
    /// helper's stdin pipe, or the helper owes no earlier reply (it is
    /// reading, so the frame flows in as fast as it reads).
    fn wait_for_room(
        &self,
        stdin: std::os::fd::BorrowedFd<'_>,
        len: usize,
        deadline: Instant,
        started: Instant,
    ) -> Result<(), CallError> {
        // The kernel's pipe page: a pipe is a ring of capacity / page slots.
        let page = rustix::param::page_size();
        loop {
            // FIONREAD on a pipe's write end counts the bytes still in it.
            // A write shares the last page only if its tail fits there, so
            // queued bytes may take up to twice their size in pages, plus a
            // partly read page and the new frame's own partial pages.
            let queued = rustix::io::ioctl_fionread(stdin).map_or(usize::MAX / 4, |n| {
                usize::try_from(n).unwrap_or(usize::MAX / 4)
            });
            let needed = len
                .saturating_add(queued.saturating_mul(2))
                .saturating_add(page.saturating_mul(4));
            if needed <= self.stdin_capacity || !self.wait_for_stdin(deadline, started)? {
                return Ok(());
            }
        }
    }

    /// One pass of waiting, sending nothing, for the helper to take in more
    /// of its stdin: false at once if it owes nothing (it is reading).
    /// Replies to callers who gave up are read meanwhile if nobody reads: a
    /// helper blocked writing them reads no requests. At the deadline: a
    /// queue timeout, unless the helper is overdue on the request it owes
    /// first (then it is retired).
    fn wait_for_stdin(&self, deadline: Instant, started: Instant) -> Result<bool, CallError> {
        self.check_retired()?;
        if self.outstanding.lock().queue.is_empty() {
            return Ok(false);
        }
        if self.take_reading_role() {
            let read = self.read_abandoned(deadline, started);
            self.leave_reading_role();
            if read? {
                return Ok(true);
            }
        }
        if self.overdue_and_silent() {
            return Err(self.fail_timeout(started));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(self.queue_timeout(started));
        }
        std::thread::sleep((deadline - now).min(Duration::from_micros(200)));
        Ok(true)
    }

    /// Whether the helper is overdue on the reply it owes first and nothing
    /// of a reply is waiting to be read (a reply that came in time but that
    /// nobody has read yet is no fault of the helper's). If another caller
    /// holds the reader, that reader is the judge: false.
    fn overdue_and_silent(&self) -> bool {
        self.first_owed_is_overdue()
            && self.reader.try_lock().is_some_and(|reader| {
                !reader.frames.has_buffered() && !readable_now(&reader.stdout)
            })
    }

    /// With the reading role: reads the replies that have arrived for
    /// callers who gave up, while the helper owes one of those first (a
    /// reply for a caller still waiting is left to that caller). Whether it
    /// read any.
    fn read_abandoned(&self, deadline: Instant, started: Instant) -> Result<bool, CallError> {
        let mut reader = self.reader.lock();
        let mut read = false;
        loop {
            let abandoned_first = self
                .outstanding
                .lock()
                .queue
                .front()
                .is_some_and(|owed| owed.abandoned);
            if !abandoned_first || !(reader.frames.has_buffered() || readable_now(&reader.stdout)) {
                return Ok(read);
            }
            self.read_for_others(&mut reader, deadline, started)?;
            read = true;
        }
    }

    /// Waits for the reply to `id`: reads frames (its own and others') if
    /// nobody else is reading, or sleeps until a reader parks its reply or
    /// passes the reading role on.
    fn collect(&self, id: u64, deadline: Instant, started: Instant) -> Result<Vec<u8>, CallError> {
        let mut replies = self.replies.lock();
        loop {
            if let Some(result) = replies.parked.remove(&id) {
                replies.leave_unread(id);
                return result;
            }
            if self.is_retired() {
                // Another caller saw the failure; every call in flight gets it.
                replies.leave_unread(id);
                drop(replies);
                return Err(self.failure.lock().clone().unwrap_or(CallError::Retired {
                    pid: self.pid,
                    reason: "retired".into(),
                }));
            }
            let now = Instant::now();
            if now >= deadline {
                // Queued behind other callers' replies (the reader answers
                // for the helper's health): give up on this reply without
                // blaming the helper. Its reply is dropped when it comes.
                replies.leave_unread(id);
                drop(replies);
                self.give_up(id);
                return Err(self.queue_timeout(started));
            }
            if !replies.reading {
                replies.reading = true;
                replies.stop_waiting(id);
                drop(replies);
                return self.read_until(id, deadline, started);
            }
            if !replies.waiting.iter().any(|(waiting, _)| *waiting == id) {
                replies.waiting.push((id, std::thread::current()));
            }
            drop(replies);
            // Woken when the reply is parked, when the role is passed on, or
            // when the helper fails; a spurious wake-up just looks again.
            std::thread::park_timeout(deadline - now);
            replies = self.replies.lock();
        }
    }

    /// With the reading role: reads frames until the reply to `id`, parks
    /// the others for their callers, then passes the role on. Its deadline
    /// passing between frames while the helper owes an earlier reply still
    /// within its own caller's deadline is a queue timeout, like a waiter's.
    fn read_until(
        &self,
        id: u64,
        deadline: Instant,
        started: Instant,
    ) -> Result<Vec<u8>, CallError> {
        let mut reader = self.reader.lock();
        let outcome = loop {
            match self.read_reply(&mut reader, deadline, started) {
                Ok((reply_id, _, result)) if reply_id == id => break result,
                Ok((reply_id, abandoned, result)) => {
                    if !abandoned {
                        self.deliver(reply_id, result);
                    }
                }
                Err(err) => break Err(err),
            }
        };
        drop(reader);
        if matches!(outcome, Err(CallError::QueueTimeout { .. })) {
            self.give_up(id);
        }
        self.leave_reading_role();
        outcome
    }

    /// Reads one reply for another caller: parks it for its caller, or drops
    /// it if its caller gave up.
    fn read_for_others(
        &self,
        reader: &mut Reader,
        deadline: Instant,
        started: Instant,
    ) -> Result<(), CallError> {
        let (reply_id, abandoned, result) = self.read_reply(reader, deadline, started)?;
        if !abandoned {
            self.deliver(reply_id, result);
        }
        Ok(())
    }

    /// Gives up on the reply to `id` (its caller's deadline passed while it
    /// queued): the reply is dropped whenever it comes.
    fn give_up(&self, id: u64) {
        let still_owed = {
            let mut outstanding = self.outstanding.lock();
            match outstanding.queue.iter_mut().find(|owed| owed.id == id) {
                Some(owed) => {
                    owed.abandoned = true;
                    true
                }
                None => false,
            }
        };
        if !still_owed {
            // Already read: parked for this caller, or about to be.
            let mut replies = self.replies.lock();
            if replies.parked.remove(&id).is_none() {
                replies.gave_up.insert(id);
            }
        }
    }

    /// Takes the reading role if nobody has it.
    fn take_reading_role(&self) -> bool {
        !std::mem::replace(&mut self.replies.lock().reading, true)
    }

    /// Gives the reading role up and wakes a waiting caller to take it (or,
    /// if the helper failed, to see that).
    fn leave_reading_role(&self) {
        let mut replies = self.replies.lock();
        replies.reading = false;
        replies.wake_next_reader();
    }

    /// Parks a reply read for another caller and wakes that caller.
    fn deliver(&self, id: u64, result: Result<Vec<u8>, CallError>) {
        let mut replies = self.replies.lock();
        if replies.gave_up.remove(&id) {
            return;
        }
        replies.parked.insert(id, result);
        if let Some((_, thread)) = replies.waiting.iter().find(|(waiting, _)| *waiting == id) {
            thread.unpark();
        }
    }

    /// Reads the next reply off the pipe (the caller holds the reader lock)
    /// and returns its id, whether its caller gave up on it, and its
    /// outcome; or retires the helper on a failure and returns that.
    fn read_reply(
        &self,
        reader: &mut Reader,
        deadline: Instant,
        started: Instant,
    ) -> Result<Reply, CallError> {
        // Between frames, wait until the reader's deadline, or less if the
        // helper becomes overdue on the reply it owes first before that.
        // Once a frame has begun, give it until the later of the two: a
        // reply for a caller with more time is not cut off at the reader's.
        let overdue_at = self.first_owed_overdue_at();
        let frame = reader.frames.read_frame_until(
            &reader.stdout,
            overdue_at.map_or(deadline, |at| at.min(deadline)),
            overdue_at.map_or(deadline, |at| at.max(deadline)),
            self.max_frame,
        );
        let (header, payload) = match frame {
            Ok(frame) => frame,
            // A timeout between frames blames the helper only if it is
            // overdue on the reply it owes first (`Owed::overdue_at`): a
            // reader queued behind another caller's slow request, still
            // within that request's budget, gives up like a waiter. Inside
            // a frame the stream cannot be resumed, and the helper is
            // retired.
            Err(IoFailure::Timeout)
                if reader.frames.at_frame_boundary() && !self.first_owed_is_overdue() =>
            {
                return Err(self.queue_timeout(started));
            }
            Err(failure) => {
                return Err(self.fail_io(failure, started));
            }
        };
        let (expected, abandoned, granted) = {
            let mut outstanding = self.outstanding.lock();
            let owed = outstanding.queue.pop_front();
            if let Some(next) = outstanding.queue.front_mut() {
                next.front_since.get_or_insert_with(Instant::now);
            }
            let expected = owed.as_ref().map(|owed| owed.id);
            let granted = outstanding
                .granted
                .iter()
                .find(|(id, _)| Some(*id) == expected)
                .map(|(_, slot)| *slot);
            (expected, owed.is_some_and(|owed| owed.abandoned), granted)
        };
        let result = match header.kind {
            Kind::Response | Kind::Error | Kind::ResponseInRegion
                if Some(header.id) != expected =>
            {
                return Err(self.fail_violation(match expected {
                    Some(expected) => ProtocolViolation::UnexpectedId {
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
                let (Some(region), Some(slot)) = (self.region.as_ref(), granted) else {
                    return Err(self.fail_violation(ProtocolViolation::RegionNotGranted(header.id)));
                };
                // Only the window this request was granted.
                let start = region.len() / 2 + u64::from(slot) * self.region_slot;
                let end = start + self.region_slot;
                // Bounds first, then copy out: the helper may rewrite
                // the bytes at any moment after this.
                let at = match RegionRef::decode(&payload, start, end) {
                    Ok(at) => at,
                    Err(err) => {
                        return Err(self.fail_violation(ProtocolViolation::Region(err)));
                    }
                };
                match region.read(at.offset, at.len) {
                    Ok(bytes) => Ok(bytes),
                    Err(source) => {
                        return Err(self.fail(CallError::Io {
                            pid: self.pid,
                            source,
                        }));
                    }
                }
            }
            Kind::Error => match String::from_utf8(payload) {
                Ok(message) => Err(CallError::Helper(message)),
                Err(_) => {
                    return Err(self.fail_violation(ProtocolViolation::ErrorNotUtf8));
                }
            },
            Kind::Hello => {
                return Err(self.fail_violation(ProtocolViolation::SecondHello));
            }
            // Host-to-helper kinds are refused by the decoder already.
            kind => {
                return Err(self.fail_violation(ProtocolViolation::Unsolicited {
                    kind,
                    id: header.id,
                }));
            }
        };
        if let Some(slot) = granted {
            // The granted reply is consumed (copied out, if it came
            // through the region): the next large call may have the slot.
            self.release_slot(slot);
        }
        Ok((header.id, abandoned, result))
    }

    /// Retires the helper with `error` (the first failure wins), kills and
    /// reaps it, and returns the error every caller in flight will see.
    fn fail(&self, error: CallError) -> CallError {
        let error = {
            let mut failure = self.failure.lock();
            failure.get_or_insert(error).clone()
        };
        if !self.retired.swap(true, Ordering::AcqRel) {
            debug!(pid = self.pid, %error, "helper retired");
        }
        self.wake_all_waiters();
        self.process.lock().kill_and_reap();
        error
    }

    /// The error of a caller that gave up waiting behind other calls on
    /// this helper, which is not blamed.
    fn queue_timeout(&self, started: Instant) -> CallError {
        CallError::QueueTimeout {
            pid: self.pid,
            waited: started.elapsed(),
        }
    }

    /// Wakes every caller asleep for a region slot or a reply, to see that
    /// the helper is retired.
    fn wake_all_waiters(&self) {
        self.region_free.notify_all();
        for (_, thread) in &self.replies.lock().waiting {
            thread.unpark();
        }
    }

    fn fail_violation(&self, violation: ProtocolViolation) -> CallError {
        self.fail(CallError::Protocol {
            pid: self.pid,
            violation,
        })
    }

    fn fail_timeout(&self, started: Instant) -> CallError {
        self.fail(CallError::Timeout {
            pid: self.pid,
            after: started.elapsed(),
        })
    }

    fn fail_io(&self, failure: IoFailure, started: Instant) -> CallError {
        let pid = self.pid;
        match failure {
            IoFailure::Timeout => self.fail_timeout(started),
            IoFailure::StdoutClosed | IoFailure::StdinClosed => {
                // The helper is exiting (or lying): give it a moment to
                // become reapable; if it does not exit, it closed its pipe on
                // purpose.
                let status = self.process.lock().wait_timeout(EXIT_GRACE);
                match status {
                    Some(status) => self.fail(CallError::Died {
                        pid,
                        status,
                        stderr: self.stderr.tail(),
                    }),
                    None if matches!(failure, IoFailure::StdinClosed) => {
                        self.fail_violation(ProtocolViolation::ClosedStdin)
                    }
                    None => self.fail_violation(ProtocolViolation::ClosedStdout),
                }
            }
            IoFailure::Decode(err) => self.fail_violation(ProtocolViolation::Frame(err)),
            IoFailure::Os(source) => self.fail(CallError::Io { pid, source }),
        }
    }

    /// Sends a signal to the helper through its pidfd (e.g. SIGSTOP in tests).
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> std::io::Result<()> {
        self.process.lock().signal(signal)
    }

    /// Retires the helper and ends it gracefully: closes its stdin (its cue
    /// to exit), waits up to `grace` for it to exit, then kills it; always
    /// reaps it. Calls still in flight fail. Returns how it ended.
    pub fn shutdown(&self, grace: Duration) -> ExitStatus {
        let deadline = deadline_after(grace);
        self.close_stdin(deadline);
        // Poll rather than wait under the process lock: a caller in flight
        // may need that lock to report the helper's death.
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return self.process.lock().kill_and_reap();
            }
            std::thread::sleep(left.min(Duration::from_millis(1)));
        }
    }

    /// Reaps the helper if it has exited, without blocking.
    pub(crate) fn try_wait(&self) -> Option<ExitStatus> {
        self.process.lock().try_wait()
    }

    /// Kills and reaps the helper (it was already retired).
    pub(crate) fn kill_and_reap(&self) -> ExitStatus {
        self.process.lock().kill_and_reap()
    }

    /// Closes the helper's stdin: it finishes the requests it has already
    /// read, answers them, sees EOF and exits. Later calls are refused.
    pub(crate) fn close_stdin(&self, deadline: Instant) {
        {
            let mut failure = self.failure.lock();
            failure.get_or_insert_with(|| CallError::Retired {
                pid: self.pid,
                reason: "shut down".into(),
            });
        }
        self.retired.store(true, Ordering::Release);
        // Callers asleep for a reply or a slot see the shutdown now, not
        // at their deadlines.
        self.wake_all_waiters();
        match self.writer.try_lock_until(deadline) {
            Some(mut writer) => writer.stdin = None,
            // A writer blocked past the deadline: the helper stopped reading.
            None => {
                self.process.lock().kill();
            }
        }
    }

    /// Kills and reaps the helper now.
    pub fn kill(&self) -> ExitStatus {
        self.fail(CallError::Retired {
            pid: self.pid,
            reason: "killed".into(),
        });
        self.process.lock().kill_and_reap()
    }

    /// If the process has exited (e.g. while idle), retires the helper and
    /// returns how, as a [`CallError::Died`]. Does not block.
    pub(crate) fn check_exit(&self) -> Option<CallError> {
        if self.is_retired() {
            return None;
        }
        let status = self.process.lock().try_wait()?;
        Some(self.fail(CallError::Died {
            pid: self.pid,
            status,
            stderr: self.stderr.tail(),
        }))
    }
}
