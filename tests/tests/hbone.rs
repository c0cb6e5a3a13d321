//! HBONE between nodes: real mTLS, real HTTP/2, real sockets in the netns sandbox, and an
//! independent peer (Python h2 + ssl) on the other end for interop.

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use ferry_sandbox::{
    Capture, ConnectOutcome, PodSpec, Sandbox, hbone_client, hbone_client_with, hbone_server, parse_metrics,
    sum_samples, with_labels,
};
use serde_json::Value;

const PORT: u16 = 8080;

fn sandbox(label: &str) -> Sandbox {
    Sandbox::new(
        label,
        &[("node1", vec![PodSpec::meshed("a", "sa-a")]), ("node2", vec![PodSpec::meshed("c", "sa-c")])],
    )
    .expect("sandbox")
}

fn addr(sb: &Sandbox, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::from((sb.pod(pod).ip, port))
}

fn metric(sb: &Sandbox, node: &str, series: &str) -> f64 {
    sb.metric(node, series).unwrap_or_else(|e| panic!("scraping {node}: {e}"))
}

fn failures(sb: &Sandbox, node: &str, direction: &str, reason: &str) -> f64 {
    metric(
        sb,
        node,
        &format!("ferry_proxy_connection_failures_total{{direction=\"{direction}\",reason=\"{reason}\"}}"),
    )
}

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

#[test]
fn underlay_carries_only_tls13_with_alpn_h2_to_15008() {
    let mut sb = sandbox("wire");
    sb.start_agent("node1", None).unwrap();
    sb.start_agent("node2", None).unwrap();
    let _server = sb.pod("c").serve(PORT).unwrap();
    let capture = Capture::start(&sb.node("node1").netns, "ul").unwrap();
    let outcome = sb.pod("a").connect(addr(&sb, "c", PORT), 64 * 1024).unwrap();
    assert!(matches!(outcome, ConnectOutcome::Echoed { bytes: 65536, .. }), "{outcome:?}");
    std::thread::sleep(Duration::from_millis(100));
    let segments = capture.finish().unwrap();

    let hbone = SocketAddrV4::new(sb.pod("c").ip, 15008);
    let with_payload: Vec<_> = segments.iter().filter(|s| !s.payload.is_empty()).collect();
    assert!(!with_payload.is_empty(), "nothing captured");
    for s in &segments {
        assert!(s.dst == hbone || s.src == hbone, "segment outside HBONE: {} -> {}", s.src, s.dst);
    }
    // The app's payload is bytes 0,1,2,... mod 251: no 64-byte run of it may appear in clear.
    let plaintext: Vec<u8> = (0..64u8).collect();
    for s in &with_payload {
        assert!(!s.payload.windows(64).any(|w| w == plaintext.as_slice()), "plaintext on the wire");
    }
    let client_hello = &with_payload.iter().find(|s| s.dst == hbone).unwrap().payload;
    assert_eq!(client_hello[0], 0x16, "first client record is not a handshake");
    assert!(client_hello.windows(3).any(|w| w == b"\x02h2"), "ClientHello offers no ALPN h2");
    let server_hello = &with_payload.iter().find(|s| s.src == hbone).unwrap().payload;
    // supported_versions extension (0x002b) selecting TLS 1.3 (0x0304).
    assert!(
        server_hello.windows(6).any(|w| w == [0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]),
        "ServerHello is not TLS 1.3"
    );
}

#[test]
fn python_h2_client_against_ferry_server() {
    let mut sb = sandbox("pyclient");
    // c serves service web, port 80 on its 8080 (an authority may name it, as ztunnel's may).
    let web = "services:
  - {name: web, namespace: default, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}], selector: {app: c}}
