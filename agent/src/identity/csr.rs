//! Kubernetes mode: workload certificates through the CertificateSigningRequest API. The agent
//! generates the key and keeps it in memory; the request carries the SPIFFE ID as its one URI SAN;
//! `ferry signer` approves and signs it, or refuses with a reason.

use std::time::Duration;

use k8s_openapi::{
    ByteString,
    api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec},
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
    runtime::wait::await_condition,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};

use super::{IdentityError, SpiffeId, WorkloadCert, ca::parse_bundle};

/// The signerName of workload certificate requests.
pub const SIGNER_NAME: &str = "ferry.dev/workload";
/// The usages requested (what the signer grants: mTLS both ways).
pub const USAGES: [&str; 4] = ["digital signature", "key encipherment", "server auth", "client auth"];
/// Annotations saying, to operators reading `kubectl get csr`, who asked for what.
pub const NODE_ANNOTATION: &str = "ferry.dev/node";
pub const IDENTITY_ANNOTATION: &str = "ferry.dev/identity";
/// How long a request may wait for the signer; then the agent asks again with a new one.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct CsrClient {
    api: Api<CertificateSigningRequest>,
    node: String,
}

/// Where a request ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The signer's certificate chain (PEM).
    Signed(Vec<u8>),
    /// Denied or failed, with the signer's reason and message.
    Refused(String),
}

/// The outcome of a request, once it has one.
pub fn outcome(csr: &CertificateSigningRequest) -> Option<Outcome> {
    let status = csr.status.as_ref()?;
    if let Some(refusal) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True")
    {
        return Some(Outcome::Refused(format!(
            "{} {}: {}",
            refusal.type_.to_lowercase(),
            refusal.reason.as_deref().unwrap_or("(no reason)"),
            refusal.message.as_deref().unwrap_or("")
        )));
    }
    status.certificate.as_ref().filter(|c| !c.0.is_empty()).map(|c| Outcome::Signed(c.0.clone()))
}

impl CsrClient {
    pub fn new(client: kube::Client, node: &str) -> CsrClient {
        CsrClient { api: Api::all(client), node: node.to_owned() }
    }

    /// Asks for a certificate for `id` and waits for the signer's answer.
    pub async fn request(&self, id: &SpiffeId) -> Result<WorkloadCert, IdentityError> {
        let fail = |problem: String| IdentityError::Issue { id: id.to_string(), problem };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(id.to_string().try_into().map_err(|e: rcgen::Error| fail(e.to_string()))?)];
        let request =
            params.serialize_request(&key).and_then(|r| r.pem()).map_err(|e| fail(e.to_string()))?;
        let object = CertificateSigningRequest {
            metadata: ObjectMeta {
                generate_name: Some("ferry-workload-".into()),
                annotations: Some(
                    [(NODE_ANNOTATION, self.node.clone()), (IDENTITY_ANNOTATION, id.to_string())]
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: CertificateSigningRequestSpec {
                request: ByteString(request.into_bytes()),
                signer_name: SIGNER_NAME.into(),
                usages: Some(USAGES.map(String::from).to_vec()),
                ..Default::default()
            },
            status: None,
        };
        let created = self
            .api
            .create(&PostParams::default(), &object)
            .await
            .map_err(|e| fail(format!("creating the CertificateSigningRequest: {e}")))?;
        let name = created.metadata.name.unwrap_or_default();
        let answered = tokio::time::timeout(
            REQUEST_TIMEOUT,
            await_condition(self.api.clone(), &name, |csr: Option<&CertificateSigningRequest>| {
                csr.and_then(outcome).is_some()
            }),
        )
        .await
        .map_err(|_| {
            fail(format!(
                "CertificateSigningRequest {name}: no answer from the signer in {REQUEST_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| fail(format!("watching CertificateSigningRequest {name}: {e}")))?;
        let chain = match answered.as_ref().and_then(outcome) {
            Some(Outcome::Signed(pem)) => pem,
            Some(Outcome::Refused(why)) => {
                return Err(fail(format!("CertificateSigningRequest {name} {why}")));
            }
            None => return Err(fail(format!("CertificateSigningRequest {name} was deleted"))),
        };
        // The signer must have certified our key for exactly the identity asked for.
        let cert = parse_bundle(&String::from_utf8_lossy(&chain))
            .and_then(|chain| WorkloadCert::from_parts(chain, &key))
            .and_then(|cert| match &cert.identity {
                certified if certified == id => Ok(cert),
                certified => Err(format!("signed for {certified}, asked for {id}")),
            })
            .map_err(|problem| fail(format!("CertificateSigningRequest {name}: certificate: {problem}")))?;
        tracing::debug!(csr = %name, identity = %id, "certificate signing request answered");
        Ok(cert)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::certificates::v1::{
        CertificateSigningRequestCondition, CertificateSigningRequestStatus,
    };

    use super::*;

    fn with_status(status: CertificateSigningRequestStatus) -> CertificateSigningRequest {
        CertificateSigningRequest { status: Some(status), ..Default::default() }
    }

    fn condition(type_: &str, reason: &str) -> CertificateSigningRequestCondition {
        CertificateSigningRequestCondition {
            type_: type_.into(),
            status: "True".into(),
            reason: Some(reason.into()),
            message: Some("why".into()),
            ..Default::default()
        }
    }

    #[test]
    fn outcome_waits_for_a_certificate_or_a_refusal() {
        assert_eq!(outcome(&CertificateSigningRequest::default()), None);
        let approved = with_status(CertificateSigningRequestStatus {
            conditions: Some(vec![condition("Approved", "FerryApproved")]),
            ..Default::default()
        });
        assert_eq!(outcome(&approved), None, "approved but not yet signed");
        let signed = with_status(CertificateSigningRequestStatus {
            conditions: Some(vec![condition("Approved", "FerryApproved")]),
            certificate: Some(ByteString(b"PEM".to_vec())),
        });
        assert_eq!(outcome(&signed), Some(Outcome::Signed(b"PEM".to_vec())));
        let denied = with_status(CertificateSigningRequestStatus {
            conditions: Some(vec![condition("Denied", "NoSuchWorkloadOnNode")]),
            ..Default::default()
        });
        assert_eq!(outcome(&denied), Some(Outcome::Refused("denied NoSuchWorkloadOnNode: why".into())));
    }
}
