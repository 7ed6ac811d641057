//! Layer 2: AST nodes → typed, validated instructions.
//!
//! Every instruction and flag of the Dockerfile reference is known here; anything else is an
//! error with a did-you-mean hint. Values stay unexpanded: which variables are in scope is the
//! graph's business, so the fields that BuildKit expands are kept as written and expanded by
//! [`crate::graph`].

use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, ErrorKind, Location, suggest};
use crate::parser::{Dockerfile, Heredoc, Node, parse_heredoc_marker};

/// Every instruction word the frontend accepts, lower-case.
pub const INSTRUCTION_NAMES: &[&str] = &[
    "add",
    "arg",
    "cmd",
    "copy",
    "entrypoint",
    "env",
    "expose",
    "from",
    "healthcheck",
    "label",
    "maintainer",
    "onbuild",
    "run",
    "shell",
    "stopsignal",
    "user",
    "volume",
    "workdir",
];

/// A typed instruction with where it was written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Instruction {
    /// What the instruction does.
    pub command: Command,
    /// The lines it spans.
    pub location: Location,
    /// The instruction as written, continuations joined.
    pub original: String,
}

/// The command of an instruction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "instruction", rename_all = "lowercase")]
pub enum Command {
    /// `FROM [--platform=P] IMAGE [AS NAME]`.
    From(FromCommand),
    /// `RUN [--mount=...] [--network=...] [--security=...] COMMAND`.
    Run(RunCommand),
    /// `COPY [flags] SRC... DEST`.
    Copy(FileCommand),
    /// `ADD [flags] SRC... DEST`.
    Add(FileCommand),
    /// `CMD`.
    Cmd(CommandLine),
    /// `ENTRYPOINT`.
    Entrypoint(CommandLine),
    /// `SHELL ["executable", "params"]`.
    Shell(Vec<String>),
    /// `ENV k=v ...`.
    Env(Vec<KeyValue>),
    /// `LABEL k=v ...`.
    Label(Vec<KeyValue>),
    /// `ARG name[=default] ...`.
    Arg(Vec<ArgDefinition>),
    /// `WORKDIR path`.
    Workdir(String),
    /// `USER user[:group]`.
    User(String),
    /// `EXPOSE port[/proto] ...` (words expanded and split later).
    Expose(Vec<String>),
    /// `VOLUME path ...`.
    Volume(Vec<String>),
    /// `STOPSIGNAL signal`.
    StopSignal(String),
    /// `HEALTHCHECK [options] CMD ...` or `HEALTHCHECK NONE`.
    Healthcheck(Healthcheck),
    /// `ONBUILD INSTRUCTION`: recorded in the image, run when it is used as a base.
    Onbuild(OnbuildCommand),
    /// `MAINTAINER name` (deprecated; becomes the image's author).
    Maintainer(String),
}

impl Command {
    /// The instruction word, upper-case (`COPY`).
    pub fn name(&self) -> &'static str {
        match self {
            Command::From(_) => "FROM",
            Command::Run(_) => "RUN",
            Command::Copy(_) => "COPY",
            Command::Add(_) => "ADD",
            Command::Cmd(_) => "CMD",
            Command::Entrypoint(_) => "ENTRYPOINT",
            Command::Shell(_) => "SHELL",
            Command::Env(_) => "ENV",
            Command::Label(_) => "LABEL",
            Command::Arg(_) => "ARG",
            Command::Workdir(_) => "WORKDIR",
            Command::User(_) => "USER",
            Command::Expose(_) => "EXPOSE",
            Command::Volume(_) => "VOLUME",
            Command::StopSignal(_) => "STOPSIGNAL",
            Command::Healthcheck(_) => "HEALTHCHECK",
            Command::Onbuild(_) => "ONBUILD",
            Command::Maintainer(_) => "MAINTAINER",
        }
    }
}

/// `FROM`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FromCommand {
    /// The base: an image reference, a stage name, or `scratch` (unexpanded).
    pub image: String,
    /// The stage name after `AS`, lower-cased.
    pub name: Option<String>,
    /// `--platform` (unexpanded).
    pub platform: Option<String>,
}

/// A command line: exec form (JSON) or shell form, with any heredocs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CommandLine {
    /// The JSON array elements, or the single shell-form string.
    pub arguments: Vec<String>,
    /// Shell form: the arguments are run by the stage's SHELL.
    pub prepend_shell: bool,
    /// Heredoc files attached to the command (`RUN <<EOF`).
    pub files: Vec<Heredoc>,
}

/// `RUN`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunCommand {
    /// What to run.
    pub command: CommandLine,
    /// `--mount` options, in order (fields unexpanded).
    pub mounts: Vec<Mount>,
    /// `--network`.
    pub network: NetworkMode,
    /// `--security`.
    pub security: SecurityMode,
}

/// `RUN --network`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// The build's default.
    #[default]
    Default,
    /// No network: a namespace with only loopback.
    None,
    /// The host's network.
    Host,
}

/// `RUN --security`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SecurityMode {
    /// The default sandbox.
    #[default]
    Sandbox,
    /// All capabilities (needs the build to allow it).
    Insecure,
}

