//! The solver: runs a planned build graph and produces an image in the store.
//!
//! Each stage starts as soon as the stages it needs are done, up to `jobs` at once, on scoped
//! threads; the steps of a stage run one after another. The first failure stops the build:
//! nothing new starts and running sandboxes are killed. Every step that changes the
//! filesystem has a cache key: the sha256 of its definition digest (the instruction after
//! expansion, with its env, user, workdir, shell, network), the key of the filesystem it builds
//! on, the final keys of the stages it reads, and for COPY/ADD from the context the content
//! checksum of exactly the selected files (blake3, never mtimes). A key found in the cache index
//! reuses its layer; otherwise the step runs (RUN in the sandbox, COPY by copying into a fresh
//! directory) and its layer is committed and recorded.
//!
//! Scheduling on tokio, identical steps running once, `RUN --mount`, ADD of archives and URLs,
//! and the exporters are the rest of the solver issue.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rbuild_cache::cache_index::CacheRecord;
use rbuild_cache::context::{ContextFilter, FileKind, Selection, StatCache};
use rbuild_cache::layer::{LayerOptions, LayerSource, create_layer};
use rbuild_cache::snapshot::{self, LayerView};
use rbuild_cache::{Digest, Reference, Store, Target};
use rbuild_executor::sandbox::{self, Output, RunOptions};
use rbuild_executor::spec::{DEFAULT_PATH, Mount, Network, Process, RootFs, RunSpec};
use rbuild_frontend::dockerignore::IgnoreMatcher;
use rbuild_frontend::graph::{
    Base, BuildGraph, ConfigChange, CopyOp, Input, Op, RunOp, Stage, Step,
};
use rbuild_frontend::instructions::NetworkMode;
use serde_json::{Value, json};

/// How to build.
#[derive(Clone, Debug)]
pub struct SolveOptions {
    /// Run every step; look nothing up in the cache (results are still recorded).
    pub no_cache: bool,
    /// The network of RUN steps that say `--network=default` (or nothing).
    pub default_network: Network,
    /// Clamp created times, history and layer mtimes to this (SOURCE_DATE_EPOCH).
    pub source_date_epoch: Option<i64>,
    /// Print BuildKit-like plain progress to stderr.
    pub progress: bool,
    /// How many stages may build at once.
    pub jobs: usize,
}

/// What happened to one step.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// The instruction as written.
    pub instruction: String,
    /// Its first line.
    pub line: usize,
    /// Whether its result came from the cache.
    pub cached: bool,
    /// Why it was not a cache hit (none for hits and config-only steps).
    pub miss_reason: Option<String>,
    /// Seconds it took.
    pub duration: f64,
}

/// The image a build produced.
#[derive(Clone, Debug)]
pub struct BuildResult {
    /// The manifest.
    pub image: Target,
    /// The config blob.
    pub config_digest: Digest,
    /// Every step, in the order it ran.
    pub steps: Vec<StepReport>,
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum SolveError {
    /// A step failed or could not run: the message names the Dockerfile line.
    #[error("{message}")]
    Step {
        /// `Dockerfile:LINE: INSTRUCTION: problem`.
        message: String,
    },
    /// Another stage failed first, and this one was stopped.
    #[error("cancelled because another step failed")]
    Cancelled,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] rbuild_cache::StoreError),
    /// Unpacking a layer failed.
    #[error(transparent)]
    Snapshot(#[from] rbuild_cache::snapshot::SnapshotError),
    /// The content store failed.
    #[error(transparent)]
    Content(#[from] rbuild_cache::ContentError),
    /// A filesystem operation failed.
    #[error("{action} {path}")]
    Io {
        /// What rbuild was doing.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SolveError + use<> {
    let path = path.to_path_buf();
    move |source| SolveError::Io {
        action,
        path,
        source,
    }
}

/// A layer of a stage's filesystem.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct LayerRecord {
    target: Target,
    diff_id: Digest,
}

/// A stage's state while it builds, and its result.
#[derive(Clone, Debug)]
struct Built {
    layers: Vec<LayerRecord>,
    config: Value,
    /// The cache key of the filesystem (changes only with filesystem steps).
    fs_key: Digest,
    /// Whether CMD was set in this stage (ENTRYPOINT then keeps it).
    cmd_set: bool,
    /// The stage being built.
    stage_index: usize,
}

/// Adapts `.dockerignore` to the context walker, with fsutil's walk rule (what BuildKit uses).
struct IgnoreFilter<'a>(Option<&'a IgnoreMatcher>);

impl ContextFilter for IgnoreFilter<'_> {
    fn is_excluded(&self, path: &str, is_directory: bool) -> bool {
        let _ = is_directory;
        self.0.is_some_and(|matcher| matcher.is_excluded(path))
    }

    fn can_skip_directory(&self, path: &str) -> bool {
        self.0
            .is_some_and(|matcher| matcher.can_skip_directory(path))
    }
}

