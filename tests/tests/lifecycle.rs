//! The lifecycle against a live pool: `Pool::reconfigure` (what changes
//! live, what is refused by name), per-tenant policies (by prefix in the
//! configuration and through `Pool::set_tenant_policy`), the adaptive idle
//! policy (closing after a burst, launching before the predicted call) and
//! the bound on the histories it keeps.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use sandpool::{
    AdaptiveParams, Config, IdlePolicyKind, LaunchMode, Pool, SeccompMode, TenantPolicy,
    TenantPolicyRule,
};
use sandpool_reference_helper::reference::*;
use sandpool_tests::{pool_config, process_exists, wait_for};

const SECOND: Duration = Duration::from_secs(1);

fn echo(pool: &Pool, tenant: &str) {
    assert_eq!(
        pool.call(tenant, &request(OP_ECHO, b"x")).unwrap(),
        b"x",
        "{tenant}"
    );
}

/// Sets `tenant`'s policy to keep_warm.
fn keep_warm(pool: &Pool, tenant: &str) {
    let policy = TenantPolicy {
        keep_warm: true,
        ..TenantPolicy::default()
    };
    pool.set_tenant_policy(tenant, Some(policy)).unwrap();
}

fn quiet_pool(idle_timeout: Duration) -> (Pool, Config) {
    let mut config = pool_config(&[]);
    config.spares = 0;
    config.idle_timeout = idle_timeout;
    (Pool::new(config.clone()).unwrap(), config)
}

#[test]
fn a_shortened_idle_timeout_closes_idle_helpers_at_the_next_scan() {
    let (pool, mut config) = quiet_pool(Duration::from_secs(3600));
    echo(&pool, "a");
    echo(&pool, "b");
    let pids = [
        pool.helper_info("a").unwrap().pid,
        pool.helper_info("b").unwrap().pid,
    ];
    assert_eq!(pool.stats().idle, 2);
    config.idle_timeout = Duration::from_millis(100);
    pool.reconfigure(&config).unwrap();
    assert_eq!(pool.config().idle_timeout, Duration::from_millis(100));
    assert!(wait_for(10 * SECOND, || pool.stats().quiesced_idle == 2));
    for pid in pids {
        assert!(
            wait_for(10 * SECOND, || !process_exists(pid)),
            "{pid} reaped"
        );
    }
    // The pool goes on serving under the new configuration.
    echo(&pool, "a");
    assert_ne!(pool.helper_info("a").unwrap().pid, pids[0]);
}

#[test]
fn a_lengthened_idle_timeout_keeps_idle_helpers() {
    let (pool, mut config) = quiet_pool(Duration::from_millis(400));
    echo(&pool, "a");
    let pid = pool.helper_info("a").unwrap().pid;
    config.idle_timeout = Duration::from_secs(3600);
    pool.reconfigure(&config).unwrap();
    // Well past the old timeout and several of its scans.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(pool.stats().quiesced_idle, 0);
    assert_eq!(pool.helper_info("a").unwrap().pid, pid);
    assert!(process_exists(pid));
}

#[test]
fn more_spares_are_launched_and_fewer_are_not_refilled() {
    let (pool, mut config) = quiet_pool(Duration::from_secs(3600));
    assert_eq!(pool.stats().spare, 0);
    config.spares = 3;
    pool.reconfigure(&config).unwrap();
    assert!(wait_for(10 * SECOND, || pool.stats().spare == 3));
    config.spares = 1;
    pool.reconfigure(&config).unwrap();
    // Live helpers are not touched: the spares stay until bound.
    for tenant in ["a", "b", "c"] {
        echo(&pool, tenant);
    }
    assert!(wait_for(10 * SECOND, || pool.stats().spare == 1));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(pool.stats().spare, 1, "refilled up to the new count only");
}

#[test]
fn fields_that_cannot_change_live_are_refused_by_name() {
    let (pool, config) = quiet_pool(Duration::from_secs(3600));
    echo(&pool, "a");
    type Change = Box<dyn Fn(&mut Config)>;
    let changes: Vec<(&str, Change)> = vec![
        ("program", Box::new(|c| c.program = "/bin/true".into())),
        ("args", Box::new(|c| c.args.push("--test-ops".into()))),
        (
            "sandbox",
            Box::new(|c| c.sandbox.seccomp = SeccompMode::Log),
        ),
        (
            "launch_mode",
            Box::new(|c| c.launch_mode = LaunchMode::Direct),
        ),
        (
            "max_frame",
            Box::new(|c| c.max_frame = sandpool::ByteSize::kib(64)),
        ),
        ("max_in_flight", Box::new(|c| c.max_in_flight = 3)),
    ];
    for (field, change) in changes {
        let mut changed = config.clone();
        changed.idle_timeout = Duration::from_millis(10);
        change(&mut changed);
        let err = pool.reconfigure(&changed).unwrap_err();
        assert_eq!(err.field, field, "{err}");
        assert!(
            err.to_string().contains("cannot change on a live pool"),
            "{err}"
        );
        // Refused whole: the lifecycle field beside it did not apply.
        assert_eq!(pool.config().idle_timeout, Duration::from_secs(3600));
    }
    let mut invalid = config.clone();
    invalid.spares = invalid.max_helpers + 1;
    assert_eq!(pool.reconfigure(&invalid).unwrap_err().field, "spares");
    let mut invalid = config.clone();
    invalid.request_timeout = Duration::ZERO;
    assert_eq!(
        pool.reconfigure(&invalid).unwrap_err().field,
        "request_timeout"
    );
    assert_eq!(*pool.config(), config, "nothing applied");
    echo(&pool, "a");
}

