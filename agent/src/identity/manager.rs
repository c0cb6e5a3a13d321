//! Certificates of the workloads on this node: obtained on demand, kept in memory, renewed at
//! half-life. Open connections keep the certificate they were made with; new handshakes pick up
//! the current one.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use rustls::{RootCertStore, crypto::CryptoProvider, pki_types::CertificateDer, sign::CertifiedKey};
use tokio::sync::Notify;

use super::{FileCa, IdentityError, SpiffeId, WorkloadCert, csr::CsrClient};

/// Who signs the local workloads' certificates.
pub enum Signer {
    /// The embedded default: the agent holds the root key and signs itself, synchronously.
    File(FileCa),
    /// Kubernetes mode: CertificateSigningRequests that `ferry signer` approves and signs.
    Kubernetes(CsrClient),
}

/// One identity's current certificate, ready for rustls.
#[derive(Debug)]
pub struct Issued {
    pub cert: WorkloadCert,
    pub certified_key: Arc<CertifiedKey>,
}

impl Issued {
    /// Half-life: when rotation replaces it.
    fn refresh_at(&self) -> SystemTime {
        let lifetime = self.cert.not_after.duration_since(self.cert.not_before).unwrap_or_default();
        self.cert.not_before + lifetime / 2
    }
}

/// Outcomes of certificate requests, for `ferry_certificate_requests_total{result}`.
#[derive(Debug, Default)]
struct RequestCounts {
    issued: AtomicU64,
    failed: AtomicU64,
}

pub struct CertManager {
    signer: Signer,
    ttl: Duration,
    provider: Arc<CryptoProvider>,
    /// DER of the roots trusted, the signer's own first.
    trusted: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
    certs: RwLock<HashMap<SpiffeId, Arc<Issued>>>,
    wanted: RwLock<BTreeSet<SpiffeId>>,
    /// Identities whose first certificate is being requested.
    pending: Mutex<HashSet<SpiffeId>>,
    /// Woken when a first certificate arrives, so workloads waiting for it get captured.
    first_issued: Notify,
    requests: RequestCounts,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager").field("signer", &self.signer_name()).field("ttl", &self.ttl).finish()
    }
}

impl CertManager {
    /// `trusted`: the roots peers' certificates must chain to (the file CA's bundle, or in
    /// Kubernetes mode the signer's published root).
    pub fn new(
        signer: Signer,
        trusted: Vec<CertificateDer<'static>>,
        ttl: Duration,
    ) -> Result<CertManager, IdentityError> {
        let mut roots = RootCertStore::empty();
        for root in &trusted {
            roots.add(root.clone())?;
        }
        Ok(CertManager {
            signer,
            ttl,
            provider: Arc::new(super::tls::provider()),
            trusted,
            roots: Arc::new(roots),
            certs: RwLock::default(),
            wanted: RwLock::default(),
            pending: Mutex::default(),
            first_issued: Notify::new(),
            requests: RequestCounts::default(),
        })
    }

    /// A manager signing with the file CA and trusting its bundle.
    pub fn with_file_ca(ca: FileCa, ttl: Duration) -> Result<CertManager, IdentityError> {
        let trusted = ca.trust_bundle().to_vec();
        CertManager::new(Signer::File(ca), trusted, ttl)
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// The first root trusted: the one this node's certificates chain to.
    pub fn root(&self) -> Option<&CertificateDer<'static>> {
        self.trusted.first()
    }

    pub fn provider(&self) -> Arc<CryptoProvider> {
        self.provider.clone()
    }

    /// Where certificates come from, for logs and the admin API.
    pub fn signer_name(&self) -> String {
        match &self.signer {
            Signer::File(ca) => format!("file CA {}", ca.origin()),
            Signer::Kubernetes(_) => format!("CertificateSigningRequests to {}", super::csr::SIGNER_NAME),
        }
    }

