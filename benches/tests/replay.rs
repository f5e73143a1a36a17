//! The replay tool: its trace parser, its simulation of the fixed policy
//! against hand-computed and brute-force figures, the trace generator's
//! determinism, and the binaries' output and exit statuses.
#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)] // runs the tool binaries

use std::process::Command;
use std::time::Duration;

use sandpool::lifecycle::IdlePolicy;
use sandpool_benches::replay::{
    Call, ParseTraceError, keeper_tick, pareto_front, parse_trace, run_policies, simulate,
    standard_policies,
};
use sandpool_benches::tracegen::{Mix, generate};

fn fixed(seconds: u64) -> IdlePolicy {
    IdlePolicy::Fixed {
        idle_timeout: Duration::from_secs(seconds),
    }
}

#[test]
fn the_parser_reads_calls_and_skips_blanks_and_comments() {
    let trace = parse_trace(
        "# header\n\n0,a\n1.5, b \n  # indented comment\n1.5,a\n2,tenant with spaces\n",
    )
    .unwrap();
    assert_eq!(trace.tenants, ["a", "b", "tenant with spaces"]);
    assert_eq!(
        trace.calls,
        [
            Call {
                at: Duration::ZERO,
                tenant: 0
            },
            Call {
                at: Duration::from_millis(1500),
                tenant: 1
            },
            Call {
                at: Duration::from_millis(1500),
                tenant: 0
            },
            Call {
                at: Duration::from_secs(2),
                tenant: 2
            },
        ]
    );
}

#[test]
fn a_malformed_line_is_an_error_naming_its_number() {
    for (line, problem) in [
        ("12", "no comma between seconds and tenant"),
        ("12,", "empty tenant"),
        ("12,a,b", "more than one comma"),
        ("abc,a", "seconds is not a non-negative decimal number"),
        ("-1,a", "seconds is not a non-negative decimal number"),
        ("1e3,a", "seconds is not a non-negative decimal number"),
        ("inf,a", "seconds is not a non-negative decimal number"),
        ("1.2.3,a", "seconds is not a non-negative decimal number"),
        (".,a", "seconds is not a non-negative decimal number"),
        (",a", "seconds is not a non-negative decimal number"),
    ] {
        // Line 4: a comment and a blank line count.
        let text = format!("# trace\n0,a\n\n{line}\n");
        match parse_trace(&text) {
            Err(ParseTraceError::Malformed {
                line: 4,
                problem: got,
                ..
            }) => assert_eq!(got, problem, "{line:?}"),
            other => panic!("{line:?}: {other:?}"),
        }
    }
    let message = parse_trace("0,a\nx,a\n").unwrap_err().to_string();
    assert!(message.starts_with("line 2:"), "{message}");
}

#[test]
fn an_unsorted_line_is_an_error_naming_its_number() {
    let err = parse_trace("0,a\n5,b\n# c\n4.5,a\n").unwrap_err();
    assert_eq!(
        err,
        ParseTraceError::Unsorted {
            line: 4,
            seconds: 4.5,
            previous: 5.0
        }
    );
    assert!(err.to_string().contains("line 4"));
}

