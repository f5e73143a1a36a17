//! sandpool against what its users would otherwise do, side by side in one
//! run, written to `results.md`, `results.json` and SVG plots.
//!
//! `cargo run --release -p sandpool-benches --bin compare -- [--quick] [--out DIR]`
//!
//! Every figure is a median with its p99; every comparison is a ratio of
//! contenders interleaved in the same process run (A B A B ...), because
//! this machine is shared and noisy and an absolute time means little.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use plotters::prelude::*;
use sandpool::{Config, HelperConfig, LaunchMode, Launcher, Pool};
use sandpool_benches::{Summary, summarize};
use sandpool_reference_helper::reference::{OP_ECHO, request};
use serde_json::{Value, json};

const HELPER: &str = env!("SANDPOOL_HELPER_STATIC_BIN");
/// The C reference helper (tests/c/reference_helper.c on helper/capi).
const C_HELPER: &str = env!("SANDPOOL_C_HELPER_BIN");
const FLOOR: &str = env!("SANDPOOL_FLOOR_BIN");
/// The same floor program linked against musl (the Rust toolchain's own),
/// when the toolchain has the musl target.
const FLOOR_MUSL: Option<&str> = option_env!("SANDPOOL_FLOOR_MUSL_BIN");
/// The reference helper linked statically against glibc (`HELPER` is the
/// musl build where the toolchain has the target).
const HELPER_GLIBC: &str = env!("SANDPOOL_HELPER_GLIBC_STATIC_BIN");

struct Run {
    quick: bool,
    md: String,
    json: BTreeMap<String, Value>,
    out: PathBuf,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn fmt_us(d: Duration) -> String {
    let v = us(d);
    if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.0} us")
    }
}

fn summary_json(s: &Summary) -> Value {
    json!({ "n": s.n, "median_us": us(s.median), "p99_us": us(s.p99) })
}

impl Run {
    fn section(&mut self, title: &str, intro: &str) {
        println!("== {title}");
        self.md.push_str(&format!("\n## {title}\n\n{intro}\n\n"));
    }

    fn table(&mut self, header: &[&str], rows: Vec<Vec<String>>) {
        self.md.push_str(&format!("| {} |\n", header.join(" | ")));
        self.md
            .push_str(&format!("|{}|\n", vec!["---"; header.len()].join("|")));
        for row in rows {
            println!("   {}", row.join("  "));
            self.md.push_str(&format!("| {} |\n", row.join(" | ")));
        }
        self.md.push('\n');
    }
}

// ---------------------------------------------------------------- spawners

/// How one launch is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spawner {
    /// sandpool, `launch_mode = "launcher"` (the default): the launcher
    /// process spawns the helper; close_range + seccomp in the helper,
    /// Hello verified against /proc.
    Sandpool,
    /// sandpool, `launch_mode = "direct"`: posix_spawn from the host.
    SandpoolDirect,
    /// sandpool (launcher process) launching the reference helper linked
    /// statically against glibc instead of musl.
    SandpoolGlibc,
    /// std `Command::spawn` with piped stdio (posix_spawn path), same binary
    /// doing the same startup (close_range, seccomp), but no host-side
    /// verification; ready when its Hello arrives.
    StdPosixSpawn,
    /// The floor: std `Command::spawn` (posix_spawn) of a tiny static C
    /// program that writes one byte.
    Floor,
    /// The same program linked against musl: no glibc start-up (whose
    /// CPUID probing traps to the hypervisor on a virtual machine).
    FloorMusl,
    /// std `Command` with an empty `pre_exec` (the fork path alone).
    StdForkEmpty,
    /// std `Command` with a `pre_exec` that marks every possible fd
    /// close-on-exec with one fcntl each (the fork path plus the slow
    /// close-fds path that cost a production page server seconds per launch).
    StdForkFcntlLoop,
}

impl Spawner {
    /// Every spawner this build has (the musl floor needs the musl target).
    fn all() -> Vec<Spawner> {
        [
            Spawner::Sandpool,
            Spawner::SandpoolDirect,
            Spawner::SandpoolGlibc,
            Spawner::StdPosixSpawn,
            Spawner::Floor,
            Spawner::FloorMusl,
            Spawner::StdForkEmpty,
            Spawner::StdForkFcntlLoop,
        ]
        .into_iter()
        .filter(|s| *s != Spawner::FloorMusl || FLOOR_MUSL.is_some())
        .collect()
    }

    fn name(self) -> &'static str {
        match self {
            Spawner::Sandpool => "sandpool launch (launcher process)",
            Spawner::SandpoolDirect => "sandpool launch, launch_mode = direct",
            Spawner::SandpoolGlibc => "sandpool launch, the helper linked against glibc",
            Spawner::StdPosixSpawn => "std Command::spawn (posix_spawn)",
            Spawner::Floor => "floor: posix_spawn of a tiny static C program",
            Spawner::FloorMusl => "floor on musl: the same program linked against musl",
            Spawner::StdForkEmpty => "std Command + empty pre_exec (fork)",
            Spawner::StdForkFcntlLoop => "std Command + pre_exec fcntl loop (fork)",
        }
    }
}

/// The sandpool launchers: one per launch mode, and one of the helper
/// linked against glibc.
struct Launchers {
    launcher: Launcher,
    direct: Launcher,
    glibc: Launcher,
}

impl Launchers {
    fn new(config: HelperConfig) -> Launchers {
        let mut direct = config.clone();
        direct.launch_mode = LaunchMode::Direct;
        let mut glibc = config.clone();
        glibc.program = HELPER_GLIBC.into();
        Launchers {
            launcher: Launcher::new(config).expect("launcher"),
            direct: Launcher::new(direct).expect("direct launcher"),
            glibc: Launcher::new(glibc).expect("glibc helper's launcher"),
        }
    }
}

/// Marks every fd from 3 to the soft limit close-on-exec, one fcntl each.
/// Runs between fork and exec, so it uses raw syscalls only.
fn fcntl_loop_pre_exec() -> std::io::Result<()> {
    let max = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024) as i32;
    for fd in 3..max {
        // SAFETY: fcntl(F_SETFD) takes two integers and touches no memory of
        // ours; on a closed fd it fails with EBADF, which is ignored. It is
        // async-signal-safe, as code between fork and exec must be.
        #[allow(unsafe_code)]
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
    Ok(())
}

/// One launch to ready (the Hello has arrived), then the process is ended
/// and reaped. Returns the launch-to-ready time.
#[allow(clippy::disallowed_methods)] // the std baselines spawn with Command on purpose
fn launch_once(spawner: Spawner, launchers: &Launchers) -> Duration {
    let sandpool = match spawner {
        Spawner::Sandpool => Some(&launchers.launcher),
        Spawner::SandpoolDirect => Some(&launchers.direct),
        Spawner::SandpoolGlibc => Some(&launchers.glibc),
        _ => None,
    };
    if let Some(launcher) = sandpool {
        let helper = launcher.launch().expect("sandpool launch");
        let took = helper.launch_time();
        helper.kill();
        return took;
    }
    let started = Instant::now();
    let mut command = Command::new(match spawner {
        Spawner::Floor => FLOOR,
        Spawner::FloorMusl => FLOOR_MUSL.unwrap_or(FLOOR),
        _ => HELPER,
    });
    command
        .env_clear()
        .env(
            sandpool_protocol::SPEC_ENV,
            "v=1;seccomp=enforce;max_frame=1048576",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    match spawner {
        Spawner::StdForkEmpty => {
            // SAFETY: the closure does nothing, which is trivially
            // async-signal-safe; it exists to force std's fork path.
            #[allow(unsafe_code)]
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut command, || Ok(()));
            }
        }
        Spawner::StdForkFcntlLoop => {
            // SAFETY: `fcntl_loop_pre_exec` only issues fcntl syscalls.
            #[allow(unsafe_code)]
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut command, fcntl_loop_pre_exec);
            }
        }
        _ => {}
    }
    let mut child = command.spawn().expect("std spawn");
    let mut first = [0u8; 1];
    child
        .stdout
        .as_mut()
        .expect("piped")
        .read_exact(&mut first)
        .expect("hello byte");
    let took = started.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    took
}

// ---------------------------------------------------------------- host state

/// Memory touched by the host (so fork has pages to copy), held while the
/// value lives.
fn ballast(mib: usize) -> Vec<u8> {
    let mut v = vec![0u8; mib << 20];
    for i in (0..v.len()).step_by(4096) {
        v[i] = 1;
    }
    std::hint::black_box(v)
}

/// Open fds held by the host, without CLOEXEC (inherited by every child).
fn leak_fds(count: usize) -> Vec<OwnedFd> {
    let devnull: OwnedFd = std::fs::File::open("/dev/null").expect("/dev/null").into();
    (0..count)
        .map(|_| nix::unistd::dup(&devnull).expect("dup"))
        .collect()
}

// ---------------------------------------------------------------- scenarios

