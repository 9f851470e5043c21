//! The store's schema version: stamped in the counters table, checked at every open. A
//! newer binary migrates an older store step by step; an older binary refuses a newer
//! store untouched, with a message saying so.

use std::path::Path;

#[cfg(test)]
use redb::ReadableDatabase;
use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::{COUNTERS, SNAPSHOTS, store_err};
use crate::api::SnapshotError;

/// The store's layout version. 0: before versioning (same tables and records as 1).
/// Raise it with every change an older binary would misread, and add the migration
/// step to [`migrate`].
pub const SCHEMA_VERSION: u64 = 1;
pub(super) const SCHEMA_KEY: &str = "schema";

/// Checks the store's schema version: a newer one is refused, an older one migrated
/// step by step to [`SCHEMA_VERSION`]; a new store is stamped with it.
pub(super) fn migrate(txn: &WriteTransaction, path: &Path) -> Result<(), SnapshotError> {
    let mut counters = txn.open_table(COUNTERS).map_err(store_err)?;
    let found = counters
        .get(SCHEMA_KEY)
        .map_err(store_err)?
        .map(|v| v.value());
    let empty = txn
        .open_table(SNAPSHOTS)
        .map_err(store_err)?
        .is_empty()
        .map_err(store_err)?;
    let mut version = match found {
        Some(v) => v,
        None if empty => SCHEMA_VERSION,
        None => 0,
    };
    if version > SCHEMA_VERSION {
        return Err(SnapshotError::NewerStore {
            path: path.display().to_string(),
            found: version,
            supported: SCHEMA_VERSION,
            ours: env!("CARGO_PKG_VERSION"),
        });
    }
    while version < SCHEMA_VERSION {
        // 0 → 1: only the stamp (records and tables are unchanged).
        version += 1;
        tracing::info!(path = %path.display(), from = version - 1, to = version, "metadata store migrated");
    }
    counters
        .insert(SCHEMA_KEY, SCHEMA_VERSION)
        .map_err(store_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::api::Kind;
    use crate::store::Store;

    fn stamp(path: &Path, version: Option<u64>) -> anyhow::Result<()> {
        let db = redb::Database::create(path)?;
        let txn = db.begin_write()?;
        {
            let mut counters = txn.open_table(COUNTERS)?;
            match version {
                Some(v) => counters.insert(SCHEMA_KEY, v).map(drop)?,
                None => counters.remove(SCHEMA_KEY).map(drop)?,
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn version(path: &Path) -> anyhow::Result<Option<u64>> {
        let db = redb::Database::create(path)?;
        let txn = db.begin_read()?;
        let counters = txn.open_table(COUNTERS)?;
        Ok(counters.get(SCHEMA_KEY)?.map(|v| v.value()))
    }

    #[test]
    fn a_new_store_is_stamped_with_the_current_version() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("meta.redb");
        drop(Store::open(&path)?);
        assert_eq!(version(&path)?, Some(SCHEMA_VERSION));
        Ok(())
    }

    #[test]
    fn a_store_from_before_versioning_is_migrated_with_its_records() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("meta.redb");
        let store = Store::open(&path)?;
        store.create("a", Kind::Active, "", HashMap::new(), |_| Ok(()))?;
        drop(store);
        stamp(&path, None)?;
        let store = Store::open(&path)?;
        assert!(
            store.get("a")?.is_some(),
            "the record survived the migration"
        );
        drop(store);
        assert_eq!(version(&path)?, Some(SCHEMA_VERSION));
        Ok(())
    }

    #[test]
    fn a_store_of_a_newer_version_is_refused_untouched() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("meta.redb");
        drop(Store::open(&path)?);
        stamp(&path, Some(SCHEMA_VERSION + 1))?;
        let err = Store::open(&path)
            .err()
            .expect("a newer store must be refused");
        let message = err.to_string();
        assert!(
            message.contains(&format!("schema version {}", SCHEMA_VERSION + 1))
                && message.contains(&format!("reads up to {SCHEMA_VERSION}")),
            "{message}"
        );
        assert_eq!(version(&path)?, Some(SCHEMA_VERSION + 1), "left as it was");
        Ok(())
    }
}
