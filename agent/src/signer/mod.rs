//! `ferry signer`: the cluster's workload CA. It holds the root key (a Secret only it reads,
//! created on first start unless an operator supplied one), publishes the root certificate in a
//! ConfigMap the agents mount, and answers the agents' CertificateSigningRequests for
//! `ferry.dev/workload`: approve and sign, or deny with a reason (see [`review`]).

mod metrics;
pub mod review;

use std::{
    net::SocketAddr,
    pin::pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context;
use futures_util::TryStreamExt;
use k8s_openapi::{
    ByteString,
    api::{
        certificates::v1::{CertificateSigningRequest, CertificateSigningRequestCondition},
        core::v1::{Pod, Secret},
    },
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};

use crate::identity::{
    FileCa, ROOT_CERT_FILE, ROOT_KEY_FILE, TRUST_BUNDLE_FILE, certs_to_pem, csr::SIGNER_NAME, new_root,
};
use metrics::SignerMetrics;
use review::{Authority, Denial, Request};

/// `ferry signer`'s settings (its command-line flags).
pub struct Options {
    /// Where the CA Secret and the root ConfigMap live.
    pub namespace: String,
    pub ca_secret: String,
    pub root_config_map: String,
    pub authority: Authority,
    pub cert_ttl: Duration,
    /// Where `/metrics` and `/healthz/ready` are served.
    pub metrics_addr: SocketAddr,
    /// Unanswered requests older than this are deleted instead of answered (see
    /// [`review::abandoned`]).
    pub abandoned_after: Duration,
}

struct Signer {
    client: Client,
    csrs: Api<CertificateSigningRequest>,
    ca: FileCa,
    authority: Authority,
    cert_ttl: Duration,
    abandoned_after: Duration,
    metrics: Arc<SignerMetrics>,
    /// Why the CA Secret was last unusable, until it is read well again: logged once, not at
    /// every poll.
    secret_refused: Option<String>,
}

/// How often the CA Secret is read again: an operator rotating the root edits it.
const CA_SECRET_POLL: Duration = Duration::from_secs(10);

pub async fn run(options: Options) -> anyhow::Result<()> {
    let metrics = Arc::new(SignerMetrics::default());
    let listener = TcpListener::bind(options.metrics_addr)
        .await
        .with_context(|| format!("binding {} (metrics)", options.metrics_addr))?;
    tokio::spawn(crate::telemetry::serve(metrics.clone(), Arc::new(listener)));
    let client = Client::try_default().await.context("connecting to the Kubernetes API")?;
    let ca = load_or_create_ca(&client, &options).await?;
    publish_root(&client, &options, &ca).await?;
    let mut signer = Signer {
        csrs: Api::all(client.clone()),
        client,
        ca,
        authority: options.authority.clone(),
        cert_ttl: options.cert_ttl,
        abandoned_after: options.abandoned_after,
        metrics,
        secret_refused: None,
    };
    let requests = watcher::Config::default().fields(&format!("spec.signerName={SIGNER_NAME}"));
    let mut requests = pin!(watcher(signer.csrs.clone(), requests).default_backoff().applied_objects());
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tracing::info!(signer = SIGNER_NAME, trust_domain = %signer.authority.trust_domain, "signing workload certificates");
    signer.metrics.set_serving();
    let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + CA_SECRET_POLL, CA_SECRET_POLL);
    loop {
        tokio::select! {
            _ = poll.tick() => signer.follow_secret(&options).await,
            next = requests.try_next() => match next {
                Ok(Some(csr)) => {
                    let name = csr.metadata.name.unwrap_or_default();
                    // The agent gives up after a minute and asks again, so a failure here loses nothing.
                    match signer.handle(&name).await {
                        Ok(()) => {}
                        Err(e) if lost_race(&e) => {
                            tracing::debug!(csr = %name, "another signer replica answered the request first");
                        }
                        Err(e) => {
                            signer.metrics.error();
                            tracing::error!(csr = %name, "cannot answer the certificate request: {e:#}");
                        }
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => tracing::warn!("watching CertificateSigningRequests: {e}"),
            },
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        }
    }
}

impl Signer {
    /// Takes up the CA Secret's root if it changed. It is published first, so agents learn of
    /// a new root before anything is signed with it; until both succeed the previous root signs.
    async fn follow_secret(&mut self, options: &Options) {
        let changed = async {
            let ca = read_ca(&self.client, options).await?;
            if ca.trust_bundle() == self.ca.trust_bundle() {
                return Ok(None);
            }
            publish_root(&self.client, options, &ca).await?;
            anyhow::Ok(Some(ca))
        };
        match changed.await {
            Ok(changed) => {
                self.secret_refused = None;
                if let Some(ca) = changed {
                    let roots = ca.trust_bundle().len();
                    tracing::info!(roots, "the CA Secret changed: signing with its root from now on");
                    self.ca = ca;
                }
            }
            Err(e) => {
                let problem = format!("{e:#}");
                if self.secret_refused.as_ref() != Some(&problem) {
                    tracing::error!("the CA Secret cannot be used, the previous root signs: {problem}");
                    self.secret_refused = Some(problem);
                }
            }
        }
    }

    /// Answers one request, unless it already has an answer. Every write is conditional on the
    /// version of the request it was decided on: replicas answer the same requests, and the
    /// first write wins (the others fail with a conflict, see [`lost_race`]).
    async fn handle(&self, name: &str) -> anyhow::Result<()> {
        // The event may be stale (e.g. our own approval): decide on the current object.
        let Some(csr) = self.csrs.get_opt(name).await? else { return Ok(()) };
        let status = csr.status.clone().unwrap_or_default();
        let conditions = status.conditions.unwrap_or_default();
        let answered = conditions.iter().any(|c| c.type_ == "Denied" || c.type_ == "Failed");
        if csr.spec.signer_name != SIGNER_NAME || answered || status.certificate.is_some() {
            return Ok(());
        }
        if review::abandoned(
            csr.metadata.creation_timestamp.as_ref(),
            SystemTime::now(),
            self.abandoned_after,
        ) {
            return self.delete_abandoned(name).await;
        }
        let approved = conditions.iter().any(|c| c.type_ == "Approved");
        let mut version = csr.metadata.resource_version.clone();
        match self.review(&csr).await? {
            Ok((request, node)) => {
                let id = &request.identity;
                if !approved {
                    let why =
                        format!("a pod of {}/{} runs on node {node}", id.namespace(), id.service_account());
                    let approval = condition("Approved", "FerrySignerApproved", why);
                    version = self.add_condition(name, version, conditions, approval, "approval").await?;
                }
                let leaf = self.ca.sign(id, &request.public_key, self.cert_ttl)?;
                let pem = certs_to_pem(std::slice::from_ref(&leaf.cert));
                let status = json!({"certificate": ByteString(pem.into_bytes())});
                self.patch(name, "status", version, status).await?;
                self.metrics.signed();
                tracing::info!(csr = %name, identity = %id, %node, serial = %leaf.serial, "certificate signed");
            }
            Err(Denial { reason, message }) => {
                // Someone else approved it: the signer's refusal is then a failure to sign.
                let (kind, subresource) =
                    if approved { ("Failed", "status") } else { ("Denied", "approval") };
                let refusal = condition(kind, reason, message.clone());
                self.add_condition(name, version, conditions, refusal, subresource).await?;
                tracing::warn!(csr = %name, reason, "certificate request refused: {message}");
                self.metrics.refused(reason);
            }
        }
        Ok(())
    }

    /// Deletes a request its agent no longer waits for (another replica may have done so).
    async fn delete_abandoned(&self, name: &str) -> anyhow::Result<()> {
        match self.csrs.delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                self.metrics.abandoned();
                tracing::debug!(csr = %name, "deleted an abandoned certificate request");
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(e) => Err(e).context("deleting an abandoned request"),
        }
    }

    /// Looks up the requesting agent's pod and the pods on its node, and decides.
    async fn review(
        &self,
        csr: &CertificateSigningRequest,
    ) -> anyhow::Result<Result<(Request, String), Denial>> {
        let request = match self.authority.parse(&csr.spec) {
            Ok(request) => request,
            Err(denial) => return Ok(Err(denial)),
        };
        let agents: Api<Pod> = Api::namespaced(self.client.clone(), &self.authority.agent_namespace);
        let agent_pod = agents.get_opt(&request.agent_pod).await.context("looking up the agent's pod")?;
        let node = agent_pod.as_ref().and_then(|p| p.spec.as_ref()).and_then(|s| s.node_name.clone());
        let pods_on_node = match node {
            // Read from the API, not a cache: a pod scheduled a moment ago counts.
            Some(node) => {
                let namespace = request.identity.namespace();
                let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
                let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
                pods.list(&on_node).await.context("listing the pods on the agent's node")?.items
            }
            None => Vec::new(),
        };
        Ok(self.authority.authorize(&request, agent_pod.as_ref(), &pods_on_node).map(|node| (request, node)))
    }

    /// Adds `condition` to the request at `version`; returns the request's new version.
    async fn add_condition(
        &self,
        name: &str,
        version: Option<String>,
        mut conditions: Vec<CertificateSigningRequestCondition>,
        condition: CertificateSigningRequestCondition,
        subresource: &str,
    ) -> anyhow::Result<Option<String>> {
        let kind = condition.type_.clone();
        conditions.push(condition);
        let status = json!({"conditions": conditions});
        self.patch(name, subresource, version, status)
            .await
            .with_context(|| format!("setting condition {kind}"))
    }

    /// Merges `status` into the request's `subresource`, only if the request is still at
    /// `version` (else the API answers 409 Conflict). Returns the request's new version.
    async fn patch(
        &self,
        name: &str,
        subresource: &str,
        version: Option<String>,
        status: serde_json::Value,
    ) -> anyhow::Result<Option<String>> {
        let patch = json!({"metadata": {"resourceVersion": version}, "status": status});
        let patched = self
            .csrs
            .patch_subresource(subresource, name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        Ok(patched.metadata.resource_version)
    }
}

fn condition(kind: &str, reason: &str, message: String) -> CertificateSigningRequestCondition {
    CertificateSigningRequestCondition {
        type_: kind.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message),
        ..Default::default()
    }
}

/// Whether a write lost to another signer replica's: the request changed since it was read.
fn lost_race(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(cause.downcast_ref::<kube::Error>(), Some(kube::Error::Api(status)) if status.is_conflict())
    })
}

