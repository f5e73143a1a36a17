//! When to close a tenant's idle helper, and when to launch one before the
//! tenant calls: the idle policy, as pure code.
//!
//! A fixed `idle_timeout` for every tenant is a trap for tenants called often
//! enough never to be forgotten yet rarely enough that quiescing kicks in:
//! they pay a launch on nearly every first query. [`IdlePolicy::Adaptive`]
//! follows the "hybrid histogram" policy of Shahrad et al., *Serverless in the
//! Wild* (USENIX ATC 2020): each tenant keeps a small histogram of its idle
//! gaps ([`GapHistogram`]); a helper is kept until the gaps' high percentile,
//! and when the histogram is regular it is closed after the burst and
//! launched again shortly before the low percentile, so the next call finds
//! it warm without the helper idling through the whole gap.
//!
//! # Time
//!
//! Nothing here reads a clock. Every function takes `now` as a [`Duration`]
//! since an epoch of the caller's choosing (the pool: `Instant - epoch` of
//! the pool's start; a replay: simulated seconds since the trace start), and
//! the same inputs always give the same answers. A `Duration` rather than a
//! bare count of milliseconds because that is what `Instant::duration_since`
//! and `Duration::from_secs_f64` give and the unit cannot be mistaken;
//! internally times are kept in whole milliseconds (the per-tenant state
//! stays small, and the pool's keeper never ticks faster than 5 ms).
//!
//! # How the pool uses it
//!
//! One [`TenantLifecycle`] per tenant. On every call,
//! [`on_call`](TenantLifecycle::on_call). At each keeper tick,
//! [`decide`](TenantLifecycle::decide) and then, with the [`Decision`]:
//! an idle helper with [`close_due`](Decision::close_due) is closed; a
//! tenant without a helper with [`prewarm_due`](Decision::prewarm_due) gets
//! one (a spare bound to it, or a launch).
//!
//! # The adaptive decision
//!
//! Gaps shorter than `min_keep` are not recorded: a helper always stays at
//! least `min_keep` after a call, so they are warm whatever the histogram
//! says, and they say nothing about how long to keep a helper *past*
//! `min_keep` (a burst of a hundred calls one second apart would otherwise
//! put the 99th percentile at one second). The histogram is therefore the
//! distribution of the gaps that outlast `min_keep`, the only ones a keep or
//! prewarm decision can win or lose. After a call at `t`:
//!
//! - fewer than `min_samples` gaps recorded: keep until
//!   `t + fallback_idle_timeout` (a fixed policy);
//! - the gaps' `keep_percentile` (bucket upper bound) plus `margin` is more
//!   than `max_keep`: the tail is too long to bridge (Shahrad's
//!   out-of-bounds case): keep only `min_keep`;
//! - otherwise keep `K` = that value, at least `min_keep`; and if the
//!   histogram is regular (keep bound over the `prewarm_percentile`'s lower
//!   bound at most `max_spread`) and the prewarm point
//!   `P` = lower bound minus `margin` leaves the helper closed for at least
//!   `min_keep` after the burst, close at `t + min_keep`, launch again at
//!   `t + P` and keep until `t + K`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::MAX_DURATION;

mod histogram;

pub use histogram::{BUCKETS, GapHistogram, HISTOGRAM_RANGE};

/// How long idle helpers are kept, and whether they are launched ahead of a
/// predicted call. In TOML, a table with `mode = "fixed"` or
/// `mode = "adaptive"`:
///
/// ```toml
/// [idle_policy]
/// mode = "adaptive"     # every other field optional, as AdaptiveParams
/// max_keep = "30m"
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase", deny_unknown_fields)]
#[non_exhaustive]
pub enum IdlePolicy {
    /// Every tenant's idle helper is closed `idle_timeout` after its last
    /// call; nothing is launched ahead of a call.
    Fixed {
        /// How long an idle helper is kept after the last call.
        #[serde(with = "humantime_serde")]
        idle_timeout: Duration,
    },
    /// Per tenant, from the histogram of its idle gaps (see the module
    /// documentation).
    Adaptive(AdaptiveParams),
}

impl Default for IdlePolicy {
    /// `Fixed` with the pool's default `idle_timeout`, 5 min.
    fn default() -> Self {
        IdlePolicy::Fixed {
            idle_timeout: DEFAULT_FALLBACK_IDLE_TIMEOUT,
        }
    }
}

impl IdlePolicy {
    /// Checks the policy's values; the error names the field.
    pub fn validate(&self) -> Result<(), LifecycleConfigError> {
        match self {
            IdlePolicy::Fixed { idle_timeout } => check_range(
                "idle_timeout",
                *idle_timeout,
                Duration::from_millis(1),
                MAX_DURATION,
            ),
            IdlePolicy::Adaptive(params) => params.validate(),
        }
    }
}

