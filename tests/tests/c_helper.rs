//! The C reference helper (`tests/c/reference_helper.c`, linked statically
//! against the C runtime `helper/capi`) end to end, on the real kernel: its
//! Hello passes the host's verification, its answers are the Rust
//! computation's, its sandbox is the Rust helper's (fd table, seccomp
//! kills), handler failures are Error frames, and tenants reach it.
//!
//! One test leaks fds into this process without CLOEXEC for a moment; the
//! other tests' helpers may inherit them, which they close like any leak.
#![allow(clippy::unwrap_used)]

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use sandpool::{CallError, ExitStatus, HelperConfig, LaunchError, LaunchMode, Launcher, Pool};
use sandpool_protocol::{FdCloseMethod, MAX_ERROR_MESSAGE, SeccompMode};
use sandpool_reference_helper::redo;
use sandpool_reference_helper::reference::*;
use sandpool_tests::{Bystanders, c_helper_bin, deadline, fds_of, process_exists};

/// C helper only: answers the bound tenant, or fails when there is none.
const OP_TENANT: u8 = 0x40;
/// C helper only: appends until the runtime refuses; answers the bytes
/// taken (u64 LE).
const OP_FILL: u8 = 0x41;

fn c_config(args: &[&str]) -> HelperConfig {
    let mut config = HelperConfig::new(c_helper_bin());
    config.args = args.iter().map(|arg| arg.to_string()).collect();
    config
}

fn launch(args: &[&str]) -> sandpool::Helper {
    Launcher::new(c_config(args)).unwrap().launch().unwrap()
}

fn call(helper: &sandpool::Helper, op: u8, body: &[u8]) -> Result<Vec<u8>, CallError> {
    helper.call(&request(op, body), deadline(10.0))
}

fn helper_error(result: Result<Vec<u8>, CallError>) -> String {
    match result {
        Err(CallError::Helper(text)) => text,
        other => panic!("expected a helper error, got {other:?}"),
    }
}

#[test]
fn hello_passes_the_hosts_verification_in_both_launch_modes() {
    for mode in [LaunchMode::Direct, LaunchMode::Launcher] {
        let mut cfg = c_config(&[]);
        cfg.launch_mode = mode;
        let helper = Launcher::new(cfg).unwrap().launch().unwrap();
        let hello = helper.hello().clone();
        assert_eq!(hello.pid, helper.pid(), "{mode:?}");
        assert_eq!(hello.seccomp, SeccompMode::Enforce);
        assert_eq!(hello.fd_close_method, FdCloseMethod::CloseRange);
        assert!(hello.no_new_privs);
        assert!(hello.caps_cleared);
        // The C main's build id, with the header's SANDPOOL_HELPER_VERSION.
        assert_eq!(hello.build_id, "sandpool-c-helper 0.1.0");
        let status = std::fs::read_to_string(format!("/proc/{}/status", helper.pid())).unwrap();
        assert!(status.contains("Seccomp:\t2"), "{status}");
        assert!(status.contains("NoNewPrivs:\t1"), "{status}");
        assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
        // std's argv works under a C main: the runtime named the process
        // after argv[0], not after the pinned image's fd.
        let comm = std::fs::read(format!("/proc/{}/comm", helper.pid())).unwrap();
        assert_eq!(comm, b"sandpool-c-help\n", "{mode:?}");
        assert_eq!(call(&helper, OP_ECHO, b"hi").unwrap(), b"hi");
        assert_eq!(
            helper.shutdown(Duration::from_secs(5)),
            ExitStatus::Exited(0),
            "EOF makes sandpool_serve return 0, and main returns it"
        );
    }
}

#[test]
fn echo_and_redo_answer_what_the_rust_computation_does() {
    let helper = launch(&[]);
    for size in [0usize, 1, 16, 8192, 100_000] {
        let body: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(call(&helper, OP_ECHO, &body).unwrap(), body, "echo {size}");
    }
    let mut req = vec![0x11u8; redo::PAGE_SIZE];
    redo::push_record(&mut req, 0, b"header");
    redo::push_record(&mut req, 8000, &[0xEE; 192]);
    redo::push_record(&mut req, 3, b"over the header");
    redo::push_record(&mut req, 8191, b"");
    let mut expected = Vec::new();
    redo::apply(&req, &mut expected).unwrap();
    assert_eq!(call(&helper, OP_REDO, &req).unwrap(), expected);

    // Bad requests: the same error texts as the Rust workload's.
    let mut out_of_page = vec![0u8; redo::PAGE_SIZE];
    redo::push_record(&mut out_of_page, 8190, b"abc");
    let mut truncated = vec![0u8; redo::PAGE_SIZE];
    truncated.extend_from_slice(&[1, 0, 9]);
    let mut short_body = vec![0u8; redo::PAGE_SIZE];
    short_body.extend_from_slice(&[0, 0, 9, 0, b'x']);
    for bad in [&b"short"[..], &out_of_page, &truncated, &short_body] {
        let rust = redo::apply(bad, &mut Vec::new()).unwrap_err().to_string();
        assert_eq!(helper_error(call(&helper, OP_REDO, bad)), rust);
    }
    assert_eq!(call(&helper, OP_ECHO, b"after").unwrap(), b"after");
}

