//! End-to-end tests of how `rbuild build` schedules steps: step-level overlap between stages,
//! identical work running once, `--jobs`, and the live progress view.

mod common;

use common::*;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// An empty context with `dockerfile`, and a root with busybox imported.
fn context_with(directory: &TempDirectory, dockerfile: &str) -> (PathBuf, PathBuf) {
    let context = directory.join("context");
    fs::create_dir_all(&context).unwrap();
    fs::write(context.join("Dockerfile"), dockerfile).unwrap();
    let root = directory.join("root");
    succeeds(rbuild(
        &root,
        &["import", busybox_tar().to_str().unwrap(), "busybox:latest"],
    ));
    (context, root)
}

fn build(root: &Path, context: &Path, extra: &[&str]) -> String {
    let mut arguments = vec!["build", "-t", "scheduled", "--progress", "plain"];
    arguments.extend_from_slice(extra);
    arguments.push(context.to_str().unwrap());
    let output = rbuild(root, &arguments);
    succeeds(output.clone());
    text(&output.stderr)
}

#[test]
fn a_stage_runs_its_early_steps_while_the_stage_it_copies_from_builds() {
    let directory = TempDirectory::new("overlap");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The last stage's RUN talks to the listener stage, and only later copies from it: the
    // build can finish only if that RUN starts before the stage it copies from is done.
    let (context, root) = context_with(
        &directory,
        &format!(
            "FROM busybox AS listener\n\
             RUN --network=host timeout 60 nc -l -p {port} -e sh -c 'cat > /received'\n\
             FROM busybox\n\
             RUN --network=host sh -c 'until echo hello | nc 127.0.0.1 {port}; do sleep 0.1; done'\n\
             COPY --from=listener /received /received\n"
        ),
    );
    build(&root, &context, &[]);
    let output = succeeds(rbuild(
        &root,
        &["run", "--rm", "scheduled", "cat", "/received"],
    ));
    assert_eq!(output, "hello\n");
}

#[test]
fn identical_steps_in_two_stages_run_once() {
    let directory = TempDirectory::new("once");
    // Each run of the RUN asks this server once.
    let (port, _, requests) = holding_server(std::time::Duration::ZERO);
    let (context, root) = context_with(
        &directory,
        &format!(
            "FROM busybox AS one\n\
             RUN --network=host wget -q -O /made http://127.0.0.1:{port}/\n\
             FROM busybox AS two\n\
             RUN --network=host wget -q -O /made http://127.0.0.1:{port}/\n\
             FROM busybox\n\
             COPY --from=one /made /one\n\
             COPY --from=two /made /two\n"
        ),
    );
    // --no-cache: nothing comes from an earlier build, yet the second RUN reuses the first.
    build(&root, &context, &["--no-cache"]);
    let count = requests.load(Ordering::SeqCst);
    assert_eq!(count, 1, "the identical RUN ran {count} times");
    let output = succeeds(rbuild(
        &root,
        &["run", "--rm", "scheduled", "cat", "/one", "/two"],
    ));
    assert_eq!(output, "ok\nok\n");
}

/// A loopback HTTP server that holds each request for `hold` before answering `ok`. Returns
/// its port, the most requests it held at once, and how many it answered.
fn holding_server(hold: std::time::Duration) -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let most = Arc::new(AtomicUsize::new(0));
    let count = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(Mutex::new(0usize));
    let (recorded, counted) = (most.clone(), count.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            counted.fetch_add(1, Ordering::SeqCst);
            let (open, most) = (open.clone(), recorded.clone());
            std::thread::spawn(move || {
                {
                    let mut open = open.lock().unwrap();
                    *open += 1;
                    most.fetch_max(*open, Ordering::SeqCst);
                }
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                std::thread::sleep(hold);
                *open.lock().unwrap() -= 1;
                let _ = stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
            });
        }
    });
    (port, most, count)
}