/// The kind of a `RUN --mount`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MountType {
    /// A directory of the context or of another stage/image.
    Bind,
    /// A persistent cache directory.
    Cache,
    /// An empty in-memory filesystem.
    Tmpfs,
    /// A secret file (or environment variable).
    Secret,
    /// An SSH agent socket.
    Ssh,
}

/// How concurrent builds share a cache mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheSharing {
    /// Many writers at once.
    Shared,
    /// A fresh copy for each concurrent writer.
    Private,
    /// One writer at a time.
    Locked,
}

/// One `RUN --mount=...`. String fields are as written; the graph expands them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Mount {
    /// `type=`.
    pub mount_type: MountType,
    /// `target=`/`dst=`/`destination=`; secrets and ssh have defaults.
    pub target: Option<String>,
    /// `source=`/`src=`.
    pub source: Option<String>,
    /// `from=`: a stage or image to take `source` from.
    pub from: Option<String>,
    /// `id=`.
    pub id: Option<String>,
    /// Read-only (`ro`, `readonly`) — the default for bind mounts.
    pub read_only: bool,
    /// `sharing=` for cache mounts.
    pub sharing: CacheSharing,
    /// `mode=` as octal.
    pub mode: Option<u32>,
    /// `uid=`.
    pub uid: Option<u32>,
    /// `gid=`.
    pub gid: Option<u32>,
    /// `size=` of a tmpfs, in bytes.
    pub size: Option<u64>,
    /// `required=` for secret and ssh mounts.
    pub required: bool,
    /// `env=` for secrets exposed as an environment variable.
    pub env: Option<String>,
}

/// COPY and ADD.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileCommand {
    /// Source paths or URLs (unexpanded), heredoc markers removed.
    pub sources: Vec<String>,
    /// Sources given inline as heredocs (`COPY <<EOF /dest`).
    pub inline_sources: Vec<InlineSource>,
    /// The destination (unexpanded).
    pub destination: String,
    /// `--from` (COPY only).
    pub from: Option<String>,
    /// The flags COPY and ADD share (unexpanded here).
    #[serde(flatten)]
    pub options: CopyOptions,
    /// The arguments were a JSON array.
    pub json: bool,
}

/// The flags of COPY and ADD, as written in [`FileCommand`] and expanded in the graph's
/// copy op.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CopyOptions {
    /// `--chown`.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<String>,
    /// `--link`.
    pub link: bool,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
    /// `--parents` (COPY only).
    pub parents: bool,
    /// `--checksum` (ADD only).
    pub checksum: Option<String>,
    /// `--keep-git-dir` (ADD only).
    pub keep_git_dir: bool,
    /// `--unpack` (ADD only): `None` means the default (local archives are unpacked).
    pub unpack: Option<bool>,
}

/// A COPY/ADD source given as a heredoc.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InlineSource {
    /// The file name (the heredoc delimiter).
    pub path: String,
    /// The content (tabs chomped for `<<-`).
    pub data: String,
    /// Whether variables in the content are expanded.
    pub expand: bool,
}

/// A `KEY=VALUE` of ENV or LABEL, unexpanded.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct KeyValue {
    /// The key as written.
    pub key: String,
    /// The value as written.
    pub value: String,
}

/// One name of an `ARG`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ArgDefinition {
    /// The name.
    pub name: String,
    /// The default value as written, if any.
    pub default: Option<String>,
}

/// `HEALTHCHECK`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Healthcheck {
    /// The test: `["NONE"]`, `["CMD", args...]`, or `["CMD-SHELL", command]` as in the image config.
    pub test: Vec<String>,
    /// `--interval`.
    pub interval: Option<Duration>,
    /// `--timeout`.
    pub timeout: Option<Duration>,
    /// `--start-period`.
    pub start_period: Option<Duration>,
    /// `--start-interval`.
    pub start_interval: Option<Duration>,
    /// `--retries`.
    pub retries: Option<u32>,
}

/// `ONBUILD`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OnbuildCommand {
    /// The trigger's text, as stored in the image config.
    pub expression: String,
    /// The trigger, parsed and validated now so errors show at its line.
    pub trigger: Box<Command>,
}

/// Converts every node of a parsed Dockerfile.
pub fn parse_instructions(dockerfile: &Dockerfile) -> Result<Vec<Instruction>, Error> {
    dockerfile.nodes.iter().map(parse_instruction).collect()
}

/// Converts one node into a typed instruction, validating flags and arguments.
pub fn parse_instruction(node: &Node) -> Result<Instruction, Error> {
    let command = parse_command(node)
        .map_err(|kind| Error::at(kind, node.location, node.original.as_str()))?;
    Ok(Instruction {
        command,
        location: node.location,
        original: node.original.clone(),
    })
}

