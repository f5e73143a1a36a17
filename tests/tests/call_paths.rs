//! The call paths on the reactor: async calls (any runtime, cancellation),
//! batches from one thread, and the regressions the rebuild fixed. Every
//! test runs real helper processes.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use sandpool::{CallError, Launcher, Pool, RetireReason};
use sandpool_reference_helper::reference::*;
use sandpool_tests::{children, config, deadline, pool_config, process_exists, wait_for};

/// The simplest executor there is: polls one future on this thread and
/// parks between polls. The library's futures need nothing else (no tokio):
/// the reactor wakes them.
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        std::thread::park();
    }
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn async_calls_need_no_particular_runtime() {
    let helper = Launcher::new(config(&["--test-ops"]))
        .unwrap()
        .launch()
        .unwrap();
    // A hand-written executor.
    let reply = block_on(helper.call_async(&request(OP_ECHO, b"plain"), deadline(5.0)));
    assert_eq!(reply.unwrap(), b"plain");
    // A slow reply, so the future really waits and is woken.
    let reply = block_on(helper.call_async(&sleep_request(50, b"later"), deadline(5.0)));
    assert_eq!(reply.unwrap(), b"later");
    // Handler errors come back as on the blocking path.
    match block_on(helper.call_async(&request(OP_FAIL, b"no"), deadline(5.0))) {
        Err(CallError::Helper(message)) => assert_eq!(message, "no"),
        other => panic!("{other:?}"),
    }
    // And tokio.
    let runtime = current_thread();
    let reply = runtime.block_on(helper.call_async(&request(OP_ECHO, b"tokio"), deadline(5.0)));
    assert_eq!(reply.unwrap(), b"tokio");
    assert!(!helper.is_retired());
}

#[test]
fn many_async_calls_from_one_task_share_one_helper() {
    let mut cfg = config(&[]);
    cfg.max_in_flight = 8;
    let helper = Launcher::new(cfg).unwrap().launch().unwrap();
    let runtime = current_thread();
    runtime.block_on(async {
        let requests: Vec<Vec<u8>> = (0..64u32)
            .map(|i| {
                request(
                    OP_ECHO,
                    format!("call {i} {}", "y".repeat(i as usize * 50)).as_bytes(),
                )
            })
            .collect();
        // 64 tasks on one runtime thread: 8 in flight, the rest wait for
        // room without blocking it.
        let mut set = tokio::task::JoinSet::new();
        let helper = Arc::new(helper);
        for req in requests.clone() {
            let helper = helper.clone();
            // `spawn` needs a `Send` future: the library's is.
            set.spawn(async move { helper.call_async(&req, deadline(10.0)).await.unwrap() });
        }
        let mut replies = Vec::new();
        while let Some(result) = set.join_next().await {
            replies.push(result.unwrap());
        }
        let mut expected: Vec<Vec<u8>> = requests.iter().map(|r| r[1..].to_vec()).collect();
        expected.sort();
        replies.sort();
        assert_eq!(replies, expected);
        assert_eq!(helper.in_flight(), 0);
    });
}

#[test]
fn waiting_for_room_under_max_helpers_holds_no_thread() {
    // One helper in all, busy with a slow call: an async call for another
    // tenant waits for room. The runtime has one thread; if that wait
    // blocked it, the timer task beside it could not run.
    let mut cfg = pool_config(&["--test-ops"]);
    cfg.spares = 0;
    cfg.max_helpers = 1;
    let pool = Arc::new(Pool::new(cfg).unwrap());
    let slow = {
        let pool = pool.clone();
        std::thread::spawn(move || pool.call("busy", &sleep_request(600, b"slow")))
    };
    assert!(wait_for(Duration::from_secs(10), || pool
        .helper_info("busy")
        .is_some_and(|info| info.in_flight == 1)));
    let runtime = current_thread();
    runtime.block_on(async {
        let ticked = Arc::new(AtomicBool::new(false));
        let ticker = {
            let ticked = ticked.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                ticked.store(true, Ordering::SeqCst);
            })
        };
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let req = request(OP_ECHO, b"cold");
                pool.call_async("cold", &req).await
            })
        };
        ticker.await.unwrap();
        // The ticker ran while the cold call still waited for room.
        assert!(ticked.load(Ordering::SeqCst));
        assert!(
            !waiter.is_finished(),
            "the cold call cannot have a helper yet"
        );
        assert_eq!(waiter.await.unwrap().unwrap(), b"cold");
    });
    assert_eq!(slow.join().unwrap().unwrap(), b"slow");
}

