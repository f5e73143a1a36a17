//! The conformance runner: does a helper binary keep sandpool's helper
//! contract? Behind `sandpool-conformance PROGRAM [ARGS...]`, and callable
//! from tests ([`run`]).
//!
//! It assumes nothing of the helper beyond the contract (ARCHITECTURE.md,
//! `sandpool_helper`'s startup order and exit codes): the reference echo op
//! and the reference test ops are used only where a helper that lacks them
//! is told apart (an Error frame for them makes those checks SKIP).
//!
//! Three groups of checks, each with its own deadline, each helper its own
//! process (killed and reaped when its check is done):
//!
//! - sandbox proofs: a well-formed Hello; sandpool's own [`Launcher`]
//!   (default configuration, seccomp enforce, direct launch with a few
//!   non-CLOEXEC fds leaked into it) accepts it and a call through it;
//!   and, on the runner's own spawn (leaking fds too), `/proc/PID/status`
//!   (Seccomp 2, NoNewPrivs 1, every capability set 0, ids as reported)
//!   and `/proc/PID/fd` (0, 1, 2 only, and the fds the Hello declares
//!   kept, each pointing where it says: allowed only with
//!   `--allow-kept-fd PATH`), each its own check;
//! - protocol: pipelined requests after a Bind answered in order with
//!   their ids, nothing unasked for; Shutdown and stdin EOF end the helper
//!   with status 0;
//! - hostile host input: a truncated header, a frame over `max_frame`, an
//!   unknown kind, a helper-to-host kind, bad magic, a bad version, a
//!   second Bind: the helper must not answer and must exit with status 76
//!   ([`EXIT_PROTOCOL_ERROR`]; another non-zero status passes with a note);
//! - a forbidden syscall (the reference `OP_OPEN` test op): death by
//!   SIGSYS, or SKIP if the helper refuses the op.
#![deny(clippy::unwrap_used)]

pub mod child;

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sandpool::{CallError, HelperConfig, KeptFdRule, LaunchMode, Launcher};
use sandpool_helper::EXIT_PROTOCOL_ERROR;
use sandpool_protocol::{FdCloseMethod, Hello, Kind, MAGIC, SeccompMode, VERSION};
use sandpool_reference_helper::reference::{OP_ECHO, OP_OPEN, request};

use child::{ReadError, Spawned, describe, frame, raw_frame};

/// What to run and how long each step may take.
#[derive(Clone, Debug)]
pub struct Options {
    /// The helper binary.
    pub program: PathBuf,
    /// Its arguments (given to every launch, unchanged).
    pub args: Vec<String>,
    /// The deadline of each step of a check (a Hello, a reply, an exit).
    pub timeout: Duration,
    /// Files the helper may keep open, read-only (`--allow-kept-fd PATH`,
    /// repeatable; an entry ending in `/` allows the files under it), as a
    /// host's `sandbox.kept_fds` would. Default none.
    pub allow_kept_fds: Vec<PathBuf>,
}

impl Options {
    /// `program args` with the default 5 s step deadline.
    pub fn new(program: impl Into<PathBuf>, args: &[&str]) -> Options {
        Options {
            program: program.into(),
            args: args.iter().map(|arg| arg.to_string()).collect(),
            timeout: DEFAULT_TIMEOUT,
            allow_kept_fds: Vec::new(),
        }
    }
}

/// The default deadline of each step.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The usage line.
pub const USAGE: &str = "usage: sandpool-conformance [--timeout SECONDS] PROGRAM [ARGS...]";

/// The command line was not understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n{USAGE}", self.0)
    }
}

impl std::error::Error for UsageError {}

