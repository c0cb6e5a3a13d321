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
use k8s_openapi::{
    api::core::v1::{Namespace, Pod, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio::sync::{Notify, mpsc};

use crate::{
    config,
    policy::{AuthorizationPolicy, AuthorizationPolicyResource, Policy, Spec},
};

/// The label that enrols a namespace (`enabled`) or opts a pod out (`disabled`).
pub const MESH_LABEL: &str = "ferry.dev/mesh";
/// How often local pods whose netns is not there yet are looked for again.
const RETRY: Duration = Duration::from_secs(1);
/// How often the agent looks whether Istio's AuthorizationPolicy CRD has been installed.
const ISTIO_CRD_POLL: Duration = Duration::from_secs(10);

/// What the API says, as the agent uses it.
#[derive(Debug, Clone, Default)]
pub struct Discovered {
    pub workloads: Vec<config::Workload>,
    pub services: Vec<config::Service>,
    pub policies: Vec<Policy>,
}

/// Watches the API server and sends what it holds whenever that changes. Ferry's policies are
/// watched if its CRD is installed when the agent starts; Istio's as soon as their CRD is.
pub async fn spawn(client: Client, node: String, cgroup_root: PathBuf) -> mpsc::Receiver<Discovered> {
    let (namespaces, namespace_writer) = reflector::store::<Namespace>();
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (services, service_writer) = reflector::store::<Service>();
    let (policies, policy_writer) = reflector::store::<AuthorizationPolicyResource>();
    let istio_writer = reflector::store::Writer::new(istio_policy_resource());
    let istio_policies = istio_writer.as_reader();
    let changed = Arc::new(Notify::new());
    let policy_api: Api<AuthorizationPolicyResource> = Api::all(client.clone());
    let with_policies = match installed(&policy_api).await {
        Ok(()) => {
            watch(policy_api, policy_writer, changed.clone(), "authorization policies");
            true
        }
        Err(e) => {
            tracing::warn!("no AuthorizationPolicy from the API (is `ferry crd` applied?): {e}");
            false
        }
    };
    let istio_api: Api<DynamicObject> = Api::all_with(client.clone(), &istio_policy_resource());
    let with_istio = match installed(&istio_api).await {
        Ok(()) => {
            watch(istio_api, istio_writer, changed.clone(), "Istio authorization policies");
            true
        }
        Err(_) => {
            tokio::spawn(watch_once_installed(istio_api, istio_writer, changed.clone()));
            false
        }
    };
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
        if with_policies && policies.wait_until_ready().await.is_err() {
            return;
        }
        if with_istio && istio_policies.wait_until_ready().await.is_err() {
            return;
        }
        let mut last = None;
        let mut cgroups = PodCgroups::new(cgroup_root);
        loop {
            let namespaces = namespaces.state();
            let meshed = meshed_namespaces(&namespaces);
            let (workloads, waiting) = workloads(&meshed, &pods.state(), &node, &mut cgroups);
            let services = meshed_services(&meshed, &services.state());
            let (ferry, istio) = (policies.state(), istio_policies.state());
            let versions: Vec<Option<String>> = ferry
                .iter()
                .map(|p| &p.metadata)
                .chain(istio.iter().map(|p| &p.metadata))
                .map(|m| m.resource_version.clone())
                .collect();
            let now = (workloads, services, versions);
            if last.as_ref() != Some(&now) {
                last = Some(now.clone());
                let (workloads, services, _) = now;
                let discovered = Discovered { workloads, services, policies: compile(&ferry, &istio) };
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
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    rx
}

/// Istio's `security.istio.io/v1` AuthorizationPolicy, read as a dynamic object: its spec is
/// converted leniently (see [`istio_spec`]) rather than failing the whole watch.
fn istio_policy_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy"),
        "authorizationpolicies",
    )
}

/// Whether the API serves this kind (its CRD is installed and readable).
async fn installed<K>(api: &Api<K>) -> kube::Result<()>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.list_metadata(&kube::api::ListParams::default().limit(1)).await.map(|_| ())
}

fn watch<K>(api: Api<K>, writer: reflector::store::Writer<K>, changed: Arc<Notify>, what: &'static str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let stream = reflector(writer, watcher(api, watcher::Config::default()));
    tokio::spawn(drive(stream.default_backoff(), changed, what));
}

/// Istio may be installed after Ferry: look for its CRD now and then.
async fn watch_once_installed(
    api: Api<DynamicObject>,
    writer: reflector::store::Writer<DynamicObject>,
    changed: Arc<Notify>,
) {
    tracing::info!(
        "Istio's AuthorizationPolicy CRD is not installed; looking again every {ISTIO_CRD_POLL:?}"
    );
    loop {
        tokio::time::sleep(ISTIO_CRD_POLL).await;
        if installed(&api).await.is_ok() {
            tracing::info!("Istio's AuthorizationPolicy CRD appeared: honouring its policies");
            watch(api, writer, changed, "Istio authorization policies");
            return;
        }
    }
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
fn meshed_namespaces(namespaces: &[Arc<Namespace>]) -> Vec<&str> {
    namespaces
        .iter()
        .filter(|ns| label(&ns.metadata.labels, MESH_LABEL) == Some("enabled"))
        .filter_map(|ns| ns.metadata.name.as_deref())
        .collect()
}

/// ClusterIP services with a selector in meshed namespaces. Named target ports are not resolved
/// (those ports are left out: their connections go to the virtual IP unproxied).
fn meshed_services(meshed: &[&str], services: &[Arc<Service>]) -> Vec<config::Service> {
    let mut list: Vec<config::Service> = services
        .iter()
        .filter(|s| s.metadata.namespace.as_deref().is_some_and(|ns| meshed.contains(&ns)))
        .filter_map(|s| {
            let spec = s.spec.as_ref()?;
            let selector = spec.selector.clone().filter(|sel| !sel.is_empty())?;
            let ips = spec.cluster_ips.clone().or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))?;
            let vips: Vec<_> = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
            let ports = spec.ports.iter().flatten().filter_map(|p| {
                let port = u16::try_from(p.port).ok()?;
                let target_port = match &p.target_port {
                    None => port,
                    Some(IntOrString::Int(n)) => u16::try_from(*n).ok()?,
                    Some(IntOrString::String(_)) => return None,
                };
                (p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                    .then_some(config::ServicePort { port, target_port })
            });
            let ports: Vec<_> = ports.collect();
            (!vips.is_empty() && !ports.is_empty()).then(|| config::Service {
                name: s.metadata.name.clone().unwrap_or_default(),
                namespace: s.metadata.namespace.clone().unwrap_or_default(),
                vips,
                ports,
                selector,
            })
        })
        .collect();
    list.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    list
}

/// The workloads of meshed namespaces, and whether a local pod is still waiting for its netns.
fn workloads(
    meshed: &[&str],
    pods: &[Arc<Pod>],
    node: &str,
    cgroups: &mut PodCgroups,
) -> (Vec<config::Workload>, bool) {
    cgroups.retain(pods);
    let mut waiting = false;
    let mut list: Vec<config::Workload> = pods
        .iter()
        .filter(|pod| pod.metadata.namespace.as_deref().is_some_and(|ns| meshed.contains(&ns)))
        .filter(|pod| label(&pod.metadata.labels, MESH_LABEL) != Some("disabled"))
        .filter_map(|pod| {
            let workload = workload(pod, node, cgroups);
            if workload.is_none() && is_local_and_running(pod, node) {
                waiting = true;
            }
            workload
        })
        .collect();
    list.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    (list, waiting)
}

/// The policy objects (Ferry's and Istio's), compiled; one that does not compile is left out with
/// an error naming it (the CRD's schema already refuses most mistakes at the API server).
fn compile(ferry: &[Arc<AuthorizationPolicyResource>], istio: &[Arc<DynamicObject>]) -> Vec<Policy> {
    let ferry = ferry.iter().map(|o| (&o.metadata, Ok(o.spec.clone())));
    let istio = istio.iter().map(|o| (&o.metadata, istio_spec(o)));
    let mut compiled: Vec<Policy> = ferry
        .chain(istio)
        .filter_map(|(metadata, spec)| {
            let (name, namespace) = (metadata.name.clone()?, metadata.namespace.clone()?);
            let key = format!("{namespace}/{name}");
            let spec = spec.inspect_err(|e| tracing::error!(policy = %key, "policy ignored: {e}")).ok()?;
            let policy = AuthorizationPolicy {
                api_version: None,
                kind: None,
                metadata: crate::policy::Metadata {
                    name,
                    namespace,
                    annotations: metadata.annotations.clone().unwrap_or_default(),
                },
                spec,
            };
            policy.compile().inspect_err(|e| tracing::error!(policy = %key, "policy rejected: {e}")).ok()
        })
        .collect();
    compiled.sort_by_key(Policy::key);
    compiled
}

/// The spec of an Istio policy in Ferry's terms. Policies bound with `targetRef(s)` apply to
/// waypoints and gateways, not to workloads, so (as in Istio's ambient node proxy) they are not
/// enforced here; any other field Ferry does not know is an error naming it.
fn istio_spec(object: &DynamicObject) -> Result<Spec, String> {
    let spec = object.data.get("spec").cloned().unwrap_or_default();
    if let Some(field) = ["targetRef", "targetRefs"].into_iter().find(|f| spec.get(f).is_some()) {
        return Err(format!("bound with {field} to a waypoint or gateway, not enforced by a node proxy"));
    }
    if spec.is_null() {
        return Ok(Spec::default());
    }
    serde_json::from_value(spec).map_err(|e| format!("Istio AuthorizationPolicy spec: {e}"))
}

fn workload(pod: &Pod, node: &str, cgroups: &mut PodCgroups) -> Option<config::Workload> {
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
    let (netns, cgroup) = if pod_node == node {
        let uid = pod.metadata.uid.as_deref()?;
        let cgroup = cgroups.find(uid)?;
        let netns = netns_of(&cgroup)?;
        (Some(netns), Some(cgroup))
    } else {
        (None, None)
    };
    Some(config::Workload {
        name: pod.metadata.name.clone()?,
        namespace: pod.metadata.namespace.clone()?,
        service_account: spec.service_account_name.clone().unwrap_or_else(|| "default".to_owned()),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ips,
        node: pod_node,
        meshed: true,
        ready: status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True"),
        netns,
        cgroup,
    })
}

fn is_local_and_running(pod: &Pod, node: &str) -> bool {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
        && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

fn label<'a>(labels: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.as_ref()?.get(key).map(String::as_str)
}

/// Local pods' cgroup directories by pod UID: found once by scanning the kubelet's tree, not again
/// on every update (the netns is looked up each time: a pod's sandbox may be recreated).
struct PodCgroups {
    root: PathBuf,
    by_uid: HashMap<String, PathBuf>,
}

impl PodCgroups {
    fn new(root: PathBuf) -> PodCgroups {
        PodCgroups { root, by_uid: HashMap::new() }
    }

    fn find(&mut self, uid: &str) -> Option<PathBuf> {
        if let Some(dir) = self.by_uid.get(uid).filter(|dir| dir.is_dir()) {
            return Some(dir.clone());
        }
        let dir = pod_cgroup(&self.root, uid)?;
        self.by_uid.insert(uid.to_owned(), dir.clone());
        Some(dir)
    }

    /// Forgets the pods that are gone.
    fn retain(&mut self, pods: &[Arc<Pod>]) {
        let live: HashSet<&str> = pods.iter().filter_map(|p| p.metadata.uid.as_deref()).collect();
        self.by_uid.retain(|uid, _| live.contains(uid.as_str()));
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

    fn istio(spec: serde_json::Value) -> DynamicObject {
        DynamicObject::new("p", &istio_policy_resource())
            .within("ns")
            .data(serde_json::json!({ "spec": spec }))
    }

    #[test]
    fn istio_policies_convert_or_say_why_not() {
        let spec = istio_spec(&istio(serde_json::json!({
            "action": "DENY",
            "rules": [{"from": [{"source": {"namespaces": ["evil"]}}], "to": [{"operation": {"ports": ["8080"]}}]}],
        })))
        .unwrap();
        assert_eq!(spec.rules.len(), 1);
        assert_eq!(spec.rules[0].to[0].operation.ports, [8080]);
        assert!(istio_spec(&istio(serde_json::Value::Null)).unwrap().rules.is_empty());
        let waypoint =
            istio_spec(&istio(serde_json::json!({"targetRefs": [{"kind": "Service", "name": "s"}]})));
        assert!(waypoint.unwrap_err().contains("targetRefs"));
        let unknown =
            istio_spec(&istio(serde_json::json!({"rules": [{"from": [{"source": {"nodes": ["x"]}}]}]})));
        assert!(unknown.unwrap_err().contains("nodes"), "the unknown field is named");
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
        let ordinary = workload(&pod(false), "here", &mut cgroups).expect("an ordinary pod is a workload");
        assert_eq!(ordinary.ips, ["10.9.0.1".parse::<std::net::IpAddr>().unwrap()]);
        assert!(workload(&pod(true), "here", &mut cgroups).is_none());
    }

    #[test]
    fn a_dual_stack_pod_has_all_its_addresses() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
            "spec": {"nodeName": "elsewhere", "containers": []},
            "status": {"phase": "Running", "podIP": "fd00::5", "podIPs": [{"ip": "fd00::5"}, {"ip": "10.9.0.5"}]},
        }))
        .unwrap();
        let workload = workload(&pod, "here", &mut PodCgroups::new(PathBuf::from("/nonexistent"))).unwrap();
        let ips: Vec<IpAddr> = ["fd00::5".parse().unwrap(), "10.9.0.5".parse().unwrap()].into();
        assert_eq!(workload.ips, ips);
        // Reached by name over IPv4, though IPv6 comes first.
        let workload = crate::state::Workload::from(&workload);
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
