//! The keeper's resource sampling: every `sample_interval` one read of
//! `/proc/PID/stat` per live helper gives its resident memory and CPU
//! time; a helper over `max_helper_memory`, or over `max_idle_cpu` with no
//! call owed, is killed, and idle helpers are evicted while the pool is over
//! its `memory_budget`. The host's own fd budget is checked here too.

use std::fmt::Write as _;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{info, warn};

use super::tenants::Shared;
use super::{CloseCause, HelperMemory};
use crate::config::{Config, ConfigError, MemoryBudget};
use crate::conn::{Helper, NO_BASE};
use crate::error::{CallError, Limit};

/// The limits the keeper enforces, resolved at `Pool::new`.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Limits {
    pub(super) max_memory: Option<u64>,
    pub(super) budget: Option<u64>,
    pub(super) max_idle_cpu: Option<Duration>,
}

impl Limits {
    /// Resolves the configuration (`memory_budget = "auto"` reads the
    /// host's memory).
    pub(super) fn resolve(config: &Config) -> Result<Limits, ConfigError> {
        let budget = match config.memory_budget {
            MemoryBudget::Unlimited => None,
            MemoryBudget::Bytes(size) => Some(size.as_u64()),
            MemoryBudget::Auto => Some(host_memory()? / 2),
        };
        Ok(Limits {
            max_memory: config.max_helper_memory.bytes(),
            budget,
            max_idle_cpu: config.max_idle_cpu.time(),
        })
    }

    /// Whether anything needs sampling.
    pub(super) fn any(&self) -> bool {
        self.max_memory.is_some() || self.budget.is_some() || self.max_idle_cpu.is_some()
    }
}

/// The host's memory as the pool sees it: the smaller of `MemTotal` and the
/// cgroup v2 `memory.max` of this process, where one is set.
fn host_memory() -> Result<u64, ConfigError> {
    let unreadable = |what: &str, err: &dyn std::fmt::Display| {
        ConfigError::new(
            "memory_budget",
            format!("\"auto\" could not read {what} ({err}): set a size or \"unlimited\""),
        )
    };
    let meminfo =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| unreadable("/proc/meminfo", &e))?;
    let total = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| unreadable("MemTotal in /proc/meminfo", &"no such line"))?;
    Ok(cgroup_memory_max().map_or(total, |max| max.min(total)))
}

/// The smallest memory limit on this process's cgroup or any ancestor:
/// cgroup v2 `memory.max` (from the unified hierarchy's path up to its
/// root), or cgroup v1 `memory.limit_in_bytes` of the memory controller.
/// `None` where no limit is set or none can be read.
fn cgroup_memory_max() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read =
        |path: &str| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    let mut limits = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let (root, file) = if controllers.is_empty() {
            ("/sys/fs/cgroup", "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
        } else {
            continue;
        };
        let mut dir = std::path::PathBuf::from(path);
        loop {
            let at = format!("{root}{}/{file}", dir.display());
            limits.extend(read(&at));
            if !dir.pop() {
                break;
            }
        }
    }
    // cgroup v1 reports "no limit" as a huge page-rounded number.
    limits.into_iter().filter(|limit| *limit < (1 << 60)).min()
}

/// Host fds each live helper holds: its stdin, stdout and stderr pipe ends
/// and its pidfd.
pub(super) const HOST_FDS_PER_HELPER: u64 = 4;
/// Host fds kept free beside the helpers': launches in progress (each holds
/// a few pipe ends for a moment), the launcher's sockets, the reactor's
/// epoll and eventfd, and the host's own.
pub(super) const HOST_FD_HEADROOM: u64 = 256;