/// Parses `[--timeout SECONDS] PROGRAM [ARGS...]` (without the runner's own
/// name). Everything after PROGRAM belongs to the helper.
pub fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options, UsageError> {
    let mut timeout = DEFAULT_TIMEOUT;
    let mut kept = Vec::new();
    loop {
        let arg = args
            .next()
            .ok_or_else(|| UsageError("no PROGRAM given".into()))?;
        match arg.as_str() {
            "--timeout" => {
                let value = args
                    .next()
                    .ok_or_else(|| UsageError("--timeout needs SECONDS".into()))?;
                timeout = value
                    .parse::<f64>()
                    .ok()
                    .filter(|secs| secs.is_finite() && *secs > 0.0 && *secs <= 3600.0)
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| UsageError(format!("bad --timeout {value:?}")))?;
            }
            "--allow-kept-fd" => {
                let path = args
                    .next()
                    .ok_or_else(|| UsageError("--allow-kept-fd needs PATH".into()))?;
                kept.push(PathBuf::from(path));
            }
            "--" => {
                let program = args
                    .next()
                    .ok_or_else(|| UsageError("no PROGRAM given".into()))?;
                return finish(program, args, timeout, kept);
            }
            flag if flag.starts_with('-') => {
                return Err(UsageError(format!("unknown option {flag:?}")));
            }
            _ => return finish(arg, args, timeout, kept),
        }
    }
}

fn finish(
    program: String,
    args: impl Iterator<Item = String>,
    timeout: Duration,
    allow_kept_fds: Vec<PathBuf>,
) -> Result<Options, UsageError> {
    let program = PathBuf::from(program);
    if !program.is_file() {
        return Err(UsageError(format!(
            "PROGRAM {} is not a file",
            program.display()
        )));
    }
    Ok(Options {
        program,
        args: args.collect(),
        timeout,
        allow_kept_fds,
    })
}

/// How one check went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It holds (with a remark, e.g. a non-zero status other than 76).
    Pass(Option<String>),
    /// It does not, and why.
    Fail(String),
    /// It could not be checked on this helper or host, and why.
    Skip(String),
}

/// One check's name and outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// Its name (stable; tests and scripts match on it).
    pub name: &'static str,
    /// How it went.
    pub outcome: Outcome,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Pass(None) => write!(f, "PASS {}", self.name),
            Outcome::Pass(Some(note)) => write!(f, "PASS {} ({note})", self.name),
            Outcome::Fail(why) => write!(f, "FAIL {}: {why}", self.name),
            Outcome::Skip(why) => write!(f, "SKIP {}: {why}", self.name),
        }
    }
}

/// Every check's outcome, in the order they ran.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The checks.
    pub checks: Vec<Check>,
}

impl Report {
    fn push(&mut self, name: &'static str, outcome: Outcome) {
        self.checks.push(Check { name, outcome });
    }

    fn count(&self, which: fn(&Outcome) -> bool) -> usize {
        self.checks.iter().filter(|c| which(&c.outcome)).count()
    }

    /// How many passed.
    pub fn passed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Pass(_)))
    }

    /// How many failed.
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Fail(_)))
    }

    /// How many were skipped.
    pub fn skipped(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Skip(_)))
    }

    /// The outcome of the check named `name`, if it ran.
    pub fn outcome(&self, name: &str) -> Option<&Outcome> {
        self.checks
            .iter()
            .find(|c| c.name == name)
            .map(|c| &c.outcome)
    }

    /// The names of the failed checks.
    pub fn failures(&self) -> Vec<&'static str> {
        self.checks
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Fail(_)))
            .map(|c| c.name)
            .collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for check in &self.checks {
            writeln!(f, "{check}")?;
        }
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed(),
            self.failed(),
            self.skipped()
        )
    }
}

/// Every check's name, in the order [`run`] reports them.
pub const CHECKS: &[&str] = &[
    "hello-well-formed",
    "hello-claims-sandbox",
    "proc-seccomp",
    "proc-no-new-privs",
    "proc-cap-eff",
    "proc-cap-prm",
    "proc-cap-bnd",
    "proc-cap-inh",
    "proc-cap-amb",
    "proc-ids",
    "proc-fds-only-stdio",
    "launcher-verifies-hello",
    "launcher-call",
    "requests-answered-in-order",
    "echo-round-trip",
    "shutdown-exits-0",
    "stdin-eof-exits-0",
    "hostile-truncated-header",
    "hostile-oversized-frame",
    "hostile-unknown-kind",
    "hostile-helper-kind",
    "hostile-bad-magic",
    "hostile-bad-version",
    "hostile-second-bind",
    "forbidden-syscall-kills",
];

