//! The sandbox's filesystems: the root (overlayfs or a directory), the pivot into it, what
//! Docker mounts inside (`/proc`, `/dev`, `/sys`, masked and read-only paths, the `/etc`
//! files) and the spec's own mounts — and, after the run, the removal of the mount points
//! that had to be created in the root so the step's layer holds only what the process did.
//!
//! Everything inside the root is mounted *after* `pivot_root`, with absolute paths: symbolic
//! links in the (untrusted) image then resolve inside the root and cannot point a mount at the
//! host. Host sources (bind mounts, the generated `/etc` files) are opened as detached mount
//! trees (`open_tree(2)`) before the pivot and attached afterwards (`move_mount(2)`).
//!
//! The sequence inside the root goes through the [`Syscalls`] trait so its order and its
//! bookkeeping of created mount points are unit-tested with a recording fake.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sys::statvfs::FsFlags;
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use thiserror::Error;

use crate::spec::RootFs;

/// Paths Docker hides from the container: `/dev/null` is bound over files, an empty read-only
/// tmpfs over directories (moby `oci/defaults.go`; powercap for CVE-2020-8694).
pub const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths Docker makes read-only (moby `oci/defaults.go`).
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Device nodes of Docker's `/dev`: name, major, minor.
const DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Symbolic links of Docker's `/dev`: link, target.
const DEV_SYMLINKS: &[(&str, &str)] = &[
    ("/dev/ptmx", "pts/ptmx"),
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
];

/// overlayfs takes its options as one string of at most a page (with its NUL).
const MOUNT_DATA_MAX: usize = 4095;

