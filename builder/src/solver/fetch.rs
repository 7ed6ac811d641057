//! ADD of http(s) URLs: download to a scratch file, hashing as it streams, and check
//! `--checksum`.
//!
//! As BuildKit's http source (source/http/source.go) does: the file is named after the
//! `Content-Disposition` filename when the server sends one, else after the last segment of the
//! URL's path; its mode is 0600; its modification time is the `Last-Modified` time, or the Unix
//! epoch when there is none. A download that does not match `--checksum` is an error naming the
//! expected and the actual digest, and nothing of it reaches a layer.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::Digest as _;

/// The name BuildKit gives a download whose URL and headers name no file.
const UNNAMED: &str = "__unnamed__";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const BUFFER_SIZE: usize = 256 * 1024;

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum FetchError {
    /// The request could not be made or its body could not be read.
    #[error("download {url}")]
    Request {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    #[error("download {url}: the server answered {status}")]
    Status {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: reqwest::StatusCode,
    },
    /// Reading the body or writing the scratch file failed.
    #[error("download {url} to {path}")]
    Write {
        /// The URL.
        url: String,
        /// The scratch file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The content does not match `--checksum`.
    #[error("checksum mismatch for {url}: expected {expected}, got {actual}")]
    ChecksumMismatch {
        /// The URL.
        url: String,
        /// `--checksum`.
        expected: String,
        /// The digest of what the server sent.
        actual: String,
    },
}

/// A digest algorithm `--checksum` may name (go-digest's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Algorithm {
    /// `sha256:`.
    Sha256,
    /// `sha384:`.
    Sha384,
    /// `sha512:`.
    Sha512,
}

/// A parsed `--checksum=ALGORITHM:HEX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Checksum {
    algorithm: Algorithm,
    hex: String,
}

impl Checksum {
    /// Parses `sha256:<64 hex>` (or sha384, sha512), as go-digest's `Parse` accepts them.
    pub(super) fn parse(text: &str) -> Result<Self, String> {
        let (name, hex) = text
            .split_once(':')
            .ok_or_else(|| format!("--checksum={text} is not ALGORITHM:HEX (sha256:...)"))?;
        let (algorithm, length) = match name {
            "sha256" => (Algorithm::Sha256, 64),
            "sha384" => (Algorithm::Sha384, 96),
            "sha512" => (Algorithm::Sha512, 128),
            _ => {
                return Err(format!(
                    "--checksum={text}: unsupported digest algorithm {name} (want sha256, sha384 or sha512)"
                ));
            }
        };
        if hex.len() != length
            || !hex
                .bytes()
                .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
        {
            return Err(format!(
                "--checksum={text}: a {name} digest is {length} lower-case hex digits"
            ));
        }
        Ok(Self {
            algorithm,
            hex: hex.to_string(),
        })
    }
}

impl std::fmt::Display for Checksum {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.algorithm {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha384 => "sha384",
            Algorithm::Sha512 => "sha512",
        };
        write!(formatter, "{name}:{}", self.hex)
    }
}

enum Hasher {
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Self::Sha256(sha2::Sha256::new()),
            Algorithm::Sha384 => Self::Sha384(sha2::Sha384::new()),
            Algorithm::Sha512 => Self::Sha512(sha2::Sha512::new()),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Self::Sha256(hasher) => hasher.update(bytes),
            Self::Sha384(hasher) => hasher.update(bytes),
            Self::Sha512(hasher) => hasher.update(bytes),
        }
    }

    fn finish(self) -> Checksum {
        let (algorithm, hex) = match self {
            Self::Sha256(hasher) => (Algorithm::Sha256, hex::encode(hasher.finalize())),
            Self::Sha384(hasher) => (Algorithm::Sha384, hex::encode(hasher.finalize())),
            Self::Sha512(hasher) => (Algorithm::Sha512, hex::encode(hasher.finalize())),
        };
        Checksum { algorithm, hex }
    }
}

/// A downloaded file in a scratch directory, removed when this is dropped.
#[derive(Debug)]
pub(super) struct Download {
    directory: PathBuf,
    /// The file, named as it is named in the image.
    pub(super) path: PathBuf,
    /// That name.
    pub(super) name: String,
    /// The digest of the content (sha256, or `--checksum`'s algorithm).
    pub(super) digest: String,
    /// The `Last-Modified` time (the Unix epoch without one).
    pub(super) modified: SystemTime,
}

impl Drop for Download {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.directory);
    }
}

/// Downloads `url` into the fresh scratch directory `directory` (removed again on failure and
/// when the [`Download`] is dropped), checking it against `expected` when given.
pub(super) fn download(
    url: &str,
    directory: PathBuf,
    expected: Option<&Checksum>,
) -> Result<Download, FetchError> {
    let result = fetch_into(url, &directory, expected);
    if result.is_err() {
        let _ = fs::remove_dir_all(&directory);
    }
    let (path, name, digest, modified) = result?;
    Ok(Download {
        directory,
        path,
        name,
        digest,
        modified,
    })
}

