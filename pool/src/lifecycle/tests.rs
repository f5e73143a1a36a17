#![allow(clippy::unwrap_used)]

use super::*;
use proptest::prelude::*;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn adaptive() -> IdlePolicy {
    IdlePolicy::Adaptive(AdaptiveParams::default())
}

/// splitmix64: a tiny deterministic generator for jitter.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn range(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }
}

/// Replays calls at `times` (seconds) through `policy` with a keeper tick
/// of one second; returns (cold starts, prewarms). Only a minimal model,
/// for these tests; the full replay is `sandpool-benches`' `replay`.
fn replay(times: &[f64], policy: &IdlePolicy) -> (u32, u32) {
    let mut state = TenantLifecycle::new();
    let mut alive = false;
    let (mut cold, mut prewarms) = (0, 0);
    let mut tick = 1u64;
    for &at in times {
        while (tick as f64) < at {
            let now = Duration::from_secs(tick);
            let decision = state.decide(now, policy);
            if alive && decision.close_due(now) {
                alive = false;
            } else if !alive && decision.prewarm_due(now) {
                alive = true;
                prewarms += 1;
            }
            tick += 1;
        }
        if !alive {
            cold += 1;
            alive = true;
        }
        state.on_call(secs(at), policy);
    }
    (cold, prewarms)
}

#[test]
fn per_tenant_state_is_small_and_fixed() {
    assert_eq!(std::mem::size_of::<GapHistogram>(), 72);
    assert_eq!(std::mem::size_of::<TenantLifecycle>(), 88);
    assert!(std::mem::size_of::<TenantLifecycle>() <= 128);
}

#[test]
fn buckets_are_log_spaced_from_100ms_to_4h() {
    assert_eq!(GapHistogram::lower_bound(0), Duration::ZERO);
    assert_eq!(GapHistogram::upper_bound(0), Duration::from_millis(119));
    assert_eq!(GapHistogram::lower_bound(4), Duration::from_millis(200));
    assert_eq!(HISTOGRAM_RANGE, Duration::from_millis(119 << 17));
    assert!(HISTOGRAM_RANGE > Duration::from_secs(4 * 3600));
    assert_eq!(GapHistogram::upper_bound(BUCKETS - 1), Duration::MAX);
    for bucket in 1..BUCKETS - 1 {
        let (low, high) = (
            GapHistogram::lower_bound(bucket),
            GapHistogram::upper_bound(bucket),
        );
        let ratio = high.as_secs_f64() / low.as_secs_f64();
        assert!((1.17..1.21).contains(&ratio), "bucket {bucket}: {ratio}");
        assert_eq!(GapHistogram::bucket_of(low), bucket);
        assert_eq!(
            GapHistogram::bucket_of(high - Duration::from_millis(1)),
            bucket
        );
        assert_eq!(GapHistogram::bucket_of(high), bucket + 1);
    }
    assert_eq!(GapHistogram::bucket_of(Duration::ZERO), 0);
    assert_eq!(GapHistogram::bucket_of(Duration::from_millis(99)), 0);
    assert_eq!(GapHistogram::bucket_of(Duration::MAX), BUCKETS - 1);
    assert_eq!(GapHistogram::bucket_of(HISTOGRAM_RANGE), BUCKETS - 1);
}

#[test]
fn percentiles_of_an_empty_and_a_single_sample_histogram() {
    let mut histogram = GapHistogram::new();
    assert_eq!(histogram.percentile_upper(0.99), None);
    assert_eq!(histogram.percentile_lower(0.05), None);
    histogram.record(secs(300.0));
    let bucket = GapHistogram::bucket_of(secs(300.0));
    for q in [0.0, 1e-9, 0.05, 0.5, 0.99, 1.0, f64::NAN, -1.0, 2.0] {
        assert_eq!(histogram.quantile_bucket(q), Some(bucket), "q = {q}");
    }
    let upper = histogram.percentile_upper(0.99).unwrap();
    let lower = histogram.percentile_lower(0.05).unwrap();
    assert!(lower <= secs(300.0) && secs(300.0) < upper);
}

