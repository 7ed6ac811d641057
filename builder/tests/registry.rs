//! End-to-end tests of `rbuild pull`, `rbuild push`, FROM pulls and `-o type=image,push=true`
//! against a real `docker-registry` (distribution 2.8) on 127.0.0.1, checked with skopeo.

mod common;

use std::fs;
use std::path::Path;
use std::process::Output;

use common::registry::{Direction, DroppingProxy, Registry};
use common::{TempDirectory, import_busybox, inspect, rbuild, succeeds, text, tool};

/// Runs rbuild and returns (stdout, stderr), asserting success.
#[track_caller]
fn run_ok(root: &Path, arguments: &[&str]) -> (String, String) {
    let output = rbuild(root, arguments);
    let stderr = text(&output.stderr);
    (succeeds(output), stderr)
}

/// Asserts rbuild failed with exit code 1 and returns its stderr.
#[track_caller]
fn fails(output: Output) -> String {
    let stderr = text(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "stdout: {}\nstderr: {stderr}",
        text(&output.stdout)
    );
    stderr
}

fn layer_digests(root: &Path, name: &str) -> Vec<String> {
    inspect(root, name)["manifest"]["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|layer| layer["digest"].as_str().expect("digest").to_string())
        .collect()
}

fn skopeo_inspect(reference: &str) -> serde_json::Value {
    serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{reference}"),
        ],
    ))
    .expect("skopeo prints JSON")
}

fn skopeo_raw(reference: &str) -> serde_json::Value {
    serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{reference}"),
        ],
    ))
    .expect("skopeo prints the manifest")
}

