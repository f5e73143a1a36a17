//! Large payloads through the per-helper shared region (a sealed memfd),
//! and hostile helpers abusing it.
#![allow(clippy::unwrap_used)]

use sandpool::{CallError, Launcher, ProtocolViolation};
use sandpool_reference_helper::reference::*;
use sandpool_tests::{config, deadline, fds_of};

fn region_config(args: &[&str]) -> sandpool::HelperConfig {
    let mut cfg = config(args);
    cfg.region_size = Some(32 << 20);
    cfg.region_threshold = 64 * 1024;
    cfg
}

#[test]
fn large_requests_and_responses_travel_through_the_region() {
    let helper = Launcher::new(region_config(&[])).unwrap().launch().unwrap();
    // The memfd was mapped and then closed by the helper like any other fd.
    assert_eq!(
        fds_of(helper.pid()).into_iter().collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", helper.pid())).unwrap();
    assert!(
        maps.contains("memfd:sandpool-region"),
        "the region is mapped in the helper"
    );
    for size in [16usize, 100_000, 256 << 10, 1 << 20, 8 << 20] {
        let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let reply = helper
            .call(&request(OP_ECHO, &body), deadline(10.0))
            .unwrap();
        assert_eq!(reply.len(), body.len(), "{size} B");
        assert!(reply == body, "{size} B: the echo came back intact");
    }
}

#[test]
fn the_region_is_sealed_against_shrinking_and_growing() {
    let helper = Launcher::new(region_config(&[])).unwrap().launch().unwrap();
    // Reach the region through the helper's mapping, as a hostile helper
    // would hold it, and try to resize it.
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", helper.pid())).unwrap();
    let line = maps
        .lines()
        .find(|l| l.contains("memfd:sandpool-region"))
        .unwrap();
    let range = line.split_whitespace().next().unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{}/map_files/{range}", helper.pid()))
        .unwrap();
    assert!(file.set_len(4096).is_err(), "shrinking is sealed");
    assert!(file.set_len(64 << 20).is_err(), "growing is sealed");
    assert_eq!(
        helper
            .call(&request(OP_ECHO, &[9u8; 200_000]), deadline(5.0))
            .unwrap(),
        vec![9u8; 200_000]
    );
}

#[test]
fn an_out_of_bounds_region_reference_is_a_protocol_violation() {
    let helper = Launcher::new(region_config(&["--misbehave", "region-oob"]))
        .unwrap()
        .launch()
        .unwrap();
    match helper.call(&request(OP_ECHO, &[1u8; 300_000]), deadline(5.0)) {
        Err(CallError::Protocol {
            violation: ProtocolViolation::Region(_),
            ..
        }) => {}
        other => panic!("expected a region violation, got {other:?}"),
    }
    assert!(helper.is_retired());
}

#[test]
fn a_helper_rewriting_the_region_after_replying_cannot_hurt_the_host() {
    let helper = Launcher::new(region_config(&["--misbehave", "region-scribble"]))
        .unwrap()
        .launch()
        .unwrap();
    let body = vec![0x42u8; 500_000];
    // The host copies the reply out before looking at it: it gets a snapshot
    // of the right length, whatever the helper does to the bytes meanwhile.
    let reply = helper
        .call(&request(OP_ECHO, &body), deadline(5.0))
        .unwrap();
    assert_eq!(reply.len(), body.len() + 1 - 1);
    assert!(reply.iter().all(|b| *b == 0x42 || *b == 0xEE));
}

#[test]
fn concurrent_calls_each_use_their_own_slot_and_get_their_own_reply() {
    let mut cfg = region_config(&[]);
    cfg.region_size = Some(1 << 20);
    cfg.region_threshold = 4096;
    cfg.region_slots = 8;
    cfg.max_in_flight = 8;
    let helper = std::sync::Arc::new(Launcher::new(cfg).unwrap().launch().unwrap());
    // 8 KiB pages and a few sizes around the threshold and the 64 KiB slot,
    // each body unique to its thread and call: a reply read from another
    // call's slot would not match.
    let threads: Vec<_> = (0..8u8)
        .map(|thread| {
            let helper = helper.clone();
            std::thread::spawn(move || {
                for call in 0..200usize {
                    let size = [8191, 4095, 65_535, 20_000, 100][call % 5];
                    let body: Vec<u8> = (0..size)
                        .map(|i| (i as u8) ^ thread ^ (call as u8).rotate_left(3))
                        .collect();
                    let reply = helper
                        .call(&request(OP_ECHO, &body), deadline(10.0))
                        .unwrap();
                    assert!(reply == body, "thread {thread} call {call}: its own reply");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert!(!helper.is_retired());
}

#[test]
fn a_region_reply_outside_the_granted_slot_is_a_protocol_violation() {
    let mut cfg = region_config(&["--misbehave", "region-other-window"]);
    cfg.region_slots = 2;
    let helper = Launcher::new(cfg).unwrap().launch().unwrap();
    // The one call in flight has slot 0; the reply lies in slot 1's window.
    match helper.call(&request(OP_ECHO, &[3u8; 100_000]), deadline(5.0)) {
        Err(CallError::Protocol {
            violation: ProtocolViolation::Region(_),
            ..
        }) => {}
        other => panic!("expected a region violation, got {other:?}"),
    }
    assert!(helper.is_retired());
    // With the whole response half as one window, the same reply is fine:
    // the refusal above came from the slot, not from the half.
    let helper = Launcher::new(region_config(&["--misbehave", "region-other-window"]))
        .unwrap()
        .launch()
        .unwrap();
    assert_eq!(
        helper
            .call(&request(OP_ECHO, &[3u8; 100_000]), deadline(5.0))
            .unwrap(),
        vec![3u8; 100_000]
    );
}

#[test]
fn a_region_reply_to_a_request_that_did_not_grant_it_is_refused() {
    let helper = Launcher::new(region_config(&["--misbehave", "region-oob"]))
        .unwrap()
        .launch()
        .unwrap();
    // A small request goes through the pipe: it grants no region.
    match helper.call(&request(OP_ECHO, b"small"), deadline(5.0)) {
        Err(CallError::Protocol { violation, .. }) => {
            assert!(
                matches!(violation, ProtocolViolation::RegionNotGranted(_)),
                "{violation:?}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

type SlowCall = std::thread::JoinHandle<Result<Vec<u8>, CallError>>;

/// A region helper with the test ops, busy with a call that sleeps
/// `millis` (and has the reading role) by the time this returns.
fn helper_busy_for(millis: u32) -> (std::sync::Arc<sandpool::Helper>, SlowCall) {
    let helper = std::sync::Arc::new(
        Launcher::new(region_config(&["--test-ops"]))
            .unwrap()
            .launch()
            .unwrap(),
    );
    let slow = sandpool_tests::call_in_thread(&helper, sleep_request(millis, b"slow"), 10.0);
    sandpool_tests::wait_for_in_flight(&helper, 1);
    (helper, slow)
}

#[test]
fn a_region_call_that_gives_up_in_the_queue_does_not_kill_the_helper() {
    let (helper, slow) = helper_busy_for(400);
    std::thread::sleep(std::time::Duration::from_millis(20));
    // A large call queued behind the slow one runs out of time: it gives up
    // without blaming the helper.
    let big = vec![5u8; 200_000];
    let err = helper
        .call(&request(OP_ECHO, &big), deadline(0.1))
        .unwrap_err();
    assert!(matches!(err, CallError::QueueTimeout { .. }), "{err:?}");
    assert_eq!(slow.join().unwrap().unwrap(), b"slow");
    assert!(!helper.is_retired());
    // The region is free again once the abandoned reply has been consumed.
    assert_eq!(
        helper.call(&request(OP_ECHO, &big), deadline(5.0)).unwrap(),
        big
    );
    assert_eq!(
        helper.call(&request(OP_ECHO, &big), deadline(5.0)).unwrap(),
        big
    );
}

#[test]
fn a_region_leaving_no_room_for_the_address_space_limit_is_refused() {
    let mut cfg = region_config(&[]);
    cfg.sandbox.rlimits.address_space = sandpool::SizeLimit::Bytes(bytesize::ByteSize::mib(16));
    match Launcher::new(cfg) {
        Err(sandpool::LaunchError::Config(err)) => {
            assert_eq!(err.field, "sandbox.rlimits.address_space")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_region_call_waiting_behind_an_orphaned_slot_gives_up_at_its_own_deadline() {
    // A slow call reads; a large call queued behind it gives up, leaving its
    // slot to a reply still to come.
    let (helper, slow) = helper_busy_for(1500);
    let big = vec![5u8; 200_000];
    let err = helper
        .call(&request(OP_ECHO, &big), deadline(0.1))
        .unwrap_err();
    assert!(matches!(err, CallError::QueueTimeout { .. }), "{err:?}");
    // The next large call cannot read the orphaned reply (the slow caller
    // reads): it waits for the slot and gives up at its own deadline, while
    // the slow call is still in flight, instead of spinning until it ends.
    let err = helper
        .call(&request(OP_ECHO, &big), deadline(0.1))
        .unwrap_err();
    assert!(matches!(err, CallError::QueueTimeout { .. }), "{err:?}");
    assert!(!slow.is_finished(), "gave up before the slow call ended");
    assert_eq!(slow.join().unwrap().unwrap(), b"slow");
    assert!(!helper.is_retired());
    assert_eq!(
        helper.call(&request(OP_ECHO, &big), deadline(5.0)).unwrap(),
        big
    );
}

#[test]
fn a_helper_hung_on_an_abandoned_large_call_is_retired_by_the_next_large_call() {
    // A reader, then behind it a large call whose handler hangs: its caller
    // gives up while the reader still reads, and its slot stays taken.
    let (helper, reader) = helper_busy_for(300);
    let hung = sandpool_tests::call_in_thread(&helper, sleep_request(60_000, &[7u8; 200_000]), 0.1);
    let err = hung.join().unwrap().unwrap_err();
    assert!(matches!(err, CallError::QueueTimeout { .. }), "{err:?}");
    assert_eq!(reader.join().unwrap().unwrap(), b"slow");
    assert!(!helper.is_retired(), "giving up in the queue blames nobody");
    // Nobody reads now. The next large call finds no free slot and reads
    // for the abandoned one; the helper owes a reply already past its own
    // caller's deadline, so it is overdue by that caller's standard and is
    // retired, rather than failing every large call with QueueTimeout.
    let err = helper
        .call(&request(OP_ECHO, &[8u8; 200_000]), deadline(0.2))
        .unwrap_err();
    assert!(matches!(err, CallError::Timeout { .. }), "{err:?}");
    assert!(helper.is_retired());
}
