//! Soak: connection churn through both agents must leave no memory or file descriptors behind,
//! connections that sit idle must not keep what they needed while busy, and what apps leave
//! unread must stay within the agent's budget for it.
//!
//! `FERRY_SOAK_SECS` sets how long the churn runs: 20 s by default (in `cargo xtask test`); the
//! documented run (docs/testing.md) is `FERRY_SOAK_SECS=600`.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use ferry_sandbox::{ConnectOutcome, ProcUsage, Process, Sandbox};

const PORT: u16 = 8080;
/// Concurrent connections opened (and closed) at once in each burst, every 2 s.
const BURST: usize = 200;
/// New connections per second to each destination, besides the bursts: below what TIME_WAIT
/// lets one client address sustain towards one server port (28 000 ports / 60 s).
const RATE: &str = "200";
/// RSS may end this far above the warm baseline (seen: under 1 MiB). A leak of 400 bytes per
/// connection exceeds it within the default run (about 10 000 connections).
const RSS_SLACK_KIB: u64 = 4 * 1024;

/// The two-node sandbox with both agents running, configured with `limits` (a YAML mapping).
fn with_agents(label: &str, limits: &str) -> Sandbox {
    let mut sb = Sandbox::two_nodes(label).unwrap();
    for node in ["node1", "node2"] {
        let config = sb.config_for(node).replacen('\n', &format!("\nlimits: {limits}\n"), 1);
        sb.start_agent(node, Some(&config)).unwrap();
    }
    sb
}

fn addr(sb: &Sandbox, pod: &str) -> SocketAddr {
    SocketAddr::from((sb.pod(pod).ip, PORT))
}

fn live_connections(sb: &Sandbox, node: &str) -> u64 {
    sb.ferry_json(node, &["status"]).unwrap()["connections"].as_u64().unwrap()
}

/// Runs new-connection loops to both destinations and bursts of concurrent connections for `secs`.
fn churn(sb: &Sandbox, secs: u64, mut sample: impl FnMut()) {
    let targets = [addr(sb, "c"), addr(sb, "b")];
    let loops: Vec<Process> = targets
        .iter()
        .map(|to| sb.pod("a").spawn_app(&["cps", &to.to_string(), &secs.to_string(), RATE]).unwrap())
        .collect();
    let start = Instant::now();
    let mut round = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        let to = targets[round % targets.len()];
        assert_eq!(sb.pod("a").hold(to, BURST).unwrap(), BURST);
        sample();
        round += 1;
        std::thread::sleep(Duration::from_secs(2));
    }
    for child in loops {
        let line = child.finish().unwrap();
        assert!(line.starts_with("cps ") && line.ends_with(" 0"), "churn loop ended with {line:?}");
    }
}

/// Both agents' usage once their connections are closed.
fn settled(sb: &Sandbox) -> Vec<ProcUsage> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while ["node1", "node2"].iter().any(|n| live_connections(sb, n) > 0) {
        assert!(Instant::now() < deadline, "connections still open 15 s after the churn");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    agents_usage(sb)
}

