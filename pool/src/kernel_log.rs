//! Naming the syscall of a seccomp kill from the kernel's own record.
//!
//! A helper killed by its filter (`SECCOMP_RET_KILL_PROCESS`) runs nothing
//! more, so it cannot say what it called; and a helper that could (a SIGSYS
//! handler under `SECCOMP_RET_TRAP`) could also survive, which the design
//! refuses. But the kernel logs every such kill (the `kill_process` action
//! is in `/proc/sys/kernel/seccomp/actions_logged` by default) as an audit
//! record in the kernel log, with the pid and the syscall number:
//!
//! ```text
//! audit: type=1326 ... pid=22906 comm="sandpool-helper" ... sig=31 arch=c000003e syscall=257 compat=0 ...
//! ```
//!
//! The host reads `/dev/kmsg` when a helper was killed by SIGSYS (which
//! needs root or CAP_SYSLOG, or `kernel.dmesg_restrict = 0`; where it cannot
//! be opened, or the record has left the ring, the kill goes unnamed; and
//! without an audit daemon the kernel prints at most
//! `kernel.printk_ratelimit_burst` (10) audit records per
//! `kernel.printk_ratelimit` (5 s), so in a burst of kills the later ones
//! go unnamed: "kauditd_printk_skb: N callbacks suppressed"). The
//! name comes from the kernel, not from the helper, so a hostile helper
//! cannot forge it.
//!
//! The log is read incrementally: each pool's reactor holds one
//! `/dev/kmsg` descriptor, opened when the pool starts (positioned past the
//! records already there, which can belong to none of its helpers) and read
//! on from where the last lookup stopped. A lookup costs the records logged
//! since the previous one, usually a handful: it runs on the reactor thread
//! with the helper's lock held, where a read of the whole ring (hundreds of
//! records, about a millisecond) would stall every other tenant's I/O.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;

use parking_lot::Mutex;

/// The seccomp records read so far and not yet claimed: at most this many,
/// the oldest forgotten first.
const UNCLAIMED: usize = 64;

/// A pool's reader of the kernel log. Its lock is innermost (taken under a
/// connection's lock, for a few non-blocking reads).
pub(crate) struct KernelLog(Mutex<Reader>);

struct Reader {
    /// `/dev/kmsg`, read on from where the last lookup stopped; `None`
    /// where this process may not read it.
    file: Option<File>,
    records: Records,
}

impl KernelLog {
    /// Opens `/dev/kmsg` past the records it holds now, if this process
    /// may read it.
    pub(crate) fn open() -> KernelLog {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
            .open("/dev/kmsg")
            .ok()
            .map(|mut file| {
                if file.seek(SeekFrom::End(0)).is_err() {
                    // Read from the oldest record instead: slower once,
                    // the same answers.
                    tracing::debug!("could not seek /dev/kmsg to its end");
                }
                file
            });
        KernelLog(Mutex::new(Reader {
            file,
            records: Records::new(),
        }))
    }

    /// The name of the syscall the kernel logged killing `pid` for, if the
    /// log is readable and holds the record.
    ///
    /// Reads the records logged since the last lookup and claims the newest
    /// seccomp record of `pid`: the kill just reaped is later than any
    /// record of an earlier process that had the same pid, and a claimed
    /// record (with any older one of the same pid) is never handed out
    /// again.
    pub(crate) fn seccomp_kill_syscall(&self, pid: u32) -> Option<String> {
        let mut reader = self.0.lock();
        reader.read_new();
        reader.records.claim(pid).map(syscall_name)
    }

    /// A new helper has `pid`: reads what the log holds now and forgets
    /// every kill of an earlier process with that pid, so none can name
    /// this helper's death (whose own record may never come: the kernel
    /// drops records past its rate limit). Costs the kernel messages
    /// logged since the last read: usually one read that finds none.
    pub(crate) fn forget(&self, pid: u32) {
        let mut reader = self.0.lock();
        reader.read_new();
        reader.records.claim(pid);
    }
}

impl Reader {
    /// Reads every record logged since the last read.
    fn read_new(&mut self) {
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let mut buf = [0u8; 8192];
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.records.add(&buf[..n]),
                // EPIPE: records were overwritten before they were read;
                // the next read goes on from the oldest one left.
                Err(err) if err.raw_os_error() == Some(nix::libc::EPIPE) => {}
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                // EAGAIN: the newest record has been read.
                Err(_) => break,
            }
        }
    }
}

/// Seccomp kills read from the log and not yet claimed, oldest first.
struct Records {
    kills: VecDeque<(u32, u32)>,
}

impl Records {
    const fn new() -> Records {
        Records {
            kills: VecDeque::new(),
        }
    }

    /// Keeps `record` if it is a seccomp kill.
    fn add(&mut self, record: &[u8]) {
        let Some(kill) = parse_record(record) else {
            return;
        };
        if self.kills.len() == UNCLAIMED {
            self.kills.pop_front();
        }
        self.kills.push_back(kill);
    }

    /// The syscall of the newest kill of `pid`; every kill of `pid` is
    /// forgotten.
    fn claim(&mut self, pid: u32) -> Option<u32> {
        let newest = self
            .kills
            .iter()
            .rev()
            .find(|(killed, _)| *killed == pid)
            .map(|&(_, nr)| nr);
        if newest.is_some() {
            self.kills.retain(|(killed, _)| *killed != pid);
        }
        newest
    }
}

