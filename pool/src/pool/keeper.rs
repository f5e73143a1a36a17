//! The keeper thread: refills spares, quiesces idle helpers, notices
//! helpers that died while idle, closes helpers handed to it once no caller
//! holds them, and reaps them, never waiting on any one of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use tracing::{debug, warn};

use super::CloseCause;
use super::tenants::{Shared, State, guarded};
use super::usage::{Sampler, Scratch};
use crate::conn::{Helper, deadline_after};
use crate::error::{CallError, LaunchError};
use crate::lifecycle::IdlePolicy;
use crate::policy::{self, Defaults, IdlePolicyKind, IdleRule};

pub(super) enum KeeperMsg {
    /// Refill the spares after [`REFILL_DELAY`].
    Refill,
    /// Refill the spares now: the reactor's delayed notice of a spare
    /// taken, [`REFILL_DELAY`] after the call that took it was done.
    RefillDue,
    /// `Pool::reconfigure` replaced the live configuration: recompute the
    /// tick and scan now.
    Reconfigured,
    Close(Arc<Helper>, CloseCause),
    Shutdown,
}

/// How long after a spare is taken the keeper launches its replacement.
pub(super) const REFILL_DELAY: Duration = Duration::from_millis(10);

/// The keeper's scan interval for a shortest idle timeout: a quarter of
/// it, within 5 ms to 1 s.
fn scan_tick(shortest: Duration) -> Duration {
    (shortest / 4).clamp(Duration::from_millis(5), Duration::from_secs(1))
}

