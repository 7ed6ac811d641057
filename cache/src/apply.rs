//! Applying (unpacking) an uncompressed OCI or Docker layer tar into a directory, safe against
//! hostile archives.
//!
//! The tar is parsed with the `tar` crate (GNU long names, PAX `path`/`linkpath`/`size`/`uid`/
//! `gid` and GNU sparse files are handled there), but nothing is unpacked with it: every file is
//! created here with fd-relative system calls, because a layer is untrusted input and
//! path-based unpacking through symlinks is how breakouts such as tar-rs's own
//! (RUSTSEC-2018-0002) and `docker cp`'s (CVE-2018-15664) happened.
//!
//! - The target directory is opened once. Every entry's parent directory is resolved from it
//!   with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, so absolute symlinks and `..`
//!   resolve inside the target as if it were a chroot. Missing parents are created one
//!   component at a time (mode 0755); a dangling symlink on the way is followed by hand, still
//!   inside the target, and the directory it names is created — as containerd's `RootPath` +
//!   `MkdirAll` does.
//! - The final component is never followed: it is examined with `AT_SYMLINK_NOFOLLOW`, replaced
//!   by unlinking (or by removing a directory tree fd-relatively, never following a symlink),
//!   and created with `O_CREAT | O_EXCL | O_NOFOLLOW`, `mkdirat`, `symlinkat`, `linkat` without
//!   `AT_SYMLINK_FOLLOW` or `mknodat`. Ownership, mode, xattrs and times are set on a file
//!   descriptor of the object itself (opened `O_NOFOLLOW`), or with `AT_SYMLINK_NOFOLLOW`, so
//!   nothing is ever chmod-ed or chown-ed through a symlink.
//! - An entry name with a `..` component is refused as a breakout (as moby does), and so is a
//!   hardlink whose target has one; the whole apply fails and nothing outside the target is
//!   touched. Leading `/` and `./` are stripped. An entry naming the target itself (`.`, `./`,
//!   `/`) must be a directory; its owner, mode, xattrs and times are applied to the target.
//! - Character and block devices are never created from a layer (an image must not be able to
//!   plant `/dev/sda` in a build's root filesystem); they are listed in
//!   [`ApplyReport::skipped`]. Overlay whiteouts, which are character devices 0/0, are made from
//!   `.wh.` entries, never from device entries.
//! - Of the PAX `SCHILY.xattr.*` records only `user.*` and `security.capability` are applied;
//!   `trusted.overlay.*` would let a layer forge whiteouts and opaque directories in an overlay
//!   mount. Others are listed in [`ApplyReport::skipped`], as are xattrs on symlinks and FIFOs
//!   (Linux allows no `user.*` there) and xattrs the target filesystem does not support.
//! - A truncated archive is an error, including one that ends inside a file's content (the
//!   `tar` crate itself just ends the content early there).
//! - Limitation: the `tar` crate reads GNU long-name and PAX records into memory whole, with no
//!   size limit.
//! - GNU sparse entries are expanded by the `tar` crate and written out in full (holes become
//!   zeros on disk). PAX-format sparse files (`GNU.sparse.*`) are not understood by the crate
//!   and come out as their raw sparse map plus data, as with any tar reader without support.
//!
//! Whiteouts follow the OCI image spec ("Whiteouts" in `layer.md`): `.wh.NAME` hides NAME and
//! `.wh..wh..opq` hides everything below the directory that came from lower layers.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{
    self as sys, AtFlags, Dir, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps,
    Uid, XattrFlags,
};
use rustix::io::Errno;
use tar::EntryType;

/// Size of the read buffer in front of the archive and of the file-content copy buffer.
const BUFFER_SIZE: usize = 256 * 1024;
/// How many symlinks creating one parent path may follow by hand (the kernel's `MAXSYMLINKS`).
const MAX_SYMLINKS: usize = 40;
/// How often an `openat2` that failed with `EAGAIN` (a concurrent rename) is retried.
const OPENAT2_RETRIES: usize = 16;
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";
const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

/// How whiteout entries are turned into files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhiteoutMode {
    /// Flat tree: `.wh.NAME` deletes NAME (recursively) from the target; `.wh..wh..opq` empties
    /// the directory of everything that was there before this layer (entries this same layer
    /// wrote in that directory, before or after the opaque marker, are kept).
    Apply,
    /// One directory per layer for an overlayfs lowerdir: `.wh.NAME` becomes a character device
    /// 0/0 named NAME, `.wh..wh..opq` sets the xattr `trusted.overlay.opaque=y` on the directory.
    Overlay,
}

/// How to apply a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyOptions {
    /// What whiteout entries turn into.
    pub whiteouts: WhiteoutMode,
    /// Whether to set each file's owner from the archive (needs root, or a user namespace that
    /// maps the ids).
    pub chown: bool,
}

impl ApplyOptions {
    /// Options with `whiteouts`, chowning when the process runs as root.
    pub fn new(whiteouts: WhiteoutMode) -> Self {
        Self {
            whiteouts,
            chown: rustix::process::geteuid().is_root(),
        }
    }
}

/// What applying a layer did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Archive entries handled (including whiteouts and skipped entries, not counting PAX
    /// global headers).
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
    /// Entries, or parts of entries, that were deliberately not applied.
    pub skipped: Vec<Skipped>,
}

