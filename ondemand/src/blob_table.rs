//! The supervisor's table of blob descriptions: what the fetcher child asks about each
//! OPEN's cookie, and the registry credentials sent with them.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::source::{BlobSpec, RegistryCredentials, registry_of};

/// Where a blob is registered: an fscache cookie name, in one EROFS domain or in any.
type BlobKey = (Option<String>, String);

/// (domain, cookie) → blob description, shared with the thread answering the child's
/// questions. A blob registered in a domain is served only to OPENs in that domain's
/// volume, so a layer whose image names another layer's cookie cannot reach it.
/// Beside it, credentials given at run time per registry, sent with that registry's
/// blobs (memory only: a restarted snapshotter waits for the next pull to get them).
#[derive(Debug, Clone, Default)]
pub struct BlobTable {
    blobs: Arc<RwLock<BTreeMap<BlobKey, BlobSpec>>>,
    credentials: Arc<RwLock<BTreeMap<String, RegistryCredentials>>>,
}

impl BlobTable {
    /// Registers `name` for OPENs in any volume (the `serve` command's blobs).
    pub fn insert(&self, name: impl Into<String>, spec: BlobSpec) {
        self.write().insert((None, name.into()), spec);
    }

    /// Registers `name` for OPENs in EROFS domain `domain` only.
    pub fn insert_in(&self, domain: &str, name: impl Into<String>, spec: BlobSpec) {
        self.write()
            .insert((Some(domain.to_owned()), name.into()), spec);
    }

    pub fn remove_in(&self, domain: &str, name: &str) -> Option<BlobSpec> {
        self.write()
            .remove(&(Some(domain.to_owned()), name.to_owned()))
    }

    /// The blob for an OPEN of cookie `name` in `domain`: registered in that domain, or
    /// in any.
    pub fn get(&self, domain: Option<&str>, name: &str) -> Option<BlobSpec> {
        let table = self
            .blobs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        domain
            .and_then(|d| table.get(&(Some(d.to_owned()), name.to_owned())))
            .or_else(|| table.get(&(None, name.to_owned())))
            .cloned()
    }

    /// Credentials for `credentials.registry`'s blobs from now on (replacing earlier ones).
    pub fn set_credentials(&self, credentials: RegistryCredentials) {
        self.credentials
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(credentials.registry.clone(), credentials);
    }

    /// The credentials given for the registry `spec` is read from, if any.
    pub fn credentials_for(&self, spec: &BlobSpec) -> Option<RegistryCredentials> {
        let BlobSpec::Registry(layer) = spec else {
            return None;
        };
        self.registry_credentials(registry_of(&layer.image))
    }

    /// The credentials given for `registry`, if any.
    pub fn registry_credentials(&self, registry: &str) -> Option<RegistryCredentials> {
        self.credentials
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(registry)
            .cloned()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<BlobKey, BlobSpec>> {
        self.blobs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
