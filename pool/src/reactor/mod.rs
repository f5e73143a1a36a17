//! The reactor: one epoll thread per pool (or per lone [`Launcher`]) that
//! drives every helper's pipes on behalf of callers who are not doing it
//! themselves.
//!
//! It has no deadline of its own. For each helper it reads every complete
//! reply off stdout (while it owns the reading, see `conn`), finishes
//! writing request frames that did not go out whole (EPOLLOUT), forwards
//! stderr, applies the hang rule at the moment the helper becomes overdue
//! on the reply it owes first, and, once a helper is failing, waits on its
//! pidfd to reap it before failing the calls in flight. Async callers'
//! deadlines are timers here too, so a future is woken at its deadline
//! whatever the runtime.
//!
//! Nothing here blocks: every fd is non-blocking, stdout and stdin are
//! registered one-shot (re-armed only while the reactor owns that
//! direction, so a caller reading its own reply on the inline path never
//! wakes this thread), and a helper's work is done in `Conn::service`,
//! which returns what to watch next.
//!
//! [`Launcher`]: crate::Launcher

pub(crate) mod stderr;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Waker;
use std::thread::JoinHandle;
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::PollTimeout;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use parking_lot::Mutex;
use tracing::{error, warn};

use crate::conn::{Conn, Events, Interest, earliest};
use crate::kernel_log::KernelLog;
use crate::reactor::stderr::StderrHub;

const WAKE_TOKEN: u64 = u64::MAX;
const LATER_TOKEN: u64 = u64::MAX - 1;
/// The low bits of a token name which of a helper's fds it is.
const STDOUT: u64 = 0;
const STDIN: u64 = 1;
const STDERR: u64 = 2;
const PIDFD: u64 = 3;
const KIND_BITS: u64 = 2;

/// Something another thread asks of the reactor.
enum Kick {
    /// Watch a new helper.
    Register(Arc<Conn>),
    /// Look at a helper again: its reading was handed over, a frame waits
    /// to be written, it is failing, a timer changed.
    Poke(u64),
    /// Forget a helper (its handle was dropped).
    Deregister(u64),
}

/// Timers of async callers: woken at their deadlines.
#[derive(Default)]
struct Timers {
    wakers: BTreeMap<(Instant, u64), Waker>,
    next_key: u64,
    /// When the reactor will next wake up by itself (`None`: not before an
    /// event). A timer earlier than this needs a kick.
    planned: Option<Instant>,
}

/// What runs on the reactor thread when a [`ReactorLink::notify_later`]
/// comes due.
type LaterAction = Box<dyn Fn() + Send + Sync>;

/// A notice delivered later without waking anyone now: a timerfd in the
/// reactor's epoll set, armed by the notifying thread (one
/// `timerfd_settime`, no wake-up), and the action the reactor runs when it
/// fires.
struct Later {
    timer: TimerFd,
    /// Set while the timer is armed: notices until it fires share it.
    armed: AtomicBool,
    action: Mutex<Option<LaterAction>>,
}

struct Inner {
    epoll: Epoll,
    wake: EventFd,
    later: Later,
    kicked: AtomicBool,
    kicks: Mutex<Vec<Kick>>,
    timers: Mutex<Timers>,
    next_conn: AtomicU64,
    stop: AtomicBool,
    stderr: Option<Arc<StderrHub>>,
    /// Names the syscalls of its helpers' seccomp kills.
    kernel_log: KernelLog,
}

impl Inner {
    fn run_later_action(&self) {
        if let Some(action) = &*self.later.action.lock() {
            action();
        }
    }

    fn kick(&self, kick: Kick) {
        self.kick_quietly(kick);
        self.wake_up();
    }

    /// Queues `kick` for the reactor's next turn, whatever wakes it.
    fn kick_quietly(&self, kick: Kick) {
        self.kicks.lock().push(kick);
    }

    fn wake_up(&self) {
        if !self.kicked.swap(true, Ordering::AcqRel) {
            let _ = self.wake.write(1);
        }
    }
}

/// Stops and joins the thread when the last handle goes.
struct Guard {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.wake_up();
        if let Some(thread) = self.thread.lock().take()
            && thread.thread().id() != std::thread::current().id()
            && thread.join().is_err()
        {
            error!("the sandpool reactor thread panicked");
        }
    }
}

