//! The sandpool helper runtime for helpers written in C.
//!
//! This crate is built as a static library (`libsandpool_helper_capi.a`)
//! and declared to C by the hand-written header
//! `include/sandpool_helper.h`, which is the contract: this file
//! implements it. It is the Rust runtime ([`sandpool_helper`]) unchanged:
//! the same startup order, the same default seccomp policy, the same
//! Hello, so a C helper passes the same host verification as the Rust
//! reference helper.
//!
//! The boundary's rules:
//!
//! - nothing a C caller passes is trusted where it can be checked: NULL
//!   pointers, a NULL or non-UTF-8 build id, a NULL handler, an append from
//!   inside the response buffer itself, lengths past `isize::MAX`, a
//!   response past what could ever be sent; each is an error code, never
//!   undefined behaviour on this side;
//! - no panic unwinds into C: every exported function runs its body under
//!   `catch_unwind` (or cannot panic);
//! - the handler is called through the `C-unwind` ABI, so a foreign
//!   exception (C++) escaping it is defined (Rust aborts the process or
//!   fails that one call), not undefined; it is still a bug of the handler.
//!
//! What cannot be checked (a dangling pointer, a buffer shorter than the
//! length given, a `sandpool_buf` kept past its handler call, a `longjmp`
//! out of the handler) is listed in the header as the caller's duty.

#![warn(missing_docs)]

use std::cell::Cell;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};

use sandpool_helper::{EXIT_PROTOCOL_ERROR, EXIT_STARTUP_FAILED, HandlerError, Options, Request};
use sandpool_protocol::MAX_ERROR_MESSAGE;

/// The library's version, as `SANDPOOL_HELPER_VERSION` in the header.
const VERSION: &CStr = c"0.1.0";

/// A C request handler (`sandpool_handler` in the header).
///
/// `C-unwind` rather than `C`: a C++ exception that escapes a handler is
/// then a defined event on this side (abort, or a failed call) instead of
/// undefined behaviour.
/// `sandpool_init` (see the header): the init hook's C signature.
pub type Init = unsafe extern "C-unwind" fn(ctx: *mut c_void) -> c_int;

/// `sandpool_handler` (see the header): the handler's C signature.
pub type Handler = unsafe extern "C-unwind" fn(
    ctx: *mut c_void,
    request: *const u8,
    len: usize,
    out: *mut SandpoolBuf<'_>,
) -> c_int;

/// The response being built (`sandpool_buf` in the header), plus what a
/// handler may ask about its request. Lives on the request loop's stack for
/// one handler call; C sees only a pointer to it.
#[derive(Debug)]
pub struct SandpoolBuf<'a> {
    out: &'a mut Vec<u8>,
    tenant: Option<&'a [u8]>,
    id: u64,
    /// The largest response the host accepts for this request: the frame
    /// limit, or for a request through the shared region the larger of
    /// that and its reply window. Appends past it fail.
    limit: usize,
}

impl SandpoolBuf<'_> {
    /// Appends `data`, which may lie inside the buffer's own bytes (then
    /// it is copied within, before any reallocation could move it).
    /// Errors: past `limit`, an allocation failure, or `data` overlapping
    /// the buffer's allocation without lying inside its initialized bytes.
    fn append(&mut self, data: *const u8, len: usize) -> Result<(), AppendError> {
        if len == 0 {
            return Ok(());
        }
        if data.is_null() {
            return Err(AppendError::Null);
        }
        let new_len = self
            .out
            .len()
            .checked_add(len)
            .filter(|total| *total <= self.limit)
            .ok_or(AppendError::TooLong)?;
        let end = (data as usize)
            .checked_add(len)
            .ok_or(AppendError::BadRange)?;
        // Addresses only (no dereference): where `data` lies relative to
        // this buffer's allocation.
        let base = self.out.as_ptr() as usize;
        let initialized_end = base + self.out.len();
        let allocation_end = base + self.out.capacity();
        let overlaps = (data as usize) < allocation_end && end > base;
        if overlaps {
            if end > initialized_end {
                return Err(AppendError::BadRange);
            }
            let start = data as usize - base;
            self.out
                .try_reserve(len)
                .map_err(|_| AppendError::NoMemory)?;
            self.out.extend_from_within(start..start + len);
            return Ok(());
        }
        if len > isize::MAX as usize {
            return Err(AppendError::BadRange);
        }
        self.out
            .try_reserve(len)
            .map_err(|_| AppendError::NoMemory)?;
        // SAFETY: `data` is non-null (checked above) and, by the header's
        // contract for `sandpool_buf_append`, points at `len` readable
        // bytes that stay unchanged for this call; `len <= isize::MAX`
        // (checked); the range does not overlap this buffer's allocation
        // (checked above), so the slice does not alias the `Vec` we are
        // about to write, and the reservation just made cannot move it.
        let bytes = unsafe { std::slice::from_raw_parts(data, len) };
        self.out.extend_from_slice(bytes);
        debug_assert_eq!(self.out.len(), new_len);
        Ok(())
    }
}

