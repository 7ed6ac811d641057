//! COPY and ADD: what a copy reads (for its key) and the copy itself.
//!
//! Besides plain copies from the context, a stage or an image:
//! - ADD of a local tar archive (plain, gzip, bzip2, xz, zstd; told by content) extracts it
//!   into the destination directory ([`super::archive`]); archives from `--from` stages and
//!   URLs are copied as files, BuildKit's rule (`ADD --unpack=true` extracts a URL too).
//! - ADD of http(s) URLs downloads them ([`super::fetch`]). With `--checksum` the key is the
//!   checksum and a cache hit downloads nothing; without it the file is downloaded for the key,
//!   whose content part is the file's sha256, name and `Last-Modified` time.
//! - `COPY --parents` keeps each source's parent directories under the destination, relative
//!   to the context root (or `/` of a `--from` stage), or to a `/./` pivot in the source:
//!   `COPY --parents ./x/./y/z /dst/` makes `/dst/y/z`, as BuildKit's include-pattern copy does.
//! - `--chmod` takes octal modes or chmod(1) symbolic ones (`u+x`, `go-w`, `a=rX`, `u=rwx,go=rx`).

use std::collections::{BTreeSet, HashSet};

use super::archive;
use super::fetch::{self, Checksum, Download};
use super::fingerprint::Fingerprint;
use super::*;
use rbuild_cache::context::SelectedFile;

/// What a COPY reads, for its cache key.
#[derive(Default)]
pub(super) struct CopyInputs {
    /// Keys of the stage or image it copies from.
    pub(super) stages: Vec<Digest>,
    /// The checksum of the context files it selects and the URLs it fetches.
    pub(super) checksum: Option<String>,
    /// Those files (path → mode and content hash) and URLs (URL → digest).
    pub(super) files: BTreeMap<String, String>,
    /// What the copy then follows, so the context is walked and a URL fetched only once.
    pub(super) prepared: Prepared,
}

/// The context selection and the downloads a COPY's key was computed from.
#[derive(Default)]
pub(super) struct Prepared {
    selection: Option<Selection>,
    /// URL → its download, for URLs without `--checksum` (fetched to compute the key).
    downloads: BTreeMap<String, Download>,
}

/// The snapshot a COPY made last time and the files it was made from.
pub(super) struct Reuse<'a> {
    snapshot: PathBuf,
    files: &'a BTreeMap<String, String>,
}

/// What a step's fingerprint records of a selected context file: mode and content hash (or
/// link target).
fn file_fingerprint(file: &SelectedFile) -> String {
    let content = match &file.kind {
        FileKind::File => file.hash.map(hex_of).unwrap_or_default(),
        FileKind::Symlink { target } => format!("-> {target}"),
        other => format!("{other:?}"),
    };
    format!("{:o} {content}", file.mode)
}

/// Whether a source names a remote resource rather than a path.
fn is_remote(source: &str) -> bool {
    source.contains("://")
}

/// The sources that are paths (in order): what the context selection is made of.
fn local_sources(copy: &CopyOp) -> Vec<String> {
    copy.sources
        .iter()
        .filter(|source| !is_remote(source))
        .cloned()
        .collect()
}

/// A source of `COPY --parents` split at its `/./` pivot: (the part whose components are
/// dropped, the part kept under the destination), both cleaned to components joined by `/`.
/// Without a pivot everything is kept (BuildKit copies from `/` with the source as include
/// pattern).
fn split_pivot(source: &str) -> (String, String) {
    let clean = |text: &str| {
        text.split('/')
            .filter(|part| !part.is_empty() && *part != ".")
            .collect::<Vec<_>>()
            .join("/")
    };
    match source.split_once("/./") {
        Some((pivot, kept)) => (clean(pivot), clean(kept)),
        None => (String::new(), clean(source)),
    }
}

/// `a/b` joined with `c` (either may be empty).
fn join_relative(parent: &str, child: &str) -> String {
    match (parent.is_empty(), child.is_empty()) {
        (true, _) => child.to_string(),
        (_, true) => parent.to_string(),
        _ => format!("{parent}/{child}"),
    }
}

