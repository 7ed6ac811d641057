//! Build cache shared between machines, through a registry or a directory.
//!
//! `--cache-to` writes the cache records of a build (step key → the layer it made, or none)
//! as an OCI image manifest: its config (media type [`CACHE_CONFIG`]) lists the records, its
//! layers are the layers they name. `type=registry,ref=REF` pushes it under REF;
//! `type=local,dest=DIR` writes it as an OCI image layout in DIR. `mode=min` (the default)
//! exports the steps of the result's stages, `mode=max` those of every stage.
//!
//! `--cache-from` reads such a manifest and its config, nothing more: a step whose key is
//! there is a cache hit without running, and its layer is downloaded only when a later step
//! that runs needs its files. The result image names the cache's layers without holding
//! them: the cache repository is recorded as their source (`rbuild_cache::sources`), so a
//! push to that registry mounts them and `rbuild run` or an export fetches them then. (A
//! cache in a local directory is copied in instead: the directory may not stay.) A cache that
//! cannot be read is a warning, not a failure, as in BuildKit.

use std::collections::{BTreeSet, HashMap};

use rbuild_cache::BlobSource;
use rbuild_cache::store::OCI_MANIFEST;

use super::*;
use crate::options::{CacheExport, CacheLocation};
use crate::registry::client::Client;

/// The media type of a cache manifest's config.
pub const CACHE_CONFIG: &str = "application/vnd.rbuild.cache.config.v1+json";
/// The key of the records in that config.
const RECORDS_KEY: &str = "rbuild.cache.v1";

/// Where the blobs of an imported cache come from.
enum Source {
    Registry(Box<Client>, BlobSource),
    Local(PathBuf),
}

/// The records of the caches `--cache-from` names.
#[derive(Default)]
pub(super) struct ImportedCache {
    /// Step key → its layer (none: the step made no layer).
    records: HashMap<Digest, Option<LayerRecord>>,
    /// Layer blob → the source that has it.
    blobs: HashMap<Digest, usize>,
    sources: Vec<Source>,
}

impl ImportedCache {
    /// Reads the cache manifests of `locations`; one that cannot be read is reported on stderr
    /// and skipped.
    pub(super) fn import(store: &Store, locations: &[CacheLocation]) -> Self {
        let mut imported = Self::default();
        for location in locations {
            match read_location(store, location) {
                Ok((source, records)) => {
                    let index = imported.sources.len();
                    imported.sources.push(source);
                    for (key, layer) in records {
                        if let Some(layer) = &layer {
                            imported.blobs.insert(layer.target.digest.clone(), index);
                        }
                        imported.records.entry(key).or_insert(layer);
                    }
                }
                Err(problem) => {
                    eprintln!(
                        "warning: --cache-from {}: {problem}; building without it",
                        describe(location)
                    );
                }
            }
        }
        imported
    }

    /// The imported record of a step key.
    pub(super) fn get(&self, key: &Digest) -> Option<&Option<LayerRecord>> {
        self.records.get(key)
    }

    /// The registry repository of the imported cache that names `digest`, if it is one.
    fn registry_source(&self, digest: &Digest) -> Option<&BlobSource> {
        match &self.sources[*self.blobs.get(digest)?] {
            Source::Registry(_, source) => Some(source),
            Source::Local(_) => None,
        }
    }

    /// Fetches the blob of `layer` into the store, verified, from the cache that named it.
    fn fetch(&self, store: &Store, layer: &LayerRecord) -> Result<bool, String> {
        let Some(&index) = self.blobs.get(&layer.target.digest) else {
            return Ok(false);
        };
        match &self.sources[index] {
            Source::Registry(client, _) => {
                crate::registry::pull::download(store, client, &layer.target)
                    .map_err(|error| crate::commands::image::chain_text(&error))?;
            }
            Source::Local(directory) => {
                let path = blob_path(directory, &layer.target.digest);
                let mut file = fs::File::open(&path)
                    .map_err(|error| format!("{}: {error}", path.display()))?;
                store
                    .content()
                    .write_from(
                        &mut file,
                        Some(&layer.target.digest),
                        Some(layer.target.size),
                    )
                    .map_err(|error| crate::commands::image::chain_text(&error))?;
            }
        }
        Ok(true)
    }
}

