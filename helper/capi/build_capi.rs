// `include!`d by the test crate's build script (after build_helper.rs):
// builds the C runtime's static library with a nested cargo, then a C
// helper against it with the `cc` crate's compiler.

/// The system libraries the static library needs, as
/// `cargo rustc -p sandpool-helper-capi --release -- --print native-static-libs`
/// lists them for a `+crt-static` build (gcc's `-static` adds libgcc,
/// libgcc_eh and libc itself).
#[allow(dead_code)]
const CAPI_NATIVE_LIBS: &[&str] = &["-lutil", "-lrt", "-lpthread", "-lm", "-ldl"];

/// Builds `libsandpool_helper_capi.a` (the `helper` profile, `+crt-static` so the Rust
/// standard library in it unwinds with libgcc_eh, which a `-static` link
/// has) into `<target>/helper-static`, the static reference helper's
/// target directory: same profile, same flags, so the two share every
/// compiled dependency; the builds run one after the other in this script.
/// Returns the directory holding the library.
#[allow(dead_code)]
#[allow(clippy::disallowed_methods)] // runs cargo, not a helper
fn build_capi_staticlib() -> std::path::PathBuf {
    use std::path::PathBuf;
    use std::process::Command;

    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("member crates live one level below the workspace root").to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("helper-static");
    for path in ["Cargo.toml", "Cargo.lock", "protocol", "sandbox", "helper"] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let triple = std::env::var("TARGET").expect("cargo sets TARGET for build scripts");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args(["build", "--profile", "helper", "--package", "sandpool-helper-capi", "--lib", "--target", &triple, "--target-dir"])
        .arg(&target)
        // With an explicit --target, RUSTFLAGS reach only the target crates.
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .expect("running cargo to build sandpool-helper-capi");
    assert!(status.success(), "building sandpool-helper-capi failed: {status}");
    target.join(&triple).join("helper")
}

/// Compiles the C helper `source` (C99) and links it statically against the
/// static library in `lib_dir` into `OUT_DIR/<name>`; returns its path.
#[allow(dead_code)]
#[allow(clippy::disallowed_methods)] // runs the C compiler, not a helper
fn build_c_helper(source: &std::path::Path, lib_dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    use std::path::PathBuf;

    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("member crates live one level below the workspace root").to_path_buf();
    println!("cargo:rerun-if-changed={}", source.display());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join(name);
    let compiler = cc::Build::new()
        .opt_level(2)
        .warnings(true)
        .extra_warnings(true)
        .get_compiler();
    let mut command = compiler.to_command();
    command
        .args(["-std=c99", "-static", "-I"])
        .arg(root.join("helper/capi/include"))
        .arg("-o")
        .arg(&out)
        .arg(source)
        .arg("-L")
        .arg(lib_dir)
        .arg("-lsandpool_helper_capi")
        .args(CAPI_NATIVE_LIBS);
    let status = command
        .status()
        .unwrap_or_else(|err| panic!("running the C compiler ({command:?}) failed: {err}"));
    assert!(status.success(), "building the C helper ({command:?}) failed: {status}");
    out
}
