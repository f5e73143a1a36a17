//! The pool: one helper per tenant, prewarmed spares, idle quiesce, caps,
//! crash back-off, shutdown; calls from threads (`call`, `call_batch`) and
//! from async tasks (`call_async`).
//!
//! State lives behind one mutex (`tenants`), held only for bookkeeping,
//! never across a launch, a pipe read or a wait; lock order: the pool's
//! state, then a helper's connection. Calls run on the caller's thread or
//! task; the helpers' pipes are driven by the reactor (see `conn`). A
//! background *keeper* thread refills spares, quiesces idle helpers and
//! closes retired ones; launch workers launch helpers for async callers,
//! so that no task waits on a launch in place.

mod keeper;
mod tenants;
mod usage;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::{info, warn};

use crate::config::{Config, ConfigError, TenantPolicy};
use crate::conn::{deadline_after, deadline_from};
use crate::error::{CallError, LaunchError};
use crate::host::Host;
use crate::launch::Launcher;
use crate::reactor::stderr::{Budget, StderrHub};
use crate::telemetry::Telemetry;
use keeper::KeeperMsg;
use tenants::{Live, Shared};

/// Why a helper was closed by the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCause {
    /// Idle longer than `idle_timeout`.
    Idle,
    /// Served `max_requests_per_helper` calls.
    MaxRequests,
    /// Evicted (least recently used) to make room under `max_helpers`.
    Evicted,
    /// Evicted (idle, least recently used) to bring the helpers' memory
    /// under `memory_budget`.
    MemoryBudget,
    /// Killed for going over a resource limit (counted among the failures).
    Failed,
    /// The pool shut down.
    Shutdown,
}

/// Resident memory of the live helpers by state, in bytes, as the keeper
/// last sampled it (every `sample_interval`; all 0 while no limit needs
/// sampling).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HelperMemory {
    /// Spare helpers.
    pub spare: u64,
    /// Bound helpers with no call in flight.
    pub idle: u64,
    /// Bound helpers with a call in flight.
    pub busy: u64,
}

impl HelperMemory {
    /// All live helpers together.
    pub fn total(&self) -> u64 {
        self.spare + self.idle + self.busy
    }
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
    /// Idle helpers evicted to keep under `memory_budget`.
    pub evicted_memory_budget: u64,
    /// Resident memory of live helpers at the last sample.
    pub memory: HelperMemory,
    /// The memory budget in force (`memory_budget` resolved at
    /// `Pool::new`), if any.
    pub memory_budget: Option<u64>,
    /// Launches that failed because the host was out of fds (after the
    /// pool's one eviction and retry); never counted against a tenant.
    pub launch_host_pressure: u64,
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
    /// Launcher processes replaced after one was lost (killed, crashed or
    /// hung); 0 with `launch_mode = "direct"`.
    pub launcher_restarts: u64,
    /// The running launcher process's pid, if any.
    pub launcher_pid: Option<u32>,
    /// Tenants the pool remembers: with a helper, a launch, a failure
    /// record, a policy of their own, or (under an adaptive policy, at
    /// most `max_tenant_histories` of them) a call history.
    pub tenants: usize,
    /// Helpers launched or bound ahead of a tenant's calls (`prewarm`, or
    /// the adaptive policy's prediction).
    pub prelaunches: u64,
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
    /// Killed over `max_helper_memory`, or aborted on an allocation that
    /// failed under the address-space limit.
    pub memory: u64,
    /// Killed for using more than `max_idle_cpu` with no call owed.
    pub idle_cpu: u64,
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

/// A pool of per-tenant sandboxed helpers. `Send + Sync`: share it (or an
/// `Arc` of it) between threads and tasks and call it from all of them.
///
/// Dropping the pool shuts it down with the configured `shutdown_grace`.
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// use sandpool::{Config, Pool};
///
/// let mut config = Config::new("/usr/libexec/pageserver/redo-helper");
/// config.spares = 4;
/// config.idle_timeout = Duration::from_secs(600);
/// let pool = Arc::new(Pool::new(config)?);
///
/// let workers: Vec<_> = (0..4)
///     .map(|worker| {
///         let pool = Arc::clone(&pool);
///         std::thread::spawn(move || pool.call(format!("tenant-{worker}"), b"request"))
///     })
///     .collect();
/// for worker in workers {
///     let reply = worker.join().expect("the worker thread panicked")?;
///     println!("{} bytes", reply.len());
/// }
/// println!("{:?}", pool.stats());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Pool {
    shared: Arc<Shared>,
    keeper: Mutex<Option<JoinHandle<Vec<Arc<crate::Helper>>>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
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
#[non_exhaustive]
pub enum PoolError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The launch configuration is invalid, or the reactor could not start.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// Joining the host directory (`Config.host`) failed.
    #[error(transparent)]
    Host(#[from] crate::host::HostJoinError),
    /// A background thread (keeper, launch worker) could not be started.
    #[error("starting a sandpool background thread failed")]
    Thread(#[source] std::io::Error),
}

/// Threads that launch helpers for async callers.
fn launch_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}

impl Pool {
    /// Validates `config`, starts the reactor, the keeper thread (which
    /// launches the spares in the background) and the launch workers.
    pub fn new(config: Config) -> Result<Pool, PoolError> {
        config.validate()?;
        usage::ensure_fd_budget(config.max_helpers)?;
        let limits = usage::Limits::resolve(&config)?;
        let telemetry = Telemetry::new(config.metrics_tenant_label, config.slow_launch_threshold);
        let budget = Budget {
            bytes_per_second: config.stderr_bytes_per_second.as_u64(),
            max_bytes_per_helper: config.stderr_max_bytes_per_helper.as_u64(),
        };
        let hub = Arc::new(StderrHub::new(
            budget,
            telemetry.stderr_lines.clone(),
            telemetry.stderr_dropped.clone(),
        ));
        let host = config.host.as_ref().map(Host::join).transpose()?;
        let launcher = Launcher::with_stderr(config.helper_config(), Some(hub))?;
        let (keeper_tx, keeper_rx) = crossbeam_channel::unbounded();
        let later_tx = keeper_tx.clone();
        launcher.set_later_action(Box::new(move || {
            let _ = later_tx.send(KeeperMsg::RefillDue);
        }));
        let (launch_tx, launch_rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared::new(
            config, launcher, keeper_tx, launch_tx, telemetry, limits, host,
        ));
        let keeper_shared = shared.clone();
        // A long-lived thread: helpers it spawns must not depend on the
        // lifetime of a caller's thread.
        let keeper = std::thread::Builder::new()
            .name("sandpool-keeper".into())
            .spawn(move || keeper_shared.keep(keeper_rx))
            .map_err(PoolError::Thread)?;
        let pool = Pool {
            shared,
            keeper: Mutex::new(Some(keeper)),
            workers: Mutex::new(Vec::new()),
        };
        for index in 0..launch_workers() {
            let (shared, rx) = (pool.shared.clone(), launch_rx.clone());
            let worker = std::thread::Builder::new()
                .name(format!("sandpool-launch-{index}"))
                .spawn(move || shared.launch_worker(rx))
                .map_err(PoolError::Thread)?;
            pool.workers.lock().push(worker);
        }
        let _ = pool.shared.keeper.send(KeeperMsg::Refill);
        Ok(pool)
    }

