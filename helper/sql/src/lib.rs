//! The SQL workload of `sandpool-sql-helper`: one in-memory SQLite database
//! per helper (so per tenant), configured the same way in the helper and in
//! a host that checks the helper's answers in-process.
//!
//! # Request and response
//!
//! A request is SQL text (UTF-8): one statement or several separated by
//! `;`, run in order on the tenant's connection (autocommit: each statement
//! that succeeded stays done even if a later one fails). The response is the
//! rows of every statement that returns rows, in order, encoded by
//! [`encode_row`]: one line per row, ended by `\n`, columns separated by a
//! tab, each value rendered unambiguously:
//!
//! | SQLite value | rendered as |
//! |---|---|
//! | NULL | `NULL` |
//! | integer | decimal, e.g. `-42` |
//! | real | Rust's shortest round-trip form, always with a `.` or an exponent or `NaN`/`inf`: `1.0`, `0.1`, `1e300`, `-inf` |
//! | text | single-quoted as SQLite's `quote()` does (`'` doubled), with `\` as `\\`, tab as `\t`, newline as `\n`, carriage return as `\r` |
//! | blob | `X'` upper-case hex `'`, e.g. `X'00FF'` (`X''` when empty) |
//!
//! No value contains a raw tab or newline, so rows and columns split
//! exactly. Text bytes other than those are passed as they are: SQLite does
//! not check that text is UTF-8 (`CAST(X'FF00' AS TEXT)` is text), so
//! neither does the encoding. A failing statement makes the whole request an Error frame with
//! SQLite's error text (the rows of earlier statements are dropped), as does
//! a result over [`MAX_RESULT`] bytes.
#![deny(unsafe_code)]
#![warn(missing_docs)]

/// The rusqlite this crate is built with (a host checking answers
/// in-process uses the same SQLite).
pub use rusqlite;

use rusqlite::fallible_iterator::FallibleIterator;
use rusqlite::limits::Limit;
use rusqlite::types::ValueRef;
use rusqlite::{Batch, Connection};

/// The longest string or blob a tenant can make (`SQLITE_LIMIT_LENGTH`):
/// 32 MiB, well under the helper's address-space limit, so
/// `randomblob(2000000000)` or a doubling string fails with SQLite's own
/// "string or blob too big" instead of reaching the kernel's limits.
pub const MAX_LENGTH: i32 = 32 << 20;

/// The largest response a request can produce (8 MiB); past it the request
/// fails with [`ExecError::ResultTooLarge`].
pub const MAX_RESULT: usize = 8 << 20;

/// The heap the helper's SQLite may use (`sqlite3_hard_heap_limit64`,
/// process-wide, set by [`init_process`]): 256 MiB. A tenant filling tables
/// without bound gets SQLite's "out of memory" before the address-space
/// limit kills the helper.
pub const HARD_HEAP_LIMIT: i64 = 256 << 20;

/// Why a request failed (its text becomes the Error frame).
#[derive(Debug)]
pub enum ExecError {
    /// SQLite refused or failed a statement.
    Sqlite(rusqlite::Error),
    /// The rows would exceed [`MAX_RESULT`] bytes.
    ResultTooLarge,
}

impl std::fmt::Display for ExecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExecError::Sqlite(err) => write!(f, "{err}"),
            ExecError::ResultTooLarge => {
                write!(f, "result too large: over {MAX_RESULT} bytes")
            }
        }
    }
}

impl std::error::Error for ExecError {}

impl From<rusqlite::Error> for ExecError {
    fn from(err: rusqlite::Error) -> Self {
        ExecError::Sqlite(err)
    }
}

/// Opens a connection to a new `:memory:` database with the tenant
/// configuration: temporary tables and indices in memory (never a temp
/// file), strings and blobs at most [`MAX_LENGTH`], no attached databases
/// (`SQLITE_LIMIT_ATTACHED` 0, which refuses `ATTACH` and `VACUUM INTO`
/// before any file is opened). `load_extension()` stays disabled (SQLite's
/// default). The in-process check of a host uses the same function, so both
/// sides answer alike.
pub fn open() -> rusqlite::Result<Connection> {
    let conn = Connection::open_in_memory()?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, MAX_LENGTH)?;
    conn.set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)?;
    Ok(conn)
}

/// The helper's process-wide SQLite set-up, to run before the sandbox
/// (while files may still be opened) on the connection [`open`] made:
/// sets the [`HARD_HEAP_LIMIT`], seeds SQLite's PRNG (its first use reads
/// `/dev/urandom` and closes it again) and loads the local time zone (the
/// first `localtime_r` reads `/etc/localtime`; later ones do not). Leaves no
/// fd open.
pub fn init_process(conn: &Connection) -> rusqlite::Result<()> {
    conn.query_row(
        &format!("PRAGMA hard_heap_limit = {HARD_HEAP_LIMIT}"),
        [],
        |_| Ok(()),
    )?;
    conn.query_row("SELECT randomblob(1)", [], |_| Ok(()))?;
    conn.query_row("SELECT datetime('now', 'localtime')", [], |_| Ok(()))?;
    Ok(())
}

