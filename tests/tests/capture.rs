//! End-to-end capture and proxying through real agents, in real network namespaces.

use std::{net::SocketAddr, time::Duration};

use ferry_sandbox::{ConnectOutcome, PodSpec, Sandbox};

fn two_nodes(label: &str) -> Sandbox {
    Sandbox::new(
        label,
        &[
            (
                "node1",
                vec![
                    PodSpec::meshed("a", "sa-a"),
                    PodSpec::meshed("b", "sa-b"),
                    PodSpec::unmeshed("u"),
                ],
            ),
            ("node2", vec![PodSpec::meshed("c", "sa-c")]),
        ],
    )
    .expect("sandbox")
}

fn addr(sandbox: &Sandbox, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::from((sandbox.pod(pod).ip, port))
}

#[test]
fn cross_node_connection_goes_through_both_agents() {
    let mut sb = two_nodes("xnode");
    sb.start_agent("node1", None).unwrap();
    sb.start_agent("node2", None).unwrap();
    let server = sb.pod("c").serve(8080).unwrap();
    let outcome = sb.pod("a").connect(addr(&sb, "c", 8080), 200_000).unwrap();
    assert_eq!(
        outcome,
        ConnectOutcome::Echoed {
            peer: addr(&sb, "c", 8080),
            bytes: 200_000
        },
        "{}",
        sb.agent_log("node1")
    );
    let accepted = server.wait_accepted(1, Duration::from_secs(2));
    // Delivered by node2's agent from inside pod c: the app sees a local peer.
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].ip(), sb.pod("c").ip, "{accepted:?}");
    assert_eq!(
        sb.metric("node1", "ferry_datapath_events_total{event=\"redirected\"}")
            .unwrap(),
        1.0
    );
    assert_eq!(
        sb.metric(
            "node2",
            "ferry_datapath_events_total{event=\"inbound_steered\"}"
        )
        .unwrap(),
        1.0
    );
    println!("{}", sb.agent_log("node1"));
}
