//! The solver: runs a planned build graph and produces an image in the store.
//!
//! Every stage is a task on a tokio runtime. A step starts as soon as what it reads is ready
//! (the step before it, and the stages it copies or mounts from), so a stage's early steps
//! overlap with the stages it needs later; its work runs on blocking threads, at most `jobs`
//! steps at once. Identical steps (same key) reached from two stages run once. The first
//! failure stops the build: nothing new starts, running sandboxes are killed, and `solve`
//! returns only when every task has ended.
//!
//! Every step that changes the filesystem has a cache key: the sha256 of its definition digest
//! (the instruction after expansion, with its env, user, workdir, shell, network, mounts), the
//! key of the filesystem it builds on, the keys of the stages it reads, and the content checksum
//! of exactly the context files it copies or bind-mounts (blake3, never mtimes). A key found in
//! the cache index reuses its layer; otherwise the step runs (RUN in the sandbox, COPY/ADD into
//! a fresh directory) and its layer is committed and recorded. `predict` walks the same keys
//! without running anything, for `--dry-run`.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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
use tokio::sync::{Semaphore, watch};

mod archive;
mod config;
mod copy;
mod fetch;
mod fingerprint;
mod mounts;
mod progress;
mod run;
mod shared_cache;

use progress::Progress;
pub use progress::ProgressMode;

use config::{apply_config, history_text, push_diff_id, push_history, set_config};
use copy::CopyInputs;
use fingerprint::Fingerprint;

/// How to build.
#[derive(Clone, Debug)]
pub struct SolveOptions {
    /// Run every step; look nothing up in the cache (results are still recorded).
    pub no_cache: bool,
    /// The network of RUN steps that say `--network=default` (or nothing).
    pub default_network: Network,
    /// Clamp created times, history and layer mtimes to this (SOURCE_DATE_EPOCH).
    pub source_date_epoch: Option<i64>,
    /// How progress is shown on stderr.
    pub progress: ProgressMode,
    /// How many steps may run at once (RUN, COPY, ADD, WORKDIR: cache hits included).
    pub jobs: usize,
    /// Predict only: look every step up in the cache, run nothing, write nothing.
    pub dry_run: bool,
    /// `--secret`s, for `RUN --mount=type=secret` (read when a step mounts them).
    pub secrets: Vec<crate::options::Secret>,
    /// `--cache-from`: caches whose records count as hits (not read under `dry_run`).
    pub cache_from: Vec<crate::options::CacheLocation>,
    /// `--cache-to`: where the build's cache records go once it succeeded.
    pub cache_to: Vec<crate::options::CacheExport>,
}

/// What happened to one step.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// The stage's index in the Dockerfile.
    pub stage: usize,
    /// The step's position in its stage (0 is the FROM).
    pub position: usize,
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
struct IgnoreFilter(Option<IgnoreMatcher>);

impl ContextFilter for IgnoreFilter {
    fn is_excluded(&self, path: &str, is_directory: bool) -> bool {
        let _ = is_directory;
        self.0
            .as_ref()
            .is_some_and(|matcher| matcher.is_excluded(path))
    }

    fn can_skip_directory(&self, path: &str) -> bool {
        self.0
            .as_ref()
            .is_some_and(|matcher| matcher.can_skip_directory(path))
    }
}

/// Runs the graph and writes the target stage's image into the store.
///
/// The stages run as tasks on a tokio runtime: each step starts as soon as what it reads is
/// ready (its stage's previous step, and the stages it copies or mounts from), so the early
/// steps of a stage overlap with the stages it needs later. The work of a step (hashing,
/// sandboxes, tar, compression) runs on blocking threads, at most `jobs` steps at once.
pub fn solve(
    store: Arc<Store>,
    graph: &BuildGraph,
    dockerfile_name: &str,
    context: &Path,
    ignore: Option<IgnoreMatcher>,
    options: &SolveOptions,
) -> Result<BuildResult, SolveError> {
    let (solver, reports) = schedule(store, graph, dockerfile_name, context, ignore, options)?;
    let built = solver.result_of(graph.target_stage().index);
    // Every layer the image names must be in the store or fetchable from a known registry.
    solver.keep_reachable(&built.layers)?;
    let (image, config_digest) = solver.write_image(built)?;
    for export in &options.cache_to {
        solver.export_cache(export)?;
    }
    Ok(BuildResult {
        image,
        config_digest,
        steps: reports,
    })
}

