//! Every entry point on an OS without the Linux sandbox primitives: an error.

use thiserror::Error;

/// The sandbox cannot be built on this operating system.
#[derive(Debug, Error)]
#[error("the sandpool sandbox needs Linux (seccomp, close_range); this OS is unsupported")]
pub struct SandboxUnavailable;

/// Always fails: see [`SandboxUnavailable`].
pub fn close_inherited_fds() -> Result<(), SandboxUnavailable> {
    Err(SandboxUnavailable)
}

/// Always fails: see [`SandboxUnavailable`].
pub fn set_no_new_privs() -> Result<(), SandboxUnavailable> {
    Err(SandboxUnavailable)
}

/// Always fails: see [`SandboxUnavailable`].
pub fn apply_rlimits(_: &crate::RlimitSpec) -> Result<(), SandboxUnavailable> {
    Err(SandboxUnavailable)
}
