//! Containment of a hostile tenant that uses memory or CPU instead of
//! forbidden syscalls, each case beside bystander tenants whose calls keep
//! succeeding: the address-space default, `max_helper_memory`,
//! `memory_budget`, `max_idle_cpu`, and a spare that misbehaves before it
//! is bound; and a helper's memory given back after large calls. Cases run
//! one at a time (they count this process's children).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use sandpool::{
    ByteSize, CallError, Config, Launcher, Limit, MemoryBudget, Pool, ProtocolViolation, SizeLimit,
    TimeLimit,
};
use sandpool_reference_helper::reference::*;
use sandpool_tests::{Bystanders, children, config, pool_config, process_exists, serial, wait_for};

/// Bystanders on `pool`, or on a pool of well-behaved helpers of their own
/// (when the hostile pool's program misbehaves for every tenant).
fn bystanders(pool: Option<&Arc<Pool>>) -> (Bystanders, Arc<Pool>) {
    let pool = pool.cloned().unwrap_or_else(|| {
        let mut cfg = pool_config(&[]);
        cfg.spares = 0;
        Arc::new(Pool::new(cfg).unwrap())
    });
    (Bystanders::start(&pool, 2), pool)
}

fn finish((bystanders, _pool): (Bystanders, Arc<Pool>)) {
    assert!(
        wait_for(Duration::from_secs(10), || bystanders.calls() > 0),
        "bystanders made calls"
    );
    let failures = bystanders.finish();
    assert!(failures.is_empty(), "bystander calls failed: {failures:?}");
}

fn pid_of(pool: &Pool, tenant: &str) -> u32 {
    pool.helper_info(tenant).unwrap().pid
}

#[test]
fn by_default_a_3_gib_allocation_fails_typed_and_the_next_call_gets_a_fresh_helper() {
    let _serial = serial();
    let before = children().len();
    let pool = Arc::new(Pool::new(pool_config(&["--test-ops"])).unwrap());
    let bystanders = bystanders(Some(&pool));
    pool.call("evil", &request(OP_ECHO, b"warm")).unwrap();
    let pid = pid_of(&pool, "evil");
    let err = pool.call("evil", &grow_request(3 * 1024)).unwrap_err();
    match &err {
        CallError::LimitExceeded {
            pid: killed,
            limit: Limit::AddressSpace { max },
            ..
        } => {
            assert_eq!(*killed, pid);
            assert_eq!(*max, sandpool::DEFAULT_ADDRESS_SPACE.as_u64());
        }
        other => panic!("expected an address-space limit, got {other:?}"),
    }
    assert!(err.is_helper_failure());
    // Its memory went back to the host with the process.
    assert!(wait_for(Duration::from_secs(5), || !process_exists(pid)));
    assert_eq!(
        pool.call("evil", &request(OP_ECHO, b"again")).unwrap(),
        b"again"
    );
    assert_ne!(pid_of(&pool, "evil"), pid, "a fresh helper");
    assert_eq!(pool.stats().failures.memory, 1);
    finish(bystanders);
    pool.shutdown(Duration::from_secs(2));
    drop(pool);
    assert!(wait_for(Duration::from_secs(5), || children().len() == before));
}

