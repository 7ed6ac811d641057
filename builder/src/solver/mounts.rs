//! `RUN --mount`: what each mount reads, for the step's cache key, and what it mounts in the
//! sandbox, as BuildKit does it (Dockerfile reference, "RUN --mount").
//!
//! - `bind` (the default type): a path of the context, of a stage or of an image; read-only
//!   unless `rw`, and then the writes are discarded. The key holds the content checksum of
//!   the context files it selects (`.dockerignore` applies, as BuildKit mounts the filtered
//!   context), or the stage's key or the image's digest.
//! - `cache`: a directory of the store kept across builds (`ROOT/v1/cache-mounts/<sha256 of
//!   id>`), never in the key nor in the layer; `sharing` is kept with flock on a lock file
//!   beside it: `shared` users hold it shared, `locked` ones exclusively (waiting), and a
//!   `private` one takes it exclusively if it can, or else gets a fresh directory of its own.
//! - `tmpfs`; `secret` (from `rbuild build --secret`, never in the key, the layer, the
//!   history or the progress output); `ssh` is not supported.
//!
//! Mount points the sandbox has to create in the root are removed again by the executor
//! before the layer is committed, as BuildKit does.

use std::fs::File;
use std::os::unix::fs::DirBuilderExt;

use rbuild_cache::context::SelectedFile;
use rbuild_frontend::instructions::{CacheSharing, Mount as MountOptions, MountType};

use super::*;
use crate::commands::image::chain_text;
use crate::options::SecretSource;

/// What a RUN's mounts read, for its cache key and its miss reasons.
#[derive(Default)]
pub(super) struct MountInputs {
    /// Keys of the stages and digests of the images mounted (or seeding cache mounts).
    pub(super) keys: Vec<Digest>,
    /// The checksum of the context files bind-mounted.
    pub(super) checksum: Option<String>,
    /// Those files: path → mode and content hash.
    pub(super) files: BTreeMap<String, String>,
    /// (stage or image name, key) of what is mounted from stages and images.
    pub(super) inputs: Vec<(String, String)>,
    /// Per mount, in `RunOp::mounts` order: the context files a bind mount selects.
    selections: Vec<Option<Selection>>,
}

/// The mounts of one run, and what they hold until it ends: cache-mount locks, and the
/// directories to remove afterwards.
#[derive(Default)]
pub(super) struct Mounted {
    /// For the sandbox.
    pub(super) mounts: Vec<Mount>,
    /// `KEY=VALUE` for secrets exposed as environment variables.
    pub(super) env: Vec<String>,
    /// Held (flock) while the process runs.
    locks: Vec<File>,
    /// Removed when the run is over (secret files, fresh private cache directories).
    remove: Vec<PathBuf>,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        for path in &self.remove {
            let _ = fs::remove_dir_all(path);
        }
    }
}

impl Solver {
    /// What the mounts of `run` read. Fails for mount types rbuild does not support.
    pub(super) fn mount_inputs(&self, step: &Step, run: &RunOp) -> Result<MountInputs, SolveError> {
        let mut inputs = MountInputs::default();
        let mut checksums = Vec::new();
        for mount_op in &run.mounts {
            let mount = &mount_op.mount;
            let mut selection = None;
            match (mount.mount_type, &mount_op.input) {
                (MountType::Ssh, _) => {
                    return Err(self.step_error(
                        step,
                        "--mount=type=ssh is not supported (rbuild forwards no SSH agent)",
                    ));
                }
                (MountType::Bind, Some(Input::Context)) => {
                    let source = context_source(mount);
                    let found = rbuild_cache::context::select(
                        &self.context,
                        std::slice::from_ref(&source),
                        &[],
                        &self.filter,
                        &self.stat_cache,
                    )
                    .map_err(|error| {
                        self.step_error(
                            step,
                            format!("--mount source={source}: {}", chain_text(&error)),
                        )
                    })?;
                    if found.roots.len() != 1 {
                        return Err(self.step_error(
                            step,
                            format!("--mount source={source} matches more than one path"),
                        ));
                    }
                    for file in &found.files {
                        inputs
                            .files
                            .insert(file.path.clone(), file_fingerprint(file));
                    }
                    checksums.push(format!(
                        "{} {}",
                        mount.target.as_deref().unwrap_or_default(),
                        found.digest
                    ));
                    selection = Some(found);
                }
                (MountType::Bind | MountType::Cache, Some(input)) => {
                    let (name, key) = self.mounted_input(step, input)?;
                    inputs.inputs.push((name, key.to_string()));
                    inputs.keys.push(key);
                }
                _ => {}
            }
            inputs.selections.push(selection);
        }
        if !checksums.is_empty() {
            inputs.checksum = Some(Digest::of(checksums.join("\n").as_bytes()).to_string());
        }
        Ok(inputs)
    }

