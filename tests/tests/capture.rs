//! End-to-end capture and proxying through real agents, in real network namespaces.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ferry_sandbox::{ConnectOutcome, Pod, Sandbox, Server, with_labels};

fn two_nodes(label: &str) -> Sandbox {
    Sandbox::two_nodes(label).expect("sandbox")
}

/// [`two_nodes`] with both agents running.
fn with_agents(label: &str) -> Sandbox {
    let mut sb = two_nodes(label);
    sb.start_agent("node1", None).unwrap();
    sb.start_agent("node2", None).unwrap();
    sb
}

/// The node's dual-stack config, with c labelled `app: c` for services and policies to select.
fn dual_stack_labelled_c(sb: &Sandbox, node: &str) -> String {
    with_labels(&sb.dual_stack_config_for(node), "c", "{app: c}")
}

fn addr(sandbox: &Sandbox, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::from((sandbox.pod(pod).ip, port))
}

#[test]
fn cross_node_connection_goes_through_both_agents() {
    let sb = with_agents("xnode");
    let server = sb.pod("c").serve(8080).unwrap();
    // Enough bytes for the relays to grow their buffers (HBONE reads, splice pipes) midway.
    let outcome = sb.pod("a").connect(addr(&sb, "c", 8080), BULK).unwrap();
    assert_eq!(
        outcome,
        ConnectOutcome::Echoed { peer: addr(&sb, "c", 8080), bytes: BULK },
        "{}",
        sb.agent_log("node1")
    );
    let accepted = server.wait_accepted(1, Duration::from_secs(2));
    // Delivered by node2's agent from inside pod c: the app sees a local peer.
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].ip(), sb.pod("c").ip, "{accepted:?}");
    assert_eq!(metric(&sb, "node1", REDIRECTED), 1.0);
    // Over HBONE: node1 dialed node2's 15008 (which sk_lookup leaves alone), one CONNECT stream.
    assert_eq!(metric(&sb, "node1", HBONE_CLIENT), 1.0);
    assert_eq!(metric(&sb, "node2", HBONE_SERVER), 1.0);
    assert_eq!(metric(&sb, "node2", INBOUND_HBONE), 1.0);
    assert_eq!(metric(&sb, "node2", STEERED), 0.0);
}

/// Serves with `serve` on b, c and u (port 2525), then connects from each client over each path
/// through the agents (same node, HBONE, inbound plaintext, passthrough) and checks that `hear`
/// gives `expected`.
fn heard_on_every_path(
    label: &str,
    serve: impl Fn(&Pod) -> anyhow::Result<Server>,
    hear: impl Fn(&Pod, SocketAddr) -> anyhow::Result<String>,
    expected: &str,
) -> Sandbox {
    let sb = with_agents(label);
    let _servers: Vec<_> = ["b", "c", "u"].map(|pod| serve(sb.pod(pod)).unwrap()).into();
    for (from, to, path) in [
        ("a", "b", "same node"),
        ("a", "c", "HBONE"),
        ("u", "c", "inbound plaintext"),
        ("a", "u", "passthrough"),
    ] {
        let heard = hear(sb.pod(from), addr(&sb, to, 2525)).unwrap();
        let logs = format!("{}\n{}", sb.agent_log("node1"), sb.agent_log("node2"));
        assert_eq!(heard, expected, "{from} -> {to} ({path})\n{logs}");
    }
    sb
}

/// Server-first protocols (SMTP, MySQL, SSH): the client says nothing until the server has
/// spoken, so no path may wait for the client's first bytes before it connects onwards.
#[test]
fn a_server_that_speaks_first_is_heard_on_every_path() {
    let greeted = "greeted 220 sandbox ready";
    let sb = heard_on_every_path(
        "greet",
        |pod| pod.serve_greeting(2525),
        |pod, to| pod.await_greeting(to),
        greeted,
    );
    // The four went through the agents, not around them.
    assert_eq!(metric(&sb, "node1", REDIRECTED), 3.0);
    assert_eq!(metric(&sb, "node2", INBOUND_HBONE), 1.0);
    assert_eq!(metric(&sb, "node2", STEERED), 1.0);
}

/// A server that fails mid-connection resets it: the client must see a reset, not an orderly
/// end it would take for a complete answer, and what the server sent before it.
#[test]
fn a_reset_from_the_server_reaches_the_client_as_a_reset() {
    let expected = "greeted 220 sandbox ready\nthen reset";
    heard_on_every_path(
        "abort",
        |pod| pod.serve_then_reset(2525),
        |pod, to| pod.await_greeting_to_end(to),
        expected,
    );
}

