//! Layer application against hostile archives (containerd's and moby's breakout cases) and the
//! ordinary work of applying layers: metadata, whiteouts, opaque directories, long names.
//!
//! Every hostile test keeps a `victim/` directory next to the target `root/` and checks it is
//! untouched: same paths, kinds, modes, owners, times, link counts, contents and xattrs.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use rbuild_cache::apply::{
    ApplyError, ApplyOptions, ApplyReport, SkipReason, Skipped, WhiteoutMode, apply_layer,
};
use tar::{EntryType, Header};

const MTIME: u64 = 1_600_000_000;

// ---------------------------------------------------------------------------------------------
// Fixtures

struct Fixture {
    dir: tempfile::TempDir,
    root: PathBuf,
    victim: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(dir.path()).unwrap();
        let root = base.join("root");
        let victim = base.join("victim");
        fs::create_dir(&root).unwrap();
        fs::create_dir_all(victim.join("sub")).unwrap();
        fs::write(victim.join("file"), b"victim content").unwrap();
        fs::set_permissions(victim.join("file"), fs::Permissions::from_mode(0o640)).unwrap();
        fs::write(victim.join("sub/inner"), b"inner content").unwrap();
        fs::set_permissions(victim.join("sub/inner"), fs::Permissions::from_mode(0o600)).unwrap();
        symlink("file", victim.join("link")).unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o750)).unwrap();
        Self { dir, root, victim }
    }

    /// The victim's absolute host path as bytes (what a hostile layer would name).
    fn victim_bytes(&self) -> Vec<u8> {
        self.victim.as_os_str().as_bytes().to_vec()
    }

    /// Where an absolute host path lands when confined to the root.
    fn in_root(&self, absolute: &Path) -> PathBuf {
        self.root.join(absolute.strip_prefix("/").unwrap())
    }

    fn snapshot_victim(&self) -> Snapshot {
        snapshot(&self.victim)
    }

    /// Asserts the victim is as it was and nothing new appeared next to root and victim.
    fn assert_untouched(&self, before: &Snapshot) {
        assert_eq!(&self.snapshot_victim(), before, "victim/ changed");
        let mut names: Vec<_> = fs::read_dir(self.dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["root", "victim"],
            "something was created next to root/"
        );
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    File(Vec<u8>),
    Directory,
    Symlink(PathBuf),
    Other(u32),
}

#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    nlink: u64,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

type Snapshot = BTreeMap<PathBuf, Node>;

/// Everything about a tree that a breakout could change.
fn snapshot(base: &Path) -> Snapshot {
    let mut nodes = BTreeMap::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let path = base.join(&relative);
        let metadata = fs::symlink_metadata(&path).unwrap();
        let kind = if metadata.is_dir() {
            for entry in fs::read_dir(&path).unwrap() {
                pending.push(relative.join(entry.unwrap().file_name()));
            }
            Kind::Directory
        } else if metadata.is_symlink() {
            Kind::Symlink(fs::read_link(&path).unwrap())
        } else if metadata.is_file() {
            Kind::File(fs::read(&path).unwrap())
        } else {
            Kind::Other(metadata.mode() & 0o170000)
        };
        nodes.insert(
            relative,
            Node {
                kind,
                mode: metadata.mode() & 0o7777,
                uid: metadata.uid(),
                gid: metadata.gid(),
                mtime: (metadata.mtime(), metadata.mtime_nsec()),
                nlink: metadata.nlink(),
                xattrs: xattrs(&path),
            },
        );
    }
    nodes
}

fn xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut names = vec![0_u8; 64 * 1024];
    let length = rustix::fs::llistxattr(path, &mut names[..]).unwrap();
    names[..length]
        .split(|&byte| byte == 0)
        .filter(|name| !name.is_empty())
        .map(|name| (name.to_vec(), lgetxattr(path, name).unwrap()))
        .collect()
}

fn lgetxattr(path: &Path, name: &[u8]) -> Option<Vec<u8>> {
    let mut value = vec![0_u8; 64 * 1024];
    let name = OsStr::from_bytes(name);
    match rustix::fs::lgetxattr(path, name, &mut value[..]) {
        Ok(length) => Some(value[..length].to_vec()),
        Err(rustix::io::Errno::NODATA) => None,
        Err(error) => panic!("lgetxattr {}: {error}", path.display()),
    }
}

// ---------------------------------------------------------------------------------------------
// Building archives, including ones `tar::Header::set_path` refuses to write

#[derive(Clone)]
struct Spec<'a> {
    kind: EntryType,
    name: &'a [u8],
    link: &'a [u8],
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    content: &'a [u8],
    device: (u32, u32),
}

fn spec(kind: EntryType, name: &[u8]) -> Spec<'_> {
    let mode = match kind {
        EntryType::Directory => 0o755,
        EntryType::Symlink => 0o777,
        _ => 0o644,
    };
    Spec {
        kind,
        name,
        link: b"",
        mode,
        uid: 0,
        gid: 0,
        mtime: MTIME,
        content: b"",
        device: (0, 0),
    }
}

fn file<'a>(name: &'a [u8], content: &'a [u8]) -> Spec<'a> {
    Spec {
        content,
        ..spec(EntryType::Regular, name)
    }
}

fn dir(name: &[u8]) -> Spec<'_> {
    spec(EntryType::Directory, name)
}

fn symlink_entry<'a>(name: &'a [u8], link: &'a [u8]) -> Spec<'a> {
    Spec {
        link,
        ..spec(EntryType::Symlink, name)
    }
}

