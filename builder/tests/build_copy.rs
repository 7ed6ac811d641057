//! End-to-end tests of COPY and ADD beyond plain copies: local archives extracted by ADD
//! (and hostile ones), http(s) URLs from a server of the test's own on 127.0.0.1, `COPY
//! --parents`, symbolic `--chmod`, `--link` and `ADD --exclude`. Every build is a real
//! `rbuild build`; results are read by running the image.

mod common;

use common::*;

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A temp directory with an empty context and a root with busybox imported.
fn setup(name: &str) -> (TempDirectory, PathBuf, PathBuf) {
    let directory = TempDirectory::new(name);
    let context = directory.join("context");
    fs::create_dir_all(&context).unwrap();
    let root = directory.join("root");
    import_busybox(&root, "busybox:latest");
    (directory, context, root)
}

/// `rbuild build -t TAG` of `context` with plain progress, RUN steps on no network, and a
/// metadata file; returns the output.
fn build(root: &Path, context: &Path, tag: &str, metadata: &Path) -> Output {
    rbuild(
        root,
        &[
            "build",
            "-t",
            tag,
            "--progress",
            "plain",
            "--network",
            "none",
            "--metadata-file",
            metadata.to_str().unwrap(),
            context.to_str().unwrap(),
        ],
    )
}

/// Builds and returns the metadata file's JSON; panics with the output on failure.
#[track_caller]
fn build_ok(root: &Path, context: &Path, tag: &str) -> serde_json::Value {
    let metadata = context.parent().unwrap().join(format!("{tag}.json"));
    succeeds(build(root, context, tag, &metadata));
    serde_json::from_slice(&fs::read(&metadata).unwrap()).unwrap()
}

/// `sh -c SCRIPT` in a fresh container of `image`; its stdout.
#[track_caller]
fn run(root: &Path, image: &str, script: &str) -> String {
    succeeds(rbuild(root, &["run", "--rm", image, "sh", "-c", script]))
}

/// The step of the metadata whose instruction starts with `prefix`.
#[track_caller]
fn step<'a>(metadata: &'a serde_json::Value, prefix: &str) -> &'a serde_json::Value {
    metadata["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|step| step["instruction"].as_str().unwrap().starts_with(prefix))
        .unwrap_or_else(|| panic!("no step {prefix} in {metadata:#}"))
}

/// Every path below `directory` (recursively) whose file name is `name`.
fn find_named(directory: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(directory) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name() == name {
            found.push(path.clone());
        }
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            found.extend(find_named(&path, name));
        }
    }
    found
}