/// A handle on the reactor. Clones share one thread; the thread stops
/// (and is joined) when the last handle is dropped.
#[derive(Clone)]
pub(crate) struct Reactor {
    inner: Arc<Inner>,
    _guard: Arc<Guard>,
}

impl std::fmt::Debug for Reactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reactor").finish_non_exhaustive()
    }
}

/// A weak link from a helper to the reactor watching it: a helper does not
/// keep the reactor's thread alive (the handles of its users do).
#[derive(Clone)]
pub(crate) struct ReactorLink(Arc<Inner>);

impl std::fmt::Debug for ReactorLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReactorLink").finish_non_exhaustive()
    }
}

impl ReactorLink {
    /// The syscall the kernel logged killing helper `pid` for (see
    /// [`KernelLog`]).
    pub(crate) fn seccomp_kill_syscall(&self, pid: u32) -> Option<String> {
        self.0.kernel_log.seccomp_kill_syscall(pid)
    }

    /// Asks the reactor to look at helper `token` again.
    pub(crate) fn poke(&self, token: u64) {
        self.0.kick(Kick::Poke(token));
    }

    /// Runs the reactor's later action (see [`Reactor::set_later_action`])
    /// `delay` from now, or with the notice already pending. Wakes nobody
    /// now: the calling thread arms a timer and goes on, and the kernel
    /// wakes the reactor when it is due. For work that must not take the
    /// CPU from the caller that asks for it.
    pub(crate) fn notify_later(&self, delay: std::time::Duration) {
        let later = &self.0.later;
        if later.armed.swap(true, Ordering::AcqRel) {
            return;
        }
        let at = Expiration::OneShot(TimeSpec::from_duration(
            delay.max(std::time::Duration::from_nanos(1)),
        ));
        if let Err(err) = later.timer.set(at, TimerSetTimeFlags::empty()) {
            // Cannot happen for a valid timerfd and delay; run it now
            // rather than never.
            warn!(%err, "arming the reactor's timer failed");
            later.armed.store(false, Ordering::Release);
            self.0.run_later_action();
        }
    }

    /// Wakes `waker` at `at`; returns the timer's key.
    pub(crate) fn add_timer(&self, at: Instant, waker: Waker) -> (Instant, u64) {
        let mut timers = self.0.timers.lock();
        let key = (at, timers.next_key);
        timers.next_key += 1;
        timers.wakers.insert(key, waker);
        let earlier = timers.planned.is_none_or(|planned| at < planned);
        drop(timers);
        if earlier {
            self.0.wake_up();
        }
        key
    }

    /// Replaces the waker of a timer that has not fired; false if it fired.
    pub(crate) fn update_timer(&self, key: (Instant, u64), waker: &Waker) -> bool {
        match self.0.timers.lock().wakers.get_mut(&key) {
            Some(old) => {
                if !old.will_wake(waker) {
                    *old = waker.clone();
                }
                true
            }
            None => false,
        }
    }

    /// Cancels a timer (no-op if it fired).
    pub(crate) fn cancel_timer(&self, key: (Instant, u64)) {
        self.0.timers.lock().wakers.remove(&key);
    }
}

