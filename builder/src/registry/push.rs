//! Pushing an image of the store to a registry.
//!
//! For the config and each layer (a few at a time): HEAD the blob and skip it when the
//! registry has it; else try a cross-repository mount from another repository of the same
//! registry that the store knows holds it (201: done; 202: an upload session to go on with);
//! else upload it, in one PUT below [`MONOLITHIC_LIMIT`] and in PATCH chunks of [`CHUNK_SIZE`]
//! above. When an upload fails on the way, the session is asked how much it holds
//! (`GET` the upload location: `Range: 0-N`) and the upload resumes at N+1. The manifest goes
//! last, with its bytes as stored, and the registry's `Docker-Content-Digest` must match it.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Mutex;

use reqwest::blocking::{Body, RequestBuilder};
use reqwest::{Method, StatusCode, header};

use rbuild_cache::{Digest, Image, Reference, Store, Target};

use super::client::{ATTEMPTS, Client, RegistryError, backoff, header_text};
use crate::commands::image::{chain_text, human_size};

/// Blobs up to this size are uploaded in one PUT.
pub const MONOLITHIC_LIMIT: u64 = 8 << 20;
/// Larger blobs are uploaded in PATCH chunks of this size.
pub const CHUNK_SIZE: u64 = 16 << 20;
/// How many repositories a blob is offered to be mounted from before it is uploaded.
const MOUNT_ATTEMPTS: usize = 3;
/// How many blobs upload at once.
const UPLOAD_THREADS: usize = 3;

/// Pushes `image` (from `store`) to the registry and repository `destination` names, under its
/// tag (or its digest); returns the manifest digest. Progress lines go to stderr.
pub fn push(
    store: &Store,
    image: &Image,
    destination: &Reference,
) -> Result<Digest, RegistryError> {
    let client = Client::new(destination, true)?;
    let mounts = mount_sources(store, destination)?;
    let mut blobs = vec![image.config_target.clone()];
    blobs.extend(image.layers()?);
    let mut seen = BTreeSet::new();
    blobs.retain(|blob| seen.insert(blob.digest.clone()));
    let queue: Mutex<VecDeque<&Target>> = Mutex::new(blobs.iter().collect());
    let failure: Mutex<Option<RegistryError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..UPLOAD_THREADS.min(blobs.len()) {
            scope.spawn(|| {
                loop {
                    if failure.lock().expect("not poisoned").is_some() {
                        return;
                    }
                    let Some(blob) = queue.lock().expect("not poisoned").pop_front() else {
                        return;
                    };
                    // The repositories recorded as the blob's sources come first: the
                    // registry is known to hold it there.
                    let mut sources: Vec<String> = store
                        .blob_sources(&blob.digest)
                        .into_iter()
                        .filter(|source| {
                            source.registry == destination.registry()
                                && source.repository != destination.repository()
                        })
                        .map(|source| source.repository)
                        .collect();
                    for repository in mounts.get(&blob.digest).into_iter().flatten() {
                        if !sources.contains(repository) {
                            sources.push(repository.clone());
                        }
                    }
                    if let Err(error) = push_blob(store, &client, blob, &sources) {
                        failure.lock().expect("not poisoned").get_or_insert(error);
                        return;
                    }
                }
            });
        }
    });
    if let Some(error) = failure.into_inner().expect("not poisoned") {
        return Err(error);
    }
    let name = match (destination.tag(), destination.digest()) {
        (Some(tag), _) => tag.to_string(),
        (None, _) => image.target.digest.to_string(),
    };
    let action = format!("pushing manifest {}", image.target.digest);
    let bytes = image.manifest_bytes.clone();
    let media_type = image.target.media_type.clone();
    let response = client.send_retrying(
        Method::PUT,
        &client.url(&format!("manifests/{name}")),
        &action,
        &[StatusCode::CREATED, StatusCode::OK],
        &|request| {
            request
                .header(header::CONTENT_TYPE, media_type.as_str())
                .body(bytes.clone())
        },
    )?;
    if let Some(announced) = header_text(&response, docker_content_digest())
        && announced.trim() != image.target.digest.to_string()
    {
        return Err(RegistryError::PushedDigest {
            reference: destination.to_string(),
            expected: image.target.digest.clone(),
            actual: announced,
        });
    }
    eprintln!("pushed manifest {}", image.target.digest);
    Ok(image.target.digest.clone())
}

