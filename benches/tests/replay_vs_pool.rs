//! The replay tool's numbers against a real pool: a short trace replayed in
//! real time through a `Pool` with a fixed idle timeout, and through
//! `replay::simulate` with the same policy. Cold starts must match exactly
//! (the trace's gaps stay well clear of the timeout and its keeper tick);
//! helper-seconds within the tolerance stated below (the pool's keeper
//! ticks at its own phase, a launch takes its time).
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sandpool::{Config, IdlePolicy, Pool};
use sandpool_benches::replay::{keeper_tick, parse_trace, simulate};
use sandpool_reference_helper::reference::{OP_ECHO, request};

const HELPER: &str = env!("SANDPOOL_HELPER_BIN");

/// Three tenants over 3.3 s: gaps of 0.1 and 0.25 s (warm under both
/// timeouts), 0.8 s (cold under 0.4 s, warm under 1.2 s), 2 s (cold under
/// both).
const TRACE: &str = "\
0.00,a
0.10,a
0.30,b
0.50,c
0.90,a
1.10,b
1.15,a
1.20,b
2.50,c
2.60,c
2.85,c
3.15,a
3.20,b
3.25,a
";

/// Replays the trace in real time through a pool with `idle_timeout`;
/// returns its cold starts (launches: no spares) and the seconds its
/// helpers were bound, sampled every 2 ms until the last one closed.
fn real_pool(idle_timeout: Duration) -> (u64, f64) {
    let trace = parse_trace(TRACE).unwrap();
    let mut config = Config::new(HELPER);
    config.spares = 0;
    config.idle_timeout = idle_timeout;
    let pool = Arc::new(Pool::new(config).unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let helper_seconds = Arc::new(Mutex::new(0.0f64));
    let sampler = {
        let (pool, done, total) = (pool.clone(), done.clone(), helper_seconds.clone());
        std::thread::spawn(move || {
            let mut last = Instant::now();
            loop {
                std::thread::sleep(Duration::from_millis(2));
                let stats = pool.stats();
                let now = Instant::now();
                *total.lock().unwrap() +=
                    (stats.idle + stats.busy) as f64 * (now - last).as_secs_f64();
                last = now;
                if done.load(Ordering::Acquire) && stats.idle + stats.busy == 0 {
                    break;
                }
            }
        })
    };
    let start = Instant::now();
    for call in &trace.calls {
        std::thread::sleep((start + call.at).saturating_duration_since(Instant::now()));
        let tenant = &trace.tenants[call.tenant];
        assert_eq!(pool.call(tenant, &request(OP_ECHO, b"x")).unwrap(), b"x");
    }
    done.store(true, Ordering::Release);
    sampler.join().unwrap();
    let cold = pool.stats().spare_misses;
    let seconds = *helper_seconds.lock().unwrap();
    (cold, seconds)
}

#[test]
fn the_replay_counts_what_a_real_pool_does_for_fixed_timeouts() {
    let trace = parse_trace(TRACE).unwrap();
    for idle_timeout in [Duration::from_millis(400), Duration::from_millis(1200)] {
        let policy = IdlePolicy::Fixed { idle_timeout };
        let tick = keeper_tick(&policy);
        let replayed = simulate(&trace, &policy, tick);
        let (cold, seconds) = real_pool(idle_timeout);
        println!(
            "idle_timeout {idle_timeout:?}: cold starts replay {} pool {cold}; helper-seconds replay {:.3} pool {seconds:.3}",
            replayed.cold_starts, replayed.helper_seconds
        );
        assert_eq!(cold, replayed.cold_starts, "cold starts, {idle_timeout:?}");
        // Each helper's close may fall up to one keeper tick later (or
        // earlier) in the pool than in the replay, whose ticks start at
        // zero; plus 10% for launches and the sampling.
        let tolerance =
            replayed.cold_starts as f64 * tick.as_secs_f64() + 0.1 * replayed.helper_seconds;
        assert!(
            (seconds - replayed.helper_seconds).abs() <= tolerance,
            "helper-seconds, {idle_timeout:?}: pool {seconds:.3}, replay {:.3}, tolerance {tolerance:.3}",
            replayed.helper_seconds
        );
    }
}
