//! The command line: clap structs only, then the hand-over to validated options and commands.
//!
//! `rbuild -t app:v1 .` is `rbuild build -t app:v1 .`: when the first word after the global
//! options is not a command, `build` is assumed, as the contract says.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::commands;
use crate::options::{BuildOptions, Status, UsageError};

/// Build OCI images from Dockerfiles: parallel, content-cached, reproducible.
#[derive(Debug, Parser)]
#[command(
    name = "rbuild",
    version,
    about,
    after_help = "With no command, `build` is assumed: `rbuild -t app:v1 .` is `rbuild build -t app:v1 .`\n\nExit status: 0 success; 1 the build or command failed (a bad Dockerfile, a failing step, a missing file); 2 bad command-line usage; 3 an internal error in rbuild."
)]
pub struct Cli {
    /// Directory holding all state: content store, image store, cache, snapshots
    /// [default: /var/lib/rbuild as root, else $XDG_DATA_HOME/rbuild]
    #[arg(long, global = true, env = "RBUILD_ROOT", value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// Reach this registry (HOST[:PORT]) over plain HTTP; loopback registries always are
    /// (repeatable, or comma-separated)
    #[arg(
        long = "insecure-registry",
        global = true,
        env = "RBUILD_INSECURE_REGISTRIES",
        value_delimiter = ',',
        value_name = "HOST"
    )]
    pub insecure_registries: Vec<String>,

    /// The command to run.
    #[command(subcommand)]
    pub command: CommandLine,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum CommandLine {
    /// Build an image from a Dockerfile and a context directory (the default command).
    Build(Box<BuildArguments>),
    /// List the images in the local store.
    Images(ImagesArguments),
    /// Show an image's manifest digest and OCI config as JSON.
    Inspect(InspectArguments),
    /// Give an image another name.
    Tag(TagArguments),
    /// Remove image names (the content goes at the next `rbuild prune`).
    Rmi(RmiArguments),
    /// Write images to an OCI layout tar that `docker load` also reads.
    Save(SaveArguments),
    /// Read images from an OCI layout tar or a docker-archive tar.
    Load(LoadArguments),
    /// Turn a rootfs tarball into a one-layer image.
    Import(ImportArguments),
    /// Delete content no image or cache record needs.
    Prune(PruneArguments),
    /// Show the disk space used under the root.
    Du(DuArguments),
    /// Re-hash every blob and check every image is whole.
    Verify,
    /// Run a command in a new container from an image of the local store.
    Run(Box<RunArguments>),
    /// Fetch an image from its registry into the local store.
    Pull(PullArguments),
    /// Send an image of the local store to the registry its name points at.
    Push(PushArguments),
    /// Log in to a registry: check the credentials, then keep them in the Docker config.
    Login(LoginArguments),
    /// Forget the credentials kept for a registry.
    Logout(LogoutArguments),
}

/// `rbuild pull`.
#[derive(Debug, Args)]
pub struct PullArguments {
    /// The platform to pick from a multi-platform image, os/arch[/variant] [default: the host's].
    #[arg(long, value_name = "PLATFORM")]
    pub platform: Option<String>,
    /// The image: NAME[:TAG] or NAME@DIGEST.
    #[arg(value_name = "REF")]
    pub reference: String,
}

/// `rbuild push`.
#[derive(Debug, Args)]
pub struct PushArguments {
    /// The image name, which says the registry and repository: REGISTRY/NAME[:TAG].
    #[arg(value_name = "REF")]
    pub reference: String,
}

/// `rbuild login`.
#[derive(Debug, Args)]
pub struct LoginArguments {
    /// The user name [default: asked on standard input].
    #[arg(short = 'u', long = "username", value_name = "USER")]
    pub username: Option<String>,
    /// The password (visible to other users: prefer --password-stdin).
    #[arg(short = 'p', long = "password", value_name = "PASSWORD")]
    pub password: Option<String>,
    /// Read the password from standard input.
    #[arg(long, conflicts_with = "password")]
    pub password_stdin: bool,
    /// The registry: a host[:port], or docker.io.
    #[arg(value_name = "SERVER", default_value = "docker.io")]
    pub server: String,
}

