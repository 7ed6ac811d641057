//! Registries with and without authentication: the test harness itself (checked with skopeo),
//! rbuild's `Authenticator` against distribution's token and htpasswd auth, and `rbuild login`
//! / `logout`.

mod common;

use common::registry::{Direction, DroppingProxy, Registry, docker_config};
use common::*;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rbuild_builder::registry::auth::{self, AuthError, Authenticator, Credentials};

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

#[test]
fn harness_dropping_proxy_cuts_before_the_second_request_of_a_connection_once() {
    let registry = Registry::open();
    let proxy = DroppingProxy::cut_before(&registry.address(), b"GET ", 2);
    let address = proxy.address();
    // Two requests on one keep-alive connection: the first is answered, the second never
    // reaches the registry and the connection ends.
    let mut stream = std::net::TcpStream::connect(&address).expect("connect");
    let request = format!("GET /v2/ HTTP/1.1\r\nHost: {address}\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let _ = stream.write_all(request.as_bytes());
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert_eq!(
        String::from_utf8_lossy(&rest).matches("HTTP/1.1").count(),
        0,
        "no second response: {}",
        String::from_utf8_lossy(&rest)
    );
    assert_eq!(proxy.drops(), 1);
    // Later requests pass.
    let again = raw_get(&address, "/v2/");
    assert!(again.starts_with(b"HTTP/1.0 200"), "{again:?}");
    assert!(raw_get(&address, "/v2/").starts_with(b"HTTP/1.0 200"));
    assert_eq!(proxy.drops(), 1);
}

// --- rbuild login and logout ---

/// `rbuild ARGUMENTS...` with `DOCKER_CONFIG` (never the real home) and `stdin` as input.
fn rbuild_with_config(docker_config: &Path, arguments: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rbuild"))
        .args(arguments)
        .env("DOCKER_CONFIG", docker_config)
        .env_remove("HOME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rbuild runs");
    // A usage error exits before reading its input: a closed pipe here is not a failure.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().expect("rbuild runs")
}

fn read_config(docker_config: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(docker_config.join("config.json")).unwrap()).unwrap()
}

#[test]
fn login_with_the_right_password_keeps_the_credentials_and_other_keys() {
    let directory = TempDirectory::new("login-right");
    let registry = Registry::with_token_auth("alice", "wonderland");
    let docker_config = directory.join("docker");
    std::fs::create_dir_all(&docker_config).unwrap();
    std::fs::write(
        docker_config.join("config.json"),
        r#"{"auths": {"other.example": {"auth": "b3RoZXI6b3RoZXI="}}, "psFormat": "table"}"#,
    )
    .unwrap();
    let output = rbuild_with_config(
        &docker_config,
        &[
            "login",
            "-u",
            "alice",
            "--password-stdin",
            &registry.address(),
        ],
        "wonderland\n",
    );
    assert_eq!(succeeds(output).trim(), "Login Succeeded");
    assert!(registry.tokens_issued() >= 1, "the password was checked");

    let config = read_config(&docker_config);
    assert_eq!(
        config["auths"][registry.address()]["auth"],
        STANDARD.encode("alice:wonderland")
    );
    assert_eq!(config["auths"]["other.example"]["auth"], "b3RoZXI6b3RoZXI=");
    assert_eq!(config["psFormat"], "table");
    let mode = std::fs::metadata(docker_config.join("config.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        auth::credentials_in(&docker_config.join("config.json"), &registry.address()).unwrap(),
        Some(Credentials {
            username: "alice".to_string(),
            password: "wonderland".to_string()
        })
    );
}

#[test]
fn login_with_a_wrong_password_exits_1_and_writes_nothing() {
    let directory = TempDirectory::new("login-wrong");
    let registry = Registry::with_token_auth("alice", "wonderland");
    let docker_config = directory.join("docker");
    // No config yet: none may appear.
    let output = rbuild_with_config(
        &docker_config,
        &[
            "login",
            "-u",
            "alice",
            "-p",
            "looking-glass",
            &registry.address(),
        ],
        "",
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "error: login to {} failed: wrong user name or password",
            registry.address()
        )),
        "{stderr}"
    );
    assert!(!text(&output.stdout).contains("Login Succeeded"));
    assert!(!docker_config.exists());
    assert_eq!(registry.tokens_refused(), 1);

    // An existing config is left byte for byte.
    std::fs::create_dir_all(&docker_config).unwrap();
    let before = r#"{"auths":{}}"#;
    std::fs::write(docker_config.join("config.json"), before).unwrap();
    let output = rbuild_with_config(
        &docker_config,
        &[
            "login",
            "-u",
            "alice",
            "--password-stdin",
            &registry.address(),
        ],
        "looking-glass",
    );
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        std::fs::read_to_string(docker_config.join("config.json")).unwrap(),
        before
    );
}

