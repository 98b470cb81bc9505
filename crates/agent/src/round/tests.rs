//! Rounds against an in-memory API server and kernel. Random sequences of
//! what a cluster does (objects created, changed, deleted and released by
//! the controller; watch events arriving late or all at once; failed
//! writes; sweeps that have not settled; resyncs) run through incremental
//! rounds. Throughout, a finalizer comes before the kernel holds an object
//! and goes only once it no longer does; whenever the events settle, the
//! kernel and the API objects are where a full round from scratch would
//! leave them: it programs the same plan and writes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kube::runtime::watcher::Event;
use natgw_api::*;
use natgw_dataplane::{SweepDone, SyncError, SyncReport};
use natgw_kube_support::KindResource;
use natgw_plan::GatewayPlan;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::claims::Claims;
use crate::dirty::{DirtyCell, mark_one};
use crate::store::Store;

const GW: &str = "gw";
const EIPS: u8 = 4;
const PORTS: [u16; 2] = [80, 443];

fn eip_ip(i: u8) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(192, 0, 2, 10 + i)
}

/// The API server: objects as JSON, each write a new resourceVersion, and
/// what changed since the caches last heard.
#[derive(Clone, Default)]
struct Server {
    objects: BTreeMap<ObjectRef, Value>,
    /// The last state of a deleted object, for its watch event.
    tombstones: BTreeMap<ObjectRef, Value>,
    version: u64,
    unheard: BTreeSet<ObjectRef>,
    /// Writes the agent made.
    writes: usize,
}

fn finalizers(v: &Value) -> Vec<String> {
    v["metadata"]["finalizers"].as_array().into_iter().flatten().filter_map(|f| f.as_str().map(String::from)).collect()
}

fn conflict(what: &str) -> kube::Error {
    kube::Error::Api(kube::core::Status::failure(what, "Conflict").with_code(409).boxed())
}

impl Server {
    fn bump(&mut self, r: &ObjectRef) {
        self.version += 1;
        let v = self.version.to_string();
        if let Some(o) = self.objects.get_mut(r) {
            o["metadata"]["resourceVersion"] = json!(v);
        }
        self.unheard.insert(r.clone());
    }

    fn remove(&mut self, r: &ObjectRef) {
        if let Some(o) = self.objects.remove(r) {
            self.tombstones.insert(r.clone(), o);
        }
        self.unheard.insert(r.clone());
    }

    /// Creates `r` with `spec`, or changes its spec (a new generation).
    fn put(&mut self, r: &ObjectRef, spec: Value, labels: Value) {
        match self.objects.get_mut(r) {
            Some(o) if o["metadata"]["deletionTimestamp"].is_string() => return,
            Some(o) => {
                if o["spec"] == spec && o["metadata"]["labels"] == labels {
                    return;
                }
                if o["spec"] != spec {
                    let g = o["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                    o["metadata"]["generation"] = json!(g);
                }
                o["spec"] = spec;
                o["metadata"]["labels"] = labels;
            }
            None => {
                let o = json!({
                    "apiVersion": "natgw.io/v1alpha1",
                    "kind": r.kind.to_string(),
                    "metadata": {
                        "name": r.name.as_str(), "uid": format!("uid-{}", r.name), "generation": 1,
                        "finalizers": [CONTROLLER_FINALIZER], "labels": labels,
                    },
                    "spec": spec,
                });
                self.objects.insert(r.clone(), o);
            }
        }
        self.bump(r);
    }

    /// `kubectl delete`: gone at once without finalizers, else marked.
    fn delete(&mut self, r: &ObjectRef) {
        let Some(o) = self.objects.get_mut(r) else { return };
        if finalizers(o).is_empty() {
            return self.remove(r);
        }
        if o["metadata"]["deletionTimestamp"].is_string() {
            return;
        }
        o["metadata"]["deletionTimestamp"] = json!("2026-12-07T00:00:00Z");
        self.bump(r);
    }

    /// The controller releases a deleted object to the agents.
    fn release(&mut self, r: &ObjectRef) {
        let Some(o) = self.objects.get(r) else { return };
        if !o["metadata"]["deletionTimestamp"].is_string() {
            return;
        }
        let keep: Vec<String> = finalizers(o).into_iter().filter(|f| f != CONTROLLER_FINALIZER).collect();
        self.set_finalizers(r, keep);
    }

    fn set_finalizers(&mut self, r: &ObjectRef, list: Vec<String>) {
        let Some(o) = self.objects.get_mut(r) else { return };
        let deleting = o["metadata"]["deletionTimestamp"].is_string();
        if deleting && list.is_empty() {
            return self.remove(r);
        }
        o["metadata"]["finalizers"] = json!(list);
        self.bump(r);
    }

    fn has_finalizer(&self, r: &ObjectRef) -> bool {
        self.objects.get(r).is_some_and(|o| finalizers(o).iter().any(|f| *f == finalizer(GW)))
    }
}

/// The kernel: the plan it holds, and whether the sweep of its last change
/// settled. It checks the first half of the finalizer rule: everything it
/// is given carries the agent's finalizer on the server.
struct FakeKernel {
    server: Arc<Mutex<Server>>,
    plan: Mutex<Option<GatewayPlan>>,
    swept: AtomicBool,
    /// A violation seen, for the property to report (a panic here would
    /// be lost in a blocking task).
    broken: Mutex<Option<String>>,
}

impl FakeKernel {
    fn new(server: Arc<Mutex<Server>>) -> FakeKernel {
        FakeKernel { server, plan: Mutex::new(None), swept: AtomicBool::new(true), broken: Mutex::new(None) }
    }

