//! The store root: a versioned layout under `--root`, the image store (name:tag → manifest),
//! and reading and writing images as OCI manifests and configs.
//!
//! ```text
//! ROOT/v1/lock                 shared flock per process; prune takes it exclusively
//! ROOT/v1/oci-layout           the blob directory follows the OCI image layout
//! ROOT/v1/blobs/sha256/<hex>   content store
//! ROOT/v1/ingest/              writes in progress
//! ROOT/v1/images/<hex>.json    one record per tag (hex = sha256 of the name), or
//!                              dangling-<manifest hex>.json for an untagged image
//! ROOT/v1/cache/<hex>.json     cache records (see `cache_index`)
//! ROOT/v1/sources/<hex>.json   registry repositories holding a layer not in the store
//!                              (see `sources`)
//! ROOT/v1/snapshots/           unpacked layers
//! ROOT/v1/containers/<id>/     writable layers of `rbuild run` (removed by --rm or prune)
//! ```
//!
//! Every record is written with [`write_atomic`]; a record only ever names blobs that were
//! committed before it, or layers whose source was recorded before it, so a SIGKILL at any
//! moment leaves either the old or the new state.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageManifest, MediaType};
use serde::{Deserialize, Serialize};

use crate::cache_index::CacheIndex;
use crate::content::{ContentError, ContentStore, write_atomic};
use crate::digest::Digest;
use crate::reference::{Reference, ReferenceError};

/// The layout version directory under the root.
pub const LAYOUT_VERSION: &str = "v1";
/// The largest manifest or index read into memory.
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// The largest image config read into memory.
pub const MAX_CONFIG_SIZE: u64 = 16 << 20;

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker v2 schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config media type.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A content store failure.
    #[error(transparent)]
    Content(#[from] ContentError),
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
    /// No image has this name or id.
    #[error("no such image: {name}")]
    ImageNotFound {
        /// What the user asked for.
        name: String,
    },
    /// An image id prefix matches several images.
    #[error("image id {id} is ambiguous: it matches {count} images")]
    AmbiguousId {
        /// The prefix.
        id: String,
        /// How many images it matches.
        count: usize,
    },
    /// A bad reference.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// A manifest, index or config that is not valid JSON of its kind.
    #[error("{what} {digest} is not valid")]
    BadDocument {
        /// "manifest", "config", ...
        what: &'static str,
        /// The blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// An image record file that cannot be read.
    #[error("image record {path} is not valid")]
    BadRecord {
        /// The record.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A descriptor whose media type rbuild does not handle here.
    #[error("{digest} has media type {media_type}, not an image manifest")]
    NotAManifest {
        /// The blob.
        digest: Digest,
        /// Its media type.
        media_type: String,
    },
    /// A descriptor with a non-sha256 digest.
    #[error("unsupported digest {digest}: the store holds sha256 content only")]
    UnsupportedDigest {
        /// The digest as written.
        digest: String,
    },
}

impl StoreError {
    pub(crate) fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self + use<> {
        let path = path.to_path_buf();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}

/// A content descriptor as the store records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// The media type of the blob.
    pub media_type: String,
    /// The blob.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
}

impl Target {
    /// The OCI descriptor for this target.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(
            MediaType::from(self.media_type.as_str()),
            self.size,
            self.digest.as_oci(),
        )
    }

    /// The target an OCI descriptor names.
    pub fn from_descriptor(descriptor: &Descriptor) -> Result<Self, StoreError> {
        let digest =
            descriptor
                .digest()
                .to_string()
                .parse()
                .map_err(|_| StoreError::UnsupportedDigest {
                    digest: descriptor.digest().to_string(),
                })?;
        Ok(Self {
            media_type: descriptor.media_type().to_string(),
            digest,
            size: descriptor.size(),
        })
    }
}

/// One entry of the image store.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The normalized name, or none for a dangling (untagged) image.
    pub name: Option<String>,
    /// The image manifest.
    pub target: Target,
    /// When the record was written, in seconds since the epoch.
    pub updated: u64,
}

impl ImageRecord {
    /// The parsed name.
    pub fn reference(&self) -> Option<Reference> {
        self.name
            .as_deref()
            .and_then(|name| Reference::parse(name).ok())
    }
}

/// An image read from the store, verified: its manifest and config.
#[derive(Clone, Debug)]
pub struct Image {
    /// The manifest's descriptor.
    pub target: Target,
    /// The manifest.
    pub manifest: ImageManifest,
    /// The manifest's bytes as stored.
    pub manifest_bytes: Vec<u8>,
    /// The config's descriptor.
    pub config_target: Target,
    /// The config.
    pub config: ImageConfiguration,
    /// The config's bytes as stored.
    pub config_bytes: Vec<u8>,
}

