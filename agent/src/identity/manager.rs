//! Certificates of the workloads on this node: obtained on demand, kept in memory, renewed at about
//! half-life. Open connections keep the certificate they were made with; new handshakes pick up
//! the current one.
//!
//! The CA directory is read again on SIGHUP and every [`CA_DIR_POLL`] (a mounted ConfigMap changes
//! under a running agent): roots added or removed apply to new handshakes, connections verified
//! under the previous roots are retired (see [`CertManager::trust_changes`]), and a new signing
//! root renews every certificate at once. A directory that does not parse changes nothing.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use rustls::{
    RootCertStore, crypto::CryptoProvider, pki_types::CertificateDer, server::danger::ClientCertVerifier,
    sign::CertifiedKey,
};
use tokio::sync::{Notify, watch};

use super::{FileCa, IdentityError, SpiffeId, WorkloadCert, csr::CsrClient, load_roots};

/// How often the CA directory is read again for changes.
const CA_DIR_POLL: Duration = Duration::from_secs(10);

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
    /// The signing root it was asked of ([`Authority::signing_root`]): an older one is renewed.
    signing_root: u64,
    /// When this agent got it. Its validity starts earlier (signers backdate `notBefore` by
    /// minutes against clock skew), which must not bring its renewal forward.
    obtained: SystemTime,
}

impl Issued {
    /// When rotation replaces it: half-way from when it was obtained to its expiry, give or take
    /// 5% (see [`refresh_fraction`]).
    fn refresh_at(&self) -> SystemTime {
        let left = self.cert.not_after.duration_since(self.obtained).unwrap_or_default();
        self.obtained + left.mul_f64(refresh_fraction(&self.cert.serial))
    }
}

/// The fraction of its lifetime after which a certificate is renewed: 0.45 to 0.55, spread by its
/// serial (random, and the same at every look), so that certificates issued together (a node's
/// pods at its start) are not renewed all at once, every half-life, ever after.
fn refresh_fraction(serial: &str) -> f64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    serial.hash(&mut hasher);
    0.45 + 0.1 * (hasher.finish() as f64 / u64::MAX as f64).min(0.999)
}

/// Outcomes, for `ferry_certificate_requests_total{result}` and `ferry_ca_reloads_total{result}`.
#[derive(Debug, Default)]
struct Outcomes {
    succeeded: AtomicU64,
    failed: AtomicU64,
}

impl Outcomes {
    fn count<T, E>(&self, result: &Result<T, E>) {
        self.add(result.is_ok());
    }

