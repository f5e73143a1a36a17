//! A corpus of valid and invalid frames with the outcome each must produce.
//!
//! The same cases run through the pure decoder here, through the helper
//! runtime (the tests write them to a real helper's stdin) and through the
//! host (a hostile test helper writes them back as its reply), so both sides
//! provably agree on what is a frame and what is an error.

use crate::{
    DEFAULT_MAX_FRAME, DecodeError, Direction, FdCloseMethod, HEADER_LEN, Hello, Kind,
    MAX_ERROR_MESSAGE, MAX_FRAME_CEILING, SeccompMode, VERSION, encode_frame,
};

/// What decoding a case must produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// A frame of this kind, id and payload length.
    Frame {
        /// Kind.
        kind: Kind,
        /// Request id.
        id: u64,
        /// Payload length.
        len: usize,
    },
    /// This decode error.
    Error(DecodeError),
}

/// One corpus case.
#[derive(Clone, Debug)]
pub struct Case {
    /// A stable name, usable on a command line.
    pub name: &'static str,
    /// The direction the bytes travel in.
    pub direction: Direction,
    /// The bytes on the wire.
    pub bytes: Vec<u8>,
    /// The outcome under [`DEFAULT_MAX_FRAME`].
    pub expect: Expect,
}

fn raw_header(magic: [u8; 2], version: u8, kind: u8, id: u64, len: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&magic);
    out.push(version);
    out.push(kind);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out
}

fn frame(kind: Kind, id: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    // Corpus payloads are a few bytes: far below any frame limit.
    let _ = encode_frame(kind, id, payload, MAX_FRAME_CEILING, &mut out);
    out
}

fn ok(kind: Kind, id: u64, len: usize) -> Expect {
    Expect::Frame { kind, id, len }
}

/// A valid Hello payload for corpus and test use.
pub fn sample_hello() -> Hello {
    Hello {
        pid: 1,
        fd_close_method: FdCloseMethod::CloseRange,
        fds_closed: 0,
        fd_close_nanos: 1_000,
        no_new_privs: true,
        seccomp: SeccompMode::Enforce,
        caps_cleared: true,
        bounding_cleared: true,
        uid: 0,
        gid: 0,
        build_id: "corpus".into(),
        kept_fds: Vec::new(),
    }
}