#[test]
fn churn_returns_rss_and_fds_to_baseline() {
    let secs: u64 = std::env::var("FERRY_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let sb = with_agents("soak", "{}");
    let _server_b = sb.pod("b").serve(PORT).unwrap();
    let _server_c = sb.pod("c").serve(PORT).unwrap();

    // Warm up: HBONE pools at their burst size, allocator arenas, certificates.
    churn(&sb, 3, || {});
    let baseline = settled(&sb);

    let mut peak = baseline.clone();
    let mut samples = Vec::new();
    let started = Instant::now();
    churn(&sb, secs, || {
        let now = agents_usage(&sb);
        for (peak, now) in peak.iter_mut().zip(&now) {
            peak.rss_kib = peak.rss_kib.max(now.rss_kib);
            peak.open_fds = peak.open_fds.max(now.open_fds);
        }
        samples.push((started.elapsed().as_secs(), now[0].rss_kib, now[1].rss_kib));
    });
    let after = settled(&sb);
    let opened = sb
        .metric("node1", "ferry_proxy_connections_opened_total{direction=\"outbound\",route=\"hbone\"}")
        .unwrap()
        + sb.metric(
            "node1",
            "ferry_proxy_connections_opened_total{direction=\"outbound\",route=\"same_node\"}",
        )
        .unwrap();

    eprintln!("soak {secs} s, {opened} connections through node1; RSS KiB (node1, node2) over time:");
    for (t, rss1, rss2) in samples.iter().step_by((samples.len() / 20).max(1)) {
        eprintln!("  {t:>4} s  {rss1:>7}  {rss2:>7}");
    }
    for (node, (base, (peak, after))) in
        ["node1", "node2"].iter().zip(baseline.iter().zip(peak.iter().zip(&after)))
    {
        eprintln!(
            "{node}: RSS KiB baseline {} peak {} after {}; fds baseline {} peak {} after {}",
            base.rss_kib, peak.rss_kib, after.rss_kib, base.open_fds, peak.open_fds, after.open_fds
        );
        assert!(
            after.rss_kib <= base.rss_kib + RSS_SLACK_KIB,
            "{node}: RSS grew from {} to {} KiB with churn",
            base.rss_kib,
            after.rss_kib
        );
        assert_eq!(after.open_fds, base.open_fds, "{node}: open fds {} -> {}", base.open_fds, after.open_fds);
    }
    assert!(opened > 1000.0, "only {opened} connections: the churn did not run");
}

/// Connections opened one after another, each moving bulk both ways, then held open idle. All
/// share one HBONE connection, whose flow-control window they must not pin while idle: with
/// ztunnel's 16 MiB window, those holding the 1 MiB a relay reading bulk reserves stalled the 13th.
const LOADED: usize = 24;
/// What each of them may keep of an agent's memory while idle (seen: under 256 KiB, most of it
/// pages the allocator has yet to give back). A relay reading bulk takes a 1 MiB buffer; kept,
/// they held 1.3 MiB each.
const IDLE_AFTER_BULK_KIB: u64 = 512;

fn agents_usage(sb: &Sandbox) -> Vec<ProcUsage> {
    ["node1", "node2"].iter().map(|n| ProcUsage::of(sb.agent_pid(n).unwrap())).collect()
}

#[test]
fn idle_connections_that_moved_bulk_neither_stall_the_others_nor_keep_their_buffers() {
    let sb = with_agents("loaded", "{}");
    let _server = sb.pod("c").serve(PORT).unwrap();
    let to = addr(&sb, "c");
    // Warm up: the HBONE connection and its buffers at their bulk size, allocator arenas.
    drop(sb.pod("a").load(to, 1, 8, 0).unwrap());
    // Freed pages go back to the kernel after a second (the allocator's decay, main.rs).
    let decay = Duration::from_secs(3);
    settled(&sb);
    std::thread::sleep(decay);
    let baseline = agents_usage(&sb);

    // A transfer that stalls fails the load.
    let _held = sb.pod("a").load(to, LOADED, 8, 30).unwrap();
    std::thread::sleep(decay);
    assert_eq!(live_connections(&sb, "node1"), LOADED as u64);
    for ((node, base), idle) in ["node1", "node2"].iter().zip(&baseline).zip(agents_usage(&sb)) {
        let (base, idle) = (base.rss_kib, idle.rss_kib);
        eprintln!("{node}: RSS {base} KiB before, {idle} KiB with {LOADED} connections idle after bulk");
        assert!(
            idle <= base + LOADED as u64 * IDLE_AFTER_BULK_KIB,
            "{node}: RSS {base} -> {idle} KiB with {LOADED} idle connections that moved bulk"
        );
    }
}

/// Connections whose destination app stops reading: each holds a stream window (4 MiB) of data
/// the destination agent cannot deliver. Four did fill the 16 MiB connection window they shared
/// with every other stream between the two pods.
const STALLED: usize = 6;

#[test]
fn apps_that_stop_reading_do_not_stall_other_connections_between_the_same_pods() {
    let sb = with_agents("stalled", "{}");
    let _echo = sb.pod("c").serve(PORT).unwrap();
    let _stalled = sb.pod("c").serve_stalled(PORT + 1).unwrap();
    let stalled = SocketAddr::from((sb.pod("c").ip, PORT + 1));
    let _senders =
        sb.pod("a").spawn_app(&["send", &stalled.to_string(), "60", &STALLED.to_string()]).unwrap();
    // Until the stalled connections have filled their socket buffers and stream windows.
    let deadline = Instant::now() + Duration::from_secs(10);
    while live_connections(&sb, "node1") < STALLED as u64 {
        assert!(Instant::now() < deadline, "the stalled connections did not open");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
    let outcome = sb.pod("a").connect(addr(&sb, "c"), 64 * 1024).unwrap();
    assert!(
        matches!(outcome, ConnectOutcome::Echoed { .. }),
        "beside {STALLED} stalled connections: {outcome:?}"
    );
}

/// Apps that stop reading while their peers keep sending, more than the agent's budget for data
/// waiting for apps (`limits.undeliveredMiB`) holds at full stream windows: 24 x 4 MiB. They stop
/// one after another, as stalls pile up in a cluster.
const UNREAD: usize = 24;
const UNREAD_APART_MS: &str = "100";
const UNDELIVERED_MIB: u64 = 16;
/// What may arrive beyond the budget: what was on its way to the agent when the windows shrank,
/// i.e. what the sending agent had queued (h2's send buffer, up to 400 KiB for each stream then
/// sending at its full window) and what its connection held in flight.
const BEYOND_BUDGET_MIB: u64 = 8;
/// Undelivered frames keep the buffers h2 read them into, which also held other frames: the
/// agent's memory for them is up to about twice their size (seen: 1.2-1.3x here, 2x with all 24
/// stalling at once).
const RSS_PER_UNDELIVERED: u64 = 2;

/// The destination app reads nothing: its agent holds the data, received on HBONE connections
/// that it accepted.
#[test]
fn what_destination_apps_leave_unread_stays_within_the_agents_budget() {
    unread_data_stays_within_the_budget("unread-dst", Unread::ByDestination);
}

/// The source app sends to an echo server and reads nothing back: its agent holds the echoes,
/// received on the HBONE connection it dialed.
#[test]
fn what_source_apps_leave_unread_stays_within_the_agents_budget() {
    unread_data_stays_within_the_budget("unread-src", Unread::BySource);
}

enum Unread {
    ByDestination,
    BySource,
}

fn unread_data_stays_within_the_budget(label: &str, unread: Unread) {
    let sb = with_agents(label, &format!("{{undeliveredMiB: {UNDELIVERED_MIB}}}"));
    let _echo = sb.pod("c").serve(PORT).unwrap();
    let to = addr(&sb, "c");
    let (node, stalled_app, target) = match unread {
        Unread::ByDestination => {
            let stalled = sb.pod("c").serve_stalled(PORT + 1).unwrap();
            ("node2", Some(stalled), SocketAddr::from((sb.pod("c").ip, PORT + 1)))
        }
        Unread::BySource => ("node1", None, to),
    };
    // Warm up, as in the tests above.
    drop(sb.pod("a").load(to, 1, 8, 0).unwrap());
    settled(&sb);
    std::thread::sleep(Duration::from_secs(3));
    let baseline = ProcUsage::of(sb.agent_pid(node).unwrap()).rss_kib;

    let senders = sb
        .pod("a")
        .spawn_app(&["send", &target.to_string(), "60", &UNREAD.to_string(), UNREAD_APART_MS])
        .unwrap();
    let waiting_bytes = || sb.metric(node, "ferry_hbone_undelivered_bytes").unwrap() as u64;
    let waiting = || waiting_bytes() >> 20;
    let window = || sb.metric(node, "ferry_hbone_stream_window_bytes").unwrap() as u64;
    // Until the senders have sent what they may.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut held = waiting();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = waiting();
        if now == held && live_connections(&sb, "node1") == UNREAD as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "undelivered data still growing: {held} -> {now} MiB");
        held = now;
    }
    let rss = ProcUsage::of(sb.agent_pid(node).unwrap()).rss_kib;
    eprintln!("{node}, {UNREAD} unread connections: {held} MiB undelivered, RSS {baseline} -> {rss} KiB");
    let bound = UNDELIVERED_MIB + BEYOND_BUDGET_MIB;
    assert!(
        rss <= baseline + bound * RSS_PER_UNDELIVERED * 1024,
        "RSS {baseline} -> {rss} KiB with {held} MiB undelivered"
    );
    assert!(held <= bound, "{held} MiB undelivered");
    assert_eq!(window(), 64 * 1024, "stream window with {held} MiB undelivered");
    let status = sb.ferry_json(node, &["status"]).unwrap();
    assert_eq!(status["stream_window_bytes"], 64 * 1024, "{status}");
    assert!(status["undelivered_bytes"].as_u64().unwrap() >> 20 >= UNDELIVERED_MIB / 2, "{status}");
    // Other connections still move, intact, at the small window.
    drop(sb.pod("a").load(to, 2, 8, 0).unwrap());

    // The unread data goes with its connections, which the app that does not read resets as it
    // goes (its sockets close with data unread), and with it the pressure. The senders go first,
    // so that the destination's resets do not fail them.
    drop(senders);
    drop(stalled_app);
    let deadline = Instant::now() + Duration::from_secs(10);
    while waiting_bytes() > 0 || window() != 4 * 1024 * 1024 {
        assert!(
            Instant::now() < deadline,
            "{} bytes undelivered after the unread connections were reset",
            waiting_bytes()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(sb.pod("a").load(to, 2, 8, 0).unwrap());
}