impl Image {
    /// The layer descriptors, base first.
    pub fn layers(&self) -> Result<Vec<Target>, StoreError> {
        self.manifest
            .layers()
            .iter()
            .map(Target::from_descriptor)
            .collect()
    }

    /// The image id as Docker shows it: the config digest.
    pub fn id(&self) -> &Digest {
        &self.config_target.digest
    }

    /// Sum of the compressed layer sizes, the config and the manifest.
    pub fn size(&self) -> u64 {
        self.manifest
            .layers()
            .iter()
            .map(Descriptor::size)
            .sum::<u64>()
            + self.config_target.size
            + self.target.size
    }
}

/// The store under one root.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    directory: PathBuf,
    content: ContentStore,
    images: PathBuf,
    cache: CacheIndex,
    snapshots: PathBuf,
    lock: File,
}

impl Store {
    /// Opens the store under `root`, creating the layout on first use, and takes a shared
    /// lock on it for this process's lifetime.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let directory = root.join(LAYOUT_VERSION);
        fs::create_dir_all(&directory).map_err(StoreError::io("create", &directory))?;
        // Snapshots hold setuid binaries of images: keep them away from other host users.
        set_private(root)?;
        let lock_path = directory.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(StoreError::io("open", &lock_path))?;
        lock.lock_shared()
            .map_err(StoreError::io("lock", &lock_path))?;
        let layout = directory.join("oci-layout");
        if !layout.exists() {
            write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let content = ContentStore::open(&directory)?;
        let images = directory.join("images");
        let snapshots = directory.join("snapshots");
        let containers = directory.join("containers");
        for path in [&images, &snapshots, &containers] {
            fs::create_dir_all(path).map_err(StoreError::io("create", path))?;
        }
        let cache = CacheIndex::open(&directory.join("cache"))?;
        Ok(Self {
            root: root.to_path_buf(),
            directory,
            content,
            images,
            cache,
            snapshots,
            lock,
        })
    }

    /// The root directory given to [`Store::open`].
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The versioned directory under the root.
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// The content store.
    pub fn content(&self) -> &ContentStore {
        &self.content
    }

    /// The cache index.
    pub fn cache(&self) -> &CacheIndex {
        &self.cache
    }

    /// The directory holding the writable layers of `rbuild run` containers.
    pub fn containers_directory(&self) -> PathBuf {
        self.directory.join("containers")
    }

    /// The directory holding snapshots.
    pub fn snapshots_directory(&self) -> &Path {
        &self.snapshots
    }

    /// The directory holding image records.
    pub fn images_directory(&self) -> &Path {
        &self.images
    }

    /// Trades this process's shared lock for an exclusive one, waiting for every other rbuild
    /// process on this root to finish; returns whether it had to wait.
    pub fn lock_exclusive(&self) -> Result<bool, StoreError> {
        let path = self.directory.join("lock");
        lock_exclusive(&self.lock).map_err(StoreError::io("lock", &path))
    }

    /// Points `reference` at `target`, replacing what it named before.
    pub fn set_tag(&self, reference: &Reference, target: &Target) -> Result<(), StoreError> {
        let name = reference.to_string();
        let record = ImageRecord {
            name: Some(name.clone()),
            target: target.clone(),
            updated: now(),
        };
        let bytes = serde_json::to_vec_pretty(&record).expect("records serialize");
        write_atomic(&self.images.join(record_file_name(&name)), &bytes)?;
        let dangling = self
            .images
            .join(format!("dangling-{}.json", target.digest.hex()));
        remove_if_present(&dangling)
    }

    /// Records an untagged image so that prune keeps it.
    pub fn add_dangling(&self, target: &Target) -> Result<(), StoreError> {
        let record = ImageRecord {
            name: None,
            target: target.clone(),
            updated: now(),
        };
        let bytes = serde_json::to_vec_pretty(&record).expect("records serialize");
        write_atomic(
            &self
                .images
                .join(format!("dangling-{}.json", target.digest.hex())),
            &bytes,
        )?;
        Ok(())
    }

    /// Removes a record; returns false when there was none.
    pub fn remove_record(&self, record: &ImageRecord) -> Result<bool, StoreError> {
        let path = match &record.name {
            Some(name) => self.images.join(record_file_name(name)),
            None => self
                .images
                .join(format!("dangling-{}.json", record.target.digest.hex())),
        };
        let existed = path.exists();
        remove_if_present(&path)?;
        Ok(existed)
    }