    fn add(&self, succeeded: bool) {
        let counter = if succeeded { &self.succeeded } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn read(&self, succeeded: &'static str, failed: &'static str) -> [(&'static str, u64); 2] {
        [(succeeded, self.succeeded.load(Ordering::Relaxed)), (failed, self.failed.load(Ordering::Relaxed))]
    }
}

/// Who signs, and the roots peers must chain to, as the CA directory held them when last read.
/// Replaced whole when it changes.
struct Authority {
    signer: Signer,
    /// DER of the roots trusted, the signer's own first.
    trusted: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
    /// Verifies HBONE clients against `roots`; built once per set of roots, not per handshake.
    client_verifier: Arc<dyn ClientCertVerifier>,
    /// Counts the signing roots (the first trusted) seen since start.
    signing_root: u64,
}

impl Authority {
    fn new(
        signer: Signer,
        trusted: Vec<CertificateDer<'static>>,
        provider: &Arc<CryptoProvider>,
        signing_root: u64,
    ) -> Result<Authority, IdentityError> {
        let mut roots = RootCertStore::empty();
        for root in &trusted {
            roots.add(root.clone())?;
        }
        let roots = Arc::new(roots);
        let client_verifier = super::tls::client_verifier(&roots, provider)?;
        Ok(Authority { signer, trusted, roots, client_verifier, signing_root })
    }

    /// The same signer reading `dir` again: the file CA's root and bundle, or in Kubernetes
    /// mode the roots the signer published.
    fn read_again(&self, dir: &Path) -> Result<(Signer, Vec<CertificateDer<'static>>), IdentityError> {
        Ok(match &self.signer {
            Signer::File(_) => {
                let ca = FileCa::load(dir)?;
                let trusted = ca.trust_bundle().to_vec();
                (Signer::File(ca), trusted)
            }
            Signer::Kubernetes(csr) => (Signer::Kubernetes(csr.clone()), load_roots(dir)?),
        })
    }
}

pub struct CertManager {
    authority: RwLock<Arc<Authority>>,
    ttl: Duration,
    provider: Arc<CryptoProvider>,
    certs: RwLock<HashMap<SpiffeId, Arc<Issued>>>,
    wanted: RwLock<BTreeSet<SpiffeId>>,
    /// Identities whose first certificate is being requested (one request task each).
    requesting: Mutex<HashSet<SpiffeId>>,
    /// Counts the certificates installed, so connections waiting for one wake when it arrives.
    installed: watch::Sender<u64>,
    /// Wakes rotation before half-life: the signing root changed.
    renew: Notify,
    /// Counts the changes of the roots trusted.
    trust_changes: watch::Sender<u64>,
    requests: Outcomes,
    reloads: Outcomes,
    /// Why the CA directory was last refused, until it is read well again: each problem is
    /// logged and counted once, not at every poll.
    refused: Mutex<Option<String>>,
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
        let provider = Arc::new(super::tls::provider());
        let authority = Authority::new(signer, trusted, &provider, 0)?;
        Ok(CertManager {
            authority: RwLock::new(Arc::new(authority)),
            ttl,
            provider,
            certs: RwLock::default(),
            wanted: RwLock::default(),
            requesting: Mutex::default(),
            installed: watch::Sender::new(0),
            renew: Notify::new(),
            trust_changes: watch::Sender::new(0),
            requests: Outcomes::default(),
            reloads: Outcomes::default(),
            refused: Mutex::default(),
        })
    }

    /// A manager signing with the file CA and trusting its bundle.
    pub fn with_file_ca(ca: FileCa, ttl: Duration) -> Result<CertManager, IdentityError> {
        let trusted = ca.trust_bundle().to_vec();
        CertManager::new(Signer::File(ca), trusted, ttl)
    }

    fn authority(&self) -> Arc<Authority> {
        self.authority.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The roots peers' certificates must chain to now.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.authority().roots.clone()
    }

    /// Verifies an HBONE client's certificate chain against the roots trusted now.
    pub fn client_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.authority().client_verifier.clone()
    }

    /// How many roots are trusted now.
    pub fn trusted_roots(&self) -> usize {
        self.authority().trusted.len()
    }

    /// Changes whenever the roots trusted change. A connection whose peer was verified before
    /// takes no new streams: they go to a new connection, verified against the new roots (a
    /// root removed from the bundle stops being trusted on open connections too).
    pub fn trust_changes(&self) -> watch::Receiver<u64> {
        self.trust_changes.subscribe()
    }

    /// How many times the roots trusted have changed (what [`CertManager::trust_changes`] says).
    pub fn trust_generation(&self) -> u64 {
        *self.trust_changes.borrow()
    }

    pub fn provider(&self) -> Arc<CryptoProvider> {
        self.provider.clone()
    }

    /// Where certificates come from, for logs and the admin API.
    pub fn signer_name(&self) -> String {
        match &self.authority().signer {
            Signer::File(ca) => format!("file CA {}", ca.origin()),
            Signer::Kubernetes(_) => format!("CertificateSigningRequests to {}", super::csr::SIGNER_NAME),
        }
    }

