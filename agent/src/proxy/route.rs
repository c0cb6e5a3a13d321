//! Where an outbound connection goes, decided from state alone (no I/O).

use std::{net::IpAddr, sync::Arc};

use crate::state::{State, Workload};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A meshed workload on this node: handed straight to its inbound side.
    SameNode,
    /// A meshed workload on another node: HBONE to that workload's pod.
    Tunnel(Arc<Workload>),
    /// Unknown or unmeshed destination: plain TCP from the pod, as if uncaptured.
    Passthrough,
}

impl Route {
    pub fn for_destination(state: &State, dst: IpAddr) -> Route {
        match state.workload_by_ip(dst) {
            Some(w) if w.meshed && state.is_local(w) => Route::SameNode,
            Some(w) if w.meshed => Route::Tunnel(w.clone()),
            _ => Route::Passthrough,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Route::SameNode => "same_node",
            Route::Tunnel(_) => "hbone",
            Route::Passthrough => "passthrough",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    #[test]
    fn routes_by_workload_location_and_mesh_membership() {
        let config = Config::parse(
            "
node: n1
workloads:
  - {name: remote, namespace: ns, ips: [10.0.2.2], node: n2}
  - {name: plain, namespace: ns, ips: [10.0.2.3], node: n2, meshed: false}
  - {name: local, namespace: ns, ips: [10.0.1.2], node: n1, meshed: true, netns: /proc/self/ns/net, cgroup: /}
",
            Path::new("t.yaml"),
        )
        .unwrap();
        let state = State::from_config(&config);
        let ip = |s: &str| s.parse().unwrap();
        assert_eq!(Route::for_destination(&state, ip("10.0.1.2")), Route::SameNode);
        let remote = state.workload_by_ip(ip("10.0.2.2")).unwrap().clone();
        assert_eq!(Route::for_destination(&state, ip("10.0.2.2")), Route::Tunnel(remote));
        assert_eq!(Route::for_destination(&state, ip("10.0.2.3")), Route::Passthrough);
        assert_eq!(Route::for_destination(&state, ip("192.0.2.1")), Route::Passthrough);
    }
}
