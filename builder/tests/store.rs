//! End-to-end tests of the store commands, run as root with the real tools CI installs:
//! `rbuild import` of a busybox rootfs, `save` read by skopeo and umoci and run by runc,
//! `load` of what skopeo writes, hostile archives, SIGKILL in the middle of a write, and two
//! processes sharing a root.

mod common;

use common::*;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

#[test]
fn import_then_images_inspect_tag_rmi_prune() {
    let directory = TempDirectory::new("basics");
    let root = directory.join("root");
    let digest = import_busybox(&root, "busybox");
    assert!(digest.starts_with("sha256:"), "{digest}");

    let images = succeeds(rbuild(&root, &["images"]));
    let lines: Vec<&str> = images.lines().collect();
    assert!(lines[0].starts_with("REPOSITORY"), "{images}");
    assert!(
        lines[1].starts_with("busybox ") && lines[1].contains("latest"),
        "{images}"
    );

    let image = inspect(&root, "busybox");
    assert_eq!(image["digest"], digest.as_str());
    assert_eq!(image["name"], "docker.io/library/busybox:latest");
    assert_eq!(image["os"], "linux");
    assert_eq!(image["rootfs"]["diff_ids"].as_array().unwrap().len(), 1);
    assert_eq!(image["history"][0]["created_by"], "rbuild import");
    // The diff id is the sha256 of the tarball as given.
    let tar_sha = tool("sha256sum", &[busybox_tar().to_str().unwrap()]);
    assert_eq!(
        image["rootfs"]["diff_ids"][0],
        format!("sha256:{}", &tar_sha[..64])
    );
    // By id too.
    let id = image["id"].as_str().unwrap()[7..19].to_string();
    assert_eq!(inspect(&root, &id)["digest"], digest.as_str());

    succeeds(rbuild(
        &root,
        &["tag", "busybox", "localhost:5000/tools/bb:v1"],
    ));
    let images = succeeds(rbuild(&root, &["images", "--format", "json"]));
    let images: serde_json::Value = serde_json::from_str(&images).unwrap();
    assert_eq!(images.as_array().unwrap().len(), 2);
    assert_eq!(
        inspect(&root, "localhost:5000/tools/bb:v1")["digest"],
        digest.as_str()
    );

    // An id naming two tags needs --force; a name removes just that name.
    let refused = rbuild(&root, &["rmi", &id]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused.stderr));
    succeeds(rbuild(&root, &["rmi", "busybox"]));
    let missing = rbuild(&root, &["inspect", "busybox"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("no such image: busybox"),
        "{}",
        text(&missing.stderr)
    );

    // Still referenced by the other tag: prune keeps everything.
    let before = succeeds(rbuild(&root, &["du", "--format", "json"]));
    let before: serde_json::Value = serde_json::from_str(&before).unwrap();
    succeeds(rbuild(&root, &["prune"]));
    succeeds(rbuild(&root, &["inspect", "localhost:5000/tools/bb:v1"]));
    succeeds(rbuild(&root, &["rmi", "localhost:5000/tools/bb:v1"]));
    let pruned = succeeds(rbuild(&root, &["prune"]));
    assert!(pruned.contains("Total reclaimed space: 1."), "{pruned}");
    let after = succeeds(rbuild(&root, &["du", "--format", "json"]));
    let after: serde_json::Value = serde_json::from_str(&after).unwrap();
    let blobs = |usage: &serde_json::Value| {
        usage["parts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|part| part["part"] == "blobs")
            .unwrap()["apparent_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(blobs(&before) > 1_000_000, "{before}");
    // Only the two directories of blobs/sha256 are left.
    assert!(blobs(&after) <= 16_384, "{after}");
    assert!(before["total_bytes"].as_u64().unwrap() > after["total_bytes"].as_u64().unwrap());
}

#[test]
fn bad_names_are_usage_errors() {
    let directory = TempDirectory::new("names");
    let root = directory.join("root");
    let output = rbuild(
        &root,
        &["import", busybox_tar().to_str().unwrap(), "Not/Valid"],
    );
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    let output = rbuild(&root, &["import", "/nonexistent.tar", "x"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("/nonexistent.tar"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn save_is_read_by_skopeo_and_umoci_and_runs_in_runc() {
    let directory = TempDirectory::new("save");
    let root = directory.join("root");
    let digest = import_busybox(&root, "busybox:1.0");
    let archive = directory.join("busybox.tar");
    succeeds(rbuild(
        &root,
        &["save", "-o", archive.to_str().unwrap(), "busybox:1.0"],
    ));

    let skopeo = tool(
        "skopeo",
        &["inspect", &format!("oci-archive:{}", archive.display())],
    );
    let skopeo: serde_json::Value = serde_json::from_str(&skopeo).unwrap();
    assert_eq!(skopeo["Digest"], digest.as_str());
    assert_eq!(skopeo["Layers"].as_array().unwrap().len(), 1);
    assert_eq!(skopeo["Os"], "linux");

    // The archive also carries docker-archive's manifest.json.
    let listing = tool("tar", &["-tf", archive.to_str().unwrap()]);
    for name in ["index.json", "manifest.json", "oci-layout"] {
        assert!(
            listing.lines().any(|line| line == name),
            "{name} missing: {listing}"
        );
    }
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
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest[0]["RepoTags"][0], "busybox:1.0");

    let bundle = directory.join("bundle");
    tool(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:1.0", layout.display()),
            bundle.to_str().unwrap(),
        ],
    );
    let config_path = bundle.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&fs::read(&config_path).unwrap()).unwrap();
    config["process"]["args"] = serde_json::json!(["/bin/sh", "-c", "echo ok"]);
    config["process"]["terminal"] = serde_json::json!(false);
    fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    let container = format!("rbuild-test-{}", std::process::id());
    let output = Command::new("runc")
        .args(["run", "--bundle", bundle.to_str().unwrap(), &container])
        .stdin(Stdio::null())
        .output()
        .expect("runc must be installed (CI installs it with apt-get)");
    let _ = Command::new("runc")
        .args(["delete", "--force", &container])
        .output();
    assert_eq!(
        text(&output.stdout),
        "ok\n",
        "runc: {}",
        text(&output.stderr)
    );
    assert!(output.status.success());
}

#[test]
fn load_reads_what_skopeo_writes_and_round_trips_save() {
    let directory = TempDirectory::new("load");
    let root = directory.join("root");
    import_busybox(&root, "busybox");
    let original = inspect(&root, "busybox");
    let saved = directory.join("saved.tar");
    succeeds(rbuild(
        &root,
        &["save", "-o", saved.to_str().unwrap(), "busybox"],
    ));

    // skopeo writes a docker-archive (uncompressed layers, Docker config) from our OCI archive.
    let docker_archive = directory.join("docker.tar");
    tool(
        "skopeo",
        &[
            "copy",
            &format!("oci-archive:{}", saved.display()),
            &format!(
                "docker-archive:{}:example.com/copied/busybox:v2",
                docker_archive.display()
            ),
        ],
    );
    let fresh = directory.join("fresh");
    let loaded = succeeds(rbuild(
        &fresh,
        &["load", "-i", docker_archive.to_str().unwrap()],
    ));
    assert_eq!(loaded.trim(), "Loaded image: example.com/copied/busybox:v2");
    let copied = inspect(&fresh, "example.com/copied/busybox:v2");
    assert_eq!(copied["rootfs"]["diff_ids"], original["rootfs"]["diff_ids"]);
    assert_eq!(copied["history"], original["history"]);
    succeeds(rbuild(&fresh, &["verify"]));

    // Our own OCI archive loads into a fresh root with the same digests.
    let other = directory.join("other");
    let loaded = succeeds(rbuild(&other, &["load", "-i", saved.to_str().unwrap()]));
    assert_eq!(loaded.trim(), "Loaded image: busybox:latest");
    assert_eq!(inspect(&other, "busybox")["digest"], original["digest"]);

    // And an OCI archive written by skopeo (gzip layers, its own manifest) from the docker one.
    let oci_archive = directory.join("oci.tar");
    tool(
        "skopeo",
        &[
            "copy",
            &format!("docker-archive:{}", docker_archive.display()),
            &format!(
                "oci-archive:{}:localhost/oci/busybox:v3",
                oci_archive.display()
            ),
        ],
    );
    let third = directory.join("third");
    let loaded = succeeds(rbuild(
        &third,
        &["load", "-i", oci_archive.to_str().unwrap()],
    ));
    assert_eq!(loaded.trim(), "Loaded image: localhost/oci/busybox:v3");
    assert_eq!(
        inspect(&third, "localhost/oci/busybox:v3")["rootfs"],
        original["rootfs"]
    );
}

/// Writes a tar with the given regular files.
fn write_tar(path: &Path, files: &[(&str, &[u8])]) {
    let mut builder = tar::Builder::new(fs::File::create(path).unwrap());
    for (name, content) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, name, *content).unwrap();
    }
    builder.into_inner().unwrap().flush().unwrap();
}

#[test]
fn load_rejects_an_archive_whose_blob_lies_about_its_digest() {
    let directory = TempDirectory::new("lying");
    let root = directory.join("root");
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = sha256_hex(config);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config_digest}","size":{}}},"layers":[]}}"#,
        config.len()
    );
    let manifest_digest = sha256_hex(manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_digest}","size":{},"annotations":{{"io.containerd.image.name":"docker.io/library/liar:latest"}}}}]}}"#,
        manifest.len()
    );
    let archive = directory.join("lying.tar");
    // The config blob's bytes are not what its name says.
    let forged =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"x":1}"#;
    write_tar(
        &archive,
        &[
            ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
            ("index.json", index.as_bytes()),
            (
                &format!("blobs/sha256/{manifest_digest}"),
                manifest.as_bytes(),
            ),
            (&format!("blobs/sha256/{config_digest}"), forged),
        ],
    );
    let output = rbuild(&root, &["load", "-i", archive.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!("sha256:{config_digest}")) && stderr.contains("does not match"),
        "{stderr}"
    );
    assert_eq!(succeeds(rbuild(&root, &["images", "-q"])), "");
    assert!(!root.join("v1/blobs/sha256").join(&config_digest).exists());
    succeeds(rbuild(&root, &["verify"]));

    // Paths that climb out of the archive are only names: nothing is written outside the root.
    let climbing = directory.join("climbing.tar");
    let mut builder = tar::Builder::new(fs::File::create(&climbing).unwrap());
    let mut header = tar::Header::new_gnu();
    let name = b"../../../../../../tmp/rbuild-escaped";
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_size(4);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    builder.append(&header, &b"evil"[..]).unwrap();
    builder.into_inner().unwrap().flush().unwrap();
    let output = rbuild(&root, &["load", "-i", climbing.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("not an image archive"),
        "{}",
        text(&output.stderr)
    );
    assert!(!Path::new("/tmp/rbuild-escaped").exists());
}

