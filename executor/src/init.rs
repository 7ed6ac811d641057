//! The sandbox helper: the process [`crate::sandbox::run`] starts by re-executing the binary
//! with [`MARKER`] as its first argument. It is single-threaded (no runtime, no threads), so
//! it may `unshare` and `fork` safely.
//!
//! The helper reads the request from its stdin (a socket to the caller), enters new PID, UTS,
//! IPC (and network) namespaces, and forks the container's first process, which takes its
//! own mount namespace, mounts the root and pivots into it, mounts Docker's file systems,
//! resolves the user, and — once the helper has put it into the run's cgroup — loads seccomp,
//! drops capabilities, changes user and `execve`s the command. The helper stays outside the
//! container's PID namespace (CVE-2019-5736: `/proc/1/exe` inside is the user's program, never
//! this binary), relays `SIGINT`/`SIGTERM` (and kills it on `SIGUSR1`, the cancel signal),
//! waits, cleans up (cgroup, mount points created in the root, scratch directory) and sends
//! the caller a JSON report over the socket.

use std::convert::Infallible;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::socket::MsgFlags;
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::{Gid, Pid, Uid};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::capabilities::{self, CapabilityError};
use crate::cgroups::{Cgroup, CgroupError};
use crate::mounts::{self, InRootMounts, MountError, PreparedMount};
use crate::network;
use crate::seccomp::{SeccompError, SeccompProgram};
use crate::spec::{DEFAULT_PATH, Limits, Mount, Network, RunSpec};
use crate::sys::{self, Forked};
use crate::user::{self, ExecUser, UserError};

/// First argument that turns the binary into the sandbox helper.
pub const MARKER: &str = "__rbuild-sandbox-init";

/// Largest request frame accepted (the spec's JSON, or the seccomp program).
const MAX_FRAME: u64 = 64 << 20;

/// Largest `/etc/passwd` or `/etc/group` read from an image.
const MAX_IDENTITY_FILE: u64 = 16 << 20;

/// What the caller sends the helper: the spec and where to keep per-run files.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Request {
    /// What to run.
    pub spec: RunSpec,
    /// Directory for the run's scratch directory (mount target, generated `/etc` files).
    pub scratch_dir: PathBuf,
}

/// How a set-up failure is to be read by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum FailureKind {
    /// The sandbox could not be built: an internal or host problem.
    Setup,
    /// The spec's user or group does not exist in the image.
    User,
    /// The command could not be executed; Docker's exit code for it (127 or 126).
    Executable {
        /// 127 not found, 126 not executable.
        exit_code: i32,
    },
}

/// A set-up failure, rendered with its causes for the caller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Failure {
    /// How to read it.
    pub kind: FailureKind,
    /// The error and its causes, `: `-separated.
    pub message: String,
}

/// The helper's last word to the caller.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Report {
    /// The process ran and ended.
    Exited {
        /// Its exit code; 128 + signal when killed.
        exit_code: i32,
        /// The signal that killed it.
        signal: Option<i32>,
        /// The cgroup's OOM killer killed a process.
        oom_killed: bool,
        /// Clean-up problems (the run itself is fine).
        warnings: Vec<String>,
    },
    /// The process could not be started.
    Failed {
        /// Why.
        failure: Failure,
        /// Clean-up problems.
        warnings: Vec<String>,
    },
}

/// What the container's first process tells the helper before it executes the command (the
/// pipe closes on `execve`).
#[derive(Debug, Serialize, Deserialize)]
enum ChildMessage {
    /// Mount points it created in the root, relative, parents first.
    Created(Vec<String>),
    /// Set-up is done: `execve` comes next (a failure of it follows this message).
    Executing,
    /// Set-up failed.
    Failed(Failure),
}

/// Why the command cannot be executed, in Docker's words.
#[derive(Debug, Error)]
enum ExecError {
    #[error("exec: \"{program}\": executable file not found in $PATH")]
    NotInPath { program: String },
    #[error("exec: \"{program}\": {}", .errno.desc().to_ascii_lowercase())]
    Failed { program: String, errno: Errno },
}

impl ExecError {
    fn exit_code(&self) -> i32 {
        match self {
            ExecError::NotInPath { .. }
            | ExecError::Failed {
                errno: Errno::ENOENT | Errno::ENOTDIR,
                ..
            } => 127,
            ExecError::Failed { .. } => 126,
        }
    }
}