/// Java and .NET connect to IPv4 addresses through IPv6 sockets (`::ffff:a.b.c.d`), which connect4
/// never sees: connect6 captures them like IPv4, and getpeername6 hides the redirect.
#[test]
fn an_ipv6_socket_connecting_to_an_ipv4_address_is_captured_like_ipv4() {
    let sb = with_agents("mapped");
    let server = sb.pod("c").serve(8080).unwrap();
    let mapped = SocketAddr::from((sb.pod("c").ip.to_ipv6_mapped(), 8080));
    let outcome = sb.pod("a").connect(mapped, 100_000).unwrap();
    assert_eq!(outcome, ConnectOutcome::Echoed { peer: mapped, bytes: 100_000 }, "{}", sb.agent_log("node1"));
    assert_eq!(server.wait_accepted(1, Duration::from_secs(2))[0].ip(), sb.pod("c").ip);
    assert_eq!(metric(&sb, "node1", REDIRECTED), 1.0);
    assert_eq!(metric(&sb, "node1", HBONE_CLIENT), 1.0);
    assert_eq!(metric(&sb, "node2", INBOUND_HBONE), 1.0);
    assert_eq!(metric(&sb, "node2", STEERED), 0.0, "reached c in plaintext, around the tunnel");
}

/// The redirect is invisible to the app: its connection's peer is the original destination and
/// its own address the pod's, not loopback; for IPv4 sockets and IPv6 ones mapped alike.
#[test]
fn the_app_sees_its_own_address_and_the_original_peer() {
    let sb = with_agents("addrs");
    let _server = sb.pod("c").serve(8080).unwrap();
    let _local_server = sb.pod("b").serve(8080).unwrap();
    let pod_a = std::net::IpAddr::V4(sb.pod("a").ip);
    // Cross-node and same-node.
    for ip in [sb.pod("c").ip, sb.pod("b").ip] {
        for to in [SocketAddr::from((ip, 8080)), SocketAddr::from((ip.to_ipv6_mapped(), 8080))] {
            let (outcome, local) = sb.pod("a").connect_from(to, 10).unwrap();
            assert_eq!(outcome, ConnectOutcome::Echoed { peer: to, bytes: 10 });
            assert_eq!(local.ip().to_canonical(), pod_a, "own address of a connection to {to}");
        }
    }
    assert_eq!(metric(&sb, "node1", REDIRECTED), 4.0);
    assert_eq!(metric(&sb, "node1", "ferry_datapath_events_total{event=\"source_bind_failed\"}"), 0.0);
}

/// Bytes echoed through the proxy by the bulk cases: several times the relays' largest buffers.
const BULK: usize = 8 * 1024 * 1024;

fn metric(sb: &Sandbox, node: &str, series: &str) -> f64 {
    sb.metric(node, series).unwrap_or_else(|e| panic!("scraping {node}: {e}"))
}

const REDIRECTED: &str = "ferry_datapath_events_total{event=\"redirected\"}";
const STEERED: &str = "ferry_datapath_events_total{event=\"inbound_steered\"}";
const EXEMPT: &str = "ferry_datapath_events_total{event=\"exempt_by_mark\"}";
const HBONE_CLIENT: &str = "ferry_hbone_connections_opened_total{side=\"client\"}";
const HBONE_SERVER: &str = "ferry_hbone_connections_opened_total{side=\"server\"}";
const INBOUND_HBONE: &str = "ferry_proxy_connections_opened_total{direction=\"inbound\",route=\"hbone\"}";

#[test]
fn same_node_connection_is_proxied_once() {
    let mut sb = two_nodes("snode");
    sb.start_agent("node1", None).unwrap();
    let server = sb.pod("b").serve(8080).unwrap();
    let outcome = sb.pod("a").connect(addr(&sb, "b", 8080), BULK).unwrap();
    assert_eq!(outcome, ConnectOutcome::Echoed { peer: addr(&sb, "b", 8080), bytes: BULK });
    assert_eq!(server.wait_accepted(1, Duration::from_secs(2))[0].ip(), sb.pod("b").ip);
    assert_eq!(metric(&sb, "node1", REDIRECTED), 1.0);
    // Handed to b's inbound side inside the agent, not steered again through b's netns.
    assert_eq!(metric(&sb, "node1", STEERED), 0.0);
    assert_eq!(
        metric(
            &sb,
            "node1",
            "ferry_proxy_connections_opened_total{direction=\"outbound\",route=\"same_node\"}"
        ),
        1.0
    );
}

