//! The callers' side of a connection: waiting for room, putting frames on
//! the wire, the inline path, waiting for a completion (a thread or a
//! task), leaving at the deadline, cancelling.

use std::future::{Future, poll_fn};
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use event_listener::Listener;
use nix::poll::PollFlags;
use sandpool_protocol::{
    HEADER_LEN, Header, Kind, REGION_REQUEST_LEN, RegionRef, RegionRequest, SmallFrame,
};
use tracing::error;

use super::completion::Completion;
use super::frames::{FrameReader, IoFailure, wait_ready, write_now};
use super::{CallResult, Conn, Done, Health, OutFrame, Reading, State};
use crate::error::{CallError, ExitStatus, ProtocolViolation, RetireReason};
use crate::reactor::ReactorLink;

/// At most this many frames (two slices each, and a held Bind) in one
/// `writev`, well within IOV_MAX (1024).
const FRAMES_PER_WRITEV: usize = 256;
/// A caller whose own request is the one overdue waits for the reactor's
/// verdict in steps of this, and gives up waiting (a bug: the reactor
/// judges at once) after `VERDICT_MAX`.
const VERDICT_STEP: Duration = Duration::from_millis(50);
const VERDICT_MAX: Duration = Duration::from_secs(10);

/// One request on its way: what the caller gave, and what queueing it made.
struct Outgoing<'r> {
    request: &'r [u8],
    through_region: bool,
    id: u64,
    head: [u8; HEADER_LEN],
    /// The `RequestInRegion` payload, for a request through the region.
    region_ref: [u8; sandpool_protocol::REGION_REQUEST_LEN],
}

impl<'r> Outgoing<'r> {
    fn new(request: &'r [u8], through_region: bool) -> Self {
        Outgoing {
            request,
            through_region,
            id: 0,
            head: [0; HEADER_LEN],
            region_ref: [0; sandpool_protocol::REGION_REQUEST_LEN],
        }
    }

    fn payload(&self) -> &[u8] {
        if self.through_region {
            &self.region_ref
        } else {
            self.request
        }
    }

    /// A copy of the frame from byte `at` on.
    fn frame_from(&self, at: usize) -> Vec<u8> {
        let payload = self.payload();
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len() - at);
        bytes.extend_from_slice(&self.head[at.min(HEADER_LEN)..]);
        bytes.extend_from_slice(&payload[at.saturating_sub(HEADER_LEN)..]);
        bytes
    }
}

/// What a send left to its caller.
struct Sent {
    /// The stdout reader: this caller reads its own replies (inline path).
    inline: Option<FrameReader>,
    /// Its frame went out in part; it finishes writing it.
    partial: Option<Partial>,
}

/// A caller's own frame that went out in part.
struct Partial {
    fd: Arc<std::os::fd::OwnedFd>,
    /// Bytes of the frame already written.
    offset: usize,
}

/// A call whose request has been queued: waits for its completion.
/// Dropped before it finished (a cancelled future, a caller that left),
/// it cancels the call.
pub(super) struct Ticket<'c> {
    conn: &'c Conn,
    id: u64,
    completion: Option<Arc<Completion<CallResult>>>,
}

impl Ticket<'_> {
    fn completion(&self) -> &Completion<CallResult> {
        match &self.completion {
            Some(completion) => completion,
            None => unreachable!("a ticket holds its completion until it finishes"),
        }
    }

    /// The call is over with `result`: the completion goes back for reuse.
    fn finish(mut self, result: CallResult) -> CallResult {
        if let Some(completion) = self.completion.take() {
            self.conn.recycle(completion);
        }
        result
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Some(completion) = self.completion.take() {
            self.conn.cancel(self.id, &completion);
        }
    }
}

/// Fails every request of a batch from `rest` on with `err`.
fn fail_rest(results: &mut [Option<CallResult>], rest: &[(usize, bool)], err: &CallError) {
    for &(index, _) in rest {
        results[index] = Some(Err(err.clone()));
    }
}

/// The tickets of one send: one, inline, for a single call.
type Tickets<'c> = smallvec::SmallVec<[Ticket<'c>; 1]>;

/// What waiting at a call's deadline comes to.
enum AtDeadline {
    /// The call is over (it left with `QueueTimeout`, or its result came
    /// in the meantime).
    Over(CallResult),
    /// Its request is the one the helper is overdue on (or the helper is
    /// failing): the verdict on the helper is its result, and comes at once.
    AwaitVerdict,
}

impl Conn {
    /// Checks a request's size; whether it goes through the region.
    fn check_request(&self, request: &[u8]) -> Result<bool, CallError> {
        let through_region = self.region.is_some()
            && request.len() >= self.region_threshold
            && request.len() as u64 <= self.region_slot;
        if !through_region && request.len() > self.max_frame as usize {
            return Err(CallError::RequestTooLarge {
                len: request.len(),
                max: self.max_frame,
            });
        }
        Ok(through_region)
    }

