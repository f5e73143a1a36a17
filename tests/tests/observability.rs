//! Metrics, logs and helper stderr, observed through a real recorder and a
//! real tracing subscriber while the pool launches, serves, quiesces, and
//! loses helpers to a crash, a timeout and a seccomp kill.
//!
//! Its own binary: the metrics recorder and the tracing subscriber are
//! process-global.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use sandpool::{CallError, Pool};
use sandpool_reference_helper::reference::*;
use sandpool_tests::{pool_config, wait_for};

/// Accumulates snapshots (the debugging recorder resets counters and drains
/// histograms on every snapshot).
struct Observed {
    snapshotter: Snapshotter,
    counters: HashMap<String, u64>,
    samples: HashMap<String, usize>,
    gauges: HashMap<String, f64>,
}

impl Observed {
    fn refresh(&mut self) {
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let key = key.key();
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            match value {
                DebugValue::Counter(n) => *self.counters.entry(name).or_default() += n,
                DebugValue::Histogram(values) => {
                    *self.samples.entry(name).or_default() += values.len()
                }
                DebugValue::Gauge(value) => {
                    self.gauges.insert(name, value.into_inner());
                }
            }
        }
    }

    fn counter(&mut self, name: &str) -> u64 {
        self.refresh();
        self.counters.get(name).copied().unwrap_or(0)
    }

    fn samples(&mut self, name: &str) -> usize {
        self.refresh();
        self.samples.get(name).copied().unwrap_or(0)
    }

    fn gauge(&mut self, name: &str) -> f64 {
        self.refresh();
        self.gauges.get(name).copied().unwrap_or(-1.0)
    }
}

fn log() -> &'static sandpool_tests::CapturedLog {
    sandpool_tests::captured_log()
}

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn launches_calls_quiesce_crashes_and_stderr_are_all_observable() {
    let log = log();
    let recorder = DebuggingRecorder::new();
    let mut observed = Observed {
        snapshotter: recorder.snapshotter(),
        counters: HashMap::new(),
        samples: HashMap::new(),
        gauges: HashMap::new(),
    };
    recorder.install().unwrap();

    let mut config = pool_config(&["--test-ops"]);
    config.spares = 1;
    config.idle_timeout = Duration::from_millis(300);
    config.slow_launch_threshold = Duration::from_nanos(1);
    config.stderr_bytes_per_second = bytesize::ByteSize::kib(4);
    // With a host directory of its own (it leads it), so the host metrics
    // are recorded too.
    let host_dir = std::env::temp_dir().join(format!("sandpool-obs-{}", std::process::id()));
    config.host = Some(sandpool::HostConfig {
        dir: host_dir.clone(),
        max_helpers: 64,
    });
    let pool = Pool::new(config).unwrap();

    // Launch and a spare hit.
    assert!(wait_for(WAIT, || pool.stats().spare == 1));
    assert_eq!(pool.call("alpha", &request(OP_ECHO, b"hi")).unwrap(), b"hi");
    assert!(observed.counter("sandpool_launches_total{outcome=ok}") >= 1);
    assert_eq!(observed.counter("sandpool_spares_total{result=hit}"), 1);
    assert!(observed.samples("sandpool_launch_seconds{}") >= 1);
    assert!(observed.samples("sandpool_helper_fd_close_seconds{}") >= 1);
    assert_eq!(observed.counter("sandpool_calls_total{outcome=ok}"), 1);
    assert_eq!(observed.samples("sandpool_call_seconds{outcome=ok}"), 1);

    // Helper stderr becomes a log line with pid and tenant.
    let pid = pool.helper_info("alpha").unwrap().pid;
    pool.call("alpha", &request(OP_STDERR, b"checkpoint reached\n"))
        .unwrap();
    assert!(wait_for(WAIT, || log.text().contains("checkpoint reached")));
    let line = log
        .text()
        .lines()
        .find(|l| l.contains("checkpoint reached"))
        .unwrap()
        .to_owned();
    assert!(
        line.contains(&format!("pid={pid}")) && line.contains("tenant=alpha"),
        "{line}"
    );
    assert!(wait_for(WAIT, || observed
        .counter("sandpool_helper_stderr_lines_total{}")
        >= 1));

    // A flood far beyond the pipe and the budget neither blocks the helper
    // nor reaches the log whole.
    let flood: Vec<u8> = (0..4000)
        .flat_map(|i| format!("flood line {i:05}\n").into_bytes())
        .collect();
    assert_eq!(
        pool.call("alpha", &request(OP_STDERR, &flood))
            .unwrap()
            .len(),
        flood.len()
    );
    assert!(wait_for(WAIT, || observed
        .counter("sandpool_helper_stderr_dropped_bytes_total{}")
        > 0));
    assert!(
        log.count("flood line") < 4000,
        "the rate limit dropped lines"
    );

    // A seccomp kill, a timeout, and an exit.
    let err = pool
        .call("alpha", &request(OP_OPEN, b"/etc/passwd"))
        .unwrap_err();
    assert!(err.is_seccomp_kill());
    let err = pool
        .call_with_deadline(
            "beta",
            &sleep_request(2000, b"zz"),
            Instant::now() + Duration::from_millis(200),
        )
        .unwrap_err();
    assert!(matches!(err, CallError::Timeout { .. }), "{err:?}");
    assert_eq!(
        observed.counter("sandpool_helper_deaths_total{cause=seccomp}"),
        1
    );
    assert_eq!(
        observed.counter("sandpool_helper_deaths_total{cause=timeout}"),
        1
    );
    assert_eq!(observed.counter("sandpool_calls_total{outcome=died}"), 1);
    assert_eq!(observed.counter("sandpool_calls_total{outcome=timeout}"), 1);
    let stats = pool.stats();
    assert_eq!((stats.failures.seccomp, stats.failures.timeout), (1, 1));

    // Quiesce by idleness.
    pool.call("gamma", &request(OP_ECHO, b"x")).unwrap();
    assert!(wait_for(WAIT, || observed
        .counter("sandpool_quiesced_total{cause=idle}")
        >= 1));
    assert!(wait_for(WAIT, || observed
        .gauge("sandpool_helpers{state=spare}")
        == 1.0));
    assert_eq!(observed.gauge("sandpool_calls_in_flight{}"), 0.0);

    // The slow-path warning fired once although every launch was "slow".
    assert!(pool.stats().launches >= 3);
    assert_eq!(
        log.count("slow path: a helper launch took longer"),
        1,
        "{}",
        log.text()
    );

    // stats() and the metrics agree.
    let stats = pool.stats();
    assert_eq!(
        stats.launches,
        observed.counter("sandpool_launches_total{outcome=ok}")
    );
    assert_eq!(
        stats.spare_hits,
        observed.counter("sandpool_spares_total{result=hit}")
    );
    assert_eq!(
        stats.quiesced_idle,
        observed.counter("sandpool_quiesced_total{cause=idle}")
    );
    assert_eq!(
        stats.calls_ok,
        observed.counter("sandpool_calls_total{outcome=ok}")
            + observed.counter("sandpool_calls_total{outcome=helper_error}")
    );

    // Every documented metric name exists in the recorder by now.
    for (name, _, _) in sandpool::METRICS {
        let seen = observed
            .counters
            .keys()
            .chain(observed.samples.keys())
            .chain(observed.gauges.keys())
            .any(|key| key.starts_with(&format!("{name}{{")));
        assert!(seen, "{name} was never recorded");
    }
    assert!(pool.is_host_leader(), "alone in its host directory");
    drop(pool);
    let _ = std::fs::remove_dir_all(&host_dir);
}
