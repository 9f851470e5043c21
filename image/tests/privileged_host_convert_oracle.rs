//! Converter oracle on the real kernel: build a tree on disk with every kind of entry,
//! let GNU tar make the layer, convert it, read the blob back through the verifying
//! reader, mount the metadata file-backed with the data space as `device=`, and compare
//! every path with the source tar (type, mode, owner, size, mtime, xattrs, link target,
//! device number, content), overlay whiteouts included.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use lazy_erofs_image::blob::BlobReader;
use lazy_erofs_image::convert::{ConvertOptions, ConvertedLayer, convert_layer};
use lazy_erofs_test_support::pseudo_random;
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use sha2::{Digest, Sha256};

fn set_mtime(path: &Path, secs: i64, nsec: i64) -> Result<()> {
    let t = nix::sys::time::TimeSpec::new(secs, nsec);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )?;
    Ok(())
}

/// Every kind of entry the converter must handle.
fn make_source(src: &Path) -> Result<()> {
    fs::create_dir_all(src.join("etc"))?;
    fs::create_dir_all(src.join("bin"))?;
    fs::create_dir_all(src.join("dev"))?;
    fs::write(src.join("etc/hostname"), "lazy\n")?;
    fs::write(src.join("bin/tool"), pseudo_random(3 * 1024 * 1024 + 77, 1))?;
    xattr::set(
        src.join("bin/tool"),
        "security.capability",
        &[
            1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    )?;
    fs::hard_link(src.join("bin/tool"), src.join("bin/tool-hardlink"))?;
    fs::write(src.join("bin/medium"), pseudo_random(3000, 2))?;
    fs::write(src.join("empty"), "")?;
    fs::write(src.join("with-xattrs"), "x")?;
    xattr::set(src.join("with-xattrs"), "user.note", b"a note")?;
    xattr::set(src.join("with-xattrs"), "trusted.custom", b"\x00\x01binary")?;
    symlink("usr/lib", src.join("lib"))?;
    symlink("/etc/hostname", src.join("absolute-link"))?;
    nix::unistd::mkfifo(&src.join("fifo"), Mode::from_bits_truncate(0o640))?;
    mknod(
        &src.join("dev/null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )?;
    mknod(
        &src.join("dev/sda"),
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o660),
        makedev(8, 0),
    )?;
    fs::write(src.join(OsStr::from_bytes(&[b'n'; 255])), "long name")?;
    fs::write(
        src.join(OsStr::from_bytes(&[0xff, 0xfe, b'!'])),
        "not utf-8",
    )?;
    let owned = src.join("owned");
    fs::write(&owned, "owned")?;
    nix::unistd::chown(
        &owned,
        Some(nix::unistd::Uid::from_raw(70_000)),
        Some(nix::unistd::Gid::from_raw(1000)),
    )?;
    fs::create_dir_all(src.join("many"))?;
    for i in 0..20_000 {
        File::create(src.join(format!("many/file-{i:05}")))?;
    }
    let mut deep = src.join("deep");
    for level in 0..40 {
        deep = deep.join(format!("d{level}"));
    }
    fs::create_dir_all(&deep)?;
    fs::write(deep.join("bottom"), "bottom")?;
    // OCI whiteouts, as a layer above another would carry them.
    fs::create_dir_all(src.join("removed"))?;
    File::create(src.join("removed/.wh.gone"))?;
    fs::create_dir_all(src.join("opaque"))?;
    File::create(src.join("opaque/.wh..wh..opq"))?;
    fs::write(src.join("opaque/kept"), "kept")?;
    set_mtime(&src.join("etc/hostname"), 1_700_000_000, 123_456_789)?;
    set_mtime(&src.join("lib"), 1_600_000_000, 0)?;
    set_mtime(&src.join("etc"), 1_650_000_000, 5)?;
    Ok(())
}

fn gnu_tar(src: &Path, out: &Path, args: &[&str]) -> Result<()> {
    let status = Command::new("tar")
        .args(args)
        .args(["--numeric-owner", "-C"])
        .arg(src)
        .arg("-cf")
        .arg(out)
        .arg(".")
        .status()
        .context("run GNU tar")?;
    ensure!(status.success(), "tar failed");
    Ok(())
}

#[derive(Debug, Clone, PartialEq)]
struct Expect {
    kind: char,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    size: u64,
    sha256: Option<[u8; 32]>,
    target: Option<Vec<u8>>,
    rdev: Option<(u32, u32)>,
}

fn normalise(path: &[u8]) -> PathBuf {
    let parts: Vec<&[u8]> = path
        .split(|&b| b == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
        .collect();
    let mut out = PathBuf::from("/");
    for p in parts {
        out.push(OsStr::from_bytes(p));
    }
    out
}

/// What the tar says the layer holds, with overlay whiteout semantics applied.
fn expectations(tar_path: &Path) -> Result<BTreeMap<PathBuf, Expect>> {
    let mut out: BTreeMap<PathBuf, Expect> = BTreeMap::new();
    let mut archive = tar::Archive::new(File::open(tar_path)?);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = normalise(&entry.path_bytes());
        let h = entry.header().clone();
        let mut e = Expect {
            kind: '?',
            mode: h.mode()? & 0o7777,
            uid: h.uid()? as u32,
            gid: h.gid()? as u32,
            mtime: (h.mtime()? as i64, 0),
            xattrs: Vec::new(),
            size: 0,
            sha256: None,
            target: None,
            rdev: None,
        };
        if let Some(exts) = entry.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    e.xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
                } else if ext.key_bytes() == b"mtime" {
                    let v = std::str::from_utf8(ext.value_bytes())?;
                    let (s, f) = v.split_once('.').unwrap_or((v, "0"));
                    e.mtime = (s.parse()?, format!("{:0<9}", &f[..f.len().min(9)]).parse()?);
                }
            }
        }
        let name = path
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default();
        if name == b".wh..wh..opq" {
            let dir = path.parent().context("opq parent")?.to_path_buf();
            out.get_mut(&dir)
                .context("opaque dir listed first")?
                .xattrs
                .push((b"trusted.overlay.opaque".to_vec(), b"y".to_vec()));
            continue;
        }
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            let target = path
                .parent()
                .context("wh parent")?
                .join(OsStr::from_bytes(hidden));
            out.insert(
                target,
                Expect {
                    kind: 'c',
                    mode: 0,
                    xattrs: Vec::new(),
                    rdev: Some((0, 0)),
                    ..e
                },
            );
            continue;
        }
        match h.entry_type() {
            tar::EntryType::Directory => e.kind = 'd',
            tar::EntryType::Regular | tar::EntryType::GNUSparse => {
                e.kind = 'f';
                e.size = entry.size();
                let mut hash = Sha256::new();
                std::io::copy(&mut entry, &mut HashWriter(&mut hash))?;
                e.sha256 = Some(hash.finalize().into());
            }
            tar::EntryType::Symlink => {
                e.kind = 'l';
                // As containerd unpacks it: Linux creates every symlink 0777.
                e.mode = 0o777;
                e.target = entry.link_name_bytes().map(|t| t.into_owned());
                e.size = e.target.as_ref().map_or(0, |t| t.len() as u64);
            }
            tar::EntryType::Link => {
                let target = normalise(&entry.link_name_bytes().context("link target")?);
                let original = out.get(&target).context("hard link target")?.clone();
                out.insert(path, original);
                continue;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                e.kind = if h.entry_type() == tar::EntryType::Char {
                    'c'
                } else {
                    'b'
                };
                e.rdev = Some((
                    h.device_major()?.unwrap_or(0),
                    h.device_minor()?.unwrap_or(0),
                ));
            }
            tar::EntryType::Fifo => e.kind = 'p',
            other => bail!("unexpected tar entry {other:?}"),
        }
        if let Some(old) = out.get(&path)
            && old.kind == 'd'
            && e.kind == 'd'
        {
            let xattrs = old.xattrs.clone();
            out.insert(path, Expect { xattrs, ..e });
        } else {
            out.insert(path, e);
        }
    }
    Ok(out)
}

