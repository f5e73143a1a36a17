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

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

/// The name of the syscall the kernel logged killing `pid` for, if the log
/// is readable and still holds the record.
///
/// Opens `/dev/kmsg` for this lookup alone (no fd is held between kills;
/// a kill is rare and its caller is failing anyway), reads the ring from
/// its oldest record to its newest, and takes the newest seccomp record of
/// `pid`: the kill just reaped is later than any record of an earlier
/// process that had the same pid.
pub(crate) fn seccomp_kill_syscall(pid: u32) -> Option<String> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open("/dev/kmsg")
        .ok()?;
    let mut buf = vec![0u8; 8192];
    let mut found = None;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some((killed, nr)) = parse_record(&buf[..n])
                    && killed == pid
                {
                    found = Some(nr);
                }
            }
            // EPIPE: records were overwritten while being read; the next
            // read goes on from the oldest one left.
            Err(err) if err.raw_os_error() == Some(nix::libc::EPIPE) => {}
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            // EAGAIN: the newest record has been read.
            Err(_) => break,
        }
    }
    found.map(syscall_name)
}

/// The syscall's name on this architecture, or its number.
fn syscall_name(nr: u32) -> String {
    sandpool_sandbox::Sysno::new(nr as usize)
        .map_or_else(|| format!("syscall {nr}"), |sysno| sysno.name().to_owned())
}

/// The pid and syscall number of a seccomp audit record (`type=1326`) of a
/// native syscall (`compat=0`), or `None` for any other record.
fn parse_record(record: &[u8]) -> Option<(u32, u32)> {
    let text = std::str::from_utf8(record).ok()?;
    let message = text.split_once(';')?.1;
    if !message.contains("type=1326") || !message.contains(" compat=0") {
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
        assert_eq!(syscall_name(257), "openat");
    }
}