#[test]
fn jobs_bounds_how_many_steps_run_at_once() {
    let directory = TempDirectory::new("jobs");
    let (port, most, _) = holding_server(std::time::Duration::from_millis(700));
    let stage = |name: &str| {
        format!(
            "FROM busybox AS {name}\nRUN --network=host wget -q -O /{name} http://127.0.0.1:{port}/{name}\n"
        )
    };
    let dockerfile = format!(
        "{}{}{}FROM busybox\nCOPY --from=a /a /a\nCOPY --from=b /b /b\nCOPY --from=c /c /c\n",
        stage("a"),
        stage("b"),
        stage("c")
    );
    let (context, root) = context_with(&directory, &dockerfile);
    build(&root, &context, &["--jobs", "1"]);
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "with --jobs 1 the three RUNs were held at once"
    );
    // With room for all three, they overlap.
    build(&root, &context, &["--jobs", "3", "--no-cache"]);
    assert!(most.load(Ordering::SeqCst) >= 2);
    let output = succeeds(rbuild(
        &root,
        &["run", "--rm", "scheduled", "cat", "/a", "/b", "/c"],
    ));
    assert_eq!(output, "ok\nok\nok\n");
    let usage = rbuild(&root, &["build", "--jobs", "0", context.to_str().unwrap()]);
    assert_eq!(usage.status.code(), Some(2));
}

#[test]
fn the_tty_view_shows_each_step_and_its_result() {
    let directory = TempDirectory::new("tty");
    let (context, root) = context_with(
        &directory,
        "FROM busybox\nRUN echo first-step-output\nRUN echo second > /second\n",
    );
    // `script` gives rbuild a terminal; `--progress auto` then chooses the live view.
    let command = format!(
        "{} --root {} build -t scheduled {}",
        env!("CARGO_BIN_EXE_rbuild"),
        root.display(),
        context.display()
    );
    let run = |command: &str| {
        let output = Command::new("script")
            .args(["-qefc", command, "/dev/null"])
            .env_remove("SOURCE_DATE_EPOCH")
            .output()
            .expect("script (util-linux) must be installed");
        assert!(output.status.success(), "{}", text(&output.stdout));
        text(&output.stdout)
    };
    let live = run(&command);
    assert!(
        live.contains("\u{1b}["),
        "the live view redraws with escape sequences: {live:?}"
    );
    for expected in [
        "RUN echo first-step-output",
        "RUN echo second > /second",
        "DONE",
    ] {
        assert!(
            live.contains(expected),
            "{expected:?} missing from {live:?}"
        );
    }
    // The plain lines are not what a terminal gets by default.
    assert!(!live.contains("#2 0."), "{live:?}");
    let again = run(&command);
    assert!(again.contains("CACHED"), "{again:?}");
    let output = succeeds(rbuild(
        &root,
        &["run", "--rm", "scheduled", "cat", "/second"],
    ));
    assert_eq!(output, "second\n");
}

