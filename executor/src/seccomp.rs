//! Docker's default seccomp profile, as rbuild's own data, compiled once per process into a
//! classic BPF program that the sandbox child installs just before it drops privileges.
//!
//! # The profile
//!
//! The facts are moby's `profiles/seccomp/default.json` (generated from `default_linux.go`),
//! including the additions for kernels 5.17–6.13 (moby#47341, moby#50077) and the `lsm_*`
//! calls moved behind `CAP_SYS_ADMIN` (moby#50097). Docker renders the profile for the
//! container's capabilities; rbuild always runs with [`DEFAULT_CAPABILITIES`], so the filter
//! is fixed and compiled once:
//!
//! - Every syscall not allowed below fails with `EPERM` (Docker's `defaultErrnoRet: 1`).
//! - [`ALLOWED`] whatever the arguments, plus the few of this architecture
//!   ([`ALLOWED_ON_ARCHITECTURE`]).
//! - `ptrace`, `process_vm_readv` and `process_vm_writev`: Docker allows them on kernels 4.8
//!   and later, where a tracer can no longer use ptrace to skip the filter. rbuild needs far
//!   newer kernels anyway (overlayfs, `cgroup.kill`), so they are always allowed.
//! - `personality` only with the personas Docker allows: `PER_LINUX` (0), `PER_LINUX32` (8),
//!   `UNAME26` (0x20000), both (0x20008) and the query 0xffffffff. So `setarch -R` (which asks
//!   for `ADDR_NO_RANDOMIZE`) fails.
//! - `socket` for every family but `AF_VSOCK`: a vsock reaches the host or other VMs.
//! - `clone` only without namespace flags (`CLONE_NEWNS|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|
//!   NEWCGROUP`): the sandbox has no `CAP_SYS_ADMIN`, and an unprivileged user namespace is
//!   the usual first step of a kernel exploit.
//! - `clone3` fails with `ENOSYS`, not `EPERM`: its flags live in memory, where seccomp cannot
//!   look, and glibc (2.34+) falls back to `clone` only on `ENOSYS`.
//! - The calls Docker gates behind a capability ([`CAPABILITY_GATED`]) are allowed only when
//!   that capability is in the default set: `chroot` (`CAP_SYS_CHROOT`) is allowed; `mount`,
//!   `umount2`, `unshare`, `setns`, `pivot_root`, `bpf`, `keyctl`/`add_key`/`request_key`
//!   (which Docker never allows: the keyring is not namespaced), `kcmp`, `pidfd_getfd`,
//!   `open_by_handle_at`, the module, clock, reboot and NUMA calls are not.
//!
//! Two choices go beyond the JSON, as runc does when it installs it:
//!
//! - A syscall numbered above every syscall the profile names is newer than the profile: it
//!   fails with `ENOSYS`, so a new libc falls back to an older call as it does on an old
//!   kernel, instead of failing with `EPERM` (runc's `libcontainer/seccomp/patchbpf`).
//! - A syscall from a foreign ABI (i386 via `int 0x80`) kills the process, as seccompiler's
//!   architecture check does; x32 syscalls fail with `EPERM`. Docker allows both sub-ABIs;
//!   32-bit binaries in build steps are rare enough not to be worth a second filter.
//!
//! Names the `syscalls` crate does not know for this architecture (the 32-bit `*64`/`*32`
//! variants, `socketcall`, ...) are skipped, as libseccomp skips them.
//!
//! # Loading
//!
//! [`SeccompProgram::load`] installs the filter with `seccomp(SECCOMP_SET_MODE_FILTER)` and
//! without `no_new_privs`: runc does not set it by default (a build step may run `sudo` or
//! `su`), and the kernel allows that to a caller holding `CAP_SYS_ADMIN`, which the sandbox
//! child still does when it loads the filter. `seccompiler::apply_filter` always sets
//! `no_new_privs`, so the filter is installed here instead.
//!
//! [`DEFAULT_CAPABILITIES`]: crate::capabilities::DEFAULT_CAPABILITIES

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};
use syscalls::Sysno;

use crate::capabilities::{Capability, DEFAULT_CAPABILITIES};

/// Syscalls allowed whatever their arguments (moby's first rule, plus the later additions).
pub const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "getxattrat",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listmount",
    "listxattr",
    "listxattrat",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "mseal",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "removexattrat",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "setxattrat",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statmount",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "uretprobe",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// Syscalls allowed whatever their arguments on this architecture only.
