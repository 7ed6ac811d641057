//! Image archives: `rbuild save` writes an OCI image layout tar that also carries Docker's
//! `manifest.json` (as `docker save` has done since Docker 25), so `docker load`,
//! `skopeo … oci-archive:` and `umoci` (after extraction) all read it; `rbuild load` reads
//! OCI layout tars and docker-archive tars; `rbuild import` turns a rootfs tarball into a
//! one-layer image.
//!
//! Archives are streamed: every file of a loaded archive goes straight into the content store
//! under the digest of its bytes, so a blob whose content does not match the digest its
//! archive claims is simply absent and the load fails naming it.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{
    Arch, ConfigBuilder, HistoryBuilder, ImageConfiguration, ImageConfigurationBuilder, Os,
    RootFsBuilder,
};
use serde::Deserialize;

use crate::compression::{self, Compression};
use crate::content::ContentError;
use crate::digest::Digest;
use crate::layer::{self, LayerError};
use crate::reference::Reference;
use crate::store::{
    self, Image, MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE, OCI_CONFIG, OCI_INDEX, Store, StoreError,
    Target,
};

/// The annotation containerd and Docker use for an image's full name.
pub const IMAGE_NAME_ANNOTATION: &str = "io.containerd.image.name";
/// The OCI annotation for a reference name in a layout's `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// Small documents of an archive that are read into memory rather than stored as blobs.
const MAX_METADATA_SIZE: u64 = 4 << 20;

/// What can go wrong reading or writing an archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A content store failure.
    #[error(transparent)]
    Content(#[from] ContentError),
    /// A layer could not be stored.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// The archive could not be read or written.
    #[error("{action} archive")]
    Io {
        /// What rbuild was doing.
        action: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Neither `index.json` nor `manifest.json` is in the archive.
    #[error(
        "not an image archive: it has neither index.json (OCI layout) nor manifest.json (docker-archive)"
    )]
    UnknownFormat,
    /// A JSON document of the archive is not valid.
    #[error("{file} in the archive is not valid")]
    BadDocument {
        /// The file.
        file: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A file the archive's documents name is not in it.
    #[error("{file} is named by {by} but is not in the archive")]
    MissingFile {
        /// The missing file.
        file: String,
        /// The document naming it.
        by: String,
    },
    /// A blob an index or manifest names is not in the archive (or its content does not
    /// match the digest).
    #[error("blob {digest} named by {by} is missing from the archive or does not match its digest")]
    MissingBlob {
        /// The blob.
        digest: String,
        /// What names it.
        by: String,
    },
    /// A blob's size differs from its descriptor.
    #[error("blob {digest} is {actual} bytes but {by} says {expected}")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// The descriptor's size.
        expected: u64,
        /// The blob's size.
        actual: u64,
        /// What names it.
        by: String,
    },
    /// A layer's uncompressed content does not match the config's diff id.
    #[error("layer {layer} of {file} unpacks to {actual}, but the config's diff id is {expected}")]
    DiffIdMismatch {
        /// The layer file.
        layer: String,
        /// The manifest entry.
        file: String,
        /// The config's diff id.
        expected: String,
        /// What the layer unpacks to.
        actual: Digest,
    },
    /// The config lists a different number of diff ids than the manifest has layers.
    #[error("{file}: the config lists {diff_ids} diff ids for {layers} layers")]
    LayerCount {
        /// The manifest entry.
        file: String,
        /// Diff ids in the config.
        diff_ids: usize,
        /// Layers in the manifest.
        layers: usize,
    },
    /// A link in the archive loops or leaves it.
    #[error("link {file} in the archive does not resolve to a file")]
    BadLink {
        /// The link.
        file: String,
    },
    /// An index holds no manifest for this platform.
    #[error("index {digest} has no manifest for {platform}")]
    NoPlatform {
        /// The index.
        digest: Digest,
        /// The wanted platform.
        platform: String,
    },
}

fn archive_io(action: &'static str) -> impl FnOnce(io::Error) -> ArchiveError {
    move |source| ArchiveError::Io { action, source }
}

/// An image to save, with the name to record for it.
pub struct SaveItem {
    /// The name (`docker.io/library/app:v1`), or none for an image saved by id.
    pub reference: Option<Reference>,
    /// The image.
    pub image: Image,
}

