//! The helper's seccomp policy, built and installed with seccompiler.

use std::collections::BTreeMap;
use std::str::FromStr;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule,
    TargetArch,
};
use syscalls::Sysno;
use thiserror::Error;

use crate::SeccompMode;
use sandpool_protocol::FdAccess;

/// A policy could not be built or compiled.
#[derive(Debug, Error)]
pub enum PolicyError {
    /// A syscall name this architecture does not have.
    #[error("unknown syscall name {0:?} for this architecture")]
    UnknownSyscall(String),
    /// seccompiler refused a rule or the filter.
    #[error("building the seccomp filter failed: {0}")]
    Build(#[from] seccompiler::BackendError),
    /// This CPU architecture has no seccompiler backend.
    #[error("seccomp filters are not supported on {0}")]
    Arch(&'static str),
    /// Allowing this syscall by name would drop the argument rules the policy
    /// already restricts it with.
    #[error(
        "syscall {0:?} is allowed only with argument rules; allowing it outright would widen them"
    )]
    WouldWiden(String),
    /// The policy allows nothing: installing it would be meaningless.
    #[error("the seccomp policy is empty")]
    Empty,
    /// The compiled program is longer than a BPF program may be, or a jump
    /// in it farther than BPF can reach.
    #[error("the seccomp policy is too large to compile")]
    TooLarge,
}

/// The `AUDIT_ARCH_*` value of this CPU architecture (what the kernel puts
/// in `seccomp_data.arch` for a native syscall).
pub(crate) fn audit_arch() -> u32 {
    const LE_64: u32 = 0x8000_0000 | 0x4000_0000;
    match std::env::consts::ARCH {
        "aarch64" => 183 | LE_64,
        "riscv64" => 243 | LE_64,
        // seccompiler has backends for these three only; `compile` refuses
        // the rest before this matters.
        _ => 62 | LE_64,
    }
}

