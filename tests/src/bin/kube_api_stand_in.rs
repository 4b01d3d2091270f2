//! `nimbus-kube-api-stand-in` — a **TEST STAND-IN** for the Kubernetes API server.
//!
//! **THIS IS NOT A KUBERNETES API SERVER.** It serves, over plain HTTP/1, only the endpoints polynimbus's
//! coordinator uses (see `nimbus_kube::cluster`), keeps their objects in memory, and answers them the way the
//! real API server does (JSON objects, `Status` objects for errors), so the production kube-rs client runs
//! unchanged against it in the end-to-end tests, where no cluster can run:
//!
//! - `POST /api/v1/namespaces/kube-system/secrets` (409 AlreadyExists), `GET .../secrets`, `GET` and
//!   `DELETE .../secrets/NAME` (404 NotFound); `stringData` is folded into base64 `data` as the server does;
//! - `GET /api/v1/nodes`, `GET`, `PATCH` and `DELETE /api/v1/nodes/NAME`; PATCH takes
//!   `application/merge-patch+json` (RFC 7386; a `metadata.resourceVersion` or `metadata.uid` in the patch
//!   that differs from the stored one gives 409 Conflict) and `application/strategic-merge-patch+json`
//!   (applied as a merge patch; `$` directives are refused); other patch types get 415 (kube-rs's cluster code
//!   sends no apply patches);
//! - `GET /api/v1/pods` (optionally `fieldSelector` on `spec.nodeName`, `metadata.name`, `metadata.namespace`,
//!   `status.phase`, with `=`, `==`, `!=`);
//! - `POST /api/v1/namespaces/NS/pods/NAME/eviction`: removes the pod (201 Status Success), 404 if unknown,
//!   429 TooManyRequests (a PodDisruptionBudget) while the pod's `pdb_blocked` count lasts.
//!
//! Anything else (also `watch`, `dryRun`, `labelSelector`) is answered 404 `stand-in: unsupported request
//! METHOD PATH` and recorded with `"unsupported": true`. Requests without `Authorization: Bearer
//! stand-in-bearer-token` get 401. Every successful change bumps one global resourceVersion counter. Deleting
//! a Node leaves its pods (the real pod garbage collector is not simulated).
//!
//! Files in `--dir` and the control protocol: see `e2e::kube_api`. SIGTERM/SIGINT: exit 0.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use base64::Engine;
use bytes::Bytes;
use clap::Parser;
use e2e::kube_api::{
    BEARER_TOKEN, CONTROL_SOCKET, KUBE_API_BIN, KUBECONFIG_FILE, READY_FILE, REQUESTS_FILE, kubeconfig_yaml,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};

/// Largest request body accepted (larger: 413).
const MAX_BODY: usize = 4 << 20;
/// The only namespace with Secrets.
const SECRETS_NAMESPACE: &str = "kube-system";
/// Taint effects the API accepts.
const EFFECTS: [&str; 3] = ["NoSchedule", "PreferNoSchedule", "NoExecute"];
/// Annotation of static (mirror) pods.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

#[derive(Debug, Parser)]
#[command(
    name = KUBE_API_BIN,
    version,
    about = "TEST STAND-IN for the Kubernetes API server -- NOT a Kubernetes API server. Serves only the \
             endpoints the polynimbus coordinator uses (bootstrap-token Secrets, Nodes, Pods by node, Eviction), \
             in memory, over plain HTTP, for the end-to-end tests.",
    after_help = "TEST STAND-IN, NOT A KUBERNETES API SERVER. Writes DIR/kubeconfig, then DIR/ready (the address); \
                  records every request in DIR/requests.jsonl; control socket DIR/control.sock (JSON lines: \
                  put_node, set_label, remove_label, set_taints, put_pod, state). SIGTERM/SIGINT: exit 0."
)]
struct Cli {
    /// Directory for kubeconfig, ready, requests.jsonl and control.sock (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// Address to serve HTTP/1 on (port 0: any free port; the chosen one is in DIR/ready).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // The harness sends stderr to a log file: colours only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{KUBE_API_BIN}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("{KUBE_API_BIN}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let dir = cli.dir;
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let tcp = TcpListener::bind(cli.listen)
        .await
        .map_err(|e| format!("binding {}: {e} (choose another --listen address)", cli.listen))?;
    let addr = tcp
        .local_addr()
        .map_err(|e| format!("reading the bound address: {e}"))?;
    let sock_path = dir.join(CONTROL_SOCKET);
    match std::fs::remove_file(&sock_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("removing stale {}: {e}", sock_path.display())),
    }
    let control = UnixListener::bind(&sock_path).map_err(|e| format!("binding {}: {e}", sock_path.display()))?;
    let requests_path = dir.join(REQUESTS_FILE);
    // Holds the bootstrap tokens' secrets (request bodies): owner-only.
    let requests = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&requests_path)
        .map_err(|e| format!("opening {}: {e}", requests_path.display()))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("installing the SIGTERM handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("installing the SIGINT handler: {e}"))?;

    write_atomically(&dir, KUBECONFIG_FILE, &kubeconfig_yaml(addr))?;
    write_atomically(&dir, READY_FILE, &format!("{addr}\n"))?;
    tracing::info!(%addr, dir = %dir.display(), "TEST STAND-IN for the Kubernetes API server ready (not a Kubernetes API server)");

    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            store: Store::default(),
            requests,
        }),
    });
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: exiting"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: exiting"); break; }
            accepted = tcp.accept() => match accepted {
                Ok((stream, peer)) => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| serve_http(shared.clone(), req));
                        if let Err(e) = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await
                        {
                            tracing::debug!(%peer, "HTTP connection ended: {e}");
                        }
                    });
                }
                Err(e) => tracing::warn!("accepting an HTTP connection: {e}"),
            },
            accepted = control.accept() => match accepted {
                Ok((stream, _)) => { tokio::spawn(serve_control(shared.clone(), stream)); }
                Err(e) => tracing::warn!("accepting a control connection: {e}"),
            },
        }
    }
    let _ = std::fs::remove_file(&sock_path);
    Ok(())
}

