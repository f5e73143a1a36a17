//! The Rust side of the C boundary without processes: buffer appends, NULL
//! handling, argument checks, error texts, and the header's constants
//! against the runtime's. (The C helper itself is tested end to end in
//! `tests/tests/c_helper.rs`.)
#![allow(clippy::unwrap_used)]

use super::*;

fn buf(out: &mut Vec<u8>, limit: usize) -> SandpoolBuf<'_> {
    SandpoolBuf {
        out,
        tenant: None,
        id: 7,
        limit,
    }
}

// The exported functions called the way C would, one unsafe call each.

fn append(b: *mut SandpoolBuf<'_>, data: &[u8]) -> c_int {
    // SAFETY: `b` is NULL or a live buffer (every caller below); `data` is
    // a slice, so its pointer covers its length.
    unsafe { sandpool_buf_append(b, data.as_ptr(), data.len()) }
}

fn append_raw(b: &mut SandpoolBuf<'_>, data: *const u8, len: usize) -> c_int {
    // SAFETY: `b` is live; `data` is NULL (refused before any read) in
    // every call below.
    unsafe { sandpool_buf_append(b, data, len) }
}

fn len(b: *const SandpoolBuf<'_>) -> usize {
    // SAFETY: `b` is NULL or a live buffer.
    unsafe { sandpool_buf_len(b) }
}

fn data(b: *mut SandpoolBuf<'_>) -> *mut u8 {
    // SAFETY: `b` is NULL or a live buffer.
    unsafe { sandpool_buf_data(b) }
}

fn clear(b: *mut SandpoolBuf<'_>) {
    // SAFETY: `b` is NULL or a live buffer.
    unsafe { sandpool_buf_clear(b) }
}

fn request_id(b: *const SandpoolBuf<'_>) -> u64 {
    // SAFETY: `b` is NULL or a live buffer.
    unsafe { sandpool_request_id(b) }
}

