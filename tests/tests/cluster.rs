//! The install test: `kubectl apply -f deploy/ferry.yaml` on a real one-node cluster (kubelet +
//! containerd + kube-proxy in a node netns; see `ferry_sandbox::cluster`), with the image built
//! locally from the `ferry` binary. Skipped unless `FERRY_KUBE_BIN` names the cluster's binaries,
//! which `cargo xtask test` builds and sets.

use std::time::Duration;

use anyhow::Result;
use ferry_sandbox::{cluster::Cluster, kube};
use serde_json::Value;

const MESHED: &str = "shop";
const PLAIN: &str = "plain";
const PORT: u16 = 8080;

/// A pod running the sandbox app's echo server; tests connect from it with `exec`.
fn app_pod(namespace: &str, name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{app: {name}}}}}\n\
         spec:\n  automountServiceAccountToken: false\n  terminationGracePeriodSeconds: 0\n  containers:\n  \
         - name: app\n    image: localhost/app:1\n    imagePullPolicy: Never\n    \
         args: [serve, \"{PORT}\"]\n"
    )
}

fn get(cluster: &Cluster, args: &[&str], jsonpath: &str) -> String {
    let path = format!("jsonpath={jsonpath}");
    let (_, out, _) = cluster.api.kubectl(&[&["get"], args, &["-o", &path]].concat(), None).unwrap();
    out.trim().to_owned()
}

/// `ferry ARGS -o json` run inside the agent's pod.
fn ferry(cluster: &Cluster, args: &[&str]) -> Result<Value> {
    let pod = agent_pod(cluster);
    let (code, out, err) =
        cluster.exec("ferry-system", &pod, &[&["ferry"], args, &["-o", "json"]].concat())?;
    anyhow::ensure!(code == 0, "ferry {args:?} in {pod}: {err}");
    Ok(serde_json::from_str(&out)?)
}

fn captured(cluster: &Cluster) -> u64 {
    ferry(cluster, &["status"]).map(|s| s["workloads_captured"].as_u64().unwrap_or(0)).unwrap_or(u64::MAX)
}

/// Connects from pod `from` to `to`'s server; whether the bytes came back.
fn echoed(cluster: &Cluster, from: (&str, &str), to_ip: &str) -> bool {
    let target = format!("{to_ip}:{PORT}");
    let (_, out, _) = cluster.exec(from.0, from.1, &["sandbox-app", "connect", &target, "10"]).unwrap();
    out.contains("echoed 10")
}

