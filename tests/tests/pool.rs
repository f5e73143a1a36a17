//! The pool: per-tenant helpers, spares, quiesce, caps, eviction, recycling,
//! crash back-off, config. Real helper processes throughout.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandpool::{CallError, Config, Pool};
use sandpool_reference_helper::reference::*;
use sandpool_tests::{pool_config, process_exists, wait_for};

const SECOND: Duration = Duration::from_secs(1);

fn echo(pool: &Pool, tenant: &str, body: &[u8]) -> Result<Vec<u8>, CallError> {
    pool.call(tenant, &request(OP_ECHO, body))
}

#[test]
fn each_tenant_gets_its_own_helper_and_keeps_it() {
    let mut config = pool_config(&[]);
    config.spares = 0;
    let pool = Pool::new(config).unwrap();
    assert_eq!(echo(&pool, "a", b"1").unwrap(), b"1");
    assert_eq!(echo(&pool, "b", b"2").unwrap(), b"2");
    let a = pool.helper_info("a").unwrap();
    let b = pool.helper_info("b").unwrap();
    assert_ne!(a.pid, b.pid, "one helper never serves two tenants");
    for _ in 0..10 {
        echo(&pool, "a", b"again").unwrap();
    }
    let a_again = pool.helper_info("a").unwrap();
    assert_eq!(a_again.pid, a.pid);
    assert_eq!(a_again.calls, 11);
    let stats = pool.stats();
    assert_eq!(
        (stats.live, stats.idle, stats.busy, stats.launches),
        (2, 2, 0, 2)
    );
    assert_eq!(stats.calls_ok, 12);
}

#[test]
fn spares_serve_cold_tenants_once_and_are_refilled() {
    let mut config = pool_config(&[]);
    config.spares = 2;
    let pool = Pool::new(config).unwrap();
    assert!(
        wait_for(10 * SECOND, || pool.stats().spare == 2),
        "spares launched in the background"
    );
    let spares = pool.spare_pids();
    echo(&pool, "cold", b"x").unwrap();
    let bound = pool.helper_info("cold").unwrap().pid;
    assert_eq!(bound, spares[0], "the cold tenant got the oldest spare");
    let stats = pool.stats();
    assert_eq!((stats.spare_hits, stats.spare_misses), (1, 0));
    assert!(
        wait_for(10 * SECOND, || pool.stats().spare == 2),
        "the spare was replaced"
    );
    assert!(
        !pool.spare_pids().contains(&bound),
        "a bound helper never returns to the spares"
    );
    echo(&pool, "other", b"y").unwrap();
    assert_ne!(pool.helper_info("other").unwrap().pid, bound);
}

#[test]
fn warm_up_runs_on_each_spare_before_it_serves() {
    let mut config = pool_config(&[]);
    config.spares = 1;
    config.warmup_request = Some(request(OP_ECHO, b"warm"));
    let pool = Pool::new(config).unwrap();
    assert!(wait_for(10 * SECOND, || pool.stats().spare == 1));
    echo(&pool, "t", b"first").unwrap();
    let info = pool.helper_info("t").unwrap();
    assert_eq!(
        (info.total_calls, info.calls),
        (2, 1),
        "the warm-up call came before the tenant's"
    );
}

#[test]
fn idle_helpers_are_quiesced_and_replaced_on_the_next_call() {
    let mut config = pool_config(&[]);
    config.spares = 0;
    config.idle_timeout = Duration::from_millis(100);
    let pool = Pool::new(config).unwrap();
    echo(&pool, "t", b"x").unwrap();
    let pid = pool.helper_info("t").unwrap().pid;
    assert!(wait_for(10 * SECOND, || pool.stats().quiesced_idle == 1));
    assert!(
        wait_for(10 * SECOND, || !process_exists(pid)),
        "quiesced helper exited and was reaped"
    );
    assert!(pool.helper_info("t").is_none());
    echo(&pool, "t", b"y").unwrap();
    assert_ne!(pool.helper_info("t").unwrap().pid, pid);
    assert_eq!(pool.stats().live, 1);
}