    fn holds(&self, r: &ObjectRef) -> bool {
        self.plan.lock().unwrap().as_ref().is_some_and(|p| p.programmed.contains(r))
    }
}

impl Kernel for FakeKernel {
    fn program(&self, plan: &GatewayPlan, _read_kernel: bool) -> Result<SyncReport, SyncError> {
        let server = self.server.lock().unwrap();
        if let Some(r) = plan.programmed.iter().find(|r| r.kind != Kind::NatGateway && !server.has_finalizer(r)) {
            *self.broken.lock().unwrap() = Some(format!("{r} programmed without the agent's finalizer"));
        }
        let mut have = self.plan.lock().unwrap();
        let dropped = have.as_ref().is_some_and(|h| h.programmed.iter().any(|r| !plan.programmed.contains(r)));
        if dropped {
            // Flows through what went must be swept before it is released.
            self.swept.store(false, Ordering::SeqCst);
        }
        let changed = have.as_ref() != Some(plan);
        *have = Some(plan.clone());
        Ok(SyncReport { changed, ..Default::default() })
    }
    fn release_plan(&self) {}
    fn sweep_in_background(&self, _done: SweepDone) {}
    fn swept(&self) -> bool {
        self.swept.load(Ordering::SeqCst)
    }
}

/// The API writes, against `Server`. It checks the second half of the
/// finalizer rule: the agent's finalizer goes only when the kernel no
/// longer holds the object and its flows are swept.
struct FakeApi {
    server: Arc<Mutex<Server>>,
    kernel: Arc<FakeKernel>,
    failing: AtomicBool,
}

impl Writes for FakeApi {
    async fn set_finalizers(&self, e: &Entry, list: Vec<String>) -> Result<(), kube::Error> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(conflict("the API server is failing writes"));
        }
        let mut server = self.server.lock().unwrap();
        let Some(o) = server.objects.get(&e.object) else { return Err(conflict("gone")) };
        if o["metadata"]["resourceVersion"].as_str() != e.resource_version() {
            return Err(conflict("the object has been modified"));
        }
        let fin = finalizer(GW);
        if finalizers(o).contains(&fin) && !list.contains(&fin) {
            let why = if self.kernel.holds(&e.object) {
                Some("while the kernel holds it")
            } else if !self.kernel.swept() {
                Some("before its flows were swept")
            } else {
                None
            };
            if let Some(why) = why {
                *self.kernel.broken.lock().unwrap() = Some(format!("{} released {why}", e.object));
            }
        }
        server.writes += 1;
        server.set_finalizers(&e.object, list);
        Ok(())
    }

    async fn apply_status(&self, r: &ObjectRef, status: Value) -> Result<(), kube::Error> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(conflict("the API server is failing writes"));
        }
        let mut server = self.server.lock().unwrap();
        let Some(o) = server.objects.get_mut(r) else { return Err(conflict("gone")) };
        // Server-side apply: the agent's conditions replace its own, by type.
        let new = status["conditions"].as_array().cloned().unwrap_or_default();
        let types: Vec<&Value> = new.iter().map(|c| &c["type"]).collect();
        let mut conditions: Vec<Value> = o["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| !types.contains(&&c["type"]))
            .cloned()
            .collect();
        conditions.extend(new);
        o["status"] = json!({ "conditions": conditions, "observedGeneration": status["observedGeneration"] });
        server.writes += 1;
        server.bump(r);
        Ok(())
    }
}

