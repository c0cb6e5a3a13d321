//! Kubernetes as the source of workloads, services and policies (`ferry agent --kube`):
//! Namespaces, Pods and Services are watched cluster-wide (every node must know every meshed pod's
//! IP and identity) and turned into the same [`config::Workload`] and [`config::Service`] lists the
//! static file gives (a service's endpoints are derived from the pods, no EndpointSlice needed),
//! and Ferry's AuthorizationPolicy objects into the same compiled policies: one state model, two
//! sources.
//!
//! A namespace labelled `ferry.dev/mesh=enabled` enrols its pods; a pod labelled
//! `ferry.dev/mesh=disabled` opts out. Pods on this node also need their netns and cgroup: the
//! cgroup is found from the pod UID under the kubelet's tree (cgroupfs or systemd driver), the netns
//! through a process in it. A pod whose processes do not exist yet is retried, not lost. When the
//! API server is unreachable the last known workloads stay in force.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures_util::StreamExt;
use k8s_openapi::apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio::sync::{Notify, mpsc};

use super::objects::{Namespace, Pod, PodSpec, Service};
use crate::{
    config::{self, TargetPort},
    policy::{
        AuthorizationPolicy, AuthorizationPolicyResource, ISTIO_ROOT_NAMESPACE, Policy, ROOT_NAMESPACE, Spec,
    },
};

/// The label that enrols a namespace (`enabled`) or opts a pod out (`disabled`).
pub const MESH_LABEL: &str = "ferry.dev/mesh";
/// `"true"` on a pod the agent of its node has captured. Agents on other nodes tunnel to a pod
/// only with it, and reach any other (a pod on a node with no agent, or not captured yet) with
/// plain TCP, as if uncaptured, rather than at an HBONE port no one listens on.
pub const CAPTURED_ANNOTATION: &str = "ferry.dev/captured";
/// How often local pods whose netns is not there yet are looked for again.
const RETRY: Duration = Duration::from_secs(1);
/// Events are let settle this long into one update...
const SETTLE: Duration = Duration::from_millis(20);
/// ...and the cluster is looked through again no sooner than this after the last time. Each look
/// rebuilds the workloads from every pod (even for a change in a namespace that is not meshed),
/// and each update the node's state, so under churn (a rollout, a flapping readiness probe)
/// changes are coalesced, as Istio's control plane debounces its pushes; a lone change still
/// takes effect after [`SETTLE`].
const MIN_UPDATE_INTERVAL: Duration = Duration::from_millis(100);
/// How often the agent looks whether a policy CRD it did not find has been installed.
const CRD_POLL: Duration = Duration::from_secs(10);
const FERRY_POLICIES: &str =
    "Ferry authorization policies (authorizationpolicies.ferry.dev, from `ferry crd`)";
const ISTIO_POLICIES: &str = "Istio authorization policies (authorizationpolicies.security.istio.io)";
/// Which CRD a policy object comes from.
const FERRY: &str = "ferry";
const ISTIO: &str = "istio";

/// What the API says, as the agent uses it.
#[derive(Debug, Clone, Default)]
pub struct Discovered {
    pub workloads: Vec<Arc<config::Workload>>,
    pub services: Vec<config::Service>,
    pub policies: Vec<Policy>,
    /// Policy objects whose current version was refused as invalid.
    pub refused_policies: Vec<RefusedPolicy>,
    /// This node's running meshed pods that cannot be captured because their cgroup is not where
    /// `podCgroupRoot` says, by `namespace/name`, with why.
    pub unlocated: BTreeMap<String, String>,
}

/// A policy object whose current version the agent refused, for `ferry policies`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedPolicy {
    pub namespace: String,
    pub name: String,
    pub reason: String,
    /// An earlier version of it is in force instead (its entry in `ferry policies` says so).
    pub earlier_version_in_force: bool,
}

