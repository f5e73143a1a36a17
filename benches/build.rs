//! Builds the reference helper twice, dynamically and statically linked, so
//! the benchmarks can launch both side by side; and the launch floor, a
//! tiny static C program (`floor/first_byte.c`).

include!("../helper/build_helper.rs");
include!("../helper/capi/build_capi.rs");

fn main() {
    let dynamic = build_reference_helper_dynamic();
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

    let out = compile_c(
        std::path::Path::new("floor/first_byte.c"),
        "first-byte",
        &[std::ffi::OsStr::new("-static")],
        &[],
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
