//! The wire protocol between a sandpool host and its helpers.
//!
//! Pure data: no OS calls and no unsafe code, so both sides (and fuzzers) can
//! use it anywhere. Everything a peer sends is bounded and validated here
//! before the receiver allocates for it or acts on it:
//!
//! - [`frame`]: the 16-byte header, [`encode_frame`] and [`decode_frame`].
//! - [`hello`]: the [`Hello`] proof of the helper's startup sequence and the
//!   [`decode_bind`] tenant label.
//! - [`spec`]: the [`SandboxSpec`] a host hands a helper at launch.
//! - [`corpus`]: valid and invalid frames that both sides' tests replay.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod corpus;
pub mod frame;
pub mod hello;
pub mod region;
pub mod spec;

pub use frame::{
    DEFAULT_MAX_FRAME, DecodeError, Direction, EncodeError, HEADER_LEN, Header, Kind, MAGIC,
    MAX_ERROR_MESSAGE, MAX_FRAME_CEILING, MIN_FRAME_LIMIT, SMALL_FRAME, SmallFrame, VERSION,
    decode_frame, encode_frame,
};
pub use hello::{
    FdAccess, FdCloseMethod, Hello, KeptFd, MAX_BUILD_ID, MAX_HELLO_LEN, MAX_KEPT_FDS,
    MAX_KEPT_PATH, MAX_TENANT_LEN, PayloadError, SeccompMode, decode_bind,
};
pub use region::{REGION_REF_LEN, REGION_REQUEST_LEN, RegionError, RegionRef, RegionRequest};
pub use spec::{PROGRAM_ENV, RESERVED_ENV_PREFIX, RlimitSpec, SPEC_ENV, SandboxSpec, SpecError};
