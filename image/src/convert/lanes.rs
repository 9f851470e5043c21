//! The data space in two lanes. The files an image reads as it starts (its prefetch
//! list) are laid out first, in a run of whole chunks, so a fetcher can fetch all of
//! them at mount in a few large range requests; every other file follows. Both lanes
//! stream from the one pass over the tar; the rest lane's block addresses move up by the
//! start-up lane's size at the end.

use std::collections::HashSet;
use std::path::Path;

use super::{ConvertError, ConvertOptions};
use crate::blob::{DataSpace, DataSpaceWriter};
use crate::erofs::{Content, FileData, FsTree, NodeId};

pub struct Lanes {
    startup: Option<Startup>,
    rest: DataSpaceWriter,
    /// Files written to the rest lane while a start-up lane exists (to move at the end).
    moved: Vec<NodeId>,
}

struct Startup {
    /// Listed paths relative to the layer root (`usr/bin/python3`), as tar paths are.
    paths: HashSet<Vec<u8>>,
    writer: DataSpaceWriter,
}

/// Which lane a file's data went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Startup,
    Rest,
}

impl Lanes {
    /// A start-up lane only when `options` lists paths.
    pub fn new(options: &ConvertOptions, temp_dir: &Path) -> Result<Self, ConvertError> {
        let writer = || {
            DataSpaceWriter::with_threads(
                options.compression,
                options.chunk_size,
                options.threads,
                temp_dir,
            )
        };
        let startup = if options.prefetch.is_empty() {
            None
        } else {
            let paths = options
                .prefetch
                .iter()
                .map(|p| p.trim_start_matches('/').as_bytes().to_vec())
                .collect();
            Some(Startup {
                paths,
                writer: writer()?,
            })
        };
        Ok(Self {
            startup,
            rest: writer()?,
            moved: Vec::new(),
        })
    }

    /// One lane: every file in `writer` (tests).
    pub fn single(writer: DataSpaceWriter) -> Self {
        Self {
            startup: None,
            rest: writer,
            moved: Vec::new(),
        }
    }

    /// The lane for a file at `parts` (its path's components): the start-up one when
    /// the file or a directory above it is listed ("/" lists everything).
    pub fn for_path(&mut self, parts: &[&[u8]]) -> (&mut DataSpaceWriter, Lane) {
        if let Some(startup) = &mut self.startup {
            let listed = (0..=parts.len()).any(|n| startup.paths.contains(&parts[..n].join(&b'/')));
            if listed {
                return (&mut startup.writer, Lane::Startup);
            }
        }
        (&mut self.rest, Lane::Rest)
    }

    /// `node`'s data went to `lane`.
    pub fn placed(&mut self, node: NodeId, lane: Lane) {
        if lane == Lane::Rest && self.startup.is_some() {
            self.moved.push(node);
        }
    }

    /// The finished data space: the start-up lane padded to a chunk boundary, then the
    /// rest, whose files' block addresses in `tree` are moved past the start-up lane.
    pub fn finish(self, tree: &mut FsTree) -> Result<DataSpace, ConvertError> {
        let rest = self.rest.finish()?;
        let Some(startup) = self.startup else {
            return Ok(rest);
        };
        let mut front = startup.writer;
        front.align_chunk()?;
        let front = front.finish()?;
        let shift = u32::try_from(front.size / 4096).map_err(|_| ConvertError::TooLarge)?;
        for node in self.moved {
            if let Content::File(FileData::Chunked { chunks, .. }) =
                &mut tree.node_mut(node).content
            {
                for block in chunks.iter_mut().flatten() {
                    *block = block.checked_add(shift).ok_or(ConvertError::TooLarge)?;
                }
            }
        }
        Ok(front.then(rest)?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ConvertOptions, convert_layer};
    use crate::blob::{BlobReader, Compression};

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    fn block_padded(bytes: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        out.resize(bytes.len().div_ceil(4096) * 4096, 0);
        out
    }

    /// Listed files (and files under a listed directory) come first, in tar order, then
    /// the start-up lane is padded to a whole chunk, then everything else.
    #[test]
    fn listed_files_are_laid_out_first_in_whole_chunks() {
        let files = [
            ("b", pattern(500_000, 2)),
            ("a", pattern(300_000, 1)),
            ("d/c", pattern(200_000, 3)),
            ("e", pattern(70_000, 4)),
        ];
        let mut builder = tar::Builder::new(Vec::new());
        for (name, bytes) in &files {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_cksum();
            builder
                .append_data(&mut header, name, &bytes[..])
                .expect("tar");
        }
        let tar = builder.into_inner().expect("tar");
        let dir = tempfile::tempdir().expect("tempdir");
        let options = ConvertOptions {
            compression: Compression::Zstd { level: 1 },
            chunk_size: 64 << 10,
            prefetch: vec!["/a".into(), "/d".into(), "/missing".into()],
            ..ConvertOptions::default()
        };
        let mut blob = Vec::new();
        let converted = convert_layer(&tar[..], &mut blob, &options, dir.path()).expect("convert");
        let startup: Vec<u8> = [block_padded(&files[1].1), block_padded(&files[2].1)].concat();
        let size = converted.blob.startup_size;
        assert_eq!(size, (startup.len() as u64).div_ceil(64 << 10) * (64 << 10));
        let reader = BlobReader::open(&blob[..], &converted.blob.verified_digest).expect("open");
        let front = reader.read_data(0, size).expect("front");
        assert_eq!(front[..startup.len()], startup[..], "a, then d/c");
        assert!(front[startup.len()..].iter().all(|&b| b == 0), "padding");
        let rest: Vec<u8> = [block_padded(&files[0].1), files[3].1.clone()].concat();
        let back = reader.read_data(size, rest.len() as u64).expect("rest");
        assert_eq!(back, rest, "b, then e, after the start-up lane");

        let unlisted = ConvertOptions {
            prefetch: vec!["/nothing/here".into()],
            ..options.clone()
        };
        let mut plain = Vec::new();
        let none = convert_layer(&tar[..], &mut plain, &unlisted, dir.path()).expect("convert");
        assert_eq!(none.blob.startup_size, 0);
        let mut default = Vec::new();
        let options = ConvertOptions {
            prefetch: Vec::new(),
            ..options
        };
        convert_layer(&tar[..], &mut default, &options, dir.path()).expect("convert");
        assert_eq!(plain, default, "a list naming nothing here changes nothing");
    }
}
