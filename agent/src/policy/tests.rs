//! Table-driven tests of the policy semantics, with policies written as users write them (YAML).

use std::collections::BTreeMap;

use super::*;

fn policies(yaml: &str) -> PolicySet {
    let parsed: Vec<AuthorizationPolicy> = serde_yaml::from_str(yaml).expect("test policy YAML");
    PolicySet::new(parsed.iter().map(|p| p.compile().expect("compiles")).collect())
}

struct Case {
    name: &'static str,
    /// Source identity as `ns/sa` in trust domain cluster.local, or None for plaintext.
    from: Option<&'static str>,
    src_ip: &'static str,
    port: u16,
    allowed: bool,
}

const fn case(
    name: &'static str,
    from: Option<&'static str>,
    src_ip: &'static str,
    port: u16,
    allowed: bool,
) -> Case {
    Case { name, from, src_ip, port, allowed }
}

/// Evaluates each case against a destination `shop/web` (labels app=web) at 10.0.0.10.
fn run(policy_yaml: &str, cases: &[Case]) {
    run_set(&policies(policy_yaml), cases);
}

fn run_set(set: &PolicySet, cases: &[Case]) {
    let labels: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
    for c in cases {
        let identity = c.from.map(|f| {
            let (ns, sa) = f.split_once('/').unwrap();
            SpiffeId::new("cluster.local", ns, sa)
        });
        let request = Request {
            src_ip: c.src_ip.parse().unwrap(),
            src_identity: identity.as_ref(),
            dst_ip: "10.0.0.10".parse().unwrap(),
            dst_port: c.port,
            dst_namespace: "shop",
            dst_labels: &labels,
            node_exempt: false,
        };
        let decision = set.evaluate(&request);
        assert_eq!(decision.verdict == Verdict::Allow, c.allowed, "case {:?}: {decision}", c.name);
    }
}

/// A plaintext connection from 10.1.0.1 to port 80 of a workload in `shop`.
fn plaintext_to_shop(labels: &BTreeMap<String, String>) -> Request<'_> {
    Request {
        src_ip: "10.1.0.1".parse().unwrap(),
        src_identity: None,
        dst_ip: "10.0.0.10".parse().unwrap(),
        dst_port: 80,
        dst_namespace: "shop",
        dst_labels: labels,
        node_exempt: false,
    }
}

#[test]
fn no_policies_allow_everything() {
    run(
        "[]",
        &[case("plaintext", None, "10.1.0.1", 80, true), case("mtls", Some("a/b"), "10.1.0.1", 80, true)],
    );
}

#[test]
fn allow_nothing_and_allow_all() {
    // An ALLOW policy with no rules matches nothing: everyone is denied.
    run(
        "[{metadata: {name: allow-nothing, namespace: shop}, spec: {}}]",
        &[case("any", Some("shop/client"), "10.1.0.1", 80, false)],
    );
    // One empty rule matches everything.
    run(
        "[{metadata: {name: allow-all, namespace: shop}, spec: {rules: [{}]}}]",
        &[case("any", None, "10.1.0.1", 80, true)],
    );
    // DENY with no rules matches nothing; DENY with an empty rule denies all.
    run(
        "[{metadata: {name: d, namespace: shop}, spec: {action: DENY}}]",
        &[case("any", None, "10.1.0.1", 80, true)],
    );
    run(
        "[{metadata: {name: d, namespace: shop}, spec: {action: DENY, rules: [{}]}}]",
        &[case("any", None, "10.1.0.1", 80, false)],
    );
}

#[test]
fn deny_wins_over_allow() {
    run(
        "
- metadata: {name: allow-all, namespace: shop}
  spec: {rules: [{}]}
- metadata: {name: deny-bad, namespace: shop}
  spec:
    action: DENY
    rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/bad]}}]}]
",
        &[
            case("bad", Some("shop/bad"), "10.1.0.1", 80, false),
            case("good", Some("shop/good"), "10.1.0.1", 80, true),
        ],
    );
}

