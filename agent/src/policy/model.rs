//! The AuthorizationPolicy schema, as Istio's `security.istio.io/v1` has it (L4 subset enforced,
//! L7 fields accepted so existing policies parse unchanged), and its compilation into [`Policy`].

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use super::{Action, Policy, ROOT_NAMESPACE, Rule, StringMatch};

/// A whole policy object: the static config's `policies[]` entries and the CRD objects.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: Spec,
}

/// Kubernetes object metadata; fields beyond these (uid, resourceVersion, ...) are ignored so
/// objects exported from a cluster load as they are.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    "default".to_owned()
}

/// The policy's spec. Also the schema of Ferry's CRD (`ferry crd` prints it): group `ferry.dev`,
/// kind `AuthorizationPolicy`, the same fields as Istio's `security.istio.io/v1`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema, CustomResource)]
#[kube(
    group = "ferry.dev",
    version = "v1",
    kind = "AuthorizationPolicy",
    root = "AuthorizationPolicyResource",
    namespaced,
    shortname = "ap"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub action: ActionSpec,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    /// Only with CUSTOM, which Ferry rejects (so the CRD has no such field).
    #[serde(default)]
    #[schemars(skip)]
    pub provider: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum ActionSpec {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default)]
    pub from: Vec<FromSpec>,
    #[serde(default)]
    pub to: Vec<ToSpec>,
    #[serde(default)]
    pub when: Vec<ConditionSpec>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FromSpec {
    #[serde(default)]
    pub source: SourceSpec,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceSpec {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default, deserialize_with = "ip_blocks")]
    #[schemars(with = "Vec<String>")]
    pub ip_blocks: Vec<IpNet>,
    #[serde(default, deserialize_with = "ip_blocks")]
    #[schemars(with = "Vec<String>")]
    pub not_ip_blocks: Vec<IpNet>,
    // L7 (JWT, X-Forwarded-For): accepted, never enforceable at L4.
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToSpec {
    #[serde(default)]
    pub operation: OperationSpec,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperationSpec {
    /// Strings in the CRD, as Istio's; numbers accepted in the static file.
    #[serde(default, deserialize_with = "ports")]
    #[schemars(with = "Vec<String>")]
    pub ports: Vec<u16>,
    #[serde(default, deserialize_with = "ports")]
    #[schemars(with = "Vec<String>")]
    pub not_ports: Vec<u16>,
    // L7: accepted, never enforceable at L4.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConditionSpec {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// Ports as Istio writes them (strings) or as numbers.
fn ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Port {
        Number(u16),
        Text(String),
    }
    Vec::<Port>::deserialize(d)?
        .into_iter()
        .map(|p| match p {
            Port::Number(n) => Ok(n),
            Port::Text(t) => t.parse().map_err(|_| serde::de::Error::custom(format!("invalid port {t:?}"))),
        })
        .collect()
}

/// Addresses or CIDRs; a bare address is a /32 (/128).
fn ip_blocks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?.iter().map(|s| parse_block(s).map_err(serde::de::Error::custom)).collect()
}

pub(super) fn parse_block(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("invalid IP block {s:?}"))
}

/// Keys of `when` conditions that L4 can evaluate.
const L4_KEYS: &[&str] =
    &["source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"];

impl AuthorizationPolicy {
    /// Checks and compiles the policy, mesh-wide if in Ferry's root namespace. Errors name the
    /// field.
    pub fn compile(&self) -> Result<Policy, String> {
        self.compile_with_root(ROOT_NAMESPACE)
    }

    /// Like [`AuthorizationPolicy::compile`], mesh-wide if in `root_namespace` (Istio's, for
    /// objects of Istio's CRD).
    pub fn compile_with_root(&self, root_namespace: &str) -> Result<Policy, String> {
        let action = match self.spec.action {
            ActionSpec::Allow => Action::Allow,
            ActionSpec::Deny => Action::Deny,
            ActionSpec::Audit => Action::Audit,
            ActionSpec::Custom => {
                return Err("spec.action: CUSTOM (external authorization) is not supported".into());
            }
        };
        if self.spec.provider.is_some() {
            return Err("spec.provider: only valid with CUSTOM, which is not supported".into());
        }
        let dry_run = ["ferry.dev/dry-run", "istio.io/dry-run"]
            .iter()
            .any(|k| self.metadata.annotations.get(*k).is_some_and(|v| v.eq_ignore_ascii_case("true")));
        let mut warnings = Vec::new();
        let mut rules = Vec::new();
        for (i, rule) in self.spec.rules.iter().enumerate() {
            let compiled = compile_rule(rule).map_err(|e| format!("spec.rules[{i}].{e}"))?;
            if !compiled.l7_fields.is_empty() {
                let effect = match action {
                    Action::Deny => "this DENY rule is enforced on its L4 conditions alone (fail closed)",
                    _ => "this rule matches nothing",
                };
                warnings.push(format!(
                    "rules[{i}] uses L7 fields ({}) that cannot be enforced at L4: {effect}",
                    compiled.l7_fields.join(", ")
                ));
            }
            rules.push(compiled);
        }
        Ok(Policy {
            name: self.metadata.name.clone(),
            namespace: self.metadata.namespace.clone(),
            mesh_wide: self.metadata.namespace == root_namespace,
            selector: self.spec.selector.as_ref().map(|s| s.match_labels.clone()),
            action,
            dry_run,
            rules,
            warnings,
        })
    }
}

