//! Real registries for the tests: Debian's `docker-registry` (distribution 2.8) on 127.0.0.1,
//! open, behind htpasswd (Basic) auth, or behind a token server that lives in the test process;
//! and a TCP proxy that cuts one connection in the middle (after a number of bytes, or just
//! before the N-th occurrence of a pattern in what the client sends).
//!
//! The token server speaks distribution's token protocol
//! (<https://distribution.github.io/distribution/spec/auth/token/>): `GET /token?service=..&scope=..`
//! with Basic credentials, answered with an ES256 JWT whose `x5c` header holds a self-signed
//! certificate that is also the registry's `rootcertbundle`.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use super::TempDirectory;

/// The `service` the token-auth registry announces and its tokens are for.
pub const SERVICE: &str = "rbuild-test-registry";
/// The `iss` of the token server's tokens.
pub const ISSUER: &str = "rbuild-test-token-server";

/// A running `docker-registry`; dropping it kills the process and removes its storage.
pub struct Registry {
    /// The port it listens on, at 127.0.0.1.
    pub port: u16,
    /// Its filesystem storage root.
    pub storage: PathBuf,
    child: Child,
    token_server: Option<TokenServer>,
    /// The registry's directory (config, log, storage) and any others its config names.
    kept: Vec<TempDirectory>,
}

