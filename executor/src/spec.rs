//! What to run and how: the one value the builder hands the executor. Plain data, serialized
//! to the sandbox helper process, unit-testable without running anything.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The root filesystem of the sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RootFs {
    /// An overlayfs: read-only `lower` directories (topmost first, as overlayfs lists them),
    /// a writable `upper` that receives every change, and overlayfs's `work` directory on the
    /// same filesystem as `upper`. With no lower directory the root starts empty.
    Overlay {
        /// Snapshot directories, topmost first.
        lower: Vec<PathBuf>,
        /// Receives the changes; becomes the step's layer.
        upper: PathBuf,
        /// overlayfs's scratch directory (empty, same filesystem as `upper`).
        work: PathBuf,
    },
    /// A plain directory used as the root, read-write.
    Directory(PathBuf),
}

/// The process to run inside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// argv; `args[0]` is looked up in the `PATH` of `env` when it has no `/`.
    pub args: Vec<String>,
    /// `KEY=VALUE` pairs, exactly the environment of the process.
    pub env: Vec<String>,
    /// Absolute working directory inside the root; created (owned by the user) if missing.
    pub cwd: String,
    /// `uid[:gid]` or `name[:group]`, resolved with the root's own `/etc/passwd` and
    /// `/etc/group`; empty means root.
    pub user: String,
}

/// The network the sandbox sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Network {
    /// A new network namespace with only loopback, up.
    #[default]
    None,
    /// The host's network namespace.
    Host,
}

/// Something mounted into the sandbox besides its root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mount {
    /// A host path bind-mounted at `destination` (created if missing).
    Bind {
        /// Host path (file or directory).
        source: PathBuf,
        /// Absolute path inside.
        destination: String,
        /// Mounted read-only.
        readonly: bool,
    },
    /// A path of a fresh overlay of `lower` (read-only directories, topmost first) over its
    /// own `upper` and `work`, bind-mounted at `destination`: how a build mounts another
    /// stage's filesystem. `source` is resolved inside the overlay (symbolic links cannot
    /// leave it). Writes land in `upper`, which the caller discards.
    Overlay {
        /// Read-only directories, topmost first (none: an empty directory).
        lower: Vec<PathBuf>,
        /// Receives the writes (empty, on the same filesystem as `work`).
        upper: PathBuf,
        /// overlayfs's scratch directory (empty).
        work: PathBuf,
        /// The path inside the overlay to mount (`/` for all of it).
        source: String,
        /// Absolute path inside.
        destination: String,
        /// Mounted read-only.
        readonly: bool,
    },
    /// An empty tmpfs.
    Tmpfs {
        /// Absolute path inside.
        destination: String,
        /// Size limit in bytes (none: the kernel's default, half of RAM).
        size: Option<u64>,
    },
}

/// cgroup limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory (and memory+swap: no swap) in bytes.
    pub memory: Option<u64>,
    /// CPU bandwidth in cores, as `--cpus 1.5`.
    pub cpus: Option<f64>,
    /// Maximum number of processes and threads.
    pub pids: Option<u64>,
}

/// Everything needed to run one process in a sandbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// The root filesystem.
    pub rootfs: RootFs,
    /// The process.
    pub process: Process,
    /// The hostname (UTS namespace).
    pub hostname: String,
    /// The network.
    pub network: Network,
    /// Extra mounts, applied in order after the standard ones.
    pub mounts: Vec<Mount>,
    /// cgroup limits.
    pub limits: Limits,
    /// Extra `/etc/hosts` lines (`IP NAME...`) after the standard localhost entries.
    pub extra_hosts: Vec<String>,
    /// Apply Docker's default seccomp profile (on unless asked otherwise).
    pub seccomp: bool,
}

impl RunSpec {
    /// A spec with Docker's defaults: no network, hostname `rbuild`, seccomp on, no limits.
    pub fn new(rootfs: RootFs, process: Process) -> Self {
        Self {
            rootfs,
            process,
            hostname: "rbuild".to_string(),
            network: Network::None,
            mounts: Vec::new(),
            limits: Limits::default(),
            extra_hosts: Vec::new(),
            seccomp: true,
        }
    }
}

/// Docker's default `PATH`, for images whose config sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
