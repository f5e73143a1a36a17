//! Replays a call trace through the pool's idle policies
//! ([`sandpool::lifecycle`]) with a simulated clock, counting cold starts
//! and helper-seconds; the library behind `sandpool-replay`.
//!
//! # Trace format
//!
//! One call per line, `seconds,tenant`: seconds since the trace start (a
//! non-negative decimal number), then the tenant (any string without a
//! comma; surrounding blanks are trimmed). Lines are sorted by time (equal
//! times allowed). Blank lines and lines starting with `#` are ignored.
//!
//! # Simulation model
//!
//! - Per tenant, a helper is alive or not. Tenants do not interact (no
//!   `max_helpers`, no spares, no memory budget).
//! - Calls take no time and launches take no time: a call that finds no live
//!   helper is a *cold start*, and the helper it launches is alive from the
//!   call on. (A cold start's cost is therefore only counted, never timed.)
//! - The policy is consulted at keeper ticks, at whole multiples of the tick
//!   since the trace start, through the same [`TenantLifecycle::decide`] the
//!   pool uses: a live helper whose [`Decision::close_due`] is true is
//!   closed at that tick; a tenant without one whose
//!   [`Decision::prewarm_due`] is true gets one launched at that tick (a
//!   *prewarm*: not a cold start, though it is a launch). A tick at the very
//!   instant of a call comes after it.
//! - The tick is the real keeper's for a fixed policy, `idle_timeout / 4`
//!   clamped to 5 ms..=1 s; 1 s for the adaptive policy.
//! - Helper-seconds are the total time helpers were alive. After a tenant's
//!   last call the simulation goes on until its helper is closed and no
//!   prewarm is pending: the end of the trace cuts no helper short.

use std::fmt;
use std::time::Duration;

use sandpool::lifecycle::{AdaptiveParams, Decision, IdlePolicy, TenantLifecycle};
use thiserror::Error;

/// One call of a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    /// When, since the trace start.
    pub at: Duration,
    /// Index into [`Trace::tenants`].
    pub tenant: usize,
}

/// A parsed trace: calls in time order, tenants interned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trace {
    /// Tenant names, in order of first call.
    pub tenants: Vec<String>,
    /// Every call, sorted by time.
    pub calls: Vec<Call>,
}

/// A trace line could not be parsed. Line numbers count from 1, blank and
/// comment lines included.
#[derive(Clone, Debug, PartialEq, Error)]
#[non_exhaustive]
pub enum ParseTraceError {
    /// The line is not `seconds,tenant`.
    #[error("line {line}: {problem}: {text:?}")]
    Malformed {
        /// The line number.
        line: usize,
        /// What is wrong.
        problem: &'static str,
        /// The line (cut to 80 characters).
        text: String,
    },
    /// The line's time is earlier than the line before it.
    #[error("line {line}: not sorted: {seconds} s is before the previous call's {previous} s")]
    Unsorted {
        /// The line number.
        line: usize,
        /// Its time, in seconds.
        seconds: f64,
        /// The previous call's time, in seconds.
        previous: f64,
    },
}

/// Reading a trace file failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ReadTraceError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid trace.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        source: ParseTraceError,
    },
}

/// Parses a trace (see the module documentation for the format).
pub fn parse_trace(text: &str) -> Result<Trace, ParseTraceError> {
    let mut trace = Trace::default();
    let mut index = std::collections::HashMap::<&str, usize>::new();
    let mut previous: Option<f64> = None;
    for (number, raw) in text.lines().enumerate() {
        let line = number + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let malformed = |problem| ParseTraceError::Malformed {
            line,
            problem,
            text: trimmed.chars().take(80).collect(),
        };
        let (seconds, tenant) = trimmed
            .split_once(',')
            .ok_or_else(|| malformed("no comma between seconds and tenant"))?;
        let tenant = tenant.trim();
        if tenant.is_empty() {
            return Err(malformed("empty tenant"));
        }
        if tenant.contains(',') {
            return Err(malformed("more than one comma"));
        }
        let seconds = seconds.trim();
        // Plain decimals only: no "inf", "NaN", exponents or signs.
        if seconds.is_empty()
            || !seconds.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            || seconds.bytes().filter(|&b| b == b'.').count() > 1
            || seconds == "."
        {
            return Err(malformed("seconds is not a non-negative decimal number"));
        }
        let seconds: f64 = seconds
            .parse()
            .map_err(|_| malformed("seconds is not a non-negative decimal number"))?;
        let at = Duration::try_from_secs_f64(seconds)
            .map_err(|_| malformed("seconds is out of range"))?;
        if let Some(previous) = previous.filter(|&previous| seconds < previous) {
            return Err(ParseTraceError::Unsorted {
                line,
                seconds,
                previous,
            });
        }
        previous = Some(seconds);
        let next = index.len();
        let tenant = *index.entry(tenant).or_insert_with(|| {
            trace.tenants.push(tenant.to_owned());
            next
        });
        trace.calls.push(Call { at, tenant });
    }
    Ok(trace)
}

