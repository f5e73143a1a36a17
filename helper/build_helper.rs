// Shared by the build scripts of the test and bench crates (`include!`d):
// builds the helper binaries with a nested `cargo build`.

/// How a nested build links its binaries.
#[allow(dead_code)]
#[derive(Clone, Copy, PartialEq, Eq)]
enum HelperLink<'a> {
    /// The host's target, dynamically linked against glibc.
    Dynamic,
    /// The host's target with `+crt-static`: linked statically against
    /// glibc's own static libraries.
    StaticGlibc,
    /// The host's architecture on musl (`x86_64-unknown-linux-musl` on
    /// x86-64; the triple), static-pie, musl's own libc from the Rust
    /// toolchain.
    Musl(&'a str),
}

/// The toolchain's musl target, from [`musl_target`].
#[allow(dead_code)]
#[derive(Clone, Debug)]
struct MuslTarget {
    /// Its triple, e.g. `x86_64-unknown-linux-musl`.
    triple: String,
    /// Its library directory (`rustc --print target-libdir`), whose
    /// `self-contained` holds musl's C start-up files and libc.
    libdir: std::path::PathBuf,
}

/// The musl triple of the host's architecture (`TARGET` with `gnu` made
/// `musl`), when the toolchain has that target's standard library:
/// `rust-toolchain.toml` lists it (rustup adds it when it installs the
/// toolchain) and `.ci/run` adds it (`rustup target add`); a toolchain
/// without it gets `None`.
#[allow(dead_code)]
#[allow(clippy::disallowed_methods)] // runs rustc, not a helper
fn musl_target() -> Option<MuslTarget> {
    let host = std::env::var("TARGET").ok()?;
    let musl = host.strip_suffix("-linux-gnu")?.to_owned() + "-linux-musl";
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    // Re-run when a target is added to the toolchain (rustup rewrites this
    // list), so a musl target installed later replaces the glibc stand-in.
    if let Ok(out) = std::process::Command::new(&rustc).args(["--print", "sysroot"]).output()
        && let Ok(sysroot) = String::from_utf8(out.stdout)
    {
        let components = std::path::Path::new(sysroot.trim()).join("lib/rustlib/components");
        println!("cargo:rerun-if-changed={}", components.display());
    }
    let out = std::process::Command::new(rustc)
        .args(["--print", "target-libdir", "--target", &musl])
        .output()
        .ok()?;
    let libdir = std::path::PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    let has_std = std::fs::read_dir(&libdir)
        .ok()?
        .filter_map(Result::ok)
        .any(|entry| entry.file_name().to_string_lossy().starts_with("libstd-"));
    has_std.then_some(MuslTarget {
        triple: musl,
        libdir,
    })
}

/// Starts one nested `cargo build` of `targets` (package and target
/// selections) with the workspace's `helper` profile (release with fat LTO
/// and one codegen unit), in a target directory of its own so it never waits
/// on the outer build's lock: `<target>/helper`, `<target>/helper-static`
/// or `<target>/helper-musl` by `link`. Returns the running cargo and the
/// directory the outputs land in. Re-runs when the helpers' sources change.
#[allow(dead_code)]
#[allow(clippy::disallowed_methods)] // runs cargo, not a helper
fn helper_cargo_start(
    link: HelperLink<'_>,
    targets: &[&str],
) -> (std::process::Child, std::path::PathBuf) {
    use std::path::PathBuf;
    use std::process::Command;

    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("member crates live one level below the workspace root").to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join(match link {
            HelperLink::Dynamic => "helper",
            HelperLink::StaticGlibc => "helper-static",
            HelperLink::Musl(_) => "helper-musl",
        });
    // `helper` holds the runtime and every package built here (the
    // reference and SQL helpers, the C runtime).
    for path in ["Cargo.toml", "Cargo.lock", "rust-toolchain.toml", "protocol", "sandbox", "helper"] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&root)
        .args(["build", "--profile", "helper", "--target-dir"])
        .arg(&target)
        .args(targets);
    let out_dir = match link {
        HelperLink::Dynamic => {
            command.env_remove("RUSTFLAGS");
            target.join("helper")
        }
        HelperLink::StaticGlibc => {
            // With an explicit --target, RUSTFLAGS reach only the target
            // crates, not build scripts or proc macros (which cannot be
            // static).
            let triple = std::env::var("TARGET").expect("cargo sets TARGET for build scripts");
            command.args(["--target", &triple]);
            command.env("RUSTFLAGS", "-C target-feature=+crt-static");
            target.join(&triple).join("helper")
        }
        HelperLink::Musl(triple) => {
            // Static (static-pie) by the target's default.
            command.args(["--target", triple]);
            command.env_remove("RUSTFLAGS");
            target.join(triple).join("helper")
        }
    };
    let child = command
        // Flags meant for the outer build (coverage, sanitizers, -D warnings
        // from clippy) must not leak into the helpers' build.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env_remove("CARGO_TARGET_DIR")
        .spawn()
        .expect("running cargo to build the helpers");
    (child, out_dir)
}

