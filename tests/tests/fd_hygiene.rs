//! fd hygiene with a host that leaks: 10,000 fds without CLOEXEC and a secret
//! file, all inherited by the helper through posix_spawn. The helper closes
//! them itself before its Hello; the kernel's view of its fd table confirms
//! it, and it cannot read the secret. Afterwards the host has exactly the fds
//! and children it had before.
//!
//! One test in its own binary: it changes this process's fd table and
//! RLIMIT_NOFILE, which would disturb tests running beside it.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use sandpool::{CallError, Launcher, SeccompMode};
use sandpool_helper::reference::*;
use sandpool_tests::{children, config, deadline, fds_of, open_fds};

const LEAKED: usize = 10_000;

#[test]
fn helper_closes_ten_thousand_inherited_fds_and_cannot_read_the_secret() {
    let fds_before = open_fds();
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let want = (LEAKED as u64 + 1024).min(hard);
    assert!(
        want >= LEAKED as u64 + 100,
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

    let helper = Launcher::new(config(&["--test-ops"]))
        .unwrap()
        .launch()
        .unwrap();
    let hello = helper.hello().clone();
    // Inherited: the 10,000 dups and the secret. `devnull` itself is CLOEXEC
    // (std opens that way) and does not cross; whatever the test runner
    // leaked into this process crosses too, hence at least.
    assert!(
        hello.fds_closed as usize > LEAKED,
        "helper reports {} inherited fds closed",
        hello.fds_closed
    );
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
    drop(unfiltered);
    drop(helper);

    drop(leaked);
    drop(devnull);
    drop(secret);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        open_fds(),
        fds_before,
        "the host has exactly the fds it had before"
    );
    assert_eq!(children(), vec![], "no helper (or zombie) is left");
}