    /// Whether the table (and, for a region call, the region) has room.
    /// `Err` names what to report if the caller runs out of time waiting.
    fn room_for(
        &self,
        st: &State,
        through_region: bool,
        started: Instant,
    ) -> Result<(), CallError> {
        if st.table.room() == 0 {
            return Err(CallError::Saturated {
                pid: self.pid,
                in_flight: st.table.waiting(),
            });
        }
        if through_region && st.free_slots.is_empty() {
            return Err(self.queue_timeout(started));
        }
        Ok(())
    }

    /// Bytes the helper's stdin pipe takes now without a partial write, by
    /// its capacity less what is queued in it (`FIONREAD`) and a page of
    /// slack (the pipe is a ring of pages, and a write may start a new
    /// one). Unbounded if the queue cannot be read: the batch then goes
    /// as before, the reactor finishing what does not fit.
    fn stdin_room(&self, st: &State) -> usize {
        const PAGE: usize = 4096;
        let Some(stdin) = st.stdin.as_ref() else {
            return usize::MAX;
        };
        match rustix::io::ioctl_fionread(stdin.as_fd()) {
            Ok(queued) => self
                .stdin_capacity
                .saturating_sub(usize::try_from(queued).unwrap_or(usize::MAX))
                .saturating_sub(PAGE),
            Err(_) => usize::MAX,
        }
    }

    fn queue_timeout(&self, started: Instant) -> CallError {
        CallError::QueueTimeout {
            pid: self.pid,
            waited: started.elapsed(),
        }
    }

    /// One call from a thread, started at `started`, with this helper since
    /// `ready` (the hang rule's turn can begin no earlier).
    pub(super) fn call(
        &self,
        request: &[u8],
        deadline: Instant,
        started: Instant,
        ready: Instant,
    ) -> CallResult {
        let through_region = self.check_request(request)?;
        let mut st = self.state.lock();
        if !matches!(st.health, Health::Serving) {
            return Err(self.not_sent(&st));
        }
        let mut sent_at = ready;
        while let Err(full) = self.room_for(&st, through_region, started) {
            let listener = self.room.listen();
            drop(st);
            let woke = listener.wait_deadline(deadline).is_some();
            st = self.state.lock();
            if !matches!(st.health, Health::Serving) {
                return Err(self.failure_for_waiter(&st));
            }
            if !woke && self.room_for(&st, through_region, started).is_err() {
                return Err(full);
            }
            sent_at = Instant::now();
        }
        if sent_at >= deadline {
            // Its time ran out waiting: a request the helper could never
            // answer in time is not sent at all.
            return Err(self.queue_timeout(started));
        }
        let mut out = [Outgoing::new(request, through_region)];
        let mut tickets = Tickets::new();
        let sent = self.enqueue(
            &mut st,
            &mut out,
            (started, deadline),
            sent_at,
            true,
            true,
            &mut tickets,
        )?;
        drop(st);
        let Some(ticket) = tickets.pop() else {
            unreachable!("one request was queued");
        };
        if let Some(partial) = sent.partial {
            self.finish_write(partial, &out[0], deadline);
        }
        if let Some(frames) = sent.inline {
            self.read_inline(frames, std::slice::from_ref(&ticket), deadline);
        }
        self.wait(ticket, deadline, started)
    }

