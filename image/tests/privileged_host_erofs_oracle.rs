//! The real kernel as oracle for the EROFS writer: write a metadata image and a data
//! device, mount them file-backed (`device=`, Linux ≥ 6.12, root), and compare every
//! path's type, mode, owner, size, mtime, nlink, xattrs, link target, device number and
//! content with what the tree said.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use lazy_erofs_image::erofs::{
    CHUNK_SIZE, Content, FileData, FsTree, Metadata, NodeId, WriteOptions, write_metadata,
};
use lazy_erofs_test_support::pseudo_random;

/// What a path should look like once mounted.
#[derive(Debug, Clone)]
struct Expect {
    mode: u32,
    meta: Metadata,
    size: u64,
    nlink: u64,
    content: ExpectContent,
}

#[derive(Debug, Clone)]
enum ExpectContent {
    Dir(Vec<Vec<u8>>),
    Bytes(Vec<u8>),
    /// (size, [(offset, bytes)]) with zeros elsewhere.
    Sparse(u64, Vec<(u64, Vec<u8>)>),
    Link(Vec<u8>),
    Dev(u64),
    None,
}

struct Builder {
    tree: FsTree,
    data: Vec<u8>,
    expect: BTreeMap<PathBuf, Expect>,
}

fn meta(permissions: u16, uid: u32, gid: u32, mtime: i64) -> Metadata {
    Metadata {
        permissions,
        uid,
        gid,
        mtime,
        mtime_nsec: 0,
        xattrs: Vec::new(),
    }
}

impl Builder {
    fn dir(
        &mut self,
        parent: NodeId,
        parent_path: &Path,
        name: &[u8],
        m: Metadata,
    ) -> Result<(NodeId, PathBuf)> {
        let id = self
            .tree
            .insert(parent, name, m.clone(), Content::Directory(BTreeMap::new()))?;
        let path = parent_path.join(OsStr::from_bytes(name));
        self.expect.insert(
            path.clone(),
            Expect {
                mode: 0o040000 | u32::from(m.permissions),
                meta: m,
                size: 0,
                nlink: 2,
                content: ExpectContent::Dir(Vec::new()),
            },
        );
        Ok((id, path))
    }

    fn file(
        &mut self,
        parent: NodeId,
        parent_path: &Path,
        name: &[u8],
        m: Metadata,
        bytes: Vec<u8>,
        inline: bool,
    ) -> Result<NodeId> {
        let size = bytes.len() as u64;
        let data = if inline {
            FileData::Inline(bytes.clone())
        } else {
            // Contiguous, 4 KiB aligned in the data device, like the converter lays it out.
            let start_block = (self.data.len() / 4096) as u32;
            self.data.extend_from_slice(&bytes);
            self.data.resize(self.data.len().div_ceil(4096) * 4096, 0);
            let chunks = (0..size.div_ceil(CHUNK_SIZE))
                .map(|i| Some(start_block + (i * 256) as u32))
                .collect();
            FileData::Chunked { size, chunks }
        };
        let id = self
            .tree
            .insert(parent, name, m.clone(), Content::File(data))?;
        self.expect.insert(
            parent_path.join(OsStr::from_bytes(name)),
            Expect {
                mode: 0o100000 | u32::from(m.permissions),
                meta: m,
                size,
                nlink: 1,
                content: ExpectContent::Bytes(bytes),
            },
        );
        Ok(id)
    }

    fn other(
        &mut self,
        parent: NodeId,
        parent_path: &Path,
        name: &[u8],
        m: Metadata,
        content: Content,
    ) -> Result<NodeId> {
        let (type_bits, size, expect) = match &content {
            Content::Symlink(t) => (0o120000, t.len() as u64, ExpectContent::Link(t.clone())),
            Content::CharDevice { major, minor } => (
                0o020000,
                0,
                ExpectContent::Dev(nix::sys::stat::makedev(
                    u64::from(*major),
                    u64::from(*minor),
                )),
            ),
            Content::BlockDevice { major, minor } => (
                0o060000,
                0,
                ExpectContent::Dev(nix::sys::stat::makedev(
                    u64::from(*major),
                    u64::from(*minor),
                )),
            ),
            Content::Fifo => (0o010000, 0, ExpectContent::None),
            Content::Socket => (0o140000, 0, ExpectContent::None),
            _ => unreachable!("use dir() or file()"),
        };
        let id = self.tree.insert(parent, name, m.clone(), content)?;
        self.expect.insert(
            parent_path.join(OsStr::from_bytes(name)),
            Expect {
                mode: type_bits | u32::from(m.permissions),
                meta: m,
                size,
                nlink: 1,
                content: expect,
            },
        );
        Ok(id)
    }
}

