//! The control-plane items of the hardening issue, against a real
//! kube-apiserver with the controller under deploy/rbac.yaml.

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use natgw_api::*;
use natgw_testenv::{TestEnv, apply_yaml, eventually};

fn start(client: Client, options: natgw_controller::Options) -> tokio::task::JoinHandle<()> {
    tokio::spawn(natgw_controller::run(
        client,
        Some("test".into()),
        "natgw-system".into(),
        options,
        std::future::pending(),
    ))
}

struct Stop(tokio::task::JoinHandle<()>);
impl Drop for Stop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn image() -> natgw_controller::Options {
    natgw_controller::Options {
        gateway_pod: natgw_controller::workload::GatewayPod { image: Some("natgw:test".into()), ..Default::default() },
        ..Default::default()
    }
}

async fn setup(crds: &[CustomResourceDefinition]) -> (TestEnv, Client) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let env = TestEnv::start().await.expect("control plane");
    let admin = env.install_natgw(crds).await.unwrap();
    (env, admin)
}

async fn create<K: natgw_testenv::ClusterObject>(client: &Client, name: &str, spec: serde_json::Value) {
    natgw_testenv::create_spec::<K>(client, name, spec).await.unwrap();
}

async fn network(admin: &Client, gateways: &[&str]) {
    create::<Vpc>(admin, "v", serde_json::json!({})).await;
    let ext =
        serde_json::json!({"cidr": "192.0.2.0/24", "gateway": "192.0.2.1", "excludeIps": ["192.0.2.2..192.0.2.9"]});
    create::<Subnet>(admin, "ext", ext).await;
    for gw in gateways {
        let spec = serde_json::json!({"vpc": "v", "lanInterface": "eth0", "externalInterface": "net1",
                                      "externalSubnet": "ext", "externalNetwork": "kube-system/ext"});
        create::<NatGateway>(admin, gw, spec).await;
    }
}

async fn warned(admin: &Client, reason: &str, about: &str) -> bool {
    let events: Api<Event> = Api::all(admin.clone());
    events.list(&Default::default()).await.unwrap().items.iter().any(|e| {
        e.reason.as_deref() == Some(reason) && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(about)
    })
}

/// The CRDs as they were before the CEL rules on IPs: every
/// x-kubernetes-validations removed.
fn without_cel() -> Vec<CustomResourceDefinition> {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("x-kubernetes-validations");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    crds()
        .into_iter()
        .map(|c| {
            let mut v = serde_json::to_value(c).unwrap();
            strip(&mut v);
            serde_json::from_value(v).unwrap()
        })
        .collect()
}