#[cfg(target_arch = "x86_64")]
pub const ALLOWED_ON_ARCHITECTURE: &[&str] = &["arch_prctl", "modify_ldt"];
/// Syscalls allowed whatever their arguments on this architecture only.
#[cfg(target_arch = "aarch64")]
pub const ALLOWED_ON_ARCHITECTURE: &[&str] = &[
    "arm_fadvise64_64",
    "arm_sync_file_range",
    "sync_file_range2",
    "breakpoint",
    "cacheflush",
    "set_tls",
];
/// Syscalls allowed whatever their arguments on this architecture only.
#[cfg(target_arch = "riscv64")]
pub const ALLOWED_ON_ARCHITECTURE: &[&str] = &["riscv_flush_icache", "riscv_hwprobe"];
/// Syscalls allowed whatever their arguments on this architecture only.
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
)))]
pub const ALLOWED_ON_ARCHITECTURE: &[&str] = &[];

/// Docker allows these on kernels 4.8 and later (see the module docs).
const ALLOWED_SINCE_KERNEL_4_8: &[&str] = &["process_vm_readv", "process_vm_writev", "ptrace"];

/// Syscalls Docker allows only to a container holding the capability.
pub const CAPABILITY_GATED: &[(Capability, &[&str])] = &[
    (Capability::DacReadSearch, &["open_by_handle_at"]),
    (
        Capability::SysAdmin,
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "lsm_get_self_attr",
            "lsm_list_modules",
            "lsm_set_self_attr",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    (Capability::SysBoot, &["reboot"]),
    (Capability::SysChroot, &["chroot"]),
    (
        Capability::SysModule,
        &["delete_module", "init_module", "finit_module"],
    ),
    (Capability::SysPacct, &["acct"]),
    (
        Capability::SysPtrace,
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    (Capability::SysRawio, &["iopl", "ioperm"]),
    (
        Capability::SysTime,
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
    ),
    (Capability::SysTtyConfig, &["vhangup"]),
    (
        Capability::SysNice,
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ),
    (Capability::Syslog, &["syslog"]),
    (Capability::Bpf, &["bpf"]),
    (Capability::Perfmon, &["perf_event_open"]),
];

/// The `personality(2)` arguments Docker allows.
pub const PERSONALITIES: &[u32] = &[0x0, 0x0008, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// The namespace flags `clone` may not carry without `CAP_SYS_ADMIN`: `CLONE_NEWNS`,
/// `CLONE_NEWUTS`, `CLONE_NEWIPC`, `CLONE_NEWUSER`, `CLONE_NEWPID`, `CLONE_NEWNET`,
/// `CLONE_NEWCGROUP`.
pub const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;

/// The only socket family refused.
const AF_VSOCK: u32 = 40;

/// Largest program the kernel accepts (`BPF_MAXINSNS`).
pub(crate) const MAX_INSTRUCTIONS: usize = 4096;

/// Bytes per instruction in [`SeccompProgram::to_bytes`].
const INSTRUCTION_BYTES: usize = 8;

/// Why the profile could not be compiled, shipped or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler has no backend for this architecture.
    #[error("seccomp filters are not supported on architecture {architecture}")]
    UnsupportedArchitecture {
        /// `std::env::consts::ARCH`.
        architecture: &'static str,
    },
    /// seccompiler rejected the profile.
    #[error("compiling docker's default seccomp profile failed")]
    Compile(#[source] seccompiler::BackendError),
    /// The compiled program is longer than the kernel accepts.
    #[error("the seccomp program has {instructions} instructions, more than the kernel's 4096")]
    TooLong {
        /// Instructions in the program.
        instructions: usize,
    },
    /// The first compilation in this process failed; this is that failure.
    #[error("docker's default seccomp profile is unavailable")]
    DefaultProfile(#[source] &'static SeccompError),
    /// [`SeccompProgram::from_bytes`] got bytes that are not a program.
    #[error("{length} bytes are not a seccomp program (1 to 4096 instructions of 8 bytes each)")]
    InvalidProgram {
        /// Length of the bytes.
        length: usize,
    },
    /// `seccomp(SECCOMP_SET_MODE_FILTER)` failed; `EACCES` means the caller has neither
    /// `CAP_SYS_ADMIN` nor `no_new_privs`.
    #[error("installing the seccomp filter failed")]
    Load(#[source] io::Error),
}

/// A compiled seccomp filter: classic BPF instructions, ready for the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeccompProgram {
    instructions: Vec<sock_filter>,
}

impl SeccompProgram {
    /// How many BPF instructions the program has.
    pub fn instruction_count(&self) -> usize {
        self.instructions.len()
    }

    /// The program as bytes, to hand to the sandbox helper process: 8 bytes per instruction
    /// (`code` u16, `jt` u8, `jf` u8, `k` u32, little-endian), as in `struct sock_filter`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.instructions.len() * INSTRUCTION_BYTES);
        for instruction in &self.instructions {
            bytes.extend_from_slice(&instruction.code.to_le_bytes());
            bytes.push(instruction.jt);
            bytes.push(instruction.jf);
            bytes.extend_from_slice(&instruction.k.to_le_bytes());
        }
        bytes
    }

    /// Reads back what [`to_bytes`](Self::to_bytes) wrote. The kernel checks the program
    /// itself when it is loaded.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SeccompError> {
        let invalid = SeccompError::InvalidProgram {
            length: bytes.len(),
        };
        if bytes.is_empty()
            || !bytes.len().is_multiple_of(INSTRUCTION_BYTES)
            || bytes.len() / INSTRUCTION_BYTES > MAX_INSTRUCTIONS
        {
            return Err(invalid);
        }
        let instructions = bytes
            .chunks_exact(INSTRUCTION_BYTES)
            .map(|chunk| sock_filter {
                code: u16::from_le_bytes([chunk[0], chunk[1]]),
                jt: chunk[2],
                jf: chunk[3],
                k: u32::from_le_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]),
            })
            .collect();
        Ok(Self { instructions })
    }

    /// Installs the filter on the calling thread (and so on everything it `execve`s and
    /// forks), without setting `no_new_privs`. Needs `CAP_SYS_ADMIN`: call it in the sandbox
    /// child while still root with every capability, just before dropping them. Makes one
    /// syscall and allocates nothing, so it may run between `fork` and `execve` (get the
    /// program with [`docker_default`] or [`from_bytes`](Self::from_bytes) before forking).
    pub fn load(&self) -> Result<(), SeccompError> {
        install_filter(&self.instructions).map_err(SeccompError::Load)
    }
}