fn launch_by_host_state(run: &mut Run) -> Value {
    run.section(
        "1. Launch to ready, by host state",
        "Time from spawn to the helper's first byte (its Hello). The helper is the reference helper linked \
         statically on musl, as the tests use it, but in the row of the helper linked against glibc. The \
         floor is the issue's: a tiny C program linked statically by the system's C compiler (glibc); its \
         start-up, like the glibc helper's, probes the CPU with CPUID, which traps to the hypervisor on a \
         virtual machine. The same program on musl is beside it. Host state: touched memory (RSS) and open \
         fds without CLOEXEC. Interleaved per state; 15 rounds per state, 60 on the idle host.",
    );
    let reps = if run.quick { 3 } else { 15 };
    let states: Vec<(usize, usize)> = if run.quick {
        vec![(0, 0), (256, 0), (0, 1000)]
    } else {
        vec![
            (0, 0),
            (1024, 0),
            (4096, 0),
            (0, 1000),
            (0, 10_000),
            (0, 19_000),
        ]
    };
    let mut config = HelperConfig::new(HELPER);
    config.sandbox.verify_with_proc = true;
    // Made before the host grows: the fds and memory below come after the
    // pool, as a server's do after start-up.
    let launchers = Launchers::new(config);
    let mut rows = Vec::new();
    let mut results = Vec::new();
    let mut paired_difference = None;
    let spawners = Spawner::all();
    for (mib, fds) in states {
        let _ballast = ballast(mib);
        let _fds = leak_fds(fds);
        let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); spawners.len()];
        // The idle host gives the floor ratio and launcher minus direct,
        // where differences of tens of microseconds are asked about: four
        // times the samples (its launches are the cheap ones).
        let reps = if (mib, fds) == (0, 0) { reps * 4 } else { reps };
        for _ in 0..reps {
            for (i, spawner) in spawners.iter().enumerate() {
                samples[i].push(launch_once(*spawner, &launchers));
            }
        }
        if (mib, fds) == (0, 0) {
            // Launcher minus direct from the pairs launched one right after
            // the other (the median of the differences): a difference of
            // two medians of about 800 us moved by +-100 us between runs.
            let mut differences: Vec<f64> = samples[0]
                .iter()
                .zip(&samples[1])
                .map(|(launcher, direct)| (launcher.as_secs_f64() - direct.as_secs_f64()) * 1e6)
                .collect();
            paired_difference = Some(median_f64(&mut differences));
        }
        let summaries: Vec<Summary> = samples.iter_mut().map(|s| summarize(s)).collect();
        for (spawner, s) in spawners.iter().zip(&summaries) {
            let ratio = s.median.as_secs_f64() / summaries[0].median.as_secs_f64();
            rows.push(vec![
                format!("{mib} MiB, {fds} fds"),
                spawner.name().into(),
                fmt_us(s.median),
                fmt_us(s.p99),
                format!("{ratio:.2}x"),
            ]);
            results.push(json!({ "rss_mib": mib, "fds": fds, "spawner": spawner.name(), "launch": summary_json(s), "vs_sandpool": ratio }));
        }
    }
    run.table(
        &["host state", "launch", "median", "p99", "vs sandpool"],
        rows,
    );
    let median = |mib: usize, fds: usize, spawner: Spawner| {
        results
            .iter()
            .find(|r| r["rss_mib"] == mib && r["fds"] == fds && r["spawner"] == spawner.name())
            .and_then(|r| r["launch"]["median_us"].as_f64())
    };
    let idle = median(0, 0, Spawner::Sandpool);
    let mut targets = Vec::new();
    let mut checks = Vec::new();
    let mut check = |what: &str, value: Option<f64>, unit: &str, goal: f64| {
        if let Some(value) = value {
            targets.push(vec![
                what.to_owned(),
                format!("{value:.2}{unit}"),
                format!("<= {goal}{unit}"),
                if value <= goal { "met" } else { "not met" }.to_owned(),
            ]);
            checks
                .push(json!({ "what": what, "value": value, "goal": goal, "met": value <= goal }));
        }
    };
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    // Across host states the table's rows ran at different moments of a
    // noisy machine; these two ratios come from samples interleaved in time.
    let grown = if run.quick {
        None
    } else {
        Some(host_growth_interleaved(&launchers))
    };
    let grown_ratio = |key: &str| grown.as_ref().and_then(|g: &Value| g[key].as_f64());
    check(
        "launcher: 19,000 host fds / idle host (interleaved)",
        grown_ratio("launcher_fds_ratio"),
        "x",
        1.2,
    );
    check(
        "launcher: 4 GiB touched / idle host (alternating blocks)",
        grown_ratio("launcher_rss_ratio"),
        "x",
        1.1,
    );
    // Idle-host launches against a floor, all under the goal of 1.5x: the
    // goal's own row, then for comparison the same helper binary started
    // by std's posix_spawn and read to its first byte (no host-side step at
    // all: no launcher, no pool pipes, no verification), the launch against
    // the floor program linked against musl, and the helper linked against
    // glibc.
    for (what, spawner, floor) in [
        (
            "launcher, idle host / floor (tiny static C program)",
            Spawner::Sandpool,
            Spawner::Floor,
        ),
        (
            "helper alone: std posix_spawn of it, idle host / floor (for comparison)",
            Spawner::StdPosixSpawn,
            Spawner::Floor,
        ),
        (
            "launcher, idle host / floor on musl (for comparison)",
            Spawner::Sandpool,
            Spawner::FloorMusl,
        ),
        (
            "launcher, the helper linked against glibc, idle host / floor (for comparison)",
            Spawner::SandpoolGlibc,
            Spawner::Floor,
        ),
    ] {
        check(
            what,
            ratio(median(0, 0, spawner), median(0, 0, floor)),
            "x",
            1.5,
        );
    }
    check(
        "launcher minus direct, idle host (us; median of the interleaved pairs' differences)",
        paired_difference,
        "",
        60.0,
    );
    check(
        "launcher minus direct, idle host (us; difference of the medians, for comparison)",
        idle.zip(median(0, 0, Spawner::SandpoolDirect))
            .map(|(a, b)| a - b),
        "",
        60.0,
    );
    check(
        "direct: 19,000 host fds / idle host (interleaved, for comparison)",
        grown_ratio("direct_fds_ratio"),
        "x",
        1.2,
    );
    run.table(&["target", "measured", "goal", ""], targets);
    plot_launch(run, &results);
    json!({ "rows": results, "targets": checks, "interleaved": grown })
}

/// Launch medians with the host idle and grown, interleaved in time: per
/// sample, an idle launch, then 19,000 fds opened (after the launchers
/// started, as a server grows), a launch, the fds closed; and for memory
/// (touching 4 GiB takes seconds), blocks idle / 4 GiB touched / idle /
/// touched / idle / touched / idle, so that a drift of the machine's speed
/// falls on both sides.
fn host_growth_interleaved(launchers: &Launchers) -> Value {
    // 61 pairs for the fds; 3 blocks of 21 touched for the memory: at
    // launches of about 0.5 ms, one block each way of 21 moved the ratio
    // by 0.3x between runs.
    let (pairs, block, blocks) = (61, 21, 3);
    let fds_ratio = |spawner: Spawner| {
        let (mut idle, mut grown) = (Vec::new(), Vec::new());
        for _ in 0..pairs {
            idle.push(launch_once(spawner, launchers));
            let fds = leak_fds(19_000);
            grown.push(launch_once(spawner, launchers));
            drop(fds);
        }
        summarize(&mut grown).median.as_secs_f64() / summarize(&mut idle).median.as_secs_f64()
    };
    let launcher_fds_ratio = fds_ratio(Spawner::Sandpool);
    let direct_fds_ratio = fds_ratio(Spawner::SandpoolDirect);
    let launches = |n: usize| -> Vec<Duration> {
        (0..n)
            .map(|_| launch_once(Spawner::Sandpool, launchers))
            .collect()
    };
    let mut idle = launches(block);
    let mut touched = Vec::new();
    for _ in 0..blocks {
        let ballast = ballast(4096);
        touched.extend(launches(block));
        drop(ballast);
        idle.extend(launches(block));
    }
    let launcher_rss_ratio =
        summarize(&mut touched).median.as_secs_f64() / summarize(&mut idle).median.as_secs_f64();
    json!({
        "launcher_fds_ratio": launcher_fds_ratio,
        "direct_fds_ratio": direct_fds_ratio,
        "launcher_rss_ratio": launcher_rss_ratio,
    })
}

fn concurrent_launches(run: &mut Run) -> Value {
    run.section(
        "2. 50 launches started at the same moment from 50 threads",
        "Makespan of 50 simultaneous sandpool launches, against the CPU bound (50 x a single launch / cores), \
         and the slowest single launch. CPU per launch: this process, the launcher process and the helper up to \
         its Hello (scheduler run time), over 20 sequential launches; where it exceeds the latency (host, \
         launcher and helper overlap), 50 launches cannot finish within the bound. Makespan / work: against \
         50 x that CPU on the cores, what the launches lose to serialisation or idle CPUs.",
    );
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut rows = Vec::new();
    let mut values = Vec::new();
    for mode in [LaunchMode::Launcher, LaunchMode::Direct] {
        let (row, value) = concurrent_launches_in(run, mode, cores);
        rows.push(row);
        values.push(value);
    }
    run.table(
        &[
            "launch mode",
            "single launch (median)",
            "CPU bound (50 x single / cores)",
            "makespan (median)",
            "makespan / bound",
            "slowest single (median)",
            "CPU per launch (its / the latency: the lowest makespan / bound possible)",
            "makespan / work (50 x CPU per launch / cores)",
        ],
        rows,
    );
    json!({ "cores": cores, "modes": values })
}

