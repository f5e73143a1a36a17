//! A hostile or broken host directory and shutdown at the host-wide cap
//! (found by a review with these repros): whatever is planted in the
//! shared `host.dir` (symlinks, a FIFO, a directory under a slot's name) is
//! never followed, never blocks the pool and never takes the other slots
//! down; a shutdown wakes the calls waiting for a slot.
#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)]

use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use sandpool::{CallError, HostConfig, Pool};
use sandpool_reference_helper::reference::{OP_ECHO, request};
use sandpool_tests::{pool_config, serial, wait_for};

fn fresh(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sandpool-hostdir-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn pool(dir: &std::path::Path, max: usize, spares: usize) -> Pool {
    let mut config = pool_config(&[]);
    config.spares = spares;
    config.host = Some(HostConfig {
        dir: dir.to_path_buf(),
        max_helpers: max,
    });
    Pool::new(config).unwrap()
}

fn hold(path: &std::path::Path) -> Flock<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    Flock::lock(f, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .unwrap()
}

fn free(path: &std::path::Path) -> bool {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    Flock::lock(f, FlockArg::LockExclusiveNonblock).is_ok()
}

#[test]
fn a_symlink_at_the_heartbeat_temp_file_is_replaced_not_followed() {
    let _s = serial();
    let dir = fresh("r1");
    let victim = fresh("r1-victim").join("victim");
    std::fs::write(&victim, "precious data that must survive\n").unwrap();
    symlink(&victim, dir.join("leader.info.tmp")).unwrap();
    let p = pool(&dir, 4, 0);
    assert!(wait_for(Duration::from_secs(5), || p.is_host_leader()));
    std::thread::sleep(Duration::from_millis(300));
    let after = std::fs::read_to_string(&victim).unwrap();
    println!("victim now: {after:?}");
    println!(
        "leader.info is symlink: {}",
        std::fs::symlink_metadata(dir.join("leader.info"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    drop(p);
    assert_eq!(
        after, "precious data that must survive\n",
        "the leader truncated and rewrote a file outside host.dir"
    );
}

#[test]
fn a_symlink_at_a_slot_creates_nothing_elsewhere() {
    let _s = serial();
    let dir = fresh("r2");
    let target = fresh("r2-target").join("created-by-slot");
    let _ = std::fs::remove_file(&target);
    symlink(&target, dir.join("slot-0.lock")).unwrap();
    let p = pool(&dir, 1, 0);
    let r = p.call("t", &request(OP_ECHO, b"x"));
    println!(
        "call: {:?}; target exists: {}",
        r.as_ref().map(|_| ()),
        target.exists()
    );
    drop(p);
    assert!(
        !target.exists(),
        "O_CREAT followed slot-0.lock to create {}",
        target.display()
    );
}

#[test]
fn a_fifo_at_leader_info_blocks_nothing() {
    let _s = serial();
    let dir = fresh("r3");
    // Someone else leads (and is hung, or just slow): we hold leader.lock.
    let _leader = hold(&dir.join("leader.lock"));
    nix::unistd::mkfifo(
        &dir.join("leader.info"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let p = pool(&dir, 4, 0);
    assert_eq!(p.call("t", &request(OP_ECHO, b"x")).unwrap(), b"x");
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(p);
        tx.send(()).unwrap();
    });
    let dropped = rx.recv_timeout(Duration::from_secs(5)).is_ok();
    println!("drop finished within 5 s: {dropped}");
    if !dropped {
        // Unblock the keeper: open the FIFO for writing and close it.
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("leader.info"))
            .unwrap();
        drop(w);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        println!(
            "drop finished {:?} after it began, once the FIFO got a writer",
            started.elapsed()
        );
    }
    assert!(
        dropped,
        "Pool drop hung: keeper blocked in open(leader.info FIFO)"
    );
}

#[test]
fn one_unusable_slot_file_leaves_the_others_usable() {
    let _s = serial();
    let dir = fresh("r4");
    std::fs::create_dir(dir.join("slot-2.lock")).unwrap();
    let mut config = pool_config(&[]);
    config.spares = 0;
    config.host = Some(HostConfig {
        dir: dir.clone(),
        max_helpers: 8,
    });
    let p = Pool::new(config).unwrap();
    let mut outcomes = Vec::new();
    for i in 0..8 {
        let r = p.call(format!("t{i}"), &request(OP_ECHO, b"x"));
        outcomes.push(match &r {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("{e}"),
        });
    }
    let free_slots: Vec<usize> = (0..8)
        .filter(|i| {
            *i != 2 && {
                let s = dir.join(format!("slot-{i}.lock"));
                !s.exists() || free(&s)
            }
        })
        .collect();
    println!("outcomes: {outcomes:#?}\nfree good slots after: {free_slots:?}");
    let failed = outcomes.iter().filter(|o| *o != "ok").count();
    drop(p);
    assert_eq!(
        failed, 0,
        "launches failed with free slots left: {free_slots:?}: {outcomes:?}"
    );
}

#[test]
fn drop_does_not_wait_for_an_async_launch_waiting_at_the_cap() {
    let _s = serial();
    let dir = fresh("r5");
    let _other = hold(&dir.join("slot-0.lock")); // another process's helper
    let p = pool(&dir, 1, 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let req = request(OP_ECHO, b"x");
    let r = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_millis(200),
            p.call_async_with_deadline("t", &req, Instant::now() + Duration::from_secs(30)),
        )
        .await
    });
    println!("async call after 200 ms: {:?}", r.map(|r| r.map(|_| ())));
    let started = Instant::now();
    drop(p);
    let took = started.elapsed();
    println!("drop took {took:?}");
    assert!(
        took < Duration::from_secs(15),
        "drop waited {took:?} (the call's deadline is 30 s) for a launch worker waiting for a host slot"
    );
}

#[test]
fn shutdown_wakes_a_call_waiting_at_the_cap() {
    let _s = serial();
    let dir = fresh("r6");
    let _other = hold(&dir.join("slot-0.lock"));
    let p = Arc::new(pool(&dir, 1, 0));
    let p2 = p.clone();
    let t = std::thread::spawn(move || {
        let s = Instant::now();
        let r = p2.call_with_deadline(
            "t",
            &request(OP_ECHO, b"x"),
            Instant::now() + Duration::from_secs(30),
        );
        (s.elapsed(), r.map(|_| ()))
    });
    std::thread::sleep(Duration::from_millis(200));
    // The state lock is not held while it waits.
    let s = Instant::now();
    let _ = p.stats();
    let _ = p.helper_info("t");
    println!("stats/helper_info during the wait took {:?}", s.elapsed());
    p.shutdown(Duration::ZERO);
    let (waited, r) = t.join().unwrap();
    println!("waiter returned after {waited:?}: {r:?}");
    assert!(
        matches!(r, Err(CallError::ShutDown)),
        "{r:?} after {waited:?}"
    );
}