/// Checks that `max_helpers` helpers fit under `RLIMIT_NOFILE`: raises the
/// soft limit to the hard one if that is enough (and logs it),
/// else refuses the configuration, naming `max_helpers` and the numbers.
pub(super) fn ensure_fd_budget(max_helpers: usize) -> Result<(), ConfigError> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let need = (max_helpers as u64)
        .saturating_mul(HOST_FDS_PER_HELPER)
        .saturating_add(HOST_FD_HEADROOM);
    let limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if need <= soft {
        return Ok(());
    }
    let fits = hard.saturating_sub(HOST_FD_HEADROOM) / HOST_FDS_PER_HELPER;
    if need > hard {
        return Err(ConfigError::new(
            "max_helpers",
            format!(
                "{max_helpers} helpers need {need} host fds ({HOST_FDS_PER_HELPER} each and {HOST_FD_HEADROOM} spare), over the hard RLIMIT_NOFILE of {hard}: lower max_helpers to at most {fits} or raise the limit"
            ),
        ));
    }
    // To the hard limit, not just to `need`: a helper's fds close a moment
    // after it is reaped (when the reactor lets go of it), so under churn
    // more are open than the live count says; and the host's own code
    // grows too. (Children inherit the raised soft limit; `select()` breaks
    // past fd 1024 whatever the limit, once that many are open.)
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, raised).map_err(|err| {
        ConfigError::new(
            "max_helpers",
            format!(
                "{max_helpers} helpers need {need} host fds, over the soft RLIMIT_NOFILE of {soft}, and raising it to the hard {hard} failed: {err}"
            ),
        )
    })?;
    info!(
        from = soft,
        to = hard,
        need,
        "raised the soft RLIMIT_NOFILE to the hard limit for max_helpers"
    );
    Ok(())
}

/// One process's figures from `/proc/PID/stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ProcStat {
    /// User plus system CPU time, in nanoseconds.
    pub(super) cpu_ns: u64,
    /// Resident set size, in bytes.
    pub(super) resident: u64,
}

/// Parses `/proc/PID/stat`. The process name (field 2, in parentheses) is
/// the helper's own choice and may hold spaces and parentheses, so the
/// fields are counted from the last `)`: after it come the state (field 3),
/// `utime` and `stime` (14, 15, in clock ticks) and `rss` (24, in pages).
pub(super) fn parse_stat(text: &[u8], tick_ns: u64, page: u64) -> Option<ProcStat> {
    let close = text.iter().rposition(|b| *b == b')')?;
    let rest = std::str::from_utf8(&text[close + 1..]).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let mut nth = |n: usize| -> Option<u64> { fields.nth(n)?.parse().ok() };
    // Indexes after the parenthesis: field 3 is index 0.
    let utime = nth(11)?;
    let stime = nth(0)?;
    let rss = nth(8)?;
    Some(ProcStat {
        cpu_ns: utime.saturating_add(stime).saturating_mul(tick_ns),
        resident: rss.saturating_mul(page),
    })
}

/// Reads `/proc/PID/stat` without allocating (a reused path and buffer).
pub(super) struct Sampler {
    path: String,
    buf: Box<[u8; 2048]>,
    tick_ns: u64,
    page: u64,
}

impl Sampler {
    pub(super) fn new() -> Sampler {
        let ticks = rustix::param::clock_ticks_per_second().max(1);
        Sampler {
            path: String::with_capacity(32),
            buf: Box::new([0; 2048]),
            tick_ns: 1_000_000_000 / ticks,
            page: rustix::param::page_size() as u64,
        }
    }

