//! The content store: sha256-addressed blobs in OCI layout (`blobs/sha256/<hex>`).
//!
//! Every write streams into a temp file under `ingest/` while it is hashed, is checked against
//! the digest and size the caller expects, fsynced, and renamed into place; the directory is
//! fsynced after the rename. A reader verifies the bytes it hands out and fails at the end of
//! a blob whose content does not match its name, so a corrupt blob is reported, never used.
//! A writer holds an exclusive `flock` on its temp file, so leftovers of a killed process are
//! told apart from writes in flight and removed by [`ContentStore::remove_stale_ingests`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

/// What can go wrong in the content store.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// A filesystem operation on a path failed.
    #[error("{action} {path}")]
    Io {
        /// What rbuild was doing.
        action: &'static str,
        /// The path it was doing it to.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Written bytes did not hash to the digest the caller expected.
    #[error("content mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest the caller named.
        expected: Digest,
        /// The digest of the bytes.
        actual: Digest,
    },
    /// Written bytes were not as many as the caller expected.
    #[error("size mismatch for {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// The size the caller named.
        expected: u64,
        /// The bytes written.
        actual: u64,
    },
    /// A stored blob's content does not match its digest.
    #[error("blob {digest} is corrupt: its content hashes to {actual}")]
    Corrupt {
        /// The blob's name.
        digest: Digest,
        /// What its content hashes to.
        actual: Digest,
    },
    /// The blob is not in the store.
    #[error("blob {digest} is not in the store")]
    NotFound {
        /// The missing blob.
        digest: Digest,
    },
    /// A blob read into memory was larger than the caller allows.
    #[error("blob {digest} is {size} bytes, more than the {limit} allowed here")]
    TooLarge {
        /// The blob.
        digest: Digest,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
}

impl ContentError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self + use<> {
        let path = path.to_path_buf();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}

/// A blob's digest and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    /// The sha256 of the content.
    pub digest: Digest,
    /// The content's length in bytes.
    pub size: u64,
}

/// The blobs of one store root.
#[derive(Clone, Debug)]
pub struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
}

impl ContentStore {
    /// Opens (creating if needed) the content store in `directory`: `blobs/sha256/` and
    /// `ingest/`.
    pub fn open(directory: &Path) -> Result<Self, ContentError> {
        let blobs = directory.join("blobs").join("sha256");
        let ingest = directory.join("ingest");
        for path in [&blobs, &ingest] {
            fs::create_dir_all(path).map_err(ContentError::io("create", path))?;
        }
        Ok(Self { blobs, ingest })
    }

    /// Where the blob named `digest` lives (whether or not it is there).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// The directory holding the blobs.
    pub fn blobs_directory(&self) -> &Path {
        &self.blobs
    }

    /// The directory holding writes in progress.
    pub fn ingest_directory(&self) -> &Path {
        &self.ingest
    }