#[test]
fn at_the_cap_the_least_recently_used_idle_helper_is_evicted() {
    let mut config = pool_config(&[]);
    config.spares = 0;
    config.max_helpers = 2;
    let pool = Pool::new(config).unwrap();
    echo(&pool, "a", b"").unwrap();
    echo(&pool, "b", b"").unwrap();
    echo(&pool, "a", b"").unwrap(); // b is now the least recently used
    let b_pid = pool.helper_info("b").unwrap().pid;
    echo(&pool, "c", b"").unwrap();
    assert!(pool.helper_info("b").is_none(), "b was evicted");
    assert!(pool.helper_info("a").is_some());
    assert_eq!(pool.stats().evicted, 1);
    // The evicted helper counts as live until it has been reaped.
    assert!(wait_for(10 * SECOND, || !process_exists(b_pid)));
    assert!(wait_for(10 * SECOND, || pool.stats().live == 2));
}

/// A pool capped at one helper (no spares), tenant "a"'s helper busy with a
/// call that sleeps `millis` and then echoes "a".
fn pool_of_one_busy_helper(
    millis: u32,
) -> (
    Arc<Pool>,
    std::thread::JoinHandle<Result<Vec<u8>, CallError>>,
) {
    let mut config = pool_config(&["--test-ops"]);
    config.spares = 0;
    config.max_helpers = 1;
    let pool = Arc::new(Pool::new(config).unwrap());
    let busy = {
        let pool = pool.clone();
        std::thread::spawn(move || pool.call("a", &sleep_request(millis, b"a")))
    };
    assert!(wait_for(10 * SECOND, || pool.stats().busy == 1));
    (pool, busy)
}

/// Tenant `tenant` of `pool` busy with a call that sleeps `millis` and then
/// echoes `body`, in a thread; returns once the call is in flight.
fn busy_call(
    pool: &Arc<Pool>,
    tenant: &'static str,
    millis: u32,
    body: &'static [u8],
) -> std::thread::JoinHandle<Result<Vec<u8>, CallError>> {
    let busy = {
        let pool = pool.clone();
        std::thread::spawn(move || pool.call(tenant, &sleep_request(millis, body)))
    };
    assert!(wait_for(10 * SECOND, || pool
        .helper_info(tenant)
        .is_some_and(|i| i.in_flight == 1)));
    busy
}

#[test]
fn when_every_helper_is_busy_a_new_tenant_gets_pool_full_at_its_deadline() {
    let (pool, busy) = pool_of_one_busy_helper(1500);
    let started = Instant::now();
    let err = pool
        .call_with_deadline(
            "b",
            &request(OP_ECHO, b"x"),
            Instant::now() + Duration::from_millis(300),
        )
        .unwrap_err();
    assert!(
        matches!(err, CallError::PoolFull { max_helpers: 1, .. }),
        "{err:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        busy.join().unwrap().is_ok(),
        "the busy tenant is unaffected"
    );
    // Once a is idle, b gets a helper by evicting it.
    assert_eq!(echo(&pool, "b", b"now").unwrap(), b"now");
}

#[test]
fn helpers_are_recycled_after_max_requests() {
    let mut config = pool_config(&[]);
    config.spares = 0;
    config.max_requests_per_helper = 3;
    let pool = Pool::new(config).unwrap();
    let mut pids = Vec::new();
    for _ in 0..7 {
        echo(&pool, "t", b"x").unwrap();
        pids.push(pool.helper_info("t").map(|info| info.pid));
    }
    // After calls 3 and 6 the helper is retired: the tenant has none.
    assert_eq!(pids[2], None);
    assert_eq!(pids[5], None);
    let distinct: HashSet<_> = pids.iter().flatten().collect();
    assert_eq!(distinct.len(), 3, "{pids:?}");
    assert_eq!(pool.stats().quiesced_max_requests, 2);
}