impl Reactor {
    /// Starts the reactor thread. With `stderr`, helpers' stderr is
    /// forwarded to the log as it arrives.
    pub(crate) fn start(stderr: Option<Arc<StderrHub>>) -> std::io::Result<Reactor> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        epoll.add(
            wake.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN),
        )?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        epoll.add(
            timer.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, LATER_TOKEN),
        )?;
        let inner = Arc::new(Inner {
            epoll,
            wake,
            later: Later {
                timer,
                armed: AtomicBool::new(false),
                action: Mutex::new(None),
            },
            kicked: AtomicBool::new(false),
            kicks: Mutex::new(Vec::with_capacity(64)),
            timers: Mutex::new(Timers::default()),
            next_conn: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            stderr,
            kernel_log: KernelLog::open(),
        });
        let thread_inner = inner.clone();
        // A long-lived thread of its own: helpers are never spawned here,
        // and nothing here waits on anything but epoll.
        let thread = std::thread::Builder::new()
            .name("sandpool-reactor".into())
            .spawn(move || Loop::new(thread_inner).run())?;
        Ok(Reactor {
            _guard: Arc::new(Guard {
                inner: inner.clone(),
                thread: Mutex::new(Some(thread)),
            }),
            inner,
        })
    }

    /// Sets what runs on the reactor thread when a
    /// [`ReactorLink::notify_later`] comes due (the pool's: tell the keeper
    /// to refill its spares). It must not block.
    pub(crate) fn set_later_action(&self, action: LaterAction) {
        *self.inner.later.action.lock() = Some(action);
    }

    /// The stderr hub helpers forward through, if any.
    pub(crate) fn stderr(&self) -> Option<&Arc<StderrHub>> {
        self.inner.stderr.as_ref()
    }

    /// A token for a new helper (its fds' epoll tokens derive from it).
    pub(crate) fn new_token(&self) -> u64 {
        self.inner.next_conn.fetch_add(1, Ordering::Relaxed) << KIND_BITS
    }

    /// The link a helper keeps to this reactor.
    pub(crate) fn link(&self) -> ReactorLink {
        ReactorLink(self.inner.clone())
    }

    /// Starts watching `conn`: its stdout and stdin (disarmed until the
    /// reactor owns them) and its stderr if forwarded.
    pub(crate) fn register(&self, conn: Arc<Conn>) -> std::io::Result<()> {
        let token = conn.token();
        // A kill record of an earlier process with this pid, read now or
        // still unread, can never name this helper's death.
        self.inner.kernel_log.forget(conn.pid());
        // Queued first, without waking the reactor: nothing of a new helper
        // needs it yet (its stdout and stdin are added disarmed, and its
        // first call reads its own reply). The reactor takes the queue at
        // the top of its loop, after any wake-up: a later kick for this
        // helper comes after this one, and an event of its stderr (level
        // triggered) that reaches it first is passed over as unknown and
        // reported again on the next turn, once the queue is taken.
        self.inner.kick_quietly(Kick::Register(conn.clone()));
        let disarmed = EpollFlags::EPOLLONESHOT;
        let added = self
            .inner
            .epoll
            .add(conn.stdout(), EpollEvent::new(disarmed, token | STDOUT))
            .and_then(|()| {
                conn.with_stdin(|stdin| match stdin {
                    Some(fd) => self
                        .inner
                        .epoll
                        .add(fd, EpollEvent::new(disarmed, token | STDIN)),
                    None => Ok(()),
                })
            })
            .and_then(|()| match conn.stderr_stream() {
                Some(stream) => stream.with_fd(|fd| match fd {
                    Some(fd) => self
                        .inner
                        .epoll
                        .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token | STDERR)),
                    None => Ok(()),
                }),
                None => Ok(()),
            });
        if let Err(errno) = added {
            self.inner.kick(Kick::Deregister(token));
            return Err(errno.into());
        }
        Ok(())
    }

    /// Stops watching helper `token`.
    pub(crate) fn deregister(&self, token: u64) {
        self.inner.kick(Kick::Deregister(token));
    }
}

/// What the reactor knows of one helper.
struct Watched {
    conn: Arc<Conn>,
    stdout_armed: bool,
    stdin_armed: bool,
    pidfd_added: bool,
    /// The earliest hang or exit timer queued for it.
    timer: Option<Instant>,
}

/// The reactor thread's own state.
struct Loop {
    inner: Arc<Inner>,
    watched: HashMap<u64, Watched>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    chunk: Vec<u8>,
}

