//! One helper end to end: calls, helper errors, seccomp kills, hostile
//! helpers, Hello refusal. Every test runs real helper processes.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use sandpool::{
    CallError, ExitStatus, HelloRefusal, LaunchError, Launcher, ProtocolViolation, SeccompMode,
};
use sandpool_protocol::FdCloseMethod;
use sandpool_reference_helper::redo;
use sandpool_reference_helper::reference::*;
use sandpool_tests::{config, deadline, helper_bin, process_exists};

/// The helper is alive and answers an echo.
fn assert_still_serves(helper: &sandpool::Helper) {
    assert_eq!(
        helper
            .call(&request(OP_ECHO, b"ok"), deadline(5.0))
            .unwrap(),
        b"ok"
    );
    assert!(!helper.is_retired());
}

fn launch(args: &[&str]) -> sandpool::Helper {
    Launcher::new(config(args)).unwrap().launch().unwrap()
}

#[test]
fn echo_and_redo_round_trip() {
    let helper = launch(&[]);
    let hello = helper.hello().clone();
    assert_eq!(hello.pid, helper.pid());
    assert_eq!(hello.seccomp, SeccompMode::Enforce);
    assert_eq!(hello.fd_close_method, FdCloseMethod::CloseRange);
    assert!(hello.no_new_privs);
    assert!(hello.build_id.starts_with("sandpool-helper "));
    // Launched from the pinned memfd image, it still shows under its
    // program's name, not as the fd it was executed from.
    let program = helper_bin();
    let name = program.file_name().unwrap().as_encoded_bytes();
    let comm = std::fs::read(format!("/proc/{}/comm", helper.pid())).unwrap();
    assert_eq!(comm, [&name[..name.len().min(15)], b"\n"].concat());

    for size in [0usize, 1, 16, 8192, 100_000] {
        let body: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let reply = helper
            .call(&request(OP_ECHO, &body), deadline(5.0))
            .unwrap();
        assert_eq!(reply, body, "echo of {size} bytes");
    }

    let mut req = vec![0x11u8; redo::PAGE_SIZE];
    redo::push_record(&mut req, 0, b"header");
    redo::push_record(&mut req, 8000, &[0xEE; 192]);
    let mut expected = Vec::new();
    redo::apply(&req, &mut expected).unwrap();
    let reply = helper.call(&request(OP_REDO, &req), deadline(5.0)).unwrap();
    assert_eq!(reply, expected);
    assert_eq!(
        helper.shutdown(Duration::from_secs(5)),
        ExitStatus::Exited(0)
    );
}

#[test]
fn handler_errors_and_panics_fail_one_call_only() {
    let helper = launch(&["--test-ops"]);
    match helper.call(&request(OP_FAIL, b"bad record 7"), deadline(5.0)) {
        Err(CallError::Helper(message)) => assert_eq!(message, "bad record 7"),
        other => panic!("expected a helper error, got {other:?}"),
    }
    match helper.call(&request(OP_PANIC, b"boom"), deadline(5.0)) {
        Err(CallError::Helper(message)) => assert_eq!(message, "handler panicked: boom"),
        other => panic!("expected a helper error, got {other:?}"),
    }
    match helper.call(&request(OP_REDO, b"short"), deadline(5.0)) {
        Err(err @ CallError::Helper(_)) => assert!(err.helper_survives()),
        other => panic!("expected a helper error, got {other:?}"),
    }
    assert_eq!(
        helper
            .call(&request(OP_ECHO, b"still here"), deadline(5.0))
            .unwrap(),
        b"still here"
    );
    assert!(!helper.is_retired());
}

