//! The cache index: build cache key → the result of the step, one record per key in its own
//! file (`cache/<key hex>.json`), each written atomically, so two processes can add records at
//! once and a SIGKILL leaves every record whole or absent.
//!
//! A record names the blobs it keeps alive (layers, configs); prune treats them as roots until
//! `prune --all` drops the records.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::content::write_atomic;
use crate::digest::Digest;
use crate::store::StoreError;

/// One cached step result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheRecord {
    /// The step's cache key.
    pub key: Digest,
    /// Blobs this record needs kept.
    pub blobs: Vec<Digest>,
    /// What the solver stores about the result.
    pub payload: serde_json::Value,
    /// When the record was written, in seconds since the epoch.
    pub created: u64,
}

/// The directory of cache records.
#[derive(Clone, Debug)]
pub struct CacheIndex {
    directory: PathBuf,
}

impl CacheIndex {
    /// Opens (creating) the index in `directory`.
    pub fn open(directory: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(directory).map_err(StoreError::io("create", directory))?;
        Ok(Self {
            directory: directory.to_path_buf(),
        })
    }

    /// The directory holding the records.
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// Stores a record, replacing any with the same key.
    pub fn put(&self, record: &CacheRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).expect("records serialize");
        write_atomic(&self.path(&record.key), &bytes)?;
        Ok(())
    }

    /// The record for `key`; a record that cannot be parsed counts as a miss.
    pub fn get(&self, key: &Digest) -> Result<Option<CacheRecord>, StoreError> {
        let path = self.path(key);
        match fs::read(&path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io {
                action: "read",
                path,
                source,
            }),
        }
    }

    /// Every readable record.
    pub fn records(&self) -> Result<Vec<CacheRecord>, StoreError> {
        let mut records = Vec::new();
        for entry in
            fs::read_dir(&self.directory).map_err(StoreError::io("list", &self.directory))?
        {
            let entry = entry.map_err(StoreError::io("list", &self.directory))?;
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|name| name.strip_suffix(".json")) else {
                continue;
            };
            let Ok(key) = format!("sha256:{hex}").parse() else {
                continue;
            };
            if let Some(record) = self.get(&key)? {
                records.push(record);
            }
        }
        records.sort_by(|left, right| left.key.cmp(&right.key));
        Ok(records)
    }

    /// Deletes every record (and leftovers of interrupted writes); returns how many there were.
    pub fn clear(&self) -> Result<usize, StoreError> {
        let mut removed = 0;
        for entry in
            fs::read_dir(&self.directory).map_err(StoreError::io("list", &self.directory))?
        {
            let entry = entry.map_err(StoreError::io("list", &self.directory))?;
            let path = entry.path();
            if fs::remove_file(&path).is_ok()
                && !entry.file_name().to_string_lossy().starts_with('.')
            {
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn path(&self, key: &Digest) -> PathBuf {
        self.directory.join(format!("{}.json", key.hex()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_clear() {
        let directory = tempfile::tempdir().unwrap();
        let index = CacheIndex::open(directory.path()).unwrap();
        let record = CacheRecord {
            key: Digest::of(b"key"),
            blobs: vec![Digest::of(b"layer")],
            payload: serde_json::json!({"layer": "x"}),
            created: 1,
        };
        index.put(&record).unwrap();
        assert_eq!(index.get(&record.key).unwrap(), Some(record.clone()));
        assert_eq!(index.get(&Digest::of(b"other")).unwrap(), None);
        assert_eq!(index.records().unwrap(), vec![record]);
        assert_eq!(index.clear().unwrap(), 1);
        assert!(index.records().unwrap().is_empty());
    }
}
