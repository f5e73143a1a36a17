//! What the kernel says of this process in `/proc/self/status`: the
//! fd table's size for the fd count, and the bounding and ambient
//! capability sets for the capability steps (so that a helper whose sets
//! are empty already makes no capability syscall). No reading is kept:
//! the capability sets can grow (entering a new user namespace gives a
//! process every capability in it, the bounding set too), so a reading
//! stands only for as long as its caller knows nothing changed.

/// A reading of the fields of `/proc/self/status` the start-up uses,
/// taken at one moment ([`ProcStatus::read`]). The helper runtime takes
/// one just before [`close_inherited_fds_with`](crate::close_inherited_fds_with)
/// and hands the same one to
/// [`drop_bounding_and_ambient_with`](crate::drop_bounding_and_ambient_with):
/// closing fds and naming the process change no capability set, and the
/// fd table does not shrink, so one reading serves both (each read
/// formats the whole file in the kernel: about 10 us of a launch here).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcStatus {
    /// `FDSize:`, the size of the fd table.
    pub(crate) fd_size: Option<u64>,
    /// `CapBnd:`, the bounding set, as a mask of capability numbers.
    pub(crate) cap_bnd: Option<u64>,
    /// `CapAmb:`, the ambient set.
    pub(crate) cap_amb: Option<u64>,
}

impl ProcStatus {
    /// Reads `/proc/self/status` now; a field that cannot be read is
    /// unknown (and every step that uses it then does what it would do
    /// without it: counts up to the fd limit, drops every capability).
    pub fn read() -> ProcStatus {
        read_now().unwrap_or_default()
    }
}

/// One read of the file into a stack buffer: the fields used are among
/// its first lines, so the first 4 KiB hold them, in one or two reads
/// (`read_to_string` would stat the file and grow its buffer from 32
/// bytes: eight reads).
fn read_now() -> Option<ProcStatus> {
    use std::io::Read;
    let mut file = std::fs::File::open("/proc/self/status").ok()?;
    let mut buf = [0u8; 4096];
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(parse(&buf[..len]))
}

/// The fields of a status file's text. A truncated last line is ignored
/// (a mask cut short would read as a smaller set).
fn parse(text: &[u8]) -> ProcStatus {
    let whole = match text.iter().rposition(|b| *b == b'\n') {
        Some(end) => &text[..end],
        None => &[][..],
    };
    let field = |name: &[u8], radix: u32| {
        whole
            .split(|b| *b == b'\n')
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| std::str::from_utf8(value).ok())
            .and_then(|value| u64::from_str_radix(value.trim(), radix).ok())
    };
    ProcStatus {
        fd_size: field(b"FDSize:", 10),
        cap_bnd: field(b"CapBnd:", 16),
        cap_amb: field(b"CapAmb:", 16),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_parsed_and_a_cut_line_is_not() {
        let text = b"Name:\tsandpool-helper\nFDSize:\t64\nGroups:\t0 \nCapInh:\t0000000000000000\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n";
        assert_eq!(
            parse(text),
            ProcStatus {
                fd_size: Some(64),
                cap_bnd: Some(0x1ff_ffff_ffff),
                cap_amb: Some(0),
            }
        );
        // The buffer ended inside the CapBnd line: it is not read as a
        // smaller mask.
        let cut = b"FDSize:\t64\nCapBnd:\t000001ff";
        assert_eq!(
            parse(cut),
            ProcStatus {
                fd_size: Some(64),
                cap_bnd: None,
                cap_amb: None,
            }
        );
    }

    #[test]
    fn this_process_has_a_status() {
        let status = ProcStatus::read();
        assert!(status.fd_size.is_some_and(|size| size >= 64));
        assert!(status.cap_bnd.is_some());
        assert!(status.cap_amb.is_some());
    }
}
