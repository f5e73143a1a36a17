//! `sandpool-helper`: the reference helper binary.
//!
//! Serves `echo` and page `redo` requests (see `sandpool_reference_helper::reference`).
//! Flags, for tests and the demo:
//!
//! - `--test-ops`: accept the hostile test ops (forbidden syscalls, panics, sleeps);
//! - `--misbehave NAME`: break the protocol or the startup contract on purpose
//!   (`skip-seccomp`, `lie-seccomp`, `no-hello`, `hang`, `exit-mid-response`,
//!   `garbage`, `wrong-id`, `answer-twice`, `pre-answer`, `no-read`,
//!   `stderr-flood`, `region-oob`, `region-scribble`, `region-other-window`,
//!   `output-before-bind`, `spin-when-idle`, `spin-after-reply`, `keep-caps`,
//!   `keep-fd`, `lie-kept-path`, `lie-kept-access`, `thread-in-init`,
//!   `kept-other-ns`, `corpus:<case>`).
//! - `--fd-walk`: close inherited fds by the reported `/proc/self/fd` fallback.
//! - `--init urandom|keep-fd|keep-urandom|keep-null-rw`: an init hook before
//!   the sandbox closes (read a seed from `/dev/urandom`; keep `/dev/null`
//!   open undeclared, which fails the start; keep `/dev/urandom` open,
//!   declared, for `OP_SEED` to read; keep `/dev/null` open read-write,
//!   declared).
//!
//! It starts without std's runtime set-up (`#![no_main]` and a C `main`):
//! that set-up reads `/proc/self/maps` to place a guard page under the main
//! thread's stack, installs a SIGSEGV handler with its alternate stack and
//! polls fds 0 to 2, which cost a helper about 80-100 us of every launch
//! (measured here with `perf stat` on a static binary) and buy it nothing:
//! the helper's stack overflow still faults, into a kill instead of a message.
//! std itself works as usual, but for its arguments, which only glibc hands
//! it: `main` takes them from its own argv (the build the tests use is
//! linked against musl).
#![no_main]
#![deny(unsafe_code)]

use std::ffi::OsString;
use std::io::Write;
use std::time::Duration;

use sandpool_helper::{
    EXIT_PROTOCOL_ERROR, EXIT_STARTUP_FAILED, FdCloseStrategy, HandlerError, Incoming, Options,
    Request, Session,
};
use sandpool_protocol::{
    HEADER_LEN, Kind, MAX_FRAME_CEILING, SPEC_ENV, SandboxSpec, SeccompMode, corpus, encode_frame,
};
use sandpool_reference_helper::redo;
use sandpool_reference_helper::reference::*;

/// On musl, the sandbox's allocator in place of musl's own malloc
/// (mallocng), which maps and unmaps its slot groups as they fill and
/// empty: in a profile of the helper's start-up its `mmap`/`munmap` took
/// about a quarter of the CPU, and a launch through a pool took 0.74-0.81
/// ms against 0.55-0.61 ms with dlmalloc (interleaved, one run).
/// `HelperAllocator` is dlmalloc for small blocks and a mapping of its own
/// for each large one (see its module). glibc's malloc is kept where it is
/// the libc.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: sandpool_sandbox::HelperAllocator = sandpool_sandbox::HelperAllocator;

/// The init hooks `--init` knows.
const INITS: &[&str] = &["urandom", "keep-fd", "keep-urandom", "keep-null-rw"];

struct Args {
    test_ops: bool,
    misbehave: Option<String>,
    fd_walk: bool,
    /// `--init NAME`: an init hook (`urandom`: read a seed from
    /// /dev/urandom and close it; `keep-fd`: open /dev/null and keep it
    /// undeclared; `keep-urandom`: keep /dev/urandom open, declared;
    /// `keep-null-rw`: keep /dev/null open read-write, declared).
    init: Option<String>,
}

