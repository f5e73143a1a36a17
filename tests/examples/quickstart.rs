//! Quickstart: launch one sandboxed helper, make calls, watch a hostile
//! request get the helper killed by seccomp, and replace it.
//!
//! `cargo run --release -p sandpool-tests --example quickstart`

use std::time::{Duration, Instant};

use sandpool::{CallError, HelperConfig, Launcher};
use sandpool_reference_helper::redo;
use sandpool_reference_helper::reference::{OP_ECHO, OP_OPEN, OP_REDO, request};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = HelperConfig::new(env!("SANDPOOL_HELPER_BIN"));
    // The reference helper's hostile test ops are only honoured with this flag.
    config.args = vec!["--test-ops".into()];
    let launcher = Launcher::new(config)?;

    let helper = launcher.launch()?;
    let hello = helper.hello().clone();
    println!(
        "launched helper pid {} in {:?}: closed {} inherited fds by {:?} in {} us, no_new_privs={}, seccomp={:?} (kernel cross-checked)",
        helper.pid(),
        helper.launch_time(),
        hello.fds_closed,
        hello.fd_close_method,
        hello.fd_close_nanos / 1000,
        hello.no_new_privs,
        hello.seccomp,
    );

    let deadline = || Instant::now() + Duration::from_secs(5);
    let reply = helper.call(&request(OP_ECHO, b"hello, helper"), deadline())?;
    println!("echo -> {:?}", String::from_utf8_lossy(&reply));

    let mut page_request = vec![0u8; redo::PAGE_SIZE];
    redo::push_record(&mut page_request, 0, b"LSN 0/16B6C50");
    redo::push_record(&mut page_request, 4096, &[0xAB; 64]);
    let mut expected = Vec::new();
    redo::apply(&page_request, &mut expected)?;
    let started = Instant::now();
    let calls = 2_000;
    for _ in 0..calls {
        let page = helper.call(&request(OP_REDO, &page_request), deadline())?;
        if page != expected {
            return Err("redo response differs from the in-process computation".into());
        }
    }
    println!(
        "{calls} page-redo calls (8 KiB each way), all verified: {:.1} us per call",
        started.elapsed().as_secs_f64() * 1e6 / calls as f64
    );

    println!("asking the helper to open /etc/passwd (outside its seccomp policy)...");
    match helper.call(&request(OP_OPEN, b"/etc/passwd"), deadline()) {
        Err(err @ CallError::Died { .. }) if err.is_seccomp_kill() => println!("  -> {err}"),
        other => return Err(format!("expected a seccomp kill, got {other:?}").into()),
    }
    match helper.call(&request(OP_ECHO, b"again?"), deadline()) {
        Err(err @ CallError::NotSent { .. }) => {
            println!("  the dead helper is never reused: {err}")
        }
        other => return Err(format!("expected the helper to be retired, got {other:?}").into()),
    }

    let fresh = launcher.launch()?;
    let reply = fresh.call(&request(OP_ECHO, b"fresh helper"), deadline())?;
    println!(
        "replacement helper pid {} answers: {:?}",
        fresh.pid(),
        String::from_utf8_lossy(&reply)
    );
    let status = fresh.shutdown(Duration::from_secs(2));
    println!("shut down cleanly: {status}");
    Ok(())
}