/// Delivers what changed on the server to the caches, as the watches
/// would, and marks it for the next round.
fn hear(caches: &Caches, server: &mut Server, only: Option<usize>) {
    let unheard: Vec<ObjectRef> = server.unheard.iter().take(only.unwrap_or(usize::MAX)).cloned().collect();
    for r in unheard {
        server.unheard.remove(&r);
        let (v, gone) = match server.objects.get(&r) {
            Some(v) => (v.clone(), false),
            None => (server.tombstones[&r].clone(), true),
        };
        match r.kind {
            Kind::Eip => deliver(&caches.eips, v, gone),
            Kind::FloatingIp => deliver(&caches.fips, v, gone),
            Kind::SnatRule => deliver(&caches.snats, v, gone),
            Kind::DnatRule => deliver(&caches.dnats, v, gone),
            _ => unreachable!("the test writes no other kind"),
        }
        mark_one(&caches.dirty, r);
    }
}

fn deliver<K: KindResource + Project + serde::de::DeserializeOwned>(store: &Store<K>, v: Value, gone: bool) {
    let o: K = serde_json::from_value(v).expect("the test's objects are valid");
    store.apply(if gone { Event::Delete(o) } else { Event::Apply(o) });
}

fn typed<K: serde::de::DeserializeOwned>(v: Value) -> K {
    serde_json::from_value(v).expect("the test's objects are valid")
}

