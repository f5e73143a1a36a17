//! Tenants and their helpers: getting a tenant its helper (its bound one, a
//! spare, or a launch), the bookkeeping after a call (recycling, failures,
//! back-off), eviction at the cap. One decision function, [`Shared::step`],
//! serves the blocking and the async callers alike; only how they wait
//! differs.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use event_listener::{Event, EventListener, Listener};
use parking_lot::Mutex;
use tracing::{debug, warn};

use super::keeper::KeeperMsg;
use super::usage::Limits;
use super::{CloseCause, HelperInfo};
use crate::config::{Config, TenantPolicy};
use crate::conn::completion::Completion;
use crate::conn::{Helper, InUse};
use crate::error::{CallError, LaunchError};
use crate::host::{Host, HostSlot};
use crate::launch::Launcher;
use crate::lifecycle::{IdlePolicy, TenantLifecycle};
use crate::reactor::ReactorLink;
use crate::telemetry::Telemetry;

#[derive(Default)]
pub(super) struct Tenant {
    pub(super) helper: Option<Arc<Helper>>,
    pub(super) last_used: Option<Instant>,
    /// A caller or a launch worker is launching a helper for this tenant.
    pub(super) launching: bool,
    /// Helper failures in a row.
    pub(super) failures: u32,
    /// Of those, resource-limit kills (memory, idle CPU): a helper that
    /// answers and then goes over a limit succeeded first, so a success
    /// does not clear these, only a quiet spell (see `after_call`).
    pub(super) limit_kills: u32,
    pub(super) last_failure: Option<Instant>,
    pub(super) backoff_until: Option<Instant>,
    /// A helper taken from the tenant while it was still dying (its
    /// failure not yet known: it is known once the helper is reaped): its
    /// failure is counted then, by the caller that saw it or the keeper.
    pub(super) failed: Option<Arc<Helper>>,
    /// Its calls' history, for the idle policy (fixed size).
    pub(super) lifecycle: TenantLifecycle,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) tenants: HashMap<Box<[u8]>, Tenant>,
    pub(super) spares: VecDeque<Arc<Helper>>,
    /// Per-tenant policies set with `Pool::set_tenant_policy` (their
    /// tenants are remembered while they have one).
    pub(super) policies: HashMap<Box<[u8]>, TenantPolicy>,
    pub(super) bound: usize,
    pub(super) launching: usize,
    /// Helpers taken from their tenants and not yet reaped.
    pub(super) closing: usize,
    pub(super) shut: bool,
}

impl State {
    pub(super) fn live(&self) -> usize {
        self.bound + self.spares.len() + self.launching + self.closing
    }
}

/// A launch for an async caller, run by a launch worker.
pub(super) struct LaunchJob {
    tenant: Box<[u8]>,
    deadline: Instant,
    started: Instant,
    /// When the caller stopped waiting for others (see [`InUse::ready`]).
    ready: Instant,
    /// A launch ahead of calls (`prewarm`, the adaptive prediction): it
    /// takes a free host slot or none, never evicting or waiting for one.
    ahead: bool,
    done: Arc<Completion<Result<InUse, CallError>>>,
}

/// What a caller getting its tenant a helper does next.
enum Step {
    /// The helper, held for the call.
    Ready(InUse),
    /// Wait for a change; at the deadline, fail with the error of `WaitFor`.
    Wait(EventListener, WaitFor),
    /// This caller launches (the tenant is marked launching).
    Launch,
}

/// What a caller waits for in [`Step::Wait`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum WaitFor {
    /// Another caller's launch for the same tenant.
    Launch,
    /// Room under `max_helpers`.
    Room,
}

impl WaitFor {
    fn timed_out(self, shared: &Shared, waited: Duration) -> CallError {
        match self {
            WaitFor::Launch => CallError::LaunchWait { waited },
            WaitFor::Room => CallError::PoolFull {
                max_helpers: shared.live().config.max_helpers,
                waited,
            },
        }
    }
}

/// What `Pool::reconfigure` replaces: the configuration and the limits
/// resolved from it. Readers take a snapshot ([`Shared::live`]) and use
/// it for one decision, so a change applies from the next decision on.
pub(super) struct Live {
    pub(super) config: Arc<Config>,
    /// The resource limits the keeper enforces.
    pub(super) limits: Limits,
    /// The adaptive idle policy with the configured tuning.
    pub(super) adaptive: IdlePolicy,
}

impl Live {
    pub(super) fn new(config: Config, limits: Limits) -> Live {
        Live {
            adaptive: IdlePolicy::Adaptive(config.adaptive.clone()),
            config: Arc::new(config),
            limits,
        }
    }
}