/// The tenant label the runner binds its helpers to.
const TENANT: &[u8] = b"sandpool-conformance";

/// Runs every check against `options.program`.
pub fn run(options: &Options) -> Report {
    let mut report = Report::default();
    let mut config = HelperConfig::new(&options.program);
    config.args = options.args.clone();
    config.sandbox.kept_fds = options
        .allow_kept_fds
        .iter()
        .map(|path| KeptFdRule {
            path: path.clone(),
            write: false,
        })
        .collect();
    if let Err(err) = config.validate() {
        for name in CHECKS {
            report.push(name, Outcome::Fail(format!("bad --allow-kept-fd: {err}")));
        }
        return report;
    }
    let spec = match config.sandbox_spec() {
        Ok(spec) => spec,
        Err(err) => {
            for name in CHECKS {
                report.push(name, Outcome::Fail(format!("no sandbox spec: {err}")));
            }
            return report;
        }
    };
    let runner = Runner {
        options,
        spec: spec.encode(),
        max_frame: spec.max_frame,
    };
    runner.sandbox_proofs(&mut report);
    runner.launcher(config, &mut report);
    runner.protocol(&mut report);
    runner.hostile(&mut report);
    runner.forbidden_syscall(&mut report);
    report
}

struct Runner<'a> {
    options: &'a Options,
    spec: String,
    max_frame: u32,
}

