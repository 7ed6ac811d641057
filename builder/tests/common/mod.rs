//! Helpers shared by the end-to-end tests: temp directories, running the real `rbuild`
//! binary, and the busybox rootfs tarball made by `testdata/busybox-rootfs.sh`.
#![allow(dead_code)] // each test binary uses its own subset

pub mod registry;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// A temp directory removed when dropped.
pub struct TempDirectory(pub PathBuf);

impl TempDirectory {
    /// A fresh directory named after the test binary, `name` and this process.
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("rbuild-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("temp directory");
        Self(path)
    }

    /// A path inside.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDirectory {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `rbuild --root ROOT ARGUMENTS...` with no stdin and no SOURCE_DATE_EPOCH.
pub fn rbuild(root: &Path, arguments: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rbuild"))
        .arg("--root")
        .arg(root)
        .args(arguments)
        .env_remove("SOURCE_DATE_EPOCH")
        .stdin(Stdio::null())
        .output()
        .expect("rbuild runs")
}

/// Bytes as text, lossily.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts the command succeeded and returns its stdout.
#[track_caller]
pub fn succeeds(output: Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// Runs a real tool that CI installs and returns its stdout.
#[track_caller]
pub fn tool(program: &str, arguments: &[&str]) -> String {
    let output = Command::new(program)
        .args(arguments)
        .output()
        .unwrap_or_else(|error| {
            panic!("{program} must be installed (CI installs it with apt-get): {error}")
        });
    assert!(
        output.status.success(),
        "{program} {arguments:?} failed: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// The busybox rootfs tarball, made once per test binary by `testdata/busybox-rootfs.sh`.
pub fn busybox_tar() -> &'static Path {
    static TAR: OnceLock<PathBuf> = OnceLock::new();
    TAR.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("rbuild-test-busybox-{}.tar", std::process::id()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/busybox-rootfs.sh");
        tool("sh", &[script.to_str().unwrap(), path.to_str().unwrap()]);
        path
    })
}

/// `rbuild import` of the busybox tarball as `name`; returns the manifest digest.
pub fn import_busybox(root: &Path, name: &str) -> String {
    succeeds(rbuild(
        root,
        &["import", busybox_tar().to_str().unwrap(), name],
    ))
    .trim()
    .to_string()
}

/// `rbuild inspect NAME` as JSON.
pub fn inspect(root: &Path, name: &str) -> serde_json::Value {
    serde_json::from_str(&succeeds(rbuild(root, &["inspect", name]))).expect("inspect prints JSON")
}

/// The sha256 of some bytes, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A copy of `testdata/demo` that a test may edit (`DIRECTORY/demo`), and a root
/// (`DIRECTORY/root`) with busybox imported.
pub fn demo_context(directory: &TempDirectory) -> (PathBuf, PathBuf) {
    let context = directory.join("demo");
    let status = Command::new("cp")
        .arg("-a")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/demo"))
        .arg(&context)
        .status()
        .expect("cp runs");
    assert!(status.success());
    let root = directory.join("root");
    succeeds(rbuild(
        &root,
        &["import", busybox_tar().to_str().unwrap(), "busybox:latest"],
    ));
    (context, root)
}

/// The diff ids of an image's layers, base first, as `rbuild inspect` shows them.
pub fn diff_ids(root: &Path, image: &str) -> Vec<String> {
    inspect(root, image)["rootfs"]["diff_ids"]
        .as_array()
        .expect("rootfs.diff_ids")
        .iter()
        .map(|id| id.as_str().expect("a diff id").to_string())
        .collect()
}
