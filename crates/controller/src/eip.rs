//! An Eip's address (see `address`), said in its status.

use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef as CacheRef;
use natgw_api::*;
use natgw_kube_support::status::condition;

use crate::conditions::{patch_status, warn};
use crate::{Ctx, Error, address, rule};

pub async fn assign_address(ctx: &Ctx, eip: &Eip) -> Result<Action, Error> {
    rule::label(&ctx.client, eip, &eip.spec.gateway).await?;
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
    let exhausted = matches!(outcome, address::Outcome::Exhausted);
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
    let users = crate::deps::describe(&ctx.users.of(&ctx.stores, &eip.name_any()));
    let users_unchanged = current.and_then(|s| s.used_by.as_deref()).unwrap_or_default() == users;
    if !unchanged {
        // usedBy rides along: one write where there were two. Always in
        // this manager's apply, so an apply never drops it.
        let condition = condition("AddressAssigned", status, reason, message.clone(), eip.metadata.generation);
        let mut body = serde_json::json!({ "conditions": [condition], "usedBy": users });
        if let Some(ip) = ip {
            body["ip"] = serde_json::json!(ip);
        }
        write_once(ctx, eip, "natgw-controller/address", body).await?;
        if ip.is_none() {
            warn(ctx, eip, reason, "AssignAddress", &message).await;
        }
    } else if !users_unchanged {
        // `status.usedBy` (the UsedBy column): the rules naming this Eip,
        // from the caches; the rules' caches bring the Eip back here when
        // they change.
        write_once(ctx, eip, "natgw-controller/users", serde_json::json!({ "usedBy": users })).await?;
    }
    Ok(if ip.is_some() {
        Action::await_change()
    } else if exhausted {
        // Woken when an address is let go or a subnet changes
        // (`Book::wake_waiting`); the five minutes are a backstop, not the
        // path (34,500 waiting Eips at 5 s were 6,900 reconciles a second).
        Action::requeue(Duration::from_secs(300))
    } else {
        // The others wait on objects that may appear.
        Action::requeue(Duration::from_secs(5))
    })
}

/// Drops what `write_once` remembers of a deleted Eip (a memo of every
/// name ever seen would grow with churn).
pub fn forget(ctx: &Ctx, eip: &Eip) {
    ctx.book.stop_waiting(&eip.name_any());
    ctx.written.lock().unwrap_or_else(|p| p.into_inner()).remove(&eip.name_any());
}

/// Applies `status` to `eip` unless this same apply was made already and
/// the cache has not caught up with it yet: every rule event triggers the
/// Eip, and a trigger that came before the cache held the last write wrote
/// it again (2.1 Eip status writes per new rule, where 1 is owed).
async fn write_once(ctx: &Ctx, eip: &Eip, manager: &str, status: serde_json::Value) -> Result<(), Error> {
    let name = eip.name_any();
    let what = crate::digest((manager, status.to_string()));
    let version = eip.resource_version();
    {
        let mut written = ctx.written.lock().unwrap_or_else(|p| p.into_inner());
        match written.get(&name) {
            Some((v, w)) if *v == version && *w == what => return Ok(()),
            // The cache moved on: what it shows is judged afresh.
            Some(_) => drop(written.remove(&name)),
            None => {}
        }
    }
    patch_status::<Eip>(ctx, manager, &name, status).await?;
    ctx.written.lock().unwrap_or_else(|p| p.into_inner()).insert(name, (version, what));
    Ok(())
}
