//! Content checksums of build-context paths, for the cache keys of COPY and ADD.
//!
//! [`select`] expands the sources of one COPY/ADD against the context directory the way
//! BuildKit does, and returns every file, directory and symlink they select together with a
//! digest that changes exactly when what would be copied changes: names, content, kind, mode,
//! and symlink targets (not owners: COPY applies 0:0 or its --chown). Timestamps never enter the digest, so a fresh `git clone` of the
//! same tree hits the cache, and two files with the same size and mtime but different bytes
//! never share a key (BuildKit #4950, where a metadata-only checksum reused a stale layer).
//!
//! Content is hashed with blake3, files in parallel on rayon, each streamed through the hasher.
//! A [`StatCache`] remembers, per inode, the hash of a file together with its size, mtime and
//! ctime, so an unchanged context is not read again by the next build: a file whose inode,
//! size, mtime and ctime all match is not opened. Entries are only stored for files whose mtime
//! is older than the read by [`RACY_MARGIN`], the "racily clean" rule of Git
//! (`Documentation/technical/racy-git.txt`): a write in the same timestamp tick as the read
//! would otherwise leave the stat data unchanged and the cached hash stale.
//!
//! # How sources are selected (BuildKit's rules)
//!
//! * A source is a path relative to the context root; a leading `/` also means the root. It is
//!   cleaned lexically first; a `..` that would climb above the root is an error (BuildKit
//!   silently clamps it; rbuild refuses, as the classic builder did).
//! * Components may hold Go `filepath.Match` wildcards (`*`, `?`, `[...]`, `\` escapes). As in
//!   fsutil's `ResolveWildcards`, the components before the first wildcard are resolved
//!   (following symlinks inside the context), and the rest is matched against directory
//!   entries level by level in lexical order; a wildcard never descends through a symlinked
//!   directory. Matches are sorted like Go's `filepath.Walk`.
//! * Each match, and each plain source, is then resolved with its final symlink followed, as
//!   BuildKit's COPY does (`FollowSymlinks`), but always *inside* the context: an absolute link
//!   target starts again at the context root and `..` stops at it, like `openat2`'s
//!   `RESOLVE_IN_ROOT`. A resolved source is a [`SelectedRoot`]; a directory root selects its
//!   whole tree. Symlinks met inside a tree are selected as symlinks, with their target text,
//!   and never followed, wherever they point.
//! * The [`ContextFilter`] (the builder's `.dockerignore`) hides paths: a hidden path does not
//!   exist for sources, wildcards and symlink resolution, exactly as if it had not been sent
//!   to the builder. An excluded directory that [`ContextFilter::can_skip_directory`] refuses
//!   is still searched, and selected only when something inside it is (fsutil's walker sends
//!   the parents of what an exception re-includes).
//! * `exclude` (COPY `--exclude`) uses moby's `patternmatcher` rules (`**`, `!` exceptions,
//!   the last matching pattern wins, a pattern matching a parent directory excludes its
//!   contents), matched, as BuildKit's copier and `contenthash` match them, against each path
//!   *relative to the root it is under*; a root itself is never excluded by them.
//! * A source that selects nothing is an error naming it.
//!
//! # Safety of the walk
//!
//! Every filesystem access is relative to a descriptor of the context directory: directories
//! are walked by descriptor with `O_NOFOLLOW`, and files are opened with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, or component by component with `O_NOFOLLOW` on
//! kernels without it), so a symlink swapped in during the build cannot make rbuild read
//! anything outside the context.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{CStr, CString};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags};
use serde::{Deserialize, Serialize};
use tracing::instrument;

use crate::content::{ContentError, write_atomic};

/// How much older than the moment it is read a file's mtime must be for its hash to be kept
/// in the [`StatCache`]. It covers coarse filesystem timestamps (a kernel tick, FAT's two
/// seconds): a write after the read within that granularity could keep the same mtime.
pub const RACY_MARGIN: Duration = Duration::from_secs(2);

/// How many symlinks one source may follow before resolution gives up (Linux's limit).
const MAX_SYMLINKS: usize = 40;

/// A [`StatCache`] entry not used by this many consecutive saves is dropped.
const KEEP_GENERATIONS: u32 = 8;

/// The format version of the stat cache file.
const CACHE_FORMAT: u32 = 1;

/// What can go wrong while selecting context files.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// A filesystem operation on a context path failed.
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
    /// A source selected nothing (missing, hidden by the filter, or a wildcard without match).
    #[error("file not found in build context or excluded by .dockerignore: stat {name}")]
    NotFound {
        /// The source as written, or the wildcard match that could not be resolved.
        name: String,
    },
    /// A source climbs above the context root with `..`.
    #[error("source {name} is outside the build context")]
    OutsideContext {
        /// The source as written.
        name: String,
    },
    /// A source or `--exclude` pattern is not valid `filepath.Match` syntax.
    #[error("invalid pattern {pattern:?}: {reason}")]
    InvalidPattern {
        /// The pattern (or source) as written.
        pattern: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Resolving a source followed more than 40 symlinks.
    #[error("too many levels of symbolic links resolving {name}")]
    TooManyLinks {
        /// The source as written.
        name: String,
    },
    /// A selected name or symlink target is not UTF-8 (cache keys and patterns work on text).
    #[error("{path}: name or symlink target is not valid UTF-8")]
    NonUtf8 {
        /// The path holding it.
        path: PathBuf,
    },
    /// A selected file stopped being a regular file between the walk and the read.
    #[error("{path} changed while the build context was read")]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// The stat cache could not be written.
    #[error("save the context stat cache")]
    SaveCache {
        /// The cause (it names the file).
        #[source]
        source: ContentError,
    },
}

/// Decides what of the context is visible (the builder adapts `.dockerignore` to this; the
/// cache crate must not depend on the frontend).
pub trait ContextFilter: Sync {
    /// Whether `path` is excluded. `path` is relative to the context root, `/`-separated, no
    /// leading `./`.
    fn is_excluded(&self, path: &str, is_directory: bool) -> bool;

    /// Whether a whole excluded directory can be skipped without looking inside (no exception
    /// pattern could re-include something under it).
    fn can_skip_directory(&self, path: &str) -> bool;
}

/// A [`ContextFilter`] that includes everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoFilter;

