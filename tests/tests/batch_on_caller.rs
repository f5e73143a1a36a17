//! A batch stays on its caller's thread: its own test binary, so that the
//! only sandpool reactor in the process is this test's, whose reads and
//! writes the kernel counts per thread (`/proc/self/task/TID/io`).
#![allow(clippy::unwrap_used)]

use sandpool::Pool;
use sandpool_reference_helper::reference::*;
use sandpool_tests::{pool_config, threads_named};

/// The read and write syscalls thread `tid` has made (`syscr`, `syscw`).
fn syscalls(tid: u32) -> (u64, u64) {
    let io = std::fs::read_to_string(format!("/proc/self/task/{tid}/io")).unwrap();
    let field = |name: &str| -> u64 {
        io.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap()
    };
    (field("syscr:"), field("syscw:"))
}

/// Eight 8 KiB echoes in a batch are 65,664 bytes of frames: more than the
/// helper's 64 KiB stdin pipe. The caller writes what the pipe takes
/// whole, reads replies itself, and writes the rest as they make room:
/// the reactor reads and writes nothing for it. (Before, the part that did
/// not fit went to the reactor's outbound queue, the reactor then read
/// every reply and woke the caller for each: a batch at 0.6x the
/// throughput of a raw pipe.)
#[test]
fn a_batch_larger_than_the_pipe_is_written_and_read_by_its_caller() {
    let mut cfg = pool_config(&[]);
    cfg.spares = 0;
    cfg.max_in_flight = 8;
    let pool = Pool::new(cfg).unwrap();
    let request = request(OP_ECHO, &vec![7u8; 8191]);
    assert_eq!(pool.call("t", &request).unwrap(), &request[1..]);
    let reactors = threads_named("sandpool-reacto");
    assert_eq!(reactors.len(), 1, "one pool, one reactor: {reactors:?}");
    let before = syscalls(reactors[0]);
    let batch: Vec<&[u8]> = vec![&request; 8];
    for _ in 0..50 {
        for reply in pool.call_batch("t", &batch) {
            assert_eq!(reply.unwrap(), &request[1..]);
        }
    }
    assert_eq!(
        syscalls(reactors[0]),
        before,
        "the reactor read or wrote during the batches"
    );
}
