//! The README's first command, in short mode: the demo runs, verifies every
//! response, shows the hostile tenant killed by seccomp, and serves its
//! metrics in Prometheus text format.
#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)] // runs the demo binary, not a helper

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEMO: &str = env!("CARGO_BIN_EXE_sandpool-demo");

#[test]
fn the_demo_runs_verifies_and_contains_the_hostile_tenant() {
    let output = Command::new(DEMO)
        .args([
            "--tenants",
            "24",
            "--duration",
            "3s",
            "--seed",
            "7",
            "--threads",
            "4",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed: {stdout}\n{stderr}");
    for needle in [
        "| calls |",
        "| response mismatches | 0 |",
        "| errors of non-hostile tenants | 0 |",
        "killed by seccomp (SIGSYS)",
        "| spare hit rate |",
        "| helper memory (PSS) |",
        "OK: every response verified",
    ] {
        assert!(
            stdout.contains(needle),
            "summary lacks {needle:?}:\n{stdout}"
        );
    }
}

#[test]
fn the_demo_refuses_a_bad_config_with_a_named_error() {
    let dir = std::env::temp_dir().join(format!("sandpool-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "spares = 5000\n").unwrap();
    let output = Command::new(DEMO)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("spares"), "{stderr}");
}

fn scrape(addr: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(body)
}

fn calls_ok(body: &str) -> Option<f64> {
    body.lines()
        .find(|line| line.starts_with("sandpool_calls_total{outcome=\"ok\"}"))
        .and_then(|line| line.split_whitespace().last()?.parse().ok())
}

#[test]
fn the_demo_serves_prometheus_metrics_that_move() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut demo = Command::new(DEMO)
        .args([
            "--tenants",
            "16",
            "--duration",
            "4s",
            "--threads",
            "2",
            "--metrics-addr",
            &addr,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let names = [
        "sandpool_launch_seconds",
        "sandpool_helpers",
        "sandpool_spares_total",
    ];
    // Until calls were counted and every gauge has been set once (the
    // helper gauges are set at the keeper's first tick).
    let mut first = None;
    while Instant::now() < deadline {
        first = scrape(&addr).and_then(|body| calls_ok(&body).map(|n| (n, body)));
        if first
            .as_ref()
            .is_some_and(|(_, body)| names.iter().all(|name| body.contains(name)))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (first, body) = first.expect("the metrics endpoint answered with sandpool_calls_total");
    for name in names {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    let mut later = first;
    while later <= first && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        later = scrape(&addr).as_deref().and_then(calls_ok).unwrap_or(later);
    }
    assert!(
        later > first,
        "sandpool_calls_total moved from {first} to {later}"
    );
    assert!(demo.wait().unwrap().success());
}
