//! Shared harness for sandpool's integration tests: where the reference
//! helper is, configurations, and facts about this process (open fds,
//! children) to assert on; and the conformance runner ([`conformance`],
//! the `sandpool-conformance` binary).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sandpool::HelperConfig;

pub mod conformance;

/// The reference helper binary, built by this crate's build script.
pub fn helper_bin() -> PathBuf {
    PathBuf::from(env!("SANDPOOL_HELPER_BIN"))
}

/// The C reference helper (`tests/c/reference_helper.c` linked against the
/// C runtime, `helper/capi`), built by this crate's build script.
pub fn c_helper_bin() -> PathBuf {
    PathBuf::from(env!("SANDPOOL_C_HELPER_BIN"))
}

/// The SQL helper (`helper/sql`: each helper an in-memory SQLite database),
/// built by this crate's build script.
pub fn sql_helper_bin() -> PathBuf {
    PathBuf::from(env!("SANDPOOL_SQL_HELPER_BIN"))
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

/// One process of `/proc`: its pid, command name, state and parent.
struct ProcStat {
    pid: u32,
    comm: String,
    state: char,
    ppid: u32,
}

/// Every process `/proc` lists and whose `stat` can still be read (one
/// that exited in between is skipped).
fn proc_stats() -> std::io::Result<impl Iterator<Item = ProcStat>> {
    Ok(std::fs::read_dir("/proc")?.flatten().filter_map(|entry| {
        let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name is parenthesised and may hold anything; the
        // fields after its last ')' are state, ppid, ...
        let (open, close) = (stat.find('(')?, stat.rfind(')')?);
        let mut fields = stat.get(close + 2..)?.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        Some(ProcStat {
            pid,
            comm: stat[open + 1..close].to_owned(),
            state,
            ppid,
        })
    }))
}

/// The children of this process (any state, zombies included), from /proc.
pub fn children() -> Vec<(u32, char)> {
    let me = std::process::id();
    proc_stats()
        .unwrap()
        .filter(|proc| proc.ppid == me)
        .map(|proc| (proc.pid, proc.state))
        .collect()
}

/// The helpers on the host whose parent is one of `parents`, from /proc:
/// a child named `sandpool-helper` (after its own rename) or running the
/// helper's image (before it), zombies included, so nothing is missed.
pub fn host_helpers(
    parents: &std::collections::BTreeSet<u32>,
) -> std::collections::BTreeMap<u32, usize> {
    let mut per_parent = std::collections::BTreeMap::new();
    let Ok(procs) = proc_stats() else {
        return per_parent;
    };
    for proc in procs.filter(|proc| parents.contains(&proc.ppid)) {
        let helper = proc.comm == "sandpool-helper"
            || std::fs::read_link(format!("/proc/{}/exe", proc.pid))
                .is_ok_and(|exe| exe.to_string_lossy().contains("sandpool-helper"));
        if helper {
            *per_parent.entry(proc.ppid).or_default() += 1;
        }
    }
    per_parent
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

/// Tenants of a well-behaved pool calling it the whole time, beside a
/// hostile case: their calls must all keep succeeding.
#[derive(Debug)]
pub struct Bystanders {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Bystanders {
    /// Starts `threads` threads, each calling tenant `good-N` of `pool`
    /// with echoes until [`finish`](Self::finish).
    pub fn start(pool: &std::sync::Arc<sandpool::Pool>, threads: usize) -> Bystanders {
        use sandpool_reference_helper::reference::{OP_ECHO, request};
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ok = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads = (0..threads)
            .map(|t| {
                let (pool, stop, ok) = (pool.clone(), stop.clone(), ok.clone());
                std::thread::spawn(move || {
                    let mut failures = Vec::new();
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let body = format!("bystander {t} call {i}");
                        match pool.call(format!("good-{t}"), &request(OP_ECHO, body.as_bytes())) {
                            Ok(reply) if reply == body.as_bytes() => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => failures.push(format!("{other:?}")),
                        }
                        i += 1;
                    }
                    failures
                })
            })
            .collect();
        Bystanders { stop, ok, threads }
    }

    /// Calls answered so far.
    pub fn calls(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the threads; returns every failed call.
    pub fn finish(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|thread| thread.join().unwrap())
            .collect()
    }
}

/// This test binary's tracing log, captured in memory: what the pool logs,
/// the helpers' stderr it forwards among it. The first call installs the
/// global subscriber (at DEBUG); every call returns the same log.
pub fn captured_log() -> &'static CapturedLog {
    static LOG: std::sync::OnceLock<CapturedLog> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let log = CapturedLog::default();
        let writer = log.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .init();
        log
    })
}

/// See [`captured_log`].
#[derive(Clone, Debug, Default)]
pub struct CapturedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLog {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(
            &self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }

    /// How many times `needle` was logged so far.
    pub fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }
}

/// The threads of this process named `name` (their `comm`, cut at 15
/// bytes by the kernel: a pool's reactor is `sandpool-reacto`).
pub fn threads_named(name: &str) -> Vec<u32> {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|task| {
                    let tid: u32 = task.ok()?.file_name().to_str()?.parse().ok()?;
                    let comm =
                        std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
                    (comm.trim_end() == name).then_some(tid)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Runs the tests of one test binary one at a time while the guard lives
/// (for tests that count the process's fds or children, or change its
/// limits). Each test binary links its own copy of this crate, so each has
/// its own lock; a test that panicked holding it does not poison the rest.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
