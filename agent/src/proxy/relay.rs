//! One proxied connection from set-up to close: copies bytes both ways (half-closes kept), and
//! reports it once to metrics, the access log and the flow-event ring.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::TcpStream;

use super::{
    Proxy,
    connections::{Admission, ByteCounts, Registration},
    hbone::{self, H2Stream},
    splice,
};
use crate::{
    identity::SpiffeId,
    policy::Decision,
    state::{Service, Workload},
    telemetry::{ConnectionLabels, Direction, FailureReason, FlowEvent, FlowKind, Telemetry, now_ms},
};

const UNKNOWN: &str = "unknown";

/// Resolves once no byte has moved either way for `timeout`.
async fn idle(bytes: &ByteCounts, timeout: Duration) {
    let moved = || bytes.totals();
    let mut last = moved();
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep((timeout / 4).max(Duration::from_millis(100))).await;
        let now = moved();
        if now != last {
            last = now;
            quiet_since = tokio::time::Instant::now();
        } else if quiet_since.elapsed() >= timeout {
            return;
        }
    }
}

/// Which end of a flow the HBONE stream of an HBONE relay is.
pub(super) enum TunnelEnd {
    /// Outbound: the app is the source, the tunnel leads to the destination.
    Destination,
    /// Inbound: the tunnel brings the source, the app is the destination.
    Source,
}

/// A stream that can be cut so the other end sees a failure, not a clean end.
pub(super) trait Abort {
    fn abort(&self);
}

impl Abort for TcpStream {
    /// The next close sends RST instead of FIN.
    fn abort(&self) {
        let _ = socket2::SockRef::from(self).set_linger(Some(Duration::ZERO));
    }
}

/// Everything known about one connection, for metrics, logs and flow events.
#[derive(Debug, Clone)]
pub(super) struct Flow {
    pub(super) direction: Direction,
    pub(super) route: &'static str,
    pub(super) src: SocketAddr,
    pub(super) dst: SocketAddr,
    /// The HBONE address the connection was tunnelled to or arrived on.
    pub(super) hbone_addr: Option<SocketAddr>,
    pub(super) src_workload: Option<Arc<Workload>>,
    pub(super) dst_workload: Option<Arc<Workload>>,
    pub(super) src_identity: Option<SpiffeId>,
    pub(super) dst_identity: Option<SpiffeId>,
    /// The service the app dialled, when `dst` is one of its endpoints.
    pub(super) service: Option<Arc<Service>>,
    /// The policy that allowed it, when one did.
    pub(super) policy: Option<String>,
    /// What the destination side admitted it with; re-checked when policies change.
    pub(super) admission: Option<Admission>,
    pub(super) started: Instant,
}

impl Flow {
    pub(super) fn new(direction: Direction, route: &'static str, src: SocketAddr, dst: SocketAddr) -> Flow {
        Flow {
            direction,
            route,
            src,
            dst,
            hbone_addr: None,
            src_workload: None,
            dst_workload: None,
            src_identity: None,
            dst_identity: None,
            service: None,
            policy: None,
            admission: None,
            started: Instant::now(),
        }
    }

    pub(super) fn source(mut self, workload: Option<Arc<Workload>>, identity: Option<SpiffeId>) -> Flow {
        self.src_workload = workload;
        self.src_identity = identity;
        self
    }

    pub(super) fn destination(mut self, workload: Option<Arc<Workload>>, identity: Option<SpiffeId>) -> Flow {
        self.dst_workload = workload;
        self.dst_identity = identity;
        self
    }

    pub(super) fn service(mut self, service: Option<&Arc<Service>>) -> Flow {
        self.service = service.cloned();
        self
    }

    pub(super) fn hbone(mut self, addr: SocketAddr) -> Flow {
        self.hbone_addr = Some(addr);
        self
    }