fn concurrent_launches_in(run: &Run, mode: LaunchMode, cores: usize) -> (Vec<String>, Value) {
    let mut config = HelperConfig::new(HELPER);
    config.launch_mode = mode;
    let launcher = Arc::new(Launcher::new(config).expect("launcher"));
    // The CPU a launch costs, wherever it runs: this process (every
    // thread), the launcher process (every thread) and the helper up to its
    // Hello (its scheduler run time, read before it is killed). Beside the
    // latency it shows how far below the "CPU bound" a makespan can go:
    // 50 launches need 50 x this CPU on `cores` CPUs.
    let launches = 20u32;
    let launcher_before = launcher.launcher_pid().map_or(Duration::ZERO, process_cpu);
    let host_before = host_cpu();
    let mut helpers_cpu = Duration::ZERO;
    // This process's CPU spent reading the helpers' (a /proc walk each),
    // which is the measurement's, not the launch's.
    let mut reading_cpu = Duration::ZERO;
    let mut single: Vec<Duration> = (0..launches)
        .map(|_| {
            let helper = launcher.launch().expect("launch");
            let took = helper.launch_time();
            let reading = host_cpu();
            helpers_cpu += process_cpu(helper.pid());
            reading_cpu += host_cpu().saturating_sub(reading);
            helper.kill();
            took
        })
        .collect();
    let cpu_per_launch = (host_cpu()
        .saturating_sub(host_before)
        .saturating_sub(reading_cpu)
        + launcher
            .launcher_pid()
            .map_or(Duration::ZERO, process_cpu)
            .saturating_sub(launcher_before)
        + helpers_cpu)
        / launches;
    let single = summarize(&mut single);
    let rounds = if run.quick { 1 } else { 5 };
    let mut makespans = Vec::new();
    let mut worst = Vec::new();
    for _ in 0..rounds {
        let barrier = Arc::new(Barrier::new(50));
        let started = Instant::now();
        let threads: Vec<_> = (0..50)
            .map(|_| {
                let (launcher, barrier) = (launcher.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let t = Instant::now();
                    let helper = launcher.launch().expect("launch");
                    let took = t.elapsed();
                    (helper, took)
                })
            })
            .collect();
        let results: Vec<_> = threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        makespans.push(started.elapsed());
        worst.push(
            results
                .iter()
                .map(|(_, took)| *took)
                .max()
                .unwrap_or_default(),
        );
        drop(results);
    }
    let makespan = summarize(&mut makespans);
    let worst = summarize(&mut worst);
    let bound = single.median * 50 / cores as u32;
    let ratio = makespan.median.as_secs_f64() / bound.as_secs_f64();
    // The lowest makespan / bound that the CPU allows: 50 x CPU per launch
    // on `cores` CPUs, against 50 x the latency on `cores` CPUs.
    let cpu_floor = cpu_per_launch.as_secs_f64() / single.median.as_secs_f64();
    // The makespan against the work itself (50 x the CPU of a launch on
    // `cores` CPUs): above 1 by what is serialised or idle.
    let work_ratio = ratio / cpu_floor;
    let mode_name = format!("{mode:?}").to_lowercase();
    (
        vec![
            mode_name.clone(),
            fmt_us(single.median),
            fmt_us(bound),
            fmt_us(makespan.median),
            format!("{ratio:.2}x"),
            fmt_us(worst.median),
            format!("{} ({cpu_floor:.2}x)", fmt_us(cpu_per_launch)),
            format!("{work_ratio:.2}x"),
        ],
        json!({ "makespan_over_work": work_ratio,  "mode": mode_name, "single": summary_json(&single), "makespan": summary_json(&makespan), "bound_us": us(bound), "makespan_over_bound": ratio, "slowest_single": summary_json(&worst), "cpu_per_launch_us": us(cpu_per_launch), "cpu_floor_of_ratio": cpu_floor }),
    )
}

/// Pins a process (0: this thread) to CPU 0: both ends of a ping-pong on one
/// CPU take the scheduler's placement (same CPU or across, a 5x difference
/// on this machine) out of the comparison.
fn pin_to_cpu0(pid: nix::unistd::Pid) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(0).is_ok() {
        let _ = nix::sched::sched_setaffinity(pid, &set);
    }
}

/// This thread's CPU set when the harness started.
static ORIGINAL_CPUS: std::sync::OnceLock<nix::sched::CpuSet> = std::sync::OnceLock::new();

/// Lets this thread run where it could before it was pinned (and so every
/// thread and helper it creates later). `available_parallelism` cannot be
/// used for this: it reflects the pinned mask.
fn unpin() {
    if let Some(set) = ORIGINAL_CPUS.get() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), set);
    }
}

fn spawn_peer(size: usize) -> std::process::Child {
    sandpool_benches::spawn_pipe_peer(size).expect("spawn pipe peer")
}

fn warm_calls(run: &mut Run) -> Value {
    run.section(
        "3. Warm call round trip and pipelined throughput",
        "One caller, a warm helper, against a raw two-process pipe ping-pong of the same sizes written in this harness; \
         a fresh process pair per round. Unpinned, the scheduler puts a pair on one CPU (about 5 us a round trip here) \
         or across both (about 40 us), so medians of unpinned runs depend on luck; pinned to one CPU, the comparison is \
         the code's alone. 8 KiB frames cross into a third pipe page (header plus 8 KiB), which the kernel allocates \
         and charges to the cgroup on every write; through the region, only 48 bytes of frames cross the pipes. \
         Throughput: 8 KiB responses, one tenant, 8 caller threads, one tokio task with 8 call_async in flight, and \
         one thread making call_batch of 8 after call_batch of 8, against a raw peer held to the same window of 8 \
         requests in flight, rounds of 60,000 responses interleaved.",
    );
    let rounds = if run.quick { 2 } else { 30 };
    let per_round = if run.quick { 200 } else { 500 };
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for pinned in [false, true] {
        let placement = if pinned { "both on CPU 0" } else { "unpinned" };
        if pinned {
            pin_to_cpu0(nix::unistd::Pid::from_raw(0));
        }
        for size in [16usize, 8192] {
            let req = request(OP_ECHO, &vec![0x5A; size - 1]);
            // (label, json key, spin_wait, through the region)
            let mut variants = vec![
                (
                    "sandpool pool.call (default: spin_wait 20us)",
                    "sandpool",
                    Duration::from_micros(20),
                    false,
                ),
                (
                    "sandpool pool.call, spin_wait 0",
                    "sandpool_no_spin",
                    Duration::ZERO,
                    false,
                ),
            ];
            if size >= 4096 {
                variants.push((
                    "sandpool pool.call, through the region (threshold 4 KiB)",
                    "sandpool_region",
                    Duration::from_micros(20),
                    true,
                ));
            }
            let mut raw = Vec::new();
            // The raw peer with messages the size of sandpool's frame for
            // this payload (16-byte header): what the kernel charges for the
            // extra bytes alone.
            let mut raw_frame = Vec::new();
            let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); variants.len()];
            for _ in 0..rounds {
                let pin = |pid: u32| {
                    if pinned {
                        pin_to_cpu0(nix::unistd::Pid::from_raw(pid as i32));
                    }
                };
                raw.extend(
                    sandpool_benches::raw_ping_pong_round(size, per_round, pin).expect("raw round"),
                );
                if size >= 4096 {
                    raw_frame.extend(
                        sandpool_benches::raw_ping_pong_round(size + 16, per_round, pin)
                            .expect("raw round"),
                    );
                }
                for (&(_, _, spin, through_region), samples) in variants.iter().zip(&mut samples) {
                    let mut config = Config::new(HELPER);
                    config.spares = 0;
                    config.spin_wait = spin;
                    if through_region {
                        config.region_size = Some(sandpool::ByteSize::mib(1));
                        config.region_threshold = sandpool::ByteSize::kib(4);
                    }
                    let pool = Pool::new(config).expect("pool");
                    pool.call("t", &req).expect("warm-up");
                    if pinned && let Some(info) = pool.helper_info("t") {
                        pin_to_cpu0(nix::unistd::Pid::from_raw(info.pid as i32));
                    }
                    for _ in 0..per_round {
                        let t = Instant::now();
                        pool.call("t", &req).expect("call");
                        samples.push(t.elapsed());
                    }
                }
            }
            let raw = summarize(&mut raw);
            rows.push(vec![
                format!("{size} B, {placement}"),
                "raw pipe ping-pong".into(),
                fmt_us(raw.median),
                fmt_us(raw.p99),
                "1.00x".into(),
            ]);
            let mut figures =
                json!({ "size": size, "placement": placement, "raw": summary_json(&raw) });
            if !raw_frame.is_empty() {
                let summary = summarize(&mut raw_frame);
                let ratio = summary.median.as_secs_f64() / raw.median.as_secs_f64();
                rows.push(vec![
                    format!("{size} B, {placement}"),
                    format!(
                        "raw pipe ping-pong, {} B messages (a frame's size)",
                        size + 16
                    ),
                    fmt_us(summary.median),
                    fmt_us(summary.p99),
                    format!("{ratio:.2}x"),
                ]);
                figures["raw_frame_size"] = summary_json(&summary);
                figures["raw_frame_size_vs_raw"] = json!(ratio);
            }
            for ((label, key, _, _), samples) in variants.iter().zip(&mut samples) {
                let summary = summarize(samples);
                let ratio = summary.median.as_secs_f64() / raw.median.as_secs_f64();
                rows.push(vec![
                    format!("{size} B, {placement}"),
                    (*label).into(),
                    fmt_us(summary.median),
                    fmt_us(summary.p99),
                    format!("{ratio:.2}x"),
                ]);
                figures[*key] = summary_json(&summary);
                figures[format!("{key}_vs_raw")] = json!(ratio);
            }
            out.push(figures);
        }
    }
    unpin();
    run.table(&["size", "path", "median", "p99", "vs raw"], rows);

    // Pipelined throughput, A B A B: sandpool and a raw peer held to the
    // same window (a request goes out only while fewer than `window` are
    // unanswered), plus the raw peer with requests streamed unbounded (its
    // only window is the pipe's capacity) for reference.
    let size = 8192;
    // 60,000 responses a round (about half a second): in rounds of 20,000
    // (0.15-0.2 s) where the scheduler first put the three or four threads
    // decided most of a round, and a contender's median moved by 0.3x
    // between runs.
    let total = if run.quick { 2000 } else { 60_000 };
    let rounds = if run.quick { 1 } else { 5 };
    let window = 8;
    // (label, each round's rate), A B C D A B C D ...
    let mut contenders: Vec<(String, Vec<Rate>)> = [
        format!("raw pipe, window {window}"),
        "raw pipe, streamed (no window)".into(),
        format!(
            "raw pipe, window {window}, {} B messages (a frame's size)",
            size + 16
        ),
        format!(
            "raw pipe, one thread, batches of {window}, {} B messages",
            size + 16
        ),
        format!("sandpool, {window} caller threads, max_in_flight {window}"),
        format!("sandpool, the same through {window} region slots (threshold 4 KiB)"),
        format!("sandpool, one tokio task, {window} call_async in flight"),
        format!("sandpool, one thread, call_batch of {window}"),
    ]
    .into_iter()
    .map(|label| (label, Vec::new()))
    .collect();
    for _ in 0..rounds {
        for (index, (_, rates)) in contenders.iter_mut().enumerate() {
            let rate = match index {
                0 => raw_pipelined_rate(size, total, Some(window)),
                1 => raw_pipelined_rate(size, total, None),
                2 => raw_pipelined_rate(size + 16, total, Some(window)),
                3 => raw_batch_rate(size + 16, total, window),
                4 => pooled_pipelined_rate(size, total, window, false),
                5 => pooled_pipelined_rate(size, total, window, true),
                6 => pooled_async_rate(size, total, window),
                _ => pooled_batch_rate(size, total, window),
            };
            rates.push(rate);
        }
    }
    // (rate, context switches per response, the peer's or the helper's
    // share), each the median of the rounds.
    let medians: Vec<(f64, f64, f64)> = contenders
        .iter()
        .map(|(_, rates)| {
            let median_of = |field: fn(&Rate) -> f64| {
                median_f64(&mut rates.iter().map(field).collect::<Vec<_>>())
            };
            (
                median_of(|r| r.per_s),
                median_of(|r| r.switches_per_call),
                median_of(|r| r.child_switches_per_call),
            )
        })
        .collect();
    let raw_rate = medians[0].0;
    let streamed_rate = medians[1].0;
    let (raw_framed_rate, raw_batch) = (medians[2].0, medians[3].0);
    let (pooled_rate, region_rate) = (medians[4].0, medians[5].0);
    let (async_rate, batch_rate) = (medians[6].0, medians[7].0);
    let ratio = pooled_rate / raw_rate;
    let region_ratio = region_rate / raw_rate;
    // One figure of every contender, by its key in results.json.
    let by_contender = |figure: fn(&(f64, f64, f64)) -> f64| {
        let keys = [
            "raw",
            "raw_streamed",
            "raw_frame_sized",
            "raw_batch",
            "sandpool",
            "sandpool_region",
            "sandpool_async",
            "sandpool_batch",
        ];
        Value::Object(
            keys.iter()
                .zip(&medians)
                .map(|(key, m)| ((*key).to_owned(), json!(figure(m))))
                .collect(),
        )
    };
    run.table(
        &[
            "8 KiB responses, one tenant",
            "responses/s (median of rounds)",
            "vs raw at window 8",
            "context switches per response",
            "of which the peer's or the helper's",
        ],
        contenders
            .iter()
            .zip(&medians)
            .map(|((label, _), (rate, switches, child))| {
                vec![
                    label.clone(),
                    format!("{rate:.0}"),
                    format!("{:.2}x", rate / raw_rate),
                    format!("{switches:.1}"),
                    format!("{child:.2}"),
                ]
            })
            .collect(),
    );
    json!({
        "round_trip": out,
        "pipelined": {
            "window": window,
            "raw_per_s": raw_rate,
            "raw_streamed_per_s": streamed_rate,
            "raw_frame_sized_per_s": raw_framed_rate,
            "raw_batch_per_s": raw_batch,
            "batch_vs_raw_batch": batch_rate / raw_batch,
            "sandpool_per_s": pooled_rate,
            "ratio": ratio,
            "sandpool_region_per_s": region_rate,
            "region_ratio": region_ratio,
            "sandpool_async_per_s": async_rate,
            "async_ratio": async_rate / raw_rate,
            "sandpool_batch_per_s": batch_rate,
            "batch_ratio": batch_rate / raw_rate,
            "rounds": rounds,
            "context_switches_per_response": by_contender(|m| m.1),
            "peer_or_helper_context_switches_per_response": by_contender(|m| m.2),
        },
    })
}