impl ContextFilter for NoFilter {
    fn is_excluded(&self, _path: &str, _is_directory: bool) -> bool {
        false
    }

    fn can_skip_directory(&self, _path: &str) -> bool {
        true
    }
}

/// What a selected path is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symlink, never followed inside a selected tree.
    Symlink {
        /// The link's target text, as `readlink` returns it.
        target: String,
    },
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
    /// A character device.
    CharacterDevice {
        /// Its device number (`st_rdev`).
        device: u64,
    },
    /// A block device.
    BlockDevice {
        /// Its device number (`st_rdev`).
        device: u64,
    },
}

/// What one COPY source resolved to: a file or a directory whose tree is selected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectedRoot {
    /// Index of the source (in `sources` given to [`select`]) that produced it.
    pub source_index: usize,
    /// The path the source named or its wildcard matched, before a final symlink is followed
    /// (BuildKit names the destination of a wildcard match after this path's last component).
    pub matched: String,
    /// The real path relative to the context root, every symlink resolved (`.` for the root).
    pub path: String,
    /// Whether it is a directory (its contents are copied) rather than a single file.
    pub is_directory: bool,
}

/// One path selected by COPY sources, as it will be copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectedFile {
    /// The real path relative to the context root (`.` for the root directory itself).
    pub path: String,
    /// Index of its [`SelectedRoot`] in [`Selection::roots`].
    pub root: usize,
    /// Its path relative to that root, empty for the root itself: where it goes under the
    /// destination.
    pub relative: String,
    /// What it is.
    pub kind: FileKind,
    /// Permission bits, with setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes (regular files; what `lstat` says for the rest).
    pub size: u64,
    /// blake3 of the content, for regular files.
    pub hash: Option<[u8; 32]>,
}

/// Everything some COPY sources select, and its digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// The resolved sources, in source order and, for wildcards, in match order.
    pub roots: Vec<SelectedRoot>,
    /// Every selected path in copy order: root by root, and within a root depth-first with
    /// each directory before its entries and entries sorted by name (byte order). A path
    /// selected by two sources appears twice.
    pub files: Vec<SelectedFile>,
    /// `blake3:<hex>` over, for every file in order: the source as written, the root's
    /// matched path, the path under the root, kind, mode (not the owner: COPY applies its own), and the content hash,
    /// symlink target or device number. No timestamps, inode or device of the filesystem.
    pub digest: String,
}

/// Expands COPY/ADD `sources` against the `context` directory and checksums what they select
/// (see the module documentation for the rules). `exclude` are COPY `--exclude` patterns;
/// `filter` hides what `.dockerignore` excludes; `cache` saves reading unchanged files.
#[instrument(skip_all, fields(context = %context.display(), sources = sources.len()))]
pub fn select(
    context: &Path,
    sources: &[String],
    exclude: &[String],
    filter: &dyn ContextFilter,
    cache: &StatCache,
) -> Result<Selection, ContextError> {
    let exclude = ExcludePatterns::new(exclude)?;
    let root = rustix::fs::open(
        context,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| ContextError::Io {
        action: "open the build context",
        path: context.to_path_buf(),
        source: errno.into(),
    })?;
    let walker = Walker {
        directory: context,
        root,
        filter,
    };

    let mut roots = Vec::new();
    let mut found = Vec::new();
    for (source_index, source) in sources.iter().enumerate() {
        let pattern = SourcePattern::parse(source)?;
        let before = roots.len();
        for (matched, path, stat) in walker.resolve_source(&pattern)? {
            let root_index = roots.len();
            let start = found.len();
            let is_directory = FileType::from_raw_mode(stat.mode) == FileType::Directory;
            found.push(Found {
                root: root_index,
                path: path.clone(),
                relative: String::new(),
                stat,
                kind: walker.kind_of(&path, &stat)?,
            });
            if is_directory {
                let fd = walker.open(&path, OFlags::RDONLY | OFlags::DIRECTORY)?;
                let (tree, any) = walker.walk(fd, &path, "", root_index, &exclude)?;
                // A directory the filter excludes (but had to search) exists only if
                // something inside it was re-included.
                if !any && !path.is_empty() && filter.is_excluded(&path, true) {
                    found.truncate(start);
                    continue;
                }
                found.extend(tree);
            }
            roots.push(SelectedRoot {
                source_index,
                matched: shown(&matched).to_string(),
                path: shown(&path).to_string(),
                is_directory,
            });
        }
        if roots.len() == before {
            return Err(ContextError::NotFound {
                name: source.clone(),
            });
        }
    }

    let hashes = walker.hash_files(&found, cache)?;
    let files: Vec<SelectedFile> = found
        .into_iter()
        .map(|entry| {
            let (stat, hash) = match hashes.get(entry.path.as_str()) {
                Some((stat, hash)) if entry.kind == FileKind::File => (*stat, Some(*hash)),
                _ => (entry.stat, None),
            };
            SelectedFile {
                path: shown(&entry.path).to_string(),
                root: entry.root,
                relative: entry.relative,
                kind: entry.kind,
                mode: stat.mode & 0o7777,
                uid: stat.uid,
                gid: stat.gid,
                size: stat.size,
                hash,
            }
        })
        .collect();
    let digest = selection_digest(sources, &roots, &files);
    tracing::debug!(
        roots = roots.len(),
        files = files.len(),
        hits = cache.hits(),
        misses = cache.misses(),
        %digest,
        "selected context files"
    );
    Ok(Selection {
        roots,
        files,
        digest,
    })
}

/// The digest of a selection: length-prefixed fields so no two selections share a byte
/// stream.
fn selection_digest(sources: &[String], roots: &[SelectedRoot], files: &[SelectedFile]) -> String {
    fn field(hasher: &mut blake3::Hasher, bytes: &[u8]) {
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"rbuild context selection v1\0");
    for file in files {
        let root = &roots[file.root];
        field(&mut hasher, sources[root.source_index].as_bytes());
        field(&mut hasher, root.matched.as_bytes());
        field(&mut hasher, file.relative.as_bytes());
        let (tag, payload): (u8, Vec<u8>) = match &file.kind {
            FileKind::File => (b'f', file.hash.unwrap_or_default().to_vec()),
            FileKind::Directory => (b'd', Vec::new()),
            FileKind::Symlink { target } => (b'l', target.as_bytes().to_vec()),
            FileKind::Fifo => (b'p', Vec::new()),
            FileKind::Socket => (b's', Vec::new()),
            FileKind::CharacterDevice { device } => (b'c', device.to_le_bytes().to_vec()),
            FileKind::BlockDevice { device } => (b'b', device.to_le_bytes().to_vec()),
        };
        hasher.update(&[tag]);
        hasher.update(&file.mode.to_le_bytes());
        // Not the owner: COPY applies 0:0 or its --chown (part of the step's definition), as
        // BuildKit resets a local context's owners, so a checkout by another user still hits.
        field(&mut hasher, &payload);
    }
    format!("blake3:{}", hasher.finalize().to_hex())
}

