//! Builds the reference helper binary (release profile, its own target dir so
//! the nested cargo never waits on the outer build's lock) and tells the test
//! crate where it is through `SANDPOOL_HELPER_BIN`. A fresh clone's
//! `cargo test` needs no manual step.

include!("../helper/build_helper.rs");

fn main() {
    let bin = build_reference_helper(false);
    println!("cargo:rustc-env=SANDPOOL_HELPER_BIN={}", bin.display());
}