impl Solver {
    /// The stage keys and content checksum a COPY reads; URLs without `--checksum` are
    /// downloaded here, since their content is part of the key.
    pub(super) fn copy_inputs(&self, step: &Step, copy: &CopyOp) -> Result<CopyInputs, SolveError> {
        let urls: Vec<&String> = copy
            .sources
            .iter()
            .filter(|source| is_remote(source))
            .collect();
        for url in &urls {
            if !copy.is_add {
                return Err(
                    self.step_error(step, format!("COPY does not fetch URLs ({url}); use ADD"))
                );
            }
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(self.step_error(
                    step,
                    format!("{url}: only http and https URLs can be added (git sources are not supported yet)"),
                ));
            }
            if !matches!(copy.input, Input::Context) {
                return Err(
                    self.step_error(step, format!("ADD --from does not fetch URLs ({url})"))
                );
            }
            if copy.options.parents {
                return Err(
                    self.step_error(step, format!("--parents does not apply to URLs ({url})"))
                );
            }
        }
        let checksum = self.checksum(step, copy)?;
        let mut inputs = match &copy.input {
            Input::Context => {
                if copy.sources.is_empty() {
                    let inline: String = copy
                        .inline_sources
                        .iter()
                        .map(|(name, data)| format!("{name}\0{data}\0"))
                        .collect();
                    return Ok(CopyInputs {
                        checksum: Some(Digest::of(inline.as_bytes()).to_string()),
                        ..CopyInputs::default()
                    });
                }
                let local = local_sources(copy);
                if local.is_empty() {
                    CopyInputs::default()
                } else {
                    self.select_context(step, copy, &local)?
                }
            }
            Input::Stage(index) => {
                let built = self.result_of(*index);
                CopyInputs {
                    stages: vec![built.fs_key.clone()],
                    ..CopyInputs::default()
                }
            }
            Input::Image(reference) => {
                let image = self.input_image(step, reference)?;
                CopyInputs {
                    stages: vec![image.target.digest.clone()],
                    ..CopyInputs::default()
                }
            }
        };
        if !urls.is_empty() {
            let mut text = inputs.checksum.clone().unwrap_or_default();
            for url in urls {
                let content = match &checksum {
                    // BuildKit's key for a pinned URL: the checksum, no request at all.
                    Some(checksum) => checksum.to_string(),
                    // Predicting fetches nothing: an unpinned URL's content is unknown.
                    None if self.options.dry_run => format!(
                        "unknown {}",
                        Digest::of(format!("{:?}", std::time::SystemTime::now()).as_bytes())
                    ),
                    None => {
                        let download = self.fetch(step, url, None)?;
                        let modified = download
                            .modified
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |since| since.as_secs());
                        let content = format!("{} {} {modified}", download.digest, download.name);
                        inputs.prepared.downloads.insert(url.clone(), download);
                        content
                    }
                };
                text.push_str(&format!("\nurl {url} {content}"));
                inputs.files.insert(url.clone(), content);
            }
            inputs.checksum = Some(Digest::of(text.as_bytes()).to_string());
        }
        Ok(inputs)
    }

    /// The context files `sources` select, with their checksum.
    fn select_context(
        &self,
        step: &Step,
        copy: &CopyOp,
        sources: &[String],
    ) -> Result<CopyInputs, SolveError> {
        let selection = rbuild_cache::context::select(
            &self.context,
            sources,
            &copy.options.exclude,
            &self.filter,
            &self.stat_cache,
        )
        .map_err(|error| self.step_error(step, crate::commands::image::chain_text(&error)))?;
        let files = selection
            .files
            .iter()
            .map(|file| (file.path.clone(), file_fingerprint(file)))
            .collect();
        Ok(CopyInputs {
            checksum: Some(selection.digest.clone()),
            files,
            prepared: Prepared {
                selection: Some(selection),
                ..Prepared::default()
            },
            ..CopyInputs::default()
        })
    }

    /// `--checksum`, parsed; only URLs may carry one (BuildKit's rule).
    fn checksum(&self, step: &Step, copy: &CopyOp) -> Result<Option<Checksum>, SolveError> {
        let Some(text) = &copy.options.checksum else {
            return Ok(None);
        };
        if !copy.sources.iter().any(|source| is_remote(source)) {
            return Err(self.step_error(
                step,
                "--checksum can only be given for http and https sources",
            ));
        }
        Checksum::parse(text)
            .map(Some)
            .map_err(|problem| self.step_error(step, problem))
    }

    /// Downloads `url` into a fresh scratch directory.
    fn fetch(
        &self,
        step: &Step,
        url: &str,
        expected: Option<&Checksum>,
    ) -> Result<Download, SolveError> {
        let directory = self.scratch_directory("download")?;
        fetch::download(url, directory, expected)
            .map_err(|error| self.step_error(step, crate::commands::image::chain_text(&error)))
    }

    pub(super) fn copy(
        &self,
        step: &Step,
        copy: &CopyOp,
        prepared: &Prepared,
        layers: &[LayerRecord],
        previous: Option<&Fingerprint>,
    ) -> Result<Option<LayerRecord>, SolveError> {
        let scratch = self.scratch_directory("copy")?;
        let tree = scratch.join("tree");
        fs::create_dir_all(&tree).map_err(io_error("create", &tree))?;
        let reuse = self.reuse(step, previous);
        let result = self
            .copy_into(step, copy, prepared, layers, &tree, reuse.as_ref())
            .and_then(|()| self.layer_from(&tree, LayerSource::Directory));
        let _ = fs::remove_dir_all(&scratch);
        result
    }

    /// The snapshot this step made last time, when it is still there and its files carry
    /// their sources' modification times (not under `SOURCE_DATE_EPOCH`, whose snapshots are
    /// unpacked from clamped layers), and the step is the same instruction.
    fn reuse<'a>(&self, step: &Step, previous: Option<&'a Fingerprint>) -> Option<Reuse<'a>> {
        // Under `--no-cache` too: the step runs again and makes its layer anew; linking a file
        // whose content (blake3) and metadata were checked unchanged is how it writes it, as
        // BuildKit's context transfer skips unchanged files.
        if self.options.source_date_epoch.is_some() {
            return None;
        }
        // The same instruction, so the same file lands at the same path.
        let previous = previous.filter(|previous| previous.definition == step.definition_digest)?;
        let diff_id: Digest = previous.layer.as_ref()?.parse().ok()?;
        let snapshot = self.store.snapshots_directory().join(diff_id.hex());
        snapshot.is_dir().then_some(Reuse {
            snapshot,
            files: &previous.files,
        })
    }

    fn copy_into(
        &self,
        step: &Step,
        copy: &CopyOp,
        prepared: &Prepared,
        layers: &[LayerRecord],
        tree: &Path,
        reuse: Option<&Reuse>,
    ) -> Result<(), SolveError> {
        let ownership = match &copy.options.chown {
            Some(chown) => Some(self.resolve_owner(step, chown, layers)?),
            None => None,
        };
        let mode =
            match &copy.options.chmod {
                Some(chmod) => Some(ModeChange::parse(chmod).map_err(|problem| {
                    self.step_error(step, format!("--chmod={chmod}: {problem}"))
                })?),
                None => None,
            };
        let mode = mode.as_ref();
        let parents = copy.options.parents;
        // (source path on disk, path in the destination tree relative to the root)
        let mut items: Vec<(PathBuf, String)> = Vec::new();
        let destination = copy.destination.clone();
        let destination_is_directory = destination.ends_with('/');
        let existing_view = self.view(layers)?;
        let destination_exists_as_directory = existing_view
            .lookup(&destination, true)
            .is_some_and(|entry| entry.metadata.is_dir());
        let base = destination
            .trim_start_matches('/')
            .trim_end_matches('/')
            .to_string();
        let mut sources: Vec<(PathBuf, bool)> = Vec::new(); // (path, is a directory source)
        match &copy.input {
            Input::Context => {
                if copy.sources.is_empty() {
                    for (name, data) in &copy.inline_sources {
                        let file = tree.parent().unwrap_or(tree).join(format!("inline-{name}"));
                        fs::write(&file, data).map_err(io_error("write", &file))?;
                        sources.push((file, false));
                    }
                } else {
                    let urls: Vec<&String> = copy
                        .sources
                        .iter()
                        .filter(|source| is_remote(source))
                        .collect();
                    let count = prepared
                        .selection
                        .as_ref()
                        .map_or(0, |selection| selection.roots.len())
                        + urls.len();
                    if count > 1
                        && !parents
                        && !destination_is_directory
                        && !destination_exists_as_directory
                    {
                        return Err(self.step_error(step, "when using COPY with more than one source file, the destination must be a directory and end with a /"));
                    }
                    let into_directory = destination_is_directory
                        || destination_exists_as_directory
                        || count > 1
                        || parents;
                    if let Some(selection) = &prepared.selection {
                        self.copy_selection(
                            step,
                            copy,
                            selection,
                            tree,
                            &base,
                            into_directory,
                            ownership,
                            mode,
                            reuse,
                        )?;
                    }
                    let checksum = self.checksum(step, copy)?;
                    for url in urls {
                        let fetched;
                        let download = match prepared.downloads.get(url.as_str()) {
                            Some(download) => download,
                            None => {
                                fetched = self.fetch(step, url, checksum.as_ref())?;
                                &fetched
                            }
                        };
                        // URLs are extracted only when asked to (BuildKit's `ADD --unpack`).
                        if copy.options.unpack == Some(true) && archive::is_archive(&download.path)
                        {
                            self.extract(step, &download.path, url, tree, &base, ownership)?;
                        } else {
                            let relative = if into_directory {
                                join_relative(&base, &download.name)
                            } else {
                                base.clone()
                            };
                            copy_tree(&download.path, &tree.join(relative), ownership, mode)?;
                        }
                    }
                    return Ok(());
                }
            }
            Input::Stage(_) | Input::Image(_) => {
                let view = match &copy.input {
                    Input::Stage(index) => self.view(&self.result_of(*index).layers)?,
                    Input::Image(reference) => {
                        let image = self.input_image(step, reference)?;
                        LayerView::new(self.image_directories(&image)?)
                    }
                    Input::Context => unreachable!(),
                };
                let staging = tree.parent().unwrap_or(tree).join("from");
                for (index, written) in copy.sources.iter().enumerate() {
                    let (pivot, kept) = split_pivot(written);
                    // `--parents` sources are looked up without their `/./` pivot marker.
                    let source = &if parents {
                        format!("/{}", join_relative(&pivot, &kept))
                    } else {
                        written.clone()
                    };
                    let entry = view.lookup(source, true).ok_or_else(|| {
                        self.step_error(
                            step,
                            format!("{source}: not found in the stage or image it is copied from"),
                        )
                    })?;
                    // Materialize the source (merged across layers) in a staging directory.
                    let name = source
                        .trim_end_matches('/')
                        .rsplit('/')
                        .next()
                        .filter(|name| !name.is_empty())
                        .unwrap_or("root");
                    let staged = staging.join(index.to_string()).join(name);
                    copy_from_view(&view, source, &entry, &staged)?;
                    if parents {
                        make_parents(tree, &base, &kept, ownership, mode, |prefix| {
                            view.lookup(&format!("/{}", join_relative(&pivot, prefix)), true)
                                .filter(|entry| entry.metadata.is_dir())
                                .map(|entry| entry.metadata.mode() & 0o7777)
                        })?;
                        items.push((staged, join_relative(&base, &kept)));
                    } else {
                        sources.push((staged, entry.metadata.is_dir()));
                    }
                }
                if sources.len() > 1
                    && !destination_is_directory
                    && !destination_exists_as_directory
                {
                    return Err(self.step_error(step, "when using COPY with more than one source file, the destination must be a directory and end with a /"));
                }
            }
        }
        let into_directory =
            destination_is_directory || destination_exists_as_directory || sources.len() > 1;
        for (source, is_directory) in sources {
            if is_directory {
                items.push((source, destination.trim_start_matches('/').to_string()));
            } else if into_directory {
                let name = source
                    .file_name()
                    .map(|name| {
                        name.to_string_lossy()
                            .trim_start_matches("inline-")
                            .to_string()
                    })
                    .unwrap_or_default();
                items.push((
                    source,
                    format!(
                        "{}/{name}",
                        destination.trim_start_matches('/').trim_end_matches('/')
                    ),
                ));
            } else {
                items.push((source, destination.trim_start_matches('/').to_string()));
            }
        }
        for (source, relative) in items {
            let target = tree.join(relative.trim_start_matches('/'));
            copy_tree(&source, &target, ownership, mode)?;
        }
        Ok(())
    }

    /// Copies the selected context files into `tree` under `base`; with ADD, a file source
    /// that is an archive is extracted into `base` instead.
    #[allow(clippy::too_many_arguments)]
    fn copy_selection(
        &self,
        step: &Step,
        copy: &CopyOp,
        selection: &Selection,
        tree: &Path,
        base: &str,
        into_directory: bool,
        ownership: Option<(u32, u32)>,
        mode: Option<&ModeChange>,
        reuse: Option<&Reuse>,
    ) -> Result<(), SolveError> {
        let unpack = copy.is_add && copy.options.unpack != Some(false);
        let archives: BTreeSet<usize> = if unpack {
            selection
                .roots
                .iter()
                .enumerate()
                .filter(|(_, root)| {
                    !root.is_directory && archive::is_archive(&self.context.join(&root.path))
                })
                .map(|(index, _)| index)
                .collect()
        } else {
            BTreeSet::new()
        };
        let local = local_sources(copy);
        // For --parents: each root's path under the destination, its parents made once.
        let mut kept_paths: BTreeMap<usize, String> = BTreeMap::new();
        let mut extracted = BTreeSet::new();
        let mut copies = ContextCopies::new(ownership, mode);
        // Only the selected files: what .dockerignore and --exclude hide is never copied.
        for file in &selection.files {
            let root = &selection.roots[file.root];
            if archives.contains(&file.root) {
                if extracted.insert(file.root) {
                    // What was copied so far lands before the archive is unpacked over it.
                    copies.flush()?;
                    let path = self.context.join(&file.path);
                    self.extract(step, &path, &file.path, tree, base, ownership)?;
                }
                continue;
            }
            let relative = if copy.options.parents {
                let kept = match kept_paths.get(&file.root) {
                    Some(kept) => kept.clone(),
                    None => {
                        let kept =
                            self.kept_path(step, &local[root.source_index], &root.matched)?;
                        let (pivot, _) = split_pivot(&local[root.source_index]);
                        make_parents(tree, base, &kept, ownership, mode, |prefix| {
                            fs::symlink_metadata(self.context.join(join_relative(&pivot, prefix)))
                                .ok()
                                .filter(|metadata| metadata.is_dir())
                                .map(|metadata| metadata.mode() & 0o7777)
                        })?;
                        kept_paths.insert(file.root, kept.clone());
                        kept
                    }
                };
                join_relative(base, &join_relative(&kept, &file.relative))
            } else if root.is_directory {
                join_relative(base, &file.relative)
            } else if into_directory {
                let name = root.matched.rsplit('/').next().unwrap_or(&root.matched);
                join_relative(base, name)
            } else {
                base.to_string()
            };
            let source = self.context.join(&file.path);
            let relative = relative.trim_start_matches('/');
            let target = tree.join(relative);
            // A file this step copied last time, unchanged since: its copy in that snapshot.
            let previous = reuse.and_then(|reuse| {
                (matches!(file.kind, FileKind::File)
                    && reuse.files.get(&file.path) == Some(&file_fingerprint(file)))
                .then(|| reuse.snapshot.join(relative))
            });
            copies.add(source, target, &file.kind, file.mode, previous)?;
        }
        copies.finish()
    }

    /// Where `COPY --parents` puts what `source` matched (`matched`, relative to the context
    /// root): the path after the source's `/./` pivot, or all of it.
    fn kept_path(&self, step: &Step, source: &str, matched: &str) -> Result<String, SolveError> {
        let (pivot, _) = split_pivot(source);
        let matched = split_pivot(matched).1;
        if pivot.is_empty() {
            return Ok(matched);
        }
        if matched == pivot {
            return Ok(String::new());
        }
        matched
            .strip_prefix(&format!("{pivot}/"))
            .map(str::to_string)
            .ok_or_else(|| {
                self.step_error(
                    step,
                    format!("{source}: {matched} is not under the /./ pivot {pivot} (a symlink in the pivot is not supported)"),
                )
            })
    }

    /// Extracts the archive at `path` (named `name` in messages) into `base` of `tree`.
    fn extract(
        &self,
        step: &Step,
        path: &Path,
        name: &str,
        tree: &Path,
        base: &str,
        ownership: Option<(u32, u32)>,
    ) -> Result<(), SolveError> {
        // The extraction root must be a real directory of this scratch tree: never a symlink
        // an earlier source of the same step left on the way.
        let mut target = tree.to_path_buf();
        for component in base.split('/').filter(|component| !component.is_empty()) {
            target.push(component);
            match fs::symlink_metadata(&target) {
                Ok(metadata) if metadata.is_dir() => {}
                Ok(_) => {
                    return Err(self.step_error(
                        step,
                        format!("cannot extract {name}: /{base} is not a directory"),
                    ));
                }
                Err(_) => {
                    fs::create_dir(&target).map_err(io_error("create", &target))?;
                    if let Some((uid, gid)) = ownership {
                        std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
                            .map_err(io_error("chown", &target))?;
                    }
                }
            }
        }
        archive::extract(path, name, &target, ownership)
            .map_err(|error| self.step_error(step, crate::commands::image::chain_text(&error)))
    }

    /// `--chown` as (uid, gid), names resolved with the image's own `/etc/passwd` and
    /// `/etc/group` as the sandbox resolves USER; a bare numeric user gets the same group id.
    fn resolve_owner(
        &self,
        step: &Step,
        chown: &str,
        layers: &[LayerRecord],
    ) -> Result<(u32, u32), SolveError> {
        if let Ok(uid) = chown.parse::<u32>() {
            return Ok((uid, uid));
        }
        let view = self.view(layers)?;
        let read = |path: &str| {
            view.lookup(path, true)
                .and_then(|entry| fs::read_to_string(entry.real).ok())
        };
        let (passwd, group) = (read("/etc/passwd"), read("/etc/group"));
        let user = rbuild_executor::user::resolve(chown, passwd.as_deref(), group.as_deref())
            .map_err(|error| {
                self.step_error(
                    step,
                    format!(
                        "--chown={chown}: {}",
                        crate::commands::image::chain_text(&error)
                    ),
                )
            })?;
        Ok((user.uid, user.gid))
    }
}