#[tokio::test]
async fn item7_an_object_natgw_cannot_decode_does_not_freeze_the_controller() {
    let (env, admin) = setup(&without_cel()).await;
    // Accepted by `format: ipv4`, refused by Rust's parser.
    let odd = serde_json::json!({
        "apiVersion": "natgw.io/v1alpha1", "kind": "Eip", "metadata": {"name": "odd"},
        "spec": {"gateway": "gw", "ip": "192.000.2.10"},
    });
    let ar = kube::api::ApiResource::erase::<Eip>(&());
    let dynamic: Api<kube::api::DynamicObject> = Api::all_with(admin.clone(), &ar);
    dynamic.create(&Default::default(), &serde_json::from_value(odd).unwrap()).await.unwrap();
    // Today's CRDs do not touch what is stored.
    let api: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for crd in crds() {
        api.patch(&crd.name_any(), &PatchParams::apply("test").force(), &Patch::Apply(&crd)).await.unwrap();
    }
    let _c = Stop(start(env.natgw_client("natgw-controller").await.unwrap(), image()));
    create::<Vpc>(&admin, "v", serde_json::json!({})).await;
    let subnet = serde_json::json!({"vpc": "v", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"});
    create::<Subnet>(&admin, "s", subnet).await;
    let vpcs: Api<Vpc> = Api::all(admin.clone());
    eventually("the controller works: membership of the VPC", || async {
        vpcs.get("v").await.unwrap().status.is_some_and(|s| s.subnets == ["s"])
    })
    .await;
    eventually("a Warning Event on the undecodable object", || warned(&admin, "Undecodable", "odd")).await;
}

#[tokio::test]
async fn item8_long_gateway_names_sharing_a_prefix_get_their_own_workloads() {
    let (env, admin) = setup(&crds()).await;
    let _c = Stop(start(env.natgw_client("natgw-controller").await.unwrap(), image()));
    let a = format!("{}-a", "long".repeat(14));
    let b = format!("{}-b", "long".repeat(14));
    network(&admin, &[&a, &b]).await;
    let (wa, wb) = (natgw_controller::workload::name(&a), natgw_controller::workload::name(&b));
    assert_ne!(wa, wb);
    let sts: Api<StatefulSet> = Api::namespaced(admin.clone(), "natgw-system");
    eventually("two workloads", || async {
        sts.get_opt(&wa).await.unwrap().is_some() && sts.get_opt(&wb).await.unwrap().is_some()
    })
    .await;
    // A deleted workload comes back.
    sts.delete(&wa, &DeleteParams::default()).await.unwrap();
    eventually("the workload recreated", || async {
        sts.get_opt(&wa).await.unwrap().is_some_and(|s| s.metadata.deletion_timestamp.is_none())
    })
    .await;
    // Deleting one gateway leaves the other's workload alone.
    let gws: Api<NatGateway> = Api::all(admin.clone());
    gws.delete(&a, &DeleteParams::default()).await.unwrap();
    eventually("a's workload gone", || async { gws.get_opt(&a).await.unwrap().is_none() }).await;
    eventually("a's StatefulSet gone", || async { sts.get_opt(&wa).await.unwrap().is_none() }).await;
    assert!(sts.get_opt(&wb).await.unwrap().is_some(), "b's workload survives");
}

#[tokio::test]
async fn item9_a_fixed_ip_inside_an_exclusion_is_refused_with_a_condition() {
    let (env, admin) = setup(&crds()).await;
    let _c = Stop(start(env.natgw_client("natgw-controller").await.unwrap(), image()));
    network(&admin, &["gw"]).await;
    create::<Eip>(&admin, "fenced", serde_json::json!({"gateway": "gw", "ip": "192.0.2.5"})).await;
    create::<Eip>(&admin, "free", serde_json::json!({"gateway": "gw"})).await;
    let eips: Api<Eip> = Api::all(admin.clone());
    eventually("AddressAssigned=False naming the exclusion", || async {
        let e = eips.get("fenced").await.unwrap();
        e.status.is_some_and(|s| {
            s.ip.is_none()
                && s.common.conditions.iter().any(|c| {
                    c.type_ == "AddressAssigned" && c.reason == "AddressRefused" && c.message.contains("excludeIps")
                })
        })
    })
    .await;
    eventually("the allocated address skips the exclusion", || async {
        eips.get("free").await.unwrap().status.and_then(|s| s.ip) == Some("192.0.2.10".parse().unwrap())
    })
    .await;
    assert!(warned(&admin, "AddressRefused", "fenced").await);
}

/// An Eip `e` and a FloatingIp `f` on gateway `gw`, carrying the agent's
/// finalizer as an agent that ran once would have left it.
async fn programmed_by_an_agent(admin: &Client) {
    create::<Eip>(admin, "e", serde_json::json!({"gateway": "gw", "ip": "192.0.2.20"})).await;
    create::<FloatingIp>(admin, "f", serde_json::json!({"eip": "e", "internalIp": "10.0.0.5"})).await;
    let fin = gateway_finalizer("gw");
    let eips: Api<Eip> = Api::all(admin.clone());
    let fips: Api<FloatingIp> = Api::all(admin.clone());
    let gws: Api<NatGateway> = Api::all(admin.clone());
    // The gateway's too: an agent runs only for a gateway the controller
    // took in. Without it, a loaded controller may not have reached the
    // gateway yet, its deletion is immediate, and its objects are released
    // as those of a gateway gone for good (no AgentUnavailable Event).
    eventually("the controller's finalizers", || async {
        !eips.get("e").await.unwrap().finalizers().is_empty()
            && !fips.get("f").await.unwrap().finalizers().is_empty()
            && !gws.get("gw").await.unwrap().finalizers().is_empty()
    })
    .await;
    for (name, kind) in [("e", "eips"), ("f", "floatingips")] {
        let patch = serde_json::json!({"metadata": {"finalizers": [natgw_controller::FINALIZER, fin]}});
        let pp = PatchParams::default();
        match kind {
            "eips" => eips.patch(name, &pp, &Patch::Merge(&patch)).await.map(drop),
            _ => fips.patch(name, &pp, &Patch::Merge(&patch)).await.map(drop),
        }
        .unwrap();
    }
}

async fn delete_all(admin: &Client) {
    let dp = DeleteParams::default();
    Api::<FloatingIp>::all(admin.clone()).delete("f", &dp).await.unwrap();
    Api::<Eip>::all(admin.clone()).delete("e", &dp).await.unwrap();
    Api::<NatGateway>::all(admin.clone()).delete("gw", &dp).await.unwrap();
}

/// A controller releasing abandoned gateways after `release_after`, and
/// gateway `gw` with objects its agent programmed.
async fn abandoned_gateway(release_after: Duration) -> (TestEnv, Client, Stop) {
    let (env, admin) = setup(&crds()).await;
    let options = natgw_controller::Options { release_after, ..image() };
    let c = Stop(start(env.natgw_client("natgw-controller").await.unwrap(), options));
    network(&admin, &["gw"]).await;
    programmed_by_an_agent(&admin).await;
    (env, admin, c)
}

#[tokio::test]
async fn item12_a_gateway_whose_agent_never_runs_can_still_be_deleted() {
    let (_env, admin, _c) = abandoned_gateway(Duration::from_secs(2)).await;
    delete_all(&admin).await;
    let (eips, fips, gws): (Api<Eip>, Api<FloatingIp>, Api<NatGateway>) =
        (Api::all(admin.clone()), Api::all(admin.clone()), Api::all(admin.clone()));
    eventually("everything gone", || async {
        fips.get_opt("f").await.unwrap().is_none()
            && eips.get_opt("e").await.unwrap().is_none()
            && gws.get_opt("gw").await.unwrap().is_none()
    })
    .await;
    // The Event follows the release: the object may be gone first.
    eventually("an Event says why the finalizer went", || warned(&admin, "AgentUnavailable", "f")).await;
}

/// Second round, item 11: a gateway pod that is there but not ready (its
/// node stopped answering, its probe fails) may still answer ARP for its
/// EIPs. The release waits until the pod object is gone, and says so,
/// so that no address is handed to a new Eip while the old pod holds it.
#[tokio::test]
async fn round2_item11_a_pod_that_may_hold_the_addresses_holds_the_release_until_it_is_gone() {
    let (_env, admin, _c) = abandoned_gateway(Duration::from_secs(1)).await;
    // What a kubelet that stopped answering leaves: a Node, and on it the
    // gateway's pod, Running, not ready.
    apply_yaml(&admin, "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {}\n").await.unwrap();
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: natgw-gw-gw-0\n  namespace: natgw-system\n  labels: \
               {app.kubernetes.io/name: natgw-gateway, natgw.io/gateway: gw}\n\
               spec:\n  nodeName: n1\n  containers: [{name: agent, image: natgw}]\n";
    apply_yaml(&admin, pod).await.unwrap();
    delete_all(&admin).await;
    eventually("an Event names the pod the release waits for", || warned(&admin, "ReleaseWaitsForPod", "gw")).await;
    let eips: Api<Eip> = Api::all(admin.clone());
    let e = eips.get("e").await.unwrap();
    assert!(e.finalizers().contains(&gateway_finalizer("gw")), "released while the pod may hold the address");
    // The pod goes (force-deleted by an operator, or evicted once its node
    // is gone): the release follows.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(admin.clone(), "natgw-system");
    pods.delete("natgw-gw-gw-0", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await.unwrap();
    eventually("released once the pod is gone", || async { eips.get_opt("e").await.unwrap().is_none() }).await;
}

/// Item 14: an idle controller lists nothing; it works from its caches.
#[tokio::test]
async fn item14_an_idle_controller_sends_no_lists() {
    let (env, admin) = setup(&crds()).await;
    let _c = Stop(start(env.natgw_client("natgw-controller").await.unwrap(), image()));
    network(&admin, &["gw"]).await;
    create::<Eip>(&admin, "e", serde_json::json!({"gateway": "gw"})).await;
    let eips: Api<Eip> = Api::all(admin.clone());
    eventually("the Eip allocated", || async { eips.get("e").await.unwrap().status.and_then(|s| s.ip).is_some() })
        .await;
    // LIST counts per resource, so that a failure names what was listed.
    let lists = || async {
        let text = admin.request_text(http::Request::get("/metrics").body(Vec::new()).unwrap()).await.unwrap();
        let mut by = std::collections::BTreeMap::<String, f64>::new();
        for l in text.lines().filter(|l| l.starts_with("apiserver_request_total{") && l.contains("verb=\"LIST\"")) {
            let Some(r) = ["natgateways", "eips", "floatingips", "snatrules", "dnatrules", "configmaps"]
                .into_iter()
                .find(|r| l.contains(&format!("resource=\"{r}\"")))
            else {
                continue;
            };
            *by.entry(r.to_string()).or_default() += l.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0.0);
        }
        by
    };
    // Idle starts once start-up settled: watches that begin later (and
    // their first lists) on a loaded machine come before it. Settled is
    // three looks a second apart that agree.
    let mut before = lists().await;
    let mut same = 0;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = lists().await;
        same = if now == before { same + 1 } else { 0 };
        before = now;
        if same == 3 {
            break;
        }
    }
    assert!(before.values().sum::<f64>() > 0.0, "the API server's metrics count the controller's first lists");
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(lists().await, before, "lists while idle");
}

/// Item 10: a NatGateway stored before the route rules existed says what
/// is wrong in a condition; its workload is still applied.
#[tokio::test]
async fn item10_an_invalid_route_is_a_condition_never_a_failing_loop() {
    let (env, admin) = setup(&without_cel()).await;
    let _c = Stop(start(env.natgw_client("natgw-controller").await.unwrap(), image()));
    create::<Vpc>(&admin, "v", serde_json::json!({})).await;
    create::<Subnet>(&admin, "ext", serde_json::json!({"cidr": "192.0.2.0/24", "gateway": "192.0.2.1"})).await;
    let spec = serde_json::json!({"vpc": "v", "lanInterface": "eth0", "externalInterface": "net1", "externalSubnet": "ext",
                                  "externalNetwork": "kube-system/ext", "routes": [{"cidr": "10.9.0.1/16", "nextHop": "10.0.0.254"}]});
    create::<NatGateway>(&admin, "gw", spec).await;
    let gws: Api<NatGateway> = Api::all(admin.clone());
    // The workload is applied: without Multus here, the condition names
    // the missing NetworkAttachmentDefinition, never the route.
    eventually("Valid=False naming the route, the workload applied", || async {
        let conditions = gws.get("gw").await.unwrap().status.unwrap_or_default().conditions;
        conditions
            .iter()
            .any(|c| c.type_ == "Valid" && c.status == "False" && c.message.contains("spec.routes[0].cidr"))
            && conditions.iter().any(|c| c.type_ == "WorkloadReady" && c.reason == "NetworkMissing")
    })
    .await;
    assert!(warned(&admin, "InvalidSpec", "gw").await);
}

/// `image()`'s options, with their /readyz and /metrics served on a port
/// of loopback.
async fn serving() -> (natgw_controller::Options, std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let options = image();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(natgw_kube_support::health::serve(listener, options.health.probe.clone()));
    (options, addr, server)
}

/// The controller's /readyz once its caches listed, and its /metrics.
#[tokio::test]
async fn the_controller_reports_readiness_and_metrics() {
    let (env, _admin) = setup(&crds()).await;
    let (options, addr, server) = serving().await;
    let _c = Stop(start(env.natgw_client("natgw-controller").await.unwrap(), options));
    let get = |path: &'static str| async move {
        tokio::task::spawn_blocking(move || natgw_kube_support::health::get_blocking(addr, path).unwrap())
            .await
            .unwrap()
    };
    eventually("ready once the caches listed", || async { get("/readyz").await.0 == 200 }).await;
    let metrics = get("/metrics").await.1;
    assert!(metrics.contains("natgw_leader") && metrics.contains("natgw_objects_undecodable_total"), "{metrics}");
    server.abort();
}