    /// Several calls from one thread, pipelined.
    pub(super) fn call_batch(
        &self,
        requests: &[&[u8]],
        deadline: Instant,
        started: Instant,
        ready: Instant,
    ) -> Vec<CallResult> {
        let mut results: Vec<Option<CallResult>> = Vec::with_capacity(requests.len());
        let mut pending: Vec<(usize, bool)> = Vec::with_capacity(requests.len());
        for (index, request) in requests.iter().enumerate() {
            match self.check_request(request) {
                Ok(through_region) => {
                    results.push(None);
                    pending.push((index, through_region));
                }
                Err(err) => results.push(Some(Err(err))),
            }
        }
        let mut tickets = Tickets::with_capacity(pending.len());
        let mut indices: Vec<usize> = Vec::with_capacity(pending.len());
        let mut inline: Option<FrameReader> = None;
        let mut next = 0;
        let mut waited = false;
        while next < pending.len() {
            let mut st = self.state.lock();
            if !matches!(st.health, Health::Serving) {
                let err = if waited || next > 0 {
                    self.failure_for_waiter(&st)
                } else {
                    self.not_sent(&st)
                };
                fail_rest(&mut results, &pending[next..], &err);
                break;
            }
            // As many as fit now, in order. A caller that reads its replies
            // itself (or will: nothing else is owed) also sends no more
            // than the helper's stdin pipe takes whole, so that nothing is
            // left for the reactor to write and it keeps the reading: the
            // rest goes once replies (so the helper's reads) make room.
            let mut room = st.table.room();
            let mut slots = st.free_slots.len();
            let will_read = inline.is_some()
                || (next == 0
                    && st.table.is_empty()
                    && st.outbound.is_empty()
                    && !st.own_writer
                    && st.reading != Reading::Inline);
            let mut pipe_room = if will_read {
                self.stdin_room(&st)
            } else {
                usize::MAX
            };
            let mut count = 0;
            for &(index, through_region) in &pending[next..] {
                let wire = HEADER_LEN
                    + if through_region {
                        REGION_REQUEST_LEN
                    } else {
                        requests[index].len()
                    };
                if room == 0 || (through_region && slots == 0) {
                    break;
                }
                // A frame goes whatever its size when it is the first of the
                // batch, or when none of the batch's own replies is owed:
                // reading one of those is the only progress this caller
                // can count on (other callers' requests may keep the table
                // from ever emptying).
                let must_go = count == 0
                    && (inline.is_none() || tickets.iter().all(|t| t.completion().is_done()));
                if wire > pipe_room && !must_go {
                    break;
                }
                room -= 1;
                slots -= usize::from(through_region);
                pipe_room = pipe_room.saturating_sub(wire);
                count += 1;
            }
            if count > 0 {
                let now = if waited || next > 0 {
                    Instant::now()
                } else {
                    ready
                };
                if now >= deadline {
                    let err = self.queue_timeout(started);
                    fail_rest(&mut results, &pending[next..], &err);
                    break;
                }
                let mut out: Vec<Outgoing<'_>> = pending[next..next + count]
                    .iter()
                    .map(|&(index, through_region)| Outgoing::new(requests[index], through_region))
                    .collect();
                let inline_ok = inline.is_none() && next == 0;
                match self.enqueue(
                    &mut st,
                    &mut out,
                    (started, deadline),
                    now,
                    inline_ok,
                    false,
                    &mut tickets,
                ) {
                    Ok(Sent {
                        inline: Some(frames),
                        ..
                    }) => inline = Some(frames),
                    Ok(_) => {}
                    Err(err) => {
                        fail_rest(&mut results, &pending[next..], &err);
                        break;
                    }
                }
                indices.extend(pending[next..next + count].iter().map(|&(index, _)| index));
                next += count;
                continue;
            }
            // No room: on the inline path, read a reply (which makes room);
            // otherwise wait for room like any caller.
            if let Some(frames) = inline.take() {
                drop(st);
                inline = self.read_one_inline(frames, deadline).ok();
                continue;
            }
            let listener = self.room.listen();
            drop(st);
            if listener.wait_deadline(deadline).is_none() {
                // The deadline: one last look.
                let st = self.state.lock();
                if let Err(err) = self.room_for(&st, pending[next].1, started) {
                    fail_rest(&mut results, &pending[next..], &err);
                    break;
                }
            }
            waited = true;
        }
        if let Some(frames) = inline {
            self.read_inline(frames, &tickets, deadline);
        }
        for (ticket, index) in tickets.into_iter().zip(indices) {
            results[index] = Some(self.wait(ticket, deadline, started));
        }
        results
            .into_iter()
            .map(|result| result.unwrap_or_else(|| Err(self.queue_timeout(started))))
            .collect()
    }

