//! The pool: one helper per tenant, prewarmed spares, idle quiesce, caps,
//! crash back-off, shutdown.
//!
//! State lives behind one mutex, held only for bookkeeping, never across a
//! launch, a pipe read or a wait on a helper. Calls run on the caller's
//! thread; a background *keeper* thread refills spares, quiesces idle
//! helpers and closes retired ones.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::{Condvar, Mutex, MutexGuard};
use tracing::{debug, info, warn};

use crate::config::{Config, ConfigError};
use crate::error::{CallError, LaunchError};
use crate::helper::{Helper, Launcher, deadline_after, deadline_from};
use crate::stderr::{Budget, StderrHub};
use crate::telemetry::Telemetry;

/// Why a helper was closed by the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCause {
    /// Idle longer than `idle_timeout`.
    Idle,
    /// Served `max_requests_per_helper` calls.
    MaxRequests,
    /// Evicted (least recently used) to make room under `max_helpers`.
    Evicted,
    /// The pool shut down.
    Shutdown,
}

/// A snapshot of the pool. Counters count since the pool was created.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Live helpers: bound, spare, launches in progress, and helpers being
    /// closed until they are reaped.
    pub live: usize,
    /// Spare helpers ready for a tenant.
    pub spare: usize,
    /// Bound helpers with a call in flight.
    pub busy: usize,
    /// Bound helpers with no call in flight.
    pub idle: usize,
    /// Launches in progress.
    pub launching: usize,
    /// Helpers launched and verified.
    pub launches: u64,
    /// Launches that failed.
    pub launch_failures: u64,
    /// Tenants without a helper that got a spare.
    pub spare_hits: u64,
    /// Tenants without a helper that had to wait for a launch.
    pub spare_misses: u64,
    /// Helpers closed after `idle_timeout`.
    pub quiesced_idle: u64,
    /// Helpers closed after `max_requests_per_helper` calls.
    pub quiesced_max_requests: u64,
    /// Helpers evicted to make room.
    pub evicted: u64,
    /// Helpers closed by shutdown.
    pub shut_down: u64,
    /// Helper failures by cause.
    pub failures: FailureStats,
    /// Calls refused because the tenant was backed off.
    pub backed_off_calls: u64,
    /// Times a tenant was backed off.
    pub backoffs_engaged: u64,
    /// Calls answered (including handler errors).
    pub calls_ok: u64,
    /// Calls that failed for any other reason.
    pub calls_failed: u64,
}

/// Helper failures by cause.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FailureStats {
    /// Exited on its own with a status code.
    pub exited: u64,
    /// Killed by a signal other than SIGSYS.
    pub signaled: u64,
    /// Killed by seccomp (SIGSYS): a forbidden syscall.
    pub seccomp: u64,
    /// Timed out and was killed.
    pub timeout: u64,
    /// Broke the protocol and was killed.
    pub protocol: u64,
    /// Failed to launch.
    pub launch: u64,
    /// Pipe I/O errors.
    pub io: u64,
}

/// What the pool knows about one tenant's helper (for introspection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelperInfo {
    /// The helper's pid.
    pub pid: u32,
    /// Calls of its tenant it has answered.
    pub calls: u64,
    /// Calls it has answered in all, a spare's warm-up included.
    pub total_calls: u64,
    /// Calls in flight.
    pub in_flight: usize,
}

#[derive(Default)]
struct Tenant {
    helper: Option<Arc<Helper>>,
    last_used: Option<Instant>,
    /// A thread is getting a helper for this tenant (launch or spare bind).
    launching: bool,
    /// Helper failures in a row.
    failures: u32,
    last_failure: Option<Instant>,
    backoff_until: Option<Instant>,
}

#[derive(Default)]
struct State {
    tenants: HashMap<Box<[u8]>, Tenant>,
    spares: VecDeque<Arc<Helper>>,
    bound: usize,
    launching: usize,
    /// Helpers taken from their tenants and not yet reaped.
    closing: usize,
    shut: bool,
}

impl State {
    fn live(&self) -> usize {
        self.bound + self.spares.len() + self.launching + self.closing
    }
}

