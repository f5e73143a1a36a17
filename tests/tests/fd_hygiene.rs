//! fd hygiene with a host that leaks and has grown large: 10,000 fds
//! without CLOEXEC, 9,000 with it, and a secret file. Launched directly
//! (posix_spawn from the host), the helper inherits every leaked fd and
//! closes them itself before its Hello. Launched through the launcher
//! process (the default), the launcher inherited them when it started and
//! closed them with its first `close_range`: its own table holds only
//! /dev/null, its sockets and the pinned image, and the helper inherits
//! nothing (its Hello reports 0 fds closed), also for fds the host opened
//! after the launcher started. Either way the kernel's view of the helper's
//! fd table is 0, 1, 2, it cannot read the secret, and afterwards the host
//! has exactly the fds and children it had before.
//!
//! One test in its own binary: it changes this process's fd table and
//! RLIMIT_NOFILE, which would disturb tests running beside it.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use sandpool::{CallError, LaunchMode, Launcher, SeccompMode};
use sandpool_reference_helper::reference::*;
use sandpool_tests::{children, config, deadline, fds_of, open_fds};

const LEAKED: usize = 10_000;
const CLOEXEC: usize = 9_000;

/// What each of a launcher's fds is, from `/proc/PID/fd`.
fn launcher_fds(pid: u32) -> Vec<(i32, String)> {
    fds_of(pid)
        .into_iter()
        .map(|fd| {
            let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
            (fd, target.display().to_string())
        })
        .collect()
}

#[test]
fn helper_closes_ten_thousand_inherited_fds_and_cannot_read_the_secret() {
    let fds_before = open_fds();
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let want = ((LEAKED + CLOEXEC) as u64 + 1000).min(hard);
    assert!(
        want >= (LEAKED + CLOEXEC) as u64 + 100,
        "hard RLIMIT_NOFILE {hard} is too low for this test"
    );
    setrlimit(Resource::RLIMIT_NOFILE, want.max(soft), hard).unwrap();

    let dir = std::env::temp_dir().join(format!("sandpool-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret_path = dir.join("secret");
    std::fs::File::create(&secret_path)
        .unwrap()
        .write_all(b"tenant A's password")
        .unwrap();
    let secret: OwnedFd = std::fs::File::open(&secret_path).unwrap().into();
    // std opens with O_CLOEXEC; make it leak like a careless host's would.
    fcntl(&secret, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    let devnull: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    let leaked: Vec<OwnedFd> = (0..LEAKED)
        .map(|_| nix::unistd::dup(&devnull).unwrap())
        .collect();
    for fd in leaked.iter().take(3) {
        let flags = fcntl(fd, FcntlArg::F_GETFD).unwrap();
        assert_eq!(flags & libc::FD_CLOEXEC, 0, "dup'd fds do not have CLOEXEC");
    }
    let cloexec: Vec<OwnedFd> = (0..CLOEXEC / 2)
        .map(|_| std::fs::File::open("/dev/null").unwrap().into())
        .collect();

    for mode in [LaunchMode::Direct, LaunchMode::Launcher] {
        let mut cfg = config(&["--test-ops"]);
        cfg.launch_mode = mode;
        let launcher = Launcher::new(cfg).unwrap();
        // The host grows after the launcher started, as a server does.
        let later: Vec<OwnedFd> = (0..CLOEXEC / 2)
            .map(|_| std::fs::File::open("/dev/null").unwrap().into())
            .collect();
        let later_leaked = nix::unistd::dup(&devnull).unwrap();
        check(&launcher, mode, &secret_path, &secret);
        drop((later, later_leaked));
    }

    drop(cloexec);
    drop(leaked);
    drop(devnull);
    drop(secret);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        open_fds(),
        fds_before,
        "the host has exactly the fds it had before"
    );
    assert_eq!(children(), vec![], "no helper, launcher or zombie is left");
}

fn check(launcher: &Launcher, mode: LaunchMode, secret_path: &std::path::Path, secret: &OwnedFd) {
    let helper = launcher.launch().unwrap();
    let hello = helper.hello().clone();
    match mode {
        LaunchMode::Direct => {
            assert_eq!(launcher.launcher_pid(), None);
            // Inherited: the 10,000 dups, the one made later and the
            // secret. The CLOEXEC fds do not cross; whatever the test runner
            // leaked into this process crosses too, hence at least.
            assert!(
                hello.fds_closed as usize > LEAKED,
                "direct: helper reports {} inherited fds closed",
                hello.fds_closed
            );
        }
        _ => {
            // Nothing reached the helper: not the leaks from before the
            // launcher started (it closed them), nor the one after (never
            // in its table).
            assert_eq!(
                hello.fds_closed, 0,
                "launcher: the helper inherited fds beyond 0, 1, 2"
            );
            let pid = launcher.launcher_pid().expect("a launcher process runs");
            let fds = launcher_fds(pid);
            let numbers: Vec<i32> = fds.iter().map(|(fd, _)| *fd).collect();
            assert_eq!(
                numbers,
                (0..fds.len() as i32).collect::<Vec<_>>(),
                "the launcher's table is dense from 0: {fds:?}"
            );
            for (fd, target) in &fds {
                let expected = match fd {
                    0..=2 => target == "/dev/null",
                    _ if *fd == fds.len() as i32 - 1 => {
                        target.starts_with("/memfd:sandpool-helper-image")
                    }
                    _ => target.starts_with("socket:["),
                };
                assert!(expected, "launcher fd {fd} is {target}: {fds:?}");
            }
            assert!(fds.len() >= 6, "at least 2 sockets: {fds:?}");
        }
    }
    // The kernel's view, independently of the Hello and of the launcher's own check.
    assert_eq!(
        fds_of(helper.pid()).into_iter().collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", helper.pid())).unwrap();
    assert!(status.contains("Seccomp:\t2"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");

    // The secret by path: open is outside the policy, so the helper dies.
    let path = secret_path.to_str().unwrap().as_bytes();
    let err = helper
        .call(&request(OP_OPEN, path), deadline(5.0))
        .unwrap_err();
    assert!(err.is_seccomp_kill(), "{err:?}");

    // Even with seccomp explicitly off, the inherited secret fd is gone: its
    // /proc/self/fd entry does not exist in the helper.
    let mut cfg = config(&["--test-ops"]);
    cfg.sandbox.seccomp = SeccompMode::Off;
    cfg.launch_mode = mode;
    let unfiltered = Launcher::new(cfg).unwrap().launch().unwrap();
    let by_fd = format!("/proc/self/fd/{}", secret.as_raw_fd());
    match unfiltered.call(&request(OP_OPEN, by_fd.as_bytes()), deadline(5.0)) {
        Err(CallError::Helper(message)) => assert!(message.contains("No such file"), "{message}"),
        other => panic!("the secret fd must be closed in the helper, got {other:?}"),
    }
    assert_eq!(
        unfiltered
            .call(&request(OP_ECHO, b"alive"), deadline(5.0))
            .unwrap(),
        b"alive"
    );
    unfiltered.shutdown(Duration::from_secs(5));
}