fn describe(location: &CacheLocation) -> String {
    match location {
        CacheLocation::Registry { reference } => format!("type=registry,ref={reference}"),
        CacheLocation::Local { directory } => format!("type=local,{}", directory.display()),
    }
}

fn blob_path(directory: &Path, digest: &Digest) -> PathBuf {
    directory.join("blobs").join("sha256").join(digest.hex())
}

type Records = Vec<(Digest, Option<LayerRecord>)>;

/// The source and records of one `--cache-from`.
fn read_location(store: &Store, location: &CacheLocation) -> Result<(Source, Records), String> {
    match location {
        CacheLocation::Registry { reference } => {
            let reference = Reference::parse(reference).map_err(|error| error.to_string())?;
            let client = Client::new(&reference, false)
                .map_err(|error| crate::commands::image::chain_text(&error))?;
            let wanted = crate::registry::pull::manifest_name(&reference);
            let (_, manifest) =
                crate::registry::pull::fetch_manifest(&client, &wanted, reference.digest())
                    .map_err(|error| crate::commands::image::chain_text(&error))?;
            let config = config_target(&manifest)?;
            crate::registry::pull::download(store, &client, &config)
                .map_err(|error| crate::commands::image::chain_text(&error))?;
            let config_bytes = store
                .content()
                .read_bytes(&config.digest, rbuild_cache::store::MAX_CONFIG_SIZE)
                .map_err(|error| crate::commands::image::chain_text(&error))?;
            let records = records(&manifest, &config_bytes)?;
            let source = BlobSource {
                registry: reference.registry().to_string(),
                repository: reference.repository().to_string(),
            };
            Ok((Source::Registry(Box::new(client), source), records))
        }
        CacheLocation::Local { directory } => {
            let index_path = directory.join("index.json");
            let index: Value = fs::read(&index_path)
                .map_err(|error| format!("{}: {error}", index_path.display()))
                .and_then(|bytes| {
                    serde_json::from_slice(&bytes)
                        .map_err(|error| format!("{}: {error}", index_path.display()))
                })?;
            let descriptor = index["manifests"]
                .as_array()
                .and_then(|manifests| manifests.first())
                .ok_or_else(|| format!("{} names no manifest", index_path.display()))?;
            let manifest_digest: Digest = descriptor["digest"]
                .as_str()
                .and_then(|text| text.parse().ok())
                .ok_or_else(|| format!("{}: a manifest without digest", index_path.display()))?;
            let manifest = read_verified(directory, &manifest_digest)?;
            let config = config_target(&manifest)?;
            let config_bytes = read_verified(directory, &config.digest)?;
            let records = records(&manifest, &config_bytes)?;
            Ok((Source::Local(directory.clone()), records))
        }
    }
}

/// A small blob of an OCI layout directory, checked against its digest.
fn read_verified(directory: &Path, digest: &Digest) -> Result<Vec<u8>, String> {
    let path = blob_path(directory, digest);
    let bytes = fs::read(&path).map_err(|error| format!("{}: {error}", path.display()))?;
    if Digest::of(&bytes) != *digest {
        return Err(format!(
            "{}: the content does not match its digest",
            path.display()
        ));
    }
    Ok(bytes)
}

/// The config descriptor of a cache manifest.
fn config_target(manifest: &[u8]) -> Result<Target, String> {
    let manifest: Value =
        serde_json::from_slice(manifest).map_err(|error| format!("bad manifest: {error}"))?;
    let config = &manifest["config"];
    if config["mediaType"].as_str() != Some(CACHE_CONFIG) {
        return Err(format!(
            "not an rbuild build cache (its config is {})",
            config["mediaType"].as_str().unwrap_or("missing")
        ));
    }
    serde_json::from_value(config.clone())
        .map_err(|error| format!("bad config descriptor: {error}"))
}