/// Something in the archive that was not applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The entry's name as the archive spells it.
    pub path: PathBuf,
    /// Why it was skipped.
    pub reason: SkipReason,
}

/// Why an entry, or an attribute of one, was not applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// A character device: images may not create device nodes.
    CharacterDevice {
        /// The device's major number.
        major: u32,
        /// The device's minor number.
        minor: u32,
    },
    /// A block device: images may not create device nodes.
    BlockDevice {
        /// The device's major number.
        major: u32,
        /// The device's minor number.
        minor: u32,
    },
    /// An xattr outside the namespaces a layer may set (`user.*`, `security.capability`).
    DisallowedXattr {
        /// The xattr's name.
        name: String,
    },
    /// An xattr on a symlink or FIFO: Linux allows no `user.*` xattrs there (xattr(7)) and
    /// rbuild sets none.
    XattrOnSpecialFile {
        /// The xattr's name.
        name: String,
    },
    /// An xattr the target filesystem does not support.
    XattrNotSupported {
        /// The xattr's name.
        name: String,
    },
}

impl fmt::Display for SkipReason {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CharacterDevice { major, minor } => {
                write!(
                    formatter,
                    "character device {major}:{minor} is not created from a layer"
                )
            }
            Self::BlockDevice { major, minor } => {
                write!(
                    formatter,
                    "block device {major}:{minor} is not created from a layer"
                )
            }
            Self::DisallowedXattr { name } => {
                write!(
                    formatter,
                    "xattr {name} is outside the namespaces a layer may set"
                )
            }
            Self::XattrOnSpecialFile { name } => {
                write!(formatter, "xattr {name} is on a symlink or fifo")
            }
            Self::XattrNotSupported { name } => {
                write!(
                    formatter,
                    "xattr {name} is not supported by the target filesystem"
                )
            }
        }
    }
}