";
    let config = with_labels(&sb.config_for("node2"), "c", "{app: c}");
    sb.start_agent("node2", Some(&format!("{config}{web}"))).unwrap();
    let _server = sb.pod("c").serve(PORT).unwrap();
    let cert = sb.issue_cert(&sb.ca_dir(), &spiffe("py"), "py").unwrap();
    let c = sb.pod("c").ip;
    let requests = [
        format!("CONNECT,{c}:{PORT},hello over hbone"),
        format!("GET,{c}:{PORT}"),
        format!("CONNECT,10.2.0.99:{PORT}"),
        format!("CONNECT,{c}:15001"),
        format!("CONNECT,{c}:15006"),
        format!("CONNECT,{c}:15008"),
        format!("CONNECT,{c}:9999"),
        "CONNECT,web.default.svc.cluster.local:80,hello by name".into(),
        "CONNECT,web.default.svc.cluster.local:81".into(),
        "CONNECT,db.default.svc.cluster.local:80".into(),
    ];
    let requests: Vec<&str> = requests.iter().map(String::as_str).collect();
    let out =
        hbone_client(&sb.node("node1").netns, addr(&sb, "c", 15008), Some(&cert), &sb.ca_dir(), &requests)
            .unwrap();
    assert_eq!(out[0]["server_identity"], spiffe("sa-c"), "{out:?}");
    assert_eq!(out[0]["alpn"], "h2");
    assert_eq!(out[0]["tls"], "TLSv1.3");
    let statuses: Vec<&Value> = out[1..].iter().map(|r| &r["status"]).collect();
    assert_eq!(statuses, [200, 400, 400, 503, 503, 503, 503, 200, 503, 503], "{out:#?}");
    assert_eq!(out[1]["echo"], "hello over hbone");
    assert_eq!(out[8]["echo"], "hello by name");
    assert_eq!(out[1]["headers"]["baggage"], "k8s.namespace.name=default,k8s.pod.name=c");
    assert_eq!(failures(&sb, "node2", "inbound", "bad_request"), 2.0);
    assert_eq!(failures(&sb, "node2", "inbound", "unavailable"), 6.0);
    sb.wait_for_log("node2", "authority IP is not the pod the connection arrived on", 1).unwrap();
    sb.wait_for_log("node2", "recursion", 1).unwrap();
    // The accepted stream's access line names the peer's identity and the forwarded client.
    sb.wait_for_log("node2", "src=192.0.2.9:4000", 1).unwrap();
    sb.wait_for_log("node2", &format!("src_identity={}", spiffe("py")), 1).unwrap();

    // ALPN: a client offering only other protocols is refused; one offering none is HTTP/2 by
    // prior knowledge.
    let node1 = &sb.node("node1").netns;
    let hbone = addr(&sb, "c", 15008);
    let out =
        hbone_client_with(node1, hbone, Some(&cert), &sb.ca_dir(), &["--alpn", "http/1.1"], &requests[..1])
            .unwrap();
    let error = out[0]["tls_error"].as_str().unwrap_or_default();
    assert!(error.contains("no application protocol"), "{out:?}");
    let out = hbone_client_with(node1, hbone, Some(&cert), &sb.ca_dir(), &["--alpn", "none"], &requests[..1])
        .unwrap();
    assert_eq!(out[1]["status"], 200, "{out:?}");
}

#[test]
fn ferry_client_against_python_h2_server() {
    let mut sb = sandbox("pyserver");
    let cert = sb.issue_cert(&sb.ca_dir_created().unwrap(), &spiffe("sa-c"), "c").unwrap();
    let peer = hbone_server(&sb.pod("c").netns, addr(&sb, "c", 15008), &cert, &sb.ca_dir(), &[]).unwrap();
    sb.start_agent("node1", None).unwrap();

    let outcome = sb.pod("a").connect(addr(&sb, "c", PORT), 100_000).unwrap();
    assert_eq!(outcome, ConnectOutcome::Echoed { peer: addr(&sb, "c", PORT), bytes: 100_000 });
    let events = peer.wait_events(1, Duration::from_secs(2));
    let request = &events[0];
    assert_eq!(request["client_identity"], spiffe("sa-a"));
    assert_eq!(
        request["pseudo"],
        serde_json::json!({":method": "CONNECT", ":authority": format!("{}:{PORT}", sb.pod("c").ip)})
    );
    let headers = &request["headers"];
    let forwarded = headers["forwarded"].as_str().unwrap();
    assert!(forwarded.starts_with(&format!("for=\"{}:", sb.pod("a").ip)), "{forwarded}");
    assert_eq!(headers["baggage"], "k8s.namespace.name=default,k8s.pod.name=a");
    let traceparent = headers["traceparent"].as_str().unwrap();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(
        (parts.len(), parts[0], parts[1].len(), parts[2].len(), parts[3]),
        (4, "00", 32, 16, "00"),
        "{traceparent}"
    );
    assert_eq!(request["header_order"][0], ":method", "pseudo-headers first");
}

