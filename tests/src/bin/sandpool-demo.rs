//! sandpool-demo: a multi-tenant page server in miniature.
//!
//! Hundreds of tenants, each with its own sandboxed page-redo helper, under a
//! skewed (Zipf) workload with bursts and idle gaps, so spares, quiesce and
//! eviction all happen. One tenant is hostile: now and then its request makes
//! its helper attempt a forbidden syscall; it is killed by seccomp, its calls
//! fail with the named error, it is backed off, and every other tenant goes
//! on. Every response is checked against the same redo computed in-process;
//! any mismatch makes the demo exit non-zero.
//!
//! `--workload sql` runs the same traffic on `sandpool-sql-helper` instead:
//! each request is a SQL script (a table rebuilt, rows inserted, queried and
//! aggregated) checked against the same script run in-process on SQLite;
//! the hostile tenant sends SQL that allocates without bound, tries to
//! attach a file or never ends.
//!
//! On SIGHUP it reads its `--config` file again and applies it to the
//! running pool with `Pool::reconfigure` (the lifecycle fields; a change to
//! a field that cannot change live is refused by name and the pool goes on
//! as it was), printing what happened.
//!
//! `--workers N` runs N demo processes sharing one `[host]` directory and
//! host-wide cap (`--host-max-helpers`, or `[host]` of `--config`): the
//! demo runs itself again N times with an internal flag (a fresh exec, no
//! fork of this threaded process), samples /proc for the helpers of all of
//! them, and reports the host-wide peak and which process led.
//!
//! `cargo run --release -p sandpool-tests --bin sandpool-demo -- --help`
#![allow(clippy::disallowed_methods)] // --workers runs the demo itself again, not a helper

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use nix::sys::signal::{SigSet, Signal};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use sandpool::{CallError, Config, Pool, Stats};
use sandpool_reference_helper::redo;
use sandpool_reference_helper::reference::{OP_OPEN, OP_REDO, request};

#[derive(Parser, Debug)]
#[command(about = "A multi-tenant page server in miniature, on sandpool")]
struct Args {
    /// Number of tenants.
    #[arg(long, default_value_t = 300)]
    tenants: usize,
    /// How long to run (e.g. "20s", "1m").
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// A sandpool TOML config (as a server would use; see
    /// sandpool.example.toml). An empty `program` means the reference helper.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Seed of the workload.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Client threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// The hostile tenant's index.
    #[arg(long, default_value_t = 7)]
    hostile: usize,
    /// Target calls per second over all threads during bursts.
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// What the helpers do: page redo (the reference helper) or SQL (the
    /// SQL helper, an in-memory SQLite per tenant).
    #[arg(long, value_enum, default_value_t = Workload::Redo)]
    workload: Workload,
    /// Run this many demo processes sharing one host directory and cap
    /// (this process supervises them).
    #[arg(long)]
    workers: Option<usize>,
    /// The host-wide cap on helpers with --workers (default: `[host]` of
    /// --config, else 40).
    #[arg(long)]
    host_max_helpers: Option<usize>,
    /// Internal (set by --workers): the shared host directory.
    #[arg(long, hide = true)]
    host_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// Page redo records, on `sandpool-helper`.
    Redo,
    /// SQL scripts, on `sandpool-sql-helper`.
    Sql,
}

/// The helper the build script built.
const HELPER: &str = env!("SANDPOOL_HELPER_BIN");
/// The SQL helper the build script built.
const SQL_HELPER: &str = env!("SANDPOOL_SQL_HELPER_BIN");

fn tenant_name(index: usize) -> String {
    format!("tenant-{index:04}")
}