    /// (result, count) of the certificate requests so far.
    pub fn request_counts(&self) -> [(&'static str, u64); 2] {
        self.requests.read("issued", "failed")
    }

    /// (result, count) of the changed CA directories read since start: applied, or refused.
    pub fn reload_counts(&self) -> [(&'static str, u64); 2] {
        self.reloads.read("applied", "rejected")
    }

    /// Reads the CA directory every [`CA_DIR_POLL`], forever.
    pub async fn follow_ca_dir(self: Arc<Self>, dir: PathBuf) {
        loop {
            tokio::time::sleep(CA_DIR_POLL).await;
            self.check_ca_dir(&dir);
        }
    }

    /// Reads the CA directory again and applies what changed; a directory that cannot be used
    /// is logged and counted (once per problem) and changes nothing.
    pub fn check_ca_dir(&self, dir: &Path) {
        let result = self.reload(dir);
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(None) => *refused = None,
            Ok(Some(change)) => {
                *refused = None;
                self.reloads.add(true);
                tracing::info!(
                    dir = %dir.display(),
                    roots = change.roots,
                    "CA directory changed: {} roots trusted{}",
                    change.roots,
                    if change.new_signing_root { "; certificates are renewed under the new signing root" } else { "" }
                );
            }
            Err(e) => {
                let problem = e.to_string();
                if refused.as_deref() != Some(problem.as_str()) {
                    self.reloads.add(false);
                    tracing::error!("CA directory not reloaded, the roots in force stay: {problem}");
                    *refused = Some(problem);
                }
            }
        }
    }

    /// Reads `dir` again with the same kind of signer; `Some` when the roots changed.
    fn reload(&self, dir: &Path) -> Result<Option<TrustChange>, IdentityError> {
        let current = self.authority();
        let (signer, trusted) = current.read_again(dir)?;
        if trusted == current.trusted {
            return Ok(None);
        }
        // A directory being rewritten (the kubelet swapping a ConfigMap's files) may have been
        // read half old, half new: only what a second read confirms applies, else the next poll
        // tries again.
        if current.read_again(dir)?.1 != trusted {
            return Ok(None);
        }
        let new_signing_root = trusted.first() != current.trusted.first();
        let signing_root = current.signing_root + u64::from(new_signing_root);
        let authority = Authority::new(signer, trusted, &self.provider, signing_root)?;
        let change = TrustChange { roots: authority.trusted.len(), new_signing_root };
        *self.authority.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(authority);
        self.trust_changes.send_modify(|changes| *changes += 1);
        if new_signing_root {
            self.renew.notify_one();
        }
        Ok(Some(change))
    }

    /// Sets the identities of the local workloads: those of identities no longer wanted are
    /// dropped; missing ones are minted now with the file CA, or requested in the background
    /// (see [`CertManager::wait_for`]).
    pub fn set_wanted(self: &Arc<Self>, ids: BTreeSet<SpiffeId>) -> Result<(), IdentityError> {
        self.certs.write().unwrap_or_else(|e| e.into_inner()).retain(|id, _| ids.contains(id));
        *self.wanted.write().unwrap_or_else(|e| e.into_inner()) = ids.clone();
        let authority = self.authority();
        for id in ids.into_iter().filter(|id| self.current(id).is_none()) {
            match &authority.signer {
                Signer::File(ca) => {
                    let cert = ca.issue(&id, self.ttl);
                    self.requests.count(&cert);
                    self.install(cert?, authority.signing_root)?;
                }
                Signer::Kubernetes(_) => {
                    if self.requesting.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone()) {
                        tokio::spawn(self.clone().request_first(id));
                    }
                }
            }
        }
        Ok(())
    }

    /// Takes the certificates a previous agent on this node handed over (workload keys exist
    /// only in memory, so a new agent would otherwise ask for every one again). Call before
    /// [`CertManager::set_wanted`], which keeps those still wanted. One not issued under the
    /// signing root in force now, or expired, is left out: asked for anew. How many were taken.
    pub fn adopt(&self, handed_over: Vec<WorkloadCert>) -> usize {
        let authority = self.authority();
        let Some(signing_root) = authority.trusted.first() else { return 0 };
        let now = SystemTime::now();
        let mut taken = 0;
        for cert in handed_over {
            let issuer_is_signing_root = cert.chain.first().is_some_and(|leaf| issued_by(leaf, signing_root));
            if !issuer_is_signing_root || cert.not_after <= now {
                tracing::info!(identity = %cert.identity, "a handed-over certificate is not current; asking anew");
                continue;
            }
            let identity = cert.identity.clone();
            match self.certify(cert, authority.signing_root) {
                Ok(issued) => {
                    self.keep(issued);
                    taken += 1;
                }
                Err(e) => tracing::warn!(%identity, "a handed-over key does not load: {e}"),
            }
        }
        taken
    }

