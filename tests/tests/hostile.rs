//! The hostile helper matrix: every way a compromised helper can misbehave,
//! each run in a pool while other tenants' calls are in flight.
//!
//! For each case: the hostile tenant's call fails with the right typed error,
//! its helper is killed and reaped, the host's memory stays bounded, every
//! bystander call made at the same time succeeds, and after the pool is gone
//! no fd and no child is left. Cases run one after another in this binary (so
//! the fd and child accounting is exact).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use sandpool::{CallError, Config, HelloRefusal, LaunchError, LaunchMode, Pool, ProtocolViolation};
use sandpool_protocol::DecodeError;
use sandpool_reference_helper::reference::*;
use sandpool_tests::{
    Bystanders, children, open_fds, pool_config, process_exists, rss_kib, serial, wait_for,
};

/// Runs one hostile case and checks everything around it.
fn case(
    name: &str,
    args: &[&str],
    tune: impl FnOnce(&mut Config),
    attack: impl FnOnce(&Pool) -> CallError,
    check: impl FnOnce(&CallError) -> bool,
) {
    let fds_before = open_fds();
    let rss_before = rss_kib();
    let mut config = pool_config(&["--test-ops"]);
    config.args.extend(args.iter().map(|a| a.to_string()));
    config.spares = 0;
    config.request_timeout = Duration::from_secs(5);
    tune(&mut config);
    // Bystanders use the well-behaved helper: the hostile one's flags are
    // launch arguments, so they get a pool of their own.
    let good = Arc::new(Pool::new(pool_config(&[])).unwrap());
    let evil = Pool::new(config).unwrap();
    let bystanders = Bystanders::start(&good, 3);
    assert!(wait_for(Duration::from_secs(10), || bystanders.calls() > 10));
    let calls_before = bystanders.calls();

    let err = attack(&evil);
    assert!(check(&err), "{name}: unexpected error {err:?}");
    let pids: Vec<u32> = children().into_iter().map(|(pid, _)| pid).collect();
    assert!(
        wait_for(Duration::from_secs(10), || bystanders.calls()
            > calls_before + 10),
        "{name}: bystanders kept going"
    );

    let failures = bystanders.finish();
    assert!(
        failures.is_empty(),
        "{name}: bystander calls failed: {failures:?}"
    );
    drop(evil);
    drop(good);
    for pid in pids {
        assert!(!process_exists(pid), "{name}: pid {pid} reaped");
    }
    assert_eq!(children(), vec![], "{name}: no child left");
    assert_eq!(open_fds(), fds_before, "{name}: no fd left");
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(grown < 64 * 1024, "{name}: host RSS grew by {grown} KiB");
}

fn protocol(err: &CallError, want: impl Fn(&ProtocolViolation) -> bool) -> bool {
    matches!(err, CallError::Protocol { violation, .. } if want(violation))
}

fn seccomp(err: &CallError) -> bool {
    err.is_seccomp_kill()
}

fn echo_call(pool: &Pool) -> CallError {
    pool.call("evil", &request(OP_ECHO, b"x")).unwrap_err()
}

fn short_call(pool: &Pool) -> CallError {
    pool.call_with_deadline(
        "evil",
        &request(OP_ECHO, b"x"),
        Instant::now() + Duration::from_millis(500),
    )
    .unwrap_err()
}

