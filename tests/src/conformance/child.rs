//! A helper spawned by the runner itself, behind its own pipes, as a host
//! would spawn it: environment cleared but for `SANDPOOL_SANDBOX`, fds 0, 1
//! and 2 pipes, and a few non-CLOEXEC fds leaked on purpose.
//!
//! Every wait has a deadline; the child is killed and reaped when this value
//! is dropped, whatever it did. Nothing the helper sends is trusted: frames
//! are decoded with the host's limit before anything is sized by them.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use sandpool_protocol::{DecodeError, Direction, HEADER_LEN, Header, Kind, decode_frame};

/// How many non-CLOEXEC fds the runner leaks into each spawn.
pub const LEAKED_FDS: usize = 4;

/// The most stderr kept (its end), for messages.
const STDERR_TAIL: usize = 2048;

/// Spawns are serialised: the leaked fds exist only while one is under way,
/// and no other spawn of the runner should pick them up by accident.
static SPAWN: Mutex<()> = Mutex::new(());

/// Opens [`LEAKED_FDS`] fds without CLOEXEC, kept while the result lives:
/// every child spawned meanwhile inherits them.
pub fn leak_fds() -> io::Result<Vec<OwnedFd>> {
    let devnull = std::fs::File::open("/dev/null")?;
    (0..LEAKED_FDS)
        .map(|_| nix::unistd::dup(&devnull).map_err(io::Error::from))
        .collect()
}

/// Runs `f` while fds are leaked, with no other spawn of the runner under way.
pub fn with_leaked_fds<R>(f: impl FnOnce() -> R) -> io::Result<R> {
    let _serial = SPAWN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let leaked = leak_fds()?;
    let out = f();
    drop(leaked);
    Ok(out)
}

/// One frame the helper sent.
#[derive(Debug)]
pub struct Frame {
    /// Its header.
    pub header: Header,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Why no frame could be read.
#[derive(Debug)]
pub enum ReadError {
    /// Nothing whole arrived by the deadline.
    Timeout {
        /// Bytes of a partial frame that did arrive.
        partial: usize,
    },
    /// stdout closed first.
    Eof {
        /// Bytes of a partial frame that did arrive.
        partial: usize,
    },
    /// What arrived is not a valid helper-to-host frame.
    Bad(DecodeError),
    /// Reading the pipe failed.
    Io(io::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Timeout { partial: 0 } => write!(f, "no frame before the deadline"),
            ReadError::Timeout { partial } => {
                write!(f, "only {partial} bytes of a frame before the deadline")
            }
            ReadError::Eof { partial: 0 } => write!(f, "stdout closed before a frame"),
            ReadError::Eof { partial } => {
                write!(f, "stdout closed after {partial} bytes of a frame")
            }
            ReadError::Bad(err) => write!(f, "invalid frame: {err}"),
            ReadError::Io(err) => write!(f, "reading stdout failed: {err}"),
        }
    }
}

/// A helper behind the runner's own pipes.
#[derive(Debug)]
pub struct Spawned {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    stderr: ChildStderr,
    /// Bytes from stdout not yet taken as frames.
    out: Vec<u8>,
    out_eof: bool,
    err_tail: Vec<u8>,
    err_eof: bool,
    status: Option<ExitStatus>,
    max_frame: u32,
}