#[test]
fn a_cancelled_async_call_blames_nobody_and_its_reply_is_dropped() {
    let mut cfg = pool_config(&["--test-ops"]);
    cfg.spares = 0;
    let pool = Pool::new(cfg).unwrap();
    pool.prewarm("t").unwrap();
    let pid = pool.helper_info("t").unwrap().pid;
    let runtime = current_thread();
    runtime.block_on(async {
        let req = sleep_request(400, b"abandoned");
        let cut =
            tokio::time::timeout(Duration::from_millis(100), pool.call_async("t", &req)).await;
        assert!(cut.is_err(), "the timeout fired first");
        // The next call queues behind the abandoned request (the helper is
        // still busy with it) and gets its own reply, not the dropped one.
        let reply = pool.call_async("t", &request(OP_ECHO, b"next")).await;
        assert_eq!(reply.unwrap(), b"next");
    });
    let info = pool.helper_info("t").unwrap();
    assert_eq!(info.pid, pid, "the same helper: nobody blamed it");
    assert_eq!(info.in_flight, 0);
    assert_eq!(pool.stats().failures, sandpool::FailureStats::default());
}

#[test]
fn a_request_cancelled_before_it_reached_the_pipe_is_never_sent() {
    // A slow call occupies the helper; a 200 KB request fills its stdin
    // pipe behind it; an async call queued behind that one cannot reach the
    // pipe. Dropped there, its request must never go out: the helper
    // answers exactly the two others.
    let mut cfg = config(&["--test-ops"]);
    cfg.spin_wait = Duration::ZERO;
    let helper = Arc::new(Launcher::new(cfg).unwrap().launch().unwrap());
    let slow = sandpool_tests::call_in_thread(&helper, sleep_request(400, b"slow"), 10.0);
    sandpool_tests::wait_for_in_flight(&helper, 1);
    let big = vec![6u8; 200_000];
    let filler = sandpool_tests::call_in_thread(&helper, request(OP_ECHO, &big), 10.0);
    sandpool_tests::wait_for_in_flight(&helper, 2);
    let runtime = current_thread();
    runtime.block_on(async {
        let req = request(OP_ECHO, b"never");
        let cut = tokio::time::timeout(
            Duration::from_millis(50),
            helper.call_async(&req, deadline(10.0)),
        )
        .await;
        assert!(cut.is_err());
    });
    assert_eq!(
        helper.in_flight(),
        2,
        "the cancelled request was taken back"
    );
    assert_eq!(slow.join().unwrap().unwrap(), b"slow");
    assert_eq!(filler.join().unwrap().unwrap(), big);
    assert_eq!(
        helper
            .call(&request(OP_ECHO, b"after"), deadline(5.0))
            .unwrap(),
        b"after"
    );
    assert_eq!(
        helper.calls(),
        3,
        "slow, filler and after: never the cancelled one"
    );
}