/// `kubectl get eips` shows who uses each Eip (status.usedBy), and it
/// follows the rules as they come and go.
#[tokio::test]
async fn an_eips_users_show_in_its_status_and_follow_the_rules() {
    let (env, admin) = setup(&crds()).await;
    let _c = Stop(start(env.natgw_client("natgw-controller").await.unwrap(), image()));
    network(&admin, &["gw"]).await;
    create::<Subnet>(&admin, "lan", serde_json::json!({"vpc": "v", "cidr": "10.77.0.0/24", "gateway": "10.77.0.1"}))
        .await;
    create::<Eip>(&admin, "e", serde_json::json!({"gateway": "gw"})).await;
    create::<FloatingIp>(&admin, "f", serde_json::json!({"eip": "e", "internalIp": "10.77.0.11"})).await;
    create::<DnatRule>(
        &admin,
        "d",
        serde_json::json!({"eip": "e", "protocol": "tcp", "externalPort": 80,
                                                       "internalIp": "10.77.0.12", "internalPort": 8080}),
    )
    .await;
    let eips: Api<Eip> = Api::all(admin.clone());
    let used_by = || async { eips.get("e").await.unwrap().status.and_then(|s| s.used_by).unwrap_or_default() };
    eventually("both rules named", || async { used_by().await == "DnatRule/d, FloatingIp/f" }).await;
    Api::<FloatingIp>::all(admin.clone()).delete("f", &DeleteParams::default()).await.unwrap();
    eventually("the deleted rule gone from usedBy", || async { used_by().await == "DnatRule/d" }).await;
}

