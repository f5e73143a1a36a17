//! One call's completion: the meeting point of the party that reads the
//! reply (the reactor, or a caller on the inline path) and the caller that
//! waits for it (a blocked thread or an async task).
//!
//! Its fate is one state word changed by compare-and-swap, as in
//! crossbeam-channel's `Context::try_select`:
//!
//! ```text
//!   WAITING --complete--> READY | FAILED   (the reply or the helper's failure)
//!   WAITING --abandon---> ABANDONED        (the caller's deadline, or a dropped future)
//! ```
//!
//! Exactly one transition out of `WAITING` wins, so a reply and a timeout
//! can never both be taken: a caller that abandons after the reply was
//! stored gets the reply instead, and a completer that comes after the
//! caller gave up gets its value back (the reply is discarded). The value
//! is stored before the swap that publishes it, and read only after the
//! swap has been seen. A waiter registers its `Thread` or `Waker` and then
//! looks at the state again, and a completer wakes only after its swap, so
//! no wake-up is lost. The waiter never has to work out from anything else
//! why it woke.
//!
//! Under `--cfg sandpool_loom` the atomics, locks and threads are loom's, and
//! `tests::loom_*` explore every interleaving of a completer and a waiter.

use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::conn::sync::{AtomicU8, Mutex, Ordering, Thread, lock};

const WAITING: u8 = 0;
const READY: u8 = 1;
const FAILED: u8 = 2;
const ABANDONED: u8 = 3;

/// Who to wake when the call completes.
#[derive(Debug)]
enum Waiter {
    Thread(Thread),
    Waker(Waker),
}

/// The completion of one call.
#[derive(Debug)]
pub(crate) struct Completion<T> {
    state: AtomicU8,
    value: Mutex<Option<T>>,
    waiter: Mutex<Option<Waiter>>,
}

impl<T> Default for Completion<T> {
    fn default() -> Self {
        Completion {
            state: AtomicU8::new(WAITING),
            value: Mutex::new(None),
            waiter: Mutex::new(None),
        }
    }
}

impl<T> Completion<T> {
    /// A completion whose call is waiting.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Readies a used completion for another call. Only its owner may, when
    /// nobody else holds it any more (the pool of completions checks that).
    pub(crate) fn reset(&self) {
        *lock(&self.value) = None;
        *lock(&self.waiter) = None;
        self.state.store(WAITING, Ordering::Release);
    }

    /// Completes the call with `value` (`failed`: the helper failed) and
    /// wakes its waiter. `Err(value)` if the caller had given up (or the
    /// call was already completed): the value is handed back, to be dropped.
    pub(crate) fn complete(&self, value: T, failed: bool) -> Result<(), T> {
        // The value lock orders completers (sandpool has one per call, but
        // the state must hold regardless) and is held across the swap.
        let mut slot = lock(&self.value);
        if self.state.load(Ordering::Acquire) != WAITING {
            return Err(value);
        }
        *slot = Some(value);
        let to = if failed { FAILED } else { READY };
        match self
            .state
            .compare_exchange(WAITING, to, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                drop(slot);
                let waiter = lock(&self.waiter).take();
                match waiter {
                    Some(Waiter::Thread(thread)) => thread.unpark(),
                    Some(Waiter::Waker(waker)) => waker.wake(),
                    None => {}
                }
                Ok(())
            }
            // The caller gave up between the check and the swap: nobody
            // will take the value.
            Err(_) => match slot.take() {
                Some(value) => Err(value),
                None => Ok(()),
            },
        }
    }

    /// The value, if the call has completed (taken once).
    pub(crate) fn try_take(&self) -> Option<T> {
        match self.state.load(Ordering::Acquire) {
            READY | FAILED => lock(&self.value).take(),
            _ => None,
        }
    }

    /// Whether the call has completed (its value may have been taken).
    pub(crate) fn is_done(&self) -> bool {
        matches!(self.state.load(Ordering::Acquire), READY | FAILED)
    }

    /// Gives up on the call. `None` if that won (a value that comes later
    /// is handed back to its completer); `Some(value)` if the call had
    /// completed first: the caller takes the value after all.
    pub(crate) fn abandon(&self) -> Option<T> {
        match self
            .state
            .compare_exchange(WAITING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => None,
            Err(_) => lock(&self.value).take(),
        }
    }

    /// Polls from an async task: the value, or `Pending` with the task's
    /// waker registered.
    pub(crate) fn poll_take(&self, cx: &mut Context<'_>) -> Poll<T> {
        if let Some(value) = self.try_take() {
            return Poll::Ready(value);
        }
        {
            let mut waiter = lock(&self.waiter);
            match &*waiter {
                Some(Waiter::Waker(waker)) if waker.will_wake(cx.waker()) => {}
                _ => *waiter = Some(Waiter::Waker(cx.waker().clone())),
            }
        }
        // Registered before this second look: a completion that came in
        // between is seen here, one that comes later wakes the task.
        match self.try_take() {
            Some(value) => Poll::Ready(value),
            None => Poll::Pending,
        }
    }

    /// [`wait_until_with`](Self::wait_until_with) with nothing to do
    /// while it spins.
    #[cfg(test)]
    pub(crate) fn wait_until(&self, deadline: Instant, spin: Duration) -> Option<T> {
        self.wait_until_with(deadline, spin, || {})
    }

    /// Blocks the calling thread until the call completes or `deadline`
    /// passes (`None`; the call is still waiting: abandon it or wait
    /// again). Spins for `spin` first, yielding the CPU, so that a reply
    /// that comes within microseconds costs no sleep and no wake-up; runs
    /// `meanwhile` on every turn of the spin, before the yield (a waiter
    /// reads what has arrived).
    pub(crate) fn wait_until_with(
        &self,
        deadline: Instant,
        spin: Duration,
        mut meanwhile: impl FnMut(),
    ) -> Option<T> {
        if let Some(value) = self.try_take() {
            return Some(value);
        }
        if !spin.is_zero() {
            let until = Instant::now() + spin;
            while Instant::now() < until {
                meanwhile();
                if let Some(value) = self.try_take() {
                    return Some(value);
                }
                crate::conn::sync::yield_now();
                if let Some(value) = self.try_take() {
                    return Some(value);
                }
            }
        }
        *lock(&self.waiter) = Some(Waiter::Thread(crate::conn::sync::current()));
        loop {
            if let Some(value) = self.try_take() {
                return Some(value);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            crate::conn::sync::park_timeout(deadline - now);
        }
    }
}

