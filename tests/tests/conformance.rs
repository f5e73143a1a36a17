//! The conformance runner (`sandpool_tests::conformance`, the
//! `sandpool-conformance` binary) against the Rust reference helper: it
//! passes on the well-behaved helper, with and without the test ops, and
//! fails, naming the check, on each misbehaviour that breaks the contract.
//! Each run launches real helpers under the real kernel's seccomp.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use sandpool_tests::conformance::{self, CHECKS, Options, Outcome, Report};
use sandpool_tests::helper_bin;

/// Generous per-step deadline: the machine may be loaded, and a slow but
/// conforming helper must not fail here. No case below waits for it.
const STEP: Duration = Duration::from_secs(20);

fn run(args: &[&str]) -> Report {
    let mut options = Options::new(helper_bin(), args);
    options.timeout = STEP;
    conformance::run(&options)
}

/// The failure message of `name`, or a panic showing the whole report.
fn failure<'a>(report: &'a Report, name: &str) -> &'a str {
    match report.outcome(name) {
        Some(Outcome::Fail(why)) => why,
        other => panic!("{name} should fail, got {other:?}\n{report}"),
    }
}

fn passes(report: &Report, name: &str) {
    assert!(
        matches!(report.outcome(name), Some(Outcome::Pass(_))),
        "{name} should pass\n{report}"
    );
}

#[test]
fn reference_helper_conforms_and_skips_only_the_test_op_probe() {
    let report = run(&[]);
    let names: Vec<&str> = report.checks.iter().map(|c| c.name).collect();
    assert_eq!(names, CHECKS, "every check runs, in order");
    assert_eq!(report.failures(), Vec::<&str>::new(), "\n{report}");
    match report.outcome("forbidden-syscall-kills") {
        Some(Outcome::Skip(why)) => assert!(why.contains("--test-ops"), "{why}"),
        other => panic!("without --test-ops the probe is skipped, got {other:?}"),
    }
    assert_eq!(report.skipped(), 1, "\n{report}");
}

#[test]
fn reference_helper_with_test_ops_passes_every_check() {
    let report = run(&["--test-ops"]);
    assert_eq!(report.failures(), Vec::<&str>::new(), "\n{report}");
    assert_eq!(report.skipped(), 0, "\n{report}");
    assert_eq!(report.passed(), CHECKS.len());
}

/// The C reference helper (tests/c/reference_helper.c on helper/capi)
/// passes the same checks as the Rust one, its forbidden-syscall probe
/// included.
#[test]
fn the_c_reference_helper_passes_every_check() {
    let mut options = Options::new(sandpool_tests::c_helper_bin(), &["--test-ops"]);
    options.timeout = STEP;
    let report = conformance::run(&options);
    assert_eq!(report.failures(), Vec::<&str>::new(), "\n{report}");
    assert_eq!(report.skipped(), 0, "\n{report}");
    assert_eq!(report.passed(), CHECKS.len());
}

#[test]
fn skip_seccomp_fails_the_seccomp_checks() {
    let report = run(&["--test-ops", "--misbehave", "skip-seccomp"]);
    assert!(failure(&report, "proc-seccomp").contains("Seccomp: \"0\""));
    assert!(failure(&report, "hello-claims-sandbox").contains("seccomp Off"));
    assert!(failure(&report, "launcher-verifies-hello").contains("seccomp Off"));
    assert!(failure(&report, "forbidden-syscall-kills").contains("/etc/passwd"));
    passes(&report, "proc-fds-only-stdio");
}

#[test]
fn lie_seccomp_is_caught_by_the_kernel_view_not_the_hello() {
    let report = run(&["--test-ops", "--misbehave", "lie-seccomp"]);
    // The Hello claims enforce: only the kernel tells.
    passes(&report, "hello-claims-sandbox");
    assert!(failure(&report, "proc-seccomp").contains("Seccomp: \"0\""));
    assert!(failure(&report, "launcher-verifies-hello").contains("Seccomp: 0"));
}

#[test]
fn keep_caps_fails_the_capability_checks() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_ne!(eff, 0, "this test needs a host with capabilities to keep");
    let report = run(&["--misbehave", "keep-caps"]);
    passes(&report, "hello-claims-sandbox");
    assert!(failure(&report, "proc-cap-eff").contains("CapEff"));
    assert!(failure(&report, "proc-cap-prm").contains("CapPrm"));
    assert!(failure(&report, "launcher-verifies-hello").contains("CapEff"));
    passes(&report, "proc-seccomp");
}

