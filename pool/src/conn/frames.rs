//! Frame I/O on the host's non-blocking pipe ends: a resumable frame
//! reader (non-blocking for the reactor, or waiting under a deadline for the
//! launch's Hello and the inline path), and non-blocking vectored writes.
//! A helper that stops reading or writing never blocks a host thread.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, poll};
use sandpool_protocol::{DecodeError, Direction, HEADER_LEN, Header};

use crate::launch::process::poll_timeout;

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
pub(crate) fn wait_ready(
    fd: BorrowedFd<'_>,
    events: PollFlags,
    deadline: Instant,
) -> Result<(), IoFailure> {
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

/// Writes all of `bufs` to a non-blocking fd before `deadline`. A failure
/// comes with the number of bytes that were written before it.
#[cfg(test)]
pub(crate) fn write_all_vectored(
    fd: BorrowedFd<'_>,
    mut bufs: &mut [std::io::IoSlice<'_>],
    deadline: Instant,
) -> Result<(), (IoFailure, usize)> {
    let mut written = 0;
    while bufs.iter().any(|buf| !buf.is_empty()) {
        match write_now(fd, bufs) {
            Ok(0) => wait_ready(fd, PollFlags::POLLOUT, deadline)
                .map_err(|failure| (failure, written))?,
            Ok(n) => {
                written += n;
                std::io::IoSlice::advance_slices(&mut bufs, n);
            }
            Err(failure) => return Err((failure, written)),
        }
    }
    Ok(())
}

/// One non-blocking `writev` of `bufs`: the bytes written, 0 if the pipe is
/// full (EAGAIN). EPIPE (the helper closed its stdin) is `StdinClosed`.
pub(crate) fn write_now(
    fd: BorrowedFd<'_>,
    bufs: &[std::io::IoSlice<'_>],
) -> Result<usize, IoFailure> {
    loop {
        let written = match bufs {
            // One buffer: `write`, without the kernel's import of an iovec.
            [one] => nix::unistd::write(fd, one),
            _ => nix::sys::uio::writev(fd, bufs),
        };
        match written {
            Ok(n) => return Ok(n),
            Err(Errno::EAGAIN) => return Ok(0),
            Err(Errno::EINTR) => {}
            Err(Errno::EPIPE) => return Err(IoFailure::StdinClosed),
            Err(errno) => return Err(IoFailure::Os(errno)),
        }
    }
}

/// Size of the read-ahead buffer: one read can take several small frames.
const READ_AHEAD: usize = 64 * 1024;

/// One non-blocking `read`: `Ok(None)` when the pipe is empty (EAGAIN),
/// `Ok(Some(0))` at EOF.
fn read_now(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Option<usize>, IoFailure> {
    loop {
        match nix::unistd::read(fd, buf) {
            Ok(n) => return Ok(Some(n)),
            Err(Errno::EAGAIN) => return Ok(None),
            Err(Errno::EINTR) => {}
            Err(errno) => return Err(IoFailure::Os(errno)),
        }
    }
}

/// Reads frames from a helper's stdout, keeping bytes read ahead of the
/// current frame for the next one. Resumable: a frame whose bytes have not
/// all arrived stays inside the reader (header and the payload so far), so
/// whoever reads next (the reactor, or a caller on the inline path) goes on
/// from the same byte. Nothing of a frame is ever lost to a timeout.
#[derive(Debug)]
pub(crate) struct FrameReader {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    spin: Duration,
    /// A frame whose header has been taken and whose payload is still
    /// arriving.
    partial: Option<Partial>,
}

/// A frame in progress: its buffer is zeroed up to `payload.len()` (grown
/// by doubling as bytes arrive), of which the first `filled` bytes have
/// arrived. Each byte is zeroed once: truncating the buffer to what had
/// arrived after every read zeroed the doubled tail again at the next, which
/// made a large frame cost time in the square of its size (a 192 MiB reply
/// took minutes in a debug build).
#[derive(Debug)]
struct Partial {
    header: Header,
    payload: Vec<u8>,
    filled: usize,
}

impl FrameReader {
    /// A reader that, when it waits, spins for `spin` on an empty pipe
    /// before sleeping.
    pub(crate) fn new(spin: Duration) -> Self {
        FrameReader {
            buf: vec![0; READ_AHEAD].into_boxed_slice(),
            start: 0,
            end: 0,
            spin,
            partial: None,
        }
    }

    /// From now on, spins for `spin` on an empty pipe before sleeping.
    pub(crate) fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    /// Whether bytes beyond the last complete frame have already arrived
    /// (part of a header, or a frame in progress).
    pub(crate) fn has_buffered(&self) -> bool {
        self.end > self.start || self.partial.is_some()
    }

    /// Reads what the pipe has now and returns the next frame if it is
    /// complete; `Ok(None)` if the pipe ran dry first (what has arrived is
    /// kept). The header is validated (against `max_frame` and the
    /// direction) before the payload buffer is allocated, and that buffer is
    /// sized by the bytes that have arrived, not by the length claimed: a
    /// helper that claims `max_frame` and sends one byte costs one
    /// read-ahead chunk.
    pub(crate) fn poll_frame(
        &mut self,
        fd: BorrowedFd<'_>,
        max_frame: u32,
    ) -> Result<Option<(Header, Vec<u8>)>, IoFailure> {
        if self.partial.is_none() {
            while self.end - self.start < HEADER_LEN {
                if self.start > 0 {
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                }
                match read_now(fd, &mut self.buf[self.end..])? {
                    None => return Ok(None),
                    Some(0) => return Err(IoFailure::StdoutClosed),
                    Some(n) => self.end += n,
                }
            }
            let mut head = [0u8; HEADER_LEN];
            head.copy_from_slice(&self.buf[self.start..self.start + HEADER_LEN]);
            // On a bad header nothing is consumed: whoever reads next sees
            // the same bytes and the same error.
            let header = Header::decode(&head, max_frame, Direction::HelperToHost)
                .map_err(IoFailure::Decode)?;
            self.start += HEADER_LEN;
            let len = header.len as usize;
            let buffered = (self.end - self.start).min(len);
            let mut payload = Vec::with_capacity(buffered.max(len.min(READ_AHEAD)));
            payload.extend_from_slice(&self.buf[self.start..self.start + buffered]);
            self.start += buffered;
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            }
            self.partial = Some(Partial {
                header,
                payload,
                filled: buffered,
            });
        }
        let Some(partial) = self.partial.as_mut() else {
            return Ok(None);
        };
        let len = partial.header.len as usize;
        while partial.filled < len {
            if partial.filled == partial.payload.len() {
                // Grow at most by doubling (and by one chunk at least).
                let grow = (len - partial.filled).min(partial.filled.max(READ_AHEAD));
                partial.payload.resize(partial.filled + grow, 0);
            }
            // Straight into the frame's buffer: no second copy.
            match read_now(fd, &mut partial.payload[partial.filled..])? {
                None => return Ok(None),
                Some(0) => return Err(IoFailure::StdoutClosed),
                Some(n) => partial.filled += n,
            }
        }
        Ok(self.partial.take().map(
            |Partial {
                 header, payload, ..
             }| (header, payload),
        ))
    }

    /// Reads one frame, waiting until `deadline`: on an empty pipe it first
    /// retries for `spin`, yielding the CPU in between, then sleeps in
    /// `poll`. A reply that comes within microseconds is so picked up
    /// without a sleep and a cross-CPU wake-up, which on this kind of
    /// machine cost more than the round trip itself. On a timeout what has
    /// arrived stays in the reader.
    pub(crate) fn read_frame(
        &mut self,
        fd: impl AsFd,
        deadline: Instant,
        max_frame: u32,
    ) -> Result<(Header, Vec<u8>), IoFailure> {
        let fd = fd.as_fd();
        let mut spin_until = None;
        loop {
            if let Some(frame) = self.poll_frame(fd, max_frame)? {
                return Ok(frame);
            }
            // Read on the first EAGAIN: a reply already there costs no
            // clock read.
            let now = Instant::now();
            if !self.spin.is_zero() && now < *spin_until.get_or_insert(now + self.spin) {
                std::thread::yield_now();
                continue;
            }
            wait_ready(fd, PollFlags::POLLIN, deadline)?;
        }
    }
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
