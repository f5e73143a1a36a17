//! Error types, each named after the operation that failed.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sandpool_protocol::{DecodeError, FdCloseMethod, Kind, PayloadError, SeccompMode};
use thiserror::Error;

/// How a helper process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
    /// Something else in the host reaped it first (a `waitpid(-1)` loop, or
    /// SIGCHLD set to SIG_IGN), so its status is lost. sandpool does not
    /// support such hosts; this variant keeps the loss visible.
    Unknown,
}

impl ExitStatus {
    /// Whether the kernel killed it for a syscall outside its seccomp policy.
    ///
    /// The sandbox's filter uses `SECCOMP_RET_KILL_PROCESS`, which ends the
    /// process as if by SIGSYS; nothing else in the design sends SIGSYS.
    pub fn is_seccomp_kill(&self) -> bool {
        *self == ExitStatus::Signaled(nix::sys::signal::Signal::SIGSYS as i32)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitStatus::Exited(code) => write!(f, "exited with code {code}"),
            status @ ExitStatus::Signaled(_) if status.is_seccomp_kill() => {
                write!(f, "killed by SIGSYS (seccomp: forbidden syscall)")
            }
            ExitStatus::Unknown => {
                write!(f, "ended with an unknown status (reaped by someone else)")
            }
            ExitStatus::Signaled(signal) => match nix::sys::signal::Signal::try_from(signal) {
                Ok(name) => write!(f, "killed by {name}"),
                Err(_) => write!(f, "killed by signal {signal}"),
            },
        }
    }
}

