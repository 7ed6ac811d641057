//! One repository of one registry, spoken to over the distribution API
//! (distribution/distribution `docs/spec/api.md`, the OCI distribution spec).
//!
//! The client picks the endpoint (Docker Hub's `docker.io` is served by `registry-1.docker.io`;
//! loopback registries use plain HTTP as Docker does, other hosts HTTPS unless listed as
//! insecure), sends each request with the [`Authenticator`]'s `Authorization` header and
//! answers one 401 challenge per request, retries requests that failed on the way (a dropped
//! connection, a 5xx, a 429) a few times with a short backoff, and turns the registry's error
//! JSON (`errors[].code/message`) into errors that name the reference.

use std::io;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

use reqwest::blocking::{RequestBuilder, Response};
use reqwest::{Method, StatusCode, header};

use rbuild_cache::{ContentError, Digest, Reference, StoreError};

use super::auth::{AuthError, Authenticator, credentials_for};

/// How many times a request is tried in all before its failure is final.
pub const ATTEMPTS: u32 = 5;
/// Connecting gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A request (or one read of a response body) gives up after this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Registries spoken to over plain HTTP besides loopback ones (`--insecure-registry`).
static INSECURE_REGISTRIES: OnceLock<Vec<String>> = OnceLock::new();

/// Sets the registries (`HOST[:PORT]`) reached over plain HTTP, from `--insecure-registry` and
/// `RBUILD_INSECURE_REGISTRIES`; the first call wins.
pub fn set_insecure_registries(hosts: Vec<String>) {
    let _ = INSECURE_REGISTRIES.set(
        hosts
            .into_iter()
            .map(|host| host.trim().to_string())
            .filter(|host| !host.is_empty())
            .collect(),
    );
}

/// What can go wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request could not be sent or its answer not read.
    #[error("{reference}: {action} {url}")]
    Http {
        /// The image reference.
        reference: String,
        /// What rbuild was doing.
        action: String,
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// A response body broke off or could not be read.
    #[error("{reference}: {action}")]
    Read {
        /// The image reference.
        reference: String,
        /// What rbuild was doing.
        action: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The registry answered with an error status.
    #[error("{reference}: {action}: the registry answered {status}{message}")]
    Status {
        /// The image reference.
        reference: String,
        /// What rbuild was doing.
        action: String,
        /// The HTTP status.
        status: StatusCode,
        /// `: CODE: message` from the registry's error JSON, or empty.
        message: String,
    },
    /// Authentication failed.
    #[error("{reference}: authenticating")]
    Auth {
        /// The image reference.
        reference: String,
        /// The cause.
        #[source]
        source: AuthError,
    },
    /// A manifest did not hash to the digest it was asked for or announced with.
    #[error("{reference}: manifest content hashes to {actual}, not {expected} as {by}")]
    ManifestDigest {
        /// The image reference.
        reference: String,
        /// The digest it should have.
        expected: Digest,
        /// What it hashes to.
        actual: Digest,
        /// Who named the expected digest.
        by: &'static str,
    },
    /// A manifest or index that is not JSON of its kind.
    #[error("{reference}: {what} {digest} is not valid: {problem}")]
    BadManifest {
        /// The image reference.
        reference: String,
        /// `manifest` or `index`.
        what: &'static str,
        /// The document.
        digest: Digest,
        /// What is wrong.
        problem: String,
    },
    /// A media type rbuild does not pull.
    #[error("{reference}: unsupported manifest media type {media_type:?}")]
    MediaType {
        /// The image reference.
        reference: String,
        /// The media type.
        media_type: String,
    },
    /// An index without the platform asked for.
    #[error(
        "{reference}: no image for platform {platform} in index {digest} (it has: {available})"
    )]
    NoPlatform {
        /// The image reference.
        reference: String,
        /// The platform asked for.
        platform: String,
        /// The index.
        digest: Digest,
        /// The platforms it has.
        available: String,
    },
    /// A manifest larger than rbuild reads into memory.
    #[error("{reference}: manifest is larger than {limit} bytes")]
    ManifestTooLarge {
        /// The image reference.
        reference: String,
        /// The limit.
        limit: u64,
    },
    /// A downloaded blob was not what its digest and size say; nothing of it was kept.
    #[error("{reference}: blob {digest} was rejected")]
    BlobRejected {
        /// The image reference.
        reference: String,
        /// The blob.
        digest: Digest,
        /// The mismatch.
        #[source]
        source: ContentError,
    },
    /// A content store failure.
    #[error(transparent)]
    Content(#[from] ContentError),
    /// A store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading a stored blob to upload it failed.
    #[error("{reference}: reading blob {digest} from the store")]
    ReadBlob {
        /// The image reference.
        reference: String,
        /// The blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The registry stored a manifest under another digest than rbuild's.
    #[error("{reference}: the registry stored the manifest as {actual}, not {expected}")]
    PushedDigest {
        /// The image reference.
        reference: String,
        /// The manifest's digest.
        expected: Digest,
        /// What the registry says.
        actual: String,
    },
    /// An upload session the registry gave no usable location for.
    #[error("{reference}: the registry gave no upload location ({action})")]
    NoLocation {
        /// The image reference.
        reference: String,
        /// What rbuild was doing.
        action: String,
    },
    /// A layer the store does not hold and no registry is known to have.
    #[error("layer {digest} is not in the store, and no registry is known to have it")]
    NoSource {
        /// The blob.
        digest: Digest,
    },
    /// The HTTP client could not be made.
    #[error("making the HTTP client")]
    Client {
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
}

impl RegistryError {
    /// Whether trying again may help: the connection broke, or the registry is overloaded or
    /// failing for a while.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Http { source, .. } => {
                !source.is_builder() && !source.is_redirect() && !is_name_resolution(source)
            }
            Self::Read { .. } => true,
            Self::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }
}

