//! Policy parsing and evaluation: any policy text that parses must evaluate without panicking,
//! for a request made from the input's first bytes.
#![no_main]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use ferry::{
    identity::SpiffeId,
    policy::{AuthorizationPolicy, PolicySet, Request},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (head, rest) = data.split_at(8);
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let Ok(policies) = serde_yaml::from_str::<Vec<AuthorizationPolicy>>(text) else { return };
    let compiled: Vec<_> = policies.iter().filter_map(|p| p.compile().ok()).collect();
    let set = PolicySet::new(compiled);
    let identity = SpiffeId::new("cluster.local", if head[6] & 1 == 0 { "shop" } else { "bank" }, "sa");
    let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    let request = Request {
        src_ip: IpAddr::V4(Ipv4Addr::new(head[0], head[1], head[2], head[3])),
        src_identity: (head[6] & 2 == 0).then_some(&identity),
        dst_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, head[7])),
        dst_port: u16::from_be_bytes([head[4], head[5]]),
        dst_namespace: "shop",
        dst_labels: &labels,
        node_exempt: head[6] & 4 != 0,
    };
    let decision = set.evaluate(&request);
    let _ = decision.to_string();
});