fn parse_command(node: &Node) -> Result<Command, ErrorKind> {
    let name = node.command.as_str();
    let upper = name.to_uppercase();
    let arguments = &node.arguments;
    let command = match name {
        "from" => {
            let mut flags = Flags::parse(node, &[("platform", FlagKind::String)])?;
            let (image, name) = match arguments.as_slice() {
                [image] => (image.clone(), None),
                [image, keyword, stage] if keyword.eq_ignore_ascii_case("as") => {
                    let stage = stage.to_lowercase();
                    if !is_valid_stage_name(&stage) {
                        return Err(ErrorKind::InvalidStageName(stage));
                    }
                    (image.clone(), Some(stage))
                }
                _ => {
                    return Err(ErrorKind::Arguments(
                        "FROM requires either one or three arguments".into(),
                    ));
                }
            };
            Command::From(FromCommand {
                image,
                name,
                platform: flags.take_string("platform"),
            })
        }
        "run" => {
            let mut flags = Flags::parse(
                node,
                &[
                    ("mount", FlagKind::Strings),
                    ("network", FlagKind::String),
                    ("security", FlagKind::String),
                ],
            )?;
            let command = command_line(node, "RUN")?;
            let mounts = flags
                .take_strings("mount")
                .iter()
                .map(|value| parse_mount(value))
                .collect::<Result<Vec<_>, _>>()?;
            let network = match flags.take_string("network").as_deref() {
                None | Some("default") => NetworkMode::Default,
                Some("none") => NetworkMode::None,
                Some("host") => NetworkMode::Host,
                Some(other) => {
                    return Err(invalid(
                        "network",
                        format!("unsupported network mode {other:?} (use default, none or host)"),
                    ));
                }
            };
            let security = match flags.take_string("security").as_deref() {
                None | Some("sandbox") => SecurityMode::Sandbox,
                Some("insecure") => SecurityMode::Insecure,
                Some(other) => {
                    return Err(invalid(
                        "security",
                        format!("unsupported security mode {other:?} (use sandbox or insecure)"),
                    ));
                }
            };
            Command::Run(RunCommand {
                command,
                mounts,
                network,
                security,
            })
        }
        "copy" | "add" => {
            let is_add = name == "add";
            let mut specification = vec![
                ("chown", FlagKind::String),
                ("chmod", FlagKind::String),
                ("link", FlagKind::Bool),
                ("exclude", FlagKind::Strings),
            ];
            if is_add {
                specification.extend([
                    ("checksum", FlagKind::String),
                    ("keep-git-dir", FlagKind::Bool),
                    ("unpack", FlagKind::Bool),
                ]);
            } else {
                specification.extend([("from", FlagKind::String), ("parents", FlagKind::Bool)]);
            }
            let mut flags = Flags::parse(node, &specification)?;
            let file = file_command(node, &upper, &mut flags)?;
            if is_add {
                Command::Add(file)
            } else {
                Command::Copy(file)
            }
        }
        "cmd" => {
            Flags::parse(node, &[])?;
            Command::Cmd(command_line(node, "CMD")?)
        }
        "entrypoint" => {
            Flags::parse(node, &[])?;
            Command::Entrypoint(command_line(node, "ENTRYPOINT")?)
        }
        "shell" => {
            Flags::parse(node, &[])?;
            if !node.json {
                return Err(ErrorKind::Arguments(
                    "SHELL requires the arguments to be in JSON form".into(),
                ));
            }
            if arguments.is_empty() {
                return Err(ErrorKind::Arguments(
                    "SHELL requires at least one argument".into(),
                ));
            }
            Command::Shell(arguments.clone())
        }
        "env" | "label" => {
            Flags::parse(node, &[])?;
            if arguments.is_empty() {
                return Err(ErrorKind::Arguments(format!(
                    "{upper} requires at least one argument"
                )));
            }
            let pairs = arguments
                .chunks(3)
                .map(|triple| KeyValue {
                    key: triple[0].clone(),
                    value: triple[1].clone(),
                })
                .collect::<Vec<_>>();
            if pairs.iter().any(|pair| pair.key.is_empty()) {
                return Err(ErrorKind::Arguments(format!(
                    "{upper} names must not be empty"
                )));
            }
            if name == "env" {
                Command::Env(pairs)
            } else {
                Command::Label(pairs)
            }
        }
        "arg" => {
            Flags::parse(node, &[])?;
            if arguments.is_empty() {
                return Err(ErrorKind::Arguments(
                    "ARG requires at least one argument".into(),
                ));
            }
            let definitions = arguments
                .iter()
                .map(|word| {
                    let (name, default) = match word.split_once('=') {
                        Some((name, default)) => (name.to_string(), Some(default.to_string())),
                        None => (word.clone(), None),
                    };
                    if name.is_empty() {
                        return Err(ErrorKind::Arguments(format!(
                            "ARG names can not be blank: {word:?}"
                        )));
                    }
                    Ok(ArgDefinition { name, default })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Command::Arg(definitions)
        }
        "workdir" | "user" | "stopsignal" | "maintainer" => {
            Flags::parse(node, &[])?;
            let [value] = arguments.as_slice() else {
                return Err(ErrorKind::Arguments(format!(
                    "{upper} requires exactly one argument"
                )));
            };
            let value = value.clone();
            match name {
                "workdir" => Command::Workdir(value),
                "user" => Command::User(value),
                "stopsignal" => Command::StopSignal(value),
                _ => Command::Maintainer(value),
            }
        }
        "expose" | "volume" => {
            Flags::parse(node, &[])?;
            if arguments.is_empty() {
                return Err(ErrorKind::Arguments(format!(
                    "{upper} requires at least one argument"
                )));
            }
            if name == "expose" {
                Command::Expose(arguments.clone())
            } else {
                Command::Volume(arguments.clone())
            }
        }
        "healthcheck" => Command::Healthcheck(parse_healthcheck(node)?),
        "onbuild" => {
            Flags::parse(node, &[])?;
            let Some(trigger) = &node.subcommand else {
                return Err(ErrorKind::Arguments(
                    "ONBUILD requires at least one argument".into(),
                ));
            };
            if matches!(trigger.command.as_str(), "onbuild" | "from" | "maintainer") {
                return Err(ErrorKind::OnbuildNotAllowed(trigger.command.to_uppercase()));
            }
            // The trigger is stored as text and parsed again when it fires, so heredoc bodies
            // travel with it: `RUN <<EOF` alone would be an unterminated heredoc.
            let mut expression = trigger.original.clone();
            for heredoc in &trigger.heredocs {
                expression.push('\n');
                expression.push_str(&heredoc.content);
                expression.push_str(&heredoc.name);
            }
            Command::Onbuild(OnbuildCommand {
                expression,
                trigger: Box::new(parse_command(trigger)?),
            })
        }
        other => {
            return Err(ErrorKind::UnknownInstruction {
                instruction: node
                    .original
                    .split_whitespace()
                    .next()
                    .unwrap_or(other)
                    .to_string(),
                suggestion: suggest(other, INSTRUCTION_NAMES),
            });
        }
    };
    Ok(command)
}

fn invalid(flag: &str, problem: String) -> ErrorKind {
    ErrorKind::InvalidFlagValue {
        flag: flag.to_string(),
        problem,
    }
}

/// BuildKit's rule for stage names.
fn is_valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
}

fn command_line(node: &Node, name: &str) -> Result<CommandLine, ErrorKind> {
    if node.arguments.is_empty() && node.heredocs.is_empty() && name == "RUN" {
        return Err(ErrorKind::Arguments(
            "RUN requires at least one argument".into(),
        ));
    }
    Ok(CommandLine {
        arguments: node.arguments.clone(),
        prepend_shell: !node.json,
        files: node.heredocs.clone(),
    })
}

fn file_command(node: &Node, name: &str, flags: &mut Flags) -> Result<FileCommand, ErrorKind> {
    let arguments = &node.arguments;
    if arguments.len() < 2 {
        return Err(ErrorKind::Arguments(format!(
            "{name} requires at least two arguments, but only {} provided: the destination could not be determined",
            if arguments.is_empty() {
                "none was".to_string()
            } else {
                "one was".to_string()
            }
        )));
    }
    let (destination, sources) = arguments.split_last().expect("at least two arguments");
    let mut heredocs = node.heredocs.iter();
    let mut plain_sources = Vec::new();
    let mut inline_sources = Vec::new();
    if !node.json && parse_heredoc_marker(destination)?.is_some() {
        return Err(ErrorKind::Arguments(format!(
            "{name} cannot accept a heredoc as a destination"
        )));
    }
    for source in sources {
        let marker = if node.json {
            None
        } else {
            parse_heredoc_marker(source)?
        };
        match marker {
            Some(marker) => {
                let heredoc = heredocs.next().ok_or_else(|| {
                    ErrorKind::Arguments(format!("{name} heredoc marker {source:?} has no content"))
                })?;
                inline_sources.push(InlineSource {
                    path: marker.name,
                    data: heredoc.effective_content(),
                    expand: heredoc.expand,
                });
            }
            None => plain_sources.push(source.clone()),
        }
    }
    let checksum = flags.take_string("checksum");
    if let Some(checksum) = &checksum {
        if plain_sources.len() != 1 || !inline_sources.is_empty() {
            return Err(invalid(
                "checksum",
                "a checksum can't be specified for multiple sources".into(),
            ));
        }
        if checksum.is_empty() {
            return Err(invalid("checksum", "the checksum is empty".into()));
        }
    }
    Ok(FileCommand {
        sources: plain_sources,
        inline_sources,
        destination: destination.clone(),
        from: flags.take_string("from"),
        options: CopyOptions {
            chown: flags.take_string("chown"),
            chmod: flags.take_string("chmod"),
            link: flags.take_bool("link"),
            exclude: flags.take_strings("exclude"),
            parents: flags.take_bool("parents"),
            checksum,
            keep_git_dir: flags.take_bool("keep-git-dir"),
            unpack: flags.take_optional_bool("unpack"),
        },
        json: node.json,
    })
}

fn parse_healthcheck(node: &Node) -> Result<Healthcheck, ErrorKind> {
    let mut flags = Flags::parse(
        node,
        &[
            ("interval", FlagKind::String),
            ("timeout", FlagKind::String),
            ("start-period", FlagKind::String),
            ("start-interval", FlagKind::String),
            ("retries", FlagKind::String),
        ],
    )?;
    let Some((kind, rest)) = node.arguments.split_first() else {
        return Err(ErrorKind::Arguments(
            "HEALTHCHECK requires an argument: CMD or NONE".into(),
        ));
    };
    let test = match kind.to_uppercase().as_str() {
        "NONE" => {
            if !rest.is_empty() || !node.flags.is_empty() {
                return Err(ErrorKind::Arguments(
                    "HEALTHCHECK NONE takes no arguments".into(),
                ));
            }
            return Ok(Healthcheck {
                test: vec!["NONE".into()],
                interval: None,
                timeout: None,
                start_period: None,
                start_interval: None,
                retries: None,
            });
        }
        "CMD" => {
            if rest.is_empty() {
                return Err(ErrorKind::Arguments(
                    "missing command after HEALTHCHECK CMD".into(),
                ));
            }
            let mut test = vec![if node.json { "CMD" } else { "CMD-SHELL" }.to_string()];
            test.extend(rest.iter().cloned());
            test
        }
        other => {
            return Err(ErrorKind::Arguments(format!(
                "unknown type {other:?} in HEALTHCHECK (try CMD)"
            )));
        }
    };
    let mut duration = |flag: &str| -> Result<Option<Duration>, ErrorKind> {
        let Some(text) = flags.take_string(flag) else {
            return Ok(None);
        };
        let value = parse_go_duration(&text).ok_or_else(|| {
            invalid(
                flag,
                format!("{text:?} is not a duration such as 30s or 1m30s"),
            )
        })?;
        if !value.is_zero() && value < Duration::from_millis(1) {
            return Err(invalid(flag, format!("{text:?} cannot be less than 1ms")));
        }
        Ok(Some(value))
    };
    let interval = duration("interval")?;
    let timeout = duration("timeout")?;
    let start_period = duration("start-period")?;
    let start_interval = duration("start-interval")?;
    let retries = match flags.take_string("retries") {
        None => None,
        Some(text) => Some(text.parse::<u32>().map_err(|_| {
            invalid(
                "retries",
                format!("{text:?} is not a whole number of at least 0"),
            )
        })?),
    };
    Ok(Healthcheck {
        test,
        interval,
        timeout,
        start_period,
        start_interval,
        retries,
    })
}

/// Go's `time.ParseDuration` for non-negative values: `1h2m3.5s`, `300ms`, `0`.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_end == 0 {
            return None;
        }
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += number * scale;
    }
    if !total.is_finite() || total > 1e12 {
        return None;
    }
    Some(Duration::from_secs_f64(total))
}

