//! The frame header and whole-frame encoding and decoding.
//!
//! Every message on the wire is one frame: a fixed 16-byte little-endian header
//! followed by `len` payload bytes.
//!
//! ```text
//! offset  size  field
//!      0     2  magic, b"SP"
//!      2     1  protocol version (VERSION)
//!      3     1  kind (Kind)
//!      4     8  request id (u64 LE), chosen by the host, opaque to the
//!                 helper; 0 for Hello, Bind and Shutdown
//!     12     4  payload length (u32 LE), bounded by the receiver's max frame
//! ```
//!
//! The header is decoded and its length checked against the receiver's limit
//! *before* any payload buffer is sized, so a peer that claims a 4 GiB frame
//! costs the receiver nothing.

use thiserror::Error;

/// The two bytes every frame starts with.
pub const MAGIC: [u8; 2] = *b"SP";
/// The protocol version this crate speaks. A peer with another version is refused.
pub const VERSION: u8 = 2;
/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 16;
/// Default bound on a frame's payload (1 MiB): a page-redo request with its
/// records and an 8 KiB page fit many times over.
pub const DEFAULT_MAX_FRAME: u32 = 1 << 20;
/// The largest `max_frame` a configuration may choose (256 MiB). Larger
/// payloads belong in a shared memory region, not in a pipe.
pub const MAX_FRAME_CEILING: u32 = 256 << 20;
/// The smallest `max_frame` a configuration may choose: every Hello without
/// kept fds, every Bind and every truncated Error message must fit. (A Hello
/// that declares kept fds must fit the configured limit too.)
pub const MIN_FRAME_LIMIT: u32 = 512;

/// Which way a frame travels. Each [`Kind`] is legal in one direction only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Sent by the host, read by the helper.
    HostToHelper,
    /// Sent by the helper, read by the host.
    HelperToHost,
}

/// The kind of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Helper -> host, once, first: proof of the startup sequence ([`crate::Hello`]).
    Hello = 1,
    /// Host -> helper, at most once: binds a spare helper to a tenant ([`crate::decode_bind`]).
    Bind = 2,
    /// Host -> helper: one request; its id is echoed by the reply.
    Request = 3,
    /// Helper -> host: the successful reply to the request with the same id.
    Response = 4,
    /// Helper -> host: the handler failed for the request with the same id;
    /// the payload is a UTF-8 message of at most [`MAX_ERROR_MESSAGE`] bytes.
    Error = 5,
    /// Host -> helper: finish and exit cleanly. Empty payload.
    Shutdown = 6,
    /// Host -> helper: a request whose bytes are in the shared region; the
    /// payload is a [`crate::RegionRequest`]: the request's place in the
    /// request half, and the window of the response half granted to its
    /// reply.
    RequestInRegion = 7,
    /// Helper -> host: the reply to a [`Kind::RequestInRegion`], its bytes in
    /// the window of the response half that request granted; the payload is
    /// a [`crate::RegionRef`].
    ResponseInRegion = 8,
}

/// The longest helper-side error message a host accepts, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 4096;

impl Kind {
    /// Decodes a kind byte.
    pub fn from_u8(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Hello,
            2 => Kind::Bind,
            3 => Kind::Request,
            4 => Kind::Response,
            5 => Kind::Error,
            6 => Kind::Shutdown,
            7 => Kind::RequestInRegion,
            8 => Kind::ResponseInRegion,
            _ => return None,
        })
    }

    /// The direction this kind may travel in.
    pub fn direction(self) -> Direction {
        match self {
            Kind::Bind | Kind::Request | Kind::Shutdown | Kind::RequestInRegion => {
                Direction::HostToHelper
            }
            Kind::Hello | Kind::Response | Kind::Error | Kind::ResponseInRegion => {
                Direction::HelperToHost
            }
        }
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the payload is.
    pub kind: Kind,
    /// The request id: of a Request or RequestInRegion, or the one a
    /// Response, ResponseInRegion or Error answers; 0 for Hello, Bind and
    /// Shutdown.
    pub id: u64,
    /// Payload length in bytes.
    pub len: u32,
}