#[test]
fn login_to_an_htpasswd_registry_and_logout() {
    let directory = TempDirectory::new("login-basic");
    let registry = Registry::with_basic_auth("bob", "builder");
    let docker_config = directory.join("docker");
    let wrong = rbuild_with_config(
        &docker_config,
        &[
            "login",
            "-u",
            "bob",
            "--password-stdin",
            &registry.address(),
        ],
        "wrong",
    );
    assert_eq!(wrong.status.code(), Some(1));
    assert!(text(&wrong.stderr).contains("wrong user name or password"));
    assert!(!docker_config.join("config.json").exists());

    let right = rbuild_with_config(
        &docker_config,
        &[
            "login",
            "-u",
            "bob",
            "--password-stdin",
            &registry.address(),
        ],
        "builder",
    );
    assert_eq!(succeeds(right).trim(), "Login Succeeded");
    assert_eq!(
        read_config(&docker_config)["auths"][registry.address()]["auth"],
        STANDARD.encode("bob:builder")
    );

    let output = rbuild_with_config(&docker_config, &["logout", &registry.address()], "");
    assert_eq!(
        succeeds(output).trim(),
        format!("Removing login credentials for {}", registry.address())
    );
    assert_eq!(read_config(&docker_config)["auths"], serde_json::json!({}));
    let output = rbuild_with_config(&docker_config, &["logout", &registry.address()], "");
    assert_eq!(
        succeeds(output).trim(),
        format!("Not logged in to {}", registry.address())
    );
}

#[test]
fn logout_removes_only_that_registry() {
    let directory = TempDirectory::new("logout");
    let docker_config = docker_config(&directory.join("docker"), "127.0.0.1:5999", "a", "b");
    let mut config = read_config(&docker_config);
    config["auths"]["https://index.docker.io/v1/"] = serde_json::json!({"auth": "eDp5"});
    std::fs::write(docker_config.join("config.json"), config.to_string()).unwrap();

    succeeds(rbuild_with_config(&docker_config, &["logout"], ""));
    let config = read_config(&docker_config);
    assert!(config["auths"].get("https://index.docker.io/v1/").is_none());
    assert!(config["auths"].get("127.0.0.1:5999").is_some());
}

#[test]
fn login_usage_errors() {
    let directory = TempDirectory::new("login-usage");
    let docker_config = directory.join("docker");
    let output = rbuild_with_config(
        &docker_config,
        &["login", "--password-stdin", "127.0.0.1:1"],
        "x",
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("--password-stdin needs --username"));
    let output = rbuild_with_config(
        &docker_config,
        &[
            "login",
            "-u",
            "a",
            "-p",
            "b",
            "--password-stdin",
            "127.0.0.1:1",
        ],
        "",
    );
    assert_eq!(output.status.code(), Some(2));
    let output = rbuild_with_config(
        &docker_config,
        &["login", "-u", "a", "--password-stdin", "127.0.0.1:1"],
        "\n",
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("the password is empty"));
    assert!(!docker_config.exists());
}

