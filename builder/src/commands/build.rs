//! `rbuild build`: read the Dockerfile and `.dockerignore`, plan the build, and print the plan
//! (`--dry-run`) or run it with the solver, tag the image and write the `-o` outputs
//! ([`crate::export`]).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rbuild_cache::Store;
use rbuild_frontend::dockerignore::IgnoreMatcher;
use rbuild_frontend::graph::{Base, BuildGraph, Op, Vertex};
use rbuild_frontend::{PlanOptions, Platform};
use serde::Serialize;

use crate::cli::PlanFormat;
use crate::options::{BuildOptions, DockerfileSource, Status};
use crate::resolver::StoreImages;

/// Runs `rbuild build` and returns how the process ends.
pub fn run(options: &BuildOptions) -> Status {
    if !options.context.is_dir() {
        eprintln!(
            "error: the build context {} is not a directory",
            options.context.display()
        );
        return Status::Failure;
    }
    let (display_name, text) = match read_dockerfile(&options.dockerfile) {
        Ok(found) => found,
        Err(message) => {
            eprintln!("error: {message}");
            return Status::Failure;
        }
    };
    let ignore = match read_dockerignore(options) {
        Ok(ignore) => ignore,
        Err(message) => {
            eprintln!("error: {message}");
            return Status::Failure;
        }
    };
    let plan_options = PlanOptions {
        build_args: options.build_args.clone(),
        target: options.target.clone(),
        target_platform: options.platform.clone(),
        build_platform: Platform::host(),
    };
    // A dry run reads the store when there is one, and never creates it.
    let store = if !options.dry_run
        || options
            .root
            .join(rbuild_cache::store::LAYOUT_VERSION)
            .is_dir()
    {
        match Store::open(&options.root) {
            Ok(store) => Some(std::sync::Arc::new(store)),
            Err(error) => return super::image::fail(&error),
        }
    } else {
        None
    };
    // A build pulls a base image the store lacks; a dry run fetches nothing.
    let images = match (&store, options.dry_run) {
        (Some(store), false) => StoreImages::pulling(store),
        _ => StoreImages::new(store.as_deref()),
    };
    let graph = match rbuild_frontend::plan(&text, &plan_options, &images) {
        Ok(graph) => graph,
        Err(error) => {
            eprintln!("{}", error.render(&display_name, &text));
            return Status::Failure;
        }
    };
    let pull_failures = images.take_pull_failures();
    for (reference, error) in &pull_failures {
        let stage = graph
            .stages
            .iter()
            .find(|stage| matches!(&stage.base, Base::Image(base) if base == reference));
        match stage {
            Some(stage) => eprintln!(
                "error: {display_name}:{}: {}: base image {reference} is not in the store, and pulling it failed: {}",
                stage.location.start_line,
                stage.from_instruction,
                super::image::chain_text(error)
            ),
            None => eprintln!(
                "error: base image {reference} is not in the store, and pulling it failed: {}",
                super::image::chain_text(error)
            ),
        }
    }
    if !pull_failures.is_empty() {
        return Status::Failure;
    }
    for warning in &graph.warnings {
        eprintln!("warning: {warning}");
    }
    if !options.dry_run {
        let store = store.as_ref().expect("opened for a build");
        return build(
            options,
            store,
            &graph,
            &display_name,
            ignore.map(|(_, matcher)| matcher),
        );
    }
    // With a store, each step is looked up in its cache as a build would (nothing runs).
    let predictions = match &store {
        Some(store) => match crate::solver::predict(
            store.clone(),
            &graph,
            &display_name,
            &options.context,
            ignore.as_ref().map(|(_, matcher)| matcher.clone()),
            &solve_options(options),
        ) {
            Ok(reports) => Some(
                reports
                    .into_iter()
                    .map(|report| ((report.stage, report.position), report))
                    .collect(),
            ),
            Err(error) => {
                eprintln!("error: {}", super::image::chain_text(&error));
                return Status::Failure;
            }
        },
        None => None,
    };
    let plan = Plan::new(
        &display_name,
        &graph,
        ignore.as_ref(),
        &images,
        predictions.as_ref(),
    );
    let printed = match options.format {
        PlanFormat::Text => plan.text(),
        PlanFormat::Json => serde_json::to_string_pretty(&plan)
            .map(|json| json + "\n")
            .expect("plans serialize"),
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(printed.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Status::Success,
        // A closed pipe (`| head`) is not a failure of the build.
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Status::Success,
        Err(error) => {
            eprintln!("error: writing the plan: {error}");
            Status::Failure
        }
    }
}

fn read_dockerfile(source: &DockerfileSource) -> Result<(String, String), String> {
    let (name, bytes) = match source {
        DockerfileSource::Stdin => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .map_err(|error| format!("reading the Dockerfile from standard input: {error}"))?;
            ("Dockerfile".to_string(), bytes)
        }
        DockerfileSource::Path(path) => {
            let bytes = std::fs::read(path)
                .map_err(|error| format!("reading the Dockerfile {}: {error}", path.display()))?;
            (path.display().to_string(), bytes)
        }
    };
    match String::from_utf8(bytes) {
        Ok(text) => Ok((name, text)),
        Err(error) => {
            let valid = &error.as_bytes()[..error.utf8_error().valid_up_to()];
            let line = valid.iter().filter(|byte| **byte == b'\n').count() + 1;
            Err(format!("{name}:{line}: the Dockerfile is not valid UTF-8"))
        }
    }
}