    /// (result, count) of the certificate requests so far.
    pub fn request_counts(&self) -> [(&'static str, u64); 2] {
        [
            ("issued", self.requests.issued.load(Ordering::Relaxed)),
            ("failed", self.requests.failed.load(Ordering::Relaxed)),
        ]
    }

    /// Resolves once a certificate some workload was waiting for has arrived.
    pub async fn first_issued(&self) {
        self.first_issued.notified().await
    }

    /// Sets the identities of the local workloads: those of identities no longer wanted are
    /// dropped; missing ones are minted now with the file CA, or requested in the background
    /// (see [`CertManager::first_issued`]).
    pub fn set_wanted(self: &Arc<Self>, ids: BTreeSet<SpiffeId>) -> Result<(), IdentityError> {
        self.certs.write().unwrap_or_else(|e| e.into_inner()).retain(|id, _| ids.contains(id));
        *self.wanted.write().unwrap_or_else(|e| e.into_inner()) = ids.clone();
        for id in ids.into_iter().filter(|id| self.current(id).is_none()) {
            match &self.signer {
                Signer::File(ca) => {
                    let cert = ca.issue(&id, self.ttl);
                    self.install(self.count(cert)?)?;
                }
                Signer::Kubernetes(_) => {
                    if self.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone()) {
                        tokio::spawn(self.clone().request_first(id));
                    }
                }
            }
        }
        Ok(())
    }

    /// The current certificate of a local identity.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<Issued>> {
        self.certs.read().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// Every current certificate (for the admin API and metrics).
    pub fn all(&self) -> Vec<Arc<Issued>> {
        self.certs.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    fn is_wanted(&self, id: &SpiffeId) -> bool {
        self.wanted.read().unwrap_or_else(|e| e.into_inner()).contains(id)
    }

    async fn issue(&self, id: &SpiffeId) -> Result<WorkloadCert, IdentityError> {
        let cert = match &self.signer {
            Signer::File(ca) => ca.issue(id, self.ttl),
            Signer::Kubernetes(csr) => csr.request(id).await,
        };
        self.count(cert)
    }

    fn count(&self, cert: Result<WorkloadCert, IdentityError>) -> Result<WorkloadCert, IdentityError> {
        let counter = if cert.is_ok() { &self.requests.issued } else { &self.requests.failed };
        counter.fetch_add(1, Ordering::Relaxed);
        cert
    }

    fn install(&self, cert: WorkloadCert) -> Result<Arc<Issued>, IdentityError> {
        let key = self.provider.key_provider.load_private_key(cert.key.clone_key())?;
        let certified_key = Arc::new(CertifiedKey::new(cert.chain.clone(), key));
        let issued = Arc::new(Issued { cert, certified_key });
        tracing::info!(identity = %issued.cert.identity, serial = %issued.cert.serial, "certificate issued");
        if self.is_wanted(&issued.cert.identity) {
            self.certs
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(issued.cert.identity.clone(), issued.clone());
        }
        Ok(issued)
    }

    /// Requests the first certificate of `id` until one arrives or `id` is no longer wanted,
    /// backing off between refusals.
    async fn request_first(self: Arc<Self>, id: SpiffeId) {
        let mut backoff = Duration::from_secs(1);
        while self.is_wanted(&id) {
            match self.issue(&id).await.and_then(|cert| self.install(cert)) {
                Ok(_) => {
                    self.first_issued.notify_one();
                    break;
                }
                Err(e) => {
                    tracing::error!(identity = %id, "certificate request failed, retrying in {backoff:?}: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }

    /// Renews every certificate past its half-life, forever. Failures are retried.
    pub async fn rotate(self: Arc<Self>) {
        loop {
            let now = SystemTime::now();
            let due: Vec<SpiffeId> = self
                .all()
                .iter()
                .filter(|issued| issued.refresh_at() <= now)
                .map(|issued| issued.cert.identity.clone())
                .filter(|id| self.is_wanted(id))
                .collect();
            let mut failed = false;
            for id in due {
                if let Err(e) = self.issue(&id).await.and_then(|cert| self.install(cert)) {
                    tracing::error!(identity = %id, "certificate rotation failed, retrying: {e}");
                    failed = true;
                }
            }
            let next = self.all().iter().map(|i| i.refresh_at()).min();
            // After a failure, not sooner than 10 s: each attempt may be a request to the API.
            let floor = if failed { Duration::from_secs(10) } else { Duration::from_millis(100) };
            let wait = next
                .and_then(|t| t.duration_since(SystemTime::now()).ok())
                .unwrap_or(Duration::from_secs(1))
                .clamp(floor, Duration::from_secs(60));
            tokio::time::sleep(wait).await;
        }
    }
}