#[test]
fn hostile_helper_matrix() {
    let _serial = serial(); // each case counts the process's fds
    case(
        "claims a 4 GiB frame",
        &["--misbehave", "corpus:claims-4gib"],
        |_| {},
        echo_call,
        |e| {
            protocol(e, |v| {
                matches!(
                    v,
                    ProtocolViolation::Frame(DecodeError::Oversized { len: u32::MAX, .. })
                )
            })
        },
    );
    case(
        "claims the max frame, sends a byte, hangs",
        &["--misbehave", "corpus:claims-max-sends-1"],
        |_| {},
        short_call,
        |e| matches!(e, CallError::Timeout { .. }),
    );
    case(
        "truncated frame then hang",
        &["--misbehave", "corpus:truncated-payload"],
        |_| {},
        short_call,
        |e| matches!(e, CallError::Timeout { .. }),
    );
    case(
        "bytes that are not a frame",
        &["--misbehave", "garbage"],
        |_| {},
        echo_call,
        |e| {
            protocol(e, |v| {
                matches!(v, ProtocolViolation::Frame(DecodeError::BadMagic { .. }))
            })
        },
    );
    case(
        "wrong request id",
        &["--misbehave", "wrong-id"],
        |_| {},
        echo_call,
        |e| protocol(e, |v| matches!(v, ProtocolViolation::UnexpectedId { .. })),
    );
    case(
        "answers twice",
        &["--misbehave", "answer-twice"],
        |_| {},
        |pool| {
            pool.call("evil", &request(OP_ECHO, b"x")).unwrap();
            pool.call("evil", &request(OP_ECHO, b"y")).unwrap_err()
        },
        |e| {
            protocol(e, |v| {
                matches!(
                    v,
                    ProtocolViolation::Unsolicited { .. } | ProtocolViolation::UnexpectedId { .. }
                )
            })
        },
    );
    case(
        "answers before being asked",
        &["--misbehave", "pre-answer"],
        |_| {},
        |pool| {
            pool.call("evil", &request(OP_ECHO, b"x")).unwrap();
            std::thread::sleep(Duration::from_millis(500));
            pool.call("evil", &request(OP_ECHO, b"y")).unwrap_err()
        },
        |e| protocol(e, |v| matches!(v, ProtocolViolation::UnexpectedId { .. })),
    );
    case(
        "never sends Hello",
        &["--misbehave", "no-hello"],
        |c| c.spawn_timeout = Duration::from_millis(300),
        echo_call,
        |e| matches!(e, CallError::Launch(l) if matches!(**l, LaunchError::HelloTimeout { .. })),
    );
    case(
        "Hello that lies about seccomp",
        &["--misbehave", "lie-seccomp"],
        |_| {},
        echo_call,
        |e| matches!(e, CallError::Launch(l) if matches!(**l, LaunchError::HelloRefused { refusal: HelloRefusal::KernelDisagrees { .. }, .. })),
    );
    case(
        "Hello that lies about its capabilities",
        &["--misbehave", "keep-caps"],
        // Direct: spawned by the root host it starts with every capability
        // to keep (the launcher process hands its helpers none).
        |c| c.launch_mode = LaunchMode::Direct,
        echo_call,
        |e| matches!(e, CallError::Launch(l) if matches!(**l, LaunchError::HelloRefused { refusal: HelloRefusal::KernelDisagrees { field: "CapEff", .. }, .. })),
    );
    case(
        "writes stderr without end",
        &["--misbehave", "stderr-flood"],
        |_| {},
        short_call,
        |e| matches!(e, CallError::Timeout { .. }),
    );
    case(
        "stops reading stdin",
        &["--misbehave", "no-read"],
        |_| {},
        |pool| {
            // Far more than a pipe holds: the host's write would block forever.
            pool.call_with_deadline(
                "evil",
                &request(OP_ECHO, &vec![0u8; 512 * 1024]),
                Instant::now() + Duration::from_millis(500),
            )
            .unwrap_err()
        },
        |e| matches!(e, CallError::Timeout { .. }),
    );
    case(
        "exits mid-response",
        &["--misbehave", "exit-mid-response"],
        |_| {},
        |pool| {
            pool.call("evil", &request(OP_ECHO, &[1; 1000]))
                .unwrap_err()
        },
        |e| {
            matches!(
                e,
                CallError::Died {
                    status: sandpool::ExitStatus::Exited(0),
                    ..
                }
            )
        },
    );
    case(
        "gets SIGSTOP'd",
        &[],
        |_| {},
        |pool| {
            pool.prewarm("evil").unwrap();
            let pid = pool.helper_info("evil").unwrap().pid;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGSTOP,
            )
            .unwrap();
            short_call(pool)
        },
        |e| matches!(e, CallError::Timeout { .. }),
    );
    for (what, op, body) in [
        ("spawns a process", OP_SPAWN, &b""[..]),
        ("opens a file", OP_OPEN, b"/etc/passwd"),
        ("creates a socket", OP_SOCKET, b""),
        ("calls ptrace", OP_PTRACE, b""),
        ("calls execve", OP_EXEC, b""),
        ("maps locked memory", OP_MMAP_LOCKED, b""),
        ("poisons a page with madvise", OP_MADVISE_HWPOISON, b""),
    ] {
        case(
            what,
            &[],
            |_| {},
            |pool| pool.call("evil", &request(op, body)).unwrap_err(),
            seccomp,
        );
    }
}

