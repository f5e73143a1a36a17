//! Soak: 1,000 tenants, many threads, pipelined calls, helpers SIGKILLed at
//! random through a path of their own, idle timeouts short enough that
//! quiesce and spare refill churn all the time. Afterwards: every call got
//! its own correct response or a typed error (none lost, none mixed up), no
//! zombie, the host's fds back to where they were, its memory within a bound.
//!
//! Bounded in time: `SANDPOOL_SOAK_SECS` (default 8 s for CI; run it for
//! minutes with e.g. `SANDPOOL_SOAK_SECS=180 cargo test --release -p
//! sandpool-tests --test soak -- --nocapture`).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sandpool::{CallError, ExitStatus, Pool};
use sandpool_reference_helper::reference::{OP_ECHO, request};
use sandpool_tests::{children, open_fds, pool_config, rss_kib};

const TENANTS: usize = 1000;
const THREADS: usize = 12;

fn kind(err: &CallError) -> &'static str {
    match err {
        CallError::Died {
            status: ExitStatus::Signaled(9),
            ..
        } => "died by SIGKILL",
        CallError::BackingOff { .. } => "backed off",
        CallError::Retired { .. } => "retired",
        other => {
            panic!("unexpected error in the soak: {other:?}");
        }
    }
}

#[test]
fn soak_thousand_tenants_with_random_kills() {
    let seconds: u64 = std::env::var("SANDPOOL_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let fds_before = open_fds();
    let rss_before = rss_kib();
    let mut config = pool_config(&[]);
    config.spares = 8;
    config.max_helpers = 1100;
    config.max_in_flight = 4;
    config.idle_timeout = Duration::from_millis(300);
    config.request_timeout = Duration::from_secs(20);
    config.crash_backoff.initial = Duration::from_millis(20);
    config.crash_backoff.max = Duration::from_millis(200);
    let pool = Arc::new(Pool::new(config).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicU64::new(0));

    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (pool, stop) = (pool.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t as u64);
                let mut ok = 0u64;
                let mut errors: BTreeMap<&'static str, u64> = BTreeMap::new();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Half the calls go to 20 hot tenants (pipelined from
                    // several threads at once), half anywhere among 1,000.
                    let tenant = if rng.random_bool(0.5) {
                        rng.random_range(0..20)
                    } else {
                        rng.random_range(0..TENANTS)
                    };
                    let body = format!(
                        "tenant {tenant} thread {t} seq {seq} {}",
                        "x".repeat(seq as usize % 300)
                    );
                    seq += 1;
                    match pool.call(format!("t{tenant}"), &request(OP_ECHO, body.as_bytes())) {
                        Ok(reply) => {
                            assert_eq!(reply, body.as_bytes(), "a reply went to the wrong call");
                            ok += 1;
                        }
                        Err(err) => *errors.entry(kind(&err)).or_default() += 1,
                    }
                }
                (ok, errors)
            })
        })
        .collect();

    let killer = {
        let (pool, stop, kills) = (pool.clone(), stop.clone(), kills.clone());
        std::thread::spawn(move || {
            let mut rng = SmallRng::seed_from_u64(99);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(15));
                let tenant = if rng.random_bool(0.5) {
                    rng.random_range(0..20)
                } else {
                    rng.random_range(0..TENANTS)
                };
                if let Some(info) = pool.helper_info(format!("t{tenant}")) {
                    // A path of its own: a plain kill(2), not the pool's pidfd.
                    let pid = nix::unistd::Pid::from_raw(info.pid as i32);
                    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
                        kills.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };

    let started = Instant::now();
    let mut peak_live = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(100));
        peak_live = peak_live.max(pool.stats().live);
    }
    stop.store(true, Ordering::Relaxed);
    let mut ok = 0;
    let mut errors: BTreeMap<&'static str, u64> = BTreeMap::new();
    for worker in workers {
        let (n, errs) = worker.join().unwrap();
        ok += n;
        for (k, v) in errs {
            *errors.entry(k).or_default() += v;
        }
    }
    killer.join().unwrap();
    let stats = pool.stats();
    pool.shutdown(Duration::from_secs(2));
    drop(pool);

    let kills = kills.load(Ordering::Relaxed);
    println!(
        "soak: {seconds} s, {ok} calls answered, errors {errors:?}, {kills} kills, peak {peak_live} live helpers, \
         {} launches, {} spare hits, {} quiesced, {} evicted",
        stats.launches, stats.spare_hits, stats.quiesced_idle, stats.evicted
    );
    assert!(ok > 1000, "the soak made progress: {ok}");
    assert!(
        kills > 0 && stats.quiesced_idle > 0 && stats.spare_hits > 0,
        "{stats:?}"
    );
    assert_eq!(children(), vec![], "no zombie, no helper left");
    assert_eq!(open_fds(), fds_before, "fds back to where they were");
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(grown < 128 * 1024, "host RSS grew by {grown} KiB");
}