#[test]
fn a_helper_over_max_helper_memory_is_killed_by_the_keeper_while_idle() {
    let _serial = serial();
    let before = children().len();
    let mut cfg = pool_config(&["--test-ops"]);
    cfg.spares = 0;
    cfg.max_helper_memory = SizeLimit::Bytes(ByteSize::mib(64));
    cfg.sample_interval = Duration::from_millis(20);
    let pool = Arc::new(Pool::new(cfg).unwrap());
    let bystanders = bystanders(Some(&pool));
    pool.call("evil", &request(OP_ECHO, b"warm")).unwrap();
    let pid = pid_of(&pool, "evil");
    // 100 MiB fits the address space: the keeper kills the helper at the
    // first sample over 64 MiB, while the call runs (it then fails, typed)
    // or after it answered.
    match pool.call("evil", &grow_request(100)) {
        Ok(reply) => assert_eq!(reply, 100u32.to_le_bytes()),
        Err(CallError::LimitExceeded {
            limit: Limit::Memory { resident, max },
            pid: killed,
            ..
        }) => {
            assert_eq!(killed, pid);
            assert!(resident > max && max == 64 << 20);
        }
        Err(other) => panic!("expected the memory limit, got {other:?}"),
    }
    assert!(
        wait_for(Duration::from_secs(10), || pool.stats().failures.memory
            == 1),
        "killed for its memory: {:?}",
        pool.stats()
    );
    assert!(wait_for(Duration::from_secs(5), || !process_exists(pid)));
    assert!(pool.helper_info("evil").is_none(), "taken from its tenant");
    // The bystanders' helpers are small and were never touched.
    assert_eq!(pool.stats().failures.memory, 1);
    pool.call("evil", &request(OP_ECHO, b"fresh")).unwrap();
    assert_ne!(pid_of(&pool, "evil"), pid);
    finish(bystanders);
    drop(pool);
    assert!(wait_for(Duration::from_secs(5), || children().len() == before));
}

/// Echo calls of growing size, one after another, on a helper whose
/// `max_helper_memory` holds one call's request and reply but not what it
/// would keep of the calls before: the memory of a large call is given
/// back. The reference helper on musl allocates with the sandbox's
/// `HelperAllocator`; with dlmalloc alone, which keeps large blocks in its
/// heap segments, the keeper killed it on the way up.
#[test]
fn large_calls_one_after_another_give_their_memory_back() {
    let _serial = serial();
    let mut cfg = pool_config(&[]);
    cfg.spares = 0;
    cfg.max_frame = ByteSize::mib(200);
    cfg.max_helper_memory = SizeLimit::Bytes(ByteSize::mib(512));
    cfg.sample_interval = Duration::from_millis(20);
    let pool = Pool::new(cfg).unwrap();
    pool.call("big", &request(OP_ECHO, b"warm")).unwrap();
    let pid = pid_of(&pool, "big");
    for mib in (32..=192).step_by(32) {
        // `repeat` copies by doubling: a `vec![byte; n]` of a non-zero
        // byte is filled a byte at a time in a debug build.
        let payload = b"sandpool".repeat(mib << 17);
        let reply = pool
            .call("big", &request(OP_ECHO, &payload))
            .unwrap_or_else(|err| panic!("echo of {mib} MiB: {err}"));
        assert!(reply == payload, "echo of {mib} MiB came back changed");
        // Several of the keeper's samples of the idle helper.
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(pid_of(&pool, "big"), pid, "one helper served every call");
    assert_eq!(pool.stats().failures.memory, 0);
}

#[test]
fn the_memory_budget_holds_under_50_growing_tenants_by_evicting_idle_ones() {
    let _serial = serial();
    let before = children().len();
    let budget = ByteSize::mib(160);
    let mut cfg = pool_config(&["--test-ops"]);
    cfg.spares = 0;
    cfg.memory_budget = MemoryBudget::Bytes(budget);
    cfg.sample_interval = Duration::from_millis(20);
    let pool = Arc::new(Pool::new(cfg).unwrap());
    assert_eq!(pool.stats().memory_budget, Some(budget.as_u64()));
    // Bystanders on the same pool: their helpers may be evicted while idle
    // like anyone's, but none of their calls fails.
    let bystanders = bystanders(Some(&pool));
    // Five threads, ten tenants each, each tenant growing to 8 MiB in two
    // calls: helpers are busy while the budget is enforced around them.
    let threads: Vec<_> = (0..5)
        .map(|t| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                for n in 0..10 {
                    let tenant = format!("tenant-{t}-{n}");
                    for _ in 0..2 {
                        if let Err(err) = pool.call(&tenant, &grow_request(4)) {
                            failures.push(format!("{tenant}: {err}"));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(30));
                }
                failures
            })
        })
        .collect();
    for thread in threads {
        // Every call succeeded: nothing busy was evicted (a call in flight
        // on an evicted helper would have failed with `Retired`).
        let failures = thread.join().unwrap();
        assert!(failures.is_empty(), "{failures:?}");
    }
    assert!(
        wait_for(Duration::from_secs(10), || {
            let stats = pool.stats();
            stats.memory.total() > 0 && stats.memory.total() <= budget.as_u64()
        }),
        "under the budget: {:?}",
        pool.stats().memory
    );
    let stats = pool.stats();
    assert!(
        stats.evicted_memory_budget >= 20,
        "50 tenants of about 9 MiB each cannot fit 160 MiB: {stats:?}"
    );
    finish(bystanders);
    let stats = pool.stats();
    assert_eq!(stats.failures, Default::default(), "nobody failed");
    assert_eq!(stats.calls_failed, 0);
    // Least recently used first: a first tenant lost its helper, a last one kept it.
    assert!(pool.helper_info("tenant-0-0").is_none());
    let last = (0..5).filter(|t| pool.helper_info(format!("tenant-{t}-9")).is_some());
    assert!(last.count() > 0, "some last tenant keeps its helper");
    drop(pool);
    assert!(wait_for(Duration::from_secs(5), || children().len() == before));
}

