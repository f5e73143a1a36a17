//! Spawning a helper: pipes, posix_spawn, pidfd. The one way a helper process
//! comes into existence (a launcher process can slot in behind [`spawn`]).
//! No unsafe code: the spawn goes through nix and rustix.
//!
//! No fork anywhere: glibc's posix_spawn uses `clone(CLONE_VM | CLONE_VFORK)`,
//! so the host's memory is never copied and the child runs only glibc's own
//! async-signal-safe spawn code before `execve`. There is no `pre_exec` and no
//! std `Command` (whose uid/gid/pre_exec options silently fall back to fork).
//! Everything the child needs after exec (closing inherited fds, seccomp) it
//! does to itself.

use std::ffi::{CString, OsStr};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::{Pid, pipe2};
use rustix::process::PidfdFlags;
use sandpool_protocol::SPEC_ENV;

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
    _image: Option<OwnedFd>,
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
    let image = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .close_on_exec(true)
        .create("sandpool-helper-image")
        .map_err(|e| err("memfd_create", std::io::Error::other(e)))?;
    let mut source = std::fs::File::open(program).map_err(|e| err("open", e))?;
    std::io::copy(&mut source, &mut image.as_file()).map_err(|e| err("copy", e))?;
    image
        .add_seals(&[
            memfd::FileSeal::SealShrink,
            memfd::FileSeal::SealGrow,
            memfd::FileSeal::SealWrite,
            memfd::FileSeal::SealSeal,
        ])
        .map_err(|e| err("seal", std::io::Error::other(e)))?;
    // Numbered above every fd the spawn's file actions write (0 to 3), so no
    // dup2 in the child can replace the image before the exec reads it.
    let image = lift_above_spawn_targets(image.as_file()).map_err(|e| err("dup", e))?;
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&image));
    let path = CString::new(path).map_err(|e| err("path", std::io::Error::other(e)))?;
    Ok((image, path))
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

fn cstring(field: &'static str, bytes: &[u8]) -> Result<CString, LaunchError> {
    CString::new(bytes)
        .map_err(|_| LaunchError::Config(crate::ConfigError::new(field, "contains a NUL byte")))
}

impl LaunchPlan {
    /// Validates `config` and prepares argv and the environment: the sandbox
    /// spec plus the allowlisted host variables, nothing else.
    pub(crate) fn new(config: &HelperConfig) -> Result<LaunchPlan, LaunchError> {
        config.validate()?;
        let program_bytes = config.program.as_os_str().as_bytes();
        let program = cstring("program", program_bytes)?;
        let mut argv = vec![program.clone()];
        for arg in &config.args {
            argv.push(cstring("args", arg.as_bytes())?);
        }
        let mut envp = vec![cstring(
            "sandbox",
            format!("{SPEC_ENV}={}", config.sandbox_spec().encode()).as_bytes(),
        )?];
        for name in &config.env_allowlist {
            if let Some(value) = std::env::var_os(name) {
                let mut pair = OsStr::new(name).as_bytes().to_vec();
                pair.push(b'=');
                pair.extend_from_slice(value.as_bytes());
                envp.push(cstring("env_allowlist", &pair)?);
            }
        }
        let (image, program) = if config.pin_image {
            let (image, path) = pin_image(&config.program)?;
            (Some(image), path)
        } else {
            (None, program)
        };
        Ok(LaunchPlan {
            program,
            program_display: config.program.display().to_string(),
            argv,
            envp,
            pipe_size: config
                .pipe_size
                .map(|size| size.min(i32::MAX as u32) as i32),
            region_size: config.region_size,
            _image: image,
        })
    }
}

/// A pipe whose ends are both O_CLOEXEC and numbered 3 or above, so that the
/// dup2 file actions onto 0, 1 and 2 can never overwrite one another even in a
/// host that closed its own stdio.
fn pipe(which: &'static str) -> Result<(OwnedFd, OwnedFd), LaunchError> {
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

fn set_nonblocking(fd: &OwnedFd, which: &'static str) -> Result<(), LaunchError> {
    let err = |errno: Errno| LaunchError::Pipe {
        which,
        source: errno.into(),
    };
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(err)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(err)?;
    Ok(())
}

/// Spawns one helper process per `plan`.
///
/// The child gets: the read end of the stdin pipe as fd 0, the write ends of
/// the stdout and stderr pipes as fds 1 and 2; an empty signal mask; every
/// signal at its default disposition (the host may ignore SIGPIPE, the helper
/// must not inherit that); its own process group (a terminal's Ctrl-C reaches
/// the host, which then shuts its helpers down in order); the environment of
/// the plan and nothing else. Every other host fd it inherits, it closes
/// itself at startup with one `close_range`.
pub(crate) fn spawn(plan: &LaunchPlan) -> Result<Spawned, LaunchError> {
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
    let setup = |what| {
        move |errno: Errno| LaunchError::SpawnSetup {
            what,
            source: errno.into(),
        }
    };
    let mut actions = PosixSpawnFileActions::init().map_err(setup("file actions"))?;
    for (fd, target) in [(&child_stdin, 0), (&child_stdout, 1), (&child_stderr, 2)] {
        actions
            .add_dup2(std::os::fd::AsRawFd::as_raw_fd(fd), target)
            .map_err(setup("file actions"))?;
    }
    if let Some((memfd, _)) = &region {
        // The region's memfd becomes the helper's fd 3; it maps it and then
        // closes it with every other inherited fd.
        actions
            .add_dup2(std::os::fd::AsRawFd::as_raw_fd(memfd), 3)
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

    let pid = posix_spawn(
        plan.program.as_c_str(),
        &actions,
        &attr,
        &plan.argv,
        &plan.envp,
    )
    .map_err(|errno| LaunchError::Spawn {
        program: plan.program_display.clone(),
        source: errno.into(),
    })?;
    // The child's ends now live in the child; close the host's copies so that
    // EOF on stdout means the helper (and only it) is gone. The host keeps
    // only its mapping of the region, not the memfd.
    drop((child_stdin, child_stdout, child_stderr));
    let region = region.map(|(_memfd, mapping)| mapping);

    let raw_pid = pid.as_raw();
    let pidfd = rustix::process::Pid::from_raw(raw_pid)
        .ok_or(Errno::ESRCH)
        .map_err(|errno| std::io::Error::from_raw_os_error(errno as i32))
        .and_then(|rpid| {
            rustix::process::pidfd_open(rpid, PidfdFlags::empty()).map_err(std::io::Error::from)
        });
    let pidfd = match pidfd {
        Ok(pidfd) => pidfd,
        Err(source) => {
            // No pidfd: the child is ours and not yet reaped (sandpool requires
            // that nothing else in the host reaps its children), so its pid
            // cannot have been reused; kill and reap it by pid.
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            return Err(LaunchError::Pidfd {
                pid: raw_pid as u32,
                source,
            });
        }
    };
    Ok(Spawned {
        pid: raw_pid as u32,
        pidfd,
        stdin: host_stdin,
        stdout: host_stdout,
        stderr: host_stderr,
        region,
    })
}
