//! `GET /policy/check?from=...&to=...`: what the policy engine would decide for a connection,
//! and which policy and rule decide it (`ferry policy check`).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use serde_json::{Value, json};

use crate::{
    identity::SpiffeId,
    policy::{Request, Verdict},
    state::State,
};

/// `from`: `namespace/serviceaccount` (an mTLS identity) or an IP (the workload there, with its
/// identity if it is meshed; plaintext otherwise). `to`: `ip:port` or `namespace/name:port`.
/// `from_node`: whether an address is one of this node's own.
pub(super) fn run(
    state: &State,
    q: &BTreeMap<String, String>,
    from_node: impl Fn(IpAddr) -> bool,
) -> Result<Value, String> {
    let from = q.get("from").ok_or("missing from=<namespace/serviceaccount or ip>")?;
    let to = q.get("to").ok_or("missing to=<ip:port or namespace/name:port>")?;

    let (src_ip, src_identity) = match from.parse::<IpAddr>() {
        Ok(ip) => {
            let identity =
                state.workload_by_ip(ip).filter(|w| w.meshed).map(|w| w.identity(&state.trust_domain));
            (ip, identity)
        }
        Err(_) => {
            let (ns, sa) = from
                .split_once('/')
                .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains('/'))
                .ok_or_else(|| format!("from={from:?}: want namespace/serviceaccount or an IP"))?;
            let identity = SpiffeId::new(&state.trust_domain, ns, sa);
            // Where a workload with that identity runs, use its address; else none in particular.
            let ip = state
                .workloads()
                .iter()
                .find(|w| w.identity(&state.trust_domain) == identity)
                .and_then(|w| w.preferred_ip())
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            (ip, Some(identity))
        }
    };

    let (target, port) = to.rsplit_once(':').ok_or_else(|| format!("to={to:?}: missing :port"))?;
    let port: u16 = port.parse().map_err(|_| format!("to={to:?}: bad port"))?;
    let (destination, ip) = match target.trim_matches(['[', ']']).parse::<IpAddr>() {
        Ok(ip) => {
            (state.workload_by_ip(ip).ok_or_else(|| format!("to={to:?}: no known workload has {ip}"))?, ip)
        }
        Err(_) => {
            let workload = state.workload_by_key(target).ok_or_else(|| {
                format!("to={to:?}: unknown workload {target:?}{}", name_hint(state, target))
            })?;
            let ip = workload
                .preferred_ip()
                .ok_or_else(|| format!("to={to:?}: {} has no address", workload.key()))?;
            (workload, ip)
        }
    };
    let dst = SocketAddr::new(ip, port);

    let decision = state.policies.evaluate(&Request {
        src_ip,
        src_identity: src_identity.as_ref(),
        dst_ip: dst.ip(),
        dst_port: port,
        dst_namespace: &destination.namespace,
        dst_labels: &destination.labels,
        node_exempt: state.node_traffic.exempts(src_identity.is_none() && from_node(src_ip)),
    });
    let verdict = |v: Verdict| if v == Verdict::Allow { "allow" } else { "deny" };
    Ok(json!({
        "verdict": verdict(decision.verdict),
        "policy": decision.reason.policy,
        "rule": decision.reason.rule,
        "explanation": decision.to_string(),
        "dry_run": decision.dry_run.as_ref().map(|(v, reason)| json!({
            "verdict": verdict(*v),
            "policy": reason.policy,
            "rule": reason.rule,
        })),
        "source": { "ip": src_ip, "identity": src_identity.map(|i| i.to_string()) },
        "destination": {
            "workload": destination.key(),
            "address": dst,
            "identity": destination.identity(&state.trust_domain).to_string(),
            "meshed": destination.meshed,
        },
    }))
}

/// For a workload named without its namespace: the workloads it may mean.
fn name_hint(state: &State, target: &str) -> String {
    if target.contains('/') {
        return String::new();
    }
    let keys: Vec<String> = state.workloads().iter().filter(|w| w.name == target).map(|w| w.key()).collect();
    if keys.is_empty() {
        "; name a workload as namespace/name".into()
    } else {
        format!("; did you mean {}?", keys.join(" or "))
    }
}