    /// The current certificate of a local identity.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<Issued>> {
        self.certs.read().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// The current certificate of a local identity, waiting up to `within` for one still being
    /// requested (a pod is captured before its first certificate arrives by CSR, and its
    /// connections that need one wait for it rather than go around the mesh).
    pub async fn wait_for(&self, id: &SpiffeId, within: Duration) -> Option<Arc<Issued>> {
        self.wait_until(within, || self.current(id)).await
    }

    /// Waits up to `within` until every local identity has a certificate; how many still have
    /// none then.
    pub async fn wait_for_all(&self, within: Duration) -> usize {
        self.wait_until(within, || (self.pending() == 0).then_some(())).await;
        self.pending()
    }

    /// Waits up to `within` for `found` to find something, looking again at each certificate
    /// installed.
    async fn wait_until<T>(&self, within: Duration, found: impl Fn() -> Option<T>) -> Option<T> {
        // Almost always there already (every new HBONE connection asks): no subscription then.
        if let Some(found) = found() {
            return Some(found);
        }
        let mut installed = self.installed.subscribe();
        let wait = async {
            loop {
                if let Some(found) = found() {
                    return found;
                }
                // The sender lives as long as `self`.
                let _ = installed.changed().await;
            }
        };
        tokio::time::timeout(within, wait).await.ok()
    }

