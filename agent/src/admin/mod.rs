//! The admin API: what the agent knows and does, as JSON over HTTP/1.1, on a unix socket (mode
//! 0600) and on 127.0.0.1:15000. The `ferry` CLI is its client.

mod check;

use std::{
    collections::BTreeMap,
    convert::Infallible,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Instant, SystemTime},
};

use futures_util::stream;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Frame, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    task::JoinSet,
};

use crate::{
    datapath::{Counters, DatapathView},
    discovery::kube::RefusedPolicy,
    identity::{CertManager, Issued},
    policy::Action,
    proxy::Proxy,
    state::StateHandle,
    telemetry::{AcceptBackoff, FlowKind, LogControl, Telemetry, http1_server},
};

type Body = BoxBody<Bytes, Infallible>;

/// The action `ferry policies` shows for a policy object that is not in force: refused as invalid.
pub const REFUSED: &str = "REFUSED";

/// A captured pod as the agent runs it.
#[derive(Debug, Clone, Serialize)]
pub struct LocalPodView {
    pub workload: String,
    pub netns: PathBuf,
    pub netns_cookie: u64,
    pub cgroup: PathBuf,
    pub programs: Vec<&'static str>,
}

/// What only the agent loop knows; it publishes a fresh copy after every reconcile.
#[derive(Debug, Clone, Default)]
pub struct LocalView {
    pub pods: Vec<LocalPodView>,
    /// Local meshed workloads whose capture failed, with the reason (retried).
    pub uncaptured: BTreeMap<String, String>,
    pub datapath: DatapathView,
}

pub struct Admin {
    pub node: String,
    pub config_path: PathBuf,
    pub started: Instant,
    pub state: StateHandle,
    pub proxy: Proxy,
    pub certs: Arc<CertManager>,
    pub telemetry: Arc<Telemetry>,
    pub counters: Counters,
    pub log: LogControl,
    pub local: RwLock<LocalView>,
    /// Kubernetes mode: policy objects whose current version was refused.
    pub refused_policies: RwLock<Vec<RefusedPolicy>>,
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(text)).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json_response(status, &json!({ "error": message.into() }))
}