    /// The name and key of a stage or image a mount reads.
    fn mounted_input(&self, step: &Step, input: &Input) -> Result<(String, Digest), SolveError> {
        match input {
            Input::Stage(index) => Ok((
                self.stage_names
                    .get(index)
                    .cloned()
                    .unwrap_or_else(|| format!("stage {index}")),
                self.result_of(*index).fs_key,
            )),
            Input::Image(reference) => {
                let image = self.input_image(step, reference)?;
                Ok((reference.clone(), image.target.digest.clone()))
            }
            Input::Context => Ok(("context".to_string(), Digest::of(b"context"))),
        }
    }

    /// The snapshot directories (topmost first) of a stage or image a mount reads.
    fn mounted_layers(&self, step: &Step, input: &Input) -> Result<Vec<PathBuf>, SolveError> {
        match input {
            Input::Stage(index) => self.snapshot_directories(&self.result_of(*index).layers),
            Input::Image(reference) => {
                let image = self.input_image(step, reference)?;
                self.image_directories(&image)
            }
            Input::Context => Ok(vec![self.context.clone()]),
        }
    }

    /// The sandbox mounts of `run`, in `scratch` (removed by the caller after the run).
    pub(super) fn prepare_mounts(
        &self,
        step: &Step,
        run: &RunOp,
        inputs: &MountInputs,
        scratch: &Path,
    ) -> Result<Mounted, SolveError> {
        let mut mounted = Mounted::default();
        for (index, mount_op) in run.mounts.iter().enumerate() {
            let mount = &mount_op.mount;
            let destination = mount.target.clone().unwrap_or_default();
            let directory = scratch.join(format!("mount-{index}"));
            let create = |path: &Path| fs::create_dir_all(path).map_err(io_error("create", path));
            match mount.mount_type {
                MountType::Bind => match &mount_op.input {
                    None | Some(Input::Context) => {
                        let selection = inputs.selections[index]
                            .as_ref()
                            .expect("mount_inputs selects the context files of a bind mount");
                        let root = &selection.roots[0];
                        let context = fs::canonicalize(&self.context)
                            .map_err(io_error("resolve", &self.context))?;
                        let overlay_safe = !context
                            .as_os_str()
                            .as_encoded_bytes()
                            .iter()
                            .any(|byte| matches!(byte, b':' | b',' | b'\\'));
                        if self.filter.0.is_none() && overlay_safe {
                            // Nothing is hidden: an overlay of the context itself, so `rw`
                            // writes never reach it.
                            let (upper, work) = (directory.join("upper"), directory.join("work"));
                            create(&upper)?;
                            create(&work)?;
                            mounted.mounts.push(Mount::Overlay {
                                lower: vec![context],
                                upper,
                                work,
                                source: root.path.clone(),
                                destination,
                                readonly: mount.read_only,
                            });
                        } else {
                            // Only what `.dockerignore` lets through: a copy of the selection.
                            let source = directory.join("source");
                            create(&directory)?;
                            materialize(&self.context, selection, &source)?;
                            mounted.mounts.push(Mount::Bind {
                                source,
                                destination,
                                readonly: mount.read_only,
                            });
                        }
                    }
                    Some(input) => {
                        let lower = self.mounted_layers(step, input)?;
                        let source = mount.source.clone().unwrap_or_else(|| "/".to_string());
                        if LayerView::new(lower.clone())
                            .lookup(&source, true)
                            .is_none()
                        {
                            let (name, _) = self.mounted_input(step, input)?;
                            return Err(self.step_error(
                                step,
                                format!("--mount from={name}: source {source} not found"),
                            ));
                        }
                        let (upper, work) = (directory.join("upper"), directory.join("work"));
                        create(&upper)?;
                        create(&work)?;
                        mounted.mounts.push(Mount::Overlay {
                            lower,
                            upper,
                            work,
                            source,
                            destination,
                            readonly: mount.read_only,
                        });
                    }
                },
                MountType::Cache => {
                    let source = self.cache_directory(
                        step,
                        mount,
                        mount_op.input.as_ref(),
                        &directory,
                        &mut mounted,
                    )?;
                    mounted.mounts.push(Mount::Bind {
                        source,
                        destination,
                        readonly: mount.read_only,
                    });
                }
                MountType::Tmpfs => mounted.mounts.push(Mount::Tmpfs {
                    destination,
                    size: mount.size,
                }),
                MountType::Secret => self.secret(step, mount, &mut mounted)?,
                MountType::Ssh => {
                    return Err(self.step_error(step, "--mount=type=ssh is not supported"));
                }
            }
        }
        // Parents before what is mounted inside them, else in the order written.
        mounted.mounts.sort_by_key(|mount| match mount {
            Mount::Bind { destination, .. }
            | Mount::Overlay { destination, .. }
            | Mount::Tmpfs { destination, .. } => destination
                .split('/')
                .filter(|part| !part.is_empty())
                .count(),
        });
        Ok(mounted)
    }

