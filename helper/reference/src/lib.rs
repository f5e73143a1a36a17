//! The reference sandpool helper's request format, shared by the binary
//! (`sandpool-helper`, `src/main.rs`) and the hosts that call it (the tests,
//! benchmarks and demo): the op codes and request builders
//! ([`mod@reference`]), and the page-redo workload ([`redo`]), so a host can
//! check responses against the same computation.
//!
//! Test fixtures of the workspace, not published: a helper of your own
//! needs only the runtime, `sandpool-helper`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod redo;
pub mod reference;
