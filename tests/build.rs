//! Builds the reference helper binary (the `helper` profile, its own target dir so
//! the nested cargo never waits on the outer build's lock) and tells the test
//! crate where it is through `SANDPOOL_HELPER_BIN`. A fresh clone's
//! `cargo test` needs no manual step.
//!
//! The helper is linked statically, on musl (the target `rust-toolchain.toml`
//! lists; glibc's own static libs, `+crt-static`, without it): statically it
//! launches about 1.4x faster than the dynamic build, and on musl it skips
//! glibc's CPUID probing at start-up, which traps to the hypervisor on a
//! virtual machine (`cargo bench -p sandpool-benches --bench foundation` and
//! `compare` measure them).

//!
//! The C reference helper (`c/reference_helper.c`) is built the same way
//! around: the C runtime's static library (`helper/capi`) with a nested
//! cargo, then the C file with the `cc` crate's compiler (the one cargo
//! links Rust with), linked `-static`; its path is `SANDPOOL_C_HELPER_BIN`.
//!
//! The SQL helper (`helper/sql`, SQLite inside) is built like the reference
//! helper, statically; its path is `SANDPOOL_SQL_HELPER_BIN`.

include!("../helper/build_helper.rs");
include!("../helper/capi/build_capi.rs");

fn main() {
    // Two nested cargos at once for the four: see `build_static_helpers`.
    let built = build_static_helpers();
    println!(
        "cargo:rustc-env=SANDPOOL_HELPER_BIN={}",
        built.reference.display()
    );
    println!(
        "cargo:rustc-env=SANDPOOL_SQL_HELPER_BIN={}",
        built.sql.display()
    );
    let source = std::path::Path::new("c/reference_helper.c");
    let c_bin = build_c_helper(source, &built.capi_lib_dir, "sandpool-c-helper");
    println!("cargo:rustc-env=SANDPOOL_C_HELPER_BIN={}", c_bin.display());
    capbset_filter();
}

/// `c/capbset_filter.c`, a wrapper that execs the helper under a seccomp
/// filter in the way of its bounding-set drop; its path is
/// `SANDPOOL_CAPBSET_FILTER_BIN`.
fn capbset_filter() {
    let out = compile_c(
        std::path::Path::new("c/capbset_filter.c"),
        "capbset-filter",
        &[std::ffi::OsStr::new("-std=c99")],
        &[],
    );
    println!(
        "cargo:rustc-env=SANDPOOL_CAPBSET_FILTER_BIN={}",
        out.display()
    );
}