enum KeeperMsg {
    Refill,
    Close(Arc<Helper>, CloseCause),
    Shutdown,
}

struct Shared {
    config: Config,
    launcher: Launcher,
    state: Mutex<State>,
    /// Signalled whenever a helper is installed, a launch ends, or room frees up.
    changed: Condvar,
    /// Calls waiting for room under `max_helpers`: a call that finishes
    /// makes its helper evictable, and must then wake them.
    waiting_for_room: AtomicUsize,
    keeper: Sender<KeeperMsg>,
    telemetry: Telemetry,
}

/// A pool of per-tenant sandboxed helpers. `Send + Sync`: share it (or an
/// `Arc` of it) between threads and call it from all of them.
///
/// Dropping the pool shuts it down with the configured `shutdown_grace`.
pub struct Pool {
    shared: Arc<Shared>,
    keeper: Mutex<Option<JoinHandle<Vec<Arc<Helper>>>>>,
    stderr_hub: Arc<StderrHub>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("stats", &self.stats())
            .finish()
    }
}

/// Creating a pool failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The launch configuration is invalid.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// A background thread (keeper, stderr forwarder) could not be started.
    #[error("starting a sandpool background thread failed: {0}")]
    Thread(std::io::Error),
}

impl Pool {
    /// Validates `config`, and starts the keeper thread, which launches the
    /// spares in the background.
    pub fn new(config: Config) -> Result<Pool, PoolError> {
        config.validate()?;
        let mut launcher = Launcher::new(config.helper_config())?;
        let telemetry = Telemetry::new(config.metrics_tenant_label, config.slow_launch_threshold);
        let budget = Budget {
            bytes_per_second: config.stderr_bytes_per_second.as_u64(),
            max_bytes_per_helper: config.stderr_max_bytes_per_helper.as_u64(),
        };
        let hub = StderrHub::start(
            budget,
            telemetry.stderr_lines.clone(),
            telemetry.stderr_dropped.clone(),
        )
        .map_err(PoolError::Thread)?;
        let hub = Arc::new(hub);
        launcher.forward_stderr(hub.clone());
        let (tx, rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            config,
            launcher,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            waiting_for_room: AtomicUsize::new(0),
            keeper: tx,
            telemetry,
        });
        let keeper_shared = shared.clone();
        // A long-lived thread: helpers it spawns must not depend on the
        // lifetime of a caller's thread.
        let keeper = std::thread::Builder::new()
            .name("sandpool-keeper".into())
            .spawn(move || keeper_shared.keep(rx))
            .map_err(PoolError::Thread)?;
        let pool = Pool {
            shared,
            keeper: Mutex::new(Some(keeper)),
            stderr_hub: hub,
        };
        let _ = pool.shared.keeper.send(KeeperMsg::Refill);
        Ok(pool)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Calls the tenant's helper with `request`, within `request_timeout`
    /// (which includes any wait for a helper).
    pub fn call(&self, tenant: impl AsRef<[u8]>, request: &[u8]) -> Result<Vec<u8>, CallError> {
        let started = Instant::now();
        let deadline = deadline_from(started, self.shared.config.request_timeout);
        self.call_from(tenant.as_ref(), request, deadline, started)
    }

