//! Per-connection load balancing over a service's endpoints: a random endpoint among those that
//! have not refused a connection lately (all of them if every one has).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use rand::seq::IndexedRandom;

use crate::state::Service;

/// How long an endpoint that refused a connection is passed over.
const REFUSAL_MEMORY: Duration = Duration::from_secs(10);

#[derive(Default)]
pub(super) struct Balancer {
    refused: Mutex<HashMap<SocketAddr, Instant>>,
}

impl Balancer {
    /// An endpoint address (`pod IP:target_port`, in the family of the virtual IP the client
    /// connected to, IPv6 if `ipv6`) of `service`; `None` when it has none.
    pub(super) fn pick(&self, service: &Service, target_port: u16, ipv6: bool) -> Option<SocketAddr> {
        let all: Vec<SocketAddr> = service
            .endpoints
            .iter()
            .filter_map(|w| w.address(ipv6))
            .map(|ip| SocketAddr::new(ip, target_port))
            .collect();
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        refused.retain(|_, at| at.elapsed() < REFUSAL_MEMORY);
        let willing: Vec<SocketAddr> = all.iter().copied().filter(|a| !refused.contains_key(a)).collect();
        let candidates = if willing.is_empty() { &all } else { &willing };
        candidates.choose(&mut rand::rng()).copied()
    }

    /// Remembers that `endpoint` refused a connection.
    pub(super) fn refused(&self, endpoint: SocketAddr) {
        self.refused.lock().unwrap_or_else(|e| e.into_inner()).insert(endpoint, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::state::Workload;

    fn service(ips: &[&str]) -> Service {
        let endpoint = |ip: &&str| {
            Arc::new(Workload {
                name: ip.to_string(),
                namespace: "ns".into(),
                service_account: "sa".into(),
                labels: Default::default(),
                ips: vec![ip.parse().unwrap()],
                node: "n".into(),
                meshed: true,
                ready: true,
            })
        };
        Service {
            name: "web".into(),
            namespace: "ns".into(),
            vips: vec![],
            ports: vec![],
            endpoints: ips.iter().map(endpoint).collect(),
        }
    }

    #[test]
    fn spreads_over_endpoints_and_skips_refusing_ones() {
        let balancer = Balancer::default();
        let web = service(&["10.0.0.1", "10.0.0.2"]);
        let picks: Vec<SocketAddr> = (0..200).map(|_| balancer.pick(&web, 8080, false).unwrap()).collect();
        for ip in ["10.0.0.1", "10.0.0.2"] {
            let endpoint = SocketAddr::new(ip.parse().unwrap(), 8080);
            assert!(picks.iter().filter(|p| **p == endpoint).count() > 50, "{endpoint} rarely picked");
        }
        let refusing: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        balancer.refused(refusing);
        assert!((0..50).all(|_| balancer.pick(&web, 8080, false) != Some(refusing)));
        // When every endpoint refused lately, any may be tried again.
        balancer.refused("10.0.0.2:8080".parse().unwrap());
        assert!(balancer.pick(&web, 8080, false).is_some());
        assert_eq!(balancer.pick(&service(&[]), 8080, false), None);
    }
}
