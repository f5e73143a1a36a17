//! The launcher process: a small C program (`pool/launcher/launcher.c`,
//! built by `build.rs` and embedded in the library) that spawns helpers on
//! the host's behalf, so that a launch costs the same whatever the host's
//! size. A direct posix_spawn copies the host's whole fd table into the
//! child and its exec then closes every CLOEXEC fd (3-5 ms with 19,000 open
//! fds); the launcher's table holds a handful.
//!
//! - **Start:** [`LaunchServer::start`] writes the embedded program into a
//!   sealed memfd and posix_spawns it (the same no-fork path as a direct
//!   helper launch), with `/dev/null` as fds 0 to 2, one end of a
//!   `SOCK_SEQPACKET` socketpair per launcher thread as fds 3 and up (an
//!   anonymous pair: nothing else on the host can connect to it), and the
//!   pinned helper image after them. Its first act is a `close_range` over
//!   everything else. The helper's argv and environment travel on its
//!   command line; its own environment is empty.
//! - **A launch:** the host makes the helper's pipes (and region) itself,
//!   takes a free socket (one request at a time on each), and sends a
//!   16-byte request with the child ends as SCM_RIGHTS, plus the write end
//!   of a per-launch report pipe. The launcher `clone`s with
//!   `CLONE_VM | CLONE_VFORK | CLONE_PARENT | CLONE_PIDFD` (the helper is
//!   the *host's* child, reaped through its pidfd as before) and replies
//!   with the pid and the pidfd. Its threads serve the sockets in parallel.
//! - **Its death:** a launch in flight sees end of file (or its deadline
//!   passes, and the launcher is killed); the launcher is marked lost,
//!   restarted at the next launch (a warning, and
//!   `sandpool_launcher_restarts_total`), and the launch is retried once
//!   with fresh pipes. A helper the dead launcher had spawned but not
//!   reported is found through the report pipe (the child writes its pid
//!   there before its exec; end of file means every copy is closed), then
//!   killed and reaped: no orphan, no zombie. The host's death closes the
//!   sockets, and the launcher exits at end of file.
//!
//! Why the host makes the pipes, not the launcher: the host then never
//! depends on the launcher for its own ends, and a launcher that dies
//! mid-spawn cannot take with it the only record of a child it spawned.

use std::ffi::CString;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, poll};
use parking_lot::{Condvar, Mutex};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use tracing::{info, warn};

use super::process::{Process, poll_timeout};
use super::spawn::{LaunchPlan, SpawnTargets, pipe, posix_spawn_with, sealed_memfd};
use crate::error::LaunchError;

/// The launcher program, built by `build.rs`.
static LAUNCHER_PROGRAM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sandpool-launcher"));

/// The most launcher threads (and sockets) the launcher program accepts.
const MAX_THREADS: usize = 64;
/// Request flag: a region memfd comes with the pipes.
const FLAG_REGION: u32 = 1;
/// The reply's stages (`launcher.c`).
const STAGE_OK: u32 = 0;
const STAGE_REQUEST: u32 = 1;
const STAGE_CLONE: u32 = 2;
const STAGE_EXEC: u32 = 3;
const REQUEST_LEN: usize = 16;
const REPLY_LEN: usize = 24;

/// The child's ends of one launch: stdin's read end, stdout's and stderr's
/// write ends, and the region's memfd if any.
#[derive(Debug)]
pub(crate) struct ChildEnds<'a> {
    pub(crate) stdin: BorrowedFd<'a>,
    pub(crate) stdout: BorrowedFd<'a>,
    pub(crate) stderr: BorrowedFd<'a>,
    pub(crate) region: Option<BorrowedFd<'a>>,
}

/// One launcher process's life: its process, and whether it was lost.
#[derive(Debug)]
struct Generation {
    process: Process,
    pid: u32,
    lost: AtomicBool,
}

impl Generation {
    fn alive(&self) -> bool {
        !self.lost.load(Ordering::Acquire) && self.process.try_wait().is_none()
    }
}

/// One socket to one launcher thread: a request at a time.
#[derive(Debug)]
struct Channel {
    socket: OwnedFd,
    generation: Arc<Generation>,
    seq: u64,
}

