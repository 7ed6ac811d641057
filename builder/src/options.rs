//! Validated, typed options: the command line is checked here, before any work starts, so a
//! bad `-o` or `--build-arg` is a usage error (exit 2) and not a failure halfway through.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rbuild_cache::Reference;
use rbuild_frontend::Platform;

use crate::cli::{BuildArguments, NetworkArgument, PlanFormat, ProgressArgument};

/// How the process ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Everything worked.
    Success,
    /// The build or command failed: a bad Dockerfile, a failing step, a missing file.
    Failure,
    /// The command line was wrong.
    Usage,
    /// rbuild itself went wrong.
    Internal,
}

impl Status {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Status::Success => 0,
            Status::Failure => 1,
            Status::Usage => 2,
            Status::Internal => 3,
        }
    }
}

/// A command-line mistake.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// `--build-arg` without a key.
    #[error("invalid --build-arg {0:?}: expected KEY=VALUE or KEY")]
    BuildArg(String),
    /// `-t` that is not a valid image name.
    #[error("invalid tag {tag:?}: {problem}")]
    Tag {
        /// The tag given.
        tag: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// `--platform` that is not os/arch[/variant].
    #[error("invalid --platform {0:?}: expected os/arch[/variant], as linux/amd64")]
    Platform(String),
    /// A `type=...,key=value` spec that is wrong.
    #[error("invalid {flag} {spec:?}: {problem}")]
    Spec {
        /// The flag (`--output`).
        flag: &'static str,
        /// The value given.
        spec: String,
        /// What is wrong.
        problem: String,
    },
}

/// Where the Dockerfile comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DockerfileSource {
    /// A file.
    Path(PathBuf),
    /// Standard input (`-f -`).
    Stdin,
}

/// An exporter for the build result (`-o`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// An OCI image layout tar.
    Oci {
        /// The tar file to write; `-` is standard output.
        dest: PathBuf,
        /// The image name recorded in the archive (`name=`); the `-t` tags when none.
        name: Option<String>,
    },
    /// A docker-archive tar (`docker load`).
    Docker {
        /// The tar file to write; `-` is standard output.
        dest: PathBuf,
        /// The name in `RepoTags` (`name=`); the `-t` tags when none.
        name: Option<String>,
    },
    /// The final filesystem, into a directory.
    Local {
        /// The directory.
        dest: PathBuf,
    },
    /// The final filesystem, as a tar.
    Tar {
        /// The tar file to write; `-` is standard output.
        dest: PathBuf,
    },
    /// An image in the store, optionally pushed.
    Image {
        /// The reference.
        name: String,
        /// Push it to its registry.
        push: bool,
    },
}

impl Output {
    /// The exporter's name, as `type=` spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Output::Oci { .. } => "oci",
            Output::Docker { .. } => "docker",
            Output::Local { .. } => "local",
            Output::Tar { .. } => "tar",
            Output::Image { .. } => "image",
        }
    }

    /// The file or directory written, if the exporter writes one.
    pub fn dest(&self) -> Option<&Path> {
        match self {
            Output::Oci { dest, .. }
            | Output::Docker { dest, .. }
            | Output::Local { dest }
            | Output::Tar { dest } => Some(dest),
            Output::Image { .. } => None,
        }
    }

    /// Whether the exporter writes to standard output (`dest=-`).
    pub fn to_stdout(&self) -> bool {
        self.dest().is_some_and(|dest| dest == Path::new("-"))
    }
}

/// Where build cache is imported from or exported to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheLocation {
    /// A registry reference.
    Registry {
        /// The reference.
        reference: String,
    },
    /// A local directory.
    Local {
        /// The directory.
        directory: PathBuf,
    },
}

/// `--cache-to`: where, and whether every intermediate step (`max`) or only the result's
/// layers (`min`) are exported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheExport {
    /// Where.
    pub location: CacheLocation,
    /// `mode=max`.
    pub all_steps: bool,
}

/// `--secret`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Secret {
    /// The id RUN --mount=type=secret,id=... names.
    pub id: String,
    /// Where the value comes from.
    pub source: SecretSource,
}

/// Where a secret's value comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    /// A file.
    File(PathBuf),
    /// An environment variable of rbuild's process.
    Environment(String),
}

