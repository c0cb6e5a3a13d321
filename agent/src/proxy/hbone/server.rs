//! Inbound HBONE on a pod's 15008: mTLS with the pod's certificate, HTTP/2, one CONNECT per app
//! connection, delivered to the app inside the pod's netns.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Request, Response, StatusCode, header::HeaderValue};
use tokio::{net::TcpStream, sync::watch};
use tokio_rustls::TlsAcceptor;

use super::{
    SERVER_MAX_CONCURRENT_STREAMS, proto,
    stream::{H2Stream, keep_alive},
};
use crate::{
    identity::{SpiffeId, tls},
    policy::Verdict,
    proxy::{
        LocalPod, Proxy, inbound,
        relay::{Flow, TunnelEnd},
    },
    telemetry::{Direction, FailureReason, Side},
};

const ROUTE: &str = "hbone";

pub(in crate::proxy) async fn handle(proxy: Proxy, pod: Arc<LocalPod>, tcp: TcpStream, peer: SocketAddr) {
    let telemetry = proxy.inner.telemetry.clone();
    let local = match tcp.local_addr() {
        Ok(local) => local,
        Err(_) => return,
    };
    // Taken before the handshake verifies the peer: a change of the roots trusted from then on
    // retires this connection.
    let mut trust = proxy.inner.certs.trust_changes();
    let flow = || {
        Flow::new(Direction::Inbound, ROUTE, peer, local)
            .destination(Some(pod.workload.clone()), Some(pod.identity.clone()))
            .hbone(local)
    };
    // A pod captured moments ago may still be waiting for its first certificate: the handshake
    // waits for it (the TLS resolver cannot), within the time a handshake is given.
    let handshake_timeout = proxy.inner.limits.handshake_timeout;
    if proxy.inner.certs.wait_for(&pod.identity, handshake_timeout).await.is_none() {
        let problem = format!("no certificate for {} within {handshake_timeout:?}", pod.identity);
        return flow().fail(&telemetry, FailureReason::Identity, &problem);
    }
    // A failed peer's socket closes only after its failure is counted, so what the peer observes
    // is already in the metrics: the handshake is pinned here rather than moved into the timeout,
    // and a failed one hands the socket back.
    let handshake = TlsAcceptor::from(pod.tls.clone()).accept(super::buffered(tcp)).into_fallible();
    tokio::pin!(handshake);
    let tls = match tokio::time::timeout(handshake_timeout, &mut handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err((e, socket))) => {
            flow().fail(&telemetry, FailureReason::TlsHandshake, &format!("TLS handshake: {e}"));
            return drop(socket);
        }
        Err(_) => return flow().fail(&telemetry, FailureReason::TlsHandshake, &"TLS handshake timed out"),
    };
    telemetry.proxy.hbone_connection(Side::Server);
    let peer_identity = tls::peer_identity(tls.get_ref().1.peer_certificates());
    let mut draining = proxy.inner.draining.clone();
    let first_request_within = handshake_timeout;
    // A peer that completes TLS and then says nothing (not even the HTTP/2 preface) would hold
    // the connection forever: it gets as long as a handshake for its first request.
    let mut window = proxy.inner.undelivered.follow();
    let handshake = hbone_h2_settings!(h2::server::Builder::new(), window.granted())
        .max_concurrent_streams(SERVER_MAX_CONCURRENT_STREAMS)
        .handshake::<_, Bytes>(tls);
    let first = async {
        let mut connection = handshake.await?;
        let first = connection.accept().await;
        Ok::<_, h2::Error>((connection, first))
    };
    tokio::pin!(first);
    let (mut connection, mut next) = match tokio::time::timeout(first_request_within, &mut first).await {
        Ok(Ok(started)) => started,
        Ok(Err(e)) => return tracing::debug!(%peer, "HBONE connection ended: {e}"),
        Err(_) => {
            let problem = format!("no HBONE request within {first_request_within:?} of the TLS handshake");
            return flow().fail(&telemetry, FailureReason::Idle, &problem);
        }
    };
    let pinged = match connection.ping_pong() {
        Some(ping_pong) => keep_alive(ping_pong),
        None => return,
    };
    tokio::pin!(pinged);
    let mut draining_now = false;
    loop {
        match next {
            Some(Ok((request, respond))) => {
                let (proxy, pod, peer_identity) = (proxy.clone(), pod.clone(), peer_identity.clone());
                // Boxed for the reason given in `accept_loop`.
                tokio::spawn(Box::pin(connect(proxy, pod, peer, peer_identity, local, request, respond)));
            }
            Some(Err(e)) => return tracing::debug!(%peer, "HBONE connection ended: {e}"),
            None => return,
        }
        next = loop {
            tokio::select! {
                next = connection.accept() => break next,
                () = &mut pinged => return tracing::debug!(%peer, "HBONE connection: pings unanswered, closing"),
                () = retired(&mut draining, &mut trust, &pod), if !draining_now => {
                    // GOAWAY: no new streams, open ones finish; the peer opens a new connection
                    // for more, verified against the roots trusted now, to the pod as served now.
                    draining_now = true;
                    connection.graceful_shutdown();
                    break connection.accept().await;
                }
                size = window.changed() => window.announced(size, connection.set_initial_window_size(size)),
            }
        };
    }
}