/// Watches the API server and sends what it holds whenever that changes. Policies are watched
/// as soon as their CRD (Ferry's, Istio's) is installed.
pub async fn spawn(client: Client, node: String, cgroup_root: PathBuf) -> mpsc::Receiver<Discovered> {
    let (namespaces, namespace_writer) = reflector::store::<Namespace>();
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (services, service_writer) = reflector::store::<Service>();
    let changed = Arc::new(Notify::new());
    // Policies are read as dynamic objects and converted one by one: an object the agent cannot
    // read (which the CRD's schema let through) is refused alone instead of failing the watch.
    let ferry_resource = ApiResource::erase::<AuthorizationPolicyResource>(&());
    let ferry_writer = reflector::store::Writer::<DynamicObject>::new(ferry_resource.clone());
    let istio_writer = reflector::store::Writer::<DynamicObject>::new(istio_policy_resource());
    let (ferry_policies, istio_policies) = (ferry_writer.as_reader(), istio_writer.as_reader());
    let ferry_api = Api::all_with(client.clone(), &ferry_resource);
    let with_policies = watch_once_installed(ferry_api, ferry_writer, &changed, FERRY_POLICIES).await;
    let istio_api = Api::all_with(client.clone(), &istio_policy_resource());
    let with_istio = watch_once_installed(istio_api, istio_writer, &changed, ISTIO_POLICIES).await;
    watch(Api::all(client.clone()), namespace_writer, changed.clone(), "namespaces");
    watch(Api::all(client.clone()), pod_writer, changed.clone(), "pods");
    watch(Api::all(client), service_writer, changed.clone(), "services");
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let ready = (namespaces.wait_until_ready().await, pods.wait_until_ready().await);
        let (Ok(()), Ok(()), Ok(())) = (ready.0, ready.1, services.wait_until_ready().await) else {
            return;
        };
        // Policies in force from the first update on: no moment without them.
        if with_policies && ferry_policies.wait_until_ready().await.is_err() {
            return;
        }
        if with_istio && istio_policies.wait_until_ready().await.is_err() {
            return;
        }
        let mut last = None;
        let mut workloads = Workloads::new(node, cgroup_root);
        let mut policies = PolicyObjects::default();
        loop {
            let looked = tokio::time::Instant::now();
            let namespaces = namespaces.state();
            let meshed = meshed_namespaces(&namespaces);
            let (workloads, waiting, unlocated) = workloads.look(&meshed, &pods.state());
            let services = meshed_services(&meshed, &services.state());
            let (ferry, istio) = (ferry_policies.state(), istio_policies.state());
            let versions: Vec<Option<String>> = ferry
                .iter()
                .map(|p| &p.metadata)
                .chain(istio.iter().map(|p| &p.metadata))
                .map(|m| m.resource_version.clone())
                .collect();
            let now = (workloads, services, versions, unlocated);
            if last.as_ref() != Some(&now) {
                last = Some(now.clone());
                let (workloads, services, _, unlocated) = now;
                let discovered = Discovered {
                    workloads,
                    services,
                    policies: policies.update(&ferry, &istio),
                    refused_policies: policies.refused(),
                    unlocated,
                };
                if tx.send(discovered).await.is_err() {
                    return;
                }
            }
            // Settle bursts of events into one update; look again soon for pods still starting.
            if waiting {
                let _ = tokio::time::timeout(RETRY, changed.notified()).await;
            } else {
                changed.notified().await;
            }
            tokio::time::sleep(SETTLE.max(MIN_UPDATE_INTERVAL.saturating_sub(looked.elapsed()))).await;
        }
    });
    rx
}

/// Istio's `security.istio.io/v1` AuthorizationPolicy, read as a dynamic object like Ferry's
/// (see [`PolicyObjects`]).
fn istio_policy_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy"),
        "authorizationpolicies",
    )
}

/// Whether the API serves this kind: `false` when it answers 404, its CRD not installed. Any other
/// failure (API server unreachable, access denied) is retried until the API answers: taking it
/// for "not installed" would leave the agent ignoring policies that exist.
async fn installed<K>(api: &Api<K>, what: &str) -> bool
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut delay = Duration::from_millis(200);
    loop {
        match api.list_metadata(&kube::api::ListParams::default().limit(1)).await {
            Ok(_) => return true,
            // An API group that does not exist answers 404 without a Status body (no "NotFound" reason).
            Err(kube::Error::Api(status)) if status.code == 404 => return false,
            Err(e) => {
                tracing::warn!("cannot tell whether {what} are served; asking again in {delay:?}: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(CRD_POLL);
            }
        }
    }
}

fn watch<K>(api: Api<K>, writer: reflector::store::Writer<K>, changed: Arc<Notify>, what: &'static str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let stream = reflector(writer, watcher(api, watcher::Config::default()));
    tokio::spawn(drive(stream.default_backoff(), changed, what));
}

/// Watches a policy kind if its CRD is installed (`true`). If not, looks for the CRD now and then
/// and watches it once it appears: Istio, or Ferry's own CRD, may be installed after the agent.
async fn watch_once_installed<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    changed: &Arc<Notify>,
    what: &'static str,
) -> bool
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    if installed(&api, what).await {
        watch(api, writer, changed.clone(), what);
        return true;
    }
    tracing::info!("no CRD for {what} is installed; looking again every {CRD_POLL:?}");
    let changed = changed.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(CRD_POLL).await;
            if installed(&api, what).await {
                tracing::info!("the CRD for {what} appeared: honouring them");
                return watch(api, writer, changed, what);
            }
        }
    });
    false
}

async fn drive<S, T>(stream: S, changed: Arc<Notify>, what: &'static str)
where
    S: futures_util::Stream<Item = Result<watcher::Event<T>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(_) => changed.notify_one(),
            // The watcher retries with backoff; the stores keep what they had.
            Err(e) => tracing::warn!("watching {what}: {e}"),
        }
    }
}

/// The names of the namespaces labelled into the mesh.
fn meshed_namespaces(namespaces: &[Arc<Namespace>]) -> HashSet<&str> {
    namespaces
        .iter()
        .filter(|ns| label(&ns.metadata.labels, MESH_LABEL) == Some("enabled"))
        .filter_map(|ns| ns.metadata.name.as_deref())
        .collect()
}