impl Runner<'_> {
    fn deadline(&self) -> Instant {
        Instant::now() + self.options.timeout
    }

    /// Spawns the helper behind the runner's pipes and reads its Hello.
    fn start(&self) -> Result<(Spawned, Hello), String> {
        let mut child = Spawned::spawn(
            &self.options.program,
            &self.options.args,
            &self.spec,
            self.max_frame,
        )
        .map_err(|err| format!("spawning {} failed: {err}", self.options.program.display()))?;
        let hello = read_hello(&mut child, self.deadline())?;
        Ok((child, hello))
    }

    fn sandbox_proofs(&self, report: &mut Report) {
        const PROC: [&str; 9] = [
            "proc-seccomp",
            "proc-no-new-privs",
            "proc-cap-eff",
            "proc-cap-prm",
            "proc-cap-bnd",
            "proc-cap-inh",
            "proc-cap-amb",
            "proc-ids",
            "proc-fds-only-stdio",
        ];
        let (child, hello) = match self.start() {
            Ok(started) => started,
            Err(why) => {
                report.push("hello-well-formed", Outcome::Fail(why));
                for name in ["hello-claims-sandbox"].into_iter().chain(PROC) {
                    report.push(name, Outcome::Fail("no valid Hello to check".into()));
                }
                return;
            }
        };
        let pid = child.pid();
        report.push(
            "hello-well-formed",
            if hello.pid == pid {
                Outcome::Pass(None)
            } else {
                Outcome::Fail(format!(
                    "the Hello says pid {}, the runner spawned pid {pid}",
                    hello.pid
                ))
            },
        );
        let bounding_required = host_can_empty_bounding_set();
        let mut lies = Vec::new();
        if hello.seccomp != SeccompMode::Enforce {
            lies.push(format!("seccomp {:?}, not Enforce", hello.seccomp));
        }
        if !hello.no_new_privs {
            lies.push("no_new_privs unset".into());
        }
        if !hello.caps_cleared {
            lies.push("capabilities kept".into());
        }
        if bounding_required && !hello.bounding_cleared {
            lies.push("bounding set kept though the helper holds CAP_SETPCAP".into());
        }
        if hello.fd_close_method != FdCloseMethod::CloseRange {
            lies.push(format!(
                "fds closed by {:?}, not close_range",
                hello.fd_close_method
            ));
        }
        report.push(
            "hello-claims-sandbox",
            if lies.is_empty() {
                Outcome::Pass(None)
            } else {
                Outcome::Fail(format!("the Hello reports {}", lies.join(", ")))
            },
        );

        // The kernel's view, whatever the Hello said. The helper has said
        // hello and waits for a frame: its state no longer changes.
        let status = match std::fs::read_to_string(format!("/proc/{pid}/status")) {
            Ok(status) => status,
            Err(err) => {
                for name in PROC {
                    report.push(
                        name,
                        Outcome::Fail(format!("reading /proc/{pid}/status: {err}")),
                    );
                }
                return;
            }
        };
        let want = |field: &str, want: &str| {
            let got = status_field(&status, field);
            if got == want {
                Outcome::Pass(None)
            } else {
                Outcome::Fail(format!(
                    "/proc/{pid}/status says {field}: {got:?}, want {want}"
                ))
            }
        };
        report.push("proc-seccomp", want("Seccomp", "2"));
        report.push("proc-no-new-privs", want("NoNewPrivs", "1"));
        for (name, field) in [
            ("proc-cap-eff", "CapEff"),
            ("proc-cap-prm", "CapPrm"),
            ("proc-cap-bnd", "CapBnd"),
            ("proc-cap-inh", "CapInh"),
            ("proc-cap-amb", "CapAmb"),
        ] {
            let got = status_field(&status, field);
            let outcome = match u64::from_str_radix(got, 16) {
                Ok(0) => Outcome::Pass(None),
                Ok(_) if field == "CapBnd" && !bounding_required => Outcome::Skip(format!(
                    "CapBnd {got}: this host lacks CAP_SETPCAP, so no helper of it can empty its bounding set"
                )),
                _ => Outcome::Fail(format!("/proc/{pid}/status says {field}: {got:?}, want 0")),
            };
            report.push(name, outcome);
        }
        let mut wrong = Vec::new();
        for (field, id) in [("Uid", hello.uid), ("Gid", hello.gid)] {
            let value = status_field(&status, field);
            let ids: Vec<Option<u32>> = value.split_whitespace().map(|v| v.parse().ok()).collect();
            if ids.len() != 4 || ids.iter().any(|got| *got != Some(id)) {
                wrong.push(format!("{field}: {value:?}, the Hello says {id}"));
            }
        }
        report.push(
            "proc-ids",
            if wrong.is_empty() {
                Outcome::Pass(None)
            } else {
                Outcome::Fail(format!("/proc/{pid}/status says {}", wrong.join("; ")))
            },
        );
        report.push("proc-fds-only-stdio", fds_outcome(pid, &hello));
        drop(child);
    }

    /// sandpool's own launch and verification, and one call through it.
    fn launcher(&self, mut config: HelperConfig, report: &mut Report) {
        config.launch_mode = LaunchMode::Direct;
        config.spawn_timeout = self.options.timeout;
        let launcher = match Launcher::new(config) {
            Ok(launcher) => launcher,
            Err(err) => {
                let why = format!("sandpool's Launcher could not be set up: {err}");
                report.push("launcher-verifies-hello", Outcome::Fail(why.clone()));
                report.push("launcher-call", Outcome::Fail(why));
                return;
            }
        };
        // Direct mode: posix_spawn from this process, so the leaked fds
        // reach the helper and must be closed by it.
        let launched = child::with_leaked_fds(|| launcher.launch())
            .map_err(|err| format!("leaking fds into the launch failed: {err}"))
            .and_then(|launched| launched.map_err(|err| error_chain(&err)));
        let helper = match launched {
            Ok(helper) => {
                report.push("launcher-verifies-hello", Outcome::Pass(None));
                helper
            }
            Err(why) => {
                report.push(
                    "launcher-verifies-hello",
                    Outcome::Fail(format!("sandpool refused the helper: {why}")),
                );
                report.push(
                    "launcher-call",
                    Outcome::Fail("no verified helper to call".into()),
                );
                return;
            }
        };
        let call = helper
            .bind(TENANT)
            .and_then(|()| helper.call(&request(OP_ECHO, b"conformance"), self.deadline()));
        let outcome = match call {
            Ok(_) => Outcome::Pass(None),
            // A refusal of the reference echo op is still a valid answer.
            Err(CallError::Helper(message)) => {
                Outcome::Pass(Some(format!("answered with an Error frame: {message}")))
            }
            Err(err) => Outcome::Fail(format!("sandpool's call failed: {}", error_chain(&err))),
        };
        report.push("launcher-call", outcome);
        helper.shutdown(self.options.timeout);
    }

    fn protocol(&self, report: &mut Report) {
        let (order, echo) = self.pipelined();
        report.push("requests-answered-in-order", order);
        report.push("echo-round-trip", echo);
        report.push("shutdown-exits-0", self.clean_exit(true));
        report.push("stdin-eof-exits-0", self.clean_exit(false));
    }

    /// Bind, then requests pipelined in one write: each reply must be a
    /// Response or Error frame with the id of the oldest request not yet
    /// answered (the host's call table matches replies in wire order), and
    /// nothing may come after the last.
    fn pipelined(&self) -> (Outcome, Outcome) {
        // Distinct, nonzero, spread over all 64 bits, as the host's are.
        const IDS: [u64; 5] = [
            0x0000_0001_9e37_79b9,
            0x8000_0000_0000_0001,
            0x0000_0002_7f4a_7c15,
            u64::MAX - 7,
            0x0123_4567_89ab_cdef,
        ];
        let fail = |why: String| {
            (
                Outcome::Fail(why),
                Outcome::Skip("the requests were not answered in order".into()),
            )
        };
        let (mut child, _hello) = match self.start() {
            Ok(started) => started,
            Err(why) => return fail(why),
        };
        let bodies: Vec<Vec<u8>> = (0..IDS.len())
            .map(|i| format!("conformance request {i}").into_bytes())
            .collect();
        let mut wire = frame(Kind::Bind, 0, TENANT);
        for (id, body) in IDS.iter().zip(&bodies) {
            wire.extend_from_slice(&frame(Kind::Request, *id, &request(OP_ECHO, body)));
        }
        if let Err(err) = child.send(&wire) {
            return fail(format!("writing the requests failed: {err}"));
        }
        let deadline = self.deadline();
        let mut echoed = 0;
        let mut refused = 0;
        for (i, (id, body)) in IDS.iter().zip(&bodies).enumerate() {
            let reply = match child.read_frame(deadline) {
                Ok(reply) => reply,
                Err(err) => {
                    return fail(format!(
                        "reply {i} of {}: {err}{}",
                        IDS.len(),
                        stderr_suffix(&child)
                    ));
                }
            };
            let header = reply.header;
            if header.id != *id {
                return fail(format!(
                    "reply {i} carries id {:#x}, but the oldest request owed a reply has id {id:#x}",
                    header.id
                ));
            }
            match header.kind {
                Kind::Response if reply.payload == *body => echoed += 1,
                Kind::Response => {
                    return (
                        Outcome::Pass(None),
                        Outcome::Fail(format!(
                            "the echo of request {i} came back as {} other bytes",
                            reply.payload.len()
                        )),
                    );
                }
                Kind::Error if std::str::from_utf8(&reply.payload).is_ok() => refused += 1,
                Kind::Error => return fail(format!("reply {i}: Error frame is not UTF-8")),
                other => return fail(format!("reply {i} is a {other:?} frame")),
            }
        }
        // Everything it wrote before EOF is in the pipe once it has exited.
        child.close_stdin();
        let exited = match child.wait_exit(self.deadline()) {
            Ok(exited) => exited,
            Err(err) => return fail(format!("waiting for its exit failed: {err}")),
        };
        let extra = child.unread();
        let order = match exited {
            _ if extra > 0 => Outcome::Fail(format!(
                "{} replies as asked, then {extra} more bytes nobody asked for",
                IDS.len()
            )),
            None => Outcome::Fail(format!(
                "answered, but still running {:?} after stdin EOF",
                self.options.timeout
            )),
            Some(_) => Outcome::Pass(None),
        };
        let echo = if echoed == IDS.len() {
            Outcome::Pass(None)
        } else {
            Outcome::Skip(format!(
                "{refused} of {} echo requests (reference op {OP_ECHO:#04x}) answered with an Error frame",
                IDS.len()
            ))
        };
        (order, echo)
    }

    /// A Shutdown frame (or stdin EOF) must end the helper with status 0,
    /// with nothing written after its Hello.
    fn clean_exit(&self, shutdown: bool) -> Outcome {
        let (mut child, _hello) = match self.start() {
            Ok(started) => started,
            Err(why) => return Outcome::Fail(why),
        };
        if shutdown {
            if let Err(err) = child.send(&frame(Kind::Shutdown, 0, b"")) {
                return Outcome::Fail(format!("writing Shutdown failed: {err}"));
            }
        } else {
            child.close_stdin();
        }
        let what = if shutdown { "Shutdown" } else { "stdin EOF" };
        match child.wait_exit(self.deadline()) {
            Err(err) => Outcome::Fail(format!("waiting for its exit failed: {err}")),
            Ok(None) => Outcome::Fail(format!(
                "still running {:?} after {what}",
                self.options.timeout
            )),
            Ok(Some(_)) if child.unread() > 0 => Outcome::Fail(format!(
                "wrote {} bytes after {what}, nothing was asked",
                child.unread()
            )),
            Ok(Some(status)) if status.code() == Some(0) => Outcome::Pass(None),
            Ok(Some(status)) => Outcome::Fail(format!(
                "{} after {what}, want status 0{}",
                describe(status),
                stderr_suffix(&child)
            )),
        }
    }

    fn hostile(&self, report: &mut Report) {
        // A valid request after the bad frame: a helper that skips the bad
        // frame instead of refusing it would answer this one.
        let then_request = frame(Kind::Request, 1, &request(OP_ECHO, b"after a bad frame"));
        let with_request = |mut bad: Vec<u8>| {
            bad.extend_from_slice(&then_request);
            bad
        };
        let request_header = frame(Kind::Request, 1, &request(OP_ECHO, b"cut short"));
        let mut oversized = raw_frame(MAGIC, VERSION, Kind::Request as u8, 1, b"");
        oversized[12..16].copy_from_slice(&(self.max_frame.saturating_add(1)).to_le_bytes());
        let cases: [(&'static str, Vec<u8>, bool); 7] = [
            // The first 7 bytes of a header, then EOF.
            (
                "hostile-truncated-header",
                request_header[..7].to_vec(),
                true,
            ),
            // A header claiming one byte more than max_frame, and no
            // payload: it must be refused on the header alone.
            ("hostile-oversized-frame", oversized, false),
            (
                "hostile-unknown-kind",
                with_request(raw_frame(MAGIC, VERSION, 0x7f, 1, b"")),
                false,
            ),
            (
                "hostile-helper-kind",
                with_request(frame(Kind::Response, 1, b"")),
                false,
            ),
            (
                "hostile-bad-magic",
                with_request(raw_frame(*b"PS", VERSION, Kind::Request as u8, 1, b"")),
                false,
            ),
            (
                "hostile-bad-version",
                with_request(raw_frame(
                    MAGIC,
                    VERSION.wrapping_add(1),
                    Kind::Request as u8,
                    1,
                    b"",
                )),
                false,
            ),
            (
                "hostile-second-bind",
                with_request(
                    [
                        frame(Kind::Bind, 0, TENANT),
                        frame(Kind::Bind, 0, b"another"),
                    ]
                    .concat(),
                ),
                false,
            ),
        ];
        for (name, bytes, then_eof) in cases {
            report.push(name, self.hostile_case(&bytes, then_eof));
        }
    }

    /// Sends `bytes` after the Hello (then EOF if `then_eof`, else stdin
    /// stays open): the helper must write nothing and exit with status 76.
    fn hostile_case(&self, bytes: &[u8], then_eof: bool) -> Outcome {
        let (mut child, _hello) = match self.start() {
            Ok(started) => started,
            Err(why) => return Outcome::Fail(why),
        };
        if let Err(err) = child.send(bytes) {
            return Outcome::Fail(format!("writing the frame failed: {err}"));
        }
        if then_eof {
            child.close_stdin();
        }
        let status = match child.wait_exit(self.deadline()) {
            Err(err) => return Outcome::Fail(format!("waiting for its exit failed: {err}")),
            Ok(None) => {
                return Outcome::Fail(format!(
                    "still running {:?} later: it did not refuse the input",
                    self.options.timeout
                ));
            }
            Ok(Some(status)) => status,
        };
        if child.unread() > 0 {
            return Outcome::Fail(format!(
                "answered ({} bytes on stdout), then {}",
                child.unread(),
                describe(status)
            ));
        }
        match status.code() {
            Some(EXIT_PROTOCOL_ERROR) => Outcome::Pass(None),
            Some(0) => Outcome::Fail(format!(
                "exited with status 0, as if the input were fine, want {EXIT_PROTOCOL_ERROR}"
            )),
            Some(code) => Outcome::Pass(Some(format!(
                "exited with status {code}, not {EXIT_PROTOCOL_ERROR}"
            ))),
            None => Outcome::Fail(format!(
                "{}, want exit status {EXIT_PROTOCOL_ERROR}{}",
                describe(status),
                stderr_suffix(&child)
            )),
        }
    }

    /// The reference `OP_OPEN` test op on `/etc/passwd`: `openat` is outside
    /// every helper's policy, so the kernel must kill the helper (SIGSYS).
    fn forbidden_syscall(&self, report: &mut Report) {
        report.push("forbidden-syscall-kills", self.forbidden_syscall_outcome());
    }

    fn forbidden_syscall_outcome(&self) -> Outcome {
        let (mut child, _hello) = match self.start() {
            Ok(started) => started,
            Err(why) => return Outcome::Fail(why),
        };
        let wire = [
            frame(Kind::Bind, 0, TENANT),
            frame(Kind::Request, 1, &request(OP_OPEN, b"/etc/passwd")),
        ]
        .concat();
        if let Err(err) = child.send(&wire) {
            return Outcome::Fail(format!("writing the request failed: {err}"));
        }
        match child.read_frame(self.deadline()) {
            Ok(reply) if reply.header.kind == Kind::Error => {
                return Outcome::Skip(format!(
                    "the helper refused test op {OP_OPEN:#04x}: {:?} (for the reference helper, pass --test-ops)",
                    String::from_utf8_lossy(&reply.payload)
                ));
            }
            Ok(reply) => {
                return Outcome::Fail(format!(
                    "answered the request to open /etc/passwd (a {:?} frame of {} bytes) instead of dying by SIGSYS",
                    reply.header.kind,
                    reply.payload.len()
                ));
            }
            Err(ReadError::Eof { partial: 0 }) => {}
            Err(err) => return Outcome::Fail(format!("{err}{}", stderr_suffix(&child))),
        }
        match child.wait_exit(self.deadline()) {
            Err(err) => Outcome::Fail(format!("waiting for its exit failed: {err}")),
            Ok(None) => Outcome::Fail("closed stdout but did not exit".into()),
            Ok(Some(status)) if status.signal() == Some(libc::SIGSYS) => Outcome::Pass(None),
            Ok(Some(status)) => Outcome::Fail(format!(
                "{}, want killed by SIGSYS{}",
                describe(status),
                stderr_suffix(&child)
            )),
        }
    }
}