/// Plain progress, BuildKit-like: `#N [stage k/n] INSTRUCTION`, output lines, `#N CACHED`,
/// `#N DONE 0.3s`.
#[derive(Clone)]
struct Progress {
    enabled: bool,
    counter: Arc<Mutex<usize>>,
}

impl Progress {
    fn start(&self, label: &str, instruction: &str) -> usize {
        let mut counter = self.counter.lock().unwrap_or_else(|e| e.into_inner());
        *counter += 1;
        if self.enabled {
            let first = instruction.lines().next().unwrap_or_default();
            eprintln!("#{} {label} {first}", *counter);
        }
        *counter
    }

    fn line(&self, id: usize, text: &str) {
        if self.enabled {
            eprintln!("#{id} {text}");
        }
    }
}

/// Runs the graph and writes the target stage's image into the store.
pub fn solve(
    store: &Store,
    graph: &BuildGraph,
    dockerfile_name: &str,
    context: &Path,
    ignore: Option<&IgnoreMatcher>,
    options: &SolveOptions,
) -> Result<BuildResult, SolveError> {
    let stat_cache = StatCache::load(&stat_cache_path(store, context));
    let solver = Solver {
        store,
        dockerfile_name,
        context,
        filter: IgnoreFilter(ignore),
        stat_cache: &stat_cache,
        options,
        progress: Progress {
            enabled: options.progress,
            counter: Arc::default(),
        },
        results: Mutex::default(),
        stage_names: graph
            .stages
            .iter()
            .map(|stage| (stage.index, stage.display_name()))
            .collect(),
        failed: AtomicBool::new(false),
        running: Mutex::default(),
    };
    let reports = solver.run_stages(graph, options.jobs.max(1))?;
    let _ = stat_cache.save();
    let target = graph.target_stage();
    let built = solver
        .results
        .lock()
        .unwrap_or_else(|error| error.into_inner())
        .remove(&target.index)
        .expect("the target stage was built");
    let (image, config_digest) = solver.write_image(built)?;
    Ok(BuildResult {
        image,
        config_digest,
        steps: reports,
    })
}

fn stat_cache_path(store: &Store, context: &Path) -> PathBuf {
    let canonical = fs::canonicalize(context).unwrap_or_else(|_| context.to_path_buf());
    let name = Digest::of(canonical.to_string_lossy().as_bytes());
    let directory = store.directory().join("context-cache");
    let _ = fs::create_dir_all(&directory);
    directory.join(format!("{}.json", name.hex()))
}

struct Solver<'a> {
    store: &'a Store,
    dockerfile_name: &'a str,
    context: &'a Path,
    filter: IgnoreFilter<'a>,
    stat_cache: &'a StatCache,
    options: &'a SolveOptions,
    progress: Progress,
    /// Results of finished stages, shared by the threads building stages.
    results: Mutex<BTreeMap<usize, Built>>,
    /// Stage index → display name, for miss reasons.
    stage_names: BTreeMap<usize, String>,
    /// Set by the first failure: nothing new starts, and running sandboxes are killed.
    failed: AtomicBool,
    /// The sandboxes running now.
    running: Mutex<Vec<sandbox::Canceller>>,
}

