//! sandpool: per-tenant sandboxed helper processes behind pipes.
//!
//! This is the host side. A [`Pool`] keeps one helper per tenant (launched
//! lazily or taken from prewarmed spares, quiesced when idle, replaced when
//! it dies) and is what a server calls: `pool.call(tenant, request)`.
//! Underneath, a [`Launcher`] spawns helpers with posix_spawn
//! (never fork), waits for each one's Hello, checks it against the
//! configuration and the kernel, and hands back a [`Helper`] whose
//! [`call`](Helper::call) sends a request and waits, under a deadline, for its
//! reply. A helper that times out, breaks the protocol or dies is killed,
//! reaped and retired; it is never reused.
//!
//! The host must not leave SIGPIPE at its default disposition (Rust binaries
//! ignore it at startup): a write to a helper that died would otherwise kill
//! the host instead of returning `EPIPE`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod config;
mod error;
mod helper;
mod io;
#[allow(unsafe_code)] // the shared region mapping; each block has its SAFETY comment
mod launcher;
mod pool;
mod process;
mod stderr;
mod telemetry;
mod verify;

/// Human-readable sizes as `Config` uses them (re-exported from `bytesize`).
pub use bytesize::ByteSize;
pub use config::{
    BackoffConfig, Config, ConfigError, HelperConfig, MAX_DURATION, RlimitConfig, SandboxConfig,
};
pub use error::{CallError, ExitStatus, HelloRefusal, LaunchError, ProtocolViolation};
pub use helper::{Helper, Launcher};
pub use pool::{CloseCause, FailureStats, HelperInfo, Pool, PoolError, Stats};
pub use sandpool_protocol::{FdCloseMethod, Hello, RlimitSpec, SeccompMode};
pub use telemetry::METRICS;