/// Why a frame could not be decoded. Every variant names what was wrong.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Fewer bytes than the header or the declared payload needs.
    #[error("truncated frame: needed {needed} bytes, got {got}")]
    Truncated {
        /// Bytes needed to complete the frame.
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// The frame does not start with [`MAGIC`]: the peer is not speaking this protocol.
    #[error("bad magic {found:02x?}: not a sandpool frame")]
    BadMagic {
        /// The two bytes found instead.
        found: [u8; 2],
    },
    /// The peer speaks another protocol version.
    #[error("protocol version {found} not supported (this side speaks {VERSION})")]
    BadVersion {
        /// The version byte found.
        found: u8,
    },
    /// The kind byte names no known frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A known kind sent in the wrong direction (e.g. a helper sending a Request).
    #[error("frame kind {kind:?} may not be sent {direction:?}")]
    WrongDirection {
        /// The kind received.
        kind: Kind,
        /// The direction it arrived in.
        direction: Direction,
    },
    /// The declared payload is larger than the receiver allows.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// Declared payload length.
        len: u32,
        /// The receiver's limit.
        max: u32,
    },
    /// A kind whose header must carry id 0 (Hello, Bind, Shutdown) carried another.
    #[error("frame kind {kind:?} must carry request id 0, got {id}")]
    UnexpectedId {
        /// The kind received.
        kind: Kind,
        /// The id it carried.
        id: u64,
    },
    /// A kind with a fixed payload carried another: Shutdown any payload,
    /// RequestInRegion other than 32 bytes, ResponseInRegion other than 16.
    #[error("frame kind {kind:?} must be empty, got {len} bytes")]
    UnexpectedPayload {
        /// The kind received.
        kind: Kind,
        /// Its payload length.
        len: u32,
    },
}

/// Why a frame could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The payload is larger than the sender's own limit.
    #[error("payload of {len} bytes exceeds the frame limit of {max} bytes")]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
        /// The limit.
        max: u32,
    },
}

impl Header {
    /// Encodes the header into its 16 wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..2].copy_from_slice(&MAGIC);
        out[2] = VERSION;
        out[3] = self.kind as u8;
        out[4..12].copy_from_slice(&self.id.to_le_bytes());
        out[12..16].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Decodes and validates a header received in `direction`, refusing any
    /// payload longer than `max_frame` before the caller allocates for it.
    pub fn decode(
        bytes: &[u8; HEADER_LEN],
        max_frame: u32,
        direction: Direction,
    ) -> Result<Header, DecodeError> {
        let magic = [bytes[0], bytes[1]];
        if magic != MAGIC {
            return Err(DecodeError::BadMagic { found: magic });
        }
        if bytes[2] != VERSION {
            return Err(DecodeError::BadVersion { found: bytes[2] });
        }
        let kind = Kind::from_u8(bytes[3]).ok_or(DecodeError::UnknownKind(bytes[3]))?;
        if kind.direction() != direction {
            return Err(DecodeError::WrongDirection { kind, direction });
        }
        let id = u64::from_le_bytes(le_array(&bytes[4..12]));
        let len = u32::from_le_bytes(le_array(&bytes[12..16]));
        if len > max_frame {
            return Err(DecodeError::Oversized {
                len,
                max: max_frame,
            });
        }
        match kind {
            Kind::Hello | Kind::Bind | Kind::Shutdown if id != 0 => {
                return Err(DecodeError::UnexpectedId { kind, id });
            }
            Kind::Shutdown if len != 0 => {
                return Err(DecodeError::UnexpectedPayload { kind, len });
            }
            Kind::RequestInRegion if len as usize != crate::REGION_REQUEST_LEN => {
                return Err(DecodeError::UnexpectedPayload { kind, len });
            }
            Kind::ResponseInRegion if len as usize != crate::REGION_REF_LEN => {
                return Err(DecodeError::UnexpectedPayload { kind, len });
            }
            _ => {}
        }
        // Kinds with a small payload of their own are bounded by it, not by
        // the (possibly much larger) frame limit.
        let own_max = match kind {
            Kind::Error => Some(MAX_ERROR_MESSAGE),
            Kind::Hello => Some(crate::hello::MAX_HELLO_LEN),
            Kind::Bind => Some(crate::hello::MAX_TENANT_LEN),
            _ => None,
        };
        if let Some(own_max) = own_max.filter(|own_max| len as usize > *own_max) {
            return Err(DecodeError::Oversized {
                len,
                max: own_max as u32,
            });
        }
        Ok(Header { kind, id, len })
    }
}

/// Copies an exactly-sized slice into an array. The callers slice constant
/// ranges of a fixed-size header, so the lengths always agree.
fn le_array<const N: usize>(slice: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(slice);
    out
}

/// Appends one whole frame (header and payload) to `out`.
///
/// Appending to a caller-owned buffer lets a sender reuse one allocation for
/// every frame and hand the kernel a single `write`.
pub fn encode_frame(
    kind: Kind,
    id: u64,
    payload: &[u8],
    max_frame: u32,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|len| *len <= max_frame)
        .ok_or(EncodeError::PayloadTooLarge {
            len: payload.len(),
            max: max_frame,
        })?;
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&Header { kind, id, len }.encode());
    out.extend_from_slice(payload);
    Ok(())
}

