//! The sandbox spec: what the host asks a helper to do to itself at startup.
//!
//! The host passes it in the [`SPEC_ENV`] environment variable (the launch
//! clears every other variable not on an explicit allowlist), so the helper
//! can read it before it closes fds or installs its filter. It is a short
//! `key=value;key=value` string; unknown keys are refused, so an old helper
//! never silently ignores a setting a newer host asked for.

use thiserror::Error;

use crate::{DEFAULT_MAX_FRAME, MAX_FRAME_CEILING, MIN_FRAME_LIMIT, SeccompMode};

/// The environment variable carrying the encoded [`SandboxSpec`].
pub const SPEC_ENV: &str = "SANDPOOL_SANDBOX";

/// The environment variable carrying the helper program's own path, as the
/// host resolved it (absolute). Set for every helper, because with a pinned
/// image `/proc/self/exe` names a sealed memfd, not the file: a helper that
/// finds its own files from its executable's path reads this instead.
pub const PROGRAM_ENV: &str = "SANDPOOL_PROGRAM";

/// The prefix of every environment variable the launch contract reserves
/// ([`SPEC_ENV`], [`PROGRAM_ENV`], and any later ones): a host never passes
/// one of its own under it.
pub const RESERVED_ENV_PREFIX: &str = "SANDPOOL_";

/// Resource limits a helper applies to itself (soft and hard alike).
/// `None` leaves the inherited limit. The core-dump limit is always set to 0.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RlimitSpec {
    /// `RLIMIT_AS`: address space in bytes.
    pub address_space: Option<u64>,
    /// `RLIMIT_NOFILE`: one more than the highest fd number the helper may open.
    pub open_files: Option<u64>,
    /// `RLIMIT_CPU`: CPU seconds over the helper's whole life.
    pub cpu_seconds: Option<u64>,
    /// `RLIMIT_FSIZE`: largest file the helper may write, in bytes.
    pub file_size: Option<u64>,
}

/// Everything the helper's startup sequence is parameterised by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxSpec {
    /// The seccomp mode to install.
    pub seccomp: SeccompMode,
    /// The largest frame payload either side may send.
    pub max_frame: u32,
    /// Resource limits.
    pub rlimits: RlimitSpec,
    /// Syscall names to allow on top of the helper's own policy.
    pub extra_syscalls: Vec<String>,
    /// Size of the shared memory region passed as fd 3, if any.
    pub region: Option<u64>,
    /// The uid to switch to (`setresuid`), if any. The host resolved it from
    /// its configuration's user name or number.
    pub uid: Option<u32>,
    /// The gid to switch to (`setgroups([])`, `setresgid`), if any.
    pub gid: Option<u32>,
}

impl Default for SandboxSpec {
    fn default() -> Self {
        SandboxSpec {
            seccomp: SeccompMode::Enforce,
            max_frame: DEFAULT_MAX_FRAME,
            rlimits: RlimitSpec::default(),
            extra_syscalls: Vec::new(),
            region: None,
            uid: None,
            gid: None,
        }
    }
}

/// Why a sandbox spec string could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum SpecError {
    /// A `key=value` pair had no `=`.
    #[error("sandbox spec item {0:?} is not key=value")]
    NotKeyValue(String),
    /// A key this version does not know.
    #[error("sandbox spec key {0:?} is unknown")]
    UnknownKey(String),
    /// A key given twice.
    #[error("sandbox spec key {0:?} given twice")]
    DuplicateKey(String),
    /// A value outside its domain.
    #[error("sandbox spec key {key:?} has invalid value {value:?}")]
    InvalidValue {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// The spec names another version.
    #[error("sandbox spec version {0:?} not supported")]
    BadVersion(String),
}

impl SandboxSpec {
    /// Encodes the spec for [`SPEC_ENV`].
    pub fn encode(&self) -> String {
        let mut out = format!(
            "v=1;seccomp={};max_frame={}",
            self.seccomp.as_str(),
            self.max_frame
        );
        let limits = [
            ("as", self.rlimits.address_space),
            ("nofile", self.rlimits.open_files),
            ("cpu", self.rlimits.cpu_seconds),
            ("fsize", self.rlimits.file_size),
            ("region", self.region),
            ("uid", self.uid.map(u64::from)),
            ("gid", self.gid.map(u64::from)),
        ];
        for (key, value) in limits {
            if let Some(value) = value {
                out.push_str(&format!(";{key}={value}"));
            }
        }
        if !self.extra_syscalls.is_empty() {
            out.push_str(";allow=");
            out.push_str(&self.extra_syscalls.join(","));
        }
        out
    }

