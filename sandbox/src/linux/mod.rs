//! The Linux implementation.

mod alloc;
mod bpf;
mod fds;
mod limits;
mod privs;
mod region;
mod seccomp;
mod status;
mod stdio;

pub use alloc::{HelperAllocator, MMAP_THRESHOLD};
pub use fds::{
    CloseFdsError, DescribeFdError, FdCloseReport, FdCloseStrategy, close_inherited_fds,
    close_inherited_fds_with, count_open_fds_above_stdio, describe_fd,
};
pub use limits::{NoNewPrivsError, RlimitError, apply_rlimits, set_no_new_privs, set_process_name};
pub use privs::{
    BoundingReport, CapabilityError, SwitchUserError, clear_capabilities, current_gid, current_uid,
    drop_bounding_and_ambient, drop_bounding_and_ambient_with, switch_user,
};
pub use region::{REGION_FD, RegionError, SharedRegion};
pub use seccomp::{
    Filter, InstallError, MADVISE_ALLOWED, MMAP_REFUSED_FLAGS, PolicyError, SeccompPolicy,
};
pub use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
pub use status::ProcStatus;
pub use stdio::{StdioError, StdioPipe, take_protocol_stdio};
pub use syscalls::Sysno;