/// Installs the filter on the calling thread (no `no_new_privs`; the caller has
/// `CAP_SYS_ADMIN`). The syscall itself lives in `sys`, with the crate's other `unsafe`.
fn install_filter(instructions: &[sock_filter]) -> io::Result<()> {
    crate::sys::seccomp_set_mode_filter(instructions)
}

static DEFAULT_PROGRAM: OnceLock<Result<SeccompProgram, SeccompError>> = OnceLock::new();
static COMPILATIONS: AtomicUsize = AtomicUsize::new(0);

/// Docker's default profile, compiled on first use and shared by every later call in this
/// process (and by every thread: compilation happens once even under contention).
pub fn docker_default() -> Result<&'static SeccompProgram, SeccompError> {
    match DEFAULT_PROGRAM.get_or_init(compile) {
        Ok(program) => Ok(program),
        Err(error) => Err(SeccompError::DefaultProfile(error)),
    }
}

/// How many times this process compiled the default profile: at most 1.
pub fn compile_count() -> usize {
    COMPILATIONS.load(Ordering::Relaxed)
}

/// The profile, resolved to this architecture's syscall numbers.
struct Profile {
    /// Allowed whatever the arguments.
    unconditional: BTreeSet<Sysno>,
    /// Allowed when one of the rules matches.
    conditional: BTreeMap<Sysno, Vec<SeccompRule>>,
    /// Fails with `ENOSYS`.
    enosys: BTreeSet<Sysno>,
    /// The highest syscall number the profile names, allowed or not.
    highest_named: u32,
}

/// Looks up `names` for this architecture, leaving out the ones it does not have.
fn resolve<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeSet<Sysno> {
    names
        .into_iter()
        .filter_map(|name| Sysno::from_str(name).ok())
        .collect()
}

