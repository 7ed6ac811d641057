//! Layer creation end to end: real trees (as root: devices, ownership, xattrs), read back with
//! the tar crate and checked with the real `gzip`, `zstd` and `tar` tools.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::num::NonZero;
use std::os::unix::fs::{PermissionsExt, chown, lchown};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rbuild_cache::compression::{Compression, Encoder, EncoderOptions, decompress};
use rbuild_cache::layer::{
    Layer, LayerError, LayerOptions, LayerSource, create_layer, store_tar, write_layer_tar,
};
use rbuild_cache::{ContentStore, Digest};
use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps, XattrFlags};
use tar::EntryType;

/// `cap_net_bind_service=ep` as the kernel stores it (`vfs_cap_data` revision 2).
const CAPABILITY: [u8; 20] = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const EPOCH: i64 = 1_500_000_000;

/// What a test reads back of one tar entry.
#[derive(Debug)]
struct TarEntry {
    name: String,
    kind: EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    size: u64,
    link: Option<String>,
    device: (Option<u32>, Option<u32>),
    pax_keys: Vec<String>,
    xattrs: Vec<(String, Vec<u8>)>,
    user_name: Vec<u8>,
    content: Vec<u8>,
}

fn read_tar(bytes: &[u8]) -> Vec<TarEntry> {
    let mut archive = tar::Archive::new(bytes);
    let mut entries = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut pax_keys = Vec::new();
        let mut xattrs = Vec::new();
        if let Some(extensions) = entry.pax_extensions().unwrap() {
            for extension in extensions {
                let extension = extension.unwrap();
                let key = extension.key().unwrap().to_string();
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    xattrs.push((name.to_string(), extension.value_bytes().to_vec()));
                }
                pax_keys.push(key);
            }
        }
        let header = entry.header();
        let mut read = TarEntry {
            name: String::from_utf8(entry.path_bytes().into_owned()).unwrap(),
            kind: header.entry_type(),
            mode: header.mode().unwrap(),
            uid: header.uid().unwrap(),
            gid: header.gid().unwrap(),
            mtime: header.mtime().unwrap(),
            size: header.size().unwrap(),
            link: entry
                .link_name_bytes()
                .map(|link| String::from_utf8(link.into_owned()).unwrap()),
            device: (
                header.device_major().unwrap(),
                header.device_minor().unwrap(),
            ),
            pax_keys,
            xattrs,
            user_name: header.username_bytes().unwrap_or_default().to_vec(),
            content: Vec::new(),
        };
        entry.read_to_end(&mut read.content).unwrap();
        entries.push(read);
    }
    entries
}

fn find<'a>(entries: &'a [TarEntry], name: &str) -> &'a TarEntry {
    entries
        .iter()
        .find(|entry| entry.name == name)
        .unwrap_or_else(|| panic!("no entry {name}"))
}

fn names(entries: &[TarEntry]) -> Vec<&str> {
    entries.iter().map(|entry| entry.name.as_str()).collect()
}

fn tar_of(directory: &Path, options: &LayerOptions) -> Vec<u8> {
    let mut bytes = Vec::new();
    write_layer_tar(directory, options, &mut bytes).unwrap();
    bytes
}

fn set_mtime(path: &Path, seconds: i64) {
    let time = Timespec {
        tv_sec: seconds,
        tv_nsec: 0,
    };
    let times = Timestamps {
        last_access: time,
        last_modification: time,
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, XattrFlags::empty()).unwrap();
}

fn mknod(path: &Path, file_type: FileType, major: u32, minor: u32) {
    let device = rustix::fs::makedev(major, minor);
    rustix::fs::mknodat(CWD, path, file_type, Mode::from_raw_mode(0o644), device).unwrap();
}

