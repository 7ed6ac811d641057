//! End-to-end tests of `RUN --mount`: cache, bind (stage, context), tmpfs, secret and ssh
//! mounts in real builds, checked with `rbuild run`, `inspect`, the metadata file and the
//! layer blobs themselves.

mod common;

use common::*;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A context directory with `Dockerfile`, and a root with busybox imported.
fn setup(directory: &TempDirectory, dockerfile: &str) -> (PathBuf, PathBuf) {
    let context = directory.join("context");
    fs::create_dir_all(&context).unwrap();
    fs::write(context.join("Dockerfile"), dockerfile).unwrap();
    let root = directory.join("root");
    import_busybox(&root, "busybox:latest");
    (context, root)
}

/// `rbuild build -t TAG --progress plain --metadata-file ... EXTRA CONTEXT`.
fn build(root: &Path, context: &Path, tag: &str, extra: &[&str]) -> std::process::Output {
    let metadata = context.with_file_name("metadata.json");
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
    rbuild(root, &arguments)
}

fn metadata(context: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(context.with_file_name("metadata.json")).unwrap()).unwrap()
}

/// The metadata of the step whose instruction starts with `prefix`.
fn step<'a>(metadata: &'a serde_json::Value, prefix: &str) -> &'a serde_json::Value {
    metadata["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|step| step["instruction"].as_str().unwrap().starts_with(prefix))
        .unwrap_or_else(|| panic!("no step {prefix} in {metadata:#}"))
}

/// `rbuild run --rm IMAGE sh -c SCRIPT`, its stdout.
fn run_in(root: &Path, image: &str, script: &str) -> String {
    succeeds(rbuild(
        root,
        &[
            "run",
            "--rm",
            "--network",
            "none",
            image,
            "sh",
            "-c",
            script,
        ],
    ))
}

#[test]
fn cache_mount_persists_across_builds_and_stays_out_of_the_image() {
    let directory = TempDirectory::new("cache-mount");
    let (context, root) = setup(
        &directory,
        "FROM busybox\n\
         RUN --mount=type=cache,target=/var/cache/app sh -c 'echo run >> /var/cache/app/runs; wc -l < /var/cache/app/runs > /seen'\n\
         RUN --mount=type=cache,id=owned,target=/owned,uid=1000,gid=1001,mode=0700 stat -c '%u %g %a' /owned > /owner\n",
    );
    succeeds(build(&root, &context, "cached:v1", &["--no-cache"]));
    assert_eq!(run_in(&root, "cached:v1", "cat /seen").trim(), "1");
    assert_eq!(
        run_in(&root, "cached:v1", "cat /owner").trim(),
        "1000 1001 700"
    );
    // The mount point was created for the run only: neither it nor its parents are in the
    // image (busybox has no /var/cache), nor the cache's contents.
    assert_eq!(
        run_in(
            &root,
            "cached:v1",
            "test -e /var/cache || test -e /owned || echo absent"
        )
        .trim(),
        "absent"
    );

    succeeds(build(&root, &context, "cached:v2", &["--no-cache"]));
    assert_eq!(run_in(&root, "cached:v2", "cat /seen").trim(), "2");

    // du counts the cache mounts; prune --all empties them.
    let usage: serde_json::Value =
        serde_json::from_str(&succeeds(rbuild(&root, &["du", "--format", "json"]))).unwrap();
    let part = usage["parts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|part| part["part"] == "cache mounts")
        .unwrap_or_else(|| panic!("no cache mounts in {usage:#}"));
    assert!(part["files"].as_u64().unwrap() >= 3, "{usage:#}");
    succeeds(rbuild(&root, &["prune", "--all"]));
    succeeds(build(&root, &context, "cached:v3", &["--no-cache"]));
    assert_eq!(run_in(&root, "cached:v3", "cat /seen").trim(), "1");
}

#[test]
fn locked_cache_mounts_serialize_concurrent_stages() {
    let directory = TempDirectory::new("cache-locked");
    // Each holder claims the cache, then checks many times that nobody else claimed it
    // meanwhile, then logs start and end. With the lock the log is well nested whatever the
    // interleaving of the two stages.
    let holder = |name: &str| {
        format!(
            "FROM busybox AS {name}\n\
             RUN --mount=type=cache,id=shared-lock,target=/c,sharing=locked sh -c 'echo start {name} >> /c/log; test ! -e /c/holder || echo overlap >> /c/log; echo {name} > /c/holder; i=0; while [ $i -lt 300 ]; do [ \"$(cat /c/holder)\" = {name} ] || echo overlap >> /c/log; i=$((i+1)); done; rm /c/holder; echo end {name} >> /c/log; echo {name} > /done-{name}'\n"
        )
    };
    let dockerfile = format!(
        "{}{}FROM busybox\nCOPY --from=a /done-a /\nCOPY --from=b /done-b /\nRUN --mount=type=cache,id=shared-lock,target=/c,sharing=locked cp /c/log /log\n",
        holder("a"),
        holder("b")
    );
    let (context, root) = setup(&directory, &dockerfile);
    succeeds(build(&root, &context, "locked:v1", &[]));
    let log = run_in(&root, "locked:v1", "cat /log");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 4, "{log}");
    assert!(!log.contains("overlap"), "{log}");
    let first = lines[0].strip_prefix("start ").unwrap();
    let second = if first == "a" { "b" } else { "a" };
    assert_eq!(
        lines,
        [
            format!("start {first}"),
            format!("end {first}"),
            format!("start {second}"),
            format!("end {second}")
        ]
    );
}