/// `rbuild logout`.
#[derive(Debug, Args)]
pub struct LogoutArguments {
    /// The registry: a host[:port], or docker.io.
    #[arg(value_name = "SERVER", default_value = "docker.io")]
    pub server: String,
}

/// `rbuild run`.
#[derive(Debug, Args)]
#[command(trailing_var_arg = true)]
pub struct RunArguments {
    /// Remove the container's writable layer when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Set an environment variable; a bare KEY takes rbuild's own value (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE|KEY")]
    pub env: Vec<String>,
    /// Bind-mount a host path: HOST:CONTAINER[:ro|rw] (repeatable).
    #[arg(short = 'v', long = "volume", value_name = "HOST:CONTAINER[:ro|rw]")]
    pub volumes: Vec<String>,
    /// Working directory inside the container (created if missing).
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// User: name|uid[:group|gid], resolved in the image's /etc/passwd and /etc/group.
    #[arg(short = 'u', long = "user", value_name = "USER")]
    pub user: Option<String>,
    /// Replace the image's entrypoint (and drop its Cmd); "" clears it.
    #[arg(long, value_name = "COMMAND")]
    pub entrypoint: Option<String>,
    /// The container's network: none (only loopback) or the host's.
    #[arg(long, value_enum, default_value_t = RunNetwork::None)]
    pub network: RunNetwork,
    /// Memory limit: bytes, or with a unit b, k, m, g.
    #[arg(short = 'm', long, value_name = "BYTES")]
    pub memory: Option<String>,
    /// CPU limit in CPUs, as 1.5.
    #[arg(long, value_name = "N")]
    pub cpus: Option<String>,
    /// Limit on processes and threads.
    #[arg(long = "pids-limit", value_name = "N")]
    pub pids_limit: Option<u64>,
    /// Container hostname [default: the container id].
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// The image (name or id).
    #[arg(value_name = "IMAGE")]
    pub image: String,
    /// The command and its arguments [default: the image's Entrypoint and Cmd].
    #[arg(value_name = "COMMAND", allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// `rbuild run --network`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RunNetwork {
    /// A network namespace with only loopback.
    None,
    /// The host's network.
    Host,
}

/// `--format` of listing commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ListFormat {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// `rbuild images`.
#[derive(Debug, Args)]
pub struct ImagesArguments {
    /// Print image ids only.
    #[arg(short, long)]
    pub quiet: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ListFormat::Table)]
    pub format: ListFormat,
}

/// `rbuild inspect`.
#[derive(Debug, Args)]
pub struct InspectArguments {
    /// Image names or ids.
    #[arg(value_name = "IMAGE", required = true)]
    pub images: Vec<String>,
}

/// `rbuild tag`.
#[derive(Debug, Args)]
pub struct TagArguments {
    /// The image (name or id).
    #[arg(value_name = "SOURCE")]
    pub source: String,
    /// The new name.
    #[arg(value_name = "TARGET")]
    pub target: String,
}

/// `rbuild rmi`.
#[derive(Debug, Args)]
pub struct RmiArguments {
    /// Image names or ids.
    #[arg(value_name = "IMAGE", required = true)]
    pub images: Vec<String>,
    /// Remove every name of an image given by id.
    #[arg(short, long)]
    pub force: bool,
}

/// `rbuild save`.
#[derive(Debug, Args)]
pub struct SaveArguments {
    /// Write to this file instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Image names or ids.
    #[arg(value_name = "IMAGE", required = true)]
    pub images: Vec<String>,
}