#[test]
fn failing_handlers_are_error_frames_and_the_helper_keeps_serving() {
    let helper = launch(&["--test-ops"]);
    assert_eq!(
        helper_error(call(&helper, OP_FAIL, b"bad record 7")),
        "bad record 7"
    );
    // A non-zero return with nothing written: the runtime's own text.
    assert_eq!(
        helper_error(call(&helper, OP_PANIC, b"boom")),
        "handler failed (returned -1)"
    );
    // Not UTF-8: replaced, not refused.
    assert_eq!(
        helper_error(call(&helper, OP_FAIL, b"caf\xff")),
        "caf\u{fffd}"
    );
    // Longer than an Error frame: cut to its limit.
    let long = vec![b'e'; 3 * MAX_ERROR_MESSAGE];
    assert_eq!(
        helper_error(call(&helper, OP_FAIL, &long)),
        "e".repeat(MAX_ERROR_MESSAGE)
    );
    assert!(helper_error(call(&helper, 0x7f, b"")).contains("unknown op 0x7f"));
    assert_eq!(
        helper_error(helper.call(b"", deadline(10.0))),
        "empty request: no op byte"
    );
    assert_eq!(
        call(&helper, OP_SLEEP, &sleep_request(5, b"slept")[1..]).unwrap(),
        b"slept"
    );
    assert_eq!(
        call(&helper, OP_STDERR, b"a log line\n").unwrap(),
        b"a log line\n"
    );
    assert_eq!(
        call(&helper, OP_ECHO, b"still here").unwrap(),
        b"still here"
    );
    assert!(!helper.is_retired());

    let plain = launch(&[]);
    assert!(helper_error(call(&plain, OP_OPEN, b"/etc/hostname")).contains("--test-ops"));
}

#[test]
fn forbidden_syscalls_kill_the_c_helper_by_sigsys() {
    for (op, body) in [
        (OP_OPEN, &b"/etc/passwd"[..]),
        (OP_SOCKET, b""),
        (OP_SPAWN, b""),
        (OP_EXEC, b""),
    ] {
        let helper = launch(&["--test-ops"]);
        let pid = helper.pid();
        let err = call(&helper, op, body).unwrap_err();
        assert!(err.is_seccomp_kill(), "op {op:#x}: {err:?}");
        match &err {
            CallError::Died { status, .. } => {
                assert_eq!(*status, ExitStatus::Signaled(libc::SIGSYS), "op {op:#x}")
            }
            other => panic!("op {op:#x}: expected Died, got {other:?}"),
        }
        assert!(helper.is_retired());
        assert!(
            !process_exists(pid),
            "op {op:#x}: the killed helper was reaped"
        );
    }
}

#[test]
fn the_bound_tenant_reaches_the_handler() {
    let helper = launch(&["--test-ops"]);
    assert!(
        helper_error(call(&helper, OP_TENANT, b"")).starts_with("not bound to a tenant (length 0)")
    );
    helper.bind(b"tenant-\x00\xffa").unwrap();
    assert_eq!(call(&helper, OP_TENANT, b"").unwrap(), b"tenant-\x00\xffa");
    assert_eq!(call(&helper, OP_ECHO, b"x").unwrap(), b"x");
}