fn median_f64(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Responses per second from a raw echo peer: one thread writes `total`
/// requests of `size` bytes, another reads the responses. With a window,
/// the writer sends only while fewer than `window` are unanswered.
fn raw_pipelined_rate(size: usize, total: usize, window: Option<usize>) -> Rate {
    let mut peer = spawn_peer(size);
    let mut peer_in = peer.stdin.take().expect("piped");
    let mut peer_out = peer.stdout.take().expect("piped");
    let switches_before = context_switches(peer.id());
    let msg = vec![1u8; size];
    // A token per request in flight: the writer puts one in before it
    // writes (blocking while the window is full), the reader takes one out
    // per response.
    let (tokens_in, tokens_out) = std::sync::mpsc::sync_channel::<()>(window.unwrap_or(total));
    let writer = std::thread::spawn(move || {
        for _ in 0..total {
            tokens_in.send(()).expect("token");
            peer_in.write_all(&msg).expect("write");
        }
        // Handed back, so the peer lives until it has been counted.
        peer_in
    });
    let started = Instant::now();
    let mut back = vec![0u8; size];
    for _ in 0..total {
        peer_out.read_exact(&mut back).expect("read");
        tokens_out.recv().expect("token");
    }
    let per_s = total as f64 / started.elapsed().as_secs_f64();
    let peer_in = writer.join().expect("writer");
    let switches = context_switches(peer.id());
    drop(peer_in);
    let _ = peer.wait();
    Rate::new(per_s, total, switches_before, switches)
}

/// Responses per second from a raw echo peer driven like `call_batch`:
/// one thread writes `window` requests, then reads their `window`
/// responses, and only then writes the next batch.
fn raw_batch_rate(size: usize, total: usize, window: usize) -> Rate {
    let mut peer = spawn_peer(size);
    let mut peer_in = peer.stdin.take().expect("piped");
    let mut peer_out = peer.stdout.take().expect("piped");
    let switches_before = context_switches(peer.id());
    let batch = vec![1u8; size * window];
    let mut back = vec![0u8; size * window];
    let started = Instant::now();
    for _ in 0..total / window {
        // The peer echoes as it reads; it can only block on the last
        // response of a batch, after it has read the whole batch, so this
        // write cannot deadlock.
        peer_in.write_all(&batch).expect("write");
        peer_out.read_exact(&mut back).expect("read");
    }
    let per_s = total as f64 / started.elapsed().as_secs_f64();
    let switches = context_switches(peer.id());
    drop(peer_in);
    let _ = peer.wait();
    Rate::new(per_s, total, switches_before, switches)
}

/// A throughput and what it cost in context switches.
struct Rate {
    per_s: f64,
    /// Context switches of the caller's process and the peer or helper,
    /// per response.
    switches_per_call: f64,
    /// The peer's or the helper's share of them.
    child_switches_per_call: f64,
}

/// Context switches so far of this whole process (every thread, ended ones
/// too) and of one single-threaded child: (all, the child's share).
fn context_switches(child: u32) -> (u64, u64) {
    let own = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|usage| {
            (usage.voluntary_context_switches() + usage.involuntary_context_switches()) as u64
        })
        .unwrap_or(0);
    let theirs: u64 = std::fs::read_to_string(format!("/proc/{child}/status"))
        .map(|status| {
            status
                .lines()
                .filter(|line| line.contains("ctxt_switches"))
                .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    (own + theirs, theirs)
}

impl Rate {
    /// `total` responses at `per_s`, with the context switches counted
    /// between `before` and `after` (both from [`context_switches`]).
    fn new(per_s: f64, total: usize, before: (u64, u64), after: (u64, u64)) -> Rate {
        let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / total as f64;
        Rate {
            per_s,
            switches_per_call: per(after.0, before.0),
            child_switches_per_call: per(after.1, before.1),
        }
    }
}

/// A pool with one warm tenant `t` for the pipelined contenders, its
/// `size`-byte echo request and the helper's pid: `max_in_flight` =
/// `window`; through the pipes, or through a region cut into `window` slots.
fn pipelined_pool(size: usize, window: usize, through_region: bool) -> (Pool, Vec<u8>, u32) {
    let mut config = Config::new(HELPER);
    config.spares = 0;
    config.max_in_flight = window;
    if through_region {
        config.region_size = Some(sandpool::ByteSize::mib(1));
        config.region_threshold = sandpool::ByteSize::kib(4);
        config.region_slots = window;
    }
    let pool = Pool::new(config).expect("pool");
    let req = request(OP_ECHO, &vec![1u8; size - 1]);
    pool.call("t", &req).expect("warm-up");
    let helper = pool.helper_info("t").expect("a helper").pid;
    (pool, req, helper)
}

/// Responses per second from one tenant's helper, `window` caller threads
/// each making calls of `size` bytes, `max_in_flight` = `window`; through
/// the pipes, or through a region cut into `window` slots.
fn pooled_pipelined_rate(size: usize, total: usize, window: usize, through_region: bool) -> Rate {
    let (pool, req, helper) = pipelined_pool(size, window, through_region);
    let (pool, req) = (Arc::new(pool), Arc::new(req));
    let switches_before = context_switches(helper);
    let started = Instant::now();
    let threads: Vec<_> = (0..window)
        .map(|_| {
            let (pool, req) = (pool.clone(), req.clone());
            std::thread::spawn(move || {
                for _ in 0..total / window {
                    pool.call("t", &req).expect("call");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("caller");
    }
    let per_s = total as f64 / started.elapsed().as_secs_f64();
    let switches = context_switches(helper);
    Rate::new(per_s, total, switches_before, switches)
}

/// Responses per second from one tenant's helper, one tokio task (the
/// `block_on` of a current-thread runtime on this thread) keeping `window`
/// `call_async` futures in flight: the next call starts as each completes.
/// No thread waits per call; the pool's reactor wakes the task.
fn pooled_async_rate(size: usize, total: usize, window: usize) -> Rate {
    let (pool, req, helper) = pipelined_pool(size, window, false);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let switches_before = context_switches(helper);
    let started = Instant::now();
    runtime.block_on(sandpool_benches::keep_in_flight(
        window,
        total,
        || pool.call_async("t", &req),
        |result| {
            result.expect("call");
        },
    ));
    let per_s = total as f64 / started.elapsed().as_secs_f64();
    let switches = context_switches(helper);
    Rate::new(per_s, total, switches_before, switches)
}

/// Responses per second from one tenant's helper, one thread making
/// `call_batch` after `call_batch` of `window` requests (pipelined from the
/// calling thread; each batch waits for all its replies before the next).
fn pooled_batch_rate(size: usize, total: usize, window: usize) -> Rate {
    let (pool, req, helper) = pipelined_pool(size, window, false);
    let batch: Vec<&[u8]> = vec![&req; window];
    let switches_before = context_switches(helper);
    let started = Instant::now();
    for _ in 0..total / window {
        for result in pool.call_batch("t", &batch) {
            result.expect("call");
        }
    }
    let per_s = total as f64 / started.elapsed().as_secs_f64();
    let switches = context_switches(helper);
    Rate::new(per_s, total, switches_before, switches)
}

/// The CPU time every thread of process `pid` has run so far, from the
/// scheduler's own account (`/proc/PID/task/*/schedstat`, nanoseconds;
/// `/proc/PID/stat` counts in 10 ms ticks).
fn process_cpu(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    tasks
        .filter_map(|task| {
            let path = task.ok()?.path().join("schedstat");
            let text = std::fs::read_to_string(path).ok()?;
            text.split_whitespace().next()?.parse::<u64>().ok()
        })
        .map(Duration::from_nanos)
        .sum()
}

/// User plus system CPU time of this whole process so far (every thread,
/// ended ones too; the helpers are other processes and not counted).
fn host_cpu() -> Duration {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|usage| {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(t.tv_sec().max(0) as u64)
                    + Duration::from_micros(t.tv_usec().max(0) as u64)
            };
            tv(usage.user_time()) + tv(usage.system_time())
        })
        .unwrap_or_default()
}

fn async_callers(run: &mut Run) -> Value {
    run.section(
        "3c. call_async from 32 tokio tasks, against spawn_blocking(pool.call)",
        "A multi-thread tokio runtime (2 worker threads, this machine's cores), 32 tasks, each making calls of a \
         16-byte echo one after another on one of 4 tenants (8 tasks a tenant), on one pool with 4 warm helpers: \
         `pool.call_async(..).await`, against what an async user would otherwise write, \
         `spawn_blocking(move || pool.call(..)).await` per call, with max_blocking_threads 32 so that both keep 32 \
         calls in flight. Calls/s, and host CPU per call (user plus system time of this process from getrusage; the \
         helpers are other processes and not counted). Rounds interleaved. Then cancellation: a call_async of a \
         helper op that sleeps, dropped by `tokio::time::timeout` long before the sleep ends, and the tenant's next \
         call (an echo) timed against the helper's remaining work (it answers in order, so the next call waits for \
         the abandoned sleep; it should wait for no more than that).",
    );
    let tasks = 32;
    let tenants: Arc<Vec<String>> = Arc::new((0..4).map(|i| format!("t{i}")).collect());
    let calls_per_task = if run.quick { 50 } else { 1000 };
    let total = tasks * calls_per_task;
    let rounds = if run.quick { 1 } else { 5 };
    let mut config = Config::new(HELPER);
    config.spares = 0;
    let pool = Arc::new(Pool::new(config).expect("pool"));
    let req = Arc::new(request(OP_ECHO, &[0x5A; 15]));
    for tenant in tenants.iter() {
        pool.call(tenant, &req).expect("warm-up");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(tasks)
        .build()
        .expect("runtime");
    // One round of one contender: 32 tasks, `calls` calls each; calls/s and
    // host CPU per call.
    let round = |blocking: bool, calls: usize| -> (f64, Duration) {
        let cpu_before = host_cpu();
        let started = Instant::now();
        runtime.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for task in 0..tasks {
                let (pool, req, tenants) = (pool.clone(), req.clone(), tenants.clone());
                set.spawn(async move {
                    let tenant = &tenants[task % tenants.len()];
                    for _ in 0..calls {
                        if blocking {
                            // The usual bridge: a blocking-pool thread per
                            // call in flight, the task awaiting its handle.
                            let (pool, req, tenant) = (pool.clone(), req.clone(), tenant.clone());
                            tokio::task::spawn_blocking(move || pool.call(tenant, &req))
                                .await
                                .expect("blocking call")
                                .expect("call");
                        } else {
                            pool.call_async(tenant, &req).await.expect("call");
                        }
                    }
                });
            }
            while let Some(joined) = set.join_next().await {
                joined.expect("task");
            }
        });
        let per_s = (tasks * calls) as f64 / started.elapsed().as_secs_f64();
        let cpu = (host_cpu().saturating_sub(cpu_before)) / (tasks * calls) as u32;
        (per_s, cpu)
    };
    // Warm-up: the blocking pool's 32 threads and the tasks' first calls.
    round(true, 10);
    round(false, 10);
    // (label, calls/s, CPU per call), A B A B ...
    let mut contenders: Vec<(&str, Vec<f64>, Vec<Duration>)> = vec![
        ("sandpool pool.call_async(..).await", Vec::new(), Vec::new()),
        (
            "tokio::task::spawn_blocking(move || pool.call(..)).await",
            Vec::new(),
            Vec::new(),
        ),
    ];
    for _ in 0..rounds {
        for (index, (_, rates, cpus)) in contenders.iter_mut().enumerate() {
            let (per_s, cpu) = round(index == 1, calls_per_task);
            rates.push(per_s);
            cpus.push(cpu);
        }
    }
    let medians: Vec<(f64, Duration)> = contenders
        .iter_mut()
        .map(|(_, rates, cpus)| (median_f64(rates), summarize(cpus).median))
        .collect();
    let (async_rate, async_cpu) = medians[0];
    let (blocking_rate, blocking_cpu) = medians[1];
    let rate_ratio = async_rate / blocking_rate;
    let cpu_ratio = async_cpu.as_secs_f64() / blocking_cpu.as_secs_f64().max(1e-12);
    run.table(
        &[
            "32 tasks, 4 tenants, 16 B echo",
            "calls/s (median of rounds)",
            "vs spawn_blocking",
            "host CPU per call",
            "CPU vs spawn_blocking",
        ],
        contenders
            .iter()
            .zip(&medians)
            .map(|((label, _, _), (rate, cpu))| {
                vec![
                    (*label).into(),
                    format!("{rate:.0}"),
                    format!("{:.2}x", rate / blocking_rate),
                    format!("{:.1} us", us(*cpu)),
                    format!(
                        "{:.2}x",
                        cpu.as_secs_f64() / blocking_cpu.as_secs_f64().max(1e-12)
                    ),
                ]
            })
            .collect(),
    );

    // Cancellation: the abandoned call's request was sent, so the helper
    // sleeps on; the next call queues behind it and should wait for that
    // remaining work alone (a few ms more at most), not for a timeout, a
    // relaunch or a blamed helper.
    let (sleep_ms, timeout_ms, cancel_rounds) = if run.quick {
        (300u32, 50u64, 1)
    } else {
        (1500, 100, 3)
    };
    let mut config = Config::new(HELPER);
    config.spares = 0;
    config.args = vec!["--test-ops".into()];
    let pool = Pool::new(config).expect("pool");
    let echo = request(OP_ECHO, b"next");
    let sleep = sandpool_reference_helper::reference::sleep_request(sleep_ms, b"abandoned");
    pool.call("c", &echo).expect("warm-up");
    let helper = pool.helper_info("c").expect("a helper").pid;
    let timer = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let (mut next_calls, mut remaining) = (Vec::new(), Vec::new());
    for _ in 0..cancel_rounds {
        let (next, left) = timer.block_on(async {
            let sent = Instant::now();
            let abandoned = tokio::time::timeout(
                Duration::from_millis(timeout_ms),
                pool.call_async("c", &sleep),
            )
            .await;
            assert!(abandoned.is_err(), "the sleep should have timed out");
            let t = Instant::now();
            let left = Duration::from_millis(sleep_ms.into()).saturating_sub(t - sent);
            let reply = pool.call_async("c", &echo).await.expect("next call");
            assert_eq!(reply, b"next", "the next call got the abandoned reply");
            (t.elapsed(), left)
        });
        next_calls.push(next);
        remaining.push(left);
    }
    let same_helper = pool.helper_info("c").map(|info| info.pid) == Some(helper);
    let next = summarize(&mut next_calls).median;
    let left = summarize(&mut remaining).median;
    let excess_ms = (next.as_secs_f64() - left.as_secs_f64()) * 1e3;
    run.table(
        &[
            "cancellation, one tenant",
            "next call",
            "helper's remaining work",
            "next call beyond it",
        ],
        vec![vec![
            format!(
                "call_async of a {sleep_ms} ms sleep dropped by timeout({timeout_ms} ms), then an echo \
                 (median of {cancel_rounds}{})",
                if same_helper {
                    "; same helper throughout"
                } else {
                    "; the helper was replaced"
                }
            ),
            format!("next call after a cancelled one: {:.1} ms", us(next) / 1e3),
            format!("helper's remaining work: {:.1} ms", us(left) / 1e3),
            format!("{excess_ms:+.1} ms"),
        ]],
    );
    json!({
        "tasks": tasks,
        "tenants": tenants.len(),
        "calls_per_round": total,
        "rounds": rounds,
        "call_async_per_s": async_rate,
        "spawn_blocking_per_s": blocking_rate,
        "rate_ratio": rate_ratio,
        "call_async_cpu_us_per_call": us(async_cpu),
        "spawn_blocking_cpu_us_per_call": us(blocking_cpu),
        "cpu_ratio": cpu_ratio,
        "cancellation": {
            "sleep_ms": sleep_ms,
            "timeout_ms": timeout_ms,
            "rounds": cancel_rounds,
            "next_call_ms": us(next) / 1e3,
            "remaining_work_ms": us(left) / 1e3,
            "excess_ms": excess_ms,
            "same_helper": same_helper,
        },
    })
}

fn large_payloads(run: &mut Run) -> Value {
    run.section(
        "3b. Large payloads: shared region vs pipe",
        "Echo of 256 KiB to 8 MiB, one caller: request and response through the pipe (max_frame 16 MiB; default \
         64 KiB pipes, and pipes enlarged to 1 MiB with F_SETPIPE_SZ) against through the helper's sealed memfd \
         region (region_size 32 MiB). Throughput counts both directions. Interleaved.",
    );
    let reps = if run.quick { 3 } else { 40 };
    let pool_with = |region: bool, pipe_size: Option<u64>| {
        let mut config = Config::new(HELPER);
        config.spares = 0;
        config.max_frame = sandpool::ByteSize::mib(16);
        config.pipe_size = pipe_size.map(sandpool::ByteSize::b);
        if region {
            config.region_size = Some(sandpool::ByteSize::mib(32));
        }
        Pool::new(config).expect("pool")
    };
    let pipe = pool_with(false, None);
    let big_pipe = pool_with(false, Some(1 << 20));
    let region = pool_with(true, None);
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for size in [256usize << 10, 1 << 20, 8 << 20] {
        let req = request(OP_ECHO, &vec![0x33; size - 1]);
        for pool in [&pipe, &big_pipe, &region] {
            pool.call("t", &req).expect("warm-up");
        }
        let (mut by_pipe, mut by_big_pipe, mut by_region) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            for (pool, samples) in [
                (&pipe, &mut by_pipe),
                (&big_pipe, &mut by_big_pipe),
                (&region, &mut by_region),
            ] {
                let t = Instant::now();
                pool.call("t", &req).expect("call");
                samples.push(t.elapsed());
            }
        }
        let by_pipe = summarize(&mut by_pipe);
        let by_big_pipe = summarize(&mut by_big_pipe);
        let by_region = summarize(&mut by_region);
        let rate = |s: &Summary| (2 * size) as f64 / s.median.as_secs_f64() / (1 << 30) as f64;
        let ratio = rate(&by_region) / rate(&by_pipe);
        rows.push(vec![
            format!("{} KiB", size >> 10),
            format!("{} ({:.2} GiB/s)", fmt_us(by_pipe.median), rate(&by_pipe)),
            format!(
                "{} ({:.2} GiB/s)",
                fmt_us(by_big_pipe.median),
                rate(&by_big_pipe)
            ),
            format!(
                "{} ({:.2} GiB/s)",
                fmt_us(by_region.median),
                rate(&by_region)
            ),
            format!("{ratio:.2}x"),
        ]);
        out.push(json!({ "size": size, "pipe": summary_json(&by_pipe), "pipe_1mib": summary_json(&by_big_pipe), "region": summary_json(&by_region), "throughput_ratio": ratio }));
    }
    run.table(
        &[
            "payload each way",
            "pipe, 64 KiB (median)",
            "pipe, F_SETPIPE_SZ 1 MiB",
            "region (median)",
            "region / pipe throughput",
        ],
        rows,
    );
    Value::Array(out)
}

fn idle_gap(run: &mut Run) -> Value {
    run.section(
        "4. First call after an idle gap",
        "The tenant's first call after its helper went idle: still warm (no quiesce), quiesced with spares ready \
         (with warmup_request, as the README recommends, and without), quiesced without spares (the cold-start \
         cliff). Each round calls every case's tenant, sleeps 100 ms (the gap: quiesce, refills), then makes each \
         case's measured call, back to back, the first three in turn first (the first call after the host's own \
         sleep), the cold launch last; the warm case on one tenant, the others on a new tenant per round. As in a \
         busy server, the tenant has been idle, the host not.",
    );
    let reps = if run.quick { 3 } else { 600 };
    let req = request(OP_ECHO, b"first call");
    let pool_with = |idle_ms: u64, spares: usize, warm_up: bool| {
        let mut config = Config::new(HELPER);
        config.spares = spares;
        config.idle_timeout = Duration::from_millis(idle_ms);
        if warm_up {
            config.warmup_request = Some(req.clone());
        }
        Pool::new(config).expect("pool")
    };
    let cases = [
        (
            "warm helper (idle_timeout 1 h)",
            pool_with(3_600_000, 0, false),
        ),
        (
            "quiesced, 2 spares ready (warmup_request)",
            pool_with(30, 2, true),
        ),
        (
            "quiesced, 2 spares ready, no warm-up",
            pool_with(30, 2, false),
        ),
        ("quiesced, no spares", pool_with(30, 0, false)),
    ];
    // The warm case keeps one helper (a helper per round would pile up: an
    // hour's idle_timeout); the others take a spare or launch for a tenant
    // whose helper was quiesced.
    let tenant = |case: usize, rep: usize| {
        if case == 0 {
            "warm".to_owned()
        } else {
            format!("t{rep}")
        }
    };
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    for rep in 0..reps {
        for (case, (_, pool)) in cases.iter().enumerate() {
            pool.call(tenant(case, rep), &req).expect("call");
        }
        // The gap: long enough for a 30 ms idle_timeout to quiesce the
        // helpers (scanned every 7.5 ms) and for the spares taken to be
        // refilled (10 ms after the call that took one), so none of that
        // work falls inside a measured call.
        std::thread::sleep(Duration::from_millis(100));
        let last = cases.len() - 1;
        for turn in 0..last {
            let case = (rep + turn) % last;
            let t = Instant::now();
            cases[case].1.call(tenant(case, rep), &req).expect("call");
            samples[case].push(t.elapsed());
        }
        let t = Instant::now();
        cases[last].1.call(tenant(last, rep), &req).expect("call");
        samples[last].push(t.elapsed());
    }
    let summaries: Vec<Summary> = samples.iter_mut().map(|s| summarize(s)).collect();
    let rows = cases
        .iter()
        .zip(&summaries)
        .map(|((name, pool), s)| {
            let stats = pool.stats();
            vec![
                (*name).into(),
                fmt_us(s.median),
                fmt_us(s.p99),
                format!(
                    "{:.2}x",
                    s.median.as_secs_f64() / summaries[0].median.as_secs_f64()
                ),
                format!(
                    "{:.2}x",
                    s.p99.as_secs_f64() / summaries[0].p99.as_secs_f64()
                ),
                format!(
                    "{} / {} / {}",
                    stats.spare_hits, stats.spare_misses, stats.quiesced_idle
                ),
            ]
        })
        .collect();
    run.table(
        &[
            "case",
            "median",
            "p99",
            "median vs warm",
            "p99 vs warm",
            "spare hits / misses / quiesced",
        ],
        rows,
    );
    Value::Array(
        cases
            .iter()
            .zip(&summaries)
            .map(|((name, _), s)| json!({ "case": name, "first_call": summary_json(s) }))
            .collect(),
    )
}

fn spawn_per_call(run: &mut Run) -> Value {
    run.section(
        "5. Spawn per call vs a pooled call",
        "A fresh sandboxed helper for every request (launch, call, shutdown: what a naive user does) against a call \
         to the tenant's pooled helper. Interleaved.",
    );
    let reps = if run.quick { 5 } else { 200 };
    let launcher = Launcher::new(HelperConfig::new(HELPER)).expect("launcher");
    let mut config = Config::new(HELPER);
    config.spares = 0;
    let pool = Pool::new(config).expect("pool");
    let req = request(OP_ECHO, &[7u8; 1024]);
    pool.call("t", &req).expect("warm-up");
    let (mut fresh, mut pooled) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        let helper = launcher.launch().expect("launch");
        helper
            .call(&req, Instant::now() + Duration::from_secs(5))
            .expect("call");
        helper.shutdown(Duration::from_secs(1));
        fresh.push(t.elapsed());
        let t = Instant::now();
        pool.call("t", &req).expect("call");
        pooled.push(t.elapsed());
    }
    let fresh = summarize(&mut fresh);
    let pooled = summarize(&mut pooled);
    let ratio = fresh.median.as_secs_f64() / pooled.median.as_secs_f64();
    run.table(
        &["per call", "median", "p99"],
        vec![
            vec![
                "spawn a helper per call".into(),
                fmt_us(fresh.median),
                fmt_us(fresh.p99),
            ],
            vec![
                "pooled call".into(),
                fmt_us(pooled.median),
                fmt_us(pooled.p99),
            ],
            vec![
                "spawn-per-call / pooled".into(),
                format!("{ratio:.0}x"),
                String::new(),
            ],
        ],
    );
    json!({ "spawn_per_call": summary_json(&fresh), "pooled": summary_json(&pooled), "ratio": ratio })
}

fn meminfo_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn kernel_kib() -> u64 {
    meminfo_kib("Slab") + meminfo_kib("KernelStack") + meminfo_kib("PageTables")
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn self_count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn density(run: &mut Run) -> Value {
    run.section(
        "6. Density",
        "Idle helpers held by a pool: PSS per helper (smaps_rollup), kernel memory per helper (Slab + KernelStack + \
         PageTables from /proc/meminfo, before and after: approximate on a shared machine), and the host's fds and \
         threads per live helper.",
    );
    let counts: &[usize] = if run.quick { &[20] } else { &[100, 1000] };
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for &n in counts {
        let fds0 = self_count("/proc/self/fd");
        let threads0 = self_count("/proc/self/task");
        let kernel0 = kernel_kib();
        let mut config = Config::new(HELPER);
        config.spares = 0;
        config.max_helpers = n + 8;
        let pool = Pool::new(config).expect("pool");
        let threads_pool = self_count("/proc/self/task");
        for t in 0..n {
            pool.call(format!("t{t}"), &request(OP_ECHO, b"x"))
                .expect("call");
        }
        let pids: Vec<u32> = (0..n)
            .filter_map(|t| pool.helper_info(format!("t{t}")))
            .map(|i| i.pid)
            .collect();
        let pss: u64 = pids.iter().map(|p| pss_kib(*p)).sum();
        let kernel = kernel_kib().saturating_sub(kernel0);
        let fds = self_count("/proc/self/fd").saturating_sub(fds0);
        let threads = self_count("/proc/self/task").saturating_sub(threads0);
        drop(pool);
        let per = |v: u64| v as f64 / n as f64;
        rows.push(vec![
            n.to_string(),
            format!("{:.0} KiB", per(pss)),
            format!("{:.0} KiB", per(kernel)),
            format!("{:.2}", fds as f64 / n as f64),
            format!("{} (fixed: {})", threads, threads_pool - threads0),
        ]);
        out.push(json!({ "helpers": n, "pss_kib_per_helper": per(pss), "kernel_kib_per_helper": per(kernel), "host_fds_per_helper": fds as f64 / n as f64, "host_threads": threads }));
    }
    run.table(
        &[
            "live helpers",
            "PSS / helper",
            "kernel memory / helper",
            "host fds / helper",
            "host threads (all)",
        ],
        rows,
    );
    let sampling = keeper_sampling(run);
    let spin = idle_spin_to_kill(run);
    json!({ "helpers": Value::Array(out), "keeper_sampling": sampling, "idle_spin_to_kill": spin })
}

/// With the default limits (`max_idle_cpu` 500 ms, `sample_interval` 1 s):
/// the time from a helper's reply, after which it spins, to its kill.
fn idle_spin_to_kill(run: &mut Run) -> Value {
    let rounds = if run.quick { 1 } else { 4 };
    let mut config = Config::new(HELPER);
    config.args = vec!["--misbehave".into(), "spin-when-idle".into()];
    config.spares = 0;
    let pool = Pool::new(config).expect("pool");
    let mut times = Vec::new();
    for round in 0..rounds {
        // A tenant of its own each round: back-off never delays the next.
        let tenant = format!("spinner-{round}");
        let before = pool.stats().failures.idle_cpu;
        pool.call(&tenant, &request(OP_ECHO, b"x")).expect("call");
        let answered = Instant::now();
        while pool.stats().failures.idle_cpu == before {
            if answered.elapsed() > Duration::from_secs(30) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        times.push(answered.elapsed());
    }
    let summary = summarize(&mut times.clone());
    run.md.push_str(&format!(
        "A helper that spins after its reply, default limits (`max_idle_cpu` 500 ms, `sample_interval` 1 s): killed {} after its reply (median of {rounds}; slowest {}).\n\n",
        fmt_us(summary.median),
        fmt_us(*times.iter().max().unwrap_or(&Duration::ZERO)),
    ));
    println!(
        "   idle spin to kill (defaults): {}",
        fmt_us(summary.median)
    );
    json!({ "rounds": rounds, "median_ms": summary.median.as_secs_f64() * 1e3 })
}

/// The C reference helper next to the Rust one: launch to a verified Hello
/// and a warm 16-byte echo, rounds interleaved.
fn c_helper(run: &mut Run) -> Value {
    run.section(
        "7. The C reference helper beside the Rust one",
        "`tests/c/reference_helper.c` on the C runtime (`helper/capi`, a static library over the same helper \
         runtime), against the Rust reference helper: launch to a verified Hello through the launcher process, \
         and a warm 16-byte echo round trip (unpinned, default spin_wait), rounds interleaved. Both static.",
    );
    let rounds = if run.quick { 5 } else { 60 };
    let calls = if run.quick { 50 } else { 2000 };
    let launchers = [
        (
            "Rust",
            Launcher::new(HelperConfig::new(HELPER)).expect("launcher"),
        ),
        (
            "C",
            Launcher::new(HelperConfig::new(C_HELPER)).expect("launcher"),
        ),
    ];
    let mut launch: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut call: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let body = request(OP_ECHO, &[7u8; 15]);
    for round in 0..rounds {
        for (i, (_, launcher)) in launchers.iter().enumerate() {
            let started = Instant::now();
            let helper = launcher.launch().expect("launch");
            launch[i].push(started.elapsed());
            if round < 4 {
                for _ in 0..calls / 4 {
                    let started = Instant::now();
                    helper
                        .call(&body, Instant::now() + Duration::from_secs(5))
                        .expect("call");
                    call[i].push(started.elapsed());
                }
            }
            helper.shutdown(Duration::from_secs(1));
        }
    }
    let launch: Vec<Summary> = launch.iter_mut().map(|v| summarize(v)).collect();
    let call: Vec<Summary> = call.iter_mut().map(|v| summarize(v)).collect();
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    let rows = launchers
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            vec![
                name.to_string(),
                fmt_us(launch[i].median),
                fmt_us(launch[i].p99),
                format!("{:.2}x", ratio(launch[i].median, launch[0].median)),
                fmt_us(call[i].median),
                fmt_us(call[i].p99),
                format!("{:.2}x", ratio(call[i].median, call[0].median)),
            ]
        })
        .collect();
    run.table(
        &[
            "helper",
            "launch to Hello (median)",
            "p99",
            "vs Rust",
            "warm 16 B call (median)",
            "p99",
            "vs Rust",
        ],
        rows,
    );
    json!({
        "rust": { "launch": summary_json(&launch[0]), "call": summary_json(&call[0]) },
        "c": { "launch": summary_json(&launch[1]), "call": summary_json(&call[1]) },
    })
}

/// CPU time (ns) of this process's thread named `name` (the newest one),
/// from `/proc/self/task/*/schedstat`.
fn thread_cpu_ns(name: &str) -> Option<u64> {
    let mut best: Option<(u64, u64)> = None;
    for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let tid: u64 = entry.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let sched = std::fs::read_to_string(entry.path().join("schedstat")).ok()?;
        let ns = sched.split_whitespace().next()?.parse().ok()?;
        if best.is_none_or(|(t, _)| tid > t) {
            best = Some((tid, ns));
        }
    }
    best.map(|(_, ns)| ns)
}