/// ClusterIP services with a selector in meshed namespaces. A named target port is resolved per
/// endpoint, from the container ports its pod names (see [`workload`]).
fn meshed_services(meshed: &HashSet<&str>, services: &[Arc<Service>]) -> Vec<config::Service> {
    let mut list: Vec<config::Service> = services
        .iter()
        .filter(|s| s.metadata.namespace.as_deref().is_some_and(|ns| meshed.contains(ns)))
        .filter_map(|s| {
            let spec = s.spec.as_ref()?;
            let selector = spec.selector.clone().filter(|sel| !sel.is_empty())?;
            let ips = spec.cluster_ips.clone().or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))?;
            let vips: Vec<_> = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
            let ports = spec.ports.iter().flatten().filter_map(|p| {
                let port = u16::try_from(p.port).ok()?;
                let target_port = match &p.target_port {
                    None => TargetPort::Number(port),
                    Some(IntOrString::Int(n)) => TargetPort::Number(u16::try_from(*n).ok()?),
                    Some(IntOrString::String(name)) => TargetPort::Name(name.clone()),
                };
                (p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                    .then_some(config::ServicePort { port, target_port })
            });
            let ports: Vec<_> = ports.collect();
            let internal_traffic_policy = match spec.internal_traffic_policy.as_deref() {
                Some("Local") => config::TrafficPolicy::Local,
                _ => config::TrafficPolicy::Cluster,
            };
            let session_affinity = match spec.session_affinity.as_deref() {
                Some("ClientIP") => config::SessionAffinity::ClientIp,
                _ => config::SessionAffinity::None,
            };
            let session_affinity_timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref()?.timeout_seconds)
                .and_then(|secs| u64::try_from(secs).ok())
                .map_or(config::DEFAULT_SESSION_AFFINITY_TIMEOUT, Duration::from_secs);
            (!vips.is_empty() && !ports.is_empty()).then(|| config::Service {
                name: s.metadata.name.clone().unwrap_or_default(),
                namespace: s.metadata.namespace.clone().unwrap_or_default(),
                vips,
                ports,
                selector,
                internal_traffic_policy,
                session_affinity,
                session_affinity_timeout,
            })
        })
        .collect();
    list.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    list
}

/// The pods of meshed namespaces as workloads, kept from one look through the cluster to the
/// next: a large cluster's pods mostly stay as they were, and converting (and copying) every one
/// of them on every update would cost the agent more than the update itself.
struct Workloads {
    node: String,
    cgroups: PodCgroups,
    /// Other nodes' pods, by the address of the pod object they were made from: the store hands out
    /// the same `Arc` until the API changes the pod, and keeping it here keeps its address from
    /// being reused. This node's pods are not kept: their netns may be recreated.
    remote: HashMap<usize, Converted, ahash::RandomState>,
    /// This node's workloads and the whole sorted list, as the last look found them.
    local: Vec<config::Workload>,
    list: Vec<Arc<config::Workload>>,
    looks: u64,
}

struct Converted {
    _pod: Arc<Pod>,
    workload: Option<Arc<config::Workload>>,
    /// The last look that found the pod.
    seen: u64,
}

impl Workloads {
    fn new(node: String, cgroup_root: PathBuf) -> Workloads {
        Workloads {
            node,
            cgroups: PodCgroups::new(cgroup_root),
            remote: HashMap::default(),
            local: Vec::new(),
            list: Vec::new(),
            looks: 0,
        }
    }

    /// The workloads of meshed namespaces, whether a local pod is still waiting for its netns, and
    /// the running local pods whose cgroup is not found at all (see [`Discovered::unlocated`]).
    fn look(
        &mut self,
        meshed: &HashSet<&str>,
        pods: &[Arc<Pod>],
    ) -> (Vec<Arc<config::Workload>>, bool, BTreeMap<String, String>) {
        self.looks += 1;
        let (mut waiting, mut converted, mut found) = (false, false, 0);
        let mut unlocated = BTreeMap::new();
        let mut local = Vec::new();
        let mut local_uids = HashSet::new();
        let mut list = Vec::with_capacity(self.list.len());
        for pod in pods {
            if !pod.metadata.namespace.as_deref().is_some_and(|ns| meshed.contains(ns)) {
                continue;
            }
            if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(self.node.as_str()) {
                local_uids.extend(pod.metadata.uid.as_deref());
                // Opted out: known (a service endpoint, reached with plain TCP), never captured.
                let opted_out = label(&pod.metadata.labels, MESH_LABEL) == Some("disabled");
                match workload(pod, &self.node, &mut self.cgroups, !opted_out) {
                    Some(workload) => local.push(workload),
                    None if !opted_out && is_running(pod) => {
                        waiting = true;
                        // A running pod's cgroup exists (the kubelet makes it before the pod's
                        // sandbox): not finding it means podCgroupRoot points elsewhere. One
                        // still there without a process is a pod starting or stopping.
                        if let Some((key, uid)) = pod_key(pod)
                            && pod.metadata.deletion_timestamp.is_none()
                            && self.cgroups.is_missing(uid)
                        {
                            let root = self.cgroups.root.display();
                            let why = format!(
                                "no cgroup of pod {uid} under {root} (kubepods, kubepods.slice): is podCgroupRoot right?"
                            );
                            unlocated.insert(key, why);
                        }
                    }
                    None => {}
                }
                continue;
            }
            let entry = self.remote.entry(Arc::as_ptr(pod) as usize).or_insert_with(|| {
                converted = true;
                let workload = workload(pod, &self.node, &mut self.cgroups, false).map(Arc::new);
                Converted { _pod: pod.clone(), workload, seen: 0 }
            });
            entry.seen = self.looks;
            found += 1;
            list.extend(entry.workload.clone());
        }
        let gone = found < self.remote.len();
        if gone {
            self.remote.retain(|_, c| c.seen == self.looks);
        }
        self.cgroups.retain(&local_uids);
        if converted || gone || local != self.local {
            list.extend(local.iter().cloned().map(Arc::new));
            list.sort_unstable_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            (self.local, self.list) = (local, list);
        }
        (self.list.clone(), waiting, unlocated)
    }
}