/// Copies `source` (a file, directory or symlink on disk) to `target`, creating parents
/// (0755), setting ownership (default root) and, with `mode`, the permission bits of files
/// and directories copied.
fn copy_tree(
    source: &Path,
    target: &Path,
    ownership: Option<(u32, u32)>,
    mode: Option<&ModeChange>,
) -> Result<(), SolveError> {
    let (uid, gid) = ownership.unwrap_or((0, 0));
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(io_error("create", parent))?;
    }
    let metadata = fs::symlink_metadata(source).map_err(io_error("stat", source))?;
    if metadata.is_dir() {
        if !target.is_dir() {
            fs::create_dir(target).map_err(io_error("create", target))?;
        }
        let mut entries: Vec<_> = fs::read_dir(source)
            .map_err(io_error("list", source))?
            .flatten()
            .collect();
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            copy_tree(
                &entry.path(),
                &target.join(entry.file_name()),
                ownership,
                mode,
            )?;
        }
        let bits = apply_mode(mode, metadata.mode() & 0o7777, true);
        fs::set_permissions(target, fs::Permissions::from_mode(bits))
            .map_err(io_error("chmod", target))?;
        std::os::unix::fs::lchown(target, Some(uid), Some(gid))
            .map_err(io_error("chown", target))?;
    } else if metadata.file_type().is_symlink() {
        let link = fs::read_link(source).map_err(io_error("read link", source))?;
        let _ = fs::remove_file(target);
        std::os::unix::fs::symlink(&link, target).map_err(io_error("symlink", target))?;
        std::os::unix::fs::lchown(target, Some(uid), Some(gid))
            .map_err(io_error("chown", target))?;
    } else if metadata.is_file() {
        let bits = apply_mode(mode, metadata.mode() & 0o7777, false);
        return copy_file(source, target, bits, (uid, gid));
    }
    // Copies keep the source's modification time, as BuildKit's do.
    let times =
        fs::FileTimes::new().set_modified(metadata.modified().map_err(io_error("stat", source))?);
    if !metadata.file_type().is_symlink() {
        fs::File::options()
            .write(metadata.is_file())
            .read(!metadata.is_file())
            .open(target)
            .and_then(|file| file.set_times(times))
            .map_err(io_error("set times", target))?;
    }
    Ok(())
}

