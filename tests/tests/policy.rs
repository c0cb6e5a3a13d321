//! Authorization policy enforced by real agents, and the telemetry that shows it.

use std::{net::SocketAddr, time::Duration};

use ferry_sandbox::{ConnectOutcome, Sample, Sandbox, parse_metrics, sum_samples, with_labels};
use serde_json::Value;

const PORT: u16 = 8080;

/// node1: a (sa-a), b (sa-b), u (unmeshed); node2: c (sa-c, app=c).
fn sandbox(label: &str) -> Sandbox {
    let mut sb = Sandbox::two_nodes(label).expect("sandbox");
    sb.start_agent("node1", None).unwrap();
    sb
}

fn addr(sb: &Sandbox, pod: &str) -> SocketAddr {
    SocketAddr::from((sb.pod(pod).ip, PORT))
}

fn echoed(outcome: &ConnectOutcome) -> bool {
    matches!(outcome, ConnectOutcome::Echoed { .. })
}

/// node2's config with `policies` (YAML list items) appended.
fn with_policies(sb: &Sandbox, node: &str, policies: &str) -> String {
    format!("{}policies:\n{policies}", sb.config_for(node))
}

const DENY_A: &str = "
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-a, namespace: default}
    spec:
      selector: {matchLabels: {app: c}}
      action: DENY
      rules:
        - from: [{source: {principals: [cluster.local/ns/default/sa/sa-a]}}]
";

fn labelled_c(config: &str) -> String {
    // c carries the label the policies select on.
    with_labels(config, "c", "{app: c}")
}

fn metric(sb: &Sandbox, node: &str, series: &str) -> f64 {
    sb.metric(node, series).unwrap_or_else(|e| panic!("scraping {node}: {e}"))
}

#[test]
fn deny_policy_blocks_one_service_account_and_not_another() {
    let mut sb = sandbox("deny");
    sb.start_agent("node2", Some(&labelled_c(&with_policies(&sb, "node2", DENY_A)))).unwrap();
    let server = sb.pod("c").serve(PORT).unwrap();

    let outcome = sb.pod("a").connect(addr(&sb, "c"), 100).unwrap();
    assert!(matches!(outcome, ConnectOutcome::Reset { .. }), "a should be denied: {outcome:?}");
    assert!(echoed(&sb.pod("b").connect(addr(&sb, "c"), 100).unwrap()), "b should pass");
    assert_eq!(
        server.wait_accepted(1, Duration::from_secs(2)).len(),
        1,
        "the denied connection reached the app"
    );

    assert_eq!(
        metric(&sb, "node2", "ferry_policy_verdicts_total{verdict=\"deny\",policy=\"default/deny-a\"}"),
        1.0
    );
    assert_eq!(metric(&sb, "node2", "ferry_policy_verdicts_total{verdict=\"allow\",policy=\"none\"}"), 1.0);
    // The client side saw the 401 and reset the app.
    assert_eq!(
        metric(
            &sb,
            "node1",
            "ferry_proxy_connection_failures_total{direction=\"outbound\",reason=\"rejected\"}"
        ),
        1.0
    );
    sb.wait_for_log("node2", "connection denied", 1).unwrap();
    sb.wait_for_log("node2", "policy=\"default/deny-a\"", 1).unwrap();
}