fn hardlink<'a>(name: &'a [u8], link: &'a [u8]) -> Spec<'a> {
    Spec {
        link,
        mode: 0o644,
        ..spec(EntryType::Link, name)
    }
}

struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

impl Layer {
    fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn builder(&mut self) -> &mut tar::Builder<Vec<u8>> {
        &mut self.builder
    }

    fn header(spec: &Spec<'_>) -> Header {
        let mut header = Header::new_gnu();
        header.set_entry_type(spec.kind);
        header.set_mode(spec.mode);
        header.set_uid(spec.uid);
        header.set_gid(spec.gid);
        header.set_mtime(spec.mtime);
        header.set_size(spec.content.len() as u64);
        if matches!(spec.kind, EntryType::Char | EntryType::Block) {
            header.set_device_major(spec.device.0).unwrap();
            header.set_device_minor(spec.device.1).unwrap();
        }
        header
    }

    /// Writes the entry with its name and link name copied into the header verbatim, so names
    /// with `..` or a leading `/` go in as a hostile archive has them. Longer names go
    /// through GNU long-name records, also verbatim.
    fn add(&mut self, spec: Spec<'_>) -> &mut Self {
        if spec.name.len() > 100 {
            self.gnu_long_record(EntryType::GNULongName, spec.name);
        }
        if spec.link.len() > 100 {
            self.gnu_long_record(EntryType::GNULongLink, spec.link);
        }
        let mut header = Self::header(&spec);
        let old = header.as_old_mut();
        let name = &spec.name[..spec.name.len().min(100)];
        old.name[..name.len()].copy_from_slice(name);
        let link = &spec.link[..spec.link.len().min(100)];
        old.linkname[..link.len()].copy_from_slice(link);
        header.set_cksum();
        self.builder().append(&header, spec.content).unwrap();
        self
    }

    fn gnu_long_record(&mut self, kind: EntryType, value: &[u8]) {
        let mut data = value.to_vec();
        data.push(0);
        let mut header = Header::new_gnu();
        header.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.builder().append(&header, &data[..]).unwrap();
    }

    /// A PAX extended header for the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        self.builder()
            .append_pax_extensions(records.iter().copied())
            .unwrap();
        self
    }

    /// The archive, with its end-of-archive blocks.
    fn finish(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()))
            .into_inner()
            .unwrap()
    }
}

fn options(whiteouts: WhiteoutMode) -> ApplyOptions {
    ApplyOptions {
        whiteouts,
        chown: true,
    }
}

fn apply(layer: &mut Layer, root: &Path) -> Result<ApplyReport, ApplyError> {
    apply_layer(&layer.finish()[..], root, &options(WhiteoutMode::Apply))
}

fn apply_overlay(layer: &mut Layer, root: &Path) -> Result<ApplyReport, ApplyError> {
    apply_layer(&layer.finish()[..], root, &options(WhiteoutMode::Overlay))
}

fn join(base: &[u8], rest: &[u8]) -> Vec<u8> {
    [base, rest].concat()
}

fn lstat(path: &Path) -> fs::Metadata {
    fs::symlink_metadata(path).unwrap_or_else(|error| panic!("lstat {}: {error}", path.display()))
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// The errno at the bottom of an error's source chain.
fn root_errno(error: &ApplyError) -> Option<i32> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            return io.raw_os_error();
        }
        source = current.source();
    }
    None
}

// ---------------------------------------------------------------------------------------------
// 1. names with `..` and absolute names

#[test]
fn parent_dir_names_are_refused_as_breakout() {
    let fixture = Fixture::new();
    let before = fixture.snapshot_victim();
    let long_escape = join(&[b'a'; 120], b"/../../victim/x");
    let cases: [&[u8]; 5] = [
        b"../victim/x",
        b"a/../../victim/x",
        b"./../victim/x",
        b"..",
        &long_escape,
    ];
    for name in cases {
        let error =
            apply(Layer::new().add(file(name, b"evil")), &fixture.root).expect_err("breakout");
        assert!(
            matches!(&error, ApplyError::Breakout { path } if path.as_os_str().as_bytes() == name),
            "{name:?}: {error:?}"
        );
        assert!(error.to_string().contains("breakout"), "{error}");
    }
    // The same escape spelled in a PAX `path` record.
    let error = apply(
        Layer::new()
            .pax(&[("path", b"../victim/x")])
            .add(file(b"harmless", b"evil")),
        &fixture.root,
    )
    .expect_err("pax breakout");
    assert!(matches!(error, ApplyError::Breakout { .. }), "{error:?}");
    fixture.assert_untouched(&before);
    assert!(!exists(&fixture.root.join("x")) && !exists(&fixture.root.join("harmless")));
}

#[test]
fn absolute_names_are_confined_to_root() {
    let fixture = Fixture::new();
    let before = fixture.snapshot_victim();
    let host_name = join(&fixture.victim_bytes(), b"/y");
    apply(
        Layer::new()
            .add(file(b"/victim/x", b"one"))
            .add(file(&host_name, b"two"))
            .add(file(b"/victim/file", b"three")),
        &fixture.root,
    )
    .unwrap();
    assert_eq!(fs::read(fixture.root.join("victim/x")).unwrap(), b"one");
    assert_eq!(
        fs::read(fixture.in_root(&fixture.victim).join("y")).unwrap(),
        b"two"
    );
    assert_eq!(
        fs::read(fixture.root.join("victim/file")).unwrap(),
        b"three"
    );
    fixture.assert_untouched(&before);
}

// ---------------------------------------------------------------------------------------------
// 2. a symlink pointing out of the root, then a file below it

