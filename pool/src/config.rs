//! Configuration: [`Config`] for a pool (serde, from the embedding server's
//! own TOML), [`HelperConfig`] for launching one helper.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use sandpool_protocol::{
    DEFAULT_MAX_FRAME, MAX_FRAME_CEILING, MIN_FRAME_LIMIT, RESERVED_ENV_PREFIX, RlimitSpec,
    SandboxSpec, SeccompMode,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::lifecycle::AdaptiveParams;
pub use crate::policy::{IdlePolicyKind, TenantPolicy, TenantPolicyRule};

/// The longest duration any setting accepts (a day): deadlines computed
/// from settings can never overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(86_400);

/// How helpers are started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LaunchMode {
    /// Through the launcher process the pool starts at `Pool::new` (and a
    /// [`Launcher`](crate::Launcher) at `Launcher::new`): a small program
    /// holding a handful of fds spawns each helper as the host's child, so a
    /// launch costs the same however many fds and how much memory the host
    /// has. The default.
    #[default]
    Launcher,
    /// posix_spawn from the host itself: the kernel copies the host's fd
    /// table into every child, so a launch grows with the host (4-5x slower
    /// at 19,000 open fds). For hosts that cannot run a second program.
    Direct,
}

/// A configuration value is invalid. Names the field and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("invalid configuration: {field}: {problem}")]
pub struct ConfigError {
    /// The field.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, problem: impl Into<String>) -> Self {
        ConfigError {
            field,
            problem: problem.into(),
        }
    }
}

/// What the helper is asked to do to itself, and what the host accepts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// The seccomp mode the helper must install and prove: `"enforce"`
    /// (default), or `"log"` / `"off"` only when set here explicitly.
    #[serde(with = "seccomp_mode")]
    pub seccomp: SeccompMode,
    /// Resource limits the helper applies to itself. Default: the inherited
    /// limits, with core dumps always off.
    pub rlimits: RlimitConfig,
    /// Syscall names allowed on top of the helper's own policy. Default none.
    /// Validation refuses a name this architecture does not have and a
    /// syscall the default policy allows only with argument rules (`read`,
    /// `mmap`, `madvise`, ...), as the helper would at startup.
    pub extra_syscalls: Vec<String>,
    /// Accept a helper that closed its inherited fds by the slow
    /// `/proc/self/fd` walk instead of `close_range`. Default `false`.
    pub allow_fd_walk_fallback: bool,
    /// Cross-check every Hello against the kernel: `/proc/PID/status`
    /// (`Seccomp`, `NoNewPrivs`, the capability sets, `Uid`, `Gid`) and
    /// `/proc/PID/fd` (only 0, 1, 2 and the declared kept fds open, each as
    /// declared).
    /// Default `true`.
    pub verify_with_proc: bool,
    /// The user the helper switches to at startup (`setresuid`), by name or
    /// number, e.g. `"nobody"` or `"65534"`. Only a root host may set it;
    /// the host resolves it to a uid at validation time. Default none: the
    /// helper keeps the host's uid (and drops every capability either way).
    pub user: Option<String>,
    /// The group the helper switches to (`setgroups([])`, `setresgid`), by
    /// name or number. Default: `user`'s primary group when `user` is set,
    /// else none. Only a root host may set it.
    pub group: Option<String>,
    /// The files a helper's init hook may keep open while it serves
    /// (declared in its Hello, e.g. `[{ path = "/dev/urandom" }]`). Each
    /// declared fd must name a path allowed here (exactly, or under an
    /// entry that ends in `/`), and must be read-only unless its entry says
    /// `write = true`; with `verify_with_proc` the host checks the
    /// declaration against `/proc/PID/fd` (the target) and
    /// `/proc/PID/fdinfo` (the access mode). Default none: a helper that
    /// keeps any fd is refused.
    pub kept_fds: Vec<KeptFdRule>,
}

/// A file (or, with a trailing `/`, the files under a directory) a helper
/// may keep open: an entry of [`SandboxConfig::kept_fds`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeptFdRule {
    /// An absolute, normalised path (no `.`, `..` or empty components), as
    /// `/proc/PID/fd` names files; ending in `/`, every file under that
    /// directory.
    pub path: PathBuf,
    /// The fd may be open for writing (write-only or read-write). Default
    /// `false`.
    #[serde(default)]
    pub write: bool,
}

impl KeptFdRule {
    /// Whether this entry allows a kept fd on `path` (bytes as the kernel
    /// names it) opened for writing or not.
    pub(crate) fn allows(&self, path: &[u8], writes: bool) -> bool {
        let own = self.path.as_os_str().as_encoded_bytes();
        let matches = if own.ends_with(b"/") {
            path.len() > own.len() && path.starts_with(own)
        } else {
            path == own
        };
        matches && (self.write || !writes)
    }

    /// The entry's problem, if any: not absolute, not normalised, too long.
    fn problem(&self) -> Option<&'static str> {
        let bytes = self.path.as_os_str().as_encoded_bytes();
        if !bytes.starts_with(b"/") {
            return Some("is not absolute");
        }
        if bytes == b"/" {
            return Some("allows every file (name the files, or a directory of them)");
        }
        if bytes.len() > sandpool_protocol::MAX_KEPT_PATH || bytes.contains(&0) {
            return Some("is longer than a Hello carries (4095 bytes) or holds a NUL");
        }
        let inner = bytes[1..].strip_suffix(b"/").unwrap_or(&bytes[1..]);
        let normal = inner
            .split(|b| *b == b'/')
            .all(|part| !part.is_empty() && part != b"." && part != b"..");
        if !normal {
            return Some("is not normalised (an empty, `.` or `..` component)");
        }
        None
    }
}