fn fetch_into(
    url: &str,
    directory: &Path,
    expected: Option<&Checksum>,
) -> Result<(PathBuf, String, String, SystemTime), FetchError> {
    let request_error = |source| FetchError::Request {
        url: url.to_string(),
        source,
    };
    let client = reqwest::blocking::Client::builder()
        .user_agent(concat!("rbuild/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(CONNECT_TIMEOUT)
        // Large files take as long as they take; the blocking client's default is 30 s.
        .timeout(None)
        .build()
        .map_err(request_error)?;
    let mut response = client.get(url).send().map_err(request_error)?;
    let status = response.status();
    if !status.is_success() {
        return Err(FetchError::Status {
            url: url.to_string(),
            status,
        });
    }
    let header = |name: reqwest::header::HeaderName| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
    };
    let name = header(reqwest::header::CONTENT_DISPOSITION)
        .and_then(|value| disposition_file_name(&value))
        .unwrap_or_else(|| url_file_name(url));
    let modified = header(reqwest::header::LAST_MODIFIED)
        .and_then(|value| httpdate::parse_http_date(&value).ok())
        .unwrap_or(UNIX_EPOCH);

    let path = directory.join(&name);
    let write_error = |source| FetchError::Write {
        url: url.to_string(),
        path: path.clone(),
        source,
    };
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(write_error)?;
    let mut hasher = Hasher::new(expected.map_or(Algorithm::Sha256, |checksum| checksum.algorithm));
    let mut buffer = vec![0; BUFFER_SIZE];
    loop {
        let read = match response.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(write_error(error)),
        };
        hasher.update(&buffer[..read]);
        file.write_all(&buffer[..read]).map_err(write_error)?;
    }
    let actual = hasher.finish();
    if let Some(expected) = expected
        && *expected != actual
    {
        return Err(FetchError::ChecksumMismatch {
            url: url.to_string(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        });
    }
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(write_error)?;
    file.set_times(fs::FileTimes::new().set_modified(modified))
        .map_err(write_error)?;
    Ok((path, name, actual.to_string(), modified))
}

/// The file name of a `Content-Disposition` header (`filename*=UTF-8''...` preferred over
/// `filename=`), as its last path component; none when it names no usable file.
fn disposition_file_name(value: &str) -> Option<String> {
    let mut plain = None;
    let mut extended = None;
    for parameter in value.split(';').skip(1) {
        let Some((key, raw)) = parameter.trim().split_once('=') else {
            continue;
        };
        let key = key.trim().to_ascii_lowercase();
        let raw = raw.trim();
        if key == "filename" {
            plain = Some(raw.trim_matches('"').to_string());
        } else if key == "filename*" {
            // RFC 5987: charset'language'percent-encoded.
            let encoded = raw.splitn(3, '\'').nth(2).unwrap_or_default();
            extended = Some(percent_decoded(encoded));
        }
    }
    let name = extended.or(plain)?;
    if name.is_empty() || name.ends_with('/') {
        return None;
    }
    safe_file_name(&name)
}

/// The last segment of the URL's path (trailing `/` ignored, as Go's `path.Base` does),
/// percent-decoded; `__unnamed__` when there is none.
fn url_file_name(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|parsed| safe_file_name(&percent_decoded(parsed.path())))
        .unwrap_or_else(|| UNNAMED.to_string())
}

/// The last component of `path`, if it is a usable file name.
fn safe_file_name(path: &str) -> Option<String> {
    let name = path.trim_end_matches('/').rsplit('/').next()?;
    (!name.is_empty() && name != "." && name != "..").then(|| name.to_string())
}

fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut output = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%'
            && index + 2 < bytes.len()
            && let Some(digits) = text.get(index + 1..index + 3)
            && let Ok(byte) = u8::from_str_radix(digits, 16)
        {
            output.push(byte);
            index += 3;
            continue;
        }
        output.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&output).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_parse_like_go_digest() {
        let hex = "a".repeat(64);
        let checksum = Checksum::parse(&format!("sha256:{hex}")).unwrap();
        assert_eq!(checksum.to_string(), format!("sha256:{hex}"));
        assert!(Checksum::parse("sha256:abc").is_err());
        assert!(Checksum::parse(&format!("md5:{hex}")).is_err());
        assert!(Checksum::parse(&hex).is_err());
        assert!(Checksum::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(Checksum::parse(&format!("sha512:{}", "0".repeat(128))).is_ok());
    }

    #[test]
    fn file_names_come_from_the_disposition_then_the_url() {
        assert_eq!(
            disposition_file_name("attachment; filename=\"tool.tar.gz\"").as_deref(),
            Some("tool.tar.gz")
        );
        assert_eq!(
            disposition_file_name("attachment; filename=\"../../etc/passwd\"").as_deref(),
            Some("passwd")
        );
        assert_eq!(
            disposition_file_name("attachment; filename*=UTF-8''na%20me.txt; filename=x")
                .as_deref(),
            Some("na me.txt")
        );
        assert_eq!(disposition_file_name("attachment; filename=\"dir/\""), None);
        assert_eq!(disposition_file_name("inline"), None);
        assert_eq!(
            url_file_name("http://127.0.0.1:1/a/b/file.txt?x=1"),
            "file.txt"
        );
        assert_eq!(url_file_name("http://127.0.0.1:1/a/dir/"), "dir");
        assert_eq!(url_file_name("http://127.0.0.1:1/a%20b"), "a b");
        assert_eq!(url_file_name("http://127.0.0.1:1/"), UNNAMED);
    }
}
