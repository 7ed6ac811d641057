//! Running one [`RunSpec`]: the caller's side of the sandbox.
//!
//! [`run`] starts the helper (a re-execution of a binary that calls
//! [`crate::init::run_if_requested`] first thing in `main`), hands it the spec and the
//! seccomp program (compiled once per process) over a socket that is the helper's stdin,
//! streams the process's stdout and stderr as they come, and returns its exit status. It
//! blocks the calling thread until the process is gone; from async code call it in
//! `spawn_blocking`. Nothing here forks: the helper is spawned like any command, so calling
//! it from a multi-threaded program is fine.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::unistd::Pid;
use thiserror::Error;

use crate::init::{self, FailureKind, Report, Request};
use crate::seccomp::{self, SeccompError};
use crate::spec::RunSpec;

/// Receives output chunks as the process writes them.
pub type OutputCallback = Box<dyn FnMut(&[u8]) + Send>;

/// Where the process's stdout or stderr goes.
pub enum Output {
    /// The caller's own stdout/stderr. The process then holds the caller's descriptor: do not
    /// use it with a terminal for untrusted code (the `TIOCSTI` ioctl could type into it).
    Inherit,
    /// Discarded.
    Null,
    /// Each chunk, as soon as the process writes it.
    Callback(OutputCallback),
}

impl std::fmt::Debug for Output {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Output::Inherit => "Inherit",
            Output::Null => "Null",
            Output::Callback(_) => "Callback",
        })
    }
}

/// How to run: where the helper binary is, where scratch files go, where output goes.
#[derive(Debug)]
pub struct RunOptions {
    /// The binary re-executed as the helper; it must call
    /// [`crate::init::run_if_requested`] first thing in `main`.
    pub helper: PathBuf,
    /// Where the per-run scratch directory (mount target, generated `/etc/hosts`,
    /// `/etc/resolv.conf`, `/etc/hostname`) is made; removed after the run.
    pub scratch_dir: PathBuf,
    /// The process's stdout.
    pub stdout: Output,
    /// The process's stderr.
    pub stderr: Output,
    /// Lets another thread kill the sandbox.
    pub canceller: Option<Canceller>,
}

/// Kills a running sandbox from another thread: its processes get SIGKILL and [`run`]
/// returns (exit code 137), after the usual clean-up. A run cancelled before its process
/// started returns [`SandboxError::Cancelled`].
#[derive(Clone, Debug, Default)]
pub struct Canceller {
    state: Arc<CancelState>,
}

#[derive(Debug, Default)]
struct CancelState {
    cancelled: AtomicBool,
    /// The running helper; `None` once its report is in (it is then exiting or gone, and
    /// its pid may be reused after it is reaped).
    helper: Mutex<Option<Pid>>,
}

impl Canceller {
    /// A canceller for one run.
    pub fn new() -> Self {
        Self::default()
    }

    /// Kills the sandbox's processes.
    pub fn cancel(&self) {
        self.state.cancelled.store(true, Ordering::SeqCst);
        let helper = self.state.helper.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pid) = *helper {
            let _ = nix::sys::signal::kill(pid, init::CANCEL_SIGNAL);
        }
    }

    /// Passes `SIGINT` or `SIGTERM` (by number) on to the sandbox: the helper relays it to
    /// the process, as `docker run` forwards the signals it gets. Other signals are ignored.
    pub fn forward(&self, signal: i32) {
        let Ok(signal) = nix::sys::signal::Signal::try_from(signal) else {
            return;
        };
        if !matches!(
            signal,
            nix::sys::signal::Signal::SIGINT | nix::sys::signal::Signal::SIGTERM
        ) {
            return;
        }
        let helper = self.state.helper.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pid) = *helper {
            let _ = nix::sys::signal::kill(pid, signal);
        }
    }

    /// Whether two cancellers are the same one (clones of each other).
    pub fn same_as(&self, other: &Canceller) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.state.cancelled.load(Ordering::SeqCst)
    }

    fn started(&self, pid: Pid) {
        let mut helper = self.state.helper.lock().unwrap_or_else(|e| e.into_inner());
        *helper = Some(pid);
        if self.is_cancelled() {
            let _ = nix::sys::signal::kill(pid, init::CANCEL_SIGNAL);
        }
    }

    fn finished(&self) {
        *self.state.helper.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl RunOptions {
    /// Options with `helper` as the helper, scratch files in [`default_scratch_dir`] and
    /// the caller's stdout and stderr.
    pub fn new(helper: impl Into<PathBuf>) -> Self {
        Self {
            helper: helper.into(),
            scratch_dir: default_scratch_dir().to_path_buf(),
            stdout: Output::Inherit,
            stderr: Output::Inherit,
            canceller: None,
        }
    }

    /// [`new`](Self::new) with the running binary as the helper.
    pub fn with_current_exe() -> Result<Self, SandboxError> {
        let helper = std::env::current_exe().map_err(SandboxError::CurrentExe)?;
        Ok(Self::new(helper))
    }
}

/// Where per-run scratch directories go by default: `/run` or `/dev/shm` when it is a tmpfs
/// (creating and removing the few files there costs a fraction of what it costs on a disk
/// file system), else the temporary directory. Each run makes its own directory there with
/// `mkdir` (never through an existing name or link), mode 0700.
pub fn default_scratch_dir() -> &'static Path {
    static DIRECTORY: OnceLock<PathBuf> = OnceLock::new();
    DIRECTORY.get_or_init(|| {
        ["/run", "/dev/shm"]
            .into_iter()
            .map(Path::new)
            .find(|candidate| {
                nix::sys::statfs::statfs(*candidate)
                    .is_ok_and(|stat| stat.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
                    && nix::unistd::access(*candidate, nix::unistd::AccessFlags::W_OK).is_ok()
            })
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir)
    })
}

