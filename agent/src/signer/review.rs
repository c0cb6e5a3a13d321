//! Whether a workload certificate request may be signed: pure decisions over the request and the
//! pods the signer looked up, so every refusal is testable in memory.
//!
//! A request is signed only when (1) it comes from the agent's service account with a token bound
//! to an agent pod, which names the requesting node, (2) it asks for exactly one SPIFFE ID of this
//! trust domain and mTLS usages only, and (3) a pod with that namespace and service account runs
//! on that node. A compromised node can thus obtain only the identities of its own workloads.

use std::time::{Duration, SystemTime};

use k8s_openapi::{
    api::{certificates::v1::CertificateSigningRequestSpec, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::Time,
};
use rcgen::{CertificateSigningRequestParams, PublicKey, SanType};

use crate::identity::{SpiffeId, csr::USAGES};

/// What the token of a pod-bound service account carries in the request's `extra`.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// Who may ask for what.
#[derive(Debug, Clone)]
pub struct Authority {
    pub trust_domain: String,
    /// Namespace and name of the agents' service account.
    pub agent_namespace: String,
    pub agent_service_account: String,
}

/// Why a request is refused: a CamelCase reason and a message for `kubectl describe csr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: &'static str,
    pub message: String,
}

/// A well-formed request from an agent pod, not yet checked against the pods on its node.
#[derive(Debug)]
pub struct Request {
    pub identity: SpiffeId,
    pub public_key: PublicKey,
    pub agent_pod: String,
    pub agent_pod_uid: String,
}

/// Whether a request still unanswered, created at `created`, is older than `after`: its agent
/// stopped waiting for it ([`crate::identity::csr::REQUEST_TIMEOUT`]) and asked again, so an
/// answer would serve nobody. A signer back from an outage finds many such requests.
pub fn abandoned(created: Option<&Time>, now: SystemTime, after: Duration) -> bool {
    created
        .is_some_and(|created| now.duration_since(SystemTime::from(created.0)).is_ok_and(|age| age > after))
}

fn deny(reason: &'static str, message: String) -> Denial {
    Denial { reason, message }
}