/// Writes `items` as an OCI image layout tar with a docker-archive `manifest.json` (one entry
/// per image, naming every tag its items give it). Blobs are
/// streamed from the store and verified as they are read; entries are sorted and stamped
/// with mtime 0, so the same images give the same archive.
pub fn save(store: &Store, items: &[SaveItem], out: impl Write) -> Result<(), ArchiveError> {
    let mut blobs: BTreeMap<Digest, u64> = BTreeMap::new();
    let mut index_manifests = Vec::new();
    let mut docker_manifest = Vec::new();
    let mut docker_entries: HashMap<Digest, usize> = HashMap::new();
    for item in items {
        let image = &item.image;
        blobs.insert(image.target.digest.clone(), image.target.size);
        blobs.insert(image.config_target.digest.clone(), image.config_target.size);
        let layers = image.layers()?;
        for layer in &layers {
            blobs.insert(layer.digest.clone(), layer.size);
        }
        let mut descriptor = serde_json::json!({
            "mediaType": image.target.media_type,
            "digest": image.target.digest,
            "size": image.target.size,
        });
        if let Some(reference) = &item.reference {
            descriptor["annotations"] = serde_json::json!({
                IMAGE_NAME_ANNOTATION: reference.to_string(),
                REF_NAME_ANNOTATION: reference.tag().unwrap_or("latest"),
            });
        }
        index_manifests.push(descriptor);
        let repo_tags: Vec<String> = item
            .reference
            .iter()
            .filter(|reference| reference.tag().is_some())
            .map(Reference::familiar)
            .collect();
        // One manifest.json entry per image with all its names, as `docker save a:1 a:2` writes.
        if let Some(&position) = docker_entries.get(image.id()) {
            let entry: &mut serde_json::Value = &mut docker_manifest[position];
            let tags = entry["RepoTags"]
                .as_array_mut()
                .expect("RepoTags is an array");
            for tag in repo_tags {
                if !tags.iter().any(|known| known == tag.as_str()) {
                    tags.push(tag.into());
                }
            }
            continue;
        }
        docker_entries.insert(image.id().clone(), docker_manifest.len());
        docker_manifest.push(serde_json::json!({
            "Config": blob_name(&image.config_target.digest),
            "RepoTags": repo_tags,
            "Layers": layers.iter().map(|layer| blob_name(&layer.digest)).collect::<Vec<_>>(),
        }));
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": index_manifests,
    });
    let mut builder = tar::Builder::new(out);
    let mut append = |path: &str, size: u64, reader: &mut dyn Read, directory: bool| {
        let mut header = tar::Header::new_ustar();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        if directory {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
        } else {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            header.set_size(size);
        }
        builder.append_data(&mut header, path, reader)
    };
    let mut json = |path: &str, value: &serde_json::Value| {
        let bytes = serde_json::to_vec(value).expect("documents serialize");
        append(path, bytes.len() as u64, &mut bytes.as_slice(), false)
    };
    json("index.json", &index).map_err(archive_io("write"))?;
    json("manifest.json", &serde_json::Value::Array(docker_manifest))
        .map_err(archive_io("write"))?;
    json(
        "oci-layout",
        &serde_json::json!({"imageLayoutVersion": "1.0.0"}),
    )
    .map_err(archive_io("write"))?;
    append("blobs/", 0, &mut io::empty(), true).map_err(archive_io("write"))?;
    append("blobs/sha256/", 0, &mut io::empty(), true).map_err(archive_io("write"))?;
    for (digest, size) in &blobs {
        let mut reader = store.content().open_blob(digest)?;
        let actual = store.content().size(digest)?;
        if actual != *size {
            return Err(ArchiveError::SizeMismatch {
                digest: digest.clone(),
                expected: *size,
                actual,
                by: "the image".to_string(),
            });
        }
        if let Err(source) = append(&blob_name(digest), *size, &mut reader, false) {
            if let Some(actual) = reader.mismatch() {
                return Err(ContentError::Corrupt {
                    digest: digest.clone(),
                    actual: actual.clone(),
                }
                .into());
            }
            return Err(ArchiveError::Io {
                action: "write",
                source,
            });
        }
    }
    builder
        .into_inner()
        .and_then(|mut out| out.flush())
        .map_err(archive_io("write"))?;
    Ok(())
}

fn blob_name(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

/// An image read by [`load`].
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The name it was tagged with, if the archive named it.
    pub reference: Option<Reference>,
    /// The image manifest in the store.
    pub target: Target,
}