fn docker_content_digest() -> header::HeaderName {
    header::HeaderName::from_static("docker-content-digest")
}

/// For each blob, the other repositories of the destination's registry whose images in the
/// store hold it: where the registry may mount it from.
fn mount_sources(
    store: &Store,
    destination: &Reference,
) -> Result<HashMap<Digest, Vec<String>>, RegistryError> {
    let mut sources: HashMap<Digest, Vec<String>> = HashMap::new();
    for record in store.records()? {
        let Some(reference) = record.reference() else {
            continue;
        };
        if reference.registry() != destination.registry()
            || reference.repository() == destination.repository()
        {
            continue;
        }
        let Ok(image) = store.image(&record.target) else {
            continue;
        };
        let mut digests = vec![image.config_target.digest.clone()];
        digests.extend(image.layers()?.into_iter().map(|layer| layer.digest));
        for digest in digests {
            let repositories = sources.entry(digest).or_default();
            if !repositories
                .iter()
                .any(|known| known == reference.repository())
            {
                repositories.push(reference.repository().to_string());
            }
        }
    }
    Ok(sources)
}

/// Makes sure the registry has one blob: it has it, it mounts it, or it gets it uploaded.
fn push_blob(
    store: &Store,
    client: &Client,
    blob: &Target,
    mount_from: &[String],
) -> Result<(), RegistryError> {
    let url = client.url(&format!("blobs/{}", blob.digest));
    let action = format!("checking blob {}", blob.digest);
    let response = client.send_retrying(
        Method::HEAD,
        &url,
        &action,
        &[StatusCode::OK, StatusCode::NOT_FOUND],
        &|request| request,
    )?;
    if response.status() == StatusCode::OK {
        eprintln!("exists  {}", blob.digest);
        return Ok(());
    }
    let mut session = None;
    for from in mount_from.iter().take(MOUNT_ATTEMPTS) {
        let action = format!("mounting blob {} from {from}", blob.digest);
        let url = client.url(&format!("blobs/uploads/?mount={}&from={from}", blob.digest));
        // Distribution wants pull on the source as well as push on the destination, in one
        // token (registry/handlers/app.go, `from`).
        let source_scope = format!("repository:{from}:pull");
        let response = client.send_retrying_scoped(
            Method::POST,
            &url,
            &action,
            &[client.scope(), &source_scope],
            &[
                StatusCode::CREATED,
                StatusCode::ACCEPTED,
                StatusCode::UNAUTHORIZED,
                StatusCode::FORBIDDEN,
            ],
            &|request| request.header(header::CONTENT_LENGTH, "0"),
        )?;
        match response.status() {
            StatusCode::CREATED => {
                eprintln!("mounted {} from {from}", blob.digest);
                return Ok(());
            }
            // No pull on the source for these credentials: try the next, or upload it.
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => eprintln!(
                "cannot mount {} from {from} ({})",
                blob.digest,
                response.status()
            ),
            _ => session = Some(location(client, &response, &action)?),
        }
    }
    // A blob the store only names (a layer of a lazily pulled base or of an imported cache)
    // that no mount brought over is fetched from its source now.
    if !store.content().contains(&blob.digest) {
        super::pull::fetch_missing(store, std::slice::from_ref(blob))?;
    }
    let location = match session {
        Some(location) => location,
        None => start_upload(client, &blob.digest)?,
    };
    eprintln!("pushing {} {}", blob.digest, human_size(blob.size));
    upload(store, client, blob, location)
}

/// POSTs a new upload session; returns its location.
fn start_upload(client: &Client, digest: &Digest) -> Result<String, RegistryError> {
    let action = format!("starting the upload of blob {digest}");
    let response = client.send_retrying(
        Method::POST,
        &client.url("blobs/uploads/"),
        &action,
        &[StatusCode::ACCEPTED],
        &|request| request.header(header::CONTENT_LENGTH, "0"),
    )?;
    location(client, &response, &action)
}