#[test]
fn symlink_to_outside_then_file_below_it_lands_in_root() {
    let fixture = Fixture::new();
    let before = fixture.snapshot_victim();
    let absolute = fixture.victim_bytes();
    apply(
        Layer::new()
            .add(symlink_entry(b"relative", b"../victim"))
            .add(file(b"relative/x", b"via relative"))
            .add(symlink_entry(b"absolute", &absolute))
            .add(file(b"absolute/x", b"via absolute"))
            .add(symlink_entry(b"slash", b"/"))
            .add(file(b"slash/x", b"via slash"))
            .add(symlink_entry(b"dotdots", b"../../../../../../.."))
            .add(file(b"dotdots/z", b"via dotdots")),
        &fixture.root,
    )
    .unwrap();
    assert_eq!(
        fs::read(fixture.root.join("victim/x")).unwrap(),
        b"via relative"
    );
    assert_eq!(
        fs::read(fixture.in_root(&fixture.victim).join("x")).unwrap(),
        b"via absolute"
    );
    assert_eq!(fs::read(fixture.root.join("x")).unwrap(), b"via slash");
    assert_eq!(fs::read(fixture.root.join("z")).unwrap(), b"via dotdots");
    // The links themselves are stored verbatim.
    assert_eq!(
        fs::read_link(fixture.root.join("relative")).unwrap(),
        Path::new("../victim")
    );
    assert_eq!(
        fs::read_link(fixture.root.join("absolute")).unwrap(),
        fixture.victim
    );
    fixture.assert_untouched(&before);
}

// ---------------------------------------------------------------------------------------------
// 3. hardlinks to files outside the root

#[test]
fn hardlink_to_parent_path_is_refused() {
    let fixture = Fixture::new();
    let before = fixture.snapshot_victim();
    let error = apply(
        Layer::new().add(hardlink(b"h", b"../victim/file")),
        &fixture.root,
    )
    .expect_err("hardlink breakout");
    assert!(
        matches!(error, ApplyError::HardlinkBreakout { .. }),
        "{error:?}"
    );
    assert!(!exists(&fixture.root.join("h")));
    fixture.assert_untouched(&before);
}

#[test]
fn hardlink_to_absolute_host_path_never_links_the_host_file() {
    let fixture = Fixture::new();
    let before = fixture.snapshot_victim();
    let host_file = join(&fixture.victim_bytes(), b"/file");
    let error = apply(Layer::new().add(hardlink(b"h", &host_file)), &fixture.root)
        .expect_err("host file is not in the root");
    assert!(
        matches!(error, ApplyError::MissingHardlinkTarget { .. }),
        "{error:?}"
    );
    assert!(!exists(&fixture.root.join("h")));

    // With a file of that name inside the root, the link is to that one.
    apply(
        Layer::new()
            .add(file(&host_file, b"inside"))
            .add(hardlink(b"h", &host_file)),
        &fixture.root,
    )
    .unwrap();
    let inside = fixture.in_root(&fixture.victim).join("file");
    assert_eq!(fs::read(fixture.root.join("h")).unwrap(), b"inside");
    assert_eq!(lstat(&fixture.root.join("h")).ino(), lstat(&inside).ino());
    assert_eq!(lstat(&inside).nlink(), 2);
    fixture.assert_untouched(&before);
}

// ---------------------------------------------------------------------------------------------
// 4. symlink, then a file of the same name

#[test]
fn file_replaces_symlink_instead_of_writing_through_it() {
    let fixture = Fixture::new();
    let before = fixture.snapshot_victim();
    let host_file = join(&fixture.victim_bytes(), b"/file");
    apply(
        Layer::new()
            .add(symlink_entry(b"a", &host_file))
            .add(Spec {
                mode: 0o4777,
                ..file(b"a", b"evil")
            })
            .add(symlink_entry(b"b", b"../victim/file"))
            .add(file(b"b", b"evil too")),
        &fixture.root,
    )
    .unwrap();
    let a = lstat(&fixture.root.join("a"));
    assert!(a.is_file(), "a is still a symlink");
    assert_eq!(a.mode() & 0o7777, 0o4777);
    assert_eq!(fs::read(fixture.root.join("a")).unwrap(), b"evil");
    assert!(lstat(&fixture.root.join("b")).is_file());
    assert_eq!(fs::read(fixture.root.join("b")).unwrap(), b"evil too");
    fixture.assert_untouched(&before);
}

// ---------------------------------------------------------------------------------------------
// 5. chmod and chown through a symlink

#[test]
fn directory_entry_does_not_chmod_or_chown_through_symlink() {
    let fixture = Fixture::new();
    let before = fixture.snapshot_victim();
    let absolute = fixture.victim_bytes();
    apply(
        Layer::new()
            .add(symlink_entry(b"d", &absolute))
            .add(Spec {
                mode: 0o777,
                uid: 4242,
                gid: 4243,
                ..dir(b"d")
            })
            .add(file(b"d/file", b"inside"))
            .add(symlink_entry(b"e", b"../victim"))
            .add(Spec {
                mode: 0o1777,
                uid: 4242,
                ..dir(b"e/")
            }),
        &fixture.root,
    )
    .unwrap();
    let d = lstat(&fixture.root.join("d"));
    assert!(d.is_dir());
    assert_eq!((d.mode() & 0o7777, d.uid(), d.gid()), (0o777, 4242, 4243));
    assert_eq!(fs::read(fixture.root.join("d/file")).unwrap(), b"inside");
    let e = lstat(&fixture.root.join("e"));
    assert!(e.is_dir());
    assert_eq!(e.mode() & 0o7777, 0o1777);
    fixture.assert_untouched(&before);
}

// ---------------------------------------------------------------------------------------------
// 6. whiteouts that try to escape