fn tenant(b: *const SandpoolBuf<'_>, len: *mut usize) -> Option<Vec<u8>> {
    // SAFETY: `b` is NULL or a live buffer, `len` NULL or a live `usize`.
    let ptr = unsafe { sandpool_tenant(b, len) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: a non-null tenant pointer and its length, from a live buffer.
    let len = unsafe { *len };
    // SAFETY: `ptr` and `len` describe the buffer's tenant slice, borrowed
    // for as long as the buffer is.
    Some(unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec())
}

fn serve(build_id: *const c_char, handler: Option<Handler>) -> c_int {
    // SAFETY: `build_id` is NULL or a NUL-terminated literal, `handler`
    // NULL or a function of the right type.
    unsafe { sandpool_serve(build_id, handler, std::ptr::null_mut()) }
}

#[test]
fn append_len_data_and_clear() {
    let mut out = Vec::new();
    let mut b = buf(&mut out, 1 << 20);
    assert_eq!(append(&mut b, b"hello "), 0);
    assert_eq!(append(&mut b, b"world"), 0);
    assert_eq!(len(&b), 11);
    let first = data(&mut b);
    assert_eq!(first.cast_const(), b.out.as_ptr());
    assert_eq!(request_id(&b), 7);
    // An empty append is fine even with a NULL pointer.
    assert_eq!(append_raw(&mut b, std::ptr::null(), 0), 0);
    assert_eq!(b.out.as_slice(), b"hello world");
    clear(&mut b);
    assert_eq!(len(&b), 0);
}

#[test]
fn null_pointers_are_errors_not_crashes() {
    let mut out = Vec::new();
    let mut b = buf(&mut out, 1 << 20);
    let mut n = 99usize;
    assert_eq!(append(std::ptr::null_mut(), b"x"), -1);
    assert_eq!(append_raw(&mut b, std::ptr::null(), 1), -1);
    assert_eq!(len(std::ptr::null()), 0);
    assert!(data(std::ptr::null_mut()).is_null());
    clear(std::ptr::null_mut());
    assert_eq!(request_id(std::ptr::null()), 0);
    assert_eq!(tenant(std::ptr::null(), &mut n), None);
    assert_eq!(n, 0);
    assert_eq!(tenant(&b, std::ptr::null_mut()), None);
    n = 99;
    assert_eq!(tenant(&b, &mut n), None, "a spare has no tenant");
    assert_eq!(n, 0);
    assert!(b.out.is_empty());
}

#[test]
fn tenant_is_reported_with_its_length() {
    let mut out = Vec::new();
    let mut b = buf(&mut out, 16);
    b.tenant = Some(b"tenant-a");
    let mut n = 0usize;
    assert_eq!(tenant(&b, &mut n).as_deref(), Some(&b"tenant-a"[..]));
    assert_eq!(n, 8);
}

#[test]
fn appends_past_the_limit_are_refused_whole() {
    let mut out = Vec::new();
    let mut b = buf(&mut out, 8);
    assert_eq!(append(&mut b, b"12345"), 0);
    assert_eq!(append(&mut b, b"6789"), -1);
    assert_eq!(len(&b), 5, "nothing of a refused append");
    assert_eq!(append(&mut b, b"678"), 0);
    assert_eq!(b.out.as_slice(), b"12345678");
    // Lengths no real buffer has: refused before anything is read.
    assert_eq!(
        b.append(b"x".as_ptr(), usize::MAX),
        Err(AppendError::TooLong)
    );
    let mut big = Vec::new();
    let mut unlimited = buf(&mut big, usize::MAX);
    assert_eq!(
        unlimited.append(b"x".as_ptr(), usize::MAX),
        Err(AppendError::BadRange)
    );
    assert_eq!(
        unlimited.append(b"x".as_ptr(), isize::MAX as usize + 1),
        Err(AppendError::BadRange)
    );
    assert!(unlimited.out.is_empty());
}

#[test]
fn appending_the_buffer_to_itself_survives_reallocation() {
    let mut out = Vec::with_capacity(4);
    let mut b = buf(&mut out, 1 << 20);
    assert_eq!(b.append(b"abcd".as_ptr(), 4), Ok(()));
    assert_eq!(b.out.capacity(), 4, "the next append must reallocate");
    // Its own bytes, through the pointer C would get from sandpool_buf_data.
    for _ in 0..10 {
        let data = b.out.as_ptr();
        let len = b.out.len();
        assert_eq!(b.append(data, len), Ok(()));
    }
    assert_eq!(b.out.len(), 4 << 10);
    assert!(b.out.chunks(4).all(|chunk| chunk == b"abcd"));
    // A part of it, from the middle.
    let mid = b.out[1..3].as_ptr();
    assert_eq!(b.append(mid, 2), Ok(()));
    assert_eq!(&b.out[b.out.len() - 2..], b"bc");
}

#[test]
fn appending_from_the_unwritten_part_of_the_buffer_is_refused() {
    let mut out = Vec::with_capacity(64);
    let mut b = buf(&mut out, 1 << 20);
    assert_eq!(b.append(b"ab".as_ptr(), 2), Ok(()));
    let base = b.out.as_ptr();
    // Straddles the end of the written bytes, or lies wholly past it.
    assert_eq!(
        b.append(base.wrapping_add(1), 4),
        Err(AppendError::BadRange)
    );
    assert_eq!(
        b.append(base.wrapping_add(10), 4),
        Err(AppendError::BadRange)
    );
    assert_eq!(b.out.as_slice(), b"ab");
}

#[test]
fn error_text_is_the_buffer_lossy_and_cut() {
    assert_eq!(error_text(b"bad record 7", 1), "bad record 7");
    assert_eq!(error_text(b"", -3), "handler failed (returned -3)");
    assert_eq!(error_text(b"caf\xff", 1), "caf\u{fffd}");
    let long = vec![b'x'; 100_000];
    assert_eq!(error_text(&long, 1).len(), MAX_ERROR_MESSAGE);
}

#[test]
fn serve_refuses_bad_arguments_with_status_70() {
    unsafe extern "C-unwind" fn never(
        _: *mut c_void,
        _: *const u8,
        _: usize,
        _: *mut SandpoolBuf<'_>,
    ) -> c_int {
        unreachable!("never called")
    }
    assert_eq!(
        check_arguments(None, Some(never)).err(),
        Some("sandpool_serve: build_id is NULL")
    );
    let not_utf8 = c"id \xff";
    assert_eq!(
        check_arguments(Some(not_utf8), Some(never)).err(),
        Some("sandpool_serve: build_id is not UTF-8")
    );
    assert_eq!(
        check_arguments(Some(c"id"), None).err(),
        Some("sandpool_serve: handler is NULL")
    );
    assert!(check_arguments(Some(c"id"), Some(never)).is_ok());
    // Through the exported function: refused before any startup step runs
    // (this test process is not sandboxed, and could be served again).
    assert_eq!(serve(std::ptr::null(), Some(never)), 70);
    assert_eq!(serve(not_utf8.as_ptr(), Some(never)), 70);
    assert_eq!(serve(c"id".as_ptr(), None), 70);
    assert!(!SERVING.load(Ordering::SeqCst), "no startup was attempted");
}

/// The header's macros and declarations against this library.
#[test]
fn header_matches_the_library() {
    let header = include_str!("../include/sandpool_helper.h");
    let define = |name: &str| {
        header
            .lines()
            .find_map(|line| line.strip_prefix(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("header defines {name}"))
            .trim()
            .to_string()
    };
    assert_eq!(
        define("SANDPOOL_EXIT_STARTUP_FAILED"),
        EXIT_STARTUP_FAILED.to_string()
    );
    assert_eq!(
        define("SANDPOOL_EXIT_PROTOCOL_ERROR"),
        EXIT_PROTOCOL_ERROR.to_string()
    );
    assert_eq!(
        define("SANDPOOL_MAX_ERROR_MESSAGE"),
        MAX_ERROR_MESSAGE.to_string()
    );
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(define("SANDPOOL_HELPER_VERSION"), format!("{version:?}"));
    assert_eq!(VERSION.to_str().unwrap(), version);
    let parts: Vec<&str> = version.split('.').collect();
    assert_eq!(define("SANDPOOL_HELPER_VERSION_MAJOR"), parts[0]);
    assert_eq!(define("SANDPOOL_HELPER_VERSION_MINOR"), parts[1]);
    assert_eq!(define("SANDPOOL_HELPER_VERSION_PATCH"), parts[2]);
    // Every function this library exports is declared, and nothing else.
    let source = include_str!("lib.rs");
    let exported: Vec<&str> = source
        .split("pub unsafe extern \"C\" fn ")
        .chain(source.split("pub extern \"C\" fn "))
        .skip(1)
        .filter_map(|rest| rest.split('(').next())
        .filter(|name| name.starts_with("sandpool_"))
        .collect();
    // Declarations: code lines (not comments) naming `sandpool_NAME(`.
    let declared: Vec<&str> = header
        .lines()
        .filter(|line| !line.trim_start().starts_with(['*', '/', '#']))
        .flat_map(|line| line.split("sandpool_").skip(1))
        .filter_map(|rest| rest.split_once('(').map(|(name, _)| name))
        .filter(|name| name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    let mut exported: Vec<String> = exported.iter().map(|s| s.to_string()).collect();
    exported.sort();
    exported.dedup();
    assert_eq!(exported.len(), 10, "{exported:?}");
    for name in &exported {
        let short = name.trim_start_matches("sandpool_");
        assert!(
            declared.contains(&short),
            "{name} is declared in the header"
        );
    }
}

#[test]
fn keep_fd_is_refused_outside_an_init_hook_and_for_stdio() {
    assert_eq!(crate::sandpool_keep_fd(7), -1, "no init hook is running");
    crate::KEEPING.with_borrow_mut(|keeping| *keeping = Some(Vec::new()));
    assert_eq!(crate::sandpool_keep_fd(2), -1, "stdio is never kept");
    assert_eq!(crate::sandpool_keep_fd(-1), -1);
    assert_eq!(crate::sandpool_keep_fd(7), 0);
    let declared = crate::KEEPING.with_borrow_mut(Option::take);
    assert_eq!(declared, Some(vec![7]));
}