#[test]
fn percentile_ranks_at_the_edges() {
    // 99 gaps of 60 s and one of 3600 s: the 99th percentile is the 99th of
    // 100 (60 s), anything above it is the outlier.
    let mut histogram = GapHistogram::new();
    for _ in 0..99 {
        histogram.record(secs(60.0));
    }
    histogram.record(secs(3600.0));
    let short = GapHistogram::bucket_of(secs(60.0));
    let long = GapHistogram::bucket_of(secs(3600.0));
    assert_eq!(histogram.quantile_bucket(0.99), Some(short));
    assert_eq!(histogram.quantile_bucket(0.991), Some(long));
    assert_eq!(histogram.quantile_bucket(1.0), Some(long));
    assert_eq!(histogram.quantile_bucket(0.0), Some(short));
    // An overflowing gap has no finite upper bound.
    histogram.record(Duration::from_secs(86_400));
    assert_eq!(histogram.percentile_upper(1.0), Some(Duration::MAX));
    assert_eq!(histogram.percentile_lower(1.0), Some(HISTOGRAM_RANGE));
}

#[test]
fn a_full_bucket_halves_every_bucket() {
    let mut histogram = GapHistogram::new();
    for _ in 0..255 {
        histogram.record(secs(60.0));
    }
    histogram.record(secs(600.0));
    assert_eq!(histogram.total(), 256);
    let short = GapHistogram::bucket_of(secs(60.0));
    let long = GapHistogram::bucket_of(secs(600.0));
    histogram.record(secs(60.0));
    assert_eq!(histogram.count(short), 128); // 255 / 2 + 1
    assert_eq!(histogram.count(long), 0); // 1 / 2: forgotten
    assert_eq!(histogram.total(), 128);
}

#[test]
fn aging_follows_a_tenant_whose_gaps_change() {
    let policy = adaptive();
    let mut state = TenantLifecycle::new();
    let mut at = 0.0;
    // A long history of 2-minute gaps...
    for _ in 0..2000 {
        at += 120.0;
        state.on_call(secs(at), &policy);
    }
    let keep = state.decide(secs(at), &policy).keep_until - secs(at);
    assert!(keep < secs(160.0), "{keep:?}");
    // ...then 8-minute gaps: after a few of them the keep covers them.
    for _ in 0..5 {
        at += 480.0;
        state.on_call(secs(at), &policy);
    }
    let keep = state.decide(secs(at), &policy).keep_until - secs(at);
    assert!(keep > secs(480.0), "{keep:?}");
    // And back to 2 minutes: within a few hundred gaps the 8-minute ones
    // have aged below the 1% the keep percentile lets through.
    for _ in 0..1000 {
        at += 120.0;
        state.on_call(secs(at), &policy);
    }
    let keep = state.decide(secs(at), &policy).keep_until - secs(at);
    assert!(keep < secs(160.0), "{keep:?}");
    assert_eq!(state.recorded(), 3004); // the first call has no gap
}

#[test]
fn before_min_samples_the_fallback_keep_applies() {
    let policy = adaptive();
    let mut state = TenantLifecycle::new();
    assert_eq!(
        state.decide(secs(5.0), &policy),
        Decision {
            keep_until: Duration::ZERO,
            prewarm_at: None
        }
    );
    for i in 0..5 {
        state.on_call(secs(f64::from(i) * 400.0), &policy);
        let decision = state.decide(secs(f64::from(i) * 400.0), &policy);
        if i < 5 {
            assert_eq!(
                decision.keep_until,
                secs(f64::from(i) * 400.0) + DEFAULT_FALLBACK_IDLE_TIMEOUT
            );
            assert_eq!(decision.prewarm_at, None);
        }
    }
    // The fifth gap makes five samples: from then on the histogram rules.
    state.on_call(secs(2000.0), &policy);
    let decision = state.decide(secs(2000.0), &policy);
    assert_ne!(
        decision.keep_until,
        secs(2000.0) + DEFAULT_FALLBACK_IDLE_TIMEOUT
    );
}

