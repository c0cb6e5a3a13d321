//! The admin API and the `ferry` CLI against live sandbox agents.

use std::{net::SocketAddr, time::Duration};

use ferry_sandbox::{ConnectOutcome, Sandbox};
use serde_json::Value;

const PORT: u16 = 8080;

const DENY_A: &str = "
policies:
  - metadata: {name: deny-a, namespace: default}
    spec:
      action: DENY
      rules:
        - from: [{source: {principals: [cluster.local/ns/default/sa/sa-a]}}]
  - metadata: {name: l7, namespace: default}
    spec:
      action: DENY
      rules: [{to: [{operation: {methods: [GET]}}], from: [{source: {principals: ['*/sa/nobody']}}]}]
";

/// node1: a (sa-a), b (sa-b), u (unmeshed); node2: c (sa-c) with DENY for sa-a.
fn sandbox(label: &str) -> Sandbox {
    let mut sb = Sandbox::two_nodes(label).expect("sandbox");
    sb.start_agent("node1", None).unwrap();
    let node2 = format!("{}{DENY_A}", sb.config_for("node2"));
    sb.start_agent("node2", Some(&node2)).unwrap();
    sb
}

fn addr(sb: &Sandbox, pod: &str) -> SocketAddr {
    SocketAddr::from((sb.pod(pod).ip, PORT))
}

#[test]
fn inspection_commands_report_config_and_traffic() {
    let sb = sandbox("cli");
    let _server = sb.pod("c").serve(PORT).unwrap();

    let status = sb.ferry_json("node2", &["status"]).unwrap();
    assert_eq!(status["node"], "node2");
    assert_eq!(status["not_ready"], serde_json::Value::Null, "{status}");
    assert_eq!(status["workloads_captured"], 1);
    assert_eq!(status["policies"], 2);
    assert_eq!(status["node_traffic"], "allowed");
    assert_eq!(status["trusted_roots"], 1);
    assert!(status["signer"].as_str().unwrap().starts_with("file CA "), "{status}");

    let workloads = sb.ferry_json("node2", &["workloads"]).unwrap();
    let c = workloads.as_array().unwrap().iter().find(|w| w["name"] == "c").unwrap();
    assert_eq!(c["identity"], "spiffe://cluster.local/ns/default/sa/sa-c");
    assert_eq!(c["captured"], true);
    assert_eq!(c["netns"], sb.pod("c").netns.path().display().to_string());
    assert_eq!(c["programs"].as_array().unwrap().len(), 6);
    let a = workloads.as_array().unwrap().iter().find(|w| w["name"] == "a").unwrap();
    assert_eq!((a["local"].as_bool(), a["captured"].as_bool()), (Some(false), Some(false)));

    let policies = sb.ferry_json("node2", &["policies"]).unwrap();
    let l7 = policies.as_array().unwrap().iter().find(|p| p["name"] == "l7").unwrap();
    assert!(l7["warnings"][0].as_str().unwrap().contains("methods"), "{l7}");

    let certs = sb.ferry_json("node2", &["certs"]).unwrap();
    assert_eq!(certs[0]["identity"], "spiffe://cluster.local/ns/default/sa/sa-c");
    assert_eq!(certs[0]["state"], "issued");
    assert!(certs[0]["expires_in_seconds"].as_i64().unwrap() > 23 * 3600);
    assert!(certs[0]["root"].as_str().unwrap().contains("Ferry root CA"));

    // A live connection shows up with identities and bytes while it runs.
    std::thread::scope(|s| {
        let stream = s.spawn(|| sb.pod("b").stream(addr(&sb, "c"), 2));
        std::thread::sleep(Duration::from_millis(700));
        let live = sb.ferry_json("node2", &["connections"]).unwrap();
        let conn = live.as_array().unwrap().first().unwrap_or_else(|| panic!("no live connection: {live}"));
        assert_eq!(conn["direction"], "inbound");
        assert_eq!(conn["route"], "hbone");
        assert_eq!(conn["src_identity"], "spiffe://cluster.local/ns/default/sa/sa-b");
        assert!(conn["bytes_src_to_dst"].as_u64().unwrap() > 10, "{conn}");
        assert!(conn["age_ms"].as_u64().unwrap() >= 500, "{conn}");
        let (code, table, _) = sb.ferry("node2", &["connections"]).unwrap();
        assert_eq!(code, 0);
        assert!(
            table.contains("inbound") && table.contains("default/sa-b") && table.contains("hbone"),
            "{table}"
        );
        assert!(stream.join().unwrap().unwrap() > 50);
    });
    // Closed: the relay on node2 ends once both halves have closed.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !sb.ferry_json("node2", &["connections"]).unwrap().as_array().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the finished connection is still listed");
        std::thread::sleep(Duration::from_millis(20));
    }

    let (_, out, _) = sb.ferry("node2", &["status"]).unwrap();
    assert!(out.lines().any(|l| l.split_whitespace().eq(["ready", "yes"])), "{out}");

    // Tables carry the key columns, a row to a line (for grep and awk: never wrapped).
    for (args, needles) in [
        (vec!["workloads"], vec!["WORKLOAD", "default/c", "default/sa-c", "yes"]),
        (vec!["policies"], vec!["POLICY", "default/deny-a", "DENY"]),
        (vec!["certs"], vec!["IDENTITY", "default/sa-c", "Ferry root CA"]),
        (vec!["status"], vec!["node2", "workloads captured"]),
    ] {
        let (code, out, err) = sb.ferry("node2", &args).unwrap();
        assert_eq!(code, 0, "{err}");
        for needle in needles {
            assert!(out.contains(needle), "ferry {args:?} lacks {needle:?}:\n{out}");
        }
        if let Some(rows) = sb.ferry_json("node2", &args).unwrap().as_array() {
            assert_eq!(
                out.lines().count(),
                1 + rows.len(),
                "ferry {args:?}: a row over several lines:\n{out}"
            );
        }
    }
    let (code, metrics, _) = sb.ferry("node2", &["metrics"]).unwrap();
    assert_eq!(code, 0);
    assert!(metrics.contains("istio_tcp_connections_opened_total"));
}

