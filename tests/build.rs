//! Builds the reference helper binary (release profile, its own target dir so
//! the nested cargo never waits on the outer build's lock) and tells the test
//! crate where it is through `SANDPOOL_HELPER_BIN`. A fresh clone's
//! `cargo test` needs no manual step.
//!
//! The helper is linked statically (`+crt-static`, glibc's own static libs,
//! no extra toolchain): it launches about 1.4x faster than the dynamic build
//! (`cargo bench -p sandpool-benches --bench foundation` measures both).

include!("../helper/build_helper.rs");

fn main() {
    let bin = build_reference_helper(true);
    println!("cargo:rustc-env=SANDPOOL_HELPER_BIN={}", bin.display());
}
