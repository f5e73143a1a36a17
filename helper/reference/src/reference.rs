//! The request format of the reference helper binary (`sandpool-helper`).
//!
//! A request is one op byte followed by its body. `echo` and `redo` are the
//! real workloads. The test ops (0x10 and up) exist so tests and the demo can
//! turn a helper hostile from the request side; the binary refuses them unless
//! launched with `--test-ops`.

/// Returns the body unchanged.
pub const OP_ECHO: u8 = 0x01;
/// Applies redo records to a base page ([`crate::redo`]).
pub const OP_REDO: u8 = 0x02;
/// Test op: reads the file named by the body (forbidden by seccomp: `openat`).
pub const OP_OPEN: u8 = 0x10;
/// Test op: creates a TCP socket (forbidden by seccomp: `socket`).
pub const OP_SOCKET: u8 = 0x11;
/// Test op: spawns `/bin/true` (forbidden by seccomp: `clone`/`vfork`/`execve`).
pub const OP_SPAWN: u8 = 0x12;
/// Test op: panics with the body as the message.
pub const OP_PANIC: u8 = 0x13;
/// Test op: fails with the body as the error message.
pub const OP_FAIL: u8 = 0x14;
/// Test op: sleeps for the little-endian `u32` milliseconds in the body, then echoes.
pub const OP_SLEEP: u8 = 0x15;
/// Test op: writes the body to stderr, then echoes it.
pub const OP_STDERR: u8 = 0x16;
/// Test op: replaces the process with `/bin/true` (forbidden by seccomp: `execve`).
pub const OP_EXEC: u8 = 0x17;
/// Test op: asks to be traced (forbidden by seccomp: `ptrace`).
pub const OP_PTRACE: u8 = 0x18;

/// Test op: maps 64 KiB with `mmap(MAP_LOCKED | MAP_POPULATE)` (forbidden by
/// seccomp: `mmap` with `MAP_LOCKED`).
pub const OP_MMAP_LOCKED: u8 = 0x20;
/// Test op: `madvise(MADV_HWPOISON)` on a page of its own (forbidden by
/// seccomp: `madvise` with an advice outside the allowlist; and the helper
/// has no `CAP_SYS_ADMIN` left to do it anyway).
pub const OP_MADVISE_HWPOISON: u8 = 0x21;
/// Test op: `madvise(MADV_DONTNEED)` on a page of its own, then echoes
/// (allowed: the control for [`OP_MADVISE_HWPOISON`]).
pub const OP_MADVISE_DONTNEED: u8 = 0x22;

/// Test op: allocates and touches the little-endian `u32` MiB in the body,
/// keeps it for the helper's life, and answers with the MiB kept in all
/// (as a little-endian `u32`).
pub const OP_GROW: u8 = 0x30;

/// Test op: answers the 16 bytes the `--init urandom` hook read from
/// `/dev/urandom` before the sandbox closed; with `--init keep-urandom`,
/// 16 bytes read now, under the filter, from the `/dev/urandom` fd the
/// hook kept and declared.
pub const OP_SEED: u8 = 0x31;

/// Builds an [`OP_GROW`] request: grow by `mib` MiB, touched and kept.
pub fn grow_request(mib: u32) -> Vec<u8> {
    request(OP_GROW, &mib.to_le_bytes())
}

/// Builds a request: the op byte, then the body.
pub fn request(op: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + body.len());
    out.push(op);
    out.extend_from_slice(body);
    out
}

/// Builds an [`OP_SLEEP`] request: sleep `millis`, then echo `echo`.
pub fn sleep_request(millis: u32, echo: &[u8]) -> Vec<u8> {
    let mut body = millis.to_le_bytes().to_vec();
    body.extend_from_slice(echo);
    request(OP_SLEEP, &body)
}

/// The misbehaviours the reference binary can be launched with
/// (`--misbehave NAME`), for the tests of the host's trust boundary.
pub const MISBEHAVIOURS: &[&str] = &[
    "skip-seccomp",
    "lie-seccomp",
    "no-hello",
    "hang",
    "exit-mid-response",
    "garbage",
    "wrong-id",
    "answer-twice",
    "pre-answer",
    "no-read",
    "stderr-flood",
    "region-oob",
    "region-scribble",
    "region-other-window",
    "output-before-bind",
    "spin-when-idle",
    "spin-after-reply",
    "keep-caps",
    "keep-fd",
    "lie-kept-path",
    "lie-kept-access",
    "thread-in-init",
    "kept-other-ns",
    "corpus:<case name>",
];