/// The policy objects (Ferry's and Istio's) and what is in force for each.
#[derive(Default)]
struct PolicyObjects {
    /// By namespace, name and kind.
    known: BTreeMap<(String, String, &'static str), KnownPolicy>,
}

struct KnownPolicy {
    version: Option<String>,
    /// This version's policy, or when this version is refused, the last valid version's.
    valid: Option<Policy>,
    /// Why this version is refused.
    refused: Option<String>,
}

impl PolicyObjects {
    /// The policies in force for these objects. Each version of an object is compiled, and its
    /// problems logged, once. An invalid version is refused with an error naming it, and the
    /// object's last valid version stays in force, saying so in its warnings: a mistake in an
    /// edit does not lift the policy it edits. (The CRD's schema refuses most mistakes at the API
    /// server, not all: an IP block of /33, say.)
    fn update(&mut self, ferry: &[Arc<DynamicObject>], istio: &[Arc<DynamicObject>]) -> Vec<Policy> {
        let objects = ferry.iter().map(|o| (FERRY, o)).chain(istio.iter().map(|o| (ISTIO, o)));
        let mut known = BTreeMap::new();
        for (kind, object) in objects {
            let metadata = &object.metadata;
            let (Some(name), Some(namespace)) = (&metadata.name, &metadata.namespace) else { continue };
            let id = (namespace.clone(), name.clone(), kind);
            let entry = match self.known.remove(&id) {
                Some(entry) if entry.version == metadata.resource_version => entry,
                previous => {
                    let version = metadata.resource_version.clone();
                    match compile(object, kind) {
                        Ok(valid) => KnownPolicy { version, valid, refused: None },
                        Err(e) => {
                            let valid = previous.and_then(|p| p.valid);
                            let kept =
                                if valid.is_some() { "; its last valid version stays in force" } else { "" };
                            tracing::error!(policy = %format!("{namespace}/{name}"), "policy refused: {e}{kept}");
                            KnownPolicy { version, valid, refused: Some(e) }
                        }
                    }
                }
            };
            known.insert(id, entry);
        }
        self.known = known;
        let in_force = self.known.values().filter_map(|known| {
            let mut policy = known.valid.clone()?;
            if let Some(reason) = &known.refused {
                policy
                    .warnings
                    .push(format!("its current version is refused ({reason}); this is its last valid one"));
            }
            Some(policy)
        });
        in_force.collect()
    }