/// What an archive's files became while streaming it.
#[derive(Default)]
struct ArchiveFiles {
    blobs: HashMap<PathBuf, crate::content::BlobInfo>,
    links: HashMap<PathBuf, PathBuf>,
    documents: HashMap<PathBuf, Vec<u8>>,
}

impl ArchiveFiles {
    fn resolve(&self, name: &str) -> Result<&crate::content::BlobInfo, ArchiveError> {
        let mut path = normalize(Path::new(name));
        for _ in 0..16 {
            if let Some(info) = self.blobs.get(&path) {
                return Ok(info);
            }
            match self.links.get(&path) {
                Some(target) => path = target.clone(),
                None => {
                    return Err(ArchiveError::MissingFile {
                        file: name.to_string(),
                        by: "manifest.json".to_string(),
                    });
                }
            }
        }
        Err(ArchiveError::BadLink {
            file: name.to_string(),
        })
    }
}

/// Lexically normalizes an archive path: no `.`, `..` resolved against the archive root.
fn normalize(path: &Path) -> PathBuf {
    let mut normalized = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => normalized.push(part),
            Component::ParentDir => {
                normalized.pop();
            }
            _ => {}
        }
    }
    normalized
}

/// Reads an OCI layout tar or a docker-archive tar into the store and tags what it names.
pub fn load(store: &Store, reader: impl Read) -> Result<Vec<Loaded>, ArchiveError> {
    let mut files = ArchiveFiles::default();
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(archive_io("read"))? {
        let mut entry = entry.map_err(archive_io("read"))?;
        let path = normalize(&entry.path().map_err(archive_io("read"))?);
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let Some(target) = entry.link_name().map_err(archive_io("read"))? else {
                continue;
            };
            let target = if kind.is_symlink() {
                normalize(&path.parent().unwrap_or(Path::new("")).join(target))
            } else {
                normalize(&target)
            };
            files.links.insert(path, target);
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let size = entry.size();
        let is_document = matches!(
            path.to_str(),
            Some("index.json" | "manifest.json" | "oci-layout" | "repositories")
        );
        if is_document && size <= MAX_METADATA_SIZE {
            let mut bytes = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut bytes).map_err(archive_io("read"))?;
            files.documents.insert(path, bytes);
        } else {
            let info = store.content().write_from(&mut entry, None, Some(size))?;
            files.blobs.insert(path, info);
        }
    }
    let docker_names = docker_names(&files)?;
    if let Some(index) = files.documents.get(Path::new("index.json")) {
        load_oci(store, index, &docker_names)
    } else if files.documents.contains_key(Path::new("manifest.json")) {
        load_docker(store, &files)
    } else {
        Err(ArchiveError::UnknownFormat)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn docker_manifest(files: &ArchiveFiles) -> Result<Vec<DockerManifestEntry>, ArchiveError> {
    match files.documents.get(Path::new("manifest.json")) {
        Some(bytes) => serde_json::from_slice(bytes).map_err(|source| ArchiveError::BadDocument {
            file: "manifest.json".to_string(),
            source,
        }),
        None => Ok(Vec::new()),
    }
}

/// Config digest → the names `manifest.json` gives it.
fn docker_names(files: &ArchiveFiles) -> Result<HashMap<Digest, Vec<Reference>>, ArchiveError> {
    let mut names: HashMap<Digest, Vec<Reference>> = HashMap::new();
    for entry in docker_manifest(files)? {
        let Ok(config) = files.resolve(&entry.config) else {
            continue;
        };
        for tag in entry.repo_tags.unwrap_or_default() {
            if let Ok(reference) = Reference::parse(&tag) {
                names
                    .entry(config.digest.clone())
                    .or_default()
                    .push(reference);
            }
        }
    }
    Ok(names)
}

fn load_oci(
    store: &Store,
    index: &[u8],
    docker_names: &HashMap<Digest, Vec<Reference>>,
) -> Result<Vec<Loaded>, ArchiveError> {
    let index: serde_json::Value =
        serde_json::from_slice(index).map_err(|source| ArchiveError::BadDocument {
            file: "index.json".to_string(),
            source,
        })?;
    let descriptors = index["manifests"].as_array().cloned().unwrap_or_default();
    let mut loaded = Vec::new();
    for descriptor in descriptors {
        let target = descriptor_target(&descriptor, "index.json")?;
        let manifest = select_manifest(store, &target, "index.json")?;
        let image = check_image(store, &manifest)?;
        let annotations = &descriptor["annotations"];
        let mut names = Vec::new();
        if let Some(name) = annotations[IMAGE_NAME_ANNOTATION].as_str()
            && let Ok(reference) = Reference::parse(name)
        {
            names.push(reference);
        } else if let Some(name) = annotations[REF_NAME_ANNOTATION].as_str()
            && (name.contains(':') || name.contains('/'))
            && let Ok(reference) = Reference::parse(name)
        {
            names.push(reference);
        } else if let Some(from_docker) = docker_names.get(image.id()) {
            names.extend(from_docker.iter().cloned());
        }
        record(store, &manifest, names, &mut loaded)?;
    }
    Ok(loaded)
}

fn record(
    store: &Store,
    target: &Target,
    names: Vec<Reference>,
    loaded: &mut Vec<Loaded>,
) -> Result<(), ArchiveError> {
    if names.is_empty() {
        store.add_dangling(target)?;
        loaded.push(Loaded {
            reference: None,
            target: target.clone(),
        });
    }
    for reference in names {
        store.set_tag(&reference, target)?;
        loaded.push(Loaded {
            reference: Some(reference),
            target: target.clone(),
        });
    }
    Ok(())
}

fn descriptor_target(descriptor: &serde_json::Value, by: &str) -> Result<Target, ArchiveError> {
    serde_json::from_value(descriptor.clone()).map_err(|source| ArchiveError::BadDocument {
        file: by.to_string(),
        source,
    })
}

fn check_blob(store: &Store, target: &Target, by: &str) -> Result<(), ArchiveError> {
    let actual = store
        .content()
        .size(&target.digest)
        .map_err(|_| ArchiveError::MissingBlob {
            digest: target.digest.to_string(),
            by: by.to_string(),
        })?;
    if actual != target.size {
        return Err(ArchiveError::SizeMismatch {
            digest: target.digest.clone(),
            expected: target.size,
            actual,
            by: by.to_string(),
        });
    }
    Ok(())
}

/// Follows indexes down to the manifest for this machine's platform.
fn select_manifest(store: &Store, target: &Target, by: &str) -> Result<Target, ArchiveError> {
    check_blob(store, target, by)?;
    if !store::is_index(&target.media_type) {
        return Ok(target.clone());
    }
    let bytes = store
        .content()
        .read_bytes(&target.digest, MAX_MANIFEST_SIZE)?;
    let index: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|source| ArchiveError::BadDocument {
            file: target.digest.to_string(),
            source,
        })?;
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let architecture = host_architecture();
    let chosen = manifests
        .iter()
        .find(|descriptor| {
            descriptor["platform"]["os"] == "linux"
                && descriptor["platform"]["architecture"] == architecture.to_string()
        })
        .or_else(|| {
            manifests
                .iter()
                .find(|descriptor| descriptor["platform"].is_null())
        })
        .ok_or_else(|| ArchiveError::NoPlatform {
            digest: target.digest.clone(),
            platform: format!("linux/{architecture}"),
        })?;
    let chosen = descriptor_target(chosen, &target.digest.to_string())?;
    select_manifest(store, &chosen, &target.digest.to_string())
}

