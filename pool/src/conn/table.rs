//! The call table: one ordered ring of the requests a helper owes replies
//! to, in the order they went on the wire (the order the helper must answer
//! them in; anything else is a protocol violation), and the hang rule.
//!
//! Pure code: no clock of its own (every method that needs the time is
//! given it), no I/O, no locks. The connection keeps it under its one lock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// One request owed a reply.
#[derive(Debug)]
pub(crate) struct Entry<C> {
    /// Its request id (see [`RequestIds`]).
    pub(crate) id: u64,
    /// Its caller's deadline.
    pub(crate) deadline: Instant,
    /// The time its caller allowed the call in all (deadline minus the
    /// call's start): the helper's budget for it, whatever part of it the
    /// caller spent waiting for room before the request was sent.
    pub(crate) budget: Duration,
    /// When it was queued for the wire.
    pub(crate) sent: Instant,
    /// When it became the first reply owed: the helper's turn to answer it.
    pub(crate) turn: Option<Instant>,
    /// The region slot granted to it, if it went through the region.
    pub(crate) slot: Option<u32>,
    /// Its caller gave up: the reply is discarded when it comes.
    pub(crate) abandoned: bool,
    /// Its caller's completion.
    pub(crate) completion: C,
}

impl<C> Entry<C> {
    /// The hang rule: when the helper, owing this reply first, is overdue
    /// on it. At its caller's deadline, or, if its turn came late (behind
    /// another caller's slow request, or after its caller waited for room
    /// in this table, under `max_helpers` or for another caller's launch),
    /// as long after its turn as its caller allowed the call in all: time
    /// the call spent waiting for other callers was never the helper's. A
    /// caller giving up changes nothing: the budget is the request's own.
    pub(crate) fn overdue_at(&self) -> Instant {
        let turn = self.turn.unwrap_or(self.sent);
        turn.checked_add(self.budget)
            .map_or(self.deadline, |late| late.max(self.deadline))
    }
}

/// At most this many requests whose callers gave up may stay owed on one
/// helper; beyond it, new calls wait as if the table were full.
pub(crate) const MAX_ABANDONED: usize = 1024;

/// The requests a helper owes replies to, oldest first: at most `capacity`
/// (`max_in_flight`) whose callers still wait, plus up to [`MAX_ABANDONED`]
/// whose callers gave up. A request whose caller gave up keeps its place
/// until its reply comes (the helper is busy with it, and its answer must
/// be matched), but no longer holds a caller's place, so a caller that
/// times out again and again is not locked out by its own past requests.
#[derive(Debug)]
pub(crate) struct CallTable<C> {
    entries: VecDeque<Entry<C>>,
    capacity: usize,
    abandoned: usize,
    /// Since when something has been owed (the table is not empty).
    owed_since: Option<Instant>,
    /// Time something was owed, summed over the table's life up to
    /// `owed_since`: the wall time the helper may have spent on calls.
    owed_total: Duration,
}

impl<C> CallTable<C> {
    pub(crate) fn new(capacity: usize) -> Self {
        CallTable {
            entries: VecDeque::with_capacity(capacity),
            capacity,
            abandoned: 0,
            owed_since: None,
            owed_total: Duration::ZERO,
        }
    }