impl Solver<'_> {
    /// Builds every stage, each as soon as the stages it needs are done, at most `jobs` at
    /// once, on scoped threads. The first failure stops new work and kills running sandboxes;
    /// it is the error returned. Reports come back in stage order.
    fn run_stages(&self, graph: &BuildGraph, jobs: usize) -> Result<Vec<StepReport>, SolveError> {
        let needs: BTreeMap<usize, Vec<usize>> = graph
            .stages
            .iter()
            .map(|stage| (stage.index, stage_dependencies(stage)))
            .collect();
        let mut reports: BTreeMap<usize, Vec<StepReport>> = BTreeMap::new();
        let mut failure: Option<SolveError> = None;
        std::thread::scope(|scope| {
            let (sender, receiver) = std::sync::mpsc::channel();
            let mut started = std::collections::BTreeSet::new();
            let mut running = 0;
            loop {
                if failure.is_none() {
                    for stage in &graph.stages {
                        let ready = needs[&stage.index]
                            .iter()
                            .all(|need| reports.contains_key(need));
                        if running < jobs && ready && started.insert(stage.index) {
                            running += 1;
                            let sender = sender.clone();
                            scope.spawn(move || {
                                let _ = sender.send((stage.index, self.stage(stage)));
                            });
                        }
                    }
                }
                if running == 0 {
                    break;
                }
                let (index, result) = receiver.recv().expect("a stage thread always reports");
                running -= 1;
                match result {
                    Ok((built, stage_reports)) => {
                        self.results
                            .lock()
                            .unwrap_or_else(|error| error.into_inner())
                            .insert(index, built);
                        reports.insert(index, stage_reports);
                    }
                    Err(SolveError::Cancelled) => {}
                    Err(error) => {
                        if failure.is_none() {
                            self.failed.store(true, Ordering::SeqCst);
                            for canceller in self
                                .running
                                .lock()
                                .unwrap_or_else(|error| error.into_inner())
                                .iter()
                            {
                                canceller.cancel();
                            }
                            failure = Some(error);
                        }
                    }
                }
            }
        });
        match failure {
            Some(error) => Err(error),
            None => Ok(reports.into_values().flatten().collect()),
        }
    }

    /// A finished stage's result.
    fn result_of(&self, index: usize) -> Built {
        self.results
            .lock()
            .unwrap_or_else(|error| error.into_inner())
            .get(&index)
            .cloned()
            .expect("stages run after the stages they need")
    }

    fn step_error(&self, step: &Step, problem: impl std::fmt::Display) -> SolveError {
        SolveError::Step {
            message: format!(
                "{}:{}: {}: {problem}",
                self.dockerfile_name,
                step.location.start_line,
                step.instruction.lines().next().unwrap_or_default()
            ),
        }
    }

    fn created(&self) -> String {
        let seconds = self
            .options
            .source_date_epoch
            .unwrap_or_else(|| rbuild_cache::store::now() as i64);
        rbuild_cache::time::rfc3339(seconds)
    }

    fn stage(&self, stage: &Stage) -> Result<(Built, Vec<StepReport>), SolveError> {
        let mut reports = Vec::new();
        let total = stage.steps.len() + 1;
        let label = |position: usize| format!("[{} {position}/{total}]", stage.display_name());
        let started = Instant::now();
        let id = self.progress.start(&label(1), &stage.from_instruction);
        let mut built = self.base(stage)?;
        self.progress
            .line(id, &format!("DONE {:.1}s", started.elapsed().as_secs_f64()));
        reports.push(StepReport {
            instruction: stage.from_instruction.clone(),
            line: stage.location.start_line,
            cached: true,
            miss_reason: None,
            duration: started.elapsed().as_secs_f64(),
        });
        for (index, step) in stage.steps.iter().enumerate() {
            if self.failed.load(Ordering::SeqCst) {
                return Err(SolveError::Cancelled);
            }
            let started = Instant::now();
            let id = self.progress.start(&label(index + 2), &step.instruction);
            let outcome = self.step(step, &mut built, id)?;
            let duration = started.elapsed().as_secs_f64();
            match &outcome {
                Outcome::Cached => self.progress.line(id, "CACHED"),
                _ => self.progress.line(id, &format!("DONE {duration:.1}s")),
            }
            reports.push(StepReport {
                instruction: step.instruction.clone(),
                line: step.location.start_line,
                cached: matches!(outcome, Outcome::Cached | Outcome::ConfigOnly),
                miss_reason: match outcome {
                    Outcome::Ran(reason) => Some(reason),
                    _ => None,
                },
                duration,
            });
        }
        Ok((built, reports))
    }

    fn base(&self, stage: &Stage) -> Result<Built, SolveError> {
        let mut built = match &stage.base {
            Base::Scratch => Built {
                layers: Vec::new(),
                config: json!({"architecture": stage.platform.architecture, "os": stage.platform.os, "config": {}, "rootfs": {"type": "layers", "diff_ids": []}}),
                fs_key: Digest::of(b"scratch"),
                cmd_set: false,
                stage_index: stage.index,
            },
            Base::Stage(index) => {
                let mut built = self.result_of(*index);
                built.cmd_set = false;
                built.stage_index = stage.index;
                built
            }
            Base::Image(reference) => {
                let images = crate::resolver::StoreImages::new(Some(self.store));
                let image = images.lookup(reference).ok_or_else(|| SolveError::Step {
                    message: format!(
                        "{}:{}: {}: base image {reference} is not in the store (pulling from a registry is not supported yet; `rbuild load` or `rbuild import` it)",
                        self.dockerfile_name,
                        stage.location.start_line,
                        stage.from_instruction
                    ),
                })?;
                let layers = image
                    .layers()?
                    .into_iter()
                    .zip(image.config.rootfs().diff_ids())
                    .map(|(target, diff_id)| LayerRecord {
                        target,
                        diff_id: diff_id
                            .parse()
                            .unwrap_or_else(|_| Digest::of(diff_id.as_bytes())),
                    })
                    .collect();
                let config: Value =
                    serde_json::from_slice(&image.config_bytes).unwrap_or_else(|_| json!({}));
                Built {
                    layers,
                    config,
                    fs_key: image.target.digest.clone(),
                    cmd_set: false,
                    stage_index: stage.index,
                }
            }
        };
        let config = built.config.as_object_mut().expect("configs are objects");
        for key in ["container", "container_config", "docker_version"] {
            config.remove(key);
        }
        if !config.get("config").is_some_and(Value::is_object) {
            config.insert("config".to_string(), json!({}));
        }
        let section = config["config"].as_object_mut().expect("checked above");
        let env = section.entry("Env").or_insert_with(|| json!([]));
        if !env.as_array().is_some_and(|env| {
            env.iter()
                .any(|item| item.as_str().is_some_and(|item| item.starts_with("PATH=")))
        }) && let Some(env) = env.as_array_mut()
        {
            env.insert(0, json!(format!("PATH={DEFAULT_PATH}")));
        }
        Ok(built)
    }

    fn step(&self, step: &Step, built: &mut Built, id: usize) -> Result<Outcome, SolveError> {
        let layers_before = built.layers.len();
        let outcome = match &step.op {
            Op::Config(change) => {
                apply_config(built, change);
                Outcome::ConfigOnly
            }
            Op::Workdir { path } => {
                set_config(built, "WorkingDir", json!(path));
                let key = self.key(step, built, &[], None);
                let exists = self
                    .view(&built.layers)?
                    .lookup(path, true)
                    .is_some_and(|entry| entry.metadata.is_dir());
                if exists {
                    built.fs_key = key;
                    Outcome::ConfigOnly
                } else {
                    let fingerprint = self.fingerprint(step, built);
                    self.cached_or(step, built, key, fingerprint, id, |solver, _| {
                        solver.workdir_layer(path)
                    })?
                }
            }
            Op::Run(run) => {
                let key = self.key(step, built, &[], None);
                let layers = built.layers.clone();
                let mut fingerprint = self.fingerprint(step, built);
                fingerprint.env = run
                    .env
                    .iter()
                    .map(|(name, value)| format!("{name}={value}"))
                    .collect();
                self.cached_or(step, built, key, fingerprint, id, |solver, id| {
                    solver.run(step, run, &layers, id)
                })?
            }
            Op::Copy(copy) => {
                let CopyInputs {
                    stages: inputs,
                    checksum,
                    files,
                    selection,
                } = self.copy_inputs(step, copy)?;
                let key = self.key(step, built, &inputs, checksum.as_deref());
                let layers = built.layers.clone();
                let mut fingerprint = self.fingerprint(step, built);
                fingerprint.files = files;
                fingerprint.inputs = match &copy.input {
                    Input::Stage(index) => vec![(
                        self.stage_names
                            .get(index)
                            .cloned()
                            .unwrap_or_else(|| format!("stage {index}")),
                        inputs.first().map(Digest::to_string).unwrap_or_default(),
                    )],
                    Input::Image(reference) => vec![(
                        reference.clone(),
                        inputs.first().map(Digest::to_string).unwrap_or_default(),
                    )],
                    Input::Context => Vec::new(),
                };
                self.cached_or(step, built, key, fingerprint, id, |solver, _| {
                    solver.copy(step, copy, selection.as_ref(), &layers)
                })?
            }
        };
        let created_by = history_text(step);
        let empty = built.layers.len() == layers_before;
        push_history(&mut built.config, &self.created(), &created_by, empty);
        Ok(outcome)
    }

    /// The cache key of a filesystem step.
    fn key(&self, step: &Step, built: &Built, inputs: &[Digest], checksum: Option<&str>) -> Digest {
        let mut text = format!(
            "rbuild-step-v1\n{}\n{}\n",
            step.definition_digest, built.fs_key
        );
        for input in inputs {
            text.push_str(&format!("input {input}\n"));
        }
        if let Some(checksum) = checksum {
            text.push_str(&format!("content {checksum}\n"));
        }
        Digest::of(text.as_bytes())
    }

    /// Reuses the layer recorded under `key`, or makes it with `make` and records it.
    #[allow(clippy::too_many_arguments)]
    fn cached_or(
        &self,
        step: &Step,
        built: &mut Built,
        key: Digest,
        fingerprint: Fingerprint,
        id: usize,
        make: impl FnOnce(&Self, usize) -> Result<Option<LayerRecord>, SolveError>,
    ) -> Result<Outcome, SolveError> {
        let history = self.history_path(step, built.stage_index);
        let previous: Option<Fingerprint> = fs::read(&history)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());

        let record = if self.options.no_cache {
            None
        } else {
            self.store.cache().get(&key)?
        };
        let hit = record
            .and_then(|record| serde_json::from_value::<Option<LayerRecord>>(record.payload).ok());
        let hit = hit.filter(|layer| {
            layer
                .as_ref()
                .is_none_or(|layer| self.store.content().contains(&layer.target.digest))
        });
        let (layer, outcome) = match hit {
            Some(layer) => (layer, Outcome::Cached),
            None => {
                let reason = if self.options.no_cache {
                    "--no-cache".to_string()
                } else {
                    match &previous {
                        Some(previous) => fingerprint.miss_reason(previous),
                        None => "no earlier build of this step in this root".to_string(),
                    }
                };
                let layer = make(self, id)?;
                let record = CacheRecord {
                    key: key.clone(),
                    blobs: layer
                        .iter()
                        .map(|layer| layer.target.digest.clone())
                        .collect(),
                    payload: serde_json::to_value(&layer).expect("layers serialize"),
                    created: rbuild_cache::store::now(),
                };
                self.store.cache().put(&record)?;
                (layer, Outcome::Ran(reason))
            }
        };
        // Remembered only once the step succeeded, so the next miss compares with a build
        // that worked.
        if previous.as_ref() != Some(&fingerprint) {
            let bytes = serde_json::to_vec(&fingerprint).expect("fingerprints serialize");
            let _ = rbuild_cache::content::write_atomic(&history, &bytes);
        }
        if let Some(layer) = layer {
            push_diff_id(&mut built.config, &layer.diff_id);
            built.layers.push(layer);
        }
        built.fs_key = key;
        Ok(outcome)
    }

    /// Where the fingerprint of this step's last build is kept: one file per context,
    /// Dockerfile, stage and position.
    fn history_path(&self, step: &Step, stage_index: usize) -> PathBuf {
        let context = fs::canonicalize(self.context).unwrap_or_else(|_| self.context.to_path_buf());
        let identity = format!(
            "{}\0{}\0{}\0{}",
            context.display(),
            self.dockerfile_name,
            stage_index,
            step.location.start_line
        );
        let directory = self.store.directory().join("step-history");
        let _ = fs::create_dir_all(&directory);
        directory.join(format!("{}.json", Digest::of(identity.as_bytes()).hex()))
    }

    fn fingerprint(&self, step: &Step, built: &Built) -> Fingerprint {
        Fingerprint {
            instruction: step.instruction.clone(),
            definition: step.definition_digest.clone(),
            parent: built.fs_key.to_string(),
            ..Fingerprint::default()
        }
    }

    /// The snapshot directories of `layers`, topmost first (overlayfs's lowerdir order).
    fn snapshot_directories(&self, layers: &[LayerRecord]) -> Result<Vec<PathBuf>, SolveError> {
        let mut directories = layers
            .iter()
            .map(|layer| snapshot::prepare(self.store, &layer.target, &layer.diff_id))
            .collect::<Result<Vec<_>, _>>()?;
        directories.reverse();
        Ok(directories)
    }

    /// The merged filesystem of `layers`.
    fn view(&self, layers: &[LayerRecord]) -> Result<LayerView, SolveError> {
        Ok(LayerView::new(self.snapshot_directories(layers)?))
    }

    fn layer_from(
        &self,
        directory: &Path,
        source: LayerSource,
    ) -> Result<Option<LayerRecord>, SolveError> {
        let empty = fs::read_dir(directory)
            .map_err(io_error("list", directory))?
            .next()
            .is_none();
        if empty {
            return Ok(None);
        }
        let options = LayerOptions {
            source,
            source_date_epoch: self.options.source_date_epoch,
            ..LayerOptions::default()
        };
        let layer = create_layer(directory, &options, self.store.content()).map_err(|error| {
            SolveError::Step {
                message: format!(
                    "committing a layer from {}: {}",
                    directory.display(),
                    crate::commands::image::chain_text(&error)
                ),
            }
        })?;
        Ok(Some(LayerRecord {
            target: Target {
                media_type: layer.media_type.to_string(),
                digest: layer.digest,
                size: layer.size,
            },
            diff_id: layer.diff_id,
        }))
    }

    fn scratch_directory(&self, kind: &str) -> Result<PathBuf, SolveError> {
        let id =
            Digest::of(format!("{kind}-{}-{:?}", std::process::id(), Instant::now()).as_bytes());
        let path = self
            .store
            .containers_directory()
            .join(format!("build-{}", id.short()));
        fs::create_dir_all(&path).map_err(io_error("create", &path))?;
        Ok(path)
    }

    fn workdir_layer(&self, path: &str) -> Result<Option<LayerRecord>, SolveError> {
        let scratch = self.scratch_directory("workdir")?;
        let tree = scratch.join("tree");
        let target = tree.join(path.trim_start_matches('/'));
        fs::create_dir_all(&target).map_err(io_error("create", &target))?;
        let result = self.layer_from(&tree, LayerSource::Directory);
        let _ = fs::remove_dir_all(&scratch);
        result
    }

    fn run(
        &self,
        step: &Step,
        run: &RunOp,
        layers: &[LayerRecord],
        id: usize,
    ) -> Result<Option<LayerRecord>, SolveError> {
        if !run.mounts.is_empty() {
            return Err(self.step_error(step, "RUN --mount is not supported yet"));
        }
        let lower = self.snapshot_directories(layers)?;
        let scratch = self.scratch_directory("run")?;
        let (upper, work) = (scratch.join("upper"), scratch.join("work"));
        for directory in [&upper, &work] {
            fs::create_dir_all(directory).map_err(io_error("create", directory))?;
        }
        let mut env: Vec<String> = run
            .env
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        if !run.env.iter().any(|(key, _)| key == "PATH") {
            env.insert(0, format!("PATH={DEFAULT_PATH}"));
        }
        let process = Process {
            args: run.arguments.clone(),
            env,
            cwd: run.working_dir.clone(),
            user: run.user.clone().unwrap_or_default(),
        };
        let mut spec = RunSpec::new(
            RootFs::Overlay {
                lower,
                upper: upper.clone(),
                work,
            },
            process,
        );
        spec.network = match run.network {
            NetworkMode::None => Network::None,
            NetworkMode::Host => Network::Host,
            NetworkMode::Default => self.options.default_network,
        };
        for script in &run.script_files {
            let file = scratch.join(format!("script-{}", spec.mounts.len()));
            fs::write(&file, &script.content).map_err(io_error("write", &file))?;
            fs::set_permissions(&file, fs::Permissions::from_mode(0o755))
                .map_err(io_error("chmod", &file))?;
            spec.mounts.push(Mount::Bind {
                source: file,
                destination: script.path.clone(),
                readonly: true,
            });
        }
        let started = Instant::now();
        let tail: Arc<Mutex<Vec<String>>> = Arc::default();
        let output = |progress: Progress, tail: Arc<Mutex<Vec<String>>>| {
            let mut pending = Vec::new();
            Output::Callback(Box::new(move |chunk: &[u8]| {
                pending.extend_from_slice(chunk);
                while let Some(end) = pending.iter().position(|byte| *byte == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                    progress.line(
                        id,
                        &format!("{:.3} {text}", started.elapsed().as_secs_f64()),
                    );
                    let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                    tail.push(text);
                    if tail.len() > 10 {
                        tail.remove(0);
                    }
                }
            }))
        };
        let mut run_options = RunOptions::with_current_exe()
            .map_err(|error| self.step_error(step, crate::commands::image::chain_text(&error)))?;
        run_options.stdout = output(self.progress.clone(), tail.clone());
        run_options.stderr = output(self.progress.clone(), tail.clone());
        let canceller = sandbox::Canceller::new();
        run_options.canceller = Some(canceller.clone());
        self.running
            .lock()
            .unwrap_or_else(|error| error.into_inner())
            .push(canceller.clone());
        if self.failed.load(Ordering::SeqCst) {
            canceller.cancel();
        }
        let result = sandbox::run(&spec, run_options);
        self.running
            .lock()
            .unwrap_or_else(|error| error.into_inner())
            .retain(|running| !running.same_as(&canceller));
        if self.failed.load(Ordering::SeqCst) {
            let _ = fs::remove_dir_all(&scratch);
            return Err(SolveError::Cancelled);
        }
        let outcome = match result {
            Ok(result) if result.success() => self.layer_from(&upper, LayerSource::OverlayUpper),
            Ok(result) => {
                let tail = tail.lock().unwrap_or_else(|e| e.into_inner()).join("\n");
                let mut problem = format!(
                    "process {:?} did not complete successfully: exit code: {}",
                    run.arguments.join(" "),
                    result.exit_code
                );
                if result.oom_killed {
                    problem.push_str(" (out of memory)");
                }
                if !tail.is_empty() && !self.options.progress {
                    problem.push_str(&format!("\n{tail}"));
                }
                Err(self.step_error(step, problem))
            }
            Err(error) => Err(self.step_error(step, crate::commands::image::chain_text(&error))),
        };
        let _ = fs::remove_dir_all(&scratch);
        outcome
    }

    /// The stage keys and content checksum a COPY reads.
    fn copy_inputs(&self, step: &Step, copy: &CopyOp) -> Result<CopyInputs, SolveError> {
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
                    self.context,
                    &copy.sources,
                    &copy.options.exclude,
                    &self.filter,
                    self.stat_cache,
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
                let images = crate::resolver::StoreImages::new(Some(self.store));
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

    fn copy(
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
                        let images = crate::resolver::StoreImages::new(Some(self.store));
                        let image = images.lookup(reference).ok_or_else(|| {
                            self.step_error(step, format!("image {reference} is not in the store"))
                        })?;
                        let mut directories = snapshot::prepare_image(self.store, &image)?;
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

    fn write_image(&self, mut built: Built) -> Result<(Target, Digest), SolveError> {
        let created = self.created();
        let config = built.config.as_object_mut().expect("configs are objects");
        config.insert("created".to_string(), json!(created));
        let diff_ids: Vec<Value> = built
            .layers
            .iter()
            .map(|layer| json!(layer.diff_id.to_string()))
            .collect();
        config.insert(
            "rootfs".to_string(),
            json!({"type": "layers", "diff_ids": diff_ids}),
        );
        let bytes = serde_json::to_vec(&built.config).expect("configs serialize");
        let info = self.store.content().write_bytes(&bytes)?;
        let config_target = Target {
            media_type: rbuild_cache::store::OCI_CONFIG.to_string(),
            digest: info.digest.clone(),
            size: info.size,
        };
        let layers: Vec<Target> = built
            .layers
            .iter()
            .map(|layer| layer.target.clone())
            .collect();
        let manifest = self.store.write_manifest(&config_target, &layers)?;
        Ok((manifest, info.digest))
    }
}

enum Outcome {
    Cached,
    Ran(String),
    ConfigOnly,
}

/// What a COPY reads, for its cache key.
#[derive(Default)]
struct CopyInputs {
    /// Keys of the stage or image it copies from.
    stages: Vec<Digest>,
    /// The checksum of the context files it selects.
    checksum: Option<String>,
    /// Those files: path → mode and content hash.
    files: BTreeMap<String, String>,
    /// The selection itself, which the copy then follows (the context is walked once).
    selection: Option<Selection>,
}

/// What went into a step's cache key, kept per step (by context, Dockerfile, stage and
/// position) so that a miss can say what changed since the last build.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Fingerprint {
    instruction: String,
    definition: String,
    parent: String,
    /// (stage or image name, key) of what the step reads besides its parent.
    inputs: Vec<(String, String)>,
    /// RUN's environment (build args and ENV).
    env: Vec<String>,
    /// Context files read: path → mode and content hash (or link target).
    files: BTreeMap<String, String>,
}

