//! Layer creation: a directory tree (or an overlayfs upper dir) written as a deterministic tar,
//! compressed and committed into the content store, and existing tar streams stored as layers.
//!
//! The same tree gives the same diff id on any machine, so the tar holds only what the tree
//! says and nothing about when or where it was written:
//! - entries in `filepath.Walk` order, the order BuildKit, containerd and Docker write: depth
//!   first, a directory before its children, the children of a directory sorted bytewise by
//!   name (the same as sorting whole paths bytewise with `/` taken as the lowest byte);
//! - names relative to the root, with no `./` or `/` in front, directories ending in `/`; the
//!   root itself is not an entry;
//! - uid, gid and mode (setuid, setgid and sticky bits included) as on disk, empty user and
//!   group names, the mtime in whole seconds clamped to `SOURCE_DATE_EPOCH` when given, no
//!   atime or ctime;
//! - a second and later path of an inode (by device and inode number, within the tree) as a
//!   hardlink to the first; symlinks with their target; devices with their numbers; FIFOs;
//!   sockets are skipped (tar cannot hold them);
//! - `user.*` and `security.capability` xattrs as PAX `SCHILY.xattr.NAME` records in name
//!   order; other namespaces (`trusted.*`, `security.selinux`, ACLs) are host state and left
//!   out, as containerd does;
//! - the PAX format as Go's `archive/tar` writes it with `FormatPAX` (containerd's choice):
//!   ustar headers, and a PAX header only for what they cannot hold (a name or link target
//!   longer than 100 bytes or not ASCII, a large id or size, xattrs).
//!
//! Everything streams: walk → tar → sha256 (the diff id) → [`Encoder`] → [`BlobWriter`]
//! (the blob digest); no file or layer is held in memory.
//!
//! [`BlobWriter`]: crate::BlobWriter

use std::collections::HashMap;
use std::ffi::CStr;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;
use rustix::io::Errno;
use tar::{EntryType, Header};
use tracing::instrument;
use walkdir::WalkDir;

use crate::compression::{Compression, Encoder, EncoderOptions, decompress};
use crate::content::{ContentError, ContentStore};
use crate::digest::{Digest, DigestWriter};

const BLOCK_SIZE: usize = 512;
const COPY_BUFFER_SIZE: usize = 256 * 1024;
/// Linux's `XATTR_LIST_MAX` and `XATTR_SIZE_MAX`.
const XATTR_MAX: usize = 64 * 1024;
/// The largest uid or gid a ustar header holds in octal (7 digits); Go switches to a PAX record
/// from here on.
const USTAR_ID_LIMIT: u64 = 1 << 21;
/// The largest size a ustar header holds in octal (11 digits).
const USTAR_SIZE_LIMIT: u64 = 1 << 33;
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The marker that hides everything below its directory in lower layers (AUFS naming, which
/// the OCI image spec adopted: image-spec `layer.md`, "Opaque Whiteout").
const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";
const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

/// What the directory given to [`write_layer_tar`] is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LayerSource {
    /// A plain directory tree: every entry becomes a tar entry.
    #[default]
    Directory,
    /// An overlayfs upper dir: char device 0/0 → empty regular file `.wh.NAME` (as containerd
    /// writes whiteouts), a directory with xattr `trusted.overlay.opaque=y` (or
    /// `user.overlay.opaque=y`) → the directory entry followed by `DIR/.wh..wh..opq`;
    /// `trusted.overlay.*`/`user.overlay.*` xattrs are never written to the tar. An upper dir
    /// using `redirect_dir` or `metacopy` is refused: its files do not hold their content.
    OverlayUpper,
}

/// How a layer is made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerOptions {
    /// The blob's compression.
    pub compression: Compression,
    /// The compression level; `None` for [`Compression::default_level`].
    pub level: Option<u32>,
    /// Clamp every mtime to at most this (seconds since the epoch), for reproducible layers.
    pub source_date_epoch: Option<i64>,
    /// What the directory is.
    pub source: LayerSource,
}

/// A layer committed into the content store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// The digest of the (compressed) blob.
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
    /// The sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// The uncompressed tar's size.
    pub uncompressed_size: u64,
    /// The OCI media type of the blob.
    pub media_type: &'static str,
}