    /// Every image record, tagged first by name, then dangling ones.
    pub fn records(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let mut records = Vec::new();
        let entries = fs::read_dir(&self.images).map_err(StoreError::io("list", &self.images))?;
        for entry in entries {
            let entry = entry.map_err(StoreError::io("list", &self.images))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !name.ends_with(".json") || name.starts_with('.') {
                continue;
            }
            let bytes = match fs::read(&path) {
                Ok(bytes) => bytes,
                // Removed by another process since the listing.
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(StoreError::Io {
                        action: "read",
                        path,
                        source,
                    });
                }
            };
            let record: ImageRecord =
                serde_json::from_slice(&bytes).map_err(|source| StoreError::BadRecord {
                    path: path.clone(),
                    source,
                })?;
            records.push(record);
        }
        records.sort_by(|left, right| {
            (left.name.is_none(), &left.name, &left.target.digest).cmp(&(
                right.name.is_none(),
                &right.name,
                &right.target.digest,
            ))
        });
        Ok(records)
    }

    /// The record for an exact reference.
    pub fn record(&self, reference: &Reference) -> Result<Option<ImageRecord>, StoreError> {
        let name = reference.to_string();
        let path = self.images.join(record_file_name(&name));
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::BadRecord { path, source }),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io {
                action: "read",
                path,
                source,
            }),
        }
    }

    /// Finds the records a user's words name: a reference (`busybox`, `app:v1`,
    /// `name@sha256:…`), an image id (`sha256:<hex>` or a hex prefix of at least 4 digits of
    /// the config digest), or a manifest digest.
    pub fn find(&self, text: &str) -> Result<Vec<ImageRecord>, StoreError> {
        let not_found = || StoreError::ImageNotFound {
            name: text.to_string(),
        };
        let id = text.strip_prefix("sha256:").unwrap_or(text);
        let is_hex = |text: &str| {
            text.bytes()
                .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
        };
        let looks_like_id = id.len() >= 4 && id.len() <= 64 && is_hex(id);
        // Docker reads `sha256:…` and 64 hex digits as an id, never as a name.
        let id_only = text.starts_with("sha256:") || (text.len() == 64 && is_hex(text));
        if !id_only && let Ok(reference) = Reference::parse(text) {
            let found = match (self.record(&reference)?, reference.digest()) {
                // The exact name first: a pull by an index's digest names the platform's
                // manifest by that digest.
                (Some(record), _) => vec![record],
                (None, Some(digest)) => self
                    .records()?
                    .into_iter()
                    .filter(|record| {
                        record.target.digest == *digest
                            && record
                                .reference()
                                .is_some_and(|name| name.name() == reference.name())
                    })
                    .collect(),
                (None, None) => Vec::new(),
            };
            if !found.is_empty() {
                return Ok(found);
            }
        }
        if !looks_like_id {
            return Err(not_found());
        }
        let mut matching = Vec::new();
        let mut images = Vec::new();
        for record in self.records()? {
            let config = self
                .image(&record.target)
                .ok()
                .map(|image| image.config_target.digest);
            let manifest_hex = record.target.digest.hex().to_string();
            let hit = config
                .as_ref()
                .is_some_and(|digest| digest.hex().starts_with(id))
                || manifest_hex.starts_with(id);
            if hit {
                images.push(config.map_or(manifest_hex, |digest| digest.hex().to_string()));
                matching.push(record);
            }
        }
        images.sort();
        images.dedup();
        match images.len() {
            0 => Err(not_found()),
            1 => Ok(matching),
            count => Err(StoreError::AmbiguousId {
                id: text.to_string(),
                count,
            }),
        }
    }

    /// Reads and verifies the manifest and config of an image.
    pub fn image(&self, target: &Target) -> Result<Image, StoreError> {
        if !is_manifest(&target.media_type) {
            return Err(StoreError::NotAManifest {
                digest: target.digest.clone(),
                media_type: target.media_type.clone(),
            });
        }
        let manifest_bytes = self.content.read_bytes(&target.digest, MAX_MANIFEST_SIZE)?;
        let manifest: ImageManifest =
            serde_json::from_slice(&manifest_bytes).map_err(|source| StoreError::BadDocument {
                what: "manifest",
                digest: target.digest.clone(),
                source,
            })?;
        let config_target = Target::from_descriptor(manifest.config())?;
        let config_bytes = self
            .content
            .read_bytes(&config_target.digest, MAX_CONFIG_SIZE)?;
        let config: ImageConfiguration =
            serde_json::from_slice(&config_bytes).map_err(|source| StoreError::BadDocument {
                what: "config",
                digest: config_target.digest.clone(),
                source,
            })?;
        Ok(Image {
            target: target.clone(),
            manifest,
            manifest_bytes,
            config_target,
            config,
            config_bytes,
        })
    }

    /// Writes a config and an OCI manifest over already-stored layers; returns the
    /// manifest's target.
    pub fn write_image(
        &self,
        config: &ImageConfiguration,
        layers: &[Target],
    ) -> Result<Target, StoreError> {
        let config_bytes = serde_json::to_vec(config).expect("configs serialize");
        let config_info = self.content.write_bytes(&config_bytes)?;
        let config_target = Target {
            media_type: OCI_CONFIG.to_string(),
            digest: config_info.digest,
            size: config_info.size,
        };
        self.write_manifest(&config_target, layers)
    }

    /// Writes an OCI manifest naming a stored config and layers.
    pub fn write_manifest(&self, config: &Target, layers: &[Target]) -> Result<Target, StoreError> {
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config,
            "layers": layers,
        });
        let bytes = serde_json::to_vec(&manifest).expect("manifests serialize");
        let info = self.content.write_bytes(&bytes)?;
        Ok(Target {
            media_type: OCI_MANIFEST.to_string(),
            digest: info.digest,
            size: info.size,
        })
    }
}

