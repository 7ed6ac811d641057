//! `rbuild run`: run an image from the local store in the sandbox, with its config's
//! Entrypoint, Cmd, Env, WorkingDir and User, as `docker run` does.

use std::path::PathBuf;

use rbuild_executor::spec::{DEFAULT_PATH, Mount, Process};

use crate::resolver::{env_pairs, non_empty, strings};

/// A `-v HOST:CONTAINER[:ro|rw]` that is not valid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RunUsageError {
    /// The volume spec is malformed.
    #[error("invalid volume {spec:?}: {problem}")]
    Volume {
        /// The spec given.
        spec: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// A memory size that is not a number with an optional b, k, m or g.
    #[error("invalid --memory {0:?}: expected bytes, optionally with a unit b, k, m or g")]
    Memory(String),
    /// `--cpus` that is not a positive number.
    #[error("invalid --cpus {0:?}: expected a positive number of CPUs, as 1.5")]
    Cpus(String),
    /// `-e` without a name.
    #[error("invalid -e {0:?}: expected KEY=VALUE or KEY")]
    Environment(String),
}

/// Parses `-v HOST:CONTAINER[:ro|rw]`. Named volumes are not supported: the host side must
/// be an absolute path.
pub fn parse_volume(spec: &str) -> Result<Mount, RunUsageError> {
    let error = |problem| RunUsageError::Volume {
        spec: spec.to_string(),
        problem,
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let (source, destination, readonly) = match parts.as_slice() {
        [source, destination] => (*source, *destination, false),
        [source, destination, "ro"] => (*source, *destination, true),
        [source, destination, "rw"] => (*source, *destination, false),
        [_, _, _] => return Err(error("the mode must be ro or rw")),
        _ => return Err(error("expected HOST:CONTAINER[:ro|rw]")),
    };
    if !source.starts_with('/') {
        return Err(error(
            "the host path must be absolute (named volumes are not supported)",
        ));
    }
    if !destination.starts_with('/') {
        return Err(error("the container path must be absolute"));
    }
    if destination.split('/').any(|part| part == "..") {
        return Err(error("the container path must not contain .."));
    }
    Ok(Mount::Bind {
        source: PathBuf::from(source),
        destination: destination.to_string(),
        readonly,
    })
}

/// Parses `--memory`: bytes with an optional unit (`b`, `k`, `m`, `g`, binary multiples).
pub fn parse_memory(text: &str) -> Result<u64, RunUsageError> {
    let lower = text.trim().to_ascii_lowercase();
    let lower = lower
        .strip_suffix('b')
        .filter(|rest| !rest.is_empty())
        .unwrap_or(&lower);
    let (number, multiplier) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 1u64 << 10),
        Some('m') => (&lower[..lower.len() - 1], 1 << 20),
        Some('g') => (&lower[..lower.len() - 1], 1 << 30),
        _ => (lower, 1),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|value| value.checked_mul(multiplier))
        .filter(|bytes| *bytes > 0)
        .ok_or_else(|| RunUsageError::Memory(text.to_string()))
}

/// Parses `--cpus`.
pub fn parse_cpus(text: &str) -> Result<f64, RunUsageError> {
    text.parse::<f64>()
        .ok()
        .filter(|cpus| cpus.is_finite() && *cpus > 0.0)
        .ok_or_else(|| RunUsageError::Cpus(text.to_string()))
}

/// What the command line says about the process, before the image's config is applied.
#[derive(Debug, Default, Clone)]
pub struct ProcessOverrides {
    /// `--entrypoint`: `Some("")` clears the image's entrypoint.
    pub entrypoint: Option<String>,
    /// The words after the image.
    pub command: Vec<String>,
    /// `-e` values.
    pub env: Vec<String>,
    /// `-w`.
    pub workdir: Option<String>,
    /// `-u`.
    pub user: Option<String>,
}