    pub(super) fn labels(&self) -> ConnectionLabels {
        let name = |w: &Option<Arc<Workload>>| w.as_ref().map_or(UNKNOWN, |w| w.metrics_name()).to_owned();
        let namespace =
            |w: &Option<Arc<Workload>>| w.as_ref().map_or(UNKNOWN.to_owned(), |w| w.namespace.clone());
        let app = |w: &Option<Arc<Workload>>| {
            w.as_ref()
                .and_then(|w| w.labels.get("app").or_else(|| w.labels.get("app.kubernetes.io/name")).cloned())
                .unwrap_or_else(|| UNKNOWN.to_owned())
        };
        let principal = |id: &Option<SpiffeId>| id.as_ref().map_or(UNKNOWN, SpiffeId::as_str).to_owned();
        ConnectionLabels {
            reporter: self.direction.reporter(),
            source_workload: name(&self.src_workload),
            source_workload_namespace: namespace(&self.src_workload),
            source_principal: principal(&self.src_identity),
            source_app: app(&self.src_workload),
            destination_workload: name(&self.dst_workload),
            destination_workload_namespace: namespace(&self.dst_workload),
            destination_principal: principal(&self.dst_identity),
            destination_service: self.service.as_ref().map_or(UNKNOWN.to_owned(), |s| s.hostname()),
            destination_app: app(&self.dst_workload),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: if self.hbone_addr.is_some() { "mutual_tls" } else { UNKNOWN },
        }
    }

    fn event(&self, kind: FlowKind, reason: Option<String>, received: u64, sent: u64) -> FlowEvent {
        FlowEvent {
            time_ms: now_ms(),
            kind,
            direction: self.direction.as_str(),
            route: self.route,
            src: self.src,
            dst: self.dst,
            src_workload: self.src_workload.as_ref().map(|w| w.key()),
            dst_workload: self.dst_workload.as_ref().map(|w| w.key()),
            src_identity: self.src_identity.clone(),
            dst_identity: self.dst_identity.clone(),
            policy: self.policy.clone(),
            reason,
            bytes_src_to_dst: received,
            bytes_dst_to_src: sent,
            duration_ms: self.started.elapsed().as_millis() as u64,
        }
    }

    /// The connection could not be set up: count, log and record why. The caller tells its peer.
    pub(super) fn fail(self, telemetry: &Telemetry, reason: FailureReason, error: &dyn std::fmt::Display) {
        telemetry.proxy.failed(self.direction, reason, Some(&self.labels()));
        let kind = if reason == FailureReason::Denied { FlowKind::Denied } else { FlowKind::Failed };
        self.log(kind, Some(reason), Some(&error.to_string()), 0, 0);
        telemetry.flows.push(self.event(kind, Some(error.to_string()), 0, 0));
    }

    /// Like [`Flow::fail`], resetting `downstream` first.
    pub(super) fn reset(
        self,
        downstream: &impl Abort,
        telemetry: &Telemetry,
        reason: FailureReason,
        error: &dyn std::fmt::Display,
    ) {
        downstream.abort();
        self.fail(telemetry, reason, error);
    }

    /// Denied by policy: recorded with the deciding policy.
    pub(super) fn deny(mut self, telemetry: &Telemetry, decision: &Decision) {
        self.policy = decision.reason.policy.clone();
        self.fail(telemetry, FailureReason::Denied, decision);
    }

    /// Relays between an app's socket and an HBONE stream (`tunnel` says which end of the flow
    /// the stream is) until both directions are closed, a policy change revokes it, it idles past
    /// the idle timeout, or a side fails; failures reach both ends as resets.
    pub(super) async fn relay_hbone(
        self,
        mut app: TcpStream,
        stream: H2Stream,
        tunnel: TunnelEnd,
        proxy: &Proxy,
    ) {
        let registration = self.opened(proxy);
        let bytes = &registration.bytes;
        let (to_stream, from_stream) = match tunnel {
            TunnelEnd::Destination => (&bytes.src_to_dst, &bytes.dst_to_src),
            TunnelEnd::Source => (&bytes.dst_to_src, &bytes.src_to_dst),
        };
        let relay = hbone::relay(&mut app, stream, to_stream, from_stream, &proxy.inner.undelivered);
        let outcome = watch(proxy, &registration, relay).await;
        if outcome.is_err() {
            // The stream was dropped unfinished, which resets it.
            app.abort();
        }
        self.closed(proxy, &registration, outcome);
    }

