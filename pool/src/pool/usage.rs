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

/// `memory.max` of this process's cgroup (v2), if there is one and it is a
/// number (not `max`).
fn cgroup_memory_max() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroups.lines().find_map(|line| line.strip_prefix("0::"))?;
    let max = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/memory.max")).ok()?;
    max.trim().parse().ok()
}

/// Host fds each live helper holds: its stdin, stdout and stderr pipe ends
/// and its pidfd.
pub(super) const HOST_FDS_PER_HELPER: u64 = 4;
/// Host fds kept free beside the helpers': launches in progress (each holds
/// a few pipe ends for a moment), the launcher's sockets, the reactor's
/// epoll and eventfd, and the host's own.
pub(super) const HOST_FD_HEADROOM: u64 = 256;

/// Checks that `max_helpers` helpers fit under `RLIMIT_NOFILE`: raises the
/// soft limit to the hard one if that is enough (and logs it), else refuses
/// the configuration, naming `max_helpers` and the numbers.
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

/// The keeper's scratch space for samples, reused every time.
#[derive(Default)]
pub(super) struct Scratch {
    /// Live helpers, and whether each is a spare.
    helpers: Vec<(Arc<Helper>, bool)>,
    killed: Vec<Arc<Helper>>,
}

impl Shared {
    /// Whether the helpers' memory at the last sample is at or over the
    /// budget.
    pub(super) fn over_budget(&self) -> bool {
        self.limits
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
            let Some(stat) = sampler.read(helper.pid()) else {
                continue;
            };
            let busy = !helper.is_unused();
            if let Some(limit) = self.judge(helper, stat, busy) {
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
            match (spare, busy) {
                (true, _) => memory.spare += stat.resident,
                (false, true) => memory.busy += stat.resident,
                (false, false) => memory.idle += stat.resident,
            }
        }
        let mut total = memory.total();
        let over = self.limits.budget.is_some_and(|budget| total > budget);
        if !scratch.killed.is_empty() || over {
            let mut state = self.state.lock();
            for helper in scratch.killed.drain(..) {
                self.take_killed(&mut state, helper, pending);
            }
            if let Some(budget) = self.limits.budget {
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
    /// CPU baseline.
    fn judge(&self, helper: &Helper, stat: ProcStat, busy: bool) -> Option<Limit> {
        if let Some(max) = self.limits.max_memory {
            if stat.resident > max {
                return Some(Limit::Memory {
                    resident: stat.resident,
                    max,
                });
            }
        }
        let usage = &helper.usage;
        if busy {
            usage.idle_base.store(NO_BASE, Ordering::Relaxed);
            return None;
        }
        let calls = helper.calls();
        let base = usage.idle_base.load(Ordering::Relaxed);
        if base == NO_BASE || usage.calls_at_base.load(Ordering::Relaxed) != calls {
            // A new idle stretch: it starts at this sample.
            usage.idle_base.store(stat.cpu_ns, Ordering::Relaxed);
            usage.calls_at_base.store(calls, Ordering::Relaxed);
            return None;
        }
        let max = self.limits.max_idle_cpu?;
        let used = Duration::from_nanos(stat.cpu_ns.saturating_sub(base));
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
            state.spares.remove(at);
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