impl Shared {
    /// The keeper thread: refills spares, quiesces idle helpers, closes
    /// helpers handed to it once no caller holds them (without waiting on
    /// any of them), and reaps them. At shutdown it returns the helpers it
    /// had not finished with, for the pool's single shutdown deadline.
    pub(super) fn keep(&self, rx: Receiver<KeeperMsg>) -> Vec<Arc<Helper>> {
        let tick_of = |live: &super::tenants::Live| scan_tick(live.config.idle_timeout);
        let mut live = self.live();
        let mut tick = tick_of(&live);
        // Handed over, waiting for the last caller to let go.
        let mut pending: Vec<(Arc<Helper>, CloseCause)> = Vec::new();
        // stdin closed, waiting for the exit until the deadline.
        let mut reaping: Vec<(Arc<Helper>, Instant)> = Vec::new();
        let mut next_scan = Instant::now() + tick;
        let mut sampling = live.limits.any();
        let mut sample_every = live.config.sample_interval;
        let mut next_sample = Instant::now() + sample_every;
        let mut sampler = Sampler::new();
        let mut scratch = Scratch::default();
        let mut refill_after = Instant::now();
        // Scratch buffers, reused: a steady pool's keeper allocates nothing.
        let mut messages = Vec::with_capacity(16);
        let mut unused = Vec::new();
        let mut ahead = Vec::new();
        let mut still_pending = Vec::new();
        loop {
            let busy = !pending.is_empty() || !reaping.is_empty();
            let next = if sampling {
                next_scan.min(next_sample)
            } else {
                next_scan
            };
            let wake = if busy {
                next.min(Instant::now() + Duration::from_millis(2))
            } else {
                next
            };
            // A refill put off (REFILL_DELAY, or after failed launches)
            // is due at refill_after.
            let wake = if refill_after > Instant::now() {
                wake.min(refill_after)
            } else {
                wake
            };
            messages.clear();
            match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(msg) => messages.push(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => messages.push(KeeperMsg::Shutdown),
            }
            messages.extend(rx.try_iter());
            let mut shutdown = false;
            for msg in messages.drain(..) {
                match msg {
                    KeeperMsg::Refill => {
                        // A spare was just bound: its tenant's first calls
                        // are running now. A launch at once would compete
                        // with them for the CPU (a launch is about a
                        // millisecond of it); a moment later it does not.
                        refill_after = refill_after.max(Instant::now() + REFILL_DELAY);
                    }
                    KeeperMsg::RefillDue => {}
                    KeeperMsg::Reconfigured => {
                        live = self.live();
                        tick = tick_of(&live);
                        sampling = live.limits.any();
                        sample_every = live.config.sample_interval;
                        next_scan = Instant::now();
                        next_sample = next_sample.min(Instant::now() + sample_every);
                        refill_after = Instant::now();
                    }
                    KeeperMsg::Close(helper, cause) => pending.push((helper, cause)),
                    KeeperMsg::Shutdown => shutdown = true,
                }
            }
            if shutdown {
                let mut left: Vec<_> = pending.into_iter().map(|(helper, _)| helper).collect();
                left.extend(reaping.into_iter().map(|(helper, _)| helper));
                return left;
            }
            if let Some(host) = &self.host {
                // At most once a second: the leader's heartbeat age.
                host.watch();
            }
            if sampling && Instant::now() >= next_sample {
                self.sample(&mut sampler, &mut scratch, &mut pending);
                next_sample = Instant::now() + sample_every;
            }
            if Instant::now() >= refill_after && !self.refill_spares() {
                // Launches are failing: retry on a later tick, not in a loop.
                refill_after = Instant::now() + tick;
            }
            if Instant::now() >= next_scan {
                let shortest = self.quiesce_idle(&mut pending, &mut unused, &mut ahead);
                tick = scan_tick(shortest);
                next_scan = Instant::now() + tick;
                let counts = self.helper_counts();
                self.telemetry.set_helpers(
                    counts.spare,
                    counts.idle,
                    counts.busy,
                    counts.launching,
                    counts.closing,
                );
            }
            // Close what no caller holds any more; the rest waits.
            for (helper, cause) in pending.drain(..) {
                if !helper.has_users() {
                    helper.close_stdin();
                    debug!(pid = helper.pid(), ?cause, "closing helper");
                    reaping.push((helper, deadline_after(self.live().config.shutdown_grace)));
                } else {
                    still_pending.push((helper, cause));
                }
            }
            std::mem::swap(&mut pending, &mut still_pending);
            let before = reaping.len();
            let now = Instant::now();
            reaping.retain(|(helper, deadline)| {
                if helper.try_wait().is_some() {
                    return false;
                }
                if now >= *deadline {
                    warn!(
                        pid = helper.pid(),
                        "helper ignored the end of its stdin; killed after the grace"
                    );
                    helper.kill_and_reap();
                    return false;
                }
                true
            });
            let reaped = before - reaping.len();
            if reaped > 0 {
                let mut state = self.state.lock();
                state.closing = state.closing.saturating_sub(reaped);
                drop(state);
                self.notify_changed();
            }
        }
    }

    /// Launches spares until there are `spares` of them (within
    /// `max_helpers`, and with `Config.host` only while a host-wide slot is
    /// free: a refill never evicts or waits for one). Returns false if a
    /// launch failed or no host slot was free (retried on a later tick).
    fn refill_spares(&self) -> bool {
        loop {
            {
                let mut state = self.state.lock();
                // The keeper is the only thread launching spares, and it
                // launches one at a time. At the cap, the least recently used
                // idle helper makes room: it would be the next one evicted by
                // a cold tenant anyway, and this way the eviction and the
                // launch happen here, off the call path.
                // Over the memory budget no spare is launched (an idle
                // tenant's helper is worth more than a spare), and after
                // spares were killed for their limits refills wait.
                if state.shut
                    || state.spares.len() >= self.live().config.spares
                    || self.over_budget()
                    || self.spare_refills_wait()
                    || state.live() >= self.live().config.max_helpers && !self.evict_one(&mut state)
                {
                    return true;
                }
                state.launching += 1;
            }
            let slot = match &self.host {
                Some(host) => match host.try_acquire_spare() {
                    Ok(Some(slot)) => Some(slot),
                    Ok(None) => {
                        self.state.lock().launching -= 1;
                        self.notify_changed();
                        return false;
                    }
                    Err(err) => {
                        self.state.lock().launching -= 1;
                        self.notify_changed();
                        warn!(%err, "no host-wide slot for a spare helper");
                        return false;
                    }
                },
                None => None,
            };
            let warmed = guarded(|| {
                // Never relieved by an eviction: a spare is not worth a
                // tenant's helper; under host pressure the refill waits.
                let mut helper = self
                    .launcher
                    .launch()
                    .map_err(|err| CallError::Launch(Arc::new(err)))?;
                if let Some(slot) = slot {
                    helper.hold_host_slot(slot);
                }
                self.warm_up(helper)
                    .map_err(|err| CallError::Launch(Arc::new(err)))
            });
            let mut state = self.state.lock();
            state.launching -= 1;
            self.notify_changed();
            match warmed {
                Ok(helper) if !state.shut => {
                    self.telemetry
                        .launched(helper.launch_time(), helper.hello(), helper.pid());
                    state.spares.push_back(Arc::new(helper));
                }
                // Shutting down: the helper is killed and reaped as it drops.
                Ok(_) => return true,
                Err(err) => {
                    self.telemetry.launch_failed();
                    if matches!(&err, CallError::Launch(e) if e.is_host_pressure()) {
                        self.telemetry.launch_host_pressure();
                    }
                    self.telemetry.failure(&err);
                    warn!(%err, "launching a spare helper failed");
                    return false;
                }
            }
        }
    }

