//! Service egress end to end: a real kube-apiserver, the node agent under
//! exactly deploy/rbac.yaml, real packets. The lab's gateway namespace is
//! the node, int1 and int2 are its pods, ext1 is outside the cluster.
//! No kube-controller-manager runs, so the tests write the Nodes, Services,
//! EndpointSlices and Pods themselves.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use natgw_lab::traffic::{UdpFlow, tcp_connect, tcp_server, tcp_source};
use natgw_lab::{EXT1_IP, INT1_IP, INT2_IP, Lab};
use natgw_node_agent::{Config, cidrs, health};
use natgw_testenv::{TestEnv, apply_yaml, eventually};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const NODE_IP: &str = "198.51.100.2";
const VIP: &str = "198.51.100.200";
/// A pod on another node, reached through ext1.
const REMOTE_POD: &str = "10.78.0.5";

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn sh(ns: &str, args: &[&str]) {
    let out = Command::new("ip").args(["netns", "exec", ns]).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The node: its own address and the VIP on ext0, forwarding on, and a
/// CNI-style masquerade for pod traffic leaving the cluster.
fn node(lab: &Lab) {
    let gw = lab.ns("gw");
    sh(&gw, &["ip", "addr", "add", &format!("{NODE_IP}/24"), "dev", "ext0"]);
    sh(&gw, &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "ext0"]);
    sh(&gw, &["ip", "route", "add", "10.78.0.0/24", "via", EXT1_IP]);
    sh(&gw, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    sh(
        &gw,
        &[
            "nft",
            "add table ip cni; add chain ip cni post { type nat hook postrouting priority srcnat; }; add rule ip cni post oifname ext0 ip daddr != 10.0.0.0/8 masquerade",
        ],
    );
    let ext1 = lab.ns("ext1");
    sh(&ext1, &["ip", "addr", "add", &format!("{REMOTE_POD}/32"), "dev", "eth0"]);
    sh(&ext1, &["ip", "route", "add", "10.77.0.0/24", "via", NODE_IP]);
}

fn egress_table(lab: &Lab) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.ns("gw"), "nft", "list", "table", "ip", natgw_node_agent::TABLE])
        .output()
        .unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

struct Agent {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), natgw_node_agent::Error>>,
    health: SocketAddr,
}

impl Agent {
    async fn start(client: Client, lab: &Lab, tweak: impl FnOnce(&mut Config)) -> Agent {
        let mut cfg = Config {
            node: "node-a".into(),
            netns: Some(lab.ns("gw")),
            overrides: cidrs::Overrides::default(),
            keep_on_exit: false,
            daemonset: None,
            fail_closed: false,
            vip_check: true,
            resync: natgw_node_agent::RESYNC,
        };
        tweak(&mut cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let health = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(natgw_node_agent::run(client, cfg, Some(listener), async move {
            let _ = rx.await;
        }));
        Agent { stop: Some(tx), task, health }
    }

    /// SIGTERM: a graceful stop.
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let task = &mut self.task;
        tokio::time::timeout(Duration::from_secs(20), task).await.expect("agent stops").unwrap().unwrap();
    }

    /// kill -9: the task ends where it is, without any cleanup.
    async fn kill(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    /// The value of the series whose line starts with `series` (its name
    /// and labels, then a space); 0 when absent.
    async fn metric(&self, series: &str) -> f64 {
        let (_, metrics) = self.get("/metrics").await;
        let line = metrics.lines().find(|l| l.starts_with(series)).map(str::to_string);
        line.and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).unwrap_or(0.0)
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let (addr, path) = (self.health, path.to_string());
        tokio::task::spawn_blocking(move || health::get(addr, &path)).await.unwrap().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The source ext1 sees for a connection from a pod, or None if it fails.
async fn source(lab: &Lab, pod: &str, dst: &str, port: u16) -> Option<Ipv4Addr> {
    let (ns, dst) = (lab.ns(pod), ip(dst));
    tokio::task::spawn_blocking(move || tcp_source(&ns, dst, port).ok()).await.unwrap()
}

async fn setup(
    prefix: &str,
    pod_cidr: Option<&str>,
) -> (Lab, TestEnv, Client, Client, Vec<natgw_lab::traffic::Server>) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let lab = Lab::up(prefix).unwrap();
    node(&lab);
    let servers = vec![
        tcp_server(&lab.ns("ext1"), ip(EXT1_IP), 8080).unwrap(),
        tcp_server(&lab.ns("ext1"), ip(EXT1_IP), 8443).unwrap(),
        tcp_server(&lab.ns("ext1"), ip(REMOTE_POD), 8080).unwrap(),
    ];
    let env = TestEnv::start().await.expect("control plane");
    let admin = env.install_natgw(&natgw_api::crds()).await.unwrap();
    let node_a = match pod_cidr {
        Some(c) => format!("spec:\n  podCIDRs: [\"{c}\"]"),
        None => "spec: {}".to_string(),
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {{name: node-a}}\n{node_a}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {{name: node-b}}\nspec:\n  podCIDRs: [\"10.78.0.0/24\"]\n"
    );
    apply_yaml(&admin, &yaml).await.unwrap();
    let agent = env.natgw_client("natgw-node-agent").await.unwrap();
    (lab, env, admin, agent, servers)
}

/// An annotated LoadBalancer Service `web` with the VIP in its status.
async fn web_service(admin: &Client, annotations: &[(&str, &str)]) {
    let mut ann = serde_json::Map::new();
    ann.insert("natgw.io/egress".into(), "true".into());
    for (k, v) in annotations {
        ann.insert(k.to_string(), (*v).into());
    }
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "shop", "annotations": ann},
        "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "selector": {"app": "web"},
                 "ports": [{"port": 80, "protocol": "TCP"}]},
    }))
    .unwrap();
    let api: Api<Service> = Api::namespaced(admin.clone(), "shop");
    api.create(&Default::default(), &svc).await.unwrap();
    let status = serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": VIP}]}}});
    api.patch_status("web", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
}

