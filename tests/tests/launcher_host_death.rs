//! The host's death ends its launcher: a child process of this test acts as
//! the host (this same test binary, re-run with `SANDPOOL_TEST_HOST_CHILD`),
//! starts a launcher and a helper, and is SIGKILLed. This test is a child
//! subreaper, so the orphaned launcher and helper become its children: the
//! launcher exits cleanly at end of file on its sockets (code 0, not killed)
//! and the helper at end of file on its stdin.
//!
//! Its own binary: it makes this process a subreaper.
#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)] // runs this test binary again as the host, on purpose

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use sandpool::Launcher;
use sandpool_tests::config;

const CHILD_ENV: &str = "SANDPOOL_TEST_HOST_CHILD";

/// Reaps `pid` (a child of this process, by adoption), waiting up to
/// `timeout`.
fn reap(pid: u32, timeout: Duration) -> WaitStatus {
    let until = Instant::now() + timeout;
    loop {
        match waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)).unwrap() {
            WaitStatus::StillAlive if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(2));
            }
            status => return status,
        }
    }
}

#[test]
fn the_hosts_death_ends_its_launcher_and_helpers() {
    if std::env::var_os(CHILD_ENV).is_some() {
        // The host: a launcher, a helper, and then nothing until killed.
        let launcher = Launcher::new(config(&[])).unwrap();
        let helper = launcher.launch().unwrap();
        println!(
            "launcher={} helper={}",
            launcher.launcher_pid().unwrap(),
            helper.pid()
        );
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let mut host = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "the_hosts_death_ends_its_launcher_and_helpers",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut stdout = BufReader::new(host.stdout.take().unwrap());
    loop {
        line.clear();
        assert_ne!(
            stdout.read_line(&mut line).unwrap(),
            0,
            "the host printed its pids"
        );
        if line.starts_with("launcher=") {
            break;
        }
    }
    let pids: Vec<u32> = line
        .split_whitespace()
        .map(|field| field.split('=').nth(1).unwrap().parse().unwrap())
        .collect();
    let (launcher, helper) = (pids[0], pids[1]);
    host.kill().unwrap();
    host.wait().unwrap();

    assert_eq!(
        reap(launcher, Duration::from_secs(10)),
        WaitStatus::Exited(Pid::from_raw(launcher as i32), 0),
        "the launcher exits by itself at end of file"
    );
    match reap(helper, Duration::from_secs(10)) {
        WaitStatus::Exited(..) => {}
        other => panic!("the helper exits by itself at end of file on stdin: {other:?}"),
    }
}