    /// Calls the tenant's helper with `request`, failing at `deadline`.
    pub fn call_with_deadline(
        &self,
        tenant: impl AsRef<[u8]>,
        request: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, CallError> {
        self.call_from(tenant.as_ref(), request, deadline, Instant::now())
    }

    /// A call that started at `started` (one clock read serves the deadline,
    /// the helper lookup and the call's duration).
    fn call_from(
        &self,
        tenant: &[u8],
        request: &[u8],
        deadline: Instant,
        started: Instant,
    ) -> Result<Vec<u8>, CallError> {
        let shared = &self.shared;
        shared.telemetry.call_started();
        let mut attempts = 0;
        let result = loop {
            // A retry reads the clock again.
            let now = if attempts == 0 {
                started
            } else {
                Instant::now()
            };
            let result = shared.helper_for(tenant, deadline, now).and_then(|helper| {
                let result = helper.call_from(request, deadline, started);
                shared.after_call(tenant, &helper, &result);
                result
            });
            attempts += 1;
            match result {
                // The helper was retired (another call saw it die) before this
                // request was sent: nothing was dispatched, so get the tenant
                // a new helper and try again.
                Err(CallError::Retired { .. })
                    if attempts < 3 && !self.shared.state.lock().shut =>
                {
                    continue;
                }
                result => break result,
            }
        };
        // The helper handle is dropped: if calls wait for room, this helper
        // may now be evictable.
        if shared.waiting_for_room.load(Ordering::Acquire) > 0 {
            let _state = shared.state.lock();
            shared.changed.notify_all();
        }
        shared
            .telemetry
            .call_finished(tenant, &result, started.elapsed());
        result
    }

    /// Makes sure the tenant has a helper (from a spare or a launch), ahead
    /// of its first call, e.g. when the tenant becomes active.
    pub fn prewarm(&self, tenant: impl AsRef<[u8]>) -> Result<(), CallError> {
        let deadline = deadline_after(self.shared.config.request_timeout);
        self.shared
            .helper_for(tenant.as_ref(), deadline, Instant::now())
            .map(drop)
    }

    /// The tenant's current helper, if it has one.
    pub fn helper_info(&self, tenant: impl AsRef<[u8]>) -> Option<HelperInfo> {
        let state = self.shared.state.lock();
        let helper = state.tenants.get(tenant.as_ref())?.helper.as_ref()?;
        Some(HelperInfo {
            pid: helper.pid(),
            calls: helper.tenant_calls(),
            total_calls: helper.calls(),
            in_flight: helper.in_flight(),
        })
    }

    /// The pids of the spare helpers, oldest first.
    pub fn spare_pids(&self) -> Vec<u32> {
        self.shared
            .state
            .lock()
            .spares
            .iter()
            .map(|h| h.pid())
            .collect()
    }

    /// A snapshot of the pool's state and counters. Takes the state lock
    /// once and walks the tenants: cheap enough to call every second.
    pub fn stats(&self) -> Stats {
        let counts = self.shared.helper_counts();
        Stats {
            live: counts.live,
            spare: counts.spare,
            busy: counts.busy,
            idle: counts.idle,
            launching: counts.launching,
            ..self.shared.telemetry.counters()
        }
    }

    /// Shuts the pool down: new calls fail with [`CallError::ShutDown`];
    /// every helper's stdin is closed, all get up to `grace` (together) to
    /// exit, the rest are killed; all are reaped before this returns.
    /// Idempotent.
    pub fn shutdown(&self, grace: Duration) {
        let shared = &self.shared;
        let deadline = deadline_after(grace);
        let mut helpers: Vec<Arc<Helper>> = {
            let mut state = shared.state.lock();
            state.shut = true;
            let mut helpers: Vec<_> = state.spares.drain(..).collect();
            for tenant in state.tenants.values_mut() {
                helpers.extend(tenant.helper.take());
            }
            state.bound = 0;
            state.tenants.clear();
            helpers
        };
        shared.changed.notify_all();
        let _ = shared.keeper.send(KeeperMsg::Shutdown);
        for helper in &helpers {
            helper.close_stdin(Instant::now());
        }
        // The keeper hands back what it was still closing: one deadline for all.
        if let Some(keeper) = self.keeper.lock().take() {
            match keeper.join() {
                Ok(closing) => helpers.extend(closing),
                Err(_) => warn!("the sandpool keeper thread panicked"),
            }
        }
        let count = helpers.len();
        reap_all(helpers, deadline, |_| {
            shared.telemetry.closed(CloseCause::Shutdown)
        });
        shared.state.lock().closing = 0;
        self.stderr_hub.stop();
        if count > 0 {
            info!(helpers = count, "sandpool shut down");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown(self.shared.config.shutdown_grace);
    }
}

/// Waits (polling, no lock held) until every helper has exited or the
/// deadline passes, kills the rest, and reaps all. Their stdin must already
/// be closed.
fn reap_all(mut helpers: Vec<Arc<Helper>>, deadline: Instant, mut on_reaped: impl FnMut(&Helper)) {
    loop {
        helpers.retain(|helper| match helper.try_wait() {
            Some(status) => {
                debug!(pid = helper.pid(), %status, "helper closed");
                on_reaped(helper);
                false
            }
            None => true,
        });
        if helpers.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            for helper in &helpers {
                let status = helper.kill_and_reap();
                debug!(pid = helper.pid(), %status, "helper killed after the grace");
                on_reaped(helper);
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Counts of helpers by state, from one pass over the tenants.
struct HelperCounts {
    live: usize,
    spare: usize,
    launching: usize,
    busy: usize,
    idle: usize,
    closing: usize,
}

/// Runs `work` (a launch or a bind: no panics are expected, but a panic
/// there must not leave a tenant marked as launching forever).
fn guarded<T>(work: impl FnOnce() -> Result<T, CallError>) -> Result<T, CallError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(CallError::Launch(Arc::new(LaunchError::Panicked(message))))
    })
}

impl Shared {
    fn helper_counts(&self) -> HelperCounts {
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
        }
    }

    /// The tenant's helper: its current one, a spare bound to it, or a new
    /// launch. Waits (until `deadline`) for another thread's launch for the
    /// same tenant, and for room under `max_helpers`. `started` is the time
    /// of the caller's last clock read.
    fn helper_for(
        &self,
        tenant: &[u8],
        deadline: Instant,
        started: Instant,
    ) -> Result<Arc<Helper>, CallError> {
        // Checked up front: an invalid label must not use up spares.
        sandpool_protocol::decode_bind(tenant).map_err(CallError::InvalidTenant)?;
        let mut state = self.state.lock();
        let mut first = true;
        loop {
            if state.shut {
                return Err(CallError::ShutDown);
            }
            // The common case, a bound helper, takes the caller's clock read.
            let now = if std::mem::take(&mut first) {
                started
            } else {
                Instant::now()
            };
            let entry = tenant_mut(&mut state, tenant);
            if let Some(until) = entry.backoff_until.filter(|until| *until > now) {
                return Err(CallError::BackingOff {
                    failures: entry.failures,
                    retry_in: until - now,
                });
            }
            if let Some(helper) = &entry.helper {
                if !helper.is_retired() {
                    entry.last_used = Some(now);
                    return Ok(helper.clone());
                }
            }
            if entry.helper.take().is_some() {
                state.bound -= 1;
                continue;
            }
            if entry.launching {
                if self.changed.wait_until(&mut state, deadline).timed_out() {
                    return Err(CallError::LaunchWait {
                        waited: started.elapsed(),
                    });
                }
                continue;
            }
            if let Some(spare) = state.spares.pop_front() {
                let _ = self.keeper.send(KeeperMsg::Refill);
                tenant_mut(&mut state, tenant).launching = true;
                state.launching += 1;
                let bound =
                    MutexGuard::unlocked(&mut state, || guarded(|| spare.bind(tenant, deadline)));
                state.launching -= 1;
                tenant_mut(&mut state, tenant).launching = false;
                self.changed.notify_all();
                match bound {
                    Ok(()) => {
                        self.telemetry.spare_hit(started.elapsed());
                        return self.install(&mut state, tenant, spare);
                    }
                    Err(err) => {
                        // A spare that died while waiting: try the next one.
                        warn!(pid = spare.pid(), %err, "spare helper unusable");
                        self.telemetry.failure(&err);
                        continue;
                    }
                }
            }
            if state.live() >= self.config.max_helpers && !self.evict_one(&mut state) {
                self.waiting_for_room.fetch_add(1, Ordering::AcqRel);
                let timed_out = self.changed.wait_until(&mut state, deadline).timed_out();
                self.waiting_for_room.fetch_sub(1, Ordering::AcqRel);
                if timed_out {
                    return Err(CallError::PoolFull {
                        max_helpers: self.config.max_helpers,
                        waited: started.elapsed(),
                    });
                }
                continue;
            }
            self.telemetry.spare_miss(self.config.spares);
            tenant_mut(&mut state, tenant).launching = true;
            state.launching += 1;
            let launched = MutexGuard::unlocked(&mut state, || {
                guarded(|| {
                    let helper = self
                        .launcher
                        .launch_until(deadline)
                        .map_err(|err| CallError::Launch(Arc::new(err)))?;
                    helper.bind(tenant, deadline)?;
                    Ok(helper)
                })
            });
            state.launching -= 1;
            tenant_mut(&mut state, tenant).launching = false;
            self.changed.notify_all();
            self.telemetry.queue_wait(started.elapsed());
            return match launched {
                Ok(helper) => {
                    self.telemetry
                        .launched(helper.launch_time(), helper.hello(), helper.pid());
                    self.install(&mut state, tenant, Arc::new(helper))
                }
                Err(err) => {
                    if matches!(err, CallError::Launch(_)) {
                        self.telemetry.launch_failed();
                    }
                    self.record_failure(&mut state, tenant, &err);
                    Err(err)
                }
            };
        }
    }

    fn install(
        &self,
        state: &mut State,
        tenant: &[u8],
        helper: Arc<Helper>,
    ) -> Result<Arc<Helper>, CallError> {
        if state.shut {
            // Shutdown began while this helper was being launched or bound:
            // it is killed and reaped when the last handle drops (at once).
            self.telemetry.closed(CloseCause::Shutdown);
            return Err(CallError::ShutDown);
        }
        let entry = tenant_mut(state, tenant);
        entry.helper = Some(helper.clone());
        entry.last_used = Some(Instant::now());
        state.bound += 1;
        debug!(pid = helper.pid(), tenant = %String::from_utf8_lossy(tenant), "helper bound");
        self.changed.notify_all();
        Ok(helper)
    }

    /// Evicts the least recently used idle helper of any tenant. Returns
    /// whether one was evicted.
    fn evict_one(&self, state: &mut State) -> bool {
        let victim = state
            .tenants
            .iter()
            .filter_map(|(key, t)| {
                let helper = t.helper.as_ref()?;
                // Idle: no call in flight and no caller holding it.
                (Arc::strong_count(helper) == 1).then_some((t.last_used, key.clone()))
            })
            .min_by_key(|(last_used, _)| *last_used)
            .map(|(_, key)| key);
        let Some(key) = victim else {
            return false;
        };
        let Some(helper) = state.tenants.get_mut(&key).and_then(|t| t.helper.take()) else {
            return false;
        };
        state.bound -= 1;
        state.closing += 1;
        self.telemetry.closed(CloseCause::Evicted);
        debug!(pid = helper.pid(), "evicting least recently used helper");
        self.send_close(state, helper, CloseCause::Evicted);
        true
    }

    /// Hands a helper (already counted in `closing`) to the keeper.
    fn send_close(&self, state: &mut State, helper: Arc<Helper>, cause: CloseCause) {
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
                let max = self.config.max_requests_per_helper;
                let recycle = max > 0 && helper.tenant_calls() >= max;
                if first || recycle {
                    let mut state = self.state.lock();
                    if first {
                        // The tenant's helper works: forget earlier failures.
                        if let Some(entry) = state.tenants.get_mut(tenant) {
                            entry.failures = 0;
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
                // error; only the first to unbind it counts the failure.
                if self.unbind(&mut state, tenant, helper) {
                    self.record_failure(&mut state, tenant, err);
                }
            }
            Err(_) => {}
        }
    }

    /// Removes `helper` from `tenant` if it is still the tenant's helper.
    fn unbind(&self, state: &mut State, tenant: &[u8], helper: &Arc<Helper>) -> bool {
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
            self.changed.notify_all();
            return true;
        }
        false
    }

    fn record_failure(&self, state: &mut State, tenant: &[u8], err: &CallError) {
        self.telemetry.failure(err);
        let Some(entry) = state.tenants.get_mut(tenant) else {
            return;
        };
        let now = Instant::now();
        entry.failures = entry.failures.saturating_add(1);
        entry.last_failure = Some(now);
        if let Some(delay) = self.config.crash_backoff.delay(entry.failures) {
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

    /// The keeper thread: refills spares, quiesces idle helpers, closes
    /// helpers handed to it once no caller holds them (without waiting on
    /// any of them), and reaps them. At shutdown it returns the helpers it
    /// had not finished with, for the pool's single shutdown deadline.
    fn keep(&self, rx: Receiver<KeeperMsg>) -> Vec<Arc<Helper>> {
        let tick =
            (self.config.idle_timeout / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
        // Handed over, waiting for the last caller to let go.
        let mut pending: Vec<(Arc<Helper>, CloseCause)> = Vec::new();
        // stdin closed, waiting for the exit until the deadline.
        let mut reaping: Vec<(Arc<Helper>, Instant)> = Vec::new();
        let mut next_scan = Instant::now() + tick;
        let mut refill_after = Instant::now();
        // Scratch buffers, reused: a steady pool's keeper allocates nothing.
        let mut messages = Vec::new();
        let mut unused = Vec::new();
        let mut still_pending = Vec::new();
        loop {
            let busy = !pending.is_empty() || !reaping.is_empty();
            let wake = if busy {
                next_scan.min(Instant::now() + Duration::from_millis(2))
            } else {
                next_scan
            };
            messages.clear();
            match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(msg) => messages.push(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => messages.push(KeeperMsg::Shutdown),
            }
            messages.extend(rx.try_iter());
            let mut shutdown = false;
            for msg in messages.drain(..) {
                match msg {
                    KeeperMsg::Refill => {}
                    KeeperMsg::Close(helper, cause) => pending.push((helper, cause)),
                    KeeperMsg::Shutdown => shutdown = true,
                }
            }
            if shutdown {
                let mut left: Vec<_> = pending.into_iter().map(|(helper, _)| helper).collect();
                left.extend(reaping.into_iter().map(|(helper, _)| helper));
                return left;
            }
            if Instant::now() >= refill_after && !self.refill_spares() {
                // Launches are failing: retry on a later tick, not in a loop.
                refill_after = Instant::now() + tick;
            }
            if Instant::now() >= next_scan {
                self.quiesce_idle(&mut pending, &mut unused);
                next_scan = Instant::now() + tick;
                let counts = self.helper_counts();
                self.telemetry.set_helpers(
                    counts.spare,
                    counts.idle,
                    counts.busy,
                    counts.launching,
                    counts.closing,
                );
            }
            // Close what no caller holds any more; the rest waits.
            for (helper, cause) in pending.drain(..) {
                if Arc::strong_count(&helper) == 1 {
                    helper.close_stdin(Instant::now());
                    debug!(pid = helper.pid(), ?cause, "closing helper");
                    reaping.push((helper, deadline_after(self.config.shutdown_grace)));
                } else {
                    still_pending.push((helper, cause));
                }
            }
            std::mem::swap(&mut pending, &mut still_pending);
            let before = reaping.len();
            let now = Instant::now();
            reaping.retain(|(helper, deadline)| {
                if helper.try_wait().is_some() {
                    return false;
                }
                if now >= *deadline {
                    warn!(
                        pid = helper.pid(),
                        "helper ignored the end of its stdin; killed after the grace"
                    );
                    helper.kill_and_reap();
                    return false;
                }
                true
            });
            let reaped = before - reaping.len();
            if reaped > 0 {
                let mut state = self.state.lock();
                state.closing = state.closing.saturating_sub(reaped);
                drop(state);
                self.changed.notify_all();
            }
        }
    }

    /// Launches spares until there are `spares` of them (within
    /// `max_helpers`). Returns false if a launch failed.
    fn refill_spares(&self) -> bool {
        loop {
            {
                let mut state = self.state.lock();
                // The keeper is the only thread launching spares, and it
                // launches one at a time. At the cap, the least recently used
                // idle helper makes room: it would be the next one evicted by
                // a cold tenant anyway, and this way the eviction and the
                // launch happen here, off the call path.
                if state.shut
                    || state.spares.len() >= self.config.spares
                    || state.live() >= self.config.max_helpers && !self.evict_one(&mut state)
                {
                    return true;
                }
                state.launching += 1;
            }
            let warmed = guarded(|| {
                let helper = self
                    .launcher
                    .launch()
                    .map_err(|err| CallError::Launch(Arc::new(err)))?;
                self.warm_up(helper)
                    .map_err(|err| CallError::Launch(Arc::new(err)))
            });
            let mut state = self.state.lock();
            state.launching -= 1;
            self.changed.notify_all();
            match warmed {
                Ok(helper) if !state.shut => {
                    self.telemetry
                        .launched(helper.launch_time(), helper.hello(), helper.pid());
                    state.spares.push_back(Arc::new(helper));
                }
                // Shutting down: the helper is killed and reaped as it drops.
                Ok(_) => return true,
                Err(err) => {
                    self.telemetry.launch_failed();
                    self.telemetry.failure(&err);
                    warn!(%err, "launching a spare helper failed");
                    return false;
                }
            }
        }
    }

    /// Runs the configured warm-up request on a new spare.
    fn warm_up(&self, helper: Helper) -> Result<Helper, LaunchError> {
        let Some(request) = &self.config.warmup_request else {
            return Ok(helper);
        };
        let deadline = deadline_after(self.config.request_timeout);
        match helper.call(request, deadline) {
            Ok(_) | Err(CallError::Helper(_)) => Ok(helper),
            Err(err) => Err(LaunchError::WarmUp {
                pid: helper.pid(),
                source: Box::new(err),
            }),
        }
    }

    /// Takes helpers idle longer than `idle_timeout` away from their tenants,
    /// notices helpers that died while idle, and forgets tenants that have
    /// nothing left to remember. No I/O happens under the state lock.
    ///
    /// `unused` is the keeper's scratch buffer, reused so that a scan of a
    /// steady pool allocates nothing.
    fn quiesce_idle(
        &self,
        pending: &mut Vec<(Arc<Helper>, CloseCause)>,
        unused: &mut Vec<Arc<Helper>>,
    ) {
        let now = Instant::now();
        let idle_timeout = self.config.idle_timeout;
        let forget_after = idle_timeout.max(self.config.crash_backoff.max.saturating_mul(2));
        unused.clear();
        {
            let mut state = self.state.lock();
            let mut quiesced = 0;
            for tenant in state.tenants.values_mut() {
                let Some(helper) = &tenant.helper else {
                    continue;
                };
                if Arc::strong_count(helper) != 1 || helper.is_retired() {
                    continue;
                }
                if tenant
                    .last_used
                    .is_none_or(|at| now.duration_since(at) >= idle_timeout)
                {
                    if let Some(helper) = tenant.helper.take() {
                        quiesced += 1;
                        self.telemetry.closed(CloseCause::Idle);
                        pending.push((helper, CloseCause::Idle));
                    }
                } else {
                    unused.push(helper.clone());
                }
            }
            state.bound -= quiesced;
            state.closing += quiesced;
            state.tenants.retain(|_, tenant| {
                tenant.helper.is_some()
                    || tenant.launching
                    || tenant.backoff_until.is_some_and(|until| until > now)
                    || tenant
                        .last_failure
                        .is_some_and(|at| now.duration_since(at) < forget_after)
            });
            if quiesced > 0 {
                self.changed.notify_all();
            }
        }
        // Outside the lock: has any idle helper died? (Reaping and reading
        // the last of its stderr are I/O.)
        for helper in unused.drain(..) {
            if let Some(err) = helper.check_exit() {
                warn!(pid = helper.pid(), %err, "idle helper died");
                let mut state = self.state.lock();
                // Rare: find the tenant it served.
                let tenant = state
                    .tenants
                    .iter()
                    .find(|(_, t)| t.helper.as_ref().is_some_and(|h| Arc::ptr_eq(h, &helper)))
                    .map(|(key, _)| key.clone());
                if let Some(tenant) = tenant {
                    if self.unbind(&mut state, &tenant, &helper) {
                        self.record_failure(&mut state, &tenant, &err);
                    }
                }
            }
        }
    }
}

/// The tenant's entry, created if missing (it can vanish while the lock is
/// released, e.g. by shutdown). Allocates only when it creates the entry.
fn tenant_mut<'a>(state: &'a mut State, tenant: &[u8]) -> &'a mut Tenant {
    if !state.tenants.contains_key(tenant) {
        state.tenants.insert(tenant.into(), Tenant::default());
    }
    match state.tenants.get_mut(tenant) {
        Some(entry) => entry,
        None => unreachable!("inserted above under the same lock"),
    }
}
