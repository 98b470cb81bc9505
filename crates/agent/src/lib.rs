//! The gateway agent: the process beside (in production: inside) one
//! gateway's network namespace. It keeps the kernel equal to the plan of
//! its NatGateway, with its own finalizer on every object it programs:
//!
//! - an object's state enters the kernel only after the agent's finalizer
//!   on it is persisted (a write with a resourceVersion precondition; a
//!   conflict or a vanished object means nothing is programmed);
//! - the finalizer is removed only after a sync whose result no longer
//!   holds the object (conntrack included);
//! - an object counts as deleted once the controller released it (its
//!   finalizer is gone), so an Eip whose deletion waits for rules stays.

mod args;
mod metrics;
pub mod ports;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use natgw_api::*;
use natgw_dataplane::Gateway;
use natgw_kube_support::claims::{CLAIM_LABEL, Holder, holder_of};
use natgw_kube_support::{KindResource, with_kind};
use natgw_plan::{GatewayPlan, GatewayPlanner};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Sync(#[from] natgw_dataplane::SyncError),
    /// The gateway cannot be planned: the kernel is left as it is.
    #[error("cannot plan; the kernel is left as it is")]
    Plan(#[from] natgw_plan::PlanError),
    #[error("a blocking task died")]
    Task(#[from] tokio::task::JoinError),
}

/// API writes in flight at once.
const WRITES: usize = 32;

/// The agent's finalizer for gateway `gw`.
pub use args::Args;
pub use natgw_api::gateway_finalizer as finalizer;

/// Caches of every kind.
#[derive(Clone)]
struct Caches {
    /// The controller's address claims: an Eip's `status.ip` is used only
    /// when its claim names the Eip (status alone could be forged).
    claims: Store<ConfigMap>,
    vpcs: Store<Vpc>,
    subnets: Store<Subnet>,
    gateways: Store<NatGateway>,
    eips: Store<Eip>,
    fips: Store<FloatingIp>,
    snats: Store<SnatRule>,
    dnats: Store<DnatRule>,
}

fn watch<K: KindResource>(
    client: &Client,
    config: watcher::Config,
    tx: tokio::sync::mpsc::Sender<()>,
) -> (Store<K>, impl std::future::Future<Output = ()> + use<K>) {
    watch_in(client, None, config, tx)
}

fn watch_in<K>(
    client: &Client,
    namespace: Option<&str>,
    config: watcher::Config,
    tx: tokio::sync::mpsc::Sender<()>,
) -> (Store<K>, impl std::future::Future<Output = ()> + use<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (reader, mut stream) = natgw_kube_support::cached_in(client, namespace, config, "gateway-agent");
    let fut = async move {
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                tracing::warn!(kind = K::kind(&()).as_ref(), error = %e, "watch error");
            }
            let _ = tx.try_send(());
        }
    };
    (reader, fut)
}

/// What the agent holds: objects, whether each carries our finalizer, and
/// whether the controller released it for deletion.
struct Entry {
    object: ObjectRef,
    finalizers: Vec<String>,
    resource_version: Option<String>,
    released: bool,
    generation: Option<i64>,
    conditions: Vec<Condition>,
}

/// Each object's entry, kept between rounds.
type Entries = std::collections::BTreeMap<ObjectRef, Arc<Entry>>;

/// What an entry is made from, for any kind.
trait KindEntry {
    fn object_ref(&self) -> ObjectRef;
    fn entry(&self) -> Entry;
}

impl<K: KindResource> KindEntry for K {
    fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(K::KIND, self.meta().name.clone().unwrap_or_default())
    }
    fn entry(&self) -> Entry {
        entry(self)
    }
}

fn entry<K: KindResource>(o: &K) -> Entry {
    let m = o.meta();
    let finalizers = m.finalizers.clone().unwrap_or_default();
    let released = m.deletion_timestamp.is_some() && !finalizers.iter().any(|f| f == CONTROLLER_FINALIZER);
    Entry {
        object: ObjectRef::new(K::KIND, m.name.clone().unwrap_or_default()),
        finalizers,
        resource_version: m.resource_version.clone(),
        released,
        generation: m.generation,
        conditions: o.conditions().to_vec(),
    }
}