#[test]
fn the_apps_first_bytes_go_out_before_the_connect_is_answered() {
    // A server that answers only once data has arrived: a client that waited for the answer
    // before sending would never get one.
    let mut sb = sandbox("early");
    let cert = sb.issue_cert(&sb.ca_dir_created().unwrap(), &spiffe("sa-c"), "c").unwrap();
    let server = addr(&sb, "c", 15008);
    let peer =
        hbone_server(&sb.pod("c").netns, server, &cert, &sb.ca_dir(), &["--answer-after-data"]).unwrap();
    sb.start_agent("node1", None).unwrap();

    let outcome = sb.pod("a").connect(addr(&sb, "c", PORT), 1000).unwrap();
    assert_eq!(outcome, ConnectOutcome::Echoed { peer: addr(&sb, "c", PORT), bytes: 1000 });
    let events = peer.wait_events(2, Duration::from_secs(2));
    let answered = events.iter().find_map(|e| e["answered_after_bytes"].as_u64());
    assert!(answered.is_some_and(|n| n > 0), "{events:?}");
}

#[test]
fn a_connect_the_peer_never_answers_is_given_up_after_the_connect_timeout() {
    // The peer completes TLS and HTTP/2 and answers pings, so its connection stays up; only a
    // bound on the CONNECT's answer frees the app's connection.
    let mut sb = sandbox("unanswered");
    let cert = sb.issue_cert(&sb.ca_dir_created().unwrap(), &spiffe("sa-c"), "c").unwrap();
    let server = addr(&sb, "c", 15008);
    let peer = hbone_server(&sb.pod("c").netns, server, &cert, &sb.ca_dir(), &["--never-answer"]).unwrap();
    let config = sb.config_for("node1").replacen('\n', "\nlimits: {connectTimeout: 1s}\n", 1);
    sb.start_agent("node1", Some(&config)).unwrap();

    let started = Instant::now();
    let outcome = sb.pod("a").connect(addr(&sb, "c", PORT), 10).unwrap();
    let waited = started.elapsed();
    assert!(matches!(outcome, ConnectOutcome::Reset { .. }), "{outcome:?} after {waited:?}");
    assert!(waited >= Duration::from_millis(900), "reset after {waited:?}, before the timeout");
    assert_eq!(failures(&sb, "node1", "outbound", "connect"), 1.0);
    sb.wait_for_log("node1", &format!("no answer to the CONNECT from {server} within 1s"), 1).unwrap();
    // The stream is cancelled on the wire, not left open on the peer.
    let events = peer.wait_events(2, Duration::from_secs(2));
    let reset = events.iter().find(|e| e.get("reset").is_some());
    assert_eq!(reset.map(|e| e["error_code"].clone()), Some(Value::from(8)), "RST_STREAM CANCEL: {events:?}");
}