// --- the Authenticator against real registries ---

/// A request the way the distribution client makes it: the known header for `scope` if any; on
/// 401, the answer to the challenge, once. Returns the final status.
fn authorized(
    http: &reqwest::blocking::Client,
    authenticator: &Authenticator,
    method: reqwest::Method,
    url: &str,
    scope: &str,
) -> Result<reqwest::StatusCode, AuthError> {
    let send = |header: Option<String>| {
        let request = http.request(method.clone(), url);
        match header {
            Some(header) => request.header(reqwest::header::AUTHORIZATION, header),
            None => request,
        }
        .send()
        .expect("the registry answers")
    };
    let response = send(authenticator.header(&[scope]));
    if response.status() != reqwest::StatusCode::UNAUTHORIZED {
        return Ok(response.status());
    }
    let challenge = response
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .expect("a 401 has a challenge")
        .to_str()
        .unwrap()
        .to_string();
    let header = authenticator.answer(http, &challenge, &[scope])?;
    Ok(send(Some(header)).status())
}

fn alice() -> Option<Credentials> {
    Some(Credentials {
        username: "alice".to_string(),
        password: "wonderland".to_string(),
    })
}

#[test]
fn authenticator_gets_tokens_the_registry_accepts_and_reuses_them_per_scope() {
    let registry = Registry::with_token_auth("alice", "wonderland");
    let http = reqwest::blocking::Client::new();
    let base = format!("http://{}", registry.address());
    let authenticator = Authenticator::new(&registry.address(), alice());

    // The catalog needs its own scope; the registry accepts the token (200, an empty list).
    let status = authorized(
        &http,
        &authenticator,
        reqwest::Method::GET,
        &format!("{base}/v2/_catalog"),
        "registry:catalog:*",
    )
    .unwrap();
    assert_eq!(status, reqwest::StatusCode::OK);
    assert_eq!(registry.tokens_issued(), 1);

    // A manifest HEAD: past authorization the registry says the manifest is unknown (404),
    // not 401.
    let manifest = format!("{base}/v2/team/app/manifests/latest");
    let push_scope = "repository:team/app:pull,push";
    let status = authorized(
        &http,
        &authenticator,
        reqwest::Method::HEAD,
        &manifest,
        push_scope,
    )
    .unwrap();
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND);
    assert_eq!(registry.tokens_issued(), 2);

    // Cached: the same scope, and a pull of the same repository, need no new token.
    for scope in [push_scope, "repository:team/app:pull"] {
        assert!(authenticator.header(&[scope]).is_some(), "{scope}");
        let status = authorized(
            &http,
            &authenticator,
            reqwest::Method::HEAD,
            &manifest,
            scope,
        )
        .unwrap();
        assert_eq!(status, reqwest::StatusCode::NOT_FOUND);
    }
    assert_eq!(registry.tokens_issued(), 2);

    // Another repository is another scope: a new token.
    assert!(
        authenticator
            .header(&["repository:team/other:pull"])
            .is_none()
    );
    let status = authorized(
        &http,
        &authenticator,
        reqwest::Method::HEAD,
        &format!("{base}/v2/team/other/manifests/latest"),
        "repository:team/other:pull",
    )
    .unwrap();
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND);
    assert_eq!(registry.tokens_issued(), 3);
}

#[test]
fn authenticator_is_shared_by_threads() {
    let registry = Registry::with_token_auth("alice", "wonderland");
    let http = reqwest::blocking::Client::new();
    let authenticator = Authenticator::new(&registry.address(), alice());
    let manifest = format!("http://{}/v2/shared/manifests/latest", registry.address());
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                let status = authorized(
                    &http,
                    &authenticator,
                    reqwest::Method::HEAD,
                    &manifest,
                    "repository:shared:pull",
                )
                .unwrap();
                assert_eq!(status, reqwest::StatusCode::NOT_FOUND);
            });
        }
    });
    assert!(authenticator.header(&["repository:shared:pull"]).is_some());
}