/// Syscalls that create an fd or put one at a number: with kept fds, an
/// `extra_syscalls` entry among them would let a tenant close a kept fd and
/// put another file (a socket, a pipe, a file it opened) at its number,
/// with the kept fd's `read`/`write` rights.
const FD_CREATING_SYSCALLS: &[&str] = &[
    "accept",
    "accept4",
    "bpf",
    "clone",
    "clone3",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "eventfd",
    "eventfd2",
    "fanotify_init",
    "fork",
    "fsmount",
    "fsopen",
    "fspick",
    "inotify_init",
    "inotify_init1",
    "io_uring_setup",
    "landlock_create_ruleset",
    "memfd_create",
    "memfd_secret",
    "mq_open",
    "open",
    "open_by_handle_at",
    "open_tree",
    "openat",
    "openat2",
    "perf_event_open",
    "pidfd_getfd",
    "pidfd_open",
    "pipe",
    "pipe2",
    "recvmmsg",
    "recvmsg",
    "seccomp",
    "signalfd",
    "signalfd4",
    "socket",
    "socketpair",
    "timerfd_create",
    "userfaultfd",
    "vfork",
];

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            seccomp: SeccompMode::Enforce,
            rlimits: RlimitConfig::default(),
            extra_syscalls: Vec::new(),
            allow_fd_walk_fallback: false,
            verify_with_proc: true,
            user: None,
            group: None,
            kept_fds: Vec::new(),
        }
    }
}

impl SandboxConfig {
    /// Resolves `user` and `group` to the uid and gid the helper switches
    /// to: names through the host's user database, numbers as they are; an
    /// unset `group` with a `user` is that user's primary group. Errors name
    /// `sandbox.user` or `sandbox.group`: an unknown name, a numeric user
    /// with no passwd entry and no `group`, or either set on a host that is
    /// not root (only root can switch its helpers' ids).
    pub(crate) fn resolve_ids(&self) -> Result<(Option<u32>, Option<u32>), ConfigError> {
        use nix::unistd::{Group, Uid, User};
        if self.user.is_none() && self.group.is_none() {
            return Ok((None, None));
        }
        let field = if self.user.is_some() {
            "sandbox.user"
        } else {
            "sandbox.group"
        };
        let euid = nix::unistd::geteuid();
        if !euid.is_root() {
            return Err(ConfigError::new(
                field,
                format!(
                    "is set, but the host runs as uid {euid}, not root: only a root host can switch its helpers' user and group"
                ),
            ));
        }
        let mut primary_gid = None;
        let uid = match &self.user {
            None => None,
            Some(name) => {
                let lookup_err = |err: nix::Error| {
                    ConfigError::new("sandbox.user", format!("looking up {name:?} failed: {err}"))
                };
                let (uid, entry) = match name.parse::<u32>() {
                    Ok(uid) => (uid, User::from_uid(Uid::from_raw(uid)).map_err(lookup_err)?),
                    Err(_) => {
                        let entry =
                            User::from_name(name).map_err(lookup_err)?.ok_or_else(|| {
                                ConfigError::new("sandbox.user", format!("no user named {name:?}"))
                            })?;
                        (entry.uid.as_raw(), Some(entry))
                    }
                };
                primary_gid = entry.map(|entry| entry.gid.as_raw());
                Some(uid)
            }
        };
        let gid = match &self.group {
            Some(name) => Some(match name.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => Group::from_name(name)
                    .map_err(|err| {
                        ConfigError::new(
                            "sandbox.group",
                            format!("looking up {name:?} failed: {err}"),
                        )
                    })?
                    .ok_or_else(|| {
                        ConfigError::new("sandbox.group", format!("no group named {name:?}"))
                    })?
                    .gid
                    .as_raw(),
            }),
            None => match (uid, primary_gid) {
                (None, _) => None,
                (Some(_), Some(gid)) => Some(gid),
                (Some(uid), None) => {
                    return Err(ConfigError::new(
                        "sandbox.group",
                        format!(
                            "must be set: user {uid} has no passwd entry to take a primary group from"
                        ),
                    ));
                }
            },
        };
        Ok((uid, gid))
    }
}

/// The default `sandbox.rlimits.address_space`: 1 GiB of address space per
/// helper (its stack, heap, mappings and any shared region together).
pub const DEFAULT_ADDRESS_SPACE: ByteSize = ByteSize::gib(1);
/// The default `max_helper_memory`: 512 MiB resident per helper.
pub const DEFAULT_MAX_HELPER_MEMORY: ByteSize = ByteSize::mib(512);
/// The default `max_idle_cpu`: CPU time an idle helper may use.
pub const DEFAULT_MAX_IDLE_CPU: Duration = Duration::from_millis(500);

/// A size limit: a size (`"1GiB"`, or a number of bytes), or `"unlimited"`,
/// which must be written out: no limit is ever off by omission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SizeLimit {
    /// No limit.
    Unlimited,
    /// At most this many bytes.
    Bytes(ByteSize),
}

impl SizeLimit {
    /// The limit in bytes, `None` for unlimited.
    pub fn bytes(self) -> Option<u64> {
        match self {
            SizeLimit::Unlimited => None,
            SizeLimit::Bytes(size) => Some(size.as_u64()),
        }
    }
}

/// A CPU time limit: a duration (`"500ms"`) or `"unlimited"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TimeLimit {
    /// No limit.
    Unlimited,
    /// At most this long.
    Time(Duration),
}

impl TimeLimit {
    /// The limit, `None` for unlimited.
    pub fn time(self) -> Option<Duration> {
        match self {
            TimeLimit::Unlimited => None,
            TimeLimit::Time(time) => Some(time),
        }
    }
}

/// The pool's memory budget (`memory_budget`): the resident memory of all
/// its helpers together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MemoryBudget {
    /// Half of the host's memory as the pool sees it at `Pool::new`: the
    /// smaller of `MemTotal` (`/proc/meminfo`) and the `memory.max` of the
    /// host's cgroup (v2), where one is set. The default.
    #[default]
    Auto,
    /// No budget.
    Unlimited,
    /// At most this many bytes.
    Bytes(ByteSize),
}

