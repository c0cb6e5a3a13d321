//! What the agent knows about the mesh: workloads, services and policies, indexed for the proxy.
//! Discovery builds a new [`State`] and swaps it in; the proxy and the datapath only read it.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use crate::{
    config::{self, Config, NodeTraffic, TrafficPolicy},
    identity::SpiffeId,
    policy::PolicySet,
};

/// Maps rebuilt on every update and read on every connection. Their keys come from discovery, not
/// from traffic, so they need no SipHash against chosen keys.
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;

/// A workload as discovery gives it, shared (by `Arc`) with the state, not copied.
pub use crate::config::Workload;

impl Workload {
    /// `namespace/name`, how logs and the CLI refer to a workload.
    pub fn key(&self) -> String {
        [self.namespace.as_str(), "/", self.name.as_str()].concat()
    }

    /// The name metrics report it by (see [`Workload::workload_name`]).
    pub fn metrics_name(&self) -> &str {
        self.workload_name.as_deref().unwrap_or(&self.name)
    }

    /// SPIFFE identity: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    pub fn identity(&self, trust_domain: &str) -> SpiffeId {
        SpiffeId::new(trust_domain, &self.namespace, &self.service_account)
    }

    /// Its first address of one family (IPv6 if `ipv6`): a dual-stack pod may list either first.
    pub fn address(&self, ipv6: bool) -> Option<IpAddr> {
        self.ips.iter().copied().find(|ip| ip.is_ipv6() == ipv6)
    }

    /// Its IPv4 address if it has one, else its first: where a connection to it by name goes.
    pub fn preferred_ip(&self) -> Option<IpAddr> {
        self.address(false).or_else(|| self.ips.first().copied())
    }
}

/// A service with its endpoints resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<config::ServicePort>,
    /// The workloads its selector picks, in discovery order.
    pub endpoints: Vec<Arc<Workload>>,
    /// With client IP affinity: how long a client's endpoint is kept for it after its last
    /// connection.
    pub affinity: Option<std::time::Duration>,
}

impl Service {
    /// `<name>.<namespace>.svc.cluster.local`: the name HBONE carries in `forwarded: ...;host=`.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub node: String,
    pub trust_domain: String,
    workloads: Vec<Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    services: Vec<Arc<Service>>,
    by_vip: HashMap<IpAddr, Arc<Service>>,
    pub policies: PolicySet,
    pub node_traffic: NodeTraffic,
}

