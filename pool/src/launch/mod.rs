//! Launching helpers: the spawn (pipes, then posix_spawn and pidfd or a
//! request to the launcher process; `spawn`), the launcher process itself
//! (`server`), the pinned image, owning the process until it is reaped
//! (`process`), and the check of the Hello against the configuration and
//! the kernel (`verify`). [`Launcher::launch`] puts them together and hands
//! the verified helper to the reactor.

pub(crate) mod process;
mod server;
pub(crate) mod spawn;
mod verify;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sandpool_protocol::{Hello, Kind};
use tracing::{debug, warn};

use crate::config::{HelperConfig, LaunchMode};
use crate::conn::frames::{FrameReader, IoFailure};
use crate::conn::{Helper, Parts, stderr_tail};
use crate::error::{LaunchError, ProtocolViolation};
use crate::reactor::Reactor;
use crate::reactor::stderr::StderrHub;
use process::Process;
use server::LaunchServer;
use spawn::{LaunchPlan, spawn};
use verify::{Expected, ProcFiles, verify_hello};

/// How long a helper whose stdout closed before its Hello gets to become
/// reapable.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

/// Launches helpers from one configuration (validated once). Owns the
/// reactor that drives the helpers it launches (shared with them: it runs
/// while any of them or the launcher is alive), and, in
/// [`LaunchMode::Launcher`], the launcher process that spawns them (it
/// exits when this value is dropped; the helpers live on).
#[derive(Debug)]
pub struct Launcher {
    config: HelperConfig,
    plan: LaunchPlan,
    expected: Expected,
    server: Option<LaunchServer>,
    reactor: Reactor,
}

impl Launcher {
    /// Validates `config`, prepares the launch (argv, environment, pinned
    /// image), starts the launcher process (unless `launch_mode` is
    /// `Direct`) and the reactor thread.
    pub fn new(config: HelperConfig) -> Result<Launcher, LaunchError> {
        Self::with_stderr(config, None)
    }

    /// A launcher whose helpers' stderr is forwarded to the log through
    /// `hub` as it arrives (a pool's).
    pub(crate) fn with_stderr(
        config: HelperConfig,
        hub: Option<Arc<StderrHub>>,
    ) -> Result<Launcher, LaunchError> {
        let plan = LaunchPlan::new(&config)?;
        let (uid, gid) = plan.ids();
        let expected = Expected::new(uid, gid);
        let server = match config.launch_mode {
            LaunchMode::Launcher => Some(LaunchServer::start(&plan)?),
            LaunchMode::Direct => None,
        };
        let reactor = Reactor::start(hub).map_err(LaunchError::Reactor)?;
        Ok(Launcher {
            config,
            plan,
            expected,
            server,
            reactor,
        })
    }

    /// The pid of the launcher process, if one is running (none in
    /// [`LaunchMode::Direct`], or between a launcher's death and the next
    /// launch, which starts another).
    pub fn launcher_pid(&self) -> Option<u32> {
        self.server.as_ref().and_then(LaunchServer::pid)
    }

    /// How many times a lost launcher process was replaced (also the
    /// `sandpool_launcher_restarts_total` counter).
    pub fn launcher_restarts(&self) -> u64 {
        self.server.as_ref().map_or(0, LaunchServer::restarts)
    }

    /// The configuration.
    pub fn config(&self) -> &HelperConfig {
        &self.config
    }

    /// The reactor's timers, for async callers' deadlines.
    pub(crate) fn reactor_link(&self) -> crate::reactor::ReactorLink {
        self.reactor.link()
    }

    /// Sets what the reactor runs when a `notify_later` comes due.
    pub(crate) fn set_later_action(&self, action: Box<dyn Fn() + Send + Sync>) {
        self.reactor.set_later_action(action);
    }

    /// Spawns a helper and waits (up to `spawn_timeout`) for a Hello that
    /// proves the startup contract. On any failure the child is killed and
    /// reaped before the error is returned.
    pub fn launch(&self) -> Result<Helper, LaunchError> {
        self.launch_until(Instant::now() + self.config.spawn_timeout)
    }

    /// Like [`launch`](Self::launch), but gives up at `deadline` if that
    /// comes before `spawn_timeout` does.
    pub fn launch_until(&self, deadline: Instant) -> Result<Helper, LaunchError> {
        self.launch_inner(deadline).map_err(LaunchError::classify)
    }