/// A fresh temp directory for each registry or token server of this process.
fn fresh_directory(kind: &str) -> TempDirectory {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    TempDirectory::new(&format!(
        "{kind}-{}",
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A port that was free a moment ago (the registry start retries if it was taken meanwhile).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind a free port")
        .port()
}

impl Registry {
    /// A registry without authentication.
    pub fn open() -> Registry {
        Self::start("", None)
    }

    /// A registry that wants Bearer tokens from a token server in this process, which gives
    /// `user`/`password` every action asked for on every repository (and the catalog) but those
    /// [`Registry::deny_repository`] names.
    pub fn with_token_auth(user: &str, password: &str) -> Registry {
        let token_server = TokenServer::start(user, password);
        let auth = format!(
            "auth:\n  token:\n    realm: {realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {bundle}\n",
            realm = token_server.realm(),
            bundle = token_server.certificate_path.display(),
        );
        Self::start(&auth, Some(token_server))
    }

    /// A registry with distribution's htpasswd (Basic) authentication for `user`/`password`.
    /// Distribution 2.8 allows it over plain HTTP (it only logs a warning).
    pub fn with_basic_auth(user: &str, password: &str) -> Registry {
        let directory = fresh_directory("htpasswd");
        let hash = bcrypt::hash_with_result(password, 4)
            .expect("bcrypt hash")
            .format_for_version(bcrypt::Version::TwoY);
        let path = directory.join("htpasswd");
        fs::write(&path, format!("{user}:{hash}\n")).expect("write htpasswd");
        let auth = format!(
            "auth:\n  htpasswd:\n    realm: rbuild-test-basic\n    path: {}\n",
            path.display()
        );
        let mut registry = Self::start(&auth, None);
        registry.kept.push(directory);
        registry
    }

    fn start(auth: &str, token_server: Option<TokenServer>) -> Registry {
        let directory = fresh_directory("registry");
        let storage = directory.join("storage");
        fs::create_dir_all(&storage).expect("registry storage");
        let log_path = directory.join("registry.log");
        let mut last_log = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let config = format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: rbuild-test-secret\nhealth:\n  storagedriver:\n    enabled: false\n{auth}",
                storage = storage.display(),
            );
            let config_path = directory.join("config.yml");
            fs::write(&config_path, config).expect("write registry config");
            let log = fs::File::create(&log_path).expect("registry log");
            let mut child = Command::new("/usr/bin/docker-registry")
                .arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("registry log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|error| {
                    panic!(
                        "/usr/bin/docker-registry must be installed (apt-get install docker-registry): {error}"
                    )
                });
            match wait_until_answering(port, &mut child) {
                Ok(()) => {
                    return Registry {
                        port,
                        storage,
                        child,
                        token_server,
                        kept: vec![directory],
                    };
                }
                Err(problem) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_log = format!(
                        "{problem}\n{}",
                        fs::read_to_string(&log_path).unwrap_or_default()
                    );
                    if !last_log.contains("address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("docker-registry did not start:\n{last_log}");
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The blob's file in the registry's storage.
    pub fn blob_path(&self, digest_hex: &str) -> PathBuf {
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&digest_hex[..2])
            .join(digest_hex)
            .join("data")
    }

    /// Overwrites the stored blob's bytes (same length, every byte inverted), so the registry
    /// serves content that does not match its digest.
    pub fn corrupt_blob(&self, digest_hex: &str) {
        let path = self.blob_path(digest_hex);
        let bytes = fs::read(&path)
            .unwrap_or_else(|error| panic!("blob {} in the registry: {error}", path.display()));
        let inverted: Vec<u8> = bytes.iter().map(|byte| !byte).collect();
        fs::write(&path, inverted).expect("overwrite blob");
    }

    /// How many token requests the token server answered with a token (0 without token auth).
    pub fn tokens_issued(&self) -> usize {
        self.token_server
            .as_ref()
            .map_or(0, |server| server.state.issued.load(Ordering::SeqCst))
    }

    /// How many token requests the token server refused (wrong or missing credentials).
    pub fn tokens_refused(&self) -> usize {
        self.token_server
            .as_ref()
            .map_or(0, |server| server.state.refused.load(Ordering::SeqCst))
    }

    /// The scopes each token request asked for (each `scope` parameter, split at spaces), in
    /// order of arrival; empty without token auth.
    pub fn token_scopes(&self) -> Vec<Vec<String>> {
        self.token_server.as_ref().map_or_else(Vec::new, |server| {
            server.state.scopes.lock().expect("not poisoned").clone()
        })
    }

    /// From now on the token server leaves `repository` out of the user's tokens (as a token
    /// server does for a repository the user may not read).
    pub fn deny_repository(&self, repository: &str) {
        if let Some(server) = &self.token_server {
            server
                .state
                .denied
                .lock()
                .expect("not poisoned")
                .push(repository.to_string());
        }
    }

    /// The identity (refresh) token the token server takes for the user in an OAuth2
    /// `refresh_token` grant, when the registry uses token auth.
    pub fn refresh_token(&self) -> Option<String> {
        self.token_server
            .as_ref()
            .map(|server| refresh_token_for(&server.state.user))
    }

    /// The token server's realm URL, when the registry uses token auth.
    pub fn realm(&self) -> Option<String> {
        self.token_server.as_ref().map(TokenServer::realm)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `GET /v2/` until the registry answers with any HTTP status, the process exits, or 30 s
/// pass.
fn wait_until_answering(port: u16, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().map_err(|error| error.to_string())? {
            return Err(format!("docker-registry exited with {status}"));
        }
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let request = format!("GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
            let mut head = [0u8; 12];
            if stream.write_all(request.as_bytes()).is_ok()
                && stream.read_exact(&mut head).is_ok()
                && head.starts_with(b"HTTP/1.")
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "docker-registry did not answer on port {port} in 30 s"
            ));
        }
        // A short poll interval between connection attempts, not a wait for a fixed time.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `DIRECTORY/config.json` with `auths.HOST.auth = base64(user:password)`; returns
/// `DIRECTORY`, for `DOCKER_CONFIG`.
pub fn docker_config(directory: &Path, host: &str, user: &str, password: &str) -> PathBuf {
    fs::create_dir_all(directory).expect("docker config directory");
    let config = serde_json::json!({
        "auths": { host: { "auth": STANDARD.encode(format!("{user}:{password}")) } }
    });
    fs::write(
        directory.join("config.json"),
        serde_json::to_vec_pretty(&config).expect("json"),
    )
    .expect("write config.json");
    directory.to_path_buf()
}

// --- the token server ---

fn refresh_token_for(user: &str) -> String {
    format!("rbuild-test-refresh-token-of-{user}")
}

struct TokenState {
    user: String,
    password: String,
    key: ring::signature::EcdsaKeyPair,
    certificate_der: Vec<u8>,
    issued: AtomicUsize,
    refused: AtomicUsize,
    /// The scopes of every token request, in order of arrival (one list per request).
    scopes: Mutex<Vec<Vec<String>>>,
    /// Repositories the user gets no access to.
    denied: Mutex<Vec<String>>,
    stop: AtomicBool,
}

/// distribution's token server protocol, in this process, on 127.0.0.1.
struct TokenServer {
    port: u16,
    certificate_path: PathBuf,
    state: Arc<TokenState>,
    _directory: TempDirectory,
}

impl TokenServer {
    fn start(user: &str, password: &str) -> TokenServer {
        let directory = fresh_directory("token-server");
        let key_pair =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate key");
        let certificate = rcgen::CertificateParams::new(vec![ISSUER.to_string()])
            .expect("certificate parameters")
            .self_signed(&key_pair)
            .expect("self-signed certificate");
        let certificate_path = directory.join("token-server.pem");
        fs::write(&certificate_path, certificate.pem()).expect("write certificate");
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key_pair.serialize_der(),
            &ring::rand::SystemRandom::new(),
        )
        .expect("ring reads the rcgen key");
        let state = Arc::new(TokenState {
            user: user.to_string(),
            password: password.to_string(),
            key,
            certificate_der: certificate.der().to_vec(),
            issued: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            scopes: Mutex::new(Vec::new()),
            denied: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind token server");
        let port = listener.local_addr().expect("token server address").port();
        let accept_state = Arc::clone(&state);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_state.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let connection_state = Arc::clone(&accept_state);
                std::thread::spawn(move || serve_token_connection(stream, &connection_state));
            }
        });
        TokenServer {
            port,
            certificate_path,
            state,
            _directory: directory,
        }
    }

    fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// One HTTP request: method, path, query parameters (repeatable), headers (lower-case names).
struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut words = line.split_whitespace();
    let method = words.next()?.to_string();
    let target = words.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    Some(Request {
        method,
        path: path.to_string(),
        query: form_pairs(query),
        headers,
        body,
    })
}

/// `a=b&c=d` (URL-encoded) into pairs.
fn form_pairs(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => decoded.push(b' '),
            b'%' if index + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[index + 1..index + 3])
                    .ok()
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                {
                    Some(byte) => {
                        decoded.push(byte);
                        index += 2;
                    }
                    None => decoded.push(b'%'),
                }
            }
            byte => decoded.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