/// The EndpointSlice of `web`: (address, node) pairs, all ready, each a
/// Pod of `shop` with that address on that node, as the cluster's own
/// controllers would write them (no kubelet runs here).
async fn endpoints(admin: &Client, eps: &[(&str, &str)]) {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "shop");
    for (a, n) in eps {
        let name = format!("web-{n}-{a}");
        let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"nodeName": n, "containers": [{"name": "c", "image": "web:1"}]}});
        pods.patch(&name, &PatchParams::apply("test").force(), &Patch::Apply(&pod)).await.unwrap();
        let status = serde_json::json!({"status": {"podIP": a, "podIPs": [{"ip": a}]}});
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    }
    let list: Vec<serde_json::Value> = eps
        .iter()
        .map(|(a, n)| {
            serde_json::json!({"addresses": [a], "nodeName": n, "conditions": {"ready": true},
                               "targetRef": {"kind": "Pod", "namespace": "shop", "name": format!("web-{n}-{a}")}})
        })
        .collect();
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": list,
        "ports": [{"port": 80, "protocol": "TCP"}],
    }))
    .unwrap();
    let api: Api<EndpointSlice> = Api::namespaced(admin.clone(), "shop");
    api.patch("web-1", &PatchParams::apply("test").force(), &Patch::Apply(&slice)).await.unwrap();
}

/// A pod of `web` on node-a with int2's address, not (yet) an endpoint.
async fn selected_pod(admin: &Client) {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "web:1"}]},
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "shop");
    pods.create(&Default::default(), &pod).await.unwrap();
    let status = serde_json::json!({"status": {"podIP": INT2_IP, "podIPs": [{"ip": INT2_IP}]}});
    pods.patch_status("web-0", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
}

async fn annotate(admin: &Client, key: &str, value: Option<&str>) {
    let api: Api<Service> = Api::namespaced(admin.clone(), "shop");
    let patch = serde_json::json!({"metadata": {"annotations": {key: value}}});
    api.patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
}

