//! The two edges a round writes through: the gateway's kernel and the API
//! server. Small traits, so a round runs against in-memory fakes in unit
//! tests; the real ones are `natgw_dataplane::Gateway` and `Cluster`.

use std::future::Future;

use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use natgw_api::ObjectRef;
use natgw_dataplane::{Gateway, SweepDone, SyncError, SyncReport};
use natgw_kube_support::{KindResource, with_kind};
use natgw_plan::GatewayPlan;

use crate::caches::Entry;

/// The gateway's kernel as a round uses it. Calls block: a round makes
/// them off the async workers.
pub trait Kernel: Send + Sync + 'static {
    /// Converges the kernel to `plan`; `read_kernel` reads it whole first
    /// instead of trusting the last sync (a resync).
    fn program(&self, plan: &GatewayPlan, read_kernel: bool) -> Result<SyncReport, SyncError>;
    /// Lets go of the last plan unless a sweep still needs it.
    fn release_plan(&self);
    /// Starts the conntrack sweep owed, if any; `done` reports its end.
    fn sweep_in_background(&self, done: SweepDone);
    /// Whether every change programmed so far has been swept.
    fn swept(&self) -> bool;
}

impl Kernel for Gateway {
    fn program(&self, plan: &GatewayPlan, read_kernel: bool) -> Result<SyncReport, SyncError> {
        if read_kernel { self.reprogram(plan) } else { Gateway::program(self, plan) }
    }
    fn release_plan(&self) {
        Gateway::release_plan(self);
    }
    fn sweep_in_background(&self, done: SweepDone) {
        Gateway::sweep_in_background(self, done)
    }
    fn swept(&self) -> bool {
        Gateway::swept(self)
    }
}

/// The API writes a round makes.
pub trait Writes: Sync {
    /// Writes an object's finalizer list, failing if the object changed
    /// since the entry's resourceVersion (`kubectl patch --type merge`
    /// with `metadata.resourceVersion` in the body).
    fn set_finalizers(
        &self,
        e: &Entry,
        finalizers: Vec<String>,
    ) -> impl Future<Output = Result<(), kube::Error>> + Send;
    /// Applies the agent's conditions to an object's status (server-side
    /// apply as the gateway's field manager).
    fn apply_status(
        &self,
        object: &ObjectRef,
        status: serde_json::Value,
    ) -> impl Future<Output = Result<(), kube::Error>> + Send;
}

/// The API server, written as gateway `gw`'s agent.
pub struct Cluster {
    pub client: Client,
    /// `natgw-gateway-<gw>`: the field manager of the agent's conditions.
    pub manager: String,
}

impl Cluster {
    pub fn new(client: Client, gw: &str) -> Cluster {
        Cluster { client, manager: format!("natgw-gateway-{gw}") }
    }
}

impl Writes for Cluster {
    async fn set_finalizers(&self, e: &Entry, finalizers: Vec<String>) -> Result<(), kube::Error> {
        async fn patch<K: KindResource>(
            client: &Client,
            name: &str,
            body: serde_json::Value,
        ) -> Result<(), kube::Error> {
            Api::<K>::all(client.clone()).patch(name, &PatchParams::default(), &Patch::Merge(&body)).await.map(drop)
        }
        let body =
            serde_json::json!({ "metadata": { "resourceVersion": e.resource_version(), "finalizers": finalizers } });
        with_kind!(e.object.kind, patch(&self.client, &e.object.name, body))
    }

    async fn apply_status(&self, r: &ObjectRef, status: serde_json::Value) -> Result<(), kube::Error> {
        use natgw_kube_support::status::apply_status;
        with_kind!(r.kind, apply_status(&self.client, &self.manager, &r.name, status))
    }
}
