//! Waiting callers read what has arrived: its own test binary, so that the
//! only sandpool reactor in the process is this test's, which the test
//! slows down (the lowest scheduling class, on the waiter's CPU) so that a
//! waiting caller, not the reactor, reads a reply that moves the front of
//! the call table.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use sandpool::{CallError, Launcher};
use sandpool_reference_helper::reference::*;
use sandpool_tests::{config, deadline, process_exists, threads_named};

fn pin_to_cpu0(tid: u32) {
    let mut set = nix::sched::CpuSet::new();
    set.set(0).unwrap();
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
    for round in 0..5 {
        let mut cfg = config(&["--test-ops"]);
        cfg.spin_wait = Duration::from_millis(10);
        let helper = Arc::new(Launcher::new(cfg).unwrap().launch().unwrap());
        let reactors = threads_named("sandpool-reacto");
        assert_eq!(reactors.len(), 1, "one launcher, one reactor: {reactors:?}");
        // The reactor runs only when this thread leaves CPU 0 to it.
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
