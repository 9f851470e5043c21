//! The metadata store (redb): every snapshot's key, internal id, kind, parent, labels,
//! times and frozen usage; which snapshots are children of which. Each change is one
//! redb transaction, so a kill -9 leaves either the old or the new state.
//!
//! After an I/O error (a full disk) redb refuses every later transaction until the
//! database is closed and opened again; the store does that itself on the next call, so
//! the daemon serves again once space is freed.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use redb::{
    Database, MultimapTableDefinition, ReadTransaction, ReadableDatabase, ReadableMultimapTable,
    ReadableTable, ReadableTableMetadata, StorageError, TableDefinition, TransactionError,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::api::{Info, Kind, SnapshotError, Usage};
use crate::lazy::LazyRecord;

mod layer_use;
mod schema;

pub use schema::SCHEMA_VERSION;
use schema::migrate;

/// key → record (JSON).
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// parent key → child keys.
const CHILDREN: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("children");
/// "next_id" → the next internal id; "schema" → the layout's [`SCHEMA_VERSION`].
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// What the store knows of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Names its directory: `<root>/snapshots/<id>`.
    pub id: u64,
    pub kind: Kind,
    pub parent: String,
    pub labels: HashMap<String, String>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    /// Frozen at commit; computed on demand for active snapshots.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// The lazy layer behind a committed snapshot the snapshotter made itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy: Option<LazyRecord>,
}

