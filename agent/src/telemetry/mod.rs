//! Telemetry: Prometheus metrics (`/metrics`), readiness (`/healthz/ready`), the access log
//! (`tracing` target `access`, in [`crate::proxy`]) and the flow-event ring.

mod flows;
mod log_format;
mod logging;
mod metrics;

use std::{
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, text::encode},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, gauge::Gauge, info::Info},
    registry::Registry,
};
use tokio::net::TcpListener;

pub use flows::{FlowEvent, FlowKind, FlowLog, now_ms};
pub use logging::{LogControl, LogFormat, flush_logs, init_logging};
pub use metrics::{
    ConnectionCounters, ConnectionLabels, Direction, FailureReason, LiveBytes, ProxyMetrics, Side,
    VerdictKind,
};

use crate::{datapath::Counters, identity::CertManager};

/// Reads the eBPF per-CPU counters, the certificates' expiry and the roots trusted at scrape time.
struct ScrapeCollector {
    datapath: Counters,
    certs: Arc<CertManager>,
}

impl std::fmt::Debug for ScrapeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScrapeCollector")
    }
}

impl Collector for ScrapeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "ferry_datapath_events",
            "Socket events seen by the eBPF capture programs, by event",
            None,
            MetricType::Counter,
        )?;
        for (counter, value) in self.datapath.read() {
            ConstCounter::new(value).encode(family.encode_family(&[("event", counter.name())])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "ferry_certificate_expiry_seconds",
            "Seconds until each local workload certificate expires (negative once expired)",
            None,
            MetricType::Gauge,
        )?;
        let now = SystemTime::now();
        for issued in self.certs.all() {
            let left = match issued.cert.not_after.duration_since(now) {
                Ok(d) => d.as_secs() as i64,
                Err(e) => -(e.duration().as_secs() as i64),
            };
            let identity = issued.cert.identity.to_string();
            ConstGauge::new(left).encode(family.encode_family(&[("identity", identity.as_str())])?)?;
        }
        let results = [
            (
                "ferry_certificate_requests",
                "Workload certificates obtained (issued) or not (failed: refused, malformed, timed out)",
                self.certs.request_counts(),
            ),
            (
                "ferry_ca_reloads",
                "Changes of the CA directory read by the running agent: applied, or rejected (logged with the reason; the roots in force stay)",
                self.certs.reload_counts(),
            ),
        ];
        for (name, help, counts) in results {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (result, count) in counts {
                ConstCounter::new(count).encode(family.encode_family(&[("result", result)])?)?;
            }
        }
        let gauges = [
            (
                "ferry_trusted_roots",
                "Root certificates peers may chain to: the CA's own and those of its trust bundle",
                self.certs.trusted_roots(),
            ),
            (
                "ferry_certificates_pending",
                "Local workload identities without a certificate yet (requested, or refused and retried): their HBONE connections wait for it",
                self.certs.pending(),
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value as i64).encode(gauge)?;
        }
        Ok(())
    }
}

/// Everything the metrics and readiness endpoints serve.
pub struct Telemetry {
    registry: Registry,
    pub proxy: Arc<ProxyMetrics>,
    pub flows: Arc<FlowLog>,
    pub meshed_workloads: Gauge<i64, AtomicI64>,
    pub workloads_uncaptured: Gauge<i64, AtomicI64>,
    pub policies_refused: Gauge<i64, AtomicI64>,
    /// Set once the datapath and the config are in place; cleared while stopping.
    serving: AtomicBool,
    certs: Arc<CertManager>,
    live_bytes: Mutex<Vec<Weak<dyn LiveBytes>>>,
}

impl Telemetry {
    pub fn new(datapath: Counters, certs: Arc<CertManager>, log: &LogControl) -> Arc<Telemetry> {
        let mut registry = Registry::default();
        let proxy = Arc::new(ProxyMetrics::default());
        proxy.register(&mut registry);
        let meshed_workloads = Gauge::default();
        registry.register(
            "ferry_meshed_workloads",
            "Workloads captured on this node",
            meshed_workloads.clone(),
        );
        let workloads_uncaptured = Gauge::default();
        registry.register(
            "ferry_workloads_uncaptured",
            "Local meshed workloads whose capture failed (logged with the reason, tried again with backoff): their traffic bypasses the mesh meanwhile",
            workloads_uncaptured.clone(),
        );
        let policies_refused = Gauge::default();
        registry.register(
            "ferry_policies_refused",
            "Policy objects from the Kubernetes API whose current version the agent refused as invalid (logged with the reason; the object's last valid version, if any, stays in force)",
            policies_refused.clone(),
        );
        registry.register(
            "ferry_log_lines_dropped",
            "Log lines dropped because the log output (stderr) was not keeping up",
            log.dropped_lines(),
        );
        registry.register(
            "ferry_build",
            "Agent build information",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(ScrapeCollector { datapath, certs: certs.clone() }));
        Arc::new(Telemetry {
            registry,
            proxy,
            flows: Arc::new(FlowLog::default()),
            meshed_workloads,
            workloads_uncaptured,
            policies_refused,
            serving: AtomicBool::new(false),
            certs,
            live_bytes: Mutex::default(),
        })
    }