/// How a stream ends is how the app's connection ends (hbone.md, RFC 9113 section 8.5): a
/// RST_STREAM with CANCEL (what ztunnel sends for a stream it is done with) is an orderly end, one
/// with CONNECT_ERROR (the peer's TCP connection was reset) is a reset; either comes after the
/// bytes sent before it. And Ferry, as the server, sends CONNECT_ERROR when its app resets.
#[test]
fn stream_resets_and_connection_resets_carry_over_both_ways() {
    let mut sb = sandbox("resets");
    let cert = sb.issue_cert(&sb.ca_dir_created().unwrap(), &spiffe("sa-c"), "c").unwrap();
    let server = addr(&sb, "c", 15008);
    sb.start_agent("node1", None).unwrap();
    for (code, ending) in [(8, "then closed"), (10, "then reset")] {
        let args = ["--greet-then-reset".to_owned(), code.to_string()];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _peer = hbone_server(&sb.pod("c").netns, server, &cert, &sb.ca_dir(), &args).unwrap();
        let heard = sb.pod("a").await_greeting_to_end(addr(&sb, "c", PORT)).unwrap();
        assert_eq!(heard, format!("greeted 220 sandbox ready\n{ending}"), "RST_STREAM {code}");
    }

    // Ferry as the server: its app greets, then resets.
    drop(sb);
    let mut sb = sandbox("resets2");
    let _app = sb.pod("c").serve_then_reset(PORT).unwrap();
    sb.start_agent("node2", None).unwrap();
    let cert = sb.issue_cert(&sb.ca_dir_created().unwrap(), &spiffe("sa-a"), "a").unwrap();
    let request = format!("CONNECT,{}", addr(&sb, "c", PORT));
    let server = addr(&sb, "c", 15008);
    let out = hbone_client(&sb.node("node1").netns, server, Some(&cert), &sb.ca_dir(), &[&request]).unwrap();
    assert_eq!(out[1]["status"], 200, "{out:?}");
    assert_eq!(out[1]["echo"], "220 sandbox ready\n", "{out:?}");
    assert_eq!(out[1]["reset"], 10, "RST_STREAM CONNECT_ERROR: {out:?}");
}

#[test]
fn ferry_client_resets_when_the_server_has_the_wrong_identity() {
    let mut sb = sandbox("wrongid");
    let cert = sb.issue_cert(&sb.ca_dir_created().unwrap(), &spiffe("impostor"), "impostor").unwrap();
    let _peer = hbone_server(&sb.pod("c").netns, addr(&sb, "c", 15008), &cert, &sb.ca_dir(), &[]).unwrap();
    sb.start_agent("node1", None).unwrap();
    let outcome = sb.pod("a").connect(addr(&sb, "c", PORT), 10).unwrap();
    assert!(matches!(outcome, ConnectOutcome::Reset { .. }), "{outcome:?}");
    assert_eq!(failures(&sb, "node1", "outbound", "identity"), 1.0);
    sb.wait_for_log("node1", "identity verification error", 1).unwrap();
}

#[test]
fn ferry_server_rejects_untrusted_clients() {
    let mut sb = sandbox("untrusted");
    sb.start_agent("node2", None).unwrap();
    let _server = sb.pod("c").serve(PORT).unwrap();
    let hbone = addr(&sb, "c", 15008);
    let connect = [format!("CONNECT,{}:{PORT},hi", sb.pod("c").ip)];
    let connect: Vec<&str> = connect.iter().map(String::as_str).collect();
    let node1 = &sb.node("node1").netns;

    // A certificate from another CA.
    let other_ca = sb.other_ca("other-ca").unwrap();
    let foreign = sb.issue_cert(&other_ca, &spiffe("py"), "foreign").unwrap();
    let out = hbone_client(node1, hbone, Some(&foreign), &sb.ca_dir(), &connect).unwrap();
    assert_ne!(out.last().unwrap()["status"], 200, "{out:?}");
    // No client certificate at all.
    let out = hbone_client(node1, hbone, None, &sb.ca_dir(), &connect).unwrap();
    assert_ne!(out.last().unwrap()["status"], 200, "{out:?}");
    // The right CA, another trust domain.
    let elsewhere =
        sb.issue_cert(&sb.ca_dir(), "spiffe://elsewhere.example/ns/default/sa/py", "elsewhere").unwrap();
    let out = hbone_client(node1, hbone, Some(&elsewhere), &sb.ca_dir(), &connect).unwrap();
    assert_ne!(out.last().unwrap()["status"], 200, "{out:?}");

    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while failures(&sb, "node2", "inbound", "tls_handshake") < 3.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(failures(&sb, "node2", "inbound", "tls_handshake"), 3.0, "{}", sb.agent_log("node2"));
    sb.wait_for_log("node2", "UnknownIssuer", 1).unwrap();
    sb.wait_for_log("node2", "not in trust domain cluster.local", 1).unwrap();
    // And it keeps serving a trusted client.
    let good = sb.issue_cert(&sb.ca_dir(), &spiffe("py"), "good").unwrap();
    let out = hbone_client(node1, hbone, Some(&good), &sb.ca_dir(), &connect).unwrap();
    assert_eq!(out.last().unwrap()["status"], 200, "{out:?}");
}

