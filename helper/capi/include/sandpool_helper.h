/*
 * sandpool_helper.h: the sandpool helper runtime for helpers written in C.
 *
 * A helper is a process a sandpool host launches for one tenant. It talks to
 * the host over its stdin (requests) and stdout (replies); stderr is its log.
 * This library is the Rust runtime of sandpool (the crate sandpool-helper)
 * behind a C interface: the same startup sequence, the same seccomp policy,
 * the same Hello, so a C helper passes the same host verification.
 *
 * Link (static, like the Rust reference helper):
 *
 *     cc -std=c99 -static -o my_helper my_helper.c \
 *        -I path/to/helper/capi/include \
 *        -L path/to/dir/of/libsandpool_helper_capi.a \
 *        -lsandpool_helper_capi -lpthread -ldl -lm
 *
 * The library is built with
 *     RUSTFLAGS="-C target-feature=+crt-static" \
 *     cargo build --release -p sandpool-helper-capi --target x86_64-unknown-linux-gnu
 * (crt-static makes the Rust standard library inside it use libgcc_eh, the
 * unwinder a -static link has, instead of libgcc_s). `cargo rustc` with
 * `-- --print native-static-libs` lists the system libraries it needs; gcc's
 * -static adds libgcc, libgcc_eh and libc itself.
 *
 * THE START-UP CONTRACT
 *
 * Call sandpool_serve() first thing in main(), once, from the main thread,
 * before this process has
 *   - opened any file, socket or pipe it means to keep: every fd but 0, 1
 *     and 2 is closed (close_range) before the Hello, so a FILE* or fd
 *     opened earlier is closed under your feet. Reading a configuration
 *     file before is fine if you close it and keep only its contents;
 *   - created any thread: capabilities and no_new_privs are per thread
 *     and are dropped on the calling thread only, and other threads'
 *     fds would be closed beneath them;
 *   - written anything to stdout (fd 1): it is the protocol pipe.
 * Parsing argv, allocating memory and building data structures before it
 * are fine. After sandpool_serve() returns, exit: return its value from
 * main().
 *
 * WHAT A HANDLER MAY DO
 *
 * The handler runs under the seccomp filter: it may compute, allocate
 * memory (malloc; never executable memory), read the clocks, sleep, write
 * to stderr (fd 2) and abort(). Any other system call (open, socket, fork,
 * exec, ptrace, ...) kills the process at once (SIGSYS), which the host
 * reports as a seccomp kill. It must never read stdin or write stdout (use
 * stderr, e.g. fprintf(stderr, ...), for logs; C's stdout buffer would be
 * flushed into the protocol pipe at exit). It must return normally: no
 * longjmp() out of it, no C++ exception escaping it (the runtime calls it
 * through an unwinding ABI, so an escaping exception is not undefined
 * behaviour, but it ends the process or fails the call). SIGPIPE is left
 * at its default (as in the Rust reference helper): if the host goes away
 * while a reply is written, the helper dies by SIGPIPE.
 *
 * C99; usable from C++.
 */
#ifndef SANDPOOL_HELPER_H
#define SANDPOOL_HELPER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** The version of this header; sandpool_version() gives the library's. */
#define SANDPOOL_HELPER_VERSION "0.1.0"
/** The major part of SANDPOOL_HELPER_VERSION. */
#define SANDPOOL_HELPER_VERSION_MAJOR 0
/** The minor part of SANDPOOL_HELPER_VERSION. */
#define SANDPOOL_HELPER_VERSION_MINOR 1
/** The patch part of SANDPOOL_HELPER_VERSION. */
#define SANDPOOL_HELPER_VERSION_PATCH 0

/** sandpool_serve(): the startup sequence failed (or an argument was
 *  refused); the helper served nothing. Exit with it. */
#define SANDPOOL_EXIT_STARTUP_FAILED 70
/** sandpool_serve(): the host broke the protocol or a pipe failed. */
#define SANDPOOL_EXIT_PROTOCOL_ERROR 76

/** The longest Error frame text, in bytes; longer texts are cut. */
#define SANDPOOL_MAX_ERROR_MESSAGE 4096

/**
 * The response being built for one request, and what the handler may ask
 * about that request (sandpool_tenant(), sandpool_request_id()). Opaque.
 * A handler gets a pointer to it; the pointer, and every pointer obtained
 * through it, is valid only until that handler call returns.
 */
typedef struct sandpool_buf sandpool_buf;

/**
 * Appends len bytes at data to the response. data may point into the
 * response itself (into its first sandpool_buf_len() bytes). data may be
 * NULL only when len is 0.
 *
 * Returns 0, or -1 (nothing appended) if out is NULL, data is NULL with len
 * > 0, the memory could not be allocated, data overlaps the buffer outside
 * its bytes, or the response would grow past the largest the host accepts
 * for this request (its frame limit; for a request that came through the
 * shared region, the larger of that and the request's reply window).
 */
