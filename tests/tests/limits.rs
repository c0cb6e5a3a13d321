//! Resource bounds: per-pod connection limit and idle timeout.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use ferry_sandbox::{ConnectOutcome, Sandbox, hbone_client_with};

const PORT: u16 = 8080;

fn live_connections(sb: &Sandbox) -> u64 {
    sb.ferry_json("node1", &["status"]).unwrap()["connections"].as_u64().unwrap()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A container runtime may start the agent with a soft open-files limit of 1024, a few hundred
/// connections: the agent raises it to the hard limit, and says when even that is too low for
/// `limits.maxConnectionsPerNode`.
#[test]
fn the_agent_raises_its_open_files_limit_and_warns_when_the_hard_one_is_low() {
    let mut sb = Sandbox::two_nodes("nofile").unwrap();
    sb.set_agent_open_files("node1", 1024, 8192);
    // 8192 descriptors, up to 6 per connection: enough for 1365 connections.
    let base = sb.config_for("node1");
    let config = |max: u32| base.replacen('\n', &format!("\nlimits: {{maxConnectionsPerNode: {max}}}\n"), 1);
    let enough = config(1365);
    sb.start_agent("node1", Some(&enough)).unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", sb.agent_pid("node1").unwrap())).unwrap();
    let open_files: Vec<&str> =
        limits.lines().find(|l| l.starts_with("Max open files")).unwrap().split_whitespace().collect();
    assert_eq!(open_files[3..5], ["8192", "8192"], "{limits}");
    let log = sb.agent_log("node1");
    assert!(log.contains("open files limit raised from=1024 to=8192"), "{log}");
    assert!(!log.contains("allows about"), "{log}");

    sb.stop_agent("node1");
    let too_many = config(1366);
    sb.start_agent("node1", Some(&too_many)).unwrap();
    let warning = "the open files limit (8192) allows about 1365 connections at once";
    sb.wait_for_log("node1", warning, 1).unwrap();
}

/// Sets a running process's soft open-files limit (raising a hard limit takes a capability this
/// VM does not grant); the previous one.
fn set_open_files(pid: u32, soft: u64) -> u64 {
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on valid pointers.
    unsafe {
        assert_eq!(libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old), 0);
        let new = libc::rlimit { rlim_cur: soft, rlim_max: old.rlim_max };
        let done = libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut());
        assert_eq!(done, 0, "prlimit: {}", std::io::Error::last_os_error());
    }
    old.rlim_cur
}

/// Out of descriptors, the agent backs off and says so once a second, not at every retry, and
/// serves again once it has descriptors.
#[test]
fn out_of_descriptors_the_agent_backs_off_quietly_and_recovers() {
    let mut sb = Sandbox::two_nodes("emfile").unwrap();
    sb.start_agent("node1", None).unwrap();
    let _server = sb.pod("b").serve(PORT).unwrap();
    let b = SocketAddr::from((sb.pod("b").ip, PORT));
    let pid = sb.agent_pid("node1").unwrap();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64;
    // Room for a few connections (up to 4 descriptors each), not for 50.
    let old = set_open_files(pid, open + 12);
    let holder = sb.pod("a").spawn_app(&["hold", &b.to_string(), "50"]).unwrap();
    let warning = "accept failed, retrying";
    sb.wait_for_log("node1", warning, 1).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let lines = sb.agent_log("node1").matches(warning).count();
    // One listener (a's outbound) retrying every 50 ms: about 60 retries, 3 lines.
    assert!(lines <= 4, "{lines} lines:\n{}", sb.agent_log("node1"));
    drop(holder);

    set_open_files(pid, old);
    // The connections that waited are taken and end (their app is gone); new ones are served.
    wait_until("the waiting connections to end", Duration::from_secs(10), || live_connections(&sb) == 0);
    let outcome = sb.pod("a").connect(b, 10).unwrap();
    assert!(matches!(outcome, ConnectOutcome::Echoed { .. }), "{outcome:?}");
}

