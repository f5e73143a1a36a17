//! Checking a Hello: against the configuration, and against the kernel.
//!
//! The Hello is the helper's own account, and the helper is untrusted code;
//! so unless configured otherwise the host also asks the kernel: the seccomp
//! and no_new_privs state in `/proc/PID/status`, and the open fds in
//! `/proc/PID/fd`. A helper that lies in its Hello is refused.
//!
//! Privileges: every helper must report its effective, permitted,
//! inheritable and ambient capability sets cleared, and `/proc/PID/status`
//! must show all four as 0. The bounding set can only be emptied by a
//! process holding `CAP_SETPCAP`; a helper has it when the host does and
//! keeps it across the exec, i.e. the host has `CAP_SETPCAP` in its
//! effective set and either runs as root (root's exec gets the bounding
//! set as its permitted set) or has `CAP_SETPCAP` in its ambient set. Only
//! then is `CapBnd: 0` required ([`Expected::new`]); a helper of a non-root
//! host without it keeps a bounding set it cannot use (its permitted set is
//! empty, and no_new_privs stops an exec from gaining anything). The
//! `Uid:` and `Gid:` lines (real, effective, saved, filesystem) must all be
//! the ids the Hello reports, and those the configured ones, if any.
//!
//! Kept fds: every fd a helper declares kept must be allowed by
//! `sandbox.kept_fds` (its path, and write access only where an entry says
//! so); with the kernel check, `/proc/PID/fd` must hold exactly 0, 1, 2 and
//! the declared fds, each pointing where the Hello says, opened as it says
//! (`flags:` in `/proc/PID/fdinfo/N`), and the same file (device, inode) as
//! the path names in the host's mount namespace. The helper must be one
//! thread (`Threads: 1`): `/proc/PID/fd` shows the main thread's fd table
//! only. Under the default filter the helper can no longer make a thread,
//! open, dup or replace an fd (no `clone`, `open*`, `dup*`,
//! `fcntl(F_DUPFD)`), only close one, and with kept fds the configuration
//! refuses `extra_syscalls` that would, so what the host checks after the
//! Hello can only shrink.

use std::os::unix::ffi::OsStrExt;

use sandpool_protocol::{FdAccess, FdCloseMethod, Hello, KeptFd, SeccompMode};

use crate::config::SandboxConfig;
use crate::error::HelloRefusal;

/// `CAP_SETPCAP`'s bit in a `/proc/PID/status` capability mask.
const CAP_SETPCAP_BIT: u64 = 1 << 8;

/// What the host requires of a helper's privileges, fixed at
/// `Launcher::new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Expected {
    /// The configured uid (resolved from `sandbox.user`), if any.
    pub(crate) uid: Option<u32>,
    /// The configured gid (resolved from `sandbox.group`), if any.
    pub(crate) gid: Option<u32>,
    /// The helper can empty its bounding set, so it must.
    pub(crate) bounding_required: bool,
}

impl Expected {
    /// The expectations for helpers of this host, with the configured ids.
    /// The bounding set is required empty when this host could drop it in
    /// its helpers (module doc); if the host's own status cannot be read,
    /// it is required (fail closed).
    pub(crate) fn new(uid: Option<u32>, gid: Option<u32>) -> Expected {
        let bounding_required = match std::fs::read_to_string("/proc/self/status") {
            Ok(status) => {
                let mask = |name| cap_mask(status_field(&status, name)).unwrap_or(u64::MAX);
                let root = nix::unistd::geteuid().is_root() || nix::unistd::getuid().is_root();
                mask("CapEff") & CAP_SETPCAP_BIT != 0
                    && (root || mask("CapAmb") & CAP_SETPCAP_BIT != 0)
            }
            Err(_) => true,
        };
        Expected {
            uid,
            gid,
            bounding_required,
        }
    }
}

/// The value of `name:` in a `/proc/PID/status` text, trimmed; "" if absent.
fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
        .unwrap_or("")
}

/// A capability mask of `/proc/PID/status` (16 hex digits).
fn cap_mask(value: &str) -> Option<u64> {
    u64::from_str_radix(value, 16).ok()
}

/// The helper's `/proc` files the kernel check reads, opened while the
/// helper starts up: the first lookup of a new process's `/proc` entries
/// costs about as much as reading them (29 us for a first `stat`, 18 us
/// for `status` after it, measured here), and the host would otherwise
/// wait for the Hello doing nothing. What they hold is made when they are
/// read, after the Hello, so the check sees the helper's state then. The
/// pid cannot be another process's meanwhile: the helper is this host's
/// unreaped child.
#[derive(Debug)]
pub(crate) struct ProcFiles {
    status: std::fs::File,
    fds: std::os::fd::OwnedFd,
}

