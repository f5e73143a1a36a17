//! The sandpool helper runtime.
//!
//! A helper binary's `main` calls [`serve_main`] (or [`start`] and then
//! [`Session::serve`]) first thing. The runtime then runs the fixed startup
//! order of the security contract before it reads a single byte from the host:
//!
//! 1. read the [`SandboxSpec`] the host put in `SANDPOOL_SANDBOX`;
//! 2. take fds 0 and 1 as the protocol pipes;
//! 3. close every other inherited fd (`close_range(3, ~0, 0)`), measured;
//! 4. drop capabilities: the bounding set (when the helper holds
//!    `CAP_SETPCAP`, as a root helper does) and the ambient set first, then
//!    switch to the spec's `uid`/`gid` if any (`setgroups([])`, `setresgid`,
//!    `setresuid`), then empty the effective, inheritable and permitted
//!    sets; then run the init hook, if any ([`sandbox_with_init`]), check
//!    that the only fds open above 2 are those it declared ([`Init::keep`]),
//!    and compile the seccomp filter with `read` (and `write`, for a file
//!    opened for writing) allowed on exactly those (compiling allocates;
//!    installing later does not);
//! 5. set no_new_privs; 6. apply rlimits (core dumps always off);
//! 7. install a panic hook that writes the message and location to stderr
//!    without capturing a backtrace (std's default hook would, with
//!    `RUST_BACKTRACE` set, and its `getcwd` is outside the policy); then
//!    install the seccomp filter;
//! 8. write the Hello frame that reports all of the above.
//!
//! Then [`Session::serve`] loops: read a frame, run the handler on a request,
//! write a Response (or an Error frame if the handler failed or panicked).
//! It returns cleanly on stdin EOF or a Shutdown frame. Any protocol
//! violation by the host ends the helper: a helper never guesses.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};

use sandpool_protocol::{
    DecodeError, Direction, EncodeError, HEADER_LEN, Header, Hello, KeptFd, Kind,
    MAX_ERROR_MESSAGE, MAX_KEPT_FDS, MAX_KEPT_PATH, PayloadError, RegionError, RegionRef,
    RegionRequest, SPEC_ENV, SandboxSpec, SmallFrame, SpecError, decode_bind, encode_frame,
};
use sandpool_sandbox::{
    CapabilityError, CloseFdsError, DescribeFdError, InstallError, NoNewPrivsError, PolicyError,
    RlimitError, SharedRegion, StdioError, StdioPipe, SwitchUserError,
};
pub use sandpool_sandbox::{FdCloseStrategy, SeccompPolicy};
use thiserror::Error;

/// How a helper sets itself up; the host's [`SandboxSpec`] adds to it.
#[derive(Clone, Debug)]
pub struct Options {
    /// The helper's own seccomp allowlist. The host's spec may add syscalls to
    /// it (`extra_syscalls`) and chooses the mode.
    pub policy: SeccompPolicy,
    /// How to close inherited fds.
    pub fd_close: FdCloseStrategy,
    /// Reported in the Hello, so the host can tell which build it launched.
    pub build_id: String,
    /// Drop every capability at startup (default `true`). `false` exists
    /// only to test the host's check: the Hello then says the capabilities
    /// were kept, and a sandpool host refuses such a helper.
    pub drop_capabilities: bool,
    /// The process's `argv[0]`, whose file name becomes the name `ps` and
    /// `/proc/PID/comm` show (the launcher execs the helper from a sealed
    /// memfd, whose name would be the fd's number). `None` (the default):
    /// std's first argument. A `#![no_main]` helper on a libc that does not
    /// hand std the arguments (musl does not; glibc does) sets it from its
    /// C `main`'s argv.
    pub program_name: Option<std::ffi::OsString>,
}

impl Options {
    /// The default policy ([`SeccompPolicy::helper_default`]) and fd closing,
    /// with `build_id` reported in the Hello.
    pub fn new(build_id: impl Into<String>) -> Result<Options, StartupError> {
        Ok(Options {
            policy: SeccompPolicy::helper_default().map_err(StartupError::Policy)?,
            fd_close: FdCloseStrategy::Auto,
            build_id: build_id.into(),
            drop_capabilities: true,
            program_name: None,
        })
    }
}