/// The copies of selected context entries (never following symlinks), in selection order.
///
/// Directories and symlinks are made as they come; regular files, the bulk of the work, are
/// queued and copied in parallel, each directory before anything inside it. A target named
/// twice (two sources overlapping) first lets the queue drain, so the later source wins as in
/// a copy one by one. Directories get their mode and mtime last, once nothing more is written
/// into them.
struct ContextCopies<'a> {
    ownership: (u32, u32),
    mode: Option<&'a ModeChange>,
    /// Regular files to copy: (source, target, permission bits, the same file in the
    /// previous snapshot).
    queued: Vec<(PathBuf, PathBuf, u32, Option<PathBuf>)>,
    /// Every target so far.
    targets: HashSet<PathBuf>,
    /// Directories made: (source, target, permission bits), parents first.
    directories: Vec<(PathBuf, PathBuf, u32)>,
    /// The last parent directory made sure of, so a directory's files check it once.
    last_parent: Option<PathBuf>,
}

impl<'a> ContextCopies<'a> {
    fn new(ownership: Option<(u32, u32)>, mode: Option<&'a ModeChange>) -> Self {
        Self {
            ownership: ownership.unwrap_or((0, 0)),
            mode,
            queued: Vec::new(),
            targets: HashSet::new(),
            directories: Vec::new(),
            last_parent: None,
        }
    }