/// Parses `type=cache,target=/x,...` (CSV, as BuildKit reads it).
fn parse_mount(value: &str) -> Result<Mount, ErrorKind> {
    let mut mount = Mount {
        mount_type: MountType::Bind,
        target: None,
        source: None,
        from: None,
        id: None,
        read_only: true,
        sharing: CacheSharing::Shared,
        mode: None,
        uid: None,
        gid: None,
        size: None,
        required: false,
        env: None,
    };
    let fields = split_csv(value).map_err(|problem| invalid("mount", problem))?;
    let mut read_only: Option<bool> = None;
    for field in &fields {
        if let Some(kind) = field.strip_prefix("type=") {
            mount.mount_type = match kind.to_lowercase().as_str() {
                "bind" => MountType::Bind,
                "cache" => MountType::Cache,
                "tmpfs" => MountType::Tmpfs,
                "secret" => MountType::Secret,
                "ssh" => MountType::Ssh,
                other => {
                    return Err(invalid(
                        "mount",
                        format!("unsupported mount type {other:?}"),
                    ));
                }
            };
        }
    }
    for field in fields {
        let (key, value) = match field.split_once('=') {
            Some((key, value)) => (key.trim().to_lowercase(), Some(value.to_string())),
            None => (field.trim().to_lowercase(), None),
        };
        let required_value = |value: Option<String>| {
            value.ok_or_else(|| invalid("mount", format!("{key} needs a value, as {key}=...")))
        };
        let boolean = |value: &Option<String>| -> Result<bool, ErrorKind> {
            match value.as_deref().map(str::to_lowercase).as_deref() {
                None | Some("") | Some("true") | Some("1") => Ok(true),
                Some("false") | Some("0") => Ok(false),
                Some(other) => Err(invalid(
                    "mount",
                    format!("invalid value {other:?} for {key}"),
                )),
            }
        };
        let number = |value: Option<String>, radix: u32| -> Result<u32, ErrorKind> {
            let text = value.ok_or_else(|| invalid("mount", format!("{key} needs a value")))?;
            u32::from_str_radix(&text, radix)
                .map_err(|_| invalid("mount", format!("invalid {key} {text:?}")))
        };
        match key.as_str() {
            "type" => {}
            "target" | "dst" | "destination" => mount.target = Some(required_value(value)?),
            "source" | "src" => mount.source = Some(required_value(value)?),
            "from" => mount.from = Some(required_value(value)?),
            "id" => mount.id = Some(required_value(value)?),
            "readonly" | "ro" => read_only = Some(boolean(&value)?),
            "readwrite" | "rw" => read_only = Some(!boolean(&value)?),
            "sharing" => {
                if mount.mount_type != MountType::Cache {
                    return Err(invalid("mount", "sharing is only for cache mounts".into()));
                }
                mount.sharing = match required_value(value)?.to_lowercase().as_str() {
                    "shared" => CacheSharing::Shared,
                    "private" => CacheSharing::Private,
                    "locked" => CacheSharing::Locked,
                    other => {
                        return Err(invalid(
                            "mount",
                            format!("unsupported sharing value {other:?}"),
                        ));
                    }
                };
            }
            "mode" => mount.mode = Some(number(value, 8)?),
            "uid" => mount.uid = Some(number(value, 10)?),
            "gid" => mount.gid = Some(number(value, 10)?),
            "size" => {
                if mount.mount_type != MountType::Tmpfs {
                    return Err(invalid("mount", "size is only for tmpfs mounts".into()));
                }
                let text = required_value(value)?;
                mount.size = Some(
                    parse_size(&text)
                        .ok_or_else(|| invalid("mount", format!("invalid size {text:?}")))?,
                );
            }
            "required" => mount.required = boolean(&value)?,
            "env" => mount.env = Some(required_value(value)?),
            other => {
                return Err(invalid(
                    "mount",
                    format!("unexpected key {other:?} in {field:?}"),
                ));
            }
        }
    }
    mount.read_only = read_only.unwrap_or(matches!(mount.mount_type, MountType::Bind));
    match mount.mount_type {
        MountType::Secret if mount.id.is_none() && mount.target.is_none() => {
            return Err(invalid(
                "mount",
                "a secret mount needs id= or target=".into(),
            ));
        }
        MountType::Secret | MountType::Ssh => {}
        _ if mount.target.is_none() => {
            return Err(invalid(
                "mount",
                "target= is required for this mount type".into(),
            ));
        }
        _ => {}
    }
    Ok(mount)
}