    /// Wall time during which at least one reply was owed, up to `now`: a
    /// single-threaded helper can have spent at most this much CPU time on
    /// calls (the keeper counts the rest as idle CPU).
    pub(crate) fn owed_time(&self, now: Instant) -> Duration {
        self.owed_total
            + self
                .owed_since
                .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many more requests may be queued.
    pub(crate) fn room(&self) -> usize {
        let waiting = self.entries.len() - self.abandoned;
        let by_callers = self.capacity.saturating_sub(waiting);
        let by_total = (self.capacity + MAX_ABANDONED).saturating_sub(self.entries.len());
        by_callers.min(by_total)
    }

    /// Requests whose callers still wait for them.
    pub(crate) fn waiting(&self) -> usize {
        self.entries.len() - self.abandoned
    }

    /// Its caller gave up on `id`: it stays owed, but holds no caller's
    /// place. False if it is not owed (already answered or taken back).
    pub(crate) fn abandon(&mut self, id: u64) -> bool {
        match self.entries.iter_mut().find(|entry| entry.id == id) {
            Some(entry) if !entry.abandoned => {
                entry.abandoned = true;
                self.abandoned += 1;
                true
            }
            Some(_) => true,
            None => false,
        }
    }

    fn left(&mut self, entry: &Entry<C>, now: Instant) {
        if entry.abandoned {
            self.abandoned -= 1;
        }
        if self.entries.is_empty()
            && let Some(since) = self.owed_since.take()
        {
            self.owed_total += now.saturating_duration_since(since);
        }
    }

    /// The reply the helper owes first.
    pub(crate) fn front(&self) -> Option<&Entry<C>> {
        self.entries.front()
    }

    /// When the helper is overdue on the reply it owes first.
    pub(crate) fn front_overdue_at(&self) -> Option<Instant> {
        self.entries.front().map(Entry::overdue_at)
    }

    /// Queues a request sent at `now`, of a call that started at `started`
    /// and must end by `deadline`; it is the helper's turn at once if
    /// nothing is owed before it. The caller checked [`room`](Self::room).
    pub(crate) fn push(
        &mut self,
        id: u64,
        started: Instant,
        deadline: Instant,
        now: Instant,
        slot: Option<u32>,
        completion: C,
    ) {
        let turn = self.entries.is_empty().then_some(now);
        self.owed_since.get_or_insert(now);
        self.entries.push_back(Entry {
            id,
            deadline,
            budget: deadline.saturating_duration_since(started.min(now)),
            sent: now,
            turn,
            slot,
            abandoned: false,
            completion,
        });
    }

    /// The reply owed first has been read at `now`: its entry leaves the
    /// table and the next request's turn begins.
    pub(crate) fn pop_front(&mut self, now: Instant) -> Option<Entry<C>> {
        let entry = self.entries.pop_front()?;
        self.left(&entry, now);
        if let Some(next) = self.entries.front_mut() {
            next.turn.get_or_insert(now);
        }
        Some(entry)
    }

    /// Takes a request out that never went on the wire (its caller gave up
    /// before a byte of it was written). The order of the rest is the
    /// order they went out in, so the helper's answers still line up.
    pub(crate) fn remove(&mut self, id: u64, now: Instant) -> Option<Entry<C>> {
        let at = self.entries.iter().position(|entry| entry.id == id)?;
        let entry = self.entries.remove(at)?;
        self.left(&entry, now);
        if at == 0
            && let Some(next) = self.entries.front_mut()
        {
            next.turn.get_or_insert(now);
        }
        Some(entry)
    }

    /// Whether `id` is the reply owed first and the helper is overdue on it
    /// at `now`: its caller must wait for the verdict on the helper rather
    /// than leave.
    pub(crate) fn is_overdue_front(&self, id: u64, now: Instant) -> bool {
        self.entries
            .front()
            .is_some_and(|entry| entry.id == id && entry.overdue_at() <= now)
    }

    /// Whether `id` is still owed.
    #[cfg(test)]
    pub(crate) fn contains(&self, id: u64) -> bool {
        self.entries.iter().any(|entry| entry.id == id)
    }

    /// Empties the table (the helper failed or closed), oldest first.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = Entry<C>> + '_ {
        self.abandoned = 0;
        if let Some(since) = self.owed_since.take() {
            self.owed_total += since.elapsed();
        }
        self.entries.drain(..)
    }
}

/// Request ids: unique among the calls in flight, and unpredictable to the
/// helper. The high half counts calls (unique while fewer than 2^32 are in
/// flight); the low half is a SipHash of the count under a key the helper
/// never sees. A helper that answers a request before it is sent must guess
/// 32 random bits, and a wrong guess is a protocol violation that kills it:
/// the host need not look at the pipe before every send to catch it.
#[derive(Debug)]
pub(crate) struct RequestIds {
    count: u64,
    key: std::hash::RandomState,
}

impl RequestIds {
    pub(crate) fn new() -> Self {
        RequestIds {
            count: 0,
            key: std::hash::RandomState::new(),
        }
    }

