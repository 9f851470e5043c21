//! Lays a tree out as an EROFS image: assigns nids and blocks, then serialises.
//!
//! Block 0: superblock and the device slot. From block 1 (`meta_blkaddr`): inodes in
//! breadth-first order, root first, each 32-byte aligned and never with its inode,
//! inline xattrs or inline tail across a block boundary. Then whole blocks of data that
//! does not fit inline (large directories, long symlinks, larger inline files).

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::dir::{self, Dirent};
use super::ondisk::{self, Inode, SuperBlock, file_type};
use super::tree::{Content, FileData, FsTree, Node, NodeId};
use super::{BLOCK_SIZE, CHUNK_SIZE, ErofsError, xattr};

const BLOCK: usize = BLOCK_SIZE as usize;
const META_BLKADDR: u32 = 1;
/// log2(CHUNK_SIZE / BLOCK_SIZE).
const CHUNK_BLKBITS: u16 = 8;

#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// Tag of the data device (its fscache cookie name), at most 64 bytes.
    pub data_tag: String,
    /// Size of the data device in 4 KiB blocks.
    pub data_blocks: u32,
}

/// One inode as it will be written.
struct Planned {
    id: NodeId,
    inode: Inode,
    xattrs: Vec<u8>,
    /// Bytes right after the inode and xattrs: an inline tail, or chunk indexes.
    after: Vec<u8>,
    /// Chunk indexes start 8-byte aligned and may cross blocks; a tail may not.
    after_is_chunk_index: bool,
    /// Whole blocks of data kept in the metadata image (raw_blkaddr points at them).
    plain: Vec<u8>,
    file_type: u8,
    nid: u64,
}

impl Planned {
    /// Bytes that must stay within one block.
    fn unsplittable(&self) -> usize {
        self.inode.size_on_disk()
            + self.xattrs.len()
            + if self.after_is_chunk_index {
                0
            } else {
                self.after.len()
            }
    }

    fn total(&self) -> usize {
        let head = self.inode.size_on_disk() + self.xattrs.len();
        if self.after_is_chunk_index && !self.after.is_empty() {
            head.div_ceil(8) * 8 + self.after.len()
        } else {
            head + self.after.len()
        }
    }
}

fn path_of(names: &HashMap<NodeId, String>, id: NodeId) -> String {
    names.get(&id).cloned().unwrap_or_else(|| "/".into())
}