#[test]
fn a_crashing_tenant_is_replaced_then_backed_off_and_others_are_unaffected() {
    let mut config = pool_config(&["--test-ops"]);
    config.spares = 0;
    config.crash_backoff.initial = Duration::from_secs(60);
    config.crash_backoff.max = Duration::from_secs(120);
    let pool = Pool::new(config).unwrap();
    echo(&pool, "good", b"x").unwrap();
    let good_pid = pool.helper_info("good").unwrap().pid;

    let first = pool
        .call("bad", &request(OP_OPEN, b"/etc/passwd"))
        .unwrap_err();
    assert!(first.is_seccomp_kill(), "{first:?}");
    // The first failure is replaced at once.
    assert_eq!(echo(&pool, "bad", b"fresh").unwrap(), b"fresh");
    // A success resets the count; two failures in a row engage the back-off.
    let second = pool.call("bad", &request(OP_SOCKET, b"")).unwrap_err();
    assert!(second.is_seccomp_kill());
    let third = pool.call("bad", &request(OP_SPAWN, b"")).unwrap_err();
    assert!(third.is_seccomp_kill(), "{third:?}");
    match echo(&pool, "bad", b"again") {
        Err(CallError::BackingOff {
            failures: 2,
            retry_in,
        }) => assert!(retry_in > Duration::from_secs(50)),
        other => panic!("expected back-off, got {other:?}"),
    }
    assert_eq!(echo(&pool, "good", b"still fine").unwrap(), b"still fine");
    assert_eq!(pool.helper_info("good").unwrap().pid, good_pid);
    let stats = pool.stats();
    assert_eq!(stats.failures.seccomp, 3);
    assert_eq!(stats.backed_off_calls, 1);
}

#[test]
fn a_helper_that_dies_while_idle_is_noticed_and_replaced() {
    let mut config = pool_config(&[]);
    config.spares = 0;
    config.idle_timeout = Duration::from_millis(400);
    let pool = Pool::new(config).unwrap();
    echo(&pool, "t", b"x").unwrap();
    let pid = pool.helper_info("t").unwrap().pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_for(10 * SECOND, || pool.stats().failures.signaled == 1));
    assert!(!process_exists(pid), "reaped");
    assert_eq!(echo(&pool, "t", b"y").unwrap(), b"y");
    assert_ne!(pool.helper_info("t").unwrap().pid, pid);
}