#[test]
fn a_helper_that_spins_after_replying_is_killed_and_backed_off_on_repetition() {
    let _serial = serial();
    let before = children().len();
    let bystanders = bystanders(None);
    let mut cfg = pool_config(&["--misbehave", "spin-when-idle"]);
    cfg.spares = 0;
    cfg.max_idle_cpu = TimeLimit::Time(Duration::from_millis(200));
    cfg.sample_interval = Duration::from_millis(50);
    let pool = Pool::new(cfg).unwrap();
    for round in 1..=2u64 {
        let answered = Instant::now();
        assert_eq!(
            pool.call("spinner", &request(OP_ECHO, b"hi")).unwrap(),
            b"hi"
        );
        let pid = pid_of(&pool, "spinner");
        assert!(
            wait_for(Duration::from_secs(20), || pool.stats().failures.idle_cpu
                == round),
            "round {round}: the idle spinner was killed: {:?}",
            pool.stats()
        );
        eprintln!(
            "idle spin to kill: {:?} (max_idle_cpu 200ms, sample_interval 50ms)",
            answered.elapsed()
        );
        assert!(wait_for(Duration::from_secs(5), || !process_exists(pid)));
        assert!(wait_for(Duration::from_secs(5), || pool
            .helper_info("spinner")
            .is_none()));
    }
    // Two failures in a row: the tenant is backed off.
    let stats = pool.stats();
    assert!(stats.backoffs_engaged >= 1, "{stats:?}");
    assert!(matches!(
        pool.call("spinner", &request(OP_ECHO, b"x")),
        Err(CallError::BackingOff { failures: 2, .. })
    ));
    drop(pool);
    finish(bystanders);
    assert!(wait_for(Duration::from_secs(5), || children().len() == before));
}

