//! OCI image layout directories (`oci-layout`, `index.json`, `blobs/sha256/…`): reading
//! with digest checks, and writing.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageIndex};
use sha2::{Digest as _, Sha256};

use crate::blob::hex;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not an OCI image layout (no oci-layout file)")]
    NotALayout(PathBuf),
    #[error("{path}: {reason}")]
    Json { path: PathBuf, reason: String },
    #[error("unsupported digest {0} (only sha256)")]
    Digest(String),
    #[error("blob {digest}: content does not match its digest or size")]
    Corrupt { digest: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub struct OciLayout {
    root: PathBuf,
}

impl OciLayout {
    pub fn open(root: &Path) -> Result<Self, LayoutError> {
        if !root.join("oci-layout").is_file() {
            return Err(LayoutError::NotALayout(root.to_path_buf()));
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn create(root: &Path) -> Result<Self, LayoutError> {
        let blobs = root.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let marker = root.join("oci-layout");
        fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io_err(&marker))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn index(&self) -> Result<ImageIndex, LayoutError> {
        let path = self.root.join("index.json");
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        serde_json::from_slice(&bytes).map_err(|e| LayoutError::Json {
            path,
            reason: e.to_string(),
        })
    }

    pub fn write_index(&self, index: &ImageIndex) -> Result<(), LayoutError> {
        let path = self.root.join("index.json");
        let bytes = canonical_json(index, true).map_err(|e| LayoutError::Json {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &bytes)
    }

    /// Where a blob with this digest lives; only well-formed sha256 digests.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, LayoutError> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        match hex {
            Some(hex) => Ok(self.root.join("blobs/sha256").join(hex)),
            None => Err(LayoutError::Digest(digest.to_owned())),
        }
    }

    /// A small blob (manifest, config, index) read whole and checked against its
    /// descriptor.
    pub fn read_blob(&self, desc: &Descriptor) -> Result<Vec<u8>, LayoutError> {
        let digest = desc.digest().to_string();
        let path = self.blob_path(&digest)?;
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        if bytes.len() as u64 != desc.size() || sha256_digest(&bytes) != digest {
            return Err(LayoutError::Corrupt { digest });
        }
        Ok(bytes)
    }

    pub fn open_blob(&self, digest: &str) -> Result<File, LayoutError> {
        let path = self.blob_path(digest)?;
        File::open(&path).map_err(io_err(&path))
    }

    /// Stores bytes as a blob; returns its digest.
    pub fn write_blob(&self, bytes: &[u8]) -> Result<String, LayoutError> {
        let digest = sha256_digest(bytes);
        let path = self.blob_path(&digest)?;
        write_atomic(&path, bytes)?;
        Ok(digest)
    }

    /// Moves a finished blob file into place under its digest.
    pub fn adopt_blob(&self, file: &Path, digest: &str) -> Result<(), LayoutError> {
        let path = self.blob_path(digest)?;
        fs::rename(file, &path).map_err(io_err(&path))
    }

    /// A temporary file inside the layout (same filesystem, so `adopt_blob` is a rename).
    pub fn temp_file(&self) -> Result<tempfile::NamedTempFile, LayoutError> {
        let dir = self.root.join("blobs");
        tempfile::NamedTempFile::new_in(&dir).map_err(io_err(&dir))
    }
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LayoutError> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Hashes what passes through, to check a streamed blob against its digest.
pub struct DigestReader<R> {
    inner: R,
    hash: Sha256,
    count: u64,
}

impl<R: Read> DigestReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hash: Sha256::new(),
            count: 0,
        }
    }

    /// Reads to the end, then returns (`sha256:<hex>`, bytes read).
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((format!("sha256:{}", hex(&self.hash.finalize())), self.count))
    }
}

impl<R: Read> Read for DigestReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// `value` as JSON with every object's keys in order: oci-spec keeps annotations in
/// `HashMap`s, whose order differs from run to run, and a manifest's digest must not.
pub fn canonical_json(value: &impl serde::Serialize, pretty: bool) -> serde_json::Result<Vec<u8>> {
    // serde_json's `Value` keeps objects in a `BTreeMap` (no `preserve_order`).
    let value = serde_json::to_value(value)?;
    if pretty {
        serde_json::to_vec_pretty(&value)
    } else {
        serde_json::to_vec(&value)
    }
}