#[test]
fn many_threads_many_tenants_pipelined() {
    let mut config = pool_config(&[]);
    config.spares = 2;
    config.max_in_flight = 4;
    let pool = Arc::new(Pool::new(config).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                for i in 0..150u32 {
                    let tenant = format!("tenant-{}", (t + i) % 5);
                    let body = format!("{tenant}/{t}/{i}");
                    assert_eq!(
                        echo(&pool, &tenant, body.as_bytes()).unwrap(),
                        body.as_bytes()
                    );
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let stats = pool.stats();
    assert_eq!(stats.calls_ok, 1200);
    assert_eq!(stats.calls_failed, 0);
    let pids: HashSet<u32> = (0..5)
        .map(|t| pool.helper_info(format!("tenant-{t}")).unwrap().pid)
        .collect();
    assert_eq!(pids.len(), 5);
}

#[test]
fn prewarm_launches_ahead_of_the_first_call() {
    let mut config = pool_config(&[]);
    config.spares = 0;
    let pool = Pool::new(config).unwrap();
    pool.prewarm("t").unwrap();
    let info = pool.helper_info("t").unwrap();
    assert_eq!(info.calls, 0);
    echo(&pool, "t", b"x").unwrap();
    assert_eq!(pool.helper_info("t").unwrap().pid, info.pid);
}

#[test]
fn shutdown_refuses_new_calls_and_reaps_everything() {
    let pool = Pool::new(pool_config(&[])).unwrap();
    echo(&pool, "a", b"x").unwrap();
    let pid = pool.helper_info("a").unwrap().pid;
    assert!(wait_for(10 * SECOND, || pool.stats().spare == 2));
    let spares = pool.spare_pids();
    pool.shutdown(SECOND);
    assert!(matches!(echo(&pool, "a", b"x"), Err(CallError::ShutDown)));
    for pid in spares.into_iter().chain([pid]) {
        assert!(!process_exists(pid), "pid {pid} reaped");
    }
    assert_eq!(pool.stats().live, 0);
    assert_eq!(pool.stats().shut_down, 3);
}

#[test]
fn config_from_toml_with_human_units() {
    let config = Config::from_toml(
        r#"
        program = "/usr/lib/pageserver/walredo-helper"
        args = ["--mode", "redo"]
        spares = 4
        idle_timeout = "200s"
        max_helpers = 2000
        max_in_flight = 8
        request_timeout = "1s 500ms"
        shutdown_grace = "250ms"
        max_frame = "4MiB"
        max_requests_per_helper = 100000
        warmup_request = "\u0001warm"
        [crash_backoff]
        initial = "50ms"
        max = "1m"
        [sandbox]
        seccomp = "log"
        extra_syscalls = ["uname"]
        [sandbox.rlimits]
        address_space = "1GiB"
        open_files = 16
        "#,
    )
    .unwrap();
    assert_eq!(config.idle_timeout, Duration::from_secs(200));
    assert_eq!(config.request_timeout, Duration::from_millis(1500));
    assert_eq!(config.max_frame.as_u64(), 4 << 20);
    assert_eq!(config.crash_backoff.max, Duration::from_secs(60));
    assert_eq!(config.sandbox.seccomp, sandpool::SeccompMode::Log);
    assert_eq!(
        config.sandbox.rlimits.address_space.bytes().unwrap(),
        1 << 30
    );
    assert_eq!(config.warmup_request.as_deref(), Some(&b"\x01warm"[..]));
    assert_eq!(config.helper_config().max_frame, 4 << 20);

    let defaults = Config::from_toml(r#"program = "/bin/helper""#).unwrap();
    assert_eq!(defaults.spares, 2);
    assert_eq!(defaults.sandbox.seccomp, sandpool::SeccompMode::Enforce);
    assert!(defaults.sandbox.verify_with_proc);
}

#[test]
fn invalid_config_values_are_named() {
    let cases = [
        ("", "program"),
        ("program = \"/h\"\nspares = 10\nmax_helpers = 5", "spares"),
        ("program = \"/h\"\nidle_timeout = \"soon\"", "toml"),
        ("program = \"/h\"\ncolour = \"blue\"", "toml"),
        ("program = \"/h\"\nmax_frame = \"1GiB\"", "max_frame"),
        ("program = \"/h\"\nmax_frame = \"100B\"", "max_frame"),
        ("program = \"/h\"\nmax_in_flight = 0", "max_in_flight"),
        ("program = \"/h\"\n[sandbox]\nseccomp = \"maybe\"", "toml"),
        (
            "program = \"/h\"\n[crash_backoff]\ninitial = \"1s\"\nmax = \"10ms\"",
            "crash_backoff.max",
        ),
        (
            "program = \"/h\"\nrequest_timeout = \"0s\"",
            "request_timeout",
        ),
        ("program = \"/h\"\nregion_slots = 0", "region_slots"),
        (
            "program = \"/h\"\nmax_in_flight = 4\nregion_slots = 5",
            "region_slots",
        ),
        (
            "program = \"/h\"\nregion_size = \"1MiB\"\nregion_slots = 16\nregion_threshold = \"64KiB\"",
            "region_threshold",
        ),
        ("program = \"/h\"\nregion_size = \"4KiB\"", "region_size"),
    ];
    for (text, field) in cases {
        let err = Config::from_toml(text).unwrap_err();
        assert_eq!(err.field, field, "{text:?}: {err}");
    }
    let err = Config::from_toml("program = \"/h\"\ncolour = \"blue\"").unwrap_err();
    assert!(err.to_string().contains("colour"), "{err}");
}

#[test]
fn pool_is_send_and_sync_and_tenant_ids_are_checked() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Pool>();
    let mut config = pool_config(&[]);
    config.spares = 1;
    let pool = Pool::new(config).unwrap();
    assert!(wait_for(10 * SECOND, || pool.stats().spare == 1));
    let spare = pool.spare_pids();
    for bad in [&b""[..], &[7u8; 300][..]] {
        assert!(matches!(
            pool.call(bad, &request(OP_ECHO, b"x")),
            Err(CallError::InvalidTenant(_))
        ));
    }
    assert_eq!(
        pool.spare_pids(),
        spare,
        "an invalid tenant id uses up no spare"
    );
    // Any bytes make a tenant id.
    assert_eq!(
        pool.call([0u8, 255, 10], &request(OP_ECHO, b"bin"))
            .unwrap(),
        b"bin"
    );
}

#[test]
fn the_example_config_parses_to_the_documented_defaults() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../sandpool.example.toml"
    ))
    .unwrap();
    let parsed = Config::from_toml(&text).unwrap();
    let mut defaults = Config::new("sandpool-helper");
    defaults.program = parsed.program.clone();
    assert_eq!(
        parsed, defaults,
        "sandpool.example.toml documents exactly the defaults"
    );
}