/// Splits one CSV record (RFC 4180 quoting) as Go's encoding/csv does for `--mount`.
fn split_csv(text: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut in_quotes = false;
    let mut field_started_quoted = false;
    while let Some(c) = chars.next() {
        if in_quotes {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    field.push('"');
                } else {
                    in_quotes = false;
                }
            } else {
                field.push(c);
            }
        } else if c == '"' && (field.is_empty() || field.ends_with('=')) && !field_started_quoted {
            in_quotes = true;
            field_started_quoted = true;
        } else if c == ',' {
            fields.push(std::mem::take(&mut field));
            field_started_quoted = false;
        } else {
            field.push(c);
        }
    }
    if in_quotes {
        return Err(format!("unterminated quote in {text:?}"));
    }
    fields.push(field);
    Ok(fields
        .into_iter()
        .filter(|field| !field.is_empty())
        .collect())
}

/// Sizes as `docker run --memory` takes them: bytes, or with b, k, m, g, t (powers of 1024).
pub fn parse_size(text: &str) -> Option<u64> {
    let lower = text.trim().to_lowercase();
    let digits_end = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let number: f64 = lower[..digits_end].parse().ok()?;
    let multiplier: f64 = match lower[digits_end..].trim() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0_f64.powi(4),
        _ => return None,
    };
    let bytes = number * multiplier;
    (0.0..1.8e19).contains(&bytes).then_some(bytes as u64)
}

