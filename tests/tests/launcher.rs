//! The launcher process under attack: SIGKILLed while launches are in
//! flight, and while idle. Every launch either succeeds (on the one retry)
//! or fails with the typed `LauncherLost`; afterwards launches keep
//! succeeding, exactly one launcher is alive, and no helper, zombie or fd is
//! left behind. Every helper is this process's own child.
//!
//! Its own binary: the tests count this process's children and fds.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::{Rng, SeedableRng};
use sandpool::{LaunchError, Launcher};
use sandpool_reference_helper::reference::{OP_ECHO, request};
use sandpool_tests::{children, config, deadline, open_fds, wait_for};

/// The tests count this process's children: one at a time.
static SERIAL: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// The parent pid of `pid`, from `/proc/PID/stat`.
fn ppid(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn kill_launcher(launcher: &Launcher) -> u32 {
    let mut pid = None;
    assert!(
        wait_for(Duration::from_secs(5), || {
            pid = launcher.launcher_pid();
            pid.is_some()
        }),
        "a launcher runs"
    );
    let pid = pid.unwrap();
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    pid
}

#[test]
fn killing_the_launcher_mid_launch_loses_nothing_and_leaves_nothing() {
    let _serial = SERIAL.lock();
    let fds_before = open_fds();
    let launcher = Arc::new(Launcher::new(config(&[])).unwrap());
    let me = std::process::id();
    let stop = Arc::new(AtomicBool::new(false));
    let launched = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let (launcher, stop, launched) = (
                Arc::clone(&launcher),
                Arc::clone(&stop),
                Arc::clone(&launched),
            );
            std::thread::spawn(move || {
                let mut lost = 0;
                while !stop.load(Ordering::Relaxed) {
                    match launcher.launch() {
                        Ok(helper) => {
                            assert_eq!(ppid(helper.pid()), me, "the helper is the host's child");
                            let reply = helper.call(&request(OP_ECHO, b"hi"), deadline(5.0));
                            assert_eq!(reply.unwrap(), b"hi");
                            launched.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(LaunchError::LauncherLost { .. }) => lost += 1,
                        Err(other) => panic!("a launch failed with {other:?}"),
                    }
                }
                lost
            })
        })
        .collect();

    let mut rng = rand::rngs::SmallRng::seed_from_u64(12);
    let kills = 8;
    let mut killed = Vec::new();
    for _ in 0..kills {
        let before = launched.load(Ordering::Relaxed);
        // Launches are in flight: wait until some complete after the last
        // restart, then kill at a random moment.
        assert!(wait_for(Duration::from_secs(10), || launched
            .load(Ordering::Relaxed)
            >= before + 3));
        std::thread::sleep(Duration::from_micros(rng.random_range(0..3000)));
        killed.push(kill_launcher(&launcher));
    }
    let before = launched.load(Ordering::Relaxed);
    assert!(
        wait_for(Duration::from_secs(10), || launched.load(Ordering::Relaxed)
            >= before + 3),
        "launches go on after the last kill"
    );
    stop.store(true, Ordering::Relaxed);
    let lost: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    // A launch fails only if its retry lost a launcher too; with one kill
    // at a time at most a few can.
    assert!(lost <= kills, "{lost} launches lost their launcher twice");
    assert_eq!(
        launcher.launcher_restarts(),
        kills as u64,
        "each kill is noticed, and replaced, once"
    );

    // 100 more launches, all fine.
    for _ in 0..100 {
        let helper = launcher.launch().unwrap();
        assert_eq!(
            helper
                .call(&request(OP_ECHO, b"ok"), deadline(5.0))
                .unwrap(),
            b"ok"
        );
    }
    // Every helper is gone (dropped: killed and reaped), every killed
    // launcher reaped: the only child is the one live launcher.
    let live = launcher.launcher_pid().unwrap();
    assert!(!killed.contains(&live));
    let only_launcher = || {
        children()
            .into_iter()
            .map(|(pid, _)| pid)
            .collect::<Vec<_>>()
            == [live]
    };
    assert!(
        wait_for(Duration::from_secs(5), only_launcher),
        "no helper, zombie or second launcher: {:?} (launcher {live})",
        children()
    );
    drop(launcher);
    assert!(wait_for(Duration::from_secs(5), || children().is_empty()));
    assert_eq!(open_fds(), fds_before, "no fd leaked");
}

#[test]
fn an_idle_launchers_death_is_replaced_at_the_next_launch_without_an_error() {
    let _serial = SERIAL.lock();
    let launcher = Launcher::new(config(&[])).unwrap();
    let first = kill_launcher(&launcher);
    assert!(wait_for(Duration::from_secs(5), || launcher
        .launcher_pid()
        .is_none()));
    let helper = launcher.launch().unwrap();
    assert_eq!(
        helper
            .call(&request(OP_ECHO, b"again"), deadline(5.0))
            .unwrap(),
        b"again"
    );
    assert_eq!(launcher.launcher_restarts(), 1);
    let second = launcher.launcher_pid().unwrap();
    assert_ne!(first, second);
}

#[test]
fn a_seccomp_kill_through_the_launcher_is_reaped_as_sigsys_by_the_host() {
    let _serial = SERIAL.lock();
    let launcher = Launcher::new(config(&["--test-ops"])).unwrap();
    let helper = launcher.launch().unwrap();
    assert_eq!(ppid(helper.pid()), std::process::id());
    let err = helper
        .call(
            &request(
                sandpool_reference_helper::reference::OP_OPEN,
                b"/etc/passwd",
            ),
            deadline(5.0),
        )
        .unwrap_err();
    assert!(err.is_seccomp_kill(), "{err:?}");
}