#[test]
fn principals_with_wildcards_and_negation() {
    let yaml = |principals: &str| {
        format!(
            "[{{metadata: {{name: p, namespace: shop}}, spec: {{rules: [{{from: [{{source: {principals}}}]}}]}}}}]"
        )
    };
    run(
        &yaml("{principals: ['*']}"),
        &[
            case("any identity", Some("x/y"), "10.1.0.1", 80, true),
            case("plaintext", None, "10.1.0.1", 80, false),
        ],
    );
    run(
        &yaml("{principals: ['cluster.local/ns/shop/*']}"),
        &[
            case("prefix", Some("shop/any"), "10.1.0.1", 80, true),
            case("other ns", Some("bank/any"), "10.1.0.1", 80, false),
        ],
    );
    run(
        &yaml("{principals: ['*/sa/admin']}"),
        &[
            case("suffix", Some("bank/admin"), "10.1.0.1", 80, true),
            case("not admin", Some("bank/x"), "10.1.0.1", 80, false),
        ],
    );
    run(
        &yaml("{notPrincipals: ['cluster.local/ns/shop/sa/bad']}"),
        &[
            case("not excluded", Some("shop/good"), "10.1.0.1", 80, true),
            case("excluded", Some("shop/bad"), "10.1.0.1", 80, false),
            case("plaintext passes a negative list", None, "10.1.0.1", 80, true),
        ],
    );
}

#[test]
fn namespaces_and_ip_blocks() {
    run(
        "[{metadata: {name: p, namespace: shop}, spec: {rules: [{from: [{source: {namespaces: [shop, 'team-*']}}]}]}}]",
        &[
            case("same ns", Some("shop/a"), "10.1.0.1", 80, true),
            case("prefix ns", Some("team-blue/a"), "10.1.0.1", 80, true),
            case("other ns", Some("bank/a"), "10.1.0.1", 80, false),
            case("plaintext has no namespace", None, "10.1.0.1", 80, false),
        ],
    );
    run(
        "[{metadata: {name: p, namespace: shop}, spec: {rules: [{from: [{source: {ipBlocks: [10.1.0.0/16], notIpBlocks: [10.1.9.9]}}]}]}}]",
        &[
            case("in block", None, "10.1.2.3", 80, true),
            case("excluded address", None, "10.1.9.9", 80, false),
            case("outside", None, "10.2.0.1", 80, false),
        ],
    );
    run(
        "[{metadata: {name: p, namespace: shop}, spec: {rules: [{from: [{source: {ipBlocks: ['fd00:1::/64', 10.1.0.0/16], notIpBlocks: ['fd00:1::9']}}]}]}}]",
        &[
            case("IPv6 in block", None, "fd00:1::3", 80, true),
            case("IPv6 excluded address", None, "fd00:1::9", 80, false),
            case("IPv6 outside", None, "fd00:2::3", 80, false),
            case("IPv4 in block", None, "10.1.2.3", 80, true),
            case("IPv4-mapped is not IPv6 in the block", None, "::ffff:10.1.2.3", 80, false),
        ],
    );
    run(
        "[{metadata: {name: p, namespace: shop}, spec: {rules: [{from: [{source: {notNamespaces: [bank]}}]}]}}]",
        &[
            case("bank", Some("bank/a"), "10.1.0.1", 80, false),
            case("shop", Some("shop/a"), "10.1.0.1", 80, true),
        ],
    );
}

#[test]
fn ports_and_multiple_from_entries() {
    run(
        "
- metadata: {name: p, namespace: shop}
  spec:
    rules:
      - from: [{source: {namespaces: [shop]}}, {source: {ipBlocks: [192.168.0.0/16]}}]
        to: [{operation: {ports: ['8080', 9090]}}]
      - to: [{operation: {notPorts: ['8080', '9090', '22']}}]
",
        &[
            case("shop on 8080", Some("shop/a"), "10.1.0.1", 8080, true),
            case("block on 9090", None, "192.168.1.1", 9090, true),
            case("other source on 8080", Some("bank/a"), "10.1.0.1", 8080, false),
            case("anyone on 443", None, "10.1.0.1", 443, true),
            case("anyone on 22", None, "10.1.0.1", 22, false),
        ],
    );
}

