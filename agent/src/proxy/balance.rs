//! Per-connection load balancing over a service's endpoints: a random endpoint among those that
//! have not refused a connection lately (all of them if every one has); with client IP affinity,
//! the one the client got last time, while it is still among them.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use rand::seq::IndexedRandom;

use crate::{config::TargetPort, state::Service};

/// How long an endpoint that refused a connection is passed over.
const REFUSAL_MEMORY: Duration = Duration::from_secs(10);

/// Affinities are looked through for expired ones once there are this many.
const STICKY_PRUNE_FIRST: usize = 4096;

#[derive(Default)]
pub(super) struct Balancer {
    refused: Mutex<HashMap<SocketAddr, Instant>>,
    sticky: Mutex<Sticky>,
}

/// Client IP affinity: each client's endpoint, by service (`namespace/name`) and client
/// address, until it expires.
#[derive(Default)]
struct Sticky {
    endpoints: HashMap<(String, IpAddr), (SocketAddr, Instant)>,
    prune_at: usize,
}

impl Balancer {
    /// An endpoint address (`pod IP:target port`, in the family of the virtual IP the client
    /// connected to, IPv6 if `ipv6`) of `service` for a connection from `client`; `None` when it
    /// has none. A named target port is looked up on each endpoint; one without it is passed over.
    pub(super) fn pick(
        &self,
        service: &Service,
        target: &TargetPort,
        ipv6: bool,
        client: IpAddr,
    ) -> Option<SocketAddr> {
        let all: Vec<SocketAddr> = service
            .endpoints
            .iter()
            .filter_map(|w| Some(SocketAddr::new(w.address(ipv6)?, target.on(&w.ports)?)))
            .collect();
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        refused.retain(|_, at| at.elapsed() < REFUSAL_MEMORY);
        let willing: Vec<SocketAddr> = all.iter().copied().filter(|a| !refused.contains_key(a)).collect();
        drop(refused);
        let candidates = if willing.is_empty() { &all } else { &willing };
        let Some(timeout) = service.affinity else {
            return candidates.choose(&mut rand::rng()).copied();
        };
        let now = Instant::now();
        let mut sticky = self.sticky.lock().unwrap_or_else(|e| e.into_inner());
        let key = (format!("{}/{}", service.namespace, service.name), client);
        if let Some((endpoint, expires)) = sticky.endpoints.get_mut(&key)
            && *expires > now
            && candidates.contains(endpoint)
        {
            *expires = now + timeout;
            return Some(*endpoint);
        }
        let endpoint = *candidates.choose(&mut rand::rng())?;
        sticky.endpoints.insert(key, (endpoint, now + timeout));
        if sticky.endpoints.len() >= sticky.prune_at.max(STICKY_PRUNE_FIRST) {
            sticky.endpoints.retain(|_, (_, expires)| *expires > now);
            sticky.prune_at = 2 * sticky.endpoints.len();
        }
        Some(endpoint)
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
            affinity: None,
        }
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, 2));

    #[test]
    fn spreads_over_endpoints_and_skips_refusing_ones() {
        let balancer = Balancer::default();
        let web = service(&["10.0.0.1", "10.0.0.2"]);
        let port = TargetPort::Number(8080);
        let picks: Vec<SocketAddr> =
            (0..200).map(|_| balancer.pick(&web, &port, false, CLIENT).unwrap()).collect();
        for ip in ["10.0.0.1", "10.0.0.2"] {
            let endpoint = SocketAddr::new(ip.parse().unwrap(), 8080);
            assert!(picks.iter().filter(|p| **p == endpoint).count() > 50, "{endpoint} rarely picked");
        }
        let refusing: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        balancer.refused(refusing);
        assert!((0..50).all(|_| balancer.pick(&web, &port, false, CLIENT) != Some(refusing)));
        // When every endpoint refused lately, any may be tried again.
        balancer.refused("10.0.0.2:8080".parse().unwrap());
        assert!(balancer.pick(&web, &port, false, CLIENT).is_some());
        assert_eq!(balancer.pick(&service(&[]), &port, false, CLIENT), None);
    }

    #[test]
    fn a_named_target_port_is_each_endpoints_own_and_skips_those_without_it() {
        let balancer = Balancer::default();
        let web = service(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        let http = TargetPort::Name("http".into());
        let mut picks: Vec<SocketAddr> =
            (0..200).map(|_| balancer.pick(&web, &http, false, CLIENT).unwrap()).collect();
        picks.sort();
        picks.dedup();
        let expected: Vec<SocketAddr> =
            vec!["10.0.0.1:8001".parse().unwrap(), "10.0.0.2:8002".parse().unwrap()];
        assert_eq!(picks, expected, "10.0.0.3 has no port named http");
        assert_eq!(balancer.pick(&web, &TargetPort::Name("grpc".into()), false, CLIENT), None);
    }

    #[test]
    fn client_ip_affinity_keeps_a_client_on_its_endpoint_while_it_serves() {
        let balancer = Balancer::default();
        let mut web = service(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        web.affinity = Some(Duration::from_secs(60));
        let port = TargetPort::Number(8080);
        let first = balancer.pick(&web, &port, false, CLIENT).unwrap();
        assert!((0..50).all(|_| balancer.pick(&web, &port, false, CLIENT) == Some(first)));
        // Other clients spread as before.
        let others: std::collections::BTreeSet<SocketAddr> = (0..100u8)
            .map(|i| balancer.pick(&web, &port, false, IpAddr::from([10, 9, 0, i])).unwrap())
            .collect();
        assert_eq!(others.len(), 3);
        // Its endpoint refused: it gets another one, and keeps that.
        balancer.refused(first);
        let second = balancer.pick(&web, &port, false, CLIENT).unwrap();
        assert_ne!(second, first);
        assert!((0..20).all(|_| balancer.pick(&web, &port, false, CLIENT) == Some(second)));
        // Expired: picked anew.
        web.affinity = Some(Duration::ZERO);
        let _ = balancer.pick(&web, &port, false, CLIENT);
        let picks: std::collections::BTreeSet<_> =
            (0..100).map(|_| balancer.pick(&web, &port, false, CLIENT).unwrap()).collect();
        assert!(picks.len() > 1, "no longer sticky once expired: {picks:?}");
    }
}