/// Bytes that are half incompressible, half text, the same for the same seed.
fn pattern(size: usize, seed: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(size);
    let mut state = seed | 1;
    while bytes.len() < size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        if (bytes.len() / 50_000) % 2 == 0 {
            bytes.extend_from_slice(&state.to_le_bytes());
        } else {
            bytes.extend_from_slice(b"RUN apt-get install -y make\n");
        }
    }
    bytes.truncate(size);
    bytes
}

/// Everything a layer can hold, with every mtime set to `mtime`. Returns the paths made, the
/// socket aside.
fn make_tree(root: &Path, mtime: i64) -> Vec<PathBuf> {
    let path = |relative: &str| root.join(relative);
    for directory in ["a", "bin", "empty-dir", "etc", "z"] {
        fs::create_dir(path(directory)).unwrap();
    }
    // Made first, so only the sorted order makes `a/x` the file and `z/orig` the link.
    fs::write(path("z/orig"), b"linked twice\n").unwrap();
    fs::hard_link(path("z/orig"), path("a/x")).unwrap();
    fs::write(path("a-b"), b"dash sorts before slash\n").unwrap();
    fs::write(path("a.txt"), b"dot sorts before slash\n").unwrap();
    fs::write(path("a0"), b"capable\n").unwrap();
    set_xattr(&path("a0"), "security.capability", &CAPABILITY);
    fs::write(path("bin/tool"), pattern(2 << 20, 7)).unwrap();
    chown(path("bin/tool"), Some(1000), Some(1001)).unwrap();
    fs::set_permissions(path("bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::hard_link(path("bin/tool"), path("bin/tool-link")).unwrap();
    mknod(&path("dev-null"), FileType::CharacterDevice, 1, 3);
    chown(path("empty-dir"), Some(33), Some(34)).unwrap();
    fs::set_permissions(path("empty-dir"), fs::Permissions::from_mode(0o1770)).unwrap();
    fs::write(path("etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
    set_xattr(&path("etc/hosts"), "user.comment", b"hello");
    set_xattr(&path("etc/hosts"), "trusted.note", b"host state");
    std::os::unix::fs::symlink("../etc/hosts", path("etc/config")).unwrap();
    lchown(path("etc/config"), Some(5), Some(6)).unwrap();
    mknod(&path("fifo"), FileType::Fifo, 0, 0);
    drop(UnixListener::bind(path("sock")).unwrap());
    let made: Vec<PathBuf> = [
        "a",
        "a/x",
        "a-b",
        "a.txt",
        "a0",
        "bin",
        "bin/tool",
        "bin/tool-link",
        "dev-null",
        "empty-dir",
        "etc",
        "etc/config",
        "etc/hosts",
        "fifo",
        "z",
        "z/orig",
    ]
    .iter()
    .map(|relative| path(relative))
    .collect();
    for made in &made {
        set_mtime(made, mtime);
    }
    made
}

const TREE_NAMES: [&str; 16] = [
    "a/",
    "a/x",
    "a-b",
    "a.txt",
    "a0",
    "bin/",
    "bin/tool",
    "bin/tool-link",
    "dev-null",
    "empty-dir/",
    "etc/",
    "etc/config",
    "etc/hosts",
    "fifo",
    "z/",
    "z/orig",
];

fn store() -> (tempfile::TempDir, ContentStore) {
    let directory = tempfile::tempdir().unwrap();
    let store = ContentStore::open(directory.path()).unwrap();
    (directory, store)
}

fn options(compression: Compression, source_date_epoch: Option<i64>) -> LayerOptions {
    LayerOptions {
        compression,
        source_date_epoch,
        ..LayerOptions::default()
    }
}

fn assert_ingest_empty(store: &ContentStore) {
    let left: Vec<_> = fs::read_dir(store.ingest_directory()).unwrap().collect();
    assert!(left.is_empty(), "left in ingest: {left:?}");
}

/// Runs `program args` with `input` on stdin and returns its stdout.
fn run_tool(program: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("run {program}: {error}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        output.status
    );
    output.stdout
}

fn blob(store: &ContentStore, layer: &Layer) -> Vec<u8> {
    fs::read(store.blob_path(&layer.digest)).unwrap()
}

#[test]
fn same_tree_in_two_places_gives_the_same_layer_and_a_changed_file_a_new_one() {
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    make_tree(first.path(), 1_600_000_000);
    make_tree(second.path(), 1_700_000_000);
    let (_directory, store) = store();
    for compression in [Compression::Gzip, Compression::Zstd, Compression::None] {
        let options = options(compression, Some(EPOCH));
        let one = create_layer(first.path(), &options, &store).unwrap();
        let two = create_layer(second.path(), &options, &store).unwrap();
        assert_eq!(one, two, "{compression}");
        assert_eq!(one.media_type, compression.media_type());
    }
    // Without the epoch the different mtimes show.
    let unclamped = options(Compression::None, None);
    assert_ne!(
        tar_of(first.path(), &unclamped),
        tar_of(second.path(), &unclamped)
    );

    let options = options(Compression::Gzip, Some(EPOCH));
    let before = create_layer(second.path(), &options, &store).unwrap();
    fs::write(second.path().join("etc/hosts"), b"127.0.0.1 localhosT\n").unwrap();
    set_mtime(&second.path().join("etc/hosts"), 1_700_000_000);
    let after = create_layer(second.path(), &options, &store).unwrap();
    assert_ne!(before.diff_id, after.diff_id);
    assert_ne!(before.digest, after.digest);
    assert_eq!(before.uncompressed_size, after.uncompressed_size);
    assert_ingest_empty(&store);
}

#[test]
fn entries_are_sorted_and_record_ownership_mode_links_devices_and_xattrs() {
    let tree = tempfile::tempdir().unwrap();
    make_tree(tree.path(), 1_600_000_000);
    let bytes = tar_of(tree.path(), &LayerOptions::default());
    let entries = read_tar(&bytes);
    // filepath.Walk order: `a/` and its children before `a-b`, though '-' < '/'; no root
    // entry, no `./`, no socket.
    assert_eq!(names(&entries), TREE_NAMES);

    let tool = find(&entries, "bin/tool");
    assert_eq!(
        (tool.kind, tool.mode, tool.uid, tool.gid),
        (EntryType::Regular, 0o4755, 1000, 1001)
    );
    assert_eq!(tool.size, 2 << 20);
    assert!(
        tool.content == pattern(2 << 20, 7),
        "content of bin/tool differs"
    );
    let link = find(&entries, "bin/tool-link");
    assert_eq!(
        (link.kind, link.link.as_deref(), link.size),
        (EntryType::Link, Some("bin/tool"), 0)
    );
    let first = find(&entries, "a/x");
    assert_eq!(
        (first.kind, first.content.as_slice()),
        (EntryType::Regular, &b"linked twice\n"[..])
    );
    let later = find(&entries, "z/orig");
    assert_eq!(
        (later.kind, later.link.as_deref()),
        (EntryType::Link, Some("a/x"))
    );

    let symlink = find(&entries, "etc/config");
    assert_eq!(
        (symlink.kind, symlink.link.as_deref()),
        (EntryType::Symlink, Some("../etc/hosts"))
    );
    assert_eq!((symlink.uid, symlink.gid), (5, 6));
    let device = find(&entries, "dev-null");
    assert_eq!(
        (device.kind, device.device),
        (EntryType::Char, (Some(1), Some(3)))
    );
    assert_eq!(find(&entries, "fifo").kind, EntryType::Fifo);
    let directory = find(&entries, "empty-dir/");
    assert_eq!(
        (directory.kind, directory.mode, directory.uid, directory.gid),
        (EntryType::Directory, 0o1770, 33, 34)
    );

    let hosts = find(&entries, "etc/hosts");
    assert_eq!(
        hosts.xattrs,
        [("user.comment".to_string(), b"hello".to_vec())]
    );
    let capable = find(&entries, "a0");
    assert_eq!(
        capable.xattrs,
        [("security.capability".to_string(), CAPABILITY.to_vec())]
    );
    for entry in &entries {
        assert_eq!(entry.mtime, 1_600_000_000, "{}", entry.name);
        assert!(entry.user_name.is_empty(), "{} has a user name", entry.name);
        for key in &entry.pax_keys {
            assert!(
                key.starts_with("SCHILY.xattr.user.") || key == "SCHILY.xattr.security.capability",
                "{}: {key}",
                entry.name
            );
        }
    }

    // GNU tar reads the same archive.
    let listing = String::from_utf8(run_tool("tar", &["-tf", "-"], &bytes)).unwrap();
    assert_eq!(listing.lines().collect::<Vec<_>>(), TREE_NAMES);
}

#[test]
fn mtimes_are_clamped_to_source_date_epoch() {
    let tree = tempfile::tempdir().unwrap();
    fs::write(tree.path().join("new"), b"").unwrap();
    fs::write(tree.path().join("old"), b"").unwrap();
    set_mtime(&tree.path().join("new"), EPOCH + 1000);
    set_mtime(&tree.path().join("old"), EPOCH - 1000);
    let entries = read_tar(&tar_of(
        tree.path(),
        &options(Compression::None, Some(EPOCH)),
    ));
    assert_eq!(find(&entries, "new").mtime, EPOCH as u64);
    assert_eq!(find(&entries, "old").mtime, (EPOCH - 1000) as u64);
    let entries = read_tar(&tar_of(tree.path(), &options(Compression::None, None)));
    assert_eq!(find(&entries, "new").mtime, (EPOCH + 1000) as u64);
}

#[test]
fn long_names_and_link_targets_survive() {
    let tree = tempfile::tempdir().unwrap();
    let deep = format!("{}/{}/{}", "d".repeat(90), "e".repeat(90), "f".repeat(90));
    fs::create_dir_all(tree.path().join(&deep)).unwrap();
    let file = format!("{deep}/{}", "g".repeat(120));
    fs::write(tree.path().join(&file), b"deep").unwrap();
    let target = "t".repeat(150);
    std::os::unix::fs::symlink(&target, tree.path().join("link")).unwrap();
    fs::write(tree.path().join("naïve"), b"utf-8").unwrap();
    let bytes = tar_of(tree.path(), &LayerOptions::default());
    let entries = read_tar(&bytes);
    let file_entry = find(&entries, &file);
    assert_eq!(file_entry.content, b"deep");
    assert!(file_entry.pax_keys.contains(&"path".to_string()));
    assert_eq!(
        find(&entries, "link").link.as_deref(),
        Some(target.as_str())
    );
    assert_eq!(find(&entries, "naïve").content, b"utf-8");
    let listing = String::from_utf8(run_tool("tar", &["-tf", "-"], &bytes)).unwrap();
    assert!(listing.lines().any(|line| line == file), "{listing}");
    assert!(listing.lines().any(|line| line == "naïve"), "{listing}");
}

#[test]
fn gzip_layers_decode_with_the_gzip_tool() {
    let tree = tempfile::tempdir().unwrap();
    make_tree(tree.path(), 1_600_000_000);
    let (_directory, store) = store();
    let options = options(Compression::Gzip, Some(EPOCH));
    let layer = create_layer(tree.path(), &options, &store).unwrap();
    let tar = run_tool("gzip", &["-dc"], &blob(&store, &layer));
    assert!(
        tar == tar_of(tree.path(), &options),
        "gunzipped layer is not the tar"
    );
    assert_eq!(Digest::of(&tar), layer.diff_id);
    assert_eq!(tar.len() as u64, layer.uncompressed_size);
    assert_eq!(store.verify(&layer.digest).unwrap(), layer.size);
    assert_eq!(
        layer.media_type,
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
}

#[test]
fn zstd_layers_decode_with_the_zstd_tool() {
    let tree = tempfile::tempdir().unwrap();
    make_tree(tree.path(), 1_600_000_000);
    let (_directory, store) = store();
    let options = options(Compression::Zstd, Some(EPOCH));
    let layer = create_layer(tree.path(), &options, &store).unwrap();
    let tar = run_tool("zstd", &["-dc"], &blob(&store, &layer));
    assert!(
        tar == tar_of(tree.path(), &options),
        "unzstd'd layer is not the tar"
    );
    assert_eq!(Digest::of(&tar), layer.diff_id);
    assert_eq!(store.verify(&layer.digest).unwrap(), layer.size);
}

#[test]
fn an_uncompressed_layer_is_its_tar() {
    let tree = tempfile::tempdir().unwrap();
    make_tree(tree.path(), 1_600_000_000);
    let (_directory, store) = store();
    let layer = create_layer(tree.path(), &options(Compression::None, None), &store).unwrap();
    assert_eq!(layer.digest, layer.diff_id);
    assert_eq!(layer.size, layer.uncompressed_size);
    assert!(blob(&store, &layer) == tar_of(tree.path(), &LayerOptions::default()));
}

#[test]
fn parallel_compression_does_not_depend_on_threads_and_decodes_with_the_real_tools() {
    let input = pattern(3 << 20, 11);
    for (compression, tool) in [(Compression::Gzip, "gzip"), (Compression::Zstd, "zstd")] {
        let outputs: Vec<Vec<u8>> = [1, 4]
            .into_iter()
            .map(|threads| {
                let options = EncoderOptions {
                    level: None,
                    threads: NonZero::new(threads),
                };
                let mut encoder = Encoder::with_options(Vec::new(), compression, options).unwrap();
                encoder.write_all(&input).unwrap();
                encoder.finish().unwrap()
            })
            .collect();
        assert!(
            outputs[0] == outputs[1],
            "{compression}: 1 and 4 threads differ"
        );
        assert!(
            run_tool(tool, &["-dc"], &outputs[0]) == input,
            "{tool} -dc gave other bytes"
        );
    }
}

/// An overlayfs upper dir as the kernel leaves it.
fn make_upper(root: &Path) {
    let path = |relative: &str| root.join(relative);
    mknod(&path("deleted"), FileType::CharacterDevice, 0, 0);
    fs::create_dir(path("dir")).unwrap();
    set_xattr(&path("dir"), "trusted.overlay.opaque", b"y");
    set_xattr(&path("dir"), "trusted.overlay.origin", b"\0\xfb\x21");
    set_xattr(&path("dir"), "user.keep", b"1");
    fs::write(path("dir/-first"), b"sorts before the marker").unwrap();
    fs::write(path("dir/new"), b"new").unwrap();
    fs::create_dir(path("sub")).unwrap();
    mknod(&path("sub/gone"), FileType::CharacterDevice, 0, 0);
    fs::create_dir(path("udir")).unwrap();
    set_xattr(&path("udir"), "user.overlay.opaque", b"y");
    fs::create_dir(path("not-opaque")).unwrap();
    set_xattr(&path("not-opaque"), "trusted.overlay.opaque", b"n");
}

#[test]
fn overlay_upper_writes_whiteouts_and_opaque_markers() {
    let upper = tempfile::tempdir().unwrap();
    make_upper(upper.path());
    let overlay = LayerOptions {
        source: LayerSource::OverlayUpper,
        ..LayerOptions::default()
    };
    let entries = read_tar(&tar_of(upper.path(), &overlay));
    assert_eq!(
        names(&entries),
        [
            ".wh.deleted",
            "dir/",
            "dir/.wh..wh..opq",
            "dir/-first",
            "dir/new",
            "not-opaque/",
            "sub/",
            "sub/.wh.gone",
            "udir/",
            "udir/.wh..wh..opq",
        ]
    );
    for whiteout in [".wh.deleted", "sub/.wh.gone", "dir/.wh..wh..opq"] {
        let entry = find(&entries, whiteout);
        assert_eq!(
            (entry.kind, entry.size),
            (EntryType::Regular, 0),
            "{whiteout}"
        );
    }
    assert_eq!(
        find(&entries, "dir/").xattrs,
        [("user.keep".to_string(), b"1".to_vec())]
    );
    for entry in &entries {
        for key in &entry.pax_keys {
            assert!(
                !key.contains("overlay") && !key.contains("trusted"),
                "{}: {key}",
                entry.name
            );
        }
    }

    // The same tree as a plain directory: devices stay devices, nothing is a whiteout.
    let entries = read_tar(&tar_of(upper.path(), &LayerOptions::default()));
    assert_eq!(find(&entries, "deleted").kind, EntryType::Char);
    assert_eq!(find(&entries, "deleted").device, (Some(0), Some(0)));
    assert!(
        entries.iter().all(|entry| !entry.name.contains(".wh.")),
        "{:?}",
        names(&entries)
    );
    for entry in &entries {
        for key in &entry.pax_keys {
            assert!(!key.contains("overlay"), "{}: {key}", entry.name);
        }
    }
}

#[test]
fn overlay_upper_with_metacopy_is_refused_and_leaves_nothing_in_the_store() {
    let upper = tempfile::tempdir().unwrap();
    fs::write(upper.path().join("a-file"), pattern(3 << 20, 3)).unwrap();
    fs::write(upper.path().join("z-file"), b"").unwrap();
    set_xattr(
        &upper.path().join("z-file"),
        "trusted.overlay.metacopy",
        b"",
    );
    let (_directory, store) = store();
    let overlay = LayerOptions {
        source: LayerSource::OverlayUpper,
        ..LayerOptions::default()
    };
    let error = create_layer(upper.path(), &overlay, &store).unwrap_err();
    match &error {
        LayerError::UnsupportedOverlay { path, xattr } => {
            assert_eq!(path, &upper.path().join("z-file"));
            assert_eq!(xattr, "trusted.overlay.metacopy");
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(error.to_string().contains("z-file"), "{error}");
    assert_ingest_empty(&store);
    assert!(store.list().unwrap().is_empty());
}

/// A sink that runs `hook` once, at the first write reaching it.
struct HookWriter<F: FnMut()> {
    bytes: Vec<u8>,
    hook: Option<F>,
}

impl<F: FnMut()> Write for HookWriter<F> {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        if let Some(mut hook) = self.hook.take() {
            hook();
        }
        self.bytes.extend_from_slice(buffer);
        Ok(buffer.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_file_growing_or_shrinking_while_read_is_an_error_naming_it() {
    let tree = tempfile::tempdir().unwrap();
    let big = tree.path().join("big");
    let grow = |path: &Path| {
        OpenOptions::new()
            .append(true)
            .open(path)
            .unwrap()
            .write_all(b"more")
            .unwrap()
    };
    let shrink = |path: &Path| {
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(300_000)
            .unwrap()
    };
    for (change, expected) in [
        (&grow as &dyn Fn(&Path), "more when read"),
        (&shrink, "300000 when read"),
    ] {
        fs::write(&big, pattern(1 << 20, 5)).unwrap();
        // The header and the first chunk of content reach the sink before the rest is read.
        let sink = HookWriter {
            bytes: Vec::new(),
            hook: Some(|| change(&big)),
        };
        let error = write_layer_tar(tree.path(), &LayerOptions::default(), sink).unwrap_err();
        match &error {
            LayerError::FileChanged { path, .. } => assert_eq!(path, &big),
            other => panic!("unexpected error: {other}"),
        }
        let message = error.to_string();
        assert!(
            message.contains(big.to_str().unwrap()) && message.contains(expected),
            "{message}"
        );
    }
}

#[test]
fn a_missing_or_non_directory_root_is_an_error_naming_it() {
    let tree = tempfile::tempdir().unwrap();
    let missing = tree.path().join("missing");
    let error = write_layer_tar(&missing, &LayerOptions::default(), io::sink()).unwrap_err();
    assert!(
        matches!(&error, LayerError::Io { path, .. } if *path == missing),
        "{error}"
    );
    let file = tree.path().join("file");
    fs::write(&file, b"").unwrap();
    let error = write_layer_tar(&file, &LayerOptions::default(), io::sink()).unwrap_err();
    assert!(
        matches!(&error, LayerError::NotADirectory { path } if *path == file),
        "{error}"
    );
}

#[test]
fn store_tar_keeps_the_given_bytes_as_the_diff_id() {
    let tree = tempfile::tempdir().unwrap();
    make_tree(tree.path(), 1_600_000_000);
    let tar = tar_of(tree.path(), &LayerOptions::default());
    // Two gzip members, as pigz or `cat a.gz b.gz` make.
    let (head, tail) = tar.split_at(tar.len() / 2);
    let mut gzip = Vec::new();
    for part in [head, tail] {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(part).unwrap();
        gzip.extend(encoder.finish().unwrap());
    }
    let zstd = zstd::encode_all(&tar[..], 1).unwrap();
    let (_directory, store) = store();
    for (input, compression) in [
        (&gzip, Compression::Zstd),
        (&tar, Compression::Gzip),
        (&zstd, Compression::None),
    ] {
        let layer = store_tar(&input[..], compression, &store).unwrap();
        assert_eq!(layer.diff_id, Digest::of(&tar), "{compression}");
        assert_eq!(layer.uncompressed_size, tar.len() as u64);
        assert_eq!(layer.media_type, compression.media_type());
        assert_eq!(store.verify(&layer.digest).unwrap(), layer.size);
        let mut stored = Vec::new();
        decompress(io::BufReader::new(store.open_blob(&layer.digest).unwrap()))
            .unwrap()
            .read_to_end(&mut stored)
            .unwrap();
        assert!(
            stored == tar,
            "the {compression} blob does not decompress to the tar"
        );
        assert_eq!(Compression::detect(&blob(&store, &layer)), compression);
    }
    assert_ingest_empty(&store);
}

#[test]
fn symlinks_out_of_the_tree_are_archived_as_links_not_followed() {
    let base = tempfile::tempdir().unwrap();
    let victim = base.path().join("victim");
    fs::create_dir(&victim).unwrap();
    fs::write(victim.join("secret"), b"victim secret").unwrap();
    let root = base.path().join("root");
    fs::create_dir(&root).unwrap();
    std::os::unix::fs::symlink("../victim", root.join("escape")).unwrap();
    std::os::unix::fs::symlink("/proc/self/root/etc", root.join("etc")).unwrap();
    std::os::unix::fs::symlink(victim.join("secret"), root.join("secret")).unwrap();
    let bytes = tar_of(&root, &LayerOptions::default());
    let entries = read_tar(&bytes);
    assert_eq!(names(&entries), ["escape", "etc", "secret"]);
    assert!(
        entries
            .iter()
            .all(|entry| entry.kind == EntryType::Symlink && entry.size == 0)
    );
    assert!(
        !bytes.windows(13).any(|window| window == b"victim secret"),
        "the victim leaked"
    );
    assert_eq!(fs::read(victim.join("secret")).unwrap(), b"victim secret");
}

#[test]
fn a_bad_level_is_refused_and_nothing_is_stored() {
    let tree = tempfile::tempdir().unwrap();
    fs::write(tree.path().join("file"), b"content").unwrap();
    let (_directory, store) = store();
    let options = LayerOptions {
        level: Some(12),
        ..options(Compression::Gzip, None)
    };
    let error = create_layer(tree.path(), &options, &store).unwrap_err();
    assert!(
        matches!(
            error,
            LayerError::Encoder {
                compression: Compression::Gzip,
                ..
            }
        ),
        "{error}"
    );
    assert_ingest_empty(&store);
    assert!(store.list().unwrap().is_empty());
}