#[test]
fn a_helper_that_spins_after_every_reply_is_caught_however_often_it_is_called() {
    let _serial = serial();
    let mut cfg = pool_config(&["--misbehave", "spin-after-reply"]);
    cfg.spares = 0;
    cfg.max_idle_cpu = TimeLimit::Time(Duration::from_millis(200));
    // Calls come more often than samples: no two samples ever see the same
    // call count, yet the CPU it burns between calls is idle CPU.
    cfg.sample_interval = Duration::from_millis(500);
    let pool = Pool::new(cfg).unwrap();
    let started = Instant::now();
    let mut killed = false;
    while started.elapsed() < Duration::from_secs(20) {
        match pool.call("spinner", &request(OP_ECHO, b"x")) {
            Ok(_) => {}
            Err(CallError::LimitExceeded {
                limit: Limit::IdleCpu { used, max },
                ..
            }) => {
                assert!(used > max);
                killed = true;
            }
            Err(CallError::NotSent { .. }) => {}
            Err(other) => panic!("{other:?}"),
        }
        if pool.stats().failures.idle_cpu > 0 {
            killed = true;
        }
        if killed {
            break;
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(killed, "never judged: {:?}", pool.stats());
}

#[test]
fn a_busy_tenant_over_the_budget_does_not_churn_the_others() {
    let _serial = serial();
    let mut cfg = pool_config(&["--test-ops"]);
    cfg.spares = 0;
    cfg.memory_budget = MemoryBudget::Bytes(ByteSize::mib(64));
    cfg.sample_interval = Duration::from_millis(50);
    let pool = Arc::new(Pool::new(cfg).unwrap());
    pool.call("hog", &grow_request(80)).unwrap();
    // Kept busy: nothing can evict it, and evicting the others would not
    // bring the pool under the budget.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let (pool, stop) = (pool.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    pool.call("hog", &sleep_request(300, b"z")).unwrap();
                }
            })
        })
        .collect();
    for t in 0..4 {
        pool.call(format!("small-{t}"), &request(OP_ECHO, b"x"))
            .unwrap();
    }
    let pids: Vec<u32> = (0..4)
        .map(|t| pid_of(&pool, &format!("small-{t}")))
        .collect();
    for _ in 0..20 {
        for t in 0..4 {
            pool.call(format!("small-{t}"), &request(OP_ECHO, b"x"))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let after: Vec<u32> = (0..4)
        .map(|t| pid_of(&pool, &format!("small-{t}")))
        .collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for hog in hogs {
        hog.join().unwrap();
    }
    assert_eq!(pids, after, "the small tenants kept their helpers");
    assert_eq!(pool.stats().evicted_memory_budget, 0, "{:?}", pool.stats());
}

#[test]
fn spares_killed_for_their_limits_are_counted_and_refills_back_off() {
    let _serial = serial();
    let mut cfg = pool_config(&["--misbehave", "spin-when-idle"]);
    cfg.spares = 1;
    cfg.warmup_request = Some(request(OP_ECHO, b"warm"));
    cfg.max_idle_cpu = TimeLimit::Time(Duration::from_millis(100));
    cfg.sample_interval = Duration::from_millis(50);
    let pool = Pool::new(cfg).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let stats = pool.stats();
    assert!(stats.failures.idle_cpu >= 2, "{stats:?}");
    // Refills wait 100 ms, 200 ms, 400 ms, ... after each kill: in 3 s,
    // without the back-off, one launch every two samples (about 30).
    assert!(stats.launches <= 10, "{stats:?}");
    assert_eq!(stats.backoffs_engaged, 0, "no tenant was charged");
}

#[test]
fn a_spare_that_wrote_before_it_was_bound_is_retired_at_bind() {
    let _serial = serial();
    let launcher = Launcher::new(config(&["--misbehave", "output-before-bind"])).unwrap();
    let helper = launcher.launch().unwrap();
    let pid = helper.pid();
    // It writes right after its Hello; nothing reads it until the bind.
    std::thread::sleep(Duration::from_millis(200));
    match helper.bind(b"tenant") {
        Err(CallError::Protocol {
            violation: ProtocolViolation::OutputBeforeBind,
            ..
        }) => {}
        other => panic!("expected OutputBeforeBind, got {other:?}"),
    }
    assert!(matches!(
        helper.call(&request(OP_ECHO, b"x"), sandpool_tests::deadline(2.0)),
        Err(CallError::NotSent { .. })
    ));
    assert!(wait_for(Duration::from_secs(5), || !process_exists(pid)
        || std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.contains(") Z"))));
    // A well-behaved helper binds as before.
    let good = Launcher::new(config(&[])).unwrap().launch().unwrap();
    good.bind(b"tenant").unwrap();
    assert_eq!(
        good.call(&request(OP_ECHO, b"y"), sandpool_tests::deadline(2.0))
            .unwrap(),
        b"y"
    );
}

/// SIGKILLs the host's child `pid` and waits until it is a zombie (dead,
/// not reaped: the host reaps it only when it looks).
fn kill_unreaped(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z"))
    }));
}

/// Binding `helper`, killed by SIGKILL while it waited, fails with that.
fn bind_fails_as_killed(helper: &sandpool::Helper) {
    match helper.bind(b"tenant") {
        Err(CallError::Died { status, .. }) => assert_eq!(
            status,
            sandpool::ExitStatus::Signaled(nix::sys::signal::Signal::SIGKILL as i32)
        ),
        other => panic!("expected Died by SIGKILL, got {other:?}"),
    }
}