/// A workload whose capture fails (here its app holds 15008, which the agent needs in every
/// meshed pod) is reported where an operator looks, and tried again until captured.
#[test]
fn a_workload_whose_capture_fails_is_reported_and_tried_again() {
    let mut sb = two_nodes("capretry");
    let squatter = sb.pod("a").serve(15008).unwrap();
    let config = sb.config_for("node1");
    sb.start_agent_not_ready("node1", &config, &[], "1 local workload(s) not captured").unwrap();
    let status = sb.ferry_json("node1", &["status"]).unwrap();
    assert_eq!((&status["workloads_captured"], &status["workloads_uncaptured"]), (&1.into(), &1.into()));
    assert_eq!(status["not_ready"], "1 local workload(s) not captured");
    assert_eq!(metric(&sb, "node1", "ferry_workloads_uncaptured"), 1.0);
    let workloads = sb.ferry_json("node1", &["workloads"]).unwrap();
    let error = |name: &str| {
        workloads.as_array().unwrap().iter().find(|w| w["name"] == name).unwrap()["capture_error"].clone()
    };
    let reason = error("a");
    assert!(reason.as_str().is_some_and(|r| r.contains("0.0.0.0:15008") && r.contains("in use")), "{reason}");
    assert_eq!(error("b"), serde_json::Value::Null);
    // Meanwhile a's connections bypass its capture: b's inbound side still takes them.
    let server = sb.pod("b").serve(8080).unwrap();
    assert!(matches!(sb.pod("a").connect(addr(&sb, "b", 8080), 10).unwrap(), ConnectOutcome::Echoed { .. }));
    assert_eq!((metric(&sb, "node1", REDIRECTED), metric(&sb, "node1", STEERED)), (0.0, 1.0));

    // The retry after 1 s fails the same way: logged once, not at every retry.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        sb.agent_log("node1").matches("cannot capture workload").count(),
        1,
        "{}",
        sb.agent_log("node1")
    );
    drop(squatter);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sb.ferry_json("node1", &["status"]).unwrap()["workloads_captured"] != 2 {
        assert!(std::time::Instant::now() < deadline, "not captured again:\n{}", sb.agent_log("node1"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sb.node("node1").http_get(15021, "/healthz/ready").unwrap(), (200, "ready\n".into()));
    assert_eq!(metric(&sb, "node1", "ferry_workloads_uncaptured"), 0.0);
    assert!(matches!(sb.pod("a").connect(addr(&sb, "b", 8080), 10).unwrap(), ConnectOutcome::Echoed { .. }));
    assert_eq!(metric(&sb, "node1", REDIRECTED), 1.0);
    assert_eq!(server.wait_accepted(2, Duration::from_secs(2)).len(), 2);
}

#[test]
fn connection_counts_stay_exact_without_loops() {
    let sb = with_agents("exact");
    let server = sb.pod("c").serve(8080).unwrap();
    const N: usize = 20;
    for _ in 0..N {
        let outcome = sb.pod("a").connect(addr(&sb, "c", 8080), 1000).unwrap();
        assert!(matches!(outcome, ConnectOutcome::Echoed { bytes: 1000, .. }), "{outcome:?}");
    }
    assert_eq!(server.wait_accepted(N, Duration::from_secs(2)).len(), N);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(server.accepted().len(), N, "the app saw extra connections");
    assert_eq!(metric(&sb, "node1", REDIRECTED), N as f64);
    assert_eq!(metric(&sb, "node2", INBOUND_HBONE), N as f64);
    // Sequential connections reuse one pooled HBONE connection.
    assert_eq!(metric(&sb, "node1", HBONE_CLIENT), 1.0);
    assert_eq!(metric(&sb, "node2", REDIRECTED), 0.0, "the inbound agent's delivery was captured");
    assert_eq!(metric(&sb, "node1", EXEMPT) + metric(&sb, "node2", EXEMPT), 0.0);
}

#[test]
fn sockets_with_the_agent_mark_are_not_redirected() {
    let mut sb = two_nodes("mark");
    sb.start_agent("node1", None).unwrap();
    let server = sb.pod("b").serve(8080).unwrap();
    let outcome = sb.pod("a").connect_with(addr(&sb, "b", 8080), 10, &["--mark", "0x539"]).unwrap();
    assert_eq!(outcome, ConnectOutcome::Echoed { peer: addr(&sb, "b", 8080), bytes: 10 });
    assert_eq!(metric(&sb, "node1", EXEMPT), 1.0);
    assert_eq!(metric(&sb, "node1", REDIRECTED), 0.0);
    // Not redirected, but inbound to a meshed pod is still steered through b's agent side.
    assert_eq!(metric(&sb, "node1", STEERED), 1.0);
    assert_eq!(server.wait_accepted(1, Duration::from_secs(2)).len(), 1);
}

#[test]
fn unmeshed_pod_bypasses_the_agent() {
    let sb = with_agents("unmeshed");
    let server_u = sb.pod("u").serve(8080).unwrap();
    let server_c = sb.pod("c").serve(8080).unwrap();

    // From the unmeshed pod: nothing captures its outbound connection.
    let outcome = sb.pod("u").connect(addr(&sb, "c", 8080), 100).unwrap();
    assert_eq!(outcome, ConnectOutcome::Echoed { peer: addr(&sb, "c", 8080), bytes: 100 });
    assert_eq!(metric(&sb, "node1", REDIRECTED), 0.0);
    // The meshed destination still receives it through its agent (plaintext inbound).
    assert_eq!(metric(&sb, "node2", STEERED), 1.0);
    assert_eq!(server_c.wait_accepted(1, Duration::from_secs(2)).len(), 1);

    // To the unmeshed pod: captured at the source, passed through from the source pod's address.
    let outcome = sb.pod("a").connect(addr(&sb, "u", 8080), 100).unwrap();
    assert_eq!(outcome, ConnectOutcome::Echoed { peer: addr(&sb, "u", 8080), bytes: 100 });
    assert_eq!(server_u.wait_accepted(1, Duration::from_secs(2))[0].ip(), sb.pod("a").ip);
    assert_eq!(
        metric(
            &sb,
            "node1",
            "ferry_proxy_connections_opened_total{direction=\"outbound\",route=\"passthrough\"}"
        ),
        1.0
    );
}

#[test]
fn closed_destination_port_resets_promptly() {
    let sb = with_agents("refused");
    for (to, node) in [("c", "node2"), ("b", "node1"), ("u", "node1")] {
        let started = std::time::Instant::now();
        let outcome = sb.pod("a").connect(addr(&sb, to, 9999), 10).unwrap();
        // The app's connect() reached the proxy, so the refusal arrives as a reset.
        assert!(matches!(outcome, ConnectOutcome::Reset { .. }), "to {to}: {outcome:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "to {to}: took {:?}", started.elapsed());
        let failures: f64 = [("inbound", "unavailable"), ("outbound", "connect")]
            .iter()
            .map(|(direction, reason)| {
                let series = format!(
                    "ferry_proxy_connection_failures_total{{direction=\"{direction}\",reason=\"{reason}\"}}"
                );
                metric(&sb, node, &series)
            })
            .sum();
        assert!(failures >= 1.0, "to {to}: failure not counted on {node}");
    }
}

#[test]
fn pods_reach_each_other_directly_after_the_agents_stop() {
    let mut sb = with_agents("stop");
    let server = sb.pod("c").serve(8080).unwrap();
    assert!(matches!(sb.pod("a").connect(addr(&sb, "c", 8080), 10).unwrap(), ConnectOutcome::Echoed { .. }));
    assert_eq!(server.wait_accepted(1, Duration::from_secs(2))[0].ip(), sb.pod("c").ip);

    assert!(sb.stop_agent("node1").unwrap().success(), "{}", sb.agent_log("node1"));
    assert!(sb.stop_agent("node2").unwrap().success(), "{}", sb.agent_log("node2"));
    let outcome = sb.pod("a").connect(addr(&sb, "c", 8080), 10).unwrap();
    assert_eq!(outcome, ConnectOutcome::Echoed { peer: addr(&sb, "c", 8080), bytes: 10 });
    // Direct now: the server sees the real client.
    assert_eq!(server.wait_accepted(2, Duration::from_secs(2))[1].ip(), sb.pod("a").ip);
}

#[test]
fn reload_releases_removed_workloads_and_rejects_bad_config() {
    let mut sb = two_nodes("reload");
    sb.start_agent("node1", None).unwrap();
    let _server = sb.pod("u").serve(8080).unwrap();
    assert!(matches!(sb.pod("b").connect(addr(&sb, "u", 8080), 10).unwrap(), ConnectOutcome::Echoed { .. }));
    assert_eq!(metric(&sb, "node1", REDIRECTED), 1.0);
    assert_eq!(metric(&sb, "node1", "ferry_meshed_workloads"), 2.0);
    assert_eq!(metric(&sb, "node1", "ferry_log_lines_dropped_total"), 0.0);

    // A config that fails to parse changes nothing.
    sb.reload_agent("node1", "node: node1\nworkloads: [{bogus: 1}]\n").unwrap();
    sb.wait_for_log("node1", "config reload rejected", 1).unwrap();
    assert_eq!(metric(&sb, "node1", "ferry_meshed_workloads"), 2.0);

    // Without b: b is detached and its listeners are closed. The limits, read only at start,
    // are named as not applied.
    let without_b: String = {
        let full = sb.config_for("node1");
        let start = full.find("  - name: b\n").unwrap();
        let end = full[start + 1..].find("  - name:").map_or(full.len(), |i| start + 1 + i);
        format!("{}{}limits: {{idleTimeout: 5m}}\n", &full[..start], &full[end..])
    };
    sb.reload_agent("node1", &without_b).unwrap();
    sb.wait_for_log("node1", "workload released", 1).unwrap();
    sb.wait_for_log("node1", "config reloaded, except limits: read only at start", 1).unwrap();
    assert_eq!(metric(&sb, "node1", "ferry_meshed_workloads"), 1.0);
    let outcome = sb.pod("b").connect(addr(&sb, "u", 8080), 10).unwrap();
    assert_eq!(outcome, ConnectOutcome::Echoed { peer: addr(&sb, "u", 8080), bytes: 10 });
    assert_eq!(metric(&sb, "node1", REDIRECTED), 1.0, "b is still captured");
    let outbound_listener = SocketAddr::from(([127, 0, 0, 1], 15001));
    assert_eq!(sb.pod("b").connect(outbound_listener, 1).unwrap(), ConnectOutcome::Refused);
    // a is untouched.
    assert!(matches!(sb.pod("a").connect(addr(&sb, "u", 8080), 10).unwrap(), ConnectOutcome::Echoed { .. }));
    assert_eq!(metric(&sb, "node1", REDIRECTED), 2.0);
}

/// The kernel ids of the eBPF links the node's agent holds (from its descriptors' fdinfo).
fn agent_links(sb: &Sandbox, node: &str) -> BTreeSet<u32> {
    let pid = sb.agent_pid(node).expect("agent running");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap();
    fds.flatten()
        .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
        .filter_map(|info| info.lines().find_map(|line| line.strip_prefix("link_id:")?.trim().parse().ok()))
        .collect()
}

/// New labels change how a pod is served, not where it is captured: its programs stay attached
/// (detached for a moment, its connections would bypass the mesh, and its policies with it).
#[test]
fn relabelling_a_pod_keeps_its_capture_attached() {
    let sb = with_agents("relabel");
    let _server = sb.pod("c").serve(8080).unwrap();
    let links = agent_links(&sb, "node2");
    assert_eq!(links.len(), 6, "c's six programs: {links:?}");
    let relabelled = with_labels(&sb.config_for("node2"), "c", "{app: c2}");
    assert_ne!(relabelled, sb.config_for("node2"), "c's entry not found");
    sb.reload_agent("node2", &relabelled).unwrap();
    sb.wait_for_log("node2", "workload served with its new spec, capture kept workload=default/c", 1)
        .unwrap();
    assert_eq!(agent_links(&sb, "node2"), links, "c's capture was detached and attached again");
    // And it still captures: u's plaintext connection is steered to the agent.
    let outcome = sb.pod("u").connect(addr(&sb, "c", 8080), 10).unwrap();
    assert!(matches!(outcome, ConnectOutcome::Echoed { .. }), "{outcome:?}");
    assert_eq!(metric(&sb, "node2", STEERED), 1.0);
}

/// Dual-stack pods are meshed over IPv6 as over IPv4: an IPv6 connection is captured, tunnelled,
/// authorized and delivered, and the apps see the addresses they would see without the mesh.
#[test]
fn ipv6_is_meshed_like_ipv4() {
    let mut sb = two_nodes("ipv6");
    // c admits sa-a only, whatever the address family.
    let only_a = "policies:
  - metadata: {name: only-a, namespace: default}
    spec:
      selector: {matchLabels: {app: c}}
      rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sa-a]}}]}]