/// Caches holding gateway `gw`, its VPC and subnets, and the claims of
/// Eips e0..e3 (each its own address).
fn caches() -> Caches {
    let meta = |name: &str| json!({ "name": name, "resourceVersion": "1", "generation": 1 });
    let claims = (0..EIPS).map(|i| {
        let holder = natgw_kube_support::claims::Holder { eip: format!("e{i}"), uid: format!("uid-e{i}") };
        (eip_ip(i), holder)
    });
    let caches = Caches {
        claims: Claims::listed(claims.collect()),
        vpcs: Store::listed([]),
        subnets: Store::listed([]),
        externals: Store::listed([]),
        gateways: Store::listed([]),
        eips: Store::listed([]),
        fips: Store::listed([]),
        snats: Store::listed([]),
        dnats: Store::listed([]),
        dirty: DirtyCell::default(),
    };
    caches.vpcs.apply(Event::Apply(typed::<Vpc>(json!({"metadata": meta("vpc"), "spec": {}}))));
    caches.subnets.apply(Event::Apply(typed::<Subnet>(json!({
        "metadata": meta("lan"), "spec": {"vpc": "vpc", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"}
    }))));
    caches.externals.apply(Event::Apply(typed::<Subnet>(json!({
        "metadata": meta("ext"), "spec": {"cidr": "192.0.2.0/24", "gateway": "192.0.2.1"}
    }))));
    caches.gateways.apply(Event::Apply(typed::<NatGateway>(json!({
        "metadata": meta(GW),
        "spec": {"vpc": "vpc", "lanInterface": "lan0", "externalInterface": "ext0", "externalSubnet": "ext"}
    }))));
    caches
}

#[derive(Clone, Debug)]
enum Step {
    /// An Eip of this gateway or another, with or without its address.
    Eip {
        i: u8,
        other: bool,
        ip: bool,
    },
    Fip {
        i: u8,
        eip: u8,
        internal: u8,
    },
    Snat {
        i: u8,
        eip: u8,
        cidr: u8,
    },
    Dnat {
        i: u8,
        eip: u8,
        port: u8,
        internal: u8,
    },
    Delete {
        kind: u8,
        i: u8,
    },
    /// The controller lets the agents have a deleted object.
    Release {
        kind: u8,
        i: u8,
    },
    /// The watches deliver some of what changed, or all of it.
    Hear {
        some: Option<usize>,
    },
    Round {
        resync: bool,
    },
    /// The sweep of the last change settled.
    Swept,
    /// The API server fails every write, or stops failing.
    Failing(bool),
    /// Everything is heard and rounds run until nothing changes; then the
    /// comparison with a full round from scratch.
    Settle,
}

const KINDS: [Kind; 4] = [Kind::Eip, Kind::FloatingIp, Kind::SnatRule, Kind::DnatRule];

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (0..EIPS, any::<bool>(), prop::bool::weighted(0.8))
            .prop_map(|(i, other, ip)| Step::Eip { i, other: other && i == 3, ip }),
        3 => (0..4u8, 0..EIPS, 0..4u8).prop_map(|(i, eip, internal)| Step::Fip { i, eip, internal }),
        2 => (0..3u8, 0..EIPS, 0..4u8).prop_map(|(i, eip, cidr)| Step::Snat { i, eip, cidr }),
        2 => (0..3u8, 0..EIPS, 0..2u8, 0..4u8).prop_map(|(i, eip, port, internal)| Step::Dnat { i, eip, port, internal }),
        2 => (0..4u8, 0..4u8).prop_map(|(kind, i)| Step::Delete { kind, i }),
        2 => (0..4u8, 0..4u8).prop_map(|(kind, i)| Step::Release { kind, i }),
        2 => prop::option::of(1..4usize).prop_map(|some| Step::Hear { some }),
        3 => prop::bool::weighted(0.15).prop_map(|resync| Step::Round { resync }),
        1 => Just(Step::Swept),
        1 => any::<bool>().prop_map(Step::Failing),
        1 => Just(Step::Settle),
    ]
}

/// What a round of the agent under test works with.
struct Agent {
    caches: Caches,
    server: Arc<Mutex<Server>>,
    kernel: Arc<FakeKernel>,
    api: FakeApi,
    metrics: Metrics,
    planning: Planning,
    set: ObjectSet,
    done: SweepDone,
}

impl Agent {
    fn new(caches: Caches, server: Arc<Mutex<Server>>) -> Agent {
        let kernel = Arc::new(FakeKernel::new(server.clone()));
        let api = FakeApi { server: server.clone(), kernel: kernel.clone(), failing: AtomicBool::new(false) };
        Agent {
            caches,
            server,
            kernel,
            api,
            metrics: crate::metrics::Metrics::new().0,
            planning: Planning::default(),
            set: ObjectSet::default(),
            done: Arc::new(|_| {}),
        }
    }

    async fn round(&mut self, resync: bool) -> Result<(), String> {
        let ctx = Ctx {
            kernel: &self.kernel,
            writes: &self.api,
            caches: &self.caches,
            gw: GW,
            metrics: &self.metrics,
            sweep_done: &self.done,
        };
        // A plan error (conflicts are not errors) would be a bug here.
        let result = round(ctx, resync, &mut self.planning, &mut self.set).await;
        // A broken rule fails the test even when the round failed.
        if let Some(why) = self.kernel.broken.lock().unwrap().take() {
            return Err(why);
        }
        result.map_err(|e| natgw_kube_support::chain(&e))
    }

    fn kernel_plan(&self) -> Option<GatewayPlan> {
        self.kernel.plan.lock().unwrap().clone()
    }
}

