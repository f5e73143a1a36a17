//! The shared frame corpus (`sandpool_protocol::corpus`) run through both
//! sides with real processes:
//!
//! - host side: a hostile helper answers a call with the case's bytes; the
//!   call must fail with exactly the expected typed error (or time out, for a
//!   truncated frame), the helper must be killed and reaped, and the host must
//!   not allocate anything near the size a frame claims;
//! - helper side: the case's bytes are written to a real helper's stdin; a
//!   valid frame is served, an invalid one ends the helper with the protocol
//!   error exit status and a message naming the error.
//!
//! One test per side, run one after the other in this binary, so the global
//! allocation counter sees only the calls it measures.
#![allow(clippy::disallowed_methods)] // drives a helper's stdin directly, outside the pool
#![allow(clippy::unwrap_used)]

use std::alloc::System;
use std::io::{Read, Write};
use std::process::{Command, Stdio};

use sandpool::{CallError, Launcher, ProtocolViolation};
use sandpool_protocol::corpus::{self, Expect};
use sandpool_protocol::{DecodeError, Direction, HEADER_LEN, Kind, SPEC_ENV, SandboxSpec};
use sandpool_reference_helper::reference::{OP_ECHO, request};
use sandpool_tests::{config, deadline, helper_bin, process_exists};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Upper bound on what one call may allocate on the host, whatever the frame
/// claims: the error's text, the stderr tail, small bookkeeping.
const CALL_ALLOCATION_BOUND: usize = 512 * 1024;

#[test]
fn corpus_through_the_host_and_through_the_helper() {
    host_side();
    helper_side();
}

fn host_side() {
    let mut tried = 0;
    for case in corpus::cases()
        .into_iter()
        .filter(|c| c.direction == Direction::HelperToHost)
    {
        let arg = format!("corpus:{}", case.name);
        let helper = Launcher::new(config(&["--misbehave", &arg]))
            .unwrap()
            .launch()
            .unwrap();
        let pid = helper.pid();
        let region = Region::new(GLOBAL);
        let result = helper.call(&request(OP_ECHO, b"x"), deadline(0.5));
        let allocated = region.change().bytes_allocated;
        assert!(
            allocated < CALL_ALLOCATION_BOUND,
            "{}: the host allocated {allocated} bytes for one call",
            case.name
        );
        match (&case.expect, result) {
            (Expect::Error(DecodeError::Truncated { .. }), Err(CallError::Timeout { .. })) => {}
            (
                Expect::Error(expected),
                Err(CallError::Protocol {
                    violation: ProtocolViolation::Frame(got),
                    ..
                }),
            ) => {
                assert_eq!(&got, expected, "{}", case.name)
            }
            (
                Expect::Frame {
                    kind: Kind::Response,
                    id: 1,
                    len,
                },
                Ok(reply),
            ) => assert_eq!(reply.len(), *len),
            (
                Expect::Frame {
                    kind: Kind::Response | Kind::Error,
                    id,
                    ..
                },
                Err(CallError::Protocol { violation, .. }),
            ) => {
                assert!(
                    matches!(violation, ProtocolViolation::UnexpectedId { got, .. } if got == *id),
                    "{}: {violation:?}",
                    case.name
                )
            }
            (
                Expect::Frame {
                    kind: Kind::Hello, ..
                },
                Err(CallError::Protocol { violation, .. }),
            ) => {
                assert_eq!(violation, ProtocolViolation::SecondHello, "{}", case.name)
            }
            (expect, got) => panic!("{}: expected {expect:?}, got {got:?}", case.name),
        }
        if !matches!(
            case.expect,
            Expect::Frame {
                kind: Kind::Response,
                id: 1,
                ..
            }
        ) {
            assert!(helper.is_retired(), "{}: helper retired", case.name);
            assert!(!process_exists(pid), "{}: helper reaped", case.name);
        }
        tried += 1;
    }
    assert!(tried >= 10, "only {tried} host-side cases");
}

fn helper_side() {
    let spec = SandboxSpec::default().encode();
    let mut tried = 0;
    for case in corpus::cases()
        .into_iter()
        .filter(|c| c.direction == Direction::HostToHelper)
    {
        let mut child = Command::new(helper_bin())
            .env_clear()
            .env(SPEC_ENV, &spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut hello_header = [0u8; HEADER_LEN];
        stdout.read_exact(&mut hello_header).unwrap();
        assert_eq!(hello_header[3], Kind::Hello as u8);
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&case.bytes).unwrap();
        drop(stdin);
        let mut rest = Vec::new();
        stdout.read_to_end(&mut rest).unwrap();
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let code = output.status.code();
        match &case.expect {
            Expect::Frame {
                kind: Kind::Request,
                id,
                ..
            } => {
                assert_eq!(code, Some(0), "{}: {stderr}", case.name);
                let (header, payload, _) = sandpool_protocol::decode_frame(
                    &rest[hello_payload_len(&hello_header)..],
                    1 << 20,
                    Direction::HelperToHost,
                )
                .unwrap();
                assert_eq!(
                    (header.kind, header.id, payload),
                    (Kind::Response, *id, &b"echo"[..]),
                    "{}",
                    case.name
                );
            }
            Expect::Frame { .. } => {
                assert_eq!(code, Some(0), "{}: {stderr}", case.name);
                assert_eq!(
                    rest.len(),
                    hello_payload_len(&hello_header),
                    "{}: no reply to Bind/Shutdown",
                    case.name
                );
            }
            Expect::Error(expected) => {
                assert_eq!(
                    code,
                    Some(sandpool_helper::EXIT_PROTOCOL_ERROR),
                    "{}: {stderr}",
                    case.name
                );
                let named = match expected {
                    DecodeError::Truncated { .. } => "mid-frame".to_owned(),
                    other => other.to_string(),
                };
                assert!(
                    stderr.contains(&named),
                    "{}: stderr {stderr:?} does not name {named:?}",
                    case.name
                );
            }
        }
        tried += 1;
    }
    assert!(tried >= 6, "only {tried} helper-side cases");
}

/// The Hello payload's length, from its header (it precedes everything else).
fn hello_payload_len(header: &[u8; HEADER_LEN]) -> usize {
    u32::from_le_bytes([header[12], header[13], header[14], header[15]]) as usize
}
