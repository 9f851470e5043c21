//! The fanotify backend's layer files: the verified metadata image fetched whole (and the
//! rest of the verified region beside it, which the fetcher reads instead of fetching
//! it again), the data space a sparse file that the broker and fetcher fill as the mount
//! reads it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lazy_erofs_image::blob::{BlobReader, keep_region, kept_header};
use lazy_erofs_image::registry::Registry;
use lazy_erofs_ondemand::fanotify::{Broker, layer};
use lazy_erofs_ondemand::{BlobSpec, BlobTable, KeptRegionFiles};

use super::source::BlockingRegistryBlob;
use super::{LazyRecord, View};
use crate::api::SnapshotError;

/// The layer's file stem: its verified digest, which names exactly this converted blob.
pub(crate) fn name(layer: &LazyRecord) -> Result<String, SnapshotError> {
    layer
        .verified_digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|hex| format!("sha256-{hex}"))
        .ok_or_else(|| {
            SnapshotError::Unavailable(format!(
                "lazy layer {}: malformed verified digest",
                layer.digest
            ))
        })
}

fn unavailable(layer: &LazyRecord, e: &dyn std::fmt::Display) -> SnapshotError {
    SnapshotError::Unavailable(format!(
        "lazy layer {} from {}: {e}",
        layer.digest, layer.image
    ))
}

/// Puts the layer's metadata image under `dir` (fetching its verified region once,
/// unless the image is there) and keeps the rest of the region beside it, for the
/// fetcher to read instead of fetching it again. Checks the record's data space size
/// against the verified header every time: files kept for one image serve every image
/// naming the same verified digest, and a size another manifest gets wrong must not cut
/// the shared data file short (reads past its end would see zeros). Returns the layer's
/// file stem and the kept files. Call on a blocking thread of a tokio runtime.
pub fn fetch_metadata(
    dir: &Path,
    layer: &LazyRecord,
    registry: &Arc<Registry>,
) -> Result<(String, KeptRegionFiles), SnapshotError> {
    let name = name(layer)?;
    let (meta, _) = layer::files(dir, &name);
    let region = layer::region(dir, &name);
    let failed = |e: &dyn std::fmt::Display| unavailable(layer, e);
    // The kept header was written from a verified one; if it is missing, cut short or
    // disagrees, the region is fetched and verified again, and that decides.
    let kept_agrees = layer::has_metadata(&meta)
        && kept_header(&region).is_ok_and(|h| h.data_space_size == layer.data_space_size);
    if !kept_agrees {
        let blob = BlockingRegistryBlob::of_layer(layer, registry);
        let reader = BlobReader::open_region(blob, &layer.verified_digest, layer.region_len)
            .map_err(|e| failed(&e))?;
        // The data file's size comes from the record; it must be the verified one, or
        // the image's blocks past a short file would read as zeros.
        let verified = reader.header().data_space_size;
        if verified != layer.data_space_size {
            return Err(failed(&format!(
                "the verified data space is {verified} bytes, the manifest says {}",
                layer.data_space_size
            )));
        }
        // Before the metadata image, which marks the layer's files complete. Without
        // it the fetcher fetches the region again: kept only to save that.
        if let Err(err) = keep_region(&reader, &region) {
            tracing::warn!(path = %region.display(), %err, "verified region not kept");
        }
        layer::write_metadata(&meta, reader.metadata()).map_err(|e| failed(&e))?;
    }
    let kept = KeptRegionFiles {
        rest: region,
        metadata: meta,
    };
    Ok((name, kept))
}

/// Puts the layer's files in place under `dir` and registers its data view with the
/// fetcher (`blobs`) and the broker (which marks the data file). Returns the metadata
/// image and the data file to mount. Call on a blocking thread of a tokio runtime.
pub(crate) fn prepare(
    dir: &Path,
    layer: &LazyRecord,
    registry: &Arc<Registry>,
    blobs: &BlobTable,
    broker: &Broker,
) -> Result<(PathBuf, Option<PathBuf>), SnapshotError> {
    let (name, kept) = fetch_metadata(dir, layer, registry)?;
    let meta = kept.metadata.clone();
    if layer.data_space_size == 0 {
        return Ok((meta, None));
    }
    let (_, files) = layer::files(dir, &name);
    let failed = |e: &dyn std::fmt::Display| unavailable(layer, e);
    layer::ensure_data_file(&files, layer.data_space_size).map_err(|e| failed(&e))?;
    let mut spec = layer.spec(View::Data);
    spec.kept_region = Some(kept);
    blobs.insert(name, BlobSpec::Registry(spec));
    broker.add_layer(files.clone()).map_err(|e| failed(&e))?;
    Ok((meta, Some(files.data)))
}

/// Starts the fetch of the layer's start-up region (the files its image reads first,
/// laid out first in the data space) as the layer is mounted, as the cachefiles backend
/// does when a layer's object opens. The broker hands the fetcher a layer only with an
/// event on its data file (the event's fd is the only one that writes without raising
/// events), so a thread reads the region's first byte; the fetcher then fetches the whole
/// region in runs. Nobody waits for that thread: a failure leaves the region to the reads
/// that need it, and a data file already complete raises no event at all.
pub(crate) fn open_startup_region(data: PathBuf) {
    use std::os::unix::fs::FileExt;
    let spawned = std::thread::Builder::new()
        .name("startup-open".into())
        .spawn(move || {
            let read = std::fs::File::open(&data).and_then(|file| file.read_at(&mut [0u8; 1], 0));
            if let Err(err) = read {
                tracing::debug!(data = %data.display(), %err, "start-up region not opened ahead");
            }
        });
    if let Err(err) = spawned {
        tracing::warn!(%err, "cannot start the start-up region's fetch ahead");
    }
}