#[test]
fn flows_and_policy_check_agree_with_the_datapath() {
    let sb = sandbox("clicheck");
    let server = sb.pod("c").serve(PORT).unwrap();
    let c = addr(&sb, "c").to_string();

    // What the datapath did: a denied, b allowed, u (plaintext) allowed (no ALLOW policy applies).
    let cases = [("a", false), ("b", true), ("u", true)];
    for (from, allowed) in cases {
        let outcome = sb.pod(from).connect(addr(&sb, "c"), 10).unwrap();
        assert_eq!(matches!(outcome, ConnectOutcome::Echoed { .. }), allowed, "{from}: {outcome:?}");
    }
    assert_eq!(server.wait_accepted(2, Duration::from_secs(2)).len(), 2);
    // What `ferry policy check` says, by identity and by IP, with the exit code.
    for (from, allowed) in cases {
        let ip = sb.pod(from).ip.to_string();
        let sa = format!("default/sa-{from}");
        let froms: Vec<&str> = if from == "u" { vec![&ip] } else { vec![&ip, &sa] };
        for source in froms {
            let (code, out, err) =
                sb.ferry("node2", &["policy", "check", "--from", source, "--to", &c, "-o", "json"]).unwrap();
            let result: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
            assert_eq!(result["verdict"] == "allow", allowed, "{source}: {result}");
            assert_eq!(code, if allowed { 0 } else { 1 }, "{source}");
            if !allowed {
                assert_eq!(result["policy"], "default/deny-a");
            }
        }
    }
    let (code, out, _) =
        sb.ferry("node2", &["policy", "check", "--from", "default/sa-a", "--to", "default/c:8080"]).unwrap();
    assert_eq!(code, 1);
    assert!(out.starts_with("DENY: denied: matched a DENY policy (default/deny-a rule 0)"), "{out}");

    // The denied connection is in the flow events, with the policy.
    let denied = sb.ferry_json("node2", &["flows", "--denied"]).unwrap();
    let denied = denied.as_array().unwrap();
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["kind"], "denied");
    assert_eq!(denied[0]["policy"], "default/deny-a");
    assert_eq!(denied[0]["src_identity"], "spiffe://cluster.local/ns/default/sa/sa-a");
    let all = sb.ferry_json("node2", &["flows"]).unwrap();
    assert!(all.as_array().unwrap().iter().filter(|e| e["kind"] == "closed").count() >= 2);

    // --follow streams new events as they happen.
    let mut follow = std::process::Command::new(ferry_sandbox::ferry_bin().unwrap())
        .arg("--admin")
        .arg(sb.admin_socket("node2"))
        .args(["flows", "--follow", "--denied", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = sb.pod("a").connect(addr(&sb, "c"), 10).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = follow.kill();
    let output = follow.wait_with_output().unwrap();
    let lines: Vec<Value> =
        String::from_utf8_lossy(&output.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "backlog of one denial plus the new one: {lines:?}");
}

#[test]
fn admin_api_serves_datapath_and_changes_the_log_level() {
    let sb = sandbox("admin");
    let node = sb.node("node2");
    let (status, body) = node.http_get(15000, "/datapath").unwrap();
    assert_eq!(status, 200);
    let datapath: Value = serde_json::from_str(&body).unwrap();
    let maps = datapath["maps"].as_array().unwrap();
    let meshed = maps.iter().find(|m| m["name"] == "MESHED_NETNS").unwrap();
    assert_eq!((meshed["entries"].as_u64(), meshed["max_entries"].as_u64()), (Some(1), Some(4096)));
    assert_eq!(datapath["programs"].as_array().unwrap().len(), 6);
    assert!(datapath["counters"]["inbound_passed"].is_u64());

    assert!(!sb.agent_log("node2").contains("DEBUG"));
    let (status, body) = node.http(15000, "POST", "/logging?level=debug").unwrap();
    assert_eq!(status, 200, "{body}");
    let _ = node.http_get(15000, "/status").unwrap();
    let _server = sb.pod("c").serve(PORT).unwrap();
    let _ = sb.pod("a").connect(addr(&sb, "c"), 10).unwrap();
    sb.wait_for_log("node2", "DEBUG", 1).unwrap();
    let (status, body) = node.http(15000, "POST", "/logging?level=nonsense[").unwrap();
    assert_eq!(status, 400, "{body}");
}

#[test]
fn cli_errors_say_what_to_do() {
    let sb = sandbox("clierr");
    // No agent at that socket.
    let missing = sb.dir.join("nothing-here.sock");
    let out = std::process::Command::new(ferry_sandbox::ferry_bin().unwrap())
        .args(["status", "--admin"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent not running at") && err.contains("ferry agent --config"), "{err}");
    // Not root: the socket is 0600.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(ferry_sandbox::ferry_bin().unwrap())
        .args(["status", "--admin"])
        .arg(sb.admin_socket("node2"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("permission denied") && err.contains("run as root"), "{err}");
    // A bad request is the agent's refusal, explained.
    let (code, _, err) =
        sb.ferry("node2", &["policy", "check", "--from", "default/sa-a", "--to", "10.9.9.9:80"]).unwrap();
    assert_eq!(code, 5);
    assert!(err.contains("no known workload has 10.9.9.9"), "{err}");
    let (code, _, err) =
        sb.ferry("node2", &["policy", "check", "--from", "default/sa-a", "--to", "c:8080"]).unwrap();
    assert_eq!(code, 5);
    assert!(err.contains("unknown workload \"c\"; did you mean default/c?"), "{err}");
}
