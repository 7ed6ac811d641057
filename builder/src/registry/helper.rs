//! Docker credential helpers: programs `docker-credential-NAME` on `PATH` that keep registry
//! credentials outside the Docker config, spoken to as docker/cli does
//! (docker/docker-credential-helpers `client`):
//!
//! - `get`: the server URL on standard input; standard output is
//!   `{"ServerURL", "Username", "Secret"}` (`Username` `<token>` marks `Secret` as an identity
//!   token); a non-zero exit whose output is `credentials not found in native keychain` means
//!   there are none;
//! - `store`: that JSON on standard input;
//! - `erase`: the server URL on standard input.
//!
//! Which helper serves a registry is the Docker config's business (`auth`); this module only runs
//! one.

use std::io::Write as _;
use std::process::{Command, Stdio};

use super::auth::{AuthError, Credentials};

/// What a helper prints (and exits non-zero with) when it keeps nothing for a server.
pub const NOT_FOUND: &str = "credentials not found in native keychain";

/// How much of a failing helper's output goes into an error message.
const MESSAGE_LIMIT: usize = 300;

/// The program a helper name stands for.
pub fn program(name: &str) -> String {
    format!("docker-credential-{name}")
}

/// Whether `name` can name a helper: a program looked up on `PATH`, never a path.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || "-_.".contains(character))
        && name != "."
        && name != ".."
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperCredentials {
    #[serde(rename = "ServerURL", default)]
    server_url: String,
    username: String,
    secret: String,
}

/// How a helper run ended.
enum Outcome {
    /// Exit 0, with this standard output.
    Done(Vec<u8>),
    /// The helper keeps nothing for the server.
    NotFound,
}

/// Runs `docker-credential-NAME VERB` with `input` on standard input.
fn run(name: &str, verb: &'static str, server: &str, input: &[u8]) -> Result<Outcome, AuthError> {
    let program = program(name);
    let start = |source| AuthError::HelperStart {
        program: program.clone(),
        verb,
        source,
    };
    let mut child = Command::new(&program)
        .arg(verb)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(start)?;
    let mut stdin = child.stdin.take().expect("standard input is piped");
    // A helper may exit without reading its input: a closed pipe is judged by its exit status.
    let _ = stdin.write_all(input);
    drop(stdin);
    let output = child.wait_with_output().map_err(start)?;
    if output.status.success() {
        return Ok(Outcome::Done(output.stdout));
    }
    let said = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_string();
    let (stdout, stderr) = (said(&output.stdout), said(&output.stderr));
    if stdout.contains(NOT_FOUND) || stderr.contains(NOT_FOUND) {
        return Ok(Outcome::NotFound);
    }
    let mut message = if stdout.is_empty() { stderr } else { stdout };
    if message.is_empty() {
        message = format!("it exited with {}", output.status);
    }
    if message.len() > MESSAGE_LIMIT {
        let mut end = MESSAGE_LIMIT;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    Err(AuthError::HelperFailed {
        program,
        verb,
        server: server.to_string(),
        message,
    })
}

/// The credentials helper `name` keeps for `server` (a Docker config key: a host, or
/// `https://index.docker.io/v1/`); none when it keeps none.
pub fn get(name: &str, server: &str) -> Result<Option<Credentials>, AuthError> {
    let output = match run(name, "get", server, server.as_bytes())? {
        Outcome::Done(output) => output,
        Outcome::NotFound => return Ok(None),
    };
    // Every field read is a string, so serde's message names a field or a position, never a
    // value of the output (which may hold the secret).
    let answer: HelperCredentials =
        serde_json::from_slice(&output).map_err(|source| AuthError::HelperOutput {
            program: program(name),
            server: server.to_string(),
            source,
        })?;
    for (field, value) in [("Username", &answer.username), ("Secret", &answer.secret)] {
        if value.is_empty() {
            return Err(AuthError::HelperEmpty {
                program: program(name),
                server: server.to_string(),
                field,
            });
        }
    }
    Ok(Some(Credentials {
        username: answer.username,
        password: answer.secret,
    }))
}

/// Stores `credentials` for `server` in helper `name`.
pub fn store(name: &str, server: &str, credentials: &Credentials) -> Result<(), AuthError> {
    let input = serde_json::to_vec(&HelperCredentials {
        server_url: server.to_string(),
        username: credentials.username.clone(),
        secret: credentials.password.clone(),
    })
    .expect("strings serialize");
    match run(name, "store", server, &input)? {
        Outcome::Done(_) => Ok(()),
        // Not an answer `store` gives; taken as the failure it is.
        Outcome::NotFound => Err(AuthError::HelperFailed {
            program: program(name),
            verb: "store",
            server: server.to_string(),
            message: NOT_FOUND.to_string(),
        }),
    }
}

/// Erases what helper `name` keeps for `server`; returns whether it kept something.
pub fn erase(name: &str, server: &str) -> Result<bool, AuthError> {
    match run(name, "erase", server, server.as_bytes())? {
        Outcome::Done(_) => Ok(true),
        Outcome::NotFound => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_names_are_program_suffixes_not_paths() {
        for name in [
            "desktop",
            "pass",
            "ecr-login",
            "gcloud",
            "osxkeychain",
            "a_b.c",
        ] {
            assert!(is_valid_name(name), "{name}");
        }
        for name in ["", "..", ".", "../../bin/sh", "a/b", "x y", "a;b"] {
            assert!(!is_valid_name(name), "{name}");
        }
        assert_eq!(program("pass"), "docker-credential-pass");
    }

    #[test]
    fn the_store_input_is_what_docker_sends() {
        let input = serde_json::to_value(HelperCredentials {
            server_url: "127.0.0.1:5000".to_string(),
            username: "bob".to_string(),
            secret: "builder".to_string(),
        })
        .unwrap();
        assert_eq!(
            input,
            serde_json::json!({"ServerURL": "127.0.0.1:5000", "Username": "bob", "Secret": "builder"})
        );
    }
}
