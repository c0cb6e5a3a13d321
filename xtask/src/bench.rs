//! `cargo xtask bench [--quick]`: Ferry's cost against direct pod-to-pod TCP in the same sandbox,
//! every path interleaved in one run and repeated; then scale (agent memory and CPU with many
//! pods, startup, policy-change time). Writes JSON, a markdown summary and a PNG chart under
//! target/bench/; a full run also refreshes docs/performance.md.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use ferry_sandbox::{PodSpec, ProcUsage, Sandbox};
use serde::Serialize;

const ECHO_PORT: u16 = 8080;
const SINK_PORT: u16 = 9090;
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

#[derive(Debug, Clone, Serialize)]
struct Params {
    repetitions: usize,
    seconds: u64,
    rr_count: usize,
    rate: u64,
    scale: Vec<usize>,
    /// Every CPU kept out of idle by a SCHED_IDLE spinner (see [`AwakeCpus`]).
    awake: bool,
}

impl Params {
    fn new(quick: bool, awake: bool) -> Params {
        if quick {
            Params { repetitions: 1, seconds: 1, rr_count: 2000, rate: 1000, scale: vec![10, 50], awake }
        } else {
            let scale = vec![10, 50, 100, 200];
            Params { repetitions: 5, seconds: 3, rr_count: 10_000, rate: 2000, scale, awake }
        }
    }
}

/// A data path: a client pod and a server pod, and which direct path it compares with.
struct Path_ {
    name: &'static str,
    client: &'static str,
    server: &'static str,
    baseline: &'static str,
}

const DIRECT_SAME: &str = "direct same-node";
const DIRECT_CROSS: &str = "direct cross-node";
const PATHS: [Path_; 5] = [
    Path_ { name: DIRECT_SAME, client: "d", server: "f", baseline: DIRECT_SAME },
    Path_ { name: DIRECT_CROSS, client: "d", server: "e", baseline: DIRECT_CROSS },
    Path_ { name: "ferry same-node", client: "a", server: "b", baseline: DIRECT_SAME },
    Path_ { name: "ferry cross-node mTLS", client: "a", server: "c", baseline: DIRECT_CROSS },
    Path_ { name: "ferry cross-node plain", client: "a", server: "g", baseline: DIRECT_CROSS },
];

#[derive(Debug, Clone, Serialize)]
struct Sample {
    path: &'static str,
    metric: String,
    unit: &'static str,
    repetition: usize,
    value: f64,
    /// Both agents together, during the measurement.
    agent_cpu_percent: f64,
    /// The user-space part of `agent_cpu_percent`.
    agent_user_cpu_percent: f64,
    agent_rss_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Summary {
    path: &'static str,
    metric: String,
    unit: &'static str,
    median: f64,
    min: f64,
    max: f64,
    /// Median of the per-repetition ratios to the direct path of the same topology.
    ratio: Option<f64>,
    ratio_min: Option<f64>,
    ratio_max: Option<f64>,
    agent_cpu_percent: f64,
    agent_user_cpu_percent: f64,
    agent_rss_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
struct ScaleRow {
    pods: usize,
    startup_ms: f64,
    idle_rss_kib: u64,
    idle_cpu_percent: f64,
    connected_rss_kib: u64,
    connected_cpu_percent: f64,
    policy_change_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    started: String,
    machine: BTreeMap<&'static str, String>,
    params: Params,
    samples: Vec<Sample>,
    summary: Vec<Summary>,
    scale: Vec<ScaleRow>,
    targets: Vec<Target>,
}

#[derive(Debug, Serialize)]
struct Target {
    what: String,
    bar: String,
    measured: Option<f64>,
    met: Option<bool>,
}

/// What a measured value must be to meet a target.
#[derive(Debug, Clone, Copy)]
enum Bar {
    AtLeast(f64),
    AtMost(f64),
    Below(f64),
}

impl Bar {
    fn met(self, measured: f64) -> bool {
        match self {
            Bar::AtLeast(limit) => measured >= limit,
            Bar::AtMost(limit) => measured <= limit,
            Bar::Below(limit) => measured < limit,
        }
    }
}

impl std::fmt::Display for Bar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bar::AtLeast(limit) => write!(f, ">= {limit}"),
            Bar::AtMost(limit) => write!(f, "<= {limit}"),
            Bar::Below(limit) => write!(f, "< {limit}"),
        }
    }
}

