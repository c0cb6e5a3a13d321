//! Kubernetes mode against a real kube-apiserver (run in the node's netns; skipped unless
//! `FERRY_KUBE_BIN` names the binaries, which `cargo xtask test` builds and sets). The test plays
//! the kubelet: it creates Pods bound to the node, lays their cgroups out as the kubelet's cgroupfs
//! driver does (`kubepods/besteffort/pod<uid>`), runs their processes there and reports their IPs
//! in the status.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use ferry_sandbox::{
    CGROUP2_ROOT, CertFiles, Cgroup, ConnectOutcome, PeerServer, Pod, PodSpec, ProcUsage, Process, Sandbox,
    Server, hbone_client, hbone_server,
    kube::{self, ApiServer},
};

const PORT: u16 = 8080;
const NAMESPACE: &str = "shop";

/// A pod's long-lived process: the kubelet's pause container, what the agent finds the pod's
/// netns through.
fn pause(sb: &Sandbox, pod: &str) -> Process {
    let mut cmd = Command::new("sleep");
    cmd.arg("600");
    let p = sb.pod(pod);
    Process::new(p.netns.spawn(cmd, Some(&p.cgroup)).unwrap())
}

fn pod_yaml(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: sa-{name}, namespace: {NAMESPACE}}}\n\
         automountServiceAccountToken: false\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NAMESPACE}, labels: {{app: {name}}}}}\n\
         spec:\n  nodeName: node1\n  serviceAccountName: sa-{name}\n  automountServiceAccountToken: false\n  \
         containers: [{{name: app, image: localhost/app:1, ports: [{{name: http, containerPort: {PORT}}}]}}]\n"
    )
}

fn captured(sb: &Sandbox) -> u64 {
    sb.ferry_json("node1", &["status"]).unwrap()["workloads_captured"].as_u64().unwrap()
}

