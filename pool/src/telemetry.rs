//! Everything the pool counts, recorded twice from one place: into atomics
//! for [`Pool::stats`](crate::Pool::stats) and into the `metrics` facade
//! (whatever recorder the embedding server installed before `Pool::new`), so
//! the two never disagree. Also the once-per-cause slow-path warnings.
//!
//! Metric names carry the `sandpool_` prefix and base units; labels are
//! bounded enums (never a tenant id, unless `metrics_tenant_label` is set).
//!
//! The rest of the crate records through [`Counter`], [`Gauge`] and
//! [`Histogram`] here, never through `metrics::` directly: with the
//! `metrics` feature they wrap the facade's handles; without it they are
//! empty and every record is a no-op (the atomics behind `Pool::stats`
//! still count).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tracing::warn;

use crate::error::{CallError, ExitStatus};
use crate::pool::{CloseCause, FailureStats, Stats};

/// Bounded labels of one metric: `(key, value)` pairs.
type Labels<'a> = &'a [(&'static str, &'static str)];

pub(crate) use facade::{Counter, Gauge, Histogram, counter, gauge, histogram};

/// With the `metrics` feature: the facade's handles, registered with
/// whatever recorder is installed.
#[cfg(feature = "metrics")]
mod facade {
    use super::Labels;

    /// A counter of the `metrics` facade.
    #[derive(Clone, Debug)]
    pub(crate) struct Counter(metrics::Counter);

    /// A gauge of the `metrics` facade.
    #[derive(Clone, Debug)]
    pub(crate) struct Gauge(metrics::Gauge);

    /// A histogram of the `metrics` facade.
    #[derive(Clone, Debug)]
    pub(crate) struct Histogram(metrics::Histogram);

    /// Registers the counter `name` with `labels`.
    pub(crate) fn counter(name: &'static str, labels: Labels<'_>) -> Counter {
        Counter(metrics::counter!(name, labels))
    }

    /// Registers the gauge `name` with `labels`.
    pub(crate) fn gauge(name: &'static str, labels: Labels<'_>) -> Gauge {
        Gauge(metrics::gauge!(name, labels))
    }

    /// Registers the histogram `name` with `labels`.
    pub(crate) fn histogram(name: &'static str, labels: Labels<'_>) -> Histogram {
        Histogram(metrics::histogram!(name, labels))
    }

    impl Counter {
        #[inline]
        pub(crate) fn increment(&self, value: u64) {
            self.0.increment(value);
        }
    }

    impl Gauge {
        #[inline]
        pub(crate) fn set(&self, value: f64) {
            self.0.set(value);
        }

        #[inline]
        pub(crate) fn increment(&self, value: f64) {
            self.0.increment(value);
        }

        #[inline]
        pub(crate) fn decrement(&self, value: f64) {
            self.0.decrement(value);
        }
    }

    impl Histogram {
        #[inline]
        pub(crate) fn record(&self, value: f64) {
            self.0.record(value);
        }
    }
}

/// Without the `metrics` feature: empty handles, every record a no-op.
#[cfg(not(feature = "metrics"))]
mod facade {
    use super::Labels;

    /// Records nothing (no `metrics` feature).
    #[derive(Clone, Debug)]
    pub(crate) struct Counter;

    /// Records nothing (no `metrics` feature).
    #[derive(Clone, Debug)]
    pub(crate) struct Gauge;

    /// Records nothing (no `metrics` feature).
    #[derive(Clone, Debug)]
    pub(crate) struct Histogram;

    pub(crate) fn counter(_name: &'static str, _labels: Labels<'_>) -> Counter {
        Counter
    }

    pub(crate) fn gauge(_name: &'static str, _labels: Labels<'_>) -> Gauge {
        Gauge
    }

    pub(crate) fn histogram(_name: &'static str, _labels: Labels<'_>) -> Histogram {
        Histogram
    }

    impl Counter {
        #[inline]
        pub(crate) fn increment(&self, _value: u64) {}
    }