/// Reads the first frame and decodes it as a Hello.
fn read_hello(child: &mut Spawned, deadline: Instant) -> Result<Hello, String> {
    let first = child.read_frame(deadline).map_err(|err| {
        let status = match child.wait_exit(Instant::now()) {
            Ok(Some(status)) => format!(" (it {})", describe(status)),
            _ => String::new(),
        };
        format!("no Hello: {err}{status}{}", stderr_suffix(child))
    })?;
    if first.header.kind != Kind::Hello {
        return Err(format!("first frame is {:?}, not Hello", first.header.kind));
    }
    Hello::decode(&first.payload).map_err(|err| format!("Hello payload is invalid: {err}"))
}

/// `/proc/PID/fd` must hold exactly 0, 1, 2 and the fds the Hello declares
/// kept (each pointing at the path it declares), though the runner leaked
/// [`child::LEAKED_FDS`] more into the spawn. (Whether a kept fd is
/// allowed at all is the launcher check's: `--allow-kept-fd`.)
fn fds_outcome(pid: u32, hello: &Hello) -> Outcome {
    let entries = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(entries) => entries,
        Err(err) => return Outcome::Fail(format!("reading /proc/{pid}/fd: {err}")),
    };
    let mut fds = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => fds.push(entry.file_name().to_string_lossy().into_owned()),
            Err(err) => return Outcome::Fail(format!("reading /proc/{pid}/fd: {err}")),
        }
    }
    fds.sort_by_key(|fd| fd.parse::<i64>().unwrap_or(i64::MAX));
    let mut want: Vec<String> = ["0", "1", "2"].map(String::from).to_vec();
    want.extend(hello.kept_fds.iter().map(|kept| kept.fd.to_string()));
    if fds != want {
        return Outcome::Fail(format!(
            "/proc/{pid}/fd holds {{{}}}, want {{{}}} ({} fds leaked into the spawn; the Hello says {} closed, {} kept)",
            fds.join(", "),
            want.join(", "),
            child::LEAKED_FDS,
            hello.fds_closed,
            hello.kept_fds.len()
        ));
    }
    for kept in &hello.kept_fds {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{}", kept.fd));
        match target {
            Ok(target) if target.as_os_str().as_encoded_bytes() == kept.path.as_slice() => {}
            Ok(target) => {
                return Outcome::Fail(format!(
                    "kept fd {}: the Hello says {:?}, /proc says {:?}",
                    kept.fd,
                    kept.path_lossy(),
                    target
                ));
            }
            Err(err) => return Outcome::Fail(format!("reading /proc/{pid}/fd/{}: {err}", kept.fd)),
        }
    }
    if hello.kept_fds.is_empty() {
        Outcome::Pass(None)
    } else {
        Outcome::Pass(Some(format!(
            "{} declared kept fds match",
            hello.kept_fds.len()
        )))
    }
}