/// How the process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunResult {
    /// Its exit code; 128 + the signal's number when a signal killed it, as shells report.
    pub exit_code: i32,
    /// The signal that killed it.
    pub signal: Option<i32>,
    /// The kernel's OOM killer killed a process of the sandbox (the memory limit was hit).
    pub oom_killed: bool,
}

impl RunResult {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }
}

/// Why the process could not be run. A process that ran and failed is not an error: see
/// [`RunResult::exit_code`].
#[derive(Debug, Error)]
pub enum SandboxError {
    /// The path of the running binary is unknown.
    #[error("cannot find the running binary to use as the sandbox helper")]
    CurrentExe(#[source] io::Error),
    /// Docker's seccomp profile did not compile.
    #[error("cannot prepare the seccomp profile")]
    Seccomp(#[source] SeccompError),
    /// The request could not be encoded.
    #[error("cannot encode the run request")]
    Encode(#[source] serde_json::Error),
    /// The helper could not be started.
    #[error("cannot start the sandbox helper {helper}")]
    SpawnHelper {
        /// The binary.
        helper: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Talking to the helper failed.
    #[error("cannot talk to the sandbox helper")]
    Helper(#[source] io::Error),
    /// The helper ended without a report: it crashed, was killed, or the binary does not
    /// call `run_if_requested`.
    #[error(
        "the sandbox helper {helper} ended without a report ({status}); does its main call rbuild_executor::init::run_if_requested first?"
    )]
    HelperDied {
        /// The binary.
        helper: PathBuf,
        /// How it ended.
        status: ExitStatus,
    },
    /// The run was cancelled before its process started.
    #[error("the run was cancelled before it started")]
    Cancelled,
    /// The sandbox could not be set up (mounts, namespaces, cgroup, ...): an internal or host
    /// problem.
    #[error("sandbox set-up failed: {message}")]
    Setup {
        /// The error and its causes.
        message: String,
    },
    /// The user or group of the spec does not exist in the image.
    #[error("{message}")]
    User {
        /// As Docker says it.
        message: String,
    },
    /// The command could not be executed (not found: 127, not executable: 126).
    #[error("cannot start the process: {message}")]
    Executable {
        /// As Docker says it, e.g. `exec: "foo": executable file not found in $PATH`.
        message: String,
        /// Docker's exit code for it.
        exit_code: i32,
    },
}

impl SandboxError {
    /// The exit code Docker gives this failure: 127 or 126 when the command cannot be
    /// executed.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            SandboxError::Executable { exit_code, .. } => Some(*exit_code),
            _ => None,
        }
    }
}

/// The default seccomp program as bytes, compiled and serialized once per process.
fn seccomp_bytes() -> Result<&'static [u8], SandboxError> {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    if let Some(bytes) = BYTES.get() {
        return Ok(bytes);
    }
    let program = seccomp::docker_default().map_err(SandboxError::Seccomp)?;
    Ok(BYTES.get_or_init(|| program.to_bytes()))
}

fn stdio_for(output: &Output) -> Stdio {
    match output {
        Output::Inherit => Stdio::inherit(),
        Output::Null => Stdio::null(),
        Output::Callback(_) => Stdio::piped(),
    }
}

