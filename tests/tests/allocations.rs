//! The call path allocates nothing on the host in steady state but the
//! response buffer the caller receives, counted by a real global allocator.
//! (Responses over 64 KiB grow that buffer as their bytes arrive.)
//! Its own binary: the allocation counter is process-global.
#![allow(clippy::unwrap_used)]

use std::alloc::System;

use sandpool::Pool;
use sandpool_reference_helper::reference::{OP_ECHO, request};
use sandpool_tests::pool_config;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[test]
fn a_warm_call_allocates_only_the_response() {
    let mut config = pool_config(&[]);
    config.spares = 0;
    // No background work during the measurement: no idle scans that matter.
    config.idle_timeout = std::time::Duration::from_secs(3600);
    // The keeper samples every helper often during the measurement, and
    // must not allocate either; its first sample sizes its scratch buffers
    // once, which happens before (the wait after the warm-up calls). With
    // the default 1 s interval that first sample fell inside the
    // measurement whenever the test ran past a second: one allocation more.
    config.sample_interval = std::time::Duration::from_millis(10);
    let pool = Pool::new(config).unwrap();
    // parking_lot builds its global wait table the first time any thread
    // parks: make that one-time allocation happen before the measurement.
    let mutex = parking_lot::Mutex::new(());
    let held = mutex.lock();
    std::thread::scope(|scope| {
        scope.spawn(|| drop(mutex.lock()));
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(held);
    });
    for size in [16usize, 8192, 100_000] {
        let req = request(OP_ECHO, &vec![7u8; size - 1]);
        for _ in 0..200 {
            pool.call("t", &req).unwrap();
        }
        // At least one keeper sample before the measurement.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let calls = 1000;
        let region = Region::new(GLOBAL);
        let mut total = 0;
        for _ in 0..calls {
            let reply = pool.call("t", &req).unwrap();
            total += reply.len();
        }
        let change = region.change();
        assert_eq!(total, calls * (size - 1));
        assert_eq!(
            change.allocations, calls,
            "{size} B: {} allocations for {calls} calls (one each: the response)",
            change.allocations
        );
        if size <= 64 * 1024 {
            assert_eq!(
                change.reallocations, 0,
                "{size} B: the response buffer is sized once"
            );
            assert_eq!(
                change.bytes_allocated,
                calls * (size - 1),
                "{size} B: exactly the responses' bytes"
            );
        } else {
            // Beyond one 64 KiB read-ahead chunk the buffer grows (at most
            // doubling) as bytes arrive, never to the size a helper merely
            // claims: one reallocation per doubling.
            let doublings = (size as f64 / 65536.0).log2().ceil() as usize;
            assert!(
                change.reallocations <= calls * doublings,
                "{size} B: {} reallocations",
                change.reallocations
            );
        }
    }
}
