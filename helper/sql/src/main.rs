//! `sandpool-sql-helper`: runs its tenant's SQL on an in-memory SQLite
//! database of its own (one connection to `:memory:` per helper, so per
//! tenant; the tables live as long as the helper). The request is SQL text,
//! the response its rows (encoding: the `sandpool_sql_helper` crate docs),
//! a failing statement an Error frame with SQLite's message.
//!
//! # SQLite under the sandbox
//!
//! Everything SQLite needs from the file system it gets in the runtime's
//! init hook ([`sandpool_helper::serve_main_with_init`]), after the
//! inherited fds are closed and before no_new_privs and seccomp:
//!
//! - the connection is opened and configured first
//!   ([`sandpool_sql_helper::open`]: `temp_store = MEMORY`, so no temp
//!   files; `SQLITE_LIMIT_LENGTH` 32 MiB; `SQLITE_LIMIT_ATTACHED` 0, so
//!   `ATTACH` and `VACUUM INTO` fail in SQLite before any `open`);
//! - [`sandpool_sql_helper::init_process`] sets a 256 MiB hard heap limit,
//!   seeds SQLite's PRNG (`randomblob` makes SQLite open `/dev/urandom`,
//!   read 44 bytes and close it) and makes the first `localtime_r` call
//!   (glibc opens, reads and closes `/etc/localtime` once; later
//!   `localtime_r` calls do not reopen it);
//! - `:memory:` keeps no fd open, which the runtime checks after the hook
//!   (an fd left open would fail the start-up).
//!
//! At query time SQLite makes no syscall outside
//! [`sandpool_helper::SeccompPolicy::helper_default`], so the helper runs
//! under the default policy unchanged, nothing added. Measured over the
//! whole of `tests/tests/sql.rs` (tables, indices, joins, recursive CTEs,
//! JSON, `randomblob`, `'now'` and `'localtime'` dates, out-of-memory and
//! too-big errors, the refused file access) with `strace -f` on the test
//! binary: after the filter, the helpers made only `read` (fd 0), `write`
//! and `writev` (fds 1 and 2), `brk`, `mmap`/`munmap` (no `PROT_EXEC`),
//! `getpid` and `exit_group`; no SIGSYS. (Under `sandbox.seccomp = "log"`
//! this host's `dmesg` shows no `type=1326` records at all, not even for a
//! probe that opens a file, so the measurement is strace's.) A tenant's
//! attempt at a file (`ATTACH`, `VACUUM INTO`, `load_extension`, which
//! SQLite refuses by default; `readfile`/`writefile`/`fsdir` exist only in
//! SQLite's shell) fails in SQLite; were SQLite ever to `openat` anyway,
//! seccomp would kill the helper.
#![no_main]
#![deny(unsafe_code)]

use sandpool_helper::{EXIT_STARTUP_FAILED, HandlerError, Options, Request};

fn fail(code: i32, message: &str) -> ! {
    eprintln!("sandpool-sql-helper: {message}");
    std::process::exit(code);
}

/// The process entry point, called by the C runtime's start-up code
/// (`#![no_main]`, as the reference helper: std's runtime set-up costs a
/// launch time and buys a helper nothing).
// SAFETY: `no_mangle` exports this as the C symbol `main`, which nothing
// else in the binary defines (`#![no_main]` keeps std from emitting its
// own; SQLite's amalgamation defines no `main`); its signature is the C
// `int main(int, char **)` that glibc's start-up code calls, and it never
// unwinds into C: `run` exits the process, and a panic outside the handler
// aborts (the handler's panics are caught by the runtime).
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    run()
}

fn run() -> ! {
    if std::env::args().len() > 1 {
        fail(2, "takes no arguments");
    }
    let options = Options::new(concat!("sandpool-sql-helper ", env!("CARGO_PKG_VERSION")))
        .unwrap_or_else(|err| fail(EXIT_STARTUP_FAILED, &err.to_string()));
    // SQLite is set up in the runtime's init hook: after the inherited fds
    // are closed and the capabilities dropped, before no_new_privs and the
    // filter (its first 'localtime' makes glibc read the zone file once).
    let conn = std::cell::OnceCell::new();
    sandpool_helper::serve_main_with_init(
        &options,
        |_| -> Result<(), HandlerError> {
            let opened = sandpool_sql_helper::open()?;
            sandpool_sql_helper::init_process(&opened)?;
            let _ = conn.set(opened);
            Ok(())
        },
        |request: &Request<'_>, out: &mut Vec<u8>| -> Result<(), HandlerError> {
            let conn = conn.get().ok_or("SQLite was not set up")?;
            let sql = std::str::from_utf8(request.payload)?;
            sandpool_sql_helper::execute(conn, sql, out)?;
            Ok(())
        },
    )
}
