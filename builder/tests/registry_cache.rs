//! End-to-end tests of the shared build cache: `--cache-to` / `--cache-from` through a real
//! `docker-registry` on 127.0.0.1 and through a local directory, each time into a brand-new
//! `--root` that has never built anything.

mod common;

use std::fs;
use std::path::Path;

use common::registry::Registry;
use common::{TempDirectory, diff_ids, import_busybox, rbuild, succeeds, text};

/// A two-stage build: the builder stage makes a 3 MB random file and a random stamp, the
/// result copies only the stamp. Random content means a step that ran again would make
/// another layer.
fn write_context(context: &Path, base: &str) {
    fs::create_dir_all(context).unwrap();
    fs::write(context.join("app.txt"), "application\n").unwrap();
    fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {base} AS builder\n\
             RUN head -c 3000000 /dev/urandom > /big && head -c 12 /dev/urandom | od -An -tx1 > /stamp\n\
             FROM {base}\n\
             COPY app.txt /app.txt\n\
             COPY --from=builder /stamp /stamp\n\
             RUN cat /stamp /app.txt > /combined\n"
        ),
    )
    .unwrap();
}

fn build(root: &Path, context: &Path, tag: &str, extra: &[&str]) -> serde_json::Value {
    let metadata = context
        .parent()
        .unwrap()
        .join(format!("{}.json", tag.replace(':', "-")));
    let mut arguments = vec![
        "build",
        "-t",
        tag,
        "--progress",
        "plain",
        "--network",
        "none",
        "--metadata-file",
        metadata.to_str().unwrap(),
    ];
    arguments.extend_from_slice(extra);
    arguments.push(context.to_str().unwrap());
    succeeds(rbuild(root, &arguments));
    serde_json::from_slice(&fs::read(&metadata).unwrap()).unwrap()
}