#[tokio::test]
async fn an_egress_service_leaves_with_its_vip_other_pods_with_the_node_ip() {
    let (lab, _env, admin, client, _servers) = setup("neg1", Some("10.77.0.0/24")).await;
    web_service(&admin, &[]).await;
    endpoints(&admin, &[(INT1_IP, "node-a")]).await;
    let agent = Agent::start(client, &lab, |_| {}).await;
    eventually("int1 leaves with the VIP", || async { source(&lab, "int1", EXT1_IP, 8080).await == Some(ip(VIP)) })
        .await;
    assert_eq!(source(&lab, "int2", EXT1_IP, 8080).await, Some(ip(NODE_IP)), "other pods: the node IP");
    // Pod and service CIDRs are never translated.
    assert_eq!(source(&lab, "int1", REMOTE_POD, 8080).await, Some(ip(INT1_IP)), "a pod on another node");
    let table = egress_table(&lab).unwrap();
    assert!(
        table.contains("10.0.0.0/16") && table.contains("10.77.0.0/24") && table.contains("10.78.0.0/24"),
        "{table}"
    );
    // Readiness and the gauges follow the sync that wrote the kernel
    // (after its sweep): the packet can be through before they are set.
    eventually("ready", || async { agent.get("/readyz").await.0 == 200 }).await;
    eventually("one pod translated", || async {
        agent.get("/metrics").await.1.contains("natgw_egress_pods{state=\"translated\"} 1")
    })
    .await;

    // Destination ports.
    annotate(&admin, "natgw.io/egress-ports", Some("tcp:8443")).await;
    eventually("only tcp:8443 translated", || async {
        source(&lab, "int1", EXT1_IP, 8080).await == Some(ip(NODE_IP))
            && source(&lab, "int1", EXT1_IP, 8443).await == Some(ip(VIP))
    })
    .await;
    annotate(&admin, "natgw.io/egress-ports", None).await;
    // Denied and allowed networks.
    annotate(&admin, "natgw.io/egress-denied-networks", Some("198.51.100.1/32")).await;
    eventually("a denied network is not translated", || async {
        source(&lab, "int1", EXT1_IP, 8080).await == Some(ip(NODE_IP))
    })
    .await;
    annotate(&admin, "natgw.io/egress-denied-networks", None).await;
    annotate(&admin, "natgw.io/egress-allowed-networks", Some("203.0.113.0/24")).await;
    eventually("outside the allowed networks, no translation", || async {
        source(&lab, "int1", EXT1_IP, 8080).await == Some(ip(NODE_IP))
    })
    .await;
    annotate(&admin, "natgw.io/egress-allowed-networks", Some("198.51.100.0/24")).await;
    eventually("inside them, the VIP", || async { source(&lab, "int1", EXT1_IP, 8080).await == Some(ip(VIP)) }).await;

    // A bad annotation: a Warning naming it, and the Service is left out.
    annotate(&admin, "natgw.io/egress-ports", Some("tcp:http")).await;
    let events: Api<Event> = Api::namespaced(admin.clone(), "shop");
    eventually("an InvalidEgress Event naming the annotation", || async {
        events.list(&Default::default()).await.unwrap().items.iter().any(|e| {
            e.reason.as_deref() == Some("InvalidEgress")
                && e.note.as_deref().is_some_and(|n| n.contains("annotation natgw.io/egress-ports"))
        })
    })
    .await;
    eventually("nothing left for the invalid Service", || async { egress_table(&lab).is_none() }).await;
    agent.stop().await;
}

#[tokio::test]
async fn the_rules_follow_endpoints_across_pods_and_nodes() {
    let (lab, _env, admin, client, _servers) = setup("neg2", Some("10.77.0.0/24")).await;
    web_service(&admin, &[]).await;
    endpoints(&admin, &[(INT1_IP, "node-a")]).await;
    let agent = Agent::start(client, &lab, |_| {}).await;
    eventually("int1 with the VIP", || async { source(&lab, "int1", EXT1_IP, 8080).await == Some(ip(VIP)) }).await;
    endpoints(&admin, &[(INT2_IP, "node-a")]).await;
    eventually("the endpoint moved to int2", || async {
        source(&lab, "int2", EXT1_IP, 8080).await == Some(ip(VIP))
            && source(&lab, "int1", EXT1_IP, 8080).await == Some(ip(NODE_IP))
    })
    .await;
    endpoints(&admin, &[(INT2_IP, "node-b")]).await;
    eventually("moved to another node: nothing here", || async { egress_table(&lab).is_none() }).await;
    assert_eq!(source(&lab, "int2", EXT1_IP, 8080).await, Some(ip(NODE_IP)));
    // The VIP moves away from this node: no translation to it.
    endpoints(&admin, &[(INT1_IP, "node-a")]).await;
    eventually("back", || async { source(&lab, "int1", EXT1_IP, 8080).await == Some(ip(VIP)) }).await;
    sh(&lab.ns("gw"), &["ip", "addr", "del", &format!("{VIP}/32"), "dev", "ext0"]);
    eventually("the VIP left this node", || async { egress_table(&lab).is_none() }).await;
    agent.stop().await;
}

