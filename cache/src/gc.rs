//! Keeping the store tidy and honest: `prune` deletes what no image or cache record needs,
//! `disk_usage` counts every byte under the root, `verify` re-hashes every blob.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::content::ContentError;
use crate::digest::Digest;
use crate::store::{self, MAX_MANIFEST_SIZE, Store, StoreError, Target};

/// What `prune` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PruneReport {
    /// Blobs deleted.
    pub blobs_removed: usize,
    /// Bytes of blobs, temp files and snapshots deleted.
    pub bytes_freed: u64,
    /// Cache records dropped (with `--all`).
    pub cache_records_removed: usize,
    /// Snapshots deleted.
    pub snapshots_removed: usize,
    /// Writable layers of finished containers deleted.
    pub containers_removed: usize,
    /// `RUN --mount=type=cache` directories deleted (with `--all`).
    pub cache_mounts_removed: usize,
    /// Whether prune had to wait for other rbuild processes.
    pub waited: bool,
}

/// Deletes every blob that no image record and no cache record reaches, and leftovers of
/// interrupted writes; with `all`, drops the build cache and snapshots first. Holds the
/// root's exclusive lock, so it never races a build that is adding blobs.
pub fn prune(store: &Store, all: bool) -> Result<PruneReport, StoreError> {
    let mut report = PruneReport {
        waited: store.lock_exclusive()?,
        ..PruneReport::default()
    };
    if all {
        report.cache_records_removed = store.cache().clear()?;
        // Cache mounts are build cache too; with the exclusive lock held no build uses one.
        let cache_mounts = cache_mounts_directory(store);
        if let Ok(entries) = fs::read_dir(&cache_mounts) {
            for entry in entries.flatten() {
                let path = entry.path();
                report.bytes_freed += tree_size(&path).0;
                fs::remove_dir_all(&path)
                    .or_else(|_| fs::remove_file(&path))
                    .map_err(StoreError::io("remove", &path))?;
                if !entry.file_name().to_string_lossy().ends_with(".lock") {
                    report.cache_mounts_removed += 1;
                }
            }
        }
    }
    // Snapshots of layers no image uses any more, and unpacks a killed process left behind.
    let used = if all {
        BTreeSet::new()
    } else {
        used_diff_ids(store)?
    };
    let snapshots = store.snapshots_directory();
    for entry in fs::read_dir(snapshots).map_err(StoreError::io("list", snapshots))? {
        let entry = entry.map_err(StoreError::io("list", snapshots))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if used.contains(&name) {
            continue;
        }
        let path = entry.path();
        report.bytes_freed += tree_size(&path).0;
        fs::remove_dir_all(&path)
            .or_else(|_| fs::remove_file(&path))
            .map_err(StoreError::io("remove", &path))?;
        report.snapshots_removed += 1;
    }
    // Writable layers of finished `rbuild run` containers: with the exclusive lock held, no
    // container of this root is running.
    let containers = store.containers_directory();
    if let Ok(entries) = fs::read_dir(&containers) {
        for entry in entries.flatten() {
            let path = entry.path();
            report.bytes_freed += tree_size(&path).0;
            fs::remove_dir_all(&path).map_err(StoreError::io("remove", &path))?;
            report.containers_removed += 1;
        }
    }
    let reachable = reachable_blobs(store)?;
    for blob in store.content().list()? {
        if !reachable.contains(&blob.digest) {
            store.content().remove(&blob.digest)?;
            report.blobs_removed += 1;
            report.bytes_freed += blob.size;
        }
    }
    // Where to fetch blobs no record reaches any more is not worth keeping either.
    store.remove_blob_sources(|digest| reachable.contains(digest))?;
    report.bytes_freed += store.content().remove_stale_ingests()?;
    Ok(report)
}

/// Where `RUN --mount=type=cache` directories live: `ROOT/v1/cache-mounts/<sha256 of the id>`,
/// each with a `<hex>.lock` beside it for `sharing=locked` and `private`.
pub fn cache_mounts_directory(store: &Store) -> PathBuf {
    store.directory().join("cache-mounts")
}

/// The hex diff ids of every layer of every named or dangling image.
fn used_diff_ids(store: &Store) -> Result<BTreeSet<String>, StoreError> {
    let mut used = BTreeSet::new();
    for record in store.records()? {
        if let Ok(image) = store.image(&record.target) {
            for diff_id in image.config.rootfs().diff_ids() {
                if let Some(hex) = diff_id.strip_prefix("sha256:") {
                    used.insert(hex.to_string());
                }
            }
        }
    }
    Ok(used)
}

/// Every blob an image record or cache record needs.
pub fn reachable_blobs(store: &Store) -> Result<BTreeSet<Digest>, StoreError> {
    let mut reachable = BTreeSet::new();
    for record in store.records()? {
        mark(store, &record.target, &mut reachable, 0);
    }
    for record in store.cache().records()? {
        for blob in record.blobs {
            if let Ok(size) = store.content().size(&blob) {
                let media_type = guess_media_type(store, &blob, size);
                mark(
                    store,
                    &Target {
                        media_type,
                        digest: blob,
                        size,
                    },
                    &mut reachable,
                    0,
                );
            }
        }
    }
    Ok(reachable)
}

/// Cache records name blobs by digest only; a manifest among them must keep its children.
fn guess_media_type(store: &Store, digest: &Digest, size: u64) -> String {
    if size <= MAX_MANIFEST_SIZE
        && let Ok(bytes) = store.content().read_bytes(digest, MAX_MANIFEST_SIZE)
        && let Ok(document) = serde_json::from_slice::<serde_json::Value>(&bytes)
        && let Some(media_type) = document["mediaType"].as_str()
    {
        return media_type.to_string();
    }
    String::new()
}

