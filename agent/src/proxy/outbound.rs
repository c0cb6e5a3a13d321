//! Outbound: connections a meshed pod's app made, redirected by eBPF to the pod's 127.0.0.1:15001.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{LocalPod, Proxy, Route, inbound, relay::Flow, tunnel};
use crate::telemetry::{Direction, FailureReason};

pub(super) async fn handle(proxy: Proxy, pod: Arc<LocalPod>, client: TcpStream, peer: SocketAddr) {
    let metrics = &proxy.inner.metrics;
    // The app's own address: the redirect made the kernel pick loopback as its source.
    let app = SocketAddr::new(pod.workload.ips[0], peer.port());
    let Some(dst) = proxy.inner.orig_dst.take(pod.netns.cookie(), peer.port()) else {
        let flow = Flow::new(Direction::Outbound, "unknown", pod.workload.key(), app, peer);
        return flow.reset(&client, metrics, FailureReason::OrigDstMiss, &"no original destination recorded");
    };
    let route = Route::for_destination(&proxy.inner.state.load(), dst.ip());
    let flow = Flow::new(Direction::Outbound, route.as_str(), pod.workload.key(), app, dst);
    let upstream = match route {
        Route::Tunnel(destination) => {
            let trust_domain = &pod.identity.trust_domain;
            let flow = flow.identities(Some(pod.identity.clone()), Some(destination.identity(trust_domain)));
            return match tunnel::connect(&proxy, &pod, app, dst, &destination).await {
                Ok(stream) => flow.relay(client, stream, metrics).await,
                Err(e) => flow.reset(&client, metrics, e.reason(), &e),
            };
        }
        Route::SameNode => match proxy.local_pod(dst.ip()) {
            Some(dst_pod) => inbound::deliver(&dst_pod, dst).await,
            // Known as local but not (yet) captured here: reach it as an uncaptured client would.
            None => pod.netns.connect(dst).await,
        },
        Route::Passthrough => pod.netns.connect(dst).await,
    };
    match upstream {
        Ok(upstream) => flow.relay(client, upstream, metrics).await,
        Err(e) => flow.reset(&client, metrics, FailureReason::Connect, &e),
    }
}
