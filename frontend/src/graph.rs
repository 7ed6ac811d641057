//! Layer 3: typed instructions → stages and steps, lowered into a petgraph DAG.
//!
//! This is where ARG scoping (global ARGs before the first FROM, re-declared in a stage,
//! `--build-arg` overrides, the predefined platform and proxy args), ENV state, WORKDIR, USER
//! and SHELL are tracked, and where the fields BuildKit expands are expanded. Every step gets a
//! deterministic digest of its definition and a digest chained over its filesystem inputs, so
//! identical work reached twice has one digest. `--target` prunes the graph to what the
//! target needs; cycles are errors.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt;

use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorKind, Location};
use crate::expand::{ExpandError, Lexer, VariableLookup};
use crate::instructions::{
    ArgDefinition, CacheSharing, Command, CopyOptions, FileCommand, Healthcheck, Instruction,
    Mount, MountType, NetworkMode, RunCommand, SecurityMode, parse_instruction,
};
use crate::parser::{self, Dockerfile};

/// Build arguments that are accepted without being declared, as Docker accepts them.
pub const PROXY_ARGS: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// The shell for shell-form commands when SHELL has not set one.
pub const DEFAULT_SHELL: &[&str] = &["/bin/sh", "-c"];

/// Where heredoc scripts with a shebang are mounted for RUN, as BuildKit does.
pub const SCRIPT_MOUNT_DIRECTORY: &str = "/dev/pipes";

/// `--chmod` octal: digits, at most 0o7777.
fn is_octal_mode(mode: &str) -> bool {
    !mode.is_empty() && u32::from_str_radix(mode, 8).is_ok_and(|value| value <= 0o7777)
}

/// `--chmod` symbolic, chmod(1)'s grammar: comma-separated `[ugoa]*([-+=]([rwxXst]*|[ugo]))+`
/// (the solver applies it per file).
fn is_symbolic_mode(mode: &str) -> bool {
    mode.split(',').all(|clause| {
        let actions = clause.trim_start_matches(['u', 'g', 'o', 'a']);
        actions.starts_with(['+', '-', '=']) && {
            actions.split(['+', '-', '=']).skip(1).all(|permissions| {
                matches!(permissions, "u" | "g" | "o")
                    || permissions.chars().all(|letter| "rwxXst".contains(letter))
            })
        }
    })
}

/// An OS/architecture/variant triple (`linux/arm64/v8`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`, ...
    pub architecture: String,
    /// `v7`, `v8`, or none.
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this binary was built for (and so runs on).
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "arm" => "arm",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            other => other,
        };
        Self {
            os: std::env::consts::OS.to_string(),
            architecture: architecture.to_string(),
            variant: None,
        }
    }

    /// Parses `os[/arch[/variant]]`; a missing architecture means the host's.
    pub fn parse(text: &str) -> Result<Self, ErrorKind> {
        let parts: Vec<&str> = text.split('/').collect();
        let valid = |part: &&str| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if parts.is_empty() || parts.len() > 3 || !parts.iter().all(valid) {
            return Err(ErrorKind::InvalidPlatform(text.to_string()));
        }
        let host = Self::host();
        Ok(Self {
            os: parts[0].to_lowercase(),
            architecture: parts
                .get(1)
                .map_or(host.architecture, |arch| arch.to_lowercase()),
            variant: parts.get(2).map(|variant| variant.to_lowercase()),
        })
    }
}

impl Platform {
    /// containerd's normalization, which BuildKit applies to the requested platform: the
    /// common architecture aliases, `arm64/v8` and `amd64/v1` without their default variant,
    /// and `arm` with its default `v7`.
    pub fn normalized(&self) -> Self {
        let (architecture, variant) = match (self.architecture.as_str(), self.variant.as_deref()) {
            ("x86_64" | "x86-64" | "amd64", Some("v1")) | ("x86_64" | "x86-64", None) => {
                ("amd64", None)
            }
            ("aarch64" | "arm64", Some("v8") | None) => ("arm64", None),
            ("aarch64", Some(variant)) => ("arm64", Some(variant)),
            ("armhf", _) => ("arm", Some("v7")),
            ("armel", _) => ("arm", Some("v6")),
            ("arm", None) => ("arm", Some("v7")),
            ("i386", variant) => ("386", variant),
            (architecture, variant) => (architecture, variant),
        };
        Self {
            os: self.os.clone(),
            architecture: architecture.to_string(),
            variant: variant.map(str::to_string),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(formatter, "/{variant}")?;
        }
        Ok(())
    }
}

/// What planning needs from the command line.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// `--build-arg` values (bare `KEY` already resolved from the environment).
    pub build_args: BTreeMap<String, String>,
    /// `--target`: the stage to build; the last stage when `None`.
    pub target: Option<String>,
    /// The platform the image is built for.
    pub target_platform: Platform,
    /// The platform the build runs on.
    pub build_platform: Platform,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            build_args: BTreeMap::new(),
            target: None,
            target_platform: Platform::host(),
            build_platform: Platform::host(),
        }
    }
}

/// What the frontend needs to know of a base image. The builder supplies it (from the store
/// or a registry); the frontend does no I/O itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BaseImageConfig {
    /// `Env` of the image config, in order.
    pub env: Vec<(String, String)>,
    /// `WorkingDir`.
    pub working_dir: Option<String>,
    /// `User`.
    pub user: Option<String>,
    /// `Shell` (Docker's extension).
    pub shell: Option<Vec<String>>,
    /// `OnBuild` triggers, run when the image is used as a base.
    pub onbuild: Vec<String>,
}

/// Looks base images up while planning.
pub trait ImageResolver {
    /// The config of `reference` for `platform`, or `None` when it is not known (yet).
    fn resolve(&self, reference: &str, platform: &Platform) -> Option<BaseImageConfig>;
}

/// A resolver that knows no image: planning without a store.
pub struct NoImages;

impl ImageResolver for NoImages {
    fn resolve(&self, _reference: &str, _platform: &Platform) -> Option<BaseImageConfig> {
        None
    }
}

/// Where a stage starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "lowercase")]
pub enum Base {
    /// `FROM scratch`: an empty filesystem.
    Scratch,
    /// An image reference (resolved by the builder: local store, then registry).
    Image(String),
    /// An earlier stage, by index.
    Stage(usize),
}

/// Where files for a COPY or a `RUN --mount` come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "lowercase")]
pub enum Input {
    /// The build context.
    Context,
    /// Another stage's result, by index.
    Stage(usize),
    /// An image, by reference.
    Image(String),
}

/// A RUN, lowered: what to execute and in what environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunOp {
    /// The argv to execute (shell prepended for shell form).
    pub arguments: Vec<String>,
    /// Scripts from heredocs with a shebang, mounted read-only under [`SCRIPT_MOUNT_DIRECTORY`].
    pub script_files: Vec<ScriptFile>,
    /// The environment: build args in scope, then ENV (ENV wins).
    pub env: Vec<(String, String)>,
    /// The predefined proxy args (`HTTP_PROXY`, ...) given with `--build-arg` and not declared
    /// with ARG: in the environment, but, as in BuildKit, not in the cache key or the history.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub proxy_env: Vec<(String, String)>,
    /// The names of the build args declared in the stage, for the history's `|N NAME=value`
    /// (their values are in `env`).
    #[serde(skip)]
    pub build_args: Vec<String>,
    /// USER in effect.
    pub user: Option<String>,
    /// WORKDIR in effect.
    pub working_dir: String,
    /// `--mount`s, expanded, with their file sources.
    pub mounts: Vec<MountOp>,
    /// `--network`.
    pub network: NetworkMode,
    /// `--security`.
    pub security: SecurityMode,
}

/// A script file made from a heredoc.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ScriptFile {
    /// Path inside the container.
    pub path: String,
    /// The content.
    pub content: String,
}

/// A `RUN --mount`, expanded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MountOp {
    /// The mount's options, strings expanded and defaults applied.
    pub mount: Mount,
    /// Where a bind or cache mount's `source` comes from, when it reads files.
    pub input: Option<Input>,
}

/// A COPY or ADD, lowered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CopyOp {
    /// ADD rather than COPY (URLs, archive unpacking, git).
    pub is_add: bool,
    /// Where the sources are read.
    pub input: Input,
    /// Source paths or URLs, expanded.
    pub sources: Vec<String>,
    /// Heredoc sources: (file name, content), content expanded when its delimiter was unquoted.
    pub inline_sources: Vec<(String, String)>,
    /// The destination, made absolute against WORKDIR (a trailing `/` is kept).
    pub destination: String,
    /// The COPY/ADD flags, with `--chown`, `--chmod`, `--exclude` and `--checksum` expanded.
    #[serde(flatten)]
    pub options: CopyOptions,
    /// USER in effect (ownership defaults follow `--chown` only, as in BuildKit).
    pub user: Option<String>,
}

