//! sandpool: per-tenant sandboxed helper processes behind pipes.
//!
//! This is the host side. A [`Pool`] keeps one helper per tenant (launched
//! lazily or taken from prewarmed spares, quiesced when idle, replaced when
//! it dies) and is what a server calls, from threads
//! (`pool.call(tenant, request)`, `pool.call_batch`) or async tasks
//! (`pool.call_async(tenant, request).await`, runtime-agnostic).
//! Underneath, a [`Launcher`] spawns helpers with posix_spawn
//! (never fork), waits for each one's Hello, checks it against the
//! configuration and the kernel, and hands back a [`Helper`] whose
//! [`call`](Helper::call) sends a request and waits, under a deadline, for its
//! reply. One reactor thread per pool drives the helpers' pipes for callers
//! that do not read their own replies. A helper that times out, breaks the
//! protocol or dies is killed, reaped and retired; it is never reused.
//!
//! The host must not leave SIGPIPE at its default disposition (Rust binaries
//! ignore it at startup): a write to a helper that died would otherwise kill
//! the host instead of returning `EPIPE`.
//!
//! ```no_run
//! use sandpool::{Config, Pool};
//!
//! // The helper binary ships beside the server's own executable.
//! let pool = Pool::new(Config::new("@exe_dir/redo-helper"))?;
//! let page = pool.call("tenant-42", b"GetPage 1663/16384/2619 blk 0")?;
//! # drop(page);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A helper is a program that calls `sandpool_helper::serve_main` (Rust, the
//! `sandpool-helper` crate) or `sandpool_serve` (C, `sandpool_helper.h`)
//! first thing; see the README's "Writing a helper in Rust" and "... in C",
//! and PROTOCOL.md for any other language.
//!
//! # Cargo features
//!
//! Both on by default:
//!
//! - `toml`: `Config::from_toml` (the `toml` crate). Without it a
//!   [`Config`] still deserializes through serde from any format.
//! - `metrics`: the pool records every metric of [`METRICS`] into the
//!   `metrics` facade. Without it nothing is recorded, at no cost;
//!   [`Pool::stats`] still counts.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod config;
mod conn;
mod error;
mod host;
mod kernel_log;
mod launch;
pub mod lifecycle;
mod policy;
mod pool;
mod reactor;
mod region;
mod telemetry;

/// Human-readable sizes as `Config` uses them (re-exported from `bytesize`).
pub use bytesize::ByteSize;
pub use config::{
    BackoffConfig, Config, ConfigError, DEFAULT_ADDRESS_SPACE, DEFAULT_MAX_HELPER_MEMORY,
    DEFAULT_MAX_IDLE_CPU, EXE_DIR, HelperConfig, HostConfig, IdlePolicyKind, KeptFdRule,
    LaunchMode, MAX_DURATION, MIN_ADDRESS_SPACE, MemoryBudget, RlimitConfig, SandboxConfig,
    SizeLimit, TenantPolicy, TenantPolicyRule, TimeLimit,
};
pub use conn::Helper;
pub use error::{
    CallError, ExitStatus, HelloRefusal, LaunchError, Limit, ProtocolViolation, RetireReason,
};
pub use host::HostJoinError;
pub use launch::Launcher;
pub use lifecycle::{AdaptiveParams, IdlePolicy};
pub use pool::{CloseCause, FailureStats, HelperInfo, HelperMemory, Pool, PoolError, Stats};
pub use sandpool_protocol::{
    DecodeError, FdAccess, FdCloseMethod, Hello, KeptFd, Kind, PayloadError, RegionError,
    RlimitSpec, SeccompMode,
};
pub use telemetry::METRICS;

/// Signals for [`Helper::signal`] (re-exported from `nix`).
pub use nix::sys::signal::Signal;
