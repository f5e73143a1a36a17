//! A small tokio service in front of a sandpool: each connection sends
//! lines `TENANT PAYLOAD`, the service answers each with the tenant's
//! helper's reply, calling `pool.call_async` with `tokio::time::timeout`
//! around every call. No thread blocks on a helper: the pool's reactor
//! wakes the tasks, and a call whose timeout fires is cancelled (its
//! request is taken back if it had not reached the helper, its reply
//! discarded if it had) without harming the helper.
//!
//! The example runs a client against its own server on 127.0.0.1 (an
//! ephemeral port), then stops by itself:
//!
//! ```sh
//! cargo run --release -p sandpool-tests --example tokio_server
//! ```
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use sandpool::{Config, Pool};
use sandpool_reference_helper::reference::{OP_ECHO, request, sleep_request};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The deadline the service gives each call (the pool's own
/// `request_timeout` stays the outer bound).
const CALL_TIMEOUT: Duration = Duration::from_millis(100);

/// Serves one connection: one line in, one line out, in order.
async fn serve(pool: Arc<Pool>, stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let (tenant, payload) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        // `slow:MILLIS` asks the helper to take its time (a stand-in for an
        // expensive redo), to show what a timeout does.
        let req = match payload.strip_prefix("slow:") {
            Some(millis) => sleep_request(millis.parse().unwrap_or(0), b"slow"),
            None => request(OP_ECHO, payload.as_bytes()),
        };
        let answer = match tokio::time::timeout(CALL_TIMEOUT, pool.call_async(tenant, &req)).await {
            Ok(Ok(reply)) => format!("ok {}\n", String::from_utf8_lossy(&reply)),
            Ok(Err(err)) => format!("error {err}\n"),
            Err(_) => "timeout\n".to_owned(),
        };
        write.write_all(answer.as_bytes()).await?;
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = Config::new(env!("SANDPOOL_HELPER_BIN"));
    config.args = vec!["--test-ops".into()];
    config.spares = 4;
    let pool = Arc::new(Pool::new(config)?);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    println!("serving on {addr}");
    let server = {
        let pool = pool.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(pool.clone(), stream));
            }
        })
    };

    // Clients: 16 connections, 8 tenants, 200 lines each.
    let started = Instant::now();
    let clients: Vec<_> = (0..16)
        .map(|c| {
            tokio::spawn(async move {
                let stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let mut ok = 0;
                for i in 0..200 {
                    let line = format!("tenant-{} hello-{c}-{i}\n", (c + i) % 8);
                    write.write_all(line.as_bytes()).await?;
                    let answer = lines.next_line().await?.unwrap_or_default();
                    if answer == format!("ok hello-{c}-{i}") {
                        ok += 1;
                    }
                }
                Ok::<_, std::io::Error>(ok)
            })
        })
        .collect();
    let mut ok = 0;
    for client in clients {
        ok += client.await??;
    }
    let elapsed = started.elapsed();
    println!(
        "{ok} of 3200 calls answered correctly in {:.0} ms ({:.0} calls/s)",
        elapsed.as_secs_f64() * 1e3,
        3200.0 / elapsed.as_secs_f64()
    );

    // A call that outlives its timeout is cancelled; the tenant's next call
    // gets its own answer once the helper has finished the abandoned work.
    let stream = TcpStream::connect(addr).await?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"tenant-0 slow:300\n").await?;
    println!(
        "slow call: {}",
        lines.next_line().await?.unwrap_or_default()
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    write.write_all(b"tenant-0 after\n").await?;
    println!(
        "next call: {}",
        lines.next_line().await?.unwrap_or_default()
    );
    let stats = pool.stats();
    let f = &stats.failures;
    println!(
        "pool: {} live helpers, {} calls answered; helper failures: {} (a caller's timeout blames no helper)",
        stats.live,
        stats.calls_ok,
        f.exited + f.signaled + f.seccomp + f.timeout + f.protocol + f.io
    );
    server.abort();
    if ok != 3200 {
        return Err(format!("{} calls were answered wrongly", 3200 - ok).into());
    }
    Ok(())
}
