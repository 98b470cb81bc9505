//! The cluster controller. This part owns the lifecycle every kind
//! shares: the `natgw.io/controller` finalizer and deletion order.
//! An object with dependents stays until they are gone, with a
//! `DeletionBlocked` condition and an Event naming them.

pub mod address;
mod binding;
mod cache;
pub mod deps;
mod orphans;
pub mod workload;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, Patch, PatchParams};
use kube::core::ClusterResourceScope;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::reflector::{ObjectRef as CacheRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use natgw_api::*;

pub use cache::{cached, cached_in, undecodable_total};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Held by every natgw object until its deletion may proceed.
pub const FINALIZER: &str = "natgw.io/controller";
/// Server-side apply field manager of the controller.
pub const MANAGER: &str = "natgw-controller";
const BLOCKED_RETRY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("deletion blocked: {0}")]
    Blocked(String),
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// Someone else wrote the object between our read and our write (the
    /// agent adds its finalizer at the same time): retry at once.
    #[error("write conflict: {0}")]
    Conflict(String),
}

/// What the controller needs to know about each kind.
pub trait Kind:
    Resource<DynamicType = (), Scope = ClusterResourceScope>
    + Clone
    + DeserializeOwned
    + Serialize
    + Debug
    + Send
    + Sync
    + 'static
{
    const KIND: &'static str;
    fn conditions(&self) -> &[Condition];
}

macro_rules! kind {
    ($t:ty, $name:literal, |$o:ident| $conds:expr) => {
        impl Kind for $t {
            const KIND: &'static str = $name;
            fn conditions(&self) -> &[Condition] {
                let $o = self;
                $conds
            }
        }
    };
}
kind!(Vpc, "Vpc", |o| o.status.as_ref().map(|s| s.common.conditions.as_slice()).unwrap_or_default());
kind!(Subnet, "Subnet", |o| o.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default());
kind!(NatGateway, "NatGateway", |o| o.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default());
kind!(Eip, "Eip", |o| o.status.as_ref().map(|s| s.common.conditions.as_slice()).unwrap_or_default());
kind!(FloatingIp, "FloatingIp", |o| o.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default());
kind!(SnatRule, "SnatRule", |o| o.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default());
kind!(DnatRule, "DnatRule", |o| o.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default());

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
        loop {
            let ready = is_ready(&self.vpcs)
                && is_ready(&self.subnets)
                && is_ready(&self.gateways)
                && is_ready(&self.eips)
                && is_ready(&self.floating_ips)
                && is_ready(&self.snat_rules)
                && is_ready(&self.dnat_rules);
            if ready {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn snapshot(&self) -> ObjectSet {
        let mut set = ObjectSet::default();
        self.vpcs.state().iter().for_each(|o| drop(set.insert(Object::Vpc((**o).clone()))));
        self.subnets.state().iter().for_each(|o| drop(set.insert(Object::Subnet((**o).clone()))));
        self.gateways.state().iter().for_each(|o| drop(set.insert(Object::NatGateway((**o).clone()))));
        self.eips.state().iter().for_each(|o| drop(set.insert(Object::Eip((**o).clone()))));
        self.floating_ips.state().iter().for_each(|o| drop(set.insert(Object::FloatingIp((**o).clone()))));
        self.snat_rules.state().iter().for_each(|o| drop(set.insert(Object::SnatRule((**o).clone()))));
        self.dnat_rules.state().iter().for_each(|o| drop(set.insert(Object::DnatRule((**o).clone()))));
        set
    }
}

pub struct Ctx {
    client: Client,
    stores: Stores,
    recorder: Recorder,
    /// Where address claims and gateway workloads live (the controller's
    /// own namespace).
    namespace: String,
    options: Options,
    /// Address claims known to this leadership term.
    book: address::Book,
}

/// How the controller runs, beyond the client and its namespace.
#[derive(Clone, Debug)]
pub struct Options {
    /// Image of the gateway workloads' agent.
    pub agent_image: Option<String>,
    /// How long a NatGateway being deleted may go without a ready agent
    /// before the controller releases the agent's finalizers itself.
    pub release_after: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options { agent_image: None, release_after: Duration::from_secs(300) }
    }
}