#[test]
fn when_conditions_all_must_hold() {
    run(
        "
- metadata: {name: p, namespace: shop}
  spec:
    rules:
      - when:
          - {key: source.ip, values: [10.1.0.0/16]}
          - {key: destination.port, notValues: ['22']}
          - {key: source.principal, values: ['cluster.local/ns/shop/*']}
",
        &[
            case("all hold", Some("shop/a"), "10.1.0.1", 80, true),
            case("wrong port", Some("shop/a"), "10.1.0.1", 22, false),
            case("wrong ip", Some("shop/a"), "10.2.0.1", 80, false),
            case("no principal", None, "10.1.0.1", 80, false),
        ],
    );
    run(
        "[{metadata: {name: p, namespace: shop}, spec: {rules: [{when: [{key: source.namespace, notValues: [bank]}, {key: destination.ip, values: [10.0.0.0/24]}]}]}}]",
        &[
            case("shop", Some("shop/a"), "10.1.0.1", 80, true),
            case("bank", Some("bank/a"), "10.1.0.1", 80, false),
        ],
    );
}

#[test]
fn scope_by_namespace_selector_and_root() {
    // Other namespace: does not apply. Non-matching selector: does not apply.
    run(
        "
- metadata: {name: elsewhere, namespace: bank}
  spec: {}
- metadata: {name: other-app, namespace: shop}
  spec: {selector: {matchLabels: {app: db}}}
",
        &[case("unaffected", None, "10.1.0.1", 80, true)],
    );
    // Matching selector applies.
    run(
        "[{metadata: {name: web-only, namespace: shop}, spec: {selector: {matchLabels: {app: web}}}}]",
        &[case("selected", None, "10.1.0.1", 80, false)],
    );
    // Root namespace: mesh-wide.
    run(
        "[{metadata: {name: mesh-deny, namespace: ferry-system}, spec: {action: DENY, rules: [{to: [{operation: {ports: ['23']}}]}]}}]",
        &[case("telnet", None, "10.1.0.1", 23, false), case("http", None, "10.1.0.1", 80, true)],
    );
}

#[test]
fn l7_rules_fail_closed() {
    // ALLOW with an L7-only rule matches nothing (and the policy still applies: deny).
    run(
        "[{metadata: {name: a, namespace: shop}, spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}}]",
        &[case("http get", Some("shop/a"), "10.1.0.1", 80, false)],
    );
    // DENY with an L7 rule denies its L4 part.
    run(
        "[{metadata: {name: d, namespace: shop}, spec: {action: DENY, rules: [{from: [{source: {namespaces: [bank]}}], to: [{operation: {paths: [/admin]}}]}]}}]",
        &[
            case("bank", Some("bank/a"), "10.1.0.1", 80, false),
            case("shop", Some("shop/a"), "10.1.0.1", 80, true),
        ],
    );
    let set = policies(
        "[{metadata: {name: a, namespace: shop}, spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}}]",
    );
    assert!(set.policies()[0].warnings[0].contains("methods"), "{:?}", set.policies()[0].warnings);
}

#[test]
fn dry_run_reports_without_enforcing() {
    let set = policies(
        "[{metadata: {name: would-deny, namespace: shop, annotations: {ferry.dev/dry-run: 'true'}}, spec: {action: DENY, rules: [{}]}}]",
    );
    let labels = BTreeMap::new();
    let request = plaintext_to_shop(&labels);
    let decision = set.evaluate(&request);
    assert_eq!(decision.verdict, Verdict::Allow);
    let (shadow, reason) = decision.dry_run.expect("dry-run verdict reported");
    assert_eq!(shadow, Verdict::Deny);
    assert_eq!(reason.policy.as_deref(), Some("shop/would-deny"));
    // Istio's annotation works too; AUDIT never decides.
    let set = policies(
        "
- metadata: {name: d, namespace: shop, annotations: {istio.io/dry-run: 'true'}}
  spec: {action: DENY, rules: [{}]}
- metadata: {name: audit, namespace: shop}
  spec: {action: AUDIT, rules: [{}]}
",
    );
    let decision = set.evaluate(&request);
    assert_eq!((decision.verdict, decision.dry_run.map(|d| d.0)), (Verdict::Allow, Some(Verdict::Deny)));
}

