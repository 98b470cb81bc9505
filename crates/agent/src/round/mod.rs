//! One round of the agent, as named steps:
//!
//! 1. `read_caches`: take in what the watches marked (or everything) and
//!    pick the Eips and rules this round looks at;
//! 2. `persist_finalizers`: the agent's finalizer on each new object,
//!    before anything of it is programmed;
//! 3. `program`: plan (in O(change)) and converge the kernel to the plan;
//! 4. `write_statuses`: the conditions that changed;
//! 5. `release_finalizers`: objects the kernel no longer holds, once
//!    every flow through them is swept.
//!
//! Each step is a function of what it needs; the kernel and the API
//! server are behind `edges`, so a round runs against fakes in tests.

mod edges;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use natgw_api::{Kind, Name, ObjectRef, ObjectSet};
use natgw_dataplane::{SweepDone, SyncReport};
use natgw_plan::{GatewayPlan, GatewayPlanner};

pub use edges::{Cluster, Kernel, Writes};

use crate::caches::{Caches, Entries, Entry};
use crate::metrics::Metrics;
use crate::status::{report_status, status_scope};
use crate::{Error, finalizer};

/// API writes in flight at once.
pub const WRITES: usize = 32;

/// What every round works with.
pub struct Ctx<'a, K, W> {
    pub kernel: &'a Arc<K>,
    pub writes: &'a W,
    pub caches: &'a Caches,
    pub gw: &'a str,
    pub metrics: &'a Metrics,
    pub sweep_done: &'a SweepDone,
}

impl<K, W> Clone for Ctx<'_, K, W> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K, W> Copy for Ctx<'_, K, W> {}

/// What rounds carry over: the plan the kernel holds, the planner that
/// keeps it up to date in O(change), and what is owed to objects.
#[derive(Default)]
pub struct Planning {
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
    persisted: BTreeMap<ObjectRef, Option<Name>>,
    /// Objects the next round looks at although no watch marks them: a
    /// finalizer write that failed, a release waiting for its sweep.
    owed: BTreeSet<ObjectRef>,
    /// Objects whose status write failed: the next round writes them
    /// again, even when nothing else changed.
    status_owed: BTreeSet<ObjectRef>,
}

impl Planning {
    /// Whether a round owes something no watch will bring: the loop comes
    /// back soon rather than at the next event or resync.
    pub fn owes(&self) -> bool {
        !self.owed.is_empty() || !self.status_owed.is_empty()
    }
}

/// What a round looks at, from `read_caches`.
struct Look {
    /// Every object (the first round, a resync, a relist, after a failure).
    full: bool,
    /// Whether anything changed that the plan reads.
    planned: bool,
    /// Objects taken anew into the set or dropped from it.
    changed: BTreeSet<ObjectRef>,
    /// What the last round left owed.
    owed: BTreeSet<ObjectRef>,
    /// The plan the kernel holds, unless this round plans from scratch.
    before: Option<Arc<GatewayPlan>>,
    /// The Eips and rules of this gateway the round looks at.
    mine: Vec<Arc<Entry>>,
}

/// What `program` leaves: the plan the kernel now holds, and whether it is
/// the last one reused (nothing the plan reads changed).
struct Programmed {
    plan: Arc<GatewayPlan>,
    reused: bool,
}

/// One round: finalizers first, then the kernel, then releases. It looks
/// at what changed since the last round (and what is owed), or at every
/// object on a resync.
pub async fn round<K: Kernel, W: Writes>(
    ctx: Ctx<'_, K, W>,
    resync: bool,
    planning: &mut Planning,
    set: &mut ObjectSet,
) -> Result<(), Error> {
    ctx.caches.ready().await;
    let started = Instant::now();
    let mut look = read_caches(ctx, resync, planning, set);
    let snapshot_ms = started.elapsed().as_millis() as u64;
    let (finalized, adding) = persist_finalizers(ctx, planning, set, &mut look).await;
    let finalizers_ms = started.elapsed().as_millis() as u64;
    let programmed = program(ctx, resync, planning, set, &look).await?;
    let programmed_ms = started.elapsed().as_millis() as u64;
    // The conntrack sweep this change owes runs beside the next changes;
    // its end triggers a round, which releases what it settled.
    ctx.kernel.sweep_in_background(ctx.sweep_done.clone());
    write_statuses(ctx, resync, planning, &programmed, &look, &finalized).await;
    release_finalizers(ctx, planning, set, &programmed, &look).await;
    tracing::debug!(
        snapshot_ms,
        finalizers_ms,
        programmed_ms,
        total_ms = started.elapsed().as_millis() as u64,
        full = look.full,
        looked_at = look.mine.len(),
        finalized = adding,
        "round"
    );
    Ok(())
}

/// An Eip of gateway `gw`; a rule whose Eip is one, or that still carries
/// the agent's finalizer `fin` (its Eip may be gone already).
fn ours(entries: &Entries, gw: &str, fin: &str, e: &Entry) -> bool {
    match e.object.kind {
        Kind::Eip => e.gateway() == Some(gw),
        _ => {
            e.finalizers().iter().any(|f| f == fin)
                || e.eip().is_some_and(|n| {
                    entries.get(&ObjectRef::new(Kind::Eip, n)).is_some_and(|x| x.gateway() == Some(gw))
                })
        }
    }
}