/// Whether a request failed because the host name does not resolve: retrying within seconds
/// does not help, and a build without network should fail at once.
fn is_name_resolution(error: &reqwest::Error) -> bool {
    let mut cause: Option<&dyn std::error::Error> = Some(error);
    while let Some(current) = cause {
        if current.to_string().starts_with("dns error") {
            return true;
        }
        cause = current.source();
    }
    false
}

/// Where a registry is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The registry as references name it (`docker.io`, `127.0.0.1:5000`): credentials are
    /// looked up under this name.
    pub registry: String,
    /// `scheme://host[:port]` of the API.
    pub base: String,
}

impl Endpoint {
    /// The endpoint of the registry `registry` (a reference's registry part).
    pub fn of(registry: &str) -> Self {
        let host = if registry == rbuild_cache::reference::DEFAULT_REGISTRY {
            "registry-1.docker.io"
        } else {
            registry
        };
        let insecure = INSECURE_REGISTRIES
            .get()
            .is_some_and(|hosts| hosts.iter().any(|listed| listed == registry));
        let scheme = if insecure || is_loopback(registry) {
            "http"
        } else {
            "https"
        };
        Self {
            registry: registry.to_string(),
            base: format!("{scheme}://{host}"),
        }
    }
}

/// Whether `registry` (`host[:port]`) is this machine: `localhost`, 127.0.0.0/8 or `::1`.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        match registry.rsplit_once(':') {
            // More than one colon without brackets: a bare IPv6 address.
            Some((host, _)) if !host.contains(':') => host,
            _ => registry,
        }
    };
    host == "localhost"
        || host
            .parse::<IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