/// The filter could not be installed. The helper must exit: it never runs
/// unfiltered unless the mode was explicitly `off`.
#[derive(Debug, Error)]
#[error("installing the seccomp filter failed: {0}")]
pub struct InstallError(#[from] seccompiler::Error);

/// A seccomp allowlist: syscalls allowed outright, or only when their
/// arguments match one of a list of rules. Everything else kills the process
/// (in `enforce` mode) or is logged and allowed (in `log` mode).
#[derive(Clone, Debug)]
pub struct SeccompPolicy {
    rules: BTreeMap<i64, Vec<SeccompRule>>,
}

/// The `madvise` advice values (arg 2) the default policy allows:
/// `MADV_NORMAL`, `RANDOM`, `SEQUENTIAL`, `WILLNEED`, `DONTNEED`, `FREE`,
/// `HUGEPAGE`, `NOHUGEPAGE`, `DONTDUMP`, `DODUMP`.
///
/// glibc's malloc calls `madvise` with `MADV_DONTNEED` (trimming a heap or
/// an arena) and `MADV_HUGEPAGE` (with its `hugetlb` tunable); glibc's
/// thread stacks with `MADV_DONTNEED`; Rust's std with none; jemalloc and
/// mimalloc with `FREE`, `DONTNEED`, `DONTDUMP`/`DODUMP` and the huge-page
/// pair. The four access-pattern hints are harmless.
pub const MADVISE_ALLOWED: [i32; 10] = [
    libc::MADV_NORMAL,
    libc::MADV_RANDOM,
    libc::MADV_SEQUENTIAL,
    libc::MADV_WILLNEED,
    libc::MADV_DONTNEED,
    libc::MADV_FREE,
    libc::MADV_HUGEPAGE,
    libc::MADV_NOHUGEPAGE,
    libc::MADV_DONTDUMP,
    libc::MADV_DODUMP,
];

/// The `mmap` flags (arg 3) the default policy refuses.
pub const MMAP_REFUSED_FLAGS: i32 = libc::MAP_LOCKED | libc::MAP_HUGETLB;

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, PolicyError> {
    Ok(SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        op,
        value,
    )?)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, PolicyError> {
    Ok(SeccompRule::new(conditions)?)
}

impl SeccompPolicy {
    /// A policy that allows nothing; build it up with [`allow`](Self::allow).
    pub fn empty() -> Self {
        SeccompPolicy {
            rules: BTreeMap::new(),
        }
    }

    /// The minimal policy of a helper that only reads requests from stdin and
    /// writes responses to stdout:
    ///
    /// - `read` on fd 0 only; `write`/`writev` on fds 1 and 2 only; `close`;
    ///   `fcntl` with `F_GETFD`/`F_GETFL` only (read-only queries);
    /// - memory: `brk`, `munmap`, `mremap`; `mprotect` only without
    ///   `PROT_EXEC` (no new executable memory); `mmap` only without
    ///   `PROT_EXEC` (arg 2) and without `MAP_LOCKED` or `MAP_HUGETLB` (arg 3)
    ///   (one rule: its conditions must all hold), so a helper can neither
    ///   pin memory out of the host's reach of reclaim nor draw on the
    ///   machine's huge-page pool; `madvise` only with an advice (arg 2) in
    ///   [`MADVISE_ALLOWED`], what glibc's malloc and free, Rust's std and
    ///   common allocators use (`DONTNEED`/`FREE` to return memory,
    ///   `HUGEPAGE`/`NOHUGEPAGE` for transparent huge pages, `DONTDUMP`);
    ///   `MADV_HWPOISON`, `SOFT_OFFLINE`, `MERGEABLE`, `REMOVE`, `COLLAPSE`,
    ///   `PAGEOUT` and every other advice kill the helper;
    /// - `futex`, `sched_yield`, `getrandom` (seeding hash maps), the clocks and
    ///   sleeps;
    /// - leaving: `exit`, `exit_group`, and for `abort()` the signal calls
    ///   `rt_sigreturn`, `rt_sigprocmask`, `rt_sigaction`, `sigaltstack`,
    ///   `getpid`, `gettid`, and `tgkill` (glibc) or `tkill` (musl) aimed at
    ///   this process only.
    ///
    /// No `open`, no sockets, no `fork`/`clone`, no `execve`, no `ptrace`.
    pub fn helper_default() -> Result<Self, PolicyError> {
        let mut policy = SeccompPolicy::empty();
        let prot_exec = libc::PROT_EXEC as u64;
        let no_exec = || cond(2, SeccompCmpOp::MaskedEq(prot_exec), 0);
        policy.allow_if(
            Sysno::read,
            vec![rule(vec![cond(0, SeccompCmpOp::Eq, 0)?])?],
        );
        for sysno in [Sysno::write, Sysno::writev] {
            policy.allow_if(
                sysno,
                vec![
                    rule(vec![cond(0, SeccompCmpOp::Eq, 1)?])?,
                    rule(vec![cond(0, SeccompCmpOp::Eq, 2)?])?,
                ],
            );
        }
        let refused_flags = MMAP_REFUSED_FLAGS as u64;
        policy.allow_if(
            Sysno::mmap,
            vec![rule(vec![
                no_exec()?,
                cond(3, SeccompCmpOp::MaskedEq(refused_flags), 0)?,
            ])?],
        );
        let advice = MADVISE_ALLOWED
            .iter()
            .map(|advice| rule(vec![cond(2, SeccompCmpOp::Eq, *advice as u64)?]))
            .collect::<Result<Vec<_>, _>>()?;
        policy.allow_if(Sysno::madvise, advice);
        policy.allow_if(Sysno::mprotect, vec![rule(vec![no_exec()?])?]);
        // Read-only fd queries (std checks its stdio this way on exit).
        policy.allow_if(
            Sysno::fcntl,
            vec![
                rule(vec![cond(1, SeccompCmpOp::Eq, libc::F_GETFD as u64)?])?,
                rule(vec![cond(1, SeccompCmpOp::Eq, libc::F_GETFL as u64)?])?,
            ],
        );
        // A signal to itself only: raise() and abort(), glibc's with
        // tgkill(pid, tid, sig), musl's with tkill(tid, sig); the helper
        // is single-threaded (no clone), so its one tid is its pid.
        let own_pid = u64::from(std::process::id());
        for sysno in [Sysno::tgkill, Sysno::tkill] {
            policy.allow_if(
                sysno,
                vec![rule(vec![cond(0, SeccompCmpOp::Eq, own_pid)?])?],
            );
        }
        for sysno in [
            Sysno::close,
            Sysno::brk,
            Sysno::munmap,
            Sysno::mremap,
            Sysno::futex,
            Sysno::sched_yield,
            Sysno::getrandom,
            Sysno::clock_gettime,
            Sysno::clock_getres,
            Sysno::clock_nanosleep,
            Sysno::nanosleep,
            Sysno::gettimeofday,
            Sysno::restart_syscall,
            Sysno::exit,
            Sysno::exit_group,
            Sysno::rt_sigreturn,
            Sysno::rt_sigprocmask,
            Sysno::rt_sigaction,
            Sysno::sigaltstack,
            Sysno::getpid,
            Sysno::gettid,
        ] {
            policy.allow(sysno);
        }
        Ok(policy)
    }

    /// Allows reading a kept fd (`read`, `pread64` on exactly `fd`) and,
    /// when it was opened for writing, writing it (`write`, `pwrite64`):
    /// for the files a helper's init hook kept open and declared. Nothing
    /// else about the fd is allowed (no `lseek`, `fstat`, `mmap` of it
    /// beyond what the policy allows of every fd).
    pub fn allow_kept_fd(&mut self, fd: u32, access: FdAccess) -> Result<&mut Self, PolicyError> {
        let on_fd = || -> Result<Vec<SeccompRule>, PolicyError> {
            Ok(vec![rule(vec![cond(0, SeccompCmpOp::Eq, u64::from(fd))?])?])
        };
        if access != FdAccess::Write {
            self.allow_if(Sysno::read, on_fd()?);
            self.allow_if(Sysno::pread64, on_fd()?);
        }
        if access.writes() {
            self.allow_if(Sysno::write, on_fd()?);
            self.allow_if(Sysno::pwrite64, on_fd()?);
        }
        Ok(self)
    }

    /// Allows `sysno` whatever its arguments (replacing any rules it had).
    pub fn allow(&mut self, sysno: Sysno) -> &mut Self {
        self.rules.insert(i64::from(sysno.id()), Vec::new());
        self
    }

    /// Allows `sysno` when its arguments match any one of `rules`. If the
    /// syscall is already allowed outright, it stays allowed outright.
    pub fn allow_if(&mut self, sysno: Sysno, rules: Vec<SeccompRule>) -> &mut Self {
        match self.rules.get_mut(&i64::from(sysno.id())) {
            Some(existing) if existing.is_empty() => {}
            Some(existing) => existing.extend(rules),
            None => {
                self.rules.insert(i64::from(sysno.id()), rules);
            }
        }
        self
    }

    /// Allows a syscall by its name (as in `man 2 syscalls`, e.g. `"uname"`),
    /// on top of the policy. A syscall the policy already allows only with
    /// argument rules (`read`, `write`, `mmap`, `mprotect`, `tgkill`, ...) is
    /// refused: allowing it by name would silently drop those rules (e.g. let
    /// `mprotect` make memory executable).
    pub fn allow_name(&mut self, name: &str) -> Result<&mut Self, PolicyError> {
        let sysno =
            Sysno::from_str(name).map_err(|_| PolicyError::UnknownSyscall(name.to_owned()))?;
        match self.rules.get(&i64::from(sysno.id())) {
            Some(rules) if !rules.is_empty() => Err(PolicyError::WouldWiden(name.to_owned())),
            _ => Ok(self.allow(sysno)),
        }
    }

    /// The rules by syscall number (none: allowed outright).
    #[cfg(test)]
    pub(crate) fn rules(&self) -> &BTreeMap<i64, Vec<SeccompRule>> {
        &self.rules
    }

    /// Whether `sysno` is allowed in some form.
    pub fn allows(&self, sysno: Sysno) -> bool {
        self.rules.contains_key(&i64::from(sysno.id()))
    }

    /// Compiles the policy for this CPU architecture in `mode`.
    ///
    /// `enforce` kills the whole process on a syscall outside the policy;
    /// `log` allows and logs it (for writing a policy); `off` produces no
    /// program at all and must have been asked for explicitly.
    ///
    /// Why `SECCOMP_RET_KILL_PROCESS` and not `SECCOMP_RET_TRAP` with a
    /// SIGSYS handler that names the syscall on stderr: with TRAP the
    /// kernel only *delivers* SIGSYS, and a hostile helper can make that
    /// delivery fail. Blocking or ignoring SIGSYS does not help it
    /// (`force_sig_info_to_task` resets a blocked or ignored forced signal
    /// to `SIG_DFL` and unblocks it), but a forbidden syscall made with the
    /// stack pointer on unmapped memory makes the signal frame unwritable,
    /// and `signal_setup_done` then calls `force_sigsegv`, which sends a
    /// plain SIGSEGV that the helper's own SIGSEGV handler on an alternate
    /// stack (`rt_sigaction` and `sigaltstack` are allowed, for `abort`)
    /// catches: the helper lives on after a forbidden syscall (which did
    /// not run) and can probe the policy. KILL_PROCESS ends the process in
    /// the kernel, whatever the helper set up, so every forbidden syscall
    /// ends it by SIGSYS.
    pub fn compile(&self, mode: SeccompMode) -> Result<Filter, PolicyError> {
        if self.rules.is_empty() {
            return Err(PolicyError::Empty);
        }
        let mismatch = match mode {
            SeccompMode::Off => {
                return Ok(Filter {
                    mode,
                    program: None,
                });
            }
            SeccompMode::Log => SeccompAction::Log,
            SeccompMode::Enforce => SeccompAction::KillProcess,
        };
        let arch = TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|_| PolicyError::Arch(std::env::consts::ARCH))?;
        // seccompiler's program of the argument rules, behind a binary
        // search on the syscall number (see `bpf`): the same decisions, a
        // fraction of the install time.
        let program: BpfProgram = super::bpf::compile(&self.rules, mismatch, arch, audit_arch())?;
        Ok(Filter {
            mode,
            program: Some(program),
        })
    }
}