/// A startup step failed. The helper must exit without serving.
#[derive(Debug, Error)]
pub enum StartupError {
    /// `SANDPOOL_SANDBOX` is missing: not launched by a sandpool host.
    #[error("{SPEC_ENV} is not set: this helper must be launched by a sandpool host")]
    MissingSpec,
    /// `SANDPOOL_SANDBOX` could not be parsed.
    #[error("{SPEC_ENV} is invalid: {0}")]
    Spec(#[from] SpecError),
    /// The seccomp policy could not be built or compiled.
    #[error(transparent)]
    Policy(PolicyError),
    /// fds 0 and 1 could not be taken.
    #[error(transparent)]
    Stdio(#[from] StdioError),
    /// The shared region the host passed could not be mapped.
    #[error(transparent)]
    Region(#[from] sandpool_sandbox::RegionError),
    /// Inherited fds could not be closed.
    #[error(transparent)]
    CloseFds(#[from] CloseFdsError),
    /// A capability set could not be cleared.
    #[error(transparent)]
    Capabilities(#[from] CapabilityError),
    /// The spec's uid or gid could not be switched to.
    #[error(transparent)]
    SwitchUser(#[from] SwitchUserError),
    /// no_new_privs could not be set.
    #[error(transparent)]
    NoNewPrivs(#[from] NoNewPrivsError),
    /// A resource limit could not be applied.
    #[error(transparent)]
    Rlimit(#[from] RlimitError),
    /// The seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] InstallError),
    /// The init hook failed.
    #[error("the helper's init hook failed: {0}")]
    Init(String),
    /// The init hook left fds open (beyond 0, 1, 2) that it did not
    /// declare with [`Init::keep`]: the host would refuse the Hello, so the
    /// helper does not start.
    #[error(
        "the helper's init hook left {0} fds open beyond stdin, stdout and stderr that it did not declare (Init::keep)"
    )]
    InitKeptFds(u32),
    /// The init hook declared an fd that could not be described (not
    /// open, its target unreadable).
    #[error("a kept fd the init hook declared: {0}")]
    KeptFd(#[from] DescribeFdError),
    /// The init hook declared fd 0, 1 or 2, or a negative number.
    #[error("the init hook declared fd {0} kept: only fds at or above 3 can be")]
    KeptStdio(RawFd),
    /// The init hook declared more fds than a Hello can carry.
    #[error("the init hook declared {declared} fds kept; a Hello carries at most {MAX_KEPT_FDS}")]
    TooManyKeptFds {
        /// How many it declared.
        declared: usize,
    },
    /// A kept fd's path is longer than a Hello can carry.
    #[error("kept fd {fd}'s path is {len} bytes; a Hello carries at most {MAX_KEPT_PATH}")]
    KeptPathTooLong {
        /// The fd.
        fd: RawFd,
        /// Its path's length.
        len: usize,
    },
    /// The Hello could not be written.
    #[error("writing the Hello frame failed: {0}")]
    Hello(io::Error),
}

/// The request loop ended on an error.
#[derive(Debug, Error)]
pub enum ServeError {
    /// Reading stdin failed.
    #[error("reading a frame from the host failed: {0}")]
    Read(io::Error),
    /// The host closed stdin in the middle of a frame.
    #[error("the host closed stdin mid-frame ({got} of {needed} bytes)")]
    TruncatedFrame {
        /// Bytes needed.
        needed: usize,
        /// Bytes received.
        got: usize,
    },
    /// The host sent an invalid frame header.
    #[error("the host sent an invalid frame: {0}")]
    Decode(#[from] DecodeError),
    /// The host sent an invalid Bind payload.
    #[error("the host sent an invalid Bind: {0}")]
    Bind(#[from] PayloadError),
    /// The host sent a region reference outside the request half, or a
    /// reply window outside the response half.
    #[error("the host sent an invalid region reference: {0}")]
    RegionRef(#[from] RegionError),
    /// A region request arrived but no region was mapped, or an access
    /// failed.
    #[error("region access failed: {0}")]
    Region(String),
    /// The host tried to bind an already bound helper to a tenant.
    #[error("the host tried to bind this helper a second time (one helper, one tenant)")]
    Rebind,
    /// Writing stdout failed.
    #[error("writing a frame to the host failed: {0}")]
    Write(io::Error),
}

/// What a handler sees of one request.
#[derive(Debug)]
pub struct Request<'a> {
    /// The request id (echoed by the runtime; informational for the handler).
    pub id: u64,
    /// The tenant this helper is bound to, if a Bind frame has arrived.
    pub tenant: Option<&'a [u8]>,
    /// The request bytes.
    pub payload: &'a [u8],
    /// For a request that came through the shared region: the size of the
    /// window of the response half its reply may use (a reply up to this
    /// size goes back through the region, a larger one through the pipe,
    /// up to the frame limit). `None` for a request through the pipe.
    pub reply_window: Option<u64>,
}

/// The error type a handler returns; its text becomes the Error frame.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// A helper after its startup sequence: sandboxed, Hello not yet sent.
#[derive(Debug)]
pub struct Sandboxed {
    /// The proof that will be sent. Public so test helpers can misreport it:
    /// the host never takes it on trust and checks `/proc/PID/status` itself.
    pub hello: Hello,
    spec: SandboxSpec,
    input: StdioPipe,
    output: StdioPipe,
    region: Option<SharedRegion>,
}

/// The helper program's own path, as the host resolved it (absolute), from
/// [`PROGRAM_ENV`](sandpool_protocol::PROGRAM_ENV); `None` outside a sandpool
/// launch. Use it, not `std::env::current_exe()`, to find files beside the
/// helper: with the host's `pin_image` (the default) `/proc/self/exe` names
/// the sealed memfd the helper was executed from, not the file.
pub fn program_path() -> Option<std::path::PathBuf> {
    std::env::var_os(sandpool_protocol::PROGRAM_ENV).map(std::path::PathBuf::from)
}

/// Runs the startup sequence (steps 1 to 7) with the spec from the environment.
pub fn sandbox(options: &Options) -> Result<Sandboxed, StartupError> {
    let text = std::env::var(SPEC_ENV).map_err(|_| StartupError::MissingSpec)?;
    let spec = SandboxSpec::decode(&text)?;
    sandbox_with_spec(options, spec)
}

/// Runs the startup sequence with an explicit spec.
pub fn sandbox_with_spec(options: &Options, spec: SandboxSpec) -> Result<Sandboxed, StartupError> {
    sandbox_inner(
        options,
        spec,
        None::<fn(&mut Init) -> Result<(), HandlerError>>,
    )
}

/// What an init hook may tell the runtime: the fds it keeps open.
///
/// A library that must hold a file while it serves (a table it reads on
/// demand, a random device it reads from) opens it in the init hook and
/// declares it here. The runtime reports each kept fd in the Hello (its
/// number, access mode and `/proc/self/fd` target), allows `read` and
/// `pread64` on exactly it (and `write`, `pwrite64` if it was opened for
/// writing), and the host checks the declaration against
/// `/proc/PID/fd`, and against the paths its configuration allows
/// (`sandbox.kept_fds`, none by default: a helper that keeps any fd is
/// refused unless the host allows that file). Any fd open and not
/// declared fails the start-up ([`StartupError::InitKeptFds`]).
#[derive(Debug, Default)]
pub struct Init {
    kept: Vec<RawFd>,
}

impl Init {
    /// Declares that `fd` stays open after the init hook. The fd must stay
    /// open (the caller owns it and must not close it while serving: a
    /// kept fd that is closed cannot be opened again under the filter).
    pub fn keep(&mut self, fd: impl AsFd) -> &mut Self {
        self.keep_raw(fd.as_fd().as_raw_fd())
    }

    /// [`keep`](Self::keep) by number, for an fd a library holds without
    /// an owner Rust can borrow (the C runtime's `sandpool_keep_fd`).
    pub fn keep_raw(&mut self, fd: RawFd) -> &mut Self {
        self.kept.push(fd);
        self
    }

    /// The fds declared so far, in declaration order.
    pub fn kept(&self) -> &[RawFd] {
        &self.kept
    }
}

/// Describes the fds an init hook declared, sorted and without
/// duplicates, and checks that no other fd above stdio is open.
fn declare_kept_fds(declared: &[RawFd]) -> Result<Vec<KeptFd>, StartupError> {
    let mut fds = declared.to_vec();
    fds.sort_unstable();
    fds.dedup();
    if fds.len() > MAX_KEPT_FDS {
        return Err(StartupError::TooManyKeptFds {
            declared: fds.len(),
        });
    }
    let mut kept = Vec::with_capacity(fds.len());
    for fd in fds {
        let number = u32::try_from(fd)
            .ok()
            .filter(|n| *n >= 3)
            .ok_or(StartupError::KeptStdio(fd))?;
        let (path, access) = sandpool_sandbox::describe_fd(fd)?;
        if path.len() > MAX_KEPT_PATH {
            return Err(StartupError::KeptPathTooLong {
                fd,
                len: path.len(),
            });
        }
        kept.push(KeptFd {
            fd: number,
            access,
            path,
        });
    }
    // Every declared fd is open (describe_fd read it), so the count tells
    // whether anything else is.
    let open = sandpool_sandbox::count_open_fds_above_stdio();
    let undeclared = open.saturating_sub(kept.len() as u32);
    if undeclared > 0 {
        return Err(StartupError::InitKeptFds(undeclared));
    }
    Ok(kept)
}

/// Runs the startup sequence with an explicit spec and an init hook: `init`
/// runs after the inherited fds are closed and the capabilities dropped
/// (and the user switched, if configured), before no_new_privs, the
/// rlimits and the seccomp filter, for a library to set itself up while it
/// still may (seed its generator from `/dev/urandom`, load its tables,
/// read its time zone). It may open files; each one it leaves open must be
/// declared with [`Init::keep`] (see [`Init`]), or the start-up fails
/// (`InitKeptFds`), as it would fail the host's check of the Hello. Its
/// error fails the start-up (exit 70).
pub fn sandbox_with_init(
    options: &Options,
    spec: SandboxSpec,
    init: impl FnOnce(&mut Init) -> Result<(), HandlerError>,
) -> Result<Sandboxed, StartupError> {
    sandbox_inner(options, spec, Some(init))
}

/// The startup sequence, with or without an init hook. Without one,
/// nothing runs between the close and the filter that could open an fd,
/// so the fds are not counted again.
fn sandbox_inner(
    options: &Options,
    spec: SandboxSpec,
    init: Option<impl FnOnce(&mut Init) -> Result<(), HandlerError>>,
) -> Result<Sandboxed, StartupError> {
    let mut policy = options.policy.clone();
    for name in &spec.extra_syscalls {
        policy.allow_name(name).map_err(StartupError::Policy)?;
    }
    let (input, output) = sandpool_sandbox::take_protocol_stdio()?;
    // Map what the helper needs before its inherited fds (fd 3 among them)
    // are closed: the mapping outlives the fd.
    let region = spec.region.map(SharedRegion::map_passed).transpose()?;
    // One reading of /proc/self/status for the fd count and the
    // capability step: closing fds and naming the process change no
    // capability set (the init hook, which may, runs after both).
    let status = sandpool_sandbox::ProcStatus::read();
    let closed = sandpool_sandbox::close_inherited_fds_with(options.fd_close, &status)?;
    // Cosmetic (what `ps` shows), so a failure does not stop the helper.
    if let Some(program) = options
        .program_name
        .clone()
        .or_else(|| std::env::args_os().next())
    {
        let _ = sandpool_sandbox::set_process_name(program.as_encoded_bytes());
    }
    let bounding_cleared = if options.drop_capabilities {
        sandpool_sandbox::drop_bounding_and_ambient_with(&status)?.bounding_cleared
    } else {
        false
    };
    sandpool_sandbox::switch_user(spec.uid, spec.gid)?;
    if options.drop_capabilities {
        sandpool_sandbox::clear_capabilities()?;
    }
    let kept_fds = match init {
        Some(init) => {
            let mut declared = Init::default();
            init(&mut declared).map_err(|err| StartupError::Init(err.to_string()))?;
            declare_kept_fds(&declared.kept)?
        }
        None => Vec::new(),
    };
    for kept in &kept_fds {
        policy
            .allow_kept_fd(kept.fd, kept.access)
            .map_err(StartupError::Policy)?;
    }
    let filter = policy.compile(spec.seccomp).map_err(StartupError::Policy)?;
    sandpool_sandbox::set_no_new_privs()?;
    sandpool_sandbox::apply_rlimits(&spec.rlimits)?;
    // Read before the filter, which does not allow getuid/getgid.
    let (uid, gid) = (
        sandpool_sandbox::current_uid(),
        sandpool_sandbox::current_gid(),
    );
    std::panic::set_hook(Box::new(sandboxed_panic_hook));
    let seccomp = filter.install()?;
    let hello = Hello {
        pid: std::process::id(),
        fd_close_method: closed.method,
        fds_closed: closed.closed,
        fd_close_nanos: u64::try_from(closed.elapsed.as_nanos()).unwrap_or(u64::MAX),
        no_new_privs: true,
        seccomp,
        caps_cleared: options.drop_capabilities,
        bounding_cleared,
        uid,
        gid,
        build_id: options.build_id.clone(),
        kept_fds,
    };
    Ok(Sandboxed {
        hello,
        spec,
        input,
        output,
        region,
    })
}

impl Sandboxed {
    /// Step 8: writes the Hello and returns the session that serves requests.
    pub fn say_hello(mut self) -> Result<Session, StartupError> {
        let mut frame = Vec::new();
        let payload = self.hello.encode();
        encode_frame(Kind::Hello, 0, &payload, self.spec.max_frame, &mut frame)
            .map_err(|err| StartupError::Hello(io::Error::other(err)))?;
        self.output.write_all(&frame).map_err(StartupError::Hello)?;
        Ok(Session {
            input: self.input,
            output: self.output,
            region: self.region,
            granted: None,
            ahead: ReadAhead::new(),
            max_frame: self.spec.max_frame,
            tenant: None,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
        })
    }
}

/// Runs the whole startup sequence and writes the Hello.
pub fn start(options: &Options) -> Result<Session, StartupError> {
    sandbox(options)?.say_hello()
}

/// [`start`] with an init hook (see [`sandbox_with_init`]).
pub fn start_with_init(
    options: &Options,
    init: impl FnOnce(&mut Init) -> Result<(), HandlerError>,
) -> Result<Session, StartupError> {
    let text = std::env::var(SPEC_ENV).map_err(|_| StartupError::MissingSpec)?;
    let spec = SandboxSpec::decode(&text)?;
    sandbox_with_init(options, spec, init)?.say_hello()
}

/// A sandboxed helper that has said hello: reads frames, serves requests.
#[derive(Debug)]
pub struct Session {
    input: StdioPipe,
    output: StdioPipe,
    region: Option<SharedRegion>,
    /// The current request came through the region: the window of the
    /// response half its reply may use.
    granted: Option<RegionRef>,
    ahead: ReadAhead,
    max_frame: u32,
    tenant: Option<Vec<u8>>,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
}

/// A frame from the host, as [`Session::next_frame`] returns it.
#[derive(Debug)]
pub enum Incoming<'a> {
    /// A request to answer.
    Request {
        /// Its id.
        id: u64,
        /// Its payload.
        payload: &'a [u8],
    },
    /// The host asked the helper to exit.
    Shutdown,
    /// stdin reached EOF at a frame boundary: the host is gone or done.
    Eof,
}

impl Session {
    /// The shared region the host passed, if any (raw access, for helpers
    /// that run their own loop).
    pub fn region(&self) -> Option<&SharedRegion> {
        self.region.as_ref()
    }

    /// The largest frame payload either side may send.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// The tenant this helper is bound to, once a Bind has arrived.
    pub fn tenant(&self) -> Option<&[u8]> {
        self.tenant.as_deref()
    }

    /// Reads the next frame, handling Bind frames itself.
    pub fn next_frame(&mut self) -> Result<Incoming<'_>, ServeError> {
        Ok(match self.next_header()? {
            Next::Request(id) => Incoming::Request {
                id,
                payload: &self.inbuf,
            },
            Next::Shutdown => Incoming::Shutdown,
            Next::Eof => Incoming::Eof,
        })
    }

    /// Reads frames until a Request (payload left in `inbuf`), a Shutdown or EOF.
    fn next_header(&mut self) -> Result<Next, ServeError> {
        loop {
            let got = self.ahead.fill_to(&mut self.input, HEADER_LEN)?;
            if got == 0 {
                return Ok(Next::Eof);
            }
            if got < HEADER_LEN {
                return Err(ServeError::TruncatedFrame {
                    needed: HEADER_LEN,
                    got,
                });
            }
            let head = self.ahead.take_header();
            let header = Header::decode(&head, self.max_frame, Direction::HostToHelper)?;
            let len = header.len as usize;
            let got = self
                .ahead
                .take_into(&mut self.input, len, &mut self.inbuf)?;
            if got < len {
                return Err(ServeError::TruncatedFrame {
                    needed: HEADER_LEN + len,
                    got: HEADER_LEN + got,
                });
            }
            match header.kind {
                Kind::Bind => {
                    if self.tenant.is_some() {
                        return Err(ServeError::Rebind);
                    }
                    self.tenant = Some(decode_bind(&self.inbuf)?.to_vec());
                }
                Kind::Shutdown => return Ok(Next::Shutdown),
                Kind::Request => {
                    self.granted = None;
                    return Ok(Next::Request(header.id));
                }
                Kind::RequestInRegion => {
                    let region = self
                        .region
                        .as_ref()
                        .ok_or_else(|| ServeError::Region("no shared region was passed".into()))?;
                    let at = RegionRequest::decode(&self.inbuf, region.len() as u64)?;
                    region
                        .read_into(at.request.offset, at.request.len, &mut self.inbuf)
                        .map_err(|err| ServeError::Region(err.to_string()))?;
                    self.granted = Some(at.reply);
                    return Ok(Next::Request(header.id));
                }
                // Header::decode refuses helper-to-host kinds in this direction.
                Kind::Hello | Kind::Response | Kind::Error | Kind::ResponseInRegion => {
                    return Err(ServeError::Decode(DecodeError::WrongDirection {
                        kind: header.kind,
                        direction: Direction::HostToHelper,
                    }));
                }
            }
        }
    }

    /// Writes one whole frame with a single `write` where the pipe allows.
    pub fn send(&mut self, kind: Kind, id: u64, payload: &[u8]) -> Result<(), ServeError> {
        write_frame(&mut self.output, self.max_frame, kind, id, payload).map_err(|err| match err {
            SendError::TooLarge(err) => ServeError::Write(io::Error::other(err)),
            SendError::Io(err) => err,
        })
    }

    /// Writes raw bytes to the host (for test helpers that misbehave on purpose).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ServeError> {
        self.output.write_all(bytes).map_err(ServeError::Write)
    }

    /// Serves requests until stdin EOF or Shutdown (`Ok`) or a protocol error.
    ///
    /// The handler appends its response to the buffer it is given (reused
    /// across requests). A handler error or panic becomes an Error frame for
    /// that request only; a response larger than the frame limit becomes an
    /// Error frame saying so.
    pub fn serve<H>(mut self, mut handler: H) -> Result<(), ServeError>
    where
        H: FnMut(&Request<'_>, &mut Vec<u8>) -> Result<(), HandlerError>,
    {
        loop {
            let id = match self.next_header()? {
                Next::Eof | Next::Shutdown => return Ok(()),
                Next::Request(id) => id,
            };
            self.outbuf.clear();
            let request = Request {
                id,
                tenant: self.tenant.as_deref(),
                payload: &self.inbuf,
                reply_window: self.granted.map(|window| window.len),
            };
            let out = &mut self.outbuf;
            let outcome = catch_unwind(AssertUnwindSafe(|| handler(&request, out)));
            let message = match outcome {
                Ok(Ok(())) => match self.send_response(id) {
                    Ok(()) => continue,
                    Err(SendError::TooLarge(err)) => err.to_string(),
                    Err(SendError::Io(err)) => return Err(err),
                },
                Ok(Err(err)) => err.to_string(),
                Err(panic) => format!("handler panicked: {}", panic_message(&*panic)),
            };
            let limit = MAX_ERROR_MESSAGE.min(self.max_frame as usize);
            self.send(Kind::Error, id, truncate_utf8(&message, limit))?;
        }
    }

    fn send_response(&mut self, id: u64) -> Result<(), SendError> {
        if let (Some(region), Some(window)) = (self.region.as_ref(), self.granted) {
            // A reply too large for its window goes through the pipe.
            if self.outbuf.len() as u64 <= window.len {
                region
                    .write(window.offset, &self.outbuf)
                    .map_err(|err| SendError::Io(ServeError::Region(err.to_string())))?;
                let at = RegionRef {
                    offset: window.offset,
                    len: self.outbuf.len() as u64,
                };
                return write_frame(
                    &mut self.output,
                    self.max_frame,
                    Kind::ResponseInRegion,
                    id,
                    &at.encode(),
                );
            }
        }
        write_frame(
            &mut self.output,
            self.max_frame,
            Kind::Response,
            id,
            &self.outbuf,
        )
    }

    /// The pipes, for a helper that runs its own loop.
    pub fn into_parts(self) -> (StdioPipe, StdioPipe) {
        (self.input, self.output)
    }
}

enum Next {
    Request(u64),
    Shutdown,
    Eof,
}

enum SendError {
    TooLarge(EncodeError),
    Io(ServeError),
}

/// Writes one frame, header and payload, retrying short writes: a small
/// one with `write` from a copy ([`SmallFrame`]), a larger one with
/// `writev` (no copy of the payload into a frame buffer).
fn write_frame(
    output: &mut StdioPipe,
    max_frame: u32,
    kind: Kind,
    id: u64,
    payload: &[u8],
) -> Result<(), SendError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|len| *len <= max_frame)
        .ok_or(SendError::TooLarge(EncodeError::PayloadTooLarge {
            len: payload.len(),
            max: max_frame,
        }))?;
    let head = Header { kind, id, len }.encode();
    if let Some(frame) = SmallFrame::join(&head, payload) {
        return output
            .write_all(frame.bytes())
            .map_err(|err| SendError::Io(ServeError::Write(err)));
    }
    let mut slices = [io::IoSlice::new(&head), io::IoSlice::new(payload)];
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        match output.write_vectored(bufs) {
            Ok(0) => {
                return Err(SendError::Io(ServeError::Write(
                    io::ErrorKind::WriteZero.into(),
                )));
            }
            Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(SendError::Io(ServeError::Write(err))),
        }
    }
    Ok(())
}

/// Bytes read ahead on the request pipe. Small, because every idle helper
/// keeps it resident: it fits a small frame whole (one `read` per request);
/// the rest of a larger payload is read straight into the request buffer.
const READ_AHEAD: usize = 8 * 1024;

/// Read-ahead on the request pipe: one `read` usually brings a whole small
/// frame (header and payload), or several pipelined ones.
#[derive(Debug)]
struct ReadAhead {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl ReadAhead {
    fn new() -> Self {
        ReadAhead {
            buf: vec![0; READ_AHEAD].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Reads until at least `want` bytes are buffered or EOF; returns how
    /// many are buffered.
    fn fill_to(&mut self, input: &mut StdioPipe, want: usize) -> Result<usize, ServeError> {
        if self.end - self.start >= want {
            return Ok(self.end - self.start);
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        while self.end < want {
            match input.read(&mut self.buf[self.end..]) {
                Ok(0) => break,
                Ok(n) => self.end += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(ServeError::Read(err)),
            }
        }
        Ok(self.end - self.start)
    }

    /// Takes a header's worth of buffered bytes (`fill_to` made sure).
    fn take_header(&mut self) -> [u8; HEADER_LEN] {
        let mut head = [0u8; HEADER_LEN];
        head.copy_from_slice(&self.buf[self.start..self.start + HEADER_LEN]);
        self.start += HEADER_LEN;
        head
    }

    /// Moves `len` bytes into `out` (replacing its contents): what is
    /// buffered first, the rest read straight into `out`. Returns how many
    /// arrived before EOF.
    fn take_into(
        &mut self,
        input: &mut StdioPipe,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<usize, ServeError> {
        let buffered = (self.end - self.start).min(len);
        out.clear();
        out.extend_from_slice(&self.buf[self.start..self.start + buffered]);
        self.start += buffered;
        if buffered == len {
            return Ok(len);
        }
        out.resize(len, 0);
        Ok(buffered + read_full(input, &mut out[buffered..])?)
    }
}

fn read_full(input: &mut StdioPipe, buf: &mut [u8]) -> Result<usize, ServeError> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(ServeError::Read(err)),
        }
    }
    Ok(got)
}

/// The panic hook the runtime installs before its seccomp filter (replacing
/// any earlier hook): one line on stderr, `sandpool-helper: panicked at
/// FILE:LINE:COL: MESSAGE`, and no backtrace whatever `RUST_BACKTRACE`
/// says. std's default hook captures a backtrace when that variable is set,
/// and resolving it calls `getcwd`, which the policy forbids: every handler
/// panic would then be a seccomp kill instead of an Error frame. Formatting
/// allocates and writes fd 2, both allowed.
fn sandboxed_panic_hook(info: &std::panic::PanicHookInfo<'_>) {
    let message = panic_message(info.payload());
    let line = match info.location() {
        Some(at) => format!(
            "sandpool-helper: panicked at {}:{}:{}: {message}\n",
            at.file(),
            at.line(),
            at.column()
        ),
        None => format!("sandpool-helper: panicked: {message}\n"),
    };
    let _ = io::stderr().write_all(line.as_bytes());
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic payload)")
}

fn truncate_utf8(text: &str, max: usize) -> &[u8] {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text.as_bytes()[..end]
}

/// Exit status of a helper whose startup sequence failed.
pub const EXIT_STARTUP_FAILED: i32 = 70;
/// Exit status of a helper that saw a protocol violation or I/O error from the host.
pub const EXIT_PROTOCOL_ERROR: i32 = 76;

/// Runs the startup sequence and serves requests with `handler`, then exits
/// the process: 0 on EOF or Shutdown, [`EXIT_STARTUP_FAILED`] if the sandbox
/// could not be set up (fail closed), [`EXIT_PROTOCOL_ERROR`] if the host broke
/// the protocol. The reason goes to stderr, which the host reads.
///
/// A whole helper (its `main`; the handler answers each request of the
/// tenant the helper is bound to, in order):
///
/// ```no_run
/// use sandpool_helper::{Options, serve_main};
///
/// fn main() {
///     let options = match Options::new(concat!("upper-helper ", env!("CARGO_PKG_VERSION"))) {
///         Ok(options) => options,
///         Err(err) => {
///             eprintln!("upper-helper: {err}");
///             std::process::exit(sandpool_helper::EXIT_STARTUP_FAILED);
///         }
///     };
///     serve_main(&options, |request, out| {
///         if request.payload.is_empty() {
///             // An Err becomes an Error frame; the helper serves on.
///             return Err("empty request".into());
///         }
///         out.extend(request.payload.iter().map(u8::to_ascii_uppercase));
///         Ok(())
///     })
/// }
/// ```
pub fn serve_main<H>(options: &Options, handler: H) -> !
where
    H: FnMut(&Request<'_>, &mut Vec<u8>) -> Result<(), HandlerError>,
{
    serve_started(start(options), handler)
}

/// [`serve_main`] with an init hook, run before the sandbox closes (see
/// [`sandbox_with_init`] for where it runs and what it may do).
pub fn serve_main_with_init<I, H>(options: &Options, init: I, handler: H) -> !
where
    I: FnOnce(&mut Init) -> Result<(), HandlerError>,
    H: FnMut(&Request<'_>, &mut Vec<u8>) -> Result<(), HandlerError>,
{
    serve_started(start_with_init(options, init), handler)
}

/// Serves on a session that started, or exits as [`serve_main`] says.
fn serve_started<H>(started: Result<Session, StartupError>, handler: H) -> !
where
    H: FnMut(&Request<'_>, &mut Vec<u8>) -> Result<(), HandlerError>,
{
    let session = match started {
        Ok(session) => session,
        Err(err) => {
            eprintln!("sandpool-helper: startup failed: {err}");
            std::process::exit(EXIT_STARTUP_FAILED);
        }
    };
    match session.serve(handler) {
        Ok(()) => std::process::exit(0),
        Err(err) => {
            eprintln!("sandpool-helper: {err}");
            std::process::exit(EXIT_PROTOCOL_ERROR);
        }
    }
}