    /// Whether a blob with this name is present (not verified).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// The size of a present blob.
    pub fn size(&self, digest: &Digest) -> Result<u64, ContentError> {
        let path = self.blob_path(digest);
        match fs::metadata(&path) {
            Ok(metadata) => Ok(metadata.len()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Err(ContentError::NotFound {
                digest: digest.clone(),
            }),
            Err(source) => Err(ContentError::Io {
                action: "stat",
                path,
                source,
            }),
        }
    }

    /// Starts writing a new blob.
    pub fn writer(&self) -> Result<BlobWriter, ContentError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |time| time.as_nanos());
        let name = format!(
            "{}-{}-{}.partial",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            nanos
        );
        let temp_path = self.ingest.join(name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp_path)
            .map_err(ContentError::io("create", &temp_path))?;
        file.lock().map_err(ContentError::io("lock", &temp_path))?;
        Ok(BlobWriter {
            temp_path,
            blobs: self.blobs.clone(),
            size: 0,
            chunk: Vec::new(),
            sink: Some(Sink::Inline {
                file,
                hasher: Sha256::new(),
            }),
            committed: false,
        })
    }

    /// Stores `bytes` as a blob.
    pub fn write_bytes(&self, bytes: &[u8]) -> Result<BlobInfo, ContentError> {
        let digest = Digest::of(bytes);
        if self.verify(&digest).is_ok() {
            return Ok(BlobInfo {
                digest,
                size: bytes.len() as u64,
            });
        }
        let mut writer = self.writer()?;
        writer
            .write_all(bytes)
            .map_err(ContentError::io("write", &writer.temp_path))?;
        writer.commit(Some(&digest), Some(bytes.len() as u64))
    }

    /// Streams `reader` into a blob, checking it against the expected digest and size.
    pub fn write_from(
        &self,
        reader: &mut dyn Read,
        expected: Option<&Digest>,
        expected_size: Option<u64>,
    ) -> Result<BlobInfo, ContentError> {
        let mut writer = self.writer()?;
        io::copy(reader, &mut writer).map_err(ContentError::io("write", &writer.temp_path))?;
        writer.commit(expected, expected_size)
    }

    /// Opens a blob for reading; the reader fails at the end if the content does not match.
    pub fn open_blob(&self, digest: &Digest) -> Result<VerifyingReader<File>, ContentError> {
        let path = self.blob_path(digest);
        let file = File::open(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                ContentError::NotFound {
                    digest: digest.clone(),
                }
            } else {
                ContentError::Io {
                    action: "open",
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let size = file
            .metadata()
            .map_err(ContentError::io("stat", &path))?
            .len();
        Ok(VerifyingReader::new(file, digest.clone(), Some(size)))
    }

    /// Reads a small blob (a manifest, a config) into memory, verified.
    pub fn read_bytes(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, ContentError> {
        let size = self.size(digest)?;
        if size > limit {
            return Err(ContentError::TooLarge {
                digest: digest.clone(),
                size,
                limit,
            });
        }
        let path = self.blob_path(digest);
        let bytes = fs::read(&path).map_err(ContentError::io("read", &path))?;
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(ContentError::Corrupt {
                digest: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Reads a whole blob and checks that it hashes to its name.
    pub fn verify(&self, digest: &Digest) -> Result<u64, ContentError> {
        let mut reader = self.open_blob(digest)?;
        match io::copy(&mut reader, &mut io::sink()) {
            Ok(size) => Ok(size),
            Err(_) if reader.mismatch().is_some() => Err(ContentError::Corrupt {
                digest: digest.clone(),
                actual: reader.mismatch().cloned().expect("checked above"),
            }),
            Err(source) => Err(ContentError::Io {
                action: "read",
                path: self.blob_path(digest),
                source,
            }),
        }
    }

    /// Every blob present, by name (not verified); files that are not named by a digest are
    /// skipped.
    pub fn list(&self) -> Result<Vec<BlobInfo>, ContentError> {
        let mut blobs = Vec::new();
        let entries = fs::read_dir(&self.blobs).map_err(ContentError::io("list", &self.blobs))?;
        for entry in entries {
            let entry = entry.map_err(ContentError::io("list", &self.blobs))?;
            let Some(digest) = entry
                .file_name()
                .to_str()
                .and_then(|hex| format!("sha256:{hex}").parse().ok())
            else {
                continue;
            };
            let size = entry
                .metadata()
                .map_err(ContentError::io("stat", &entry.path()))?
                .len();
            blobs.push(BlobInfo { digest, size });
        }
        blobs.sort_by(|left, right| left.digest.cmp(&right.digest));
        Ok(blobs)
    }

    /// Deletes a blob; a missing one is not an error.
    pub fn remove(&self, digest: &Digest) -> Result<(), ContentError> {
        let path = self.blob_path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ContentError::Io {
                action: "remove",
                path,
                source,
            }),
        }
    }

    /// Removes temp files of writes whose process is gone (their lock is free); returns how
    /// many bytes were freed.
    pub fn remove_stale_ingests(&self) -> Result<u64, ContentError> {
        let mut freed = 0;
        let entries = fs::read_dir(&self.ingest).map_err(ContentError::io("list", &self.ingest))?;
        for entry in entries {
            let entry = entry.map_err(ContentError::io("list", &self.ingest))?;
            let path = entry.path();
            let Ok(file) = OpenOptions::new().write(true).open(&path) else {
                continue;
            };
            if file.try_lock().is_err() {
                continue;
            }
            let size = file.metadata().map_or(0, |metadata| metadata.len());
            if fs::remove_file(&path).is_ok() {
                freed += size;
            }
        }
        Ok(freed)
    }
}

/// A blob being written. Dropping it without [`BlobWriter::commit`] deletes the temp file.
///
/// Bytes are gathered in chunks. A small blob is hashed and written on the caller's thread;
/// once a blob passes one chunk, hashing and writing move to two threads of their own, a
/// pipeline the chunks pass through (caller → sha256 → file), so a 400 MB layer is tarred,
/// hashed and written at the same time.
pub struct BlobWriter {
    temp_path: PathBuf,
    blobs: PathBuf,
    size: u64,
    /// The chunk being filled.
    chunk: Vec<u8>,
    sink: Option<Sink>,
    /// Renamed into the store: the temp file is gone.
    committed: bool,
}

/// Size of the chunks a blob is hashed and written in.
const CHUNK_SIZE: usize = 1 << 20;
/// Chunks in flight between the caller, the hasher and the file writer.
const CHUNKS_IN_FLIGHT: usize = 4;

/// Where full chunks go.
enum Sink {
    /// Not yet one full chunk: the file and the hash state, on this thread.
    Inline { file: File, hasher: Sha256 },
    /// The pipeline threads.
    Piped(Pipeline),
}

struct Pipeline {
    /// Chunks to hash (and then write).
    to_hasher: std::sync::mpsc::SyncSender<Vec<u8>>,
    /// Written chunks, emptied, to fill again.
    recycled: std::sync::mpsc::Receiver<Vec<u8>>,
    /// Chunks allocated so far.
    allocated: usize,
    hasher: std::thread::JoinHandle<Sha256>,
    writer: std::thread::JoinHandle<io::Result<File>>,
}

impl Pipeline {
    fn start(mut file: File, mut hasher: Sha256) -> Self {
        use std::sync::mpsc::sync_channel;
        let (to_hasher, hasher_input) = sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
        let (to_writer, writer_input) = sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
        let (recycle, recycled) = sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
        let hasher = std::thread::Builder::new()
            .name("rbuild-sha256".to_string())
            .spawn(move || {
                for chunk in hasher_input {
                    hasher.update(&chunk);
                    if to_writer.send(chunk).is_err() {
                        break;
                    }
                }
                hasher
            })
            .expect("threads can be spawned");
        let writer = std::thread::Builder::new()
            .name("rbuild-blob-write".to_string())
            .spawn(move || {
                for mut chunk in writer_input {
                    file.write_all(&chunk)?;
                    chunk.clear();
                    // The caller may have stopped taking chunks back; then this one is dropped.
                    let _ = recycle.try_send(chunk);
                }
                Ok(file)
            })
            .expect("threads can be spawned");
        Self {
            to_hasher,
            recycled,
            allocated: 1,
            hasher,
            writer,
        }
    }

    /// An empty chunk to fill: a recycled one, a new one while fewer than the pipeline holds
    /// are allocated, else the next one the writer gives back.
    fn empty_chunk(&mut self) -> Vec<u8> {
        if let Ok(chunk) = self.recycled.try_recv() {
            return chunk;
        }
        if self.allocated < CHUNKS_IN_FLIGHT * 2 + 1 {
            self.allocated += 1;
            return Vec::with_capacity(CHUNK_SIZE);
        }
        self.recycled
            .recv()
            .unwrap_or_else(|_| Vec::with_capacity(CHUNK_SIZE))
    }

    /// Waits for both threads: the hash of everything, and the file (or the write error).
    fn finish(self) -> (Sha256, io::Result<File>) {
        drop(self.to_hasher);
        let hasher = self
            .hasher
            .join()
            .expect("the hasher thread does not panic");
        let file = self
            .writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the blob writer thread panicked")));
        (hasher, file)
    }
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The temp file being written.
    pub fn temp_path(&self) -> &Path {
        &self.temp_path
    }

    /// Hands the full chunk on, starting the pipeline on the first one.
    fn pass_chunk(&mut self) -> io::Result<()> {
        let mut pipeline = match self.sink.take().expect("not committed") {
            Sink::Inline { file, hasher } => Pipeline::start(file, hasher),
            Sink::Piped(pipeline) => pipeline,
        };
        let full = std::mem::replace(&mut self.chunk, pipeline.empty_chunk());
        let sent = pipeline.to_hasher.send(full);
        self.sink = Some(Sink::Piped(pipeline));
        sent.map_err(|_| io::Error::other("the blob writer stopped"))
    }

    /// Verifies the content against what the caller expects, fsyncs it and renames it into
    /// the store.
    pub fn commit(
        mut self,
        expected: Option<&Digest>,
        expected_size: Option<u64>,
    ) -> Result<BlobInfo, ContentError> {
        let chunk = std::mem::take(&mut self.chunk);
        let (hasher, file) = match self.sink.take().expect("a writer is committed once") {
            Sink::Inline {
                mut file,
                mut hasher,
            } => {
                hasher.update(&chunk);
                let written = file.write_all(&chunk).map(|()| file);
                (hasher, written)
            }
            Sink::Piped(pipeline) => {
                let sent = pipeline.to_hasher.send(chunk);
                let (hasher, file) = pipeline.finish();
                match sent {
                    Ok(()) => (hasher, file),
                    Err(_) => (
                        hasher,
                        Err(file
                            .err()
                            .unwrap_or_else(|| io::Error::other("the blob writer stopped"))),
                    ),
                }
            }
        };
        let file = file.map_err(ContentError::io("write", &self.temp_path))?;
        let digest = Digest::from_hasher(hasher);
        if let Some(expected) = expected
            && *expected != digest
        {
            return Err(ContentError::DigestMismatch {
                expected: expected.clone(),
                actual: digest,
            });
        }
        if let Some(expected_size) = expected_size
            && expected_size != self.size
        {
            return Err(ContentError::SizeMismatch {
                digest,
                expected: expected_size,
                actual: self.size,
            });
        }
        file.sync_all()
            .map_err(ContentError::io("fsync", &self.temp_path))?;
        let target = self.blobs.join(digest.hex());
        fs::rename(&self.temp_path, &target).map_err(ContentError::io("rename", &target))?;
        self.committed = true;
        sync_directory(&self.blobs)?;
        Ok(BlobInfo {
            digest,
            size: self.size,
        })
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        let room = CHUNK_SIZE - self.chunk.len();
        let taken = room.min(buffer.len());
        self.chunk.extend_from_slice(&buffer[..taken]);
        self.size += taken as u64;
        if self.chunk.len() == CHUNK_SIZE {
            self.pass_chunk()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Chunks reach the file as they fill; the rest at commit.
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(Sink::Piped(pipeline)) = self.sink.take() {
            let _ = pipeline.finish();
        }
        if !self.committed {
            let _ = fs::remove_file(&self.temp_path);
        }
    }
}

/// Fsyncs a directory so a rename in it is durable.
pub fn sync_directory(path: &Path) -> Result<(), ContentError> {
    File::open(path)
        .and_then(|directory| directory.sync_all())
        .map_err(ContentError::io("fsync", path))
}

/// Writes `bytes` to `path` atomically: a temp file beside it, fsync, rename, fsync of the
/// directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ContentError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy())
        .unwrap_or_default();
    let temp = parent.join(format!(
        ".{name}.{}-{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = File::create(&temp).map_err(ContentError::io("create", &temp))?;
        file.write_all(bytes)
            .map_err(ContentError::io("write", &temp))?;
        file.sync_all().map_err(ContentError::io("fsync", &temp))?;
        fs::rename(&temp, path).map_err(ContentError::io("rename", path))?;
        sync_directory(parent)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// A reader that hashes what it reads and fails with `InvalidData` at the end of a stream
/// whose digest (or size) is not the expected one.
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Sha256,
    expected: Digest,
    expected_size: Option<u64>,
    size: u64,
    mismatch: Option<Digest>,
}

impl<R: Read> VerifyingReader<R> {
    /// Wraps `inner`, which must produce content hashing to `expected`.
    pub fn new(inner: R, expected: Digest, expected_size: Option<u64>) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            expected,
            expected_size,
            size: 0,
            mismatch: None,
        }
    }

    /// After a failed read at the end: the digest the content really had.
    pub fn mismatch(&self) -> Option<&Digest> {
        self.mismatch.as_ref()
    }

    /// Bytes read so far.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buffer)?;
        self.size += read as u64;
        if let Some(expected_size) = self.expected_size
            && self.size > expected_size
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is longer than its {expected_size} bytes", self.expected),
            ));
        }
        if read > 0 {
            self.hasher.update(&buffer[..read]);
            return Ok(read);
        }
        let actual = Digest::from_hasher(std::mem::take(&mut self.hasher));
        if actual != self.expected {
            let message = format!("content of {} hashes to {actual}", self.expected);
            self.mismatch = Some(actual);
            return Err(io::Error::new(io::ErrorKind::InvalidData, message));
        }
        // Put an equivalent state back so repeated reads at the end stay consistent.
        self.hasher = Sha256::new();
        self.expected = Digest::from_hasher(Sha256::new());
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, ContentStore) {
        let directory = tempfile::tempdir().unwrap();
        let store = ContentStore::open(directory.path()).unwrap();
        (directory, store)
    }

    #[test]
    fn writes_and_reads_back_verified_blobs() {
        let (_directory, store) = store();
        let info = store.write_bytes(b"layer bytes").unwrap();
        assert_eq!(info.digest, Digest::of(b"layer bytes"));
        assert_eq!(
            store.read_bytes(&info.digest, 1024).unwrap(),
            b"layer bytes"
        );
        assert_eq!(store.verify(&info.digest).unwrap(), 11);
        assert_eq!(store.list().unwrap(), vec![info]);
        assert_eq!(fs::read_dir(store.ingest_directory()).unwrap().count(), 0);
    }

    #[test]
    fn rejects_content_that_does_not_match_the_expected_digest() {
        let (_directory, store) = store();
        let claimed = Digest::of(b"what the manifest says");
        let error = store
            .write_from(&mut &b"what arrived"[..], Some(&claimed), None)
            .unwrap_err();
        assert!(
            matches!(error, ContentError::DigestMismatch { .. }),
            "{error}"
        );
        assert!(!store.contains(&claimed));
        assert!(store.list().unwrap().is_empty());
        assert_eq!(fs::read_dir(store.ingest_directory()).unwrap().count(), 0);
        let error = store
            .write_from(&mut &b"12345"[..], None, Some(4))
            .unwrap_err();
        assert!(
            matches!(error, ContentError::SizeMismatch { .. }),
            "{error}"
        );
    }

    #[test]
    fn blobs_of_many_chunks_pass_the_pipeline_whole_and_in_order() {
        let (_directory, store) = store();
        // 3.5 chunks of bytes that differ by position, written in odd-sized pieces.
        let bytes: Vec<u8> = (0..CHUNK_SIZE * 7 / 2)
            .map(|index| (index % 251) as u8)
            .collect();
        let mut writer = store.writer().unwrap();
        for piece in bytes.chunks(77_777) {
            writer.write_all(piece).unwrap();
        }
        let info = writer
            .commit(Some(&Digest::of(&bytes)), Some(bytes.len() as u64))
            .unwrap();
        assert_eq!(info.size, bytes.len() as u64);
        assert_eq!(fs::read(store.blob_path(&info.digest)).unwrap(), bytes);

        // A lie over several chunks is refused and leaves nothing, stored or in ingest.
        let mut writer = store.writer().unwrap();
        writer.write_all(&bytes).unwrap();
        let claimed = Digest::of(b"something else");
        assert!(matches!(
            writer.commit(Some(&claimed), None),
            Err(ContentError::DigestMismatch { .. })
        ));
        assert!(!store.contains(&claimed));
        assert_eq!(fs::read_dir(store.ingest_directory()).unwrap().count(), 0);

        // Dropped half-way: the temp file goes too.
        let mut writer = store.writer().unwrap();
        writer.write_all(&bytes[..CHUNK_SIZE * 2 + 5]).unwrap();
        drop(writer);
        assert_eq!(fs::read_dir(store.ingest_directory()).unwrap().count(), 0);
    }

    #[test]
    fn detects_a_corrupt_or_truncated_blob() {
        let (_directory, store) = store();
        let info = store.write_bytes(b"the real content").unwrap();
        fs::write(store.blob_path(&info.digest), b"the fake content").unwrap();
        assert!(matches!(
            store.verify(&info.digest),
            Err(ContentError::Corrupt { .. })
        ));
        assert!(matches!(
            store.read_bytes(&info.digest, 100),
            Err(ContentError::Corrupt { .. })
        ));
        fs::write(store.blob_path(&info.digest), b"the real").unwrap();
        assert!(matches!(
            store.verify(&info.digest),
            Err(ContentError::Corrupt { .. })
        ));
        let mut reader = store.open_blob(&info.digest).unwrap();
        let error = io::copy(&mut reader, &mut io::sink()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn stale_ingests_are_removed_but_live_ones_are_kept() {
        let (_directory, store) = store();
        let mut live = store.writer().unwrap();
        live.write_all(b"in flight").unwrap();
        live.flush().unwrap();
        fs::write(
            store.ingest_directory().join("1-0-0.partial"),
            b"left by a killed process",
        )
        .unwrap();
        assert_eq!(store.remove_stale_ingests().unwrap(), 24);
        assert!(live.temp_path().exists());
        let info = live.commit(None, None).unwrap();
        assert_eq!(store.verify(&info.digest).unwrap(), 9);
    }

    #[test]
    fn write_atomic_replaces_the_file() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("record.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(directory.path()).unwrap().count(), 1);
    }
}
