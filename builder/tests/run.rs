//! End-to-end tests of `rbuild run`: images from the store run in the real sandbox, as root,
//! with their config and the `docker run` flags; and a container's changes become a layer in
//! which a deleted file is absent.

mod common;

use common::*;

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// A root with busybox imported, plus an image whose config has Entrypoint, Cmd, Env,
/// WorkingDir and User, loaded from a docker-archive written here.
fn root_with_images(directory: &TempDirectory) -> PathBuf {
    let root = directory.join("root");
    succeeds(rbuild(
        &root,
        &["import", busybox_tar().to_str().unwrap(), "busybox"],
    ));
    let layer = fs::read(busybox_tar()).unwrap();
    let diff_id = format!("sha256:{}", sha256_hex(&layer));
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo \"$GREETING from $(pwd) as $(id -un)\""],
            "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello"],
            "WorkingDir": "/srv/app",
            "User": "daemon"
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]}
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_name = format!("{}.json", sha256_hex(&config));
    let manifest = serde_json::json!([{"Config": config_name, "RepoTags": ["configured:latest"], "Layers": ["layer.tar"]}]);
    let archive = directory.join("configured.tar");
    let mut builder = tar::Builder::new(fs::File::create(&archive).unwrap());
    for (name, content) in [
        ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        (config_name.as_str(), config),
        ("layer.tar", layer),
    ] {
        let mut header = tar::Header::new_ustar();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, name, content.as_slice())
            .unwrap();
    }
    builder.finish().unwrap();
    succeeds(rbuild(&root, &["load", "-i", archive.to_str().unwrap()]));
    root
}

#[test]
fn runs_the_image_config_and_docker_run_overrides() {
    let directory = TempDirectory::new("config");
    let root = root_with_images(&directory);
    let output = succeeds(rbuild(&root, &["run", "--rm", "configured"]));
    assert_eq!(output, "hello from /srv/app as daemon\n");
    let output = succeeds(rbuild(
        &root,
        &[
            "run",
            "--rm",
            "-e",
            "GREETING=bonjour",
            "-w",
            "/tmp",
            "-u",
            "nobody",
            "configured",
        ],
    ));
    assert_eq!(output, "bonjour from /tmp as nobody\n");
    // Command words replace Cmd; --entrypoint replaces the entrypoint and drops Cmd.
    let output = succeeds(rbuild(
        &root,
        &["run", "--rm", "configured", "echo $GREETING; exit 0"],
    ));
    assert_eq!(output, "hello\n");
    let output = succeeds(rbuild(
        &root,
        &[
            "run",
            "--rm",
            "--entrypoint",
            "/bin/echo",
            "configured",
            "-n",
            "plain",
        ],
    ));
    assert_eq!(output, "plain");
    let output = succeeds(rbuild(
        &root,
        &["run", "--rm", "-u", "1000:1000", "busybox", "id"],
    ));
    assert!(output.starts_with("uid=1000 gid=1000"), "{output}");
}

