//! Build outputs (`rbuild build -o`), written after the solve has put the image into the store,
//! as BuildKit's exporters write them (docs.docker.com/build/exporters):
//!
//! - `oci`: an OCI image layout tar ([`archive::save`]), which also carries Docker's
//!   `manifest.json`; the image is named by `name=`, else by the `-t` tags.
//! - `docker`: the same archive, read by `docker load` through its `manifest.json` (Docker 25+
//!   writes this very layout with `docker save`), with every name in one entry's `RepoTags`.
//! - `local`: the final filesystem of the target stage, copied into a directory.
//! - `tar`: the final filesystem as one deterministic tar stream.
//! - `image`: a name in the local image store, pushed to its registry with `push=true`.
//!
//! The final filesystem is materialized once per build in a scratch directory under the
//! store's `containers/` (which `rbuild prune` clears): the layers are applied in order with
//! [`apply_layer`] in flat mode, so whiteouts delete, each blob verified against its digest and
//! its diff id. `tar` writes that tree with [`write_layer_tar`] (sorted, mtimes clamped to
//! `SOURCE_DATE_EPOCH`); `local` pipes the same tar into [`apply_layer`] on the destination, so
//! files already there are overwritten (as BuildKit's local exporter does) and a symlink
//! already in the destination can never redirect a write outside it.
//!
//! Files are written to a temp file beside the destination, fsynced and renamed, so a failed
//! build or export never leaves a half-written file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rbuild_cache::apply::{ApplyError, ApplyOptions, WhiteoutMode, apply_layer};
use rbuild_cache::archive::{self, ArchiveError, SaveItem};
use rbuild_cache::content::ContentError;
use rbuild_cache::layer::{LayerError, LayerOptions, LayerSource, write_layer_tar};
use rbuild_cache::snapshot::{self, SnapshotError};
use rbuild_cache::{Image, Reference, Store, StoreError, Target};

use crate::options::Output;

/// Size of the buffers in front of files and pipes.
const BUFFER_SIZE: usize = 1 << 20;

