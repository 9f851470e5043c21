//! Applies tar entries to an [`FsTree`] with OCI layer semantics: normalised paths,
//! implicit parent directories, hard links, whiteouts turned into overlayfs whiteouts
//! (`.wh.NAME` → 0/0 char device, `.wh..wh..opq` → `trusted.overlay.opaque=y`).

use std::collections::BTreeMap;
use std::io::Read;

use super::lanes::Lanes;
use super::{ConvertError, INLINE_MAX};
use crate::blob::{DataSpace, DataSpaceWriter};
use crate::erofs::{CHUNK_SIZE, Content, FileData, FsTree, Metadata, NodeId};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Larger regular files are refused: a header can claim any size, and a sparse entry
/// could make us walk (and index) petabytes of holes.
const MAX_FILE_SIZE: u64 = 1 << 40;

pub struct LayerTree {
    tree: FsTree,
    /// One chunk's worth of file bytes, reused for every file (a fresh zeroed 1 MiB
    /// buffer per file cost a memset of 1 MiB per file).
    scratch: Vec<u8>,
}

fn shown(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// Path components of a tar path, without `.`/empty parts; `..` is an error.
fn components(path: &[u8]) -> Result<Vec<&[u8]>, ConvertError> {
    let mut out = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(ConvertError::PathEscapes(shown(path))),
            name => out.push(name),
        }
    }
    Ok(out)
}

fn implicit_dir_meta() -> Metadata {
    Metadata {
        permissions: 0o755,
        ..Metadata::default()
    }
}

impl LayerTree {
    pub fn new() -> Self {
        Self {
            tree: FsTree::new(implicit_dir_meta()),
            scratch: Vec::new(),
        }
    }

    pub fn fs_tree(&self) -> &FsTree {
        &self.tree
    }

    /// The data space the files went to, their block addresses final.
    pub fn finish_data(&mut self, lanes: Lanes) -> Result<DataSpace, ConvertError> {
        lanes.finish(&mut self.tree)
    }

    /// The directory holding the last component, creating missing parents.
    fn parent_dir(&mut self, parts: &[&[u8]], path: &[u8]) -> Result<NodeId, ConvertError> {
        let mut dir = FsTree::ROOT;
        for part in &parts[..parts.len().saturating_sub(1)] {
            dir = match self.tree.lookup(dir, part) {
                Some(id) if matches!(self.tree.node(id).content, Content::Directory(_)) => id,
                Some(_) => {
                    return Err(ConvertError::Entry {
                        entry: shown(path),
                        reason: format!("parent {:?} is not a directory", shown(part)),
                    });
                }
                None => self.tree.insert(
                    dir,
                    part,
                    implicit_dir_meta(),
                    Content::Directory(BTreeMap::new()),
                )?,
            };
        }
        Ok(dir)
    }

    /// Follows an existing path (for hard link targets).
    fn resolve(&self, path: &[u8]) -> Result<Option<NodeId>, ConvertError> {
        let mut node = FsTree::ROOT;
        for part in components(path)? {
            match self.tree.lookup(node, part) {
                Some(id) => node = id,
                None => return Ok(None),
            }
        }
        Ok(Some(node))
    }

