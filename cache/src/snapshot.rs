//! Snapshots: each layer unpacked on its own into `snapshots/<diff id hex>/`, with whiteouts
//! recorded as overlayfs whiteouts, ready to be an overlayfs lower directory. A layer's
//! snapshot does not depend on the layers below it, so one snapshot serves every image that
//! shares the layer.
//!
//! A snapshot is unpacked into a temp directory and renamed into place, so a snapshot
//! directory is always whole; a SIGKILL leaves a `.tmp-*` directory that prune removes.

use std::fs;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::apply::{ApplyError, ApplyOptions, WhiteoutMode, apply_layer};
use crate::compression;
use crate::content::{ContentError, VerifyingReader};
use crate::digest::Digest;
use crate::store::{Image, Store, StoreError, Target};

/// What can go wrong preparing a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A content store failure.
    #[error(transparent)]
    Content(#[from] ContentError),
    /// The layer could not be unpacked.
    #[error("unpacking layer {digest}")]
    Apply {
        /// The layer blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: ApplyError,
    },
    /// The layer's content is not what its digest or diff id says.
    #[error("layer {digest} does not match its digest or its diff id {diff_id}")]
    Mismatch {
        /// The layer blob.
        digest: Digest,
        /// The diff id the image config gives it.
        diff_id: Digest,
        /// What was wrong.
        #[source]
        source: io::Error,
    },
    /// A filesystem operation failed.
    #[error("{action} {path}")]
    Io {
        /// What rbuild was doing.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The config lists a different number of diff ids than the manifest has layers.
    #[error("image {digest}: the config lists {diff_ids} diff ids for {layers} layers")]
    LayerCount {
        /// The manifest.
        digest: Digest,
        /// Diff ids in the config.
        diff_ids: usize,
        /// Layers in the manifest.
        layers: usize,
    },
}

/// Whether the layer `diff_id` is unpacked already, so that its snapshot needs no blob.
pub fn is_unpacked(store: &Store, diff_id: &Digest) -> bool {
    store.snapshots_directory().join(diff_id.hex()).is_dir()
}

/// The snapshot directory of a layer, unpacking it first if needed. The blob is verified
/// against its digest and the unpacked tar against `diff_id` while it streams; on a mismatch
/// nothing is kept.
pub fn prepare(store: &Store, layer: &Target, diff_id: &Digest) -> Result<PathBuf, SnapshotError> {
    let directory = store.snapshots_directory();
    let path = directory.join(diff_id.hex());
    if path.is_dir() {
        return Ok(path);
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let temp = directory.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir(&temp).map_err(|source| SnapshotError::Io {
        action: "create",
        path: temp.clone(),
        source,
    })?;
    let result = unpack(store, layer, diff_id, &temp);
    if let Err(error) = result {
        let _ = fs::remove_dir_all(&temp);
        return Err(error);
    }
    match fs::rename(&temp, &path) {
        Ok(()) => {}
        // Another process unpacked the same layer first: theirs is as good as ours.
        Err(_) if path.is_dir() => {
            let _ = fs::remove_dir_all(&temp);
        }
        Err(source) => {
            let _ = fs::remove_dir_all(&temp);
            return Err(SnapshotError::Io {
                action: "rename",
                path,
                source,
            });
        }
    }
    crate::content::sync_directory(directory)?;
    Ok(path)
}

/// Makes `tree` the snapshot of the layer `diff_id`, by renaming it into place, when `tree` is
/// what unpacking that layer would give: the directory the layer was just made from (a COPY's
/// tree, or a RUN's overlay upper directory, whose whiteouts and opaque markers are already in
/// overlay form). This is how containerd's overlay snapshotter commits, and it saves unpacking
/// the layer again for the next step. If the snapshot exists already, `tree` is left alone.
pub fn adopt(store: &Store, diff_id: &Digest, tree: &Path) -> Result<PathBuf, SnapshotError> {
    let directory = store.snapshots_directory();
    let path = directory.join(diff_id.hex());
    if path.is_dir() {
        return Ok(path);
    }
    match fs::rename(tree, &path) {
        Ok(()) => {}
        // Another build made the same snapshot first.
        Err(_) if path.is_dir() => return Ok(path),
        Err(source) => {
            return Err(SnapshotError::Io {
                action: "rename",
                path,
                source,
            });
        }
    }
    crate::content::sync_directory(directory)?;
    Ok(path)
}

fn unpack(
    store: &Store,
    layer: &Target,
    diff_id: &Digest,
    into: &Path,
) -> Result<(), SnapshotError> {
    apply_verified(store, layer, diff_id, into, WhiteoutMode::Overlay)
}

/// Applies the layer blob to the tree `into` with `whiteouts` (overlay markers for a snapshot,
/// deletions for a flat tree), checking the blob against its digest and the tar against
/// `diff_id` while it streams. On a mismatch the tree holds a partial layer: callers throw it
/// away.
pub fn apply_verified(
    store: &Store,
    layer: &Target,
    diff_id: &Digest,
    into: &Path,
    whiteouts: WhiteoutMode,
) -> Result<(), SnapshotError> {
    let blob = store.content().open_blob(&layer.digest)?;
    let decoded =
        compression::decompress(BufReader::with_capacity(256 * 1024, blob)).map_err(|source| {
            SnapshotError::Mismatch {
                digest: layer.digest.clone(),
                diff_id: diff_id.clone(),
                source,
            }
        })?;
    // The tar stream is checked against the diff id as it is applied; a mismatch fails the
    // read at its end.
    let mut tar = VerifyingReader::new(decoded, diff_id.clone(), None);
    let options = ApplyOptions::new(whiteouts);
    apply_layer(&mut tar, into, &options).map_err(|source| SnapshotError::Apply {
        digest: layer.digest.clone(),
        source,
    })?;
    // The tar crate stops at the end-of-archive blocks; drain the padding so the whole stream
    // is hashed.
    io::copy(&mut tar, &mut io::sink()).map_err(|source| SnapshotError::Mismatch {
        digest: layer.digest.clone(),
        diff_id: diff_id.clone(),
        source,
    })?;
    Ok(())
}

/// An image's layers, base first, each with its diff id from the config.
pub fn layers_with_diff_ids(image: &Image) -> Result<Vec<(Target, Digest)>, SnapshotError> {
    let layers = image.layers()?;
    let diff_ids = image.config.rootfs().diff_ids();
    if layers.len() != diff_ids.len() {
        return Err(SnapshotError::LayerCount {
            digest: image.target.digest.clone(),
            diff_ids: diff_ids.len(),
            layers: layers.len(),
        });
    }
    layers
        .into_iter()
        .zip(diff_ids)
        .map(|(layer, diff_id)| {
            let diff_id: Digest = diff_id.parse().map_err(|_| StoreError::UnsupportedDigest {
                digest: diff_id.clone(),
            })?;
            Ok((layer, diff_id))
        })
        .collect()
}

/// The snapshot directories of an image's layers, base first.
pub fn prepare_image(store: &Store, image: &Image) -> Result<Vec<PathBuf>, SnapshotError> {
    layers_with_diff_ids(image)?
        .iter()
        .map(|(layer, diff_id)| prepare(store, layer, diff_id))
        .collect()
}

/// A read-only view of stacked snapshots, resolved as overlayfs would merge them (whiteouts
/// hide, opaque directories cut off the layers below), without mounting anything.
#[derive(Clone, Debug)]
pub struct LayerView {
    /// Snapshot directories, topmost first.
    layers: Vec<PathBuf>,
}

/// What a path of a [`LayerView`] is.
#[derive(Clone, Debug)]
pub struct ViewEntry {
    /// The real file in the topmost layer that has it.
    pub real: PathBuf,
    /// Its metadata (not following a final symlink).
    pub metadata: fs::Metadata,
}

impl LayerView {
    /// A view of `layers`, topmost first.
    pub fn new(layers: Vec<PathBuf>) -> Self {
        Self { layers }
    }

    /// `path` with every symbolic link in it resolved inside the view (an absolute link
    /// starts again at the view's root), as a clean absolute path (`/` for the root).
    /// [`LayerView::read_dir`] needs such a real path. After 40 links (Linux's limit), a loop
    /// stops resolving and the rest is left as written, so a lookup of it finds nothing.
    pub fn resolve(&self, path: &str) -> String {
        let mut hops = 0;
        let resolved = self.resolve_with(path, &mut hops);
        if resolved.is_empty() {
            "/".to_string()
        } else {
            resolved
        }
    }

    fn resolve_with(&self, path: &str, hops: &mut usize) -> String {
        let mut resolved = String::new();
        for part in path
            .split('/')
            .filter(|part| !part.is_empty() && *part != ".")
        {
            let candidate = format!("{resolved}/{part}");
            match self.lookup(&candidate, false) {
                Some(entry) if entry.metadata.file_type().is_symlink() && *hops < 40 => {
                    *hops += 1;
                    let link = fs::read_link(&entry.real)
                        .map(|link| link.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    resolved = if link.starts_with('/') {
                        self.resolve_with(&link, hops)
                    } else {
                        self.resolve_with(&format!("{resolved}/{link}"), hops)
                    };
                }
                _ => resolved = candidate,
            }
        }
        resolved
    }

    /// The entry at `path` (absolute or relative to the root, `/`-separated), following
    /// symlinks in the parents inside the view (and the final one when `follow`); none when
    /// absent or hidden by a whiteout.
    pub fn lookup(&self, path: &str, follow: bool) -> Option<ViewEntry> {
        let mut components: Vec<String> = Vec::new();
        let mut pending: Vec<String> = path
            .split('/')
            .filter(|part| !part.is_empty() && *part != ".")
            .rev()
            .map(str::to_string)
            .collect();
        let mut hops = 0;
        while let Some(part) = pending.pop() {
            if part == ".." {
                components.pop();
                continue;
            }
            components.push(part);
            let is_last = pending.is_empty();
            let entry = self.entry(&components)?;
            if entry.metadata.file_type().is_symlink() && (!is_last || follow) {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                let target = fs::read_link(&entry.real).ok()?;
                let target = target.to_string_lossy().into_owned();
                components.pop();
                if target.starts_with('/') {
                    components.clear();
                }
                pending.extend(
                    target
                        .split('/')
                        .filter(|part| !part.is_empty() && *part != ".")
                        .rev()
                        .map(str::to_string),
                );
            }
        }
        if components.is_empty() {
            let real = self.layers.first()?.clone();
            let metadata = fs::metadata(&real).ok()?;
            return Some(ViewEntry { real, metadata });
        }
        self.entry(&components)
    }

    /// The topmost entry for exact components (no symlink resolution).
    fn entry(&self, components: &[String]) -> Option<ViewEntry> {
        'layers: for layer in &self.layers {
            // A whiteout or an opaque directory at any level hides the layers below.
            let mut directory = layer.clone();
            for (index, part) in components.iter().enumerate() {
                let candidate = directory.join(part);
                match fs::symlink_metadata(&candidate) {
                    Ok(metadata) if is_whiteout(&metadata) => return None,
                    Ok(metadata) => {
                        if index + 1 == components.len() {
                            return Some(ViewEntry {
                                real: candidate,
                                metadata,
                            });
                        }
                        if !metadata.is_dir() {
                            // A file in an upper layer hides a directory below it.
                            return None;
                        }
                        if is_opaque(&candidate) {
                            // Below this directory, lower layers do not count.
                            let rest = &components[index + 1..];
                            let mut path = candidate.clone();
                            for part in rest {
                                path.push(part);
                            }
                            return fs::symlink_metadata(&path)
                                .ok()
                                .filter(|metadata| !is_whiteout(metadata))
                                .map(|metadata| ViewEntry {
                                    real: path,
                                    metadata,
                                });
                        }
                        directory = candidate;
                    }
                    Err(_) => continue 'layers,
                }
            }
        }
        None
    }

    /// The names in a directory of the view, merged across layers, sorted. `path` must be
    /// free of symlinks (resolve it with [`LayerView::lookup`] first).
    pub fn read_dir(&self, path: &str) -> Vec<String> {
        let components: Vec<&str> = path
            .split('/')
            .filter(|part| !part.is_empty() && *part != ".")
            .collect();
        let mut names = std::collections::BTreeMap::new();
        'layers: for layer in &self.layers {
            let mut directory = layer.clone();
            let mut opaque = false;
            for part in &components {
                directory.push(part);
                match fs::symlink_metadata(&directory) {
                    Ok(metadata) if metadata.is_dir() => opaque |= is_opaque(&directory),
                    // A whiteout or a file here hides this directory in every lower layer.
                    Ok(_) => break 'layers,
                    Err(_) => continue 'layers,
                }
            }
            if let Ok(entries) = fs::read_dir(&directory) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let whiteout = entry
                        .metadata()
                        .is_ok_and(|metadata| is_whiteout(&metadata));
                    names.entry(name).or_insert(!whiteout);
                }
            }
            if opaque || (components.is_empty() && is_opaque(&directory)) {
                break;
            }
        }
        names
            .into_iter()
            .filter(|(_, visible)| *visible)
            .map(|(name, _)| name)
            .collect()
    }
}

fn is_whiteout(metadata: &fs::Metadata) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    metadata.file_type().is_char_device() && metadata.rdev() == 0
}

fn is_opaque(directory: &Path) -> bool {
    let mut value = [0u8; 1];
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|name| {
            rustix::fs::lgetxattr(directory, *name, &mut value)
                .is_ok_and(|length| length == 1 && value[0] == b'y')
        })
}
