//! Registry authentication: credentials from the Docker config and answers to a registry's
//! `WWW-Authenticate` challenges.
//!
//! The seam the distribution client uses: an [`Authenticator`] per registry host gives the
//! `Authorization` header to send for a scope, and answers a 401 with a new one.

/// A user name and password (or identity token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or token.
    pub password: String,
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
}

/// Authorization for one registry host (`127.0.0.1:5000`, `docker.io`, ...).
#[derive(Debug)]
pub struct Authenticator {
    host: String,
    credentials: Option<Credentials>,
}

impl Authenticator {
    /// Authorization for `host`, with the credentials to offer (none: anonymous).
    pub fn new(host: &str, credentials: Option<Credentials>) -> Self {
        Self {
            host: host.to_string(),
            credentials,
        }
    }

    /// The `Authorization` header value to send for `scope` (`repository:NAME:pull` or
    /// `repository:NAME:pull,push`), when one is already known (a cached token).
    pub fn header(&self, _scope: &str) -> Option<String> {
        None
    }

    /// Answers a 401: `challenge` is the response's `WWW-Authenticate` value. Returns the
    /// `Authorization` header value to retry with, fetching a token when the challenge is
    /// Bearer.
    pub fn answer(
        &self,
        _http: &reqwest::blocking::Client,
        challenge: &str,
        _scope: &str,
    ) -> Result<String, AuthError> {
        let _ = &self.credentials;
        Err(AuthError::Unsupported {
            host: self.host.clone(),
            challenge: challenge.to_string(),
        })
    }
}

/// The credentials the Docker config (`$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`) holds for `host`, if any.
pub fn credentials_for(_host: &str) -> Result<Option<Credentials>, AuthError> {
    Ok(None)
}
