//! Pulling an image from a registry into the store.
//!
//! The manifest is fetched with an `Accept` of OCI and Docker v2 schema 2 manifests and
//! indexes, checked against the digest the reference names and the `Docker-Content-Digest` the
//! registry announces, and for an index the platform's manifest is fetched in turn. The config
//! and layers are downloaded by a few threads straight into the content store, each checked
//! against its descriptor's digest and size when it is committed (a blob that lies is never
//! stored); a download that breaks off is resumed with `Range: bytes=N-` while the hash
//! continues. The manifest is stored last, with the bytes as received, and then tagged, so a
//! record never names a missing blob.
//!
//! [`pull_lazily`] (what `FROM` does) downloads the manifest and config only, and records the
//! repository as the source of each layer (`rbuild_cache::sources`); [`fetch_missing`] gets
//! such layers when their bytes are needed.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::sync::Mutex;

use reqwest::{Method, StatusCode, header};
use serde_json::Value;

use rbuild_cache::store::{
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, MAX_MANIFEST_SIZE, OCI_INDEX, OCI_MANIFEST,
};
use rbuild_cache::{BlobSource, BlobWriter, Digest, Image, Reference, Store, Target};
use rbuild_frontend::Platform;

use super::client::{ATTEMPTS, Client, RegistryError, backoff, header_text};
use crate::commands::image::{chain_text, human_size};

/// How many blobs download at once.
const DOWNLOAD_THREADS: usize = 3;
/// The size of one read from a response body.
const BUFFER_SIZE: usize = 256 * 1024;

/// The manifest media types rbuild asks for.
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

/// What `reference` asks the registry's `manifests/` for: its digest, else its tag, else
/// `latest`.
pub(crate) fn manifest_name(reference: &Reference) -> String {
    match (reference.digest(), reference.tag()) {
        (Some(digest), _) => digest.to_string(),
        (None, Some(tag)) => tag.to_string(),
        (None, None) => rbuild_cache::reference::DEFAULT_TAG.to_string(),
    }
}

/// Pulls `reference` for `platform` into `store` and names it `reference` there; returns the
/// image manifest's target. Progress lines go to stderr.
pub fn pull(
    store: &Store,
    reference: &Reference,
    platform: &Platform,
) -> Result<Target, RegistryError> {
    pull_with(store, reference, platform, true)
}

/// Like [`pull`], but only the manifest and config are downloaded: each layer the store lacks
/// gets the repository recorded as its source, to be fetched by [`fetch_missing`] when needed.
pub fn pull_lazily(
    store: &Store,
    reference: &Reference,
    platform: &Platform,
) -> Result<Target, RegistryError> {
    pull_with(store, reference, platform, false)
}

fn pull_with(
    store: &Store,
    reference: &Reference,
    platform: &Platform,
    layers_too: bool,
) -> Result<Target, RegistryError> {
    let client = Client::new(reference, false)?;
    let wanted = manifest_name(reference);
    let (mut media_type, mut bytes) = fetch_manifest(&client, &wanted, reference.digest())?;
    if is_index(&media_type) {
        let index_digest = Digest::of(&bytes);
        let chosen = choose_platform(&client, &bytes, &index_digest, platform)?;
        let (chosen_type, chosen_bytes) =
            fetch_manifest(&client, &chosen.to_string(), Some(&chosen))?;
        media_type = chosen_type;
        bytes = chosen_bytes;
    }
    if media_type != OCI_MANIFEST && media_type != DOCKER_MANIFEST {
        return Err(RegistryError::MediaType {
            reference: reference.to_string(),
            media_type,
        });
    }
    let digest = Digest::of(&bytes);
    let manifest: Value = serde_json::from_slice(&bytes)
        .map_err(|error| bad(&client, "manifest", &digest, error.to_string()))?;
    let mut blobs = vec![descriptor(&client, &digest, &manifest["config"])?];
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        blobs.push(descriptor(&client, &digest, layer)?);
    }
    if !layers_too {
        let source = BlobSource {
            registry: reference.registry().to_string(),
            repository: reference.repository().to_string(),
        };
        for layer in blobs.drain(1..) {
            store.add_blob_source(&layer.digest, &source)?;
        }
    }
    download_all(store, &client, &blobs)?;
    let info = store.content().write_bytes(&bytes)?;
    let target = Target {
        media_type,
        digest: info.digest,
        size: info.size,
    };
    // A record only names blobs that are all there: read the image back before tagging it.
    store.image(&target)?;
    store.set_tag(reference, &target)?;
    Ok(target)
}

fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

fn bad(client: &Client, what: &'static str, digest: &Digest, problem: String) -> RegistryError {
    RegistryError::BadManifest {
        reference: client.reference().to_string(),
        what,
        digest: digest.clone(),
        problem,
    }
}

/// GETs the manifest `wanted` (a tag or a digest): its media type and bytes, checked against
/// `expected` and the registry's `Docker-Content-Digest`.
pub(crate) fn fetch_manifest(
    client: &Client,
    wanted: &str,
    expected: Option<&Digest>,
) -> Result<(String, Vec<u8>), RegistryError> {
    let action = format!("fetching manifest {wanted}");
    let url = client.url(&format!("manifests/{wanted}"));
    let mut attempt = 1;
    let (response_type, announced, bytes) = loop {
        let result = client
            .send(Method::GET, &url, &action, &|request| {
                request.header(header::ACCEPT, ACCEPT)
            })
            .and_then(|response| client.expect(response, &action, &[StatusCode::OK]))
            .and_then(|response| {
                let response_type = header_text(&response, header::CONTENT_TYPE);
                let announced = header_text(
                    &response,
                    "docker-content-digest".parse().expect("a header name"),
                );
                let mut bytes = Vec::new();
                response
                    .take(MAX_MANIFEST_SIZE + 1)
                    .read_to_end(&mut bytes)
                    .map_err(|source| RegistryError::Read {
                        reference: client.reference().to_string(),
                        action: action.clone(),
                        source,
                    })?;
                Ok((response_type, announced, bytes))
            });
        match result {
            Err(error) if error.is_transient() && attempt < ATTEMPTS => {
                eprintln!(
                    "retrying (attempt {}/{ATTEMPTS}): {}",
                    attempt + 1,
                    chain_text(&error)
                );
                backoff(attempt);
                attempt += 1;
            }
            result => break result?,
        }
    };
    if bytes.len() as u64 > MAX_MANIFEST_SIZE {
        return Err(RegistryError::ManifestTooLarge {
            reference: client.reference().to_string(),
            limit: MAX_MANIFEST_SIZE,
        });
    }
    let actual = Digest::of(&bytes);
    if let Some(expected) = expected
        && *expected != actual
    {
        return Err(RegistryError::ManifestDigest {
            reference: client.reference().to_string(),
            expected: expected.clone(),
            actual,
            by: "the reference names",
        });
    }
    if let Some(announced) = announced
        && let Ok(announced) = announced.trim().parse::<Digest>()
        && announced != actual
    {
        return Err(RegistryError::ManifestDigest {
            reference: client.reference().to_string(),
            expected: announced,
            actual,
            by: "the registry announced",
        });
    }
    let document: Value = serde_json::from_slice(&bytes)
        .map_err(|error| bad(client, "manifest", &actual, error.to_string()))?;
    // The Content-Type is what the registry says; the document's own mediaType settles a
    // generic one (`application/json`), and a document without either is told by its shape.
    let from_header = response_type
        .as_deref()
        .map(|text| text.split(';').next().unwrap_or(text).trim().to_string())
        .filter(|text| is_index(text) || text == OCI_MANIFEST || text == DOCKER_MANIFEST);
    let media_type = from_header
        .or_else(|| document["mediaType"].as_str().map(str::to_string))
        .unwrap_or_else(|| {
            if document["manifests"].is_array() {
                OCI_INDEX.to_string()
            } else {
                OCI_MANIFEST.to_string()
            }
        });
    Ok((media_type, bytes))
}