#[test]
fn the_readme_lists_every_metric() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    for (name, _, _) in sandpool::METRICS {
        assert!(
            readme.contains(&format!("`{name}")),
            "README does not list {name}"
        );
    }
}

#[test]
fn one_death_seen_by_several_calls_counts_once() {
    let mut config = pool_config(&["--test-ops"]);
    config.spares = 0;
    let pool = Arc::new(Pool::new(config).unwrap());
    let in_thread = |payload: Vec<u8>| {
        let pool = pool.clone();
        std::thread::spawn(move || pool.call("t", &payload))
    };
    pool.prewarm("t").unwrap();
    let in_flight = || pool.helper_info("t").map_or(0, |info| info.in_flight);
    let slow = in_thread(sleep_request(300, b"slow"));
    assert!(wait_for(10 * SECOND, || in_flight() == 1));
    std::thread::sleep(Duration::from_millis(20));
    let fatal = in_thread(request(OP_OPEN, b"/etc/passwd"));
    assert!(wait_for(10 * SECOND, || in_flight() == 2));
    std::thread::sleep(Duration::from_millis(20));
    let queued = in_thread(request(OP_ECHO, b"queued"));
    assert_eq!(slow.join().unwrap().unwrap(), b"slow");
    assert!(fatal.join().unwrap().unwrap_err().is_seccomp_kill());
    assert!(queued.join().unwrap().unwrap_err().is_seccomp_kill());
    assert_eq!(pool.stats().failures.seccomp, 1, "one helper died once");
    assert_eq!(
        echo(&pool, "t", b"next").unwrap(),
        b"next",
        "one failure is replaced at once, not backed off"
    );
}

#[test]
fn a_caller_that_gives_up_in_the_queue_does_not_kill_the_helper() {
    let mut config = pool_config(&["--test-ops"]);
    config.spares = 0;
    let pool = Arc::new(Pool::new(config).unwrap());
    pool.prewarm("t").unwrap();
    let pid = pool.helper_info("t").unwrap().pid;
    let slow = busy_call(&pool, "t", 500, b"slow");
    std::thread::sleep(Duration::from_millis(20));
    let err = pool
        .call_with_deadline(
            "t",
            &request(OP_ECHO, b"impatient"),
            Instant::now() + Duration::from_millis(100),
        )
        .unwrap_err();
    assert!(matches!(err, CallError::QueueTimeout { .. }), "{err:?}");
    assert!(err.helper_survives());
    assert_eq!(slow.join().unwrap().unwrap(), b"slow");
    // The impatient call's reply was dropped; the stream stays in step.
    assert_eq!(echo(&pool, "t", b"after").unwrap(), b"after");
    assert_eq!(pool.helper_info("t").unwrap().pid, pid);
    assert_eq!(pool.stats().failures, sandpool::FailureStats::default());
}

