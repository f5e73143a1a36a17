//! Builds the reference helper three times, dynamically linked, statically
//! on glibc and statically on musl (the one the tests use), so the
//! benchmarks can launch them side by side; and the launch floor, a tiny
//! static C program (`floor/first_byte.c`).

include!("../helper/build_helper.rs");
include!("../helper/capi/build_capi.rs");

fn main() {
    let dynamic = build_reference_helper_dynamic();
    // The same nested cargos as the test crate's build script (so both get
    // the same files, built with the same features): the static reference
    // helpers and the C runtime come from them.
    let built = build_static_helpers();
    println!("cargo:rustc-env=SANDPOOL_HELPER_BIN={}", dynamic.display());
    println!(
        "cargo:rustc-env=SANDPOOL_HELPER_STATIC_BIN={}",
        built.reference.display()
    );
    println!(
        "cargo:rustc-env=SANDPOOL_HELPER_GLIBC_STATIC_BIN={}",
        built.reference_glibc.display()
    );

    let out = compile_c(
        std::path::Path::new("floor/first_byte.c"),
        "first-byte",
        &[std::ffi::OsStr::new("-static")],
        &[],
    );
    println!("cargo:rustc-env=SANDPOOL_FLOOR_BIN={}", out.display());
    if let Some(musl) = built.musl.as_ref().map(floor_on_musl) {
        println!("cargo:rustc-env=SANDPOOL_FLOOR_MUSL_BIN={}", musl.display());
    }

    // The C reference helper, on the C runtime, beside the Rust one.
    let c_bin = build_c_helper(
        std::path::Path::new("../tests/c/reference_helper.c"),
        &built.capi_lib_dir,
        "sandpool-c-helper",
    );
    println!("cargo:rustc-env=SANDPOOL_C_HELPER_BIN={}", c_bin.display());
}

/// The floor program linked statically against musl, with the C start-up
/// files and libc of the Rust toolchain's musl target (its `self-contained`
/// directory; no musl-gcc needed): the same program without glibc's
/// start-up.
fn floor_on_musl(musl: &MuslTarget) -> std::path::PathBuf {
    use std::ffi::OsStr;

    let dir = musl.libdir.join("self-contained");
    let file = |name: &str| dir.join(name).into_os_string();
    let (crt1, crti, crtbegin) = (file("crt1.o"), file("crti.o"), file("crtbegin.o"));
    let (libc, crtend, crtn) = (file("libc.a"), file("crtend.o"), file("crtn.o"));
    compile_c(
        std::path::Path::new("floor/first_byte.c"),
        "first-byte-musl",
        &[
            // glibc's headers, musl's library: nothing that would call a
            // glibc-only symbol (__read_chk, __stack_chk_fail's guard).
            OsStr::new("-U_FORTIFY_SOURCE"),
            OsStr::new("-fno-stack-protector"),
            OsStr::new("-static"),
            OsStr::new("-nostdlib"),
            OsStr::new("-nostartfiles"),
            &crt1,
            &crti,
            &crtbegin,
        ],
        &[&libc, &crtend, &crtn],
    )
}