/// A tarball holding one large file of incompressible bytes, so that importing it takes long
/// enough to be killed in the middle.
fn large_tar(path: &Path, megabytes: usize) {
    let mut builder = tar::Builder::new(std::io::BufWriter::new(fs::File::create(path).unwrap()));
    let size = megabytes << 20;
    let mut content = vec![0u8; size];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in content.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    let mut header = tar::Header::new_gnu();
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    builder
        .append_data(&mut header, "big.bin", content.as_slice())
        .unwrap();
    builder.into_inner().unwrap().flush().unwrap();
}

#[test]
fn sigkill_in_the_middle_of_a_large_layer_leaves_the_store_whole() {
    let directory = TempDirectory::new("sigkill");
    let root = directory.join("root");
    import_busybox(&root, "busybox");
    let big = directory.join("big.tar");
    large_tar(&big, 256);

    let mut child = Command::new(env!("CARGO_BIN_EXE_rbuild"))
        .arg("--root")
        .arg(&root)
        .args(["import", big.to_str().unwrap(), "big"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the layer is being written: a temp file in ingest/ with some megabytes in it.
    let ingest = root.join("v1/ingest");
    let mut written = 0;
    while written < (8 << 20) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("import finished ({status}) before it could be killed; make the tarball bigger");
        }
        written = fs::read_dir(&ingest)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|entry| entry.metadata().ok())
                    .map(|m| m.len())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        std::thread::yield_now();
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(
        fs::read_dir(&ingest).unwrap().count() > 0,
        "the killed write left its temp file"
    );

    // The store still verifies, the killed import named nothing, and the next commands work.
    let verified = succeeds(rbuild(&root, &["verify"]));
    assert!(
        verified.contains("0 corrupt, 0 broken images"),
        "{verified}"
    );
    let missing = rbuild(&root, &["inspect", "big"]);
    assert_eq!(missing.status.code(), Some(1));
    succeeds(rbuild(&root, &["inspect", "busybox"]));
    import_busybox(&root, "busybox:again");
    succeeds(rbuild(&root, &["prune"]));
    assert_eq!(
        fs::read_dir(&ingest).unwrap().count(),
        0,
        "prune removes the stale temp file"
    );
    succeeds(rbuild(&root, &["verify"]));
    succeeds(rbuild(&root, &["inspect", "busybox:again"]));
}

