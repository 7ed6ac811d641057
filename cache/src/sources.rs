//! Where a layer the store does not hold can be fetched from.
//!
//! An image record may name a layer blob that is not in the content store, when the store
//! knows a registry repository that has it: a base image resolved by `FROM` keeps only its
//! manifest and config until a step needs its files, and a build whose steps all came from
//! an imported cache keeps the cache's layers where they are. Such a blob is fetched when its
//! bytes are needed (a snapshot, an export, `rbuild run`), and a push to the same registry
//! mounts it from there instead. Manifests and configs are always in the store.
//!
//! ```text
//! ROOT/v1/sources/<blob hex>.json   [{"registry": "...", "repository": "..."}, ...]
//! ```
//!
//! A source file is written (atomically) before any record that relies on it, and `prune`
//! removes those of blobs no record reaches.

use std::fs;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::content::write_atomic;
use crate::digest::Digest;
use crate::store::{Store, StoreError};

/// A registry repository that holds a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobSource {
    /// The registry host, as in a reference (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// The repository in that registry (`library/busybox`).
    pub repository: String,
}

impl BlobSource {
    /// `registry/repository`, a reference without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl Store {
    /// The directory of source files.
    pub fn sources_directory(&self) -> PathBuf {
        self.directory().join("sources")
    }

    fn source_path(&self, digest: &Digest) -> PathBuf {
        self.sources_directory()
            .join(format!("{}.json", digest.hex()))
    }

    /// The registry repositories known to hold `digest`, most recently added first.
    pub fn blob_sources(&self, digest: &Digest) -> Vec<BlobSource> {
        fs::read(self.source_path(digest))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Records that `source` holds `digest` (durably, before the caller writes a record that
    /// relies on it). Two processes adding sources of one blob at once may keep only one of
    /// them; either is enough.
    pub fn add_blob_source(&self, digest: &Digest, source: &BlobSource) -> Result<(), StoreError> {
        let mut sources = self.blob_sources(digest);
        if sources.first() == Some(source) {
            return Ok(());
        }
        sources.retain(|known| known != source);
        sources.insert(0, source.clone());
        let directory = self.sources_directory();
        fs::create_dir_all(&directory).map_err(StoreError::io("create", &directory))?;
        let bytes = serde_json::to_vec(&sources).expect("sources serialize");
        write_atomic(&self.source_path(digest), &bytes)?;
        Ok(())
    }

    /// Removes the source files of blobs `keep` rejects; returns how many went.
    pub fn remove_blob_sources(&self, keep: impl Fn(&Digest) -> bool) -> Result<usize, StoreError> {
        let directory = self.sources_directory();
        let Ok(entries) = fs::read_dir(&directory) else {
            return Ok(0);
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(StoreError::io("list", &directory))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let digest = name
                .strip_suffix(".json")
                .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok());
            if digest.as_ref().is_some_and(&keep) {
                continue;
            }
            let path = entry.path();
            fs::remove_file(&path).map_err(StoreError::io("remove", &path))?;
            removed += 1;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_kept_newest_first_without_repeats_and_pruned_by_digest() {
        let root = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(root.path()).expect("open");
        let digest = Digest::of(b"layer");
        let other = Digest::of(b"other");
        assert!(store.blob_sources(&digest).is_empty());
        let base = BlobSource {
            registry: "127.0.0.1:5000".to_string(),
            repository: "base".to_string(),
        };
        let cache = BlobSource {
            registry: "127.0.0.1:5000".to_string(),
            repository: "team/cache".to_string(),
        };
        store.add_blob_source(&digest, &base).expect("add");
        store.add_blob_source(&digest, &cache).expect("add");
        store.add_blob_source(&digest, &base).expect("add");
        store.add_blob_source(&other, &cache).expect("add");
        assert_eq!(
            store.blob_sources(&digest),
            vec![base.clone(), cache.clone()]
        );
        assert_eq!(base.name(), "127.0.0.1:5000/base");
        let removed = store
            .remove_blob_sources(|kept| *kept == digest)
            .expect("remove");
        assert_eq!(removed, 1);
        assert!(store.blob_sources(&other).is_empty());
        assert_eq!(store.blob_sources(&digest).len(), 2);
    }
}