/// Why an append was refused (the C side sees -1).
#[derive(Debug, PartialEq, Eq)]
enum AppendError {
    Null,
    TooLong,
    BadRange,
    NoMemory,
}

/// The Error frame's text for a handler that returned `status`: the
/// response buffer's bytes (lossy UTF-8), cut to the Error frame limit, or
/// a sentence naming the status when the handler wrote nothing.
fn error_text(out: &[u8], status: c_int) -> String {
    if out.is_empty() {
        return format!("handler failed (returned {status})");
    }
    // Cut the bytes first, so a large response costs no large string; the
    // runtime cuts the text again at a character boundary.
    let cut = &out[..out.len().min(MAX_ERROR_MESSAGE)];
    String::from_utf8_lossy(cut).into_owned()
}

/// Writes one line to stderr, ignoring failure (`eprintln!` panics when
/// stderr is a closed pipe, and this must never panic).
fn complain(message: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "sandpool-helper: {message}");
}

thread_local! {
    /// The fds `sandpool_keep_fd` declared, while an init hook runs on this
    /// thread (`None` outside one).
    static KEEPING: std::cell::RefCell<Option<Vec<c_int>>> = const { std::cell::RefCell::new(None) };
}

/// `sandpool_keep_fd` (see the header): declares a kept fd from inside an
/// init hook.
// SAFETY: `no_mangle` exports the C symbol `sandpool_keep_fd`, which nothing
// else in a helper defines (the header reserves the `sandpool_` prefix);
// its signature is the header's, and it takes and returns plain integers.
#[unsafe(no_mangle)]
pub extern "C" fn sandpool_keep_fd(fd: c_int) -> c_int {
    if fd < 3 {
        return -1;
    }
    let kept = catch_unwind(|| {
        KEEPING.with_borrow_mut(|keeping| match keeping {
            Some(fds) => {
                fds.push(fd);
                true
            }
            None => false,
        })
    });
    match kept {
        Ok(true) => 0,
        _ => -1,
    }
}

/// Set by the first `sandpool_serve`: the protocol pipes can be taken once
/// per process, and a handler must not start a second request loop.
static SERVING: AtomicBool = AtomicBool::new(false);

/// The body of `sandpool_serve`, with the C arguments already checked.
/// `said_hello` is set once the Hello is out, so a panic is reported with
/// the right exit status.
fn serve(
    build_id: &str,
    init: Option<Init>,
    handler: Handler,
    ctx: *mut c_void,
    said_hello: &Cell<bool>,
) -> c_int {
    if SERVING.swap(true, Ordering::SeqCst) {
        complain(format_args!(
            "sandpool_serve called a second time (once per process)"
        ));
        return EXIT_STARTUP_FAILED;
    }
    let options = match Options::new(build_id) {
        Ok(options) => options,
        Err(err) => {
            complain(format_args!("startup failed: {err}"));
            return EXIT_STARTUP_FAILED;
        }
    };
    let run_init = |declared: &mut sandpool_helper::Init| -> Result<(), HandlerError> {
        let Some(init) = init else {
            return Ok(());
        };
        KEEPING.with_borrow_mut(|keeping| *keeping = Some(Vec::new()));
        // SAFETY: `init` is a non-null function pointer the caller of
        // `sandpool_serve_with_init` gave us with the header's
        // `sandpool_init` signature; `ctx` is passed through untouched, as
        // the header promises.
        let status = unsafe { init(ctx) };
        for fd in KEEPING.with_borrow_mut(Option::take).unwrap_or_default() {
            declared.keep_raw(fd);
        }
        match status {
            0 => Ok(()),
            status => Err(format!("init returned {status}").into()),
        }
    };
    let started = match init {
        Some(_) => sandpool_helper::start_with_init(&options, run_init),
        // Nothing runs between the close and the filter: no fd to count.
        None => sandpool_helper::start(&options),
    };
    let session = match started {
        Ok(session) => session,
        Err(err) => {
            complain(format_args!("startup failed: {err}"));
            return EXIT_STARTUP_FAILED;
        }
    };
    said_hello.set(true);
    let max_frame = session.max_frame() as usize;
    let outcome = session.serve(|request: &Request<'_>, out: &mut Vec<u8>| {
        let window = request
            .reply_window
            .map_or(0, |len| usize::try_from(len).unwrap_or(usize::MAX));
        let mut buf = SandpoolBuf {
            out,
            tenant: request.tenant,
            id: request.id,
            limit: window.max(max_frame),
        };
        // SAFETY: `handler` is a non-null function pointer the caller of
        // `sandpool_serve` gave us with the header's `sandpool_handler`
        // signature (the header's contract; its ABI is C's, and `C-unwind`
        // makes an escaping foreign exception defined). The request
        // pointer and length describe the runtime's request buffer, and
        // `buf` is a live, exclusively borrowed `SandpoolBuf`; both stay
        // valid for the whole call and are not touched by Rust during it.
        let status = unsafe {
            handler(
                ctx,
                request.payload.as_ptr(),
                request.payload.len(),
                &mut buf,
            )
        };
        if status == 0 {
            Ok(())
        } else {
            Err(HandlerError::from(error_text(buf.out, status)))
        }
    });
    match outcome {
        Ok(()) => 0,
        Err(err) => {
            complain(format_args!("{err}"));
            EXIT_PROTOCOL_ERROR
        }
    }
}