/// The value of `name:` in a `/proc/PID/status` text, trimmed; "" if absent.
fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
        .unwrap_or("")
}

/// Whether a helper of this host can empty its bounding set: this process
/// holds `CAP_SETPCAP` effective and its exec keeps it (root, or ambient),
/// as sandpool's own check decides. Unreadable: yes (fail closed).
fn host_can_empty_bounding_set() -> bool {
    const CAP_SETPCAP: u64 = 1 << 8;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return true;
    };
    let mask = |name| u64::from_str_radix(status_field(&status, name), 16).unwrap_or(u64::MAX);
    let root = nix::unistd::geteuid().is_root() || nix::unistd::getuid().is_root();
    mask("CapEff") & CAP_SETPCAP != 0 && (root || mask("CapAmb") & CAP_SETPCAP != 0)
}

/// An error and its sources, one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// "; stderr: ..." if the helper wrote any.
fn stderr_suffix(child: &Spawned) -> String {
    let tail = child.stderr_tail();
    if tail.is_empty() {
        String::new()
    } else {
        let tail: String = tail
            .chars()
            .rev()
            .take(300)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("; stderr: {tail:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandpool_protocol::HEADER_LEN;

    #[test]
    fn usage_is_parsed() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(parse_args(args(&[]).into_iter()).is_err());
        assert!(parse_args(args(&["--timeout"]).into_iter()).is_err());
        assert!(parse_args(args(&["--bogus", "/bin/true"]).into_iter()).is_err());
        assert!(parse_args(args(&["/nonexistent/helper"]).into_iter()).is_err());
        let options = parse_args(
            args(&["--timeout", "2.5", "/bin/true", "--test-ops", "--timeout"]).into_iter(),
        )
        .expect("valid");
        assert_eq!(options.program, PathBuf::from("/bin/true"));
        assert_eq!(options.args, ["--test-ops", "--timeout"]);
        assert_eq!(options.timeout, Duration::from_millis(2500));
    }

    #[test]
    fn header_offsets_match_the_protocol() {
        let bytes = raw_frame(MAGIC, VERSION, 3, 7, b"ab");
        assert_eq!(bytes.len(), HEADER_LEN + 2);
        assert_eq!(frame(Kind::Request, 7, b"ab"), bytes);
    }
}