/// Every case, both directions.
pub fn cases() -> Vec<Case> {
    use Direction::{HelperToHost as Up, HostToHelper as Down};
    let max = DEFAULT_MAX_FRAME;
    let hello = sample_hello().encode();
    let truncated_payload = {
        let mut bytes = frame(Kind::Response, 1, &[0xAB; 64]);
        bytes.truncate(HEADER_LEN + 10);
        bytes
    };
    let truncated_request = {
        let mut bytes = frame(Kind::Request, 1, &[0xCD; 32]);
        bytes.truncate(HEADER_LEN + 31);
        bytes
    };
    let magic = crate::MAGIC;
    vec![
        Case {
            name: "response",
            direction: Up,
            bytes: frame(Kind::Response, 1, b"page"),
            expect: ok(Kind::Response, 1, 4),
        },
        Case {
            name: "empty-response",
            direction: Up,
            bytes: frame(Kind::Response, 9, b""),
            expect: ok(Kind::Response, 9, 0),
        },
        Case {
            name: "error",
            direction: Up,
            bytes: frame(Kind::Error, 2, b"bad record"),
            expect: ok(Kind::Error, 2, 10),
        },
        Case {
            name: "hello",
            direction: Up,
            bytes: frame(Kind::Hello, 0, &hello),
            expect: ok(Kind::Hello, 0, hello.len()),
        },
        Case {
            name: "claims-4gib",
            direction: Up,
            bytes: raw_header(magic, VERSION, Kind::Response as u8, 1, u32::MAX),
            expect: Expect::Error(DecodeError::Oversized { len: u32::MAX, max }),
        },
        Case {
            name: "one-over-max",
            direction: Up,
            bytes: raw_header(magic, VERSION, Kind::Response as u8, 1, max + 1),
            expect: Expect::Error(DecodeError::Oversized { len: max + 1, max }),
        },
        Case {
            name: "claims-max-sends-1",
            direction: Up,
            bytes: {
                let mut bytes = raw_header(magic, VERSION, Kind::Response as u8, 1, max);
                bytes.push(0xAA);
                bytes
            },
            expect: Expect::Error(DecodeError::Truncated {
                needed: HEADER_LEN + max as usize,
                got: HEADER_LEN + 1,
            }),
        },
        Case {
            name: "hello-over-its-own-limit",
            direction: Up,
            bytes: raw_header(
                magic,
                VERSION,
                Kind::Hello as u8,
                0,
                crate::MAX_HELLO_LEN as u32 + 1,
            ),
            expect: Expect::Error(DecodeError::Oversized {
                len: crate::MAX_HELLO_LEN as u32 + 1,
                max: crate::MAX_HELLO_LEN as u32,
            }),
        },
        Case {
            name: "truncated-header",
            direction: Up,
            bytes: frame(Kind::Response, 1, b"x")[..7].to_vec(),
            expect: Expect::Error(DecodeError::Truncated {
                needed: HEADER_LEN,
                got: 7,
            }),
        },
        Case {
            name: "truncated-payload",
            direction: Up,
            bytes: truncated_payload,
            expect: Expect::Error(DecodeError::Truncated {
                needed: HEADER_LEN + 64,
                got: HEADER_LEN + 10,
            }),
        },
        Case {
            name: "not-a-frame",
            direction: Up,
            bytes: b"HTTP/1.1 200 OK\r\n\r\n".to_vec(),
            expect: Expect::Error(DecodeError::BadMagic { found: *b"HT" }),
        },
        Case {
            name: "bad-version",
            direction: Up,
            bytes: raw_header(magic, 99, Kind::Response as u8, 1, 0),
            expect: Expect::Error(DecodeError::BadVersion { found: 99 }),
        },
        Case {
            name: "unknown-kind",
            direction: Up,
            bytes: raw_header(magic, VERSION, 0x7f, 1, 0),
            expect: Expect::Error(DecodeError::UnknownKind(0x7f)),
        },
        Case {
            name: "helper-sends-request",
            direction: Up,
            bytes: frame(Kind::Request, 1, b"x"),
            expect: Expect::Error(DecodeError::WrongDirection {
                kind: Kind::Request,
                direction: Up,
            }),
        },
        Case {
            name: "hello-with-id",
            direction: Up,
            bytes: frame(Kind::Hello, 5, &hello),
            expect: Expect::Error(DecodeError::UnexpectedId {
                kind: Kind::Hello,
                id: 5,
            }),
        },
        Case {
            name: "error-message-too-long",
            direction: Up,
            bytes: raw_header(
                magic,
                VERSION,
                Kind::Error as u8,
                1,
                MAX_ERROR_MESSAGE as u32 + 1,
            ),
            expect: Expect::Error(DecodeError::Oversized {
                len: MAX_ERROR_MESSAGE as u32 + 1,
                max: MAX_ERROR_MESSAGE as u32,
            }),
        },
        Case {
            name: "request",
            direction: Down,
            bytes: frame(Kind::Request, 3, b"\x01echo"),
            expect: ok(Kind::Request, 3, 5),
        },
        Case {
            name: "bind",
            direction: Down,
            bytes: frame(Kind::Bind, 0, b"tenant-a"),
            expect: ok(Kind::Bind, 0, 8),
        },
        Case {
            name: "shutdown",
            direction: Down,
            bytes: frame(Kind::Shutdown, 0, b""),
            expect: ok(Kind::Shutdown, 0, 0),
        },
        Case {
            name: "shutdown-with-payload",
            direction: Down,
            bytes: frame(Kind::Shutdown, 0, b"x"),
            expect: Expect::Error(DecodeError::UnexpectedPayload {
                kind: Kind::Shutdown,
                len: 1,
            }),
        },
        Case {
            name: "host-sends-response",
            direction: Down,
            bytes: frame(Kind::Response, 1, b""),
            expect: Expect::Error(DecodeError::WrongDirection {
                kind: Kind::Response,
                direction: Down,
            }),
        },
        Case {
            name: "request-claims-4gib",
            direction: Down,
            bytes: raw_header(magic, VERSION, Kind::Request as u8, 1, u32::MAX),
            expect: Expect::Error(DecodeError::Oversized { len: u32::MAX, max }),
        },
        Case {
            name: "request-truncated",
            direction: Down,
            bytes: truncated_request,
            expect: Expect::Error(DecodeError::Truncated {
                needed: HEADER_LEN + 32,
                got: HEADER_LEN + 31,
            }),
        },
        Case {
            name: "request-bad-magic",
            direction: Down,
            bytes: raw_header(*b"PS", VERSION, Kind::Request as u8, 1, 0),
            expect: Expect::Error(DecodeError::BadMagic { found: *b"PS" }),
        },
    ]
}

/// Looks a case up by name.
pub fn case(name: &str) -> Option<Case> {
    cases().into_iter().find(|case| case.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode_frame;

    #[test]
    fn every_case_decodes_as_expected() {
        for case in cases() {
            let got = decode_frame(&case.bytes, DEFAULT_MAX_FRAME, case.direction).map(
                |(header, payload, used)| {
                    assert_eq!(used, case.bytes.len(), "{}: consumed everything", case.name);
                    Expect::Frame {
                        kind: header.kind,
                        id: header.id,
                        len: payload.len(),
                    }
                },
            );
            let got = got.unwrap_or_else(Expect::Error);
            assert_eq!(got, case.expect, "case {}", case.name);
        }
    }

    #[test]
    fn every_prefix_of_a_valid_frame_is_truncated_not_wrong() {
        for case in cases() {
            if !matches!(case.expect, Expect::Frame { .. }) {
                continue;
            }
            for cut in 0..case.bytes.len() {
                let err = decode_frame(&case.bytes[..cut], DEFAULT_MAX_FRAME, case.direction)
                    .expect_err("a strict prefix is never a whole frame");
                assert!(
                    matches!(err, DecodeError::Truncated { .. }),
                    "{} cut at {cut}: {err:?}",
                    case.name
                );
            }
        }
    }

    #[test]
    fn names_are_unique() {
        let all = cases();
        for (i, a) in all.iter().enumerate() {
            assert!(
                all[i + 1..].iter().all(|b| b.name != a.name),
                "duplicate {}",
                a.name
            );
            assert_eq!(case(a.name).map(|c| c.bytes), Some(a.bytes.clone()));
        }
    }
}