/// What can go wrong making a layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The layer's root is not a directory.
    #[error("{path} is not a directory")]
    NotADirectory {
        /// The root given.
        path: PathBuf,
    },
    /// A filesystem operation on a path of the tree failed.
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
    /// A file changed while it was archived.
    #[error("{path} changed while it was being archived: {change}")]
    FileChanged {
        /// The file.
        path: PathBuf,
        /// How it changed.
        change: String,
    },
    /// An overlayfs upper dir uses a feature whose files do not hold their own content.
    #[error(
        "{path} has overlayfs xattr {xattr}: upper dirs made with redirect_dir or metacopy are not supported"
    )]
    UnsupportedOverlay {
        /// The file or directory.
        path: PathBuf,
        /// The xattr found.
        xattr: String,
    },
    /// The compressor could not be started.
    #[error("start the {compression} encoder")]
    Encoder {
        /// The compression asked for.
        compression: Compression,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the tar, compressing it or writing the blob failed.
    #[error("write the layer")]
    Write {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading or decompressing a tar stream being imported failed.
    #[error("read the tar stream")]
    Read {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The content store failed.
    #[error(transparent)]
    Content(#[from] ContentError),
}

impl LayerError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self + use<> {
        let path = path.to_path_buf();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }

    fn write(source: io::Error) -> Self {
        Self::Write { source }
    }
}

/// Writes `directory` as a deterministic, uncompressed tar into `out`; returns how many entries
/// (PAX headers not counted) it wrote.
pub fn write_layer_tar(
    directory: &Path,
    options: &LayerOptions,
    out: impl Write,
) -> Result<u64, LayerError> {
    let metadata = fs::symlink_metadata(directory).map_err(LayerError::io("stat", directory))?;
    if !metadata.is_dir() {
        return Err(LayerError::NotADirectory {
            path: directory.to_path_buf(),
        });
    }
    let mut writer = TarWriter::new(directory, options, out);
    let walk = WalkDir::new(directory)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name();
    for entry in walk {
        let entry = entry.map_err(|error| {
            let path = error.path().unwrap_or(directory).to_path_buf();
            LayerError::Io {
                action: "list",
                path,
                source: error.into(),
            }
        })?;
        writer.append(entry.path())?;
    }
    writer.finish()
}

/// Makes a layer of `directory` and commits it into `store`. On error nothing is left in the
/// store.
#[instrument(skip_all, fields(directory = %directory.display(), compression = %options.compression))]
pub fn create_layer(
    directory: &Path,
    options: &LayerOptions,
    store: &ContentStore,
) -> Result<Layer, LayerError> {
    let mut tar = start_blob(store, options.compression, options.level)?;
    let entries = write_layer_tar(directory, options, &mut tar)?;
    let layer = commit_blob(tar, options.compression)?;
    tracing::debug!(entries, digest = %layer.digest, diff_id = %layer.diff_id, size = layer.size,
        uncompressed_size = layer.uncompressed_size, "created layer");
    Ok(layer)
}

/// For `rbuild import`: stores an existing tar stream (plain, gzip or zstd: detected) as a
/// layer compressed with `compression`. The diff id is the sha256 of the uncompressed tar bytes
/// as given; they are not re-serialized (nor checked to be a tar).
#[instrument(skip_all, fields(compression = %compression))]
pub fn store_tar(
    reader: impl Read,
    compression: Compression,
    store: &ContentStore,
) -> Result<Layer, LayerError> {
    let mut input = decompress(BufReader::with_capacity(COPY_BUFFER_SIZE, reader))
        .map_err(|source| LayerError::Read { source })?;
    let mut tar = start_blob(store, compression, None)?;
    let mut buffer = vec![0; COPY_BUFFER_SIZE];
    loop {
        let read = match input.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(LayerError::Read { source }),
        };
        tar.write_all(&buffer[..read]).map_err(LayerError::write)?;
    }
    let layer = commit_blob(tar, compression)?;
    tracing::debug!(digest = %layer.digest, diff_id = %layer.diff_id, "stored tar as a layer");
    Ok(layer)
}

type BlobPipeline = DigestWriter<Encoder<crate::BlobWriter>>;

fn start_blob(
    store: &ContentStore,
    compression: Compression,
    level: Option<u32>,
) -> Result<BlobPipeline, LayerError> {
    let blob = store.writer()?;
    let options = EncoderOptions {
        level,
        threads: None,
    };
    let encoder = Encoder::with_options(blob, compression, options).map_err(|source| {
        LayerError::Encoder {
            compression,
            source,
        }
    })?;
    // Uncompressed, the blob writer's own sha256 is the diff id: hash the bytes once.
    Ok(match compression {
        Compression::None => DigestWriter::counting(encoder),
        _ => DigestWriter::new(encoder),
    })
}

fn commit_blob(tar: BlobPipeline, compression: Compression) -> Result<Layer, LayerError> {
    let (encoder, diff_id, uncompressed_size) = tar.finish();
    let blob = encoder.finish().map_err(LayerError::write)?;
    let info = blob.commit(None, None)?;
    Ok(Layer {
        diff_id: diff_id.unwrap_or_else(|| info.digest.clone()),
        digest: info.digest,
        size: info.size,
        uncompressed_size,
        media_type: compression.media_type(),
    })
}

/// The fields of one tar entry.
struct Entry<'a> {
    name: &'a [u8],
    kind: EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    size: u64,
    link: Option<&'a [u8]>,
    device: (u32, u32),
    xattrs: &'a [(Vec<u8>, Vec<u8>)],
}