/// A change to the image config that writes no files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "lowercase")]
pub enum ConfigChange {
    /// ENV, expanded.
    Env(Vec<(String, String)>),
    /// LABEL, expanded.
    Label(Vec<(String, String)>),
    /// ARG: the names declared (their values reach RUN steps through their environment).
    Arg(Vec<String>),
    /// USER, expanded.
    User(String),
    /// EXPOSE, expanded and split, `/tcp` added where no protocol is given.
    Expose(Vec<String>),
    /// VOLUME, expanded.
    Volume(Vec<String>),
    /// CMD, shell prepended for shell form.
    Cmd(Vec<String>),
    /// ENTRYPOINT, shell prepended for shell form.
    Entrypoint(Vec<String>),
    /// SHELL.
    Shell(Vec<String>),
    /// STOPSIGNAL, expanded.
    StopSignal(String),
    /// HEALTHCHECK.
    Healthcheck(Healthcheck),
    /// ONBUILD: the trigger text.
    Onbuild(String),
    /// MAINTAINER: the image author.
    Maintainer(String),
}

/// What a step does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    /// Run a command in the sandbox.
    Run(RunOp),
    /// Copy files in.
    Copy(CopyOp),
    /// Create the working directory and make it the default.
    Workdir {
        /// The absolute path.
        path: String,
    },
    /// Change the image config only.
    Config(ConfigChange),
}

impl Op {
    /// Whether the step changes the filesystem (and so makes a layer).
    pub fn changes_filesystem(&self) -> bool {
        !matches!(self, Op::Config(_))
    }
}

/// One step of a stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    /// The operation, fully expanded.
    pub op: Op,
    /// The instruction as written.
    pub instruction: String,
    /// Where it was written.
    pub location: Location,
    /// It came from an ONBUILD trigger of the base.
    pub from_onbuild: bool,
    /// sha256 of the op's definition alone.
    pub definition_digest: String,
    /// sha256 of the definition chained with the digests of its filesystem inputs: equal
    /// digests mean identical work.
    pub digest: String,
}

/// A build stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stage {
    /// Position in the Dockerfile (0-based), stable under `--target` pruning.
    pub index: usize,
    /// `AS name`, lower-cased.
    pub name: Option<String>,
    /// What it starts from, expanded.
    pub base: Base,
    /// The FROM as written.
    pub from_instruction: String,
    /// The platform it builds for.
    pub platform: Platform,
    /// Where the FROM was written.
    pub location: Location,
    /// Whether the base image's config was known while planning (ENV from the base image can
    /// only be expanded when it was).
    pub base_config_known: bool,
    /// The digest of the base: what the first step builds on.
    pub base_digest: String,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The digest of the filesystem the stage ends with.
    pub result_digest: String,
}

impl Stage {
    /// `name` if the stage has one, else `stage-N`, as BuildKit names stages.
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", self.index))
    }
}

/// A vertex of the build graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Vertex {
    /// The FROM of a stage (by stage index).
    Base {
        /// Stage index.
        stage: usize,
    },
    /// A step (by stage index and position in the stage).
    Step {
        /// Stage index.
        stage: usize,
        /// Position in the stage.
        step: usize,
    },
}

/// Why one vertex waits for another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dependency {
    /// The previous step of the same stage.
    Parent,
    /// `FROM <stage>`.
    StageBase,
    /// `COPY --from=<stage>`.
    CopySource,
    /// `RUN --mount=from=<stage>`.
    MountSource,
}

/// The planned build: stages the target needs and the DAG of their vertices.
#[derive(Clone, Debug)]
pub struct BuildGraph {
    /// The parser directives of the Dockerfile.
    pub directives: parser::Directives,
    /// The stages the target needs, in file order.
    pub stages: Vec<Stage>,
    /// The stage index of the target.
    pub target: usize,
    /// Dependencies: an edge runs from what is needed to what needs it.
    pub graph: DiGraph<Vertex, Dependency>,
    /// Warnings: unused build args, empty continuation lines.
    pub warnings: Vec<String>,
}

impl BuildGraph {
    /// The stage with index `index`, if the target needs it.
    pub fn stage(&self, index: usize) -> Option<&Stage> {
        self.stages.iter().find(|stage| stage.index == index)
    }

    /// The target stage.
    pub fn target_stage(&self) -> &Stage {
        self.stage(self.target)
            .expect("the target stage is always kept")
    }

    /// Vertices in dependency order: each after everything it needs; among the ready ones,
    /// the earliest stage and step first, so the order is deterministic.
    pub fn dependency_order(&self) -> Vec<Vertex> {
        let mut remaining: Vec<usize> = self
            .graph
            .node_indices()
            .map(|node| self.graph.edges_directed(node, Direction::Incoming).count())
            .collect();
        // Among ready vertices, the earliest stage and step first: stages read top to bottom.
        let key = |vertex: Vertex| match vertex {
            Vertex::Base { stage } => (stage, 0),
            Vertex::Step { stage, step } => (stage, step + 1),
        };
        let mut ready: BinaryHeap<Reverse<((usize, usize), usize)>> = self
            .graph
            .node_indices()
            .filter(|node| remaining[node.index()] == 0)
            .map(|node| Reverse((key(self.graph[node]), node.index())))
            .collect();
        let mut order = Vec::with_capacity(self.graph.node_count());
        while let Some(Reverse((_, index))) = ready.pop() {
            order.push(self.graph[NodeIndex::new(index)]);
            for edge in self
                .graph
                .edges_directed(NodeIndex::new(index), Direction::Outgoing)
            {
                let target = edge.target().index();
                remaining[target] -= 1;
                if remaining[target] == 0 {
                    ready.push(Reverse((key(self.graph[edge.target()]), target)));
                }
            }
        }
        order
    }

    /// A readable, deterministic account of the plan (no digests): the target, each needed
    /// stage with its base and steps, and the dependency order. Golden tests compare it.
    pub fn describe(&self) -> String {
        let mut out = format!("target: {}\n", self.target_stage().display_name());
        for stage in &self.stages {
            let base = self.describe_base(&stage.base);
            out.push_str(&format!(
                "stage {} {} (line {}): from {base} [{}]\n",
                stage.index,
                stage.display_name(),
                stage.location.start_line,
                stage.platform
            ));
            for (position, step) in stage.steps.iter().enumerate() {
                let onbuild = if step.from_onbuild { " (onbuild)" } else { "" };
                out.push_str(&format!(
                    "  {}/{} line {}{onbuild}: {}\n",
                    position + 1,
                    stage.steps.len(),
                    step.location.start_line,
                    describe_op(&step.op)
                ));
            }
        }
        let order: Vec<String> = self
            .dependency_order()
            .into_iter()
            .map(|vertex| match vertex {
                Vertex::Base { stage } => format!("{stage}:from"),
                Vertex::Step { stage, step } => format!("{stage}:{}", step + 1),
            })
            .collect();
        out.push_str(&format!("order: {}\n", order.join(" ")));
        for warning in &self.warnings {
            out.push_str(&format!("warning: {warning}\n"));
        }
        out
    }

    /// `scratch`, `image REF` or `stage NAME`.
    pub fn describe_base(&self, base: &Base) -> String {
        match base {
            Base::Scratch => "scratch".to_string(),
            Base::Image(reference) => format!("image {reference}"),
            Base::Stage(index) => format!(
                "stage {}",
                self.stage(*index)
                    .map_or_else(|| index.to_string(), Stage::display_name)
            ),
        }
    }

    /// The step a vertex names, if it is a step.
    pub fn step(&self, vertex: Vertex) -> Option<&Step> {
        match vertex {
            Vertex::Step { stage, step } => {
                self.stage(stage).and_then(|stage| stage.steps.get(step))
            }
            Vertex::Base { .. } => None,
        }
    }
}

/// Parses, types and plans a Dockerfile in one call.
pub fn plan(
    text: &str,
    options: &PlanOptions,
    images: &dyn ImageResolver,
) -> Result<BuildGraph, Error> {
    let dockerfile = parser::parse(text)?;
    build_graph(&dockerfile, options, images)
}

/// Lowers a parsed Dockerfile into the build graph.
pub fn build_graph(
    dockerfile: &Dockerfile,
    options: &PlanOptions,
    images: &dyn ImageResolver,
) -> Result<BuildGraph, Error> {
    let instructions = dockerfile
        .nodes
        .iter()
        .map(parse_instruction)
        .collect::<Result<Vec<_>, _>>()?;
    let mut planner = Planner::new(dockerfile.directives.escape_token, options, images);
    planner.plan(&instructions)?;
    planner.finish(dockerfile)
}