struct HashWriter<'a>(&'a mut Sha256);
impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn observed(path: &Path) -> Result<Expect> {
    let st = fs::symlink_metadata(path)?;
    let ft = st.file_type();
    use std::os::unix::fs::FileTypeExt;
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_file() {
        'f'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_fifo() {
        'p'
    } else {
        '?'
    };
    let mut xattrs = Vec::new();
    if kind != 'l' {
        for name in xattr::list(path)? {
            xattrs.push((
                name.as_bytes().to_vec(),
                xattr::get(path, &name)?.unwrap_or_default(),
            ));
        }
    }
    let sha256 = if kind == 'f' {
        let mut hash = Sha256::new();
        let mut f = File::open(path)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
        }
        Some(hash.finalize().into())
    } else {
        None
    };
    let rdev = matches!(kind, 'c' | 'b').then(|| {
        (
            nix::sys::stat::major(st.rdev()) as u32,
            nix::sys::stat::minor(st.rdev()) as u32,
        )
    });
    Ok(Expect {
        kind,
        mode: st.mode() & 0o7777,
        uid: st.uid(),
        gid: st.gid(),
        mtime: (st.mtime(), st.mtime_nsec() as u32),
        xattrs,
        size: if kind == 'd' { 0 } else { st.size() },
        sha256,
        target: (kind == 'l')
            .then(|| fs::read_link(path).map(|t| t.as_os_str().as_bytes().to_vec()))
            .transpose()?,
        rdev,
    })
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    out.push(rel.to_path_buf());
    let full = root.join(rel.strip_prefix("/")?);
    if fs::symlink_metadata(&full)?.is_dir() {
        for entry in fs::read_dir(&full)? {
            walk(root, &rel.join(entry?.file_name()), out)?;
        }
    }
    Ok(())
}

