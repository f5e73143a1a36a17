//! The lifecycle against a live pool: `Pool::reconfigure` (what changes
//! live, what is refused by name), per-tenant policies (by prefix in the
//! configuration and through `Pool::set_tenant_policy`).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use sandpool::{Config, LaunchMode, Pool, SeccompMode};
use sandpool_helper::reference::*;
use sandpool_tests::{pool_config, process_exists, wait_for};

const SECOND: Duration = Duration::from_secs(1);

fn echo(pool: &Pool, tenant: &str) {
    assert_eq!(
        pool.call(tenant, &request(OP_ECHO, b"x")).unwrap(),
        b"x",
        "{tenant}"
    );
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