#[test]
fn authenticator_anonymous_gets_no_access_and_a_wrong_password_is_refused() {
    let registry = Registry::with_token_auth("alice", "wonderland");
    let http = reqwest::blocking::Client::new();
    let manifest = format!("http://{}/v2/team/app/manifests/latest", registry.address());

    let anonymous = Authenticator::new(&registry.address(), None);
    let status = authorized(
        &http,
        &anonymous,
        reqwest::Method::HEAD,
        &manifest,
        "repository:team/app:pull",
    )
    .unwrap();
    assert_eq!(
        status,
        reqwest::StatusCode::UNAUTHORIZED,
        "an anonymous token has no access"
    );

    let wrong = Authenticator::new(
        &registry.address(),
        Some(Credentials {
            username: "alice".to_string(),
            password: "looking-glass".to_string(),
        }),
    );
    let error = authorized(
        &http,
        &wrong,
        reqwest::Method::HEAD,
        &manifest,
        "repository:team/app:pull",
    )
    .unwrap_err();
    assert!(matches!(error, AuthError::Refused { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("refused the credentials of alice"),
        "{error}"
    );
    assert!(wrong.header(&["repository:team/app:pull"]).is_none());
}

#[test]
fn authenticator_with_an_identity_token_uses_the_oauth2_refresh_grant() {
    let registry = Registry::with_token_auth("alice", "wonderland");
    let http = reqwest::blocking::Client::new();
    let manifest = format!("http://{}/v2/team/app/manifests/latest", registry.address());
    let token = |password: String| {
        Authenticator::new(
            &registry.address(),
            Some(Credentials {
                username: auth::IDENTITY_TOKEN_USERNAME.to_string(),
                password,
            }),
        )
    };
    let valid = token(registry.refresh_token().unwrap());
    let status = authorized(
        &http,
        &valid,
        reqwest::Method::HEAD,
        &manifest,
        "repository:team/app:pull",
    )
    .unwrap();
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND);

    let invalid = token("not-a-refresh-token".to_string());
    let error = authorized(
        &http,
        &invalid,
        reqwest::Method::HEAD,
        &manifest,
        "repository:team/app:pull",
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("refused the identity token"),
        "{error}"
    );
}

#[test]
fn authenticator_answers_htpasswd_with_basic_credentials_from_the_docker_config() {
    let directory = TempDirectory::new("authenticator-basic");
    let registry = Registry::with_basic_auth("bob", "builder");
    let docker_config = docker_config(
        &directory.join("docker"),
        &registry.address(),
        "bob",
        "builder",
    );
    let credentials =
        auth::credentials_in(&docker_config.join("config.json"), &registry.address()).unwrap();
    assert!(credentials.is_some());
    let http = reqwest::blocking::Client::new();
    let authenticator = Authenticator::new(&registry.address(), credentials);
    let catalog = format!("http://{}/v2/_catalog", registry.address());
    let status = authorized(
        &http,
        &authenticator,
        reqwest::Method::GET,
        &catalog,
        "registry:catalog:*",
    )
    .unwrap();
    assert_eq!(status, reqwest::StatusCode::OK);
    // From now on every request carries the credentials without a 401 first.
    let header = authenticator.header(&["repository:any:pull"]).unwrap();
    let status = http
        .get(&catalog)
        .header(reqwest::header::AUTHORIZATION, header)
        .send()
        .unwrap()
        .status();
    assert_eq!(status, reqwest::StatusCode::OK);

    let anonymous = Authenticator::new(&registry.address(), None);
    let error = authorized(
        &http,
        &anonymous,
        reqwest::Method::GET,
        &catalog,
        "registry:catalog:*",
    )
    .unwrap_err();
    assert!(
        matches!(error, AuthError::CredentialsNeeded { .. }),
        "{error}"
    );
}

// --- cross-repository mounts under token auth ---

#[test]
fn a_push_to_another_repository_mounts_every_blob_with_a_token_for_both_repositories() {
    let directory = TempDirectory::new("mount-token");
    let registry = Registry::with_token_auth("alice", "wonderland");
    let docker_config = docker_config(
        &directory.join("docker"),
        &registry.address(),
        "alice",
        "wonderland",
    );
    let root = directory.join("root");
    let root_text = root.to_str().unwrap();
    let one = format!("{}/a/one:v1", registry.address());
    let two = format!("{}/b/two:v1", registry.address());
    let digest = import_busybox(&root, &one);

    let output = rbuild_with_config(&docker_config, &["--root", root_text, "push", &one], "");
    let stderr = text(&output.stderr);
    assert_eq!(succeeds(output).trim(), digest, "{stderr}");
    assert_eq!(stderr.matches("pushing sha256:").count(), 2, "{stderr}");

    // The root knows a/one holds the blobs: b/two mounts them all and uploads nothing.
    succeeds(rbuild(&root, &["tag", &one, &two]));
    let before = registry.token_scopes().len();
    let output = rbuild_with_config(&docker_config, &["--root", root_text, "push", &two], "");
    let stderr = text(&output.stderr);
    assert_eq!(succeeds(output).trim(), digest, "{stderr}");
    assert_eq!(
        stderr.matches("mounted sha256:").count(),
        2,
        "config and layer are mounted: {stderr}"
    );
    assert!(stderr.contains("from a/one"), "{stderr}");
    assert!(!stderr.contains("pushing"), "{stderr}");

    // The mounts' token was asked for with both scopes in one request (by each upload thread
    // that needed it before another had it cached); the other requests asked for b/two's
    // push scope alone, as before.
    let requests = registry.token_scopes()[before..].to_vec();
    let push = vec!["repository:b/two:pull,push".to_string()];
    let mount = vec![
        "repository:a/one:pull".to_string(),
        "repository:b/two:pull,push".to_string(),
    ];
    assert!(requests.contains(&mount), "{requests:?}");
    assert!(requests.contains(&push), "{requests:?}");
    assert!(
        requests
            .iter()
            .all(|scopes| *scopes == push || *scopes == mount),
        "{requests:?}"
    );
    assert_eq!(
        skopeo_layers(&two, &["--creds", "alice:wonderland"]),
        skopeo_layers(&one, &["--creds", "alice:wonderland"])
    );

    // Credentials that may not read the sources: the registry refuses the mounts (401), and
    // the blobs are uploaded instead.
    registry.deny_repository("a/one");
    registry.deny_repository("b/two");
    let three = format!("{}/c/three:v1", registry.address());
    succeeds(rbuild(&root, &["tag", &one, &three]));
    let output = rbuild_with_config(&docker_config, &["--root", root_text, "push", &three], "");
    let stderr = text(&output.stderr);
    assert_eq!(succeeds(output).trim(), digest, "{stderr}");
    // Each blob is offered from both repositories the root knows, a/one and b/two.
    assert_eq!(
        stderr.matches("cannot mount sha256:").count(),
        4,
        "{stderr}"
    );
    assert_eq!(stderr.matches("pushing sha256:").count(), 2, "{stderr}");
    assert!(!stderr.contains("mounted"), "{stderr}");
}

// --- credential helpers ---

/// A Docker credential helper for the tests, installed under several names: it keeps each
/// server's JSON in `DIRECTORY/store-NAME/SERVER` and appends `PROGRAM VERB INPUT` to
/// `DIRECTORY/calls.log` for every call.
const HELPER_SCRIPT: &str = r#"#!/bin/sh
directory=$(dirname "$0")
program=$(basename "$0")
store="$directory/store-${program#docker-credential-}"
input=$(cat)
echo "$program $1 $input" >> "$directory/calls.log"
file_of() { echo "$store/$(printf %s "$1" | tr -c 'A-Za-z0-9' _)"; }
case "$1" in
get)
    file=$(file_of "$input")
    if [ -f "$file" ]; then cat "$file"; else echo "credentials not found in native keychain"; exit 1; fi ;;