impl Fingerprint {
    /// Why `self` (now) misses where `previous` was built.
    fn miss_reason(&self, previous: &Fingerprint) -> String {
        let list = |names: Vec<&String>| {
            let shown: Vec<&str> = names.iter().take(5).map(|name| name.as_str()).collect();
            let more = names.len().saturating_sub(5);
            if more > 0 {
                format!("{} and {more} more", shown.join(", "))
            } else {
                shown.join(", ")
            }
        };
        if self.instruction != previous.instruction {
            return format!(
                "the instruction changed (was: {})",
                previous.instruction.lines().next().unwrap_or_default()
            );
        }
        let changed_files: Vec<&String> = self
            .files
            .iter()
            .filter(|(path, fingerprint)| {
                previous
                    .files
                    .get(*path)
                    .is_some_and(|old| old != *fingerprint)
            })
            .map(|(path, _)| path)
            .collect();
        let added: Vec<&String> = self
            .files
            .keys()
            .filter(|path| !previous.files.contains_key(*path))
            .collect();
        let removed: Vec<&String> = previous
            .files
            .keys()
            .filter(|path| !self.files.contains_key(*path))
            .collect();
        let mut reasons = Vec::new();
        if !changed_files.is_empty() {
            reasons.push(format!("file changed: {}", list(changed_files)));
        }
        if !added.is_empty() {
            reasons.push(format!("file added: {}", list(added)));
        }
        if !removed.is_empty() {
            reasons.push(format!("file removed: {}", list(removed)));
        }
        if !reasons.is_empty() {
            return reasons.join("; ");
        }
        if self.env != previous.env {
            let name = |item: &String| {
                item.split_once('=')
                    .map_or(item.clone(), |(name, _)| name.to_string())
            };
            let mut names: Vec<String> = self
                .env
                .iter()
                .filter(|item| !previous.env.contains(item))
                .chain(previous.env.iter().filter(|item| !self.env.contains(item)))
                .map(name)
                .collect();
            names.sort();
            names.dedup();
            return format!(
                "build argument or environment changed: {}",
                names.join(", ")
            );
        }
        if self.definition != previous.definition {
            return "the instruction's expansion changed (a variable, WORKDIR, USER, SHELL or --network)".to_string();
        }
        let changed_inputs: Vec<&String> = self
            .inputs
            .iter()
            .filter(|input| !previous.inputs.contains(input))
            .map(|(name, _)| name)
            .collect();
        if !changed_inputs.is_empty() {
            return format!("what it copies from changed: {}", list(changed_inputs));
        }
        if self.parent != previous.parent {
            return "the step it builds on changed".to_string();
        }
        "its cache record is gone (pruned)".to_string()
    }
}