    /// The helper's figures, or `None` if it is gone or unreadable.
    pub(super) fn read(&mut self, pid: u32) -> Option<ProcStat> {
        self.path.clear();
        let _ = write!(self.path, "/proc/{pid}/stat");
        let mut file = std::fs::File::open(&self.path).ok()?;
        let mut len = 0;
        while len < self.buf.len() {
            match file.read(&mut self.buf[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        parse_stat(&self.buf[..len], self.tick_ns, self.page)
    }
}

impl HelperMemory {
    /// Counts `resident` bytes of a helper in its state.
    fn add(&mut self, spare: bool, busy: bool, resident: u64) {
        match (spare, busy) {
            (true, _) => self.spare += resident,
            (false, true) => self.busy += resident,
            (false, false) => self.idle += resident,
        }
    }
}

/// The keeper's scratch space for samples, reused every time.
#[derive(Default)]
pub(super) struct Scratch {
    /// Live helpers, and whether each is a spare.
    helpers: Vec<(Arc<Helper>, bool)>,
    killed: Vec<Arc<Helper>>,
}

impl Shared {
    /// Whether the helpers' memory at the last sample is at or over the
    /// budget, and evicting idle helpers can bring it under.
    pub(super) fn over_budget(&self) -> bool {
        self.budget_reachable.load(Ordering::Relaxed)
            && self
                .live()
                .limits
                .budget
                .is_some_and(|budget| self.resident_total.load(Ordering::Relaxed) >= budget)
    }

    /// Samples every live helper, kills those over a limit, and evicts idle
    /// helpers while the pool is over its memory budget. Killed and evicted
    /// helpers go to `pending` for the keeper to close and reap. No I/O
    /// under the state lock; allocates nothing unless it kills.
    pub(super) fn sample(
        &self,
        sampler: &mut Sampler,
        scratch: &mut Scratch,
        pending: &mut Vec<(Arc<Helper>, CloseCause)>,
    ) {
        {
            let state = self.state.lock();
            scratch
                .helpers
                .extend(state.spares.iter().map(|h| (h.clone(), true)));
            scratch.helpers.extend(
                state
                    .tenants
                    .values()
                    .filter_map(|t| t.helper.as_ref())
                    .map(|h| (h.clone(), false)),
            );
        }
        let mut memory = HelperMemory::default();
        for (helper, spare) in &scratch.helpers {
            if helper.is_retired() {
                continue;
            }
            let busy = !helper.is_unused();
            let Some(stat) = sampler.read(helper.pid()) else {
                // Unreadable (e.g. the host is out of fds): its last sample
                // still counts toward the budget, so the limits do not go
                // blind under host pressure.
                memory.add(*spare, busy, helper.usage.resident.load(Ordering::Relaxed));
                continue;
            };
            if let Some(limit) = self.judge(helper, stat, sampler.tick_ns) {
                let error = CallError::LimitExceeded {
                    pid: helper.pid(),
                    limit,
                    stderr: String::new(),
                };
                warn!(pid = helper.pid(), %limit, "helper over a resource limit; killed");
                if helper.kill_for(error) {
                    scratch.killed.push(helper.clone());
                }
                continue;
            }
            helper
                .usage
                .resident
                .store(stat.resident, Ordering::Relaxed);
            memory.add(*spare, busy, stat.resident);
        }
        let mut total = memory.total();
        // Evictions help only if the busy helpers alone fit the budget:
        // past that, evicting every idle helper would not get under it (a
        // busy hog is max_helper_memory's to judge), and the pool keeps
        // its idle helpers rather than churn them.
        let live = self.live();
        let reachable = live
            .limits
            .budget
            .is_some_and(|budget| memory.busy <= budget);
        self.budget_reachable.store(reachable, Ordering::Relaxed);
        let over = reachable && live.limits.budget.is_some_and(|budget| total > budget);
        if !scratch.killed.is_empty() || over {
            let mut state = self.state.lock();
            for helper in scratch.killed.drain(..) {
                self.take_killed(&mut state, helper, pending);
            }
            if let Some(budget) = live.limits.budget.filter(|_| over) {
                while total > budget {
                    let Some(freed) = self.evict_for_budget(&mut state, pending) else {
                        break;
                    };
                    total = total.saturating_sub(freed);
                }
            }
        }
        self.resident_total.store(total, Ordering::Relaxed);
        self.telemetry.set_memory(&memory);
        // The handles drop here, outside the lock.
        scratch.helpers.clear();
    }

    /// The limit `helper` is over at this sample, if any; keeps its idle
    /// CPU account.
    ///
    /// Idle CPU is measured, not guessed from samples that happen to fall
    /// between calls: over each interval it is the helper's CPU time less
    /// the wall time during which a reply was owed (a single-threaded
    /// helper cannot spend more CPU than that on calls), less one clock
    /// tick of rounding. It is summed over the intervals since the last
    /// reply (a reply halves the sum), so a helper that spins after every
    /// reply is caught however often it is called, and one that spins
    /// slowly over several intervals.
    fn judge(&self, helper: &Helper, stat: ProcStat, tick_ns: u64) -> Option<Limit> {
        if let Some(max) = self.live().limits.max_memory
            && stat.resident > max
        {
            return Some(Limit::Memory {
                resident: stat.resident,
                max,
            });
        }
        let usage = &helper.usage;
        let owed = u64::try_from(helper.owed_time().as_nanos()).unwrap_or(u64::MAX);
        let calls = helper.calls();
        let last_cpu = usage.last_cpu.swap(stat.cpu_ns, Ordering::Relaxed);
        let last_owed = usage.last_owed.swap(owed, Ordering::Relaxed);
        let last_calls = usage.last_calls.swap(calls, Ordering::Relaxed);
        if last_cpu == NO_BASE {
            return None;
        }
        let idle = stat
            .cpu_ns
            .saturating_sub(last_cpu)
            .saturating_sub(owed.saturating_sub(last_owed))
            .saturating_sub(tick_ns);
        // Within a stretch with no reply the idle CPU adds up; a reply
        // halves what came before, so a helper that burns a steady share of
        // a core between frequent replies converges to twice its burn per
        // interval and is caught once that passes the limit (a quarter of a
        // core at the defaults), while a quiet helper stays at zero.
        let before = usage.idle_cpu.load(Ordering::Relaxed);
        let total = if calls == last_calls {
            before.saturating_add(idle)
        } else {
            (before / 2).saturating_add(idle)
        };
        usage.idle_cpu.store(total, Ordering::Relaxed);
        let max = self.live().limits.max_idle_cpu?;
        let used = Duration::from_nanos(total);
        (used > max).then_some(Limit::IdleCpu { used, max })
    }

    /// Takes a helper the sampler killed out of the pool: a spare is
    /// dropped from the spares (charged to nobody), a bound one unbound
    /// and its failure counted toward its tenant's back-off.
    fn take_killed(
        &self,
        state: &mut super::tenants::State,
        helper: Arc<Helper>,
        pending: &mut Vec<(Arc<Helper>, CloseCause)>,
    ) {
        if let Some(at) = state.spares.iter().position(|h| Arc::ptr_eq(h, &helper)) {
            // Charged to no tenant, but counted, and spare refills back off
            // (a program that misbehaves before any bind would otherwise be
            // relaunched at every sample).
            state.spares.remove(at);
            if let Some(err) = helper.failure() {
                self.telemetry.failure(&err);
            }
            self.spare_killed();
        } else {
            let tenant = state
                .tenants
                .iter()
                .find(|(_, t)| t.helper.as_ref().is_some_and(|h| Arc::ptr_eq(h, &helper)))
                .map(|(key, _)| key.clone());
            let Some(tenant) = tenant else {
                // Already taken from its tenant by a caller that saw it fail.
                return;
            };
            if !self.unbind(state, &tenant, &helper) {
                return;
            }
            self.count_failure(state, &tenant, &helper);
        }
        state.closing += 1;
        pending.push((helper, CloseCause::Failed));
        self.notify_changed();
    }

    /// A spare was killed for a limit: spare refills wait, doubling from
    /// `crash_backoff.initial` up to its `max`.
    fn spare_killed(&self) {
        let mut strikes = self.spare_strikes.lock();
        strikes.0 = strikes.0.saturating_add(1);
        let live = self.live();
        let backoff = &live.config.crash_backoff;
        let delay = backoff
            .delay(strikes.0.saturating_add(1))
            .unwrap_or(backoff.initial);
        strikes.1 = Some(std::time::Instant::now() + delay);
    }

    /// Whether spare refills wait, after spares were killed.
    pub(super) fn spare_refills_wait(&self) -> bool {
        self.spare_strikes
            .lock()
            .1
            .is_some_and(|until| std::time::Instant::now() < until)
    }

    /// Evicts the least recently used idle helper (or else the oldest
    /// spare) for the memory budget; returns its resident bytes.
    pub(super) fn evict_for_budget(
        &self,
        state: &mut super::tenants::State,
        pending: &mut Vec<(Arc<Helper>, CloseCause)>,
    ) -> Option<u64> {
        if let Some(freed) = self.evict_lru(state, CloseCause::MemoryBudget) {
            return Some(freed);
        }
        let spare = state.spares.pop_front()?;
        let freed = spare.usage.resident.load(Ordering::Relaxed);
        state.closing += 1;
        self.telemetry.closed(CloseCause::MemoryBudget);
        pending.push((spare, CloseCause::MemoryBudget));
        Some(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A hostile name with spaces and parentheses cannot shift the fields.
        let line = b"4242 (a) b (c) 0 0) S 1 4242 4242 0 -1 4194560 97 0 0 0 \
            250 50 0 0 20 0 1 0 12345 8388608 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        let stat = parse_stat(line, 10_000_000, 4096).expect("parses");
        assert_eq!(stat.cpu_ns, 300 * 10_000_000);
        assert_eq!(stat.resident, 300 * 4096);
        assert_eq!(parse_stat(b"4242 (x) S 1", 1, 1), None);
        assert_eq!(parse_stat(b"no parenthesis", 1, 1), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let mut sampler = Sampler::new();
        let stat = sampler.read(std::process::id()).expect("own stat");
        assert!(stat.resident > 0);
    }

    #[test]
    fn an_impossible_fd_budget_names_max_helpers() {
        let err = ensure_fd_budget(usize::MAX / 8).expect_err("cannot fit");
        assert_eq!(err.field, "max_helpers");
        assert!(
            err.problem.contains("hard RLIMIT_NOFILE"),
            "{}",
            err.problem
        );
    }
}
