//! sandpool-host-worker: one of several processes sharing a `[host]`
//! directory, for the host-cap tests (`tests/tests/host_cap.rs`) and the
//! benches. Runs a pool with `host` set and drives `--tenants` tenants with
//! churn (a short idle timeout, random gaps) from `--threads` threads until
//! its stdin reaches EOF; then gets every tenant not yet answered one
//! answer, and exits 0.
//!
//! Machine-readable lines on stdout, one fact each:
//! - `ready <pid>`: the pool is up;
//! - `leader <pid>`: this process became the host leader (watched every
//!   millisecond);
//! - `slots <n>`: this pool's live helpers (every 100 ms);
//! - `summary answered=<a> tenants=<t> calls=<c> host_full=<h> other=<o>`
//!   at the end, then one `error <text>` line per distinct other error,
//!   then `bye`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sandpool::{CallError, Config, HostConfig, Pool};
use sandpool_reference_helper::reference::{OP_ECHO, request};

#[derive(Parser, Debug)]
struct Args {
    /// The shared host directory (`host.dir`).
    #[arg(long)]
    dir: PathBuf,
    /// The host-wide cap (`host.max_helpers`).
    #[arg(long)]
    max_helpers: usize,
    /// Tenants this process drives.
    #[arg(long, default_value_t = 30)]
    tenants: usize,
    /// Calling threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Spares of this pool.
    #[arg(long, default_value_t = 1)]
    spares: usize,
    /// Idle timeout of this pool's helpers (churn).
    #[arg(long, default_value = "30ms", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Longest pause between two calls of a thread.
    #[arg(long, default_value = "4ms", value_parser = humantime::parse_duration)]
    max_gap: Duration,
    /// Seed of the tenant choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

const HELPER: &str = env!("SANDPOOL_HELPER_BIN");

#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    host_full: AtomicU64,
    answered: Mutex<Vec<bool>>,
    other: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn record(&self, tenant: usize, result: Result<Vec<u8>, CallError>, expected: &[u8]) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(reply) if reply == expected => self.answered.lock()[tenant] = true,
            Ok(_) => *self.other.lock().entry("wrong reply".into()).or_default() += 1,
            Err(CallError::HostFull { .. }) => {
                self.host_full.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => *self.other.lock().entry(err.to_string()).or_default() += 1,
        }
    }
}

fn call(pool: &Pool, tally: &Tally, tenant: usize, i: u64) -> bool {
    let body = format!("tenant {tenant} call {i}");
    let result = pool.call(format!("t{tenant}"), &request(OP_ECHO, body.as_bytes()));
    let ok = matches!(&result, Ok(reply) if reply == body.as_bytes());
    tally.record(tenant, result, body.as_bytes());
    ok
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sandpool-host-worker: {err}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let pid = std::process::id();
    let mut config = Config::new(HELPER);
    config.spares = args.spares;
    config.idle_timeout = args.idle_timeout;
    config.max_helpers = 64;
    config.request_timeout = Duration::from_secs(10);
    config.shutdown_grace = Duration::from_millis(500);
    config.host = Some(HostConfig {
        dir: args.dir.clone(),
        max_helpers: args.max_helpers,
    });
    let pool = Arc::new(Pool::new(config)?);
    println!("ready {pid}");
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally {
        answered: Mutex::new(vec![false; args.tenants]),
        ..Tally::default()
    });
    let watcher = {
        let (pool, stop) = (pool.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut leading = false;
            let mut next_slots = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let now = pool.is_host_leader();
                if now && !leading {
                    println!("leader {pid}");
                }
                leading = now;
                if Instant::now() >= next_slots {
                    println!("slots {}", pool.stats().live);
                    next_slots = Instant::now() + Duration::from_millis(100);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let threads: Vec<_> = (0..args.threads)
        .map(|t| {
            let (pool, stop, tally) = (pool.clone(), stop.clone(), tally.clone());
            let (tenants, max_gap, seed) = (args.tenants, args.max_gap, args.seed);
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed ^ ((t as u64) << 32) ^ u64::from(pid));
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    call(&pool, &tally, rng.random_range(0..tenants), i);
                    i += 1;
                    let gap = rng.random_range(Duration::ZERO..=max_gap);
                    std::thread::sleep(gap);
                }
            })
        })
        .collect();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().map_err(|_| "a calling thread panicked")?;
    }
    let _ = watcher.join();
    // Every tenant gets an answer: the ones not yet answered, retried
    // while the host is full.
    let until = Instant::now() + Duration::from_secs(30);
    for tenant in 0..args.tenants {
        let mut i = 0;
        while !tally.answered.lock()[tenant] && Instant::now() < until {
            if !call(&pool, &tally, tenant, i) {
                std::thread::sleep(Duration::from_millis(5));
            }
            i += 1;
        }
    }
    let answered = tally.answered.lock().iter().filter(|a| **a).count();
    let other = tally.other.lock();
    println!(
        "summary answered={answered} tenants={} calls={} host_full={} other={}",
        args.tenants,
        tally.calls.load(Ordering::Relaxed),
        tally.host_full.load(Ordering::Relaxed),
        other.values().sum::<u64>()
    );
    for (text, count) in other.iter() {
        println!("error {count}x {text}");
    }
    drop(other);
    pool.shutdown(Duration::from_millis(500));
    println!("bye");
    Ok(())
}
