//! The cachefiles ondemand message codec (`include/uapi/linux/cachefiles.h`).
//!
//! One `read()` of `/dev/cachefiles` returns exactly one message:
//! ```text
//! struct cachefiles_msg  { u32 msg_id; u32 opcode; u32 len; u32 object_id; u8 data[]; }
//! struct cachefiles_open { u32 volume_key_size; u32 cookie_key_size; u32 fd; u32 flags; u8 data[]; }
//! struct cachefiles_read { u64 off; u64 len; }
//! ```
//! `len` counts the whole message. The OPEN data is the volume key (NUL-terminated,
//! the NUL counted in its size) followed by the cookie key (no NUL). Parsing is total:
//! every input gives a message or a [`MsgError`], never a panic.

/// Bytes of `struct cachefiles_msg` before `data`.
pub const MSG_HEADER_LEN: usize = 16;
/// Bytes of `struct cachefiles_open` before the keys.
pub const OPEN_HEADER_LEN: usize = 16;
/// Bytes of `struct cachefiles_read`.
pub const READ_BODY_LEN: usize = 16;

const OP_OPEN: u32 = 0;
const OP_CLOSE: u32 = 1;
const OP_READ: u32 = 2;

/// An OPEN request: the kernel wants a cache object for `cookie_key` in `volume_key`.
/// The anon fd number it installed is returned by [`open_fd`], not kept here, so that
/// ownership of the fd is taken exactly once by the device layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub msg_id: u32,
    pub object_id: u32,
    /// Volume key without its trailing NUL, e.g. `erofs,<domain_id or fsid>`.
    pub volume_key: Vec<u8>,
    /// Cookie key: the EROFS `fsid` or device tag.
    pub cookie_key: Vec<u8>,
    pub flags: u32,
}

/// A READ request: fill `len` bytes at `offset` of object `object_id`'s cache file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    pub msg_id: u32,
    pub object_id: u32,
    pub offset: u64,
    pub len: u64,
}

/// A CLOSE notice: the object is gone (no reply expected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub msg_id: u32,
    pub object_id: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Close(Close),
    Read(Read),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgError {
    #[error("message of {got} bytes is shorter than its {need}-byte header")]
    Short { got: usize, need: usize },
    #[error("message header says {declared} bytes but {got} were read")]
    LengthMismatch { declared: u32, got: usize },
    #[error("unknown opcode {0}")]
    UnknownOpcode(u32),
    #[error("{op} body is {got} bytes, expected {expected}")]
    BodyLength {
        op: &'static str,
        got: usize,
        expected: usize,
    },
    #[error(
        "OPEN keys ({volume}+{cookie} bytes) do not fit the {available} bytes after its header"
    )]
    KeysPastEnd {
        volume: u32,
        cookie: u32,
        available: usize,
    },
    #[error("OPEN volume key is empty or not NUL-terminated")]
    VolumeKeyNotTerminated,
    #[error("OPEN carries fd {0}, not a valid descriptor number")]
    BadFd(u32),
    #[error("READ range {offset}+{len} overflows a 64-bit offset")]
    ReadOverflow { offset: u64, len: u64 },
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at + 4)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    let bytes = buf.get(at..at + 8)?;
    Some(u64::from_ne_bytes(bytes.try_into().ok()?))
}

/// The message id, when at least the header's first field is present: enough to refuse
/// a malformed OPEN with a negative `copen` so the mount fails instead of hanging.
pub fn msg_id(buf: &[u8]) -> Option<u32> {
    u32_at(buf, 0)
}

/// Whether `buf` claims to be an OPEN: such a message must get a `copen` answer even
/// when it is malformed, or the mount waiting on it hangs.
pub fn is_open(buf: &[u8]) -> bool {
    u32_at(buf, 4) == Some(OP_OPEN)
}

/// The anon fd number the kernel installed for an OPEN message, if `buf` is an OPEN long
/// enough to carry one, whether or not the rest of it parses: that fd must be closed
/// even when the message is malformed.
pub fn open_fd(buf: &[u8]) -> Option<i32> {
    if u32_at(buf, 4)? != OP_OPEN {
        return None;
    }
    let fd = u32_at(buf, MSG_HEADER_LEN + 8)?;
    i32::try_from(fd).ok()
}

