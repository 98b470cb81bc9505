//! Deletion order: an object with dependents waits, with a
//! `DeletionBlocked` condition and a Warning Event naming them.

use kube::ResourceExt;
use kube::runtime::controller::Action;
use natgw_kube_support::Typed;
use natgw_kube_support::status::condition;

use crate::conditions::{patch_status, warn};
use crate::{Ctx, Error, KindResource, deps, workload};

pub async fn cleanup<K: KindResource>(ctx: &Ctx, obj: &K) -> Result<Action, Error> {
    ctx.stores.ready().await;
    let me = natgw_api::ObjectRef::new(K::KIND, obj.name_any());
    let blockers = deps::blockers(&ctx.stores, &me);
    if blockers.is_empty() {
        // A gateway's workload goes with it.
        match obj.typed() {
            Typed::NatGateway(gw) => {
                workload::remove(&ctx.client, &ctx.namespace, &gw.name_any()).await?;
                natgw_kube_support::identity::remove(&ctx.client, &gw.name_any(), &ctx.namespace).await?;
                let uid = gw.uid().unwrap_or_default();
                ctx.identities.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
                ctx.applied.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
                ctx.options.health.image_skew(&gw.name_any(), None);
            }
            Typed::Eip(e) => crate::eip::forget(ctx, e),
            Typed::Vpc(_) | Typed::Subnet(_) | Typed::FloatingIp(_) | Typed::SnatRule(_) | Typed::DnatRule(_) => {}
        }
        return Ok(Action::await_change());
    }
    let message = format!("waiting for {} to be deleted first", deps::describe(&blockers));
    let current = obj.conditions().iter().find(|c| c.type_ == "DeletionBlocked");
    if current.is_none_or(|c| c.message != message || c.status != "True") {
        let condition = condition("DeletionBlocked", "True", "DependentsExist", message.clone(), obj.meta().generation);
        let conditions = serde_json::json!({ "conditions": [condition] });
        patch_status::<K>(ctx, "natgw-controller/deletion", &obj.name_any(), conditions).await?;
        warn(ctx, obj, "DeletionBlocked", "Delete", &message).await;
    }
    Err(Error::Blocked(format!("{me}: {message}")))
}
