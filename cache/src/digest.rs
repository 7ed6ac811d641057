//! sha256 digests as OCI writes them (`sha256:<64 lowercase hex>`), and a writer that computes
//! one while bytes stream through it.

use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A validated sha256 content digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest {
    hex: String,
}

/// A string that is not `sha256:` followed by 64 lowercase hex digits.
#[derive(Debug, thiserror::Error)]
#[error("invalid digest {text:?}: want sha256: and 64 lowercase hex digits")]
pub struct InvalidDigest {
    /// The rejected text.
    pub text: String,
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    /// The digest a finished hasher holds.
    pub fn from_hasher(hasher: Sha256) -> Self {
        Self {
            hex: hex::encode(hasher.finalize()),
        }
    }

    /// The 64 hex digits, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// `sha256:` and the hex digits.
    pub fn as_oci(&self) -> oci_spec::image::Digest {
        oci_spec::image::Digest::from_str(&self.to_string())
            .expect("a validated sha256 digest is a valid OCI digest")
    }

    /// The first 12 hex digits, as `docker images` shows an id.
    pub fn short(&self) -> &str {
        &self.hex[..12]
    }
}

impl FromStr for Digest {
    type Err = InvalidDigest;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidDigest {
            text: text.to_string(),
        };
        let hex = text.strip_prefix("sha256:").ok_or_else(invalid)?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(invalid());
        }
        Ok(Self {
            hex: hex.to_string(),
        })
    }
}

impl TryFrom<String> for Digest {
    type Error = InvalidDigest;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<Digest> for String {
    fn from(digest: Digest) -> Self {
        digest.to_string()
    }
}

impl From<&oci_spec::image::Digest> for Digest {
    fn from(digest: &oci_spec::image::Digest) -> Self {
        // oci-spec accepts other algorithms; the store holds sha256 only, and a non-sha256
        // digest maps to a value no blob can have.
        digest.to_string().parse().unwrap_or_else(|_| Self {
            hex: "0".repeat(64),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, formatter)
    }
}

/// A writer that hashes and counts what passes through it to `inner`.
pub struct DigestWriter<W> {
    inner: W,
    hasher: Option<Sha256>,
    size: u64,
}

impl<W: Write> DigestWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Some(Sha256::new()),
            size: 0,
        }
    }

    /// Wraps `inner`, counting but not hashing: for when `inner` hashes the same bytes itself
    /// (an uncompressed layer's diff id is its blob digest). [`DigestWriter::finish`] then
    /// gives no digest.
    pub fn counting(inner: W) -> Self {
        Self {
            inner,
            hasher: None,
            size: 0,
        }
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The inner writer, the digest (none when only counting) and the size of everything
    /// written.
    pub fn finish(self) -> (W, Option<Digest>, u64) {
        (self.inner, self.hasher.map(Digest::from_hasher), self.size)
    }

    /// The inner writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: Write> Write for DigestWriter<W> {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buffer)?;
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&buffer[..written]);
        }
        self.size += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_oci_digests() {
        let digest = Digest::of(b"");
        assert_eq!(
            digest.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(digest.to_string().parse::<Digest>().unwrap(), digest);
        assert_eq!(digest.short(), "e3b0c44298fc");
        assert_eq!(digest.as_oci().to_string(), digest.to_string());
    }

    #[test]
    fn rejects_malformed_digests() {
        for text in [
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:../../../etc/passwd",
            "sha512:e3b0",
            "sha256:",
        ] {
            assert!(text.parse::<Digest>().is_err(), "{text}");
        }
    }

    #[test]
    fn digest_writer_hashes_what_it_writes() {
        let mut writer = DigestWriter::new(Vec::new());
        writer.write_all(b"hello ").unwrap();
        writer.write_all(b"world").unwrap();
        let (bytes, digest, size) = writer.finish();
        assert_eq!(bytes, b"hello world");
        assert_eq!(size, 11);
        assert_eq!(digest, Some(Digest::of(b"hello world")));
    }
}