#[test]
fn a_periodic_tenant_learns_its_period_and_gets_warm_hits() {
    // A burst of three calls every 5-7 minutes: longer than a 180 s fixed
    // timeout, so that cold-starts every period.
    let mut rng = Rng(7);
    let mut times = Vec::new();
    let mut at = 0.0;
    for _ in 0..200 {
        at += rng.range(300.0, 420.0);
        for i in 0..3 {
            times.push(at + f64::from(i) * 0.5);
        }
    }
    let fixed = IdlePolicy::Fixed {
        idle_timeout: secs(180.0),
    };
    let (fixed_cold, _) = replay(&times, &fixed);
    assert_eq!(fixed_cold, 200);
    let (cold, prewarms) = replay(&times, &adaptive());
    assert!(cold <= 10, "{cold} cold starts");
    assert!(prewarms >= 150, "{prewarms} prewarms");

    // The decision after the last burst: closed after min_keep, launched a
    // little before five minutes, kept past seven.
    let policy = adaptive();
    let mut state = TenantLifecycle::new();
    for &t in &times {
        state.on_call(secs(t), &policy);
    }
    let last = state.last_call().unwrap();
    let right_after = state.decide(last + secs(1.0), &policy);
    assert_eq!(right_after.keep_until, last + secs(30.0));
    let prewarm_at = right_after.prewarm_at.unwrap();
    assert!(prewarm_at > last + secs(200.0) && prewarm_at < last + secs(300.0));
    let waiting = state.decide(prewarm_at, &policy);
    assert!(waiting.keep_until > last + secs(420.0));
    assert!(waiting.keep_until < last + secs(600.0));
    assert!(!waiting.close_due(prewarm_at));
    // Past the window: closed, and no second prewarm.
    let late = state.decide(waiting.keep_until, &policy);
    assert!(late.close_due(waiting.keep_until));
    assert_eq!(late.prewarm_at, None);
}

#[test]
fn a_bursty_tenant_with_random_gaps_is_kept_but_not_prewarmed() {
    // Gaps log-uniform between 1 and 30 minutes: no regularity.
    let mut rng = Rng(11);
    let policy = adaptive();
    let mut state = TenantLifecycle::new();
    let mut at = 0.0;
    for _ in 0..300 {
        at += 60.0 * 30f64.powf(rng.unit());
        state.on_call(secs(at), &policy);
    }
    let decision = state.decide(secs(at), &policy);
    assert_eq!(decision.prewarm_at, None);
    let keep = decision.keep_until - secs(at);
    assert!(keep >= secs(1800.0) && keep <= secs(3600.0), "{keep:?}");
}

#[test]
fn a_rare_tenant_is_not_kept_past_min_keep() {
    let mut rng = Rng(3);
    let policy = adaptive();
    let mut state = TenantLifecycle::new();
    let mut at = 0.0;
    for _ in 0..20 {
        at += rng.range(3.0, 12.0) * 3600.0;
        state.on_call(secs(at), &policy);
    }
    let last = state.last_call().unwrap();
    assert_eq!(
        state.decide(last, &policy),
        Decision {
            keep_until: last + secs(30.0),
            prewarm_at: None
        }
    );
}

#[test]
fn a_steady_tenant_records_no_gap() {
    let policy = adaptive();
    let mut state = TenantLifecycle::new();
    for i in 0..1000 {
        state.on_call(secs(f64::from(i) * 2.0), &policy);
    }
    assert_eq!(state.histogram().total(), 0);
    assert_eq!(
        state.decide(secs(1998.0), &policy).keep_until,
        secs(1998.0) + DEFAULT_FALLBACK_IDLE_TIMEOUT
    );
}