fn mark(store: &Store, target: &Target, reachable: &mut BTreeSet<Digest>, depth: usize) {
    if !reachable.insert(target.digest.clone()) || depth > 8 {
        return;
    }
    if store::is_manifest(&target.media_type) {
        // A manifest that cannot be read keeps only itself; `verify` reports it.
        if let Ok(image) = store.image(target) {
            reachable.insert(image.config_target.digest.clone());
            for layer in image.layers().unwrap_or_default() {
                reachable.insert(layer.digest);
            }
        } else if let Ok(bytes) = store
            .content()
            .read_bytes(&target.digest, MAX_MANIFEST_SIZE)
            && let Ok(document) = serde_json::from_slice::<serde_json::Value>(&bytes)
        {
            let children = std::iter::once(&document["config"])
                .chain(document["layers"].as_array().into_iter().flatten());
            for child in children {
                if let Some(digest) = child["digest"].as_str().and_then(|text| text.parse().ok()) {
                    reachable.insert(digest);
                }
            }
        }
    } else if store::is_index(&target.media_type)
        && let Ok(bytes) = store
            .content()
            .read_bytes(&target.digest, MAX_MANIFEST_SIZE)
        && let Ok(document) = serde_json::from_slice::<serde_json::Value>(&bytes)
    {
        for child in document["manifests"].as_array().into_iter().flatten() {
            if let Ok(child) = serde_json::from_value::<Target>(child.clone()) {
                mark(store, &child, reachable, depth + 1);
            }
        }
    }
}

/// Bytes on disk under the root, by part.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DiskUsage {
    /// `(part, bytes on disk, apparent bytes, files)`, in a fixed order.
    pub parts: Vec<(String, u64, u64, u64)>,
}

impl DiskUsage {
    /// Bytes on disk in all parts.
    pub fn total(&self) -> u64 {
        self.parts.iter().map(|part| part.1).sum()
    }
}

/// Counts every file under the root: blobs, writes in progress, image records, the cache
/// index, snapshots, and the layout's own files.
pub fn disk_usage(store: &Store) -> DiskUsage {
    let directory = store.directory();
    let named = [
        (
            "blobs",
            store
                .content()
                .blobs_directory()
                .parent()
                .unwrap_or(directory)
                .to_path_buf(),
        ),
        ("ingest", store.content().ingest_directory().to_path_buf()),
        ("images", store.images_directory().to_path_buf()),
        ("cache index", store.cache().directory().to_path_buf()),
        ("snapshots", store.snapshots_directory().to_path_buf()),
        ("containers", store.containers_directory()),
        ("cache mounts", cache_mounts_directory(store)),
    ];
    let mut usage = DiskUsage::default();
    let mut counted = (0, 0, 0);
    for (name, path) in &named {
        let (disk, apparent, files) = tree_size(path);
        counted = (counted.0 + disk, counted.1 + apparent, counted.2 + files);
        usage.parts.push((name.to_string(), disk, apparent, files));
    }
    let (disk, apparent, files) = tree_size(store.root());
    usage.parts.push((
        "other".to_string(),
        disk.saturating_sub(counted.0),
        apparent.saturating_sub(counted.1),
        files.saturating_sub(counted.2),
    ));
    usage
}

/// (bytes on disk, apparent bytes, entries) of a tree, not following symlinks; hard links
/// count once.
fn tree_size(path: &Path) -> (u64, u64, u64) {
    let mut seen = std::collections::HashSet::new();
    let mut totals = (0, 0, 0);
    for entry in walkdir::WalkDir::new(path)
        .follow_links(false)
        .into_iter()
        .flatten()
    {
        let Ok(metadata) = entry.metadata() else {
            continue;
        };
        if metadata.nlink() > 1
            && !metadata.is_dir()
            && !seen.insert((metadata.dev(), metadata.ino()))
        {
            continue;
        }
        totals.0 += metadata.blocks() * 512;
        totals.1 += metadata.len();
        totals.2 += 1;
    }
    totals
}

/// What `verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Blobs re-hashed.
    pub blobs_checked: usize,
    /// Bytes re-hashed.
    pub bytes_checked: u64,
    /// Blobs whose content does not match their name.
    pub corrupt: Vec<ContentError>,
    /// Images whose manifest, config or layers are missing or unreadable.
    pub broken_images: Vec<(String, StoreError)>,
}

impl VerifyReport {
    /// Whether everything checked out.
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.broken_images.is_empty()
    }
}

/// Re-hashes every blob (in parallel) and checks that every image record's manifest, config
/// and layers are present (a layer may be absent when the store records a registry that has
/// it).
pub fn verify(store: &Store) -> Result<VerifyReport, StoreError> {
    let blobs = store.content().list()?;
    let results: Vec<_> = blobs
        .par_iter()
        .map(|blob| store.content().verify(&blob.digest))
        .collect();
    let mut report = VerifyReport::default();
    for result in results {
        match result {
            Ok(size) => {
                report.blobs_checked += 1;
                report.bytes_checked += size;
            }
            Err(error) => {
                report.blobs_checked += 1;
                report.corrupt.push(error);
            }
        }
    }
    for record in store.records()? {
        let name = record
            .name
            .clone()
            .unwrap_or_else(|| record.target.digest.to_string());
        let check = store.image(&record.target).and_then(|image| {
            for layer in image.layers()? {
                // A layer the store only names must at least say where it is.
                if store.content().contains(&layer.digest)
                    || store.blob_sources(&layer.digest).is_empty()
                {
                    store.content().size(&layer.digest)?;
                }
            }
            Ok(())
        });
        if let Err(error) = check {
            report.broken_images.push((name, error));
        }
    }
    Ok(report)
}