/// The helper broke the protocol. It is killed and never reused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ProtocolViolation {
    /// It sent bytes that are not a valid frame.
    #[error("invalid frame: {0}")]
    Frame(#[from] DecodeError),
    /// Its first frame was not a Hello.
    #[error("first frame was {0:?}, not Hello")]
    NoHello(Kind),
    /// It sent a Hello after the first frame.
    #[error("sent a second Hello")]
    SecondHello,
    /// Its Hello payload is malformed.
    #[error("malformed Hello: {0}")]
    Hello(#[from] PayloadError),
    /// It answered a request that was not the one in flight.
    #[error("answered request id {got}, expected {expected}")]
    UnexpectedId {
        /// The id in flight.
        expected: u64,
        /// The id it answered.
        got: u64,
    },
    /// It sent a frame while no request was in flight.
    #[error("sent a {kind:?} frame (id {id}) with no request in flight")]
    Unsolicited {
        /// The kind.
        kind: Kind,
        /// The id.
        id: u64,
    },
    /// It closed its stdout but did not exit.
    #[error("closed its stdout but did not exit")]
    ClosedStdout,
    /// It closed its stdin (the host's writes fail with EPIPE) but did not exit.
    #[error("closed its stdin but did not exit")]
    ClosedStdin,
    /// It had sent part of a frame while no request was in flight.
    #[error("sent a partial frame with no request in flight")]
    UnsolicitedPartial,
    /// It referred to shared-region bytes outside the window granted to
    /// the request (its slot of the response half).
    #[error("bad region reference: {0}")]
    Region(#[from] sandpool_protocol::RegionError),
    /// It answered through the region a request that did not grant it.
    #[error("answered request id {0} through the shared region without being granted it")]
    RegionNotGranted(u64),
    /// It wrote to its stdout (or closed it) while it waited as a spare,
    /// with nothing asked of it; found when it was about to be bound.
    #[error("wrote to its stdout before it was bound, with nothing asked")]
    OutputBeforeBind,
    /// Its Error frame is not UTF-8.
    #[error("Error frame is not UTF-8")]
    ErrorNotUtf8,
}

/// Why a helper's Hello does not prove the startup contract.
#[derive(Clone, Debug, Error)]
#[non_exhaustive]
pub enum HelloRefusal {
    /// The seccomp mode is not the one the configuration asked for.
    #[error("helper reports seccomp {got:?}, configuration requires {required:?}")]
    Seccomp {
        /// Reported.
        got: SeccompMode,
        /// Required.
        required: SeccompMode,
    },
    /// no_new_privs is not set.
    #[error("helper reports no_new_privs unset")]
    NoNewPrivs,
    /// Inherited fds were closed by the slow fallback and the configuration
    /// does not accept it.
    #[error("helper closed inherited fds by {0:?}, configuration requires close_range")]
    FdCloseMethod(FdCloseMethod),
    /// The pid in the Hello is not the pid the host spawned.
    #[error("helper reports pid {reported}, host spawned pid {spawned}")]
    Pid {
        /// Reported.
        reported: u32,
        /// Spawned.
        spawned: u32,
    },
    /// The kernel's view (`/proc/PID/status`) contradicts the Hello.
    #[error("/proc/{pid}/status says {field}: {kernel}, contradicting the Hello")]
    KernelDisagrees {
        /// The helper's pid.
        pid: u32,
        /// The status field (`Seccomp`, `NoNewPrivs`, `CapEff`, `CapPrm`,
        /// `CapInh`, `CapAmb`, `CapBnd`, `Uid` or `Gid`).
        field: &'static str,
        /// The kernel's value.
        kernel: String,
    },
    /// The helper reports that it kept capabilities (its effective,
    /// permitted, inheritable or ambient set is not empty).
    #[error("helper reports its capabilities not dropped")]
    CapabilitiesKept,
    /// The helper reports its bounding set not emptied, though it could
    /// have (the host holds `CAP_SETPCAP` and its helpers inherit it).
    #[error("helper reports its bounding capability set not emptied, though it holds CAP_SETPCAP")]
    BoundingSetKept,
    /// The helper reports a uid other than the configured `sandbox.user`.
    #[error("helper reports uid {reported}, configuration requires {configured} (sandbox.user)")]
    WrongUser {
        /// Reported.
        reported: u32,
        /// Configured (resolved).
        configured: u32,
    },
    /// The helper reports a gid other than the configured `sandbox.group`
    /// (or `sandbox.user`'s primary group).
    #[error("helper reports gid {reported}, configuration requires {configured} (sandbox.group)")]
    WrongGroup {
        /// Reported.
        reported: u32,
        /// Configured (resolved).
        configured: u32,
    },
    /// The helper still has fds open beyond 0, 1 and 2.
    #[error("helper still has fds {fds:?} open beyond stdin, stdout and stderr")]
    ExtraFds {
        /// The extra fds.
        fds: Vec<i32>,
    },
    /// The helper declared a kept fd the configuration does not allow
    /// (`sandbox.kept_fds`): its path is not listed, or it is open for
    /// writing and its entry does not say `write = true`.
    #[error(
        "helper keeps fd {fd} open on {path:?} ({access}), which sandbox.kept_fds does not allow"
    )]
    KeptFdNotAllowed {
        /// The fd.
        fd: u32,
        /// The path it declared.
        path: String,
        /// Its declared access mode (`read`, `write`, `read-write`).
        access: &'static str,
    },
    /// The kernel's view of a declared kept fd differs from the Hello's:
    /// another file (`/proc/PID/fd/N`), or another access mode
    /// (`/proc/PID/fdinfo/N`), or it is not open at all.
    #[error("helper's kept fd {fd}: the Hello says {declared:?}, the kernel says {kernel:?}")]
    KeptFdMismatch {
        /// The fd.
        fd: u32,
        /// What the Hello declared (a path, or an access mode).
        declared: String,
        /// What the kernel shows.
        kernel: String,
    },
    /// `/proc/PID` could not be read to cross-check the Hello.
    #[error("cross-checking /proc/{pid} failed")]
    ProcUnreadable {
        /// The helper's pid.
        pid: u32,
        /// The error.
        #[source]
        source: Arc<std::io::Error>,
    },
}