/// BuildKit reads `<Dockerfile>.dockerignore` beside the Dockerfile first, then
/// `CONTEXT/.dockerignore`.
fn dockerignore_path(options: &BuildOptions) -> Option<PathBuf> {
    if let DockerfileSource::Path(path) = &options.dockerfile {
        let mut name = path.file_name()?.to_os_string();
        name.push(".dockerignore");
        let specific = path.with_file_name(name);
        if specific.is_file() {
            return Some(specific);
        }
    }
    let general = options.context.join(".dockerignore");
    general.is_file().then_some(general)
}

fn read_dockerignore(options: &BuildOptions) -> Result<Option<(PathBuf, IgnoreMatcher)>, String> {
    let Some(path) = dockerignore_path(options) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|error| format!("reading {}: {error}", path.display()))?;
    let matcher = IgnoreMatcher::from_dockerignore(&text)
        .map_err(|error| format!("{}: {error}", path.display()))?;
    Ok(Some((path, matcher)))
}

/// The plan as printed: stages and steps in dependency order.
#[derive(Serialize)]
struct Plan {
    dockerfile: String,
    target: String,
    dockerignore: Option<DockerignoreSummary>,
    stages: Vec<PlannedStage>,
    steps: Vec<PlannedStep>,
    warnings: Vec<String>,
}

#[derive(Serialize)]
struct DockerignoreSummary {
    path: String,
    patterns: usize,
}

#[derive(Serialize)]
struct PlannedStage {
    index: usize,
    name: String,
    base: String,
    platform: String,
    line: usize,
}

#[derive(Serialize)]
struct PlannedStep {
    /// `[stage k/n]`, as BuildKit labels steps (the FROM is step 1).
    label: String,
    instruction: String,
    line: usize,
    kind: &'static str,
    digest: Option<String>,
    /// What a build would do with this step now.
    prediction: String,
}

impl Plan {
    fn new(
        dockerfile: &str,
        graph: &BuildGraph,
        ignore: Option<&(PathBuf, IgnoreMatcher)>,
        images: &StoreImages<'_>,
        predictions: Option<&Predictions>,
    ) -> Self {
        let stages = graph
            .stages
            .iter()
            .map(|stage| PlannedStage {
                index: stage.index,
                name: stage.display_name(),
                base: graph.describe_base(&stage.base),
                platform: stage.platform.to_string(),
                line: stage.location.start_line,
            })
            .collect();
        let steps = graph
            .dependency_order()
            .into_iter()
            .map(|vertex| planned_step(graph, vertex, images, predictions))
            .collect();
        Self {
            dockerfile: dockerfile.to_string(),
            target: graph.target_stage().display_name(),
            dockerignore: ignore.map(|(path, matcher)| DockerignoreSummary {
                path: display(path),
                patterns: matcher.patterns().len(),
            }),
            stages,
            steps,
            warnings: graph.warnings.clone(),
        }
    }

    fn text(&self) -> String {
        let mut out = format!("plan for {} (target {})\n", self.dockerfile, self.target);
        if let Some(ignore) = &self.dockerignore {
            out.push_str(&format!(
                "context filter: {} ({} patterns)\n",
                ignore.path, ignore.patterns
            ));
        }
        for stage in &self.stages {
            out.push_str(&format!(
                "stage {} {}: from {} [{}] (line {})\n",
                stage.index, stage.name, stage.base, stage.platform, stage.line
            ));
        }
        let width = self
            .steps
            .iter()
            .map(|step| step.label.len())
            .max()
            .unwrap_or(0);
        for (number, step) in self.steps.iter().enumerate() {
            out.push_str(&format!(
                "#{:<3} {:<width$} {}\n      line {}: {}\n",
                number + 1,
                step.label,
                one_line(&step.instruction),
                step.line,
                step.prediction
            ));
        }
        out
    }
}

