//! End-to-end tests of `rbuild build -o`: one real multi-layer build exported as a directory,
//! a tar, an OCI archive and a docker archive, each checked with real tools (GNU tar, skopeo,
//! umoci, runc, `rbuild load`); standard output; bad specs; failing builds; and a destination
//! directory holding a symlink that points outside it.

mod common;

use common::*;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The base image has /etc/group and /home; the RUN deletes them (whiteouts), writes a file
/// owned by 1:1 and a symlink; the COPY sets a mode.
const DOCKERFILE: &str = "FROM busybox
RUN rm /etc/group && rm -r /home && mkdir -p /data && echo built > /data/out \\
    && chown 1:1 /data/out && ln -s /data/out /link
COPY --chmod=0750 app.sh /app/app.sh
CMD [\"/bin/sh\", \"-c\", \"cat /data/out\"]
";

/// A context with [`DOCKERFILE`] and a root with busybox imported.
fn setup(directory: &TempDirectory, dockerfile: &str) -> (PathBuf, PathBuf) {
    let context = directory.join("context");
    fs::create_dir_all(&context).unwrap();
    fs::write(context.join("Dockerfile"), dockerfile).unwrap();
    fs::write(context.join("app.sh"), "#!/bin/sh\necho app\n").unwrap();
    let root = directory.join("root");
    import_busybox(&root, "busybox:latest");
    (context, root)
}

fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs `rbuild build --network none ARGUMENTS CONTEXT`.
fn build(root: &Path, context: &Path, arguments: &[&str]) -> std::process::Output {
    let mut all = vec!["build", "--progress", "plain", "--network", "none"];
    all.extend_from_slice(arguments);
    all.push(path(context));
    rbuild(root, &all)
}

/// Every path under `root` with `mode uid/gid` and, for a symlink, its target.
fn walk(root: &Path) -> BTreeMap<String, String> {
    let mut entries = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(directory) = pending.pop() {
        for entry in fs::read_dir(&directory).unwrap() {
            let entry = entry.unwrap();
            let metadata = fs::symlink_metadata(entry.path()).unwrap();
            let name = entry
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            let mut description = format!(
                "{:o} {}/{}",
                metadata.mode() & 0o7777,
                metadata.uid(),
                metadata.gid()
            );
            if metadata.is_symlink() {
                description = format!(
                    "link {}",
                    fs::read_link(entry.path()).unwrap().to_str().unwrap()
                );
            } else if metadata.is_dir() {
                pending.push(entry.path());
            }
            entries.insert(name, description);
        }
    }
    entries
}

/// The names GNU tar lists, without the trailing `/` of directories.
fn tar_names(listing: &str) -> Vec<String> {
    let mut names: Vec<String> = listing
        .lines()
        .map(|line| line.trim_end_matches('/').to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn one_build_exports_a_directory_a_tar_an_oci_archive_and_a_docker_archive() {
    let directory = TempDirectory::new("export-all");
    let (context, root) = setup(&directory, DOCKERFILE);
    let local = directory.join("out/rootfs");
    let filesystem_tar = directory.join("out/rootfs.tar");
    let oci = directory.join("out/image-oci.tar");
    let docker = directory.join("out/image-docker.tar");
    let named_docker = directory.join("out/named-docker.tar");
    let metadata_path = directory.join("metadata.json");
    let stdout = succeeds(build(
        &root,
        &context,
        &[
            "-t",
            "app:v1",
            "-t",
            "example.com/team/app:v2",
            "--metadata-file",
            path(&metadata_path),
            "-o",
            &format!("type=local,dest={}", local.display()),
            "-o",
            &format!("type=tar,dest={}", filesystem_tar.display()),
            "-o",
            &format!("type=oci,dest={},name=app:oci", oci.display()),
            "-o",
            &format!("type=docker,dest={}", docker.display()),
            "-o",
            &format!("type=docker,dest={},name=app:named", named_docker.display()),
            "-o",
            "type=image,name=also/app:v3",
        ],
    ));
    let metadata: serde_json::Value =
        serde_json::from_slice(&fs::read(&metadata_path).unwrap()).unwrap();
    let digest = metadata["image"]["digest"].as_str().unwrap().to_string();
    let config_digest = metadata["image"]["config_digest"].as_str().unwrap();
    assert_eq!(stdout.trim(), digest);
    let outputs = metadata["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 6, "{metadata:#}");
    assert_eq!(outputs[0]["type"], "local");
    assert_eq!(outputs[0]["dest"], path(&local));
    assert_eq!(outputs[5]["name"], "also/app:v3");

    // type=local: the final filesystem, whiteouts applied, owners and modes as built.
    let tree = walk(&local);
    assert_eq!(tree["data/out"], "644 1/1");
    assert_eq!(tree["app/app.sh"], "750 0/0");
    assert_eq!(tree["link"], "link /data/out");
    assert_eq!(tree["bin/busybox"], "755 0/0");
    assert_eq!(tree["tmp"], "1777 0/0");
    assert_eq!(tree["root"], "700 0/0");
    assert_eq!(
        fs::read_to_string(local.join("data/out")).unwrap(),
        "built\n"
    );
    assert!(tree.contains_key("etc/passwd"));
    assert!(!tree.contains_key("etc/group"), "the deleted file is gone");
    assert!(!tree.contains_key("home"), "the deleted directory is gone");
    assert!(
        !tree.keys().any(|name| name.contains(".wh.")),
        "no whiteout files: {tree:?}"
    );

    // type=tar: the same entries, read by GNU tar, with owners and modes.
    let listing = tool("tar", &["-tf", path(&filesystem_tar)]);
    let names = tar_names(&listing);
    let tree_names: Vec<String> = tree.keys().cloned().collect();
    assert_eq!(names, tree_names);
    let verbose = tool("tar", &["-tvf", path(&filesystem_tar), "--numeric-owner"]);
    let line = |name: &str| {
        verbose
            .lines()
            .find(|line| {
                line.ends_with(&format!(" {name}")) || line.contains(&format!(" {name} -> "))
            })
            .unwrap_or_else(|| panic!("{name} missing from\n{verbose}"))
            .to_string()
    };
    assert!(
        line("data/out").starts_with("-rw-r--r-- 1/1 "),
        "{}",
        line("data/out")
    );
    assert!(line("app/app.sh").starts_with("-rwxr-x--- 0/0 "));
    assert!(line("link").ends_with("link -> /data/out"));

    // type=oci: skopeo reads it with our manifest digest; umoci unpacks it and runc runs it.
    let skopeo: serde_json::Value = serde_json::from_str(&tool(
        "skopeo",
        &["inspect", &format!("oci-archive:{}", oci.display())],
    ))
    .unwrap();
    assert_eq!(skopeo["Digest"], digest.as_str());
    assert_eq!(skopeo["Layers"].as_array().unwrap().len(), 3);
    let layout = directory.join("layout");
    fs::create_dir_all(&layout).unwrap();
    tool("tar", &["-xf", path(&oci), "-C", path(&layout)]);
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["annotations"]["io.containerd.image.name"],
        "docker.io/library/app:oci"
    );
    let bundle = directory.join("bundle");
    tool(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:oci", layout.display()),
            path(&bundle),
        ],
    );
    let config_path = bundle.join("config.json");
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(&config_path).unwrap()).unwrap();
    assert_eq!(
        config["process"]["args"],
        serde_json::json!(["/bin/sh", "-c", "cat /data/out"]),
        "the image's CMD"
    );
    let mut config = config;
    config["process"]["terminal"] = serde_json::json!(false);
    fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    let container = format!("rbuild-export-test-{}", std::process::id());
    let output = Command::new("runc")
        .args(["run", "--bundle", path(&bundle), &container])
        .stdin(Stdio::null())
        .output()
        .expect("runc must be installed (CI installs it with apt-get)");
    let _ = Command::new("runc")
        .args(["delete", "--force", &container])
        .output();
    assert_eq!(
        text(&output.stdout),
        "built\n",
        "runc: {}",
        text(&output.stderr)
    );

    // type=docker: every -t tag in one manifest.json entry; loads back with the same config.
    let manifest: serde_json::Value =
        serde_json::from_str(&tool("tar", &["-xOf", path(&docker), "manifest.json"])).unwrap();
    assert_eq!(manifest.as_array().unwrap().len(), 1, "{manifest}");
    assert_eq!(
        manifest[0]["RepoTags"],
        serde_json::json!(["app:v1", "example.com/team/app:v2"])
    );
    let fresh = directory.join("fresh");
    let loaded = succeeds(rbuild(&fresh, &["load", "-i", path(&docker)]));
    assert!(loaded.contains("app:v1"), "{loaded}");
    assert_eq!(inspect(&fresh, "app:v1")["config_digest"], config_digest);
    assert_eq!(
        inspect(&fresh, "example.com/team/app:v2")["config_digest"],
        config_digest
    );
    // name= replaces the tags.
    let manifest: serde_json::Value = serde_json::from_str(&tool(
        "tar",
        &["-xOf", path(&named_docker), "manifest.json"],
    ))
    .unwrap();
    assert_eq!(manifest[0]["RepoTags"], serde_json::json!(["app:named"]));
    let named = directory.join("named");
    succeeds(rbuild(&named, &["load", "-i", path(&named_docker)]));
    assert_eq!(inspect(&named, "app:named")["config_digest"], config_digest);

    // type=image: a name in the store.
    assert_eq!(inspect(&root, "also/app:v3")["digest"], digest.as_str());

    // No temp files are left beside the outputs, nor scratch trees in the store.
    let leftovers: Vec<_> = fs::read_dir(directory.join("out"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .filter(|name| name.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let containers = root.join("v1/containers");
    if containers.is_dir() {
        let scratch: Vec<_> = fs::read_dir(&containers)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .filter(|name| name.to_string_lossy().starts_with("export-"))
            .collect();
        assert!(scratch.is_empty(), "{scratch:?}");
    }
}

#[test]
fn dash_writes_the_filesystem_tar_to_a_pipe() {
    let directory = TempDirectory::new("export-stdout");
    let (context, root) = setup(&directory, DOCKERFILE);
    let file = directory.join("rootfs.tar");
    succeeds(build(
        &root,
        &context,
        &[
            "--build-arg",
            "SOURCE_DATE_EPOCH=1000",
            "-o",
            &format!("type=tar,dest={}", file.display()),
        ],
    ));
    // Output captures stdout through a pipe: `-o -` is `type=tar,dest=-`.
    let piped = build(
        &root,
        &context,
        &["--build-arg", "SOURCE_DATE_EPOCH=1000", "-o", "-"],
    );
    assert!(piped.status.success(), "{}", text(&piped.stderr));
    let written = fs::read(&file).unwrap();
    // Compared without printing megabytes of bytes on a failure.
    assert!(
        piped.stdout == written,
        "stdout holds exactly the tar, nothing else: {} bytes on stdout, {} in the file, last \
         stdout bytes {:?}",
        piped.stdout.len(),
        written.len(),
        text(&piped.stdout[piped.stdout.len().saturating_sub(80)..])
    );
    let mut archive = tar::Archive::new(piped.stdout.as_slice());
    let mut names = Vec::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        assert!(
            entry.header().mtime().unwrap() <= 1000,
            "mtime clamped to SOURCE_DATE_EPOCH"
        );
        names.push(entry.path().unwrap().to_str().unwrap().to_string());
    }
    assert!(names.contains(&"data/out".to_string()), "{names:?}");
    assert!(!names.contains(&"etc/group".to_string()));
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "entries in a deterministic, sorted order");

    // An OCI archive on stdout loads back.
    let piped = build(&root, &context, &["-o", "type=oci,dest=-,name=piped:v1"]);
    assert!(piped.status.success(), "{}", text(&piped.stderr));
    let archive = directory.join("piped.tar");
    fs::write(&archive, &piped.stdout).unwrap();
    let fresh = directory.join("fresh");
    succeeds(rbuild(&fresh, &["load", "-i", path(&archive)]));
    assert!(
        inspect(&fresh, "piped:v1")["rootfs"]["diff_ids"]
            .as_array()
            .is_some_and(|ids| ids.len() == 3)
    );
}

#[test]
fn bad_output_specs_exit_2_before_building() {
    let directory = TempDirectory::new("export-bad");
    let (context, root) = setup(&directory, DOCKERFILE);
    let existing = directory.join("existing-directory");
    fs::create_dir_all(&existing).unwrap();
    let a_file = directory.join("a-file");
    fs::write(&a_file, "x").unwrap();
    let cases = [
        ("type=zip,dest=x".to_string(), "unknown type"),
        ("type=oci".to_string(), "dest= is required"),
        ("type=local,dest=x,colour=red".to_string(), "unknown key"),
        ("type=tar,dest=x,name=app".to_string(), "unknown key"),
        ("type=local,dest=-".to_string(), "standard output"),
        ("type=oci,dest=x,name=Not/Valid".to_string(), "lower-case"),
        (
            format!("type=oci,dest={}", existing.display()),
            "is a directory",
        ),
        (
            format!("type=local,dest={}", a_file.display()),
            "not a directory",
        ),
    ];
    for (spec, problem) in &cases {
        let output = build(&root, &context, &["-o", spec]);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{spec}: {stderr}");
        assert!(stderr.contains(problem), "{spec}: {stderr}");
        assert!(!stderr.contains("[stage-0"), "{spec} built: {stderr}");
    }
    let output = build(&root, &context, &["-o", "-", "-o", "type=oci,dest=-"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("only one --output"));
    assert!(output.stdout.is_empty());
    // A tar is never written to a terminal: `script` (util-linux) gives rbuild a pty.
    let command = format!(
        "{} --root {} build -o - {}",
        env!("CARGO_BIN_EXE_rbuild"),
        root.display(),
        context.display()
    );
    let output = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script (util-linux) runs");
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stdout));
    assert!(
        text(&output.stdout).contains("refusing to write a tar to a terminal"),
        "{}",
        text(&output.stdout)
    );
    let output = build(&root, &context, &["--cache-to", "type=s3,dest=c"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("unknown type \"s3\""),
        "{}",
        text(&output.stderr)
    );
    // Nothing was built, so nothing is in the store but the base.
    let images = succeeds(rbuild(&root, &["images", "-q"]));
    assert_eq!(images.lines().count(), 1, "{images}");
}

#[test]
fn a_failing_build_leaves_no_destination() {
    let directory = TempDirectory::new("export-failing");
    let (context, root) = setup(&directory, "FROM busybox\nRUN echo partial > /x && false\n");
    let out = directory.join("out");
    fs::create_dir_all(&out).unwrap();
    let output = build(
        &root,
        &context,
        &[
            "-o",
            &format!("type=oci,dest={}", out.join("image.tar").display()),
            "-o",
            &format!("type=docker,dest={}", out.join("docker.tar").display()),
            "-o",
            &format!("type=tar,dest={}", out.join("rootfs.tar").display()),
            "-o",
            &format!("type=local,dest={}", out.join("rootfs").display()),
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("Dockerfile:2"));
    let left: Vec<_> = fs::read_dir(&out).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn local_output_overwrites_files_and_never_follows_a_symlink_out_of_dest() {
    let directory = TempDirectory::new("export-hostile");
    let (context, root) = setup(&directory, DOCKERFILE);
    let victim = directory.join("victim");
    fs::create_dir_all(&victim).unwrap();
    fs::write(victim.join("keep"), "victim").unwrap();
    let dest = directory.join("dest");
    fs::create_dir_all(dest.join("etc")).unwrap();
    fs::write(dest.join("etc/passwd"), "stale").unwrap();
    fs::set_permissions(dest.join("etc/passwd"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(dest.join("mine"), "kept").unwrap();
    // A symlink where the image has a directory, pointing outside dest (absolute) and one
    // where it has a file, pointing at a victim file.
    std::os::unix::fs::symlink(&victim, dest.join("data")).unwrap();
    std::os::unix::fs::symlink(victim.join("keep"), dest.join("app")).unwrap();
    succeeds(build(&root, &context, &["-o", path(&dest)]));
    assert_eq!(fs::read_to_string(victim.join("keep")).unwrap(), "victim");
    assert_eq!(
        fs::read_dir(&victim).unwrap().count(),
        1,
        "nothing written into the victim"
    );
    assert!(fs::symlink_metadata(dest.join("data")).unwrap().is_dir());
    assert_eq!(
        fs::read_to_string(dest.join("data/out")).unwrap(),
        "built\n"
    );
    assert!(fs::symlink_metadata(dest.join("app")).unwrap().is_dir());
    let passwd = fs::read_to_string(dest.join("etc/passwd")).unwrap();
    assert!(passwd.starts_with("root:x:0:0"), "overwritten: {passwd}");
    assert_eq!(
        fs::metadata(dest.join("etc/passwd")).unwrap().mode() & 0o7777,
        0o644
    );
    assert_eq!(
        fs::read_to_string(dest.join("mine")).unwrap(),
        "kept",
        "files the image does not have are left, as BuildKit leaves them"
    );
}
