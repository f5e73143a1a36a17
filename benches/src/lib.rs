//! Measurement helpers shared by sandpool's benchmarks.
//!
//! This machine is shared and noisy, so every comparison runs its contenders
//! interleaved in one process run (A B A B ...) and reports the ratio of
//! medians, not absolute times alone.

pub mod replay;
pub mod tracegen;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Median and 99th percentile of a set of samples.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Median.
    pub median: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

/// Summarises samples (sorts them in place). Empty input gives zeros.
pub fn summarize(samples: &mut [Duration]) -> Summary {
    samples.sort_unstable();
    let at = |q: f64| {
        if samples.is_empty() {
            Duration::ZERO
        } else {
            samples[((samples.len() - 1) as f64 * q).round() as usize]
        }
    };
    Summary {
        n: samples.len(),
        median: at(0.5),
        p99: at(0.99),
    }
}

/// Formats a duration in microseconds with one decimal.
pub fn us(d: Duration) -> String {
    format!("{:.1} us", d.as_secs_f64() * 1e6)
}

/// One table row: name, median, p99, and the ratio of its median to a baseline's.
pub fn row(name: &str, s: &Summary, baseline: &Summary) -> String {
    format!(
        "| {name} | {} | {} | {} | {:.2}x |",
        s.n,
        us(s.median),
        us(s.p99),
        s.median.as_secs_f64() / baseline.median.as_secs_f64().max(1e-12)
    )
}

/// The environment variable that turns a harness binary into the raw-pipe
/// baseline's peer.
pub const PEER_ENV: &str = "SANDPOOL_BENCH_PIPE_PEER";

/// Call first thing in a harness's `main`: if this process was started as
/// the raw baseline's peer, echo fixed-size messages from stdin to stdout
/// until EOF and exit.
pub fn run_pipe_peer_if_asked() {
    let Some(size) = std::env::var(PEER_ENV)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
    else {
        return;
    };
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut buf = vec![0u8; size];
    while stdin.read_exact(&mut buf).is_ok() {
        if stdout
            .write_all(&buf)
            .and_then(|()| stdout.flush())
            .is_err()
        {
            break;
        }
    }
    std::process::exit(0);
}

/// Starts this binary again as the raw baseline's peer for `size`-byte
/// messages, with piped stdin and stdout.
#[allow(clippy::disallowed_methods)] // the raw-pipe baseline peer, not a helper
pub fn spawn_pipe_peer(size: usize) -> std::io::Result<std::process::Child> {
    Command::new(std::env::current_exe()?)
        .env(PEER_ENV, size.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
}

/// One round of the raw baseline: a fresh peer process, `iterations`
/// ping-pongs of `size` bytes each way, the peer ended and reaped. `setup`
/// gets the peer's pid before the first message (e.g. to pin it to a CPU).
pub fn raw_ping_pong_round(
    size: usize,
    iterations: usize,
    setup: impl FnOnce(u32),
) -> std::io::Result<Vec<Duration>> {
    let mut peer = spawn_pipe_peer(size)?;
    setup(peer.id());
    let (Some(mut peer_in), Some(mut peer_out)) = (peer.stdin.take(), peer.stdout.take()) else {
        return Err(std::io::Error::other("the peer's stdio is not piped"));
    };
    let msg = vec![0x5Au8; size];
    let mut back = vec![0u8; size];
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = std::time::Instant::now();
        peer_in.write_all(&msg)?;
        peer_out.read_exact(&mut back)?;
        samples.push(t.elapsed());
    }
    drop(peer_in);
    peer.wait()?;
    Ok(samples)
}

/// Which slots of [`keep_in_flight`] were woken, and the task to wake.
struct Woken {
    slots: std::sync::atomic::AtomicU64,
    task: std::sync::Mutex<Option<std::task::Waker>>,
}

/// The waker of one slot: marks the slot, then wakes the polling task.
struct SlotWaker {
    slot: u32,
    woken: std::sync::Arc<Woken>,
}

impl std::task::Wake for SlotWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        self.woken
            .slots
            .fetch_or(1 << self.slot, std::sync::atomic::Ordering::AcqRel);
        let task = self
            .woken
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(task) = task {
            task.wake();
        }
    }
}

/// Keeps `window` (at most 64) futures made by `make` in flight from the
/// one task that awaits this, making the next as each completes (handing
/// its output to `done`), until `total` have completed. Each slot has its
/// own waker, so a wake-up polls only the futures that were woken (like
/// `FuturesUnordered`, with no crate beyond std).
pub async fn keep_in_flight<F: std::future::Future>(
    window: usize,
    total: usize,
    mut make: impl FnMut() -> F,
    mut done: impl FnMut(F::Output),
) {
    use std::sync::atomic::Ordering;
    let window = window.clamp(1, 64).min(total);
    let woken = std::sync::Arc::new(Woken {
        slots: std::sync::atomic::AtomicU64::new(0),
        task: std::sync::Mutex::new(None),
    });
    let wakers: Vec<std::task::Waker> = (0..window as u32)
        .map(|slot| {
            std::task::Waker::from(std::sync::Arc::new(SlotWaker {
                slot,
                woken: woken.clone(),
            }))
        })
        .collect();
    let mut slots: Vec<Option<std::pin::Pin<Box<F>>>> =
        (0..window).map(|_| Some(Box::pin(make()))).collect();
    let (mut made, mut completed) = (window, 0);
    // Every slot's first poll.
    let mut ready: u64 = if window == 64 {
        u64::MAX
    } else {
        (1 << window) - 1
    };
    std::future::poll_fn(|cx| {
        *woken
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(cx.waker().clone());
        ready |= woken.slots.swap(0, Ordering::AcqRel);
        while ready != 0 {
            let slot = ready.trailing_zeros() as usize;
            ready &= !(1 << slot);
            let Some(future) = slots[slot].as_mut() else {
                continue;
            };
            let mut slot_cx = std::task::Context::from_waker(&wakers[slot]);
            if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut slot_cx) {
                done(output);
                completed += 1;
                if made < total {
                    // Polled at once in the same slot: it starts now.
                    slots[slot] = Some(Box::pin(make()));
                    made += 1;
                    ready |= 1 << slot;
                } else {
                    slots[slot] = None;
                }
            }
            if ready == 0 {
                ready = woken.slots.swap(0, Ordering::AcqRel);
            }
        }
        if completed == total {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    #[test]
    fn keep_in_flight_completes_every_future_and_never_more_than_the_window_at_once() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let (in_flight, most, completed) = (Cell::new(0usize), Cell::new(0usize), Cell::new(0));
        runtime.block_on(super::keep_in_flight(
            8,
            100,
            || {
                in_flight.set(in_flight.get() + 1);
                most.set(most.get().max(in_flight.get()));
                async {
                    tokio::task::yield_now().await;
                    tokio::task::yield_now().await;
                }
            },
            |()| {
                in_flight.set(in_flight.get() - 1);
                completed.set(completed.get() + 1);
            },
        ));
        assert_eq!(completed.get(), 100);
        assert_eq!(most.get(), 8);
    }
}