/// Resolves when the connection should take no new streams: the agent drains, the roots its
/// peer was verified against changed, or the pod it was accepted for is served anew (its labels,
/// identity or netns may differ) or not at all.
async fn retired(draining: &mut watch::Receiver<bool>, trust: &mut watch::Receiver<u64>, pod: &LocalPod) {
    tokio::select! {
        _ = draining.wait_for(|d| *d) => {}
        Ok(()) = trust.changed() => {}
        () = pod.released.cancelled() => {}
    }
}

/// One CONNECT stream: check it, reach the app, answer, then relay over the upgraded stream.
async fn connect(
    proxy: Proxy,
    pod: Arc<LocalPod>,
    peer: SocketAddr,
    peer_identity: Option<SpiffeId>,
    local: SocketAddr,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let telemetry = proxy.inner.telemetry.clone();
    let client = request.headers().get("forwarded").and_then(proto::forwarded_for).unwrap_or(peer);
    let state = proxy.inner.state.load();
    let target = proto::inbound_target(request.method(), request.uri(), local.ip(), |host, port| {
        state.service_port_on(host, port, &pod.workload)
    });
    let source = state.workload_by_ip(peer.ip()).cloned();
    drop(state);
    let mut flow = Flow::new(Direction::Inbound, ROUTE, client, target.clone().unwrap_or(local))
        .source(source, peer_identity)
        .destination(Some(pod.workload.clone()), Some(pod.identity.clone()))
        .hbone(local);
    let target = match target {
        Ok(target) => target,
        Err(rejection) => {
            let reason = match rejection.status() {
                StatusCode::BAD_REQUEST => FailureReason::BadRequest,
                _ => FailureReason::Unavailable,
            };
            let error = format!("{} {}: {}", rejection.status(), request.uri(), rejection.reason());
            flow.fail(&telemetry, reason, &error);
            return answer(&mut respond, rejection.status());
        }
    };
    // Policy sees the peer's authenticated identity and its connection's address, not the
    // client-supplied `forwarded` header.
    let decision = proxy.authorize(&pod, &mut flow, peer.ip());
    if decision.verdict == Verdict::Deny {
        flow.deny(&telemetry, &decision);
        return answer(&mut respond, StatusCode::UNAUTHORIZED);
    }
    let app = match inbound::deliver(&pod, target, proxy.inner.limits.connect_timeout).await {
        Ok(app) => app,
        Err(e) => {
            flow.fail(&telemetry, FailureReason::Unavailable, &format!("503: app at {target}: {e}"));
            return answer(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let mut response = Response::new(());
    if let Ok(baggage) = HeaderValue::try_from(proto::baggage(&pod.workload)) {
        response.headers_mut().insert(proto::BAGGAGE, baggage);
    }
    match respond.send_response(response, false) {
        Ok(send) => {
            let stream = H2Stream::new(send, request.into_body(), 0);
            flow.relay_hbone(app, stream, TunnelEnd::Source, &proxy).await
        }
        Err(e) => flow.reset(&app, &telemetry, FailureReason::Relay, &e),
    }
}

/// A refusal: the status, and the stream ends.
fn answer(respond: &mut SendResponse<Bytes>, code: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = code;
    let _ = respond.send_response(response, true);
}