store)
    server=$(printf %s "$input" | sed -n 's/.*"ServerURL" *: *"\([^"]*\)".*/\1/p')
    mkdir -p "$store"
    printf %s "$input" > "$(file_of "$server")" ;;
erase)
    file=$(file_of "$input")
    if [ -f "$file" ]; then rm "$file"; else echo "credentials not found in native keychain"; exit 1; fi ;;
*)
    echo "unknown verb $1" >&2; exit 2 ;;
esac
"#;

/// A directory of credential helpers to put first on PATH: `right`, `wrong` and `empty` run
/// [`HELPER_SCRIPT`]; `broken` prints something that is not JSON; `failing` fails.
struct Helpers {
    bin: PathBuf,
}

impl Helpers {
    fn new(directory: &TempDirectory) -> Helpers {
        let bin = directory.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let install = |name: &str, script: &str| {
            let path = bin.join(format!("docker-credential-{name}"));
            std::fs::write(&path, script).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        for name in ["right", "wrong", "empty"] {
            install(name, HELPER_SCRIPT);
        }
        install(
            "broken",
            "#!/bin/sh\ncat > /dev/null\necho 'Username: bob'\n",
        );
        install(
            "failing",
            "#!/bin/sh\ncat > /dev/null\necho 'the keychain is locked'\nexit 1\n",
        );
        Helpers { bin }
    }

    /// Puts credentials for `server` into helper `name`'s store, as its `store` would.
    fn seed(&self, name: &str, server: &str, user: &str, secret: &str) {
        let store = self.bin.join(format!("store-{name}"));
        std::fs::create_dir_all(&store).unwrap();
        let file: String = server
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let json = serde_json::json!({"ServerURL": server, "Username": user, "Secret": secret});
        std::fs::write(store.join(file), json.to_string()).unwrap();
    }

    /// What helper `name` keeps for `server`, if anything.
    fn stored(&self, name: &str, server: &str) -> Option<serde_json::Value> {
        let file: String = server
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let bytes = std::fs::read(self.bin.join(format!("store-{name}")).join(file)).ok()?;
        Some(serde_json::from_slice(&bytes).unwrap())
    }

    /// The calls so far (`docker-credential-NAME VERB INPUT`), and forgets them.
    fn take_calls(&self) -> Vec<String> {
        let path = self.bin.join("calls.log");
        let calls = std::fs::read_to_string(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        calls.lines().map(str::to_string).collect()
    }

    /// `rbuild ARGUMENTS...` with the helpers first on PATH, `DOCKER_CONFIG` (no HOME) and
    /// `stdin` as input.
    fn rbuild(&self, docker_config: &Path, arguments: &[&str], stdin: &str) -> Output {
        let path = format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_rbuild"))
            .args(arguments)
            .env("DOCKER_CONFIG", docker_config)
            .env("PATH", path)
            .env_remove("HOME")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("rbuild runs");
        let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
        child.wait_with_output().expect("rbuild runs")
    }
}

/// Writes `DIRECTORY/config.json` with `config`; returns `DIRECTORY`.
fn write_docker_config(directory: &Path, config: serde_json::Value) -> PathBuf {
    std::fs::create_dir_all(directory).unwrap();
    std::fs::write(directory.join("config.json"), config.to_string()).unwrap();
    directory.to_path_buf()
}

#[test]
fn pull_and_push_take_credentials_from_the_helper_the_config_names_in_dockers_order() {
    let directory = TempDirectory::new("helpers-get");
    let helpers = Helpers::new(&directory);
    let registry = Registry::with_basic_auth("bob", "builder");
    let host = registry.address();
    let wrong_auth = serde_json::json!({"auth": STANDARD.encode("bob:wrong")});
    helpers.seed("right", &host, "bob", "builder");
    helpers.seed("wrong", &host, "bob", "wrong");
    let name = format!("{host}/helped/busybox:v1");
    let root = directory.join("root");
    let digest = import_busybox(&root, &name);

    // credsStore wins over the file's own (wrong) entry.
    let store_config = write_docker_config(
        &directory.join("store"),
        serde_json::json!({"credsStore": "right", "auths": {&host: wrong_auth}}),
    );
    let output = helpers.rbuild(
        &store_config,
        &["--root", root.to_str().unwrap(), "push", &name],
        "",
    );
    let stderr = text(&output.stderr);
    assert_eq!(succeeds(output).trim(), digest, "{stderr}");
    let calls = helpers.take_calls();
    assert!(!calls.is_empty());
    assert!(
        calls
            .iter()
            .all(|call| *call == format!("docker-credential-right get {host}")),
        "{calls:?}"
    );
    let fresh = directory.join("fresh");
    let output = helpers.rbuild(
        &store_config,
        &["--root", fresh.to_str().unwrap(), "pull", &name],
        "",
    );
    assert_eq!(succeeds(output).trim(), digest);

    // credHelpers for the host wins over credsStore.
    let both_config = write_docker_config(
        &directory.join("both"),
        serde_json::json!({"credsStore": "wrong", "credHelpers": {&host: "right"}}),
    );
    helpers.take_calls();
    let fresh = directory.join("fresh-both");
    let output = helpers.rbuild(
        &both_config,
        &["--root", fresh.to_str().unwrap(), "pull", &name],
        "",
    );
    assert_eq!(succeeds(output).trim(), digest);
    let calls = helpers.take_calls();
    assert!(
        calls.contains(&format!("docker-credential-right get {host}")),
        "{calls:?}"
    );
    assert!(
        !calls.iter().any(|call| call.contains("credential-wrong")),
        "{calls:?}"
    );
    // The helper credsStore names for every other host is the wrong one: refused.
    let wrong_config = write_docker_config(
        &directory.join("wrong"),
        serde_json::json!({"credsStore": "wrong", "credHelpers": {"elsewhere.example": "right"}}),
    );
    let output = helpers.rbuild(
        &wrong_config,
        &[
            "--root",
            directory.join("refused").to_str().unwrap(),
            "pull",
            &name,
        ],
        "",
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("401"),
        "{}",
        text(&output.stderr)
    );

    // A helper that keeps nothing for the host means anonymous: the protected registry asks
    // for a login, an open one serves the image.
    let empty_config = write_docker_config(
        &directory.join("empty"),
        serde_json::json!({"credsStore": "empty", "auths": {&host: wrong_auth}}),
    );
    helpers.take_calls();
    let output = helpers.rbuild(
        &empty_config,
        &[
            "--root",
            directory.join("anonymous").to_str().unwrap(),
            "pull",
            &name,
        ],
        "",
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!("needs credentials: run `rbuild login {host}`")),
        "{stderr}"
    );
    assert_eq!(
        helpers.take_calls(),
        vec![format!("docker-credential-empty get {host}")]
    );
    let open = Registry::open();
    let open_name = format!("{}/open/busybox:v1", open.address());
    succeeds(rbuild(&root, &["tag", &name, &open_name]));
    succeeds(rbuild(&root, &["push", &open_name]));
    let output = helpers.rbuild(
        &empty_config,
        &[
            "--root",
            directory.join("open").to_str().unwrap(),
            "pull",
            &open_name,
        ],
        "",
    );
    assert_eq!(succeeds(output).trim(), digest);
    assert_eq!(
        helpers.take_calls(),
        vec![format!("docker-credential-empty get {}", open.address())]
    );

    // Bad helpers: errors that name them, and nothing pulled.
    for (helper, expected) in [
        (
            "broken",
            format!(
                "the credential helper docker-credential-broken answered get for {host} with something that is not credentials JSON"
            ),
        ),
        (
            "failing",
            format!(
                "the credential helper docker-credential-failing failed to get the credentials of {host}: the keychain is locked"
            ),
        ),
        (
            "absent",
            "cannot run the credential helper docker-credential-absent (get); is it on PATH?"
                .to_string(),
        ),
    ] {
        let config = write_docker_config(
            &directory.join(helper),
            serde_json::json!({"credsStore": helper}),
        );
        let root = directory.join(&format!("root-{helper}"));
        let output = helpers.rbuild(
            &config,
            &["--root", root.to_str().unwrap(), "pull", &name],
            "",
        );
        assert_eq!(output.status.code(), Some(1), "{helper}");
        let stderr = text(&output.stderr);
        assert!(stderr.contains(&expected), "{helper}: {stderr}");
        let stored =
            std::fs::read_dir(root.join("v1/blobs/sha256")).map_or(0, |entries| entries.count());
        assert_eq!(stored, 0, "{helper}: nothing pulled");
    }
}

#[test]
fn login_stores_into_the_creds_store_and_logout_erases_from_it() {
    let directory = TempDirectory::new("helpers-login");
    let helpers = Helpers::new(&directory);
    let registry = Registry::with_basic_auth("bob", "builder");
    let host = registry.address();
    let docker_config = write_docker_config(
        &directory.join("docker"),
        serde_json::json!({
            "credsStore": "right",
            "auths": {"other.example": {"auth": "b3RoZXI6b3RoZXI="}},
        }),
    );

    // A wrong password stores nothing.
    let output = helpers.rbuild(
        &docker_config,
        &["login", "-u", "bob", "--password-stdin", &host],
        "wrong",
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(helpers.take_calls().is_empty());
    assert_eq!(helpers.stored("right", &host), None);

    let output = helpers.rbuild(
        &docker_config,
        &["login", "-u", "bob", "--password-stdin", &host],
        "builder\n",
    );
    assert_eq!(succeeds(output).trim(), "Login Succeeded");
    assert_eq!(
        helpers.stored("right", &host),
        Some(serde_json::json!({"ServerURL": host, "Username": "bob", "Secret": "builder"}))
    );
    let calls = helpers.take_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(
        calls[0].starts_with("docker-credential-right store {"),
        "{calls:?}"
    );
    // The file keeps an empty entry for the host, as docker writes, and no password.
    let config = read_config(&docker_config);
    assert_eq!(config["auths"][&host], serde_json::json!({}));
    assert_eq!(config["auths"]["other.example"]["auth"], "b3RoZXI6b3RoZXI=");
    assert_eq!(config["credsStore"], "right");

    // The stored credentials serve a push.
    let root = directory.join("root");
    let name = format!("{host}/logged/busybox:v1");
    let digest = import_busybox(&root, &name);
    let output = helpers.rbuild(
        &docker_config,
        &["--root", root.to_str().unwrap(), "push", &name],
        "",
    );
    assert_eq!(succeeds(output).trim(), digest);
    helpers.take_calls();

    let output = helpers.rbuild(&docker_config, &["logout", &host], "");
    assert_eq!(
        succeeds(output).trim(),
        format!("Removing login credentials for {host}")
    );
    assert_eq!(
        helpers.take_calls(),
        vec![format!("docker-credential-right erase {host}")]
    );
    assert_eq!(helpers.stored("right", &host), None);
    let config = read_config(&docker_config);
    assert!(config["auths"].get(&host).is_none(), "{config}");
    assert_eq!(config["auths"]["other.example"]["auth"], "b3RoZXI6b3RoZXI=");

    let output = helpers.rbuild(&docker_config, &["logout", &host], "");
    assert_eq!(succeeds(output).trim(), format!("Not logged in to {host}"));

    // Logged out: the push is refused again.
    let output = helpers.rbuild(
        &docker_config,
        &["--root", root.to_str().unwrap(), "push", &name],
        "",
    );
    assert_eq!(output.status.code(), Some(1));
}
