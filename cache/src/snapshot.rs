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

fn unpack(
    store: &Store,
    layer: &Target,
    diff_id: &Digest,
    into: &Path,
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
    // read at its end, and the whole snapshot is thrown away.
    let mut tar = VerifyingReader::new(decoded, diff_id.clone(), None);
    let options = ApplyOptions::new(WhiteoutMode::Overlay);
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

/// The snapshot directories of an image's layers, base first.
pub fn prepare_image(store: &Store, image: &Image) -> Result<Vec<PathBuf>, SnapshotError> {
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
        .iter()
        .zip(diff_ids)
        .map(|(layer, diff_id)| {
            let diff_id: Digest = diff_id.parse().map_err(|_| StoreError::UnsupportedDigest {
                digest: diff_id.clone(),
            })?;
            prepare(store, layer, &diff_id)
        })
        .collect()
}