pub(crate) fn run(quick: bool, only: Option<&str>, awake: bool) -> Result<()> {
    let params = Params::new(quick, awake);
    let started = SystemTime::now();
    eprintln!("bench: {} run, {params:?}", if quick { "quick" } else { "full" });
    let spinners = awake.then(AwakeCpus::start).transpose()?;
    let samples = measure_paths(&params, only)?;
    drop(spinners);
    let summary = summarize(&samples);
    let scale = if only.is_some() { Vec::new() } else { measure_scale(&params)? };
    let targets = targets(&summary, &scale);
    let report = Report {
        started: humantime::format_rfc3339_seconds(started).to_string(),
        machine: machine(),
        params,
        samples,
        summary,
        scale,
        targets,
    };
    let out = crate::workspace_root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    let stamp = started.duration_since(UNIX_EPOCH)?.as_secs();
    let summary = markdown(&report, &format!("bench-{stamp}.png"));
    std::fs::write(out.join(format!("bench-{stamp}.json")), serde_json::to_string_pretty(&report)?)?;
    std::fs::write(out.join(format!("bench-{stamp}.md")), &summary)?;
    chart(&report, &out.join(format!("bench-{stamp}.png")))?;
    println!("{summary}");
    println!("results: {}", out.join(format!("bench-{stamp}.{{json,md,png}}")).display());
    // docs/performance.md shows the plain condition: an idle node, as CI and most nodes are.
    if !quick && only.is_none() && !awake {
        let docs = crate::workspace_root().join("docs");
        chart(&report, &docs.join("performance.png"))?;
        write_performance_doc(&docs.join("performance.md"), &markdown(&report, "performance.png"))?;
        println!("docs/performance.md and docs/performance.png updated");
    }
    Ok(())
}

/// One busy loop per CPU at SCHED_IDLE priority, so no CPU ever halts, yet any other task that
/// wakes up preempts the loop at once. In a VM, waking a halted vCPU costs an IPI and a VM exit
/// (30-40 us on this kind of machine); with this on, round trips show the proxy's cost without
/// that, as on a node busy with other work.
struct AwakeCpus {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl AwakeCpus {
    fn start() -> Result<AwakeCpus> {
        use std::sync::{Arc, atomic::AtomicBool};
        let stop = Arc::new(AtomicBool::new(false));
        let cpus = std::thread::available_parallelism()?.get();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let threads = (0..cpus)
            .map(|cpu| {
                let (stop, ready) = (stop.clone(), ready_tx.clone());
                std::thread::spawn(move || {
                    let pinned = pin_idle_priority(cpu);
                    let spin = pinned.is_ok();
                    let _ = ready.send(pinned);
                    while spin && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        // no PAUSE: a hypervisor may deschedule a vCPU that pauses in a loop
                    }
                })
            })
            .collect();
        let spinners = AwakeCpus { stop, threads };
        for _ in 0..cpus {
            ready_rx.recv()?.context("spinner thread")?;
        }
        eprintln!("bench: {cpus} CPUs kept awake by SCHED_IDLE spinners");
        Ok(spinners)
    }
}

