//! Spawning a helper: pipes, then posix_spawn and pidfd (direct) or a
//! request to the launcher process (`server`). The one way a helper process
//! comes into existence. No unsafe code: the spawn goes through nix and
//! rustix.
//!
//! No fork anywhere: glibc's posix_spawn uses `clone(CLONE_VM | CLONE_VFORK)`,
//! so the host's memory is never copied and the child runs only glibc's own
//! async-signal-safe spawn code before `execve`; the launcher's spawn is the
//! same clone, made by its own C code. There is no `pre_exec` and no std
//! `Command` (whose uid/gid/pre_exec options silently fall back to fork).
//! Everything the child needs after exec (closing inherited fds, seccomp) it
//! does to itself.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::{Pid, pipe2};
use rustix::process::PidfdFlags;
use sandpool_protocol::{PROGRAM_ENV, SPEC_ENV};

use super::server::{ChildEnds, LaunchServer};
use crate::config::HelperConfig;
use crate::error::LaunchError;
use crate::region::HostRegion;

/// Everything posix_spawn needs, prepared once per configuration.
#[derive(Debug)]
pub(crate) struct LaunchPlan {
    /// What posix_spawn executes: the program, or its pinned image.
    program: CString,
    program_display: String,
    argv: Vec<CString>,
    envp: Vec<CString>,
    pipe_size: Option<i32>,
    region_size: Option<u64>,
    /// The sealed copy of the program that every launch executes, if pinned.
    image: Option<OwnedFd>,
    /// The uid and gid the spec asks the helper to switch to.
    ids: (Option<u32>, Option<u32>),
}

/// Copies the helper binary into a sealed memfd (no writes, no resizing,
/// seals fixed), so that every launch runs this exact image even if the file
/// on disk is replaced or upgraded while the server runs. Returns the memfd
/// and the path posix_spawn executes it by: `/proc/self/fd/N`, resolved in
/// the child, which inherits N until its exec closes it (O_CLOEXEC).
fn pin_image(program: &std::path::Path) -> Result<(OwnedFd, CString), LaunchError> {
    let err = |what: &'static str, source: std::io::Error| LaunchError::PinImage {
        program: program.display().to_string(),
        what,
        source,
    };
    let mut source = std::fs::File::open(program).map_err(|e| err("open", e))?;
    // Numbered above every fd the spawn's file actions write (0 to 3), so no
    // dup2 in the child can replace the image before the exec reads it.
    let image = sealed_memfd("sandpool-helper-image", 4, |mut file| {
        std::io::copy(&mut source, &mut file).map(drop)
    })
    .map_err(|(what, e)| err(what, e))?;
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&image));
    let path = CString::new(path).map_err(|e| err("path", std::io::Error::other(e)))?;
    Ok((image, path))
}

/// A close-on-exec memfd named `name`, filled by `fill`, then sealed
/// against every change (no writes, no resizing, seals fixed) and numbered
/// `min_fd` or above, so that a spawn's dup2 file actions onto lower
/// numbers cannot replace it before an exec reads it by its
/// `/proc/self/fd` path. On failure, the step that failed.
pub(crate) fn sealed_memfd(
    name: &str,
    min_fd: i32,
    fill: impl FnOnce(&std::fs::File) -> std::io::Result<()>,
) -> Result<OwnedFd, (&'static str, std::io::Error)> {
    let memfd = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .close_on_exec(true)
        .create(name)
        .map_err(|e| ("memfd_create", std::io::Error::other(e)))?;
    fill(memfd.as_file()).map_err(|e| ("copy", e))?;
    memfd
        .add_seals(&[
            memfd::FileSeal::SealShrink,
            memfd::FileSeal::SealGrow,
            memfd::FileSeal::SealWrite,
            memfd::FileSeal::SealSeal,
        ])
        .map_err(|e| ("seal", std::io::Error::other(e)))?;
    rustix::io::fcntl_dupfd_cloexec(memfd.as_file(), min_fd).map_err(|e| ("dup", e.into()))
}

/// A close-on-exec duplicate of `fd` numbered 4 or above: clear of the fds
/// (0 to 3) that the spawn's dup2 file actions write in the child.
pub(crate) fn lift_above_spawn_targets(fd: impl std::os::fd::AsFd) -> std::io::Result<OwnedFd> {
    rustix::io::fcntl_dupfd_cloexec(fd, 4).map_err(std::io::Error::from)
}

