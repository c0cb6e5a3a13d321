//! Per-connection load balancing over a service's endpoints: a random endpoint among those that
//! have not refused a connection lately (all of them if every one has).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use rand::seq::IndexedRandom;

use crate::{config::TargetPort, state::Service};

/// How long an endpoint that refused a connection is passed over.
const REFUSAL_MEMORY: Duration = Duration::from_secs(10);

#[derive(Default)]
pub(super) struct Balancer {
    refused: Mutex<HashMap<SocketAddr, Instant>>,
}

impl Balancer {
    /// An endpoint address (`pod IP:target port`, in the family of the virtual IP the client
    /// connected to, IPv6 if `ipv6`) of `service`; `None` when it has none. A named target port
    /// is looked up on each endpoint; one without it is passed over.
    pub(super) fn pick(&self, service: &Service, target: &TargetPort, ipv6: bool) -> Option<SocketAddr> {
        let all: Vec<SocketAddr> = service
            .endpoints
            .iter()
            .filter_map(|w| Some(SocketAddr::new(w.address(ipv6)?, target.on(&w.ports)?)))
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

    /// Endpoints at these addresses; `http` is the name of port 8000 + the last octet on each
    /// but the last.
    fn service(ips: &[&str]) -> Service {
        let endpoint = |(i, ip): (usize, &&str)| {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let octet = match ip {
                std::net::IpAddr::V4(v4) => u16::from(v4.octets()[3]),
                std::net::IpAddr::V6(_) => 0,
            };
            let ports = if i + 1 < ips.len() {
                [("http".to_owned(), 8000 + octet)].into()
            } else {
                Default::default()
            };
            Arc::new(Workload {
                name: ip.to_string(),
                workload_name: None,
                namespace: "ns".into(),
                service_account: "sa".into(),
                labels: Default::default(),
                ips: vec![ip],
                node: "n".into(),
                meshed: true,
                ready: true,
                ports,
                netns: None,
                cgroup: None,
            })
        };
        Service {
            name: "web".into(),
            namespace: "ns".into(),
            vips: vec![],
            ports: vec![],
            endpoints: ips.iter().enumerate().map(endpoint).collect(),
        }
    }

    #[test]
    fn spreads_over_endpoints_and_skips_refusing_ones() {
        let balancer = Balancer::default();
        let web = service(&["10.0.0.1", "10.0.0.2"]);
        let port = TargetPort::Number(8080);
        let picks: Vec<SocketAddr> = (0..200).map(|_| balancer.pick(&web, &port, false).unwrap()).collect();
        for ip in ["10.0.0.1", "10.0.0.2"] {
            let endpoint = SocketAddr::new(ip.parse().unwrap(), 8080);
            assert!(picks.iter().filter(|p| **p == endpoint).count() > 50, "{endpoint} rarely picked");
        }
        let refusing: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        balancer.refused(refusing);
        assert!((0..50).all(|_| balancer.pick(&web, &port, false) != Some(refusing)));
        // When every endpoint refused lately, any may be tried again.
        balancer.refused("10.0.0.2:8080".parse().unwrap());
        assert!(balancer.pick(&web, &port, false).is_some());
        assert_eq!(balancer.pick(&service(&[]), &port, false), None);
    }

    #[test]
    fn a_named_target_port_is_each_endpoints_own_and_skips_those_without_it() {
        let balancer = Balancer::default();
        let web = service(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        let http = TargetPort::Name("http".into());
        let mut picks: Vec<SocketAddr> =
            (0..200).map(|_| balancer.pick(&web, &http, false).unwrap()).collect();
        picks.sort();
        picks.dedup();
        let expected: Vec<SocketAddr> =
            vec!["10.0.0.1:8001".parse().unwrap(), "10.0.0.2:8002".parse().unwrap()];
        assert_eq!(picks, expected, "10.0.0.3 has no port named http");
        assert_eq!(balancer.pick(&web, &TargetPort::Name("grpc".into()), false), None);
    }
}