fn demo_config(args: &Args) -> Result<Config, Box<dyn std::error::Error>> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|err| format!("reading {}: {err}", path.display()))?;
            let mut config = toml_with_default_program(&text)?;
            if config.program == std::path::Path::new("sandpool-helper") {
                config.program = HELPER.into();
            }
            config
        }
        None => {
            let mut config = Config::new(HELPER);
            // Tuned so a short demo shows every mechanism: a few spares,
            // helpers quiesced after 2 s idle, a cap that forces evictions.
            config.spares = 8;
            config.idle_timeout = Duration::from_secs(2);
            config.max_helpers = (args.tenants * 3 / 4).clamp(args.threads + 16, 1024);
            config.request_timeout = Duration::from_secs(5);
            config.crash_backoff.initial = Duration::from_millis(500);
            config.crash_backoff.max = Duration::from_secs(4);
            config
        }
    };
    if args.workload == Workload::Sql && config.program == std::path::Path::new(HELPER) {
        config.program = SQL_HELPER.into();
        // The hostile tenant's endless query holds a client thread until
        // its deadline.
        config.request_timeout = config.request_timeout.min(Duration::from_secs(1));
    }
    if let (Some(dir), Some(max_helpers)) = (&args.host_dir, args.host_max_helpers) {
        config.host = Some(sandpool::HostConfig {
            dir: dir.clone(),
            max_helpers,
        });
    }
    // The hostile ops of the reference helper need this flag; a real
    // deployment would not pass it.
    if config.program == std::path::Path::new(HELPER)
        && !config.args.iter().any(|a| a == "--test-ops")
    {
        config.args.push("--test-ops".into());
    }
    config.validate()?;
    Ok(config)
}

/// SIGHUP: reads `--config` again and applies it to the live pool; says
/// what happened, in one line.
fn reload(pool: &Pool, args: &Args) -> String {
    let Some(path) = &args.config else {
        return "SIGHUP: no --config to reload".into();
    };
    match demo_config(args) {
        Err(err) => format!("SIGHUP: {} not applied: {err}", path.display()),
        Ok(config) => match pool.reconfigure(&config) {
            Ok(()) => format!(
                "SIGHUP: reloaded {}: spares {}, idle timeout {}, idle policy {:?}, max helpers {}",
                path.display(),
                config.spares,
                humantime::format_duration(config.idle_timeout),
                config.idle_policy,
                config.max_helpers
            ),
            Err(err) => format!("SIGHUP: {} refused, pool unchanged: {err}", path.display()),
        },
    }
}