/// The dry-run plan's prediction for the step whose instruction starts with `prefix`.
fn prediction(plan: &serde_json::Value, prefix: &str) -> String {
    plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|step| step["instruction"].as_str().unwrap().starts_with(prefix))
        .unwrap_or_else(|| panic!("no step {prefix:?} in {plan}"))["prediction"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Every file under `root` with its size and modification time.
fn listing(root: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut files = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(directory) = pending.pop() {
        for entry in fs::read_dir(&directory).unwrap() {
            let entry = entry.unwrap();
            let metadata = entry.metadata().unwrap();
            if metadata.is_dir() {
                pending.push(entry.path());
            } else {
                files.push((entry.path(), metadata.len(), metadata.modified().unwrap()));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn a_dry_run_predicts_hits_and_names_what_would_miss() {
    let directory = TempDirectory::new("predict");
    let (context, root) = demo_context(&directory);
    let plan = |root: &Path| -> serde_json::Value {
        let output = succeeds(rbuild(
            root,
            &[
                "build",
                "--dry-run",
                "--format",
                "json",
                context.to_str().unwrap(),
            ],
        ));
        serde_json::from_str(&output).unwrap()
    };
    let before = plan(&root);
    assert_eq!(
        prediction(&before, "COPY greeting.txt"),
        "would run: no earlier build of this step in this root"
    );
    succeeds(rbuild(
        &root,
        &[
            "build",
            "-t",
            "demo",
            "--progress",
            "plain",
            context.to_str().unwrap(),
        ],
    ));
    let unchanged = plan(&root);
    for step in [
        "WORKDIR /src",
        "COPY greeting.txt",
        "RUN <<EOF",
        "RUN echo",
        "COPY --chmod",
    ] {
        assert_eq!(
            prediction(&unchanged, step),
            "CACHED",
            "{step}: {unchanged}"
        );
    }
    // One edited file: the steps that read it and their descendants would run, and say why.
    fs::write(context.join("greeting.txt"), "changed\n").unwrap();
    let files_before = listing(&root.join("v1"));
    let changed = plan(&root);
    assert_eq!(
        prediction(&changed, "COPY greeting.txt"),
        "would run: file changed: greeting.txt"
    );
    assert_eq!(
        prediction(&changed, "RUN <<EOF"),
        "would run: the step it builds on changed"
    );
    assert_eq!(
        prediction(&changed, "COPY --from=build"),
        "would run: what it copies from changed: build"
    );
    assert_eq!(prediction(&changed, "RUN echo"), "CACHED");
    assert_eq!(
        prediction(&changed, "COPY --from=credits"),
        "would run: the step it builds on changed"
    );
    // Nothing ran and nothing in the store changed but the context's stat cache.
    let files_after = listing(&root.join("v1"));
    let differences: Vec<_> = files_after
        .iter()
        .filter(|file| !files_before.contains(file))
        .filter(|(path, _, _)| !path.to_string_lossy().contains("context-cache"))
        .collect();
    assert!(differences.is_empty(), "a dry run wrote {differences:?}");
    let text_plan = succeeds(rbuild(
        &root,
        &["build", "--dry-run", context.to_str().unwrap()],
    ));
    assert!(
        text_plan.contains("would run: file changed: greeting.txt"),
        "{text_plan}"
    );
}

#[test]
fn a_deep_image_of_seventy_layers_builds_and_runs() {
    let directory = TempDirectory::new("deep");
    // 70 layers of 64-hex snapshot names are more lower directories than fit in the page
    // mount(2) takes, even as relative paths: the sandbox reaches them through short links.
    let mut dockerfile = String::from("FROM busybox\n");
    for number in 0..70 {
        dockerfile.push_str(&format!("RUN echo {number} > /layer-{number}\n"));
    }
    let (context, root) = context_with(&directory, &dockerfile);
    build(&root, &context, &[]);
    let image = inspect(&root, "scheduled");
    assert_eq!(image["rootfs"]["diff_ids"].as_array().unwrap().len(), 71);
    let output = succeeds(rbuild(
        &root,
        &[
            "run",
            "--rm",
            "scheduled",
            "sh",
            "-c",
            "cat /layer-0 /layer-69; ls / | grep -c layer-",
        ],
    ));
    assert_eq!(output, "0\n69\n70\n");
}

#[test]
fn a_symlink_loop_in_a_stage_fails_the_copy_cleanly() {
    let directory = TempDirectory::new("loop");
    let (context, root) = context_with(
        &directory,
        "FROM busybox AS looped\nRUN ln -s loop /loop && mkdir /data && ln -s ../data/self /data/self\n\
         FROM busybox\nCOPY --from=looped /loop/x /x\n",
    );
    let output = rbuild(
        &root,
        &["build", "--progress", "plain", context.to_str().unwrap()],
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    assert!(
        text(&output.stderr).contains("Dockerfile:4: COPY --from=looped /loop/x /x"),
        "{}",
        text(&output.stderr)
    );
    // A directory holding a looping link copies (the link as a link).
    fs::write(
        context.join("Dockerfile"),
        "FROM busybox AS looped\nRUN mkdir /data && ln -s self /data/self && echo ok > /data/file\n\
         FROM busybox\nCOPY --from=looped /data /data\n",
    )
    .unwrap();
    build(&root, &context, &[]);
    let output = succeeds(rbuild(
        &root,
        &[
            "run",
            "--rm",
            "scheduled",
            "sh",
            "-c",
            "cat /data/file; readlink /data/self",
        ],
    ));
    assert_eq!(output, "ok\nself\n");
}