fn wait_captured(sb: &Sandbox, n: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while captured(sb) != n {
        assert!(
            Instant::now() < deadline,
            "{what}: {} captured, expected {n}\n{}",
            captured(sb),
            sb.agent_log("node1")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn same_node_connections(sb: &Sandbox) -> f64 {
    sb.metric("node1", "ferry_proxy_connections_opened_total{direction=\"outbound\",route=\"same_node\"}")
        .unwrap()
}

fn echoed(sb: &Sandbox, from: &str, to: &str) -> bool {
    let to = SocketAddr::from((sb.pod(to).ip, PORT));
    matches!(sb.pod(from).connect(to, 10).unwrap(), ConnectOutcome::Echoed { .. })
}

/// One node with pods a, b, c as Pods of namespace `shop` bound to it (Running, with their IPv4
/// addresses), and the API server; `None` when there is no API server to test against.
fn cluster(label: &str) -> Option<(Sandbox, ApiServer)> {
    cluster_reporting(label, |pod| vec![pod.ip.into()])
}

/// [`cluster`], each Pod's status listing the addresses `ips` gives for it (primary first).
fn cluster_reporting(label: &str, ips: impl Fn(&Pod) -> Vec<IpAddr>) -> Option<(Sandbox, ApiServer)> {
    let pods = ["a", "b", "c"].map(PodSpec::unmeshed).to_vec();
    let mut sb = Sandbox::new(label, &[("node1", pods)]).unwrap();
    let api = ApiServer::start(&sb.dir, &sb.node("node1").netns).unwrap()?;
    api.apply(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}\n")).unwrap();
    for name in ["a", "b", "c"] {
        api.apply(&pod_yaml(name)).unwrap();
        let (_, uid, _) = api
            .kubectl(&["get", "pod", name, "-n", NAMESPACE, "-o", "jsonpath={.metadata.uid}"], None)
            .unwrap();
        // Where the kubelet (cgroupfs driver) would put the pod.
        let cgroup = Path::new(CGROUP2_ROOT).join(&sb.id).join(format!("kubepods/besteffort/pod{uid}"));
        let pod = sb.pods.iter_mut().find(|p| p.spec.name == name).unwrap();
        pod.cgroup = Cgroup::create(&cgroup).unwrap();
        let status = pod_status(&ips(pod), true);
        let (code, _, err) = api
            .kubectl(
                &[
                    "patch",
                    "pod",
                    name,
                    "-n",
                    NAMESPACE,
                    "--subresource=status",
                    "--type=merge",
                    "-p",
                    &status,
                ],
                None,
            )
            .unwrap();
        assert_eq!(code, 0, "{err}");
    }
    Some((sb, api))
}

/// A status patch: Running with addresses `ips` (primary first), Ready or not.
fn pod_status(ips: &[IpAddr], ready: bool) -> String {
    let ready = if ready { "True" } else { "False" };
    let pod_ips: Vec<_> = ips.iter().map(|ip| serde_json::json!({ "ip": ip })).collect();
    serde_json::json!({ "status": {
        "phase": "Running",
        "podIP": ips[0],
        "podIPs": pod_ips,
        "conditions": [{ "type": "Ready", "status": ready }],
    }})
    .to_string()
}

/// Starts node1's agent in Kubernetes mode against `api`, as the cluster admin.
fn start_agent(sb: &mut Sandbox, api: &ApiServer) {
    start_agent_as(sb, &api.kubeconfig);
}

/// Starts node1's agent in Kubernetes mode with the credentials of `kubeconfig`.
fn start_agent_as(sb: &mut Sandbox, kubeconfig: &Path) {
    sb.set_agent_env("node1", "KUBECONFIG", &kubeconfig.display().to_string());
    let cgroups = Path::new(CGROUP2_ROOT).join(&sb.id);
    let config = format!("{}podCgroupRoot: {}\n", sb.config_for("node1"), cgroups.display());
    sb.start_agent_with("node1", Some(&config), &["--kube"]).unwrap();
}

/// Waits up to 2 s until a's connections to b are echoed (`reaches`) or not; how long it took.
fn wait_until_a_reaches_b(sb: &Sandbox, reaches: bool, what: &str) -> Duration {
    wait_until_reaches(sb, ("a", "b"), reaches, what, Duration::from_secs(2))
}

fn wait_until_reaches(
    sb: &Sandbox,
    (from, to): (&str, &str),
    reaches: bool,
    what: &str,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    while echoed(sb, from, to) != reaches {
        assert!(started.elapsed() < within, "not {what} after {within:?}:\n{}", sb.agent_log("node1"));
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

/// Applies a CustomResourceDefinition and waits until the API serves its kind.
fn install_crd(api: &ApiServer, yaml: &str, name: &str) {
    api.apply(yaml).unwrap();
    let crd = format!("crd/{name}");
    let (code, _, err) =
        api.kubectl(&["wait", "--for=condition=established", &crd, "--timeout=30s"], None).unwrap();
    assert_eq!(code, 0, "{err}");
}

/// Ferry's AuthorizationPolicy CRD, as `ferry crd` prints it.
fn install_ferry_crd(api: &ApiServer) {
    let crd = Command::new(ferry_sandbox::ferry_bin().unwrap()).arg("crd").output().unwrap();
    install_crd(api, &String::from_utf8(crd.stdout).unwrap(), "authorizationpolicies.ferry.dev");
}

/// A Ferry policy `deny-<from>` denying pod `from` (by its service account) the pods labelled
/// app=b; `source` adds fields to the rule's source.
fn deny_to_b(from: &str, source: &str) -> String {
    format!(
        "apiVersion: ferry.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-{from}, namespace: {NAMESPACE}}}\n\
         spec:\n  selector: {{matchLabels: {{app: b}}}}\n  action: DENY\n  rules:\n  - from:\n    \
         - source: {{principals: [\"cluster.local/ns/{NAMESPACE}/sa/sa-{from}\"]{source}}}\n"
    )
}

/// A podCgroupRoot that does not hold the kubelet's tree would leave every pod uncaptured, with
/// the agent otherwise serving: it says so (readiness, status, metric, one log line per pod).
#[test]
fn a_wrong_pod_cgroup_root_is_reported_not_passed_over() {
    let Some((mut sb, api)) = cluster("kubecgroot") else { return };
    let _pause = pause(&sb, "a");
    let _server_b = sb.pod("b").serve(PORT).unwrap();
    api.kubectl(&["label", "namespace", NAMESPACE, "ferry.dev/mesh=enabled"], None).unwrap();
    sb.set_agent_env("node1", "KUBECONFIG", &api.kubeconfig.display().to_string());
    let elsewhere = sb.dir.join("not-the-kubelets-cgroups");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let config = format!("{}podCgroupRoot: {}\n", sb.config_for("node1"), elsewhere.display());
    let why = "3 local workload(s) not captured";
    sb.start_agent_not_ready("node1", &config, &["--kube"], why).unwrap();
    let status = sb.ferry_json("node1", &["status"]).unwrap();
    assert_eq!((&status["workloads_captured"], &status["workloads_uncaptured"]), (&0.into(), &3.into()));
    assert_eq!(status["not_ready"], why, "{status}");
    assert_eq!(sb.metric("node1", "ferry_workloads_uncaptured").unwrap(), 3.0);
    let logged = || sb.agent_log("node1").matches("is podCgroupRoot right?").count();
    assert_eq!(logged(), 3, "{}", sb.agent_log("node1"));
    // Looked for again every second, and not logged again.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(logged(), 3, "{}", sb.agent_log("node1"));
}

#[test]
fn namespace_label_enrols_and_releases_pods_without_restarting_them() {
    let Some((mut sb, api)) = cluster("kube") else { return };
    // a's only process is its pause container; b's app serves; c has no process yet.
    let _pause = pause(&sb, "a");
    let _server_b = sb.pod("b").serve(PORT).unwrap();

    start_agent(&mut sb, &api);

    // Not enrolled yet: pods talk directly.
    assert_eq!(captured(&sb), 0);
    assert!(echoed(&sb, "a", "b"));
    assert_eq!(same_node_connections(&sb), 0.0);

    // Labelling the namespace enrols its running pods, without restarting them.
    api.kubectl(&["label", "namespace", NAMESPACE, "ferry.dev/mesh=enabled"], None).unwrap();
    wait_captured(&sb, 2, "after labelling");
    assert!(echoed(&sb, "a", "b"));
    assert_eq!(same_node_connections(&sb), 1.0);
    // Captured pods are marked so for agents on other nodes; c is not captured yet.
    wait_for_mark(&api, "b", "true");
    assert_eq!(mark(&api, "c"), "");

    // c's app starts only now: the agent finds its netns on a retry.
    let _server_c = sb.pod("c").serve(PORT).unwrap();
    wait_captured(&sb, 3, "once c's processes run");
    assert!(echoed(&sb, "a", "c"));
    assert_eq!(same_node_connections(&sb), 2.0);

    // A label change serves the pod anew on the same listening sockets, its capture kept:
    // nothing refused, nothing bypassing the mesh.
    api.kubectl(&["label", "pod", "b", "-n", NAMESPACE, "tier=web"], None).unwrap();
    sb.wait_for_log("node1", "workload served with its new spec, capture kept workload=shop/b", 1).unwrap();
    assert_eq!(sb.agent_log("node1").matches("workload captured workload=shop/b").count(), 1);
    assert!(echoed(&sb, "a", "b"));
    assert!(!sb.agent_log("node1").contains("cannot capture"), "{}", sb.agent_log("node1"));

    // A pod labelled ferry.dev/mesh=disabled opts out on its own, and back in without it.
    api.kubectl(&["label", "pod", "c", "-n", NAMESPACE, "ferry.dev/mesh=disabled"], None).unwrap();
    wait_captured(&sb, 2, "after c opted out");
    assert!(echoed(&sb, "a", "c"));
    assert_eq!(same_node_connections(&sb), 3.0, "a -> c went through the agent");
    // Still known (a service endpoint like the others, reached with plain TCP), not meshed.
    let workloads = sb.ferry_json("node1", &["workloads"]).unwrap();
    let c = workloads.as_array().unwrap().iter().find(|w| w["name"] == "c").expect("c known");
    assert_eq!((&c["meshed"], &c["captured"]), (&false.into(), &false.into()), "{workloads}");
    api.kubectl(&["label", "pod", "c", "-n", NAMESPACE, "ferry.dev/mesh-"], None).unwrap();
    wait_captured(&sb, 3, "after c opted back in");

    // A deleted pod is released: no capture, no map entries left for it.
    api.kubectl(&["delete", "pod", "b", "-n", NAMESPACE, "--grace-period=0", "--force"], None).unwrap();
    wait_captured(&sb, 2, "after deleting b");
    let (_, body) = sb.node("node1").http_get(15000, "/datapath").unwrap();
    let datapath: serde_json::Value = serde_json::from_str(&body).unwrap();
    let entries = |name: &str| {
        datapath["maps"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap()["entries"]
            .as_u64()
            .unwrap()
    };
    assert_eq!((entries("MESHED_NETNS"), entries("INBOUND_LISTENERS")), (2, 2), "{datapath}");

    // Removing the label releases the rest: direct again, and no longer marked captured.
    api.kubectl(&["label", "namespace", NAMESPACE, "ferry.dev/mesh-"], None).unwrap();
    wait_captured(&sb, 0, "after unlabelling");
    assert!(echoed(&sb, "a", "c"));
    assert_eq!(same_node_connections(&sb), 3.0);
    wait_for_mark(&api, "c", "");
}

/// The pod's `ferry.dev/captured` annotation, "" without one.
fn mark(api: &ApiServer, pod: &str) -> String {
    let path = "jsonpath={.metadata.annotations.ferry\\.dev/captured}";
    api.kubectl(&["get", "pod", pod, "-n", NAMESPACE, "-o", path], None).unwrap().1
}

fn wait_for_mark(api: &ApiServer, pod: &str, value: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while mark(api, pod) != value {
        assert!(Instant::now() < deadline, "{pod} not marked {value:?}: {:?}", mark(api, pod));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Binds `pod`'s Pod to node2 instead (in the sandbox it stays where it was, in node1's
/// netns, where node1's agent does not capture it: it plays a pod on another node).
fn bind_to_node2(sb: &Sandbox, api: &ApiServer, pod: &str) {
    api.kubectl(&["delete", "pod", pod, "-n", NAMESPACE, "--grace-period=0", "--force"], None).unwrap();
    api.apply(&pod_yaml(pod).replace("nodeName: node1", "nodeName: node2")).unwrap();
    let status = pod_status(&[sb.pod(pod).ip.into()], true);
    let patch = ["patch", "pod", pod, "-n", NAMESPACE, "--subresource=status", "--type=merge", "-p", &status];
    assert_eq!(api.kubectl(&patch, None).unwrap().0, 0);
}

/// A pod on another node is tunnelled to only once that node's agent has marked it captured.
/// Until then (no agent there, or not captured yet) it is reached with plain TCP, as if
/// uncaptured, not at an HBONE port nobody listens on.
#[test]
fn a_pod_elsewhere_is_tunnelled_to_only_once_marked_captured() {
    let Some((mut sb, api)) = cluster("kuberemote") else { return };
    // c's Pod is bound to node2, which has no agent.
    bind_to_node2(&sb, &api, "c");
    let _pause = pause(&sb, "a");
    let _server = sb.pod("c").serve(PORT).unwrap();
    api.kubectl(&["label", "namespace", NAMESPACE, "ferry.dev/mesh=enabled"], None).unwrap();
    start_agent(&mut sb, &api);

    let passthrough = "ferry_proxy_connections_opened_total{direction=\"outbound\",route=\"passthrough\"}";
    assert!(echoed(&sb, "a", "c"), "{}", sb.agent_log("node1"));
    assert_eq!(sb.metric("node1", passthrough).unwrap(), 1.0);
    // Marked captured (as node2's agent would): tunnelled, and here nobody answers on 15008.
    api.kubectl(&["annotate", "pod", "c", "-n", NAMESPACE, "ferry.dev/captured=true"], None).unwrap();
    wait_until_reaches(&sb, ("a", "c"), false, "tunnelled once marked", Duration::from_secs(2));
    api.kubectl(&["annotate", "pod", "c", "-n", NAMESPACE, "ferry.dev/captured-"], None).unwrap();
    wait_until_reaches(&sb, ("a", "c"), true, "plain TCP once unmarked", Duration::from_secs(2));
}

#[test]
fn losing_the_api_server_keeps_the_last_state_and_resyncs_after() {
    let Some((mut sb, mut api)) = cluster("kubeloss") else { return };
    let _pause = pause(&sb, "a");
    let _server = sb.pod("b").serve(PORT).unwrap();
    api.kubectl(&["label", "namespace", NAMESPACE, "ferry.dev/mesh=enabled"], None).unwrap();
    start_agent(&mut sb, &api);
    assert_eq!(captured(&sb), 2);

    api.stop();
    std::thread::sleep(Duration::from_secs(2));
    // The datapath serves on what it knew.
    assert_eq!(captured(&sb), 2);
    assert!(echoed(&sb, "a", "b"));
    assert_eq!(same_node_connections(&sb), 1.0);
    assert_eq!(sb.node("node1").http_get(15021, "/healthz/ready").unwrap().0, 200);

    // What changed meanwhile arrives once the API server is back.
    api.restart().unwrap();
    api.kubectl(&["label", "namespace", NAMESPACE, "ferry.dev/mesh-"], None).unwrap();
    wait_captured(&sb, 0, "after the API server came back and the label was removed");
}

#[test]
fn policies_applied_with_kubectl_are_enforced_and_invalid_ones_refused() {
    let Some((mut sb, api)) = cluster("kubepolicy") else { return };
    install_ferry_crd(&api);
    let _pause = pause(&sb, "a");
    let _server = sb.pod("b").serve(PORT).unwrap();
    api.kubectl(&["label", "namespace", NAMESPACE, "ferry.dev/mesh=enabled"], None).unwrap();
    start_agent(&mut sb, &api);
    assert!(echoed(&sb, "a", "b"));

    api.apply(&deny_to_b("a", "")).unwrap();
    let took = wait_until_a_reaches_b(&sb, false, "policy enforced");
    eprintln!("policy enforced {took:?} after kubectl apply returned");
    sb.wait_for_log("node1", "shop/deny-a", 1).unwrap();

    // The CRD's schema (generated from the policy types) refuses what the agent could not use.
    for (bad, field) in
        [("action: BLOCK", "spec.action"), ("rules: [{to: [{operation: {ports: [80]}}]}]", "ports")]
    {
        let yaml = format!(
            "apiVersion: ferry.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: bad, namespace: {NAMESPACE}}}\n\
             spec: {{{bad}}}\n"
        );
        let (code, _, stderr) = api.kubectl(&["apply", "-f", "-"], Some(&yaml)).unwrap();
        assert_ne!(code, 0, "{bad} was accepted");
        assert!(stderr.contains(field), "{bad}: {stderr}");
    }

    // What the schema lets through but the agent cannot use (an IP block of /33) is refused by
    // the agent, alone: the policy's last valid version stays in force, and others still arrive.
    api.apply(&deny_to_b("a", ", ipBlocks: [10.0.0.0/33]")).unwrap();
    sb.wait_for_log("node1", "its last valid version stays in force", 1).unwrap();
    assert!(sb.agent_log("node1").contains("10.0.0.0/33"), "the refusal says what is wrong");
    assert_eq!(sb.metric("node1", "ferry_policies_refused").unwrap(), 1.0);
    let (_, policies) = sb.node("node1").http_get(15000, "/policies").unwrap();
    assert!(policies.contains("its current version is refused"), "`ferry policies` says so: {policies}");
    assert!(!echoed(&sb, "a", "b"), "an invalid edit lifted the policy");
    // A new object refused has nothing in force: `ferry policies` lists it as refused, with why.
    api.apply(&deny_to_b("d", ", ipBlocks: [10.0.0.0/33]")).unwrap();
    sb.wait_for_log("node1", "policy refused", 2).unwrap();
    assert_eq!(sb.metric("node1", "ferry_policies_refused").unwrap(), 2.0);
    let policies = sb.ferry_json("node1", &["policies"]).unwrap();
    let refused = policies.as_array().unwrap().iter().find(|p| p["name"] == "deny-d").expect("deny-d listed");
    assert_eq!(refused["action"], "REFUSED", "{policies}");
    assert!(refused["warnings"][0].as_str().unwrap().contains("10.0.0.0/33"), "{policies}");
    let (_, table, _) = sb.ferry("node1", &["policies"]).unwrap();
    assert!(table.lines().any(|l| l.contains("shop/deny-d") && l.contains("REFUSED")), "{table}");
    let _pause_c = pause(&sb, "c");
    wait_captured(&sb, 3, "c meshed");
    assert!(echoed(&sb, "c", "b"));
    api.apply(&deny_to_b("c", "")).unwrap();
    wait_until_reaches(
        &sb,
        ("c", "b"),
        false,
        "a policy after an invalid one enforced",
        Duration::from_secs(2),
    );

    api.kubectl(&["delete", "authorizationpolicies.ferry.dev", "deny-a", "-n", NAMESPACE], None).unwrap();
    wait_until_a_reaches_b(&sb, true, "policy lifted after deletion");
}

/// Ferry's CRD installed after the agent started (applied in another step, or still being
/// established when the agent came up): its policies are enforced once it is there.
#[test]
fn policies_are_enforced_once_their_crd_is_installed_after_the_agent_started() {
    let Some((mut sb, api)) = cluster("kubelatecrd") else { return };
    let _pause = pause(&sb, "a");
    let _server = sb.pod("b").serve(PORT).unwrap();
    api.kubectl(&["label", "namespace", NAMESPACE, "ferry.dev/mesh=enabled"], None).unwrap();
    start_agent(&mut sb, &api);
    assert!(echoed(&sb, "a", "b"));

    install_ferry_crd(&api);
    api.apply(&deny_to_b("a", "")).unwrap();
    // The agent looks for a missing CRD every 10 s.
    wait_until_reaches(&sb, ("a", "b"), false, "policy enforced", Duration::from_secs(25));
    sb.wait_for_log("node1", "shop/deny-a", 1).unwrap();
}

/// An agent that may not list Ferry's policies (a ClusterRole left from an older release, say)
/// cannot know whether any exist: it waits, not ready, until it may, rather than meshing pods
/// without the policies that protect them.
#[test]
fn an_agent_that_may_not_read_policies_waits_until_it_may() {
    let Some((mut sb, api)) = cluster("kubeforbid") else { return };
    install_ferry_crd(&api);
    api.apply(&deny_to_b("a", "")).unwrap();
    let _pause = pause(&sb, "a");
    let _server = sb.pod("b").serve(PORT).unwrap();
    api.kubectl(&["label", "namespace", NAMESPACE, "ferry.dev/mesh=enabled"], None).unwrap();
    let role = |policy_groups: &str| {
        format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {{name: test-agent}}\nrules:\n\
             - {{apiGroups: [\"\"], resources: [namespaces, pods, services], verbs: [get, list, watch]}}\n\
             - {{apiGroups: [{policy_groups}], resources: [authorizationpolicies], verbs: [get, list, watch]}}\n"
        )
    };
    api.apply(&role("security.istio.io")).unwrap();
    for args in [
        &["create", "serviceaccount", "test-agent", "-n", NAMESPACE][..],
        &[
            "create",
            "clusterrolebinding",
            "test-agent",
            "--clusterrole=test-agent",
            "--serviceaccount=shop:test-agent",
        ],
    ] {
        let (code, _, err) = api.kubectl(args, None).unwrap();
        assert_eq!(code, 0, "{err}");
    }
    let (code, token, err) = api.kubectl(&["create", "token", "test-agent", "-n", NAMESPACE], None).unwrap();
    assert_eq!(code, 0, "{err}");
    let kubeconfig = api.kubeconfig_with_token("test-agent", token.trim()).unwrap();

    let started = Instant::now();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_secs(3));
            api.apply(&role("ferry.dev, security.istio.io")).unwrap();
        });
        start_agent_as(&mut sb, &kubeconfig);
    });
    assert!(started.elapsed() > Duration::from_secs(3), "the agent was ready before it could read policies");
    // Ready means with the policies: a is denied from the first connection on.
    assert!(!echoed(&sb, "a", "b"), "meshed without the policy in force:\n{}", sb.agent_log("node1"));
    let log = sb.agent_log("node1");
    assert!(log.contains("cannot tell whether Ferry authorization policies"), "{log}");
}

/// Istio's AuthorizationPolicy CRD, cut down to what the API server needs to serve it (Istio's
/// own has a full schema; the agent reads the spec the same way either way).
const ISTIO_CRD: &str = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n\
metadata: {name: authorizationpolicies.security.istio.io}\n\
spec:\n  group: security.istio.io\n  scope: Namespaced\n  \
names: {kind: AuthorizationPolicy, plural: authorizationpolicies, singular: authorizationpolicy, listKind: AuthorizationPolicyList}\n  \
versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        \
type: object\n        properties:\n          spec: {type: object, x-kubernetes-preserve-unknown-fields: true}\n";

#[test]
fn istio_authorization_policies_are_honoured() {
    let Some((mut sb, api)) = cluster("kubeistio") else { return };
    install_crd(&api, ISTIO_CRD, "authorizationpolicies.security.istio.io");
    let _pause = pause(&sb, "a");
    let _server = sb.pod("b").serve(PORT).unwrap();
    api.kubectl(&["label", "namespace", NAMESPACE, "ferry.dev/mesh=enabled"], None).unwrap();
    start_agent(&mut sb, &api);
    assert!(echoed(&sb, "a", "b"));

    // As Istio users write them: ports as strings.
    let istio_policy = |name: &str, extra: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\n\
             spec:\n  selector: {{matchLabels: {{app: b}}}}\n  action: DENY\n{extra}  rules:\n  - from:\n    \
             - source: {{principals: [\"cluster.local/ns/{NAMESPACE}/sa/sa-a\"]}}\n    to:\n    \
             - operation: {{ports: [\"{PORT}\"]}}\n"
        )
    };
    // Bound to a waypoint: not the node proxy's to enforce.
    api.apply(&istio_policy("for-waypoint", "  targetRefs: [{kind: Service, group: \"\", name: b}]\n"))
        .unwrap();
    sb.wait_for_log("node1", "bound with targetRefs to a waypoint", 1).unwrap();
    assert!(echoed(&sb, "a", "b"), "a waypoint's policy was enforced");
    api.apply(&istio_policy("deny-a", "")).unwrap();
    wait_until_a_reaches_b(&sb, false, "Istio policy enforced");
    api.kubectl(&["delete", "authorizationpolicies.security.istio.io", "deny-a", "-n", NAMESPACE], None)
        .unwrap();
    wait_until_a_reaches_b(&sb, true, "Istio policy lifted after deletion");

    // In Istio's root namespace, without a selector: mesh-wide, as in Istio.
    api.kubectl(&["create", "namespace", "istio-system"], None).unwrap();
    let mesh_wide = istio_policy("deny-a-everywhere", "").replace(
        &format!("namespace: {NAMESPACE}}}\nspec:\n  selector: {{matchLabels: {{app: b}}}}\n"),
        "namespace: istio-system}\nspec:\n",
    );
    assert!(mesh_wide.contains("namespace: istio-system") && !mesh_wide.contains("selector"), "{mesh_wide}");
    api.apply(&mesh_wide).unwrap();
    wait_until_a_reaches_b(&sb, false, "Istio's mesh-wide policy enforced");
}

#[test]
fn service_connections_are_balanced_over_its_pods() {
    let Some((mut sb, api)) = cluster("kubesvc") else { return };
    api.kubectl(&["label", "pod", "b", "c", "-n", NAMESPACE, "role=web"], None).unwrap();
    // b and c are replicas of Deployment web: their ReplicaSet controls them.
    let replica = r#"{"metadata": {"labels": {"pod-template-hash": "5d8f9c"}, "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d8f9c", "uid": "6a1f1c4e-0000-4000-8000-000000000001", "controller": true}]}}"#;
    for pod in ["b", "c"] {
        let (code, _, err) = api
            .kubectl(&["patch", "pod", pod, "-n", NAMESPACE, "--type=merge", "-p", replica], None)
            .unwrap();
        assert_eq!(code, 0, "{err}");
    }
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {NAMESPACE}}}\n\
         spec:\n  selector: {{role: web}}\n  \
         ports: [{{name: by-number, port: 80, targetPort: {PORT}}}, {{name: by-name, port: 81, targetPort: http}}]\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: sticky, namespace: {NAMESPACE}}}\n\
         spec:\n  selector: {{role: web}}\n  sessionAffinity: ClientIP\n  ports: [{{port: 80, targetPort: {PORT}}}]\n"
    );
    api.apply(&service).unwrap();
    let (_, vip, _) = api
        .kubectl(&["get", "service", "web", "-n", NAMESPACE, "-o", "jsonpath={.spec.clusterIP}"], None)
        .unwrap();
    let vip: SocketAddr = format!("{vip}:80").parse().unwrap();
    let _pause = pause(&sb, "a");
    let servers = [sb.pod("b").serve(PORT).unwrap(), sb.pod("c").serve(PORT).unwrap()];
    api.kubectl(&["label", "namespace", NAMESPACE, "ferry.dev/mesh=enabled"], None).unwrap();
    start_agent(&mut sb, &api);

    let services = sb.ferry_json("node1", &["services"]).unwrap();
    let web = services.as_array().unwrap().iter().find(|s| s["name"] == "web").expect("service web");
    assert_eq!(web["hostname"], format!("web.{NAMESPACE}.svc.cluster.local"), "{services}");
    assert_eq!(web["endpoints"].as_array().unwrap().len(), 2, "{services}");
    assert!(web["client_ip_affinity_seconds"].is_null(), "{services}");
    let sticky = services.as_array().unwrap().iter().find(|s| s["name"] == "sticky").expect("service sticky");
    assert_eq!(sticky["client_ip_affinity_seconds"], 10800, "Kubernetes' default timeout");
    for _ in 0..20 {
        // The app sees the service address it dialled; an endpoint answered.
        let outcome = sb.pod("a").connect(vip, 10).unwrap();
        assert_eq!(outcome, ConnectOutcome::Echoed { peer: vip, bytes: 10 });
    }
    // The servers report accepts asynchronously: wait for all 20.
    let deadline = Instant::now() + Duration::from_secs(2);
    while servers.iter().map(|s| s.accepted().len()).sum::<usize>() < 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let accepted = [&servers[0], &servers[1]].map(|s| s.accepted().len());
    assert_eq!(accepted.iter().sum::<usize>(), 20);
    assert!(accepted.iter().all(|n| *n >= 2), "not balanced: b {} c {}", accepted[0], accepted[1]);
    let series = format!(
        "istio_tcp_connections_opened_total{{reporter=\"source\",source_workload=\"a\",source_workload_namespace=\"{NAMESPACE}\""
    );
    let metrics = sb.metrics("node1").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(&series)
                && l.contains("destination_service=\"web.shop.svc.cluster.local\"")),
        "no connection metric names the service:\n{metrics}"
    );
    // Metrics name the Deployment the endpoints belong to, not the pods (whose names change with
    // every rollout); the flow events name the pods.
    let opened = || metrics.lines().filter(|l| l.starts_with("istio_tcp_connections_opened_total"));
    assert!(opened().any(|l| l.contains("destination_workload=\"web\"")), "{metrics}");
    assert!(!opened().any(|l| l.contains("destination_workload=\"b\"")), "{metrics}");
    let flows = sb.ferry_json("node1", &["flows"]).unwrap();
    assert!(
        flows.as_array().unwrap().iter().any(|f| f["dst_workload"] == format!("{NAMESPACE}/b")),
        "{flows}"
    );
    let workloads = sb.ferry_json("node1", &["workloads"]).unwrap();
    let b = workloads.as_array().unwrap().iter().find(|w| w["name"] == "b").expect("workload b");
    assert_eq!(b["workload_name"], "web", "what metrics call it: {b}");

    // With client IP affinity, a client keeps its endpoint.
    let (_, sticky, _) = api
        .kubectl(&["get", "service", "sticky", "-n", NAMESPACE, "-o", "jsonpath={.spec.clusterIP}"], None)
        .unwrap();
    let sticky: SocketAddr = format!("{sticky}:80").parse().unwrap();
    servers.iter().for_each(Server::clear);
    for _ in 0..10 {
        assert_eq!(
            sb.pod("a").connect(sticky, 10).unwrap(),
            ConnectOutcome::Echoed { peer: sticky, bytes: 10 }
        );
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while servers.iter().map(|s| s.accepted().len()).sum::<usize>() < 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let accepted = [&servers[0], &servers[1]].map(|s| s.accepted().len());
    assert!(accepted == [10, 0] || accepted == [0, 10], "not sticky: b {} c {}", accepted[0], accepted[1]);

    // A pod that is not Ready gets no service connections.
    let status = pod_status(&[sb.pod("c").ip.into()], false);
    let (code, _, err) = api
        .kubectl(
            &["patch", "pod", "c", "-n", NAMESPACE, "--subresource=status", "--type=merge", "-p", &status],
            None,
        )
        .unwrap();
    assert_eq!(code, 0, "{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while sb.ferry_json("node1", &["services"]).unwrap()[0]["endpoints"].as_array().unwrap().len() != 1 {
        assert!(Instant::now() < deadline, "c still an endpoint while not ready\n{}", sb.agent_log("node1"));
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..10 {
        assert!(matches!(sb.pod("a").connect(vip, 10).unwrap(), ConnectOutcome::Echoed { .. }));
    }
    assert_eq!(servers[0].wait_accepted(accepted[0] + 10, Duration::from_secs(2)).len(), accepted[0] + 10);
    assert_eq!(servers[1].accepted().len(), accepted[1], "c got connections while not ready");
    // Readiness only steers service traffic: c's capture was not redone.
    assert_eq!(sb.agent_log("node1").matches("workload captured workload=shop/c").count(), 1);

    // A target port given by name is the port of that name on the endpoint's pod. (No
    // kube-proxy here: only the agent can take a connection to the virtual IP anywhere.)
    let by_name = SocketAddr::new(vip.ip(), 81);
    let outcome = sb.pod("a").connect(by_name, 10).unwrap();
    assert_eq!(outcome, ConnectOutcome::Echoed { peer: by_name, bytes: 10 }, "{}", sb.agent_log("node1"));
    assert_eq!(servers[0].wait_accepted(accepted[0] + 11, Duration::from_secs(2)).len(), accepted[0] + 11);

    // A terminating pod (deleted; with no kubelet here it stays so) is no endpoint, Ready or not.
    let ready = pod_status(&[sb.pod("c").ip.into()], true);
    let patch = ["patch", "pod", "c", "-n", NAMESPACE, "--subresource=status", "--type=merge", "-p", &ready];
    assert_eq!(api.kubectl(&patch, None).unwrap().0, 0);
    let endpoints =
        || sb.ferry_json("node1", &["services"]).unwrap()[0]["endpoints"].as_array().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(5);
    while endpoints() != 2 {
        assert!(Instant::now() < deadline, "c not an endpoint again once ready\n{}", sb.agent_log("node1"));
        std::thread::sleep(Duration::from_millis(50));
    }
    api.kubectl(&["delete", "pod", "c", "-n", NAMESPACE, "--wait=false"], None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while endpoints() != 1 {
        assert!(
            Instant::now() < deadline,
            "c still an endpoint while terminating\n{}",
            sb.agent_log("node1")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An IPv6-first dual-stack cluster: Pods list their IPv6 address first and a dual-stack Service's
/// first ClusterIP is IPv6, so that is what clients dial. Each family is captured, reaches the
/// Service's endpoint in the family dialled, and is subject to policy.
#[test]
fn an_ipv6_first_dual_stack_cluster_is_meshed_in_both_families() {
    let Some((mut sb, api)) = cluster_reporting("kubev6", |pod| vec![pod.ip6.into(), pod.ip.into()]) else {
        return;
    };
    install_ferry_crd(&api);
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {NAMESPACE}}}\n\
         spec:\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv6, IPv4]\n  selector: {{app: b}}\n  \
         ports: [{{port: 80, targetPort: {PORT}}}]\n"
    );
    api.apply(&service).unwrap();
    let (_, vips, _) = api
        .kubectl(&["get", "service", "web", "-n", NAMESPACE, "-o", "jsonpath={.spec.clusterIPs[*]}"], None)
        .unwrap();
    let vips: Vec<IpAddr> = vips.split_whitespace().map(|ip| ip.parse().unwrap()).collect();
    assert!(matches!(vips[..], [IpAddr::V6(_), IpAddr::V4(_)]), "ClusterIPs {vips:?}");
    let _pause = pause(&sb, "a");
    let server = sb.pod("b").serve(PORT).unwrap();
    api.kubectl(&["label", "namespace", NAMESPACE, "ferry.dev/mesh=enabled"], None).unwrap();
    start_agent(&mut sb, &api);

    let (a, b) = (sb.pod("a"), sb.pod("b"));
    let targets = [
        SocketAddr::from((b.ip6, PORT)),
        SocketAddr::from((b.ip, PORT)),
        SocketAddr::from((vips[0], 80)),
        SocketAddr::from((vips[1], 80)),
    ];
    for (n, to) in targets.into_iter().enumerate() {
        let (outcome, local) = a.connect_from(to, 10).unwrap();
        assert_eq!(outcome, ConnectOutcome::Echoed { peer: to, bytes: 10 }, "{}", sb.agent_log("node1"));
        let (own, delivered_from) = if to.is_ipv6() {
            (IpAddr::from(a.ip6), IpAddr::from(b.ip6))
        } else {
            (a.ip.into(), b.ip.into())
        };
        assert_eq!(local.ip(), own, "to {to}: the app's own address of the family dialled");
        let accepted = server.wait_accepted(n + 1, Duration::from_secs(2));
        assert_eq!(accepted[n].ip(), delivered_from, "to {to}: delivered in that family: {accepted:?}");
    }
    assert_eq!(same_node_connections(&sb), 4.0, "not every connection went through the agent");

    // The source's IPv6 address is what an ipBlocks rule sees.
    let deny = format!(
        "apiVersion: ferry.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-a6, namespace: {NAMESPACE}}}\n\
         spec:\n  selector: {{matchLabels: {{app: b}}}}\n  action: DENY\n  rules:\n  - from:\n    \
         - source: {{ipBlocks: [\"{}/128\"]}}\n",
        a.ip6
    );
    api.apply(&deny).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while matches!(a.connect(targets[0], 10).unwrap(), ConnectOutcome::Echoed { .. }) {
        assert!(Instant::now() < deadline, "IPv6 source not denied:\n{}", sb.agent_log("node1"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(matches!(a.connect(targets[2], 10).unwrap(), ConnectOutcome::Reset { .. }));
    for to in [targets[1], targets[3]] {
        assert!(matches!(a.connect(to, 10).unwrap(), ConnectOutcome::Echoed { .. }), "{to} denied too");
    }
}

/// A Pod as a Deployment would make it: two containers with environment, probes, resources and
/// mounts, three volumes, tolerations (about 13 KB as the API server returns it).
fn deployment_pod(namespace: &str, i: usize) -> serde_json::Value {
    let env: Vec<_> = (0..15)
        .map(
            |k| serde_json::json!({"name": format!("SETTING_{k}"), "value": format!("value-of-setting-{k}")}),
        )
        .collect();
    let container = |name: &str| {
        serde_json::json!({
            "name": name, "image": format!("registry.example.com/team/{name}:v1.2.3"),
            "args": ["--listen=:8080", "--log-level=info", "--config=/etc/app/config.yaml"], "env": env,
            "ports": [{"name": "http", "containerPort": PORT}, {"name": "metrics", "containerPort": 9090}],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": PORT}, "periodSeconds": 10},
            "readinessProbe": {"httpGet": {"path": "/ready", "port": PORT}, "periodSeconds": 5},
            "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}, {"name": "data", "mountPath": "/data"}],
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "readOnlyRootFilesystem": true},
        })
    };
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("web-7d9f8c6b5-{i:05}"), "namespace": namespace,
            "labels": {"app": "web", "pod-template-hash": "7d9f8c6b5", "version": "v1", "team": "payments"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9090"},
        },
        "spec": {
            "nodeName": "node7", "serviceAccountName": "web", "automountServiceAccountToken": false,
            "containers": [container("app"), container("shipper")],
            "volumes": [
                {"name": "config", "configMap": {"name": "web-config"}}, {"name": "data", "emptyDir": {}},
                {"name": "token", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}},
            ],
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            ],
        },
    })
}