/// A caller that spent most of its time waiting for a place in the table
/// leaves at its deadline, but the helper still gets the caller's whole
/// budget from the moment the request is sent: it is never judged hung for
/// the caller's time in the queue. (Before, the budget was the deadline
/// minus the send time: 100 ms here, and the healthy helper, still on its
/// 150 ms of work, was killed as hung.)
#[test]
fn time_a_caller_spent_queued_is_not_charged_to_the_helper() {
    let mut config = pool_config(&["--test-ops"]);
    config.spares = 0;
    config.max_in_flight = 1;
    let pool = Arc::new(Pool::new(config).unwrap());
    pool.prewarm("t").unwrap();
    let pid = pool.helper_info("t").unwrap().pid;
    let slow = busy_call(&pool, "t", 250, b"slow");
    // Queued behind the slow call for about 250 ms of its 350, then sent.
    let err = pool
        .call_with_deadline(
            "t",
            &sleep_request(150, b"queued"),
            Instant::now() + Duration::from_millis(350),
        )
        .unwrap_err();
    assert!(matches!(err, CallError::QueueTimeout { .. }), "{err:?}");
    assert_eq!(slow.join().unwrap().unwrap(), b"slow");
    assert_eq!(echo(&pool, "t", b"after").unwrap(), b"after");
    assert_eq!(pool.helper_info("t").unwrap().pid, pid, "never retired");
    assert_eq!(pool.stats().failures, sandpool::FailureStats::default());
}
#[test]
fn a_call_waiting_for_room_is_woken_when_a_helper_becomes_idle() {
    let (pool, busy) = pool_of_one_busy_helper(300);
    let started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    assert_eq!(
        pool.call_with_deadline("b", &request(OP_ECHO, b"b"), deadline)
            .unwrap(),
        b"b"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woken when a finished, not at the deadline"
    );
    assert_eq!(busy.join().unwrap().unwrap(), b"a");
}

#[test]
fn a_helper_that_ignores_eof_does_not_stall_the_keeper() {
    let mut config = pool_config(&[]);
    config.spares = 1;
    config.idle_timeout = Duration::from_millis(100);
    config.shutdown_grace = Duration::from_secs(30);
    let pool = Pool::new(config).unwrap();
    assert!(wait_for(10 * SECOND, || pool.stats().spare == 1));
    echo(&pool, "stopped", b"x").unwrap();
    let pid = pool.helper_info("stopped").unwrap().pid;
    // Stopped, it cannot react to EOF: closing it takes the whole grace.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    assert!(wait_for(10 * SECOND, || pool.stats().quiesced_idle == 1));
    // Meanwhile the keeper goes on refilling spares.
    echo(&pool, "other", b"y").unwrap();
    assert!(
        wait_for(10 * SECOND, || pool.stats().spare == 1),
        "spare refilled during the grace"
    );
    assert!(process_exists(pid), "still within its grace");
    pool.shutdown(Duration::from_millis(100));
    assert!(!process_exists(pid), "shutdown killed and reaped it");
}

#[test]
fn a_launch_gives_up_at_the_call_deadline() {
    let mut config = pool_config(&["--misbehave", "no-hello"]);
    config.spares = 0;
    config.spawn_timeout = Duration::from_secs(30);
    let pool = Pool::new(config).unwrap();
    let started = Instant::now();
    let err = pool
        .call_with_deadline(
            "t",
            &request(OP_ECHO, b"x"),
            Instant::now() + Duration::from_millis(200),
        )
        .unwrap_err();
    match &err {
        CallError::Launch(launch) => assert!(
            matches!(**launch, sandpool::LaunchError::HelloTimeout { .. }),
            "{launch:?}"
        ),
        other => panic!("expected a launch timeout, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "not the 30 s spawn timeout"
    );
}