/// The root from the CA Secret; a new root (stored there) when there is none yet.
async fn load_or_create_ca(client: &Client, options: &Options) -> anyhow::Result<FileCa> {
    let (namespace, name) = (&options.namespace, &options.ca_secret);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret =
        match secrets.get_opt(name).await.with_context(|| format!("reading Secret {namespace}/{name}"))? {
            Some(secret) => secret,
            None => {
                let (cert, key) = new_root().map_err(anyhow::Error::msg).context("creating a root CA")?;
                let secret = Secret {
                    metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
                    data: Some(
                        [(ROOT_CERT_FILE, cert), (ROOT_KEY_FILE, key)]
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), ByteString(v.into_bytes())))
                            .collect(),
                    ),
                    ..Default::default()
                };
                match secrets.create(&PostParams::default(), &secret).await {
                    Ok(created) => {
                        tracing::info!(secret = %format!("{namespace}/{name}"), "created a new root CA");
                        created
                    }
                    // Another signer replica was first: use its root.
                    Err(kube::Error::Api(status)) if status.is_already_exists() => secrets.get(name).await?,
                    Err(e) => return Err(e).with_context(|| format!("creating Secret {namespace}/{name}")),
                }
            }
        };
    ca_from_secret(&secret, options)
}

/// The root as the CA Secret holds it now.
async fn read_ca(client: &Client, options: &Options) -> anyhow::Result<FileCa> {
    let (namespace, name) = (&options.namespace, &options.ca_secret);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets.get(name).await.with_context(|| format!("reading Secret {namespace}/{name}"))?;
    ca_from_secret(&secret, options)
}