#[test]
fn a_large_cluster_costs_the_agent_little_memory_and_few_updates() {
    // Every agent caches every pod of the cluster: what it keeps of each decides its memory on
    // a large cluster, meshed namespaces or not. And each update rebuilds the node's state from
    // all of them, so a stream of changes is coalesced into at most one update per 100 ms.
    const PER_NAMESPACE: usize = 600;
    let Some((mut sb, api)) = cluster("kscale") else { return };
    api.kubectl(&["label", "namespace", NAMESPACE, "ferry.dev/mesh=enabled"], None).unwrap();
    api.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: other}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}\n",
    )
    .unwrap();
    start_agent(&mut sb, &api);
    std::thread::sleep(Duration::from_secs(1));
    let pid = sb.agent_pid("node1").unwrap();
    let before = ProcUsage::of(pid);

    // Pods on another node: in a meshed namespace, Running with an address (workloads), and in
    // one that is not.
    for namespace in [NAMESPACE, "other"] {
        let items: Vec<_> = (0..PER_NAMESPACE).map(|i| deployment_pod(namespace, i)).collect();
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
        let (code, _, err) = api.kubectl(&["create", "-f", "-"], Some(&list.to_string())).unwrap();
        assert_eq!(code, 0, "{}", &err[..err.len().min(500)]);
    }
    let (_, created, _) =
        api.kubectl(&["get", "pods", "-n", NAMESPACE, "-l", "app=web", "-o", "json"], None).unwrap();
    let mut created: serde_json::Value = serde_json::from_str(&created).unwrap();
    for (i, pod) in created["items"].as_array_mut().unwrap().iter_mut().enumerate() {
        let ip = format!("10.200.{}.{}", i / 200, i % 200 + 1);
        let patch: serde_json::Value =
            serde_json::from_str(&pod_status(&[ip.parse().unwrap()], true)).unwrap();
        pod["status"] = patch["status"].clone();
    }
    let (code, _, err) =
        api.kubectl(&["replace", "--subresource=status", "-f", "-"], Some(&created.to_string())).unwrap();
    assert_eq!(code, 0, "{}", &err[..err.len().min(500)]);

    let known = || sb.ferry_json("node1", &["status"]).unwrap()["workloads_known"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while known() < PER_NAMESPACE as u64 {
        assert!(Instant::now() < deadline, "{} of {PER_NAMESPACE} workloads known", known());
        std::thread::sleep(Duration::from_millis(200));
    }
    // A rollout's worth of changes: the meshed pods relabelled one by one.
    let updates = || sb.agent_log("node1").matches("the Kubernetes API changed").count();
    let (updates_before, changing) = (updates(), Instant::now());
    let (code, _, err) = api
        .kubectl(&["label", "pods", "-n", NAMESPACE, "-l", "pod-template-hash", "revision=2"], None)
        .unwrap();
    assert_eq!(code, 0, "{}", &err[..err.len().min(500)]);
    std::thread::sleep(Duration::from_millis(500));
    let (updated, changed_for) = (updates() - updates_before, changing.elapsed());
    let most = changed_for.as_millis() as usize / 100 + 2;
    assert!(updated <= most, "{updated} updates in {changed_for:?} of changes, at most {most} expected");
    let workloads = sb.ferry_json("node1", &["workloads"]).unwrap();
    let web = workloads.as_array().unwrap().iter().find(|w| w["name"] == "web-7d9f8c6b5-00201").unwrap();
    assert_eq!(web["service_account"], "web", "{web}");
    assert_eq!(web["ips"][0], "10.200.1.2", "{web}");
    std::thread::sleep(Duration::from_secs(1));
    let after = ProcUsage::of(pid);
    let per_pod = after.rss_kib.saturating_sub(before.rss_kib) / (2 * PER_NAMESPACE) as u64;
    eprintln!(
        "agent RSS {} KiB -> {} KiB: {per_pod} KiB per pod; {updated} updates in {changed_for:?}",
        before.rss_kib, after.rss_kib
    );
    // A whole Pod object cached costs about 100 KiB; what the agent keeps of one, a few.
    assert!(per_pod < 16, "{per_pod} KiB per pod of the cluster");
}