/// Everything that can go wrong in the helper and in the container's first process.
#[derive(Debug, Error)]
enum InitError {
    #[error("cannot read the request from rbuild")]
    ReadRequest(#[source] io::Error),
    #[error("invalid request from rbuild")]
    DecodeRequest(#[source] serde_json::Error),
    #[error("invalid seccomp program from rbuild")]
    Seccomp(#[source] SeccompError),
    #[error("cannot load the seccomp filter")]
    LoadSeccomp(#[source] SeccompError),
    #[error("cannot prepare the scratch directory {path}")]
    Scratch {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the sandbox namespaces")]
    Unshare(#[source] Errno),
    #[error("cannot create the sandbox process")]
    Fork(#[source] io::Error),
    #[error("cannot create the sandbox's cgroup")]
    Cgroup(#[source] CgroupError),
    #[error("cannot prepare the sandbox process")]
    Process(#[source] Errno),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("cannot set the hostname {hostname:?}")]
    Hostname {
        hostname: String,
        #[source]
        source: Errno,
    },
    #[error("cannot bring the loopback interface up")]
    Loopback(#[source] io::Error),
    #[error("cannot read {path} of the image")]
    IdentityFile {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    User(#[from] UserError),
    #[error("cannot create the working directory {path}")]
    CreateCwd {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot change to the working directory {path}")]
    Chdir {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("working directory {path} resolves outside the root ({actual})")]
    CwdOutsideRoot { path: String, actual: String },
    #[error("cannot drop capabilities")]
    Capabilities(#[source] CapabilityError),
    #[error("cannot switch to user {uid}:{gid}")]
    SwitchUser {
        uid: u32,
        gid: u32,
        #[source]
        source: Errno,
    },
    #[error("cannot close the helper's file descriptors")]
    CloseFds(#[source] io::Error),
    #[error("the command line is empty")]
    NoCommand,
    #[error("argument or environment variable contains a NUL byte")]
    NulByte,
    #[error(transparent)]
    Exec(ExecError),
    #[error("cannot talk to the sandbox process")]
    Pipe(#[source] io::Error),
    #[error("the sandbox process ended during set-up without saying why ({status})")]
    ChildVanished { status: String },
}

impl InitError {
    fn failure(&self) -> Failure {
        let kind = match self {
            InitError::User(_) => FailureKind::User,
            InitError::Exec(error) => FailureKind::Executable {
                exit_code: error.exit_code(),
            },
            _ => FailureKind::Setup,
        };
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Failure { kind, message }
    }

    fn child_exit_code(&self) -> i32 {
        match self {
            InitError::Exec(error) => error.exit_code(),
            _ => 1,
        }
    }
}

/// Runs the sandbox helper and exits if this process was started as one (first argument
/// [`MARKER`]); returns at once otherwise.
///
/// Call it first thing in `main` of every binary that runs sandboxes (it is the default
/// helper, re-executed by [`crate::sandbox::run`]), before any thread is started — so not
/// from inside `#[tokio::main]`: the helper must be single-threaded to fork.
pub fn run_if_requested() {
    let requested = std::env::args_os()
        .nth(1)
        .is_some_and(|argument| argument == OsStr::new(MARKER));
    if requested {
        std::process::exit(helper_main());
    }
}

/// The signal that tells the helper to kill the container at once (see
/// [`crate::sandbox::Canceller`]).
pub(crate) const CANCEL_SIGNAL: Signal = Signal::SIGUSR1;

/// Signals the helper waits for instead of handling them.
fn helper_signals() -> SigSet {
    let mut signals = SigSet::empty();
    signals.add(CANCEL_SIGNAL);
    signals.add(Signal::SIGCHLD);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
}

/// The helper; returns its exit code (the command's).
fn helper_main() -> i32 {
    // Whatever the caller leaked without O_CLOEXEC goes first, before we own any descriptor.
    if sys::close_inherited_fds().is_err() {
        return 125;
    }
    // Queued until the wait loop: relayed to the process, never killing the helper midway.
    let signals = helper_signals();
    if nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), None).is_err() {
        return 125;
    }
    // The caller dying delivers SIGTERM, which the wait loop turns into SIGKILL for the
    // container, so the helper still cleans up.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
    let caller = nix::unistd::getppid();

    let Ok(channel) = io::stdin().as_fd().try_clone_to_owned() else {
        return 125;
    };
    let mut channel = File::from(channel);
    let (report, exit_code) = match helper(&mut channel, caller) {
        Ok((report, exit_code)) => (report, exit_code),
        Err(error) => (
            Report::Failed {
                failure: error.failure(),
                warnings: Vec::new(),
            },
            125,
        ),
    };
    if let Ok(bytes) = serde_json::to_vec(&report) {
        let _ = send_all(&channel, &bytes);
    }
    exit_code
}

/// Writes all of `bytes` to the socket without raising SIGPIPE.
pub(crate) fn send_all(socket: &impl AsRawFd, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match nix::sys::socket::send(socket.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL) {
            Ok(written) => bytes = &bytes[written..],
            Err(Errno::EINTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(())
}

/// Reads one length-prefixed frame.
pub(crate) fn read_frame(reader: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut length = [0u8; 8];
    reader.read_exact(&mut length)?;
    let length = u64::from_le_bytes(length);
    if length > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {length} bytes"),
        ));
    }
    let mut frame = Vec::new();
    reader.take(length).read_to_end(&mut frame)?;
    if frame.len() as u64 != length {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(frame)
}

/// Appends one length-prefixed frame.
pub(crate) fn push_frame(buffer: &mut Vec<u8>, frame: &[u8]) {
    buffer.extend_from_slice(&(frame.len() as u64).to_le_bytes());
    buffer.extend_from_slice(frame);
}

/// A scratch directory for one run, removed on drop.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn create(parent: &Path) -> Result<Self, InitError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = parent.join(format!(
            "rbuild-sandbox-{}-{nanos:09}",
            nix::unistd::getpid()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| InitError::Scratch {
                path: path.clone(),
                source,
            })?;
        Ok(Scratch { path })
    }

    fn write(&self, name: &str, contents: &str) -> Result<PathBuf, InitError> {
        let path = self.path.join(name);
        std::fs::write(&path, contents).map_err(|source| InitError::Scratch {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    fn mkdir(&self, name: &str) -> Result<PathBuf, InitError> {
        let path = self.path.join(name);
        std::fs::create_dir(&path).map_err(|source| InitError::Scratch {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// The cgroup name of the run: as unique as the directory.
    fn cgroup_name(&self) -> String {
        self.path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "rbuild-sandbox".to_string())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// What the container's first process needs from the helper.
struct ChildContext<'a> {
    spec: &'a RunSpec,
    seccomp: Option<&'a SeccompProgram>,
    root: PathBuf,
    empty_lower: PathBuf,
    /// Where the overlays of [`Mount::Overlay`] are mounted before the pivot.
    overlays: PathBuf,
    etc_files: [(&'static str, PathBuf); 3],
}

/// The helper proper: returns the report and the exit code.
fn helper(channel: &mut File, caller: Pid) -> Result<(Report, i32), InitError> {
    let request = read_frame(channel).map_err(InitError::ReadRequest)?;
    let request: Request = serde_json::from_slice(&request).map_err(InitError::DecodeRequest)?;
    let seccomp_bytes = read_frame(channel).map_err(InitError::ReadRequest)?;
    let seccomp = if request.spec.seccomp {
        Some(SeccompProgram::from_bytes(&seccomp_bytes).map_err(InitError::Seccomp)?)
    } else {
        None
    };
    let spec = &request.spec;

    let scratch = Scratch::create(&request.scratch_dir)?;
    let host_resolv_conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let context = ChildContext {
        spec,
        seccomp: seccomp.as_ref(),
        root: scratch.mkdir("root")?,
        empty_lower: scratch.mkdir("empty")?,
        overlays: scratch.mkdir("overlays")?,
        etc_files: [
            (
                "/etc/hosts",
                scratch.write(
                    "hosts",
                    &network::hosts_file(&spec.hostname, &spec.extra_hosts),
                )?,
            ),
            (
                "/etc/hostname",
                scratch.write("hostname", &network::hostname_file(&spec.hostname))?,
            ),
            (
                "/etc/resolv.conf",
                scratch.write(
                    "resolv.conf",
                    &network::resolv_conf(spec.network, &host_resolv_conf),
                )?,
            ),
        ],
    };

    let mut namespaces =
        CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC;
    if spec.network == Network::None {
        namespaces |= CloneFlags::CLONE_NEWNET;
    }
    // The mount namespace is the child's alone: pivot_root would move the helper's root too.
    nix::sched::unshare(namespaces).map_err(InitError::Unshare)?;

    let (report_read, report_write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(InitError::Process)?;
    let (sync_read, sync_write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(InitError::Process)?;

    let child = match sys::fork().map_err(InitError::Fork)? {
        Forked::Child => {
            // Only the helper talks to the caller and feeds the child. The socket to the
            // caller (fd 0, and its close-on-exec copy in `channel`) stays the helper's too:
            // fd 0 becomes /dev/null once /dev is mounted, the copy goes with execve.
            drop((report_read, sync_write));
            // A panic must not unwind into the helper's frames (their destructors would
            // remove the scratch directory the helper still uses).
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                child_main(&context, report_write, sync_read)
            }))
            .unwrap_or(1);
            std::process::exit(code);
        }
        Forked::Parent { child } => child,
    };
    drop((report_write, sync_read));

    let mut warnings = Vec::new();
    // Created while the child mounts; it waits for the byte before running anything. Only
    // with limits: the PID namespace already ends every process of the run, and moving a
    // process between cgroup v1 groups costs an RCU grace period (milliseconds) each time.
    let limited = spec.limits != Limits::default();
    let cgroup = limited.then(|| {
        Cgroup::create(&scratch.cgroup_name(), &spec.limits)
            .and_then(|cgroup| cgroup.add_process(child.as_raw()).map(|()| cgroup))
    });
    let (cgroup, cgroup_failure) = match cgroup.transpose() {
        Ok(cgroup) => {
            let _ = File::from(sync_write).write_all(b"1");
            (cgroup, None)
        }
        Err(error) => {
            let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
            drop(sync_write);
            (None, Some(InitError::Cgroup(error).failure()))
        }
    };

    let (created, executing, child_failure) = read_child_messages(report_read);
    let status = wait_for(child, caller);
    let oom_killed = cgroup.as_ref().is_some_and(Cgroup::oom_killed);
    if let Some(cgroup) = cgroup
        && let Err(error) = cgroup.remove()
    {
        warnings.push(InitError::Cgroup(error).failure().message);
    }
    if let Err(error) = mounts::remove_created_mount_points(&spec.rootfs, &created) {
        warnings.push(format!(
            "cannot remove the mount points created in the root: {error}"
        ));
    }
    mounts::forget_volatile(&spec.rootfs);
    drop(scratch);

    let (exit_code, signal) = match status {
        Ok(WaitStatus::Exited(_, code)) => (code, None),
        Ok(WaitStatus::Signaled(_, signal, _)) => (128 + signal as i32, Some(signal as i32)),
        Ok(other) => {
            warnings.push(format!("unexpected wait status {other:?}"));
            (125, None)
        }
        Err(errno) => {
            warnings.push(format!("cannot wait for the sandbox process: {errno}"));
            (125, None)
        }
    };
    let vanished = (!executing).then(|| {
        InitError::ChildVanished {
            status: match signal {
                Some(signal) => format!("killed by signal {signal}"),
                None => format!("exit code {exit_code}"),
            },
        }
        .failure()
    });
    let report = match cgroup_failure.or(child_failure).or(vanished) {
        Some(failure) => Report::Failed { failure, warnings },
        None => Report::Exited {
            exit_code,
            signal,
            oom_killed,
            warnings,
        },
    };
    Ok((report, exit_code))
}

/// Reads the child's messages until the pipe closes (on `execve`, or its exit): the mount
/// points it created, whether it got to `execve`, and its failure.
fn read_child_messages(pipe: OwnedFd) -> (Vec<String>, bool, Option<Failure>) {
    let mut bytes = Vec::new();
    if let Err(error) = File::from(pipe).read_to_end(&mut bytes) {
        return (Vec::new(), false, Some(InitError::Pipe(error).failure()));
    }
    let mut created = Vec::new();
    let mut executing = false;
    let mut failure = None;
    for line in bytes.split(|b| *b == b'\n').filter(|line| !line.is_empty()) {
        match serde_json::from_slice(line) {
            Ok(ChildMessage::Created(paths)) => created = paths,
            Ok(ChildMessage::Executing) => executing = true,
            Ok(ChildMessage::Failed(reported)) => failure = Some(reported),
            Err(error) => {
                failure = Some(
                    InitError::Pipe(io::Error::new(io::ErrorKind::InvalidData, error)).failure(),
                );
            }
        }
    }
    (created, executing, failure)
}

/// Waits for the child, relaying SIGINT and SIGTERM: the first as is (PID 1 ignores it unless
/// it handles it, as under Docker), a second one — or any once the caller is gone, or
/// [`CANCEL_SIGNAL`] — as SIGKILL.
fn wait_for(child: Pid, caller: Pid) -> nix::Result<WaitStatus> {
    let signals = helper_signals();
    let mut interrupted = false;
    loop {
        match nix::sys::wait::waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => return Ok(status),
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(errno),
        }
        // SIGCHLD stays pending while blocked, so a child that ends right after the check
        // above still wakes this up.
        match signals.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(signal) => {
                let relay =
                    if signal == CANCEL_SIGNAL || interrupted || nix::unistd::getppid() != caller {
                        Signal::SIGKILL
                    } else {
                        signal
                    };
                interrupted = true;
                let _ = nix::sys::signal::kill(child, relay);
            }
        }
    }
}

/// Sends the helper what the child has to say.
struct Reporter {
    pipe: File,
}

impl Reporter {
    fn send(&mut self, message: &ChildMessage) {
        if let Ok(mut line) = serde_json::to_vec(message) {
            line.push(b'\n');
            let _ = self.pipe.write_all(&line);
        }
    }
}

/// The container's first process; returns an exit code only when set-up fails.
fn child_main(context: &ChildContext<'_>, report_write: OwnedFd, sync_read: OwnedFd) -> i32 {
    let mut reporter = Reporter {
        pipe: File::from(report_write),
    };
    let mut created = Vec::new();
    let result = child_setup(context, sync_read, &mut reporter, &mut created);
    let Err(error) = result;
    if !created.is_empty() {
        reporter.send(&ChildMessage::Created(created));
    }
    reporter.send(&ChildMessage::Failed(error.failure()));
    error.child_exit_code()
}

/// Reads a file of the image's `/etc` (inside the root) if it is there, as a bounded
/// regular file: an image's `/etc/passwd` may be a fifo or a link to `/dev/zero`.
fn read_identity_file(path: &'static str) -> Result<Option<String>, InitError> {
    let error = |source| InitError::IdentityFile { path, source };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(source) if source.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(error(source)),
    };
    if !file.metadata().map_err(error)?.is_file() {
        return Err(error(io::Error::other("not a regular file")));
    }
    let mut bytes = Vec::new();
    file.take(MAX_IDENTITY_FILE)
        .read_to_end(&mut bytes)
        .map_err(error)?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Creates the working directory and its missing parents, owned by the user (as BuildKit
/// does for `WORKDIR`), then enters it and checks it is inside the root: a working directory
/// reached through a leaked host descriptor is what CVE-2024-21626 exploited.
fn enter_working_directory(cwd: &str, user: &ExecUser) -> Result<(), InitError> {
    let path = mounts::normalize_destination(if cwd.is_empty() { "/" } else { cwd })
        .or_else(|_| mounts::normalize_destination(&format!("/{cwd}")))?;
    let mut prefix = PathBuf::from("/");
    for component in path.split('/').filter(|c| !c.is_empty()) {
        prefix.push(component);
        match std::fs::metadata(&prefix) {
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                let create_error = |source| InitError::CreateCwd {
                    path: path.clone(),
                    source,
                };
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&prefix)
                    .map_err(create_error)?;
                std::os::unix::fs::chown(&prefix, Some(user.uid), Some(user.gid))
                    .map_err(create_error)?;
            }
            Err(source) => return Err(InitError::CreateCwd { path, source }),
        }
    }
    nix::unistd::chdir(path.as_str()).map_err(|source| InitError::Chdir {
        path: path.clone(),
        source,
    })?;
    let actual = nix::unistd::getcwd().map_err(|source| InitError::Chdir {
        path: path.clone(),
        source,
    })?;
    if !actual.starts_with("/") || actual.to_string_lossy().starts_with("(unreachable)") {
        return Err(InitError::CwdOutsideRoot {
            path,
            actual: actual.display().to_string(),
        });
    }
    Ok(())
}

/// The value of `name` in `KEY=VALUE` pairs.
fn env_value<'a>(env: &'a [String], name: &str) -> Option<&'a str> {
    env.iter().rev().find_map(|pair| {
        pair.split_once('=')
            .filter(|(key, _)| *key == name)
            .map(|(_, value)| value)
    })
}

/// Finds `program` in `PATH` (inside the root, from the working directory) as Go's
/// `exec.LookPath` does for runc: the first regular file with an execute bit.
fn look_path(program: &str, env: &[String]) -> Result<String, ExecError> {
    if program.contains('/') {
        return Ok(program.to_string());
    }
    let path = env_value(env, "PATH").unwrap_or(DEFAULT_PATH);
    for directory in path.split(':') {
        let directory = if directory.is_empty() { "." } else { directory };
        let candidate = format!("{directory}/{program}");
        if let Ok(metadata) = std::fs::metadata(&candidate)
            && metadata.is_file()
            && metadata.mode() & 0o111 != 0
        {
            return Ok(candidate);
        }
    }
    Err(ExecError::NotInPath {
        program: program.to_string(),
    })
}

fn c_strings(strings: &[String]) -> Result<Vec<CString>, InitError> {
    strings
        .iter()
        .map(|s| CString::new(s.as_bytes()).map_err(|_| InitError::NulByte))
        .collect()
}

/// Builds the container from inside and `execve`s the command; returns only on failure.
fn child_setup(
    context: &ChildContext<'_>,
    sync_read: OwnedFd,
    reporter: &mut Reporter,
    created: &mut Vec<String>,
) -> Result<Infallible, InitError> {
    let spec = context.spec;
    sys::reset_signal_dispositions().map_err(InitError::Process)?;
    // Its own session, like runc's container process: no controlling terminal, and terminal
    // signals reach it only through the helper.
    nix::unistd::setsid().map_err(InitError::Process)?;
    // If the helper dies, so does the container (PID 1 takes its namespace along).
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(InitError::Process)?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));

    nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(InitError::Unshare)?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|source| MountError::Mount {
        what: "private propagation".to_string(),
        target: "/".to_string(),
        source: source.into(),
    })?;
    mounts::mount_rootfs(&spec.rootfs, &context.root, &context.empty_lower)?;

    // Host sources are opened before the pivot hides the host.
    let mut etc_files = Vec::new();
    for (destination, source) in &context.etc_files {
        let (tree, _) = mounts::open_bind_source(source)?;
        etc_files.push((*destination, tree));
    }
    let mut prepared = Vec::new();
    for (index, mount) in spec.mounts.iter().enumerate() {
        prepared.push(match mount {
            Mount::Overlay {
                lower,
                upper,
                work,
                source,
                destination,
                readonly,
            } => {
                let mount_point = context.overlays.join(index.to_string());
                std::fs::create_dir(&mount_point).map_err(|source| {
                    MountError::CreateMountPoint {
                        path: mount_point.display().to_string(),
                        source,
                    }
                })?;
                let lower: Vec<&Path> = if lower.is_empty() {
                    vec![context.empty_lower.as_path()]
                } else {
                    lower.iter().map(PathBuf::as_path).collect()
                };
                let (tree, directory) =
                    mounts::open_overlay_source(&lower, upper, work, &mount_point, source)?;
                PreparedMount::Bind {
                    tree,
                    destination: mounts::normalize_destination(destination)?,
                    readonly: *readonly,
                    directory,
                }
            }
            Mount::Bind {
                source,
                destination,
                readonly,
            } => {
                let (tree, directory) = mounts::open_bind_source(source)?;
                PreparedMount::Bind {
                    tree,
                    destination: mounts::normalize_destination(destination)?,
                    readonly: *readonly,
                    directory,
                }
            }
            Mount::Tmpfs { destination, size } => PreparedMount::Tmpfs {
                destination: mounts::normalize_destination(destination)?,
                size: *size,
            },
        });
    }

    mounts::pivot_into(&context.root)?;
    let mounted = mounts::mount_in_root(
        &mut mounts::Kernel,
        InRootMounts {
            etc_files,
            mounts: prepared,
        },
        created,
    );
    reporter.send(&ChildMessage::Created(std::mem::take(created)));
    mounted?;

    let dev_null = nix::fcntl::open(
        "/dev/null",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(InitError::Process)?;
    nix::unistd::dup2_stdin(&dev_null).map_err(InitError::Process)?;
    drop(dev_null);

    nix::unistd::sethostname(&spec.hostname).map_err(|source| InitError::Hostname {
        hostname: spec.hostname.clone(),
        source,
    })?;
    if spec.network == Network::None {
        network::loopback_up().map_err(InitError::Loopback)?;
    }

    let exec_user = user::resolve(
        &spec.process.user,
        read_identity_file("/etc/passwd")?.as_deref(),
        read_identity_file("/etc/group")?.as_deref(),
    )?;
    let mut env = spec.process.env.clone();
    if env_value(&env, "HOME").is_none() {
        env.push(format!("HOME={}", exec_user.home));
    }
    enter_working_directory(&spec.process.cwd, &exec_user)?;

    // The helper has put us into the cgroup (or gone away: then end quietly).
    let mut byte = [0u8; 1];
    match File::from(sync_read).read(&mut byte) {
        Ok(1) => {}
        _ => std::process::exit(125),
    }

    let program = spec.process.args.first().ok_or(InitError::NoCommand)?;
    let executable = look_path(program, &env).map_err(InitError::Exec)?;
    let executable_c = CString::new(executable.as_bytes()).map_err(|_| InitError::NulByte)?;
    let args = c_strings(&spec.process.args)?;
    let env_c = c_strings(&env)?;

    // While still root with every capability (no no_new_privs, as Docker).
    if let Some(seccomp) = context.seccomp {
        seccomp.load().map_err(InitError::LoadSeccomp)?;
    }
    capabilities::drop_bounding_set().map_err(InitError::Capabilities)?;
    let switch_error = |source| InitError::SwitchUser {
        uid: exec_user.uid,
        gid: exec_user.gid,
        source,
    };
    let groups: Vec<Gid> = exec_user
        .supplementary_gids
        .iter()
        .map(|gid| Gid::from_raw(*gid))
        .collect();
    nix::unistd::setgroups(&groups).map_err(switch_error)?;
    let gid = Gid::from_raw(exec_user.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(switch_error)?;
    capabilities::set_keep_capabilities(true).map_err(InitError::Capabilities)?;
    let uid = Uid::from_raw(exec_user.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(switch_error)?;
    capabilities::set_keep_capabilities(false).map_err(InitError::Capabilities)?;
    capabilities::apply(exec_user.uid == 0).map_err(InitError::Capabilities)?;

    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(InitError::Process)?;
    sys::cloexec_from_3().map_err(InitError::CloseFds)?;
    reporter.send(&ChildMessage::Executing);
    let Err(errno) = nix::unistd::execve(&executable_c, &args, &env_c);
    Err(InitError::Exec(ExecError::Failed {
        program: program.clone(),
        errno,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buffer = Vec::new();
        push_frame(&mut buffer, b"{}");
        push_frame(&mut buffer, b"");
        let mut reader = buffer.as_slice();
        assert_eq!(read_frame(&mut reader).unwrap(), b"{}");
        assert_eq!(read_frame(&mut reader).unwrap(), b"");
        assert!(read_frame(&mut reader).is_err());
    }

    #[test]
    fn exec_errors_read_like_docker() {
        let not_found = ExecError::NotInPath {
            program: "nope".to_string(),
        };
        assert_eq!(
            not_found.to_string(),
            "exec: \"nope\": executable file not found in $PATH"
        );
        assert_eq!(not_found.exit_code(), 127);
        let denied = ExecError::Failed {
            program: "/etc/passwd".to_string(),
            errno: Errno::EACCES,
        };
        assert_eq!(
            denied.to_string(),
            "exec: \"/etc/passwd\": permission denied"
        );
        assert_eq!(denied.exit_code(), 126);
    }

    #[test]
    fn failure_message_carries_the_causes() {
        let error = InitError::Chdir {
            path: "/work".to_string(),
            source: Errno::EACCES,
        };
        let failure = error.failure();
        assert_eq!(failure.kind, FailureKind::Setup);
        assert!(
            failure
                .message
                .starts_with("cannot change to the working directory /work: ")
        );
    }

    #[test]
    fn env_lookup_takes_the_last_definition() {
        let env = vec![
            "PATH=/a".to_string(),
            "X=1".to_string(),
            "PATH=/b".to_string(),
        ];
        assert_eq!(env_value(&env, "PATH"), Some("/b"));
        assert_eq!(env_value(&env, "HOME"), None);
    }
}
