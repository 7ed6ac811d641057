//! ADD of local archives: detection by content and path-safe extraction.
//!
//! A source is an archive when, decompressed (gzip, bzip2, xz, zstd or none, told apart by
//! their magic bytes as BuildKit's `archiveutil.DecompressStream` does), its first tar header
//! reads: BuildKit's `isArchivePath` (solver/llbsolver/file/unpack.go). Anything else is
//! copied as a file. Extraction never uses the tar crate's `unpack`: it goes through
//! [`rbuild_cache::apply::apply_layer`], which resolves every entry with
//! `openat2(RESOLVE_IN_ROOT)` inside the destination directory, refuses `..` entries, and never
//! follows a symlink at the final component. The archive's owners are kept (BuildKit keeps
//! them unless `--chown` is given); with `--chown` every extracted entry gets that owner, as
//! BuildKit's `mapArchiveHeaderOwner` does. `--chmod` does not apply to extracted content
//! (BuildKit's unpack path ignores the copy mode).
//!
//! Differences from BuildKit: `.wh.` entries are applied as whiteouts inside the fresh
//! destination (so they never reach the layer as whiteouts of lower layers), and device nodes
//! are skipped, as for any layer rbuild applies.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Cursor, Read};
use std::path::Path;

use rbuild_cache::apply::{ApplyOptions, WhiteoutMode, apply_layer};

const BZIP2_MAGIC: &[u8] = b"BZh";
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
/// Enough bytes to tell every supported compression apart.
const PREFIX_LENGTH: usize = 6;

/// Why extracting an archive failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum ArchiveError {
    /// The archive could not be opened or decompressed.
    #[error("read archive {path}")]
    Read {
        /// The archive.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An entry could not be extracted (including entries that would escape).
    #[error("extract archive {path}")]
    Extract {
        /// The archive.
        path: String,
        /// The cause.
        #[source]
        source: rbuild_cache::apply::ApplyError,
    },
    /// Setting the `--chown` owner on an extracted entry failed.
    #[error("chown {path}")]
    Chown {
        /// The entry.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// `reader` decompressed according to its first bytes: bzip2 and xz here, gzip, zstd and
/// plain through `rbuild_cache::compression`.
fn decompressed<'a>(mut reader: impl BufRead + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut prefix = Vec::with_capacity(PREFIX_LENGTH);
    while prefix.len() < PREFIX_LENGTH {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        if available.is_empty() {
            break;
        }
        let taken = available.len().min(PREFIX_LENGTH - prefix.len());
        prefix.extend_from_slice(&available[..taken]);
        reader.consume(taken);
    }
    let stream = BufReader::new(Cursor::new(prefix.clone()).chain(reader));
    Ok(if prefix.starts_with(BZIP2_MAGIC) {
        Box::new(bzip2::bufread::MultiBzDecoder::new(stream))
    } else if prefix.starts_with(XZ_MAGIC) {
        Box::new(lzma_rust2::XzReader::new(stream, true))
    } else {
        rbuild_cache::compression::decompress(stream)?
    })
}

fn open(path: &Path) -> io::Result<Box<dyn Read>> {
    decompressed(BufReader::new(File::open(path)?))
}

/// Whether the regular file at `path` is a tar archive, possibly compressed: its first tar
/// header decompresses and parses (BuildKit's `isArchivePath`).
pub(super) fn is_archive(path: &Path) -> bool {
    let Ok(metadata) = fs::symlink_metadata(path) else {
        return false;
    };
    if !metadata.is_file() {
        return false;
    }
    let Ok(reader) = open(path) else {
        return false;
    };
    let mut archive = tar::Archive::new(reader);
    let Ok(mut entries) = archive.entries() else {
        return false;
    };
    matches!(entries.next(), Some(Ok(_)))
}

/// Extracts the archive at `archive` (called `name` in errors) into the existing directory
/// `target`, then gives every entry below `target` the owner `ownership` when one is given.
pub(super) fn extract(
    archive: &Path,
    name: &str,
    target: &Path,
    ownership: Option<(u32, u32)>,
) -> Result<(), ArchiveError> {
    let name = name.to_string();
    let reader = open(archive).map_err(|source| ArchiveError::Read {
        path: name.clone(),
        source,
    })?;
    apply_layer(reader, target, &ApplyOptions::new(WhiteoutMode::Apply)).map_err(|source| {
        ArchiveError::Extract {
            path: name.clone(),
            source,
        }
    })?;
    if let Some((uid, gid)) = ownership {
        for entry in fs::read_dir(target).map_err(|source| ArchiveError::Chown {
            path: target.display().to_string(),
            source,
        })? {
            let entry = entry.map_err(|source| ArchiveError::Chown {
                path: target.display().to_string(),
                source,
            })?;
            chown_tree(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Gives `path` and everything below it the owner `uid:gid`, never following a symlink.
/// `path` is inside rbuild's own scratch tree, which nothing else writes while a step runs.
fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), ArchiveError> {
    let chown_error = |source| ArchiveError::Chown {
        path: path.display().to_string(),
        source,
    };
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(chown_error)?;
    let metadata = fs::symlink_metadata(path).map_err(chown_error)?;
    if metadata.is_dir() {
        for entry in fs::read_dir(path).map_err(chown_error)? {
            let entry = entry.map_err(chown_error)?;
            chown_tree(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_bytes() -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(5);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, "hello.txt", &b"hello"[..])
            .unwrap();
        builder.into_inner().unwrap()
    }

    fn read_all(bytes: Vec<u8>) -> Vec<u8> {
        let mut output = Vec::new();
        decompressed(BufReader::new(Cursor::new(bytes)))
            .unwrap()
            .read_to_end(&mut output)
            .unwrap();
        output
    }

    #[test]
    fn bzip2_and_plain_streams_decompress_to_the_tar() {
        let tar = tar_bytes();
        let mut bzip2 = Vec::new();
        bzip2::read::BzEncoder::new(&tar[..], bzip2::Compression::default())
            .read_to_end(&mut bzip2)
            .unwrap();
        assert!(bzip2.starts_with(BZIP2_MAGIC));
        assert_eq!(read_all(bzip2), tar);

        assert_eq!(read_all(tar.clone()), tar);
    }
}