async fn reconcile<K: Kind>(obj: Arc<K>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let api: Api<K> = Api::all(ctx.client.clone());
    // The helper adds the finalizer before Apply runs and removes it only
    // when Cleanup returns Ok.
    finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Event::Apply(o) => apply(&ctx, &*o).await,
            Event::Cleanup(o) => cleanup(&ctx, &*o).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::CleanupFailed(Error::Blocked(m)) => Error::Blocked(m),
        kube::runtime::finalizer::Error::AddFinalizer(kube::Error::Api(s))
        | kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(s))
            if s.code == 409 || s.code == 422 =>
        {
            Error::Conflict(s.message)
        }
        other => Error::Finalizer(other.to_string()),
    })
}

async fn apply<K: Kind>(ctx: &Ctx, obj: &K) -> Result<Action, Error> {
    // Two kinds have work of their own; the rest only carry the finalizer.
    let any: &dyn std::any::Any = obj;
    if let Some(eip) = any.downcast_ref::<Eip>() {
        return assign_address(ctx, eip).await;
    }
    if let Some(gw) = any.downcast_ref::<NatGateway>() {
        return ensure_workload(ctx, gw).await;
    }
    if let Some(eip) = binding::rule_eip(any) {
        return bind_rule(ctx, obj, eip).await;
    }
    if K::KIND == "Vpc" {
        ctx.stores.ready().await;
        let set = ctx.stores.snapshot();
        let name = obj.name_any();
        let subnets: Vec<&String> =
            set.subnets.iter().filter(|(_, s)| s.spec.vpc.as_deref() == Some(name.as_str())).map(|(n, _)| n).collect();
        let gateways: Vec<&String> = set.gateways.iter().filter(|(_, g)| g.spec.vpc == name).map(|(n, _)| n).collect();
        let status = serde_json::json!({ "subnets": subnets, "gateways": gateways });
        patch_status::<K>(ctx, "natgw-controller/members", &name, status).await?;
    }
    Ok(Action::await_change())
}

/// Labels a rule with its Eip's gateway, which then programs it. A rule
/// whose Eip does not exist says so in a `Bound` condition.
async fn bind_rule<K: Kind>(ctx: &Ctx, obj: &K, eip: &str) -> Result<Action, Error> {
    let gateway = ctx.stores.eips.get(&CacheRef::new(eip)).map(|e| e.spec.gateway.clone());
    if let Some(gw) = &gateway {
        binding::label(&ctx.client, obj, gw).await?;
    }
    let (status, reason, message) = match &gateway {
        Some(gw) => ("True", "EipFound", format!("Eip {eip} is on NatGateway {gw}")),
        None => ("False", "EipNotFound", format!("spec.eip: Eip {eip:?} does not exist")),
    };
    // A bound rule writes nothing more unless it once was unbound.
    let current = obj.conditions().iter().find(|c| c.type_ == "Bound");
    let write = match current {
        None => status == "False",
        Some(c) => c.status != status || c.message != message,
    };
    if write {
        let condition = condition("Bound", status, reason, message, obj.meta().generation);
        patch_status::<K>(
            ctx,
            "natgw-controller/binding",
            &obj.name_any(),
            serde_json::json!({ "conditions": [condition] }),
        )
        .await?;
    }
    // No watch maps Eips to their rules: look again for a missing one.
    Ok(if gateway.is_some() { Action::await_change() } else { Action::requeue(BLOCKED_RETRY) })
}