/// The HTTP client every registry request goes through.
pub fn http_client() -> Result<reqwest::blocking::Client, RegistryError> {
    reqwest::blocking::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .user_agent(concat!("rbuild/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|source| RegistryError::Client { source })
}

/// One repository of one registry, for pulling or for pushing.
pub struct Client {
    http: reqwest::blocking::Client,
    endpoint: Endpoint,
    repository: String,
    reference: String,
    scope: String,
    authenticator: Authenticator,
}

impl Client {
    /// A client for the repository `reference` names; `push` asks for push access too.
    pub fn new(reference: &Reference, push: bool) -> Result<Self, RegistryError> {
        let endpoint = Endpoint::of(reference.registry());
        let credentials =
            credentials_for(reference.registry()).map_err(|source| RegistryError::Auth {
                reference: reference.to_string(),
                source,
            })?;
        let access = if push { "pull,push" } else { "pull" };
        Ok(Self {
            http: http_client()?,
            authenticator: Authenticator::new(reference.registry(), credentials),
            endpoint,
            repository: reference.repository().to_string(),
            reference: reference.to_string(),
            scope: format!("repository:{}:{access}", reference.repository()),
        })
    }

    /// The reference, for messages.
    pub fn reference(&self) -> &str {
        &self.reference
    }

    /// The token scope of this client's requests: `repository:NAME:pull` or `...:pull,push`.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The repository within the registry.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// `BASE/v2/REPOSITORY/PATH`.
    pub fn url(&self, path: &str) -> String {
        format!("{}/v2/{}/{path}", self.endpoint.base, self.repository)
    }

    /// An absolute URL for a `Location` header, which may be relative to the registry.
    pub fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else if location.starts_with('/') {
            format!("{}{location}", self.endpoint.base)
        } else {
            format!("{}/{location}", self.endpoint.base)
        }
    }

    /// Sends one request made by `prepare`, with authorization: a 401 is answered through the
    /// authenticator and the request sent once more. Any status is returned as is.
    pub fn send(
        &self,
        method: Method,
        url: &str,
        action: &str,
        prepare: &dyn Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        self.send_scoped(method, url, action, &[&self.scope], prepare)
    }

    /// [`Client::send`] with a token for `scopes` rather than this client's own scope alone
    /// (a cross-repository mount needs pull on the source repository too).
    pub fn send_scoped(
        &self,
        method: Method,
        url: &str,
        action: &str,
        scopes: &[&str],
        prepare: &dyn Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        let authorization = self.authenticator.header(scopes);
        let response = self.send_once(method.clone(), url, action, prepare, authorization)?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let Some(challenge) = response
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
        else {
            return Ok(response);
        };
        let answer = self
            .authenticator
            .answer(&self.http, &challenge, scopes)
            .map_err(|source| RegistryError::Auth {
                reference: self.reference.clone(),
                source,
            })?;
        self.send_once(method, url, action, prepare, Some(answer))
    }

    fn send_once(
        &self,
        method: Method,
        url: &str,
        action: &str,
        prepare: &dyn Fn(RequestBuilder) -> RequestBuilder,
        authorization: Option<String>,
    ) -> Result<Response, RegistryError> {
        let mut request = prepare(self.http.request(method, url));
        if let Some(authorization) = authorization {
            request = request.header(header::AUTHORIZATION, authorization);
        }
        request.send().map_err(|source| RegistryError::Http {
            reference: self.reference.clone(),
            action: action.to_string(),
            // An upload location's query is the session's opaque state: noise in a message.
            url: url.split('?').next().unwrap_or(url).to_string(),
            source: source.without_url(),
        })
    }

    /// [`Client::send`], tried again (with a short backoff) while it fails in a way that may
    /// pass: a broken connection, a 5xx, a 429. Statuses in `accepted` are returned; any
    /// other becomes [`RegistryError::Status`].
    pub fn send_retrying(
        &self,
        method: Method,
        url: &str,
        action: &str,
        accepted: &[StatusCode],
        prepare: &dyn Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        self.send_retrying_scoped(method, url, action, &[&self.scope], accepted, prepare)
    }

    /// [`Client::send_retrying`] with a token for `scopes` ([`Client::send_scoped`]).
    pub fn send_retrying_scoped(
        &self,
        method: Method,
        url: &str,
        action: &str,
        scopes: &[&str],
        accepted: &[StatusCode],
        prepare: &dyn Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        let mut attempt = 1;
        loop {
            let result = self
                .send_scoped(method.clone(), url, action, scopes, prepare)
                .and_then(|response| self.expect(response, action, accepted));
            match result {
                Err(error) if error.is_transient() && attempt < ATTEMPTS => {
                    eprintln!(
                        "retrying: {} (attempt {}/{ATTEMPTS})",
                        crate::commands::image::chain_text(&error),
                        attempt + 1
                    );
                    backoff(attempt);
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// The response when its status is one of `accepted`, else an error carrying what the
    /// registry said.
    pub fn expect(
        &self,
        response: Response,
        action: &str,
        accepted: &[StatusCode],
    ) -> Result<Response, RegistryError> {
        if accepted.contains(&response.status()) {
            return Ok(response);
        }
        Err(self.status_error(response, action))
    }

    /// The error for an unexpected response, with the registry's error JSON.
    pub fn status_error(&self, response: Response, action: &str) -> RegistryError {
        let status = response.status();
        let mut body = Vec::new();
        let _ = io::Read::read_to_end(&mut io::Read::take(response, 64 * 1024), &mut body);
        let mut message = error_message(&body);
        if status == StatusCode::UNAUTHORIZED && !self.authenticator.has_credentials() {
            message.push_str(&format!(
                " (the Docker config has no credentials for {})",
                self.endpoint.registry
            ));
        }
        RegistryError::Status {
            reference: self.reference.clone(),
            action: action.to_string(),
            status,
            message,
        }
    }
}

/// `: CODE: message; CODE: message` from a distribution error body (`{"errors": [{"code",
/// "message"}]}`), or empty when the body holds none.
pub fn error_message(body: &[u8]) -> String {
    let Ok(document) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::new();
    };
    let errors: Vec<String> = document["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|error| {
                    let code = error["code"].as_str().unwrap_or("UNKNOWN");
                    match error["message"].as_str() {
                        Some(message) if !message.is_empty() => format!("{code}: {message}"),
                        _ => code.to_string(),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    if errors.is_empty() {
        String::new()
    } else {
        format!(": {}", errors.join("; "))
    }
}

/// Waits before attempt `attempt + 1`: 200 ms, 400 ms, 800 ms, ... (at most 5 s).
pub fn backoff(attempt: u32) {
    let milliseconds = 200u64.saturating_mul(1 << attempt.min(5).saturating_sub(1));
    std::thread::sleep(Duration::from_millis(milliseconds.min(5000)));
}

/// A header's value as text.
pub fn header_text(response: &Response, name: header::HeaderName) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_use_plain_http() {
        for registry in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
        ] {
            assert!(is_loopback(registry), "{registry}");
            assert!(Endpoint::of(registry).base.starts_with("http://"));
        }
        for registry in [
            "docker.io",
            "ghcr.io",
            "10.0.0.1:5000",
            "localhost.example.com",
        ] {
            assert!(!is_loopback(registry), "{registry}");
        }
        assert_eq!(
            Endpoint::of("docker.io").base,
            "https://registry-1.docker.io"
        );
        assert_eq!(Endpoint::of("ghcr.io").base, "https://ghcr.io");
    }

    #[test]
    fn error_bodies_become_messages() {
        let body =
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#;
        assert_eq!(error_message(body), ": MANIFEST_UNKNOWN: manifest unknown");
        assert_eq!(error_message(b"<html>"), "");
        assert_eq!(error_message(br#"{"errors":[]}"#), "");
    }
}