#[test]
fn test_ops_are_refused_without_the_flag() {
    let helper = launch(&[]);
    match helper.call(&request(OP_OPEN, b"/etc/hostname"), deadline(5.0)) {
        Err(CallError::Helper(message)) => assert!(message.contains("--test-ops"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn forbidden_syscalls_die_by_sigsys_and_the_next_helper_works() {
    for (op, body) in [
        (OP_OPEN, &b"/etc/passwd"[..]),
        (OP_SOCKET, b""),
        (OP_SPAWN, b""),
    ] {
        let helper = launch(&["--test-ops"]);
        let pid = helper.pid();
        let err = helper.call(&request(op, body), deadline(5.0)).unwrap_err();
        assert!(err.is_seccomp_kill(), "op {op:#x}: {err:?}");
        match &err {
            CallError::Died { status, .. } => {
                assert_eq!(*status, ExitStatus::Signaled(libc::SIGSYS))
            }
            other => panic!("op {op:#x}: expected Died, got {other:?}"),
        }
        assert!(err.to_string().contains("SIGSYS (seccomp"), "{err}");
        assert!(helper.is_retired());
        assert!(!process_exists(pid), "the killed helper was reaped");
        assert!(matches!(
            helper.call(&request(OP_ECHO, b"x"), deadline(5.0)),
            Err(CallError::NotSent { .. })
        ));
        // The tenant's next helper is a fresh process and works.
        let next = launch(&["--test-ops"]);
        assert_ne!(next.pid(), pid);
        assert_eq!(
            next.call(&request(OP_ECHO, b"ok"), deadline(5.0)).unwrap(),
            b"ok"
        );
    }
}

#[test]
fn log_mode_allows_and_off_mode_is_honest() {
    // Explicitly configured `log` mode: the forbidden open is allowed (and
    // logged by the kernel), so the helper reads the file.
    let mut cfg = config(&["--test-ops"]);
    cfg.sandbox.seccomp = SeccompMode::Log;
    let helper = Launcher::new(cfg).unwrap().launch().unwrap();
    assert_eq!(helper.hello().seccomp, SeccompMode::Log);
    let hostname = helper
        .call(&request(OP_OPEN, b"/proc/self/status"), deadline(5.0))
        .unwrap();
    assert!(String::from_utf8_lossy(&hostname).contains("Seccomp:\t2"));

    let mut cfg = config(&["--test-ops"]);
    cfg.sandbox.seccomp = SeccompMode::Off;
    let helper = Launcher::new(cfg).unwrap().launch().unwrap();
    assert_eq!(helper.hello().seccomp, SeccompMode::Off);
    let status = helper
        .call(&request(OP_OPEN, b"/proc/self/status"), deadline(5.0))
        .unwrap();
    assert!(String::from_utf8_lossy(&status).contains("Seccomp:\t0"));
}

#[test]
fn hello_that_skips_seccomp_is_refused() {
    let err = Launcher::new(config(&["--misbehave", "skip-seccomp"]))
        .unwrap()
        .launch()
        .unwrap_err();
    match err {
        LaunchError::HelloRefused {
            refusal: HelloRefusal::Seccomp { got, required },
            pid,
        } => {
            assert_eq!((got, required), (SeccompMode::Off, SeccompMode::Enforce));
            assert!(!process_exists(pid), "refused helper was reaped");
        }
        other => panic!("expected a seccomp refusal, got {other:?}"),
    }
}

#[test]
fn hello_that_lies_about_seccomp_is_caught_by_the_kernel_check() {
    let err = Launcher::new(config(&["--misbehave", "lie-seccomp"]))
        .unwrap()
        .launch()
        .unwrap_err();
    match err {
        LaunchError::HelloRefused {
            refusal: HelloRefusal::KernelDisagrees { field, kernel, .. },
            ..
        } => assert_eq!((field, kernel.as_str()), ("Seccomp", "0")),
        other => panic!("expected the kernel check to refuse, got {other:?}"),
    }
}

#[test]
fn fd_walk_fallback_is_reported_and_refused_unless_allowed() {
    let err = Launcher::new(config(&["--fd-walk"]))
        .unwrap()
        .launch()
        .unwrap_err();
    assert!(
        matches!(
            err,
            LaunchError::HelloRefused {
                refusal: HelloRefusal::FdCloseMethod(FdCloseMethod::ProcSelfFdWalk),
                ..
            }
        ),
        "{err:?}"
    );
    let mut cfg = config(&["--fd-walk"]);
    cfg.sandbox.allow_fd_walk_fallback = true;
    let helper = Launcher::new(cfg).unwrap().launch().unwrap();
    assert_eq!(
        helper.hello().fd_close_method,
        FdCloseMethod::ProcSelfFdWalk
    );
    assert_eq!(
        helper.call(&request(OP_ECHO, b"w"), deadline(5.0)).unwrap(),
        b"w"
    );
}

#[test]
fn no_hello_times_out_and_is_reaped() {
    let mut cfg = config(&["--misbehave", "no-hello"]);
    cfg.spawn_timeout = Duration::from_millis(300);
    match Launcher::new(cfg).unwrap().launch().unwrap_err() {
        LaunchError::HelloTimeout { pid, waited, .. } => {
            assert!(waited >= Duration::from_millis(300));
            assert!(!process_exists(pid));
        }
        other => panic!("expected a Hello timeout, got {other:?}"),
    }
}

#[test]
fn startup_failure_is_reported_with_stderr() {
    // A limit no process may set (above the kernel's nr_open): the host
    // passes it on, the helper's setrlimit fails. (An unknown extra syscall
    // no longer gets this far: validation refuses it.)
    let mut cfg = config(&[]);
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
fn invalid_config_and_missing_program_are_typed() {
    let mut cfg = config(&[]);
    cfg.max_frame = 0;
    match Launcher::new(cfg).unwrap_err() {
        LaunchError::Config(err) => assert_eq!(err.field, "max_frame"),
        other => panic!("{other:?}"),
    }
    let mut cfg = config(&[]);
    cfg.sandbox.extra_syscalls = vec!["open; rm".into()];
    assert!(matches!(Launcher::new(cfg), Err(LaunchError::Config(_))));
    let mut cfg = sandpool::HelperConfig::new("/nonexistent/helper");
    match Launcher::new(cfg.clone()).unwrap_err() {
        LaunchError::PinImage { what, source, .. } => {
            assert_eq!(what, "open");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound, "{source}")
        }
        other => panic!("{other:?}"),
    }
    cfg.pin_image = false;
    match Launcher::new(cfg).unwrap().launch().unwrap_err() {
        LaunchError::Spawn { source, .. } => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT))
        }
        other => panic!("{other:?}"),
    }
    assert!(helper_bin().exists());
}

#[test]
fn hung_and_stopped_helpers_time_out_and_are_reaped() {
    let helper = launch(&["--misbehave", "hang"]);
    let pid = helper.pid();
    let err = helper
        .call(&request(OP_ECHO, b"x"), deadline(0.3))
        .unwrap_err();
    assert!(matches!(err, CallError::Timeout { .. }), "{err:?}");
    assert!(!process_exists(pid));

    let helper = launch(&[]);
    let pid = helper.pid();
    helper.signal(nix::sys::signal::Signal::SIGSTOP).unwrap();
    let err = helper
        .call(&request(OP_ECHO, b"x"), deadline(0.3))
        .unwrap_err();
    assert!(matches!(err, CallError::Timeout { .. }), "{err:?}");
    assert!(
        !process_exists(pid),
        "a stopped helper is killed and reaped too"
    );
}

#[test]
fn hostile_replies_are_protocol_violations() {
    type Check = fn(&ProtocolViolation) -> bool;
    let cases: &[(&str, Check)] = &[
        ("garbage", |v| {
            matches!(
                v,
                ProtocolViolation::Frame(sandpool_protocol::DecodeError::BadMagic { .. })
            )
        }),
        ("wrong-id", |v| {
            matches!(
                v,
                ProtocolViolation::UnexpectedId { expected, got } if *got == expected + 1
            )
        }),
    ];
    for (mode, check) in cases {
        let helper = launch(&["--misbehave", mode]);
        let pid = helper.pid();
        match helper.call(&request(OP_ECHO, b"x"), deadline(5.0)) {
            Err(CallError::Protocol { violation, .. }) => {
                assert!(check(&violation), "{mode}: {violation:?}")
            }
            other => panic!("{mode}: expected a protocol violation, got {other:?}"),
        }
        assert!(!process_exists(pid), "{mode}: killed and reaped");
    }
}

#[test]
fn answering_twice_is_caught_on_the_next_call() {
    let helper = launch(&["--misbehave", "answer-twice"]);
    assert_eq!(
        helper.call(&request(OP_ECHO, b"x"), deadline(5.0)).unwrap(),
        b"x"
    );
    match helper.call(&request(OP_ECHO, b"y"), deadline(5.0)) {
        // The duplicate of the first reply is read as the second call's.
        Err(CallError::Protocol { violation, .. }) => assert!(
            matches!(
                violation,
                ProtocolViolation::Unsolicited { .. } | ProtocolViolation::UnexpectedId { .. }
            ),
            "{violation:?}"
        ),
        other => panic!("expected a protocol violation, got {other:?}"),
    }
}

#[test]
fn exit_mid_response_is_a_death_with_status() {
    let helper = launch(&["--misbehave", "exit-mid-response"]);
    match helper.call(&request(OP_ECHO, &[7; 1000]), deadline(5.0)) {
        Err(CallError::Died { status, .. }) => assert_eq!(status, ExitStatus::Exited(0)),
        other => panic!("expected Died, got {other:?}"),
    }
}

#[test]
fn oversized_request_is_refused_before_sending() {
    let mut cfg = config(&[]);
    cfg.max_frame = 1024;
    let helper = Launcher::new(cfg).unwrap().launch().unwrap();
    let err = helper
        .call(&request(OP_ECHO, &[0; 1024]), deadline(5.0))
        .unwrap_err();
    assert!(
        matches!(
            err,
            CallError::RequestTooLarge {
                len: 1025,
                max: 1024
            }
        ),
        "{err:?}"
    );
    assert!(err.helper_survives());
    assert_eq!(
        helper
            .call(&request(OP_ECHO, &[1; 1023]), deadline(5.0))
            .unwrap(),
        vec![1; 1023]
    );
    // A response over the limit becomes an Error frame, not a broken stream.
    let mut cfg = config(&["--test-ops"]);
    cfg.max_frame = 512;
    cfg.sandbox.seccomp = SeccompMode::Log;
    let helper = Launcher::new(cfg).unwrap().launch().unwrap();
    match helper.call(&request(OP_OPEN, b"/proc/self/status"), deadline(5.0)) {
        Err(CallError::Helper(message)) => assert!(
            message.contains("exceeds the frame limit of 512"),
            "{message}"
        ),
        other => panic!("expected an Error frame, got {other:?}"),
    }
    assert_still_serves(&helper);
}

#[test]
fn helper_stderr_reaches_the_error() {
    let helper = launch(&["--test-ops"]);
    assert_eq!(
        helper
            .call(&request(OP_STDERR, b"last words\n"), deadline(5.0))
            .unwrap(),
        b"last words\n"
    );
    match helper.call(&request(OP_OPEN, b"/etc/passwd"), deadline(5.0)) {
        Err(CallError::Died { stderr, .. }) => assert!(stderr.contains("last words"), "{stderr:?}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn answering_before_being_asked_is_never_accepted() {
    let helper = launch(&["--misbehave", "pre-answer"]);
    assert_eq!(
        helper.call(&request(OP_ECHO, b"x"), deadline(5.0)).unwrap(),
        b"x"
    );
    // The forged answer to the second request arrives in the pipe before
    // that request exists, with the best guess at its id there is: the right
    // count in the high half. The low half is keyed noise it cannot know.
    std::thread::sleep(Duration::from_millis(500));
    match helper.call(&request(OP_ECHO, b"y"), deadline(5.0)) {
        Err(CallError::Protocol {
            violation: ProtocolViolation::UnexpectedId { expected, got },
            ..
        }) => {
            assert_eq!(got >> 32, expected >> 32, "the forger guessed the count");
            assert_ne!(got, expected);
        }
        other => panic!("a pre-sent answer must not be accepted, got {other:?}"),
    }
    assert!(helper.is_retired());
}

#[test]
fn long_handler_errors_are_cut_to_the_frame_limit() {
    let mut cfg = config(&["--test-ops"]);
    cfg.max_frame = 512;
    let helper = Launcher::new(cfg).unwrap().launch().unwrap();
    // "handler panicked: " plus a 500-byte message is longer than the limit.
    match helper.call(&request(OP_PANIC, &[b'e'; 500]), deadline(5.0)) {
        Err(CallError::Helper(message)) => {
            assert_eq!(message.len(), 512);
            assert!(message.starts_with("handler panicked: eee"));
        }
        other => panic!("expected a cut helper error, got {other:?}"),
    }
    assert_still_serves(&helper);
}

#[test]
fn extra_syscalls_cannot_widen_the_argument_rules() {
    let mut cfg = config(&[]);
    cfg.sandbox.extra_syscalls = vec!["mprotect".into()];
    // Refused by validation, before any helper runs (the helper refuses it
    // too: the sandbox crate's unit tests).
    match Launcher::new(cfg).unwrap_err() {
        LaunchError::Config(err) => {
            assert_eq!(err.field, "sandbox.extra_syscalls");
            assert!(
                err.problem
                    .contains("\"mprotect\" is allowed only with argument rules"),
                "{err}"
            );
        }
        other => panic!("expected the configuration to be refused, got {other:?}"),
    }
}

#[test]
fn bind_is_validated_and_happens_once() {
    let helper = launch(&[]);
    assert!(matches!(helper.bind(b""), Err(CallError::InvalidTenant(_))));
    assert!(matches!(
        helper.bind(&[b't'; 300]),
        Err(CallError::InvalidTenant(_))
    ));
    helper.bind(b"tenant-a").unwrap();
    assert!(matches!(
        helper.bind(b"tenant-b"),
        Err(CallError::AlreadyBound { .. })
    ));
    assert_eq!(
        helper
            .call(&request(OP_ECHO, b"bound"), deadline(5.0))
            .unwrap(),
        b"bound"
    );
}

#[test]
fn pipelined_calls_from_many_threads_each_get_their_own_reply() {
    let mut cfg = config(&[]);
    cfg.max_in_flight = 4;
    let helper = std::sync::Arc::new(Launcher::new(cfg).unwrap().launch().unwrap());
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            let helper = helper.clone();
            std::thread::spawn(move || {
                for i in 0..200u32 {
                    let body = format!("thread {t} call {i} {}", "x".repeat((i % 50) as usize));
                    let reply = helper
                        .call(&request(OP_ECHO, body.as_bytes()), deadline(10.0))
                        .unwrap();
                    assert_eq!(reply, body.as_bytes());
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(helper.calls(), 1600);
    assert_eq!(helper.in_flight(), 0);
    assert!(!helper.is_retired());
}

#[test]
fn a_death_fails_every_call_in_flight_with_the_same_error() {
    let helper = std::sync::Arc::new(launch(&["--test-ops"]));
    let call_in_thread = |payload: Vec<u8>| sandpool_tests::call_in_thread(&helper, payload, 10.0);
    // A slow call occupies the helper; a fatal request queues behind it, and
    // three more calls queue behind that one.
    let slow = call_in_thread(sleep_request(300, b"slow"));
    assert!(sandpool_tests::wait_for(Duration::from_secs(10), || helper
        .in_flight()
        == 1));
    std::thread::sleep(Duration::from_millis(20));
    let fatal = call_in_thread(request(OP_OPEN, b"/etc/passwd"));
    assert!(sandpool_tests::wait_for(Duration::from_secs(10), || helper
        .in_flight()
        == 2));
    std::thread::sleep(Duration::from_millis(20));
    let queued: Vec<_> = (0..3)
        .map(|i| call_in_thread(request(OP_ECHO, &[i])))
        .collect();

    assert_eq!(slow.join().unwrap().unwrap(), b"slow");
    let fatal = fatal.join().unwrap().unwrap_err();
    assert!(fatal.is_seccomp_kill(), "{fatal:?}");
    for thread in queued {
        let err = thread.join().unwrap().unwrap_err();
        assert!(
            err.is_seccomp_kill(),
            "a call in flight sees the death: {err:?}"
        );
    }
    assert!(matches!(
        helper.call(&request(OP_ECHO, b"x"), deadline(1.0)),
        Err(CallError::NotSent { .. })
    ));
}

#[test]
fn a_pinned_image_survives_the_binary_being_replaced_on_disk() {
    let dir = std::env::temp_dir().join(format!("sandpool-pin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let program = dir.join("helper");
    std::fs::copy(helper_bin(), &program).unwrap();
    let mut pinned_cfg = config(&[]);
    pinned_cfg.program = program.clone();
    let mut unpinned_cfg = pinned_cfg.clone();
    unpinned_cfg.pin_image = false;
    let pinned = Launcher::new(pinned_cfg).unwrap();
    let unpinned = Launcher::new(unpinned_cfg).unwrap();
    assert!(
        pinned
            .launch()
            .unwrap()
            .hello()
            .build_id
            .starts_with("sandpool-helper")
    );
    // The copy was just written: a child another test thread is spawning
    // right now may still hold the write fd until its own exec (ETXTBSY).
    let mut attempts = 0;
    let launched = loop {
        attempts += 1;
        match unpinned.launch() {
            Err(LaunchError::Spawn { source, .. })
                if source.raw_os_error() == Some(libc::ETXTBSY) && attempts < 50 =>
            {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => break other,
        }
    };
    assert!(launched.is_ok(), "{launched:?}");

    // An "upgrade" lands on disk (atomically, as package managers do).
    let replacement = dir.join("replacement");
    std::fs::write(
        &replacement,
        "#!/bin/sh\necho 'I am the new version' >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &replacement,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::rename(&replacement, &program).unwrap();

    // The pinned launcher still runs the image it pinned.
    let helper = pinned.launch().unwrap();
    assert_eq!(
        helper
            .call(&request(OP_ECHO, b"same version"), deadline(5.0))
            .unwrap(),
        b"same version"
    );
    // Without pinning, the new file is what runs.
    match unpinned.launch().unwrap_err() {
        LaunchError::ExitedBeforeHello { status, stderr, .. } => {
            assert_eq!(status, ExitStatus::Exited(3));
            assert!(stderr.contains("new version"), "{stderr}");
        }
        other => panic!("expected the replaced binary to run, got {other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pipe_size_is_applied_and_an_impossible_one_is_a_typed_error() {
    let mut cfg = config(&[]);
    cfg.pipe_size = Some(256 * 1024);
    let helper = Launcher::new(cfg).unwrap().launch().unwrap();
    // The helper's stdin, opened through /proc, is the same pipe.
    let stdin: std::os::fd::OwnedFd = std::fs::File::open(format!("/proc/{}/fd/0", helper.pid()))
        .unwrap()
        .into();
    let size = nix::fcntl::fcntl(&stdin, nix::fcntl::FcntlArg::F_GETPIPE_SZ).unwrap();
    assert_eq!(size, 256 * 1024);
    assert_eq!(
        helper
            .call(&request(OP_ECHO, &[3; 200_000]), deadline(5.0))
            .unwrap(),
        vec![3; 200_000]
    );

    let max: i64 = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut cfg = config(&[]);
    cfg.pipe_size = Some((max * 4) as u32);
    match Launcher::new(cfg).unwrap().launch() {
        Err(LaunchError::Pipe { which, source }) => {
            assert_eq!(which, "stdin");
            assert_eq!(source.raw_os_error(), Some(libc::EPERM));
        }
        // With CAP_SYS_RESOURCE the kernel allows it.
        Ok(_) => {}
        Err(other) => panic!("{other:?}"),
    }
}

#[test]
fn the_reading_role_always_reaches_a_caller_still_waiting() {
    // One slow call reads while seven queue behind it; when its reply comes
    // it passes the role on. A waiter woken both for its parked reply and
    // for the role (the two wake-ups merge) must pass the role on too, or
    // the callers behind it sleep until their deadlines with nobody reading.
    let helper = std::sync::Arc::new(launch(&["--test-ops"]));
    for round in 0..100 {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let callers: Vec<_> = (0..8u8)
            .map(|caller| {
                let (helper, barrier) = (helper.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let req = if caller == 0 {
                        sleep_request(2, b"slow")
                    } else {
                        request(OP_ECHO, &[caller])
                    };
                    barrier.wait();
                    helper.call(&req, deadline(10.0))
                })
            })
            .collect();
        for (caller, thread) in callers.into_iter().enumerate() {
            let result = thread.join().unwrap();
            assert!(result.is_ok(), "round {round}, caller {caller}: {result:?}");
        }
    }
}

#[test]
fn shutdown_wakes_callers_waiting_for_replies() {
    let helper = std::sync::Arc::new(launch(&["--test-ops"]));
    let call = |req: Vec<u8>| sandpool_tests::call_in_thread(&helper, req, 60.0);
    let slow = call(sleep_request(300, b"slow"));
    sandpool_tests::wait_for_in_flight(&helper, 1);
    let waiters: Vec<_> = (0..2u8)
        .map(|i| {
            let waiter = call(request(OP_ECHO, &[i]));
            sandpool_tests::wait_for_in_flight(&helper, 2 + usize::from(i));
            waiter
        })
        .collect();
    helper.shutdown(Duration::from_secs(5));
    // Long before their 60 s deadlines, the waiters have seen the shutdown.
    assert!(sandpool_tests::wait_for(Duration::from_secs(10), || {
        waiters.iter().all(|waiter| waiter.is_finished())
    }));
    for waiter in waiters {
        let err = waiter.join().unwrap().unwrap_err();
        assert!(matches!(err, CallError::Retired { .. }), "{err:?}");
    }
    // The slow call was answered or failed; either way it is over.
    let _ = slow.join().unwrap();
}

#[test]
fn a_large_request_queued_behind_a_slow_call_gives_up_without_harming_the_helper() {
    let helper = std::sync::Arc::new(launch(&["--test-ops"]));
    let slow = sandpool_tests::call_in_thread(&helper, sleep_request(500, b"slow"), 10.0);
    sandpool_tests::wait_for_in_flight(&helper, 1);
    // Larger than the pipe: it can only go in as the helper reads, and the
    // helper is busy with the slow call, well within that call's deadline.
    // Its caller gives up before sending a byte; a frame cut off half-way
    // would have left the helper's stream mid-frame.
    let big = vec![9u8; 200_000];
    let err = helper
        .call(&request(OP_ECHO, &big), deadline(0.1))
        .unwrap_err();
    assert!(matches!(err, CallError::QueueTimeout { .. }), "{err:?}");
    assert!(!helper.is_retired());
    assert_eq!(slow.join().unwrap().unwrap(), b"slow");
    assert_eq!(
        helper
            .call(&request(OP_ECHO, &big), deadline(10.0))
            .unwrap(),
        big
    );
}

#[test]
fn a_large_frame_waits_for_pipe_pages_not_just_bytes() {
    // A slow call, then two small frames that each take a pipe page of
    // their own (2,980 bytes: a second one does not fit the first's page).
    // A 59,000-byte frame fits the pipe's free bytes (65,536 - 5,992) but
    // not its free pages: started, it would stop part-way and be cut off at
    // its deadline, killing a helper that did nothing wrong.
    let helper = std::sync::Arc::new(launch(&["--test-ops"]));
    let call = |req: Vec<u8>| sandpool_tests::call_in_thread(&helper, req, 10.0);
    let slow = call(sleep_request(1000, b"slow"));
    sandpool_tests::wait_for_in_flight(&helper, 1);
    let small: Vec<_> = (1..=2)
        .map(|n| {
            let thread = call(request(OP_ECHO, &[n; 2979]));
            sandpool_tests::wait_for_in_flight(&helper, 1 + usize::from(n));
            thread
        })
        .collect();
    let err = helper
        .call(&request(OP_ECHO, &[3u8; 58_983]), deadline(0.3))
        .unwrap_err();
    assert!(matches!(err, CallError::QueueTimeout { .. }), "{err:?}");
    assert_eq!(slow.join().unwrap().unwrap(), b"slow");
    for (n, thread) in (1u8..).zip(small) {
        assert_eq!(thread.join().unwrap().unwrap(), vec![n; 2979]);
    }
    assert!(!helper.is_retired());
}

#[test]
fn a_reader_queued_behind_a_slow_call_gives_up_without_retiring_the_helper() {
    // Slow calls with long deadlines and fast ones with short deadlines on
    // one helper. Whoever holds the reading role may be a fast caller whose
    // request waits behind a slow one: its deadline passing is its own
    // queue timeout, since the reply owed first is within its caller's
    // deadline. Nothing here is the helper's fault, so it is never retired.
    // (The fast deadline is long enough that an echo owed first never
    // misses it on a loaded machine; the slow call is longer still.)
    let mut cfg = config(&["--test-ops"]);
    cfg.max_in_flight = 5;
    let launcher = Launcher::new(cfg).unwrap();
    for round in 0..2 {
        let helper = std::sync::Arc::new(launcher.launch().unwrap());
        let until = std::time::Instant::now() + Duration::from_millis(1500);
        let callers: Vec<_> = (0..5)
            .map(|caller| {
                let helper = helper.clone();
                std::thread::spawn(move || {
                    let slow = caller == 0;
                    let (req, wait) = if slow {
                        (sleep_request(400, b"s"), 10.0)
                    } else {
                        (request(OP_ECHO, b"f"), 0.1)
                    };
                    while std::time::Instant::now() < until {
                        match helper.call(&req, deadline(wait)) {
                            Ok(_) | Err(CallError::QueueTimeout { .. }) => {}
                            Err(err) => return Some(format!("slow {slow}: {err}")),
                        }
                    }
                    None
                })
            })
            .collect();
        let errors: Vec<String> = callers
            .into_iter()
            .filter_map(|caller| caller.join().unwrap())
            .collect();
        assert_eq!(errors, Vec::<String>::new(), "round {round}");
        assert!(!helper.is_retired(), "round {round}");
    }
}

#[test]
fn a_hung_request_is_found_out_by_its_own_deadline_whoever_reads() {
    // A reader, then a request that hangs (its caller gives up after 100 ms
    // as a waiter), then a call with a long deadline that takes over the
    // reading role. The helper is declared hung once the hung request has
    // had its turn for as long as its caller allowed (100 ms), not at the
    // reader's 10 s deadline; meanwhile nobody else would notice.
    let helper = std::sync::Arc::new(launch(&["--test-ops"]));
    let call = |req: Vec<u8>, secs: f64| sandpool_tests::call_in_thread(&helper, req, secs);
    let reader = call(sleep_request(300, b"first"), 10.0);
    sandpool_tests::wait_for_in_flight(&helper, 1);
    let hung = call(sleep_request(600_000, b"never"), 0.1);
    sandpool_tests::wait_for_in_flight(&helper, 2);
    let later = call(request(OP_ECHO, b"later"), 10.0);
    let err = hung.join().unwrap().unwrap_err();
    assert!(matches!(err, CallError::QueueTimeout { .. }), "{err:?}");
    assert_eq!(reader.join().unwrap().unwrap(), b"first");
    match later.join().unwrap() {
        Err(CallError::Timeout { after, .. }) => {
            assert!(after < Duration::from_secs(5), "found out after {after:?}")
        }
        other => panic!("expected the helper to be found hung, got {other:?}"),
    }
    assert!(helper.is_retired());
}

#[test]
fn a_reply_nobody_read_is_no_proof_that_the_helper_hung() {
    // A call that gives up behind a slow one is answered in time, but its
    // reply sits unread (its caller is gone). A later large request that
    // has to wait for room in the pipe must read that reply, not take the
    // helper's lateness on it for a hang.
    let helper = std::sync::Arc::new(launch(&["--test-ops"]));
    let call = |req: Vec<u8>, secs: f64| sandpool_tests::call_in_thread(&helper, req, secs);
    let slow = call(sleep_request(300, b"slow"), 10.0);
    sandpool_tests::wait_for_in_flight(&helper, 1);
    let gives_up = call(request(OP_ECHO, b"early"), 0.05);
    let err = gives_up.join().unwrap().unwrap_err();
    assert!(matches!(err, CallError::QueueTimeout { .. }), "{err:?}");
    assert_eq!(slow.join().unwrap().unwrap(), b"slow");
    // Long past the abandoned call's 50 ms, its reply is still unread.
    std::thread::sleep(Duration::from_millis(200));
    let big = vec![4u8; 60_000];
    assert_eq!(
        helper.call(&request(OP_ECHO, &big), deadline(5.0)).unwrap(),
        big
    );
    assert!(!helper.is_retired());
}

/// The read syscalls `pid` has made (`syscr` in `/proc/PID/io`).
fn reads_of(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|line| line.strip_prefix("syscr: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_bind_goes_out_with_the_first_request_in_one_write() {
    for rep in 0..5 {
        let helper = launch(&[]);
        // The helper is blocked in its read of fd 0 after its Hello.
        let idle = reads_of(helper.pid());
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(reads_of(helper.pid()), idle, "blocked, not polling");
        helper.bind(b"tenant").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            reads_of(helper.pid()),
            idle,
            "rep {rep}: the Bind waits for the first request"
        );
        let reply = helper
            .call(&request(OP_ECHO, b"first"), deadline(5.0))
            .unwrap();
        assert_eq!(reply, b"first");
        // One read took the Bind and the request; its next read blocks.
        assert_eq!(reads_of(helper.pid()), idle + 1, "rep {rep}: one wake-up");
    }
}