    /// Runs the configured warm-up request on a new spare.
    fn warm_up(&self, helper: Helper) -> Result<Helper, LaunchError> {
        let live = self.live();
        let Some(request) = &live.config.warmup_request else {
            return Ok(helper);
        };
        let deadline = deadline_after(live.config.request_timeout);
        match helper.call(request, deadline) {
            Ok(_) | Err(CallError::Helper(_)) => Ok(helper),
            Err(err) => Err(LaunchError::WarmUp {
                pid: helper.pid(),
                source: Box::new(err),
            }),
        }
    }

    /// Takes helpers whose tenant's policy says they have been idle long
    /// enough away from their tenants, launches helpers for tenants whose
    /// policy wants one ahead of their calls, notices helpers that died
    /// while idle, and forgets tenants that have nothing left to remember.
    /// No I/O happens under the state lock. Returns the shortest fixed idle
    /// timeout any tenant's policy has (for the keeper's tick).
    ///
    /// `unused` and `ahead` are the keeper's scratch buffers, reused so that
    /// a scan of a steady pool allocates nothing.
    fn quiesce_idle(
        &self,
        pending: &mut Vec<(Arc<Helper>, CloseCause)>,
        unused: &mut Vec<Arc<Helper>>,
        ahead: &mut Vec<Box<[u8]>>,
    ) -> Duration {
        let now = Instant::now();
        let live = self.live();
        let defaults = Defaults {
            idle_policy: live.config.idle_policy,
            idle_timeout: live.config.idle_timeout,
        };
        let mut shortest = live.config.idle_timeout;
        let forget_after = shortest.max(live.config.crash_backoff.max.saturating_mul(2));
        let clock = now.saturating_duration_since(self.epoch);
        unused.clear();
        ahead.clear();
        {
            let mut state = self.state.lock();
            let mut quiesced = 0;
            let mut adaptive_tenants = live.config.idle_policy == IdlePolicyKind::Adaptive;
            let State {
                tenants, policies, ..
            } = &mut *state;
            for (id, tenant) in tenants.iter_mut() {
                let rule = policy::longest_rule(&live.config.tenant_policies, id);
                let effective = policy::resolve(policies.get(id), rule, defaults);
                let fixed;
                let idle_policy = match effective.idle {
                    IdleRule::Fixed(idle_timeout) => {
                        shortest = shortest.min(idle_timeout);
                        fixed = IdlePolicy::Fixed { idle_timeout };
                        &fixed
                    }
                    IdleRule::Adaptive => {
                        adaptive_tenants = true;
                        // Its closes and pre-launches fall on min_keep
                        // boundaries at the earliest.
                        shortest = shortest.min(live.config.adaptive.min_keep);
                        &live.adaptive
                    }
                };
                // The same decision the replay tool makes of a trace.
                let decision = tenant.lifecycle.decide(clock, idle_policy);
                let Some(helper) = &tenant.helper else {
                    let backing_off = tenant.backoff_until.is_some_and(|until| until > now);
                    let wanted = effective.prewarm || decision.prewarm_due(clock);
                    if wanted && !tenant.launching && !backing_off {
                        ahead.push(id.clone());
                    }
                    continue;
                };
                if !helper.is_unused() || helper.is_retired() {
                    continue;
                }
                if effective.keep_warm {
                    unused.push(helper.clone());
                    continue;
                }
                if decision.close_due(clock) {
                    if let Some(helper) = tenant.helper.take() {
                        quiesced += 1;
                        self.telemetry.closed(CloseCause::Idle);
                        pending.push((helper, CloseCause::Idle));
                    }
                } else {
                    unused.push(helper.clone());
                }
            }
            state.bound -= quiesced;
            state.closing += quiesced;
            self.count_late_failures(&mut state);
            let State {
                tenants, policies, ..
            } = &mut *state;
            let mut histories = 0;
            let more_than_history = |id: &[u8], tenant: &super::tenants::Tenant| {
                tenant.helper.is_some()
                    || tenant.failed.is_some()
                    || tenant.launching
                    || tenant.backoff_until.is_some_and(|until| until > now)
                    || tenant
                        .last_failure
                        .is_some_and(|at| now.duration_since(at) < forget_after)
                    || policies.contains_key(id)
            };
            tenants.retain(|id, tenant| {
                let busy = more_than_history(id, tenant);
                // Under an adaptive policy a tenant's history outlives its
                // helper: it is what predicts the next call.
                let history = adaptive_tenants && tenant.lifecycle.last_call().is_some();
                histories += usize::from(!busy && history);
                busy || history
            });
            let excess = histories.saturating_sub(live.config.max_tenant_histories);
            if excess > 0 {
                // The oldest last calls among the tenants kept only for
                // their history.
                let mut oldest: Vec<(Duration, Box<[u8]>)> = tenants
                    .iter()
                    .filter(|(id, tenant)| !more_than_history(id, tenant))
                    .filter_map(|(id, tenant)| Some((tenant.lifecycle.last_call()?, id.clone())))
                    .collect();
                if excess < oldest.len() {
                    oldest.select_nth_unstable_by_key(excess, |(at, _)| *at);
                }
                for (_, id) in oldest.into_iter().take(excess) {
                    tenants.remove(&id);
                }
            }
            for tenant in ahead.drain(..) {
                self.prelaunch(&mut state, &tenant, now);
            }
            if quiesced > 0 {
                self.notify_changed();
            }
        }
        // Outside the lock: has any idle helper died? (Reaping and reading
        // the last of its stderr are I/O.)
        for helper in unused.drain(..) {
            if let Some(err) = helper.check_exit() {
                warn!(pid = helper.pid(), %err, "idle helper died");
                let mut state = self.state.lock();
                // Rare: find the tenant it served.
                let tenant = state
                    .tenants
                    .iter()
                    .find(|(_, t)| t.helper.as_ref().is_some_and(|h| Arc::ptr_eq(h, &helper)))
                    .map(|(key, _)| key.clone());
                if let Some(tenant) = tenant
                    && self.unbind(&mut state, &tenant, &helper)
                {
                    self.count_failure(&mut state, &tenant, &helper);
                }
            }
        }
        shortest
    }
}

/// Waits (polling, no lock held) until every helper has exited or the
/// deadline passes, kills the rest, and reaps all. Their stdin must already
/// be closed.
pub(super) fn reap_all(
    mut helpers: Vec<Arc<Helper>>,
    deadline: Instant,
    mut on_reaped: impl FnMut(&Helper),
) {
    loop {
        helpers.retain(|helper| match helper.try_wait() {
            Some(status) => {
                debug!(pid = helper.pid(), %status, "helper closed");
                on_reaped(helper);
                false
            }
            None => true,
        });
        if helpers.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            for helper in &helpers {
                let status = helper.kill_and_reap();
                debug!(pid = helper.pid(), %status, "helper killed after the grace");
                on_reaped(helper);
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