#[tokio::test]
async fn deletion_annotation_removal_and_sigterm_leave_nothing() {
    let (lab, _env, admin, client, _servers) = setup("neg3", Some("10.77.0.0/24")).await;
    web_service(&admin, &[]).await;
    endpoints(&admin, &[(INT1_IP, "node-a")]).await;
    let agent = Agent::start(client.clone(), &lab, |_| {}).await;
    eventually("programmed", || async { egress_table(&lab).is_some() }).await;
    annotate(&admin, "natgw.io/egress", None).await;
    eventually("annotation removed: no table", || async { egress_table(&lab).is_none() }).await;
    annotate(&admin, "natgw.io/egress", Some("true")).await;
    eventually("programmed again", || async { egress_table(&lab).is_some() }).await;
    let services: Api<Service> = Api::namespaced(admin.clone(), "shop");
    services.delete("web", &DeleteParams::default()).await.unwrap();
    eventually("Service deleted: no table", || async { egress_table(&lab).is_none() }).await;
    web_service(&admin, &[]).await;
    eventually("programmed again", || async { source(&lab, "int1", EXT1_IP, 8080).await == Some(ip(VIP)) }).await;
    agent.stop().await;
    assert!(egress_table(&lab).is_none(), "SIGTERM removes the table");
    assert_eq!(source(&lab, "int1", EXT1_IP, 8080).await, Some(ip(NODE_IP)));

    // --keep-on-exit keeps it over a planned restart; the next start
    // removes what is no longer wanted.
    let agent = Agent::start(client.clone(), &lab, |c| c.keep_on_exit = true).await;
    eventually("programmed", || async { egress_table(&lab).is_some() }).await;
    agent.stop().await;
    assert!(egress_table(&lab).is_some(), "kept on exit");
    services.delete("web", &DeleteParams::default()).await.unwrap();
    let agent = Agent::start(client, &lab, |_| {}).await;
    eventually("the restarted agent removes the unwanted table", || async { egress_table(&lab).is_none() }).await;
    agent.stop().await;
}

#[tokio::test]
async fn item3_undiscoverable_cidrs_are_loud_with_the_real_reason_and_program_nothing() {
    // No Node has podCIDRs (node-b, which has, is deleted first).
    let (lab, _env, admin, client, _servers) = setup("neg4", None).await;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(admin.clone());
    nodes.delete("node-b", &DeleteParams::default()).await.unwrap();
    web_service(&admin, &[]).await;
    endpoints(&admin, &[(INT1_IP, "node-a")]).await;
    let agent = Agent::start(client.clone(), &lab, |_| {}).await;
    eventually("readiness fails naming the flag", || async {
        let (code, body) = agent.get("/readyz").await;
        code == 503 && body.contains("no pod CIDR") && body.contains("--pod-cidrs (NATGW_POD_CIDRS)")
    })
    .await;
    assert!(agent.get("/metrics").await.1.contains("natgw_egress_cidrs_known 0"));
    let events: Api<Event> = Api::all(admin.clone());
    eventually("a Warning Event on the Node giving the reason and the flag", || async {
        events.list(&Default::default()).await.unwrap().items.iter().any(|e| {
            e.reason.as_deref() == Some("EgressNotProgrammed")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("node-a")
                && e.note.as_deref().is_some_and(|n| n.contains("no pod CIDR") && n.contains("--pod-cidrs"))
        })
    })
    .await;
    // Item 3: nothing is said before the caches have listed.
    let notes: Vec<String> =
        events.list(&Default::default()).await.unwrap().items.into_iter().filter_map(|e| e.note).collect();
    assert!(!notes.iter().any(|n| n.contains("not listed yet") || n.contains("waiting for")), "{notes:?}");
    assert!(egress_table(&lab).is_none(), "no guessed defaults, no rules");
    assert_eq!(source(&lab, "int1", EXT1_IP, 8080).await, Some(ip(NODE_IP)));
    agent.stop().await;

    // The explicit flag overrides discovery.
    let agent =
        Agent::start(client, &lab, |c| c.overrides.pod_cidrs = Some(cidrs::parse("t", "10.77.0.0/16").unwrap())).await;
    eventually("with --pod-cidrs, the VIP", || async { source(&lab, "int1", EXT1_IP, 8080).await == Some(ip(VIP)) })
        .await;
    // Readiness is written right after the sync that programmed the VIP.
    eventually("ready", || async { agent.get("/readyz").await.0 == 200 }).await;
    agent.stop().await;
}