fn apply(server: &mut Server, step: &Step) {
    let labels = |eip: u8| json!({ GATEWAY_LABEL: if eip == 3 { "other" } else { GW } });
    let internal = |i: u8| format!("10.0.0.{}", 2 + i);
    let cidrs = ["10.0.0.0/24", "10.0.0.0/25", "10.0.0.128/25", "10.9.0.0/24"];
    match *step {
        Step::Eip { i, other, ip } => {
            let mut spec = json!({ "gateway": if other { "other" } else { GW } });
            if ip {
                spec["ip"] = json!(eip_ip(i).to_string());
            }
            server.put(&ObjectRef::new(Kind::Eip, format!("e{i}")), spec, json!({ GATEWAY_LABEL: GW }));
        }
        Step::Fip { i, eip, internal: n } => server.put(
            &ObjectRef::new(Kind::FloatingIp, format!("f{i}")),
            json!({ "eip": format!("e{eip}"), "internalIp": internal(n) }),
            labels(eip),
        ),
        Step::Snat { i, eip, cidr } => server.put(
            &ObjectRef::new(Kind::SnatRule, format!("s{i}")),
            json!({ "eip": format!("e{eip}"), "internalCidr": cidrs[cidr as usize] }),
            labels(eip),
        ),
        Step::Dnat { i, eip, port, internal: n } => server.put(
            &ObjectRef::new(Kind::DnatRule, format!("d{i}")),
            json!({
                "eip": format!("e{eip}"), "protocol": "tcp", "externalPort": PORTS[port as usize],
                "internalIp": internal(n), "internalPort": 8080,
            }),
            labels(eip),
        ),
        Step::Delete { kind, i } => server.delete(&object(kind, i)),
        Step::Release { kind, i } => server.release(&object(kind, i)),
        _ => {}
    }
}

fn object(kind: u8, i: u8) -> ObjectRef {
    let k = KINDS[kind as usize % KINDS.len()];
    let prefix = match k {
        Kind::Eip => "e",
        Kind::FloatingIp => "f",
        Kind::SnatRule => "s",
        _ => "d",
    };
    ObjectRef::new(k, format!("{prefix}{i}"))
}

/// Hears everything and runs rounds until one writes nothing and leaves
/// nothing owed, then compares with a full round from scratch.
async fn settle(agent: &mut Agent) -> Result<(), String> {
    agent.api.failing.store(false, Ordering::SeqCst);
    for _ in 0..10 {
        hear(&agent.caches, &mut agent.server.lock().unwrap(), None);
        agent.kernel.swept.store(true, Ordering::SeqCst);
        let writes = agent.server.lock().unwrap().writes;
        agent.round(false).await?;
        let quiet = {
            let server = agent.server.lock().unwrap();
            server.writes == writes && server.unheard.is_empty()
        };
        if quiet && agent.kernel.swept() {
            return compare(agent).await;
        }
    }
    Err("ten rounds did not settle".into())
}

/// A fresh agent on a copy of the API server, with the same caches (its
/// own marks), makes one full round: it must program the plan the agent
/// under test left in its kernel and write nothing.
async fn compare(agent: &Agent) -> Result<(), String> {
    let copy = Arc::new(Mutex::new(agent.server.lock().unwrap().clone()));
    let caches = Caches { dirty: DirtyCell::default(), ..agent.caches.clone() };
    let mut fresh = Agent::new(caches, copy.clone());
    let writes = copy.lock().unwrap().writes;
    fresh.round(true).await?;
    let wrote = copy.lock().unwrap().writes - writes;
    if wrote != 0 {
        return Err(format!("a full round from scratch made {wrote} writes the incremental rounds left undone"));
    }
    if fresh.kernel_plan() != agent.kernel_plan() {
        return Err(format!(
            "the kernels differ:\nincremental: {:?}\nfrom scratch: {:?}",
            agent.kernel_plan().map(|p| p.to_string()),
            fresh.kernel_plan().map(|p| p.to_string())
        ));
    }
    Ok(())
}