/// The digest of the manifest for `platform` in an index.
fn choose_platform(
    client: &Client,
    bytes: &[u8],
    digest: &Digest,
    platform: &Platform,
) -> Result<Digest, RegistryError> {
    let index: Value = serde_json::from_slice(bytes)
        .map_err(|error| bad(client, "index", digest, error.to_string()))?;
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let matches = |entry: &Value, strict_variant: bool| {
        let found = &entry["platform"];
        found["os"].as_str() == Some(platform.os.as_str())
            && found["architecture"].as_str() == Some(platform.architecture.as_str())
            && match &platform.variant {
                Some(variant) => found["variant"].as_str() == Some(variant.as_str()),
                None => !strict_variant || found["variant"].is_null(),
            }
    };
    let chosen = manifests
        .iter()
        .find(|entry| matches(entry, true))
        .or_else(|| manifests.iter().find(|entry| matches(entry, false)));
    let Some(chosen) = chosen else {
        let available: Vec<String> = manifests
            .iter()
            .filter_map(|entry| {
                let found = &entry["platform"];
                let os = found["os"].as_str()?;
                let architecture = found["architecture"].as_str()?;
                Some(match found["variant"].as_str() {
                    Some(variant) => format!("{os}/{architecture}/{variant}"),
                    None => format!("{os}/{architecture}"),
                })
            })
            .collect();
        return Err(RegistryError::NoPlatform {
            reference: client.reference().to_string(),
            platform: platform.to_string(),
            digest: digest.clone(),
            available: if available.is_empty() {
                "no platforms".to_string()
            } else {
                available.join(", ")
            },
        });
    };
    chosen["digest"]
        .as_str()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| {
            bad(
                client,
                "index",
                digest,
                "an entry has no sha256 digest".to_string(),
            )
        })
}

/// A descriptor of a manifest as a target.
fn descriptor(client: &Client, manifest: &Digest, value: &Value) -> Result<Target, RegistryError> {
    let digest = value["digest"].as_str().and_then(|text| text.parse().ok());
    let size = value["size"].as_u64();
    match (digest, size) {
        (Some(digest), Some(size)) => Ok(Target {
            media_type: value["mediaType"].as_str().unwrap_or_default().to_string(),
            digest,
            size,
        }),
        _ => Err(bad(
            client,
            "manifest",
            manifest,
            format!("a descriptor lacks a sha256 digest or a size: {value}"),
        )),
    }
}