#[test]
fn whiteout_under_symlinked_dir_resolves_in_root() {
    let fixture = Fixture::new();
    let before = fixture.snapshot_victim();
    let absolute = fixture.victim_bytes();
    let host_file = join(&absolute, b"/file");
    // A lower layer with the victim's paths inside the root.
    apply(
        Layer::new()
            .add(file(&host_file, b"root copy"))
            .add(file(b"victim/file", b"root copy")),
        &fixture.root,
    )
    .unwrap();
    apply(
        Layer::new()
            .add(symlink_entry(b"d", &absolute))
            .add(file(b"d/.wh.file", b""))
            .add(symlink_entry(b"r", b"../victim"))
            .add(file(b"r/.wh.file", b""))
            .add(file(b"r/.wh.sub", b"")),
        &fixture.root,
    )
    .unwrap();
    assert!(!exists(&fixture.in_root(&fixture.victim).join("file")));
    assert!(!exists(&fixture.root.join("victim/file")));
    assert!(fixture.victim.join("file").exists());
    fixture.assert_untouched(&before);
}

#[test]
fn whiteout_names_escaping_or_invalid_are_refused() {
    let fixture = Fixture::new();
    let before = fixture.snapshot_victim();
    let error = apply(Layer::new().add(file(b"../.wh.victim", b"")), &fixture.root)
        .expect_err("whiteout breakout");
    assert!(matches!(error, ApplyError::Breakout { .. }), "{error:?}");
    for name in [
        &b".wh..wh.foo"[..],
        b"a/.wh..wh.plnk",
        b".wh..",
        b".wh...",
        b"a/.wh.",
    ] {
        let error =
            apply(Layer::new().add(file(name, b"")), &fixture.root).expect_err("invalid whiteout");
        assert!(
            matches!(error, ApplyError::InvalidWhiteout { .. }),
            "{name:?}: {error:?}"
        );
        assert!(error.to_string().contains("invalid whiteout"), "{error}");
    }
    fixture.assert_untouched(&before);
}