#[tokio::test]
async fn fail_closed_drops_until_programmed_then_passes() {
    let (lab, _env, admin, client, _servers) = setup("neg5", Some("10.77.0.0/24")).await;
    web_service(&admin, &[]).await;
    // A pod of the Service on this node, not (yet) an endpoint.
    selected_pod(&admin).await;
    let agent = Agent::start(client, &lab, |c| c.fail_closed = true).await;
    eventually("the pod is held", || async { egress_table(&lab).is_some_and(|t| t.contains(INT2_IP)) }).await;
    assert_eq!(source(&lab, "int2", EXT1_IP, 8080).await, None, "dropped, never the node IP");
    assert_eq!(source(&lab, "int2", REMOTE_POD, 8080).await, Some(ip(INT2_IP)), "inside the cluster: untouched");
    assert_eq!(source(&lab, "int1", EXT1_IP, 8080).await, Some(ip(NODE_IP)), "other pods: untouched");
    endpoints(&admin, &[(INT2_IP, "node-a")]).await;
    eventually("ready: it leaves with the VIP", || async {
        source(&lab, "int2", EXT1_IP, 8080).await == Some(ip(VIP))
    })
    .await;
    // The gauges follow the sync that wrote the kernel (after its sweep):
    // the packet can be through before they are set.
    eventually("no pod held", || async {
        agent.get("/metrics").await.1.contains("natgw_egress_pods{state=\"held\"} 0")
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn item1_an_idle_connection_survives_full_writes_and_a_restart() {
    let (lab, _env, admin, client, _servers) = setup("neg6", Some("10.77.0.0/24")).await;
    web_service(&admin, &[]).await;
    endpoints(&admin, &[(INT1_IP, "node-a")]).await;
    let fast = |c: &mut Config| {
        c.resync = Duration::from_secs(1);
        c.keep_on_exit = true;
    };
    let agent = Agent::start(client.clone(), &lab, fast).await;
    eventually("int1 leaves with the VIP", || async { source(&lab, "int1", EXT1_IP, 8080).await == Some(ip(VIP)) })
        .await;
    // Silent for 5 s, across several full writes; then the server writes
    // first, so only the surviving conntrack entry can bring it back.
    let ns = lab.ns("int1");
    let idle = tokio::task::spawn_blocking(move || {
        let mut c = tcp_connect(&ns, ip(EXT1_IP), 8080)?;
        assert_eq!(c.seen_as.split(':').next(), Some(VIP));
        c.answer_after(Duration::from_secs(5), "still there")
    });
    // Meanwhile a planned restart: the new agent's first full write must
    // keep the flow too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    agent.stop().await;
    let agent = Agent::start(client, &lab, fast).await;
    idle.await.unwrap().expect("the idle connection survives");
    agent.stop().await;
}

#[tokio::test]
async fn item2_a_restart_after_kill_9_sweeps_the_old_instances_flows() {
    let (lab, _env, admin, client, _servers) = setup("neg7", Some("10.77.0.0/24")).await;
    let _udp = natgw_lab::traffic::udp_server(&lab.ns("ext1"), ip(EXT1_IP), 5353).unwrap();
    web_service(&admin, &[]).await;
    endpoints(&admin, &[(INT1_IP, "node-a")]).await;
    let agent = Agent::start(client.clone(), &lab, |_| {}).await;
    eventually("int1 leaves with the VIP", || async { source(&lab, "int1", EXT1_IP, 8080).await == Some(ip(VIP)) })
        .await;
    let ns = lab.ns("int1");
    let flow = tokio::task::spawn_blocking(move || UdpFlow::open(&ns, ip(EXT1_IP), 5353).unwrap()).await.unwrap();
    assert_eq!(flow.source().unwrap(), ip(VIP));
    agent.kill().await;
    let services: Api<Service> = Api::namespaced(admin.clone(), "shop");
    services.delete("web", &DeleteParams::default()).await.unwrap();
    let agent = Agent::start(client, &lab, |_| {}).await;
    eventually("the restarted agent removes the table", || async { egress_table(&lab).is_none() }).await;
    // The sweep follows the table's removal by a moment: a datagram sent
    // between the two may still leave with the VIP (seen under a loaded
    // test run), so the flow is asked until it is swept.
    let flow = std::sync::Arc::new(flow);
    eventually("the same 5-tuple no longer leaves with the deleted Service's VIP", || {
        let flow = flow.clone();
        async move { tokio::task::spawn_blocking(move || flow.source()).await.unwrap().ok() == Some(ip(NODE_IP)) }
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn item4_nothing_is_written_before_the_first_complete_gather() {
    let (lab, _env, admin, client, _servers) = setup("neg8", Some("10.77.0.0/24")).await;
    web_service(&admin, &[]).await;
    selected_pod(&admin).await;
    let held = |c: &mut Config| {
        c.fail_closed = true;
        c.keep_on_exit = true;
    };
    let agent = Agent::start(client, &lab, held).await;
    eventually("the pod is held", || async { egress_table(&lab).is_some_and(|t| t.contains(INT2_IP)) }).await;
    agent.stop().await;
    // Restarted while the API server cannot be reached: its caches never
    // list, so it must leave the kept table and its hold alone.
    let unreachable = Client::try_from(kube::Config::new("https://127.0.0.1:1".parse().unwrap())).unwrap();
    let agent = Agent::start(unreachable, &lab, held).await;
    // Its watches have tried and failed: a signal, not a sleep.
    eventually("readiness says the Services cannot be listed", || async {
        let (code, body) = agent.get("/readyz").await;
        code == 503 && body.contains("cannot list Services")
    })
    .await;
    assert!(egress_table(&lab).is_some_and(|t| t.contains(INT2_IP)), "the hold is kept");
    assert_eq!(source(&lab, "int2", EXT1_IP, 8080).await, None, "still dropped, never the node IP");
    agent.stop().await;
}

/// A running agent with `tweak`, int1 behind the egress Service `web` on
/// this node, leaving with the VIP; and an open connection of int1's
/// through it.
struct Serving {
    lab: Lab,
    _env: TestEnv,
    admin: Client,
    client: Client,
    _servers: Vec<natgw_lab::traffic::Server>,
    agent: Agent,
    conn: natgw_lab::traffic::Conn,
}

async fn serving(prefix: &str, tweak: impl FnOnce(&mut Config)) -> Serving {
    let (lab, env, admin, client, servers) = setup(prefix, Some("10.77.0.0/24")).await;
    web_service(&admin, &[]).await;
    endpoints(&admin, &[(INT1_IP, "node-a")]).await;
    let agent = Agent::start(client.clone(), &lab, tweak).await;
    eventually("int1 leaves with the VIP", || async { source(&lab, "int1", EXT1_IP, 8080).await == Some(ip(VIP)) })
        .await;
    let ns = lab.ns("int1");
    let conn = tokio::task::spawn_blocking(move || tcp_connect(&ns, ip(EXT1_IP), 8080)).await.unwrap().unwrap();
    assert_eq!(conn.seen_as.split(':').next(), Some(VIP));
    Serving { lab, _env: env, admin, client, _servers: servers, agent, conn }
}

/// The chart's DaemonSet for node agents, selecting nodes labelled
/// `natgw.io/egress=on`.
async fn daemonset(admin: &Client) {
    let yaml = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: natgw-node-agent, namespace: natgw-system}\n\
        spec:\n  selector: {matchLabels: {app: na}}\n  template:\n    metadata: {labels: {app: na}}\n    spec:\n\
        \x20     nodeSelector: {natgw.io/egress: \"on\"}\n      containers: [{name: a, image: natgw}]\n";
    apply_yaml(admin, yaml).await.unwrap();
}

async fn label_node(admin: &Client, on: bool) {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(admin.clone());
    let value = if on { serde_json::json!("on") } else { serde_json::Value::Null };
    let patch = serde_json::json!({"metadata": {"labels": {"natgw.io/egress": value}}});
    nodes.patch("node-a", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
}

/// Echoes on a connection from a blocking thread: the agent runs on this
/// test's runtime and must not stall.
async fn echo(mut c: natgw_lab::traffic::Conn, text: &'static str) -> (natgw_lab::traffic::Conn, bool) {
    tokio::task::spawn_blocking(move || {
        let result = c.echo(text);
        if let Err(e) = &result {
            eprintln!("echo {text:?}: {e}");
        }
        (c, result.is_ok())
    })
    .await
    .unwrap()
}

/// Item 5 of the second hardening round: with the flags the chart renders
/// (its DaemonSet's name and namespace), SIGTERM for a restart keeps the
/// table and every translated connection, and the next agent converges
/// from the kernel it finds; a node the DaemonSet no longer selects, and
/// an uninstall (the DaemonSet gone), remove everything as before.
#[tokio::test]
async fn round2_item5_a_restart_keeps_egress_connections_and_an_uninstall_removes_them() {
    let chart = |c: &mut Config| c.daemonset = Some(("natgw-system".into(), "natgw-node-agent".into()));
    let Serving { lab, _env, admin, client, _servers, agent, conn } = serving("neg9", chart).await;
    daemonset(&admin).await;
    label_node(&admin, true).await;
    let (conn, ok) = echo(conn, "before").await;
    assert!(ok);

    // A rollout restart: SIGTERM, then a new agent.
    agent.stop().await;
    assert!(egress_table(&lab).is_some(), "a restart keeps the table");
    let (conn, ok) = echo(conn, "between agents").await;
    assert!(ok, "the connection lives while no agent runs");
    assert_eq!(source(&lab, "int1", EXT1_IP, 8080).await, Some(ip(VIP)), "new connections keep the VIP meanwhile");
    let agent = Agent::start(client.clone(), &lab, chart).await;
    eventually("the new agent is ready", || async { agent.get("/readyz").await.0 == 200 }).await;
    let (conn, ok) = echo(conn, "once restarted").await;
    assert!(ok, "the connection survives the new agent's first full write");

    // The DaemonSet no longer selects this node: egress ends here.
    label_node(&admin, false).await;
    agent.stop().await;
    assert!(egress_table(&lab).is_none(), "a node no longer selected keeps nothing");
    let (_, ok) = echo(conn, "once ended").await;
    assert!(!ok, "its translated flows are swept");
    assert_eq!(source(&lab, "int1", EXT1_IP, 8080).await, Some(ip(NODE_IP)));

    // An uninstall: the DaemonSet is deleted, then its pods stop.
    label_node(&admin, true).await;
    let agent = Agent::start(client.clone(), &lab, chart).await;
    eventually("programmed again", || async { source(&lab, "int1", EXT1_IP, 8080).await == Some(ip(VIP)) }).await;
    let sets: Api<k8s_openapi::api::apps::v1::DaemonSet> = Api::namespaced(admin.clone(), "natgw-system");
    sets.delete("natgw-node-agent", &DeleteParams::default()).await.unwrap();
    agent.stop().await;
    assert!(egress_table(&lab).is_none(), "an uninstall leaves nothing");
    assert_eq!(source(&lab, "int1", EXT1_IP, 8080).await, Some(ip(NODE_IP)));
}

/// Item 6 of the second hardening round: an egress pod's connections that
/// the node DNATs (a LoadBalancer VIP sent to a backend on another node,
/// as kube-proxy does) or delivers to itself (a node-local daemon) are
/// never SNATed, and the sweep after each full write must leave them
/// alone: idle across several resyncs, they answer afterwards.
#[tokio::test]
async fn round2_item6_dnated_and_node_local_connections_survive_resyncs() {
    let (lab, _env, admin, client, _servers) = setup("neg10", Some("10.77.0.0/24")).await;
    let gw = lab.ns("gw");
    // kube-proxy's part: another LoadBalancer VIP, sent to a pod on node-b.
    sh(
        &gw,
        &[
            "nft",
            "add table ip kp; add chain ip kp pre { type nat hook prerouting priority dstnat; }; \
             add rule ip kp pre ip daddr 198.51.100.201 tcp dport 80 dnat to 10.78.0.5:8080",
        ],
    );
    let _daemon = tcp_server(&gw, ip(NODE_IP), 9090).unwrap();
    web_service(&admin, &[]).await;
    endpoints(&admin, &[(INT1_IP, "node-a")]).await;
    let agent = Agent::start(client, &lab, |c| c.resync = Duration::from_secs(1)).await;
    eventually("int1 leaves with the VIP", || async { source(&lab, "int1", EXT1_IP, 8080).await == Some(ip(VIP)) })
        .await;
    // Flows of the probes above that left before the table was in are
    // swept at its first write: count from a full write after it.
    let deleted = || agent.metric("natgw_egress_conntrack_deleted_total ");
    let full_writes = || agent.metric("natgw_egress_last_full_sync_timestamp_seconds ");
    let since = full_writes().await;
    eventually("a full write after the table came in", || async { full_writes().await > since }).await;
    let before = deleted().await;
    let idle = |dst: &'static str, port: u16| {
        let ns = lab.ns("int1");
        tokio::task::spawn_blocking(move || {
            let mut c = tcp_connect(&ns, ip(dst), port)?;
            c.answer_after(Duration::from_secs(4), "still there")
        })
    };
    let through_lb = idle("198.51.100.201", 80);
    let to_the_node = idle(NODE_IP, 9090);
    through_lb.await.unwrap().expect("a connection DNATed to a Service's backend survives the resyncs");
    to_the_node.await.unwrap().expect("a connection to a node-local daemon survives the resyncs");
    // Loose pickup would revive an untranslated flow whose entry went: the
    // count shows that none did.
    assert_eq!(deleted().await, before, "the resyncs' sweeps deleted flows");
    agent.stop().await;
}

/// Second round, item 10: the agent's own failure (here CIDR discovery,
/// after the first good round: the Nodes are gone) keeps what it last
/// programmed, and says so in its readiness, a metric and an Event; it
/// never becomes "translate nothing" (the table deleted, flows swept).
#[tokio::test]
async fn round2_item10_a_failure_keeps_the_last_good_plan_and_says_so() {
    let Serving { lab, _env, admin, _servers, agent, conn, .. } = serving("neg11", |_| {}).await;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(admin.clone());
    for n in ["node-a", "node-b"] {
        nodes.delete(n, &DeleteParams::default()).await.unwrap();
    }
    eventually("readiness says the last state is kept, and why", || async {
        let (code, body) = agent.get("/readyz").await;
        code == 503 && body.contains("keeps its last programmed state") && body.contains("no pod CIDR")
    })
    .await;
    let metrics = agent.get("/metrics").await.1;
    assert!(metrics.contains("natgw_egress_plan_kept 1"), "{metrics}");
    let events: Api<Event> = Api::all(admin.clone());
    eventually("a Warning Event on the Node", || async {
        events.list(&Default::default()).await.unwrap().items.iter().any(|e| {
            e.reason.as_deref() == Some("EgressNotProgrammed")
                && e.note.as_deref().is_some_and(|n| n.contains("keeps its last programmed state"))
        })
    })
    .await;
    assert!(egress_table(&lab).is_some(), "the table stays");
    let (conn, ok) = echo(conn, "while failing").await;
    assert!(ok, "established connections keep their translation");
    assert_eq!(source(&lab, "int1", EXT1_IP, 8080).await, Some(ip(VIP)), "new ones too");
    // Discovery is back: so is readiness.
    apply_yaml(&admin, "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nspec:\n  podCIDRs: [\"10.77.0.0/24\"]\n")
        .await
        .unwrap();
    eventually("ready again", || async { agent.get("/readyz").await.0 == 200 }).await;
    assert!(agent.get("/metrics").await.1.contains("natgw_egress_plan_kept 0"));
    let (_, ok) = echo(conn, "recovered").await;
    assert!(ok);
    agent.stop().await;
}

/// Second round, item 13: a bad egress Service is reported by the nodes
/// that serve it (here: only once its endpoints are on this node), once
/// per change, and a Service fixed and broken again is reported again.
#[tokio::test]
async fn round2_item13_only_a_node_serving_the_service_speaks_once_per_change() {
    let (lab, _env, admin, client, _servers) = setup("neg12", Some("10.77.0.0/24")).await;
    web_service(&admin, &[("natgw.io/egress-ports", "tcp:http")]).await;
    endpoints(&admin, &[(INT2_IP, "node-b")]).await;
    let agent = Agent::start(client, &lab, |_| {}).await;
    let events: Api<Event> = Api::namespaced(admin.clone(), "shop");
    let invalid = || async {
        let items = events.list(&Default::default()).await.unwrap().items;
        items.iter().filter(|e| e.reason.as_deref() == Some("InvalidEgress")).count()
    };
    let syncs = || agent.metric("natgw_egress_syncs_total{result=\"ok\"} ");
    // Rounds that saw the bad Service, served elsewhere: nothing said.
    let seen = syncs().await;
    eventually("three rounds", || async { syncs().await >= seen + 3.0 }).await;
    assert_eq!(invalid().await, 0, "a node without the Service's endpoints stays silent");
    endpoints(&admin, &[(INT1_IP, "node-a")]).await;
    eventually("said once its endpoints are here", || async { invalid().await == 1 }).await;
    let seen = syncs().await;
    eventually("three more rounds", || async { syncs().await >= seen + 3.0 }).await;
    assert_eq!(invalid().await, 1, "once per change, not once per round");
    annotate(&admin, "natgw.io/egress-ports", Some("tcp:8080")).await;
    eventually("fixed: programmed", || async { source(&lab, "int1", EXT1_IP, 8080).await == Some(ip(VIP)) }).await;
    annotate(&admin, "natgw.io/egress-ports", Some("tcp:http")).await;
    eventually("broken again: said again", || async { invalid().await == 2 }).await;
    agent.stop().await;
}

/// Second round, item 19: kube-proxy in IPVS mode puts every Service
/// address of the cluster on kube-ipvs0 on every node. Those are not VIPs
/// this node holds: with them, every node would translate its pods to a
/// VIP whose replies reach only the node that really holds it.
#[test]
fn round2_item19_kube_proxys_ipvs_interface_holds_no_vip_of_this_node() {
    let lab = Lab::up(&format!("ipvs{}", std::process::id() % 10000)).expect("lab");
    let gw = lab.ns("gw");
    // No dummy interfaces in this kernel: a veth named as kube-proxy names it.
    sh(&gw, &["ip", "link", "add", "kube-ipvs0", "type", "veth", "peer", "name", "ipvs-peer"]);
    sh(&gw, &["ip", "addr", "add", "198.51.100.201/32", "dev", "kube-ipvs0"]);
    sh(&gw, &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "ext0"]);
    let egress = natgw_dataplane::egress::Egress::open(Some(&gw)).unwrap();
    let local = egress.local_addresses().unwrap();
    assert!(local.contains(&ip(VIP)), "the VIP this node holds: {local:?}");
    assert!(!local.contains(&ip("198.51.100.201")), "a Service address on kube-ipvs0 counted as held: {local:?}");
}