/// The matrix's rows of resource abuse: no forbidden syscall, only memory.
/// (A helper that spins after its reply is in `containment.rs`: its kill
/// comes with no call in flight.)
#[test]
fn hostile_resource_matrix() {
    let _serial = serial(); // each case counts the process's fds
    case(
        "allocates 3 GiB (default address-space limit)",
        &[],
        |_| {},
        |pool| pool.call("evil", &grow_request(3 * 1024)).unwrap_err(),
        |e| {
            matches!(
                e,
                CallError::LimitExceeded {
                    limit: sandpool::Limit::AddressSpace { .. },
                    ..
                }
            )
        },
    );
    grows_past_max_helper_memory("grows past max_helper_memory in a call", |_| {});
}

/// The row "grows past `max_helper_memory` in a call", on the helper
/// `program` sets (the Rust reference helper if it leaves it).
fn grows_past_max_helper_memory(name: &str, program: impl FnOnce(&mut Config)) {
    case(
        name,
        &[],
        |config| {
            program(config);
            config.max_helper_memory = sandpool::SizeLimit::Bytes(sandpool::ByteSize::mib(64));
            config.sample_interval = Duration::from_millis(10);
        },
        |pool| {
            // Each call touches 200 MiB; the keeper's next sample (10 ms)
            // kills the helper in the middle of one.
            (0..20)
                .find_map(|_| pool.call("evil", &grow_request(200)).err())
                .unwrap()
        },
        |e| {
            matches!(
                e,
                CallError::LimitExceeded {
                    limit: sandpool::Limit::Memory { .. },
                    ..
                }
            )
        },
    );
}

/// The rows of both matrices that a helper's own code can play (the
/// protocol attacks are the host's side, the same whatever the helper's
/// language), played by the C reference helper through the C runtime.
#[test]
fn hostile_c_helper_matrix() {
    let _serial = serial(); // each case counts the process's fds
    let c = |config: &mut Config| config.program = sandpool_tests::c_helper_bin();
    for (name, op, body) in [
        ("C: opens a file", OP_OPEN, &b"/etc/passwd"[..]),
        ("C: opens a socket", OP_SOCKET, &b""[..]),
        ("C: forks", OP_SPAWN, &b""[..]),
        ("C: execs", OP_EXEC, &b""[..]),
    ] {
        case(
            name,
            &[],
            c,
            |pool| pool.call("evil", &request(op, body)).unwrap_err(),
            seccomp,
        );
    }
    case(
        "C: sleeps past the deadline",
        &[],
        c,
        |pool| {
            pool.call_with_deadline(
                "evil",
                &sleep_request(60_000, b"late"),
                Instant::now() + Duration::from_millis(300),
            )
            .unwrap_err()
        },
        |e| matches!(e, CallError::Timeout { .. }),
    );
    case(
        "C: allocates 3 GiB (default address-space limit)",
        &[],
        c,
        |pool| {
            let err = pool.call("evil", &grow_request(3 * 1024)).unwrap_err();
            // malloc fails in C (no abort, unlike Rust's allocator): the
            // handler answers an Error frame, and the helper serves on.
            let after = pool.call("evil", &grow_request(1)).unwrap();
            assert_eq!(after, 1u32.to_le_bytes(), "the helper serves on");
            err
        },
        |e| matches!(e, CallError::Helper(text) if text.contains("malloc of 3072 MiB failed")),
    );
    grows_past_max_helper_memory("C: grows past max_helper_memory in a call", c);
}