#[test]
fn bind_mounts_read_stages_and_the_context_and_discard_writes() {
    let directory = TempDirectory::new("bind-mount");
    let (context, root) = setup(
        &directory,
        "FROM busybox AS build\n\
         RUN mkdir /out && echo built > /out/artifact\n\
         FROM busybox\n\
         RUN --mount=from=build,source=/out,target=/in cat /in/artifact > /from-stage\n\
         RUN --mount=from=build,source=/out,target=/in,rw sh -c 'echo overwritten > /in/artifact && cat /in/artifact > /rw-stage'\n\
         RUN --mount=from=build,source=/out,target=/in cat /in/artifact > /after-rw-stage\n\
         RUN --mount=target=/ctx cat /ctx/data.txt /ctx/dir/sub.txt > /from-context\n\
         RUN --mount=target=/ctx,rw sh -c 'echo changed > /ctx/data.txt && echo new > /ctx/new.txt && cat /ctx/data.txt > /rw-context'\n\
         RUN --mount=source=dir,target=/ctx sh -c 'if touch /ctx/x 2>/dev/null; then echo writable; else echo read-only; fi > /ro-check; ls /ctx > /listing'\n",
    );
    fs::write(context.join("data.txt"), "hello\n").unwrap();
    fs::create_dir(context.join("dir")).unwrap();
    fs::write(context.join("dir/sub.txt"), "sub\n").unwrap();
    succeeds(build(&root, &context, "bound:v1", &[]));
    let read = |file: &str| run_in(&root, "bound:v1", &format!("cat {file}"));
    assert_eq!(read("/from-stage"), "built\n");
    assert_eq!(read("/rw-stage"), "overwritten\n");
    assert_eq!(read("/after-rw-stage"), "built\n");
    assert_eq!(read("/from-context"), "hello\nsub\n");
    assert_eq!(read("/rw-context"), "changed\n");
    assert_eq!(read("/ro-check"), "read-only\n");
    assert_eq!(read("/listing"), "sub.txt\n");
    // rw writes went nowhere: not to the context, not into the image.
    assert_eq!(
        fs::read_to_string(context.join("data.txt")).unwrap(),
        "hello\n"
    );
    assert!(!context.join("new.txt").exists());
    assert_eq!(
        run_in(
            &root,
            "bound:v1",
            "test -e /in || test -e /ctx || echo absent"
        )
        .trim(),
        "absent"
    );
}

