//! A pool's whole life leaves nothing behind: after busy use (spares, crashes,
//! a timeout, quiesces, evictions) and shutdown or drop, the host has exactly
//! the fds it had before the pool existed and no child, zombie or not.
//!
//! One test in its own binary: it compares this process's fd table and
//! children before and after, which tests running beside it would disturb.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use sandpool::{CallError, Pool};
use sandpool_reference_helper::reference::*;
use sandpool_tests::{children, open_fds, pool_config, wait_for};

fn busy_life(pool: &Arc<Pool>) {
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                for i in 0..60u32 {
                    let tenant = format!("t{}", (i + t) % 6);
                    let reply = pool
                        .call(&tenant, &request(OP_ECHO, tenant.as_bytes()))
                        .unwrap();
                    assert_eq!(reply, tenant.as_bytes());
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let crash = pool
        .call("crasher", &request(OP_OPEN, b"/etc/shadow"))
        .unwrap_err();
    assert!(crash.is_seccomp_kill());
    let timeout = pool
        .call_with_deadline(
            "sleeper",
            &sleep_request(2000, b"late"),
            Instant::now() + Duration::from_millis(100),
        )
        .unwrap_err();
    assert!(matches!(timeout, CallError::Timeout { .. }), "{timeout:?}");
    assert!(wait_for(Duration::from_secs(10), || pool
        .stats()
        .quiesced_idle
        > 0));
}

#[test]
fn a_pool_leaves_no_fd_and_no_child_behind() {
    let fds_before = open_fds();
    assert_eq!(children(), vec![]);

    // Explicit shutdown.
    let mut config = pool_config(&["--test-ops"]);
    config.max_helpers = 5;
    config.idle_timeout = Duration::from_millis(150);
    let pool = Arc::new(Pool::new(config.clone()).unwrap());
    busy_life(&pool);
    let stats = pool.stats();
    assert!(
        stats.evicted > 0,
        "the cap of 5 forced evictions: {stats:?}"
    );
    pool.shutdown(Duration::from_secs(2));
    drop(pool);
    assert_eq!(children(), vec![], "no helper or zombie after shutdown");
    assert_eq!(
        open_fds(),
        fds_before,
        "exactly the fds from before the pool"
    );

    // Drop alone does the same.
    let pool = Arc::new(Pool::new(config).unwrap());
    busy_life(&pool);
    drop(pool);
    assert_eq!(children(), vec![], "no helper or zombie after drop");
    assert_eq!(
        open_fds(),
        fds_before,
        "exactly the fds from before the pool"
    );
}