/// Gives an Eip its address (see `address`) and says so in its status.
async fn assign_address(ctx: &Ctx, eip: &Eip) -> Result<Action, Error> {
    binding::label(&ctx.client, eip, &eip.spec.gateway).await?;
    ctx.stores.ready().await;
    // Two lookups, not a snapshot: a thousand Eips at once made copying
    // every cached object per reconcile the controller's main cost.
    let subnet = ctx
        .stores
        .gateways
        .get(&CacheRef::new(&eip.spec.gateway))
        .and_then(|g| ctx.stores.subnets.get(&CacheRef::new(&g.spec.external_subnet)));
    let subnet = subnet.as_ref().map(|s| &s.spec);
    let outcome = address::ensure(&ctx.client, &ctx.namespace, &ctx.book, subnet, eip).await?;
    let (status, reason, message, ip) = match outcome {
        address::Outcome::Held(ip) => ("True", "Claimed", format!("holds {ip}"), Some(ip)),
        address::Outcome::Taken { ip, by } => ("False", "AddressTaken", format!("{ip} is held by Eip {by}"), None),
        address::Outcome::Exhausted => {
            ("False", "SubnetExhausted", "the external subnet has no free address".to_string(), None)
        }
        address::Outcome::NoSubnet => (
            "False",
            "NoExternalSubnet",
            format!("NatGateway {:?} or its external subnet does not exist", eip.spec.gateway),
            None,
        ),
        address::Outcome::BadSubnet(why) => ("False", "InvalidSubnet", format!("the external subnet: {why}"), None),
        address::Outcome::Refused(why) => ("False", "AddressRefused", why, None),
    };
    let current = eip.status.as_ref();
    let unchanged = current.is_some_and(|s| {
        s.ip == ip.or(s.ip).filter(|_| ip.is_some())
            && s.common
                .conditions
                .iter()
                .any(|c| c.type_ == "AddressAssigned" && c.status == status && c.message == message)
    });
    if !unchanged {
        let condition = condition("AddressAssigned", status, reason, message.clone(), eip.metadata.generation);
        let mut body = serde_json::json!({ "conditions": [condition] });
        if let Some(ip) = ip {
            body["ip"] = serde_json::json!(ip);
        }
        patch_status::<Eip>(ctx, "natgw-controller/address", &eip.name_any(), body).await?;
        if ip.is_none() {
            let event = KubeEvent {
                type_: EventType::Warning,
                reason: reason.into(),
                note: Some(message),
                action: "AssignAddress".into(),
                secondary: None,
            };
            let _ = ctx.recorder.publish(&event, &eip.object_ref(&())).await;
        }
    }
    Ok(if ip.is_some() { Action::await_change() } else { Action::requeue(Duration::from_secs(5)) })
}

/// Applies the gateway's StatefulSet, or says why it cannot.
async fn ensure_workload(ctx: &Ctx, gw: &NatGateway) -> Result<Action, Error> {
    let (status, reason, message) = match workload::desired(gw, &ctx.namespace, ctx.options.agent_image.as_deref()) {
        Ok(body) => {
            workload::apply(&ctx.client, &ctx.namespace, &body).await?;
            ("True", "Applied", format!("StatefulSet {}/{}", ctx.namespace, workload::name(&gw.name_any())))
        }
        Err(why) => ("False", "NotConfigured", why),
    };
    report_validity(ctx, gw).await?;
    let manager = "natgw-controller/workload";
    set_condition(ctx, gw, manager, ("WorkloadReady", status, reason, message), "CreateWorkload").await?;
    Ok(Action::await_change())
}

/// Writes condition (type, status, reason, message) with `manager` when it
/// changed, and when it is False says so in a Warning Event too.
async fn set_condition<K: Kind>(
    ctx: &Ctx,
    obj: &K,
    manager: &str,
    (type_, status, reason, message): (&str, &str, &str, String),
    action: &str,
) -> Result<(), Error> {
    let current = obj.conditions().iter().find(|c| c.type_ == type_);
    if current.is_some_and(|c| c.status == status && c.message == message) {
        return Ok(());
    }
    let condition = condition(type_, status, reason, message.clone(), obj.meta().generation);
    patch_status::<K>(ctx, manager, &obj.name_any(), serde_json::json!({ "conditions": [condition] })).await?;
    if status == "False" {
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(message),
            action: action.into(),
            secondary: None,
        };
        let _ = ctx.recorder.publish(&event, &obj.object_ref(&())).await;
    }
    Ok(())
}

/// `Valid` on a NatGateway: an object stored before a CEL rule existed
/// (a route with host bits, a bad next hop) is named here; the planner
/// skips what is invalid instead of failing every sync.
async fn report_validity(ctx: &Ctx, gw: &NatGateway) -> Result<(), Error> {
    let errors = validate_object(&Object::NatGateway(gw.clone()));
    let (status, reason, message) = match errors.first() {
        None => ("True", "Valid", String::new()),
        Some(e) => ("False", "InvalidSpec", e.to_string()),
    };
    // A valid gateway that never was invalid writes nothing.
    if status == "True" && gw.conditions().iter().all(|c| c.type_ != "Valid") {
        return Ok(());
    }
    set_condition(ctx, gw, "natgw-controller/validity", ("Valid", status, reason, message), "Validate").await
}