#[test]
fn wrong_id_fails_the_ordering_check() {
    let report = run(&["--misbehave", "wrong-id"]);
    assert!(failure(&report, "requests-answered-in-order").contains("carries id"));
    assert!(failure(&report, "launcher-call").contains("expected"));
    passes(&report, "launcher-verifies-hello");
}

#[test]
fn answer_twice_fails_the_ordering_check() {
    let report = run(&["--misbehave", "answer-twice"]);
    assert!(failure(&report, "requests-answered-in-order").contains("carries id"));
}

#[test]
fn an_undeclared_fd_fails_the_fd_checks() {
    let report = run(&["--misbehave", "keep-fd"]);
    assert!(failure(&report, "proc-fds-only-stdio").contains("{0, 1, 2, 5}"));
    assert!(failure(&report, "launcher-verifies-hello").contains("fds [5]"));
    passes(&report, "proc-seccomp");
    passes(&report, "hello-claims-sandbox");
}

#[test]
fn a_hung_helper_fails_at_the_deadline() {
    let mut options = Options::new(helper_bin(), &["--misbehave", "hang"]);
    options.timeout = Duration::from_millis(500);
    let report = conformance::run(&options);
    assert!(failure(&report, "requests-answered-in-order").contains("deadline"));
    assert!(failure(&report, "launcher-call").contains("no reply"));
}

#[test]
fn the_binary_prints_one_line_per_check_and_exits_by_the_result() {
    let bin = env!("CARGO_BIN_EXE_sandpool-conformance");
    // Runs the built runner as a user would (a test may spawn with std).
    #[allow(clippy::disallowed_methods)]
    let output = |args: &[&str]| {
        std::process::Command::new(bin)
            .args(["--timeout", "20"])
            .arg(helper_bin())
            .args(args)
            .output()
            .unwrap()
    };
    let good = output(&["--test-ops"]);
    let stdout = String::from_utf8(good.stdout).unwrap();
    assert_eq!(good.status.code(), Some(0), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), CHECKS.len() + 1, "{stdout}");
    for (line, name) in lines.iter().zip(CHECKS) {
        assert_eq!(*line, format!("PASS {name}"));
    }
    assert_eq!(
        lines.last().copied(),
        Some(format!("{} passed, 0 failed, 0 skipped", CHECKS.len()).as_str())
    );

    let bad = output(&["--misbehave", "keep-fd"]);
    let stdout = String::from_utf8(bad.stdout).unwrap();
    assert_eq!(bad.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL proc-fds-only-stdio: ")),
        "{stdout}"
    );

    #[allow(clippy::disallowed_methods)]
    let usage = std::process::Command::new(bin).output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("usage:"));
}

fn run_allowing(kept: &[&str], args: &[&str]) -> Report {
    let mut options = Options::new(helper_bin(), args);
    options.timeout = STEP;
    options.allow_kept_fds = kept.iter().map(std::path::PathBuf::from).collect();
    conformance::run(&options)
}

#[test]
fn a_declared_kept_fd_conforms_only_where_the_runner_allows_it() {
    let args = ["--test-ops", "--init", "keep-urandom"];
    let allowed = run_allowing(&["/dev/urandom"], &args);
    assert_eq!(allowed.failed(), 0, "\n{allowed}");
    assert_eq!(allowed.skipped(), 0, "\n{allowed}");
    assert!(
        allowed.to_string().contains("1 declared kept fds match"),
        "\n{allowed}"
    );
    // The same helper under a default host: its launch is refused by name;
    // the fd table itself is as declared.
    let refused = run(&args);
    assert!(
        failure(&refused, "launcher-verifies-hello").contains("sandbox.kept_fds does not allow"),
        "\n{refused}"
    );
    passes(&refused, "proc-fds-only-stdio");
}

#[test]
fn a_lie_about_a_kept_fd_fails_the_fd_checks() {
    let report = run_allowing(
        &["/dev/zero", "/dev/urandom"],
        &["--misbehave", "lie-kept-path"],
    );
    assert!(
        failure(&report, "proc-fds-only-stdio").contains("/proc says \"/dev/urandom\""),
        "\n{report}"
    );
    assert!(
        failure(&report, "launcher-verifies-hello").contains("the kernel says \"/dev/urandom\""),
        "\n{report}"
    );
}
