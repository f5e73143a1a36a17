//! Several processes on one host (`Config.host`): a host-wide cap on live
//! helpers and one leader among the processes sharing a directory, both
//! made of `flock(2)` locks on files in that directory.
//!
//! Why `flock`: a lock belongs to the open file description, and the kernel
//! drops it when the last fd of that description closes, which includes the
//! death of its process by SIGKILL; a waiter blocked on it is woken then.
//! Nothing is left to clean up by hand, and no lock is held by a pid that
//! could be reused. Classic POSIX (`fcntl`) locks are not used: they belong
//! to the process and are lost when *any* fd of the file closes, so a
//! library that opens the file twice (a probe) would drop its own lock.
//!
//! - **Slots.** `slot-<i>.lock`, `i < host.max_helpers`. Every live helper
//!   of every process holds one: an exclusive non-blocking lock taken by the
//!   process before the spawn ([`Host::try_acquire`]) and kept in the
//!   [`Helper`](crate::Helper) (its last field), so it is released only
//!   after the helper has been killed and reaped.
//! - **Processes.** Each process holds `proc-<pid>.lock` while it lives
//!   (locked as `proc-<pid>.tmp`, then renamed, so it is never seen
//!   unlocked while its process lives).
//! - **Leader.** One thread per pool blocks in `flock(leader.lock)`; the
//!   process whose thread holds it leads (see `leader.rs`).
//!
//! Every file is opened by the host process itself with O_CLOEXEC (std's
//! `File`), so no lock's description is ever inherited by a helper or the
//! launcher: a helper cannot hold, release or see the host's locks.

mod files;
mod leader;

use std::fs::File;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use event_listener::Event;
use nix::fcntl::Flock;
use parking_lot::Mutex;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::config::HostConfig;
use crate::error::LaunchError;
use crate::telemetry::{self, Gauge};
use leader::Leader;

/// A heartbeat older than this is stale: the leader is hung (it keeps the
/// lock while it lives, so no one else takes over).
const STALE_HEARTBEAT: Duration = Duration::from_secs(5);

/// Joining a host directory at `Pool::new` failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HostJoinError {
    /// The directory could not be created.
    #[error("creating the host directory {path} failed")]
    CreateDir {
        /// The directory (`host.dir`).
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// This process's liveness lock (`proc-<pid>.lock`) could not be
    /// created or locked.
    #[error("locking this process's file {path} failed")]
    ProcLock {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The leader lock file could not be opened.
    #[error("opening the leader lock {path} failed")]
    LeaderLock {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The leader thread could not be started.
    #[error("starting the host leader thread failed")]
    LeaderThread(#[source] io::Error),
}

/// The slots this process holds, shared by the [`Host`] and every
/// [`HostSlot`] (which may outlive the pool inside a helper handle).
struct SlotTable {
    /// `held[i]`: this process holds slot `i` (its own scan skips it).
    held: Mutex<Vec<bool>>,
    /// Notified whenever one of this process's slots is released.
    freed: Event,
    /// Slots released so far (tells a spare refill the host has room again).
    released: AtomicUsize,
}

/// One host-wide helper slot, held (an exclusive `flock` on its file) until
/// dropped.
pub(crate) struct HostSlot {
    table: Arc<SlotTable>,
    index: usize,
    lock: Option<Flock<File>>,
}

impl std::fmt::Debug for HostSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSlot")
            .field("index", &self.index)
            .finish()
    }
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        // Unlocked and closed first: once the slot shows free here, it is
        // free for every process.
        drop(self.lock.take());
        if let Some(held) = self.table.held.lock().get_mut(self.index) {
            *held = false;
        }
        self.table.released.fetch_add(1, Ordering::Relaxed);
        self.table.freed.notify(usize::MAX);
    }
}

/// What the keeper's watch of the heartbeat remembers.
struct Watch {
    next: Instant,
    warned: bool,
}

