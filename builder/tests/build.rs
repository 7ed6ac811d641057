//! End-to-end tests of `rbuild build`: real builds in real sandboxes, as root, on contexts
//! copied from `testdata/`, checked with `rbuild run`, `rbuild inspect` and the metadata file.

mod common;

use common::*;

use std::fs;
use std::path::Path;
use std::process::Command;

fn build(root: &Path, context: &Path, metadata: &Path, extra: &[&str]) -> serde_json::Value {
    let mut arguments = vec![
        "build",
        "-t",
        "demo:v1",
        "--progress",
        "plain",
        "--metadata-file",
        metadata.to_str().unwrap(),
    ];
    arguments.extend_from_slice(extra);
    arguments.push(context.to_str().unwrap());
    succeeds(rbuild(root, &arguments));
    serde_json::from_slice(&fs::read(metadata).unwrap()).unwrap()
}

/// (instruction's first line, cached) of every step that changes the filesystem.
fn filesystem_steps(metadata: &serde_json::Value) -> Vec<(String, bool)> {
    metadata["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|step| {
            let instruction = step["instruction"].as_str().unwrap();
            ["RUN", "COPY", "ADD", "WORKDIR"]
                .iter()
                .any(|kind| instruction.starts_with(kind))
        })
        .map(|step| {
            let first = step["instruction"]
                .as_str()
                .unwrap()
                .lines()
                .next()
                .unwrap()
                .to_string();
            (first, step["cached"].as_bool().unwrap())
        })
        .collect()
}