#[test]
fn a_context_bind_mount_hides_what_dockerignore_excludes() {
    let directory = TempDirectory::new("bind-ignore");
    let (context, root) = setup(
        &directory,
        "FROM busybox\nRUN --mount=target=/ctx,rw sh -c 'ls -a /ctx > /listing; echo scribble > /ctx/data.txt'\n",
    );
    fs::write(context.join("data.txt"), "hello\n").unwrap();
    fs::write(context.join("ignored.txt"), "hidden\n").unwrap();
    fs::write(context.join(".dockerignore"), "ignored.txt\n").unwrap();
    succeeds(build(&root, &context, "ignore:v1", &[]));
    let listing = run_in(&root, "ignore:v1", "cat /listing");
    assert!(listing.lines().any(|line| line == "data.txt"), "{listing}");
    assert!(!listing.contains("ignored.txt"), "{listing}");
    assert_eq!(
        fs::read_to_string(context.join("data.txt")).unwrap(),
        "hello\n"
    );
}

#[test]
fn editing_a_bound_context_file_reruns_the_step_and_names_the_file() {
    let directory = TempDirectory::new("bind-miss");
    let (context, root) = setup(
        &directory,
        "FROM busybox\nRUN --mount=source=data.txt,target=/data.txt cat /data.txt > /copy\n",
    );
    fs::write(context.join("data.txt"), "one\n").unwrap();
    fs::write(context.join("other.txt"), "unrelated\n").unwrap();
    succeeds(build(&root, &context, "miss:v1", &[]));
    assert_eq!(step(&metadata(&context), "RUN")["cached"], false);

    // A file the mount does not select changes nothing.
    fs::write(context.join("other.txt"), "still unrelated\n").unwrap();
    succeeds(build(&root, &context, "miss:v2", &[]));
    assert_eq!(step(&metadata(&context), "RUN")["cached"], true);

    fs::write(context.join("data.txt"), "two\n").unwrap();
    succeeds(build(&root, &context, "miss:v3", &[]));
    let metadata = metadata(&context);
    let run = step(&metadata, "RUN");
    assert_eq!(run["cached"], false, "{metadata:#}");
    let reason = run["miss_reason"].as_str().unwrap();
    assert!(reason.contains("file changed: data.txt"), "{reason}");
    assert_eq!(run_in(&root, "miss:v3", "cat /copy"), "two\n");
}

#[test]
fn a_bind_mount_from_a_stage_reruns_when_the_stage_changes() {
    let directory = TempDirectory::new("bind-stage-key");
    let dockerfile = |value: &str| {
        format!(
            "FROM busybox AS build\nRUN echo {value} > /value\nFROM busybox\nRUN --mount=from=build,target=/build cat /build/value > /copy\n"
        )
    };
    let (context, root) = setup(&directory, &dockerfile("first"));
    succeeds(build(&root, &context, "stage-key:v1", &[]));
    fs::write(context.join("Dockerfile"), dockerfile("second")).unwrap();
    succeeds(build(&root, &context, "stage-key:v2", &[]));
    let metadata = metadata(&context);
    let run = metadata["steps"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|step| step["instruction"].as_str().unwrap().starts_with("RUN"))
        .unwrap();
    assert_eq!(run["cached"], false, "{metadata:#}");
    assert!(
        run["miss_reason"].as_str().unwrap().contains("build"),
        "{metadata:#}"
    );
    assert_eq!(run_in(&root, "stage-key:v2", "cat /copy"), "second\n");
}

#[test]
fn tmpfs_mounts_are_tmpfs_with_their_size() {
    let directory = TempDirectory::new("tmpfs-mount");
    let (context, root) = setup(
        &directory,
        "FROM busybox\nRUN --mount=type=tmpfs,target=/scratch,size=1m sh -c 'grep \" /scratch \" /proc/mounts > /mount-line; echo x > /scratch/file'\n",
    );
    succeeds(build(&root, &context, "tmpfs:v1", &[]));
    let line = run_in(&root, "tmpfs:v1", "cat /mount-line");
    assert!(line.starts_with("tmpfs /scratch tmpfs "), "{line}");
    assert!(line.contains("size=1024k"), "{line}");
    assert_eq!(
        run_in(&root, "tmpfs:v1", "test -e /scratch || echo absent").trim(),
        "absent"
    );
}

/// Every blob of the store, decompressed when it is gzip.
fn blob_contents(root: &Path) -> Vec<Vec<u8>> {
    let mut contents = Vec::new();
    for entry in fs::read_dir(root.join("v1/blobs/sha256")).unwrap() {
        let path = entry.unwrap().path();
        let bytes = fs::read(&path).unwrap();
        if bytes.starts_with(&[0x1f, 0x8b]) {
            let output = Command::new("gzip")
                .arg("-dc")
                .arg(&path)
                .output()
                .expect("gzip must be installed");
            assert!(output.status.success());
            contents.push(output.stdout);
        }
        contents.push(bytes);
    }
    contents
}