#[cfg(all(test, not(sandpool_loom)))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use super::*;

    #[test]
    fn a_completed_value_is_taken_once() {
        let c = Completion::new();
        assert_eq!(c.try_take(), None::<u32>);
        assert_eq!(c.complete(7, false), Ok(()));
        assert!(c.is_done());
        assert_eq!(c.try_take(), Some(7));
        assert_eq!(c.try_take(), None);
        // A second completion of the same call is refused.
        assert_eq!(c.complete(8, true), Err(8));
    }

    #[test]
    fn abandon_then_complete_hands_the_value_back() {
        let c = Completion::new();
        assert_eq!(c.abandon(), None);
        assert_eq!(c.complete(1u32, false), Err(1));
        assert_eq!(c.try_take(), None);
    }

    #[test]
    fn complete_then_abandon_gives_the_caller_the_value() {
        let c = Completion::new();
        c.complete(5u32, true).unwrap();
        assert_eq!(c.abandon(), Some(5));
    }

    #[test]
    fn reset_makes_a_completion_reusable() {
        let c = Completion::new();
        c.complete(1u32, false).unwrap();
        assert_eq!(c.try_take(), Some(1));
        c.reset();
        assert!(!c.is_done());
        c.complete(2, false).unwrap();
        assert_eq!(c.try_take(), Some(2));
    }

    #[test]
    fn wait_until_times_out_and_then_abandons() {
        let c = Completion::<u32>::new();
        let started = Instant::now();
        let deadline = started + Duration::from_millis(30);
        assert_eq!(c.wait_until(deadline, Duration::ZERO), None);
        assert!(Instant::now() >= deadline);
        assert_eq!(c.abandon(), None);
    }

    #[test]
    fn a_blocked_thread_is_woken_by_completion() {
        let c = Arc::new(Completion::<u32>::new());
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || {
                c.wait_until(Instant::now() + Duration::from_secs(30), Duration::ZERO)
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        c.complete(9, false).unwrap();
        assert_eq!(waiter.join().unwrap(), Some(9));
    }

    struct CountWakes(AtomicUsize);
    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_task_is_woken_once_and_then_ready() {
        let wakes = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let c = Completion::<u32>::new();
        assert!(c.poll_take(&mut cx).is_pending());
        assert!(c.poll_take(&mut cx).is_pending());
        c.complete(3, false).unwrap();
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(c.poll_take(&mut cx), Poll::Ready(3));
    }
}

#[cfg(all(test, sandpool_loom))]
mod tests {
    use loom::sync::Arc;

    use super::*;

    /// A completer and a caller that gives up race: exactly one wins, and
    /// the value is never both taken and handed back, nor lost.
    #[test]
    fn loom_complete_races_abandon() {
        loom::model(|| {
            let c = Arc::new(Completion::<u32>::new());
            let completer = {
                let c = c.clone();
                loom::thread::spawn(move || c.complete(1, false))
            };
            let taken = c.abandon();
            let handed_back = completer.join().unwrap_or(Ok(())).err();
            // Exactly one side ends up with the value.
            assert!(taken.is_some() != handed_back.is_some());
        });
    }

    /// A thread that waits for its completion is always woken: loom fails
    /// the model if the waiter could park for ever.
    #[test]
    fn loom_a_waiter_is_never_left_asleep() {
        loom::model(|| {
            let c = Arc::new(Completion::<u32>::new());
            let waiter = {
                let c = c.clone();
                loom::thread::spawn(move || {
                    let far = Instant::now() + Duration::from_secs(3600);
                    c.wait_until(far, Duration::ZERO)
                })
            };
            let _ = c.complete(2, true);
            assert_eq!(waiter.join().ok().flatten(), Some(2));
        });
    }

    /// Two completers (a reply and the helper's failure, which never both
    /// own one call in sandpool, but the state must still hold): one wins.
    #[test]
    fn loom_only_one_completion_wins() {
        loom::model(|| {
            let c = Arc::new(Completion::<u32>::new());
            let other = {
                let c = c.clone();
                loom::thread::spawn(move || c.complete(1, false).is_ok())
            };
            let mine = c.complete(2, true).is_ok();
            let theirs = other.join().unwrap_or(false);
            assert!(mine != theirs || !mine);
            assert!(mine || theirs);
            assert!(c.try_take().is_some());
        });
    }
}
