//! Logs (tracing), Prometheus metrics and the readiness endpoint.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicI64, Ordering},
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{counter::ConstCounter, counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::datapath::Counters;

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
    /// The HBONE server was not the identity the client meant to reach.
    Identity,
    /// HBONE request refused with 400 (not CONNECT, bad authority).
    BadRequest,
    /// HBONE request refused with 503 (recursion, app refused, unknown target).
    Unavailable,
    /// The peer refused our HBONE CONNECT (non-200).
    Rejected,
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
        }
    }
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

/// Which end of an HBONE (mTLS + HTTP/2) connection this agent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Client,
    Server,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SideLabels {
    side: &'static str,
}

/// Counters the proxy updates per connection (never per byte).
#[derive(Debug, Default)]
pub struct ProxyMetrics {
    opened: Family<RouteLabels, Counter>,
    closed: Family<RouteLabels, Counter>,
    failed: Family<FailureLabels, Counter>,
    hbone_connections: Family<SideLabels, Counter>,
}

impl ProxyMetrics {
    /// An HBONE connection was established (TLS and HTTP/2 handshakes done).
    pub fn hbone_connection(&self, side: Side) {
        let side = match side {
            Side::Client => "client",
            Side::Server => "server",
        };
        self.hbone_connections.get_or_create(&SideLabels { side }).inc();
    }

    pub fn opened(&self, direction: Direction, route: &'static str) {
        self.opened.get_or_create(&RouteLabels { direction: direction.as_str(), route }).inc();
    }
    pub fn closed(&self, direction: Direction, route: &'static str) {
        self.closed.get_or_create(&RouteLabels { direction: direction.as_str(), route }).inc();
    }
    pub fn failed(&self, direction: Direction, reason: FailureReason) {
        self.failed
            .get_or_create(&FailureLabels { direction: direction.as_str(), reason: reason.as_str() })
            .inc();
    }
}

/// Reads the eBPF per-CPU counters at scrape time.
#[derive(Clone)]
struct DatapathCollector(Counters);

impl std::fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatapathCollector")
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.0.read();
        let mut family = encoder.encode_descriptor(
            "ferry_datapath_events",
            "Socket events seen by the eBPF capture programs, by event",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (counter, value) in counts {
            let labels = [("event", counter.name())];
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Everything the metrics and readiness endpoints serve.
pub struct Telemetry {
    registry: Registry,
    pub proxy: Arc<ProxyMetrics>,
    pub meshed_workloads: Gauge<i64, AtomicI64>,
    ready: AtomicBool,
}

impl Telemetry {
    pub fn new(datapath: Counters) -> Arc<Telemetry> {
        let mut registry = Registry::default();
        let proxy = Arc::new(ProxyMetrics::default());
        registry.register(
            "ferry_proxy_connections_opened",
            "Proxied connections opened",
            proxy.opened.clone(),
        );
        registry.register(
            "ferry_proxy_connections_closed",
            "Proxied connections closed",
            proxy.closed.clone(),
        );
        registry.register(
            "ferry_proxy_connection_failures",
            "Connections that could not be proxied or ended in error, by reason",
            proxy.failed.clone(),
        );
        registry.register(
            "ferry_hbone_connections_opened",
            "HBONE (mTLS + HTTP/2) connections established, by side; streams share them",
            proxy.hbone_connections.clone(),
        );
        let meshed_workloads = Gauge::default();
        registry.register(
            "ferry_meshed_workloads",
            "Workloads captured on this node",
            meshed_workloads.clone(),
        );
        registry.register(
            "ferry_build",
            "Agent build information",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(DatapathCollector(datapath)));
        Arc::new(Telemetry { registry, proxy, meshed_workloads, ready: AtomicBool::new(false) })
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }

    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        let (status, body) = match path {
            "/metrics" => (StatusCode::OK, self.render()),
            "/healthz/ready" if self.ready.load(Ordering::Acquire) => (StatusCode::OK, "ready\n".into()),
            "/healthz/ready" => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
            _ => (StatusCode::NOT_FOUND, "not found\n".into()),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if path == "/metrics" {
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
        }
        response
    }

    /// Serves `/metrics` and `/healthz/ready` over HTTP/1.1 until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("telemetry accept: {e}");
                    continue;
                }
            };
            let telemetry = self.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let response = telemetry.respond(req.uri().path());
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    }
}

/// Log format of the agent's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global tracing subscriber (RUST_LOG overrides the default `info`). eBPF log lines
/// arrive through the `log` facade and are bridged in.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