#[test]
fn an_async_call_behind_a_slow_one_leaves_at_its_deadline_and_a_hung_one_is_killed() {
    let helper = Arc::new(
        Launcher::new(config(&["--test-ops"]))
            .unwrap()
            .launch()
            .unwrap(),
    );
    let runtime = current_thread();
    let slow = sandpool_tests::call_in_thread(&helper, sleep_request(400, b"slow"), 10.0);
    sandpool_tests::wait_for_in_flight(&helper, 1);
    let started = Instant::now();
    let queued = runtime.block_on(helper.call_async(&request(OP_ECHO, b"q"), deadline(0.1)));
    match queued {
        Err(CallError::QueueTimeout { .. }) => {}
        other => panic!("expected a queue timeout, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_millis(390),
        "left at its own deadline"
    );
    assert_eq!(slow.join().unwrap().unwrap(), b"slow");
    assert!(!helper.is_retired());
    // Owed first and overdue: the helper is hung, killed and reaped before
    // the caller hears of it.
    let pid = helper.pid();
    let hung = runtime.block_on(helper.call_async(&sleep_request(60_000, b"x"), deadline(0.2)));
    assert!(matches!(hung, Err(CallError::Timeout { .. })), "{hung:?}");
    assert!(!process_exists(pid));
    assert!(helper.is_retired());
}

#[test]
fn call_batch_pipelines_more_requests_than_max_in_flight_in_order() {
    let mut cfg = config(&["--test-ops"]);
    cfg.max_in_flight = 4;
    let helper = Launcher::new(cfg).unwrap().launch().unwrap();
    let mut requests: Vec<Vec<u8>> = (0..30u32)
        .map(|i| request(OP_ECHO, &vec![i as u8; (i as usize * 997) % 9000]))
        .collect();
    requests[7] = request(OP_FAIL, b"seventh");
    // Larger than the pipe: goes out as the helper reads.
    requests[12] = request(OP_ECHO, &vec![0xAB; 150_000]);
    let refs: Vec<&[u8]> = requests.iter().map(Vec::as_slice).collect();
    let results = helper.call_batch(&refs, deadline(10.0));
    assert_eq!(results.len(), 30);
    for (i, (result, req)) in results.iter().zip(&requests).enumerate() {
        if i == 7 {
            assert!(
                matches!(result, Err(CallError::Helper(m)) if m == "seventh"),
                "{result:?}"
            );
        } else {
            assert_eq!(result.as_ref().unwrap(), &req[1..], "reply {i}");
        }
    }
    assert_eq!(helper.in_flight(), 0);
    assert!(!helper.is_retired());
    // Oversized entries fail alone; the rest still run.
    let huge = vec![0u8; 2 << 20];
    let small = request(OP_ECHO, b"fits");
    let results = helper.call_batch(&[&huge, &small], deadline(5.0));
    assert!(matches!(results[0], Err(CallError::RequestTooLarge { .. })));
    assert_eq!(results[1].as_ref().unwrap(), b"fits");
}

#[test]
fn batches_from_several_threads_and_single_calls_mix_on_one_helper() {
    let mut cfg = pool_config(&[]);
    cfg.max_in_flight = 6;
    cfg.spares = 0;
    let pool = Arc::new(Pool::new(cfg).unwrap());
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                for round in 0..30u32 {
                    if t % 2 == 0 {
                        let requests: Vec<Vec<u8>> = (0..9u32)
                            .map(|i| request(OP_ECHO, format!("{t}/{round}/{i}").as_bytes()))
                            .collect();
                        let refs: Vec<&[u8]> = requests.iter().map(Vec::as_slice).collect();
                        for (result, req) in pool.call_batch("t", &refs).into_iter().zip(&requests)
                        {
                            assert_eq!(result.unwrap(), &req[1..]);
                        }
                    } else {
                        let body = format!("single {t}/{round}");
                        let reply = pool.call("t", &request(OP_ECHO, body.as_bytes())).unwrap();
                        assert_eq!(reply, body.as_bytes());
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let stats = pool.stats();
    assert_eq!(stats.calls_ok, 2 * 30 * 9 + 2 * 30);
    assert_eq!(stats.calls_failed, 0);
}

#[test]
fn a_helper_killed_in_flight_fails_its_calls_as_retired_and_refuses_later_ones_as_not_sent() {
    let helper = Arc::new(
        Launcher::new(config(&["--test-ops"]))
            .unwrap()
            .launch()
            .unwrap(),
    );
    let pid = helper.pid();
    let waiting = sandpool_tests::call_in_thread(&helper, sleep_request(5000, b"x"), 10.0);
    sandpool_tests::wait_for_in_flight(&helper, 1);
    helper.kill();
    match waiting.join().unwrap() {
        Err(CallError::Retired {
            reason: RetireReason::Killed,
            ..
        }) => {}
        other => panic!("expected Retired(killed), got {other:?}"),
    }
    assert!(!process_exists(pid));
    match helper.call(&request(OP_ECHO, b"late"), deadline(1.0)) {
        Err(CallError::NotSent { failure, .. }) => assert!(
            matches!(failure.as_deref(), Some(CallError::Retired { .. })),
            "{failure:?}"
        ),
        other => panic!("expected NotSent, got {other:?}"),
    }
}

#[test]
fn a_crash_is_counted_once_even_when_another_caller_finds_the_helper_retired() {
    // One caller's request kills the tenant's helper while a second caller
    // of the same tenant looks for its helper. Whoever takes the dead helper
    // from the tenant counts the failure: always exactly once.
    let mut cfg = pool_config(&["--test-ops"]);
    cfg.crash_backoff.initial = Duration::from_millis(1);
    cfg.crash_backoff.max = Duration::from_millis(1);
    let pool = Arc::new(Pool::new(cfg).unwrap());
    let trials = 40;
    for trial in 0..trials {
        pool.prewarm("t").unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let fatal = {
            let (pool, barrier) = (pool.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                pool.call("t", &request(OP_OPEN, b"/etc/shadow"))
            })
        };
        let bystander = {
            let (pool, barrier) = (pool.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                std::thread::sleep(Duration::from_micros(200 + trial * 37));
                pool.call("t", &request(OP_ECHO, b"ok"))
            })
        };
        assert!(fatal.join().unwrap().unwrap_err().is_seccomp_kill());
        let _ = bystander.join().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(
            pool.stats().failures.seccomp,
            trial + 1,
            "trial {trial}: every crash counted exactly once"
        );
    }
}

#[test]
fn eviction_at_the_cap_ignores_the_keepers_own_handles() {
    // Cold tenants at the cap evict idle helpers. The keeper scans often
    // (it clones idle helpers to check them); that must never make an idle
    // helper look busy and a cold call fail with PoolFull.
    let mut cfg = pool_config(&[]);
    cfg.spares = 0;
    cfg.max_helpers = 2;
    // A keeper tick of 5 ms: it clones the idle helpers it checks all the time.
    cfg.idle_timeout = Duration::from_millis(20);
    let pool = Pool::new(cfg).unwrap();
    for i in 0..150u32 {
        let tenant = format!("t{i}");
        let deadline = Instant::now() + Duration::from_secs(2);
        let reply = pool.call_with_deadline(&tenant, &request(OP_ECHO, b"x"), deadline);
        assert_eq!(reply.unwrap(), b"x", "call {i}");
    }
    let stats = pool.stats();
    assert!(stats.evicted + stats.quiesced_idle >= 140, "{stats:?}");
    drop(pool);
    assert!(wait_for(Duration::from_secs(5), || children().is_empty()));
}

// Regressions from a review of the rebuilt call path (each failed before
// its fix, in every run).

#[test]
fn replies_left_in_the_read_ahead_buffer_are_still_delivered() {
    // Abandoned requests pile up behind a slow one; when it ends, more than
    // one read pass's worth of replies arrive at once. Those left in the
    // read-ahead buffer (no epoll event announces them) must still reach
    // the live callers behind them.
    let helper = Arc::new(
        Launcher::new(config(&["--test-ops"]))
            .unwrap()
            .launch()
            .unwrap(),
    );
    let front = sandpool_tests::call_in_thread(&helper, sleep_request(1500, b"f"), 10.0);
    sandpool_tests::wait_for_in_flight(&helper, 1);
    let runtime = current_thread();
    let mut left = 0;
    runtime.block_on(async {
        while left < 150 {
            let req = request(OP_ECHO, b"gone");
            let cut = tokio::time::timeout(
                Duration::from_millis(1),
                helper.call_async(&req, deadline(3.0)),
            )
            .await;
            left += usize::from(cut.is_err());
        }
    });
    assert!(
        helper.in_flight() > 64,
        "more replies owed than one read pass takes"
    );
    let live: Vec<_> = (0..8u8)
        .map(|i| sandpool_tests::call_in_thread(&helper, request(OP_ECHO, &[i]), 2.5))
        .collect();
    assert_eq!(front.join().unwrap().unwrap(), b"f");
    for (i, call) in (0u8..).zip(live) {
        assert_eq!(call.join().unwrap().unwrap(), [i], "live call {i}");
    }
    assert_eq!(helper.in_flight(), 0);
}

#[test]
fn a_batch_larger_than_iov_max_allows_goes_out_whole() {
    let mut cfg = config(&[]);
    cfg.max_in_flight = 1024;
    let helper = Launcher::new(cfg).unwrap().launch().unwrap();
    let requests: Vec<Vec<u8>> = (0..700u32)
        .map(|i| request(OP_ECHO, &i.to_le_bytes()))
        .collect();
    let refs: Vec<&[u8]> = requests.iter().map(Vec::as_slice).collect();
    let results = helper.call_batch(&refs, deadline(10.0));
    for (i, result) in results.iter().enumerate() {
        assert_eq!(
            result.as_ref().unwrap(),
            &(i as u32).to_le_bytes(),
            "reply {i}"
        );
    }
    assert!(!helper.is_retired());
}

#[test]
fn callers_leaving_together_wake_every_caller_waiting_for_room() {
    let k = 6;
    let mut cfg = config(&["--test-ops"]);
    cfg.max_in_flight = k + 1;
    let helper = Arc::new(Launcher::new(cfg).unwrap().launch().unwrap());
    let front = sandpool_tests::call_in_thread(&helper, sleep_request(800, b"f"), 5.0);
    sandpool_tests::wait_for_in_flight(&helper, 1);
    // k callers behind it leave at the same moment.
    let leave_at = Instant::now() + Duration::from_millis(50);
    let leavers: Vec<_> = (0..k)
        .map(|_| {
            let helper = helper.clone();
            std::thread::spawn(move || helper.call(&request(OP_ECHO, b"l"), leave_at))
        })
        .collect();
    assert!(wait_for(Duration::from_secs(5), || helper.in_flight() == k + 1));
    // k callers wait for room; every one must be let in once the leavers
    // have gone, long before their own deadline.
    let waiters: Vec<_> = (0..k)
        .map(|_| sandpool_tests::call_in_thread(&helper, request(OP_ECHO, b"w"), 3.0))
        .collect();
    for leaver in leavers {
        assert!(matches!(
            leaver.join().unwrap(),
            Err(CallError::QueueTimeout { .. })
        ));
    }
    assert!(
        wait_for(Duration::from_millis(400), || helper.in_flight()
            == 1 + 2 * k),
        "in flight: {} of {}",
        helper.in_flight(),
        1 + 2 * k
    );
    assert_eq!(front.join().unwrap().unwrap(), b"f");
    for waiter in waiters {
        assert_eq!(waiter.join().unwrap().unwrap(), b"w");
    }
}

#[test]
fn shutdown_does_not_keep_callers_blocked_on_the_pipes_for_the_grace() {
    // A caller reading its own reply (inline) and one writing a frame larger
    // than the pipe, on a helper that never answers: shutdown with a long
    // grace must release both at once.
    let helper = Arc::new(
        Launcher::new(config(&["--test-ops", "--misbehave", "hang"]))
            .unwrap()
            .launch()
            .unwrap(),
    );
    let inline = sandpool_tests::call_in_thread(&helper, sleep_request(5000, b"a"), 30.0);
    sandpool_tests::wait_for_in_flight(&helper, 1);
    let writer =
        sandpool_tests::call_in_thread(&helper, request(OP_ECHO, &vec![1u8; 900_000]), 30.0);
    sandpool_tests::wait_for_in_flight(&helper, 2);
    let started = Instant::now();
    helper.shutdown(Duration::from_secs(20));
    for call in [inline, writer] {
        let err = call.join().unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                CallError::Retired {
                    reason: RetireReason::ShutDown,
                    ..
                }
            ),
            "{err:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "released at once, not after the 20 s grace: {:?}",
        started.elapsed()
    );
}

