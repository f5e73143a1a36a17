//! `sandpool-replay`: replays a call trace through the fixed idle timeouts
//! and the adaptive idle policy, and prints cold starts and helper-seconds
//! for each. The model is `sandpool_benches::replay`'s (and `--help`'s).

use std::path::PathBuf;
use std::process::ExitCode;

use plotters::prelude::*;
use sandpool::lifecycle::{AdaptiveParams, IdlePolicy};
use sandpool_benches::replay::{
    BASELINE_TIMEOUT_S, PolicyRun, pareto_front, read_trace, run_policies, standard_policies,
};

const HELP: &str = "\
sandpool-replay: replay a call trace through sandpool's idle policies

usage: sandpool-replay --trace FILE [--json] [--svg FILE] [--adaptive JSON]

  --trace FILE  the trace: one call per line, `seconds,tenant` (seconds since
                the trace start, a decimal number; lines sorted by time;
                tenant any string without commas); blank lines and lines
                starting with # are ignored
  --json        print one JSON array of objects {\"policy\": \"fixed\" or
                \"adaptive\", \"idle_timeout_s\": number or null,
                \"cold_starts\": integer, \"helper_seconds\": number}
                instead of the table
  --svg FILE    also write a Pareto plot (helper-seconds against cold starts)
  --adaptive JSON
                replay the adaptive policy with these AdaptiveParams fields
                instead of the defaults, e.g. '{\"min_keep\": \"30s\"}'

Policies: fixed idle_timeout 10 s, 60 s, 180 s, 300 s, 600 s, 1800 s, and
the adaptive policy with its defaults (sandpool::lifecycle::AdaptiveParams).

Simulation model: per tenant, a helper is alive or not; tenants do not
interact (no max_helpers, spares or memory budget). Calls and launches take
no time: a call that finds no live helper is a cold start, and the helper it
launches is alive from the call on. The policy (the pool's own
sandpool::lifecycle code) is asked at keeper ticks, at whole multiples of the
tick from the trace start: the real keeper's idle_timeout/4 clamped to
5 ms..1 s for a fixed policy, 1 s for the adaptive one. At a tick an idle
helper due for closing is closed, and a tenant without a helper that is due
for a prewarm gets one (alive from that tick; a launch, not a cold start).
A tick at the instant of a call comes after it. helper_seconds is the total
time helpers were alive; after a tenant's last call the replay runs on until
its helper is closed, so the trace's end cuts nothing short.

Exit status: 0; 2 on bad usage or an unreadable or malformed trace (the
error names the line).
";

struct Args {
    trace: PathBuf,
    json: bool,
    svg: Option<PathBuf>,
    adaptive: AdaptiveParams,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut trace = None;
    let mut json = false;
    let mut svg = None;
    let mut adaptive = AdaptiveParams::default();
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--help" | "-h") => return Ok(None),
            Some("--json") => json = true,
            Some("--trace") => {
                trace = Some(PathBuf::from(args.next().ok_or("--trace needs a FILE")?));
            }
            Some("--svg") => {
                svg = Some(PathBuf::from(args.next().ok_or("--svg needs a FILE")?));
            }
            Some("--adaptive") => {
                let text = args.next().ok_or("--adaptive needs a JSON object")?;
                let text = text.to_str().ok_or("--adaptive: not UTF-8")?;
                adaptive =
                    serde_json::from_str(text).map_err(|err| format!("--adaptive: {err}"))?;
                adaptive
                    .validate()
                    .map_err(|err| format!("--adaptive: {err}"))?;
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    let trace = trace.ok_or("--trace FILE is required")?;
    Ok(Some(Args {
        trace,
        json,
        svg,
        adaptive,
    }))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(problem) => {
            eprintln!("sandpool-replay: {problem}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    let trace = match read_trace(&args.trace) {
        Ok(trace) => trace,
        Err(err) => {
            eprintln!("sandpool-replay: {err}");
            return ExitCode::from(2);
        }
    };
    let mut policies = standard_policies();
    for policy in &mut policies {
        if let IdlePolicy::Adaptive(params) = policy {
            *params = args.adaptive.clone();
        }
    }
    let runs = run_policies(&trace, &policies);
    if args.json {
        let array: Vec<_> = runs.iter().map(PolicyRun::to_json).collect();
        println!("{}", serde_json::Value::Array(array));
    } else {
        print!("{}", table(&runs, trace.tenants.len(), trace.calls.len()));
    }
    if let Some(path) = &args.svg
        && let Err(err) = pareto_plot(path, &runs)
    {
        eprintln!("sandpool-replay: writing {}: {err}", path.display());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn table(runs: &[PolicyRun], tenants: usize, calls: usize) -> String {
    let baseline = runs
        .iter()
        .find(|run| run.idle_timeout_s() == Some(BASELINE_TIMEOUT_S as f64))
        .map(|run| run.outcome);
    let ratio = |value: f64, base: Option<f64>| match base {
        Some(base) if base > 0.0 => format!("{:.2}x", value / base),
        _ => "-".to_owned(),
    };
    let mut out = format!(
        "{tenants} tenants, {calls} calls; ratios against fixed {BASELINE_TIMEOUT_S}s\n\n\
         | policy | tick | cold starts | cold-start ratio | helper-seconds | helper-seconds ratio | prewarm launches |\n\
         |---|---|---|---|---|---|---|\n"
    );
    for run in runs {
        let outcome = run.outcome;
        out.push_str(&format!(
            "| {run} | {:?} | {} | {} | {:.0} | {} | {} |\n",
            run.tick,
            outcome.cold_starts,
            ratio(
                outcome.cold_starts as f64,
                baseline.map(|b| b.cold_starts as f64)
            ),
            outcome.helper_seconds,
            ratio(outcome.helper_seconds, baseline.map(|b| b.helper_seconds)),
            outcome.prewarms,
        ));
    }
    out
}

fn pareto_plot(
    path: &std::path::Path,
    runs: &[PolicyRun],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (800, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = runs
        .iter()
        .map(|run| run.outcome.helper_seconds / 3600.0)
        .fold(1e-3, f64::max)
        * 1.15;
    let y_max = runs
        .iter()
        .map(|run| run.outcome.cold_starts as f64)
        .fold(1.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "idle policies: helper-hours against cold starts",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("helper-hours (lower is cheaper)")
        .y_desc("cold starts (lower is better)")
        .draw()?;
    let point = |run: &PolicyRun| {
        (
            run.outcome.helper_seconds / 3600.0,
            run.outcome.cold_starts as f64,
        )
    };
    let front: Vec<(f64, f64)> = pareto_front(runs)
        .into_iter()
        .map(|index| point(&runs[index]))
        .collect();
    chart
        .draw_series(LineSeries::new(front, BLUE.mix(0.6).stroke_width(2)))?
        .label("Pareto front")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    for run in runs {
        let color = if run.idle_timeout_s().is_none() {
            RED
        } else {
            BLACK
        };
        let label = run.to_string();
        chart.draw_series(std::iter::once(
            EmptyElement::at(point(run))
                + Circle::new((0, 0), 4, color.filled())
                + Text::new(
                    label,
                    (6, -14),
                    ("sans-serif", 14).into_font().color(&color),
                ),
        ))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
