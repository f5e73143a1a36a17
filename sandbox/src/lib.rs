//! What a sandpool helper does to itself before it reads anything a tenant sent.
//!
//! The startup order is part of the security contract (PROTOCOL.md, section
//! 7.1, where the helper runtime's optional init hook sits between 3 and 4):
//!
//! 1. map what the helper needs (e.g. a shared memory region);
//! 2. [`close_inherited_fds`]: one `close_range(3, ~0, 0)`, or a reported fallback;
//! 3. [`drop_bounding_and_ambient`], then [`switch_user`] (optional), then
//!    [`clear_capabilities`] (in this order: each step needs a capability
//!    the next removes);
//! 4. [`set_no_new_privs`];
//! 5. [`apply_rlimits`];
//! 6. [`Filter::install`]: the seccomp filter compiled from a [`SeccompPolicy`];
//! 7. say hello.
//!
//! Steps 2 and 3 each read `/proc/self/status`; their `_with` forms
//! ([`close_inherited_fds_with`], [`drop_bounding_and_ambient_with`]) take
//! one [`ProcStatus`] reading for both, as the helper runtime does.
//!
//! This crate knows nothing about pools or frames beyond the shared enums of
//! `sandpool-protocol`. It is Linux-only; on any other OS every entry point
//! returns an explicit "unavailable" error rather than doing nothing, so a
//! helper can never come up unsandboxed by accident.
//!
//! All of the workspace's unsafe code outside the pool's launcher lives here.
#![warn(missing_docs)]

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(not(target_os = "linux"))]
mod unsupported;
#[cfg(not(target_os = "linux"))]
pub use unsupported::*;

pub use sandpool_protocol::{FdCloseMethod, RlimitSpec, SeccompMode};
