//! COPY and ADD: what a copy reads (for its key) and the copy itself.

use super::*;

/// What a COPY reads, for its cache key.
#[derive(Default)]
pub(super) struct CopyInputs {
    /// Keys of the stage or image it copies from.
    pub(super) stages: Vec<Digest>,
    /// The checksum of the context files it selects.
    pub(super) checksum: Option<String>,
    /// Those files: path → mode and content hash.
    pub(super) files: BTreeMap<String, String>,
    /// The selection itself, which the copy then follows (the context is walked once).
    pub(super) selection: Option<Selection>,
}

impl Solver {
    /// The stage keys and content checksum a COPY reads.
    pub(super) fn copy_inputs(&self, step: &Step, copy: &CopyOp) -> Result<CopyInputs, SolveError> {
        if copy.is_add && copy.sources.iter().any(|source| source.contains("://")) {
            return Err(self.step_error(step, "ADD of URLs is not supported yet"));
        }
        if copy.options.parents {
            return Err(self.step_error(step, "COPY --parents is not supported yet"));
        }
        match &copy.input {
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
                let selection = rbuild_cache::context::select(
                    &self.context,
                    &copy.sources,
                    &copy.options.exclude,
                    &self.filter,
                    &self.stat_cache,
                )
                .map_err(|error| {
                    self.step_error(step, crate::commands::image::chain_text(&error))
                })?;
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
                    selection: Some(selection),
                    ..CopyInputs::default()
                })
            }
            Input::Stage(index) => {
                let built = self.result_of(*index);
                Ok(CopyInputs {
                    stages: vec![built.fs_key.clone()],
                    ..CopyInputs::default()
                })
            }
            Input::Image(reference) => {
                let images = crate::resolver::StoreImages::new(Some(&self.store));
                let image = images.lookup(reference).ok_or_else(|| {
                    self.step_error(step, format!("image {reference} is not in the store"))
                })?;
                Ok(CopyInputs {
                    stages: vec![image.target.digest.clone()],
                    ..CopyInputs::default()
                })
            }
        }
    }

    pub(super) fn copy(
        &self,
        step: &Step,
        copy: &CopyOp,
        selection: Option<&Selection>,
        layers: &[LayerRecord],
    ) -> Result<Option<LayerRecord>, SolveError> {
        let scratch = self.scratch_directory("copy")?;
        let tree = scratch.join("tree");
        fs::create_dir_all(&tree).map_err(io_error("create", &tree))?;
        let result = self
            .copy_into(step, copy, selection, layers, &tree)
            .and_then(|()| self.layer_from(&tree, LayerSource::Directory));
        let _ = fs::remove_dir_all(&scratch);
        result
    }

    fn copy_into(
        &self,
        step: &Step,
        copy: &CopyOp,
        selection: Option<&Selection>,
        layers: &[LayerRecord],
        tree: &Path,
    ) -> Result<(), SolveError> {
        let ownership = match &copy.options.chown {
            Some(chown) => Some(self.resolve_owner(step, chown, layers)?),
            None => None,
        };
        let mode = match &copy.options.chmod {
            Some(chmod) => Some(u32::from_str_radix(chmod, 8).map_err(|_| self.step_error(step, format!("--chmod={chmod} is not an octal mode (symbolic modes are not supported yet)")))?),
            None => None,
        };
        // (source path on disk, path in the destination tree relative to the root)
        let mut items: Vec<(PathBuf, String)> = Vec::new();
        let destination = copy.destination.clone();
        let destination_is_directory = destination.ends_with('/');
        let existing_view = self.view(layers)?;
        let destination_exists_as_directory = existing_view
            .lookup(&destination, true)
            .is_some_and(|entry| entry.metadata.is_dir());
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
                    let selection =
                        selection.expect("copy_inputs selects the context files of a COPY");
                    let multiple = selection.roots.len() > 1;
                    if selection.roots.len() > 1
                        && !destination_is_directory
                        && !destination_exists_as_directory
                    {
                        return Err(self.step_error(step, "when using COPY with more than one source file, the destination must be a directory and end with a /"));
                    }
                    let into_directory =
                        destination_is_directory || destination_exists_as_directory || multiple;
                    let base = destination
                        .trim_start_matches('/')
                        .trim_end_matches('/')
                        .to_string();
                    // Only the selected files: what .dockerignore and --exclude hide is never copied.
                    for file in &selection.files {
                        let root = &selection.roots[file.root];
                        let relative = if root.is_directory {
                            if file.relative.is_empty() {
                                base.clone()
                            } else {
                                format!("{base}/{}", file.relative)
                            }
                        } else if into_directory {
                            let name = root.matched.rsplit('/').next().unwrap_or(&root.matched);
                            format!("{base}/{name}")
                        } else {
                            base.clone()
                        };
                        let source = self.context.join(&file.path);
                        let target = tree.join(relative.trim_start_matches('/'));
                        copy_entry(&source, &target, &file.kind, file.mode, ownership, mode)?;
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
                for (index, source) in copy.sources.iter().enumerate() {
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
                    sources.push((staged, entry.metadata.is_dir()));
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
    mode: Option<u32>,
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
        let bits = mode.unwrap_or(metadata.mode() & 0o7777);
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
        let bits = mode.unwrap_or(metadata.mode() & 0o7777);
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
    mode: Option<u32>,
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
                fs::Permissions::from_mode(mode.unwrap_or(source_mode)),
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
                fs::Permissions::from_mode(mode.unwrap_or(source_mode)),
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
        for name in view.read_dir(&resolved_path(view, path)) {
            let child = format!("{}/{name}", resolved_path(view, path).trim_end_matches('/'));
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

/// `path` with its symlinked parents resolved (the view's read_dir needs a real path).
fn resolved_path(view: &LayerView, path: &str) -> String {
    // Walk component by component, replacing symlinks with their targets.
    let mut resolved = String::new();
    for part in path
        .split('/')
        .filter(|part| !part.is_empty() && *part != ".")
    {
        let candidate = format!("{resolved}/{part}");
        match view.lookup(&candidate, false) {
            Some(entry) if entry.metadata.file_type().is_symlink() => {
                let target = fs::read_link(&entry.real)
                    .map(|target| target.to_string_lossy().into_owned())
                    .unwrap_or_default();
                resolved = if target.starts_with('/') {
                    resolved_path(view, &target)
                } else {
                    resolved_path(view, &format!("{resolved}/{target}"))
                };
            }
            _ => resolved = candidate,
        }
    }
    if resolved.is_empty() {
        "/".to_string()
    } else {
        resolved
    }
}

fn hex_of(bytes: [u8; 32]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