#[test]
fn a_tenant_prefix_policy_overrides_the_pools_idle_timeout() {
    let mut config = pool_config(&[]);
    config.spares = 0;
    config.idle_timeout = Duration::from_secs(3600);
    config.tenant_policies = vec![
        TenantPolicyRule {
            prefix: "batch-".into(),
            idle_timeout: Some(Duration::from_millis(100)),
            ..TenantPolicyRule::default()
        },
        TenantPolicyRule {
            prefix: "batch-gold-".into(),
            keep_warm: true,
            ..TenantPolicyRule::default()
        },
    ];
    let pool = Pool::new(config).unwrap();
    for tenant in ["batch-1", "batch-gold-1", "web-1"] {
        echo(&pool, tenant);
    }
    assert!(wait_for(10 * SECOND, || pool
        .helper_info("batch-1")
        .is_none()));
    assert_eq!(pool.stats().quiesced_idle, 1);
    // The longest prefix wins: keep_warm, and the pool's timeout otherwise.
    std::thread::sleep(Duration::from_millis(500));
    assert!(pool.helper_info("batch-gold-1").is_some());
    assert!(pool.helper_info("web-1").is_some());
    assert_eq!(pool.stats().quiesced_idle, 1);
}

#[test]
fn set_tenant_policy_applies_live_and_can_be_removed() {
    let (pool, _) = quiet_pool(Duration::from_millis(200));
    echo(&pool, "a");
    echo(&pool, "b");
    let pid = pool.helper_info("a").unwrap().pid;
    keep_warm(&pool, "a");
    assert!(wait_for(10 * SECOND, || pool.helper_info("b").is_none()));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pool.helper_info("a").unwrap().pid, pid, "kept warm");
    pool.set_tenant_policy("a", None).unwrap();
    assert!(wait_for(10 * SECOND, || pool.helper_info("a").is_none()));
    assert!(wait_for(10 * SECOND, || !process_exists(pid)));
    // Invalid input is refused by name and changes nothing.
    assert_eq!(
        pool.set_tenant_policy("", Some(TenantPolicy::default()))
            .unwrap_err()
            .field,
        "tenant"
    );
    let zero = TenantPolicy {
        idle_timeout: Some(Duration::ZERO),
        ..TenantPolicy::default()
    };
    assert_eq!(
        pool.set_tenant_policy("a", Some(zero)).unwrap_err().field,
        "tenant_policy"
    );
}

#[test]
fn a_prewarm_tenant_has_a_helper_before_its_first_call_and_after_losing_one() {
    let (pool, _) = quiet_pool(Duration::from_millis(100));
    pool.set_tenant_policy(
        "vip",
        Some(TenantPolicy {
            prewarm: true,
            ..TenantPolicy::default()
        }),
    )
    .unwrap();
    assert!(wait_for(10 * SECOND, || pool.helper_info("vip").is_some()));
    let first = pool.helper_info("vip").unwrap();
    assert_eq!(first.calls, 0, "launched ahead of any call");
    // Kept past the idle timeout (prewarm implies keep_warm).
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(pool.helper_info("vip").unwrap().pid, first.pid);
    // Lost (killed from outside): a new one is launched without a call.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_for(10 * SECOND, || pool
        .helper_info("vip")
        .is_some_and(|info| info.pid != first.pid)));
    let second = pool.helper_info("vip").unwrap().pid;
    // The first call finds it: no launch on the call path.
    echo(&pool, "vip");
    assert_eq!(pool.helper_info("vip").unwrap().pid, second);
    assert_eq!(pool.stats().spare_misses, 0);
}

#[test]
fn tenant_policies_in_the_configuration_are_validated_by_name() {
    let mut config = pool_config(&[]);
    config.tenant_policies = vec![TenantPolicyRule {
        prefix: "x".into(),
        idle_timeout: Some(Duration::ZERO),
        ..TenantPolicyRule::default()
    }];
    assert_eq!(config.validate().unwrap_err().field, "tenant_policies");
    config.tenant_policies = vec![
        TenantPolicyRule {
            prefix: "x".into(),
            ..TenantPolicyRule::default()
        };
        2
    ];
    assert!(
        config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("given twice")
    );
    let parsed = Config::from_toml(
        r#"
        program = "/h"
        idle_policy = "fixed"
        [[tenant_policies]]
        prefix = "gold-"
        keep_warm = true
        [[tenant_policies]]
        prefix = "batch-"
        idle_timeout = "10s"
        "#,
    )
    .unwrap();
    assert_eq!(parsed.tenant_policies.len(), 2);
    assert_eq!(
        parsed.tenant_policies[1].idle_timeout,
        Some(Duration::from_secs(10))
    );
}

