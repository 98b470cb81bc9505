//! The cluster controller. This part owns the lifecycle every kind
//! shares: the `natgw.io/controller` finalizer and deletion order.
//! An object with dependents stays until they are gone, with a
//! `DeletionBlocked` condition and an Event naming them.

pub mod address;
mod args;
mod conditions;
pub mod crds;
mod deletion;
pub mod deps;
mod eip;
mod gateway;
mod leader;
mod orphans;
mod reconcile;
mod rule;
mod users;
mod vpc;
pub mod workload;

pub use args::Args;
pub use leader::{Election, run_elected};

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{ObjectRef as CacheRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use natgw_api::*;
use natgw_kube_support::cached_events_in;

pub use natgw_kube_support::{KindResource, cached, cached_in, is_ready, undecodable_total};

/// Held by every natgw object until its deletion may proceed.
pub const FINALIZER: &str = natgw_api::CONTROLLER_FINALIZER;
/// Server-side apply field manager of the controller.
pub const MANAGER: &str = "natgw-controller";
const BLOCKED_RETRY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("deletion blocked: {0}")]
    Blocked(String),
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("finalizer")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Someone else wrote the object between our read and our write (the
    /// agent adds its finalizer at the same time): retry at once.
    #[error("write conflict")]
    Conflict(#[source] kube::Error),
}

/// The caches of every kind, shared by all reconcilers.
#[derive(Clone)]
pub struct Stores {
    vpcs: Store<Vpc>,
    subnets: Store<Subnet>,
    gateways: Store<NatGateway>,
    eips: Store<Eip>,
    floating_ips: Store<FloatingIp>,
    snat_rules: Store<SnatRule>,
    dnat_rules: Store<DnatRule>,
}

impl Stores {
    /// Waits until every cache has listed once. Judging dependents from a
    /// cache that has not synced yet would see none: the restart bug.
    async fn ready(&self) {
        natgw_kube_support::all_listed(&[
            &self.vpcs,
            &self.subnets,
            &self.gateways,
            &self.eips,
            &self.floating_ips,
            &self.snat_rules,
            &self.dnat_rules,
        ])
        .await
    }
}

/// Deletion order and a Vpc's members read the caches themselves (their
/// objects shared, not copied).
impl deps::Objects for Stores {
    fn subnets(&self) -> Vec<Arc<Subnet>> {
        self.subnets.state()
    }
    fn gateways(&self) -> Vec<Arc<NatGateway>> {
        self.gateways.state()
    }
    fn eips(&self) -> Vec<Arc<Eip>> {
        self.eips.state()
    }
    fn floating_ips(&self) -> Vec<Arc<FloatingIp>> {
        self.floating_ips.state()
    }
    fn snat_rules(&self) -> Vec<Arc<SnatRule>> {
        self.snat_rules.state()
    }
    fn dnat_rules(&self) -> Vec<Arc<DnatRule>> {
        self.dnat_rules.state()
    }
}

pub struct Ctx {
    client: Client,
    stores: Stores,
    reporter: natgw_kube_support::events::Reporter,
    /// Where address claims and gateway workloads live (the controller's
    /// own namespace).
    namespace: String,
    options: Options,
    /// Address claims known to this leadership term.
    book: address::Book,
    /// The gateway pods, for WorkloadReady.
    pods: Store<k8s_openapi::api::core::v1::Pod>,
    /// The gateway StatefulSets, as the watch last saw them.
    statefulsets: Store<k8s_openapi::api::apps::v1::StatefulSet>,
    /// Per gateway UID, the digest of the StatefulSet last applied and the
    /// resourceVersion the apply returned: while the cache shows that
    /// version and the desired body is the same, nothing is applied.
    applied: std::sync::Mutex<std::collections::HashMap<String, (u64, Option<String>)>>,
    /// Which rules name each Eip.
    users: users::Users,
    /// Eip status applies made, by Eip: (its resourceVersion then, a
    /// digest of the apply), until the cache shows a newer version. The
    /// apply's text was about 300 bytes an Eip, kept for every one.
    written: std::sync::Mutex<std::collections::HashMap<String, (Option<String>, u64)>>,
    /// When each gateway's identity (by gateway UID) was last applied: a
    /// gateway is reconciled at every change of its Eips, and three writes
    /// each time bought nothing.
    identities: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// NetworkAttachmentDefinitions looked up (namespace, name): whether
    /// each exists, and when that was read. Most gateways share one; 1,000
    /// of them asked the API server the same question in one burst.
    networks: std::sync::Mutex<std::collections::HashMap<(String, String), (std::time::Instant, gateway::Network)>>,
    /// Failed reconciles in a row, by object: each waits twice as long.
    retries: natgw_kube_support::backoff::Backoff<(natgw_api::Kind, String)>,
}

/// A 64-bit digest of `v`, compared only within this process: what the
/// controller keeps of a write to tell that the next one is the same.
pub(crate) fn digest(v: impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut h = std::hash::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// The controller's /readyz and /metrics: ready once it is a standby, or
/// leading with its caches listed; `natgw_leader` says which.
#[derive(Clone)]
pub struct Health {
    pub probe: natgw_kube_support::health::Probe,
    leader: prometheus_client::metrics::gauge::Gauge,
    /// Per gateway, 1 while its pod runs another image than its StatefulSet
    /// asks for (gateways update `OnDelete`).
    image_skew: prometheus_client::metrics::family::Family<
        natgw_kube_support::health::Labels,
        prometheus_client::metrics::gauge::Gauge,
    >,
}

impl Default for Health {
    fn default() -> Self {
        let leader = prometheus_client::metrics::gauge::Gauge::default();
        let image_skew = prometheus_client::metrics::family::Family::default();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("natgw_leader", "1 while this instance leads", leader.clone());
        registry.register(
            "natgw_gateway_image_skew",
            "1 while a gateway's pod runs another image than its StatefulSet asks for (gateways update OnDelete: delete the pod to move it)",
            image_skew.clone(),
        );
        Health { probe: natgw_kube_support::health::Probe::new(registry), leader, image_skew }
    }
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Health")
    }
}

impl Health {
    pub(crate) fn leading(&self, yes: bool) {
        self.leader.set(i64::from(yes));
    }

    pub(crate) fn image_skew(&self, gateway: &str, skewed: Option<bool>) {
        let labels = natgw_kube_support::health::labels(&[("gateway", gateway)]);
        match skewed {
            Some(s) => {
                self.image_skew.get_or_create(&labels).set(i64::from(s));
            }
            None => {
                self.image_skew.remove(&labels);
            }
        }
    }

    /// Whether this instance leads now (`natgw_leader`).
    pub fn is_leading(&self) -> bool {
        self.leader.get() == 1
    }
}

/// How the controller runs, beyond the client and its namespace.
#[derive(Clone, Debug)]
pub struct Options {
    /// The gateway pods' image and settings.
    pub gateway_pod: workload::GatewayPod,
    /// How long a NatGateway being deleted may go without a ready agent
    /// before the controller releases the agent's finalizers itself.
    pub release_after: Duration,
    pub health: Health,
    /// Reconciles in flight per kind. Each holds a connection to the API
    /// server with its buffers: unbounded, a burst of thousands of objects
    /// held one per object.
    pub workers: u16,
    /// Whether the leader applies natgw's CRDs at the start of its term
    /// (`crds`): the chart sets it; tests that install older CRDs on
    /// purpose do not.
    pub apply_crds: bool,
}

/// `Options::workers` unless set.
pub const DEFAULT_WORKERS: u16 = 32;

impl Default for Options {
    fn default() -> Self {
        Options {
            gateway_pod: Default::default(),
            release_after: Duration::from_secs(300),
            health: Health::default(),
            workers: DEFAULT_WORKERS,
            apply_crds: false,
        }
    }
}

/// A controller of kind K over a cache without managedFields.
fn primary<K: KindResource>(client: &Client) -> Controller<K> {
    let (reader, events) = cached_events_in(client, None, watcher::Config::default(), "controller", trim::<K>);
    Controller::for_stream(events.applied_objects(), reader)
}

/// What the controller's caches keep of the agent's conditions: whether
/// the object is Ready (a rule's binding reads its Eip's), nothing of
/// their words. The controller never writes the agent's conditions, and
/// they were about 0.5 KB an object (58 -> 53 MB at 10,000 objects).
///
/// Of the metadata, no annotation and only natgw's labels: the controller
/// reads neither, and a tenant's 250 KiB of annotations on each of 300
/// rules was 75 MB held by the controller and again by its standby.
fn trim<K: KindResource>(o: &mut K) {
    let m = o.meta_mut();
    m.annotations = None;
    if let Some(labels) = m.labels.as_mut() {
        labels.retain(|k, _| k.starts_with("natgw.io/"));
        if labels.is_empty() {
            m.labels = None;
        }
    }
    let Some(conditions) = o.conditions_mut() else {
        return;
    };
    conditions.retain_mut(|c| {
        if !AGENT_CONDITIONS.contains(&c.type_.as_str()) {
            return true;
        }
        // Taken, not cleared: a cleared string keeps its allocation.
        drop((std::mem::take(&mut c.reason), std::mem::take(&mut c.message)));
        c.type_ == "Ready"
    });
    conditions.shrink_to_fit();
}

/// A controller of rule kind K, and the same changes (deletions too) for
/// other controllers, each passed on once K's cache holds it and `users`
/// took it in. The relay drives both until `stop`.
fn shared<K: KindResource>(
    client: &Client,
    users: &users::Users,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> (
    Controller<K>,
    impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (reader, events) = cached_events_in(client, None, watcher::Config::default(), "controller", trim::<K>);
    let stream = events.touched_objects();
    let (to_self, from_self) = futures::channel::mpsc::unbounded();
    let (to_others, from_others) = futures::channel::mpsc::unbounded();
    let (users, cache) = (users.clone(), reader.clone());
    let relay = stream.take_until(stop).for_each(move |item| {
        if let Ok(o) = &item {
            users.touched(&cache, o);
            let _ = to_others.unbounded_send(Ok(o.clone()));
        }
        let _ = to_self.unbounded_send(item);
        futures::future::ready(())
    });
    (Controller::for_stream(from_self, reader), from_others, relay)
}

fn parent<P: KindResource>(name: &str) -> Option<CacheRef<P>> {
    (!name.is_empty()).then(|| CacheRef::new(name))
}

/// Runs the controllers of all kinds until `shutdown` resolves.
/// `namespace` holds the address claims and gateway workloads (the
/// controller's own namespace).
pub async fn run(
    client: Client,
    instance: Option<String>,
    namespace: String,
    options: Options,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stop = move || {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let cfg = watcher::Config::default();
    let all = |c: &Client| c.clone();
    let vpc = primary::<Vpc>(&client)
        .watches(Api::<Subnet>::all(all(&client)), cfg.clone(), |s| s.spec.vpc.as_deref().and_then(parent::<Vpc>))
        .watches(Api::<NatGateway>::all(all(&client)), cfg.clone(), |g| parent::<Vpc>(&g.spec.vpc));
    let subnet = primary::<Subnet>(&client)
        .watches(Api::<NatGateway>::all(all(&client)), cfg.clone(), |g| parent::<Subnet>(&g.spec.external_subnet));
    // The workloads too: a deleted StatefulSet comes back.
    let (k, v) = workload::WORKLOAD_LABEL;
    let workloads = watcher::Config::default().labels(&format!("{k}={v}"));
    let (pods, pod_events) = cached_in(&client, Some(&namespace), workloads.clone(), "controller");
    // Cached, so that a reconcile applies a StatefulSet only when it
    // differs from what was applied: 1,000 gateways re-applied theirs at
    // every Eip change and every retry.
    let (statefulsets, sts_events) = natgw_kube_support::cache::cached_events_in::<
        k8s_openapi::api::apps::v1::StatefulSet,
    >(&client, Some(&namespace), workloads, "controller", |_| {});
    let gateway = primary::<NatGateway>(&client)
        .watches(Api::<Eip>::all(all(&client)), cfg.clone(), |e| parent::<NatGateway>(&e.spec.gateway))
        .watches_stream(sts_events.touched_objects(), |s: k8s_openapi::api::apps::v1::StatefulSet| {
            s.labels().get(GATEWAY_LABEL).and_then(|g| parent::<NatGateway>(g))
        })
        // And their pods: WorkloadReady follows the pod's state.
        .watches_stream(pod_events, |p: k8s_openapi::api::core::v1::Pod| {
            p.labels().get(GATEWAY_LABEL).and_then(|g| parent::<NatGateway>(g))
        });
    // The rules' own caches trigger their Eips (`status.usedBy`). A watch
    // of its own could fire before the cache held the change: the Eip
    // then read a stale cache and was never triggered again.
    let users = users::Users::default();
    let (fip, fip_events, fip_relay) = shared::<FloatingIp>(&client, &users, stop());
    let (snat, snat_events, snat_relay) = shared::<SnatRule>(&client, &users, stop());
    let (dnat, dnat_events, dnat_relay) = shared::<DnatRule>(&client, &users, stop());
    let (wake, woken) = futures::channel::mpsc::unbounded::<String>();
    let eip = primary::<Eip>(&client)
        .watches_stream(fip_events, |f: FloatingIp| parent::<Eip>(&f.spec.eip))
        .watches_stream(snat_events, |s: SnatRule| parent::<Eip>(&s.spec.eip))
        .watches_stream(dnat_events, |d: DnatRule| parent::<Eip>(&d.spec.eip))
        .reconcile_on(woken.map(|name| CacheRef::new(&name)));
    let stores = Stores {
        vpcs: vpc.store(),
        subnets: subnet.store(),
        gateways: gateway.store(),
        eips: eip.store(),
        floating_ips: fip.store(),
        snat_rules: snat.store(),
        dnat_rules: dnat.store(),
    };
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        stores,
        reporter: natgw_kube_support::events::Reporter {
            component: "controller".into(),
            instance: instance.unwrap_or_else(|| MANAGER.into()),
        },
        namespace: namespace.clone(),
        options,
        book: address::Book::waking(wake),
        pods,
        statefulsets,
        applied: Default::default(),
        users,
        written: Default::default(),
        identities: Default::default(),
        networks: Default::default(),
        retries: Default::default(),
    });
    let gc_ctx = ctx.clone();
    let workers = kube::runtime::controller::Config::default().concurrency(ctx.options.workers.max(1));
    macro_rules! drive {
        ($c:expr, $k:ty) => {
            $c.with_config(workers.clone()).graceful_shutdown_on(stop()).run(reconcile::reconcile::<$k>, reconcile::error_policy::<$k>, ctx.clone()).for_each(|r| async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "controller event");
                }
            })
        };
    }
    // No detached tasks: dropping this future stops everything it started
    // (a spawned relay once kept a dead leader's Lease alive).
    let relay = async move {
        shutdown.await;
        let _ = tx.send(true);
    };
    // Ready once every cache has listed.
    let health = ctx.options.health.clone();
    let listed = ctx.clone();
    let ready = async move {
        listed.stores.ready().await;
        health.probe.ready();
    };
    let controllers = async {
        futures::join!(
            ready,
            drive!(vpc, Vpc),
            drive!(subnet, Subnet),
            drive!(gateway, NatGateway),
            drive!(eip, Eip),
            drive!(fip, FloatingIp),
            drive!(snat, SnatRule),
            drive!(dnat, DnatRule),
        )
    };
    // Claims of Eips that are gone (their address is off the gateway), and
    // finalizers of agents that will never run again. Candidates come from
    // the caches; the API server confirms each before anything goes.
    // The CRDs this binary knows, until applied once; a failure says so
    // every 30 s (an upgraded cluster would keep older validation).
    let apply_crds = ctx.options.apply_crds;
    let crds_client = client.clone();
    let stop_crds = stop();
    let crds = async move {
        tokio::pin!(stop_crds);
        if !apply_crds {
            return;
        }
        loop {
            match crds::apply(&crds_client).await {
                Ok(names) => {
                    tracing::info!(crds = names.len(), "applied natgw's CRDs");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot apply natgw's CRDs: this cluster keeps their older validation")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                _ = &mut stop_crds => return,
            }
        }
    };
    let stop_gc = stop();
    let gc = async move {
        tokio::pin!(stop_gc);
        let mut orphans = orphans::Sweeper::default();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = &mut stop_gc => return,
            }
            gc_ctx.stores.ready().await;
            let eips = &gc_ctx.stores.eips;
            let cached_uid = |name: &str| eips.get(&CacheRef::new(name)).and_then(|e| e.uid());
            if let Err(e) = address::release_orphans(&client, &namespace, &gc_ctx.book, cached_uid).await {
                tracing::warn!(error = %e, "cannot release address claims");
            }
            if let Err(e) = orphans.sweep(&gc_ctx).await {
                tracing::warn!(error = %e, "cannot release finalizers of gone gateways");
            }
        }
    };
    futures::join!(relay, controllers, crds, gc, fip_relay, snat_relay, dnat_relay);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_the_controllers_conditions_whole_and_of_the_agents_only_ready() {
        let condition = |t: &str, s: &str| {
            natgw_kube_support::status::condition(t, s, "Why", format!("what {t} says at length"), Some(3))
        };
        let mut fip: FloatingIp =
            natgw_testenv::natgw_object("FloatingIp", "f", serde_json::json!({"eip": "e", "internalIp": "10.0.0.5"}))
                .unwrap();
        let written = ["Bound", "Programmed", "Conflict", "Ready", "DeletionBlocked"];
        fip.status = Some(CommonStatus {
            conditions: written.iter().map(|t| condition(t, "True")).collect(),
            ..Default::default()
        });
        trim(&mut fip);
        let kept: Vec<_> = fip.conditions().iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(kept, ["Bound", "Ready", "DeletionBlocked"]);
        for c in fip.conditions() {
            assert_eq!(c.status, "True");
            assert_eq!(c.observed_generation, Some(3));
            let whole = c.type_ != "Ready";
            assert_eq!(c.message.is_empty(), !whole, "{}", c.type_);
            assert_eq!(c.reason.is_empty(), !whole, "{}", c.type_);
        }
        // Of the metadata, natgw's labels only.
        let mut tagged = fip.clone();
        tagged.metadata.annotations = Some([("note".to_string(), "x".repeat(250 << 10))].into());
        tagged.metadata.labels =
            Some([(GATEWAY_LABEL.to_string(), "gw".to_string()), ("team".to_string(), "a".to_string())].into());
        trim(&mut tagged);
        assert!(tagged.metadata.annotations.is_none());
        assert_eq!(tagged.labels().keys().collect::<Vec<_>>(), [GATEWAY_LABEL]);
        // No status: nothing to trim.
        let mut bare = fip.clone();
        bare.status = None;
        trim(&mut bare);
        assert!(bare.status.is_none());
    }
}
