//! `rbuild login` and `rbuild logout`: check credentials against a registry and keep them in the
//! Docker config (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`), where `docker`,
//! skopeo and rbuild's own pulls and pushes find them.

use std::io::{BufRead as _, IsTerminal as _, Read as _, Write as _};
use std::time::Duration;

use super::image::fail;
use crate::cli::{LoginArguments, LogoutArguments};
use crate::options::Status;
use crate::registry::auth::{
    self, AuthError, Authenticator, Credentials, config_key, is_loopback_host, normalize_server,
};

/// Why a login did not succeed.
#[derive(Debug, thiserror::Error)]
enum LoginError {
    /// The registry (or its token server) refused the user name and password.
    #[error("login to {server} failed: wrong user name or password")]
    Refused {
        /// The registry.
        server: String,
        /// What the registry or its token server said.
        #[source]
        source: Option<AuthError>,
    },
    /// The registry could not be asked.
    #[error("cannot reach the registry {url}")]
    Request {
        /// `GET /v2/` of the registry.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The registry answered something other than 200 or 401.
    #[error("the registry {url} answered {status}")]
    Status {
        /// `GET /v2/` of the registry.
        url: String,
        /// Its status.
        status: reqwest::StatusCode,
    },
    /// A 401 without a challenge.
    #[error("the registry {url} answered 401 without a WWW-Authenticate challenge")]
    NoChallenge {
        /// `GET /v2/` of the registry.
        url: String,
    },
    /// Answering the challenge failed for another reason than wrong credentials.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// The API endpoint of a registry: Docker Hub's is `registry-1.docker.io`; loopback registries
/// speak plain HTTP, as Docker does, others HTTPS.
fn base_url(host: &str) -> String {
    let endpoint = if host == "docker.io" {
        "registry-1.docker.io"
    } else {
        host
    };
    let scheme = if is_loopback_host(endpoint) {
        "http"
    } else {
        "https"
    };
    format!("{scheme}://{endpoint}")
}

/// One line from standard input, after `prompt` on standard error.
fn prompt_line(prompt: &str) -> std::io::Result<String> {
    if std::io::stdin().is_terminal() {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// The user name and password the arguments give (or standard input).
fn credentials(arguments: &LoginArguments) -> Result<Credentials, String> {
    if arguments.password_stdin && arguments.username.is_none() {
        return Err("--password-stdin needs --username".to_string());
    }
    let username = match &arguments.username {
        Some(username) => username.clone(),
        None => {
            prompt_line("Username: ").map_err(|error| format!("reading the user name: {error}"))?
        }
    };
    let password = if let Some(password) = &arguments.password {
        eprintln!(
            "warning: a password on the command line is visible to other users; use --password-stdin"
        );
        password.clone()
    } else if arguments.password_stdin {
        let mut password = String::new();
        std::io::stdin()
            .read_to_string(&mut password)
            .map_err(|error| format!("reading the password from standard input: {error}"))?;
        password.trim_end_matches(['\r', '\n']).to_string()
    } else {
        // Not hidden: rbuild has no terminal handling of its own; prefer --password-stdin.
        prompt_line("Password: ").map_err(|error| format!("reading the password: {error}"))?
    };
    if username.is_empty() {
        return Err("the user name is empty".to_string());
    }
    if password.is_empty() {
        return Err("the password is empty".to_string());
    }
    if username.contains(':') {
        return Err(format!("the user name {username:?} contains ':'"));
    }
    Ok(Credentials { username, password })
}

/// `GET /v2/` with the credentials, answering the registry's challenge.
fn check(host: &str, credentials: &Credentials) -> Result<(), LoginError> {
    let url = format!("{}/v2/", base_url(host));
    // No redirects: the credentials must not follow one.
    let http = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(30))
        .timeout(Duration::from_secs(120))
        .user_agent(concat!("rbuild/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|source| LoginError::Request {
            url: url.clone(),
            source,
        })?;
    let request = |authorization: Option<&str>| {
        let request = http.get(&url);
        let request = match authorization {
            Some(value) => request.header(reqwest::header::AUTHORIZATION, value),
            None => request,
        };
        request.send().map_err(|source| LoginError::Request {
            url: url.clone(),
            source,
        })
    };
    let refused = |source| LoginError::Refused {
        server: host.to_string(),
        source,
    };
    let response = request(None)?;
    let status = response.status();
    if status.is_success() {
        // The registry wants no credentials; they are kept all the same, as Docker does.
        return Ok(());
    }
    if status != reqwest::StatusCode::UNAUTHORIZED {
        return Err(LoginError::Status { url, status });
    }
    let challenge = response
        .headers()
        .get_all(reqwest::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect::<Vec<_>>()
        .join(", ");
    if challenge.is_empty() {
        return Err(LoginError::NoChallenge { url });
    }
    let authenticator = Authenticator::new(host, Some(credentials.clone()));
    let header = match authenticator.answer(&http, &challenge, &[]) {
        Ok(header) => header,
        Err(error @ AuthError::Refused { .. }) => return Err(refused(Some(error))),
        Err(error) => return Err(error.into()),
    };
    let status = request(Some(&header))?.status();
    if status.is_success() {
        Ok(())
    } else if status == reqwest::StatusCode::UNAUTHORIZED {
        Err(refused(None))
    } else {
        Err(LoginError::Status { url, status })
    }
}

/// `rbuild login [-u USER] [-p PASS | --password-stdin] [SERVER]`.
pub fn login(arguments: &LoginArguments) -> Status {
    let credentials = match credentials(arguments) {
        Ok(credentials) => credentials,
        Err(problem) => {
            eprintln!("error: {problem}");
            return Status::Usage;
        }
    };
    let host = normalize_server(&arguments.server);
    if host.is_empty() {
        eprintln!("error: invalid server {:?}", arguments.server);
        return Status::Usage;
    }
    if let Err(error) = check(&host, &credentials) {
        return fail(&error);
    }
    let stored = auth::docker_config_path()
        .and_then(|path| auth::store_credentials(&path, &arguments.server, &credentials));
    if let Err(error) = stored {
        return fail(&error);
    }
    println!("Login Succeeded");
    Status::Success
}

/// `rbuild logout [SERVER]`.
pub fn logout(arguments: &LogoutArguments) -> Status {
    let removed = auth::docker_config_path()
        .and_then(|path| auth::remove_credentials(&path, &arguments.server));
    match removed {
        Ok(true) => {
            println!(
                "Removing login credentials for {}",
                config_key(&arguments.server)
            );
            Status::Success
        }
        Ok(false) => {
            println!("Not logged in to {}", config_key(&arguments.server));
            Status::Success
        }
        Err(error) => fail(&error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(base_url("docker.io"), "https://registry-1.docker.io");
        assert_eq!(base_url("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(base_url("localhost:5000"), "http://localhost:5000");
        assert_eq!(base_url("registry.example"), "https://registry.example");
    }
}