/// What can go wrong exporting a build result.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A content store failure.
    #[error(transparent)]
    Content(#[from] ContentError),
    /// Writing the image archive failed.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// A layer could not be applied (or did not match its digest or diff id).
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The filesystem could not be written as a tar.
    #[error("writing the filesystem as a tar")]
    Tar {
        /// The cause.
        #[source]
        source: LayerError,
    },
    /// The filesystem could not be written into the destination directory.
    #[error("writing the filesystem into {path}")]
    Local {
        /// The destination.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ApplyError,
    },
    /// An image name that does not parse (names are checked with the options, so this is a
    /// guard).
    #[error("invalid image name {name}")]
    Name {
        /// The name.
        name: String,
        /// The cause.
        #[source]
        source: rbuild_cache::reference::ReferenceError,
    },
    /// Layers the store lacked could not be fetched from their registry.
    #[error("fetching the image's layers")]
    Fetch {
        /// The cause.
        #[source]
        source: Box<crate::registry::RegistryError>,
    },
    /// Pushing to the registry failed.
    #[error("pushing {name}")]
    Push {
        /// The image name.
        name: String,
        /// The cause.
        #[source]
        source: Box<crate::registry::RegistryError>,
    },
    /// A filesystem operation failed.
    #[error("{action} {path}")]
    Io {
        /// What rbuild was doing.
        action: &'static str,
        /// The path (or `standard output`).
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ExportError + use<> {
    let path = path.to_path_buf();
    move |source| ExportError::Io {
        action,
        path,
        source,
    }
}

fn parse_name(name: &str) -> Result<Reference, ExportError> {
    Reference::parse(name).map_err(|source| ExportError::Name {
        name: name.to_string(),
        source,
    })
}

/// Checks the outputs against the world before anything is built: what a spec alone cannot
/// say (stdout is a terminal, a file destination is a directory, a push). Returns the problem
/// as a usage message.
pub fn check(outputs: &[Output]) -> Result<(), String> {
    let to_stdout: Vec<&Output> = outputs.iter().filter(|output| output.to_stdout()).collect();
    if to_stdout.len() > 1 {
        return Err("only one --output may write to standard output (dest=-)".to_string());
    }
    if let Some(output) = to_stdout.first()
        && io::stdout().is_terminal()
    {
        return Err(format!(
            "--output type={}: refusing to write a tar to a terminal; give dest=FILE or redirect standard output",
            output.kind()
        ));
    }
    for output in outputs {
        match output {
            Output::Local { dest } => {
                if dest.exists() && !dest.is_dir() {
                    return Err(format!(
                        "--output type=local: dest {} exists and is not a directory",
                        dest.display()
                    ));
                }
            }
            Output::Oci { dest, .. } | Output::Docker { dest, .. } | Output::Tar { dest } => {
                if !output.to_stdout() && dest.is_dir() {
                    return Err(format!(
                        "--output type={}: dest {} is a directory; give a file name",
                        output.kind(),
                        dest.display()
                    ));
                }
            }
            Output::Image { .. } => {}
        }
    }
    Ok(())
}

/// Writes the outputs of one build; the final filesystem is materialized at most once.
pub struct Exporter<'a> {
    store: &'a Store,
    image: Image,
    tags: &'a [Reference],
    source_date_epoch: Option<i64>,
    filesystem: Option<ScratchTree>,
}

impl<'a> Exporter<'a> {
    /// An exporter of the image `target` (in `store`), built with the `-t` names `tags`.
    pub fn new(
        store: &'a Store,
        target: &Target,
        tags: &'a [Reference],
        source_date_epoch: Option<i64>,
    ) -> Result<Self, ExportError> {
        Ok(Self {
            store,
            image: store.image(target)?,
            tags,
            source_date_epoch,
            filesystem: None,
        })
    }

    /// Writes one output.
    pub fn export(&mut self, output: &Output) -> Result<(), ExportError> {
        // Every output but the image store's and a push reads the layers' bytes: fetch what
        // the store only names (a lazily pulled base, a layer of an imported cache).
        if !matches!(output, Output::Image { .. }) {
            crate::registry::fetch_layers(self.store, &self.image).map_err(|source| {
                ExportError::Fetch {
                    source: Box::new(source),
                }
            })?;
        }
        match output {
            Output::Oci { dest, name } | Output::Docker { dest, name } => {
                let items = self.save_items(name.as_deref())?;
                write_destination(dest, |out| {
                    archive::save(self.store, &items, out)?;
                    Ok(())
                })
            }
            Output::Tar { dest } => {
                let tree = self.filesystem()?.to_path_buf();
                let options = self.layer_options();
                write_destination(dest, |out| {
                    write_layer_tar(&tree, &options, out)
                        .map_err(|source| ExportError::Tar { source })?;
                    Ok(())
                })
            }
            Output::Local { dest } => {
                let tree = self.filesystem()?.to_path_buf();
                let options = self.layer_options();
                copy_tree(&tree, &options, dest)
            }
            Output::Image { name, push } => {
                let reference = parse_name(name)?;
                self.store.set_tag(&reference, &self.image.target)?;
                if *push {
                    crate::registry::push(self.store, &self.image, &reference).map_err(
                        |source| ExportError::Push {
                            name: name.clone(),
                            source: Box::new(source),
                        },
                    )?;
                }
                Ok(())
            }
        }
    }

    /// The names an archive records: `name=`, else every `-t` tag, else none.
    fn save_items(&self, name: Option<&str>) -> Result<Vec<SaveItem>, ExportError> {
        let references: Vec<Option<Reference>> = match name {
            Some(name) => vec![Some(parse_name(name)?)],
            None if self.tags.is_empty() => vec![None],
            None => self.tags.iter().cloned().map(Some).collect(),
        };
        Ok(references
            .into_iter()
            .map(|reference| SaveItem {
                reference,
                image: self.image.clone(),
            })
            .collect())
    }

    fn layer_options(&self) -> LayerOptions {
        LayerOptions {
            source_date_epoch: self.source_date_epoch,
            source: LayerSource::Directory,
            ..LayerOptions::default()
        }
    }

    /// The final filesystem, materialized on first use.
    fn filesystem(&mut self) -> Result<&Path, ExportError> {
        if self.filesystem.is_none() {
            self.filesystem = Some(materialize(self.store, &self.image)?);
        }
        Ok(self.filesystem.as_ref().expect("materialized above").tree())
    }
}

/// A scratch directory under the store's `containers/`, removed when dropped.
struct ScratchTree {
    directory: PathBuf,
    /// `directory/rootfs`: the tree itself.
    tree: PathBuf,
}

impl ScratchTree {
    fn create(store: &Store) -> Result<Self, ExportError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let containers = store.containers_directory();
        fs::create_dir_all(&containers).map_err(io_error("create", &containers))?;
        let directory = containers.join(format!(
            "export-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&directory).map_err(io_error("create", &directory))?;
        let scratch = Self {
            tree: directory.join("rootfs"),
            directory,
        };
        fs::create_dir(&scratch.tree).map_err(io_error("create", &scratch.tree))?;
        Ok(scratch)
    }

    fn tree(&self) -> &Path {
        &self.tree
    }
}

impl Drop for ScratchTree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.directory);
    }
}