/// Writes `dir/name` through a temporary file and a rename (readers never see it half written); mode 0600.
fn write_atomically(dir: &Path, name: &str, contents: &str) -> Result<(), String> {
    let path = dir.join(name);
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).map_err(|e| format!("creating a file in {}: {e}", dir.display()))?;
    tmp.write_all(contents.as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    tmp.persist(&path)
        .map_err(|e| format!("renaming into {}: {}", path.display(), e.error))?;
    Ok(())
}

struct Shared {
    inner: Mutex<Inner>,
}

struct Inner {
    store: Store,
    requests: File,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Answers one HTTP request and records it (under the lock, so the record's order is the answering order).
    fn answer(&self, req: &ApiRequest, authorized: bool) -> Reply {
        let mut inner = self.lock();
        let reply = if authorized {
            inner.store.handle(req)
        } else {
            Reply::new(401, status(401, "Unauthorized", "Unauthorized".into(), None))
        };
        let record = json!({
            "method": req.method,
            "path": req.path,
            "query": req.query,
            "content_type": req.content_type,
            "body": req.body_for_record(),
            "status": reply.status,
            "unsupported": reply.unsupported,
        });
        let mut line = record.to_string();
        line.push('\n');
        if let Err(e) = inner.requests.write_all(line.as_bytes()) {
            tracing::warn!("appending to {REQUESTS_FILE}: {e}");
        }
        drop(inner);
        if reply.unsupported {
            tracing::warn!(method = %req.method, path = %req.path, status = reply.status, "unsupported request");
        } else {
            tracing::info!(method = %req.method, path = %req.path, status = reply.status, "request");
        }
        reply
    }
}

async fn serve_http(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query());
    let header = |name: hyper::header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = header(hyper::header::CONTENT_TYPE);
    let expected = format!("Bearer {BEARER_TOKEN}");
    let authorized = header(hyper::header::AUTHORIZATION).is_some_and(|a| a.trim() == expected);
    let (body, too_large) = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => (collected.to_bytes(), false),
        Err(e) => {
            tracing::debug!("reading a request body: {e}");
            (Bytes::new(), true)
        }
    };
    let request = ApiRequest {
        method,
        path,
        query,
        content_type,
        body,
        too_large,
    };
    let reply = shared.answer(&request, authorized);
    Ok(json_response(reply.status, &reply.body))
}

fn json_response(code: u16, body: &Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

async fn serve_control(shared: Arc<Shared>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!("reading a control request: {e}");
                break;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(request) => {
                let op = request.get("op").and_then(Value::as_str).unwrap_or("?").to_string();
                let reply = shared.lock().store.control(&request);
                match reply.get("error") {
                    Some(error) => tracing::warn!(op, %error, "control request refused"),
                    None => tracing::info!(op, name = ?request.get("name"), "control request"),
                }
                reply
            }
            Err(e) => control_error(format!("the request is not JSON ({e}): send one JSON object per line")),
        };
        let mut out = reply.to_string();
        out.push('\n');
        if let Err(e) = write.write_all(out.as_bytes()).await {
            tracing::debug!("writing a control reply: {e}");
            break;
        }
    }
}

/// `a=b&c=d%2Fe` decoded into a map (the last of repeated keys wins), with `form_urlencoded`.
fn parse_query(query: Option<&str>) -> BTreeMap<String, String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// One HTTP request, as the store sees it.
#[derive(Debug, Clone, Default)]
struct ApiRequest {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    content_type: Option<String>,
    body: Bytes,
    too_large: bool,
}

impl ApiRequest {
    /// The media type without parameters (`application/json; charset=utf-8` → `application/json`).
    fn media_type(&self) -> Option<String> {
        self.content_type
            .as_deref()
            .map(|ct| ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
    }

    /// The body for `requests.jsonl`: JSON if it parses, else the text, `null` when empty.
    fn body_for_record(&self) -> Value {
        if self.body.is_empty() {
            return Value::Null;
        }
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&self.body).into_owned()))
    }

    /// The body as a JSON object, or the 400/413 reply.
    fn json_object(&self) -> Result<Map<String, Value>, Reply> {
        if self.too_large {
            return Err(Reply::new(
                413,
                status(
                    413,
                    "RequestEntityTooLarge",
                    format!("request body larger than {MAX_BODY} bytes"),
                    None,
                ),
            ));
        }
        match serde_json::from_slice::<Value>(&self.body) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(other) => Err(bad_request(format!(
                "the request body must be a JSON object, not {other}"
            ))),
            Err(e) => Err(bad_request(format!("the request body is not JSON: {e}"))),
        }
    }
}

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq)]
struct Reply {
    status: u16,
    body: Value,
    unsupported: bool,
}

impl Reply {
    fn new(status: u16, body: Value) -> Reply {
        Reply {
            status,
            body,
            unsupported: false,
        }
    }
}