/// The syscall's name on this architecture, or its number.
fn syscall_name(nr: u32) -> String {
    sandpool_sandbox::Sysno::new(nr as usize)
        .map_or_else(|| format!("syscall {nr}"), |sysno| sysno.name().to_owned())
}

/// The pid and syscall number of the kernel's seccomp audit record
/// (`type=1326`) of a kill (`sig=31`, SIGSYS) on a native syscall
/// (`compat=0`), or `None` for any other record: a logged-only action
/// (`sig=0`), or another kernel message that merely contains such text (a
/// process name is logged in other messages as it is; in an audit record
/// one with a space or a quote is hex-encoded, so it cannot fake a field).
fn parse_record(record: &[u8]) -> Option<(u32, u32)> {
    let text = std::str::from_utf8(record).ok()?;
    let (prefix, message) = text.split_once(';')?;
    // The priority is `facility << 3 | level`: the kernel's own records
    // have facility 0; what a process writes to /dev/kmsg has another.
    let priority: u32 = prefix.split(',').next()?.parse().ok()?;
    if priority >> 3 != 0 {
        return None;
    }
    if !message.starts_with("audit: type=1326 audit(")
        || !message.contains(" sig=31 ")
        || !message.contains(" compat=0")
    {
        return None;
    }
    let field = |name: &str| -> Option<u32> {
        let at = message.find(name)? + name.len();
        let digits: String = message[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    Some((field(" pid=")?, field(" syscall=")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kill(pid: u32, nr: u32) -> Vec<u8> {
        format!("4,1,1,-;audit: type=1326 audit(1:1): pid={pid} sig=31 arch=c000003e syscall={nr} compat=0 ip=0x1\n").into_bytes()
    }

    #[test]
    fn a_kill_is_claimed_once_newest_first() {
        let mut records = Records::new();
        records.add(&kill(7, 257));
        records.add(b"6,2,3,-;usb 1-1: new device\n");
        records.add(&kill(8, 41));
        records.add(&kill(7, 59));
        assert_eq!(records.claim(7), Some(59));
        // The older record of the same pid went with it: a later helper
        // that gets pid 7 is not named after an earlier one's kill.
        assert_eq!(records.claim(7), None);
        assert_eq!(records.claim(8), Some(41));
        assert_eq!(records.claim(9), None);
    }

    #[test]
    fn unclaimed_kills_are_bounded() {
        let mut records = Records::new();
        for pid in 0..1000 {
            records.add(&kill(pid, 1));
        }
        assert_eq!(records.kills.len(), UNCLAIMED);
        assert_eq!(records.claim(0), None, "the oldest were forgotten");
        assert_eq!(records.claim(999), Some(1));
    }

    #[test]
    fn seccomp_records_are_parsed_and_others_ignored() {
        let kill = b"4,773,2337565032,-;audit: type=1326 audit(1796250808.946:773): auid=4294967295 uid=0 gid=0 ses=4294967295 pid=22906 comm=\"sandpool-helper\" exe=2F6D sig=31 arch=c000003e syscall=257 compat=0 ip=0x7f10392558b1 code=0x80000000\n";
        assert_eq!(parse_record(kill), Some((22906, 257)));
        // The helper names itself (comm), but a name with a space or a
        // quote is logged in hex by the kernel, so it cannot fake a field.
        let sly = b"4,1,1,-;audit: type=1326 audit(1:1): auid=1 uid=0 gid=0 ses=1 pid=7 comm=207069643D392073797363616C6C3D31 exe=2F sig=31 arch=c000003e syscall=41 compat=0 ip=0x1 code=0x80000000\n";
        assert_eq!(parse_record(sly), Some((7, 41)));
        assert_eq!(parse_record(b"6,2,3,-;usb 1-1: new device\n"), None);
        let compat = b"4,1,1,-;audit: type=1326 audit(1:1): pid=7 sig=31 arch=40000003 syscall=5 compat=1 ip=0x1\n";
        assert_eq!(parse_record(compat), None);
        // Another kernel message carrying a process name that reads like
        // a record (a segfault report; a review's forgery as an
        // unprivileged user), and an action that was only logged.
        let segfault = b"6,612,1,-;x type=1326 pid[31499]: segfault at 0 ip 0 sp 0 error 4 in x type=1326 pid=4242 syscall=59 compat=0[1000+1000]\n";
        assert_eq!(parse_record(segfault), None);
        let logged = b"5,1,1,-;audit: type=1326 audit(1:1): pid=7 comm=\"h\" sig=0 arch=c000003e syscall=102 compat=0 ip=0x1 code=0x7ffc0000\n";
        assert_eq!(parse_record(logged), None);
        // Written to /dev/kmsg by a process (facility user), not the kernel.
        let forged = b"12,5,1,-;audit: type=1326 audit(1:1): pid=7 sig=31 arch=c000003e syscall=41 compat=0 ip=0x1\n";
        assert_eq!(parse_record(forged), None);
        assert_eq!(syscall_name(257), "openat");
    }
}
