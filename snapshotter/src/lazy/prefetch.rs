//! Prefetch after a lazy pull: the paths an image lists on its manifest
//! ([`annotation::PREFETCH`](lazy_erofs_image::manifest::annotation::PREFETCH)) are read
//! through the layer mounts in the background, so the kernel asks the fetcher for them
//! before the container does. A path is read from the topmost layer holding it (a
//! whiteout there ends the search); a directory is read whole in every layer holding it,
//! which may read files an upper layer hides — a few bytes more, never wrong ones.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lazy_erofs_image::manifest::{annotation, parse_prefetch_list};
use oci_spec::image::ImageManifest;

/// What to read for one image once all its layers are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchPlan {
    pub image: String,
    pub paths: Vec<String>,
    /// fsids of the image's layers, topmost first.
    pub layers: Vec<String>,
}

impl PrefetchPlan {
    /// The plan for `manifest` when it lists paths; a malformed list is logged and
    /// skipped (prefetch is a hint, the image works without it).
    pub fn from_manifest(
        image: &str,
        manifest: &ImageManifest,
        layers: Vec<String>,
    ) -> Option<Self> {
        let list = manifest.annotations().as_ref()?.get(annotation::PREFETCH)?;
        match parse_prefetch_list(list) {
            Ok(paths) if !paths.is_empty() => Some(Self {
                image: image.to_owned(),
                paths,
                layers,
            }),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(image, error = %e, "ignoring the image's prefetch list");
                None
            }
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrefetchReport {
    pub files: u64,
    pub bytes: u64,
    /// Listed paths no layer holds.
    pub missing: u64,
    /// Files that could not be read (logged).
    pub failed: u64,
}

/// Reads `plan`'s paths through the layer mounts under `mnt_dir`.
pub fn run(plan: &PrefetchPlan, mnt_dir: &Path) -> PrefetchReport {
    let started = Instant::now();
    let mut report = PrefetchReport::default();
    let roots: Vec<PathBuf> = plan.layers.iter().map(|fsid| mnt_dir.join(fsid)).collect();
    for path in &plan.paths {
        let relative = path.trim_start_matches('/');
        let mut found = false;
        for root in &roots {
            let target = root.join(relative);
            let Ok(meta) = std::fs::symlink_metadata(&target) else {
                continue;
            };
            let kind = meta.file_type();
            // An overlay whiteout (0/0 character device) deletes the path below.
            if kind.is_char_device() && std::os::unix::fs::MetadataExt::rdev(&meta) == 0 {
                break;
            }
            found = true;
            if kind.is_dir() {
                read_tree(&target, &mut report);
                continue;
            }
            if kind.is_file() {
                read_file(&target, &mut report);
            }
            break;
        }
        if !found {
            report.missing += 1;
        }
    }
    tracing::info!(
        image = %plan.image,
        files = report.files,
        bytes = report.bytes,
        missing = report.missing,
        failed = report.failed,
        elapsed = ?started.elapsed(),
        "prefetch done"
    );
    report
}

fn read_tree(dir: &Path, report: &mut PrefetchReport) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        report.failed += 1;
        return;
    };
    for entry in entries.flatten() {
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => read_tree(&entry.path(), report),
            Ok(kind) if kind.is_file() => read_file(&entry.path(), report),
            _ => {}
        }
    }
}

fn read_file(path: &Path, report: &mut PrefetchReport) {
    let result = std::fs::File::open(path).and_then(|mut f| io::copy(&mut f, &mut io::sink()));
    match result {
        Ok(bytes) => {
            report.files += 1;
            report.bytes += bytes;
        }
        Err(e) => {
            report.failed += 1;
            tracing::warn!(path = %path.display(), error = %e, "prefetch read failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, path: &str, bytes: &[u8]) {
        let target = root.join(path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, bytes).unwrap();
    }

    #[test]
    fn files_come_from_the_topmost_layer_and_directories_from_all() {
        let mnt = tempfile::tempdir().unwrap();
        let (top, bottom) = (mnt.path().join("top"), mnt.path().join("bottom"));
        write(&bottom, "bin/tool", &[1; 1000]);
        write(&top, "bin/tool", &[2; 10]);
        write(&bottom, "lib/a", &[3; 100]);
        write(&top, "lib/sub/b", &[4; 7]);
        std::os::unix::fs::symlink("/etc/shadow", top.join("link")).unwrap();
        let plan = PrefetchPlan {
            image: "test".into(),
            paths: vec![
                "/bin/tool".into(),
                "/lib".into(),
                "/nope".into(),
                "/link".into(),
            ],
            layers: vec!["top".into(), "bottom".into()],
        };
        let report = run(&plan, mnt.path());
        assert_eq!(
            report,
            PrefetchReport {
                files: 3,
                bytes: 10 + 100 + 7,
                missing: 1,
                failed: 0
            }
        );
    }

    #[test]
    fn malformed_lists_are_skipped() {
        let manifest = |list: &str| -> ImageManifest {
            let mut m = oci_spec::image::ImageManifestBuilder::default()
                .schema_version(2u32)
                .config(oci_spec::image::Descriptor::new(
                    oci_spec::image::MediaType::ImageConfig,
                    0,
                    oci_spec::image::Digest::try_from(format!("sha256:{}", "0".repeat(64)))
                        .unwrap(),
                ))
                .layers(vec![])
                .build()
                .unwrap();
            m.set_annotations(Some(
                [(annotation::PREFETCH.to_owned(), list.to_owned())].into(),
            ));
            m
        };
        let plan = PrefetchPlan::from_manifest("i", &manifest("/usr/bin\n"), vec!["f".into()]);
        assert_eq!(plan.map(|p| p.paths), Some(vec!["/usr/bin".to_owned()]));
        assert_eq!(
            PrefetchPlan::from_manifest("i", &manifest("usr/bin"), vec![]),
            None
        );
        assert_eq!(
            PrefetchPlan::from_manifest("i", &manifest("# none"), vec![]),
            None
        );
    }
}
