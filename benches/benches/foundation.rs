//! Foundation benchmark: launch-to-hello of the reference helper linked
//! statically vs dynamically, and a warm call's round trip vs a raw
//! two-process pipe ping-pong. Contenders are interleaved in one run; the
//! ratios are the result.
//!
//! `cargo bench -p sandpool-benches --bench foundation [-- --quick]`

use std::time::{Duration, Instant};

use sandpool::{HelperConfig, Launcher};
use sandpool_benches::{row, summarize};
use sandpool_reference_helper::reference::{OP_ECHO, request};

fn main() {
    sandpool_benches::run_pipe_peer_if_asked();
    let quick = std::env::args().any(|a| a == "--quick");
    let (launch_rounds, call_rounds) = if quick { (5, 5) } else { (60, 40) };

    println!(
        "## Launch to verified Hello (reference helper, {launch_rounds} rounds of 5, interleaved)\n"
    );
    println!("| helper | n | median | p99 | vs dynamic |\n|---|---|---|---|---|");
    let launcher = |path: &str, pin_image: bool| {
        let mut config = HelperConfig::new(path);
        config.pin_image = pin_image;
        Launcher::new(config).expect("config")
    };
    let contenders = [
        (
            "dynamic (glibc), from its file",
            launcher(env!("SANDPOOL_HELPER_BIN"), false),
        ),
        (
            "static (+crt-static), from its file",
            launcher(env!("SANDPOOL_HELPER_STATIC_BIN"), false),
        ),
        (
            "static, pinned image (sealed memfd)",
            launcher(env!("SANDPOOL_HELPER_STATIC_BIN"), true),
        ),
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); contenders.len()];
    for _ in 0..launch_rounds {
        for ((_, launcher), samples) in contenders.iter().zip(samples.iter_mut()) {
            for _ in 0..5 {
                let helper = launcher.launch().expect("launch");
                samples.push(helper.launch_time());
                helper.shutdown(Duration::from_secs(5));
            }
        }
    }
    let summaries: Vec<_> = samples.iter_mut().map(|s| summarize(s)).collect();
    for ((name, _), summary) in contenders.iter().zip(&summaries) {
        println!("{}", row(name, summary, &summaries[0]));
    }
    let dynamic = &contenders[0].1;

    for size in [16usize, 8192] {
        println!(
            "\n## Warm call round trip, {size} B each way ({call_rounds} rounds of 500 calls, \
             a fresh process pair per round so CPU placement averages out, interleaved)\n"
        );
        println!("| path | n | median | p99 | vs raw pipe |\n|---|---|---|---|---|");
        let req = request(OP_ECHO, &vec![0x5A; size - 1]);
        let (mut raw, mut pooled) = (Vec::new(), Vec::new());
        for _ in 0..call_rounds {
            raw.extend(
                sandpool_benches::raw_ping_pong_round(size, 500, |_| {}).expect("raw round"),
            );
            let helper = dynamic.launch().expect("launch");
            for _ in 0..500 {
                let t = Instant::now();
                let reply = helper
                    .call(&req, Instant::now() + Duration::from_secs(5))
                    .expect("call");
                pooled.push(t.elapsed());
                assert_eq!(reply.len(), size - 1);
            }
            helper.shutdown(Duration::from_secs(5));
        }
        let raw = summarize(&mut raw);
        let pooled = summarize(&mut pooled);
        println!("{}", row("raw pipe ping-pong (two processes)", &raw, &raw));
        println!(
            "{}",
            row("sandpool Helper::call (sandboxed helper)", &pooled, &raw)
        );
    }
}