/// The part of a stage's state that later stages built `FROM` it inherit.
#[derive(Clone, Debug, Default)]
struct Inherited {
    /// The image config's environment: first-set order, latest value.
    env: Vec<(String, String)>,
    /// Every variable assignment expansion sees, oldest first (the latest wins): the base's
    /// environment, then each ENV and each ARG with a value, in the order they happen. So an
    /// ARG after an ENV of the same name wins, and a stage built FROM another inherits its
    /// ARGs, as in BuildKit.
    scope: Vec<(String, String)>,
    /// The names of the ARGs with a value declared in this stage (or the stage it is built
    /// from), first-declared order: BuildKit's `|N NAME=value` prefix of RUN's history.
    args: Vec<String>,
    working_dir: String,
    user: Option<String>,
    shell: Option<Vec<String>>,
    onbuild: Vec<String>,
}

/// A stage read by another: (stage read, the reading step or `None` for FROM, why).
type StageDependency = (usize, Option<usize>, Dependency);

struct StageDraft {
    stage: Stage,
    inherited: Inherited,
    /// Stages this one reads (for the graph), with the step that reads them.
    dependencies: Vec<StageDependency>,
    /// A planning error in this stage, reported only if the target needs the stage.
    error: Option<Error>,
}

struct Planner<'a> {
    lexer: Lexer,
    options: &'a PlanOptions,
    images: &'a dyn ImageResolver,
    /// Predefined platform args, then global ARGs, with their values.
    global_args: Vec<(String, Option<String>)>,
    stages: Vec<StageDraft>,
    /// Every stage's name (`AS name`) by index, known before lowering so that `COPY --from`
    /// may name a stage defined later, as BuildKit allows.
    stage_names: Vec<Option<String>>,
    /// Every ARG name declared anywhere, for the unused-build-arg warning.
    declared_args: BTreeSet<String>,
}

impl<'a> Planner<'a> {
    fn new(escape_token: char, options: &'a PlanOptions, images: &'a dyn ImageResolver) -> Self {
        // The requested platforms are normalized as BuildKit does (`linux/arm64/v8` is
        // `linux/arm64`); a stage's own `FROM --platform` is taken as written.
        let target = &options.target_platform.normalized();
        let build = &options.build_platform.normalized();
        let platform_args = [
            ("TARGETPLATFORM", target.to_string()),
            ("TARGETOS", target.os.clone()),
            ("TARGETARCH", target.architecture.clone()),
            ("TARGETVARIANT", target.variant.clone().unwrap_or_default()),
            ("BUILDPLATFORM", build.to_string()),
            ("BUILDOS", build.os.clone()),
            ("BUILDARCH", build.architecture.clone()),
            ("BUILDVARIANT", build.variant.clone().unwrap_or_default()),
        ];
        Self {
            lexer: Lexer::new(escape_token),
            options,
            images,
            global_args: platform_args
                .into_iter()
                .map(|(name, value)| (name.to_string(), Some(value)))
                .collect(),
            stages: Vec::new(),
            stage_names: Vec::new(),
            declared_args: BTreeSet::new(),
        }
    }

    fn plan(&mut self, instructions: &[Instruction]) -> Result<(), Error> {
        self.stage_names = instructions
            .iter()
            .filter_map(|instruction| match &instruction.command {
                Command::From(from) => Some(from.name.clone()),
                _ => None,
            })
            .collect();
        for instruction in instructions {
            match (&instruction.command, self.stages.last()) {
                (Command::From(_), _) => self.start_stage(instruction)?,
                (Command::Arg(definitions), None) => self.global_arg(instruction, definitions)?,
                (_, None) => {
                    return Err(Error::at(
                        ErrorKind::InstructionBeforeFrom(instruction.command.name().to_string()),
                        instruction.location,
                        instruction.original.as_str(),
                    ));
                }
                (_, Some(draft)) if draft.error.is_some() => {}
                (command, Some(_)) => {
                    if let Err(error) = self.add_step(instruction, command, false) {
                        self.stages.last_mut().expect("a stage").error = Some(error);
                    }
                }
            }
        }
        if self.stages.is_empty() {
            let location = instructions
                .last()
                .map_or(Location::line(1), |instruction| instruction.location);
            return Err(Error::at_line(
                ErrorKind::Arguments("no build stage in the Dockerfile: it needs a FROM".into()),
                location,
            ));
        }
        Ok(())
    }

    /// Expands `word` with `variables`, naming the instruction on failure.
    fn expand(
        &self,
        word: &str,
        variables: &[(String, String)],
        instruction: &Instruction,
    ) -> Result<String, Error> {
        self.lexer
            .expand_word(word, &variables)
            .map_err(|error| Self::expansion_error(instruction, error))
    }

    fn expansion_error(instruction: &Instruction, error: ExpandError) -> Error {
        Error::at(
            ErrorKind::Expansion(Box::new(error)),
            instruction.location,
            instruction.original.as_str(),
        )
    }

    fn global_arg(
        &mut self,
        instruction: &Instruction,
        definitions: &[ArgDefinition],
    ) -> Result<(), Error> {
        for definition in definitions {
            self.declared_args.insert(definition.name.clone());
            let value = match self.options.build_args.get(&definition.name) {
                Some(value) => Some(value.clone()),
                None => match &definition.default {
                    Some(default) => Some(
                        self.lexer
                            .expand_word(default, &ArgValues(&self.global_args))
                            .map_err(|error| Self::expansion_error(instruction, error))?,
                    ),
                    None => None,
                },
            };
            self.global_args.push((definition.name.clone(), value));
        }
        Ok(())
    }

    fn start_stage(&mut self, instruction: &Instruction) -> Result<(), Error> {
        let Command::From(from) = &instruction.command else {
            unreachable!("start_stage is called for FROM")
        };
        let index = self.stages.len();
        let error_at = |kind| Error::at(kind, instruction.location, instruction.original.as_str());
        let global = ArgValues(&self.global_args);
        let image = self
            .lexer
            .expand_word(&from.image, &global)
            .map_err(|error| Self::expansion_error(instruction, error))?;
        if image.is_empty() {
            return Err(error_at(ErrorKind::BlankBaseName(from.image.clone())));
        }
        let platform = match &from.platform {
            Some(text) => {
                let expanded = self
                    .lexer
                    .expand_word(text, &global)
                    .map_err(|error| Self::expansion_error(instruction, error))?;
                Platform::parse(&expanded).map_err(error_at)?
            }
            None => self.options.target_platform.normalized(),
        };
        if let Some(name) = &from.name
            && self
                .stages
                .iter()
                .any(|draft| draft.stage.name.as_deref() == Some(name))
        {
            return Err(error_at(ErrorKind::DuplicateStageName(name.clone())));
        }
        let earlier = self
            .stages
            .iter()
            .position(|draft| draft.stage.name.as_deref() == Some(image.to_lowercase().as_str()));
        let (base, inherited, base_config_known, dependencies) = match earlier {
            Some(stage_index) => {
                let parent = &self.stages[stage_index];
                (
                    Base::Stage(stage_index),
                    parent.inherited.clone(),
                    parent.stage.base_config_known,
                    vec![(stage_index, None, Dependency::StageBase)],
                )
            }
            None if image.eq_ignore_ascii_case("scratch") => (
                Base::Scratch,
                Inherited {
                    working_dir: "/".into(),
                    ..Inherited::default()
                },
                true,
                Vec::new(),
            ),
            None => {
                let config = self.images.resolve(&image, &platform);
                let known = config.is_some();
                let config = config.unwrap_or_default();
                let inherited = Inherited {
                    scope: config.env.clone(),
                    args: Vec::new(),
                    env: config.env,
                    working_dir: config
                        .working_dir
                        .filter(|dir| !dir.is_empty())
                        .unwrap_or_else(|| "/".into()),
                    user: config.user.filter(|user| !user.is_empty()),
                    shell: config.shell.filter(|shell| !shell.is_empty()),
                    onbuild: config.onbuild,
                };
                (Base::Image(image.clone()), inherited, known, Vec::new())
            }
        };
        let triggers = inherited.onbuild.clone();
        let draft = StageDraft {
            stage: Stage {
                index,
                name: from.name.clone(),
                base,
                from_instruction: instruction.original.clone(),
                platform,
                location: instruction.location,
                base_config_known,
                base_digest: String::new(),
                steps: Vec::new(),
                result_digest: String::new(),
            },
            inherited: Inherited {
                onbuild: Vec::new(),
                ..inherited
            },
            dependencies,
            error: None,
        };
        self.stages.push(draft);
        for trigger in triggers {
            if let Err(error) = self.add_trigger(instruction, &trigger) {
                self.stages.last_mut().expect("a stage").error = Some(error);
                break;
            }
        }
        Ok(())
    }