impl Record {
    pub fn info(&self, name: &str) -> Info {
        Info {
            kind: self.kind,
            name: name.to_owned(),
            parent: self.parent.clone(),
            labels: self.labels.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

pub struct Store {
    path: PathBuf,
    /// `None` between closing a failed handle and a successful reopen.
    db: RwLock<Option<Arc<Database>>>,
}

/// A redb error as the snapshotter reports it: a full disk as [`SnapshotError::NoSpace`].
fn store_err(e: impl Into<redb::Error>) -> SnapshotError {
    let e: redb::Error = e.into();
    match &e {
        redb::Error::Io(io) if crate::api::is_no_space(io) => {
            SnapshotError::NoSpace("metadata store".into())
        }
        _ => SnapshotError::Store(e.to_string()),
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record, SnapshotError> {
    serde_json::from_slice(bytes).map_err(|e| SnapshotError::Store(format!("record {key:?}: {e}")))
}

fn encode(record: &Record) -> Result<Vec<u8>, SnapshotError> {
    serde_json::to_vec(record).map_err(|e| SnapshotError::Store(e.to_string()))
}

/// Whether redb wants the database closed and opened again before it serves again.
fn latched(error: &TransactionError) -> bool {
    matches!(error, TransactionError::Storage(StorageError::PreviousIo))
}

fn get_in(txn: &WriteTransaction, key: &str) -> Result<Option<Record>, SnapshotError> {
    let table = txn.open_table(SNAPSHOTS).map_err(store_err)?;
    let value = table.get(key).map_err(store_err)?;
    value.map(|v| decode(key, v.value())).transpose()
}

fn put_in(txn: &WriteTransaction, key: &str, record: &Record) -> Result<(), SnapshotError> {
    let mut table = txn.open_table(SNAPSHOTS).map_err(store_err)?;
    table
        .insert(key, encode(record)?.as_slice())
        .map_err(store_err)?;
    Ok(())
}

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let db = Self::open_db(path)?;
        // Create the tables so read transactions find them; check and bring the schema
        // up to date in the same transaction.
        let txn = db.begin_write().map_err(store_err)?;
        txn.open_table(SNAPSHOTS).map_err(store_err)?;
        txn.open_multimap_table(CHILDREN).map_err(store_err)?;
        txn.open_table(COUNTERS).map_err(store_err)?;
        migrate(&txn, path)?;
        txn.commit().map_err(store_err)?;
        Ok(Self {
            path: path.to_owned(),
            db: RwLock::new(Some(Arc::new(db))),
        })
    }

    fn open_db(path: &Path) -> Result<Database, SnapshotError> {
        Database::create(path).map_err(|e| match store_err(e) {
            SnapshotError::Store(e) => SnapshotError::Store(format!("{}: {e}", path.display())),
            other => other,
        })
    }

    /// The open database; reopened first if an earlier reopen failed.
    fn db(&self) -> Result<Arc<Database>, SnapshotError> {
        let current = self
            .db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match current {
            Some(db) => Ok(db),
            None => self.reopen(None),
        }
    }

    /// Closes and reopens the database after redb latched an I/O error on `failed` (it
    /// repairs on open). Fails, and is tried again by the next call, while a transaction
    /// of the old handle still keeps the file open.
    fn reopen(&self, failed: Option<Arc<Database>>) -> Result<Arc<Database>, SnapshotError> {
        let mut slot = self
            .db
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(current) = slot.as_ref()
            && failed.as_ref().is_none_or(|f| !Arc::ptr_eq(current, f))
        {
            return Ok(current.clone()); // another call reopened it already
        }
        // Every handle of ours must go before the file can be opened again.
        drop(failed);
        *slot = None;
        let db = Arc::new(Self::open_db(&self.path)?);
        tracing::warn!(path = %self.path.display(), "metadata store reopened after an I/O error");
        *slot = Some(db.clone());
        Ok(db)
    }

    fn begin_write(&self) -> Result<WriteTransaction, SnapshotError> {
        let db = self.db()?;
        match db.begin_write() {
            Err(e) if latched(&e) => self.reopen(Some(db))?.begin_write().map_err(store_err),
            txn => txn.map_err(store_err),
        }
    }

    fn begin_read(&self) -> Result<ReadTransaction, SnapshotError> {
        let db = self.db()?;
        match db.begin_read() {
            Err(e) if latched(&e) => self.reopen(Some(db))?.begin_read().map_err(store_err),
            txn => txn.map_err(store_err),
        }
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>, SnapshotError> {
        let txn = self.begin_read()?;
        let table = txn.open_table(SNAPSHOTS).map_err(store_err)?;
        let value = table.get(key).map_err(store_err)?;
        value.map(|v| decode(key, v.value())).transpose()
    }

    pub fn require(&self, key: &str) -> Result<Record, SnapshotError> {
        self.get(key)?
            .ok_or_else(|| SnapshotError::NotFound(key.to_owned()))
    }

    /// Every snapshot, by key.
    pub fn list(&self) -> Result<Vec<(String, Record)>, SnapshotError> {
        let txn = self.begin_read()?;
        let table = txn.open_table(SNAPSHOTS).map_err(store_err)?;
        let mut out = Vec::with_capacity(table.len().map_err(store_err)? as usize);
        for entry in table.iter().map_err(store_err)? {
            let (key, value) = entry.map_err(store_err)?;
            out.push((key.value().to_owned(), decode(key.value(), value.value())?));
        }
        Ok(out)
    }

    /// The ids every record names (what directories may exist).
    pub fn ids(&self) -> Result<HashSet<u64>, SnapshotError> {
        Ok(self.list()?.into_iter().map(|(_, r)| r.id).collect())
    }

    /// Records a new active snapshot or view under a fresh id. `materialize` runs inside
    /// the transaction with the id (to put the directory in place); if it fails nothing
    /// is recorded.
    pub fn create(
        &self,
        key: &str,
        kind: Kind,
        parent: &str,
        labels: HashMap<String, String>,
        materialize: impl FnOnce(u64) -> Result<(), SnapshotError>,
    ) -> Result<Record, SnapshotError> {
        self.insert_new(key, kind, parent, labels, None, materialize)
    }

    /// Records committed snapshot `name` for a lazy layer (its usage: the layer's size).
    pub fn create_lazy(
        &self,
        name: &str,
        parent: &str,
        labels: HashMap<String, String>,
        layer: LazyRecord,
        materialize: impl FnOnce(u64) -> Result<(), SnapshotError>,
    ) -> Result<Record, SnapshotError> {
        self.insert_new(
            name,
            Kind::Committed,
            parent,
            labels,
            Some(layer),
            materialize,
        )
    }

    fn insert_new(
        &self,
        key: &str,
        kind: Kind,
        parent: &str,
        labels: HashMap<String, String>,
        lazy: Option<LazyRecord>,
        materialize: impl FnOnce(u64) -> Result<(), SnapshotError>,
    ) -> Result<Record, SnapshotError> {
        let txn = self.begin_write()?;
        if get_in(&txn, key)?.is_some() {
            return Err(SnapshotError::AlreadyExists(key.to_owned()));
        }
        if !parent.is_empty() {
            let parent_record = get_in(&txn, parent)?
                .ok_or_else(|| SnapshotError::NotFound(format!("parent {parent}")))?;
            if parent_record.kind != Kind::Committed {
                return Err(SnapshotError::InvalidArgument(format!(
                    "parent {parent:?} is {}, not committed",
                    parent_record.kind.name()
                )));
            }
            let mut children = txn.open_multimap_table(CHILDREN).map_err(store_err)?;
            children.insert(parent, key).map_err(store_err)?;
        }
        let id = {
            let mut counters = txn.open_table(COUNTERS).map_err(store_err)?;
            let next = counters
                .get("next_id")
                .map_err(store_err)?
                .map_or(1, |v| v.value());
            counters.insert("next_id", next + 1).map_err(store_err)?;
            next
        };
        let now = SystemTime::now();
        let usage = lazy.as_ref().map(|l| Usage {
            size: i64::try_from(l.data_space_size.saturating_add(l.region_len)).unwrap_or(i64::MAX),
            inodes: 0,
        });
        let record = Record {
            id,
            kind,
            parent: parent.to_owned(),
            labels,
            created_at: now,
            updated_at: now,
            usage,
            lazy,
        };
        put_in(&txn, key, &record)?;
        materialize(id)?;
        txn.commit().map_err(store_err)?;
        Ok(record)
    }

    /// Turns active snapshot `key` into committed snapshot `name` (same id, same
    /// directory), with `usage` frozen.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
        usage: Usage,
    ) -> Result<Record, SnapshotError> {
        let txn = self.begin_write()?;
        let mut record =
            get_in(&txn, key)?.ok_or_else(|| SnapshotError::NotFound(key.to_owned()))?;
        if record.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key:?} is {}, only active snapshots can be committed",
                record.kind.name()
            )));
        }
        if get_in(&txn, name)?.is_some() {
            return Err(SnapshotError::AlreadyExists(name.to_owned()));
        }
        {
            let mut table = txn.open_table(SNAPSHOTS).map_err(store_err)?;
            table.remove(key).map_err(store_err)?;
        }
        if !record.parent.is_empty() {
            let mut children = txn.open_multimap_table(CHILDREN).map_err(store_err)?;
            children
                .remove(record.parent.as_str(), key)
                .map_err(store_err)?;
            children
                .insert(record.parent.as_str(), name)
                .map_err(store_err)?;
        }
        let now = SystemTime::now();
        record.kind = Kind::Committed;
        record.labels = labels;
        record.created_at = now;
        record.updated_at = now;
        record.usage = Some(usage);
        put_in(&txn, name, &record)?;
        txn.commit().map_err(store_err)?;
        Ok(record)
    }

    /// Forgets `key`; refused while it has children. Returns what it was.
    pub fn remove(&self, key: &str) -> Result<Record, SnapshotError> {
        let txn = self.begin_write()?;
        let record = get_in(&txn, key)?.ok_or_else(|| SnapshotError::NotFound(key.to_owned()))?;
        {
            let mut children = txn.open_multimap_table(CHILDREN).map_err(store_err)?;
            let mut kids = children.get(key).map_err(store_err)?;
            if let Some(child) = kids.next() {
                let child = child.map_err(store_err)?.value().to_owned();
                return Err(SnapshotError::FailedPrecondition(format!(
                    "cannot remove snapshot {key:?}: it has children (e.g. {child:?})"
                )));
            }
            drop(kids);
            if !record.parent.is_empty() {
                children
                    .remove(record.parent.as_str(), key)
                    .map_err(store_err)?;
            }
        }
        {
            let mut table = txn.open_table(SNAPSHOTS).map_err(store_err)?;
            table.remove(key).map_err(store_err)?;
        }
        txn.commit().map_err(store_err)?;
        Ok(record)
    }

    /// Replaces a snapshot's labels with what `change` makes of them.
    pub fn update_labels(
        &self,
        key: &str,
        change: impl FnOnce(&mut HashMap<String, String>) -> Result<(), SnapshotError>,
    ) -> Result<Record, SnapshotError> {
        let txn = self.begin_write()?;
        let mut record =
            get_in(&txn, key)?.ok_or_else(|| SnapshotError::NotFound(key.to_owned()))?;
        change(&mut record.labels)?;
        record.updated_at = SystemTime::now();
        put_in(&txn, key, &record)?;
        txn.commit().map_err(store_err)?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(_: u64) -> Result<(), SnapshotError> {
        Ok(())
    }

    #[test]
    fn create_commit_remove_keep_children_and_ids_consistent() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(&dir.path().join("meta.redb"))?;
        let a = store.create("a", Kind::Active, "", HashMap::new(), ok)?;
        store.commit("A", "a", HashMap::new(), Usage::default())?;
        assert!(store.get("a")?.is_none());
        assert_eq!(store.require("A")?.id, a.id);
        let b = store.create("b", Kind::Active, "A", HashMap::new(), ok)?;
        assert_ne!(a.id, b.id);
        assert!(matches!(
            store.create("b", Kind::View, "", HashMap::new(), ok),
            Err(SnapshotError::AlreadyExists(_))
        ));
        assert!(matches!(
            store.create("c", Kind::Active, "b", HashMap::new(), ok),
            Err(SnapshotError::InvalidArgument(_))
        ));
        assert!(matches!(
            store.create("c", Kind::Active, "nope", HashMap::new(), ok),
            Err(SnapshotError::NotFound(_))
        ));
        assert!(matches!(
            store.remove("A"),
            Err(SnapshotError::FailedPrecondition(_))
        ));
        store.commit("B", "b", HashMap::new(), Usage::default())?;
        assert!(matches!(
            store.remove("A"),
            Err(SnapshotError::FailedPrecondition(_))
        ));
        store.remove("B")?;
        store.remove("A")?;
        assert!(store.list()?.is_empty());
        Ok(())
    }

    #[test]
    fn a_failed_materialize_records_nothing_and_the_store_reopens() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("meta.redb");
        {
            let store = Store::open(&path)?;
            let failed = store.create("x", Kind::Active, "", HashMap::new(), |_| {
                Err(SnapshotError::Store("disk full".into()))
            });
            assert!(failed.is_err());
            store.create("y", Kind::Active, "", HashMap::new(), ok)?;
        }
        let store = Store::open(&path)?;
        assert!(store.get("x")?.is_none());
        assert!(store.get("y")?.is_some());
        Ok(())
    }
}
