//! Builds the reference helper twice, dynamically and statically linked, so
//! the benchmarks can launch both side by side; and the launch floor, a
//! tiny static C program (`floor/first_byte.c`).

include!("../helper/build_helper.rs");
include!("../helper/capi/build_capi.rs");

#[allow(clippy::disallowed_methods)] // runs the C compiler, not a helper
fn main() {
    let dynamic = build_reference_helper(false);
    // The same one nested cargo as the test crate's build script (so both
    // get the same files, built with the same features): the static
    // reference helper and the C runtime come from it.
    let built = build_static_helpers();
    let static_ = built.reference;
    println!("cargo:rustc-env=SANDPOOL_HELPER_BIN={}", dynamic.display());
    println!(
        "cargo:rustc-env=SANDPOOL_HELPER_STATIC_BIN={}",
        static_.display()
    );

    let source = "floor/first_byte.c";
    println!("cargo:rerun-if-changed={source}");
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("first-byte");
    let mut command = cc::Build::new().opt_level(2).get_compiler().to_command();
    command.args(["-static", "-o"]).arg(&out).arg(source);
    let status = command.status().expect("running the C compiler");
    assert!(
        status.success(),
        "building {source} ({command:?}) failed: {status}"
    );
    println!("cargo:rustc-env=SANDPOOL_FLOOR_BIN={}", out.display());

    // The C reference helper, on the C runtime, beside the Rust one.
    let c_bin = build_c_helper(
        std::path::Path::new("../tests/c/reference_helper.c"),
        &built.capi_lib_dir,
        "sandpool-c-helper",
    );
    println!("cargo:rustc-env=SANDPOOL_C_HELPER_BIN={}", c_bin.display());
}
