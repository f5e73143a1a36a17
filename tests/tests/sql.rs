//! The SQL workload (`sandpool-sql-helper`, SQLite inside) on the real
//! kernel: every answer checked against the same statements run in-process
//! on a per-tenant in-memory connection configured the same way; tenants
//! isolated from each other; hostile SQL (unbounded allocation, an endless
//! query, file access) contained by SQLite's limits, the address-space
//! limit, the deadline and the seccomp filter, each case beside bystander
//! tenants whose calls all succeed.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sandpool::{CallError, Config, Pool};
use sandpool_sql_helper::rusqlite::Connection;
use sandpool_tests::{serial, sql_helper_bin, wait_for};

fn sql_pool(request_timeout: Duration) -> Arc<Pool> {
    let mut config = Config::new(sql_helper_bin());
    config.spares = 1;
    config.request_timeout = request_timeout;
    Arc::new(Pool::new(config).unwrap())
}

/// What a call answered, comparable with the in-process run: the rows, or
/// the error text.
fn via_pool(pool: &Pool, tenant: &str, sql: &str) -> Result<Vec<u8>, String> {
    match pool.call(tenant, sql.as_bytes()) {
        Ok(rows) => Ok(rows),
        Err(CallError::Helper(message)) => Err(message),
        Err(other) => panic!("{tenant}: {sql:?} failed outside SQLite: {other:?}"),
    }
}

fn in_process(conn: &Connection, sql: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    sandpool_sql_helper::execute(conn, sql, &mut out).map_err(|err| err.to_string())?;
    Ok(out)
}

/// Each tenant's in-process twin.
#[derive(Default)]
struct Mirror {
    conns: HashMap<String, Connection>,
}

impl Mirror {
    /// Runs `sql` for `tenant` in its helper and in-process; asserts both
    /// answered the same and returns the answer.
    fn check(&mut self, pool: &Pool, tenant: &str, sql: &str) -> Result<Vec<u8>, String> {
        let conn = self
            .conns
            .entry(tenant.to_owned())
            .or_insert_with(|| sandpool_sql_helper::open().unwrap());
        let expected = in_process(conn, sql);
        let got = via_pool(pool, tenant, sql);
        assert_eq!(got, expected, "{tenant}: {sql:?}");
        got
    }
}

/// Tenant `t`'s script: a schema, rows of every type, and queries over
/// them (joins, aggregates, a recursive CTE, JSON, dates, an error). The
/// `tag` is text made of a blob's bytes: not UTF-8, a NUL inside (SQLite
/// does not check text, and neither does the encoding).
fn tenant_script(t: usize) -> Vec<String> {
    let mut script = vec![
        "CREATE TABLE item(id INTEGER PRIMARY KEY, name TEXT NOT NULL, price REAL, tag BLOB)"
            .to_owned(),
        "CREATE TABLE sale(item INTEGER REFERENCES item(id), qty INTEGER, note TEXT)".to_owned(),
        "CREATE INDEX sale_item ON sale(item)".to_owned(),
    ];
    for i in 0..20 {
        script.push(format!(
            "INSERT INTO item VALUES ({i}, 'item {t}/{i} it''s\ttabbed', {price}, CAST(X'{t:02X}{i:02X}' AS TEXT))",
            price = (i * 7 + t) as f64 / 4.0
        ));
    }
    script.push(format!(
        "INSERT INTO sale SELECT id % 5, id * {t} + 1, CASE WHEN id % 3 = 0 THEN NULL ELSE 'n' || id || char(10) || 'x' END FROM item"
    ));
    script.extend(
        [
            "SELECT * FROM item ORDER BY id",
            "SELECT * FROM sale ORDER BY rowid",
            "SELECT i.name, sum(s.qty), total(i.price * s.qty), group_concat(s.note, '|') FROM item i JOIN sale s ON s.item = i.id GROUP BY i.id ORDER BY i.id",
            "UPDATE item SET price = price * 1.1 WHERE id % 2 = 0; SELECT id, price FROM item WHERE id < 6 ORDER BY id",
            "DELETE FROM sale WHERE qty > 40; SELECT count(*), min(qty), max(qty), avg(qty) FROM sale",
            "WITH RECURSIVE fib(n, a, b) AS (SELECT 0, 0, 1 UNION ALL SELECT n + 1, b, a + b FROM fib WHERE n < 60) SELECT n, a FROM fib",
            "SELECT json_object('t', id, 'name', name), hex(tag), typeof(price), quote(tag) FROM item WHERE id IN (1, 2, 3) ORDER BY id",
            "SELECT date('2024-02-28', '+1 day'), strftime('%s', '2001-09-09 01:46:40'), julianday('2000-01-01'), 1e300 * 10, -0.0, 9223372036854775807, 0.1 + 0.2",
            "SELECT upper(name), length(name), substr(name, 3, 4), instr(name, '/') FROM item ORDER BY name DESC LIMIT 5",
            "INSERT INTO nothing VALUES (1)",
            "SELECT 1; SELECT * FROM nothing; SELECT 2",
            "INSERT INTO item VALUES (0, 'duplicate', NULL, NULL)",
            "CREATE TEMP TABLE scratch AS SELECT id, name FROM item WHERE id > 15; SELECT * FROM scratch ORDER BY id",
            "SELECT count(*) FROM item",
        ]
        .map(str::to_owned),
    );
    script
}