    impl Gauge {
        #[inline]
        pub(crate) fn set(&self, _value: f64) {}

        #[inline]
        pub(crate) fn increment(&self, _value: f64) {}

        #[inline]
        pub(crate) fn decrement(&self, _value: f64) {}
    }

    impl Histogram {
        #[inline]
        pub(crate) fn record(&self, _value: f64) {}
    }
}

/// One call of `tenant` with `metrics_tenant_label` set: the per-tenant
/// counter and histogram (labels built per call: a tenant id is not bounded).
#[cfg(feature = "metrics")]
fn record_tenant_call(tenant: &[u8], outcome: &'static str, took: Duration) {
    let tenant = String::from_utf8_lossy(tenant).into_owned();
    metrics::counter!("sandpool_tenant_calls_total", "tenant" => tenant.clone(), "outcome" => outcome)
        .increment(1);
    metrics::histogram!("sandpool_tenant_call_seconds", "tenant" => tenant)
        .record(took.as_secs_f64());
}

#[cfg(not(feature = "metrics"))]
#[inline]
fn record_tenant_call(_tenant: &[u8], _outcome: &'static str, _took: Duration) {}

/// Every metric the pool emits: name, kind, unit, meaning. The README's
/// metrics table is this list.
///
/// The pool records them only with the `metrics` feature (on by default);
/// without it this list stays, as plain data, and nothing is recorded.
pub const METRICS: &[(&str, &str, &str)] = &[
    (
        "sandpool_launch_seconds",
        "histogram",
        "spawn to verified Hello, per launched helper",
    ),
    (
        "sandpool_call_seconds",
        "histogram",
        "duration of pool.call, by outcome",
    ),
    (
        "sandpool_queue_wait_seconds",
        "histogram",
        "time a call waited for a helper (spare bind, launch, room under max_helpers)",
    ),
    (
        "sandpool_helper_fd_close_seconds",
        "histogram",
        "time the helper took to count and close its inherited fds (from its Hello)",
    ),
    (
        "sandpool_launches_total",
        "counter",
        "launches by outcome (ok, failed, host_fds: the host was out of fds, not counted against any tenant)",
    ),
    (
        "sandpool_spares_total",
        "counter",
        "cold tenants served by a spare (hit) or a launch (miss)",
    ),
    (
        "sandpool_quiesced_total",
        "counter",
        "helpers closed by the pool, by cause (idle, max_requests, evicted, memory_budget, shutdown)",
    ),
    (
        "sandpool_launcher_restarts_total",
        "counter",
        "launcher processes replaced after one was lost (killed, crashed, hung)",
    ),
    (
        "sandpool_prelaunches_total",
        "counter",
        "helpers launched or bound ahead of a tenant's calls (its policy's prewarm, or the adaptive policy's prediction)",
    ),
    (
        "sandpool_reconfigurations_total",
        "counter",
        "live configuration changes applied by Pool::reconfigure",
    ),
    (
        "sandpool_helper_deaths_total",
        "counter",
        "helper failures by cause (exit, signal, seccomp, timeout, protocol, launch, io, memory, idle_cpu)",
    ),
    (
        "sandpool_calls_total",
        "counter",
        "calls by outcome (ok, helper_error, timeout, died, protocol, io, launch_failed, backed_off, pool_full, launch_wait, saturated, queue_timeout, shut_down, not_sent, retired, rejected, cancelled, limit_exceeded, host_fds, host_full)",
    ),
    (
        "sandpool_backoff_engaged_total",
        "counter",
        "times a tenant was backed off after repeated helper failures",
    ),
    (
        "sandpool_helper_stderr_lines_total",
        "counter",
        "helper stderr lines forwarded to the log",
    ),
    (
        "sandpool_helper_stderr_dropped_bytes_total",
        "counter",
        "helper stderr bytes dropped by the per-helper rate limit, lifetime cap or line cap",
    ),
    (
        "sandpool_helpers",
        "gauge",
        "helpers by state (spare, idle, busy, launching, closing)",
    ),
    (
        "sandpool_calls_in_flight",
        "gauge",
        "calls in flight across the pool",
    ),
    (
        "sandpool_helper_memory_bytes",
        "gauge",
        "resident memory of live helpers at the keeper's last sample, by state (spare, idle, busy)",
    ),
    (
        "sandpool_host_helpers",
        "gauge",
        "with [host], from the leader only: live helpers of every process sharing host.dir (locked slot files)",
    ),
    (
        "sandpool_host_processes",
        "gauge",
        "with [host], from the leader only: processes sharing host.dir (locked proc-<pid>.lock files)",
    ),
    (
        "sandpool_host_free_slots",
        "gauge",
        "with [host], from the leader only: host.max_helpers less the locked slots",
    ),
    (
        "sandpool_host_stale_files_removed_total",
        "counter",
        "with [host], from the leader: liveness files of dead processes it removed",
    ),
    (
        "sandpool_host_leader",
        "gauge",
        "with [host], from every process: 1 while this process leads host.dir, else 0",
    ),
    (
        "sandpool_host_leader_heartbeat_age_seconds",
        "gauge",
        "with [host], from every process: age of the leader's heartbeat (leader.info); over 5 s the leader is hung (it keeps the lock) and a warning is logged",
    ),
];

/// The `outcome` labels of calls; [`outcome`] returns an index into it.
const OUTCOMES: &[&str] = &[
    "ok",
    "helper_error",
    "timeout",
    "died",
    "protocol",
    "io",
    "launch_failed",
    "backed_off",
    "pool_full",
    "launch_wait",
    "saturated",
    "queue_timeout",
    "shut_down",
    "not_sent",
    "retired",
    "rejected",
    "cancelled",
    "limit_exceeded",
    "host_fds",
    "host_full",
];
const OK: usize = 0;
const HELPER_ERROR: usize = 1;
const BACKED_OFF: usize = 7;
const CANCELLED: usize = 16;

/// The index in [`OUTCOMES`] of a call's outcome (no lookup by name on the
/// call path).
fn outcome(result: &Result<Vec<u8>, CallError>) -> usize {
    match result {
        Ok(_) => OK,
        Err(CallError::Helper(_)) => HELPER_ERROR,
        Err(CallError::Timeout { .. }) => 2,
        Err(CallError::Died { .. }) => 3,
        Err(CallError::Protocol { .. }) => 4,
        Err(CallError::Io { .. }) => 5,
        Err(CallError::Launch(err)) if err.is_host_pressure() => 18,
        Err(CallError::Launch(_)) => 6,
        Err(CallError::BackingOff { .. }) => BACKED_OFF,
        Err(CallError::PoolFull { .. }) => 8,
        Err(CallError::LaunchWait { .. }) => 9,
        Err(CallError::Saturated { .. }) => 10,
        Err(CallError::QueueTimeout { .. }) => 11,
        Err(CallError::ShutDown) => 12,
        Err(CallError::NotSent { .. }) => 13,
        Err(CallError::Retired { .. }) => 14,
        Err(CallError::LimitExceeded { .. }) => 17,
        Err(CallError::HostFull { .. }) => 19,
        Err(
            CallError::RequestTooLarge { .. }
            | CallError::InvalidTenant(_)
            | CallError::AlreadyBound { .. },
        ) => 15,
    }
}

/// A counter recorded both as an atomic (for stats) and as a metric.
struct Count {
    value: AtomicU64,
    metric: Counter,
}

impl Count {
    fn new(name: &'static str, labels: &[(&'static str, &'static str)]) -> Count {
        Count {
            value: AtomicU64::new(0),
            metric: counter(name, labels),
        }
    }

    fn bump(&self) {
        self.value.fetch_add(1, Ordering::Relaxed);
        self.metric.increment(1);
    }

    fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

pub(crate) struct Telemetry {
    launch_seconds: Histogram,
    queue_wait_seconds: Histogram,
    fd_close_seconds: Histogram,
    call_seconds: Vec<Histogram>,
    calls: Vec<Count>,
    launches_ok: Count,
    launches_failed: Count,
    spare_hits: Count,
    spare_misses: Count,
    reconfigurations: Count,
    prelaunches: Count,
    quiesced_idle: Count,
    quiesced_max_requests: Count,
    evicted: Count,
    shut_down: Count,
    died_exit: Count,
    died_signal: Count,
    died_seccomp: Count,
    died_timeout: Count,
    died_protocol: Count,
    died_launch: Count,
    died_io: Count,
    died_memory: Count,
    died_idle_cpu: Count,
    launches_host_fds: Count,
    evicted_budget: Count,
    memory: [AtomicU64; 3],
    memory_gauges: [Gauge; 3],
    backoff_engaged: Count,
    pub(crate) stderr_lines: Counter,
    pub(crate) stderr_dropped: Counter,
    helpers: [Gauge; 5],
    in_flight: Gauge,
    tenant_label: bool,
    slow_launch: Duration,
    warned_fd_walk: AtomicBool,
    warned_slow_launch: AtomicBool,
    warned_spares_low: AtomicBool,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

/// Describes every metric of [`METRICS`] to the installed recorder.
#[cfg(feature = "metrics")]
fn describe() {
    use metrics::Unit;
    for (name, kind, meaning) in METRICS {
        match *kind {
            "histogram" => metrics::describe_histogram!(*name, Unit::Seconds, *meaning),
            "gauge" => metrics::describe_gauge!(*name, Unit::Count, *meaning),
            _ => metrics::describe_counter!(*name, Unit::Count, *meaning),
        }
    }
}

#[cfg(not(feature = "metrics"))]
fn describe() {}

impl Telemetry {
    pub(crate) fn new(tenant_label: bool, slow_launch: Duration) -> Telemetry {
        describe();
        let death = |cause| Count::new("sandpool_helper_deaths_total", &[("cause", cause)]);
        let quiesced = |cause| Count::new("sandpool_quiesced_total", &[("cause", cause)]);
        let helpers = |state| gauge("sandpool_helpers", &[("state", state)]);
        Telemetry {
            launch_seconds: histogram("sandpool_launch_seconds", &[]),
            queue_wait_seconds: histogram("sandpool_queue_wait_seconds", &[]),
            fd_close_seconds: histogram("sandpool_helper_fd_close_seconds", &[]),
            call_seconds: OUTCOMES
                .iter()
                .map(|o| histogram("sandpool_call_seconds", &[("outcome", o)]))
                .collect(),
            calls: OUTCOMES
                .iter()
                .map(|o| Count::new("sandpool_calls_total", &[("outcome", o)]))
                .collect(),
            launches_ok: Count::new("sandpool_launches_total", &[("outcome", "ok")]),
            launches_failed: Count::new("sandpool_launches_total", &[("outcome", "failed")]),
            spare_hits: Count::new("sandpool_spares_total", &[("result", "hit")]),
            spare_misses: Count::new("sandpool_spares_total", &[("result", "miss")]),
            reconfigurations: Count::new("sandpool_reconfigurations_total", &[]),
            prelaunches: Count::new("sandpool_prelaunches_total", &[]),
            quiesced_idle: quiesced("idle"),
            quiesced_max_requests: quiesced("max_requests"),
            evicted: quiesced("evicted"),
            shut_down: quiesced("shutdown"),
            died_exit: death("exit"),
            died_signal: death("signal"),
            died_seccomp: death("seccomp"),
            died_timeout: death("timeout"),
            died_protocol: death("protocol"),
            died_launch: death("launch"),
            died_io: death("io"),
            died_memory: death("memory"),
            died_idle_cpu: death("idle_cpu"),
            launches_host_fds: Count::new("sandpool_launches_total", &[("outcome", "host_fds")]),
            evicted_budget: quiesced("memory_budget"),
            memory: Default::default(),
            memory_gauges: ["spare", "idle", "busy"]
                .map(|state| gauge("sandpool_helper_memory_bytes", &[("state", state)])),
            backoff_engaged: Count::new("sandpool_backoff_engaged_total", &[]),
            stderr_lines: counter("sandpool_helper_stderr_lines_total", &[]),
            stderr_dropped: counter("sandpool_helper_stderr_dropped_bytes_total", &[]),
            helpers: [
                helpers("spare"),
                helpers("idle"),
                helpers("busy"),
                helpers("launching"),
                helpers("closing"),
            ],
            in_flight: gauge("sandpool_calls_in_flight", &[]),
            tenant_label,
            slow_launch,
            warned_fd_walk: AtomicBool::new(false),
            warned_slow_launch: AtomicBool::new(false),
            warned_spares_low: AtomicBool::new(false),
        }
    }

    pub(crate) fn launched(
        &self,
        launch_time: Duration,
        hello: &sandpool_protocol::Hello,
        pid: u32,
    ) {
        self.launches_ok.bump();
        self.launch_seconds.record(launch_time.as_secs_f64());
        self.fd_close_seconds
            .record(hello.fd_close_nanos as f64 / 1e9);
        if hello.fd_close_method != sandpool_protocol::FdCloseMethod::CloseRange
            && !self.warned_fd_walk.swap(true, Ordering::Relaxed)
        {
            warn!(pid, method = ?hello.fd_close_method, fds = hello.fds_closed,
                "slow path: helper closed inherited fds without close_range (is the kernel older than 5.9?)");
        }
        if launch_time > self.slow_launch && !self.warned_slow_launch.swap(true, Ordering::Relaxed)
        {
            warn!(
                pid,
                launch_ms = launch_time.as_millis() as u64,
                threshold_ms = self.slow_launch.as_millis() as u64,
                fds_closed = hello.fds_closed,
                "slow path: a helper launch took longer than slow_launch_threshold (many host fds? a dynamic helper binary?)"
            );
        }
    }

    pub(crate) fn launch_failed(&self) {
        self.launches_failed.bump();
    }

    /// A launch failed because the host was out of fds.
    pub(crate) fn launch_host_pressure(&self) {
        self.launches_host_fds.bump();
    }

    /// The resident memory of live helpers at the keeper's last sample.
    pub(crate) fn set_memory(&self, memory: &crate::pool::HelperMemory) {
        for ((value, gauge), bytes) in self.memory.iter().zip(&self.memory_gauges).zip([
            memory.spare,
            memory.idle,
            memory.busy,
        ]) {
            value.store(bytes, Ordering::Relaxed);
            gauge.set(bytes as f64);
        }
    }

    pub(crate) fn spare_hit(&self, queue_wait: Duration) {
        self.spare_hits.bump();
        self.queue_wait_seconds.record(queue_wait.as_secs_f64());
    }

    pub(crate) fn prelaunched(&self) {
        self.prelaunches.bump();
    }

    pub(crate) fn reconfigured(&self) {
        self.reconfigurations.bump();
    }

    pub(crate) fn spare_miss(&self, configured_spares: usize) {
        self.spare_misses.bump();
        if configured_spares > 0 && !self.warned_spares_low.swap(true, Ordering::Relaxed) {
            warn!(
                spares = configured_spares,
                "slow path: a cold tenant found no spare ready and waited for a launch (spares too low for the load?)"
            );
        }
    }

    pub(crate) fn queue_wait(&self, waited: Duration) {
        self.queue_wait_seconds.record(waited.as_secs_f64());
    }

    pub(crate) fn closed(&self, cause: CloseCause) {
        match cause {
            CloseCause::Idle => self.quiesced_idle.bump(),
            CloseCause::MaxRequests => self.quiesced_max_requests.bump(),
            CloseCause::Evicted => self.evicted.bump(),
            CloseCause::MemoryBudget => self.evicted_budget.bump(),
            CloseCause::Shutdown => self.shut_down.bump(),
            // Counted as a failure, by its cause.
            CloseCause::Failed => {}
        }
    }

    pub(crate) fn failure(&self, err: &CallError) {
        match err {
            CallError::Died { status, .. } if status.is_seccomp_kill() => self.died_seccomp.bump(),
            CallError::Died {
                status: ExitStatus::Signaled(_),
                ..
            } => self.died_signal.bump(),
            CallError::Died { .. } => self.died_exit.bump(),
            CallError::Timeout { .. } => self.died_timeout.bump(),
            CallError::Protocol { .. } => self.died_protocol.bump(),
            CallError::Launch(err) if err.is_host_pressure() => {}
            CallError::Launch(_) => self.died_launch.bump(),
            CallError::LimitExceeded { limit, .. } => match limit.cause() {
                "idle_cpu" => self.died_idle_cpu.bump(),
                _ => self.died_memory.bump(),
            },
            CallError::Io { .. } => self.died_io.bump(),
            _ => {}
        }
    }

    pub(crate) fn backoff_engaged(&self) {
        self.backoff_engaged.bump();
    }

    pub(crate) fn call_started(&self) {
        self.in_flight.increment(1.0);
    }

    pub(crate) fn call_finished(
        &self,
        tenant: &[u8],
        result: &Result<Vec<u8>, CallError>,
        took: Duration,
    ) {
        self.finished(tenant, outcome(result), took);
    }

    /// An async call whose future was dropped before it finished.
    pub(crate) fn call_cancelled(&self, tenant: &[u8], took: Duration) {
        self.finished(tenant, CANCELLED, took);
    }

    fn finished(&self, tenant: &[u8], index: usize, took: Duration) {
        self.in_flight.decrement(1.0);
        self.calls[index].bump();
        self.call_seconds[index].record(took.as_secs_f64());
        if self.tenant_label {
            record_tenant_call(tenant, OUTCOMES[index], took);
        }
    }

    /// Sets the helper-state gauges.
    pub(crate) fn set_helpers(
        &self,
        spare: usize,
        idle: usize,
        busy: usize,
        launching: usize,
        closing: usize,
    ) {
        for (gauge, value) in self
            .helpers
            .iter()
            .zip([spare, idle, busy, launching, closing])
        {
            gauge.set(value as f64);
        }
    }

    /// The counters, for a stats snapshot (the caller fills in the gauges).
    pub(crate) fn counters(&self) -> Stats {
        let calls_ok = self.calls[OK].get() + self.calls[HELPER_ERROR].get();
        let calls_total: u64 = self.calls.iter().map(Count::get).sum();
        Stats {
            launches: self.launches_ok.get(),
            launch_failures: self.launches_failed.get(),
            spare_hits: self.spare_hits.get(),
            spare_misses: self.spare_misses.get(),
            quiesced_idle: self.quiesced_idle.get(),
            quiesced_max_requests: self.quiesced_max_requests.get(),
            evicted: self.evicted.get(),
            shut_down: self.shut_down.get(),
            failures: FailureStats {
                exited: self.died_exit.get(),
                signaled: self.died_signal.get(),
                seccomp: self.died_seccomp.get(),
                timeout: self.died_timeout.get(),
                protocol: self.died_protocol.get(),
                launch: self.died_launch.get(),
                io: self.died_io.get(),
                memory: self.died_memory.get(),
                idle_cpu: self.died_idle_cpu.get(),
            },
            launch_host_pressure: self.launches_host_fds.get(),
            evicted_memory_budget: self.evicted_budget.get(),
            memory: crate::pool::HelperMemory {
                spare: self.memory[0].load(Ordering::Relaxed),
                idle: self.memory[1].load(Ordering::Relaxed),
                busy: self.memory[2].load(Ordering::Relaxed),
            },
            backed_off_calls: self.calls[BACKED_OFF].get(),
            backoffs_engaged: self.backoff_engaged.get(),
            calls_ok,
            calls_failed: calls_total - calls_ok,
            prelaunches: self.prelaunches.get(),
            ..Stats::default()
        }
    }
}