#[test]
fn exit_codes_and_errors_are_docker_s() {
    let directory = TempDirectory::new("errors");
    let root = root_with_images(&directory);
    assert_eq!(
        rbuild(&root, &["run", "--rm", "busybox", "sh", "-c", "exit 42"])
            .status
            .code(),
        Some(42)
    );
    let missing = rbuild(&root, &["run", "--rm", "busybox", "no-such-command"]);
    assert_eq!(missing.status.code(), Some(127));
    assert!(
        text(&missing.stderr).contains("executable file not found in $PATH"),
        "{}",
        text(&missing.stderr)
    );
    // An image the store lacks is pulled, as `docker run` does; here from a loopback port
    // where nothing listens (a test never reaches past this machine).
    let no_image = rbuild(&root, &["run", "--rm", "127.0.0.1:9/nothing-here", "true"]);
    assert_eq!(no_image.status.code(), Some(1));
    let stderr = text(&no_image.stderr);
    assert!(
        stderr.contains("image 127.0.0.1:9/nothing-here is not in the store: pulling it"),
        "{stderr}"
    );
    assert!(
        stderr.contains("127.0.0.1:9/nothing-here:latest"),
        "{stderr}"
    );
    // A name that is no reference is not pulled.
    let bad_name = rbuild(&root, &["run", "--rm", "Nothing-Here", "true"]);
    assert_eq!(bad_name.status.code(), Some(1));
    assert!(
        text(&bad_name.stderr).contains("no such image: Nothing-Here"),
        "{}",
        text(&bad_name.stderr)
    );
    let bad_volume = rbuild(
        &root,
        &["run", "--rm", "-v", "relative:/data", "busybox", "true"],
    );
    assert_eq!(bad_volume.status.code(), Some(2));
    assert!(
        text(&bad_volume.stderr).contains("must be absolute"),
        "{}",
        text(&bad_volume.stderr)
    );
    let no_command = rbuild(&root, &["run", "--rm", "busybox"]);
    assert_eq!(no_command.status.code(), Some(2));
    assert!(
        text(&no_command.stderr).contains("no command specified"),
        "{}",
        text(&no_command.stderr)
    );
    let bad_user = rbuild(
        &root,
        &["run", "--rm", "-u", "nosuchuser", "busybox", "true"],
    );
    assert_eq!(bad_user.status.code(), Some(1));
    assert!(
        text(&bad_user.stderr).contains("nosuchuser"),
        "{}",
        text(&bad_user.stderr)
    );
}

#[test]
fn volumes_bind_read_only_and_read_write() {
    let directory = TempDirectory::new("volumes");
    let root = root_with_images(&directory);
    let shared = directory.join("shared");
    fs::create_dir_all(&shared).unwrap();
    fs::write(shared.join("from-host"), "host data\n").unwrap();
    let read_write = format!("{}:/data", shared.display());
    let output = succeeds(rbuild(
        &root,
        &[
            "run",
            "--rm",
            "-v",
            &read_write,
            "busybox",
            "sh",
            "-c",
            "cat /data/from-host; echo written > /data/from-container",
        ],
    ));
    assert_eq!(output, "host data\n");
    assert_eq!(
        fs::read_to_string(shared.join("from-container")).unwrap(),
        "written\n"
    );
    let read_only = format!("{}:/data:ro", shared.display());
    let output = rbuild(
        &root,
        &[
            "run",
            "--rm",
            "-v",
            &read_only,
            "busybox",
            "sh",
            "-c",
            "echo no > /data/x",
        ],
    );
    assert_ne!(output.status.code(), Some(0));
    assert!(
        text(&output.stderr).contains("Read-only file system"),
        "{}",
        text(&output.stderr)
    );
    assert!(!shared.join("x").exists());
}

#[test]
fn the_sandbox_is_isolated() {
    let directory = TempDirectory::new("isolation");
    let root = root_with_images(&directory);
    let script = "ps -o pid,comm > /tmp/ps; cat /tmp/ps | tail -n +2 | wc -l; \
                  grep -c . /proc/net/dev; \
                  grep CapEff /proc/self/status; \
                  grep -c ' /work' /proc/mounts; \
                  mount -t tmpfs none /mnt 2>&1 || echo mount refused; \
                  cat /proc/kcore 2>/dev/null | head -c1 | wc -c";
    let output = succeeds(rbuild(
        &root,
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "busybox",
            "sh",
            "-c",
            script,
        ],
    ));
    let lines: Vec<&str> = output.lines().collect();
    // sh (PID 1) and ps itself: no host process.
    assert_eq!(lines[0].trim(), "2", "{output}");
    assert_eq!(lines[1].trim(), "3", "two header lines and lo: {output}");
    assert_eq!(lines[2], "CapEff:\t00000000a80425fb");
    assert_eq!(
        lines[3].trim(),
        "0",
        "host mounts are not visible: {output}"
    );
    assert!(output.contains("mount refused"), "{output}");
    assert_eq!(
        lines.last().unwrap().trim(),
        "0",
        "/proc/kcore is masked: {output}"
    );
}