    pub fn add<R: Read>(
        &mut self,
        mut entry: tar::Entry<'_, R>,
        lanes: &mut Lanes,
    ) -> Result<(), ConvertError> {
        let header = entry.header().clone();
        // Pax records first: until they parse cleanly, the path the tar crate derived from
        // them cannot be trusted, so errors name the header's own field.
        let meta = metadata(&mut entry, &header).map_err(|e| ConvertError::Entry {
            entry: shown(&header.path_bytes()),
            reason: e.to_string(),
        })?;
        let path = entry.path_bytes().into_owned();
        let bad = |reason: String| ConvertError::Entry {
            entry: shown(&path),
            reason,
        };
        let parts = components(&path)?;
        let kind = header.entry_type();
        let Some(name) = parts.last().copied() else {
            // The layer root itself ("./"): only its metadata matters.
            if kind.is_dir() {
                let root = self.tree.node_mut(FsTree::ROOT);
                root.meta = meta;
            }
            return Ok(());
        };
        let dir = self.parent_dir(&parts, &path)?;

        if name == OPAQUE_MARKER {
            let node = self.tree.node_mut(dir);
            node.meta
                .xattrs
                .retain(|(n, _)| n != b"trusted.overlay.opaque");
            node.meta
                .xattrs
                .push((b"trusted.overlay.opaque".to_vec(), b"y".to_vec()));
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if self.tree.lookup(dir, hidden).is_some() {
                return Err(ConvertError::Duplicate(shown(&path)));
            }
            let whiteout = Metadata {
                permissions: 0,
                xattrs: Vec::new(),
                ..meta
            };
            self.tree.insert(
                dir,
                hidden,
                whiteout,
                Content::CharDevice { major: 0, minor: 0 },
            )?;
            return Ok(());
        }

        if let Some(existing) = self.tree.lookup(dir, name) {
            // A directory may be described again (metadata update); nothing else may.
            let existing_is_dir = matches!(self.tree.node(existing).content, Content::Directory(_));
            if kind.is_dir() && existing_is_dir {
                self.tree.node_mut(existing).meta = meta;
                return Ok(());
            }
            return Err(ConvertError::Duplicate(shown(&path)));
        }

        let content = match kind {
            tar::EntryType::Directory => Content::Directory(BTreeMap::new()),
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let (data, lane) = lanes.for_path(&parts);
                let content =
                    Content::File(file_data(&mut entry, data, &mut self.scratch).map_err(|e| {
                        match e {
                            ConvertError::Io(io) => bad(format!("reading contents: {io}")),
                            other => other,
                        }
                    })?);
                let node = self.tree.insert(dir, name, meta, content)?;
                lanes.placed(node, lane);
                return Ok(());
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad("symlink without a target".into()))?;
                Content::Symlink(target.into_owned())
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                let major = header
                    .device_major()
                    .map_err(|e| bad(e.to_string()))?
                    .unwrap_or(0);
                let minor = header
                    .device_minor()
                    .map_err(|e| bad(e.to_string()))?
                    .unwrap_or(0);
                if kind == tar::EntryType::Char {
                    Content::CharDevice { major, minor }
                } else {
                    Content::BlockDevice { major, minor }
                }
            }
            tar::EntryType::Fifo => Content::Fifo,
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad("hard link without a target".into()))?
                    .into_owned();
                let link_err = |reason: &str| ConvertError::HardLink {
                    path: shown(&path),
                    target: shown(&target),
                    reason: reason.into(),
                };
                let node = self
                    .resolve(&target)?
                    .ok_or_else(|| link_err("target not found earlier in the layer"))?;
                if matches!(self.tree.node(node).content, Content::Directory(_)) {
                    return Err(link_err("target is a directory"));
                }
                self.tree.link(dir, name, node)?;
                return Ok(());
            }
            other => return Err(bad(format!("unsupported tar entry type {other:?}"))),
        };
        // Linux ignores a symlink's mode and creates every one 0777: so does containerd's
        // unpack of the same layer, whatever the tar header says.
        let meta = match content {
            Content::Symlink(_) => Metadata {
                permissions: 0o777,
                ..meta
            },
            _ => meta,
        };
        self.tree.insert(dir, name, meta, content)?;
        Ok(())
    }
}

impl Default for LayerTree {
    fn default() -> Self {
        Self::new()
    }
}

