//! Objects must never stay stuck on the finalizer of a gateway agent whose
//! NatGateway is gone for good: with the NatGateway went its workload and
//! the namespace that held the state. The NatGateway object itself, asked
//! of the API server, is the sentinel; a cache is not trusted here.

use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use natgw_api::{DnatRule, Eip, FloatingIp, GATEWAY_FINALIZER_PREFIX, NatGateway, SnatRule, gateway_finalizer};

use crate::Kind;

/// Removes dead gateways' finalizers from objects being deleted; returns
/// how many objects it released.
pub async fn release(client: &Client) -> Result<usize, kube::Error> {
    let live: Vec<String> = Api::<NatGateway>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|g| gateway_finalizer(&g.name_any()))
        .collect();
    Ok(sweep::<Eip>(client, &live).await?
        + sweep::<FloatingIp>(client, &live).await?
        + sweep::<SnatRule>(client, &live).await?
        + sweep::<DnatRule>(client, &live).await?)
}

async fn sweep<K: Kind>(client: &Client, live: &[String]) -> Result<usize, kube::Error> {
    let api: Api<K> = Api::all(client.clone());
    let mut released = 0;
    for o in api.list(&ListParams::default()).await?.items {
        if o.meta().deletion_timestamp.is_none() {
            continue;
        }
        let fins = o.finalizers().to_vec();
        let keep: Vec<String> =
            fins.iter().filter(|f| !f.starts_with(GATEWAY_FINALIZER_PREFIX) || live.contains(f)).cloned().collect();
        if keep.len() == fins.len() {
            continue;
        }
        tracing::info!(kind = K::KIND, name = %o.name_any(), "releasing the finalizer of a gateway that no longer exists");
        let patch = serde_json::json!({ "metadata": { "resourceVersion": o.resource_version(), "finalizers": keep } });
        api.patch(&o.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
        released += 1;
    }
    Ok(released)
}