#[test]
fn app_connections_share_pooled_hbone_connections_up_to_the_stream_limit() {
    let mut sb = sandbox("pool");
    sb.start_agent("node1", None).unwrap();
    sb.start_agent("node2", None).unwrap();
    let server = sb.pod("c").serve(PORT).unwrap();
    // 150 app connections open at once: 100 streams on the first HBONE connection, 50 on a second.
    assert_eq!(sb.pod("a").hold(addr(&sb, "c", PORT), 150).unwrap(), 150);
    assert_eq!(server.wait_accepted(150, Duration::from_secs(5)).len(), 150);
    assert_eq!(metric(&sb, "node1", "ferry_hbone_connections_opened_total{side=\"client\"}"), 2.0);
    assert_eq!(metric(&sb, "node2", "ferry_hbone_connections_opened_total{side=\"server\"}"), 2.0);
}

/// Pooled HBONE connections serve the pod as it was when they were accepted: a pod served anew
/// (here, relabelled) gets new ones, so new streams see its current labels (and certificate).
#[test]
fn a_pod_served_anew_takes_new_streams_on_new_hbone_connections() {
    let mut sb = sandbox("anew");
    sb.start_agent("node1", None).unwrap();
    sb.start_agent("node2", None).unwrap();
    let _server = sb.pod("c").serve(PORT).unwrap();
    let echoed = |sb: &Sandbox| {
        matches!(sb.pod("a").connect(addr(sb, "c", PORT), 10).unwrap(), ConnectOutcome::Echoed { .. })
    };
    assert!(echoed(&sb));
    let relabelled = with_labels(&sb.config_for("node2"), "c", "{app: c2}");
    assert_ne!(relabelled, sb.config_for("node2"), "c's entry not found");
    sb.reload_agent("node2", &relabelled).unwrap();
    sb.wait_for_log("node2", "config reloaded", 1).unwrap();
    assert!(echoed(&sb));
    let server_side = "ferry_hbone_connections_opened_total{side=\"server\"}";
    assert_eq!(metric(&sb, "node2", server_side), 2.0, "the second stream reused the first connection");
    let samples = parse_metrics(&sb.metrics("node2").unwrap()).unwrap();
    let labels = [("reporter", "destination"), ("destination_workload", "c"), ("destination_app", "c2")];
    assert_eq!(sum_samples(&samples, "istio_tcp_connections_opened_total", &labels), 1.0);
}

/// A new service account is served on the pod's listeners at once, its capture kept: new
/// handshakes present the new identity.
#[test]
fn a_new_service_account_is_presented_by_new_handshakes() {
    let mut sb = sandbox("newsa");
    sb.start_agent("node2", None).unwrap();
    let cert = sb.issue_cert(&sb.ca_dir(), &spiffe("py"), "py").unwrap();
    let presented = |sb: &Sandbox| {
        let hbone = addr(sb, "c", 15008);
        let out = hbone_client(&sb.node("node1").netns, hbone, Some(&cert), &sb.ca_dir(), &[]).unwrap();
        out[0]["server_identity"].as_str().unwrap_or_default().to_owned()
    };
    assert_eq!(presented(&sb), spiffe("sa-c"));
    let renamed = sb.config_for("node2").replace("serviceAccount: sa-c\n", "serviceAccount: sa-c2\n");
    assert_ne!(renamed, sb.config_for("node2"), "c's service account not found");
    sb.reload_agent("node2", &renamed).unwrap();
    sb.wait_for_log("node2", "workload served with its new spec, capture kept workload=default/c", 1)
        .unwrap();
    assert_eq!(presented(&sb), spiffe("sa-c2"));
}