/// Every blob file of a root's content store, by hex name.
fn stored_blobs(root: &Path) -> Vec<String> {
    fs::read_dir(root.join("v1/blobs/sha256"))
        .map(|entries| {
            entries
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn ingest_is_empty(root: &Path) -> bool {
    fs::read_dir(root.join("v1/ingest")).map_or(true, |mut entries| entries.next().is_none())
}

#[test]
fn push_then_pull_on_a_fresh_root_gives_the_same_image_and_it_runs() {
    let directory = TempDirectory::new("registry-roundtrip");
    let registry = Registry::open();
    let first = directory.join("first");
    let name = format!("{}/tools/busybox:v1", registry.address());
    let imported = import_busybox(&first, &name);

    let (pushed, stderr) = run_ok(&first, &["push", &name]);
    assert_eq!(pushed.trim(), imported);
    assert!(stderr.contains("pushing sha256:"), "{stderr}");
    assert!(stderr.contains("pushed manifest"), "{stderr}");

    // A second push finds every blob there and uploads nothing.
    let (again, stderr) = run_ok(&first, &["push", &name]);
    assert_eq!(again.trim(), imported);
    assert!(!stderr.contains("pushing sha256:"), "{stderr}");
    assert_eq!(stderr.matches("exists  sha256:").count(), 2, "{stderr}");

    // The same image under another repository of the registry is mounted, not uploaded.
    let other = format!("{}/other/copy:v2", registry.address());
    succeeds(rbuild(&first, &["tag", &name, &other]));
    let (mounted, stderr) = run_ok(&first, &["push", &other]);
    assert_eq!(mounted.trim(), imported);
    assert_eq!(
        stderr.matches("mounted sha256:").count(),
        2,
        "config and layer are mounted: {stderr}"
    );
    assert!(stderr.contains("from tools/busybox"), "{stderr}");
    assert!(!stderr.contains("pushing sha256:"), "{stderr}");

    // skopeo accepts what rbuild pushed, and copies it to an OCI layout.
    let seen = skopeo_inspect(&name);
    assert_eq!(seen["Digest"], imported.as_str());
    assert_eq!(
        seen["Layers"].as_array().unwrap().len(),
        layer_digests(&first, &name).len()
    );
    let layout = directory.join("layout");
    tool(
        "skopeo",
        &[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{other}"),
            &format!("oci:{}:copy", layout.display()),
        ],
    );
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], imported.as_str());

    // A fresh root pulls the same manifest and config, and runs it.
    let second = directory.join("second");
    let (pulled, stderr) = run_ok(&second, &["pull", &name]);
    assert_eq!(pulled.trim(), imported);
    assert_eq!(stderr.matches("pulling sha256:").count(), 2, "{stderr}");
    let before = inspect(&first, &name);
    let after = inspect(&second, &name);
    assert_eq!(after["digest"], before["digest"]);
    assert_eq!(after["config_digest"], before["config_digest"]);
    let (said, _) = run_ok(
        &second,
        &["run", "--rm", &name, "echo", "hello from the registry"],
    );
    assert_eq!(said.trim(), "hello from the registry");

    // Pulling again skips what the store has; pulling by digest works too.
    let (_, stderr) = run_ok(&second, &["pull", &name]);
    assert!(!stderr.contains("pulling sha256:"), "{stderr}");
    let third = directory.join("third");
    let by_digest = format!("{}/tools/busybox@{imported}", registry.address());
    let (pulled, _) = run_ok(&third, &["pull", &by_digest]);
    assert_eq!(pulled.trim(), imported);
    assert_eq!(inspect(&third, &by_digest)["digest"], imported.as_str());
}

#[test]
fn rbuild_pulls_what_skopeo_pushed_with_docker_and_oci_media_types_and_builds_from_it() {
    let directory = TempDirectory::new("registry-skopeo");
    let registry = Registry::open();
    let source = directory.join("source");
    import_busybox(&source, "busybox:local");
    let archive = directory.join("busybox.tar");
    succeeds(rbuild(
        &source,
        &["save", "-o", archive.to_str().unwrap(), "busybox:local"],
    ));
    for (format, repository, layer_type) in [
        (
            "v2s2",
            "docker-types",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ),
        (
            "oci",
            "oci-types",
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
    ] {
        let name = format!("{}/{repository}:v1", registry.address());
        tool(
            "skopeo",
            &[
                "copy",
                "--dest-tls-verify=false",
                "--format",
                format,
                &format!("oci-archive:{}", archive.display()),
                &format!("docker://{name}"),
            ],
        );
        let manifest = skopeo_raw(&name);
        assert_eq!(manifest["layers"][0]["mediaType"], layer_type, "{manifest}");
        let expected = skopeo_inspect(&name)["Digest"]
            .as_str()
            .unwrap()
            .to_string();

        // A build whose base is only in the registry pulls it (a fresh root each time).
        let root = directory.join(&format!("root-{format}"));
        let context = directory.join(&format!("context-{format}"));
        fs::create_dir_all(&context).unwrap();
        fs::write(
            context.join("Dockerfile"),
            format!("FROM {name}\nRUN echo built on {format} > /made\nCMD [\"cat\", \"/made\"]\n"),
        )
        .unwrap();
        // A dry run fetches nothing.
        let (plan, _) = run_ok(&root, &["build", "--dry-run", context.to_str().unwrap()]);
        assert!(plan.contains("not in the store"), "{plan}");
        assert!(stored_blobs(&root).is_empty());
        let (_, stderr) = run_ok(
            &root,
            &[
                "build",
                "--network",
                "none",
                "--progress",
                "plain",
                "-t",
                "app:v1",
                context.to_str().unwrap(),
            ],
        );
        assert!(stderr.contains("pulling sha256:"), "{stderr}");
        assert_eq!(inspect(&root, &name)["digest"], expected.as_str());
        let (said, _) = run_ok(&root, &["run", "--rm", "app:v1"]);
        assert_eq!(said.trim(), format!("built on {format}"));

        // `rbuild pull` of the same image into another root gives the same digest.
        let pulled_root = directory.join(&format!("pulled-{format}"));
        let (pulled, _) = run_ok(&pulled_root, &["pull", &name]);
        assert_eq!(pulled.trim(), expected);
    }
}

#[test]
fn a_build_pushes_with_output_push_true() {
    let directory = TempDirectory::new("registry-build-push");
    let registry = Registry::open();
    let root = directory.join("root");
    import_busybox(&root, "busybox:local");
    let context = directory.join("context");
    fs::create_dir_all(&context).unwrap();
    fs::write(
        context.join("Dockerfile"),
        "FROM busybox:local\nRUN echo pushed > /marker\n",
    )
    .unwrap();
    let name = format!("{}/built:v1", registry.address());
    let output = format!("type=image,name={name},push=true");
    let metadata = directory.join("metadata.json");
    run_ok(
        &root,
        &[
            "build",
            "--network",
            "none",
            "--metadata-file",
            metadata.to_str().unwrap(),
            "-o",
            &output,
            context.to_str().unwrap(),
        ],
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&fs::read(&metadata).unwrap()).unwrap();
    assert_eq!(skopeo_inspect(&name)["Digest"], metadata["image"]["digest"]);
    let fresh = directory.join("fresh");
    run_ok(&fresh, &["pull", &name]);
    let (said, _) = run_ok(&fresh, &["run", "--rm", &name, "cat", "/marker"]);
    assert_eq!(said.trim(), "pushed");
}

#[test]
fn a_download_cut_in_the_middle_is_resumed() {
    let directory = TempDirectory::new("registry-download-drop");
    let registry = Registry::open();
    let root = directory.join("root");
    let name = format!("{}/busybox:v1", registry.address());
    let imported = import_busybox(&root, &name);
    run_ok(&root, &["push", &name]);

    // The layer is about a megabyte: cut the connection carrying it half-way.
    let proxy = DroppingProxy::start(&registry.address(), Direction::Download, 500_000);
    let fresh = directory.join("fresh");
    let through_proxy = format!("{}/busybox:v1", proxy.address());
    let (pulled, stderr) = run_ok(&fresh, &["pull", &through_proxy]);
    assert_eq!(proxy.drops(), 1, "{stderr}");
    // The download went on from what had arrived, not from the start.
    let resumed_at: u64 = stderr
        .lines()
        .find_map(|line| line.split(" from byte ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no retry line: {stderr}"));
    assert!(resumed_at > 0, "{stderr}");
    assert_eq!(pulled.trim(), imported);
    let (said, _) = run_ok(&fresh, &["run", "--rm", &through_proxy, "echo", "whole"]);
    assert_eq!(said.trim(), "whole");
    assert!(ingest_is_empty(&fresh));
}

/// A plain rootfs tar with one file of `size` pseudo-random (incompressible) bytes.
fn random_rootfs(path: &Path, size: usize) {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut bytes = Vec::with_capacity(size);
    while bytes.len() < size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(size);
    let mut builder = tar::Builder::new(fs::File::create(path).unwrap());
    let mut header = tar::Header::new_gnu();
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    builder
        .append_data(&mut header, "random.bin", bytes.as_slice())
        .unwrap();
    builder.finish().unwrap();
}

#[test]
fn uploads_cut_in_the_middle_are_resumed_both_whole_and_chunked() {
    let directory = TempDirectory::new("registry-upload-drop");
    let registry = Registry::open();
    let root = directory.join("root");

    // A small image goes up in one PUT: cut it after half a megabyte.
    let proxy = DroppingProxy::start(&registry.address(), Direction::Upload, 500_000);
    let small = format!("{}/small:v1", proxy.address());
    let small_digest = import_busybox(&root, &small);
    let (pushed, stderr) = run_ok(&root, &["push", &small]);
    assert_eq!(proxy.drops(), 1, "{stderr}");
    assert!(stderr.contains("retrying sha256:"), "{stderr}");
    assert_eq!(pushed.trim(), small_digest);
    assert_eq!(
        skopeo_inspect(&format!("{}/small:v1", registry.address()))["Digest"],
        small_digest.as_str()
    );

    // A 20 MiB layer goes up in 16 MiB PATCH chunks: cut the second chunk at 18 MiB.
    let tarball = directory.join("random.tar");
    random_rootfs(&tarball, 20 << 20);
    let proxy = DroppingProxy::start(&registry.address(), Direction::Upload, 18 << 20);
    let big = format!("{}/big:v1", proxy.address());
    let big_digest = succeeds(rbuild(&root, &["import", tarball.to_str().unwrap(), &big]))
        .trim()
        .to_string();
    let (pushed, stderr) = run_ok(&root, &["push", &big]);
    assert_eq!(proxy.drops(), 1, "{stderr}");
    assert!(stderr.contains("retrying sha256:"), "{stderr}");
    // Distribution cancels a session whose PATCH broke off after some of its bytes arrived
    // ("upload resumed at wrong offset"), so the upload starts over in a new one.
    assert!(stderr.contains("in a new upload session"), "{stderr}");
    assert_eq!(pushed.trim(), big_digest);

    // What the registry holds is whole: a fresh root pulls it and it verifies.
    let fresh = directory.join("fresh");
    let direct = format!("{}/big:v1", registry.address());
    let (pulled, _) = run_ok(&fresh, &["pull", &direct]);
    assert_eq!(pulled.trim(), big_digest);
    run_ok(&fresh, &["verify"]);
    assert_eq!(
        layer_digests(&fresh, &direct),
        layer_digests(&root, &big),
        "the same layer blob"
    );
}

#[test]
fn a_chunked_upload_whose_connection_dies_before_a_patch_resumes_from_the_session_offset() {
    let directory = TempDirectory::new("registry-upload-resume");
    let registry = Registry::open();
    let root = directory.join("root");

    // About 40 MiB of incompressible bytes: PATCH chunks of 16, 16 and 8 MiB. The connection
    // dies as the second PATCH starts, before any of it reaches the registry, so the session
    // is intact and holds exactly the first chunk.
    let tarball = directory.join("random.tar");
    random_rootfs(&tarball, 40 << 20);
    let proxy = DroppingProxy::cut_before(&registry.address(), b"PATCH ", 2);
    let name = format!("{}/resumed:v1", proxy.address());
    let digest = succeeds(rbuild(&root, &["import", tarball.to_str().unwrap(), &name]))
        .trim()
        .to_string();
    let (pushed, stderr) = run_ok(&root, &["push", &name]);
    assert_eq!(pushed.trim(), digest, "{stderr}");
    assert_eq!(proxy.drops(), 1, "{stderr}");
    assert!(stderr.contains("retrying sha256:"), "{stderr}");
    assert!(stderr.contains(" from byte 16777216 "), "{stderr}");
    assert!(!stderr.contains("in a new upload session"), "{stderr}");

    // The registry holds the same image, whole: skopeo reads it, a fresh root pulls and
    // verifies it.
    let direct = format!("{}/resumed:v1", registry.address());
    let seen = skopeo_inspect(&direct);
    assert_eq!(seen["Digest"], digest.as_str());
    let layers = layer_digests(&root, &name);
    assert_eq!(seen["Layers"], serde_json::json!(layers));
    let fresh = directory.join("fresh");
    let (pulled, _) = run_ok(&fresh, &["pull", &direct]);
    assert_eq!(pulled.trim(), digest);
    run_ok(&fresh, &["verify"]);
    assert_eq!(layer_digests(&fresh, &direct), layers);
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_rejected_and_not_stored() {
    let directory = TempDirectory::new("registry-corrupt");
    let registry = Registry::open();
    let root = directory.join("root");
    let name = format!("{}/busybox:v1", registry.address());
    import_busybox(&root, &name);
    run_ok(&root, &["push", &name]);
    let layer = layer_digests(&root, &name).remove(0);
    let layer_hex = layer.strip_prefix("sha256:").unwrap();
    registry.corrupt_blob(layer_hex);

    let fresh = directory.join("fresh");
    let stderr = fails(rbuild(&fresh, &["pull", &name]));
    assert!(
        stderr.contains(&layer),
        "the error names the blob: {stderr}"
    );
    assert!(stderr.contains("rejected"), "{stderr}");
    assert!(!stored_blobs(&fresh).iter().any(|blob| blob == layer_hex));
    assert!(ingest_is_empty(&fresh));
    let images = succeeds(rbuild(&fresh, &["images", "--quiet"]));
    assert!(images.trim().is_empty(), "no image is recorded: {images}");

    // A build from it fails naming the line that needed the layer (FROM fetches the manifest
    // and config only), and stores nothing of the layer either.
    let context = directory.join("context");
    fs::create_dir_all(&context).unwrap();
    fs::write(
        context.join("Dockerfile"),
        format!("FROM {name}\nRUN true\n"),
    )
    .unwrap();
    let stderr = fails(rbuild(&fresh, &["build", context.to_str().unwrap()]));
    assert!(stderr.contains("Dockerfile:2: RUN true"), "{stderr}");
    assert!(stderr.contains(&layer), "{stderr}");
    assert!(stderr.contains("rejected"), "{stderr}");
    assert!(!stored_blobs(&fresh).iter().any(|blob| blob == layer_hex));
}

#[test]
fn pull_errors_name_the_reference_and_what_the_registry_said() {
    let directory = TempDirectory::new("registry-errors");
    let registry = Registry::open();
    let root = directory.join("root");
    let missing = format!("{}/nothing/here:v9", registry.address());
    let stderr = fails(rbuild(&root, &["pull", &missing]));
    assert!(stderr.contains(&missing), "{stderr}");
    assert!(stderr.contains("MANIFEST_UNKNOWN"), "{stderr}");
}

/// `rbuild --root ROOT ARGUMENTS...` with `DOCKER_CONFIG` set.
fn rbuild_with_config(root: &Path, config: &Path, arguments: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_rbuild"))
        .arg("--root")
        .arg(root)
        .args(arguments)
        .env("DOCKER_CONFIG", config)
        .env_remove("SOURCE_DATE_EPOCH")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("rbuild runs")
}

#[test]
fn push_and_pull_through_token_auth_with_docker_config_credentials() {
    let directory = TempDirectory::new("registry-token");
    let registry = Registry::with_token_auth("builder", "s3cret");
    let root = directory.join("root");
    let name = format!("{}/private/busybox:v1", registry.address());
    let imported = import_busybox(&root, &name);

    // Without credentials the registry refuses, and the error says so.
    let nobody = directory.join("nobody");
    fs::create_dir_all(&nobody).unwrap();
    let stderr = fails(rbuild_with_config(&root, &nobody, &["push", &name]));
    assert!(stderr.contains(&name), "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    assert!(stderr.contains("no credentials for"), "{stderr}");
    let anonymous_tokens = registry.tokens_issued();

    let config = common::registry::docker_config(
        &directory.join("docker"),
        &registry.address(),
        "builder",
        "s3cret",
    );
    let output = rbuild_with_config(&root, &config, &["push", &name]);
    let stderr = text(&output.stderr);
    assert_eq!(succeeds(output).trim(), imported, "{stderr}");
    assert!(registry.tokens_issued() > anonymous_tokens);
    assert_eq!(
        skopeo_raw_with_credentials(&name)["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );

    let fresh = directory.join("fresh");
    let output = rbuild_with_config(&fresh, &config, &["pull", &name]);
    assert_eq!(succeeds(output).trim(), imported);
    let (said, _) = run_ok(&fresh, &["run", "--rm", &name, "echo", "authorized"]);
    assert_eq!(said.trim(), "authorized");

    // A wrong password is refused by the token server.
    let wrong = common::registry::docker_config(
        &directory.join("wrong"),
        &registry.address(),
        "builder",
        "guess",
    );
    let other = directory.join("other");
    let stderr = fails(rbuild_with_config(&other, &wrong, &["pull", &name]));
    assert!(stderr.contains(&name), "{stderr}");
    assert!(registry.tokens_refused() >= 1);
    assert!(stored_blobs(&other).is_empty());
}

fn skopeo_raw_with_credentials(reference: &str) -> serde_json::Value {
    serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            "builder:s3cret",
            &format!("docker://{reference}"),
        ],
    ))
    .expect("skopeo prints the manifest")
}

fn write_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let hex = common::sha256_hex(bytes);
    fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len())
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

#[test]
fn pull_picks_the_platform_from_an_index() {
    let directory = TempDirectory::new("registry-index");
    let registry = Registry::open();
    let source = directory.join("source");
    import_busybox(&source, "busybox:local");
    let archive = directory.join("busybox.tar");
    succeeds(rbuild(
        &source,
        &["save", "-o", archive.to_str().unwrap(), "busybox:local"],
    ));
    // An OCI layout whose one entry is an index of an amd64 and an arm64 image (the arm64
    // one differs only in its config's architecture).
    let layout = directory.join("layout");
    fs::create_dir_all(&layout).unwrap();
    tool(
        "tar",
        &[
            "-xf",
            archive.to_str().unwrap(),
            "-C",
            layout.to_str().unwrap(),
        ],
    );
    let amd64 = read_json(&layout.join("index.json"))["manifests"][0].clone();
    let amd64_digest = amd64["digest"].as_str().unwrap().to_string();
    let blob = |digest: &str| layout.join("blobs/sha256").join(&digest[7..]);
    let mut manifest = read_json(&blob(&amd64_digest));
    let mut config = read_json(&blob(manifest["config"]["digest"].as_str().unwrap()));
    config["architecture"] = "arm64".into();
    let (config_digest, config_size) = write_blob(&layout, &serde_json::to_vec(&config).unwrap());
    manifest["config"]["digest"] = config_digest.into();
    manifest["config"]["size"] = config_size.into();
    let (arm64_digest, arm64_size) = write_blob(&layout, &serde_json::to_vec(&manifest).unwrap());
    let manifest_type = "application/vnd.oci.image.manifest.v1+json";
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": manifest_type, "digest": amd64_digest, "size": amd64["size"],
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": manifest_type, "digest": arm64_digest, "size": arm64_size,
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        ],
    });
    let (index_digest, index_size) = write_blob(&layout, &serde_json::to_vec(&index).unwrap());
    let top = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
                        "digest": index_digest, "size": index_size}],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    let name = format!("{}/multi:v1", registry.address());
    tool(
        "skopeo",
        &[
            "copy",
            "--all",
            "--dest-tls-verify=false",
            &format!("oci:{}", layout.display()),
            &format!("docker://{name}"),
        ],
    );

    let host = directory.join("host");
    let (pulled, _) = run_ok(&host, &["pull", "--platform", "linux/amd64", &name]);
    assert_eq!(pulled.trim(), amd64_digest);
    let arm = directory.join("arm");
    let (pulled, _) = run_ok(&arm, &["pull", "--platform", "linux/arm64", &name]);
    assert_eq!(pulled.trim(), arm64_digest);
    assert_eq!(inspect(&arm, &name)["architecture"], "arm64");
    // By the index's digest, the platform's manifest is what gets stored.
    let by_digest = format!("{}/multi@{index_digest}", registry.address());
    let (pulled, _) = run_ok(&directory.join("by-digest"), &["pull", &by_digest]);
    assert_eq!(pulled.trim(), amd64_digest);

    let stderr = fails(rbuild(
        &directory.join("none"),
        &["pull", "--platform", "linux/s390x", &name],
    ));
    assert!(stderr.contains("linux/s390x"), "{stderr}");
    assert!(stderr.contains("linux/amd64, linux/arm64/v8"), "{stderr}");
}