    /// The configuration in force (the last one [`reconfigure`](Self::reconfigure)
    /// applied, else the one the pool was made with).
    pub fn config(&self) -> Arc<Config> {
        self.shared.live().config.clone()
    }

    /// Applies `config`'s lifecycle fields to the live pool: the idle
    /// timeout, spares, `max_helpers`, the request timeout, the shutdown
    /// grace, `max_requests_per_helper`, the warm-up request, the crash
    /// back-off, the memory and idle-CPU limits and budget, and the sample
    /// interval. Live helpers are not touched: a shorter idle timeout
    /// closes the helpers idle past it at the keeper's next scan (which
    /// this triggers), a smaller `spares` or `max_helpers` stops launches
    /// until the pool is under it (nothing is killed for it), a new request
    /// timeout applies to calls that start after this returns.
    ///
    /// Refused, with the pool unchanged, if `config` is invalid or changes a
    /// field that cannot change live (`program`, `args`, `sandbox`,
    /// `launch_mode`, ...; see [`Config::first_fixed_change`]); the error
    /// names the field. Raising `max_helpers` may raise the soft fd limit,
    /// as [`Pool::new`] does, and is refused if the hard limit is too low.
    pub fn reconfigure(&self, config: &Config) -> Result<(), ConfigError> {
        config.validate()?;
        let current = self.shared.live();
        if let Some(field) = current.config.first_fixed_change(config) {
            return Err(ConfigError::new(
                field,
                "cannot change on a live pool (it is fixed at Pool::new; make a new pool)",
            ));
        }
        if config.max_helpers > current.config.max_helpers {
            usage::ensure_fd_budget(config.max_helpers)?;
        }
        let limits = usage::Limits::resolve(config)?;
        self.shared.set_live(Live::new(config.clone(), limits));
        self.shared.telemetry.reconfigured();
        info!(
            idle_timeout = ?config.idle_timeout,
            spares = config.spares,
            max_helpers = config.max_helpers,
            "pool reconfigured"
        );
        let _ = self.shared.keeper.send(KeeperMsg::Reconfigured);
        // Callers waiting for room may fit under a larger max_helpers.
        self.shared.notify_changed();
        Ok(())
    }