/// serde for the limit types: a word (`"unlimited"`, `"auto"`) or a value.
mod limit_serde {
    use bytesize::ByteSize;
    use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error};

    use super::{MemoryBudget, SizeLimit, TimeLimit};

    #[derive(Deserialize, Serialize)]
    #[serde(untagged)]
    enum Repr {
        Word(String),
        Size(ByteSize),
    }

    fn size<E: Error>(text: &str) -> Result<ByteSize, E> {
        text.parse::<ByteSize>().map_err(|err| {
            E::custom(format!(
                "{text:?} is neither \"unlimited\" nor a size ({err})"
            ))
        })
    }

    impl Serialize for SizeLimit {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            match self {
                SizeLimit::Unlimited => Repr::Word("unlimited".into()),
                SizeLimit::Bytes(size) => Repr::Size(*size),
            }
            .serialize(s)
        }
    }

    impl<'de> Deserialize<'de> for SizeLimit {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            Ok(match Repr::deserialize(d)? {
                Repr::Word(word) if word == "unlimited" => SizeLimit::Unlimited,
                Repr::Word(text) => SizeLimit::Bytes(size(&text)?),
                Repr::Size(size) => SizeLimit::Bytes(size),
            })
        }
    }

    impl Serialize for MemoryBudget {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            match self {
                MemoryBudget::Auto => Repr::Word("auto".into()),
                MemoryBudget::Unlimited => Repr::Word("unlimited".into()),
                MemoryBudget::Bytes(size) => Repr::Size(*size),
            }
            .serialize(s)
        }
    }

    impl<'de> Deserialize<'de> for MemoryBudget {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            Ok(match Repr::deserialize(d)? {
                Repr::Word(word) if word == "auto" => MemoryBudget::Auto,
                Repr::Word(word) if word == "unlimited" => MemoryBudget::Unlimited,
                Repr::Word(text) => MemoryBudget::Bytes(size(&text)?),
                Repr::Size(size) => MemoryBudget::Bytes(size),
            })
        }
    }

    impl Serialize for TimeLimit {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            match self {
                TimeLimit::Unlimited => s.serialize_str("unlimited"),
                TimeLimit::Time(time) => {
                    s.serialize_str(&humantime::format_duration(*time).to_string())
                }
            }
        }
    }

    impl<'de> Deserialize<'de> for TimeLimit {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let text = String::deserialize(d)?;
            if text == "unlimited" {
                return Ok(TimeLimit::Unlimited);
            }
            humantime::parse_duration(&text)
                .map(TimeLimit::Time)
                .map_err(|err| {
                    D::Error::custom(format!(
                        "{text:?} is neither \"unlimited\" nor a duration ({err})"
                    ))
                })
        }
    }
}

/// Resource limits for the helper (soft and hard alike); unset means
/// inherited, except the address space, which is limited by default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlimitConfig {
    /// `RLIMIT_AS`: the helper's whole address space (stack, heap,
    /// mappings, the shared region). Default [`DEFAULT_ADDRESS_SPACE`]
    /// (1 GiB): an allocation past it fails in the helper, which then
    /// aborts (the call fails with
    /// [`CallError::LimitExceeded`](crate::CallError::LimitExceeded) when
    /// the helper says so on stderr,
    /// as Rust's allocator does, else with `Died`). `"unlimited"` keeps the
    /// inherited limit.
    pub address_space: SizeLimit,
    /// `RLIMIT_NOFILE`.
    pub open_files: Option<u64>,
    /// `RLIMIT_CPU`, in seconds of CPU time over the helper's life.
    pub cpu_seconds: Option<u64>,
    /// `RLIMIT_FSIZE`, e.g. `"0"`.
    pub file_size: Option<ByteSize>,
}

impl Default for RlimitConfig {
    fn default() -> Self {
        RlimitConfig {
            address_space: SizeLimit::Bytes(DEFAULT_ADDRESS_SPACE),
            open_files: None,
            cpu_seconds: None,
            file_size: None,
        }
    }
}

impl RlimitConfig {
    fn spec(&self) -> RlimitSpec {
        RlimitSpec {
            address_space: self.address_space.bytes(),
            open_files: self.open_files,
            cpu_seconds: self.cpu_seconds,
            file_size: self.file_size.map(|size| size.as_u64()),
        }
    }
}

/// serde for [`SeccompMode`] as `"enforce"`, `"log"` or `"off"`.
mod seccomp_mode {
    use sandpool_protocol::SeccompMode;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(super) fn serialize<S: Serializer>(mode: &SeccompMode, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(mode.as_str())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SeccompMode, D::Error> {
        let name = String::deserialize(d)?;
        SeccompMode::parse(&name).ok_or_else(|| {
            D::Error::custom(format!(
                "unknown seccomp mode {name:?}: expected \"enforce\", \"log\" or \"off\""
            ))
        })
    }
}

/// How to launch one helper and what to accept from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelperConfig {
    /// The helper executable: an absolute path, a path relative to the
    /// working directory, or `@exe_dir/NAME`, relative to the directory of
    /// the running executable (see [`resolve_program`](Self::resolve_program));
    /// there is no `PATH` search.
    pub program: PathBuf,
    /// Arguments after the program name.
    pub args: Vec<String>,
    /// Host environment variables passed through; every other variable is
    /// cleared. Default none.
    pub env_allowlist: Vec<String>,
    /// Variables set for every helper to these values (`LD_LIBRARY_PATH`, a
    /// data directory, ...), beside those of `env_allowlist`; a name may not
    /// be in both, nor start with `SANDPOOL_` (the launch contract's own).
    /// Default none.
    pub env: BTreeMap<String, String>,
    /// How long a launch may take from spawn to a verified Hello. Default 5 s.
    pub spawn_timeout: Duration,
    /// The largest frame payload either side may send. Default 1 MiB.
    pub max_frame: u32,
    /// Calls pipelined on one helper at once; more wait. Default 16.
    pub max_in_flight: usize,
    /// Copy the helper binary into a sealed memfd once, and launch every
    /// helper from that image. Default `true`.
    pub pin_image: bool,
    /// Capacity of the request and response pipes (`F_SETPIPE_SZ`), in
    /// bytes; `None` keeps the kernel's default (64 KiB). Without
    /// CAP_SYS_RESOURCE at most `/proc/sys/fs/pipe-max-size` (1 MiB).
    pub pipe_size: Option<u32>,
    /// How long a caller waiting for a reply retries the pipe (yielding the
    /// CPU in between) before it sleeps. Default 20 us.
    pub spin_wait: Duration,
    /// Size of a per-helper shared memory region for large payloads (half
    /// for requests, half for responses); `None` (default) for none.
    pub region_size: Option<u64>,
    /// Requests at least this large go through the region (if they fit a
    /// slot). Default 64 KiB.
    pub region_threshold: usize,
    /// How many requests may be in flight through the region at once: each
    /// half of the region is cut into this many equal slots, and a request
    /// and its reply get one. Default 1.
    pub region_slots: usize,
    /// How helpers are started. Default [`LaunchMode::Launcher`].
    pub launch_mode: LaunchMode,
    /// The scheduling niceness (0 to 19) the host gives each helper right
    /// after its spawn, so helpers yield the CPU to the host; `None`
    /// (default) leaves the host's.
    pub nice: Option<i32>,
    /// The sandbox.
    pub sandbox: SandboxConfig,
}