/// The records of a cache manifest and its config.
fn records(manifest: &[u8], config: &[u8]) -> Result<Records, String> {
    let manifest: Value =
        serde_json::from_slice(manifest).map_err(|error| format!("bad manifest: {error}"))?;
    let config: Value =
        serde_json::from_slice(config).map_err(|error| format!("bad cache config: {error}"))?;
    let layers: Vec<Target> = serde_json::from_value(manifest["layers"].clone())
        .map_err(|error| format!("bad layer list: {error}"))?;
    let diff_ids: Vec<Digest> = serde_json::from_value(config["rootfs"]["diff_ids"].clone())
        .map_err(|error| format!("bad diff ids: {error}"))?;
    if diff_ids.len() != layers.len() {
        return Err("the cache names a different number of layers and diff ids".to_string());
    }
    let entries = config[RECORDS_KEY]
        .as_array()
        .ok_or_else(|| "the cache config has no records".to_string())?;
    entries
        .iter()
        .map(|entry| {
            let key: Digest = entry["key"]
                .as_str()
                .and_then(|text| text.parse().ok())
                .ok_or_else(|| format!("a record without a key: {entry}"))?;
            let layer = match entry["layer"].as_u64() {
                None => None,
                Some(index) => {
                    let index = usize::try_from(index).unwrap_or(usize::MAX);
                    let target = layers.get(index).ok_or_else(|| {
                        format!("a record names layer {index}, which is not there")
                    })?;
                    Some(LayerRecord {
                        target: target.clone(),
                        diff_id: diff_ids[index].clone(),
                    })
                }
            };
            Ok((key, layer))
        })
        .collect()
}

impl Solver {
    /// Makes sure the blobs of `layers` are in the store, fetching those an imported cache
    /// named, and then those with a recorded source (a lazily pulled base image's); a blob
    /// none of them has is an error.
    pub(super) fn ensure_local(&self, layers: &[LayerRecord]) -> Result<(), SolveError> {
        let mut elsewhere = Vec::new();
        for layer in layers {
            if self.store.content().contains(&layer.target.digest) {
                continue;
            }
            let fetched =
                self.imported
                    .fetch(&self.store, layer)
                    .map_err(|problem| SolveError::Step {
                        message: format!(
                            "fetching layer {} from --cache-from: {problem}",
                            layer.target.digest
                        ),
                    })?;
            if !fetched {
                elsewhere.push(layer.target.clone());
            }
        }
        crate::registry::fetch_missing(&self.store, &elsewhere).map_err(|error| SolveError::Step {
            message: format!(
                "fetching layers: {}",
                crate::commands::image::chain_text(&error)
            ),
        })
    }

    /// Makes sure every layer of `layers` is in the store or has a source recorded there, so
    /// an image record may name it: a layer from a registry cache gets that repository as its
    /// source, one from a cache directory is copied in.
    pub(super) fn keep_reachable(&self, layers: &[LayerRecord]) -> Result<(), SolveError> {
        let mut fetch = Vec::new();
        for layer in layers {
            let digest = &layer.target.digest;
            if self.store.content().contains(digest) {
                continue;
            }
            match self.imported.registry_source(digest) {
                Some(source) => self.store.add_blob_source(digest, source)?,
                None if self.store.blob_sources(digest).is_empty() => fetch.push(layer.clone()),
                None => {}
            }
        }
        self.ensure_local(&fetch)
    }

