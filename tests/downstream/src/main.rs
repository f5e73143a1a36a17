//! A downstream server: a pool whose helper is found beside this executable
//! (`program = "@exe_dir/downstream-helper"`), configured from TOML, called
//! one request at a time and in a batch. Exits non-zero if any reply is not
//! the one expected.

use std::path::PathBuf;
use std::process::ExitCode;

use sandpool::{Config, Pool};

const CONFIG: &str = r#"
program = "@exe_dir/downstream-helper"
spares = 1
[env]
GREETING = "hello from the config"
"#;

fn main() -> ExitCode {
    match run() {
        Ok(summary) => {
            println!("downstream: ok: {summary}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("downstream: FAILED: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<String, Box<dyn std::error::Error>> {
    let config = Config::from_toml(CONFIG)?;
    let pool = Pool::new(config)?;
    let tenants = ["tenant-a", "tenant-b", "tenant-c"];
    for tenant in tenants {
        let reply = pool.call(tenant, b"ping")?;
        let expected = format!("hello from the config {tenant}: ping");
        if reply != expected.as_bytes() {
            return Err(format!(
                "{tenant}: {:?}, expected {expected:?}",
                String::from_utf8_lossy(&reply)
            )
            .into());
        }
    }
    let requests: Vec<&[u8]> = vec![b"one", b"two", b"three"];
    for (reply, request) in pool
        .call_batch("tenant-a", &requests)
        .into_iter()
        .zip(&requests)
    {
        let expected = format!(
            "hello from the config tenant-a: {}",
            String::from_utf8_lossy(request)
        );
        if reply? != expected.as_bytes() {
            return Err(format!("batch reply for {request:?} differs").into());
        }
    }
    let beside = std::env::current_exe()?.with_file_name("downstream-helper");
    let told = PathBuf::from(String::from_utf8(pool.call("tenant-a", b"path")?)?);
    if told != beside {
        return Err(format!(
            "the helper runs from {}, expected {}",
            told.display(),
            beside.display()
        )
        .into());
    }
    let stats = pool.stats();
    Ok(format!(
        "{} tenants answered by helpers launched from {} ({} launches)",
        tenants.len(),
        beside.display(),
        stats.launches
    ))
}
