//! The host leader: exactly one process among those sharing a host
//! directory holds `leader.lock`, taken by a thread of each pool with a
//! *blocking* `flock` (no polling: the kernel wakes one waiter when the
//! holder's lock goes, at its death included). The leader, once a second:
//! rewrites the heartbeat (`leader.info`: its pid and the time), counts the
//! locked slots and the live processes (their `proc-<pid>.lock` locked),
//! exports them as gauges, and sweeps the liveness files of dead processes.
//!
//! Shutdown: a leading thread releases the lock and exits at once. A
//! thread still blocked in `flock` cannot be woken without a signal, and
//! the library installs none: it stays blocked, holding its open
//! `leader.lock` (one fd), and if it ever gets the lock for a pool that is
//! gone it releases it at once and exits. The pool does not wait for it.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use parking_lot::Mutex;
use tracing::{debug, info, warn};

use super::HostJoinError;
use super::files::{self, HostFile, Sweep};
use crate::telemetry::{self, Counter, Gauge};

/// How often the leader beats and counts.
const BEAT: Duration = Duration::from_secs(1);

/// One heartbeat: the leader's pid and when it was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Heartbeat {
    pub(super) pid: u32,
    /// Milliseconds since the Unix epoch.
    pub(super) unix_ms: u64,
}

/// The text of a heartbeat file.
fn format_heartbeat(beat: Heartbeat) -> String {
    format!("pid {}\nunix_ms {}\n", beat.pid, beat.unix_ms)
}

/// Parses a heartbeat file; `None` if it is not one.
fn parse_heartbeat(text: &str) -> Option<Heartbeat> {
    let mut pid = None;
    let mut unix_ms = None;
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("pid", value)) => pid = value.parse().ok(),
            Some(("unix_ms", value)) => unix_ms = value.parse().ok(),
            _ => {}
        }
    }
    Some(Heartbeat {
        pid: pid?,
        unix_ms: unix_ms?,
    })
}

/// The heartbeat in `dir`, if there is a readable one.
pub(super) fn read_heartbeat(dir: &Path) -> Option<Heartbeat> {
    parse_heartbeat(&files::read_small(&dir.join(files::LEADER_INFO), 256).ok()?)
}

/// How old `beat` is at `now` (zero if it is from the future: clocks of
/// one host agree, but the wall clock may step).
pub(super) fn age(beat: Heartbeat, now: SystemTime) -> Duration {
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64);
    Duration::from_millis(now_ms.saturating_sub(beat.unix_ms))
}

/// The pool's handle on its leader thread.
pub(super) struct Leader {
    leading: Arc<AtomicBool>,
    stop: Mutex<Option<Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The gauges only the leader sets.
struct Gauges {
    helpers: Gauge,
    processes: Gauge,
    free_slots: Gauge,
    swept: Counter,
}

impl Leader {
    /// Opens `leader.lock` (so an unusable directory fails `Pool::new`)
    /// and starts the thread that waits for it.
    pub(super) fn start(dir: &Path, slots: Arc<[PathBuf]>) -> Result<Leader, HostJoinError> {
        let path = dir.join(files::LEADER_LOCK);
        let file = files::open_lock(&path, true)
            .map_err(|source| HostJoinError::LeaderLock { path, source })?;
        let leading = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let gauges = Gauges {
            helpers: telemetry::gauge("sandpool_host_helpers", &[]),
            processes: telemetry::gauge("sandpool_host_processes", &[]),
            free_slots: telemetry::gauge("sandpool_host_free_slots", &[]),
            swept: telemetry::counter("sandpool_host_stale_files_removed_total", &[]),
        };
        let run = Run {
            dir: dir.to_path_buf(),
            slots,
            leading: leading.clone(),
            gauges,
        };
        let thread = std::thread::Builder::new()
            .name("sandpool-leader".into())
            .spawn(move || run.run(file, &stopped))
            .map_err(HostJoinError::LeaderThread)?;
        Ok(Leader {
            leading,
            stop: Mutex::new(Some(stop)),
            thread: Mutex::new(Some(thread)),
        })
    }

    pub(super) fn is_leading(&self) -> bool {
        self.leading.load(Ordering::Acquire)
    }

    /// Stops the thread: a leading one releases the lock and is joined (it
    /// wakes at once); one still blocked in `flock` is left to release the
    /// lock as soon as it gets it (see the module doc). Idempotent.
    pub(super) fn stop(&self) {
        drop(self.stop.lock().take());
        let Some(thread) = self.thread.lock().take() else {
            return;
        };
        if self.is_leading() || thread.is_finished() {
            if thread.join().is_err() {
                warn!("the sandpool leader thread panicked");
            }
        } else {
            debug!(
                "leaving the host leader thread blocked in flock; it lets go of the lock once it gets it"
            );
        }
    }
}

/// The leader thread's own state.
struct Run {
    dir: PathBuf,
    slots: Arc<[PathBuf]>,
    leading: Arc<AtomicBool>,
    gauges: Gauges,
}

impl Run {
    fn run(self, file: File, stopped: &Receiver<()>) {
        let mut file = file;
        let lock = loop {
            match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(lock) => break lock,
                Err((back, Errno::EINTR)) => file = back,
                Err((_, errno)) => {
                    warn!(%errno, dir = %self.dir.display(), "waiting for the host leader lock failed; this process will not lead");
                    return;
                }
            }
        };
        // The pool may be gone: then the lock goes at once.
        if !matches!(
            stopped.try_recv(),
            Err(crossbeam_channel::TryRecvError::Empty)
        ) {
            return;
        }
        self.leading.store(true, Ordering::Release);
        info!(pid = std::process::id(), dir = %self.dir.display(), "leading the host directory");
        loop {
            self.beat();
            match stopped.recv_timeout(BEAT) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.leading.store(false, Ordering::Release);
        drop(lock);
        info!(dir = %self.dir.display(), "stopped leading the host directory");
    }

