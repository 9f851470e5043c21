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

/// One xattr as EROFS stores it: name index, name suffix, value.
pub type Entry<'a> = (u8, &'a [u8], &'a [u8]);

/// One `erofs_xattr_entry`: 4-byte header, suffix, value, padded to 4 bytes. The same
/// encoding serves inline and shared xattrs.
pub fn encode_entry(out: &mut Vec<u8>, (index, suffix, value): Entry<'_>) {
    out.push(suffix.len() as u8);
    out.push(index);
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(suffix);
    out.extend_from_slice(value);
    out.resize(out.len().div_ceil(4) * 4, 0);
}

/// Encodes an inode's xattr body: the 12-byte ibody header, the ids of its shared
/// xattrs, then its inline entries. Returns the bytes and `i_xattr_icount` (0 when there
/// are no xattrs).
pub fn encode_ibody(shared: &[u32], inline: &[Entry<'_>]) -> (Vec<u8>, u16) {
    if shared.is_empty() && inline.is_empty() {
        return (Vec::new(), 0);
    }
    // h_name_filter 0 (no bloom filter feature), h_shared_count, reserved.
    let mut out = vec![0u8; 12];
    out[4] = shared.len() as u8;
    for id in shared {
        out.extend_from_slice(&id.to_le_bytes());
    }
    for entry in inline {
        encode_entry(&mut out, *entry);
    }
    // size = 12 + 4 * (icount - 1)
    let icount = ((out.len() - 12) / 4 + 1) as u16;
    (out, icount)
}

/// The shared xattr area: xattrs that two or more inodes carry are stored once and
/// referenced by id (the entry's offset in 4-byte units from `xattr_blkaddr`). No entry
/// crosses a block boundary.
#[derive(Debug, Default)]
pub struct SharedXattrs {
    ids: std::collections::HashMap<(Vec<u8>, Vec<u8>), u32>,
    area: Vec<u8>,
}

/// At most this many shared references per inode (`h_shared_count` is one byte).
pub const MAX_SHARED_PER_INODE: usize = 255;

impl SharedXattrs {
    /// Builds the area from how many inodes carry each (full name, value) pair.
    pub fn build<'a>(
        counts: impl IntoIterator<Item = (&'a (Vec<u8>, Vec<u8>), usize)>,
        block: usize,
    ) -> Self {
        let mut shared: Vec<&(Vec<u8>, Vec<u8>)> = counts
            .into_iter()
            .filter(|(_, n)| *n >= 2)
            .map(|(pair, _)| pair)
            .collect();
        shared.sort();
        let mut this = Self::default();
        for pair in shared {
            let Some((index, suffix)) = split_name(&pair.0) else {
                continue;
            };
            if suffix.len() > 255 || pair.1.len() > usize::from(u16::MAX) {
                continue;
            }
            let mut entry = Vec::new();
            encode_entry(&mut entry, (index, suffix, &pair.1));
            if entry.len() > block {
                continue;
            }
            if this.area.len() % block + entry.len() > block {
                this.area.resize(this.area.len().div_ceil(block) * block, 0);
            }
            let Ok(id) = u32::try_from(this.area.len() / 4) else {
                break;
            };
            this.ids.insert(pair.clone(), id);
            this.area.extend_from_slice(&entry);
        }
        this
    }

    pub fn id(&self, name: &[u8], value: &[u8]) -> Option<u32> {
        self.ids.get(&(name.to_vec(), value.to_vec())).copied()
    }

    /// The bytes to place at `xattr_blkaddr` (empty when nothing is shared).
    pub fn area(&self) -> &[u8] {
        &self.area
    }
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
    fn ibody_encoding_sizes() {
        let (bytes, icount) = encode_ibody(&[], &[(1, b"a", b"xyz")]);
        // 12 header + (4 + 1 + 3 = 8)
        assert_eq!(bytes.len(), 20);
        assert_eq!(icount, 3);
        assert_eq!(bytes.len(), 12 + 4 * (icount as usize - 1));
        let (bytes, icount) = encode_ibody(&[7, 9], &[]);
        assert_eq!(bytes[4], 2);
        assert_eq!(&bytes[12..16], &7u32.to_le_bytes());
        assert_eq!(bytes.len(), 12 + 4 * (icount as usize - 1));
        assert_eq!(encode_ibody(&[], &[]), (Vec::new(), 0));
    }

    #[test]
    fn only_repeated_pairs_are_shared_and_entries_stay_within_a_block() {
        let common = (b"user.common".to_vec(), b"v".to_vec());
        let once = (b"user.once".to_vec(), b"v".to_vec());
        let big = (b"user.big".to_vec(), vec![1u8; 3000]);
        let big2 = (b"user.big2".to_vec(), vec![2u8; 3000]);
        let shared = SharedXattrs::build([(&common, 5), (&once, 1), (&big, 2), (&big2, 2)], 4096);
        assert!(shared.id(&common.0, &common.1).is_some());
        assert!(shared.id(&once.0, &once.1).is_none());
        let (a, b) = (
            shared.id(&big.0, &big.1).expect("shared") as usize * 4,
            shared.id(&big2.0, &big2.1).expect("shared") as usize * 4,
        );
        // Sorted: user.big, user.big2, user.common; big2 would cross, so it moves on.
        assert_eq!((a, b), (0, 4096));
        assert_eq!(shared.area().len() % 4, 0);
    }
}