/// Converts, verifies through the reader, mounts, compares; returns paths compared.
fn convert_and_compare(
    work: &Path,
    layer: &Path,
    tar_path: &Path,
) -> Result<(usize, ConvertedLayer)> {
    convert_with_and_compare(work, layer, tar_path, &ConvertOptions::default())
}

fn convert_with_and_compare(
    work: &Path,
    layer: &Path,
    tar_path: &Path,
    options: &ConvertOptions,
) -> Result<(usize, ConvertedLayer)> {
    let blob_path = work.join("layer.blob");
    let converted = convert_layer(File::open(layer)?, File::create(&blob_path)?, options, work)?;
    let reader = BlobReader::open(File::open(&blob_path)?, &converted.blob.verified_digest)?;
    let (meta_path, data_path, mnt) = (
        work.join("meta.erofs"),
        work.join("data.img"),
        work.join("mnt"),
    );
    fs::write(&meta_path, reader.metadata())?;
    fs::write(
        &data_path,
        reader.read_data(0, reader.header().data_space_size)?,
    )?;
    let fsck = Command::new("fsck.erofs")
        .arg(format!("--device={}", data_path.display()))
        .arg(&meta_path)
        .output()?;
    ensure!(
        fsck.status.success(),
        "fsck.erofs: {}",
        String::from_utf8_lossy(&fsck.stderr)
    );
    fs::create_dir_all(&mnt)?;
    let _mounted = lazy_erofs_test_support::mount_erofs_file(&meta_path, &data_path, &mnt)?;

    let mut expect = expectations(tar_path)?;
    expect.entry(PathBuf::from("/")).or_insert_with(|| Expect {
        kind: 'd',
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: (0, 0),
        xattrs: Vec::new(),
        size: 0,
        sha256: None,
        target: None,
        rdev: None,
    });
    let mut seen = Vec::new();
    walk(&mnt, Path::new("/"), &mut seen)?;
    seen.sort();
    let want: Vec<PathBuf> = expect.keys().cloned().collect();
    ensure!(
        seen == want,
        "paths differ: {} mounted vs {} in the tar",
        seen.len(),
        want.len()
    );
    for (path, e) in &expect {
        let mut got = observed(&mnt.join(path.strip_prefix("/")?))?;
        let mut e = e.clone();
        got.xattrs.sort();
        e.xattrs.sort();
        ensure!(
            got == e,
            "{}:\n mounted {got:?}\n tar     {e:?}",
            path.display()
        );
    }
    Ok((expect.len(), converted))
}