    /// Objects whose current version was refused.
    fn refused(&self) -> Vec<RefusedPolicy> {
        let refused = self.known.iter().filter_map(|((namespace, name, _), known)| {
            Some(RefusedPolicy {
                namespace: namespace.clone(),
                name: name.clone(),
                reason: known.refused.clone()?,
                earlier_version_in_force: known.valid.is_some(),
            })
        });
        refused.collect()
    }
}

/// One policy object of Ferry's or Istio's CRD (`kind`) compiled: `None` when it is not for a
/// node proxy to enforce.
fn compile(object: &DynamicObject, kind: &str) -> Result<Option<Policy>, String> {
    let (Some(name), Some(namespace)) = (&object.metadata.name, &object.metadata.namespace) else {
        return Ok(None);
    };
    let spec = object.data.get("spec").cloned().unwrap_or_default();
    // Bound to waypoints and gateways, as in Istio's ambient node proxy.
    if let Some(field) = ["targetRef", "targetRefs"].into_iter().find(|f| spec.get(f).is_some()) {
        tracing::info!(policy = %format!("{namespace}/{name}"), "not enforced here: bound with {field} to a waypoint or gateway");
        return Ok(None);
    }
    let spec: Spec = if spec.is_null() {
        Spec::default()
    } else {
        serde_json::from_value(spec).map_err(|e| format!("spec: {e}"))?
    };
    let policy = AuthorizationPolicy {
        api_version: None,
        kind: None,
        metadata: crate::policy::Metadata {
            name: name.clone(),
            namespace: namespace.clone(),
            annotations: object.metadata.annotations.clone().unwrap_or_default(),
        },
        spec,
    };
    let root = if kind == ISTIO { ISTIO_ROOT_NAMESPACE } else { ROOT_NAMESPACE };
    policy.compile_with_root(root).map(Some)
}

/// The pod as a workload. One on this node is to be captured if `capture` (it has not opted out),
/// and is a workload only once its netns is found.
fn workload(pod: &Pod, node: &str, cgroups: &mut PodCgroups, capture: bool) -> Option<config::Workload> {
    let spec = pod.spec.as_ref()?;
    // A hostNetwork pod has the node's netns and address: not a workload (as in Istio ambient).
    // Traffic to it is traffic to the node.
    if spec.host_network == Some(true) {
        return None;
    }
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    // Every address of a dual-stack pod (podIP is only the primary one, IPv6 in an IPv6-first
    // cluster), in the pod's order.
    let ips: Vec<IpAddr> = match status.pod_ips.as_deref() {
        Some(pod_ips) if !pod_ips.is_empty() => pod_ips.iter().filter_map(|p| p.ip.parse().ok()).collect(),
        _ => status.pod_ip.as_deref().and_then(|ip| ip.parse().ok()).into_iter().collect(),
    };
    if ips.is_empty() {
        return None;
    }
    let pod_node = spec.node_name.clone()?;
    let local = pod_node == node;
    let (netns, cgroup) = if local && capture {
        let uid = pod.metadata.uid.as_deref()?;
        let cgroup = cgroups.find(uid)?;
        let netns = netns_of(&cgroup)?;
        (Some(netns), Some(cgroup))
    } else {
        (None, None)
    };
    let name = pod.metadata.name.clone()?;
    Some(config::Workload {
        workload_name: Some(workload_name(&name, &pod.metadata)),
        name,
        namespace: pod.metadata.namespace.clone()?,
        service_account: spec.service_account_name.clone().unwrap_or_else(|| "default".to_owned()),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ips,
        node: pod_node,
        // This agent captures its own pods; another node's are captured once its agent says so.
        meshed: if local {
            capture
        } else {
            label(&pod.metadata.annotations, CAPTURED_ANNOTATION) == Some("true")
        },
        // A terminating pod takes no new service connections (as kube-proxy leaves it out while
        // others serve): it is shutting down, and may refuse them.
        ready: pod.metadata.deletion_timestamp.is_none()
            && status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True"),
        netns,
        cgroup,
        ports: named_ports(spec),
    })
}

/// The workload a pod is an instance of, named as Istio names it in metrics: its controller, a
/// ReplicaSet named for its Deployment (the pod-template-hash suffix cut off), a Job for its
/// CronJob (the schedule time suffix cut off); the pod itself if nothing controls it. Pod names
/// change with every rollout; series labelled with them would grow without end.
fn workload_name(pod_name: &str, meta: &ObjectMeta) -> String {
    let Some(owner) = meta.owner_references.iter().flatten().find(|o| o.controller == Some(true)) else {
        return pod_name.to_owned();
    };
    let name = owner.name.as_str();
    let trimmed = match owner.kind.as_str() {
        "ReplicaSet" => label(&meta.labels, "pod-template-hash")
            .and_then(|hash| name.strip_suffix(hash))
            .and_then(|rest| rest.strip_suffix('-')),
        // CronJobs name their Jobs `<cronjob>-<minutes since the epoch>`.
        "Job" => name.rsplit_once('-').and_then(|(cron_job, suffix)| {
            ((8..=10).contains(&suffix.len()) && suffix.bytes().all(|b| b.is_ascii_digit()))
                .then_some(cron_job)
        }),
        _ => None,
    };
    trimmed.filter(|t| !t.is_empty()).unwrap_or(name).to_owned()
}

/// The pod's named TCP container ports, which services may name as their target port.
fn named_ports(spec: &PodSpec) -> BTreeMap<String, u16> {
    let ports = spec.containers.iter().flat_map(|c| c.ports.iter().flatten());
    ports
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| Some((p.name.clone()?, u16::try_from(p.container_port).ok()?)))
        .collect()
}

/// `namespace/name` and UID.
fn pod_key(pod: &Pod) -> Option<(String, &str)> {
    let m = &pod.metadata;
    Some((format!("{}/{}", m.namespace.as_deref()?, m.name.as_deref()?), m.uid.as_deref()?))
}

fn is_running(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// A label's (or an annotation's) value.
fn label<'a>(labels: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.as_ref()?.get(key).map(String::as_str)
}

/// Local pods' cgroup directories by pod UID: found once by scanning the kubelet's tree, not again
/// on every update (the netns is looked up each time: a pod's sandbox may be recreated).
struct PodCgroups {
    root: PathBuf,
    by_uid: HashMap<String, PathBuf>,
    /// The pods the last look for found no cgroup of (see [`Discovered::unlocated`]).
    missing: HashSet<String>,
}

impl PodCgroups {
    fn new(root: PathBuf) -> PodCgroups {
        PodCgroups { root, by_uid: HashMap::new(), missing: HashSet::new() }
    }

    fn find(&mut self, uid: &str) -> Option<PathBuf> {
        if let Some(dir) = self.by_uid.get(uid).filter(|dir| dir.is_dir()) {
            return Some(dir.clone());
        }
        let Some(dir) = pod_cgroup(&self.root, uid) else {
            self.missing.insert(uid.to_owned());
            return None;
        };
        self.missing.remove(uid);
        self.by_uid.insert(uid.to_owned(), dir.clone());
        Some(dir)
    }