    /// Sets `tenant`'s own lifecycle policy (see [`TenantPolicy`]), over any
    /// `tenant_policies` entry of the configuration; `None` removes it.
    /// Applies from the keeper's next scan, which this triggers: a tenant
    /// set to `prewarm` gets a helper then. The pool remembers a tenant
    /// with a policy of its own until it is removed (one entry per tenant,
    /// its id and the policy).
    ///
    /// Refused (the policy unchanged) for an invalid tenant id (empty or
    /// over 256 bytes: field `tenant`) or an invalid policy.
    pub fn set_tenant_policy(
        &self,
        tenant: impl AsRef<[u8]>,
        policy: Option<TenantPolicy>,
    ) -> Result<(), ConfigError> {
        let tenant = tenant.as_ref();
        sandpool_protocol::decode_bind(tenant)
            .map_err(|err| ConfigError::new("tenant", err.to_string()))?;
        if let Some(policy) = &policy {
            policy.validate("tenant_policy")?;
        }
        {
            let mut state = self.shared.state.lock();
            match policy {
                Some(policy) => {
                    state.policies.insert(tenant.into(), policy);
                    // Known from now on, so the keeper's scan sees it.
                    tenants::tenant_mut(&mut state, tenant);
                }
                None => {
                    state.policies.remove(tenant);
                }
            }
        }
        let _ = self.shared.keeper.send(KeeperMsg::Reconfigured);
        Ok(())
    }

    /// Calls the tenant's helper with `request`, within `request_timeout`
    /// (which includes any wait for a helper), blocking this thread.
    pub fn call(&self, tenant: impl AsRef<[u8]>, request: &[u8]) -> Result<Vec<u8>, CallError> {
        let started = Instant::now();
        let deadline = deadline_from(started, self.shared.live().config.request_timeout);
        self.shared
            .call(tenant.as_ref(), request, deadline, started)
    }

    /// Calls the tenant's helper with `request`, failing at `deadline`.
    pub fn call_with_deadline(
        &self,
        tenant: impl AsRef<[u8]>,
        request: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, CallError> {
        self.shared
            .call(tenant.as_ref(), request, deadline, Instant::now())
    }

    /// Calls the tenant's helper with every request, pipelined from this
    /// thread (as many frames per `writev` as `max_in_flight` allows), all
    /// within `request_timeout`. The results come in the order of
    /// `requests`; each succeeds or fails on its own.
    ///
    /// ```no_run
    /// # fn redo(pool: &sandpool::Pool) -> Result<(), sandpool::CallError> {
    /// let requests: Vec<&[u8]> = vec![b"GetPage blk 0", b"GetPage blk 1", b"GetPage blk 2"];
    /// for (block, page) in pool.call_batch("tenant-42", &requests).into_iter().enumerate() {
    ///     println!("block {block}: {} bytes", page?.len());
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn call_batch(
        &self,
        tenant: impl AsRef<[u8]>,
        requests: &[&[u8]],
    ) -> Vec<Result<Vec<u8>, CallError>> {
        let started = Instant::now();
        let deadline = deadline_from(started, self.shared.live().config.request_timeout);
        self.shared
            .call_batch(tenant.as_ref(), requests, deadline, started)
    }

    /// [`call_batch`](Self::call_batch), failing at `deadline`.
    pub fn call_batch_with_deadline(
        &self,
        tenant: impl AsRef<[u8]>,
        requests: &[&[u8]],
        deadline: Instant,
    ) -> Vec<Result<Vec<u8>, CallError>> {
        self.shared
            .call_batch(tenant.as_ref(), requests, deadline, Instant::now())
    }

    /// Calls the tenant's helper with `request` from an async task, within
    /// `request_timeout` from now. Runtime-agnostic (the pool's reactor
    /// wakes the task): waiting for a helper, for room under `max_helpers`
    /// or `max_in_flight`, or for the reply holds no thread, and a launch
    /// runs on the pool's launch workers. Dropping the future cancels the
    /// call: a request not yet sent is never sent; one already sent has its
    /// reply discarded when it comes; the helper is not blamed.
    ///
    /// With tokio, for example (any executor will do; `Pool` is `Sync`, so an
    /// `Arc<Pool>` moves into tasks):
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use std::time::Duration;
    ///
    /// use sandpool::{Config, Pool};
    ///
    /// #[tokio::main]
    /// async fn main() -> Result<(), Box<dyn std::error::Error>> {
    ///     let pool = Arc::new(Pool::new(Config::new("@exe_dir/redo-helper"))?);
    ///     let task = tokio::spawn({
    ///         let pool = Arc::clone(&pool);
    ///         async move {
    ///             // A timeout drops the call's future, which cancels the call.
    ///             let call = pool.call_async("tenant-42", b"GetPage blk 0");
    ///             tokio::time::timeout(Duration::from_millis(50), call).await
    ///         }
    ///     });
    ///     match task.await? {
    ///         Ok(reply) => println!("{} bytes", reply?.len()),
    ///         Err(_) => println!("timed out; the call was cancelled"),
    ///     }
    ///     Ok(())
    /// }
    /// ```
    ///
    /// The future itself needs nothing of a runtime:
    ///
    /// ```no_run
    /// async fn page(pool: &sandpool::Pool, tenant: &str) -> Result<Vec<u8>, sandpool::CallError> {
    ///     let page = pool.call_async(tenant, b"GetPage 1663/16384/2619 blk 0").await?;
    ///     Ok(page)
    /// }
    /// # fn is_send<T: Send>(_: T) {}
    /// # fn check(pool: &sandpool::Pool) { is_send(page(pool, "t")); }
    /// ```
    pub fn call_async<'a>(
        &'a self,
        tenant: impl AsRef<[u8]> + Send + 'a,
        request: &'a [u8],
    ) -> impl Future<Output = Result<Vec<u8>, CallError>> + Send + 'a {
        let started = Instant::now();
        let deadline = deadline_from(started, self.shared.live().config.request_timeout);
        self.shared.call_async(tenant, request, deadline, started)
    }