    pub(crate) fn next(&mut self) -> u64 {
        use std::hash::BuildHasher;
        self.count = self.count.wrapping_add(1);
        let noise = self.key.hash_one(self.count) as u32;
        // Never 0: that id belongs to Hello, Bind and Shutdown.
        ((self.count << 32) | u64::from(noise)).max(1)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    #[test]
    fn owed_time_counts_the_wall_time_anything_was_owed() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut table: CallTable<()> = CallTable::new(4);
        assert_eq!(table.owed_time(at(5)), Duration::ZERO);
        table.push(1, at(10), at(1000), at(10), None, ());
        table.push(2, at(15), at(1000), at(15), None, ());
        assert_eq!(table.owed_time(at(20)), Duration::from_millis(10));
        table.pop_front(at(30));
        // Still owed: the second reply.
        assert_eq!(table.owed_time(at(40)), Duration::from_millis(30));
        table.pop_front(at(50));
        assert_eq!(table.owed_time(at(90)), Duration::from_millis(40));
        table.push(3, at(100), at(1000), at(100), None, ());
        table.remove(3, at(105));
        assert_eq!(table.owed_time(at(200)), Duration::from_millis(45));
    }

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_first_request_is_overdue_at_its_deadline() {
        let t0 = Instant::now();
        let mut table = CallTable::new(4);
        table.push(1, t0, t0 + ms(100), t0, None, ());
        assert_eq!(table.front_overdue_at(), Some(t0 + ms(100)));
        assert!(!table.is_overdue_front(1, t0 + ms(99)));
        assert!(table.is_overdue_front(1, t0 + ms(100)));
    }

    #[test]
    fn a_request_whose_turn_came_late_gets_its_whole_budget_from_its_turn() {
        let t0 = Instant::now();
        let mut table = CallTable::new(4);
        table.push(1, t0, t0 + ms(10_000), t0, None, ());
        table.push(2, t0, t0 + ms(100), t0, None, ());
        // Behind the slow one, the fast request is not overdue at its deadline.
        assert!(!table.is_overdue_front(2, t0 + ms(150)));
        let first = table.pop_front(t0 + ms(300)).unwrap();
        assert_eq!(first.id, 1);
        // Its turn began at 300 ms; it had 100 ms in all.
        assert_eq!(table.front_overdue_at(), Some(t0 + ms(400)));
        assert!(!table.is_overdue_front(2, t0 + ms(399)));
        assert!(table.is_overdue_front(2, t0 + ms(400)));
    }

    #[test]
    fn a_late_turn_never_shortens_the_deadline() {
        let t0 = Instant::now();
        let mut table = CallTable::new(4);
        table.push(1, t0, t0 + ms(50), t0, None, ());
        table.push(2, t0 + ms(10), t0 + ms(1000), t0 + ms(10), None, ());
        table.pop_front(t0 + ms(20));
        // Turn at 20 ms plus a 990 ms budget is after its deadline of 1 s.
        assert_eq!(table.front_overdue_at(), Some(t0 + ms(1010)));
        let mut table = CallTable::new(4);
        table.push(1, t0, t0 + ms(50), t0, None, ());
        table.push(2, t0, t0 + ms(1000), t0, None, ());
        table.pop_front(t0);
        assert_eq!(table.front_overdue_at(), Some(t0 + ms(1000)));
    }

    #[test]
    fn a_call_that_waited_for_room_gets_its_whole_budget_from_its_turn() {
        let t0 = Instant::now();
        let mut table = CallTable::new(1);
        // Started at 0 with 300 ms in all, sent at 250 ms after waiting for
        // room: the helper's turn begins at 250 ms and gets the 300 ms.
        table.push(1, t0, t0 + ms(300), t0 + ms(250), None, ());
        assert_eq!(table.front().unwrap().budget, ms(300));
        assert_eq!(table.front_overdue_at(), Some(t0 + ms(550)));
        assert!(!table.is_overdue_front(1, t0 + ms(300)));
        assert!(table.is_overdue_front(1, t0 + ms(550)));
    }