    /// Writes the cache records of this build to `export`.
    pub(super) fn export_cache(&self, export: &CacheExport) -> Result<(), SolveError> {
        let stages = if export.all_steps {
            self.graph.stages.iter().map(|stage| stage.index).collect()
        } else {
            self.result_stages()
        };
        let mut seen = BTreeSet::new();
        let records: Vec<(Digest, Option<LayerRecord>)> = self
            .records
            .lock()
            .unwrap_or_else(|error| error.into_inner())
            .iter()
            .filter(|(stage, key, _)| stages.contains(stage) && seen.insert(key.clone()))
            .map(|(_, key, layer)| (key.clone(), layer.clone()))
            .collect();
        let mut layers: Vec<LayerRecord> = Vec::new();
        let mut entries = Vec::new();
        for (key, layer) in &records {
            let index = layer.as_ref().map(|layer| {
                match layers
                    .iter()
                    .position(|known| known.target.digest == layer.target.digest)
                {
                    Some(index) => index,
                    None => {
                        layers.push(layer.clone());
                        layers.len() - 1
                    }
                }
            });
            entries.push(json!({"key": key.to_string(), "layer": index}));
        }
        // A registry push mounts or fetches what the store lacks; a directory needs the bytes.
        match &export.location {
            CacheLocation::Registry { .. } => self.keep_reachable(&layers)?,
            CacheLocation::Local { .. } => self.ensure_local(&layers)?,
        }
        let config = json!({
            "architecture": self.graph.stages.last().map_or("amd64".to_string(), |stage| stage.platform.architecture.clone()),
            "os": "linux",
            "config": {},
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|layer| layer.diff_id.to_string()).collect::<Vec<_>>(),
            },
            RECORDS_KEY: entries,
        });
        let config_bytes = serde_json::to_vec(&config).expect("configs serialize");
        let info = self.store.content().write_bytes(&config_bytes)?;
        let config_target = Target {
            media_type: CACHE_CONFIG.to_string(),
            digest: info.digest,
            size: info.size,
        };
        let layer_targets: Vec<Target> = layers.iter().map(|layer| layer.target.clone()).collect();
        let manifest = self.store.write_manifest(&config_target, &layer_targets)?;
        let failure = |problem: String| SolveError::Step {
            message: format!(
                "exporting cache to {}: {problem}",
                describe(&export.location)
            ),
        };
        match &export.location {
            CacheLocation::Registry { reference } => {
                let reference =
                    Reference::parse(reference).map_err(|error| failure(error.to_string()))?;
                let image = self.store.image(&manifest)?;
                crate::registry::push::push(&self.store, &image, &reference)
                    .map_err(|error| failure(crate::commands::image::chain_text(&error)))?;
            }
            CacheLocation::Local { directory } => {
                let mut blobs = vec![manifest.clone(), config_target];
                blobs.extend(layer_targets);
                write_layout(&self.store, directory, &blobs, &manifest).map_err(failure)?;
            }
        }
        Ok(())
    }

    /// The target stage and the stages its filesystem is built on (`FROM stage`).
    fn result_stages(&self) -> BTreeSet<usize> {
        let mut stages = BTreeSet::new();
        let mut index = self.graph.target_stage().index;
        loop {
            stages.insert(index);
            let stage = self
                .graph
                .stages
                .iter()
                .find(|stage| stage.index == index)
                .expect("stages exist");
            match stage.base {
                Base::Stage(base) if !stages.contains(&base) => index = base,
                _ => return stages,
            }
        }
    }
}

/// Writes an OCI image layout in `directory`: the blobs it lacks (temp + fsync + rename),
/// then `index.json` naming `manifest` as `latest`.
fn write_layout(
    store: &Store,
    directory: &Path,
    blobs: &[Target],
    manifest: &Target,
) -> Result<(), String> {
    let blobs_directory = directory.join("blobs").join("sha256");
    fs::create_dir_all(&blobs_directory)
        .map_err(|error| format!("{}: {error}", blobs_directory.display()))?;
    for blob in blobs {
        let path = blob_path(directory, &blob.digest);
        if fs::metadata(&path).is_ok_and(|metadata| metadata.len() == blob.size) {
            continue;
        }
        let temp =
            blobs_directory.join(format!(".{}.{}.tmp", blob.digest.hex(), std::process::id()));
        let copied = (|| -> io::Result<()> {
            let mut source = store
                .content()
                .open_blob(&blob.digest)
                .map_err(io::Error::other)?;
            let mut file = fs::File::create(&temp)?;
            io::copy(&mut source, &mut file)?;
            file.sync_all()?;
            fs::rename(&temp, &path)
        })();
        if let Err(error) = copied {
            let _ = fs::remove_file(&temp);
            return Err(format!("{}: {error}", path.display()));
        }
    }
    let layout = directory.join("oci-layout");
    rbuild_cache::content::write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(|error| crate::commands::image::chain_text(&error))?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": rbuild_cache::store::OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": manifest.digest.to_string(),
            "size": manifest.size,
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    });
    rbuild_cache::content::write_atomic(
        &directory.join("index.json"),
        &serde_json::to_vec_pretty(&index).expect("indexes serialize"),
    )
    .map_err(|error| crate::commands::image::chain_text(&error))
}
