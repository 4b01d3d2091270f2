//! TEST STAND-IN for the Kubernetes API server (not a Kubernetes API server): an in-test hyper HTTP/1 server
//! on 127.0.0.1 that expects a script of requests, in order, answers each with a canned JSON reply, records
//! what it got, and answers anything unexpected with 500 (recorded as a failure). The client under test
//! reaches it through an ordinary kubeconfig (`server: http://127.0.0.1:PORT`, a bearer token), so the
//! production kube-rs code path is the one exercised.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// Bearer token in the stand-in's kubeconfig.
pub const BEARER: &str = "stand-in-bearer-token";

/// One expected request (`"GET /api/v1/nodes/n1"`, query decoded and sorted: `"GET /api/v1/pods?a=b"`)
/// and the reply to give.
pub struct Step {
    pub request: String,
    pub status: u16,
    pub reply: Value,
}

pub fn step(request: &str, status: u16, reply: Value) -> Step {
    Step {
        request: request.to_owned(),
        status,
        reply,
    }
}

/// A request the stand-in received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub request: String,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    pub body: Option<Value>,
}

#[derive(Default)]
struct State {
    script: VecDeque<Step>,
    seen: Vec<Seen>,
    failures: Vec<String>,
}

pub struct ApiStandIn {
    state: Arc<Mutex<State>>,
    dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl ApiStandIn {
    pub async fn start(script: Vec<Step>) -> ApiStandIn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            script: script.into(),
            ..State::default()
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("kubeconfig"),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: http://{addr}\n\
                 contexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: stand-in\n\
                 current-context: stand-in\nusers:\n- name: stand-in\n  user:\n    token: {BEARER}\n"
            ),
        )
        .unwrap();
        ApiStandIn { state, dir, task }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Every scripted request came, nothing else did, and all carried the kubeconfig's bearer token.
    pub fn assert_done(&self) {
        let st = self.state.lock().unwrap();
        assert!(st.failures.is_empty(), "unexpected requests: {:?}", st.failures);
        let left: Vec<_> = st.script.iter().map(|s| s.request.clone()).collect();
        assert!(left.is_empty(), "expected requests not made: {left:?}");
        for s in &st.seen {
            assert_eq!(
                s.authorization.as_deref(),
                Some(format!("Bearer {BEARER}").as_str()),
                "{}",
                s.request
            );
        }
    }
}

impl Drop for ApiStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn request_line(method: &str, path: &str, query: Option<&str>) -> String {
    let params: BTreeMap<String, String> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if params.is_empty() {
        format!("{method} {path}")
    } else {
        let q: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{method} {path}?{}", q.join("&"))
    }
}

async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let line = request_line(req.method().as_str(), req.uri().path(), req.uri().query());
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let content_type = header("content-type");
    let authorization = header("authorization");
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body = if bytes.is_empty() {
        None
    } else {
        Some(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    };

    let (status, reply) = {
        let mut st = state.lock().unwrap();
        st.seen.push(Seen {
            request: line.clone(),
            content_type,
            authorization,
            body,
        });
        match st.script.front() {
            Some(s) if s.request == line => {
                let s = st.script.pop_front().unwrap();
                (s.status, s.reply)
            }
            other => {
                let want = other.map(|s| s.request.clone()).unwrap_or_else(|| "nothing".into());
                st.failures.push(format!("got {line}, expected {want}"));
                (
                    500,
                    status_reply(500, "InternalError", &format!("stand-in: got {line}, expected {want}")),
                )
            }
        }
    };
    let resp = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&reply).unwrap())))
        .unwrap();
    Ok(resp)
}

/// A `Status` object as the API server sends with errors.
pub fn status_reply(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": if code < 400 { "Success" } else { "Failure" },
        "message": message,
        "reason": reason,
        "code": code,
    })
}