    /// One call from an async task.
    pub(super) async fn call_async(
        &self,
        request: &[u8],
        deadline: Instant,
        started: Instant,
        ready: Instant,
    ) -> CallResult {
        let through_region = self.check_request(request)?;
        let mut timer = Deadline::new(&self.link, deadline);
        let mut waited = false;
        let ticket = loop {
            let listener = {
                let mut st = self.state.lock();
                if !matches!(st.health, Health::Serving) {
                    return Err(if waited {
                        self.failure_for_waiter(&st)
                    } else {
                        self.not_sent(&st)
                    });
                }
                match self.room_for(&st, through_region, started) {
                    Ok(()) => {
                        let now = if waited { Instant::now() } else { ready };
                        if now >= deadline {
                            return Err(self.queue_timeout(started));
                        }
                        let mut out = [Outgoing::new(request, through_region)];
                        let mut tickets = Tickets::new();
                        self.enqueue(
                            &mut st,
                            &mut out,
                            (started, deadline),
                            now,
                            false,
                            false,
                            &mut tickets,
                        )?;
                        drop(st);
                        match tickets.pop() {
                            Some(ticket) => break ticket,
                            None => unreachable!("one request was queued"),
                        }
                    }
                    Err(full) => {
                        if timer.passed() {
                            return Err(full);
                        }
                        self.room.listen()
                    }
                }
            };
            let mut listener = std::pin::pin!(listener);
            let woke = poll_fn(|cx| {
                if listener.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(true);
                }
                match Pin::new(&mut timer).poll(cx) {
                    Poll::Ready(()) => Poll::Ready(false),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            if !woke {
                // The deadline: one last look for room below.
                timer.expire();
            }
            waited = true;
        };
        let mut verdict_since = None;
        let result = poll_fn(|cx| {
            if let Poll::Ready(result) = ticket.completion().poll_take(cx) {
                return Poll::Ready(result);
            }
            if self.read_arrived()
                && let Poll::Ready(result) = ticket.completion().poll_take(cx)
            {
                return Poll::Ready(result);
            }
            loop {
                if Pin::new(&mut timer).poll(cx).is_pending() {
                    return Poll::Pending;
                }
                match self.at_deadline(&ticket, started, &mut verdict_since) {
                    AtDeadline::Over(result) => return Poll::Ready(result),
                    AtDeadline::AwaitVerdict => timer.reset(Instant::now() + VERDICT_STEP),
                }
            }
        })
        .await;
        ticket.finish(result)
    }

    /// A waiting caller reads the replies that have arrived, while the
    /// reactor holds the reading: one non-blocking pass under the lock
    /// (skipped if the lock is busy: whoever holds it may be doing just
    /// that). The reactor is woken only if it must look sooner than it
    /// planned: frames left in the read-ahead buffer, or a new front of the
    /// table that becomes overdue before its timer. True if it completed
    /// any call.
    fn read_arrived(&self) -> bool {
        let mut done = Done::new();
        let mut poke = false;
        {
            let Some(mut st) = self.state.try_lock() else {
                return false;
            };
            if matches!(st.health, Health::Serving) && st.reading == Reading::Reactor {
                let front = st.table.front().map(|entry| entry.id);
                poke = self.read_arrived_frames(&mut st, Instant::now(), &mut done);
                if st.table.front().map(|entry| entry.id) != front {
                    poke |= Self::looks_too_late(&st);
                }
                // Failing: the reactor reaps.
                poke |= !matches!(st.health, Health::Serving);
            }
        }
        if poke {
            self.poke();
        }
        let any = !done.is_empty();
        self.complete_all(&mut done);
        any
    }

    /// Whether the reactor's next look at this helper comes after the
    /// moment the front of its table becomes overdue (or never comes).
    fn looks_too_late(st: &State) -> bool {
        super::service::looks_too_late(st.table.front_overdue_at(), st.next_look)
    }

    /// Queues `out` (the caller checked the room: every request has a place
    /// in the table and, through the region, a slot) and writes as much of
    /// it as the pipe takes now, in one `writev`. With `inline_ok`, a caller
    /// whose requests are the only ones owed and went out whole reads the
    /// replies itself: the stdout reader is returned to it. With
    /// `keep_partial`, a single frame that went out in part is left to the
    /// caller to finish ([`finish_write`](Self::finish_write)). The call's
    /// start and deadline are each request's budget for the hang rule.
    #[allow(clippy::too_many_arguments)]
    fn enqueue<'c>(
        &'c self,
        st: &mut State,
        out: &mut [Outgoing<'_>],
        (started, deadline): (Instant, Instant),
        now: Instant,
        inline_ok: bool,
        keep_partial: bool,
        tickets: &mut Tickets<'c>,
    ) -> Result<Sent, CallError> {
        let was_empty = st.table.is_empty();
        // Nothing owed, nobody reading but perhaps the reactor, which keeps
        // its watch on an empty table until it next looks.
        let quiet = was_empty && st.reading != Reading::Inline;
        if quiet {
            self.check_unsolicited(st)?;
        }
        for outgoing in out.iter_mut() {
            let id = st.ids.next();
            let slot = if outgoing.through_region {
                let (Some(region), Some(slot)) = (self.region.as_ref(), st.free_slots.pop()) else {
                    unreachable!("the caller checked for a free slot");
                };
                let slot_at = u64::from(slot) * self.region_slot;
                if let Err(errno) = region.write(slot_at, outgoing.request) {
                    st.free_slots.push(slot);
                    return Err(CallError::Io {
                        pid: self.pid,
                        source: Arc::new(errno.into()),
                    });
                }
                outgoing.region_ref = RegionRequest {
                    request: RegionRef {
                        offset: slot_at,
                        len: outgoing.request.len() as u64,
                    },
                    reply: RegionRef {
                        offset: region.len() / 2 + slot_at,
                        len: self.region_slot,
                    },
                }
                .encode();
                Some(slot)
            } else {
                None
            };
            let kind = if outgoing.through_region {
                Kind::RequestInRegion
            } else {
                Kind::Request
            };
            outgoing.head = Header {
                kind,
                id,
                len: outgoing.payload().len() as u32,
            }
            .encode();
            outgoing.id = id;
            let completion = Conn::completion(st);
            st.table
                .push(id, started, deadline, now, slot, completion.clone());
            tickets.push(Ticket {
                conn: self,
                id,
                completion: Some(completion),
            });
        }
        let mut sent = Sent {
            inline: None,
            partial: None,
        };
        let mut poke = false;
        let queue_was_free = st.outbound.is_empty() && !st.own_writer;
        if !queue_was_free {
            Self::queue_pending_bind(st);
        }
        let bind = st.pending_bind.take();
        let mut written = 0;
        if queue_was_free && let Some(stdin) = &st.stdin {
            let bind_slice = bind.as_deref().map(IoSlice::new);
            let result = if out.len() == 1 {
                let bufs = [IoSlice::new(&out[0].head), IoSlice::new(out[0].payload())];
                match bind_slice {
                    Some(bind) => write_now(stdin.as_fd(), &[bind, bufs[0], bufs[1]]),
                    // A small frame: one `write` from a copy on the stack.
                    None => match SmallFrame::join(&bufs[0], &bufs[1]) {
                        Some(frame) => write_now(stdin.as_fd(), &[IoSlice::new(frame.bytes())]),
                        None => write_now(stdin.as_fd(), &bufs),
                    },
                }
            } else {
                // Within IOV_MAX (1024) slices: the frames past these
                // go to the outbound queue below like any unwritten.
                let bufs: Vec<IoSlice<'_>> = bind_slice
                    .into_iter()
                    .chain(
                        out.iter()
                            .take(FRAMES_PER_WRITEV)
                            .flat_map(|o| [IoSlice::new(&o.head), IoSlice::new(o.payload())]),
                    )
                    .collect();
                write_now(stdin.as_fd(), &bufs)
            };
            match result {
                Ok(n) => written = n,
                Err(failure) => {
                    // The calls just queued fail with the helper.
                    self.io_failed(st, failure, now);
                    self.poke();
                    return Ok(sent);
                }
            }
        }
        // What did not go out is written from where the pipe stopped: by
        // its caller, or by the reactor from a copy. A frame is never cut.
        let mut skip = written;
        if let Some(bind) = bind {
            if skip >= bind.len() {
                skip -= bind.len();
            } else {
                st.outbound.push_back(OutFrame {
                    id: 0,
                    started: skip > 0,
                    offset: skip,
                    bytes: bind,
                });
                skip = 0;
            }
        }
        for outgoing in out.iter() {
            let len = HEADER_LEN + outgoing.payload().len();
            if skip >= len {
                skip -= len;
                continue;
            }
            if keep_partial
                && skip > 0
                && out.len() == 1
                && let Some(fd) = st.stdin.clone()
            {
                st.own_writer = true;
                sent.partial = Some(Partial { fd, offset: skip });
                break;
            }
            st.outbound.push_back(OutFrame {
                id: outgoing.id,
                bytes: outgoing.frame_from(skip),
                offset: 0,
                started: skip > 0,
            });
            skip = 0;
        }
        if queue_was_free && !st.outbound.is_empty() {
            // The reactor arms EPOLLOUT.
            poke = true;
        }
        if st.reading == Reading::Idle || quiet {
            let whole = st.outbound.is_empty() && !st.own_writer;
            if inline_ok && was_empty && whole {
                sent.inline = st.frames.take();
                if sent.inline.is_some() {
                    st.reading = Reading::Inline;
                }
            }
            if sent.inline.is_none() {
                // The reactor reads: wake it to watch, unless it still
                // watches and will look in time for the hang rule.
                poke |= st.reading != Reading::Reactor || Self::looks_too_late(st);
                st.reading = Reading::Reactor;
            }
        }
        if poke {
            self.poke();
        }
        Ok(sent)
    }

    /// Finishes writing the caller's own frame that went out in part,
    /// without the lock (this caller owns the write side until it is done),
    /// waiting for room in the pipe until `deadline`. At the deadline the
    /// rest is handed to the reactor, ahead of anything queued since.
    fn finish_write(&self, partial: Partial, outgoing: &Outgoing<'_>, deadline: Instant) {
        let len = HEADER_LEN + outgoing.payload().len();
        let mut at = partial.offset;
        let failure = loop {
            let bufs = [
                IoSlice::new(&outgoing.head[at.min(HEADER_LEN)..]),
                IoSlice::new(&outgoing.payload()[at.saturating_sub(HEADER_LEN)..]),
            ];
            match write_now(partial.fd.as_fd(), &bufs) {
                Ok(n) => at += n,
                Err(failure) => break Some(failure),
            }
            if at == len {
                break None;
            }
            if self.retired.load(std::sync::atomic::Ordering::Acquire) {
                // Failing or closed: the rest is nobody's any more.
                break None;
            }
            if let Err(IoFailure::Timeout) =
                wait_ready(partial.fd.as_fd(), PollFlags::POLLOUT, deadline)
            {
                let mut st = self.state.lock();
                st.own_writer = false;
                if matches!(st.health, Health::Serving) {
                    st.outbound.push_front(OutFrame {
                        id: outgoing.id,
                        bytes: outgoing.frame_from(at),
                        offset: 0,
                        started: true,
                    });
                }
                drop(st);
                self.poke();
                return;
            }
        };
        let mut st = self.state.lock();
        st.own_writer = false;
        if let Some(failure) = failure {
            self.io_failed(&mut st, failure, Instant::now());
        }
        let poke = !st.outbound.is_empty() || !matches!(st.health, Health::Serving);
        drop(st);
        if poke {
            self.poke();
        }
    }

    /// Before the first request after a quiet spell: bytes the helper sent
    /// unasked that already arrived with the last reply (a duplicate
    /// answer) retire it. Bytes it sends later are caught when they are read
    /// as the next reply: their id cannot match (see `RequestIds`).
    fn check_unsolicited(&self, st: &mut State) -> Result<(), CallError> {
        let Some(frames) = st.frames.as_mut() else {
            return Ok(());
        };
        if !frames.has_buffered() {
            return Ok(());
        }
        let violation = match frames.poll_frame(self.stdout(), self.max_frame) {
            Ok(Some((header, _))) => crate::error::ProtocolViolation::Unsolicited {
                kind: header.kind,
                id: header.id,
            },
            Ok(None) => crate::error::ProtocolViolation::UnsolicitedPartial,
            Err(failure) => {
                let now = Instant::now();
                self.io_failed(st, failure, now);
                self.poke();
                return Err(self.failure_for_waiter(st));
            }
        };
        let err = CallError::Protocol {
            pid: self.pid,
            violation,
        };
        self.retire(st, err.clone());
        self.poke();
        Err(err)
    }

    /// Whether a helper that owes nothing has written to its stdout, closed
    /// it, or exited: the error to retire it with. One non-blocking read
    /// (whatever it reads is output before the bind) and one non-blocking
    /// wait: a helper's death does not always close its pipes (a process
    /// its init hook left behind may hold them).
    fn unbound_problem(&self, st: &mut State) -> Option<CallError> {
        let frames = st.frames.as_mut()?;
        let output_before_bind = || CallError::Protocol {
            pid: self.pid,
            violation: ProtocolViolation::OutputBeforeBind,
        };
        let died = |status: ExitStatus| self.died(status, self.stderr.tail());
        match frames.poll_frame(self.stdout(), self.max_frame) {
            Ok(None) if !frames.has_buffered() => self.process.try_wait().map(died),
            Ok(_) | Err(IoFailure::Decode(_)) => Some(output_before_bind()),
            Err(IoFailure::StdoutClosed) => Some(match self.process.try_wait() {
                Some(status) => died(status),
                // Closed, and not (yet) reapable: retired all the same.
                None => CallError::Protocol {
                    pid: self.pid,
                    violation: ProtocolViolation::ClosedStdout,
                },
            }),
            Err(IoFailure::Os(errno)) => Some(CallError::Io {
                pid: self.pid,
                source: Arc::new(errno.into()),
            }),
            Err(IoFailure::StdinClosed | IoFailure::Timeout) => None,
        }
    }

    /// Queues a control frame (Bind): no table entry, no reply.
    pub(super) fn send_control(&self, kind: Kind, payload: &[u8]) -> Result<(), CallError> {
        let mut st = self.state.lock();
        if !matches!(st.health, Health::Serving) {
            return Err(self.not_sent(&st));
        }
        if kind == Kind::Bind {
            if st.bound {
                return Err(CallError::AlreadyBound { pid: self.pid });
            }
            // Nothing is owed, so nothing may be waiting on its stdout, and
            // it must still be running: a spare that misbehaved while it
            // waited is retired here, before any tenant is bound to it.
            if st.reading != Reading::Inline && st.table.is_empty() {
                // Bytes read with the Hello and kept count as well.
                let buffered = st.frames.as_ref().is_some_and(|f| f.has_buffered());
                let problem = if buffered {
                    Some(CallError::Protocol {
                        pid: self.pid,
                        violation: ProtocolViolation::OutputBeforeBind,
                    })
                } else {
                    self.unbound_problem(&mut st)
                };
                if let Some(problem) = problem {
                    self.retire(&mut st, problem.clone());
                    drop(st);
                    self.poke();
                    return Err(problem);
                }
            }
            st.bound = true;
            if st.table.is_empty() && st.outbound.is_empty() && !st.own_writer {
                // Written with the next frame: a spare's Bind and its
                // tenant's first request reach it in one write.
                let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
                frame.extend_from_slice(
                    &Header {
                        kind,
                        id: 0,
                        len: payload.len() as u32,
                    }
                    .encode(),
                );
                frame.extend_from_slice(payload);
                st.pending_bind = Some(frame);
                return Ok(());
            }
        }
        // A held Bind goes first, in the same write.
        let mut bytes = st.pending_bind.take().unwrap_or_default();
        bytes.extend_from_slice(
            &Header {
                kind,
                id: 0,
                len: payload.len() as u32,
            }
            .encode(),
        );
        bytes.extend_from_slice(payload);
        let outbound_was_empty = st.outbound.is_empty() && !st.own_writer;
        let mut written = 0;
        if outbound_was_empty && let Some(stdin) = &st.stdin {
            match write_now(stdin.as_fd(), &[IoSlice::new(&bytes)]) {
                Ok(n) => written = n,
                Err(failure) => {
                    self.io_failed(&mut st, failure, Instant::now());
                    drop(st);
                    self.poke();
                    return Ok(());
                }
            }
        }
        // Control frames (and a held Bind) are far below PIPE_BUF: a write
        // takes them whole or not at all, but the queue copes with either.
        if written < bytes.len() {
            st.outbound.push_back(OutFrame {
                id: 0,
                bytes,
                offset: written,
                started: written > 0,
            });
            if outbound_was_empty {
                drop(st);
                self.poke();
            }
        }
        Ok(())
    }

    /// Puts a held Bind frame at the back of the outbound queue (before
    /// whatever is queued after this), for a send that cannot take it along.
    fn queue_pending_bind(st: &mut State) {
        if let Some(bytes) = st.pending_bind.take() {
            st.outbound.push_back(OutFrame {
                id: 0,
                bytes,
                offset: 0,
                started: false,
            });
        }
    }

    /// The inline path: reads frames (the caller's own replies, and any
    /// owed before them) until every ticket's call is done, then hands the
    /// reading over (to nobody if nothing is owed, else to the reactor).
    /// It stops early, handing over, when a read fails or times out: at
    /// the caller's deadline, or when the helper becomes overdue on the
    /// reply it owes first (the reactor judges that).
    fn read_inline(&self, mut frames: FrameReader, tickets: &[Ticket<'_>], deadline: Instant) {
        while !tickets.iter().all(|t| t.completion().is_done())
            && self.read_one_frame(&mut frames, deadline)
        {}
        self.hand_back(frames);
    }

    /// One frame on the inline path of a batch that waits for room. Gives
    /// the reader back, or hands the reading over and `Err` if it stopped.
    fn read_one_inline(
        &self,
        mut frames: FrameReader,
        deadline: Instant,
    ) -> Result<FrameReader, ()> {
        if self.read_one_frame(&mut frames, deadline) {
            return Ok(frames);
        }
        self.hand_back(frames);
        Err(())
    }

    /// The inline reader reads and handles one frame, waiting until the
    /// caller's deadline or the moment the helper becomes overdue on the
    /// reply it owes first, whichever is first. False when it must stop and
    /// hand the reading over: the helper is no longer serving, the read
    /// failed or timed out, or the frame broke the protocol.
    fn read_one_frame(&self, frames: &mut FrameReader, deadline: Instant) -> bool {
        let until = {
            let st = self.state.lock();
            if !matches!(st.health, Health::Serving) {
                return false;
            }
            st.table
                .front_overdue_at()
                .map_or(deadline, |at| at.min(deadline))
        };
        let Ok((header, payload)) = frames.read_frame(self.stdout(), until, self.max_frame) else {
            return false;
        };
        let mut done = Done::new();
        let mut st = self.state.lock();
        let outcome = self.on_frame(&mut st, header, payload, Instant::now(), &mut done);
        if let Err(err) = &outcome {
            self.retire(&mut st, err.clone());
        }
        drop(st);
        self.complete_all(&mut done);
        outcome.is_ok()
    }

    /// The inline reader is done: to nobody if nothing is owed, else to
    /// the reactor (which then also judges the helper). Replies to later
    /// requests that have already arrived are read first, without waiting:
    /// when they were all there, nothing is owed and the reactor need not
    /// be woken at all.
    fn hand_back(&self, frames: FrameReader) {
        let mut done = Done::new();
        let mut st = self.state.lock();
        st.frames = Some(frames);
        if matches!(st.health, Health::Serving) && !st.table.is_empty() {
            self.read_pass(&mut st, Instant::now(), &mut done);
        }
        let idle =
            st.table.is_empty() && st.outbound.is_empty() && matches!(st.health, Health::Serving);
        st.reading = if idle {
            Reading::Idle
        } else {
            Reading::Reactor
        };
        drop(st);
        self.complete_all(&mut done);
        if !idle {
            self.poke();
        }
    }

    /// Waits for a ticket's completion from a thread.
    fn wait(&self, ticket: Ticket<'_>, deadline: Instant, started: Instant) -> CallResult {
        // Done already (the inline path read it): no pass over the pipe.
        if let Some(result) = ticket.completion().try_take() {
            return ticket.finish(result);
        }
        let mut until = deadline;
        let mut verdict_since = None;
        if self.spin.is_zero() {
            // With a spin, its first turn makes this pass.
            self.read_arrived();
        }
        loop {
            if let Some(result) = ticket.completion().wait_until_with(until, self.spin, || {
                self.read_arrived();
            }) {
                return ticket.finish(result);
            }
            match self.at_deadline(&ticket, started, &mut verdict_since) {
                AtDeadline::Over(result) => return ticket.finish(result),
                AtDeadline::AwaitVerdict => until = Instant::now() + VERDICT_STEP,
            }
        }
    }

    /// The caller's deadline has passed: it leaves, unless its own request
    /// is the one the helper is overdue on (or the helper is failing), in
    /// which case the verdict on the helper is its result.
    fn at_deadline(
        &self,
        ticket: &Ticket<'_>,
        started: Instant,
        verdict_since: &mut Option<Instant>,
    ) -> AtDeadline {
        let mut st = self.state.lock();
        let now = Instant::now();
        let judged =
            st.table.is_overdue_front(ticket.id, now) || matches!(st.health, Health::Dying { .. });
        if judged {
            let since = *verdict_since.get_or_insert(now);
            if now.duration_since(since) < VERDICT_MAX {
                return AtDeadline::AwaitVerdict;
            }
            error!(
                pid = self.pid,
                "no verdict on an overdue helper from the reactor; the caller leaves"
            );
        }
        if let Some(result) = ticket.completion().abandon() {
            return AtDeadline::Over(result);
        }
        self.leave(&mut st, ticket.id, now);
        AtDeadline::Over(Err(self.queue_timeout(started)))
    }

    /// A caller gives up on `id` before its call finished (a dropped
    /// future, a batch caller gone).
    fn cancel(&self, id: u64, completion: &Completion<CallResult>) {
        let mut st = self.state.lock();
        if completion.abandon().is_some() {
            // It had completed: nothing is owed any more.
            return;
        }
        self.leave(&mut st, id, Instant::now());
    }

    /// The caller of `id` has left (its completion abandoned, under the
    /// lock): a request none of which went on the wire is taken back; one
    /// that did stays owed, its reply discarded when it comes, and frees
    /// its caller's place in the table.
    fn leave(&self, st: &mut State, id: u64, now: Instant) {
        if st.table.abandon(id) {
            self.room.notify(usize::MAX);
        }
        let Some(at) = st
            .outbound
            .iter()
            .position(|frame| frame.id == id && !frame.started)
        else {
            return;
        };
        st.outbound.remove(at);
        if let Some(entry) = st.table.remove(id, now)
            && let Some(slot) = entry.slot
        {
            st.free_slots.push(slot);
        }
        let reactor_reads = st.reading == Reading::Reactor;
        self.room.notify(usize::MAX);
        if reactor_reads {
            // The front may have changed (its timer) or the table emptied.
            self.poke();
        }
    }

    /// Kills and reaps the helper now, failing calls in flight.
    pub(super) fn kill(&self, reason: RetireReason) -> crate::ExitStatus {
        {
            let mut st = self.state.lock();
            if matches!(st.health, Health::Serving | Health::Closed) {
                let err = CallError::Retired {
                    pid: self.pid,
                    reason,
                };
                self.retire(&mut st, err);
            }
        }
        let status = self.process.kill_and_reap();
        let mut done = Done::new();
        {
            let mut st = self.state.lock();
            self.finalize(&mut st, status, &mut done);
        }
        self.complete_all(&mut done);
        status
    }

    /// Closes the helper's stdin (shutdown, quiesce): calls in flight fail
    /// with `Retired`, later calls are refused, the helper sees EOF.
    pub(super) fn close_stdin(&self) {
        let mut done = Done::new();
        {
            let mut st = self.state.lock();
            if !matches!(st.health, Health::Serving) {
                st.stdin = None;
                return;
            }
            let err = CallError::Retired {
                pid: self.pid,
                reason: RetireReason::ShutDown,
            };
            st.health = Health::Closed;
            st.failure.get_or_insert(err.clone());
            self.retired
                .store(true, std::sync::atomic::Ordering::Release);
            st.stdin = None;
            st.outbound.clear();
            for entry in st.table.drain() {
                done.push((entry.completion, Err(err.clone()), true));
            }
            if st.reading == Reading::Inline || st.own_writer {
                // A caller thread is blocked on this helper's pipes (reading
                // its reply, or writing its frame and so holding stdin
                // open): its call has just failed, and it must not wait out
                // the grace. Killing the helper wakes it (EOF, EPIPE).
                self.process.kill();
            }
        }
        self.complete_all(&mut done);
        self.room.notify(usize::MAX);
    }

    /// If the process exited while serving (e.g. idle), retires it as dead.
    pub(super) fn check_exit(&self) -> Option<CallError> {
        let mut st = self.state.lock();
        if !matches!(st.health, Health::Serving) {
            return None;
        }
        let status = self.process.try_wait()?;
        st.health = Health::Dying {
            cause: super::Dying::Exiting { stdin: false },
            until: Instant::now(),
        };
        self.retired
            .store(true, std::sync::atomic::Ordering::Release);
        let mut done = Done::new();
        self.finalize(&mut st, status, &mut done);
        let err = st.failure.clone();
        drop(st);
        self.complete_all(&mut done);
        err
    }
}

/// An async call's deadline: a reactor timer, registered when the future
/// first has to wait, cancelled when it is dropped.
pub(crate) struct Deadline<'l> {
    link: &'l ReactorLink,
    at: Instant,
    key: Option<(Instant, u64)>,
    expired: bool,
}

impl<'l> Deadline<'l> {
    pub(crate) fn new(link: &'l ReactorLink, at: Instant) -> Self {
        Deadline {
            link,
            at,
            key: None,
            expired: false,
        }
    }

    fn passed(&self) -> bool {
        self.expired || Instant::now() >= self.at
    }

    /// Treat the deadline as passed from now on.
    fn expire(&mut self) {
        self.expired = true;
    }

    /// A new moment to wake at.
    fn reset(&mut self, at: Instant) {
        if let Some(key) = self.key.take() {
            self.link.cancel_timer(key);
        }
        self.at = at;
        self.expired = false;
    }
}

impl Future for Deadline<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.passed() {
            return Poll::Ready(());
        }
        let registered = match self.key {
            Some(key) => self.link.update_timer(key, cx.waker()),
            None => false,
        };
        if !registered {
            // Not yet registered, or it fired early (a coarse timer):
            // register (again) for the moment itself.
            let at = self.at;
            self.key = Some(self.link.add_timer(at, cx.waker().clone()));
            if self.passed() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}

impl Drop for Deadline<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.link.cancel_timer(key);
        }
    }
}
