//! Capabilities and the user and group the helper runs as.
//!
//! The order matters, because each step needs a capability a later one
//! removes: dropping the bounding set needs `CAP_SETPCAP`, `setgroups`,
//! `setgid` and `setuid` need `CAP_SETGID` and `CAP_SETUID`. So:
//!
//! 1. [`drop_bounding_and_ambient`]: the ambient set always, the bounding set
//!    when this process holds `CAP_SETPCAP` in its effective set;
//! 2. [`switch_user`] (optional): `setgroups([])`, `setresgid`, `setresuid`;
//! 3. [`clear_capabilities`]: effective, inheritable and permitted emptied.
//!
//! Then no_new_privs, rlimits and the seccomp filter, as before.

use caps::errors::CapsError;
use caps::{CapSet, Capability};
use nix::errno::Errno;
use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
use thiserror::Error;

use super::status::ProcStatus;

/// A capability set could not be changed.
#[derive(Debug, Error)]
#[error("clearing the {set} capability set failed: {source}")]
pub struct CapabilityError {
    /// Which set (`ambient`, `bounding`, `effective`, ...).
    pub set: &'static str,
    /// The error from the `caps` crate.
    #[source]
    pub source: CapsError,
}

/// The helper could not switch to the configured user or group.
#[derive(Debug, Error)]
#[error("{call}({id}) failed: {source}")]
pub struct SwitchUserError {
    /// The call that failed (`setgroups`, `setresgid`, `setresuid`).
    pub call: &'static str,
    /// The id it was asked to set (0 for `setgroups([])`).
    pub id: u32,
    /// The error.
    #[source]
    pub source: Errno,
}

/// What [`drop_bounding_and_ambient`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundingReport {
    /// The bounding set is now empty, as the kernel reports it in
    /// `/proc/self/status` (`CapBnd:`): it was at the exec already, or it
    /// is after a `PR_CAPBSET_DROP` of each capability in it. (Where the
    /// file cannot be read: every capability number up to the kernel's
    /// last was dropped and reads confirm the range, or, without
    /// `CAP_SETPCAP` to drop any, `PR_CAPBSET_READ` found none.)
    pub bounding_cleared: bool,
}

/// Clears the ambient capability set and, if this process holds
/// `CAP_SETPCAP` in its effective set (a root helper does), empties the
/// bounding set, so no later exec could ever regain a capability.
///
/// What is in both sets comes from `/proc/self/status`, so a helper whose
/// launcher emptied its own bounding set before the spawn makes no
/// capability syscall here at all; one that inherited a full set drops
/// exactly what is in it, and the kernel's account is read again to
/// confirm.
///
/// A process without `CAP_SETPCAP` (a helper started by a non-root host)
/// cannot shrink its bounding set; that is not an error: the report says
/// so, the Hello carries it, and the host requires an empty bounding set
/// only when its helpers can drop it. Such a helper has no permitted
/// capabilities anyway, and no_new_privs keeps an exec from gaining any.
///
/// # References
/// - <https://man7.org/linux/man-pages/man7/capabilities.7.html>
/// - <https://man7.org/linux/man-pages/man2/pr_capbset_drop.2const.html>
pub fn drop_bounding_and_ambient() -> Result<BoundingReport, CapabilityError> {
    // The kernel's account, now (one read, where a blind drop would make
    // about 45 syscalls).
    drop_bounding_and_ambient_with(&ProcStatus::read())
}

/// [`drop_bounding_and_ambient`] from the sets in `status`: a reading
/// taken since this process's capability sets last changed (closing fds
/// and naming the process change none; entering a user namespace, an
/// exec or a `setuid` do). Where it dropped anything, the kernel's
/// account is read again to confirm.
pub fn drop_bounding_and_ambient_with(now: &ProcStatus) -> Result<BoundingReport, CapabilityError> {
    if now.cap_amb != Some(0) {
        caps::clear(None, CapSet::Ambient).map_err(|source| CapabilityError {
            set: "ambient",
            source,
        })?;
    }
    match now.cap_bnd {
        // Empty (a launcher that emptied its own set before it spawned
        // this process): nothing to drop, on the kernel's word.
        Some(0) => Ok(BoundingReport {
            bounding_cleared: true,
        }),
        Some(mask) => drop_bounding_mask(mask),
        None => drop_bounding_blind(),
    }
}