/// A freshly spawned helper: its pid, a pidfd, and the host's pipe ends
/// (O_CLOEXEC and O_NONBLOCK).
#[derive(Debug)]
pub(crate) struct Spawned {
    pub(crate) pid: u32,
    pub(crate) pidfd: OwnedFd,
    pub(crate) stdin: OwnedFd,
    pub(crate) stdout: OwnedFd,
    pub(crate) stderr: OwnedFd,
    pub(crate) region: Option<HostRegion>,
}

/// `NAME=VALUE`, as the bytes of one `envp` entry.
fn env_pair(name: &str, value: &OsStr) -> Vec<u8> {
    let mut pair = name.as_bytes().to_vec();
    pair.push(b'=');
    pair.extend_from_slice(value.as_bytes());
    pair
}

fn cstring(field: &'static str, bytes: &[u8]) -> Result<CString, LaunchError> {
    CString::new(bytes)
        .map_err(|_| LaunchError::Config(crate::ConfigError::new(field, "contains a NUL byte")))
}

impl LaunchPlan {
    /// Validates `config` and prepares argv and the environment: the sandbox
    /// spec plus the allowlisted host variables, nothing else.
    pub(crate) fn new(config: &HelperConfig) -> Result<LaunchPlan, LaunchError> {
        config.validate()?;
        let resolved = config.resolve_program()?;
        // A relative path is made absolute once, here, against the host's
        // working directory at Pool::new: every launch (direct, or by a
        // launcher whose own working directory is the host's when it
        // started, or a restarted one) runs the same file however the host
        // changes directory later, and the helper is told that path
        // (PROGRAM_ENV, and argv[0]).
        let absolute = if resolved.is_relative() {
            std::env::current_dir()
                .map_err(|source| LaunchError::Spawn {
                    program: config.program.display().to_string(),
                    source,
                })?
                .join(&resolved)
        } else {
            resolved.clone()
        };
        let program = cstring("program", absolute.as_os_str().as_bytes())?;
        let mut argv = vec![program.clone()];
        for arg in &config.args {
            argv.push(cstring("args", arg.as_bytes())?);
        }
        let spec = config.sandbox_spec()?;
        let mut envp = vec![
            cstring(
                "sandbox",
                format!("{SPEC_ENV}={}", spec.encode()).as_bytes(),
            )?,
            cstring("program", &env_pair(PROGRAM_ENV, absolute.as_os_str()))?,
        ];
        for name in &config.env_allowlist {
            if let Some(value) = std::env::var_os(name) {
                envp.push(cstring("env_allowlist", &env_pair(name, &value))?);
            }
        }
        for (name, value) in &config.env {
            envp.push(cstring("env", &env_pair(name, OsStr::new(value)))?);
        }
        let (image, program) = if config.pin_image {
            let (image, path) = pin_image(&absolute)?;
            (Some(image), path)
        } else {
            (None, program)
        };
        Ok(LaunchPlan {
            program,
            program_display: resolved.display().to_string(),
            argv,
            envp,
            pipe_size: config
                .pipe_size
                .map(|size| size.min(i32::MAX as u32) as i32),
            region_size: config.region_size,
            image,
            ids: (spec.uid, spec.gid),
        })
    }

    /// The uid and gid the helper was asked to switch to (resolved once,
    /// here, from `sandbox.user` / `sandbox.group`).
    pub(crate) fn ids(&self) -> (Option<u32>, Option<u32>) {
        self.ids
    }

    /// What a direct launch executes: the program, or its pinned image's
    /// `/proc/self/fd` path.
    pub(crate) fn program(&self) -> &CStr {
        &self.program
    }

    /// The program as configured, for errors.
    pub(crate) fn program_display(&self) -> &str {
        &self.program_display
    }

    /// The helper's argv (its program name first).
    pub(crate) fn argv(&self) -> &[CString] {
        &self.argv
    }

    /// The helper's whole environment.
    pub(crate) fn envp(&self) -> &[CString] {
        &self.envp
    }

    /// The pinned image, if pinned.
    pub(crate) fn image(&self) -> Option<BorrowedFd<'_>> {
        self.image.as_ref().map(AsFd::as_fd)
    }
}