/// A call that waited for room under `max_helpers` (another tenant's call
/// held the only helper) leaves at its deadline, but the helper it then
/// got has the call's whole budget from the moment the wait ended: it is
/// never killed as hung for the time the call waited for another tenant.
/// From a thread and from a task alike (a review found the thread path
/// charging that wait to the helper: `Timeout`, a killed helper, a failure
/// counted to the tenant).
#[test]
fn time_a_call_waited_for_another_tenant_is_not_charged_to_its_helper() {
    for from_a_task in [false, true] {
        let mut cfg = pool_config(&["--test-ops"]);
        cfg.spares = 0;
        cfg.max_helpers = 1;
        let pool = Arc::new(Pool::new(cfg).unwrap());
        pool.prewarm("a").unwrap();
        let busy = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.call("a", &sleep_request(250, b"a")))
        };
        assert!(wait_for(Duration::from_secs(10), || pool.stats().busy == 1));
        // Waits about 250 ms of its 400 for the only helper, then 250 ms
        // of work.
        let work = sleep_request(250, b"b");
        let until = Instant::now() + Duration::from_millis(400);
        let err = if from_a_task {
            block_on(pool.call_async_with_deadline("b", &work, until))
        } else {
            pool.call_with_deadline("b", &work, until)
        }
        .unwrap_err();
        assert!(
            matches!(err, CallError::QueueTimeout { .. }),
            "from a task: {from_a_task}: {err:?}"
        );
        assert_eq!(busy.join().unwrap().unwrap(), b"a");
        let pid = pool.helper_info("b").unwrap().pid;
        assert_eq!(pool.call("b", &request(OP_ECHO, b"next")).unwrap(), b"next");
        assert_eq!(pool.helper_info("b").unwrap().pid, pid, "never retired");
        assert_eq!(
            pool.stats().failures,
            sandpool::FailureStats::default(),
            "from a task: {from_a_task}"
        );
    }
}