/// A `Status` object as the API server sends with errors (and some successes).
fn status(code: u16, reason: &str, message: String, details: Option<Value>) -> Value {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": if code < 400 { "Success" } else { "Failure" },
        "code": code,
    });
    if !message.is_empty() {
        s["message"] = json!(message);
    }
    if !reason.is_empty() {
        s["reason"] = json!(reason);
    }
    if let Some(d) = details {
        s["details"] = d;
    }
    s
}

fn not_found(kind: &str, name: &str) -> Reply {
    Reply::new(
        404,
        status(
            404,
            "NotFound",
            format!("{kind} \"{name}\" not found"),
            Some(json!({"name": name, "kind": kind})),
        ),
    )
}

fn bad_request(message: String) -> Reply {
    Reply::new(400, status(400, "BadRequest", message, None))
}

fn invalid(kind: &str, name: &str, message: String) -> Reply {
    Reply::new(
        422,
        status(
            422,
            "Invalid",
            format!("{kind} \"{name}\" is invalid: {message}"),
            Some(json!({"name": name, "kind": kind})),
        ),
    )
}

fn conflict(kind: &str, name: &str) -> Reply {
    Reply::new(
        409,
        status(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {kind} \"{name}\": the object has been modified; please apply your \
                 changes to the latest version and try again"
            ),
            Some(json!({"name": name, "kind": kind})),
        ),
    )
}

fn unsupported(req: &ApiRequest, why: Option<&str>) -> Reply {
    let mut message = format!("stand-in: unsupported request {} {}", req.method, req.path);
    if let Some(why) = why {
        message.push_str(&format!(" ({why})"));
    }
    Reply {
        status: 404,
        body: status(404, "NotFound", message, None),
        unsupported: true,
    }
}

fn control_error(error: String) -> Value {
    json!({"ok": false, "error": error})
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// RFC 7386 JSON merge patch: objects merge recursively, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// The first strategic-merge directive (`$patch`, `$retainKeys`, `$setElementOrder/...`) in `v`, if any.
fn find_directive(v: &Value) -> Option<String> {
    match v {
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            if k.starts_with('$') {
                Some(k.clone())
            } else {
                find_directive(v)
            }
        }),
        Value::Array(items) => items.iter().find_map(find_directive),
        _ => None,
    }
}

/// Checks taints (`[{key, value?, effect}]`, no duplicate key+effect) and drops empty values, as the server's
/// output does.
fn normalize_taints(taints: &Value) -> Result<Vec<Value>, String> {
    let Some(items) = taints.as_array() else {
        return Err(format!("spec.taints: must be a list, not {taints}"));
    };
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(items.len());
    for (i, t) in items.iter().enumerate() {
        let key = t.get("key").and_then(Value::as_str).unwrap_or("");
        if key.is_empty() {
            return Err(format!("spec.taints[{i}].key: Required value"));
        }
        let effect = t.get("effect").and_then(Value::as_str).unwrap_or("");
        if !EFFECTS.contains(&effect) {
            return Err(format!(
                "spec.taints[{i}].effect: Unsupported value: {effect:?}: supported values: {}",
                EFFECTS.join(", ")
            ));
        }
        let mut taint = t.clone();
        match t.get("value") {
            None => {}
            Some(Value::String(v)) if !v.is_empty() => {}
            Some(Value::String(_)) | Some(Value::Null) => {
                if let Some(obj) = taint.as_object_mut() {
                    obj.remove("value");
                }
            }
            Some(other) => return Err(format!("spec.taints[{i}].value: must be a string, not {other}")),
        }
        if !seen.insert((key.to_string(), effect.to_string())) {
            return Err(format!("spec.taints[{i}]: Duplicate value: {key}:{effect}"));
        }
        out.push(taint);
    }
    Ok(out)
}

fn check_labels(labels: &Value) -> Result<(), String> {
    let Some(map) = labels.as_object() else {
        return Err(format!("metadata.labels: must be a map of strings, not {labels}"));
    };
    match map.iter().find(|(_, v)| !v.is_string()) {
        Some((k, v)) => Err(format!("metadata.labels[{k}]: must be a string, not {v}")),
        None => Ok(()),
    }
}

/// Validates a Node after a patch and normalizes its taints.
fn validate_node(node: &mut Value) -> Result<(), String> {
    if let Some(labels) = node.pointer("/metadata/labels") {
        check_labels(labels)?;
    }
    if let Some(u) = node.pointer("/spec/unschedulable")
        && !u.is_boolean()
    {
        return Err(format!("spec.unschedulable: must be a boolean, not {u}"));
    }
    if let Some(taints) = node.pointer("/spec/taints") {
        let normalized = normalize_taints(taints)?;
        node["spec"]["taints"] = Value::Array(normalized);
    }
    Ok(())
}

/// A field selector term: `key=value`, `key==value` or `key!=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldTerm {
    key: String,
    equal: bool,
    value: String,
}

const POD_FIELDS: [&str; 4] = ["spec.nodeName", "metadata.name", "metadata.namespace", "status.phase"];

fn parse_field_selector(selector: &str) -> Result<Vec<FieldTerm>, String> {
    let mut terms = Vec::new();
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (key, equal, value) = if let Some((k, v)) = term.split_once("!=") {
            (k, false, v)
        } else if let Some((k, v)) = term.split_once("==") {
            (k, true, v)
        } else if let Some((k, v)) = term.split_once('=') {
            (k, true, v)
        } else {
            return Err(format!("invalid selector: '{selector}'; can't understand '{term}'"));
        };
        let key = key.trim();
        if !POD_FIELDS.contains(&key) {
            return Err(format!("field label not supported: {key}"));
        }
        terms.push(FieldTerm {
            key: key.to_string(),
            equal,
            value: value.trim().to_string(),
        });
    }
    Ok(terms)
}