#[test]
fn every_answer_matches_the_same_sql_run_in_process() {
    let _serial = serial();
    let pool = sql_pool(Duration::from_secs(10));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let mut mirror = Mirror::default();
                let tenant = format!("tenant-{t}");
                let mut errors = 0;
                for sql in tenant_script(t) {
                    errors += usize::from(mirror.check(&pool, &tenant, &sql).is_err());
                }
                // State persists across calls: the rows are all still there.
                let count = mirror.check(&pool, &tenant, "SELECT count(*) FROM item");
                assert_eq!(count.unwrap(), b"20\n");
                // Local time works under the filter (glibc loaded the zone
                // before it); not compared, as the test's TZ may differ.
                let local = via_pool(&pool, &tenant, "SELECT datetime(0, 'unixepoch', 'localtime'), datetime('now'), random() IS NOT NULL").unwrap();
                assert!(local.ends_with(b"\t1\n"), "{local:?}");
                errors
            })
        })
        .collect();
    for thread in threads {
        // The scripts' three failing statements failed alike on both sides.
        assert_eq!(thread.join().unwrap(), 3);
    }
    assert_eq!(pool.stats().failures.seccomp, 0);
    pool.shutdown(Duration::from_secs(2));
}

#[test]
fn tenant_b_cannot_see_tenant_a() {
    let _serial = serial();
    let pool = sql_pool(Duration::from_secs(10));
    let mut mirror = Mirror::default();
    mirror
        .check(
            &pool,
            "a",
            "CREATE TABLE secret(v TEXT); INSERT INTO secret VALUES ('a''s secret')",
        )
        .unwrap();
    assert_eq!(
        mirror.check(&pool, "a", "SELECT v FROM secret").unwrap(),
        b"'a''s secret'\n"
    );
    let err = mirror
        .check(&pool, "b", "SELECT v FROM secret")
        .unwrap_err();
    assert!(err.contains("no such table: secret"), "{err}");
    assert_eq!(
        mirror
            .check(&pool, "b", "SELECT name FROM sqlite_schema")
            .unwrap(),
        b""
    );
    // B's own table of the same name is B's alone.
    mirror
        .check(
            &pool,
            "b",
            "CREATE TABLE secret(v TEXT); INSERT INTO secret VALUES ('b')",
        )
        .unwrap();
    assert_eq!(
        mirror.check(&pool, "a", "SELECT v FROM secret").unwrap(),
        b"'a''s secret'\n"
    );
    assert_eq!(
        mirror.check(&pool, "b", "SELECT v FROM secret").unwrap(),
        b"'b'\n"
    );
    assert_ne!(
        pool.helper_info("a").unwrap().pid,
        pool.helper_info("b").unwrap().pid
    );
    pool.shutdown(Duration::from_secs(2));
}

/// SQL tenants calling the pool the whole time beside a hostile one; each
/// answer is checked.
struct SqlBystanders {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl SqlBystanders {
    fn start(pool: &Arc<Pool>, threads: usize) -> SqlBystanders {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let threads = (0..threads)
            .map(|t| {
                let (pool, stop, ok) = (pool.clone(), stop.clone(), ok.clone());
                std::thread::spawn(move || {
                    let tenant = format!("good-{t}");
                    let mut failures = Vec::new();
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let sql = format!(
                            "CREATE TABLE IF NOT EXISTS log(i); INSERT INTO log VALUES ({i}); SELECT {t}, {i}, 'call ' || {i}"
                        );
                        match pool.call(&tenant, sql.as_bytes()) {
                            Ok(rows) if rows == format!("{t}\t{i}\t'call {i}'\n").as_bytes() => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => failures.push(format!("{other:?}")),
                        }
                        i += 1;
                    }
                    // Their helpers were never replaced: every row is there.
                    match pool.call(&tenant, b"SELECT count(*) FROM log") {
                        Ok(rows) if rows == format!("{i}\n").as_bytes() => {}
                        other => failures.push(format!("lost rows: {other:?}")),
                    }
                    failures
                })
            })
            .collect();
        SqlBystanders { stop, ok, threads }
    }