#[test]
fn privileged_host_converted_layer_matches_its_tar_path_by_path() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "needs root (mknod, trusted xattrs, mount)"
    );
    let work = tempfile::tempdir()?;
    let src = work.path().join("src");
    make_source(&src)?;
    let tar_path = work.path().join("layer.tar");
    gnu_tar(
        &src,
        &tar_path,
        &["--format=pax", "--xattrs", "--xattrs-include=*"],
    )?;
    // Gzip it, as registries serve layers.
    let gz_path = work.path().join("layer.tar.gz");
    let mut gz =
        flate2::write::GzEncoder::new(File::create(&gz_path)?, flate2::Compression::fast());
    std::io::copy(&mut File::open(&tar_path)?, &mut gz)?;
    gz.finish()?;
    let (paths, converted) = convert_and_compare(work.path(), &gz_path, &tar_path)?;
    let tar_sha = format!(
        "sha256:{}",
        lazy_erofs_image::blob::hex(&Sha256::digest(fs::read(&tar_path)?))
    );
    assert_eq!(
        converted.diff_id, tar_sha,
        "diff id is the sha256 of the uncompressed tar"
    );
    println!(
        "{paths} paths identical; blob {} bytes, metadata {} bytes",
        converted.blob.size, converted.blob.metadata_len
    );
    assert!(paths > 20_000);
    Ok(())
}

#[test]
fn privileged_host_sparse_file_over_4gib_converts_with_holes() -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "needs root (mount)");
    let work = tempfile::tempdir()?;
    let src = work.path().join("src");
    fs::create_dir_all(&src)?;
    let sparse = File::create(src.join("sparse.img"))?;
    let size = 5 * 1024 * 1024 * 1024u64 + 4096;
    sparse.set_len(size)?;
    use std::os::unix::fs::FileExt;
    sparse.write_all_at(&pseudo_random(70_000, 3), 0)?;
    sparse.write_all_at(&pseudo_random(4096, 4), size - 4096)?;
    sparse.write_all_at(b"middle", 3 * 1024 * 1024 * 1024)?;
    drop(sparse);
    let tar_path = work.path().join("sparse.tar");
    gnu_tar(&src, &tar_path, &["--format=gnu", "--sparse"])?;
    let (paths, converted) = convert_and_compare(work.path(), &tar_path, &tar_path)?;
    assert_eq!(paths, 2);
    assert!(
        converted.blob.data_space_size < 4 << 20,
        "holes were stored: {} bytes",
        converted.blob.data_space_size
    );
    Ok(())
}

/// The real thing: Debian minbase (debootstrap) and a layer installing packages on top,
/// built once and cached outside the checkout by packaging/testdata/debian-layers.sh.
#[test]
fn privileged_host_debian_layers_match_their_tars() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "needs root (debootstrap, mount)"
    );
    let dir = lazy_erofs_test_support::debian_layers()?;
    for layer in ["base.tar", "packages.tar"] {
        let work = tempfile::tempdir()?;
        let tar_path = dir.join(layer);
        let (paths, converted) = convert_and_compare(work.path(), &tar_path, &tar_path)?;
        println!(
            "{layer}: {paths} paths identical; tar {} MiB → blob {} MiB (metadata {} KiB)",
            fs::metadata(&tar_path)?.len() >> 20,
            converted.blob.size >> 20,
            converted.blob.metadata_len >> 10
        );
        assert!(paths > 100, "{layer}: only {paths} paths");
    }
    Ok(())
}

/// Start-up files laid out first: every other file's data moves up past them, and the
/// mounted layer must still read every file of the tar right.
#[test]
fn privileged_host_startup_files_first_still_match_their_tar() -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "needs root (mount)");
    let tar_path = lazy_erofs_test_support::debian_layers()?.join("base.tar");
    let work = tempfile::tempdir()?;
    let options = ConvertOptions {
        prefetch: vec![
            "/usr/bin".into(),
            "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
            "/etc".into(),
        ],
        ..ConvertOptions::default()
    };
    let (paths, converted) = convert_with_and_compare(work.path(), &tar_path, &tar_path, &options)?;
    let blob = &converted.blob;
    println!(
        "{paths} paths identical; start-up lane {} of {} data-space bytes",
        blob.startup_size, blob.data_space_size
    );
    ensure!(
        blob.startup_size > 4 << 20 && blob.startup_size < blob.data_space_size / 2,
        "start-up lane of {} bytes for /usr/bin, libc and /etc",
        blob.startup_size
    );
    Ok(())
}
