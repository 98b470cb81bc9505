//! Deletion order against a real kube-apiserver, with the controller
//! running as its ServiceAccount under deploy/rbac.yaml.

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams};
use kube::{Client, ResourceExt};
use natgw_api::*;
use natgw_controller::FINALIZER;
use natgw_testenv::{TestEnv, eventually};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Kills the controller without a graceful stop, as a crash would.
    fn kill(self) {
        self.task.abort();
    }
}

fn start(client: Client) -> Running {
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(natgw_controller::run(
        client,
        Some("test".into()),
        "natgw-system".into(),
        natgw_controller::Options {
            gateway_pod: natgw_controller::workload::GatewayPod {
                image: Some("natgw:test".into()),
                ..Default::default()
            },
            ..Default::default()
        },
        async move {
            let _ = rx.await;
        },
    ));
    Running { stop: Some(tx), task }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

async fn setup() -> (TestEnv, Client, Client) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let env = TestEnv::start().await.expect("control plane");
    let admin = env.install_natgw(&natgw_api::crds()).await.unwrap();
    let controller = env.natgw_client("natgw-controller").await.unwrap();
    (env, admin, controller)
}

fn object<K: serde::de::DeserializeOwned>(kind: &str, name: &str, spec: serde_json::Value) -> K {
    natgw_testenv::natgw_object(kind, name, spec).unwrap()
}

async fn create<K: natgw_testenv::ClusterObject>(client: &Client, obj: K) {
    natgw_testenv::create(client, &obj).await.unwrap();
}

/// Vpc `v`, external Subnet `ext` and NatGateway `gw`.
/// Vpc `v` and the external Subnet `ext`.
async fn network(admin: &Client) {
    create(admin, object::<Vpc>("Vpc", "v", serde_json::json!({}))).await;
    create(
        admin,
        object::<Subnet>("Subnet", "ext", serde_json::json!({"cidr": "192.0.2.0/24", "gateway": "192.0.2.1"})),
    )
    .await;
}

async fn gateway(admin: &Client) {
    network(admin).await;
    let gw =
        serde_json::json!({"vpc": "v", "lanInterface": "eth0", "externalInterface": "net1", "externalSubnet": "ext"});
    create(admin, object::<NatGateway>("NatGateway", "gw", gw)).await;
}