/// The smallest address-space limit a helper can start in (beside any
/// shared region).
pub const MIN_ADDRESS_SPACE: u64 = 16 << 20;

impl HelperConfig {
    /// A configuration with every default and the given program.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        HelperConfig {
            program: program.into(),
            args: Vec::new(),
            env_allowlist: Vec::new(),
            env: BTreeMap::new(),
            spawn_timeout: Duration::from_secs(5),
            max_frame: DEFAULT_MAX_FRAME,
            max_in_flight: 16,
            pin_image: true,
            pipe_size: None,
            spin_wait: Duration::from_micros(20),
            region_size: None,
            region_threshold: 64 * 1024,
            region_slots: 1,
            launch_mode: LaunchMode::Launcher,
            nice: None,
            sandbox: SandboxConfig::default(),
        }
    }

    /// Checks every field; the error names the first invalid one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.program.as_os_str().is_empty() {
            return Err(ConfigError::new("program", "is empty"));
        }
        if self.program.as_os_str().as_encoded_bytes().contains(&0) {
            return Err(ConfigError::new("program", "contains a NUL byte"));
        }
        exe_dir_relative(&self.program)?;
        if !(MIN_FRAME_LIMIT..=MAX_FRAME_CEILING).contains(&self.max_frame) {
            return Err(ConfigError::new(
                "max_frame",
                format!(
                    "{} is outside {MIN_FRAME_LIMIT}..={MAX_FRAME_CEILING}",
                    self.max_frame
                ),
            ));
        }
        if !(1..=self.max_in_flight.max(1)).contains(&self.region_slots) {
            return Err(ConfigError::new(
                "region_slots",
                format!(
                    "{} is outside 1..=max_in_flight ({})",
                    self.region_slots, self.max_in_flight
                ),
            ));
        }
        if let Some(size) = self.region_size {
            if let Some(limit) = self.sandbox.rlimits.address_space.bytes()
                && limit <= size.saturating_add(MIN_ADDRESS_SPACE)
            {
                return Err(ConfigError::new(
                    "sandbox.rlimits.address_space",
                    format!(
                        "{limit} leaves less than {MIN_ADDRESS_SPACE} bytes beside the {size}-byte region"
                    ),
                ));
            }
            if !(8192..=(1u64 << 32)).contains(&size) {
                return Err(ConfigError::new(
                    "region_size",
                    format!("{size} is outside 8 KiB..=4 GiB"),
                ));
            }
            let slot = size / 2 / self.region_slots as u64;
            if (self.region_threshold as u64) > slot {
                return Err(ConfigError::new(
                    "region_threshold",
                    format!(
                        "{} is larger than a region slot ({slot} bytes: half of region_size over region_slots)",
                        self.region_threshold
                    ),
                ));
            }
        }
        if let Some(limit) = self.sandbox.rlimits.address_space.bytes()
            && limit < MIN_ADDRESS_SPACE
        {
            return Err(ConfigError::new(
                "sandbox.rlimits.address_space",
                format!(
                    "{limit} is less than {MIN_ADDRESS_SPACE} bytes (16 MiB): no helper could start"
                ),
            ));
        }
        if let Some(nice) = self.nice
            && !(0..=19).contains(&nice)
        {
            return Err(ConfigError::new(
                "nice",
                format!(
                    "{nice} is outside 0..=19 (a helper may only be made less favoured than the host)"
                ),
            ));
        }
        if self.spin_wait > Duration::from_millis(10) {
            return Err(ConfigError::new(
                "spin_wait",
                "must be at most 10ms (it burns CPU)",
            ));
        }
        if !(1..=4096).contains(&self.max_in_flight) {
            return Err(ConfigError::new(
                "max_in_flight",
                format!("{} is outside 1..=4096", self.max_in_flight),
            ));
        }
        if self.spawn_timeout.is_zero() {
            return Err(ConfigError::new(
                "spawn_timeout",
                "must be greater than zero",
            ));
        }
        let bad_syscall = self.sandbox.extra_syscalls.iter().find(|name| {
            name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
        if let Some(name) = bad_syscall {
            return Err(ConfigError::new(
                "sandbox.extra_syscalls",
                format!("{name:?} is not a syscall name"),
            ));
        }
        // Refuse what the helper would refuse at startup (and exit 70 for):
        // a name this architecture does not have, or a syscall the default
        // policy allows only with argument rules. (A helper built with a
        // policy of its own may refuse more; its startup error says so.)
        let mut policy = sandpool_sandbox::SeccompPolicy::helper_default().map_err(|err| {
            ConfigError::new(
                "sandbox.extra_syscalls",
                format!("the default seccomp policy could not be built: {err}"),
            )
        })?;
        for name in &self.sandbox.extra_syscalls {
            policy.allow_name(name).map_err(|err| {
                ConfigError::new("sandbox.extra_syscalls", format!("{name:?}: {err}"))
            })?;
        }
        self.sandbox.resolve_ids()?;
        for rule in &self.sandbox.kept_fds {
            if let Some(problem) = rule.problem() {
                return Err(ConfigError::new(
                    "sandbox.kept_fds",
                    format!("{:?} {problem}", rule.path),
                ));
            }
        }
        if !self.sandbox.kept_fds.is_empty()
            && let Some(name) = self
                .sandbox
                .extra_syscalls
                .iter()
                .find(|name| FD_CREATING_SYSCALLS.contains(&name.as_str()))
        {
            return Err(ConfigError::new(
                "sandbox.extra_syscalls",
                format!(
                    "{name:?} creates or places fds: with sandbox.kept_fds it would let a tenant put another file at a kept fd's number"
                ),
            ));
        }
        if let Some(name) = self
            .env_allowlist
            .iter()
            .find(|name| !is_variable_name(name))
        {
            return Err(ConfigError::new(
                "env_allowlist",
                format!("{name:?} is not a variable name"),
            ));
        }
        if let Some(name) = self
            .env_allowlist
            .iter()
            .find(|name| name.starts_with(RESERVED_ENV_PREFIX))
        {
            return Err(ConfigError::new(
                "env_allowlist",
                format!("{name:?}: names starting with {RESERVED_ENV_PREFIX} are the launch's own"),
            ));
        }
        for (name, value) in &self.env {
            let problem = if !is_variable_name(name) {
                Some("is not a variable name".to_owned())
            } else if name.starts_with(RESERVED_ENV_PREFIX) {
                Some(format!(
                    "starts with {RESERVED_ENV_PREFIX}, which the launch reserves for its own variables"
                ))
            } else if value.contains('\0') {
                Some("has a value with a NUL byte".to_owned())
            } else if self.env_allowlist.contains(name) {
                Some("is also in env_allowlist: say once where its value comes from".to_owned())
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(ConfigError::new("env", format!("{name:?} {problem}")));
            }
        }
        if let Some(arg) = self.args.iter().find(|arg| arg.contains('\0')) {
            return Err(ConfigError::new(
                "args",
                format!("{arg:?} contains a NUL byte"),
            ));
        }
        Ok(())
    }

    /// The spec the helper receives in `SANDPOOL_SANDBOX`, with
    /// `sandbox.user` and `sandbox.group` resolved to numeric ids (which is
    /// why it can fail: see [`validate`](Self::validate)).
    pub fn sandbox_spec(&self) -> Result<SandboxSpec, ConfigError> {
        let (uid, gid) = self.sandbox.resolve_ids()?;
        Ok(SandboxSpec {
            seccomp: self.sandbox.seccomp,
            max_frame: self.max_frame,
            rlimits: self.sandbox.rlimits.spec(),
            extra_syscalls: self.sandbox.extra_syscalls.clone(),
            region: self.region_size,
            uid,
            gid,
        })
    }

    /// The helper's path as launches use it: `program` itself, or for
    /// `@exe_dir/NAME` the directory of the running executable
    /// (`std::env::current_exe`) joined with `NAME`. A pool resolves it once,
    /// at `Pool::new` (and a [`Launcher`](crate::Launcher) at `Launcher::new`),
    /// so it names the file beside the server as it was started, wherever
    /// the server's working directory is.
    pub fn resolve_program(&self) -> Result<PathBuf, ConfigError> {
        let Some(rest) = exe_dir_relative(&self.program)? else {
            return Ok(self.program.clone());
        };
        let exe = std::env::current_exe().map_err(|err| {
            ConfigError::new(
                "program",
                format!("{EXE_DIR}: the running executable's path could not be read: {err}"),
            )
        })?;
        let dir = exe.parent().ok_or_else(|| {
            ConfigError::new(
                "program",
                format!(
                    "{EXE_DIR}: the running executable {} has no directory",
                    exe.display()
                ),
            )
        })?;
        Ok(dir.join(rest))
    }
}

