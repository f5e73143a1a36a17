//! Checking a Hello: against the configuration, and against the kernel.
//!
//! The Hello is the helper's own account, and the helper is untrusted code;
//! so unless configured otherwise the host also asks the kernel: the seccomp
//! and no_new_privs state in `/proc/PID/status`, and the open fds in
//! `/proc/PID/fd`. A helper that lies in its Hello is refused.

use sandpool_protocol::{FdCloseMethod, Hello, SeccompMode};

use crate::config::SandboxConfig;
use crate::error::HelloRefusal;

/// Checks `hello` from the helper spawned as `pid`.
pub(crate) fn verify_hello(
    hello: &Hello,
    pid: u32,
    config: &SandboxConfig,
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
    if config.verify_with_proc {
        verify_with_proc(hello, pid)?;
    }
    Ok(())
}

fn verify_with_proc(hello: &Hello, pid: u32) -> Result<(), HelloRefusal> {
    let unreadable = |error: std::io::Error| HelloRefusal::ProcUnreadable {
        pid,
        source: std::sync::Arc::new(error),
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(unreadable)?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .unwrap_or("")
            .to_owned()
    };
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
    let mut extra = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        let fd = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok());
        match fd {
            Some(0..=2) => {}
            Some(fd) => extra.push(fd),
            None => extra.push(-1),
        }
    }
    if !extra.is_empty() {
        extra.sort_unstable();
        return Err(HelloRefusal::ExtraFds { fds: extra });
    }
    Ok(())
}
