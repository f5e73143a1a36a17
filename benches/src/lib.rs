//! Measurement helpers shared by sandpool's benchmarks.
//!
//! This machine is shared and noisy, so every comparison runs its contenders
//! interleaved in one process run (A B A B ...) and reports the ratio of
//! medians, not absolute times alone.

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