#[test]
fn the_demo_builds_runs_and_rebuilds_from_the_cache() {
    let directory = TempDirectory::new("demo");
    let (context, root) = demo_context(&directory);
    let metadata_path = directory.join("metadata.json");
    let first = build(&root, &context, &metadata_path, &[]);
    assert!(
        filesystem_steps(&first).iter().all(|(_, cached)| !cached),
        "{first:#}"
    );
    assert_eq!(first["image"]["digest"].as_str().unwrap().len(), 71);

    let output = succeeds(rbuild(&root, &["run", "--rm", "demo:v1"]));
    assert_eq!(output, "HELLO FROM THE RBUILD DEMO\nbuilt by rbuild\n");
    let image: serde_json::Value =
        serde_json::from_str(&succeeds(rbuild(&root, &["inspect", "demo:v1"]))).unwrap();
    assert_eq!(
        image["config"]["Cmd"],
        serde_json::json!(["/usr/local/bin/hello"])
    );
    assert!(
        image["config"]["Env"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("GREETING_FILE=/usr/share/demo/GREETING"))
    );
    assert_eq!(
        image["config"]["Labels"]["org.opencontainers.image.title"],
        "rbuild demo"
    );
    let history = image["history"].as_array().unwrap();
    assert!(
        history
            .iter()
            .any(|entry| entry["created_by"] == "COPY hello.sh /usr/local/bin/hello # buildkit")
    );
    let mode = succeeds(rbuild(
        &root,
        &[
            "run",
            "--rm",
            "demo:v1",
            "stat",
            "-c",
            "%a %u",
            "/usr/local/bin/hello",
        ],
    ));
    assert_eq!(mode, "755 0\n");

    // Unchanged: every step is cached, and the image is the same.
    let second = build(&root, &context, &metadata_path, &[]);
    assert!(
        filesystem_steps(&second).iter().all(|(_, cached)| *cached),
        "{second:#}"
    );
    // Touched (mtime only): still every step cached.
    let status = Command::new("touch")
        .arg(context.join("greeting.txt"))
        .arg(context.join("hello.sh"))
        .status()
        .unwrap();
    assert!(status.success());
    let third = build(&root, &context, &metadata_path, &[]);
    assert!(
        filesystem_steps(&third).iter().all(|(_, cached)| *cached),
        "{third:#}"
    );

    // One file edited: exactly the steps that read it and what builds on them re-run.
    fs::write(context.join("greeting.txt"), "hello again\n").unwrap();
    let fourth = build(&root, &context, &metadata_path, &[]);
    let steps = filesystem_steps(&fourth);
    let expected = [
        ("WORKDIR /src", true),
        ("COPY greeting.txt ./", false),
        ("RUN <<EOF", false),
        ("RUN echo \"built by rbuild\" > /credits", true),
        ("COPY --from=build /out/GREETING /usr/share/demo/", false),
        (
            "COPY --from=credits /credits /usr/share/demo/credits",
            false,
        ),
        ("COPY --chmod=0755 hello.sh /usr/local/bin/hello", false),
    ];
    let expected: Vec<(String, bool)> = expected
        .iter()
        .map(|(text, cached)| (text.to_string(), *cached))
        .collect();
    assert_eq!(steps, expected);
    let reason = |instruction: &str| {
        fourth["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|step| {
                step["instruction"]
                    .as_str()
                    .unwrap()
                    .starts_with(instruction)
            })
            .unwrap()["miss_reason"]
            .clone()
    };
    assert_eq!(reason("COPY greeting.txt"), "file changed: greeting.txt");
    assert_eq!(reason("RUN <<EOF"), "the step it builds on changed");
    assert_eq!(
        reason("COPY --from=build"),
        "what it copies from changed: build"
    );
    assert_eq!(reason("COPY --chmod"), "the step it builds on changed");
    assert_eq!(reason("WORKDIR"), serde_json::Value::Null);
    let output = succeeds(rbuild(&root, &["run", "--rm", "demo:v1"]));
    assert_eq!(output, "HELLO AGAIN\nbuilt by rbuild\n");

    // A build argument that a RUN sees: its miss names the argument.
    fs::write(
        context.join("Dockerfile"),
        "FROM busybox\nARG FLAVOUR=plain\nRUN echo $FLAVOUR > /flavour\n",
    )
    .unwrap();
    build(&root, &context, &metadata_path, &[]);
    let changed = build(
        &root,
        &context,
        &metadata_path,
        &["--build-arg", "FLAVOUR=spicy"],
    );
    let run = changed["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|step| step["instruction"].as_str().unwrap().starts_with("RUN"))
        .unwrap();
    assert_eq!(run["cached"], false);
    assert_eq!(
        run["miss_reason"],
        "build argument or environment changed: FLAVOUR"
    );
}