fn condition(
    argument: u8,
    length: SeccompCmpArgLen,
    operator: SeccompCmpOp,
    value: u64,
) -> Result<SeccompRule, SeccompError> {
    let condition =
        SeccompCondition::new(argument, length, operator, value).map_err(SeccompError::Compile)?;
    SeccompRule::new(vec![condition]).map_err(SeccompError::Compile)
}

impl Profile {
    fn docker_default() -> Result<Self, SeccompError> {
        let held = |capability: &Capability| DEFAULT_CAPABILITIES.contains(capability);
        let granted = CAPABILITY_GATED
            .iter()
            .filter(|(capability, _)| held(capability))
            .flat_map(|(_, names)| names.iter().copied());
        let unconditional = resolve(
            ALLOWED
                .iter()
                .chain(ALLOWED_ON_ARCHITECTURE)
                .chain(ALLOWED_SINCE_KERNEL_4_8)
                .copied()
                .chain(granted),
        );

        let mut conditional = BTreeMap::new();
        let personality = PERSONALITIES
            .iter()
            .map(|&persona| {
                // `personality(unsigned int)`: the kernel ignores the upper half.
                condition(
                    0,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    u64::from(persona),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        conditional.insert(Sysno::personality, personality);
        conditional.insert(
            Sysno::socket,
            vec![condition(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Ne,
                u64::from(AF_VSOCK),
            )?],
        );
        let mut enosys = BTreeSet::new();
        if !held(&Capability::SysAdmin) {
            // Flags are clone's first argument on every architecture seccompiler supports
            // (s390 swaps the first two, which Docker handles with a second rule).
            conditional.insert(
                Sysno::clone,
                vec![condition(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(CLONE_NAMESPACE_FLAGS),
                    0,
                )?],
            );
            enosys.insert(Sysno::clone3);
        }
        conditional.retain(|sysno, _| !unconditional.contains(sysno));

        let every_named = resolve(
            ALLOWED
                .iter()
                .chain(ALLOWED_ON_ARCHITECTURE)
                .chain(ALLOWED_SINCE_KERNEL_4_8)
                .chain(CAPABILITY_GATED.iter().flat_map(|(_, names)| names.iter()))
                .copied(),
        );
        let highest_named = every_named
            .iter()
            .chain(conditional.keys())
            .chain(&enosys)
            .map(|sysno| sysno.id() as u32)
            .max()
            .unwrap_or(0);
        Ok(Self {
            unconditional,
            conditional,
            enosys,
            highest_named,
        })
    }
}

/// Compiles Docker's default profile for this architecture.
fn compile() -> Result<SeccompProgram, SeccompError> {
    COMPILATIONS.fetch_add(1, Ordering::Relaxed);
    let architecture = std::env::consts::ARCH;
    let target = TargetArch::try_from(architecture)
        .map_err(|_| SeccompError::UnsupportedArchitecture { architecture })?;
    let audit_architecture = audit_architecture(target);
    let profile = Profile::docker_default()?;

    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = profile
        .unconditional
        .iter()
        .map(|sysno| (i64::from(sysno.id()), Vec::new()))
        .collect();
    for (sysno, alternatives) in &profile.conditional {
        rules.insert(i64::from(sysno.id()), alternatives.clone());
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        target,
    )
    .map_err(SeccompError::Compile)?;
    let main: BpfProgram = filter.try_into().map_err(SeccompError::Compile)?;

    let mut instructions = prelude(audit_architecture, &profile);
    instructions.extend(main);
    if instructions.len() > MAX_INSTRUCTIONS {
        return Err(SeccompError::TooLong {
            instructions: instructions.len(),
        });
    }
    Ok(SeccompProgram { instructions })
}

/// `AUDIT_ARCH_*` of `linux/audit.h`: the ELF machine, 64-bit, little-endian.
fn audit_architecture(target: TargetArch) -> u32 {
    const SIXTY_FOUR_BIT: u32 = 0x8000_0000;
    const LITTLE_ENDIAN: u32 = 0x4000_0000;
    let machine = match target {
        TargetArch::x86_64 => 62,
        TargetArch::aarch64 => 183,
        TargetArch::riscv64 => 243,
    };
    machine | SIXTY_FOUR_BIT | LITTLE_ENDIAN
}

// Classic BPF opcodes (linux/bpf_common.h) and the offsets of `struct seccomp_data`.
const LOAD_WORD_ABSOLUTE: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JUMP_IF_EQUAL: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JUMP_IF_GREATER: u16 = 0x25; // BPF_JMP | BPF_JGT | BPF_K
#[cfg(target_arch = "x86_64")]
const JUMP_IF_GREATER_OR_EQUAL: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const RETURN: u16 = 0x06; // BPF_RET | BPF_K
const SYSCALL_NUMBER_OFFSET: u32 = 0;
const ARCHITECTURE_OFFSET: u32 = 4;
const RETURN_ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
/// Marks x32 syscall numbers on x86_64 (`__X32_SYSCALL_BIT`, asm/unistd.h).
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// Placeholder jump offset, patched to "the first instruction of seccompiler's program".
const TO_MAIN: u8 = u8::MAX;

fn statement(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The instructions run before seccompiler's program, for what seccompiler cannot express (it
/// has one match action, so no `ENOSYS` beside `ALLOW`): `clone3` and syscalls newer than the
/// profile get `ENOSYS`. A foreign architecture, or x32, goes straight to seccompiler's
/// program, which kills on the former and refuses the latter.
fn prelude(audit_architecture: u32, profile: &Profile) -> Vec<sock_filter> {
    let mut prelude = vec![
        statement(LOAD_WORD_ABSOLUTE, ARCHITECTURE_OFFSET),
        jump(JUMP_IF_EQUAL, audit_architecture, 0, TO_MAIN),
        statement(LOAD_WORD_ABSOLUTE, SYSCALL_NUMBER_OFFSET),
    ];
    for sysno in &profile.enosys {
        prelude.push(jump(JUMP_IF_EQUAL, sysno.id() as u32, 0, 1));
        prelude.push(statement(RETURN, RETURN_ENOSYS));
    }
    #[cfg(target_arch = "x86_64")]
    prelude.push(jump(JUMP_IF_GREATER_OR_EQUAL, X32_SYSCALL_BIT, TO_MAIN, 0));
    prelude.push(jump(JUMP_IF_GREATER, profile.highest_named, 0, 1));
    prelude.push(statement(RETURN, RETURN_ENOSYS));

    let length = prelude.len();
    for (index, instruction) in prelude.iter_mut().enumerate() {
        // A jump lands `offset + 1` instructions further on.
        let to_main = (length - index - 1) as u8;
        if instruction.jt == TO_MAIN {
            instruction.jt = to_main;
        }
        if instruction.jf == TO_MAIN {
            instruction.jf = to_main;
        }
    }
    prelude
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel does with a syscall, per the program.
    #[derive(Debug, PartialEq, Eq)]
    enum Verdict {
        Allow,
        Errno(i32),
        KillProcess,
    }

    /// Runs the classic BPF subset seccompiler and the prelude emit on a `seccomp_data`.
    fn run(
        program: &SeccompProgram,
        architecture: u32,
        number: u32,
        arguments: [u64; 6],
    ) -> Verdict {
        let word = |offset: u32| -> u32 {
            match offset {
                0 => number,
                4 => architecture,
                16..=63 if offset.is_multiple_of(4) => {
                    let argument = arguments[(offset as usize - 16) / 8];
                    if offset.is_multiple_of(8) {
                        argument as u32
                    } else {
                        (argument >> 32) as u32
                    }
                }
                _ => panic!("load from seccomp_data offset {offset}"),
            }
        };
        let mut accumulator = 0u32;
        let mut pc = 0usize;
        loop {
            let instruction = &program.instructions[pc];
            pc += 1;
            let k = instruction.k;
            let branch = |taken: bool| {
                usize::from(if taken {
                    instruction.jt
                } else {
                    instruction.jf
                })
            };
            match instruction.code {
                0x20 => accumulator = word(k),
                0x54 => accumulator &= k,
                0x05 => pc += k as usize,
                0x15 => pc += branch(accumulator == k),
                0x25 => pc += branch(accumulator > k),
                0x35 => pc += branch(accumulator >= k),
                0x06 => {
                    return match k & libc::SECCOMP_RET_ACTION_FULL {
                        libc::SECCOMP_RET_ALLOW => Verdict::Allow,
                        libc::SECCOMP_RET_ERRNO => Verdict::Errno((k & 0xffff) as i32),
                        libc::SECCOMP_RET_KILL_PROCESS => Verdict::KillProcess,
                        other => panic!("unexpected action {other:#x}"),
                    };
                }
                code => panic!("unexpected BPF opcode {code:#x}"),
            }
        }
    }

    fn native(program: &SeccompProgram, sysno: Sysno, arguments: [u64; 6]) -> Verdict {
        let target = TargetArch::try_from(std::env::consts::ARCH).unwrap();
        run(
            program,
            audit_architecture(target),
            sysno.id() as u32,
            arguments,
        )
    }

    fn program() -> SeccompProgram {
        compile().unwrap()
    }

    #[test]
    fn allowed_calls_are_allowed() {
        let program = program();
        for sysno in [
            Sysno::read,
            Sysno::write,
            Sysno::execve,
            Sysno::exit_group,
            Sysno::chroot,
            Sysno::ptrace,
            Sysno::seccomp,
            Sysno::fchmodat2,
        ] {
            assert_eq!(native(&program, sysno, [0; 6]), Verdict::Allow, "{sysno}");
        }
        for name in ALLOWED.iter().chain(ALLOWED_ON_ARCHITECTURE) {
            if let Ok(sysno) = Sysno::from_str(name) {
                assert_eq!(native(&program, sysno, [0; 6]), Verdict::Allow, "{name}");
            }
        }
    }

    #[test]
    fn privileged_calls_fail_with_eperm() {
        let program = program();
        for name in [
            "mount",
            "umount2",
            "unshare",
            "setns",
            "pivot_root",
            "bpf",
            "keyctl",
            "add_key",
            "request_key",
            "kcmp",
            "pidfd_getfd",
            "open_by_handle_at",
            "init_module",
            "reboot",
            "settimeofday",
            "perf_event_open",
            "lsm_set_self_attr",
            "userfaultfd",
            "kexec_load",
            "swapon",
        ] {
            let sysno = Sysno::from_str(name).unwrap();
            assert_eq!(
                native(&program, sysno, [0; 6]),
                Verdict::Errno(libc::EPERM),
                "{name}"
            );
        }
    }

    #[test]
    fn personality_only_with_dockers_personas() {
        let program = program();
        for persona in PERSONALITIES {
            let arguments = [u64::from(*persona), 0, 0, 0, 0, 0];
            assert_eq!(
                native(&program, Sysno::personality, arguments),
                Verdict::Allow
            );
        }
        // ADDR_NO_RANDOMIZE, as `setarch -R` asks.
        let arguments = [0x0040000, 0, 0, 0, 0, 0];
        assert_eq!(
            native(&program, Sysno::personality, arguments),
            Verdict::Errno(libc::EPERM)
        );
    }

    #[test]
    fn socket_refuses_only_vsock() {
        let program = program();
        for family in [
            libc::AF_UNIX,
            libc::AF_INET,
            libc::AF_INET6,
            libc::AF_NETLINK,
        ] {
            let arguments = [family as u64, 1, 0, 0, 0, 0];
            assert_eq!(native(&program, Sysno::socket, arguments), Verdict::Allow);
        }
        let arguments = [libc::AF_VSOCK as u64, 1, 0, 0, 0, 0];
        assert_eq!(
            native(&program, Sysno::socket, arguments),
            Verdict::Errno(libc::EPERM)
        );
    }

    #[test]
    fn clone_without_namespaces_only_and_clone3_is_enosys() {
        let program = program();
        // fork() and pthread_create()'s flags.
        for flags in [
            libc::SIGCHLD as u64,
            0x003d_0f00, // CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|CHILD_CLEARTID
        ] {
            let arguments = [flags, 0, 0, 0, 0, 0];
            assert_eq!(native(&program, Sysno::clone, arguments), Verdict::Allow);
        }
        for flag in [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWCGROUP,
        ] {
            let arguments = [flag as u64 | libc::SIGCHLD as u64, 0, 0, 0, 0, 0];
            assert_eq!(
                native(&program, Sysno::clone, arguments),
                Verdict::Errno(libc::EPERM),
                "flag {flag:#x}"
            );
        }
        assert_eq!(
            native(&program, Sysno::clone3, [0; 6]),
            Verdict::Errno(libc::ENOSYS)
        );
    }

    #[test]
    fn syscalls_newer_than_the_profile_are_enosys() {
        let program = program();
        let target = TargetArch::try_from(std::env::consts::ARCH).unwrap();
        let architecture = audit_architecture(target);
        let profile = Profile::docker_default().unwrap();
        assert_eq!(
            run(&program, architecture, profile.highest_named + 1, [0; 6]),
            Verdict::Errno(libc::ENOSYS)
        );
        assert_eq!(
            run(&program, architecture, 10_000, [0; 6]),
            Verdict::Errno(libc::ENOSYS)
        );
    }

    #[test]
    fn foreign_architectures_are_killed() {
        let program = program();
        const AUDIT_ARCH_I386: u32 = 0x4000_0003;
        // getpid on i386.
        assert_eq!(
            run(&program, AUDIT_ARCH_I386, 20, [0; 6]),
            Verdict::KillProcess
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_syscalls_fail_with_eperm() {
        let program = program();
        let number = X32_SYSCALL_BIT | Sysno::getpid.id() as u32;
        assert_eq!(
            run(
                &program,
                audit_architecture(TargetArch::x86_64),
                number,
                [0; 6]
            ),
            Verdict::Errno(libc::EPERM)
        );
    }

    /// Catches a misspelt name: on x86_64 only the 32-bit ABIs' names may be unknown.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn only_32_bit_names_are_unknown() {
        const THIRTY_TWO_BIT_ONLY: &[&str] = &[
            "chown32",
            "clock_adjtime64",
            "clock_getres_time64",
            "clock_gettime64",
            "clock_nanosleep_time64",
            "clock_settime64",
            "fadvise64_64",
            "fchown32",
            "fcntl64",
            "fstat64",
            "fstatat64",
            "fstatfs64",
            "ftruncate64",
            "futex_time64",
            "getegid32",
            "geteuid32",
            "getgid32",
            "getgroups32",
            "getresgid32",
            "getresuid32",
            "getuid32",
            "io_pgetevents_time64",
            "ipc",
            "lchown32",
            "_llseek",
            "lstat64",
            "mmap2",
            "mq_timedreceive_time64",
            "mq_timedsend_time64",
            "_newselect",
            "ppoll_time64",
            "pselect6_time64",
            "recv",
            "recvmmsg_time64",
            "rt_sigtimedwait_time64",
            "sched_rr_get_interval_time64",
            "semtimedop_time64",
            "send",
            "sendfile64",
            "setfsgid32",
            "setfsuid32",
            "setgid32",
            "setgroups32",
            "setregid32",
            "setresgid32",
            "setresuid32",
            "setreuid32",
            "setuid32",
            "sigprocmask",
            "sigreturn",
            "socketcall",
            "stat64",
            "statfs64",
            "stime",
            "timer_gettime64",
            "timer_settime64",
            "timerfd_gettime64",
            "timerfd_settime64",
            "truncate64",
            "ugetrlimit",
            "umount",
            "utimensat_time64",
            "waitpid",
        ];
        let unknown: Vec<&str> = ALLOWED
            .iter()
            .chain(ALLOWED_SINCE_KERNEL_4_8)
            .chain(CAPABILITY_GATED.iter().flat_map(|(_, names)| names.iter()))
            .copied()
            .filter(|name| Sysno::from_str(name).is_err())
            .filter(|name| !THIRTY_TWO_BIT_ONLY.contains(name))
            .collect();
        assert_eq!(unknown, Vec::<&str>::new());
    }

    #[test]
    fn no_syscall_is_both_unconditional_and_conditional() {
        let profile = Profile::docker_default().unwrap();
        for sysno in profile.conditional.keys().chain(&profile.enosys) {
            assert!(!profile.unconditional.contains(sysno), "{sysno}");
        }
    }

    #[test]
    fn bytes_round_trip() {
        let program = program();
        let bytes = program.to_bytes();
        assert_eq!(bytes.len(), program.instruction_count() * 8);
        assert_eq!(SeccompProgram::from_bytes(&bytes).unwrap(), program);
        assert!(SeccompProgram::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        assert!(SeccompProgram::from_bytes(&[]).is_err());
        assert!(SeccompProgram::from_bytes(&vec![0; 8 * 4097]).is_err());
    }

    #[test]
    fn compiling_is_deterministic_and_timed() {
        let started = std::time::Instant::now();
        let first = program();
        let elapsed = started.elapsed();
        eprintln!(
            "compiled docker's default seccomp profile ({} instructions) in {elapsed:?}",
            first.instruction_count()
        );
        assert_eq!(first, program());
    }
}