/// The entries of `refs` that are ours.
fn lookup<'r>(entries: &Entries, gw: &str, refs: impl IntoIterator<Item = &'r ObjectRef>) -> Vec<Arc<Entry>> {
    let fin = finalizer(gw);
    refs.into_iter().filter_map(|r| entries.get(r)).filter(|e| ours(entries, gw, &fin, e)).cloned().collect()
}

/// Step 1: brings the set and the entries up to the caches and picks the
/// objects this round looks at. A failed round left no plan behind, so
/// the next one looks at all; a resync plans from scratch.
fn read_caches<K, W>(ctx: Ctx<'_, K, W>, resync: bool, planning: &mut Planning, set: &mut ObjectSet) -> Look {
    let before = planning.memo.take();
    let owed = std::mem::take(&mut planning.owed);
    let refreshed = ctx.caches.refresh(set, &mut planning.entries, resync || before.is_none(), &owed);
    let before = before.filter(|_| !resync);
    let entries = &planning.entries;
    let fin = finalizer(ctx.gw);
    let mine: Vec<Arc<Entry>> = if refreshed.full {
        let mut all: Vec<Arc<Entry>> = entries.all().filter(|e| ours(entries, ctx.gw, &fin, e)).cloned().collect();
        all.sort_unstable_by(|a, b| a.object.cmp(&b.object));
        all
    } else {
        // What changed, the rules of an Eip that changed (whether they are
        // ours follows it), and what earlier rounds left owed.
        let mut refs: BTreeSet<&ObjectRef> =
            refreshed.changed.iter().chain(&owed).chain(planning.persisted.keys()).collect();
        for r in refreshed.changed.iter().filter(|r| r.kind == Kind::Eip) {
            refs.extend(entries.rules_of(&r.name));
        }
        lookup(entries, ctx.gw, refs)
    };
    Look { full: refreshed.full, planned: refreshed.planned, changed: refreshed.changed, owed, before, mine }
}

/// Step 2: persists the agent's finalizer on each object that lacks it,
/// and drops from the set what may not be programmed: an object released
/// for deletion, one whose write failed. Returns the objects that count
/// as finalized though the cache may not show it yet, and how many writes
/// were made.
async fn persist_finalizers<K, W: Writes>(
    ctx: Ctx<'_, K, W>,
    planning: &mut Planning,
    set: &mut ObjectSet,
    look: &mut Look,
) -> (BTreeSet<ObjectRef>, usize) {
    let fin = finalizer(ctx.gw);
    let mut adding = Vec::new();
    let persisted = std::mem::take(&mut planning.persisted);
    let mut finalized = BTreeSet::new();
    for e in &look.mine {
        let written = persisted.get(&e.object).is_some_and(|rv| rv.as_deref() == e.resource_version());
        if written && !e.released {
            // Still not in the cache: ours all the same.
            planning.persisted.insert(e.object.clone(), e.resource_version().map(Name::from));
            finalized.insert(e.object.clone());
        }
        let has = e.finalizers().contains(&fin) || written;
        if e.released {
            // No longer allowed in the kernel.
            look.planned |= set.remove(&e.object);
            look.changed.insert(e.object.clone());
        } else if !has {
            adding.push(e.clone());
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
            if let Err(err) = ctx.writes.set_finalizers(e, list).await {
                tracing::info!(object = %e.object, error = %err, "finalizer not persisted; not programming");
                failed.lock().unwrap_or_else(|p| p.into_inner()).insert(e.object.clone());
            }
        })
        .await;
    let failed = failed.into_inner().unwrap_or_else(|p| p.into_inner());
    for e in &adding {
        if failed.contains(&e.object) {
            look.planned |= set.remove(&e.object);
            look.changed.insert(e.object.clone());
            planning.owed.insert(e.object.clone());
        } else {
            planning.persisted.insert(e.object.clone(), e.resource_version().map(Name::from));
            finalized.insert(e.object.clone());
        }
    }
    planning.unreported.extend(look.changed.iter().cloned());
    (finalized, adding.len())
}

/// Step 3: the plan and the kernel. Rounds triggered by natgw's own
/// status writes change nothing the plan reads: planning and the kernel
/// are skipped then. Otherwise only what changed is planned again; the
/// plan shares the rest with the last one, and the kernel diff skips what
/// they share.
async fn program<K: Kernel, W>(
    ctx: Ctx<'_, K, W>,
    resync: bool,
    planning: &mut Planning,
    set: &ObjectSet,
    look: &Look,
) -> Result<Programmed, Error> {
    let (plan, report, reused) = match look.before.as_ref() {
        Some(p) if !look.planned && !resync => (p.clone(), SyncReport::default(), true),
        _ => {
            if resync {
                // Whatever holds the last plan lets go before the new one
                // is built beside it (two whole plans at once were the
                // agent's peak memory); the kernel's copy stays while a
                // sweep needs it.
                planning.planner = None;
                planning.reported = None;
                ctx.kernel.release_plan();
                // And hands the pages back before the new plan fills the
                // heap again (at 226,000 objects: 290 to 216 MB).
                tokio::task::spawn_blocking(natgw_kube_support::heap::trim).await?;
            }
            let plan = plan(&mut planning.planner, set, ctx.gw, &look.changed)?;
            let (k, p) = (ctx.kernel.clone(), plan.clone());
            let report = tokio::task::spawn_blocking(move || k.program(&p, resync)).await??;
            (plan, report, false)
        }
    };
    // Kept only once the kernel holds it.
    planning.memo = Some(plan.clone());
    if !reused {
        ctx.metrics.synced(report.duration.as_secs_f64(), resync, &plan);
    }
    if report.changed {
        tracing::info!(
            gateway = ctx.gw,
            ms = report.duration.as_millis() as u64,
            nft = report.nft_statements,
            "synced"
        );
    }
    Ok(Programmed { plan, reused })
}

