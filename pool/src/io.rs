//! Frame I/O on the host's non-blocking pipe ends, every operation under a
//! deadline. A helper that stops reading or writing costs the host one
//! bounded wait, never a blocked thread.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, poll};
use sandpool_protocol::{DecodeError, Direction, HEADER_LEN, Header};

use crate::process::poll_timeout;

/// Why a frame could not be read or written.
#[derive(Debug)]
pub(crate) enum IoFailure {
    /// The deadline passed.
    Timeout,
    /// EOF on the helper's stdout.
    StdoutClosed,
    /// EPIPE writing the helper's stdin: it closed its end.
    StdinClosed,
    /// The bytes are not a valid frame.
    Decode(DecodeError),
    /// Any other OS error.
    Os(Errno),
}

/// Waits until `fd` is ready for `events` or the deadline passes.
fn wait_ready(fd: BorrowedFd<'_>, events: PollFlags, deadline: Instant) -> Result<(), IoFailure> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(IoFailure::Timeout);
        }
        let mut fds = [PollFd::new(fd, events)];
        match poll(&mut fds, poll_timeout(left)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => return Ok(()),
            Err(errno) => return Err(IoFailure::Os(errno)),
        }
    }
}

/// Writes all of `bytes` to a non-blocking fd before `deadline`.
#[cfg(test)]
pub(crate) fn write_all(
    fd: BorrowedFd<'_>,
    bytes: &[u8],
    deadline: Instant,
) -> Result<(), IoFailure> {
    write_all_vectored(fd, &mut [std::io::IoSlice::new(bytes)], deadline).map_err(|(f, _)| f)
}