/// Drops every capability of `mask` (the bounding set as the kernel showed
/// it) when this process holds `CAP_SETPCAP`; then asks the kernel again.
fn drop_bounding_mask(mask: u64) -> Result<BoundingReport, CapabilityError> {
    let can_drop = holds_setpcap()?;
    if !can_drop {
        // Not empty, and nothing can be dropped without CAP_SETPCAP.
        return Ok(BoundingReport {
            bounding_cleared: false,
        });
    }
    for cap in (0..=MAX_CAPABILITY).filter(|cap| mask & (1 << cap) != 0) {
        // A capability the kernel listed: any failure (EINVAL too) is
        // something in the way, and fails the start-up.
        bounding_prctl(libc::PR_CAPBSET_DROP, cap)
            .map_err(|errno| bounding_error("PR_CAPBSET_DROP", cap, errno))?;
    }
    // Confirmed by the kernel's own account, not by the drops' answers (a
    // filter in the way could fake those).
    Ok(BoundingReport {
        bounding_cleared: ProcStatus::read().cap_bnd == Some(0),
    })
}

/// Whether this process holds `CAP_SETPCAP` in its effective set (the
/// capability that drops others from the bounding set).
fn holds_setpcap() -> Result<bool, CapabilityError> {
    caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).map_err(|source| {
        CapabilityError {
            set: "effective",
            source,
        }
    })
}

/// The bounding set's drop where `/proc/self/status` could not tell what
/// is in it: every capability number up to the kernel's last.
fn drop_bounding_blind() -> Result<BoundingReport, CapabilityError> {
    let can_drop = holds_setpcap()?;
    // The kernel's highest capability number: an EINVAL at or below it is
    // a failure (something in the way, such as a filter of the process
    // that started this one), not the end of the list.
    let last = last_capability();
    let bounding_cleared = if can_drop {
        // One PR_CAPBSET_DROP per capability number, up to the kernel's
        // last (from /proc/sys/kernel/cap_last_cap; where that cannot be
        // read, up to the first number the kernel refuses), including any
        // newer than the `caps` crate's list. (`caps::clear` reads each
        // capability before dropping it and `caps::read` reads them all
        // again: about 120 syscalls, 70-80 us of every launch here, against
        // about 41.)
        let mut top = 0;
        each_capability(libc::PR_CAPBSET_DROP, last, |cap, _| {
            top = cap;
            true
        })?;
        // A drop that succeeded removed its capability; two reads confirm
        // the ends of the range (the host reads CapBnd in /proc anyway).
        for cap in [0, top] {
            if bounding_prctl(libc::PR_CAPBSET_READ, cap)
                .map_err(|errno| bounding_error("PR_CAPBSET_READ", cap, errno))?
                != 0
            {
                return Ok(BoundingReport {
                    bounding_cleared: false,
                });
            }
        }
        true
    } else {
        // Without CAP_SETPCAP nothing can be dropped: report whether the
        // set is already empty (it is not if any capability is in it; the
        // first one found answers).
        let mut empty = true;
        each_capability(libc::PR_CAPBSET_READ, last, |_, held| {
            empty = held == 0;
            empty
        })?;
        empty
    };
    Ok(BoundingReport { bounding_cleared })
}

/// Runs `option` (`PR_CAPBSET_DROP` or `PR_CAPBSET_READ`) on each
/// capability number from 0 up to `last`, the kernel's highest, or where
/// that is unknown up to the first number the kernel refuses (EINVAL above
/// 0), handing `visit` each number and the call's result; stops early when
/// `visit` returns false. Any other failure, and an EINVAL at or below
/// `last` (something in the way, not the end of the list), is an error.
fn each_capability(
    option: libc::c_int,
    last: Option<libc::c_ulong>,
    mut visit: impl FnMut(libc::c_ulong, libc::c_int) -> bool,
) -> Result<(), CapabilityError> {
    let op = if option == libc::PR_CAPBSET_DROP {
        "PR_CAPBSET_DROP"
    } else {
        "PR_CAPBSET_READ"
    };
    for cap in 0..=last.unwrap_or(MAX_CAPABILITY) {
        match bounding_prctl(option, cap) {
            Ok(result) => {
                if !visit(cap, result) {
                    break;
                }
            }
            Err(Errno::EINVAL) if last.is_none() && cap > 0 => break,
            Err(errno) => return Err(bounding_error(op, cap, errno)),
        }
    }
    Ok(())
}

/// A failed `PR_CAPBSET_*` call on `cap`.
fn bounding_error(op: &str, cap: libc::c_ulong, errno: Errno) -> CapabilityError {
    CapabilityError {
        set: "bounding",
        source: CapsError::from(format!("{op} of capability {cap} failed: {errno}")),
    }
}

/// The kernel's highest capability number, from
/// `/proc/sys/kernel/cap_last_cap`; `None` if it cannot be read.
fn last_capability() -> Option<libc::c_ulong> {
    use std::io::Read;
    let mut file = std::fs::File::open("/proc/sys/kernel/cap_last_cap").ok()?;
    let mut buf = [0u8; 16];
    let n = file.read(&mut buf).ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    text.trim()
        .parse()
        .ok()
        .filter(|last| *last <= MAX_CAPABILITY)
}

