//! The Hello payload (the helper's proof of its startup sequence) and the Bind
//! payload (the tenant a spare helper is bound to).

use thiserror::Error;

/// How the helper closed the file descriptors it inherited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FdCloseMethod {
    /// One `close_range(3, ~0, 0)` syscall.
    CloseRange = 1,
    /// `close_range` was unavailable: the helper walked `/proc/self/fd` and
    /// closed each descriptor. Slow (about 1.75 us per fd), so it is reported.
    ProcSelfFdWalk = 2,
}

/// The seccomp mode the helper installed before saying hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum SeccompMode {
    /// No filter at all. Only when the configuration asks for it explicitly.
    Off = 0,
    /// A filter that allows everything but logs each syscall outside the policy
    /// (for writing a policy). Only when asked for explicitly.
    Log = 1,
    /// The policy is enforced: a syscall outside it kills the helper (SIGSYS).
    #[default]
    Enforce = 2,
}

impl SeccompMode {
    /// The name used in configuration and in the sandbox spec.
    pub fn as_str(self) -> &'static str {
        match self {
            SeccompMode::Off => "off",
            SeccompMode::Log => "log",
            SeccompMode::Enforce => "enforce",
        }
    }

    /// Parses a name produced by [`SeccompMode::as_str`].
    pub fn parse(name: &str) -> Option<SeccompMode> {
        Some(match name {
            "off" => SeccompMode::Off,
            "log" => SeccompMode::Log,
            "enforce" => SeccompMode::Enforce,
            _ => return None,
        })
    }
}

/// The longest build id a Hello may carry, in bytes.
pub const MAX_BUILD_ID: usize = 128;
/// The longest tenant label a Bind may carry, in bytes.
pub const MAX_TENANT_LEN: usize = 256;

/// What a helper did before it read anything: the proof the host checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The helper's own pid, as it sees it.
    pub pid: u32,
    /// How inherited fds were closed.
    pub fd_close_method: FdCloseMethod,
    /// How many inherited fds (at or above 3) were open and got closed.
    pub fds_closed: u32,
    /// Time spent counting and closing inherited fds, in nanoseconds.
    pub fd_close_nanos: u64,
    /// Whether `PR_SET_NO_NEW_PRIVS` is set.
    pub no_new_privs: bool,
    /// The seccomp mode installed.
    pub seccomp: SeccompMode,
    /// The effective, permitted, inheritable and ambient capability sets are
    /// empty (flag bit 0).
    pub caps_cleared: bool,
    /// The bounding capability set is empty (flag bit 1). A helper without
    /// `CAP_SETPCAP` (started by a non-root host) cannot empty it.
    pub bounding_cleared: bool,
    /// The uid the helper runs as (real, effective, saved and filesystem).
    pub uid: u32,
    /// The gid the helper runs as (real, effective, saved and filesystem).
    pub gid: u32,
    /// An identifier of the helper build (free-form, at most [`MAX_BUILD_ID`] bytes).
    pub build_id: String,
    /// The fds the helper's init hook opened and kept (flag bit 2), sorted
    /// by fd, at most [`MAX_KEPT_FDS`]. Every other fd at or above 3 is
    /// closed.
    pub kept_fds: Vec<KeptFd>,
}

/// The most fds a Hello may declare kept.
pub const MAX_KEPT_FDS: usize = 16;
/// The longest path a kept fd may declare, in bytes (`PATH_MAX` less the NUL).
pub const MAX_KEPT_PATH: usize = 4095;

/// How a kept fd was opened (its `O_ACCMODE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FdAccess {
    /// `O_RDONLY`.
    Read = 0,
    /// `O_WRONLY`.
    Write = 1,
    /// `O_RDWR`.
    ReadWrite = 2,
}

impl FdAccess {
    /// The access mode of `O_ACCMODE` bits (0, 1 or 2).
    pub fn from_accmode(bits: u32) -> Option<FdAccess> {
        Some(match bits {
            0 => FdAccess::Read,
            1 => FdAccess::Write,
            2 => FdAccess::ReadWrite,
            _ => return None,
        })
    }

