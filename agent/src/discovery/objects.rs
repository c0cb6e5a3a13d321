//! Namespaces, Pods and Services as the agent reads them from the API: only the fields
//! [`super::kube`] uses, named and shaped as in `k8s-openapi`, everything else skipped while
//! parsing. Pods and Services are watched cluster-wide, so their caches grow with the cluster,
//! not the node: a whole Pod (managed fields, container specs, volumes, statuses) costs about
//! 100 KiB of memory, and a large cluster has thousands of them.

use std::{borrow::Cow, collections::BTreeMap};

use k8s_openapi::{
    NamespaceResourceScope,
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, OwnerReference, Time},
        util::intstr::IntOrString,
    },
};
use serde::{Deserialize, Deserializer};

use super::kube::CAPTURED_ANNOTATION;

#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct Namespace {
    #[serde(deserialize_with = "metadata")]
    pub(super) metadata: ObjectMeta,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct Pod {
    #[serde(deserialize_with = "metadata")]
    pub(super) metadata: ObjectMeta,
    pub(super) spec: Option<PodSpec>,
    pub(super) status: Option<PodStatus>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PodSpec {
    #[serde(default)]
    pub(super) containers: Vec<Container>,
    pub(super) host_network: Option<bool>,
    pub(super) node_name: Option<String>,
    pub(super) service_account_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct Container {
    pub(super) ports: Option<Vec<ContainerPort>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ContainerPort {
    pub(super) container_port: i32,
    pub(super) name: Option<String>,
    pub(super) protocol: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PodStatus {
    pub(super) conditions: Option<Vec<PodCondition>>,
    pub(super) phase: Option<String>,
    #[serde(rename = "podIP")]
    pub(super) pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub(super) pod_ips: Option<Vec<PodIp>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct PodCondition {
    #[serde(rename = "type")]
    pub(super) type_: String,
    pub(super) status: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct PodIp {
    pub(super) ip: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct Service {
    #[serde(deserialize_with = "metadata")]
    pub(super) metadata: ObjectMeta,
    pub(super) spec: Option<ServiceSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ServiceSpec {
    #[serde(rename = "clusterIP")]
    pub(super) cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub(super) cluster_ips: Option<Vec<String>>,
    pub(super) internal_traffic_policy: Option<String>,
    pub(super) ports: Option<Vec<ServicePort>>,
    pub(super) selector: Option<BTreeMap<String, String>>,
    pub(super) session_affinity: Option<String>,
    pub(super) session_affinity_config: Option<SessionAffinityConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SessionAffinityConfig {
    #[serde(rename = "clientIP")]
    pub(super) client_ip: Option<ClientIpConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ClientIpConfig {
    pub(super) timeout_seconds: Option<i32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ServicePort {
    pub(super) port: i32,
    pub(super) protocol: Option<String>,
    pub(super) target_port: Option<IntOrString>,
}

/// The metadata discovery uses: names, uid, labels, the controller, the capture mark, whether the
/// object is being deleted, and the resource version the watch resumes from.
fn metadata<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Kept {
        annotations: Option<BTreeMap<String, String>>,
        deletion_timestamp: Option<Time>,
        labels: Option<BTreeMap<String, String>>,
        name: Option<String>,
        namespace: Option<String>,
        owner_references: Option<Vec<OwnerReference>>,
        resource_version: Option<String>,
        uid: Option<String>,
    }
    let kept = Kept::deserialize(deserializer)?;
    let mark = kept.annotations.and_then(|mut a| a.remove_entry(CAPTURED_ANNOTATION));
    // Only the controller: a pod's names its workload (see `kube::workload_name`).
    let controller = kept.owner_references.into_iter().flatten().find(|o| o.controller == Some(true));
    Ok(ObjectMeta {
        annotations: mark.map(|mark| [mark].into()),
        deletion_timestamp: kept.deletion_timestamp,
        labels: kept.labels,
        name: kept.name,
        namespace: kept.namespace,
        owner_references: controller.map(|owner| vec![owner]),
        resource_version: kept.resource_version,
        uid: kept.uid,
        ..ObjectMeta::default()
    })
}

/// Makes a type the API serves under `$full`'s kind and path.
macro_rules! read_as {
    ($kept:ty, $full:ty, $scope:ty) => {
        impl kube::Resource for $kept {
            type DynamicType = ();
            type Scope = $scope;

            fn kind(dt: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::kind(dt)
            }
            fn group(dt: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::group(dt)
            }
            fn version(dt: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::version(dt)
            }
            fn plural(dt: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::plural(dt)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

read_as!(Namespace, k8s_openapi::api::core::v1::Namespace, k8s_openapi::ClusterResourceScope);
read_as!(Pod, k8s_openapi::api::core::v1::Pod, NamespaceResourceScope);
read_as!(Service, k8s_openapi::api::core::v1::Service, NamespaceResourceScope);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_keeps_what_discovery_reads_and_little_else() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-1", "namespace": "shop", "uid": "u-1", "resourceVersion": "42",
                "labels": {"app": "web"},
                "annotations": {CAPTURED_ANNOTATION: "true", "kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "deletionTimestamp": "2026-12-01T00:00:00Z",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "other", "uid": "c"},
                    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "r", "controller": true},
                ],
                "managedFields": [{"manager": "kubelet", "operation": "Update", "fieldsV1": {"f:status": {}}}],
            },
            "spec": {
                "nodeName": "node1", "serviceAccountName": "web",
                "containers": [{"name": "app", "image": "app:1", "env": [{"name": "A", "value": "b"}],
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP", "hostPort": 80}]}],
                "volumes": [{"name": "data", "emptyDir": {}}],
            },
            "status": {
                "phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}],
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-01T00:00:00Z"}],
                "containerStatuses": [{"name": "app", "image": "app:1", "imageID": "x", "ready": true, "restartCount": 0}],
            },
        }))
        .unwrap();
        let meta = &pod.metadata;
        assert_eq!(meta.annotations, Some([(CAPTURED_ANNOTATION.to_owned(), "true".to_owned())].into()));
        assert_eq!(meta.resource_version.as_deref(), Some("42"), "watches resume from it");
        assert!(meta.deletion_timestamp.is_some() && meta.managed_fields.is_none());
        let owners = meta.owner_references.as_deref().unwrap_or_default();
        assert_eq!(owners.iter().map(|o| (&*o.kind, &*o.name)).collect::<Vec<_>>(), [("ReplicaSet", "web")]);
        let spec = pod.spec.unwrap();
        let port = &spec.containers[0].ports.as_ref().unwrap()[0];
        assert_eq!((port.name.as_deref(), port.container_port), (Some("http"), 8080));
        let status = pod.status.unwrap();
        assert_eq!(status.pod_ips.unwrap()[1].ip, "fd00::5");
        assert_eq!(status.conditions.unwrap()[0].type_, "Ready");
    }

    #[test]
    fn types_read_from_the_paths_of_the_kinds_they_stand_for() {
        use kube::Resource;
        assert_eq!(Pod::url_path(&(), Some("ns")), "/api/v1/namespaces/ns/pods");
        assert_eq!(Service::url_path(&(), None), "/api/v1/services");
        assert_eq!(Namespace::url_path(&(), None), "/api/v1/namespaces");
    }
}