fn respond(stream: &mut TcpStream, status: &str, extra_headers: &str, body: &str) {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

fn serve_token_connection(stream: TcpStream, state: &TokenState) {
    let mut writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    let Some(request) = read_request(&mut reader) else {
        return;
    };
    if request.path != "/token" {
        respond(&mut writer, "404 Not Found", "", "{}");
        return;
    }
    // GET: Basic credentials (or none). POST: the OAuth2 password grant, as distribution's spec
    // describes (<https://distribution.github.io/distribution/spec/auth/oauth/>).
    let (parameters, credentials) = match request.method.as_str() {
        "GET" => {
            let credentials = request
                .headers
                .get("authorization")
                .and_then(|value| value.strip_prefix("Basic "))
                .and_then(|encoded| STANDARD.decode(encoded.trim()).ok())
                .and_then(|decoded| String::from_utf8(decoded).ok())
                .and_then(|text| {
                    text.split_once(':')
                        .map(|(user, password)| (user.to_string(), password.to_string()))
                });
            (request.query, credentials)
        }
        "POST" => {
            let form = form_pairs(&String::from_utf8_lossy(&request.body));
            let value = |name: &str| {
                form.iter()
                    .find(|(key, _)| key == name)
                    .map(|(_, value)| value.clone())
            };
            let credentials = match value("grant_type").as_deref() {
                Some("password") => value("username").zip(value("password")),
                // A valid refresh token stands for the user's password; an invalid one for a
                // wrong one.
                Some("refresh_token") => Some((
                    state.user.clone(),
                    if value("refresh_token") == Some(refresh_token_for(&state.user)) {
                        state.password.clone()
                    } else {
                        String::new()
                    },
                )),
                _ => None,
            };
            (form, credentials)
        }
        _ => {
            respond(&mut writer, "405 Method Not Allowed", "", "{}");
            return;
        }
    };
    let parameter = |name: &str| {
        parameters
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    let service = parameter("service").unwrap_or_default();
    // Several `scope` parameters, or several scopes in one separated by spaces (the OAuth2
    // form), ask for all of them.
    let scopes: Vec<String> = parameters
        .iter()
        .filter(|(key, _)| key == "scope")
        .flat_map(|(_, scope)| scope.split(' '))
        .filter(|scope| !scope.is_empty())
        .map(str::to_string)
        .collect();
    state
        .scopes
        .lock()
        .expect("not poisoned")
        .push(scopes.clone());
    let user = match credentials {
        Some((user, password)) if user == state.user && password == state.password => Some(user),
        Some(_) => {
            state.refused.fetch_add(1, Ordering::SeqCst);
            respond(
                &mut writer,
                "401 Unauthorized",
                "WWW-Authenticate: Basic realm=\"rbuild-test-token-server\"\r\n",
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"wrong user name or password"}]}"#,
            );
            return;
        }
        // Anonymous: a token with no access, as Docker Hub gives for a repository one may not
        // read; the registry then answers 401 insufficient_scope.
        None => None,
    };
    let denied = state.denied.lock().expect("not poisoned").clone();
    let access: Vec<serde_json::Value> = match &user {
        None => Vec::new(),
        // The user gets every action asked for on any repository not denied: pull and push on
        // its own and on a mount's source alike.
        Some(_) => scopes
            .iter()
            .filter_map(|scope| {
                let (kind, rest) = scope.split_once(':')?;
                let (name, actions) = rest.rsplit_once(':')?;
                if kind == "repository" && denied.iter().any(|denied| denied == name) {
                    return None;
                }
                let actions: Vec<&str> = actions.split(',').collect();
                Some(serde_json::json!({"type": kind, "name": name, "actions": actions}))
            })
            .collect(),
    };
    let token = sign_token(state, user.as_deref().unwrap_or(""), &service, access);
    state.issued.fetch_add(1, Ordering::SeqCst);
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": 300,
    });
    respond(&mut writer, "200 OK", "", &body.to_string());
}