impl Loop {
    fn new(inner: Arc<Inner>) -> Loop {
        Loop {
            inner,
            watched: HashMap::new(),
            timers: BinaryHeap::with_capacity(64),
            chunk: vec![0; 64 * 1024],
        }
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::empty(); 256];
        let mut kicks = Vec::with_capacity(64);
        let mut due = Vec::with_capacity(16);
        loop {
            // Ready for the next wake-up first, then the checks it may be
            // for: the stop flag, then the kicks. (Checked before the flag
            // was cleared, a stop could find it still set by the wake-up
            // just handled, write nothing, and leave the reactor asleep
            // for ever while its pool waits to join it.) A swap, so that a
            // stop whose wake-up found the flag set is seen below.
            self.inner.kicked.swap(false, Ordering::AcqRel);
            if self.inner.stop.load(Ordering::Acquire) {
                break;
            }
            // Kicks before events: a helper is known before any event of
            // its fds can be handled.
            self.take_queued(&mut kicks, false);
            let timeout = self.plan();
            let n = match self.inner.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(err) => {
                    error!(%err, "the sandpool reactor's epoll failed; helpers are no longer driven");
                    return;
                }
            };
            for event in &events[..n] {
                let data = event.data();
                if data == WAKE_TOKEN {
                    let _ = self.inner.wake.read();
                    continue;
                }
                if data == LATER_TOKEN {
                    // The expiry is read first, then the timer counts as
                    // disarmed, then the action runs: a notice given before
                    // the flag clears is covered by this action, one given
                    // after it arms the timer anew. (Cleared before the
                    // read, a notice in between would arm the timer, this
                    // read could consume that expiry, and the flag would
                    // stay set with no timer pending: every later notice
                    // lost.) A non-blocking read of a timer that has not
                    // expired fails with EAGAIN, harmlessly.
                    let _ = self.inner.later.timer.wait();
                    self.inner.later.armed.store(false, Ordering::Release);
                    self.inner.run_later_action();
                    continue;
                }
                let token = data & !((1 << KIND_BITS) - 1);
                let mut ev = Events::default();
                match data & ((1 << KIND_BITS) - 1) {
                    STDOUT => {
                        if let Some(w) = self.watched.get_mut(&token) {
                            w.stdout_armed = false;
                        }
                        ev.readable = true;
                    }
                    STDIN => {
                        if let Some(w) = self.watched.get_mut(&token) {
                            w.stdin_armed = false;
                        }
                        ev.writable = true;
                    }
                    STDERR => {
                        self.pump_stderr(token);
                        continue;
                    }
                    _ => ev.exited = true,
                }
                self.service(token, ev);
            }
            let now = Instant::now();
            // Async callers whose deadlines came.
            {
                let mut timers = self.inner.timers.lock();
                while let Some(entry) = timers.wakers.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    due.push(entry.remove());
                }
            }
            for waker in due.drain(..) {
                waker.wake();
            }
            // Helpers' hang and exit timers.
            while let Some(Reverse((at, token))) = self.timers.peek().copied() {
                if at > now {
                    break;
                }
                self.timers.pop();
                let current = self.watched.get_mut(&token).and_then(|w| {
                    (w.timer == Some(at)).then(|| {
                        w.timer = None;
                    })
                });
                if current.is_some() {
                    self.service(token, Events::default());
                }
            }
        }
        // Stopping: take what is still queued (a registration is queued
        // without a wake-up, so a helper whose calls all read their own
        // replies may not be known yet; a deregistration forwards what is
        // left of its stderr), then forward what is left of every stderr,
        // and let go of every helper (a queued kick holds its connection,
        // which holds this reactor).
        self.take_queued(&mut kicks, true);
        let tokens: Vec<u64> = self.watched.keys().copied().collect();
        for token in tokens {
            self.pump_stderr(token);
        }
        self.inner.kicks.lock().clear();
    }

    /// How long epoll may sleep: until the earliest timer of any kind.
    fn plan(&mut self) -> PollTimeout {
        let helper_timer = self.timers.peek().map(|Reverse((at, _))| *at);
        let mut timers = self.inner.timers.lock();
        let async_timer = timers.wakers.first_key_value().map(|((at, _), _)| *at);
        let next = earliest(helper_timer, async_timer);
        timers.planned = next;
        drop(timers);
        match next {
            None => PollTimeout::NONE,
            Some(at) => {
                crate::launch::process::poll_timeout(at.saturating_duration_since(Instant::now()))
            }
        }
    }

    fn pump_stderr(&mut self, token: u64) {
        let (Some(hub), Some(w)) = (self.inner.stderr.as_ref(), self.watched.get(&token)) else {
            return;
        };
        if let Some(stream) = w.conn.stderr_stream() {
            // At EOF the stream closes its fd, which leaves the epoll set.
            stream.pump(hub, &mut self.chunk);
        }
    }

    /// Lets the helper do its work and re-arms what it wants watched.
    fn service(&mut self, token: u64, events: Events) {
        let Some(w) = self.watched.get_mut(&token) else {
            return;
        };
        let interest: Interest = w.conn.service(events, w.timer);
        let epoll = &self.inner.epoll;
        if interest.read && !w.stdout_armed {
            let mut event = EpollEvent::new(
                EpollFlags::EPOLLIN | EpollFlags::EPOLLONESHOT,
                token | STDOUT,
            );
            match epoll.modify(w.conn.stdout(), &mut event) {
                Ok(()) => w.stdout_armed = true,
                Err(err) => warn!(%err, pid = w.conn.pid(), "cannot watch a helper's stdout"),
            }
        }
        if interest.write && !w.stdin_armed {
            let armed = w.conn.with_stdin(|stdin| {
                let fd = stdin?;
                let mut event = EpollEvent::new(
                    EpollFlags::EPOLLOUT | EpollFlags::EPOLLONESHOT,
                    token | STDIN,
                );
                Some(epoll.modify(fd, &mut event))
            });
            match armed {
                Some(Ok(())) => w.stdin_armed = true,
                Some(Err(err)) => warn!(%err, pid = w.conn.pid(), "cannot watch a helper's stdin"),
                None => {}
            }
        }
        if interest.exit && !w.pidfd_added {
            let event = EpollEvent::new(EpollFlags::EPOLLIN, token | PIDFD);
            match epoll.add(w.conn.pidfd(), event) {
                Ok(()) => w.pidfd_added = true,
                Err(err) => warn!(%err, pid = w.conn.pid(), "cannot watch a helper's pidfd"),
            }
        }
        if !interest.exit && w.pidfd_added {
            // Reaped: a pidfd stays readable for ever.
            let _ = epoll.delete(w.conn.pidfd());
            w.pidfd_added = false;
        }
        if interest.again {
            // Frames wait in the read-ahead buffer: come back after the
            // other helpers' events.
            self.inner.kick(Kick::Poke(token));
        }
        if let Some(at) = interest.timer
            && w.timer.is_none_or(|armed| at < armed)
        {
            w.timer = Some(at);
            self.timers.push(Reverse((at, token)));
        }
    }

    /// Takes every kick queued so far, through `kicks` (kept empty between
    /// turns, for its allocation). `stopping`: pokes are passed over (the
    /// reactor services no helper any more).
    fn take_queued(&mut self, kicks: &mut Vec<Kick>, stopping: bool) {
        std::mem::swap(kicks, &mut *self.inner.kicks.lock());
        for kick in kicks.drain(..) {
            match kick {
                Kick::Poke(_) if stopping => {}
                kick => self.take(kick),
            }
        }
    }

    /// Takes one kick from the queue.
    fn take(&mut self, kick: Kick) {
        match kick {
            Kick::Register(conn) => {
                let token = conn.token();
                self.watched.insert(
                    token,
                    Watched {
                        conn,
                        stdout_armed: false,
                        stdin_armed: false,
                        pidfd_added: false,
                        timer: None,
                    },
                );
            }
            Kick::Poke(token) => self.service(token, Events::default()),
            Kick::Deregister(token) => self.forget(token),
        }
    }

    fn forget(&mut self, token: u64) {
        let Some(w) = self.watched.remove(&token) else {
            return;
        };
        let epoll = &self.inner.epoll;
        let _ = epoll.delete(w.conn.stdout());
        w.conn.with_stdin(|stdin| {
            if let Some(fd) = stdin {
                let _ = epoll.delete(fd);
            }
        });
        if w.pidfd_added {
            let _ = epoll.delete(w.conn.pidfd());
        }
        if let Some(stream) = w.conn.stderr_stream() {
            if let Some(hub) = &self.inner.stderr {
                stream.pump(hub, &mut self.chunk);
            }
            stream.with_fd(|fd| {
                if let Some(fd) = fd {
                    let _ = epoll.delete(fd);
                }
            });
        }
    }
}

#[cfg(all(test, not(sandpool_loom)))]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, mpsc};
    use std::time::{Duration, Instant};

    use super::Reactor;

    #[test]
    fn a_later_notice_runs_the_action_once_after_its_delay_and_can_be_given_again() {
        let reactor = Reactor::start(None).expect("reactor");
        let runs = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let counted = runs.clone();
        reactor.set_later_action(Box::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            let _ = tx.send(Instant::now());
        }));
        let link = reactor.link();
        let delay = Duration::from_millis(30);
        let asked = Instant::now();
        // Notices while one is pending share it.
        link.notify_later(delay);
        link.notify_later(delay);
        link.notify_later(Duration::from_millis(1));
        let ran = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the action ran");
        assert!(
            ran - asked >= delay,
            "ran {:?} after the notice",
            ran - asked
        );
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "three notices while armed run the action once"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Fired, it can be armed again.
        link.notify_later(Duration::from_millis(1));
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the action ran again");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }
}