/// The checks `sandpool_serve` makes of its arguments before anything
/// else: the build id is a non-null UTF-8 string, the handler non-null.
fn check_arguments(
    build_id: Option<&CStr>,
    handler: Option<Handler>,
) -> Result<(&str, Handler), &'static str> {
    let build_id = build_id
        .ok_or("sandpool_serve: build_id is NULL")?
        .to_str()
        .map_err(|_| "sandpool_serve: build_id is not UTF-8")?;
    let handler = handler.ok_or("sandpool_serve: handler is NULL")?;
    Ok((build_id, handler))
}

/// `sandpool_serve` (see the header): runs the startup sequence and the
/// request loop; returns 0 on EOF or Shutdown, 70 if startup failed (or an
/// argument was refused), 76 if the host broke the protocol.
///
/// # Safety
///
/// `build_id` is NULL or a NUL-terminated string readable for this call;
/// `handler` is NULL or a function with the `sandpool_handler` signature;
/// `ctx` is passed through to it untouched.
// SAFETY: `no_mangle` exports the C symbol `sandpool_serve`, which nothing
// else in a helper defines (every symbol of this library has the
// `sandpool_` prefix the header reserves); its signature is the header's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sandpool_serve(
    build_id: *const c_char,
    handler: Option<Handler>,
    ctx: *mut c_void,
) -> c_int {
    // SAFETY: the same contract as this function's, with no init hook.
    unsafe { sandpool_serve_with_init(build_id, None, handler, ctx) }
}

/// `sandpool_serve_with_init` (see the header): `sandpool_serve` with an
/// init hook, run after the inherited fds are closed and the capabilities
/// dropped, before no_new_privs, the rlimits and the seccomp filter. NULL
/// means none; a non-zero return fails the start-up (70), and so does an
/// fd it leaves open.
///
/// # Safety
///
/// As `sandpool_serve`; `init` is NULL or a function with the
/// `sandpool_init` signature.
// SAFETY: `no_mangle` exports the C symbol `sandpool_serve_with_init`,
// which nothing else in a helper defines (the `sandpool_` prefix is the
// header's); its signature is the header's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sandpool_serve_with_init(
    build_id: *const c_char,
    init: Option<Init>,
    handler: Option<Handler>,
    ctx: *mut c_void,
) -> c_int {
    let build_id = if build_id.is_null() {
        None
    } else {
        // SAFETY: non-null, and by this function's contract a
        // NUL-terminated string that stays readable and unchanged for the
        // call; the `CStr` is not kept past it.
        Some(unsafe { CStr::from_ptr(build_id) })
    };
    let (build_id, handler) = match check_arguments(build_id, handler) {
        Ok(checked) => checked,
        Err(message) => {
            let _ = writeln!(std::io::stderr(), "sandpool-helper: {message}");
            return EXIT_STARTUP_FAILED;
        }
    };
    let said_hello = Cell::new(false);
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        serve(build_id, init, handler, ctx, &said_hello)
    }));
    outcome.unwrap_or_else(|_| {
        // The runtime's panic hook (or std's, before it was installed)
        // has already printed the message.
        complain(format_args!("the runtime panicked"));
        if said_hello.get() {
            EXIT_PROTOCOL_ERROR
        } else {
            EXIT_STARTUP_FAILED
        }
    })
}