    #[test]
    fn removing_the_front_starts_the_next_turn() {
        let t0 = Instant::now();
        let mut table = CallTable::new(4);
        table.push(1, t0, t0 + ms(100), t0, Some(0), ());
        table.push(2, t0, t0 + ms(100), t0, None, ());
        table.push(3, t0, t0 + ms(100), t0, None, ());
        assert!(table.remove(2, t0 + ms(5)).is_some());
        assert!(!table.contains(2));
        assert!(table.remove(2, t0).is_none());
        let removed = table.remove(1, t0 + ms(50)).unwrap();
        assert_eq!(removed.slot, Some(0));
        assert_eq!(table.front().unwrap().id, 3);
        assert_eq!(table.front_overdue_at(), Some(t0 + ms(150)));
    }

    #[test]
    fn abandoned_requests_stay_owed_but_free_their_callers_place() {
        let t0 = Instant::now();
        let mut table = CallTable::new(2);
        table.push(1, t0, t0, t0, None, ());
        table.push(2, t0, t0, t0, None, ());
        assert_eq!(table.room(), 0);
        assert!(table.abandon(1));
        assert!(table.abandon(1), "abandoning twice counts once");
        assert_eq!((table.room(), table.waiting(), table.len()), (1, 1, 2));
        assert!(!table.abandon(9));
        // Its reply still comes first, and then it is gone.
        let entry = table.pop_front(t0).unwrap();
        assert!(entry.abandoned);
        assert_eq!((table.room(), table.waiting()), (1, 1));
        // At most MAX_ABANDONED pile up.
        let mut table = CallTable::new(1);
        for id in 0..MAX_ABANDONED as u64 {
            table.push(id, t0, t0, t0, None, ());
            table.abandon(id);
        }
        assert_eq!(table.room(), 1);
        table.push(9999, t0, t0, t0, None, ());
        assert_eq!(table.room(), 0);
        table.abandon(9999);
        assert_eq!(table.room(), 0, "the total is bounded too");
        table.remove(0, t0);
        assert_eq!(table.room(), 1);
    }

    #[test]
    fn room_counts_requests_in_flight() {
        let t0 = Instant::now();
        let mut table = CallTable::new(2);
        assert_eq!(table.room(), 2);
        table.push(1, t0, t0, t0, None, ());
        table.push(2, t0, t0, t0, None, ());
        assert_eq!(table.room(), 0);
        assert_eq!(table.drain().count(), 2);
        assert!(table.is_empty());
        assert_eq!(table.room(), 2);
    }

    #[test]
    fn request_ids_are_unique_nonzero_and_count_in_the_high_half() {
        let mut ids = RequestIds::new();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert_eq!(a >> 32, 1);
        assert_eq!(b >> 32, 2);
        assert!(a != 0 && b != 0);
    }

    proptest! {
        /// Whatever the interleaving of sends, replies and removals, the
        /// table answers in send order, every front has a turn no earlier
        /// than its send, and nothing is lost or duplicated.
        #[test]
        fn replies_come_back_in_send_order(ops in proptest::collection::vec((0u8..3, 0u64..50, 1u64..500), 1..60)) {
            let t0 = Instant::now();
            let mut table = CallTable::new(8);
            let mut model: VecDeque<u64> = VecDeque::new();
            let mut next_id = 1u64;
            let mut clock = 0u64;
            for (op, pick, budget) in ops {
                clock += 1;
                let now = t0 + ms(clock);
                match op {
                    0 if table.room() > 0 => {
                        table.push(next_id, now, now + ms(budget), now, None, ());
                        model.push_back(next_id);
                        next_id += 1;
                    }
                    1 => {
                        let got = table.pop_front(now).map(|e| e.id);
                        prop_assert_eq!(got, model.pop_front());
                    }
                    _ => {
                        if let Some(&id) = model.get(pick as usize % model.len().max(1)) {
                            prop_assert_eq!(table.remove(id, now).map(|e| e.id), Some(id));
                            model.retain(|m| *m != id);
                        }
                    }
                }
                prop_assert_eq!(table.len(), model.len());
                if let Some(front) = table.front() {
                    prop_assert_eq!(Some(front.id), model.front().copied());
                    let turn = front.turn.unwrap();
                    prop_assert!(turn >= front.sent);
                    prop_assert!(front.overdue_at() >= front.deadline);
                }
            }
        }
    }
}