impl<'a> Entry<'a> {
    /// An entry with the ownership, mode and (clamped) mtime of `metadata`.
    fn new(name: &'a [u8], kind: EntryType, metadata: &Metadata, mtime: u64) -> Self {
        Self {
            name,
            kind,
            mode: metadata.mode() & 0o7777,
            uid: u64::from(metadata.uid()),
            gid: u64::from(metadata.gid()),
            mtime,
            size: 0,
            link: None,
            device: (0, 0),
            xattrs: &[],
        }
    }
}

/// What the xattrs of a path say.
#[derive(Default)]
struct Xattrs {
    /// Name and value of those written to the tar, sorted by name.
    recorded: Vec<(Vec<u8>, Vec<u8>)>,
    /// An overlayfs opaque directory.
    opaque: bool,
}

struct TarWriter<'a, W: Write> {
    root: &'a Path,
    options: &'a LayerOptions,
    out: BufWriter<W>,
    /// The tar name of the first path seen of each multiply-linked inode.
    links: HashMap<(u64, u64), Vec<u8>>,
    buffer: Vec<u8>,
    xattr_names: Vec<u8>,
    xattr_value: Vec<u8>,
    entries: u64,
}

impl<'a, W: Write> TarWriter<'a, W> {
    fn new(root: &'a Path, options: &'a LayerOptions, out: W) -> Self {
        Self {
            root,
            options,
            out: BufWriter::with_capacity(64 * 1024, out),
            links: HashMap::new(),
            buffer: vec![0; COPY_BUFFER_SIZE],
            xattr_names: vec![0; XATTR_MAX],
            xattr_value: vec![0; XATTR_MAX],
            entries: 0,
        }
    }