/// The process `docker run` would start: `--entrypoint` replaces the image's entrypoint and
/// drops its Cmd; command words replace Cmd; `-e` overrides the image's Env (a bare `KEY`
/// takes rbuild's own value, or removes the variable when rbuild has none); `PATH` defaults
/// to Docker's. Returns `None` when there is no command at all.
pub fn container_process(
    config: &serde_json::Value,
    overrides: &ProcessOverrides,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Option<Process>, RunUsageError> {
    let section = &config["config"];
    let (entrypoint, image_command) = match &overrides.entrypoint {
        Some(entrypoint) if entrypoint.is_empty() => (Vec::new(), Vec::new()),
        Some(entrypoint) => (vec![entrypoint.clone()], Vec::new()),
        None => (strings(&section["Entrypoint"]), strings(&section["Cmd"])),
    };
    let command = if overrides.command.is_empty() {
        image_command
    } else {
        overrides.command.clone()
    };
    let args: Vec<String> = entrypoint.into_iter().chain(command).collect();
    if args.is_empty() {
        return Ok(None);
    }
    let mut env = env_pairs(&section["Env"]);
    for item in &overrides.env {
        let (key, value) = match item.split_once('=') {
            Some((key, value)) => (key.to_string(), Some(value.to_string())),
            None => (item.clone(), lookup(item)),
        };
        if key.is_empty() {
            return Err(RunUsageError::Environment(item.clone()));
        }
        env.retain(|(existing, _)| *existing != key);
        if let Some(value) = value {
            env.push((key, value));
        }
    }
    if !env.iter().any(|(key, _)| key == "PATH") {
        env.insert(0, ("PATH".to_string(), DEFAULT_PATH.to_string()));
    }
    Ok(Some(Process {
        args,
        env: env
            .into_iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect(),
        cwd: overrides
            .workdir
            .clone()
            .or_else(|| non_empty(&section["WorkingDir"]))
            .unwrap_or_else(|| "/".to_string()),
        user: overrides
            .user
            .clone()
            .or_else(|| non_empty(&section["User"]))
            .unwrap_or_default(),
    }))
}

/// Runs `rbuild run` and returns the process's exit code (or rbuild's own failure code).
pub fn run(root: &std::path::Path, arguments: &crate::cli::RunArguments) -> u8 {
    use crate::options::Status;
    use rbuild_cache::{Store, snapshot};
    use rbuild_executor::sandbox::{self, RunOptions};
    use rbuild_executor::spec::{Limits, Network, RootFs, RunSpec};

    let usage = |error: &dyn std::fmt::Display| {
        eprintln!("error: {error}");
        Status::Usage.code()
    };
    let mounts = match arguments
        .volumes
        .iter()
        .map(|spec| parse_volume(spec))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(mounts) => mounts,
        Err(error) => return usage(&error),
    };
    for mount in &mounts {
        if let Mount::Bind { source, .. } = mount
            && !source.exists()
        {
            eprintln!(
                "error: invalid volume: host path {} does not exist",
                source.display()
            );
            return Status::Usage.code();
        }
    }
    let memory = match arguments.memory.as_deref().map(parse_memory).transpose() {
        Ok(memory) => memory,
        Err(error) => return usage(&error),
    };
    let cpus = match arguments.cpus.as_deref().map(parse_cpus).transpose() {
        Ok(cpus) => cpus,
        Err(error) => return usage(&error),
    };
    let store = match Store::open(root) {
        Ok(store) => store,
        Err(error) => return super::image::fail(&error).code(),
    };
    let image = match find_or_pull(&store, &arguments.image) {
        Ok(image) => image,
        Err(error) => return super::image::fail(error.as_ref()).code(),
    };
    let config: serde_json::Value = serde_json::from_slice(&image.config_bytes).unwrap_or_default();
    let overrides = ProcessOverrides {
        entrypoint: arguments.entrypoint.clone(),
        command: arguments.command.clone(),
        env: arguments.env.clone(),
        workdir: arguments.workdir.clone(),
        user: arguments.user.clone(),
    };
    let process = match container_process(&config, &overrides, |key| std::env::var(key).ok()) {
        Ok(Some(process)) => process,
        Ok(None) => {
            eprintln!(
                "error: no command specified: the image has no Entrypoint or Cmd; give one after the image"
            );
            return Status::Usage.code();
        }
        Err(error) => return usage(&error),
    };
    // An image that only names some layers (a lazily pulled one) gets those it has no
    // snapshot of now.
    if let Err(error) = fetch_unpacked_layers(&store, &image) {
        return super::image::fail(error.as_ref()).code();
    }
    let mut lower = match snapshot::prepare_image(&store, &image) {
        Ok(lower) => lower,
        Err(error) => return super::image::fail(&error).code(),
    };
    // overlayfs lists the topmost layer first.
    lower.reverse();
    let id = rbuild_cache::Digest::of(
        format!(
            "{}-{}-{:?}",
            std::process::id(),
            image.target.digest,
            std::time::SystemTime::now()
        )
        .as_bytes(),
    );
    let container = store.containers_directory().join(id.hex());
    let (upper, work) = (container.join("upper"), container.join("work"));
    for directory in [&upper, &work] {
        if let Err(error) = std::fs::create_dir_all(directory) {
            eprintln!("error: creating {}: {error}", directory.display());
            return Status::Failure.code();
        }
    }
    let mut spec = RunSpec::new(RootFs::Overlay { lower, upper, work }, process);
    spec.hostname = arguments
        .hostname
        .clone()
        .unwrap_or_else(|| id.short().to_string());
    spec.network = match arguments.network {
        crate::cli::RunNetwork::None => Network::None,
        crate::cli::RunNetwork::Host => Network::Host,
    };
    spec.mounts = mounts;
    spec.limits = Limits {
        memory,
        cpus,
        pids: arguments.pids_limit,
    };
    // SIGINT and SIGTERM sent to rbuild go to the container's process, as with `docker run`;
    // rbuild waits for it to end and exits with its code.
    let canceller = sandbox::Canceller::new();
    let forwarder = canceller.clone();
    match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                for signal in signals.forever() {
                    forwarder.forward(signal);
                }
            });
        }
        Err(error) => eprintln!("warning: signals will not reach the container: {error}"),
    }
    let result = RunOptions::with_current_exe().and_then(|mut options| {
        options.canceller = Some(canceller);
        sandbox::run(&spec, options)
    });
    if arguments.rm {
        let _ = std::fs::remove_dir_all(&container);
    }
    match result {
        Ok(result) => {
            if result.oom_killed {
                eprintln!("rbuild: the container was killed: out of memory (--memory limit)");
            }
            u8::try_from(result.exit_code).unwrap_or(255)
        }
        Err(error) => {
            let code = error.exit_code();
            super::image::fail(&error);
            code.and_then(|code| u8::try_from(code).ok())
                .unwrap_or(Status::Failure.code())
        }
    }
}

