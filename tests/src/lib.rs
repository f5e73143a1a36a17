//! Shared harness for sandpool's integration tests: where the reference
//! helper is, configurations, and facts about this process (open fds,
//! children) to assert on.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sandpool::HelperConfig;

/// The reference helper binary, built by this crate's build script.
pub fn helper_bin() -> PathBuf {
    PathBuf::from(env!("SANDPOOL_HELPER_BIN"))
}

/// A default configuration for the reference helper with the given arguments.
pub fn config(args: &[&str]) -> HelperConfig {
    let mut config = HelperConfig::new(helper_bin());
    config.args = args.iter().map(|arg| arg.to_string()).collect();
    config
}

/// A deadline `secs` seconds from now.
pub fn deadline(secs: f64) -> Instant {
    Instant::now() + Duration::from_secs_f64(secs)
}

/// The fds this process has open, from `/proc/self/fd` (the listing's own fd
/// excluded).
pub fn open_fds() -> BTreeSet<i32> {
    let mut fds: BTreeSet<i32> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // The directory stream's own fd is the one that no longer exists.
    fds.retain(|fd| std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok());
    fds
}

/// The fds a process has open, from `/proc/PID/fd`.
pub fn fds_of(pid: u32) -> BTreeSet<i32> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The children of this process (any state, zombies included), from /proc.
pub fn children() -> Vec<(u32, char)> {
    let me = std::process::id();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state, ppid, ...
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid: u32 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if ppid == me {
            out.push((pid, state));
        }
    }
    out
}

/// Whether a process exists (in any state, zombie included).
pub fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Polls `condition` every millisecond until it holds or `timeout` passes;
/// returns whether it held. For waiting on background work (a spare being
/// launched, a helper being quiesced); the assertion is on the condition.
pub fn wait_for(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until `helper` has `calls` calls in flight, then a moment more: a
/// call is counted just before its frame is written, and a test that orders
/// its callers needs the frames in the pipe in that order. If the machine is
/// so loaded that a write comes later still, the order may differ and the
/// test checks less; it never fails for that reason alone.
pub fn wait_for_in_flight(helper: &sandpool::Helper, calls: usize) {
    assert!(
        wait_for(Duration::from_secs(10), || helper.in_flight() == calls),
        "{calls} calls in flight"
    );
    std::thread::sleep(Duration::from_millis(50));
}

/// Calls `helper` with `request` from a new thread, with a deadline `secs`
/// seconds from now.
pub fn call_in_thread(
    helper: &std::sync::Arc<sandpool::Helper>,
    request: Vec<u8>,
    secs: f64,
) -> std::thread::JoinHandle<Result<Vec<u8>, sandpool::CallError>> {
    let helper = helper.clone();
    std::thread::spawn(move || helper.call(&request, deadline(secs)))
}

/// A pool configuration for the reference helper with the given arguments.
pub fn pool_config(args: &[&str]) -> sandpool::Config {
    let mut config = sandpool::Config::new(helper_bin());
    config.args = args.iter().map(|arg| arg.to_string()).collect();
    config
}

/// This process's resident set, in KiB (`VmRSS` in `/proc/self/status`).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