impl ProcFiles {
    /// Opens `/proc/PID/status` and the directory `/proc/PID/fd`.
    pub(crate) fn open(pid: u32) -> std::io::Result<ProcFiles> {
        let status = std::fs::File::open(format!("/proc/{pid}/status"))?;
        let fds = nix::fcntl::open(
            format!("/proc/{pid}/fd").as_str(),
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        Ok(ProcFiles { status, fds })
    }
}

/// Checks `hello` from the helper spawned as `pid`; `proc` is its `/proc`
/// files, opened while it started (or why they could not be: the check
/// then refuses it, when it is on).
pub(crate) fn verify_hello(
    hello: &Hello,
    pid: u32,
    proc: std::io::Result<ProcFiles>,
    config: &SandboxConfig,
    expected: &Expected,
) -> Result<(), HelloRefusal> {
    if hello.pid != pid {
        return Err(HelloRefusal::Pid {
            reported: hello.pid,
            spawned: pid,
        });
    }
    if hello.seccomp != config.seccomp {
        return Err(HelloRefusal::Seccomp {
            got: hello.seccomp,
            required: config.seccomp,
        });
    }
    if !hello.no_new_privs {
        return Err(HelloRefusal::NoNewPrivs);
    }
    if hello.fd_close_method != FdCloseMethod::CloseRange && !config.allow_fd_walk_fallback {
        return Err(HelloRefusal::FdCloseMethod(hello.fd_close_method));
    }
    if !hello.caps_cleared {
        return Err(HelloRefusal::CapabilitiesKept);
    }
    if expected.bounding_required && !hello.bounding_cleared {
        return Err(HelloRefusal::BoundingSetKept);
    }
    if let Some(configured) = expected.uid.filter(|uid| *uid != hello.uid) {
        return Err(HelloRefusal::WrongUser {
            reported: hello.uid,
            configured,
        });
    }
    if let Some(configured) = expected.gid.filter(|gid| *gid != hello.gid) {
        return Err(HelloRefusal::WrongGroup {
            reported: hello.gid,
            configured,
        });
    }
    for kept in &hello.kept_fds {
        let writes = kept.access.writes();
        if !config
            .kept_fds
            .iter()
            .any(|rule| rule.allows(&kept.path, writes))
        {
            return Err(HelloRefusal::KeptFdNotAllowed {
                fd: kept.fd,
                path: kept.path_lossy().into_owned(),
                access: kept.access.as_str(),
            });
        }
    }
    if config.verify_with_proc {
        verify_with_proc(hello, pid, proc, expected)?;
    }
    Ok(())
}

/// Checks one declared kept fd against `/proc/PID/fd/N` and
/// `/proc/PID/fdinfo/N`.
fn verify_kept_fd(kept: &KeptFd, pid: u32) -> Result<(), HelloRefusal> {
    let mismatch = |declared: String, kernel: String| HelloRefusal::KeptFdMismatch {
        fd: kept.fd,
        declared,
        kernel,
    };
    let fd = kept.fd;
    let link = format!("/proc/{pid}/fd/{fd}");
    let target = std::fs::read_link(&link)
        .map_err(|err| mismatch(kept.path_lossy().into_owned(), format!("unreadable: {err}")))?;
    if target.as_os_str().as_bytes() != kept.path.as_slice() {
        return Err(mismatch(
            kept.path_lossy().into_owned(),
            target.to_string_lossy().into_owned(),
        ));
    }
    // The name is the file's name in the mount namespace it was opened
    // in, which the init hook may have made its own (a bind mount over an
    // allowed path): the file must be the one that path names here.
    use std::os::unix::fs::MetadataExt;
    let identity = |meta: std::fs::Metadata| (meta.dev(), meta.ino());
    let held = std::fs::metadata(&link)
        .map(identity)
        .map_err(|err| mismatch(kept.path_lossy().into_owned(), format!("unreadable: {err}")))?;
    let named = std::fs::metadata(std::ffi::OsStr::from_bytes(&kept.path)).map(identity);
    if named.as_ref().ok() != Some(&held) {
        return Err(mismatch(
            format!("{} (device, inode {:?})", kept.path_lossy(), named.ok()),
            format!("another file (device, inode {held:?})"),
        ));
    }
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .map_err(|err| mismatch(kept.access.as_str().into(), format!("unreadable: {err}")))?;
    let flags = status_field(&info, "flags");
    let access = u32::from_str_radix(flags, 8)
        .ok()
        .and_then(|flags| FdAccess::from_accmode(flags & 0o3));
    if access != Some(kept.access) {
        return Err(mismatch(
            kept.access.as_str().into(),
            access.map_or_else(|| format!("flags {flags:?}"), |a| a.as_str().into()),
        ));
    }
    Ok(())
}

/// A `/proc` text file, read from its start into a buffer sized for it
/// (`read_to_string` on a path stats the file, finds size 0 and grows its
/// buffer from 32 bytes: eight reads for a status file, against two).
fn read_proc_text(mut file: std::fs::File) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::with_capacity(4096);
    file.read_to_string(&mut text)?;
    Ok(text)
}