/// The image `name` names in the store; when there is none and `name` is a reference, it is
/// pulled for the host's platform (lazily: the layers come with [`fetch_unpacked_layers`]),
/// as `docker run` does.
fn find_or_pull(
    store: &rbuild_cache::Store,
    name: &str,
) -> Result<rbuild_cache::Image, Box<dyn std::error::Error>> {
    match store.find(name) {
        Ok(records) => Ok(store.image(&records[0].target)?),
        Err(rbuild_cache::StoreError::ImageNotFound { .. })
            if rbuild_cache::Reference::parse(name).is_ok() =>
        {
            let reference = rbuild_cache::Reference::parse(name)?;
            eprintln!("image {name} is not in the store: pulling it");
            let target = crate::registry::pull_lazily(
                store,
                &reference,
                &rbuild_frontend::Platform::host(),
            )?;
            Ok(store.image(&target)?)
        }
        Err(error) => Err(error.into()),
    }
}

/// Fetches the layers of `image` that are neither in the store nor unpacked.
fn fetch_unpacked_layers(
    store: &rbuild_cache::Store,
    image: &rbuild_cache::Image,
) -> Result<(), Box<dyn std::error::Error>> {
    let needed: Vec<rbuild_cache::Target> = rbuild_cache::snapshot::layers_with_diff_ids(image)?
        .into_iter()
        .filter(|(_, diff_id)| !rbuild_cache::snapshot::is_unpacked(store, diff_id))
        .map(|(target, _)| target)
        .collect();
    crate::registry::fetch_missing(store, &needed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> serde_json::Value {
        serde_json::json!({"config": {
            "Entrypoint": ["/entry"],
            "Cmd": ["serve", "--port", "80"],
            "Env": ["PATH=/opt/bin:/bin", "MODE=production", "KEEP=1"],
            "WorkingDir": "/srv",
            "User": "app"
        }})
    }

    #[test]
    fn follows_docker_run_rules() {
        let none = |_: &str| None;
        let process = container_process(&config(), &ProcessOverrides::default(), none)
            .unwrap()
            .unwrap();
        assert_eq!(process.args, ["/entry", "serve", "--port", "80"]);
        assert_eq!(process.cwd, "/srv");
        assert_eq!(process.user, "app");
        assert_eq!(
            process.env,
            ["PATH=/opt/bin:/bin", "MODE=production", "KEEP=1"]
        );

        let overrides = ProcessOverrides {
            command: vec!["check".into()],
            env: vec!["MODE=test".into(), "KEEP".into(), "HOME_SET".into()],
            workdir: Some("/tmp".into()),
            user: Some("1000:1000".into()),
            ..ProcessOverrides::default()
        };
        let lookup = |key: &str| (key == "HOME_SET").then(|| "yes".to_string());
        let process = container_process(&config(), &overrides, lookup)
            .unwrap()
            .unwrap();
        assert_eq!(process.args, ["/entry", "check"]);
        assert_eq!(
            process.env,
            ["PATH=/opt/bin:/bin", "MODE=test", "HOME_SET=yes"]
        );
        assert_eq!(
            (process.cwd.as_str(), process.user.as_str()),
            ("/tmp", "1000:1000")
        );

        // --entrypoint drops the image's Cmd; an empty one clears the entrypoint.
        let overrides = ProcessOverrides {
            entrypoint: Some("/bin/sh".into()),
            ..Default::default()
        };
        assert_eq!(
            container_process(&config(), &overrides, none)
                .unwrap()
                .unwrap()
                .args,
            ["/bin/sh"]
        );
        let overrides = ProcessOverrides {
            entrypoint: Some(String::new()),
            command: vec!["ls".into()],
            ..Default::default()
        };
        assert_eq!(
            container_process(&config(), &overrides, none)
                .unwrap()
                .unwrap()
                .args,
            ["ls"]
        );
    }

    #[test]
    fn an_empty_config_gets_a_default_path_and_needs_a_command() {
        let empty = serde_json::json!({});
        let none = |_: &str| None;
        assert_eq!(
            container_process(&empty, &ProcessOverrides::default(), none).unwrap(),
            None
        );
        let overrides = ProcessOverrides {
            command: vec!["true".into()],
            ..Default::default()
        };
        let process = container_process(&empty, &overrides, none)
            .unwrap()
            .unwrap();
        assert_eq!(process.env, [format!("PATH={DEFAULT_PATH}")]);
        assert_eq!((process.cwd.as_str(), process.user.as_str()), ("/", ""));
    }

    #[test]
    fn parses_volumes_memory_and_cpus() {
        assert_eq!(
            parse_volume("/host/data:/data:ro").unwrap(),
            Mount::Bind {
                source: "/host/data".into(),
                destination: "/data".into(),
                readonly: true
            }
        );
        assert!(matches!(
            parse_volume("/a:/b").unwrap(),
            Mount::Bind {
                readonly: false,
                ..
            }
        ));
        for bad in [
            "data:/data",
            "/a:b",
            "/a:/b:rx",
            "/a",
            "/a:/b/../c",
            "/a:/b:ro:x",
        ] {
            assert!(parse_volume(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_memory("64m").unwrap(), 64 << 20);
        assert_eq!(parse_memory("1G").unwrap(), 1 << 30);
        assert_eq!(parse_memory("512kb").unwrap(), 512 << 10);
        assert_eq!(parse_memory("1000").unwrap(), 1000);
        for bad in ["", "m", "-1m", "0", "1t", "lots"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_cpus("1.5").unwrap(), 1.5);
        assert!(parse_cpus("0").is_err() && parse_cpus("nan").is_err());
    }
}