    /// Runs one ONBUILD trigger of the base at the start of the stage, as Docker does.
    fn add_trigger(&mut self, from: &Instruction, trigger: &str) -> Result<(), Error> {
        let parsed = parser::parse(&format!("{trigger}\n")).map_err(|mut error| {
            error.location = Some(from.location);
            error.instruction = Some(format!("ONBUILD {trigger}"));
            error
        })?;
        for node in &parsed.nodes {
            let mut instruction = parse_instruction(node).map_err(|mut error| {
                error.location = Some(from.location);
                error
            })?;
            instruction.location = from.location;
            if matches!(
                instruction.command,
                Command::From(_) | Command::Onbuild(_) | Command::Maintainer(_)
            ) {
                return Err(Error::at(
                    ErrorKind::OnbuildNotAllowed(instruction.command.name().to_string()),
                    from.location,
                    format!("ONBUILD {trigger}"),
                ));
            }
            let command = instruction.command.clone();
            self.add_step(&instruction, &command, true)?;
        }
        Ok(())
    }

    /// The variables expansion sees in the current stage (the latest assignment wins).
    fn stage_variables(draft: &StageDraft) -> Vec<(String, String)> {
        draft.inherited.scope.clone()
    }

    fn add_step(
        &mut self,
        instruction: &Instruction,
        command: &Command,
        from_onbuild: bool,
    ) -> Result<(), Error> {
        let draft_index = self.stages.len() - 1;
        let variables = Self::stage_variables(&self.stages[draft_index]);
        let lexer = self.lexer.clone();
        let expand = |word: &str| -> Result<String, Error> {
            lexer
                .expand_word(word, &variables.as_slice())
                .map_err(|error| Self::expansion_error(instruction, error))
        };
        let error_at = |kind| Error::at(kind, instruction.location, instruction.original.as_str());
        let mut new_dependencies: Vec<(usize, Dependency)> = Vec::new();

        let op = match command {
            Command::From(_) => unreachable!("FROM starts a stage"),
            Command::Run(run) => {
                let (op, sources) = self.lower_run(run, draft_index, &variables, instruction)?;
                new_dependencies.extend(
                    sources
                        .into_iter()
                        .map(|stage| (stage, Dependency::MountSource)),
                );
                Op::Run(op)
            }
            Command::Copy(file) | Command::Add(file) => {
                let is_add = matches!(command, Command::Add(_));
                let op = self.lower_copy(file, is_add, draft_index, &variables, instruction)?;
                if let Input::Stage(stage) = op.input {
                    new_dependencies.push((stage, Dependency::CopySource));
                }
                Op::Copy(op)
            }
            Command::Workdir(path) => {
                let expanded = expand(path)?;
                let draft = &mut self.stages[draft_index];
                let path = join_path(&draft.inherited.working_dir, &expanded);
                draft.inherited.working_dir = path.clone();
                Op::Workdir { path }
            }
            Command::Env(pairs) => {
                let mut expanded = Vec::with_capacity(pairs.len());
                // Each assignment sees the ones before it on the same line, as in BuildKit.
                let mut scope = variables.clone();
                for pair in pairs {
                    let key = self.expand(&pair.key, &scope, instruction)?;
                    let value = self.expand(&pair.value, &scope, instruction)?;
                    scope.push((key.clone(), value.clone()));
                    expanded.push((key, value));
                }
                let inherited = &mut self.stages[draft_index].inherited;
                for (key, value) in &expanded {
                    match inherited
                        .env
                        .iter_mut()
                        .find(|(existing, _)| existing == key)
                    {
                        Some(entry) => entry.1 = value.clone(),
                        None => inherited.env.push((key.clone(), value.clone())),
                    }
                    inherited.scope.push((key.clone(), value.clone()));
                }
                Op::Config(ConfigChange::Env(expanded))
            }
            Command::Label(pairs) => Op::Config(ConfigChange::Label(
                pairs
                    .iter()
                    .map(|pair| Ok((expand(&pair.key)?, expand(&pair.value)?)))
                    .collect::<Result<Vec<_>, Error>>()?,
            )),
            Command::Arg(definitions) => {
                let mut names = Vec::with_capacity(definitions.len());
                for definition in definitions {
                    self.declared_args.insert(definition.name.clone());
                    let value = match self.options.build_args.get(&definition.name) {
                        Some(value) => Some(value.clone()),
                        None => match &definition.default {
                            Some(default) => {
                                let scope = Self::stage_variables(&self.stages[draft_index]);
                                Some(self.expand(default, &scope, instruction)?)
                            }
                            None => self
                                .global_args
                                .iter()
                                .rev()
                                .find(|(name, _)| *name == definition.name)
                                .and_then(|(_, value)| value.clone()),
                        },
                    };
                    if let Some(value) = value {
                        let inherited = &mut self.stages[draft_index].inherited;
                        inherited.scope.push((definition.name.clone(), value));
                        if !inherited.args.contains(&definition.name) {
                            inherited.args.push(definition.name.clone());
                        }
                    }
                    names.push(definition.name.clone());
                }
                Op::Config(ConfigChange::Arg(names))
            }
            Command::User(user) => {
                let user = expand(user)?;
                self.stages[draft_index].inherited.user =
                    Some(user.clone()).filter(|user| !user.is_empty());
                Op::Config(ConfigChange::User(user))
            }
            Command::Expose(ports) => {
                let mut expanded = Vec::new();
                for port in ports {
                    let words = self
                        .lexer
                        .expand_words(port, &variables.as_slice())
                        .map_err(|error| Self::expansion_error(instruction, error))?;
                    for word in words {
                        expanded.push(normalize_port(&word).map_err(error_at)?);
                    }
                }
                Op::Config(ConfigChange::Expose(expanded))
            }
            Command::Volume(paths) => {
                let mut expanded = Vec::with_capacity(paths.len());
                for path in paths {
                    let path = expand(path)?;
                    if path.trim().is_empty() {
                        return Err(error_at(ErrorKind::Arguments(
                            "VOLUME specified can not be an empty string".into(),
                        )));
                    }
                    expanded.push(path);
                }
                Op::Config(ConfigChange::Volume(expanded))
            }
            Command::Cmd(line) => Op::Config(ConfigChange::Cmd(self.with_shell(
                draft_index,
                line.prepend_shell,
                &line.arguments,
            ))),
            Command::Entrypoint(line) => Op::Config(ConfigChange::Entrypoint(self.with_shell(
                draft_index,
                line.prepend_shell,
                &line.arguments,
            ))),
            Command::Shell(shell) => {
                self.stages[draft_index].inherited.shell = Some(shell.clone());
                Op::Config(ConfigChange::Shell(shell.clone()))
            }
            Command::StopSignal(signal) => {
                let signal = expand(signal)?;
                validate_signal(&signal).map_err(error_at)?;
                Op::Config(ConfigChange::StopSignal(signal))
            }
            Command::Healthcheck(check) => Op::Config(ConfigChange::Healthcheck(check.clone())),
            Command::Onbuild(onbuild) => {
                self.stages[draft_index]
                    .inherited
                    .onbuild
                    .push(onbuild.expression.clone());
                Op::Config(ConfigChange::Onbuild(onbuild.expression.clone()))
            }
            Command::Maintainer(name) => Op::Config(ConfigChange::Maintainer(name.clone())),
        };

        let draft = &mut self.stages[draft_index];
        let step_index = draft.stage.steps.len();
        for (stage, dependency) in new_dependencies {
            draft
                .dependencies
                .push((stage, Some(step_index), dependency));
        }
        // Undeclared proxy args reach the process but not the key (BuildKit's rule).
        let definition_digest = match &op {
            Op::Run(run) if !run.proxy_env.is_empty() => {
                let mut keyed = run.clone();
                keyed.proxy_env.clear();
                digest_of(&("rbuild-step-v1", &Op::Run(keyed)))
            }
            _ => digest_of(&("rbuild-step-v1", &op)),
        };
        draft.stage.steps.push(Step {
            definition_digest,
            digest: String::new(),
            op,
            instruction: instruction.original.clone(),
            location: instruction.location,
            from_onbuild,
        });
        Ok(())
    }

    fn with_shell(
        &self,
        draft_index: usize,
        prepend_shell: bool,
        arguments: &[String],
    ) -> Vec<String> {
        if !prepend_shell {
            return arguments.to_vec();
        }
        let mut out = self.shell(draft_index);
        out.extend(arguments.iter().cloned());
        out
    }

    fn shell(&self, draft_index: usize) -> Vec<String> {
        self.stages[draft_index]
            .inherited
            .shell
            .clone()
            .unwrap_or_else(|| DEFAULT_SHELL.iter().map(|part| part.to_string()).collect())
    }

