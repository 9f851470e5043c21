//! Kernels without ondemand mode: a lazy layer is fetched whole (verified region, then
//! every chunk, each checked against the chunk table) into a metadata file and a data
//! file, and mounted as a file-backed EROFS with the data file as its device.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lazy_erofs_image::blob::BlobReader;
use lazy_erofs_image::registry::Registry;

use super::LazyRecord;
use super::source::BlockingRegistryBlob;
use crate::api::SnapshotError;

/// The layer's files: `(metadata, data)`; data is `None` for a layer without file data.
pub(crate) fn paths(dir: &Path, layer: &LazyRecord) -> (PathBuf, Option<PathBuf>) {
    let meta = dir.join(format!("{}.meta", layer.fsid));
    let data = (layer.data_space_size > 0).then(|| dir.join(format!("{}.data", layer.fsid)));
    (meta, data)
}

/// Fetches the layer unless a previous fetch completed (the metadata file is renamed
/// into place last). Call on a blocking thread of a tokio runtime.
pub(crate) fn fetch(
    dir: &Path,
    layer: &LazyRecord,
    registry: &Arc<Registry>,
) -> Result<(PathBuf, Option<PathBuf>), SnapshotError> {
    let (meta, data) = paths(dir, layer);
    if meta.is_file() {
        return Ok((meta, data));
    }
    let started = std::time::Instant::now();
    let unavailable = |e: lazy_erofs_image::blob::BlobError| {
        SnapshotError::Unavailable(format!(
            "fetching lazy layer {} from {}: {e}",
            layer.digest, layer.image
        ))
    };
    let blob = BlockingRegistryBlob::of_layer(layer, registry);
    let reader = BlobReader::open_region(blob, &layer.verified_digest, layer.region_len)
        .map_err(unavailable)?;
    if let Some(data) = &data {
        let mut out = tempfile::NamedTempFile::new_in(dir).map_err(SnapshotError::io(format!(
            "creating a file in {}",
            dir.display()
        )))?;
        for index in 0..reader.header().chunk_count() {
            let chunk = reader.chunk(index).map_err(unavailable)?;
            out.write_all(&chunk)
                .map_err(SnapshotError::io(format!("writing {}", data.display())))?;
        }
        persist(out, data)?;
    }
    let mut out = tempfile::NamedTempFile::new_in(dir).map_err(SnapshotError::io(format!(
        "creating a file in {}",
        dir.display()
    )))?;
    out.write_all(reader.metadata())
        .map_err(SnapshotError::io(format!("writing {}", meta.display())))?;
    persist(out, &meta)?;
    tracing::info!(
        layer = %layer.digest,
        data_bytes = layer.data_space_size,
        elapsed = ?started.elapsed(),
        "lazy layer fetched whole (no ondemand mode in this kernel)"
    );
    Ok((meta, data))
}

fn persist(file: tempfile::NamedTempFile, to: &Path) -> Result<(), SnapshotError> {
    file.as_file()
        .sync_all()
        .map_err(SnapshotError::io(format!("syncing {}", to.display())))?;
    file.persist(to)
        .map_err(|e| SnapshotError::io(format!("moving into {}", to.display()))(e.error))?;
    Ok(())
}