impl Caches {
    async fn ready(&self) {
        natgw_kube_support::all_listed(&[
            &self.claims,
            &self.vpcs,
            &self.subnets,
            &self.gateways,
            &self.eips,
            &self.fips,
            &self.snats,
            &self.dnats,
        ])
        .await
    }

    /// Brings `set` up to the caches (a copy only of objects whose
    /// resourceVersion changed: copying every object was most of a round
    /// at 10,000 objects) and returns the entries of this gateway's objects.
    /// The objects copied or removed go into `changed`; `entries` keeps
    /// each object's entry until its resourceVersion moves.
    fn refresh(
        &self,
        set: &mut ObjectSet,
        gw: &str,
        changed: &mut BTreeSet<ObjectRef>,
        entries: &mut Entries,
    ) -> Vec<Arc<Entry>> {
        let mut mine = Vec::new();
        refresh(&mut set.vpcs, &self.vpcs, |_, _| true, Kind::Vpc, changed);
        refresh(&mut set.subnets, &self.subnets, |_, _| true, Kind::Subnet, changed);
        refresh(&mut set.gateways, &self.gateways, |_, _| true, Kind::NatGateway, changed);
        let claimed: std::collections::BTreeMap<std::net::Ipv4Addr, Holder> =
            self.claims.state().iter().filter_map(|c| holder_of(c)).collect();
        // Only an address the controller claimed for this Eip is used: a
        // fixed spec.ip that another Eip holds, or a status.ip that no
        // claim of this Eip backs, must not be programmed. Claims change
        // apart from Eips, so the decision is taken again every round.
        let held = |e: &Eip| natgw_kube_support::claims::held_address(e, &claimed);
        refresh(&mut set.eips, &self.eips, |have, cached| have.address() == held(cached), Kind::Eip, changed);
        for e in set.eips.values_mut() {
            if e.address().is_some() && e.address() != held(e) {
                e.spec.ip = None;
                if let Some(s) = e.status.as_mut() {
                    s.ip = None;
                }
            }
        }
        refresh(&mut set.floating_ips, &self.fips, |_, _| true, Kind::FloatingIp, changed);
        refresh(&mut set.snat_rules, &self.snats, |_, _| true, Kind::SnatRule, changed);
        refresh(&mut set.dnat_rules, &self.dnats, |_, _| true, Kind::DnatRule, changed);
        let mut kept = Entries::new();
        let mut entry_of = |o: &dyn KindEntry| {
            let r = o.object_ref();
            let e = match entries.get(&r) {
                Some(e) if !changed.contains(&r) => e.clone(),
                _ => Arc::new(o.entry()),
            };
            kept.insert(r, e.clone());
            e
        };
        let mut my_eips = BTreeSet::new();
        for o in self.eips.state() {
            if o.spec.gateway == gw {
                my_eips.insert(o.name_any());
                mine.push(entry_of(&*o));
            }
        }
        let fin = finalizer(gw);
        // A rule is ours if its Eip is, or if it still carries our finalizer
        // (its Eip may be gone already).
        let ours = |eip: &str, m: &kube::api::ObjectMeta| {
            my_eips.contains(eip) || m.finalizers.as_ref().is_some_and(|f| f.contains(&fin))
        };
        mine.extend(self.fips.state().iter().filter(|o| ours(&o.spec.eip, &o.metadata)).map(|o| entry_of(&**o)));
        mine.extend(self.snats.state().iter().filter(|o| ours(&o.spec.eip, &o.metadata)).map(|o| entry_of(&**o)));
        mine.extend(self.dnats.state().iter().filter(|o| ours(&o.spec.eip, &o.metadata)).map(|o| entry_of(&**o)));
        *entries = kept;
        mine
    }
}

/// Makes `map` hold what `store` holds: objects whose resourceVersion
/// changed (or for which `same` says the copy no longer fits) are copied,
/// vanished ones removed; both go into `changed`.
fn refresh<K>(
    map: &mut std::collections::BTreeMap<String, K>,
    store: &Store<K>,
    same: impl Fn(&K, &K) -> bool,
    kind: Kind,
    changed: &mut BTreeSet<ObjectRef>,
) where
    K: kube::Resource<DynamicType = ()> + Clone,
{
    let state = store.state();
    let mut seen = std::collections::HashSet::with_capacity(state.len());
    for o in &state {
        let name = o.name_any();
        let fresh = match map.get(&name) {
            Some(have) => have.meta().resource_version != o.meta().resource_version || !same(have, o),
            None => true,
        };
        if fresh {
            map.insert(name.clone(), (**o).clone());
            changed.insert(ObjectRef::new(kind, name.clone()));
        }
        seen.insert(name);
    }
    map.retain(|n, _| {
        let keep = seen.contains(n);
        if !keep {
            changed.insert(ObjectRef::new(kind, n.clone()));
        }
        keep
    });
}