    /// Copies (or queues the copy of) `source`, of `kind` with permission bits `source_mode`,
    /// to `target`. `previous` is where the same content was put by this step's last build.
    fn add(
        &mut self,
        source: PathBuf,
        target: PathBuf,
        kind: &FileKind,
        source_mode: u32,
        previous: Option<PathBuf>,
    ) -> Result<(), SolveError> {
        if !self.targets.insert(target.clone()) {
            self.flush()?;
            self.targets.insert(target.clone());
        }
        if let Some(parent) = target.parent()
            && self.last_parent.as_deref() != Some(parent)
        {
            fs::create_dir_all(parent).map_err(io_error("create", parent))?;
            self.last_parent = Some(parent.to_path_buf());
        }
        let (uid, gid) = self.ownership;
        match kind {
            FileKind::Directory => {
                if !target.is_dir() {
                    fs::create_dir(&target).map_err(io_error("create", &target))?;
                }
                std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
                    .map_err(io_error("chown", &target))?;
                let bits = apply_mode(self.mode, source_mode, true);
                self.directories.push((source, target, bits));
            }
            FileKind::Symlink { target: link } => {
                let _ = fs::remove_file(&target);
                std::os::unix::fs::symlink(link, &target).map_err(io_error("symlink", &target))?;
                std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
                    .map_err(io_error("chown", &target))?;
            }
            FileKind::File => {
                let bits = apply_mode(self.mode, source_mode, false);
                self.queued.push((source, target, bits, previous));
            }
            // Pipes, sockets and devices in a context are not copied (BuildKit skips sockets too).
            _ => {}
        }
        Ok(())
    }

