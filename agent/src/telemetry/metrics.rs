//! Metric families. Connection metrics are named and labelled like ztunnel's (`istio_tcp_*`), so
//! Istio, Kiali and Grafana dashboards work; Ferry's own are `ferry_*`. Label values are bounded
//! (workloads, identities, policies, reasons), never ports or addresses.

use std::{collections::HashMap, sync::RwLock};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    /// Istio's `reporter`: the source side reports outbound, the destination side inbound.
    pub fn reporter(self) -> &'static str {
        match self {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        }
    }
}

/// Why a proxied connection could not be set up or was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// The datapath had no original destination for an accepted outbound connection.
    OrigDstMiss,
    /// The upstream (tunnel, app or passthrough destination) refused or was unreachable.
    Connect,
    /// A connection aimed at one of the proxy's own ports.
    Recursion,
    /// A relay ended with an error (reset, timeout) on one side.
    Relay,
    /// The mTLS handshake failed: unknown CA, no client certificate, other trust domain, timeout.
    TlsHandshake,
    /// The HBONE server was not the identity the client meant to reach, or a local workload's
    /// certificate did not arrive in time.
    Identity,
    /// HBONE request refused with 400 (not CONNECT, bad authority).
    BadRequest,
    /// HBONE request refused with 503 (recursion, app refused, unknown target).
    Unavailable,
    /// The peer refused our HBONE CONNECT (non-200).
    Rejected,
    /// Denied by authorization policy (at connect, or when a policy change closed it).
    Denied,
    /// Refused at accept: the pod's or the node's connection limit was reached.
    Limit,
    /// Closed after the idle timeout.
    Idle,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::OrigDstMiss => "orig_dst_miss",
            FailureReason::Connect => "connect",
            FailureReason::Recursion => "recursion",
            FailureReason::Relay => "relay",
            FailureReason::TlsHandshake => "tls_handshake",
            FailureReason::Identity => "identity",
            FailureReason::BadRequest => "bad_request",
            FailureReason::Unavailable => "unavailable",
            FailureReason::Rejected => "rejected",
            FailureReason::Denied => "denied",
            FailureReason::Limit => "limit",
            FailureReason::Idle => "idle",
        }
    }

    /// Istio's `response_flags` for this failure.
    pub fn response_flags(self) -> &'static str {
        match self {
            FailureReason::Denied => "DENY",
            FailureReason::TlsHandshake => "TLS_FAILURE",
            FailureReason::Identity => "IDENTITY_ERROR",
            _ => "CONNECT",
        }
    }
}

/// Which end of an HBONE (mTLS + HTTP/2) connection this agent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Client,
    Server,
}