/// Waits for a nested build started by [`helper_cargo_start`].
#[allow(dead_code)]
fn helper_cargo_wait(mut child: std::process::Child, targets: &[&str]) {
    let status = child.wait().expect("waiting for cargo building the helpers");
    assert!(status.success(), "building {targets:?} failed: {status}");
}

/// Runs one nested `cargo build` (see [`helper_cargo_start`]) to the end.
#[allow(dead_code)]
fn helper_cargo(link: HelperLink<'_>, targets: &[&str]) -> std::path::PathBuf {
    let (child, out_dir) = helper_cargo_start(link, targets);
    helper_cargo_wait(child, targets);
    out_dir
}

/// The reference helper binary `sandpool-helper` (package
/// `sandpool-reference-helper`, `helper/reference`), dynamically linked,
/// for the benchmarks that compare it with the static one; returns its path.
#[allow(dead_code)]
fn build_reference_helper_dynamic() -> std::path::PathBuf {
    helper_cargo(
        HelperLink::Dynamic,
        &["--package", "sandpool-reference-helper", "--bin", "sandpool-helper"],
    )
    .join("sandpool-helper")
}

/// The static helper binaries and the C runtime's library, from
/// [`build_static_helpers`].
#[allow(dead_code)]
struct StaticHelpers {
    /// The reference helper, `sandpool-helper`: built on musl where the
    /// toolchain has the target, else the glibc one below.
    reference: std::path::PathBuf,
    /// The reference helper linked statically against glibc.
    reference_glibc: std::path::PathBuf,
    /// The SQL helper, `sandpool-sql-helper` (glibc: SQLite's C is compiled
    /// with the host's C compiler).
    sql: std::path::PathBuf,
    /// The directory holding `libsandpool_helper_capi.a` (glibc, for C
    /// helpers linked with the host's C compiler).
    capi_lib_dir: std::path::PathBuf,
    /// The toolchain's musl target, if it has one.
    musl: Option<MuslTarget>,
}

/// Builds the static helpers with two nested cargos at once: the reference
/// helper on musl (`<target>/helper-musl`), and in ONE glibc build
/// (`+crt-static`, `<target>/helper-static`) the reference helper again,
/// the static SQL helper and the C runtime's static library (cargo then
/// compiles SQLite's C and the Rust crates side by side and runs the fat-LTO
/// links at once; builds one after the other left a core idle through each
/// single-threaded link). `libsandpool_helper_capi.a` is built
/// `+crt-static` so the Rust standard library in it unwinds with libgcc_eh,
/// which a `-static` link has.
///
/// Why musl for the reference helper: glibc's start-up in a static binary
/// probes the CPU with CPUID (its cache sizes, for `memcpy`), and on a
/// virtual machine each CPUID traps to the hypervisor. Measured here,
/// launched through a pool, interleaved: on glibc 0.88-0.96 ms, on musl
/// (with dlmalloc in place of musl's malloc, see its `main.rs`)
/// 0.55-0.61 ms. Without the musl target the reference helper is the glibc
/// one, with a warning.
#[allow(dead_code)]
fn build_static_helpers() -> StaticHelpers {
    let glibc_targets = [
        "--package", "sandpool-reference-helper", "--bin", "sandpool-helper",
        "--package", "sandpool-sql-helper", "--bin", "sandpool-sql-helper",
        "--package", "sandpool-helper-capi", "--lib",
    ];
    let musl_targets = ["--package", "sandpool-reference-helper", "--bin", "sandpool-helper"];
    let musl = musl_target();
    let musl_build = musl
        .as_ref()
        .map(|target| helper_cargo_start(HelperLink::Musl(&target.triple), &musl_targets));
    let glibc_dir = helper_cargo(HelperLink::StaticGlibc, &glibc_targets);
    let reference_glibc = glibc_dir.join("sandpool-helper");
    let reference = match musl_build {
        Some((child, musl_dir)) => {
            helper_cargo_wait(child, &musl_targets);
            musl_dir.join("sandpool-helper")
        }
        None => {
            println!(
                "cargo:warning=the toolchain has no musl target: the reference helper is linked against glibc (rust-toolchain.toml lists the target; `rustup target add` installs it)"
            );
            reference_glibc.clone()
        }
    };
    StaticHelpers {
        reference,
        reference_glibc,
        sql: glibc_dir.join("sandpool-sql-helper"),
        capi_lib_dir: glibc_dir,
        musl,
    }
}
