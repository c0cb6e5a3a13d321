//! L4 authorization: Istio `AuthorizationPolicy` semantics, decided without I/O.
//!
//! Order (Istio's): if any enforced DENY policy matches, deny; else if any enforced ALLOW policy
//! applies to the destination workload, allow only if one of them matches; else allow. AUDIT
//! policies never decide. Dry-run policies are evaluated as if enforced, in a shadow decision that
//! is only reported.

mod model;

use std::{collections::BTreeMap, fmt, net::IpAddr, sync::Arc};

use ipnet::IpNet;

pub use model::{AuthorizationPolicy, AuthorizationPolicyResource, Metadata, Spec};

use crate::identity::SpiffeId;

/// Policies here apply to every workload of the mesh.
pub const ROOT_NAMESPACE: &str = "ferry-system";
/// The same for Istio's AuthorizationPolicy objects: Istio's root namespace (its default), so
/// Istio's mesh-wide policies stay mesh-wide.
pub const ISTIO_ROOT_NAMESPACE: &str = "istio-system";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

/// A compiled policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    /// In the root namespace: applies to the workloads of every namespace.
    pub mesh_wide: bool,
    /// `None`: every workload of the namespace (or of the mesh, when mesh-wide).
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    pub dry_run: bool,
    pub rules: Vec<Rule>,
    /// What cannot be enforced as written (L7 fields), for logs and `ferry policies`.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
    /// L7 fields the rule uses; non-empty makes the rule match nothing in ALLOW, and match on its
    /// L4 conditions alone in DENY.
    pub l7_fields: Vec<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

/// A `when` condition: values (any must match) and notValues (none may match).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    SourceIp(Vec<IpNet>, Vec<IpNet>),
    SourceNamespace(Vec<StringMatch>, Vec<StringMatch>),
    SourcePrincipal(Vec<StringMatch>, Vec<StringMatch>),
    DestinationIp(Vec<IpNet>, Vec<IpNet>),
    DestinationPort(Vec<u16>, Vec<u16>),
}

/// Istio's string match: exact, `*` (anything present), `prefix*` or `*suffix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl StringMatch {
    pub fn new(pattern: &str) -> StringMatch {
        if pattern == "*" {
            StringMatch::Any
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_owned())
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_owned())
        } else {
            StringMatch::Exact(pattern.to_owned())
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Any => true,
            StringMatch::Exact(e) => value == e,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
        }
    }
}

/// What the decision is about: one connection to one local workload.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub src_ip: IpAddr,
    /// The peer's authenticated identity (mTLS); `None` for plaintext.
    pub src_identity: Option<&'a SpiffeId>,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    pub dst_namespace: &'a str,
    pub dst_labels: &'a BTreeMap<String, String>,
    /// Opened by a process on this node (the kubelet's probes), with `nodeTraffic: allowed`: let
    /// through before any policy, as Istio ambient lets probes past ztunnel.
    pub node_exempt: bool,
}

impl Request<'_> {
    /// Istio's principal form: the SPIFFE ID without `spiffe://`.
    fn principal(&self) -> Option<&str> {
        self.src_identity.map(SpiffeId::principal)
    }

    fn namespace(&self) -> Option<&str> {
        self.src_identity.map(SpiffeId::namespace)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

/// Which policy and rule decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    /// `namespace/name` of the deciding policy; `None` when no policy decided.
    pub policy: Option<String>,
    pub rule: Option<usize>,
    pub explanation: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
    /// What the decision would be if dry-run policies were enforced, when that differs.
    pub dry_run: Option<(Verdict, Reason)>,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.verdict == Verdict::Allow { "allowed" } else { "denied" };
        write!(f, "{verdict}: {}", self.reason.explanation)?;
        if let Some(policy) = &self.reason.policy {
            write!(f, " ({policy}")?;
            if let Some(rule) = self.reason.rule {
                write!(f, " rule {rule}")?;
            }
            write!(f, ")")?;
        }
        Ok(())
    }
}

/// Every policy the agent knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySet {
    policies: Vec<Arc<Policy>>,
}

impl PolicySet {
    pub fn new(policies: Vec<Policy>) -> PolicySet {
        PolicySet { policies: policies.into_iter().map(Arc::new).collect() }
    }

    pub fn policies(&self) -> &[Arc<Policy>] {
        &self.policies
    }