    /// Whether the last look for the pod's cgroup found none.
    fn is_missing(&self, uid: &str) -> bool {
        self.missing.contains(uid)
    }

    /// Forgets the pods that are gone (or no longer in a meshed namespace).
    fn retain(&mut self, live: &HashSet<&str>) {
        self.by_uid.retain(|uid, _| live.contains(uid.as_str()));
        self.missing.retain(|uid| live.contains(uid.as_str()));
    }
}

/// The pod's cgroup directory under the kubelet's tree: `kubepods[/<qos>]/pod<uid>` (cgroupfs
/// driver) or `kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid_>.slice` (systemd).
pub fn pod_cgroup(cgroup_root: &Path, uid: &str) -> Option<PathBuf> {
    let cgroupfs = format!("pod{uid}");
    let systemd = format!("pod{}.slice", uid.replace('-', "_"));
    let matches = |name: &str| name == cgroupfs || name.ends_with(&systemd);
    for top in ["kubepods", "kubepods.slice"] {
        let top = cgroup_root.join(top);
        for dir in std::iter::once(top.clone()).chain(subdirs(&top)) {
            if let Some(found) =
                subdirs(&dir).find(|d| d.file_name().is_some_and(|n| matches(&n.to_string_lossy())))
            {
                return Some(found);
            }
        }
    }
    None
}

/// The netns of the first process found in the cgroup or its children (the pod's containers).
fn netns_of(cgroup: &Path) -> Option<PathBuf> {
    std::iter::once(cgroup.to_owned()).chain(subdirs(cgroup)).find_map(|dir| {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
        let pid = procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()).min()?;
        let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        netns.exists().then_some(netns)
    })
}

