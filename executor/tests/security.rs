//! The sandbox's security layers on the real kernel, as root: Docker's seccomp profile loaded
//! into forked children and threads, Docker's default capabilities, and cgroup limits that
//! really stop a fork bomb and a memory hog.

use std::io::{self, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Instant;

use rbuild_executor::capabilities::{self, DEFAULT_CAPABILITY_MASK};
use rbuild_executor::cgroups::{self, Cgroup, CgroupError, CgroupLayout};
use rbuild_executor::seccomp::{self, SeccompProgram};
use rbuild_executor::spec::Limits;
use rustix::thread::{CapabilitySet, CapabilitySets};

const BUSYBOX: &str = "/bin/busybox";

/// Runs `command` to completion with `hook` run in the child between `fork` and `execve`.
#[allow(unsafe_code)]
fn output_with_hook(
    mut command: Command,
    hook: impl FnMut() -> io::Result<()> + Send + Sync + 'static,
) -> io::Result<Output> {
    // SAFETY: every hook in this file only makes raw syscalls (seccomp, prctl, capset,
    // setresuid...) through code that allocates nothing on success, which is safe in the
    // forked child of this multi-threaded test process.
    unsafe {
        command.pre_exec(hook);
    }
    command.stdin(Stdio::null()).output()
}

/// Runs `command` with Docker's default seccomp filter loaded just before `execve`.
fn output_under_filter(command: Command) -> Output {
    let program = seccomp::docker_default().expect("compile the default profile");
    output_with_hook(command, move || program.load().map_err(io::Error::other))
        .expect("spawn the filtered command")
}

fn command(program: &str, args: &[&str]) -> Command {
    let mut command = Command::new(program);
    command.args(args);
    command
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn filter_refuses_user_namespaces() {
    let unfiltered = command("/usr/bin/unshare", &["-U", "true"])
        .output()
        .unwrap();
    assert!(unfiltered.status.success(), "{}", stderr(&unfiltered));

    let filtered = output_under_filter(command("/usr/bin/unshare", &["-U", "true"]));
    assert!(!filtered.status.success());
    assert!(
        stderr(&filtered).contains("Operation not permitted"),
        "{}",
        stderr(&filtered)
    );
}

#[test]
fn filter_refuses_mount() {
    // A missing mount point: without the filter the kernel answers ENOENT, so nothing is
    // mounted on the host even if the filter were broken.
    let args = [
        "mount",
        "-t",
        "tmpfs",
        "tmpfs",
        "/nonexistent-rbuild-mount-point",
    ];
    let unfiltered = command(BUSYBOX, &args).output().unwrap();
    assert!(
        stderr(&unfiltered).contains("No such file or directory"),
        "{}",
        stderr(&unfiltered)
    );

    let filtered = output_under_filter(command(BUSYBOX, &args));
    assert!(!filtered.status.success());
    // busybox's wording for EPERM.
    assert!(
        stderr(&filtered).contains("permission denied"),
        "{}",
        stderr(&filtered)
    );
}

#[test]
fn filter_allows_ordinary_programs() {
    let output = output_under_filter(command("/bin/true", &[]));
    assert!(output.status.success());

    // Forks (clone without namespace flags) and pipes.
    let output = output_under_filter(command(BUSYBOX, &["sh", "-c", "echo ok | cat; exit 3"]));
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert_eq!(stdout(&output), "ok\n");

    // CAP_SYS_CHROOT is a default capability, so Docker's profile allows chroot.
    let output = output_under_filter(command(BUSYBOX, &["chroot", "/", "/bin/true"]));
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn threads_fall_back_from_clone3_to_clone() {
    // glibc's pthread_create tries clone3 first; the filter answers ENOSYS, and glibc
    // retries with clone. With EPERM instead, thread creation would fail.
    let script = "use threads; my @t = map { threads->create(sub { 40 + shift }, $_) } 1..4; \
                  print join(',', map { $_->join } @t), qq(\\n);";
    let output = output_under_filter(command("/usr/bin/perl", &["-e", script]));
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "41,42,43,44\n");
}

#[test]
fn personality_only_with_dockers_values() {
    // PER_LINUX32 (8) is allowed.
    let output = output_under_filter(command(BUSYBOX, &["linux32", "/bin/true"]));
    assert!(output.status.success(), "{}", stderr(&output));

    // setarch -R asks for ADDR_NO_RANDOMIZE, which is not.
    let unfiltered = command("/usr/bin/setarch", &["-R", "/bin/true"])
        .output()
        .unwrap();
    assert!(unfiltered.status.success(), "{}", stderr(&unfiltered));
    let filtered = output_under_filter(command("/usr/bin/setarch", &["-R", "/bin/true"]));
    assert!(!filtered.status.success());
    assert!(
        stderr(&filtered).contains("Operation not permitted"),
        "{}",
        stderr(&filtered)
    );
}

/// One raw syscall; `Err(errno)` on failure.
///
/// Callers pass only small integers, null pointers and pointers to live NUL-terminated
/// strings, and pick calls that read their arguments and write nothing into this process.
#[allow(unsafe_code)]
fn raw_syscall(number: libc::c_long, args: [libc::c_long; 5]) -> Result<libc::c_long, i32> {
    // SAFETY: see the function's documentation: the arguments are plain values or point at
    // memory that outlives the call, and no call made here writes through a pointer.
    let result = unsafe { libc::syscall(number, args[0], args[1], args[2], args[3], args[4]) };
    if result < 0 {
        Err(io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(result)
    }
}

/// The errno of each probe, `None` when it succeeded.
fn probe_results(
    probes: &[(&'static str, libc::c_long, [libc::c_long; 5])],
) -> Vec<(&'static str, Option<i32>)> {
    probes
        .iter()
        .map(|&(name, number, args)| {
            let result = raw_syscall(number, args);
            if let (Ok(fd), true) = (result, name.starts_with("socket")) {
                // Close what a socket probe opened.
                let _ = raw_syscall(libc::SYS_close, [fd, 0, 0, 0, 0]);
            }
            (name, result.err())
        })
        .collect()
}

#[test]
fn filter_in_a_thread_answers_each_syscall_like_docker() {
    let nowhere = c"/nonexistent-rbuild-probe";
    let path = nowhere.as_ptr() as libc::c_long;
    let tmpfs = c"tmpfs".as_ptr() as libc::c_long;
    const KEYCTL_GET_KEYRING_ID: libc::c_long = 0;
    const KEY_SPEC_SESSION_KEYRING: libc::c_long = -3;
    let dangerous = [
        (
            "keyctl",
            libc::SYS_keyctl,
            [KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0, 0, 0],
        ),
        (
            "unshare",
            libc::SYS_unshare,
            [libc::CLONE_NEWUSER as libc::c_long, 0, 0, 0, 0],
        ),
        ("mount", libc::SYS_mount, [tmpfs, path, tmpfs, 0, 0]),
        ("umount2", libc::SYS_umount2, [path, 0, 0, 0, 0]),
        ("pivot_root", libc::SYS_pivot_root, [path, path, 0, 0, 0]),
        ("setns", libc::SYS_setns, [-1, 0, 0, 0, 0]),
        ("bpf", libc::SYS_bpf, [-1, 0, 0, 0, 0]),
    ];
    let socket = |family: libc::c_int| {
        [
            family as libc::c_long,
            libc::SOCK_STREAM as libc::c_long,
            0,
            0,
            0,
        ]
    };
    let probes: Vec<_> = dangerous
        .iter()
        .copied()
        .chain([
            ("add_key", libc::SYS_add_key, [0, 0, 0, 0, 0]),
            ("socket vsock", libc::SYS_socket, socket(libc::AF_VSOCK)),
            ("socket unix", libc::SYS_socket, socket(libc::AF_UNIX)),
            ("clone3", libc::SYS_clone3, [0, 0, 0, 0, 0]),
            (
                "personality query",
                libc::SYS_personality,
                [0xffff_ffff, 0, 0, 0, 0],
            ),
            (
                "personality ADDR_NO_RANDOMIZE",
                libc::SYS_personality,
                [0x0040000, 0, 0, 0, 0],
            ),
            ("chroot", libc::SYS_chroot, [path, 0, 0, 0, 0]),
            ("getpid", libc::SYS_getpid, [0; 5]),
            ("syscall 1000", 1000, [0; 5]),
        ])
        .collect();

    let program = seccomp::docker_default().unwrap();
    let filtered = std::thread::spawn(move || {
        let started = Instant::now();
        program.load().unwrap();
        let load_time = started.elapsed();
        (load_time, probe_results(&probes))
    });
    let unfiltered = std::thread::spawn(move || probe_results(&dangerous));
    let (load_time, filtered) = filtered.join().unwrap();
    eprintln!("loaded the filter into a thread in {load_time:?}");

    let eperm = Some(libc::EPERM);
    let expected = [
        ("keyctl", eperm),
        ("unshare", eperm),
        ("mount", eperm),
        ("umount2", eperm),
        ("pivot_root", eperm),
        ("setns", eperm),
        ("bpf", eperm),
        ("add_key", eperm),
        ("socket vsock", eperm),
        ("socket unix", None),
        ("clone3", Some(libc::ENOSYS)),
        ("personality query", None),
        ("personality ADDR_NO_RANDOMIZE", eperm),
        // Allowed, so the kernel itself answers.
        ("chroot", Some(libc::ENOENT)),
        ("getpid", None),
        ("syscall 1000", Some(libc::ENOSYS)),
    ];
    assert_eq!(filtered, expected);

    // Without the filter the kernel answers something else: the EPERMs above are the
    // filter's.
    for (name, errno) in unfiltered.join().unwrap() {
        assert_ne!(
            errno, eperm,
            "{name} fails with EPERM even without the filter"
        );
    }
}

#[test]
fn profile_compiles_once_for_every_caller() {
    let addresses: Vec<usize> = (0..8)
        .map(|_| {
            std::thread::spawn(|| {
                (0..100)
                    .map(|_| seccomp::docker_default().unwrap() as *const SeccompProgram as usize)
                    .collect::<Vec<_>>()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .flat_map(|thread| thread.join().unwrap())
        .collect();
    assert_eq!(addresses.len(), 800);
    assert!(addresses.iter().all(|&address| address == addresses[0]));
    assert_eq!(seccomp::compile_count(), 1);
}

#[test]
fn shipped_program_round_trips_and_still_filters() {
    let program = seccomp::docker_default().unwrap();
    let bytes = program.to_bytes();
    let shipped = Arc::new(SeccompProgram::from_bytes(&bytes).unwrap());
    assert_eq!(*shipped, *program);
    assert!(SeccompProgram::from_bytes(&bytes[1..]).is_err());

    let output = output_with_hook(command("/usr/bin/unshare", &["-U", "true"]), move || {
        shipped.load().map_err(io::Error::other)
    })
    .unwrap();
    assert!(!output.status.success());
    assert!(stderr(&output).contains("Operation not permitted"));
}

/// The `Cap*` masks of `/proc/self/status` as printed by `output`.
fn capability_masks(output: &Output) -> [(String, u64); 5] {
    assert!(output.status.success(), "{}", stderr(output));
    let status = stdout(output);
    ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"].map(|key| {
        let line = status
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{key}:\t")))
            .unwrap_or_else(|| panic!("no {key} in {status}"));
        (
            key.to_string(),
            u64::from_str_radix(line.trim(), 16).unwrap(),
        )
    })
}

fn masks(
    inheritable: u64,
    permitted: u64,
    effective: u64,
    bounding: u64,
    ambient: u64,
) -> [(String, u64); 5] {
    [
        ("CapInh".to_string(), inheritable),
        ("CapPrm".to_string(), permitted),
        ("CapEff".to_string(), effective),
        ("CapBnd".to_string(), bounding),
        ("CapAmb".to_string(), ambient),
    ]
}

fn status_command() -> Command {
    command(BUSYBOX, &["cat", "/proc/self/status"])
}

/// Puts CAP_NET_RAW (a default capability) in the inheritable and ambient sets, which
/// [`capabilities::apply`] must clear again.
fn raise_ambient_net_raw() -> io::Result<()> {
    let mut sets = rustix::thread::capabilities(None)?;
    sets.inheritable |= CapabilitySet::NET_RAW;
    rustix::thread::set_capabilities(None, sets)?;
    rustix::thread::configure_capability_in_ambient_set(CapabilitySet::NET_RAW, true)?;
    Ok(())
}

#[test]
fn root_keeps_exactly_dockers_default_capabilities() {
    let before = capability_masks(&status_command().output().unwrap());
    assert_ne!(
        before[3].1, DEFAULT_CAPABILITY_MASK,
        "the test process is already confined"
    );

    let output = output_with_hook(status_command(), || {
        capabilities::drop_bounding_set().map_err(io::Error::other)?;
        raise_ambient_net_raw()?;
        capabilities::apply(true).map_err(io::Error::other)
    })
    .unwrap();
    let default = DEFAULT_CAPABILITY_MASK;
    assert_eq!(default, 0xa804_25fb);
    assert_eq!(
        capability_masks(&output),
        masks(0, default, default, default, 0)
    );
}

fn become_user_1000(apply: bool) -> io::Result<Output> {
    output_with_hook(status_command(), move || {
        capabilities::drop_bounding_set().map_err(io::Error::other)?;
        capabilities::set_keep_capabilities(true).map_err(io::Error::other)?;
        rustix::thread::set_thread_groups(&[])?;
        let gid = rustix::process::Gid::from_raw(1000);
        rustix::thread::set_thread_res_gid(gid, gid, gid)?;
        let uid = rustix::process::Uid::from_raw(1000);
        rustix::thread::set_thread_res_uid(uid, uid, uid)?;
        capabilities::set_keep_capabilities(false).map_err(io::Error::other)?;
        raise_ambient_net_raw()?;
        if apply {
            capabilities::apply(false).map_err(io::Error::other)?;
        }
        Ok(())
    })
}

#[test]
fn non_root_user_gets_no_capabilities() {
    let net_raw = CapabilitySet::NET_RAW.bits();
    let default = DEFAULT_CAPABILITY_MASK;
    // Without apply, the ambient capability survives execve into the user's program.
    let leaky = become_user_1000(false).unwrap();
    assert_eq!(
        capability_masks(&leaky),
        masks(net_raw, net_raw, net_raw, default, net_raw)
    );

    let confined = become_user_1000(true).unwrap();
    assert_eq!(capability_masks(&confined), masks(0, 0, 0, default, 0));
}

#[test]
fn apply_for_root_never_grants_what_the_thread_lacks() {
    // A thread already without CAP_KILL cannot get it back from apply.
    let output = output_with_hook(status_command(), || {
        capabilities::drop_bounding_set().map_err(io::Error::other)?;
        let mut sets: CapabilitySets = rustix::thread::capabilities(None)?;
        sets.permitted -= CapabilitySet::KILL;
        sets.effective -= CapabilitySet::KILL;
        rustix::thread::set_capabilities(None, sets)?;
        rustix::thread::remove_capability_from_bounding_set(CapabilitySet::KILL)?;
        capabilities::apply(true).map_err(io::Error::other)
    })
    .unwrap();
    let expected = DEFAULT_CAPABILITY_MASK & !CapabilitySet::KILL.bits();
    assert_eq!(
        capability_masks(&output),
        masks(0, expected, expected, expected, 0)
    );
}

/// A cgroup name unique to this test process.
fn cgroup_name(test: &str) -> String {
    format!("security-test-{}-{test}", std::process::id())
}

/// Starts `busybox sh -c 'read go; SCRIPT'`: it waits on stdin so it can be put in a
/// cgroup before it does anything.
fn spawn_waiting(script: &str) -> std::process::Child {
    Command::new(BUSYBOX)
        .args(["sh", "-c", &format!("read go; {script}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn go(child: &mut std::process::Child) {
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
}

fn procs(cgroup: &Cgroup) -> Vec<i32> {
    let mut pids: Vec<i32> = cgroup
        .directories()
        .iter()
        .flat_map(|directory| {
            std::fs::read_to_string(directory.join("cgroup.procs"))
                .unwrap()
                .lines()
                .map(|line| line.parse().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Whether `pid` still runs (a zombie waiting for its parent does not).
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

#[test]
fn pids_limit_stops_a_fork_bomb_and_remove_kills_the_rest() {
    let limits = Limits {
        pids: Some(20),
        ..Limits::default()
    };
    let cgroup = Cgroup::create(&cgroup_name("pids"), &limits).unwrap();
    let directories = cgroup.directories().to_vec();
    let mut child =
        spawn_waiting("for i in $(seq 1 100); do sleep 1000 </dev/null >/dev/null 2>&1 & done");
    cgroup.add_process(child.id() as i32).unwrap();
    go(&mut child);
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("can't fork"),
        "{}",
        stderr(&output)
    );

    // The shell is gone; the sleeps it managed to start (at most 19) are still there.
    let leftovers = procs(&cgroup);
    assert!(
        !leftovers.is_empty() && leftovers.len() < 20,
        "{leftovers:?}"
    );
    assert!(leftovers.iter().all(|&pid| running(pid)));

    cgroup.remove().unwrap();
    assert!(leftovers.iter().all(|&pid| !running(pid)), "{leftovers:?}");
    assert!(directories.iter().all(|directory| !directory.exists()));
}

#[test]
fn memory_limit_oom_kills_a_hog() {
    let limits = Limits {
        memory: Some(32 << 20),
        ..Limits::default()
    };
    let cgroup = Cgroup::create(&cgroup_name("memory"), &limits).unwrap();
    assert!(!cgroup.oom_killed());
    // dd reads 100 MiB from /dev/zero into one buffer: every page of it gets touched.
    let mut child = spawn_waiting("exec /bin/busybox dd if=/dev/zero of=/dev/null bs=100M count=1");
    cgroup.add_process(child.id() as i32).unwrap();
    go(&mut child);
    let output = child.wait_with_output().unwrap();
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGKILL),
        "{}",
        stderr(&output)
    );
    assert!(cgroup.oom_killed());
    cgroup.remove().unwrap();
}

#[test]
fn cpu_limit_writes_the_quota() {
    let limits = Limits {
        cpus: Some(0.5),
        ..Limits::default()
    };
    let cgroup = Cgroup::create(&cgroup_name("cpu"), &limits).unwrap();
    let read = |file: &str| {
        let directory = cgroup
            .directories()
            .iter()
            .find(|directory| directory.join(file).exists())
            .unwrap_or_else(|| panic!("no {file} in {:?}", cgroup.directories()));
        std::fs::read_to_string(directory.join(file)).unwrap()
    };
    match cgroups::detect().unwrap() {
        CgroupLayout::V1 { .. } => {
            assert_eq!(read("cpu.cfs_quota_us").trim(), "50000");
            assert_eq!(read("cpu.cfs_period_us").trim(), "100000");
        }
        CgroupLayout::V2 { .. } => assert_eq!(read("cpu.max").trim(), "50000 100000"),
    }
    cgroup.remove().unwrap();
}

#[test]
fn cgroup_names_must_be_plain() {
    for name in ["a/b", "..", "../escape", ""] {
        assert!(
            matches!(
                Cgroup::create(name, &Limits::default()),
                Err(CgroupError::InvalidName { .. })
            ),
            "{name:?}"
        );
    }
    for hierarchy in ["memory", "cpu", "pids", ""] {
        let escaped = Path::new("/sys/fs/cgroup").join(hierarchy).join("escape");
        assert!(!escaped.exists(), "{}", escaped.display());
    }
}

/// A v2 hierarchy to test in: the host's if it is pure v2, else the controller-less
/// `unified` hierarchy of a hybrid host.
fn v2_layout() -> CgroupLayout {
    match cgroups::detect().unwrap() {
        CgroupLayout::V2 { root } => CgroupLayout::V2 { root },
        v1 => {
            let unified = Path::new("/sys/fs/cgroup/unified");
            if unified.join("cgroup.controllers").exists() {
                CgroupLayout::V2 {
                    root: unified.to_path_buf(),
                }
            } else {
                v1
            }
        }
    }
}

#[test]
fn dropping_a_cgroup_kills_its_processes_and_removes_it() {
    let layout = v2_layout();
    let cgroup = Cgroup::create_in(&layout, &cgroup_name("drop"), &Limits::default()).unwrap();
    let directories = cgroup.directories().to_vec();
    let mut child = Command::new(BUSYBOX)
        .args(["sleep", "1000"])
        .spawn()
        .unwrap();
    cgroup.add_process(child.id() as i32).unwrap();
    assert_eq!(procs(&cgroup), vec![child.id() as i32]);

    drop(cgroup);
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    assert!(directories.iter().all(|directory| !directory.exists()));
}