int sandpool_buf_append(sandpool_buf *out, const uint8_t *data, size_t len);

/** The number of bytes appended so far (0 if out is NULL). */
size_t sandpool_buf_len(const sandpool_buf *out);

/**
 * The response's first byte, for changing its sandpool_buf_len() bytes in
 * place (NULL if out is NULL). Valid until the next sandpool_buf_append()
 * or sandpool_buf_clear() on out, or the handler's return; not to be
 * dereferenced when sandpool_buf_len() is 0.
 */
uint8_t *sandpool_buf_data(sandpool_buf *out);

/** Empties the response (keeps its memory for reuse). NULL is ignored. */
void sandpool_buf_clear(sandpool_buf *out);

/**
 * The tenant this helper is bound to (1 to 256 bytes, not NUL-terminated),
 * or NULL while it is a spare nobody is bound to yet (or if out is NULL).
 * If len is not NULL, *len gets the tenant's length (0 with NULL). A helper
 * is bound once and never rebound. Valid until the handler returns.
 */
const uint8_t *sandpool_tenant(const sandpool_buf *out, size_t *len);

/** The id of the request being handled, for logs (0 if out is NULL). */
uint64_t sandpool_request_id(const sandpool_buf *out);

/**
 * A request handler. request points at len bytes (valid until it returns;
 * not NUL-terminated; any pointer value when len is 0); ctx is the pointer
 * given to sandpool_serve(). Append the response to out.
 *
 * Return 0 to send out as the response; any other value sends an Error
 * frame (the host's CallError::Helper) with out's bytes as its text (read
 * as UTF-8, invalid sequences replaced, cut to SANDPOOL_MAX_ERROR_MESSAGE
 * bytes; "handler failed (returned N)" when out is empty). Either way the
 * helper goes on serving.
 */
typedef int (*sandpool_handler)(void *ctx, const uint8_t *request, size_t len,
                                sandpool_buf *out);

/**
 * Runs the whole startup sequence (the host's sandbox spec from
 * SANDPOOL_SANDBOX; take fds 0 and 1; close every other fd; drop
 * capabilities and switch user as the spec says; no_new_privs; rlimits;
 * seccomp filter; the Hello frame carrying build_id, cut to 128 bytes),
 * then the request loop, calling handler for each request.
 *
 * Returns only on EOF or Shutdown from the host (0), or on failure:
 * SANDPOOL_EXIT_STARTUP_FAILED (startup failed; build_id or handler NULL,
 * build_id not UTF-8; or called a second time) or
 * SANDPOOL_EXIT_PROTOCOL_ERROR (the host broke the protocol). The reason is
 * written to stderr. Return the value from main().
 *
 * See THE START-UP CONTRACT at the top of this file: call it first thing.
 *
 * The helper's own path: getenv("SANDPOOL_PROGRAM"), set by the host to the
 * program's absolute path. With the host's pin_image (its default),
 * /proc/self/exe names a sealed memfd, not that file, so a helper that finds
 * its data beside its executable must use this variable.
 */
int sandpool_serve(const char *build_id, sandpool_handler handler, void *ctx);

/**
 * An init hook: runs once, after the inherited fds are closed and the
 * capabilities dropped (and the user switched, if configured), before
 * no_new_privs, the rlimits and the seccomp filter, for a library to set
 * itself up while it still may (seed its generator from /dev/urandom, load
 * tables, read its time zone). It may open files; each fd it leaves open
 * must be declared with sandpool_keep_fd(), or the start-up fails (the
 * host would refuse the Hello).
 * Return 0, or non-zero to fail the start-up (SANDPOOL_EXIT_STARTUP_FAILED).
 * ctx is the pointer given to sandpool_serve_with_init().
 */
typedef int (*sandpool_init)(void *ctx);

/**
 * Declares, from inside an init hook, that fd stays open while the helper
 * serves. The runtime reports it in the Hello (its number, access mode and
 * the path /proc/self/fd/<fd> names) and its seccomp filter allows read()
 * and pread() on exactly that fd (write() and pwrite() too if it was opened
 * for writing); the host checks the declaration against /proc/PID/fd and
 * refuses the helper unless its configuration allows that path
 * (sandbox.kept_fds; none by default). Do not close a kept fd while
 * serving: it cannot be opened again under the filter.
 * Returns 0, or -1 if called outside an init hook or with fd < 3. An fd
 * that is not open fails the start-up after the hook returns.
 */
int sandpool_keep_fd(int fd);

/**
 * sandpool_serve() with an init hook (NULL: none), run at the point of the
 * startup sequence described at sandpool_init.
 */
int sandpool_serve_with_init(const char *build_id, sandpool_init init,
                             sandpool_handler handler, void *ctx);

/** The library's version string (compare with SANDPOOL_HELPER_VERSION). */
const char *sandpool_version(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* SANDPOOL_HELPER_H */