    /// Relays between two kernel TCP sockets: small messages copied, bulk with `splice(2)`.
    pub(super) async fn relay_tcp(self, downstream: TcpStream, upstream: TcpStream, proxy: &Proxy) {
        let registration = self.opened(proxy);
        let bytes = &registration.bytes;
        let splice = splice::bidirectional(&downstream, &upstream, &bytes.src_to_dst, &bytes.dst_to_src);
        let outcome = watch(proxy, &registration, splice).await;
        if outcome.is_err() {
            downstream.abort();
            upstream.abort();
        }
        self.closed(proxy, &registration, outcome);
    }

    /// Counts and logs the opening, and registers the connection for policy re-checks.
    fn opened(&self, proxy: &Proxy) -> Registration {
        let telemetry = &proxy.inner.telemetry;
        let counters = telemetry.proxy.counters(self.labels());
        telemetry.proxy.opened(self.direction, self.route, &counters);
        telemetry.flows.push(self.event(FlowKind::Opened, None, 0, 0));
        proxy.inner.tracker.register(self, counters, &proxy.inner.state)
    }

    /// Counts and logs how the relay ended, with every byte it moved (failed ones too).
    fn closed(
        self,
        proxy: &Proxy,
        registration: &Registration,
        outcome: Result<(), (FailureReason, String)>,
    ) {
        let telemetry = &proxy.inner.telemetry;
        let bytes = &registration.bytes;
        telemetry.proxy.closed(self.direction, self.route, &bytes.counters);
        // What no scrape has counted yet.
        bytes.count();
        let (received, sent) = bytes.totals();
        let (kind, reason, error) = match outcome {
            Ok(()) => (FlowKind::Closed, None, None),
            Err((reason, error)) => {
                telemetry.proxy.failed(self.direction, reason, None);
                let kind = if reason == FailureReason::Denied { FlowKind::Denied } else { FlowKind::Closed };
                (kind, Some(reason), Some(error))
            }
        };
        self.log(kind, reason, error.as_deref(), received, sent);
        telemetry.flows.push(self.event(kind, error, received, sent));
    }

    fn log(
        &self,
        kind: FlowKind,
        reason: Option<FailureReason>,
        error: Option<&str>,
        received: u64,
        sent: u64,
    ) {
        let message = match kind {
            FlowKind::Opened => "connection opened",
            FlowKind::Closed => "connection closed",
            FlowKind::Denied => "connection denied",
            FlowKind::Failed => "connection failed",
        };
        tracing::info!(
            target: "access",
            direction = self.direction.as_str(),
            route = self.route,
            src = %self.src,
            src_workload = self.src_workload.as_ref().map(|w| w.name.as_str()),
            src_namespace = self.src_workload.as_ref().map(|w| w.namespace.as_str()),
            src_identity = self.src_identity.as_ref().map(tracing::field::display::<&SpiffeId>),
            dst = %self.dst,
            dst_hbone = self.hbone_addr.map(tracing::field::display::<SocketAddr>),
            dst_workload = self.dst_workload.as_ref().map(|w| w.name.as_str()),
            dst_namespace = self.dst_workload.as_ref().map(|w| w.namespace.as_str()),
            dst_identity = self.dst_identity.as_ref().map(tracing::field::display::<&SpiffeId>),
            bytes_src_to_dst = received,
            bytes_dst_to_src = sent,
            duration_ms = self.started.elapsed().as_millis() as u64,
            policy = self.policy.as_deref(),
            reason = reason.map(FailureReason::as_str),
            error,
            "{message}"
        );
    }
}

/// Runs a relay until it ends, a policy change revokes the connection, or it idles too long.
async fn watch(
    proxy: &Proxy,
    registration: &Registration,
    relay: impl Future<Output = std::io::Result<()>>,
) -> Result<(), (FailureReason, String)> {
    let idle_timeout = proxy.inner.limits.idle_timeout;
    tokio::select! {
        result = relay => result.map_err(|e| (FailureReason::Relay, e.to_string())),
        decision = registration.revoked() => Err((FailureReason::Denied, format!("closed by a policy change: {decision}"))),
        () = idle(&registration.bytes, idle_timeout) => Err((FailureReason::Idle, format!("idle for {idle_timeout:?}"))),
    }
}