/// A pipe whose ends are both O_CLOEXEC and numbered 3 or above, so that the
/// dup2 file actions onto 0, 1 and 2 can never overwrite one another even in a
/// host that closed its own stdio.
pub(crate) fn pipe(which: &'static str) -> Result<(OwnedFd, OwnedFd), LaunchError> {
    let err = |source: std::io::Error| LaunchError::Pipe { which, source };
    let (read, write) = pipe2(OFlag::O_CLOEXEC).map_err(|errno| err(errno.into()))?;
    let lift = |fd: OwnedFd| -> Result<OwnedFd, LaunchError> {
        if std::os::fd::AsRawFd::as_raw_fd(&fd) >= 3 {
            return Ok(fd);
        }
        rustix::io::fcntl_dupfd_cloexec(&fd, 3).map_err(|e| err(e.into()))
    };
    Ok((lift(read)?, lift(write)?))
}

/// Makes the host's end of a fresh pipe non-blocking: one `F_SETFL`, no
/// `F_GETFL` first (a new pipe end has no other status flag to keep, and
/// `F_SETFL` ignores the access mode).
fn set_nonblocking(fd: &OwnedFd, which: &'static str) -> Result<(), LaunchError> {
    fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(|errno: Errno| LaunchError::Pipe {
        which,
        source: errno.into(),
    })?;
    Ok(())
}

/// The fds a posix_spawn child gets: each source is dup2'd onto its target
/// number in the child, in order.
#[derive(Debug, Default)]
pub(crate) struct SpawnTargets<'a> {
    entries: Vec<(BorrowedFd<'a>, i32)>,
}

impl<'a> SpawnTargets<'a> {
    pub(crate) fn new() -> Self {
        SpawnTargets::default()
    }

    pub(crate) fn push(&mut self, source: BorrowedFd<'a>, target: i32) {
        self.entries.push((source, target));
    }
}

/// posix_spawns `program` with `targets` as its only fds besides what it
/// inherits without CLOEXEC (nothing, in sandpool), `argv` and exactly
/// `envp`; an empty signal mask, every signal at its default disposition
/// (the host may ignore SIGPIPE, a child must not inherit that), and its own
/// process group (a terminal's Ctrl-C reaches the host, which then shuts its
/// children down in order). Returns its pid and a pidfd. The one posix_spawn
/// in sandpool: direct helper launches and the launcher process both start
/// here.
pub(crate) fn posix_spawn_with(
    program: &CStr,
    display: &str,
    targets: &SpawnTargets<'_>,
    argv: &[CString],
    envp: &[CString],
) -> Result<(u32, OwnedFd), LaunchError> {
    let setup = |what| {
        move |errno: Errno| LaunchError::SpawnSetup {
            what,
            source: errno.into(),
        }
    };
    // A source numbered at or below the highest target could be overwritten
    // by an earlier dup2 in the child: such sources go through a copy
    // numbered above every target.
    let top = targets.entries.iter().map(|&(_, target)| target).max();
    let mut lifted = Vec::new();
    let mut actions = PosixSpawnFileActions::init().map_err(setup("file actions"))?;
    for &(source, target) in &targets.entries {
        let mut raw = source.as_raw_fd();
        if top.is_some_and(|top| raw <= top) {
            let copy = rustix::io::fcntl_dupfd_cloexec(source, top.unwrap_or(0) + 1)
                .map_err(|e| setup("file actions")(Errno::from_raw(e.raw_os_error())))?;
            raw = copy.as_raw_fd();
            lifted.push(copy);
        }
        actions
            .add_dup2(raw, target)
            .map_err(setup("file actions"))?;
    }
    let mut attr = PosixSpawnAttr::init().map_err(setup("attributes"))?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF
            | PosixSpawnFlags::POSIX_SPAWN_SETPGROUP,
    )
    .map_err(setup("attributes"))?;
    attr.set_sigmask(&SigSet::empty())
        .map_err(setup("attributes"))?;
    let mut defaults = SigSet::all();
    defaults.remove(Signal::SIGKILL);
    defaults.remove(Signal::SIGSTOP);
    attr.set_sigdefault(&defaults)
        .map_err(setup("attributes"))?;
    attr.set_pgroup(Pid::from_raw(0))
        .map_err(setup("attributes"))?;

    let pid =
        posix_spawn(program, &actions, &attr, argv, envp).map_err(|errno| LaunchError::Spawn {
            program: display.to_owned(),
            source: errno.into(),
        })?;
    drop(lifted);
    let raw_pid = pid.as_raw();
    let pidfd = rustix::process::Pid::from_raw(raw_pid)
        .ok_or(Errno::ESRCH)
        .map_err(|errno| std::io::Error::from_raw_os_error(errno as i32))
        .and_then(|rpid| {
            rustix::process::pidfd_open(rpid, PidfdFlags::empty()).map_err(std::io::Error::from)
        });
    match pidfd {
        Ok(pidfd) => Ok((raw_pid as u32, pidfd)),
        Err(source) => {
            // No pidfd: the child is ours and not yet reaped (sandpool requires
            // that nothing else in the host reaps its children), so its pid
            // cannot have been reused; kill and reap it by pid.
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            Err(LaunchError::Pidfd {
                pid: raw_pid as u32,
                source,
            })
        }
    }
}