fn pod_field<'a>(pod: &'a Value, key: &str) -> &'a str {
    let pointer = match key {
        "spec.nodeName" => "/spec/nodeName",
        "metadata.name" => "/metadata/name",
        "metadata.namespace" => "/metadata/namespace",
        "status.phase" => "/status/phase",
        _ => return "",
    };
    pod.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

#[derive(Debug, Clone)]
struct StoredPod {
    object: Value,
    pdb_blocked: u64,
}

/// The in-memory objects. No I/O: [`Store::handle`] maps a request to a reply, [`Store::control`] a control
/// request to its reply.
#[derive(Debug, Default)]
struct Store {
    /// Last resourceVersion handed out (one counter for everything, like etcd's revision).
    revision: u64,
    /// Last uid handed out.
    uids: u64,
    nodes: BTreeMap<String, Value>,
    pods: BTreeMap<(String, String), StoredPod>,
    secrets: BTreeMap<String, Value>,
}

impl Store {
    fn next_rv(&mut self) -> String {
        self.revision += 1;
        self.revision.to_string()
    }

    fn next_uid(&mut self) -> String {
        self.uids += 1;
        format!("5a4d1e00-0000-4000-8000-{:012x}", self.uids)
    }

    fn list(&self, kind: &str, items: Vec<Value>) -> Reply {
        Reply::new(
            200,
            json!({
                "apiVersion": "v1",
                "kind": kind,
                "metadata": {"resourceVersion": self.revision.to_string()},
                "items": items,
            }),
        )
    }

    fn handle(&mut self, req: &ApiRequest) -> Reply {
        for refused in ["watch", "dryRun", "labelSelector", "continue"] {
            if req.query.contains_key(refused) {
                return unsupported(req, Some(&format!("query parameter {refused}")));
            }
        }
        let segments: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
        let method = req.method.as_str();
        if segments.iter().any(|s| s.is_empty()) {
            return unsupported(req, None);
        }
        if req.query.contains_key("fieldSelector") && !(method == "GET" && segments == ["api", "v1", "pods"]) {
            return unsupported(req, Some("fieldSelector"));
        }
        match (method, segments.as_slice()) {
            ("POST", ["api", "v1", "namespaces", SECRETS_NAMESPACE, "secrets"]) => self.create_secret(req),
            ("GET", ["api", "v1", "namespaces", SECRETS_NAMESPACE, "secrets"]) => {
                let items = self.secrets.values().cloned().collect();
                self.list("SecretList", items)
            }
            ("GET", ["api", "v1", "namespaces", SECRETS_NAMESPACE, "secrets", name]) => match self.secrets.get(*name) {
                Some(s) => Reply::new(200, s.clone()),
                None => not_found("secrets", name),
            },
            ("DELETE", ["api", "v1", "namespaces", SECRETS_NAMESPACE, "secrets", name]) => {
                match self.secrets.remove(*name) {
                    Some(s) => {
                        self.next_rv();
                        Reply::new(200, s)
                    }
                    None => not_found("secrets", name),
                }
            }
            ("GET", ["api", "v1", "nodes"]) => {
                let items = self.nodes.values().cloned().collect();
                self.list("NodeList", items)
            }
            ("GET", ["api", "v1", "nodes", name]) => match self.nodes.get(*name) {
                Some(n) => Reply::new(200, n.clone()),
                None => not_found("nodes", name),
            },
            ("PATCH", ["api", "v1", "nodes", name]) => self.patch_node(req, name),
            ("DELETE", ["api", "v1", "nodes", name]) => match self.nodes.remove(*name) {
                Some(n) => {
                    self.next_rv();
                    Reply::new(200, n)
                }
                None => not_found("nodes", name),
            },
            ("GET", ["api", "v1", "pods"]) => self.list_pods(req),
            ("POST", ["api", "v1", "namespaces", ns, "pods", name, "eviction"]) => self.evict(req, ns, name),
            _ => unsupported(req, None),
        }
    }

