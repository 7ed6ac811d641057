//! Registries with and without authentication: the test harness itself (checked with skopeo),
//! rbuild's `Authenticator` against distribution's token and htpasswd auth, and `rbuild login`
//! / `logout`.

mod common;

use common::registry::{Direction, DroppingProxy, Registry};
use common::*;

use std::io::Read;
use std::path::{Path, PathBuf};

/// An OCI archive of busybox written by `rbuild save`, for skopeo to push.
fn busybox_archive(directory: &TempDirectory) -> PathBuf {
    let root = directory.join("root");
    import_busybox(&root, "busybox:latest");
    let archive = directory.join("busybox.tar");
    succeeds(rbuild(
        &root,
        &["save", "-o", archive.to_str().unwrap(), "busybox:latest"],
    ));
    archive
}

/// `skopeo copy oci-archive:ARCHIVE docker://ADDRESS/REPOSITORY` with these extra arguments.
fn skopeo_push(archive: &Path, destination: &str, extra: &[&str]) -> std::process::Output {
    std::process::Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .args(extra)
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("docker://{destination}"))
        .output()
        .expect("skopeo must be installed (CI installs it with apt-get)")
}

/// The layer digests (hex) of a manifest skopeo reads from the registry.
fn skopeo_layers(reference: &str, extra: &[&str]) -> Vec<String> {
    let mut arguments = vec!["inspect", "--tls-verify=false"];
    arguments.extend_from_slice(extra);
    let reference = format!("docker://{reference}");
    arguments.push(&reference);
    let inspected: serde_json::Value =
        serde_json::from_str(&tool("skopeo", &arguments)).expect("skopeo prints JSON");
    inspected["Layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|layer| {
            layer
                .as_str()
                .unwrap()
                .strip_prefix("sha256:")
                .unwrap()
                .to_string()
        })
        .collect()
}

/// A raw HTTP/1.0 GET through `address`; returns the bytes read before the connection closed.
fn raw_get(address: &str, path: &str) -> Vec<u8> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    response
}

fn body(response: &[u8]) -> &[u8] {
    let split = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("an HTTP head");
    &response[split + 4..]
}

#[test]
fn harness_open_registry_takes_a_skopeo_push_and_corrupt_blob_makes_it_lie() {
    let directory = TempDirectory::new("harness-open");
    let archive = busybox_archive(&directory);
    let registry = Registry::open();
    let reference = format!("{}/test/busybox:1", registry.address());
    succeeds(skopeo_push(&archive, &reference, &[]));
    let layers = skopeo_layers(&reference, &[]);
    assert_eq!(layers.len(), 1);
    let layer = &layers[0];
    let path = format!("/v2/test/busybox/blobs/sha256:{layer}");
    assert_eq!(
        sha256_hex(body(&raw_get(&registry.address(), &path))),
        *layer
    );

    registry.corrupt_blob(layer);
    let served = raw_get(&registry.address(), &path);
    assert_ne!(sha256_hex(body(&served)), *layer, "the blob now lies");
    assert_eq!(
        body(&served).len() as u64,
        std::fs::metadata(registry.blob_path(layer)).unwrap().len()
    );
}

#[test]
fn harness_token_registry_admits_skopeo_with_the_right_password_only() {
    let directory = TempDirectory::new("harness-token");
    let archive = busybox_archive(&directory);
    let registry = Registry::with_token_auth("alice", "wonderland");
    let reference = format!("{}/private/busybox:1", registry.address());

    let wrong = skopeo_push(
        &archive,
        &reference,
        &["--dest-creds", "alice:looking-glass"],
    );
    assert!(!wrong.status.success(), "a wrong password is refused");
    assert!(registry.tokens_refused() >= 1);

    let anonymous = skopeo_push(&archive, &reference, &[]);
    assert!(
        !anonymous.status.success(),
        "anonymous pushes are refused: {}",
        text(&anonymous.stderr)
    );

    succeeds(skopeo_push(
        &archive,
        &reference,
        &["--dest-creds", "alice:wonderland"],
    ));
    assert!(registry.tokens_issued() >= 1);
    let layers = skopeo_layers(&reference, &["--creds", "alice:wonderland"]);
    assert_eq!(layers.len(), 1);
}

#[test]
fn harness_basic_registry_admits_skopeo_with_the_right_password_only() {
    let directory = TempDirectory::new("harness-basic");
    let archive = busybox_archive(&directory);
    let registry = Registry::with_basic_auth("bob", "builder");
    let reference = format!("{}/private/busybox:1", registry.address());
    assert!(
        !skopeo_push(&archive, &reference, &["--dest-creds", "bob:wrong"])
            .status
            .success()
    );
    assert!(!skopeo_push(&archive, &reference, &[]).status.success());
    succeeds(skopeo_push(
        &archive,
        &reference,
        &["--dest-creds", "bob:builder"],
    ));
    assert_eq!(
        skopeo_layers(&reference, &["--creds", "bob:builder"]).len(),
        1
    );
}

#[test]
fn harness_dropping_proxy_cuts_the_first_download_only() {
    let directory = TempDirectory::new("harness-proxy");
    let archive = busybox_archive(&directory);
    let registry = Registry::open();
    let reference = format!("{}/test/busybox:1", registry.address());
    succeeds(skopeo_push(&archive, &reference, &[]));
    let layer = skopeo_layers(&reference, &[]).remove(0);
    let path = format!("/v2/test/busybox/blobs/sha256:{layer}");
    let whole = raw_get(&registry.address(), &path);

    let proxy = DroppingProxy::start(&registry.address(), Direction::Download, 1000);
    let cut = raw_get(&proxy.address(), &path);
    assert_eq!(cut.len(), 1000, "the first download stops at the limit");
    assert_eq!(proxy.drops(), 1);
    let again = raw_get(&proxy.address(), &path);
    assert_eq!(sha256_hex(body(&again)), layer, "later connections pass");
    assert_eq!(again.len(), whole.len());
    assert_eq!(proxy.drops(), 1);
}

#[test]
fn harness_dropping_proxy_cuts_the_first_upload_only() {
    let directory = TempDirectory::new("harness-proxy-upload");
    let archive = busybox_archive(&directory);
    let registry = Registry::open();
    let proxy = DroppingProxy::start(&registry.address(), Direction::Upload, 100_000);
    let reference = format!("{}/test/busybox:1", proxy.address());
    let first = skopeo_push(&archive, &reference, &["--retry-times", "0"]);
    assert!(!first.status.success(), "the cut upload fails");
    assert_eq!(proxy.drops(), 1);
    succeeds(skopeo_push(&archive, &reference, &[]));
    assert_eq!(proxy.drops(), 1);
    assert_eq!(
        skopeo_layers(&format!("{}/test/busybox:1", registry.address()), &[]).len(),
        1
    );
}