/// The stages a stage needs finished first: its base and what it copies from.
fn stage_dependencies(stage: &Stage) -> Vec<usize> {
    let mut needs = Vec::new();
    if let Base::Stage(index) = stage.base {
        needs.push(index);
    }
    for step in &stage.steps {
        if let Op::Copy(CopyOp {
            input: Input::Stage(index),
            ..
        }) = &step.op
        {
            needs.push(*index);
        }
    }
    needs
}

fn set_config(built: &mut Built, key: &str, value: Value) {
    built.config["config"][key] = value;
}

fn apply_config(built: &mut Built, change: &ConfigChange) {
    let section = &mut built.config["config"];
    match change {
        ConfigChange::Env(pairs) => {
            let mut env = crate::resolver::strings(&section["Env"]);
            for (key, value) in pairs {
                env.retain(|item| {
                    item.split_once('=').map_or(item.as_str(), |(name, _)| name) != key
                });
                env.push(format!("{key}={value}"));
            }
            section["Env"] = json!(env);
        }
        ConfigChange::Label(pairs) => {
            if !section["Labels"].is_object() {
                section["Labels"] = json!({});
            }
            for (key, value) in pairs {
                section["Labels"][key] = json!(value);
            }
        }
        ConfigChange::Arg(_) => {}
        ConfigChange::User(user) => section["User"] = json!(user),
        ConfigChange::Expose(ports) => {
            if !section["ExposedPorts"].is_object() {
                section["ExposedPorts"] = json!({});
            }
            for port in ports {
                section["ExposedPorts"][port] = json!({});
            }
        }
        ConfigChange::Volume(paths) => {
            if !section["Volumes"].is_object() {
                section["Volumes"] = json!({});
            }
            for path in paths {
                section["Volumes"][path] = json!({});
            }
        }
        ConfigChange::Cmd(command) => {
            section["Cmd"] = json!(command);
            built.cmd_set = true;
        }
        ConfigChange::Entrypoint(entrypoint) => {
            section["Entrypoint"] = json!(entrypoint);
            if !built.cmd_set {
                section["Cmd"] = Value::Null;
                if let Some(section) = section.as_object_mut() {
                    section.remove("Cmd");
                }
            }
        }
        ConfigChange::Shell(shell) => section["Shell"] = json!(shell),
        ConfigChange::StopSignal(signal) => section["StopSignal"] = json!(signal),
        ConfigChange::Healthcheck(check) => {
            let nanos = |duration: &Option<std::time::Duration>| {
                duration.map(|duration| duration.as_nanos() as u64)
            };
            let mut value = json!({"Test": check.test});
            for (key, duration) in [
                ("Interval", nanos(&check.interval)),
                ("Timeout", nanos(&check.timeout)),
                ("StartPeriod", nanos(&check.start_period)),
                ("StartInterval", nanos(&check.start_interval)),
            ] {
                if let Some(duration) = duration {
                    value[key] = json!(duration);
                }
            }
            if let Some(retries) = check.retries {
                value["Retries"] = json!(retries);
            }
            section["Healthcheck"] = value;
        }
        ConfigChange::Onbuild(trigger) => {
            if !section["OnBuild"].is_array() {
                section["OnBuild"] = json!([]);
            }
            if let Some(items) = section["OnBuild"].as_array_mut() {
                items.push(json!(trigger));
            }
        }
        ConfigChange::Maintainer(author) => built.config["author"] = json!(author),
    }
}