impl Authority {
    fn agent_user(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.agent_namespace, self.agent_service_account)
    }

    /// Checks who asks and what for.
    pub fn parse(&self, spec: &CertificateSigningRequestSpec) -> Result<Request, Denial> {
        let user = spec.username.as_deref().unwrap_or_default();
        if user != self.agent_user() {
            return Err(deny(
                "NotAnAgent",
                format!(
                    "requested by {user:?}; only {} may request workload certificates",
                    self.agent_user()
                ),
            ));
        }
        let extra = |key: &str| {
            spec.extra.as_ref().and_then(|e| e.get(key)).and_then(|v| match v.as_slice() {
                [one] => Some(one.clone()),
                _ => None,
            })
        };
        let (Some(agent_pod), Some(agent_pod_uid)) = (extra(POD_NAME_EXTRA), extra(POD_UID_EXTRA)) else {
            return Err(deny(
                "TokenNotBoundToPod",
                "the requester's token is not bound to a pod, so its node is unknown (mount a projected \
                 service account token)"
                    .into(),
            ));
        };
        if let Some(bad) = spec.usages.iter().flatten().find(|u| !USAGES.contains(&u.as_str())) {
            return Err(deny(
                "UnsupportedUsage",
                format!("usage {bad:?} is not granted; allowed: {USAGES:?}"),
            ));
        }
        let pem = String::from_utf8_lossy(&spec.request.0);
        let csr = CertificateSigningRequestParams::from_pem(&pem)
            .map_err(|e| deny("MalformedRequest", format!("the PKCS#10 request is unusable: {e}")))?;
        let uri = match csr.params.subject_alt_names.as_slice() {
            [SanType::URI(uri)] => uri.as_str().to_owned(),
            other => {
                return Err(deny(
                    "BadIdentity",
                    format!(
                        "the request must carry exactly one URI SAN (a SPIFFE ID), found {} SANs",
                        other.len()
                    ),
                ));
            }
        };
        let identity = SpiffeId::parse(&uri).map_err(|e| deny("BadIdentity", e.to_string()))?;
        if identity.trust_domain() != self.trust_domain {
            return Err(deny(
                "WrongTrustDomain",
                format!("{identity} is not in trust domain {}", self.trust_domain),
            ));
        }
        Ok(Request { identity, public_key: csr.public_key, agent_pod, agent_pod_uid })
    }

    /// Checks that the requesting agent pod still exists and that a pod with the requested
    /// identity runs on its node; returns the node.
    pub fn authorize(
        &self,
        request: &Request,
        agent_pod: Option<&Pod>,
        pods_on_node: &[Pod],
    ) -> Result<String, Denial> {
        let gone = |why: &str| {
            deny("AgentPodGone", format!("agent pod {}/{} {why}", self.agent_namespace, request.agent_pod))
        };
        let agent_pod = agent_pod.ok_or_else(|| gone("does not exist"))?;
        if agent_pod.metadata.uid.as_deref() != Some(request.agent_pod_uid.as_str()) {
            return Err(gone("was replaced since its token was issued"));
        }
        let spec = agent_pod.spec.as_ref().ok_or_else(|| gone("has no spec"))?;
        let node = spec.node_name.clone().ok_or_else(|| gone("is not scheduled to a node"))?;
        let id = &request.identity;
        let runs_here = pods_on_node.iter().any(|pod| {
            let Some(spec) = &pod.spec else { return false };
            let finished = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
            pod.metadata.namespace.as_deref() == Some(id.namespace())
                && spec.node_name.as_deref() == Some(node.as_str())
                && spec.service_account_name.as_deref().unwrap_or("default") == id.service_account()
                && !finished
        });
        if !runs_here {
            return Err(deny(
                "NoSuchWorkloadOnNode",
                format!(
                    "no running pod of namespace {} with service account {} on node {node}",
                    id.namespace(),
                    id.service_account()
                ),
            ));
        }
        Ok(node)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        ByteString,
        api::core::v1::{PodSpec, PodStatus},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };
    use rcgen::{CertificateParams, DistinguishedName, KeyPair};

    use super::*;

    fn authority() -> Authority {
        Authority {
            trust_domain: "cluster.local".into(),
            agent_namespace: "ferry-system".into(),
            agent_service_account: "ferry-agent".into(),
        }
    }

    fn request_pem(sans: Vec<SanType>) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.serialize_request(&key).unwrap().pem().unwrap().into_bytes()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn spec(user: &str, bound: bool, sans: Vec<SanType>) -> CertificateSigningRequestSpec {
        let extra = bound.then(|| {
            [(POD_NAME_EXTRA, "agent-x"), (POD_UID_EXTRA, "uid-1")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), vec![v.to_owned()]))
                .collect()
        });
        CertificateSigningRequestSpec {
            username: Some(user.into()),
            extra,
            request: ByteString(request_pem(sans)),
            signer_name: "ferry.dev/workload".into(),
            usages: Some(USAGES.map(String::from).to_vec()),
            ..Default::default()
        }
    }

    const AGENT: &str = "system:serviceaccount:ferry-system:ferry-agent";
    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn pod(ns: &str, name: &str, uid: &str, sa: &str, node: &str, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                service_account_name: Some(sa.into()),
                ..Default::default()
            }),
            status: Some(PodStatus { phase: Some(phase.into()), ..Default::default() }),
        }
    }

    fn reason(result: Result<impl std::fmt::Debug, Denial>) -> &'static str {
        result.expect_err("expected a denial").reason
    }

    #[test]
    fn a_bound_agent_asking_for_a_local_workload_is_approved() {
        let request = authority().parse(&spec(AGENT, true, vec![uri(WEB)])).unwrap();
        assert_eq!(request.identity.to_string(), WEB);
        let agent = pod("ferry-system", "agent-x", "uid-1", "ferry-agent", "node1", "Running");
        let web = pod("shop", "web-1", "w", "web", "node1", "Running");
        assert_eq!(authority().authorize(&request, Some(&agent), &[web]).unwrap(), "node1");
    }

    #[test]
    fn requests_are_refused_with_a_reason() {
        let a = authority();
        assert_eq!(reason(a.parse(&spec("admin", true, vec![uri(WEB)]))), "NotAnAgent");
        assert_eq!(reason(a.parse(&spec(AGENT, false, vec![uri(WEB)]))), "TokenNotBoundToPod");
        assert_eq!(reason(a.parse(&spec(AGENT, true, vec![]))), "BadIdentity");
        assert_eq!(
            reason(a.parse(&spec(AGENT, true, vec![uri(WEB), SanType::DnsName("web".try_into().unwrap())]))),
            "BadIdentity"
        );
        assert_eq!(
            reason(a.parse(&spec(AGENT, true, vec![uri("spiffe://cluster.local/web")]))),
            "BadIdentity"
        );
        assert_eq!(
            reason(a.parse(&spec(AGENT, true, vec![uri("spiffe://other.mesh/ns/shop/sa/web")]))),
            "WrongTrustDomain"
        );
        let mut garbage = spec(AGENT, true, vec![uri(WEB)]);
        garbage.request = ByteString(
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".to_vec(),
        );
        assert_eq!(reason(a.parse(&garbage)), "MalformedRequest");
        let mut ca_usage = spec(AGENT, true, vec![uri(WEB)]);
        ca_usage.usages = Some(vec!["cert sign".into()]);
        assert_eq!(reason(a.parse(&ca_usage)), "UnsupportedUsage");
    }

    #[test]
    fn only_identities_running_on_the_requesting_node_are_granted() {
        let a = authority();
        let request = a.parse(&spec(AGENT, true, vec![uri(WEB)])).unwrap();
        let agent = pod("ferry-system", "agent-x", "uid-1", "ferry-agent", "node1", "Running");
        assert_eq!(reason(a.authorize(&request, None, &[])), "AgentPodGone");
        let replaced = pod("ferry-system", "agent-x", "uid-2", "ferry-agent", "node1", "Running");
        assert_eq!(reason(a.authorize(&request, Some(&replaced), &[])), "AgentPodGone");
        for (what, other) in [
            ("another node", pod("shop", "web-1", "w", "web", "node2", "Running")),
            ("another service account", pod("shop", "db-1", "d", "db", "node1", "Running")),
            ("another namespace", pod("blog", "web-1", "w", "web", "node1", "Running")),
            ("a finished pod", pod("shop", "web-1", "w", "web", "node1", "Succeeded")),
        ] {
            assert_eq!(
                reason(a.authorize(&request, Some(&agent), &[other])),
                "NoSuchWorkloadOnNode",
                "{what}"
            );
        }
    }

    #[test]
    fn a_request_older_than_its_agents_wait_is_abandoned() {
        let now = SystemTime::now();
        let created = |ago: u64| Some(Time((now - Duration::from_secs(ago)).try_into().unwrap()));
        let after = Duration::from_secs(120);
        assert!(abandoned(created(121).as_ref(), now, after));
        assert!(!abandoned(created(60).as_ref(), now, after));
        // A clock behind the API server's sees requests from the future: they are new.
        assert!(!abandoned(Some(&Time((now + Duration::from_secs(30)).try_into().unwrap())), now, after));
        assert!(!abandoned(None, now, after));
    }
}