/// Runs every statement of `sql` on `conn` and appends the rows, encoded
/// (see the crate docs), to `out`.
pub fn execute(conn: &Connection, sql: &str, out: &mut Vec<u8>) -> Result<(), ExecError> {
    let start = out.len();
    let mut batch = Batch::new(conn, sql);
    while let Some(mut statement) = batch.next()? {
        let columns = statement.column_count();
        let mut rows = statement.raw_query();
        while let Some(row) = rows.next()? {
            let values = (0..columns)
                .map(|i| row.get_ref(i))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            encode_row(&values, out);
            if out.len() - start > MAX_RESULT {
                out.truncate(start);
                return Err(ExecError::ResultTooLarge);
            }
        }
    }
    Ok(())
}

/// Appends one row: the values rendered (see the crate docs), separated by
/// tabs, ended by a newline.
pub fn encode_row(values: &[ValueRef<'_>], out: &mut Vec<u8>) {
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        encode_value(*value, out);
    }
    out.push(b'\n');
}

/// Appends one value, rendered (see the crate docs).
pub fn encode_value(value: ValueRef<'_>, out: &mut Vec<u8>) {
    use std::io::Write;
    match value {
        ValueRef::Null => out.extend_from_slice(b"NULL"),
        // Writing to a Vec cannot fail.
        ValueRef::Integer(i) => {
            let _ = write!(out, "{i}");
        }
        ValueRef::Real(r) => {
            let _ = write!(out, "{r:?}");
        }
        ValueRef::Text(text) => {
            out.push(b'\'');
            for &byte in text {
                match byte {
                    b'\'' => out.extend_from_slice(b"''"),
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b'\t' => out.extend_from_slice(b"\\t"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    other => out.push(other),
                }
            }
            out.push(b'\'');
        }
        ValueRef::Blob(blob) => {
            out.extend_from_slice(b"X'");
            for byte in blob {
                let _ = write!(out, "{byte:02X}");
            }
            out.push(b'\'');
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn run(conn: &Connection, sql: &str) -> Result<String, String> {
        let mut out = Vec::new();
        execute(conn, sql, &mut out).map_err(|err| err.to_string())?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn values_render_unambiguously() {
        let conn = open().unwrap();
        let got = run(
            &conn,
            "SELECT NULL, -42, 1.0, 0.1, 1e300, 'it''s', 'a\tb\nc\\d\re', X'00ff', X'', ''",
        )
        .unwrap();
        assert_eq!(
            got,
            "NULL\t-42\t1.0\t0.1\t1e300\t'it''s'\t'a\\tb\\nc\\\\d\\re'\tX'00FF'\tX''\t''\n"
        );
    }

    #[test]
    fn statements_run_in_order_and_state_persists() {
        let conn = open().unwrap();
        let got = run(
            &conn,
            "CREATE TABLE t(a INTEGER, b TEXT); INSERT INTO t VALUES (1, 'x'), (2, NULL); \
             SELECT * FROM t ORDER BY a; SELECT count(*) FROM t",
        )
        .unwrap();
        assert_eq!(got, "1\t'x'\n2\tNULL\n2\n");
        assert_eq!(run(&conn, "SELECT sum(a) FROM t").unwrap(), "3\n");
        assert_eq!(run(&conn, "").unwrap(), "");
    }

    #[test]
    fn the_tenant_limits_refuse_in_sqlite() {
        let conn = open().unwrap();
        let err = run(&conn, "SELECT randomblob(2000000000)").unwrap_err();
        assert!(err.contains("too big"), "{err}");
        let err = run(&conn, "ATTACH DATABASE '/nonexistent/x' AS x").unwrap_err();
        assert!(err.contains("too many attached databases"), "{err}");
        let err = run(&conn, "VACUUM INTO '/nonexistent/y'").unwrap_err();
        assert!(err.contains("too many attached databases"), "{err}");
        let err = run(&conn, "SELECT load_extension('/nonexistent/z.so')").unwrap_err();
        assert!(err.contains("not authorized"), "{err}");
        let err = run(&conn, "SELECT readfile('/etc/passwd')").unwrap_err();
        assert!(err.contains("no such function"), "{err}");
        let err = run(
            &conn,
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
             SELECT x, zeroblob(1000) FROM c",
        )
        .unwrap_err();
        assert!(err.contains("result too large"), "{err}");
        // The connection still works.
        assert_eq!(run(&conn, "SELECT 1").unwrap(), "1\n");
    }
}