    /// The directory of a cache mount, created (seeded from `from`, with its mode and owner)
    /// on first use, and locked as its `sharing` says for as long as `mounted` lives.
    fn cache_directory(
        &self,
        step: &Step,
        mount: &MountOptions,
        input: Option<&Input>,
        fresh: &Path,
        mounted: &mut Mounted,
    ) -> Result<PathBuf, SolveError> {
        let id = mount.id.clone().unwrap_or_default();
        let base = rbuild_cache::gc::cache_mounts_directory(&self.store);
        fs::create_dir_all(&base).map_err(io_error("create", &base))?;
        let name = Digest::of(id.as_bytes()).hex().to_string();
        let directory = base.join(&name);
        let lock_path = base.join(format!("{name}.lock"));
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error("open", &lock_path))?;
        let exclusive = match mount.sharing {
            CacheSharing::Shared => false,
            CacheSharing::Locked => {
                lock.lock().map_err(io_error("lock", &lock_path))?;
                true
            }
            CacheSharing::Private => match lock.try_lock() {
                Ok(()) => true,
                Err(fs::TryLockError::WouldBlock) => {
                    // In use: this run gets a directory of its own, dropped afterwards.
                    self.create_cache_directory(step, mount, input, fresh, fresh)?;
                    return Ok(fresh.to_path_buf());
                }
                Err(fs::TryLockError::Error(error)) => {
                    return Err(io_error("lock", &lock_path)(error));
                }
            },
        };
        if !directory.exists() {
            // Created under the exclusive lock, so two first users cannot both create it.
            if !exclusive {
                lock.lock().map_err(io_error("lock", &lock_path))?;
            }
            if !directory.exists() {
                let temporary = base.join(format!(".new-{name}-{}", std::process::id()));
                let _ = fs::remove_dir_all(&temporary);
                self.create_cache_directory(step, mount, input, &temporary, &directory)?;
            }
        }
        if !exclusive {
            lock.lock_shared().map_err(io_error("lock", &lock_path))?;
        }
        mounted.locks.push(lock);
        Ok(directory)
    }

    /// Makes `temporary` with the cache mount's mode and owner, seeded from its `from` and
    /// `source`, and renames it to `directory` (when they differ).
    fn create_cache_directory(
        &self,
        step: &Step,
        mount: &MountOptions,
        input: Option<&Input>,
        temporary: &Path,
        directory: &Path,
    ) -> Result<(), SolveError> {
        if let Some(parent) = temporary.parent() {
            fs::create_dir_all(parent).map_err(io_error("create", parent))?;
        }
        match input {
            Some(input @ (Input::Stage(_) | Input::Image(_))) => {
                let view = LayerView::new(self.mounted_layers(step, input)?);
                let source = mount.source.clone().unwrap_or_else(|| "/".to_string());
                let found = view
                    .lookup(&source, true)
                    .filter(|entry| entry.metadata.is_dir());
                if found.is_none() {
                    let (name, _) = self.mounted_input(step, input)?;
                    return Err(self.step_error(
                        step,
                        format!("--mount from={name}: source {source} is not a directory there"),
                    ));
                }
                copy_view_directory(&view, &view.resolve(&source), temporary)?;
            }
            _ => fs::create_dir(temporary).map_err(io_error("create", temporary))?,
        }
        fs::set_permissions(
            temporary,
            fs::Permissions::from_mode(mount.mode.unwrap_or(0o755)),
        )
        .map_err(io_error("chmod", temporary))?;
        std::os::unix::fs::lchown(temporary, mount.uid.or(Some(0)), mount.gid.or(Some(0)))
            .map_err(io_error("chown", temporary))?;
        if temporary != directory {
            fs::rename(temporary, directory).map_err(io_error("rename", temporary))?;
        }
        Ok(())
    }

    /// A secret mount: the value of `--secret id=ID` as a read-only file at the target and/or
    /// an environment variable; skipped when not given unless `required`.
    fn secret(
        &self,
        step: &Step,
        mount: &MountOptions,
        mounted: &mut Mounted,
    ) -> Result<(), SolveError> {
        let id = mount.id.clone().unwrap_or_default();
        let given = self
            .options
            .secrets
            .iter()
            .rev()
            .find(|secret| secret.id == id);
        let value: Option<Vec<u8>> = match given.map(|secret| &secret.source) {
            Some(SecretSource::File(path)) => Some(fs::read(path).map_err(|error| {
                self.step_error(
                    step,
                    format!("secret {id}: cannot read {}: {error}", path.display()),
                )
            })?),
            Some(SecretSource::Environment(name)) => {
                std::env::var_os(name).map(std::os::unix::ffi::OsStringExt::into_vec)
            }
            None => None,
        };
        let Some(value) = value else {
            if mount.required {
                return Err(self.step_error(
                    step,
                    format!(
                        "secret {id} is required but was not given (rbuild build --secret id={id},src=PATH)"
                    ),
                ));
            }
            return Ok(());
        };
        if let Some(name) = &mount.env {
            let text = String::from_utf8(value.clone()).map_err(|_| {
                self.step_error(
                    step,
                    format!("secret {id} is not UTF-8 text and cannot be the variable {name}"),
                )
            })?;
            mounted.env.push(format!("{name}={text}"));
        }
        if let Some(target) = &mount.target {
            // On a tmpfs when the host has one (`/run`), as BuildKit keeps secrets off disk.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.subsec_nanos())
                .unwrap_or_default();
            let directory = sandbox::default_scratch_dir().join(format!(
                "rbuild-secret-{}-{nanos:09}-{}",
                std::process::id(),
                mounted.remove.len()
            ));
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&directory)
                .map_err(io_error("create", &directory))?;
            mounted.remove.push(directory.clone());
            let file = directory.join("secret");
            fs::write(&file, &value).map_err(io_error("write", &file))?;
            fs::set_permissions(
                &file,
                fs::Permissions::from_mode(mount.mode.unwrap_or(0o400)),
            )
            .map_err(io_error("chmod", &file))?;
            std::os::unix::fs::lchown(&file, mount.uid.or(Some(0)), mount.gid.or(Some(0)))
                .map_err(io_error("chown", &file))?;
            mounted.mounts.push(Mount::Bind {
                source: file,
                destination: target.clone(),
                readonly: true,
            });
        }
        Ok(())
    }
}