/// Checks that a manifest, its config and every layer are present with the right sizes.
fn check_image(store: &Store, target: &Target) -> Result<Image, ArchiveError> {
    let by = format!("manifest {}", target.digest);
    let image = store.image(target).map_err(|error| match error {
        StoreError::Content(ContentError::NotFound { digest }) => ArchiveError::MissingBlob {
            digest: digest.to_string(),
            by: by.clone(),
        },
        other => other.into(),
    })?;
    check_blob(store, &image.config_target, &by)?;
    for layer in image.layers()? {
        check_blob(store, &layer, &by)?;
    }
    Ok(image)
}

fn load_docker(store: &Store, files: &ArchiveFiles) -> Result<Vec<Loaded>, ArchiveError> {
    let mut loaded = Vec::new();
    for entry in docker_manifest(files)? {
        let config_info = files.resolve(&entry.config)?;
        let config_bytes = store
            .content()
            .read_bytes(&config_info.digest, MAX_CONFIG_SIZE)?;
        let config: serde_json::Value =
            serde_json::from_slice(&config_bytes).map_err(|source| ArchiveError::BadDocument {
                file: entry.config.clone(),
                source,
            })?;
        let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| id.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if diff_ids.len() != entry.layers.len() {
            return Err(ArchiveError::LayerCount {
                file: entry.config.clone(),
                diff_ids: diff_ids.len(),
                layers: entry.layers.len(),
            });
        }
        let mut layers = Vec::new();
        for (name, diff_id) in entry.layers.iter().zip(&diff_ids) {
            let info = files.resolve(name)?;
            let compression = detect_blob(store, &info.digest)?;
            let actual = match compression {
                Compression::None => info.digest.clone(),
                _ => uncompressed_digest(store, &info.digest)?,
            };
            if actual.to_string() != *diff_id {
                return Err(ArchiveError::DiffIdMismatch {
                    layer: name.clone(),
                    file: entry.config.clone(),
                    expected: diff_id.clone(),
                    actual,
                });
            }
            layers.push(Target {
                media_type: compression.media_type().to_string(),
                digest: info.digest.clone(),
                size: info.size,
            });
        }
        let config_target = Target {
            media_type: OCI_CONFIG.to_string(),
            digest: config_info.digest.clone(),
            size: config_info.size,
        };
        let manifest = store.write_manifest(&config_target, &layers)?;
        let names = entry
            .repo_tags
            .unwrap_or_default()
            .iter()
            .filter_map(|tag| Reference::parse(tag).ok())
            .collect();
        record(store, &manifest, names, &mut loaded)?;
    }
    Ok(loaded)
}

