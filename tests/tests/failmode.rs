//! What happens when an agent dies: fail-closed (default) keeps capture pinned so meshed pods
//! cannot bypass the mesh, and a restarted agent takes over without manual steps; fail-open lets
//! pods talk directly.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use ferry_sandbox::{ConnectOutcome, Sandbox, bpf_pin_root};

const PORT: u16 = 8080;

fn addr(sb: &Sandbox, pod: &str) -> SocketAddr {
    SocketAddr::from((sb.pod(pod).ip, PORT))
}

/// Links pinned by the node's agent (they outlive it).
fn pins(sb: &Sandbox, node: &str) -> usize {
    std::fs::read_dir(bpf_pin_root(&sb.id).join(node).join("links")).map(|d| d.count()).unwrap_or(0)
}

/// Maps pinned by the node's agent (shared with the next agent), of any layout version.
fn pinned_maps(sb: &Sandbox, node: &str) -> usize {
    let versions = std::fs::read_dir(bpf_pin_root(&sb.id).join(node).join("maps")).into_iter().flatten();
    versions.flatten().map(|v| std::fs::read_dir(v.path()).map(|d| d.count()).unwrap_or(0)).sum()
}

#[test]
fn killed_agent_fails_closed_and_a_new_agent_takes_over() {
    let mut sb = Sandbox::two_nodes("failclosed").unwrap();
    // Dual-stack, so that neither family leaks.
    let node1 = sb.dual_stack_config_for("node1");
    sb.start_agent("node1", Some(&node1)).unwrap();
    sb.start_agent("node2", Some(&sb.dual_stack_config_for("node2"))).unwrap();
    let (a_v6, c_v6) = (SocketAddr::from((sb.pod("a").ip6, PORT)), SocketAddr::from((sb.pod("c").ip6, PORT)));
    let _server_c = sb.pod("c").serve(PORT).unwrap();
    let _server_a = sb.pod("a").serve(PORT).unwrap();
    assert!(matches!(sb.pod("a").connect(addr(&sb, "c"), 10).unwrap(), ConnectOutcome::Echoed { .. }));
    assert_eq!(pins(&sb, "node1"), 12, "6 links for each of a and b");
    assert_eq!(pinned_maps(&sb, "node1"), 7);

    sb.kill_agent("node1").unwrap();
    // Outbound: still captured, nothing listens: refused at once, nothing leaves in clear.
    let started = Instant::now();
    let outcome = sb.pod("a").connect(addr(&sb, "c"), 10).unwrap();
    assert_eq!(outcome, ConnectOutcome::Refused);
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    assert_eq!(sb.pod("a").connect(c_v6, 10).unwrap(), ConnectOutcome::Refused);
    // Inbound plaintext to a meshed pod is not delivered around the agent: sk_lookup fails the
    // lookup, so the kernel refuses the connection although a's app listens.
    assert_eq!(sb.pod("u").connect(addr(&sb, "a"), 10).unwrap(), ConnectOutcome::Refused);
    assert_eq!(sb.pod("u").connect(a_v6, 10).unwrap(), ConnectOutcome::Refused);

    // A new agent takes over: traffic flows again and no stale link is left behind.
    sb.start_agent("node1", Some(&node1)).unwrap();
    assert!(matches!(sb.pod("a").connect(addr(&sb, "c"), 10).unwrap(), ConnectOutcome::Echoed { .. }));
    assert!(matches!(sb.pod("u").connect(addr(&sb, "a"), 10).unwrap(), ConnectOutcome::Echoed { .. }));
    assert!(matches!(sb.pod("u").connect(a_v6, 10).unwrap(), ConnectOutcome::Echoed { .. }));
    assert_eq!(pins(&sb, "node1"), 12);
    // The new agent shares the maps: counters go on from the dead agent's (first connect, the
    // two refused while no agent ran, and the last one).
    assert_eq!(pinned_maps(&sb, "node1"), 7);
    assert_eq!(sb.metric("node1", "ferry_datapath_events_total{event=\"redirected\"}").unwrap(), 4.0);

    // A clean stop detaches everything: pods talk directly.
    assert!(sb.stop_agent("node1").unwrap().success());
    assert_eq!((pins(&sb, "node1"), pinned_maps(&sb, "node1")), (0, 0));
    assert!(matches!(sb.pod("a").connect(addr(&sb, "c"), 10).unwrap(), ConnectOutcome::Echoed { .. }));
}

#[test]
fn killed_agent_fails_open_when_configured() {
    let mut sb = Sandbox::two_nodes("failopen").unwrap();
    let config = sb.config_for("node1").replacen('\n', "\nfailMode: open\n", 1);
    sb.start_agent("node1", Some(&config)).unwrap();
    let _server = sb.pod("b").serve(PORT).unwrap();
    assert_eq!(pins(&sb, "node1"), 0);
    sb.kill_agent("node1").unwrap();
    let outcome = sb.pod("a").connect(addr(&sb, "b"), 10).unwrap();
    assert_eq!(outcome, ConnectOutcome::Echoed { peer: addr(&sb, "b"), bytes: 10 });
}