async fn cleanup<K: Kind>(ctx: &Ctx, obj: &K) -> Result<Action, Error> {
    ctx.stores.ready().await;
    let me = natgw_api::ObjectRef::new(K::KIND, obj.name_any());
    let blockers = deps::blockers(&ctx.stores.snapshot(), &me);
    if blockers.is_empty() {
        if K::KIND == "NatGateway" {
            workload::remove(&ctx.client, &ctx.namespace, &obj.name_any()).await?;
        }
        return Ok(Action::await_change());
    }
    let message = format!("waiting for {} to be deleted first", deps::describe(&blockers));
    let current = obj.conditions().iter().find(|c| c.type_ == "DeletionBlocked");
    if current.is_none_or(|c| c.message != message || c.status != "True") {
        let condition = condition("DeletionBlocked", "True", "DependentsExist", message.clone(), obj.meta().generation);
        let conditions = serde_json::json!({ "conditions": [condition] });
        patch_status::<K>(ctx, "natgw-controller/deletion", &obj.name_any(), conditions).await?;
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "DeletionBlocked".into(),
            note: Some(message.clone()),
            action: "Delete".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(object = %me, error = %e, "cannot publish Event");
        }
    }
    Err(Error::Blocked(format!("{me}: {message}")))
}

/// Server-side apply of part of the status. Each purpose has its own field
/// manager: an apply removes the fields its manager applied before and
/// leaves out now.
/// A condition that changed now.
fn condition(type_: &str, status: &str, reason: &str, message: String, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
        observed_generation: generation,
    }
}

async fn patch_status<K: Kind>(ctx: &Ctx, manager: &str, name: &str, status: serde_json::Value) -> Result<(), Error> {
    let api: Api<K> = Api::all(ctx.client.clone());
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(manager).force(), &Patch::Apply(&body)).await?;
    Ok(())
}

fn error_policy<K: Kind>(obj: Arc<K>, err: &Error, _: Arc<Ctx>) -> Action {
    match err {
        Error::Blocked(_) => Action::requeue(BLOCKED_RETRY),
        Error::Conflict(m) => {
            tracing::debug!(kind = K::KIND, name = %obj.name_any(), conflict = %m, "retrying");
            Action::requeue(Duration::from_millis(50))
        }
        e => {
            tracing::warn!(kind = K::KIND, name = %obj.name_any(), error = %e, "reconcile failed");
            Action::requeue(Duration::from_secs(5))
        }
    }
}

/// Whether a cache has listed once, without waiting on it: in kube-runtime
/// 5.0 a store wakes only its last waiter (DelayedInit over a oneshot), and
/// the Controller itself waits on the same store, so a reconciler awaiting
/// `wait_until_ready` could sleep forever (seen after a restart).
pub fn is_ready<K>(store: &Store<K>) -> bool
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
}

/// A controller of kind K over a cache without managedFields.
fn primary<K: Kind>(client: &Client) -> Controller<K> {
    let (reader, stream) = cached(client, watcher::Config::default(), "controller");
    Controller::for_stream(stream, reader)
}

