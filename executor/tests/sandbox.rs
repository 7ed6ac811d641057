//! Real sandboxes, as root: a busybox root file system (made once from the host's static
//! busybox) as the overlay's single lower directory, a fresh upper and work directory per run,
//! and `rbuild-sandbox-test` (which calls `init::run_if_requested`) as the helper.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use rbuild_executor::sandbox::{self, Canceller, Output, RunOptions, RunResult, SandboxError};
use rbuild_executor::spec::{Limits, Mount, Network, Process, RootFs, RunSpec};
use tempfile::TempDir;

const HELPER: &str = env!("CARGO_BIN_EXE_rbuild-sandbox-test");
const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The busybox root file system, unpacked once per test binary (kept between runs).
fn busybox_rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sandbox-busybox-rootfs");
        if target.join("bin/busybox").exists() {
            return target;
        }
        let scratch = TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let tarball = scratch.path().join("rootfs.tar");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/busybox-rootfs.sh");
        let status = Command::new("sh")
            .arg(&script)
            .arg(&tarball)
            .status()
            .unwrap();
        assert!(status.success(), "{} failed", script.display());
        let unpacked = scratch.path().join("rootfs");
        std::fs::create_dir(&unpacked).unwrap();
        let status = Command::new("tar")
            .arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(&unpacked)
            .status()
            .unwrap();
        assert!(status.success());
        // Another test binary may have won the race: either copy is fine.
        let _ = std::fs::rename(&unpacked, &target);
        target
    })
}

/// One run's snapshot: upper and work directories on the same file system, and room for
/// host files next to them.
struct Snapshot {
    directory: TempDir,
}

impl Snapshot {
    fn new() -> Self {
        let directory = TempDir::new().unwrap();
        std::fs::create_dir(directory.path().join("upper")).unwrap();
        std::fs::create_dir(directory.path().join("work")).unwrap();
        Snapshot { directory }
    }

    fn upper(&self) -> PathBuf {
        self.directory.path().join("upper")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.directory.path().join(name)
    }

    fn spec(&self, args: &[&str]) -> RunSpec {
        RunSpec::new(
            RootFs::Overlay {
                lower: vec![busybox_rootfs().to_path_buf()],
                upper: self.upper(),
                work: self.directory.path().join("work"),
            },
            Process {
                args: args.iter().map(|arg| arg.to_string()).collect(),
                env: vec![PATH.to_string()],
                cwd: "/".to_string(),
                user: String::new(),
            },
        )
    }

    fn sh(&self, script: &str) -> RunSpec {
        self.spec(&["sh", "-c", script])
    }
}

/// What a run printed and how it ended.
#[derive(Debug)]
struct Ran {
    result: RunResult,
    stdout: String,
    stderr: String,
}

fn collector() -> (Arc<Mutex<Vec<u8>>>, Output) {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let sink = buffer.clone();
    let output = Output::Callback(Box::new(move |chunk: &[u8]| {
        sink.lock().unwrap().extend_from_slice(chunk)
    }));
    (buffer, output)
}

fn text(buffer: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&buffer.lock().unwrap()).into_owned()
}

fn try_run(spec: &RunSpec) -> Result<Ran, SandboxError> {
    let (stdout, stdout_output) = collector();
    let (stderr, stderr_output) = collector();
    let mut options = RunOptions::new(HELPER);
    options.stdout = stdout_output;
    options.stderr = stderr_output;
    let result = sandbox::run(spec, options)?;
    Ok(Ran {
        result,
        stdout: text(&stdout),
        stderr: text(&stderr),
    })
}

fn run(spec: &RunSpec) -> Ran {
    try_run(spec).unwrap_or_else(|error| panic!("run {:?}: {error}", spec.process.args))
}

/// Runs and expects exit code 0.
fn run_ok(spec: &RunSpec) -> Ran {
    let ran = run(spec);
    assert_eq!(ran.result.exit_code, 0, "{ran:?}");
    ran
}

