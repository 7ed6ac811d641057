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

use std::collections::BTreeSet;

use super::archive;
use super::fetch::{self, Checksum, Download};
use super::*;

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
                let images = crate::resolver::StoreImages::new(Some(&self.store));
                let image = images.lookup(reference).ok_or_else(|| {
                    self.step_error(step, format!("image {reference} is not in the store"))
                })?;
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
            .map(|file| {
                let content = match &file.kind {
                    FileKind::File => file.hash.map(hex_of).unwrap_or_default(),
                    FileKind::Symlink { target } => format!("-> {target}"),
                    other => format!("{other:?}"),
                };
                (file.path.clone(), format!("{:o} {content}", file.mode))
            })
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
    ) -> Result<Option<LayerRecord>, SolveError> {
        let scratch = self.scratch_directory("copy")?;
        let tree = scratch.join("tree");
        fs::create_dir_all(&tree).map_err(io_error("create", &tree))?;
        let result = self
            .copy_into(step, copy, prepared, layers, &tree)
            .and_then(|()| self.layer_from(&tree, LayerSource::Directory));
        let _ = fs::remove_dir_all(&scratch);
        result
    }

    fn copy_into(
        &self,
        step: &Step,
        copy: &CopyOp,
        prepared: &Prepared,
        layers: &[LayerRecord],
        tree: &Path,
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
                        let images = crate::resolver::StoreImages::new(Some(&self.store));
                        let image = images.lookup(reference).ok_or_else(|| {
                            self.step_error(step, format!("image {reference} is not in the store"))
                        })?;
                        let mut directories = snapshot::prepare_image(&self.store, &image)?;
                        directories.reverse();
                        LayerView::new(directories)
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
        // Only the selected files: what .dockerignore and --exclude hide is never copied.
        for file in &selection.files {
            let root = &selection.roots[file.root];
            if archives.contains(&file.root) {
                if extracted.insert(file.root) {
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
            let target = tree.join(relative.trim_start_matches('/'));
            copy_entry(&source, &target, &file.kind, file.mode, ownership, mode)?;
        }
        Ok(())
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
        let _ = fs::remove_file(target);
        fs::copy(source, target).map_err(io_error("copy", target))?;
        std::os::unix::fs::lchown(target, Some(uid), Some(gid))
            .map_err(io_error("chown", target))?;
        let bits = apply_mode(mode, metadata.mode() & 0o7777, false);
        fs::set_permissions(target, fs::Permissions::from_mode(bits))
            .map_err(io_error("chmod", target))?;
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

/// Copies one selected context entry (never following symlinks) to `target`.
fn copy_entry(
    source: &Path,
    target: &Path,
    kind: &FileKind,
    source_mode: u32,
    ownership: Option<(u32, u32)>,
    mode: Option<&ModeChange>,
) -> Result<(), SolveError> {
    let (uid, gid) = ownership.unwrap_or((0, 0));
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(io_error("create", parent))?;
    }
    match kind {
        FileKind::Directory => {
            if !target.is_dir() {
                fs::create_dir(target).map_err(io_error("create", target))?;
            }
            fs::set_permissions(
                target,
                fs::Permissions::from_mode(apply_mode(mode, source_mode, true)),
            )
            .map_err(io_error("chmod", target))?;
        }
        FileKind::Symlink { target: link } => {
            let _ = fs::remove_file(target);
            std::os::unix::fs::symlink(link, target).map_err(io_error("symlink", target))?;
        }
        FileKind::File => {
            let _ = fs::remove_file(target);
            fs::copy(source, target).map_err(io_error("copy", source))?;
            fs::set_permissions(
                target,
                fs::Permissions::from_mode(apply_mode(mode, source_mode, false)),
            )
            .map_err(io_error("chmod", target))?;
        }
        // Pipes, sockets and devices in a context are not copied (BuildKit skips sockets too).
        _ => return Ok(()),
    }
    std::os::unix::fs::lchown(target, Some(uid), Some(gid)).map_err(io_error("chown", target))?;
    if !matches!(kind, FileKind::Symlink { .. }) {
        let modified = fs::symlink_metadata(source)
            .and_then(|metadata| metadata.modified())
            .map_err(io_error("stat", source))?;
        fs::File::open(target)
            .and_then(|file| file.set_times(fs::FileTimes::new().set_modified(modified)))
            .map_err(io_error("set times", target))?;
    }
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
