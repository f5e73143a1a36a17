//! The files of a host directory, what each one is, and the one probe the
//! host makes of a lock file (a non-blocking exclusive `flock` on a fresh
//! open file description, released at once).
//!
//! The naming and the sweep decision are pure and unit-tested; the probe is
//! the only I/O here.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The leader's lock file: held (blocking `flock`) by the one leader.
pub(crate) const LEADER_LOCK: &str = "leader.lock";
/// The leader's heartbeat: its pid and the time, rewritten every second.
pub(crate) const LEADER_INFO: &str = "leader.info";
/// Where the leader writes the next heartbeat before renaming it over
/// [`LEADER_INFO`] (only the leader writes it: one fixed name suffices).
pub(crate) const LEADER_INFO_TMP: &str = "leader.info.tmp";
/// Permissions of the files the host creates (the directory's own
/// permissions decide who may coordinate; the umask applies).
pub(crate) const FILE_MODE: u32 = 0o660;

/// What a name in the host directory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HostFile {
    /// `slot-<i>.lock`: one of the host-wide helper slots.
    Slot(usize),
    /// `proc-<pid>.lock`: a coordinating process's liveness lock.
    Proc(u32),
    /// `proc-<pid>.tmp`: a proc lock being created (locked, then renamed
    /// to its final name, so a sweep never sees a live process's file
    /// unlocked).
    ProcTmp(u32),
    /// [`LEADER_LOCK`].
    LeaderLock,
    /// [`LEADER_INFO`] or [`LEADER_INFO_TMP`].
    LeaderInfo,
    /// Anything else: never touched.
    Other,
}

/// What the leader's sweep does with a file it probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sweep {
    /// Leave it.
    Keep,
    /// Unlink it: the process it stood for is gone.
    Remove,
}

/// The name of slot `index`.
pub(crate) fn slot_name(index: usize) -> String {
    format!("slot-{index}.lock")
}

/// The name of a process's liveness lock.
pub(crate) fn proc_name(pid: u32) -> String {
    format!("proc-{pid}.lock")
}

/// The name a process's liveness lock is created under.
pub(crate) fn proc_tmp_name(pid: u32) -> String {
    format!("proc-{pid}.tmp")
}

/// Classifies a file name of the host directory.
pub(crate) fn classify(name: &str) -> HostFile {
    let number = |rest: &str, suffix: &str| {
        rest.strip_suffix(suffix)
            .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|digits| digits.parse::<u64>().ok())
    };
    if name == LEADER_LOCK {
        return HostFile::LeaderLock;
    }
    if name == LEADER_INFO || name == LEADER_INFO_TMP {
        return HostFile::LeaderInfo;
    }
    if let Some(rest) = name.strip_prefix("slot-")
        && let Some(index) = number(rest, ".lock").and_then(|n| usize::try_from(n).ok())
    {
        return HostFile::Slot(index);
    }
    if let Some(rest) = name.strip_prefix("proc-") {
        if let Some(pid) = number(rest, ".lock").and_then(|n| u32::try_from(n).ok()) {
            return HostFile::Proc(pid);
        }
        if let Some(pid) = number(rest, ".tmp").and_then(|n| u32::try_from(n).ok()) {
            return HostFile::ProcTmp(pid);
        }
    }
    HostFile::Other
}

/// What the sweep does with `file`, given whether a probe found it locked.
/// Only a process's liveness file is ever removed, and only unlocked: its
/// process is dead (the kernel dropped the lock with its last fd). Slot
/// files are never removed: a process still holding a lock on an unlinked
/// slot file and another locking a new file of the same name would be two
/// helpers in one slot.
pub(crate) fn sweep(file: HostFile, locked: bool) -> Sweep {
    match file {
        HostFile::Proc(_) | HostFile::ProcTmp(_) if !locked => Sweep::Remove,
        _ => Sweep::Keep,
    }
}

/// The order in which a process tries the `slots` slots: every one once,
/// starting at `start` (a per-process cursor, so processes do not all
/// contend for slot 0). The caller skips the slots it holds already (a
/// second open file description of one would only conflict with itself).
pub(crate) fn probe_order(slots: usize, start: usize) -> impl Iterator<Item = usize> {
    let start = start % slots.max(1);
    (0..slots).map(move |k| (start + k) % slots)
}