fn ca_from_secret(secret: &Secret, options: &Options) -> anyhow::Result<FileCa> {
    let field = |key: &str| {
        secret.data.as_ref().and_then(|d| d.get(key)).map(|v| String::from_utf8_lossy(&v.0).into_owned())
    };
    let origin = format!("Secret {}/{}", options.namespace, options.ca_secret);
    let missing = |key: &str| anyhow::anyhow!("{origin} has no {key}");
    let cert = field(ROOT_CERT_FILE).ok_or_else(|| missing(ROOT_CERT_FILE))?;
    let key = field(ROOT_KEY_FILE).ok_or_else(|| missing(ROOT_KEY_FILE))?;
    Ok(FileCa::from_pem(&origin, &cert, &key, field(TRUST_BUNDLE_FILE).as_deref())?)
}

/// The root certificate (and further roots to trust) for the agents: a ConfigMap they mount as
/// their `caDir`. No key is in it.
async fn publish_root(client: &Client, options: &Options, ca: &FileCa) -> anyhow::Result<()> {
    let bundle = ca.trust_bundle();
    let mut data = serde_json::Map::new();
    data.insert(ROOT_CERT_FILE.into(), certs_to_pem(&bundle[..1]).into());
    if bundle.len() > 1 {
        data.insert(TRUST_BUNDLE_FILE.into(), certs_to_pem(&bundle[1..]).into());
    }
    let (namespace, name) = (&options.namespace, &options.root_config_map);
    let config_map = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace},
        "data": data,
    });
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), namespace);
    maps.patch(name, &PatchParams::apply("ferry-signer").force(), &Patch::Apply(config_map))
        .await
        .with_context(|| format!("publishing the root certificate in ConfigMap {namespace}/{name}"))?;
    tracing::info!(config_map = %format!("{namespace}/{name}"), "root certificate published");
    Ok(())
}