#[test]
fn overlay_whiteout_and_opaque_under_symlinked_dir_stay_in_root() {
    let fixture = Fixture::new();
    let before = fixture.snapshot_victim();
    let absolute = fixture.victim_bytes();
    apply_overlay(
        Layer::new()
            .add(symlink_entry(b"d", &absolute))
            .add(file(b"d/.wh.file", b""))
            .add(file(b"d/.wh..wh..opq", b"")),
        &fixture.root,
    )
    .unwrap();
    let inside = fixture.in_root(&fixture.victim);
    let whiteout = lstat(&inside.join("file"));
    assert!(whiteout.file_type().is_char_device());
    assert_eq!(whiteout.rdev(), 0);
    assert_eq!(
        lgetxattr(&inside, b"trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    fixture.assert_untouched(&before);
}

#[test]
fn opaque_whiteout_under_symlink_to_outside_does_not_empty_the_victim() {
    let fixture = Fixture::new();
    let before = fixture.snapshot_victim();
    let absolute = fixture.victim_bytes();
    apply(
        Layer::new()
            .add(symlink_entry(b"d", &absolute))
            .add(file(b"d/.wh..wh..opq", b""))
            .add(symlink_entry(b"r", b"../../victim"))
            .add(file(b"r/.wh..wh..opq", b"")),
        &fixture.root,
    )
    .unwrap();
    fixture.assert_untouched(&before);
}

// ---------------------------------------------------------------------------------------------
// 7. symlink chains and loops

#[test]
fn symlink_chain_escaping_resolves_in_root() {
    let fixture = Fixture::new();
    let before = fixture.snapshot_victim();
    let absolute = fixture.victim_bytes();
    apply(
        Layer::new()
            .add(symlink_entry(b"a", b"b"))
            .add(symlink_entry(b"b", b"../../.."))
            .add(file(b"a/x", b"chain"))
            .add(symlink_entry(b"c", b"c2"))
            .add(symlink_entry(b"c2", &absolute))
            .add(file(b"c/y", b"absolute chain")),
        &fixture.root,
    )
    .unwrap();
    assert_eq!(fs::read(fixture.root.join("x")).unwrap(), b"chain");
    assert_eq!(
        fs::read(fixture.in_root(&fixture.victim).join("y")).unwrap(),
        b"absolute chain"
    );
    fixture.assert_untouched(&before);
}

#[test]
fn symlink_loop_is_an_error() {
    let fixture = Fixture::new();
    let before = fixture.snapshot_victim();
    let error = apply(
        Layer::new()
            .add(symlink_entry(b"l1", b"l2"))
            .add(symlink_entry(b"l2", b"l1"))
            .add(file(b"l1/x", b"loop")),
        &fixture.root,
    )
    .expect_err("loop");
    assert!(
        matches!(&error, ApplyError::Io { path, .. } if path == Path::new("l1/x")),
        "{error:?}"
    );
    assert_eq!(
        root_errno(&error),
        Some(rustix::io::Errno::LOOP.raw_os_error())
    );
    fixture.assert_untouched(&before);
}

// ---------------------------------------------------------------------------------------------
// 8. hardlink to a symlink that points outside, then a write to the hardlink

#[test]
fn hardlink_to_outside_symlink_then_file_replaces_the_link() {
    let fixture = Fixture::new();
    let before = fixture.snapshot_victim();
    let host_file = join(&fixture.victim_bytes(), b"/file");
    apply(
        Layer::new()
            .add(symlink_entry(b"s", &host_file))
            .add(hardlink(b"h", b"s")),
        &fixture.root,
    )
    .unwrap();
    let h = lstat(&fixture.root.join("h"));
    assert!(h.is_symlink(), "the hardlink links the symlink itself");
    assert_eq!(h.ino(), lstat(&fixture.root.join("s")).ino());

    apply(Layer::new().add(file(b"h", b"evil")), &fixture.root).unwrap();
    assert!(lstat(&fixture.root.join("h")).is_file());
    assert_eq!(fs::read(fixture.root.join("h")).unwrap(), b"evil");
    assert_eq!(
        fs::read_link(fixture.root.join("s")).unwrap(),
        fixture.victim.join("file")
    );
    fixture.assert_untouched(&before);
}

// ---------------------------------------------------------------------------------------------
// 9. devices and setuid files

#[test]
fn device_nodes_are_skipped_and_reported() {
    let fixture = Fixture::new();
    let before = fixture.snapshot_victim();
    let report = apply(
        Layer::new()
            .add(Spec {
                device: (1, 3),
                ..spec(EntryType::Char, b"dev/null")
            })
            .add(Spec {
                device: (8, 0),
                ..spec(EntryType::Block, b"dev/sda")
            })
            .add(file(b"dev/regular", b"kept")),
        &fixture.root,
    )
    .unwrap();
    assert!(!exists(&fixture.root.join("dev/null")));
    assert!(!exists(&fixture.root.join("dev/sda")));
    assert_eq!(fs::read(fixture.root.join("dev/regular")).unwrap(), b"kept");
    assert_eq!(
        report.skipped,
        [
            Skipped {
                path: "dev/null".into(),
                reason: SkipReason::CharacterDevice { major: 1, minor: 3 },
            },
            Skipped {
                path: "dev/sda".into(),
                reason: SkipReason::BlockDevice { major: 8, minor: 0 }
            },
        ]
    );
    assert_eq!(report.entries, 3);
    fixture.assert_untouched(&before);
}

#[test]
fn setuid_and_setgid_bits_survive_chown() {
    let fixture = Fixture::new();
    apply(
        Layer::new()
            .add(Spec {
                mode: 0o4755,
                uid: 1000,
                gid: 1001,
                ..file(b"bin/su", b"#!")
            })
            .add(Spec {
                mode: 0o2755,
                uid: 0,
                gid: 50,
                ..file(b"bin/sg", b"#!")
            })
            .add(Spec {
                mode: 0o2775,
                uid: 7,
                gid: 8,
                ..dir(b"shared")
            })
            .add(Spec {
                mode: 0o1777,
                ..dir(b"tmp")
            }),
        &fixture.root,
    )
    .unwrap();
    let su = lstat(&fixture.root.join("bin/su"));
    assert_eq!(
        (su.mode() & 0o7777, su.uid(), su.gid()),
        (0o4755, 1000, 1001)
    );
    let sg = lstat(&fixture.root.join("bin/sg"));
    assert_eq!((sg.mode() & 0o7777, sg.uid(), sg.gid()), (0o2755, 0, 50));
    let shared = lstat(&fixture.root.join("shared"));
    assert_eq!(
        (shared.mode() & 0o7777, shared.uid(), shared.gid()),
        (0o2775, 7, 8)
    );
    assert_eq!(lstat(&fixture.root.join("tmp")).mode() & 0o7777, 0o1777);
}

// ---------------------------------------------------------------------------------------------
// 10. xattrs

/// A `vfs_cap_data` revision 2 granting CAP_NET_BIND_SERVICE, effective.
const CAPABILITY: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, // magic: revision 2, effective
    0x00, 0x04, 0x00, 0x00, // permitted[0]: 1 << 10
    0x00, 0x00, 0x00, 0x00, // inheritable[0]
    0x00, 0x00, 0x00, 0x00, // permitted[1]
    0x00, 0x00, 0x00, 0x00, // inheritable[1]
];

#[test]
fn only_user_and_capability_xattrs_are_applied() {
    let fixture = Fixture::new();
    let report = apply(
        Layer::new()
            .pax(&[
                ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
                ("SCHILY.xattr.user.foo", b"bar"),
                ("SCHILY.xattr.security.capability", &CAPABILITY),
                (
                    "SCHILY.xattr.security.selinux",
                    b"system_u:object_r:shadow_t:s0",
                ),
            ])
            .add(Spec {
                uid: 1000,
                gid: 1000,
                ..file(b"bin/ping", b"elf")
            })
            .pax(&[
                ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
                ("SCHILY.xattr.user.dir", b"1"),
            ])
            .add(dir(b"forged"))
            .pax(&[("SCHILY.xattr.user.link", b"1")])
            .add(symlink_entry(b"link", b"bin/ping"))
            .pax(&[("SCHILY.xattr.user.fifo", b"1")])
            .add(spec(EntryType::Fifo, b"fifo")),
        &fixture.root,
    )
    .unwrap();
    let ping = fixture.root.join("bin/ping");
    assert_eq!(lgetxattr(&ping, b"user.foo").as_deref(), Some(&b"bar"[..]));
    // Set after the chown to 1000, which would have cleared it.
    assert_eq!(
        lgetxattr(&ping, b"security.capability").as_deref(),
        Some(&CAPABILITY[..])
    );
    assert_eq!(lgetxattr(&ping, b"trusted.overlay.opaque"), None);
    let forged = fixture.root.join("forged");
    assert_eq!(lgetxattr(&forged, b"user.dir").as_deref(), Some(&b"1"[..]));
    assert_eq!(lgetxattr(&forged, b"trusted.overlay.opaque"), None);
    assert_eq!(lgetxattr(&fixture.root.join("link"), b"user.link"), None);
    assert!(lstat(&fixture.root.join("fifo")).file_type().is_fifo());
    let skipped: Vec<(PathBuf, SkipReason)> = report
        .skipped
        .into_iter()
        .map(|skipped| (skipped.path, skipped.reason))
        .collect();
    let disallowed = |name: &str| SkipReason::DisallowedXattr { name: name.into() };
    let on_special_file = |name: &str| SkipReason::XattrOnSpecialFile { name: name.into() };
    assert_eq!(
        skipped,
        [
            ("bin/ping".into(), disallowed("trusted.overlay.opaque")),
            ("bin/ping".into(), disallowed("security.selinux")),
            ("forged".into(), disallowed("trusted.overlay.opaque")),
            ("link".into(), on_special_file("user.link")),
            ("fifo".into(), on_special_file("user.fifo")),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// 11. long names

#[test]
fn long_paths_and_link_names_are_applied() {
    let fixture = Fixture::new();
    let segment = "s".repeat(49);
    let long_dir = [&segment[..]; 6].join("/");
    let long_path = format!("{long_dir}/file");
    assert!(long_path.len() > 300);
    let pax_path = format!("{}/pax-file", "p".repeat(150));
    let mut layer = Layer::new();
    // Through the tar crate's own writer: GNU long-name and long-link records.
    {
        let builder = layer.builder();
        let mut header = Layer::header(&file(b"", b"long content"));
        builder
            .append_data(&mut header, &long_path, &b"long content"[..])
            .unwrap();
        let mut header = Layer::header(&symlink_entry(b"", b""));
        builder
            .append_link(&mut header, "short-link", &long_path)
            .unwrap();
        let mut header = Layer::header(&hardlink(b"", b""));
        builder
            .append_link(&mut header, "short-hardlink", &long_path)
            .unwrap();
    }
    layer
        .pax(&[("path", pax_path.as_bytes())])
        .add(file(b"truncated-name", b"pax content"));
    apply(&mut layer, &fixture.root).unwrap();
    assert_eq!(
        fs::read(fixture.root.join(&long_path)).unwrap(),
        b"long content"
    );
    assert_eq!(
        fs::read_link(fixture.root.join("short-link")).unwrap(),
        Path::new(&long_path)
    );
    assert_eq!(
        lstat(&fixture.root.join("short-hardlink")).ino(),
        lstat(&fixture.root.join(&long_path)).ino()
    );
    assert_eq!(
        fs::read(fixture.root.join(&pax_path)).unwrap(),
        b"pax content"
    );
    assert!(!exists(&fixture.root.join("truncated-name")));
}

#[test]
fn component_longer_than_name_max_is_a_clear_error() {
    let fixture = Fixture::new();
    let name = format!("dir/{}", "n".repeat(300));
    let error = apply(Layer::new().add(file(name.as_bytes(), b"x")), &fixture.root)
        .expect_err("name too long");
    assert!(
        matches!(&error, ApplyError::Io { path, .. } if path == Path::new(&name)),
        "{error:?}"
    );
    assert_eq!(
        root_errno(&error),
        Some(rustix::io::Errno::NAMETOOLONG.raw_os_error())
    );
}

// ---------------------------------------------------------------------------------------------
// Functional: what an ordinary layer holds

#[test]
fn files_directories_links_and_metadata_are_restored() {
    let fixture = Fixture::new();
    let report = apply(
        Layer::new()
            .add(Spec {
                mode: 0o711,
                mtime: 111,
                ..dir(b"./")
            })
            .add(Spec {
                mode: 0o750,
                uid: 10,
                gid: 20,
                mtime: 1_000_000,
                ..dir(b"etc/")
            })
            .add(Spec {
                mtime: 1_234_567,
                ..file(b"etc/passwd", b"root:x:0:0\n")
            })
            .add(Spec {
                mode: 0o600,
                gid: 42,
                mtime: 2_000,
                ..file(b"./etc/shadow", b"root:*\n")
            })
            .add(Spec {
                uid: 7,
                gid: 8,
                mtime: 555,
                ..symlink_entry(b"etc/link", b"passwd")
            })
            .add(hardlink(b"etc/hard", b"etc/passwd"))
            .add(Spec {
                mode: 0o620,
                uid: 3,
                mtime: 3_000,
                ..spec(EntryType::Fifo, b"run/fifo")
            })
            .pax(&[("mtime", b"1234567.5")])
            .add(file(b"etc/precise", b""))
            .add(Spec {
                mtime: 4_000,
                ..dir(b"etc/empty")
            }),
        &fixture.root,
    )
    .unwrap();
    assert_eq!(report.entries, 9);
    assert_eq!(report.bytes, 11 + 7);
    assert!(report.skipped.is_empty());

    let root = lstat(&fixture.root);
    assert_eq!((root.mode() & 0o7777, root.mtime()), (0o711, 111));
    let etc = lstat(&fixture.root.join("etc"));
    assert!(etc.is_dir());
    // Set after the children were created in it.
    assert_eq!(
        (etc.mode() & 0o7777, etc.uid(), etc.gid(), etc.mtime()),
        (0o750, 10, 20, 1_000_000)
    );
    let passwd = lstat(&fixture.root.join("etc/passwd"));
    assert_eq!(
        (passwd.mode() & 0o7777, passwd.mtime(), passwd.nlink()),
        (0o644, 1_234_567, 2)
    );
    assert_eq!(
        fs::read(fixture.root.join("etc/passwd")).unwrap(),
        b"root:x:0:0\n"
    );
    let shadow = lstat(&fixture.root.join("etc/shadow"));
    assert_eq!(
        (shadow.mode() & 0o7777, shadow.gid(), shadow.mtime()),
        (0o600, 42, 2_000)
    );
    let link = lstat(&fixture.root.join("etc/link"));
    assert!(link.is_symlink());
    assert_eq!((link.uid(), link.gid(), link.mtime()), (7, 8, 555));
    assert_eq!(
        fs::read_link(fixture.root.join("etc/link")).unwrap(),
        Path::new("passwd")
    );
    assert_eq!(lstat(&fixture.root.join("etc/hard")).ino(), passwd.ino());
    let fifo = lstat(&fixture.root.join("run/fifo"));
    assert!(fifo.file_type().is_fifo());
    assert_eq!(
        (fifo.mode() & 0o7777, fifo.uid(), fifo.mtime()),
        (0o620, 3, 3_000)
    );
    let run = lstat(&fixture.root.join("run"));
    assert_eq!(run.mode() & 0o7777, 0o755, "implicit parents are 0755");
    let precise = lstat(&fixture.root.join("etc/precise"));
    assert_eq!(
        (precise.mtime(), precise.mtime_nsec()),
        (1_234_567, 500_000_000)
    );
    assert_eq!(lstat(&fixture.root.join("etc/empty")).mtime(), 4_000);
}

#[test]
fn large_file_is_streamed_intact() {
    let fixture = Fixture::new();
    let content: Vec<u8> = (0..3_000_000_u32)
        .map(|index| (index % 251) as u8)
        .collect();
    let report = apply(Layer::new().add(file(b"big", &content)), &fixture.root).unwrap();
    assert_eq!(report.bytes, content.len() as u64);
    assert!(fs::read(fixture.root.join("big")).unwrap() == content);
}

#[test]
fn gnu_sparse_file_is_expanded() {
    let fixture = Fixture::new();
    let source = fixture.dir.path().join("sparse-source");
    {
        let mut file = fs::File::create(&source).unwrap();
        file.seek(SeekFrom::Start(1 << 20)).unwrap();
        file.write_all(b"data after a hole").unwrap();
        file.seek(SeekFrom::Start(3 << 20)).unwrap();
        file.write_all(b"tail").unwrap();
    }
    let expected = fs::read(&source).unwrap();
    let mut layer = Layer::new();
    {
        let builder = layer.builder();
        builder.sparse(true);
        builder.append_path_with_name(&source, "sparse").unwrap();
    }
    fs::remove_file(&source).unwrap();
    let bytes = layer.finish();
    let archive_type = tar::Archive::new(&bytes[..])
        .entries()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .header()
        .entry_type();
    assert_eq!(
        archive_type,
        EntryType::GNUSparse,
        "the builder wrote a sparse entry"
    );
    apply_layer(&bytes[..], &fixture.root, &options(WhiteoutMode::Apply)).unwrap();
    assert!(fs::read(fixture.root.join("sparse")).unwrap() == expected);
}

#[test]
fn entries_replace_existing_files_directories_and_symlinks() {
    let fixture = Fixture::new();
    apply(
        Layer::new()
            .add(file(b"a/deep/er/file", b"old"))
            .add(symlink_entry(b"a/deep/link", b"/"))
            .add(file(b"b", b"old file"))
            .add(symlink_entry(b"c", b"a"))
            .add(file(b"e/keep", b"kept"))
            .add(file(b"f/x", b"old")),
        &fixture.root,
    )
    .unwrap();
    apply(
        Layer::new()
            .add(file(b"a", b"file over tree"))
            .add(Spec {
                mode: 0o711,
                ..dir(b"b")
            })
            .add(file(b"c", b"file over symlink"))
            .add(Spec {
                mode: 0o700,
                uid: 5,
                ..dir(b"e")
            })
            .add(symlink_entry(b"f", b"e")),
        &fixture.root,
    )
    .unwrap();
    assert_eq!(fs::read(fixture.root.join("a")).unwrap(), b"file over tree");
    let b = lstat(&fixture.root.join("b"));
    assert!(b.is_dir());
    assert_eq!(b.mode() & 0o7777, 0o711);
    assert_eq!(
        fs::read(fixture.root.join("c")).unwrap(),
        b"file over symlink"
    );
    let e = lstat(&fixture.root.join("e"));
    assert_eq!((e.mode() & 0o7777, e.uid()), (0o700, 5));
    assert_eq!(fs::read(fixture.root.join("e/keep")).unwrap(), b"kept");
    assert_eq!(
        fs::read_link(fixture.root.join("f")).unwrap(),
        Path::new("e")
    );
    // The `/` symlink inside the removed tree was unlinked, not followed.
    assert!(fixture.root.join("e/keep").exists() && fixture.victim.join("file").exists());
}

#[test]
fn apply_whiteouts_delete_files_and_trees_from_lower_layer() {
    let fixture = Fixture::new();
    let before = fixture.snapshot_victim();
    apply(
        Layer::new()
            .add(file(b"a/file", b"1"))
            .add(file(b"a/other", b"2"))
            .add(file(b"tree/sub/deep/file", b"3"))
            .add(symlink_entry(b"tree/sub/outside", &fixture.victim_bytes()))
            .add(file(b"keep", b"4")),
        &fixture.root,
    )
    .unwrap();
    let report = apply(
        Layer::new()
            .add(file(b"a/.wh.file", b""))
            .add(file(b".wh.tree", b""))
            .add(file(b"missing/.wh.nothing", b"")),
        &fixture.root,
    )
    .unwrap();
    assert_eq!(report.entries, 3);
    assert!(!exists(&fixture.root.join("a/file")));
    assert!(!exists(&fixture.root.join("tree")));
    assert!(
        !exists(&fixture.root.join("missing")),
        "a whiteout creates nothing"
    );
    assert_eq!(fs::read(fixture.root.join("a/other")).unwrap(), b"2");
    assert_eq!(fs::read(fixture.root.join("keep")).unwrap(), b"4");
    assert!(!exists(&fixture.root.join("a/.wh.file")) && !exists(&fixture.root.join(".wh.tree")));
    fixture.assert_untouched(&before);
}

#[test]
fn apply_opaque_keeps_only_this_layers_entries() {
    let fixture = Fixture::new();
    let lower = || {
        let mut layer = Layer::new();
        layer
            .add(file(b"d/old", b"old"))
            .add(file(b"d/olddir/x", b"old"))
            .add(file(b"d/both", b"old"))
            .add(file(b"d/mixed/old", b"old"))
            .add(file(b"other/keep", b"kept"));
        layer
    };
    apply(&mut lower(), &fixture.root).unwrap();
    // The opaque marker after some of this layer's entries and before others.
    apply(
        Layer::new()
            .add(dir(b"d"))
            .add(file(b"d/both", b"new"))
            .add(file(b"d/mixed/new", b"new"))
            .add(file(b"d/.wh..wh..opq", b""))
            .add(file(b"d/new", b"new"))
            .add(file(b"d/newdir/y", b"new")),
        &fixture.root,
    )
    .unwrap();
    let names = |path: &Path| {
        let mut names: Vec<String> = fs::read_dir(path)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        names(&fixture.root.join("d")),
        ["both", "mixed", "new", "newdir"]
    );
    assert_eq!(names(&fixture.root.join("d/mixed")), ["new"]);
    assert_eq!(fs::read(fixture.root.join("d/both")).unwrap(), b"new");
    assert_eq!(fs::read(fixture.root.join("d/newdir/y")).unwrap(), b"new");
    assert_eq!(fs::read(fixture.root.join("other/keep")).unwrap(), b"kept");

    // An opaque marker as the only entry for the directory empties it.
    apply(
        Layer::new().add(file(b"other/.wh..wh..opq", b"")),
        &fixture.root,
    )
    .unwrap();
    assert!(names(&fixture.root.join("other")).is_empty());
}

#[test]
fn overlay_whiteouts_become_char_devices_and_opaque_xattrs() {
    let fixture = Fixture::new();
    let report = apply_overlay(
        Layer::new()
            .add(file(b".wh.gone", b""))
            .add(dir(b"d"))
            .add(file(b"d/.wh..wh..opq", b""))
            .add(file(b"d/file", b"new"))
            .add(Spec {
                uid: 9,
                ..file(b"e/.wh.sub", b"")
            }),
        &fixture.root,
    )
    .unwrap();
    assert_eq!(report.entries, 5);
    let gone = lstat(&fixture.root.join("gone"));
    assert!(gone.file_type().is_char_device());
    assert_eq!(gone.rdev(), 0);
    let sub = lstat(&fixture.root.join("e/sub"));
    assert!(sub.file_type().is_char_device());
    assert_eq!((sub.rdev(), sub.uid()), (0, 9));
    assert_eq!(
        lgetxattr(&fixture.root.join("d"), b"trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(fs::read(fixture.root.join("d/file")).unwrap(), b"new");
    let snapshot = snapshot(&fixture.root);
    assert!(
        snapshot
            .keys()
            .all(|path| !path.to_string_lossy().contains(".wh.")),
        "whiteout names were written: {:?}",
        snapshot.keys().collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------------
// Errors

#[test]
fn hardlink_to_missing_target_is_an_error() {
    let fixture = Fixture::new();
    let error = apply(
        Layer::new().add(hardlink(b"h", b"nowhere/file")),
        &fixture.root,
    )
    .expect_err("missing target");
    assert!(
        matches!(error, ApplyError::MissingHardlinkTarget { .. }),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "hardlink h points to nowhere/file, which does not exist"
    );
}

#[test]
fn truncated_archive_is_an_error() {
    let fixture = Fixture::new();
    let mut bytes = Layer::new().add(file(b"big", &[7; 10_000])).finish();
    bytes.truncate(512 + 4_000);
    let error = apply_layer(&bytes[..], &fixture.root, &options(WhiteoutMode::Apply))
        .expect_err("truncated");
    assert!(matches!(error, ApplyError::ReadContent { .. }), "{error:?}");
}

#[test]
fn missing_target_directory_is_an_error() {
    let fixture = Fixture::new();
    let missing = fixture.root.join("missing");
    let error = apply(Layer::new().add(file(b"x", b"")), &missing).expect_err("no target");
    assert!(matches!(error, ApplyError::OpenTarget { .. }), "{error:?}");
}

#[test]
fn non_directory_entry_naming_root_is_refused() {
    let fixture = Fixture::new();
    for name in [&b"./"[..], b"/", b"."] {
        let error = apply(
            Layer::new().add(symlink_entry(name, b"/elsewhere")),
            &fixture.root,
        )
        .expect_err("root replaced");
        assert!(
            matches!(error, ApplyError::RootNotDirectory { .. }),
            "{name:?}: {error:?}"
        );
    }
    assert!(lstat(&fixture.root).is_dir());
}

#[test]
fn unknown_entry_type_is_refused() {
    let fixture = Fixture::new();
    let error = apply(
        Layer::new().add(spec(EntryType::new(b'V'), b"volume")),
        &fixture.root,
    )
    .expect_err("tape volume header");
    assert!(
        matches!(
            error,
            ApplyError::UnsupportedType {
                entry_type: 'V',
                ..
            }
        ),
        "{error:?}"
    );
}
