//! Several processes on one host (`Config.host`): real worker processes
//! (`sandpool-host-worker`) sharing one directory. The host's helpers are
//! counted from /proc (never from the pools), the locks read from
//! /proc/locks and probed with the test's own `flock`.
#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)] // runs the worker binary, not a helper

use std::collections::VecDeque;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sandpool::{HostConfig, Pool};
use sandpool_reference_helper::reference::{OP_ECHO, request};
use sandpool_tests::{fds_of, host_helpers, pool_config, serial, wait_for};

const WORKER: &str = env!("CARGO_BIN_EXE_sandpool-host-worker");

/// A fresh host directory under the system's temporary directory, removed
/// on drop.
struct HostDir(PathBuf);

impl HostDir {
    fn new(name: &str) -> HostDir {
        let dir = std::env::temp_dir().join(format!(
            "sandpool-host-{name}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        HostDir(dir)
    }

    fn slot(&self, index: usize) -> PathBuf {
        self.0.join(format!("slot-{index}.lock"))
    }
}

impl Drop for HostDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One line a worker printed, and when the test read it.
struct Line {
    worker: usize,
    at: Instant,
    text: String,
}

struct Workers {
    children: Vec<Child>,
    stdins: Vec<Option<ChildStdin>>,
    pids: Vec<u32>,
    lines: Receiver<Line>,
    /// Lines read and not yet looked for.
    pending: VecDeque<Line>,
    /// Everything read so far, by worker.
    seen: Vec<Vec<String>>,
    alive: Vec<bool>,
}

impl Workers {
    fn start(dir: &HostDir, count: usize, max_helpers: usize, extra: &[&str]) -> Workers {
        let (tx, lines): (Sender<Line>, _) = std::sync::mpsc::channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        for worker in 0..count {
            let mut child = Command::new(WORKER)
                .arg("--dir")
                .arg(&dir.0)
                .args(["--max-helpers", &max_helpers.to_string()])
                .args(["--spares", &(worker % 3).to_string()])
                .args(["--seed", &worker.to_string()])
                .args(extra)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            stdins.push(child.stdin.take());
            let stdout = child.stdout.take().unwrap();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for text in BufReader::new(stdout).lines() {
                    let Ok(text) = text else { break };
                    let line = Line {
                        worker,
                        at: Instant::now(),
                        text,
                    };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            children.push(child);
        }
        let pids = children.iter().map(Child::id).collect();
        let mut workers = Workers {
            children,
            stdins,
            pids,
            lines,
            pending: VecDeque::new(),
            seen: vec![Vec::new(); count],
            alive: vec![true; count],
        };
        for worker in 0..count {
            workers.wait_line(worker, "ready ", Duration::from_secs(30));
        }
        workers
    }

    /// The first line not yet looked for that `matches`, reading more until
    /// `timeout`.
    fn take(&mut self, timeout: Duration, matches: impl Fn(&Line) -> bool) -> Option<Line> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(at) = self.pending.iter().position(&matches) {
                return self.pending.remove(at);
            }
            let left = until.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            self.seen[line.worker].push(line.text.clone());
            self.pending.push_back(line);
        }
    }

    /// The line of `worker` starting with `prefix`.
    fn wait_line(&mut self, worker: usize, prefix: &str, timeout: Duration) -> Line {
        self.take(timeout, |line| {
            line.worker == worker && line.text.starts_with(prefix)
        })
        .unwrap_or_else(|| panic!("worker {worker} never printed {prefix:?}"))
    }

    /// The next line of any worker starting with `prefix`.
    fn next_line(&mut self, prefix: &str, timeout: Duration) -> Option<Line> {
        self.take(timeout, |line| line.text.starts_with(prefix))
    }

    fn kill(&mut self, worker: usize) -> Instant {
        kill(Pid::from_raw(self.pids[worker] as i32), Signal::SIGKILL).unwrap();
        self.children[worker].wait().unwrap();
        self.alive[worker] = false;
        Instant::now()
    }

    /// Closes the stdin of every live worker, waits for each one's `bye`
    /// and its exit (status 0); returns each one's summary and errors.
    fn finish(mut self) -> Vec<(String, Vec<String>)> {
        for stdin in &mut self.stdins {
            drop(stdin.take());
        }
        let mut out = Vec::new();
        for worker in 0..self.children.len() {
            if !self.alive[worker] {
                continue;
            }
            self.wait_line(worker, "bye", Duration::from_secs(60));
            let status = self.children[worker].wait().unwrap();
            assert!(status.success(), "worker {worker}: {status}");
            let lines = &self.seen[worker];
            let summary = lines
                .iter()
                .find(|l| l.starts_with("summary "))
                .cloned()
                .unwrap();
            let errors = lines
                .iter()
                .filter(|l| l.starts_with("error "))
                .cloned()
                .collect();
            out.push((summary, errors));
        }
        out
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A field `key=<n>` of a summary line.
fn field(summary: &str, key: &str) -> u64 {
    summary
        .split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .unwrap()
        .parse()
        .unwrap()
}

/// The pids holding a `flock` on `path`, from /proc/locks (waiters, the
/// `->` lines, are not holders).
fn flock_holders(path: &Path) -> Vec<u32> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let dev = meta.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let id = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    // One read() into a buffer large enough for the whole table: a
    // seq_file read in several calls may show a lock released between them
    // beside the one taken after it.
    let mut buffer = vec![0u8; 1 << 20];
    let len = std::io::Read::read(
        &mut std::fs::File::open("/proc/locks").unwrap(),
        &mut buffer,
    )
    .unwrap();
    String::from_utf8_lossy(&buffer[..len])
        .lines()
        .filter(|line| !line.contains("->"))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&id.as_str()))
                .then(|| fields[4].parse().ok())
                .flatten()
        })
        .collect()
}

