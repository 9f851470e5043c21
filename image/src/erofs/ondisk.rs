//! Byte layouts of the on-disk structures (fs/erofs/erofs_fs.h), little-endian.

pub const SUPER_OFFSET: usize = 1024;
pub const MAGIC: u32 = 0xE0F5_E1E2;
pub const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x1;
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x8;
pub const DEVICE_SLOT_SIZE: usize = 128;
/// Device slots right after the 128-byte superblock: byte 1152 = slot 9.
pub const DEVICE_SLOT_OFFSET: usize = SUPER_OFFSET + 128;

pub const LAYOUT_FLAT_PLAIN: u16 = 0;
pub const LAYOUT_FLAT_INLINE: u16 = 2;
pub const LAYOUT_CHUNK_BASED: u16 = 4;
pub const CHUNK_FORMAT_INDEXES: u16 = 0x20;
pub const NULL_ADDR: u32 = u32::MAX;

pub const COMPACT_INODE_SIZE: usize = 32;
pub const EXTENDED_INODE_SIZE: usize = 64;

/// File types in dirents (the kernel's FT_*).
pub mod file_type {
    pub const REG: u8 = 1;
    pub const DIR: u8 = 2;
    pub const CHR: u8 = 3;
    pub const BLK: u8 = 4;
    pub const FIFO: u8 = 5;
    pub const SOCK: u8 = 6;
    pub const LNK: u8 = 7;
}

pub struct SuperBlock {
    pub root_nid: u16,
    pub inos: u64,
    pub build_time: u64,
    pub build_time_nsec: u32,
    pub blocks: u32,
    pub meta_blkaddr: u32,
    /// Block of the shared xattr area (0 when there is none).
    pub xattr_blkaddr: u32,
    pub feature_incompat: u32,
    pub extra_devices: u16,
}

impl SuperBlock {
    /// Writes the superblock (checksum left zero) into block 0.
    pub fn write(&self, block0: &mut [u8]) {
        let sb = &mut block0[SUPER_OFFSET..SUPER_OFFSET + 128];
        sb[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        sb[8..12].copy_from_slice(&FEATURE_COMPAT_SB_CHKSUM.to_le_bytes());
        sb[12] = 12; // blkszbits: 4 KiB
        sb[14..16].copy_from_slice(&self.root_nid.to_le_bytes());
        sb[16..24].copy_from_slice(&self.inos.to_le_bytes());
        sb[24..32].copy_from_slice(&self.build_time.to_le_bytes());
        sb[32..36].copy_from_slice(&self.build_time_nsec.to_le_bytes());
        sb[36..40].copy_from_slice(&self.blocks.to_le_bytes());
        sb[40..44].copy_from_slice(&self.meta_blkaddr.to_le_bytes());
        sb[44..48].copy_from_slice(&self.xattr_blkaddr.to_le_bytes());
        // 48..80 uuid and volume name zero
        sb[80..84].copy_from_slice(&self.feature_incompat.to_le_bytes());
        sb[86..88].copy_from_slice(&self.extra_devices.to_le_bytes());
        let slotoff = (DEVICE_SLOT_OFFSET / DEVICE_SLOT_SIZE) as u16;
        sb[88..90].copy_from_slice(&slotoff.to_le_bytes());
    }

    /// crc32c of block 0 from the superblock on, checksum field zeroed, as the kernel
    /// computes it (seed ~0, no final inversion).
    pub fn seal(block0: &mut [u8]) {
        block0[SUPER_OFFSET + 4..SUPER_OFFSET + 8].fill(0);
        let crc = !crc32c::crc32c(&block0[SUPER_OFFSET..]);
        block0[SUPER_OFFSET + 4..SUPER_OFFSET + 8].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Device slot `index` (0 = the first extra device).
pub fn write_device_slot(block0: &mut [u8], index: usize, tag: &[u8], blocks: u32) {
    let at = DEVICE_SLOT_OFFSET + index * DEVICE_SLOT_SIZE;
    let slot = &mut block0[at..at + DEVICE_SLOT_SIZE];
    let n = tag.len().min(64);
    slot[..n].copy_from_slice(&tag[..n]);
    slot[64..68].copy_from_slice(&blocks.to_le_bytes());
}

pub struct Inode {
    pub extended: bool,
    pub layout: u16,
    pub xattr_icount: u16,
    pub mode: u16,
    pub nlink: u32,
    pub size: u64,
    /// raw_blkaddr, rdev or chunk info, by layout and type.
    pub i_u: u32,
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub mtime_nsec: u32,
}

impl Inode {
    pub fn size_on_disk(&self) -> usize {
        if self.extended {
            EXTENDED_INODE_SIZE
        } else {
            COMPACT_INODE_SIZE
        }
    }

    pub fn write(&self, out: &mut [u8]) {
        let format = u16::from(self.extended) | (self.layout << 1);
        out[0..2].copy_from_slice(&format.to_le_bytes());
        out[2..4].copy_from_slice(&self.xattr_icount.to_le_bytes());
        out[4..6].copy_from_slice(&self.mode.to_le_bytes());
        if self.extended {
            out[8..16].copy_from_slice(&self.size.to_le_bytes());
            out[16..20].copy_from_slice(&self.i_u.to_le_bytes());
            out[20..24].copy_from_slice(&self.ino.to_le_bytes());
            out[24..28].copy_from_slice(&self.uid.to_le_bytes());
            out[28..32].copy_from_slice(&self.gid.to_le_bytes());
            out[32..40].copy_from_slice(&self.mtime.to_le_bytes());
            out[40..44].copy_from_slice(&self.mtime_nsec.to_le_bytes());
            out[44..48].copy_from_slice(&self.nlink.to_le_bytes());
        } else {
            // Compact: the caller checked every value fits.
            out[6..8].copy_from_slice(&(self.nlink as u16).to_le_bytes());
            out[8..12].copy_from_slice(&(self.size as u32).to_le_bytes());
            out[16..20].copy_from_slice(&self.i_u.to_le_bytes());
            out[20..24].copy_from_slice(&self.ino.to_le_bytes());
            out[24..26].copy_from_slice(&(self.uid as u16).to_le_bytes());
            out[26..28].copy_from_slice(&(self.gid as u16).to_le_bytes());
        }
    }
}

/// The kernel's new_encode_dev.
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// An 8-byte chunk index into device 1, or a hole.
pub fn chunk_index(blkaddr: Option<u32>) -> [u8; 8] {
    let mut out = [0u8; 8];
    match blkaddr {
        Some(addr) => {
            out[2..4].copy_from_slice(&1u16.to_le_bytes());
            out[4..8].copy_from_slice(&addr.to_le_bytes());
        }
        None => out[4..8].copy_from_slice(&NULL_ADDR.to_le_bytes()),
    }
    out
}