impl State {
    pub fn from_config(config: &Config) -> State {
        let workloads = config.workloads.clone();
        let mut by_ip = HashMap::default();
        for w in &workloads {
            for ip in &w.ips {
                by_ip.insert(*ip, w.clone());
            }
        }
        // Ready workloads by namespace and label, so that a service looks only at those with
        // its selector's first label: looking through all of them for each service would cost
        // services x workloads on every update, and a large cluster updates often. Only the
        // label keys some selector starts with are indexed.
        let keys: BTreeSet<&str> =
            config.services.iter().filter_map(|s| s.selector.keys().next()).map(String::as_str).collect();
        let mut by_label: HashMap<(&str, &str, &str), Vec<&Arc<Workload>>> = HashMap::default();
        for w in workloads.iter().filter(|w| w.ready) {
            for (key, value) in keys.iter().filter_map(|key| w.labels.get_key_value(*key)) {
                by_label.entry((w.namespace.as_str(), key.as_str(), value.as_str())).or_default().push(w);
            }
        }
        let services: Vec<Arc<Service>> = config
            .services
            .iter()
            .map(|s| {
                let selects = |w: &&Arc<Workload>| {
                    s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                        && (s.internal_traffic_policy == TrafficPolicy::Cluster || w.node == config.node)
                };
                // An empty selector selects nothing (its endpoints are managed by hand).
                let candidates = s
                    .selector
                    .iter()
                    .next()
                    .and_then(|(key, value)| {
                        by_label.get(&(s.namespace.as_str(), key.as_str(), value.as_str()))
                    })
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                Arc::new(Service {
                    name: s.name.clone(),
                    namespace: s.namespace.clone(),
                    vips: s.vips.clone(),
                    ports: s.ports.clone(),
                    endpoints: candidates.iter().copied().filter(selects).cloned().collect(),
                    affinity: (s.session_affinity == config::SessionAffinity::ClientIp)
                        .then_some(s.session_affinity_timeout),
                })
            })
            .collect();
        let by_vip = services.iter().flat_map(|s| s.vips.iter().map(|vip| (*vip, s.clone()))).collect();
        State {
            node: config.node.clone(),
            trust_domain: config.trust_domain.clone(),
            workloads,
            by_ip,
            services,
            by_vip,
            policies: PolicySet::new(config.compiled_policies.clone()),
            node_traffic: config.node_traffic,
        }
    }

    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }

    /// The service behind a virtual `ip:port`, and the endpoints' port for it.
    pub fn service_for(&self, dst: SocketAddr) -> Option<(&Arc<Service>, &config::TargetPort)> {
        let service = self.by_vip.get(&dst.ip())?;
        let port = service.ports.iter().find(|p| p.port == dst.port())?;
        Some((service, &port.target_port))
    }

    /// The port on `endpoint` that connections to service port `hostname:port` go to, if
    /// `endpoint` is one of that service's endpoints (`hostname` as [`Service::hostname`]).
    pub fn service_port_on(&self, hostname: &str, port: u16, endpoint: &Workload) -> Option<u16> {
        let (name, namespace) = hostname.strip_suffix(".svc.cluster.local")?.split_once('.')?;
        let service = self.services.iter().find(|s| s.name == name && s.namespace == namespace)?;
        let service_port = service.ports.iter().find(|p| p.port == port)?;
        let is_endpoint =
            service.endpoints.iter().any(|e| e.namespace == endpoint.namespace && e.name == endpoint.name);
        is_endpoint.then(|| service_port.target_port.on(&endpoint.ports)).flatten()
    }

    /// Every known workload, in discovery order.
    pub fn workloads(&self) -> &[Arc<Workload>] {
        &self.workloads
    }

    /// A workload by `namespace/name`.
    pub fn workload_by_key(&self, key: &str) -> Option<&Arc<Workload>> {
        let (namespace, name) = key.split_once('/')?;
        self.workloads.iter().find(|w| w.namespace == namespace && w.name == name)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    pub fn is_local(&self, workload: &Workload) -> bool {
        workload.node == self.node
    }

    /// Whether open connections must be decided again after `previous`: the policies changed, or
    /// what they read of this node's workloads (a pod relabelled into or out of a selector).
    pub fn changes_decisions_since(&self, previous: &State) -> bool {
        let relabelled = |w: &&Arc<Workload>| {
            let was = w.preferred_ip().and_then(|ip| previous.workload_by_ip(ip));
            was.is_some_and(|was| {
                was.namespace == w.namespace && was.name == w.name && was.labels != w.labels
            })
        };
        self.policies != previous.policies
            || self.node_traffic != previous.node_traffic
            || self.workloads.iter().filter(|w| self.is_local(w)).any(|w| relabelled(&w))
    }
}

/// The current state, replaced whole on every discovery update.
#[derive(Debug, Clone, Default)]
pub struct StateHandle(Arc<RwLock<Arc<State>>>);

impl StateHandle {
    pub fn new(state: State) -> StateHandle {
        StateHandle(Arc::new(RwLock::new(Arc::new(state))))
    }

    /// A consistent snapshot; cheap (one Arc clone).
    pub fn load(&self) -> Arc<State> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn store(&self, state: State) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(state);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::TargetPort;