/// Writes the metadata image for `tree`.
pub fn write_metadata(tree: &FsTree, options: &WriteOptions) -> Result<Vec<u8>, ErofsError> {
    // 1. Reachable nodes, breadth-first by sorted name; links counted; parents known.
    let mut order: Vec<NodeId> = vec![FsTree::ROOT];
    let mut seen: HashMap<NodeId, usize> = HashMap::from([(FsTree::ROOT, 0)]);
    let mut parent: HashMap<NodeId, NodeId> = HashMap::from([(FsTree::ROOT, FsTree::ROOT)]);
    let mut links: HashMap<NodeId, u32> = HashMap::new();
    let mut paths: HashMap<NodeId, String> = HashMap::from([(FsTree::ROOT, "/".to_owned())]);
    let mut queue = VecDeque::from([FsTree::ROOT]);
    while let Some(dir_id) = queue.pop_front() {
        let Content::Directory(entries) = &tree.node(dir_id).content else {
            continue;
        };
        for (name, &child) in entries {
            *links.entry(child).or_default() += 1;
            if seen.contains_key(&child) {
                continue;
            }
            seen.insert(child, order.len());
            order.push(child);
            let base = path_of(&paths, dir_id);
            paths.insert(
                child,
                format!(
                    "{}/{}",
                    base.trim_end_matches('/'),
                    String::from_utf8_lossy(name)
                ),
            );
            if matches!(tree.node(child).content, Content::Directory(_)) {
                parent.insert(child, dir_id);
                queue.push_back(child);
            }
        }
    }

    // 2. The most common mtime becomes the build time, so most inodes can be compact.
    let mut mtimes: BTreeMap<(i64, u32), usize> = BTreeMap::new();
    for id in &order {
        let m = &tree.node(*id).meta;
        *mtimes.entry((m.mtime, m.mtime_nsec)).or_default() += 1;
    }
    let ((build_time, build_nsec), _) = mtimes
        .iter()
        .max_by_key(|(k, n)| (**n, std::cmp::Reverse(**k)))
        .map(|(k, n)| (*k, *n))
        .unwrap_or(((0, 0), 0));

    // 3. xattrs that several inodes carry are stored once, in the shared area.
    let mut xattr_counts: HashMap<&(Vec<u8>, Vec<u8>), usize> = HashMap::new();
    for id in &order {
        for pair in &tree.node(*id).meta.xattrs {
            *xattr_counts.entry(pair).or_default() += 1;
        }
    }
    let shared = xattr::SharedXattrs::build(xattr_counts, BLOCK);

    // 4. Plan every inode (sizes known; nids not yet).
    let mut planned: Vec<Planned> = Vec::with_capacity(order.len());
    for (index, &id) in order.iter().enumerate() {
        let node = tree.node(id);
        let nlink = match &node.content {
            Content::Directory(entries) => {
                2 + entries
                    .values()
                    .filter(|c| {
                        matches!(tree.node(**c).content, Content::Directory(_))
                            && parent.get(c) == Some(&id)
                    })
                    .count() as u32
            }
            _ => links.get(&id).copied().unwrap_or(1),
        };
        planned.push(plan_inode(
            id,
            node,
            index,
            nlink,
            (build_time, build_nsec),
            &path_of(&paths, id),
            &shared,
        )?);
    }

    // 5. Place inodes (nids), then the shared xattr area, then whole data blocks.
    let mut cursor = META_BLKADDR as usize * BLOCK;
    for p in &mut planned {
        let unsplittable = p.unsplittable();
        if unsplittable > BLOCK {
            return Err(ErofsError::Limit {
                path: path_of(&paths, p.id),
                what: format!(
                    "inode with xattrs and inline data needs {unsplittable} bytes, more than a block"
                ),
            });
        }
        if cursor % BLOCK + unsplittable > BLOCK {
            cursor = cursor.div_ceil(BLOCK) * BLOCK;
        }
        p.nid = ((cursor - META_BLKADDR as usize * BLOCK) / 32) as u64;
        cursor += p.total().div_ceil(32) * 32;
    }
    if planned
        .first()
        .is_some_and(|root| root.nid > u64::from(u16::MAX))
    {
        return Err(ErofsError::TooLarge);
    }
    cursor = cursor.div_ceil(BLOCK) * BLOCK;
    let xattr_blkaddr = if shared.area().is_empty() {
        0
    } else {
        let at = u32::try_from(cursor / BLOCK).map_err(|_| ErofsError::TooLarge)?;
        cursor += shared.area().len().div_ceil(BLOCK) * BLOCK;
        at
    };
    for p in &mut planned {
        if !p.plain.is_empty() {
            p.inode.i_u = u32::try_from(cursor / BLOCK).map_err(|_| ErofsError::TooLarge)?;
            cursor += p.plain.len().div_ceil(BLOCK) * BLOCK;
        }
    }
    let total_blocks = u32::try_from(cursor / BLOCK).map_err(|_| ErofsError::TooLarge)?;

    // 6. Directory contents now that nids are known.
    let nid_of: HashMap<NodeId, (u64, u8)> = planned
        .iter()
        .map(|p| (p.id, (p.nid, p.file_type)))
        .collect();
    for p in &mut planned {
        let Content::Directory(entries) = &tree.node(p.id).content else {
            continue;
        };
        let self_nid = p.nid;
        let parent_nid = nid_of[&parent[&p.id]].0;
        let mut dirents: Vec<Dirent<'_>> = Vec::with_capacity(entries.len() + 2);
        dirents.push(Dirent {
            name: b".",
            nid: self_nid,
            file_type: file_type::DIR,
        });
        dirents.push(Dirent {
            name: b"..",
            nid: parent_nid,
            file_type: file_type::DIR,
        });
        for (name, child) in entries {
            let (nid, ft) = nid_of[child];
            dirents.push(Dirent {
                name,
                nid,
                file_type: ft,
            });
        }
        dirents.sort_by(|a, b| a.name.cmp(b.name));
        let bytes = dir::pack(&dirents);
        split_data(p, &bytes);
    }

    // 7. Serialise.
    let mut image = vec![0u8; total_blocks as usize * BLOCK];
    let mut feature_incompat = 0;
    let has_data_device = options.data_blocks > 0
        || planned
            .iter()
            .any(|p| p.inode.layout == ondisk::LAYOUT_CHUNK_BASED);
    if has_data_device {
        feature_incompat |=
            ondisk::FEATURE_INCOMPAT_CHUNKED_FILE | ondisk::FEATURE_INCOMPAT_DEVICE_TABLE;
    }
    SuperBlock {
        root_nid: planned[0].nid as u16,
        inos: planned.len() as u64,
        build_time: build_time as u64,
        build_time_nsec: build_nsec,
        blocks: total_blocks,
        meta_blkaddr: META_BLKADDR,
        xattr_blkaddr,
        feature_incompat,
        extra_devices: u16::from(has_data_device),
    }
    .write(&mut image[..BLOCK]);
    if has_data_device {
        ondisk::write_device_slot(
            &mut image[..BLOCK],
            0,
            options.data_tag.as_bytes(),
            options.data_blocks,
        );
    }
    let area_at = xattr_blkaddr as usize * BLOCK;
    image[area_at..area_at + shared.area().len()].copy_from_slice(shared.area());
    for p in &planned {
        let mut at = META_BLKADDR as usize * BLOCK + p.nid as usize * 32;
        p.inode.write(&mut image[at..at + p.inode.size_on_disk()]);
        at += p.inode.size_on_disk();
        image[at..at + p.xattrs.len()].copy_from_slice(&p.xattrs);
        at += p.xattrs.len();
        if p.after_is_chunk_index && !p.after.is_empty() {
            at = at.div_ceil(8) * 8;
        }
        image[at..at + p.after.len()].copy_from_slice(&p.after);
        if !p.plain.is_empty() {
            let start = p.inode.i_u as usize * BLOCK;
            image[start..start + p.plain.len()].copy_from_slice(&p.plain);
        }
    }
    SuperBlock::seal(&mut image[..BLOCK]);
    Ok(image)
}