fn cached(metadata: &serde_json::Value) -> Vec<(String, bool)> {
    metadata["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|step| {
            (
                step["instruction"].as_str().unwrap().to_string(),
                step["cached"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn has_blob(root: &Path, digest: &str) -> bool {
    root.join("v1/blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
        .exists()
}

#[track_caller]
fn run(root: &Path, image: &str, command: &str) -> String {
    succeeds(rbuild(root, &["run", "--rm", image, "sh", "-c", command]))
}

/// The scenario: one machine builds and exports with `mode=max`; a fresh root with
/// `--cache-from` gets every step cached without running a RUN, and downloads the layers of
/// the result only, never the builder stage's.
#[test]
fn a_fresh_root_with_cache_from_a_registry_runs_nothing_and_downloads_only_the_result() {
    let directory = TempDirectory::new("cache-registry");
    let registry = Registry::open();
    let base = format!("{}/base/busybox:1", registry.address());
    let cache = format!("{}/cache/app:main", registry.address());
    let first = directory.join("first");
    import_busybox(&first, &base);
    succeeds(rbuild(&first, &["push", &base]));
    let context = directory.join("context");
    write_context(&context, &base);

    let cache_to = format!("type=registry,ref={cache},mode=max");
    build(&first, &context, "app:first", &["--cache-to", &cache_to]);
    // The builder stage alone, to learn its RUN layer.
    build(&first, &context, "builder:first", &["--target", "builder"]);
    let builder_layer = diff_ids(&first, "builder:first").pop().unwrap();

    let second = directory.join("second");
    let cache_from = format!("type=registry,ref={cache}");
    let metadata = build(
        &second,
        &context,
        "app:second",
        &["--cache-from", &cache_from],
    );
    let steps = cached(&metadata);
    assert!(
        steps.iter().all(|(_, cached)| *cached),
        "every step cached on the fresh root: {steps:?}"
    );
    assert_eq!(
        diff_ids(&second, "app:second"),
        diff_ids(&first, "app:first")
    );
    assert_eq!(
        run(&second, "app:second", "cat /combined"),
        run(&first, "app:first", "cat /combined")
    );
    // The builder's 3 MB layer was never needed, so never downloaded (blobs of built layers
    // are plain tars: the digest is the diff id).
    assert!(has_blob(&first, &builder_layer));
    assert!(!has_blob(&second, &builder_layer));

    // With mode=min (the default) only the result's stages are exported: a fresh root
    // re-runs the builder stage, and still hits the result's steps.
    let min_cache = format!("{}/cache/app:min", registry.address());
    build(
        &first,
        &context,
        "app:first",
        &["--cache-to", &format!("type=registry,ref={min_cache}")],
    );
    let third = directory.join("third");
    let metadata = build(
        &third,
        &context,
        "app:third",
        &["--cache-from", &format!("type=registry,ref={min_cache}")],
    );
    let steps = cached(&metadata);
    let builder_run = steps
        .iter()
        .find(|(instruction, _)| instruction.starts_with("RUN head"))
        .unwrap();
    assert!(
        !builder_run.1,
        "mode=min exports no builder step: {steps:?}"
    );
    let result_run = steps
        .iter()
        .find(|(instruction, _)| instruction.starts_with("RUN cat"))
        .unwrap();
    assert!(result_run.1, "{steps:?}");
    assert_eq!(diff_ids(&third, "app:third"), diff_ids(&first, "app:first"));
}

/// `type=local`: the cache as an OCI layout directory; a cache that is not there is a
/// warning and the build goes on; a blob of the directory that lies is refused.
#[test]
fn a_local_cache_directory_carries_the_cache_and_lies_are_refused() {
    let directory = TempDirectory::new("cache-local");
    let first = directory.join("first");
    import_busybox(&first, "busybox:latest");
    // The same base image on both roots, as a registry would give it.
    let saved = directory.join("busybox.tar");
    succeeds(rbuild(
        &first,
        &["save", "-o", saved.to_str().unwrap(), "busybox:latest"],
    ));
    let second = directory.join("second");
    succeeds(rbuild(&second, &["load", "-i", saved.to_str().unwrap()]));
    let context = directory.join("context");
    write_context(&context, "busybox:latest");
    let cache = directory.join("cache");

    // No cache there yet: a warning, and a normal build.
    let missing = format!("type=local,src={}", cache.display());
    let output = rbuild(
        &first,
        &[
            "build",
            "-t",
            "app:first",
            "--network",
            "none",
            "--cache-from",
            &missing,
            "--cache-to",
            &format!("type=local,dest={},mode=max", cache.display()),
            context.to_str().unwrap(),
        ],
    );
    let stderr = text(&output.stderr);
    succeeds(output);
    assert!(stderr.contains("warning: --cache-from"), "{stderr}");
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(cache.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert!(cache.join("oci-layout").is_file());

    let metadata = build(&second, &context, "app:second", &["--cache-from", &missing]);
    let steps = cached(&metadata);
    assert!(steps.iter().all(|(_, cached)| *cached), "{steps:?}");
    assert_eq!(
        diff_ids(&second, "app:second"),
        diff_ids(&first, "app:first")
    );
    assert_eq!(
        run(&second, "app:second", "cat /combined"),
        run(&first, "app:first", "cat /combined")
    );

    // A layer blob of the cache whose bytes lie: the fresh root refuses it and stores nothing.
    let result_layer = diff_ids(&first, "app:first").pop().unwrap();
    let path = cache
        .join("blobs/sha256")
        .join(result_layer.trim_start_matches("sha256:"));
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 600;
    bytes[last] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    let third = directory.join("third");
    succeeds(rbuild(&third, &["load", "-i", saved.to_str().unwrap()]));
    let output = rbuild(
        &third,
        &[
            "build",
            "-t",
            "app:third",
            "--network",
            "none",
            "--cache-from",
            &missing,
            context.to_str().unwrap(),
        ],
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&result_layer), "{stderr}");
    assert!(!has_blob(&third, &result_layer));
}

/// The layer digests of a manifest in the registry, as skopeo reads it.
fn registry_layers(reference: &str) -> Vec<String> {
    let manifest: serde_json::Value = serde_json::from_str(&common::tool(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{reference}"),
        ],
    ))
    .expect("skopeo prints the manifest");
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|layer| layer["digest"].as_str().unwrap().to_string())
        .collect()
}

/// The CI promise of the issue: a fresh root whose base image and cached steps are all in the
/// registry builds and pushes the result without downloading one layer. FROM resolves the
/// base by its manifest and config; the cached layers stay in the cache repository and the
/// push mounts them from there. The image still runs on that root: `rbuild run` fetches its
/// layers then. And `rbuild run` of an image no root has pulls it, as `docker run` does.
#[test]
fn a_cached_build_pushed_to_the_registry_downloads_no_layer() {
    let directory = TempDirectory::new("cache-lazy");
    let registry = Registry::open();
    let base = format!("{}/base/busybox:1", registry.address());
    let cache = format!("{}/cache/app:main", registry.address());
    let first_image = format!("{}/app/one:1", registry.address());
    let second_image = format!("{}/app/two:1", registry.address());
    let first = directory.join("first");
    import_busybox(&first, &base);
    succeeds(rbuild(&first, &["push", &base]));
    let context = directory.join("context");
    write_context(&context, &base);
    build(
        &first,
        &context,
        "app:first",
        &[
            "--cache-to",
            &format!("type=registry,ref={cache},mode=max"),
            "--output",
            &format!("type=image,name={first_image},push=true"),
        ],
    );
    let layers = registry_layers(&first_image);
    assert_eq!(
        layers.len(),
        4,
        "busybox, COPY, COPY --from, RUN: {layers:?}"
    );

    let second = directory.join("second");
    let metadata = directory.join("second.json");
    let output = rbuild(
        &second,
        &[
            "build",
            "--progress",
            "plain",
            "--network",
            "none",
            "--metadata-file",
            metadata.to_str().unwrap(),
            "--cache-from",
            &format!("type=registry,ref={cache}"),
            "--output",
            &format!("type=image,name={second_image},push=true"),
            context.to_str().unwrap(),
        ],
    );
    let stderr = text(&output.stderr);
    succeeds(output);
    let metadata: serde_json::Value =
        serde_json::from_slice(&fs::read(&metadata).unwrap()).unwrap();
    let steps = cached(&metadata);
    assert!(
        steps.iter().all(|(_, cached)| *cached),
        "every step cached on the fresh root: {steps:?}"
    );
    assert_eq!(registry_layers(&second_image), layers);
    for layer in &layers {
        assert!(
            !has_blob(&second, layer),
            "layer {layer} was downloaded:\n{stderr}"
        );
        assert!(
            !stderr.contains(&format!("pulling {layer}")),
            "layer {layer} was downloaded:\n{stderr}"
        );
        assert!(
            stderr.contains(&format!("mounted {layer}")),
            "layer {layer} was mounted, not uploaded:\n{stderr}"
        );
    }
    // The store only names those layers, and knows where they are.
    succeeds(rbuild(&second, &["verify"]));

    let expected = run(&first, "app:first", "cat /combined");
    assert_eq!(run(&second, &second_image, "cat /combined"), expected);
    for layer in &layers {
        assert!(has_blob(&second, layer), "`run` fetched layer {layer}");
    }

    // A root that has never seen the image pulls it to run it.
    let third = directory.join("third");
    let output = rbuild(&third, &["run", "--rm", &second_image, "cat", "/combined"]);
    let stderr = text(&output.stderr);
    assert_eq!(succeeds(output), expected);
    assert!(stderr.contains("pulling it"), "{stderr}");
}

/// `COPY --from=` an image the root lacks pulls it (its manifest and config, then the layers
/// the copy reads), as BuildKit does; only FROM used to.
#[test]
fn copy_from_an_image_the_root_lacks_pulls_it() {
    let directory = TempDirectory::new("cache-copy-from");
    let registry = Registry::open();
    let tools = format!("{}/tools/busybox:1", registry.address());
    let first = directory.join("first");
    import_busybox(&first, &tools);
    succeeds(rbuild(&first, &["push", &tools]));
    let context = directory.join("context");
    fs::create_dir_all(&context).unwrap();
    fs::write(
        context.join("Dockerfile"),
        format!("FROM scratch\nCOPY --from={tools} /bin/busybox /busybox\n"),
    )
    .unwrap();
    let second = directory.join("second");
    let metadata = build(&second, &context, "copied:1", &[]);
    let steps = cached(&metadata);
    assert!(
        steps
            .iter()
            .any(|(instruction, cached)| instruction.starts_with("COPY --from") && !cached),
        "{steps:?}"
    );
    let exported = directory.join("exported");
    succeeds(rbuild(
        &second,
        &[
            "build",
            "--output",
            &format!("type=local,dest={}", exported.display()),
            context.to_str().unwrap(),
        ],
    ));
    let copied = fs::read(exported.join("busybox")).unwrap();
    let original = fs::read("/bin/busybox").unwrap();
    assert_eq!(copied, original);
}