impl Drop for AwakeCpus {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Moves the calling thread onto `cpu` at the lowest scheduling class.
fn pin_idle_priority(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only read what we pass.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity(cpu {cpu}): {}", std::io::Error::last_os_error());
        }
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
            bail!("sched_setscheduler(SCHED_IDLE): {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What the agents used while a measurement ran.
struct AgentUsage {
    /// Percent of one core.
    cpu_percent: f64,
    /// The user-space part of `cpu_percent`.
    user_cpu_percent: f64,
    /// At the end.
    rss_kib: u64,
}

/// Runs `work` and reports what the agents used meanwhile.
fn with_usage<T>(pids: &[u32], work: impl FnOnce() -> Result<T>) -> Result<(T, AgentUsage)> {
    let ticks = || {
        pids.iter().map(|p| ProcUsage::of(*p)).fold((0, 0, 0), |(cpu, user, rss), usage| {
            (cpu + usage.cpu_ticks, user + usage.user_ticks, rss + usage.rss_kib)
        })
    };
    let (cpu_before, user_before, _) = ticks();
    let start = Instant::now();
    let value = work()?;
    let wall = start.elapsed().as_secs_f64();
    let (cpu_after, user_after, rss_kib) = ticks();
    // Clock ticks are 1/100 s on Linux.
    let percent = |after: u64, before: u64| after.saturating_sub(before) as f64 / 100.0 / wall * 100.0;
    let usage = AgentUsage {
        cpu_percent: percent(cpu_after, cpu_before),
        user_cpu_percent: percent(user_after, user_before),
        rss_kib,
    };
    Ok((value, usage))
}

fn paths_sandbox() -> Result<Sandbox> {
    let mut sb = Sandbox::new(
        "bench",
        &[
            (
                "node1",
                vec![
                    PodSpec::meshed("a", "client"),
                    PodSpec::meshed("b", "server-b"),
                    PodSpec::unmeshed("d"),
                    PodSpec::unmeshed("f"),
                ],
            ),
            (
                "node2",
                vec![
                    PodSpec::meshed("c", "server-c"),
                    PodSpec::unmeshed("e"),
                    PodSpec::meshed("g", "server-g"),
                ],
            ),
        ],
    )?;
    // g is meshed on its own node but node1 does not know it as meshed: node1 passes plain TCP
    // through, node2 takes it in on 15006. Two proxies, no TLS: proxy cost without crypto cost.
    let node1 = sb.config_for("node1").replace("  - name: g\n", "  - name: g\n    meshed: false\n");
    sb.start_agent("node1", Some(&node1))?;
    sb.start_agent("node2", None)?;
    Ok(sb)
}

/// A measurement every path runs in turn.
struct Workload {
    /// What the numbers sandbox-app prints are, in order.
    metrics: Vec<&'static str>,
    unit: &'static str,
    /// sandbox-app's arguments, with {addr} (the echo server) and {sink} (the sink).
    args: Vec<String>,
    /// The word that starts sandbox-app's result line.
    word: &'static str,
    link: Link,
}

/// Requests per second of the "beside bulk" case: a trickle, so that what it measures is the
/// wait behind the bulk, not a queue of its own requests.
const BESIDE_BULK_RATE: u64 = 200;

/// What the link between the nodes is while a workload runs.
enum Link {
    /// The veth as it is: faster than the agents, so they are the bottleneck.
    Free,
    /// 1 Gbit/s with a 256 KiB FIFO from node1 to node2 ([`CongestedLink`]).
    Congested,
}

/// node1's side of the underlay shaped to 1 Gbit/s with a 256 KiB (2 ms) FIFO, as a busy link
/// whose queue a bulk transfer fills; unshaped again on drop. With it a request waits behind
/// whatever bulk is queued ahead of it: in the link's queue on every path, and through Ferry
/// also in the one HBONE connection all streams between two pods share.
struct CongestedLink<'a> {
    netns: &'a str,
}

impl<'a> CongestedLink<'a> {
    fn on(netns: &'a str) -> Result<CongestedLink<'a>> {
        let link = CongestedLink { netns };
        link.tc(&["qdisc", "add", "dev", "ul", "root", "handle", "1:", "htb", "default", "10"])?;
        link.tc(&["class", "add", "dev", "ul", "parent", "1:", "classid", "1:10", "htb", "rate", "1gbit"])?;
        link.tc(&["qdisc", "add", "dev", "ul", "parent", "1:10", "bfifo", "limit", "262144"])?;
        Ok(link)
    }

    fn tc(&self, args: &[&str]) -> Result<()> {
        let status = std::process::Command::new("tc").arg("-n").arg(self.netns).args(args).status()?;
        ensure!(status.success(), "tc -n {} {}: {status}", self.netns, args.join(" "));
        Ok(())
    }
}

impl Drop for CongestedLink<'_> {
    fn drop(&mut self) {
        let _ = self.tc(&["qdisc", "del", "dev", "ul", "root"]);
    }
}

fn measure_paths(params: &Params, only: Option<&str>) -> Result<Vec<Sample>> {
    let sb = paths_sandbox()?;
    let mut servers = Vec::new();
    for pod in ["b", "c", "e", "f", "g"] {
        servers.push(sb.pod(pod).serve(ECHO_PORT)?);
        servers.push(sb.pod(pod).serve_sink(SINK_PORT)?);
    }
    let pids: Vec<u32> = ["node1", "node2"].iter().filter_map(|n| sb.agent_pid(n)).collect();
    let secs = params.seconds.to_string();
    let count = params.rr_count.to_string();
    let rate = params.rate.to_string();
    let workloads = vec![
        Workload {
            metrics: vec!["bulk 1 stream"],
            unit: "Gbit/s",
            args: vec!["send".into(), "{sink}".into(), secs.clone(), "1".into()],
            word: "send",
            link: Link::Free,
        },
        Workload {
            metrics: vec!["bulk 4 streams"],
            unit: "Gbit/s",
            args: vec!["send".into(), "{sink}".into(), secs.clone(), "4".into()],
            word: "send",
            link: Link::Free,
        },
        Workload {
            metrics: vec![
                "rr 1B saturated p50",
                "rr 1B saturated p99",
                "rr 1B saturated p90",
                "rr 1B saturated p99.9",
            ],
            unit: "us",
            args: vec!["rr".into(), "{addr}".into(), count.clone(), "1".into()],
            word: "rr",
            link: Link::Free,
        },
        Workload {
            metrics: vec![
                "rr 1KiB saturated p50",
                "rr 1KiB saturated p99",
                "rr 1KiB saturated p90",
                "rr 1KiB saturated p99.9",
            ],
            unit: "us",
            args: vec!["rr".into(), "{addr}".into(), count.clone(), "1024".into()],
            word: "rr",
            link: Link::Free,
        },
        Workload {
            metrics: vec![
                "rr 1B fixed-rate p50",
                "rr 1B fixed-rate p99",
                "rr 1B fixed-rate p90",
                "rr 1B fixed-rate p99.9",
            ],
            unit: "us",
            args: vec!["rro".into(), "{addr}".into(), "1".into(), rate.clone(), secs.clone()],
            word: "rro",
            link: Link::Free,
        },
        Workload {
            metrics: vec![
                "rr 1KiB fixed-rate p50",
                "rr 1KiB fixed-rate p99",
                "rr 1KiB fixed-rate p90",
                "rr 1KiB fixed-rate p99.9",
            ],
            unit: "us",
            args: vec!["rro".into(), "{addr}".into(), "1024".into(), rate.clone(), secs.clone()],
            word: "rro",
            link: Link::Free,
        },
        Workload {
            metrics: vec!["new connections"],
            unit: "conn/s",
            args: vec!["cps".into(), "{addr}".into(), secs.clone()],
            word: "cps",
            link: Link::Free,
        },
        Workload {
            metrics: vec![
                "rr 1B beside bulk p50",
                "rr 1B beside bulk p99",
                "rr 1B beside bulk p90",
                "rr 1B beside bulk p99.9",
            ],
            unit: "us",
            args: vec![
                "rrob".into(),
                "{addr}".into(),
                "{sink}".into(),
                "1".into(),
                BESIDE_BULK_RATE.to_string(),
                secs.clone(),
            ],
            word: "rro",
            link: Link::Congested,
        },
    ];
    let mut samples = Vec::new();
    for repetition in 0..params.repetitions {
        for Workload { metrics, unit, args, word, link } in &workloads {
            let _shaped = match link {
                Link::Free => None,
                Link::Congested => Some(CongestedLink::on(sb.node("node1").netns.name())?),
            };
            // Interleaved: every path runs each workload before the next workload starts.
            for path in &PATHS {
                if only.is_some_and(|only| !format!("{} {}", path.name, metrics[0]).contains(only)) {
                    continue;
                }
                // A congested link is between the nodes: only cross-node paths cross it.
                if matches!(link, Link::Congested) && path.baseline != DIRECT_CROSS {
                    continue;
                }
                let server = sb.pod(path.server).ip;
                let args: Vec<String> = args
                    .iter()
                    .map(|a| {
                        a.replace("{addr}", &SocketAddr::from((server, ECHO_PORT)).to_string())
                            .replace("{sink}", &SocketAddr::from((server, SINK_PORT)).to_string())
                    })
                    .collect();
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let client = sb.pod(path.client);
                let (line, usage) = with_usage(&pids, || client.measure(&args, word))?;
                let values: Vec<f64> = line.split_whitespace().filter_map(|v| v.parse().ok()).collect();
                if values.len() < metrics.len() {
                    bail!("{}: sandbox-app {args:?} printed {line:?}", path.name);
                }
                for (metric, value) in metrics.iter().zip(values) {
                    samples.push(Sample {
                        path: path.name,
                        metric: metric.to_string(),
                        unit,
                        repetition,
                        value,
                        agent_cpu_percent: usage.cpu_percent,
                        agent_user_cpu_percent: usage.user_cpu_percent,
                        agent_rss_kib: usage.rss_kib,
                    });
                }
                eprintln!("bench: rep {repetition} {:<24} {:<18} {line}", path.name, metrics[0]);
            }
        }
    }
    drop(servers);
    Ok(samples)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

fn summarize(samples: &[Sample]) -> Vec<Summary> {
    let mut metrics: Vec<(String, &'static str)> = Vec::new();
    for s in samples {
        if !metrics.iter().any(|(m, _)| *m == s.metric) {
            metrics.push((s.metric.clone(), s.unit));
        }
    }
    let value = |path: &str, metric: &str, rep: usize| {
        samples.iter().find(|s| s.path == path && s.metric == metric && s.repetition == rep).map(|s| s.value)
    };
    let mut summary = Vec::new();
    for (metric, unit) in metrics {
        for path in &PATHS {
            let of_path: Vec<&Sample> =
                samples.iter().filter(|s| s.path == path.name && s.metric == metric).collect();
            if of_path.is_empty() {
                continue;
            }
            let mut values: Vec<f64> = of_path.iter().map(|s| s.value).collect();
            let mut ratios: Vec<f64> = of_path
                .iter()
                .filter_map(|s| value(path.baseline, &metric, s.repetition).map(|base| s.value / base))
                .filter(|r| r.is_finite())
                .collect();
            let is_direct = path.name == path.baseline;
            let mut cpu: Vec<f64> = of_path.iter().map(|s| s.agent_cpu_percent).collect();
            let mut user_cpu: Vec<f64> = of_path.iter().map(|s| s.agent_user_cpu_percent).collect();
            summary.push(Summary {
                path: path.name,
                metric: metric.clone(),
                unit,
                median: median(&mut values),
                min: values.first().copied().unwrap_or(f64::NAN),
                max: values.last().copied().unwrap_or(f64::NAN),
                ratio: (!is_direct && !ratios.is_empty()).then(|| median(&mut ratios)),
                ratio_min: (!is_direct).then(|| ratios.first().copied()).flatten(),
                ratio_max: (!is_direct).then(|| ratios.last().copied()).flatten(),
                agent_cpu_percent: median(&mut cpu),
                agent_user_cpu_percent: median(&mut user_cpu),
                agent_rss_kib: of_path.iter().map(|s| s.agent_rss_kib).max().unwrap_or(0),
            });
        }
    }
    summary
}

/// One node, `pods` meshed client pods and a meshed server pod.
fn measure_scale(params: &Params) -> Result<Vec<ScaleRow>> {
    let mut rows = Vec::new();
    for &pods in &params.scale {
        let mut layout: Vec<PodSpec> =
            (0..pods).map(|i| PodSpec::meshed(&format!("s{i}"), &format!("sa{i}"))).collect();
        layout.push(PodSpec::meshed("srv", "server"));
        let mut sb = Sandbox::new("scale", &[("node1", layout)])?;
        let start = Instant::now();
        sb.start_agent("node1", None)?;
        let startup_ms = start.elapsed().as_secs_f64() * 1000.0;
        let pid = sb.agent_pid("node1").context("agent pid")?;
        let quiet = || {
            std::thread::sleep(Duration::from_secs(2));
            Ok(())
        };
        let ((), idle) = with_usage(&[pid], quiet)?;

        let _server = sb.pod("srv").serve(ECHO_PORT)?;
        let target = SocketAddr::from((sb.pod("srv").ip, ECHO_PORT)).to_string();
        let mut holders = Vec::with_capacity(pods);
        for i in 0..pods {
            holders.push(sb.pod(&format!("s{i}")).spawn_app(&["idle", &target, "30"])?);
        }
        wait_for_connections(&sb, pods)?;
        let ((), connected) = with_usage(&[pid], quiet)?;
        let (idle_rss_kib, connected_rss_kib) = (idle.rss_kib, connected.rss_kib);

        // Policy change: from the new config and SIGHUP to the first new connection it denies.
        let probe = sb.pod("s0").probe(target.parse()?, 10)?;
        let deny = format!(
            "{}policies:\n  - metadata: {{name: deny-s0, namespace: default}}\n    spec:\n      action: DENY\n      rules:\n        - from: [{{source: {{principals: [cluster.local/ns/default/sa/sa0]}}}}]\n",
            sb.config_for("node1")
        );
        let start = Instant::now();
        sb.reload_agent("node1", &deny)?;
        let failure = probe.failure()?;
        let policy_change_ms = start.elapsed().as_secs_f64() * 1000.0;
        ensure!(
            failure == "reset",
            "after the policy change, s0's new connection ended with {failure:?}, not a reset"
        );
        drop(holders);
        eprintln!(
            "bench: scale {pods} pods: startup {startup_ms:.0} ms, RSS idle {idle_rss_kib} KiB, connected {connected_rss_kib} KiB, policy change {policy_change_ms:.1} ms"
        );
        rows.push(ScaleRow {
            pods,
            startup_ms,
            idle_rss_kib,
            idle_cpu_percent: idle.cpu_percent,
            connected_rss_kib,
            connected_cpu_percent: connected.cpu_percent,
            policy_change_ms,
        });
    }
    Ok(rows)
}

fn wait_for_connections(sb: &Sandbox, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = sb.ferry_json("node1", &["status"])?;
        if status["connections"].as_u64().unwrap_or(0) as usize >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {} of {n} connections open after 30 s", status["connections"]);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn find<'a>(summary: &'a [Summary], path: &str, metric: &str) -> Option<&'a Summary> {
    summary.iter().find(|s| s.path == path && s.metric == metric)
}

fn targets(summary: &[Summary], scale: &[ScaleRow]) -> Vec<Target> {
    let ratio = |path: &str, metric: &str| find(summary, path, metric).and_then(|s| s.ratio);
    let target = |what: &str, bar: Bar, measured: Option<f64>| Target {
        what: what.to_owned(),
        bar: bar.to_string(),
        measured,
        met: measured.map(|m| bar.met(m)),
    };
    let biggest = scale.iter().max_by_key(|r| r.pods);
    let smallest = scale.iter().min_by_key(|r| r.pods);
    let growth = match (smallest, biggest) {
        (Some(a), Some(b)) if b.pods > a.pods => {
            Some((b.idle_rss_kib as f64 - a.idle_rss_kib as f64) / (b.pods - a.pods) as f64)
        }
        _ => None,
    };
    let mtls = "ferry cross-node mTLS";
    let same = "ferry same-node";
    let mut targets = vec![
        target("cross-node mTLS bulk, 1 stream (x direct)", Bar::AtLeast(0.5), ratio(mtls, "bulk 1 stream")),
        target("same-node bulk, 1 stream (x direct)", Bar::AtLeast(0.7), ratio(same, "bulk 1 stream")),
    ];
    // Round trips at a fixed rate, the machine mostly idle (every wake-up a halted vCPU's), and
    // saturated (back to back, the CPUs awake): the bar names neither.
    for (mode, metric) in [("fixed rate", "fixed-rate"), ("saturated", "saturated")] {
        for (path, name, quantile, bar) in [
            (mtls, "cross-node mTLS", "p50", 1.8),
            (mtls, "cross-node mTLS", "p99", 2.0),
            (same, "same-node", "p50", 1.5),
        ] {
            let what = format!("{name} rr 1B {quantile}, {mode} (x direct)");
            targets.push(target(&what, Bar::AtMost(bar), ratio(path, &format!("rr 1B {metric} {quantile}"))));
        }
    }
    targets.extend([
        target("cross-node new connections/s (x direct)", Bar::AtLeast(0.4), ratio(mtls, "new connections")),
        target(
            &format!("agent RSS with {} pods (MiB)", biggest.map_or(0, |r| r.pods)),
            Bar::Below(40.0),
            biggest.map(|r| r.idle_rss_kib as f64 / 1024.0),
        ),
        target("agent RSS growth per idle pod (KiB)", Bar::Below(64.0), growth),
    ]);
    targets
}

fn machine() -> BTreeMap<&'static str, String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| {
        l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
    });
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<u64>().unwrap_or(0) / 1024 / 1024)
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    BTreeMap::from([
        ("cpu", model.unwrap_or_default()),
        ("cores", std::thread::available_parallelism().map(|n| n.to_string()).unwrap_or_default()),
        ("memory_gib", memory.to_string()),
        ("kernel", kernel),
    ])
}