    fn append(&mut self, path: &Path) -> Result<(), LayerError> {
        let metadata = fs::symlink_metadata(path).map_err(LayerError::io("stat", path))?;
        let file_type = metadata.file_type();
        if file_type.is_socket() {
            return Ok(());
        }
        let relative = path
            .strip_prefix(self.root)
            .expect("walkdir yields paths under its root");
        let mut name = relative.as_os_str().as_bytes().to_vec();
        let mtime = clamp_mtime(metadata.mtime(), self.options.source_date_epoch);
        let overlay = self.options.source == LayerSource::OverlayUpper;

        if overlay && file_type.is_char_device() && metadata.rdev() == 0 {
            // containerd's whiteout: an empty file owned by root with mode 0.
            let whiteout = whiteout_name(&name);
            let entry = Entry {
                mode: 0,
                uid: 0,
                gid: 0,
                ..Entry::new(&whiteout, EntryType::Regular, &metadata, mtime)
            };
            return self.write_entry(&entry, None);
        }

        let xattrs = self.read_xattrs(path, overlay && file_type.is_dir())?;
        if file_type.is_dir() {
            name.push(b'/');
            let entry = Entry {
                xattrs: &xattrs.recorded,
                ..Entry::new(&name, EntryType::Directory, &metadata, mtime)
            };
            self.write_entry(&entry, None)?;
            if xattrs.opaque {
                // Docker's opaque marker: right after its directory (an applier seeing it after
                // some children would delete them), with the directory's owner and permissions.
                let mut marker = name.clone();
                marker.extend_from_slice(OPAQUE_WHITEOUT);
                let entry = Entry {
                    mode: metadata.mode() & 0o777,
                    ..Entry::new(&marker, EntryType::Regular, &metadata, mtime)
                };
                self.write_entry(&entry, None)?;
            }
            return Ok(());
        }

        let mut entry = Entry {
            xattrs: &xattrs.recorded,
            ..Entry::new(&name, EntryType::Regular, &metadata, mtime)
        };
        // A second path of an inode becomes a hardlink to the first (containerd's
        // `GetLinkInfo`: any non-directory with more than one link).
        let first_path;
        if metadata.nlink() > 1 {
            match self.links.get(&(metadata.dev(), metadata.ino())) {
                Some(first) => {
                    first_path = first.clone();
                    entry.kind = EntryType::Link;
                    entry.link = Some(&first_path);
                    return self.write_entry(&entry, None);
                }
                None => {
                    self.links
                        .insert((metadata.dev(), metadata.ino()), name.clone());
                }
            }
        }
        let target;
        if file_type.is_file() {
            entry.size = metadata.len();
            let file = open_regular(path, &metadata)?;
            return self.write_entry(&entry, Some((file, path)));
        } else if file_type.is_symlink() {
            target = fs::read_link(path).map_err(LayerError::io("read link", path))?;
            entry.kind = EntryType::Symlink;
            entry.link = Some(target.as_os_str().as_bytes());
        } else if file_type.is_char_device() || file_type.is_block_device() {
            entry.kind = if file_type.is_char_device() {
                EntryType::Char
            } else {
                EntryType::Block
            };
            let device = metadata.rdev();
            entry.device = (rustix::fs::major(device), rustix::fs::minor(device));
        } else if file_type.is_fifo() {
            entry.kind = EntryType::Fifo;
        }
        self.write_entry(&entry, None)
    }

    /// Reads the xattrs of `path`: those recorded in the tar, and (for a directory of an
    /// overlayfs upper dir) whether it is opaque.
    fn read_xattrs(&mut self, path: &Path, overlay_directory: bool) -> Result<Xattrs, LayerError> {
        let overlay = self.options.source == LayerSource::OverlayUpper;
        let length = match rustix::fs::llistxattr(path, &mut self.xattr_names[..]) {
            Ok(length) => length,
            Err(Errno::NOTSUP) => 0,
            Err(errno) => return Err(LayerError::io("list xattrs of", path)(errno.into())),
        };
        let mut xattrs = Xattrs::default();
        let mut names = &self.xattr_names[..length];
        while let Ok(name) = CStr::from_bytes_until_nul(names) {
            names = &names[name.to_bytes_with_nul().len()..];
            let bytes = name.to_bytes();
            let overlay_name = overlay_xattr(bytes);
            let wanted = match overlay_name {
                Some(b"opaque") => overlay_directory,
                Some(b"redirect" | b"metacopy") if overlay => {
                    return Err(LayerError::UnsupportedOverlay {
                        path: path.to_path_buf(),
                        xattr: String::from_utf8_lossy(bytes).into_owned(),
                    });
                }
                Some(_) => false,
                None => is_recorded_xattr(bytes),
            };
            if !wanted {
                continue;
            }
            let length = match rustix::fs::lgetxattr(path, name, &mut self.xattr_value[..]) {
                Ok(length) => length,
                // Removed since it was listed.
                Err(Errno::NODATA) => continue,
                Err(errno) => return Err(LayerError::io("read xattrs of", path)(errno.into())),
            };
            let value = &self.xattr_value[..length];
            if overlay_name.is_some() {
                xattrs.opaque |= value == b"y";
            } else {
                xattrs.recorded.push((bytes.to_vec(), value.to_vec()));
            }
        }
        xattrs.recorded.sort();
        Ok(xattrs)
    }