    /// Resolves `--from` / `from=`: a stage name, a stage index, or else an image.
    /// Resolves `--from` / `from=`: a stage name or index (defined before this stage, as
    /// BuildKit requires), or else an image reference.
    fn resolve_input(
        &self,
        reference: &str,
        draft_index: usize,
        instruction: &Instruction,
        mount: bool,
    ) -> Result<Input, Error> {
        let error_at = |kind| Error::at(kind, instruction.location, instruction.original.as_str());
        let index = match reference.parse::<usize>() {
            Ok(index) if index >= self.stage_names.len() => {
                return Err(error_at(ErrorKind::StageIndexOutOfRange {
                    index,
                    available: draft_index,
                }));
            }
            Ok(index) => Some(index),
            Err(_) => {
                let lower = reference.to_lowercase();
                self.stage_names
                    .iter()
                    .position(|name| name.as_deref() == Some(lower.as_str()))
            }
        };
        let stage_name = |index: usize| {
            self.stage_names[index]
                .clone()
                .unwrap_or_else(|| format!("stage-{index}"))
        };
        match index {
            Some(index) if index == draft_index => {
                Err(error_at(ErrorKind::CircularDependency(stage_name(index))))
            }
            Some(index) if index > draft_index => Err(error_at(ErrorKind::StageDefinedLater {
                reference: reference.to_string(),
                current: stage_name(draft_index),
                mount,
            })),
            Some(index) => Ok(Input::Stage(index)),
            None => Ok(Input::Image(reference.to_string())),
        }
    }

    fn lower_run(
        &self,
        run: &RunCommand,
        draft_index: usize,
        variables: &[(String, String)],
        instruction: &Instruction,
    ) -> Result<(RunOp, Vec<usize>), Error> {
        let error_at = |kind| Error::at(kind, instruction.location, instruction.original.as_str());
        let mut arguments = run.command.arguments.clone();
        let mut script_files = Vec::new();
        let prepend_shell = run.command.prepend_shell;
        if let Some(first) = run.command.files.first() {
            let marker = match arguments.as_slice() {
                [only] if run.command.prepend_shell => {
                    parser::parse_heredoc_marker(only).map_err(error_at)?
                }
                _ => None,
            };
            if marker.is_some() {
                // `RUN <<EOF`: the heredoc is the script. With a shebang it runs as a file,
                // otherwise its text goes to the shell, as BuildKit does.
                let content = first.effective_content();
                if content.starts_with("#!") {
                    let path = format!("{SCRIPT_MOUNT_DIRECTORY}/{}", first.name);
                    script_files.push(ScriptFile {
                        path: path.clone(),
                        content,
                    });
                    // BuildKit still puts SHELL in front: `/bin/sh -c /dev/pipes/EOF`.
                    arguments = vec![path];
                } else {
                    arguments = vec![content];
                }
            } else {
                // `RUN cat <<EOF > file`: the shell reads the heredocs itself.
                let mut full = arguments.first().cloned().unwrap_or_default();
                for file in &run.command.files {
                    full.push('\n');
                    full.push_str(&file.content);
                    full.push_str(&file.name);
                }
                arguments = vec![full];
            }
        }
        let op = self.finish_run(
            run,
            draft_index,
            variables,
            instruction,
            arguments,
            script_files,
            prepend_shell,
        )?;
        let stages = op
            .mounts
            .iter()
            .filter_map(|mount| match mount.input {
                Some(Input::Stage(stage)) => Some(stage),
                _ => None,
            })
            .collect();
        Ok((op, stages))
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_run(
        &self,
        run: &RunCommand,
        draft_index: usize,
        variables: &[(String, String)],
        instruction: &Instruction,
        arguments: Vec<String>,
        script_files: Vec<ScriptFile>,
        prepend_shell: bool,
    ) -> Result<RunOp, Error> {
        let draft = &self.stages[draft_index];
        let expand = |word: &str| self.expand(word, variables, instruction);
        let arguments = self.with_shell(draft_index, prepend_shell, &arguments);
        let mut mounts = Vec::with_capacity(run.mounts.len());
        for mount in &run.mounts {
            let mut mount = mount.clone();
            for field in [
                &mut mount.target,
                &mut mount.source,
                &mut mount.from,
                &mut mount.id,
                &mut mount.env,
            ] {
                if let Some(value) = field.as_mut() {
                    *value = expand(value)?;
                }
            }
            if let Some(target) = &mount.target {
                mount.target = Some(join_path(&draft.inherited.working_dir, target));
            }
            if mount.mount_type == MountType::Secret
                && mount.target.is_none()
                && mount.env.is_none()
            {
                mount.target = Some(format!(
                    "/run/secrets/{}",
                    mount.id.clone().unwrap_or_default()
                ));
            }
            if mount.mount_type == MountType::Secret && mount.id.is_none() {
                mount.id = mount
                    .target
                    .as_deref()
                    .and_then(|target| target.rsplit('/').next())
                    .map(str::to_string);
            }
            if mount.mount_type == MountType::Ssh && mount.target.is_none() {
                mount.target = Some("/run/buildkit/ssh_agent.0".into());
            }
            if mount.mount_type == MountType::Cache && mount.id.is_none() {
                mount.id = mount.target.clone();
            }
            if mount.mount_type != MountType::Cache {
                mount.sharing = CacheSharing::Shared;
            }
            let input = match (mount.mount_type, &mount.from) {
                (MountType::Bind | MountType::Cache, Some(from)) => {
                    Some(self.resolve_input(from, draft_index, instruction, true)?)
                }
                (MountType::Bind, None) => Some(Input::Context),
                _ => None,
            };
            mounts.push(MountOp { mount, input });
        }
        // Build args in scope reach RUN's environment; ENV wins over an ARG of the same name.
        let mut env: Vec<(String, String)> = Vec::new();
        for (name, value) in variables {
            match env.iter_mut().find(|(existing, _)| existing == name) {
                Some(entry) => entry.1 = value.clone(),
                None => env.push((name.clone(), value.clone())),
            }
        }
        let mut proxy_env = Vec::new();
        for name in PROXY_ARGS {
            if let Some(value) = self.options.build_args.get(*name)
                && !env.iter().any(|(existing, _)| existing == name)
            {
                proxy_env.push((name.to_string(), value.clone()));
            }
        }
        Ok(RunOp {
            arguments,
            script_files,
            env,
            proxy_env,
            build_args: self.stages[draft_index].inherited.args.clone(),
            user: draft.inherited.user.clone(),
            working_dir: draft.inherited.working_dir.clone(),
            mounts,
            network: run.network,
            security: run.security,
        })
    }

    fn lower_copy(
        &self,
        file: &FileCommand,
        is_add: bool,
        draft_index: usize,
        variables: &[(String, String)],
        instruction: &Instruction,
    ) -> Result<CopyOp, Error> {
        let draft = &self.stages[draft_index];
        let expand = |word: &str| self.expand(word, variables, instruction);
        let expand_option = |word: &Option<String>| word.as_deref().map(expand).transpose();
        let input = match expand_option(&file.from)? {
            Some(from) => self.resolve_input(&from, draft_index, instruction, false)?,
            None => Input::Context,
        };
        let sources = file
            .sources
            .iter()
            .map(|source| expand(source))
            .collect::<Result<Vec<_>, _>>()?;
        // Heredoc bodies expand with quotes as plain text and `\` as the escape, whatever the
        // Dockerfile's escape token, as BuildKit does.
        let heredoc_lexer = Lexer::new('\\').with_skip_process_quotes(true);
        let inline_sources = file
            .inline_sources
            .iter()
            .map(|inline| {
                let data = if inline.expand {
                    heredoc_lexer
                        .expand_word(&inline.data, &variables)
                        .map_err(|error| Self::expansion_error(instruction, error))?
                } else {
                    inline.data.clone()
                };
                Ok((inline.path.clone(), data))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let destination = expand(&file.destination)?;
        let mut resolved = join_path(&draft.inherited.working_dir, &destination);
        if (destination.ends_with('/') || destination.ends_with("/.") || destination == ".")
            && !resolved.ends_with('/')
        {
            resolved.push('/');
        }
        let written = &file.options;
        let options = CopyOptions {
            chown: expand_option(&written.chown)?,
            chmod: expand_option(&written.chmod)?,
            exclude: written
                .exclude
                .iter()
                .map(|pattern| expand(pattern))
                .collect::<Result<Vec<_>, _>>()?,
            checksum: expand_option(&written.checksum)?,
            ..written.clone()
        };
        if let Some(mode) = &options.chmod
            && !is_octal_mode(mode)
            && !is_symbolic_mode(mode)
        {
            return Err(Error::at(
                ErrorKind::InvalidFlagValue {
                    flag: "chmod".into(),
                    problem: format!(
                        "{mode:?} is not an octal mode such as 0755 or a symbolic one such as u+x,go-w"
                    ),
                },
                instruction.location,
                instruction.original.as_str(),
            ));
        }
        Ok(CopyOp {
            is_add,
            input,
            sources,
            inline_sources,
            destination: resolved,
            options,
            user: draft.inherited.user.clone(),
        })
    }

    fn finish(self, dockerfile: &Dockerfile) -> Result<BuildGraph, Error> {
        let target = match &self.options.target {
            Some(name) => {
                let lower = name.to_lowercase();
                self.stages
                    .iter()
                    .position(|draft| draft.stage.name.as_deref() == Some(lower.as_str()))
                    .ok_or_else(|| Error::new(ErrorKind::UnknownTarget(name.clone())))?
            }
            None => self.stages.len() - 1,
        };
        // Stages the target needs, following FROM, COPY --from and RUN --mount from=.
        let mut needed = BTreeSet::new();
        let mut pending = vec![target];
        while let Some(stage) = pending.pop() {
            if !needed.insert(stage) {
                continue;
            }
            pending.extend(
                self.stages[stage]
                    .dependencies
                    .iter()
                    .map(|(dependency, _, _)| *dependency),
            );
        }
        let mut warnings: Vec<String> = dockerfile
            .warnings
            .iter()
            .map(|warning| format!("line {}: {}", warning.location.start_line, warning.message))
            .collect();
        let unused: Vec<&String> = self
            .options
            .build_args
            .keys()
            .filter(|name| {
                !self.declared_args.contains(*name) && !PROXY_ARGS.contains(&name.as_str())
            })
            .collect();
        if !unused.is_empty() {
            let names: Vec<&str> = unused.iter().map(|name| name.as_str()).collect();
            warnings.push(format!(
                "one or more build args were not consumed: [{}]",
                names.join(" ")
            ));
        }

        let mut graph: DiGraph<Vertex, Dependency> = DiGraph::new();
        let mut kept: Vec<(Stage, Vec<StageDependency>)> = Vec::with_capacity(needed.len());
        let mut first_vertex: BTreeMap<usize, NodeIndex> = BTreeMap::new();
        let mut last_vertex: BTreeMap<usize, NodeIndex> = BTreeMap::new();
        let mut step_vertices: BTreeMap<(usize, usize), NodeIndex> = BTreeMap::new();
        for draft in self.stages {
            let index = draft.stage.index;
            if !needed.contains(&index) {
                continue;
            }
            if let Some(error) = draft.error {
                return Err(error);
            }
            let base = graph.add_node(Vertex::Base { stage: index });
            first_vertex.insert(index, base);
            let mut previous = base;
            for step in 0..draft.stage.steps.len() {
                let vertex = graph.add_node(Vertex::Step { stage: index, step });
                graph.add_edge(previous, vertex, Dependency::Parent);
                step_vertices.insert((index, step), vertex);
                previous = vertex;
            }
            last_vertex.insert(index, previous);
            kept.push((draft.stage, draft.dependencies));
        }
        for (stage, dependencies) in &kept {
            for (source, step, dependency) in dependencies {
                let to = match step {
                    Some(step) => step_vertices[&(stage.index, *step)],
                    None => first_vertex[&stage.index],
                };
                graph.add_edge(last_vertex[source], to, *dependency);
            }
        }
        let order = match petgraph::algo::toposort(&graph, None) {
            Ok(order) => order,
            Err(cycle) => {
                let (Vertex::Base { stage } | Vertex::Step { stage, .. }) = graph[cycle.node_id()];
                let (stage, _) = kept
                    .iter()
                    .find(|(candidate, _)| candidate.index == stage)
                    .expect("every vertex belongs to a kept stage");
                return Err(Error::at(
                    ErrorKind::CircularDependency(stage.display_name()),
                    stage.location,
                    stage.from_instruction.as_str(),
                ));
            }
        };

        // Digests, in dependency order: a step's digest chains its definition with the
        // filesystem it builds on and the results of the stages it reads.
        let position: BTreeMap<usize, usize> = kept
            .iter()
            .enumerate()
            .map(|(position, (stage, _))| (stage.index, position))
            .collect();
        let mut filesystem: BTreeMap<usize, String> = BTreeMap::new();
        for node in order {
            match graph[node] {
                Vertex::Base { stage } => {
                    let (current, _) = &kept[position[&stage]];
                    let digest = match &current.base {
                        Base::Scratch => digest_of(&("scratch",)),
                        Base::Image(reference) => {
                            digest_of(&("image", reference, &current.platform))
                        }
                        Base::Stage(parent) => kept[position[parent]].0.result_digest.clone(),
                    };
                    let current = &mut kept[position[&stage]].0;
                    current.base_digest = digest.clone();
                    current.result_digest = digest.clone();
                    filesystem.insert(stage, digest);
                }
                Vertex::Step { stage, step } => {
                    let (current, dependencies) = &kept[position[&stage]];
                    let mut inputs = vec![filesystem[&stage].clone()];
                    for (source, reading_step, _) in dependencies {
                        if *reading_step == Some(step) {
                            inputs.push(kept[position[source]].0.result_digest.clone());
                        }
                    }
                    let changes_filesystem = current.steps[step].op.changes_filesystem();
                    let digest = digest_of(&(&current.steps[step].definition_digest, &inputs));
                    let current = &mut kept[position[&stage]].0;
                    current.steps[step].digest = digest.clone();
                    if changes_filesystem {
                        current.result_digest = digest.clone();
                        filesystem.insert(stage, digest);
                    }
                }
            }
        }
        Ok(BuildGraph {
            directives: dockerfile.directives.clone(),
            stages: kept.into_iter().map(|(stage, _)| stage).collect(),
            target,
            graph,
            warnings,
        })
    }
}

/// One line for an op: its kind and its expanded fields as JSON.
pub fn describe_op(op: &Op) -> String {
    let (kind, value) = match op {
        Op::Run(run) => ("run", serde_json::to_string(run)),
        Op::Copy(copy) => (
            if copy.is_add { "add" } else { "copy" },
            serde_json::to_string(copy),
        ),
        Op::Workdir { path } => ("workdir", serde_json::to_string(path)),
        Op::Config(change) => ("config", serde_json::to_string(change)),
    };
    format!("{kind} {}", value.expect("plan values serialize"))
}

/// A variable lookup over (name, optional value) pairs where the last pair wins.
struct ArgValues<'a>(&'a [(String, Option<String>)]);

impl VariableLookup for ArgValues<'_> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(candidate, _)| candidate == name)
            .and_then(|(_, value)| value.as_deref())
    }
}

