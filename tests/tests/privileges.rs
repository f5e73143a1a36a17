//! Privileges, on the real kernel: a helper holds no capability (every set
//! 0 in `/proc/PID/status`, the bounding set too on this root host), runs as
//! `sandbox.user` / `sandbox.group` when configured, is refused when it lies
//! about its capabilities, and dies by SIGSYS for the memory calls the
//! policy's argument rules refuse. Each beside a bystander tenant whose calls
//! keep succeeding. Also: a panic stays an Error frame with `RUST_BACKTRACE`
//! set, and the configuration refuses what the helper would refuse.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sandpool::{CallError, HelloRefusal, LaunchError, LaunchMode, Launcher, Pool};
use sandpool_reference_helper::reference::*;
use sandpool_tests::{config, deadline, helper_bin, pool_config, wait_for};

/// A tenant of its own pool calling echo in a loop while a test runs.
struct Bystander {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl Bystander {
    fn start() -> Bystander {
        let pool = Pool::new(pool_config(&[])).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let (stop2, ok2) = (stop.clone(), ok.clone());
        let thread = std::thread::spawn(move || {
            let mut failures = Vec::new();
            let mut i = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                let body = format!("bystander call {i}");
                match pool.call("bystander", &request(OP_ECHO, body.as_bytes())) {
                    Ok(reply) if reply == body.as_bytes() => {
                        ok2.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failures.push(format!("{other:?}")),
                }
                i += 1;
            }
            failures
        });
        let bystander = Bystander { stop, ok, thread };
        assert!(
            wait_for(Duration::from_secs(10), || bystander.calls() > 5),
            "the bystander gets going"
        );
        bystander
    }

    fn calls(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Checks the bystander went on after `before` calls, with no failure.
    fn finish(self, before: u64) {
        assert!(
            wait_for(Duration::from_secs(10), || self.calls() > before + 5),
            "the bystander kept going"
        );
        self.stop.store(true, Ordering::Relaxed);
        let failures = self.thread.join().unwrap();
        assert!(failures.is_empty(), "bystander calls failed: {failures:?}");
    }
}

/// Runs `test` beside a bystander tenant.
fn beside_a_bystander(test: impl FnOnce()) {
    let bystander = Bystander::start();
    let before = bystander.calls();
    test();
    bystander.finish(before);
}

/// A field of `/proc/PID/status`, trimmed.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

fn cap_mask(pid: u32, name: &str) -> u64 {
    u64::from_str_radix(&status_field(pid, name), 16).unwrap()
}

/// Whether this test process may empty a helper's bounding set: it holds
/// CAP_SETPCAP (bit 8) and is root (the condition the host applies).
fn host_can_drop_bounding() -> bool {
    nix::unistd::geteuid().is_root() && cap_mask(std::process::id(), "CapEff") & (1 << 8) != 0
}

/// uid and gid of `name` in /etc/passwd.
fn passwd_ids(name: &str) -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&name))
                .then(|| (fields[2].parse().unwrap(), fields[3].parse().unwrap()))
        })
        .unwrap_or_else(|| panic!("no {name} in /etc/passwd"))
}

#[test]
fn a_helper_holds_no_capability() {
    beside_a_bystander(|| {
        for mode in [LaunchMode::Launcher, LaunchMode::Direct] {
            a_helper_launched_so_holds_no_capability(mode);
        }
    });
}

/// A helper launched in `mode` holds no capability, and its Hello says so.
fn a_helper_launched_so_holds_no_capability(mode: LaunchMode) {
    {
        let mut pooled = pool_config(&["--test-ops"]);
        pooled.launch_mode = mode;
        let pool = Pool::new(pooled).unwrap();
        assert_eq!(pool.call("t", &request(OP_ECHO, b"hi")).unwrap(), b"hi");
        let pid = pool.helper_info("t").unwrap().pid;
        // The test process itself holds capabilities: the zeros are the
        // helper's doing.
        assert_ne!(
            cap_mask(std::process::id(), "CapEff"),
            0,
            "the host is privileged"
        );
        for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
            assert_eq!(cap_mask(pid, set), 0, "{set} of helper {pid}");
        }
        assert!(host_can_drop_bounding(), "this root host holds CAP_SETPCAP");
        assert_eq!(cap_mask(pid, "CapBnd"), 0, "CapBnd of helper {pid}");
        // No user switch configured: the host's ids.
        let me = status_field(std::process::id(), "Uid");
        assert_eq!(status_field(pid, "Uid"), me);

        // The Hello says the same.
        let mut config = config(&[]);
        config.launch_mode = mode;
        let launcher = Launcher::new(config).unwrap();
        let helper = launcher.launch().unwrap();
        let hello = helper.hello();
        assert!(hello.caps_cleared && hello.bounding_cleared, "{hello:?}");
        assert_eq!(hello.uid, nix::unistd::getuid().as_raw());
    }
}