/// A seccomp kill names the syscall, from the kernel's audit record (read
/// from /dev/kmsg: where this process cannot read it, the name is absent).
#[test]
fn a_seccomp_kill_names_the_syscall_from_the_kernel_log() {
    let _serial = serial(); // each case counts the process's fds
    let readable = std::fs::File::open("/dev/kmsg").is_ok();
    let mut config = pool_config(&["--test-ops"]);
    config.spares = 0;
    let pool = Pool::new(config).unwrap();
    for (op, body, names) in [
        // glibc's open() is openat, musl's open.
        (OP_OPEN, &b"/etc/passwd"[..], &["openat", "open"][..]),
        (OP_SOCKET, b"", &["socket"]),
        (OP_PTRACE, b"", &["ptrace"]),
        (OP_EXEC, b"", &["execve"]),
        // std's spawn on musl first makes the pipe that carries an exec
        // error back (on glibc it goes straight to posix_spawn's clone).
        (OP_SPAWN, b"", &["clone3", "clone", "vfork", "pipe2"]),
    ] {
        // A tenant each: two kills in a row would back one off.
        let kill = |attempt: u32| {
            pool.call(format!("evil-{op}-{attempt}"), &request(op, body))
                .unwrap_err()
        };
        let mut err = kill(0);
        if readable && matches!(&err, CallError::Died { syscall: None, .. }) {
            // Without an audit daemon the kernel prints at most
            // printk_ratelimit_burst (10) audit records per
            // printk_ratelimit (5 s); the kills of the other tests may
            // have used them up. Once the interval has passed, the
            // record must be there.
            std::thread::sleep(Duration::from_millis(5500));
            err = kill(1);
        }
        let CallError::Died {
            status, syscall, ..
        } = &err
        else {
            panic!("op {op:#x}: {err:?}");
        };
        assert!(status.is_seccomp_kill(), "op {op:#x}: {err:?}");
        if readable {
            let name = syscall.as_deref().unwrap_or("none");
            assert!(
                names.contains(&name),
                "op {op:#x}: named {name}, expected {names:?}"
            );
            assert!(err.to_string().contains(name), "{err}");
        } else {
            assert_eq!(syscall, &None);
        }
    }
}

/// The pipe inode behind each of a process's fds.
fn pipes_of(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .map(|target| target.display().to_string())
        .collect()
}

#[test]
fn a_helper_cannot_reach_another_tenants_data() {
    let _serial = serial(); // each case counts the process's fds
    let pool = Pool::new(pool_config(&["--test-ops"])).unwrap();
    pool.call("tenant-a", &request(OP_ECHO, b"a's page"))
        .unwrap();
    pool.call("tenant-b", &request(OP_ECHO, b"b's page"))
        .unwrap();
    let a = pool.helper_info("tenant-a").unwrap().pid;
    let b = pool.helper_info("tenant-b").unwrap().pid;
    let (a_fds, b_fds) = (pipes_of(a), pipes_of(b));
    assert_eq!(
        b_fds.len(),
        3,
        "b holds exactly its stdin, stdout and stderr: {b_fds:?}"
    );
    assert!(b_fds.iter().all(|f| f.starts_with("pipe:[")), "{b_fds:?}");
    for fd in &b_fds {
        assert!(!a_fds.contains(fd), "b shares {fd} with a");
    }
    // No shared memory: every writable mapping of b is private to it.
    let maps = std::fs::read_to_string(format!("/proc/{b}/maps")).unwrap();
    for line in maps.lines() {
        let perms = line.split_whitespace().nth(1).unwrap();
        assert!(
            !perms.contains('s') || !perms.contains('w'),
            "shared writable mapping in b: {line}"
        );
    }
    // And b cannot open anything, /proc/<a>/mem included: it dies trying.
    let err = pool
        .call(
            "tenant-b",
            &request(OP_OPEN, format!("/proc/{a}/mem").as_bytes()),
        )
        .unwrap_err();
    assert!(err.is_seccomp_kill(), "{err:?}");
    assert_eq!(
        pool.call("tenant-a", &request(OP_ECHO, b"still a"))
            .unwrap(),
        b"still a"
    );
    assert_eq!(pool.helper_info("tenant-a").unwrap().pid, a);
}
