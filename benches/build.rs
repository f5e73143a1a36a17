//! Builds the reference helper twice, dynamically and statically linked, so
//! the benchmarks can launch both side by side.

include!("../helper/build_helper.rs");

fn main() {
    let dynamic = build_reference_helper(false);
    let static_ = build_reference_helper(true);
    println!("cargo:rustc-env=SANDPOOL_HELPER_BIN={}", dynamic.display());
    println!(
        "cargo:rustc-env=SANDPOOL_HELPER_STATIC_BIN={}",
        static_.display()
    );
}