    pub fn evaluate(&self, request: &Request<'_>) -> Decision {
        if request.node_exempt {
            let explanation = "from this node (kubelet probes), exempt with nodeTraffic: allowed";
            return Decision {
                verdict: Verdict::Allow,
                reason: Reason { policy: None, rule: None, explanation },
                dry_run: None,
            };
        }
        let applicable: Vec<&Policy> =
            self.policies.iter().map(Arc::as_ref).filter(|p| p.applies_to(request)).collect();
        let enforced = decide(applicable.iter().copied().filter(|p| !p.dry_run), request);
        let shadow = if applicable.iter().any(|p| p.dry_run) {
            Some(decide(applicable.into_iter(), request))
        } else {
            None
        };
        let dry_run = shadow.filter(|s| s.0 != enforced.0);
        Decision { verdict: enforced.0, reason: enforced.1, dry_run }
    }
}

fn decide<'a>(
    policies: impl Iterator<Item = &'a Policy> + Clone,
    request: &Request<'_>,
) -> (Verdict, Reason) {
    let reason = |policy: &Policy, rule, explanation| Reason {
        policy: Some(format!("{}/{}", policy.namespace, policy.name)),
        rule: Some(rule),
        explanation,
    };
    for policy in policies.clone().filter(|p| p.action == Action::Deny) {
        if let Some(rule) = policy.matching_rule(request) {
            return (Verdict::Deny, reason(policy, rule, "matched a DENY policy"));
        }
    }
    let mut allow_policies = policies.filter(|p| p.action == Action::Allow).peekable();
    if allow_policies.peek().is_none() {
        return (Verdict::Allow, Reason { policy: None, rule: None, explanation: "no ALLOW policy applies" });
    }
    for policy in allow_policies {
        if let Some(rule) = policy.matching_rule(request) {
            return (Verdict::Allow, reason(policy, rule, "matched an ALLOW policy"));
        }
    }
    (Verdict::Deny, Reason { policy: None, rule: None, explanation: "ALLOW policies apply but none matched" })
}

impl Policy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn applies_to(&self, request: &Request<'_>) -> bool {
        let in_scope = self.mesh_wide || self.namespace == request.dst_namespace;
        in_scope
            && self
                .selector
                .as_ref()
                .is_none_or(|labels| labels.iter().all(|(k, v)| request.dst_labels.get(k) == Some(v)))
    }

    /// Index of the first rule that matches. No rules: matches nothing.
    fn matching_rule(&self, request: &Request<'_>) -> Option<usize> {
        self.rules.iter().position(|rule| {
            // L7 conditions are unknowable here: ALLOW treats the rule as never matching; DENY
            // enforces what remains (fail closed).
            (rule.l7_fields.is_empty() || self.action == Action::Deny) && rule.matches(request)
        })
    }
}

impl Rule {
    fn matches(&self, request: &Request<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(request)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(request.dst_port)))
            && self.when.iter().all(|c| c.matches(request))
    }
}

/// `values` match (any) when given; `not_values` never match.
fn check<T>(values: &[T], not_values: &[T], matches: impl Fn(&T) -> bool) -> bool {
    (values.is_empty() || values.iter().any(&matches)) && !not_values.iter().any(matches)
}

/// Like [`check`] for an attribute that may be absent (no identity on plaintext): an absent
/// value matches no positive list, and no negative list excludes it.
fn check_optional(values: &[StringMatch], not_values: &[StringMatch], value: Option<&str>) -> bool {
    match value {
        Some(v) => check(values, not_values, |m| m.matches(v)),
        None => values.is_empty(),
    }
}

impl Source {
    fn matches(&self, request: &Request<'_>) -> bool {
        check_optional(&self.principals, &self.not_principals, request.principal())
            && check_optional(&self.namespaces, &self.not_namespaces, request.namespace())
            && check(&self.ip_blocks, &self.not_ip_blocks, |b| b.contains(&request.src_ip))
    }
}

impl Operation {
    fn matches(&self, port: u16) -> bool {
        check(&self.ports, &self.not_ports, |p| *p == port)
    }
}

impl Condition {
    fn matches(&self, request: &Request<'_>) -> bool {
        match self {
            Condition::SourceIp(v, nv) => check(v, nv, |b| b.contains(&request.src_ip)),
            Condition::DestinationIp(v, nv) => check(v, nv, |b| b.contains(&request.dst_ip)),
            Condition::DestinationPort(v, nv) => check(v, nv, |p| *p == request.dst_port),
            Condition::SourceNamespace(v, nv) => check_optional(v, nv, request.namespace()),
            Condition::SourcePrincipal(v, nv) => check_optional(v, nv, request.principal()),
        }
    }
}

#[cfg(test)]
mod tests;
