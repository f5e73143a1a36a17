//! One helper process: launch, verified Hello, calls, shutdown.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use sandpool_protocol::{Hello, Kind, encode_frame};
use tracing::{debug, warn};

use crate::config::HelperConfig;
use crate::error::{CallError, ExitStatus, LaunchError, ProtocolViolation};
use crate::io::{FrameReader, IoFailure, drain_tail, readable_now, write_all};
use crate::launcher::{LaunchPlan, spawn};
use crate::process::Process;
use crate::verify::verify_hello;

/// How much of a failed helper's stderr is read (the rest is discarded).
const STDERR_DRAIN_CAP: usize = 256 * 1024;
/// How much of it is kept in the error.
const STDERR_TAIL: usize = 2048;
/// How long a helper whose pipe closed gets to become reapable, whatever is
/// left of the call's deadline: its stdout closes a moment before it exits.
const EXIT_GRACE: Duration = Duration::from_millis(100);

/// Launches helpers from one configuration (validated once).
#[derive(Debug)]
pub struct Launcher {
    config: HelperConfig,
    plan: LaunchPlan,
}

impl Launcher {
    /// Validates `config` and prepares the launch (argv, environment).
    pub fn new(config: HelperConfig) -> Result<Launcher, LaunchError> {
        let plan = LaunchPlan::new(&config)?;
        Ok(Launcher { config, plan })
    }

    /// The configuration.
    pub fn config(&self) -> &HelperConfig {
        &self.config
    }

    /// Spawns a helper and waits (up to `spawn_timeout`) for a Hello that
    /// proves the startup contract. On any failure the child is killed and
    /// reaped before the error is returned.
    pub fn launch(&self) -> Result<Helper, LaunchError> {
        let started = Instant::now();
        let spawned = spawn(&self.plan)?;
        let pid = spawned.pid;
        let mut helper = Helper {
            process: Process::new(pid, spawned.pidfd),
            stdin: Some(spawned.stdin),
            stdout: spawned.stdout,
            stderr: spawned.stderr,
            reader: FrameReader::new(),
            wbuf: Vec::new(),
            hello: None,
            max_frame: self.config.max_frame,
            next_id: 1,
            bound: false,
            retired: None,
            launch_time: Duration::ZERO,
        };
        let deadline = started + self.config.spawn_timeout;
        let (header, payload) =
            match helper
                .reader
                .read_frame(&helper.stdout, deadline, helper.max_frame)
            {
                Ok(frame) => frame,
                Err(failure) => return Err(helper.launch_failed(failure, started)),
            };
        if header.kind != Kind::Hello {
            helper.process.kill_and_reap();
            return Err(LaunchError::Protocol {
                pid,
                violation: ProtocolViolation::NoHello(header.kind),
            });
        }
        let hello = match Hello::decode(&payload) {
            Ok(hello) => hello,
            Err(err) => {
                helper.process.kill_and_reap();
                return Err(LaunchError::Protocol {
                    pid,
                    violation: ProtocolViolation::Hello(err),
                });
            }
        };
        if let Err(refusal) = verify_hello(&hello, pid, &self.config.sandbox) {
            helper.process.kill_and_reap();
            warn!(pid, %refusal, "helper refused");
            return Err(LaunchError::HelloRefused { pid, refusal });
        }
        helper.launch_time = started.elapsed();
        debug!(
            pid,
            fds_closed = hello.fds_closed,
            fd_close_us = hello.fd_close_nanos / 1000,
            launch_us = helper.launch_time.as_micros() as u64,
            "helper ready"
        );
        helper.hello = Some(hello);
        Ok(helper)
    }
}

/// A running, verified helper. Calls are sequential on one handle (`&mut`).
///
/// After a timeout, a protocol violation or the helper's death the handle is
/// *retired*: the process has been killed and reaped, and every later call
/// returns [`CallError::Retired`]. Dropping the handle kills and reaps the
/// process if it is still running.
#[derive(Debug)]
pub struct Helper {
    process: Process,
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    reader: FrameReader,
    wbuf: Vec<u8>,
    hello: Option<Hello>,
    max_frame: u32,
    next_id: u64,
    bound: bool,
    retired: Option<String>,
    launch_time: Duration,
}