#[test]
fn secrets_are_mounted_but_never_stored() {
    let directory = TempDirectory::new("secret-mount");
    let value = "s3cret-value-8d1f";
    let (context, root) = setup(
        &directory,
        "FROM busybox\n\
         RUN --mount=type=secret,id=token sh -c 'wc -c < /run/secrets/token > /length; stat -c \"%a %u %g\" /run/secrets/token > /mode; cat /run/secrets/token | sed s/s3cret/S3CRET/ > /transformed'\n\
         RUN --mount=type=secret,id=token,target=/etc/token,mode=0440,uid=1,gid=2 stat -c '%a %u %g' /etc/token > /custom\n\
         RUN --mount=type=secret,id=token,env=TOKEN sh -c 'echo ${#TOKEN} > /env-length'\n\
         RUN --mount=type=secret,id=absent sh -c 'test -e /run/secrets/absent || echo skipped > /absent'\n",
    );
    let secret_file = directory.join("token.txt");
    fs::write(&secret_file, value).unwrap();
    let secret = format!("id=token,src={}", secret_file.display());
    let output = build(&root, &context, "secret:v1", &["--secret", &secret]);
    let progress = text(&output.stderr);
    succeeds(output);
    assert!(!progress.contains(value), "{progress}");
    let read = |file: &str| run_in(&root, "secret:v1", &format!("cat {file}"));
    assert_eq!(read("/length").trim(), value.len().to_string());
    assert_eq!(read("/mode").trim(), "400 0 0");
    assert_eq!(read("/transformed").trim(), "S3CRET-value-8d1f");
    assert_eq!(read("/custom").trim(), "440 1 2");
    assert_eq!(read("/env-length").trim(), value.len().to_string());
    assert_eq!(read("/absent").trim(), "skipped");
    // No secret file nor mount point in the image, and the value in no blob (layers,
    // config, history) of the store.
    assert_eq!(
        run_in(
            &root,
            "secret:v1",
            "test -e /run/secrets/token || test -e /etc/token || echo absent"
        )
        .trim(),
        "absent"
    );
    for blob in blob_contents(&root) {
        assert!(
            !blob
                .windows(value.len())
                .any(|window| window == value.as_bytes()),
            "a blob holds the secret"
        );
    }
    let history = inspect(&root, "secret:v1")["history"].to_string();
    assert!(!history.contains(value), "{history}");

    // A changed secret is not a reason to re-run: its content is not in the key.
    fs::write(&secret_file, "another-value").unwrap();
    succeeds(build(&root, &context, "secret:v2", &["--secret", &secret]));
    assert_eq!(
        step(&metadata(&context), "RUN --mount=type=secret,id=token sh")["cached"],
        true
    );
}

#[test]
fn a_required_secret_that_is_missing_fails_the_step() {
    let directory = TempDirectory::new("secret-required");
    let (context, root) = setup(
        &directory,
        "FROM busybox\nRUN --mount=type=secret,id=api-key,required=true true\n",
    );
    let output = build(&root, &context, "required:v1", &[]);
    assert_eq!(output.status.code(), Some(1));
    let error = text(&output.stderr);
    assert!(
        error.contains("Dockerfile:2: RUN --mount=type=secret,id=api-key,required=true true: secret api-key is required"),
        "{error}"
    );
}

#[test]
fn ssh_mounts_are_not_supported() {
    let directory = TempDirectory::new("ssh-mount");
    let (context, root) = setup(
        &directory,
        "FROM busybox\nRUN echo fine\nRUN --mount=type=ssh true\n",
    );
    let output = build(&root, &context, "ssh:v1", &[]);
    assert_eq!(output.status.code(), Some(1));
    let error = text(&output.stderr);
    assert!(
        error
            .contains("Dockerfile:3: RUN --mount=type=ssh true: --mount=type=ssh is not supported"),
        "{error}"
    );
}