async fn run(steps: Vec<Step>) -> Result<(), String> {
    let server = Arc::new(Mutex::new(Server::default()));
    let mut agent = Agent::new(caches(), server.clone());
    agent.round(true).await?;
    for s in steps.iter().chain([&Step::Settle]) {
        match *s {
            Step::Hear { some } => hear(&agent.caches, &mut server.lock().unwrap(), some),
            // A refused write does not fail a round: it is owed.
            Step::Round { resync } => agent.round(resync).await?,
            Step::Swept => agent.kernel.swept.store(true, Ordering::SeqCst),
            Step::Failing(on) => agent.api.failing.store(on, Ordering::SeqCst),
            Step::Settle => settle(&mut agent).await?,
            _ => apply(&mut server.lock().unwrap(), s),
        }
    }
    Ok(())
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime").block_on(f)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn incremental_rounds_end_where_a_full_round_from_scratch_ends(
        steps in prop::collection::vec(step(), 1..60)
    ) {
        let result = block_on(run(steps));
        prop_assert!(result.is_ok(), "{}", result.err().unwrap_or_default());
    }
}

/// The scenario the property generalises, spelled out: a FloatingIp is
/// finalized before it is programmed, its deletion waits for the
/// controller's release and the sweep, and a late watch changes nothing.
#[test]
fn a_floating_ip_is_finalized_programmed_and_released_in_that_order() {
    block_on(async {
        let server = Arc::new(Mutex::new(Server::default()));
        let mut agent = Agent::new(caches(), server.clone());
        agent.round(true).await.unwrap();
        let f0 = ObjectRef::new(Kind::FloatingIp, "f0");
        apply(&mut server.lock().unwrap(), &Step::Eip { i: 0, other: false, ip: true });
        apply(&mut server.lock().unwrap(), &Step::Fip { i: 0, eip: 0, internal: 0 });
        hear(&agent.caches, &mut server.lock().unwrap(), None);
        agent.round(false).await.unwrap();
        assert!(server.lock().unwrap().has_finalizer(&f0));
        assert!(agent.kernel.holds(&f0), "programmed in the round that persisted its finalizer");
        // Deleted: the controller has not released it, so it stays.
        apply(&mut server.lock().unwrap(), &Step::Delete { kind: 1, i: 0 });
        hear(&agent.caches, &mut server.lock().unwrap(), None);
        agent.round(false).await.unwrap();
        assert!(agent.kernel.holds(&f0));
        // Released: out of the kernel at once, finalizer kept until swept.
        apply(&mut server.lock().unwrap(), &Step::Release { kind: 1, i: 0 });
        hear(&agent.caches, &mut server.lock().unwrap(), None);
        agent.round(false).await.unwrap();
        assert!(!agent.kernel.holds(&f0));
        assert!(server.lock().unwrap().has_finalizer(&f0), "released before the sweep");
        agent.kernel.swept.store(true, Ordering::SeqCst);
        agent.round(false).await.unwrap();
        assert!(!server.lock().unwrap().objects.contains_key(&f0), "gone once swept");
        settle(&mut agent).await.unwrap();
    });
}

/// A finalizer the API server refuses: nothing of the object is
/// programmed, and the write is retried without a new event.
#[test]
fn a_refused_finalizer_keeps_the_object_out_of_the_kernel_until_it_is_persisted() {
    block_on(async {
        let server = Arc::new(Mutex::new(Server::default()));
        let mut agent = Agent::new(caches(), server.clone());
        agent.round(true).await.unwrap();
        apply(&mut server.lock().unwrap(), &Step::Eip { i: 0, other: false, ip: true });
        apply(&mut server.lock().unwrap(), &Step::Fip { i: 0, eip: 0, internal: 0 });
        hear(&agent.caches, &mut server.lock().unwrap(), None);
        agent.api.failing.store(true, Ordering::SeqCst);
        agent.round(false).await.unwrap();
        let f0 = ObjectRef::new(Kind::FloatingIp, "f0");
        assert!(!agent.kernel.holds(&f0) && !server.lock().unwrap().has_finalizer(&f0));
        assert!(agent.planning.owes(), "the refused write is owed");
        agent.api.failing.store(false, Ordering::SeqCst);
        agent.round(false).await.unwrap();
        assert!(server.lock().unwrap().has_finalizer(&f0) && agent.kernel.holds(&f0));
    });
}