/// ztunnel's connection labels; absent values are "unknown".
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub destination_app: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    direction: &'static str,
    route: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailureLabels {
    direction: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SideLabels {
    side: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VerdictLabels {
    verdict: &'static str,
    policy: String,
}

/// Counters the proxy updates per connection (never per byte or packet).
#[derive(Debug, Default)]
pub struct ProxyMetrics {
    tcp_opened: Family<ConnectionLabels, Counter>,
    tcp_closed: Family<ConnectionLabels, Counter>,
    tcp_failed: Family<ConnectionLabels, Counter>,
    tcp_sent_bytes: Family<ConnectionLabels, Counter>,
    tcp_received_bytes: Family<ConnectionLabels, Counter>,
    opened: Family<RouteLabels, Counter>,
    closed: Family<RouteLabels, Counter>,
    failed: Family<FailureLabels, Counter>,
    hbone_connections: Family<SideLabels, Counter>,
    verdicts: Family<VerdictLabels, Counter>,
    /// Bytes received over HBONE that apps have not read yet, kept by the proxy's budget.
    pub(crate) undelivered: Gauge,
    /// The window each HBONE stream is granted now, which that budget decides.
    pub(crate) stream_window: Gauge,
    /// The `istio_tcp_*` counters of each label set seen. A family hashes its whole label set
    /// with SipHash on every update; a connection finds its counters here once, with one ahash.
    counters: RwLock<HashMap<ConnectionLabels, ConnectionCounters, ahash::RandomState>>,
}

/// The `istio_tcp_*` counters of one label set, found once when a connection opens; they share
/// their values with the families' entries.
#[derive(Debug, Clone)]
pub struct ConnectionCounters {
    opened: Counter,
    closed: Counter,
    received_bytes: Counter,
    sent_bytes: Counter,
}

impl ConnectionCounters {
    /// Bytes a connection relayed since it last reported. `received`: source to destination;
    /// `sent`: destination to source.
    pub fn relayed(&self, received: u64, sent: u64) {
        if received > 0 {
            self.received_bytes.inc_by(received);
        }
        if sent > 0 {
            self.sent_bytes.inc_by(sent);
        }
    }
}

/// Connections still relaying. At each scrape they add the bytes they moved since the last one,
/// so the byte counters follow long-lived connections instead of jumping when they close.
pub trait LiveBytes: Send + Sync {
    fn count_bytes(&self);
}

/// A policy verdict as counted: enforced, or what a dry-run policy would have done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerdictKind {
    Allow,
    Deny,
    DryRunAllow,
    DryRunDeny,
}

impl ProxyMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        let families: [(&str, &str, &Family<ConnectionLabels, Counter>); 5] = [
            ("istio_tcp_connections_opened", "TCP connections opened", &self.tcp_opened),
            ("istio_tcp_connections_closed", "TCP connections closed", &self.tcp_closed),
            ("istio_tcp_connections_failed", "TCP connections that failed or were denied", &self.tcp_failed),
            (
                "istio_tcp_sent_bytes",
                "Bytes sent in the response direction (destination to source)",
                &self.tcp_sent_bytes,
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes received in the request direction (source to destination)",
                &self.tcp_received_bytes,
            ),
        ];
        for (name, help, family) in families {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "ferry_proxy_connections_opened",
            "Proxied connections opened, by route",
            self.opened.clone(),
        );
        registry.register(
            "ferry_proxy_connections_closed",
            "Proxied connections closed, by route",
            self.closed.clone(),
        );
        registry.register(
            "ferry_proxy_connection_failures",
            "Connections that could not be proxied, were denied or ended in error, by reason",
            self.failed.clone(),
        );
        registry.register(
            "ferry_hbone_connections_opened",
            "HBONE (mTLS + HTTP/2) connections established, by side; streams share them",
            self.hbone_connections.clone(),
        );
        registry.register(
            "ferry_hbone_undelivered_bytes",
            "Bytes received over HBONE that the apps they are for have not read yet",
            self.undelivered.clone(),
        );
        registry.register(
            "ferry_hbone_stream_window_bytes",
            "Flow-control window granted to each HBONE stream: smaller while undelivered bytes exceed limits.undeliveredMiB",
            self.stream_window.clone(),
        );
        registry.register(
            "ferry_policy_verdicts",
            "Authorization decisions by verdict (allow, deny, dry_run_allow, dry_run_deny) and deciding policy",
            self.verdicts.clone(),
        );
    }

    /// The counters of a connection with these labels.
    pub fn counters(&self, labels: ConnectionLabels) -> ConnectionCounters {
        let known = self.counters.read().unwrap_or_else(|e| e.into_inner()).get(&labels).cloned();
        known.unwrap_or_else(|| {
            let counters = ConnectionCounters {
                opened: self.tcp_opened.get_or_create_owned(&labels),
                closed: self.tcp_closed.get_or_create_owned(&labels),
                received_bytes: self.tcp_received_bytes.get_or_create_owned(&labels),
                sent_bytes: self.tcp_sent_bytes.get_or_create_owned(&labels),
            };
            let mut all = self.counters.write().unwrap_or_else(|e| e.into_inner());
            all.entry(labels).or_insert(counters).clone()
        })
    }

    pub fn opened(&self, direction: Direction, route: &'static str, counters: &ConnectionCounters) {
        self.opened.get_or_create(&RouteLabels { direction: direction.as_str(), route }).inc();
        counters.opened.inc();
    }

    pub fn closed(&self, direction: Direction, route: &'static str, counters: &ConnectionCounters) {
        self.closed.get_or_create(&RouteLabels { direction: direction.as_str(), route }).inc();
        counters.closed.inc();
    }

    pub fn failed(&self, direction: Direction, reason: FailureReason, labels: Option<&ConnectionLabels>) {
        self.failed
            .get_or_create(&FailureLabels { direction: direction.as_str(), reason: reason.as_str() })
            .inc();
        if let Some(labels) = labels {
            let mut labels = labels.clone();
            labels.response_flags = reason.response_flags();
            self.tcp_failed.get_or_create(&labels).inc();
        }
    }

    /// An HBONE connection was established (TLS and HTTP/2 handshakes done).
    pub fn hbone_connection(&self, side: Side) {
        let side = match side {
            Side::Client => "client",
            Side::Server => "server",
        };
        self.hbone_connections.get_or_create(&SideLabels { side }).inc();
    }

    pub fn verdict(&self, kind: VerdictKind, policy: Option<&str>) {
        let verdict = match kind {
            VerdictKind::Allow => "allow",
            VerdictKind::Deny => "deny",
            VerdictKind::DryRunAllow => "dry_run_allow",
            VerdictKind::DryRunDeny => "dry_run_deny",
        };
        self.verdicts
            .get_or_create(&VerdictLabels { verdict, policy: policy.unwrap_or("none").to_owned() })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(destination: &str) -> ConnectionLabels {
        let unknown = || "unknown".to_owned();
        ConnectionLabels {
            reporter: "source",
            source_workload: "a".into(),
            source_workload_namespace: "default".into(),
            source_principal: unknown(),
            source_app: unknown(),
            destination_workload: destination.into(),
            destination_workload_namespace: "default".into(),
            destination_principal: unknown(),
            destination_service: unknown(),
            destination_app: unknown(),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: "mutual_tls",
        }
    }

    fn scrape(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    /// The value of the one series of `family` whose labels include `label`.
    fn value(text: &str, family: &str, label: &str) -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(&format!("{family}{{")) && l.contains(label))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn connections_with_the_same_labels_count_into_one_series() {
        let metrics = ProxyMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let (first, second, other) =
            (metrics.counters(labels("b")), metrics.counters(labels("b")), metrics.counters(labels("c")));
        for counters in [&first, &second, &other] {
            metrics.opened(Direction::Outbound, "hbone", counters);
        }
        first.relayed(3, 0);
        second.relayed(4, 10);
        metrics.closed(Direction::Outbound, "hbone", &first);

        let text = scrape(&registry);
        let b = r#"destination_workload="b""#;
        let c = r#"destination_workload="c""#;
        assert_eq!(value(&text, "istio_tcp_connections_opened_total", b), Some(2), "{text}");
        assert_eq!(value(&text, "istio_tcp_connections_opened_total", c), Some(1), "{text}");
        assert_eq!(value(&text, "istio_tcp_connections_closed_total", b), Some(1), "{text}");
        assert_eq!(value(&text, "istio_tcp_received_bytes_total", b), Some(7), "{text}");
        assert_eq!(value(&text, "istio_tcp_sent_bytes_total", b), Some(10), "{text}");
        // A connection's series exist from its opening, at zero until it counts.
        assert_eq!(value(&text, "istio_tcp_sent_bytes_total", c), Some(0), "{text}");
    }
}