/// Build scratch directories (copies, downloads) left in the root: none once a build ended.
fn leftover_scratch(root: &Path) -> Vec<PathBuf> {
    fs::read_dir(root.join("v1/containers"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|entry| entry.file_name().to_string_lossy().starts_with("build-"))
                .map(|entry| entry.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs the real `tar` in `directory`.
#[track_caller]
fn tar(directory: &Path, arguments: &[&str]) {
    let status = Command::new("tar")
        .current_dir(directory)
        .args(arguments)
        .status()
        .expect("tar runs");
    assert!(status.success(), "tar {arguments:?}");
}

/// A context with `payload/hello.txt` (0640, owned 1234:2345 in the archives) and
/// `payload/sub/deep.txt`, archived plain and with every compression ADD understands.
fn archive_context(context: &Path, greeting: &str) {
    let staging = context.parent().unwrap().join("staging");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(staging.join("payload/sub")).unwrap();
    fs::write(staging.join("payload/hello.txt"), greeting).unwrap();
    fs::set_permissions(
        staging.join("payload/hello.txt"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    fs::write(staging.join("payload/sub/deep.txt"), "deep\n").unwrap();
    let owner = ["--owner=1234", "--group=2345", "--numeric-owner"];
    let destination = |name: &str| context.join(name).to_str().unwrap().to_string();
    for (name, flag) in [
        ("plain.tar", None),
        ("gz.tar.gz", Some("-z")),
        ("zst.tar.zst", Some("--zstd")),
    ] {
        let mut arguments: Vec<String> = owner.iter().map(|flag| flag.to_string()).collect();
        arguments.extend(flag.map(str::to_string));
        arguments.extend(["-cf".to_string(), destination(name), "payload".to_string()]);
        let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
        tar(&staging, &arguments);
    }
    // bzip2 and xz with the crates rather than tools CI may not have.
    let plain = fs::read(context.join("plain.tar")).unwrap();
    let mut bzip2 = Vec::new();
    bzip2::read::BzEncoder::new(&plain[..], bzip2::Compression::default())
        .read_to_end(&mut bzip2)
        .unwrap();
    fs::write(context.join("bz.tar.bz2"), bzip2).unwrap();
    let mut xz = Vec::new();
    let mut writer = lzma_rust2::XzWriter::new(&mut xz, lzma_rust2::XzOptions::default()).unwrap();
    writer.write_all(&plain).unwrap();
    writer.finish().unwrap();
    fs::write(context.join("xz.tar.xz"), xz).unwrap();
}

#[test]
fn add_extracts_local_archives_of_every_compression() {
    let (_directory, context, root) = setup("archives");
    archive_context(&context, "hello\n");
    // Named like an archive, but not one: copied as a file.
    fs::write(context.join("fake.tar.gz"), "just text\n").unwrap();
    fs::write(
        context.join("Dockerfile"),
        "FROM busybox AS files\n\
         COPY plain.tar /stage/\n\
         FROM busybox\n\
         ADD plain.tar /plain\n\
         ADD gz.tar.gz /gz/\n\
         ADD bz.tar.bz2 /bz/\n\
         ADD xz.tar.xz /xz/\n\
         ADD zst.tar.zst /zst/\n\
         ADD fake.tar.gz /fake/\n\
         ADD --chown=42:43 gz.tar.gz /owned/\n\
         ADD --unpack=false xz.tar.xz /kept/\n\
         COPY gz.tar.gz /copied/\n\
         COPY --from=files /stage/plain.tar /fromstage/\n",
    )
    .unwrap();
    build_ok(&root, &context, "archives");
    let contents = run(
        &root,
        "archives",
        "for d in plain gz bz xz zst; do cat /$d/payload/hello.txt /$d/payload/sub/deep.txt; \
         stat -c '%a %u %g' /$d/payload/hello.txt; done",
    );
    assert_eq!(contents, "hello\ndeep\n640 1234 2345\n".repeat(5));
    // Not archives, or not to be unpacked: copied as they are.
    let files = run(
        &root,
        "archives",
        "cat /fake/fake.tar.gz; ls /kept /copied /fromstage",
    );
    assert_eq!(
        files,
        "just text\n/copied:\ngz.tar.gz\n\n/fromstage:\nplain.tar\n\n/kept:\nxz.tar.xz\n"
    );
    // --chown gives every extracted entry its owner.
    let owners = run(
        &root,
        "archives",
        "stat -c '%n %u %g' /owned/payload /owned/payload/hello.txt /owned/payload/sub/deep.txt",
    );
    assert_eq!(
        owners,
        "/owned/payload 42 43\n/owned/payload/hello.txt 42 43\n/owned/payload/sub/deep.txt 42 43\n"
    );
}

#[test]
fn editing_an_archive_reruns_its_add_and_names_it() {
    let (_directory, context, root) = setup("archive-cache");
    archive_context(&context, "first\n");
    fs::write(
        context.join("Dockerfile"),
        "FROM busybox\nADD xz.tar.xz /other/\nADD gz.tar.gz /app/\n",
    )
    .unwrap();
    let first = build_ok(&root, &context, "cached");
    assert_eq!(step(&first, "ADD gz.tar.gz")["cached"], false);
    let again = build_ok(&root, &context, "cached");
    assert_eq!(step(&again, "ADD gz.tar.gz")["cached"], true, "{again:#}");
    assert_eq!(step(&again, "ADD xz.tar.xz")["cached"], true);

    // A new gz.tar.gz only: that ADD runs again and says why; the xz one before it stays
    // cached.
    let staging = context.parent().unwrap().join("staging");
    fs::write(staging.join("payload/hello.txt"), "second\n").unwrap();
    tar(
        &staging,
        &[
            "-czf",
            context.join("gz.tar.gz").to_str().unwrap(),
            "payload",
        ],
    );
    let edited = build_ok(&root, &context, "cached");
    let add = step(&edited, "ADD gz.tar.gz");
    assert_eq!(add["cached"], false);
    let reason = add["miss_reason"].as_str().unwrap();
    assert!(reason.contains("gz.tar.gz"), "{reason}");
    assert_eq!(step(&edited, "ADD xz.tar.xz")["cached"], true);
    assert_eq!(
        run(&root, "cached", "cat /app/payload/hello.txt"),
        "second\n"
    );
}

/// A tar with the raw entry name `name` (bypassing the tar crate's own path checks).
fn raw_entry(
    builder: &mut tar::Builder<Vec<u8>>,
    name: &str,
    kind: tar::EntryType,
    link: &str,
    data: &[u8],
) {
    let mut header = tar::Header::new_gnu();
    {
        let gnu = header.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    header.set_entry_type(kind);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append(&header, data).unwrap();
}

#[test]
fn hostile_archives_never_write_outside_the_image() {
    let (directory, context, root) = setup("hostile");
    let victim = directory.join("victim");
    fs::create_dir_all(&victim).unwrap();
    fs::write(victim.join("keep.txt"), "untouched\n").unwrap();

    // An entry that climbs out of the destination: refused, the build fails on its line.
    let mut climbing = tar::Builder::new(Vec::new());
    raw_entry(
        &mut climbing,
        "../../escape",
        tar::EntryType::Regular,
        "",
        b"owned\n",
    );
    fs::write(context.join("climb.tar"), climbing.into_inner().unwrap()).unwrap();
    fs::write(
        context.join("Dockerfile"),
        "FROM busybox\nADD climb.tar /app/\n",
    )
    .unwrap();
    let metadata = directory.join("hostile.json");
    let output = build(&root, &context, "climb", &metadata);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("Dockerfile:2: ADD climb.tar /app/"),
        "{stderr}"
    );
    assert!(stderr.contains("escape"), "{stderr}");
    assert!(find_named(&directory.0, "escape").is_empty());
    assert!(
        leftover_scratch(&root).is_empty(),
        "{:?}",
        leftover_scratch(&root)
    );

    // Symlinks to an absolute host path and up out of the tree, then files through them:
    // they resolve inside the destination, and the victim is never written.
    let victim_text = victim.to_str().unwrap();
    let mut linking = tar::Builder::new(Vec::new());
    raw_entry(
        &mut linking,
        "abs",
        tar::EntryType::Symlink,
        victim_text,
        b"",
    );
    raw_entry(
        &mut linking,
        "abs/pwned",
        tar::EntryType::Regular,
        "",
        b"inside\n",
    );
    raw_entry(
        &mut linking,
        "up",
        tar::EntryType::Symlink,
        "../../../..",
        b"",
    );
    raw_entry(
        &mut linking,
        "up/pwned-up",
        tar::EntryType::Regular,
        "",
        b"inside too\n",
    );
    fs::write(context.join("links.tar"), linking.into_inner().unwrap()).unwrap();
    fs::write(
        context.join("Dockerfile"),
        "FROM busybox\nADD links.tar /app/\n",
    )
    .unwrap();
    succeeds(build(&root, &context, "links", &metadata));
    let names: Vec<String> = fs::read_dir(&victim)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["keep.txt"]);
    assert_eq!(
        fs::read_to_string(victim.join("keep.txt")).unwrap(),
        "untouched\n"
    );
    // The only copies are in the image's own trees (snapshots of its /app).
    let copies = find_named(&directory.0, "pwned-up");
    assert!(
        copies.iter().all(|path| path.ends_with("app/pwned-up")),
        "{copies:?}"
    );
    let inside = run(
        &root,
        "links",
        &format!("cat /app{victim_text}/pwned /app/pwned-up; readlink /app/abs; readlink /app/up"),
    );
    assert_eq!(
        inside,
        format!("inside\ninside too\n{victim_text}\n../../../..\n")
    );
}

/// One response of the test server.
#[derive(Clone)]
struct Response {
    body: Vec<u8>,
    headers: Vec<(String, String)>,
}

/// A small HTTP/1.1 server on 127.0.0.1 for the test's own files: one request per
/// connection, at most `MAX_CONNECTIONS` of them, stopped when dropped.
struct Server {
    address: SocketAddr,
    files: Arc<Mutex<HashMap<String, Response>>>,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

const MAX_CONNECTIONS: usize = 64;

impl Server {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let files: Arc<Mutex<HashMap<String, Response>>> = Arc::default();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (files, requests, stop) = (files.clone(), requests.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming().take(MAX_CONNECTIONS) {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut stream) = stream else { continue };
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut request = Vec::new();
                    let mut buffer = [0; 4096];
                    while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                        match stream.read(&mut buffer) {
                            Ok(0) | Err(_) => break,
                            Ok(read) => request.extend_from_slice(&buffer[..read]),
                        }
                    }
                    let request = String::from_utf8_lossy(&request).into_owned();
                    let path = request
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or_default()
                        .to_string();
                    requests.lock().unwrap().push(path.clone());
                    let response = files.lock().unwrap().get(&path).cloned();
                    let reply = match response {
                        Some(response) => {
                            let mut head = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n",
                                response.body.len()
                            );
                            for (name, value) in &response.headers {
                                head.push_str(&format!("{name}: {value}\r\n"));
                            }
                            head.push_str("\r\n");
                            [head.into_bytes(), response.body].concat()
                        }
                        None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                    };
                    let _ = stream.write_all(&reply);
                }
            })
        };
        Self {
            address,
            files,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    fn serve(&self, path: &str, body: &[u8], headers: &[(&str, &str)]) {
        self.files.lock().unwrap().insert(
            path.to_string(),
            Response {
                body: body.to_vec(),
                headers: headers
                    .iter()
                    .map(|(name, value)| (name.to_string(), value.to_string()))
                    .collect(),
            },
        );
    }

    fn requests_of(&self, path: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|requested| *requested == path)
            .count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag and ends.
        let _ = TcpStream::connect(self.address);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn add_downloads_urls_checks_checksums_and_caches_by_content() {
    let (directory, context, root) = setup("urls");
    let server = Server::start();
    let last_modified = "Wed, 21 Oct 2015 07:28:00 GMT";
    server.serve(
        "/files/tool.txt",
        b"tool v1\n",
        &[("Last-Modified", last_modified)],
    );
    server.serve("/files/data.txt", b"data v1\n", &[]);
    server.serve(
        "/download?id=7",
        b"a,b\n",
        &[("Content-Disposition", "attachment; filename=\"report.csv\"")],
    );
    archive_context(&context, "bundled\n");
    server.serve(
        "/files/bundle.tar.gz",
        &fs::read(context.join("gz.tar.gz")).unwrap(),
        &[],
    );
    let tool_digest = sha256_hex(b"tool v1\n");
    let dockerfile = format!(
        "FROM busybox\n\
         ADD --checksum=sha256:{tool_digest} {tool} /downloads/\n\
         ADD {data} /data/named.txt\n\
         ADD {report} /reports/\n\
         ADD --chmod=u+x,go+r --chown=7:8 --checksum=sha256:{tool_digest} {tool} /bin-tool\n\
         ADD {bundle} /packed/\n\
         ADD --unpack=true {bundle} /unpacked/\n",
        tool = server.url("/files/tool.txt"),
        data = server.url("/files/data.txt"),
        report = server.url("/download?id=7"),
        bundle = server.url("/files/bundle.tar.gz"),
    );
    fs::write(context.join("Dockerfile"), &dockerfile).unwrap();
    let first = build_ok(&root, &context, "urls");
    assert_eq!(step(&first, "ADD --checksum")["cached"], false);
    let listing = run(
        &root,
        "urls",
        "cat /downloads/tool.txt /data/named.txt /reports/report.csv; \
         stat -c '%n %a %u %g %Y' /downloads/tool.txt /data/named.txt /bin-tool",
    );
    assert_eq!(
        listing,
        "tool v1\ndata v1\na,b\n\
         /downloads/tool.txt 600 0 0 1445412480\n\
         /data/named.txt 600 0 0 0\n\
         /bin-tool 744 7 8 1445412480\n"
    );
    // URLs are extracted only when asked to.
    assert_eq!(
        run(&root, "urls", "ls /packed; cat /unpacked/payload/hello.txt"),
        "bundle.tar.gz\nbundled\n"
    );
    let tool_requests = server.requests_of("/files/tool.txt");

    // Unchanged: every ADD is cached. The pinned URL is not fetched again; the other one is
    // (its content is its key) and hits because its content is the same.
    let again = build_ok(&root, &context, "urls");
    for prefix in ["ADD --checksum", "ADD http", "ADD --chmod"] {
        assert_eq!(step(&again, prefix)["cached"], true, "{prefix}: {again:#}");
    }
    assert_eq!(server.requests_of("/files/tool.txt"), tool_requests);
    assert_eq!(server.requests_of("/files/data.txt"), 2);

    // New content behind the same URL: that ADD runs again and names the URL.
    server.serve("/files/data.txt", b"data v2\n", &[]);
    let changed = build_ok(&root, &context, "urls");
    let add = step(&changed, &format!("ADD {}", server.url("/files/data.txt")));
    assert_eq!(add["cached"], false);
    let reason = add["miss_reason"].as_str().unwrap();
    assert!(reason.contains("/files/data.txt"), "{reason}");
    assert_eq!(step(&changed, "ADD --checksum")["cached"], true);
    assert_eq!(run(&root, "urls", "cat /data/named.txt"), "data v2\n");

    // A checksum that does not match: the build fails on that line with both digests, and
    // nothing is written.
    let wrong = "0".repeat(64);
    fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM busybox\nADD --checksum=sha256:{wrong} {} /x/\n",
            server.url("/files/tool.txt")
        ),
    )
    .unwrap();
    let output = build(
        &root,
        &context,
        "mismatch",
        &directory.join("mismatch.json"),
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("Dockerfile:2: ADD --checksum"), "{stderr}");
    assert!(
        stderr.contains(&format!("expected sha256:{wrong}")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("got sha256:{tool_digest}")),
        "{stderr}"
    );
    assert_eq!(
        rbuild(&root, &["inspect", "mismatch"]).status.code(),
        Some(1)
    );
    assert!(
        leftover_scratch(&root).is_empty(),
        "{:?}",
        leftover_scratch(&root)
    );

    // A missing file is an error naming the status.
    fs::write(
        context.join("Dockerfile"),
        format!("FROM busybox\nADD {} /x/\n", server.url("/missing")),
    )
    .unwrap();
    let output = build(&root, &context, "missing", &directory.join("missing.json"));
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("Dockerfile:2: ADD") && stderr.contains("404"),
        "{stderr}"
    );
}