#[test]
fn a_helper_runs_as_the_configured_user() {
    let (uid, gid) = passwd_ids("nobody");
    assert_ne!(uid, 0);
    beside_a_bystander(|| {
        for (user, group) in [
            (Some("nobody".to_owned()), None),
            (Some(uid.to_string()), Some(gid.to_string())),
        ] {
            let mut config = pool_config(&["--test-ops"]);
            config.sandbox.user = user.clone();
            config.sandbox.group = group;
            let pool = Pool::new(config).unwrap();
            assert_eq!(pool.call("t", &request(OP_ECHO, b"hi")).unwrap(), b"hi");
            let pid = pool.helper_info("t").unwrap().pid;
            assert_eq!(
                status_field(pid, "Uid"),
                format!("{uid}\t{uid}\t{uid}\t{uid}"),
                "{user:?}"
            );
            assert_eq!(
                status_field(pid, "Gid"),
                format!("{gid}\t{gid}\t{gid}\t{gid}")
            );
            assert_eq!(status_field(pid, "Groups"), "", "no supplementary groups");
            for set in ["CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"] {
                assert_eq!(cap_mask(pid, set), 0, "{set}");
            }
            // It keeps serving as that user, panics included.
            let err = pool.call("t", &request(OP_PANIC, b"boom")).unwrap_err();
            assert!(matches!(err, CallError::Helper(_)), "{err:?}");
            assert_eq!(
                pool.call("t", &request(OP_ECHO, b"again")).unwrap(),
                b"again"
            );
            assert_eq!(pool.helper_info("t").unwrap().pid, pid);
        }
        let mut config = config(&[]);
        config.sandbox.user = Some("nobody".into());
        let launcher = Launcher::new(config).unwrap();
        let helper = launcher.launch().unwrap();
        assert_eq!((helper.hello().uid, helper.hello().gid), (uid, gid));
    });
}

#[test]
fn the_launcher_process_hands_its_helpers_an_empty_bounding_set() {
    assert!(host_can_drop_bounding(), "this root host holds CAP_SETPCAP");
    // No user to switch to: the launcher keeps nothing in its bounding set,
    // so a helper exec'd by it starts with no capability and drops none.
    // (Read once a launch is done: the launcher sets itself up before it
    // serves its first request, not before Launcher::new returns.)
    let launcher = Launcher::new(config(&[])).unwrap();
    let helper = launcher.launch().unwrap();
    let pid = launcher.launcher_pid().unwrap();
    assert_eq!(cap_mask(pid, "CapBnd"), 0, "CapBnd of launcher {pid}");
    // It holds no capability of its own either: it needs none.
    for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(cap_mask(pid, set), 0, "{set} of launcher {pid}");
    }
    assert!(helper.hello().bounding_cleared);
    for set in ["CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"] {
        assert_eq!(cap_mask(helper.pid(), set), 0, "{set}");
    }
    // With a user to switch to: the three capabilities the switch needs
    // (CAP_SETGID, CAP_SETUID, CAP_SETPCAP to drop them), which the
    // helper drops itself.
    let mut config = config(&[]);
    config.sandbox.user = Some("nobody".into());
    let launcher = Launcher::new(config).unwrap();
    let helper = launcher.launch().unwrap();
    let pid = launcher.launcher_pid().unwrap();
    assert_eq!(cap_mask(pid, "CapBnd"), 1 << 6 | 1 << 7 | 1 << 8);
    assert_eq!(cap_mask(pid, "CapEff"), 0, "CapEff of launcher {pid}");
    assert!(helper.hello().bounding_cleared);
    for set in ["CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"] {
        assert_eq!(cap_mask(helper.pid(), set), 0, "{set}");
    }
    assert_eq!(helper.hello().uid, passwd_ids("nobody").0);
}