    /// One beat: the heartbeat, the counts, the sweep.
    fn beat(&self) {
        if let Err(err) = self.write_heartbeat() {
            warn!(%err, dir = %self.dir.display(), "writing the host leader's heartbeat failed");
        }
        match self.count_and_sweep() {
            Ok(counts) => {
                let free = self.slots.len().saturating_sub(counts.slots_in_range);
                self.gauges.helpers.set(counts.slots as f64);
                self.gauges.processes.set(counts.processes as f64);
                self.gauges.free_slots.set(free as f64);
                if counts.swept > 0 {
                    self.gauges.swept.increment(counts.swept);
                    debug!(files = counts.swept, "swept the files of dead processes");
                }
            }
            Err(err) => {
                warn!(%err, dir = %self.dir.display(), "scanning the host directory failed")
            }
        }
    }

    /// Writes `leader.info` whole: into a temporary file (only the leader
    /// writes it), renamed over the old one.
    fn write_heartbeat(&self) -> io::Result<()> {
        let beat = Heartbeat {
            pid: std::process::id(),
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| since.as_millis() as u64),
        };
        let tmp = self.dir.join(files::LEADER_INFO_TMP);
        let mut out = files::create_fresh(&tmp)?;
        out.write_all(format_heartbeat(beat).as_bytes())?;
        std::fs::rename(&tmp, self.dir.join(files::LEADER_INFO))
    }

    fn count_and_sweep(&self) -> io::Result<Counts> {
        let mut counts = Counts::default();
        for entry in std::fs::read_dir(&self.dir)? {
            let Ok(entry) = entry else {
                continue;
            };
            let Some(name) = entry.file_name().to_str().map(files::classify) else {
                continue;
            };
            let path = entry.path();
            // One unusable entry (a directory under a slot's name, a file
            // it may not open) is skipped, not the whole pass.
            match name {
                HostFile::Slot(index) => {
                    if files::probe(&path).unwrap_or(false) {
                        counts.slots += 1;
                        counts.slots_in_range += usize::from(index < self.slots.len());
                    }
                }
                HostFile::Proc(_) | HostFile::ProcTmp(_) => {
                    let Ok(locked) = sweep_if_stale(&path, name) else {
                        continue;
                    };
                    if !locked {
                        counts.swept += 1;
                    } else if matches!(name, HostFile::Proc(_)) {
                        counts.processes += 1;
                    }
                }
                HostFile::LeaderLock | HostFile::LeaderInfo | HostFile::Other => {}
            }
        }
        Ok(counts)
    }
}

#[derive(Default)]
struct Counts {
    /// Locked slot files (all of them: a process configured with a larger
    /// cap may hold one past this one's).
    slots: usize,
    /// Locked slots below this process's `host.max_helpers`.
    slots_in_range: usize,
    processes: usize,
    swept: u64,
}

/// Probes a process's liveness file and removes it if it is stale
/// (unlocked), holding the probe's lock while it checks that the name
/// still refers to the file it locked (a new process of the same pid may
/// have renamed its own over it). Returns whether the file is locked (a
/// live process).
fn sweep_if_stale(path: &Path, name: HostFile) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let file = match files::open_lock(path, false) {
        Ok(file) => file,
        // Gone since the listing: a process's own rename, or another sweep.
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(err) => return Err(err),
    };
    let Some(lock) = files::try_lock(file)? else {
        return Ok(true);
    };
    if files::sweep(name, false) == Sweep::Remove {
        let ours = lock.metadata()?;
        let named = std::fs::metadata(path);
        if named.is_ok_and(|named| named.ino() == ours.ino() && named.dev() == ours.dev()) {
            std::fs::remove_file(path)?;
        }
    }
    drop(lock);
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_round_trip() {
        let beat = Heartbeat {
            pid: 4242,
            unix_ms: 1_700_000_000_123,
        };
        assert_eq!(parse_heartbeat(&format_heartbeat(beat)), Some(beat));
    }

    #[test]
    fn a_partial_or_foreign_heartbeat_is_none() {
        assert_eq!(parse_heartbeat(""), None);
        assert_eq!(parse_heartbeat("pid 12\n"), None);
        assert_eq!(parse_heartbeat("unix_ms 5\n"), None);
        assert_eq!(parse_heartbeat("pid x\nunix_ms 5\n"), None);
    }

    #[test]
    fn age_is_from_the_wall_clock_and_never_negative() {
        let beat = Heartbeat {
            pid: 1,
            unix_ms: 10_000,
        };
        let at = |ms| UNIX_EPOCH + Duration::from_millis(ms);
        assert_eq!(age(beat, at(12_500)), Duration::from_millis(2_500));
        assert_eq!(age(beat, at(9_000)), Duration::ZERO);
    }
}