/// The context root is `""` inside this module and `.` outside it.
fn shown(path: &str) -> &str {
    if path.is_empty() { "." } else { path }
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// The stat data rbuild uses, from `lstat`/`fstat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StatData {
    dev: u64,
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    /// Nanoseconds since the epoch.
    mtime: i64,
    /// Nanoseconds since the epoch.
    ctime: i64,
    rdev: u64,
}

impl StatData {
    // The field types of `struct stat` differ between architectures.
    #[allow(clippy::unnecessary_cast)]
    fn from_stat(stat: &rustix::fs::Stat) -> Self {
        let nanos = |seconds: i64, nanoseconds: i64| {
            seconds
                .saturating_mul(1_000_000_000)
                .saturating_add(nanoseconds)
        };
        Self {
            dev: stat.st_dev as u64,
            ino: stat.st_ino as u64,
            mode: stat.st_mode as u32,
            uid: stat.st_uid as u32,
            gid: stat.st_gid as u32,
            size: stat.st_size as u64,
            mtime: nanos(stat.st_mtime as i64, stat.st_mtime_nsec as i64),
            ctime: nanos(stat.st_ctime as i64, stat.st_ctime_nsec as i64),
            rdev: stat.st_rdev as u64,
        }
    }

    fn file_type(&self) -> FileType {
        FileType::from_raw_mode(self.mode)
    }
}

/// A path found by the walk, before hashing.
struct Found {
    root: usize,
    path: String,
    relative: String,
    stat: StatData,
    kind: FileKind,
}

/// Whether `openat2` turned out to be missing (kernels before 5.6, some seccomp profiles).
static OPENAT2_MISSING: AtomicBool = AtomicBool::new(false);

/// Filesystem access to one context, all relative to a descriptor of its directory.
struct Walker<'a> {
    directory: &'a Path,
    root: OwnedFd,
    filter: &'a dyn ContextFilter,
}

