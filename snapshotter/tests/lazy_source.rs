//! The fetcher's lazy layer source against a real `docker-registry` on loopback: both
//! views of a converted, pushed layer read back exactly what the local blob holds, the
//! metadata view whole and the data space by ranges; a wrong trust anchor opens nothing.

use std::sync::Arc;

use anyhow::{Context, Result};
use lazy_erofs_image::blob::BlobReader;
use lazy_erofs_image::convert::{ConvertOptions, convert_layout};
use lazy_erofs_image::manifest::LazyLayer;
use lazy_erofs_image::registry::repository_of;
use lazy_erofs_image::registry::{Registry, RegistryOptions};
use lazy_erofs_ondemand::{BlobSpec, LocalBlob, SourceError, SourceFactory};
use lazy_erofs_snapshotter::lazy::{LazyLayerSpec, LazyRecord, LazySourceFactory, View};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_views_read_back_the_pushed_layer_and_a_wrong_anchor_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let registry_proc = lazy_erofs_test_support::start_docker_registry(dir.path(), None)?;
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    lazy_erofs_test_support::make_oci_layout(&src)?;
    let image = format!("{}/lazy/source:1", registry_proc.host);
    convert_layout(
        &src,
        &dst,
        "linux/amd64",
        &ConvertOptions {
            repository: Some(lazy_erofs_image::registry::repository_of(&image)?),
            ..ConvertOptions::default()
        },
        &mut |_, _, reader| reader,
    )?;
    let registry = Arc::new(Registry::new(&RegistryOptions::insecure(
        &registry_proc.host,
    )));
    registry.push_layout(&dst, &image).await?;
    let (manifest, _) = registry.pull_manifest(&image).await?;
    let factory = LazySourceFactory::new(registry.clone());

    for layer in manifest.layers() {
        let lazy = LazyLayer::from_descriptor(layer)?.context("not lazy")?;
        let local_bytes = std::fs::read(dst.join("blobs/sha256").join(&lazy.digest[7..]))?;
        let local = BlobReader::open(&local_bytes[..], &lazy.verified_digest)?;
        let spec = |view: View, anchor: &str| {
            BlobSpec::Registry(LazyLayerSpec {
                image: image.clone(),
                digest: lazy.digest.clone(),
                verified_digest: anchor.to_owned(),
                region_len: lazy.verified_region_len(),
                size: 0,
                view,
                chunk_size: lazy.chunk_size.into(),
                startup_size: lazy.startup_size,
                throttle: None,
                kept_region: None,
            })
        };

        let metadata = factory
            .open("meta", &spec(View::Metadata, &lazy.verified_digest))
            .await?;
        assert_eq!(metadata.size(), local.metadata().len() as u64);
        let whole = metadata.read_at(0, local.metadata().len()).await?;
        assert_eq!(&whole[..local.metadata().len()], local.metadata());

        let data = factory
            .open("data", &spec(View::Data, &lazy.verified_digest))
            .await?;
        let size = data.size();
        assert_eq!(size, lazy.data_space_size);
        for (offset, len) in [
            (0, 4096),
            (size / 2, 70_000),
            (size.saturating_sub(4096), 4096),
        ] {
            if offset + len > size || len == 0 {
                continue;
            }
            let got = data.read_at(offset, len as usize).await?;
            // The buffer is page-rounded; the first `len` bytes are the range.
            let want = local.read_data(offset, len)?;
            let first_difference = got[..len as usize]
                .iter()
                .zip(&want)
                .position(|(a, b)| a != b);
            assert_eq!(
                (want.len(), first_difference),
                (len as usize, None),
                "range {offset}+{len}"
            );
        }

        // The production path: the snapshotter's own spec, sizes from the manifest (no
        // registry at OPEN); then a manifest lying about the data space's size.
        let record = LazyRecord::new(&image, &repository_of(&image)?, &lazy);
        // A layer whose files all live inline has no data space (and no data device).
        let views: &[View] = if lazy.data_space_size > 0 {
            &[View::Metadata, View::Data]
        } else {
            &[View::Metadata]
        };
        for &view in views {
            let spec = record.spec(view);
            assert_ne!(spec.size, 0, "{view:?}");
            let source = factory
                .open("production", &BlobSpec::Registry(spec.clone()))
                .await?;
            assert_eq!(source.size(), spec.size);
            // The fetcher fetches the data view in whole chunks, known without a request.
            let piece = (view == View::Data).then_some(u64::from(lazy.chunk_size));
            assert_eq!(source.piece_size(), piece, "{view:?}");
            let len = spec.size.min(8192) as usize;
            let got = source.read_at(0, len).await?;
            let want = match view {
                View::Metadata => local.metadata()[..len].to_vec(),
                View::Data => local.read_data(0, len as u64)?,
            };
            assert_eq!(&got[..len], &want[..], "{view:?}");
        }
        let mut lying = record.spec(views[views.len() - 1]);
        lying.size += 4096;
        let source = factory.open("lying", &BlobSpec::Registry(lying)).await;
        let refused = match source {
            Err(err) => err.to_string(),
            Ok(source) => source
                .read_at(0, 4096)
                .await
                .expect_err("a data space of the wrong size was served")
                .to_string(),
        };
        assert!(refused.contains("the manifest says"), "{refused}");

        let wrong = format!("sha256:{}", "2".repeat(64));
        let err = factory
            .open("bad", &spec(View::Metadata, &wrong))
            .await
            .expect_err("a wrong anchor opened");
        assert!(
            matches!(&err, SourceError::Unavailable { reason, .. } if reason.contains(&lazy.digest)),
            "{err}"
        );
        let local_file = BlobSpec::Local(LocalBlob {
            path: "/etc/passwd".into(),
            throttle: None,
        });
        let err = factory
            .open("bad", &local_file)
            .await
            .expect_err("the registry factory served a local file");
        assert!(
            matches!(&err, SourceError::BadSpec { reason, .. } if reason.contains("local file")),
            "{err}"
        );
    }
    Ok(())
}
