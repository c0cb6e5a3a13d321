//! Workload identity: SPIFFE IDs, the file CA of the embedded default, certificates obtained for
//! local workloads (from the file CA, or in Kubernetes mode by CertificateSigningRequest; kept in
//! memory, renewed at about half-life), and the TLS configurations built on them.

mod ca;
pub mod csr;
mod manager;
pub mod tls;

use std::{fmt, sync::Arc};

use rustls::pki_types::CertificateDer;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

pub use ca::{
    FileCa, ROOT_CERT_FILE, ROOT_KEY_FILE, SignedLeaf, TRUST_BUNDLE_FILE, WorkloadCert, certs_to_pem,
    load_roots, new_root, write_private,
};
pub use manager::{CertManager, Issued, Signer};

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, kept written out: every
/// connection clones, logs and counts its peers' IDs several times, each a pointer copy then.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    uri: Arc<str>,
    /// Where the trust domain and the namespace end in `uri`.
    trust_domain_end: usize,
    namespace_end: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("not a workload SPIFFE ID (spiffe://<td>/ns/<ns>/sa/<sa>): {0:?}")]
    BadSpiffeId(String),
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("certificate must carry exactly one URI SAN, found {0}")]
    UriSanCount(usize),
    #[error("CA directory {dir}: {problem}")]
    Ca { dir: String, problem: String },
    #[error("issuing a certificate for {id}: {problem}")]
    Issue { id: String, problem: String },
    #[error("no certificate for {0} yet")]
    NoCertificate(SpiffeId),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

impl SpiffeId {
    const SCHEME: &str = "spiffe://";
    const NAMESPACE: &str = "/ns/";
    const SERVICE_ACCOUNT: &str = "/sa/";

    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> SpiffeId {
        // Not format!: proxies build destination IDs per connection.
        let uri =
            [Self::SCHEME, trust_domain, Self::NAMESPACE, namespace, Self::SERVICE_ACCOUNT, service_account]
                .concat();
        let trust_domain_end = Self::SCHEME.len() + trust_domain.len();
        SpiffeId {
            uri: uri.into(),
            trust_domain_end,
            namespace_end: trust_domain_end + Self::NAMESPACE.len() + namespace.len(),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri[Self::SCHEME.len()..self.trust_domain_end]
    }

    pub fn namespace(&self) -> &str {
        &self.uri[self.trust_domain_end + Self::NAMESPACE.len()..self.namespace_end]
    }

    pub fn service_account(&self) -> &str {
        &self.uri[self.namespace_end + Self::SERVICE_ACCOUNT.len()..]
    }

    /// The whole `spiffe://` URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// Istio's principal form: the URI without `spiffe://`.
    pub fn principal(&self) -> &str {
        &self.uri[Self::SCHEME.len()..]
    }

    /// Parses strictly: exactly `spiffe://td/ns/<ns>/sa/<sa>`, no empty parts.
    pub fn parse(uri: &str) -> Result<SpiffeId, IdentityError> {
        let bad = || IdentityError::BadSpiffeId(uri.to_owned());
        let rest = uri.strip_prefix(Self::SCHEME).ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if [td, ns, sa].iter().all(|p| !p.is_empty()) => {
                Ok(SpiffeId::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }

    /// The identity a leaf certificate asserts: its one URI SAN.
    pub fn from_cert(cert: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let san =
            parsed.subject_alternative_name().map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let uris: Vec<&str> = san
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [uri] => SpiffeId::parse(uri),
            _ => Err(IdentityError::UriSanCount(uris.len())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

/// As its URI.
impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SpiffeId").field(&self.uri).finish()
    }
}

/// Ordered by trust domain, then namespace, then service account.
impl Ord for SpiffeId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.trust_domain(), self.namespace(), self.service_account()).cmp(&(
            other.trust_domain(),
            other.namespace(),
            other.service_account(),
        ))
    }
}

impl PartialOrd for SpiffeId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_strictly() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "default", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(
            (id.trust_domain(), id.namespace(), id.service_account(), id.principal()),
            ("cluster.local", "default", "web", "cluster.local/ns/default/sa/web")
        );
        for bad in [
            "spiffe://cluster.local/ns/default/sa/web/extra",
            "spiffe://cluster.local/ns/default",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe:///ns/a/sa/b",
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/sa/a/ns/b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