/// An Eip told its subnet is full takes the first address let go, and
/// the room a subnet's edit makes, without polling for it: the retry of
/// a waiting Eip is five minutes, longer than `eventually` waits.
#[tokio::test]
async fn an_eip_waiting_on_a_full_subnet_is_woken_by_a_release_and_by_an_edit() {
    let (env, admin) = setup(&crds()).await;
    let _c = Stop(start(env.natgw_client("natgw-controller").await.unwrap(), image()));
    create::<Vpc>(&admin, "v", serde_json::json!({})).await;
    // A /29: .1 routes, .2 is fenced off, .3 to .6 can be held.
    let tiny = serde_json::json!({"cidr": "192.0.2.0/29", "gateway": "192.0.2.1", "excludeIps": ["192.0.2.2"]});
    create::<Subnet>(&admin, "tiny", tiny).await;
    let gw = serde_json::json!({"vpc": "v", "lanInterface": "eth0", "externalInterface": "net1",
                                "externalSubnet": "tiny", "externalNetwork": "kube-system/ext"});
    create::<NatGateway>(&admin, "gw", gw).await;
    let eips: Api<Eip> = Api::all(admin.clone());
    let ip = |name: &'static str| {
        let eips = eips.clone();
        async move { eips.get_opt(name).await.unwrap().and_then(|e| e.status).and_then(|s| s.ip) }
    };
    let full = |name: &'static str| {
        let eips = eips.clone();
        async move {
            eips.get(name).await.unwrap().status.is_some_and(|s| {
                s.common.conditions.iter().any(|c| c.type_ == "AddressAssigned" && c.reason == "SubnetExhausted")
            })
        }
    };
    for name in ["e3", "e4", "e5", "e6"] {
        create::<Eip>(&admin, name, serde_json::json!({"gateway": "gw"})).await;
    }
    eventually("the four addresses held", || async {
        futures::future::join_all(["e3", "e4", "e5", "e6"].map(ip)).await.iter().all(Option::is_some)
    })
    .await;
    create::<Eip>(&admin, "late", serde_json::json!({"gateway": "gw"})).await;
    eventually("SubnetExhausted on the fifth", || full("late")).await;
    assert!(warned(&admin, "SubnetExhausted", "late").await);

    let freed = ip("e4").await.unwrap();
    eips.delete("e4", &DeleteParams::default()).await.unwrap();
    eventually("the address e4 let go held by the waiting Eip", || async { ip("late").await == Some(freed) }).await;

    create::<Eip>(&admin, "later", serde_json::json!({"gateway": "gw"})).await;
    eventually("SubnetExhausted on the next", || full("later")).await;
    let subnets: Api<Subnet> = Api::all(admin.clone());
    let open = serde_json::json!({"spec": {"excludeIps": []}});
    subnets.patch("tiny", &PatchParams::default(), &Patch::Merge(&open)).await.unwrap();
    eventually("the address the edit freed held by the waiting Eip", || async {
        ip("later").await == Some("192.0.2.2".parse().unwrap())
    })
    .await;
}

