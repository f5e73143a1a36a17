//! The runtime's init hook: a library sets itself up after the inherited
//! fds are closed and before no_new_privs and seccomp (here: a seed read
//! from /dev/urandom), and then runs under the enforcing filter; an init
//! that keeps an fd open fails the start-up rather than the host's check.
#![allow(clippy::unwrap_used)]

use sandpool::{ExitStatus, LaunchError, Launcher};
use sandpool_helper::reference::*;
use sandpool_tests::{config, deadline, fds_of};

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
    let err = helper
        .call(&request(OP_OPEN, b"/dev/urandom"), deadline(5.0))
        .unwrap_err();
    assert!(err.is_seccomp_kill(), "{err:?}");
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
    let err = helper
        .call(&request(OP_OPEN, b"/dev/urandom"), deadline(5.0))
        .unwrap_err();
    assert!(err.is_seccomp_kill(), "{err:?}");
}