#[test]
fn decision_names_policy_and_rule() {
    let set = policies(
        "[{metadata: {name: d, namespace: shop}, spec: {action: DENY, rules: [{to: [{operation: {ports: ['1']}}]}, {}]}}]",
    );
    let labels = BTreeMap::new();
    let request = plaintext_to_shop(&labels);
    let decision = set.evaluate(&request);
    assert_eq!(decision.reason.policy.as_deref(), Some("shop/d"));
    assert_eq!(decision.reason.rule, Some(1));
    assert_eq!(decision.to_string(), "denied: matched a DENY policy (shop/d rule 1)");
}

#[test]
fn bad_policies_name_the_field() {
    let compile = |yaml: &str| {
        let parsed: Result<AuthorizationPolicy, _> = serde_yaml::from_str(yaml);
        match parsed {
            Ok(p) => p.compile().map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    };
    let err = compile("{metadata: {name: x}, spec: {action: MAYBE}}").unwrap_err();
    assert!(err.contains("MAYBE"), "{err}");
    let err =
        compile("{metadata: {name: x}, spec: {rules: [{from: [{source: {ipBlocks: [10.0.0.300/8]}}]}]}}")
            .unwrap_err();
    assert!(err.contains("invalid IP block"), "{err}");
    let err =
        compile("{metadata: {name: x}, spec: {rules: [{to: [{operation: {ports: [http]}}]}]}}").unwrap_err();
    assert!(err.contains("invalid port"), "{err}");
    let err = compile("{metadata: {name: x}, spec: {rules: [{when: [{key: source.color, values: [red]}]}]}}")
        .unwrap_err();
    assert_eq!(err, "spec.rules[0].when[0].key: unknown key \"source.color\"");
    let err = compile("{metadata: {name: x}, spec: {action: CUSTOM}}").unwrap_err();
    assert!(err.contains("CUSTOM"), "{err}");
    let err = compile("{metadata: {name: x}, spec: {rulez: []}}").unwrap_err();
    assert!(err.contains("unknown field `rulez`"), "{err}");
}

#[test]
fn istio_policy_parses_unchanged() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: shop
  uid: 1b2c3d
  resourceVersion: "42"
spec:
  selector:
    matchLabels:
      app: web
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/sleep"]
    to:
    - operation:
        ports: ["8080"]
"#;
    let policy: AuthorizationPolicy = serde_yaml::from_str(yaml).unwrap();
    let compiled = policy.compile().unwrap();
    assert_eq!(compiled.key(), "shop/httpbin");
    assert!(compiled.warnings.is_empty());
    run_set(
        &PolicySet::new(vec![compiled]),
        &[
            case("sleep", Some("shop/sleep"), "10.1.0.1", 8080, true),
            case("other", Some("shop/x"), "10.1.0.1", 8080, false),
        ],
    );
}

#[test]
fn the_nodes_own_traffic_is_exempt_only_when_marked_so() {
    // An ALLOW policy for one identity and a DENY for everything on port 80: plaintext from the
    // node (the kubelet's probes) gets through only as exempt.
    let set = policies(
        "
- metadata: {name: only-frontend, namespace: shop}
  spec: {action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]}]}
- metadata: {name: no-80, namespace: shop}
  spec: {action: DENY, rules: [{to: [{operation: {ports: ['80']}}]}]}
",
    );
    let labels = BTreeMap::new();
    let mut request = plaintext_to_shop(&labels);
    assert_eq!(set.evaluate(&request).verdict, Verdict::Deny);
    request.node_exempt = true;
    let decision = set.evaluate(&request);
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!((decision.reason.policy, decision.dry_run), (None, None));
}
