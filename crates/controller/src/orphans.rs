//! Objects must never stay stuck on the finalizer of a gateway agent that
//! will not run again:
//! - its NatGateway is gone for good: with it went its workload and the
//!   namespace that held the state. The NatGateway, asked of the API
//!   server, is the sentinel; a cache only proposes candidates.
//! - its NatGateway is being deleted, its workload has had no ready pod
//!   for `Options::release_after` (its node is gone, its image is missing),
//!   and no pod of it is left that may still hold its addresses: rules
//!   would wait for the agent, the Eip for the rules, the gateway for the
//!   Eip, forever. The pod's namespace, and the state in it, went with the
//!   pod, so the controller releases the agent's finalizers on the objects
//!   being deleted, with an Event on each. A pod that is there but not
//!   ready (Running, its probe failing; on a node that stopped answering)
//!   may still answer ARP for its EIPs: releasing then would hand the
//!   address to a new Eip while the old pod holds it. It waits until the
//!   pod object is gone, or its Node is, with an Event on the gateway
//!   saying which pod it waits for.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::reflector::Store;
use natgw_api::{
    DnatRule, Eip, FloatingIp, GATEWAY_FINALIZER_PREFIX, GATEWAY_LABEL, NatGateway, SnatRule, gateway_finalizer,
};

use crate::conditions::warn;
use crate::{Ctx, KindResource, workload};

/// Remembers since when each gateway being deleted has had no ready agent,
/// and which pod it was told to wait for.
#[derive(Default)]
pub struct Sweeper {
    unready_since: HashMap<String, Instant>,
    waiting_for: HashMap<String, String>,
}

/// Why a finalizer is released.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Why {
    Gone,
    Abandoned,
}

impl Sweeper {
    /// Releases what may be released; returns how many objects it changed.
    pub async fn sweep(&mut self, ctx: &Ctx) -> Result<usize, kube::Error> {
        let gateways = ctx.stores.gateways.state();
        let live: BTreeSet<String> = gateways.iter().map(|g| gateway_finalizer(&g.name_any())).collect();
        let deleting: Vec<String> =
            gateways.iter().filter(|g| g.metadata.deletion_timestamp.is_some()).map(|g| g.name_any()).collect();
        self.unready_since.retain(|g, _| deleting.contains(g));
        self.waiting_for.retain(|g, _| deleting.contains(g));
        let mut abandoned = BTreeSet::new();
        for gw in deleting {
            if workload_ready(ctx, &gw).await? {
                self.unready_since.remove(&gw);
                continue;
            }
            let since = *self.unready_since.entry(gw.clone()).or_insert_with(Instant::now);
            if since.elapsed() < ctx.options.release_after {
                continue;
            }
            match holder(ctx, &gw).await? {
                None => {
                    abandoned.insert(gateway_finalizer(&gw));
                }
                Some(pod) if self.waiting_for.get(&gw) != Some(&pod) => {
                    let note = format!(
                        "the agent has had no ready pod for {} s, but {pod} may still hold this gateway's \
                         addresses: its finalizers are released once that pod is gone (delete it, or its Node \
                         if the node is gone for good)",
                        ctx.options.release_after.as_secs()
                    );
                    if let Some(g) = gateways.iter().find(|g| g.name_any() == gw) {
                        warn(ctx, &**g, "ReleaseWaitsForPod", "ReleaseFinalizer", &note).await;
                    }
                    self.waiting_for.insert(gw, pod);
                }
                Some(_) => {}
            }
        }
        let why = |f: &String| {
            if !f.starts_with(GATEWAY_FINALIZER_PREFIX) {
                None
            } else if !live.contains(f) {
                Some(Why::Gone)
            } else if abandoned.contains(f) {
                Some(Why::Abandoned)
            } else {
                None
            }
        };
        let candidates = Candidates {
            eips: found(&ctx.stores.eips, &why),
            fips: found(&ctx.stores.floating_ips, &why),
            snats: found(&ctx.stores.snat_rules, &why),
            dnats: found(&ctx.stores.dnat_rules, &why),
        };
        if candidates.is_empty() {
            return Ok(0);
        }
        // The API server confirms that a gateway is gone before its
        // finalizers go: one list, only when there is a candidate.
        let confirmed: BTreeSet<String> = if candidates.any(Why::Gone) {
            Api::<NatGateway>::all(ctx.client.clone())
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .map(|g| gateway_finalizer(&g.name_any()))
                .collect()
        } else {
            BTreeSet::new()
        };
        let Candidates { eips, fips, snats, dnats } = candidates;
        Ok(release(ctx, &confirmed, eips).await?
            + release(ctx, &confirmed, fips).await?
            + release(ctx, &confirmed, snats).await?
            + release(ctx, &confirmed, dnats).await?)
    }
}