/// The pool's default `idle_timeout`, and [`AdaptiveParams`]'s default
/// `fallback_idle_timeout`: 5 min.
pub const DEFAULT_FALLBACK_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The tuning of [`IdlePolicy::Adaptive`]. Every field has a default;
/// durations are human (`"10s"`, `"1h"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveParams {
    /// The quantile of a tenant's idle gaps its helper is kept until.
    /// Default 0.99, as Shahrad et al.
    pub keep_percentile: f64,
    /// The quantile of the gaps before which a closed helper is launched
    /// again, when the histogram is regular. Default 0.05, as Shahrad et al.
    pub prewarm_percentile: f64,
    /// A helper is always kept this long after a call, and gaps shorter
    /// than this are not recorded (they are warm whatever the history).
    /// 100 ms to `max_keep`. Default 30 s: longer than the pauses inside a
    /// burst of calls and the gaps of a tenant called every few seconds
    /// (with 10 s, such a tenant's rare half-minute pauses became the
    /// histogram, and the 1% of them beyond its 99th percentile cold
    /// starts: 8.8x fixed 180 s's on steady tenants in `sandpool-replay`,
    /// 1.5x with 30 s, 1.0x with 60 s, which costs periodic tenants 20%
    /// more helper-seconds), short against a launch's worth of idling.
    #[serde(with = "humantime_serde")]
    pub min_keep: Duration,
    /// Never keep an idle helper longer than this after a call; a tenant
    /// whose gaps' keep percentile is beyond it is kept only `min_keep`.
    /// At most [`HISTOGRAM_RANGE`]. Default 1 h.
    #[serde(with = "humantime_serde")]
    pub max_keep: Duration,
    /// Safety margin, a fraction: the keep bound is stretched by it and the
    /// prewarm point brought forward by it. 0 to 1. Default 0.1, as Shahrad
    /// et al.
    pub margin: f64,
    /// The histogram is trusted from this many recorded gaps on; before,
    /// the tenant's helper is kept `fallback_idle_timeout`. 1 to 1000.
    /// Default 5: with the keep percentile at 0.99 the first few gaps
    /// already bound it by their longest.
    pub min_samples: u32,
    /// The fixed keep of a tenant with too little history; `min_keep` to
    /// `max_keep`. Default 5 min, the pool's fixed `idle_timeout` default,
    /// so that a tenant the policy knows nothing about is treated as today.
    #[serde(with = "humantime_serde")]
    pub fallback_idle_timeout: Duration,
    /// The regularity criterion for prewarming: the keep bound divided by
    /// the prewarm bound (both as buckets give them) must be at most this.
    /// A wider spread means the next call could come almost anywhere, and
    /// closing between the burst and the prewarm point would trade more
    /// cold starts than it saves. At least 1. Default 4.
    pub max_spread: f64,
}

impl Default for AdaptiveParams {
    fn default() -> Self {
        AdaptiveParams {
            keep_percentile: 0.99,
            prewarm_percentile: 0.05,
            min_keep: Duration::from_secs(30),
            max_keep: Duration::from_secs(3600),
            margin: 0.1,
            min_samples: 5,
            fallback_idle_timeout: DEFAULT_FALLBACK_IDLE_TIMEOUT,
            max_spread: 4.0,
        }
    }
}

/// An idle policy value is invalid. Names the field and the value.
#[derive(Clone, Debug, PartialEq, Error)]
#[non_exhaustive]
pub enum LifecycleConfigError {
    /// A percentile is not strictly between 0 and 1.
    #[error("invalid idle policy: {field}: {value} is not strictly between 0 and 1")]
    Percentile {
        /// The field.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// `prewarm_percentile` is not below `keep_percentile`.
    #[error(
        "invalid idle policy: prewarm_percentile: {prewarm} is not below keep_percentile ({keep})"
    )]
    PercentileOrder {
        /// `prewarm_percentile`.
        prewarm: f64,
        /// `keep_percentile`.
        keep: f64,
    },
    /// A duration is outside the range the field accepts.
    #[error("invalid idle policy: {field}: {value:?} is outside {min:?}..={max:?}")]
    Duration {
        /// The field.
        field: &'static str,
        /// Its value.
        value: Duration,
        /// The shortest accepted.
        min: Duration,
        /// The longest accepted.
        max: Duration,
    },
    /// `min_keep` is longer than `max_keep`.
    #[error("invalid idle policy: min_keep: {min_keep:?} is longer than max_keep ({max_keep:?})")]
    KeepBounds {
        /// `min_keep`.
        min_keep: Duration,
        /// `max_keep`.
        max_keep: Duration,
    },
    /// A number is outside the range the field accepts (or not a number).
    #[error("invalid idle policy: {field}: {value} is outside {min}..={max}")]
    Number {
        /// The field.
        field: &'static str,
        /// Its value.
        value: f64,
        /// The smallest accepted.
        min: f64,
        /// The largest accepted.
        max: f64,
    },
}