/// Second round, item 18 (its skew half): gateways update `OnDelete`, so
/// after an upgrade a gateway keeps its old agent until its pod is
/// deleted. Each gateway says so: `ImageCurrent=False` naming the pod and
/// both images, and `natgw_gateway_image_skew{gateway}` is 1 until the
/// pod runs the image asked for.
#[tokio::test]
async fn round2_item18_a_gateway_whose_pod_runs_an_old_image_says_so() {
    let (env, admin) = setup(&crds()).await;
    let (options, addr, server) = serving().await;
    let _c = Stop(start(env.natgw_client("natgw-controller").await.unwrap(), options));
    // Multus's kind and the network the gateway names: the workload then
    // gets as far as its pod.
    let nad_crd = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: network-attachment-definitions.k8s.cni.cncf.io}\n\
                   spec:\n  group: k8s.cni.cncf.io\n  scope: Namespaced\n  names: {plural: network-attachment-definitions, singular: network-attachment-definition, kind: NetworkAttachmentDefinition}\n\
                   \x20 versions: [{name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}}]\n";
    apply_yaml(&admin, nad_crd).await.unwrap();
    let nad = "apiVersion: k8s.cni.cncf.io/v1\nkind: NetworkAttachmentDefinition\nmetadata: {name: ext, namespace: kube-system}\nspec: {config: '{}'}\n";
    eventually("the NetworkAttachmentDefinition stored", || async { apply_yaml(&admin, nad).await.is_ok() }).await;
    network(&admin, &["gw"]).await;
    let pod = |image: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: natgw-gw-gw-0\n  namespace: natgw-system\n  labels: \
             {{app.kubernetes.io/name: natgw-gateway, natgw.io/gateway: gw}}\n\
             spec:\n  containers: [{{name: agent, image: '{image}'}}]\n"
        )
    };
    apply_yaml(&admin, &pod("natgw:old")).await.unwrap();
    let gws: Api<NatGateway> = Api::all(admin.clone());
    let image_current = || async {
        let conditions = gws.get("gw").await.unwrap().status.unwrap_or_default().conditions;
        conditions.into_iter().find(|c| c.type_ == "ImageCurrent").map(|c| (c.status, c.message))
    };
    eventually("ImageCurrent=False naming the pod and both images", || async {
        image_current().await.is_some_and(|(s, m)| {
            s == "False" && m.contains("natgw-gw-gw-0 runs natgw:old") && m.contains("asks for natgw:test")
        })
    })
    .await;
    // The Event follows the condition's write.
    eventually("a Warning Event says it too", || warned(&admin, "ImageSkew", "gw")).await;
    let skew = || async move {
        let text = tokio::task::spawn_blocking(move || natgw_kube_support::health::get_blocking(addr, "/metrics"))
            .await
            .unwrap()
            .unwrap()
            .1;
        text.lines().find(|l| l.starts_with("natgw_gateway_image_skew{gateway=\"gw\"}")).map(|l| l.ends_with(" 1"))
    };
    assert_eq!(skew().await, Some(true));
    // The operator deletes the pod; the new one runs the new image.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(admin.clone(), "natgw-system");
    pods.delete("natgw-gw-gw-0", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await.unwrap();
    eventually("the old pod gone", || async { pods.get_opt("natgw-gw-gw-0").await.unwrap().is_none() }).await;
    apply_yaml(&admin, &pod("natgw:test")).await.unwrap();
    eventually("ImageCurrent=True", || async { image_current().await.is_some_and(|(s, _)| s == "True") }).await;
    assert_eq!(skew().await, Some(false));
    server.abort();
}