#[test]
fn allow_policy_admits_only_what_it_matches_on_every_path() {
    let mut sb = sandbox("allow");
    let allow_b = "
  - metadata: {name: only-b, namespace: default}
    spec:
      rules:
        - from: [{source: {principals: ['cluster.local/ns/default/sa/sa-b']}}]
          to: [{operation: {ports: ['8080']}}]
";
    sb.start_agent("node2", Some(&with_policies(&sb, "node2", allow_b))).unwrap();
    // The same policy on node1 protects b's neighbour a (same-node path) too: namespace-wide.
    sb.reload_agent("node1", &with_policies(&sb, "node1", allow_b)).unwrap();
    sb.wait_for_log("node1", "config reloaded", 1).unwrap();
    let server_c = sb.pod("c").serve(PORT).unwrap();
    let server_a = sb.pod("a").serve(PORT).unwrap();

    // Cross node, HBONE: only sa-b.
    assert!(matches!(sb.pod("a").connect(addr(&sb, "c"), 10).unwrap(), ConnectOutcome::Reset { .. }));
    assert!(echoed(&sb.pod("b").connect(addr(&sb, "c"), 10).unwrap()));
    // Plaintext from an unmeshed pod has no identity: denied before any byte reaches the app.
    assert!(matches!(sb.pod("u").connect(addr(&sb, "c"), 10).unwrap(), ConnectOutcome::Reset { .. }));
    assert_eq!(server_c.wait_accepted(1, Duration::from_secs(2)).len(), 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(server_c.accepted().len(), 1, "a denied connection reached c's app");
    // Same node: b -> a allowed, and nothing else from node1's unmeshed u.
    assert!(echoed(&sb.pod("b").connect(addr(&sb, "a"), 10).unwrap()));
    assert!(matches!(sb.pod("u").connect(addr(&sb, "a"), 10).unwrap(), ConnectOutcome::Reset { .. }));
    assert_eq!(server_a.wait_accepted(1, Duration::from_secs(2)).len(), 1);
    assert_eq!(
        metric(&sb, "node2", "ferry_policy_verdicts_total{verdict=\"deny\",policy=\"none\"}"),
        2.0,
        "{}",
        sb.agent_log("node2")
    );
}

#[test]
fn dry_run_lets_traffic_through_and_counts_the_would_be_deny() {
    let mut sb = sandbox("dryrun");
    let dry = DENY_A
        .replace("namespace: default}", "namespace: default, annotations: {ferry.dev/dry-run: 'true'}}");
    sb.start_agent("node2", Some(&labelled_c(&with_policies(&sb, "node2", &dry)))).unwrap();
    let _server = sb.pod("c").serve(PORT).unwrap();
    assert!(echoed(&sb.pod("a").connect(addr(&sb, "c"), 10).unwrap()));
    assert_eq!(
        metric(
            &sb,
            "node2",
            "ferry_policy_verdicts_total{verdict=\"dry_run_deny\",policy=\"default/deny-a\"}"
        ),
        1.0
    );
    assert_eq!(metric(&sb, "node2", "ferry_policy_verdicts_total{verdict=\"allow\",policy=\"none\"}"), 1.0);
    sb.wait_for_log("node2", "dry-run: would be denied", 1).unwrap();
}

/// Streams from a to c while node2 reloads `config`; the stream must end early.
fn reload_cuts_open_stream(sb: &Sandbox, config: &str) {
    std::thread::scope(|s| {
        let stream = s.spawn(|| sb.pod("a").measure_stream(addr(sb, "c"), 6));
        std::thread::sleep(Duration::from_millis(800));
        sb.reload_agent("node2", config).unwrap();
        // Cut, not ended: the destination agent resets the stream with CONNECT_ERROR (a CANCEL
        // would read as an orderly end, as with ztunnel), so the app sees a reset.
        let outcome = stream.join().unwrap();
        assert_eq!(outcome, "reset", "the denied connection was not reset");
    });
}

#[test]
fn policy_changes_close_open_connections_and_removal_restores_traffic() {
    let mut sb = sandbox("change");
    sb.start_agent("node2", Some(&labelled_c(&sb.config_for("node2")))).unwrap();
    let _server = sb.pod("c").serve(PORT).unwrap();
    // A DENY policy for a cuts its open connection, like ztunnel does.
    reload_cuts_open_stream(&sb, &labelled_c(&with_policies(&sb, "node2", DENY_A)));
    sb.wait_for_log("node2", "closed by a policy change", 1).unwrap();
    sb.wait_for_log("node2", "closed_by_policy=1", 1).unwrap();
    // New connections are denied at once, b is untouched.
    assert!(matches!(sb.pod("a").connect(addr(&sb, "c"), 10).unwrap(), ConnectOutcome::Reset { .. }));
    assert!(echoed(&sb.pod("b").connect(addr(&sb, "c"), 10).unwrap()));
    // Removing the policy restores traffic.
    sb.reload_agent("node2", &labelled_c(&sb.config_for("node2"))).unwrap();
    sb.wait_for_log("node2", "config reloaded", 2).unwrap();
    assert!(echoed(&sb.pod("a").connect(addr(&sb, "c"), 10).unwrap()));
}

#[test]
fn relabelling_a_pod_into_a_deny_policy_closes_its_open_connections() {
    // deny-a selects pods labelled app=c; c is not, yet.
    let mut sb = sandbox("relabel");
    sb.start_agent("node2", Some(&with_policies(&sb, "node2", DENY_A))).unwrap();
    let _server = sb.pod("c").serve(PORT).unwrap();
    // The same policies, c now labelled: as with a policy change, the open connection is cut.
    reload_cuts_open_stream(&sb, &labelled_c(&with_policies(&sb, "node2", DENY_A)));
    sb.wait_for_log("node2", "closed_by_policy=1", 1).unwrap();
    assert!(matches!(sb.pod("a").connect(addr(&sb, "c"), 10).unwrap(), ConnectOutcome::Reset { .. }));
}

#[test]
fn a_policy_that_fails_to_parse_keeps_the_previous_set() {
    let mut sb = sandbox("badpolicy");
    sb.start_agent("node2", Some(&labelled_c(&with_policies(&sb, "node2", DENY_A)))).unwrap();
    let _server = sb.pod("c").serve(PORT).unwrap();
    let broken = DENY_A.replace("action: DENY", "action: DENNY");
    sb.reload_agent("node2", &labelled_c(&with_policies(&sb, "node2", &broken))).unwrap();
    sb.wait_for_log("node2", "config reload rejected", 1).unwrap();
    let log = sb.agent_log("node2");
    assert!(log.contains("node2.yaml") && log.contains("default/deny-a") && log.contains("DENNY"), "{log}");
    // deny-a still in force.
    assert!(matches!(sb.pod("a").connect(addr(&sb, "c"), 10).unwrap(), ConnectOutcome::Reset { .. }));
    assert!(echoed(&sb.pod("b").connect(addr(&sb, "c"), 10).unwrap()));
}

#[test]
fn metrics_count_exact_connections_and_bytes_with_istio_labels() {
    let mut sb = sandbox("metrics");
    sb.start_agent("node2", None).unwrap();
    let _server = sb.pod("c").serve(PORT).unwrap();
    for _ in 0..3 {
        assert!(echoed(&sb.pod("a").connect(addr(&sb, "c"), 1000).unwrap()));
    }
    // Closed connections are counted once both halves of each relay have ended.
    for node in ["node1", "node2"] {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while metric(
            &sb,
            node,
            "ferry_proxy_connections_closed_total{direction=\"outbound\",route=\"hbone\"}",
        ) + metric(
            &sb,
            node,
            "ferry_proxy_connections_closed_total{direction=\"inbound\",route=\"hbone\"}",
        ) < 3.0
        {
            assert!(std::time::Instant::now() < deadline, "{node}: connections not closed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let a = "spiffe://cluster.local/ns/default/sa/sa-a";
    let c = "spiffe://cluster.local/ns/default/sa/sa-c";
    for (node, reporter) in [("node1", "source"), ("node2", "destination")] {
        let samples = parse_metrics(&sb.metrics(node).unwrap()).unwrap();
        let labels = [
            ("reporter", reporter),
            ("source_workload", "a"),
            ("source_workload_namespace", "default"),
            ("source_principal", a),
            ("destination_workload", "c"),
            ("destination_principal", c),
            ("destination_service", "unknown"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
        ];
        let value = |name: &str| sum_samples(&samples, name, &labels);
        assert_eq!(value("istio_tcp_connections_opened_total"), 3.0, "{node}");
        assert_eq!(value("istio_tcp_connections_closed_total"), 3.0, "{node}");
        assert_eq!(value("istio_tcp_received_bytes_total"), 3000.0, "{node}");
        assert_eq!(value("istio_tcp_sent_bytes_total"), 3000.0, "{node}");
        assert!(sum_samples(&samples, "ferry_certificate_expiry_seconds", &[]) > 3600.0, "{node}");
        assert_eq!(
            sum_samples(&samples, "ferry_meshed_workloads", &[]),
            if node == "node1" { 2.0 } else { 1.0 }
        );
    }
}

/// One byte echoed on a connection from `node`'s own netns (as the kubelet's probes connect).
fn echoed_from_node(sb: &Sandbox, node: &str, to: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = sb.node(node).netns.connect(to, Duration::from_secs(2)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut byte = [7u8];
    stream.write_all(&byte).and_then(|()| stream.read_exact(&mut byte)).is_ok()
}

const ALLOW_ONLY_A: &str = "
  - metadata: {name: only-a, namespace: default}
    spec:
      selector: {matchLabels: {app: c}}
      action: ALLOW
      rules:
        - from: [{source: {principals: [cluster.local/ns/default/sa/sa-a]}}]
";

#[test]
fn the_nodes_own_traffic_passes_policy_unless_configured_otherwise() {
    let mut sb = sandbox("nodetraffic");
    // Dual-stack: probes come over IPv6 in an IPv6 cluster.
    let config = labelled_c(&format!("{}policies:\n{ALLOW_ONLY_A}", sb.dual_stack_config_for("node2")));
    sb.start_agent("node2", Some(&config)).unwrap();
    let _server = sb.pod("c").serve(PORT).unwrap();
    let c_v6 = SocketAddr::from((sb.pod("c").ip6, PORT));

    // Only sa-a is allowed, yet the node's own connection (a kubelet probe) gets through...
    assert!(echoed_from_node(&sb, "node2", addr(&sb, "c")), "{}", sb.agent_log("node2"));
    assert!(echoed_from_node(&sb, "node2", c_v6), "{}", sb.agent_log("node2"));
    // ...while other plaintext clients do not, and neither does the node of another pod.
    for to in [addr(&sb, "c"), c_v6] {
        let outcome = sb.pod("u").connect(to, 10).unwrap();
        assert!(matches!(outcome, ConnectOutcome::Reset { .. }), "u should be denied: {outcome:?}");
    }
    assert!(!echoed_from_node(&sb, "node1", addr(&sb, "c")), "node1 is not c's node");
    // Traffic the node only forwards, masqueraded to its own address (as kube-proxy does for a
    // NodePort), has no socket on the node: not exempt.
    let (u, c) = (sb.pod("u").ip.to_string(), sb.pod("c").ip.to_string());
    let mut masquerade = std::process::Command::new("iptables");
    masquerade.args(["-t", "nat", "-A", "POSTROUTING", "-s", &u, "-d", &c, "-j", "MASQUERADE"]);
    assert!(sb.node("node2").netns.spawn(masquerade, None).unwrap().wait().unwrap().success());
    let outcome = sb.pod("u").connect(addr(&sb, "c"), 10).unwrap();
    assert!(matches!(outcome, ConnectOutcome::Reset { .. }), "masqueraded u should be denied: {outcome:?}");
    let masqueraded_denied = || {
        let log = sb.agent_log("node2");
        log.lines().any(|l| l.contains("connection denied") && l.contains("src=10.2.0.1:"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !masqueraded_denied() {
        assert!(std::time::Instant::now() < deadline, "no denial from the node's address logged");
        std::thread::sleep(Duration::from_millis(20));
    }
    // `ferry policy check` agrees. node2 reaches c from the address on c's veth, 10.2.0.1.
    let (code, out, err) =
        sb.ferry("node2", &["policy", "check", "--from", "10.2.0.1", "--to", "default/c:8080"]).unwrap();
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("from this node"), "{out}");

    // With `nodeTraffic: policy` the node is a plaintext client like any other.
    let strict = config.replacen('\n', "\nnodeTraffic: policy\n", 1);
    sb.reload_agent("node2", &strict).unwrap();
    sb.wait_for_log("node2", "config reloaded", 1).unwrap();
    assert!(!echoed_from_node(&sb, "node2", addr(&sb, "c")), "node traffic should now be denied");
    assert!(!echoed_from_node(&sb, "node2", c_v6), "node traffic should now be denied");
    sb.wait_for_log("node2", "connection denied", 6).unwrap();
}

#[test]
fn byte_counters_follow_a_long_lived_connection_and_end_exact() {
    let mut sb = sandbox("livebytes");
    sb.start_agent("node2", None).unwrap();
    let _server = sb.pod("c").serve(PORT).unwrap();
    // One connection, a 1-byte ping-pong every 10 ms for 3 s.
    let mut client = sb.pod("a").spawn_app(&["stream", &addr(&sb, "c").to_string(), "3"]).unwrap();
    // Scraped while it is open, parsed afterwards: the parser (a Python process) takes a good part
    // of a second, which would otherwise eat into the connection's 3 s.
    let in_samples = |samples: &[Sample], node: &str, name: &str| {
        let reporter = if node == "node1" { "source" } else { "destination" };
        sum_samples(
            samples,
            name,
            &[("reporter", reporter), ("source_workload", "a"), ("destination_workload", "c")],
        )
    };
    let series =
        |node: &str, name: &str| in_samples(&parse_metrics(&sb.metrics(node).unwrap()).unwrap(), node, name);
    // While it is open, each scrape shows the bytes moved so far, growing.
    std::thread::sleep(Duration::from_millis(500));
    let mut while_open = Vec::new();
    for node in ["node1", "node2"] {
        let first = sb.metrics(node).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        while_open.push((node, first, sb.metrics(node).unwrap()));
    }
    assert!(client.child().try_wait().unwrap().is_none(), "the client finished before the scrapes");
    for (node, first, second) in while_open {
        let (first, second) = (parse_metrics(&first).unwrap(), parse_metrics(&second).unwrap());
        let received = in_samples(&first, node, "istio_tcp_received_bytes_total");
        assert!(received > 0.0, "{node}: no bytes counted for an open connection");
        let later = in_samples(&second, node, "istio_tcp_received_bytes_total");
        assert!(later > received, "{node}: byte count stuck at {received} while bytes flow");
        assert!(in_samples(&second, node, "istio_tcp_sent_bytes_total") > 0.0, "{node}");
        let closed = in_samples(&second, node, "istio_tcp_connections_closed_total");
        assert_eq!(closed, 0.0, "{node}: closed early");
    }
    let last = client.finish().unwrap();
    let exchanged: f64 = match last.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["streamed", n] => n.parse().unwrap(),
        other => panic!("stream client: {other:?}"),
    };
    // After the close, each byte counted exactly once, by scrapes and the close together.
    for node in ["node1", "node2"] {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while series(node, "istio_tcp_connections_closed_total") < 1.0 {
            assert!(std::time::Instant::now() < deadline, "{node}: connection not closed");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(series(node, "istio_tcp_received_bytes_total"), exchanged, "{node}");
        assert_eq!(series(node, "istio_tcp_sent_bytes_total"), exchanged, "{node}");
    }
}

#[test]
fn access_log_is_json_and_matches_the_connections() {
    let mut sb = sandbox("accesslog");
    sb.start_agent_with("node2", None, &["--log-format", "json"]).unwrap();
    let _server = sb.pod("c").serve(PORT).unwrap();
    assert!(echoed(&sb.pod("a").connect(addr(&sb, "c"), 1234).unwrap()));
    assert!(echoed(&sb.pod("b").connect(addr(&sb, "c"), 99).unwrap()));
    sb.wait_for_log("node2", "connection closed", 2).unwrap();
    let lines: Vec<Value> = sb
        .agent_log("node2")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let closed: Vec<&Value> =
        lines.iter().filter(|l| l["target"] == "access" && l["message"] == "connection closed").collect();
    assert_eq!(closed.len(), 2, "{closed:#?}");
    for (src, bytes) in [("a", 1234), ("b", 99)] {
        let line = closed
            .iter()
            .find(|l| l["src_workload"] == src)
            .unwrap_or_else(|| panic!("no access line for {src}: {closed:#?}"));
        assert_eq!(line["direction"], "inbound");
        assert_eq!(line["route"], "hbone");
        assert_eq!(line["src_identity"], format!("spiffe://cluster.local/ns/default/sa/sa-{src}"));
        assert_eq!(line["dst_identity"], "spiffe://cluster.local/ns/default/sa/sa-c");
        assert_eq!(line["dst"], addr(&sb, "c").to_string());
        assert_eq!(line["dst_hbone"], format!("{}:15008", sb.pod("c").ip));
        assert_eq!(line["dst_workload"], "c");
        assert_eq!(line["src_namespace"], "default");
        assert_eq!(line["bytes_src_to_dst"], bytes);
        assert_eq!(line["bytes_dst_to_src"], bytes);
        assert!(line["duration_ms"].is_u64());
    }
}