#[test]
fn copy_parents_keeps_parent_directories() {
    let (_directory, context, root) = setup("parents");
    for (path, content) in [
        ("x/a.txt", "xa\n"),
        ("y/a.txt", "ya\n"),
        ("x/y/z/file.txt", "z\n"),
        ("x/b.md", "b\n"),
    ] {
        fs::create_dir_all(context.join(path).parent().unwrap()).unwrap();
        fs::write(context.join(path), content).unwrap();
    }
    fs::set_permissions(context.join("x"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(
        context.join("Dockerfile"),
        "FROM busybox AS build\n\
         RUN mkdir -p /app/bin/sub && echo tool > /app/bin/sub/tool\n\
         FROM busybox\n\
         COPY ./x/a.txt ./y/a.txt /flat/\n\
         COPY --parents ./x/a.txt ./y/a.txt /parents/\n\
         COPY --parents ./x/./y/z /pivot/\n\
         COPY --parents x/*.txt /glob/\n\
         COPY --from=build --parents /app/./bin/sub/tool /stage/\n\
         COPY --from=build --parents /app/bin /whole/\n",
    )
    .unwrap();
    build_ok(&root, &context, "parents");
    let listing = run(
        &root,
        "parents",
        "find /flat /parents /pivot /glob /stage /whole | sort; cat /parents/x/a.txt /parents/y/a.txt; \
         stat -c '%a' /parents/x",
    );
    assert_eq!(
        listing,
        "/flat\n/flat/a.txt\n\
         /glob\n/glob/x\n/glob/x/a.txt\n\
         /parents\n/parents/x\n/parents/x/a.txt\n/parents/y\n/parents/y/a.txt\n\
         /pivot\n/pivot/y\n/pivot/y/z\n/pivot/y/z/file.txt\n\
         /stage\n/stage/bin\n/stage/bin/sub\n/stage/bin/sub/tool\n\
         /whole\n/whole/app\n/whole/app/bin\n/whole/app/bin/sub\n/whole/app/bin/sub/tool\n\
         xa\nya\n750\n"
    );
}

#[test]
fn symbolic_chmod_applies_per_file() {
    let (directory, context, root) = setup("chmod");
    fs::create_dir_all(context.join("tree/sub")).unwrap();
    fs::write(context.join("tree/script.sh"), "#!/bin/sh\n").unwrap();
    fs::write(context.join("tree/data.txt"), "data\n").unwrap();
    fs::write(context.join("tree/sub/inner.txt"), "inner\n").unwrap();
    for (path, mode) in [
        ("tree/script.sh", 0o755),
        ("tree/data.txt", 0o644),
        ("tree/sub", 0o700),
        ("tree/sub/inner.txt", 0o600),
    ] {
        fs::set_permissions(context.join(path), fs::Permissions::from_mode(mode)).unwrap();
    }
    fs::write(
        context.join("Dockerfile"),
        "FROM busybox\n\
         COPY --chmod=a=rX tree /readonly/\n\
         COPY --chmod=u=rwx,go=rx tree/data.txt /spelled\n\
         COPY --chmod=go-w,u+x tree/data.txt /changed\n\
         COPY --chmod=0640 tree/data.txt /octal\n",
    )
    .unwrap();
    build_ok(&root, &context, "chmod");
    let modes = run(
        &root,
        "chmod",
        "stat -c '%n %a' /readonly/script.sh /readonly/data.txt /readonly/sub /readonly/sub/inner.txt /spelled /changed /octal",
    );
    assert_eq!(
        modes,
        "/readonly/script.sh 555\n/readonly/data.txt 444\n/readonly/sub 555\n/readonly/sub/inner.txt 444\n\
         /spelled 755\n/changed 744\n/octal 640\n"
    );

    fs::write(
        context.join("Dockerfile"),
        "FROM busybox\nCOPY --chmod=u+q tree/data.txt /bad\n",
    )
    .unwrap();
    let output = build(&root, &context, "bad", &directory.join("bad.json"));
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("Dockerfile:2: COPY --chmod=u+q tree/data.txt /bad")
            && stderr.contains("--chmod=u+q"),
        "{stderr}"
    );
}

#[test]
fn link_changes_nothing_and_add_honours_exclude() {
    let (_directory, context, root) = setup("link");
    archive_context(&context, "linked\n");
    fs::create_dir_all(context.join("docs/guide")).unwrap();
    fs::write(context.join("docs/index.html"), "<p>\n").unwrap();
    fs::write(context.join("docs/README.md"), "readme\n").unwrap();
    fs::write(context.join("docs/guide/intro.md"), "intro\n").unwrap();
    fs::write(context.join("docs/guide/intro.txt"), "intro\n").unwrap();
    let steps = "ADD --exclude=**/*.md docs /out/docs/\n\
                 ADD gz.tar.gz /out/archive/\n\
                 COPY --chmod=go-rwx docs/index.html /out/private.html\n\
                 COPY --parents docs/guide/intro.txt /out/parents/\n";
    let describe = "find /out | sort | while read -r path; do \
                    stat -c '%n %a %u %g %s' \"$path\"; done; cat /out/archive/payload/hello.txt";
    fs::write(context.join("Dockerfile"), format!("FROM busybox\n{steps}")).unwrap();
    build_ok(&root, &context, "unlinked");
    let unlinked = run(&root, "unlinked", describe);

    let linked_steps: String = steps
        .lines()
        .map(|line| line.replacen(' ', " --link ", 1) + "\n")
        .collect();
    fs::write(
        context.join("Dockerfile"),
        format!("FROM busybox\n{linked_steps}"),
    )
    .unwrap();
    build_ok(&root, &context, "linked");
    let linked = run(&root, "linked", describe);
    assert_eq!(linked, unlinked);
    assert!(!unlinked.contains(".md"), "{unlinked}");
    assert!(
        unlinked.contains("/out/docs/guide/intro.txt 644"),
        "{unlinked}"
    );
    assert!(unlinked.contains("/out/private.html 600"), "{unlinked}");
    assert!(unlinked.ends_with("linked\n"), "{unlinked}");
}

/// A rebuild after an edit links the COPY's unchanged files from its last snapshot rather
/// than copying them, and never links one whose content changed, even when its size and
/// modification time did not; a changed instruction links nothing.
#[test]
fn copy_links_unchanged_files_from_its_last_snapshot_and_only_those() {
    let (directory, context, root) = setup("copy-reuse");
    fs::write(
        context.join("Dockerfile"),
        "FROM busybox\nCOPY files /app\n",
    )
    .unwrap();
    let files = context.join("files");
    fs::create_dir_all(files.join("sub")).unwrap();
    fs::write(files.join("kept"), "unchanged content\n").unwrap();
    fs::write(files.join("sub/edited"), "first version\n").unwrap();
    fs::set_permissions(files.join("kept"), fs::Permissions::from_mode(0o640)).unwrap();
    build_ok(&root, &context, "reuse:1");
    let first = diff_ids(&root, "reuse:1").pop().unwrap();
    let snapshot = |diff_id: &str| {
        root.join("v1/snapshots")
            .join(diff_id.trim_start_matches("sha256:"))
    };
    let inode = |path: PathBuf| {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&path)
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
            .ino()
    };

    // Same length, and the old modification time put back: only the content differs.
    let edited = files.join("sub/edited");
    let modified = fs::metadata(&edited).unwrap().modified().unwrap();
    fs::write(&edited, "other version\n").unwrap();
    fs::File::options()
        .write(true)
        .open(&edited)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    let metadata = build_ok(&root, &context, "reuse:2");
    assert_eq!(step(&metadata, "COPY")["cached"], false);
    let second = diff_ids(&root, "reuse:2").pop().unwrap();
    assert_ne!(first, second);
    assert_eq!(
        inode(snapshot(&second).join("app/kept")),
        inode(snapshot(&first).join("app/kept")),
        "the unchanged file is linked from the previous snapshot"
    );
    assert_ne!(
        inode(snapshot(&second).join("app/sub/edited")),
        inode(snapshot(&first).join("app/sub/edited"))
    );
    assert_eq!(
        run(
            &root,
            "reuse:2",
            "cat /app/kept /app/sub/edited; stat -c %a /app/kept"
        ),
        "unchanged content\nother version\n640\n"
    );

    // The layer is exactly what a build without any earlier snapshot makes.
    let fresh = directory.join("fresh-root");
    import_busybox(&fresh, "busybox:latest");
    build_ok(&fresh, &context, "reuse:2");
    assert_eq!(diff_ids(&fresh, "reuse:2").pop().unwrap(), second);

    // Another instruction (another destination) copies afresh.
    fs::write(
        context.join("Dockerfile"),
        "FROM busybox\nCOPY files /srv\n",
    )
    .unwrap();
    build_ok(&root, &context, "reuse:3");
    let third = diff_ids(&root, "reuse:3").pop().unwrap();
    assert_ne!(
        inode(snapshot(&third).join("srv/kept")),
        inode(snapshot(&second).join("app/kept"))
    );
    assert_eq!(
        run(&root, "reuse:3", "cat /srv/kept"),
        "unchanged content\n"
    );
}
