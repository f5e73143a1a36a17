//! The downstream server's helper: answers `GREETING TENANT: REQUEST`, with
//! `GREETING` from the environment the host configured (`[env]`), and `path`
//! with its own path as the host told it (`SANDPOOL_PROGRAM`).

use sandpool_helper::{HandlerError, Options, program_path, serve_main};

fn main() {
    let options = match Options::new(concat!("downstream-helper ", env!("CARGO_PKG_VERSION"))) {
        Ok(options) => options,
        Err(err) => {
            eprintln!("downstream-helper: {err}");
            std::process::exit(sandpool_helper::EXIT_STARTUP_FAILED);
        }
    };
    let greeting = std::env::var("GREETING").unwrap_or_default();
    let path = program_path().map(|path| path.display().to_string());
    serve_main(&options, move |request, out| {
        if request.payload == b"path" {
            let path = path
                .as_deref()
                .ok_or_else(|| HandlerError::from("SANDPOOL_PROGRAM is not set"))?;
            out.extend_from_slice(path.as_bytes());
            return Ok(());
        }
        out.extend_from_slice(greeting.as_bytes());
        out.push(b' ');
        out.extend_from_slice(request.tenant.unwrap_or(b"?"));
        out.extend_from_slice(b": ");
        out.extend_from_slice(request.payload);
        Ok(())
    })
}