pub(super) struct Shared {
    live: parking_lot::RwLock<Arc<Live>>,
    /// Time zero of the tenants' lifecycle clocks.
    pub(super) epoch: Instant,
    pub(super) launcher: Launcher,
    /// The launcher's reactor, for the delayed refill notice.
    reactor: ReactorLink,
    pub(super) state: Mutex<State>,
    /// Notified whenever a helper is installed, a launch ends, or room
    /// frees up.
    pub(super) changed: Event,
    /// Calls waiting for room under `max_helpers`: a call that finishes
    /// makes its helper evictable, and must then wake them.
    waiting_for_room: AtomicUsize,
    /// A call took a spare: when that call is done it arms the reactor's
    /// delayed notice, which tells the keeper [`REFILL_DELAY`] later (the
    /// keeper refills on its own scans regardless, at most a tick later).
    ///
    /// [`REFILL_DELAY`]: super::keeper::REFILL_DELAY
    refill_wanted: AtomicBool,
    pub(super) keeper: Sender<KeeperMsg>,
    launches: Mutex<Option<Sender<LaunchJob>>>,
    pub(super) telemetry: Telemetry,
    /// Resident bytes of all live helpers at the last sample, less what
    /// was evicted since.
    pub(super) resident_total: AtomicU64,
    /// Whether the busy helpers alone fit the memory budget at the last
    /// sample (else evicting idle ones cannot reach it).
    pub(super) budget_reachable: AtomicBool,
    /// Spares killed for a resource limit in a row, and until when spare
    /// refills wait (crash_backoff, doubling); cleared when a spare is
    /// bound.
    pub(super) spare_strikes: Mutex<(u32, Option<Instant>)>,
    /// This process's membership of a host directory (`Config.host`).
    pub(super) host: Option<Host>,
}

/// Counts of helpers by state, from one pass over the tenants.
pub(super) struct HelperCounts {
    pub(super) live: usize,
    pub(super) spare: usize,
    pub(super) launching: usize,
    pub(super) busy: usize,
    pub(super) idle: usize,
    pub(super) closing: usize,
    pub(super) tenants: usize,
}

/// Runs `work` (a launch: no panics are expected, but a panic there must
/// not leave a tenant marked as launching forever).
pub(super) fn guarded<T>(work: impl FnOnce() -> Result<T, CallError>) -> Result<T, CallError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(CallError::Launch(Arc::new(LaunchError::Panicked(message))))
    })
}

/// The tenant's entry, created if missing (it can vanish while the lock is
/// released, e.g. by shutdown). Allocates only when it creates the entry.
pub(super) fn tenant_mut<'a>(state: &'a mut State, tenant: &[u8]) -> &'a mut Tenant {
    if !state.tenants.contains_key(tenant) {
        state.tenants.insert(tenant.into(), Tenant::default());
    }
    match state.tenants.get_mut(tenant) {
        Some(entry) => entry,
        None => unreachable!("inserted above under the same lock"),
    }
}

/// Drops a pool caller's count of a call in flight if its future is
/// dropped before the call finished.
struct CallGuard<'a> {
    shared: &'a Shared,
    tenant: &'a [u8],
    started: Instant,
    finished: bool,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.shared
                .telemetry
                .call_cancelled(self.tenant, self.started.elapsed());
        }
    }
}

/// Whether an outcome means nothing was sent because the helper had been
/// retired (the pool then tries the tenant's next helper).
trait NotSent {
    fn not_sent(&self) -> bool;
}

impl NotSent for Result<Vec<u8>, CallError> {
    fn not_sent(&self) -> bool {
        matches!(self, Err(CallError::NotSent { .. }))
    }
}

/// A batch: only if nothing at all was sent.
impl NotSent for Vec<Result<Vec<u8>, CallError>> {
    fn not_sent(&self) -> bool {
        !self.is_empty() && self.iter().all(NotSent::not_sent)
    }
}

/// Counts a caller among those waiting for room under `max_helpers` while
/// it lives (a finishing call then wakes them: its helper may be evictable).
struct RoomWaiter<'a>(Option<&'a AtomicUsize>);

impl<'a> RoomWaiter<'a> {
    fn new(shared: &'a Shared, wait_for: WaitFor) -> Self {
        if wait_for != WaitFor::Room {
            return RoomWaiter(None);
        }
        shared.waiting_for_room.fetch_add(1, Ordering::AcqRel);
        RoomWaiter(Some(&shared.waiting_for_room))
    }
}