fn subdirs(dir: &Path) -> impl Iterator<Item = PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_is_named_in_metrics_by_what_controls_it() {
        let meta = |kind: &str, owner: &str, controller: bool, hash: Option<&str>| ObjectMeta {
            labels: hash.map(|h| [("pod-template-hash".to_owned(), h.to_owned())].into()),
            owner_references: Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                kind: kind.into(),
                name: owner.into(),
                controller: Some(controller),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let cases = [
            (meta("ReplicaSet", "web-7d4b9c8f6d", true, Some("7d4b9c8f6d")), "web"),
            (meta("ReplicaSet", "api-v2-5f6d7", true, Some("5f6d7")), "api-v2"),
            // A ReplicaSet of its own (no Deployment's hash in its name) is the workload.
            (meta("ReplicaSet", "cache", true, Some("5f6d7")), "cache"),
            (meta("StatefulSet", "db", true, None), "db"),
            (meta("DaemonSet", "logs", true, None), "logs"),
            (meta("Job", "report-29412345", true, None), "report"),
            (meta("Job", "migrate-v3", true, None), "migrate-v3"),
            (meta("Job", "backup-1234", true, None), "backup-1234"),
            // An owner that does not control the pod does not name it.
            (meta("StatefulSet", "db", false, None), "web-7d4b9c8f6d-x2k9q"),
            (ObjectMeta::default(), "web-7d4b9c8f6d-x2k9q"),
        ];
        for (meta, expected) in cases {
            assert_eq!(workload_name("web-7d4b9c8f6d-x2k9q", &meta), expected, "{meta:?}");
        }
    }

    fn istio(spec: serde_json::Value) -> DynamicObject {
        DynamicObject::new("p", &istio_policy_resource())
            .within("ns")
            .data(serde_json::json!({ "spec": spec }))
    }

    #[test]
    fn istio_policies_convert_or_say_why_not() {
        let policy = compile(&istio(serde_json::json!({
            "action": "DENY",
            "rules": [{"from": [{"source": {"namespaces": ["evil"]}}], "to": [{"operation": {"ports": ["8080"]}}]}],
        })), ISTIO)
        .unwrap()
        .expect("enforced");
        assert_eq!(policy.rules.len(), 1);
        assert_eq!(policy.rules[0].to[0].ports, [8080]);
        assert!(compile(&istio(serde_json::Value::Null), ISTIO).unwrap().expect("enforced").rules.is_empty());
        let waypoint =
            compile(&istio(serde_json::json!({"targetRefs": [{"kind": "Service", "name": "s"}]})), ISTIO);
        assert!(waypoint.unwrap().is_none(), "a waypoint's policy is not the node's to enforce");
        let unknown =
            compile(&istio(serde_json::json!({"rules": [{"from": [{"source": {"nodes": ["x"]}}]}]})), ISTIO);
        assert!(unknown.unwrap_err().contains("nodes"), "the unknown field is named");
    }

    #[test]
    fn each_crds_root_namespace_makes_its_policies_mesh_wide() {
        let mesh_wide = |namespace: &str, kind: &str| {
            let object = istio(serde_json::Value::Null).within(namespace);
            compile(&object, kind).unwrap().expect("enforced").mesh_wide
        };
        assert!(mesh_wide("istio-system", ISTIO), "Istio's mesh-wide policies stay mesh-wide");
        assert!(!mesh_wide("ferry-system", ISTIO));
        assert!(mesh_wide("ferry-system", FERRY));
        assert!(!mesh_wide("istio-system", FERRY));
        assert!(!mesh_wide("ns", ISTIO));
    }

    #[test]
    fn an_invalid_edit_leaves_the_last_valid_version_in_force() {
        let ferry = |name: &str, version: &str, ip_block: &str| {
            let resource = ApiResource::erase::<AuthorizationPolicyResource>(&());
            let mut object = DynamicObject::new(name, &resource).within("ns").data(serde_json::json!({
                "spec": {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": [ip_block]}}]}]},
            }));
            object.metadata.resource_version = Some(version.to_owned());
            Arc::new(object)
        };
        let blocks = |policies: &[Policy]| -> Vec<String> {
            policies.iter().map(|p| format!("{} {}", p.key(), p.rules[0].from[0].ip_blocks[0])).collect()
        };
        let mut objects = PolicyObjects::default();
        let first = objects.update(&[ferry("a", "1", "10.0.0.0/8")], &[]);
        assert_eq!(blocks(&first), ["ns/a 10.0.0.0/8"]);
        // Refused, alone: the previous version of a stays, b is in force, c never was.
        let edited = [ferry("a", "2", "10.0.0.0/33"), ferry("b", "1", "10.1.0.0/16"), ferry("c", "1", "x")];
        let kept = objects.update(&edited, &[]);
        assert_eq!(blocks(&kept), ["ns/a 10.0.0.0/8", "ns/b 10.1.0.0/16"]);
        let refused: Vec<_> =
            objects.refused().into_iter().map(|r| (r.name, r.earlier_version_in_force)).collect();
        assert_eq!(refused, [("a".to_owned(), true), ("c".to_owned(), false)]);
        assert!(kept[0].warnings[0].contains("10.0.0.0/33"), "{:?}", kept[0].warnings);
        assert!(kept[1].warnings.is_empty());
        // Refused again: still the last valid version, with one warning.
        assert_eq!(objects.update(&[ferry("a", "3", "10.0.0.0/34")], &[])[0].warnings.len(), 1);
        let fixed = [ferry("a", "4", "10.2.0.0/16"), ferry("b", "1", "10.1.0.0/16")];
        assert_eq!(blocks(&objects.update(&fixed, &[])), ["ns/a 10.2.0.0/16", "ns/b 10.1.0.0/16"]);
        assert!(objects.refused().is_empty());
        // A deleted object takes its policy along, valid version or not.
        assert!(objects.update(&[], &[]).is_empty());
        assert!(objects.known.is_empty());
    }

    #[test]
    fn services_keep_their_target_ports_traffic_policy_and_affinity() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cache", "namespace": "ns"},
            "spec": {
                "selector": {"app": "cache"},
                "clusterIP": "10.96.0.20",
                "internalTrafficPolicy": "Local",
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
                "ports": [{"port": 53, "targetPort": "dns"}, {"port": 54, "targetPort": 5354}, {"port": 55}],
            },
        }))
        .unwrap();
        let service = [Arc::new(service)];
        let services = meshed_services(&HashSet::from(["ns"]), &service);
        assert_eq!(services[0].internal_traffic_policy, config::TrafficPolicy::Local);
        assert_eq!(services[0].session_affinity, config::SessionAffinity::ClientIp);
        assert_eq!(services[0].session_affinity_timeout, Duration::from_secs(600));
        let targets: Vec<String> = services[0].ports.iter().map(|p| p.target_port.to_string()).collect();
        assert_eq!(targets, ["dns", "5354", "55"]);
        assert!(meshed_services(&HashSet::from(["other"]), &service).is_empty(), "not in a meshed namespace");
    }

    #[test]
    fn an_unchanged_pod_keeps_its_workload_from_one_look_to_the_next() {
        let pod = |name: &str, namespace: &str, ip: &str| -> Arc<Pod> {
            Arc::new(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "namespace": namespace, "uid": name},
                    "spec": {"nodeName": "elsewhere", "containers": []},
                    "status": {"phase": "Running", "podIP": ip},
                }))
                .unwrap(),
            )
        };
        let (a, b, c) =
            (pod("a", "shop", "10.9.0.1"), pod("b", "shop", "10.9.0.2"), pod("c", "other", "10.9.0.3"));
        let mut workloads = Workloads::new("here".into(), PathBuf::from("/nonexistent"));
        let shop = HashSet::from(["shop"]);
        let (first, waiting, unlocated) = workloads.look(&shop, &[b.clone(), a.clone(), c.clone()]);
        assert!(!waiting && unlocated.is_empty());
        let names: Vec<&str> = first.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["a", "b"], "sorted, and only meshed namespaces");
        // b changed (the store holds a new object for it): converted again; a is the same object.
        let b2 = pod("b", "shop", "10.9.0.22");
        let (second, ..) = workloads.look(&shop, &[a.clone(), b2.clone(), c.clone()]);
        assert!(Arc::ptr_eq(&first[0], &second[0]), "a is not converted again");
        assert_eq!(second[1].ips, ["10.9.0.22".parse::<IpAddr>().unwrap()]);
        assert_eq!(workloads.remote.len(), 2, "b's old object is let go");
        // Gone from the cluster, or its namespace no longer meshed: forgotten.
        let (third, ..) = workloads.look(&HashSet::from(["shop", "other"]), &[b2.clone(), c.clone()]);
        let names: Vec<&str> = third.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["c", "b"], "by namespace, then name");
        assert!(Arc::ptr_eq(&second[1], &third[1]));
        assert!(workloads.look(&HashSet::new(), &[b2, c]).0.is_empty());
        assert!(workloads.remote.is_empty());
    }

    #[test]
    fn a_running_local_pod_whose_cgroup_is_nowhere_is_reported() {
        let pod = |name: &str, extra: serde_json::Value| -> Arc<Pod> {
            let mut pod = serde_json::json!({
                "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
                "spec": {"nodeName": "here", "containers": []},
                "status": {"phase": "Running", "podIP": "10.9.0.1"},
            });
            json_patch(&mut pod, extra);
            Arc::new(serde_json::from_value(pod).unwrap())
        };
        let pods = [
            pod("lost", serde_json::json!({})),
            pod("pending", serde_json::json!({"status": {"phase": "Pending"}})),
            pod("leaving", serde_json::json!({"metadata": {"deletionTimestamp": "2026-12-01T00:00:00Z"}})),
            pod("out", serde_json::json!({"metadata": {"labels": {"ferry.dev/mesh": "disabled"}}})),
        ];
        let mut workloads = Workloads::new("here".into(), PathBuf::from("/nonexistent"));
        let (_, waiting, unlocated) = workloads.look(&HashSet::from(["shop"]), &pods);
        assert!(waiting, "looked for again");
        let reported: Vec<(&str, &str)> = unlocated.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            reported,
            [(
                "shop/lost",
                "no cgroup of pod uid-lost under /nonexistent (kubepods, kubepods.slice): is podCgroupRoot right?"
            )],
            "only a running pod, not terminating, not opted out"
        );
    }

    /// Merges `patch` into `value`, object by object.
    fn json_patch(value: &mut serde_json::Value, patch: serde_json::Value) {
        match (value, patch) {
            (serde_json::Value::Object(into), serde_json::Value::Object(from)) => {
                for (key, from) in from {
                    json_patch(into.entry(key).or_insert(serde_json::Value::Null), from);
                }
            }
            (value, patch) => *value = patch,
        }
    }

    #[test]
    fn host_network_pods_are_not_workloads() {
        let pod = |host_network: bool| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
                "spec": {"nodeName": "elsewhere", "hostNetwork": host_network, "containers": []},
                "status": {"phase": "Running", "podIP": "10.9.0.1"},
            }))
            .unwrap()
        };
        let mut cgroups = PodCgroups::new(PathBuf::from("/nonexistent"));
        let ordinary =
            workload(&pod(false), "here", &mut cgroups, true).expect("an ordinary pod is a workload");
        assert_eq!(ordinary.ips, ["10.9.0.1".parse::<std::net::IpAddr>().unwrap()]);
        assert!(workload(&pod(true), "here", &mut cgroups, true).is_none());
    }

    #[test]
    fn a_dual_stack_pod_has_all_its_addresses() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
            "spec": {"nodeName": "elsewhere", "containers": []},
            "status": {"phase": "Running", "podIP": "fd00::5", "podIPs": [{"ip": "fd00::5"}, {"ip": "10.9.0.5"}]},
        }))
        .unwrap();
        let workload =
            workload(&pod, "here", &mut PodCgroups::new(PathBuf::from("/nonexistent")), true).unwrap();
        let ips: Vec<IpAddr> = ["fd00::5".parse().unwrap(), "10.9.0.5".parse().unwrap()].into();
        assert_eq!(workload.ips, ips);
        // Reached by name over IPv4, though IPv6 comes first.
        assert_eq!(workload.preferred_ip(), Some(ips[1]));
        assert_eq!(workload.address(true), Some(ips[0]));
    }

    #[test]
    fn pod_cgroups_of_both_drivers_are_found() {
        let root = std::env::temp_dir().join(format!("ferry-cgroup-test-{}", std::process::id()));
        let uid = "1234-abcd";
        let cgroupfs = root.join("a/kubepods/besteffort/pod1234-abcd");
        let systemd =
            root.join("b/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_abcd.slice");
        let guaranteed = root.join("c/kubepods/pod1234-abcd");
        for dir in [&cgroupfs, &systemd, &guaranteed] {
            std::fs::create_dir_all(dir).unwrap();
        }
        assert_eq!(pod_cgroup(&root.join("a"), uid), Some(cgroupfs));
        assert_eq!(pod_cgroup(&root.join("b"), uid), Some(systemd));
        assert_eq!(pod_cgroup(&root.join("c"), uid), Some(guaranteed));
        assert_eq!(pod_cgroup(&root.join("a"), "other"), None);
        let _ = std::fs::remove_dir_all(&root);
    }
}
