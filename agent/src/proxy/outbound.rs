//! Outbound: connections a meshed pod's app made, redirected by eBPF to the pod's 127.0.0.1:15001.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{LocalPod, Proxy, Route, inbound, relay::Flow, tunnel};
use crate::telemetry::{Direction, FailureReason};

pub(super) async fn handle(proxy: Proxy, pod: Arc<LocalPod>, client: TcpStream, peer: SocketAddr) {
    let metrics = &proxy.inner.metrics;
    let Some(dst) = proxy.inner.orig_dst.take(pod.netns.cookie(), peer.port()) else {
        let flow = Flow::new(Direction::Outbound, "unknown", pod.workload.key(), peer, peer);
        flow.fail(client, metrics, FailureReason::OrigDstMiss, &"no original destination recorded");
        return;
    };
    let route = Route::for_destination(&proxy.inner.state.load(), dst.ip());
    let flow = Flow::new(Direction::Outbound, route.as_str(), pod.workload.key(), peer, dst);
    let upstream = match route {
        Route::SameNode => match proxy.local_pod(dst.ip()) {
            Some(dst_pod) => inbound::deliver(&dst_pod, dst).await,
            // Known as local but not (yet) captured here: reach it as an uncaptured client would.
            None => pod.netns.connect(dst).await,
        },
        Route::Tunnel => tunnel::connect(&pod, dst).await,
        Route::Passthrough => pod.netns.connect(dst).await,
    };
    match upstream {
        Ok(upstream) => flow.relay(client, upstream, metrics).await,
        Err(e) => flow.fail(client, metrics, FailureReason::Connect, &e),
    }
}
