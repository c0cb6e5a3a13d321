//! Workload identity: SPIFFE IDs, the file CA of the embedded default, certificates obtained for
//! local workloads (from the file CA, or in Kubernetes mode by CertificateSigningRequest; kept in
//! memory, renewed at about half-life), and the TLS configurations built on them.

mod ca;
pub mod csr;
mod manager;
pub mod tls;

use std::fmt;

use rustls::pki_types::CertificateDer;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

pub use ca::{
    FileCa, ROOT_CERT_FILE, ROOT_KEY_FILE, SignedLeaf, TRUST_BUNDLE_FILE, WorkloadCert, certs_to_pem,
    load_roots, new_root, write_private,
};
pub use manager::{CertManager, Issued, Signer};

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
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
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// Parses strictly: exactly `spiffe://td/ns/<ns>/sa/<sa>`, no empty parts.
    pub fn parse(uri: &str) -> Result<SpiffeId, IdentityError> {
        let bad = || IdentityError::BadSpiffeId(uri.to_owned());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
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
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
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
