//! Context checksums: what changes a COPY cache key and what must not, the stat cache, and
//! BuildKit's source selection rules.

use std::fs;
use std::os::unix::fs::{PermissionsExt, lchown, symlink};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use rbuild_cache::context::{
    ContextError, ContextFilter, FileKind, NoFilter, Selection, StatCache, select,
};
use rustix::fs::{AtFlags, CWD, Timespec, Timestamps, utimensat};

/// 2020-09-13: an mtime old enough for the stat cache to trust.
const OLD: i64 = 1_600_000_000;

fn set_mtime(path: &Path, seconds: i64, nanoseconds: i64) {
    let time = Timespec {
        tv_sec: seconds,
        tv_nsec: nanoseconds,
    };
    let times = Timestamps {
        last_access: time,
        last_modification: time,
    };
    utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

/// Writes a file (creating its parents) with an old mtime, as a checkout long ago would.
fn write(root: &Path, relative: &str, content: &[u8]) {
    let path = root.join(relative);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, content).unwrap();
    set_mtime(&path, OLD, 0);
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|item| item.to_string()).collect()
}

fn select_with(
    context: &Path,
    sources: &[&str],
    exclude: &[&str],
    filter: &dyn ContextFilter,
    cache: &StatCache,
) -> Result<Selection, ContextError> {
    select(context, &strings(sources), &strings(exclude), filter, cache)
}

fn selection(context: &Path, sources: &[&str]) -> Selection {
    select_with(context, sources, &[], &NoFilter, &StatCache::in_memory()).unwrap()
}

fn digest(context: &Path, sources: &[&str]) -> String {
    selection(context, sources).digest
}

/// Every selected path as `matched:relative`.
fn listing(selection: &Selection) -> Vec<String> {
    selection
        .files
        .iter()
        .map(|file| format!("{}:{}", selection.roots[file.root].matched, file.relative))
        .collect()
}

fn matched(selection: &Selection) -> Vec<&str> {
    selection
        .roots
        .iter()
        .map(|root| root.matched.as_str())
        .collect()
}

