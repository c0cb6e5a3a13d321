//! Inbound: connections for a meshed pod, delivered to its app from inside its netns.
//! Plaintext (15006) is here; HBONE (15008) is in [`super::hbone::server`].

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::net::TcpStream;

use super::{
    LocalPod, Proxy, is_proxy_port,
    relay::{Abort, Flow},
};
use crate::{
    policy::Verdict,
    telemetry::{Direction, FailureReason},
};

/// 15006: plaintext connections steered here by sk_lookup; the socket's local address is the
/// destination the client asked for. Denied connections are reset before the app sees a byte.
pub(super) async fn handle_plaintext(proxy: Proxy, pod: Arc<LocalPod>, client: TcpStream, peer: SocketAddr) {
    let telemetry = &proxy.inner.telemetry;
    let dst = client.local_addr().unwrap_or(peer);
    let source = proxy.inner.state.load().workload_by_ip(peer.ip()).cloned();
    let mut flow = Flow::new(Direction::Inbound, "plaintext", peer, dst)
        .source(source, None)
        .destination(Some(pod.workload.clone()), Some(pod.identity.clone()));
    if is_proxy_port(dst.port()) {
        return flow.reset(&client, telemetry, FailureReason::Recursion, &"destination is a proxy port");
    }
    let decision = proxy.authorize(&pod, &mut flow, peer.ip());
    if decision.verdict == Verdict::Deny {
        client.abort();
        return flow.deny(telemetry, &decision);
    }
    match deliver(&pod, dst).await {
        Ok(app) => flow.relay_tcp(client, app, &proxy).await,
        Err(e) => flow.reset(&client, telemetry, FailureReason::Connect, &e),
    }
}

/// Connects to the app from inside its pod, marked so capture leaves it alone. The destination
/// is the pod's own address, which sk_lookup treats as local and does not steer again.
pub(super) async fn deliver(pod: &LocalPod, dst: SocketAddr) -> io::Result<TcpStream> {
    pod.netns.connect(dst).await
}

/// This node's own addresses, those of the agent's netns (the host's), where the kubelet's
/// probes come from. Read again on a miss, at most once per [`NodeAddresses::REREAD`], so an
/// address added later is found without a read per connection.
pub(super) struct NodeAddresses {
    known: Mutex<(HashSet<IpAddr>, Instant)>,
}

impl NodeAddresses {
    const REREAD: Duration = Duration::from_secs(1);

    pub(super) fn read() -> NodeAddresses {
        NodeAddresses { known: Mutex::new((interface_addresses(), Instant::now())) }
    }

    pub(super) fn contains(&self, ip: IpAddr) -> bool {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if !known.0.contains(&ip) && known.1.elapsed() >= Self::REREAD {
            *known = (interface_addresses(), Instant::now());
        }
        known.0.contains(&ip)
    }
}

/// The addresses of the calling thread's netns. Proxy threads enter pods' netns only around
/// creating a socket, so here that is the agent's.
fn interface_addresses() -> HashSet<IpAddr> {
    match nix::ifaddrs::getifaddrs() {
        Ok(interfaces) => interfaces
            .filter_map(|interface| interface.address)
            .filter_map(|address| {
                let v4 = address.as_sockaddr_in().map(|a| IpAddr::V4(a.ip()));
                v4.or_else(|| address.as_sockaddr_in6().map(|a| IpAddr::V6(a.ip())))
            })
            .collect(),
        Err(e) => {
            tracing::warn!("reading this node's addresses: {e}; node traffic gets no exemption");
            HashSet::new()
        }
    }
}
