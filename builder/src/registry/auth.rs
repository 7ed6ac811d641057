//! Registry authentication: credentials from the Docker config and answers to a registry's
//! `WWW-Authenticate` challenges.
//!
//! Credentials come from the credential helper the Docker config names for a registry
//! (`credHelpers`, else `credsStore`; see `helper`), else from its `auths` entries.
//!
//! The seam the distribution client uses: an [`Authenticator`] per registry host gives the
//! `Authorization` header to send for a list of scopes, and answers a 401 with a new one. Most
//! requests need one scope (`repository:NAME:pull,push`); a cross-repository mount needs the
//! source's too (`repository:SOURCE:pull`), asked for in the same token request.
//!
//! Bearer tokens follow distribution's token protocol
//! (<https://distribution.github.io/distribution/spec/auth/token/>): a GET on the realm the
//! registry announced, with `service` and `scope`, and Basic credentials when there are some; an
//! identity token (a refresh token) goes to the same realm as an OAuth2 `refresh_token` grant
//! (<https://distribution.github.io/distribution/spec/auth/oauth/>).

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::helper;

/// The user name that marks [`Credentials::password`] as an identity token, as Docker's
/// credential helpers do.
pub const IDENTITY_TOKEN_USERNAME: &str = "<token>";

/// The key Docker's config uses for Docker Hub.
pub const DOCKER_HUB_CONFIG_KEY: &str = "https://index.docker.io/v1/";