#[test]
fn rotation_keeps_open_connections_and_new_handshakes_get_the_new_certificate() {
    let mut sb = sandbox("rotate");
    for node in ["node1", "node2"] {
        let config = sb.config_for(node).replacen('\n', "\ncertTtl: 2s\n", 1);
        sb.start_agent(node, Some(&config)).unwrap();
    }
    let _server = sb.pod("c").serve(PORT).unwrap();
    // A long-lived connection across several rotations (every second).
    let streamed = sb.pod("a").stream(addr(&sb, "c", PORT), 4).unwrap();
    assert!(streamed > 100, "only {streamed} round trips");
    // Four certificates in the 4 s of the stream with a 2 s TTL (log lines may trail by a batch).
    sb.wait_for_log("node2", "certificate issued", 4).unwrap();

    // New handshakes present the current certificate.
    let cert = sb.issue_cert(&sb.ca_dir(), &spiffe("py"), "py").unwrap();
    let serial = || {
        let out =
            hbone_client(&sb.node("node1").netns, addr(&sb, "c", 15008), Some(&cert), &sb.ca_dir(), &[])
                .unwrap();
        assert_eq!(out[0]["server_identity"], spiffe("sa-c"));
        out[0]["serial"].as_str().unwrap().to_owned()
    };
    let first = serial();
    std::thread::sleep(Duration::from_millis(1500));
    assert_ne!(serial(), first, "the server kept presenting a certificate past its half-life");
    // And new app connections still work.
    assert!(matches!(sb.pod("a").connect(addr(&sb, "c", PORT), 10).unwrap(), ConnectOutcome::Echoed { .. }));
}

#[test]
fn shutdown_drains_open_hbone_streams_with_goaway() {
    let mut sb = sandbox("drain");
    sb.start_agent("node1", None).unwrap();
    sb.start_agent("node2", None).unwrap();
    let _server = sb.pod("c").serve(PORT).unwrap();
    let streamed = std::thread::scope(|s| {
        let stream = s.spawn(|| sb.pod("a").measure_stream(addr(&sb, "c", PORT), 2));
        std::thread::sleep(Duration::from_millis(500));
        let pid = sb.agent_pid("node2").unwrap();
        // SIGTERM: GOAWAY to the peers, then wait for their open streams (up to 5 s).
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        std::thread::sleep(Duration::from_millis(500));
        assert!(sb.agent_log("node2").matches("stopped").count() == 0, "the agent quit with a stream open");
        stream.join().unwrap()
    });
    assert!(streamed.starts_with("streamed"), "the open stream was cut by shutdown: {streamed}");
    let status = sb.stop_agent("node2").unwrap();
    assert!(status.success(), "{}", sb.agent_log("node2"));
    assert!(sb.agent_log("node2").contains("stopped"));
}

