//! What the layer cache holds, per layer: the files (fanotify, whole layers) or the
//! cachefiles volume behind it, their bytes on disk, when it was last used, and which
//! snapshots' layers it serves.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::now_secs;
use super::plan::Space;
use crate::api::SnapshotError;
use crate::lazy::{Backend, LayerMounts};
use crate::store::Store;

/// Whether a layer's cache may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// A committed snapshot stands on it and its layer is mounted.
    Mounted,
    /// A committed snapshot stands on it (not mounted now).
    Referenced,
    /// No snapshot stands on it: evictable.
    Unreferenced,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mounted => "mounted",
            Self::Referenced => "referenced",
            Self::Unreferenced => "unreferenced",
        }
    }
}

/// A snapshot's layer served by a cache entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerUse {
    pub digest: String,
    pub image: String,
    pub fsid: String,
    /// Metadata image plus data space.
    pub size: u64,
}

/// One layer's cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Names the cache on disk: the file stem, or the fsid of a cachefiles volume of this
    /// run's domain (a previous domain's volume keeps its directory name).
    pub key: String,
    pub bytes: u64,
    /// Unix seconds.
    pub last_used: u64,
    pub state: State,
    /// The files, or the volume directory.
    #[serde(skip)]
    pub paths: Vec<PathBuf>,
    pub layers: Vec<LayerUse>,
}

#[derive(Debug, Clone)]
pub struct Inventory {
    pub entries: Vec<Entry>,
    pub space: Space,
}

impl Inventory {
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// Layers and bytes per state.
    pub fn by_state(&self) -> Vec<crate::metrics::CacheState> {
        [State::Mounted, State::Referenced, State::Unreferenced]
            .into_iter()
            .map(|state| {
                let of = self.entries.iter().filter(|e| e.state == state);
                crate::metrics::CacheState {
                    state: state.as_str(),
                    layers: of.clone().count() as u64,
                    bytes: of.map(|e| e.bytes).sum(),
                }
            })
            .collect()
    }
}

/// Takes stock. Entries in use count as used now.
pub fn take(store: &Store, mounts: &LayerMounts) -> Result<Inventory, SnapshotError> {
    let mut users: BTreeMap<String, (bool, Vec<LayerUse>)> = BTreeMap::new();
    // Snapshots' layers, and layers mounted ahead of their snapshot (in use all the same).
    let recorded = store
        .list()?
        .into_iter()
        .filter_map(|(_, record)| record.lazy);
    for layer in recorded.chain(mounts.mounted_layers()) {
        let Some(key) = mounts.cache_key(&layer) else {
            continue;
        };
        let user = users.entry(key).or_default();
        user.0 |= mounts.is_mounted(&layer.fsid);
        if !user.1.iter().any(|u| u.fsid == layer.fsid) {
            user.1.push(LayerUse {
                digest: layer.digest.clone(),
                image: layer.image.clone(),
                fsid: layer.fsid.clone(),
                size: layer.metadata_size + layer.data_space_size,
            });
        }
    }
    let (dir, mut found) = match mounts.backend() {
        Backend::Fscache { cache_dir, .. } => (
            cache_dir.clone(),
            volumes(cache_dir, &mounts.domain_prefix()),
        ),
        Backend::Fanotify { .. } | Backend::FileBacked => {
            (mounts.blob_dir().to_owned(), files(mounts.blob_dir()))
        }
    };
    let uses = store.layer_uses()?;
    let now = now_secs();
    for key in users.keys() {
        found
            .entry(key.clone())
            .or_insert_with(|| (0, 0, Vec::new()));
    }
    let entries = found
        .into_iter()
        .map(|(key, (bytes, modified, paths))| {
            let (mounted, layers) = users.remove(&key).unwrap_or_default();
            let state = match (mounted, layers.is_empty()) {
                (true, _) => State::Mounted,
                (false, false) => State::Referenced,
                (false, true) => State::Unreferenced,
            };
            let last_used = match state {
                State::Unreferenced => uses.get(&key).copied().unwrap_or(modified),
                _ => now,
            };
            Entry {
                key,
                bytes,
                last_used,
                state,
                paths,
                layers,
            }
        })
        .collect();
    Ok(Inventory {
        entries,
        space: space(&dir),
    })
}

type Found = BTreeMap<String, (u64, u64, Vec<PathBuf>)>;

/// `<stem>.<kind>` files, by stem (temporary files start with a dot and are left out).
fn files(dir: &Path) -> Found {
    let mut found = Found::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((stem, _)) = name.split_once('.') else {
            continue;
        };
        if stem.is_empty() {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let slot = found.entry(stem.to_owned()).or_default();
        slot.0 += meta.blocks() * 512;
        slot.1 = slot.1.max(u64::try_from(meta.mtime()).unwrap_or(0));
        slot.2.push(entry.path());
    }
    found
}

/// cachefiles volumes (`<cache>/cache/Ierofs,<domain>`), by fsid for this run's domains.
fn volumes(cache_dir: &Path, prefix: &str) -> Found {
    let mut found = Found::new();
    let Ok(entries) = std::fs::read_dir(cache_dir.join("cache")) else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(domain) = name.strip_prefix("Ierofs,") else {
            continue;
        };
        let path = entry.path();
        let bytes = lazy_erofs_ondemand::cachefiles::cull::tree_bytes(&path);
        if bytes == 0 {
            continue; // culled before: only empty fan-out directories are left
        }
        let key = domain
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('.'))
            .unwrap_or(name);
        let modified = entry
            .metadata()
            .map_or(0, |m| u64::try_from(m.mtime()).unwrap_or(0));
        found.insert(key.to_owned(), (bytes, modified, vec![path]));
    }
    found
}

fn space(dir: &Path) -> Space {
    match nix::sys::statvfs::statvfs(dir) {
        Ok(s) => Space {
            total: s.blocks() * s.fragment_size(),
            free: s.blocks_available() * s.fragment_size(),
        },
        Err(_) => Space { total: 0, free: 0 },
    }
}
