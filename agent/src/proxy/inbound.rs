//! Inbound: connections for a meshed pod, delivered to its app from inside its netns.
//! Plaintext (15006) is here; HBONE (15008) is in [`super::hbone::server`].

use std::{io, net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{LocalPod, Proxy, is_proxy_port, relay::Flow};
use crate::telemetry::{Direction, FailureReason};

/// 15006: plaintext connections steered here by sk_lookup; the socket's local address is the
/// destination the client asked for.
pub(super) async fn handle_plaintext(proxy: Proxy, pod: Arc<LocalPod>, client: TcpStream, peer: SocketAddr) {
    let metrics = &proxy.inner.metrics;
    let dst = client.local_addr().unwrap_or(peer);
    let flow = Flow::new(Direction::Inbound, "plaintext", pod.workload.key(), peer, dst)
        .identities(None, Some(pod.identity.clone()));
    if is_proxy_port(dst.port()) {
        return flow.reset(&client, metrics, FailureReason::Recursion, &"destination is a proxy port");
    }
    match deliver(&pod, dst).await {
        Ok(app) => flow.relay(client, app, metrics).await,
        Err(e) => flow.reset(&client, metrics, FailureReason::Connect, &e),
    }
}

/// Connects to the app from inside its pod, marked so capture leaves it alone. The destination
/// is the pod's own address, which sk_lookup treats as local and does not steer again.
pub(super) async fn deliver(pod: &LocalPod, dst: SocketAddr) -> io::Result<TcpStream> {
    pod.netns.connect(dst).await
}