/// Reads and parses a trace file.
pub fn read_trace(path: &std::path::Path) -> Result<Trace, ReadTraceError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ReadTraceError::Io {
        path: shown.clone(),
        source,
    })?;
    parse_trace(&text).map_err(|source| ReadTraceError::Parse {
        path: shown,
        source,
    })
}

/// What a replay counted.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Outcome {
    /// Calls replayed.
    pub calls: u64,
    /// Calls that found no live helper.
    pub cold_starts: u64,
    /// Helpers launched ahead of a call by the policy.
    pub prewarms: u64,
    /// Total time helpers were alive, in seconds.
    pub helper_seconds: f64,
}

/// The keeper tick the simulation uses for a policy: the real keeper's
/// `idle_timeout / 4` clamped to 5 ms..=1 s for a fixed policy, 1 s for the
/// adaptive one.
pub fn keeper_tick(policy: &IdlePolicy) -> Duration {
    match policy {
        IdlePolicy::Fixed { idle_timeout } => {
            (*idle_timeout / 4).clamp(Duration::from_millis(5), Duration::from_secs(1))
        }
        _ => Duration::from_secs(1),
    }
}

/// The first tick at or after `at`.
fn tick_at_or_after(at: Duration, tick: Duration) -> Duration {
    let tick_ns = tick.as_nanos().max(1);
    let ticks = at.as_nanos().div_ceil(tick_ns);
    let ns = ticks.saturating_mul(tick_ns);
    Duration::new(
        u64::try_from(ns / 1_000_000_000).unwrap_or(u64::MAX),
        (ns % 1_000_000_000) as u32,
    )
}

/// One tenant's simulated helper.
struct Tenant {
    state: TenantLifecycle,
    /// Since when the helper is alive, if it is.
    alive_since: Option<Duration>,
    /// Ticks at or before this have been looked at.
    checked: Duration,
}

impl Tenant {
    /// Runs the keeper's ticks after `checked` and before `until` (all of
    /// them if `None`), stopping early once nothing is left to do.
    fn run_ticks(
        &mut self,
        until: Option<Duration>,
        policy: &IdlePolicy,
        tick: Duration,
        outcome: &mut Outcome,
    ) {
        loop {
            let now_decision: Decision = self.state.decide(self.checked, policy);
            // The next moment the decision asks for something.
            let wanted = match self.alive_since {
                Some(_) => now_decision.keep_until,
                None => match now_decision.prewarm_at {
                    Some(at) => at,
                    None => return,
                },
            };
            let mut at = tick_at_or_after(wanted.max(self.checked), tick);
            if at <= self.checked {
                at = tick_at_or_after(self.checked + Duration::from_nanos(1), tick);
            }
            if until.is_some_and(|until| at >= until) {
                return;
            }
            self.checked = at;
            let decision = self.state.decide(at, policy);
            match self.alive_since {
                Some(since) if decision.close_due(at) => {
                    outcome.helper_seconds += (at - since).as_secs_f64();
                    self.alive_since = None;
                }
                None if decision.prewarm_due(at) => {
                    outcome.prewarms += 1;
                    self.alive_since = Some(at);
                }
                _ => {}
            }
        }
    }
}

