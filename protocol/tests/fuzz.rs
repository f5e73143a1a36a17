//! Property-based fuzzing of every decoder a peer's bytes reach, on stable
//! Rust. Each property runs `PROPTEST_CASES` cases (CI: the count below);
//! run longer with e.g.
//! `PROPTEST_CASES=1000000 cargo test --release -p sandpool-protocol --test fuzz`.
//!
//! Properties: no input panics; every failure is a typed error; a decoded
//! frame never claims more than the limit or more than the input holds; and
//! splitting a valid stream at arbitrary points and decoding incrementally
//! gives exactly the frames decoding it whole gives.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use sandpool_protocol::{
    DecodeError, Direction, HEADER_LEN, Hello, Kind, SandboxSpec, decode_bind, decode_frame,
    encode_frame,
};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(4096)
}

fn direction() -> impl Strategy<Value = Direction> {
    prop_oneof![Just(Direction::HelperToHost), Just(Direction::HostToHelper)]
}

/// Bytes that are often close to frames: a valid header prefix, mutated.
fn near_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u8>(),
        any::<u64>(),
        0u32..200,
        proptest::collection::vec(any::<u8>(), 0..256),
        any::<usize>(),
        any::<u8>(),
    )
        .prop_map(|(kind, id, len, payload, flip_at, flip)| {
            let mut bytes = b"SP".to_vec();
            bytes.push(sandpool_protocol::VERSION);
            bytes.push(kind % 8);
            bytes.extend_from_slice(&id.to_le_bytes());
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.extend_from_slice(&payload);
            if !bytes.is_empty() && flip % 3 == 0 {
                let at = flip_at % bytes.len();
                bytes[at] ^= flip;
            }
            bytes
        })
}

/// A decoded frame: kind, id, payload.
type Frame = (Kind, u64, Vec<u8>);

/// Decodes every frame in `bytes` in turn; stops at the first error.
fn decode_all(bytes: &[u8], max: u32, dir: Direction) -> (Vec<Frame>, Option<DecodeError>) {
    let mut frames = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match decode_frame(&bytes[at..], max, dir) {
            Ok((header, payload, used)) => {
                assert!(payload.len() <= max as usize);
                assert_eq!(used, HEADER_LEN + payload.len());
                frames.push((header.kind, header.id, payload.to_vec()));
                at += used;
            }
            Err(err) => return (frames, Some(err)),
        }
    }
    (frames, None)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), max in 0u32..1024, dir in direction()) {
        let _ = decode_all(&bytes, max, dir);
    }

    #[test]
    fn near_frames_decode_or_fail_typed(bytes in near_frame(), max in 0u32..300, dir in direction()) {
        match decode_frame(&bytes, max, dir) {
            Ok((header, payload, used)) => {
                prop_assert!(header.len <= max);
                prop_assert_eq!(payload.len(), header.len as usize);
                prop_assert!(used <= bytes.len());
                prop_assert_eq!(header.kind.direction(), dir);
            }
            Err(DecodeError::Truncated { needed, got }) => prop_assert!(needed > got),
            Err(DecodeError::Oversized { len, max: limit }) => prop_assert!(len > limit),
            Err(_) => {}
        }
    }

    #[test]
    fn payload_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = Hello::decode(&bytes);
        let _ = decode_bind(&bytes);
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = SandboxSpec::decode(text);
        }
    }

    #[test]
    fn spec_text_never_panics(text in "[a-z_=;,0-9]{0,80}") {
        if let Ok(spec) = SandboxSpec::decode(&text) {
            prop_assert_eq!(SandboxSpec::decode(&spec.encode()), Ok(spec));
        }
    }

    #[test]
    fn split_streams_decode_like_whole_streams(
        frames in proptest::collection::vec((0usize..3, any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64)), 1..8),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let kinds = [Kind::Response, Kind::Error, Kind::Response];
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for (k, id, payload) in &frames {
            encode_frame(kinds[*k], *id, payload, 1024, &mut stream).unwrap();
            expected.push((kinds[*k], *id, payload.clone()));
        }
        let (whole, err) = decode_all(&stream, 1024, Direction::HelperToHost);
        prop_assert!(err.is_none());
        prop_assert_eq!(&whole, &expected);
        // Feed the stream in pieces: a decoder that keeps what it has not
        // used yet must see the same frames, and only Truncated meanwhile.
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        points.push(stream.len());
        points.sort_unstable();
        let mut buffer = Vec::new();
        let mut got = Vec::new();
        let mut fed = 0;
        for point in points {
            buffer.extend_from_slice(&stream[fed..point]);
            fed = point;
            loop {
                match decode_frame(&buffer, 1024, Direction::HelperToHost) {
                    Ok((header, payload, used)) => {
                        got.push((header.kind, header.id, payload.to_vec()));
                        buffer.drain(..used);
                    }
                    Err(DecodeError::Truncated { .. }) => break,
                    Err(other) => prop_assert!(false, "a valid stream split gave {other:?}"),
                }
            }
        }
        prop_assert!(buffer.is_empty());
        prop_assert_eq!(got, expected);
    }
}