fn compile_rule(rule: &RuleSpec) -> Result<Rule, String> {
    let mut l7_fields: Vec<&'static str> = Vec::new();
    let mut note = |present: bool, name: &'static str| {
        if present && !l7_fields.contains(&name) {
            l7_fields.push(name);
        }
    };
    for from in &rule.from {
        let s = &from.source;
        note(!s.request_principals.is_empty() || !s.not_request_principals.is_empty(), "requestPrincipals");
        note(!s.remote_ip_blocks.is_empty() || !s.not_remote_ip_blocks.is_empty(), "remoteIpBlocks");
    }
    for to in &rule.to {
        let o = &to.operation;
        note(!o.hosts.is_empty() || !o.not_hosts.is_empty(), "hosts");
        note(!o.methods.is_empty() || !o.not_methods.is_empty(), "methods");
        note(!o.paths.is_empty() || !o.not_paths.is_empty(), "paths");
    }
    let mut when = Vec::new();
    for (i, c) in rule.when.iter().enumerate() {
        if L4_KEYS.contains(&c.key.as_str()) {
            when.push(compile_condition(c).map_err(|e| format!("when[{i}].{e}"))?);
        } else if c.key.starts_with("request.")
            || c.key.starts_with("experimental.")
            || c.key == "connection.sni"
        {
            note(true, "when (L7 keys)");
        } else {
            return Err(format!("when[{i}].key: unknown key {:?}", c.key));
        }
    }
    Ok(Rule {
        from: rule
            .from
            .iter()
            .map(|f| super::Source {
                principals: f.source.principals.iter().map(|p| StringMatch::new(p)).collect(),
                not_principals: f.source.not_principals.iter().map(|p| StringMatch::new(p)).collect(),
                namespaces: f.source.namespaces.iter().map(|p| StringMatch::new(p)).collect(),
                not_namespaces: f.source.not_namespaces.iter().map(|p| StringMatch::new(p)).collect(),
                ip_blocks: f.source.ip_blocks.clone(),
                not_ip_blocks: f.source.not_ip_blocks.clone(),
            })
            .collect(),
        to: rule
            .to
            .iter()
            .map(|t| super::Operation {
                ports: t.operation.ports.clone(),
                not_ports: t.operation.not_ports.clone(),
            })
            .collect(),
        when,
        l7_fields,
    })
}

fn compile_condition(c: &ConditionSpec) -> Result<super::Condition, String> {
    use super::Condition;
    let blocks = |values: &[String]| values.iter().map(|v| parse_block(v)).collect::<Result<Vec<_>, _>>();
    let ports = |values: &[String]| {
        values
            .iter()
            .map(|v| v.parse::<u16>().map_err(|_| format!("invalid port {v:?}")))
            .collect::<Result<Vec<_>, _>>()
    };
    let strings = |values: &[String]| values.iter().map(|v| StringMatch::new(v)).collect::<Vec<_>>();
    Ok(match c.key.as_str() {
        "source.ip" => Condition::SourceIp(blocks(&c.values).map_err(v)?, blocks(&c.not_values).map_err(nv)?),
        "destination.ip" => {
            Condition::DestinationIp(blocks(&c.values).map_err(v)?, blocks(&c.not_values).map_err(nv)?)
        }
        "destination.port" => {
            Condition::DestinationPort(ports(&c.values).map_err(v)?, ports(&c.not_values).map_err(nv)?)
        }
        "source.namespace" => Condition::SourceNamespace(strings(&c.values), strings(&c.not_values)),
        _ => Condition::SourcePrincipal(strings(&c.values), strings(&c.not_values)),
    })
}

fn v(e: String) -> String {
    format!("values: {e}")
}
fn nv(e: String) -> String {
    format!("notValues: {e}")
}
