//! Spawning a helper: pipes, posix_spawn, pidfd. The one way a helper process
//! comes into existence (a launcher process can slot in behind [`spawn`]).
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
    let err = |what: &str, detail: String| LaunchError::PinImage {
        program: program.display().to_string(),
        reason: format!("{what}: {detail}"),
    };
    let image = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .close_on_exec(true)
        .create("sandpool-helper-image")
        .map_err(|e| err("memfd_create", e.to_string()))?;
    let mut source = std::fs::File::open(program).map_err(|e| err("open", e.to_string()))?;
    std::io::copy(&mut source, &mut image.as_file()).map_err(|e| err("copy", e.to_string()))?;
    image
        .add_seals(&[
            memfd::FileSeal::SealShrink,
            memfd::FileSeal::SealGrow,
            memfd::FileSeal::SealWrite,
            memfd::FileSeal::SealSeal,
        ])
        .map_err(|e| err("seal", e.to_string()))?;
    // Numbered above every fd the spawn's file actions write (0 to 3), so no
    // dup2 in the child can replace the image before the exec reads it.
    let image = lift_above_spawn_targets(image.as_file()).map_err(|e| err("dup", e.to_string()))?;
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&image));
    let path = CString::new(path).map_err(|e| err("path", e.to_string()))?;
    Ok((image, path))
}

/// A close-on-exec duplicate of `fd` numbered 4 or above: clear of the fds
/// (0 to 3) that the spawn's dup2 file actions write in the child.
fn lift_above_spawn_targets(fd: impl std::os::fd::AsFd) -> std::io::Result<OwnedFd> {
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

/// The host's mapping of a helper's shared region: a memfd sealed against
/// shrinking and growing (a hostile helper cannot truncate it under the
/// host's feet), mapped shared and read-write. Accessed only by copying
/// bytes in and out, never through references: the helper can change the
/// bytes at any moment, so the host copies them out before it looks at them.
#[derive(Debug)]
pub(crate) struct HostRegion {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value and only accessed by raw byte
// copies; callers serialise their use of it (the helper's region lock).
#[allow(unsafe_code)]
unsafe impl Send for HostRegion {}
// SAFETY: as for Send: `&HostRegion` only offers byte copies, whose
// interleaving the region lock orders.
#[allow(unsafe_code)]
unsafe impl Sync for HostRegion {}

impl HostRegion {
    /// Creates the sealed memfd of `size` bytes and maps it; returns the
    /// memfd (numbered 4 or above, for the dup2 onto the helper's fd 3).
    fn create(size: u64) -> Result<(OwnedFd, HostRegion), LaunchError> {
        let err = |what: &str, detail: String| LaunchError::Region {
            reason: format!("{what}: {detail}"),
        };
        let len = usize::try_from(size)
            .ok()
            .and_then(std::num::NonZeroUsize::new)
            .ok_or_else(|| err("size", size.to_string()))?;
        let memfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .close_on_exec(true)
            .create("sandpool-region")
            .map_err(|e| err("memfd_create", e.to_string()))?;
        memfd
            .as_file()
            .set_len(size)
            .map_err(|e| err("ftruncate", e.to_string()))?;
        memfd
            .add_seals(&[
                memfd::FileSeal::SealShrink,
                memfd::FileSeal::SealGrow,
                memfd::FileSeal::SealSeal,
            ])
            .map_err(|e| err("seal", e.to_string()))?;
        // SAFETY: a fresh mapping chosen by the kernel (no address hint), so
        // it aliases nothing Rust knows about; the memfd is sealed against
        // shrinking, so no page can vanish under the mapping (no SIGBUS).
        #[allow(unsafe_code)]
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                len,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                memfd.as_file(),
                0,
            )
        }
        .map_err(|e| err("mmap", e.to_string()))?;
        let region = HostRegion {
            ptr: ptr.cast(),
            len: len.get(),
        };
        let memfd =
            lift_above_spawn_targets(memfd.as_file()).map_err(|e| err("dup", e.to_string()))?;
        Ok((memfd, region))
    }

    pub(crate) fn len(&self) -> u64 {
        self.len as u64
    }

    fn range(&self, offset: u64, len: u64) -> Option<usize> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        (end <= self.len).then_some(start)
    }

    /// Copies `bytes` to `offset`; false if that leaves the region.
    pub(crate) fn write(&self, offset: u64, bytes: &[u8]) -> bool {
        let Some(start) = self.range(offset, bytes.len() as u64) else {
            return false;
        };
        // SAFETY: the destination lies within the mapping (checked) and
        // cannot overlap `bytes`, which is this process's own memory. The
        // helper may read those bytes meanwhile; it gets whatever it gets,
        // and only from the request half, which is not granted to it yet.
        #[allow(unsafe_code)]
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.as_ptr().wrapping_add(start),
                bytes.len(),
            )
        };
        true
    }

    /// Copies `len` bytes at `offset` out into a new buffer. The caller has
    /// bounds-checked the range against the response half; a range outside
    /// the mapping is refused anyway (EFAULT), and a buffer that cannot be
    /// allocated is an error (ENOMEM), never an abort of the host.
    pub(crate) fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, Errno> {
        let start = self.range(offset, len).ok_or(Errno::EFAULT)?;
        let count = len as usize;
        let mut out = Vec::new();
        out.try_reserve_exact(count).map_err(|_| Errno::ENOMEM)?;
        // SAFETY: the source lies within the mapping (checked) and the
        // destination is the reserved, unaliased spare capacity of `out`,
        // `count` bytes long. The helper, another process, may be writing
        // the source bytes during the copy: Rust's memory model cannot
        // express a writer in another process, so the copy is treated as
        // producing arbitrary bytes, which is all `u8` needs, and the bytes
        // are only interpreted after they have landed in this private buffer.
        #[allow(unsafe_code)]
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().wrapping_add(start),
                out.as_mut_ptr(),
                count,
            )
        };
        // SAFETY: the copy above initialised exactly `count` bytes of the
        // capacity reserved for them.
        #[allow(unsafe_code)]
        unsafe {
            out.set_len(count)
        };
        Ok(out)
    }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `create`, unmapped once, here;
        // it was only ever accessed by copies, so nothing borrows it.
        #[allow(unsafe_code)]
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
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
    let err = |source| LaunchError::Pipe { which, source };
    let (read, write) = pipe2(OFlag::O_CLOEXEC).map_err(err)?;
    let lift = |fd: OwnedFd| -> Result<OwnedFd, LaunchError> {
        if std::os::fd::AsRawFd::as_raw_fd(&fd) >= 3 {
            return Ok(fd);
        }
        rustix::io::fcntl_dupfd_cloexec(&fd, 3).map_err(|e| err(Errno::from_raw(e.raw_os_error())))
    };
    Ok((lift(read)?, lift(write)?))
}

fn set_nonblocking(fd: &OwnedFd, which: &'static str) -> Result<(), LaunchError> {
    let err = |source| LaunchError::Pipe { which, source };
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
            fcntl(fd, FcntlArg::F_SETPIPE_SZ(size))
                .map_err(|source| LaunchError::Pipe { which, source })?;
        }
    }

    let region = plan.region_size.map(HostRegion::create).transpose()?;
    let setup = |what| move |source| LaunchError::SpawnSetup { what, source };
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
    .map_err(|source| LaunchError::Spawn {
        program: plan.program_display.clone(),
        source,
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
