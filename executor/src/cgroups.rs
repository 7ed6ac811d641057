//! cgroup limits for a sandbox: memory (with no swap beyond it), CPU bandwidth and number of
//! processes, on cgroup v1 (one hierarchy per controller, as on hybrid hosts) and on a pure
//! cgroup v2 host.
//!
//! Every sandbox gets its own cgroup `<name>` under an `rbuild` parent, as Docker's cgroupfs
//! driver puts containers under `docker`: `memory/rbuild/<name>`, `cpu/rbuild/<name>` and
//! `pids/rbuild/<name>` on v1, `rbuild/<name>` on v2. The parent stays (other builds may be
//! using it); the leaf is removed with [`Cgroup::remove`], or on drop, after killing whatever
//! still runs in it.
//!
//! Limits are written before any process joins, so a process never runs unlimited:
//!
//! | limit | v1 | v2 |
//! |---|---|---|
//! | memory | `memory.limit_in_bytes` and `memory.memsw.limit_in_bytes` (if swap accounting is on) | `memory.max`, `memory.swap.max` = 0 |
//! | cpus | `cpu.cfs_period_us` = 100000, `cpu.cfs_quota_us` = cpus × 100000 | `cpu.max` = `<quota> 100000` |
//! | pids | `pids.max` | `pids.max` |

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::spec::Limits;

/// Where cgroup filesystems are mounted on every distribution.
const MOUNT_ROOT: &str = "/sys/fs/cgroup";
/// The group every sandbox cgroup is created in.
const PARENT: &str = "rbuild";
/// CFS period in microseconds (Docker's, and the kernel's default).
const CPU_PERIOD: u64 = 100_000;
/// The kernel refuses CFS quotas under 1 ms.
const MINIMUM_CPU_QUOTA: u64 = 1_000;
/// How long [`Cgroup::remove`] waits for killed processes to exit.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The v2 controllers rbuild uses, in the order they are enabled.
const V2_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Which cgroup version the host runs, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupLayout {
    /// cgroup v1 (legacy or hybrid): one hierarchy per controller; each field is the mount
    /// point of that controller's hierarchy, if mounted.
    V1 {
        /// The `memory` hierarchy, usually `/sys/fs/cgroup/memory`.
        memory: Option<PathBuf>,
        /// The `cpu` hierarchy, usually `/sys/fs/cgroup/cpu` (or `cpu,cpuacct`).
        cpu: Option<PathBuf>,
        /// The `pids` hierarchy, usually `/sys/fs/cgroup/pids`.
        pids: Option<PathBuf>,
    },
    /// The unified cgroup v2 hierarchy.
    V2 {
        /// Its mount point, usually `/sys/fs/cgroup`.
        root: PathBuf,
    },
}