    /// [`call_async`](Self::call_async), failing at `deadline`.
    pub fn call_async_with_deadline<'a>(
        &'a self,
        tenant: impl AsRef<[u8]> + Send + 'a,
        request: &'a [u8],
        deadline: Instant,
    ) -> impl Future<Output = Result<Vec<u8>, CallError>> + Send + 'a {
        self.shared
            .call_async(tenant, request, deadline, Instant::now())
    }

    /// Makes sure the tenant has a helper (from a spare or a launch), ahead
    /// of its first call, e.g. when the tenant becomes active.
    pub fn prewarm(&self, tenant: impl AsRef<[u8]>) -> Result<(), CallError> {
        let deadline = deadline_after(self.shared.live().config.request_timeout);
        self.shared
            .helper_for(tenant.as_ref(), deadline, Instant::now())
            .map(drop)
    }

    /// Whether this process leads the processes sharing `host.dir` now
    /// (`Config.host`): its pool's leader thread holds `leader.lock`, and
    /// it exports the host-wide gauges and sweeps the files of dead
    /// processes. Exactly one process sharing the directory leads; when it
    /// dies (or its pool is dropped) another takes over within
    /// milliseconds. Always false without `Config.host`.
    ///
    /// The leader thread waits for the lock with a blocking `flock`. A
    /// pool dropped while its thread still waits leaves that thread
    /// blocked (no signal can be sent to it without a handler, and the
    /// library installs none), holding one open fd of `leader.lock`; if it
    /// ever gets the lock it releases it at once and exits.
    pub fn is_host_leader(&self) -> bool {
        self.shared.host.as_ref().is_some_and(Host::is_leader)
    }

    /// The tenant's current helper, if it has one.
    pub fn helper_info(&self, tenant: impl AsRef<[u8]>) -> Option<HelperInfo> {
        self.shared.helper_info(tenant.as_ref())
    }

    /// The pids of the spare helpers, oldest first.
    pub fn spare_pids(&self) -> Vec<u32> {
        self.shared.spare_pids()
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
            launcher_restarts: self.shared.launcher.launcher_restarts(),
            launcher_pid: self.shared.launcher.launcher_pid(),
            memory_budget: self.shared.live().limits.budget,
            tenants: counts.tenants,
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
        let mut helpers = shared.take_all();
        if let Some(host) = &shared.host {
            // Calls waiting for a host-wide slot see the shutdown now.
            host.wake_waiters();
        }
        let _ = shared.keeper.send(KeeperMsg::Shutdown);
        for helper in &helpers {
            helper.close_stdin();
        }
        // The keeper hands back what it was still closing: one deadline for all.
        if let Some(keeper) = self.keeper.lock().take() {
            match keeper.join() {
                Ok(closing) => helpers.extend(closing),
                Err(_) => warn!("the sandpool keeper thread panicked"),
            }
        }
        shared.stop_launch_workers();
        for worker in self.workers.lock().drain(..) {
            if worker.join().is_err() {
                warn!("a sandpool launch worker panicked");
            }
        }
        let count = helpers.len();
        keeper::reap_all(helpers, deadline, |_| {
            shared.telemetry.closed(CloseCause::Shutdown)
        });
        shared.reaped_all();
        if let Some(host) = &shared.host {
            // Every slot went with its helper above.
            host.leave();
        }
        if count > 0 {
            info!(helpers = count, "sandpool shut down");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown(self.shared.live().config.shutdown_grace);
    }
}