/// Predicted step reports by (stage, position).
type Predictions = std::collections::HashMap<(usize, usize), crate::solver::StepReport>;

fn planned_step(
    graph: &BuildGraph,
    vertex: Vertex,
    images: &StoreImages<'_>,
    predictions: Option<&Predictions>,
) -> PlannedStep {
    let (stage_index, position) = match vertex {
        Vertex::Base { stage } => (stage, 0),
        Vertex::Step { stage, step } => (stage, step + 1),
    };
    let stage = graph
        .stage(stage_index)
        .expect("vertices belong to kept stages");
    let label = format!(
        "[{} {}/{}]",
        stage.display_name(),
        position + 1,
        stage.steps.len() + 1
    );
    match graph.step(vertex) {
        None => PlannedStep {
            label,
            instruction: stage.from_instruction.clone(),
            line: stage.location.start_line,
            kind: "from",
            digest: Some(stage.base_digest.clone()),
            prediction: match &stage.base {
                Base::Scratch => "empty filesystem".to_string(),
                Base::Image(reference) => match images.lookup(reference) {
                    Some(image) => format!(
                        "base image {reference}: in the store ({}, id {})",
                        image.target.digest,
                        image.id().short()
                    ),
                    None => {
                        format!("base image {reference}: not in the store (a build would fetch it)")
                    }
                },
                Base::Stage(_) => "result of the stage it names".to_string(),
            },
        },
        Some(step) => {
            let kind = match &step.op {
                Op::Run(_) => "run",
                Op::Copy(copy) if copy.is_add => "add",
                Op::Copy(_) => "copy",
                Op::Workdir { .. } => "workdir",
                Op::Config(_) => "config",
            };
            let predicted =
                predictions.map(|predictions| predictions.get(&(stage_index, position)));
            let prediction = match (&step.op, predicted) {
                (Op::Config(_), _) => "image config only".to_string(),
                (_, None) => "would run: no build cache in this root yet".to_string(),
                (_, Some(None)) => "would run: a stage it needs could not be predicted".to_string(),
                (_, Some(Some(report))) => match &report.miss_reason {
                    Some(reason) => reason.clone(),
                    None => "CACHED".to_string(),
                },
            };
            let origin = if step.from_onbuild {
                " (ONBUILD trigger of the base)"
            } else {
                ""
            };
            PlannedStep {
                label,
                instruction: step.instruction.clone(),
                line: step.location.start_line,
                kind,
                digest: Some(step.digest.clone()),
                prediction: format!("{prediction}{origin}"),
            }
        }
    }
}