/// a.txt, b.txt, dir/x.rs, dir/sub/y.rs, dir/sub/empty/, link -> a.txt.
fn sample_tree(root: &Path) {
    write(root, "a.txt", b"alpha\n");
    write(root, "b.txt", b"bravo\n");
    write(root, "dir/x.rs", b"fn main() {}\n");
    write(root, "dir/sub/y.rs", b"// y\n");
    fs::create_dir_all(root.join("dir/sub/empty")).unwrap();
    fs::set_permissions(root.join("dir/x.rs"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("a.txt", root.join("link")).unwrap();
}

/// Copies a tree the way a fresh clone recreates it: new inodes, new mtimes, same content,
/// modes and link targets.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    fs::set_permissions(to, fs::metadata(from).unwrap().permissions()).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            copy_tree(&entry.path(), &target);
        } else if kind.is_symlink() {
            symlink(fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn mtimes_and_inodes_do_not_change_the_digest() {
    let temp = tempfile::tempdir().unwrap();
    let context = temp.path().join("context");
    sample_tree(&context);
    let before = selection(&context, &["."]);
    assert_eq!(before.files.len(), 9, "{:?}", listing(&before));

    for path in ["a.txt", "b.txt", "dir", "dir/x.rs", "dir/sub/y.rs", "link"] {
        set_mtime(&context.join(path), OLD + 12_345, 678);
    }
    let touched = fs::File::options()
        .append(true)
        .open(context.join("a.txt"))
        .unwrap();
    touched.set_modified(std::time::SystemTime::now()).unwrap();
    assert_eq!(digest(&context, &["."]), before.digest);

    let clone = temp.path().join("clone");
    copy_tree(&context, &clone);
    let cloned = selection(&clone, &["."]);
    assert_eq!(cloned.digest, before.digest);
    assert_eq!(listing(&cloned), listing(&before));
}

/// BuildKit #4950: two contents with identical size and mtime must never share a key.
#[test]
fn identical_size_and_mtime_with_different_content_give_different_digests() {
    let temp = tempfile::tempdir().unwrap();
    let (first, second) = (temp.path().join("first"), temp.path().join("second"));
    write(&first, "config", b"mode=dev");
    write(&second, "config", b"mode=prd");
    set_mtime(&first.join("config"), OLD, 5);
    set_mtime(&second.join("config"), OLD, 5);
    assert_ne!(digest(&first, &["config"]), digest(&second, &["config"]));

    // The same file rewritten in place, its mtime restored (`cp -p`, `touch -r`, a checkout
    // restoring times): size, mtime and inode are unchanged, and the stat cache must still
    // not hand back the old hash. The ctime, which nobody can set, tells them apart.
    let cache = StatCache::in_memory();
    let select_config = || select_with(&first, &["config"], &[], &NoFilter, &cache).unwrap();
    let original = select_config();
    assert_eq!(cache.misses(), 1);
    let inode = fs::symlink_metadata(first.join("config")).unwrap();
    fs::write(first.join("config"), b"mode=prd").unwrap();
    set_mtime(&first.join("config"), OLD, 5);
    let rewritten = fs::symlink_metadata(first.join("config")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&inode),
        std::os::unix::fs::MetadataExt::ino(&rewritten)
    );
    let changed = select_config();
    assert_eq!(cache.misses(), 2, "the rewritten file is read again");
    assert_ne!(changed.digest, original.digest);
    assert_eq!(changed.digest, digest(&second, &["config"]));
}

#[test]
fn mode_owner_symlink_target_and_names_change_the_digest() {
    let temp = tempfile::tempdir().unwrap();
    let context = temp.path();
    sample_tree(context);
    let base = digest(context, &["."]);
    let changed = |change: &dyn Fn(), undo: &dyn Fn()| {
        change();
        let after = digest(context, &["."]);
        undo();
        assert_eq!(
            digest(context, &["."]),
            base,
            "undoing the change restores the key"
        );
        after
    };

    let chmod = |path: &str, mode: u32| {
        fs::set_permissions(context.join(path), fs::Permissions::from_mode(mode)).unwrap()
    };
    assert_ne!(
        changed(&|| chmod("a.txt", 0o600), &|| chmod("a.txt", 0o644)),
        base
    );
    assert_ne!(
        changed(&|| chmod("dir/sub", 0o700), &|| chmod("dir/sub", 0o755)),
        base
    );

    let retarget = |target: &str| {
        fs::remove_file(context.join("link")).unwrap();
        symlink(target, context.join("link")).unwrap();
    };
    assert_ne!(changed(&|| retarget("b.txt"), &|| retarget("a.txt")), base);

    let rename = |from: &str, to: &str| fs::rename(context.join(from), context.join(to)).unwrap();
    assert_ne!(
        changed(&|| rename("b.txt", "c.txt"), &|| rename("c.txt", "b.txt")),
        base
    );
    assert_ne!(
        changed(&|| rename("dir/sub", "dir/other"), &|| rename(
            "dir/other",
            "dir/sub"
        )),
        base
    );

    // Ownership is not: COPY applies 0:0 or --chown, so a checkout by another user hits the
    // cache (the tests run as root in CI; elsewhere lchown fails and there is nothing to check).
    let owner = |uid: u32| lchown(context.join("b.txt"), Some(uid), Some(uid));
    if owner(1234).is_ok() {
        let after = digest(context, &["."]);
        owner(0).unwrap();
        assert_eq!(after, base);
    }

    // The same bytes under a different source spelling are the same files but a different
    // instruction: the source is part of the key.
    assert_ne!(digest(context, &["a.txt"]), digest(context, &["/a.txt"]));
    assert_eq!(
        selection(context, &["a.txt"]).files[0].hash,
        selection(context, &["/a.txt"]).files[0].hash
    );
}

#[test]
fn the_stat_cache_skips_unchanged_files_and_round_trips() {
    let temp = tempfile::tempdir().unwrap();
    let context = temp.path().join("context");
    sample_tree(&context);
    let regular_files = 4;
    let file = StatCache::file_for(&temp.path().join("store"), &context);
    assert!(file.starts_with(temp.path().join("store/context-cache")));
    assert_eq!(
        file,
        StatCache::file_for(&temp.path().join("store"), &context)
    );

    let cache = StatCache::load(&file);
    assert!(cache.is_empty(), "a missing file is an empty cache");
    let cold = select_with(&context, &["."], &[], &NoFilter, &cache).unwrap();
    assert_eq!((cache.hits(), cache.misses()), (0, regular_files));
    let warm = select_with(&context, &["."], &[], &NoFilter, &cache).unwrap();
    assert_eq!(
        (cache.hits(), cache.misses()),
        (regular_files, regular_files)
    );
    assert_eq!(warm, cold);
    cache.save().unwrap();

    let loaded = StatCache::load(&file);
    assert_eq!(loaded.len(), regular_files as usize);
    let again = select_with(&context, &["."], &[], &NoFilter, &loaded).unwrap();
    assert_eq!((loaded.hits(), loaded.misses()), (regular_files, 0));
    assert_eq!(again.digest, cold.digest);
    let saved = fs::read(&file).unwrap();
    loaded.save().unwrap();
    assert_eq!(
        fs::read(&file).unwrap(),
        saved,
        "a build that read nothing writes nothing"
    );

    write(&context, "dir/sub/y.rs", b"// y, edited\n");
    let edited = select_with(&context, &["."], &[], &NoFilter, &loaded).unwrap();
    assert_eq!(loaded.misses(), 1, "only the edited file is read");
    assert_eq!(loaded.hits(), 2 * regular_files - 1);
    assert_ne!(edited.digest, cold.digest);
    assert_eq!(edited.digest, digest(&context, &["."]));
    loaded.save().unwrap();
    assert_ne!(fs::read(&file).unwrap(), saved);
    assert_eq!(StatCache::load(&file).len(), regular_files as usize);

    fs::write(&file, b"{\"version\":1,\"generation\":3,\"entries\":[[1,2").unwrap();
    let corrupt = StatCache::load(&file);
    assert!(corrupt.is_empty());
    select_with(&context, &["."], &[], &NoFilter, &corrupt).unwrap();
    assert_eq!(corrupt.misses(), regular_files);
}

#[test]
fn stat_cache_entries_of_deleted_files_are_dropped_after_some_builds() {
    let temp = tempfile::tempdir().unwrap();
    let file = temp.path().join("cache.json");
    let context = temp.path().join("context");
    write(&context, "gone.txt", b"deleted after the first build");
    write(&context, "churn.txt", b"0");
    let build = || {
        let cache = StatCache::load(&file);
        select_with(&context, &["."], &[], &NoFilter, &cache).unwrap();
        cache.save().unwrap();
        StatCache::load(&file).len()
    };
    assert_eq!(build(), 2);
    fs::remove_file(context.join("gone.txt")).unwrap();
    let mut sizes = Vec::new();
    for round in 1..=8 {
        write(&context, "churn.txt", round.to_string().as_bytes());
        sizes.push(build());
    }
    assert_eq!(sizes, [2, 2, 2, 2, 2, 2, 2, 1]);
}

/// Git's racy-clean rule: a file modified within [`RACY_MARGIN`] of its read could change
/// again in the same timestamp tick, so its hash is used but not remembered.
#[test]
fn a_file_modified_just_now_is_hashed_but_not_cached() {
    let temp = tempfile::tempdir().unwrap();
    write(temp.path(), "old.txt", b"settled");
    fs::write(temp.path().join("new.txt"), b"just written").unwrap();
    let cache = StatCache::in_memory();
    let first = select_with(temp.path(), &["."], &[], &NoFilter, &cache).unwrap();
    let second = select_with(temp.path(), &["."], &[], &NoFilter, &cache).unwrap();
    assert_eq!(first, second);
    assert_eq!(cache.len(), 1, "only old.txt is remembered");
    assert_eq!((cache.hits(), cache.misses()), (1, 3));
}

#[test]
fn wildcards_match_like_filepath_match() {
    let temp = tempfile::tempdir().unwrap();
    let context = temp.path();
    for path in [
        "a.txt",
        "b.txt",
        "c.md",
        "ab.rs",
        ".hidden.txt",
        "dir/a.rs",
        "dir/b.rs",
        "dir/ab.rs",
        "dir/a.txt",
        "bdir/inner.txt",
        "other/a.rs",
    ] {
        write(context, path, path.as_bytes());
    }

    let text = selection(context, &["*.txt"]);
    assert_eq!(matched(&text), [".hidden.txt", "a.txt", "b.txt"]);
    assert!(text.roots.iter().all(|root| !root.is_directory));
    assert_eq!(
        matched(&selection(context, &["dir/?.rs"])),
        ["dir/a.rs", "dir/b.rs"]
    );
    let bracket = selection(context, &["[ab]*"]);
    assert_eq!(matched(&bracket), ["a.txt", "ab.rs", "b.txt", "bdir"]);
    assert!(listing(&bracket).contains(&"bdir:inner.txt".to_string()));
    assert_eq!(
        matched(&selection(context, &["*/a.rs"])),
        ["dir/a.rs", "other/a.rs"]
    );
    assert_eq!(matched(&selection(context, &["dir/[^a]*"])), ["dir/b.rs"]);

    // Which files a wildcard matches is part of the key: a new match changes it.
    let before = digest(context, &["*.txt"]);
    write(context, "z.txt", b"z");
    assert_ne!(digest(context, &["*.txt"]), before);

    let error = select_with(
        context,
        &["*.nothing"],
        &[],
        &NoFilter,
        &StatCache::in_memory(),
    )
    .unwrap_err();
    assert!(matches!(error, ContextError::NotFound { ref name } if name == "*.nothing"));
    let error = select_with(context, &["[a"], &[], &NoFilter, &StatCache::in_memory()).unwrap_err();
    assert!(
        matches!(error, ContextError::InvalidPattern { .. }),
        "{error}"
    );
}

#[test]
fn a_directory_source_selects_its_tree_relative_to_it() {
    let temp = tempfile::tempdir().unwrap();
    let context = temp.path();
    sample_tree(context);
    let dir = selection(context, &["dir", "a.txt"]);
    assert_eq!(
        listing(&dir),
        [
            "dir:",
            "dir:sub",
            "dir:sub/empty",
            "dir:sub/y.rs",
            "dir:x.rs",
            "a.txt:"
        ]
    );
    assert_eq!(dir.roots.len(), 2);
    assert!(dir.roots[0].is_directory && !dir.roots[1].is_directory);
    assert_eq!(dir.roots[1].source_index, 1);
    let y = dir
        .files
        .iter()
        .find(|file| file.relative == "sub/y.rs")
        .unwrap();
    assert_eq!(y.path, "dir/sub/y.rs");
    assert_eq!(y.kind, FileKind::File);
    assert_eq!(y.hash, Some(*blake3::hash(b"// y\n").as_bytes()));
    assert_eq!(y.size, 5);
    let x = dir
        .files
        .iter()
        .find(|file| file.relative == "x.rs")
        .unwrap();
    assert_eq!(x.mode, 0o755);

    let root = selection(context, &["."]);
    assert_eq!(root.roots[0].path, ".");
    assert_eq!(root.files[0].path, ".");
    let link = root.files.iter().find(|file| file.path == "link").unwrap();
    assert_eq!(
        link.kind,
        FileKind::Symlink {
            target: "a.txt".into()
        }
    );
    assert_eq!(link.hash, None);

    // A trailing slash demands a directory.
    assert!(
        select_with(
            context,
            &["a.txt/"],
            &[],
            &NoFilter,
            &StatCache::in_memory()
        )
        .is_err()
    );
    assert_eq!(digest(context, &["dir/"]), digest(context, &["dir/"]));
}

#[test]
fn exclude_patterns_apply_under_each_source() {
    let temp = tempfile::tempdir().unwrap();
    let context = temp.path();
    for path in [
        "app/a.log",
        "app/keep.log",
        "app/src/main.rs",
        "app/src/debug.log",
        "app/target/out.bin",
    ] {
        write(context, path, path.as_bytes());
    }
    let exclude = ["*.log", "!keep.log", "target"];
    let select_app = |exclude: &[&str]| {
        select_with(
            context,
            &["app"],
            exclude,
            &NoFilter,
            &StatCache::in_memory(),
        )
        .unwrap()
    };
    let excluded = select_app(&exclude);
    assert_eq!(
        listing(&excluded),
        [
            "app:",
            "app:keep.log",
            "app:src",
            "app:src/debug.log",
            "app:src/main.rs"
        ],
        "patterns are relative to the source and anchored, as in BuildKit"
    );
    assert_eq!(
        listing(&select_app(&["**/*.log", "target/"])),
        ["app:", "app:src", "app:src/main.rs"]
    );
    assert_ne!(excluded.digest, select_app(&[]).digest);

    // What is excluded does not reach the key.
    write(context, "app/a.log", b"a new log line");
    write(context, "app/target/out.bin", b"rebuilt");
    assert_eq!(select_app(&exclude).digest, excluded.digest);
    write(context, "app/keep.log", b"kept, and changed");
    assert_ne!(select_app(&exclude).digest, excluded.digest);

    let error = select_with(
        context,
        &["app"],
        &["!"],
        &NoFilter,
        &StatCache::in_memory(),
    )
    .unwrap_err();
    assert!(matches!(error, ContextError::InvalidPattern { .. }));
}

/// `.dockerignore` as the builder adapts it: `*.log`, `logs`, `!logs/keep.txt`, `cache`.
#[derive(Default)]
struct IgnoreLogs {
    asked: Mutex<Vec<String>>,
}

impl ContextFilter for IgnoreLogs {
    fn is_excluded(&self, path: &str, _is_directory: bool) -> bool {
        self.asked.lock().unwrap().push(path.to_string());
        let top_level_log = !path.contains('/') && path.ends_with(".log");
        let in_logs = path == "logs" || (path.starts_with("logs/") && path != "logs/keep.txt");
        let in_cache = path == "cache" || path.starts_with("cache/");
        top_level_log || in_logs || in_cache
    }

    fn can_skip_directory(&self, path: &str) -> bool {
        path != "logs"
    }
}

#[test]
fn the_filter_hides_paths_and_searches_directories_it_cannot_skip() {
    let temp = tempfile::tempdir().unwrap();
    let context = temp.path();
    for path in [
        "app.log",
        "main.rs",
        "logs/a.txt",
        "logs/keep.txt",
        "cache/blob",
        "cache/sub/x",
    ] {
        write(context, path, path.as_bytes());
    }
    let filter = IgnoreLogs::default();
    let select_filtered =
        |sources: &[&str]| select_with(context, sources, &[], &filter, &StatCache::in_memory());
    let all = select_filtered(&["."]).unwrap();
    assert_eq!(
        listing(&all),
        [".:", ".:logs", ".:logs/keep.txt", ".:main.rs"]
    );
    let asked = filter.asked.lock().unwrap().clone();
    assert!(
        asked.contains(&"logs/a.txt".to_string()),
        "logs is searched"
    );
    assert!(
        !asked.iter().any(|path| path.starts_with("cache/")),
        "cache is skipped without looking inside: {asked:?}"
    );

    assert_eq!(
        listing(&select_filtered(&["logs"]).unwrap()),
        ["logs:", "logs:keep.txt"]
    );
    for hidden in ["app.log", "cache/blob", "*.log", "logs/a.txt"] {
        let error = select_filtered(&[hidden]).unwrap_err();
        assert!(
            matches!(error, ContextError::NotFound { ref name } if name == hidden),
            "{hidden}: {error}"
        );
    }

    write(context, "logs/a.txt", b"ignored change");
    write(context, "cache/blob", b"ignored change");
    assert_eq!(select_filtered(&["."]).unwrap().digest, all.digest);
    write(context, "logs/keep.txt", b"visible change");
    assert_ne!(select_filtered(&["."]).unwrap().digest, all.digest);

    // Once nothing inside an unskippable excluded directory is visible, it is gone too.
    fs::remove_file(context.join("logs/keep.txt")).unwrap();
    assert_eq!(
        listing(&select_filtered(&["."]).unwrap()),
        [".:", ".:main.rs"]
    );
    assert!(select_filtered(&["logs"]).is_err());
}

#[test]
fn missing_and_escaping_sources_are_errors_naming_them() {
    let temp = tempfile::tempdir().unwrap();
    let context = temp.path().join("context");
    sample_tree(&context);
    let select_one = |source: &str| {
        select_with(
            &context,
            &["a.txt", source],
            &[],
            &NoFilter,
            &StatCache::in_memory(),
        )
    };
    let error = select_one("missing.txt").unwrap_err();
    assert_eq!(
        error.to_string(),
        "file not found in build context or excluded by .dockerignore: stat missing.txt"
    );
    for escaping in ["../outside", "dir/../../outside", ".."] {
        let error = select_one(escaping).unwrap_err();
        assert!(
            matches!(error, ContextError::OutsideContext { ref name } if name == escaping),
            "{escaping}: {error}"
        );
        assert!(error.to_string().contains(escaping));
    }
    assert_eq!(
        digest(&context, &["/a.txt"]),
        digest(&context, &["/a.txt"]),
        "a leading / is the context root"
    );
    assert_eq!(
        selection(&context, &["dir/../a.txt"]).roots[0].path,
        "a.txt"
    );
    assert!(matches!(
        select_one("dir/x.rs/more").unwrap_err(),
        ContextError::NotFound { .. }
    ));
}

#[test]
fn symlinks_pointing_outside_are_selected_as_symlinks_and_never_read() {
    let temp = tempfile::tempdir().unwrap();
    let victim = temp.path().join("victim");
    fs::create_dir(&victim).unwrap();
    fs::write(victim.join("secret"), b"SECRET").unwrap();
    let secret_hash = *blake3::hash(b"SECRET").as_bytes();
    let context = temp.path().join("context");
    write(&context, "inside.txt", b"inside");
    symlink("../victim/secret", context.join("up")).unwrap();
    symlink(victim.join("secret"), context.join("absolute")).unwrap();
    symlink("../victim", context.join("directory_link")).unwrap();

    let cache = StatCache::in_memory();
    let all = select_with(&context, &["."], &[], &NoFilter, &cache).unwrap();
    assert_eq!(cache.misses(), 1, "only inside.txt is read");
    let kind_of = |path: &str| {
        all.files
            .iter()
            .find(|file| file.path == path)
            .map(|file| file.kind.clone())
    };
    assert_eq!(
        kind_of("up"),
        Some(FileKind::Symlink {
            target: "../victim/secret".into()
        })
    );
    assert_eq!(
        kind_of("absolute"),
        Some(FileKind::Symlink {
            target: victim.join("secret").to_string_lossy().into_owned()
        })
    );
    assert_eq!(
        kind_of("directory_link"),
        Some(FileKind::Symlink {
            target: "../victim".into()
        })
    );
    assert!(all.files.iter().all(|file| file.hash != Some(secret_hash)));

    // Named as a source, a symlink is followed as BuildKit follows it: inside the context,
    // where `..` stops at the root and `/` is the root. Nothing named victim is there yet.
    for source in [
        "up",
        "absolute",
        "directory_link/secret",
        "directory_link/*",
    ] {
        let error = select_with(&context, &[source], &[], &NoFilter, &cache).unwrap_err();
        assert!(
            matches!(error, ContextError::NotFound { .. }),
            "{source}: {error}"
        );
    }
    write(&context, "victim/secret", b"INSIDE");
    let inside_hash = Some(*blake3::hash(b"INSIDE").as_bytes());
    for source in ["up", "directory_link/secret", "directory_link/*"] {
        let followed = selection(&context, &[source]);
        assert_eq!(followed.roots[0].path, "victim/secret", "{source}");
        assert_eq!(followed.files[0].hash, inside_hash, "{source}");
    }
    assert_eq!(selection(&context, &["up"]).roots[0].matched, "up");
    // A wildcard does not descend through a symlinked directory (filepath.Walk).
    assert_eq!(
        matched(&selection(&context, &["*/secret"])),
        ["victim/secret"]
    );
    assert_eq!(fs::read(victim.join("secret")).unwrap(), b"SECRET");
}

#[test]
fn symlink_loops_are_reported() {
    let temp = tempfile::tempdir().unwrap();
    symlink("second", temp.path().join("first")).unwrap();
    symlink("first", temp.path().join("second")).unwrap();
    let error = select_with(
        temp.path(),
        &["first"],
        &[],
        &NoFilter,
        &StatCache::in_memory(),
    )
    .unwrap_err();
    assert!(
        matches!(error, ContextError::TooManyLinks { .. }),
        "{error}"
    );
    // Inside a tree they are just two symlinks.
    assert_eq!(selection(temp.path(), &["."]).files.len(), 3);
}

/// Prints how long selecting a generated context takes with a cold and a warm stat cache.
/// Small by default; `RBUILD_MEASURE=1` makes it 20,000 files and ~400 MB (run it with
/// `cargo test --release -p rbuild-cache --test context -- --nocapture measure`).
#[test]
fn measure_select_with_cold_and_warm_stat_cache() {
    let big = std::env::var_os("RBUILD_MEASURE").is_some_and(|value| value == "1");
    let (directories, files_per_directory, large_every) =
        if big { (200, 100, 100) } else { (10, 20, 50) };
    let temp = tempfile::tempdir().unwrap();
    let context = temp.path().join("context");
    let started = Instant::now();
    let mut total_bytes = 0u64;
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for directory in 0..directories {
        for index in 0..files_per_directory {
            let number = directory * files_per_directory + index;
            // Mostly source-sized files, with 1 in `large_every` a 1.6 MB asset.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let size = if number % large_every == 0 {
                1_600_000
            } else {
                (seed % 8_000) as usize + 100
            };
            let content: Vec<u8> = (0..size)
                .map(|byte| (byte as u64).wrapping_mul(seed | 1) as u8)
                .collect();
            total_bytes += size as u64;
            write(
                &context,
                &format!("d{directory:03}/f{index:03}.dat"),
                &content,
            );
        }
    }
    let file_count = (directories * files_per_directory) as u64;
    println!(
        "generated {file_count} files, {:.1} MB in {:.2?}",
        total_bytes as f64 / 1e6,
        started.elapsed()
    );

    let cache_file = temp.path().join("cache.json");
    let cold_cache = StatCache::load(&cache_file);
    let started = Instant::now();
    let cold = select_with(&context, &["."], &[], &NoFilter, &cold_cache).unwrap();
    let cold_time = started.elapsed();
    assert_eq!(cold_cache.misses(), file_count);
    let started = Instant::now();
    cold_cache.save().unwrap();
    let save_time = started.elapsed();

    let started = Instant::now();
    let warm_cache = StatCache::load(&cache_file);
    let load_time = started.elapsed();
    let started = Instant::now();
    let warm = select_with(&context, &["."], &[], &NoFilter, &warm_cache).unwrap();
    let warm_time = started.elapsed();
    assert_eq!((warm_cache.hits(), warm_cache.misses()), (file_count, 0));
    assert_eq!(warm.digest, cold.digest);

    // Cold stat cache and cold page cache: write the pages back, then drop them from memory
    // for these files only.
    let sync = fs::File::open(&context).unwrap();
    rustix::fs::syncfs(&sync).unwrap();
    for entry in &cold.files {
        if entry.kind == FileKind::File {
            let file = fs::File::open(context.join(&entry.path)).unwrap();
            rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        }
    }
    let started = Instant::now();
    let from_disk = select_with(&context, &["."], &[], &NoFilter, &StatCache::in_memory()).unwrap();
    let disk_time = started.elapsed();
    assert_eq!(from_disk.digest, cold.digest);

    let rate = |time: std::time::Duration| total_bytes as f64 / 1e6 / time.as_secs_f64();
    println!(
        "cold stat cache, files in page cache: {cold_time:.2?} ({:.0} MB/s)",
        rate(cold_time)
    );
    println!(
        "cold stat cache, page cache dropped:  {disk_time:.2?} ({:.0} MB/s)",
        rate(disk_time)
    );
    println!(
        "warm stat cache: {warm_time:.2?} (+ load {load_time:.2?}, save {save_time:.2?}, {} KB file)",
        fs::metadata(&cache_file).unwrap().len() / 1024
    );
}