/// A batch holding the reading keeps a frame that does not fit the stdin
/// pipe's room until one of its own replies makes room, never until the
/// table empties: other threads' calls on the same helper can keep it from
/// ever emptying. (A review found the 62,000-byte frame never sent while
/// other threads called, the batch failing at its deadline.)
#[test]
fn a_large_frame_of_a_batch_goes_while_other_threads_call_the_helper() {
    let mut cfg = pool_config(&["--test-ops"]);
    cfg.spares = 0;
    cfg.max_in_flight = 16;
    let pool = Arc::new(Pool::new(cfg).unwrap());
    let small = request(OP_ECHO, b"s");
    assert_eq!(pool.call("t", &small).unwrap(), b"s");
    let stop = Arc::new(AtomicBool::new(false));
    // They start while the batch's first request (100 ms) is in flight,
    // enough of them that some call of theirs is always owed.
    let others: Vec<_> = (0..8)
        .map(|_| {
            let (pool, stop) = (pool.clone(), stop.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                while !stop.load(Ordering::Relaxed) {
                    pool.call("t", &sleep_request(2, b"x")).unwrap();
                }
            })
        })
        .collect();
    let big = request(OP_ECHO, &vec![9u8; 62_000]);
    let slow = sleep_request(100, b"slow");
    let batch: Vec<&[u8]> = vec![&slow, &big, &small];
    let results = pool.call_batch_with_deadline("t", &batch, deadline(5.0));
    stop.store(true, Ordering::Relaxed);
    for other in others {
        other.join().unwrap();
    }
    assert_eq!(results[0].as_ref().unwrap(), b"slow");
    assert_eq!(results[1].as_ref().unwrap(), &big[1..]);
    assert_eq!(results[2].as_ref().unwrap(), b"s");
}