/// A JWT (JWS compact, ES256) that distribution 2.8's token access controller accepts.
fn sign_token(
    state: &TokenState,
    subject: &str,
    service: &str,
    access: Vec<serde_json::Value>,
) -> String {
    static SERIAL: AtomicUsize = AtomicUsize::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let header = serde_json::json!({
        "typ": "JWT",
        "alg": "ES256",
        "x5c": [STANDARD.encode(&state.certificate_der)],
    });
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": subject,
        "aud": service,
        "exp": now + 300,
        "nbf": now.saturating_sub(10),
        "iat": now,
        "jti": format!("{now}-{}", SERIAL.fetch_add(1, Ordering::SeqCst)),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = state
        .key
        .sign(&ring::rand::SystemRandom::new(), signing_input.as_bytes())
        .expect("sign token");
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    )
}

// --- the dropping proxy ---

/// Which bytes a [`DroppingProxy`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the client to the target (request bodies: pushes).
    Upload,
    /// From the target to the client (response bodies: pulls).
    Download,
}

/// Where a [`DroppingProxy`] cuts.
enum Fault {
    /// The first connection that carries more than `after_bytes` in `direction`, there.
    AfterBytes {
        direction: Direction,
        after_bytes: u64,
    },
    /// Just before the `occurrence`-th (counted from 1, over all connections) `pattern` in the
    /// client→target stream.
    BeforePattern { pattern: Vec<u8>, occurrence: usize },
}

struct ProxyState {
    target: String,
    fault: Fault,
    /// How many times the pattern was seen so far ([`Fault::BeforePattern`]).
    seen: AtomicUsize,
    cut_claimed: AtomicBool,
    drops: AtomicUsize,
    stop: AtomicBool,
}

/// A TCP proxy on 127.0.0.1 that cuts one connection once; later traffic passes untouched.
pub struct DroppingProxy {
    /// The port it listens on, at 127.0.0.1.
    pub port: u16,
    state: Arc<ProxyState>,
}

impl DroppingProxy {
    /// Forwards 127.0.0.1:port to `target`; the first connection that carries more than
    /// `after_bytes` in `direction` is cut there (both sockets shut down); later connections
    /// pass untouched.
    pub fn start(target: &str, direction: Direction, after_bytes: u64) -> DroppingProxy {
        Self::with_fault(
            target,
            Fault::AfterBytes {
                direction,
                after_bytes,
            },
        )
    }

    /// Forwards 127.0.0.1:port to `target`, scanning what clients send: everything before the
    /// `occurrence`-th `pattern` (counted over all connections, from 1) is forwarded, then that
    /// connection is closed on both sides, once. `cut_before(target, b"PATCH ", 2)` is a
    /// connection that dies just as the second PATCH starts, before any of it reaches the
    /// target. (A pattern split between two reads is found too, but its first part has then
    /// already gone through.)
    pub fn cut_before(target: &str, pattern: &[u8], occurrence: usize) -> DroppingProxy {
        assert!(!pattern.is_empty() && occurrence >= 1);
        Self::with_fault(
            target,
            Fault::BeforePattern {
                pattern: pattern.to_vec(),
                occurrence,
            },
        )
    }