impl Helper {
    /// The helper's pid.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The verified Hello.
    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }

    /// Time from spawn to a verified Hello.
    pub fn launch_time(&self) -> Duration {
        self.launch_time
    }

    /// Whether an earlier failure retired this helper.
    pub fn is_retired(&self) -> bool {
        self.retired.is_some()
    }

    /// Binds this helper to a tenant (at most once; a second Bind makes the
    /// helper exit, by design).
    pub fn bind(&mut self, tenant: &[u8], deadline: Instant) -> Result<(), CallError> {
        sandpool_protocol::decode_bind(tenant).map_err(CallError::InvalidTenant)?;
        if self.bound {
            return Err(CallError::AlreadyBound { pid: self.pid() });
        }
        self.send(Kind::Bind, 0, tenant, deadline, Instant::now())?;
        self.bound = true;
        Ok(())
    }

    /// Sends `request` and waits until `deadline` for its reply.
    pub fn call(&mut self, request: &[u8], deadline: Instant) -> Result<Vec<u8>, CallError> {
        let started = Instant::now();
        let id = self.next_id;
        self.next_id += 1;
        self.send(Kind::Request, id, request, deadline, started)?;
        let (header, payload) = match self
            .reader
            .read_frame(&self.stdout, deadline, self.max_frame)
        {
            Ok(frame) => frame,
            Err(failure) => return Err(self.call_failed(failure, started)),
        };
        match header.kind {
            Kind::Response | Kind::Error if header.id != id => {
                Err(self.violation(ProtocolViolation::UnexpectedId {
                    expected: id,
                    got: header.id,
                }))
            }
            Kind::Response => Ok(payload),
            Kind::Error => match String::from_utf8(payload) {
                Ok(message) => Err(CallError::Helper(message)),
                Err(_) => Err(self.violation(ProtocolViolation::ErrorNotUtf8)),
            },
            Kind::Hello => Err(self.violation(ProtocolViolation::SecondHello)),
            // Host-to-helper kinds are refused by the decoder already.
            kind => Err(self.violation(ProtocolViolation::Unsolicited {
                kind,
                id: header.id,
            })),
        }
    }

    fn send(
        &mut self,
        kind: Kind,
        id: u64,
        payload: &[u8],
        deadline: Instant,
        started: Instant,
    ) -> Result<(), CallError> {
        if let Some(reason) = &self.retired {
            return Err(CallError::Retired {
                pid: self.pid(),
                reason: reason.clone(),
            });
        }
        // Bytes the helper sent while nothing was in flight (answering twice,
        // or before being asked) are a violation, caught before the next
        // request goes out; so is a helper that died in between.
        if self.reader.has_buffered() || readable_now(&self.stdout) {
            return Err(
                match self
                    .reader
                    .read_frame(&self.stdout, Instant::now(), self.max_frame)
                {
                    Ok((header, _)) => self.violation(ProtocolViolation::Unsolicited {
                        kind: header.kind,
                        id: header.id,
                    }),
                    Err(IoFailure::Timeout) => {
                        self.violation(ProtocolViolation::UnsolicitedPartial)
                    }
                    Err(failure) => self.call_failed(failure, started),
                },
            );
        }
        self.wbuf.clear();
        if encode_frame(kind, id, payload, self.max_frame, &mut self.wbuf).is_err() {
            return Err(CallError::RequestTooLarge {
                len: payload.len(),
                max: self.max_frame,
            });
        }
        let Some(stdin) = &self.stdin else {
            return Err(CallError::Retired {
                pid: self.pid(),
                reason: "stdin already closed".into(),
            });
        };
        match write_all(stdin.as_fd(), &self.wbuf, deadline) {
            Ok(()) => Ok(()),
            Err(failure) => Err(self.call_failed(failure, started)),
        }
    }

    /// Retires the helper after a protocol violation.
    fn violation(&mut self, violation: ProtocolViolation) -> CallError {
        self.retire(violation.to_string());
        self.process.kill_and_reap();
        CallError::Protocol {
            pid: self.pid(),
            violation,
        }
    }

    fn retire(&mut self, reason: String) {
        debug!(pid = self.pid(), %reason, "helper retired");
        self.retired = Some(reason);
        self.stdin = None;
    }

    fn stderr_tail(&self) -> String {
        String::from_utf8_lossy(&drain_tail(&self.stderr, STDERR_DRAIN_CAP, STDERR_TAIL))
            .into_owned()
    }

    /// After EOF or EPIPE: the helper is exiting (or lying). Wait briefly for
    /// its exit; if it does not exit, it closed its pipe on purpose.
    fn await_exit(&mut self) -> Option<ExitStatus> {
        self.process.wait_timeout(EXIT_GRACE)
    }

    fn call_failed(&mut self, failure: IoFailure, started: Instant) -> CallError {
        let pid = self.pid();
        match failure {
            IoFailure::Timeout => {
                self.retire("timed out".into());
                self.process.kill_and_reap();
                CallError::Timeout {
                    pid,
                    after: started.elapsed(),
                }
            }
            IoFailure::StdoutClosed | IoFailure::StdinClosed => match self.await_exit() {
                Some(status) => {
                    self.retire(status.to_string());
                    CallError::Died {
                        pid,
                        status,
                        stderr: self.stderr_tail(),
                    }
                }
                None if matches!(failure, IoFailure::StdinClosed) => {
                    self.violation(ProtocolViolation::ClosedStdin)
                }
                None => self.violation(ProtocolViolation::ClosedStdout),
            },
            IoFailure::Decode(err) => self.violation(ProtocolViolation::Frame(err)),
            IoFailure::Os(source) => {
                self.retire(source.to_string());
                self.process.kill_and_reap();
                CallError::Io { pid, source }
            }
        }
    }

    fn launch_failed(&mut self, failure: IoFailure, started: Instant) -> LaunchError {
        let pid = self.pid();
        match failure {
            IoFailure::Timeout => {
                self.process.kill_and_reap();
                LaunchError::HelloTimeout {
                    pid,
                    waited: started.elapsed(),
                    stderr: self.stderr_tail(),
                }
            }
            IoFailure::StdoutClosed | IoFailure::StdinClosed => match self.await_exit() {
                Some(status) => LaunchError::ExitedBeforeHello {
                    pid,
                    status,
                    stderr: self.stderr_tail(),
                },
                None => {
                    self.process.kill_and_reap();
                    LaunchError::Protocol {
                        pid,
                        violation: ProtocolViolation::ClosedStdout,
                    }
                }
            },
            IoFailure::Decode(err) => {
                self.process.kill_and_reap();
                LaunchError::Protocol {
                    pid,
                    violation: ProtocolViolation::Frame(err),
                }
            }
            IoFailure::Os(source) => {
                self.process.kill_and_reap();
                LaunchError::Io { pid, source }
            }
        }
    }

    /// Sends a signal to the helper through its pidfd (e.g. SIGSTOP in tests).
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> std::io::Result<()> {
        self.process.signal(signal)
    }

    /// Closes the helper's stdin (its cue to exit), waits up to `grace` for
    /// it to exit, then kills it; always reaps it. Returns how it ended.
    pub fn shutdown(mut self, grace: Duration) -> ExitStatus {
        self.stdin = None;
        match self.process.wait_timeout(grace) {
            Some(status) => status,
            None => self.process.kill_and_reap(),
        }
    }

    /// Kills and reaps the helper now.
    pub fn kill(mut self) -> ExitStatus {
        self.process.kill_and_reap()
    }
}