/// An async call whose launch waited in the launch workers' queue behind
/// other tenants' launches is not charged that wait: its helper's turn
/// starts when a worker takes the job. Four tenants' first calls at once,
/// two launch workers (this machine's cores), launches of 0.5 s (a shell
/// that sleeps, then execs the helper) and 1.2 s of work within a 2 s
/// deadline. (A review found the last two helpers killed as hung at 2 s.)
#[test]
fn an_async_launch_queued_behind_others_is_not_charged_to_its_helper() {
    let mut cfg = pool_config(&[]);
    cfg.program = "/bin/sh".into();
    cfg.args = vec![
        "-c".into(),
        format!(
            "/bin/sleep 0.5; exec {} --test-ops",
            sandpool_tests::helper_bin().display()
        ),
    ];
    cfg.spares = 0;
    let pool = Arc::new(Pool::new(cfg).unwrap());
    let until = Instant::now() + Duration::from_millis(2000);
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let work = sleep_request(1200, b"w");
                block_on(pool.call_async_with_deadline(format!("t{i}"), &work, until))
            })
        })
        .collect();
    for call in calls {
        let result = call.join().unwrap();
        assert!(
            matches!(result, Ok(_) | Err(CallError::QueueTimeout { .. })),
            "{result:?}"
        );
    }
    // The abandoned calls' helpers finish their work and stay.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(pool.stats().failures, sandpool::FailureStats::default());
}