fn parse_args(argv: &[OsString]) -> Result<Args, String> {
    let mut args = Args {
        test_ops: false,
        misbehave: None,
        fd_walk: false,
        init: None,
    };
    let mut argv = argv.iter().skip(1).map(|arg| {
        arg.to_str()
            .ok_or_else(|| format!("argument {arg:?} is not UTF-8"))
    });
    while let Some(arg) = argv.next().transpose()? {
        match arg {
            "--test-ops" => args.test_ops = true,
            "--fd-walk" => args.fd_walk = true,
            "--init" => {
                let name = argv.next().ok_or("--init needs a name")??.to_owned();
                if !INITS.contains(&name.as_str()) {
                    return Err(format!("unknown init {name:?}: one of {INITS:?}"));
                }
                args.init = Some(name);
            }
            "--misbehave" => {
                let name = argv.next().ok_or("--misbehave needs a name")??.to_owned();
                let known = MISBEHAVIOURS.iter().any(|m| {
                    *m == name || (m.starts_with("corpus:") && name.starts_with("corpus:"))
                });
                if !known {
                    return Err(format!(
                        "unknown misbehaviour {name:?}; known: {MISBEHAVIOURS:?}"
                    ));
                }
                args.misbehave = Some(name);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

fn fail(code: i32, message: &str) -> ! {
    eprintln!("sandpool-helper: {message}");
    std::process::exit(code);
}

/// The process entry point, called by the C runtime's start-up code.
// SAFETY: `no_mangle` exports this as the C symbol `main`, which nothing
// else in the binary defines (`#![no_main]` keeps std from emitting its
// own); its signature is the C `int main(int, char **)` that glibc's
// start-up code calls, and it never unwinds into C: `run` exits the process
// or returns normally, and a panic outside the handler aborts (the handler's
// panics are caught by the runtime).
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
extern "C" fn main(argc: std::ffi::c_int, argv: *const *const std::ffi::c_char) -> std::ffi::c_int {
    use std::os::unix::ffi::OsStrExt;

    let count = usize::try_from(argc).unwrap_or(0);
    let argv: Vec<OsString> = (0..count)
        .map(|i| {
            // SAFETY: the C start-up code calls `main` with `argc` and an
            // `argv` of `argc` pointers (C11 5.1.2.2.1); `i < argc`, so the
            // offset stays inside that array.
            let slot = unsafe { argv.add(i) };
            // SAFETY: `slot` points at one of the `argc` entries, which the
            // start-up code initialised and nothing writes.
            let pointer = unsafe { *slot };
            // SAFETY: each entry points at a NUL-terminated string that
            // lives for the whole process (C11 5.1.2.2.1).
            let arg = unsafe { std::ffi::CStr::from_ptr(pointer) };
            std::ffi::OsStr::from_bytes(arg.to_bytes()).to_owned()
        })
        .collect();
    run(argv);
    0
}

fn run(argv: Vec<OsString>) {
    let args = parse_args(&argv).unwrap_or_else(|err| fail(2, &err));
    let mut options = Options::new(concat!("sandpool-helper ", env!("CARGO_PKG_VERSION")))
        .unwrap_or_else(|err| fail(EXIT_STARTUP_FAILED, &err.to_string()));
    options.program_name = argv.into_iter().next();
    if args.fd_walk {
        options.fd_close = FdCloseStrategy::ProcWalk;
    }
    let test_ops = args.test_ops;
    let handler = move |request: &Request<'_>, out: &mut Vec<u8>| handle(test_ops, request, out);
    let Some(misbehave) = args.misbehave else {
        let Some(init) = args.init else {
            sandpool_helper::serve_main(&options, handler);
        };
        sandpool_helper::serve_main_with_init(
            &options,
            move |declared| run_init(Some(&init), declared),
            handler,
        );
    };
    let session = misbehaving_start(&options, &misbehave)
        .unwrap_or_else(|err| fail(EXIT_STARTUP_FAILED, &err));
    if let Err(err) = misbehaving_loop(session, &misbehave) {
        fail(EXIT_PROTOCOL_ERROR, &err);
    }
}

fn handle(test_ops: bool, request: &Request<'_>, out: &mut Vec<u8>) -> Result<(), HandlerError> {
    let (&op, body) = request
        .payload
        .split_first()
        .ok_or("empty request: no op byte")?;
    if op >= 0x10 && !test_ops {
        return Err(
            format!("test op {op:#04x} refused: helper not launched with --test-ops").into(),
        );
    }
    match op {
        OP_ECHO => out.extend_from_slice(body),
        OP_REDO => redo::apply(body, out)?,
        OP_OPEN => {
            let path = std::str::from_utf8(body)?;
            out.extend_from_slice(&std::fs::read(path)?);
        }
        OP_SOCKET => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            out.extend_from_slice(listener.local_addr()?.to_string().as_bytes());
        }
        OP_SPAWN => {
            // Hostile on purpose: the seccomp policy must stop this.
            #[allow(clippy::disallowed_methods)]
            let status = std::process::Command::new("/bin/true").status()?;
            out.extend_from_slice(status.to_string().as_bytes());
        }
        OP_EXEC => {
            // Hostile on purpose: execve without fork; seccomp must stop it.
            let err = std::os::unix::process::CommandExt::exec(&mut std::process::Command::new(
                "/bin/true",
            ));
            return Err(err.into());
        }
        OP_PTRACE => {
            nix::sys::ptrace::traceme()?;
            out.extend_from_slice(b"traced");
        }
        OP_MMAP_LOCKED => {
            memory_probe(MemoryProbe::MmapLocked)?;
            out.extend_from_slice(b"mapped locked");
        }
        OP_MADVISE_HWPOISON => {
            memory_probe(MemoryProbe::MadviseHwpoison)?;
            out.extend_from_slice(b"poisoned");
        }
        OP_MADVISE_DONTNEED => {
            memory_probe(MemoryProbe::MadviseDontneed)?;
            out.extend_from_slice(body);
        }
        OP_PANIC => panic!("{}", String::from_utf8_lossy(body)),
        OP_FAIL => return Err(String::from_utf8_lossy(body).into_owned().into()),
        OP_SLEEP => {
            let ms: [u8; 4] = body
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or("sleep needs a u32")?;
            std::thread::sleep(Duration::from_millis(u32::from_le_bytes(ms).into()));
            out.extend_from_slice(&body[4..]);
        }
        OP_STDERR => {
            std::io::stderr().write_all(body)?;
            out.extend_from_slice(body);
        }
        OP_SEED => match KEPT_FD.get() {
            Some(mut kept) => {
                use std::io::Read;
                let mut seed = [0u8; 16];
                kept.read_exact(&mut seed)?;
                out.extend_from_slice(&seed);
            }
            None => out.extend_from_slice(SEED.get().ok_or("no --init urandom")?),
        },
        OP_GROW => {
            let mib: [u8; 4] = body
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or("grow needs a u32")?;
            let size = usize::try_from(u32::from_le_bytes(mib))? << 20;
            // Touched page by page, so it is resident, not just reserved;
            // an allocation past the address-space limit aborts here.
            let mut block = vec![0u8; size];
            for page in block.chunks_mut(4096) {
                page[0] = 1;
            }
            let mut kept = KEPT.lock().map_err(|_| "poisoned")?;
            kept.push(block);
            let total: usize = kept.iter().map(Vec::len).sum();
            out.extend_from_slice(&u32::try_from(total >> 20)?.to_le_bytes());
        }
        other => return Err(format!("unknown op {other:#04x}").into()),
    }
    Ok(())
}

/// What the `urandom` init read, for `OP_SEED`.
static SEED: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
/// What the `keep-*` inits keep open (`keep-fd` fails the start-up: it
/// does not declare it).
static KEPT_FD: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// The init hook `--init` asked for: it runs before the sandbox closes.
fn run_init(init: Option<&str>, declared: &mut sandpool_helper::Init) -> Result<(), HandlerError> {
    use std::io::Read;
    let keep = |file: std::fs::File| KEPT_FD.get_or_init(|| file);
    match init {
        Some("urandom") => {
            let mut seed = [0u8; 16];
            std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
            let _ = SEED.set(seed);
        }
        Some("keep-fd") => {
            keep(std::fs::File::open("/dev/null")?);
        }
        Some("keep-urandom") => {
            declared.keep(keep(std::fs::File::open("/dev/urandom")?));
        }
        Some("keep-null-rw") => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?;
            declared.keep(keep(file));
        }
        Some(other) => return Err(format!("unknown init {other:?}").into()),
        None => {}
    }
    Ok(())
}

/// `kept-other-ns`: in a mount namespace of its own (inside a user
/// namespace: its ids read as unmapped there, so the Hello reports the ids
/// it had, which are what `/proc` shows the host), bind-mounts `/dev/zero` over `/dev/urandom`, opens "/dev/urandom"
/// and declares it: the fd's name is the allowed one, the file another.
fn keep_from_own_mount_namespace(declared: &mut sandpool_helper::Init) -> Result<(), HandlerError> {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)
        .map_err(|err| format!("unshare: {err}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    mount(
        Some("/dev/zero"),
        "/dev/urandom",
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )?;
    declared.keep(KEPT_FD.get_or_init(|| {
        std::fs::File::open("/dev/urandom").unwrap_or_else(|err| fail(70, &err.to_string()))
    }));
    // The new namespace gave it every capability in it, the bounding set
    // too: give them up again.
    sandpool_sandbox::drop_bounding_and_ambient()?;
    sandpool_sandbox::clear_capabilities()?;
    Ok(())
}

/// What `OP_GROW` keeps.
static KEPT: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

#[derive(Clone, Copy)]
enum MemoryProbe {
    MmapLocked,
    MadviseHwpoison,
    MadviseDontneed,
}

/// The memory test ops: raw `mmap`/`madvise` calls with the arguments the
/// seccomp policy's argument rules are about. They live here rather than in
/// the sandbox crate because they are hostile probes of the reference
/// binary, not something a helper should be offered as API.
fn memory_probe(probe: MemoryProbe) -> Result<(), HandlerError> {
    use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap_anonymous, munmap};
    let len = std::num::NonZeroUsize::new(64 * 1024).ok_or("zero length")?;
    let mut flags = MapFlags::MAP_PRIVATE;
    if let MemoryProbe::MmapLocked = probe {
        flags |= MapFlags::MAP_LOCKED | MapFlags::MAP_POPULATE;
    }
    // SAFETY: a new anonymous private mapping at an address the kernel
    // picks: it cannot overlap or alias any memory Rust code owns.
    #[allow(unsafe_code)]
    let map = unsafe {
        mmap_anonymous(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            flags,
        )
    }?;
    let advice = match probe {
        MemoryProbe::MmapLocked => None,
        MemoryProbe::MadviseHwpoison => Some(MmapAdvise::MADV_HWPOISON),
        MemoryProbe::MadviseDontneed => Some(MmapAdvise::MADV_DONTNEED),
    };
    if let Some(advice) = advice {
        // SAFETY: `map` is the mapping made just above, `len` bytes, which
        // no reference points into; discarding or poisoning its pages can
        // affect only this mapping.
        #[allow(unsafe_code)]
        unsafe { madvise(map, len.get(), advice) }?;
    }
    // SAFETY: `map`/`len` are exactly the mapping made above, unmapped once;
    // nothing refers to it.
    #[allow(unsafe_code)]
    unsafe { munmap(map, len.get()) }?;
    Ok(())
}

/// Startup for the misbehaviours that attack the Hello itself.
fn misbehaving_start(options: &Options, misbehave: &str) -> Result<Session, String> {
    let text = std::env::var(SPEC_ENV).map_err(|_| format!("{SPEC_ENV} not set"))?;
    let mut spec = SandboxSpec::decode(&text).map_err(|err| err.to_string())?;
    if matches!(misbehave, "skip-seccomp" | "lie-seccomp") {
        spec.seccomp = SeccompMode::Off;
    }
    let mut options = options.clone();
    if misbehave == "keep-caps" {
        // Keeps every capability, then claims to have dropped them all.
        options.drop_capabilities = false;
    }
    if misbehave == "keep-fd" {
        // Allowed only for this mode: it dups stdout after the filter.
        options
            .policy
            .allow_name("dup")
            .map_err(|err| err.to_string())?;
    }
    // The kept-fd lies keep a file open, declared, then misreport it.
    let init = match misbehave {
        "lie-kept-path" => Some("keep-urandom"),
        "lie-kept-access" => Some("keep-null-rw"),
        _ => None,
    };
    let ids = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    let mut sandboxed = sandpool_helper::sandbox_with_init(&options, spec, |declared| {
        match misbehave {
            "thread-in-init" => {
                // A thread the host's view of the fd table does not cover;
                // running (its start-up syscalls done) before the filter.
                let (running, started) = std::sync::mpsc::sync_channel(0);
                std::thread::spawn(move || {
                    let _ = running.send(());
                    loop {
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                });
                started
                    .recv()
                    .map_err(|_| "the init thread did not start")?;
                Ok(())
            }
            "kept-other-ns" => keep_from_own_mount_namespace(declared),
            _ => run_init(init, declared),
        }
    })
    .map_err(|e| e.to_string())?;
    if misbehave == "kept-other-ns" {
        sandboxed.hello.uid = ids.0;
        sandboxed.hello.gid = ids.1;
    }
    for kept in &mut sandboxed.hello.kept_fds {
        match misbehave {
            // Claims the kept fd is another file (one a host may allow).
            "lie-kept-path" => kept.path = b"/dev/zero".to_vec(),
            // Claims a read-write fd is read-only.
            "lie-kept-access" => kept.access = sandpool_protocol::FdAccess::Read,
            _ => {}
        }
    }
    if misbehave == "keep-fd" {
        // Keeps an fd the host never declared (fd 5, a dup of stdout) open
        // past its Hello, which says nothing of it.
        let dups = (0..3)
            .map(|_| nix::unistd::dup(std::io::stdout()).map_err(|err| err.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        for fd in dups {
            if std::os::fd::AsRawFd::as_raw_fd(&fd) == 5 {
                let _kept = std::os::fd::IntoRawFd::into_raw_fd(fd);
            }
        }
    }
    if misbehave == "keep-caps" {
        sandboxed.hello.caps_cleared = true;
        sandboxed.hello.bounding_cleared = true;
    }
    if misbehave == "lie-seccomp" {
        sandboxed.hello.seccomp = SeccompMode::Enforce;
    }
    if misbehave == "stderr-flood" {
        // Says hello, then writes stderr without end and never serves.
        let _session = sandboxed.say_hello().map_err(|err| err.to_string())?;
        let line = b"flooding stderr with no end in sight, flooding stderr with no end in sight\n";
        while std::io::stderr().write_all(line).is_ok() {}
        std::process::exit(0);
    }
    if misbehave == "no-read" {
        // Says hello, then never reads its stdin: the host's writes back up.
        let _session = sandboxed.say_hello().map_err(|err| err.to_string())?;
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    if misbehave == "output-before-bind" {
        // Says hello, then at once writes bytes nobody asked for (a spare
        // that misbehaves before any tenant is bound to it).
        let mut session = sandboxed.say_hello().map_err(|err| err.to_string())?;
        session
            .send_raw(b"unsolicited output from a spare\n")
            .map_err(|e| e.to_string())?;
        return Ok(session);
    }
    if misbehave == "no-hello" {
        // Sandboxed, but never says hello: wait for the host to give up.
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    sandboxed.say_hello().map_err(|err| err.to_string())
}

/// The request loop of a helper that answers wrongly on purpose.
fn misbehaving_loop(mut session: Session, misbehave: &str) -> Result<(), String> {
    loop {
        let (id, payload) = match session.next_frame().map_err(|e| e.to_string())? {
            Incoming::Eof | Incoming::Shutdown => return Ok(()),
            // Answer like echo would: the body after the op byte.
            Incoming::Request { id, payload } => {
                (id, payload.get(1..).unwrap_or_default().to_vec())
            }
        };
        let reply = |kind, id, body: &[u8]| {
            let mut out = Vec::new();
            // The body came in a request, so it fits the frame limit.
            let _ = encode_frame(kind, id, body, MAX_FRAME_CEILING, &mut out);
            out
        };
        let bytes = match misbehave {
            "skip-seccomp" | "lie-seccomp" | "output-before-bind" | "keep-caps" | "keep-fd" => {
                reply(Kind::Response, id, &payload)
            }
            "spin-after-reply" => {
                // Answers, then burns 350 ms of CPU before it reads the
                // next request: idle CPU that a caller calling every
                // 400 ms never sees as a hang.
                session
                    .send_raw(&reply(Kind::Response, id, &payload))
                    .map_err(|e| e.to_string())?;
                let until = std::time::Instant::now() + Duration::from_millis(350);
                while std::time::Instant::now() < until {
                    std::hint::spin_loop();
                }
                continue;
            }
            "spin-when-idle" => {
                // Answers, then burns the CPU with no call owed.
                session
                    .send_raw(&reply(Kind::Response, id, &payload))
                    .map_err(|e| e.to_string())?;
                loop {
                    std::hint::spin_loop();
                }
            }
            "hang" => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            "exit-mid-response" => {
                let whole = reply(Kind::Response, id, &payload);
                session
                    .send_raw(&whole[..HEADER_LEN + whole.len().saturating_sub(HEADER_LEN) / 2])
                    .ok();
                std::process::exit(0);
            }
            "garbage" => b"this is not a sandpool frame at all\n".to_vec(),
            "region-oob" => {
                let at = sandpool_protocol::RegionRef {
                    offset: u64::MAX / 2,
                    len: payload.len() as u64,
                };
                reply(Kind::ResponseInRegion, id, &at.encode())
            }
            "region-scribble" => {
                // A correct reply through the region, then the bytes are
                // changed under the host's feet for a while.
                let start = {
                    let region = session.region().ok_or("no region was passed")?;
                    let start = region.len() as u64 / 2;
                    region.write(start, &payload).map_err(|e| e.to_string())?;
                    start
                };
                let at = sandpool_protocol::RegionRef {
                    offset: start,
                    len: payload.len() as u64,
                };
                session
                    .send_raw(&reply(Kind::ResponseInRegion, id, &at.encode()))
                    .map_err(|e| e.to_string())?;
                let region = session.region().ok_or("no region was passed")?;
                let scribble = vec![0xEE; payload.len()];
                let until = std::time::Instant::now() + Duration::from_millis(200);
                while std::time::Instant::now() < until {
                    region.write(start, &scribble).map_err(|e| e.to_string())?;
                    region.write(start, &payload).map_err(|e| e.to_string())?;
                }
                continue;
            }
            "region-other-window" => {
                // A reply inside the response half, but three quarters of
                // the way into the region: another slot's window when the
                // host cut the region into slots.
                let offset = {
                    let region = session.region().ok_or("no region was passed")?;
                    let offset = region.len() as u64 / 4 * 3;
                    region.write(offset, &payload).map_err(|e| e.to_string())?;
                    offset
                };
                let at = sandpool_protocol::RegionRef {
                    offset,
                    len: payload.len() as u64,
                };
                reply(Kind::ResponseInRegion, id, &at.encode())
            }
            "wrong-id" => reply(Kind::Response, id.wrapping_add(1), &payload),
            "pre-answer" => {
                // Answer properly, then, a moment later, answer the next
                // request before it has been sent, with the best guess at
                // its id there is without the host's key: the next count in
                // the high half, the same low half.
                session
                    .send_raw(&reply(Kind::Response, id, &payload))
                    .map_err(|e| e.to_string())?;
                std::thread::sleep(Duration::from_millis(20));
                reply(Kind::Response, id.wrapping_add(1 << 32), b"forged")
            }
            "answer-twice" => {
                let mut twice = reply(Kind::Response, id, &payload);
                twice.extend_from_slice(&reply(Kind::Response, id, &payload));
                twice
            }
            name => {
                let case_name = name.strip_prefix("corpus:").unwrap_or(name);
                let mut bytes = corpus::case(case_name)
                    .ok_or_else(|| format!("no corpus case {case_name:?}"))?
                    .bytes;
                // The corpus's request id 1 stands for the id of the request
                // being answered.
                if bytes.get(4..12) == Some(&1u64.to_le_bytes()[..]) {
                    bytes[4..12].copy_from_slice(&id.to_le_bytes());
                }
                bytes
            }
        };
        session.send_raw(&bytes).map_err(|e| e.to_string())?;
    }
}