/// A pod of the gateway that may still hold its state (`pod P on node N`):
/// one that was scheduled to a Node that still exists. A pod never
/// scheduled held nothing. Asked of the API server, like the gateway's
/// absence: a pod created a moment ago may not be in the cache yet, and
/// releasing on that would hand its addresses on while it holds them.
async fn holder(ctx: &Ctx, gw: &str) -> Result<Option<String>, kube::Error> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    for pod in pods.list(&ListParams::default().labels(&format!("{GATEWAY_LABEL}={gw}"))).await?.items {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else { continue };
        if nodes.get_opt(node).await?.is_some() {
            return Ok(Some(format!("pod {} on node {node}", pod.name_any())));
        }
    }
    Ok(None)
}

/// Whether the gateway's StatefulSet has a ready pod.
async fn workload_ready(ctx: &Ctx, gw: &str) -> Result<bool, kube::Error> {
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let sts = api.get_opt(&workload::name(gw)).await?;
    Ok(sts.and_then(|s| s.status).and_then(|s| s.ready_replicas).unwrap_or(0) > 0)
}

type Found<K> = Vec<(std::sync::Arc<K>, Vec<(String, Why)>)>;

struct Candidates {
    eips: Found<Eip>,
    fips: Found<FloatingIp>,
    snats: Found<SnatRule>,
    dnats: Found<DnatRule>,
}

/// Cached objects being deleted that carry a finalizer `why` picks.
fn found<K: KindResource>(store: &Store<K>, why: &impl Fn(&String) -> Option<Why>) -> Found<K> {
    let mut out = Found::new();
    for o in store.state() {
        if o.meta().deletion_timestamp.is_none() {
            continue;
        }
        let fins: Vec<(String, Why)> = o.finalizers().iter().filter_map(|f| Some((f.clone(), why(f)?))).collect();
        if !fins.is_empty() {
            out.push((o, fins));
        }
    }
    out
}

impl Candidates {
    fn is_empty(&self) -> bool {
        self.eips.is_empty() && self.fips.is_empty() && self.snats.is_empty() && self.dnats.is_empty()
    }

    fn any(&self, why: Why) -> bool {
        fn has<K>(f: &Found<K>, why: Why) -> bool {
            f.iter().any(|(_, fs)| fs.iter().any(|(_, w)| *w == why))
        }
        has(&self.eips, why) || has(&self.fips, why) || has(&self.snats, why) || has(&self.dnats, why)
    }
}

/// Removes the finalizers picked in `found` from each object; returns how
/// many objects changed.
async fn release<K: KindResource>(
    ctx: &Ctx,
    confirmed_live: &BTreeSet<String>,
    found: Found<K>,
) -> Result<usize, kube::Error> {
    let api: Api<K> = Api::all(ctx.client.clone());
    let mut released = 0;
    for (o, found) in found {
        // A gateway the API server still has is not gone.
        let drop: Vec<(String, Why)> =
            found.into_iter().filter(|(f, w)| *w == Why::Abandoned || !confirmed_live.contains(f)).collect();
        if drop.is_empty() {
            continue;
        }
        let keep: Vec<String> = o.finalizers().iter().filter(|f| !drop.iter().any(|(d, _)| d == *f)).cloned().collect();
        tracing::info!(kind = %K::KIND, name = %o.name_any(), "releasing the finalizer of a gateway agent that will not run again");
        let patch = serde_json::json!({ "metadata": { "resourceVersion": o.resource_version(), "finalizers": keep } });
        api.patch(&o.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
        released += 1;
        if drop.iter().any(|(_, w)| *w == Why::Abandoned) {
            let note = format!(
                "released {}: its NatGateway is being deleted and its agent has had no ready pod for {} s",
                drop.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>().join(", "),
                ctx.options.release_after.as_secs()
            );
            warn(ctx, &*o, "AgentUnavailable", "ReleaseFinalizer", &note).await;
        }
    }
    Ok(released)
}