/// How long a token lives when the token server does not say (the spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// A user name and password (or identity token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name ([`IDENTITY_TOKEN_USERNAME`] when `password` is an identity token).
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl Credentials {
    /// Whether these are an identity token (an OAuth2 refresh token) rather than a password.
    pub fn is_identity_token(&self) -> bool {
        self.username == IDENTITY_TOKEN_USERNAME
    }

    fn basic_header(&self) -> String {
        format!(
            "Basic {}",
            STANDARD.encode(format!("{}:{}", self.username, self.password))
        )
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why authentication failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The registry asked for a scheme rbuild does not speak.
    #[error("registry {host} asks for unsupported authentication: {challenge}")]
    Unsupported {
        /// The registry host.
        host: String,
        /// The `WWW-Authenticate` value.
        challenge: String,
    },
    /// A Bearer challenge without a usable `realm`.
    #[error("registry {host} sent a Bearer challenge without a usable realm: {challenge}")]
    InvalidRealm {
        /// The registry host.
        host: String,
        /// The `WWW-Authenticate` value.
        challenge: String,
    },
    /// Basic authentication with no credentials to give.
    #[error("registry {host} needs credentials: run `rbuild login {host}`")]
    CredentialsNeeded {
        /// The registry host.
        host: String,
    },
    /// The token server refused the credentials (or anonymous access).
    #[error("registry {host} refused {who}: the token server {realm} answered {status}")]
    Refused {
        /// The registry host.
        host: String,
        /// `the credentials of USER` or `anonymous access`.
        who: String,
        /// The token server's URL.
        realm: String,
        /// Its HTTP status.
        status: reqwest::StatusCode,
    },
    /// The token server failed otherwise.
    #[error("token server {realm} answered {status}")]
    TokenStatus {
        /// The token server's URL.
        realm: String,
        /// Its HTTP status.
        status: reqwest::StatusCode,
    },
    /// The token request did not complete.
    #[error("cannot reach the token server {realm}")]
    TokenRequest {
        /// The token server's URL.
        realm: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The token server's answer is not the JSON the spec describes.
    #[error("the token server {realm} answered with something that is not a token")]
    TokenBody {
        /// The token server's URL.
        realm: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The token server answered from elsewhere than the realm (a redirect was followed).
    #[error(
        "the token server {realm} redirected to {location}; rbuild does not follow it with credentials"
    )]
    Redirected {
        /// The token server's URL.
        realm: String,
        /// Where the answer came from.
        location: String,
    },
    /// The Docker config names a credential helper that is not a program name.
    #[error("the Docker config {path}: {key}: {name:?} is not a credential helper name")]
    HelperName {
        /// The file.
        path: PathBuf,
        /// `credsStore` or `credHelpers.HOST`.
        key: String,
        /// The name.
        name: String,
    },
    /// A credential helper could not be run.
    #[error("cannot run the credential helper {program} ({verb}); is it on PATH?")]
    HelperStart {
        /// `docker-credential-NAME`.
        program: String,
        /// `get`, `store` or `erase`.
        verb: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A credential helper failed.
    #[error(
        "the credential helper {program} failed to {verb} the credentials of {server}: {message}"
    )]
    HelperFailed {
        /// `docker-credential-NAME`.
        program: String,
        /// `get`, `store` or `erase`.
        verb: &'static str,
        /// The server asked about.
        server: String,
        /// What it said (or how it exited).
        message: String,
    },
    /// A credential helper's `get` answer is not the JSON of the protocol.
    #[error(
        "the credential helper {program} answered get for {server} with something that is not credentials JSON"
    )]
    HelperOutput {
        /// `docker-credential-NAME`.
        program: String,
        /// The server asked about.
        server: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A credential helper's `get` answer lacks the user name or the secret.
    #[error("the credential helper {program} answered get for {server} with an empty {field}")]
    HelperEmpty {
        /// `docker-credential-NAME`.
        program: String,
        /// The server asked about.
        server: String,
        /// `Username` or `Secret`.
        field: &'static str,
    },
    /// Neither `DOCKER_CONFIG` nor `HOME` is set.
    #[error("cannot find the Docker config: neither DOCKER_CONFIG nor HOME is set")]
    NoConfigDirectory,
    /// The Docker config cannot be read or written.
    #[error("cannot {action} the Docker config {path}")]
    ConfigIo {
        /// `read`, `write`, ...
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The Docker config is not JSON.
    #[error("the Docker config {path} is not valid JSON")]
    ConfigSyntax {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The Docker config is JSON of the wrong shape.
    #[error("the Docker config {path}: {key}: {problem}")]
    ConfigEntry {
        /// The file.
        path: PathBuf,
        /// The JSON key at fault (`auths` or `auths.HOST`).
        key: String,
        /// What is wrong with it.
        problem: &'static str,
    },
}

// --- challenges ---

/// One challenge of a `WWW-Authenticate` header (RFC 7235 section 4.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// The scheme, lower-case (`basic`, `bearer`).
    pub scheme: String,
    /// The parameters in order, names lower-case, quoted values unquoted.
    pub parameters: Vec<(String, String)>,
}

impl Challenge {
    /// The value of parameter `name` (lower-case), if present.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

fn is_token_character(character: char) -> bool {
    character.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(character)
}

/// Splits the leading token off `text`.
fn take_token(text: &str) -> (&str, &str) {
    let end = text
        .find(|character| !is_token_character(character))
        .unwrap_or(text.len());
    text.split_at(end)
}

/// A quoted-string (`text` starts after the opening quote) and what follows its closing quote.
fn take_quoted(text: &str) -> (String, &str) {
    let mut value = String::new();
    let mut characters = text.char_indices();
    while let Some((index, character)) = characters.next() {
        match character {
            '"' => return (value, &text[index + 1..]),
            '\\' => {
                if let Some((_, escaped)) = characters.next() {
                    value.push(escaped);
                }
            }
            other => value.push(other),
        }
    }
    // No closing quote: take the rest, as lenient clients do.
    (value, "")
}

/// Parses a `WWW-Authenticate` value into its challenges: `Bearer realm="https://a/token",
/// service="a", scope="repository:x:pull,push", Basic realm="b"` gives two. Values may be quoted
/// (commas inside quotes are part of the value) or bare tokens.
pub fn parse_challenges(value: &str) -> Vec<Challenge> {
    let mut challenges = Vec::new();
    let mut rest = value;
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        let (scheme, after_scheme) = take_token(rest);
        if scheme.is_empty() {
            break;
        }
        rest = after_scheme;
        let mut challenge = Challenge {
            scheme: scheme.to_ascii_lowercase(),
            parameters: Vec::new(),
        };
        loop {
            let candidate = rest.trim_start_matches([' ', '\t', ',']);
            let (name, after_name) = take_token(candidate);
            let after_name = after_name.trim_start_matches([' ', '\t']);
            let Some(after_equals) = after_name.strip_prefix('=') else {
                // Not `name=`: the next challenge's scheme (or the end).
                rest = candidate;
                break;
            };
            if name.is_empty() {
                // A token68 or garbage: skip to the next comma.
                rest = after_equals
                    .find(',')
                    .map_or("", |comma| &after_equals[comma..]);
                continue;
            }
            let after_equals = after_equals.trim_start_matches([' ', '\t']);
            let (parameter, after_value) = match after_equals.strip_prefix('"') {
                Some(quoted) => take_quoted(quoted),
                None => {
                    let (bare, after_bare) = take_token(after_equals);
                    (bare.to_string(), after_bare)
                }
            };
            challenge
                .parameters
                .push((name.to_ascii_lowercase(), parameter));
            rest = after_value;
        }
        challenges.push(challenge);
    }
    challenges
}

// --- hosts ---

/// Whether `host` (`localhost:5000`, `127.0.0.1`, `[::1]:5000`) is a loopback address, to which
/// plain HTTP is used and credentials may go without TLS, as Docker does.
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(bracketed) = host.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or("")
    } else if host.matches(':').count() > 1 {
        host // a bare IPv6 address
    } else {
        host.split(':').next().unwrap_or("")
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

/// The registry a server name means, as a lower-case host: `https://index.docker.io/v1/`,
/// `index.docker.io` and `registry-1.docker.io` are all `docker.io`; a scheme and a path are
/// dropped.
pub fn normalize_server(server: &str) -> String {
    let without_scheme = server
        .strip_prefix("https://")
        .or_else(|| server.strip_prefix("http://"))
        .unwrap_or(server);
    let host = without_scheme
        .split('/')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

/// The `auths` key Docker writes for a server: Docker Hub's historic URL, else the host.
pub fn config_key(server: &str) -> String {
    let host = normalize_server(server);
    if host == "docker.io" {
        DOCKER_HUB_CONFIG_KEY.to_string()
    } else {
        host
    }
}

// --- the authenticator ---

#[derive(Debug)]
struct CachedToken {
    header: String,
    expires: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// The registry answered with a Basic challenge: send the credentials with every request.
    basic: bool,
    /// Bearer headers by the scopes they were asked for (sorted, without duplicates).
    tokens: HashMap<Vec<String>, CachedToken>,
}

/// Authorization for one registry host (`127.0.0.1:5000`, `docker.io`, ...). Shared by the
/// threads of one pull or push: the tokens are cached per list of scopes behind a mutex.
#[derive(Debug)]
pub struct Authenticator {
    host: String,
    credentials: Option<Credentials>,
    state: Mutex<State>,
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// The cache key of a list of scopes: sorted, without duplicates or empty ones.
fn scope_key(scopes: &[&str]) -> Vec<String> {
    let mut key: Vec<String> = scopes
        .iter()
        .filter(|scope| !scope.is_empty())
        .map(|scope| scope.to_string())
        .collect();
    key.sort();
    key.dedup();
    key
}

/// Whether a token asked for with the scopes `cached` also serves every scope of `wanted`
/// (each covered by one of them, [`scope_covers`]). An empty `wanted` is served by an
/// empty `cached` only: the token of a request without scope (`GET /v2/`).
fn scopes_cover(cached: &[String], wanted: &[String]) -> bool {
    if wanted.is_empty() {
        return cached.is_empty();
    }
    wanted
        .iter()
        .all(|wanted| cached.iter().any(|cached| scope_covers(cached, wanted)))
}

/// Whether a token for `cached` (`repository:NAME:pull,push`) also serves `wanted`
/// (`repository:NAME:pull`): the same resource, and every wanted action granted.
fn scope_covers(cached: &str, wanted: &str) -> bool {
    if cached == wanted {
        return true;
    }
    let split = |scope: &str| {
        scope
            .rsplit_once(':')
            .map(|(resource, actions)| (resource.to_string(), actions.to_string()))
    };
    let (Some((cached_resource, cached_actions)), Some((wanted_resource, wanted_actions))) =
        (split(cached), split(wanted))
    else {
        return false;
    };
    cached_resource == wanted_resource
        && wanted_actions.split(',').all(|action| {
            cached_actions
                .split(',')
                .any(|granted| granted == action || granted == "*")
        })
}

impl Authenticator {
    /// Authorization for `host`, with the credentials to offer (none: anonymous).
    pub fn new(host: &str, credentials: Option<Credentials>) -> Self {
        Self {
            host: host.to_string(),
            credentials,
            state: Mutex::new(State::default()),
        }
    }

    /// The registry host this is for.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether there are credentials to offer.
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves a usable map: recover it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The `Authorization` header value to send for `scopes` (`repository:NAME:pull`,
    /// `repository:NAME:pull,push`, ...), when one is already known: a cached token asked
    /// for with exactly these scopes, else one whose scopes cover them all.
    pub fn header(&self, scopes: &[&str]) -> Option<String> {
        let state = self.state();
        if state.basic {
            return self.credentials.as_ref().map(Credentials::basic_header);
        }
        let now = Instant::now();
        let wanted = scope_key(scopes);
        if let Some(token) = state.tokens.get(&wanted)
            && token.expires > now
        {
            return Some(token.header.clone());
        }
        state
            .tokens
            .iter()
            .find(|(cached, token)| token.expires > now && scopes_cover(cached, &wanted))
            .map(|(_, token)| token.header.clone())
    }

    /// Answers a 401: `challenge` is the response's `WWW-Authenticate` value. Returns the
    /// `Authorization` header value to retry with, fetching a token when the challenge is
    /// Bearer, for all of `scopes` in one token. No scopes take the challenge's own (none for
    /// `GET /v2/`; several are separated by spaces).
    pub fn answer(
        &self,
        http: &reqwest::blocking::Client,
        challenge: &str,
        scopes: &[&str],
    ) -> Result<String, AuthError> {
        let challenges = parse_challenges(challenge);
        let unsupported = || AuthError::Unsupported {
            host: self.host.clone(),
            challenge: challenge.to_string(),
        };
        if let Some(bearer) = challenges.iter().find(|each| each.scheme == "bearer") {
            let scopes = if scope_key(scopes).is_empty() {
                let announced = bearer.parameter("scope").unwrap_or("");
                scope_key(&announced.split_whitespace().collect::<Vec<_>>())
            } else {
                scope_key(scopes)
            };
            let realm = bearer
                .parameter("realm")
                .and_then(|realm| reqwest::Url::parse(realm).ok())
                .filter(|realm| matches!(realm.scheme(), "http" | "https"))
                .ok_or_else(|| AuthError::InvalidRealm {
                    host: self.host.clone(),
                    challenge: challenge.to_string(),
                })?;
            let (header, lifetime) =
                self.fetch_token(http, realm, bearer.parameter("service"), &scopes)?;
            self.state().tokens.insert(
                scopes,
                CachedToken {
                    header: header.clone(),
                    // Expire a little early so a token is not sent as it runs out.
                    expires: Instant::now() + lifetime.mul_f64(0.9),
                },
            );
            return Ok(header);
        }
        if challenges.iter().any(|each| each.scheme == "basic") {
            let credentials = self
                .credentials
                .as_ref()
                .filter(|credentials| !credentials.is_identity_token())
                .ok_or_else(|| AuthError::CredentialsNeeded {
                    host: self.host.clone(),
                })?;
            self.state().basic = true;
            return Ok(credentials.basic_header());
        }
        Err(unsupported())
    }

    /// A token from the realm for all of `scopes`: `(Authorization header, lifetime)`. A GET
    /// repeats the `scope` parameter, one per scope (the token spec's "may be specified
    /// multiple times"); the OAuth2 form has one, the scopes separated by spaces.
    fn fetch_token(
        &self,
        http: &reqwest::blocking::Client,
        mut realm: reqwest::Url,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<(String, Duration), AuthError> {
        let joined = scopes.join(" ");
        let realm_text = realm.to_string();
        // Credentials go only to a realm reached over TLS, or on this machine; elsewhere rbuild
        // asks anonymously rather than send a password in clear text.
        let secure = realm.scheme() == "https"
            || realm
                .host_str()
                .is_some_and(|host| is_loopback_host(&host.replace(['[', ']'], "")));
        let credentials = self.credentials.as_ref().filter(|_| secure);
        let request = match credentials {
            Some(credentials) if credentials.is_identity_token() => {
                let mut form = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", credentials.password.as_str()),
                    ("client_id", "rbuild"),
                ];
                if let Some(service) = service {
                    form.push(("service", service));
                }
                if !joined.is_empty() {
                    form.push(("scope", joined.as_str()));
                }
                let body = form
                    .iter()
                    .map(|(name, value)| format!("{name}={}", form_encode(value)))
                    .collect::<Vec<_>>()
                    .join("&");
                http.post(realm.clone())
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(body)
            }
            _ => {
                {
                    let mut query = realm.query_pairs_mut();
                    if let Some(service) = service {
                        query.append_pair("service", service);
                    }
                    for scope in scopes {
                        query.append_pair("scope", scope);
                    }
                }
                let request = http.get(realm.clone());
                match credentials {
                    Some(credentials) => {
                        request.header(reqwest::header::AUTHORIZATION, credentials.basic_header())
                    }
                    None => request,
                }
            }
        };
        let response = request.send().map_err(|source| AuthError::TokenRequest {
            realm: realm_text.clone(),
            source,
        })?;
        if credentials.is_some() && response.url().origin() != realm.origin() {
            // reqwest drops the Authorization header on a redirect to another origin, so the
            // credentials did not leave; a token from elsewhere is not trusted either.
            return Err(AuthError::Redirected {
                realm: realm_text,
                location: response.url().to_string(),
            });
        }
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(AuthError::Refused {
                host: self.host.clone(),
                who: match credentials {
                    Some(credentials) if credentials.is_identity_token() => {
                        "the identity token".to_string()
                    }
                    Some(credentials) => format!("the credentials of {}", credentials.username),
                    None => "anonymous access".to_string(),
                },
                realm: realm_text,
                status,
            });
        }
        if !status.is_success() {
            return Err(AuthError::TokenStatus {
                realm: realm_text,
                status,
            });
        }
        let body = response.bytes().map_err(|source| AuthError::TokenRequest {
            realm: realm_text.clone(),
            source,
        })?;
        let token: TokenResponse =
            serde_json::from_slice(&body).map_err(|source| AuthError::TokenBody {
                realm: realm_text.clone(),
                source,
            })?;
        let lifetime = token
            .expires_in
            .filter(|seconds| *seconds > 0)
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        let value = token
            .token
            .filter(|token| !token.is_empty())
            .or(token.access_token.filter(|token| !token.is_empty()))
            .ok_or_else(|| AuthError::TokenBody {
                realm: realm_text,
                source: <serde_json::Error as serde::de::Error>::missing_field("token"),
            })?;
        Ok((format!("Bearer {value}"), lifetime))
    }
}

/// `application/x-www-form-urlencoded` for one value.
fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

// --- the Docker config ---

/// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
pub fn docker_config_path() -> Result<PathBuf, AuthError> {
    if let Some(directory) = std::env::var_os("DOCKER_CONFIG").filter(|value| !value.is_empty()) {
        return Ok(PathBuf::from(directory).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|value| !value.is_empty())
        .map(|home| PathBuf::from(home).join(".docker").join("config.json"))
        .ok_or(AuthError::NoConfigDirectory)
}

/// The config file as a JSON object (empty when the file does not exist).
fn read_config(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>, AuthError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(serde_json::Map::new());
        }
        Err(source) => {
            return Err(AuthError::ConfigIo {
                action: "read",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice(&bytes) {
        Ok(serde_json::Value::Object(object)) => Ok(object),
        Ok(_) => Err(AuthError::ConfigEntry {
            path: path.to_path_buf(),
            key: "(top level)".to_string(),
            problem: "is not a JSON object",
        }),
        Err(source) => Err(AuthError::ConfigSyntax {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The `auths` object of a config, if any.
fn auths<'config>(
    config: &'config serde_json::Map<String, serde_json::Value>,
    path: &Path,
) -> Result<Option<&'config serde_json::Map<String, serde_json::Value>>, AuthError> {
    match config.get("auths") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Object(auths)) => Ok(Some(auths)),
        Some(_) => Err(AuthError::ConfigEntry {
            path: path.to_path_buf(),
            key: "auths".to_string(),
            problem: "is not a JSON object",
        }),
    }
}

/// The credentials of one `auths` entry: `identitytoken`, else base64 `auth` (`user:password`),
/// else `username` and `password`; none for an empty entry (one a credential helper keeps).
fn entry_credentials(
    entry: &serde_json::Value,
    path: &Path,
    key: &str,
) -> Result<Option<Credentials>, AuthError> {
    let problem = |problem| AuthError::ConfigEntry {
        path: path.to_path_buf(),
        key: format!("auths.{key}"),
        problem,
    };
    let serde_json::Value::Object(entry) = entry else {
        return Err(problem("is not a JSON object"));
    };
    let text = |name: &str| -> Result<Option<&str>, AuthError> {
        match entry.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(value)) if value.is_empty() => Ok(None),
            Some(serde_json::Value::String(value)) => Ok(Some(value)),
            Some(_) => Err(problem("has a field that is not a string")),
        }
    };
    if let Some(token) = text("identitytoken")? {
        return Ok(Some(Credentials {
            username: IDENTITY_TOKEN_USERNAME.to_string(),
            password: token.to_string(),
        }));
    }
    if let Some(auth) = text("auth")? {
        let decoded = STANDARD
            .decode(auth.trim())
            .map_err(|_| problem("auth is not base64"))?;
        let decoded = String::from_utf8(decoded).map_err(|_| problem("auth is not UTF-8"))?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| problem("auth is not base64 of user:password"))?;
        return Ok(Some(Credentials {
            username: username.to_string(),
            password: password.to_string(),
        }));
    }
    match (text("username")?, text("password")?) {
        (Some(username), Some(password)) => Ok(Some(Credentials {
            username: username.to_string(),
            password: password.to_string(),
        })),
        _ => Ok(None),
    }
}

/// The credential helper the config names for `host`, in docker/cli's order
/// (`configfile.getConfiguredCredentialStore`): `credHelpers` under the host's key, else
/// `credsStore`; none when the file keeps the credentials itself (`auths`).
pub fn helper_for(
    config: &serde_json::Map<String, serde_json::Value>,
    path: &Path,
    host: &str,
) -> Result<Option<String>, AuthError> {
    let named = |key: String, value: &serde_json::Value| match value {
        serde_json::Value::String(name) if name.is_empty() => Ok(None),
        serde_json::Value::String(name) if helper::is_valid_name(name) => Ok(Some(name.clone())),
        serde_json::Value::String(name) => Err(AuthError::HelperName {
            path: path.to_path_buf(),
            key,
            name: name.clone(),
        }),
        serde_json::Value::Null => Ok(None),
        _ => Err(AuthError::ConfigEntry {
            path: path.to_path_buf(),
            key,
            problem: "is not a string",
        }),
    };
    match config.get("credHelpers") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(helpers)) => {
            let wanted = normalize_server(host);
            // The config key (`https://index.docker.io/v1/` for Docker Hub) or the host as
            // written first, then any key naming the same registry.
            let entry = helpers
                .get_key_value(&config_key(host))
                .or_else(|| helpers.get_key_value(host))
                .or_else(|| {
                    helpers
                        .iter()
                        .find(|(key, _)| normalize_server(key) == wanted)
                });
            if let Some((key, value)) = entry
                && let Some(name) = named(format!("credHelpers.{key}"), value)?
            {
                return Ok(Some(name));
            }
        }
        Some(_) => {
            return Err(AuthError::ConfigEntry {
                path: path.to_path_buf(),
                key: "credHelpers".to_string(),
                problem: "is not a JSON object",
            });
        }
    }
    match config.get("credsStore") {
        Some(value) => named("credsStore".to_string(), value),
        None => Ok(None),
    }
}

/// The credentials the Docker config (`$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`) gives for `host`, if any: from the credential helper it names for
/// the host ([`helper_for`]), else from its `auths` entries, keyed by host (`127.0.0.1:5000`)
/// or by URL (`https://index.docker.io/v1/` for docker.io).
pub fn credentials_for(host: &str) -> Result<Option<Credentials>, AuthError> {
    credentials_in(&docker_config_path()?, host)
}

/// [`credentials_for`] in the config file at `path`.
pub fn credentials_in(path: &Path, host: &str) -> Result<Option<Credentials>, AuthError> {
    let config = read_config(path)?;
    if let Some(name) = helper_for(&config, path, host)? {
        // As docker/cli's native store: the helper's answer, and nothing from `auths` when it
        // has none (anonymous).
        return helper::get(&name, &config_key(host));
    }
    let Some(auths) = auths(&config, path)? else {
        return Ok(None);
    };
    let wanted = normalize_server(host);
    // An exact key first, then any key naming the same registry.
    let entry = auths.get_key_value(host).or_else(|| {
        auths
            .iter()
            .find(|(key, _)| normalize_server(key) == wanted)
    });
    match entry {
        Some((key, entry)) => entry_credentials(entry, path, key),
        None => Ok(None),
    }
}

/// Keeps `credentials` for `server`: in the credential helper the config at `path` names for it
/// (`store`), else in the file (`auths.KEY.auth`). Either way the file keeps every other key,
/// and its entries naming the same registry are replaced, by `{}` when a helper keeps the
/// credentials (as docker/cli writes). Temp file, fsync, rename; the file is 0600 and a new
/// directory 0700.
pub fn store_credentials(
    path: &Path,
    server: &str,
    credentials: &Credentials,
) -> Result<(), AuthError> {
    let mut config = read_config(path)?;
    auths(&config, path)?;
    let helper = helper_for(&config, path, server)?;
    if let Some(name) = &helper {
        helper::store(name, &config_key(server), credentials)?;
    }
    let wanted = normalize_server(server);
    let auths = config
        .entry("auths")
        .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
    if auths.is_null() {
        *auths = serde_json::Value::Object(serde_json::Map::new());
    }
    let serde_json::Value::Object(auths) = auths else {
        unreachable!("checked above: auths is an object or absent");
    };
    auths.retain(|key, _| normalize_server(key) != wanted);
    let entry = match helper {
        Some(_) => serde_json::json!({}),
        None => serde_json::json!({
            "auth": STANDARD.encode(format!("{}:{}", credentials.username, credentials.password))
        }),
    };
    auths.insert(config_key(server), entry);
    write_config(path, &config)
}

/// Erases the credentials of `server` from the credential helper the config at `path` names for
/// it, and removes every `auths` entry naming `server` from the file; returns whether there was
/// something to remove.
pub fn remove_credentials(path: &Path, server: &str) -> Result<bool, AuthError> {
    let mut config = read_config(path)?;
    let erased = match helper_for(&config, path, server)? {
        Some(name) => helper::erase(&name, &config_key(server))?,
        None => false,
    };
    let wanted = normalize_server(server);
    let removed = match config.get_mut("auths") {
        Some(serde_json::Value::Object(auths)) => {
            let before = auths.len();
            auths.retain(|key, _| normalize_server(key) != wanted);
            auths.len() != before
        }
        None | Some(serde_json::Value::Null) => false,
        Some(_) => {
            return Err(AuthError::ConfigEntry {
                path: path.to_path_buf(),
                key: "auths".to_string(),
                problem: "is not a JSON object",
            });
        }
    };
    if removed {
        write_config(path, &config)?;
    }
    Ok(removed || erased)
}

fn write_config(
    path: &Path,
    config: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), AuthError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| AuthError::ConfigIo {
            action,
            path,
            source,
        }
    };
    let directory = path.parent().unwrap_or(Path::new("."));
    if !directory.exists() {
        fs::create_dir_all(directory).map_err(io("create the directory of", path))?;
        fs::set_permissions(directory, fs::Permissions::from_mode(0o700))
            .map_err(io("set the mode of the directory of", path))?;
    }
    let mut bytes =
        serde_json::to_vec_pretty(config).map_err(|source| AuthError::ConfigSyntax {
            path: path.to_path_buf(),
            source,
        })?;
    bytes.push(b'\n');
    let temp = directory.join(format!(".config.json.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .map_err(io("write", &temp))?;
        // The mode given at creation is masked by the umask; make sure it is 0600.
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io("write", &temp))?;
        file.write_all(&bytes).map_err(io("write", &temp))?;
        file.sync_all().map_err(io("fsync", &temp))?;
        fs::rename(&temp, path).map_err(io("replace", path))?;
        fs::File::open(directory)
            .and_then(|directory| directory.sync_all())
            .map_err(io("fsync the directory of", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn challenge(scheme: &str, parameters: &[(&str, &str)]) -> Challenge {
        Challenge {
            scheme: scheme.to_string(),
            parameters: parameters
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
        }
    }

    #[test]
    fn bearer_challenge_with_a_comma_inside_a_quoted_scope() {
        assert_eq!(
            parse_challenges(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#
            ),
            vec![challenge(
                "bearer",
                &[
                    ("realm", "https://auth.docker.io/token"),
                    ("service", "registry.docker.io"),
                    ("scope", "repository:library/busybox:pull,push"),
                ]
            )]
        );
    }

    #[test]
    fn several_challenges_spaces_bare_values_and_escapes() {
        assert_eq!(
            parse_challenges(
                r#"Newauth realm="apps", type=1, title="Login to \"apps\"", Basic realm="simple" ,  bearer Realm = "http://127.0.0.1:1/token""#
            ),
            vec![
                challenge(
                    "newauth",
                    &[
                        ("realm", "apps"),
                        ("type", "1"),
                        ("title", r#"Login to "apps""#)
                    ]
                ),
                challenge("basic", &[("realm", "simple")]),
                challenge("bearer", &[("realm", "http://127.0.0.1:1/token")]),
            ]
        );
    }

    #[test]
    fn a_scheme_without_parameters_and_garbage() {
        assert_eq!(
            parse_challenges("Negotiate, Basic"),
            vec![challenge("negotiate", &[]), challenge("basic", &[])]
        );
        assert_eq!(parse_challenges(""), vec![]);
        assert_eq!(parse_challenges("  ,  "), vec![]);
        assert_eq!(
            parse_challenges(r#"Bearer realm="unterminated"#),
            vec![challenge("bearer", &[("realm", "unterminated")])]
        );
    }

    #[test]
    fn basic_challenge_answers_with_the_credentials_and_then_always() {
        let authenticator = Authenticator::new(
            "127.0.0.1:5000",
            Some(Credentials {
                username: "user".to_string(),
                password: "pa:ss".to_string(),
            }),
        );
        assert_eq!(authenticator.header(&["repository:x:pull"]), None);
        let http = reqwest::blocking::Client::new();
        let header = authenticator
            .answer(
                &http,
                r#"Basic realm="Registry Realm""#,
                &["repository:x:pull"],
            )
            .unwrap();
        assert_eq!(header, format!("Basic {}", STANDARD.encode("user:pa:ss")));
        assert_eq!(
            authenticator.header(&["repository:y:push"]).as_deref(),
            Some(header.as_str())
        );
    }

    #[test]
    fn basic_challenge_without_credentials_says_to_log_in() {
        let authenticator = Authenticator::new("registry.example", None);
        let http = reqwest::blocking::Client::new();
        let error = authenticator
            .answer(&http, r#"Basic realm="x""#, &[])
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "registry registry.example needs credentials: run `rbuild login registry.example`"
        );
    }

    #[test]
    fn unknown_schemes_and_bad_realms_are_errors() {
        let authenticator = Authenticator::new("registry.example", None);
        let http = reqwest::blocking::Client::new();
        assert!(matches!(
            authenticator.answer(&http, "Negotiate abc", &[]),
            Err(AuthError::Unsupported { .. })
        ));
        assert!(matches!(
            authenticator.answer(&http, r#"Bearer realm="file:///etc/passwd""#, &[]),
            Err(AuthError::InvalidRealm { .. })
        ));
        assert!(matches!(
            authenticator.answer(&http, r#"Bearer service="x""#, &[]),
            Err(AuthError::InvalidRealm { .. })
        ));
    }

    #[test]
    fn one_authenticator_is_shared_by_the_threads_of_a_pull() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Authenticator>();
    }

    #[test]
    fn a_push_token_serves_pulls_of_the_same_repository_only() {
        assert!(scope_covers(
            "repository:a/b:pull,push",
            "repository:a/b:pull"
        ));
        assert!(scope_covers("repository:a/b:*", "repository:a/b:push"));
        assert!(!scope_covers(
            "repository:a/b:pull",
            "repository:a/b:pull,push"
        ));
        assert!(!scope_covers(
            "repository:a/c:pull,push",
            "repository:a/b:pull"
        ));
    }

    #[test]
    fn a_token_for_several_scopes_serves_each_and_is_keyed_by_all() {
        assert_eq!(
            scope_key(&[
                "repository:b:pull,push",
                "repository:a:pull",
                "repository:a:pull"
            ]),
            vec!["repository:a:pull", "repository:b:pull,push"]
        );
        let mount = scope_key(&["repository:b:pull,push", "repository:a:pull"]);
        assert!(scopes_cover(&mount, &scope_key(&["repository:b:pull"])));
        assert!(scopes_cover(&mount, &scope_key(&["repository:a:pull"])));
        assert!(scopes_cover(&mount, &mount));
        assert!(!scopes_cover(&mount, &scope_key(&["repository:a:push"])));
        let push = scope_key(&["repository:b:pull,push"]);
        assert!(!scopes_cover(&push, &mount), "a mount needs the source too");
        assert!(!scopes_cover(&push, &[]));
        assert!(scopes_cover(&[], &[]));
    }

    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "localhost:5000",
            "127.0.0.1",
            "127.3.4.5:80",
            "[::1]:5000",
            "::1",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "docker.io",
            "10.0.0.1:5000",
            "localhost.example.com",
            "[::2]:1",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn server_names() {
        for server in [
            "docker.io",
            "index.docker.io",
            "registry-1.docker.io",
            "https://index.docker.io/v1/",
        ] {
            assert_eq!(normalize_server(server), "docker.io");
            assert_eq!(config_key(server), DOCKER_HUB_CONFIG_KEY);
        }
        assert_eq!(
            normalize_server("http://Registry.Example:5000/v2/"),
            "registry.example:5000"
        );
        assert_eq!(config_key("127.0.0.1:5000"), "127.0.0.1:5000");
    }

    struct Directory(PathBuf);

    impl Directory {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("rbuild-auth-unit-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for Directory {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn config(directory: &Directory, text: &str) -> PathBuf {
        let path = directory.0.join("config.json");
        fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn config_entries_by_host_by_url_by_fields_and_by_identity_token() {
        let directory = Directory::new("entries");
        let path = config(
            &directory,
            &serde_json::json!({
                "auths": {
                    "https://index.docker.io/v1/": {"auth": STANDARD.encode("hub:secret")},
                    "127.0.0.1:5000": {"auth": STANDARD.encode("local:pa:ss")},
                    "https://other.example/v2/": {"username": "u", "password": "p"},
                    "token.example": {"auth": "", "identitytoken": "refresh-me"},
                    "helper.example": {},
                },
            })
            .to_string(),
        );
        let credentials = |host| credentials_in(&path, host).unwrap();
        let pair = |username: &str, password: &str| {
            Some(Credentials {
                username: username.to_string(),
                password: password.to_string(),
            })
        };
        assert_eq!(credentials("docker.io"), pair("hub", "secret"));
        assert_eq!(credentials("registry-1.docker.io"), pair("hub", "secret"));
        assert_eq!(credentials("127.0.0.1:5000"), pair("local", "pa:ss"));
        assert_eq!(credentials("other.example"), pair("u", "p"));
        let token = credentials("token.example").unwrap();
        assert!(token.is_identity_token());
        assert_eq!(token.password, "refresh-me");
        assert_eq!(credentials("helper.example"), None);
        assert_eq!(credentials("127.0.0.1:5001"), None);
    }

    #[test]
    fn the_helper_for_a_host_is_its_cred_helper_else_the_creds_store() {
        let path = Path::new("/nonexistent/config.json");
        let config = |value: serde_json::Value| match value {
            serde_json::Value::Object(object) => object,
            _ => unreachable!(),
        };
        let both = config(serde_json::json!({
            "credsStore": "desktop",
            "credHelpers": {
                "127.0.0.1:5000": "pass",
                "https://index.docker.io/v1/": "hub",
                "ECR.example:443": "ecr-login",
                "unset.example": "",
            },
            "auths": {"127.0.0.1:5000": {"auth": STANDARD.encode("a:b")}},
        }));
        let helper = |config: &serde_json::Map<String, serde_json::Value>, host: &str| {
            helper_for(config, path, host).unwrap()
        };
        assert_eq!(helper(&both, "127.0.0.1:5000").as_deref(), Some("pass"));
        assert_eq!(helper(&both, "docker.io").as_deref(), Some("hub"));
        assert_eq!(
            helper(&both, "ecr.example:443").as_deref(),
            Some("ecr-login")
        );
        assert_eq!(helper(&both, "other.example").as_deref(), Some("desktop"));
        assert_eq!(helper(&both, "unset.example").as_deref(), Some("desktop"));
        let only_helpers = config(serde_json::json!({"credHelpers": {"a.example": "pass"}}));
        assert_eq!(helper(&only_helpers, "a.example").as_deref(), Some("pass"));
        assert_eq!(helper(&only_helpers, "b.example"), None);
        assert_eq!(
            helper(&config(serde_json::json!({"credsStore": ""})), "a"),
            None
        );
        assert_eq!(helper(&config(serde_json::json!({})), "a"), None);

        let error = helper_for(
            &config(serde_json::json!({"credsStore": "../../bin/sh"})),
            path,
            "a",
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            r#"the Docker config /nonexistent/config.json: credsStore: "../../bin/sh" is not a credential helper name"#
        );
        let error = helper_for(&config(serde_json::json!({"credHelpers": []})), path, "a")
            .unwrap_err()
            .to_string();
        assert!(
            error.ends_with("credHelpers: is not a JSON object"),
            "{error}"
        );
        let error = helper_for(
            &config(serde_json::json!({"credHelpers": {"a": 1}})),
            path,
            "a",
        )
        .unwrap_err()
        .to_string();
        assert!(error.ends_with("credHelpers.a: is not a string"), "{error}");
    }

    #[test]
    fn a_missing_or_empty_config_has_no_credentials() {
        let directory = Directory::new("missing");
        assert_eq!(
            credentials_in(&directory.0.join("config.json"), "docker.io").unwrap(),
            None
        );
        let path = config(&directory, "");
        assert_eq!(credentials_in(&path, "docker.io").unwrap(), None);
        let path = config(&directory, r#"{"auths": null, "other": 1}"#);
        assert_eq!(credentials_in(&path, "docker.io").unwrap(), None);
    }

    #[test]
    fn malformed_configs_name_the_file_and_the_key() {
        let directory = Directory::new("malformed");
        let path = config(&directory, "{not json");
        let error = credentials_in(&path, "docker.io").unwrap_err();
        assert!(matches!(error, AuthError::ConfigSyntax { .. }), "{error}");
        assert!(error.to_string().contains(&path.display().to_string()));

        let path = config(&directory, r#"{"auths": []}"#);
        let error = credentials_in(&path, "docker.io").unwrap_err().to_string();
        assert!(error.ends_with("auths: is not a JSON object"), "{error}");

        let path = config(&directory, r#"{"auths": {"docker.io": {"auth": "%%%"}}}"#);
        let error = credentials_in(&path, "docker.io").unwrap_err().to_string();
        assert!(
            error.ends_with("auths.docker.io: auth is not base64"),
            "{error}"
        );

        let no_colon = STANDARD.encode("nocolon");
        let path = config(
            &directory,
            &format!(r#"{{"auths": {{"docker.io": {{"auth": "{no_colon}"}}}}}}"#),
        );
        let error = credentials_in(&path, "docker.io").unwrap_err().to_string();
        assert!(
            error.ends_with("auth is not base64 of user:password"),
            "{error}"
        );
    }

    #[test]
    fn store_keeps_other_keys_replaces_aliases_and_remove_takes_them_out() {
        let directory = Directory::new("store");
        let path = config(
            &directory,
            &serde_json::json!({
                "auths": {
                    "index.docker.io": {"auth": STANDARD.encode("old:old")},
                    "kept.example": {"auth": STANDARD.encode("k:k")},
                },
                "proxies": {"default": {}},
            })
            .to_string(),
        );
        let credentials = Credentials {
            username: "new".to_string(),
            password: "word".to_string(),
        };
        store_credentials(&path, "docker.io", &credentials).unwrap();
        let written: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            written["auths"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            vec![DOCKER_HUB_CONFIG_KEY, "kept.example"]
        );
        assert_eq!(written["proxies"], serde_json::json!({"default": {}}));
        assert_eq!(
            credentials_in(&path, "docker.io").unwrap(),
            Some(credentials)
        );
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        assert!(remove_credentials(&path, "registry-1.docker.io").unwrap());
        assert!(!remove_credentials(&path, "docker.io").unwrap());
        assert_eq!(credentials_in(&path, "docker.io").unwrap(), None);
        assert!(credentials_in(&path, "kept.example").unwrap().is_some());
    }

    #[test]
    fn store_creates_the_directory_private() {
        let directory = Directory::new("create");
        let path = directory.0.join("new/config.json");
        let credentials = Credentials {
            username: "a".to_string(),
            password: "b".to_string(),
        };
        store_credentials(&path, "127.0.0.1:5000", &credentials).unwrap();
        assert_eq!(
            fs::metadata(path.parent().unwrap())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        assert_eq!(
            credentials_in(&path, "127.0.0.1:5000").unwrap(),
            Some(credentials)
        );
    }
}