/// `sandpool_buf_append` (see the header): appends `len` bytes; 0 or -1.
///
/// # Safety
///
/// `out` is NULL or the buffer of the handler call running now; `data` is
/// NULL or points at `len` readable bytes.
// SAFETY: exports the C symbol `sandpool_buf_append` with the header's
// signature; no other definition exists (the `sandpool_` prefix is ours).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sandpool_buf_append(
    out: *mut SandpoolBuf<'_>,
    data: *const u8,
    len: usize,
) -> c_int {
    // SAFETY: by the contract, `out` is NULL (then `as_mut` gives `None`)
    // or points at the live `SandpoolBuf` of the running handler call,
    // which nothing else borrows while the handler runs.
    let Some(buf) = (unsafe { out.as_mut() }) else {
        return -1;
    };
    match catch_unwind(AssertUnwindSafe(|| buf.append(data, len))) {
        Ok(Ok(())) => 0,
        Ok(Err(_)) | Err(_) => -1,
    }
}

/// `sandpool_buf_len` (see the header): the bytes appended so far (0 for
/// NULL).
///
/// # Safety
///
/// `out` is NULL or the buffer of the handler call running now.
// SAFETY: exports the C symbol `sandpool_buf_len` with the header's
// signature; no other definition exists.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sandpool_buf_len(out: *const SandpoolBuf<'_>) -> usize {
    // SAFETY: NULL or the live buffer of the running handler call (the
    // contract); only read.
    unsafe { out.as_ref() }.map_or(0, |buf| buf.out.len())
}

/// `sandpool_buf_data` (see the header): the first byte of the response
/// so far, writable in place up to `sandpool_buf_len`; NULL for NULL.
///
/// # Safety
///
/// `out` is NULL or the buffer of the handler call running now.
// SAFETY: exports the C symbol `sandpool_buf_data` with the header's
// signature; no other definition exists.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sandpool_buf_data(out: *mut SandpoolBuf<'_>) -> *mut u8 {
    // SAFETY: NULL or the live, unaliased buffer of the running handler
    // call (the contract).
    unsafe { out.as_mut() }.map_or(std::ptr::null_mut(), |buf| buf.out.as_mut_ptr())
}

/// `sandpool_buf_clear` (see the header): empties the response (NULL is
/// ignored).
///
/// # Safety
///
/// `out` is NULL or the buffer of the handler call running now.
// SAFETY: exports the C symbol `sandpool_buf_clear` with the header's
// signature; no other definition exists.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sandpool_buf_clear(out: *mut SandpoolBuf<'_>) {
    // SAFETY: NULL or the live, unaliased buffer of the running handler
    // call (the contract).
    if let Some(buf) = unsafe { out.as_mut() } {
        buf.out.clear();
    }
}

/// `sandpool_tenant` (see the header): the tenant this helper is bound to,
/// or NULL before a Bind; `*len` gets its length (0 when NULL) if `len` is
/// not NULL.
///
/// # Safety
///
/// `out` is NULL or the buffer of the handler call running now; `len` is
/// NULL or writable.
// SAFETY: exports the C symbol `sandpool_tenant` with the header's
// signature; no other definition exists.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sandpool_tenant(
    out: *const SandpoolBuf<'_>,
    len: *mut usize,
) -> *const u8 {
    // SAFETY: NULL or the live buffer of the running handler call (the
    // contract); only read.
    let tenant = unsafe { out.as_ref() }.and_then(|buf| buf.tenant);
    // SAFETY: NULL (then `as_mut` gives `None`) or, by the contract, a
    // writable `size_t` no Rust reference points at.
    if let Some(len) = unsafe { len.as_mut() } {
        *len = tenant.map_or(0, <[u8]>::len);
    }
    tenant.map_or(std::ptr::null(), <[u8]>::as_ptr)
}

/// `sandpool_request_id` (see the header): the running request's id (0
/// for NULL).
///
/// # Safety
///
/// `out` is NULL or the buffer of the handler call running now.
// SAFETY: exports the C symbol `sandpool_request_id` with the header's
// signature; no other definition exists.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sandpool_request_id(out: *const SandpoolBuf<'_>) -> u64 {
    // SAFETY: NULL or the live buffer of the running handler call (the
    // contract); only read.
    unsafe { out.as_ref() }.map_or(0, |buf| buf.id)
}

/// `sandpool_version` (see the header): this library's version string,
/// to compare with the header's `SANDPOOL_HELPER_VERSION`.
// SAFETY: exports the C symbol `sandpool_version` with the header's
// signature; no other definition exists.
#[unsafe(no_mangle)]
pub extern "C" fn sandpool_version() -> *const c_char {
    VERSION.as_ptr()
}

#[cfg(test)]
mod tests;