#[test]
fn connection_limit_refuses_extra_connections_and_idle_ones_are_closed() {
    let mut sb = Sandbox::two_nodes("limits").unwrap();
    let config =
        sb.config_for("node1").replacen('\n', "\nlimits: {maxConnectionsPerPod: 3, idleTimeout: 2s}\n", 1);
    sb.start_agent("node1", Some(&config)).unwrap();
    let _server = sb.pod("b").serve(PORT).unwrap();
    let b = SocketAddr::from((sb.pod("b").ip, PORT)).to_string();

    // Three quiet connections from a use up its quota...
    let holders: Vec<_> = (0..3).map(|_| sb.pod("a").spawn_app(&["idle", &b, "30"]).unwrap()).collect();
    wait_until("3 live connections", Duration::from_secs(2), || live_connections(&sb) == 3);
    // ...so the fourth is refused at once, and counted; b (another pod) is not affected.
    let outcome = sb.pod("a").connect(b.parse().unwrap(), 10).unwrap();
    assert!(matches!(outcome, ConnectOutcome::Reset { .. }), "{outcome:?}");
    let limit = "ferry_proxy_connection_failures_total{direction=\"outbound\",reason=\"limit\"}";
    assert_eq!(sb.metric("node1", limit).unwrap(), 1.0);
    sb.wait_for_log("node1", "connection limit reached", 1).unwrap();
    // A burst of refusals is counted one by one, and logged at most once a second.
    let burst = Instant::now();
    for _ in 0..20 {
        let outcome = sb.pod("a").connect(b.parse().unwrap(), 10).unwrap();
        assert!(matches!(outcome, ConnectOutcome::Reset { .. }), "{outcome:?}");
    }
    let seconds = burst.elapsed().as_secs() as usize;
    assert_eq!(sb.metric("node1", limit).unwrap(), 21.0);
    let lines = sb.agent_log("node1").matches("connection limit reached").count();
    assert!(lines <= 2 + seconds, "{lines} log lines for 21 refusals in {seconds} s");

    // The quiet ones are closed by the idle timeout, which frees the quota.
    wait_until("idle connections to close", Duration::from_secs(5), || live_connections(&sb) == 0);
    let idle = "ferry_proxy_connection_failures_total{direction=\"outbound\",reason=\"idle\"}";
    assert_eq!(sb.metric("node1", idle).unwrap(), 3.0);
    let outcome = sb.pod("a").connect(b.parse().unwrap(), 10).unwrap();
    assert!(matches!(outcome, ConnectOutcome::Echoed { .. }), "{outcome:?}");
    drop(holders);
}

#[test]
fn a_silent_peer_on_15008_is_cut_off_after_the_handshake_timeout() {
    use std::io::Read;
    let mut sb = Sandbox::two_nodes("silent").unwrap();
    let config = sb.config_for("node2").replacen('\n', "\nlimits: {handshakeTimeout: 1s}\n", 1);
    sb.start_agent("node2", Some(&config)).unwrap();
    let hbone = SocketAddr::from((sb.pod("c").ip, 15008));
    // Connects and never says a word (slowloris); a second one sends half a TLS record.
    let mut silent = sb.node("node1").netns.connect(hbone, Duration::from_secs(2)).unwrap();
    let mut slow = sb.node("node1").netns.connect(hbone, Duration::from_secs(2)).unwrap();
    std::io::Write::write_all(&mut slow, &[0x16, 0x03, 0x01, 0x02]).unwrap();
    let started = Instant::now();
    for stream in [&mut silent, &mut slow] {
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "the agent kept talking to a silent peer");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(800) && elapsed < Duration::from_secs(3),
        "cut after {elapsed:?}"
    );
    let series = "ferry_proxy_connection_failures_total{direction=\"inbound\",reason=\"tls_handshake\"}";
    assert_eq!(sb.metric("node2", series).unwrap(), 2.0);
    sb.wait_for_log("node2", "TLS handshake timed out", 1).unwrap();

    // A peer with a valid certificate that completes TLS and then sends nothing, not even the
    // HTTP/2 preface, gets as long for its first request.
    let cert = sb.issue_cert(&sb.ca_dir(), "spiffe://cluster.local/ns/default/sa/quiet", "quiet").unwrap();
    let out =
        hbone_client_with(&sb.node("node1").netns, hbone, Some(&cert), &sb.ca_dir(), &["--idle", "5"], &[])
            .unwrap();
    assert_eq!(out[0]["tls"], "TLSv1.3", "{out:?}");
    let closed_after = out[1]["closed_after"].as_f64().unwrap_or_else(|| panic!("never closed: {out:?}"));
    assert!((0.8..3.0).contains(&closed_after), "closed after {closed_after} s");
    let series = "ferry_proxy_connection_failures_total{direction=\"inbound\",reason=\"idle\"}";
    assert_eq!(sb.metric("node2", series).unwrap(), 1.0);
    sb.wait_for_log("node2", "no HBONE request within 1s of the TLS handshake", 1).unwrap();
}