    /// Copies the queued files, in parallel.
    fn flush(&mut self) -> Result<(), SolveError> {
        use rayon::prelude::*;
        let queued = std::mem::take(&mut self.queued);
        self.targets.clear();
        let ownership = self.ownership;
        queued
            .par_iter()
            .try_for_each(|(source, target, bits, previous)| {
                if let Some(previous) = previous
                    && link_previous(previous, source, target, *bits, ownership)?
                {
                    return Ok(());
                }
                copy_file(source, target, *bits, ownership)
            })
    }

    /// Copies what is queued, then gives the directories their modes and modification
    /// times, deepest first.
    fn finish(mut self) -> Result<(), SolveError> {
        self.flush()?;
        for (source, target, bits) in self.directories.iter().rev() {
            let modified = fs::symlink_metadata(source)
                .and_then(|metadata| metadata.modified())
                .map_err(io_error("stat", source))?;
            let directory = fs::File::open(target).map_err(io_error("open", target))?;
            directory
                .set_permissions(fs::Permissions::from_mode(*bits))
                .map_err(io_error("chmod", target))?;
            directory
                .set_times(fs::FileTimes::new().set_modified(modified))
                .map_err(io_error("set times", target))?;
        }
        Ok(())
    }
}

/// Links `target` to `previous`, the copy of `source` in an earlier snapshot of the same step,
/// when that copy is exactly what a copy now would make: a regular file with the same size,
/// `bits`, owner and modification time. Snapshots are never written to, so sharing the inode
/// is safe, and a one-file edit of a large context writes one file, not all of them. Returns
/// whether it linked.
fn link_previous(
    previous: &Path,
    source: &Path,
    target: &Path,
    bits: u32,
    (uid, gid): (u32, u32),
) -> Result<bool, SolveError> {
    let (Ok(old), Ok(now)) = (fs::symlink_metadata(previous), fs::symlink_metadata(source)) else {
        return Ok(false);
    };
    let same = old.is_file()
        && now.is_file()
        && old.len() == now.len()
        && old.mode() & 0o7777 == bits
        && (old.uid(), old.gid()) == (uid, gid)
        && (old.mtime(), old.mtime_nsec()) == (now.mtime(), now.mtime_nsec());
    if !same {
        return Ok(false);
    }
    match fs::hard_link(previous, target) {
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(target).map_err(io_error("replace", target))?;
            fs::hard_link(previous, target).map_err(io_error("link", target))?;
        }
        result => result.map_err(io_error("link", target))?,
    }
    Ok(true)
}

/// Copies the regular file `source` to `target`, replacing what is there (never writing
/// through a symlink at `target`): owned by `uid:gid`, with permission `bits` and the source's
/// modification time, as BuildKit's copies keep it. Works on open files, so each path is
/// looked up once.
fn copy_file(
    source: &Path,
    target: &Path,
    bits: u32,
    (uid, gid): (u32, u32),
) -> Result<(), SolveError> {
    let mut input = fs::File::open(source).map_err(io_error("open", source))?;
    let modified = input
        .metadata()
        .and_then(|metadata| metadata.modified())
        .map_err(io_error("stat", source))?;
    // O_CREAT|O_EXCL never follows a symlink at the target; what is there is removed first.
    let create = || {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(target)
    };
    let mut output = match create() {
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(target).map_err(io_error("replace", target))?;
            create()
        }
        result => result,
    }
    .map_err(io_error("create", target))?;
    io::copy(&mut input, &mut output).map_err(io_error("copy", source))?;
    // Ownership before the mode: a chown clears setuid and setgid bits.
    std::os::unix::fs::fchown(&output, Some(uid), Some(gid)).map_err(io_error("chown", target))?;
    output
        .set_permissions(fs::Permissions::from_mode(bits))
        .map_err(io_error("chmod", target))?;
    output
        .set_times(fs::FileTimes::new().set_modified(modified))
        .map_err(io_error("set times", target))?;
    Ok(())
}