/// Why a filesystem of the sandbox could not be set up.
#[derive(Debug, Error)]
pub enum MountError {
    /// mount(2) or move_mount(2) failed.
    #[error("cannot mount {what} on {target}")]
    Mount {
        /// What was being mounted (file system type or source).
        what: String,
        /// Where.
        target: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// A missing mount point could not be created.
    #[error("cannot create mount point {path}")]
    CreateMountPoint {
        /// The path inside the root.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A mount destination is a symbolic link to nothing.
    #[error("mount point {path} is a symbolic link to a missing file")]
    DanglingSymlink {
        /// The path inside the root.
        path: String,
    },
    /// A bind-mount source could not be opened.
    #[error("cannot open bind-mount source {path}")]
    BindSource {
        /// The host path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A mount destination is not an absolute path.
    #[error("mount destination {destination} is not an absolute path")]
    RelativeDestination {
        /// As given.
        destination: String,
    },
    /// overlayfs cannot be told about a directory whose path has its separators.
    #[error("overlay directory {path} contains ':', ',' or '\\', which overlayfs cannot take")]
    OverlayPath {
        /// The offending directory.
        path: PathBuf,
    },
    /// Too many lower directories for one page of mount options.
    #[error(
        "overlay options for {count} lower directories exceed a page even relative to {parent}"
    )]
    OverlayOptionsTooLong {
        /// Number of lower directories.
        count: usize,
        /// Their common parent.
        parent: PathBuf,
    },
    /// pivot_root(2) or the detach of the old root failed.
    #[error("cannot pivot into the root {path}")]
    PivotRoot {
        /// The new root.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What a path in the root is, as far as mounting on it matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A directory.
    Directory,
    /// A symbolic link (only when not following links).
    Symlink,
    /// Anything else: a file, a device, a fifo.
    File,
}

/// The system calls of the in-root mount sequence; [`Kernel`] is the real one.
pub trait Syscalls {
    /// A detached mount tree opened before the pivot.
    type Tree;
    /// mount(2); empty strings are null pointers.
    fn mount(
        &mut self,
        source: &str,
        target: &str,
        fstype: &str,
        flags: MsFlags,
        data: &str,
    ) -> io::Result<()>;
    /// Attaches a detached tree at `target` (move_mount(2)).
    fn attach(&mut self, tree: Self::Tree, target: &str) -> io::Result<()>;
    /// What `path` is, `None` when it does not exist.
    fn kind(&mut self, path: &str, follow_symlinks: bool) -> io::Result<Option<FileKind>>;
    /// mkdir(2) with `mode`.
    fn mkdir(&mut self, path: &str, mode: u32) -> io::Result<()>;
    /// Creates an empty file, failing if it exists.
    fn create_file(&mut self, path: &str) -> io::Result<()>;
    /// Creates a character device node with mode 0666.
    fn mknod_char(&mut self, path: &str, major: u64, minor: u64) -> io::Result<()>;
    /// symlink(2): `link` pointing to `target`.
    fn symlink(&mut self, target: &str, link: &str) -> io::Result<()>;
    /// The per-mount flags of the mount holding `path`, to keep them on a read-only remount.
    fn mount_flags(&mut self, path: &str) -> io::Result<MsFlags>;
}

/// A spec mount ready to be attached inside the root.
#[derive(Debug)]
pub enum PreparedMount<T> {
    /// A host path, already opened as a detached tree.
    Bind {
        /// The tree.
        tree: T,
        /// Normalized absolute path inside.
        destination: String,
        /// Remount read-only.
        readonly: bool,
        /// The source is a directory (the mount point must be one).
        directory: bool,
    },
    /// A tmpfs.
    Tmpfs {
        /// Normalized absolute path inside.
        destination: String,
        /// Size limit in bytes.
        size: Option<u64>,
    },
}

/// Everything mounted inside the root after the pivot.
#[derive(Debug)]
pub struct InRootMounts<T> {
    /// Files bound over `/etc/...` (hosts, hostname, resolv.conf): absolute path and tree.
    pub etc_files: Vec<(&'static str, T)>,
    /// The spec's mounts, in order.
    pub mounts: Vec<PreparedMount<T>>,
}

/// Lexically normalizes an absolute path inside the root: no `.`, no `..` above `/`, no
/// repeated or trailing slashes. The result starts with `/`.
pub fn normalize_destination(destination: &str) -> Result<String, MountError> {
    if !destination.starts_with('/') {
        return Err(MountError::RelativeDestination {
            destination: destination.to_string(),
        });
    }
    let mut parts: Vec<&str> = Vec::new();
    for component in destination.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// Records the mount points the sequence had to create in the root.
struct Creator<'a, S> {
    sys: &'a mut S,
    /// Created paths, relative to the root, parents before children.
    created: &'a mut Vec<String>,
    /// Destinations of file systems mounted so far: what is created below them is not in
    /// the root's own tree and needs no cleanup.
    mounted: Vec<String>,
}

impl<S: Syscalls> Creator<'_, S> {
    fn mount(
        &mut self,
        source: &str,
        target: &str,
        fstype: &str,
        flags: MsFlags,
        data: &str,
    ) -> Result<(), MountError> {
        let what = if fstype.is_empty() { source } else { fstype };
        self.sys
            .mount(source, target, fstype, flags, data)
            .map_err(|source| MountError::Mount {
                what: what.to_string(),
                target: target.to_string(),
                source,
            })?;
        self.mounted.push(target.to_string());
        Ok(())
    }

    fn attach(&mut self, tree: S::Tree, what: &str, target: &str) -> Result<(), MountError> {
        self.sys
            .attach(tree, target)
            .map_err(|source| MountError::Mount {
                what: what.to_string(),
                target: target.to_string(),
                source,
            })?;
        self.mounted.push(target.to_string());
        Ok(())
    }

    fn on_mounted_filesystem(&self, path: &str) -> bool {
        self.mounted.iter().any(|mounted| {
            mounted == "/"
                || path
                    .strip_prefix(mounted.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    }

    /// Makes sure `path` (normalized, absolute) exists as a directory or a file, creating it
    /// and its missing parents, and records what it created.
    fn ensure(&mut self, path: &str, directory: bool) -> Result<(), MountError> {
        let error = |source: io::Error| MountError::CreateMountPoint {
            path: path.to_string(),
            source,
        };
        if self.sys.kind(path, true).map_err(error)?.is_some() {
            return Ok(());
        }
        if self.sys.kind(path, false).map_err(error)? == Some(FileKind::Symlink) {
            return Err(MountError::DanglingSymlink {
                path: path.to_string(),
            });
        }
        let record = !self.on_mounted_filesystem(path);
        // Below a symbolic link the created path is not where its name says: leave it (it
        // stays in the layer) rather than record a wrong name for the cleanup.
        let mut through_symlink = false;
        let mut prefix = String::new();
        let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        for (index, component) in components.iter().enumerate() {
            prefix.push('/');
            prefix.push_str(component);
            let last = index + 1 == components.len();
            match self.sys.kind(&prefix, false).map_err(error)? {
                Some(FileKind::Directory) => {}
                Some(FileKind::Symlink) => through_symlink = true,
                Some(FileKind::File) => {
                    return Err(error(io::Error::from_raw_os_error(libc::ENOTDIR)));
                }
                None => {
                    if last && !directory {
                        self.sys.create_file(&prefix).map_err(error)?;
                    } else {
                        self.sys.mkdir(&prefix, 0o755).map_err(error)?;
                    }
                    if record && !through_symlink {
                        self.created.push(prefix[1..].to_string());
                    }
                }
            }
        }
        Ok(())
    }
}

/// Mounts Docker's file systems and then `mounts` inside the root, which is `/` now (after
/// the pivot), and masks and write-protects Docker's paths. Appends the mount points created
/// in the root to `created` (relative to it, parents first) — also those created before a
/// failure, so they can be cleaned up.
pub fn mount_in_root<S: Syscalls>(
    sys: &mut S,
    mounts: InRootMounts<S::Tree>,
    created: &mut Vec<String>,
) -> Result<(), MountError> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mut creator = Creator {
        sys,
        created,
        mounted: Vec::new(),
    };

    creator.ensure("/proc", true)?;
    creator.mount("proc", "/proc", "proc", nosuid_nodev_noexec, "")?;

    creator.ensure("/dev", true)?;
    creator.mount(
        "tmpfs",
        "/dev",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        "mode=755,size=65536k",
    )?;
    // Device nodes are made, not bound from the host, as runc does outside a user namespace
    // (libcontainer/rootfs_linux.go `createDevices`).
    for (name, major, minor) in DEVICES {
        let path = format!("/dev/{name}");
        creator
            .sys
            .mknod_char(&path, *major, *minor)
            .map_err(|source| MountError::CreateMountPoint { path, source })?;
    }
    for (directory, fstype, flags, data) in [
        (
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620,gid=5",
        ),
        (
            "/dev/shm",
            "tmpfs",
            nosuid_nodev_noexec,
            "mode=1777,size=65536k",
        ),
        ("/dev/mqueue", "mqueue", nosuid_nodev_noexec, ""),
    ] {
        creator.ensure(directory, true)?;
        creator.mount(fstype, directory, fstype, flags, data)?;
    }
    for (link, target) in DEV_SYMLINKS {
        creator
            .sys
            .symlink(target, link)
            .map_err(|source| MountError::CreateMountPoint {
                path: link.to_string(),
                source,
            })?;
    }

    // A fresh sysfs shows the network devices of the sandbox's own network namespace (the
    // host's with the host network); real root may mount it either way.
    creator.ensure("/sys", true)?;
    creator.mount(
        "sysfs",
        "/sys",
        "sysfs",
        MsFlags::MS_RDONLY | nosuid_nodev_noexec,
        "",
    )?;

    for (path, tree) in mounts.etc_files {
        creator.ensure(path, false)?;
        creator.attach(tree, path, path)?;
    }

    for mount in mounts.mounts {
        match mount {
            PreparedMount::Bind {
                tree,
                destination,
                readonly,
                directory,
            } => {
                creator.ensure(&destination, directory)?;
                creator.attach(tree, "bind mount", &destination)?;
                if readonly {
                    remount_readonly(&mut creator, &destination)?;
                }
            }
            PreparedMount::Tmpfs { destination, size } => {
                creator.ensure(&destination, true)?;
                let data = size.map(|size| format!("size={size}")).unwrap_or_default();
                creator.mount(
                    "tmpfs",
                    &destination,
                    "tmpfs",
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    &data,
                )?;
            }
        }
    }

    // Masks and read-only paths last, over everything else (runc does the same).
    for path in MASKED_PATHS {
        let kind = creator
            .sys
            .kind(path, true)
            .map_err(|source| MountError::Mount {
                what: "mask".to_string(),
                target: path.to_string(),
                source,
            })?;
        match kind {
            None => {}
            Some(FileKind::Directory) => {
                creator.mount("tmpfs", path, "tmpfs", MsFlags::MS_RDONLY, "")?;
            }
            Some(_) => creator.mount("/dev/null", path, "", MsFlags::MS_BIND, "")?,
        }
    }
    for path in READONLY_PATHS {
        let exists = creator
            .sys
            .kind(path, true)
            .map_err(|source| MountError::Mount {
                what: "read-only bind".to_string(),
                target: path.to_string(),
                source,
            })?
            .is_some();
        if exists {
            creator.mount(path, path, "", MsFlags::MS_BIND | MsFlags::MS_REC, "")?;
            remount_readonly(&mut creator, path)?;
        }
    }
    Ok(())
}

/// Remounts the bind mount at `path` read-only, keeping its nosuid/nodev/noexec/atime flags
/// (a bind remount sets all of them anew: dropping one would turn a host `nosuid` into suid).
fn remount_readonly<S: Syscalls>(
    creator: &mut Creator<'_, S>,
    path: &str,
) -> Result<(), MountError> {
    let error = |source| MountError::Mount {
        what: "read-only remount".to_string(),
        target: path.to_string(),
        source,
    };
    let kept = creator.sys.mount_flags(path).map_err(error)?;
    creator
        .sys
        .mount(
            "",
            path,
            "",
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | kept,
            "",
        )
        .map_err(error)
}

/// The real system calls.
pub struct Kernel;

fn missing_as_none<T>(result: io::Result<T>) -> io::Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

fn optional(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

impl Syscalls for Kernel {
    type Tree = OwnedFd;

    fn mount(
        &mut self,
        source: &str,
        target: &str,
        fstype: &str,
        flags: MsFlags,
        data: &str,
    ) -> io::Result<()> {
        nix::mount::mount(
            optional(source),
            target,
            optional(fstype),
            flags,
            optional(data),
        )?;
        Ok(())
    }

    fn attach(&mut self, tree: OwnedFd, target: &str) -> io::Result<()> {
        use rustix::mount::{MoveMountFlags, move_mount};
        move_mount(
            tree.as_fd(),
            "",
            rustix::fs::CWD,
            target,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_SYMLINKS,
        )?;
        Ok(())
    }

    fn kind(&mut self, path: &str, follow_symlinks: bool) -> io::Result<Option<FileKind>> {
        let metadata = if follow_symlinks {
            std::fs::metadata(path)
        } else {
            std::fs::symlink_metadata(path)
        };
        Ok(missing_as_none(metadata)?.map(|metadata| {
            let file_type = metadata.file_type();
            if file_type.is_dir() {
                FileKind::Directory
            } else if file_type.is_symlink() {
                FileKind::Symlink
            } else {
                FileKind::File
            }
        }))
    }

    fn mkdir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        std::fs::DirBuilder::new().mode(mode).create(path)
    }

    fn create_file(&mut self, path: &str) -> io::Result<()> {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(path)
            .map(drop)
    }

    fn mknod_char(&mut self, path: &str, major: u64, minor: u64) -> io::Result<()> {
        use nix::sys::stat::{FchmodatFlags, Mode as NixMode, SFlag, fchmodat, makedev, mknod};
        let mode = NixMode::from_bits_truncate(0o666);
        mknod(path, SFlag::S_IFCHR, mode, makedev(major, minor))?;
        // mknod(2) applies the umask.
        fchmodat(rustix::fs::CWD, path, mode, FchmodatFlags::FollowSymlink)?;
        Ok(())
    }

    fn symlink(&mut self, target: &str, link: &str) -> io::Result<()> {
        std::os::unix::fs::symlink(target, link)
    }

    fn mount_flags(&mut self, path: &str) -> io::Result<MsFlags> {
        let flags = nix::sys::statvfs::statvfs(path)?.flags();
        let mut kept = MsFlags::empty();
        for (statvfs_flag, mount_flag) in [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        ] {
            if flags.contains(statvfs_flag) {
                kept |= mount_flag;
            }
        }
        Ok(kept)
    }
}

/// Opens `source` on the host as a detached copy of its mount (not of the mounts below it),
/// to be attached inside the root after the pivot. Returns the tree and whether it is a
/// directory.
pub fn open_bind_source(source: &Path) -> Result<(OwnedFd, bool), MountError> {
    use rustix::mount::{OpenTreeFlags, open_tree};
    let error = |source_error: io::Error| MountError::BindSource {
        path: source.to_path_buf(),
        source: source_error,
    };
    let directory = std::fs::metadata(source).map_err(error)?.is_dir();
    let tree = open_tree(
        rustix::fs::CWD,
        source,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .map_err(|errno| error(errno.into()))?;
    Ok((tree, directory))
}

/// How to mount an overlay: the option string, and the directory to run mount(2) from when
/// the options name the directories relative to it.
#[derive(Debug, PartialEq, Eq)]
pub struct OverlayOptions {
    /// Working directory for the mount(2) call, if paths are relative.
    pub chdir: Option<PathBuf>,
    /// `lowerdir=...,upperdir=...,workdir=...`.
    pub data: String,
}

fn overlay_data(lower: &[&Path], upper: &Path, work: &Path, extra: &str) -> String {
    let lower: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
    format!(
        "lowerdir={},upperdir={},workdir={}{extra}",
        lower.join(":"),
        upper.display(),
        work.display()
    )
}

/// The overlayfs options for `lower` (topmost first), `upper` and `work`, then `extra`
/// (`,key=value...`). Absolute paths when they fit in a page; else relative to the
/// directories' common parent (the cache keeps all snapshots in one directory, so that
/// roughly doubles the number of layers that fit).
pub fn overlay_options(
    lower: &[&Path],
    upper: &Path,
    work: &Path,
    extra: &str,
) -> Result<OverlayOptions, MountError> {
    for path in lower.iter().copied().chain([upper, work]) {
        let text = path.as_os_str().as_encoded_bytes();
        if text.iter().any(|b| matches!(b, b':' | b',' | b'\\')) {
            return Err(MountError::OverlayPath {
                path: path.to_path_buf(),
            });
        }
    }
    let data = overlay_data(lower, upper, work, extra);
    if data.len() <= MOUNT_DATA_MAX {
        return Ok(OverlayOptions { chdir: None, data });
    }
    let mut parent = upper.to_path_buf();
    for path in lower.iter().copied().chain([work]) {
        while !path.starts_with(&parent) {
            if !parent.pop() {
                break;
            }
        }
    }
    let relative = |path: &Path| -> PathBuf {
        let stripped = path.strip_prefix(&parent).unwrap_or(path);
        if stripped.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            stripped.to_path_buf()
        }
    };
    let lower_relative: Vec<PathBuf> = lower.iter().map(|p| relative(p)).collect();
    let lower_refs: Vec<&Path> = lower_relative.iter().map(PathBuf::as_path).collect();
    let data = overlay_data(&lower_refs, &relative(upper), &relative(work), extra);
    if data.len() > MOUNT_DATA_MAX {
        return Err(MountError::OverlayOptionsTooLong {
            count: lower.len(),
            parent,
        });
    }
    Ok(OverlayOptions {
        chdir: Some(parent),
        data,
    })
}

/// Options that keep the upper directory a plain layer: no redirect or metacopy xattrs the
/// layer differ would have to understand (a renamed lower directory is copied up whole),
/// no inode index tying `upper` to these lower directories; and `volatile`: no syncfs of the
/// upper file system on unmount (milliseconds per run, seconds after a big install) — the
/// upper directory is scratch until the cache commits it, and a crash discards it anyway.
const OVERLAY_EXTRA_OPTIONS: &str = ",redirect_dir=off,index=off,metacopy=off,volatile";

/// Where overlayfs marks a work directory used with `volatile`; it refuses to mount it again
/// until the mark is removed (Documentation/filesystems/overlayfs.rst, "Volatile mount").
fn volatile_mark(work: &Path) -> PathBuf {
    work.join("work/incompat/volatile")
}

/// Removes the `volatile` mark from an overlay work directory after its unmount, so the same
/// upper and work directories can be mounted again.
pub fn forget_volatile(rootfs: &RootFs) {
    if let RootFs::Overlay { work, .. } = rootfs {
        let mark = volatile_mark(work);
        // The mark is a directory holding a `dirty` file.
        if std::fs::remove_dir_all(&mark).is_ok() {
            let _ = std::fs::remove_dir(mark.parent().unwrap_or(work));
        }
    }
}

/// Mounts the root file system at `target` (a directory of the helper's scratch space):
/// an overlay, with `empty_lower` as the lower directory when the spec has none, or a bind of
/// the directory. Runs in the container's mount namespace before the pivot; may change the
/// working directory.
pub fn mount_rootfs(rootfs: &RootFs, target: &Path, empty_lower: &Path) -> Result<(), MountError> {
    let error = |what: &str, source: nix::errno::Errno| MountError::Mount {
        what: what.to_string(),
        target: target.display().to_string(),
        source: source.into(),
    };
    match rootfs {
        RootFs::Overlay { lower, upper, work } => {
            let lower: Vec<&Path> = if lower.is_empty() {
                vec![empty_lower]
            } else {
                lower.iter().map(PathBuf::as_path).collect()
            };
            mount_overlay(&lower, upper, work, target)
        }
        RootFs::Directory(directory) => nix::mount::mount(
            Some(directory.as_path()),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| error(&directory.display().to_string(), e)),
    }
}

/// Mounts an overlay of `lower` (topmost first), `upper` and `work` at `target`, with the
/// options that keep `upper` a plain layer. May change the working directory.
fn mount_overlay(
    lower: &[&Path],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), MountError> {
    let error = |source: nix::errno::Errno| MountError::Mount {
        what: "overlay".to_string(),
        target: target.display().to_string(),
        source: source.into(),
    };
    // Many lower directories (a deep image) can exceed the page mount(2) takes even as
    // relative paths: then each is reached through a short symbolic link in a directory beside
    // the work directory (`l/0`, `l/1`, ...), as Docker's overlay2 driver does.
    let links: Vec<PathBuf>;
    let lower: Vec<&Path> = match overlay_options(lower, upper, work, OVERLAY_EXTRA_OPTIONS) {
        Err(MountError::OverlayOptionsTooLong { .. }) => {
            let directory = work.with_file_name("l");
            let _ = std::fs::remove_dir_all(&directory);
            std::fs::create_dir(&directory).map_err(|source| MountError::Mount {
                what: format!(
                    "the short links of overlay layers in {}",
                    directory.display()
                ),
                target: target.display().to_string(),
                source,
            })?;
            links = lower
                .iter()
                .enumerate()
                .map(|(index, path)| {
                    let link = directory.join(index.to_string());
                    std::os::unix::fs::symlink(path, &link).map(|()| link)
                })
                .collect::<Result<_, _>>()
                .map_err(|source| MountError::Mount {
                    what: format!(
                        "the short links of overlay layers in {}",
                        directory.display()
                    ),
                    target: target.display().to_string(),
                    source,
                })?;
            links.iter().map(PathBuf::as_path).collect()
        }
        _ => lower.to_vec(),
    };
    let lower = lower.as_slice();
    let mount = |extra: &str| -> Result<(), MountError> {
        let options = overlay_options(lower, upper, work, extra)?;
        if let Some(directory) = &options.chdir {
            nix::unistd::chdir(directory.as_path()).map_err(error)?;
        }
        nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.data.as_str()),
        )
        .map_err(error)
    };
    match mount(OVERLAY_EXTRA_OPTIONS) {
        // Kernels before 5.10 know no `volatile`: mount as they can.
        Err(MountError::Mount { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            mount("")
        }
        other => other,
    }
}

/// Mounts an overlay of `lower`, `upper` and `work` at `mount_point` (a directory of the
/// helper's scratch space, before the pivot) and opens `source` inside it as a detached
/// mount tree, to be attached inside the root after the pivot like a bind source. `source`
/// is resolved with the overlay as its root: an image's symbolic links cannot lead out of
/// it. Returns the tree and whether it is a directory.
pub fn open_overlay_source(
    lower: &[&Path],
    upper: &Path,
    work: &Path,
    mount_point: &Path,
    source: &str,
) -> Result<(OwnedFd, bool), MountError> {
    use rustix::mount::{OpenTreeFlags, open_tree};
    mount_overlay(lower, upper, work, mount_point)?;
    let error = |source_error: io::Error| MountError::BindSource {
        path: mount_point.join(source.trim_start_matches('/')),
        source: source_error,
    };
    let overlay = rustix::fs::open(
        mount_point,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| error(errno.into()))?;
    let relative = source.trim_start_matches('/');
    let found = rustix::fs::openat2(
        &overlay,
        if relative.is_empty() { "." } else { relative },
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV,
    )
    .map_err(|errno| error(errno.into()))?;
    let directory = rustix::fs::fstat(&found)
        .map(|stat| rustix::fs::FileType::from_raw_mode(stat.st_mode).is_dir())
        .map_err(|errno| error(errno.into()))?;
    let tree = open_tree(
        &found,
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(|errno| error(errno.into()))?;
    Ok((tree, directory))
}

/// Makes `new_root` the root of this mount namespace and detaches the old one, without
/// creating a `put_old` directory in the root (pivot_root(2): `pivot_root(".", ".")`).
pub fn pivot_into(new_root: &Path) -> Result<(), MountError> {
    let error = |source: nix::errno::Errno| MountError::PivotRoot {
        path: new_root.to_path_buf(),
        source: source.into(),
    };
    nix::unistd::chdir(new_root).map_err(error)?;
    nix::unistd::pivot_root(".", ".").map_err(error)?;
    nix::mount::umount2(".", MntFlags::MNT_DETACH).map_err(error)?;
    nix::unistd::chdir("/").map_err(error)
}

/// Opens `path` (relative, may be empty for `base` itself) below `base` without following
/// any symbolic link or leaving `base`: the process may have replaced a directory of its
/// root by a link to the host.
fn open_beneath(base: &OwnedFd, path: &str, flags: OFlags) -> io::Result<OwnedFd> {
    let path = if path.is_empty() { "." } else { path };
    Ok(rustix::fs::openat2(
        base,
        path,
        flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::BENEATH
            | ResolveFlags::NO_SYMLINKS
            | ResolveFlags::NO_MAGICLINKS
            | ResolveFlags::NO_XDEV,
    )?)
}

fn split_parent(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some((parent, name)) => (parent, name),
        None => ("", path),
    }
}

/// Removes `path` from below `base` if it is still what a mount point left: an empty
/// directory or an empty regular file. Missing paths are fine.
fn remove_if_empty(base: &OwnedFd, path: &str) -> io::Result<()> {
    let (parent, name) = split_parent(path);
    let parent =
        match missing_as_none(open_beneath(base, parent, OFlags::PATH | OFlags::DIRECTORY))? {
            Some(parent) => parent,
            None => return Ok(()),
        };
    let stat = match missing_as_none(
        rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW).map_err(io::Error::from),
    )? {
        Some(stat) => stat,
        None => return Ok(()),
    };
    let file_type = rustix::fs::FileType::from_raw_mode(stat.st_mode);
    let result = match file_type {
        rustix::fs::FileType::Directory => rustix::fs::unlinkat(&parent, name, AtFlags::REMOVEDIR),
        rustix::fs::FileType::RegularFile if stat.st_size == 0 => {
            rustix::fs::unlinkat(&parent, name, AtFlags::empty())
        }
        _ => return Ok(()),
    };
    match result {
        Err(rustix::io::Errno::NOTEMPTY | rustix::io::Errno::EXIST | rustix::io::Errno::NOENT) => {
            Ok(())
        }
        other => Ok(other?),
    }
}

/// Whether the directory has extended attributes beyond the ones overlayfs sets on a plain
/// copy-up (`impure`, `origin`): opaque or redirected directories and the process's own
/// xattrs are changes to keep.
fn has_meaningful_xattrs(directory: &OwnedFd) -> io::Result<bool> {
    let mut names = vec![0u8; 4096];
    let length = rustix::fs::flistxattr(directory, &mut names[..])?;
    Ok(names[..length]
        .split(|b| *b == 0)
        .filter(|name| !name.is_empty())
        .any(|name| !matches!(name, b"trusted.overlay.impure" | b"trusted.overlay.origin")))
}

/// Removes the directory `path` from `upper` if it is only overlayfs's copy-up of a lower
/// directory made when a mount point was created in it: empty, no meaningful xattrs, and the
/// same type, mode and owner as in the topmost lower directory that has it.
fn remove_copied_up_directory(upper: &OwnedFd, lower: &[OwnedFd], path: &str) -> io::Result<()> {
    let directory = match missing_as_none(open_beneath(
        upper,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY,
    ))? {
        Some(directory) => directory,
        None => return Ok(()),
    };
    if has_meaningful_xattrs(&directory)? {
        return Ok(());
    }
    let upper_stat = rustix::fs::fstat(&directory)?;
    let (parent, name) = split_parent(path);
    for layer in lower {
        let parent = match missing_as_none(open_beneath(
            layer,
            parent,
            OFlags::PATH | OFlags::DIRECTORY,
        )) {
            Ok(Some(parent)) => parent,
            // A missing or non-directory parent in this layer: look further down.
            Ok(None) | Err(_) => continue,
        };
        match rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(lower_stat) => {
                let same = lower_stat.st_mode == upper_stat.st_mode
                    && lower_stat.st_uid == upper_stat.st_uid
                    && lower_stat.st_gid == upper_stat.st_gid;
                if same {
                    return remove_if_empty(upper, path);
                }
                return Ok(());
            }
            Err(rustix::io::Errno::NOENT) => continue,
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(())
}

/// After the run: removes from the root's tree (the overlay's upper directory, or the root
/// directory) the mount points the sandbox created (`created`, relative, parents first), when
/// they are still empty, and the directories overlayfs copied up only to hold them.
pub fn remove_created_mount_points(rootfs: &RootFs, created: &[String]) -> io::Result<()> {
    if created.is_empty() {
        return Ok(());
    }
    let (base, lower) = match rootfs {
        RootFs::Overlay { lower, upper, .. } => (upper, lower.as_slice()),
        RootFs::Directory(directory) => (directory, &[][..]),
    };
    let open_directory = |path: &Path| -> io::Result<OwnedFd> {
        Ok(rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?)
    };
    let base = open_directory(base)?;
    let mut first_error = None;
    for path in created.iter().rev() {
        if let Err(error) = remove_if_empty(&base, path) {
            first_error.get_or_insert(error);
        }
    }
    if matches!(rootfs, RootFs::Overlay { .. }) && !lower.is_empty() {
        let lower = lower
            .iter()
            .map(|path| open_directory(path))
            .collect::<io::Result<Vec<_>>>()?;
        let created_set: BTreeSet<&str> = created.iter().map(String::as_str).collect();
        let mut ancestors = BTreeSet::new();
        for path in created {
            let mut current = path.as_str();
            while let Some((parent, _)) = current.rsplit_once('/') {
                if !created_set.contains(parent) {
                    ancestors.insert(parent.to_string());
                }
                current = parent;
            }
        }
        // Deepest first, so a parent is emptied before it is looked at.
        let mut ancestors: Vec<String> = ancestors.into_iter().collect();
        ancestors.sort_by_key(|path| std::cmp::Reverse(path.matches('/').count()));
        for path in ancestors {
            if let Err(error) = remove_copied_up_directory(&base, &lower, &path) {
                first_error.get_or_insert(error);
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Records the calls and keeps a fake tree of paths.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<String>,
        tree: BTreeMap<String, FileKind>,
        /// Symbolic links: path → whether the target exists (and is a directory).
        links: BTreeMap<String, Option<FileKind>>,
    }

    impl Recorder {
        fn with(paths: &[(&str, FileKind)]) -> Self {
            let mut recorder = Recorder::default();
            for (path, kind) in paths {
                recorder.tree.insert(path.to_string(), *kind);
            }
            recorder
        }
    }

    impl Syscalls for Recorder {
        type Tree = &'static str;

        fn mount(
            &mut self,
            source: &str,
            target: &str,
            fstype: &str,
            flags: MsFlags,
            data: &str,
        ) -> io::Result<()> {
            let flags: Vec<&str> = flags.iter_names().map(|(name, _)| name).collect();
            let flags = flags.join("|");
            self.calls
                .push(format!("mount {source} {target} {fstype} {flags} {data}"));
            Ok(())
        }

        fn attach(&mut self, tree: &'static str, target: &str) -> io::Result<()> {
            self.calls.push(format!("attach {tree} {target}"));
            Ok(())
        }

        fn kind(&mut self, path: &str, follow_symlinks: bool) -> io::Result<Option<FileKind>> {
            if let Some(target) = self.links.get(path) {
                return Ok(if follow_symlinks {
                    *target
                } else {
                    Some(FileKind::Symlink)
                });
            }
            Ok(self.tree.get(path).copied())
        }

        fn mkdir(&mut self, path: &str, _mode: u32) -> io::Result<()> {
            self.calls.push(format!("mkdir {path}"));
            self.tree.insert(path.to_string(), FileKind::Directory);
            Ok(())
        }

        fn create_file(&mut self, path: &str) -> io::Result<()> {
            self.calls.push(format!("create {path}"));
            self.tree.insert(path.to_string(), FileKind::File);
            Ok(())
        }

        fn mknod_char(&mut self, path: &str, major: u64, minor: u64) -> io::Result<()> {
            self.calls.push(format!("mknod {path} {major}:{minor}"));
            self.tree.insert(path.to_string(), FileKind::File);
            Ok(())
        }

        fn symlink(&mut self, target: &str, link: &str) -> io::Result<()> {
            self.calls.push(format!("symlink {link} -> {target}"));
            Ok(())
        }

        fn mount_flags(&mut self, path: &str) -> io::Result<MsFlags> {
            Ok(if path.starts_with("/proc") {
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC
            } else {
                MsFlags::MS_NOSUID
            })
        }
    }

    fn busybox_like() -> Recorder {
        Recorder::with(&[
            ("/", FileKind::Directory),
            ("/proc", FileKind::Directory),
            ("/dev", FileKind::Directory),
            ("/sys", FileKind::Directory),
            ("/etc", FileKind::Directory),
            ("/etc/hostname", FileKind::File),
            ("/proc/kcore", FileKind::File),
            ("/proc/keys", FileKind::File),
            ("/proc/scsi", FileKind::Directory),
            ("/proc/sys", FileKind::Directory),
            ("/sys/firmware", FileKind::Directory),
        ])
    }

    fn no_extra_mounts() -> InRootMounts<&'static str> {
        InRootMounts {
            etc_files: vec![
                ("/etc/hosts", "hosts"),
                ("/etc/hostname", "hostname"),
                ("/etc/resolv.conf", "resolv"),
            ],
            mounts: Vec::new(),
        }
    }

    #[test]
    fn docker_filesystems_are_mounted_in_order() {
        let mut recorder = busybox_like();
        mount_in_root(&mut recorder, no_extra_mounts(), &mut Vec::new()).unwrap();
        let mounts: Vec<&str> = recorder
            .calls
            .iter()
            .filter(|call| call.starts_with("mount ") || call.starts_with("attach "))
            .map(|call| call.split(' ').take(3).collect::<Vec<_>>())
            .map(|parts| parts[2])
            .collect();
        assert_eq!(
            mounts,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/etc/hosts",
                "/etc/hostname",
                "/etc/resolv.conf",
                "/proc/kcore",
                "/proc/keys",
                "/proc/scsi",
                "/sys/firmware",
                "/proc/sys",
                "/proc/sys",
            ]
        );
    }

    #[test]
    fn masked_files_get_dev_null_and_directories_a_readonly_tmpfs() {
        let mut recorder = busybox_like();
        mount_in_root(&mut recorder, no_extra_mounts(), &mut Vec::new()).unwrap();
        assert!(
            recorder
                .calls
                .contains(&"mount /dev/null /proc/kcore  MS_BIND ".to_string())
        );
        assert!(
            recorder
                .calls
                .contains(&"mount tmpfs /proc/scsi tmpfs MS_RDONLY ".to_string())
        );
        // Missing masked paths are skipped.
        assert!(!recorder.calls.iter().any(|c| c.contains("/proc/acpi")));
    }

    #[test]
    fn readonly_remount_keeps_the_mount_flags() {
        let mut recorder = busybox_like();
        mount_in_root(&mut recorder, no_extra_mounts(), &mut Vec::new()).unwrap();
        let remount = recorder
            .calls
            .iter()
            .find(|c| c.contains("/proc/sys") && c.contains("MS_REMOUNT"))
            .unwrap();
        for flag in ["MS_RDONLY", "MS_NOSUID", "MS_NODEV", "MS_NOEXEC", "MS_BIND"] {
            assert!(remount.contains(flag), "{remount}");
        }
    }

    #[test]
    fn only_mount_points_created_in_the_root_are_recorded() {
        let mut recorder = busybox_like();
        let mut created = Vec::new();
        mount_in_root(&mut recorder, no_extra_mounts(), &mut created).unwrap();
        // /etc/hostname exists in the image; /dev/pts etc. are on the /dev tmpfs.
        assert_eq!(created, ["etc/hosts", "etc/resolv.conf"]);
    }

    #[test]
    fn missing_root_directories_are_created_and_recorded() {
        let mut recorder = Recorder::with(&[("/", FileKind::Directory)]);
        let mounts = InRootMounts {
            etc_files: vec![("/etc/hosts", "hosts")],
            mounts: vec![
                PreparedMount::Bind {
                    tree: "cache",
                    destination: "/var/cache/apt".to_string(),
                    readonly: true,
                    directory: true,
                },
                PreparedMount::Tmpfs {
                    destination: "/var/cache/apt/tmp".to_string(),
                    size: Some(1 << 20),
                },
            ],
        };
        let mut created = Vec::new();
        mount_in_root(&mut recorder, mounts, &mut created).unwrap();
        assert_eq!(
            created,
            [
                "proc",
                "dev",
                "sys",
                "etc",
                "etc/hosts",
                "var",
                "var/cache",
                "var/cache/apt"
            ]
        );
        assert!(
            recorder.calls.iter().any(
                |c| c == "mount tmpfs /var/cache/apt/tmp tmpfs MS_NOSUID|MS_NODEV size=1048576"
            )
        );
        let readonly = recorder
            .calls
            .iter()
            .position(|c| c.contains("/var/cache/apt ") && c.contains("MS_RDONLY"))
            .unwrap();
        let attach = recorder
            .calls
            .iter()
            .position(|c| c == "attach cache /var/cache/apt")
            .unwrap();
        assert!(attach < readonly);
    }

    #[test]
    fn dangling_symlink_mount_point_is_an_error() {
        let mut recorder = busybox_like();
        recorder.links.insert("/etc/resolv.conf".to_string(), None);
        let mut created = Vec::new();
        let error = mount_in_root(&mut recorder, no_extra_mounts(), &mut created).unwrap_err();
        assert!(
            matches!(error, MountError::DanglingSymlink { path } if path == "/etc/resolv.conf")
        );
        // What was created before the failure is still reported for the cleanup.
        assert_eq!(created, ["etc/hosts"]);
    }

    #[test]
    fn destinations_are_normalized_inside_the_root() {
        assert_eq!(normalize_destination("/a/./b//c/").unwrap(), "/a/b/c");
        assert_eq!(normalize_destination("/../../etc").unwrap(), "/etc");
        assert_eq!(normalize_destination("/").unwrap(), "/");
        assert!(normalize_destination("etc").is_err());
    }

    #[test]
    fn overlay_options_use_absolute_paths_when_they_fit() {
        let options = overlay_options(
            &[Path::new("/s/2"), Path::new("/s/1")],
            Path::new("/s/u"),
            Path::new("/s/w"),
            ",volatile",
        )
        .unwrap();
        assert_eq!(
            options,
            OverlayOptions {
                chdir: None,
                data: "lowerdir=/s/2:/s/1,upperdir=/s/u,workdir=/s/w,volatile".to_string()
            }
        );
    }

    #[test]
    fn long_overlay_options_become_relative_to_the_common_parent() {
        let parent = format!("/var/lib/rbuild/v1/{}", "p".repeat(60));
        let lower: Vec<PathBuf> = (0..50)
            .map(|i| PathBuf::from(format!("{parent}/snapshots/{i:064}")))
            .collect();
        let lower_refs: Vec<&Path> = lower.iter().map(PathBuf::as_path).collect();
        let upper = PathBuf::from(format!("{parent}/run/upper"));
        let work = PathBuf::from(format!("{parent}/run/work"));
        let options = overlay_options(&lower_refs, &upper, &work, OVERLAY_EXTRA_OPTIONS).unwrap();
        assert_eq!(options.chdir, Some(PathBuf::from(&parent)));
        assert!(
            options
                .data
                .starts_with(&format!("lowerdir=snapshots/{:064}:", 0))
        );
        assert!(options.data.ends_with(&format!(
            ",upperdir=run/upper,workdir=run/work{OVERLAY_EXTRA_OPTIONS}"
        )));
        assert!(options.data.len() <= MOUNT_DATA_MAX);

        let too_many: Vec<PathBuf> = (0..200)
            .map(|i| PathBuf::from(format!("{parent}/snapshots/{i:064}")))
            .collect();
        let refs: Vec<&Path> = too_many.iter().map(PathBuf::as_path).collect();
        assert!(matches!(
            overlay_options(&refs, &upper, &work, ""),
            Err(MountError::OverlayOptionsTooLong { count: 200, .. })
        ));
    }

    #[test]
    fn overlay_separators_in_paths_are_refused() {
        assert!(matches!(
            overlay_options(&[Path::new("/a:b")], Path::new("/u"), Path::new("/w"), ""),
            Err(MountError::OverlayPath { .. })
        ));
    }
}