/// An adaptive pool tuned for a test's time scale.
fn adaptive_pool(max_tenant_histories: usize) -> Pool {
    let mut config = pool_config(&[]);
    config.spares = 0;
    config.idle_policy = IdlePolicyKind::Adaptive;
    config.adaptive = AdaptiveParams {
        min_keep: Duration::from_millis(300),
        min_samples: 3,
        fallback_idle_timeout: Duration::from_millis(300),
        max_keep: Duration::from_secs(20),
        ..AdaptiveParams::default()
    };
    config.max_tenant_histories = max_tenant_histories;
    Pool::new(config).unwrap()
}

#[test]
fn an_adaptive_pool_closes_after_the_burst_and_prelaunches_before_the_next_call() {
    let pool = adaptive_pool(100);
    let period = Duration::from_secs(2);
    let start = std::time::Instant::now();
    // Three gaps of 2 s teach the tenant's period.
    for k in 0..4 {
        std::thread::sleep(
            (start + period * k).saturating_duration_since(std::time::Instant::now()),
        );
        echo(&pool, "periodic");
    }
    let last = start + period * 3;
    // Closed after min_keep, well before the next call is due...
    assert!(
        wait_for(period / 2, || pool.helper_info("periodic").is_none()),
        "closed after the burst"
    );
    // ...and launched again before it, without a call.
    assert!(
        wait_for(period, || pool
            .helper_info("periodic")
            .is_some_and(|info| info.calls == 0)),
        "prelaunched before the predicted call"
    );
    let prelaunched = pool.helper_info("periodic").unwrap().pid;
    std::thread::sleep((last + period).saturating_duration_since(std::time::Instant::now()));
    echo(&pool, "periodic");
    assert_eq!(
        pool.helper_info("periodic").unwrap().pid,
        prelaunched,
        "a warm hit"
    );
    assert!(pool.stats().prelaunches >= 1);
    assert_eq!(
        pool.stats().spare_misses,
        4,
        "only the history's calls were cold"
    );
}

#[test]
fn adaptive_histories_are_bounded_by_max_tenant_histories() {
    let pool = adaptive_pool(5);
    for index in 0..20 {
        echo(&pool, &format!("once-{index}"));
    }
    // Each is closed after the fallback keep; what is left of them is
    // their history, at most 5 of it.
    assert!(wait_for(10 * SECOND, || pool.stats().live == 0));
    assert!(wait_for(10 * SECOND, || pool.stats().tenants <= 5));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(pool.stats().tenants, 5, "the 5 most recent histories stay");
}

#[test]
fn invalid_adaptive_tuning_is_refused_by_name() {
    let mut config = pool_config(&[]);
    config.adaptive.keep_percentile = 1.5;
    let err = config.validate().unwrap_err();
    assert_eq!(err.field, "adaptive");
    assert!(err.to_string().contains("keep_percentile"), "{err}");
    let parsed = Config::from_toml(
        "program = \"/h\"\nidle_policy = \"adaptive\"\n[adaptive]\nmin_keep = \"5s\"\nmax_keep = \"30m\"\n",
    )
    .unwrap();
    assert_eq!(parsed.idle_policy, IdlePolicyKind::Adaptive);
    assert_eq!(parsed.adaptive.min_keep, Duration::from_secs(5));
}

/// CPU time (schedstat, ns) of every thread of this process named `name`.
fn threads_cpu_ns(name: &str) -> u64 {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
        })
        .filter_map(|task| {
            let sched = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            sched.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

#[test]
fn an_idle_pools_keeper_sleeps_between_its_scans() {
    // Spares bound and refilled, policies set: then nothing to do. The
    // keepers of every pool in this binary together stay far from a
    // core's worth of CPU (a keeper that polled in a loop would take one).
    let mut config = pool_config(&[]);
    config.spares = 2;
    let pool = Pool::new(config).unwrap();
    echo(&pool, "a");
    keep_warm(&pool, "a");
    assert!(wait_for(10 * SECOND, || pool.stats().spare == 2));
    let before = threads_cpu_ns("sandpool-keeper");
    let wall = std::time::Instant::now();
    std::thread::sleep(SECOND);
    let used = threads_cpu_ns("sandpool-keeper").saturating_sub(before);
    let share = used as f64 / wall.elapsed().as_nanos() as f64;
    assert!(share < 0.25, "keepers used {:.0}% of a core", share * 100.0);
}