    /// Parses a spec such as [`SandboxSpec::encode`] produces (it also
    /// accepts empty items and a leading `+` on numbers). Every key must be
    /// known and appear at most once; `v` and `seccomp` are required so that a
    /// missing spec can never mean "no sandbox".
    pub fn decode(text: &str) -> Result<SandboxSpec, SpecError> {
        let mut spec = SandboxSpec::default();
        let mut seen: Vec<&str> = Vec::new();
        for item in text.split(';').filter(|item| !item.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| SpecError::NotKeyValue(item.to_owned()))?;
            if seen.contains(&key) {
                return Err(SpecError::DuplicateKey(key.to_owned()));
            }
            seen.push(key);
            let invalid = || SpecError::InvalidValue {
                key: key.to_owned(),
                value: value.to_owned(),
            };
            let number = || value.parse::<u64>().map_err(|_| invalid());
            match key {
                "v" if value == "1" => {}
                "v" => return Err(SpecError::BadVersion(value.to_owned())),
                "seccomp" => spec.seccomp = SeccompMode::parse(value).ok_or_else(invalid)?,
                "max_frame" => {
                    spec.max_frame = value
                        .parse::<u32>()
                        .ok()
                        .filter(|max| (MIN_FRAME_LIMIT..=MAX_FRAME_CEILING).contains(max))
                        .ok_or_else(invalid)?;
                }
                "as" => spec.rlimits.address_space = Some(number()?),
                "nofile" => spec.rlimits.open_files = Some(number()?),
                "cpu" => spec.rlimits.cpu_seconds = Some(number()?),
                "fsize" => spec.rlimits.file_size = Some(number()?),
                "region" => {
                    spec.region = Some(number()?)
                        .filter(|size| *size >= 2)
                        .map_or_else(|| Err(invalid()), |size| Ok(Some(size)))?
                }
                "uid" => spec.uid = Some(value.parse::<u32>().map_err(|_| invalid())?),
                "gid" => spec.gid = Some(value.parse::<u32>().map_err(|_| invalid())?),
                "allow" => {
                    spec.extra_syscalls = value.split(',').map(str::to_owned).collect();
                    let well_formed = |name: &String| {
                        !name.is_empty()
                            && name
                                .bytes()
                                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                    };
                    if !spec.extra_syscalls.iter().all(well_formed) {
                        return Err(invalid());
                    }
                }
                _ => return Err(SpecError::UnknownKey(key.to_owned())),
            }
        }
        for required in ["v", "seccomp"] {
            if !seen.contains(&required) {
                return Err(SpecError::InvalidValue {
                    key: required.to_owned(),
                    value: String::new(),
                });
            }
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips() {
        let spec = SandboxSpec {
            seccomp: SeccompMode::Log,
            max_frame: 4096,
            rlimits: RlimitSpec {
                address_space: Some(1 << 30),
                open_files: Some(16),
                cpu_seconds: None,
                file_size: Some(0),
            },
            extra_syscalls: vec!["getcwd".into(), "uname".into()],
            region: Some(1 << 20),
            uid: Some(65534),
            gid: Some(0),
        };
        assert!(
            spec.encode().contains(";uid=65534;gid=0"),
            "{}",
            spec.encode()
        );
        assert_eq!(SandboxSpec::decode(&spec.encode()), Ok(spec));
        let only_gid = SandboxSpec {
            gid: Some(u32::MAX),
            ..SandboxSpec::default()
        };
        assert_eq!(SandboxSpec::decode(&only_gid.encode()), Ok(only_gid));
        let plain = SandboxSpec::default();
        assert_eq!(SandboxSpec::decode(&plain.encode()), Ok(plain));
    }

    #[test]
    fn spec_fails_closed() {
        assert!(matches!(
            SandboxSpec::decode(""),
            Err(SpecError::InvalidValue { .. })
        ));
        assert!(matches!(
            SandboxSpec::decode("v=1;seccomp=enforce;colour=blue"),
            Err(SpecError::UnknownKey(_))
        ));
        assert!(matches!(
            SandboxSpec::decode("v=1;seccomp=maybe"),
            Err(SpecError::InvalidValue { .. })
        ));
        assert!(matches!(
            SandboxSpec::decode("v=1;seccomp=off;seccomp=enforce"),
            Err(SpecError::DuplicateKey(_))
        ));
        assert!(matches!(
            SandboxSpec::decode("v=1;seccomp=enforce;max_frame=0"),
            Err(SpecError::InvalidValue { .. })
        ));
        for bad in ["uid=-1", "uid=4294967296", "gid=root", "uid="] {
            assert!(
                matches!(
                    SandboxSpec::decode(&format!("v=1;seccomp=enforce;{bad}")),
                    Err(SpecError::InvalidValue { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            SandboxSpec::decode("v=1;seccomp=enforce;allow=open;at"),
            Err(SpecError::NotKeyValue(_))
        ));
    }
}