/// Parses one message as read from `/dev/cachefiles`.
pub fn parse(buf: &[u8]) -> Result<Message, MsgError> {
    let short = || MsgError::Short {
        got: buf.len(),
        need: MSG_HEADER_LEN,
    };
    let msg_id = u32_at(buf, 0).ok_or_else(short)?;
    let opcode = u32_at(buf, 4).ok_or_else(short)?;
    let declared = u32_at(buf, 8).ok_or_else(short)?;
    let object_id = u32_at(buf, 12).ok_or_else(short)?;
    if usize::try_from(declared).ok() != Some(buf.len()) {
        return Err(MsgError::LengthMismatch {
            declared,
            got: buf.len(),
        });
    }
    let body = &buf[MSG_HEADER_LEN..];
    match opcode {
        OP_OPEN => parse_open(msg_id, object_id, body).map(Message::Open),
        OP_CLOSE => {
            expect_body("CLOSE", body, 0)?;
            Ok(Message::Close(Close { msg_id, object_id }))
        }
        OP_READ => {
            expect_body("READ", body, READ_BODY_LEN)?;
            let offset = u64_at(body, 0).ok_or(MsgError::BodyLength {
                op: "READ",
                got: body.len(),
                expected: READ_BODY_LEN,
            })?;
            let len = u64_at(body, 8).ok_or(MsgError::BodyLength {
                op: "READ",
                got: body.len(),
                expected: READ_BODY_LEN,
            })?;
            if offset.checked_add(len).is_none() {
                return Err(MsgError::ReadOverflow { offset, len });
            }
            Ok(Message::Read(Read {
                msg_id,
                object_id,
                offset,
                len,
            }))
        }
        other => Err(MsgError::UnknownOpcode(other)),
    }
}

fn expect_body(op: &'static str, body: &[u8], expected: usize) -> Result<(), MsgError> {
    if body.len() == expected {
        Ok(())
    } else {
        Err(MsgError::BodyLength {
            op,
            got: body.len(),
            expected,
        })
    }
}

fn parse_open(msg_id: u32, object_id: u32, body: &[u8]) -> Result<Open, MsgError> {
    let short = MsgError::BodyLength {
        op: "OPEN",
        got: body.len(),
        expected: OPEN_HEADER_LEN,
    };
    let volume_size = u32_at(body, 0).ok_or(short.clone())?;
    let cookie_size = u32_at(body, 4).ok_or(short.clone())?;
    let fd = u32_at(body, 8).ok_or(short.clone())?;
    if i32::try_from(fd).is_err() {
        return Err(MsgError::BadFd(fd));
    }
    let flags = u32_at(body, 12).ok_or(short)?;
    let keys = &body[OPEN_HEADER_LEN..];
    let past_end = MsgError::KeysPastEnd {
        volume: volume_size,
        cookie: cookie_size,
        available: keys.len(),
    };
    let total = u64::from(volume_size) + u64::from(cookie_size);
    if total != keys.len() as u64 {
        return Err(past_end);
    }
    let (volume, cookie) = keys.split_at(volume_size as usize);
    let Some((0, volume_key)) = volume.split_last() else {
        return Err(MsgError::VolumeKeyNotTerminated);
    };
    Ok(Open {
        msg_id,
        object_id,
        volume_key: volume_key.to_vec(),
        cookie_key: cookie.to_vec(),
        flags,
    })
}

/// Test fixtures: messages laid out as the kernel writes them.
#[cfg(any(test, feature = "fixtures"))]
pub mod fixture {
    use super::*;

    fn header(msg_id: u32, opcode: u32, len: usize, object_id: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        for field in [msg_id, opcode, len as u32, object_id] {
            out.extend_from_slice(&field.to_ne_bytes());
        }
        out
    }

    pub fn open(msg_id: u32, object_id: u32, volume: &[u8], cookie: &[u8], fd: u32) -> Vec<u8> {
        let vks = volume.len() + 1;
        let len = MSG_HEADER_LEN + OPEN_HEADER_LEN + vks + cookie.len();
        let mut out = header(msg_id, OP_OPEN, len, object_id);
        for field in [vks as u32, cookie.len() as u32, fd, 0] {
            out.extend_from_slice(&field.to_ne_bytes());
        }
        out.extend_from_slice(volume);
        out.push(0);
        out.extend_from_slice(cookie);
        out
    }

    pub fn read(msg_id: u32, object_id: u32, offset: u64, len: u64) -> Vec<u8> {
        let mut out = header(msg_id, OP_READ, MSG_HEADER_LEN + READ_BODY_LEN, object_id);
        out.extend_from_slice(&offset.to_ne_bytes());
        out.extend_from_slice(&len.to_ne_bytes());
        out
    }

    pub fn close(msg_id: u32, object_id: u32) -> Vec<u8> {
        header(msg_id, OP_CLOSE, MSG_HEADER_LEN, object_id)
    }
}