/// Applies the image's layers, base first, to a fresh scratch tree: whiteouts delete, owners
/// and modes are the image's (we are root), and each blob is checked against its digest and
/// its diff id while it streams.
fn materialize(store: &Store, image: &Image) -> Result<ScratchTree, ExportError> {
    let scratch = ScratchTree::create(store)?;
    for (layer, diff_id) in snapshot::layers_with_diff_ids(image)? {
        snapshot::apply_verified(store, &layer, &diff_id, scratch.tree(), WhiteoutMode::Apply)?;
    }
    Ok(scratch)
}

/// Writes `tree` into `dest` (created if missing): the tree's tar is piped into
/// [`apply_layer`], which resolves every path inside `dest` and replaces what is there.
fn copy_tree(tree: &Path, options: &LayerOptions, dest: &Path) -> Result<(), ExportError> {
    fs::create_dir_all(dest).map_err(io_error("create", dest))?;
    let (reader, writer) = io::pipe().map_err(io_error("create a pipe for", dest))?;
    std::thread::scope(|scope| {
        let writing = scope.spawn(move || write_layer_tar(tree, options, writer));
        let applied = apply_layer(reader, dest, &ApplyOptions::new(WhiteoutMode::Apply));
        let written = writing.join().expect("the tar writer does not panic");
        match (written, applied) {
            (Ok(_), Ok(_)) => Ok(()),
            // The writer's own failure explains a truncated tar better than the reader can;
            // a broken pipe only means the reader stopped first.
            (Err(source), _) if !is_broken_pipe(&source) => Err(ExportError::Tar { source }),
            (_, Err(source)) => Err(ExportError::Local {
                path: dest.to_path_buf(),
                source,
            }),
            (Err(source), Ok(_)) => Err(ExportError::Tar { source }),
        }
    })
}

fn is_broken_pipe(error: &LayerError) -> bool {
    matches!(error, LayerError::Write { source } if source.kind() == io::ErrorKind::BrokenPipe)
}

/// Runs `write` into `dest`: standard output for `-`, else a temp file beside `dest` that is
/// fsynced and renamed over it only when everything was written.
fn write_destination(
    dest: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<(), ExportError>,
) -> Result<(), ExportError> {
    if dest == Path::new("-") {
        let stdout = Path::new("standard output");
        let mut out = BufWriter::with_capacity(BUFFER_SIZE, io::stdout().lock());
        write(&mut out)?;
        return out.flush().map_err(io_error("write", stdout));
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let parent = dest
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .ok_or_else(|| ExportError::Io {
            action: "write",
            path: dest.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
        })?
        .to_string_lossy();
    fs::create_dir_all(parent).map_err(io_error("create", parent))?;
    let mut temp = TempFile {
        path: parent.join(format!(
            ".{name}.{}-{}.partial",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        )),
        renamed: false,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp.path)
        .map_err(io_error("create", &temp.path))?;
    let mut out = BufWriter::with_capacity(BUFFER_SIZE, file);
    write(&mut out)?;
    let file: File = out
        .into_inner()
        .map_err(|error| io_error("write", &temp.path)(error.into_error()))?;
    file.sync_all().map_err(io_error("fsync", &temp.path))?;
    fs::rename(&temp.path, dest).map_err(io_error("rename", dest))?;
    temp.renamed = true;
    rbuild_cache::content::sync_directory(parent)?;
    Ok(())
}

/// A temp file removed when dropped, unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    renamed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = fs::remove_file(&self.path);
        }
    }
}