#[derive(Debug, Default)]
struct State {
    current: Option<Arc<Generation>>,
    free: Vec<Channel>,
    /// Launchers started (the first one is not a restart).
    started: u64,
}

/// The host's side of the launcher process (see the module docs).
#[derive(Debug)]
pub(crate) struct LaunchServer {
    threads: usize,
    state: Mutex<State>,
    room: Condvar,
    restarts: AtomicU64,
    /// `sandpool_launcher_restarts_total`, registered at start so it reads
    /// 0 until a restart.
    restarts_metric: crate::telemetry::Counter,
}

/// Why a launch lost its launcher.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// End of file or a reset on the socket: the launcher is gone.
    Closed(&'static str),
    /// No reply by the deadline: the launcher is killed.
    Timeout,
    /// A reply that does not parse, or answers another request.
    Garbled,
    /// The socket failed otherwise.
    Io(&'static str, Errno),
}

impl Loss {
    fn describe(self) -> String {
        match self {
            Loss::Closed(during) => format!("its socket closed during {during}"),
            Loss::Timeout => "it did not answer by the launch deadline".to_owned(),
            Loss::Garbled => "it sent a malformed reply".to_owned(),
            Loss::Io(during, errno) => format!("{during} failed: {errno}"),
        }
    }
}

/// The launcher's answer to one request.
#[derive(Debug)]
struct Reply {
    pid: i32,
    error: i32,
    stage: u32,
    pidfd: Option<OwnedFd>,
}

impl LaunchServer {
    /// Starts a launcher process for `plan`. Its thread count: one per CPU
    /// (at least 2): a launcher thread is busy only from the clone until
    /// the helper's exec, so that many keep the CPUs busy with launches.
    pub(crate) fn start(plan: &LaunchPlan) -> Result<LaunchServer, LaunchError> {
        let cpus = std::thread::available_parallelism().map_or(2, usize::from);
        let server = LaunchServer {
            threads: cpus.clamp(2, MAX_THREADS),
            state: Mutex::new(State::default()),
            room: Condvar::new(),
            restarts: AtomicU64::new(0),
            restarts_metric: crate::telemetry::counter("sandpool_launcher_restarts_total", &[]),
        };
        {
            let mut state = server.state.lock();
            server.ensure_running(&mut state, plan)?;
        }
        Ok(server)
    }

    /// The running launcher's pid, if one is running.
    pub(crate) fn pid(&self) -> Option<u32> {
        let state = self.state.lock();
        state
            .current
            .as_ref()
            .filter(|generation| generation.alive())
            .map(|generation| generation.pid)
    }

    /// How many times a lost launcher was replaced.
    pub(crate) fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Spawns one helper with `child` as its fds: returns its pid and
    /// pidfd. A launch that loses its launcher fails with
    /// [`LaunchError::LauncherLost`] after any child it spawned was reaped
    /// (the caller retries once, with fresh pipes).
    pub(crate) fn spawn(
        &self,
        plan: &LaunchPlan,
        child: &ChildEnds<'_>,
        deadline: Instant,
    ) -> Result<(u32, OwnedFd), LaunchError> {
        let (report, report_child) = pipe("report")?;
        let mut channel = self.acquire(plan, deadline)?;
        let sent = channel.request(child, report_child.as_fd(), deadline);
        // The host's copy of the report pipe's write end closes now: end of
        // file on it then means the launcher and every child are past it.
        drop(report_child);
        match sent {
            Ok(reply) => {
                self.release(channel);
                finish(plan, reply)
            }
            Err(loss) => {
                let generation = Arc::clone(&channel.generation);
                self.lose(&generation);
                drop(channel);
                // Killed (if it was not dead already): reaped in moments.
                let status = generation.process.wait_timeout(Duration::from_secs(1));
                reap_unreported(&report, deadline);
                let pid = generation.pid;
                Err(LaunchError::LauncherLost {
                    pid,
                    reason: loss.describe(),
                    status,
                })
            }
        }
    }

    /// Takes a free socket of a live launcher, starting a launcher if none
    /// is running; waits (until `deadline`) while every socket is busy.
    fn acquire(&self, plan: &LaunchPlan, deadline: Instant) -> Result<Channel, LaunchError> {
        let mut state = self.state.lock();
        loop {
            self.ensure_running(&mut state, plan)?;
            if let Some(channel) = state.free.pop() {
                return Ok(channel);
            }
            if self.room.wait_until(&mut state, deadline).timed_out() {
                return Err(LaunchError::Launcher {
                    what: "waiting for a free launcher thread",
                    source: std::io::ErrorKind::TimedOut.into(),
                });
            }
        }
    }

    /// Gives a socket back, unless its launcher was lost meanwhile.
    fn release(&self, channel: Channel) {
        let mut state = self.state.lock();
        let current = state
            .current
            .as_ref()
            .is_some_and(|generation| Arc::ptr_eq(generation, &channel.generation));
        if current && channel.generation.alive() {
            state.free.push(channel);
            self.room.notify_one();
        }
    }

    /// Marks a launcher lost and kills it; the next launch starts another.
    fn lose(&self, generation: &Generation) {
        if !generation.lost.swap(true, Ordering::AcqRel) {
            generation.process.kill();
        }
        // Waiters for a socket re-check: the free ones are of a lost
        // launcher now.
        self.room.notify_all();
    }

    /// Starts a launcher if none is alive (a replaced one counts as a
    /// restart: warned and counted).
    fn ensure_running(&self, state: &mut State, plan: &LaunchPlan) -> Result<(), LaunchError> {
        if let Some(generation) = &state.current {
            if generation.alive() {
                return Ok(());
            }
            let status = generation.process.try_wait();
            warn!(
                pid = generation.pid,
                ?status,
                "the sandpool launcher process was lost; starting another"
            );
            state.free.clear();
            state.current = None;
        }
        let (generation, channels) = self.launch_launcher(plan)?;
        if state.started > 0 {
            self.restarts.fetch_add(1, Ordering::Relaxed);
            self.restarts_metric.increment(1);
        }
        state.started += 1;
        info!(
            pid = generation.pid,
            threads = self.threads,
            "sandpool launcher started"
        );
        state.free = channels;
        state.current = Some(generation);
        self.room.notify_all();
        Ok(())
    }

    fn launch_launcher(
        &self,
        plan: &LaunchPlan,
    ) -> Result<(Arc<Generation>, Vec<Channel>), LaunchError> {
        let err = |what: &'static str| {
            move |source: std::io::Error| LaunchError::LauncherStart { what, source }
        };
        let threads = self.threads;
        let mut host_ends = Vec::with_capacity(threads);
        let mut launcher_ends = Vec::with_capacity(threads);
        for _ in 0..threads {
            let (host, launcher) = rustix::net::socketpair(
                AddressFamily::UNIX,
                SocketType::SEQPACKET,
                SocketFlags::CLOEXEC,
                None,
            )
            .map_err(|e| err("socketpair")(e.into()))?;
            host_ends.push(host);
            launcher_ends.push(launcher);
        }
        // Numbered above every target of the launcher's spawn (0 to
        // 3 + threads), which it is exec'd by path past.
        let program = sealed_memfd("sandpool-launcher", 4 + threads as i32, |mut file| {
            std::io::Write::write_all(&mut file, LAUNCHER_PROGRAM)
        })
        .map_err(|(what, source)| LaunchError::LauncherStart { what, source })?;
        let devnull = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(err("open /dev/null"))?;

        // The launcher's table: /dev/null as 0 to 2, the sockets from 3, the
        // helper image after them.
        let mut targets = SpawnTargets::new();
        for target in 0..3 {
            targets.push(devnull.as_fd(), target);
        }
        for (i, end) in launcher_ends.iter().enumerate() {
            targets.push(end.as_fd(), 3 + i as i32);
        }
        let image_target = 3 + threads as i32;
        let exec_path = match plan.image() {
            Some(image) => {
                targets.push(image, image_target);
                CString::new(format!("/proc/self/fd/{image_target}"))
                    .map_err(|e| err("argv")(std::io::Error::other(e)))?
            }
            None => plan.program().to_owned(),
        };
        let keep = threads + usize::from(plan.image().is_some());
        let mut argv = vec![
            c"sandpool-launcher".to_owned(),
            number(threads),
            number(keep),
            bounding_to_keep(plan.ids()),
            exec_path,
            number(plan.argv().len()),
        ];
        argv.extend(plan.argv().iter().cloned());
        argv.extend(plan.envp().iter().cloned());
        let program_path = CString::new(format!("/proc/self/fd/{}", program.as_raw_fd()))
            .map_err(|e| err("argv")(std::io::Error::other(e)))?;
        let (pid, pidfd) =
            posix_spawn_with(&program_path, "sandpool-launcher", &targets, &argv, &[]).map_err(
                |source| match source {
                    LaunchError::Spawn { source, .. } => LaunchError::LauncherStart {
                        what: "posix_spawn",
                        source,
                    },
                    other => other,
                },
            )?;
        // The launcher holds its ends now; the host keeps only its own.
        drop(targets);
        drop((launcher_ends, program, devnull));
        let generation = Arc::new(Generation {
            process: Process::new(pid, pidfd),
            pid,
            lost: AtomicBool::new(false),
        });
        let channels = host_ends
            .into_iter()
            .map(|socket| Channel {
                socket,
                generation: Arc::clone(&generation),
                seq: 0,
            })
            .collect();
        Ok((generation, channels))
    }
}