/// What the plan reads of the objects: kind, name, uid and generation
/// (spec changes), and an Eip's address in use. Status writes change none
/// of it.
fn plan_key(set: &ObjectSet) -> u64 {
    use std::hash::{Hash, Hasher};
    fn meta(h: &mut impl Hasher, kind: &str, m: &kube::api::ObjectMeta) {
        (kind, &m.name, &m.uid, m.generation, m.deletion_timestamp.is_some()).hash(h);
        if m.generation.is_none() {
            m.resource_version.hash(h);
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    set.vpcs.values().for_each(|o| meta(&mut h, "Vpc", &o.metadata));
    set.subnets.values().for_each(|o| meta(&mut h, "Subnet", &o.metadata));
    set.gateways.values().for_each(|o| meta(&mut h, "NatGateway", &o.metadata));
    for o in set.eips.values() {
        meta(&mut h, "Eip", &o.metadata);
        o.address().hash(&mut h);
    }
    set.floating_ips.values().for_each(|o| meta(&mut h, "FloatingIp", &o.metadata));
    set.snat_rules.values().for_each(|o| meta(&mut h, "SnatRule", &o.metadata));
    set.dnat_rules.values().for_each(|o| meta(&mut h, "DnatRule", &o.metadata));
    h.finish()
}

/// Writes an object's finalizer list, failing if the object changed since
/// `resource_version` (merge patch with a resourceVersion precondition).
async fn set_finalizers(client: &Client, e: &Entry, finalizers: Vec<String>) -> Result<(), kube::Error> {
    async fn patch<K: KindResource>(client: &Client, name: &str, body: serde_json::Value) -> Result<(), kube::Error> {
        Api::<K>::all(client.clone()).patch(name, &PatchParams::default(), &Patch::Merge(&body)).await.map(drop)
    }
    let body = serde_json::json!({ "metadata": { "resourceVersion": e.resource_version, "finalizers": finalizers } });
    with_kind!(e.object.kind, patch(client, &e.object.name, body))
}

/// What every round works with.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    client: &'a Client,
    gateway: &'a Arc<Gateway>,
    caches: &'a Caches,
    gw: &'a str,
    metrics: &'a metrics::Metrics,
    sweep_done: &'a natgw_dataplane::SweepDone,
}

/// What rounds carry over: the last plan the kernel holds with the key of
/// the objects it came from, and the planner that keeps the plan up to
/// date in O(change).
#[derive(Default)]
struct Planning {
    memo: Option<(u64, Arc<GatewayPlan>)>,
    planner: Option<GatewayPlanner>,
    entries: Entries,
    /// The plan whose conditions the last status pass wrote, and the
    /// objects changed since: a status pass looks only at these and at
    /// what the plan changed for (O(change)).
    reported: Option<Arc<GatewayPlan>>,
    unreported: BTreeSet<ObjectRef>,
    /// Objects whose finalizer this agent persisted, with the
    /// resourceVersion they had before: until the cache shows the write,
    /// they count as finalized (a round triggered by another event must
    /// not write again, fail on the stale version, and drop them from the
    /// kernel meanwhile).
    persisted: std::collections::BTreeMap<ObjectRef, Option<String>>,
}

impl Planning {
    /// The plan for `set`, where `changed` changed since the last call:
    /// incremental, except on a resync, which plans from scratch so no
    /// slip of the incremental path outlives it.
    fn plan(
        &mut self,
        set: &ObjectSet,
        gw: &str,
        changed: &BTreeSet<ObjectRef>,
        resync: bool,
    ) -> Result<Arc<GatewayPlan>, Error> {
        let planned = match self.planner.as_mut() {
            Some(p) if !resync => p.update(set, changed),
            _ => GatewayPlanner::new(set, gw).map(|p| {
                self.planner = Some(p);
            }),
        };
        match (planned, self.planner.as_ref()) {
            (Ok(()), Some(p)) => Ok(Arc::new(p.plan().clone())),
            (Err(e), _) => {
                // Changes taken in are lost with the error: plan anew next.
                self.planner = None;
                Err(Error::Plan(e))
            }
            (Ok(()), None) => Err(Error::Plan(natgw_plan::PlanError::NoGateway(gw.into()))),
        }
    }
}

/// One round: finalizers first, then the kernel, then releases.
async fn round(ctx: Ctx<'_>, resync: bool, planning: &mut Planning, set: &mut ObjectSet) -> Result<(), Error> {
    let Ctx { client, gateway, caches, gw, metrics, sweep_done } = ctx;
    caches.ready().await;
    let started = std::time::Instant::now();
    let fin = finalizer(gw);
    let mut changed = BTreeSet::new();
    let mine = caches.refresh(set, gw, &mut changed, &mut planning.entries);
    let snapshot_ms = started.elapsed().as_millis() as u64;
    let mut adding = Vec::new();
    let persisted = std::mem::take(&mut planning.persisted);
    let mut finalized_before = Vec::new();
    for e in &mine {
        let written = persisted.get(&e.object).is_some_and(|rv| *rv == e.resource_version);
        if written && !e.released {
            // Still not in the cache: ours all the same.
            planning.persisted.insert(e.object.clone(), e.resource_version.clone());
            finalized_before.push(e);
        }
        let has = e.finalizers.contains(&fin) || written;
        if e.released {
            // No longer allowed in the kernel.
            set.remove(&e.object);
            changed.insert(e.object.clone());
        } else if !has {
            adding.push(e);
        }
    }
    // Many objects arrive at once: their writes go in parallel. An object
    // whose finalizer is persisted is programmed in this same round; one
    // whose write failed stays out of the kernel.
    let failed = std::sync::Mutex::new(BTreeSet::new());
    futures::stream::iter(&adding)
        .for_each_concurrent(WRITES, |e| async {
            let mut list = e.finalizers.clone();
            list.push(fin.clone());
            if let Err(err) = set_finalizers(client, e, list).await {
                tracing::info!(object = %e.object, error = %err, "finalizer not persisted; not programming");
                failed.lock().unwrap_or_else(|p| p.into_inner()).insert(e.object.clone());
            }
        })
        .await;
    let failed = failed.into_inner().unwrap_or_else(|p| p.into_inner());
    let finalized_count = adding.len();
    let mut finalized = Vec::new();
    for e in adding {
        if failed.contains(&e.object) {
            set.remove(&e.object);
            changed.insert(e.object.clone());
        } else {
            planning.persisted.insert(e.object.clone(), e.resource_version.clone());
            finalized.push(e);
        }
    }
    finalized.extend(finalized_before);
    // Rounds triggered by natgw's own status writes change nothing the
    // plan reads: planning again (O(objects)) is skipped then.
    let finalizers_ms = started.elapsed().as_millis() as u64;
    planning.unreported.extend(changed.iter().cloned());
    let key = plan_key(set);
    // Only what changed is planned again; the plan shares the rest with
    // the last one, and the kernel diff skips what they share.
    let (plan, report, reused) = match planning.memo.as_ref() {
        Some((k, p)) if *k == key && !resync => (p.clone(), natgw_dataplane::SyncReport::default(), true),
        _ => {
            let plan = planning.plan(set, gw, &changed, resync)?;
            let (g, p) = (gateway.clone(), plan.clone());
            let report =
                tokio::task::spawn_blocking(move || if resync { g.reprogram(&p) } else { g.program(&p) }).await??;
            // Kept only once the kernel holds it.
            planning.memo = Some((key, plan.clone()));
            (plan, report, false)
        }
    };
    let programmed_ms = started.elapsed().as_millis() as u64;
    if !reused {
        metrics.synced(report.duration.as_secs_f64(), resync, &plan);
    }
    if report.changed {
        tracing::info!(gateway = gw, ms = report.duration.as_millis() as u64, nft = report.nft_statements, "synced");
    }
    // The conntrack sweep this change owes runs beside the next changes;
    // its end triggers a round, which releases what it settled.
    gateway.sweep_in_background(sweep_done.clone());
    let mut settled: Vec<&Entry> =
        mine.iter().map(|e| &**e).filter(|e| !e.released && e.finalizers.contains(&fin)).collect();
    settled.extend(finalized.into_iter().map(|e| &**e));
    // With the plan reused, what each object's conditions should say is
    // what the last round wrote; a write that failed is retried by the
    // next plan or the periodic resync (30 s).
    if !reused {
        if let Some(before) = planning.reported.as_ref().filter(|_| !resync) {
            let scope = status_scope(before, &plan, &planning.unreported);
            settled.retain(|e| scope.contains(&e.object));
        }
        report_status(client, gw, &plan, &settled).await;
        planning.reported = Some(plan.clone());
        planning.unreported.clear();
    }
    // The kernel no longer holds these, nor any flow through them once
    // every change is swept: let them go.
    let swept = gateway.swept();
    let gone = mine.iter().filter(|e| {
        swept
            && e.finalizers.contains(&fin)
            && !plan.programmed.contains(&e.object)
            && (e.released || !set.contains(&e.object))
    });
    futures::stream::iter(gone)
        .for_each_concurrent(WRITES, |e| async {
            let list: Vec<String> = e.finalizers.iter().filter(|f| **f != fin).cloned().collect();
            if let Err(err) = set_finalizers(client, e, list).await {
                tracing::info!(object = %e.object, error = %err, "finalizer not removed yet");
            }
        })
        .await;
    tracing::debug!(
        snapshot_ms,
        finalizers_ms,
        programmed_ms,
        total_ms = started.elapsed().as_millis() as u64,
        finalized = finalized_count,
        "round"
    );
    Ok(())
}

/// Runs the agent for gateway `gw` in namespace `netns` until `shutdown`.
/// `claims` is the controller's namespace, where address claims live.
pub async fn run(
    client: Client,
    gw: String,
    netns: Option<String>,
    claims: String,
    health: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    run_with(client, gw, netns, claims, health, ports::PortArgs::default(), shutdown).await
}

/// `run` with port accounting settings.
pub async fn run_with(
    client: Client,
    gw: String,
    netns: Option<String>,
    claims: String,
    health: Option<tokio::net::TcpListener>,
    port_args: ports::PortArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let (metrics, probe) = metrics::Metrics::new();
    let server = {
        let probe = probe.clone();
        async move {
            match health {
                Some(l) => natgw_kube_support::health::serve(l, probe).await,
                None => std::future::pending().await,
            }
        }
    };
    let ns = netns.clone();
    let gateway = Arc::new(
        tokio::task::spawn_blocking(move || {
            let g = Gateway::open(ns.as_deref())?;
            // Before anything else: a kernel that cannot mark addresses
            // would leave every EIP behind.
            g.check_kernel()?;
            Ok::<_, natgw_dataplane::SyncError>(g)
        })
        .await??,
    );
    // Lives as long as the agent runs.
    let _translation_log = match port_args.translation_sink() {
        Some(sink) => {
            let log = gateway.start_translation_log(sink, port_args.translation_log_rate)?;
            metrics.translation_log(log.counts.clone());
            Some(log)
        }
        None => None,
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    // The network objects are few; of Eips and rules, only those the
    // controller bound to this gateway.
    let all = watcher::Config::default();
    let mine = watcher::Config::default().labels(&format!("{GATEWAY_LABEL}={gw}"));
    let (vpcs, w1) = watch::<Vpc>(&client, all.clone(), tx.clone());
    let (subnets, w2) = watch::<Subnet>(&client, all.clone(), tx.clone());
    let (gateways, w3) = watch::<NatGateway>(&client, all, tx.clone());
    let (eips, w4) = watch::<Eip>(&client, mine.clone(), tx.clone());
    let (fips, w5) = watch::<FloatingIp>(&client, mine.clone(), tx.clone());
    let (snats, w6) = watch::<SnatRule>(&client, mine.clone(), tx.clone());
    let (dnats, w7) = watch::<DnatRule>(&client, mine, tx.clone());
    let claim_label = watcher::Config::default().labels(&format!("{CLAIM_LABEL}=true"));
    let (claims, w0) = watch_in::<ConfigMap>(&client, Some(&claims), claim_label, tx.clone());
    let eips_cache = eips.clone();
    let caches = Caches { claims, vpcs, subnets, gateways, eips, fips, snats, dnats };
    let sweep_done: natgw_dataplane::SweepDone = {
        let (tx, metrics) = (tx.clone(), metrics.clone());
        Arc::new(move |result| {
            match result {
                Ok(deleted) => {
                    metrics.swept(deleted);
                    if deleted > 0 {
                        tracing::info!(deleted, "conntrack swept");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "conntrack sweep failed; finalizers wait for the next one");
                    metrics.failed();
                }
            }
            let _ = tx.try_send(());
        })
    };
    let watches = async {
        futures::join!(w0, w1, w2, w3, w4, w5, w6, w7);
    };
    let work = async {
        // The first round reads the kernel: a restarted gateway is fully
        // re-programmed and stale conntrack entries are swept.
        let mut resync = true;
        let mut last_full = tokio::time::Instant::now();
        // The last plan, the key of the objects it came from, the planner.
        let mut planning = Planning::default();
        // The objects as the last round saw them (refreshed, not copied).
        let mut objects = ObjectSet::default();
        loop {
            let ctx = Ctx {
                client: &client,
                gateway: &gateway,
                caches: &caches,
                gw: &gw,
                metrics: &metrics,
                sweep_done: &sweep_done,
            };
            match round(ctx, resync, &mut planning, &mut objects).await {
                // The caches listed and the kernel holds the plan (the
                // first sync of a handle, and the one after any failure,
                // reads the kernel whole).
                Ok(()) => probe.ready(),
                Err(e) => {
                    let why = natgw_kube_support::chain(&e);
                    tracing::warn!(error = %why, "round failed; retrying");
                    metrics.failed();
                    probe.not_ready(why);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let _ = tx.try_send(());
                }
            }
            if resync {
                last_full = tokio::time::Instant::now();
            }
            let wait = Duration::from_secs(30).saturating_sub(last_full.elapsed());
            resync = tokio::time::timeout(wait, rx.recv()).await.is_err();
        }
    };
    let accounting = ports::run(client.clone(), gateway.clone(), eips_cache, metrics.clone(), port_args);
    tokio::select! {
        _ = watches => {}
        _ = work => {}
        _ = accounting => {}
        _ = server => {}
        _ = shutdown => {}
    }
    Ok(())
}

/// The objects whose conditions may differ from what the status pass of
/// `before` wrote: those changed since, and those `plan` programs, stops
/// programming or reports differently. The plans share structure, so the
/// diff of `programmed` is O(change).
fn status_scope(before: &GatewayPlan, plan: &GatewayPlan, changed: &BTreeSet<ObjectRef>) -> BTreeSet<ObjectRef> {
    use imbl::ordset::DiffItem;
    let mut out = changed.clone();
    for d in before.programmed.diff(&plan.programmed) {
        match d {
            DiffItem::Add(r) | DiffItem::Remove(r) => out.insert(r.clone()),
        };
    }
    let (old, new): (BTreeSet<_>, BTreeSet<_>) = (before.conflicts.iter().collect(), plan.conflicts.iter().collect());
    out.extend(old.symmetric_difference(&new).map(|c| c.object.clone()));
    out
}

/// (type, status, reason, message) of the conditions the agent owns.
type Want = [(&'static str, &'static str, String, String); 3];

fn wanted(plan: &GatewayPlan, object: &ObjectRef) -> Want {
    let programmed = plan.programmed.contains(object);
    // Conflicts are sorted by object: a lookup, not a walk per object
    // (quadratic while thousands of new rules wait for their Eips).
    let at = plan.conflicts.partition_point(|c| &c.object < object);
    let conflict = plan.conflicts.get(at).filter(|c| &c.object == object);
    let (p_reason, p_msg) = match conflict {
        _ if programmed => ("InKernel".to_string(), format!("programmed in gateway {}", plan.gateway)),
        Some(c) if c.pending => ("Pending".to_string(), format!("{}: {}", c.field, c.reason)),
        Some(c) => ("Conflict".to_string(), format!("{}: {}", c.field, c.reason)),
        None => ("Pending".to_string(), "waiting for the agent's finalizer".to_string()),
    };
    let (c_status, c_reason, c_msg) = match conflict {
        Some(c) if !c.pending => ("True", "Conflict".to_string(), format!("{}: {}", c.field, c.reason)),
        _ => ("False", "NoConflict".to_string(), String::new()),
    };
    let s = |b: bool| if b { "True" } else { "False" };
    [
        ("Programmed", s(programmed), p_reason.clone(), p_msg.clone()),
        ("Conflict", c_status, c_reason, c_msg),
        ("Ready", s(programmed), p_reason, p_msg),
    ]
}

/// Writes Programmed, Conflict and Ready where they changed, so a steady
/// gateway writes nothing.
async fn report_status(client: &Client, gw: &str, plan: &GatewayPlan, mine: &[&Entry]) {
    let manager = format!("natgw-gateway-{gw}");
    let writes = mine.iter().filter_map(|e| {
        let want = wanted(plan, &e.object);
        let same = want.iter().all(|(t, st, reason, msg)| {
            e.conditions.iter().any(|c| {
                c.type_ == *t
                    && c.status == *st
                    && c.reason == *reason
                    && c.message == *msg
                    && c.observed_generation == e.generation
            })
        });
        if same {
            return None;
        }
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let conditions: Vec<Condition> = want
            .iter()
            .map(|(t, st, reason, msg)| {
                // Keep the transition time when the status did not flip.
                let since = e
                    .conditions
                    .iter()
                    .find(|c| c.type_ == *t && c.status == *st)
                    .map(|c| c.last_transition_time.clone());
                Condition {
                    type_: t.to_string(),
                    status: st.to_string(),
                    reason: reason.clone(),
                    message: msg.clone(),
                    observed_generation: e.generation,
                    last_transition_time: since.unwrap_or_else(|| now.clone()),
                }
            })
            .collect();
        let status = serde_json::json!({ "observedGeneration": e.generation, "conditions": conditions });
        Some((&e.object, status))
    });
    futures::stream::iter(writes)
        .for_each_concurrent(WRITES, |(object, status)| {
            let manager = &manager;
            async move {
                if let Err(err) = patch_status(client, manager, object, status).await {
                    tracing::info!(object = %object, error = %err, "status not written");
                }
            }
        })
        .await;
}

async fn patch_status(
    client: &Client,
    manager: &str,
    r: &ObjectRef,
    status: serde_json::Value,
) -> Result<(), kube::Error> {
    use natgw_kube_support::status::apply_status;
    with_kind!(r.kind, apply_status(client, manager, &r.name, status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use natgw_plan::Conflict;

    fn fip(name: &str) -> ObjectRef {
        ObjectRef::new(Kind::FloatingIp, name)
    }

    #[test]
    fn a_status_pass_looks_at_what_changed_and_what_the_plan_changed_for() {
        let mut before = GatewayPlan::default();
        before.programmed.insert(fip("kept"));
        before.programmed.insert(fip("dropped"));
        let conflict = |o: &str, reason: &str| Conflict {
            object: fip(o),
            field: "spec.eip".into(),
            reason: reason.into(),
            pending: false,
        };
        before.conflicts = vec![conflict("loser", "taken by a"), conflict("steady", "taken by b")];
        let mut plan = before.clone();
        plan.programmed.remove(&fip("dropped"));
        plan.programmed.insert(fip("new"));
        plan.conflicts = vec![conflict("loser", "taken by c"), conflict("steady", "taken by b")];
        let changed: BTreeSet<ObjectRef> = [fip("edited")].into();
        let scope = status_scope(&before, &plan, &changed);
        let want: BTreeSet<ObjectRef> = [fip("edited"), fip("dropped"), fip("new"), fip("loser")].into();
        assert_eq!(scope, want);
    }

    #[test]
    fn conflicts_are_found_by_bisection() {
        let mut plan = GatewayPlan::default();
        for name in ["a", "b", "c"] {
            plan.conflicts.push(Conflict {
                object: fip(name),
                field: "spec.eip".into(),
                reason: format!("reason {name}"),
                pending: name == "b",
            });
        }
        let [(_, _, reason, _), ..] = wanted(&plan, &fip("b"));
        assert_eq!(reason, "Pending");
        let [(_, status, _, _), ..] = wanted(&plan, &fip("zz"));
        assert_eq!(status, "False");
    }
}