/// A compiled filter, ready to install. Compiling allocates; installing does
/// not, so the helper compiles first and installs as the last startup step.
#[derive(Debug)]
pub struct Filter {
    mode: SeccompMode,
    program: Option<BpfProgram>,
}

impl Filter {
    /// The mode this filter was compiled for.
    pub fn mode(&self) -> SeccompMode {
        self.mode
    }

    /// Installs the filter on every thread of the process (TSYNC) and returns
    /// the mode now in force. For mode `off` nothing is installed.
    ///
    /// seccompiler refuses an empty program, and also sets no_new_privs (which
    /// the startup sequence has already done explicitly).
    pub fn install(&self) -> Result<SeccompMode, InstallError> {
        if let Some(program) = &self.program {
            seccompiler::apply_filter_all_threads(program)?;
        }
        Ok(self.mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_syscalls_cannot_widen_argument_rules() {
        let mut policy = SeccompPolicy::helper_default().expect("default policy");
        for name in ["mprotect", "mmap", "read", "write", "tgkill", "tkill"] {
            assert!(
                matches!(policy.allow_name(name), Err(PolicyError::WouldWiden(_))),
                "{name}"
            );
        }
        assert!(matches!(
            policy.allow_name("no_such_call"),
            Err(PolicyError::UnknownSyscall(_))
        ));
        assert!(!policy.allows(Sysno::uname));
        policy
            .allow_name("uname")
            .expect("a plain syscall can be added");
        assert!(policy.allows(Sysno::uname));
        assert!(
            !policy.allows(Sysno::openat),
            "the default policy never opens files"
        );
        assert!(!policy.allows(Sysno::socket));
        assert!(!policy.allows(Sysno::clone));
        assert!(!policy.allows(Sysno::execve));
    }

    /// The rules of `sysno`, as one `Debug` string per rule (seccompiler's
    /// rules and conditions have no accessors but `Debug`).
    fn rules_of(policy: &SeccompPolicy, sysno: Sysno) -> Vec<String> {
        policy
            .rules
            .get(&i64::from(sysno.id()))
            .expect("allowed in some form")
            .iter()
            .map(|rule| format!("{rule:?}"))
            .collect()
    }

    #[test]
    fn a_kept_fd_is_readable_and_only_writable_when_opened_for_writing() {
        let on = |fd: u64| {
            format!(
                "{:?}",
                rule(vec![cond(0, SeccompCmpOp::Eq, fd).expect("cond")]).expect("rule")
            )
        };
        let mut policy = SeccompPolicy::helper_default().expect("default policy");
        assert!(!policy.allows(Sysno::pread64));
        policy.allow_kept_fd(5, FdAccess::Read).expect("rules");
        assert_eq!(rules_of(&policy, Sysno::read), vec![on(0), on(5)]);
        assert_eq!(rules_of(&policy, Sysno::pread64), vec![on(5)]);
        assert_eq!(rules_of(&policy, Sysno::write), vec![on(1), on(2)]);
        assert!(!policy.allows(Sysno::pwrite64));
        policy.allow_kept_fd(6, FdAccess::Write).expect("rules");
        assert_eq!(rules_of(&policy, Sysno::read), vec![on(0), on(5)]);
        assert_eq!(rules_of(&policy, Sysno::write), vec![on(1), on(2), on(6)]);
        assert_eq!(rules_of(&policy, Sysno::pwrite64), vec![on(6)]);
        policy.allow_kept_fd(7, FdAccess::ReadWrite).expect("rules");
        assert_eq!(rules_of(&policy, Sysno::pread64), vec![on(5), on(7)]);
        assert_eq!(rules_of(&policy, Sysno::pwrite64), vec![on(6), on(7)]);
    }

    #[test]
    fn mmap_needs_no_exec_and_no_locked_or_hugetlb_in_one_rule() {
        let policy = SeccompPolicy::helper_default().expect("default policy");
        let expected = format!(
            "{:?}",
            rule(vec![
                cond(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0).expect("cond"),
                cond(
                    3,
                    SeccompCmpOp::MaskedEq((libc::MAP_LOCKED | libc::MAP_HUGETLB) as u64),
                    0
                )
                .expect("cond"),
            ])
            .expect("rule")
        );
        assert_eq!(rules_of(&policy, Sysno::mmap), vec![expected]);
        // mprotect keeps its single PROT_EXEC rule.
        assert_eq!(rules_of(&policy, Sysno::mprotect).len(), 1);
    }

    #[test]
    fn madvise_allows_only_the_listed_advice() {
        let policy = SeccompPolicy::helper_default().expect("default policy");
        let rules = rules_of(&policy, Sysno::madvise);
        let one = |advice: i32| {
            format!(
                "{:?}",
                rule(vec![
                    cond(2, SeccompCmpOp::Eq, advice as u64).expect("cond")
                ])
                .expect("rule")
            )
        };
        assert_eq!(rules.len(), MADVISE_ALLOWED.len());
        for advice in [
            libc::MADV_NORMAL,
            libc::MADV_DONTNEED,
            libc::MADV_FREE,
            libc::MADV_HUGEPAGE,
            libc::MADV_DONTDUMP,
        ] {
            assert!(rules.contains(&one(advice)), "advice {advice} allowed");
        }
        for advice in [
            libc::MADV_HWPOISON,
            libc::MADV_SOFT_OFFLINE,
            libc::MADV_MERGEABLE,
            libc::MADV_REMOVE,
            libc::MADV_DONTFORK,
            libc::MADV_WIPEONFORK,
        ] {
            assert!(!rules.contains(&one(advice)), "advice {advice} refused");
        }
        let mut policy = policy;
        assert!(matches!(
            policy.allow_name("madvise"),
            Err(PolicyError::WouldWiden(_))
        ));
    }

    #[test]
    fn empty_policy_is_an_error_in_every_mode() {
        for mode in [SeccompMode::Enforce, SeccompMode::Log, SeccompMode::Off] {
            assert!(matches!(
                SeccompPolicy::empty().compile(mode),
                Err(PolicyError::Empty)
            ));
        }
        let filter = SeccompPolicy::helper_default()
            .and_then(|p| p.compile(SeccompMode::Enforce))
            .expect("compiles");
        assert_eq!(filter.mode(), SeccompMode::Enforce);
    }
}