#[cfg(test)]
mod tests {
    use super::fixture;
    use super::*;

    #[test]
    fn parses_open_as_the_kernel_sends_it() {
        let buf = fixture::open(7, 3, b"erofs,dom", b"layer-1", 12);
        assert_eq!(open_fd(&buf), Some(12));
        assert_eq!(
            parse(&buf),
            Ok(Message::Open(Open {
                msg_id: 7,
                object_id: 3,
                volume_key: b"erofs,dom".to_vec(),
                cookie_key: b"layer-1".to_vec(),
                flags: 0,
            }))
        );
    }

    #[test]
    fn parses_read_and_close() {
        assert_eq!(
            parse(&fixture::read(9, 3, 131072, 4096)),
            Ok(Message::Read(Read {
                msg_id: 9,
                object_id: 3,
                offset: 131072,
                len: 4096
            }))
        );
        assert_eq!(
            parse(&fixture::close(10, 3)),
            Ok(Message::Close(Close {
                msg_id: 10,
                object_id: 3
            }))
        );
        assert_eq!(open_fd(&fixture::read(9, 3, 0, 1)), None);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for full in [
            fixture::open(1, 2, b"erofs,x", b"y", 5),
            fixture::read(1, 2, 0, 4096),
            fixture::close(1, 2),
        ] {
            for cut in 0..full.len() {
                assert!(parse(&full[..cut]).is_err(), "prefix of {cut} bytes parsed");
            }
        }
    }

    #[test]
    fn short_header() {
        assert_eq!(parse(&[0; 15]), Err(MsgError::Short { got: 15, need: 16 }));
    }

    #[test]
    fn declared_length_must_match_what_was_read() {
        let mut buf = fixture::read(1, 2, 0, 4096);
        buf.extend_from_slice(&[0; 4]);
        assert_eq!(
            parse(&buf),
            Err(MsgError::LengthMismatch {
                declared: 32,
                got: 36
            })
        );
    }

    #[test]
    fn unknown_opcode() {
        let mut buf = fixture::close(1, 2);
        buf[4..8].copy_from_slice(&9u32.to_ne_bytes());
        assert_eq!(parse(&buf), Err(MsgError::UnknownOpcode(9)));
    }

    #[test]
    fn key_sizes_past_the_end() {
        let mut buf = fixture::open(1, 2, b"erofs,x", b"y", 5);
        buf[20..24].copy_from_slice(&u32::MAX.to_ne_bytes()); // cookie_key_size
        assert!(matches!(
            parse(&buf),
            Err(MsgError::KeysPastEnd {
                cookie: u32::MAX,
                ..
            })
        ));
        // The fd is still reported so the caller can close it.
        assert_eq!(open_fd(&buf), Some(5));
    }

    #[test]
    fn volume_key_without_nul() {
        let mut buf = fixture::open(1, 2, b"erofs,x", b"y", 5);
        let nul = MSG_HEADER_LEN + OPEN_HEADER_LEN + b"erofs,x".len();
        buf[nul] = b'!';
        assert_eq!(parse(&buf), Err(MsgError::VolumeKeyNotTerminated));
        let empty = fixture::open(1, 2, b"", b"y", 5);
        let mut no_volume = empty.clone();
        no_volume[16..20].copy_from_slice(&0u32.to_ne_bytes());
        no_volume[20..24].copy_from_slice(&2u32.to_ne_bytes());
        assert_eq!(parse(&no_volume), Err(MsgError::VolumeKeyNotTerminated));
        assert!(
            parse(&empty).is_ok(),
            "a lone NUL is an empty but terminated key"
        );
    }

    #[test]
    fn open_with_an_impossible_fd_number() {
        let buf = fixture::open(1, 2, b"erofs,x", b"y", 0x8080_8080);
        assert_eq!(parse(&buf), Err(MsgError::BadFd(0x8080_8080)));
        assert!(is_open(&buf));
        assert_eq!(open_fd(&buf), None);
    }

    #[test]
    fn read_range_overflow() {
        let buf = fixture::read(1, 2, u64::MAX - 10, 4096);
        assert!(matches!(parse(&buf), Err(MsgError::ReadOverflow { .. })));
    }

    #[test]
    fn read_and_close_bodies_have_fixed_sizes() {
        let mut close = fixture::close(1, 2);
        close.extend_from_slice(&[0; 8]);
        close[8..12].copy_from_slice(&24u32.to_ne_bytes());
        assert_eq!(
            parse(&close),
            Err(MsgError::BodyLength {
                op: "CLOSE",
                got: 8,
                expected: 0
            })
        );
    }
}
