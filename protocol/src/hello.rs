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
/// Every flag bit this version knows; any other bit set is refused.
const KNOWN_FLAGS: u8 = FLAG_CAPS_CLEARED | FLAG_BOUNDING_CLEARED;
/// The longest Hello payload: the fixed part and the longest build id.
pub const MAX_HELLO_LEN: usize = HELLO_FIXED + MAX_BUILD_ID;

impl Hello {
    /// Encodes the Hello payload.
    ///
    /// ```text
    /// 0 u8 fd_close_method | 1 u8 no_new_privs | 2 u8 seccomp | 3 u8 flags
    /// 4 u32 pid | 8 u32 fds_closed | 12 u64 fd_close_nanos
    /// 20 u32 uid | 24 u32 gid
    /// 28 u16 build id length | 30.. build id (UTF-8)
    /// ```
    ///
    /// Flags (byte 3): bit 0 [`caps_cleared`](Self::caps_cleared), bit 1
    /// [`bounding_cleared`](Self::bounding_cleared); the other bits are 0 and
    /// a Hello with any of them set is refused. (Bytes 3 and 20..28 were
    /// reserved zeros before; an old helper's Hello decodes as "no
    /// capability dropped, uid 0, gid 0", which a host refuses.)
    ///
    /// A build id longer than [`MAX_BUILD_ID`] is cut at a character boundary.
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
        out.push(flags);
        out.extend_from_slice(&self.pid.to_le_bytes());
        out.extend_from_slice(&self.fds_closed.to_le_bytes());
        out.extend_from_slice(&self.fd_close_nanos.to_le_bytes());
        out.extend_from_slice(&self.uid.to_le_bytes());
        out.extend_from_slice(&self.gid.to_le_bytes());
        out.extend_from_slice(&(id_len as u16).to_le_bytes());
        out.extend_from_slice(&self.build_id.as_bytes()[..id_len]);
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
        let end = HELLO_FIXED + id_len;
        let id_bytes = bytes.get(HELLO_FIXED..end).ok_or(PayloadError::Truncated {
            what: WHAT,
            needed: end,
            got: bytes.len(),
        })?;
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
        })
    }
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
        }
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
        for unknown in [1u8 << 2, 1 << 7] {
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