#[test]
fn the_fixed_policy_keeps_idle_timeout_after_the_last_call() {
    let policy = IdlePolicy::Fixed {
        idle_timeout: secs(180.0),
    };
    let mut state = TenantLifecycle::new();
    state.on_call(secs(10.0), &policy);
    state.on_call(secs(500.0), &policy);
    // A clock that went back is ignored.
    state.on_call(secs(400.0), &policy);
    assert_eq!(state.histogram().total(), 0);
    let decision = state.decide(secs(600.0), &policy);
    assert_eq!(decision.keep_until, secs(680.0));
    assert_eq!(decision.prewarm_at, None);
    assert!(!decision.close_due(secs(679.999)));
    assert!(decision.close_due(secs(680.0)));
}

#[test]
fn the_default_params_are_valid_and_each_bad_value_is_named() {
    AdaptiveParams::default().validate().unwrap();
    adaptive().validate().unwrap();
    IdlePolicy::default().validate().unwrap();
    let bad = |change: fn(&mut AdaptiveParams)| {
        let mut params = AdaptiveParams::default();
        change(&mut params);
        params.validate().unwrap_err()
    };
    assert_eq!(
        bad(|p| p.keep_percentile = 1.0),
        LifecycleConfigError::Percentile {
            field: "keep_percentile",
            value: 1.0
        }
    );
    assert_eq!(
        bad(|p| p.prewarm_percentile = 0.0),
        LifecycleConfigError::Percentile {
            field: "prewarm_percentile",
            value: 0.0
        }
    );
    assert!(matches!(
        bad(|p| p.keep_percentile = f64::NAN),
        LifecycleConfigError::Percentile {
            field: "keep_percentile",
            ..
        }
    ));
    assert_eq!(
        bad(|p| p.prewarm_percentile = 0.995),
        LifecycleConfigError::PercentileOrder {
            prewarm: 0.995,
            keep: 0.99
        }
    );
    assert_eq!(
        bad(|p| {
            p.min_keep = Duration::from_secs(600);
            p.max_keep = Duration::from_secs(60);
        }),
        LifecycleConfigError::KeepBounds {
            min_keep: Duration::from_secs(600),
            max_keep: Duration::from_secs(60)
        }
    );
    assert!(matches!(
        bad(|p| p.min_keep = Duration::from_millis(10)),
        LifecycleConfigError::Duration {
            field: "min_keep",
            ..
        }
    ));
    assert!(matches!(
        bad(|p| p.max_keep = Duration::from_secs(86_400)),
        LifecycleConfigError::Duration {
            field: "max_keep",
            ..
        }
    ));
    assert_eq!(
        bad(|p| p.fallback_idle_timeout = Duration::from_secs(7200)),
        LifecycleConfigError::Duration {
            field: "fallback_idle_timeout",
            value: Duration::from_secs(7200),
            min: Duration::from_secs(30),
            max: Duration::from_secs(3600),
        }
    );
    assert!(matches!(
        bad(|p| p.margin = -0.1),
        LifecycleConfigError::Number {
            field: "margin",
            ..
        }
    ));
    assert!(matches!(
        bad(|p| p.min_samples = 0),
        LifecycleConfigError::Number {
            field: "min_samples",
            ..
        }
    ));
    assert!(matches!(
        bad(|p| p.max_spread = 0.5),
        LifecycleConfigError::Number {
            field: "max_spread",
            ..
        }
    ));
    assert!(
        IdlePolicy::Fixed {
            idle_timeout: Duration::ZERO
        }
        .validate()
        .is_err()
    );
    let message = bad(|p| p.keep_percentile = 1.5).to_string();
    assert!(
        message.contains("keep_percentile") && message.contains("1.5"),
        "{message}"
    );
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Embedded {
    idle_policy: IdlePolicy,
}

#[test]
fn the_policy_deserializes_from_toml_as_a_config_would_embed_it() {
    let fixed: Embedded =
        toml::from_str("[idle_policy]\nmode = \"fixed\"\nidle_timeout = \"3m\"\n").unwrap();
    assert_eq!(
        fixed.idle_policy,
        IdlePolicy::Fixed {
            idle_timeout: secs(180.0)
        }
    );
    let defaults: Embedded = toml::from_str("[idle_policy]\nmode = \"adaptive\"\n").unwrap();
    assert_eq!(defaults.idle_policy, adaptive());
    let tuned: Embedded = toml::from_str(
        "[idle_policy]\nmode = \"adaptive\"\nmax_keep = \"30m\"\nmin_keep = \"5s\"\nkeep_percentile = 0.95\n",
    )
    .unwrap();
    assert_eq!(
        tuned.idle_policy,
        IdlePolicy::Adaptive(AdaptiveParams {
            max_keep: secs(1800.0),
            min_keep: secs(5.0),
            keep_percentile: 0.95,
            ..AdaptiveParams::default()
        })
    );
    for bad in [
        "[idle_policy]\nmode = \"adaptive\"\nkeep = 0.9\n",
        "[idle_policy]\nmode = \"fixed\"\nidle_timeout = \"3m\"\nmax_keep = \"1h\"\n",
        "[idle_policy]\nmode = \"fixed\"\n",
        "[idle_policy]\nmode = \"sometimes\"\n",
        "[idle_policy]\nmode = \"adaptive\"\nmin_keep = 10\n",
    ] {
        assert!(toml::from_str::<Embedded>(bad).is_err(), "{bad}");
    }
    // And back: what serializes parses to the same policy.
    let text = toml::to_string(&AdaptiveParams::default()).unwrap();
    let params: AdaptiveParams = toml::from_str(&text).unwrap();
    assert_eq!(params, AdaptiveParams::default());
}

fn params_strategy() -> impl Strategy<Value = AdaptiveParams> {
    (
        0.5f64..0.999,
        0.001f64..0.5,
        100u64..600_000,
        0u64..3_600_000,
        0.0f64..1.0,
        1u32..20,
        0.0f64..1.0,
        1.0f64..20.0,
    )
        .prop_map(
            |(keep, prewarm, min_keep, extra, margin, min_samples, fallback, spread)| {
                let min_keep = Duration::from_millis(min_keep);
                let max_keep = (min_keep + Duration::from_millis(extra)).min(HISTOGRAM_RANGE);
                AdaptiveParams {
                    keep_percentile: keep,
                    prewarm_percentile: prewarm,
                    min_keep,
                    max_keep,
                    margin,
                    min_samples,
                    fallback_idle_timeout: min_keep + (max_keep - min_keep).mul_f64(fallback),
                    max_spread: spread,
                }
            },
        )
}

proptest! {
    /// Whatever the history and the moment asked about: a helper is kept at
    /// least min_keep and at most max_keep after the last call, a prewarm
    /// lies strictly inside that window, and the answer is deterministic.
    #[test]
    fn decide_stays_within_its_bounds(
        params in params_strategy(),
        gaps in proptest::collection::vec(0u64..20_000_000, 0..400),
        probes in proptest::collection::vec(0u64..30_000_000, 1..20),
    ) {
        params.validate().unwrap();
        let policy = IdlePolicy::Adaptive(params.clone());
        let mut state = TenantLifecycle::new();
        let mut at = 0u64;
        for gap in gaps {
            at += gap;
            state.on_call(Duration::from_millis(at), &policy);
            let last = state.last_call().unwrap();
            for &probe in &probes {
                let now = last + Duration::from_millis(probe);
                let decision = state.decide(now, &policy);
                prop_assert_eq!(decision, state.decide(now, &policy));
                prop_assert!(decision.keep_until >= last + params.min_keep);
                prop_assert!(decision.keep_until <= last + params.max_keep);
                if let Some(prewarm_at) = decision.prewarm_at {
                    prop_assert!(prewarm_at > last + params.min_keep);
                    prop_assert!(prewarm_at < last + params.max_keep);
                    // Asked inside the window, the helper stays until its end.
                    let inside = state.decide(prewarm_at, &policy);
                    prop_assert!(!inside.close_due(prewarm_at));
                    prop_assert!(inside.keep_until > prewarm_at);
                }
            }
        }
    }
}