fn check_range(
    field: &'static str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), LifecycleConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(LifecycleConfigError::Duration {
            field,
            value,
            min,
            max,
        })
    }
}

fn check_number(
    field: &'static str,
    value: f64,
    min: f64,
    max: f64,
) -> Result<(), LifecycleConfigError> {
    // `contains` is false for NaN.
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(LifecycleConfigError::Number {
            field,
            value,
            min,
            max,
        })
    }
}

impl AdaptiveParams {
    /// Checks every field; the error names the first invalid one and its
    /// value.
    pub fn validate(&self) -> Result<(), LifecycleConfigError> {
        for (field, value) in [
            ("keep_percentile", self.keep_percentile),
            ("prewarm_percentile", self.prewarm_percentile),
        ] {
            if !(value > 0.0 && value < 1.0) {
                return Err(LifecycleConfigError::Percentile { field, value });
            }
        }
        if self.prewarm_percentile >= self.keep_percentile {
            return Err(LifecycleConfigError::PercentileOrder {
                prewarm: self.prewarm_percentile,
                keep: self.keep_percentile,
            });
        }
        let shortest = Duration::from_millis(100);
        check_range("min_keep", self.min_keep, shortest, HISTOGRAM_RANGE)?;
        check_range("max_keep", self.max_keep, shortest, HISTOGRAM_RANGE)?;
        if self.min_keep > self.max_keep {
            return Err(LifecycleConfigError::KeepBounds {
                min_keep: self.min_keep,
                max_keep: self.max_keep,
            });
        }
        check_range(
            "fallback_idle_timeout",
            self.fallback_idle_timeout,
            self.min_keep,
            self.max_keep,
        )?;
        check_number("margin", self.margin, 0.0, 1.0)?;
        check_number("min_samples", f64::from(self.min_samples), 1.0, 1000.0)?;
        check_number("max_spread", self.max_spread, 1.0, 1e6)?;
        Ok(())
    }

    /// What the histogram says, relative to the last call: `(keep, prewarm)`
    /// where a helper is kept `keep` after the call, and with
    /// `Some(prewarm)` it is closed after `min_keep` and launched again
    /// `prewarm` after the call (still kept until `keep`).
    fn plan(&self, histogram: &GapHistogram) -> (Duration, Option<Duration>) {
        if histogram.total() < self.min_samples {
            return (self.fallback_idle_timeout, None);
        }
        let (Some(keep_bound), Some(prewarm_bound)) = (
            histogram.percentile_upper(self.keep_percentile),
            histogram.percentile_lower(self.prewarm_percentile),
        ) else {
            return (self.fallback_idle_timeout, None);
        };
        if keep_bound >= HISTOGRAM_RANGE {
            return (self.min_keep, None);
        }
        let keep = keep_bound.mul_f64(1.0 + self.margin);
        if keep > self.max_keep {
            return (self.min_keep, None);
        }
        let keep = keep.max(self.min_keep);
        let regular = !prewarm_bound.is_zero()
            && keep_bound.as_secs_f64() <= self.max_spread * prewarm_bound.as_secs_f64();
        let prewarm = prewarm_bound.mul_f64(1.0 - self.margin);
        if regular && prewarm >= self.min_keep.saturating_mul(2) && prewarm < keep {
            (keep, Some(prewarm))
        } else {
            (keep, None)
        }
    }
}

/// What to do with one tenant's helper at `now`, from
/// [`TenantLifecycle::decide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// A live idle helper is kept until this instant and closed at or after
    /// it (zero for a tenant that never called: nothing to keep).
    pub keep_until: Duration,
    /// A tenant without a live helper should have one launched at or after
    /// this instant: the history predicts its next call. `None`: no launch
    /// ahead of a call.
    pub prewarm_at: Option<Duration>,
}

impl Decision {
    /// Is an idle helper due for closing at `now`?
    pub fn close_due(&self, now: Duration) -> bool {
        now >= self.keep_until
    }

    /// Should a helper be launched for this tenant (which has none) at
    /// `now`?
    pub fn prewarm_due(&self, now: Duration) -> bool {
        self.prewarm_at.is_some_and(|at| now >= at)
    }
}

