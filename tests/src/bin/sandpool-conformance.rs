//! `sandpool-conformance [--timeout SECONDS] [--allow-kept-fd PATH]... PROGRAM [ARGS...]`: checks that
//! a helper binary keeps sandpool's helper contract (sandbox proofs, the
//! protocol, hostile host input, a forbidden syscall). One line per check
//! (`PASS name`, `FAIL name: why`, `SKIP name: why`), then the counts.
//! Exit status 0 if nothing failed, 1 if a check failed, 2 on bad usage.
//! See `sandpool_tests::conformance`.

use std::process::ExitCode;

use sandpool_tests::conformance;

fn main() -> ExitCode {
    let options = match conformance::parse_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(err) => {
            eprintln!("sandpool-conformance: {err}");
            return ExitCode::from(2);
        }
    };
    let report = conformance::run(&options);
    println!("{report}");
    if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