/// Materializes `path` of a layer view (merged across layers) at `target`.
fn copy_from_view(
    view: &LayerView,
    path: &str,
    entry: &rbuild_cache::snapshot::ViewEntry,
    target: &Path,
) -> Result<(), SolveError> {
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(io_error("create", parent))?;
    }
    if entry.metadata.is_dir() {
        fs::create_dir_all(target).map_err(io_error("create", target))?;
        fs::set_permissions(
            target,
            fs::Permissions::from_mode(entry.metadata.mode() & 0o7777),
        )
        .map_err(io_error("chmod", target))?;
        for name in view.read_dir(&view.resolve(path)) {
            let child = format!("{}/{name}", view.resolve(path).trim_end_matches('/'));
            if let Some(child_entry) = view.lookup(&child, false) {
                copy_from_view(view, &child, &child_entry, &target.join(&name))?;
            }
        }
        Ok(())
    } else if entry.metadata.file_type().is_symlink() {
        let link = fs::read_link(&entry.real).map_err(io_error("read link", &entry.real))?;
        std::os::unix::fs::symlink(link, target).map_err(io_error("symlink", target))
    } else {
        fs::copy(&entry.real, target).map_err(io_error("copy", target))?;
        fs::set_permissions(
            target,
            fs::Permissions::from_mode(entry.metadata.mode() & 0o7777),
        )
        .map_err(io_error("chmod", target))?;
        let times = fs::FileTimes::new().set_modified(
            entry
                .metadata
                .modified()
                .map_err(io_error("stat", &entry.real))?,
        );
        fs::File::options()
            .write(true)
            .open(target)
            .and_then(|file| file.set_times(times))
            .map_err(io_error("set times", target))
    }
}

/// Makes the parent directories of `kept` under `base` in `tree` that are not there yet, with
/// the mode `mode_of` gives for each (relative to the pivot; 0755 when it gives none), changed
/// by `--chmod`, and owned by `ownership` (root by default): BuildKit copies the parents of
/// what an include pattern matched with their own metadata.
fn make_parents(
    tree: &Path,
    base: &str,
    kept: &str,
    ownership: Option<(u32, u32)>,
    mode: Option<&ModeChange>,
    mode_of: impl Fn(&str) -> Option<u32>,
) -> Result<(), SolveError> {
    let (uid, gid) = ownership.unwrap_or((0, 0));
    let base_directory = tree.join(base);
    fs::create_dir_all(&base_directory).map_err(io_error("create", &base_directory))?;
    let components: Vec<&str> = kept.split('/').filter(|part| !part.is_empty()).collect();
    let mut prefix = String::new();
    for component in components.iter().take(components.len().saturating_sub(1)) {
        prefix = join_relative(&prefix, component);
        let directory = base_directory.join(&prefix);
        if fs::symlink_metadata(&directory).is_ok() {
            continue;
        }
        fs::create_dir(&directory).map_err(io_error("create", &directory))?;
        let bits = apply_mode(mode, mode_of(&prefix).unwrap_or(0o755), true);
        fs::set_permissions(&directory, fs::Permissions::from_mode(bits))
            .map_err(io_error("chmod", &directory))?;
        std::os::unix::fs::lchown(&directory, Some(uid), Some(gid))
            .map_err(io_error("chown", &directory))?;
    }
    Ok(())
}

/// The permission bits of a copied file or directory: its own, changed by `--chmod`.
fn apply_mode(mode: Option<&ModeChange>, current: u32, is_directory: bool) -> u32 {
    mode.map_or(current, |mode| mode.apply(current, is_directory))
}

/// A `--chmod`: octal bits, or chmod(1) symbolic clauses applied to each file's own mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ModeChange {
    /// `0755`: these bits, for files and directories alike.
    Octal(u32),
    /// `u+x,go-w`: clauses applied in order.
    Symbolic(Vec<Clause>),
}

/// One clause of a symbolic mode: who, then one or more operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Clause {
    /// The classes named (`u` 0o700, `g` 0o070, `o` 0o007); none named means all.
    who: u32,
    operations: Vec<(char, Permissions)>,
}

/// What an operation adds, removes or sets.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Permissions {
    /// Some of `rwxXst`.
    Letters(String),
    /// The current bits of a class (`u`, `g` or `o`).
    CopyOf(char),
}

const USER: u32 = 0o700;
const GROUP: u32 = 0o070;
const OTHER: u32 = 0o007;