/// The root rotation of security.md, each step read by the running agents (SIGHUP on one node,
/// the CA directory's poll on the other), while a connection opened before lives through it.
#[test]
fn a_new_root_is_rolled_out_without_restarting_agents_or_cutting_connections() {
    let mut sb = sandbox("roots");
    let shared = sb.ca_dir_created().unwrap();
    let new_ca = sb.other_ca("new-root").unwrap();
    let read = |path: std::path::PathBuf| std::fs::read_to_string(path).unwrap();
    let (old_root, new_root, new_key) = (
        read(shared.join("root-cert.pem")),
        read(new_ca.join("root-cert.pem")),
        read(new_ca.join("root-key.pem")),
    );
    // Each node its own copy of the CA directory, as each has its own disk.
    let mut configs = Vec::new();
    for node in ["node1", "node2"] {
        let dir = sb.other_ca(&format!("ca-{node}")).unwrap();
        for file in ["root-cert.pem", "root-key.pem"] {
            std::fs::copy(shared.join(file), dir.join(file)).unwrap();
        }
        let config = sb
            .config_for(node)
            .replace(&format!("caDir: {}\n", shared.display()), &format!("caDir: {}\n", dir.display()));
        assert!(config.contains(&dir.display().to_string()), "{config}");
        sb.start_agent(node, Some(&config)).unwrap();
        configs.push((dir, config));
    }
    let _servers = [sb.pod("a").serve(PORT).unwrap(), sb.pod("c").serve(PORT).unwrap()];
    let reaches = |from: &str, to: &str| {
        matches!(sb.pod(from).connect(addr(&sb, to, PORT), 10).unwrap(), ConnectOutcome::Echoed { .. })
    };
    let wait_until = |what: &str, within: Duration, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + within;
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what} within {within:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert!(reaches("a", "c") && reaches("c", "a"));
    let roots = |node: &str| metric(&sb, node, "ferry_trusted_roots");
    // The root each node's certificate chains to (`ferry certs`).
    let root_of =
        |node: &str| sb.ferry_json(node, &["certs"]).unwrap()[0]["root"].as_str().unwrap().to_owned();
    assert_eq!(root_of("node1"), root_of("node2"));

    std::thread::scope(|s| {
        let stream = s.spawn(|| sb.pod("a").measure_stream(addr(&sb, "c", PORT), 20));
        std::thread::sleep(Duration::from_millis(500));

        // Node 1 signs with the new root before node 2 trusts it: node 2 must refuse its new
        // handshakes, which only happens if node 1 took the new root (and renewed) on SIGHUP.
        let (node1_dir, node1_config) = &configs[0];
        std::fs::write(node1_dir.join("root-cert.pem"), &new_root).unwrap();
        std::fs::write(node1_dir.join("root-key.pem"), &new_key).unwrap();
        std::fs::write(node1_dir.join("trust-bundle.pem"), &old_root).unwrap();
        sb.reload_agent("node1", node1_config).unwrap();
        wait_until("node 2 refuses node 1's certificates from the new root", Duration::from_secs(5), &|| {
            !reaches("a", "c")
        });
        assert_eq!(roots("node1"), 2.0);
        assert_ne!(root_of("node1"), root_of("node2"));
        assert!(
            !reaches("c", "a"),
            "node 2 accepted node 1's server certificate from a root it does not trust"
        );

        // Node 2 trusts the new root too, without a signal: its CA directory is polled.
        let (node2_dir, node2_config) = &configs[1];
        std::fs::write(node2_dir.join("trust-bundle.pem"), &new_root).unwrap();
        wait_until("node 2 picks up its new trust bundle", Duration::from_secs(15), &|| reaches("a", "c"));
        assert!(reaches("c", "a"));
        assert_eq!(roots("node2"), 2.0);

        // A key that is not its root's is refused; the roots in force stay.
        std::fs::write(node2_dir.join("root-key.pem"), &new_key).unwrap();
        sb.reload_agent("node2", node2_config).unwrap();
        sb.wait_for_log("node2", "CA directory not reloaded", 1).unwrap();
        assert_eq!(metric(&sb, "node2", "ferry_ca_reloads_total{result=\"rejected\"}"), 1.0);
        assert!(reaches("a", "c") && reaches("c", "a"));
        assert_eq!(metric(&sb, "node2", "ferry_ca_reloads_total{result=\"applied\"}"), 1.0);

        assert!(!stream.is_finished(), "the stream ended before the rotation did");
        let streamed = stream.join().unwrap();
        assert!(streamed.starts_with("streamed"), "the open connection was cut: {streamed}");
    });
}
