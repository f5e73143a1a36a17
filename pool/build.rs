//! Builds the launcher process (`launcher/launcher.c`, a small C program)
//! into `OUT_DIR`; the library embeds it (`include_bytes!`) and execs it
//! from a sealed memfd, so nothing extra is installed or shipped. C because
//! the launcher is little more than `clone`, `execve` and `sendmsg` with
//! SCM_RIGHTS, and it needs no Rust runtime; the C compiler is the one
//! cargo already links Rust with (found by the `cc` crate, which honours
//! `CC`, `CFLAGS` and cross-compiling targets).

use std::path::PathBuf;

#[allow(clippy::disallowed_methods)] // runs the C compiler, not a helper
fn main() {
    let source = "launcher/launcher.c";
    println!("cargo:rerun-if-changed={source}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("sandpool-launcher");
    let compiler = cc::Build::new()
        .opt_level(2)
        .warnings(true)
        .extra_warnings(true)
        .get_compiler();
    let mut command = compiler.to_command();
    command
        .args(["-std=gnu11", "-pthread", "-o"])
        .arg(&out)
        .arg(source);
    let status = command
        .status()
        .unwrap_or_else(|err| panic!("running the C compiler ({command:?}) failed: {err}"));
    assert!(
        status.success(),
        "building the sandpool launcher ({command:?}) failed: {status}"
    );
}