#[test]
fn cache_mounts_are_seeded_from_a_stage_and_binds_read_images() {
    let directory = TempDirectory::new("cache-seed");
    let (context, root) = setup(
        &directory,
        "FROM busybox AS seed\n\
         RUN mkdir /s && echo seeded > /s/file\n\
         FROM busybox\n\
         RUN --mount=type=cache,id=seeded,target=/c,from=seed,source=/s sh -c 'cat /c/file > /out; echo later >> /c/file'\n\
         RUN --mount=from=busybox:latest,source=/bin/busybox,target=/image-busybox sh -c 'test -f /image-busybox && echo file > /from-image'\n",
    );
    succeeds(build(&root, &context, "seed:v1", &[]));
    assert_eq!(run_in(&root, "seed:v1", "cat /out"), "seeded\n");
    assert_eq!(run_in(&root, "seed:v1", "cat /from-image"), "file\n");
    // Seeded once: the second run sees what the first left in the cache.
    succeeds(build(&root, &context, "seed:v2", &["--no-cache"]));
    assert_eq!(run_in(&root, "seed:v2", "cat /out"), "seeded\nlater\n");
}

#[test]
fn a_private_cache_mount_in_use_elsewhere_gets_a_fresh_directory() {
    let directory = TempDirectory::new("cache-private");
    let (context, root) = setup(
        &directory,
        "FROM busybox\nRUN --mount=type=cache,id=private-cache,target=/c,sharing=private sh -c 'ls /c > /listing; touch /c/marker'\n",
    );
    succeeds(build(&root, &context, "private:v1", &["--no-cache"]));
    assert_eq!(run_in(&root, "private:v1", "cat /listing"), "");
    // Another user holds the cache (as a shared mount would): this run must neither wait
    // nor see its contents.
    let lock_path = root.join(format!(
        "v1/cache-mounts/{}.lock",
        sha256_hex(b"private-cache")
    ));
    let lock = fs::File::open(&lock_path).unwrap();
    lock.lock_shared().unwrap();
    succeeds(build(&root, &context, "private:v2", &["--no-cache"]));
    assert_eq!(run_in(&root, "private:v2", "cat /listing"), "");
    drop(lock);
    succeeds(build(&root, &context, "private:v3", &["--no-cache"]));
    assert_eq!(run_in(&root, "private:v3", "cat /listing"), "marker\n");
}

#[test]
fn mount_sources_cannot_reach_outside_their_stage_or_context() {
    let directory = TempDirectory::new("mount-escape");
    let (context, root) = setup(
        &directory,
        "FROM busybox AS build\n\
         RUN mkdir /box && ln -s ../../../../../.. /box/up && ln -s / /box/absolute\n\
         FROM busybox\n\
         RUN --mount=from=build,source=/box/up,target=/m sh -c 'test -d /m/box && echo inside > /relative'\n\
         RUN --mount=from=build,source=/box/absolute,target=/m sh -c 'test -d /m/box && echo inside > /absolute'\n\
         RUN --mount=target=/ctx,rw sh -c 'echo pwned > /ctx/link/planted; echo pwned > /ctx/link/file; true'\n",
    );
    let victim = directory.join("victim");
    fs::create_dir(&victim).unwrap();
    fs::write(victim.join("file"), "untouched\n").unwrap();
    std::os::unix::fs::symlink("../victim", context.join("link")).unwrap();
    succeeds(build(&root, &context, "escape:v1", &[]));
    assert_eq!(run_in(&root, "escape:v1", "cat /relative"), "inside\n");
    assert_eq!(run_in(&root, "escape:v1", "cat /absolute"), "inside\n");
    assert_eq!(
        fs::read_to_string(victim.join("file")).unwrap(),
        "untouched\n"
    );
    assert!(!victim.join("planted").exists());

    // A context source outside the context is an error naming the line.
    fs::write(
        context.join("Dockerfile"),
        "FROM busybox\nRUN --mount=source=../victim,target=/v cat /v/file\n",
    )
    .unwrap();
    let output = build(&root, &context, "escape:v2", &[]);
    assert_eq!(output.status.code(), Some(1));
    let error = text(&output.stderr);
    assert!(
        error.contains("Dockerfile:2: RUN --mount=source=../victim"),
        "{error}"
    );
    assert!(!error.contains("untouched"), "{error}");
}