#[test]
fn output_is_collected_and_exit_code_returned() {
    let snapshot = Snapshot::new();
    let ran = run(&snapshot.sh("echo hello; echo oops >&2; exit 3"));
    assert_eq!(ran.stdout, "hello\n");
    assert_eq!(ran.stderr, "oops\n");
    assert_eq!(
        ran.result,
        RunResult {
            exit_code: 3,
            signal: None,
            oom_killed: false
        }
    );
}

#[test]
fn output_streams_while_the_process_runs() {
    // The process waits for a file the test creates only once it has seen the first line:
    // buffered output would leave it waiting (bounded: it gives up after about ten seconds).
    let snapshot = Snapshot::new();
    let shared = snapshot.path("shared");
    std::fs::create_dir(&shared).unwrap();
    let mut spec = snapshot.sh(
        "echo first; i=0; while [ ! -e /shared/go ] && [ $i -lt 1000 ]; do usleep 10000; i=$((i+1)); done; \
         if [ -e /shared/go ]; then echo saw-go; else echo gave-up; fi",
    );
    spec.mounts.push(Mount::Bind {
        source: shared.clone(),
        destination: "/shared".to_string(),
        readonly: false,
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let go = shared.join("go");
    let mut options = RunOptions::new(HELPER);
    options.stdout = Output::Callback(Box::new(move |chunk: &[u8]| {
        let mut seen = sink.lock().unwrap();
        seen.extend_from_slice(chunk);
        if seen.starts_with(b"first\n") && !go.exists() {
            std::fs::write(&go, "").unwrap();
        }
    }));
    let result = sandbox::run(&spec, options).unwrap();
    assert!(result.success());
    assert_eq!(
        String::from_utf8_lossy(&seen.lock().unwrap()),
        "first\nsaw-go\n"
    );
}

#[test]
fn a_canceller_kills_the_sandbox() {
    let snapshot = Snapshot::new();
    let spec = snapshot.sh("echo ready; sleep 30; echo not-cancelled");
    let canceller = Canceller::new();
    let trigger = canceller.clone();
    let (stdout, _) = collector();
    let sink = stdout.clone();
    let mut options = RunOptions::new(HELPER);
    options.stdout = Output::Callback(Box::new(move |chunk: &[u8]| {
        sink.lock().unwrap().extend_from_slice(chunk);
        if chunk.starts_with(b"ready") {
            trigger.cancel();
        }
    }));
    options.canceller = Some(canceller.clone());
    let result = sandbox::run(&spec, options).unwrap();
    assert_eq!(text(&stdout), "ready\n");
    assert_eq!(
        result,
        RunResult {
            exit_code: 137,
            signal: Some(9),
            oom_killed: false
        }
    );
    assert!(canceller.is_cancelled());
    // The layer is still cleaned up.
    assert!(!snapshot.upper().join("etc/hosts").exists());
}

#[test]
fn missing_command_is_exit_code_127_with_a_clear_message() {
    let snapshot = Snapshot::new();
    let error = try_run(&snapshot.spec(&["no-such-command", "x"])).unwrap_err();
    assert_eq!(error.exit_code(), Some(127));
    assert_eq!(
        error.to_string(),
        "cannot start the process: exec: \"no-such-command\": executable file not found in $PATH"
    );

    let error = try_run(&snapshot.spec(&["/no/such/file"])).unwrap_err();
    assert_eq!(error.exit_code(), Some(127));
    assert!(
        error.to_string().contains("no such file or directory"),
        "{error}"
    );

    let error = try_run(&snapshot.spec(&["/etc/passwd"])).unwrap_err();
    assert_eq!(error.exit_code(), Some(126));
    assert!(error.to_string().contains("permission denied"), "{error}");

    // Through a shell it is the shell's own 127.
    let ran = run(&snapshot.sh("no-such-command"));
    assert_eq!(ran.result.exit_code, 127);
    assert!(ran.stderr.contains("not found"), "{ran:?}");
}

#[test]
fn the_process_is_pid_1_and_sees_no_host_process() {
    let snapshot = Snapshot::new();
    let ran = run_ok(&snapshot.spec(&["ps", "-o", "pid,comm"]));
    let processes: Vec<Vec<&str>> = ran
        .stdout
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(processes, [vec!["1", "ps"]], "{ran:?}");

    let ran = run_ok(&snapshot.sh("ls /proc | grep '^[0-9]' ; echo self=$$"));
    // The shell (PID 1) and the pipeline's two processes, nothing else.
    let pids: Vec<u32> = ran
        .stdout
        .lines()
        .filter_map(|line| line.parse().ok())
        .collect();
    assert!(
        pids.contains(&1) && pids.iter().all(|pid| *pid < 10),
        "{ran:?}"
    );
    assert!(ran.stdout.ends_with("self=1\n"));
}

#[test]
fn host_mounts_are_not_visible() {
    let snapshot = Snapshot::new();
    let ran = run_ok(&snapshot.spec(&["cat", "/proc/mounts"]));
    let mount_points: Vec<&str> = ran
        .stdout
        .lines()
        .map(|line| line.split(' ').nth(1).unwrap())
        .collect();
    assert_eq!(mount_points[0], "/", "{ran:?}");
    assert!(ran.stdout.starts_with("overlay / overlay "), "{ran:?}");
    for host_only in ["/work", "/tmp", "/sys/fs/cgroup", "/mnt"] {
        assert!(
            !mount_points
                .iter()
                .any(|point| point.starts_with(host_only)),
            "{host_only} visible: {ran:?}"
        );
    }
}

fn interfaces(proc_net_dev: &str) -> BTreeSet<String> {
    proc_net_dev
        .lines()
        .skip(2)
        .filter_map(|line| line.split(':').next())
        .map(|name| name.trim().to_string())
        .collect()
}

#[test]
fn no_network_means_only_loopback_and_it_is_up() {
    let snapshot = Snapshot::new();
    let ran = run_ok(&snapshot.sh("cat /proc/net/dev; echo flags=$(cat /sys/class/net/lo/flags)"));
    let (devices, flags) = ran.stdout.split_once("flags=").unwrap();
    assert_eq!(interfaces(devices), BTreeSet::from(["lo".to_string()]));
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 1, 1, "IFF_UP in {flags:#x}");
    let ran = run_ok(&snapshot.spec(&["ping", "-c", "1", "-W", "1", "127.0.0.1"]));
    assert!(ran.stdout.contains("1 packets received"), "{ran:?}");
}

#[test]
fn host_network_sees_the_host_interfaces() {
    let snapshot = Snapshot::new();
    let mut spec = snapshot.spec(&["cat", "/proc/net/dev"]);
    spec.network = Network::Host;
    let ran = run_ok(&spec);
    let host = std::fs::read_to_string("/proc/net/dev").unwrap();
    assert_eq!(interfaces(&ran.stdout), interfaces(&host));
    assert!(interfaces(&host).len() > 1, "the host has only loopback?");
}

fn capability_line(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn capabilities_are_dockers_defaults() {
    let snapshot = Snapshot::new();
    let ran = run_ok(&snapshot.spec(&["cat", "/proc/self/status"]));
    assert_eq!(capability_line(&ran.stdout, "CapEff:"), "00000000a80425fb");
    assert_eq!(capability_line(&ran.stdout, "CapBnd:"), "00000000a80425fb");
    assert_eq!(capability_line(&ran.stdout, "CapAmb:"), "0000000000000000");
    assert_eq!(capability_line(&ran.stdout, "Seccomp:"), "2");

    let mut spec = snapshot.spec(&["cat", "/proc/self/status"]);
    spec.process.user = "1000".to_string();
    let ran = run_ok(&spec);
    for set in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:"] {
        assert_eq!(
            capability_line(&ran.stdout, set),
            "0000000000000000",
            "{set}"
        );
    }
    assert_eq!(capability_line(&ran.stdout, "CapBnd:"), "00000000a80425fb");
}

#[test]
fn masked_paths_are_empty() {
    let snapshot = Snapshot::new();
    let ran = run_ok(&snapshot.sh(
        "for f in /proc/kcore /proc/keys /proc/timer_list /proc/interrupts /proc/sched_debug; do \
           if [ -e $f ]; then echo \"$f $(cat $f | wc -c)\"; fi; done; \
         echo \"/sys/firmware $(ls -A /sys/firmware | wc -l)\"; \
         echo \"/proc/acpi $(ls -A /proc/acpi | wc -l)\"",
    ));
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert!(lines.len() >= 4, "{ran:?}");
    for line in lines {
        assert!(line.ends_with(" 0"), "{line} is not empty: {ran:?}");
    }
    // The host's are not.
    assert!(
        !std::fs::read_to_string("/proc/interrupts")
            .unwrap()
            .is_empty()
    );
}

#[test]
fn proc_sys_is_read_only() {
    let snapshot = Snapshot::new();
    let ran = run(&snapshot.sh("echo evil > /proc/sys/kernel/domainname"));
    assert_ne!(ran.result.exit_code, 0);
    assert!(ran.stderr.contains("Read-only file system"), "{ran:?}");
    let ran = run(&snapshot.sh("echo 1 > /proc/sysrq-trigger || echo refused"));
    assert!(
        ran.stdout.contains("refused") || ran.stderr.contains("Read-only"),
        "{ran:?}"
    );
}

#[test]
fn mount_and_new_namespaces_are_refused() {
    let snapshot = Snapshot::new();
    for script in [
        "mkdir -p /mnt && mount -t tmpfs x /mnt",
        "unshare -U true",
        "unshare -m true",
        "unshare -n true",
    ] {
        let ran = run(&snapshot.sh(script));
        assert_ne!(ran.result.exit_code, 0, "{script} succeeded: {ran:?}");
        assert!(
            ran.stderr.contains("not permitted") || ran.stderr.contains("denied"),
            "{script}: {ran:?}"
        );
    }
}

#[test]
fn users_come_from_the_images_passwd() {
    let snapshot = Snapshot::new();
    let mut spec = snapshot.spec(&["id"]);
    spec.process.user = "nobody".to_string();
    assert_eq!(
        run_ok(&spec).stdout,
        "uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup)\n"
    );

    spec.process.user = "1234:4321".to_string();
    assert_eq!(run_ok(&spec).stdout, "uid=1234 gid=4321 groups=4321\n");

    spec.process.user = "daemon:nogroup".to_string();
    assert_eq!(
        run_ok(&spec).stdout,
        "uid=1(daemon) gid=65534(nogroup) groups=65534(nogroup)\n"
    );

    let mut spec = snapshot.sh("echo $HOME");
    spec.process.user = "nobody".to_string();
    assert_eq!(run_ok(&spec).stdout, "/home\n");

    spec.process.user = "mallory".to_string();
    let error = try_run(&spec).unwrap_err();
    assert!(matches!(error, SandboxError::User { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        "unable to find user mallory: no matching entries in passwd file"
    );
}

#[test]
fn working_directory_is_created_for_the_user() {
    let snapshot = Snapshot::new();
    let mut spec = snapshot.sh("pwd; stat -c '%u:%g %a' /work/deep/dir /work");
    spec.process.cwd = "/work/deep/dir".to_string();
    spec.process.user = "nobody".to_string();
    let ran = run_ok(&spec);
    assert_eq!(
        ran.stdout,
        "/work/deep/dir\n65534:65534 755\n65534:65534 755\n"
    );
    // A real change of the step: it stays in the layer.
    assert!(snapshot.upper().join("work/deep/dir").is_dir());
}

#[test]
fn environment_is_exactly_the_specs_plus_home() {
    let snapshot = Snapshot::new();
    let mut spec = snapshot.spec(&["env"]);
    spec.process.env = vec![
        PATH.to_string(),
        "A=1".to_string(),
        "B=two words".to_string(),
    ];
    let ran = run_ok(&spec);
    let mut lines: Vec<&str> = ran.stdout.lines().collect();
    lines.sort();
    assert_eq!(lines, ["A=1", "B=two words", "HOME=/root", PATH]);

    spec.process.env.push("HOME=/elsewhere".to_string());
    assert!(run_ok(&spec).stdout.contains("HOME=/elsewhere\n"));
}

#[test]
fn hostname_and_etc_files() {
    let snapshot = Snapshot::new();
    let mut spec =
        snapshot.sh("hostname; cat /etc/hostname; cat /etc/hosts; wc -c < /etc/resolv.conf");
    spec.hostname = "step-7".to_string();
    spec.extra_hosts = vec!["10.1.2.3 registry.internal".to_string()];
    let ran = run_ok(&spec);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(&lines[..2], ["step-7", "step-7"]);
    assert!(lines.contains(&"127.0.0.1\tlocalhost"), "{ran:?}");
    assert!(lines.contains(&"::1\tlocalhost ip6-localhost ip6-loopback"));
    assert!(lines.contains(&"127.0.1.1\tstep-7"));
    assert!(lines.contains(&"10.1.2.3 registry.internal"));
    assert_eq!(
        lines.last(),
        Some(&"0"),
        "no name servers without a network"
    );

    spec.network = Network::Host;
    let ran = run_ok(&spec);
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    assert_eq!(
        ran.stdout.lines().last(),
        Some(host_resolv.len().to_string().as_str())
    );
}

#[test]
fn bind_mounts_and_tmpfs() {
    let snapshot = Snapshot::new();
    let readonly = snapshot.path("readonly");
    let writable = snapshot.path("writable");
    std::fs::create_dir(&readonly).unwrap();
    std::fs::create_dir(&writable).unwrap();
    std::fs::write(readonly.join("input"), "from the host\n").unwrap();
    let mut spec = snapshot.sh("cat /in/input; \
         if echo x > /in/new 2>/dev/null; then echo wrote-readonly; fi; \
         echo from-the-sandbox > /out/result; \
         grep ' /scratch ' /proc/mounts; echo data > /scratch/file && cat /scratch/file");
    spec.mounts = vec![
        Mount::Bind {
            source: readonly.clone(),
            destination: "/in".to_string(),
            readonly: true,
        },
        Mount::Bind {
            source: writable.clone(),
            destination: "/out".to_string(),
            readonly: false,
        },
        Mount::Tmpfs {
            destination: "/scratch".to_string(),
            size: Some(1 << 20),
        },
    ];
    let ran = run_ok(&spec);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(lines[0], "from the host");
    assert!(!ran.stdout.contains("wrote-readonly"), "{ran:?}");
    assert!(
        lines[1].starts_with("tmpfs /scratch tmpfs rw,nosuid,nodev"),
        "{ran:?}"
    );
    assert!(lines[1].contains("size=1024k"), "{ran:?}");
    assert_eq!(lines[2], "data");
    assert!(!readonly.join("new").exists());
    assert_eq!(
        std::fs::read_to_string(writable.join("result")).unwrap(),
        "from-the-sandbox\n"
    );
    // Their mount points were created for the run only.
    for name in ["in", "out", "scratch"] {
        assert!(
            !snapshot.upper().join(name).exists(),
            "{name} left in the layer"
        );
    }
}

#[test]
fn pids_limit_stops_a_fork_bomb() {
    let snapshot = Snapshot::new();
    // Without a limit the shell would start 200 sleepers and print "all started".
    let mut spec = snapshot
        .sh("i=0; while [ $i -lt 200 ]; do sleep 1000 & i=$((i+1)); done; echo all started");
    spec.limits = Limits {
        pids: Some(16),
        ..Limits::default()
    };
    let ran = run(&spec);
    assert_ne!(ran.result.exit_code, 0, "{ran:?}");
    assert!(!ran.stdout.contains("all started"), "{ran:?}");
    assert!(ran.stderr.contains("fork"), "{ran:?}");

    // The host is fine, and so is the next sandbox.
    run_ok(&snapshot.spec(&["true"]));
}

#[test]
fn memory_limit_kills_a_memory_hog() {
    let snapshot = Snapshot::new();
    let mut spec =
        snapshot.sh("a=$(head -c 268435456 /dev/zero | tr '\\0' a); echo survived ${#a}");
    spec.limits = Limits {
        memory: Some(32 << 20),
        ..Limits::default()
    };
    let ran = run(&spec);
    assert!(ran.result.oom_killed, "{ran:?}");
    assert!(!ran.stdout.contains("survived"), "{ran:?}");
    assert_ne!(ran.result.exit_code, 0);

    let ran = run_ok(&snapshot.spec(&["true"]));
    assert!(!ran.result.oom_killed);
}

/// Every path below `root`, relative.
fn tree(root: &Path) -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(directory) = pending.pop() {
        for entry in std::fs::read_dir(&directory).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            paths.insert(path.strip_prefix(root).unwrap().display().to_string());
            if entry.file_type().unwrap().is_dir() {
                pending.push(path);
            }
        }
    }
    paths
}

#[test]
fn layer_holds_only_what_the_process_changed() {
    let snapshot = Snapshot::new();
    let cache = snapshot.path("cache");
    std::fs::create_dir(&cache).unwrap();
    let mut spec = snapshot.sh(
        "touch /newfile; rm /bin/ls; ls /var/cache/apt /etc/hosts /etc/resolv.conf > /dev/null",
    );
    spec.mounts.push(Mount::Bind {
        source: cache,
        destination: "/var/cache/apt".to_string(),
        readonly: false,
    });
    run_ok(&spec);
    let upper = snapshot.upper();
    assert_eq!(
        tree(&upper),
        BTreeSet::from([
            "bin".to_string(),
            "bin/ls".to_string(),
            "newfile".to_string()
        ])
    );
    let whiteout = std::fs::symlink_metadata(upper.join("bin/ls")).unwrap();
    assert!(whiteout.file_type().is_char_device());
    assert_eq!(whiteout.rdev(), 0);
}

#[test]
fn layer_keeps_changes_next_to_mount_points() {
    // /etc was copied up to hold the /etc/hosts mount point; a file the process wrote there
    // keeps it (and the process's file) in the layer.
    let snapshot = Snapshot::new();
    run_ok(&snapshot.sh("echo x > /etc/motd"));
    assert_eq!(
        tree(&snapshot.upper()),
        BTreeSet::from(["etc".to_string(), "etc/motd".to_string()])
    );
}

#[test]
fn descriptors_of_the_caller_do_not_leak_in() {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;

    // Deliberately without O_CLOEXEC, so the helper inherits it.
    let leaked = open("/etc/hostname", OFlag::O_RDONLY, Mode::empty()).unwrap();
    let snapshot = Snapshot::new();
    let ran = run_ok(&snapshot.spec(&["ls", "/proc/self/fd"]));
    drop(leaked);
    // ls's own descriptor for the directory it lists is the 3.
    assert_eq!(
        ran.stdout.split_whitespace().collect::<Vec<_>>(),
        ["0", "1", "2", "3"]
    );
}

#[test]
fn helper_binary_cannot_be_overwritten_from_inside() {
    // CVE-2019-5736: runc's binary was reachable as /proc/self/exe of a process in the
    // container. Here the helper stays outside the PID namespace and PID 1 is the user's
    // program, so no /proc/*/exe inside is the helper.
    let before = std::fs::read(HELPER).unwrap();
    let snapshot = Snapshot::new();
    let ran = run(
        &snapshot.sh("for f in /proc/1/exe /proc/self/exe /proc/[0-9]*/exe; do \
           if (echo evil >> $f) 2>/dev/null; then echo \"wrote $f\"; fi; \
           if (: > $f) 2>/dev/null; then echo \"truncated $f\"; fi; \
         done; \
         ls -l /proc/[0-9]*/exe /proc/[0-9]*/fd 2>/dev/null | grep -c rbuild-sandbox-test; \
         cat /proc/[0-9]*/maps 2>/dev/null | grep -c rbuild-sandbox-test"),
    );
    assert!(
        !ran.stdout.contains("wrote") && !ran.stdout.contains("truncated"),
        "{ran:?}"
    );
    assert_eq!(
        ran.stdout, "0\n0\n",
        "the helper is visible inside: {ran:?}"
    );
    assert_eq!(
        std::fs::read(HELPER).unwrap(),
        before,
        "the helper binary changed"
    );
}

#[test]
fn directory_root_works_and_is_cleaned_up() {
    let snapshot = Snapshot::new();
    let root = snapshot.path("root");
    let status = Command::new("cp")
        .arg("-a")
        .arg(busybox_rootfs())
        .arg(&root)
        .status()
        .unwrap();
    assert!(status.success());
    let before = tree(&root);
    let mut spec = snapshot.sh("echo hi > /created-by-process");
    spec.rootfs = RootFs::Directory(root.clone());
    run_ok(&spec);
    let mut expected = before;
    expected.insert("created-by-process".to_string());
    assert_eq!(tree(&root), expected);
}

#[test]
fn empty_root_gets_only_what_the_process_wrote() {
    // No lower directory: an empty root, with the host's static busybox bound in.
    let snapshot = Snapshot::new();
    let mut spec = snapshot.spec(&[
        "/bin/busybox",
        "sh",
        "-c",
        "echo hi > /file; /bin/busybox ls /",
    ]);
    spec.rootfs = RootFs::Overlay {
        lower: Vec::new(),
        upper: snapshot.upper(),
        work: snapshot.path("work"),
    };
    spec.mounts.push(Mount::Bind {
        source: PathBuf::from("/bin/busybox"),
        destination: "/bin/busybox".to_string(),
        readonly: true,
    });
    let ran = run_ok(&spec);
    let listed: BTreeSet<&str> = ran.stdout.split_whitespace().collect();
    assert_eq!(
        listed,
        BTreeSet::from(["bin", "dev", "etc", "file", "proc", "sys"])
    );
    assert_eq!(
        tree(&snapshot.upper()),
        BTreeSet::from(["file".to_string()])
    );
}

#[test]
fn many_lower_directories_fit_with_relative_paths() {
    // 45 layers with 64-character names: over a page of absolute paths.
    let snapshot = Snapshot::new();
    let layers = snapshot.path(&format!("snapshots-{}", "s".repeat(40)));
    std::fs::create_dir(&layers).unwrap();
    let mut lower = Vec::new();
    for index in (0..45).rev() {
        let layer = layers.join(format!("{index:064}"));
        std::fs::create_dir(&layer).unwrap();
        std::fs::write(layer.join(format!("layer-{index}")), format!("{index}\n")).unwrap();
        lower.push(layer);
    }
    let base = layers.join("base");
    let status = Command::new("cp")
        .arg("-a")
        .arg(busybox_rootfs())
        .arg(&base)
        .status()
        .unwrap();
    assert!(status.success());
    lower.push(base);
    let options_length: usize = lower.iter().map(|path| path.as_os_str().len() + 1).sum();
    assert!(options_length > 4096);
    let upper = layers.join("upper");
    let work = layers.join("work");
    std::fs::create_dir(&upper).unwrap();
    std::fs::create_dir(&work).unwrap();
    let mut spec = snapshot.sh("cat /layer-0 /layer-44");
    spec.rootfs = RootFs::Overlay { lower, upper, work };
    assert_eq!(run_ok(&spec).stdout, "0\n44\n");
}

#[test]
fn concurrent_runs_are_independent() {
    let handles: Vec<_> = (0..4)
        .map(|index| {
            std::thread::spawn(move || {
                let snapshot = Snapshot::new();
                let mut spec = snapshot.sh("hostname; echo $$");
                spec.hostname = format!("host-{index}");
                run_ok(&spec).stdout
            })
        })
        .collect();
    for (index, handle) in handles.into_iter().enumerate() {
        assert_eq!(handle.join().unwrap(), format!("host-{index}\n1\n"));
    }
}