#[test]
fn a_spare_that_died_while_it_waited_is_retired_at_bind_with_its_status() {
    let _serial = serial();
    let helper = Launcher::new(config(&[])).unwrap().launch().unwrap();
    let pid = helper.pid();
    kill_unreaped(pid);
    bind_fails_as_killed(&helper);
    assert!(matches!(
        helper.call(&request(OP_ECHO, b"x"), sandpool_tests::deadline(2.0)),
        Err(CallError::NotSent { .. })
    ));
    drop(helper);
    assert!(wait_for(Duration::from_secs(5), || !process_exists(pid)));
}

/// The same when the helper's death closed none of its pipes: another
/// process still holds them (as one its init hook left behind could),
/// played here by this test, which opens the pipes again through
/// `/proc/PID/fd`. (A review found such a dead spare bound to the tenant,
/// whose call then timed out and was charged to it.)
#[test]
fn a_spare_that_died_with_its_pipes_held_elsewhere_is_retired_at_bind() {
    let _serial = serial();
    let helper = Launcher::new(config(&[])).unwrap().launch().unwrap();
    let pid = helper.pid();
    let stdin_reader = std::fs::File::open(format!("/proc/{pid}/fd/0")).unwrap();
    let stdout_writer = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/fd/1"))
        .unwrap();
    kill_unreaped(pid);
    bind_fails_as_killed(&helper);
    drop((stdin_reader, stdout_writer, helper));
    assert!(wait_for(Duration::from_secs(5), || !process_exists(pid)));
}

#[test]
fn a_pool_of_spares_that_write_before_bind_never_charges_the_tenant_for_them() {
    let _serial = serial();
    let mut cfg = pool_config(&["--misbehave", "output-before-bind"]);
    cfg.spares = 2;
    let pool = Pool::new(cfg).unwrap();
    assert!(wait_for(Duration::from_secs(10), || pool.stats().spare == 2));
    // Both spares have written by now (right after their Hello).
    std::thread::sleep(Duration::from_millis(200));
    let spares = pool.spare_pids();
    let result = pool.call("tenant", &request(OP_ECHO, b"x"));
    let stats = pool.stats();
    assert_eq!(
        stats.spare_hits, 0,
        "no bad spare was handed out: {stats:?}"
    );
    // Whatever the tenant's own launch did, the discarded spares did not
    // count toward its back-off: at most its own one failure.
    assert_eq!(stats.backoffs_engaged, 0, "{stats:?}; call: {result:?}");
    for pid in spares {
        assert!(wait_for(Duration::from_secs(5), || !process_exists(pid)));
    }
}

#[test]
fn limits_in_toml_take_sizes_durations_and_unlimited_written_out() {
    let config = Config::from_toml(
        r#"
        program = "/bin/true"
        max_helper_memory = "unlimited"
        memory_budget = "2GiB"
        max_idle_cpu = "2s"
        sample_interval = "250ms"
        nice = 10
        [sandbox.rlimits]
        address_space = "unlimited"
        "#,
    )
    .unwrap();
    assert_eq!(config.max_helper_memory, SizeLimit::Unlimited);
    assert_eq!(config.memory_budget, MemoryBudget::Bytes(ByteSize::gib(2)));
    assert_eq!(config.max_idle_cpu, TimeLimit::Time(Duration::from_secs(2)));
    assert_eq!(config.sandbox.rlimits.address_space, SizeLimit::Unlimited);
    let defaults = Config::from_toml("program = \"/bin/true\"").unwrap();
    assert_eq!(
        defaults.sandbox.rlimits.address_space,
        SizeLimit::Bytes(sandpool::DEFAULT_ADDRESS_SPACE)
    );
    assert_eq!(defaults.memory_budget, MemoryBudget::Auto);
    for (text, field) in [
        ("max_helper_memory = \"lots\"", "toml"),
        ("max_idle_cpu = \"0s\"", "max_idle_cpu"),
        ("sample_interval = \"1ms\"", "sample_interval"),
        ("nice = -5", "nice"),
        ("memory_budget = \"1KiB\"", "memory_budget"),
    ] {
        let err = Config::from_toml(&format!("program = \"/bin/true\"\n{text}")).unwrap_err();
        assert_eq!(err.field, field, "{text}: {err}");
    }
}
