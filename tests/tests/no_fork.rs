//! Proof that launching a helper never forks the host.
//!
//! A thread of this test installs seccomp filters on itself that make every
//! fork-like syscall fail: `fork`, and `clone` without `CLONE_VM` (a copy of
//! the address space), both with EPERM. `clone3` returns ENOSYS so glibc falls
//! back to `clone`, whose flags the filter can see. Under those filters a
//! fork-based spawn (std's `Command` with a uid set, which std implements with
//! fork) must fail, and the sandpool launch must still succeed: it used
//! `clone(CLONE_VM | CLONE_VFORK)`, i.e. posix_spawn, and never copied the host.
//! The launcher process, started from the filtered thread, inherits the
//! filters: its threads and its helper spawns pass them too.
#![allow(clippy::disallowed_methods)] // the fork-path control spawns with std Command on purpose
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use sandpool::{LaunchMode, Launcher};
use sandpool_reference_helper::reference::{OP_ECHO, request};
use sandpool_tests::{config, deadline};
use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

fn install(rules: BTreeMap<i64, Vec<SeccompRule>>, on_match: SeccompAction) {
    let arch = std::env::consts::ARCH.try_into().unwrap();
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, on_match, arch).unwrap();
    let program: seccompiler::BpfProgram = filter.try_into().unwrap();
    seccompiler::apply_filter(&program).unwrap();
}

#[test]
fn launch_uses_vfork_semantics_never_fork() {
    std::thread::spawn(|| {
        install(
            BTreeMap::from([(libc::SYS_clone3, vec![])]),
            SeccompAction::Errno(libc::ENOSYS as u32),
        );
        let no_vm = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(libc::CLONE_VM as u64),
            0,
        )
        .unwrap();
        install(
            BTreeMap::from([
                (libc::SYS_fork, vec![]),
                (
                    libc::SYS_clone,
                    vec![SeccompRule::new(vec![no_vm]).unwrap()],
                ),
            ]),
            SeccompAction::Errno(libc::EPERM as u32),
        );

        // Control: std's fork path is caught by the filter.
        let uid = nix::unistd::getuid().as_raw();
        let forked = std::os::unix::process::CommandExt::uid(
            &mut std::process::Command::new("/bin/true"),
            uid,
        )
        .status();
        let err = forked.expect_err("a fork-based spawn must fail under the no-fork filter");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");

        // The sandpool launch goes through, both ways. The launcher process
        // is started from this thread, so it runs under the same filters
        // (they are inherited across its exec): its own threads and its
        // helper spawns are clone(CLONE_VM) too, or they would fail here.
        for mode in [LaunchMode::Launcher, LaunchMode::Direct] {
            let mut cfg = config(&[]);
            cfg.launch_mode = mode;
            let launcher = Launcher::new(cfg).unwrap();
            assert_eq!(
                launcher.launcher_pid().is_some(),
                mode == LaunchMode::Launcher
            );
            for _ in 0..3 {
                let helper = launcher.launch().unwrap();
                assert_eq!(
                    helper
                        .call(&request(OP_ECHO, b"no fork"), deadline(5.0))
                        .unwrap(),
                    b"no fork"
                );
            }
            assert_eq!(
                launcher.launcher_restarts(),
                0,
                "{mode:?}: the launcher never died"
            );
        }
    })
    .join()
    .unwrap();
}