/// The keeper's resource sampling at many live helpers: its thread's CPU
/// over a window with the limits on (sampling every 100 ms) and with every
/// limit "unlimited" (no sampling), pools in turn.
fn keeper_sampling(run: &mut Run) -> Value {
    let n = if run.quick { 20 } else { 1000 };
    let window = if run.quick {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(4)
    };
    let interval = Duration::from_millis(100);
    let mut measured = Vec::new();
    for on in [true, false] {
        let mut config = Config::new(HELPER);
        config.spares = 0;
        config.max_helpers = n + 8;
        config.sample_interval = interval;
        if !on {
            config.max_helper_memory = sandpool::SizeLimit::Unlimited;
            config.memory_budget = sandpool::MemoryBudget::Unlimited;
            config.max_idle_cpu = sandpool::TimeLimit::Unlimited;
        }
        let pool = Pool::new(config).expect("pool");
        for t in 0..n {
            pool.call(format!("t{t}"), &request(OP_ECHO, b"x"))
                .expect("call");
        }
        std::thread::sleep(interval * 2);
        let before = thread_cpu_ns("sandpool-keeper").unwrap_or(0);
        std::thread::sleep(window);
        let after = thread_cpu_ns("sandpool-keeper").unwrap_or(0);
        drop(pool);
        measured.push(after.saturating_sub(before));
    }
    let (on, off) = (measured[0], measured[1]);
    let samples = window.as_secs_f64() / interval.as_secs_f64();
    let per_helper_us = (on.saturating_sub(off)) as f64 / 1e3 / samples / n as f64;
    let share = |ns: u64| ns as f64 / window.as_nanos() as f64 * 100.0;
    run.md.push_str(&format!(
        "Keeper thread CPU at {n} live idle helpers over {:.1} s: sampling every 100 ms (memory and idle-CPU limits on): {:.2} ms ({:.2}% of a core); every limit \"unlimited\" (no sampling): {:.2} ms ({:.3}% of a core); {:.1}x; {per_helper_us:.1} us per helper per sample (at the default 1 s interval: {:.3}% of a core).\n\n",
        window.as_secs_f64(),
        on as f64 / 1e6,
        share(on),
        off as f64 / 1e6,
        share(off),
        on as f64 / off.max(1) as f64,
        per_helper_us * n as f64 / 1e4,
    ));
    println!(
        "   keeper CPU at {n} helpers: sampling {:.2} ms, none {:.2} ms, {per_helper_us:.1} us/helper/sample",
        on as f64 / 1e6,
        off as f64 / 1e6
    );
    json!({ "helpers": n, "window_s": window.as_secs_f64(), "interval_ms": 100, "keeper_cpu_ms_sampling": on as f64 / 1e6, "keeper_cpu_ms_no_sampling": off as f64 / 1e6, "us_per_helper_per_sample": per_helper_us })
}