fn one_line(instruction: &str) -> String {
    const LIMIT: usize = 100;
    let flat: String = instruction
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= LIMIT {
        flat
    } else {
        format!("{}...", flat.chars().take(LIMIT).collect::<String>())
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// How to solve, from the command line.
fn solve_options(options: &BuildOptions) -> crate::solver::SolveOptions {
    use crate::cli::{NetworkArgument, ProgressArgument};
    use crate::solver::{ProgressMode, SolveOptions};
    let source_date_epoch = options
        .build_args
        .get("SOURCE_DATE_EPOCH")
        .cloned()
        .or_else(|| std::env::var("SOURCE_DATE_EPOCH").ok())
        .and_then(|text| text.parse::<i64>().ok());
    SolveOptions {
        no_cache: options.no_cache,
        default_network: match options.network {
            NetworkArgument::None => rbuild_executor::spec::Network::None,
            NetworkArgument::Default | NetworkArgument::Host => {
                rbuild_executor::spec::Network::Host
            }
        },
        source_date_epoch,
        progress: match options.progress {
            ProgressArgument::Quiet => ProgressMode::Quiet,
            ProgressArgument::Plain => ProgressMode::Plain,
            ProgressArgument::Tty => ProgressMode::Tty,
            ProgressArgument::Auto => {
                if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    ProgressMode::Tty
                } else {
                    ProgressMode::Plain
                }
            }
        },
        jobs: options.jobs.map_or_else(
            || std::thread::available_parallelism().map_or(2, usize::from),
            usize::from,
        ),
        secrets: options.secrets.clone(),
        dry_run: false,
        cache_from: options.cache_from.clone(),
        cache_to: options.cache_to.clone(),
    }
}

/// Runs the build, tags the image and writes the metadata file.
fn build(
    options: &BuildOptions,
    store: &std::sync::Arc<Store>,
    graph: &BuildGraph,
    display_name: &str,
    ignore: Option<IgnoreMatcher>,
) -> Status {
    use crate::solver::{self, ProgressMode};
    if let Err(message) = crate::export::check(&options.outputs) {
        eprintln!("error: {message}");
        return Status::Usage;
    }
    let solve_options = solve_options(options);
    let tags: Vec<rbuild_cache::Reference> = match options
        .tags
        .iter()
        .map(|tag| rbuild_cache::Reference::parse(tag))
        .collect()
    {
        Ok(tags) => tags,
        Err(error) => return super::image::fail(&error),
    };
    let started = std::time::Instant::now();
    let result = match solver::solve(
        store.clone(),
        graph,
        display_name,
        &options.context,
        ignore,
        &solve_options,
    ) {
        Ok(result) => result,
        Err(error) => {
            eprintln!("error: {}", super::image::chain_text(&error));
            return Status::Failure;
        }
    };
    if let Err(error) = solver::tag(store, &result, &tags) {
        return super::image::fail(&error);
    }
    if solve_options.progress != ProgressMode::Quiet {
        eprintln!(
            "#{} writing image {}",
            result.steps.len() + 1,
            result.image.digest
        );
        for tag in &tags {
            eprintln!("#{} naming to {tag}", result.steps.len() + 1);
        }
        eprintln!(
            "#{} DONE {:.1}s",
            result.steps.len() + 1,
            started.elapsed().as_secs_f64()
        );
    }
    let mut outputs = Vec::new();
    if !options.outputs.is_empty() {
        let mut exporter = match crate::export::Exporter::new(
            store,
            &result.image,
            &tags,
            solve_options.source_date_epoch,
        ) {
            Ok(exporter) => exporter,
            Err(error) => return super::image::fail(&error),
        };
        for (index, output) in options.outputs.iter().enumerate() {
            let number = result.steps.len() + 2 + index;
            let description = describe_output(output);
            if solve_options.progress != ProgressMode::Quiet {
                eprintln!("#{number} exporting to {description}");
            }
            let started = std::time::Instant::now();
            if let Err(error) = exporter.export(output) {
                eprintln!(
                    "error: exporting to {description}: {}",
                    super::image::chain_text(&error)
                );
                return Status::Failure;
            }
            if solve_options.progress != ProgressMode::Quiet {
                eprintln!("#{number} DONE {:.1}s", started.elapsed().as_secs_f64());
            }
            let mut entry = serde_json::json!({"type": output.kind()});
            match output {
                crate::options::Output::Image { name, .. } => entry["name"] = name.clone().into(),
                _ => {
                    if let Some(dest) = output.dest() {
                        entry["dest"] = display(dest).into();
                    }
                }
            }
            outputs.push(entry);
        }
    }
    if let Some(path) = &options.metadata_file {
        let steps: Vec<_> = result
            .steps
            .iter()
            .map(|step| {
                serde_json::json!({
                    "instruction": step.instruction,
                    "file": display_name,
                    "line": step.line,
                    "cached": step.cached,
                    "miss_reason": step.miss_reason,
                    "duration_s": step.duration,
                })
            })
            .collect();
        let metadata = serde_json::json!({
            "image": {"digest": result.image.digest, "config_digest": result.config_digest, "names": options.tags},
            "steps": steps,
            "outputs": outputs,
        });
        let bytes = serde_json::to_vec_pretty(&metadata).expect("json");
        // A bare file name has an empty parent, which write_atomic cannot fsync.
        let path = match path.parent() {
            Some(parent) if parent.as_os_str().is_empty() => Path::new(".").join(path),
            _ => path.clone(),
        };
        if let Err(error) = rbuild_cache::content::write_atomic(&path, &bytes) {
            return super::image::fail(&error);
        }
    }
    // With a tar on standard output, the digest would corrupt the stream.
    if !options
        .outputs
        .iter()
        .any(crate::options::Output::to_stdout)
    {
        println!("{}", result.image.digest);
    }
    Status::Success
}

/// `type=oci,dest=out.tar` for progress and errors.
fn describe_output(output: &crate::options::Output) -> String {
    match output {
        crate::options::Output::Image { name, push } => {
            format!(
                "type=image,name={name}{}",
                if *push { ",push=true" } else { "" }
            )
        }
        _ => match output.dest() {
            Some(dest) => format!("type={},dest={}", output.kind(), dest.display()),
            None => format!("type={}", output.kind()),
        },
    }
}
