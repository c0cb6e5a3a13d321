//! Certificates of the workloads on this node: minted on demand, kept in memory, re-minted at
//! half-life. Open connections keep the certificate they were made with; new handshakes pick up
//! the current one.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{RootCertStore, crypto::CryptoProvider, sign::CertifiedKey};

use super::{FileCa, IdentityError, SpiffeId, WorkloadCert};

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

pub struct CertManager {
    ca: FileCa,
    ttl: Duration,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    certs: RwLock<HashMap<SpiffeId, Arc<Issued>>>,
    wanted: RwLock<BTreeSet<SpiffeId>>,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("ca", &self.ca.dir())
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl CertManager {
    pub fn new(ca: FileCa, ttl: Duration) -> Result<CertManager, IdentityError> {
        let mut roots = RootCertStore::empty();
        for root in ca.trust_bundle() {
            roots.add(root.clone())?;
        }
        Ok(CertManager {
            ca,
            ttl,
            provider: Arc::new(super::tls::provider()),
            roots: Arc::new(roots),
            certs: RwLock::default(),
            wanted: RwLock::default(),
        })
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    pub fn provider(&self) -> Arc<CryptoProvider> {
        self.provider.clone()
    }

    pub fn ca(&self) -> &FileCa {
        &self.ca
    }

    /// Sets the identities of the local workloads: missing certificates are minted now, those of
    /// identities no longer wanted are dropped.
    pub fn set_wanted(&self, ids: BTreeSet<SpiffeId>) -> Result<(), IdentityError> {
        self.certs.write().unwrap_or_else(|e| e.into_inner()).retain(|id, _| ids.contains(id));
        *self.wanted.write().unwrap_or_else(|e| e.into_inner()) = ids.clone();
        for id in ids {
            if self.current(&id).is_none() {
                self.mint(&id)?;
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

    fn mint(&self, id: &SpiffeId) -> Result<Arc<Issued>, IdentityError> {
        let cert = self.ca.issue(id, self.ttl)?;
        let key = self.provider.key_provider.load_private_key(cert.key.clone_key())?;
        let certified_key = Arc::new(CertifiedKey::new(cert.chain.clone(), key));
        let issued = Arc::new(Issued { cert, certified_key });
        tracing::info!(identity = %id, serial = %issued.cert.serial, "certificate issued");
        self.certs.write().unwrap_or_else(|e| e.into_inner()).insert(id.clone(), issued.clone());
        Ok(issued)
    }

    /// Re-mints every certificate past its half-life, forever. Failures are retried.
    pub async fn rotate(self: Arc<Self>) {
        loop {
            let now = SystemTime::now();
            let due: Vec<SpiffeId> = self
                .all()
                .iter()
                .filter(|issued| issued.refresh_at() <= now)
                .map(|issued| issued.cert.identity.clone())
                .collect();
            for id in due {
                if !self.wanted.read().unwrap_or_else(|e| e.into_inner()).contains(&id) {
                    continue;
                }
                if let Err(e) = self.mint(&id) {
                    tracing::error!(identity = %id, "certificate rotation failed, retrying: {e}");
                }
            }
            let next = self.all().iter().map(|i| i.refresh_at()).min();
            let wait = next
                .and_then(|t| t.duration_since(SystemTime::now()).ok())
                .unwrap_or(Duration::from_secs(1))
                .clamp(Duration::from_millis(100), Duration::from_secs(60));
            tokio::time::sleep(wait).await;
        }
    }
}