#[test]
fn a_helper_started_without_cap_setpcap_reports_its_bounding_set_kept() {
    beside_a_bystander(|| {
        // setpriv(1) execs the helper with CAP_SETPCAP out of its bounding
        // set, so this root helper holds every capability but the one that
        // drops the others from the bounding set: it must say the set is
        // not empty, and this host, which could have emptied it, refuses it.
        assert!(host_can_drop_bounding());
        // Direct: the helper inherits the host's full bounding set (a
        // launcher process hands its helpers an empty one).
        let mut config = config(&[]);
        config.launch_mode = LaunchMode::Direct;
        config.program = "/usr/bin/setpriv".into();
        config.args = vec![
            "--bounding-set=-setpcap".into(),
            helper_bin().display().to_string(),
        ];
        let err = Launcher::new(config).unwrap().launch().unwrap_err();
        assert!(
            matches!(
                err,
                LaunchError::HelloRefused {
                    refusal: HelloRefusal::BoundingSetKept,
                    ..
                }
            ),
            "{err:?}"
        );
    });
}

#[test]
fn a_bounding_set_drop_that_is_refused_or_faked_never_reads_as_cleared() {
    beside_a_bystander(|| {
        // A seccomp filter from the process that execs the helper answers
        // its PR_CAPBSET_DROPs with EINVAL, or with a success that did
        // nothing. Even without the host's /proc check (verify_with_proc
        // off), the helper must fail its start-up or say the set is kept.
        for mode in ["einval", "fake"] {
            let mut config = config(&[]);
            // Direct: the wrapper and the helper inherit the host's full
            // bounding set, so the helper has something to drop.
            config.launch_mode = LaunchMode::Direct;
            config.program = env!("SANDPOOL_CAPBSET_FILTER_BIN").into();
            config.args = vec![mode.into(), helper_bin().display().to_string()];
            config.sandbox.verify_with_proc = false;
            let launched = Launcher::new(config).unwrap().launch();
            match (mode, launched) {
                ("einval", Err(LaunchError::HelloRefused { .. })) => {
                    panic!("{mode}: the helper sent a Hello")
                }
                ("einval", Err(err)) => {
                    assert!(
                        err.to_string().contains("PR_CAPBSET_DROP"),
                        "{mode}: the start-up failure names the drop: {err}"
                    );
                }
                (
                    "fake",
                    Err(LaunchError::HelloRefused {
                        refusal: HelloRefusal::BoundingSetKept,
                        ..
                    }),
                ) => {}
                (mode, other) => panic!("{mode}: {other:?}"),
            }
        }
    });
}

#[test]
fn a_helper_that_lies_about_its_capabilities_is_refused() {
    beside_a_bystander(|| {
        // Direct: from the host, a root helper starts with every
        // capability, and this one keeps them (through the launcher process
        // it would start with none to keep).
        let mut keeper = config(&["--misbehave", "keep-caps"]);
        keeper.launch_mode = LaunchMode::Direct;
        let launcher = Launcher::new(keeper).unwrap();
        let err = launcher.launch().unwrap_err();
        assert!(
            matches!(
                err,
                LaunchError::HelloRefused {
                    refusal: HelloRefusal::KernelDisagrees {
                        field: "CapEff",
                        ..
                    },
                    ..
                }
            ),
            "{err:?}"
        );
        // Through a pool: the tenant's call fails with the launch error.
        let mut keeper = pool_config(&["--misbehave", "keep-caps"]);
        keeper.launch_mode = LaunchMode::Direct;
        let pool = Pool::new(keeper).unwrap();
        let err = pool.call("liar", &request(OP_ECHO, b"x")).unwrap_err();
        assert!(
            matches!(&err, CallError::Launch(launch) if matches!(**launch, LaunchError::HelloRefused { .. })),
            "{err:?}"
        );
    });
}