/// `rbuild load`.
#[derive(Debug, Args)]
pub struct LoadArguments {
    /// Read from this file instead of standard input.
    #[arg(short, long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Print nothing but errors.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `rbuild import`.
#[derive(Debug, Args)]
pub struct ImportArguments {
    /// The rootfs tarball (plain, gzip or zstd); `-` reads standard input.
    #[arg(value_name = "ROOTFS.tar")]
    pub file: PathBuf,
    /// The name for the image.
    #[arg(value_name = "REF")]
    pub reference: String,
}

/// `rbuild prune`.
#[derive(Debug, Args)]
pub struct PruneArguments {
    /// Also drop the whole build cache and every snapshot.
    #[arg(short, long)]
    pub all: bool,
}

/// `rbuild du`.
#[derive(Debug, Args)]
pub struct DuArguments {
    /// Output format.
    #[arg(long, value_enum, default_value_t = ListFormat::Table)]
    pub format: ListFormat,
}

/// `rbuild build`.
#[derive(Debug, Args)]
pub struct BuildArguments {
    /// Name the result NAME[:TAG] in the local image store (repeatable).
    #[arg(short = 't', long = "tag", value_name = "NAME[:TAG]")]
    pub tags: Vec<String>,

    /// The Dockerfile [default: CONTEXT/Dockerfile]; `-` reads it from standard input.
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    pub file: Option<PathBuf>,

    /// Set a build argument; a bare KEY takes its value from the environment (repeatable).
    #[arg(long = "build-arg", value_name = "KEY=VALUE|KEY")]
    pub build_args: Vec<String>,

    /// Build this stage (and what it needs) instead of the last one.
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,

    /// Build for this platform, os/arch[/variant] [default: the host's].
    #[arg(long, value_name = "PLATFORM")]
    pub platform: Option<String>,

    /// Do not use the build cache: every step runs.
    #[arg(long)]
    pub no_cache: bool,

    /// How many steps may run at once (default: the number of cores).
    #[arg(long, short = 'j', value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: Option<u16>,

    /// How to show progress.
    #[arg(long, value_enum, default_value_t = ProgressArgument::Auto)]
    pub progress: ProgressArgument,

    /// Export the result: type=oci,dest=FILE.tar | type=docker,dest=FILE.tar |
    /// type=local,dest=DIR | type=tar,dest=FILE | type=image,name=REF[,push=true] (repeatable);
    /// oci and docker take name=REF; dest=- is standard output; `-o DIR` is type=local and
    /// `-o -` is type=tar to standard output.
    #[arg(short = 'o', long = "output", value_name = "SPEC")]
    pub outputs: Vec<String>,

    /// Import build cache: type=registry,ref=REF | type=local,src=DIR (repeatable).
    #[arg(long = "cache-from", value_name = "SPEC")]
    pub cache_from: Vec<String>,

    /// Export build cache: type=registry,ref=REF[,mode=min|max] | type=local,dest=DIR[,mode=min|max] (repeatable).
    #[arg(long = "cache-to", value_name = "SPEC")]
    pub cache_to: Vec<String>,

    /// Expose a secret to RUN --mount=type=secret: id=ID,src=PATH | id=ID,env=VAR (repeatable).
    #[arg(long = "secret", value_name = "SPEC")]
    pub secrets: Vec<String>,

    /// The network for RUN steps that do not set --network themselves.
    #[arg(long, value_enum, default_value_t = NetworkArgument::Default)]
    pub network: NetworkArgument,

    /// Write JSON about the build here: image and config digests, and each step's cache hit or
    /// miss with the reason for a miss.
    #[arg(long = "metadata-file", value_name = "FILE")]
    pub metadata_file: Option<PathBuf>,

    /// Parse and plan only: print the stages and steps in dependency order, with whether each
    /// would be a cache hit. Runs nothing and fetches nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// The format of the --dry-run plan.
    #[arg(long, value_enum, default_value_t = PlanFormat::Text, requires = "dry_run")]
    pub format: PlanFormat,