";
    for node in ["node1", "node2"] {
        let config = dual_stack_labelled_c(&sb, node);
        sb.start_agent(node, Some(&format!("{config}{only_a}"))).unwrap();
    }
    let v6 = |pod: &str, port: u16| SocketAddr::from((sb.pod(pod).ip6, port));
    let server = sb.pod("c").serve(8080).unwrap();

    // Cross-node, through both agents over HBONE on IPv6.
    let (outcome, local) = sb.pod("a").connect_from(v6("c", 8080), BULK).unwrap();
    assert_eq!(
        outcome,
        ConnectOutcome::Echoed { peer: v6("c", 8080), bytes: BULK },
        "{}",
        sb.agent_log("node1")
    );
    assert_eq!(local.ip(), sb.pod("a").ip6, "the app's own address is its pod's IPv6 one");
    let accepted = server.wait_accepted(1, Duration::from_secs(2));
    assert_eq!(accepted[0].ip(), sb.pod("c").ip6, "delivered from inside c: {accepted:?}");
    assert_eq!(metric(&sb, "node1", REDIRECTED), 1.0);
    assert_eq!(metric(&sb, "node1", HBONE_CLIENT), 1.0);
    assert_eq!(metric(&sb, "node2", INBOUND_HBONE), 1.0);
    assert_eq!(metric(&sb, "node2", STEERED), 0.0, "reached c in plaintext, around the tunnel");
    let flows = sb.ferry_json("node1", &["flows"]).unwrap();
    let tunnelled = |e: &&serde_json::Value| {
        e["route"] == "hbone" && e["src"] == local.to_string() && e["dst"] == v6("c", 8080).to_string()
    };
    assert!(flows.as_array().unwrap().iter().any(|e| tunnelled(&e)), "{flows}");

    // Policy holds over IPv6: b is denied at c's agent, and so is an unmeshed client's plaintext,
    // which sk_lookup steers to c's IPv6 inbound listener.
    assert!(matches!(sb.pod("b").connect(v6("c", 8080), 10).unwrap(), ConnectOutcome::Reset { .. }));
    assert!(matches!(sb.pod("u").connect(v6("c", 8080), 10).unwrap(), ConnectOutcome::Reset { .. }));
    assert_eq!(metric(&sb, "node2", STEERED), 1.0);
    // No ALLOW policy matched: no single policy decided.
    let denied = "ferry_policy_verdicts_total{verdict=\"deny\",policy=\"none\"}";
    assert_eq!(metric(&sb, "node2", denied), 2.0);
    assert_eq!(server.accepted().len(), 1, "a denied connection reached c's app");
    // `ferry policy check` answers for IPv6 addresses alike.
    let c_v6 = v6("c", 8080).to_string();
    for (from, code) in [("default/sa-a", 0), ("default/sa-b", 1), (&*sb.pod("u").ip6.to_string(), 1)] {
        let (status, out, err) =
            sb.ferry("node2", &["policy", "check", "--from", from, "--to", &c_v6]).unwrap();
        assert_eq!(status, code, "from {from}: {out} {err}");
    }

    // Same node, handed over inside node1's agent; and an IPv6 socket to an IPv4 address still
    // goes the IPv4 way.
    let _server_b = sb.pod("b").serve(8080).unwrap();
    let outcome = sb.pod("a").connect(v6("b", 8080), 100).unwrap();
    assert_eq!(outcome, ConnectOutcome::Echoed { peer: v6("b", 8080), bytes: 100 });
    let mapped = SocketAddr::from((sb.pod("c").ip.to_ipv6_mapped(), 8080));
    let (outcome, local) = sb.pod("a").connect_from(mapped, 10).unwrap();
    assert_eq!(outcome, ConnectOutcome::Echoed { peer: mapped, bytes: 10 });
    assert_eq!(local.ip(), sb.pod("a").ip.to_ipv6_mapped());
    assert_eq!(metric(&sb, "node1", REDIRECTED), 4.0);
    assert_eq!(metric(&sb, "node2", denied), 2.0);
}