#[derive(Clone, Copy, PartialEq)]
enum FlagKind {
    String,
    Strings,
    Bool,
}

/// The flags of one instruction, checked against what it accepts (BuildKit's BFlags).
struct Flags {
    values: Vec<(&'static str, Vec<String>)>,
}

impl Flags {
    fn parse(node: &Node, accepted: &[(&'static str, FlagKind)]) -> Result<Self, ErrorKind> {
        let mut values: Vec<(&'static str, Vec<String>)> = Vec::new();
        for word in &node.flags {
            let body = word.strip_prefix("--").unwrap_or(word);
            let (name, value) = match body.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (body, None),
            };
            let names: Vec<&str> = accepted.iter().map(|(name, _)| *name).collect();
            let Some((name, kind)) = accepted.iter().find(|(accepted, _)| *accepted == name) else {
                return Err(ErrorKind::UnknownFlag {
                    flag: name.to_string(),
                    suggestion: suggest(name, &names),
                });
            };
            let value = match (kind, value) {
                (FlagKind::Bool, None) => "true".to_string(),
                (FlagKind::Bool, Some(value)) => match value.to_lowercase().as_str() {
                    "true" => "true".to_string(),
                    "false" => "false".to_string(),
                    _ => {
                        return Err(invalid(
                            name,
                            format!("expecting a boolean value, not {value:?}"),
                        ));
                    }
                },
                (_, None) => return Err(invalid(name, "missing a value, as --name=value".into())),
                (_, Some(value)) => value.to_string(),
            };
            match values.iter_mut().find(|(existing, _)| existing == name) {
                Some(_) if *kind != FlagKind::Strings => {
                    return Err(ErrorKind::DuplicateFlag(name.to_string()));
                }
                Some((_, existing)) => existing.push(value),
                None => values.push((name, vec![value])),
            }
        }
        Ok(Self { values })
    }

    fn take_strings(&mut self, name: &str) -> Vec<String> {
        match self
            .values
            .iter()
            .position(|(existing, _)| *existing == name)
        {
            Some(index) => self.values.swap_remove(index).1,
            None => Vec::new(),
        }
    }

    fn take_string(&mut self, name: &str) -> Option<String> {
        self.take_strings(name).pop()
    }

    fn take_optional_bool(&mut self, name: &str) -> Option<bool> {
        self.take_string(name).map(|value| value == "true")
    }

    fn take_bool(&mut self, name: &str) -> bool {
        self.take_optional_bool(name).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::parse;

    fn command(line: &str) -> Result<Command, Error> {
        let dockerfile = parse(&format!("FROM base\n{line}\n")).map_err(|error| {
            panic!("parse failed: {error}");
        })?;
        parse_instruction(&dockerfile.nodes[1]).map(|instruction| instruction.command)
    }

    #[test]
    fn from_with_platform_and_name() {
        let dockerfile = parse("FROM --platform=$BUILDPLATFORM golang:1.22 AS Build\n").unwrap();
        let Command::From(from) = parse_instruction(&dockerfile.nodes[0]).unwrap().command else {
            panic!("not FROM");
        };
        assert_eq!(from.image, "golang:1.22");
        assert_eq!(from.name.as_deref(), Some("build"));
        assert_eq!(from.platform.as_deref(), Some("$BUILDPLATFORM"));
    }

    #[test]
    fn bad_stage_name_and_arity() {
        let dockerfile = parse("FROM a AS 1x\nFROM a b\n").unwrap();
        let error = parse_instruction(&dockerfile.nodes[0]).unwrap_err();
        assert!(matches!(error.kind, ErrorKind::InvalidStageName(_)));
        let error = parse_instruction(&dockerfile.nodes[1]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "FROM a b: FROM requires either one or three arguments"
        );
        assert_eq!(error.location, Some(Location::line(2)));
    }

    #[test]
    fn unknown_instruction_suggests() {
        let error = command("COPPY a b").unwrap_err();
        assert!(matches!(
            error.kind,
            ErrorKind::UnknownInstruction {
                suggestion: Some("copy"),
                ..
            }
        ));
        assert_eq!(error.hint().as_deref(), Some("did you mean COPY?"));
    }

    #[test]
    fn unknown_flag_suggests() {
        let error = command("COPY --chwon=1 a /b").unwrap_err();
        assert!(matches!(
            error.kind,
            ErrorKind::UnknownFlag { ref flag, suggestion: Some("chown") } if flag == "chwon"
        ));
        assert!(command("ADD --from=x a /b").is_err(), "ADD takes no --from");
        assert!(
            command("COPY --checksum=sha256:00 a /b").is_err(),
            "COPY takes no --checksum"
        );
    }

    #[test]
    fn copy_with_every_flag() {
        let Command::Copy(copy) = command(
            "COPY --from=build --chown=1:2 --chmod=0755 --link --exclude=*.md --exclude=tmp --parents a b /dest/",
        )
        .unwrap() else {
            panic!("not COPY");
        };
        assert_eq!(copy.from.as_deref(), Some("build"));
        assert_eq!(copy.options.chown.as_deref(), Some("1:2"));
        assert_eq!(copy.options.chmod.as_deref(), Some("0755"));
        assert!(copy.options.link && copy.options.parents);
        assert_eq!(copy.options.exclude, vec!["*.md", "tmp"]);
        assert_eq!(copy.sources, vec!["a", "b"]);
        assert_eq!(copy.destination, "/dest/");
    }

    #[test]
    fn add_flags() {
        let Command::Add(add) = command("ADD --checksum=sha256:abc --keep-git-dir=true --unpack=false http://127.0.0.1/x.tar /x").unwrap() else {
            panic!("not ADD");
        };
        assert_eq!(add.options.checksum.as_deref(), Some("sha256:abc"));
        assert!(add.options.keep_git_dir);
        assert_eq!(add.options.unpack, Some(false));
        assert!(command("ADD --link=maybe a /b").is_err());
        assert!(command("COPY --chown=1 --chown=2 a /b").is_err());
    }

    #[test]
    fn copy_heredoc_sources() {
        let dockerfile =
            parse("FROM a\nCOPY <<EOF <<-'TWO' file /dest/\nhello $X\nEOF\n\tworld\nTWO\n")
                .unwrap();
        let Command::Copy(copy) = parse_instruction(&dockerfile.nodes[1]).unwrap().command else {
            panic!("not COPY");
        };
        assert_eq!(copy.sources, vec!["file"]);
        assert_eq!(copy.inline_sources.len(), 2);
        assert_eq!(copy.inline_sources[0].path, "EOF");
        assert_eq!(copy.inline_sources[0].data, "hello $X\n");
        assert!(copy.inline_sources[0].expand);
        assert_eq!(copy.inline_sources[1].path, "TWO");
        assert_eq!(copy.inline_sources[1].data, "world\n");
        assert!(!copy.inline_sources[1].expand);
    }

    #[test]
    fn copy_needs_destination() {
        let error = command("COPY onlyone").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("requires at least two arguments")
        );
    }

    #[test]
    fn run_mounts_network_security() {
        let Command::Run(run) = command(
            "RUN --mount=type=cache,target=/root/.cache,sharing=locked,id=go --mount=type=bind,from=build,source=/out,target=/in,rw --mount=type=tmpfs,target=/tmp,size=64m --mount=type=secret,id=token,required --mount=type=ssh --network=none --security=insecure make",
        )
        .unwrap() else {
            panic!("not RUN");
        };
        assert_eq!(run.mounts.len(), 5);
        assert_eq!(run.mounts[0].mount_type, MountType::Cache);
        assert_eq!(run.mounts[0].sharing, CacheSharing::Locked);
        assert!(!run.mounts[0].read_only);
        assert_eq!(run.mounts[1].from.as_deref(), Some("build"));
        assert!(!run.mounts[1].read_only);
        assert_eq!(run.mounts[2].size, Some(64 * 1024 * 1024));
        assert!(run.mounts[3].required);
        assert_eq!(run.mounts[4].mount_type, MountType::Ssh);
        assert_eq!(run.network, NetworkMode::None);
        assert_eq!(run.security, SecurityMode::Insecure);
        assert_eq!(run.command.arguments, vec!["make"]);
        assert!(run.command.prepend_shell);
    }

    #[test]
    fn bad_mounts_are_errors() {
        assert!(command("RUN --mount=type=nfs,target=/x true").is_err());
        assert!(
            command("RUN --mount=type=cache true").is_err(),
            "cache needs a target"
        );
        assert!(command("RUN --mount=type=bind,target=/x,colour=red true").is_err());
        assert!(command("RUN --mount=type=bind,target=/x,sharing=locked true").is_err());
        assert!(command("RUN --network=bridge true").is_err());
    }

    #[test]
    fn healthcheck_forms() {
        let Command::Healthcheck(check) = command(
            "HEALTHCHECK --interval=5s --timeout=1m30s --start-period=0s --retries=3 CMD curl -f x",
        )
        .unwrap() else {
            panic!("not HEALTHCHECK");
        };
        assert_eq!(check.test, vec!["CMD-SHELL", "curl -f x"]);
        assert_eq!(check.interval, Some(Duration::from_secs(5)));
        assert_eq!(check.timeout, Some(Duration::from_secs(90)));
        assert_eq!(check.start_period, Some(Duration::ZERO));
        assert_eq!(check.retries, Some(3));
        let Command::Healthcheck(check) =
            command("HEALTHCHECK CMD [\"/bin/check\", \"-q\"]").unwrap()
        else {
            panic!("not HEALTHCHECK");
        };
        assert_eq!(check.test, vec!["CMD", "/bin/check", "-q"]);
        let Command::Healthcheck(check) = command("HEALTHCHECK NONE").unwrap() else {
            panic!("not HEALTHCHECK");
        };
        assert_eq!(check.test, vec!["NONE"]);
        assert!(command("HEALTHCHECK NONE extra").is_err());
        assert!(command("HEALTHCHECK CONNECT TCP 7000").is_err());
        assert!(command("HEALTHCHECK --interval=5 CMD x").is_err());
        assert!(command("HEALTHCHECK --retries=-1 CMD x").is_err());
    }

    #[test]
    fn onbuild_rules() {
        let Command::Onbuild(onbuild) = command("ONBUILD RUN echo hi").unwrap() else {
            panic!("not ONBUILD");
        };
        assert_eq!(onbuild.expression, "RUN echo hi");
        let dockerfile = parse("FROM a\nONBUILD RUN <<EOF\necho one\nEOF\n").unwrap();
        let Command::Onbuild(onbuild) = parse_instruction(&dockerfile.nodes[1]).unwrap().command
        else {
            panic!("not ONBUILD");
        };
        assert_eq!(onbuild.expression, "RUN <<EOF\necho one\nEOF");
        assert!(matches!(*onbuild.trigger, Command::Run(_)));
        let error = command("ONBUILD ONBUILD RUN x").unwrap_err();
        assert!(matches!(error.kind, ErrorKind::OnbuildNotAllowed(_)));
        assert!(command("ONBUILD FROM x").is_err());
        assert!(command("ONBUILD COPPY a b").is_err());
    }

    #[test]
    fn shell_must_be_json() {
        assert!(command("SHELL /bin/bash -c").is_err());
        assert_eq!(
            command("SHELL [\"/bin/bash\", \"-c\"]").unwrap(),
            Command::Shell(vec!["/bin/bash".into(), "-c".into()])
        );
    }

    #[test]
    fn env_label_arg_forms() {
        assert_eq!(
            command("ENV A=1 B=\"two words\"").unwrap(),
            Command::Env(vec![
                KeyValue {
                    key: "A".into(),
                    value: "1".into()
                },
                KeyValue {
                    key: "B".into(),
                    value: "\"two words\"".into()
                },
            ])
        );
        assert_eq!(
            command("LABEL maintainer someone here").unwrap(),
            Command::Label(vec![KeyValue {
                key: "maintainer".into(),
                value: "someone here".into()
            }])
        );
        assert_eq!(
            command("ARG A B=2").unwrap(),
            Command::Arg(vec![
                ArgDefinition {
                    name: "A".into(),
                    default: None
                },
                ArgDefinition {
                    name: "B".into(),
                    default: Some("2".into())
                },
            ])
        );
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_go_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_go_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration("-5s"), None);
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("10x"), None);
    }
}