    /// Has `source` add its connections' bytes to the counters before each scrape.
    pub fn count_live_bytes(&self, source: Weak<dyn LiveBytes>) {
        self.live_bytes.lock().unwrap_or_else(|e| e.into_inner()).push(source);
    }

    /// Whether the agent has started and is not stopping: ready, once the certificates are too.
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Release);
    }

    /// Why `/healthz/ready` answers 503, if it does: ready means the datapath and the config are
    /// in place, every local meshed workload is captured and has a certificate in force.
    pub fn not_ready(&self) -> Option<String> {
        if !self.serving.load(Ordering::Acquire) {
            return Some("starting or stopping".into());
        }
        let count =
            |n: usize, what: &str| (n > 0).then(|| format!("{n} local workload certificate(s) {what}"));
        let uncaptured = self.workloads_uncaptured.get() as usize;
        let reasons: Vec<String> = [
            (uncaptured > 0).then(|| format!("{uncaptured} local workload(s) not captured")),
            count(self.certs.pending(), "not issued yet"),
            count(self.certs.expired(), "expired, renewal failing"),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!reasons.is_empty()).then(|| reasons.join(", "))
    }

    /// The OpenMetrics exposition.
    pub fn render(&self) -> String {
        let sources: Vec<_> = {
            let mut live = self.live_bytes.lock().unwrap_or_else(|e| e.into_inner());
            live.retain(|source| source.strong_count() > 0);
            live.iter().filter_map(Weak::upgrade).collect()
        };
        for source in sources {
            source.count_bytes();
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// What an accept loop does when accept fails (out of descriptors or memory): backs off 50 ms
/// rather than spin, the connection waiting in the backlog meanwhile, and says so at most once a
/// second with how many failed, not at every retry.
#[derive(Default)]
pub struct AcceptBackoff {
    failed: u64,
    last_warning: Option<Instant>,
}

impl AcceptBackoff {
    pub async fn failed(&mut self, listener: &(dyn std::fmt::Display + Sync), e: &std::io::Error) {
        self.failed += 1;
        if self.last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            tracing::warn!(%listener, failed_accepts = self.failed, "accept failed, retrying: {e}");
            (self.failed, self.last_warning) = (0, Some(Instant::now()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a `/metrics` and `/healthz/ready` endpoint serves: the agent's telemetry, or the signer's.
pub trait Health: Send + Sync + 'static {
    /// The OpenMetrics exposition.
    fn metrics(&self) -> String;
    /// Why `/healthz/ready` answers 503, if it does.
    fn not_ready(&self) -> Option<String>;
}

impl Health for Telemetry {
    fn metrics(&self) -> String {
        self.render()
    }

    fn not_ready(&self) -> Option<String> {
        Telemetry::not_ready(self)
    }
}

fn respond(health: &dyn Health, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/metrics" => (StatusCode::OK, health.metrics()),
        "/healthz/ready" => match health.not_ready() {
            None => (StatusCode::OK, "ready\n".into()),
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
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

/// How long the agent's HTTP endpoints (metrics, readiness, admin) wait for a request's head,
/// idle time between requests on a kept-alive connection included. 15020 and 15021 listen on
/// every address of the node: without a bound, connections that send nothing, or half a request,
/// would each hold a descriptor and a task for ever. Scrapers and probes reconnect.
const REQUEST_HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The agent's HTTP/1.1 server settings. hyper applies its header read timeout only with a timer.
pub fn http1_server() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(REQUEST_HEAD_TIMEOUT);
    builder
}

/// Serves `/metrics` and `/healthz/ready` over HTTP/1.1 until the task is dropped.
pub async fn serve(health: Arc<dyn Health>, listener: Arc<TcpListener>) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                backoff.failed(&"metrics and readiness", &e).await;
                continue;
            }
        };
        let health = health.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = respond(health.as_ref(), req.uri().path());
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let _ = http1_server().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