/// Downloads the blobs the store lacks, a few at a time; the first failure stops the rest.
pub(crate) fn download_all(
    store: &Store,
    client: &Client,
    blobs: &[Target],
) -> Result<(), RegistryError> {
    let queue: Mutex<VecDeque<&Target>> = Mutex::new(blobs.iter().collect());
    let failure: Mutex<Option<RegistryError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..DOWNLOAD_THREADS.min(blobs.len()) {
            scope.spawn(|| {
                loop {
                    if failure.lock().expect("not poisoned").is_some() {
                        return;
                    }
                    let Some(blob) = queue.lock().expect("not poisoned").pop_front() else {
                        return;
                    };
                    if let Err(error) = download(store, client, blob) {
                        failure.lock().expect("not poisoned").get_or_insert(error);
                        return;
                    }
                }
            });
        }
    });
    match failure.into_inner().expect("not poisoned") {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Downloads one blob unless the store has it, resuming after a broken connection.
pub(crate) fn download(store: &Store, client: &Client, blob: &Target) -> Result<(), RegistryError> {
    let content = store.content();
    if content.contains(&blob.digest) && content.size(&blob.digest)? == blob.size {
        eprintln!("exists  {}", blob.digest);
        return Ok(());
    }
    eprintln!("pulling {} {}", blob.digest, human_size(blob.size));
    let url = client.url(&format!("blobs/{}", blob.digest));
    let action = format!("downloading blob {}", blob.digest);
    let mut writer = content.writer()?;
    let mut attempt = 1;
    loop {
        match download_into(client, &url, &action, blob, &mut writer) {
            Ok(Progress::Done) => break,
            Ok(Progress::Restart) => {
                writer = content.writer()?;
            }
            Err(error) if error.is_transient() && attempt < ATTEMPTS => {
                eprintln!(
                    "retrying {} from byte {} (attempt {}/{ATTEMPTS}): {}",
                    blob.digest,
                    writer.size(),
                    attempt + 1,
                    chain_text(&error)
                );
                backoff(attempt);
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
    writer
        .commit(Some(&blob.digest), Some(blob.size))
        .map_err(|source| RegistryError::BlobRejected {
            reference: client.reference().to_string(),
            digest: blob.digest.clone(),
            source,
        })?;
    Ok(())
}

enum Progress {
    /// The body was read to its end.
    Done,
    /// The registry ignored the range and sent the blob from its start: write it afresh.
    Restart,
}

/// One GET of a blob from what `writer` already holds.
fn download_into(
    client: &Client,
    url: &str,
    action: &str,
    blob: &Target,
    writer: &mut BlobWriter,
) -> Result<Progress, RegistryError> {
    let offset = writer.size();
    let response = client.send(Method::GET, url, action, &|request| {
        if offset > 0 {
            request.header(header::RANGE, format!("bytes={offset}-"))
        } else {
            request
        }
    })?;
    let status = response.status();
    if offset > 0 && status == StatusCode::OK {
        return Ok(Progress::Restart);
    }
    let expected = if offset > 0 {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let mut response = client.expect(response, action, &[expected])?;
    // One byte more than the descriptor allows is enough to reject a blob that is too long.
    let mut remaining = blob.size.saturating_sub(offset) + 1;
    let mut buffer = vec![0; BUFFER_SIZE];
    while remaining > 0 {
        let wanted = buffer
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        let read = match response.read(&mut buffer[..wanted]) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(RegistryError::Read {
                    reference: client.reference().to_string(),
                    action: action.to_string(),
                    source,
                });
            }
        };
        writer
            .write_all(&buffer[..read])
            .map_err(|source| rbuild_cache::ContentError::Io {
                action: "write",
                path: writer.temp_path().to_path_buf(),
                source,
            })?;
        remaining -= read as u64;
    }
    if writer.size() < blob.size {
        // The body ended early without an error: a proxy or server cut it. Resume.
        return Err(RegistryError::Read {
            reference: client.reference().to_string(),
            action: action.to_string(),
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the body ended at byte {} of {}", writer.size(), blob.size),
            ),
        });
    }
    Ok(Progress::Done)
}

/// Fetches the blobs of `targets` the store lacks from the registry repositories recorded as
/// their sources, trying each source in turn; a blob without any is an error.
pub fn fetch_missing(store: &Store, targets: &[Target]) -> Result<(), RegistryError> {
    let mut missing: Vec<&Target> = Vec::new();
    for target in targets {
        if !store.content().contains(&target.digest)
            && !missing.iter().any(|known| known.digest == target.digest)
        {
            missing.push(target);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let sources: Vec<Vec<BlobSource>> = missing
        .iter()
        .map(|target| store.blob_sources(&target.digest))
        .collect();
    if let Some(position) = sources.iter().position(Vec::is_empty) {
        return Err(RegistryError::NoSource {
            digest: missing[position].digest.clone(),
        });
    }
    let mut clients: HashMap<String, Client> = HashMap::new();
    let mut last_error = None;
    let rounds = sources.iter().map(Vec::len).max().unwrap_or(0);
    for round in 0..rounds {
        // The blobs still missing, grouped by their source of this round.
        let mut groups: HashMap<String, Vec<Target>> = HashMap::new();
        for (target, sources) in missing.iter().zip(&sources) {
            if let Some(source) = sources.get(round)
                && !store.content().contains(&target.digest)
            {
                groups
                    .entry(source.name())
                    .or_default()
                    .push((*target).clone());
            }
        }
        for (name, blobs) in groups {
            if !clients.contains_key(&name) {
                let reference = Reference::parse(&name).map_err(|error| {
                    RegistryError::Store(rbuild_cache::StoreError::Reference(error))
                })?;
                clients.insert(name.clone(), Client::new(&reference, false)?);
            }
            if let Err(error) = download_all(store, &clients[&name], &blobs) {
                if round + 1 < rounds {
                    eprintln!("warning: {}; trying another source", chain_text(&error));
                }
                last_error = Some(error);
            }
        }
    }
    // Every blob had a source in the first round: one still missing failed every source.
    match last_error {
        Some(error)
            if missing
                .iter()
                .any(|target| !store.content().contains(&target.digest)) =>
        {
            Err(error)
        }
        _ => Ok(()),
    }
}

/// Fetches the layers of `image` the store lacks (see [`fetch_missing`]).
pub fn fetch_layers(store: &Store, image: &Image) -> Result<(), RegistryError> {
    fetch_missing(store, &image.layers()?)
}
