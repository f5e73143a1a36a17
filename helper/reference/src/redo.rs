//! The page-redo workload: the shape of WAL redo in a page server.
//!
//! A request carries an 8 KiB base page followed by redo records, each a
//! little-endian `u16` offset, a `u16` length and that many bytes to write at
//! the offset. The response is the page with every record applied in order.

use thiserror::Error;

/// The page size.
pub const PAGE_SIZE: usize = 8192;
/// The size of a record's header (offset and length).
pub const RECORD_HEADER: usize = 4;

/// A redo request could not be applied.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum RedoError {
    /// The request is shorter than a page.
    #[error("redo request of {0} bytes is shorter than the {PAGE_SIZE}-byte base page")]
    NoBasePage(usize),
    /// A record's header or body runs past the end of the request.
    #[error("redo record at byte {at} is truncated")]
    TruncatedRecord {
        /// Where the record starts in the request.
        at: usize,
    },
    /// A record writes outside the page.
    #[error("redo record at byte {at} writes {len} bytes at offset {offset}, past the page end")]
    OutOfPage {
        /// Where the record starts in the request.
        at: usize,
        /// Its offset.
        offset: usize,
        /// Its length.
        len: usize,
    },
}

/// Applies the records in `request` to its base page, appending the page to `out`.
pub fn apply(request: &[u8], out: &mut Vec<u8>) -> Result<(), RedoError> {
    let (page, mut records) = request
        .split_at_checked(PAGE_SIZE)
        .ok_or(RedoError::NoBasePage(request.len()))?;
    let start = out.len();
    out.extend_from_slice(page);
    let mut at = PAGE_SIZE;
    while !records.is_empty() {
        let (head, rest) = records
            .split_at_checked(RECORD_HEADER)
            .ok_or(RedoError::TruncatedRecord { at })?;
        let offset = usize::from(u16::from_le_bytes([head[0], head[1]]));
        let len = usize::from(u16::from_le_bytes([head[2], head[3]]));
        let (body, rest) = rest
            .split_at_checked(len)
            .ok_or(RedoError::TruncatedRecord { at })?;
        if offset + len > PAGE_SIZE {
            out.truncate(start);
            return Err(RedoError::OutOfPage { at, offset, len });
        }
        out[start + offset..start + offset + len].copy_from_slice(body);
        records = rest;
        at += RECORD_HEADER + len;
    }
    Ok(())
}

/// Appends one record to a request under construction.
pub fn push_record(request: &mut Vec<u8>, offset: u16, body: &[u8]) {
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    request.extend_from_slice(&offset.to_le_bytes());
    request.extend_from_slice(&len.to_le_bytes());
    request.extend_from_slice(&body[..usize::from(len)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_records_in_order() {
        let mut request = vec![0u8; PAGE_SIZE];
        push_record(&mut request, 10, b"abc");
        push_record(&mut request, 11, b"Z");
        let mut out = Vec::new();
        apply(&request, &mut out).expect("valid");
        assert_eq!(out.len(), PAGE_SIZE);
        assert_eq!(&out[9..14], b"\0aZc\0");
    }

    #[test]
    fn rejects_bad_requests_without_output() {
        let mut out = Vec::new();
        assert_eq!(apply(&[0; 10], &mut out), Err(RedoError::NoBasePage(10)));
        let mut request = vec![0u8; PAGE_SIZE];
        push_record(&mut request, 8190, b"abc");
        assert!(matches!(
            apply(&request, &mut out),
            Err(RedoError::OutOfPage { .. })
        ));
        assert!(out.is_empty());
        let mut request = vec![0u8; PAGE_SIZE];
        request.extend_from_slice(&[1, 0, 9]);
        assert_eq!(
            apply(&request, &mut out),
            Err(RedoError::TruncatedRecord { at: PAGE_SIZE })
        );
    }
}
