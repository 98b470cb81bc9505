//! The Kube-OVN reports (kubeovn/kube-ovn #5167, #5115, #4718, #5068),
//! end to end: a real kube-apiserver, the
//! controller and the gateway agent under deploy/rbac.yaml, a real gateway
//! namespace and real packets.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use natgw_api::*;
use natgw_dataplane::Gateway;
use natgw_lab::Lab;
use natgw_lab::traffic::{tcp_server, tcp_source};
use natgw_testenv::{TestEnv, eventually};

const EXT1: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const INT1: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 11);

struct World {
    env: TestEnv,
    lab: Lab,
    admin: Client,
    kernel: Gateway,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    agent: Option<tokio::task::JoinHandle<()>>,
    /// The running agent's /readyz and /metrics.
    health: Option<std::net::SocketAddr>,
}

impl Drop for World {
    fn drop(&mut self) {
        for t in self.tasks.iter().chain(self.agent.iter()) {
            t.abort();
        }
    }
}

impl World {
    /// Starts the agent as a new process would: a fresh client.
    async fn start_agent(&mut self) {
        // Its own account, bound as the controller binds it (no image is
        // configured here, so the controller runs no workload).
        let identity = natgw_kube_support::identity::apply(&self.admin, "demo-gw", "uid", "natgw-system");
        identity.await.unwrap();
        let account = natgw_kube_support::identity::account("demo-gw");
        let agent = self.env.natgw_client(&account).await.unwrap();
        let netns = self.lab.ns("gw");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.health = Some(listener.local_addr().unwrap());
        self.agent = Some(tokio::spawn(async move {
            if let Err(e) = natgw_agent::run(
                agent,
                "demo-gw".into(),
                Some(netns),
                "natgw-system".into(),
                Some(listener),
                std::future::pending(),
            )
            .await
            {
                panic!("agent stopped: {e}");
            }
        }));
    }

    /// Kills the agent mid-work, as a crash would.
    fn kill_agent(&mut self) {
        if let Some(a) = self.agent.take() {
            a.abort();
        }
    }
}

async fn world(name: &str) -> World {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let lab = Lab::up(&format!("ag{}-{name}", std::process::id() % 10000)).expect("lab");
    let env = TestEnv::start().await.expect("control plane");
    let admin = env.install_natgw(&natgw_api::crds()).await.unwrap();
    let controller = env.natgw_client("natgw-controller").await.unwrap();
    let tasks = vec![tokio::spawn(natgw_controller::run(
        controller,
        None,
        "natgw-system".into(),
        natgw_controller::Options::default(),
        std::future::pending(),
    ))];
    let network =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/00-network.yaml")).unwrap();
    create_yaml(&admin, &network).await;
    let kernel = Gateway::open(Some(&lab.ns("gw"))).unwrap();
    let mut w = World { env, lab, admin, kernel, tasks, agent: None, health: None };
    w.start_agent().await;
    w
}

async fn create_yaml(client: &Client, yaml: &str) {
    let (set, _) = load_str(std::path::Path::new("t.yaml"), yaml)
        .or_else(|_| Ok::<_, ()>((partial(yaml), Default::default())))
        .unwrap();
    for o in set.objects() {
        create(client, o).await;
    }
}

/// Objects that refer to others not in the same text (rules on EIPs
/// created earlier): parse one by one without reference checks.
fn partial(yaml: &str) -> ObjectSet {
    yaml.split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| {
            natgw_api::parse_object(serde_saphyr::from_str(d).unwrap(), &Source { file: "t".into(), document: 1 })
                .unwrap()
        })
        .collect()
}

async fn create(client: &Client, o: Object) {
    let pp = PostParams::default();
    let c = client.clone();
    let r = match o {
        Object::Vpc(x) => Api::all(c).create(&pp, &x).await.map(drop),
        Object::Subnet(x) => Api::all(c).create(&pp, &x).await.map(drop),
        Object::NatGateway(x) => Api::all(c).create(&pp, &x).await.map(drop),
        Object::Eip(x) => Api::all(c).create(&pp, &x).await.map(drop),
        Object::FloatingIp(x) => Api::all(c).create(&pp, &x).await.map(drop),
        Object::SnatRule(x) => Api::all(c).create(&pp, &x).await.map(drop),
        Object::DnatRule(x) => Api::all(c).create(&pp, &x).await.map(drop),
    };
    r.expect("create");
}

