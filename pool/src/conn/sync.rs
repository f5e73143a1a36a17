//! The synchronisation primitives of the call path's shared state: std's,
//! or loom's under `--cfg sandpool_loom`, so a model check explores the real code.

#[cfg(sandpool_loom)]
pub(crate) use loom::sync::atomic::{AtomicU8, Ordering};
#[cfg(sandpool_loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(sandpool_loom)]
pub(crate) use loom::thread::{Thread, current, yield_now};

#[cfg(not(sandpool_loom))]
pub(crate) use std::sync::atomic::{AtomicU8, Ordering};
#[cfg(not(sandpool_loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};
#[cfg(not(sandpool_loom))]
pub(crate) use std::thread::{Thread, current, yield_now};

/// Locks `mutex`; a panic elsewhere while it was held (none is expected:
/// nothing under these locks can panic) does not poison the call path.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Parks the calling thread for at most `timeout` (loom models have no
/// clock: there it parks until unparked).
pub(crate) fn park_timeout(timeout: std::time::Duration) {
    #[cfg(sandpool_loom)]
    {
        let _ = timeout;
        loom::thread::park();
    }
    #[cfg(not(sandpool_loom))]
    std::thread::park_timeout(timeout);
}