/// Opens (creating it if `create`) a lock file of the host directory:
/// O_CLOEXEC (std's `File` always is), read-write so any process may lock it.
/// The directory is shared, so whatever is at `path` is not trusted: a
/// symlink is never followed (O_NOFOLLOW: nothing is created or opened
/// outside the directory), a FIFO or device never blocks the open
/// (O_NONBLOCK, which `flock` ignores), and anything but a regular file is
/// refused.
pub(crate) fn open_lock(path: &Path, create: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .mode(FILE_MODE)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    regular(file)
}

/// `file` if it is a regular file, else an error naming what it is.
pub(crate) fn regular(file: File) -> io::Result<File> {
    let kind = file.metadata()?.file_type();
    if kind.is_file() {
        Ok(file)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a regular file ({kind:?})"),
        ))
    }
}

/// Reads at most `max` bytes of a small file of the host directory, with
/// the same distrust as [`open_lock`] (no symlink, no blocking open, a
/// regular file only).
pub(crate) fn read_small(path: &Path, max: u64) -> io::Result<String> {
    use std::io::Read;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    let mut text = String::new();
    regular(file)?.take(max).read_to_string(&mut text)?;
    Ok(text)
}

/// Creates `path` anew for writing (O_CREAT | O_EXCL, so never through a
/// symlink or into an existing file), after removing whatever had the name
/// (a leftover of a crash, or something planted: `remove_file` removes a
/// symlink itself, not its target).
pub(crate) fn create_fresh(path: &Path) -> io::Result<File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// A non-blocking exclusive `flock(2)` on `file`: the lock, `None` if
/// another open file description holds one (in this process or another).
pub(crate) fn try_lock(file: File) -> io::Result<Option<Flock<File>>> {
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(io::Error::from(errno)),
    }
}

/// Whether a lock file is locked by anyone, this process included (the
/// probe opens its own description, which conflicts with every other). A
/// free file is locked for the instant of the probe; a process trying it
/// then moves on to its next slot or retries. A file gone since it was
/// listed is not locked.
pub(crate) fn probe(path: &Path) -> io::Result<bool> {
    let file = match open_lock(path, false) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(err),
    };
    Ok(try_lock(file)?.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_classify() {
        assert_eq!(classify(&slot_name(0)), HostFile::Slot(0));
        assert_eq!(classify(&slot_name(19)), HostFile::Slot(19));
        assert_eq!(classify(&proc_name(4242)), HostFile::Proc(4242));
        assert_eq!(classify(&proc_tmp_name(7)), HostFile::ProcTmp(7));
        assert_eq!(classify(LEADER_LOCK), HostFile::LeaderLock);
        assert_eq!(classify(LEADER_INFO), HostFile::LeaderInfo);
        assert_eq!(classify(LEADER_INFO_TMP), HostFile::LeaderInfo);
    }

    #[test]
    fn anything_else_is_other() {
        for name in [
            "slot-.lock",
            "slot-1.lockx",
            "slot--1.lock",
            "slot-+1.lock",
            "slot-1",
            "proc-.lock",
            "proc-99999999999.lock",
            "proc-1.tmp.lock",
            "leader.lock.old",
            "README",
            "",
        ] {
            assert_eq!(classify(name), HostFile::Other, "{name:?}");
        }
    }

    #[test]
    fn only_unlocked_process_files_are_swept() {
        assert_eq!(sweep(HostFile::Proc(1), false), Sweep::Remove);
        assert_eq!(sweep(HostFile::ProcTmp(1), false), Sweep::Remove);
        assert_eq!(sweep(HostFile::Proc(1), true), Sweep::Keep);
        assert_eq!(sweep(HostFile::ProcTmp(1), true), Sweep::Keep);
        for file in [
            HostFile::Slot(3),
            HostFile::LeaderLock,
            HostFile::LeaderInfo,
            HostFile::Other,
        ] {
            assert_eq!(sweep(file, false), Sweep::Keep, "{file:?}");
            assert_eq!(sweep(file, true), Sweep::Keep, "{file:?}");
        }
    }

    #[test]
    fn probe_order_visits_every_slot_once_from_the_cursor() {
        assert_eq!(probe_order(5, 3).collect::<Vec<_>>(), [3, 4, 0, 1, 2]);
        assert_eq!(probe_order(5, 13).collect::<Vec<_>>(), [3, 4, 0, 1, 2]);
        assert_eq!(probe_order(1, 7).collect::<Vec<_>>(), [0]);
        assert_eq!(probe_order(0, 0).count(), 0);
    }
}