/// The prefix of a `program` found beside the running executable:
/// `@exe_dir/sandpool-helper` is `sandpool-helper` in the directory of the
/// server's own binary (see [`HelperConfig::resolve_program`]).
pub const EXE_DIR: &str = "@exe_dir";

/// For `@exe_dir/REST`, `REST` (a relative path, not empty); `None` for a
/// plain path. A path starting with any other `@` word is refused, so a
/// misspelt prefix is not taken for a file name.
fn exe_dir_relative(program: &Path) -> Result<Option<&Path>, ConfigError> {
    let mut components = program.components();
    let Some(Component::Normal(first)) = components.next() else {
        return Ok(None);
    };
    if first == EXE_DIR {
        let rest = components.as_path();
        if rest.as_os_str().is_empty() {
            return Err(ConfigError::new(
                "program",
                format!("{EXE_DIR} must be followed by /NAME, the helper's file name"),
            ));
        }
        return Ok(Some(rest));
    }
    if first.as_encoded_bytes().starts_with(b"@") {
        return Err(ConfigError::new(
            "program",
            format!(
                "{:?}: the only placeholder is {EXE_DIR}/ (for a file whose name starts with @, write ./{})",
                first,
                program.display()
            ),
        ));
    }
    Ok(None)
}

/// An environment variable name: not empty, no `=`, no NUL.
fn is_variable_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('=') && !name.contains('\0')
}

/// Exponential back-off for a tenant whose helpers keep failing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffConfig {
    /// Delay after the second failure in a row (the first failure is
    /// replaced at once). Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Longest delay; it doubles per failure up to this. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

impl BackoffConfig {
    /// The delay after `failures` failures in a row (none for the first).
    pub fn delay(&self, failures: u32) -> Option<Duration> {
        let doublings = failures.checked_sub(2)?;
        let factor = 1u32.checked_shl(doublings.min(31)).unwrap_or(u32::MAX);
        Some(self.initial.saturating_mul(factor).min(self.max))
    }
}

