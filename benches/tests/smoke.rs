//! The comparison harness works end to end (`--quick`): it runs every
//! scenario and writes its report, data and plots. A smoke test only: it
//! checks that the harness works, never a timing.
#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)] // runs the harness binary

use std::process::Command;

#[test]
fn the_comparison_harness_runs_and_writes_its_report() {
    let out = std::env::temp_dir().join(format!("sandpool-bench-smoke-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_compare"))
        .args(["--quick", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    for section in [
        "1. Launch to ready",
        "2. 50 launches",
        "3. Warm call",
        "3c. call_async from 32 tokio tasks",
        "4. First call after an idle gap",
        "5. Spawn per call",
        "6. Density",
    ] {
        assert!(md.contains(section), "results.md lacks {section:?}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    for key in [
        "machine",
        "launch_by_host_state",
        "concurrent_launches",
        "warm_calls",
        "async_callers",
        "first_call_after_idle_gap",
        "spawn_per_call",
        "density",
    ] {
        assert!(json.get(key).is_some(), "results.json lacks {key}");
    }
    for plot in ["launch_by_fds.svg", "launch_by_rss.svg"] {
        assert!(
            std::fs::read_to_string(out.join(plot))
                .unwrap()
                .starts_with("<svg"),
            "{plot}"
        );
    }
    std::fs::remove_dir_all(&out).unwrap();
}