#[test]
fn the_deploy_manifest_validates_and_the_agent_needs_no_more_than_its_rbac() {
    let Some((mut sb, api)) = cluster("kubedeploy") else { return };
    for (name, generated) in kube::manifests().unwrap() {
        let written = std::fs::read_to_string(kube::deploy_dir().join(name)).unwrap_or_default();
        assert!(written == generated, "deploy/{name} is stale: run `cargo xtask manifests`");
    }
    let manifest = std::fs::read_to_string(kube::deploy_dir().join("ferry.yaml")).unwrap();
    // A server-side dry run validates every object (namespaced ones need their namespace).
    api.kubectl(&["create", "namespace", "ferry-system"], None).unwrap();
    let (code, _, err) = api.kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&manifest)).unwrap();
    assert_eq!(code, 0, "{err}");
    install_crd(&api, &manifest, "authorizationpolicies.ferry.dev");

    // The agent runs with nothing but its ServiceAccount's token.
    let (code, token, err) =
        api.kubectl(&["create", "token", "ferry-agent", "-n", "ferry-system"], None).unwrap();
    assert_eq!(code, 0, "{err}");
    let kubeconfig = api.kubeconfig_with_token("agent", token.trim()).unwrap();
    let _pause = pause(&sb, "a");
    let _server = sb.pod("b").serve(PORT).unwrap();
    api.kubectl(&["label", "namespace", NAMESPACE, "ferry.dev/mesh=enabled"], None).unwrap();
    start_agent_as(&mut sb, &kubeconfig);
    assert_eq!(captured(&sb), 2);
    wait_for_mark(&api, "b", "true");
    let deny = format!(
        "apiVersion: ferry.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-all, namespace: {NAMESPACE}}}\n\
         spec: {{action: DENY, rules: [{{}}]}}\n"
    );
    api.apply(&deny).unwrap();
    wait_until_a_reaches_b(&sb, false, "policy enforced");
    let log = sb.agent_log("node1");
    assert!(!log.contains("forbidden") && !log.contains("Forbidden"), "{log}");
}