/// This process's membership of a host directory.
pub(crate) struct Host {
    dir: PathBuf,
    slot_paths: Arc<[PathBuf]>,
    slots: Arc<SlotTable>,
    cursor: AtomicUsize,
    /// When a spare refill last found the host full, and the slots released
    /// by then (see [`Host::try_acquire_spare`]).
    full_at: Mutex<Option<(Instant, usize)>>,
    proc_lock: Mutex<Option<Flock<File>>>,
    leader: Leader,
    watch: Mutex<Watch>,
    leader_gauge: Gauge,
    heartbeat_age: Gauge,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("dir", &self.dir)
            .field("max_helpers", &self.slot_paths.len())
            .finish_non_exhaustive()
    }
}

impl Host {
    /// Joins the host directory: creates it if missing, takes this
    /// process's liveness lock, and starts the leader thread.
    pub(crate) fn join(config: &HostConfig) -> Result<Host, HostJoinError> {
        let dir = config.dir.clone();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o770)
            .create(&dir)
            .map_err(|source| HostJoinError::CreateDir {
                path: dir.clone(),
                source,
            })?;
        let pid = std::process::id();
        let proc_lock = lock_proc(&dir, pid).map_err(|source| HostJoinError::ProcLock {
            path: dir.join(files::proc_name(pid)),
            source,
        })?;
        let slot_paths: Arc<[PathBuf]> = (0..config.max_helpers)
            .map(|index| dir.join(files::slot_name(index)))
            .collect();
        let leader = Leader::start(&dir, slot_paths.clone())?;
        // Processes start their scans at different slots.
        let cursor = (pid as usize).wrapping_mul(0x9E37_79B9) % config.max_helpers.max(1);
        info!(dir = %dir.display(), max_helpers = config.max_helpers, "joined the host directory");
        Ok(Host {
            slots: Arc::new(SlotTable {
                held: Mutex::new(vec![false; slot_paths.len()]),
                freed: Event::new(),
                released: AtomicUsize::new(0),
            }),
            full_at: Mutex::new(None),
            dir,
            slot_paths,
            cursor: AtomicUsize::new(cursor),
            proc_lock: Mutex::new(Some(proc_lock)),
            leader,
            watch: Mutex::new(Watch {
                next: Instant::now(),
                warned: false,
            }),
            leader_gauge: telemetry::gauge("sandpool_host_leader", &[]),
            heartbeat_age: telemetry::gauge("sandpool_host_leader_heartbeat_age_seconds", &[]),
        })
    }

    /// The host-wide cap (`host.max_helpers`).
    pub(crate) fn max_helpers(&self) -> usize {
        self.slot_paths.len()
    }

    /// Takes a free slot, if there is one: tries every slot this process
    /// does not hold once, from its cursor on, each with a non-blocking
    /// lock on a fresh open of its file. `None` at the cap.
    pub(crate) fn try_acquire(&self) -> Result<Option<HostSlot>, LaunchError> {
        let mut held = self.slots.held.lock();
        let start = self.cursor.load(Ordering::Relaxed);
        // A slot file that cannot be opened or locked (planted in the
        // shared directory, or made unusable) is skipped: the others still
        // serve. Only if no slot is usable at all is that an error (none
        // free, none taken that could come free).
        let mut failure = None;
        // Slots that are only taken (by this process or another) may come
        // free: then the host is full, not broken.
        let mut taken = false;
        for index in files::probe_order(self.slot_paths.len(), start) {
            if held[index] {
                taken = true;
                continue;
            }
            let path = &self.slot_paths[index];
            let locked = files::open_lock(path, true).and_then(files::try_lock);
            match locked {
                Ok(Some(lock)) => {
                    held[index] = true;
                    self.cursor.store(index + 1, Ordering::Relaxed);
                    return Ok(Some(HostSlot {
                        table: self.slots.clone(),
                        index,
                        lock: Some(lock),
                    }));
                }
                Ok(None) => taken = true,
                Err(source) => {
                    debug!(path = %path.display(), %source, "host slot file unusable: skipped");
                    failure.get_or_insert_with(|| {
                        LaunchError::HostSlot {
                            path: path.clone(),
                            source,
                        }
                        .classify()
                    });
                }
            }
        }
        match failure {
            Some(err) if !taken => Err(err),
            _ => Ok(None),
        }
    }

    /// [`try_acquire`](Self::try_acquire) for a spare refill, which never
    /// waits: right after a scan found the host full (within 50 ms, unless
    /// one of this process's slots was released since) it does not scan
    /// again, so a full host costs the keeper's frequent ticks nothing.
    pub(crate) fn try_acquire_spare(&self) -> Result<Option<HostSlot>, LaunchError> {
        let mut full_at = self.full_at.lock();
        let released = self.slots.released.load(Ordering::Relaxed);
        if let Some((at, seen)) = *full_at
            && at.elapsed() < Duration::from_millis(50)
            && seen == released
        {
            return Ok(None);
        }
        let slot = self.try_acquire()?;
        *full_at = slot.is_none().then(|| (Instant::now(), released));
        Ok(slot)
    }

    /// Wakes every caller waiting for a slot (the pool is shutting down:
    /// they see it and stop waiting).
    pub(crate) fn wake_waiters(&self) {
        self.slots.freed.notify(usize::MAX);
    }

    /// Something to wait on for one of this process's slots being released
    /// (listen before trying, so a release in between is not missed).
    pub(crate) fn listen_freed(&self) -> event_listener::EventListener {
        self.slots.freed.listen()
    }

    /// Whether this process's pool leads the host directory now.
    pub(crate) fn is_leader(&self) -> bool {
        self.leader.is_leading()
    }

    /// At most once a second (the keeper calls it on every pass): exports
    /// whether this process leads and the age of the leader's heartbeat,
    /// and warns once while it is stale (a hung leader).
    pub(crate) fn watch(&self) {
        let now = Instant::now();
        let mut watch = self.watch.lock();
        if now < watch.next {
            return;
        }
        watch.next = now + Duration::from_secs(1);
        self.leader_gauge
            .set(if self.is_leader() { 1.0 } else { 0.0 });
        let Some(beat) = leader::read_heartbeat(&self.dir) else {
            return;
        };
        let age = leader::age(beat, std::time::SystemTime::now());
        self.heartbeat_age.set(age.as_secs_f64());
        if age > STALE_HEARTBEAT {
            if !watch.warned {
                watch.warned = true;
                warn!(
                    leader = beat.pid,
                    age_s = age.as_secs(),
                    dir = %self.dir.display(),
                    "the host leader's heartbeat is stale: a hung leader keeps leader.lock, so no other process takes over"
                );
            }
        } else {
            watch.warned = false;
        }
    }

    /// Leaves the host directory (the pool shuts down): stops the leader
    /// thread (see [`Leader::stop`]) and releases this process's liveness
    /// lock. Slots stay with their helpers until those are reaped.
    /// Idempotent.
    pub(crate) fn leave(&self) {
        self.leader.stop();
        drop(self.proc_lock.lock().take());
    }
}

/// Creates and locks this process's liveness file: locked as
/// `proc-<pid>.tmp`, then renamed to `proc-<pid>.lock`, so the leader's
/// sweep never finds a live process's file unlocked. A sweep may remove the
/// temporary file in the instant between its creation and its lock; then
/// the rename fails and this tries again.
fn lock_proc(dir: &Path, pid: u32) -> io::Result<Flock<File>> {
    let tmp = dir.join(files::proc_tmp_name(pid));
    let path = dir.join(files::proc_name(pid));
    let mut attempts = 0;
    loop {
        attempts += 1;
        let file = files::open_lock(&tmp, true)?;
        let Some(lock) = files::try_lock(file)? else {
            // The leader's sweep probes a file for an instant; another
            // pool of this process creating its own holds it a little
            // longer. Either lets go soon.
            if attempts < 50 {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "proc file held by another pool of this process or a sweep for 50 ms",
            ));
        };
        match std::fs::rename(&tmp, &path) {
            Ok(()) => return Ok(lock),
            Err(err) if err.kind() == io::ErrorKind::NotFound && attempts < 5 => continue,
            Err(err) => return Err(err),
        }
    }
}
