//! Configuration of one helper's launch and sandbox.

use std::path::PathBuf;
use std::time::Duration;

use sandpool_protocol::{
    DEFAULT_MAX_FRAME, MAX_FRAME_CEILING, MIN_FRAME_LIMIT, RlimitSpec, SandboxSpec, SeccompMode,
};
use thiserror::Error;

/// A configuration value is invalid. Names the field and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("invalid configuration: {field}: {problem}")]
pub struct ConfigError {
    /// The field.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, problem: impl Into<String>) -> Self {
        ConfigError {
            field,
            problem: problem.into(),
        }
    }
}

/// What the helper is asked to do to itself, and what the host accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxConfig {
    /// The seccomp mode the helper must install and prove. Default `enforce`;
    /// `log` and `off` only when set here explicitly.
    pub seccomp: SeccompMode,
    /// Resource limits the helper applies to itself. Default: the inherited
    /// limits, with core dumps always off.
    pub rlimits: RlimitSpec,
    /// Syscall names allowed on top of the helper's own policy. Default none.
    pub extra_syscalls: Vec<String>,
    /// Accept a helper that closed its inherited fds by the slow
    /// `/proc/self/fd` walk instead of `close_range`. Default `false`.
    pub allow_fd_walk_fallback: bool,
    /// Cross-check every Hello against the kernel: `/proc/PID/status`
    /// (`Seccomp`, `NoNewPrivs`) and `/proc/PID/fd` (only 0, 1, 2 open).
    /// Default `true`.
    pub verify_with_proc: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            seccomp: SeccompMode::Enforce,
            rlimits: RlimitSpec::default(),
            extra_syscalls: Vec::new(),
            allow_fd_walk_fallback: false,
            verify_with_proc: true,
        }
    }
}

/// How to launch one helper and what to accept from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelperConfig {
    /// The helper executable (an absolute or working-directory-relative path;
    /// there is no `PATH` search).
    pub program: PathBuf,
    /// Arguments after the program name.
    pub args: Vec<String>,
    /// Host environment variables passed through; every other variable is
    /// cleared. Default none.
    pub env_allowlist: Vec<String>,
    /// How long a launch may take from spawn to a verified Hello. Default 5 s.
    pub spawn_timeout: Duration,
    /// The largest frame payload either side may send. Default 1 MiB.
    pub max_frame: u32,
    /// Calls pipelined on one helper at once; more wait. Default 16.
    pub max_in_flight: usize,
    /// The sandbox.
    pub sandbox: SandboxConfig,
}

impl HelperConfig {
    /// A configuration with every default and the given program.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        HelperConfig {
            program: program.into(),
            args: Vec::new(),
            env_allowlist: Vec::new(),
            spawn_timeout: Duration::from_secs(5),
            max_frame: DEFAULT_MAX_FRAME,
            max_in_flight: 16,
            sandbox: SandboxConfig::default(),
        }
    }

    /// Checks every field; the error names the first invalid one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.program.as_os_str().is_empty() {
            return Err(ConfigError::new("program", "is empty"));
        }
        if !(MIN_FRAME_LIMIT..=MAX_FRAME_CEILING).contains(&self.max_frame) {
            return Err(ConfigError::new(
                "max_frame",
                format!(
                    "{} is outside {MIN_FRAME_LIMIT}..={MAX_FRAME_CEILING}",
                    self.max_frame
                ),
            ));
        }
        if !(1..=4096).contains(&self.max_in_flight) {
            return Err(ConfigError::new(
                "max_in_flight",
                format!("{} is outside 1..=4096", self.max_in_flight),
            ));
        }
        if self.spawn_timeout.is_zero() {
            return Err(ConfigError::new(
                "spawn_timeout",
                "must be greater than zero",
            ));
        }
        let bad_syscall = self.sandbox.extra_syscalls.iter().find(|name| {
            name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
        if let Some(name) = bad_syscall {
            return Err(ConfigError::new(
                "sandbox.extra_syscalls",
                format!("{name:?} is not a syscall name"),
            ));
        }
        if let Some(name) = self
            .env_allowlist
            .iter()
            .find(|name| name.is_empty() || name.contains('=') || name.contains('\0'))
        {
            return Err(ConfigError::new(
                "env_allowlist",
                format!("{name:?} is not a variable name"),
            ));
        }
        if let Some(arg) = self.args.iter().find(|arg| arg.contains('\0')) {
            return Err(ConfigError::new(
                "args",
                format!("{arg:?} contains a NUL byte"),
            ));
        }
        Ok(())
    }

    /// The spec the helper receives in `SANDPOOL_SANDBOX`.
    pub fn sandbox_spec(&self) -> SandboxSpec {
        SandboxSpec {
            seccomp: self.sandbox.seccomp,
            max_frame: self.max_frame,
            rlimits: self.sandbox.rlimits.clone(),
            extra_syscalls: self.sandbox.extra_syscalls.clone(),
        }
    }
}