fn verify_with_proc(
    hello: &Hello,
    pid: u32,
    proc: std::io::Result<ProcFiles>,
    expected: &Expected,
) -> Result<(), HelloRefusal> {
    let unreadable = |error: std::io::Error| HelloRefusal::ProcUnreadable {
        pid,
        source: std::sync::Arc::new(error),
    };
    let ProcFiles { status, fds } = proc.map_err(unreadable)?;
    let status = read_proc_text(status).map_err(unreadable)?;
    let field = |name: &str| status_field(&status, name).to_owned();
    // The kernel reports 2 (filter) for both an enforcing and a logging filter.
    let want_seccomp = if hello.seccomp == SeccompMode::Off {
        "0"
    } else {
        "2"
    };
    let seccomp = field("Seccomp");
    if seccomp != want_seccomp {
        return Err(HelloRefusal::KernelDisagrees {
            pid,
            field: "Seccomp",
            kernel: seccomp,
        });
    }
    let nnp = field("NoNewPrivs");
    if nnp != "1" {
        return Err(HelloRefusal::KernelDisagrees {
            pid,
            field: "NoNewPrivs",
            kernel: nnp,
        });
    }
    // One thread: `/proc/PID/fd` is the main thread's fd table only, and a
    // thread made without CLONE_FILES (or one blocked in a call that
    // installs an fd later: recvmsg, accept) would hold fds no check
    // here sees. Under the filter no thread can be made, so one stays one.
    let threads = field("Threads");
    if threads != "1" {
        return Err(HelloRefusal::KernelDisagrees {
            pid,
            field: "Threads",
            kernel: threads,
        });
    }
    let disagrees = |field: &'static str, kernel: &str| HelloRefusal::KernelDisagrees {
        pid,
        field,
        kernel: kernel.to_owned(),
    };
    let mut empty_sets = vec!["CapEff", "CapPrm", "CapInh", "CapAmb"];
    if expected.bounding_required || hello.bounding_cleared {
        empty_sets.push("CapBnd");
    }
    for name in empty_sets {
        let value = status_field(&status, name);
        if cap_mask(value) != Some(0) {
            return Err(disagrees(name, value));
        }
    }
    for (name, id) in [("Uid", hello.uid), ("Gid", hello.gid)] {
        // Real, effective, saved and filesystem id, in that order.
        let value = status_field(&status, name);
        let ids: Vec<Option<u32>> = value.split_whitespace().map(|v| v.parse().ok()).collect();
        if ids.len() != 4 || ids.iter().any(|got| *got != Some(id)) {
            return Err(disagrees(name, value));
        }
    }
    let mut extra = Vec::new();
    let mut fds = nix::dir::Dir::from_fd(fds).map_err(|errno| unreadable(errno.into()))?;
    for entry in fds.iter() {
        let entry = entry.map_err(|errno| unreadable(errno.into()))?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let fd = std::str::from_utf8(name)
            .ok()
            .and_then(|name| name.parse::<i32>().ok());
        let declared = |fd: i32| {
            hello
                .kept_fds
                .iter()
                .any(|kept| i64::from(kept.fd) == fd.into())
        };
        match fd {
            Some(0..=2) => {}
            Some(fd) if declared(fd) => {}
            Some(fd) => extra.push(fd),
            None => extra.push(-1),
        }
    }
    if !extra.is_empty() {
        extra.sort_unstable();
        return Err(HelloRefusal::ExtraFds { fds: extra });
    }
    for kept in &hello.kept_fds {
        verify_kept_fd(kept, pid)?;
    }
    Ok(())
}