fn query(request: &Request<Incoming>) -> BTreeMap<String, String> {
    request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// `%XX` and `+` decoding for query values (identities and addresses need `/` and `:`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or(""), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Admin {
    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let q = query(&request);
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/status") => json_response(StatusCode::OK, &self.status()),
            (&Method::GET, "/config_dump") => json_response(StatusCode::OK, &self.config_dump()),
            (&Method::GET, "/workloads") => json_response(StatusCode::OK, &self.workloads()),
            // Services arrive with Kubernetes discovery; the static file declares none yet.
            (&Method::GET, "/services") => json_response(StatusCode::OK, &self.services()),
            (&Method::GET, "/policies") => json_response(StatusCode::OK, &self.policies()),
            (&Method::GET, "/certificates") => json_response(StatusCode::OK, &self.certificates()),
            (&Method::GET, "/connections") => json_response(StatusCode::OK, &self.proxy.connections()),
            (&Method::GET, "/flows") => self.flows(&q),
            (&Method::GET, "/policy/check") => {
                match check::run(&self.state.load(), &q, |ip| self.proxy.from_node(ip)) {
                    Ok(result) => json_response(StatusCode::OK, &result),
                    Err(message) => error(StatusCode::BAD_REQUEST, message),
                }
            }
            (&Method::GET, "/datapath") => json_response(StatusCode::OK, &self.datapath()),
            (&Method::GET, "/metrics") => {
                let mut response = Response::new(Full::new(Bytes::from(self.telemetry.render())).boxed());
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/openmetrics-text"));
                response
            }
            (&Method::GET, "/logging") => {
                json_response(StatusCode::OK, &json!({ "level": self.log.current() }))
            }
            (&Method::POST | &Method::PUT, "/logging") => match q.get("level") {
                Some(level) => match self.log.set(level) {
                    Ok(()) => {
                        tracing::info!(level = %level, "log level changed");
                        json_response(StatusCode::OK, &json!({ "level": self.log.current() }))
                    }
                    Err(message) => error(StatusCode::BAD_REQUEST, message),
                },
                None => error(StatusCode::BAD_REQUEST, "missing ?level=<filter>"),
            },
            (_, path) => error(StatusCode::NOT_FOUND, format!("no such endpoint {path}")),
        }
    }

    fn status(&self) -> Value {
        let state = self.state.load();
        let local = self.local.read().unwrap_or_else(|e| e.into_inner());
        let (undelivered, stream_window) = self.proxy.undelivered();
        json!({
            "node": self.node,
            "version": env!("CARGO_PKG_VERSION"),
            "config": self.config_path,
            "uptime_seconds": self.started.elapsed().as_secs(),
            // As `/healthz/ready` answers: null when ready, else why not.
            "not_ready": self.telemetry.not_ready(),
            "trust_domain": state.trust_domain,
            "workloads_known": state.workloads().len(),
            "workloads_captured": local.pods.len(),
            "workloads_uncaptured": local.uncaptured.len(),
            "policies": state.policies.policies().len(),
            "node_traffic": state.node_traffic,
            "connections": self.proxy.connections().len(),
            "undelivered_bytes": undelivered,
            "stream_window_bytes": stream_window,
            "certificates": self.certs.all().len(),
            "certificates_pending": self.certs.pending(),
            "certificates_expired": self.certs.expired(),
            "signer": self.certs.signer_name(),
            "trusted_roots": self.certs.trusted_roots(),
        })
    }

    fn config_dump(&self) -> Value {
        json!({
            "status": self.status(),
            "workloads": self.workloads(),
            "policies": self.policies(),
            "certificates": self.certificates(),
            "datapath": self.datapath(),
        })
    }

    fn services(&self) -> Vec<Value> {
        let state = self.state.load();
        state
            .services()
            .iter()
            .map(|s| {
                json!({
                    "name": s.name,
                    "namespace": s.namespace,
                    "hostname": s.hostname(),
                    "vips": s.vips,
                    "ports": s.ports.iter().map(|p| format!("{}->{}", p.port, p.target_port)).collect::<Vec<_>>(),
                    "endpoints": s.endpoints.iter().map(|w| w.key()).collect::<Vec<_>>(),
                    "client_ip_affinity_seconds": s.affinity.map(|timeout| timeout.as_secs()),
                })
            })
            .collect()
    }

    fn workloads(&self) -> Vec<Value> {
        let state = self.state.load();
        let local = self.local.read().unwrap_or_else(|e| e.into_inner());
        state
            .workloads()
            .iter()
            .map(|w| {
                let captured = local.pods.iter().find(|p| p.workload == w.key());
                json!({
                    "name": w.name,
                    "namespace": w.namespace,
                    "workload_name": w.metrics_name(),
                    "service_account": w.service_account,
                    "identity": w.identity(&state.trust_domain).to_string(),
                    "ips": w.ips,
                    "node": w.node,
                    "labels": w.labels,
                    "meshed": w.meshed,
                    "local": state.is_local(w),
                    "captured": captured.is_some(),
                    "capture_error": local.uncaptured.get(&w.key()),
                    "netns": captured.map(|p| &p.netns),
                    "netns_cookie": captured.map(|p| p.netns_cookie),
                    "cgroup": captured.map(|p| &p.cgroup),
                    "programs": captured.map(|p| &p.programs),
                })
            })
            .collect()
    }

    fn policies(&self) -> Vec<Value> {
        let in_force: Vec<Value> = self
            .state
            .load()
            .policies
            .policies()
            .iter()
            .map(|p| {
                let action = match p.action {
                    Action::Allow => "ALLOW",
                    Action::Deny => "DENY",
                    Action::Audit => "AUDIT",
                };
                json!({
                    "name": p.name,
                    "namespace": p.namespace,
                    "action": action,
                    "dry_run": p.dry_run,
                    "selector": p.selector,
                    "rules": p.rules.len(),
                    "warnings": p.warnings,
                })
            })
            .collect();
        // An object refused with no earlier version in force is in no policy set: listed here,
        // so that whoever looks for it learns why nothing enforces it.
        let refused = self.refused_policies.read().unwrap_or_else(|e| e.into_inner());
        let refused = refused.iter().filter(|r| !r.earlier_version_in_force).map(|r| {
            json!({
                "name": r.name,
                "namespace": r.namespace,
                "action": REFUSED,
                "dry_run": false,
                "selector": null,
                "rules": 0,
                "warnings": [format!("refused, not enforced: {}", r.reason)],
            })
        });
        in_force.into_iter().chain(refused).collect()
    }

    fn certificates(&self) -> Vec<Value> {
        // Leaves are signed by the root itself: the issuer names it (during a change of root,
        // certificates of both may be in use).
        let root = |issued: &Issued| {
            (issued.cert.chain.first())
                .and_then(|leaf| x509_parser::parse_x509_certificate(leaf).ok())
                .map(|(_, c)| c.issuer().to_string())
                .unwrap_or_default()
        };
        let now = SystemTime::now();
        let mut certs: Vec<Value> = self
            .certs
            .all()
            .iter()
            .map(|issued| {
                let cert = &issued.cert;
                let left = cert.not_after.duration_since(now).map(|d| d.as_secs() as i64).unwrap_or(0);
                json!({
                    "identity": cert.identity.to_string(),
                    "state": if left > 0 { "issued" } else { "expired" },
                    "serial": cert.serial,
                    "not_before": rfc3339(cert.not_before),
                    "not_after": rfc3339(cert.not_after),
                    "expires_in_seconds": left,
                    "root": root(issued),
                })
            })
            .collect();
        // Those still waiting for their first certificate (by CSR), so an operator sees which.
        let pending = self.certs.pending_identities().into_iter();
        certs.extend(pending.map(|id| json!({"identity": id.to_string(), "state": "pending"})));
        certs.sort_by(|a, b| a["identity"].as_str().cmp(&b["identity"].as_str()));
        certs
    }

    fn datapath(&self) -> Value {
        let local = self.local.read().unwrap_or_else(|e| e.into_inner());
        let counters: BTreeMap<&str, u64> =
            self.counters.read().into_iter().map(|(c, v)| (c.name(), v)).collect();
        json!({
            "programs": local.datapath.programs,
            "maps": local.datapath.maps,
            "counters": counters,
            "pods_attached": local.pods.len(),
        })
    }

    /// Recent flow events as JSON lines; with `follow=1` the response stays open and streams new
    /// ones. `denied=1` keeps only denials.
    fn flows(&self, q: &BTreeMap<String, String>) -> Response<Body> {
        let denied_only = q.get("denied").is_some_and(|v| v == "1" || v == "true");
        let keep = move |kind: FlowKind| !denied_only || kind == FlowKind::Denied;
        let line = |event: &crate::telemetry::FlowEvent| {
            let mut text = serde_json::to_string(event).unwrap_or_default();
            text.push('\n');
            Bytes::from(text)
        };
        let live = q
            .get("follow")
            .is_some_and(|v| v == "1" || v == "true")
            .then(|| self.telemetry.flows.subscribe());
        let recent: Vec<Bytes> =
            self.telemetry.flows.recent().iter().filter(|e| keep(e.kind)).map(line).collect();
        let body: Body = match live {
            None => Full::new(Bytes::from(recent.concat())).boxed(),
            Some(receiver) => {
                let backlog = stream::iter(recent.into_iter().map(|b| Ok::<_, Infallible>(Frame::data(b))));
                let follow = stream::unfold(receiver, move |mut receiver| async move {
                    loop {
                        match receiver.recv().await {
                            Ok(event) if keep(event.kind) => {
                                return Some((Ok(Frame::data(line(&event))), receiver));
                            }
                            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                        }
                    }
                });
                StreamBody::new(futures_util::StreamExt::chain(backlog, follow)).boxed()
            }
        };
        let mut response = Response::new(body);
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
        response
    }

    /// Serves the API on a unix socket (mode 0600) and a TCP address until the tasks are dropped.
    /// Serves on `socket` (replacing a file left there) and on `tcp`, in tasks added to `tasks`.
    pub async fn serve(
        self: Arc<Self>,
        socket: &Path,
        tcp: Option<Arc<TcpListener>>,
        tasks: &mut JoinSet<()>,
    ) -> std::io::Result<()> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // A socket file left by a previous agent would make bind fail.
        let _ = std::fs::remove_file(socket);
        let unix = UnixListener::bind(socket)?;
        std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let admin = self.clone();
        tasks.spawn(async move {
            let mut backoff = AcceptBackoff::default();
            loop {
                match unix.accept().await {
                    Ok((stream, _)) => admin.clone().serve_connection(stream),
                    Err(e) => backoff.failed(&"admin socket", &e).await,
                }
            }
        });
        if let Some(tcp) = tcp {
            tasks.spawn(async move {
                let mut backoff = AcceptBackoff::default();
                loop {
                    match tcp.accept().await {
                        Ok((stream, _)) => self.clone().serve_connection(stream),
                        Err(e) => backoff.failed(&"admin TCP", &e).await,
                    }
                }
            });
        }
        Ok(())
    }

    fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(self: Arc<Self>, stream: S) {
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let admin = self.clone();
                async move { Ok::<_, Infallible>(admin.handle(request).await) }
            });
            let _ = http1_server().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn decodes_query_values() {
        assert_eq!(super::percent_decode("default%2Fsa-a"), "default/sa-a");
        assert_eq!(super::percent_decode("10.0.0.1%3A80"), "10.0.0.1:80");
        assert_eq!(super::percent_decode("a+b%"), "a b%");
    }
}