/// A dual-stack service is reached in the family the client dialled: its IPv6 address leads to an
/// endpoint's IPv6 address, its IPv4 one to an IPv4 address.
#[test]
fn a_dual_stack_service_is_reached_in_the_family_dialled() {
    let mut sb = two_nodes("v6svc");
    let web = "services:
  - {name: web, namespace: default, vips: [10.96.0.10, 'fd00:96::10'], ports: [{port: 80, targetPort: 8080}], selector: {app: c}}
";
    for node in ["node1", "node2"] {
        let config = dual_stack_labelled_c(&sb, node);
        sb.start_agent(node, Some(&format!("{config}{web}"))).unwrap();
    }
    let server = sb.pod("c").serve(8080).unwrap();
    for (vip, endpoint) in
        [("[fd00:96::10]:80", IpAddr::from(sb.pod("c").ip6)), ("10.96.0.10:80", sb.pod("c").ip.into())]
    {
        let vip: SocketAddr = vip.parse().unwrap();
        let outcome = sb.pod("a").connect(vip, 100).unwrap();
        assert_eq!(outcome, ConnectOutcome::Echoed { peer: vip, bytes: 100 }, "{}", sb.agent_log("node1"));
        let accepted = server.wait_accepted(1, Duration::from_secs(2)).pop().unwrap();
        assert_eq!(accepted.ip(), endpoint, "delivered from inside c at the endpoint's address");
        server.clear();
    }
    assert_eq!(metric(&sb, "node2", INBOUND_HBONE), 2.0);
}