/// The absolute `Location` of a response.
fn location(
    client: &Client,
    response: &reqwest::blocking::Response,
    action: &str,
) -> Result<String, RegistryError> {
    header_text(response, header::LOCATION)
        .map(|location| client.absolute(&location))
        .ok_or_else(|| RegistryError::NoLocation {
            reference: client.reference().to_string(),
            action: action.to_string(),
        })
}

/// `location` with one more query parameter.
fn with_query(location: &str, parameter: &str) -> String {
    let separator = if location.contains('?') { '&' } else { '?' };
    format!("{location}{separator}{parameter}")
}

/// Uploads a blob into the session at `location`, resuming where the session stands after a
/// failure, and starting a new session when the old one is gone or cannot go on.
fn upload(
    store: &Store,
    client: &Client,
    blob: &Target,
    mut location: String,
) -> Result<(), RegistryError> {
    let mut offset = 0;
    let mut attempt = 1;
    loop {
        let result = if offset == 0 && blob.size <= MONOLITHIC_LIMIT {
            put_whole(store, client, blob, &location)
        } else {
            put_chunks(store, client, blob, &mut location, offset)
        };
        let error = match result {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        let resumable = error.is_transient()
            || matches!(&error, RegistryError::Status { status, .. }
                if *status == StatusCode::RANGE_NOT_SATISFIABLE || *status == StatusCode::BAD_REQUEST || *status == StatusCode::NOT_FOUND);
        if !resumable || attempt >= ATTEMPTS {
            return Err(error);
        }
        backoff(attempt);
        attempt += 1;
        // A 416 or a 400 (the registry disagrees about the offset, or the digest of a
        // resumed upload came out wrong) starts over in a new session; otherwise ask the
        // session where it stands.
        let start_over = matches!(&error, RegistryError::Status { status, .. } if *status != StatusCode::NOT_FOUND && !status.is_server_error() && *status != StatusCode::TOO_MANY_REQUESTS);
        let status = if start_over {
            None
        } else {
            upload_status(client, &location).ok().flatten()
        };
        let resumed_how = match status {
            Some((next_location, received)) => {
                location = next_location;
                offset = received;
                format!("from byte {offset}")
            }
            None => {
                // Distribution cancels a session whose PATCH broke off after some bytes
                // reached it (its `_state` offset no longer matches): start again.
                location = start_upload(client, &blob.digest)?;
                offset = 0;
                "in a new upload session".to_string()
            }
        };
        eprintln!(
            "retrying {} {resumed_how} (attempt {attempt}/{ATTEMPTS}): {}",
            blob.digest,
            chain_text(&error)
        );
    }
}

/// Where an upload session stands: its location and how many bytes it holds; none when the
/// registry no longer knows it.
fn upload_status(client: &Client, location: &str) -> Result<Option<(String, u64)>, RegistryError> {
    let action = "asking an upload session for its offset";
    let response = client.send_retrying(
        Method::GET,
        location,
        action,
        &[StatusCode::NO_CONTENT, StatusCode::NOT_FOUND],
        &|request| request,
    )?;
    if response.status() == StatusCode::NOT_FOUND {
        return Ok(None);
    }
    // `Range: 0-N` is inclusive; distribution sends `0-0` for an empty session too (an
    // ambiguity that a 416 on the next PATCH resolves by starting over).
    let received = header_text(&response, header::RANGE)
        .and_then(|range| {
            let (_, end) = range.trim().trim_start_matches("bytes=").split_once('-')?;
            end.trim().parse::<u64>().ok()
        })
        .map_or(0, |end| if end == 0 { 0 } else { end + 1 });
    let next = header_text(&response, header::LOCATION)
        .map_or_else(|| location.to_string(), |next| client.absolute(&next));
    Ok(Some((next, received)))
}

/// The bytes `[offset, offset + length)` of a stored blob, as a request body.
fn blob_body(
    store: &Store,
    client: &Client,
    blob: &Target,
    offset: u64,
    length: u64,
) -> Result<Body, RegistryError> {
    let read_error = |source| RegistryError::ReadBlob {
        reference: client.reference().to_string(),
        digest: blob.digest.clone(),
        source,
    };
    let mut file = File::open(store.content().blob_path(&blob.digest)).map_err(read_error)?;
    file.seek(SeekFrom::Start(offset)).map_err(read_error)?;
    Ok(Body::sized(file.take(length), length))
}

/// POST-then-PUT: the whole blob in the closing PUT.
fn put_whole(
    store: &Store,
    client: &Client,
    blob: &Target,
    location: &str,
) -> Result<(), RegistryError> {
    let action = format!("uploading blob {}", blob.digest);
    let url = with_query(location, &format!("digest={}", blob.digest));
    let body = BodySource::new(store, client, blob, 0, blob.size)?;
    let response = client.send(Method::PUT, &url, &action, &|request| {
        body.attach(
            request
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, blob.size.to_string()),
        )
    })?;
    client.expect(response, &action, &[StatusCode::CREATED])?;
    Ok(())
}

