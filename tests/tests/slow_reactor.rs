//! Facts that hold however late the reactor runs: its own test binary, so
//! that the only sandpool reactor in the process is the running test's
//! (the tests take turns), which the test slows down (the lowest
//! scheduling class, on the test thread's CPU, so that it runs only when
//! the test thread leaves it the CPU) or keeps from running for a while (a
//! real-time thread holding its CPU).
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sandpool::{CallError, Launcher, Pool};
use sandpool_reference_helper::reference::*;
use sandpool_tests::{config, deadline, pool_config, process_exists, serial, threads_named};

/// Pins this thread and the only reactor to CPU 0, the reactor in
/// SCHED_IDLE: it runs when this thread leaves the CPU to it.
fn slow_reactor() {
    // A new thread takes its name once it runs.
    assert!(
        sandpool_tests::wait_for(Duration::from_secs(10), || threads_named("sandpool-reacto")
            .len()
            == 1),
        "one reactor: {:?}",
        threads_named("sandpool-reacto")
    );
    let reactors = threads_named("sandpool-reacto");
    let me = nix::unistd::gettid().as_raw() as u32;
    pin_to_cpu0(me);
    pin_to_cpu0(reactors[0]);
    // SCHED_IDLE (util-linux's chrt, no unsafe here).
    #[allow(clippy::disallowed_methods)] // a system tool, not a helper
    let status = std::process::Command::new("chrt")
        .args(["--idle", "-p", "0", &reactors[0].to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "chrt --idle: {status}");
}

fn pin_to_cpu0(tid: u32) {
    pin_to_cpu(tid, 0);
}

fn pin_to_cpu(tid: u32, cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid as i32), &set).unwrap();
}

/// A short call queued behind a long one. The long call is async, so the
/// reactor holds the reading, with its hang-rule timer set for the long
/// call's 30 s. The short call's caller spins reading what arrives; when it
/// reads the long call's reply, the short call becomes the front, overdue
/// about 300 ms later. The reactor must hear of that, or the hung helper
/// goes on running (and holding its tenant's calls) until the timer set for
/// the long call.
#[test]
fn a_waiter_that_moves_the_front_of_the_table_gets_the_helper_judged() {
    let _serial = serial();
    for round in 0..5 {
        let mut cfg = config(&["--test-ops"]);
        cfg.spin_wait = Duration::from_millis(10);
        let helper = Arc::new(Launcher::new(cfg).unwrap().launch().unwrap());
        slow_reactor();
        let pid = helper.pid();
        let long = {
            let helper = helper.clone();
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap()
                    .block_on(helper.call_async(&sleep_request(100, b"long"), deadline(30.0)))
            })
        };
        // The short call's caller spins from 5 ms before the long call's
        // reply is due until 5 ms after.
        assert!(sandpool_tests::wait_for(Duration::from_secs(10), || {
            helper.in_flight() == 1
        }));
        std::thread::sleep(Duration::from_millis(95));
        let hung = helper.call(&sleep_request(60_000, b"hung"), deadline(0.3));
        // Its turn started a few milliseconds after the call: the caller
        // leaves at its deadline, the helper is overdue a moment later.
        assert!(
            matches!(
                hung,
                Err(CallError::QueueTimeout { .. } | CallError::Timeout { .. })
            ),
            "round {round}: {hung:?}"
        );
        assert_eq!(long.join().unwrap().unwrap(), b"long");
        assert!(
            sandpool_tests::wait_for(Duration::from_secs(5), || !process_exists(pid)),
            "round {round}: the hung helper was killed at its overdue moment, not at the \
             long call's 30 s"
        );
        assert!(helper.is_retired());
        drop(helper);
        assert!(
            sandpool_tests::wait_for(Duration::from_secs(5), || threads_named("sandpool-reacto")
                .is_empty()),
            "the launcher's reactor ended"
        );
    }
}

/// A new helper's registration is queued without waking the reactor, and
/// its first calls read their own replies: a pool can stop before its
/// reactor ever took the helper. What the helper wrote to stderr must
/// still be forwarded (the reactor takes what is queued before its last
/// pump). Here the reactor cannot run at all from before the call until
/// the pool has told it to stop: a real-time thread holds its CPU.
#[test]
fn stderr_of_a_helper_the_reactor_never_took_is_forwarded_at_stop() {
    let _serial = serial();
    let log = sandpool_tests::captured_log();
    for round in 0..5 {
        let mut cfg = pool_config(&["--test-ops"]);
        cfg.spares = 0;
        let pool = Pool::new(cfg).unwrap();
        slow_reactor();
        // This thread on the other CPU; CPU 0 held by a SCHED_FIFO spinner
        // until 100 ms after the pool is dropped.
        pin_to_cpu(nix::unistd::gettid().as_raw() as u32, 1);
        let release = Arc::new(Mutex::new(None::<std::time::Instant>));
        let hog = {
            let release = release.clone();
            let (ready, started) = std::sync::mpsc::channel();
            let hog = std::thread::spawn(move || {
                pin_to_cpu0(nix::unistd::gettid().as_raw() as u32);
                ready.send(nix::unistd::gettid().as_raw()).unwrap();
                loop {
                    if release
                        .lock()
                        .unwrap()
                        .is_some_and(|at| at.elapsed() > Duration::from_millis(100))
                    {
                        break;
                    }
                    std::hint::spin_loop();
                }
            });
            let tid = started.recv().unwrap();
            #[allow(clippy::disallowed_methods)] // a system tool, not a helper
            let status = std::process::Command::new("chrt")
                .args(["--fifo", "-p", "1", &tid.to_string()])
                .status()
                .unwrap();
            assert!(status.success(), "chrt --fifo: {status}");
            hog
        };
        let marker = format!("stop-marker-{round}-end");
        pool.call("t", &request(OP_STDERR, format!("{marker}\n").as_bytes()))
            .unwrap();
        *release.lock().unwrap() = Some(std::time::Instant::now());
        drop(pool);
        hog.join().unwrap();
        assert!(
            log.text().contains(&marker),
            "round {round}: {marker} not forwarded"
        );
    }
}