/// An IPv6 address of a meshed pod that the agent was not told about (a static config listing
/// only the IPv4 one) is not let past policy: inbound to it is refused, and the pod's own IPv6
/// connections, which have no pod address to be bound to, pass uncaptured, counted and logged.
#[test]
fn an_unknown_ipv6_address_of_a_meshed_pod_is_refused_not_let_past_policy() {
    let mut sb = two_nodes("ipv6-unknown");
    let app_v6 = SocketAddr::from((sb.pod("c").ip6, 8080));
    let _server = sb.pod("c").serve(8080).unwrap();
    let from_node = |sb: &Sandbox| sb.node("node2").netns.connect(app_v6, Duration::from_millis(500));
    // Unmeshed, the app is reachable over IPv6 from outside the pod.
    from_node(&sb).expect("IPv6 before the agent runs");

    sb.start_agent("node2", None).unwrap();
    let refused = from_node(&sb).expect_err("IPv6 reached the app past the agent");
    let kind = refused.downcast_ref::<std::io::Error>().map(std::io::Error::kind);
    assert_eq!(kind, Some(std::io::ErrorKind::ConnectionRefused), "{refused}");
    let warning =
        format!("IPv6 connection to [{}]:8080 refused: the agent does not know this address", app_v6.ip());
    sb.wait_for_log("node2", &warning, 1).unwrap();
    // Every refusal is counted; the warning comes at most once per CPU in 10 s, not per connection.
    let cpus = std::thread::available_parallelism().unwrap().get();
    for _ in 0..cpus {
        assert!(from_node(&sb).is_err());
    }
    let refused = "ferry_datapath_events_total{event=\"inbound_ipv6_refused\"}";
    assert_eq!(metric(&sb, "node2", refused), (cpus + 1) as f64);
    std::thread::sleep(Duration::from_millis(200));
    assert!(sb.agent_log("node2").matches(&warning).count() <= cpus, "a warning per refusal");
    // Inside the pod, IPv6 loopback is local traffic and passes.
    sb.pod("c")
        .netns
        .connect("[::1]:8080".parse().unwrap(), Duration::from_secs(2))
        .expect("::1 inside the pod");
    let to_node = SocketAddr::from((sb.node("node2").underlay_ip6, 9));
    let outbound = sb.pod("c").connect(to_node, 1).unwrap();
    assert_eq!(outbound, ConnectOutcome::Refused, "nothing listens on the node's port 9");
    let passed = "ferry_datapath_events_total{event=\"outbound_ipv6_passed\"}";
    assert_eq!(metric(&sb, "node2", passed), 1.0);
    let warning = format!("connection to [{}]:9 not captured: the pod has no IPv6 address", to_node.ip());
    sb.wait_for_log("node2", &warning, 1).unwrap();
    // IPv4 into the same pod is captured as before.
    let outcome = sb.pod("u").connect(addr(&sb, "c", 8080), 10).unwrap();
    assert!(matches!(outcome, ConnectOutcome::Echoed { .. }), "{outcome:?}");
    assert_eq!(metric(&sb, "node2", STEERED), 1.0);

    // Its IPv6 address added to the config, c is captured over IPv6 too; taken out again, the
    // IPv6 listeners go with it (HBONE to c's IPv6 address finds nothing, as before).
    let hbone_v6 = SocketAddr::from((sb.pod("c").ip6, 15008));
    let node = |to| sb.node("node2").netns.connect(to, Duration::from_millis(500));
    sb.reload_agent("node2", &sb.dual_stack_config_for("node2")).unwrap();
    sb.wait_for_log("node2", "workload captured workload=default/c", 2).unwrap();
    from_node(&sb).expect("IPv6 once the agent knows the address");
    assert_eq!(metric(&sb, "node2", STEERED), 2.0);
    node(hbone_v6).expect("c's IPv6 HBONE listener");
    sb.reload_agent("node2", &sb.config_for("node2")).unwrap();
    sb.wait_for_log("node2", "workload captured workload=default/c", 3).unwrap();
    assert!(from_node(&sb).is_err(), "IPv6 reached the app once its address was dropped");
    let gone = node(hbone_v6).expect_err("an IPv6 listener outlived the pod's IPv6 address");
    let kind = gone.downcast_ref::<std::io::Error>().map(std::io::Error::kind);
    assert_eq!(kind, Some(std::io::ErrorKind::ConnectionRefused), "{gone}");
}