// ---------------------------------------------------------------- plots

/// One line per spawner: launch median (ms) against `x_key`, over the
/// results where `fixed_key` is 0 (the other host-state axis held still).
fn launch_series(
    results: &[Value],
    x_key: &str,
    fixed_key: &str,
) -> Vec<(String, Vec<(f64, f64)>)> {
    Spawner::all()
        .iter()
        .map(|s| {
            let points = results
                .iter()
                .filter(|r| r["spawner"] == s.name() && r[fixed_key] == 0)
                .map(|r| {
                    (
                        r[x_key].as_f64().unwrap_or(0.0),
                        r["launch"]["median_us"].as_f64().unwrap_or(0.0) / 1000.0,
                    )
                })
                .collect();
            (s.name().to_owned(), points)
        })
        .collect()
}

fn plot_launch(run: &mut Run, results: &[Value]) {
    let plots = [
        (
            "launch_by_fds.svg",
            "Launch to ready vs host fds (median)",
            "host fds (no CLOEXEC)",
            "fds",
            "rss_mib",
        ),
        (
            "launch_by_rss.svg",
            "Launch to ready vs host memory (median)",
            "host RSS (MiB)",
            "rss_mib",
            "fds",
        ),
    ];
    for (file, title, x_label, x_key, fixed_key) in plots {
        let path = run.out.join(file);
        let series = launch_series(results, x_key, fixed_key);
        if let Err(err) = line_plot(&path, title, x_label, "ms", &series) {
            eprintln!("plot {}: {err}", path.display());
        }
    }
    run.md
        .push_str("\n![launch vs fds](launch_by_fds.svg) ![launch vs RSS](launch_by_rss.svg)\n");
}

fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
        .fold(1.0, f64::max);
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(0.1, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

// ---------------------------------------------------------------- main

fn machine() -> Value {
    let cmd_out = |cmd: &str, args: &[&str]| {
        #[allow(clippy::disallowed_methods)] // reads tool versions for the report
        let out = Command::new(cmd).args(args).output();
        out.ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .unwrap_or_default()
    };
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": cmd_out("uname", &["-r"]),
        "glibc": cmd_out("ldd", &["--version"]),
        "rustc": cmd_out("rustc", &["--version"]),
        "memory_kib": meminfo_kib("MemTotal"),
        "date": cmd_out("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    })
}

// ------------------------------------------------------------------- host

/// `compare --hold-host-locks DIR SLOTS`: the bench's stand-in for another
/// process on the host: takes `leader.lock` and slots `0..SLOTS` of `DIR`,
/// says `held`, and waits to be killed.
fn hold_host_locks_if_asked() {
    use nix::fcntl::{Flock, FlockArg};
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("--hold-host-locks") {
        return;
    }
    let (Some(dir), Some(slots)) = (
        args.get(2),
        args.get(3).and_then(|n| n.parse::<usize>().ok()),
    ) else {
        std::process::exit(2);
    };
    let dir = Path::new(dir);
    let open = |name: String| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(name))
            .expect("open a lock file")
    };
    let mut held = Vec::new();
    held.push(
        Flock::lock(open("leader.lock".into()), FlockArg::LockExclusive).expect("leader lock"),
    );
    for index in 0..slots {
        held.push(
            Flock::lock(
                open(format!("slot-{index}.lock")),
                FlockArg::LockExclusiveNonblock,
            )
            .expect("a slot"),
        );
    }
    println!("held");
    let _ = std::io::stdout().flush();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(held);
    std::process::exit(0);
}