/// sha256 of the JSON form of `value`, as `sha256:<hex>`.
fn digest_of<T: Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).expect("plan values serialize");
    let digest = Sha256::digest(&bytes);
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// Joins a path onto a working directory and cleans it (`path.Join` semantics), keeping it
/// absolute.
pub fn join_path(working_dir: &str, path: &str) -> String {
    let combined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{working_dir}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in combined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    format!("/{}", parts.join("/"))
}

/// `80` → `80/tcp`; checks `port[-port][/tcp|udp|sctp]`.
fn normalize_port(word: &str) -> Result<String, ErrorKind> {
    let (ports, protocol) = match word.split_once('/') {
        Some((ports, protocol)) => (ports, protocol.to_lowercase()),
        None => (word, "tcp".to_string()),
    };
    let valid_number = |text: &str| text.parse::<u16>().is_ok();
    let valid_ports = match ports.split_once('-') {
        Some((low, high)) => valid_number(low) && valid_number(high),
        None => valid_number(ports),
    };
    if !valid_ports || !matches!(protocol.as_str(), "tcp" | "udp" | "sctp") {
        return Err(ErrorKind::Arguments(format!(
            "invalid port {word:?}: expected port[-port][/tcp|udp|sctp]"
        )));
    }
    Ok(format!("{ports}/{protocol}"))
}