/// Splits inline-capable data (directory, symlink, small file) into whole blocks kept in
/// the metadata image and an inline tail, or all whole blocks when the tail cannot stay
/// in the inode's block. The caller re-checks placement; for directories this runs after
/// placement, so their planned size already reserved the tail.
fn split_data(p: &mut Planned, bytes: &[u8]) {
    if p.inode.layout == ondisk::LAYOUT_FLAT_INLINE {
        let full = bytes.len() / BLOCK * BLOCK;
        p.plain = bytes[..full].to_vec();
        p.after = bytes[full..].to_vec();
    } else {
        p.plain = bytes.to_vec();
        p.after.clear();
    }
}

/// Decides layout, inode form and xattrs for one node. Directory bytes are filled in
/// later (they need nids) but their size and split are fixed here.
fn plan_inode(
    id: NodeId,
    node: &Node,
    index: usize,
    nlink: u32,
    build: (i64, u32),
    path: &str,
    shared: &xattr::SharedXattrs,
) -> Result<Planned, ErofsError> {
    let meta = &node.meta;
    let mut entries = Vec::with_capacity(meta.xattrs.len());
    let mut shared_ids = Vec::new();
    let mut sorted: Vec<&(Vec<u8>, Vec<u8>)> = meta.xattrs.iter().collect();
    sorted.sort();
    for (name, value) in sorted {
        let shown = || String::from_utf8_lossy(name).into_owned();
        let (index, suffix) = xattr::split_name(name).ok_or_else(|| ErofsError::XattrPrefix {
            path: path.to_owned(),
            name: shown(),
        })?;
        if suffix.len() > 255 || value.len() > usize::from(u16::MAX) {
            return Err(ErofsError::XattrTooLarge {
                path: path.to_owned(),
                name: shown(),
                len: value.len(),
            });
        }
        match shared.id(name, value) {
            Some(id) if shared_ids.len() < xattr::MAX_SHARED_PER_INODE => shared_ids.push(id),
            _ => entries.push((index, suffix, value.as_slice())),
        }
    }
    let (xattrs, xattr_icount) = xattr::encode_ibody(&shared_ids, &entries);

    let (type_bits, file_type, size, rdev) = match &node.content {
        Content::Directory(entries) => {
            // The size depends on the sorted order of names, not just their lengths.
            let mut names: Vec<&[u8]> = entries.keys().map(Vec::as_slice).collect();
            names.extend([&b"."[..], b".."]);
            names.sort();
            let sorted_lens: Vec<usize> = names.iter().map(|n| n.len()).collect();
            (0o040000, file_type::DIR, dir::plan(&sorted_lens).1, 0)
        }
        Content::File(FileData::Inline(data)) => (0o100000, file_type::REG, data.len() as u64, 0),
        Content::File(FileData::Chunked { size, .. }) => (0o100000, file_type::REG, *size, 0),
        Content::Symlink(target) => (0o120000, file_type::LNK, target.len() as u64, 0),
        Content::CharDevice { major, minor } => (
            0o020000,
            file_type::CHR,
            0,
            ondisk::encode_dev(*major, *minor),
        ),
        Content::BlockDevice { major, minor } => (
            0o060000,
            file_type::BLK,
            0,
            ondisk::encode_dev(*major, *minor),
        ),
        Content::Fifo => (0o010000, file_type::FIFO, 0, 0),
        Content::Socket => (0o140000, file_type::SOCK, 0, 0),
    };
    let fits_compact = meta.uid <= u32::from(u16::MAX)
        && meta.gid <= u32::from(u16::MAX)
        && nlink <= u32::from(u16::MAX)
        && size <= u64::from(u32::MAX)
        && (meta.mtime, meta.mtime_nsec) == build;
    let inode = Inode {
        extended: !fits_compact,
        layout: ondisk::LAYOUT_FLAT_PLAIN,
        xattr_icount,
        mode: type_bits | (meta.permissions & 0o7777),
        nlink,
        size,
        i_u: rdev,
        ino: (index + 1) as u32,
        uid: meta.uid,
        gid: meta.gid,
        mtime: meta.mtime as u64,
        mtime_nsec: meta.mtime_nsec,
    };
    let head = inode.size_on_disk() + xattrs.len();
    let mut planned = Planned {
        id,
        inode,
        xattrs,
        after: Vec::new(),
        after_is_chunk_index: false,
        plain: Vec::new(),
        file_type,
        nid: 0,
    };
    let inline_bytes: Option<&[u8]> = match &node.content {
        Content::File(FileData::Inline(data)) => Some(data),
        Content::Symlink(target) => Some(target),
        _ => None,
    };
    match &node.content {
        Content::File(FileData::Chunked { chunks, .. }) => {
            planned.inode.layout = ondisk::LAYOUT_CHUNK_BASED;
            planned.inode.i_u = u32::from(ondisk::CHUNK_FORMAT_INDEXES | CHUNK_BLKBITS);
            planned.after = chunks
                .iter()
                .flat_map(|c| ondisk::chunk_index(*c))
                .collect();
            planned.after_is_chunk_index = true;
            debug_assert_eq!(chunks.len() as u64, size.div_ceil(CHUNK_SIZE));
        }
        Content::Directory(_) | Content::File(FileData::Inline(_)) | Content::Symlink(_) => {
            let tail = (size % BLOCK_SIZE) as usize;
            if tail != 0 && head + tail <= BLOCK {
                planned.inode.layout = ondisk::LAYOUT_FLAT_INLINE;
                // Reserve room now; directory bytes arrive after placement.
                planned.plain = vec![0; size as usize - tail];
                planned.after = vec![0; tail];
            } else if size > 0 {
                planned.plain = vec![0; size as usize];
            }
            if let Some(bytes) = inline_bytes {
                split_data(&mut planned, bytes);
            }
        }
        _ => {}
    }
    Ok(planned)
}
