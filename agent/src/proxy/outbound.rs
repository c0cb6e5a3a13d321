//! Outbound: connections a meshed pod's app made, redirected by eBPF to the pod's 127.0.0.1:15001
//! (or [::1]:15001, for IPv6).

use std::{net::SocketAddr, sync::Arc};

use ferry_common::HBONE_PORT;
use tokio::net::TcpStream;

use super::{
    LocalPod, Proxy, Route, inbound,
    relay::{Abort, Flow, TunnelEnd},
    tunnel,
};
use crate::{
    policy::Verdict,
    telemetry::{Direction, FailureReason},
};

pub(super) async fn handle(proxy: Proxy, pod: Arc<LocalPod>, mut client: TcpStream, peer: SocketAddr) {
    let telemetry = &proxy.inner.telemetry;
    // The app's own address: the pod's (connect bound the socket to it; were that to fail, the
    // kernel would have picked loopback as the source of the redirected connection).
    let app = SocketAddr::new(pod.workload.address(peer.is_ipv6()).unwrap_or(peer.ip()), peer.port());
    let source = |flow: Flow| flow.source(Some(pod.workload.clone()), Some(pod.identity.clone()));
    let Some(original) = proxy.inner.orig_dst.take(pod.netns.cookie(), peer) else {
        let flow = source(Flow::new(Direction::Outbound, "unknown", app, peer));
        return flow.reset(
            &client,
            telemetry,
            FailureReason::OrigDstMiss,
            &"no original destination recorded",
        );
    };
    let state = proxy.inner.state.load();
    // A service's virtual IP is resolved here, on the client side, to one of its endpoints.
    // Without any, the connection goes out to the virtual IP as if uncaptured.
    let resolved = state.service_for(original).and_then(|(service, target_port)| {
        let endpoint = proxy.inner.balancer.pick(service, target_port, original.is_ipv6(), app.ip());
        endpoint.map(|endpoint| (service.clone(), endpoint))
    });
    let (service, dst) = match resolved {
        Some((service, endpoint)) => (Some(service), endpoint),
        None => (None, original),
    };
    // Later picks pass over a service endpoint that refused.
    let refused = || {
        if service.is_some() {
            proxy.inner.balancer.refused(dst);
        }
    };
    let route = Route::for_destination(&state, dst.ip());
    let flow = source(Flow::new(Direction::Outbound, route.as_str(), app, dst)).service(service.as_ref());
    let flow = flow.destination(state.workload_by_ip(dst.ip()).cloned(), None);
    let trust_domain = pod.identity.trust_domain();
    let connect_timeout = proxy.inner.limits.connect_timeout;
    let upstream = match route {
        Route::Tunnel(destination) => {
            let flow = flow
                .destination(Some(destination.clone()), Some(destination.identity(trust_domain)))
                .hbone(SocketAddr::new(dst.ip(), HBONE_PORT));
            let host = service.as_ref().map(|s| s.hostname());
            return match tunnel::connect(&proxy, &pod, app, dst, &destination, host.as_deref(), &mut client)
                .await
            {
                Ok(stream) => {
                    let _slot = stream.slot;
                    flow.relay_hbone(client, stream.io, TunnelEnd::Destination, &proxy).await
                }
                Err(e) => {
                    if e.blames_destination() {
                        refused();
                    }
                    flow.reset(&client, telemetry, e.reason(), &e)
                }
            };
        }
        Route::SameNode => match proxy.local_pod(dst.ip()) {
            Some(dst_pod) => {
                // This agent is also the destination side: it decides here.
                let mut flow =
                    flow.destination(Some(dst_pod.workload.clone()), Some(dst_pod.identity.clone()));
                let decision = proxy.authorize(&dst_pod, &mut flow, app.ip());
                if decision.verdict == Verdict::Deny {
                    client.abort();
                    return flow.deny(telemetry, &decision);
                }
                return match inbound::deliver(&dst_pod, dst, connect_timeout).await {
                    Ok(upstream) => flow.relay_tcp(client, upstream, &proxy).await,
                    Err(e) => {
                        refused();
                        flow.reset(&client, telemetry, FailureReason::Connect, &e)
                    }
                };
            }
            // Known as local but not (yet) captured here: reach it as an uncaptured client would.
            None => pod.netns.connect(dst, connect_timeout).await,
        },
        Route::Passthrough => pod.netns.connect(dst, connect_timeout).await,
    };
    match upstream {
        Ok(upstream) => flow.relay_tcp(client, upstream, &proxy).await,
        Err(e) => {
            refused();
            flow.reset(&client, telemetry, FailureReason::Connect, &e)
        }
    }
}
