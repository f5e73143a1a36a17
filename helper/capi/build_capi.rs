// `include!`d by the test and bench crates' build scripts (after
// build_helper.rs, whose `build_static_helpers` builds the C runtime's
// static library): builds a C helper against it with the `cc` crate's
// compiler.

/// The system libraries the static library needs, as
/// `cargo rustc -p sandpool-helper-capi --release -- --print native-static-libs`
/// lists them for a `+crt-static` build (gcc's `-static` adds libgcc,
/// libgcc_eh and libc itself).
#[allow(dead_code)]
const CAPI_NATIVE_LIBS: &[&str] = &["-lutil", "-lrt", "-lpthread", "-lm", "-ldl"];

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