/// Mode, owner, mtime (with pax sub-second precision and pax uid/gid), xattrs (pax
/// `SCHILY.xattr.*`).
fn metadata<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    header: &tar::Header,
) -> std::io::Result<Metadata> {
    let mut meta = Metadata {
        permissions: (header.mode()? & 0o7777) as u16,
        uid: u32::try_from(header.uid()?).unwrap_or(u32::MAX),
        gid: u32::try_from(header.gid()?).unwrap_or(u32::MAX),
        mtime: header.mtime()? as i64,
        mtime_nsec: 0,
        xattrs: Vec::new(),
    };
    if let Some(extensions) = entry.pax_extensions()? {
        for ext in extensions {
            // tar 0.4 splits pax records on newlines instead of walking their lengths, so
            // a value containing '\n' (a binary xattr) fails here; its tail could even
            // parse as a forged record. Refusing the layer keeps us from ever reading a
            // forged path, link target or size.
            let ext = ext.map_err(|_| {
                std::io::Error::other(
                    "pax header record is malformed or has a value containing a newline \
                     (refused: cannot be parsed safely)",
                )
            })?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                meta.xattrs.push((name.to_vec(), value.to_vec()));
            } else if key == b"mtime" {
                if let Some((secs, nsec)) = parse_pax_time(value) {
                    meta.mtime = secs;
                    meta.mtime_nsec = nsec;
                }
            } else if key == b"uid" {
                meta.uid = parse_decimal(value).unwrap_or(meta.uid);
            } else if key == b"gid" {
                meta.gid = parse_decimal(value).unwrap_or(meta.gid);
            }
        }
    }
    Ok(meta)
}

fn parse_decimal(value: &[u8]) -> Option<u32> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// `1700000000.123456789` → (secs, nsec); negative times are kept as whole seconds.
fn parse_pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    let nsec = if digits.is_empty() || secs < 0 {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    Some((secs, nsec))
}

/// Small files inline; larger ones into the data space, one 1 MiB chunk at a time, with
/// all-zero chunks left as holes.
fn file_data<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    data: &mut DataSpaceWriter,
    buf: &mut Vec<u8>,
) -> Result<FileData, ConvertError> {
    let size = entry.size();
    if size <= INLINE_MAX {
        let mut bytes = Vec::with_capacity(size as usize);
        entry.read_to_end(&mut bytes)?;
        if bytes.len() as u64 != size {
            return Err(ConvertError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "entry shorter than its header says",
            )));
        }
        return Ok(FileData::Inline(bytes));
    }
    if size > MAX_FILE_SIZE {
        return Err(ConvertError::Io(std::io::Error::other(format!(
            "file size {size} exceeds the {} GiB limit",
            MAX_FILE_SIZE >> 30
        ))));
    }
    // Capacity from the header is untrusted until the bytes are actually there.
    let mut chunks = Vec::with_capacity(size.div_ceil(CHUNK_SIZE).min(1024) as usize);
    buf.resize(CHUNK_SIZE as usize, 0);
    let mut left = size;
    while left > 0 {
        let n = left.min(CHUNK_SIZE) as usize;
        entry.read_exact(&mut buf[..n])?;
        left -= n as u64;
        if buf[..n].iter().all(|&b| b == 0) {
            chunks.push(None);
            continue;
        }
        data.align_block()?;
        let block = u32::try_from(data.position() / 4096).map_err(|_| ConvertError::TooLarge)?;
        data.write(&buf[..n])?;
        chunks.push(Some(block));
    }
    Ok(FileData::Chunked { size, chunks })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_and_dotdot_refused() {
        assert_eq!(
            components(b"./a//b/./c").ok(),
            Some(vec![&b"a"[..], b"b", b"c"])
        );
        assert_eq!(components(b"/abs/x").ok(), Some(vec![&b"abs"[..], b"x"]));
        assert!(matches!(
            components(b"a/../../etc/passwd"),
            Err(ConvertError::PathEscapes(_))
        ));
    }

    #[test]
    fn a_symlink_is_0777_whatever_its_header_says() {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_mode(0o644);
        header.set_size(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_link(&mut header, "lib", "usr/lib")
            .expect("tar");
        let bytes = builder.into_inner().expect("tar");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut data = Lanes::single(
            DataSpaceWriter::new(crate::blob::Compression::None, 4096, dir.path()).expect("data"),
        );
        let mut tree = LayerTree::new();
        let mut archive = tar::Archive::new(&bytes[..]);
        for entry in archive.entries().expect("entries") {
            tree.add(entry.expect("entry"), &mut data).expect("add");
        }
        let link = tree.tree.lookup(FsTree::ROOT, b"lib").expect("lib");
        assert_eq!(tree.tree.node(link).meta.permissions, 0o777);
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time(b"1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(
            parse_pax_time(b"1700000000.123456789123"),
            Some((1_700_000_000, 123_456_789))
        );
        assert_eq!(parse_pax_time(b"42"), Some((42, 0)));
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