    /// The build context: a directory (.dockerignore honoured).
    #[arg(value_name = "CONTEXT")]
    pub context: PathBuf,
}

/// `--progress`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProgressArgument {
    /// `tty` on a terminal, else `plain`.
    Auto,
    /// One line per step event, BuildKit-like; step output never clipped.
    Plain,
    /// Live view of the steps running in parallel.
    Tty,
    /// Nothing but errors.
    Quiet,
}

/// `--network`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NetworkArgument {
    /// The build's default (host's network).
    Default,
    /// No network: only loopback.
    None,
    /// The host's network.
    Host,
}

/// `--format` of a dry run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlanFormat {
    /// For people.
    Text,
    /// For scripts.
    Json,
}

/// The commands that are not `build`; any other first word means `build`.
const COMMANDS: &[&str] = &[
    "build", "images", "inspect", "tag", "rmi", "save", "load", "import", "prune", "du", "verify",
    "run", "pull", "push", "login", "logout", "help",
];

/// Inserts `build` after the global options when no command is named.
pub fn with_default_command(arguments: Vec<OsString>) -> Vec<OsString> {
    let mut position = 1;
    while position < arguments.len() {
        let word = arguments[position].to_string_lossy();
        if word == "--root" || word == "--insecure-registry" {
            position += 2;
        } else if word.starts_with("--root=") || word.starts_with("--insecure-registry=") {
            position += 1;
        } else {
            break;
        }
    }
    let Some(word) = arguments
        .get(position)
        .map(|word| word.to_string_lossy().into_owned())
    else {
        return arguments;
    };
    if COMMANDS.contains(&word.as_str())
        || matches!(word.as_str(), "-h" | "--help" | "-V" | "--version")
    {
        return arguments;
    }
    let mut arguments = arguments;
    arguments.insert(position, OsString::from("build"));
    arguments
}

/// Parses the process's arguments, runs the command, and returns the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse_from(with_default_command(std::env::args_os().collect()));
    crate::registry::set_insecure_registries(cli.insecure_registries);
    let status = match cli.command {
        CommandLine::Build(arguments) => match BuildOptions::from_arguments(*arguments, cli.root) {
            Ok(options) => commands::build::run(&options),
            Err(error) => usage_failure(&error),
        },
        CommandLine::Run(arguments) => {
            let root = cli.root.unwrap_or_else(crate::options::default_root);
            return ExitCode::from(commands::run::run(&root, &arguments));
        }
        CommandLine::Pull(arguments) => {
            let root = cli.root.unwrap_or_else(crate::options::default_root);
            commands::registry::pull(&root, &arguments)
        }
        CommandLine::Push(arguments) => {
            let root = cli.root.unwrap_or_else(crate::options::default_root);
            commands::registry::push(&root, &arguments)
        }
        CommandLine::Login(arguments) => commands::login::login(&arguments),
        CommandLine::Logout(arguments) => commands::login::logout(&arguments),
        command => {
            let root = cli.root.unwrap_or_else(crate::options::default_root);
            commands::image::run(&root, command)
        }
    };
    ExitCode::from(status.code())
}

fn usage_failure(error: &UsageError) -> Status {
    eprintln!("error: {error}");
    eprintln!("\nFor more information, try '--help'.");
    Status::Usage
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<OsString> {
        text.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn build_is_the_default_command() {
        assert_eq!(
            with_default_command(words("rbuild -t x .")),
            words("rbuild build -t x .")
        );
        assert_eq!(
            with_default_command(words("rbuild .")),
            words("rbuild build .")
        );
        assert_eq!(
            with_default_command(words("rbuild --root /r -t x .")),
            words("rbuild --root /r build -t x .")
        );
        assert_eq!(
            with_default_command(words("rbuild --root=/r .")),
            words("rbuild --root=/r build .")
        );
        assert_eq!(
            with_default_command(words("rbuild build .")),
            words("rbuild build .")
        );
        assert_eq!(
            with_default_command(words("rbuild --help")),
            words("rbuild --help")
        );
        assert_eq!(with_default_command(words("rbuild")), words("rbuild"));
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