/// Everything a [`Pool`](crate::Pool) is tuned by. Deserializes from the
/// embedding server's TOML (or any serde format); durations are human
/// (`"200ms"`, `"5m"`), sizes are human (`"1MiB"`). Every field but `program`
/// has a default that suits the model user (a page server with thousands of
/// tenants); unknown fields are errors.
///
/// ```
/// use std::time::Duration;
///
/// use sandpool::{Config, IdlePolicyKind};
///
/// // From a server's own configuration file (the `toml` feature)...
/// let config = Config::from_toml(
///     r#"
///     program = "@exe_dir/redo-helper"
///     spares = 4
///     idle_policy = "adaptive"
///     [env]
///     LD_LIBRARY_PATH = "/usr/lib/pageserver"
///     [sandbox.rlimits]
///     address_space = "2GiB"
///     "#,
/// )?;
/// assert_eq!(config.idle_policy, IdlePolicyKind::Adaptive);
///
/// // ... or in code; `validate` names the first invalid field.
/// let mut config = Config::new("/usr/libexec/pageserver/redo-helper");
/// config.idle_timeout = Duration::from_secs(600);
/// config.max_helpers = 0;
/// assert_eq!(config.validate().unwrap_err().field, "max_helpers");
/// # Ok::<(), sandpool::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The helper executable (required; no `PATH` search): absolute,
    /// relative to the working directory, or `"@exe_dir/NAME"` for `NAME`
    /// beside the server's own executable (resolved once, at `Pool::new`;
    /// see [`HelperConfig::resolve_program`]).
    pub program: PathBuf,
    /// Arguments after the program name. Default none.
    pub args: Vec<String>,
    /// Host environment variables passed to helpers; all others are cleared.
    pub env_allowlist: Vec<String>,
    /// Variables set for every helper (a `[env]` table: `LD_LIBRARY_PATH =
    /// "/opt/redo/lib"`), beside those passed through by `env_allowlist`; a
    /// name may not be in both, nor start with `SANDPOOL_`. Default none.
    pub env: BTreeMap<String, String>,
    /// Fresh helpers kept ready for tenants that have none. Default 2.
    pub spares: usize,
    /// A helper idle this long is quiesced (under the `"fixed"` idle
    /// policy, and the adaptive policy's fallback). Default 5 min.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How idle helpers are judged: `"fixed"` (default: after
    /// `idle_timeout`) or `"adaptive"` (per tenant, from the history of its
    /// gaps between calls; see [`IdlePolicyKind::Adaptive`]).
    pub idle_policy: IdlePolicyKind,
    /// The adaptive idle policy's tuning (`[adaptive]`; every field has a
    /// default, see [`AdaptiveParams`]).
    pub adaptive: AdaptiveParams,
    /// Per-tenant policies by tenant-id prefix (the longest prefix wins;
    /// `Pool::set_tenant_policy` overrides them). Default none.
    pub tenant_policies: Vec<TenantPolicyRule>,
    /// The most tenants without a helper whose call history the pool keeps
    /// for the adaptive policy (about 200 bytes each with the map's own
    /// share: the id, a fixed 88-byte lifecycle state, the tenant's
    /// bookkeeping); over it, those whose last call is oldest are
    /// forgotten. Only while some tenant's policy is adaptive. Default
    /// 100,000.
    pub max_tenant_histories: usize,
    /// Cap on live helpers (bound, spare, launches in progress, and closing
    /// helpers until they are reaped).
    /// Default 1024.
    pub max_helpers: usize,
    /// Calls pipelined on one helper at once. Default 16.
    pub max_in_flight: usize,
    /// Deadline of a call made without an explicit one, including any wait
    /// for a helper. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Spawn to verified Hello. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub spawn_timeout: Duration,
    /// How long a closing helper gets to exit after its stdin closes, before
    /// SIGKILL. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Largest frame payload either way. Default 1 MiB.
    pub max_frame: ByteSize,
    /// Recycle a helper after this many calls; 0 means never. Default 0.
    pub max_requests_per_helper: u64,
    /// A request sent to every new spare before it is offered to a tenant,
    /// so its first real call finds it warm. A TOML string (its UTF-8 bytes)
    /// or an array of bytes. Default none.
    #[serde(with = "bytes_or_text")]
    pub warmup_request: Option<Vec<u8>>,
    /// Copy the helper binary into a sealed memfd at `Pool::new` and launch
    /// every helper from that image, so a binary replaced on disk while the
    /// server runs never yields a helper of another version. Default `true`.
    pub pin_image: bool,
    /// Capacity of each helper's request and response pipes (`F_SETPIPE_SZ`),
    /// e.g. `"256KiB"`; unset keeps the kernel default (64 KiB).
    pub pipe_size: Option<ByteSize>,
    /// How long a caller waiting for its reply retries the pipe (yielding the
    /// CPU in between) before it sleeps in `poll`: a fast reply is then
    /// picked up without a sleep and a cross-CPU wake-up. `"0s"` turns it
    /// off. Default `"20us"`.
    #[serde(with = "humantime_serde")]
    pub spin_wait: Duration,
    /// A per-helper shared memory region (a sealed memfd) for large payloads:
    /// half for requests, half for responses, e.g. `"16MiB"`. Unset (the
    /// default) means every payload goes through the pipes.
    pub region_size: Option<ByteSize>,
    /// Requests at least this large go through the region, and their
    /// responses come back through it (if they fit the request's slot).
    /// Default 64 KiB; at most a slot.
    pub region_threshold: ByteSize,
    /// How many calls may use the region at once: each half is cut into this
    /// many equal slots, one per call, e.g. `max_in_flight` for many
    /// concurrent mid-size payloads such as 8 KiB pages. 1 to
    /// `max_in_flight`. Default 1.
    pub region_slots: usize,
    /// Back-off for tenants whose helpers keep failing.
    pub crash_backoff: BackoffConfig,
    /// A launch slower than this logs a warning (once per pool). Default 50 ms.
    #[serde(with = "humantime_serde")]
    pub slow_launch_threshold: Duration,
    /// Helper stderr forwarded to the log per helper per second (bursts of
    /// four seconds' worth); the rest is read and dropped. Default 16 KiB.
    pub stderr_bytes_per_second: ByteSize,
    /// Helper stderr forwarded over a helper's whole life. Default 1 MiB.
    pub stderr_max_bytes_per_helper: ByteSize,
    /// Label per-tenant call metrics with the tenant id. Unbounded label
    /// cardinality: only for small deployments. Default `false`.
    pub metrics_tenant_label: bool,
    /// `"launcher"` (default): helpers are spawned by a small launcher
    /// process started with the pool, so a launch costs the same however
    /// large the host grows; `"direct"`: posix_spawn from the host, whose
    /// whole fd table every launch then copies.
    pub launch_mode: LaunchMode,
    /// Resident memory one helper may hold, sampled by the keeper every
    /// `sample_interval` from `/proc/PID/stat`; over it the helper is
    /// killed (busy or idle), its calls fail with
    /// [`CallError::LimitExceeded`](crate::CallError::LimitExceeded), and it
    /// counts toward its tenant's back-off. Default 512 MiB; `"unlimited"`
    /// turns it off.
    pub max_helper_memory: SizeLimit,
    /// Resident memory of all the pool's helpers together. Over it, idle
    /// helpers are evicted, least recently used first (at each sample and
    /// before any launch), and no spare is launched; busy helpers are never
    /// evicted for it, and while the busy ones alone exceed it nothing is
    /// evicted for it (that could not reach it). Default `"auto"`: half of the host's memory (the
    /// smaller of `MemTotal` and the cgroup's `memory.max`); a size; or
    /// `"unlimited"`.
    pub memory_budget: MemoryBudget,
    /// CPU time a helper may use beyond the wall time it owed replies
    /// (idle CPU: what it burns with no call to work on), summed from the
    /// keeper's sample interval of its last reply on; over it the helper is
    /// killed (cause `idle_cpu`) and counts toward its tenant's back-off. A
    /// helper that spins after answering is killed within about one or two
    /// `sample_interval`s plus this, however often it is called. Default
    /// 500 ms; `"unlimited"` turns it off.
    pub max_idle_cpu: TimeLimit,
    /// How often the keeper samples every helper's memory and CPU time
    /// (one read of `/proc/PID/stat` each). 10 ms to 1 min; default 1 s.
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
    /// Scheduling niceness (0 to 19) for helpers, set by the host right
    /// after each spawn. Default none (the host's own).
    pub nice: Option<i32>,
    /// The sandbox.
    pub sandbox: SandboxConfig,
    /// Coordination with the other processes on this host that share a
    /// directory (`[host]`): a host-wide cap on their helpers together and
    /// one leader among them. Default none (this pool alone). Fixed at
    /// `Pool::new`.
    pub host: Option<HostConfig>,
}