/// Connections the agent's proxy has opened, over every direction and route (`ferry metrics`).
fn opened_by_agent(cluster: &Cluster) -> f64 {
    let (_, metrics, _) = cluster.exec("ferry-system", &agent_pod(cluster), &["ferry", "metrics"]).unwrap();
    metrics
        .lines()
        .filter(|l| l.starts_with("ferry_proxy_connections_opened_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn the_manifest_installs_meshes_labelled_namespaces_and_uninstalls_cleanly() {
    let dir = std::env::temp_dir().join(format!("fycluster{}", std::process::id()));
    let Some(cluster) = Cluster::start(&dir, &format!("fycl{}", std::process::id() % 100_000)).unwrap()
    else {
        return;
    };
    let api = &cluster.api;
    let manifest = std::fs::read_to_string(kube::deploy_dir().join("ferry.yaml")).unwrap();
    api.apply(&manifest).unwrap();
    cluster
        .wait_for(Duration::from_secs(120), "agent DaemonSet and signer Ready", |c| {
            let agents = get(c, &["daemonset", "ferry-agent", "-n", "ferry-system"], "{.status.numberReady}");
            let signers =
                get(c, &["deployment", "ferry-signer", "-n", "ferry-system"], "{.status.readyReplicas}");
            Ok(agents == "1" && signers == "2")
        })
        .unwrap();

    api.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {MESHED}, labels: {{ferry.dev/mesh: enabled}}}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {{name: {PLAIN}}}\n"
    ))
    .unwrap();
    for (ns, name) in [(MESHED, "a"), (MESHED, "b"), (PLAIN, "c")] {
        api.apply(&app_pod(ns, name)).unwrap();
    }
    let running =
        |c: &Cluster, ns: &str, name: &str| get(c, &["pod", name, "-n", ns], "{.status.phase}") == "Running";
    cluster
        .wait_for(Duration::from_secs(60), "app pods Running", |c| {
            Ok(running(c, MESHED, "a") && running(c, MESHED, "b") && running(c, PLAIN, "c"))
        })
        .unwrap();
    let ip = |ns: &str, name: &str| get(&cluster, &["pod", name, "-n", ns], "{.status.podIP}");
    let b_ip = ip(MESHED, "b");
    let uids = || get(&cluster, &["pods", "-A", "-l", "app in (a,b,c)"], "{.items[*].metadata.uid}");
    let pods_before = uids();

    // The labelled namespace's two pods are meshed, with certificates from the signer, and
    // marked captured for agents on other nodes.
    cluster.wait_for(Duration::from_secs(30), "a and b captured", |c| Ok(captured(c) == 2)).unwrap();
    let marks =
        || get(&cluster, &["pods", "-n", MESHED], "{.items[*].metadata.annotations.ferry\\.dev/captured}");
    cluster.wait_for(Duration::from_secs(5), "a and b marked", |_| Ok(marks() == "true true")).unwrap();
    let issued = |cluster: &Cluster| -> Result<Vec<String>> {
        let certs = ferry(cluster, &["certs"])?;
        let issued = certs.as_array().into_iter().flatten().filter(|c| c["state"] == "issued");
        Ok(issued.filter_map(|c| c["identity"].as_str().map(str::to_owned)).collect())
    };
    let identity = format!("spiffe://cluster.local/ns/{MESHED}/sa/default");
    cluster
        .wait_for(Duration::from_secs(10), "a and b certified", |c| Ok(issued(c)? == [identity.clone()]))
        .unwrap();
    let opened = opened_by_agent(&cluster);
    assert!(echoed(&cluster, (MESHED, "a"), &b_ip));
    assert!(opened_by_agent(&cluster) > opened, "a's connection did not go through the agent");
    // Seen live in `ferry connections`, in the agent's pod.
    let target = format!("{b_ip}:{PORT}");
    let idle = std::thread::scope(|s| {
        let hold = s.spawn(|| cluster.exec(MESHED, "a", &["sandbox-app", "idle", &target, "3"]));
        let seen = cluster.wait_for(Duration::from_secs(3), "a connection listed", |c| {
            let connections = ferry(c, &["connections"])?;
            Ok(connections
                .as_array()
                .is_some_and(|list| list.iter().any(|conn| conn.to_string().contains(&b_ip))))
        });
        let _ = hold.join();
        seen
    });
    idle.unwrap();
    let metrics = cluster.exec("ferry-system", &agent_pod(&cluster), &["ferry", "metrics"]).unwrap().1;
    assert!(metrics.contains("istio_tcp_connections_opened_total"), "{metrics}");

    // The unlabelled namespace's pod is untouched.
    let workloads = ferry(&cluster, &["workloads"]).unwrap();
    let c = workloads.as_array().unwrap().iter().find(|w| w["name"] == "c");
    assert!(c.is_none_or(|c| c["captured"] != true), "{workloads}");
    let opened = opened_by_agent(&cluster);
    assert!(echoed(&cluster, (PLAIN, "c"), &ip(PLAIN, "c")));
    assert_eq!(opened_by_agent(&cluster), opened, "c's connection went through the agent");

    // Removing the label un-meshes without restarting anything.
    api.kubectl(&["label", "namespace", MESHED, "ferry.dev/mesh-"], None).unwrap();
    cluster.wait_for(Duration::from_secs(10), "a and b released", |c| Ok(captured(c) == 0)).unwrap();
    cluster.wait_for(Duration::from_secs(5), "a and b unmarked", |_| Ok(marks().is_empty())).unwrap();
    let opened = opened_by_agent(&cluster);
    assert!(echoed(&cluster, (MESHED, "a"), &b_ip));
    assert_eq!(opened_by_agent(&cluster), opened);

    // Uninstalling detaches capture: meshed pods keep working, unmeshed.
    api.kubectl(&["label", "namespace", MESHED, "ferry.dev/mesh=enabled"], None).unwrap();
    cluster.wait_for(Duration::from_secs(30), "a and b captured again", |c| Ok(captured(c) == 2)).unwrap();
    let (code, _, err) =
        api.kubectl(&["delete", "-f", "-", "--wait=true", "--timeout=90s"], Some(&manifest)).unwrap();
    assert_eq!(code, 0, "{err}");
    cluster
        .wait_for(Duration::from_secs(60), "agent pod gone", |c| {
            Ok(get(c, &["pods", "-n", "ferry-system"], "{.items[*].metadata.name}").is_empty())
        })
        .unwrap();
    assert!(echoed(&cluster, (MESHED, "a"), &b_ip), "a cannot reach b after uninstall");
    // The agent detached its programs and unpinned everything (bpfPinDir of deploy/ferry.yaml).
    let pins = std::path::Path::new("/sys/fs/bpf/ferry");
    let pinned: Vec<_> = walk(pins).into_iter().filter(|p| !p.is_dir()).collect();
    assert!(pinned.is_empty(), "still pinned after uninstall: {pinned:?}");
    let _ = std::fs::remove_dir_all(pins);
    assert_eq!(uids(), pods_before, "pods were restarted");
    let restarts = get(
        &cluster,
        &["pods", "-A", "-l", "app in (a,b,c)"],
        "{.items[*].status.containerStatuses[0].restartCount}",
    );
    assert!(restarts.split_whitespace().all(|n| n == "0"), "{restarts}");
}

fn agent_pod(cluster: &Cluster) -> String {
    get(
        cluster,
        &["pods", "-n", "ferry-system", "-l", "app.kubernetes.io/name=ferry-agent"],
        "{.items[0].metadata.name}",
    )
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let entries = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path());
    entries.flat_map(|p| if p.is_dir() { walk(&p) } else { vec![p] }).collect()
}