    fn launch_inner(&self, deadline: Instant) -> Result<Helper, LaunchError> {
        let started = Instant::now();
        let deadline = deadline.min(started + self.config.spawn_timeout);
        // The launcher gets the whole spawn_timeout to answer, whatever the
        // caller's deadline: a launcher that misses it is killed as hung,
        // which a caller's tight deadline must never cause.
        let spawned = spawn(
            &self.plan,
            self.server.as_ref(),
            started + self.config.spawn_timeout,
        )?;
        let pid = spawned.pid;
        let process = Process::new(pid, spawned.pidfd);
        if let Some(nice) = self.config.nice {
            // The host's own child, so raising its niceness is always
            // allowed; a failure (it is already gone) shows at its Hello.
            let target = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw);
            if let Err(err) = rustix::process::setpriority_process(target, nice) {
                debug!(pid, %err, "setting the helper's niceness failed");
            }
        }
        // While it starts up: its /proc entries, for the check of its Hello.
        let proc = if self.config.sandbox.verify_with_proc {
            ProcFiles::open(pid)
        } else {
            Err(std::io::Error::other("the kernel check is off"))
        };
        // No spin for the Hello: it comes hundreds of microseconds after
        // the spawn, and a spin (its reason: a reply within microseconds)
        // would only burn the CPU the helper and other launches start on.
        let mut frames = FrameReader::new(Duration::ZERO);
        let first = frames.read_frame(&spawned.stdout, deadline, self.config.max_frame);
        frames.set_spin(self.config.spin_wait);
        let refuse = |process: &Process, violation| {
            process.kill_and_reap();
            LaunchError::Protocol { pid, violation }
        };
        let (header, payload) = match first {
            Ok(frame) => frame,
            Err(failure) => {
                let stderr = || stderr_tail(&spawned.stderr);
                return Err(match failure {
                    IoFailure::Timeout => {
                        process.kill_and_reap();
                        LaunchError::HelloTimeout {
                            pid,
                            waited: started.elapsed(),
                            stderr: stderr(),
                        }
                    }
                    IoFailure::StdoutClosed | IoFailure::StdinClosed => {
                        match process.wait_timeout(EXIT_GRACE) {
                            Some(status) => LaunchError::ExitedBeforeHello {
                                pid,
                                status,
                                stderr: stderr(),
                            },
                            None => refuse(&process, ProtocolViolation::ClosedStdout),
                        }
                    }
                    IoFailure::Decode(err) => refuse(&process, ProtocolViolation::Frame(err)),
                    IoFailure::Os(errno) => {
                        process.kill_and_reap();
                        LaunchError::Io {
                            pid,
                            source: errno.into(),
                        }
                    }
                });
            }
        };
        if header.kind != Kind::Hello {
            return Err(refuse(&process, ProtocolViolation::NoHello(header.kind)));
        }
        let hello = match Hello::decode(&payload) {
            Ok(hello) => hello,
            Err(err) => return Err(refuse(&process, ProtocolViolation::Hello(err))),
        };
        if let Err(refusal) = verify_hello(&hello, pid, proc, &self.config.sandbox, &self.expected)
        {
            process.kill_and_reap();
            warn!(pid, %refusal, "helper refused");
            return Err(LaunchError::HelloRefused { pid, refusal });
        }
        let launch_time = started.elapsed();
        debug!(
            pid,
            fds_closed = hello.fds_closed,
            fd_close_us = hello.fd_close_nanos / 1000,
            launch_us = launch_time.as_micros() as u64,
            "helper ready"
        );
        let parts = Parts {
            pid,
            process,
            stdin: spawned.stdin,
            stdout: spawned.stdout,
            stderr: spawned.stderr,
            frames,
            region: spawned.region,
            region_slots: self.config.region_slots,
            region_threshold: self.config.region_threshold,
            max_frame: self.config.max_frame,
            max_in_flight: self.config.max_in_flight,
            spin: self.config.spin_wait,
            address_space: self.config.sandbox.rlimits.address_space.bytes(),
        };
        // Registration fails only if epoll cannot take the fds (ENOMEM,
        // ENOSPC): the helper is dropped, which kills and reaps it.
        Helper::new(parts, hello, launch_time, &self.reactor)
            .map_err(|source| LaunchError::Register { pid, source })
    }
}