impl Spawned {
    /// Spawns `program args` with `SANDPOOL_SANDBOX=spec` and nothing else in
    /// its environment, fds 0, 1, 2 pipes (stdin non-blocking on this side),
    /// and [`LEAKED_FDS`] leaked fds.
    pub fn spawn(program: &Path, args: &[String], spec: &str, max_frame: u32) -> io::Result<Self> {
        // std's Command, not sandpool's launcher: this is the runner's own,
        // independent spawn with its own pipes, which is the point (the
        // sandpool launch is checked separately). No uid, gid or pre_exec
        // is set, so std uses posix_spawn or fork+exec with nothing run in
        // between.
        #[allow(clippy::disallowed_methods)]
        let mut child = with_leaked_fds(|| {
            std::process::Command::new(program)
                .args(args)
                .env_clear()
                .env(sandpool_protocol::SPEC_ENV, spec)
                .env(sandpool_protocol::PROGRAM_ENV, program)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
        })??;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other("std did not hand over the pipes"));
        };
        let spawned = Spawned {
            child,
            stdin: Some(stdin),
            stdout,
            stderr,
            out: Vec::new(),
            out_eof: false,
            err_tail: Vec::new(),
            err_eof: false,
            status: None,
            max_frame,
        };
        for fd in [
            spawned.stdin.as_ref().map(|s| s.as_fd()),
            Some(spawned.stdout.as_fd()),
            Some(spawned.stderr.as_fd()),
        ]
        .into_iter()
        .flatten()
        {
            fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
        }
        Ok(spawned)
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes all of `bytes` to the helper's stdin. The runner only ever
    /// writes a few KiB, less than a pipe holds, so a full pipe is an error
    /// rather than a wait.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::other("stdin already closed"))?;
        stdin.write_all(bytes)
    }

    /// Closes the helper's stdin (EOF for it).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The end of what the helper wrote to stderr so far.
    pub fn stderr_tail(&self) -> String {
        String::from_utf8_lossy(&self.err_tail).trim().to_owned()
    }

    /// Bytes the helper wrote to stdout that were not taken as frames.
    pub fn unread(&self) -> usize {
        self.out.len()
    }

    /// Reads the next frame (helper to host, the host's `max_frame`).
    pub fn read_frame(&mut self, deadline: Instant) -> Result<Frame, ReadError> {
        loop {
            match decode_frame(&self.out, self.max_frame, Direction::HelperToHost) {
                Ok((header, payload, used)) => {
                    let payload = payload.to_vec();
                    self.out.drain(..used);
                    return Ok(Frame { header, payload });
                }
                Err(DecodeError::Truncated { .. }) => {}
                Err(err) => return Err(ReadError::Bad(err)),
            }
            // A header on its own is decoded as soon as it is whole, so a
            // bad one is refused before its payload is waited for.
            if let Some(head) = self
                .out
                .get(..HEADER_LEN)
                .and_then(|h| <&[u8; HEADER_LEN]>::try_from(h).ok())
            {
                Header::decode(head, self.max_frame, Direction::HelperToHost)
                    .map_err(ReadError::Bad)?;
            }
            let partial = self.out.len();
            if self.out_eof {
                return Err(ReadError::Eof { partial });
            }
            if Instant::now() >= deadline {
                return Err(ReadError::Timeout { partial });
            }
            self.pump(deadline).map_err(ReadError::Io)?;
        }
    }

    /// Waits up to `deadline` for the helper to exit (draining its stdout
    /// and stderr meanwhile, so it never blocks on a full pipe); `None` if
    /// it is still running then.
    pub fn wait_exit(&mut self, deadline: Instant) -> io::Result<Option<ExitStatus>> {
        loop {
            if let Some(status) = self.try_wait()? {
                // Whatever it wrote before it died is still in the pipes.
                while !(self.out_eof && self.err_eof) {
                    if Instant::now() >= deadline {
                        break;
                    }
                    self.pump(deadline)?;
                }
                return Ok(Some(status));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let step = deadline.min(now + Duration::from_millis(5));
            if self.out_eof && self.err_eof {
                std::thread::sleep(step.saturating_duration_since(now));
            } else {
                self.pump(step)?;
            }
        }
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Waits for readable stdout or stderr until `deadline`, then reads
    /// what is there. stdout is read only up to one largest frame ahead.
    fn pump(&mut self, deadline: Instant) -> io::Result<()> {
        let wait = deadline.saturating_duration_since(Instant::now());
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        let want_out = !self.out_eof;
        let want_err = !self.err_eof;
        let (out_ready, err_ready) = {
            let mut fds = Vec::with_capacity(2);
            if want_out {
                fds.push(PollFd::new(self.stdout.as_fd(), PollFlags::POLLIN));
            }
            if want_err {
                fds.push(PollFd::new(self.stderr.as_fd(), PollFlags::POLLIN));
            }
            if fds.is_empty() {
                return Ok(());
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => return Ok(()),
                Err(err) => return Err(err.into()),
            }
            let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
            let mut it = fds.iter();
            let out_ready = want_out && it.next().is_some_and(ready);
            let err_ready = want_err && it.next().is_some_and(ready);
            (out_ready, err_ready)
        };
        let mut buf = [0u8; 16 * 1024];
        if out_ready {
            match self.stdout.read(&mut buf) {
                Ok(0) => self.out_eof = true,
                Ok(n) => self.out.extend_from_slice(&buf[..n]),
                Err(err) if retry(&err) => {}
                Err(err) => return Err(err),
            }
            // Bounded: a frame is refused as soon as its header is bad or
            // claims too much, so more than one largest frame is never
            // needed; beyond it the bytes are counted, not kept.
            let cap = HEADER_LEN + self.max_frame as usize + 1;
            if self.out.len() > cap {
                self.out.truncate(cap);
            }
        }
        if err_ready {
            match self.stderr.read(&mut buf) {
                Ok(0) => self.err_eof = true,
                Ok(n) => {
                    self.err_tail.extend_from_slice(&buf[..n]);
                    let excess = self.err_tail.len().saturating_sub(STDERR_TAIL);
                    self.err_tail.drain(..excess);
                }
                Err(err) if retry(&err) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

fn retry(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.status.is_none() {
            // SIGKILL cannot be caught; the wait after it is short.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How a process ended, in words.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => {
            let name = nix::sys::signal::Signal::try_from(signal)
                .map(|s| s.as_str().to_owned())
                .unwrap_or_else(|_| format!("signal {signal}"));
            format!("was killed by {name}")
        }
        (None, None) => format!("ended as {status}"),
    }
}

/// Encodes one frame with the given raw kind byte (which may name no kind),
/// for the hostile inputs.
pub fn raw_frame(magic: [u8; 2], version: u8, kind: u8, id: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&magic);
    out.push(version);
    out.push(kind);
    out.extend_from_slice(&id.to_le_bytes());
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A valid host-to-helper frame.
pub fn frame(kind: Kind, id: u64, payload: &[u8]) -> Vec<u8> {
    raw_frame(
        sandpool_protocol::MAGIC,
        sandpool_protocol::VERSION,
        kind as u8,
        id,
        payload,
    )
}
