//! no_new_privs, resource limits and the process name.

use nix::errno::Errno;
use nix::sys::resource::{Resource, setrlimit};
use thiserror::Error;

use crate::RlimitSpec;

/// `PR_SET_NO_NEW_PRIVS` could not be set.
#[derive(Debug, Error)]
#[error("prctl(PR_SET_NO_NEW_PRIVS) failed: {0}")]
pub struct NoNewPrivsError(Errno);

/// A resource limit could not be applied.
#[derive(Debug, Error)]
#[error("setrlimit({resource}, {value}) failed: {source}")]
pub struct RlimitError {
    /// The limit's name.
    pub resource: &'static str,
    /// The value asked for.
    pub value: u64,
    /// The error.
    pub source: Errno,
}

/// Sets `PR_SET_NO_NEW_PRIVS`: from now on, no exec can gain privileges
/// (setuid bits, file capabilities), and an unprivileged seccomp filter may be
/// installed.
///
/// # References
/// - <https://man7.org/linux/man-pages/man2/pr_set_no_new_privs.2const.html>
pub fn set_no_new_privs() -> Result<(), NoNewPrivsError> {
    nix::sys::prctl::set_no_new_privs().map_err(NoNewPrivsError)
}

/// Sets the name the kernel shows for this process (`comm`: `ps`, `top`,
/// `/proc/PID/status`) to the last path component of `program`, cut to the
/// kernel's 15 bytes. A helper launched from a pinned memfd image would
/// otherwise show as the fd number it was executed from (e.g. `5`).
///
/// # References
/// - <https://man7.org/linux/man-pages/man2/pr_set_name.2const.html>
pub fn set_process_name(program: &[u8]) -> Result<(), Errno> {
    let base = program.rsplit(|b| *b == b'/').next().unwrap_or(program);
    let name: Vec<u8> = base.iter().copied().filter(|b| *b != 0).take(15).collect();
    if name.is_empty() {
        return Ok(());
    }
    let name = std::ffi::CString::new(name).map_err(|_| Errno::EINVAL)?;
    nix::sys::prctl::set_name(&name)
}

/// Applies the limits in `spec` (soft and hard alike, so they cannot be raised
/// again) and always sets the core-dump limit to 0: a crashing helper must not
/// write tenant memory to disk.
pub fn apply_rlimits(spec: &RlimitSpec) -> Result<(), RlimitError> {
    let limits = [
        ("RLIMIT_CORE", Resource::RLIMIT_CORE, Some(0)),
        ("RLIMIT_AS", Resource::RLIMIT_AS, spec.address_space),
        ("RLIMIT_NOFILE", Resource::RLIMIT_NOFILE, spec.open_files),
        ("RLIMIT_CPU", Resource::RLIMIT_CPU, spec.cpu_seconds),
        ("RLIMIT_FSIZE", Resource::RLIMIT_FSIZE, spec.file_size),
    ];
    for (name, resource, value) in limits {
        if let Some(value) = value {
            setrlimit(resource, value, value).map_err(|source| RlimitError {
                resource: name,
                value,
                source,
            })?;
        }
    }
    Ok(())
}
