//! Inbound: connections for a meshed pod, delivered to its app from inside its netns.

use std::{io, net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{LocalPod, Proxy, is_proxy_port, relay::Flow, relay::reset};
use crate::telemetry::{Direction, FailureReason};

/// 15006: plaintext connections steered here by sk_lookup; the socket's local address is the
/// destination the client asked for.
pub(super) async fn handle_plaintext(proxy: Proxy, pod: Arc<LocalPod>, client: TcpStream, peer: SocketAddr) {
    let metrics = &proxy.inner.metrics;
    let dst = match client.local_addr() {
        Ok(dst) => dst,
        Err(e) => {
            return Flow::new(Direction::Inbound, "plaintext", pod.workload.key(), peer, peer).fail(
                client,
                metrics,
                FailureReason::Connect,
                &e,
            );
        }
    };
    let flow = Flow::new(Direction::Inbound, "plaintext", pod.workload.key(), peer, dst);
    if is_proxy_port(dst.port()) {
        return flow.fail(client, metrics, FailureReason::Recursion, &"destination is a proxy port");
    }
    match deliver(&pod, dst).await {
        Ok(app) => flow.relay(client, app, metrics).await,
        Err(e) => flow.fail(client, metrics, FailureReason::Connect, &e),
    }
}

/// 15008: the HBONE listener exists so the port is owned by the proxy; the tunnel protocol
/// itself is not served yet, so peers are refused at once instead of left hanging.
pub(super) async fn handle_hbone(proxy: Proxy, pod: Arc<LocalPod>, client: TcpStream, peer: SocketAddr) {
    proxy.inner.metrics.failed(Direction::Inbound, FailureReason::Unsupported);
    tracing::debug!(pod = %pod.workload.key(), %peer, "HBONE connection refused: not served yet");
    reset(&client);
}

/// Connects to the app from inside its pod, marked so capture leaves it alone. The destination
/// is the pod's own address, which sk_lookup treats as local and does not steer again.
pub(super) async fn deliver(pod: &LocalPod, dst: SocketAddr) -> io::Result<TcpStream> {
    pod.netns.connect(dst).await
}
