//! What the agent knows about the mesh: workloads (later services and policies), indexed for the
//! proxy. Discovery builds a new [`State`] and swaps it in; the proxy and the datapath only read it.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, RwLock},
};

use crate::{
    config::{self, Config},
    identity::SpiffeId,
    policy::PolicySet,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub node: String,
    pub meshed: bool,
}

impl Workload {
    /// `namespace/name`, how logs and the CLI refer to a workload.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// SPIFFE identity: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    pub fn identity(&self, trust_domain: &str) -> SpiffeId {
        SpiffeId::new(trust_domain, &self.namespace, &self.service_account)
    }
}

impl From<&config::Workload> for Workload {
    fn from(w: &config::Workload) -> Self {
        Workload {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            labels: w.labels.clone(),
            ips: w.ips.clone(),
            node: w.node.clone(),
            meshed: w.meshed,
        }
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub node: String,
    pub trust_domain: String,
    workloads: Vec<Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    pub policies: PolicySet,
}

impl State {
    pub fn from_config(config: &Config) -> State {
        let workloads: Vec<Arc<Workload>> =
            config.workloads.iter().map(|w| Arc::new(Workload::from(w))).collect();
        let mut by_ip = HashMap::new();
        for w in &workloads {
            for ip in &w.ips {
                by_ip.insert(*ip, w.clone());
            }
        }
        State {
            node: config.node.clone(),
            trust_domain: config.trust_domain.clone(),
            workloads,
            by_ip,
            policies: PolicySet::new(config.compiled_policies.clone()),
        }
    }

    /// Every known workload, in discovery order.
    pub fn workloads(&self) -> &[Arc<Workload>] {
        &self.workloads
    }

    /// A workload by `namespace/name`.
    pub fn workload_by_key(&self, key: &str) -> Option<&Arc<Workload>> {
        self.workloads.iter().find(|w| w.key() == key)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    pub fn is_local(&self, workload: &Workload) -> bool {
        workload.node == self.node
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
