//! What `ferry signer` counts, served with its readiness on `--metrics-addr` (as istiod serves
//! its CA's counts on 15014).

use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::telemetry::Health;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

pub(super) struct SignerMetrics {
    registry: Registry,
    signed: Counter,
    refused: Family<ReasonLabels, Counter>,
    errors: Counter,
    abandoned: Counter,
    /// Set once the root is published and requests are watched.
    serving: AtomicBool,
}

impl Default for SignerMetrics {
    fn default() -> SignerMetrics {
        let mut registry = Registry::default();
        let (signed, refused, errors, abandoned) =
            (Counter::default(), Family::default(), Counter::default(), Counter::default());
        registry.register("ferry_signer_certificates_signed", "Workload certificates signed", signed.clone());
        registry.register(
            "ferry_signer_requests_refused",
            "Certificate requests refused, by the reason set on the request (e.g. NoSuchWorkloadOnNode: an agent asked for an identity no pod on its node has)",
            refused.clone(),
        );
        registry.register(
            "ferry_signer_request_errors",
            "Certificate requests the signer could not answer (API errors; the agent asks again)",
            errors.clone(),
        );
        registry.register(
            "ferry_signer_requests_abandoned",
            "Certificate requests deleted unanswered because their agent had stopped waiting and asked again (left over from a time the signer was down)",
            abandoned.clone(),
        );
        SignerMetrics { registry, signed, refused, errors, abandoned, serving: AtomicBool::new(false) }
    }
}

impl SignerMetrics {
    pub(super) fn signed(&self) {
        self.signed.inc();
    }

    pub(super) fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub(super) fn error(&self) {
        self.errors.inc();
    }

    pub(super) fn abandoned(&self) {
        self.abandoned.inc();
    }

    pub(super) fn set_serving(&self) {
        self.serving.store(true, Ordering::Release);
    }
}

impl Health for SignerMetrics {
    fn metrics(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }

    fn not_ready(&self) -> Option<String> {
        (!self.serving.load(Ordering::Acquire))
            .then(|| "starting: publishing the root, watching requests".into())
    }
}