    /// Every current certificate (for the admin API and metrics).
    pub fn all(&self) -> Vec<Arc<Issued>> {
        self.certs.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// How many local identities have no certificate yet (requested by CSR and not answered, or
    /// refused and retried): their workloads' HBONE connections wait for one.
    pub fn pending(&self) -> usize {
        self.pending_identities().len()
    }

    /// The local identities that have no certificate yet.
    pub fn pending_identities(&self) -> Vec<SpiffeId> {
        self.wanted_where(|issued| issued.is_none())
    }

    /// How many local identities hold only an expired certificate (its renewal kept failing):
    /// peers refuse it, so their workloads' HBONE connections fail.
    pub fn expired(&self) -> usize {
        let now = SystemTime::now();
        self.wanted_where(|issued| issued.is_some_and(|issued| issued.cert.not_after <= now)).len()
    }

    /// The local identities whose current certificates (if any) `picked` picks.
    fn wanted_where(&self, picked: impl Fn(Option<&Arc<Issued>>) -> bool) -> Vec<SpiffeId> {
        let certs = self.certs.read().unwrap_or_else(|e| e.into_inner());
        let wanted = self.wanted.read().unwrap_or_else(|e| e.into_inner());
        wanted.iter().filter(|id| picked(certs.get(*id))).cloned().collect()
    }

    fn is_wanted(&self, id: &SpiffeId) -> bool {
        self.wanted.read().unwrap_or_else(|e| e.into_inner()).contains(id)
    }

    /// Obtains and installs a certificate for `id` from the signer in force now.
    async fn issue(&self, id: &SpiffeId) -> Result<Arc<Issued>, IdentityError> {
        let authority = self.authority();
        let cert = match &authority.signer {
            Signer::File(ca) => ca.issue(id, self.ttl),
            Signer::Kubernetes(csr) => csr.request(id).await,
        };
        self.requests.count(&cert);
        self.install(cert?, authority.signing_root)
    }

    fn install(&self, cert: WorkloadCert, signing_root: u64) -> Result<Arc<Issued>, IdentityError> {
        let issued = self.certify(cert, signing_root)?;
        tracing::info!(identity = %issued.cert.identity, serial = %issued.cert.serial, "certificate issued");
        if self.is_wanted(&issued.cert.identity) {
            self.keep(issued.clone());
        }
        Ok(issued)
    }

    /// Readies a certificate and its key for rustls.
    fn certify(&self, cert: WorkloadCert, signing_root: u64) -> Result<Arc<Issued>, IdentityError> {
        let key = self.provider.key_provider.load_private_key(cert.key.clone_key())?;
        let certified_key = Arc::new(CertifiedKey::new(cert.chain.clone(), key));
        Ok(Arc::new(Issued { cert, certified_key, signing_root, obtained: SystemTime::now() }))
    }

    /// Makes `issued` its identity's current certificate, and wakes whoever waits for one.
    fn keep(&self, issued: Arc<Issued>) {
        let identity = issued.cert.identity.clone();
        self.certs.write().unwrap_or_else(|e| e.into_inner()).insert(identity, issued);
        self.installed.send_modify(|installed| *installed += 1);
    }

    /// Requests the first certificate of `id` until one arrives or `id` is no longer wanted,
    /// backing off between refusals.
    async fn request_first(self: Arc<Self>, id: SpiffeId) {
        let mut backoff = Duration::from_secs(1);
        while self.is_wanted(&id) {
            match self.issue(&id).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(identity = %id, "certificate request failed, retrying in {backoff:?}: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
        self.requesting.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }

    /// Renews every certificate past its refresh time (about half-life), or from an earlier
    /// signing root, forever.
    /// Failures are retried.
    pub async fn rotate(self: Arc<Self>) {
        loop {
            let now = SystemTime::now();
            let signing_root = self.authority().signing_root;
            let due: Vec<SpiffeId> = self
                .all()
                .iter()
                .filter(|issued| issued.refresh_at() <= now || issued.signing_root < signing_root)
                .map(|issued| issued.cert.identity.clone())
                .filter(|id| self.is_wanted(id))
                .collect();
            let mut failed = false;
            for id in due {
                if let Err(e) = self.issue(&id).await {
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
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.renew.notified() => {}
            }
        }
    }
}

/// Whether `leaf` names `root`'s subject as its issuer (the signing root moves on when the CA
/// directory changes; a certificate from an earlier one is renewed, not kept).
fn issued_by(leaf: &CertificateDer<'_>, root: &CertificateDer<'_>) -> bool {
    match (x509_parser::parse_x509_certificate(leaf), x509_parser::parse_x509_certificate(root)) {
        (Ok((_, leaf)), Ok((_, root))) => leaf.issuer().as_raw() == root.subject().as_raw(),
        _ => false,
    }
}

/// What a reload of the CA directory changed.
struct TrustChange {
    roots: usize,
    new_signing_root: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    use crate::identity::{ROOT_CERT_FILE, ROOT_KEY_FILE, TRUST_BUNDLE_FILE, new_root, write_private};

    fn issuer(issued: &Issued) -> String {
        let (_, leaf) = x509_parser::parse_x509_certificate(&issued.cert.chain[0]).unwrap();
        leaf.issuer().to_string()
    }

    fn subject(pem: &str) -> String {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        cert.subject().to_string()
    }

    /// A file CA in a fresh directory, removed when dropped, and a manager signing with it.
    struct TempCa {
        dir: PathBuf,
        certs: Arc<CertManager>,
    }

    impl TempCa {
        fn new(name: &str) -> TempCa {
            let dir = std::env::temp_dir().join(format!("ferry-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let ca = FileCa::init(&dir).unwrap();
            let certs = Arc::new(CertManager::with_file_ca(ca, Duration::from_secs(3600)).unwrap());
            TempCa { dir, certs }
        }
    }

    impl Drop for TempCa {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[tokio::test]
    async fn a_changed_ca_directory_applies_and_a_broken_one_changes_nothing() {
        let ca = TempCa::new("ca-reload");
        let (dir, certs) = (&ca.dir, &ca.certs);
        let old_root = std::fs::read_to_string(dir.join(ROOT_CERT_FILE)).unwrap();
        let id = SpiffeId::new("cluster.local", "ns", "sa");
        certs.set_wanted([id.clone()].into()).unwrap();
        let first = certs.current(&id).unwrap();
        assert_eq!(issuer(&first), subject(&old_root));
        tokio::spawn(certs.clone().rotate());
        let mut trust = certs.trust_changes();

        certs.check_ca_dir(dir);
        assert!(!trust.has_changed().unwrap(), "nothing changed, yet the trust did");
        assert_eq!(certs.reload_counts(), [("applied", 0), ("rejected", 0)]);

        // Step 1 of a rotation: a new root trusted beside the old one; certificates stay.
        let (new_cert, new_key) = new_root().unwrap();
        std::fs::write(dir.join(TRUST_BUNDLE_FILE), &new_cert).unwrap();
        certs.check_ca_dir(dir);
        assert!(trust.has_changed().unwrap());
        trust.mark_unchanged();
        assert_eq!((certs.trusted_roots(), certs.reload_counts()[0]), (2, ("applied", 1)));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(Arc::ptr_eq(&certs.current(&id).unwrap(), &first), "renewed without a new signing root");

        // Half a root change (the key of another root): refused once, however often it is read.
        std::fs::write(dir.join(ROOT_CERT_FILE), &new_cert).unwrap();
        for _ in 0..3 {
            certs.check_ca_dir(dir);
        }
        assert_eq!(certs.reload_counts(), [("applied", 1), ("rejected", 1)]);
        assert!(!trust.has_changed().unwrap());
        assert_eq!(certs.trusted_roots(), 2);

        // Step 2: the new root signs, the old one is still trusted; certificates are renewed now.
        write_private(&dir.join(ROOT_KEY_FILE), &new_key).unwrap();
        std::fs::write(dir.join(TRUST_BUNDLE_FILE), &old_root).unwrap();
        certs.check_ca_dir(dir);
        assert!(trust.has_changed().unwrap());
        assert_eq!(certs.reload_counts(), [("applied", 2), ("rejected", 1)]);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while issuer(&certs.current(&id).unwrap()) != subject(&new_cert) {
            assert!(std::time::Instant::now() < deadline, "not renewed under the new root");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_connection_waits_for_a_certificate_on_its_way_and_gives_up_at_its_deadline() {
        let TempCa { certs, .. } = &TempCa::new("ca-wait");
        let (id, other) =
            (SpiffeId::new("cluster.local", "ns", "sa"), SpiffeId::new("cluster.local", "ns", "other"));
        let waiting = tokio::spawn({
            let (certs, id) = (certs.clone(), id.clone());
            async move { certs.wait_for(&id, Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Another identity's certificate does not end the wait.
        certs.set_wanted([other.clone()].into()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "woke for another identity's certificate");
        certs.set_wanted([id.clone(), other.clone()].into()).unwrap();
        let issued = waiting.await.unwrap().expect("the certificate that arrived");
        assert_eq!(issued.cert.identity, id);

        let started = std::time::Instant::now();
        let missing = SpiffeId::new("cluster.local", "ns", "missing");
        assert!(certs.wait_for(&missing, Duration::from_millis(100)).await.is_none());
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn certificates_issued_together_are_renewed_apart_around_half_life() {
        let fractions: Vec<f64> = (0..200u32).map(|n| refresh_fraction(&format!("{:x}", n * 7919))).collect();
        assert!(fractions.iter().all(|f| (0.45..0.55).contains(f)), "{fractions:?}");
        let (low, high) = fractions.iter().fold((1.0f64, 0.0f64), |(l, h), f| (l.min(*f), h.max(*f)));
        assert!(high - low > 0.08, "spread over {low}..{high} only");
        assert_eq!(refresh_fraction("ab12"), refresh_fraction("ab12"), "the same at every look");
    }

    #[test]
    fn a_certificate_is_renewed_half_way_through_what_is_left_of_it_when_it_came() {
        // Backdated by five minutes against clock skew: renewal at half its nominal validity
        // would fall before it was even issued.
        let ca = TempCa::new("ca-refresh");
        let certs = CertManager::with_file_ca(FileCa::load(&ca.dir).unwrap(), Duration::from_secs(60));
        let certs = Arc::new(certs.unwrap());
        let id = SpiffeId::new("cluster.local", "ns", "sa");
        certs.set_wanted([id.clone()].into()).unwrap();
        let issued = certs.current(&id).unwrap();
        assert!(issued.cert.not_before < SystemTime::now() - Duration::from_secs(60), "not backdated");
        let due_in = issued.refresh_at().duration_since(SystemTime::now()).expect("due already");
        assert!((Duration::from_secs(26)..Duration::from_secs(34)).contains(&due_in), "{due_in:?}");
    }

    #[tokio::test]
    async fn a_certificate_not_renewed_in_time_counts_as_expired() {
        let ca = TempCa::new("ca-expired");
        // Nothing renews it here (no rotation task runs).
        let certs = CertManager::with_file_ca(FileCa::load(&ca.dir).unwrap(), Duration::from_secs(1));
        let certs = Arc::new(certs.unwrap());
        let id = SpiffeId::new("cluster.local", "ns", "sa");
        certs.set_wanted([id].into()).unwrap();
        assert_eq!((certs.pending(), certs.expired()), (0, 0));
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!((certs.pending(), certs.expired()), (0, 1));
        certs.set_wanted(BTreeSet::new()).unwrap();
        assert_eq!(certs.expired(), 0, "counted an identity no longer wanted");
    }

    #[tokio::test]
    async fn handed_over_certificates_are_taken_unless_another_root_issued_them() {
        let (ca, other) = (TempCa::new("ca-adopt"), TempCa::new("ca-adopt-other"));
        let id = SpiffeId::new("cluster.local", "ns", "sa");
        ca.certs.set_wanted([id.clone()].into()).unwrap();
        other.certs.set_wanted([id.clone()].into()).unwrap();
        let (chain, key) = ca.certs.current(&id).unwrap().cert.to_pem();
        let (foreign_chain, foreign_key) = other.certs.current(&id).unwrap().cert.to_pem();
        assert!(WorkloadCert::from_pem(&chain, &foreign_key).unwrap_err().contains("another key"));

        // A new agent's manager on the same CA: takes the certificate instead of issuing one.
        let next =
            CertManager::with_file_ca(FileCa::load(&ca.dir).unwrap(), Duration::from_secs(3600)).unwrap();
        let next = Arc::new(next);
        let handed_over = [(chain, key), (foreign_chain, foreign_key)]
            .iter()
            .map(|(chain, key)| WorkloadCert::from_pem(chain, key).unwrap())
            .collect();
        assert_eq!(next.adopt(handed_over), 1, "the other root's certificate is left out");
        next.set_wanted([id.clone()].into()).unwrap();
        assert_eq!(next.current(&id).unwrap().cert.serial, ca.certs.current(&id).unwrap().cert.serial);
        assert_eq!(next.request_counts(), [("issued", 0), ("failed", 0)]);
    }

    #[tokio::test]
    async fn waiting_for_every_certificate_ends_at_its_deadline_with_those_still_missing() {
        // A signer behind an API server nobody answers at: requests fail and are retried.
        let api = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let signer = Signer::Kubernetes(CsrClient::new(kube::Client::try_from(api).unwrap(), "node"));
        let ca = TempCa::new("ca-pending");
        let root = FileCa::load(&ca.dir).unwrap().root().clone();
        let certs = Arc::new(CertManager::new(signer, vec![root], Duration::from_secs(3600)).unwrap());
        let ids = ["a", "b"].map(|sa| SpiffeId::new("cluster.local", "ns", sa));
        certs.set_wanted(ids.iter().cloned().collect()).unwrap();
        assert_eq!(certs.pending(), 2);
        let started = std::time::Instant::now();
        assert_eq!(certs.wait_for_all(Duration::from_millis(100)).await, 2);
        assert!(started.elapsed() >= Duration::from_millis(100));
        certs.set_wanted(BTreeSet::new()).unwrap();
        assert_eq!(certs.wait_for_all(Duration::from_secs(10)).await, 0);
        assert!(started.elapsed() < Duration::from_secs(5), "waited for identities no longer wanted");
    }
}