/// A bind mount's `source` in the context: relative to its root, `.` for all of it.
fn context_source(mount: &MountOptions) -> String {
    let source = mount
        .source
        .as_deref()
        .unwrap_or("")
        .trim_start_matches('/');
    if source.is_empty() {
        ".".to_string()
    } else {
        source.to_string()
    }
}

/// What a miss reason compares for a context file: mode and content hash (or link target).
fn file_fingerprint(file: &SelectedFile) -> String {
    let content = match &file.kind {
        FileKind::File => file
            .hash
            .map(|hash| hash.iter().map(|byte| format!("{byte:02x}")).collect())
            .unwrap_or_default(),
        FileKind::Symlink { target } => format!("-> {target}"),
        other => format!("{other:?}"),
    };
    format!("{:o} {content}", file.mode)
}

/// Copies what `selection` (one root) selects from `context` to `target`: the root itself
/// when it is a file, its tree when it is a directory. Owners and modes are kept.
fn materialize(context: &Path, selection: &Selection, target: &Path) -> Result<(), SolveError> {
    for file in &selection.files {
        let path = if file.relative.is_empty() {
            target.to_path_buf()
        } else {
            target.join(&file.relative)
        };
        let source = context.join(&file.path);
        match &file.kind {
            FileKind::Directory => fs::create_dir_all(&path).map_err(io_error("create", &path))?,
            FileKind::File => {
                fs::copy(&source, &path).map_err(io_error("copy", &source))?;
            }
            FileKind::Symlink { target: link } => {
                std::os::unix::fs::symlink(link, &path).map_err(io_error("symlink", &path))?;
            }
            // Pipes, sockets and devices of a context are left out, as COPY leaves them.
            _ => continue,
        }
        // Owner first: chown clears the setuid and setgid bits.
        std::os::unix::fs::lchown(&path, Some(file.uid), Some(file.gid))
            .map_err(io_error("chown", &path))?;
        if !matches!(file.kind, FileKind::Symlink { .. }) {
            fs::set_permissions(&path, fs::Permissions::from_mode(file.mode))
                .map_err(io_error("chmod", &path))?;
        }
    }
    Ok(())
}