/// What can go wrong applying a layer.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The target directory could not be opened.
    #[error("open target directory {path}")]
    OpenTarget {
        /// The target directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The archive could not be read (truncated, corrupt header, I/O error).
    #[error("read layer archive after {entries} entries")]
    Archive {
        /// Entries handled before the failure.
        entries: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An entry's header fields or PAX records could not be parsed.
    #[error("read header of layer entry {path}")]
    Header {
        /// The entry.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An entry's content could not be read from the archive.
    #[error("read content of layer entry {path}")]
    ReadContent {
        /// The entry.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An entry name has a `..` component.
    #[error("layer entry {path} escapes the target directory (breakout)")]
    Breakout {
        /// The entry as the archive names it.
        path: PathBuf,
    },
    /// A hardlink's target has a `..` component.
    #[error("hardlink {path} points to {target}, outside the target directory (breakout)")]
    HardlinkBreakout {
        /// The hardlink.
        path: PathBuf,
        /// Its target as the archive names it.
        target: PathBuf,
    },
    /// A hardlink entry has no link name.
    #[error("hardlink {path} has no link target")]
    MissingHardlinkName {
        /// The hardlink.
        path: PathBuf,
    },
    /// A hardlink's target is the target directory itself.
    #[error("hardlink {path} points to the target directory itself")]
    HardlinkToRoot {
        /// The hardlink.
        path: PathBuf,
    },
    /// A hardlink's target does not exist (yet) in the tree.
    #[error("hardlink {path} points to {target}, which does not exist")]
    MissingHardlinkTarget {
        /// The hardlink.
        path: PathBuf,
        /// Its target as the archive names it.
        target: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A `.wh.` name that is no valid whiteout (`.wh..wh.` other than `.wh..wh..opq`, or a
    /// whiteout of `.` or `..`).
    #[error("layer entry {path} is an invalid whiteout")]
    InvalidWhiteout {
        /// The entry.
        path: PathBuf,
    },
    /// A non-directory entry names the target directory itself.
    #[error("layer entry {path} names the target directory but is not a directory")]
    RootNotDirectory {
        /// The entry.
        path: PathBuf,
    },
    /// An entry type rbuild does not apply (tape volume headers, GNU dump directories, ...).
    #[error("layer entry {path} has unsupported type {entry_type:?}")]
    UnsupportedType {
        /// The entry.
        path: PathBuf,
        /// The type flag byte, as a character.
        entry_type: char,
    },
    /// An owner that does not fit Linux's 32-bit ids.
    #[error("layer entry {path} has owner {uid}:{gid}, out of range")]
    InvalidOwner {
        /// The entry.
        path: PathBuf,
        /// The user id in the archive.
        uid: u64,
        /// The group id in the archive.
        gid: u64,
    },
    /// Setting an allowed xattr failed.
    #[error("set xattr {name} on {path}")]
    Xattr {
        /// The entry.
        path: PathBuf,
        /// The xattr.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A filesystem operation for an entry failed.
    #[error("{action} {path}")]
    Io {
        /// What rbuild was doing.
        action: &'static str,
        /// The entry as the archive names it (or a directory, for the final timestamps).
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn fail<E: Into<io::Error>>(action: &'static str, path: &Path) -> impl FnOnce(E) -> ApplyError {
    move |source| ApplyError::Io {
        action,
        path: path.to_path_buf(),
        source: source.into(),
    }
}

/// Applies the uncompressed layer tar `tar` to the existing directory `target`.
///
/// On error the target is left partly applied (the caller discards it); nothing outside it has
/// been touched.
#[tracing::instrument(skip_all, fields(target = %target.display()))]
pub fn apply_layer(
    tar: impl Read,
    target: &Path,
    options: &ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    let root = sys::openat(
        sys::CWD,
        target,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|source| ApplyError::OpenTarget {
        path: target.to_path_buf(),
        source: source.into(),
    })?;
    let mut applier = Applier {
        root,
        options,
        report: ApplyReport::default(),
        cached_parent: None,
        written: HashMap::new(),
        directories: Vec::new(),
        buffer: vec![0; BUFFER_SIZE],
    };
    let mut archive = tar::Archive::new(BufReader::with_capacity(BUFFER_SIZE, tar));
    let entries = archive
        .entries()
        .map_err(|source| ApplyError::Archive { entries: 0, source })?;
    for entry in entries {
        let mut entry = entry.map_err(|source| ApplyError::Archive {
            entries: applier.report.entries,
            source,
        })?;
        applier.apply_entry(&mut entry)?;
    }
    applier.finish()
}

/// The parts of a header applied as metadata.
struct EntryMetadata {
    mode: u32,
    uid: Uid,
    gid: Gid,
    times: Timestamps,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl EntryMetadata {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>, raw: &Path) -> Result<Self, ApplyError> {
        let header_error = |source| ApplyError::Header {
            path: raw.to_path_buf(),
            source,
        };
        let header = entry.header();
        let mode = header.mode().map_err(header_error)? & 0o7777;
        let uid = header.uid().map_err(header_error)?;
        let gid = header.gid().map_err(header_error)?;
        let mtime = header.mtime().map_err(header_error)?;
        let (Ok(raw_uid), Ok(raw_gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
            return Err(ApplyError::InvalidOwner {
                path: raw.to_path_buf(),
                uid,
                gid,
            });
        };
        let mut modification = Timespec {
            tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
            tv_nsec: 0,
        };
        let mut access = None;
        let mut xattrs = Vec::new();
        if let Some(extensions) = entry.pax_extensions().map_err(header_error)? {
            for extension in extensions {
                let extension = extension.map_err(header_error)?;
                let key = extension.key_bytes();
                if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                    xattrs.push((name.to_vec(), extension.value_bytes().to_vec()));
                } else if key == b"mtime" {
                    // PAX times carry sub-second precision the ustar field lacks (POSIX pax,
                    // "pax Extended Header Keyword Definitions").
                    if let Some(time) = parse_pax_time(extension.value_bytes()) {
                        modification = time;
                    }
                } else if key == b"atime" {
                    access = parse_pax_time(extension.value_bytes());
                }
            }
        }
        Ok(Self {
            mode,
            uid: Uid::from_raw(raw_uid),
            gid: Gid::from_raw(raw_gid),
            times: Timestamps {
                last_access: access.unwrap_or(modification),
                last_modification: modification,
            },
            xattrs,
        })
    }
}

/// Parses a PAX time (`[-]seconds[.fraction]`).
fn parse_pax_time(value: &[u8]) -> Option<Timespec> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (seconds, fraction) = text.split_once('.').unwrap_or((text, ""));
    if seconds.is_empty() || !seconds.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds: i64 = seconds.parse().ok()?;
    let mut nanoseconds: i64 = 0;
    for (index, digit) in fraction.bytes().take(9).enumerate() {
        nanoseconds += i64::from(digit - b'0') * 10_i64.pow(8 - index as u32);
    }
    Some(if !negative {
        Timespec {
            tv_sec: seconds,
            tv_nsec: nanoseconds,
        }
    } else if nanoseconds == 0 {
        Timespec {
            tv_sec: -seconds,
            tv_nsec: 0,
        }
    } else {
        Timespec {
            tv_sec: -seconds - 1,
            tv_nsec: 1_000_000_000 - nanoseconds,
        }
    })
}

/// The entry name relative to the target: leading `/` and `.` components dropped, `None` if
/// a component is `..`.
fn clean(raw: &Path) -> Option<PathBuf> {
    let mut path = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(name) => path.push(name),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(path)
}

/// Opens `path` resolved inside `root` as in a chroot.
fn open_in_root(root: BorrowedFd<'_>, path: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
    let path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    let mut attempts = 0;
    loop {
        match sys::openat2(
            root,
            path,
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        ) {
            // openat2 with RESOLVE_IN_ROOT fails with EAGAIN when a rename raced with a `..`
            // lookup; retrying is what the man page asks for.
            Err(Errno::AGAIN) if attempts < OPENAT2_RETRIES => attempts += 1,
            result => return result,
        }
    }
}

/// Identifies a directory: device and inode.
type DirectoryKey = (u64, u64);

fn key_of(fd: BorrowedFd<'_>) -> Result<DirectoryKey, Errno> {
    let stat = sys::fstat(fd)?;
    Ok((stat.st_dev, stat.st_ino))
}

/// A resolved parent directory.
struct Parent {
    path: PathBuf,
    fd: OwnedFd,
    key: DirectoryKey,
}

/// A directory whose times are set when every entry is written.
struct DirectoryTimes {
    path: PathBuf,
    key: DirectoryKey,
    times: Timestamps,
}

/// The names an entry splits into.
struct Target<'a> {
    /// As the archive spells it, for messages.
    raw: &'a Path,
    /// Relative to the target directory.
    path: &'a Path,
    parent: &'a Path,
    name: &'a OsStr,
}

struct Applier<'a> {
    /// The target directory, opened `O_RDONLY | O_DIRECTORY`.
    root: OwnedFd,
    options: &'a ApplyOptions,
    report: ApplyReport,
    /// The last parent directory resolved; consecutive entries usually share one. Dropped
    /// whenever a directory or symlink is removed, since that can change what a path resolves
    /// to.
    cached_parent: Option<Rc<Parent>>,
    /// In [`WhiteoutMode::Apply`], the names this layer wrote, per directory, so an opaque
    /// whiteout keeps them.
    written: HashMap<DirectoryKey, HashSet<OsString>>,
    directories: Vec<DirectoryTimes>,
    buffer: Vec<u8>,
}

impl Applier<'_> {
    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ApplyError> {
        let raw = PathBuf::from(OsStr::from_bytes(&entry.path_bytes()));
        let mut entry_type = entry.header().entry_type();
        if entry_type.is_pax_global_extensions() {
            tracing::debug!(path = %raw.display(), "ignoring pax global header");
            return Ok(());
        }
        self.report.entries += 1;
        // Pre-POSIX archives mark directories with a trailing slash on an old-style (NUL
        // type flag) regular entry, as Go's archive/tar reads them.
        if entry.header().as_old().linkflag[0] == 0 && raw.as_os_str().as_bytes().ends_with(b"/") {
            entry_type = EntryType::Directory;
        }
        let Some(path) = clean(&raw) else {
            return Err(ApplyError::Breakout { path: raw });
        };
        let metadata = EntryMetadata::read(entry, &raw)?;
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return self.apply_root(entry_type, &raw, &metadata);
        };
        let target = Target {
            raw: &raw,
            path: &path,
            parent,
            name,
        };
        if name.as_bytes().starts_with(WHITEOUT_PREFIX) {
            return self.apply_whiteout(&target, &metadata);
        }
        match entry_type {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                // For GNU sparse entries the tar crate reports the expanded size.
                let size = entry.size();
                self.write_file(entry, size, &target, &metadata)
            }
            EntryType::Directory => self.make_directory(&target, &metadata),
            EntryType::Symlink => {
                let link = entry.link_name_bytes().unwrap_or_default().into_owned();
                self.make_symlink(&target, &link, &metadata)
            }
            EntryType::Link => {
                let Some(link) = entry.link_name_bytes() else {
                    return Err(ApplyError::MissingHardlinkName { path: raw.clone() });
                };
                let link = PathBuf::from(OsStr::from_bytes(&link));
                self.make_hardlink(&target, &link)
            }
            EntryType::Fifo => self.make_fifo(&target, &metadata),
            EntryType::Char | EntryType::Block => {
                let header = entry.header();
                let header_error = |source| ApplyError::Header {
                    path: raw.clone(),
                    source,
                };
                let major = header.device_major().map_err(header_error)?.unwrap_or(0);
                let minor = header.device_minor().map_err(header_error)?.unwrap_or(0);
                let reason = if entry_type == EntryType::Char {
                    SkipReason::CharacterDevice { major, minor }
                } else {
                    SkipReason::BlockDevice { major, minor }
                };
                self.skip(&raw, reason);
                Ok(())
            }
            other => Err(ApplyError::UnsupportedType {
                path: raw.clone(),
                entry_type: char::from(other.as_byte()),
            }),
        }
    }

    fn skip(&mut self, raw: &Path, reason: SkipReason) {
        tracing::debug!(path = %raw.display(), %reason, "skipped");
        self.report.skipped.push(Skipped {
            path: raw.to_path_buf(),
            reason,
        });
    }

    /// The parent directory `path`, resolved in the root; created when `create` is set.
    fn parent(&mut self, path: &Path, create: bool) -> Result<Rc<Parent>, Errno> {
        if let Some(cached) = &self.cached_parent
            && cached.path == path
        {
            return Ok(Rc::clone(cached));
        }
        let flags = OFlags::PATH | OFlags::DIRECTORY;
        let fd = match open_in_root(self.root.as_fd(), path, flags) {
            Ok(fd) => fd,
            Err(Errno::NOENT) if create => self.create_directories(path)?,
            Err(error) => return Err(error),
        };
        let key = key_of(fd.as_fd())?;
        let parent = Rc::new(Parent {
            path: path.to_path_buf(),
            fd,
            key,
        });
        self.cached_parent = Some(Rc::clone(&parent));
        Ok(parent)
    }

    /// Creates the missing directories of `path`, one component at a time, each resolved in
    /// the root. A dangling symlink on the way is followed (inside the root) and the directory
    /// it names is created, like `mkdir -p` in a chroot.
    fn create_directories(&self, path: &Path) -> Result<OwnedFd, Errno> {
        enum Step {
            Root,
            Name(OsString),
        }
        let root = self.root.as_fd();
        let mut pending: Vec<Step> = path
            .components()
            .rev()
            .map(|c| Step::Name(c.as_os_str().to_owned()))
            .collect();
        let mut resolved = PathBuf::new();
        let mut current = open_in_root(root, &resolved, OFlags::PATH | OFlags::DIRECTORY)?;
        let mut symlinks = 0;
        while let Some(step) = pending.pop() {
            let name = match step {
                Step::Root => {
                    resolved.clear();
                    current = open_in_root(root, &resolved, OFlags::PATH | OFlags::DIRECTORY)?;
                    continue;
                }
                Step::Name(name) => name,
            };
            // `resolved` is spelled as the archive and symlinks spell it; the kernel resolves
            // it again (in the root) each time, so `..` after a symlink means what it means
            // in a path walk.
            let candidate = resolved.join(&name);
            match open_in_root(root, &candidate, OFlags::PATH | OFlags::DIRECTORY) {
                Ok(fd) => {
                    resolved = candidate;
                    current = fd;
                    continue;
                }
                Err(Errno::NOENT) => {}
                Err(error) => return Err(error),
            }
            match sys::mkdirat(&current, &name, Mode::from_raw_mode(0o755)) {
                Ok(()) => {
                    let flags =
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                    let created = sys::openat(&current, &name, flags, Mode::empty())?;
                    // mkdirat's mode is cut by the umask.
                    sys::fchmod(&created, Mode::from_raw_mode(0o755))?;
                    resolved = candidate;
                    current = created;
                    continue;
                }
                Err(Errno::EXIST) => {}
                Err(error) => return Err(error),
            }
            // The name exists but does not resolve to a directory: a symlink to something
            // missing. Follow it by hand.
            symlinks += 1;
            if symlinks > MAX_SYMLINKS {
                return Err(Errno::LOOP);
            }
            let target = sys::readlinkat(&current, &name, Vec::new())?;
            let target = PathBuf::from(OsString::from_vec(target.into_bytes()));
            for component in target.components().rev() {
                match component {
                    Component::RootDir | Component::Prefix(_) => pending.push(Step::Root),
                    Component::CurDir => {}
                    Component::ParentDir | Component::Normal(_) => {
                        pending.push(Step::Name(component.as_os_str().to_owned()));
                    }
                }
            }
        }
        Ok(current)
    }

    /// Clears `name` in `parent` for a new entry, never following a symlink. An existing
    /// directory is kept when `keep_directory` is set (and `true` returned); otherwise it is
    /// removed with everything below it.
    fn make_room(
        &mut self,
        parent: &Parent,
        name: &OsStr,
        keep_directory: bool,
    ) -> Result<bool, Errno> {
        let stat = match sys::statat(&parent.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => return Ok(false),
            Err(error) => return Err(error),
        };
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::Directory if keep_directory => return Ok(true),
            FileType::Directory => {
                self.cached_parent = None;
                remove_tree(parent.fd.as_fd(), name)?;
            }
            FileType::RegularFile => sys::unlinkat(&parent.fd, name, AtFlags::empty())?,
            _ => {
                self.cached_parent = None;
                sys::unlinkat(&parent.fd, name, AtFlags::empty())?;
            }
        }
        Ok(false)
    }

    fn mark_written(&mut self, parent: &Parent, name: &OsStr) {
        if self.options.whiteouts == WhiteoutMode::Apply {
            self.written
                .entry(parent.key)
                .or_default()
                .insert(name.to_owned());
        }
    }

    fn write_file<R: Read>(
        &mut self,
        entry: &mut R,
        size: u64,
        target: &Target<'_>,
        metadata: &EntryMetadata,
    ) -> Result<(), ApplyError> {
        let raw = target.raw;
        let parent = self
            .parent(target.parent, true)
            .map_err(fail("create parent directories of", raw))?;
        self.make_room(&parent, target.name, false)
            .map_err(fail("replace", raw))?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = sys::openat(&parent.fd, target.name, flags, Mode::from_raw_mode(0o600))
            .map_err(fail("create file", raw))?;
        let mut file = File::from(fd);
        let mut written = 0_u64;
        loop {
            let count = match entry.read(&mut self.buffer) {
                Ok(0) => break,
                Ok(count) => count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ApplyError::ReadContent {
                        path: raw.to_path_buf(),
                        source,
                    });
                }
            };
            file.write_all(&self.buffer[..count])
                .map_err(fail("write file", raw))?;
            written += count as u64;
        }
        self.report.bytes += written;
        // The tar crate ends an entry's content quietly at a premature end of the archive.
        if written != size {
            return Err(ApplyError::ReadContent {
                path: raw.to_path_buf(),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("archive ended after {written} of {size} bytes"),
                ),
            });
        }
        set_metadata(
            file.as_fd(),
            raw,
            metadata,
            FileType::RegularFile,
            self.options.chown,
            &mut self.report.skipped,
        )?;
        sys::futimens(&file, &metadata.times).map_err(fail("set times of", raw))?;
        self.mark_written(&parent, target.name);
        Ok(())
    }

    fn make_directory(
        &mut self,
        target: &Target<'_>,
        metadata: &EntryMetadata,
    ) -> Result<(), ApplyError> {
        let raw = target.raw;
        let parent = self
            .parent(target.parent, true)
            .map_err(fail("create parent directories of", raw))?;
        let exists = self
            .make_room(&parent, target.name, true)
            .map_err(fail("replace", raw))?;
        if !exists {
            sys::mkdirat(&parent.fd, target.name, Mode::from_raw_mode(0o700))
                .map_err(fail("create directory", raw))?;
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = sys::openat(&parent.fd, target.name, flags, Mode::empty())
            .map_err(fail("open directory", raw))?;
        set_metadata(
            fd.as_fd(),
            raw,
            metadata,
            FileType::Directory,
            self.options.chown,
            &mut self.report.skipped,
        )?;
        let key = key_of(fd.as_fd()).map_err(fail("stat directory", raw))?;
        self.directories.push(DirectoryTimes {
            path: target.path.to_path_buf(),
            key,
            times: metadata.times.clone(),
        });
        self.mark_written(&parent, target.name);
        Ok(())
    }

    fn make_symlink(
        &mut self,
        target: &Target<'_>,
        link: &[u8],
        metadata: &EntryMetadata,
    ) -> Result<(), ApplyError> {
        let raw = target.raw;
        let parent = self
            .parent(target.parent, true)
            .map_err(fail("create parent directories of", raw))?;
        self.make_room(&parent, target.name, false)
            .map_err(fail("replace", raw))?;
        sys::symlinkat(OsStr::from_bytes(link), &parent.fd, target.name)
            .map_err(fail("create symlink", raw))?;
        if self.options.chown {
            sys::chownat(
                &parent.fd,
                target.name,
                Some(metadata.uid),
                Some(metadata.gid),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(fail("set owner of", raw))?;
        }
        for (name, _) in &metadata.xattrs {
            let name = String::from_utf8_lossy(name).into_owned();
            self.skip(raw, SkipReason::XattrOnSpecialFile { name });
        }
        sys::utimensat(
            &parent.fd,
            target.name,
            &metadata.times,
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(fail("set times of", raw))?;
        self.mark_written(&parent, target.name);
        Ok(())
    }

    fn make_hardlink(&mut self, target: &Target<'_>, link: &Path) -> Result<(), ApplyError> {
        let raw = target.raw;
        let Some(link_path) = clean(link) else {
            return Err(ApplyError::HardlinkBreakout {
                path: raw.to_path_buf(),
                target: link.to_path_buf(),
            });
        };
        let (Some(link_parent), Some(link_name)) = (link_path.parent(), link_path.file_name())
        else {
            return Err(ApplyError::HardlinkToRoot {
                path: raw.to_path_buf(),
            });
        };
        let missing = |source: Errno| ApplyError::MissingHardlinkTarget {
            path: raw.to_path_buf(),
            target: link.to_path_buf(),
            source: source.into(),
        };
        let source_parent = self.parent(link_parent, false).map_err(missing)?;
        let source = sys::statat(&source_parent.fd, link_name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(missing)?;
        let parent = self
            .parent(target.parent, true)
            .map_err(fail("create parent directories of", raw))?;
        if let Ok(existing) = sys::statat(&parent.fd, target.name, AtFlags::SYMLINK_NOFOLLOW)
            && (existing.st_dev, existing.st_ino) == (source.st_dev, source.st_ino)
        {
            // Already this very link (a hardlink to itself, or a repeated entry).
            self.mark_written(&parent, target.name);
            return Ok(());
        }
        self.make_room(&parent, target.name, false)
            .map_err(fail("replace", raw))?;
        // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
        sys::linkat(
            &source_parent.fd,
            link_name,
            &parent.fd,
            target.name,
            AtFlags::empty(),
        )
        .map_err(|error| match error {
            Errno::NOENT => missing(error),
            error => fail("create hardlink", raw)(error),
        })?;
        self.mark_written(&parent, target.name);
        Ok(())
    }

    fn make_fifo(
        &mut self,
        target: &Target<'_>,
        metadata: &EntryMetadata,
    ) -> Result<(), ApplyError> {
        let raw = target.raw;
        let parent = self
            .parent(target.parent, true)
            .map_err(fail("create parent directories of", raw))?;
        self.make_room(&parent, target.name, false)
            .map_err(fail("replace", raw))?;
        sys::mknodat(
            &parent.fd,
            target.name,
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .map_err(fail("create fifo", raw))?;
        // O_NONBLOCK: opening a FIFO for reading does not wait for a writer then.
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = sys::openat(&parent.fd, target.name, flags, Mode::empty())
            .map_err(fail("open fifo", raw))?;
        set_metadata(
            fd.as_fd(),
            raw,
            metadata,
            FileType::Fifo,
            self.options.chown,
            &mut self.report.skipped,
        )?;
        sys::futimens(&fd, &metadata.times).map_err(fail("set times of", raw))?;
        self.mark_written(&parent, target.name);
        Ok(())
    }

    fn apply_root(
        &mut self,
        entry_type: EntryType,
        raw: &Path,
        metadata: &EntryMetadata,
    ) -> Result<(), ApplyError> {
        if entry_type != EntryType::Directory {
            return Err(ApplyError::RootNotDirectory {
                path: raw.to_path_buf(),
            });
        }
        let root = self.root.as_fd();
        set_metadata(
            root,
            raw,
            metadata,
            FileType::Directory,
            self.options.chown,
            &mut self.report.skipped,
        )?;
        let key = key_of(root).map_err(fail("stat directory", raw))?;
        self.directories.push(DirectoryTimes {
            path: PathBuf::new(),
            key,
            times: metadata.times.clone(),
        });
        Ok(())
    }

    fn apply_whiteout(
        &mut self,
        target: &Target<'_>,
        metadata: &EntryMetadata,
    ) -> Result<(), ApplyError> {
        let raw = target.raw;
        let name = target.name.as_bytes();
        if name == OPAQUE_WHITEOUT {
            return self.apply_opaque(target);
        }
        let hidden = &name[WHITEOUT_PREFIX.len()..];
        // containerd: "invalid whiteout name"; `.wh..wh.` is reserved for AUFS metadata.
        if name.starts_with(WHITEOUT_META_PREFIX) || matches!(hidden, b"" | b"." | b"..") {
            return Err(ApplyError::InvalidWhiteout {
                path: raw.to_path_buf(),
            });
        }
        let hidden = OsStr::from_bytes(hidden);
        match self.options.whiteouts {
            WhiteoutMode::Apply => {
                let parent = match self.parent(target.parent, false) {
                    Ok(parent) => parent,
                    // Nothing there to hide.
                    Err(Errno::NOENT | Errno::NOTDIR) => return Ok(()),
                    Err(error) => return Err(fail("resolve parent of", raw)(error)),
                };
                self.cached_parent = None;
                remove_tree(parent.fd.as_fd(), hidden).map_err(fail("apply whiteout", raw))?;
            }
            WhiteoutMode::Overlay => {
                let parent = self
                    .parent(target.parent, true)
                    .map_err(fail("create parent directories of", raw))?;
                self.make_room(&parent, hidden, false)
                    .map_err(fail("replace", raw))?;
                // overlayfs(5) "whiteouts and opaque directories": a character device 0/0.
                sys::mknodat(
                    &parent.fd,
                    hidden,
                    FileType::CharacterDevice,
                    Mode::empty(),
                    sys::makedev(0, 0),
                )
                .map_err(fail("create whiteout", raw))?;
                if self.options.chown {
                    sys::chownat(
                        &parent.fd,
                        hidden,
                        Some(metadata.uid),
                        Some(metadata.gid),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(fail("set owner of", raw))?;
                }
                sys::utimensat(
                    &parent.fd,
                    hidden,
                    &metadata.times,
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(fail("set times of", raw))?;
            }
        }
        Ok(())
    }

    fn apply_opaque(&mut self, target: &Target<'_>) -> Result<(), ApplyError> {
        let raw = target.raw;
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        match self.options.whiteouts {
            WhiteoutMode::Apply => {
                let parent = match self.parent(target.parent, false) {
                    Ok(parent) => parent,
                    Err(Errno::NOENT | Errno::NOTDIR) => return Ok(()),
                    Err(error) => return Err(fail("resolve parent of", raw)(error)),
                };
                self.cached_parent = None;
                let directory = sys::openat(&parent.fd, ".", flags, Mode::empty())
                    .map_err(fail("open opaque directory", raw))?;
                let written = &self.written;
                let keep = |key: DirectoryKey, name: &OsStr| {
                    written.get(&key).is_some_and(|names| names.contains(name))
                };
                clear_tree(directory, &keep).map_err(fail("empty opaque directory", raw))?;
            }
            WhiteoutMode::Overlay => {
                let parent = self
                    .parent(target.parent, true)
                    .map_err(fail("create parent directories of", raw))?;
                let directory = sys::openat(&parent.fd, ".", flags, Mode::empty())
                    .map_err(fail("open opaque directory", raw))?;
                sys::fsetxattr(&directory, OVERLAY_OPAQUE_XATTR, b"y", XattrFlags::empty())
                    .map_err(fail("mark opaque", raw))?;
            }
        }
        Ok(())
    }

    /// Sets directory times, deepest first, now that nothing more is created in them.
    fn finish(mut self) -> Result<ApplyReport, ApplyError> {
        self.directories
            .sort_by_key(|directory| Reverse(directory.path.components().count()));
        for directory in &self.directories {
            let fail = fail("set times of", &directory.path);
            let opened;
            let fd = if directory.path.as_os_str().is_empty() {
                self.root.as_fd()
            } else {
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW;
                match open_in_root(self.root.as_fd(), &directory.path, flags) {
                    Ok(fd) => {
                        opened = fd;
                        opened.as_fd()
                    }
                    // Replaced or removed by a later entry.
                    Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
                    Err(error) => return Err(fail(error)),
                }
            };
            match key_of(fd) {
                Ok(key) if key == directory.key => {}
                Ok(_) => continue,
                Err(error) => return Err(fail(error)),
            }
            sys::futimens(fd, &directory.times).map_err(fail)?;
        }
        Ok(self.report)
    }
}

fn xattr_allowed(name: &[u8]) -> bool {
    name.starts_with(b"user.") || name == b"security.capability"
}

/// Sets owner, then mode (a chown clears setuid and setgid), then xattrs (a chown also clears
/// `security.capability`) on the object `fd` refers to, a `file_type`.
fn set_metadata(
    fd: BorrowedFd<'_>,
    raw: &Path,
    metadata: &EntryMetadata,
    file_type: FileType,
    chown: bool,
    skipped: &mut Vec<Skipped>,
) -> Result<(), ApplyError> {
    if chown {
        sys::fchown(fd, Some(metadata.uid), Some(metadata.gid))
            .map_err(fail("set owner of", raw))?;
    }
    sys::fchmod(fd, Mode::from_raw_mode(metadata.mode)).map_err(fail("set mode of", raw))?;
    for (name, value) in &metadata.xattrs {
        let lossy = || String::from_utf8_lossy(name).into_owned();
        let reason = if !xattr_allowed(name) {
            SkipReason::DisallowedXattr { name: lossy() }
        } else if file_type == FileType::Fifo {
            SkipReason::XattrOnSpecialFile { name: lossy() }
        } else {
            match sys::fsetxattr(fd, OsStr::from_bytes(name), value, XattrFlags::empty()) {
                Ok(()) => continue,
                Err(Errno::NOTSUP) => SkipReason::XattrNotSupported { name: lossy() },
                Err(source) => {
                    return Err(ApplyError::Xattr {
                        path: raw.to_path_buf(),
                        name: lossy(),
                        source: source.into(),
                    });
                }
            }
        };
        tracing::debug!(path = %raw.display(), %reason, "skipped");
        skipped.push(Skipped {
            path: raw.to_path_buf(),
            reason,
        });
    }
    Ok(())
}

/// Removes `name` in `parent` and, if it is a directory, everything below it; never follows
/// a symlink. A missing `name` is not an error.
fn remove_tree(parent: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
    match sys::unlinkat(parent, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) => {}
        Err(error) => return Err(error),
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let directory = sys::openat(parent, name, flags, Mode::empty())?;
    clear_tree(directory, &|_, _| false)?;
    sys::unlinkat(parent, name, AtFlags::REMOVEDIR)
}

/// One directory being cleared.
struct Frame {
    fd: OwnedFd,
    key: DirectoryKey,
    /// Its name in the directory below it on the stack.
    name: OsString,
    children: Vec<(OsString, FileType)>,
    /// Whether anything in it (or itself) is kept.
    kept: bool,
}

impl Frame {
    fn open(fd: OwnedFd, name: OsString, kept: bool) -> Result<Self, Errno> {
        let key = key_of(fd.as_fd())?;
        let mut children = Vec::new();
        for child in Dir::read_from(&fd)? {
            let child = child?;
            let bytes = child.file_name().to_bytes();
            if bytes != b"." && bytes != b".." {
                children.push((OsString::from_vec(bytes.to_vec()), child.file_type()));
            }
        }
        Ok(Self {
            fd,
            key,
            name,
            children,
            kept,
        })
    }
}

/// Removes everything below `directory` for which `keep(directory key, name)` is false,
/// never following a symlink; a directory is kept if it or anything below it is kept.
/// Returns whether anything was kept.
///
/// Iterative, so a hostile, very deep tree ends in a clean error (out of file descriptors)
/// rather than a stack overflow.
fn clear_tree(
    directory: OwnedFd,
    keep: &dyn Fn(DirectoryKey, &OsStr) -> bool,
) -> Result<bool, Errno> {
    let mut stack = vec![Frame::open(directory, OsString::new(), false)?];
    loop {
        let Some(frame) = stack.last_mut() else {
            unreachable!("the loop returns when the last frame is popped");
        };
        if let Some((name, file_type)) = frame.children.pop() {
            let kept = keep(frame.key, &name);
            let file_type = match file_type {
                FileType::Unknown => {
                    match sys::statat(&frame.fd, &name, AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(stat) => FileType::from_raw_mode(stat.st_mode),
                        Err(Errno::NOENT) => continue,
                        Err(error) => return Err(error),
                    }
                }
                file_type => file_type,
            };
            if file_type == FileType::Directory {
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let fd = sys::openat(&frame.fd, &name, flags, Mode::empty())?;
                let child = Frame::open(fd, name, kept)?;
                stack.push(child);
            } else if kept {
                frame.kept = true;
            } else {
                match sys::unlinkat(&frame.fd, &name, AtFlags::empty()) {
                    Ok(()) | Err(Errno::NOENT) => {}
                    Err(error) => return Err(error),
                }
            }
            continue;
        }
        let Some(done) = stack.pop() else {
            unreachable!("the stack was not empty");
        };
        let Some(below) = stack.last_mut() else {
            return Ok(done.kept);
        };
        if done.kept {
            below.kept = true;
        } else {
            drop(done.fd);
            sys::unlinkat(&below.fd, &done.name, AtFlags::REMOVEDIR)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_strips_root_and_current_directory() {
        assert_eq!(clean(Path::new("/a/./b/")), Some(PathBuf::from("a/b")));
        assert_eq!(clean(Path::new("./")), Some(PathBuf::new()));
        assert_eq!(clean(Path::new("a/../b")), None);
        assert_eq!(clean(Path::new("..")), None);
    }

    #[test]
    fn pax_times_keep_nanoseconds() {
        let time = parse_pax_time(b"1700000000.123456789").unwrap();
        assert_eq!((time.tv_sec, time.tv_nsec), (1_700_000_000, 123_456_789));
        let time = parse_pax_time(b"12.5").unwrap();
        assert_eq!((time.tv_sec, time.tv_nsec), (12, 500_000_000));
        let time = parse_pax_time(b"-1.25").unwrap();
        assert_eq!((time.tv_sec, time.tv_nsec), (-2, 750_000_000));
        assert!(parse_pax_time(b"x").is_none());
    }
}