fn blocked_message(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> Option<String> {
    conditions.iter().find(|c| c.type_ == "DeletionBlocked" && c.status == "True").map(|c| c.message.clone())
}

#[tokio::test]
async fn a_vpc_with_subnets_waits_and_a_restarted_controller_collects_nothing_live() {
    let (env, admin, controller_client) = setup().await;
    let controller = start(controller_client);
    let vpcs: Api<Vpc> = Api::all(admin.clone());
    let subnets: Api<Subnet> = Api::all(admin.clone());
    create(&admin, object::<Vpc>("Vpc", "v", serde_json::json!({}))).await;
    create(
        &admin,
        object::<Subnet>("Subnet", "s", serde_json::json!({"vpc": "v", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"})),
    )
    .await;
    eventually("finalizers and VPC membership", || async {
        let v = vpcs.get("v").await.unwrap();
        let s = subnets.get("s").await.unwrap();
        v.finalizers().contains(&FINALIZER.to_string())
            && s.finalizers().contains(&FINALIZER.to_string())
            && v.status.as_ref().is_some_and(|st| st.subnets == ["s"])
    })
    .await;

    vpcs.delete("v", &DeleteParams::default()).await.unwrap();
    eventually("DeletionBlocked naming the subnet", || async {
        let v = vpcs.get("v").await.unwrap();
        let status = v.status.unwrap_or_default();
        // Membership survives the condition: separate field managers.
        blocked_message(&status.common.conditions).is_some_and(|m| m.contains("Subnet/s")) && status.subnets == ["s"]
    })
    .await;
    let events: Api<Event> = Api::all(admin.clone());
    eventually("an Event saying why", || async {
        events.list(&Default::default()).await.unwrap().items.iter().any(|e| {
            e.reason.as_deref() == Some("DeletionBlocked")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("v")
                && e.note.as_deref().is_some_and(|n| n.contains("Subnet/s"))
        })
    })
    .await;

    // A crash and a restart while the deletion waits: nothing live goes.
    controller.kill();
    let _controller = start(env.natgw_client("natgw-controller").await.unwrap());
    // The restarted controller has listed and reconciled once it takes a
    // new object in: a signal, not a sleep.
    create(&admin, object::<Vpc>("Vpc", "probe", serde_json::json!({}))).await;
    eventually("the restarted controller at work", || async {
        vpcs.get("probe").await.unwrap().finalizers().contains(&FINALIZER.to_string())
    })
    .await;
    assert!(vpcs.get_opt("v").await.unwrap().is_some(), "the VPC went while its subnet exists");
    let s = subnets.get("s").await.unwrap();
    assert!(s.metadata.deletion_timestamp.is_none(), "the restarted controller deleted a live subnet");

    subnets.delete("s", &DeleteParams::default()).await.unwrap();
    eventually("the subnet, then the VPC, to go", || async {
        subnets.get_opt("s").await.unwrap().is_none() && vpcs.get_opt("v").await.unwrap().is_none()
    })
    .await;
}

#[tokio::test]
async fn an_eip_in_use_waits_for_its_rules() {
    let (_env, admin, controller_client) = setup().await;
    let _controller = start(controller_client);
    gateway(&admin).await;
    create(&admin, object::<Eip>("Eip", "e", serde_json::json!({"gateway": "gw", "ip": "192.0.2.10"}))).await;
    create(&admin, object::<FloatingIp>("FloatingIp", "f", serde_json::json!({"eip": "e", "internalIp": "10.0.0.5"})))
        .await;
    let eips: Api<Eip> = Api::all(admin.clone());
    let fips: Api<FloatingIp> = Api::all(admin.clone());
    eventually("finalizers", || async {
        eips.get("e").await.unwrap().finalizers().contains(&FINALIZER.to_string())
            && fips.get("f").await.unwrap().finalizers().contains(&FINALIZER.to_string())
    })
    .await;
    eips.delete("e", &DeleteParams::default()).await.unwrap();
    eventually("DeletionBlocked naming the floating IP", || async {
        let e = eips.get("e").await.unwrap();
        blocked_message(&e.status.map(|s| s.common.conditions).unwrap_or_default())
            .is_some_and(|m| m.contains("FloatingIp/f"))
    })
    .await;
    fips.delete("f", &DeleteParams::default()).await.unwrap();
    eventually("the rule, then the EIP, to go", || async {
        fips.get_opt("f").await.unwrap().is_none() && eips.get_opt("e").await.unwrap().is_none()
    })
    .await;
}

#[tokio::test]
async fn a_standby_takes_over_when_the_leader_dies() {
    use k8s_openapi::api::coordination::v1::Lease;
    let (env, admin, _) = setup().await;
    let a = tokio::spawn(natgw_controller::run_elected(
        env.natgw_client("natgw-controller").await.unwrap(),
        election("a"),
        std::future::pending(),
    ));
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "natgw-system");
    let holder = || async {
        leases.get_opt("natgw-controller").await.unwrap().and_then(|l| l.spec).and_then(|s| s.holder_identity)
    };
    eventually("a to lead", || async { holder().await.as_deref() == Some("a") }).await;
    let b = tokio::spawn(natgw_controller::run_elected(
        env.natgw_client("natgw-controller").await.unwrap(),
        election("b"),
        std::future::pending(),
    ));
    create(&admin, object::<Vpc>("Vpc", "v", serde_json::json!({}))).await;
    let vpcs: Api<Vpc> = Api::all(admin.clone());
    eventually("the leader to add the finalizer", || async {
        vpcs.get("v").await.unwrap().finalizers().contains(&FINALIZER.to_string())
    })
    .await;
    a.abort();
    eventually("b to take over", || async { holder().await.as_deref() == Some("b") }).await;
    vpcs.delete("v", &DeleteParams::default()).await.unwrap();
    eventually("the new leader to finish the deletion", || async { vpcs.get_opt("v").await.unwrap().is_none() }).await;
    b.abort();
}

#[tokio::test]
async fn each_gateway_gets_its_workload_and_loses_it_on_deletion() {
    use k8s_openapi::api::apps::v1::StatefulSet;
    let (_env, admin, controller_client) = setup().await;
    let _controller = start(controller_client);
    network(&admin).await;
    let gw = serde_json::json!({"vpc": "v", "lanInterface": "eth0", "externalInterface": "net1", "externalSubnet": "ext", "externalNetwork": "kube-system/ext-macvlan"});
    create(&admin, object::<NatGateway>("NatGateway", "gw", gw)).await;
    let bare =
        serde_json::json!({"vpc": "v", "lanInterface": "eth0", "externalInterface": "net1", "externalSubnet": "ext"});
    create(&admin, object::<NatGateway>("NatGateway", "bare", bare)).await;
    let sts: Api<StatefulSet> = Api::namespaced(admin.clone(), "natgw-system");
    eventually("the gateway's StatefulSet", || async { sts.get_opt("natgw-gw-gw").await.unwrap().is_some() }).await;
    let s = sts.get("natgw-gw-gw").await.unwrap();
    let spec = s.spec.unwrap();
    assert_eq!(spec.replicas, Some(1));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("natgw-gateway-gw"), "the gateway's own account");
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("natgw:test"));
    let env = c.env.clone().unwrap_or_default();
    let health = env.iter().find(|e| e.name == "NATGW_HEALTH_ADDR").and_then(|e| e.value.as_deref());
    assert_eq!(health, Some("$(POD_IP):9478"), "health and metrics on the pod's own address only");
    assert_eq!(c.args.clone().unwrap(), ["agent", "--gateway", "gw"]);
    let security = c.security_context.clone().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let seccomp = pod.security_context.as_ref().and_then(|s| s.seccomp_profile.as_ref()).map(|p| p.type_.as_str());
    assert_eq!(seccomp, Some("RuntimeDefault"));
    let caps = security.capabilities.unwrap().add.unwrap();
    assert!(caps.contains(&"NET_ADMIN".to_string()), "{caps:?}");
    assert!(
        pod.containers.iter().all(|c| c.security_context.as_ref().and_then(|s| s.privileged) != Some(true)),
        "no privileged pod"
    );
    let annotations = spec.template.metadata.unwrap().annotations.unwrap();
    let nets: serde_json::Value = serde_json::from_str(&annotations["k8s.v1.cni.cncf.io/networks"]).unwrap();
    assert_eq!(nets, serde_json::json!([{"name": "ext-macvlan", "namespace": "kube-system", "interface": "net1"}]));
    // Missing configuration is said, not guessed.
    let gws: Api<NatGateway> = Api::all(admin.clone());
    eventually("the unconfigured gateway says why", || async {
        let g = gws.get("bare").await.unwrap();
        g.status
            .unwrap_or_default()
            .conditions
            .iter()
            .any(|c| c.type_ == "WorkloadReady" && c.status == "False" && c.message.contains("spec.externalNetwork"))
    })
    .await;
    assert!(sts.get_opt("natgw-gw-bare").await.unwrap().is_none());
    // Reconciles that change nothing apply nothing: Eips of the gateway
    // come (each reconciles it) and no StatefulSet patch reaches the API
    // server. 1,000 gateways re-applying theirs at each Eip change and
    // each 5 s retry kept the controller from reconciling a new gateway.
    let patches = || async {
        let text = admin.request_text(http::Request::get("/metrics").body(Vec::new()).unwrap()).await.unwrap();
        text.lines()
            .filter(|l| l.starts_with("apiserver_request_total{") && l.contains("resource=\"statefulsets\""))
            .filter(|l| l.contains("verb=\"APPLY\"") || l.contains("verb=\"PATCH\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let eips: Api<Eip> = Api::all(admin.clone());
    let before = patches().await;
    for i in 0..5 {
        create(&admin, object::<Eip>("Eip", &format!("e{i}"), serde_json::json!({"gateway": "gw"}))).await;
    }
    eventually("the Eips labelled (each reconciled the gateway)", || async {
        let list = eips.list(&Default::default()).await.unwrap().items;
        list.len() == 5 && list.iter().all(|e| e.labels().get(GATEWAY_LABEL).is_some())
    })
    .await;
    assert_eq!(patches().await, before, "a StatefulSet applied again unchanged");
    // An edit by hand is undone; a deleted StatefulSet comes back.
    let image =
        serde_json::json!({"spec": {"template": {"spec": {"containers": [{"name": "agent", "image": "evil"}]}}}});
    sts.patch("natgw-gw-gw", &kube::api::PatchParams::default(), &kube::api::Patch::Strategic(&image)).await.unwrap();
    let image_of = |s: StatefulSet| s.spec.and_then(|s| s.template.spec).and_then(|p| p.containers[0].image.clone());
    eventually("the edit undone", || async {
        image_of(sts.get("natgw-gw-gw").await.unwrap()).as_deref() == Some("natgw:test")
    })
    .await;
    sts.delete("natgw-gw-gw", &DeleteParams::default()).await.unwrap();
    eventually("the StatefulSet back", || async {
        sts.get_opt("natgw-gw-gw").await.unwrap().is_some_and(|s| s.metadata.deletion_timestamp.is_none())
    })
    .await;
    for i in 0..5 {
        eips.delete(&format!("e{i}"), &DeleteParams::default()).await.unwrap();
    }
    gws.delete("gw", &DeleteParams::default()).await.unwrap();
    eventually("the workload gone with its gateway", || async {
        sts.get_opt("natgw-gw-gw").await.unwrap().is_none() && gws.get_opt("gw").await.unwrap().is_none()
    })
    .await;
}

#[tokio::test]
async fn a_rule_is_bound_to_the_gateway_of_its_eip() {
    let (_env, admin, controller_client) = setup().await;
    let _controller = start(controller_client);
    gateway(&admin).await;
    let fips: Api<FloatingIp> = Api::all(admin.clone());
    let eips: Api<Eip> = Api::all(admin.clone());
    let label = |l: &std::collections::BTreeMap<String, String>| l.get(GATEWAY_LABEL).cloned();
    // A rule on an Eip that does not exist yet: unbound, and it says why.
    create(&admin, object::<FloatingIp>("FloatingIp", "f", serde_json::json!({"eip": "e", "internalIp": "10.0.0.5"})))
        .await;
    eventually("Bound=False naming spec.eip", || async {
        let f = fips.get("f").await.unwrap();
        let unbound =
            f.status.iter().flat_map(|s| &s.conditions).any(|c| {
                c.type_ == "Bound" && c.status == "False" && c.message == "spec.eip: Eip \"e\" does not exist"
            });
        unbound && label(f.labels()).is_none()
    })
    .await;
    create(&admin, object::<Eip>("Eip", "e", serde_json::json!({"gateway": "gw"}))).await;
    eventually("the Eip and the rule labelled with the gateway", || async {
        let f = fips.get("f").await.unwrap();
        let bound = f.status.iter().flat_map(|s| &s.conditions).any(|c| c.type_ == "Bound" && c.status == "True");
        bound
            && label(f.labels()).as_deref() == Some("gw")
            && label(eips.get("e").await.unwrap().labels()).as_deref() == Some("gw")
    })
    .await;
    // The binding cannot change under the gateway: spec.eip is immutable.
    let moved = serde_json::json!({"spec": {"eip": "other"}});
    let err = fips
        .patch("f", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&moved))
        .await
        .expect_err("spec.eip is immutable");
    assert!(err.to_string().contains("spec.eip is immutable"), "{err}");
}

/// A new rule on an Eip its gateway's agent has programmed (Ready, with
/// the agent's finalizer) gets the agent's finalizer together with the
/// controller's and the label, in one write: the agent programs it in its
/// first round. A rule on an Eip no agent has programmed gets only the
/// controller's, so deleting it waits for no agent.
#[tokio::test]
async fn a_rule_on_a_programmed_eip_carries_the_agents_finalizer_from_its_first_write() {
    let (_env, admin, controller_client) = setup().await;
    let _controller = start(controller_client);
    gateway(&admin).await;
    for (name, ip) in [("programmed", "192.0.2.10"), ("waiting", "192.0.2.11")] {
        create(&admin, object::<Eip>("Eip", name, serde_json::json!({"gateway": "gw", "ip": ip}))).await;
    }
    let eips: Api<Eip> = Api::all(admin.clone());
    let agent = gateway_finalizer("gw");
    eventually("the Eips labelled", || async {
        eips.list(&Default::default()).await.unwrap().items.iter().all(|e| !e.labels().is_empty())
    })
    .await;
    // What the agent does once it programmed an Eip, done by hand.
    let e = eips.get("programmed").await.unwrap();
    let mut finalizers = e.finalizers().to_vec();
    finalizers.push(agent.clone());
    let patch = serde_json::json!({"metadata": {"finalizers": finalizers}});
    eips.patch("programmed", &Default::default(), &kube::api::Patch::Merge(&patch)).await.unwrap();
    let ready = serde_json::json!({"apiVersion": "natgw.io/v1alpha1", "kind": "Eip", "status": {"conditions": [{
        "type": "Ready", "status": "True", "reason": "InKernel", "message": "programmed",
        "lastTransitionTime": "2026-12-02T10:00:00Z"}]}});
    let ssa = kube::api::PatchParams::apply("natgw-gateway-gw").force();
    eips.patch_status("programmed", &ssa, &kube::api::Patch::Apply(&ready)).await.unwrap();
    // Nothing the controller writes shows that its cache took this in;
    // a watch event takes milliseconds here.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fips: Api<FloatingIp> = Api::all(admin.clone());
    for (name, eip) in [("on-programmed", "programmed"), ("on-waiting", "waiting")] {
        let spec = serde_json::json!({"eip": eip, "internalIp": "10.0.0.5"});
        create(&admin, object::<FloatingIp>("FloatingIp", name, spec)).await;
    }
    eventually("both rules labelled", || async {
        fips.list(&Default::default()).await.unwrap().items.iter().all(|f| f.labels().contains_key(GATEWAY_LABEL))
    })
    .await;
    let on_programmed = fips.get("on-programmed").await.unwrap().finalizers().to_vec();
    assert_eq!(on_programmed, [FINALIZER.to_string(), agent.clone()]);
    let on_waiting = fips.get("on-waiting").await.unwrap().finalizers().to_vec();
    assert_eq!(on_waiting, [FINALIZER.to_string()]);
    // No agent runs here: the second goes at once, the first waits for it.
    for name in ["on-programmed", "on-waiting"] {
        fips.delete(name, &DeleteParams::default()).await.unwrap();
    }
    eventually("the rule no agent programmed gone", || async { fips.get_opt("on-waiting").await.unwrap().is_none() })
        .await;
    let waiting = fips.get("on-programmed").await.unwrap();
    assert_eq!(waiting.finalizers(), [agent]);
}

/// A fast election (a 3 s Lease, renewed 1 s before it expires).
fn election(id: &str) -> natgw_controller::Election {
    natgw_controller::Election {
        namespace: "natgw-system".into(),
        lease: "natgw-controller".into(),
        identity: id.into(),
        duration_secs: 3,
        grace_secs: 1,
        options: Default::default(),
    }
}

/// A TCP proxy in front of the API server that can stall: once stalled,
/// no byte moves either way and connections stay open, as behind a hung
/// load balancer or a half-dead link.
struct StallingProxy {
    url: String,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn stalling_proxy(upstream: &str) -> StallingProxy {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = upstream.trim_start_matches("https://").to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stalled.clone();
    let task = tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (s, upstream) = (s.clone(), upstream.clone());
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let pipe = |mut r: tokio::net::tcp::OwnedReadHalf, mut w: tokio::net::tcp::OwnedWriteHalf| {
                    let s = s.clone();
                    async move {
                        let mut buf = vec![0u8; 16384];
                        while let Ok(n) = r.read(&mut buf).await {
                            if n == 0 {
                                return;
                            }
                            while s.load(Ordering::Relaxed) {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                };
                futures::join!(pipe(cr, sw), pipe(sr, cw));
            });
        }
    });
    StallingProxy { url, stalled, task }
}

/// Second round, item 12: a leader whose connection to the API server
/// stalls (its Lease renewal hangs, with no read timeout) steps down
/// before the Lease expires, so a standby that takes it over never
/// leads beside it.
#[tokio::test]
async fn round2_item12_a_leader_behind_a_stalled_connection_steps_down_before_a_standby_leads() {
    let (env, admin, _) = setup().await;
    let proxy = stalling_proxy(&env.url).await;
    let who = env.service_account("natgw-system", "natgw-controller").unwrap();
    let (a, b) = (election("a"), election("b"));
    let (health_a, health_b) = (a.options.health.clone(), b.options.health.clone());
    let run_a = tokio::spawn(natgw_controller::run_elected(
        env.client_via(&who, &proxy.url).await.unwrap(),
        a,
        std::future::pending(),
    ));
    eventually("a to lead", || async { health_a.is_leading() }).await;
    let run_b = tokio::spawn(natgw_controller::run_elected(env.client(&who).await.unwrap(), b, std::future::pending()));
    proxy.stalled.store(true, std::sync::atomic::Ordering::Relaxed);
    // Sampled every 10 ms until b leads: never both at once.
    let started = std::time::Instant::now();
    while !health_b.is_leading() {
        assert!(!(health_a.is_leading() && health_b.is_leading()), "a and b led at the same time");
        assert!(started.elapsed() < Duration::from_secs(60), "b never took over");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!health_a.is_leading(), "a stepped down");
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(admin, "natgw-system");
    let holder = leases.get("natgw-controller").await.unwrap().spec.and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("b"));
    run_a.abort();
    run_b.abort();
}

/// A gateway asking for two replicas in a cluster runs one pod and says
/// so (a pair runs in standalone mode only so far): never two pods that
/// would both hold its addresses.
#[tokio::test]
async fn a_gateway_asking_for_two_replicas_runs_one_and_says_so() {
    use k8s_openapi::api::apps::v1::StatefulSet;
    let (_env, admin, controller_client) = setup().await;
    let _controller = start(controller_client);
    network(&admin).await;
    let gw = serde_json::json!({"vpc": "v", "lanInterface": "eth0", "externalInterface": "net1", "externalSubnet": "ext",
        "externalNetwork": "kube-system/ext-macvlan", "lanIp": "10.0.0.1", "replicas": 2});
    create(&admin, object::<NatGateway>("NatGateway", "pair", gw)).await;
    let gws: Api<NatGateway> = Api::all(admin.clone());
    eventually("the gateway says it runs one replica", || async {
        let g = gws.get("pair").await.unwrap();
        g.status.unwrap_or_default().conditions.iter().any(|c| {
            c.type_ == "Replicas"
                && c.status == "False"
                && c.reason == "OneReplicaRuns"
                && c.message.contains("standalone")
        })
    })
    .await;
    let sts: Api<StatefulSet> = Api::namespaced(admin.clone(), "natgw-system");
    let s = sts.get("natgw-gw-pair").await.unwrap();
    assert_eq!(s.spec.unwrap().replicas, Some(1), "one pod");
    // Back to one replica: the condition says so.
    let patch = serde_json::json!({"spec": {"replicas": 1}});
    gws.patch("pair", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.unwrap();
    eventually("the condition cleared", || async {
        let g = gws.get("pair").await.unwrap();
        g.status.unwrap_or_default().conditions.iter().any(|c| c.type_ == "Replicas" && c.status == "True")
    })
    .await;
}