fn eip(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: natgw.io/v1alpha1\nkind: Eip\nmetadata: {{name: {name}}}\nspec: {{gateway: demo-gw, ip: {ip}}}\n"
    )
}
fn fip(name: &str, eip: &str, ip: &str) -> String {
    format!(
        "apiVersion: natgw.io/v1alpha1\nkind: FloatingIp\nmetadata: {{name: {name}}}\nspec: {{eip: {eip}, internalIp: {ip}}}\n"
    )
}

fn snapshot(w: &World) -> natgw_dataplane::KernelState {
    w.kernel.snapshot().expect("kernel snapshot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snat_rule_carries_finalizers_and_leaves_the_kernel_before_it_disappears() {
    let w = world("snat").await;
    create_yaml(&w.admin, &eip("egress", "198.51.100.10")).await;
    create_yaml(&w.admin, "apiVersion: natgw.io/v1alpha1\nkind: SnatRule\nmetadata: {name: out}\nspec: {eip: egress, internalCidr: 10.77.0.0/24}\n").await;
    let snats: Api<SnatRule> = Api::all(w.admin.clone());
    eventually("the rule in the kernel with both finalizers", || async {
        let f = snats.get("out").await.unwrap().finalizers().to_vec();
        f.contains(&natgw_controller::FINALIZER.to_string())
            && f.contains(&natgw_agent::finalizer("demo-gw"))
            && !snapshot(&w).table.nat.snat.is_empty()
    })
    .await;
    let _srv = tcp_server(&w.lab.ns("ext1"), EXT1, 9000).unwrap();
    assert_eq!(tcp_source(&w.lab.ns("int2"), EXT1, 9000).unwrap(), Ipv4Addr::new(198, 51, 100, 10));

    snats.delete("out", &DeleteParams::default()).await.unwrap();
    // Watch closely: the object may only vanish after the kernel let go.
    let start = Instant::now();
    loop {
        let gone = snats.get_opt("out").await.unwrap().is_none();
        let in_kernel = !snapshot(&w).table.nat.snat.is_empty();
        if gone {
            assert!(!in_kernel, "the SnatRule is gone but the kernel still translates for it");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the SnatRule never went");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn floating_ips_created_and_deleted_without_pause_leave_exactly_the_live_ones() {
    let w = world("churn").await;
    let mut eips = String::new();
    for i in 0..4 {
        eips += &eip(&format!("e{i}"), &format!("198.51.100.{}", 20 + i));
        eips += "---\n";
    }
    create_yaml(&w.admin, &eips).await;
    // Long-lived FloatingIps on e1..e3, churn on e0.
    for i in 1..4 {
        create_yaml(&w.admin, &fip(&format!("live{i}"), &format!("e{i}"), &format!("10.77.0.{}", 100 + i))).await;
    }
    let fips: Api<FloatingIp> = Api::all(w.admin.clone());
    for n in 0..200 {
        let name = format!("churn{n}");
        create_yaml(&w.admin, &fip(&name, "e0", "10.77.0.11")).await;
        fips.delete(&name, &DeleteParams::default()).await.unwrap();
    }
    eventually("every churned FloatingIp gone and the kernel holding exactly the live ones", || async {
        let left: Vec<String> =
            fips.list(&Default::default()).await.unwrap().items.iter().map(|f| f.name_any()).collect();
        let k = snapshot(&w);
        left == ["live1", "live2", "live3"]
            && k.table.nat.fip_dnat.len() == 3
            && !k.table.nat.fip_dnat.contains_key(&Ipv4Addr::new(198, 51, 100, 20))
    })
    .await;
    // The EIP is reusable: a new FloatingIp on it carries traffic.
    create_yaml(&w.admin, &fip("web", "e0", "10.77.0.11")).await;
    let _srv = tcp_server(&w.lab.ns("int1"), INT1, 22).unwrap();
    eventually("traffic through the new FloatingIp", || async {
        tcp_source(&w.lab.ns("ext1"), Ipv4Addr::new(198, 51, 100, 20), 22).is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_an_eip_removes_exactly_its_local_route() {
    let w = world("eip").await;
    create_yaml(&w.admin, &(eip("a", "198.51.100.30") + "---\n" + &eip("b", "198.51.100.31"))).await;
    let has =
        |k: &natgw_dataplane::KernelState, ip: &str| k.locals.iter().any(|a| a.addr.to_string() == format!("{ip}/32"));
    eventually("both addresses", || async {
        let k = snapshot(&w);
        has(&k, "198.51.100.30") && has(&k, "198.51.100.31")
    })
    .await;
    let eips: Api<Eip> = Api::all(w.admin.clone());
    eips.delete("a", &DeleteParams::default()).await.unwrap();
    eventually("exactly 198.51.100.30/24 removed", || async {
        let k = snapshot(&w);
        !has(&k, "198.51.100.30") && has(&k, "198.51.100.31") && eips.get_opt("a").await.unwrap().is_none()
    })
    .await;
    // The address can be taken again and works.
    create_yaml(&w.admin, &eip("a2", "198.51.100.30")).await;
    create_yaml(&w.admin, &fip("f", "a2", "10.77.0.11")).await;
    let _srv = tcp_server(&w.lab.ns("int1"), INT1, 22).unwrap();
    eventually("traffic through the re-used address", || async {
        tcp_source(&w.lab.ns("ext1"), Ipv4Addr::new(198, 51, 100, 30), 22).is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn objects_deleted_while_the_agent_is_down_are_cleaned_when_it_returns() {
    let mut w = world("down").await;
    create_yaml(&w.admin, &(eip("e", "198.51.100.40") + "---\n" + &fip("f", "e", "10.77.0.11"))).await;
    let fips: Api<FloatingIp> = Api::all(w.admin.clone());
    eventually("the FloatingIp in the kernel", || async { snapshot(&w).table.nat.fip_dnat.len() == 1 }).await;
    w.kill_agent();
    fips.delete("f", &DeleteParams::default()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Nobody took the state out of the kernel, so the object must stay.
    assert!(fips.get_opt("f").await.unwrap().is_some(), "the FloatingIp went while its NAT was still in the kernel");
    assert_eq!(snapshot(&w).table.nat.fip_dnat.len(), 1);
    w.start_agent().await;
    eventually("the kernel cleaned and the object gone", || async {
        snapshot(&w).table.nat.fip_dnat.is_empty() && fips.get_opt("f").await.unwrap().is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_agent_mid_work_and_restarting_converges() {
    let mut w = world("crash").await;
    create_yaml(&w.admin, &eip("e", "198.51.100.50")).await;
    let mut docs = String::new();
    for i in 0..60u16 {
        docs += &format!(
            "apiVersion: natgw.io/v1alpha1\nkind: DnatRule\nmetadata: {{name: d{i}}}\nspec: {{eip: e, protocol: tcp, externalPort: {}, internalIp: 10.77.0.12, internalPort: 80}}\n---\n",
            1000 + i
        );
    }
    let created = tokio::spawn({
        let admin = w.admin.clone();
        async move { create_yaml(&admin, &docs).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.kill_agent();
    created.await.unwrap();
    // A kernel left behind by a crash, plus drift nobody asked for.
    natgw_lab::traffic::in_ns(&w.lab.ns("gw"), || {
        std::process::Command::new("nft")
            .args(["add", "element", "ip", "natgw", "port_fwd", "{ 198.51.100.50 . udp . 9 : 10.77.0.99 . 9 }"])
            .status()
    })
    .unwrap()
    .ok();
    w.start_agent().await;
    let dnats: Api<DnatRule> = Api::all(w.admin.clone());
    let fin = natgw_agent::finalizer("demo-gw");
    eventually("exactly the 60 forwards in the kernel, each object holding the agent's finalizer", || async {
        let k = snapshot(&w);
        let all_held =
            dnats.list(&Default::default()).await.unwrap().items.iter().all(|d| d.finalizers().contains(&fin));
        k.table.nat.port_fwd.len() == 60 && all_held
    })
    .await;
}

fn condition(conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition], t: &str) -> Option<(String, String)> {
    conds.iter().find(|c| c.type_ == t).map(|c| (c.status.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_says_what_is_programmed_and_why_not() {
    let w = world("status").await;
    create_yaml(&w.admin, &(eip("e", "198.51.100.60") + "---\n" + &fip("first", "e", "10.77.0.11"))).await;
    let fips: Api<FloatingIp> = Api::all(w.admin.clone());
    eventually("first Ready", || async {
        let f = fips.get("first").await.unwrap();
        let conds = f.status.map(|s| s.conditions).unwrap_or_default();
        condition(&conds, "Ready").is_some_and(|(s, _)| s == "True")
            && condition(&conds, "Programmed").is_some_and(|(s, _)| s == "True")
    })
    .await;
    create_yaml(&w.admin, &fip("second", "e", "10.77.0.12")).await;
    eventually("second in Conflict, naming the holder", || async {
        let f = fips.get("second").await.unwrap();
        let st = f.status.unwrap_or_default();
        let conflict = condition(&st.conditions, "Conflict");
        st.observed_generation == f.metadata.generation
            && conflict.is_some_and(|(s, m)| s == "True" && m.contains("FloatingIp/first"))
            && condition(&st.conditions, "Ready").is_some_and(|(s, _)| s == "False")
    })
    .await;
    // The first keeps the EIP in the kernel.
    assert_eq!(snapshot(&w).table.nat.fip_dnat.get(&Ipv4Addr::new(198, 51, 100, 60)), Some(&INT1));
    // Restarted over written statuses, the agent's cache tells they say
    // what it would write: it writes none (100k objects would be 100k
    // writes at every start). The first round reports on all of them.
    let mut w = w;
    w.kill_agent();
    w.start_agent().await;
    let addr = w.health.unwrap();
    let metrics = || async move {
        tokio::task::spawn_blocking(move || natgw_kube_support::health::get_blocking(addr, "/metrics").unwrap().1)
            .await
            .unwrap()
    };
    eventually("the restarted agent synced", || async {
        metrics().await.contains("natgw_objects{kind=\"FloatingIp\",state=\"conflict\"} 1")
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let m = metrics().await;
    assert!(!m.contains("natgw_status_writes_total{outcome=\"written\"}"), "statuses written again: {m}");
    // A change is written, and counted.
    fips.delete("first", &Default::default()).await.unwrap();
    eventually("second Ready once the first is gone", || async {
        let st = fips.get("second").await.unwrap().status.unwrap_or_default();
        condition(&st.conditions, "Ready").is_some_and(|(s, _)| s == "True")
    })
    .await;
    assert!(metrics().await.contains("natgw_status_writes_total{outcome=\"written\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eips_get_distinct_free_addresses_reused_only_once_off_the_gateway() {
    let w = world("alloc").await;
    // Two at once, no address given: the external subnet excludes .1 to .9.
    let auto = |n: &str| {
        format!("apiVersion: natgw.io/v1alpha1\nkind: Eip\nmetadata: {{name: {n}}}\nspec: {{gateway: demo-gw}}\n")
    };
    let (a, b) = (w.admin.clone(), w.admin.clone());
    let (ta, tb) = (auto("a"), auto("b"));
    tokio::join!(async move { create_yaml(&a, &ta).await }, async move { create_yaml(&b, &tb).await });
    let eips: Api<Eip> = Api::all(w.admin.clone());
    let ip_of = |e: Eip| e.status.and_then(|s| s.ip);
    eventually("both allocated and on the gateway", || async {
        let (ia, ib) = (ip_of(eips.get("a").await.unwrap()), ip_of(eips.get("b").await.unwrap()));
        let k = snapshot(&w);
        matches!((ia, ib), (Some(x), Some(y)) if x != y && k.locals.iter().filter(|a| a.interface == "ext0").count() == 2)
    })
    .await;
    let ia = ip_of(eips.get("a").await.unwrap()).unwrap();
    let ib = ip_of(eips.get("b").await.unwrap()).unwrap();
    let mut both = [ia, ib];
    both.sort();
    assert_eq!(both, [Ipv4Addr::new(198, 51, 100, 10), Ipv4Addr::new(198, 51, 100, 11)]);
    // A fixed address someone else holds is refused, visibly.
    create_yaml(&w.admin, &eip("thief", &ia.to_string())).await;
    eventually("the taken address reported", || async {
        let t = eips.get("thief").await.unwrap();
        t.status.is_some_and(|s| {
            s.common
                .conditions
                .iter()
                .any(|c| c.type_ == "AddressAssigned" && c.status == "False" && c.reason == "AddressTaken")
        })
    })
    .await;
    eips.delete("thief", &DeleteParams::default()).await.unwrap();
    // Deleting a frees exactly its address, and only once it is off.
    eips.delete("a", &DeleteParams::default()).await.unwrap();
    eventually("a gone and its address off the gateway", || async {
        let k = snapshot(&w);
        eips.get_opt("a").await.unwrap().is_none()
            && !k.locals.iter().any(|x| x.addr.addr() == ia)
            && k.locals.iter().any(|x| x.addr.addr() == ib)
    })
    .await;
    // The claim goes once a is gone; only then is the address free again.
    let claims: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(w.admin.clone(), "natgw-system");
    let claim = natgw_kube_support::claims::claim_name(ia);
    eventually("the claim released", || async { claims.get_opt(&claim).await.unwrap().is_none() }).await;
    create_yaml(&w.admin, &auto("c")).await;
    eventually("c reuses the freed address", || async { ip_of(eips.get("c").await.unwrap()) == Some(ia) }).await;
    create_yaml(&w.admin, &fip("f", "c", "10.77.0.11")).await;
    let _srv = tcp_server(&w.lab.ns("int1"), INT1, 22).unwrap();
    eventually("traffic through the reused address", || async { tcp_source(&w.lab.ns("ext1"), ia, 22).is_ok() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn objects_of_a_gateway_gone_for_good_are_not_stuck() {
    let mut w = world("gone").await;
    create_yaml(&w.admin, &(eip("e", "198.51.100.70") + "---\n" + &fip("f", "e", "10.77.0.11"))).await;
    let fips: Api<FloatingIp> = Api::all(w.admin.clone());
    let eips: Api<Eip> = Api::all(w.admin.clone());
    let fin = natgw_agent::finalizer("demo-gw");
    eventually("programmed, with the agent's finalizer", || async {
        fips.get("f").await.unwrap().finalizers().contains(&fin) && snapshot(&w).table.nat.fip_dnat.len() == 1
    })
    .await;
    // The agent is gone and an admin force-deletes its NatGateway, bypassing
    // the deletion order: nobody will ever remove the agent's finalizers.
    w.kill_agent();
    let gws: Api<NatGateway> = Api::all(w.admin.clone());
    gws.delete("demo-gw", &DeleteParams::default()).await.unwrap();
    let strip = serde_json::json!({ "metadata": { "finalizers": [] } });
    gws.patch("demo-gw", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&strip)).await.unwrap();
    eventually("the NatGateway gone", || async { gws.get_opt("demo-gw").await.unwrap().is_none() }).await;
    fips.delete("f", &DeleteParams::default()).await.unwrap();
    eips.delete("e", &DeleteParams::default()).await.unwrap();
    eventually("the FloatingIp and the Eip gone, not stuck", || async {
        fips.get_opt("f").await.unwrap().is_none() && eips.get_opt("e").await.unwrap().is_none()
    })
    .await;
}

/// Item 16: the agent trusts an Eip's status.ip only when the controller's
/// claim of that address names the Eip. A status written by anyone else
/// (here the admin, with the controller stopped) is never programmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item16_a_status_ip_without_a_claim_is_never_programmed() {
    let mut w = world("forged").await;
    create_yaml(&w.admin, &eip("real", "198.51.100.60")).await;
    eventually("the claimed address programmed", || async {
        snapshot(&w).locals.iter().any(|a| a.addr.addr() == Ipv4Addr::new(198, 51, 100, 60))
    })
    .await;
    for t in w.tasks.drain(..) {
        t.abort();
    }
    let forged: Eip = natgw_testenv::natgw_object("Eip", "forged", serde_json::json!({"gateway": "demo-gw"})).unwrap();
    let eips: Api<Eip> = Api::all(w.admin.clone());
    eips.create(&PostParams::default(), &forged).await.unwrap();
    let label = serde_json::json!({"metadata": {"labels": {GATEWAY_LABEL: "demo-gw"}}});
    eips.patch("forged", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&label)).await.unwrap();
    let status = serde_json::json!({"status": {"ip": "198.51.100.77"}});
    eips.patch_status("forged", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&status)).await.unwrap();
    eventually("the agent saw it and says it is not programmed", || async {
        eips.get("forged")
            .await
            .unwrap()
            .status
            .is_some_and(|s| s.common.conditions.iter().any(|c| c.type_ == "Programmed" && c.status == "False"))
    })
    .await;
    assert!(
        !snapshot(&w).locals.iter().any(|a| a.addr.addr() == Ipv4Addr::new(198, 51, 100, 77)),
        "a forged status.ip reached the kernel"
    );
    // Second round, item 20: the in-pod audit (`natgw audit` without -f)
    // reads, as the gateway's own account, the objects as the agent
    // programs them: the forged address is left out there too, and the
    // kernel matches.
    let account = natgw_kube_support::identity::account("demo-gw");
    let gateway = w.env.natgw_client(&account).await.unwrap();
    let set = natgw_agent::snapshot::objects(&gateway, "demo-gw", "natgw-system").await.unwrap();
    let plan = natgw_plan::plan_gateway(&set, "demo-gw").unwrap();
    assert!(plan.conflicts.iter().any(|c| c.object.name == "forged" && c.pending), "{:?}", plan.conflicts);
    assert_eq!(w.kernel.audit(&plan).unwrap(), vec![], "the kernel holds exactly what the audit reads");
    w.kill_agent();
}

/// The agent's /readyz after its first full sync, and its /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agent_reports_readiness_and_metrics() {
    let w = world("health").await;
    create_yaml(&w.admin, &(eip("e", "198.51.100.70") + "---\n" + &fip("f", "e", "10.77.0.11"))).await;
    let addr = w.health.unwrap();
    let get = |path: &'static str| async move {
        tokio::task::spawn_blocking(move || natgw_kube_support::health::get_blocking(addr, path).unwrap())
            .await
            .unwrap()
    };
    eventually("ready", || async { get("/readyz").await.0 == 200 }).await;
    eventually("the FloatingIp counted as programmed", || async {
        get("/metrics").await.1.contains("natgw_objects{kind=\"FloatingIp\",state=\"programmed\"} 1")
    })
    .await;
    let metrics = get("/metrics").await.1;
    for name in [
        "natgw_sync_duration_seconds_count",
        "natgw_last_full_sync_timestamp_seconds",
        "natgw_objects_undecodable_total",
    ] {
        assert!(metrics.contains(name), "{name} in {metrics}");
    }
}

/// Second round, item 22: an agent reads the claims of its own gateway
/// only, found by a label the controller writes. A claim an older
/// controller wrote (no label) is labelled by the next controller, and
/// until then its address is not this agent's to program.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round2_item22_an_agent_reads_only_claims_labelled_with_its_gateway() {
    let mut w = world("claimlabel").await;
    create_yaml(&w.admin, &eip("e", "198.51.100.61")).await;
    let ip = Ipv4Addr::new(198, 51, 100, 61);
    let on_gateway = |w: &World| snapshot(w).locals.iter().any(|a| a.addr.addr() == ip);
    eventually("the claimed address programmed", || async { on_gateway(&w) }).await;
    let claims: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(w.admin.clone(), "natgw-system");
    let name = natgw_kube_support::claims::claim_name(ip);
    let labelled = |cm: &k8s_openapi::api::core::v1::ConfigMap| {
        cm.labels().get(GATEWAY_LABEL).map(String::as_str) == Some("demo-gw")
    };
    assert!(labelled(&claims.get(&name).await.unwrap()), "the claim names its gateway");
    // As an older controller left it: the controller stopped, the label gone.
    for t in w.tasks.drain(..) {
        t.abort();
    }
    let unlabel = serde_json::json!({"metadata": {"labels": {GATEWAY_LABEL: null}}});
    claims.patch(&name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&unlabel)).await.unwrap();
    eventually("a claim outside the agent's selector backs nothing", || async { !on_gateway(&w) }).await;
    // The next controller labels it, and the agent programs the address again.
    let controller = w.env.natgw_client("natgw-controller").await.unwrap();
    w.tasks.push(tokio::spawn(natgw_controller::run(
        controller,
        None,
        "natgw-system".into(),
        natgw_controller::Options::default(),
        std::future::pending(),
    )));
    eventually("the old claim labelled", || async { labelled(&claims.get(&name).await.unwrap()) }).await;
    eventually("the address programmed again", || async { on_gateway(&w) }).await;
    w.kill_agent();
}

/// Second round, item 22: another tenant's VPC and subnets never reach an
/// agent (they would grow every agent with every tenant); its own VPC's
/// subnets and the external subnets do. A VPC whose name begins with this
/// one's, and a subnet of it whose name does, are another tenant's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round2_item22_another_tenants_network_never_reaches_an_agent() {
    let mut w = world("tenantnet").await;
    w.kill_agent();
    let net = "apiVersion: natgw.io/v1alpha1\nkind: Vpc\nmetadata: {name: demo2}\n---\n\
               apiVersion: natgw.io/v1alpha1\nkind: Subnet\nmetadata: {name: demo2-lan}\nspec: {vpc: demo2, cidr: 10.78.0.0/24, gateway: 10.78.0.1}\n---\n\
               apiVersion: natgw.io/v1alpha1\nkind: Subnet\nmetadata: {name: demo-lan2}\nspec: {vpc: demo2, cidr: 10.79.0.0/24, gateway: 10.79.0.1}\n---\n\
               apiVersion: natgw.io/v1alpha1\nkind: Subnet\nmetadata: {name: demo-lan-b}\nspec: {vpc: demo, cidr: 10.77.1.0/24, gateway: 10.77.1.1}\n---\n\
               apiVersion: natgw.io/v1alpha1\nkind: Subnet\nmetadata: {name: external-b}\nspec: {cidr: 203.0.113.0/24, gateway: 203.0.113.1}\n";
    create_yaml(&w.admin, net).await;
    // The controller's last writes to them, then no more writes: what the
    // agent then lists is exactly what its watches select.
    let (vpcs, subnets): (Api<Vpc>, Api<Subnet>) = (Api::all(w.admin.clone()), Api::all(w.admin.clone()));
    eventually("the controller done with the network", || async {
        let listed = |v: Option<Vpc>, want: &[&str]| {
            v.and_then(|v| v.status).is_some_and(|s| want.iter().all(|n| s.subnets.iter().any(|x| x == n)))
        };
        // A Subnet gets the controller's finalizer and nothing else.
        let ready = |s: Option<Subnet>| s.is_some_and(|s| !s.finalizers().is_empty());
        let mut done = listed(vpcs.get_opt("demo").await.unwrap(), &["demo-lan", "demo-lan-b"])
            && listed(vpcs.get_opt("demo2").await.unwrap(), &["demo2-lan", "demo-lan2"]);
        for n in ["demo-lan", "demo-lan-b", "demo2-lan", "demo-lan2", "external", "external-b"] {
            done &= ready(subnets.get_opt(n).await.unwrap());
        }
        done
    })
    .await;
    for t in w.tasks.drain(..) {
        t.abort();
    }
    w.start_agent().await;
    let addr = w.health.unwrap();
    let metrics = move || async move {
        tokio::task::spawn_blocking(move || natgw_kube_support::health::get_blocking(addr, "/metrics").unwrap().1)
            .await
            .unwrap()
    };
    let received = |text: &str, kind: &str| {
        let line = format!("natgw_watch_events_total{{kind=\"{kind}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(line.as_str())).map_or(0, |v| v.trim().parse::<u64>().unwrap())
    };
    eventually("the agent's caches listed", || async {
        let get = move || natgw_kube_support::health::get_blocking(addr, "/readyz").unwrap().0;
        tokio::task::spawn_blocking(get).await.unwrap() == 200
    })
    .await;
    let text = metrics().await;
    assert_eq!(received(&text, "Vpc"), 1, "its own VPC only: {text}");
    assert_eq!(received(&text, "Subnet"), 4, "demo-lan, demo-lan-b, external, external-b: {text}");
    w.kill_agent();
}