/// Hand-computed: fixed 60 s, so the keeper ticks every second (60 / 4
/// clamped to 1 s). A helper lives from its cold call to the first tick at
/// or after its last call + 60 s.
#[test]
fn fixed_60s_on_a_hand_built_trace() {
    let trace = parse_trace("0,a\n5,c\n10,a\n30.25,b\n65,c\n90.25,b\n100,a\n200.5,a\n").unwrap();
    let policy = fixed(60);
    assert_eq!(keeper_tick(&policy), Duration::from_secs(1));
    let outcome = simulate(&trace, &policy, keeper_tick(&policy));
    // a: cold at 0; 10 is warm; closed at the tick at 70: 70 s.
    //    cold at 100 (closed at 70); closed at 160: 60 s.
    //    cold at 200.5; keep until 260.5, closed at the tick at 261: 60.5 s.
    let a = 70.0 + 60.0 + 60.5;
    // b: cold at 30.25; at the tick at 90, 90 < 90.25: still kept, so the
    //    call at 90.25 (gap exactly 60) is warm; closed at 151: 120.75 s.
    let b = 151.0 - 30.25;
    // c: cold at 5; keep until 65, and the tick at 65 comes after the
    //    call at 65, which is warm; closed at 125: 120 s.
    let c = 125.0 - 5.0;
    assert_eq!(outcome.calls, 8);
    assert_eq!(outcome.cold_starts, 3 + 1 + 1);
    assert_eq!(outcome.prewarms, 0);
    assert!(
        (outcome.helper_seconds - (a + b + c)).abs() < 1e-9,
        "{outcome:?}"
    );

    // The same trace, ticks every 25 s: a closes at 75 (not 70), is cold
    // at 100 and closes at 175, cold at 200.5 and closes at 275; b is kept
    // at 75 and 100 ... and closes at 175 (first tick >= 150.25); c is
    // kept until the tick at 125.
    let outcome = simulate(&trace, &policy, Duration::from_secs(25));
    assert_eq!(outcome.cold_starts, 5);
    let expected = 75.0 + 75.0 + (275.0 - 200.5) + (175.0 - 30.25) + (125.0 - 5.0);
    assert!(
        (outcome.helper_seconds - expected).abs() < 1e-9,
        "{outcome:?}"
    );
}

/// A brute-force replay of a fixed policy, second by second: the
/// reference the event-driven simulation must agree with.
fn brute_force_fixed(calls: &[(f64, usize)], tenants: usize, timeout: f64) -> (u64, f64) {
    let mut last = vec![f64::NAN; tenants];
    let mut since = vec![f64::NAN; tenants];
    let (mut cold, mut alive_s) = (0, 0.0);
    let mut next_call = 0;
    let end = calls.last().map_or(0.0, |c| c.0) + timeout + 2.0;
    let mut tick = 1.0;
    while tick <= end {
        while next_call < calls.len() && calls[next_call].0 <= tick {
            let (at, tenant) = calls[next_call];
            if since[tenant].is_nan() {
                cold += 1;
                since[tenant] = at;
            }
            last[tenant] = at;
            next_call += 1;
        }
        // The tick itself, after any call at its instant.
        for tenant in 0..tenants {
            if !since[tenant].is_nan() && tick >= last[tenant] + timeout {
                alive_s += tick - since[tenant];
                since[tenant] = f64::NAN;
            }
        }
        tick += 1.0;
    }
    (cold, alive_s)
}

#[test]
fn the_fixed_simulation_agrees_with_a_brute_force_replay() {
    let text = generate(9, 12, 3.0, &Mix::default());
    let trace = parse_trace(&text).unwrap();
    let calls: Vec<(f64, usize)> = trace
        .calls
        .iter()
        .map(|c| (c.at.as_secs_f64(), c.tenant))
        .collect();
    for timeout in [10, 60, 180, 600] {
        let policy = fixed(timeout);
        let outcome = simulate(&trace, &policy, keeper_tick(&policy));
        let (cold, alive_s) = brute_force_fixed(&calls, trace.tenants.len(), timeout as f64);
        assert_eq!(outcome.cold_starts, cold, "fixed {timeout}");
        assert!(
            (outcome.helper_seconds - alive_s).abs() < 1e-6 * alive_s.max(1.0),
            "fixed {timeout}: {} vs {alive_s}",
            outcome.helper_seconds
        );
    }
}

#[test]
fn the_adaptive_policy_prewarms_a_periodic_tenant() {
    // One call every 400 s for a day: fixed 180 s cold-starts every one.
    let text: String = (0..216).map(|i| format!("{},p\n", i * 400)).collect();
    let trace = parse_trace(&text).unwrap();
    let runs = run_policies(&trace, &standard_policies());
    let baseline = runs[2].outcome;
    assert_eq!(runs[2].idle_timeout_s(), Some(180.0));
    assert_eq!(baseline.cold_starts, 216);
    let adaptive = runs[6].outcome;
    assert_eq!(runs[6].idle_timeout_s(), None);
    assert!(adaptive.cold_starts <= 10, "{adaptive:?}");
    assert!(adaptive.prewarms >= 200, "{adaptive:?}");
    assert!(
        adaptive.helper_seconds < baseline.helper_seconds,
        "{adaptive:?}"
    );
    // Fixed 600 s keeps it warm too, at a higher price: both on the front.
    let front = pareto_front(&runs);
    assert!(front.contains(&6));
}