    fn write_entry(
        &mut self,
        entry: &Entry<'_>,
        content: Option<(File, &Path)>,
    ) -> Result<(), LayerError> {
        write_header(&mut self.out, entry).map_err(LayerError::write)?;
        if let Some((mut file, path)) = content {
            copy_exact(&mut file, entry.size, &mut self.out, &mut self.buffer, path)?;
            write_padding(&mut self.out, entry.size).map_err(LayerError::write)?;
        }
        self.entries += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<u64, LayerError> {
        // The end of the archive: two zero blocks (Go and the tar crate write no more).
        self.out
            .write_all(&[0; 2 * BLOCK_SIZE])
            .map_err(LayerError::write)?;
        let mut out = self
            .out
            .into_inner()
            .map_err(|error| LayerError::write(error.into_error()))?;
        out.flush().map_err(LayerError::write)?;
        Ok(self.entries)
    }
}

/// Opens a regular file found by the walk, without following a symlink or blocking on a FIFO
/// swapped in since, and checks it is still the inode the walk saw.
fn open_regular(path: &Path, metadata: &Metadata) -> Result<File, LayerError> {
    let flags = OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)
        .map_err(LayerError::io("open", path))?;
    let opened = file.metadata().map_err(LayerError::io("stat", path))?;
    if !opened.is_file() || opened.dev() != metadata.dev() || opened.ino() != metadata.ino() {
        return Err(LayerError::FileChanged {
            path: path.to_path_buf(),
            change: "it was replaced".to_string(),
        });
    }
    Ok(file)
}

