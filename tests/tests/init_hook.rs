//! The runtime's init hook: a library sets itself up after the inherited
//! fds are closed and before no_new_privs and seccomp (here: a seed read
//! from /dev/urandom), and then runs under the enforcing filter; an init
//! that keeps an fd open undeclared fails the start-up rather than the
//! host's check; a declared kept fd is reported, allowed only as the host's
//! `sandbox.kept_fds` says, checked against the kernel, and readable under
//! the filter.
#![allow(clippy::unwrap_used)]

use sandpool::{ExitStatus, FdAccess, HelloRefusal, KeptFd, KeptFdRule, LaunchError, Launcher};
use sandpool_reference_helper::reference::*;
use sandpool_tests::{config, deadline, fds_of};

/// After the init, the filter is in force: an open is a kill.
fn open_is_a_kill(helper: &sandpool::Helper) {
    let err = helper
        .call(&request(OP_OPEN, b"/dev/urandom"), deadline(5.0))
        .unwrap_err();
    assert!(err.is_seccomp_kill(), "{err:?}");
}

#[test]
fn an_init_hook_opens_what_it_needs_before_the_filter_and_closes_it() {
    let launcher = Launcher::new(config(&["--test-ops", "--init", "urandom"])).unwrap();
    let helper = launcher.launch().unwrap();
    // The host verified the Hello, fd table included: the init closed its file.
    assert_eq!(
        fds_of(helper.pid()).into_iter().collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let seed = helper.call(&request(OP_SEED, b""), deadline(5.0)).unwrap();
    assert_eq!(seed.len(), 16);
    assert!(seed.iter().any(|b| *b != 0), "a real seed: {seed:?}");
    // After the init, the filter is in force: the same open is a kill.
    open_is_a_kill(&helper);
}

#[test]
fn an_init_hook_that_keeps_an_fd_fails_the_start_up() {
    let launcher = Launcher::new(config(&["--init", "keep-fd"])).unwrap();
    match launcher.launch() {
        Err(LaunchError::ExitedBeforeHello { status, stderr, .. }) => {
            assert_eq!(status, ExitStatus::Exited(70), "{stderr}");
            assert!(stderr.contains("init hook left 1 fds open"), "{stderr}");
        }
        other => panic!("expected a start-up failure, got {other:?}"),
    }
}

#[test]
fn the_c_runtime_runs_the_init_hook_at_the_same_point() {
    let mut cfg = config(&["--test-ops", "--init-urandom"]);
    cfg.program = sandpool_tests::c_helper_bin();
    let helper = Launcher::new(cfg).unwrap().launch().unwrap();
    let seed = helper.call(&request(OP_SEED, b""), deadline(5.0)).unwrap();
    assert_eq!(seed.len(), 16);
    assert!(seed.iter().any(|b| *b != 0), "{seed:?}");
    open_is_a_kill(&helper);
}

/// The reference helper with `--init NAME`, allowed to keep `rules` open.
fn keeping(args: &[&str], rules: &[(&str, bool)]) -> sandpool::HelperConfig {
    let mut cfg = config(args);
    cfg.sandbox.kept_fds = rules
        .iter()
        .map(|(path, write)| KeptFdRule {
            path: path.into(),
            write: *write,
        })
        .collect();
    cfg
}

fn refusal(cfg: sandpool::HelperConfig) -> HelloRefusal {
    match Launcher::new(cfg).unwrap().launch() {
        Err(LaunchError::HelloRefused { refusal, .. }) => refusal,
        other => panic!("expected a refused Hello, got {other:?}"),
    }
}

#[test]
fn a_declared_kept_fd_is_reported_checked_and_readable_under_the_filter() {
    let cfg = keeping(
        &["--test-ops", "--init", "keep-urandom"],
        &[("/dev/urandom", false)],
    );
    let helper = Launcher::new(cfg).unwrap().launch().unwrap();
    assert_eq!(
        helper.hello().kept_fds,
        vec![KeptFd {
            fd: 3,
            access: FdAccess::Read,
            path: b"/dev/urandom".to_vec(),
        }]
    );
    assert_eq!(
        fds_of(helper.pid()).into_iter().collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    // Read now, under the enforcing filter, from the kept fd: fresh bytes.
    let first = helper.call(&request(OP_SEED, b""), deadline(5.0)).unwrap();
    let second = helper.call(&request(OP_SEED, b""), deadline(5.0)).unwrap();
    assert_eq!((first.len(), second.len()), (16, 16));
    assert_ne!(first, second, "two reads of /dev/urandom");
    // Keeping a file does not open the file system: open is still a kill.
    open_is_a_kill(&helper);
}

#[test]
fn a_directory_entry_allows_the_files_under_it() {
    let cfg = keeping(&["--init", "keep-urandom"], &[("/dev/", false)]);
    let helper = Launcher::new(cfg).unwrap().launch().unwrap();
    assert_eq!(helper.hello().kept_fds.len(), 1);
    // "/dev" without the slash is one file, not a directory's contents.
    let refused = refusal(keeping(&["--init", "keep-urandom"], &[("/dev", false)]));
    assert!(
        matches!(&refused, HelloRefusal::KeptFdNotAllowed { fd: 3, path, access: "read" } if path == "/dev/urandom"),
        "{refused:?}"
    );
}

#[test]
fn a_kept_fd_the_configuration_does_not_allow_is_refused_by_name() {
    // The default allows none.
    let refused = refusal(config(&["--init", "keep-urandom"]));
    assert!(
        matches!(&refused, HelloRefusal::KeptFdNotAllowed { path, .. } if path == "/dev/urandom"),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("/dev/urandom"), "{refused}");
    // Another file allowed is not this one.
    let refused = refusal(keeping(
        &["--init", "keep-urandom"],
        &[("/dev/zero", false)],
    ));
    assert!(
        matches!(refused, HelloRefusal::KeptFdNotAllowed { .. }),
        "{refused:?}"
    );
    // Read-write needs `write = true`.
    let refused = refusal(keeping(
        &["--init", "keep-null-rw"],
        &[("/dev/null", false)],
    ));
    assert!(
        matches!(
            refused,
            HelloRefusal::KeptFdNotAllowed {
                access: "read-write",
                ..
            }
        ),
        "{refused:?}"
    );
    let helper = Launcher::new(keeping(&["--init", "keep-null-rw"], &[("/dev/null", true)]))
        .unwrap()
        .launch()
        .unwrap();
    assert_eq!(helper.hello().kept_fds[0].access, FdAccess::ReadWrite);
}

/// What the Hello declared and what the kernel shows of fd 3, from a
/// `KeptFdMismatch` (any other refusal fails the test).
fn mismatch_on_fd_3(refused: &HelloRefusal) -> (&str, &str) {
    match refused {
        HelloRefusal::KeptFdMismatch {
            fd: 3,
            declared,
            kernel,
        } => (declared.as_str(), kernel.as_str()),
        other => panic!("expected a mismatch on fd 3, got {other:?}"),
    }
}

#[test]
fn a_helper_that_lies_about_a_kept_fd_is_caught_by_the_kernel_view() {
    // Says its fd 3 is /dev/zero (allowed); the kernel says /dev/urandom.
    let refused = refusal(keeping(
        &["--misbehave", "lie-kept-path"],
        &[("/dev/zero", false), ("/dev/urandom", false)],
    ));
    assert_eq!(mismatch_on_fd_3(&refused), ("/dev/zero", "/dev/urandom"));
    // Says its read-write fd is read-only (so a read-only entry would pass).
    let refused = refusal(keeping(
        &["--misbehave", "lie-kept-access"],
        &[("/dev/null", false)],
    ));
    assert_eq!(mismatch_on_fd_3(&refused), ("read", "read-write"));
}

#[test]
fn the_c_runtime_declares_kept_fds_the_same_way() {
    let mut cfg = keeping(
        &["--test-ops", "--keep-urandom"],
        &[("/dev/urandom", false)],
    );
    cfg.program = sandpool_tests::c_helper_bin();
    let helper = Launcher::new(cfg.clone()).unwrap().launch().unwrap();
    assert_eq!(helper.hello().kept_fds.len(), 1);
    assert_eq!(helper.hello().kept_fds[0].path, b"/dev/urandom");
    let first = helper.call(&request(OP_SEED, b""), deadline(5.0)).unwrap();
    let second = helper.call(&request(OP_SEED, b""), deadline(5.0)).unwrap();
    assert_eq!(first.len(), 16);
    assert_ne!(first, second);
    // Without the host's allowance, the same helper is refused.
    cfg.sandbox.kept_fds.clear();
    assert!(matches!(
        refusal(cfg),
        HelloRefusal::KeptFdNotAllowed { .. }
    ));
}

#[test]
fn kept_fd_entries_must_be_absolute_and_normalised() {
    for bad in [
        "dev/urandom",
        "/dev/../etc/shadow",
        "/dev//urandom",
        "/dev/./urandom",
        "",
    ] {
        let cfg = keeping(&[], &[(bad, false)]);
        let err = cfg.validate().unwrap_err();
        assert_eq!(err.field, "sandbox.kept_fds", "{bad:?}: {err}");
    }
    for good in ["/dev/urandom", "/usr/share/zoneinfo/"] {
        keeping(&[], &[(good, false)]).validate().unwrap();
    }
    // "/" would allow every file there is.
    let err = keeping(&[], &[("/", false)]).validate().unwrap_err();
    assert!(err.to_string().contains("allows every file"), "{err}");
    // With kept fds, no extra syscall may make or place an fd: a tenant
    // could close a kept fd and put a socket or another file at its number.
    for name in ["dup2", "socket", "recvmsg", "memfd_create", "openat"] {
        let mut cfg = keeping(&[], &[("/dev/urandom", false)]);
        cfg.sandbox.extra_syscalls = vec![name.into()];
        let err = cfg.validate().unwrap_err();
        assert_eq!(err.field, "sandbox.extra_syscalls", "{name}: {err}");
        cfg.sandbox.kept_fds.clear();
        cfg.validate().unwrap();
    }
}

#[test]
fn a_helper_with_a_second_thread_is_refused() {
    // /proc/PID/fd is the main thread's fd table only: a thread made
    // without CLONE_FILES, or one blocked in recvmsg, holds fds it misses.
    let refused = refusal(config(&["--misbehave", "thread-in-init"]));
    assert!(
        matches!(&refused, HelloRefusal::KernelDisagrees { field: "Threads", kernel, .. } if kernel == "2"),
        "{refused:?}"
    );
}

#[test]
fn a_kept_fd_named_like_an_allowed_file_in_another_mount_namespace_is_refused() {
    // The init hook bind-mounts /dev/zero over /dev/urandom in a mount
    // namespace of its own and keeps "/dev/urandom": /proc names the fd as
    // allowed; the host compares the file itself (device and inode).
    let cfg = keeping(
        &["--misbehave", "kept-other-ns"],
        &[("/dev/urandom", false)],
    );
    match Launcher::new(cfg).unwrap().launch() {
        Err(LaunchError::HelloRefused {
            refusal: HelloRefusal::KeptFdMismatch { kernel, .. },
            ..
        }) => assert!(kernel.contains("another file"), "{kernel}"),
        // Where user namespaces are off, the attack cannot be made at all.
        Err(LaunchError::ExitedBeforeHello { stderr, .. }) if stderr.contains("EPERM") => {
            eprintln!("user namespaces unavailable here: {stderr}");
        }
        other => panic!("expected the kept fd refused, got {other:?}"),
    }
}