fn fmt_value(v: f64) -> String {
    if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") }
}

fn markdown(report: &Report, chart_name: &str) -> String {
    let mut md = markdown_tables(report);
    let _ = writeln!(md, "\n![ratios to direct]({chart_name})");
    md
}

fn markdown_tables(report: &Report) -> String {
    let mut md = String::new();
    let m = &report.machine;
    let _ = writeln!(
        md,
        "Run {} on {} ({} cores, {} GiB, Linux {}); {} repetition(s), {} s per throughput case, {} round trips per saturated case, {} req/s for fixed-rate cases{}.\n",
        report.started,
        m.get("cpu").map_or("?", String::as_str),
        m.get("cores").map_or("?", String::as_str),
        m.get("memory_gib").map_or("?", String::as_str),
        m.get("kernel").map_or("?", String::as_str),
        report.params.repetitions,
        report.params.seconds,
        report.params.rr_count,
        report.params.rate,
        if report.params.awake { "; every CPU kept awake by a SCHED_IDLE spinner (--awake)" } else { "" },
    );
    let _ = writeln!(md, "### Targets (ratios to direct TCP in the same run)\n");
    let _ = writeln!(md, "| target | bar | measured | met |\n|---|---|---|---|");
    for t in &report.targets {
        let measured = t.measured.map_or("-".into(), |v| format!("{v:.3}"));
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        let _ = writeln!(md, "| {} | {} | {measured} | {met} |", t.what, t.bar);
    }
    let _ = writeln!(
        md,
        "\n### Paths (median, [min-max] over repetitions; ratio = Ferry / direct, same topology)\n"
    );
    let _ = writeln!(
        md,
        "| metric | path | median | range | x direct | agents CPU % (user) | agents RSS MiB |\n|---|---|---|---|---|---|---|"
    );
    for s in &report.summary {
        let ratio = match (s.ratio, s.ratio_min, s.ratio_max) {
            (Some(r), Some(lo), Some(hi)) => format!("{r:.2} [{lo:.2}-{hi:.2}]"),
            _ => "-".into(),
        };
        let _ = writeln!(
            md,
            "| {} ({}) | {} | {} | {}-{} | {ratio} | {:.0} ({:.0}) | {:.1} |",
            s.metric,
            s.unit,
            s.path,
            fmt_value(s.median),
            fmt_value(s.min),
            fmt_value(s.max),
            s.agent_cpu_percent,
            s.agent_user_cpu_percent,
            s.agent_rss_kib as f64 / 1024.0
        );
    }
    let _ = writeln!(md, "\n### Scale (one node, N meshed pods)\n");
    let _ = writeln!(
        md,
        "| pods | startup to ready (ms) | RSS idle (MiB) | CPU idle % | RSS, one connection each (MiB) | CPU % | config change to enforced policy (ms) |\n|---|---|---|---|---|---|---|"
    );
    for r in &report.scale {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |",
            r.pods,
            r.startup_ms,
            r.idle_rss_kib as f64 / 1024.0,
            r.idle_cpu_percent,
            r.connected_rss_kib as f64 / 1024.0,
            r.connected_cpu_percent,
            r.policy_change_ms
        );
    }
    md
}