impl Walker<'_> {
    fn error(&self, action: &'static str, path: &str) -> impl FnOnce(io::Error) -> ContextError {
        let path = self.directory.join(path);
        move |source| ContextError::Io {
            action,
            path,
            source,
        }
    }

    /// Opens `path` (relative, every component a real directory but maybe the last) beneath
    /// the root without following any symlink.
    fn open_raw(&self, path: &str, flags: OFlags) -> io::Result<OwnedFd> {
        let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        if path.is_empty() {
            return Ok(rustix::fs::openat(&self.root, c".", flags, Mode::empty())?);
        }
        if !OPENAT2_MISSING.load(Ordering::Relaxed) {
            let resolve =
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
            match rustix::fs::openat2(&self.root, path, flags, Mode::empty(), resolve) {
                // Missing, or refused by a seccomp profile that predates it (older Docker
                // profiles answer EPERM for unknown system calls).
                Err(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) => {
                    OPENAT2_MISSING.store(true, Ordering::Relaxed)
                }
                result => return Ok(result?),
            }
        }
        let mut current: Option<OwnedFd> = None;
        let mut components = path.split('/').peekable();
        while let Some(name) = components.next() {
            let parent = current.as_ref().map_or(self.root.as_fd(), |fd| fd.as_fd());
            let component_flags = if components.peek().is_some() {
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
            } else {
                flags
            };
            current = Some(rustix::fs::openat(
                parent,
                name,
                component_flags,
                Mode::empty(),
            )?);
        }
        Ok(current.expect("a non-empty path has a component"))
    }

    fn open(&self, path: &str, flags: OFlags) -> Result<OwnedFd, ContextError> {
        self.open_raw(path, flags).map_err(self.error("open", path))
    }

    /// `lstat` of a path beneath the root.
    fn lstat(&self, path: &str) -> io::Result<StatData> {
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
        if name.is_empty() {
            return Ok(StatData::from_stat(&rustix::fs::fstat(&self.root)?));
        }
        let parent = self.open_raw(parent, OFlags::PATH | OFlags::DIRECTORY)?;
        Ok(StatData::from_stat(&rustix::fs::statat(
            &parent,
            name,
            AtFlags::SYMLINK_NOFOLLOW,
        )?))
    }

    fn read_link_at(
        &self,
        directory: BorrowedFd<'_>,
        name: &CStr,
        path: &str,
    ) -> Result<String, ContextError> {
        let target = rustix::fs::readlinkat(directory, name, Vec::new())
            .map_err(|errno| self.error("read the symlink", path)(errno.into()))?;
        target.into_string().map_err(|_| ContextError::NonUtf8 {
            path: self.directory.join(path),
        })
    }

    fn read_link(&self, path: &str) -> Result<String, ContextError> {
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
        let parent = self.open(parent, OFlags::PATH | OFlags::DIRECTORY)?;
        let name = CString::new(name).map_err(|_| ContextError::NonUtf8 {
            path: self.directory.join(path),
        })?;
        self.read_link_at(parent.as_fd(), &name, path)
    }

    fn kind_of(&self, path: &str, stat: &StatData) -> Result<FileKind, ContextError> {
        Ok(match stat.file_type() {
            FileType::Directory => FileKind::Directory,
            FileType::Symlink => FileKind::Symlink {
                target: self.read_link(path)?,
            },
            FileType::Fifo => FileKind::Fifo,
            FileType::Socket => FileKind::Socket,
            FileType::CharacterDevice => FileKind::CharacterDevice { device: stat.rdev },
            FileType::BlockDevice => FileKind::BlockDevice { device: stat.rdev },
            _ => FileKind::File,
        })
    }

    /// Whether the filter makes `path` not exist: excluded, and not a directory that must be
    /// searched for re-included entries.
    fn hidden(&self, path: &str, is_directory: bool) -> bool {
        !path.is_empty()
            && self.filter.is_excluded(path, is_directory)
            && (!is_directory || self.filter.can_skip_directory(path))
    }

    /// The entries of a directory, sorted by name, with their `lstat`.
    fn list(&self, fd: OwnedFd, path: &str) -> Result<Vec<(CString, StatData)>, ContextError> {
        let mut directory =
            Dir::new(fd).map_err(|errno| self.error("read the directory", path)(errno.into()))?;
        let mut names = Vec::new();
        while let Some(entry) = directory.read() {
            let entry =
                entry.map_err(|errno| self.error("read the directory", path)(errno.into()))?;
            let name = entry.file_name();
            if name != c"." && name != c".." {
                names.push(name.to_owned());
            }
        }
        names.sort();
        let fd = directory
            .fd()
            .map_err(|errno| self.error("read the directory", path)(errno.into()))?;
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            match rustix::fs::statat(fd, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => entries.push((name, StatData::from_stat(&stat))),
                // Removed since the directory was read: it is not part of the context.
                Err(rustix::io::Errno::NOENT) => {}
                Err(errno) => {
                    let child = join(path, &name.to_string_lossy());
                    return Err(self.error("stat", &child)(errno.into()));
                }
            }
        }
        Ok(entries)
    }

    fn utf8(&self, parent: &str, name: &CStr) -> Result<String, ContextError> {
        name.to_str()
            .map(str::to_string)
            .map_err(|_| ContextError::NonUtf8 {
                path: self
                    .directory
                    .join(parent)
                    .join(name.to_string_lossy().as_ref()),
            })
    }

    /// Follows `components` from the context root, inside it (absolute targets restart at the
    /// root, `..` stops there), the final symlink too. `None` when something is missing or
    /// hidden.
    fn resolve(
        &self,
        name: &str,
        components: &[String],
        must_be_directory: bool,
    ) -> Result<Option<(String, StatData)>, ContextError> {
        let mut resolved: Vec<String> = Vec::new();
        let mut pending: VecDeque<String> = components.iter().cloned().collect();
        let mut links = 0;
        while let Some(component) = pending.pop_front() {
            if component == ".." {
                resolved.pop();
                continue;
            }
            let last = pending.is_empty();
            let candidate = join(&resolved.join("/"), &component);
            let candidate_stat = match self.lstat(&candidate) {
                Ok(stat) => stat,
                Err(error)
                    if matches!(
                        error.raw_os_error(),
                        Some(code) if code == rustix::io::Errno::NOENT.raw_os_error()
                            || code == rustix::io::Errno::NOTDIR.raw_os_error()
                    ) =>
                {
                    return Ok(None);
                }
                Err(error) => return Err(self.error("stat", &candidate)(error)),
            };
            let file_type = candidate_stat.file_type();
            if file_type == FileType::Symlink {
                if self.hidden(&candidate, false) {
                    return Ok(None);
                }
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(ContextError::TooManyLinks {
                        name: name.to_string(),
                    });
                }
                let target = self.read_link(&candidate)?;
                if target.starts_with('/') {
                    resolved.clear();
                }
                for part in target.split('/').rev() {
                    if !part.is_empty() && part != "." {
                        pending.push_front(part.to_string());
                    }
                }
                continue;
            }
            let is_directory = file_type == FileType::Directory;
            if self.hidden(&candidate, is_directory) || (!last && !is_directory) {
                return Ok(None);
            }
            resolved.push(component);
        }
        let path = resolved.join("/");
        let stat = self.lstat(&path).map_err(self.error("stat", &path))?;
        if must_be_directory && stat.file_type() != FileType::Directory {
            return Ok(None);
        }
        Ok(Some((path, stat)))
    }

    /// A source's roots: `(matched path, resolved path, stat)`, in match order.
    fn resolve_source(
        &self,
        pattern: &SourcePattern<'_>,
    ) -> Result<Vec<(String, String, StatData)>, ContextError> {
        if pattern.wildcards.is_empty() {
            let resolved =
                self.resolve(pattern.text, &pattern.prefix, pattern.must_be_directory)?;
            return Ok(resolved
                .map(|(path, stat)| (pattern.prefix.join("/"), path, stat))
                .into_iter()
                .collect());
        }
        let Some((base, stat)) = self.resolve(pattern.text, &pattern.prefix, true)? else {
            return Ok(Vec::new());
        };
        debug_assert_eq!(stat.file_type(), FileType::Directory);
        let mut current = vec![base];
        for (level, glob) in pattern.wildcards.iter().enumerate() {
            let last = level + 1 == pattern.wildcards.len();
            let mut next = Vec::new();
            for directory in &current {
                let fd = self.open(directory, OFlags::RDONLY | OFlags::DIRECTORY)?;
                for (name, stat) in self.list(fd, directory)? {
                    let name = self.utf8(directory, &name)?;
                    let path = join(directory, &name);
                    let is_directory = stat.file_type() == FileType::Directory;
                    // Like `filepath.Walk`, a wildcard never descends through a symlink.
                    if (!last && !is_directory) || self.hidden(&path, is_directory) {
                        continue;
                    }
                    if glob.matches(&name) {
                        next.push(path);
                    }
                }
            }
            current = next;
        }
        let mut roots = Vec::with_capacity(current.len());
        for matched in current {
            let components: Vec<String> = matched.split('/').map(str::to_string).collect();
            let Some((path, stat)) =
                self.resolve(pattern.text, &components, pattern.must_be_directory)?
            else {
                if pattern.must_be_directory {
                    continue;
                }
                return Err(ContextError::NotFound { name: matched });
            };
            roots.push((matched, path, stat));
        }
        Ok(roots)
    }

    /// The tree under the directory `fd` (at `path`, `relative` under its root), in copy
    /// order, and whether it holds anything. Subdirectories are walked in parallel.
    fn walk(
        &self,
        fd: OwnedFd,
        path: &str,
        relative: &str,
        root: usize,
        exclude: &ExcludePatterns,
    ) -> Result<(Vec<Found>, bool), ContextError> {
        let directory = fd.try_clone().map_err(self.error("open", path))?;
        // Each visible entry, with, for a directory, its name and whether it is excluded
        // (then it is kept only if something inside it is not).
        let mut entries: Vec<(Found, Option<(CString, bool)>)> = Vec::new();
        for (name, stat) in self.list(fd, path)? {
            let utf8_name = self.utf8(path, &name)?;
            let child = join(path, &utf8_name);
            let child_relative = join(relative, &utf8_name);
            let file_type = stat.file_type();
            let is_directory = file_type == FileType::Directory;
            let filtered = self.filter.is_excluded(&child, is_directory);
            let excluded_here = exclude.is_excluded(&child_relative);
            if is_directory {
                let skip = (filtered && self.filter.can_skip_directory(&child))
                    || (excluded_here && exclude.can_skip());
                if !skip {
                    let found = Found {
                        root,
                        path: child,
                        relative: child_relative,
                        stat,
                        kind: FileKind::Directory,
                    };
                    entries.push((found, Some((name, filtered || excluded_here))));
                }
                continue;
            }
            if filtered || excluded_here {
                continue;
            }
            let kind = match file_type {
                FileType::Symlink => FileKind::Symlink {
                    target: self.read_link_at(directory.as_fd(), &name, &child)?,
                },
                FileType::Fifo => FileKind::Fifo,
                FileType::Socket => FileKind::Socket,
                FileType::CharacterDevice => FileKind::CharacterDevice { device: stat.rdev },
                FileType::BlockDevice => FileKind::BlockDevice { device: stat.rdev },
                _ => FileKind::File,
            };
            let found = Found {
                root,
                path: child,
                relative: child_relative,
                stat,
                kind,
            };
            entries.push((found, None));
        }
        let subtree = |found: &Found, name: &CStr| {
            let child_fd = rustix::fs::openat(
                &directory,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|errno| self.error("open", &found.path)(errno.into()))?;
            self.walk(child_fd, &found.path, &found.relative, root, exclude)
        };
        let subtrees: Vec<Option<(Vec<Found>, bool)>> = entries
            .par_iter()
            .map(|(found, directory)| match directory {
                Some((name, _)) => subtree(found, name).map(Some),
                None => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        let mut tree = Vec::with_capacity(entries.len());
        for ((found, directory), subtree) in entries.into_iter().zip(subtrees) {
            match (directory, subtree) {
                (Some((_, excluded)), Some((children, any))) => {
                    if any || !excluded {
                        tree.push(found);
                        tree.extend(children);
                    }
                }
                _ => tree.push(found),
            }
        }
        let any = !tree.is_empty();
        Ok((tree, any))
    }

    /// Hashes the regular files of `found` (each path once), in parallel, through the cache.
    /// Returns, per path, the stat data of what was read (or looked up) and the hash.
    fn hash_files(
        &self,
        found: &[Found],
        cache: &StatCache,
    ) -> Result<HashMap<String, (StatData, [u8; 32])>, ContextError> {
        let mut seen = HashSet::new();
        let files: Vec<&Found> = found
            .iter()
            .filter(|entry| entry.kind == FileKind::File && seen.insert(entry.path.as_str()))
            .collect();
        files
            .par_iter()
            .map(|entry| {
                let result = match cache.lookup(&entry.stat) {
                    Some(hash) => (entry.stat, hash),
                    None => self.hash_file(&entry.path, cache)?,
                };
                Ok((entry.path.clone(), result))
            })
            .collect()
    }

    /// Reads one file through blake3 and records it in the cache when that is safe.
    fn hash_file(
        &self,
        path: &str,
        cache: &StatCache,
    ) -> Result<(StatData, [u8; 32]), ContextError> {
        let started = SystemTime::now();
        // O_NONBLOCK: if a FIFO was swapped in, opening it must not hang the build.
        let fd = self.open(path, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY)?;
        let stat = |fd: &File| -> Result<StatData, ContextError> {
            rustix::fs::fstat(fd)
                .map(|stat| StatData::from_stat(&stat))
                .map_err(|errno| self.error("stat", path)(errno.into()))
        };
        let mut file = File::from(fd);
        let before = stat(&file)?;
        if before.file_type() != FileType::RegularFile {
            return Err(ContextError::Changed {
                path: self.directory.join(path),
            });
        }
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_reader(&mut file)
            .map_err(self.error("read", path))?;
        let hash = *hasher.finalize().as_bytes();
        let after = stat(&file)?;
        cache.misses.fetch_add(1, Ordering::Relaxed);
        let settled = started
            .checked_sub(RACY_MARGIN)
            .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
            .is_some_and(|limit| i128::from(before.mtime) < limit.as_nanos() as i128);
        if before == after && settled {
            cache.insert(&before, hash);
        }
        Ok((after, hash))
    }
}

/// A persistent map from a file's identity and stat data — (device, inode) → (size, mtime,
/// ctime) — to the blake3 of its content, so unchanged files are not read again.
///
/// It is one JSON file per context (see [`StatCache::file_for`]), loaded at the start of a
/// build and saved at the end with an atomic rename; two concurrent builds of one context
/// race and the last writer wins, which only costs re-reading. The ctime is part of the key
/// because nothing but the kernel can set it: restoring an mtime after a write (`cp -p`,
/// `touch -r`, checkouts) still changes it.
#[derive(Debug)]
pub struct StatCache {
    file: Option<PathBuf>,
    generation: u32,
    entries: RwLock<Entries>,
    /// Whether an entry was added since the load (otherwise saving has nothing to write).
    dirty: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// (device, inode) → what was hashed.
type Entries = HashMap<(u64, u64), CachedHash>;

#[derive(Debug)]
struct CachedHash {
    size: u64,
    mtime: i64,
    ctime: i64,
    hash: [u8; 32],
    /// The generation (save count) that last used it.
    last_used: AtomicU32,
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    generation: u32,
    /// `[dev, ino, size, mtime ns, ctime ns, last used generation, blake3 hex]`.
    entries: Vec<(u64, u64, u64, i64, i64, u32, String)>,
}

impl StatCache {
    /// Where the stat cache of `context` lives under a store directory (`ROOT/v1`):
    /// `context-cache/<blake3 of the canonical context path>.json`.
    pub fn file_for(store_directory: &Path, context: &Path) -> PathBuf {
        let canonical = fs::canonicalize(context).unwrap_or_else(|_| context.to_path_buf());
        let name = blake3::hash(canonical.as_os_str().as_encoded_bytes());
        store_directory
            .join("context-cache")
            .join(format!("{}.json", name.to_hex()))
    }

    /// Loads the cache saved in `file`; a missing, unreadable or corrupt file gives an empty
    /// cache (it is only a cache).
    pub fn load(file: &Path) -> Self {
        let parsed = match fs::read(file) {
            Ok(bytes) => {
                let parsed = parse_cache_file(&bytes);
                if parsed.is_none() {
                    tracing::warn!(file = %file.display(), "ignoring a corrupt context stat cache");
                }
                parsed
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => None,
            Err(error) => {
                tracing::warn!(file = %file.display(), %error, "ignoring an unreadable context stat cache");
                None
            }
        };
        let (generation, entries) = parsed.unwrap_or_default();
        Self {
            file: Some(file.to_path_buf()),
            generation: generation.wrapping_add(1),
            entries: RwLock::new(entries),
            dirty: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// An empty cache that is never saved.
    pub fn in_memory() -> Self {
        Self {
            file: None,
            generation: 1,
            entries: RwLock::default(),
            dirty: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Writes the cache back to the file it was loaded from, atomically, when a file was
    /// hashed since (a build that read nothing writes nothing; an in-memory cache is never
    /// written). Entries unused for several saves are dropped, so deleted files do not pile up.
    pub fn save(&self) -> Result<(), ContextError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        if !self.dirty.load(Ordering::Relaxed) {
            return Ok(());
        }
        let entries = self
            .entries
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut records: Vec<_> = entries
            .iter()
            .filter_map(|(&(dev, ino), entry)| {
                let last_used = entry.last_used.load(Ordering::Relaxed);
                (self.generation.wrapping_sub(last_used) < KEEP_GENERATIONS).then(|| {
                    (
                        dev,
                        ino,
                        entry.size,
                        entry.mtime,
                        entry.ctime,
                        last_used,
                        hex::encode(entry.hash),
                    )
                })
            })
            .collect();
        drop(entries);
        records.sort_unstable();
        let bytes = serde_json::to_vec(&CacheFile {
            version: CACHE_FORMAT,
            generation: self.generation,
            entries: records,
        })
        .expect("the stat cache serializes");
        if let Some(parent) = file.parent() {
            fs::create_dir_all(parent).map_err(|source| ContextError::SaveCache {
                source: ContentError::Io {
                    action: "create",
                    path: parent.to_path_buf(),
                    source,
                },
            })?;
        }
        write_atomic(file, &bytes).map_err(|source| ContextError::SaveCache { source })
    }

    /// Files whose hash came from the cache (not read), since it was loaded.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Files that were read and hashed, since it was loaded.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// How many files it knows.
    pub fn len(&self) -> usize {
        self.entries
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .len()
    }

    /// Whether it knows no file.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lookup(&self, stat: &StatData) -> Option<[u8; 32]> {
        let entries = self
            .entries
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        let entry = entries.get(&(stat.dev, stat.ino))?;
        if entry.size != stat.size || entry.mtime != stat.mtime || entry.ctime != stat.ctime {
            return None;
        }
        entry.last_used.store(self.generation, Ordering::Relaxed);
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(entry.hash)
    }

    fn insert(&self, stat: &StatData, hash: [u8; 32]) {
        let mut entries = self
            .entries
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        self.dirty.store(true, Ordering::Relaxed);
        entries.insert(
            (stat.dev, stat.ino),
            CachedHash {
                size: stat.size,
                mtime: stat.mtime,
                ctime: stat.ctime,
                hash,
                last_used: AtomicU32::new(self.generation),
            },
        );
    }
}

fn parse_cache_file(bytes: &[u8]) -> Option<(u32, Entries)> {
    let file: CacheFile = serde_json::from_slice(bytes).ok()?;
    if file.version != CACHE_FORMAT {
        return None;
    }
    let mut entries = HashMap::with_capacity(file.entries.len());
    for (dev, ino, size, mtime, ctime, last_used, hash) in file.entries {
        let hash: [u8; 32] = hex::decode(hash).ok()?.try_into().ok()?;
        entries.insert(
            (dev, ino),
            CachedHash {
                size,
                mtime,
                ctime,
                hash,
                last_used: AtomicU32::new(last_used),
            },
        );
    }
    Some((file.generation, entries))
}

/// A COPY source, cleaned and split at its first wildcard component.
struct SourcePattern<'a> {
    text: &'a str,
    /// Literal components before the first wildcard.
    prefix: Vec<String>,
    /// The components from the first wildcard on.
    wildcards: Vec<Glob>,
    /// The source ends with `/`: it must be a directory.
    must_be_directory: bool,
}

impl<'a> SourcePattern<'a> {
    fn parse(text: &'a str) -> Result<Self, ContextError> {
        let mut components: Vec<&str> = Vec::new();
        for part in text.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    if components.pop().is_none() {
                        return Err(ContextError::OutsideContext {
                            name: text.to_string(),
                        });
                    }
                }
                _ => components.push(part),
            }
        }
        let must_be_directory =
            !components.is_empty() && (text.ends_with('/') || text.ends_with("/."));
        let first_wildcard = components
            .iter()
            .position(|component| has_wildcards(component))
            .unwrap_or(components.len());
        let wildcards = components[first_wildcard..]
            .iter()
            .map(|component| {
                Glob::new(component, false).map_err(|reason| ContextError::InvalidPattern {
                    pattern: text.to_string(),
                    reason,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            text,
            prefix: components[..first_wildcard]
                .iter()
                .map(|component| component.to_string())
                .collect(),
            wildcards,
            must_be_directory,
        })
    }
}

/// fsutil's `containsWildcards`: `*`, `?` or `[` not escaped by `\`.
fn has_wildcards(component: &str) -> bool {
    let mut characters = component.chars();
    while let Some(character) = characters.next() {
        match character {
            '\\' => {
                characters.next();
            }
            '*' | '?' | '[' => return true,
            _ => {}
        }
    }
    false
}

/// COPY `--exclude` patterns, with moby `patternmatcher`'s rules.
struct ExcludePatterns {
    patterns: Vec<(Glob, bool)>,
    has_exceptions: bool,
}

impl ExcludePatterns {
    fn new(patterns: &[String]) -> Result<Self, ContextError> {
        let mut compiled = Vec::new();
        for written in patterns {
            let trimmed = written.trim();
            if trimmed.is_empty() {
                continue;
            }
            let (exception, pattern) = match trimmed.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, trimmed),
            };
            if pattern.is_empty() {
                return Err(ContextError::InvalidPattern {
                    pattern: written.clone(),
                    reason: "an exclusion pattern needs something after `!`",
                });
            }
            let glob = Glob::new(&clean(pattern), true).map_err(|reason| {
                ContextError::InvalidPattern {
                    pattern: written.clone(),
                    reason,
                }
            })?;
            compiled.push((glob, exception));
        }
        Ok(Self {
            has_exceptions: compiled.iter().any(|(_, exception)| *exception),
            patterns: compiled,
        })
    }

    /// moby's `MatchesOrParentMatches`: patterns in order, each tested against the path and
    /// its parent directories; the last one that applies decides.
    fn is_excluded(&self, path: &str) -> bool {
        if self.patterns.is_empty() || path.is_empty() {
            return false;
        }
        let parents: Vec<&str> = path
            .match_indices('/')
            .map(|(index, _)| &path[..index])
            .collect();
        let mut matched = false;
        for (glob, exception) in &self.patterns {
            if *exception != matched {
                continue;
            }
            if glob.matches(path) || parents.iter().any(|parent| glob.matches(parent)) {
                matched = !exception;
            }
        }
        matched
    }

    /// An excluded directory can be skipped when no exception could re-include anything.
    fn can_skip(&self) -> bool {
        !self.has_exceptions
    }
}

/// Go's `filepath.Clean` on a `/`-separated pattern.
fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|last| *last != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            _ => parts.push(part),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Literal(char),
    /// `?`: one character but `/`.
    AnyCharacter,
    /// `*`: any run of characters but `/`.
    Star,
    /// moby's `**` followed by more pattern: `(.*/)?`, any number of directories.
    AnyDirectories,
    /// moby's `**` at the end: `.*`.
    AnyRest,
    /// `[...]` (Go: `^` negates; `-` and `]` must be escaped inside).
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

/// A compiled glob: Go's `filepath.Match` syntax, validated the way Go validates it, plus
/// moby's `**` when asked for.
#[derive(Clone, Debug)]
struct Glob {
    tokens: Vec<Token>,
}

impl Glob {
    fn new(pattern: &str, double_star: bool) -> Result<Self, &'static str> {
        let characters: Vec<char> = pattern.chars().collect();
        let mut tokens = Vec::new();
        let mut index = 0;
        while index < characters.len() {
            match characters[index] {
                '*' => {
                    if double_star && characters.get(index + 1) == Some(&'*') {
                        index += 2;
                        if characters.get(index) == Some(&'/') {
                            index += 1;
                        }
                        tokens.push(if index == characters.len() {
                            Token::AnyRest
                        } else {
                            Token::AnyDirectories
                        });
                        continue;
                    }
                    if tokens.last() != Some(&Token::Star) {
                        tokens.push(Token::Star);
                    }
                    index += 1;
                }
                '?' => {
                    tokens.push(Token::AnyCharacter);
                    index += 1;
                }
                '\\' => {
                    let escaped = characters
                        .get(index + 1)
                        .ok_or("it ends with an unescaped backslash")?;
                    tokens.push(Token::Literal(*escaped));
                    index += 2;
                }
                '[' => {
                    index += 1;
                    let negated = characters.get(index) == Some(&'^');
                    if negated {
                        index += 1;
                    }
                    let mut ranges = Vec::new();
                    loop {
                        if characters.get(index) == Some(&']') && !ranges.is_empty() {
                            index += 1;
                            break;
                        }
                        let (low, next) = class_character(&characters, index)?;
                        index = next;
                        let mut high = low;
                        if characters[index] == '-' {
                            (high, index) = class_character(&characters, index + 1)?;
                        }
                        ranges.push((low, high));
                    }
                    tokens.push(Token::Class { negated, ranges });
                }
                character => {
                    tokens.push(Token::Literal(character));
                    index += 1;
                }
            }
        }
        Ok(Self { tokens })
    }

    fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = text.chars().collect();
        let mut failed = HashSet::new();
        self.match_at(0, 0, &text, &mut failed)
    }

    /// Whether `tokens[token..]` matches `text[position..]`; `failed` remembers the states
    /// already ruled out, so matching stays polynomial whatever the pattern.
    fn match_at(
        &self,
        token: usize,
        position: usize,
        text: &[char],
        failed: &mut HashSet<(usize, usize)>,
    ) -> bool {
        let Some(current) = self.tokens.get(token) else {
            return position == text.len();
        };
        if failed.contains(&(token, position)) {
            return false;
        }
        let next = text.get(position).copied();
        let matched = match current {
            Token::Literal(expected) => {
                next == Some(*expected) && self.match_at(token + 1, position + 1, text, failed)
            }
            Token::AnyCharacter => {
                next.is_some_and(|character| character != '/')
                    && self.match_at(token + 1, position + 1, text, failed)
            }
            Token::Class { negated, ranges } => {
                next.is_some_and(|character| {
                    ranges
                        .iter()
                        .any(|(low, high)| *low <= character && character <= *high)
                        != *negated
                }) && self.match_at(token + 1, position + 1, text, failed)
            }
            Token::Star => {
                let mut end = position;
                loop {
                    if self.match_at(token + 1, end, text, failed) {
                        break true;
                    }
                    if end < text.len() && text[end] != '/' {
                        end += 1;
                    } else {
                        break false;
                    }
                }
            }
            Token::AnyRest => self.match_at(token + 1, text.len(), text, failed),
            Token::AnyDirectories => {
                self.match_at(token + 1, position, text, failed)
                    || (position..text.len()).any(|end| {
                        text[end] == '/' && self.match_at(token + 1, end + 1, text, failed)
                    })
            }
        };
        if !matched {
            failed.insert((token, position));
        }
        matched
    }
}