/// Whether a media type is a single-image manifest rbuild reads.
pub fn is_manifest(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

/// Whether a media type is an index of manifests.
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

fn record_file_name(name: &str) -> String {
    format!("{}.json", Digest::of(name.as_bytes()).hex())
}

fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Io {
            action: "remove",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn set_private(root: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = fs::metadata(root).map_err(StoreError::io("stat", root))?;
    if metadata.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(root, fs::Permissions::from_mode(0o700))
            .map_err(StoreError::io("chmod", root))?;
    }
    Ok(())
}

fn lock_exclusive(file: &File) -> io::Result<bool> {
    // flock converts a shared lock into an exclusive one in place (not atomically).
    match file.try_lock() {
        Ok(()) => Ok(false),
        Err(std::fs::TryLockError::WouldBlock) => {
            file.lock()?;
            Ok(true)
        }
        Err(std::fs::TryLockError::Error(error)) => Err(error),
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |time| time.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::{ImageConfigurationBuilder, RootFsBuilder};

    fn image(store: &Store, marker: &str) -> Target {
        let layer = store.content().write_bytes(marker.as_bytes()).unwrap();
        let config = ImageConfigurationBuilder::default()
            .architecture("amd64")
            .os("linux")
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(vec![layer.digest.to_string()])
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let layer = Target {
            media_type: "application/vnd.oci.image.layer.v1.tar".to_string(),
            digest: layer.digest,
            size: layer.size,
        };
        store.write_image(&config, &[layer]).unwrap()
    }

    #[test]
    fn tags_resolve_by_name_and_by_id() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let target = image(&store, "one");
        store
            .set_tag(&Reference::parse("app:v1").unwrap(), &target)
            .unwrap();
        store
            .set_tag(&Reference::parse("localhost:5000/app").unwrap(), &target)
            .unwrap();
        let found = store.find("app:v1").unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name.as_deref(), Some("docker.io/library/app:v1"));
        let image = store.image(&target).unwrap();
        assert_eq!(image.layers().unwrap().len(), 1);
        let id = image.id().hex()[..12].to_string();
        assert_eq!(store.find(&id).unwrap().len(), 2);
        assert!(matches!(
            store.find("app"),
            Err(StoreError::ImageNotFound { .. })
        ));
        assert!(store.remove_record(&found[0]).unwrap());
        assert!(matches!(
            store.find("app:v1"),
            Err(StoreError::ImageNotFound { .. })
        ));
        assert_eq!(store.records().unwrap().len(), 1);
    }

    #[test]
    fn a_name_by_an_index_digest_finds_the_manifest_it_was_pulled_as() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let target = image(&store, "platform");
        let index = Digest::of(b"an index");
        let name = format!("localhost:5000/app@{index}");
        store
            .set_tag(&Reference::parse(&name).unwrap(), &target)
            .unwrap();
        let found = store.find(&name).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].target, target);
        // By the manifest's own digest too.
        let by_manifest = format!("localhost:5000/app@{}", target.digest);
        assert_eq!(store.find(&by_manifest).unwrap()[0].target, target);
        assert!(store.find("localhost:5000/other@sha256:0000000000000000000000000000000000000000000000000000000000000000").is_err());
    }

    #[test]
    fn a_corrupt_manifest_is_reported_not_used() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let target = image(&store, "two");
        fs::write(store.content().blob_path(&target.digest), b"{}").unwrap();
        let error = store.image(&target).unwrap_err();
        assert!(
            matches!(error, StoreError::Content(ContentError::Corrupt { .. })),
            "{error}"
        );
    }

    #[test]
    fn two_stores_share_a_root() {
        let root = tempfile::tempdir().unwrap();
        let first = Store::open(root.path()).unwrap();
        let second = Store::open(root.path()).unwrap();
        let target = image(&first, "three");
        second
            .set_tag(&Reference::parse("shared").unwrap(), &target)
            .unwrap();
        assert_eq!(first.find("shared").unwrap()[0].target, target);
    }
}
