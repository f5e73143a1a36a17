//! What the kernel says of this process in `/proc/self/status`: the
//! fd table's size for the fd count, and the bounding and ambient
//! capability sets for the capability steps (so that a helper whose sets
//! are empty already makes no capability syscall). Read fresh each time:
//! the capability sets can grow (entering a new user namespace gives a
//! process every capability in it, the bounding set too), so no earlier
//! reading stands for the current one.

/// The fields of `/proc/self/status` the start-up uses; `None` where the
/// line was not found (the file could not be read, or a long `Groups:`
/// line pushed it past the buffer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Status {
    /// `FDSize:`, the size of the fd table.
    pub(crate) fd_size: Option<u64>,
    /// `CapBnd:`, the bounding set, as a mask of capability numbers.
    pub(crate) cap_bnd: Option<u64>,
    /// `CapAmb:`, the ambient set.
    pub(crate) cap_amb: Option<u64>,
}

/// Reads `/proc/self/status` now; a field that cannot be read is `None`.
pub(crate) fn read() -> Status {
    read_now().unwrap_or_default()
}

/// One read of the file into a stack buffer: the fields used are among
/// its first lines, so the first 4 KiB hold them, in one or two reads
/// (`read_to_string` would stat the file and grow its buffer from 32
/// bytes: eight reads).
fn read_now() -> Option<Status> {
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
fn parse(text: &[u8]) -> Status {
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
    Status {
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
            Status {
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
            Status {
                fd_size: Some(64),
                cap_bnd: None,
                cap_amb: None,
            }
        );
    }

    #[test]
    fn this_process_has_a_status() {
        let status = read();
        assert!(status.fd_size.is_some_and(|size| size >= 64));
        assert!(status.cap_bnd.is_some());
        assert!(status.cap_amb.is_some());
    }
}