/// A pod is meshed over the addresses it has, whichever it lists first: an IPv6-only pod too.
#[test]
fn ipv6_only_and_ipv6_first_pods_are_meshed() {
    let mut sb = two_nodes("v6only");
    let (a, b) = (sb.pod("a"), sb.pod("b"));
    let node1 = sb
        .dual_stack_config_for("node1")
        .replace(&format!("ips: [{}, \"{}\"]", a.ip, a.ip6), &format!("ips: [\"{}\", {}]", a.ip6, a.ip))
        .replace(&format!("ips: [{}, \"{}\"]", b.ip, b.ip6), &format!("ips: [\"{}\"]", b.ip6));
    sb.start_agent("node1", Some(&node1)).unwrap();
    sb.start_agent("node2", Some(&sb.dual_stack_config_for("node2"))).unwrap();
    assert_eq!(metric(&sb, "node1", "ferry_meshed_workloads"), 2.0, "{}", sb.agent_log("node1"));
    let _server = sb.pod("c").serve(8080).unwrap();
    let c_v6 = SocketAddr::from((sb.pod("c").ip6, 8080));
    let (outcome, local) = sb.pod("b").connect_from(c_v6, 100).unwrap();
    assert_eq!(outcome, ConnectOutcome::Echoed { peer: c_v6, bytes: 100 });
    assert_eq!(local.ip(), sb.pod("b").ip6);
    let (outcome, local) = sb.pod("a").connect_from(addr(&sb, "c", 8080), 100).unwrap();
    assert_eq!(outcome, ConnectOutcome::Echoed { peer: addr(&sb, "c", 8080), bytes: 100 });
    assert_eq!(local.ip(), sb.pod("a").ip, "bound to the pod's IPv4 address, not its first");
    assert_eq!(metric(&sb, "node1", HBONE_CLIENT), 2.0, "one HBONE connection per source address");
    assert_eq!(metric(&sb, "node1", REDIRECTED), 2.0);
    // An IPv6-only pod's IPv4 connects pass uncaptured, as they would unmeshed (here the sandbox
    // does route b's IPv4 address, so it gets through, unauthenticated), counted and logged.
    let (outcome, local) = sb.pod("b").connect_from(addr(&sb, "c", 8080), 10).unwrap();
    assert_eq!(outcome, ConnectOutcome::Echoed { peer: addr(&sb, "c", 8080), bytes: 10 });
    assert_eq!(local.ip(), sb.pod("b").ip);
    assert_eq!(metric(&sb, "node1", REDIRECTED), 2.0, "captured without an IPv4 address to bind");
    assert_eq!(metric(&sb, "node1", "ferry_datapath_events_total{event=\"outbound_ipv4_passed\"}"), 1.0);
    let warning = format!("connection to {}:8080 not captured: the pod has no IPv4 address", sb.pod("c").ip);
    sb.wait_for_log("node1", &warning, 1).unwrap();
}

