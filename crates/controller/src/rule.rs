//! Which gateway programs an object: the `natgw.io/gateway` label, taken
//! from an Eip's `spec.gateway` (its own, or that of the Eip a rule
//! names). Each agent watches only its own label value, so it holds its
//! gateway's objects and nothing else.

use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use natgw_api::GATEWAY_LABEL;

use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef as CacheRef;
use natgw_kube_support::status::condition;

use crate::conditions::patch_status;
use crate::{BLOCKED_RETRY, Ctx, Error, KindResource};

/// Sets the label when it differs; a steady object costs no write.
pub async fn label<K: KindResource>(client: &Client, obj: &K, gateway: &str) -> Result<(), kube::Error> {
    if obj.labels().get(GATEWAY_LABEL).map(String::as_str) == Some(gateway) {
        return Ok(());
    }
    let patch = serde_json::json!({ "metadata": { "labels": { GATEWAY_LABEL: gateway } } });
    Api::<K>::all(client.clone()).patch(&obj.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Labels a rule with its Eip's gateway, which then programs it. A rule
/// whose Eip does not exist says so in a `Bound` condition.
pub async fn bind<K: KindResource>(ctx: &Ctx, obj: &K) -> Result<Action, Error> {
    let typed = obj.typed();
    let Some(eip) = typed.rule_eip() else { return Ok(Action::await_change()) };
    let gateway = ctx.stores.eips.get(&CacheRef::new(eip)).map(|e| e.spec.gateway.clone());
    if let Some(gw) = &gateway {
        label(&ctx.client, obj, gw).await?;
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