/// Second round, item 18 (its CRD half): `helm upgrade` never updates a
/// chart's `crds/`, so a CEL rule added in a release never reached an
/// upgraded cluster. The leading controller applies its own CRDs: on a
/// cluster that holds the CRDs of before the CEL rules, a write the old
/// CRD let in is refused once the controller leads.
#[tokio::test]
async fn round2_item18_the_leader_brings_older_crds_up_to_its_own() {
    let (env, admin) = setup(&without_cel()).await;
    let subnets: Api<Subnet> = Api::all(admin.clone());
    let dry = kube::api::PostParams { dry_run: true, ..Default::default() };
    let outside: Subnet = natgw_testenv::natgw_object(
        "Subnet",
        "outside",
        serde_json::json!({"cidr": "192.0.2.0/24", "gateway": "198.51.100.1"}),
    )
    .unwrap();
    subnets.create(&dry, &outside).await.expect("the old CRD lets a gateway outside its subnet in");
    let options = natgw_controller::Options { apply_crds: true, ..image() };
    let _c = Stop(start(env.natgw_client("natgw-controller").await.unwrap(), options));
    eventually("the new rule in force", || async {
        subnets
            .create(&dry, &outside)
            .await
            .is_err_and(|e| e.to_string().contains("spec.gateway must lie inside spec.cidr"))
    })
    .await;
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let managers: Vec<String> = crds
        .get("subnets.natgw.io")
        .await
        .unwrap()
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(managers.iter().any(|m| m == "natgw-controller/crds"), "{managers:?}");
}