/// Why a cgroup could not be set up, used or removed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The name is not a plain directory name.
    #[error(
        "cgroup name {name:?} is invalid: use 1 to 128 letters, digits, '-', '_' or '.', not starting with '.'"
    )]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// A CPU limit that is not a positive number.
    #[error("a cpu limit of {cpus} is invalid: it must be a positive number of cpus")]
    InvalidCpus {
        /// The limit given.
        cpus: f64,
    },
    /// A memory or pids limit of 0.
    #[error("a {limit} limit of 0 is invalid")]
    ZeroLimit {
        /// `memory` or `pids`.
        limit: &'static str,
    },
    /// Neither cgroup v2 nor any of the v1 hierarchies rbuild uses is mounted.
    #[error(
        "no cgroup hierarchy found: neither cgroup v2 at /sys/fs/cgroup nor a v1 memory, cpu or pids hierarchy in /proc/self/mountinfo"
    )]
    NotMounted,
    /// A limit was asked for but its controller is not available.
    #[error("the {controller} cgroup controller is not available, so its limit cannot be applied")]
    ControllerUnavailable {
        /// `memory`, `cpu` or `pids`.
        controller: &'static str,
    },
    /// The sandbox's cgroup already exists: names must be unique.
    #[error("cgroup {} already exists", path.display())]
    AlreadyExists {
        /// The directory.
        path: PathBuf,
    },
    /// Creating a cgroup directory failed.
    #[error("creating cgroup {} failed", path.display())]
    CreateDirectory {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// Reading a cgroup file failed.
    #[error("reading {} failed", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// Writing a cgroup file failed.
    #[error("writing {value:?} to {} failed", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// `kill(pid, SIGKILL)` failed for a reason other than the process being gone.
    #[error("killing process {pid} of cgroup {} failed", path.display())]
    Kill {
        /// The process.
        pid: i32,
        /// The cgroup it was in.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: Errno,
    },
    /// Processes were still in the cgroup (or it was still busy) long after SIGKILL.
    #[error("cgroup {} still had processes {timeout:?} after they were killed", path.display())]
    StillPopulated {
        /// The directory.
        path: PathBuf,
        /// How long removal waited.
        timeout: Duration,
    },
    /// Removing a cgroup directory failed.
    #[error("removing cgroup {} failed", path.display())]
    RemoveDirectory {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
}

/// Finds the host's cgroups: pure v2 if `/sys/fs/cgroup/cgroup.controllers` exists, else the
/// v1 `memory`, `cpu` and `pids` hierarchies listed in `/proc/self/mountinfo`.
pub fn detect() -> Result<CgroupLayout, CgroupError> {
    let root = Path::new(MOUNT_ROOT);
    if root.join("cgroup.controllers").exists() {
        return Ok(CgroupLayout::V2 {
            root: root.to_path_buf(),
        });
    }
    let path = Path::new("/proc/self/mountinfo");
    let mountinfo = fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    v1_layout(&mountinfo)
}

/// The v1 hierarchies in a `/proc/PID/mountinfo` (proc(5)): lines whose filesystem type is
/// `cgroup`, with the controller among the super options (`rw,cpu,cpuacct`).
fn v1_layout(mountinfo: &str) -> Result<CgroupLayout, CgroupError> {
    let (mut memory, mut cpu, mut pids) = (None, None, None);
    for line in mountinfo.lines() {
        // `36 35 98:0 /root /mnt opts shared:1 - cgroup cgroup rw,memory`: the optional
        // fields end at " - ", which cannot occur in the escaped mount point.
        let Some((mount, filesystem)) = line.split_once(" - ") else {
            continue;
        };
        let mut filesystem = filesystem.split(' ');
        let (Some("cgroup"), Some(_source), Some(options)) =
            (filesystem.next(), filesystem.next(), filesystem.next())
        else {
            continue;
        };
        let Some(mount_point) = mount.split(' ').nth(4) else {
            continue;
        };
        for option in options.split(',') {
            let slot = match option {
                "memory" => &mut memory,
                "cpu" => &mut cpu,
                "pids" => &mut pids,
                _ => continue,
            };
            slot.get_or_insert_with(|| PathBuf::from(unescape_mount_point(mount_point)));
        }
    }
    if memory.is_none() && cpu.is_none() && pids.is_none() {
        return Err(CgroupError::NotMounted);
    }
    Ok(CgroupLayout::V1 { memory, cpu, pids })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\134` for a backslash).
fn unescape_mount_point(escaped: &str) -> String {
    let bytes = escaped.as_bytes();
    let mut unescaped = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let octal = bytes.get(index + 1..index + 4).and_then(|digits| {
            let digits = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(digits, 8).ok()
        });
        match (bytes[index], octal) {
            (b'\\', Some(byte)) => {
                unescaped.push(byte);
                index += 4;
            }
            (byte, _) => {
                unescaped.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&unescaped).into_owned()
}

/// A sandbox's cgroup (one directory per v1 controller, or one v2 directory). Dropping it
/// kills its processes and removes it, best effort; [`remove`](Self::remove) reports errors.
#[derive(Debug)]
pub struct Cgroup {
    version: Version,
    /// The leaf directories, one per v1 controller or the v2 one.
    directories: Vec<PathBuf>,
    /// The directory with the `memory.*` files, if the memory controller is there.
    memory: Option<PathBuf>,
    removed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

impl Cgroup {
    /// Creates cgroup `name` with `limits` under the `rbuild` group of the host's cgroups
    /// ([`detect`]). `name` must be new and a plain name (letters, digits, `-`, `_`, `.`).
    pub fn create(name: &str, limits: &Limits) -> Result<Self, CgroupError> {
        validate_name(name)?;
        Self::create_in(&detect()?, name, limits)
    }

    /// [`create`](Self::create) in a given layout.
    pub fn create_in(
        layout: &CgroupLayout,
        name: &str,
        limits: &Limits,
    ) -> Result<Self, CgroupError> {
        validate_name(name)?;
        let cpu_quota = limits.cpus.map(cpu_quota).transpose()?;
        if limits.memory == Some(0) {
            return Err(CgroupError::ZeroLimit { limit: "memory" });
        }
        if limits.pids == Some(0) {
            return Err(CgroupError::ZeroLimit { limit: "pids" });
        }
        match layout {
            CgroupLayout::V1 { memory, cpu, pids } => {
                Self::create_v1([memory, cpu, pids], name, limits, cpu_quota)
            }
            CgroupLayout::V2 { root } => Self::create_v2(root, name, limits, cpu_quota),
        }
    }

    fn create_v1(
        [memory, cpu, pids]: [&Option<PathBuf>; 3],
        name: &str,
        limits: &Limits,
        cpu_quota: Option<u64>,
    ) -> Result<Self, CgroupError> {
        let hierarchies = [
            ("memory", memory, limits.memory.is_some()),
            ("cpu", cpu, cpu_quota.is_some()),
            ("pids", pids, limits.pids.is_some()),
        ];
        for (controller, mount, limited) in hierarchies {
            if limited && mount.is_none() {
                return Err(CgroupError::ControllerUnavailable { controller });
            }
        }
        let mut cgroup = Cgroup {
            version: Version::V1,
            directories: Vec::new(),
            memory: None,
            removed: false,
        };
        let mut leaves = [None, None, None];
        for ((_, mount, _), leaf) in hierarchies.iter().zip(&mut leaves) {
            let Some(mount) = mount else { continue };
            let parent = mount.join(PARENT);
            create_directory(&parent, true)?;
            let directory = parent.join(name);
            create_directory(&directory, false)?;
            // From here on, dropping `cgroup` removes what was created.
            cgroup.directories.push(directory.clone());
            *leaf = Some(directory);
        }
        let [memory, cpu, pids] = leaves;
        cgroup.memory = memory.clone();

        if let (Some(bytes), Some(directory)) = (limits.memory, &memory) {
            // The limit first: memsw must never be below it.
            write(&directory.join("memory.limit_in_bytes"), bytes)?;
            let swap = directory.join("memory.memsw.limit_in_bytes");
            if swap.exists() {
                write(&swap, bytes)?;
            }
        }
        if let (Some(quota), Some(directory)) = (cpu_quota, &cpu) {
            write(&directory.join("cpu.cfs_period_us"), CPU_PERIOD)?;
            write(&directory.join("cpu.cfs_quota_us"), quota)?;
        }
        if let (Some(maximum), Some(directory)) = (limits.pids, &pids) {
            write(&directory.join("pids.max"), maximum)?;
        }
        Ok(cgroup)
    }

    fn create_v2(
        root: &Path,
        name: &str,
        limits: &Limits,
        cpu_quota: Option<u64>,
    ) -> Result<Self, CgroupError> {
        let available = read(&root.join("cgroup.controllers"))?;
        let available: BTreeSet<&str> = available.split_whitespace().collect();
        let limited = [
            limits.memory.is_some(),
            cpu_quota.is_some(),
            limits.pids.is_some(),
        ];
        for (controller, limited) in V2_CONTROLLERS.into_iter().zip(limited) {
            if limited && !available.contains(controller) {
                return Err(CgroupError::ControllerUnavailable { controller });
            }
        }
        let enable: Vec<&str> = V2_CONTROLLERS
            .into_iter()
            .filter(|controller| available.contains(controller))
            .collect();

        enable_v2_controllers(root, &enable, true)?;
        let parent = root.join(PARENT);
        create_directory(&parent, true)?;
        enable_v2_controllers(&parent, &enable, false)?;
        let directory = parent.join(name);
        create_directory(&directory, false)?;
        let cgroup = Cgroup {
            version: Version::V2,
            directories: vec![directory.clone()],
            memory: enable.contains(&"memory").then(|| directory.clone()),
            removed: false,
        };

        if let Some(bytes) = limits.memory {
            write(&directory.join("memory.max"), bytes)?;
            let swap = directory.join("memory.swap.max");
            if swap.exists() {
                write(&swap, 0)?;
            }
        }
        if let Some(quota) = cpu_quota {
            write(
                &directory.join("cpu.max"),
                format_args!("{quota} {CPU_PERIOD}"),
            )?;
        }
        if let Some(maximum) = limits.pids {
            write(&directory.join("pids.max"), maximum)?;
        }
        Ok(cgroup)
    }

    /// The cgroup's directories: one per v1 controller, or the one v2 directory.
    pub fn directories(&self) -> &[PathBuf] {
        &self.directories
    }

    /// Moves process `pid` (all its threads) into the cgroup, in every controller.
    pub fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        for directory in &self.directories {
            write(&directory.join("cgroup.procs"), pid)?;
        }
        Ok(())
    }

    /// Whether the kernel's OOM killer killed a process of this cgroup (v1 `oom_kill` in
    /// `memory.oom_control`, or a cgroup stuck `under_oom`; v2 `oom_kill` in
    /// `memory.events`). False without the memory controller.
    pub fn oom_killed(&self) -> bool {
        let Some(directory) = &self.memory else {
            return false;
        };
        match self.version {
            Version::V1 => read(&directory.join("memory.oom_control"))
                .map(|text| {
                    counter(&text, "oom_kill").is_some_and(|kills| kills > 0)
                        || counter(&text, "under_oom") == Some(1)
                })
                .unwrap_or(false),
            Version::V2 => read(&directory.join("memory.events"))
                .map(|text| counter(&text, "oom_kill").is_some_and(|kills| kills > 0))
                .unwrap_or(false),
        }
    }

    /// Kills every process left in the cgroup (v2 `cgroup.kill` when the kernel has it, else
    /// SIGKILL to each process listed until none is left), then removes its directories.
    pub fn remove(mut self) -> Result<(), CgroupError> {
        self.removed = true;
        self.kill_and_remove()
    }

    fn kill_and_remove(&self) -> Result<(), CgroupError> {
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        self.kill_all(deadline)?;
        for directory in &self.directories {
            remove_directory(directory, deadline)?;
        }
        Ok(())
    }

    fn kill_all(&self, deadline: Instant) -> Result<(), CgroupError> {
        if self.version == Version::V2 {
            for directory in &self.directories {
                let kill_file = directory.join("cgroup.kill");
                if kill_file.exists() {
                    write(&kill_file, 1)?;
                }
            }
        }
        // Killed processes leave `cgroup.procs` only once they have exited; a process that
        // forked between reading the list and the kill shows up on the next pass.
        loop {
            let mut alive = None;
            for directory in &self.directories {
                let procs = directory.join("cgroup.procs");
                let listed = match fs::read_to_string(&procs) {
                    Ok(listed) => listed,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                    Err(source) => {
                        return Err(CgroupError::Read {
                            path: procs,
                            source,
                        });
                    }
                };
                for pid in listed.lines().filter_map(|line| line.trim().parse().ok()) {
                    alive = Some(directory);
                    match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                        Ok(()) | Err(Errno::ESRCH) => {}
                        Err(source) => {
                            return Err(CgroupError::Kill {
                                pid,
                                path: directory.clone(),
                                source,
                            });
                        }
                    }
                }
            }
            let Some(directory) = alive else {
                return Ok(());
            };
            if Instant::now() > deadline {
                return Err(CgroupError::StillPopulated {
                    path: directory.clone(),
                    timeout: REMOVE_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        if let Err(error) = self.kill_and_remove() {
            tracing::warn!(error = &error as &dyn std::error::Error, "leaking a cgroup");
        }
    }
}

/// Names are one plain path component: `a/b`, `..` and `.x` are refused.
fn validate_name(name: &str) -> Result<(), CgroupError> {
    let valid = (1..=128).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'));
    if valid {
        Ok(())
    } else {
        Err(CgroupError::InvalidName {
            name: name.to_string(),
        })
    }
}

/// The CFS quota for `cpus` cores over a [`CPU_PERIOD`].
fn cpu_quota(cpus: f64) -> Result<u64, CgroupError> {
    if !(cpus.is_finite() && cpus > 0.0) {
        return Err(CgroupError::InvalidCpus { cpus });
    }
    let quota = (cpus * CPU_PERIOD as f64).round() as u64;
    Ok(quota.max(MINIMUM_CPU_QUOTA))
}

/// The value of `key` in a flat-keyed file such as `memory.events` (`oom_kill 3`).
fn counter(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok())?
    })
}

/// Enables `controllers` for the children of v2 cgroup `directory`. A non-root cgroup with
/// processes of its own cannot do that (the "no internal processes" rule: `EBUSY`). That
/// happens at the root of a cgroup namespace, in a container; there, as Docker-in-Docker's
/// entrypoint does (moby `hack/dind`), the processes are moved to an `init` child first.
fn enable_v2_controllers(
    directory: &Path,
    controllers: &[&str],
    evacuate_when_busy: bool,
) -> Result<(), CgroupError> {
    let control = directory.join("cgroup.subtree_control");
    let enabled = read(&control)?;
    let enabled: BTreeSet<&str> = enabled.split_whitespace().collect();
    let missing: Vec<String> = controllers
        .iter()
        .filter(|controller| !enabled.contains(*controller))
        .map(|controller| format!("+{controller}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let value = missing.join(" ");
    match write(&control, &value) {
        Err(CgroupError::Write { source, .. })
            if evacuate_when_busy && source.raw_os_error() == Some(libc::EBUSY) =>
        {
            let init = directory.join("init");
            tracing::info!(
                cgroup = %directory.display(),
                "moving the processes of the cgroup namespace root to {} to enable controllers",
                init.display()
            );
            create_directory(&init, true)?;
            let procs = read(&directory.join("cgroup.procs"))?;
            for pid in procs
                .lines()
                .filter_map(|line| line.trim().parse::<i32>().ok())
            {
                match write(&init.join("cgroup.procs"), pid) {
                    // Gone meanwhile.
                    Err(CgroupError::Write { source, .. })
                        if source.raw_os_error() == Some(libc::ESRCH) => {}
                    other => other?,
                }
            }
            write(&control, &value)
        }
        other => other,
    }
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `value` to an existing cgroup file in a single `write`, as the kernel requires.
fn write(path: &Path, value: impl std::fmt::Display) -> Result<(), CgroupError> {
    let value = value.to_string();
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut file| file.write_all(value.as_bytes()))
        .map_err(|source| CgroupError::Write {
            path: path.to_path_buf(),
            value,
            source,
        })
}

fn create_directory(path: &Path, may_exist: bool) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            if may_exist {
                Ok(())
            } else {
                Err(CgroupError::AlreadyExists {
                    path: path.to_path_buf(),
                })
            }
        }
        Err(source) => Err(CgroupError::CreateDirectory {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// `rmdir`, retried while the kernel still reports the cgroup busy (its killed processes are
/// exiting).
fn remove_directory(path: &Path, deadline: Instant) -> Result<(), CgroupError> {
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error) if error.raw_os_error() == Some(libc::EBUSY) => {
                if Instant::now() > deadline {
                    return Err(CgroupError::StillPopulated {
                        path: path.to_path_buf(),
                        timeout: REMOVE_TIMEOUT,
                    });
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(source) => {
                return Err(CgroupError::RemoveDirectory {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn v1_hierarchies_come_from_mountinfo() {
        assert_eq!(
            v1_layout(HYBRID).unwrap(),
            CgroupLayout::V1 {
                memory: Some("/sys/fs/cgroup/memory".into()),
                cpu: Some("/sys/fs/cgroup/cpu".into()),
                pids: Some("/sys/fs/cgroup/pids".into()),
            }
        );
    }

    #[test]
    fn co_mounted_and_escaped_hierarchies() {
        // systemd mounts cpu and cpuacct together; optional fields precede " - ".
        let mountinfo = "\
25 24 0:22 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:9 - cgroup cgroup rw,cpu,cpuacct
26 24 0:23 / /cg\\040roups/memory rw shared:10 master:3 - cgroup none rw,memory
";
        assert_eq!(
            v1_layout(mountinfo).unwrap(),
            CgroupLayout::V1 {
                memory: Some("/cg roups/memory".into()),
                cpu: Some("/sys/fs/cgroup/cpu,cpuacct".into()),
                pids: None,
            }
        );
    }

    #[test]
    fn no_cgroups_mounted() {
        let mountinfo = "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert!(matches!(v1_layout(mountinfo), Err(CgroupError::NotMounted)));
    }

    #[test]
    fn names_are_single_components() {
        for name in ["build-1", "a.b_c", "X9"] {
            validate_name(name).unwrap();
        }
        for name in [
            "",
            "a/b",
            "..",
            ".",
            ".hidden",
            "/abs",
            "a b",
            "a\0b",
            &"x".repeat(129),
        ] {
            assert!(
                matches!(validate_name(name), Err(CgroupError::InvalidName { .. })),
                "{name:?}"
            );
        }
    }

    #[test]
    fn cpu_quotas() {
        assert_eq!(cpu_quota(0.5).unwrap(), 50_000);
        assert_eq!(cpu_quota(1.5).unwrap(), 150_000);
        assert_eq!(cpu_quota(0.001).unwrap(), MINIMUM_CPU_QUOTA);
        for cpus in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                cpu_quota(cpus),
                Err(CgroupError::InvalidCpus { .. })
            ));
        }
    }

    #[test]
    fn counters() {
        let oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        assert_eq!(counter(oom_control, "oom_kill"), Some(2));
        assert_eq!(counter(oom_control, "under_oom"), Some(0));
        let events = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(counter(events, "oom_kill"), Some(1));
        assert_eq!(counter(events, "oom"), Some(1));
        assert_eq!(counter(events, "missing"), None);
    }

    #[test]
    fn zero_and_invalid_limits_are_refused_before_touching_cgroups() {
        let layout = CgroupLayout::V2 {
            root: "/nonexistent".into(),
        };
        let zero_memory = Limits {
            memory: Some(0),
            ..Limits::default()
        };
        assert!(matches!(
            Cgroup::create_in(&layout, "x", &zero_memory),
            Err(CgroupError::ZeroLimit { limit: "memory" })
        ));
        let bad_cpus = Limits {
            cpus: Some(-2.0),
            ..Limits::default()
        };
        assert!(matches!(
            Cgroup::create_in(&layout, "x", &bad_cpus),
            Err(CgroupError::InvalidCpus { .. })
        ));
    }

    #[test]
    fn limits_need_their_controller() {
        // A limit whose controller is missing is refused, not silently dropped.
        let v1 = CgroupLayout::V1 {
            memory: None,
            cpu: None,
            pids: Some("/nonexistent".into()),
        };
        let memory = Limits {
            memory: Some(32 << 20),
            ..Limits::default()
        };
        assert!(matches!(
            Cgroup::create_in(&v1, "x", &memory),
            Err(CgroupError::ControllerUnavailable {
                controller: "memory"
            })
        ));

        let root = tempfile::tempdir().unwrap();
        fs::write(
            root.path().join("cgroup.controllers"),
            "cpuset cpu io pids\n",
        )
        .unwrap();
        let v2 = CgroupLayout::V2 {
            root: root.path().to_path_buf(),
        };
        assert!(matches!(
            Cgroup::create_in(&v2, "x", &memory),
            Err(CgroupError::ControllerUnavailable {
                controller: "memory"
            })
        ));
        assert!(!root.path().join(PARENT).exists());
    }
}