/// Copies exactly `size` bytes of `file` into the tar; a file that ends sooner or goes on is an
/// error (the header with its size is already written).
fn copy_exact(
    file: &mut impl Read,
    size: u64,
    out: &mut impl Write,
    buffer: &mut [u8],
    path: &Path,
) -> Result<(), LayerError> {
    let changed = |change: String| LayerError::FileChanged {
        path: path.to_path_buf(),
        change,
    };
    let mut remaining = size;
    while remaining > 0 {
        let wanted = buffer
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        let read = match file.read(&mut buffer[..wanted]) {
            Ok(0) => {
                return Err(changed(format!(
                    "{size} bytes when listed, {} when read",
                    size - remaining
                )));
            }
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(LayerError::Io {
                    action: "read",
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        out.write_all(&buffer[..read]).map_err(LayerError::write)?;
        remaining -= read as u64;
    }
    loop {
        match file.read(&mut buffer[..1]) {
            Ok(0) => return Ok(()),
            Ok(_) => return Err(changed(format!("{size} bytes when listed, more when read"))),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(LayerError::Io {
                    action: "read",
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}

/// Writes the PAX header `entry` needs, if any, then its ustar header.
fn write_header(out: &mut impl Write, entry: &Entry<'_>) -> io::Result<()> {
    let mut records = Vec::new();
    if needs_pax(entry.name) {
        pax_record(&mut records, b"path", entry.name);
    }
    if let Some(link) = entry.link
        && needs_pax(link)
    {
        pax_record(&mut records, b"linkpath", link);
    }
    for (key, value) in [(b"uid", entry.uid), (b"gid", entry.gid)] {
        if value >= USTAR_ID_LIMIT {
            pax_record(&mut records, key, value.to_string().as_bytes());
        }
    }
    if entry.size >= USTAR_SIZE_LIMIT {
        pax_record(&mut records, b"size", entry.size.to_string().as_bytes());
    }
    for (name, value) in entry.xattrs {
        pax_record(&mut records, &[PAX_XATTR_PREFIX, name].concat(), value);
    }
    if !records.is_empty() {
        // Go's extended header: `DIR/PaxHeaders.0/BASE`, all numbers zero.
        let mut header = ustar_header(&pax_header_name(entry.name), EntryType::XHeader);
        header.set_mode(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(records.len() as u64);
        header.set_cksum();
        out.write_all(header.as_bytes())?;
        out.write_all(&records)?;
        write_padding(out, records.len() as u64)?;
    }
    let mut header = ustar_header(entry.name, entry.kind);
    header.set_mode(entry.mode);
    header.set_uid(entry.uid);
    header.set_gid(entry.gid);
    header.set_mtime(entry.mtime);
    header.set_size(entry.size);
    if let Some(link) = entry.link {
        set_field(
            &mut header.as_ustar_mut().expect("a ustar header").linkname,
            link,
        );
    }
    header
        .set_device_major(entry.device.0)
        .expect("a ustar header has device numbers");
    header
        .set_device_minor(entry.device.1)
        .expect("a ustar header has device numbers");
    header.set_cksum();
    out.write_all(header.as_bytes())
}

fn ustar_header(name: &[u8], kind: EntryType) -> Header {
    let mut header = Header::new_ustar();
    set_field(
        &mut header.as_ustar_mut().expect("a ustar header").name,
        name,
    );
    header.set_entry_type(kind);
    header
}

/// Fills a header string field; a longer value is cut (its full form is in a PAX record).
fn set_field(field: &mut [u8], value: &[u8]) {
    let length = value.len().min(field.len());
    field[..length].copy_from_slice(&value[..length]);
}

/// Whether a name or link target needs a PAX record: ustar fields hold 100 bytes, and PAX
/// records are the place for non-ASCII names (Go's rule).
fn needs_pax(value: &[u8]) -> bool {
    value.len() > 100 || !value.is_ascii()
}

/// Appends one PAX record, `LENGTH KEY=VALUE\n`, where LENGTH counts the whole record including
/// its own digits (POSIX pax, "extended header").
fn pax_record(records: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = key.len() + value.len() + 3;
    let mut length = rest + 1;
    while length != rest + decimal_digits(length) {
        length = rest + decimal_digits(length);
    }
    records.extend_from_slice(length.to_string().as_bytes());
    records.push(b' ');
    records.extend_from_slice(key);
    records.push(b'=');
    records.extend_from_slice(value);
    records.push(b'\n');
}

fn decimal_digits(number: usize) -> usize {
    number.to_string().len()
}

/// `DIR/PaxHeaders.0/BASE` for the entry `DIR/BASE` (what Go names extended headers), ASCII
/// only.
fn pax_header_name(name: &[u8]) -> Vec<u8> {
    let trimmed = name.strip_suffix(b"/").unwrap_or(name);
    let split = trimmed
        .iter()
        .rposition(|&byte| byte == b'/')
        .map_or(0, |slash| slash + 1);
    let mut header_name = trimmed[..split].to_vec();
    header_name.extend_from_slice(b"PaxHeaders.0/");
    header_name.extend_from_slice(&trimmed[split..]);
    header_name.retain(u8::is_ascii);
    header_name
}

fn write_padding(out: &mut impl Write, size: u64) -> io::Result<()> {
    let partial = (size % BLOCK_SIZE as u64) as usize;
    if partial == 0 {
        return Ok(());
    }
    out.write_all(&[0; BLOCK_SIZE][partial..])
}

/// `DIR/.wh.NAME` for `DIR/NAME`.
fn whiteout_name(name: &[u8]) -> Vec<u8> {
    let split = name
        .iter()
        .rposition(|&byte| byte == b'/')
        .map_or(0, |slash| slash + 1);
    [&name[..split], WHITEOUT_PREFIX, &name[split..]].concat()
}

/// The mtime written: whole seconds, at most the epoch when one is given, never negative.
fn clamp_mtime(mtime: i64, source_date_epoch: Option<i64>) -> u64 {
    let clamped = source_date_epoch.map_or(mtime, |epoch| mtime.min(epoch));
    u64::try_from(clamped).unwrap_or(0)
}

/// The feature an overlayfs-private xattr names (`trusted.overlay.X` or, with `userxattr`,
/// `user.overlay.X`).
fn overlay_xattr(name: &[u8]) -> Option<&[u8]> {
    name.strip_prefix(b"trusted.overlay.")
        .or_else(|| name.strip_prefix(b"user.overlay."))
}

/// Whether an xattr belongs in the layer: user data and file capabilities, not overlayfs state
/// (caught before this) nor host-specific labels.
fn is_recorded_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.") || name == b"security.capability"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(key: &str, value: &[u8]) -> Vec<u8> {
        let mut records = Vec::new();
        pax_record(&mut records, key.as_bytes(), value);
        records
    }

    #[test]
    fn pax_record_lengths_count_their_own_digits() {
        assert_eq!(records("path", b"a"), b"9 path=a\n");
        // 4 + 91 + 3 = 98 bytes besides the length: two digits would make 100, which has three.
        let record = records("path", &[b'x'; 91]);
        assert_eq!(record.len(), 101);
        assert!(record.starts_with(b"101 path="));
        let record = records("path", &[b'x'; 90]);
        assert_eq!(record.len(), 99);
        assert!(record.starts_with(b"99 path="));
    }

    #[test]
    fn long_and_non_ascii_names_go_to_pax_records() {
        let long = [b'n'; 150];
        let mut out = Vec::new();
        let entry = Entry {
            name: &long,
            kind: EntryType::Regular,
            mode: 0o644,
            uid: 3_000_000,
            gid: 0,
            mtime: 0,
            size: 0,
            link: Some("zielö".as_bytes()),
            device: (0, 0),
            xattrs: &[],
        };
        write_header(&mut out, &entry).unwrap();
        assert_eq!(out.len(), 3 * BLOCK_SIZE);
        let pax = Header::from_byte_slice(&out[..BLOCK_SIZE]);
        assert_eq!(pax.entry_type(), EntryType::XHeader);
        let expected = format!("PaxHeaders.0/{}", "n".repeat(100 - 13));
        assert_eq!(pax.path_bytes().as_ref(), expected.as_bytes());
        let body = &out[BLOCK_SIZE..2 * BLOCK_SIZE];
        let text = String::from_utf8_lossy(body);
        assert!(
            text.contains(&format!("path={}\n", "n".repeat(150))),
            "{text}"
        );
        assert!(text.contains("linkpath=zielö\n"), "{text}");
        assert!(text.contains("uid=3000000\n"), "{text}");
        let header = Header::from_byte_slice(&out[2 * BLOCK_SIZE..]);
        assert_eq!(header.path_bytes().len(), 100);
        assert_eq!(header.uid().unwrap(), 3_000_000);
        assert!(header.cksum().is_ok());
    }

    #[test]
    fn short_ascii_names_need_no_pax_header() {
        let mut out = Vec::new();
        let entry = Entry {
            name: b"usr/bin/",
            kind: EntryType::Directory,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 1,
            size: 0,
            link: None,
            device: (0, 0),
            xattrs: &[],
        };
        write_header(&mut out, &entry).unwrap();
        assert_eq!(out.len(), BLOCK_SIZE);
        let header = Header::from_byte_slice(&out);
        assert_eq!(header.path_bytes().as_ref(), b"usr/bin/");
        assert_eq!(header.as_ustar().unwrap().magic, *b"ustar\0");
        assert_eq!(header.username_bytes(), Some(&b""[..]));
    }

    #[test]
    fn names_of_whiteouts_and_extended_headers() {
        assert_eq!(whiteout_name(b"etc/passwd"), b"etc/.wh.passwd");
        assert_eq!(whiteout_name(b"top"), b".wh.top");
        assert_eq!(pax_header_name(b"a/b/c"), b"a/b/PaxHeaders.0/c");
        assert_eq!(pax_header_name(b"a/dir/"), b"a/PaxHeaders.0/dir");
        assert_eq!(pax_header_name("é".as_bytes()), b"PaxHeaders.0/");
    }

    #[test]
    fn mtimes_are_clamped_to_the_epoch_and_never_negative() {
        assert_eq!(clamp_mtime(2_000_000_000, Some(1_000)), 1_000);
        assert_eq!(clamp_mtime(500, Some(1_000)), 500);
        assert_eq!(clamp_mtime(2_000_000_000, None), 2_000_000_000);
        assert_eq!(clamp_mtime(-5, None), 0);
    }

    #[test]
    fn xattr_filter_keeps_user_data_and_capabilities_only() {
        assert!(is_recorded_xattr(b"user.mime_type"));
        assert!(is_recorded_xattr(b"security.capability"));
        assert!(!is_recorded_xattr(b"security.selinux"));
        assert!(!is_recorded_xattr(b"trusted.md5"));
        assert!(!is_recorded_xattr(b"system.posix_acl_access"));
        assert_eq!(overlay_xattr(b"user.overlay.opaque"), Some(&b"opaque"[..]));
        assert_eq!(
            overlay_xattr(b"trusted.overlay.redirect"),
            Some(&b"redirect"[..])
        );
        assert_eq!(overlay_xattr(b"user.overlayish"), None);
    }

    #[test]
    fn a_file_shorter_or_longer_than_listed_is_an_error_naming_it() {
        let path = Path::new("/tree/etc/hosts");
        let mut buffer = vec![0; 4];
        let mut out = Vec::new();
        copy_exact(&mut &b"0123456789"[..], 10, &mut out, &mut buffer, path).unwrap();
        assert_eq!(out, b"0123456789");
        for (content, expected) in [
            (&b"01234"[..], "10 bytes when listed, 5 when read"),
            (b"0123456789X", "more when read"),
        ] {
            let error =
                copy_exact(&mut &content[..], 10, &mut Vec::new(), &mut buffer, path).unwrap_err();
            assert!(matches!(error, LayerError::FileChanged { .. }), "{error}");
            let message = error.to_string();
            assert!(
                message.contains("/tree/etc/hosts") && message.contains(expected),
                "{message}"
            );
        }
    }
}