/// Runs `spec` in a new sandbox and waits for it, streaming its output as `options` say.
#[tracing::instrument(skip_all, fields(args = ?spec.process.args))]
pub fn run(spec: &RunSpec, options: RunOptions) -> Result<RunResult, SandboxError> {
    let seccomp = if spec.seccomp { seccomp_bytes()? } else { &[] };
    let request = serde_json::to_vec(&Request {
        spec: spec.clone(),
        scratch_dir: options.scratch_dir.clone(),
    })
    .map_err(SandboxError::Encode)?;
    let mut message = Vec::with_capacity(request.len() + seccomp.len() + 16);
    init::push_frame(&mut message, &request);
    init::push_frame(&mut message, seccomp);

    let RunOptions {
        helper,
        stdout,
        stderr,
        canceller,
        ..
    } = options;
    if canceller.as_ref().is_some_and(Canceller::is_cancelled) {
        return Err(SandboxError::Cancelled);
    }
    let (ours, theirs) = UnixStream::pair().map_err(SandboxError::Helper)?;
    let mut command = Command::new(&helper);
    command
        .arg(init::MARKER)
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(stdio_for(&stdout))
        .stderr(stdio_for(&stderr));
    let spawned = command.spawn();
    // The command holds our copy of the helper's end of the socket: until it is closed, the
    // helper's exit would never show as end of file.
    drop(command);
    let mut child = spawned.map_err(|source| SandboxError::SpawnHelper {
        helper: helper.clone(),
        source,
    })?;

    if let Some(canceller) = &canceller {
        canceller.started(Pid::from_raw(child.id() as i32));
    }

    // The helper reads the whole request before anything else, so this cannot deadlock
    // with its output. A helper that died early shows up as a missing report below.
    let _ = init::send_all(&ours, &message);

    let mut streams = Vec::new();
    if let (Output::Callback(callback), Some(pipe)) = (stdout, child.stdout.take()) {
        streams.push((OwnedFd::from(pipe), callback));
    }
    if let (Output::Callback(callback), Some(pipe)) = (stderr, child.stderr.take()) {
        streams.push((OwnedFd::from(pipe), callback));
    }
    let report = pump(OwnedFd::from(ours), streams);
    if let Some(canceller) = &canceller {
        canceller.finished();
    }
    let status = child.wait().map_err(SandboxError::Helper)?;
    let report = report.map_err(SandboxError::Helper)?;

    let report: Report = match serde_json::from_slice(&report) {
        Ok(report) => report,
        // Cancelled while the helper was starting, before it took the signal over.
        Err(_) if canceller.as_ref().is_some_and(Canceller::is_cancelled) => {
            return Err(SandboxError::Cancelled);
        }
        Err(_) => return Err(SandboxError::HelperDied { helper, status }),
    };
    match report {
        Report::Exited {
            exit_code,
            signal,
            oom_killed,
            warnings,
        } => {
            for warning in warnings {
                tracing::warn!("{warning}");
            }
            Ok(RunResult {
                exit_code,
                signal,
                oom_killed,
            })
        }
        Report::Failed { failure, warnings } => {
            for warning in warnings {
                tracing::warn!("{warning}");
            }
            let message = failure.message;
            Err(match failure.kind {
                FailureKind::Setup => SandboxError::Setup { message },
                FailureKind::User => SandboxError::User { message },
                FailureKind::Executable { exit_code } => {
                    SandboxError::Executable { message, exit_code }
                }
            })
        }
    }
}

/// Hands output to the callbacks as it arrives and collects the helper's report, until the
/// socket and every stream are closed (the process and all it started are gone then: the
/// PID namespace ends with its first process).
fn pump(socket: OwnedFd, mut streams: Vec<(OwnedFd, OutputCallback)>) -> io::Result<Vec<u8>> {
    let mut report = Vec::new();
    let mut socket = Some(File::from(socket));
    let mut buffer = vec![0u8; 64 * 1024];
    let mut open: Vec<bool> = vec![true; streams.len()];
    loop {
        // Poll entries: the socket (if open), then every open stream.
        let mut sources: Vec<Option<usize>> = Vec::new();
        let mut poll_fds = Vec::new();
        if let Some(socket) = &socket {
            sources.push(None);
            poll_fds.push(PollFd::new(socket.as_fd(), PollFlags::POLLIN));
        }
        for (index, (fd, _)) in streams.iter().enumerate() {
            if open[index] {
                sources.push(Some(index));
                poll_fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            }
        }
        if poll_fds.is_empty() {
            return Ok(report);
        }
        match nix::poll::poll(&mut poll_fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(errno.into()),
        }
        let ready: Vec<Option<usize>> = poll_fds
            .iter()
            .zip(&sources)
            .filter(|(fd, _)| fd.revents().is_some_and(|events| !events.is_empty()))
            .map(|(_, source)| *source)
            .collect();
        drop(poll_fds);
        for source in ready {
            match source {
                None => {
                    let Some(file) = socket.as_mut() else {
                        continue;
                    };
                    match file.read(&mut buffer) {
                        Ok(0) => socket = None,
                        Ok(read) => report.extend_from_slice(&buffer[..read]),
                        Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                        Err(error) => return Err(error),
                    }
                }
                Some(index) => {
                    let (fd, callback) = &mut streams[index];
                    match nix::unistd::read(fd.as_fd(), &mut buffer) {
                        Ok(0) => open[index] = false,
                        Ok(read) => callback(&buffer[..read]),
                        Err(Errno::EINTR | Errno::EAGAIN) => {}
                        Err(errno) => return Err(errno.into()),
                    }
                }
            }
        }
    }
}