fn number(n: usize) -> CString {
    CString::new(n.to_string()).unwrap_or_default()
}

/// The capabilities the launcher leaves in its bounding set (a hex mask):
/// none, or, for helpers that switch to a configured user or group, the
/// three their start-up needs before it empties its own set
/// (`CAP_SETGID`, `CAP_SETUID` for the switch, `CAP_SETPCAP` to drop
/// them from the bounding set). Everything else a helper exec'd by a root
/// launcher never holds, and its start-up has nothing to drop.
fn bounding_to_keep((uid, gid): (Option<u32>, Option<u32>)) -> CString {
    // <linux/capability.h>: CAP_SETGID 6, CAP_SETUID 7, CAP_SETPCAP 8.
    const SWITCH_USER: u64 = 1 << 6 | 1 << 7 | 1 << 8;
    let keep = if uid.is_some() || gid.is_some() {
        SWITCH_USER
    } else {
        0
    };
    CString::new(format!("{keep:x}")).unwrap_or_default()
}

impl Channel {
    /// Sends one request and waits for its reply.
    fn request(
        &mut self,
        child: &ChildEnds<'_>,
        report: BorrowedFd<'_>,
        deadline: Instant,
    ) -> Result<Reply, Loss> {
        self.seq += 1;
        let mut fds = vec![child.stdin, child.stdout, child.stderr, report];
        let mut flags = 0;
        if let Some(region) = child.region {
            fds.push(region);
            flags |= FLAG_REGION;
        }
        let mut header = [0u8; REQUEST_LEN];
        header[..8].copy_from_slice(&self.seq.to_ne_bytes());
        header[8..12].copy_from_slice(&flags.to_ne_bytes());
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(5))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(Loss::Io("send", Errno::ENOBUFS));
        }
        loop {
            match rustix::net::sendmsg(
                &self.socket,
                &[IoSlice::new(&header)],
                &mut control,
                SendFlags::NOSIGNAL,
            ) {
                Ok(_) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::PIPE | rustix::io::Errno::CONNRESET) => {
                    return Err(Loss::Closed("send"));
                }
                Err(errno) => return Err(Loss::Io("send", Errno::from_raw(errno.raw_os_error()))),
            }
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Loss::Timeout);
            }
            let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, poll_timeout(left)) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => break,
                Err(errno) => return Err(Loss::Io("poll", errno)),
            }
        }
        let mut buf = [0u8; REPLY_LEN + 1];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = loop {
            match rustix::net::recvmsg(
                &self.socket,
                &mut [IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
            ) {
                Ok(received) => break received,
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::CONNRESET) => return Err(Loss::Closed("receive")),
                Err(errno) => {
                    return Err(Loss::Io("receive", Errno::from_raw(errno.raw_os_error())));
                }
            }
        };
        let mut pidfd = None;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = message {
                for fd in fds {
                    // More than one fd is garbage; dropping closes it.
                    if pidfd.is_none() {
                        pidfd = Some(fd);
                    }
                }
            }
        }
        if received.bytes == 0 {
            return Err(Loss::Closed("receive"));
        }
        if received.bytes != REPLY_LEN || received.flags.contains(ReturnFlags::TRUNC) {
            return Err(Loss::Garbled);
        }
        let word = |at: usize| u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        let seq = u64::from_ne_bytes([
            buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], buf[6], buf[7],
        ]);
        if seq != self.seq {
            return Err(Loss::Garbled);
        }
        // A pid without a pidfd (CTRUNC: the host had no fd free for it) is
        // handled by `finish`, which kills and reaps by pid.
        Ok(Reply {
            pid: word(8) as i32,
            error: word(12) as i32,
            stage: word(16),
            pidfd,
        })
    }
}

