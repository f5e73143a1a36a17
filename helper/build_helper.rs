// Shared by the build scripts of the test and bench crates (`include!`d):
// builds the helper binaries with a nested `cargo build`.

/// Runs one nested `cargo build` of `targets` (package and target
/// selections) with the workspace's `helper` profile (release with fat LTO
/// and one codegen unit), in a target directory of its own so it never waits
/// on the outer build's lock: `<target>/helper`, or with `static_crt`
/// (`+crt-static`: linked statically against glibc's own static libraries)
/// `<target>/helper-static`. Returns the directory the outputs land in.
/// Re-runs when the helpers' sources change.
#[allow(dead_code)]
#[allow(clippy::disallowed_methods)] // runs cargo, not a helper
fn helper_cargo(static_crt: bool, targets: &[&str]) -> std::path::PathBuf {
    use std::path::PathBuf;
    use std::process::Command;

    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("member crates live one level below the workspace root").to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join(if static_crt { "helper-static" } else { "helper" });
    // `helper` holds the runtime and every package built here (the
    // reference and SQL helpers, the C runtime).
    for path in ["Cargo.toml", "Cargo.lock", "protocol", "sandbox", "helper"] {
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
    let mut out_dir = target.join("helper");
    if static_crt {
        // With an explicit --target, RUSTFLAGS reach only the target crates,
        // not build scripts or proc macros (which cannot be static).
        let triple = std::env::var("TARGET").expect("cargo sets TARGET for build scripts");
        command.args(["--target", &triple]);
        command.env("RUSTFLAGS", "-C target-feature=+crt-static");
        out_dir = target.join(&triple).join("helper");
    } else {
        command.env_remove("RUSTFLAGS");
    }
    let status = command
        // Flags meant for the outer build (coverage, sanitizers, -D warnings
        // from clippy) must not leak into the helpers' build.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .expect("running cargo to build the helpers");
    assert!(status.success(), "building {targets:?} failed: {status}");
    out_dir
}

/// The reference helper binary `sandpool-helper` (package
/// `sandpool-reference-helper`, `helper/reference`), dynamically linked,
/// for the benchmarks that compare it with the static one; returns its path.
#[allow(dead_code)]
fn build_reference_helper_dynamic() -> std::path::PathBuf {
    helper_cargo(
        false,
        &["--package", "sandpool-reference-helper", "--bin", "sandpool-helper"],
    )
    .join("sandpool-helper")
}

/// The static helper binaries and the C runtime's library, from
/// [`build_static_helpers`].
#[allow(dead_code)]
struct StaticHelpers {
    /// The reference helper, `sandpool-helper`.
    reference: std::path::PathBuf,
    /// The SQL helper, `sandpool-sql-helper`.
    sql: std::path::PathBuf,
    /// The directory holding `libsandpool_helper_capi.a`.
    capi_lib_dir: std::path::PathBuf,
}

/// Builds the static reference helper, the static SQL helper and the C
/// runtime's static library in ONE nested cargo (`+crt-static`,
/// `<target>/helper-static`): cargo then compiles SQLite's C and the Rust
/// crates side by side and runs the three fat-LTO links at once, where three
/// cargo runs one after the other left a core idle through each
/// single-threaded link. `libsandpool_helper_capi.a` is built `+crt-static`
/// so the Rust standard library in it unwinds with libgcc_eh, which a
/// `-static` link has.
#[allow(dead_code)]
fn build_static_helpers() -> StaticHelpers {
    let out_dir = helper_cargo(
        true,
        &[
            "--package", "sandpool-reference-helper", "--bin", "sandpool-helper",
            "--package", "sandpool-sql-helper", "--bin", "sandpool-sql-helper",
            "--package", "sandpool-helper-capi", "--lib",
        ],
    );
    StaticHelpers {
        reference: out_dir.join("sandpool-helper"),
        sql: out_dir.join("sandpool-sql-helper"),
        capi_lib_dir: out_dir,
    }
}