#[test]
fn limits_stop_a_fork_bomb_and_a_memory_hog() {
    let directory = TempDirectory::new("limits");
    let root = root_with_images(&directory);
    let output = rbuild(
        &root,
        &[
            "run",
            "--rm",
            "--pids-limit",
            "32",
            "busybox",
            "sh",
            "-c",
            "for i in $(seq 100); do sleep 30 & done; echo spawned",
        ],
    );
    // The shell (PID 1) ends, and with it every sleep that did start.
    assert!(
        text(&output.stderr).contains("can't fork"),
        "{}",
        text(&output.stderr)
    );
    let output = rbuild(
        &root,
        &[
            "run",
            "--rm",
            "--memory",
            "32m",
            "busybox",
            "sh",
            "-c",
            "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
        ],
    );
    assert_ne!(output.status.code(), Some(0));
    assert!(!text(&output.stdout).contains("survived"));
    assert!(
        text(&output.stderr).contains("out of memory"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn rm_removes_the_writable_layer_and_prune_the_others() {
    let directory = TempDirectory::new("rm");
    let root = root_with_images(&directory);
    let containers = root.join("v1/containers");
    succeeds(rbuild(&root, &["run", "--rm", "busybox", "touch", "/x"]));
    assert_eq!(fs::read_dir(&containers).unwrap().count(), 0);
    succeeds(rbuild(&root, &["run", "busybox", "touch", "/x"]));
    assert_eq!(fs::read_dir(&containers).unwrap().count(), 1);
    succeeds(rbuild(&root, &["prune"]));
    assert_eq!(fs::read_dir(&containers).unwrap().count(), 0);
}

#[test]
fn a_file_deleted_in_a_container_is_absent_from_its_layer() {
    use rbuild_cache::apply::{ApplyOptions, WhiteoutMode, apply_layer};
    use rbuild_cache::layer::{LayerOptions, LayerSource, write_layer_tar};

    let directory = TempDirectory::new("layer");
    let root = root_with_images(&directory);
    succeeds(rbuild(
        &root,
        &[
            "run",
            "busybox",
            "sh",
            "-c",
            "rm /bin/ls; rm -r /home; echo new > /added",
        ],
    ));
    let container = fs::read_dir(root.join("v1/containers"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut tar = Vec::new();
    let options = LayerOptions {
        source: LayerSource::OverlayUpper,
        ..LayerOptions::default()
    };
    write_layer_tar(&container.join("upper"), &options, &mut tar).unwrap();
    let names: std::collections::BTreeSet<String> = tar::Archive::new(tar.as_slice())
        .entries()
        .unwrap()
        .map(|entry| {
            entry
                .unwrap()
                .path()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    // Only the changes: no mountpoints or generated files of the sandbox.
    let expected = ["added", "bin/", "bin/.wh.ls", ".wh.home"].map(str::to_string);
    assert_eq!(names, expected.into_iter().collect());
    // Applied over the base, the deleted file and directory are gone and the new file is there.
    let tree = directory.join("tree");
    fs::create_dir_all(&tree).unwrap();
    let base = fs::File::open(busybox_tar()).unwrap();
    apply_layer(base, &tree, &ApplyOptions::new(WhiteoutMode::Apply)).unwrap();
    assert!(tree.join("bin/ls").symlink_metadata().is_ok());
    apply_layer(
        tar.as_slice(),
        &tree,
        &ApplyOptions::new(WhiteoutMode::Apply),
    )
    .unwrap();
    assert!(tree.join("bin/ls").symlink_metadata().is_err());
    assert!(!tree.join("home").exists());
    assert_eq!(fs::read_to_string(tree.join("added")).unwrap(), "new\n");
    assert!(tree.join("bin/sh").symlink_metadata().is_ok());
}

#[test]
fn sigterm_to_rbuild_reaches_the_container_process() {
    use std::io::{BufRead, BufReader};
    let directory = TempDirectory::new("signals");
    let root = root_with_images(&directory);
    let script = "trap 'echo got TERM; exit 5' TERM; echo ready; while true; do sleep 0.1; done";
    let mut child = Command::new(env!("CARGO_BIN_EXE_rbuild"))
        .arg("--root")
        .arg(&root)
        .args(["run", "--rm", "busybox", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n", "output is streamed while the process runs");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(rest, "got TERM\n");
    assert_eq!(status.code(), Some(5));
}