impl ModeChange {
    /// Parses `--chmod`: digits are octal (at most 0o7777), anything else chmod(1)'s symbolic
    /// grammar, `[ugoa]*([-+=]([rwxXst]*|[ugo]))+` separated by commas. A clause that names
    /// nobody applies to all classes; there is no umask in a build, so none masks it.
    pub(super) fn parse(text: &str) -> Result<Self, String> {
        if !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()) {
            return u32::from_str_radix(text, 8)
                .ok()
                .filter(|bits| *bits <= 0o7777)
                .map(Self::Octal)
                .ok_or_else(|| "not an octal mode of at most 7777".to_string());
        }
        let mut clauses = Vec::new();
        for clause in text.split(',') {
            let mut characters = clause.chars().peekable();
            let mut who = 0;
            while let Some(&character) = characters.peek() {
                who |= match character {
                    'u' => USER,
                    'g' => GROUP,
                    'o' => OTHER,
                    'a' => USER | GROUP | OTHER,
                    _ => break,
                };
                characters.next();
            }
            let mut operations = Vec::new();
            while let Some(operation) = characters.next() {
                if !matches!(operation, '+' | '-' | '=') {
                    return Err(format!(
                        "unexpected {operation:?} in {clause:?}: want a mode like u+x, go-w, a=rX or 0755"
                    ));
                }
                let mut letters = String::new();
                let mut permissions = None;
                while let Some(&character) = characters.peek() {
                    match character {
                        'r' | 'w' | 'x' | 'X' | 's' | 't' => letters.push(character),
                        'u' | 'g' | 'o' if letters.is_empty() && permissions.is_none() => {
                            permissions = Some(Permissions::CopyOf(character));
                        }
                        '+' | '-' | '=' => break,
                        _ => {
                            return Err(format!(
                                "unexpected {character:?} in {clause:?}: want a mode like u+x, go-w, a=rX or 0755"
                            ));
                        }
                    }
                    characters.next();
                }
                if permissions.is_some() && !letters.is_empty() {
                    return Err(format!("{clause:?} mixes a class and permission letters"));
                }
                operations.push((
                    operation,
                    permissions.unwrap_or(Permissions::Letters(letters)),
                ));
            }
            if operations.is_empty() {
                return Err(format!(
                    "{clause:?} has no operation: want a mode like u+x, go-w, a=rX or 0755"
                ));
            }
            clauses.push(Clause { who, operations });
        }
        Ok(Self::Symbolic(clauses))
    }

    /// The mode of a file (or directory) whose mode is `current` after this change.
    pub(super) fn apply(&self, current: u32, is_directory: bool) -> u32 {
        let clauses = match self {
            Self::Octal(bits) => return *bits,
            Self::Symbolic(clauses) => clauses,
        };
        let mut mode = current & 0o7777;
        for clause in clauses {
            let who = if clause.who == 0 {
                USER | GROUP | OTHER
            } else {
                clause.who
            };
            let special_of_who = (if who & USER != 0 { 0o4000 } else { 0 })
                | (if who & GROUP != 0 { 0o2000 } else { 0 })
                | (if who & OTHER != 0 { 0o1000 } else { 0 });
            for (operation, permissions) in &clause.operations {
                let bits = match permissions {
                    Permissions::CopyOf(class) => {
                        let shift = match class {
                            'u' => 6,
                            'g' => 3,
                            _ => 0,
                        };
                        let triple = (mode >> shift) & 0o7;
                        ((triple << 6) | (triple << 3) | triple) & who
                    }
                    Permissions::Letters(letters) => {
                        let mut bits = 0;
                        for letter in letters.chars() {
                            bits |= match letter {
                                'r' => 0o444 & who,
                                'w' => 0o222 & who,
                                'x' => 0o111 & who,
                                // Execute only for directories and files some class can
                                // already execute (chmod(1)).
                                'X' if is_directory || mode & 0o111 != 0 => 0o111 & who,
                                's' => special_of_who & 0o6000,
                                't' => special_of_who & 0o1000,
                                _ => 0,
                            };
                        }
                        bits
                    }
                };
                match operation {
                    '+' => mode |= bits,
                    '-' => mode &= !bits,
                    _ => mode = (mode & !(who | special_of_who)) | bits,
                }
            }
        }
        mode
    }
}

fn hex_of(bytes: [u8; 32]) -> String {
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(text: &str, current: u32, is_directory: bool) -> u32 {
        ModeChange::parse(text)
            .unwrap_or_else(|problem| panic!("{text}: {problem}"))
            .apply(current, is_directory)
    }

    #[test]
    fn symbolic_modes_follow_chmod() {
        assert_eq!(change("u+x", 0o644, false), 0o744);
        assert_eq!(change("go-w", 0o666, false), 0o644);
        assert_eq!(change("a=rX", 0o640, false), 0o444);
        assert_eq!(change("a=rX", 0o740, false), 0o555);
        assert_eq!(change("a=rX", 0o700, true), 0o555);
        assert_eq!(change("u=rwx,go=rx", 0o600, false), 0o755);
        assert_eq!(change("+x", 0o644, false), 0o755);
        assert_eq!(change("o=u", 0o750, false), 0o757);
        assert_eq!(change("u+s,+t", 0o755, false), 0o5755);
        assert_eq!(change("u-w+x", 0o644, false), 0o544);
        assert_eq!(change("0755", 0o600, false), 0o755);
        assert_eq!(change("755", 0o600, true), 0o755);
    }

    #[test]
    fn bad_modes_are_refused() {
        for bad in ["", "u", "u+q", "z+x", "u+x,", "99", "17777", "u+rg"] {
            assert!(ModeChange::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn pivots_split_where_buildkit_cuts() {
        assert_eq!(
            split_pivot("./x/./y/z"),
            ("x".to_string(), "y/z".to_string())
        );
        assert_eq!(
            split_pivot("./x/a.txt"),
            (String::new(), "x/a.txt".to_string())
        );
        assert_eq!(
            split_pivot("/app/./bin/tool"),
            ("app".to_string(), "bin/tool".to_string())
        );
        assert_eq!(
            split_pivot("/app/bin"),
            (String::new(), "app/bin".to_string())
        );
    }
}