    fn finish(self) {
        assert!(
            wait_for(Duration::from_secs(10), || self.ok.load(Ordering::Relaxed)
                > 0),
            "bystanders made calls"
        );
        self.stop.store(true, Ordering::Relaxed);
        let failures: Vec<String> = self
            .threads
            .into_iter()
            .flat_map(|thread| thread.join().unwrap())
            .collect();
        assert!(failures.is_empty(), "bystander calls failed: {failures:?}");
    }
}

/// An allocation that fails typed: SQLite's own error, or the helper ended
/// by a limit.
fn assert_contained_allocation(result: Result<Vec<u8>, CallError>, sql: &str) -> bool {
    match result {
        Err(CallError::Helper(message)) => {
            assert!(
                message.contains("too big") || message.contains("out of memory"),
                "{sql}: {message}"
            );
            false
        }
        Err(err @ (CallError::LimitExceeded { .. } | CallError::Died { .. })) => {
            assert!(!err.is_seccomp_kill(), "{sql}: {err:?}");
            true
        }
        other => panic!("{sql}: expected a typed failure, got {other:?}"),
    }
}

#[test]
fn unbounded_allocations_fail_typed_and_the_tenant_keeps_a_working_helper() {
    let _serial = serial();
    let pool = sql_pool(Duration::from_secs(20));
    let bystanders = SqlBystanders::start(&pool, 2);
    for sql in [
        "SELECT randomblob(2000000000)",
        "SELECT length(zeroblob(1000000) || randomblob(1000000000))",
        "WITH RECURSIVE r(n, s) AS (SELECT 0, 'x' UNION ALL SELECT n + 1, s || s FROM r WHERE n < 40) SELECT max(length(s)) FROM r",
        "CREATE TABLE big AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x, randomblob(100000) AS b FROM c",
    ] {
        pool.call(
            "evil",
            b"CREATE TABLE IF NOT EXISTS mine(v); INSERT INTO mine VALUES (1)",
        )
        .unwrap();
        let replaced = assert_contained_allocation(pool.call("evil", sql.as_bytes()), sql);
        // The next call gets a working helper: the same one (its table
        // still there) when SQLite refused, a fresh one after a kill.
        let rows = pool
            .call("evil", b"SELECT count(*) >= 1 FROM mine")
            .unwrap();
        assert_eq!(rows, b"1\n", "{sql}: replaced {replaced}");
    }
    assert_eq!(pool.stats().failures.seccomp, 0);
    bystanders.finish();
    pool.shutdown(Duration::from_secs(2));
}

#[test]
fn an_endless_query_is_killed_at_the_deadline() {
    let _serial = serial();
    let pool = sql_pool(Duration::from_millis(1500));
    let bystanders = SqlBystanders::start(&pool, 2);
    pool.call("evil", b"SELECT 1").unwrap();
    let pid = pool.helper_info("evil").unwrap().pid;
    let endless =
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";
    match pool.call("evil", endless.as_bytes()) {
        Err(CallError::Timeout { pid: killed, .. }) => assert_eq!(killed, pid),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(pool.call("evil", b"SELECT 2").unwrap(), b"2\n");
    assert_ne!(pool.helper_info("evil").unwrap().pid, pid, "a fresh helper");
    bystanders.finish();
    pool.shutdown(Duration::from_secs(2));
}

#[test]
fn file_access_is_refused_and_no_file_is_opened() {
    let _serial = serial();
    let pool = sql_pool(Duration::from_secs(10));
    let bystanders = SqlBystanders::start(&pool, 2);
    let dir = std::env::temp_dir();
    let path = |name: &str| dir.join(format!("sandpool-sql-{}-{name}", std::process::id()));
    let (attach, vacuum, ext) = (path("attach"), path("vacuum"), path("ext.so"));
    let cases = [
        format!("ATTACH DATABASE '{}' AS x", attach.display()),
        format!("ATTACH DATABASE 'file:{}?mode=rwc' AS x", attach.display()),
        format!("VACUUM INTO '{}'", vacuum.display()),
        format!("SELECT load_extension('{}')", ext.display()),
        "SELECT readfile('/etc/passwd')".to_owned(),
        format!("SELECT writefile('{}', 'x')", attach.display()),
        "SELECT * FROM fsdir('/etc')".to_owned(),
    ];
    for sql in &cases {
        match pool.call("evil", sql.as_bytes()) {
            Err(CallError::Helper(message)) => assert!(
                message.contains("too many attached databases")
                    || message.contains("not authorized")
                    || message.contains("no such"),
                "{sql}: {message}"
            ),
            Err(err) if err.is_seccomp_kill() => {}
            other => panic!("{sql}: expected a refusal, got {other:?}"),
        }
        assert_eq!(pool.call("evil", b"SELECT 3").unwrap(), b"3\n");
    }
    for file in [&attach, &vacuum, &ext] {
        assert!(!file.exists(), "{} was created", file.display());
    }
    bystanders.finish();
    pool.shutdown(Duration::from_secs(2));
}