fn toml_with_default_program(text: &str) -> Result<Config, Box<dyn std::error::Error>> {
    match Config::from_toml(text) {
        Ok(config) => Ok(config),
        Err(err) if err.field == "program" => {
            let mut with_program = format!("program = {HELPER:?}\n");
            with_program.push_str(
                &text
                    .lines()
                    .filter(|line| !line.trim_start().starts_with("program"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
            Ok(Config::from_toml(&with_program)?)
        }
        Err(err) => Err(err.into()),
    }
}

#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    ok: AtomicU64,
    mismatches: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Errors of tenants other than the hostile one.
    innocent_errors: AtomicU64,
    latencies: Mutex<Vec<Duration>>,
}

fn error_kind(err: &CallError) -> String {
    match err {
        CallError::Died { status, .. } if status.is_seccomp_kill() => {
            "killed by seccomp (SIGSYS)".into()
        }
        CallError::Died { status, .. } => format!("died ({status})"),
        CallError::BackingOff { .. } => "backed off".into(),
        CallError::Timeout { .. } => "timeout".into(),
        CallError::QueueTimeout { .. } => "deadline passed while queued".into(),
        CallError::Protocol { .. } => "protocol violation".into(),
        CallError::PoolFull { .. } | CallError::LaunchWait { .. } => "pool full".into(),
        CallError::HostFull { .. } => "host full (host.max_helpers)".into(),
        CallError::Launch(_) => "launch failed".into(),
        CallError::Helper(_) => "helper error".into(),
        other => format!("other: {other}"),
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// A self-contained SQL script for `tenant` (it rebuilds its table, so an
/// answer does not depend on whether the tenant's helper was quiesced or
/// evicted since its last call).
fn sql_script(rng: &mut SmallRng, index: usize) -> String {
    let rows = rng.random_range(1..40u32);
    let mut sql = String::from(
        "DROP TABLE IF EXISTS t; CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT, r REAL, b BLOB); INSERT INTO t VALUES ",
    );
    for k in 0..rows {
        if k > 0 {
            sql.push(',');
        }
        let r: f64 = rng.random_range(-1000.0..1000.0);
        let b: u32 = rng.random();
        sql.push_str(&format!(
            "({k}, 'tenant {index} row {k} it''s', {r:?}, X'{b:08X}')"
        ));
    }
    let m = rng.random_range(1..5u32);
    sql.push_str(&format!(
        "; SELECT k, v, r * 2, hex(b), length(v) FROM t WHERE k % {m} = 0 ORDER BY k; \
         SELECT count(*), sum(k), total(r), group_concat(k, ',') FROM t"
    ));
    sql
}

/// The hostile tenant's SQL, contained by SQLite's limits, the filter or
/// the deadline.
fn hostile_sql(rng: &mut SmallRng) -> &'static str {
    match rng.random_range(0..20) {
        0 => {
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
        }
        1..=6 => "SELECT randomblob(2000000000)",
        7..=12 => "ATTACH DATABASE '/tmp/sandpool-demo-attach' AS x",
        _ => {
            "CREATE TABLE big AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x, randomblob(100000) FROM c"
        }
    }
}

fn sql_worker(pool: &Pool, args: &Args, tally: &Tally, stop: &AtomicBool, id: usize) {
    let mut rng =
        SmallRng::seed_from_u64(args.seed ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let zipf = Zipf::new(args.tenants as f64, 1.2).expect("tenants >= 1");
    let pause = Duration::from_secs_f64(args.threads as f64 / f64::from(args.rate.max(1)));
    let started = Instant::now();
    // The scripts are self-contained: one in-process database checks them all.
    let conn = sandpool_sql_helper::open().expect("opening an in-memory SQLite database");
    let mut expected = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if started.elapsed().as_millis() % 6000 >= 4500 {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        std::thread::sleep(pause);
        let index = zipf.sample(&mut rng) as usize - 1;
        let tenant = tenant_name(index);
        let hostile = index == args.hostile;
        let (sql, check) = if hostile && rng.random_ratio(1, 4) {
            (hostile_sql(&mut rng).to_owned(), false)
        } else {
            (sql_script(&mut rng, index), true)
        };
        let verdict = if check {
            expected.clear();
            Some(
                sandpool_sql_helper::execute(&conn, &sql, &mut expected).map_err(|e| e.to_string()),
            )
        } else {
            None
        };
        let call_started = Instant::now();
        let result = pool.call(&tenant, sql.as_bytes());
        let took = call_started.elapsed();
        tally.calls.fetch_add(1, Ordering::Relaxed);
        let matches = |got: Result<&[u8], &str>| match &verdict {
            None => true,
            Some(Ok(())) => got == Ok(expected.as_slice()),
            Some(Err(message)) => got == Err(message.as_str()),
        };
        match result {
            Ok(rows) => {
                if !matches(Ok(&rows)) {
                    tally.mismatches.fetch_add(1, Ordering::Relaxed);
                    eprintln!("MISMATCH for {tenant}");
                }
                tally.ok.fetch_add(1, Ordering::Relaxed);
                tally.latencies.lock().push(took);
            }
            Err(CallError::Helper(message)) if check && matches(Err(&message)) => {
                // SQLite refused it in the helper as it did in-process.
                tally.ok.fetch_add(1, Ordering::Relaxed);
                tally.latencies.lock().push(took);
            }
            Err(err) => {
                *tally.errors.lock().entry(error_kind(&err)).or_default() += 1;
                if !hostile {
                    tally.innocent_errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("unexpected error for {tenant}: {err}");
                }
            }
        }
    }
}

fn worker(pool: &Pool, args: &Args, tally: &Tally, stop: &AtomicBool, id: usize) {
    if args.workload == Workload::Sql {
        return sql_worker(pool, args, tally, stop, id);
    }
    let mut rng =
        SmallRng::seed_from_u64(args.seed ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let zipf = Zipf::new(args.tenants as f64, 1.2).expect("tenants >= 1");
    let pause = Duration::from_secs_f64(args.threads as f64 / f64::from(args.rate.max(1)));
    let started = Instant::now();
    let mut page_request = Vec::with_capacity(redo::PAGE_SIZE + 512);
    let mut expected = Vec::with_capacity(redo::PAGE_SIZE);
    while !stop.load(Ordering::Relaxed) {
        // Bursts and gaps: every 6 s, 4.5 s of load then 1.5 s of quiet.
        // Hot tenants outlive a gap; the long tail goes idle, is quiesced
        // after idle_timeout, and comes back cold (to a spare, if one is ready).
        if started.elapsed().as_millis() % 6000 >= 4500 {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        std::thread::sleep(pause);
        let index = zipf.sample(&mut rng) as usize - 1;
        let tenant = tenant_name(index);
        let hostile = index == args.hostile;
        let payload = if hostile && rng.random_ratio(1, 4) {
            request(OP_OPEN, b"/etc/shadow")
        } else {
            page_request.clear();
            page_request.extend((0..redo::PAGE_SIZE).map(|i| (i as u8) ^ (index as u8)));
            for _ in 0..rng.random_range(1..8) {
                let len = rng.random_range(1..64usize);
                let offset = rng.random_range(0..(redo::PAGE_SIZE - len)) as u16;
                let body: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                redo::push_record(&mut page_request, offset, &body);
            }
            expected.clear();
            redo::apply(&page_request, &mut expected).expect("the demo builds valid records");
            request(OP_REDO, &page_request)
        };
        let call_started = Instant::now();
        let result = pool.call(&tenant, &payload);
        let took = call_started.elapsed();
        tally.calls.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(page) => {
                if payload[0] == OP_REDO && page != expected {
                    tally.mismatches.fetch_add(1, Ordering::Relaxed);
                    eprintln!("MISMATCH for {tenant}");
                }
                tally.ok.fetch_add(1, Ordering::Relaxed);
                tally.latencies.lock().push(took);
            }
            Err(err) => {
                *tally.errors.lock().entry(error_kind(&err)).or_default() += 1;
                if !hostile {
                    tally.innocent_errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("unexpected error for {tenant}: {err}");
                }
            }
        }
    }
}

fn helper_memory_kib(pool: &Pool, tenants: usize) -> (usize, u64) {
    let mut pids: Vec<u32> = (0..tenants)
        .filter_map(|t| pool.helper_info(tenant_name(t)))
        .map(|i| i.pid)
        .collect();
    pids.extend(pool.spare_pids());
    let total: u64 = pids
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .filter_map(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum();
    (pids.len(), total)
}

/// The progress line: the figures that move, shortest first, so that what
/// an 80-column terminal cuts off (`wide_msg` truncates, never wraps) is
/// the least telling; the summary has them all.
fn status_line(stats: &Stats, calls: u64, rate: f64, recent: &mut [Duration]) -> String {
    recent.sort_unstable();
    format!(
        "{calls} calls {rate:.0}/s p50 {} p99 {} live {} spare {} killed {} quiesced {} evicted {}",
        short(percentile(recent, 0.5)),
        short(percentile(recent, 0.99)),
        stats.live,
        stats.spare,
        stats.failures.seccomp + stats.failures.signaled + stats.failures.exited,
        stats.quiesced_idle,
        stats.evicted,
    )
}

/// A duration to 3 significant digits in the unit that fits: `987ns`,
/// `12.3us`, `1.23ms`, `4.56s`.
fn short(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    let (value, unit) = if ns < 1e3 {
        (ns, "ns")
    } else if ns < 1e6 {
        (ns / 1e3, "us")
    } else if ns < 1e9 {
        (ns / 1e6, "ms")
    } else {
        (ns / 1e9, "s")
    };
    let decimals = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    format!("{value:.decimals$}{unit}")
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(err) => {
            eprintln!("sandpool-demo: {err}");
            std::process::ExitCode::from(2)
        }
    }
}

/// `--workers N`: runs the demo N times as worker processes sharing one
/// host directory, samples the host's helpers from /proc while they run,
/// and reports the host-wide peak and the leaders seen in `leader.info`.
fn supervise(args: &Args, workers: usize) -> Result<bool, Box<dyn std::error::Error>> {
    use std::io::Read;
    let config = demo_config(args)?;
    let configured = config.host.clone();
    let max_helpers = args
        .host_max_helpers
        .or(configured.as_ref().map(|h| h.max_helpers))
        .unwrap_or(40);
    let dir = configured.map_or_else(
        || std::env::temp_dir().join(format!("sandpool-demo-host-{}", std::process::id())),
        |h| h.dir,
    );
    println!(
        "sandpool demo: {workers} worker processes sharing {} with a host-wide cap of {max_helpers} helpers",
        dir.display()
    );
    let exe = std::env::current_exe()?;
    // The same arguments, minus --workers, plus the host.
    let mut passed = Vec::new();
    let mut skip = false;
    for arg in std::env::args().skip(1) {
        if skip {
            skip = false;
            continue;
        }
        if ["--workers", "--host-max-helpers", "--host-dir", "--seed"].contains(&arg.as_str()) {
            skip = true;
            continue;
        }
        if [
            "--workers=",
            "--host-max-helpers=",
            "--host-dir=",
            "--seed=",
        ]
        .iter()
        .any(|flag| arg.starts_with(flag))
        {
            continue;
        }
        passed.push(arg);
    }
    let mut children = Vec::new();
    for index in 0..workers {
        let child = std::process::Command::new(&exe)
            .args(&passed)
            .arg("--host-dir")
            .arg(&dir)
            .args(["--host-max-helpers", &max_helpers.to_string()])
            .args(["--seed", &(args.seed + index as u64).to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|err| format!("starting worker {index}: {err}"))?;
        children.push(child);
    }
    let pids: Vec<u32> = children.iter().map(std::process::Child::id).collect();
    let outputs: Vec<_> = children
        .iter_mut()
        .map(|child| {
            let mut stdout = child.stdout.take();
            std::thread::spawn(move || {
                let mut text = String::new();
                if let Some(out) = &mut stdout {
                    let _ = out.read_to_string(&mut text);
                }
                text
            })
        })
        .collect();
    let parents: std::collections::BTreeSet<u32> = pids.iter().copied().collect();
    let mut peak = 0;
    let mut leaders: Vec<u32> = Vec::new();
    let mut statuses = vec![None; children.len()];
    let mut last_leader_check = Instant::now() - Duration::from_secs(1);
    while statuses.iter().any(Option::is_none) {
        peak = peak.max(
            sandpool_tests::host_helpers(&parents)
                .values()
                .sum::<usize>(),
        );
        if last_leader_check.elapsed() >= Duration::from_millis(100) {
            last_leader_check = Instant::now();
            let leader = std::fs::read_to_string(dir.join("leader.info"))
                .ok()
                .and_then(|text| {
                    text.lines()
                        .find_map(|l| l.strip_prefix("pid ")?.parse::<u32>().ok())
                });
            if let Some(pid) = leader.filter(|pid| leaders.last() != Some(pid)) {
                leaders.push(pid);
            }
        }
        for (child, status) in children.iter_mut().zip(&mut statuses) {
            if status.is_none() {
                *status = child.try_wait()?;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut ok = true;
    for (index, (output, status)) in outputs.into_iter().zip(&statuses).enumerate() {
        let text = output.join().unwrap_or_default();
        println!(
            "\n[worker {index}, pid {}: {}]",
            pids[index],
            status.map_or("?".into(), |s| s.to_string())
        );
        for line in text
            .lines()
            .filter(|l| l.starts_with('|') || l.starts_with("OK") || l.starts_with("FAILED"))
        {
            println!("{line}");
        }
        ok &= status.is_some_and(|s| s.success());
    }
    let leader_names: Vec<String> = leaders
        .iter()
        .map(|pid| match pids.iter().position(|p| p == pid) {
            Some(index) => format!("pid {pid} (worker {index})"),
            None => format!("pid {pid}"),
        })
        .collect();
    println!("\n| host | value |\n|---|---|");
    println!("| worker processes | {workers} |");
    println!("| host-wide cap (host.max_helpers) | {max_helpers} |");
    println!("| host-wide peak of live helpers (/proc) | {peak} |");
    println!(
        "| leader (leader.info, in order) | {} |",
        leader_names.join(", ")
    );
    if args.host_dir.is_none() && args.config.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if peak > max_helpers {
        println!("FAILED: {peak} helpers live on the host, over the cap of {max_helpers}");
        return Ok(false);
    }
    Ok(ok)
}

/// Installs the Prometheus recorder and serves its text on `addr` from a
/// thread of its own: one plain HTTP/1.1 response per connection, whatever
/// was asked. (Not the exporter's own listener: that brings hyper, h2 and a
/// tokio runtime into the demo's build, about a quarter of its crates, for
/// one GET.)
fn serve_metrics(addr: std::net::SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|err| format!("serving metrics on {addr}: {err}"))?;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|err| format!("installing the metrics recorder: {err}"))?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                // The request itself does not matter; read its head so the
                // client is not reset before it has sent it.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                // Histograms drain into their summaries at upkeep.
                handle.run_upkeep();
                let body = handle.render();
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .map_err(|err| format!("starting the metrics thread: {err}"))?;
    Ok(())
}

fn run() -> Result<bool, Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(workers) = args.workers.filter(|_| args.host_dir.is_none()) {
        if workers == 0 {
            return Err("--workers must be at least 1".into());
        }
        return supervise(&args, workers);
    }
    if args.tenants == 0 || args.threads == 0 {
        return Err("--tenants and --threads must be at least 1".into());
    }
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr)?;
        println!("metrics: http://{addr}/metrics");
    }
    let config = demo_config(&args)?;
    println!(
        "sandpool demo ({:?} workload): {} tenants (Zipf 1.2), {} client threads, {}; tenant {} is hostile; spares {}, idle timeout {}, max helpers {}",
        args.workload,
        args.tenants,
        args.threads,
        humantime::format_duration(args.duration),
        tenant_name(args.hostile),
        config.spares,
        humantime::format_duration(config.idle_timeout),
        config.max_helpers
    );
    // SIGHUP is blocked in every thread from here on (the pool's threads
    // inherit the mask) and taken by one thread with sigwait: no handler.
    let hup = SigSet::from(Signal::SIGHUP);
    hup.thread_block()
        .map_err(|err| format!("blocking SIGHUP: {err}"))?;
    let hangups = Arc::new(AtomicU64::new(0));
    {
        let hangups = hangups.clone();
        std::thread::spawn(move || {
            while let Ok(Signal::SIGHUP) = hup.wait() {
                hangups.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let pool = Arc::new(Pool::new(config)?);
    println!("pid {}: SIGHUP reloads --config", std::process::id());
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let args = Arc::new(args);
    let workers: Vec<_> = (0..args.threads)
        .map(|id| {
            let (pool, args, tally, stop) =
                (pool.clone(), args.clone(), tally.clone(), stop.clone());
            std::thread::spawn(move || worker(&pool, &args, &tally, &stop, id))
        })
        .collect();

    let bar = ProgressBar::new(args.duration.as_millis() as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:10}] {wide_msg}")
            .map_err(|err| err.to_string())?
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut last_calls = 0;
    let mut last_tick = Instant::now();
    let mut seen = 0;
    let mut reloads_seen = 0;
    while started.elapsed() < args.duration {
        std::thread::sleep(Duration::from_millis(250));
        let reloads = hangups.load(Ordering::Relaxed);
        if reloads != reloads_seen {
            reloads_seen = reloads;
            let said = reload(&pool, &args);
            if bar.is_hidden() {
                // Not a terminal: indicatif would drop the line.
                println!("{said}");
            } else {
                bar.println(said);
            }
        }
        let calls = tally.calls.load(Ordering::Relaxed);
        let rate = (calls - last_calls) as f64 / last_tick.elapsed().as_secs_f64();
        let mut recent: Vec<Duration> = tally.latencies.lock()[seen..].to_vec();
        seen += recent.len();
        (last_calls, last_tick) = (calls, Instant::now());
        bar.set_position(started.elapsed().as_millis() as u64);
        bar.set_message(status_line(&pool.stats(), calls, rate, &mut recent));
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().map_err(|_| "a client thread panicked")?;
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    let stats = pool.stats();
    let (helpers, pss_kib) = helper_memory_kib(&pool, args.tenants);
    pool.shutdown(Duration::from_secs(2));

    let mut latencies = std::mem::take(&mut *tally.latencies.lock());
    latencies.sort_unstable();
    let calls = tally.calls.load(Ordering::Relaxed);
    let mismatches = tally.mismatches.load(Ordering::Relaxed);
    let innocent = tally.innocent_errors.load(Ordering::Relaxed);
    let cold = stats.spare_hits + stats.spare_misses;
    println!("\n| summary | value |\n|---|---|");
    println!(
        "| calls | {calls} ({:.0}/s) |",
        calls as f64 / elapsed.as_secs_f64()
    );
    println!(
        "| answered and verified | {} |",
        tally.ok.load(Ordering::Relaxed)
    );
    for (kind, count) in tally.errors.lock().iter() {
        println!("| errors: {kind} (failed calls) | {count} |");
    }
    println!("| errors of non-hostile tenants | {innocent} |");
    println!("| response mismatches | {mismatches} |");
    for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)] {
        println!("| latency {name} | {} |", short(percentile(&latencies, q)));
    }
    println!(
        "| launches | {} ({} failed) |",
        stats.launches, stats.launch_failures
    );
    println!(
        "| spare hit rate | {:.0}% ({} of {} cold tenants) |",
        100.0 * stats.spare_hits as f64 / cold.max(1) as f64,
        stats.spare_hits,
        cold
    );
    println!("| quiesced (idle) | {} |", stats.quiesced_idle);
    println!("| evicted | {} |", stats.evicted);
    println!(
        "| helper kills: seccomp / other (helpers; one kill fails every call in flight on it, so failed calls can outnumber kills) | {} / {} |",
        stats.failures.seccomp,
        stats.failures.signaled
            + stats.failures.exited
            + stats.failures.timeout
            + stats.failures.protocol
    );
    println!("| back-offs engaged | {} |", stats.backoffs_engaged);
    println!(
        "| helper memory (PSS) | {} KiB over {helpers} live helpers ({} KiB each) |",
        pss_kib,
        pss_kib / helpers.max(1) as u64
    );
    if mismatches > 0 || innocent > 0 {
        println!("FAILED: {mismatches} mismatches, {innocent} errors for non-hostile tenants");
        return Ok(false);
    }
    println!("OK: every response verified; only the hostile tenant saw errors");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::short;
    use std::time::Duration;

    #[test]
    fn durations_have_three_significant_digits() {
        assert_eq!(short(Duration::from_nanos(987)), "987ns");
        assert_eq!(short(Duration::from_nanos(12_345)), "12.3us");
        assert_eq!(short(Duration::from_nanos(2_837_864)), "2.84ms");
        assert_eq!(short(Duration::from_millis(456)), "456ms");
        assert_eq!(short(Duration::from_secs_f64(4.5612)), "4.56s");
    }
}
