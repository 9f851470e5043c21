//! When each cached layer was last in use (unix seconds), by cache key: what the cache
//! GC orders evictions by, kept across restarts.

use std::collections::HashMap;

use redb::{ReadableTable, TableDefinition};

use super::{Store, store_err};
use crate::api::SnapshotError;

const LAYER_USE: TableDefinition<&str, u64> = TableDefinition::new("layer_use");

impl Store {
    /// Every cache key's last use.
    pub fn layer_uses(&self) -> Result<HashMap<String, u64>, SnapshotError> {
        let txn = self.begin_read()?;
        let table = match txn.open_table(LAYER_USE) {
            Ok(table) => table,
            // Created by the first write: a store of an older version has none.
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(HashMap::new()),
            Err(e) => return Err(store_err(e)),
        };
        let mut out = HashMap::new();
        for entry in table.iter().map_err(store_err)? {
            let (key, value) = entry.map_err(store_err)?;
            out.insert(key.value().to_owned(), value.value());
        }
        Ok(out)
    }

    /// Records `used` (key → unix seconds) and forgets `gone`, in one transaction.
    pub fn record_layer_uses(
        &self,
        used: &[(String, u64)],
        gone: &[String],
    ) -> Result<(), SnapshotError> {
        let txn = self.begin_write()?;
        {
            let mut table = txn.open_table(LAYER_USE).map_err(store_err)?;
            for (key, at) in used {
                table.insert(key.as_str(), *at).map_err(store_err)?;
            }
            for key in gone {
                table.remove(key.as_str()).map_err(store_err)?;
            }
        }
        txn.commit().map_err(store_err)?;
        Ok(())
    }
}