/// Everything `rbuild build` needs, checked.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The state directory.
    pub root: PathBuf,
    /// The context directory.
    pub context: PathBuf,
    /// The Dockerfile.
    pub dockerfile: DockerfileSource,
    /// `-t`.
    pub tags: Vec<String>,
    /// `--build-arg`, bare keys resolved from the environment (and dropped when unset there,
    /// as the docker CLI does).
    pub build_args: BTreeMap<String, String>,
    /// `--target`.
    pub target: Option<String>,
    /// The platform to build for.
    pub platform: Platform,
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--jobs`: how many steps may run at once.
    pub jobs: Option<u16>,
    /// `--progress`.
    pub progress: ProgressArgument,
    /// `-o`.
    pub outputs: Vec<Output>,
    /// `--cache-from`.
    pub cache_from: Vec<CacheLocation>,
    /// `--cache-to`.
    pub cache_to: Vec<CacheExport>,
    /// `--secret`.
    pub secrets: Vec<Secret>,
    /// `--network`.
    pub network: NetworkArgument,
    /// `--metadata-file`.
    pub metadata_file: Option<PathBuf>,
    /// `--dry-run`.
    pub dry_run: bool,
    /// `--format` of the dry run.
    pub format: PlanFormat,
}

impl BuildOptions {
    /// Checks the parsed arguments.
    pub fn from_arguments(
        arguments: BuildArguments,
        root: Option<PathBuf>,
    ) -> Result<Self, UsageError> {
        let dockerfile = match &arguments.file {
            Some(path) if path.as_os_str() == "-" => DockerfileSource::Stdin,
            Some(path) => DockerfileSource::Path(path.clone()),
            None => DockerfileSource::Path(arguments.context.join("Dockerfile")),
        };
        let mut build_args = BTreeMap::new();
        for argument in &arguments.build_args {
            let (key, value) = match argument.split_once('=') {
                Some((key, value)) => (key, Some(value.to_string())),
                None => (argument.as_str(), std::env::var(argument).ok()),
            };
            if key.is_empty() {
                return Err(UsageError::BuildArg(argument.clone()));
            }
            if let Some(value) = value {
                build_args.insert(key.to_string(), value);
            }
        }
        for tag in &arguments.tags {
            validate_reference(tag).map_err(|problem| UsageError::Tag {
                tag: tag.clone(),
                problem,
            })?;
        }
        let platform = match &arguments.platform {
            Some(text) if text.contains('/') => {
                Platform::parse(text).map_err(|_| UsageError::Platform(text.clone()))?
            }
            Some(text) => return Err(UsageError::Platform(text.clone())),
            None => Platform::host(),
        };
        Ok(Self {
            root: root.unwrap_or_else(default_root),
            context: arguments.context,
            dockerfile,
            tags: arguments.tags,
            build_args,
            target: arguments.target,
            platform,
            no_cache: arguments.no_cache,
            jobs: arguments.jobs,
            progress: arguments.progress,
            outputs: arguments
                .outputs
                .iter()
                .map(|spec| parse_output(spec))
                .collect::<Result<_, _>>()?,
            cache_from: arguments
                .cache_from
                .iter()
                .map(|spec| parse_cache(spec, "--cache-from").map(|(location, _)| location))
                .collect::<Result<_, _>>()?,
            cache_to: arguments
                .cache_to
                .iter()
                .map(|spec| {
                    parse_cache(spec, "--cache-to").map(|(location, all_steps)| CacheExport {
                        location,
                        all_steps,
                    })
                })
                .collect::<Result<_, _>>()?,
            secrets: arguments
                .secrets
                .iter()
                .map(|spec| parse_secret(spec))
                .collect::<Result<_, _>>()?,
            network: arguments.network,
            metadata_file: arguments.metadata_file,
            dry_run: arguments.dry_run,
            format: arguments.format,
        })
    }
}

/// `/var/lib/rbuild` as root, else `$XDG_DATA_HOME/rbuild` (or `~/.local/share/rbuild`).
pub fn default_root() -> PathBuf {
    if effective_uid() == Some(0) {
        return PathBuf::from("/var/lib/rbuild");
    }
    if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|data| !data.is_empty()) {
        return Path::new(&data).join("rbuild");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    Path::new(&home).join(".local/share/rbuild")
}

/// The effective uid, read from /proc (no libc call needed).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Splits `key=value,key=value` into pairs; a bare word is a key with an empty value.
fn key_values(spec: &str, flag: &'static str) -> Result<BTreeMap<String, String>, UsageError> {
    let mut pairs = BTreeMap::new();
    for field in spec.split(',').filter(|field| !field.is_empty()) {
        let (key, value) = field.split_once('=').unwrap_or((field, ""));
        if pairs
            .insert(key.trim().to_lowercase(), value.to_string())
            .is_some()
        {
            return Err(UsageError::Spec {
                flag,
                spec: spec.to_string(),
                problem: format!("{key} is given twice"),
            });
        }
    }
    Ok(pairs)
}

fn spec_error(flag: &'static str, spec: &str, problem: impl Into<String>) -> UsageError {
    UsageError::Spec {
        flag,
        spec: spec.to_string(),
        problem: problem.into(),
    }
}

fn check_keys(
    pairs: &BTreeMap<String, String>,
    allowed: &[&str],
    flag: &'static str,
    spec: &str,
) -> Result<(), UsageError> {
    match pairs.keys().find(|key| !allowed.contains(&key.as_str())) {
        Some(key) => Err(spec_error(
            flag,
            spec,
            format!("unknown key {key:?} (known: {})", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

fn required(
    pairs: &BTreeMap<String, String>,
    key: &str,
    flag: &'static str,
    spec: &str,
) -> Result<String, UsageError> {
    pairs
        .get(key)
        .filter(|value| !value.is_empty())
        .cloned()
        .ok_or_else(|| spec_error(flag, spec, format!("{key}= is required")))
}

fn boolean(value: Option<&String>, flag: &'static str, spec: &str) -> Result<bool, UsageError> {
    match value.map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("") | Some("true") => Ok(true),
        Some(other) => Err(spec_error(
            flag,
            spec,
            format!("expected true or false, not {other:?}"),
        )),
    }
}

/// Parses `-o`. A bare path (no `type=`) means `type=local,dest=PATH` and a bare `-` means
/// `type=tar,dest=-`, as docker buildx does.
pub fn parse_output(spec: &str) -> Result<Output, UsageError> {
    const FLAG: &str = "--output";
    if !spec.contains('=') {
        return match spec {
            "" => Err(spec_error(FLAG, spec, "a destination is required")),
            "-" => Ok(Output::Tar {
                dest: PathBuf::from("-"),
            }),
            _ => Ok(Output::Local {
                dest: PathBuf::from(spec),
            }),
        };
    }
    let pairs = key_values(spec, FLAG)?;
    let kind = required(&pairs, "type", FLAG, spec)?;
    let name = |pairs: &BTreeMap<String, String>| -> Result<Option<String>, UsageError> {
        match pairs.get("name").filter(|name| !name.is_empty()) {
            Some(name) => {
                validate_reference(name).map_err(|problem| spec_error(FLAG, spec, problem))?;
                Ok(Some(name.clone()))
            }
            None => Ok(None),
        }
    };
    match kind.as_str() {
        "oci" | "docker" => {
            check_keys(&pairs, &["type", "dest", "name"], FLAG, spec)?;
            let dest = PathBuf::from(required(&pairs, "dest", FLAG, spec)?);
            let name = name(&pairs)?;
            Ok(if kind == "oci" {
                Output::Oci { dest, name }
            } else {
                Output::Docker { dest, name }
            })
        }
        "tar" => {
            check_keys(&pairs, &["type", "dest"], FLAG, spec)?;
            let dest = PathBuf::from(required(&pairs, "dest", FLAG, spec)?);
            Ok(Output::Tar { dest })
        }
        "local" => {
            check_keys(&pairs, &["type", "dest"], FLAG, spec)?;
            let dest = PathBuf::from(required(&pairs, "dest", FLAG, spec)?);
            if dest == Path::new("-") {
                return Err(spec_error(
                    FLAG,
                    spec,
                    "type=local writes a directory; use type=tar,dest=- for standard output",
                ));
            }
            Ok(Output::Local { dest })
        }
        "image" | "registry" => {
            check_keys(&pairs, &["type", "name", "push"], FLAG, spec)?;
            let name = required(&pairs, "name", FLAG, spec)?;
            validate_reference(&name).map_err(|problem| spec_error(FLAG, spec, problem))?;
            let push = kind == "registry" || boolean(pairs.get("push"), FLAG, spec)?;
            Ok(Output::Image { name, push })
        }
        other => Err(spec_error(
            FLAG,
            spec,
            format!("unknown type {other:?} (oci, docker, local, tar, image, registry)"),
        )),
    }
}

/// Parses `--cache-from` / `--cache-to`; returns the location and whether `mode=max`.
fn parse_cache(spec: &str, flag: &'static str) -> Result<(CacheLocation, bool), UsageError> {
    let pairs = key_values(spec, flag)?;
    let kind = required(&pairs, "type", flag, spec)?;
    let all_steps = match pairs.get("mode").map(String::as_str) {
        None | Some("min") => false,
        Some("max") => true,
        Some(other) => {
            return Err(spec_error(
                flag,
                spec,
                format!("mode must be min or max, not {other:?}"),
            ));
        }
    };
    let location = match kind.as_str() {
        "registry" => {
            check_keys(&pairs, &["type", "ref", "mode"], flag, spec)?;
            let reference = required(&pairs, "ref", flag, spec)?;
            validate_reference(&reference).map_err(|problem| spec_error(flag, spec, problem))?;
            CacheLocation::Registry { reference }
        }
        "local" => {
            let key = if flag == "--cache-from" {
                "src"
            } else {
                "dest"
            };
            check_keys(&pairs, &["type", key, "mode"], flag, spec)?;
            CacheLocation::Local {
                directory: PathBuf::from(required(&pairs, key, flag, spec)?),
            }
        }
        other => {
            return Err(spec_error(
                flag,
                spec,
                format!("unknown type {other:?} (registry, local)"),
            ));
        }
    };
    Ok((location, all_steps))
}

/// Parses `--secret id=ID,src=PATH` or `id=ID,env=VAR`.
fn parse_secret(spec: &str) -> Result<Secret, UsageError> {
    const FLAG: &str = "--secret";
    let pairs = key_values(spec, FLAG)?;
    check_keys(&pairs, &["id", "src", "source", "env", "type"], FLAG, spec)?;
    let id = required(&pairs, "id", FLAG, spec)?;
    let file = pairs
        .get("src")
        .or_else(|| pairs.get("source"))
        .filter(|value| !value.is_empty());
    let source = match (file, pairs.get("env").filter(|value| !value.is_empty())) {
        (Some(path), None) => SecretSource::File(PathBuf::from(path)),
        (None, Some(variable)) => SecretSource::Environment(variable.clone()),
        (None, None) => SecretSource::Environment(id.clone()),
        (Some(_), Some(_)) => return Err(spec_error(FLAG, spec, "give src= or env=, not both")),
    };
    Ok(Secret { id, source })
}

/// Checks an image reference as Docker does (the store's [`Reference`] parser): lower-case
/// path components of `[a-z0-9._-]`, an optional registry host[:port], an optional `:tag` of
/// up to 128 characters, an optional `@sha256:` digest.
pub fn validate_reference(reference: &str) -> Result<(), &'static str> {
    use rbuild_cache::reference::ReferenceError;
    Reference::parse(reference)
        .map(drop)
        .map_err(|error| match error {
            ReferenceError::Empty => "the name is empty",
            ReferenceError::Tag { .. } => {
                "a tag is up to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'"
            }
            ReferenceError::Digest { .. } => "a digest must be sha256:<64 hex>",
            ReferenceError::Registry { .. } => "a registry is host[:port]",
            ReferenceError::TooLong { .. } => "the repository name is longer than 255 characters",
            ReferenceError::Component { .. } => {
                "names are lower-case [a-z0-9] with '.', '_' or '-' between"
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs() {
        assert_eq!(
            parse_output("type=oci,dest=out.tar").unwrap(),
            Output::Oci {
                dest: "out.tar".into(),
                name: None
            }
        );
        assert_eq!(
            parse_output("type=docker,dest=-,name=app:v2").unwrap(),
            Output::Docker {
                dest: "-".into(),
                name: Some("app:v2".into())
            }
        );
        assert_eq!(parse_output("-").unwrap(), Output::Tar { dest: "-".into() });
        assert!(parse_output("type=local,dest=-").is_err());
        assert!(parse_output("type=tar,dest=x,name=app").is_err());
        assert!(parse_output("type=oci,dest=x,name=Bad").is_err());
        assert_eq!(
            parse_output("./dir").unwrap(),
            Output::Local {
                dest: "./dir".into()
            }
        );
        assert_eq!(
            parse_output("type=image,name=127.0.0.1:5000/app:v1,push=true").unwrap(),
            Output::Image {
                name: "127.0.0.1:5000/app:v1".into(),
                push: true
            }
        );
        assert!(parse_output("type=oci").is_err(), "dest is required");
        assert!(parse_output("type=zip,dest=x").is_err());
        assert!(parse_output("type=local,dest=x,colour=red").is_err());
        assert!(parse_output("type=image,name=UPPER").is_err());
    }

    #[test]
    fn caches_and_secrets() {
        assert_eq!(
            parse_cache("type=local,dest=/c,mode=max", "--cache-to").unwrap(),
            (
                CacheLocation::Local {
                    directory: "/c".into()
                },
                true
            )
        );
        assert!(
            parse_cache("type=local,dest=/c", "--cache-from").is_err(),
            "cache-from takes src="
        );
        assert!(parse_cache("type=registry,ref=r,mode=most", "--cache-to").is_err());
        assert_eq!(
            parse_secret("id=token,src=/tmp/t").unwrap(),
            Secret {
                id: "token".into(),
                source: SecretSource::File("/tmp/t".into())
            }
        );
        assert_eq!(
            parse_secret("id=TOKEN").unwrap().source,
            SecretSource::Environment("TOKEN".into())
        );
        assert!(parse_secret("src=/x").is_err());
    }

    #[test]
    fn references() {
        for good in [
            "app",
            "app:v1",
            "my-app/web_1:1.0-rc",
            "127.0.0.1:5000/a/b:c",
            "localhost/x",
            "a@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(validate_reference(good).is_ok(), "{good}");
        }
        for bad in ["", "App", "app:", "app:.x", "a//b", "-app", "a@sha256:xyz"] {
            assert!(validate_reference(bad).is_err(), "{bad}");
        }
    }
}