/// Turns the launcher's reply into the child's pid and pidfd, or an error
/// once any child it made is reaped.
fn finish(plan: &LaunchPlan, reply: Reply) -> Result<(u32, OwnedFd), LaunchError> {
    let errno = || std::io::Error::from_raw_os_error(reply.error);
    let pid = u32::try_from(reply.pid).ok().filter(|&pid| pid > 0);
    let process = match (pid, reply.pidfd) {
        (Some(pid), Some(pidfd)) => Some((pid, pidfd)),
        (Some(pid), None) => {
            // A child exists but its pidfd did not arrive (the host is out of
            // fds): it is our unreaped child, so its pid is safe to use.
            let nix_pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(nix_pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(nix_pid, None);
            return Err(LaunchError::Pidfd {
                pid,
                source: std::io::Error::from_raw_os_error(Errno::EMFILE as i32),
            });
        }
        (None, _) => None,
    };
    match (reply.stage, process) {
        (STAGE_OK, Some((pid, pidfd))) => Ok((pid, pidfd)),
        (STAGE_EXEC, Some((pid, pidfd))) => {
            Process::new(pid, pidfd).kill_and_reap();
            Err(LaunchError::Spawn {
                program: plan.program_display().to_owned(),
                source: errno(),
            })
        }
        (STAGE_CLONE, _) => Err(LaunchError::Spawn {
            program: plan.program_display().to_owned(),
            source: errno(),
        }),
        (STAGE_REQUEST, _) => Err(LaunchError::Launcher {
            what: "the launcher refused the request",
            source: errno(),
        }),
        (_, process) => {
            if let Some((pid, pidfd)) = process {
                Process::new(pid, pidfd).kill_and_reap();
            }
            Err(LaunchError::Launcher {
                what: "the launcher's reply names no known stage",
                source: std::io::Error::from_raw_os_error(Errno::EPROTO as i32),
            })
        }
    }
}

/// After a launcher was lost mid-launch: reads the report pipe until end
/// of file (every copy of its write end is closed once the launcher is dead
/// and its children have exec'd or exited; bounded by `deadline` and a
/// second), and kills and reaps the child it names, if any. The pid comes
/// from the launcher's own code before the exec (the helper never holds the
/// pipe), and the child is this process's and unreaped, so the pid cannot
/// have been reused.
fn reap_unreported(report: &OwnedFd, deadline: Instant) {
    let until = deadline.max(Instant::now() + Duration::from_secs(1));
    let mut bytes = Vec::with_capacity(4);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            warn!("a launch's report pipe stayed open after its launcher died");
            break;
        }
        let mut fds = [PollFd::new(report.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, poll_timeout(left)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => break,
        }
        let mut buf = [0u8; 4];
        match nix::unistd::read(report, &mut buf) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(Errno::EINTR | Errno::EAGAIN) => continue,
            Err(_) => break,
        }
    }
    let Some(pid) = bytes
        .get(..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .filter(|&pid| pid > 0)
    else {
        return;
    };
    let Some(rpid) = rustix::process::Pid::from_raw(pid) else {
        return;
    };
    match rustix::process::pidfd_open(rpid, rustix::process::PidfdFlags::empty()) {
        Ok(pidfd) => {
            let status = Process::new(pid as u32, pidfd).kill_and_reap();
            warn!(
                pid,
                %status,
                "reaped a helper whose launcher died before reporting it"
            );
        }
        Err(_) => {
            let nix_pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(nix_pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(nix_pid, None);
        }
    }
}