/// The plan for `set`, where `changed` changed since the last call:
/// incremental, or from scratch when there is no planner (the first
/// round, after a failure, and on a resync, so no slip of the incremental
/// path outlives it).
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
        // The agent runs a gateway as one replica (pairs are standalone
        // so far): a LAN address the plan would move is the attachment's.
        (Ok(()), Some(p)) => Ok(Arc::new(p.plan().single_replica())),
        (Err(e), _) => {
            // Changes taken in are lost with the error: plan anew next.
            *planner = None;
            Err(Error::Plan(e))
        }
        (Ok(()), None) => Err(Error::Plan(natgw_plan::PlanError::NoGateway(gw.into()))),
    }
}

/// Step 4: the conditions of the objects whose status may have changed,
/// and of those whose last write failed. With the plan reused, what each
/// should say is what the last round wrote: only failed writes are
/// looked at again.
async fn write_statuses<K, W: Writes>(
    ctx: Ctx<'_, K, W>,
    resync: bool,
    planning: &mut Planning,
    programmed: &Programmed,
    look: &Look,
    finalized: &BTreeSet<ObjectRef>,
) {
    let retry = std::mem::take(&mut planning.status_owed);
    if programmed.reused && retry.is_empty() {
        return;
    }
    let plan = &programmed.plan;
    let fin = finalizer(ctx.gw);
    let scope = match planning.reported.as_ref().filter(|_| !resync) {
        Some(_) if programmed.reused => Some(retry),
        Some(b) => Some(&status_scope(b, plan, &planning.unreported) | &retry),
        None => None,
    };
    let settled = match &scope {
        Some(scope) => lookup(&planning.entries, ctx.gw, scope),
        None => look.mine.clone(),
    };
    let settled: Vec<&Entry> = settled
        .iter()
        .map(|e| &**e)
        .filter(|e| !e.released && (e.finalizers().contains(&fin) || finalized.contains(&e.object)))
        .collect();
    planning.status_owed = report_status(ctx.writes, plan, &settled, ctx.metrics).await;
    if !programmed.reused {
        planning.reported = Some(plan.clone());
        planning.unreported.clear();
    }
}

/// Step 5: the kernel no longer holds these, nor any flow through them
/// once every change is swept: their finalizer goes. Besides what this
/// round looked at: what the plan stopped programming, and releases still
/// owed. Until the sweep settles they stay owed.
async fn release_finalizers<K: Kernel, W: Writes>(
    ctx: Ctx<'_, K, W>,
    planning: &mut Planning,
    set: &ObjectSet,
    programmed: &Programmed,
    look: &Look,
) {
    let fin = finalizer(ctx.gw);
    let plan = &programmed.plan;
    let mut candidates = look.mine.clone();
    if !look.full {
        let mut refs: BTreeSet<&ObjectRef> = look.owed.iter().collect();
        if let Some(b) = look.before.as_ref().filter(|_| !programmed.reused) {
            use imbl::ordset::DiffItem;
            for d in b.programmed.diff(&plan.programmed) {
                if let DiffItem::Remove(r) = d {
                    refs.insert(r);
                }
            }
        }
        let seen: BTreeSet<&ObjectRef> = look.mine.iter().map(|e| &e.object).collect();
        candidates.extend(lookup(&planning.entries, ctx.gw, refs.into_iter().filter(|r| !seen.contains(r))));
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
    let unreleased = std::sync::Mutex::new(BTreeSet::new());
    if ctx.kernel.swept() {
        futures::stream::iter(&gone)
            .for_each_concurrent(WRITES, |e| async {
                let list: Vec<String> = e.finalizers().iter().filter(|f| **f != fin).cloned().collect();
                if let Err(err) = ctx.writes.set_finalizers(e, list).await {
                    tracing::info!(object = %e.object, error = %err, "finalizer not removed yet");
                    unreleased.lock().unwrap_or_else(|p| p.into_inner()).insert(e.object.clone());
                }
            })
            .await;
    } else {
        unreleased.lock().unwrap_or_else(|p| p.into_inner()).extend(gone.iter().map(|e| e.object.clone()));
    }
    planning.owed.extend(unreleased.into_inner().unwrap_or_else(|p| p.into_inner()));
}