    fn with_fault(target: &str, fault: Fault) -> DroppingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let state = Arc::new(ProxyState {
            target: target.to_string(),
            fault,
            seen: AtomicUsize::new(0),
            cut_claimed: AtomicBool::new(false),
            drops: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let accept_state = Arc::clone(&state);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if accept_state.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&accept_state.target) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let connection_state = Arc::clone(&accept_state);
                std::thread::spawn(move || proxy_connection(client, server, connection_state));
            }
        });
        DroppingProxy { port, state }
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// How many connections it cut (0 or 1).
    pub fn drops(&self) -> usize {
        self.state.drops.load(Ordering::SeqCst)
    }
}

impl Drop for DroppingProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn proxy_connection(client: TcpStream, server: TcpStream, state: Arc<ProxyState>) {
    let streams = || {
        (
            client.try_clone().expect("clone socket"),
            server.try_clone().expect("clone socket"),
        )
    };
    let (upload_from, upload_to) = streams();
    let (download_to, download_from) = streams();
    let upload_state = Arc::clone(&state);
    let (client_handle, server_handle) = streams();
    let upload = std::thread::spawn(move || {
        pump(
            upload_from,
            upload_to,
            Direction::Upload,
            &upload_state,
            (&client_handle, &server_handle),
        )
    });
    let (client_handle, server_handle) = streams();
    pump(
        download_from,
        download_to,
        Direction::Download,
        &state,
        (&client_handle, &server_handle),
    );
    let _ = upload.join();
}

/// Where in `buffer` (just read, after `tail`, the end of what this connection carried before)
/// to cut, if this read holds the cut: the number of bytes of `buffer` to forward first.
fn cut_point(
    state: &ProxyState,
    direction: Direction,
    carried: u64,
    tail: &[u8],
    buffer: &[u8],
) -> Option<usize> {
    let claim = || {
        state
            .cut_claimed
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    };
    match &state.fault {
        Fault::AfterBytes {
            direction: counted,
            after_bytes,
        } => (*counted == direction && carried + buffer.len() as u64 > *after_bytes && claim())
            .then(|| (after_bytes - carried) as usize),
        Fault::BeforePattern {
            pattern,
            occurrence,
        } => {
            if direction != Direction::Upload || state.cut_claimed.load(Ordering::SeqCst) {
                return None;
            }
            // `tail` is shorter than the pattern: every match found here ends in this read.
            let joined = [tail, buffer].concat();
            let mut start = 0;
            while start + pattern.len() <= joined.len() {
                if joined[start..].starts_with(pattern) {
                    let seen = state.seen.fetch_add(1, Ordering::SeqCst) + 1;
                    if seen == *occurrence && claim() {
                        return Some(start.saturating_sub(tail.len()));
                    }
                    start += pattern.len();
                } else {
                    start += 1;
                }
            }
            None
        }
    }
}

/// Copies `from` to `to` (carrying `direction`); when this read holds the proxy's one cut,
/// writes what comes before it and shuts both sockets down.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    direction: Direction,
    state: &ProxyState,
    both: (&TcpStream, &TcpStream),
) {
    let mut carried: u64 = 0;
    let mut buffer = vec![0u8; 64 * 1024];
    // The last bytes carried, to find a pattern split between two reads.
    let mut tail: Vec<u8> = Vec::new();
    let keep = match &state.fault {
        Fault::BeforePattern { pattern, .. } => pattern.len() - 1,
        Fault::AfterBytes { .. } => 0,
    };
    loop {
        let read = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        if let Some(allowed) = cut_point(state, direction, carried, &tail, &buffer[..read]) {
            // Counted before the cut: whoever sees the connection end then sees the drop.
            state.drops.fetch_add(1, Ordering::SeqCst);
            let _ = to.write_all(&buffer[..allowed]);
            let _ = to.flush();
            let _ = both.0.shutdown(Shutdown::Both);
            let _ = both.1.shutdown(Shutdown::Both);
            return;
        }
        carried += read as u64;
        if keep > 0 {
            tail.extend_from_slice(&buffer[..read]);
            let excess = tail.len().saturating_sub(keep);
            tail.drain(..excess);
        }
        if to.write_all(&buffer[..read]).is_err() {
            break;
        }
    }
    // Pass the half-close on: the other side sees end of stream, as it would without a proxy.
    let _ = to.shutdown(Shutdown::Write);
}
