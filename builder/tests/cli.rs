//! End-to-end tests of the `rbuild` binary: they run the real command on contexts in
//! `testdata/` and check its output and exit status.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn testdata(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata")
        .join(path)
}

fn rbuild(arguments: &[&str]) -> Output {
    rbuild_with_input(arguments, None)
}

fn rbuild_with_input(arguments: &[&str], input: Option<&str>) -> Output {
    let root = std::env::temp_dir().join(format!("rbuild-cli-test-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_rbuild"))
        .args(arguments)
        .env("RBUILD_ROOT", &root)
        .env_remove("RBUILD_TEST_ARG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rbuild starts");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        if let Some(input) = input {
            stdin.write_all(input.as_bytes()).expect("write stdin");
        }
    }
    child.wait_with_output().expect("rbuild finishes")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A context directory with one Dockerfile, removed when dropped.
struct Context(PathBuf);

impl Context {
    fn new(name: &str, dockerfile: &str) -> Self {
        let directory =
            std::env::temp_dir().join(format!("rbuild-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).expect("context directory");
        std::fs::write(directory.join("Dockerfile"), dockerfile).expect("Dockerfile");
        Self(directory)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn dry_run_of_the_demo_prints_stages_and_steps_in_dependency_order() {
    let demo = testdata("demo");
    let output = rbuild(&["build", "--dry-run", demo.to_str().unwrap()]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.contains("stage 0 build: from image busybox:latest"),
        "{text}"
    );
    assert!(
        text.contains("stage 2 stage-2: from image busybox:latest"),
        "{text}"
    );
    assert!(
        text.contains("context filter:"),
        "the demo's .dockerignore is read: {text}"
    );
    let position = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} missing from:\n{text}"))
    };
    // Each COPY --from comes after the whole stage it reads.
    assert!(position("[build 4/4]") < position("[stage-2 3/7]"));
    assert!(position("[credits 2/2]") < position("[stage-2 4/7]"));
    assert!(position("[stage-2 1/7]") < position("[stage-2 2/7]"));
    assert!(
        text.contains("COPY --from=build /out/GREETING /usr/share/demo/\n      line 19:"),
        "{text}"
    );
    assert!(
        text.contains("not in the store"),
        "missing base images are shown, not errors: {text}"
    );
}

#[test]
fn build_is_the_default_verb() {
    let demo = testdata("demo");
    let explicit = rbuild(&[
        "build",
        "--dry-run",
        "-t",
        "demo:v1",
        demo.to_str().unwrap(),
    ]);
    let implicit = rbuild(&["--dry-run", "-t", "demo:v1", demo.to_str().unwrap()]);
    assert!(implicit.status.success(), "stderr: {}", stderr(&implicit));
    assert_eq!(stdout(&explicit), stdout(&implicit));
}

#[test]
fn json_plan_has_digests_and_target() {
    let demo = testdata("demo");
    let output = rbuild(&[
        "build",
        "--dry-run",
        "--format",
        "json",
        "--target",
        "build",
        demo.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON plan");
    assert_eq!(plan["target"], "build");
    let stages = plan["stages"].as_array().expect("stages");
    assert_eq!(stages.len(), 1, "--target build needs only the build stage");
    let steps = plan["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 4);
    for step in steps {
        let digest = step["digest"].as_str().expect("digest");
        assert!(
            digest.starts_with("sha256:") && digest.len() == 71,
            "{digest}"
        );
    }
}

#[test]
fn build_args_and_dockerfile_from_stdin() {
    let context = Context::new("stdin", "");
    let dockerfile = "ARG BASE=one\nFROM $BASE\nARG MODE\nRUN echo $MODE\n";
    let output = rbuild_with_input(
        &[
            "build",
            "--dry-run",
            "--format",
            "json",
            "-f",
            "-",
            "--build-arg",
            "BASE=two:1",
            "--build-arg",
            "MODE=fast",
            context.path(),
        ],
        Some(dockerfile),
    );
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON plan");
    assert_eq!(plan["stages"][0]["base"], "image two:1");
    // A bare --build-arg KEY not set in the environment is dropped, as docker does.
    let output = rbuild_with_input(
        &[
            "build",
            "--dry-run",
            "-f",
            "-",
            "--build-arg",
            "RBUILD_TEST_ARG",
            "--build-arg",
            "NOBODY_USES=1",
            context.path(),
        ],
        Some(dockerfile),
    );
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    assert!(
        stderr(&output).contains("NOBODY_USES"),
        "unused build args are warned about: {}",
        stderr(&output)
    );
}

#[test]
fn bad_dockerfile_exits_1_naming_file_line_and_hint() {
    let context = Context::new("bad", "FROM busybox\nRUN true\nCOPY --chwon=1 a /b\n");
    let output = rbuild(&["build", "--dry-run", context.path()]);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    let expected_head = format!(
        "{}/Dockerfile:3: COPY --chwon=1 a /b: unknown flag: --chwon",
        context.path()
    );
    assert!(message.starts_with(&expected_head), "{message}");
    assert!(message.contains("hint: did you mean --chown?"), "{message}");
    assert!(message.contains("   3 | COPY --chwon=1 a /b"), "{message}");
    assert!(
        stdout(&output).is_empty(),
        "nothing is planned: {}",
        stdout(&output)
    );
}

#[test]
fn unknown_instruction_and_unknown_target_exit_1() {
    let context = Context::new("unknown", "FROM busybox AS base\nCOPPY a b\n");
    let output = rbuild(&["--dry-run", context.path()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("unknown instruction: COPPY"),
        "{}",
        stderr(&output)
    );
    assert!(
        stderr(&output).contains("did you mean COPY?"),
        "{}",
        stderr(&output)
    );

    let context = Context::new("target", "FROM busybox AS base\nRUN true\n");
    let output = rbuild(&["--dry-run", "--target", "nope", context.path()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("target stage \"nope\" could not be found"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn usage_errors_exit_2() {
    let demo = testdata("demo");
    let demo = demo.to_str().unwrap();
    for arguments in [
        vec!["build", "--no-such-flag", demo],
        vec!["build", "--dry-run", "-o", "type=zip,dest=x", demo],
        vec!["build", "--dry-run", "-t", "Bad:Name", demo],
        vec!["build", "--dry-run", "--build-arg", "=x", demo],
        vec!["build", "--dry-run", "--platform", "linux", demo],
        vec!["build", "--dry-run", "--progress", "fancy", demo],
        vec!["build"],
    ] {
        let output = rbuild(&arguments);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{arguments:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn missing_context_or_dockerfile_exits_1() {
    let output = rbuild(&["build", "--dry-run", "/nonexistent/context/dir"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("is not a directory"),
        "{}",
        stderr(&output)
    );
    let context = Context::new("nofile", "");
    let output = rbuild(&[
        "build",
        "--dry-run",
        "-f",
        "/nonexistent/Dockerfile",
        context.path(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("/nonexistent/Dockerfile"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_build_whose_base_image_is_missing_names_the_from_line() {
    let demo = testdata("demo");
    // A base on a loopback port nothing listens on: the pull fails at once, and no test ever
    // reaches for a registry off this machine.
    let output = rbuild(&[
        "build",
        "-t",
        "demo:v1",
        "--build-arg",
        "BASE=127.0.0.1:9/missing:latest",
        demo.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    // All three stages start at once (each FROM names an image); whichever fails first is
    // reported, and only that one.
    let stderr = stderr(&output);
    let reported: Vec<&str> = [
        "Dockerfile:5: FROM ${BASE} AS build: base image 127.0.0.1:9/missing:latest is not in the store",
        "Dockerfile:14: FROM ${BASE} AS credits: base image 127.0.0.1:9/missing:latest is not in the store",
        "Dockerfile:17: FROM ${BASE}: base image 127.0.0.1:9/missing:latest is not in the store",
    ]
    .into_iter()
    .filter(|message| stderr.contains(message))
    .collect();
    assert_eq!(reported.len(), 1, "{stderr}");
}

#[test]
fn help_lists_every_contract_flag() {
    let output = rbuild(&["build", "--help"]);
    assert!(output.status.success());
    let help = stdout(&output);
    for flag in [
        "--tag",
        "--file",
        "--build-arg",
        "--target",
        "--no-cache",
        "--progress",
        "--output",
        "--cache-from",
        "--cache-to",
        "--secret",
        "--network",
        "--metadata-file",
        "--dry-run",
        "--root",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
    let top = stdout(&rbuild(&["--help"]));
    assert!(
        top.contains("build") && top.contains("Exit status"),
        "{top}"
    );
}