fn parent<P: Kind>(name: &str) -> Option<CacheRef<P>> {
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
    let cfg = watcher::Config::default();
    let all = |c: &Client| c.clone();
    let vpc = primary::<Vpc>(&client)
        .watches(Api::<Subnet>::all(all(&client)), cfg.clone(), |s| s.spec.vpc.as_deref().and_then(parent::<Vpc>))
        .watches(Api::<NatGateway>::all(all(&client)), cfg.clone(), |g| parent::<Vpc>(&g.spec.vpc));
    let subnet = primary::<Subnet>(&client)
        .watches(Api::<NatGateway>::all(all(&client)), cfg.clone(), |g| parent::<Subnet>(&g.spec.external_subnet));
    // The workloads too: a deleted StatefulSet comes back.
    let (k, v) = workload::WORKLOAD_LABEL;
    let gateway = primary::<NatGateway>(&client)
        .watches(Api::<Eip>::all(all(&client)), cfg.clone(), |e| parent::<NatGateway>(&e.spec.gateway))
        .watches(
            Api::<k8s_openapi::api::apps::v1::StatefulSet>::namespaced(all(&client), &namespace),
            watcher::Config::default().labels(&format!("{k}={v}")),
            |s| s.labels().get(GATEWAY_LABEL).and_then(|g| parent::<NatGateway>(g)),
        );
    let eip = primary::<Eip>(&client)
        .watches(Api::<FloatingIp>::all(all(&client)), cfg.clone(), |f| parent::<Eip>(&f.spec.eip))
        .watches(Api::<SnatRule>::all(all(&client)), cfg.clone(), |s| parent::<Eip>(&s.spec.eip))
        .watches(Api::<DnatRule>::all(all(&client)), cfg.clone(), |d| parent::<Eip>(&d.spec.eip));
    let fip = primary::<FloatingIp>(&client);
    let snat = primary::<SnatRule>(&client);
    let dnat = primary::<DnatRule>(&client);
    let stores = Stores {
        vpcs: vpc.store(),
        subnets: subnet.store(),
        gateways: gateway.store(),
        eips: eip.store(),
        floating_ips: fip.store(),
        snat_rules: snat.store(),
        dnat_rules: dnat.store(),
    };
    let reporter = Reporter { controller: MANAGER.into(), instance };
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        stores,
        recorder: Recorder::new(client.clone(), reporter),
        namespace: namespace.clone(),
        options,
        book: address::Book::default(),
    });
    let gc_ctx = ctx.clone();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stop = move || {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    macro_rules! drive {
        ($c:expr, $k:ty) => {
            $c.graceful_shutdown_on(stop()).run(reconcile::<$k>, error_policy::<$k>, ctx.clone()).for_each(|r| async move {
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
    let controllers = async {
        futures::join!(
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
    futures::join!(relay, controllers, gc);
}

/// Where the controller's leader election happens.
#[derive(Clone, Debug)]
pub struct Election {
    pub namespace: String,
    pub lease: String,
    /// This instance's identity (the pod name): must be unique.
    pub identity: String,
    pub duration_secs: u64,
    pub grace_secs: u64,
    pub options: Options,
}

/// Runs the controllers only while this instance holds the Lease; stops
/// them as soon as it is lost and waits to win it again. A failing lease
/// watcher is logged and rebuilt, never a silent exit.
pub async fn run_elected(
    client: Client,
    election: Election,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    tokio::pin!(shutdown);
    loop {
        let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &election.lease)
            .with_namespace(&election.namespace)
            .with_identity(&election.identity)
            .with_duration(election.duration_secs)
            .with_grace(election.grace_secs)
            .with_field_manager(MANAGER)
            .build()
            .await;
        let manager = match manager {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(lease = %election.lease, namespace = %election.namespace, error = %e, "cannot set up leader election; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                    _ = &mut shutdown => return Ok(()),
                }
            }
        };
        let (mut leader, task) = manager.watch().await;
        let stopped = lead_while_elected(&client, &election, &mut leader, &mut shutdown).await;
        drop(leader);
        match task.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "leader election failed; starting over"),
            Err(e) => tracing::error!(error = %e, "leader election task died; starting over"),
        }
        if stopped {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Returns true on shutdown, false when the election channel closed.
async fn lead_while_elected(
    client: &Client,
    election: &Election,
    leader: &mut tokio::sync::watch::Receiver<bool>,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> bool {
    loop {
        while !*leader.borrow_and_update() {
            tokio::select! {
                changed = leader.changed() => if changed.is_err() { return false },
                _ = shutdown.as_mut() => return true,
            }
        }
        tracing::info!(identity = %election.identity, "leading");
        let mut rx = leader.clone();
        let lost = async move {
            while rx.changed().await.is_ok() {
                if !*rx.borrow() {
                    break;
                }
            }
        };
        tokio::select! {
            _ = run(client.clone(), Some(election.identity.clone()), election.namespace.clone(), election.options.clone(), lost) => {
                tracing::warn!(identity = %election.identity, "lost the lease; controllers stopped");
            }
            // Dropping the channel afterwards releases the lease for a quick handover.
            _ = shutdown.as_mut() => return true,
        }
    }
}