/// STOPSIGNAL takes a number or a signal name (`SIGTERM`, `TERM`, `SIGRTMIN+3`).
fn validate_signal(signal: &str) -> Result<(), ErrorKind> {
    const NAMES: &[&str] = &[
        "ABRT", "ALRM", "BUS", "CHLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT", "KILL",
        "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM", "TRAP",
        "TSTP", "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ",
    ];
    if signal
        .parse::<u32>()
        .is_ok_and(|number| (1..=64).contains(&number))
    {
        return Ok(());
    }
    let upper = signal.to_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if NAMES.contains(&name) || name.starts_with("RTMIN") || name.starts_with("RTMAX") {
        return Ok(());
    }
    Err(ErrorKind::Arguments(format!("invalid signal: {signal}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(build_args: &[(&str, &str)], target: Option<&str>) -> PlanOptions {
        PlanOptions {
            build_args: build_args
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            target: target.map(str::to_string),
            target_platform: Platform::parse("linux/arm64/v8").unwrap(),
            build_platform: Platform::parse("linux/amd64").unwrap(),
        }
    }

    fn planned(text: &str) -> BuildGraph {
        plan(text, &options(&[], None), &NoImages)
            .unwrap_or_else(|error| panic!("{}", error.render("Dockerfile", text)))
    }

    fn run_op(step: &Step) -> &RunOp {
        match &step.op {
            Op::Run(run) => run,
            other => panic!("not a RUN: {other:?}"),
        }
    }

    fn copy_op(step: &Step) -> &CopyOp {
        match &step.op {
            Op::Copy(copy) => copy,
            other => panic!("not a COPY: {other:?}"),
        }
    }

    #[test]
    fn undeclared_proxy_args_reach_run_but_not_the_key() {
        let text = "FROM scratch\nRUN true\n";
        let planned_with =
            |value: &str| plan(text, &options(&[("HTTP_PROXY", value)], None), &NoImages).unwrap();
        let (one, two) = (planned_with("http://a:1"), planned_with("http://b:2"));
        let run = run_op(&one.target_stage().steps[0]);
        assert_eq!(
            run.proxy_env,
            vec![("HTTP_PROXY".into(), "http://a:1".into())]
        );
        assert!(run.env.is_empty());
        assert_eq!(
            one.target_stage().steps[0].definition_digest,
            two.target_stage().steps[0].definition_digest
        );
        // Declared with ARG, a proxy variable is an ordinary build argument.
        let declared = "FROM scratch\nARG HTTP_PROXY\nRUN true\n";
        let planned_declared = |value: &str| {
            plan(
                declared,
                &options(&[("HTTP_PROXY", value)], None),
                &NoImages,
            )
            .unwrap()
        };
        let (one, two) = (
            planned_declared("http://a:1"),
            planned_declared("http://b:2"),
        );
        assert!(run_op(&one.target_stage().steps[1]).proxy_env.is_empty());
        assert_ne!(
            one.target_stage().steps[1].definition_digest,
            two.target_stage().steps[1].definition_digest
        );
    }

    #[test]
    fn global_args_expand_from_and_stage_redeclaration() {
        let text = "ARG VERSION=1.0\nARG IMAGE=busybox:${VERSION}\nFROM $IMAGE\nARG VERSION\nARG OTHER=x\nRUN echo\n";
        let graph = planned(text);
        let stage = graph.target_stage();
        assert_eq!(stage.base, Base::Image("busybox:1.0".into()));
        let run = run_op(&stage.steps[2]);
        assert!(run.env.contains(&("VERSION".into(), "1.0".into())));
        assert!(run.env.contains(&("OTHER".into(), "x".into())));
        assert!(
            !run.env.iter().any(|(name, _)| name == "IMAGE"),
            "global args are not in a stage unless re-declared"
        );
    }

    #[test]
    fn build_args_override_defaults() {
        let text = "ARG TAG=1\nFROM img:$TAG\nARG MODE=debug\nRUN make\n";
        let graph = plan(
            text,
            &options(&[("TAG", "2"), ("MODE", "release"), ("UNUSED", "x")], None),
            &NoImages,
        )
        .unwrap();
        let stage = graph.target_stage();
        assert_eq!(stage.base, Base::Image("img:2".into()));
        assert!(
            run_op(&stage.steps[1])
                .env
                .contains(&("MODE".into(), "release".into()))
        );
        assert!(
            graph
                .warnings
                .iter()
                .any(|warning| warning.contains("UNUSED"))
        );
        assert!(
            !graph
                .warnings
                .iter()
                .any(|warning| warning.contains("MODE"))
        );
    }

    #[test]
    fn env_wins_over_arg_and_expands_in_order() {
        let graph =
            planned("FROM a\nARG X=arg\nENV X=env Y=${X}-y\nWORKDIR /app/$Y\nCOPY f ./sub/\n");
        let stage = graph.target_stage();
        assert_eq!(
            stage.steps[1].op,
            Op::Config(ConfigChange::Env(vec![
                ("X".into(), "env".into()),
                ("Y".into(), "env-y".into())
            ]))
        );
        assert_eq!(
            stage.steps[2].op,
            Op::Workdir {
                path: "/app/env-y".into()
            }
        );
        assert_eq!(copy_op(&stage.steps[3]).destination, "/app/env-y/sub/");
    }

    #[test]
    fn predefined_platform_args() {
        let graph = planned(
            "FROM --platform=$BUILDPLATFORM a AS build\nARG TARGETARCH\nARG BUILDOS\nRUN x\n",
        );
        let stage = graph.target_stage();
        assert_eq!(stage.platform.to_string(), "linux/amd64");
        let env = &run_op(&stage.steps[2]).env;
        assert!(env.contains(&("TARGETARCH".into(), "arm64".into())));
        assert!(env.contains(&("BUILDOS".into(), "linux".into())));
        let undeclared = planned("FROM a\nRUN x\n");
        assert!(run_op(&undeclared.target_stage().steps[0]).env.is_empty());
    }

    #[test]
    fn target_prunes_to_what_it_needs() {
        let text = "FROM a AS base\nRUN one\nFROM b AS unrelated\nRUN two\nFROM c AS tools\nRUN three\nFROM base AS app\nCOPY --from=tools /bin/t /t\nFROM app AS after\n";
        let graph = plan(text, &options(&[], Some("app")), &NoImages).unwrap();
        let kept: Vec<String> = graph.stages.iter().map(Stage::display_name).collect();
        assert_eq!(kept, vec!["base", "tools", "app"]);
        assert_eq!(graph.target_stage().base, Base::Stage(0));
        assert_eq!(
            copy_op(&graph.target_stage().steps[0]).input,
            Input::Stage(2)
        );
        // Dependency order puts what is needed first.
        let order = graph.dependency_order();
        let position = |vertex: Vertex| {
            order
                .iter()
                .position(|candidate| *candidate == vertex)
                .unwrap()
        };
        assert!(
            position(Vertex::Step { stage: 2, step: 0 })
                < position(Vertex::Step { stage: 3, step: 0 })
        );
        assert!(position(Vertex::Step { stage: 0, step: 0 }) < position(Vertex::Base { stage: 3 }));
        let error = plan(text, &options(&[], Some("nope")), &NoImages).unwrap_err();
        assert!(matches!(error.kind, ErrorKind::UnknownTarget(_)));
    }

    #[test]
    fn errors_in_unneeded_stages_do_not_matter() {
        let text = "FROM a AS broken\nRUN --mount=type=bind,target=/x,from=${MISSING:?no} true\nFROM b AS ok\nRUN fine\n";
        assert!(plan(text, &options(&[], Some("ok")), &NoImages).is_ok());
        assert!(plan(text, &options(&[], Some("broken")), &NoImages).is_err());
    }

    #[test]
    fn cycles_and_bad_indexes_are_errors() {
        // Stages may only read stages defined before them, so no loop can form.
        let text = "FROM a AS one\nCOPY --from=two /x /x\nFROM b AS two\nCOPY --from=one /y /y\n";
        let error = plan(text, &options(&[], None), &NoImages).unwrap_err();
        assert!(
            matches!(
                error.kind,
                ErrorKind::StageDefinedLater { mount: false, .. }
            ),
            "{error}"
        );
        assert_eq!(error.location, Some(Location::line(2)));
        let text = "FROM a AS one\nRUN --mount=from=two,target=/t true\nFROM b AS two\n";
        let error = plan(text, &options(&[], Some("one")), &NoImages).unwrap_err();
        assert!(
            matches!(error.kind, ErrorKind::StageDefinedLater { mount: true, .. }),
            "{error}"
        );
        let error = plan(
            "FROM a AS one\nCOPY --from=one /x /x\n",
            &options(&[], None),
            &NoImages,
        )
        .unwrap_err();
        assert!(matches!(error.kind, ErrorKind::CircularDependency(ref name) if name == "one"));
        let error = plan(
            "FROM a\nCOPY --from=7 /x /x\n",
            &options(&[], None),
            &NoImages,
        )
        .unwrap_err();
        assert!(matches!(
            error.kind,
            ErrorKind::StageIndexOutOfRange { index: 7, .. }
        ));
        assert_eq!(error.location, Some(Location::line(2)));
    }

    #[test]
    fn copy_from_unknown_name_is_an_image() {
        let graph = planned("FROM a\nCOPY --from=busybox:1.36 /bin/sh /sh\n");
        assert_eq!(
            copy_op(&graph.target_stage().steps[0]).input,
            Input::Image("busybox:1.36".into())
        );
    }

    #[test]
    fn instruction_before_from_and_duplicate_stage() {
        let error = plan("RUN x\nFROM a\n", &options(&[], None), &NoImages).unwrap_err();
        assert!(matches!(error.kind, ErrorKind::InstructionBeforeFrom(_)));
        let error = plan("FROM a AS x\nFROM b AS x\n", &options(&[], None), &NoImages).unwrap_err();
        assert!(matches!(error.kind, ErrorKind::DuplicateStageName(_)));
    }

    #[test]
    fn digests_are_deterministic_and_identical_work_shares_one() {
        let text = "FROM busybox AS one\nRUN echo hi\nLABEL a=1\nFROM busybox AS two\nRUN echo hi\nLABEL a=2\nFROM scratch\nCOPY --from=one /x /x\nCOPY --from=two /x /y\n";
        let first = planned(text);
        let second = planned(text);
        let digests = |graph: &BuildGraph| -> Vec<String> {
            graph
                .stages
                .iter()
                .flat_map(|stage| stage.steps.iter().map(|step| step.digest.clone()))
                .collect()
        };
        assert_eq!(digests(&first), digests(&second));
        assert!(
            digests(&first)
                .iter()
                .all(|digest| digest.starts_with("sha256:") && digest.len() == 71)
        );
        let one = first.stage(0).unwrap();
        let two = first.stage(1).unwrap();
        assert_eq!(
            one.steps[0].digest, two.steps[0].digest,
            "same RUN on the same base is one piece of work"
        );
        assert_ne!(one.steps[1].digest, two.steps[1].digest);
        // A label does not change the filesystem a stage hands on.
        assert_eq!(one.result_digest, two.result_digest);
        let changed = planned(&text.replace("RUN echo hi\nLABEL a=1", "RUN echo bye\nLABEL a=1"));
        assert_ne!(
            changed.stage(0).unwrap().steps[0].digest,
            one.steps[0].digest
        );
        assert_ne!(
            changed.target_stage().steps[0].digest,
            first.target_stage().steps[0].digest,
            "a changed source stage changes the COPY"
        );
        assert_eq!(
            changed.target_stage().steps[1].definition_digest,
            first.target_stage().steps[1].definition_digest
        );
    }

    #[test]
    fn run_heredocs_and_shell() {
        let graph = planned(
            "FROM a\nSHELL [\"/bin/bash\", \"-eu\", \"-c\"]\nRUN <<EOF\necho one\necho two\nEOF\nRUN <<EOF\n#!/usr/bin/env python3\nprint(1)\nEOF\nRUN cat <<A > /x\nhello\nA\nCMD run\nENTRYPOINT [\"/e\"]\n",
        );
        let stage = graph.target_stage();
        assert_eq!(
            run_op(&stage.steps[1]).arguments,
            vec!["/bin/bash", "-eu", "-c", "echo one\necho two\n"]
        );
        let script = run_op(&stage.steps[2]);
        assert_eq!(
            script.arguments,
            vec!["/bin/bash", "-eu", "-c", "/dev/pipes/EOF"]
        );
        assert_eq!(
            script.script_files[0].content,
            "#!/usr/bin/env python3\nprint(1)\n"
        );
        assert_eq!(
            run_op(&stage.steps[3]).arguments,
            vec!["/bin/bash", "-eu", "-c", "cat <<A > /x\nhello\nA"]
        );
        assert_eq!(
            stage.steps[4].op,
            Op::Config(ConfigChange::Cmd(vec![
                "/bin/bash".into(),
                "-eu".into(),
                "-c".into(),
                "run".into()
            ]))
        );
        assert_eq!(
            stage.steps[5].op,
            Op::Config(ConfigChange::Entrypoint(vec!["/e".into()]))
        );
    }

    #[test]
    fn mounts_are_expanded_and_resolved() {
        let graph = planned(
            "FROM a AS build\nRUN true\nFROM b\nARG CACHE=/root/.cache\nWORKDIR /src\nRUN --mount=type=cache,target=$CACHE --mount=from=build,source=/out,target=in --mount=type=secret,id=token true\n",
        );
        let run = run_op(&graph.target_stage().steps[2]);
        assert_eq!(run.mounts[0].mount.target.as_deref(), Some("/root/.cache"));
        assert_eq!(run.mounts[0].mount.id.as_deref(), Some("/root/.cache"));
        assert_eq!(run.mounts[1].input, Some(Input::Stage(0)));
        assert_eq!(run.mounts[1].mount.target.as_deref(), Some("/src/in"));
        assert_eq!(
            run.mounts[2].mount.target.as_deref(),
            Some("/run/secrets/token")
        );
        assert_eq!(run.working_dir, "/src");
        assert!(graph.graph.edge_count() > 0);
        assert!(
            graph
                .graph
                .edge_weights()
                .any(|dependency| *dependency == Dependency::MountSource)
        );
    }

    struct OneImage;
    impl ImageResolver for OneImage {
        fn resolve(&self, reference: &str, _platform: &Platform) -> Option<BaseImageConfig> {
            (reference == "onbuild-base").then(|| BaseImageConfig {
                env: vec![
                    ("PATH".into(), "/usr/bin".into()),
                    ("HOME".into(), "/root".into()),
                ],
                working_dir: Some("/work".into()),
                user: Some("nobody".into()),
                shell: None,
                onbuild: vec!["COPY . /app/".into(), "RUN echo $HOME".into()],
            })
        }
    }

    #[test]
    fn base_image_config_and_onbuild_triggers() {
        let graph = plan(
            "FROM onbuild-base\nENV P=$PATH:/x\nRUN true\n",
            &PlanOptions::default(),
            &OneImage,
        )
        .unwrap();
        let stage = graph.target_stage();
        assert!(stage.base_config_known);
        assert!(stage.steps[0].from_onbuild && stage.steps[1].from_onbuild);
        assert_eq!(copy_op(&stage.steps[0]).destination, "/app/");
        assert_eq!(
            stage.steps[2].op,
            Op::Config(ConfigChange::Env(vec![("P".into(), "/usr/bin:/x".into())]))
        );
        let run = run_op(&stage.steps[3]);
        assert_eq!(run.working_dir, "/work");
        assert_eq!(run.user.as_deref(), Some("nobody"));
        // Triggers run once: a stage built on this one does not run them again.
        let graph = plan(
            "FROM onbuild-base AS one\nFROM one\nRUN x\n",
            &PlanOptions::default(),
            &OneImage,
        )
        .unwrap();
        assert_eq!(graph.target_stage().steps.len(), 1);
    }

    #[test]
    fn stage_declared_onbuild_runs_in_stage_built_from_it() {
        let graph = planned("FROM a AS base\nONBUILD RUN echo triggered\nFROM base\nRUN after\n");
        let stage = graph.target_stage();
        assert_eq!(stage.steps.len(), 2);
        assert!(stage.steps[0].from_onbuild);
        assert_eq!(
            run_op(&stage.steps[0]).arguments,
            vec!["/bin/sh", "-c", "echo triggered"]
        );
    }

    #[test]
    fn expose_volume_stopsignal_chmod_validation() {
        let graph = planned(
            "FROM a\nARG PORTS=\"80 443/udp\"\nEXPOSE $PORTS 8000-8010\nVOLUME /data\nSTOPSIGNAL SIGQUIT\n",
        );
        assert_eq!(
            graph.target_stage().steps[1].op,
            Op::Config(ConfigChange::Expose(vec![
                "80/tcp".into(),
                "443/udp".into(),
                "8000-8010/tcp".into()
            ]))
        );
        for bad in [
            "EXPOSE 99999",
            "STOPSIGNAL SIGNOPE",
            "COPY --chmod=999 a /b",
            "VOLUME \"\"",
        ] {
            assert!(
                plan(
                    &format!("FROM a\n{bad}\n"),
                    &PlanOptions::default(),
                    &NoImages
                )
                .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn platforms_normalize_like_containerd() {
        let normalized = |text: &str| Platform::parse(text).unwrap().normalized().to_string();
        assert_eq!(normalized("linux/arm64/v8"), "linux/arm64");
        assert_eq!(normalized("linux/aarch64"), "linux/arm64");
        assert_eq!(normalized("linux/x86_64"), "linux/amd64");
        assert_eq!(normalized("linux/arm"), "linux/arm/v7");
        assert_eq!(normalized("linux/armhf"), "linux/arm/v7");
        assert_eq!(normalized("linux/riscv64"), "linux/riscv64");
        assert!(Platform::parse("linux//x").is_err());
    }

    #[test]
    fn join_path_cleans() {
        assert_eq!(join_path("/a/b", "../c/./d"), "/a/c/d");
        assert_eq!(join_path("/a", "/abs"), "/abs");
        assert_eq!(join_path("/", "../../x"), "/x");
    }
}