#[test]
fn two_processes_share_one_root() {
    let directory = TempDirectory::new("concurrent");
    let root = directory.join("root");
    let tar = busybox_tar().to_str().unwrap().to_string();
    let children: Vec<_> = (0..4)
        .map(|index| {
            Command::new(env!("CARGO_BIN_EXE_rbuild"))
                .arg("--root")
                .arg(&root)
                .args(["import", &tar, &format!("busybox:{index}")])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let digests: Vec<String> = children
        .into_iter()
        .map(|child| {
            succeeds(child.wait_with_output().unwrap())
                .trim()
                .to_string()
        })
        .collect();
    // Same content, same layer; configs differ only if created differs.
    let listing = succeeds(rbuild(&root, &["images", "--format", "json"]));
    let listing: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(listing.as_array().unwrap().len(), 4);
    for (index, digest) in digests.iter().enumerate() {
        assert_eq!(
            inspect(&root, &format!("busybox:{index}"))["digest"],
            digest.as_str()
        );
    }
    succeeds(rbuild(&root, &["verify"]));
}

#[test]
fn import_is_reproducible_with_source_date_epoch() {
    let directory = TempDirectory::new("reproducible");
    let digests: Vec<String> = ["a", "b"]
        .iter()
        .map(|name| {
            let output = Command::new(env!("CARGO_BIN_EXE_rbuild"))
                .arg("--root")
                .arg(directory.join(name))
                .args(["import", busybox_tar().to_str().unwrap(), "busybox"])
                .env("SOURCE_DATE_EPOCH", "1700000000")
                .output()
                .unwrap();
            succeeds(output).trim().to_string()
        })
        .collect();
    assert_eq!(digests[0], digests[1]);
    let image = inspect(&directory.join("a"), "busybox");
    assert_eq!(image["created"], "2023-11-14T22:13:20Z");
}

#[test]
fn prune_waits_for_a_running_import_and_keeps_its_image() {
    let directory = TempDirectory::new("prune-race");
    let root = directory.join("root");
    import_busybox(&root, "busybox");
    let big = directory.join("big.tar");
    large_tar(&big, 64);
    let import = Command::new(env!("CARGO_BIN_EXE_rbuild"))
        .arg("--root")
        .arg(&root)
        .args(["import", big.to_str().unwrap(), "big"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the import is writing its layer, a prune must not delete the unreferenced blob
    // being born: it waits for the import's shared lock to go.
    let ingest = root.join("v1/ingest");
    while fs::read_dir(&ingest)
        .map(|entries| entries.count())
        .unwrap_or(0)
        == 0
    {
        std::thread::yield_now();
    }
    let pruned = rbuild(&root, &["prune"]);
    let imported = import.wait_with_output().unwrap();
    succeeds(imported);
    let pruned_stdout = succeeds(pruned);
    assert!(
        pruned_stdout.contains("Total reclaimed space"),
        "{pruned_stdout}"
    );
    let image = inspect(&root, "big");
    assert_eq!(image["rootfs"]["diff_ids"].as_array().unwrap().len(), 1);
    let verified = succeeds(rbuild(&root, &["verify"]));
    assert!(
        verified.contains("0 corrupt, 0 broken images"),
        "{verified}"
    );
}

#[test]
fn dry_run_finds_base_images_in_the_store_without_creating_one() {
    let directory = TempDirectory::new("dry-run");
    let context = directory.join("context");
    fs::create_dir_all(&context).unwrap();
    fs::write(context.join("Dockerfile"), "FROM busybox\nRUN echo hi\n").unwrap();
    let root = directory.join("root");
    let before = succeeds(rbuild(
        &root,
        &["build", "--dry-run", context.to_str().unwrap()],
    ));
    assert!(
        before.contains("base image busybox: not in the store"),
        "{before}"
    );
    assert!(!root.exists(), "a dry run must not create the store");
    let digest = import_busybox(&root, "busybox");
    let after = succeeds(rbuild(
        &root,
        &["build", "--dry-run", context.to_str().unwrap()],
    ));
    assert!(
        after.contains(&format!("base image busybox: in the store ({digest}")),
        "{after}"
    );
}
