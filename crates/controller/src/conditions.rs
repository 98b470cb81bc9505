//! Conditions and status the controller writes, each purpose with its own
//! field manager.

use kube::ResourceExt;
use natgw_kube_support::status::condition;

use crate::{Ctx, Error, KindResource};

/// Writes condition (type, status, reason, message) with `manager` when it
/// changed, and when it is False says so in a Warning Event too.
pub async fn set_condition<K: KindResource>(
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
        warn(ctx, obj, reason, action, &message).await;
    }
    Ok(())
}

/// Applies part of an object's status as field manager `manager`.
pub async fn patch_status<K: KindResource>(
    ctx: &Ctx,
    manager: &str,
    name: &str,
    status: serde_json::Value,
) -> Result<(), Error> {
    Ok(natgw_kube_support::status::apply_status::<K>(&ctx.client, manager, name, status).await?)
}

/// A Warning Event about `obj`. A new Event each time: the caller says a
/// message once per change, and the Event shows the current one.
pub async fn warn<K: KindResource>(ctx: &Ctx, obj: &K, reason: &str, action: &str, note: &str) {
    let regarding = obj.object_ref(&());
    if let Err(e) =
        natgw_kube_support::events::warning(&ctx.client, &ctx.reporter, regarding, reason, action, note).await
    {
        tracing::error!(kind = %K::KIND, name = %obj.name_any(), error = %e, "cannot publish Event");
    }
}