/// One tenant's lifecycle state: its gap histogram and last call. Fixed
/// size (88 bytes), no allocation; deterministic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantLifecycle {
    histogram: GapHistogram,
    /// Gaps recorded over the tenant's life (not aged).
    recorded: u32,
    /// The last call, in milliseconds since the epoch; [`NEVER`] before
    /// the first (a sentinel rather than an `Option`, which would cost 8
    /// bytes of padding).
    last_call_ms: u64,
}

/// `last_call_ms` of a tenant that never called.
const NEVER: u64 = u64::MAX;

/// Milliseconds since the epoch, short of [`NEVER`].
fn to_ms(at: Duration) -> u64 {
    u64::try_from(at.as_millis())
        .unwrap_or(NEVER)
        .min(NEVER - 1)
}

impl Default for TenantLifecycle {
    fn default() -> Self {
        TenantLifecycle::new()
    }
}

impl TenantLifecycle {
    /// A tenant that has not called yet.
    pub const fn new() -> Self {
        TenantLifecycle {
            histogram: GapHistogram::new(),
            recorded: 0,
            last_call_ms: NEVER,
        }
    }

    /// Notes a call at `now`. Under [`IdlePolicy::Adaptive`] the gap since
    /// the previous call is recorded if it is at least `min_keep` (see the
    /// module documentation for why shorter ones are not); under
    /// [`IdlePolicy::Fixed`] only the time of the call is kept. A `now`
    /// before the previous call (a clock that went back) records nothing
    /// and keeps the later time.
    pub fn on_call(&mut self, now: Duration, policy: &IdlePolicy) {
        let now_ms = to_ms(now);
        if let (Some(last), IdlePolicy::Adaptive(params)) = (self.last_call_ms(), policy) {
            let gap = Duration::from_millis(now_ms.saturating_sub(last));
            if gap >= params.min_keep {
                self.histogram.record(gap);
                self.recorded = self.recorded.saturating_add(1);
            }
        }
        self.last_call_ms = self.last_call_ms().map_or(now_ms, |last| last.max(now_ms));
    }

    /// What the pool should do with this tenant's helper at `now`: keep a
    /// live idle one until [`Decision::keep_until`], and launch one for it
    /// at [`Decision::prewarm_at`] if it has none.
    ///
    /// Fixed: keep until the last call plus `idle_timeout`. Adaptive, after
    /// a call at `t` with a plan of keep `K` and prewarm `P` (module
    /// documentation): before `t + P`, keep until `t + min_keep` and
    /// prewarm at `t + P`; from `t + P` to `t + K`, keep until `t + K`
    /// (the prewarmed helper waits for the call); after `t + K`, nothing
    /// more (the prediction failed: the next call is a cold start). Without
    /// a prewarm: keep until `t + K`. Never past `t + max_keep` (for valid
    /// parameters), never before `t + min_keep`.
    pub fn decide(&self, now: Duration, policy: &IdlePolicy) -> Decision {
        let Some(last_ms) = self.last_call_ms() else {
            return Decision {
                keep_until: Duration::ZERO,
                prewarm_at: None,
            };
        };
        let last = Duration::from_millis(last_ms);
        match policy {
            IdlePolicy::Fixed { idle_timeout } => Decision {
                keep_until: last.saturating_add(*idle_timeout),
                prewarm_at: None,
            },
            IdlePolicy::Adaptive(params) => {
                let (keep, prewarm) = params.plan(&self.histogram);
                let keep_until = last.saturating_add(keep);
                match prewarm {
                    None => Decision {
                        keep_until,
                        prewarm_at: None,
                    },
                    Some(prewarm) => {
                        let prewarm_at = last.saturating_add(prewarm);
                        if now >= keep_until {
                            Decision {
                                keep_until,
                                prewarm_at: None,
                            }
                        } else if now >= prewarm_at {
                            Decision {
                                keep_until,
                                prewarm_at: Some(prewarm_at),
                            }
                        } else {
                            Decision {
                                keep_until: last.saturating_add(params.min_keep),
                                prewarm_at: Some(prewarm_at),
                            }
                        }
                    }
                }
            }
        }
    }

    /// The tenant's gap histogram.
    pub fn histogram(&self) -> &GapHistogram {
        &self.histogram
    }

    /// Gaps recorded over the tenant's life (aging does not lower it).
    pub fn recorded(&self) -> u32 {
        self.recorded
    }

    /// The last call, if any (to the millisecond).
    pub fn last_call(&self) -> Option<Duration> {
        self.last_call_ms().map(Duration::from_millis)
    }

    fn last_call_ms(&self) -> Option<u64> {
        (self.last_call_ms != NEVER).then_some(self.last_call_ms)
    }
}

#[cfg(test)]
mod tests;