/// `[host]`: several processes on one host, each with its own pool,
/// coordinating through `flock(2)` locks on files in one directory (see the
/// README's "Several processes on one host").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// The directory the coordinating processes share, absolute, e.g.
    /// `/run/sandpool/pageserver`; created (mode 0770 under the umask) if
    /// missing. Its permissions decide who may take part.
    pub dir: PathBuf,
    /// The cap on live helpers of all those processes together (each holds
    /// one of this many slot files locked per helper); at least 1. Every
    /// process sharing `dir` should use the same value.
    pub max_helpers: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            program: PathBuf::new(),
            args: Vec::new(),
            env_allowlist: Vec::new(),
            env: BTreeMap::new(),
            spares: 2,
            idle_timeout: Duration::from_secs(300),
            idle_policy: IdlePolicyKind::Fixed,
            adaptive: AdaptiveParams::default(),
            tenant_policies: Vec::new(),
            max_tenant_histories: 100_000,
            max_helpers: 1024,
            max_in_flight: 16,
            request_timeout: Duration::from_secs(10),
            spawn_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(2),
            max_frame: ByteSize::b(u64::from(DEFAULT_MAX_FRAME)),
            max_requests_per_helper: 0,
            warmup_request: None,
            pin_image: true,
            pipe_size: None,
            spin_wait: Duration::from_micros(20),
            region_size: None,
            region_threshold: ByteSize::kib(64),
            region_slots: 1,
            crash_backoff: BackoffConfig::default(),
            slow_launch_threshold: Duration::from_millis(50),
            stderr_bytes_per_second: ByteSize::kib(16),
            stderr_max_bytes_per_helper: ByteSize::mib(1),
            metrics_tenant_label: false,
            launch_mode: LaunchMode::Launcher,
            max_helper_memory: SizeLimit::Bytes(DEFAULT_MAX_HELPER_MEMORY),
            memory_budget: MemoryBudget::Auto,
            max_idle_cpu: TimeLimit::Time(DEFAULT_MAX_IDLE_CPU),
            sample_interval: Duration::from_secs(1),
            nice: None,
            sandbox: SandboxConfig::default(),
            host: None,
        }
    }
}

/// serde for an optional byte string written as text or as an array of bytes.
mod bytes_or_text {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Deserialize, Serialize)]
    #[serde(untagged)]
    enum Repr {
        Text(String),
        Bytes(Vec<u8>),
    }

    pub(super) fn serialize<S: Serializer>(
        value: &Option<Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        value
            .as_ref()
            .map(|bytes| match std::str::from_utf8(bytes) {
                Ok(text) => Repr::Text(text.to_owned()),
                Err(_) => Repr::Bytes(bytes.clone()),
            })
            .serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<Repr>::deserialize(d)?.map(|repr| match repr {
            Repr::Text(text) => text.into_bytes(),
            Repr::Bytes(bytes) => bytes,
        }))
    }
}