fn build() -> Result<Builder> {
    let root_meta = meta(0o755, 0, 0, 1_700_000_000);
    let mut b = Builder {
        tree: FsTree::new(root_meta.clone()),
        data: Vec::new(),
        expect: BTreeMap::new(),
    };
    b.expect.insert(
        PathBuf::from("/"),
        Expect {
            mode: 0o040755,
            meta: root_meta,
            size: 0,
            nlink: 2,
            content: ExpectContent::Dir(Vec::new()),
        },
    );
    let root = FsTree::ROOT;
    let top = PathBuf::from("/");
    let t = 1_700_000_000;

    let mut hello_meta = meta(0o644, 1000, 1000, t);
    hello_meta
        .xattrs
        .push((b"user.test".to_vec(), b"abc".to_vec()));
    let hello = b.file(
        root,
        &top,
        b"hello.txt",
        hello_meta,
        b"hello, lazy world\n".to_vec(),
        true,
    )?;
    // Hard link: same inode, nlink 2.
    b.tree.link(root, b"hardlink", hello)?;
    for p in ["/hello.txt", "/hardlink"] {
        let mut e = b
            .expect
            .get(Path::new("/hello.txt"))
            .context("hello")?
            .clone();
        e.nlink = 2;
        b.expect.insert(PathBuf::from(p), e);
    }

    let mut big_meta = meta(0o755, 0, 0, t + 5);
    big_meta.mtime_nsec = 123_456_789;
    big_meta.xattrs.push((
        b"security.capability".to_vec(),
        vec![
            1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    ));
    b.file(
        root,
        &top,
        b"big.bin",
        big_meta,
        pseudo_random(3 * 1024 * 1024 + 512 * 1024 + 17, 1),
        false,
    )?;
    b.file(
        root,
        &top,
        b"exactly-4k",
        meta(0o600, 0, 0, t),
        pseudo_random(4096, 2),
        true,
    )?;
    b.file(root, &top, b"empty", meta(0o644, 0, 0, t), Vec::new(), true)?;
    b.file(
        root,
        &top,
        b"medium-inline",
        meta(0o644, 0, 0, t),
        pseudo_random(9000, 3),
        true,
    )?;

    // A sparse file larger than 4 GiB: data in the first and last chunks only.
    let sparse_size = 5 * 1024 * 1024 * 1024u64 + 4096;
    let nchunks = sparse_size.div_ceil(CHUNK_SIZE);
    let first = pseudo_random(CHUNK_SIZE as usize, 4);
    let last_len = (sparse_size - (nchunks - 1) * CHUNK_SIZE) as usize;
    let last = pseudo_random(last_len, 5);
    let first_block = (b.data.len() / 4096) as u32;
    b.data.extend_from_slice(&first);
    let last_block = (b.data.len() / 4096) as u32;
    b.data.extend_from_slice(&last);
    b.data.resize(b.data.len().div_ceil(4096) * 4096, 0);
    let mut chunks = vec![None; nchunks as usize];
    chunks[0] = Some(first_block);
    chunks[nchunks as usize - 1] = Some(last_block);
    let sparse_meta = meta(0o644, 70_000, 70_001, t);
    b.tree.insert(
        root,
        b"sparse.bin",
        sparse_meta.clone(),
        Content::File(FileData::Chunked {
            size: sparse_size,
            chunks,
        }),
    )?;
    b.expect.insert(
        PathBuf::from("/sparse.bin"),
        Expect {
            mode: 0o100644,
            meta: sparse_meta,
            size: sparse_size,
            nlink: 1,
            content: ExpectContent::Sparse(
                sparse_size,
                vec![(0, first), ((nchunks - 1) * CHUNK_SIZE, last)],
            ),
        },
    );

    b.other(
        root,
        &top,
        b"link",
        meta(0o777, 0, 0, t),
        Content::Symlink(b"hello.txt".to_vec()),
    )?;
    b.other(
        root,
        &top,
        b"long-link",
        meta(0o777, 0, 0, t),
        Content::Symlink(vec![b'x'; 4095]),
    )?;
    b.other(
        root,
        &top,
        b"whiteout",
        meta(0o000, 0, 0, t),
        Content::CharDevice { major: 0, minor: 0 },
    )?;
    b.other(
        root,
        &top,
        b"sda1",
        meta(0o660, 0, 6, t),
        Content::BlockDevice { major: 8, minor: 1 },
    )?;
    b.other(
        root,
        &top,
        b"tty-big-minor",
        meta(0o620, 0, 5, t),
        Content::CharDevice {
            major: 136,
            minor: 300,
        },
    )?;
    b.other(root, &top, b"fifo", meta(0o644, 0, 0, t), Content::Fifo)?;
    b.other(root, &top, b"socket", meta(0o755, 0, 0, t), Content::Socket)?;
    b.file(
        root,
        &top,
        &[0xff, 0xfe, b'x'],
        meta(0o644, 0, 0, t),
        b"non-utf8 name\n".to_vec(),
        true,
    )?;
    b.file(
        root,
        &top,
        &[b'n'; 255],
        meta(0o644, 0, 0, t),
        b"long name\n".to_vec(),
        true,
    )?;

    let mut opaque = meta(0o755, 0, 0, t);
    opaque
        .xattrs
        .push((b"trusted.overlay.opaque".to_vec(), b"y".to_vec()));
    let (_, _) = b.dir(root, &top, b"opaque-dir", opaque)?;

    // POSIX ACLs (as the kernel's xattr form: version 2, then tag/perm/id entries).
    let acl = |entries: &[(u16, u16, u32)]| {
        let mut out = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&perm.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    };
    let access = acl(&[
        (0x01, 6, u32::MAX),
        (0x02, 4, 1000),
        (0x04, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ]);
    let mut acl_file = meta(0o640, 0, 0, t);
    acl_file
        .xattrs
        .push((b"system.posix_acl_access".to_vec(), access.clone()));
    b.file(root, &top, b"acl-file", acl_file, b"acl\n".to_vec(), true)?;
    let mut acl_dir = meta(0o750, 0, 0, t);
    acl_dir
        .xattrs
        .push((b"system.posix_acl_access".to_vec(), access.clone()));
    acl_dir
        .xattrs
        .push((b"system.posix_acl_default".to_vec(), access));
    b.dir(root, &top, b"acl-dir", acl_dir)?;

    let (many, many_path) = b.dir(root, &top, b"many", meta(0o755, 0, 0, t))?;
    for i in 0..20_000 {
        // Every 100th entry carries xattrs others carry too: stored once, shared.
        let mut entry_meta = meta(0o644, 0, 0, t);
        if i % 100 == 0 {
            entry_meta
                .xattrs
                .push((b"user.shared".to_vec(), b"common value".to_vec()));
            entry_meta.xattrs.push((
                b"security.label".to_vec(),
                format!("l{}", i % 3).into_bytes(),
            ));
            if i % 200 == 0 {
                entry_meta
                    .xattrs
                    .push((format!("user.own-{i}").into_bytes(), vec![7; 40]));
            }
        }
        b.file(
            many,
            &many_path,
            format!("entry-{i:05}-with-a-longer-name").as_bytes(),
            entry_meta,
            Vec::new(),
            true,
        )?;
    }
    let (mut deep, mut deep_path) = b.dir(root, &top, b"deep", meta(0o755, 0, 0, t))?;
    for level in 0..40 {
        let (id, path) = b.dir(
            deep,
            &deep_path,
            format!("level-{level}").as_bytes(),
            meta(0o755, 0, 0, t + level),
        )?;
        (deep, deep_path) = (id, path);
    }
    b.file(
        deep,
        &deep_path,
        b"bottom",
        meta(0o644, 0, 0, t),
        b"bottom\n".to_vec(),
        true,
    )?;
    fix_dir_expectations(&mut b);
    Ok(b)
}

/// Directory nlink (2 + subdirectories) and entry lists from the expectations.
fn fix_dir_expectations(b: &mut Builder) {
    let paths: Vec<PathBuf> = b.expect.keys().cloned().collect();
    for path in &paths {
        if path == Path::new("/") {
            continue;
        }
        let parent = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        let is_dir = matches!(b.expect[path].content, ExpectContent::Dir(_));
        let name = path
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default();
        if let Some(p) = b.expect.get_mut(&parent)
            && let ExpectContent::Dir(names) = &mut p.content
        {
            names.push(name);
            if is_dir {
                p.nlink += 1;
            }
        }
    }
}

fn compare(mnt: &Path, expect: &BTreeMap<PathBuf, Expect>) -> Result<usize> {
    let mut checked = 0;
    for (rel, e) in expect {
        let path = mnt.join(rel.strip_prefix("/")?);
        let what = rel.display();
        let st = fs::symlink_metadata(&path).with_context(|| format!("{what}: lstat"))?;
        ensure!(
            st.mode() == e.mode,
            "{what}: mode {:o}, want {:o}",
            st.mode(),
            e.mode
        );
        ensure!(
            (st.uid(), st.gid()) == (e.meta.uid, e.meta.gid),
            "{what}: owner {}:{}",
            st.uid(),
            st.gid()
        );
        ensure!(
            (st.mtime(), st.mtime_nsec()) == (e.meta.mtime, i64::from(e.meta.mtime_nsec)),
            "{what}: mtime {}.{}",
            st.mtime(),
            st.mtime_nsec()
        );
        ensure!(
            st.nlink() == e.nlink,
            "{what}: nlink {}, want {}",
            st.nlink(),
            e.nlink
        );
        if !matches!(e.content, ExpectContent::Dir(_)) {
            ensure!(
                st.size() == e.size,
                "{what}: size {}, want {}",
                st.size(),
                e.size
            );
        }
        let mut want_x: Vec<(Vec<u8>, Vec<u8>)> = e.meta.xattrs.clone();
        want_x.sort();
        let mut got_x = Vec::new();
        if !st.file_type().is_symlink() {
            for name in xattr::list(&path)? {
                let value = xattr::get(&path, &name)?.unwrap_or_default();
                got_x.push((name.as_bytes().to_vec(), value));
            }
        }
        got_x.sort();
        ensure!(got_x == want_x, "{what}: xattrs {got_x:?}, want {want_x:?}");
        match &e.content {
            ExpectContent::Dir(names) => {
                let mut want: Vec<Vec<u8>> = names.clone();
                want.sort();
                let mut got: Vec<Vec<u8>> = fs::read_dir(&path)?
                    .map(|d| d.map(|d| d.file_name().as_bytes().to_vec()))
                    .collect::<Result<_, _>>()?;
                got.sort();
                ensure!(
                    got == want,
                    "{what}: {} entries, want {}",
                    got.len(),
                    want.len()
                );
            }
            ExpectContent::Bytes(bytes) => {
                ensure!(&fs::read(&path)? == bytes, "{what}: content differs")
            }
            ExpectContent::Sparse(size, extents) => {
                let f = fs::File::open(&path)?;
                for (offset, bytes) in extents {
                    let mut got = vec![0u8; bytes.len()];
                    f.read_exact_at(&mut got, *offset)?;
                    ensure!(&got == bytes, "{what}: data at {offset} differs");
                }
                let mut hole = vec![1u8; 1 << 20];
                f.read_exact_at(&mut hole, size / 2)?;
                ensure!(hole.iter().all(|&b| b == 0), "{what}: hole is not zeros");
            }
            ExpectContent::Link(target) => ensure!(
                fs::read_link(&path)?.as_os_str().as_bytes() == target.as_slice(),
                "{what}: link target"
            ),
            ExpectContent::Dev(rdev) => ensure!(
                st.rdev() == *rdev,
                "{what}: rdev {:x}, want {rdev:x}",
                st.rdev()
            ),
            ExpectContent::None => {}
        }
        checked += 1;
    }
    Ok(checked)
}

#[test]
fn privileged_host_kernel_reads_back_everything_the_writer_wrote() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "needs root to mount (run through packaging/test.sh)"
    );
    let b = build()?;
    let work = tempfile::tempdir()?;
    let (meta_path, data_path, mnt) = (
        work.path().join("meta.erofs"),
        work.path().join("data.img"),
        work.path().join("mnt"),
    );
    let options = WriteOptions {
        data_tag: "data".into(),
        data_blocks: (b.data.len() / 4096) as u32,
    };
    let image = write_metadata(&b.tree, &options)?;
    assert_eq!(
        image,
        write_metadata(&b.tree, &options)?,
        "not deterministic"
    );
    fs::write(&meta_path, &image)?;
    fs::write(&data_path, &b.data)?;
    // erofs-utils' own checker (1.5 here) must accept the image too.
    let fsck = std::process::Command::new("fsck.erofs")
        .arg(format!("--device={}", data_path.display()))
        .arg(&meta_path)
        .output()
        .context("run fsck.erofs (erofs-utils)")?;
    ensure!(
        fsck.status.success(),
        "fsck.erofs: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    fs::create_dir_all(&mnt)?;
    let _mounted = lazy_erofs_test_support::mount_erofs_file(&meta_path, &data_path, &mnt)
        .context(
            "file-backed mount of the written image (kernel ≥ 6.12 with EROFS_FS_BACKED_BY_FILE)",
        )?;
    let checked = compare(&mnt, &b.expect)?;
    println!(
        "metadata {} KiB, data {} KiB, {checked} paths identical",
        image.len() / 1024,
        b.data.len() / 1024
    );
    assert!(checked > 20_000);
    Ok(())
}