#[test]
fn responses_are_bounded_by_what_the_host_accepts() {
    // The frame limit, to the byte.
    let mut cfg = c_config(&["--test-ops"]);
    cfg.max_frame = 200_000;
    let helper = Launcher::new(cfg).unwrap().launch().unwrap();
    assert_eq!(
        call(&helper, OP_FILL, b"").unwrap(),
        200_000u64.to_le_bytes()
    );
    // With a shared region, a reply larger than a frame goes through it:
    // the region's size is the bound then.
    let mut cfg = c_config(&[]);
    cfg.max_frame = 64 * 1024;
    cfg.region_size = Some(4 << 20);
    cfg.region_threshold = 32 * 1024;
    let helper = Launcher::new(cfg).unwrap().launch().unwrap();
    let body: Vec<u8> = (0..1_000_000).map(|i| (i % 253) as u8).collect();
    assert_eq!(call(&helper, OP_ECHO, &body).unwrap(), body);
    // Per request: through the pipe, the frame limit; through the region,
    // its reply window (half the region over its slots), to the byte.
    let mut cfg = c_config(&["--test-ops"]);
    cfg.max_frame = 64 * 1024;
    cfg.region_size = Some(4 << 20);
    cfg.region_threshold = 32 * 1024;
    cfg.region_slots = 2;
    let helper = Launcher::new(cfg).unwrap().launch().unwrap();
    assert_eq!(
        call(&helper, OP_FILL, b"").unwrap(),
        (64u64 * 1024).to_le_bytes()
    );
    assert_eq!(
        call(&helper, OP_FILL, &vec![0u8; 40 * 1024]).unwrap(),
        (1u64 << 20).to_le_bytes()
    );
}

#[test]
fn startup_failure_exits_70_with_the_reason_on_stderr() {
    let mut cfg = c_config(&[]);
    cfg.sandbox.rlimits.open_files = Some(u64::MAX);
    match Launcher::new(cfg).unwrap().launch().unwrap_err() {
        LaunchError::ExitedBeforeHello { status, stderr, .. } => {
            assert_eq!(
                status,
                ExitStatus::Exited(sandpool_helper::EXIT_STARTUP_FAILED)
            );
            assert!(stderr.contains("RLIMIT_NOFILE"), "{stderr}");
        }
        other => panic!("expected the helper to exit before Hello, got {other:?}"),
    }
}

#[test]
fn fd_table_is_exactly_stdio_although_the_host_leaked_fds() {
    const LEAKED: usize = 200;
    let dir = std::env::temp_dir().join(format!("sandpool-c-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret_path = dir.join("secret");
    std::fs::write(&secret_path, b"tenant A's password").unwrap();
    let secret: OwnedFd = std::fs::File::open(&secret_path).unwrap().into();
    // std opens with O_CLOEXEC; these leak like a careless host's would.
    nix::fcntl::fcntl(
        &secret,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let devnull: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    let leaked: Vec<OwnedFd> = (0..LEAKED)
        .map(|_| nix::unistd::dup(&devnull).unwrap())
        .collect();

    let mut cfg = c_config(&["--test-ops"]);
    cfg.launch_mode = LaunchMode::Direct;
    let helper = Launcher::new(cfg).unwrap().launch().unwrap();
    assert!(
        helper.hello().fds_closed as usize > LEAKED,
        "the C helper inherited the leaks and reports {} closed",
        helper.hello().fds_closed
    );
    assert_eq!(
        fds_of(helper.pid()).into_iter().collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let path = secret_path.to_str().unwrap().as_bytes();
    assert!(call(&helper, OP_OPEN, path).unwrap_err().is_seccomp_kill());

    drop((leaked, devnull, secret));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_pool_of_c_helpers_serves_tenants_beside_bystanders_and_a_hostile_one() {
    let mut config = sandpool::Config::new(c_helper_bin());
    config.args = vec!["--test-ops".into()];
    config.spares = 1;
    config.request_timeout = Duration::from_secs(10);
    let pool = Arc::new(Pool::new(config).unwrap());
    let bystanders = Bystanders::start(&pool, 3);
    assert!(sandpool_tests::wait_for(
        Duration::from_secs(20),
        || bystanders.calls() > 10
    ));

    let tenants: Vec<String> = (0..4).map(|i| format!("c-tenant-{i}")).collect();
    for round in 0..3 {
        for tenant in &tenants {
            let reply = pool.call(tenant, &request(OP_TENANT, b"")).unwrap();
            assert_eq!(reply, tenant.as_bytes(), "round {round}");
        }
    }
    // A hostile tenant dies by SIGSYS; nobody else notices.
    let err = pool
        .call("c-hostile", &request(OP_SOCKET, b""))
        .unwrap_err();
    assert!(err.is_seccomp_kill(), "{err:?}");
    let before = bystanders.calls();
    assert!(sandpool_tests::wait_for(
        Duration::from_secs(20),
        || bystanders.calls() > before + 10
    ));
    for tenant in &tenants {
        assert_eq!(
            pool.call(tenant, &request(OP_TENANT, b"")).unwrap(),
            tenant.as_bytes()
        );
    }
    let failures = bystanders.finish();
    assert!(failures.is_empty(), "bystander calls failed: {failures:?}");
    assert!(pool.stats().live >= tenants.len(), "one helper per tenant");
}
