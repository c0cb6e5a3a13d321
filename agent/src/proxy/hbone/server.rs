//! Inbound HBONE on a pod's 15008: mTLS with the pod's certificate, HTTP/2, one CONNECT per app
//! connection, delivered to the app inside the pod's netns.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Empty;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::HeaderValue,
    server::conn::http2,
    service::service_fn,
    upgrade::Upgraded,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpStream, sync::Notify};
use tokio_rustls::TlsAcceptor;

use super::{SERVER_MAX_CONCURRENT_STREAMS, proto};
use crate::{
    identity::{SpiffeId, tls},
    policy::Verdict,
    proxy::{
        LocalPod, Proxy, inbound,
        relay::{Abort, Flow},
    },
    telemetry::{Direction, FailureReason, Side},
};

const ROUTE: &str = "hbone";

impl Abort for TokioIo<Upgraded> {
    /// Dropping an unfinished stream resets it.
    fn abort(&self) {}
}

pub(in crate::proxy) async fn handle(proxy: Proxy, pod: Arc<LocalPod>, tcp: TcpStream, peer: SocketAddr) {
    let telemetry = proxy.inner.telemetry.clone();
    let local = match tcp.local_addr() {
        Ok(local) => local,
        Err(_) => return,
    };
    let flow = || {
        Flow::new(Direction::Inbound, ROUTE, peer, local)
            .destination(Some(pod.workload.clone()), Some(pod.identity.clone()))
            .hbone(local)
    };
    let handshake = TlsAcceptor::from(pod.tls.clone()).accept(tcp);
    let tls = match tokio::time::timeout(proxy.inner.limits.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            return flow().fail(&telemetry, FailureReason::TlsHandshake, &format!("TLS handshake: {e}"));
        }
        Err(_) => return flow().fail(&telemetry, FailureReason::TlsHandshake, &"TLS handshake timed out"),
    };
    telemetry.proxy.hbone_connection(Side::Server);
    let peer_identity = tls::peer_identity(tls.get_ref().1.peer_certificates());
    let mut draining = proxy.inner.draining.clone();
    let first_request_within = proxy.inner.limits.handshake_timeout;
    let requested = Arc::new(Notify::new());
    let (requests, service_pod) = (requested.clone(), pod.clone());
    let service = service_fn(move |request| {
        requests.notify_one();
        let proxy = proxy.clone();
        let pod = service_pod.clone();
        let peer_identity = peer_identity.clone();
        async move { Ok::<_, Infallible>(connect(proxy, pod, peer, peer_identity, local, request).await) }
    });
    let connection = hbone_h2_settings!(http2::Builder::new(TokioExecutor::new()))
        .max_concurrent_streams(SERVER_MAX_CONCURRENT_STREAMS)
        .serve_connection(TokioIo::new(tls), service);
    tokio::pin!(connection);
    // A peer that completes TLS and then says nothing (not even the HTTP/2 preface) would hold
    // the connection forever: it gets as long as a handshake for its first request.
    let silent = async {
        if tokio::time::timeout(first_request_within, requested.notified()).await.is_err() {
            return;
        }
        std::future::pending::<()>().await
    };
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = silent => {
            let problem = format!("no HBONE request within {first_request_within:?} of the TLS handshake");
            return flow().fail(&telemetry, FailureReason::Idle, &problem);
        }
        _ = async { let _ = draining.wait_for(|d| *d).await; } => {
            // GOAWAY: no new streams, open ones finish.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, "HBONE connection ended: {e}");
    }
}

/// One CONNECT stream: check it, reach the app, answer, then relay over the upgraded stream.
async fn connect(
    proxy: Proxy,
    pod: Arc<LocalPod>,
    peer: SocketAddr,
    peer_identity: Option<SpiffeId>,
    local: SocketAddr,
    request: Request<Incoming>,
) -> Response<Empty<Bytes>> {
    let telemetry = proxy.inner.telemetry.clone();
    let client = request.headers().get("forwarded").and_then(proto::forwarded_for).unwrap_or(peer);
    let target = proto::inbound_target(request.method(), request.uri(), local.ip());
    let source = proxy.inner.state.load().workload_by_ip(peer.ip()).cloned();
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
            return status(rejection.status());
        }
    };
    // Policy sees the peer's authenticated identity and its connection's address, not the
    // client-supplied `forwarded` header.
    let decision = proxy.authorize(&pod, &mut flow, peer.ip());
    if decision.verdict == Verdict::Deny {
        flow.deny(&telemetry, &decision);
        return status(StatusCode::UNAUTHORIZED);
    }
    let app = match inbound::deliver(&pod, target).await {
        Ok(app) => app,
        Err(e) => {
            flow.fail(&telemetry, FailureReason::Unavailable, &format!("503: app at {target}: {e}"));
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let relay_proxy = proxy.clone();
    tokio::spawn(async move {
        match hyper::upgrade::on(request).await {
            Ok(upgraded) => flow.relay(TokioIo::new(upgraded), app, &relay_proxy).await,
            Err(e) => flow.reset(&app, &telemetry, FailureReason::Relay, &e),
        }
    });
    let mut response = status(StatusCode::OK);
    if let Ok(baggage) = HeaderValue::from_str(&proto::destination_baggage(&pod.workload)) {
        response.headers_mut().insert("baggage", baggage);
    }
    response
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = code;
    response
}
