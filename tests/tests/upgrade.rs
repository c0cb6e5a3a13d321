//! Hitless upgrade: a new agent takes over from the running one (listeners handed over, maps
//! shared) while traffic flows, and nothing is lost: no failed new connection, no cut long-lived
//! one, every byte echoed.

use std::{net::SocketAddr, time::Duration};

use ferry_sandbox::{ConnectOutcome, Process, Sandbox};

const PORT: u16 = 8080;
/// How long the load runs; the three upgrades of each node happen inside it.
const LOAD_SECS: u64 = 10;

fn addr(sb: &Sandbox, pod: &str) -> SocketAddr {
    SocketAddr::from((sb.pod(pod).ip, PORT))
}

/// The app's last stdout line.
fn result(child: Process) -> String {
    child.finish().expect("load app")
}

/// The agents' warnings and errors, to explain a failure.
fn problems(sb: &Sandbox) -> String {
    let lines = ["node1", "node2"].map(|node| {
        let log = sb.agent_log(node);
        let bad: Vec<String> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .map(|l| format!("{node}: {l}"))
            .collect();
        bad.join("\n")
    });
    lines.join("\n")
}

#[test]
fn upgrades_under_load_lose_no_connection_and_no_byte() {
    let mut sb = Sandbox::two_nodes("upgrade").unwrap();
    for node in ["node1", "node2"] {
        // Long enough for the long-lived connections to end on their own in the old agents.
        // Dual-stack: each pod's IPv6 listeners are handed over too.
        let config = sb.dual_stack_config_for(node).replacen('\n', "\nlimits:\n  drainTimeout: 60s\n", 1);
        sb.start_agent(node, Some(&config)).unwrap();
    }
    let _server_b = sb.pod("b").serve(PORT).unwrap();
    let _server_c = sb.pod("c").serve(PORT).unwrap();
    let (cross, same) = (addr(&sb, "c"), addr(&sb, "b"));
    let cross6 = SocketAddr::from((sb.pod("c").ip6, PORT));
    let secs = LOAD_SECS.to_string();
    let mut load = Vec::new();
    for to in [cross, same, cross6] {
        // Long-lived: a verified 1-byte ping-pong every 10 ms on one connection.
        load.push(("stream", to, sb.pod("a").spawn_app(&["stream", &to.to_string(), &secs]).unwrap()));
        // New connections back to back: connect, echo a byte, close.
        load.push(("cps", to, sb.pod("a").spawn_app(&["cps", &to.to_string(), &secs]).unwrap()));
    }

    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(800));
        sb.upgrade_agent("node1").unwrap();
        std::thread::sleep(Duration::from_millis(800));
        sb.upgrade_agent("node2").unwrap();
    }

    for (kind, to, child) in load {
        let line = result(child);
        let fields: Vec<&str> = line.split_whitespace().collect();
        match (kind, fields.as_slice()) {
            // 10 ms apart for 10 s, minus the proxy's share: far more than a stall would leave.
            ("stream", ["streamed", n]) => {
                assert!(n.parse::<u64>().unwrap() > 300, "long-lived to {to}: only {n} round trips")
            }
            ("cps", ["cps", rate, errors]) => {
                assert_eq!(
                    *errors,
                    "0",
                    "new connections to {to} failed ({rate}/s succeeded)\n{}",
                    problems(&sb)
                );
                assert!(rate.parse::<f64>().unwrap() > 10.0, "new connections to {to}: {rate}/s");
            }
            _ => panic!("{kind} to {to} ended with {line:?}\n{}", problems(&sb)),
        }
    }

    // The retired agents finish their connections and exit cleanly, on their own.
    for node in ["node1", "node2"] {
        let statuses = sb.wait_retired(node, Duration::from_secs(30)).unwrap();
        assert_eq!(statuses.len(), 3);
        assert!(statuses.iter().all(|s| s.success()), "{node}: {statuses:?}");
    }
    // The newest agents serve alone: capture still works, and they own the admin sockets.
    assert!(matches!(sb.pod("a").connect(cross, 10).unwrap(), ConnectOutcome::Echoed { .. }));
    let status = sb.ferry_json("node1", &["status"]).unwrap();
    assert_eq!(status["workloads_captured"], 2, "{status}");
}