impl Config {
    /// The first field (by name) that differs between `self` and `new` and
    /// cannot change on a live pool: what the launcher, the reactor or the
    /// telemetry were built from (the program and its arguments and
    /// environment, the sandbox, the frame and region sizes, how helpers
    /// are launched, the stderr budget, the metrics labels). `None` when
    /// every difference is a lifecycle field [`Pool::reconfigure`]
    /// applies.
    ///
    /// [`Pool::reconfigure`]: crate::Pool::reconfigure
    pub fn first_fixed_change(&self, new: &Config) -> Option<&'static str> {
        // Destructured, so a new field must be sorted into one of the two
        // kinds before this compiles.
        let Config {
            program,
            args,
            env_allowlist,
            env,
            spares: _,
            idle_timeout: _,
            idle_policy: _,
            adaptive: _,
            tenant_policies: _,
            max_tenant_histories: _,
            max_helpers: _,
            max_in_flight,
            request_timeout: _,
            spawn_timeout,
            shutdown_grace: _,
            max_frame,
            max_requests_per_helper: _,
            warmup_request: _,
            pin_image,
            pipe_size,
            spin_wait,
            region_size,
            region_threshold,
            region_slots,
            crash_backoff: _,
            slow_launch_threshold,
            stderr_bytes_per_second,
            stderr_max_bytes_per_helper,
            metrics_tenant_label,
            launch_mode,
            max_helper_memory: _,
            memory_budget: _,
            max_idle_cpu: _,
            sample_interval: _,
            nice,
            sandbox,
            host,
        } = self;
        [
            ("program", *program != new.program),
            ("args", *args != new.args),
            ("env_allowlist", *env_allowlist != new.env_allowlist),
            ("env", *env != new.env),
            ("max_in_flight", *max_in_flight != new.max_in_flight),
            ("spawn_timeout", *spawn_timeout != new.spawn_timeout),
            ("max_frame", *max_frame != new.max_frame),
            ("pin_image", *pin_image != new.pin_image),
            ("pipe_size", *pipe_size != new.pipe_size),
            ("spin_wait", *spin_wait != new.spin_wait),
            ("region_size", *region_size != new.region_size),
            (
                "region_threshold",
                *region_threshold != new.region_threshold,
            ),
            ("region_slots", *region_slots != new.region_slots),
            (
                "slow_launch_threshold",
                *slow_launch_threshold != new.slow_launch_threshold,
            ),
            (
                "stderr_bytes_per_second",
                *stderr_bytes_per_second != new.stderr_bytes_per_second,
            ),
            (
                "stderr_max_bytes_per_helper",
                *stderr_max_bytes_per_helper != new.stderr_max_bytes_per_helper,
            ),
            (
                "metrics_tenant_label",
                *metrics_tenant_label != new.metrics_tenant_label,
            ),
            ("launch_mode", *launch_mode != new.launch_mode),
            ("nice", *nice != new.nice),
            ("sandbox", *sandbox != new.sandbox),
            ("host", *host != new.host),
        ]
        .into_iter()
        .find_map(|(name, changed)| changed.then_some(name))
    }

    /// A configuration with every default and the given helper program.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Config {
            program: program.into(),
            ..Config::default()
        }
    }

    /// Parses a TOML document whose top-level keys are `Config`'s fields
    /// (`program = ...`, `[sandbox]`, ...) and validates it. A server that
    /// keeps sandpool's settings in a table of its own file (`[sandpool]`)
    /// deserializes `Config` from that table with serde instead, then calls
    /// [`validate`](Self::validate). Needs the `toml` feature.
    #[cfg(feature = "toml")]
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|err| ConfigError::new("toml", err.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The launch configuration of one helper.
    pub fn helper_config(&self) -> HelperConfig {
        HelperConfig {
            program: self.program.clone(),
            args: self.args.clone(),
            env_allowlist: self.env_allowlist.clone(),
            env: self.env.clone(),
            spawn_timeout: self.spawn_timeout,
            max_frame: u32::try_from(self.max_frame.as_u64()).unwrap_or(u32::MAX),
            max_in_flight: self.max_in_flight,
            pin_image: self.pin_image,
            pipe_size: self
                .pipe_size
                .map(|size| u32::try_from(size.as_u64()).unwrap_or(u32::MAX)),
            spin_wait: self.spin_wait,
            region_size: self.region_size.map(|size| size.as_u64()),
            region_threshold: usize::try_from(self.region_threshold.as_u64()).unwrap_or(usize::MAX),
            region_slots: self.region_slots,
            launch_mode: self.launch_mode,
            nice: self.nice,
            sandbox: self.sandbox.clone(),
        }
    }

    /// Checks every field; the error names the first invalid one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_frame.as_u64() > u64::from(MAX_FRAME_CEILING) {
            return Err(ConfigError::new(
                "max_frame",
                format!(
                    "{} is larger than {MAX_FRAME_CEILING} bytes",
                    self.max_frame.as_u64()
                ),
            ));
        }
        self.helper_config().validate()?;
        if self.max_helpers == 0 {
            return Err(ConfigError::new("max_helpers", "must be at least 1"));
        }
        if let Some(host) = &self.host {
            if !host.dir.is_absolute() {
                return Err(ConfigError::new(
                    "host.dir",
                    format!("{} is not an absolute path", host.dir.display()),
                ));
            }
            if host.max_helpers == 0 {
                return Err(ConfigError::new("host.max_helpers", "must be at least 1"));
            }
        }
        self.adaptive
            .validate()
            .map_err(|err| ConfigError::new("adaptive", err.to_string()))?;
        if self.max_tenant_histories == 0 {
            return Err(ConfigError::new(
                "max_tenant_histories",
                "must be at least 1",
            ));
        }
        for (at, rule) in self.tenant_policies.iter().enumerate() {
            rule.policy().validate("tenant_policies")?;
            if self.tenant_policies[..at]
                .iter()
                .any(|earlier| earlier.prefix == rule.prefix)
            {
                return Err(ConfigError::new(
                    "tenant_policies",
                    format!("prefix {:?} is given twice", rule.prefix),
                ));
            }
        }
        if self.spares > self.max_helpers {
            return Err(ConfigError::new(
                "spares",
                format!(
                    "{} is more than max_helpers ({})",
                    self.spares, self.max_helpers
                ),
            ));
        }
        for (field, value) in [
            ("idle_timeout", self.idle_timeout),
            ("request_timeout", self.request_timeout),
            ("crash_backoff.initial", self.crash_backoff.initial),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(field, "must be greater than zero"));
            }
        }
        for (field, value) in [
            ("idle_timeout", self.idle_timeout),
            ("request_timeout", self.request_timeout),
            ("shutdown_grace", self.shutdown_grace),
            ("crash_backoff.max", self.crash_backoff.max),
            ("slow_launch_threshold", self.slow_launch_threshold),
        ] {
            if value > MAX_DURATION {
                return Err(ConfigError::new(field, "must be at most a day"));
            }
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&self.sample_interval) {
            return Err(ConfigError::new(
                "sample_interval",
                format!("{:?} is outside 10ms..=1min", self.sample_interval),
            ));
        }
        if let Some(max) = self.max_idle_cpu.time()
            && (max.is_zero() || max > MAX_DURATION)
        {
            return Err(ConfigError::new(
                "max_idle_cpu",
                "must be greater than zero and at most a day (or \"unlimited\")",
            ));
        }
        if let Some(max) = self.max_helper_memory.bytes()
            && max < MIN_ADDRESS_SPACE
        {
            return Err(ConfigError::new(
                "max_helper_memory",
                format!("{max} is less than 16 MiB: no helper could serve"),
            ));
        }
        if let MemoryBudget::Bytes(size) = self.memory_budget
            && size.as_u64() < MIN_ADDRESS_SPACE
        {
            return Err(ConfigError::new(
                "memory_budget",
                format!("{} is less than 16 MiB", size.as_u64()),
            ));
        }
        if self.crash_backoff.max < self.crash_backoff.initial {
            return Err(ConfigError::new(
                "crash_backoff.max",
                "is shorter than crash_backoff.initial",
            ));
        }
        if let Some(warmup) = &self.warmup_request
            && warmup.len() as u64 > self.max_frame.as_u64()
        {
            return Err(ConfigError::new(
                "warmup_request",
                "is larger than max_frame",
            ));
        }
        Ok(())
    }
}