#[test]
fn memory_calls_outside_the_argument_rules_die_by_sigsys() {
    beside_a_bystander(|| {
        let pool = Pool::new(pool_config(&["--test-ops"])).unwrap();
        // The control: an allowed advice on the same kind of mapping.
        assert_eq!(
            pool.call("t", &request(OP_MADVISE_DONTNEED, b"ok"))
                .unwrap(),
            b"ok"
        );
        for op in [OP_MMAP_LOCKED, OP_MADVISE_HWPOISON] {
            let err = pool.call("t", &request(op, b"")).unwrap_err();
            assert!(err.is_seccomp_kill(), "op {op:#04x}: {err:?}");
        }
    });
}

#[test]
fn a_panic_is_an_error_frame_even_with_rust_backtrace_set() {
    beside_a_bystander(|| {
        // env(1) puts RUST_BACKTRACE=1 into the helper's environment and
        // execs it, so this test process's environment stays as it is.
        let mut config = pool_config(&["RUST_BACKTRACE=1"]);
        config.program = "/usr/bin/env".into();
        config
            .args
            .extend([helper_bin().display().to_string(), "--test-ops".into()]);
        let pool = Pool::new(config).unwrap();
        assert_eq!(pool.call("t", &request(OP_ECHO, b"hi")).unwrap(), b"hi");
        let pid = pool.helper_info("t").unwrap().pid;
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(
            environ
                .split(|b| *b == 0)
                .any(|var| var == b"RUST_BACKTRACE=1"),
            "the helper runs with RUST_BACKTRACE=1"
        );
        for round in 0..3 {
            let err = pool
                .call_with_deadline("t", &request(OP_PANIC, b"boom"), deadline(5.0))
                .unwrap_err();
            match err {
                CallError::Helper(message) => assert!(message.contains("boom"), "{message}"),
                other => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!(
            pool.call("t", &request(OP_ECHO, b"still")).unwrap(),
            b"still"
        );
        assert_eq!(pool.helper_info("t").unwrap().pid, pid, "the same helper");
    });
}

#[test]
fn the_configuration_refuses_what_the_helper_would_refuse() {
    let refused = |names: &[&str]| {
        let mut config = config(&[]);
        config.sandbox.extra_syscalls = names.iter().map(|n| n.to_string()).collect();
        config.validate()
    };
    assert_eq!(refused(&["uname", "getcwd"]), Ok(()));
    for name in [
        "mmap",
        "madvise",
        "mprotect",
        "read",
        "write",
        "tgkill",
        "tkill",
        "no_such_call",
    ] {
        let err = refused(&["uname", name]).unwrap_err();
        assert_eq!(err.field, "sandbox.extra_syscalls", "{name}");
        assert!(err.problem.contains(&format!("{name:?}")), "{name}: {err}");
    }
    // The pool's configuration goes through the same check.
    let mut pool_config = pool_config(&[]);
    pool_config.sandbox.extra_syscalls = vec!["mmap".into()];
    assert_eq!(
        pool_config.validate().unwrap_err().field,
        "sandbox.extra_syscalls"
    );

    let with_ids = |user: Option<&str>, group: Option<&str>| {
        let mut config = config(&[]);
        config.sandbox.user = user.map(str::to_owned);
        config.sandbox.group = group.map(str::to_owned);
        config.validate()
    };
    assert_eq!(with_ids(Some("nobody"), None), Ok(()));
    assert_eq!(with_ids(Some("65534"), Some("65534")), Ok(()));
    assert_eq!(with_ids(None, Some("0")), Ok(()));
    let err = with_ids(Some("no-such-user-here"), None).unwrap_err();
    assert_eq!(err.field, "sandbox.user", "{err}");
    let err = with_ids(Some("nobody"), Some("no-such-group-here")).unwrap_err();
    assert_eq!(err.field, "sandbox.group", "{err}");
    // A numeric user with no passwd entry has no primary group to take.
    let err = with_ids(Some("4000000000"), None).unwrap_err();
    assert_eq!(err.field, "sandbox.group", "{err}");
    assert_eq!(with_ids(Some("4000000000"), Some("4000000000")), Ok(()));
}