#[test]
fn a_workload_in_the_nodes_own_netns_is_not_captured() {
    let mut sb = two_nodes("hostnet");
    // Pod b declared with node1's netns, as a hostNetwork pod would have: capturing it would
    // steer every connection to the node and put the pod's listeners on the node's addresses.
    let config = sb.config_for("node1").replace(
        &sb.pod("b").netns.path().display().to_string(),
        &sb.node("node1").netns.path().display().to_string(),
    );
    // Declared meshed and not captured: the agent is not ready, and says why.
    sb.start_agent_not_ready("node1", &config, &[], "1 local workload(s) not captured").unwrap();
    sb.wait_for_log("node1", "the agent's own network namespace", 1).unwrap();
    assert_eq!(metric(&sb, "node1", "ferry_meshed_workloads"), 1.0, "only a is captured");
    // The node's netns has no listener of the agent's: 15006 there is refused.
    let node_15006 = SocketAddr::from((sb.node("node1").underlay_ip, 15006));
    assert!(sb.node("node1").netns.connect(node_15006, Duration::from_secs(1)).is_err());
    // a is served as usual.
    let _server = sb.pod("u").serve(8080).unwrap();
    assert!(matches!(sb.pod("a").connect(addr(&sb, "u", 8080), 10).unwrap(), ConnectOutcome::Echoed { .. }));
    assert_eq!(metric(&sb, "node1", REDIRECTED), 1.0);
}