/// Spawns one helper process per `plan`: directly (posix_spawn from the
/// host) or through the launcher process, with the same fds, signals,
/// process group and environment either way.
///
/// The child gets: the read end of the stdin pipe as fd 0, the write ends of
/// the stdout and stderr pipes as fds 1 and 2, the region's memfd (if any)
/// as fd 3; an empty signal mask; every signal at its default disposition;
/// its own process group; the environment of the plan and nothing else.
/// Every other fd it inherits, it closes itself at startup with one
/// `close_range`. A launch that lost its launcher is retried once, with
/// fresh pipes, on a new launcher.
pub(crate) fn spawn(
    plan: &LaunchPlan,
    server: Option<&LaunchServer>,
    deadline: Instant,
) -> Result<Spawned, LaunchError> {
    match spawn_once(plan, server, deadline) {
        Err(LaunchError::LauncherLost { pid, reason, .. }) => {
            tracing::warn!(
                launcher = pid,
                reason,
                "the launcher was lost during a launch; retrying once"
            );
            spawn_once(plan, server, deadline)
        }
        result => result,
    }
}

fn spawn_once(
    plan: &LaunchPlan,
    server: Option<&LaunchServer>,
    deadline: Instant,
) -> Result<Spawned, LaunchError> {
    let (child_stdin, host_stdin) = pipe("stdin")?;
    let (host_stdout, child_stdout) = pipe("stdout")?;
    let (host_stderr, child_stderr) = pipe("stderr")?;
    set_nonblocking(&host_stdin, "stdin")?;
    set_nonblocking(&host_stdout, "stdout")?;
    set_nonblocking(&host_stderr, "stderr")?;
    if let Some(size) = plan.pipe_size {
        for (fd, which) in [(&host_stdin, "stdin"), (&host_stdout, "stdout")] {
            fcntl(fd, FcntlArg::F_SETPIPE_SZ(size)).map_err(|errno| LaunchError::Pipe {
                which,
                source: errno.into(),
            })?;
        }
    }
    let region = plan.region_size.map(HostRegion::create).transpose()?;

    let (pid, pidfd) = match server {
        None => {
            let mut targets = SpawnTargets::new();
            targets.push(child_stdin.as_fd(), 0);
            targets.push(child_stdout.as_fd(), 1);
            targets.push(child_stderr.as_fd(), 2);
            if let Some((memfd, _)) = &region {
                // The region's memfd becomes the helper's fd 3; it maps it
                // and then closes it with every other inherited fd.
                targets.push(memfd.as_fd(), 3);
            }
            posix_spawn_with(
                &plan.program,
                &plan.program_display,
                &targets,
                &plan.argv,
                &plan.envp,
            )?
        }
        Some(server) => {
            let child = ChildEnds {
                stdin: child_stdin.as_fd(),
                stdout: child_stdout.as_fd(),
                stderr: child_stderr.as_fd(),
                region: region.as_ref().map(|(memfd, _)| memfd.as_fd()),
            };
            server.spawn(plan, &child, deadline)?
        }
    };
    // The child's ends now live in the child; close the host's copies so that
    // EOF on stdout means the helper (and only it) is gone. The host keeps
    // only its mapping of the region, not the memfd.
    drop((child_stdin, child_stdout, child_stderr));
    let region = region.map(|(_memfd, mapping)| mapping);
    Ok(Spawned {
        pid,
        pidfd,
        stdin: host_stdin,
        stdout: host_stdout,
        stderr: host_stderr,
        region,
    })
}