/// Go's `getEsc`: one (possibly escaped) character of a class, which must not be the last
/// character of the pattern.
fn class_character(characters: &[char], mut index: usize) -> Result<(char, usize), &'static str> {
    const UNTERMINATED: &str = "a character class is not closed";
    match characters.get(index) {
        None => return Err(UNTERMINATED),
        Some('-' | ']') => return Err("`-` and `]` must be escaped inside a character class"),
        Some('\\') => index += 1,
        Some(_) => {}
    }
    let character = *characters.get(index).ok_or(UNTERMINATED)?;
    index += 1;
    if index >= characters.len() {
        return Err(UNTERMINATED);
    }
    Ok((character, index))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(pattern: &str) -> Glob {
        Glob::new(pattern, false).unwrap()
    }

    /// Cases from Go's `filepath.Match` tests (`matchTests`).
    #[test]
    fn globs_follow_go_filepath_match() {
        for (pattern, text, expected) in [
            ("abc", "abc", true),
            ("*", "abc", true),
            ("*c", "abc", true),
            ("a*", "a", true),
            ("a*", "abc", true),
            ("a*", "ab/c", false),
            ("a*/b", "abc/b", true),
            ("a*/b", "a/c/b", false),
            ("a*b*c*d*e*/f", "axbxcxdxe/f", true),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/f", true),
            ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", false),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", false),
            ("a*b?c*x", "abxbbxdbxebxczzx", true),
            ("a*b?c*x", "abxbbxdbxebxczzy", false),
            ("ab[c]", "abc", true),
            ("ab[b-d]", "abc", true),
            ("ab[e-g]", "abc", false),
            ("ab[^c]", "abc", false),
            ("ab[^b-d]", "abc", false),
            ("ab[^e-g]", "abc", true),
            ("a\\*b", "a*b", true),
            ("a\\*b", "ab", false),
            ("a?b", "a☺b", true),
            ("a[^a]b", "a☺b", true),
            ("a???b", "a☺b", false),
            ("a[^a][^a][^a]b", "a☺b", false),
            ("[a-ζ]*", "α", true),
            ("*[a-ζ]", "A", false),
            ("a?b", "a/b", false),
            ("a*b", "a/b", false),
            ("[\\]a]", "]", true),
            ("[\\-]", "-", true),
            ("[x\\-]", "x", true),
            ("[x\\-]", "-", true),
            ("[x\\-]", "z", false),
            ("[\\-x]", "x", true),
            ("[!a]", "!", true),
            ("*x", "xxx", true),
        ] {
            assert_eq!(glob(pattern).matches(text), expected, "{pattern} on {text}");
        }
    }

    #[test]
    fn malformed_globs_are_refused_like_go() {
        for pattern in [
            "[]a]", "[-]", "[x-]", "[", "[^", "[^bc", "a[", "ab\\", "[a-b-c]", "[]", "[\\",
        ] {
            assert!(Glob::new(pattern, false).is_err(), "{pattern}");
        }
    }

    #[test]
    fn exclude_patterns_follow_moby() {
        let patterns = |list: &[&str]| {
            ExcludePatterns::new(&list.iter().map(|p| p.to_string()).collect::<Vec<_>>()).unwrap()
        };
        let logs = patterns(&["*.log", "!keep.log"]);
        assert!(logs.is_excluded("a.log"));
        assert!(!logs.is_excluded("keep.log"));
        // `*.log` matches only at the top: moby patterns are anchored.
        assert!(!logs.is_excluded("sub/a.log"));
        assert!(!logs.can_skip());

        let deep = patterns(&["**/*.tmp", "build", "docs/**"]);
        assert!(deep.is_excluded("x.tmp"));
        assert!(deep.is_excluded("a/b/x.tmp"));
        assert!(deep.is_excluded("build/out/x"), "a parent match excludes");
        assert!(deep.is_excluded("docs/a/b"));
        assert!(!deep.is_excluded("docsx"));
        assert!(!deep.is_excluded("src/main.rs"));
        assert!(deep.can_skip());

        let rooted = patterns(&["/abs"]);
        assert!(
            !rooted.is_excluded("abs"),
            "a leading / never matches a relative path"
        );

        assert!(ExcludePatterns::new(&["!".to_string()]).is_err());
        assert!(ExcludePatterns::new(&["[".to_string()]).is_err());
    }

    /// Without `openat2` (kernels before 5.6, some seccomp profiles) paths are opened one
    /// component at a time, still refusing every symlink.
    #[test]
    fn paths_are_opened_without_following_symlinks_with_or_without_openat2() {
        let temp = tempfile::tempdir().unwrap();
        fs::create_dir_all(temp.path().join("a/b")).unwrap();
        fs::write(temp.path().join("a/b/file"), b"content").unwrap();
        std::os::unix::fs::symlink("a", temp.path().join("link")).unwrap();
        std::os::unix::fs::symlink("a/b/file", temp.path().join("file_link")).unwrap();
        let walker = Walker {
            directory: temp.path(),
            root: rustix::fs::open(
                temp.path(),
                OFlags::RDONLY | OFlags::DIRECTORY,
                Mode::empty(),
            )
            .unwrap(),
            filter: &NoFilter,
        };
        let attempts = || {
            ["a/b/file", "link/b/file", "file_link"]
                .map(|path| walker.open_raw(path, OFlags::RDONLY).is_ok())
        };
        let with_openat2 = attempts();
        OPENAT2_MISSING.store(true, Ordering::Relaxed);
        let without = attempts();
        OPENAT2_MISSING.store(false, Ordering::Relaxed);
        assert_eq!(with_openat2, [true, false, false]);
        assert_eq!(without, [true, false, false]);
    }

    #[test]
    fn sources_are_cleaned_and_split_at_the_first_wildcard() {
        let pattern = SourcePattern::parse("/a/./b/../c/*.rs").unwrap();
        assert_eq!(pattern.prefix, ["a", "c"]);
        assert_eq!(pattern.wildcards.len(), 1);
        let pattern = SourcePattern::parse("a\\*b/x").unwrap();
        assert_eq!(
            pattern.prefix,
            ["a\\*b", "x"],
            "an escaped star is no wildcard"
        );
        assert!(SourcePattern::parse("dir/").unwrap().must_be_directory);
        assert!(!SourcePattern::parse("/").unwrap().must_be_directory);
        assert!(matches!(
            SourcePattern::parse("a/../../b"),
            Err(ContextError::OutsideContext { .. })
        ));
        assert!(matches!(
            SourcePattern::parse("x/[a"),
            Err(ContextError::InvalidPattern { .. })
        ));
    }
}