fn history_text(step: &Step) -> String {
    let instruction = step.instruction.lines().next().unwrap_or_default();
    match &step.op {
        Op::Run(run) => format!("RUN {} # buildkit", run.arguments.join(" ")),
        _ => format!("{instruction} # buildkit"),
    }
}

fn push_history(config: &mut Value, created: &str, created_by: &str, empty: bool) {
    if !config["history"].is_array() {
        config["history"] = json!([]);
    }
    let mut entry =
        json!({"created": created, "created_by": created_by, "comment": "buildkit.dockerfile.v0"});
    if empty {
        entry["empty_layer"] = json!(true);
    }
    if let Some(history) = config["history"].as_array_mut() {
        history.push(entry);
    }
}

fn push_diff_id(config: &mut Value, diff_id: &Digest) {
    if !config["rootfs"]["diff_ids"].is_array() {
        config["rootfs"] = json!({"type": "layers", "diff_ids": []});
    }
    if let Some(ids) = config["rootfs"]["diff_ids"].as_array_mut() {
        ids.push(json!(diff_id.to_string()));
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

/// Tags the result and prints where it went.
pub fn tag(store: &Store, result: &BuildResult, tags: &[Reference]) -> Result<(), SolveError> {
    for reference in tags {
        store.set_tag(reference, &result.image)?;
    }
    if tags.is_empty() {
        store.add_dangling(&result.image)?;
    }
    let _ = io::stderr().flush();
    Ok(())
}