    fn create_secret(&mut self, req: &ApiRequest) -> Reply {
        let mut secret = match req.json_object() {
            Ok(s) => s,
            Err(reply) => return reply,
        };
        if let Some(kind) = secret.get("kind")
            && kind != "Secret"
        {
            return bad_request(format!("the body is a {kind}, not a Secret"));
        }
        let meta = secret.get("metadata").cloned().unwrap_or_else(|| json!({}));
        let name = meta.get("name").and_then(Value::as_str).unwrap_or("").to_string();
        if name.is_empty() {
            return invalid("secrets", "", "metadata.name: Required value: name is required".into());
        }
        if let Some(ns) = meta.get("namespace").and_then(Value::as_str)
            && ns != SECRETS_NAMESPACE
        {
            return bad_request(
                "the namespace of the provided object does not match the namespace sent on the request".into(),
            );
        }
        if self.secrets.contains_key(&name) {
            return Reply::new(
                409,
                status(
                    409,
                    "AlreadyExists",
                    format!("secrets \"{name}\" already exists"),
                    Some(json!({"name": name, "kind": "secrets"})),
                ),
            );
        }
        // The server folds stringData into data (base64) and never returns stringData.
        let mut data = match secret.remove("data") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(d)) => d,
            Some(other) => return invalid("secrets", &name, format!("data: must be a map, not {other}")),
        };
        match secret.remove("stringData") {
            None | Some(Value::Null) => {}
            Some(Value::Object(sd)) => {
                for (k, v) in sd {
                    let Some(text) = v.as_str() else {
                        return invalid("secrets", &name, format!("stringData[{k}]: must be a string"));
                    };
                    data.insert(k, json!(base64::engine::general_purpose::STANDARD.encode(text)));
                }
            }
            Some(other) => return invalid("secrets", &name, format!("stringData: must be a map, not {other}")),
        }
        let mut meta = meta;
        meta["namespace"] = json!(SECRETS_NAMESPACE);
        meta["uid"] = json!(self.next_uid());
        meta["resourceVersion"] = json!(self.next_rv());
        meta["creationTimestamp"] = json!(now_rfc3339());
        secret.insert("apiVersion".into(), json!("v1"));
        secret.insert("kind".into(), json!("Secret"));
        secret.insert("metadata".into(), meta);
        secret.insert("data".into(), Value::Object(data));
        let secret = Value::Object(secret);
        self.secrets.insert(name, secret.clone());
        Reply::new(201, secret)
    }

    fn patch_node(&mut self, req: &ApiRequest, name: &str) -> Reply {
        let media = req.media_type().unwrap_or_default();
        let strategic = match media.as_str() {
            "application/merge-patch+json" => false,
            "application/strategic-merge-patch+json" => true,
            other => {
                return Reply::new(
                    415,
                    status(
                        415,
                        "UnsupportedMediaType",
                        format!(
                            "stand-in: the patch type {other:?} is not supported (only application/merge-patch+json \
                             and application/strategic-merge-patch+json)"
                        ),
                        None,
                    ),
                );
            }
        };
        let patch = match req.json_object() {
            Ok(p) => Value::Object(p),
            Err(reply) => return reply,
        };
        if strategic && let Some(directive) = find_directive(&patch) {
            return bad_request(format!(
                "stand-in: strategic merge directive {directive} is not supported (it applies strategic merge \
                 patches as JSON merge patches)"
            ));
        }
        let Some(current) = self.nodes.get(name) else {
            return not_found("nodes", name);
        };
        for (field, pointer) in [
            ("resourceVersion", "/metadata/resourceVersion"),
            ("uid", "/metadata/uid"),
        ] {
            if let Some(wanted) = patch.pointer(pointer)
                && !wanted.is_null()
                && Some(wanted) != current.pointer(pointer)
            {
                tracing::info!(node = name, field, ?wanted, have = ?current.pointer(pointer), "patch precondition failed");
                return conflict("nodes", name);
            }
        }
        let mut next = current.clone();
        merge_patch(&mut next, &patch);
        if next.pointer("/metadata/name") != current.pointer("/metadata/name")
            || next.get("kind") != current.get("kind")
            || next.get("apiVersion") != current.get("apiVersion")
        {
            return bad_request("stand-in: a patch may not change metadata.name, kind or apiVersion".into());
        }
        if let Err(e) = validate_node(&mut next) {
            return invalid("nodes", name, e);
        }
        // Same uid as before (a patch cannot change it); a no-op patch still gets a new version here.
        next["metadata"]["uid"] = current.pointer("/metadata/uid").cloned().unwrap_or(Value::Null);
        next["metadata"]["resourceVersion"] = json!(self.next_rv());
        self.nodes.insert(name.to_string(), next.clone());
        Reply::new(200, next)
    }

    fn list_pods(&self, req: &ApiRequest) -> Reply {
        let terms = match req.query.get("fieldSelector") {
            Some(sel) => match parse_field_selector(sel) {
                Ok(t) => t,
                Err(e) => return bad_request(e),
            },
            None => Vec::new(),
        };
        let items = self
            .pods
            .values()
            .map(|p| &p.object)
            .filter(|pod| terms.iter().all(|t| (pod_field(pod, &t.key) == t.value) == t.equal))
            .cloned()
            .collect();
        self.list("PodList", items)
    }

    fn evict(&mut self, req: &ApiRequest, ns: &str, name: &str) -> Reply {
        let body = match req.json_object() {
            Ok(b) => b,
            Err(reply) => return reply,
        };
        if let Some(kind) = body.get("kind")
            && kind != "Eviction"
        {
            return bad_request(format!("the body is a {kind}, not an Eviction"));
        }
        if let Some(body_name) = body.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str)
            && body_name != name
        {
            return bad_request(format!(
                "name in URL does not match name in Eviction object ({body_name})"
            ));
        }
        let key = (ns.to_string(), name.to_string());
        let Some(pod) = self.pods.get_mut(&key) else {
            return not_found("pods", name);
        };
        if pod.pdb_blocked > 0 {
            pod.pdb_blocked -= 1;
            return Reply::new(
                429,
                status(
                    429,
                    "TooManyRequests",
                    "Cannot evict pod as it would violate the pod's disruption budget.".into(),
                    Some(json!({"causes": [{
                        "reason": "DisruptionBudget",
                        "message": format!("The disruption budget for {ns}/{name} (stand-in) needs 1 healthy pods and has 1 currently"),
                    }]})),
                ),
            );
        }
        self.pods.remove(&key);
        self.next_rv();
        Reply::new(201, status(201, "", String::new(), None))
    }

    fn control(&mut self, req: &Value) -> Value {
        match self.try_control(req) {
            Ok(reply) => reply,
            Err(e) => control_error(e),
        }
    }

    fn try_control(&mut self, req: &Value) -> Result<Value, String> {
        let op = req
            .get("op")
            .and_then(Value::as_str)
            .ok_or("missing \"op\" (a string)")?;
        let text = |field: &str| -> Result<String, String> {
            match req.get(field).and_then(Value::as_str) {
                Some(s) if !s.is_empty() => Ok(s.to_string()),
                _ => Err(format!("{op}: missing \"{field}\" (a non-empty string)")),
            }
        };
        match op {
            "put_node" => {
                let name = text("name")?;
                let labels = req.get("labels").cloned().unwrap_or_else(|| json!({}));
                let taints = req.get("taints").cloned().unwrap_or_else(|| json!([]));
                check_labels(&labels).map_err(|e| format!("put_node: {e}"))?;
                let taints = normalize_taints(&taints).map_err(|e| format!("put_node: {e}"))?;
                let node = self.new_node(&name, labels, taints);
                self.nodes.insert(name, node.clone());
                Ok(json!({"ok": true, "node": node}))
            }
            "set_label" | "remove_label" | "set_taints" => {
                let name = text("name")?;
                let mut node = self
                    .nodes
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| format!("{op}: no node {name:?} (put_node it first)"))?;
                let before = node.clone();
                match op {
                    "set_label" => {
                        let key = text("key")?;
                        let value = req
                            .get("value")
                            .and_then(Value::as_str)
                            .ok_or("set_label: missing \"value\" (a string)")?;
                        node["metadata"]["labels"][key] = json!(value);
                    }
                    "remove_label" => {
                        let key = text("key")?;
                        if let Some(labels) = node["metadata"]["labels"].as_object_mut() {
                            labels.remove(&key);
                        }
                    }
                    _ => {
                        let taints = req.get("taints").ok_or("set_taints: missing \"taints\" (a list)")?;
                        let taints = normalize_taints(taints).map_err(|e| format!("set_taints: {e}"))?;
                        node["spec"]["taints"] = Value::Array(taints);
                    }
                }
                if node != before {
                    node["metadata"]["resourceVersion"] = json!(self.next_rv());
                    self.nodes.insert(name, node.clone());
                }
                Ok(json!({"ok": true, "node": node}))
            }
            "put_pod" => {
                let namespace = text("namespace")?;
                let name = text("name")?;
                let node = text("node")?;
                let owner_kind = match req.get("owner_kind") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(k)) if !k.is_empty() => Some(k.clone()),
                    Some(other) => return Err(format!("put_pod: owner_kind must be a kind or null, not {other}")),
                };
                let mirror = match req.get("mirror") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(other) => return Err(format!("put_pod: mirror must be a boolean, not {other}")),
                };
                let pdb_blocked = match req.get("pdb_blocked") {
                    None | Some(Value::Null) => 0,
                    Some(v) => v
                        .as_u64()
                        .ok_or_else(|| format!("put_pod: pdb_blocked must be a count, not {v}"))?,
                };
                let object = self.new_pod(&namespace, &name, &node, owner_kind.as_deref(), mirror);
                self.pods.insert(
                    (namespace, name),
                    StoredPod {
                        object: object.clone(),
                        pdb_blocked,
                    },
                );
                Ok(json!({"ok": true, "pod": object}))
            }
            "state" => Ok(json!({
                "ok": true,
                "nodes": self.nodes,
                "pods": self.pods.values().map(|p| p.object.clone()).collect::<Vec<_>>(),
                "secrets": self.secrets.keys().collect::<Vec<_>>(),
            })),
            other => Err(format!(
                "unknown op {other:?} (known: put_node, set_label, remove_label, set_taints, put_pod, state)"
            )),
        }
    }

    /// A Node as the kubelet registers it (a replaced node keeps its uid).
    fn new_node(&mut self, name: &str, labels: Value, taints: Vec<Value>) -> Value {
        let uid = match self.nodes.get(name).and_then(|n| n.pointer("/metadata/uid")) {
            Some(uid) => uid.clone(),
            None => json!(self.next_uid()),
        };
        let mut all_labels = json!({
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
        });
        merge_patch(&mut all_labels, &labels);
        let now = now_rfc3339();
        let mut spec = json!({});
        if !taints.is_empty() {
            spec["taints"] = Value::Array(taints);
        }
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "uid": uid,
                "resourceVersion": self.next_rv(),
                "creationTimestamp": now,
                "labels": all_labels,
            },
            "spec": spec,
            "status": {
                "conditions": [{
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status (stand-in)",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }],
                "nodeInfo": {"kubeletVersion": "v0.0.0-stand-in", "operatingSystem": "linux", "architecture": "amd64"},
            },
        })
    }

    fn new_pod(&mut self, ns: &str, name: &str, node: &str, owner_kind: Option<&str>, mirror: bool) -> Value {
        let mut meta = json!({
            "name": name,
            "namespace": ns,
            "uid": self.next_uid(),
            "resourceVersion": self.next_rv(),
            "creationTimestamp": now_rfc3339(),
        });
        if let Some(kind) = owner_kind {
            let api_version = match kind {
                "ReplicaSet" | "DaemonSet" | "StatefulSet" | "Deployment" => "apps/v1",
                "Job" => "batch/v1",
                "Node" | "ReplicationController" => "v1",
                _ => "stand-in.polynimbus.io/v1",
            };
            meta["ownerReferences"] = json!([{
                "apiVersion": api_version,
                "kind": kind,
                "name": format!("{name}-owner"),
                "uid": self.next_uid(),
                "controller": true,
                "blockOwnerDeletion": true,
            }]);
        }
        if mirror {
            meta["annotations"] = json!({ MIRROR_ANNOTATION: "stand-in" });
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "stand-in"}]},
            "status": {"phase": "Running"},
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    fn req(method: &str, path_and_query: &str, content_type: Option<&str>, body: Value) -> ApiRequest {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        ApiRequest {
            method: method.into(),
            path: path.into(),
            query: parse_query(query),
            content_type: content_type.map(str::to_string),
            body: if body.is_null() {
                Bytes::new()
            } else {
                Bytes::from(body.to_string())
            },
            too_large: false,
        }
    }

    fn store_with_node() -> Store {
        let mut s = Store::default();
        let r = s.control(&json!({"op": "put_node", "name": "n1", "labels": {"team": "a"},
            "taints": [{"key": "x", "value": "", "effect": "NoSchedule"}]}));
        assert_eq!(r["ok"], true, "{r}");
        s
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        // Examples from RFC 7386, appendix A.
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "b"}), json!({"b": "c"}), json!({"a": "b", "b": "c"})),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"e": null}), json!({"a": 1}), json!({"e": null, "a": 1})),
            (json!({}), json!({"a": {"bb": {"ccc": null}}}), json!({"a": {"bb": {}}})),
        ];
        for (mut target, patch, want) in cases {
            merge_patch(&mut target, &patch);
            assert_eq!(target, want, "patch {patch}");
        }
    }

    #[test]
    fn put_node_registers_a_ready_node_with_kubelet_labels() {
        let mut s = store_with_node();
        let r = s.handle(&req("GET", "/api/v1/nodes/n1", None, Value::Null));
        assert_eq!(r.status, 200);
        let n = r.body;
        assert_eq!(n["metadata"]["labels"]["team"], "a");
        assert_eq!(n["metadata"]["labels"]["kubernetes.io/hostname"], "n1");
        assert_eq!(n["metadata"]["resourceVersion"], "1");
        assert_eq!(n["spec"]["taints"], json!([{"key": "x", "effect": "NoSchedule"}]));
        assert_eq!(n["status"]["conditions"][0]["type"], "Ready");
        assert_eq!(n["status"]["conditions"][0]["status"], "True");
        let uid = n["metadata"]["uid"].clone();
        s.control(&json!({"op": "put_node", "name": "n1"}));
        let again = s.handle(&req("GET", "/api/v1/nodes/n1", None, Value::Null)).body;
        assert_eq!(again["metadata"]["uid"], uid, "a replaced node keeps its uid");
        assert_eq!(again["metadata"]["resourceVersion"], "2");
        assert_eq!(again["spec"], json!({}));
    }

    #[test]
    fn merge_patch_checks_the_resource_version_and_bumps_it() {
        let mut s = store_with_node();
        let merge = Some("application/merge-patch+json");
        let stale = s.handle(&req(
            "PATCH",
            "/api/v1/nodes/n1",
            merge,
            json!({"metadata": {"resourceVersion": "0", "labels": {"p": "q"}}}),
        ));
        assert_eq!(stale.status, 409);
        assert_eq!(stale.body["reason"], "Conflict");
        let ok = s.handle(&req(
            "PATCH",
            "/api/v1/nodes/n1",
            merge,
            json!({"metadata": {"resourceVersion": "1", "labels": {"p": "q", "team": null}}}),
        ));
        assert_eq!(ok.status, 200, "{}", ok.body);
        assert_eq!(ok.body["metadata"]["resourceVersion"], "2");
        assert_eq!(ok.body["metadata"]["labels"]["p"], "q");
        assert!(ok.body["metadata"]["labels"].get("team").is_none());
        // Without a resourceVersion the patch applies unconditionally.
        let cordon = s.handle(&req(
            "PATCH",
            "/api/v1/nodes/n1",
            Some("application/strategic-merge-patch+json"),
            json!({"spec": {"unschedulable": true}}),
        ));
        assert_eq!(cordon.status, 200);
        assert_eq!(cordon.body["spec"]["unschedulable"], true);
        assert_eq!(cordon.body["spec"]["taints"][0]["key"], "x");
        assert_eq!(cordon.body["metadata"]["resourceVersion"], "3");
    }

    #[test]
    fn bad_patches_are_refused() {
        let mut s = store_with_node();
        let path = "/api/v1/nodes/n1";
        let apply = s.handle(&req("PATCH", path, Some("application/apply-patch+yaml"), json!({})));
        assert_eq!(apply.status, 415);
        let json_patch = s.handle(&req("PATCH", path, Some("application/json-patch+json"), json!([])));
        assert_eq!(json_patch.status, 415);
        let directive = s.handle(&req(
            "PATCH",
            path,
            Some("application/strategic-merge-patch+json"),
            json!({"spec": {"$retainKeys": ["taints"]}}),
        ));
        assert_eq!(directive.status, 400);
        let dup = s.handle(&req(
            "PATCH",
            path,
            Some("application/merge-patch+json"),
            json!({"spec": {"taints": [{"key": "a", "effect": "NoSchedule"}, {"key": "a", "effect": "NoSchedule"}]}}),
        ));
        assert_eq!(dup.status, 422, "{}", dup.body);
        let rename = s.handle(&req(
            "PATCH",
            path,
            Some("application/merge-patch+json"),
            json!({"metadata": {"name": "other"}}),
        ));
        assert_eq!(rename.status, 400);
        let missing = s.handle(&req(
            "PATCH",
            "/api/v1/nodes/n9",
            Some("application/merge-patch+json"),
            json!({}),
        ));
        assert_eq!(missing.status, 404);
        assert_eq!(missing.body["message"], "nodes \"n9\" not found");
        // Nothing above changed the node.
        assert_eq!(s.nodes["n1"]["metadata"]["resourceVersion"], "1");
    }

    #[test]
    fn secrets_are_created_once_folded_to_base64_and_deleted() {
        let mut s = Store::default();
        let path = "/api/v1/namespaces/kube-system/secrets";
        let body = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "bootstrap-token-abcdef", "namespace": "kube-system"},
            "type": "bootstrap.kubernetes.io/token", "stringData": {"token-id": "abcdef"}});
        let created = s.handle(&req("POST", path, Some("application/json"), body.clone()));
        assert_eq!(created.status, 201);
        assert_eq!(created.body["data"]["token-id"], "YWJjZGVm");
        assert!(created.body.get("stringData").is_none());
        let again = s.handle(&req("POST", path, Some("application/json"), body));
        assert_eq!(again.status, 409);
        assert_eq!(again.body["reason"], "AlreadyExists");
        let list = s.handle(&req("GET", path, None, Value::Null));
        assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
        let del = s.handle(&req(
            "DELETE",
            &format!("{path}/bootstrap-token-abcdef"),
            None,
            Value::Null,
        ));
        assert_eq!(del.status, 200);
        let gone = s.handle(&req(
            "DELETE",
            &format!("{path}/bootstrap-token-abcdef"),
            None,
            Value::Null,
        ));
        assert_eq!(gone.status, 404);
        assert_eq!(gone.body["reason"], "NotFound");
    }

    #[test]
    fn pods_are_listed_by_node_and_evicted_after_pdb_refusals() {
        let mut s = Store::default();
        for (name, node, blocked) in [("a", "n1", 1), ("b", "n2", 0)] {
            let r = s.control(
                &json!({"op": "put_pod", "namespace": "apps", "name": name, "node": node,
                "owner_kind": "ReplicaSet", "mirror": false, "pdb_blocked": blocked}),
            );
            assert_eq!(r["ok"], true, "{r}");
        }
        let on_n1 = s.handle(&req(
            "GET",
            "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1",
            None,
            Value::Null,
        ));
        let names: Vec<_> = on_n1.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["metadata"]["name"].clone())
            .collect();
        assert_eq!(names, vec![json!("a")]);
        let not_n1 = s.handle(&req(
            "GET",
            "/api/v1/pods?fieldSelector=spec.nodeName!%3Dn1",
            None,
            Value::Null,
        ));
        assert_eq!(not_n1.body["items"][0]["metadata"]["name"], "b");
        let all = s.handle(&req("GET", "/api/v1/pods", None, Value::Null));
        assert_eq!(all.body["items"].as_array().unwrap().len(), 2);
        let bad = s.handle(&req(
            "GET",
            "/api/v1/pods?fieldSelector=spec.hostIP%3D1",
            None,
            Value::Null,
        ));
        assert_eq!(bad.status, 400);

        let evict = |s: &mut Store| {
            s.handle(&req(
                "POST",
                "/api/v1/namespaces/apps/pods/a/eviction",
                Some("application/json"),
                json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "a", "namespace": "apps"}}),
            ))
        };
        let refused = evict(&mut s);
        assert_eq!(refused.status, 429);
        assert_eq!(refused.body["details"]["causes"][0]["reason"], "DisruptionBudget");
        let done = evict(&mut s);
        assert_eq!(done.status, 201);
        assert_eq!(done.body["status"], "Success");
        assert_eq!(evict(&mut s).status, 404);
        assert_eq!(s.pods.len(), 1);
    }

    #[test]
    fn unknown_requests_are_unsupported() {
        let mut s = store_with_node();
        for (method, path) in [
            ("GET", "/apis/apps/v1/deployments"),
            ("PUT", "/api/v1/nodes/n1"),
            ("GET", "/api/v1/nodes?watch=true"),
            ("DELETE", "/api/v1/nodes/n1?dryRun=All"),
            ("GET", "/api/v1/namespaces/default/secrets"),
            ("GET", "/api/v1/nodes/"),
        ] {
            let r = s.handle(&req(method, path, None, Value::Null));
            assert_eq!(r.status, 404, "{method} {path}");
            assert!(r.unsupported, "{method} {path}");
            let msg = r.body["message"].as_str().unwrap();
            assert!(
                msg.starts_with(&format!("stand-in: unsupported request {method} /")),
                "{msg}"
            );
        }
        assert!(s.nodes.contains_key("n1"));
    }

    #[test]
    fn control_errors_say_what_is_wrong() {
        let mut s = Store::default();
        let r = s.control(&json!({"op": "set_label", "name": "nope", "key": "k", "value": "v"}));
        assert_eq!(r["ok"], false);
        assert!(r["error"].as_str().unwrap().contains("put_node it first"), "{r}");
        let r = s.control(&json!({"op": "fly"}));
        assert!(r["error"].as_str().unwrap().contains("unknown op"), "{r}");
        let r = s.control(&json!({"op": "put_node", "name": "n", "taints": [{"key": "k", "effect": "Sometimes"}]}));
        assert!(r["error"].as_str().unwrap().contains("effect"), "{r}");
    }

    #[test]
    fn query_strings_are_decoded() {
        let q = parse_query(Some("fieldSelector=spec.nodeName%3Dn1&x=a+b&bad=%zz&flag"));
        assert_eq!(q["fieldSelector"], "spec.nodeName=n1");
        assert_eq!(q["x"], "a b");
        assert_eq!(q["bad"], "%zz");
        assert_eq!(q["flag"], "");
    }
}
