//! The host's fd budget: `Pool::new` fits `max_helpers` under
//! RLIMIT_NOFILE (raising the soft limit, or naming `max_helpers`), and an
//! EMFILE at launch is host pressure, never a tenant's failure. Its own
//! binary: the fd limit is process-wide. Cases run one at a time.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use sandpool::{CallError, FailureStats, Pool, PoolError};
use sandpool_reference_helper::reference::*;
use sandpool_tests::{children, open_fds, pool_config, serial, wait_for};

fn set_soft(soft: u64) {
    let hard = getrlimit(Resource::Nofile).maximum;
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(soft),
            maximum: hard,
        },
    )
    .unwrap();
}

fn soft() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Lowers the soft limit to a little above the fds in use and opens files
/// until only `free` fd numbers under it are left, as a host that has grown
/// to its limit; the files close when the returned handles drop.
fn fill_fds_leaving(free: usize) -> Vec<std::fs::File> {
    let highest = *open_fds().iter().max().unwrap() as u64;
    set_soft(highest + 64);
    let mut files = Vec::new();
    while let Ok(file) = std::fs::File::open("/dev/null") {
        files.push(file);
    }
    files.truncate(files.len() - free);
    files
}

#[test]
fn pool_new_raises_the_soft_limit_or_names_max_helpers() {
    let _serial = serial();
    set_soft(1024);
    let hard = getrlimit(Resource::Nofile).maximum.unwrap();
    let mut cfg = pool_config(&[]);
    cfg.spares = 0;
    cfg.max_helpers = 1024;
    let pool = Pool::new(cfg.clone()).unwrap();
    assert_eq!(soft(), hard, "raised to the hard limit");
    drop(pool);
    cfg.max_helpers = (hard as usize) / 4 + 1;
    match Pool::new(cfg) {
        Err(PoolError::Config(err)) => {
            assert_eq!(err.field, "max_helpers");
            assert!(err.problem.contains(&hard.to_string()), "{}", err.problem);
        }
        other => panic!("expected a ConfigError naming max_helpers, got {other:?}"),
    }
}

#[test]
fn two_thousand_tenants_under_a_1024_soft_limit_leave_host_code_its_fds() {
    let _serial = serial();
    set_soft(1024);
    let fds_before = open_fds();
    let children_before = children().len();
    let mut cfg = pool_config(&[]);
    cfg.max_helpers = 1024;
    let pool = Arc::new(Pool::new(cfg).unwrap());
    // Unrelated host code opening files the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let host_failures = Arc::new(AtomicU64::new(0));
    let host = {
        let (stop, failures) = (stop.clone(), host_failures.clone());
        std::thread::spawn(move || {
            let mut opened = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match std::fs::File::open("/dev/null") {
                    Ok(file) => drop(file),
                    Err(_) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                opened += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            opened
        })
    };
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let mut failed = Vec::new();
                for n in (w..2000).step_by(4) {
                    let body = format!("tenant {n}");
                    match pool.call(format!("t{n}"), &request(OP_ECHO, body.as_bytes())) {
                        Ok(reply) if reply == body.as_bytes() => {}
                        other => failed.push(format!("t{n}: {other:?}")),
                    }
                }
                failed
            })
        })
        .collect();
    for worker in workers {
        let failed = worker.join().unwrap();
        assert!(failed.is_empty(), "every tenant served: {failed:?}");
    }
    stop.store(true, Ordering::Relaxed);
    let opened = host.join().unwrap();
    assert!(opened > 0);
    assert_eq!(
        host_failures.load(Ordering::Relaxed),
        0,
        "no EMFILE in host code"
    );
    let stats = pool.stats();
    assert_eq!(stats.failures, FailureStats::default(), "{stats:?}");
    assert_eq!(stats.backoffs_engaged, 0);
    assert!(stats.evicted >= 2000 - 1024 - 2, "{stats:?}");
    drop(pool);
    assert!(wait_for(Duration::from_secs(10), || open_fds() == fds_before));
    assert!(wait_for(Duration::from_secs(10), || children().len()
        == children_before));
}

#[test]
fn emfile_at_launch_is_host_pressure_never_the_tenants_failure() {
    let _serial = serial();
    let hard = getrlimit(Resource::Nofile).maximum;
    set_soft(hard.unwrap_or(4096));
    let mut cfg = pool_config(&[]);
    cfg.spares = 0;
    cfg.max_helpers = 64;
    let pool = Pool::new(cfg).unwrap();
    for n in 0..8 {
        pool.call(format!("idle-{n}"), &request(OP_ECHO, b"x"))
            .unwrap();
    }
    // The host has grown to its limit: a launch now needs more fds than
    // are free, until the pool closes an idle helper's four.
    let filler = fill_fds_leaving(5);
    let result = pool.call("cold", &request(OP_ECHO, b"served"));
    drop(filler);
    let after = pool.stats();
    assert_eq!(result.unwrap(), b"served", "{after:?}");
    assert!(after.evicted >= 1, "an idle helper made room: {after:?}");
    assert_eq!(after.launch_host_pressure, 0, "the retry succeeded");
    // No idle helper left to close and no fd free: the launch fails as
    // host pressure, counted as such and not against the tenant.
    pool.shutdown(Duration::from_secs(2));
    drop(pool);
    set_soft(hard.unwrap_or(4096));
    let mut cfg = pool_config(&[]);
    cfg.spares = 0;
    let pool = Pool::new(cfg).unwrap();
    let filler = fill_fds_leaving(1);
    for _ in 0..3 {
        match pool.call("cold", &request(OP_ECHO, b"x")) {
            Err(CallError::Launch(err)) => assert!(err.is_host_pressure(), "{err:?}"),
            other => panic!("expected host pressure, got {other:?}"),
        }
    }
    drop(filler);
    set_soft(hard.unwrap_or(4096));
    let stats = pool.stats();
    assert_eq!(stats.launch_host_pressure, 3, "{stats:?}");
    assert_eq!(stats.failures, FailureStats::default(), "{stats:?}");
    assert_eq!(stats.backoffs_engaged, 0, "never backed off");
    assert_eq!(
        pool.call("cold", &request(OP_ECHO, b"now")).unwrap(),
        b"now",
        "served once the host has fds again"
    );
}
