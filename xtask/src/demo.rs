//! `cargo xtask demo`: two nodes, two pods each, one agent per node, traffic through them.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use clap::Subcommand;
use ferry_sandbox::{ConnectOutcome, PodSpec, Sandbox, teardown};

const DEMO_ID: &str = "ferry-demo";
const PORT: u16 = 8080;

#[derive(Subcommand, Clone, Copy)]
pub(crate) enum Action {
    /// Remove a sandbox left by `demo --keep`.
    Down,
}

pub(crate) fn run(action: Option<Action>, keep: bool) -> Result<()> {
    if let Some(Action::Down) = action {
        teardown(DEMO_ID);
        println!("demo sandbox removed");
        return Ok(());
    }
    // Release binaries: the demo prints rough performance figures.
    crate::use_release_binaries()?;
    // Ctrl-C: the agents get SIGINT from the terminal and exit; remove the rest too.
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: tearing the demo down");
        teardown(DEMO_ID);
        std::process::exit(130);
    })?;
    let result = demo(keep);
    if result.is_err() {
        teardown(DEMO_ID);
    }
    result
}

fn demo(keep: bool) -> Result<()> {
    println!("== building the sandbox: node1 {{a, b}}, node2 {{c, d}}; d is not meshed");
    let mut sb = Sandbox::named(
        DEMO_ID,
        &[
            ("node1", vec![PodSpec::meshed("a", "frontend"), PodSpec::meshed("b", "cache")]),
            ("node2", vec![PodSpec::meshed("c", "backend"), PodSpec::unmeshed("d")]),
        ],
    )?;
    for pod in &sb.pods {
        println!(
            "   pod {} on {}: {} and {} (netns {}, meshed: {})",
            pod.spec.name,
            pod.node,
            pod.ip,
            pod.ip6,
            pod.netns.name(),
            pod.spec.meshed
        );
    }
    let servers = sb.pods.iter().map(|p| p.serve(PORT)).collect::<Result<Vec<_>>>()?;

    println!("\n== direct, before any agent runs");
    let direct_same = measure(&sb, "a", "b")?;
    let direct_cross = measure(&sb, "a", "c")?;

    println!("\n== starting one agent per node (configs in {})", sb.dir.display());
    for node in ["node1", "node2"] {
        // Pods dual-stack: meshed over both IPv4 and IPv6.
        sb.start_agent(node, Some(&sb.dual_stack_config_for(node)))?;
    }

    println!("\n== traffic");
    let (v4, v6) = (false, true);
    for (from, to, ipv6) in
        [("a", "b", v4), ("a", "c", v4), ("a", "c", v6), ("c", "a", v4), ("d", "c", v4), ("a", "d", v4)]
    {
        let pod = sb.pod(to);
        let dst = if ipv6 { SocketAddr::from((pod.ip6, PORT)) } else { SocketAddr::from((pod.ip, PORT)) };
        let seen_before = servers[index(&sb, to)].accepted().len();
        let outcome = sb.pod(from).connect(dst, 64 * 1024)?;
        let seen = servers[index(&sb, to)].wait_accepted(seen_before + 1, Duration::from_secs(2));
        let peer = seen.get(seen_before).map_or("nothing".to_owned(), ToString::to_string);
        let path = path_of(&sb, from, to);
        match outcome {
            ConnectOutcome::Echoed { peer: app_peer, bytes } => println!(
                "   {from} -> {to} at {dst} ({path}): {bytes} bytes echoed; app's getpeername() = {app_peer}; server saw {peer}"
            ),
            other => anyhow::bail!("{from} -> {to} failed: {other:?}"),
        }
    }

    println!("\n== cross-node traffic travels over mTLS (HBONE); node2's view of who connected:");
    for line in sb
        .agent_log("node2")
        .lines()
        .filter(|l| l.contains("route=\"hbone\"") && l.contains("direction=\"inbound\""))
    {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or("?")
                .trim_matches('"')
                .to_owned()
        };
        println!(
            "   {} ({}) -> {} ({})",
            field("src="),
            field("src_identity="),
            field("dst="),
            field("dst_identity=")
        );
    }

    println!("\n== through the agents");
    let mesh_same = measure(&sb, "a", "b")?;
    let mesh_cross = measure(&sb, "a", "c")?;
    println!("\n   rough figures           ping-pong p50/p99 (us)   bulk (Gbit/s)");
    for (name, (p50, p99, gbps)) in [
        ("direct same-node", direct_same),
        ("ferry same-node", mesh_same),
        ("direct cross-node", direct_cross),
        ("ferry cross-node mTLS", mesh_cross),
    ] {
        println!("   {name:<23} {p50:>10} / {p99:<10}      {gbps:>6.2}");
    }

    for node in ["node1", "node2"] {
        println!("\n== {node}: datapath and proxy counters (http://127.0.0.1:15020/metrics in its netns)");
        for line in sb.metrics(node)?.lines().filter(|l| l.starts_with("ferry_") && !l.ends_with(" 0")) {
            println!("   {line}");
        }
        println!("== {node}: access log (last lines)");
        let log = sb.agent_log(node);
        let access: Vec<&str> = log.lines().filter(|l| l.contains("access")).collect();
        for line in access.iter().rev().take(4).rev() {
            println!("   {line}");
        }
    }

    if keep {
        print_keep_help(&sb);
        // The servers live in the pods' cgroups: `demo down` stops them with everything else.
        std::mem::forget(servers);
        sb.keep();
        return Ok(());
    }
    println!("\n== tearing down");
    for node in ["node1", "node2"] {
        let status = sb.stop_agent(node).context("agent was not running")?;
        println!("   agent on {node} stopped: {status}");
    }
    Ok(())
}

