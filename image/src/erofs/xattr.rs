//! xattr names as EROFS stores them: a prefix index plus the rest of the name.

/// (prefix, EROFS name index). `system.posix_acl_*` names are stored with an empty
/// suffix. Longer prefixes first so `system.posix_acl_access` is not cut short.
const PREFIXES: &[(&[u8], u8)] = &[
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"user.", 1),
    (b"trusted.", 4),
    (b"security.", 6),
];

/// Splits a full xattr name into (index, suffix), if EROFS can store it.
pub fn split_name(name: &[u8]) -> Option<(u8, &[u8])> {
    PREFIXES.iter().find_map(|(prefix, index)| {
        let rest = name.strip_prefix(*prefix)?;
        // ACL names are exact; the others need a non-empty suffix.
        match (*index, rest.is_empty()) {
            (2 | 3, true) => Some((*index, rest)),
            (2 | 3, false) => None,
            (_, false) => Some((*index, rest)),
            (_, true) => None,
        }
    })
}

/// Encodes inline xattrs: the 12-byte ibody header then entries, each padded to 4 bytes.
/// Returns the bytes and `i_xattr_icount` (0 when there are no xattrs).
pub fn encode_inline(entries: &[(u8, &[u8], &[u8])]) -> (Vec<u8>, u16) {
    if entries.is_empty() {
        return (Vec::new(), 0);
    }
    let mut out = vec![0u8; 12]; // h_name_filter 0, no shared xattrs
    for (index, suffix, value) in entries {
        out.push(suffix.len() as u8);
        out.push(*index);
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        out.extend_from_slice(suffix);
        out.extend_from_slice(value);
        out.resize(out.len().div_ceil(4) * 4, 0);
    }
    // size = 12 + 4 * (icount - 1)
    let icount = ((out.len() - 12) / 4 + 1) as u16;
    (out, icount)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(split_name(b"user.mime"), Some((1, &b"mime"[..])));
        assert_eq!(
            split_name(b"security.capability"),
            Some((6, &b"capability"[..]))
        );
        assert_eq!(
            split_name(b"trusted.overlay.opaque"),
            Some((4, &b"overlay.opaque"[..]))
        );
        assert_eq!(split_name(b"system.posix_acl_access"), Some((2, &b""[..])));
        assert_eq!(split_name(b"system.posix_acl_accessx"), None);
        assert_eq!(split_name(b"system.other"), None);
        assert_eq!(split_name(b"user."), None);
    }

    #[test]
    fn inline_encoding_sizes() {
        let (bytes, icount) = encode_inline(&[(1, b"a", b"xyz")]);
        // 12 header + (4 + 1 + 3 = 8)
        assert_eq!(bytes.len(), 20);
        assert_eq!(icount, 3);
        assert_eq!(bytes.len(), 12 + 4 * (icount as usize - 1));
    }
}