fn detect_blob(store: &Store, digest: &Digest) -> Result<Compression, ArchiveError> {
    let mut prefix = [0u8; 8];
    let mut reader = store.content().open_blob(digest)?;
    let mut filled = 0;
    while filled < prefix.len() {
        let read = reader
            .read(&mut prefix[filled..])
            .map_err(archive_io("read"))?;
        if read == 0 {
            break;
        }
        filled += read;
    }
    Ok(Compression::detect(&prefix[..filled]))
}

fn uncompressed_digest(store: &Store, digest: &Digest) -> Result<Digest, ArchiveError> {
    let reader = BufReader::with_capacity(256 * 1024, store.content().open_blob(digest)?);
    let mut decoded = compression::decompress(reader).map_err(archive_io("read"))?;
    let mut writer = crate::digest::DigestWriter::new(io::sink());
    io::copy(&mut decoded, &mut writer).map_err(archive_io("read"))?;
    Ok(writer.finish().1.expect("a hashing writer gives a digest"))
}

/// How `rbuild import` describes the image it makes.
pub struct ImportOptions {
    /// The image's `created` time, RFC 3339.
    pub created: String,
    /// The history comment (usually the tarball's name).
    pub comment: String,
}

/// Turns a rootfs tarball (plain, gzip or zstd) into a one-layer image tagged `reference`.
pub fn import(
    store: &Store,
    rootfs: impl Read,
    reference: &Reference,
    options: &ImportOptions,
) -> Result<Target, ArchiveError> {
    let layer = layer::store_tar(rootfs, Compression::Gzip, store.content())?;
    let config = import_config(&layer.diff_id, options);
    let layer_target = Target {
        media_type: layer.media_type.to_string(),
        digest: layer.digest.clone(),
        size: layer.size,
    };
    let target = store.write_image(&config, &[layer_target])?;
    store.set_tag(reference, &target)?;
    Ok(target)
}

fn import_config(diff_id: &Digest, options: &ImportOptions) -> ImageConfiguration {
    let history = HistoryBuilder::default()
        .created(options.created.clone())
        .created_by("rbuild import")
        .comment(options.comment.clone())
        .build()
        .expect("history fields are set");
    ImageConfigurationBuilder::default()
        .created(options.created.clone())
        .architecture(host_architecture())
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .build()
                .expect("an empty config builds"),
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![diff_id.to_string()])
                .build()
                .expect("rootfs fields are set"),
        )
        .history(vec![history])
        .build()
        .expect("config fields are set")
}

/// The OCI architecture of this machine.
pub fn host_architecture() -> Arch {
    match std::env::consts::ARCH {
        "x86_64" => Arch::Amd64,
        "aarch64" => Arch::ARM64,
        "x86" => Arch::i386,
        "arm" => Arch::ARM,
        "powerpc64" => Arch::PowerPC64le,
        "s390x" => Arch::s390x,
        "riscv64" => Arch::RISCV64,
        other => Arch::Other(other.to_string()),
    }
}
