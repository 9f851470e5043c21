//! The filesystem an image describes: nodes with metadata and content, directories
//! mapping names to nodes (several names may share a node: hard links).

use std::collections::BTreeMap;

/// Index of a node in its [`FsTree`]; the root is `FsTree::ROOT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub(crate) usize);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Permission bits and setuid/setgid/sticky (`0o7777`); the type comes from content.
    pub permissions: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Full xattr names (`user.foo`, `security.capability`, …) and values, any order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileData {
    /// Bytes stored in the metadata image itself.
    Inline(Vec<u8>),
    /// `size` bytes in the data device: one block address per 1 MiB chunk, `None` for a
    /// hole (reads as zeros). Each chunk's bytes are contiguous from its address.
    Chunked { size: u64, chunks: Vec<Option<u32>> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Directory(BTreeMap<Vec<u8>, NodeId>),
    File(FileData),
    Symlink(Vec<u8>),
    CharDevice { major: u32, minor: u32 },
    BlockDevice { major: u32, minor: u32 },
    Fifo,
    Socket,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub meta: Metadata,
    pub content: Content,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    #[error("invalid file name {0:?} (empty, '.', '..', contains '/' or NUL, or over 255 bytes)")]
    BadName(String),
    #[error("{0:?} is not a directory")]
    NotADirectory(String),
    #[error("hard link to a directory is not allowed ({0:?})")]
    DirectoryLink(String),
    #[error("chunk table of {name:?} has {got} entries, {size} bytes need {want}")]
    ChunkCount {
        name: String,
        size: u64,
        got: usize,
        want: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsTree {
    nodes: Vec<Node>,
}

fn shown(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name != b"."
        && name != b".."
        && name.len() <= 255
        && !name.contains(&b'/')
        && !name.contains(&0)
}

impl FsTree {
    pub const ROOT: NodeId = NodeId(0);

    pub fn new(root: Metadata) -> Self {
        Self {
            nodes: vec![Node {
                meta: root,
                content: Content::Directory(BTreeMap::new()),
            }],
        }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id.0]
    }

    /// The child `name` of directory `dir`.
    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        match &self.node(dir).content {
            Content::Directory(entries) => entries.get(name).copied(),
            _ => None,
        }
    }

    fn entries_mut(
        &mut self,
        dir: NodeId,
        name: &[u8],
    ) -> Result<&mut BTreeMap<Vec<u8>, NodeId>, TreeError> {
        match &mut self.node_mut(dir).content {
            Content::Directory(entries) => Ok(entries),
            _ => Err(TreeError::NotADirectory(shown(name))),
        }
    }

    /// Adds (or replaces) `name` in `dir` with a new node; returns its id.
    pub fn insert(
        &mut self,
        dir: NodeId,
        name: &[u8],
        meta: Metadata,
        content: Content,
    ) -> Result<NodeId, TreeError> {
        if !valid_name(name) {
            return Err(TreeError::BadName(shown(name)));
        }
        if let Content::File(FileData::Chunked { size, chunks }) = &content {
            let want = size.div_ceil(super::CHUNK_SIZE);
            if chunks.len() as u64 != want {
                return Err(TreeError::ChunkCount {
                    name: shown(name),
                    size: *size,
                    got: chunks.len(),
                    want,
                });
            }
        }
        self.entries_mut(dir, name)?;
        let id = NodeId(self.nodes.len());
        self.nodes.push(Node { meta, content });
        self.entries_mut(dir, name)?.insert(name.to_vec(), id);
        Ok(id)
    }

    /// Adds `name` in `dir` as another name of `target` (a hard link).
    pub fn link(&mut self, dir: NodeId, name: &[u8], target: NodeId) -> Result<(), TreeError> {
        if !valid_name(name) {
            return Err(TreeError::BadName(shown(name)));
        }
        if matches!(self.node(target).content, Content::Directory(_)) {
            return Err(TreeError::DirectoryLink(shown(name)));
        }
        self.entries_mut(dir, name)?.insert(name.to_vec(), target);
        Ok(())
    }

    /// Removes `name` from `dir`; the node stays allocated but unreachable (not written).
    pub fn remove(&mut self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        match &mut self.node_mut(dir).content {
            Content::Directory(entries) => entries.remove(name),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        let mut tree = FsTree::new(Metadata::default());
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b", &[b'x'; 256]] {
            assert!(
                tree.insert(FsTree::ROOT, bad, Metadata::default(), Content::Fifo)
                    .is_err(),
                "{bad:?}"
            );
        }
        assert!(
            tree.insert(
                FsTree::ROOT,
                &[0xff, 0xfe],
                Metadata::default(),
                Content::Fifo
            )
            .is_ok()
        );
    }

    #[test]
    fn hard_links_to_directories_are_refused_and_files_under_files_too() {
        let mut tree = FsTree::new(Metadata::default());
        let d = tree
            .insert(
                FsTree::ROOT,
                b"d",
                Metadata::default(),
                Content::Directory(BTreeMap::new()),
            )
            .expect("dir");
        assert_eq!(
            tree.link(FsTree::ROOT, b"e", d),
            Err(TreeError::DirectoryLink("e".into()))
        );
        let f = tree
            .insert(FsTree::ROOT, b"f", Metadata::default(), Content::Fifo)
            .expect("fifo");
        assert!(matches!(
            tree.insert(f, b"x", Metadata::default(), Content::Fifo),
            Err(TreeError::NotADirectory(_))
        ));
    }

    #[test]
    fn chunk_table_must_cover_the_size() {
        let mut tree = FsTree::new(Metadata::default());
        let content = Content::File(FileData::Chunked {
            size: (1 << 20) + 1,
            chunks: vec![Some(0)],
        });
        assert!(matches!(
            tree.insert(FsTree::ROOT, b"f", Metadata::default(), content),
            Err(TreeError::ChunkCount { want: 2, .. })
        ));
    }
}