/// Replays `trace` through `policy` with a keeper tick of `tick` (see the
/// module documentation for the model).
pub fn simulate(trace: &Trace, policy: &IdlePolicy, tick: Duration) -> Outcome {
    let mut outcome = Outcome::default();
    let mut tenants: Vec<Tenant> = (0..trace.tenants.len())
        .map(|_| Tenant {
            state: TenantLifecycle::new(),
            alive_since: None,
            checked: Duration::ZERO,
        })
        .collect();
    for call in &trace.calls {
        let Some(tenant) = tenants.get_mut(call.tenant) else {
            continue;
        };
        tenant.run_ticks(Some(call.at), policy, tick, &mut outcome);
        outcome.calls += 1;
        if tenant.alive_since.is_none() {
            outcome.cold_starts += 1;
            tenant.alive_since = Some(call.at);
        }
        tenant.state.on_call(call.at, policy);
        // The ticks before the call are done; a tick at the call's instant
        // comes after it.
        tenant.checked = tenant.checked.max(
            tick_at_or_after(call.at, tick)
                .checked_sub(tick)
                .unwrap_or_default(),
        );
    }
    for tenant in &mut tenants {
        tenant.run_ticks(None, policy, tick, &mut outcome);
    }
    outcome
}

/// One policy's replay: the row of `sandpool-replay`'s output.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyRun {
    /// The policy.
    pub policy: IdlePolicy,
    /// The tick it was replayed with.
    pub tick: Duration,
    /// What the replay counted.
    pub outcome: Outcome,
}

impl PolicyRun {
    /// `"fixed"` or `"adaptive"`.
    pub fn kind(&self) -> &'static str {
        match self.policy {
            IdlePolicy::Fixed { .. } => "fixed",
            _ => "adaptive",
        }
    }

    /// The fixed policy's `idle_timeout` in seconds; `None` for adaptive.
    pub fn idle_timeout_s(&self) -> Option<f64> {
        match self.policy {
            IdlePolicy::Fixed { idle_timeout } => Some(idle_timeout.as_secs_f64()),
            _ => None,
        }
    }

    /// The object of `sandpool-replay --json`: `policy`, `idle_timeout_s`,
    /// `cold_starts`, `helper_seconds`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "policy": self.kind(),
            "idle_timeout_s": self.idle_timeout_s(),
            "cold_starts": self.outcome.cold_starts,
            "helper_seconds": (self.outcome.helper_seconds * 1000.0).round() / 1000.0,
        })
    }
}

impl fmt::Display for PolicyRun {
    /// `fixed 180s` or `adaptive`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.idle_timeout_s() {
            Some(seconds) => write!(f, "fixed {seconds}s"),
            None => f.write_str("adaptive"),
        }
    }
}

/// The fixed timeouts `sandpool-replay` compares, in seconds.
pub const FIXED_TIMEOUTS_S: [u64; 6] = [10, 60, 180, 300, 600, 1800];

/// The fixed timeout the ratios are against, in seconds.
pub const BASELINE_TIMEOUT_S: u64 = 180;

/// The policies `sandpool-replay` compares: every [`FIXED_TIMEOUTS_S`],
/// then the adaptive policy with its defaults.
pub fn standard_policies() -> Vec<IdlePolicy> {
    FIXED_TIMEOUTS_S
        .iter()
        .map(|&seconds| IdlePolicy::Fixed {
            idle_timeout: Duration::from_secs(seconds),
        })
        .chain([IdlePolicy::Adaptive(AdaptiveParams::default())])
        .collect()
}

/// Replays `trace` through each policy with its [`keeper_tick`].
pub fn run_policies(trace: &Trace, policies: &[IdlePolicy]) -> Vec<PolicyRun> {
    policies
        .iter()
        .map(|policy| {
            let tick = keeper_tick(policy);
            PolicyRun {
                policy: policy.clone(),
                tick,
                outcome: simulate(trace, policy, tick),
            }
        })
        .collect()
}

/// The runs on the Pareto front of (helper-seconds, cold starts), both
/// lower is better: sorted by helper-seconds, each with fewer cold starts
/// than every cheaper one. Indexes into `runs`.
pub fn pareto_front(runs: &[PolicyRun]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&runs[a].outcome, &runs[b].outcome);
        a.helper_seconds
            .total_cmp(&b.helper_seconds)
            .then(a.cold_starts.cmp(&b.cold_starts))
    });
    let mut front = Vec::new();
    let mut best = u64::MAX;
    for index in order {
        if runs[index].outcome.cold_starts < best {
            best = runs[index].outcome.cold_starts;
            front.push(index);
        }
    }
    front
}
