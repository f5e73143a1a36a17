// `include!`d by the test and bench crates' build scripts (after
// build_helper.rs, whose `build_static_helpers` builds the C runtime's
// static library): compiles C programs with the `cc` crate's compiler, a C
// helper against that library among them.

/// The system libraries the static library needs, as
/// `cargo rustc -p sandpool-helper-capi --release -- --print native-static-libs`
/// lists them for a `+crt-static` build (gcc's `-static` adds libgcc,
/// libgcc_eh and libc itself).
#[allow(dead_code)]
const CAPI_NATIVE_LIBS: &[&str] = &["-lutil", "-lrt", "-lpthread", "-lm", "-ldl"];

/// Compiles the C program `source` with the `cc` crate's compiler (the one
/// cargo links Rust with; -O2, warnings on) into `OUT_DIR/<name>`, with
/// `flags` before the source and `libs` after it; returns its path.
#[allow(dead_code)]
#[allow(clippy::disallowed_methods)] // runs the C compiler, not a helper
fn compile_c(
    source: &std::path::Path,
    name: &str,
    flags: &[&std::ffi::OsStr],
    libs: &[&std::ffi::OsStr],
) -> std::path::PathBuf {
    println!("cargo:rerun-if-changed={}", source.display());
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join(name);
    let compiler = cc::Build::new()
        .opt_level(2)
        .warnings(true)
        .extra_warnings(true)
        .get_compiler();
    let mut command = compiler.to_command();
    command.args(flags).arg("-o").arg(&out).arg(source).args(libs);
    let status = command
        .status()
        .unwrap_or_else(|err| panic!("running the C compiler ({command:?}) failed: {err}"));
    assert!(status.success(), "building {} ({command:?}) failed: {status}", source.display());
    out
}

/// Compiles the C helper `source` (C99) and links it statically against the
/// static library in `lib_dir` into `OUT_DIR/<name>`; returns its path.
#[allow(dead_code)]
fn build_c_helper(source: &std::path::Path, lib_dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    use std::ffi::OsStr;

    let manifest_dir = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("member crates live one level below the workspace root").to_path_buf();
    let include = root.join("helper/capi/include");
    let mut libs = vec![OsStr::new("-L"), lib_dir.as_os_str(), OsStr::new("-lsandpool_helper_capi")];
    libs.extend(CAPI_NATIVE_LIBS.iter().map(OsStr::new));
    compile_c(
        source,
        name,
        &[OsStr::new("-std=c99"), OsStr::new("-static"), OsStr::new("-I"), include.as_os_str()],
        &libs,
    )
}