/// What a build would do now, step by step, without running or writing anything: each step
/// is looked up in the cache under the key a build would compute (context files are hashed;
/// nothing is fetched), and a miss says why, prefixed with `would run: `.
pub fn predict(
    store: Arc<Store>,
    graph: &BuildGraph,
    dockerfile_name: &str,
    context: &Path,
    ignore: Option<IgnoreMatcher>,
    options: &SolveOptions,
) -> Result<Vec<StepReport>, SolveError> {
    let options = SolveOptions {
        dry_run: true,
        progress: ProgressMode::Quiet,
        ..options.clone()
    };
    let (_, reports) = schedule(store, graph, dockerfile_name, context, ignore, &options)?;
    Ok(reports)
}

/// Runs every stage on a tokio runtime; returns the solver (holding the stages' results) and
/// the reports.
fn schedule(
    store: Arc<Store>,
    graph: &BuildGraph,
    dockerfile_name: &str,
    context: &Path,
    ignore: Option<IgnoreMatcher>,
    options: &SolveOptions,
) -> Result<(Arc<Solver>, Vec<StepReport>), SolveError> {
    let stat_cache = Arc::new(StatCache::load(&stat_cache_path(&store, context)));
    let jobs = options.jobs.max(1);
    let imported = if options.dry_run || options.cache_from.is_empty() {
        shared_cache::ImportedCache::default()
    } else {
        shared_cache::ImportedCache::import(&store, &options.cache_from)
    };
    let solver = Arc::new(Solver {
        imported,
        records: Mutex::default(),
        store,
        dockerfile_name: dockerfile_name.to_string(),
        context: context.to_path_buf(),
        filter: IgnoreFilter(ignore),
        stat_cache: stat_cache.clone(),
        options: options.clone(),
        progress: Progress::new(options.progress),
        results: graph
            .stages
            .iter()
            .map(|stage| (stage.index, watch::channel(StageState::Pending).0))
            .collect(),
        stage_names: graph
            .stages
            .iter()
            .map(|stage| (stage.index, stage.display_name()))
            .collect(),
        graph: Arc::new(graph.clone()),
        jobs: Arc::new(Semaphore::new(jobs)),
        in_flight: Mutex::default(),
        failed: AtomicBool::new(false),
        running: Mutex::default(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(jobs + 2 * graph.stages.len())
        .thread_name("rbuild-solver")
        .build()
        .map_err(io_error("start the solver's runtime", Path::new("")))?;
    let reports = runtime.block_on(solver.clone().run_stages());
    solver.progress.close();
    let reports = reports?;
    let _ = stat_cache.save();
    Ok((solver, reports))
}

fn stat_cache_path(store: &Store, context: &Path) -> PathBuf {
    let canonical = fs::canonicalize(context).unwrap_or_else(|_| context.to_path_buf());
    let name = Digest::of(canonical.to_string_lossy().as_bytes());
    let directory = store.directory().join("context-cache");
    let _ = fs::create_dir_all(&directory);
    directory.join(format!("{}.json", name.hex()))
}

/// Where a stage is.
#[derive(Clone, Debug)]
enum StageState {
    Pending,
    Done(Box<Built>),
    /// It failed or was cancelled: whoever waits for it stops.
    Failed,
}

/// A step whose result is being made: identical steps (same key) wait for the first and
/// share its layer (BuildKit's flightcontrol). `None` when the first failed.
type InFlight = Arc<OnceLock<Option<Option<LayerRecord>>>>;

struct Solver {
    store: Arc<Store>,
    /// The records of `--cache-from`.
    imported: shared_cache::ImportedCache,
    /// (stage, key, layer) of every filesystem step of this build, for `--cache-to`.
    records: Mutex<Vec<(usize, Digest, Option<LayerRecord>)>>,
    dockerfile_name: String,
    context: PathBuf,
    filter: IgnoreFilter,
    stat_cache: Arc<StatCache>,
    options: SolveOptions,
    progress: Progress,
    graph: Arc<BuildGraph>,
    /// Each stage's state, published when it ends.
    results: BTreeMap<usize, watch::Sender<StageState>>,
    /// Stage index → display name, for miss reasons.
    stage_names: BTreeMap<usize, String>,
    /// Permits for running steps (`--jobs`).
    jobs: Arc<Semaphore>,
    /// Steps being made, by cache key.
    in_flight: Mutex<HashMap<Digest, InFlight>>,
    /// Set by the first failure: nothing new starts, and running sandboxes are killed.
    failed: AtomicBool,
    /// The sandboxes running now.
    running: Mutex<Vec<sandbox::Canceller>>,
}

impl Solver {
    /// Builds every stage as a task. The first failure stops new work and kills running
    /// sandboxes; it is the error returned, once every task has ended (so nothing of this build
    /// still runs when `solve` returns). Reports come back in stage order.
    async fn run_stages(self: Arc<Self>) -> Result<Vec<StepReport>, SolveError> {
        let mut tasks = tokio::task::JoinSet::new();
        for position in 0..self.graph.stages.len() {
            let solver = self.clone();
            tasks.spawn(async move {
                let index = solver.graph.stages[position].index;
                let result = solver.clone().stage(position).await;
                let state = match &result {
                    Ok((built, _)) => StageState::Done(Box::new(built.clone())),
                    Err(_) => StageState::Failed,
                };
                solver.results[&index].send_replace(state);
                (index, result.map(|(_, reports)| reports))
            });
        }
        let mut reports: BTreeMap<usize, Vec<StepReport>> = BTreeMap::new();
        let mut failure: Option<SolveError> = None;
        while let Some(joined) = tasks.join_next().await {
            let (index, result) = match joined {
                Ok(joined) => joined,
                Err(error) => std::panic::resume_unwind(error.into_panic()),
            };
            match result {
                Ok(stage_reports) => {
                    reports.insert(index, stage_reports);
                }
                Err(SolveError::Cancelled) => {}
                Err(error) => {
                    if failure.is_none() {
                        self.cancel_all();
                        failure = Some(error);
                    }
                }
            }
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(reports.into_values().flatten().collect()),
        }
    }

    /// Stops the build: nothing new starts and running sandboxes are killed.
    fn cancel_all(&self) {
        self.failed.store(true, Ordering::SeqCst);
        for canceller in self
            .running
            .lock()
            .unwrap_or_else(|error| error.into_inner())
            .iter()
        {
            canceller.cancel();
        }
    }

    /// Waits until stage `index` is built; `Cancelled` if it failed.
    async fn wait_for(&self, index: usize) -> Result<(), SolveError> {
        let mut receiver = self.results[&index].subscribe();
        let state = receiver
            .wait_for(|state| !matches!(state, StageState::Pending))
            .await
            .map_err(|_| SolveError::Cancelled)?;
        match &*state {
            StageState::Done(_) => Ok(()),
            _ => Err(SolveError::Cancelled),
        }
    }

    /// Runs `work` on a blocking thread.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Solver) -> T + Send + 'static,
    ) -> T {
        let solver = self.clone();
        match tokio::task::spawn_blocking(move || work(&solver)).await {
            Ok(value) => value,
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }

    /// A finished stage's result.
    fn result_of(&self, index: usize) -> Built {
        match &*self.results[&index].borrow() {
            StageState::Done(built) => (**built).clone(),
            _ => panic!("stage {index} is used before it is built"),
        }
    }

    /// The image `reference` names for a `COPY --from` or `--mount from=` of `step`: the
    /// store's, or pulled lazily (manifest and config) when the store lacks it, except in a
    /// dry run.
    fn input_image(&self, step: &Step, reference: &str) -> Result<rbuild_cache::Image, SolveError> {
        let images = crate::resolver::StoreImages::new(Some(&self.store));
        if let Some(image) = images.lookup(reference) {
            return Ok(image);
        }
        if self.options.dry_run {
            return Err(self.step_error(step, format!("image {reference} is not in the store")));
        }
        let parsed = Reference::parse(reference).map_err(|error| self.step_error(step, error))?;
        let platform = &self.graph.target_stage().platform;
        let target =
            crate::registry::pull_lazily(&self.store, &parsed, platform).map_err(|error| {
                self.step_error(
                    step,
                    format!(
                        "image {reference} is not in the store, and pulling it failed: {}",
                        crate::commands::image::chain_text(&error)
                    ),
                )
            })?;
        Ok(self.store.image(&target)?)
    }

    /// The snapshot directories of an image's layers, topmost first, fetching the layers it
    /// needs from their registry.
    fn image_directories(&self, image: &rbuild_cache::Image) -> Result<Vec<PathBuf>, SolveError> {
        let layers: Vec<LayerRecord> = snapshot::layers_with_diff_ids(image)?
            .into_iter()
            .map(|(target, diff_id)| LayerRecord { target, diff_id })
            .collect();
        self.snapshot_directories(&layers)
    }

    /// `error` naming the Dockerfile line of `step`, unless it names one already (or is a
    /// cancellation).
    fn located(&self, step: &Step, error: SolveError) -> SolveError {
        match &error {
            SolveError::Cancelled => error,
            SolveError::Step { message } if message.starts_with(&self.dockerfile_name) => error,
            _ => self.step_error(step, crate::commands::image::chain_text(&error)),
        }
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

    /// Builds the stage at `position` of the graph, step by step; each step waits for the
    /// stages it reads, then for a `--jobs` permit if it touches the filesystem.
    async fn stage(
        self: Arc<Self>,
        position: usize,
    ) -> Result<(Built, Vec<StepReport>), SolveError> {
        let graph = self.graph.clone();
        let stage = &graph.stages[position];
        let mut reports = Vec::new();
        let total = stage.steps.len() + 1;
        let label = |position: usize| format!("[{} {position}/{total}]", stage.display_name());
        if let Base::Stage(index) = stage.base {
            self.wait_for(index).await?;
        }
        if self.failed.load(Ordering::SeqCst) {
            return Err(SolveError::Cancelled);
        }
        let started = Instant::now();
        let id = self.progress.start(&label(1), &stage.from_instruction);
        let base = self
            .blocking(move |solver| solver.base(&solver.graph.stages[position]))
            .await;
        let mut built = match base {
            Ok(built) => built,
            Err(error) if self.options.dry_run => {
                // Predicting: a base missing from the store makes every step of the stage run.
                let reason = crate::commands::image::chain_text(&error);
                let built = Built {
                    layers: Vec::new(),
                    config: json!({"config": {}}),
                    fs_key: Digest::of(format!("missing base\0{reason}").as_bytes()),
                    cmd_set: false,
                    stage_index: stage.index,
                };
                for (step_index, step) in stage.steps.iter().enumerate() {
                    reports.push(StepReport {
                        stage: stage.index,
                        position: step_index + 1,
                        instruction: step.instruction.clone(),
                        line: step.location.start_line,
                        cached: false,
                        miss_reason: Some(format!("would run: {reason}")),
                        duration: 0.0,
                    });
                }
                return Ok((built, reports));
            }
            Err(error) => {
                self.progress.error(id);
                return Err(error);
            }
        };
        self.progress.done(id, started.elapsed().as_secs_f64());
        reports.push(StepReport {
            stage: stage.index,
            position: 0,
            instruction: stage.from_instruction.clone(),
            line: stage.location.start_line,
            cached: true,
            miss_reason: None,
            duration: started.elapsed().as_secs_f64(),
        });
        for (step_index, step) in stage.steps.iter().enumerate() {
            for index in step_dependencies(step) {
                self.wait_for(index).await?;
            }
            let permit = match step.op {
                Op::Config(_) => None,
                _ => Some(
                    self.jobs
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| SolveError::Cancelled)?,
                ),
            };
            if self.failed.load(Ordering::SeqCst) {
                return Err(SolveError::Cancelled);
            }
            let started = Instant::now();
            let id = self
                .progress
                .start(&label(step_index + 2), &step.instruction);
            let (returned, outcome) = self
                .blocking(move |solver| {
                    let step = &solver.graph.stages[position].steps[step_index];
                    let outcome = solver
                        .step(step, &mut built, id)
                        .map_err(|error| solver.located(step, error));
                    (built, outcome)
                })
                .await;
            drop(permit);
            built = returned;
            let outcome = outcome.inspect_err(|error| {
                if !matches!(error, SolveError::Cancelled) {
                    self.progress.error(id);
                }
            })?;
            let duration = started.elapsed().as_secs_f64();
            match &outcome {
                Outcome::Cached => self.progress.cached(id),
                _ => self.progress.done(id, duration),
            }
            reports.push(StepReport {
                stage: stage.index,
                position: step_index + 1,
                instruction: step.instruction.clone(),
                line: step.location.start_line,
                cached: matches!(outcome, Outcome::Cached | Outcome::ConfigOnly),
                miss_reason: match outcome {
                    Outcome::Ran(reason) => Some(reason),
                    Outcome::WouldRun(reason) => Some(format!("would run: {reason}")),
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
                let images = crate::resolver::StoreImages::new(Some(&self.store));
                let image = images.lookup(reference).ok_or_else(|| SolveError::Step {
                    message: format!(
                        "{}:{}: {}: base image {reference} is not in the store and was not pulled (`rbuild pull`, `rbuild load` or `rbuild import` it)",
                        self.dockerfile_name,
                        stage.location.start_line,
                        stage.from_instruction
                    ),
                })?;
                let layers = snapshot::layers_with_diff_ids(&image)?
                    .into_iter()
                    .map(|(target, diff_id)| LayerRecord { target, diff_id })
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
                    self.cached_or(step, built, key, fingerprint, id, |solver, _, _| {
                        solver.workdir_layer(path)
                    })?
                }
            }
            Op::Run(run) => {
                // What its mounts read (never cache-mount contents or secrets) is in the key.
                let inputs = self.mount_inputs(step, run)?;
                let key = self.key(step, built, &inputs.keys, inputs.checksum.as_deref());
                let layers = built.layers.clone();
                let mut fingerprint = self.fingerprint(step, built);
                fingerprint.env = run
                    .env
                    .iter()
                    .map(|(name, value)| format!("{name}={value}"))
                    .collect();
                fingerprint.files = inputs.files.clone();
                fingerprint.inputs = inputs.inputs.clone();
                self.cached_or(step, built, key, fingerprint, id, |solver, id, _| {
                    solver.run(step, run, &inputs, &layers, id)
                })?
            }
            Op::Copy(copy) => {
                let CopyInputs {
                    stages: inputs,
                    checksum,
                    files,
                    prepared,
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
                self.cached_or(step, built, key, fingerprint, id, |solver, _, previous| {
                    solver.copy(step, copy, &prepared, &layers, previous)
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
        mut fingerprint: Fingerprint,
        id: usize,
        make: impl FnOnce(&Self, usize, Option<&Fingerprint>) -> Result<Option<LayerRecord>, SolveError>,
    ) -> Result<Outcome, SolveError> {
        let history = self.history_path(step, built.stage_index);
        // The key of the build the history describes: when it is this key, the history
        // already says what a miss would compare with, and a hit need not read it (for a COPY
        // of 20,000 files it is megabytes of JSON).
        let marker = history.with_extension("key");
        let same_key = fs::read_to_string(&marker).is_ok_and(|text| text == key.to_string());

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
        // Then the imported caches: a hit whose layer is fetched only when needed.
        let hit = match hit {
            Some(hit) => Some(hit),
            None if self.options.no_cache => None,
            None => self.imported.get(&key).cloned(),
        };
        let history_current = same_key && hit.is_some();
        let previous: Option<Fingerprint> = if history_current {
            None
        } else {
            fs::read(&history)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        };
        let (layer, outcome) = match hit {
            Some(layer) => (layer, Outcome::Cached),
            None if self.options.dry_run => {
                let reason = match &previous {
                    _ if self.options.no_cache => "--no-cache".to_string(),
                    Some(previous) => fingerprint.miss_reason(previous),
                    None => "no earlier build of this step in this root".to_string(),
                };
                built.fs_key = key;
                return Ok(Outcome::WouldRun(reason));
            }
            None => {
                let reason = if self.options.no_cache {
                    "--no-cache".to_string()
                } else {
                    match &previous {
                        Some(previous) => fingerprint.miss_reason(previous),
                        None => "no earlier build of this step in this root".to_string(),
                    }
                };
                // Identical work in flight runs once: the first caller makes the layer, the
                // others wait for it and reuse it.
                let flight = self
                    .in_flight
                    .lock()
                    .unwrap_or_else(|error| error.into_inner())
                    .entry(key.clone())
                    .or_default()
                    .clone();
                let mut made: Option<Result<Option<LayerRecord>, SolveError>> = None;
                let shared = flight.get_or_init(|| {
                    let result = make(self, id, previous.as_ref()).and_then(|layer| {
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
                        Ok(layer)
                    });
                    let shared = result.as_ref().ok().cloned();
                    made = Some(result);
                    shared
                });
                match made {
                    Some(result) => (result?, Outcome::Ran(reason)),
                    // Another stage made it (or failed to: then the build is stopping).
                    None => (
                        shared.clone().ok_or(SolveError::Cancelled)?,
                        Outcome::Cached,
                    ),
                }
            }
        };
        // Remembered only once the step succeeded, so the next miss compares with a build
        // that worked.
        fingerprint.layer = layer.as_ref().map(|layer| layer.diff_id.to_string());
        self.records
            .lock()
            .unwrap_or_else(|error| error.into_inner())
            .push((built.stage_index, key.clone(), layer.clone()));
        if !self.options.dry_run && !history_current && previous.as_ref() != Some(&fingerprint) {
            let bytes = serde_json::to_vec(&fingerprint).expect("fingerprints serialize");
            let _ = rbuild_cache::content::write_atomic(&history, &bytes);
        }
        if !self.options.dry_run && !same_key {
            let _ = rbuild_cache::content::write_atomic(&marker, key.to_string().as_bytes());
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
        let context =
            fs::canonicalize(&self.context).unwrap_or_else(|_| self.context.to_path_buf());
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
        // A layer unpacked before needs no blob.
        let needed: Vec<LayerRecord> = layers
            .iter()
            .filter(|layer| !snapshot::is_unpacked(&self.store, &layer.diff_id))
            .cloned()
            .collect();
        self.ensure_local(&needed)?;
        let mut directories = layers
            .iter()
            .map(|layer| snapshot::prepare(&self.store, &layer.target, &layer.diff_id))
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
        // Layers a build makes are kept as plain tars, as Docker's own store keeps them:
        // compressing 400 MB with gzip costs seconds a local build need not pay. (An export or
        // a push is where compression belongs; see the README.)
        let options = LayerOptions {
            source,
            source_date_epoch: self.options.source_date_epoch,
            compression: rbuild_cache::compression::Compression::None,
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
        // The tree is the layer's snapshot: adopt it rather than unpack the layer again. With
        // SOURCE_DATE_EPOCH the layer's mtimes are clamped and the tree's are not, so then the
        // snapshot is unpacked from the layer when needed, to match it exactly.
        if self.options.source_date_epoch.is_none() && !self.options.dry_run {
            snapshot::adopt(&self.store, &layer.diff_id, directory)?;
        }
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
    /// Predicting: the step is not in the cache, for this reason.
    WouldRun(String),
    ConfigOnly,
}

/// The stages a step reads, which must be built before it runs: what it copies from and
/// what its `RUN --mount`s read.
fn step_dependencies(step: &Step) -> Vec<usize> {
    match &step.op {
        Op::Copy(CopyOp {
            input: Input::Stage(index),
            ..
        }) => vec![*index],
        Op::Run(run) => run
            .mounts
            .iter()
            .filter_map(|mount| match mount.input {
                Some(Input::Stage(index)) => Some(index),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
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
