//! References into the shared memory region.
//!
//! A helper may be given a memfd region at launch (`region` in the
//! [`crate::SandboxSpec`]). Its first half carries large requests, its
//! second half large responses. A `RequestInRegion` frame carries a
//! [`RegionRequest`]: where the request's bytes are, and the window of the
//! response half its reply may use. The host hands out disjoint windows, so
//! several requests can be in flight through the region at once. A
//! `ResponseInRegion` frame carries a [`RegionRef`] (offset and length,
//! little-endian `u64`s) inside that window. Whoever receives a reference
//! checks it against where it must lie before touching the memory, and
//! copies the bytes out before interpreting them: the other side can change
//! them at any moment.

use thiserror::Error;

/// Size of an encoded [`RegionRef`].
pub const REGION_REF_LEN: usize = 16;

/// `len` bytes at `offset` in the shared region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionRef {
    /// Offset from the start of the region.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A region reference that does not lie where it must.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum RegionError {
    /// The payload is not [`REGION_REF_LEN`] bytes ([`REGION_REQUEST_LEN`]
    /// for a [`RegionRequest`]).
    #[error(
        "region reference of {0} bytes (expected {REGION_REF_LEN}, or {REGION_REQUEST_LEN} for a request)"
    )]
    BadLength(usize),
    /// The range leaves the window it must lie in (the half of the region,
    /// or the one slot the host granted the request).
    #[error("region range {offset}+{len} is outside {start}..{end}")]
    OutOfBounds {
        /// Offset given.
        offset: u64,
        /// Length given.
        len: u64,
        /// Start of the allowed half.
        start: u64,
        /// End of the allowed half.
        end: u64,
    },
}

impl RegionRef {
    /// Encodes the reference.
    pub fn encode(&self) -> [u8; REGION_REF_LEN] {
        let mut out = [0u8; REGION_REF_LEN];
        out[..8].copy_from_slice(&self.offset.to_le_bytes());
        out[8..].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Decodes a reference and checks that it lies within `start..end`.
    pub fn decode(bytes: &[u8], start: u64, end: u64) -> Result<RegionRef, RegionError> {
        let bytes: &[u8; REGION_REF_LEN] = bytes
            .try_into()
            .map_err(|_| RegionError::BadLength(bytes.len()))?;
        let mut offset = [0u8; 8];
        let mut len = [0u8; 8];
        offset.copy_from_slice(&bytes[..8]);
        len.copy_from_slice(&bytes[8..]);
        let (offset, len) = (u64::from_le_bytes(offset), u64::from_le_bytes(len));
        let inside = offset >= start && offset.checked_add(len).is_some_and(|stop| stop <= end);
        if !inside {
            return Err(RegionError::OutOfBounds {
                offset,
                len,
                start,
                end,
            });
        }
        Ok(RegionRef { offset, len })
    }
}

/// Size of an encoded [`RegionRequest`].
pub const REGION_REQUEST_LEN: usize = 2 * REGION_REF_LEN;

/// The payload of a `RequestInRegion` frame: the request's bytes, and the
/// window its reply may be written to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionRequest {
    /// The request's bytes, in the request half.
    pub request: RegionRef,
    /// Where the reply may go, in the response half: offset and capacity.
    pub reply: RegionRef,
}

impl RegionRequest {
    /// Encodes the request reference followed by the reply window.
    pub fn encode(&self) -> [u8; REGION_REQUEST_LEN] {
        let mut out = [0u8; REGION_REQUEST_LEN];
        out[..REGION_REF_LEN].copy_from_slice(&self.request.encode());
        out[REGION_REF_LEN..].copy_from_slice(&self.reply.encode());
        out
    }

    /// Decodes both references and checks each against its half of a
    /// region of `size` bytes.
    pub fn decode(bytes: &[u8], size: u64) -> Result<RegionRequest, RegionError> {
        if bytes.len() != REGION_REQUEST_LEN {
            return Err(RegionError::BadLength(bytes.len()));
        }
        let (request, reply) = bytes.split_at(REGION_REF_LEN);
        let (start, end) = request_half(size);
        let request = RegionRef::decode(request, start, end)?;
        let (start, end) = response_half(size);
        let reply = RegionRef::decode(reply, start, end)?;
        Ok(RegionRequest { request, reply })
    }
}

/// The request half of a region of `size` bytes.
pub fn request_half(size: u64) -> (u64, u64) {
    (0, size / 2)
}

/// The response half of a region of `size` bytes.
pub fn response_half(size: u64) -> (u64, u64) {
    (size / 2, size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_round_trip_and_are_bounded() {
        let r = RegionRef {
            offset: 100,
            len: 50,
        };
        assert_eq!(RegionRef::decode(&r.encode(), 0, 150), Ok(r));
        assert!(matches!(
            RegionRef::decode(&r.encode(), 0, 149),
            Err(RegionError::OutOfBounds { .. })
        ));
        assert!(matches!(
            RegionRef::decode(&r.encode(), 101, 1000),
            Err(RegionError::OutOfBounds { .. })
        ));
        let overflow = RegionRef {
            offset: u64::MAX,
            len: 2,
        };
        assert!(matches!(
            RegionRef::decode(&overflow.encode(), 0, u64::MAX),
            Err(RegionError::OutOfBounds { .. })
        ));
        assert_eq!(
            RegionRef::decode(&[0; 3], 0, 10),
            Err(RegionError::BadLength(3))
        );
    }

    #[test]
    fn region_requests_keep_each_reference_in_its_half() {
        let size = 1 << 20;
        let good = RegionRequest {
            request: RegionRef {
                offset: 4096,
                len: 100,
            },
            reply: RegionRef {
                offset: size / 2 + 4096,
                len: 4096,
            },
        };
        assert_eq!(RegionRequest::decode(&good.encode(), size), Ok(good));
        // A reply window in the request half, or a request in the response
        // half, is refused.
        for bad in [
            RegionRequest {
                reply: good.request,
                ..good
            },
            RegionRequest {
                request: good.reply,
                ..good
            },
        ] {
            assert!(matches!(
                RegionRequest::decode(&bad.encode(), size),
                Err(RegionError::OutOfBounds { .. })
            ));
        }
        assert_eq!(
            RegionRequest::decode(&good.encode()[..16], size),
            Err(RegionError::BadLength(16))
        );
    }
}