/// Writes all of `bufs` (e.g. a frame's header and its payload, with no copy
/// into one buffer) to a non-blocking fd before `deadline`. A failure comes
/// with the number of bytes that were written before it.
pub(crate) fn write_all_vectored(
    fd: BorrowedFd<'_>,
    mut bufs: &mut [std::io::IoSlice<'_>],
    deadline: Instant,
) -> Result<(), (IoFailure, usize)> {
    let mut written = 0;
    while !bufs.is_empty() {
        match nix::sys::uio::writev(fd, bufs) {
            Ok(n) => {
                written += n;
                std::io::IoSlice::advance_slices(&mut bufs, n);
            }
            Err(Errno::EAGAIN) => wait_ready(fd, PollFlags::POLLOUT, deadline)
                .map_err(|failure| (failure, written))?,
            Err(Errno::EINTR) => {}
            Err(Errno::EPIPE) => return Err((IoFailure::StdinClosed, written)),
            Err(errno) => return Err((IoFailure::Os(errno), written)),
        }
    }
    Ok(())
}

/// Reads one `read` worth of bytes into `buf`, waiting up to the deadline.
/// Returns 0 at EOF.
///
/// For the first `spin` of an empty pipe it retries the read, yielding the
/// CPU in between, before it sleeps in `poll`: a reply that comes within
/// microseconds is then picked up without a sleep and a cross-CPU wake-up,
/// which on this kind of machine cost more than the round trip itself.
fn read_some(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    deadline: Instant,
    spin: Duration,
) -> Result<usize, IoFailure> {
    // Read on the first EAGAIN: a reply already there costs no clock read.
    let mut spin_until = None;
    loop {
        match nix::unistd::read(fd, buf) {
            Ok(n) => return Ok(n),
            Err(Errno::EAGAIN)
                if !spin.is_zero() && {
                    let now = Instant::now();
                    now < *spin_until.get_or_insert(now + spin)
                } =>
            {
                std::thread::yield_now();
            }
            Err(Errno::EAGAIN) => wait_ready(fd, PollFlags::POLLIN, deadline)?,
            Err(Errno::EINTR) => {}
            Err(errno) => return Err(IoFailure::Os(errno)),
        }
    }
}

/// Size of the read-ahead buffer: one read can take several small frames.
const READ_AHEAD: usize = 64 * 1024;

/// Reads frames from a helper's stdout, keeping bytes read ahead of the
/// current frame for the next one.
#[derive(Debug)]
pub(crate) struct FrameReader {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    spin: Duration,
    /// A frame's header has been taken and its payload is being read: a
    /// failure now leaves the stream in the middle of a frame.
    in_payload: bool,
}

impl FrameReader {
    /// A reader that spins for `spin` on an empty pipe before sleeping.
    pub(crate) fn new(spin: Duration) -> Self {
        FrameReader {
            buf: vec![0; READ_AHEAD].into_boxed_slice(),
            start: 0,
            end: 0,
            spin,
            in_payload: false,
        }
    }

    /// Whether the last read stopped between frames (bytes of a header may
    /// be buffered; none of a payload was lost), so reading can resume.
    pub(crate) fn at_frame_boundary(&self) -> bool {
        !self.in_payload
    }

    /// Whether bytes beyond the last frame have already arrived.
    pub(crate) fn has_buffered(&self) -> bool {
        self.end > self.start
    }

    /// Reads one frame. The header is validated (against `max_frame` and the
    /// direction) before the payload buffer is allocated, so the payload
    /// allocation is bounded by `max_frame`, never by what the helper claims.
    pub(crate) fn read_frame(
        &mut self,
        fd: impl AsFd,
        deadline: Instant,
        max_frame: u32,
    ) -> Result<(Header, Vec<u8>), IoFailure> {
        self.read_frame_until(fd, deadline, deadline, max_frame)
    }

    /// [`read_frame`](Self::read_frame) waiting for a header until
    /// `header_deadline` and, once a frame has begun, for the rest of it
    /// until `payload_deadline`.
    pub(crate) fn read_frame_until(
        &mut self,
        fd: impl AsFd,
        header_deadline: Instant,
        payload_deadline: Instant,
        max_frame: u32,
    ) -> Result<(Header, Vec<u8>), IoFailure> {
        let fd = fd.as_fd();
        let deadline = header_deadline;
        while self.end - self.start < HEADER_LEN {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = read_some(fd, &mut self.buf[self.end..], deadline, self.spin)?;
            if n == 0 {
                return Err(IoFailure::StdoutClosed);
            }
            self.end += n;
        }
        let mut head = [0u8; HEADER_LEN];
        head.copy_from_slice(&self.buf[self.start..self.start + HEADER_LEN]);
        let header =
            Header::decode(&head, max_frame, Direction::HelperToHost).map_err(IoFailure::Decode)?;
        self.start += HEADER_LEN;
        self.in_payload = true;
        let len = header.len as usize;
        let buffered = (self.end - self.start).min(len);
        // Sized by what has arrived, not by what the header claims: a helper
        // that claims max_frame and sends one byte costs one read-ahead chunk.
        let mut payload = Vec::with_capacity(buffered.max(len.min(READ_AHEAD)));
        payload.extend_from_slice(&self.buf[self.start..self.start + buffered]);
        self.start += buffered;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        while payload.len() < len {
            // Grow at most by doubling (and by one chunk at least), and read
            // straight into the caller's buffer: no second copy.
            let filled = payload.len();
            let grow = (len - filled).min(filled.max(READ_AHEAD));
            payload.resize(filled + grow, 0);
            let n = read_some(fd, &mut payload[filled..], payload_deadline, self.spin)?;
            payload.truncate(filled + n);
            if n == 0 {
                return Err(IoFailure::StdoutClosed);
            }
        }
        self.in_payload = false;
        Ok((header, payload))
    }
}

/// Whether `fd` is readable (or hung up) right now, without waiting.
pub(crate) fn readable_now(fd: impl AsFd) -> bool {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Reads whatever a non-blocking fd has right now, up to `cap` bytes, keeping
/// the last `keep` bytes. Used for a helper's stderr when it fails.
pub(crate) fn drain_tail(fd: impl AsFd, cap: usize, keep: usize) -> Vec<u8> {
    let mut tail: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut total = 0;
    while total < cap {
        match nix::unistd::read(fd.as_fd(), &mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n;
                tail.extend_from_slice(&chunk[..n]);
                if tail.len() > keep {
                    tail.drain(..tail.len() - keep);
                }
            }
        }
    }
    tail
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use nix::fcntl::OFlag;
    use proptest::prelude::*;
    use sandpool_protocol::{Direction, Kind, decode_frame, encode_frame};

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The host's reader, fed through a real pipe in pieces cut at
        /// arbitrary points by a writer thread, returns exactly the frames
        /// that were sent, whatever the cuts.
        #[test]
        fn frame_reader_reassembles_split_streams(
            frames in proptest::collection::vec((any::<u64>(), proptest::collection::vec(any::<u8>(), 0..3000)), 1..6),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut stream = Vec::new();
            for (id, payload) in &frames {
                encode_frame(Kind::Response, *id, payload, 1 << 20, &mut stream).unwrap();
            }
            let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).unwrap();
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
            points.push(stream.len());
            points.sort_unstable();
            let writer = {
                let stream = stream.clone();
                std::thread::spawn(move || {
                    let mut at = 0;
                    for point in points {
                        let deadline = Instant::now() + Duration::from_secs(5);
                        write_all(write_end.as_fd(), &stream[at..point], deadline).unwrap();
                        at = point;
                        std::thread::yield_now();
                    }
                })
            };
            let mut reader = FrameReader::new(Duration::ZERO);
            for (id, payload) in &frames {
                let deadline = Instant::now() + Duration::from_secs(5);
                let (header, got) = reader.read_frame(&read_end, deadline, 1 << 20).unwrap();
                prop_assert_eq!(header.id, *id);
                prop_assert_eq!(&got, payload);
            }
            writer.join().unwrap();
            prop_assert!(!reader.has_buffered());
            // And the whole stream decodes the same way in one piece.
            prop_assert!(decode_frame(&stream, 1 << 20, Direction::HelperToHost).is_ok());
        }
    }
}