    #[test]
    fn services_select_their_namespace_workloads_by_label() {
        let config = Config::parse(
            "
node: n1
workloads:
  - {name: web-0, namespace: shop, labels: {app: web}, ips: [10.0.1.2], node: n1, meshed: false}
  - {name: web-1, namespace: shop, labels: {app: web}, ips: [10.0.2.2], node: n2}
  - {name: web-2, namespace: shop, labels: {app: web, tier: x}, ips: [10.0.2.3], node: n2, ports: {http: 9090}}
  - {name: web-other, namespace: other, labels: {app: web}, ips: [10.0.2.4], node: n2}
  - {name: db, namespace: shop, labels: {app: db}, ips: [10.0.2.5], node: n2}
  - {name: web-3, namespace: shop, labels: {app: web}, ips: [10.0.2.6], node: n2, ready: false}
services:
  - name: web
    namespace: shop
    vips: [10.96.0.10]
    ports: [{port: 80, targetPort: 8080}, {port: 81, targetPort: http}]
    selector: {app: web}
  - name: web-local
    namespace: shop
    vips: [10.96.0.12]
    ports: [{port: 80, targetPort: 8080}]
    selector: {app: web}
    internalTrafficPolicy: Local
  - {name: manual, namespace: shop, vips: [10.96.0.11], ports: [{port: 80, targetPort: 80}]}
  - {name: web-x, namespace: shop, vips: [10.96.0.13], ports: [{port: 80, targetPort: 80}], selector: {app: web, tier: x}}
",
            Path::new("t.yaml"),
        )
        .unwrap();
        let state = State::from_config(&config);
        let (web, target) = state.service_for("10.96.0.10:80".parse().unwrap()).unwrap();
        assert_eq!(*target, TargetPort::Number(8080));
        let (_, named) = state.service_for("10.96.0.10:81".parse().unwrap()).unwrap();
        assert_eq!(*named, TargetPort::Name("http".into()));
        assert_eq!(web.hostname(), "web.shop.svc.cluster.local");
        let endpoints: Vec<String> = web.endpoints.iter().map(|w| w.key()).collect();
        assert_eq!(
            endpoints,
            ["shop/web-0", "shop/web-1", "shop/web-2"],
            "same namespace, labels match, ready"
        );
        assert!(state.service_for("10.96.0.10:82".parse().unwrap()).is_none(), "not a service port");
        let (manual, _) = state.service_for("10.96.0.11:80".parse().unwrap()).unwrap();
        assert!(manual.endpoints.is_empty(), "no selector, no endpoints");
        let (local, _) = state.service_for("10.96.0.12:80".parse().unwrap()).unwrap();
        let endpoints: Vec<String> = local.endpoints.iter().map(|w| w.key()).collect();
        assert_eq!(endpoints, ["shop/web-0"], "internalTrafficPolicy: Local, only this node's");
        let (web_x, _) = state.service_for("10.96.0.13:80".parse().unwrap()).unwrap();
        let endpoints: Vec<String> = web_x.endpoints.iter().map(|w| w.key()).collect();
        assert_eq!(endpoints, ["shop/web-2"], "every label of the selector matches");

        // An HBONE authority naming the service: the endpoint's port for that service port.
        let port_on = |host: &str, port, key: &str| {
            let endpoint = state.workload_by_key(key).unwrap();
            state.service_port_on(host, port, endpoint)
        };
        let web_host = "web.shop.svc.cluster.local";
        assert_eq!(port_on(web_host, 80, "shop/web-1"), Some(8080));
        assert_eq!(port_on(web_host, 81, "shop/web-1"), None, "web-1 has no port named http");
        assert_eq!(port_on(web_host, 81, "shop/web-2"), Some(9090));
        assert_eq!(port_on(web_host, 82, "shop/web-1"), None, "not a service port");
        assert_eq!(port_on(web_host, 80, "shop/web-3"), None, "not ready, so no endpoint");
        assert_eq!(port_on(web_host, 80, "shop/db"), None, "not selected");
        assert_eq!(port_on("web.other.svc.cluster.local", 80, "other/web-other"), None, "no such service");
        assert_eq!(port_on("web.shop", 80, "shop/web-1"), None, "not a full hostname");
    }
}