/// Launching a helper failed. Nothing is left behind: a child that was
/// spawned has been killed and reaped.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::ConfigError),
    /// The shared region could not be created or mapped.
    #[error("creating the shared region failed at {what}")]
    Region {
        /// The step that failed (memfd_create, ftruncate, seal, mmap, ...).
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The helper binary could not be pinned in a sealed memfd.
    #[error("pinning the helper image {program} failed at {what}")]
    PinImage {
        /// The program.
        program: String,
        /// The step that failed (open, memfd_create, copy, seal, ...).
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Creating a pipe failed (often: the host is out of fds).
    #[error("creating the helper's {which} pipe failed")]
    Pipe {
        /// stdin, stdout or stderr.
        which: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Preparing the posix_spawn attributes or file actions failed.
    #[error("preparing posix_spawn {what} failed")]
    SpawnSetup {
        /// Attributes or file actions.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// posix_spawn itself failed (e.g. the program does not exist).
    #[error("posix_spawn of {program} failed")]
    Spawn {
        /// The program.
        program: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The reactor thread (and its epoll and eventfd) could not be started.
    #[error("starting the sandpool reactor failed")]
    Reactor(#[source] std::io::Error),
    /// The reactor could not watch the new helper's fds (epoll_ctl failed).
    #[error("registering helper pid {pid} with the reactor failed")]
    Register {
        /// The child's pid.
        pid: u32,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// pidfd_open failed for the new child.
    #[error("pidfd_open for helper pid {pid} failed")]
    Pidfd {
        /// The child's pid.
        pid: u32,
        /// The error.
        source: std::io::Error,
    },
    /// No Hello within `spawn_timeout`.
    #[error("helper pid {pid} sent no Hello within {waited:?}{}", stderr_suffix(.stderr))]
    HelloTimeout {
        /// The child's pid.
        pid: u32,
        /// How long the host waited.
        waited: Duration,
        /// The end of the helper's stderr.
        stderr: String,
    },
    /// The helper ended before its Hello (e.g. its sandbox could not be set up).
    #[error("helper pid {pid} {status} before its Hello{}", stderr_suffix(.stderr))]
    ExitedBeforeHello {
        /// The child's pid.
        pid: u32,
        /// How it ended.
        status: ExitStatus,
        /// The end of the helper's stderr.
        stderr: String,
    },
    /// The helper broke the protocol before or in its Hello.
    #[error("helper pid {pid} broke the protocol at startup: {violation}")]
    Protocol {
        /// The child's pid.
        pid: u32,
        /// What it did.
        violation: ProtocolViolation,
    },
    /// The Hello does not prove the startup contract.
    #[error("helper pid {pid} refused: {refusal}")]
    HelloRefused {
        /// The child's pid.
        pid: u32,
        /// Why.
        refusal: HelloRefusal,
    },
    /// The launch panicked (a bug); the child, if any, was killed and reaped.
    #[error("launching a helper panicked: {0}")]
    Panicked(String),
    /// The configured warm-up request failed on a new spare.
    #[error("warm-up request on helper pid {pid} failed")]
    WarmUp {
        /// The helper's pid.
        pid: u32,
        /// The call's error.
        #[source]
        source: Box<CallError>,
    },
    /// The launcher process could not be started.
    #[error("starting the sandpool launcher process failed at {what}")]
    LauncherStart {
        /// The step that failed (socketpair, memfd, posix_spawn, ...).
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A host-wide slot file (`Config.host`) could not be opened or locked
    /// (not the cap: that is [`CallError::HostFull`]).
    #[error("taking a host-wide helper slot ({}) failed", path.display())]
    HostSlot {
        /// The slot file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The launcher process died (or stopped answering and was killed)
    /// while this launch was in flight, and again on the one retry on a
    /// new launcher. Any helper it had spawned was killed and reaped.
    #[error("the sandpool launcher pid {pid} was lost: {reason}{}", status.map(|s| format!(" ({s})")).unwrap_or_default())]
    LauncherLost {
        /// The lost launcher's pid.
        pid: u32,
        /// What the host saw.
        reason: String,
        /// How the launcher ended, if it was reaped in time.
        status: Option<ExitStatus>,
    },
    /// Talking to the launcher process failed otherwise (no free launcher
    /// thread by the deadline, a request it refused).
    #[error("{what}")]
    Launcher {
        /// What failed.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the helper's pipes failed.
    #[error("talking to helper pid {pid} at startup failed")]
    Io {
        /// The child's pid.
        pid: u32,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The host ran out of file descriptors (EMFILE, ENFILE) during the
    /// launch: host pressure, never the helper's or the tenant's fault. The
    /// pool evicts an idle helper and retries once before it reports this,
    /// and never counts it toward a tenant's back-off.
    #[error("the host is out of file descriptors")]
    HostOutOfFds(#[source] Box<LaunchError>),
}

impl LaunchError {
    /// Whether this is host pressure ([`LaunchError::HostOutOfFds`]).
    pub fn is_host_pressure(&self) -> bool {
        matches!(self, LaunchError::HostOutOfFds(_))
    }

    /// Wraps an error whose cause is the host's fd limit (EMFILE, ENFILE
    /// anywhere in its chain: a pipe, a pidfd, the fds passed back by the
    /// launcher, the `/proc` reads of the Hello check) as
    /// [`LaunchError::HostOutOfFds`].
    pub(crate) fn classify(self) -> LaunchError {
        if !self.is_host_pressure() && chain_has_fd_exhaustion(&self) {
            LaunchError::HostOutOfFds(Box::new(self))
        } else {
            self
        }
    }
}

fn chain_has_fd_exhaustion(err: &(dyn std::error::Error + 'static)) -> bool {
    let exhausted = |io: &std::io::Error| matches!(io.raw_os_error(), Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE);
    let mut next = Some(err);
    while let Some(err) = next {
        let io = err
            .downcast_ref::<std::io::Error>()
            .or_else(|| err.downcast_ref::<Arc<std::io::Error>>().map(|a| &**a));
        if io.is_some_and(exhausted) {
            return true;
        }
        // Errors this crate carries by value rather than as a source.
        if let Some(LaunchError::HelloRefused {
            refusal: HelloRefusal::ProcUnreadable { source, .. },
            ..
        }) = err.downcast_ref::<LaunchError>()
            && exhausted(source)
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// A resource limit a helper went over (see [`CallError::LimitExceeded`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// `max_helper_memory`: the keeper sampled this much resident memory.
    Memory {
        /// Resident bytes sampled.
        resident: u64,
        /// The limit.
        max: u64,
    },
    /// `sandbox.rlimits.address_space`: an allocation failed under the
    /// address-space limit and the helper aborted, as it said on stderr
    /// (reported by the helper: a hostile one may lie, which only changes
    /// this label, not the kill or the back-off).
    AddressSpace {
        /// The limit.
        max: u64,
    },
    /// `max_idle_cpu`: the helper used this much CPU time beyond the wall
    /// time it owed replies, summed from the keeper's sample interval of
    /// its last reply on.
    IdleCpu {
        /// CPU time used while idle.
        used: Duration,
        /// The limit.
        max: Duration,
    },
}

impl Limit {
    /// The cause label of metrics and logs: `memory` or `idle_cpu`.
    pub fn cause(&self) -> &'static str {
        match self {
            Limit::Memory { .. } | Limit::AddressSpace { .. } => "memory",
            Limit::IdleCpu { .. } => "idle_cpu",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Limit::Memory { resident, max } => write!(
                f,
                "{resident} bytes resident, over max_helper_memory of {max} bytes"
            ),
            Limit::AddressSpace { max } => write!(
                f,
                "an allocation failed under the {max}-byte address-space limit (as the helper reported)"
            ),
            Limit::IdleCpu { used, max } => write!(
                f,
                "used {used:?} of CPU with no call owed, over max_idle_cpu of {max:?}"
            ),
        }
    }
}

/// Why a helper was retired while calls were in flight on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetireReason {
    /// It was shut down (the pool's shutdown, a quiesce, `Helper::shutdown`).
    ShutDown,
    /// `Helper::kill` killed it.
    Killed,
    /// Its handle was dropped.
    Dropped,
}

impl fmt::Display for RetireReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RetireReason::ShutDown => "shut down",
            RetireReason::Killed => "killed",
            RetireReason::Dropped => "dropped",
        })
    }
}

/// A call failed. Unless the variant says otherwise, the helper has been
/// killed and reaped, and the next call needs a new helper.
#[derive(Clone, Debug, Error)]
#[non_exhaustive]
pub enum CallError {
    /// The helper's handler returned an error for this request. The helper is
    /// healthy and keeps serving.
    #[error("helper error: {0}")]
    Helper(String),
    /// The request is larger than `max_frame`; nothing was sent and the helper
    /// is unaffected.
    #[error("request of {len} bytes exceeds max_frame of {max} bytes")]
    RequestTooLarge {
        /// Request length.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// No complete reply before the deadline; the helper was killed.
    #[error("no reply from helper pid {pid} within {after:?}; helper killed")]
    Timeout {
        /// The helper's pid.
        pid: u32,
        /// Time since the call started.
        after: Duration,
    },
    /// The helper died during the call.
    #[error("helper pid {pid} {status}{}{}", .syscall.as_ref().map(|name| format!(" (the kernel logged: {name})")).unwrap_or_default(), stderr_suffix(.stderr))]
    Died {
        /// The helper's pid.
        pid: u32,
        /// How it ended; see [`ExitStatus::is_seccomp_kill`].
        status: ExitStatus,
        /// The end of its stderr.
        stderr: String,
        /// For a seccomp kill, the syscall it was killed for, as the
        /// kernel's audit record in the kernel log names it (read from
        /// `/dev/kmsg`, which needs root or CAP_SYSLOG; `None` where that
        /// cannot be read). The kernel's word, not the helper's.
        syscall: Option<String>,
    },
    /// The helper broke the protocol; it was killed.
    #[error("helper pid {pid} broke the protocol: {violation}; helper killed")]
    Protocol {
        /// The helper's pid.
        pid: u32,
        /// What it did.
        violation: ProtocolViolation,
    },
    /// Reading or writing the pipes (or the shared region) failed with an
    /// unexpected error; the helper was killed.
    #[error("talking to helper pid {pid} failed; helper killed")]
    Io {
        /// The helper's pid.
        pid: u32,
        /// The error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The deadline passed while this call waited behind other calls (for
    /// room on the helper or under `max_helpers`, for a region slot, or for
    /// its reply while the helper was still within the time of a request
    /// owed before it, or within its own request's budget, which a call
    /// that waited for others counts from the end of that wait). The
    /// helper is not blamed for this call: a request that had not reached
    /// the pipe was taken back, and a reply that arrives later is
    /// discarded; should the helper then overrun the request's budget, the
    /// hang rule still retires it.
    #[error("deadline passed after {waited:?} queued behind other calls on helper pid {pid}")]
    QueueTimeout {
        /// The helper's pid.
        pid: u32,
        /// Time since the call started.
        waited: Duration,
    },
    /// `max_in_flight` calls were already in flight on this helper and none
    /// finished before the deadline; nothing was sent and the helper is
    /// unaffected.
    #[error("helper pid {pid} had {in_flight} calls in flight until the deadline")]
    Saturated {
        /// The helper's pid.
        pid: u32,
        /// Calls in flight.
        in_flight: usize,
    },
    /// The tenant label is not a valid Bind payload; nothing was sent.
    #[error("invalid tenant label for Bind: {0}")]
    InvalidTenant(PayloadError),
    /// The helper is already bound to a tenant; one helper serves one tenant
    /// in its whole life. Nothing was sent.
    #[error("helper pid {pid} is already bound to a tenant")]
    AlreadyBound {
        /// The helper's pid.
        pid: u32,
    },
    /// No helper could be launched for the tenant (the launch error says
    /// why). Counts as a failure of the tenant for back-off.
    #[error("launching a helper failed")]
    Launch(#[source] Arc<LaunchError>),
    /// The tenant's helpers failed `failures` times in a row; calls fail fast
    /// until the back-off ends.
    #[error(
        "tenant is backed off after {failures} helper failures in a row; retry in {retry_in:?}"
    )]
    BackingOff {
        /// Failures in a row.
        failures: u32,
        /// Time until the back-off ends.
        retry_in: Duration,
    },
    /// The host-wide cap (`host.max_helpers`) was reached by the helpers of
    /// all the processes sharing `host.dir`, and none of this process's own
    /// helpers was idle to make room, until the deadline. Not the tenant's
    /// failure: nothing was launched.
    #[error("host full: {max_helpers} helpers live across the host for {waited:?}")]
    HostFull {
        /// The host-wide cap.
        max_helpers: usize,
        /// How long the call waited for a slot.
        waited: Duration,
    },
    /// `max_helpers` helpers were live and busy until the deadline.
    #[error("pool full: {max_helpers} helpers live and busy for {waited:?}")]
    PoolFull {
        /// The cap.
        max_helpers: usize,
        /// How long the call waited.
        waited: Duration,
    },
    /// Another call was already getting a helper for this tenant and had not
    /// finished by the deadline.
    #[error("waited {waited:?} for the tenant's helper to be launched")]
    LaunchWait {
        /// How long the call waited.
        waited: Duration,
    },
    /// The pool is shutting down or shut down.
    #[error("the pool is shut down")]
    ShutDown,
    /// The helper had already been retired (by an earlier failure or a
    /// shutdown) when this call came: nothing was sent, so the call may be
    /// retried on another helper (the pool does, on the tenant's next one).
    #[error("helper pid {pid} was retired before this request was sent")]
    NotSent {
        /// The helper's pid.
        pid: u32,
        /// The failure that retired it, if it failed.
        #[source]
        failure: Option<Box<CallError>>,
    },
    /// The helper was shut down or killed while this call was in flight.
    /// The request may have run.
    #[error("helper pid {pid} was {reason} while the call was in flight")]
    Retired {
        /// The helper's pid.
        pid: u32,
        /// Why.
        reason: RetireReason,
    },
    /// The helper went over a resource limit (memory, idle CPU) and was
    /// killed; counts as a failure of its tenant for back-off.
    #[error("helper pid {pid} killed: {limit}{}", stderr_suffix(.stderr))]
    LimitExceeded {
        /// The helper's pid.
        pid: u32,
        /// Which limit, and by how much.
        limit: Limit,
        /// The end of its stderr.
        stderr: String,
    },
}

impl CallError {
    /// Whether the helper is still usable after this error.
    pub fn helper_survives(&self) -> bool {
        matches!(
            self,
            CallError::Helper(_)
                | CallError::RequestTooLarge { .. }
                | CallError::InvalidTenant(_)
                | CallError::AlreadyBound { .. }
                | CallError::Saturated { .. }
                | CallError::QueueTimeout { .. }
        )
    }

    /// Whether this error is a failure of the tenant's helper (it died, hung,
    /// broke the protocol, or could not be launched), as counted for back-off.
    pub fn is_helper_failure(&self) -> bool {
        matches!(
            self,
            CallError::Timeout { .. }
                | CallError::Died { .. }
                | CallError::Protocol { .. }
                | CallError::Io { .. }
                | CallError::LimitExceeded { .. }
        ) || matches!(self, CallError::Launch(err) if !err.is_host_pressure() && !matches!(**err, LaunchError::HostSlot { .. }))
    }

    /// Whether this is a seccomp kill of the helper.
    pub fn is_seccomp_kill(&self) -> bool {
        matches!(self, CallError::Died { status, .. } if status.is_seccomp_kill())
    }
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!("; stderr: {}", stderr.trim_end())
    }
}