/// Polls `kubectl get <args> -o jsonpath=<path>` as the admin until it prints something.
fn wait_for_field(api: &ApiServer, args: &[&str], path: &str, what: &str) -> String {
    let jsonpath = format!("jsonpath={path}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, out, err) = api.kubectl(&[&["get"], args, &["-o", &jsonpath]].concat(), None).unwrap();
        if code == 0 && !out.trim().is_empty() {
            return out;
        }
        assert!(Instant::now() < deadline, "{what}: {err}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A PKCS#10 request (made by openssl, not by Ferry) for `identity`, as a CSR object's YAML.
fn csr_yaml(dir: &Path, name: &str, identity: &str) -> String {
    let key = dir.join(format!("{name}.key"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/O=t",
        ])
        .args(["-addext", &format!("subjectAltName=URI:{identity}"), "-keyout"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    use base64::Engine as _;
    let request = base64::engine::general_purpose::STANDARD.encode(&out.stdout);
    format!(
        "apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\nmetadata: {{name: {name}}}\n\
         spec:\n  signerName: ferry.dev/workload\n  request: {request}\n  \
         usages: [digital signature, key encipherment, server auth, client auth]\n"
    )
}

/// Deploys Ferry's manifests and plays the kubelet for node1's agent pod; returns the kubeconfig
/// of a token bound to that pod, as the DaemonSet's projected token is.
fn deploy_ferry(api: &ApiServer) -> PathBuf {
    api.apply(&std::fs::read_to_string(kube::deploy_dir().join("ferry.yaml")).unwrap()).unwrap();
    api.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: ferry-agent-node1, namespace: ferry-system}\n\
         spec:\n  nodeName: node1\n  serviceAccountName: ferry-agent\n  automountServiceAccountToken: false\n  \
         containers: [{name: agent, image: localhost/ferry:dev}]\n",
    )
    .unwrap();
    let uid = wait_for_field(
        api,
        &["pod", "ferry-agent-node1", "-n", "ferry-system"],
        "{.metadata.uid}",
        "agent pod",
    );
    let token = service_account_token(
        api,
        &[
            "ferry-agent",
            "--bound-object-kind=Pod",
            "--bound-object-name=ferry-agent-node1",
            &format!("--bound-object-uid={uid}"),
        ],
    );
    api.kubeconfig_with_token("agent", &token).unwrap()
}

/// `kubectl create token -n ferry-system <args>`.
fn service_account_token(api: &ApiServer, args: &[&str]) -> String {
    let (code, token, err) =
        api.kubectl(&[&["create", "token", "-n", "ferry-system"], args].concat(), None).unwrap();
    assert_eq!(code, 0, "{err}");
    token.trim().to_owned()
}

/// `ferry signer`, run with nothing but its own ServiceAccount's token.
struct Signer {
    _process: Process,
    out: PathBuf,
    err: PathBuf,
    metrics_port: u16,
}

impl Signer {
    fn start(sb: &Sandbox, api: &ApiServer) -> Signer {
        Signer::start_replica(sb, api, "signer", 15014, &[])
    }

    /// A signer named `name` (its log files), serving metrics on node1's `metrics_port`.
    fn start_replica(sb: &Sandbox, api: &ApiServer, name: &str, metrics_port: u16, args: &[&str]) -> Signer {
        let kubeconfig =
            api.kubeconfig_with_token(name, &service_account_token(api, &["ferry-signer"])).unwrap();
        let (out, err) = (sb.dir.join(format!("{name}.log")), sb.dir.join(format!("{name}.err")));
        let mut signer = Command::new(ferry_sandbox::ferry_bin().unwrap());
        signer
            .args(["signer", "--metrics-addr", &format!("0.0.0.0:{metrics_port}")])
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        let process = Process::new(sb.node("node1").netns.spawn(signer, None).unwrap());
        Signer { _process: process, out, err, metrics_port }
    }

    /// One of the signer's metrics (0 if it has no such series yet).
    fn metric(&self, sb: &Sandbox, series: &str) -> f64 {
        let (status, text) = sb.node("node1").http_get(self.metrics_port, "/metrics").unwrap();
        assert_eq!(status, 200, "{text}");
        ferry_sandbox::metric_value(&text, series).unwrap_or(0.0)
    }

    fn wait_ready(&self, sb: &Sandbox) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while sb.node("node1").http_get(self.metrics_port, "/healthz/ready").map(|r| r.0).ok() != Some(200) {
            assert!(Instant::now() < deadline, "signer not ready:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
            + &std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Waits up to 10 s until node1's agent lists `n` certificates issued.
    fn wait_for_certificates(&self, sb: &Sandbox, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while certificate_states(sb) != vec!["issued"; n] {
            let (agent, signer) = (sb.agent_log("node1"), self.log());
            assert!(Instant::now() < deadline, "no certificates\n{agent}\nsigner:\n{signer}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The Deployment runs two signers: each request is answered once, by the replica whose write
/// lands first, and the other counts no error; either alone goes on signing.
#[test]
fn two_signer_replicas_answer_each_request_once_and_either_signs_alone() {
    let Some((sb, api)) = cluster("kubesigners") else { return };
    api.kubectl(&["create", "namespace", "ferry-system"], None).unwrap();
    let agent_kubeconfig = deploy_ferry(&api);
    let first = Signer::start_replica(&sb, &api, "signer-1", 15014, &[]);
    let second = Signer::start_replica(&sb, &api, "signer-2", 15015, &[]);
    first.wait_ready(&sb);
    second.wait_ready(&sb);
    let create = |names: &[String], signers: &[&Signer]| {
        let requests: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let sa = ["sa-a", "sa-b", "sa-c"][i % 3];
                csr_yaml(&sb.dir, name, &format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{sa}"))
            })
            .collect();
        let (code, _, err) =
            api.kubectl_as(&agent_kubeconfig, &["create", "-f", "-"], Some(&requests.join("---\n"))).unwrap();
        assert_eq!(code, 0, "{err}");
        for name in names {
            let logs: Vec<String> = signers.iter().map(|s| s.log()).collect();
            let what = format!("{name} signed\n{}", logs.join("\n"));
            wait_for_field(&api, &["csr", name], "{.status.certificate}", &what);
            let (_, conditions, _) = api
                .kubectl(&["get", "csr", name, "-o", "jsonpath={.status.conditions[*].type}"], None)
                .unwrap();
            assert_eq!(conditions, "Approved", "{name}");
        }
    };
    let signed = |signer: &Signer| signer.metric(&sb, "ferry_signer_certificates_signed_total");
    let errors = |signer: &Signer| signer.metric(&sb, "ferry_signer_request_errors_total");

    let names: Vec<String> = (0..12).map(|i| format!("together-{i}")).collect();
    create(&names, &[&first, &second]);
    let logs = format!("{}\n{}", first.log(), second.log());
    assert_eq!(signed(&first) + signed(&second), 12.0, "each request signed once\n{logs}");
    assert_eq!((errors(&first), errors(&second)), (0.0, 0.0), "{logs}");

    drop(first);
    let before = signed(&second);
    create(&["alone".to_owned()], &[&second]);
    assert_eq!(signed(&second), before + 1.0);
}

/// Requests made while the signer was down, which their agents stopped waiting for, are deleted
/// when it is back, not signed for nobody; fresh ones are signed.
#[test]
fn requests_abandoned_during_a_signer_outage_are_deleted_not_signed() {
    let Some((sb, api)) = cluster("kubeabandon") else { return };
    api.kubectl(&["create", "namespace", "ferry-system"], None).unwrap();
    let agent_kubeconfig = deploy_ferry(&api);
    let request = |name: &str| {
        let yaml = csr_yaml(&sb.dir, name, &format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/sa-a"));
        let (code, _, err) = api.kubectl_as(&agent_kubeconfig, &["create", "-f", "-"], Some(&yaml)).unwrap();
        assert_eq!(code, 0, "{err}");
    };
    request("left-over");
    std::thread::sleep(Duration::from_secs(3));
    let signer = Signer::start_replica(&sb, &api, "signer", 15014, &["--abandoned-after", "2s"]);
    signer.wait_ready(&sb);
    request("fresh");
    wait_for_field(
        &api,
        &["csr", "fresh"],
        "{.status.certificate}",
        &format!("fresh signed\n{}", signer.log()),
    );
    let (code, _, err) = api.kubectl(&["get", "csr", "left-over"], None).unwrap();
    assert_ne!(code, 0, "the abandoned request is still there\n{}", signer.log());
    assert!(err.contains("NotFound") || err.contains("not found"), "{err}");
    assert_eq!(signer.metric(&sb, "ferry_signer_requests_abandoned_total"), 1.0);
    assert_eq!(signer.metric(&sb, "ferry_signer_certificates_signed_total"), 1.0);
}

/// The state of each certificate node1's agent lists (issued, expired, pending).
fn certificate_states(sb: &Sandbox) -> Vec<String> {
    let certs = sb.ferry_json("node1", &["certs"]).unwrap();
    certs.as_array().unwrap().iter().map(|c| c["state"].as_str().unwrap().to_owned()).collect()
}

/// Starts node1's agent in Kubernetes mode with certificates by CSR: its `caDir` holds the
/// signer's root certificate and no key, as the DaemonSet mounts it.
fn start_agent_by_csr(sb: &mut Sandbox, kubeconfig: &Path, ca_dir: &Path) {
    let config = csr_agent_config(sb, kubeconfig, ca_dir);
    sb.start_agent_with("node1", Some(&config), &["--kube"]).unwrap();
}

/// node1's agent config (and environment) for certificates by CSR, with the root in `ca_dir`.
fn csr_agent_config(sb: &mut Sandbox, kubeconfig: &Path, ca_dir: &Path) -> String {
    sb.set_agent_env("node1", "KUBECONFIG", &kubeconfig.display().to_string());
    let cgroups = Path::new(CGROUP2_ROOT).join(&sb.id);
    sb.config_for("node1").replace(
        &format!("caDir: {}", sb.ca_dir().display()),
        &format!("caDir: {}\npodCgroupRoot: {}", ca_dir.display(), cgroups.display()),
    )
}

#[test]
fn the_signer_certifies_local_workloads_and_refuses_the_rest() {
    let Some((mut sb, api)) = cluster("kubecsr") else { return };
    api.kubectl(&["create", "namespace", "ferry-system"], None).unwrap();
    let agent_kubeconfig = deploy_ferry(&api);
    let signer = Signer::start(&sb, &api);
    let signer_log = || signer.log();
    // The agent's caDir: the root certificate the signer published, no key.
    let root = wait_for_field(
        &api,
        &["configmap", "ferry-ca-root", "-n", "ferry-system"],
        "{.data.root-cert\\.pem}",
        "root certificate published",
    );
    let ca_dir = sb.dir.join("cluster-ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    std::fs::write(ca_dir.join("root-cert.pem"), &root).unwrap();
    let (_, key, _) = api
        .kubectl(&["get", "secret", "ferry-ca", "-n", "ferry-system", "-o", "jsonpath={.data}"], None)
        .unwrap();
    assert!(key.contains("root-key.pem"), "the signer's Secret holds the key");

    let _pause = pause(&sb, "a");
    let _server = sb.pod("b").serve(PORT).unwrap();
    let _pause_b = pause(&sb, "b");
    api.kubectl(&["label", "namespace", NAMESPACE, "ferry.dev/mesh=enabled"], None).unwrap();
    start_agent_by_csr(&mut sb, &agent_kubeconfig, &ca_dir);
    wait_captured(&sb, 2, "in a meshed namespace");
    signer.wait_for_certificates(&sb, 2);
    assert!(echoed(&sb, "a", "b"));
    sb.wait_for_log("node1", "CertificateSigningRequests to ferry.dev/workload", 1).unwrap();

    // The agent's certificates chain to the published root and name the pods' identities.
    let certs = sb.ferry_json("node1", &["certs"]).unwrap();
    let identities: Vec<&str> =
        certs.as_array().unwrap().iter().map(|c| c["identity"].as_str().unwrap()).collect();
    for sa in ["sa-a", "sa-b"] {
        assert!(
            identities.contains(&format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{sa}").as_str()),
            "{certs}"
        );
    }
    let (_, names, _) =
        api.kubectl(&["get", "csr", "-o", "jsonpath={.items[*].metadata.name}"], None).unwrap();
    let mut signed = 0;
    for name in names.split_whitespace() {
        let pem = wait_for_field(&api, &["csr", name], "{.status.certificate}", "certificate");
        use base64::Engine as _;
        let pem = base64::engine::general_purpose::STANDARD.decode(pem.trim()).unwrap();
        std::fs::write(sb.dir.join("leaf.pem"), pem).unwrap();
        let verify = Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(ca_dir.join("root-cert.pem"))
            .arg(sb.dir.join("leaf.pem"))
            .output()
            .unwrap();
        assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
        let (_, reason, _) = api
            .kubectl(&["get", "csr", name, "-o", "jsonpath={.status.conditions[0].reason}"], None)
            .unwrap();
        assert_eq!(reason, "FerrySignerApproved");
        signed += 1;
    }
    assert!(signed >= 2, "{names}");
    assert!(sb.metric("node1", "ferry_certificate_requests_total{result=\"issued\"}").unwrap() >= 2.0);

    // Refused, with the reason on the request: an identity with no pod on the agent's node, and
    // any request not from an agent.
    for (name, identity, kubeconfig, reason) in [
        (
            "nobody",
            format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/nobody"),
            &agent_kubeconfig,
            "NoSuchWorkloadOnNode",
        ),
        ("impostor", format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/sa-a"), &api.kubeconfig, "NotAnAgent"),
    ] {
        let (code, _, err) = api
            .kubectl_as(kubeconfig, &["create", "-f", "-"], Some(&csr_yaml(&sb.dir, name, &identity)))
            .unwrap();
        assert_eq!(code, 0, "{err}");
        let denied = wait_for_field(
            &api,
            &["csr", name],
            "{.status.conditions[?(@.type==\"Denied\")].reason}",
            &format!("{name} refused\n{}", signer_log()),
        );
        assert_eq!(denied, reason);
        let (_, cert, _) =
            api.kubectl(&["get", "csr", name, "-o", "jsonpath={.status.certificate}"], None).unwrap();
        assert!(cert.is_empty(), "{name} got a certificate");
    }
    // The signer counts what it did, refusals by reason (an alert on NoSuchWorkloadOnNode
    // catches a node asking for identities it does not run).
    let signer_metric = |series: &str| signer.metric(&sb, series);
    assert_eq!(signer_metric("ferry_signer_certificates_signed_total"), signed as f64);
    for reason in ["NoSuchWorkloadOnNode", "NotAnAgent"] {
        assert_eq!(
            signer_metric(&format!("ferry_signer_requests_refused_total{{reason=\"{reason}\"}}")),
            1.0
        );
    }
    assert_eq!(sb.node("node1").http_get(15014, "/healthz/ready").unwrap(), (200, "ready\n".into()));

    // A new root, rolled out by editing the Secret: the signer publishes it beside the old one
    // and signs with it; the agent, its caDir refreshed as the kubelet refreshes a mounted
    // ConfigMap, trusts both and renews its certificates under the new root.
    let root_of = || sb.ferry_json("node1", &["certs"]).unwrap()[0]["root"].as_str().unwrap().to_owned();
    let old_root_name = root_of();
    let new_ca = sb.other_ca("new-root").unwrap();
    let encoded = |path: PathBuf| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
    };
    let patch = serde_json::json!({"data": {
        "root-cert.pem": encoded(new_ca.join("root-cert.pem")),
        "root-key.pem": encoded(new_ca.join("root-key.pem")),
        "trust-bundle.pem": encoded(ca_dir.join("root-cert.pem")),
    }});
    let patch = patch.to_string();
    let (code, _, err) =
        api.kubectl(&["patch", "secret", "ferry-ca", "-n", "ferry-system", "-p", &patch], None).unwrap();
    assert_eq!(code, 0, "{err}");
    let bundle = wait_for_field(
        &api,
        &["configmap", "ferry-ca-root", "-n", "ferry-system"],
        "{.data.trust-bundle\\.pem}",
        &format!("the new root published\n{}", signer_log()),
    );
    let (_, published, _) = api
        .kubectl(
            &[
                "get",
                "configmap",
                "ferry-ca-root",
                "-n",
                "ferry-system",
                "-o",
                "jsonpath={.data.root-cert\\.pem}",
            ],
            None,
        )
        .unwrap();
    let new_root = std::fs::read_to_string(new_ca.join("root-cert.pem")).unwrap();
    assert_eq!(published.replace("\r\n", "\n").trim(), new_root.trim());
    std::fs::write(ca_dir.join("trust-bundle.pem"), bundle).unwrap();
    std::fs::write(ca_dir.join("root-cert.pem"), published).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while root_of() == old_root_name {
        assert!(
            Instant::now() < deadline,
            "certificates not renewed under the new root\n{}",
            sb.agent_log("node1")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(sb.metric("node1", "ferry_trusted_roots").unwrap(), 2.0);
    assert!(echoed(&sb, "a", "b"));
}

/// node1's agent with certificates by CSR (no signer runs yet) meshing pods a and b in a
/// labelled namespace; pod c plays a pod on node2, whose agent the Python HBONE peer plays on
/// c's 15008 with c's certificate. The signer's root is the sandbox's, so that the peer can hold
/// a certificate from it.
struct CsrNode {
    sb: Sandbox,
    api: ApiServer,
    /// The sandbox's file CA: the signer's root, with its key.
    root: PathBuf,
    c_cert: CertFiles,
    _node2: PeerServer,
    _pause_a: Process,
    _server_b: Server,
}

impl CsrNode {
    fn start(label: &str) -> Option<CsrNode> {
        let (mut sb, api) = cluster(label)?;
        bind_to_node2(&sb, &api, "c");
        let root = sb.ca_dir_created().unwrap();
        api.kubectl(&["create", "namespace", "ferry-system"], None).unwrap();
        let from_file = |name: &str| format!("--from-file={}", root.join(name).display());
        let secret = ["create", "secret", "generic", "ferry-ca", "-n", "ferry-system"];
        let (code, _, err) = api
            .kubectl(
                &[&secret[..], &[&from_file("root-cert.pem"), &from_file("root-key.pem")]].concat(),
                None,
            )
            .unwrap();
        assert_eq!(code, 0, "{err}");
        let agent_kubeconfig = deploy_ferry(&api);
        let ca_dir = sb.dir.join("cluster-ca");
        std::fs::create_dir_all(&ca_dir).unwrap();
        std::fs::copy(root.join("root-cert.pem"), ca_dir.join("root-cert.pem")).unwrap();
        let c_cert = sb.issue_cert(&root, &identity("sa-c"), "c").unwrap();
        let node2 = hbone_server(&sb.pod("c").netns, hbone_addr(&sb, "c"), &c_cert, &root, &[]).unwrap();
        api.kubectl(&["annotate", "pod", "c", "-n", NAMESPACE, "ferry.dev/captured=true"], None).unwrap();
        let (pause_a, server_b) = (pause(&sb, "a"), sb.pod("b").serve(PORT).unwrap());
        api.kubectl(&["label", "namespace", NAMESPACE, "ferry.dev/mesh=enabled"], None).unwrap();
        // No signer runs yet.
        let config = csr_agent_config(&mut sb, &agent_kubeconfig, &ca_dir);
        sb.start_agent_not_ready("node1", &config, &["--kube"], "certificate(s) not issued yet").unwrap();
        Some(CsrNode { sb, api, root, c_cert, _node2: node2, _pause_a: pause_a, _server_b: server_b })
    }
}

fn identity(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{sa}")
}

fn hbone_addr(sb: &Sandbox, pod: &str) -> SocketAddr {
    SocketAddr::from((sb.pod(pod).ip, 15008))
}

/// A pod is captured as soon as it runs in a meshed namespace, before its certificate arrives by
/// CSR: nothing reaches it or leaves it around the mesh meanwhile. What needs no certificate
/// works at once; tunnels, in and out, wait for it.
#[test]
fn a_pod_is_captured_before_its_certificate_arrives_and_its_tunnels_wait_for_it() {
    let Some(node) = CsrNode::start("kubecertwait") else { return };
    let CsrNode { sb, api, root, c_cert, .. } = &node;

    // No signer runs yet, so no certificate: captured all the same, and a -> b goes through
    // the agent (policy applies), not around it.
    wait_captured(sb, 2, "before any certificate");
    assert_eq!(certificate_states(sb), ["pending", "pending"]);
    let status = sb.ferry_json("node1", &["status"]).unwrap();
    assert_eq!(status["certificates_pending"], 2, "{status}");
    assert_eq!(sb.metric("node1", "ferry_certificates_pending").unwrap(), 2.0);
    let readiness = sb.node("node1").http_get(15021, "/healthz/ready").unwrap();
    assert_eq!(readiness, (503, "not ready: 2 local workload certificate(s) not issued yet\n".into()));
    let outcome = sb.pod("a").connect(SocketAddr::from((sb.pod("b").ip, PORT)), 10).unwrap();
    assert!(matches!(outcome, ConnectOutcome::Echoed { .. }), "{outcome:?}\n{}", sb.agent_log("node1"));
    assert_eq!(same_node_connections(sb), 1.0);

    // Tunnels wait for the certificates: a -> c (node2) needs a's, node2 -> b needs b's.
    let b_app = format!("CONNECT,{}:{PORT},hello b", sb.pod("b").ip);
    std::thread::scope(|scope| {
        let outbound =
            scope.spawn(|| sb.pod("a").connect(SocketAddr::from((sb.pod("c").ip, PORT)), 10).unwrap());
        let inbound = scope.spawn(|| {
            let from = &sb.node("node1").netns;
            hbone_client(from, hbone_addr(sb, "b"), Some(c_cert), root, &[b_app.as_str()]).unwrap()
        });
        std::thread::sleep(Duration::from_secs(1));
        assert!(!outbound.is_finished() && !inbound.is_finished(), "{}", sb.agent_log("node1"));
        let signer = Signer::start(sb, api);
        let outbound = outbound.join().unwrap();
        assert!(
            matches!(outbound, ConnectOutcome::Echoed { .. }),
            "{outbound:?}\n{}\n{}",
            sb.agent_log("node1"),
            signer.log()
        );
        let inbound = inbound.join().unwrap();
        assert_eq!(inbound[0]["server_identity"], identity("sa-b"), "{inbound:?}");
        assert_eq!(
            (&inbound[1]["status"], &inbound[1]["echo"]),
            (&200.into(), &"hello b".into()),
            "{inbound:?}"
        );
    });
    assert_eq!(sb.ferry_json("node1", &["status"]).unwrap()["certificates_pending"], 0);
    assert_eq!(sb.node("node1").http_get(15021, "/healthz/ready").unwrap(), (200, "ready\n".into()));
    // Waited for, not failed.
    let metrics = sb.metrics("node1").unwrap();
    assert!(metrics.contains("ferry_proxy_connections_opened_total{"), "{metrics}");
    assert!(!metrics.contains("ferry_proxy_connection_failures_total{"), "{metrics}");
}

/// A new agent taking over is handed the running agent's certificates with their keys (which
/// exist only in its memory): an upgrade needs no signer, and no connection waits through it.
#[test]
fn an_upgrade_hands_the_certificates_over_and_needs_no_signer() {
    let Some(mut node) = CsrNode::start("kubeupcert") else { return };
    let CsrNode { sb, api, .. } = &mut node;
    let signer = Signer::start(sb, api);
    let serials = |sb: &Sandbox| {
        let certs = sb.ferry_json("node1", &["certs"]).unwrap();
        let mut serials: Vec<String> =
            certs.as_array().unwrap().iter().map(|c| c["serial"].as_str().unwrap().to_owned()).collect();
        serials.sort();
        serials
    };
    signer.wait_for_certificates(sb, 2);
    let before = serials(sb);
    let to_c = SocketAddr::from((sb.pod("c").ip, PORT));
    assert!(echoed(sb, "a", "c"));

    // The signer gone; new connections to c, back to back, through the upgrade.
    drop(signer);
    let load = sb.pod("a").spawn_app(&["cps", &to_c.to_string(), "3"]).unwrap();
    sb.upgrade_agent_with("node1", &["--kube"]).unwrap();
    let line = load.finish().unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert!(
        matches!(fields.as_slice(), ["cps", rate, "0"] if rate.parse::<f64>().unwrap() > 10.0),
        "{line}\n{}",
        sb.agent_log("node1")
    );
    sb.wait_for_log("node1", "took over the previous agent's workload certificates taken=2 offered=2", 1)
        .unwrap();
    assert_eq!(serials(sb), before, "the same certificates");
    assert_eq!(sb.ferry_json("node1", &["status"]).unwrap()["certificates_pending"], 0);
    assert!(!sb.agent_log("node1").contains("taking over without"), "{}", sb.agent_log("node1"));
    // The new agent tunnels with them, the signer still gone.
    assert!(echoed(sb, "a", "c"), "{}", sb.agent_log("node1"));
}