#[test]
fn the_generator_is_deterministic_for_a_seed() {
    let mix = Mix::default();
    let one = generate(42, 30, 2.0, &mix);
    assert_eq!(one, generate(42, 30, 2.0, &mix));
    assert_ne!(one, generate(43, 30, 2.0, &mix));
    let trace = parse_trace(&one).unwrap();
    assert!(trace.calls.len() > 1000);
    for kind in ["steady", "periodic", "bursty"] {
        assert!(
            trace.tenants.iter().any(|t| t.starts_with(kind)),
            "no {kind} tenant"
        );
    }
    assert_eq!(mix.counts(30), [6, 9, 9, 6]);
    assert_eq!("periodic=1".parse::<Mix>().unwrap().counts(7), [0, 7, 0, 0]);
    assert!("often=1".parse::<Mix>().is_err());
    assert!("steady=0".parse::<Mix>().is_err());
    assert!("steady=-1".parse::<Mix>().is_err());

    let run = || {
        Command::new(env!("CARGO_BIN_EXE_sandpool-tracegen"))
            .args(["--seed", "5", "--tenants", "20", "--hours", "1"])
            .output()
            .unwrap()
    };
    let (first, second) = (run(), run());
    assert!(first.status.success());
    assert_eq!(first.stdout, second.stdout);
    assert_eq!(
        String::from_utf8(first.stdout).unwrap(),
        generate(5, 20, 1.0, &mix)
    );
}

fn write_temp(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("sandpool-replay-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `sandpool-replay` with `args` to its end.
fn replay(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sandpool-replay"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn replay_json_is_one_array_of_the_contract_objects() {
    let path = write_temp("json.csv", &generate(3, 10, 1.0, &Mix::default()));
    let svg = path.with_extension("svg");
    let out = replay(&[
        "--trace".as_ref(),
        path.as_ref(),
        "--json".as_ref(),
        "--svg".as_ref(),
        svg.as_ref(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = value.as_array().unwrap();
    assert_eq!(rows.len(), 7);
    let timeouts: Vec<Option<f64>> = rows
        .iter()
        .map(|row| row["idle_timeout_s"].as_f64())
        .collect();
    assert_eq!(
        timeouts,
        [
            Some(10.0),
            Some(60.0),
            Some(180.0),
            Some(300.0),
            Some(600.0),
            Some(1800.0),
            None
        ]
    );
    for (index, row) in rows.iter().enumerate() {
        let object = row.as_object().unwrap();
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["cold_starts", "helper_seconds", "idle_timeout_s", "policy"]
        );
        let policy = if index < 6 { "fixed" } else { "adaptive" };
        assert_eq!(row["policy"], policy);
        assert!(row["cold_starts"].is_u64());
        assert!(row["helper_seconds"].as_f64().unwrap() > 0.0);
        if index == 6 {
            assert!(row["idle_timeout_s"].is_null());
        }
    }
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("adaptive"));
    // Without --json: the table, with the ratio columns.
    let out = replay(&["--trace".as_ref(), path.as_ref()]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("cold-start ratio") && table.contains("| fixed 180s | 1s |"));
    assert!(table.contains("| 1.00x |"));
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&svg);
}

#[test]
fn replay_of_a_bad_trace_exits_2_naming_the_line() {
    let path = write_temp("bad.csv", "# t\n0,a\n3,b\n2,a\n");
    let out = replay(&["--trace".as_ref(), path.as_ref()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("line 4") && stderr.contains("not sorted"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    std::fs::write(&path, "0,a\nzero,b\n").unwrap();
    let out = replay(&["--trace".as_ref(), path.as_ref()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr).unwrap().contains("line 2"));
    let _ = std::fs::remove_file(&path);
    for args in [
        &["--trace"][..],
        &[][..],
        &["--trace", "/nonexistent/trace"][..],
        &["--frobnicate"][..],
    ] {
        let out = replay(&args.iter().map(std::ffi::OsStr::new).collect::<Vec<_>>());
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}
