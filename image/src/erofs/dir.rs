//! Directory blocks: per 4 KiB block, 12-byte dirents then their names (no NULs), names
//! sorted bytewise across blocks so the kernel can binary-search.

pub const DIRENT_SIZE: usize = 12;
const BLOCK: usize = super::BLOCK_SIZE as usize;

pub struct Dirent<'a> {
    pub name: &'a [u8],
    pub nid: u64,
    pub file_type: u8,
}

/// Splits sorted names into blocks: the index ranges per block and the directory size
/// (full blocks plus the used part of the last). Depends on names only, so it can run
/// before nids are known.
pub fn plan(name_lens: &[usize]) -> (Vec<std::ops::Range<usize>>, u64) {
    let mut blocks = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, len) in name_lens.iter().enumerate() {
        if used + DIRENT_SIZE + len > BLOCK {
            blocks.push(start..i);
            start = i;
            used = 0;
        }
        used += DIRENT_SIZE + len;
    }
    blocks.push(start..name_lens.len());
    let size = (blocks.len() as u64 - 1) * BLOCK as u64 + used as u64;
    (blocks, size)
}

/// The directory's bytes (length = its size); `entries` sorted by name.
pub fn pack(entries: &[Dirent<'_>]) -> Vec<u8> {
    let lens: Vec<usize> = entries.iter().map(|e| e.name.len()).collect();
    let (blocks, size) = plan(&lens);
    let mut out = Vec::with_capacity(size as usize);
    let last = blocks.len() - 1;
    for (b, range) in blocks.into_iter().enumerate() {
        let block = &entries[range];
        let mut nameoff = block.len() * DIRENT_SIZE;
        for e in block {
            out.extend_from_slice(&e.nid.to_le_bytes());
            out.extend_from_slice(&(nameoff as u16).to_le_bytes());
            out.push(e.file_type);
            out.push(0);
            nameoff += e.name.len();
        }
        for e in block {
            out.extend_from_slice(e.name);
        }
        if b != last {
            out.resize((b + 1) * BLOCK, 0);
        }
    }
    debug_assert_eq!(out.len() as u64, size);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_directory_fits_one_partial_block() {
        let (blocks, size) = plan(&[1, 2, 5]);
        assert_eq!(blocks, vec![0..3]);
        assert_eq!(size, 3 * 12 + 8);
    }

    #[test]
    fn large_directory_spills_into_full_blocks() {
        // 200-byte names: 19 entries (19 * 212 = 4028) fit a block, the 20th does not.
        let lens = vec![200; 40];
        let (blocks, size) = plan(&lens);
        assert_eq!(blocks, vec![0..19, 19..38, 38..40]);
        assert_eq!(size, 2 * 4096 + 2 * 212);
        let names: Vec<Vec<u8>> = (0..40).map(|i| vec![b'a' + (i % 26) as u8; 200]).collect();
        let entries: Vec<Dirent<'_>> = names
            .iter()
            .map(|n| Dirent {
                name: n,
                nid: 7,
                file_type: 1,
            })
            .collect();
        let bytes = pack(&entries);
        assert_eq!(bytes.len() as u64, size);
        // The first dirent of each block says where its names start: 12 * entries.
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 19 * 12);
        assert_eq!(
            u16::from_le_bytes([bytes[4096 + 8], bytes[4096 + 9]]),
            19 * 12
        );
        assert_eq!(
            u16::from_le_bytes([bytes[8192 + 8], bytes[8192 + 9]]),
            2 * 12
        );
    }
}
