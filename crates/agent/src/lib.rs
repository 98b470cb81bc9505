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
mod caches;
mod claims;
mod dirty;
mod metrics;
pub mod ports;
pub mod snapshot;
mod store;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use natgw_api::*;
use natgw_dataplane::Gateway;
use natgw_kube_support::{KindResource, with_kind};

use caches::{Caches, Entries, Entry, watch};
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
pub use caches::{Holdings, holdings};
pub use natgw_api::gateway_finalizer as finalizer;

/// Writes an object's finalizer list, failing if the object changed since
/// `resource_version` (merge patch with a resourceVersion precondition).
async fn set_finalizers(client: &Client, e: &Entry, finalizers: Vec<String>) -> Result<(), kube::Error> {
    async fn patch<K: KindResource>(client: &Client, name: &str, body: serde_json::Value) -> Result<(), kube::Error> {
        Api::<K>::all(client.clone()).patch(name, &PatchParams::default(), &Patch::Merge(&body)).await.map(drop)
    }
    let body = serde_json::json!({ "metadata": { "resourceVersion": e.resource_version(), "finalizers": finalizers } });
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

/// What rounds carry over: the plan the kernel holds, the planner that
/// keeps it up to date in O(change), and what is owed to objects.
#[derive(Default)]
struct Planning {
    /// The plan the kernel holds; `None` until the first sync and after a
    /// failed round, which makes the next round look at everything.
    memo: Option<Arc<GatewayPlan>>,
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
    persisted: std::collections::BTreeMap<ObjectRef, Option<Name>>,
    /// Objects the next round looks at although no watch marks them: a
    /// finalizer write that failed, a release waiting for its sweep.
    owed: BTreeSet<ObjectRef>,
}

impl Planning {
    /// The plan for `set`, where `changed` changed since the last call:
    /// incremental, or from scratch when there is no planner (the first
    /// round, after a failure, and on a resync, so no slip of the
    /// incremental path outlives it).
    fn plan(
        planner: &mut Option<GatewayPlanner>,
        set: &ObjectSet,
        gw: &str,
        changed: &BTreeSet<ObjectRef>,
    ) -> Result<Arc<GatewayPlan>, Error> {
        let planned = match planner.as_mut() {
            Some(p) => p.update(set, changed),
            None => GatewayPlanner::new(set, gw).map(|p| {
                *planner = Some(p);
            }),
        };
        match (planned, planner.as_ref()) {
            (Ok(()), Some(p)) => Ok(Arc::new(p.plan().clone())),
            (Err(e), _) => {
                // Changes taken in are lost with the error: plan anew next.
                *planner = None;
                Err(Error::Plan(e))
            }
            (Ok(()), None) => Err(Error::Plan(natgw_plan::PlanError::NoGateway(gw.into()))),
        }
    }
}

/// One round: finalizers first, then the kernel, then releases. It looks
/// at what changed since the last round (and what is owed), or at every
/// object on a resync.
async fn round(ctx: Ctx<'_>, resync: bool, planning: &mut Planning, set: &mut ObjectSet) -> Result<(), Error> {
    let Ctx { client, gateway, caches, gw, metrics, sweep_done } = ctx;
    caches.ready().await;
    let started = std::time::Instant::now();
    let fin = finalizer(gw);
    // A failed round leaves no plan behind: the next one looks at all.
    let before = planning.memo.take();
    let owed = std::mem::take(&mut planning.owed);
    let refreshed = caches.refresh(set, &mut planning.entries, resync || before.is_none(), &owed);
    let (full, mut planned) = (refreshed.full, refreshed.planned);
    // A resync plans from scratch and reads no earlier plan.
    let before = before.filter(|_| !resync);
    let mut changed = refreshed.changed;
    let entries = &planning.entries;
    // An Eip of this gateway; a rule whose Eip is one, or that still
    // carries our finalizer (its Eip may be gone already).
    let ours = |e: &Entry| match e.object.kind {
        Kind::Eip => e.gateway() == Some(gw),
        _ => {
            e.finalizers().contains(&fin)
                || e.eip().is_some_and(|n| {
                    entries.get(&ObjectRef::new(Kind::Eip, n)).is_some_and(|x| x.gateway() == Some(gw))
                })
        }
    };
    let lookup = |refs: &mut dyn Iterator<Item = &ObjectRef>| -> Vec<Arc<Entry>> {
        refs.filter_map(|r| entries.get(r)).filter(|e| ours(e)).cloned().collect()
    };
    let mine: Vec<Arc<Entry>> = if full {
        let mut all: Vec<Arc<Entry>> = entries.all().filter(|e| ours(e)).cloned().collect();
        all.sort_unstable_by(|a, b| a.object.cmp(&b.object));
        all
    } else {
        // What changed, the rules of an Eip that changed (whether they are
        // ours follows it), and what earlier rounds left owed.
        let mut refs: BTreeSet<&ObjectRef> = changed.iter().chain(&owed).chain(planning.persisted.keys()).collect();
        for r in changed.iter().filter(|r| r.kind == Kind::Eip) {
            refs.extend(entries.rules_of(&r.name));
        }
        lookup(&mut refs.into_iter())
    };
    let snapshot_ms = started.elapsed().as_millis() as u64;
    let mut adding = Vec::new();
    let persisted = std::mem::take(&mut planning.persisted);
    let mut finalized: BTreeSet<ObjectRef> = BTreeSet::new();
    for e in &mine {
        let written = persisted.get(&e.object).is_some_and(|rv| rv.as_deref() == e.resource_version());
        if written && !e.released {
            // Still not in the cache: ours all the same.
            planning.persisted.insert(e.object.clone(), e.resource_version().map(Name::from));
            finalized.insert(e.object.clone());
        }
        let has = e.finalizers().contains(&fin) || written;
        if e.released {
            // No longer allowed in the kernel.
            planned |= set.remove(&e.object);
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
            let mut list = e.finalizers().to_vec();
            list.push(fin.clone());
            if let Err(err) = set_finalizers(client, e, list).await {
                tracing::info!(object = %e.object, error = %err, "finalizer not persisted; not programming");
                failed.lock().unwrap_or_else(|p| p.into_inner()).insert(e.object.clone());
            }
        })
        .await;
    let failed = failed.into_inner().unwrap_or_else(|p| p.into_inner());
    let finalized_count = adding.len();
    for e in adding {
        if failed.contains(&e.object) {
            planned |= set.remove(&e.object);
            changed.insert(e.object.clone());
            planning.owed.insert(e.object.clone());
        } else {
            planning.persisted.insert(e.object.clone(), e.resource_version().map(Name::from));
            finalized.insert(e.object.clone());
        }
    }
    let finalizers_ms = started.elapsed().as_millis() as u64;
    planning.unreported.extend(changed.iter().cloned());
    // Rounds triggered by natgw's own status writes change nothing the
    // plan reads: planning and the kernel are skipped then. Otherwise
    // only what changed is planned again; the plan shares the rest with
    // the last one, and the kernel diff skips what they share.
    let (plan, report, reused) = match before.as_ref() {
        Some(p) if !planned && !resync => (p.clone(), natgw_dataplane::SyncReport::default(), true),
        _ => {
            if resync {
                // Whatever holds the last plan lets go before the new one
                // is built beside it (two whole plans at once were the
                // agent's peak memory); the kernel's copy stays while a
                // sweep needs it.
                planning.planner = None;
                planning.reported = None;
                gateway.release_plan();
                // And hands the pages back before the new plan fills the
                // heap again (at 226,000 objects: 290 to 216 MB).
                tokio::task::spawn_blocking(natgw_kube_support::heap::trim).await?;
            }
            let plan = Planning::plan(&mut planning.planner, set, gw, &changed)?;
            let (g, p) = (gateway.clone(), plan.clone());
            let report =
                tokio::task::spawn_blocking(move || if resync { g.reprogram(&p) } else { g.program(&p) }).await??;
            (plan, report, false)
        }
    };
    // Kept only once the kernel holds it.
    planning.memo = Some(plan.clone());
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
    let has_fin = |e: &Entry| e.finalizers().contains(&fin) || finalized.contains(&e.object);
    // With the plan reused, what each object's conditions should say is
    // what the last round wrote; a write that failed is retried by the
    // next plan or the periodic resync (30 s).
    if !reused {
        let scope =
            planning.reported.as_ref().filter(|_| !resync).map(|b| status_scope(b, &plan, &planning.unreported));
        let settled = match &scope {
            Some(scope) => lookup(&mut scope.iter()),
            None => mine.clone(),
        };
        let settled: Vec<&Entry> = settled.iter().map(|e| &**e).filter(|e| !e.released && has_fin(e)).collect();
        report_status(client, gw, &plan, &settled, metrics).await;
        planning.reported = Some(plan.clone());
        planning.unreported.clear();
    }
    // The kernel no longer holds these, nor any flow through them once
    // every change is swept: let them go. Besides what this round looked
    // at: what the plan stopped programming, and releases still owed.
    let mut candidates = mine.clone();
    if !full {
        let mut refs: BTreeSet<&ObjectRef> = owed.iter().collect();
        if let Some(b) = before.as_ref().filter(|_| !reused) {
            use imbl::ordset::DiffItem;
            for d in b.programmed.diff(&plan.programmed) {
                if let DiffItem::Remove(r) = d {
                    refs.insert(r);
                }
            }
        }
        let seen: BTreeSet<&ObjectRef> = mine.iter().map(|e| &e.object).collect();
        candidates.extend(lookup(&mut refs.into_iter().filter(|r| !seen.contains(r))));
    }
    let gone: Vec<&Entry> = candidates
        .iter()
        .map(|e| &**e)
        .filter(|e| {
            e.finalizers().contains(&fin)
                && !plan.programmed.contains(&e.object)
                && (e.released || !set.contains(&e.object))
        })
        .collect();
    let swept = gateway.swept();
    let unreleased = std::sync::Mutex::new(BTreeSet::new());
    if swept {
        futures::stream::iter(&gone)
            .for_each_concurrent(WRITES, |e| async {
                let list: Vec<String> = e.finalizers().iter().filter(|f| **f != fin).cloned().collect();
                if let Err(err) = set_finalizers(client, e, list).await {
                    tracing::info!(object = %e.object, error = %err, "finalizer not removed yet");
                    unreleased.lock().unwrap_or_else(|p| p.into_inner()).insert(e.object.clone());
                }
            })
            .await;
    } else {
        unreleased.lock().unwrap_or_else(|p| p.into_inner()).extend(gone.iter().map(|e| e.object.clone()));
    }
    planning.owed.extend(unreleased.into_inner().unwrap_or_else(|p| p.into_inner()));
    tracing::debug!(
        snapshot_ms,
        finalizers_ms,
        programmed_ms,
        total_ms = started.elapsed().as_millis() as u64,
        full,
        looked_at = mine.len(),
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
    let gateway = Arc::new(tokio::task::spawn_blocking(move || Gateway::open(ns.as_deref())).await??);
    // Lives as long as the agent runs.
    let _translation_log = match port_args.translation_sink() {
        Some(sink) => {
            let log = gateway.start_translation_log(sink, port_args.translation_rates())?;
            metrics.translation_log(log.counts.clone());
            Some(log)
        }
        None => None,
    };
    tokio::pin!(server, shutdown);
    // spec.vpc is immutable: the VPC is fixed for the agent's life.
    let vpc = tokio::select! {
        vpc = vpc_of(&client, &gw, &probe) => vpc,
        _ = &mut server => return Ok(()),
        _ = &mut shutdown => return Ok(()),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    // Only what concerns this gateway: its own NatGateway (every other
    // gateway's status write would wake it), its VPC, that VPC's subnets,
    // the external subnets, and the Eips and rules the controller bound
    // to it. Other tenants' objects never reach it.
    let itself = watcher::Config::default().fields(&format!("metadata.name={gw}"));
    let its_vpc = watcher::Config::default().fields(&format!("metadata.name={vpc}"));
    let in_vpc = watcher::Config::default().fields(&format!("spec.vpc={vpc}"));
    let external = watcher::Config::default().fields("spec.vpc=");
    let mine = watcher::Config::default().labels(&format!("{GATEWAY_LABEL}={gw}"));
    let dirty = dirty::DirtyCell::default();
    let (vpcs, w1) = watch::<Vpc>(&client, its_vpc, &dirty, tx.clone(), metrics.received("Vpc"));
    let (subnets, w2) = watch::<Subnet>(&client, in_vpc, &dirty, tx.clone(), metrics.received("Subnet"));
    let (externals, w8) = watch::<Subnet>(&client, external, &dirty, tx.clone(), metrics.received("Subnet"));
    let (gateways, w3) = watch::<NatGateway>(&client, itself, &dirty, tx.clone(), metrics.received("NatGateway"));
    let (eips, w4) = watch::<Eip>(&client, mine.clone(), &dirty, tx.clone(), metrics.received("Eip"));
    let (fips, w5) = watch::<FloatingIp>(&client, mine.clone(), &dirty, tx.clone(), metrics.received("FloatingIp"));
    let (snats, w6) = watch::<SnatRule>(&client, mine.clone(), &dirty, tx.clone(), metrics.received("SnatRule"));
    let (dnats, w7) = watch::<DnatRule>(&client, mine, &dirty, tx.clone(), metrics.received("DnatRule"));
    let (claims_book, w0) = claims::watch(&client, &claims, &gw, &dirty, tx.clone(), metrics.received("claim"));
    let eips_cache = eips.clone();
    let caches = Caches { claims: claims_book, vpcs, subnets, externals, gateways, eips, fips, snats, dnats, dirty };
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
        futures::join!(w0, w1, w2, w3, w4, w5, w6, w7, w8);
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
        // Failed rounds in a row: each waits twice as long (500 ms to 30 s).
        let mut failures = 0u32;
        loop {
            // A round starts at least every 30 s plus the longest retry
            // wait, but a first round at 100,000 objects writes statuses
            // for minutes: a loop that has not come back in 15 minutes is
            // stuck (every kernel call has its own deadline besides).
            probe.beat(Duration::from_secs(900));
            if !gateway.alive() {
                probe.dead("the gateway's namespace worker stopped");
            }
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
                Ok(()) => {
                    failures = 0;
                    probe.ready();
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let wait = natgw_kube_support::backoff::delay(ROUND_RETRY.0, ROUND_RETRY.1, failures);
                    let why = natgw_kube_support::chain(&e);
                    tracing::warn!(error = %why, ?wait, "round failed; retrying");
                    metrics.failed();
                    probe.not_ready(why);
                    tokio::time::sleep(wait).await;
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
    let drops = count_forward_drops(gateway.clone(), metrics.clone());
    tokio::select! {
        _ = watches => {}
        _ = work => {}
        _ = accounting => {}
        _ = drops => {}
        _ = server => {}
        _ = shutdown => {}
    }
    Ok(())
}

/// The VPC of gateway `gw`, once its NatGateway exists. Until then the
/// agent is not ready and says why.
async fn vpc_of(client: &Client, gw: &str, probe: &natgw_kube_support::health::Probe) -> String {
    let api = Api::<NatGateway>::all(client.clone());
    let mut failures = 0u32;
    loop {
        let why = match api.get_opt(gw).await {
            Ok(Some(g)) => return g.spec.vpc,
            Ok(None) => format!("NatGateway {gw} does not exist"),
            Err(e) => format!("cannot read NatGateway {gw}: {}", natgw_kube_support::chain(&e)),
        };
        failures = failures.saturating_add(1);
        if failures == 1 {
            tracing::warn!(reason = %why, "waiting for the gateway's VPC");
        }
        probe.not_ready(why);
        tokio::time::sleep(natgw_kube_support::backoff::delay(ROUND_RETRY.0, ROUND_RETRY.1, failures)).await;
    }
}

/// The first and longest waits before a failed round is tried again.
const ROUND_RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

/// Copies the forward chain's drop counters into the metrics every 10 s.
async fn count_forward_drops(gateway: Arc<Gateway>, metrics: metrics::Metrics) {
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let g = gateway.clone();
        match tokio::task::spawn_blocking(move || g.forward_drops()).await {
            Ok(Ok(Some(drops))) => metrics.forward_dropped(&drops),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the forward chain's counters"),
            Err(_) => {}
        }
    }
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
        (AGENT_CONDITIONS[0], s(programmed), p_reason.clone(), p_msg.clone()),
        (AGENT_CONDITIONS[1], c_status, c_reason, c_msg),
        (AGENT_CONDITIONS[2], s(programmed), p_reason, p_msg),
    ]
}

/// Writes Programmed, Conflict and Ready where they changed, so a steady
/// gateway writes nothing.
async fn report_status(client: &Client, gw: &str, plan: &GatewayPlan, mine: &[&Entry], metrics: &metrics::Metrics) {
    let manager = format!("natgw-gateway-{gw}");
    let writes = mine.iter().filter_map(|e| {
        let want = wanted(plan, &e.object);
        let have = e.own();
        if have.says(want.iter().map(|(_, st, reason, msg)| (*st, reason.as_str(), msg.as_str())), e.generation()) {
            return None;
        }
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let conditions: Vec<Condition> = want
            .iter()
            .enumerate()
            .map(|(i, (t, st, reason, msg))| {
                // Keep the transition time when the status did not flip.
                let since = have.since(i, st);
                Condition {
                    type_: t.to_string(),
                    status: st.to_string(),
                    reason: reason.clone(),
                    message: msg.clone(),
                    observed_generation: e.generation(),
                    last_transition_time: since.unwrap_or_else(|| now.clone()),
                }
            })
            .collect();
        let status = serde_json::json!({ "observedGeneration": e.generation(), "conditions": conditions });
        Some((&e.object, status))
    });
    futures::stream::iter(writes)
        .for_each_concurrent(WRITES, |(object, status)| {
            let manager = &manager;
            async move {
                let result = patch_status(client, manager, object, status).await;
                metrics.status_written(result.is_ok());
                if let Err(err) = result {
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