/// Whether the test itself can take (and at once release) `path`'s lock.
fn free(path: &Path) -> bool {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok()
}

/// Samples the host's helpers (and the leader lock's holders) every
/// couple of milliseconds until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, usize, usize)>,
}

impl Sampler {
    fn start(pids: &[u32], leader_lock: PathBuf) -> Sampler {
        let parents: BTreeSet<u32> = pids.iter().copied().collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut peak, mut samples, mut most_leaders) = (0, 0, 0);
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(host_helpers(&parents).values().sum());
                let holders = flock_holders(&leader_lock);
                if holders.len() > 1 {
                    eprintln!("leader.lock held by {holders:?}");
                }
                most_leaders = most_leaders.max(holders.len());
                samples += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (peak, samples, most_leaders)
        });
        Sampler { stop, thread }
    }

    /// The peak of helpers, the samples taken, and the most holders of the
    /// leader lock seen in one sample.
    fn finish(self) -> (usize, usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[test]
fn four_processes_stay_under_the_host_cap_and_every_tenant_is_served() {
    let dir = HostDir::new("cap");
    let workers = Workers::start(&dir, 4, 20, &["--tenants", "30"]);
    let sampler = Sampler::start(&workers.pids, dir.0.join("leader.lock"));
    std::thread::sleep(Duration::from_secs(4));
    let summaries = workers.finish();
    let (peak, samples, most_leaders) = sampler.finish();
    println!("peak {peak} helpers on the host over {samples} samples");
    assert!(samples > 100, "{samples} samples");
    assert!(
        peak <= 20,
        "{peak} helpers live on the host, over the cap of 20"
    );
    assert!(peak > 0);
    assert!(
        most_leaders <= 1,
        "{most_leaders} holders of leader.lock at once"
    );
    for (summary, errors) in &summaries {
        println!("{summary}");
        assert_eq!(field(summary, "answered"), 30, "{summary}");
        assert_eq!(field(summary, "other"), 0, "{summary}: {errors:?}");
        assert!(errors.is_empty(), "{errors:?}");
    }
    // Every worker is gone: no slot is left held.
    for index in 0..20 {
        let slot = dir.slot(index);
        if slot.exists() {
            assert!(free(&slot), "slot {index} still held");
        }
    }
    assert!(free(&dir.0.join("leader.lock")));
}

#[test]
fn a_killed_process_frees_its_slots_for_the_others_at_once() {
    let dir = HostDir::new("kill");
    let mut workers = Workers::start(&dir, 3, 12, &["--tenants", "30"]);
    std::thread::sleep(Duration::from_millis(1500));
    // The process holding the most slots, by the kernel's own record.
    let mut held: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for index in 0..12 {
        for pid in flock_holders(&dir.slot(index)) {
            held.entry(pid).or_default().push(index);
        }
    }
    let (&victim_pid, slots) = held.iter().max_by_key(|(_, slots)| slots.len()).unwrap();
    let slots = slots.clone();
    assert!(!slots.is_empty());
    let victim = workers.pids.iter().position(|p| *p == victim_pid).unwrap();
    let dead = workers.kill(victim);
    // Its slots are its no longer: free, or already taken by the others.
    let released = wait_for(Duration::from_millis(100), || {
        slots
            .iter()
            .all(|&index| !flock_holders(&dir.slot(index)).contains(&victim_pid))
    });
    let took = dead.elapsed();
    assert!(
        released,
        "slots {slots:?} still held by the killed {victim_pid}"
    );
    println!(
        "{} slots of the killed worker released {took:?} after its wait() returned",
        slots.len()
    );
    // And the others go on using them.
    let reused = wait_for(Duration::from_secs(5), || {
        slots.iter().any(|&index| {
            let holders = flock_holders(&dir.slot(index));
            holders.iter().any(|pid| *pid != victim_pid)
        })
    });
    assert!(reused, "nobody took a freed slot");
    for (summary, errors) in workers.finish() {
        assert_eq!(field(&summary, "answered"), 30, "{summary}");
        assert_eq!(field(&summary, "other"), 0, "{summary}: {errors:?}");
    }
}

#[test]
fn a_killed_leader_is_replaced_by_exactly_one_within_100ms() {
    let dir = HostDir::new("leader");
    let leader_lock = dir.0.join("leader.lock");
    let mut workers = Workers::start(&dir, 3, 12, &["--tenants", "10"]);
    let sampler = Sampler::start(&workers.pids, leader_lock.clone());
    let mut leader = workers
        .next_line("leader ", Duration::from_secs(10))
        .unwrap();
    for round in 0..2 {
        assert_eq!(flock_holders(&leader_lock), [workers.pids[leader.worker]]);
        let dead = workers.kill(leader.worker);
        let next = workers
            .next_line("leader ", Duration::from_secs(5))
            .expect("a new leader");
        let took = next.at.saturating_duration_since(dead);
        println!("round {round}: new leader {} after {took:?}", next.text);
        assert_ne!(next.worker, leader.worker);
        assert!(
            took < Duration::from_millis(100),
            "took over after {took:?}"
        );
        // Exactly one: the kernel shows one holder, the new leader.
        assert_eq!(flock_holders(&leader_lock), [workers.pids[next.worker]]);
        leader = next;
    }
    // Its heartbeat names it within a beat.
    let pid = workers.pids[leader.worker];
    assert!(wait_for(Duration::from_secs(3), || {
        std::fs::read_to_string(dir.0.join("leader.info"))
            .is_ok_and(|text| text.lines().any(|l| l == format!("pid {pid}")))
    }));
    let remaining = workers.alive.iter().filter(|a| **a).count();
    assert_eq!(remaining, 1);
    let summaries = workers.finish();
    let (_, _, most_leaders) = sampler.finish();
    assert_eq!(most_leaders, 1, "leader.lock holders at once");
    // No worker but the leaders printed `leader`, and each at most once.
    for (summary, _) in &summaries {
        assert_eq!(field(summary, "other"), 0, "{summary}");
    }
}

/// The pool's own lock fds (in this process) and whether each is
/// close-on-exec, from /proc/self/fdinfo.
fn lock_fds_under(dir: &Path) -> Vec<(i32, bool)> {
    sandpool_tests::open_fds()
        .into_iter()
        .filter(|fd| {
            std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .is_ok_and(|target| target.starts_with(dir))
        })
        .map(|fd| {
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
            let flags = info
                .lines()
                .find_map(|line| line.strip_prefix("flags:"))
                .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
                .unwrap();
            (fd, flags & 0o2_000_000 != 0)
        })
        .collect()
}

#[test]
fn no_lock_fd_reaches_a_helper_and_every_one_is_cloexec() {
    let _serial = serial();
    let dir = HostDir::new("fds");
    let mut config = pool_config(&[]);
    config.spares = 2;
    config.host = Some(HostConfig {
        dir: dir.0.clone(),
        max_helpers: 8,
    });
    let pool = Pool::new(config).unwrap();
    assert_eq!(pool.call("t", &request(OP_ECHO, b"x")).unwrap(), b"x");
    assert!(wait_for(Duration::from_secs(10), || pool
        .spare_pids()
        .len()
        == 2));
    assert!(wait_for(Duration::from_secs(5), || pool.is_host_leader()));
    let mut helpers = pool.spare_pids();
    helpers.push(pool.helper_info("t").unwrap().pid);
    for pid in &helpers {
        assert_eq!(
            fds_of(*pid),
            BTreeSet::from([0, 1, 2]),
            "helper {pid} holds more than its pipes"
        );
    }
    if let Some(launcher) = pool.stats().launcher_pid {
        for fd in fds_of(launcher) {
            let target = std::fs::read_link(format!("/proc/{launcher}/fd/{fd}"));
            assert!(
                !target.is_ok_and(|t| t.starts_with(&dir.0)),
                "the launcher holds a host lock file"
            );
        }
    }
    // Three slots, the process's own file, the leader lock: all O_CLOEXEC.
    let fds = lock_fds_under(&dir.0);
    assert!(fds.len() >= 5, "{fds:?}");
    assert!(fds.iter().all(|(_, cloexec)| *cloexec), "{fds:?}");
    drop(pool);
    assert!(
        lock_fds_under(&dir.0).is_empty(),
        "lock fds left after the pool"
    );
    assert!(free(&dir.0.join("leader.lock")));
}

#[test]
fn a_dropped_pool_waiting_to_lead_lets_go_when_it_gets_the_lock() {
    let _serial = serial();
    let dir = HostDir::new("drop");
    let host = HostConfig {
        dir: dir.0.clone(),
        max_helpers: 4,
    };
    let make = || {
        let mut config = pool_config(&[]);
        config.spares = 0;
        config.host = Some(host.clone());
        Pool::new(config).unwrap()
    };
    let first = make();
    assert!(wait_for(Duration::from_secs(5), || first.is_host_leader()));
    // A second pool (in this process: a second open of leader.lock is a
    // second description, which conflicts) waits to lead, then is dropped.
    let second = make();
    assert!(!second.is_host_leader());
    drop(second);
    // Its thread is still blocked in flock, holding its fd of leader.lock.
    let leader_fds = || {
        lock_fds_under(&dir.0)
            .iter()
            .filter(|(fd, _)| {
                std::fs::read_link(format!("/proc/self/fd/{fd}"))
                    .is_ok_and(|t| t.ends_with("leader.lock"))
            })
            .count()
    };
    assert_eq!(leader_fds(), 2);
    drop(first);
    // The waiter gets the lock, sees its pool gone, releases it and exits.
    let started = Instant::now();
    assert!(wait_for(Duration::from_millis(500), || leader_fds() == 0));
    println!(
        "the orphaned waiter let go {:?} after the leader's pool was dropped",
        started.elapsed()
    );
    assert!(free(&dir.0.join("leader.lock")));
}

#[test]
fn host_config_is_validated_and_fixed() {
    let mut config = pool_config(&[]);
    config.host = Some(HostConfig {
        dir: "relative/dir".into(),
        max_helpers: 4,
    });
    assert_eq!(config.validate().unwrap_err().field, "host.dir");
    config.host = Some(HostConfig {
        dir: "/run/sandpool/x".into(),
        max_helpers: 0,
    });
    assert_eq!(config.validate().unwrap_err().field, "host.max_helpers");
    let parsed = sandpool::Config::from_toml(
        "program = \"/bin/true\"\n[host]\ndir = \"/run/sandpool/pageserver\"\nmax_helpers = 200\n",
    )
    .unwrap();
    assert_eq!(
        parsed.host,
        Some(HostConfig {
            dir: "/run/sandpool/pageserver".into(),
            max_helpers: 200
        })
    );
    let mut without = parsed.clone();
    without.host = None;
    assert_eq!(parsed.first_fixed_change(&without), Some("host"));
}