/// Capability numbers are below 64 (the kernel's sets are 64-bit masks):
/// the loops over the bounding set stop at the first number the kernel
/// refuses, and at this bound whatever happens.
const MAX_CAPABILITY: libc::c_ulong = 63;

/// `prctl(option, cap)` for `PR_CAPBSET_READ` and `PR_CAPBSET_DROP`.
fn bounding_prctl(option: libc::c_int, cap: libc::c_ulong) -> Result<libc::c_int, Errno> {
    // SAFETY: PR_CAPBSET_READ and PR_CAPBSET_DROP take the capability
    // number as their only argument (the rest must be zero) and touch no
    // memory of this process; the result is an int or -1 with errno.
    let rc = unsafe {
        libc::prctl(
            option,
            cap,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    Errno::result(rc)
}

/// Switches the process to `uid` and `gid` (real, effective, saved, and with
/// them the filesystem ids), with no supplementary groups. `None` leaves
/// that id as it is; with a `gid` the supplementary groups are cleared too.
/// Needs `CAP_SETGID` / `CAP_SETUID`: call it after
/// [`drop_bounding_and_ambient`] and before [`clear_capabilities`].
///
/// Changing the uid away from 0 also empties the permitted and effective
/// sets (the kernel's rule without `SECBIT_KEEP_CAPS`);
/// [`clear_capabilities`] makes that explicit whatever the ids.
///
/// # References
/// - <https://man7.org/linux/man-pages/man2/setresuid.2.html>
/// - <https://man7.org/linux/man-pages/man2/setgroups.2.html>
pub fn switch_user(uid: Option<u32>, gid: Option<u32>) -> Result<(), SwitchUserError> {
    if let Some(gid) = gid {
        setgroups(&[]).map_err(|source| SwitchUserError {
            call: "setgroups",
            id: 0,
            source,
        })?;
        let id = Gid::from_raw(gid);
        setresgid(id, id, id).map_err(|source| SwitchUserError {
            call: "setresgid",
            id: gid,
            source,
        })?;
    }
    if let Some(uid) = uid {
        let id = Uid::from_raw(uid);
        setresuid(id, id, id).map_err(|source| SwitchUserError {
            call: "setresuid",
            id: uid,
            source,
        })?;
    }
    Ok(())
}

/// Empties the effective, inheritable and permitted capability sets, in
/// one `capset` (and none if they are empty already: a helper exec'd by
/// root with an empty bounding set starts with none). The ambient set was
/// cleared by [`drop_bounding_and_ambient`]; with all four empty, the
/// process holds no capability at all.
///
/// # References
/// - <https://man7.org/linux/man-pages/man2/capset.2.html>
pub fn clear_capabilities() -> Result<(), CapabilityError> {
    let held = capget().map_err(|errno| capability_error("effective", "capget", errno))?;
    if held
        .iter()
        .all(|set| set.effective == 0 && set.permitted == 0 && set.inheritable == 0)
    {
        return Ok(());
    }
    capset(&[CapData::default(); 2]).map_err(|errno| capability_error("permitted", "capset", errno))
}

/// `struct __user_cap_header_struct` of `<linux/capability.h>`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`: one 32-bit half of each set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets, as two `CapData`.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

impl CapHeader {
    /// Version 3 (64-bit sets), this thread (pid 0).
    fn this_thread() -> CapHeader {
        CapHeader {
            version: CAPABILITY_VERSION_3,
            pid: 0,
        }
    }
}

/// `capget(2)` of this thread's sets.
fn capget() -> Result<[CapData; 2], Errno> {
    let mut header = CapHeader::this_thread();
    let mut data = [CapData::default(); 2];
    // SAFETY: with version 3 the kernel reads the header and writes two
    // `CapData` (the layout of <linux/capability.h>), both valid for the
    // call; pid 0 is this thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    Errno::result(rc).map(|_| data)
}

/// `capset(2)` of this thread's sets.
fn capset(data: &[CapData; 2]) -> Result<(), Errno> {
    let mut header = CapHeader::this_thread();
    // SAFETY: with version 3 the kernel reads the header and two `CapData`
    // (the layout of <linux/capability.h>), valid for the call; pid 0 is
    // this thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    Errno::result(rc).map(|_| ())
}

/// A failed `capget` or `capset`.
fn capability_error(set: &'static str, call: &str, errno: Errno) -> CapabilityError {
    CapabilityError {
        set,
        source: CapsError::from(format!("{call} failed: {errno}")),
    }
}

/// The real uid of this process (after [`switch_user`], all four uids are
/// this one). The helper reports it in its Hello.
pub fn current_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// The real gid of this process (after [`switch_user`], all four gids are
/// this one). The helper reports it in its Hello.
pub fn current_gid() -> u32 {
    nix::unistd::getgid().as_raw()
}
