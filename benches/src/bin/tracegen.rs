//! `sandpool-tracegen`: writes a synthetic call trace for `sandpool-replay`
//! to stdout, deterministic for a seed. The tenant kinds are
//! `sandpool_benches::tracegen`'s.

use std::io::Write;
use std::process::ExitCode;

use sandpool_benches::tracegen::{Mix, generate};

const HELP: &str = "\
sandpool-tracegen: a synthetic call trace for sandpool-replay, on stdout

usage: sandpool-tracegen [--seed N] [--tenants N] [--hours H]
                         [--mix steady=W,periodic=W,bursty=W,rare=W]

  --seed N      the seed (default 1); the same arguments give the same trace
  --tenants N   tenants (default 200)
  --hours H     length of the trace in hours, a decimal number (default 24)
  --mix ...     relative weights of the tenant kinds; kinds left out weigh 0
                (default steady=0.2,periodic=0.3,bursty=0.3,rare=0.2)

Kinds: steady (exponential gaps, mean 1-10 s), periodic (a burst of 1-5
calls every 4-10 minutes, +-15% jitter), bursty (clusters of 3-30 calls,
log-uniform gaps of 1 minute to 2 hours between), rare (2-6 calls a day at
random). Output: `seconds,tenant` lines, sorted, after a # header.
Exit status 2 on bad usage.
";

fn main() -> ExitCode {
    let mut seed = 1u64;
    let mut tenants = 200usize;
    let mut hours = 24.0f64;
    let mut mix = Mix::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        let parsed: Result<(), String> = match arg.as_str() {
            "--help" | "-h" => {
                print!("{HELP}");
                return ExitCode::SUCCESS;
            }
            "--seed" => value("--seed").and_then(|v| {
                seed = v
                    .parse()
                    .map_err(|_| format!("--seed {v:?} is not an integer"))?;
                Ok(())
            }),
            "--tenants" => value("--tenants").and_then(|v| {
                tenants = v
                    .parse()
                    .map_err(|_| format!("--tenants {v:?} is not an integer"))?;
                Ok(())
            }),
            "--hours" => value("--hours").and_then(|v| {
                hours = v
                    .parse()
                    .ok()
                    .filter(|h: &f64| h.is_finite() && *h > 0.0 && *h <= 24.0 * 365.0)
                    .ok_or_else(|| {
                        format!("--hours {v:?} is not a number of hours up to a year")
                    })?;
                Ok(())
            }),
            "--mix" => value("--mix").and_then(|v| {
                mix = v.parse().map_err(|err| format!("--mix: {err}"))?;
                Ok(())
            }),
            other => Err(format!("unknown argument {other:?}")),
        };
        if let Err(problem) = parsed {
            eprintln!("sandpool-tracegen: {problem}\n\n{HELP}");
            return ExitCode::from(2);
        }
    }
    let trace = generate(seed, tenants, hours, &mix);
    let mut stdout = std::io::stdout().lock();
    if let Err(err) = stdout
        .write_all(trace.as_bytes())
        .and_then(|()| stdout.flush())
    {
        eprintln!("sandpool-tracegen: writing the trace: {err}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