/// Heads the generated part of docs/performance.md; the prose above it is written by hand.
const RESULTS_HEADING: &str = "## Latest full run\n";

/// Replaces everything from [`RESULTS_HEADING`] on with `results`, keeping the prose before it.
fn write_performance_doc(path: &Path, results: &str) -> Result<()> {
    let doc = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let Some(at) = doc.find(RESULTS_HEADING) else {
        bail!("{} has no {RESULTS_HEADING:?} line to put the results under", path.display());
    };
    std::fs::write(path, format!("{}{RESULTS_HEADING}\n{results}", &doc[..at]))?;
    Ok(())
}

/// Bars of the ratio to direct, per metric, for the Ferry paths; lines at 1.0 (direct).
fn chart(report: &Report, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let font = std::fs::read(FONT).with_context(|| format!("{FONT} (Debian fonts-dejavu-core)"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("bad font"))?;

    let metrics = [
        "bulk 1 stream",
        "bulk 4 streams",
        "rr 1B fixed-rate p50",
        "rr 1B fixed-rate p99",
        "rr 1KiB saturated p50",
        "new connections",
    ];
    let ferry_paths = ["ferry same-node", "ferry cross-node mTLS", "ferry cross-node plain"];
    let colors = [RGBColor(52, 120, 198), RGBColor(214, 96, 40), RGBColor(110, 170, 90)];
    let max_ratio = report
        .summary
        .iter()
        .filter(|s| metrics.contains(&s.metric.as_str()))
        .filter_map(|s| s.ratio)
        .fold(1.0f64, f64::max)
        .min(12.0)
        * 1.1;

    let root = BitMapBackend::new(path, (1100, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Ferry / direct TCP, same run (bulk and conn/s: higher is better; latency: lower is better)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..metrics.len() as f64, 0f64..max_ratio)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(metrics.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = (*x - 0.5).round();
            if (x - 0.5 - i).abs() < 0.01 && i >= 0.0 {
                metrics.get(i as usize).map_or(String::new(), |m| m.to_string())
            } else {
                String::new()
            }
        })
        .y_desc("x direct")
        .label_style(("sans-serif", 13))
        .draw()?;
    chart.draw_series(LineSeries::new([(0.0, 1.0), (metrics.len() as f64, 1.0)], BLACK.stroke_width(2)))?;
    let width = 0.8 / ferry_paths.len() as f64;
    for (p, path_name) in ferry_paths.iter().enumerate() {
        let color = colors[p];
        let bars = metrics.iter().enumerate().filter_map(|(i, metric)| {
            let ratio = find(&report.summary, path_name, metric)?.ratio?;
            let x0 = i as f64 + 0.1 + p as f64 * width;
            Some(Rectangle::new([(x0, 0.0), (x0 + width * 0.9, ratio.min(max_ratio))], color.filled()))
        });
        chart
            .draw_series(bars)?
            .label(*path_name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(path: &'static str, metric: &str, repetition: usize, value: f64) -> Sample {
        Sample {
            path,
            metric: metric.into(),
            unit: "us",
            repetition,
            value,
            agent_cpu_percent: 0.0,
            agent_user_cpu_percent: 0.0,
            agent_rss_kib: 0,
        }
    }

    #[test]
    fn ratios_pair_each_repetition_with_the_direct_run_beside_it() {
        let metric = "rr 1B fixed-rate p50";
        let mtls = "ferry cross-node mTLS";
        let samples = vec![
            sample(DIRECT_CROSS, metric, 0, 100.0),
            sample(mtls, metric, 0, 200.0),
            sample(DIRECT_CROSS, metric, 1, 50.0),
            sample(mtls, metric, 1, 150.0),
            sample(DIRECT_CROSS, metric, 2, 80.0),
            sample(mtls, metric, 2, 200.0),
        ];
        let summary = summarize(&samples);
        let direct = find(&summary, DIRECT_CROSS, metric).unwrap();
        assert_eq!((direct.median, direct.min, direct.max, direct.ratio), (80.0, 50.0, 100.0, None));
        let ferry = find(&summary, mtls, metric).unwrap();
        // Per repetition 2.0, 3.0 and 2.5: not the ratio of the medians (200 / 80).
        assert_eq!((ferry.ratio, ferry.ratio_min, ferry.ratio_max), (Some(2.5), Some(2.0), Some(3.0)));
        assert_eq!(ferry.median, 200.0);
    }

    #[test]
    fn a_path_without_its_direct_run_has_no_ratio() {
        let summary = summarize(&[sample("ferry same-node", "new connections", 0, 5000.0)]);
        assert_eq!(summary.len(), 1);
        assert_eq!(summary[0].ratio, None);
    }

    fn row(pods: usize, idle_rss_kib: u64) -> ScaleRow {
        ScaleRow {
            pods,
            startup_ms: 0.0,
            idle_rss_kib,
            idle_cpu_percent: 0.0,
            connected_rss_kib: 0,
            connected_cpu_percent: 0.0,
            policy_change_ms: 0.0,
        }
    }

    #[test]
    fn targets_compare_each_ratio_with_its_bar_and_leave_unmeasured_ones_open() {
        let samples = vec![
            sample(DIRECT_CROSS, "bulk 1 stream", 0, 20.0),
            sample("ferry cross-node mTLS", "bulk 1 stream", 0, 10.0),
            sample(DIRECT_CROSS, "rr 1B fixed-rate p50", 0, 100.0),
            sample("ferry cross-node mTLS", "rr 1B fixed-rate p50", 0, 181.0),
        ];
        let scale = [row(200, 40 * 1024), row(10, 30 * 1024)];
        let targets = targets(&summarize(&samples), &scale);
        let get = |what: &str| targets.iter().find(|t| t.what.starts_with(what)).unwrap();
        let bulk = get("cross-node mTLS bulk");
        assert_eq!((bulk.bar.as_str(), bulk.measured, bulk.met), (">= 0.5", Some(0.5), Some(true)));
        let p50 = get("cross-node mTLS rr 1B p50, fixed rate");
        assert_eq!((p50.bar.as_str(), p50.met), ("<= 1.8", Some(false)));
        assert_eq!(get("cross-node mTLS rr 1B p50, saturated").met, None);
        let cps = get("cross-node new connections");
        assert_eq!((cps.measured, cps.met), (None, None));
        // 40 MiB is not below 40 MiB; growth is (40 - 30) MiB over 190 pods.
        let rss = get("agent RSS with 200 pods");
        assert_eq!((rss.bar.as_str(), rss.measured, rss.met), ("< 40", Some(40.0), Some(false)));
        let growth = get("agent RSS growth per idle pod");
        assert_eq!(growth.measured, Some(10.0 * 1024.0 / 190.0));
        assert_eq!(growth.met, Some(true));
    }

    #[test]
    fn a_full_run_replaces_only_the_results_under_their_heading() {
        struct RemoveOnDrop(std::path::PathBuf);
        impl Drop for RemoveOnDrop {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = RemoveOnDrop(std::env::temp_dir().join(format!("ferry-bench-doc-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join("performance.md");
        std::fs::write(&path, "# Performance\n\nProse.\n\n## Latest full run\n\nold tables\n").unwrap();
        write_performance_doc(&path, "new tables\n").unwrap();
        let doc = std::fs::read_to_string(&path).unwrap();
        assert_eq!(doc, "# Performance\n\nProse.\n\n## Latest full run\n\nnew tables\n");

        std::fs::write(&path, "# Performance\n\nNo results section.\n").unwrap();
        let err = write_performance_doc(&path, "new tables\n").unwrap_err().to_string();
        assert!(err.contains("## Latest full run"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "# Performance\n\nNo results section.\n");
    }
}