    /// Whether the fd can be written through.
    pub fn writes(self) -> bool {
        self != FdAccess::Read
    }

    /// `"read"`, `"write"` or `"read-write"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FdAccess::Read => "read",
            FdAccess::Write => "write",
            FdAccess::ReadWrite => "read-write",
        }
    }
}

/// A file the helper's init hook opened and keeps open while it serves:
/// declared in the Hello, checked by the host against `/proc/PID/fd`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeptFd {
    /// The fd number (at least 3).
    pub fd: u32,
    /// Its access mode.
    pub access: FdAccess,
    /// Its target as `/proc/self/fd/N` reads (bytes: a Linux path), 1 to
    /// [`MAX_KEPT_PATH`] bytes.
    pub path: Vec<u8>,
}

impl KeptFd {
    /// The path, for messages (invalid UTF-8 replaced).
    pub fn path_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.path)
    }
}

/// Why a Hello or Bind payload could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PayloadError {
    /// The payload is shorter than its fixed part, or its declared tail.
    #[error("{what} payload truncated: needed {needed} bytes, got {got}")]
    Truncated {
        /// Which payload.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// Bytes left over after the payload's declared end.
    #[error("{what} payload has {extra} trailing bytes")]
    TrailingBytes {
        /// Which payload.
        what: &'static str,
        /// How many bytes were left over.
        extra: usize,
    },
    /// A field held a value outside its domain.
    #[error("{what} field {field} has invalid value {value}")]
    InvalidField {
        /// Which payload.
        what: &'static str,
        /// Which field.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// A string field is not UTF-8.
    #[error("{what} field {field} is not UTF-8")]
    NotUtf8 {
        /// Which payload.
        what: &'static str,
        /// Which field.
        field: &'static str,
    },
    /// A variable-length field is empty or too long.
    #[error("{what} field {field} has length {len}, allowed {min}..={max}")]
    BadLength {
        /// Which payload.
        what: &'static str,
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// Smallest length allowed.
        min: usize,
        /// Largest length allowed.
        max: usize,
    },
}

const HELLO_FIXED: usize = 30;
/// Flag bit 0 of Hello byte 3: [`Hello::caps_cleared`].
const FLAG_CAPS_CLEARED: u8 = 1 << 0;
/// Flag bit 1 of Hello byte 3: [`Hello::bounding_cleared`].
const FLAG_BOUNDING_CLEARED: u8 = 1 << 1;
/// Flag bit 2 of Hello byte 3: a kept-fd list follows the build id.
const FLAG_KEPT_FDS: u8 = 1 << 2;
/// Every flag bit this version knows; any other bit set is refused.
const KNOWN_FLAGS: u8 = FLAG_CAPS_CLEARED | FLAG_BOUNDING_CLEARED | FLAG_KEPT_FDS;
/// A kept-fd entry's fixed part: u32 fd, u8 access, u16 path length.
const KEPT_FIXED: usize = 7;
/// The longest Hello payload: the fixed part, the longest build id and the
/// longest kept-fd list.
pub const MAX_HELLO_LEN: usize =
    HELLO_FIXED + MAX_BUILD_ID + 1 + MAX_KEPT_FDS * (KEPT_FIXED + MAX_KEPT_PATH);

impl Hello {
    /// Encodes the Hello payload.
    ///
    /// ```text
    /// 0 u8 fd_close_method | 1 u8 no_new_privs | 2 u8 seccomp | 3 u8 flags
    /// 4 u32 pid | 8 u32 fds_closed | 12 u64 fd_close_nanos
    /// 20 u32 uid | 24 u32 gid
    /// 28 u16 build id length | 30.. build id (UTF-8)
    /// only with flag bit 2, after the build id:
    ///   u8 count (1..=16), then per kept fd, in increasing fd order:
    ///   u32 fd (>= 3) | u8 access (0 read, 1 write, 2 read-write)
    ///   | u16 path length (1..=4095) | path bytes
    /// ```
    ///
    /// Flags (byte 3): bit 0 [`caps_cleared`](Self::caps_cleared), bit 1
    /// [`bounding_cleared`](Self::bounding_cleared), bit 2 a kept-fd list
    /// follows (set exactly when [`kept_fds`](Self::kept_fds) is not empty);
    /// the other bits are 0 and a Hello with any of them set is refused. (Bytes 3 and 20..28 were
    /// reserved zeros before; an old helper's Hello decodes as "no
    /// capability dropped, uid 0, gid 0", which a host refuses.)
    ///
    /// A build id longer than [`MAX_BUILD_ID`] is cut at a character boundary.
    /// The kept fds are written as given; a helper runtime declares at most
    /// [`MAX_KEPT_FDS`], sorted, each path within [`MAX_KEPT_PATH`] (the
    /// decoder refuses anything else).
    pub fn encode(&self) -> Vec<u8> {
        let mut id_len = self.build_id.len().min(MAX_BUILD_ID);
        while !self.build_id.is_char_boundary(id_len) {
            id_len -= 1;
        }
        let mut out = Vec::with_capacity(HELLO_FIXED + id_len);
        out.push(self.fd_close_method as u8);
        out.push(u8::from(self.no_new_privs));
        out.push(self.seccomp as u8);
        let mut flags = 0;
        if self.caps_cleared {
            flags |= FLAG_CAPS_CLEARED;
        }
        if self.bounding_cleared {
            flags |= FLAG_BOUNDING_CLEARED;
        }
        if !self.kept_fds.is_empty() {
            flags |= FLAG_KEPT_FDS;
        }
        out.push(flags);
        out.extend_from_slice(&self.pid.to_le_bytes());
        out.extend_from_slice(&self.fds_closed.to_le_bytes());
        out.extend_from_slice(&self.fd_close_nanos.to_le_bytes());
        out.extend_from_slice(&self.uid.to_le_bytes());
        out.extend_from_slice(&self.gid.to_le_bytes());
        out.extend_from_slice(&(id_len as u16).to_le_bytes());
        out.extend_from_slice(&self.build_id.as_bytes()[..id_len]);
        if !self.kept_fds.is_empty() {
            out.push(u8::try_from(self.kept_fds.len()).unwrap_or(u8::MAX));
            for kept in &self.kept_fds {
                out.extend_from_slice(&kept.fd.to_le_bytes());
                out.push(kept.access as u8);
                let len = u16::try_from(kept.path.len()).unwrap_or(u16::MAX);
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&kept.path[..usize::from(len)]);
            }
        }
        out
    }

    /// Decodes and validates a Hello payload.
    pub fn decode(bytes: &[u8]) -> Result<Hello, PayloadError> {
        const WHAT: &str = "Hello";
        if bytes.len() < HELLO_FIXED {
            return Err(PayloadError::Truncated {
                what: WHAT,
                needed: HELLO_FIXED,
                got: bytes.len(),
            });
        }
        let invalid = |field, value: u64| PayloadError::InvalidField {
            what: WHAT,
            field,
            value,
        };
        let fd_close_method = match bytes[0] {
            1 => FdCloseMethod::CloseRange,
            2 => FdCloseMethod::ProcSelfFdWalk,
            other => return Err(invalid("fd_close_method", other.into())),
        };
        let no_new_privs = match bytes[1] {
            0 => false,
            1 => true,
            other => return Err(invalid("no_new_privs", other.into())),
        };
        let seccomp = match bytes[2] {
            0 => SeccompMode::Off,
            1 => SeccompMode::Log,
            2 => SeccompMode::Enforce,
            other => return Err(invalid("seccomp", other.into())),
        };
        let flags = bytes[3];
        if flags & !KNOWN_FLAGS != 0 {
            return Err(invalid("flags", flags.into()));
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let u64_at = |at: usize| u64::from(u32_at(at)) | (u64::from(u32_at(at + 4)) << 32);
        let id_len = usize::from(u16::from_le_bytes([bytes[28], bytes[29]]));
        if id_len > MAX_BUILD_ID {
            return Err(PayloadError::BadLength {
                what: WHAT,
                field: "build_id",
                len: id_len,
                min: 0,
                max: MAX_BUILD_ID,
            });
        }
        let id_end = HELLO_FIXED + id_len;
        let id_bytes = bytes
            .get(HELLO_FIXED..id_end)
            .ok_or(PayloadError::Truncated {
                what: WHAT,
                needed: id_end,
                got: bytes.len(),
            })?;
        let (kept_fds, end) = if flags & FLAG_KEPT_FDS != 0 {
            decode_kept_fds(bytes, id_end)?
        } else {
            (Vec::new(), id_end)
        };
        if bytes.len() > end {
            return Err(PayloadError::TrailingBytes {
                what: WHAT,
                extra: bytes.len() - end,
            });
        }
        let build_id = std::str::from_utf8(id_bytes)
            .map_err(|_| PayloadError::NotUtf8 {
                what: WHAT,
                field: "build_id",
            })?
            .to_owned();
        Ok(Hello {
            pid: u32_at(4),
            fd_close_method,
            fds_closed: u32_at(8),
            fd_close_nanos: u64_at(12),
            no_new_privs,
            seccomp,
            caps_cleared: flags & FLAG_CAPS_CLEARED != 0,
            bounding_cleared: flags & FLAG_BOUNDING_CLEARED != 0,
            uid: u32_at(20),
            gid: u32_at(24),
            build_id,
            kept_fds,
        })
    }
}

/// Decodes the kept-fd list of a Hello starting at `at`; returns it and
/// where it ends.
fn decode_kept_fds(bytes: &[u8], at: usize) -> Result<(Vec<KeptFd>, usize), PayloadError> {
    const WHAT: &str = "Hello";
    let truncated = |needed: usize| PayloadError::Truncated {
        what: WHAT,
        needed,
        got: bytes.len(),
    };
    let count = usize::from(*bytes.get(at).ok_or_else(|| truncated(at + 1))?);
    if count == 0 || count > MAX_KEPT_FDS {
        return Err(PayloadError::BadLength {
            what: WHAT,
            field: "kept_fds",
            len: count,
            min: 1,
            max: MAX_KEPT_FDS,
        });
    }
    let mut pos = at + 1;
    let mut kept: Vec<KeptFd> = Vec::with_capacity(count);
    for _ in 0..count {
        let fixed = bytes
            .get(pos..pos + KEPT_FIXED)
            .ok_or_else(|| truncated(pos + KEPT_FIXED))?;
        let fd = u32::from_le_bytes([fixed[0], fixed[1], fixed[2], fixed[3]]);
        let after_previous = kept.last().is_none_or(|previous| fd > previous.fd);
        if fd < 3 || !after_previous {
            return Err(PayloadError::InvalidField {
                what: WHAT,
                field: "kept_fd",
                value: fd.into(),
            });
        }
        let access = FdAccess::from_accmode(fixed[4].into()).ok_or(PayloadError::InvalidField {
            what: WHAT,
            field: "kept_fd_access",
            value: fixed[4].into(),
        })?;
        let len = usize::from(u16::from_le_bytes([fixed[5], fixed[6]]));
        if len == 0 || len > MAX_KEPT_PATH {
            return Err(PayloadError::BadLength {
                what: WHAT,
                field: "kept_fd_path",
                len,
                min: 1,
                max: MAX_KEPT_PATH,
            });
        }
        pos += KEPT_FIXED;
        let path = bytes
            .get(pos..pos + len)
            .ok_or_else(|| truncated(pos + len))?;
        if path.contains(&0) {
            return Err(PayloadError::InvalidField {
                what: WHAT,
                field: "kept_fd_path",
                value: 0,
            });
        }
        pos += len;
        kept.push(KeptFd {
            fd,
            access,
            path: path.to_vec(),
        });
    }
    Ok((kept, pos))
}

/// Validates a Bind payload: the tenant label, 1 to [`MAX_TENANT_LEN`] opaque bytes.
pub fn decode_bind(bytes: &[u8]) -> Result<&[u8], PayloadError> {
    if bytes.is_empty() || bytes.len() > MAX_TENANT_LEN {
        return Err(PayloadError::BadLength {
            what: "Bind",
            field: "tenant",
            len: bytes.len(),
            min: 1,
            max: MAX_TENANT_LEN,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Hello {
        Hello {
            pid: 4242,
            fd_close_method: FdCloseMethod::CloseRange,
            fds_closed: 10_001,
            fd_close_nanos: 123_456,
            no_new_privs: true,
            seccomp: SeccompMode::Enforce,
            caps_cleared: true,
            bounding_cleared: false,
            uid: 65534,
            gid: 65533,
            build_id: "sandpool-helper 0.1.0".into(),
            kept_fds: Vec::new(),
        }
    }

    fn kept(fd: u32, access: FdAccess, path: &str) -> KeptFd {
        KeptFd {
            fd,
            access,
            path: path.as_bytes().to_vec(),
        }
    }

    #[test]
    fn kept_fds_round_trip_behind_flag_bit_2() {
        let hello = Hello {
            kept_fds: vec![
                kept(3, FdAccess::Read, "/dev/urandom"),
                kept(7, FdAccess::ReadWrite, "/var/lib/redo/tables"),
            ],
            ..sample()
        };
        let bytes = hello.encode();
        assert_eq!(bytes[3] & FLAG_KEPT_FDS, FLAG_KEPT_FDS);
        let list = HELLO_FIXED + hello.build_id.len();
        assert_eq!(bytes[list], 2);
        assert_eq!(bytes[list + 1..list + 5], 3u32.to_le_bytes());
        assert_eq!(bytes[list + 5], 0);
        assert_eq!(bytes[list + 6..list + 8], 12u16.to_le_bytes());
        assert_eq!(Hello::decode(&bytes), Ok(hello));
        // Without kept fds the bytes are those of a Hello before the list.
        assert_eq!(sample().encode()[3] & FLAG_KEPT_FDS, 0);
    }

    #[test]
    fn kept_fds_are_refused_unless_well_formed() {
        let with = |kept_fds: Vec<KeptFd>| Hello {
            kept_fds,
            ..sample()
        };
        let field = |bytes: &[u8]| match Hello::decode(bytes) {
            Err(
                PayloadError::InvalidField { field, .. } | PayloadError::BadLength { field, .. },
            ) => field,
            other => panic!("expected a refusal, got {other:?}"),
        };
        let stdio = with(vec![kept(2, FdAccess::Read, "/dev/null")]).encode();
        assert_eq!(field(&stdio), "kept_fd");
        let unsorted = with(vec![
            kept(5, FdAccess::Read, "/a"),
            kept(4, FdAccess::Read, "/b"),
        ])
        .encode();
        assert_eq!(field(&unsorted), "kept_fd");
        let twice = with(vec![
            kept(5, FdAccess::Read, "/a"),
            kept(5, FdAccess::Read, "/a"),
        ])
        .encode();
        assert_eq!(field(&twice), "kept_fd");
        let mut access = with(vec![kept(3, FdAccess::Read, "/a")]).encode();
        let list = HELLO_FIXED + sample().build_id.len();
        access[list + 5] = 3;
        assert_eq!(field(&access), "kept_fd_access");
        let empty = with(vec![kept(3, FdAccess::Read, "")]).encode();
        assert_eq!(field(&empty), "kept_fd_path");
        let nul = with(vec![kept(3, FdAccess::Read, "/a\0b")]).encode();
        assert_eq!(field(&nul), "kept_fd_path");
        let mut none = sample().encode();
        none[3] |= FLAG_KEPT_FDS;
        none.push(0);
        assert_eq!(field(&none), "kept_fds");
        let too_many = with(
            (3..3 + MAX_KEPT_FDS as u32 + 1)
                .map(|fd| kept(fd, FdAccess::Read, "/a"))
                .collect(),
        )
        .encode();
        assert_eq!(field(&too_many), "kept_fds");
        // Flag set, list missing or cut short.
        let mut flag_only = sample().encode();
        flag_only[3] |= FLAG_KEPT_FDS;
        assert!(matches!(
            Hello::decode(&flag_only),
            Err(PayloadError::Truncated { .. })
        ));
        let full = with(vec![kept(3, FdAccess::Read, "/dev/urandom")]).encode();
        assert!(matches!(
            Hello::decode(&full[..full.len() - 1]),
            Err(PayloadError::Truncated { .. })
        ));
        let longest = with(
            (3..3 + MAX_KEPT_FDS as u32)
                .map(|fd| KeptFd {
                    fd,
                    access: FdAccess::ReadWrite,
                    path: vec![b'x'; MAX_KEPT_PATH],
                })
                .collect(),
        );
        let longest = Hello {
            build_id: "b".repeat(MAX_BUILD_ID),
            ..longest
        };
        assert_eq!(longest.encode().len(), MAX_HELLO_LEN);
        assert_eq!(Hello::decode(&longest.encode()), Ok(longest));
    }

    #[test]
    fn hello_round_trips() {
        let hello = sample();
        assert_eq!(Hello::decode(&hello.encode()), Ok(hello));
    }

    #[test]
    fn hello_rejects_bad_fields() {
        let mut bytes = sample().encode();
        bytes[2] = 9;
        assert_eq!(
            Hello::decode(&bytes),
            Err(PayloadError::InvalidField {
                what: "Hello",
                field: "seccomp",
                value: 9
            })
        );
        let mut bytes = sample().encode();
        bytes.push(0);
        assert!(matches!(
            Hello::decode(&bytes),
            Err(PayloadError::TrailingBytes { extra: 1, .. })
        ));
        let bytes = sample().encode();
        assert!(matches!(
            Hello::decode(&bytes[..bytes.len() - 1]),
            Err(PayloadError::Truncated { .. })
        ));
    }

    #[test]
    fn hello_flags_and_ids_are_where_the_layout_says() {
        let hello = sample();
        let bytes = hello.encode();
        assert_eq!(bytes[3], FLAG_CAPS_CLEARED);
        assert_eq!(bytes[20..24], 65534u32.to_le_bytes());
        assert_eq!(bytes[24..28], 65533u32.to_le_bytes());
        for (caps_cleared, bounding_cleared) in [(false, false), (true, true), (false, true)] {
            let hello = Hello {
                caps_cleared,
                bounding_cleared,
                ..sample()
            };
            assert_eq!(Hello::decode(&hello.encode()), Ok(hello));
        }
        for unknown in [1u8 << 3, 1 << 7] {
            let mut bytes = sample().encode();
            bytes[3] |= unknown;
            assert_eq!(
                Hello::decode(&bytes),
                Err(PayloadError::InvalidField {
                    what: "Hello",
                    field: "flags",
                    value: u64::from(FLAG_CAPS_CLEARED | unknown)
                })
            );
        }
    }

    #[test]
    fn long_build_id_is_cut_on_a_char_boundary() {
        let mut hello = sample();
        hello.build_id = "é".repeat(100); // 200 bytes
        let back = Hello::decode(&hello.encode()).expect("valid");
        assert_eq!(back.build_id, "é".repeat(64));
    }

    #[test]
    fn bind_bounds_the_tenant() {
        assert!(decode_bind(b"").is_err());
        assert!(decode_bind(&[7; MAX_TENANT_LEN + 1]).is_err());
        assert_eq!(decode_bind(b"tenant-1"), Ok(&b"tenant-1"[..]));
    }
}