/// Copies the directory `path` (free of symbolic links) of a view, merged across its layers,
/// to a new directory `target`, keeping modes and owners.
fn copy_view_directory(view: &LayerView, path: &str, target: &Path) -> Result<(), SolveError> {
    fs::create_dir(target).map_err(io_error("create", target))?;
    for name in view.read_dir(path) {
        let child = format!("{}/{name}", path.trim_end_matches('/'));
        let Some(entry) = view.lookup(&child, false) else {
            continue;
        };
        let destination = target.join(&name);
        let file_type = entry.metadata.file_type();
        if file_type.is_dir() {
            copy_view_directory(view, &child, &destination)?;
        } else if file_type.is_symlink() {
            let link = fs::read_link(&entry.real).map_err(io_error("read link", &entry.real))?;
            std::os::unix::fs::symlink(link, &destination)
                .map_err(io_error("symlink", &destination))?;
        } else if file_type.is_file() {
            fs::copy(&entry.real, &destination).map_err(io_error("copy", &entry.real))?;
        } else {
            continue;
        }
        // Owner first: chown clears the setuid and setgid bits.
        std::os::unix::fs::lchown(
            &destination,
            Some(entry.metadata.uid()),
            Some(entry.metadata.gid()),
        )
        .map_err(io_error("chown", &destination))?;
        if !file_type.is_symlink() {
            fs::set_permissions(
                &destination,
                fs::Permissions::from_mode(entry.metadata.mode() & 0o7777),
            )
            .map_err(io_error("chmod", &destination))?;
        }
    }
    Ok(())
}