/// A range of a stored blob as a request body, opened afresh for each send (a 401 answered
/// sends the request again).
struct BodySource<'a> {
    store: &'a Store,
    client: &'a Client,
    blob: &'a Target,
    offset: u64,
    length: u64,
    first: Mutex<Option<Body>>,
}

impl<'a> BodySource<'a> {
    /// Opens the range once now, so that a blob that cannot be read fails here.
    fn new(
        store: &'a Store,
        client: &'a Client,
        blob: &'a Target,
        offset: u64,
        length: u64,
    ) -> Result<Self, RegistryError> {
        let first = blob_body(store, client, blob, offset, length)?;
        Ok(Self {
            store,
            client,
            blob,
            offset,
            length,
            first: Mutex::new(Some(first)),
        })
    }

    fn attach(&self, request: RequestBuilder) -> RequestBuilder {
        let body = self.first.lock().expect("not poisoned").take().or_else(|| {
            blob_body(self.store, self.client, self.blob, self.offset, self.length).ok()
        });
        match body {
            Some(body) => request.body(body),
            // The blob was readable a moment ago; without a body the registry answers with
            // an error that names the upload.
            None => request,
        }
    }
}

/// PATCHes the blob from `offset` in chunks, then closes the session with an empty PUT.
fn put_chunks(
    store: &Store,
    client: &Client,
    blob: &Target,
    location: &mut String,
    mut offset: u64,
) -> Result<(), RegistryError> {
    while offset < blob.size {
        let length = CHUNK_SIZE.min(blob.size - offset);
        let end = offset + length - 1;
        let action = format!("uploading bytes {offset}-{end} of blob {}", blob.digest);
        let url = location.clone();
        let body = BodySource::new(store, client, blob, offset, length)?;
        let response = client.send(Method::PATCH, &url, &action, &|request| {
            body.attach(
                request
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .header(header::CONTENT_RANGE, format!("{offset}-{end}"))
                    .header(header::CONTENT_LENGTH, length.to_string()),
            )
        })?;
        let response = client.expect(response, &action, &[StatusCode::ACCEPTED])?;
        *location = self::location(client, &response, &action)?;
        offset = end + 1;
    }
    let action = format!("finishing the upload of blob {}", blob.digest);
    let url = with_query(location, &format!("digest={}", blob.digest));
    let response = client.send(Method::PUT, &url, &action, &|request| {
        request.header(header::CONTENT_LENGTH, "0")
    })?;
    client.expect(response, &action, &[StatusCode::CREATED])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_join_what_the_location_has() {
        assert_eq!(
            with_query("http://r/v2/a/blobs/uploads/u", "digest=x"),
            "http://r/v2/a/blobs/uploads/u?digest=x"
        );
        assert_eq!(
            with_query("http://r/v2/a/blobs/uploads/u?_state=s", "digest=x"),
            "http://r/v2/a/blobs/uploads/u?_state=s&digest=x"
        );
    }
}