impl Drop for RoomWaiter<'_> {
    fn drop(&mut self) {
        if let Some(count) = self.0 {
            count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Abandons an async caller's launch job if its future is dropped.
struct Awaiting(Arc<Completion<Result<InUse, CallError>>>);

impl Drop for Awaiting {
    fn drop(&mut self) {
        // A result that came first (a helper held for the call) drops here.
        drop(self.0.abandon());
    }
}

impl Shared {
    pub(super) fn new(
        config: Config,
        launcher: Launcher,
        keeper: Sender<KeeperMsg>,
        launches: Sender<LaunchJob>,
        telemetry: Telemetry,
        limits: Limits,
        host: Option<Host>,
    ) -> Shared {
        Shared {
            live: parking_lot::RwLock::new(Arc::new(Live::new(config, limits))),
            epoch: Instant::now(),
            reactor: launcher.reactor_link(),
            launcher,
            state: Mutex::new(State::default()),
            changed: Event::new(),
            waiting_for_room: AtomicUsize::new(0),
            refill_wanted: AtomicBool::new(false),
            keeper,
            launches: Mutex::new(Some(launches)),
            telemetry,
            resident_total: AtomicU64::new(0),
            budget_reachable: AtomicBool::new(true),
            spare_strikes: Mutex::new((0, None)),
            host,
        }
    }

    /// A snapshot of the live configuration and limits.
    pub(super) fn live(&self) -> Arc<Live> {
        self.live.read().clone()
    }

    /// Replaces the live configuration (see `Pool::reconfigure`).
    pub(super) fn set_live(&self, live: Live) {
        *self.live.write() = Arc::new(live);
    }

    pub(super) fn notify_changed(&self) {
        self.changed.notify(usize::MAX);
    }

    /// One call from a thread, with retries when the helper turned out to
    /// be retired before anything was sent.
    pub(super) fn call(
        &self,
        tenant: &[u8],
        request: &[u8],
        deadline: Instant,
        started: Instant,
    ) -> Result<Vec<u8>, CallError> {
        self.telemetry.call_started();
        let result = self.with_retries(tenant, deadline, started, |held| {
            let held = held?;
            let result = held
                .helper()
                .call_from(request, deadline, started, held.ready());
            self.after_call(tenant, held.helper(), &result);
            result
        });
        self.call_done();
        self.telemetry
            .call_finished(tenant, &result, started.elapsed());
        result
    }

    /// Runs `attempt` with the tenant's helper (or the error of getting
    /// one), again (up to three times in all) while nothing was sent because
    /// the helper turned out to be retired. A retry reads the clock again.
    fn with_retries<R: NotSent>(
        &self,
        tenant: &[u8],
        deadline: Instant,
        started: Instant,
        mut attempt: impl FnMut(Result<InUse, CallError>) -> R,
    ) -> R {
        let mut attempts = 0;
        loop {
            let now = if attempts == 0 {
                started
            } else {
                Instant::now()
            };
            attempts += 1;
            let result = attempt(self.helper_for(tenant, deadline, now));
            if !self.retry(&result, attempts) {
                return result;
            }
        }
    }

    /// Several calls from a thread, pipelined on the tenant's helper.
    pub(super) fn call_batch(
        &self,
        tenant: &[u8],
        requests: &[&[u8]],
        deadline: Instant,
        started: Instant,
    ) -> Vec<Result<Vec<u8>, CallError>> {
        for _ in requests {
            self.telemetry.call_started();
        }
        let results = self.with_retries(tenant, deadline, started, |held| match held {
            Ok(held) => {
                let results =
                    held.helper()
                        .call_batch_from(requests, deadline, started, held.ready());
                for result in &results {
                    self.after_call(tenant, held.helper(), result);
                }
                results
            }
            Err(err) => requests.iter().map(|_| Err(err.clone())).collect(),
        });
        self.call_done();
        for result in &results {
            self.telemetry
                .call_finished(tenant, result, started.elapsed());
        }
        results
    }

    /// One call from an async task.
    pub(super) async fn call_async(
        &self,
        tenant: impl AsRef<[u8]> + Send,
        request: &[u8],
        deadline: Instant,
        started: Instant,
    ) -> Result<Vec<u8>, CallError> {
        let tenant = tenant.as_ref();
        self.telemetry.call_started();
        let mut guard = CallGuard {
            shared: self,
            tenant,
            started,
            finished: false,
        };
        let mut attempts = 0;
        let result = loop {
            attempts += 1;
            let now = Instant::now();
            let result = match self.helper_for_async(tenant, deadline, now).await {
                Ok(held) => {
                    let result = held
                        .helper()
                        .call_async_from(request, deadline, started, held.ready())
                        .await;
                    self.after_call(tenant, held.helper(), &result);
                    result
                }
                Err(err) => Err(err),
            };
            if !self.retry(&result, attempts) {
                break result;
            }
        };
        guard.finished = true;
        self.call_done();
        self.telemetry
            .call_finished(tenant, &result, started.elapsed());
        result
    }

    /// Whether an outcome after `attempts` tries is tried again: nothing
    /// was sent, fewer than three tries, and the pool is not shut.
    fn retry(&self, outcome: &impl NotSent, attempts: u32) -> bool {
        outcome.not_sent() && attempts < 3 && !self.state.lock().shut
    }

    /// A call let go of its helper: if calls wait for room, this helper may
    /// now be evictable.
    fn call_done(&self) {
        if self.waiting_for_room.load(Ordering::Acquire) > 0 {
            self.notify_changed();
        }
        if self.refill_wanted.load(Ordering::Relaxed)
            && self.refill_wanted.swap(false, Ordering::Relaxed)
        {
            // Not a message to the keeper: waking it here cost this call
            // 10-20 us (on 2 cores the woken keeper took this very CPU).
            // A timer the reactor waits on tells the keeper, later.
            self.reactor.notify_later(super::keeper::REFILL_DELAY);
        }
    }

    /// The tenant's helper, for a thread: its current one, a spare bound to
    /// it, or a new launch. Waits (until `deadline`) for another caller's
    /// launch for the same tenant, and for room under `max_helpers`.
    /// `started` is the time of the caller's last clock read.
    pub(super) fn helper_for(
        &self,
        tenant: &[u8],
        deadline: Instant,
        started: Instant,
    ) -> Result<InUse, CallError> {
        // Checked up front: an invalid label must not use up spares.
        sandpool_protocol::decode_bind(tenant).map_err(CallError::InvalidTenant)?;
        let mut now = started;
        loop {
            match self.step(tenant, now)? {
                Step::Ready(held) => return Ok(held),
                Step::Wait(listener, wait_for) => {
                    let woke = self.wait_counted(wait_for, || listener.wait_deadline(deadline));
                    if woke.is_none() {
                        return Err(wait_for.timed_out(self, started.elapsed()));
                    }
                }
                Step::Launch => return self.launch_for(tenant, deadline, started, now, false),
            }
            now = Instant::now();
        }
    }

    /// [`helper_for`](Self::helper_for) for an async task: waits hold no
    /// thread, and a launch runs on a launch worker.
    async fn helper_for_async(
        &self,
        tenant: &[u8],
        deadline: Instant,
        started: Instant,
    ) -> Result<InUse, CallError> {
        sandpool_protocol::decode_bind(tenant).map_err(CallError::InvalidTenant)?;
        let link = self.launcher.reactor_link();
        let mut timer = crate::conn::Deadline::new(&link, deadline);
        let mut now = started;
        loop {
            match self.step(tenant, now)? {
                Step::Ready(held) => return Ok(held),
                Step::Wait(listener, wait_for) => {
                    let counted = RoomWaiter::new(self, wait_for);
                    let mut listener = std::pin::pin!(listener);
                    let woke = poll_fn(|cx| {
                        if listener.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(true);
                        }
                        Pin::new(&mut timer).poll(cx).map(|()| false)
                    })
                    .await;
                    drop(counted);
                    if !woke {
                        return Err(wait_for.timed_out(self, started.elapsed()));
                    }
                }
                Step::Launch => {
                    let done = Arc::new(Completion::new());
                    let job = LaunchJob {
                        tenant: tenant.into(),
                        deadline,
                        started,
                        ready: now,
                        ahead: false,
                        done: done.clone(),
                    };
                    if !self.queue_launch(job) {
                        self.launch_ended(tenant);
                        return Err(CallError::ShutDown);
                    }
                    let awaiting = Awaiting(done);
                    return poll_fn(|cx| awaiting.0.poll_take(cx)).await;
                }
            }
            now = Instant::now();
        }
    }

    /// Runs a blocking wait, counted among the waiters for room if it is one.
    fn wait_counted<T>(&self, wait_for: WaitFor, wait: impl FnOnce() -> T) -> T {
        let _counted = RoomWaiter::new(self, wait_for);
        wait()
    }

    /// The one decision of getting a tenant its helper, under the state
    /// lock: use its helper, bind a spare, wait, or launch.
    fn step(&self, tenant: &[u8], now: Instant) -> Result<Step, CallError> {
        let mut state = self.state.lock();
        loop {
            if state.shut {
                return Err(CallError::ShutDown);
            }
            let entry = tenant_mut(&mut state, tenant);
            if let Some(until) = entry.backoff_until.filter(|until| *until > now) {
                return Err(CallError::BackingOff {
                    failures: entry.failures,
                    retry_in: until - now,
                });
            }
            if let Some(helper) = &entry.helper
                && !helper.is_retired()
            {
                let held = helper.use_guard(now);
                entry.last_used = Some(now);
                self.note_call(entry, now);
                return Ok(Step::Ready(held));
            }
            if let Some(retired) = entry.helper.take() {
                // Retired while bound: whoever takes it from its tenant
                // counts its failure, once.
                state.bound -= 1;
                self.count_failure(&mut state, tenant, &retired);
                continue;
            }
            if entry.launching {
                return Ok(Step::Wait(self.changed.listen(), WaitFor::Launch));
            }
            if let Some(spare) = state.spares.pop_front() {
                // The keeper hears of it once the call is done
                // (`call_done`): woken now, it would take the CPU from
                // this very call.
                self.refill_wanted.store(true, Ordering::Relaxed);
                if let Some(held) = self.bind_spare(&mut state, tenant, spare, now) {
                    self.note_call(tenant_mut(&mut state, tenant), now);
                    return Ok(Step::Ready(held));
                }
                continue;
            }
            if state.live() >= self.live().config.max_helpers && !self.evict_one(&mut state) {
                return Ok(Step::Wait(self.changed.listen(), WaitFor::Room));
            }
            if self.over_budget() {
                // The budget wins: an idle helper makes room before any
                // launch (a launch goes ahead even if none is idle).
                self.evict_lru(&mut state, CloseCause::MemoryBudget);
            }
            self.telemetry.spare_miss(self.live().config.spares);
            let entry = tenant_mut(&mut state, tenant);
            entry.launching = true;
            self.note_call(entry, now);
            state.launching += 1;
            return Ok(Step::Launch);
        }
    }

    /// Records a call arriving at `now` in the tenant's history. Gaps are
    /// recorded whatever the tenant's policy (by the adaptive tuning's
    /// rule), so a tenant moved to the adaptive policy live brings its
    /// history along.
    fn note_call(&self, entry: &mut Tenant, now: Instant) {
        entry.lifecycle.on_call(
            now.saturating_duration_since(self.epoch),
            &self.live().adaptive,
        );
    }

    /// Binds a spare to `tenant` (the Bind frame is queued without waiting)
    /// and installs it. A spare that fails to bind (it died, or broke the
    /// protocol while waiting) is dropped, killed and reaped, and not
    /// charged to the tenant.
    fn bind_spare(
        &self,
        state: &mut State,
        tenant: &[u8],
        spare: Arc<Helper>,
        started: Instant,
    ) -> Option<InUse> {
        match spare.bind(tenant) {
            Ok(()) => {
                *self.spare_strikes.lock() = (0, None);
                self.telemetry.spare_hit(started.elapsed());
                self.install(state, tenant, spare, started).ok()
            }
            Err(err) => {
                warn!(pid = spare.pid(), %err, "spare helper unusable");
                self.telemetry.failure(&err);
                None
            }
        }
    }

    /// Launches a helper for `tenant` (marked launching by [`step`]) and
    /// installs it. `ahead`: a launch ahead of the tenant's calls, which
    /// never evicts or waits for a host-wide slot.
    fn launch_for(
        &self,
        tenant: &[u8],
        deadline: Instant,
        started: Instant,
        ready: Instant,
        ahead: bool,
    ) -> Result<InUse, CallError> {
        let launched = guarded(|| {
            let helper = self.launch_relieved(deadline, !ahead)?;
            helper.bind(tenant)?;
            Ok(helper)
        });
        let mut state = self.state.lock();
        state.launching -= 1;
        tenant_mut(&mut state, tenant).launching = false;
        self.notify_changed();
        self.telemetry.queue_wait(started.elapsed());
        match launched {
            Ok(helper) => {
                self.telemetry
                    .launched(helper.launch_time(), helper.hello(), helper.pid());
                // The launch itself is this call's: `ready` is from before it.
                self.install(&mut state, tenant, Arc::new(helper), ready)
            }
            Err(CallError::Launch(err)) if err.is_host_pressure() => {
                // Host pressure is never the tenant's failure.
                self.telemetry.launch_failed();
                self.telemetry.launch_host_pressure();
                warn!(%err, "launch failed: the host is out of fds");
                Err(CallError::Launch(err))
            }
            // The host-wide cap: nothing was launched, and it is nobody's
            // failure.
            Err(err @ CallError::HostFull { .. }) => Err(err),
            Err(CallError::Launch(err)) if matches!(*err, LaunchError::HostSlot { .. }) => {
                // The host directory is unusable: the host's problem.
                self.telemetry.launch_failed();
                warn!(%err, "launch failed: no host-wide slot could be taken");
                Err(CallError::Launch(err))
            }
            Err(err) => {
                if matches!(err, CallError::Launch(_)) {
                    self.telemetry.launch_failed();
                }
                self.record_failure(&mut state, tenant, &err);
                Err(err)
            }
        }
    }

    /// Launches a helper; if the host is out of fds, evicts the least
    /// recently used idle helper (its fds are closed once the keeper has
    /// reaped it) and tries once more. With `Config.host`, first takes a
    /// host-wide slot for it ([`host_slot`](Self::host_slot); `relieve`:
    /// by evicting and waiting if need be), which the helper then holds
    /// until it is reaped.
    pub(super) fn launch_relieved(
        &self,
        deadline: Instant,
        relieve: bool,
    ) -> Result<Helper, CallError> {
        let slot = match &self.host {
            Some(host) => Some(self.host_slot(host, deadline, relieve)?),
            None => None,
        };
        let mut helper = self.launch_with_fds(deadline)?;
        if let Some(slot) = slot {
            helper.hold_host_slot(slot);
        }
        Ok(helper)
    }

    /// A host-wide slot for a launch: a free one; else (`relieve`) this
    /// process's least recently used idle helper is killed, which frees its
    /// slot once it is reaped (at once), and the caller waits for a slot,
    /// retrying with a short back-off (1 ms doubling to 20 ms, woken early
    /// when one of this process's own slots is released) until `deadline`:
    /// then [`CallError::HostFull`]. Without `relieve` (a launch ahead of
    /// calls) it is a free slot or `HostFull` at once.
    fn host_slot(
        &self,
        host: &Host,
        deadline: Instant,
        relieve: bool,
    ) -> Result<HostSlot, CallError> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(1);
        loop {
            // Listening before trying: a release in between is not missed
            // (nor a shutdown, which notifies the same event).
            let freed = host.listen_freed();
            if self.state.lock().shut {
                return Err(CallError::ShutDown);
            }
            if let Some(slot) = host
                .try_acquire()
                .map_err(|err| CallError::Launch(Arc::new(err)))?
            {
                return Ok(slot);
            }
            let now = Instant::now();
            if !relieve || now >= deadline {
                return Err(CallError::HostFull {
                    max_helpers: host.max_helpers(),
                    waited: started.elapsed(),
                });
            }
            let victim = self.take_lru(&mut self.state.lock(), CloseCause::Evicted);
            if let Some(victim) = victim {
                debug!(
                    pid = victim.pid(),
                    "host-wide cap reached: evicting this process's least recently used idle helper for its slot"
                );
                // Idle: nothing waits on it. Killed and reaped here; its
                // slot goes with its last handle (this one, unless the
                // keeper holds it for a moment).
                victim.kill();
                drop(victim);
                self.notify_changed();
            }
            let _woken = freed.wait_deadline((now + backoff).min(deadline));
            backoff = (backoff * 2).min(Duration::from_millis(20));
        }
    }

    /// The launch of [`launch_relieved`](Self::launch_relieved): if the
    /// host is out of fds, one eviction and one retry.
    fn launch_with_fds(&self, deadline: Instant) -> Result<Helper, CallError> {
        match self.launcher.launch_until(deadline) {
            Err(err) if err.is_host_pressure() => {
                let victim = self.take_lru(&mut self.state.lock(), CloseCause::Evicted);
                debug!(%err, evicted = victim.is_some(), "host out of fds at launch: retrying once");
                if let Some(victim) = victim {
                    // Here rather than through the keeper: its fds must be
                    // closed before the retry. It is idle, so nothing waits
                    // on it; it is reaped at once after SIGKILL, and its
                    // fds close once the reactor lets go of it too.
                    let closed = victim.fds_closed_probe();
                    victim.kill();
                    drop(victim);
                    self.notify_changed();
                    let until = Instant::now() + Duration::from_millis(100);
                    while !closed() && Instant::now() < until {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                self.launcher.launch_until(deadline)
            }
            other => other,
        }
        .map_err(|err| CallError::Launch(Arc::new(err)))
    }

    /// A launch that was never started ends (shutdown).
    fn launch_ended(&self, tenant: &[u8]) {
        let mut state = self.state.lock();
        state.launching -= 1;
        tenant_mut(&mut state, tenant).launching = false;
        self.notify_changed();
    }

    /// Gets `tenant` a helper ahead of its calls, in the background (its
    /// policy's `prewarm`): binds a spare if one is ready, else queues a
    /// launch on a launch worker. Never for a guess past the cap or the
    /// memory budget (nothing is evicted for it), nor while the tenant
    /// has a helper, a launch, or a back-off. Returns whether a helper is
    /// bound or on its way.
    pub(super) fn prelaunch(&self, state: &mut State, tenant: &[u8], now: Instant) -> bool {
        if state.shut || sandpool_protocol::decode_bind(tenant).is_err() {
            return false;
        }
        let entry = tenant_mut(state, tenant);
        if entry.helper.is_some()
            || entry.launching
            || entry.backoff_until.is_some_and(|until| until > now)
            || self.over_budget()
        {
            return false;
        }
        if let Some(spare) = state.spares.pop_front() {
            let _ = self.keeper.send(KeeperMsg::Refill);
            self.telemetry.prelaunched();
            // The hold the bind returns drops here: the helper is idle.
            return self.bind_spare(state, tenant, spare, now).is_some();
        }
        let live = self.live();
        if state.live() >= live.config.max_helpers {
            return false;
        }
        tenant_mut(state, tenant).launching = true;
        state.launching += 1;
        let job = LaunchJob {
            tenant: tenant.into(),
            deadline: now + live.config.request_timeout,
            started: now,
            ready: now,
            ahead: true,
            done: Arc::new(Completion::new()),
        };
        if !self.queue_launch(job) {
            state.launching -= 1;
            tenant_mut(state, tenant).launching = false;
            return false;
        }
        self.telemetry.prelaunched();
        true
    }

    /// Hands `job` to the launch workers; false once they are stopped.
    fn queue_launch(&self, job: LaunchJob) -> bool {
        self.launches
            .lock()
            .as_ref()
            .is_some_and(|tx| tx.send(job).is_ok())
    }

    /// A launch worker: launches helpers for async callers until the pool
    /// shuts down.
    pub(super) fn launch_worker(&self, jobs: Receiver<LaunchJob>) {
        for job in jobs {
            // Its time in this queue, behind other callers' launches, was
            // not its own: the turn starts no earlier than here.
            let ready = job.ready.max(Instant::now());
            let result = self.launch_for(&job.tenant, job.deadline, job.started, ready, job.ahead);
            // A caller that gave up leaves the helper installed for the
            // tenant's next call; its hold on it drops here.
            drop(job.done.complete(result, false));
        }
    }

    /// Stops the launch workers (they finish the launch in hand).
    pub(super) fn stop_launch_workers(&self) {
        self.launches.lock().take();
    }

    fn install(
        &self,
        state: &mut State,
        tenant: &[u8],
        helper: Arc<Helper>,
        ready: Instant,
    ) -> Result<InUse, CallError> {
        if state.shut {
            // Shutdown began while this helper was being launched or bound:
            // it is killed and reaped when the last handle drops (at once).
            self.telemetry.closed(CloseCause::Shutdown);
            return Err(CallError::ShutDown);
        }
        let held = helper.use_guard(ready);
        let entry = tenant_mut(state, tenant);
        entry.helper = Some(helper);
        entry.last_used = Some(Instant::now());
        state.bound += 1;
        debug!(pid = held.helper().pid(), tenant = %String::from_utf8_lossy(tenant), "helper bound");
        self.notify_changed();
        Ok(held)
    }

    /// Evicts the least recently used idle helper of any tenant. Returns
    /// whether one was evicted.
    pub(super) fn evict_one(&self, state: &mut State) -> bool {
        self.evict_lru(state, CloseCause::Evicted).is_some()
    }

    /// Evicts the least recently used idle helper of any tenant, for
    /// `cause`; returns its resident bytes at the last sample.
    pub(super) fn evict_lru(&self, state: &mut State, cause: CloseCause) -> Option<u64> {
        let helper = self.take_lru(state, cause)?;
        let freed = helper.usage.resident.load(Ordering::Relaxed);
        state.closing += 1;
        self.send_close(state, helper, cause);
        Some(freed)
    }

    /// Takes the least recently used idle helper from its tenant, for
    /// `cause` (counted, and its memory taken off the pool's total), for
    /// the caller to close.
    fn take_lru(&self, state: &mut State, cause: CloseCause) -> Option<Arc<Helper>> {
        let victim = state
            .tenants
            .iter()
            .filter_map(|(key, t)| {
                let helper = t.helper.as_ref()?;
                // Idle: no call in flight and no caller holding it (the
                // keeper's own handles do not count).
                helper.is_unused().then_some((t.last_used, key.clone()))
            })
            .min_by_key(|(last_used, _)| *last_used)
            .map(|(_, key)| key);
        let key = victim?;
        let helper = state.tenants.get_mut(&key).and_then(|t| t.helper.take())?;
        state.bound -= 1;
        self.telemetry.closed(cause);
        let freed = helper.usage.resident.load(Ordering::Relaxed);
        let _ = self
            .resident_total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |total| {
                Some(total.saturating_sub(freed))
            });
        debug!(
            pid = helper.pid(),
            ?cause,
            "evicting least recently used helper"
        );
        Some(helper)
    }

    /// Hands a helper (already counted in `closing`) to the keeper.
    pub(super) fn send_close(&self, state: &mut State, helper: Arc<Helper>, cause: CloseCause) {
        if let Err(err) = self.keeper.send(KeeperMsg::Close(helper, cause)) {
            // The keeper is gone (shutdown): the helper is killed and reaped
            // when this last handle drops.
            state.closing -= 1;
            drop(err);
        }
    }

    /// Bookkeeping after a call on `helper` for `tenant`.
    fn after_call(&self, tenant: &[u8], helper: &Arc<Helper>, result: &Result<Vec<u8>, CallError>) {
        match result {
            Ok(_) | Err(CallError::Helper(_)) => {
                let first = helper.note_tenant_success();
                let live = self.live();
                let max = live.config.max_requests_per_helper;
                let recycle = max > 0 && helper.tenant_calls() >= max;
                if first || recycle {
                    let mut state = self.state.lock();
                    if first {
                        // The tenant's helper works: forget earlier failures,
                        // but resource-limit kills only after a quiet spell
                        // (twice the longest back-off).
                        let quiet = live.config.crash_backoff.max.saturating_mul(2);
                        if let Some(entry) = state.tenants.get_mut(tenant) {
                            if entry.last_failure.is_none_or(|at| at.elapsed() >= quiet) {
                                entry.limit_kills = 0;
                            }
                            entry.failures = entry.limit_kills;
                            entry.backoff_until = None;
                        }
                    }
                    if recycle && self.unbind(&mut state, tenant, helper) {
                        state.closing += 1;
                        self.telemetry.closed(CloseCause::MaxRequests);
                        self.send_close(&mut state, helper.clone(), CloseCause::MaxRequests);
                    }
                }
            }
            Err(err) if err.is_helper_failure() => {
                let mut state = self.state.lock();
                // Every call in flight on the dead helper sees the same
                // error; the failure is counted once, by whoever unbinds it.
                let taken = self.unbind(&mut state, tenant, helper)
                    || state.tenants.get_mut(tenant).is_some_and(|entry| {
                        entry
                            .failed
                            .take_if(|failed| Arc::ptr_eq(failed, helper))
                            .is_some()
                    });
                if taken {
                    self.count_failure(&mut state, tenant, helper);
                }
            }
            Err(_) => {}
        }
    }

    /// Counts a retired helper's failure toward its tenant's back-off,
    /// once in the helper's life (a shut-down helper did not fail). One
    /// still dying, its failure not yet known, is kept on the tenant and
    /// counted once it is (see [`Tenant::failed`]).
    pub(super) fn count_failure(&self, state: &mut State, tenant: &[u8], helper: &Arc<Helper>) {
        match helper.failure() {
            Some(err) if err.is_helper_failure() && helper.take_failure_count() => {
                self.record_failure(state, tenant, &err);
            }
            Some(_) => {}
            None if helper.is_dying() => {
                tenant_mut(state, tenant).failed = Some(helper.clone());
            }
            None => {}
        }
    }

    /// Counts the failures of helpers that were still dying when they were
    /// taken from their tenants and have been reaped since (the keeper's
    /// scan).
    pub(super) fn count_late_failures(&self, state: &mut State) {
        let late: Vec<(Box<[u8]>, Arc<Helper>)> = state
            .tenants
            .iter_mut()
            .filter_map(|(key, tenant)| {
                let done = tenant.failed.as_ref().is_some_and(|h| !h.is_dying());
                done.then(|| tenant.failed.take().map(|h| (key.clone(), h)))
                    .flatten()
            })
            .collect();
        for (tenant, helper) in late {
            self.count_failure(state, &tenant, &helper);
        }
    }

    /// Removes `helper` from `tenant` if it is still the tenant's helper.
    pub(super) fn unbind(&self, state: &mut State, tenant: &[u8], helper: &Arc<Helper>) -> bool {
        let Some(entry) = state.tenants.get_mut(tenant) else {
            return false;
        };
        if entry
            .helper
            .as_ref()
            .is_some_and(|h| Arc::ptr_eq(h, helper))
        {
            entry.helper = None;
            state.bound -= 1;
            self.notify_changed();
            return true;
        }
        false
    }

    pub(super) fn record_failure(&self, state: &mut State, tenant: &[u8], err: &CallError) {
        self.telemetry.failure(err);
        let Some(entry) = state.tenants.get_mut(tenant) else {
            return;
        };
        let now = Instant::now();
        if matches!(err, CallError::LimitExceeded { .. }) {
            entry.limit_kills = entry.limit_kills.saturating_add(1);
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.last_failure = Some(now);
        if let Some(delay) = self.live().config.crash_backoff.delay(entry.failures) {
            entry.backoff_until = Some(now + delay);
            self.telemetry.backoff_engaged();
            warn!(
                tenant = %String::from_utf8_lossy(tenant),
                failures = entry.failures,
                delay_ms = delay.as_millis() as u64,
                %err,
                "tenant backed off"
            );
        }
    }

    pub(super) fn helper_counts(&self) -> HelperCounts {
        let state = self.state.lock();
        let busy = state
            .tenants
            .values()
            .filter_map(|t| t.helper.as_ref())
            .filter(|h| h.in_flight() > 0)
            .count();
        HelperCounts {
            live: state.live(),
            spare: state.spares.len(),
            launching: state.launching,
            busy,
            idle: state.bound - busy,
            closing: state.closing,
            tenants: state.tenants.len(),
        }
    }

    pub(super) fn helper_info(&self, tenant: &[u8]) -> Option<HelperInfo> {
        let state = self.state.lock();
        let helper = state.tenants.get(tenant)?.helper.as_ref()?;
        Some(HelperInfo {
            pid: helper.pid(),
            calls: helper.tenant_calls(),
            total_calls: helper.calls(),
            in_flight: helper.in_flight(),
        })
    }

    pub(super) fn spare_pids(&self) -> Vec<u32> {
        self.state.lock().spares.iter().map(|h| h.pid()).collect()
    }

    /// Marks the pool shut and takes every helper out of it.
    pub(super) fn take_all(&self) -> Vec<Arc<Helper>> {
        let helpers = {
            let mut state = self.state.lock();
            state.shut = true;
            let mut helpers: Vec<_> = state.spares.drain(..).collect();
            for tenant in state.tenants.values_mut() {
                helpers.extend(tenant.helper.take());
            }
            state.bound = 0;
            state.tenants.clear();
            helpers
        };
        self.notify_changed();
        helpers
    }

    /// Every helper has been reaped (shutdown).
    pub(super) fn reaped_all(&self) {
        self.state.lock().closing = 0;
    }
}