/// Whether this process can take (and at once release) `path`'s lock.
fn lock_free(path: &Path) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .is_ok_and(|file| Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok())
}

/// One SIGKILL of a process holding the leader lock and a slot, with a
/// pool of this process waiting to lead: how long after the killed
/// process's `wait()` returns this pool leads and the slot is free.
#[allow(clippy::disallowed_methods)] // the lock holder is this bench again, not a helper
fn host_takeover_once(round: usize) -> (Duration, Duration) {
    let dir = std::env::temp_dir().join(format!(
        "sandpool-bench-host-{}-{round}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("host dir");
    let mut holder = Command::new(std::env::current_exe().expect("this bench"))
        .arg("--hold-host-locks")
        .arg(&dir)
        .arg("1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the lock holder");
    let mut said = [0u8; 5];
    holder
        .stdout
        .as_mut()
        .expect("piped")
        .read_exact(&mut said)
        .expect("held");
    let mut config = Config::new(HELPER);
    config.spares = 0;
    config.host = Some(sandpool::HostConfig {
        dir: dir.clone(),
        max_helpers: 4,
    });
    let pool = Pool::new(config).expect("pool");
    // Its leader thread is blocked in flock by now (a moment to get there).
    std::thread::sleep(Duration::from_millis(50));
    assert!(!pool.is_host_leader());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(holder.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    holder.wait().expect("wait");
    let dead = Instant::now();
    let slot = dir.join("slot-0.lock");
    let (mut led, mut freed) = (None, None);
    while led.is_none() || freed.is_none() {
        if led.is_none() && pool.is_host_leader() {
            led = Some(dead.elapsed());
        }
        if freed.is_none() && lock_free(&slot) {
            freed = Some(dead.elapsed());
        }
        assert!(dead.elapsed() < Duration::from_secs(5), "no takeover");
        std::thread::yield_now();
    }
    drop(pool);
    let _ = std::fs::remove_dir_all(&dir);
    (led.unwrap_or_default(), freed.unwrap_or_default())
}

fn host_coordination(run: &mut Run) -> Value {
    run.section(
        "8. Several processes on one host ([host])",
        "Leader takeover and slot release after a SIGKILL: another process (this bench run again) holds leader.lock and a \
         slot; a pool here waits to lead; times from the killed process's wait() returning until this pool leads and the \
         slot is free (medians of the rounds). Then a cold call (launch + call of a new tenant) on a pool with a host cap \
         against one without, interleaved in one run.",
    );
    let rounds = if run.quick { 2 } else { 7 };
    let (mut takeovers, mut releases) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (led, freed) = host_takeover_once(round);
        takeovers.push(led);
        releases.push(freed);
    }
    let takeover = summarize(&mut takeovers);
    let release = summarize(&mut releases);
    let reps = if run.quick { 10 } else { 150 };
    let dir = std::env::temp_dir().join(format!("sandpool-bench-host-{}-cost", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let make = |host: bool| {
        let mut config = Config::new(HELPER);
        config.spares = 0;
        config.host = host.then(|| sandpool::HostConfig {
            dir: dir.clone(),
            max_helpers: 1000,
        });
        Pool::new(config).expect("pool")
    };
    let (capped, free) = (make(true), make(false));
    let req = request(OP_ECHO, b"x");
    for pool in [&capped, &free] {
        pool.call("warm-up", &req).expect("warm-up call");
    }
    let (mut with_cap, mut without) = (Vec::new(), Vec::new());
    for i in 0..reps {
        let mut order = [(&capped, &mut with_cap), (&free, &mut without)];
        // Neither always goes first.
        if i % 2 == 1 {
            order.reverse();
        }
        for (pool, samples) in order {
            let t = Instant::now();
            pool.call(format!("cold-{i}"), &req).expect("cold call");
            samples.push(t.elapsed());
        }
    }
    drop((capped, free));
    let _ = std::fs::remove_dir_all(&dir);
    let with_cap = summarize(&mut with_cap);
    let without = summarize(&mut without);
    let ratio = with_cap.median.as_secs_f64() / without.median.as_secs_f64();
    run.table(
        &["measure", "median", "p99"],
        vec![
            vec![
                format!("leader takeover after SIGKILL ({rounds} rounds)"),
                fmt_us(takeover.median),
                fmt_us(takeover.p99),
            ],
            vec![
                format!("slot free after SIGKILL ({rounds} rounds)"),
                fmt_us(release.median),
                fmt_us(release.p99),
            ],
            vec![
                "cold call, host cap on".into(),
                fmt_us(with_cap.median),
                fmt_us(with_cap.p99),
            ],
            vec![
                "cold call, host cap off".into(),
                fmt_us(without.median),
                fmt_us(without.p99),
            ],
            vec!["on / off".into(), format!("{ratio:.3}x"), String::new()],
        ],
    );
    json!({
        "takeover": summary_json(&takeover),
        "slot_release": summary_json(&release),
        "cold_call_host_cap": summary_json(&with_cap),
        "cold_call_no_host_cap": summary_json(&without),
        "ratio": ratio,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    sandpool_benches::run_pipe_peer_if_asked();
    hold_host_locks_if_asked();
    if let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        let _ = ORIGINAL_CPUS.set(set);
    }
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only 1,4`: run just these scenarios (for investigating one of them).
    let only: Option<Vec<u32>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|list| {
            list.split(',')
                .filter_map(|n| n.trim().parse().ok())
                .collect()
        });
    let wanted = |n: u32| only.as_ref().is_none_or(|list| list.contains(&n));
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(if quick {
                "target/bench-quick"
            } else {
                "benches/results"
            })
        });
    std::fs::create_dir_all(&out)?;
    // Room for 19,000 leaked fds (the hard limit here is 20,000).
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let started = Instant::now();
    let mut run = Run {
        quick,
        md: String::new(),
        json: BTreeMap::new(),
        out: out.clone(),
    };
    let machine = machine();
    run.md.push_str(&format!(
        "# sandpool benchmark results{}\n\nMachine: {} cores, kernel {}, {}, {}. Run at {}.\n\
         Medians with p99; ratios compare contenders interleaved in this one run.\n",
        if quick {
            " (quick smoke run: not for citing)"
        } else {
            ""
        },
        machine["cores"],
        machine["kernel"].as_str().unwrap_or(""),
        machine["glibc"].as_str().unwrap_or(""),
        machine["rustc"].as_str().unwrap_or(""),
        machine["date"].as_str().unwrap_or(""),
    ));
    run.json.insert("machine".into(), machine);
    run.json.insert("quick".into(), json!(quick));
    type Scenario = fn(&mut Run) -> Value;
    let scenarios: [(u32, &str, Scenario); 10] = [
        (1, "launch_by_host_state", launch_by_host_state),
        (2, "concurrent_launches", concurrent_launches),
        (3, "warm_calls", warm_calls),
        (3, "large_payloads", large_payloads),
        (3, "async_callers", async_callers),
        (4, "first_call_after_idle_gap", idle_gap),
        (5, "spawn_per_call", spawn_per_call),
        (6, "density", density),
        (7, "c_helper", c_helper),
        (8, "host", host_coordination),
    ];
    for (n, key, scenario) in scenarios {
        if wanted(n) {
            let value = scenario(&mut run);
            run.json.insert(key.into(), value);
        }
    }
    run.json
        .insert("seconds".into(), json!(started.elapsed().as_secs_f64()));
    std::fs::write(out.join("results.md"), &run.md)?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&run.json)?,
    )?;
    println!(
        "wrote {} in {:.0} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