/// Frames up to this many bytes, header included, are best sent with one
/// `write` from a copy ([`SmallFrame`]): for a small frame, copying it is
/// cheaper than the kernel's import of an iovec array (a header and a
/// payload written with `writev`). Host and helper runtime both do so.
pub const SMALL_FRAME: usize = 512;

/// A frame of at most [`SMALL_FRAME`] bytes, its encoded header and payload
/// copied into one buffer (on the stack) for one `write`.
#[derive(Clone, Debug)]
pub struct SmallFrame {
    buf: [u8; SMALL_FRAME],
    len: usize,
}

impl SmallFrame {
    /// `head` and `payload` joined, if together they fit in
    /// [`SMALL_FRAME`] bytes; `None` for a larger frame.
    pub fn join(head: &[u8], payload: &[u8]) -> Option<SmallFrame> {
        let len = head.len() + payload.len();
        if len > SMALL_FRAME {
            return None;
        }
        let mut buf = [0u8; SMALL_FRAME];
        buf[..head.len()].copy_from_slice(head);
        buf[head.len()..len].copy_from_slice(payload);
        Some(SmallFrame { buf, len })
    }

    /// The frame's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Decodes the first whole frame in `bytes`, returning its header, its
/// payload and the number of bytes it occupied.
///
/// This is the reference decoder for a buffer that may hold a partial frame
/// (`Truncated` says how many bytes are needed) or several frames.
pub fn decode_frame(
    bytes: &[u8],
    max_frame: u32,
    direction: Direction,
) -> Result<(Header, &[u8], usize), DecodeError> {
    let head: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(DecodeError::Truncated {
            needed: HEADER_LEN,
            got: bytes.len(),
        })?;
    let header = Header::decode(head, max_frame, direction)?;
    let total = HEADER_LEN + header.len as usize;
    let payload = bytes.get(HEADER_LEN..total).ok_or(DecodeError::Truncated {
        needed: total,
        got: bytes.len(),
    })?;
    Ok((header, payload, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_frame_is_header_then_payload_up_to_its_bound() {
        let head = [1u8; HEADER_LEN];
        let fits = vec![2u8; SMALL_FRAME - HEADER_LEN];
        let frame = SmallFrame::join(&head, &fits).expect("fits exactly");
        assert_eq!(frame.bytes(), [&head[..], &fits[..]].concat());
        assert!(SmallFrame::join(&head, &[2u8; SMALL_FRAME - HEADER_LEN + 1]).is_none());
        assert_eq!(
            SmallFrame::join(&head, &[]).expect("empty payload").bytes(),
            head
        );
    }

    #[test]
    fn header_round_trips() {
        let header = Header {
            kind: Kind::Response,
            id: 0x0102_0304_0506_0708,
            len: 77,
        };
        let bytes = header.encode();
        assert_eq!(&bytes[..4], b"SP\x02\x04");
        assert_eq!(bytes[4], 0x08, "id is little-endian");
        let back = Header::decode(&bytes, 100, Direction::HelperToHost).expect("valid header");
        assert_eq!(back, header);
    }

    #[test]
    fn oversized_is_refused_before_payload_exists() {
        let bytes = Header {
            kind: Kind::Response,
            id: 1,
            len: u32::MAX,
        }
        .encode();
        // Only the header exists: the decoder must refuse on the length alone.
        assert_eq!(
            decode_frame(&bytes, DEFAULT_MAX_FRAME, Direction::HelperToHost),
            Err(DecodeError::Oversized {
                len: u32::MAX,
                max: DEFAULT_MAX_FRAME
            })
        );
    }

    #[test]
    fn encode_refuses_payload_over_limit() {
        let mut out = Vec::new();
        let err = encode_frame(Kind::Request, 1, &[0; 11], 10, &mut out);
        assert_eq!(err, Err(EncodeError::PayloadTooLarge { len: 11, max: 10 }));
        assert!(out.is_empty(), "nothing is written on error");
    }

    #[test]
    fn two_frames_in_one_buffer_decode_in_order() {
        let mut out = Vec::new();
        encode_frame(Kind::Response, 7, b"abc", 16, &mut out).expect("fits");
        encode_frame(Kind::Error, 8, b"no", 16, &mut out).expect("fits");
        let (h1, p1, used) = decode_frame(&out, 16, Direction::HelperToHost).expect("first");
        assert_eq!((h1.kind, h1.id, p1), (Kind::Response, 7, &b"abc"[..]));
        let (h2, p2, _) = decode_frame(&out[used..], 16, Direction::HelperToHost).expect("second");
        assert_eq!((h2.kind, h2.id, p2), (Kind::Error, 8, &b"no"[..]));
    }
}