#[test]
fn a_destination_that_never_answers_is_given_up_after_the_connect_timeout() {
    let mut sb = Sandbox::two_nodes("blackhole").unwrap();
    let config = sb.config_for("node1").replacen('\n', "\nlimits: {connectTimeout: 1s}\n", 1);
    sb.start_agent("node1", Some(&config)).unwrap();
    // From a, c's address leads into a veth pair that loses everything: frames leave void0
    // (ARP off) addressed to void0's own MAC, so void1 drops them as meant for another host. SYNs
    // vanish without an answer, as to a node that went down.
    let (a, c) = (sb.pod("a"), SocketAddr::from((sb.pod("c").ip, PORT)));
    for args in [
        &["link", "add", "void0", "type", "veth", "peer", "name", "void1"][..],
        &["link", "set", "void0", "arp", "off", "up"],
        &["link", "set", "void1", "up"],
        &["route", "add", &format!("{}/32", c.ip()), "dev", "void0"],
    ] {
        a.netns.ip(args).unwrap();
    }

    // The app's connect succeeds (to the agent), so only the agent can give up on the dial: the
    // app sees a reset, not its own 10 s read timeout.
    let started = Instant::now();
    let outcome = a.connect(c, 10).unwrap();
    assert!(matches!(outcome, ConnectOutcome::Reset { .. }), "{outcome:?} after {:?}", started.elapsed());
    let series = "ferry_proxy_connection_failures_total{direction=\"outbound\",reason=\"connect\"}";
    assert_eq!(sb.metric("node1", series).unwrap(), 1.0);
    sb.wait_for_log("node1", &format!("no answer from {}:15008 within 1s", c.ip()), 1).unwrap();
}

/// 15020 and 15021 listen on every address of the node: a client that sends nothing, or half a
/// request, must not hold a descriptor for ever. Neither does one of the admin API.
#[test]
fn the_agents_http_endpoints_close_connections_that_send_no_whole_request() {
    use std::io::{Read, Write};
    let mut sb = Sandbox::two_nodes("slowloris").unwrap();
    sb.start_agent("node1", None).unwrap();
    let node = sb.node("node1");
    let opened = Instant::now();
    let held: Vec<_> = [(15020, ""), (15021, "GET /healthz/ready HTTP/1.1\r\nHost: node\r\n"), (15000, "")]
        .into_iter()
        .map(|(port, sent)| {
            let mut stream =
                node.netns.connect(SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(2)).unwrap();
            stream.write_all(sent.as_bytes()).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            (port, stream)
        })
        .collect();
    // Others are served meanwhile.
    assert_eq!(node.http_get(15021, "/healthz/ready").unwrap().0, 200);
    // A response being streamed is no request being waited for: it is not cut.
    let mut follow =
        node.netns.connect(SocketAddr::from(([127, 0, 0, 1], 15000)), Duration::from_secs(2)).unwrap();
    follow.write_all(b"GET /flows?follow=1 HTTP/1.1\r\nHost: node\r\n\r\n").unwrap();
    for (port, mut stream) in held {
        let mut answer = Vec::new();
        // The server closes (an EOF, perhaps after a 408) or resets; a read timeout means it held on.
        let ended = match stream.read_to_end(&mut answer) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        let after = opened.elapsed();
        assert!(ended, "port {port}: still open after {after:?}");
        assert!((9..20).contains(&after.as_secs()), "port {port}: closed after {after:?}, not 10 s");
    }
    let _ = sb.pod("a").connect(SocketAddr::from((sb.pod("c").ip, PORT)), 10).unwrap();
    follow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut streamed = String::new();
    let mut chunk = [0u8; 4096];
    while !streamed.contains("\"kind\"") {
        match follow.read(&mut chunk) {
            Ok(n) if n > 0 => streamed.push_str(&String::from_utf8_lossy(&chunk[..n])),
            end => panic!("the flows stream ended ({end:?}) after {:?}: {streamed}", opened.elapsed()),
        }
    }
}