#[test]
fn a_failing_step_names_its_line_and_stops_the_build() {
    let directory = TempDirectory::new("failing");
    let (context, root) = demo_context(&directory);
    fs::write(
        context.join("Dockerfile"),
        "FROM busybox\nRUN echo before\nRUN echo oops >&2; exit 3\nRUN echo never\n",
    )
    .unwrap();
    let output = rbuild(
        &root,
        &[
            "build",
            "-t",
            "broken",
            "--progress",
            "plain",
            context.to_str().unwrap(),
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("Dockerfile:3: RUN echo oops >&2; exit 3: process"),
        "{stderr}"
    );
    assert!(stderr.contains("exit code: 3"), "{stderr}");
    assert!(stderr.contains("oops"), "{stderr}");
    assert!(!stderr.contains("never\n"), "{stderr}");
    let missing = rbuild(&root, &["inspect", "broken"]);
    assert_eq!(missing.status.code(), Some(1));
}

#[test]
fn copy_semantics_and_config_instructions() {
    let directory = TempDirectory::new("copy");
    let (context, root) = demo_context(&directory);
    fs::create_dir_all(context.join("tree/sub")).unwrap();
    fs::write(context.join("tree/a.txt"), "a\n").unwrap();
    fs::write(context.join("tree/sub/b.txt"), "b\n").unwrap();
    fs::write(context.join("one.log"), "ignored\n").unwrap();
    fs::write(context.join(".dockerignore"), "*.log\n").unwrap();
    fs::write(
        context.join("Dockerfile"),
        r#"FROM busybox AS base
ENV APP=/app
WORKDIR $APP
COPY tree/ ./tree-contents/
COPY tree /copied-dir
COPY *.txt /texts/
COPY --chown=daemon:daemon greeting.txt owned.txt
USER nobody
EXPOSE 8080 53/udp
VOLUME /data
STOPSIGNAL SIGINT
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["ls"]
"#,
    )
    .unwrap();
    succeeds(rbuild(
        &root,
        &[
            "build",
            "-t",
            "copies",
            "--progress",
            "quiet",
            context.to_str().unwrap(),
        ],
    ));
    let listing = succeeds(rbuild(
        &root,
        &[
            "run",
            "--rm",
            "copies",
            "ls /app/tree-contents /app/tree-contents/sub /copied-dir /texts; stat -c '%U %G' /app/owned.txt; pwd; id -un",
        ],
    ));
    assert_eq!(
        listing,
        "/app/tree-contents:\na.txt\nsub\n\n/app/tree-contents/sub:\nb.txt\n\n/copied-dir:\na.txt\nsub\n\n/texts:\ngreeting.txt\ndaemon daemon\n/app\nnobody\n"
    );
    let image: serde_json::Value =
        serde_json::from_str(&succeeds(rbuild(&root, &["inspect", "copies"]))).unwrap();
    let config = &image["config"];
    assert_eq!(config["User"], "nobody");
    assert_eq!(config["WorkingDir"], "/app");
    assert_eq!(
        config["ExposedPorts"],
        serde_json::json!({"8080/tcp": {}, "53/udp": {}})
    );
    assert_eq!(config["Volumes"], serde_json::json!({"/data": {}}));
    assert_eq!(config["StopSignal"], "SIGINT");
    assert_eq!(config["Entrypoint"], serde_json::json!(["/bin/sh", "-c"]));
    assert_eq!(config["Cmd"], serde_json::json!(["ls"]));
    // The ignored file is not in the context.
    fs::write(context.join("Dockerfile"), "FROM busybox\nCOPY one.log /\n").unwrap();
    let output = rbuild(
        &root,
        &["build", "--progress", "quiet", context.to_str().unwrap()],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("Dockerfile:2: COPY one.log /"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn source_date_epoch_makes_builds_reproducible_across_roots() {
    let directory = TempDirectory::new("reproducible");
    let (context, root) = demo_context(&directory);
    let other_root = directory.join("other");
    succeeds(rbuild(
        &other_root,
        &["import", busybox_tar().to_str().unwrap(), "busybox:latest"],
    ));
    // The imports differ in their created time: make the base identical with the same epoch.
    let digests: Vec<String> = [&root, &other_root]
        .iter()
        .map(|root| {
            let output = Command::new(env!("CARGO_BIN_EXE_rbuild"))
                .arg("--root")
                .arg(root)
                .args(["import", busybox_tar().to_str().unwrap(), "busybox:latest"])
                .env("SOURCE_DATE_EPOCH", "1700000000")
                .output()
                .unwrap();
            succeeds(output);
            let output = Command::new(env!("CARGO_BIN_EXE_rbuild"))
                .arg("--root")
                .arg(root)
                .args([
                    "build",
                    "--progress",
                    "quiet",
                    "--build-arg",
                    "SOURCE_DATE_EPOCH=1700000000",
                    context.to_str().unwrap(),
                ])
                .output()
                .unwrap();
            succeeds(output).trim().to_string()
        })
        .collect();
    assert_eq!(digests[0], digests[1]);
}

#[test]
fn independent_stages_build_at_the_same_time() {
    let directory = TempDirectory::new("parallel");
    let (context, root) = demo_context(&directory);
    // The two stages can only both finish if they run at once: one listens on a loopback port
    // (for at most 60 s) and stores what it receives, the other connects to it until it
    // answers.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM busybox AS listener\n\
             RUN --network=host timeout 60 nc -l -p {port} -e sh -c 'cat > /received'\n\
             FROM busybox AS talker\n\
             RUN --network=host sh -c 'until echo hello | nc 127.0.0.1 {port}; do sleep 0.1; done'\n\
             FROM busybox\n\
             COPY --from=listener /received /received\n\
             COPY --from=talker /etc/hostname /talker-ran\n"
        ),
    )
    .unwrap();
    succeeds(rbuild(
        &root,
        &[
            "build",
            "-t",
            "parallel",
            "--progress",
            "plain",
            context.to_str().unwrap(),
        ],
    ));
    let output = succeeds(rbuild(
        &root,
        &["run", "--rm", "parallel", "cat", "/received"],
    ));
    assert_eq!(output, "hello\n");
}

#[test]
fn the_first_failure_stops_the_other_stages() {
    let directory = TempDirectory::new("cancel");
    let (context, root) = demo_context(&directory);
    // The slow stage would run for 10 minutes; the failing one ends the build long before.
    fs::write(
        context.join("Dockerfile"),
        "FROM busybox AS slow\nRUN sleep 600\nFROM busybox AS failing\nRUN exit 7\nFROM busybox\nCOPY --from=slow / /slow\nCOPY --from=failing / /failing\n",
    )
    .unwrap();
    let output = rbuild(
        &root,
        &["build", "--progress", "plain", context.to_str().unwrap()],
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("Dockerfile:4: RUN exit 7"), "{stderr}");
    assert!(
        !stderr.contains("cancelled because another step failed"),
        "the first failure is reported: {stderr}"
    );
    // Nothing of the killed step is left behind.
    let leftovers: Vec<_> = fs::read_dir(root.join("v1/containers")).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn history_and_config_match_what_buildkit_writes() {
    let directory = TempDirectory::new("history");
    let root = directory.join("root");
    succeeds(rbuild(
        &root,
        &["import", busybox_tar().to_str().unwrap(), "busybox:latest"],
    ));
    let context = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/history");
    succeeds(rbuild(
        &root,
        &[
            "build",
            "-t",
            "history",
            "--progress",
            "quiet",
            context.to_str().unwrap(),
        ],
    ));
    let image = inspect(&root, "history");
    let history: Vec<&str> = image["history"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1) // the base image's own entry
        .map(|entry| entry["created_by"].as_str().unwrap())
        .collect();
    let expected = fs::read_to_string(context.join("buildkit-history.txt")).unwrap();
    let expected: Vec<&str> = expected
        .lines()
        .filter(|line| !line.starts_with('#'))
        .collect();
    assert_eq!(history, expected);
    // Only the steps that change the filesystem have a layer: WORKDIR (it made /src) and COPY;
    // the RUN only prints, and an empty diff is no layer (BuildKit drops empty layers too).
    let empty: Vec<bool> = image["history"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|entry| entry["empty_layer"].as_bool().unwrap_or(false))
        .collect();
    assert_eq!(
        empty,
        [
            true, true, false, false, true, true, true, true, true, true, true
        ]
    );
    // The config BuildKit wrote for it (docker inspect), field by field.
    let config = &image["config"];
    assert_eq!(config["User"], "1000");
    assert_eq!(config["WorkingDir"], "/src");
    assert_eq!(
        config["Env"],
        serde_json::json!([
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "A=b",
            "C=d"
        ])
    );
    assert_eq!(config["Cmd"], serde_json::json!(["sh", "-c", "echo hi"]));
    assert_eq!(config["Entrypoint"], serde_json::json!(["/bin/sh"]));
    assert_eq!(
        config["ExposedPorts"],
        serde_json::json!({"443/udp": {}, "80/tcp": {}})
    );
    assert_eq!(config["Volumes"], serde_json::json!({"/data": {}}));
    assert_eq!(config["Labels"], serde_json::json!({"x": "y"}));
}