fn index(sb: &Sandbox, pod: &str) -> usize {
    sb.pods.iter().position(|p| p.spec.name == pod).expect("pod exists")
}

fn path_of(sb: &Sandbox, from: &str, to: &str) -> &'static str {
    let (from, to) = (sb.pod(from), sb.pod(to));
    match (from.spec.meshed, to.spec.meshed, from.node == to.node) {
        (true, true, true) => "same node, through node1's agent",
        (true, true, false) => "cross node, HBONE/mTLS between the agents",
        (true, false, _) => "captured at the source, passed through",
        (false, true, _) => "uncaptured source, destination agent inbound",
        (false, false, _) => "direct",
    }
}

/// Ping-pong p50/p99 and bulk throughput from one pod to another's echo server.
fn measure(sb: &Sandbox, from: &str, to: &str) -> Result<(u64, u64, f64)> {
    let dst = SocketAddr::from((sb.pod(to).ip, PORT));
    let (p50, p99) = sb.pod(from).ping_pong(dst, 2000)?;
    let gbps = sb.pod(from).bulk(dst, 256)?;
    println!("   {from} -> {to}: ping-pong p50 {p50} us, p99 {p99} us; bulk {gbps:.2} Gbit/s");
    Ok((p50, p99, gbps))
}

fn print_keep_help(sb: &Sandbox) {
    let a = sb.pod("a");
    println!(
        "\n== the sandbox stays up. Try:
   # metrics of node1's agent (they live in the node's netns)
   nsenter --net=/run/netns/{id}-node1 curl -s http://127.0.0.1:15020/metrics | grep ^ferry_
   # a connection from pod a: join its cgroup (capture) and its netns (addresses)
   sh -c 'echo $$ > {cgroup}/cgroup.procs; exec nsenter --net={netns} python3 -c \
     \"import socket; s=socket.create_connection((\\\"{c_ip}\\\", {PORT})); print(s.getpeername())\"'
   tail -f {log}
   cargo xtask demo down      # remove everything",
        id = DEMO_ID,
        cgroup = a.cgroup.path().display(),
        netns = a.netns.path().display(),
        c_ip = sb.pod("c").ip,
        log = sb.log_path("node1").display(),
    );
}
