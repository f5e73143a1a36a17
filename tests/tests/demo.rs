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

#[test]
fn sighup_reloads_the_config_into_the_live_pool_or_refuses_it_by_name() {
    use std::io::BufRead;
    let dir = std::env::temp_dir().join(format!("sandpool-demo-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("demo.toml");
    std::fs::write(&path, "spares = 2\nidle_timeout = \"1h\"\n").unwrap();
    let mut child = Command::new(DEMO)
        .args(["--tenants", "16", "--threads", "2", "--duration", "6s"])
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let wait_line = |needle: &str| -> String {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line with {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    };
    wait_line("SIGHUP reloads --config");
    let hup = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    };
    std::fs::write(&path, "spares = 3\nidle_timeout = \"150ms\"\n").unwrap();
    hup();
    let line = wait_line("SIGHUP:");
    assert!(line.contains("reloaded"), "{line}");
    assert!(line.contains("spares 3, idle timeout 150ms"), "{line}");
    // A field fixed at Pool::new: refused by name, the pool goes on.
    std::fs::write(&path, "spares = 1\nmax_frame = \"64KiB\"\n").unwrap();
    hup();
    let line = wait_line("SIGHUP:");
    assert!(line.contains("refused, pool unchanged"), "{line}");
    assert!(line.contains("max_frame"), "{line}");
    let status = child.wait().unwrap();
    let rest: Vec<String> = rx.try_iter().collect();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(status.success(), "{}", rest.join("\n"));
    assert!(
        rest.iter()
            .any(|l| l.contains("OK: every response verified")),
        "{}",
        rest.join("\n")
    );
}
