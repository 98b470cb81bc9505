//! An Eip's address (see `address`), said in its status.

use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef as CacheRef;
use natgw_api::*;
use natgw_kube_support::status::condition;

use crate::conditions::{patch_status, warn};
use crate::{Ctx, Error, KindResource, address, rule};
use kube::runtime::reflector::Store;

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
            warn(ctx, eip, reason, "AssignAddress", &message).await;
        }
    }
    report_users(ctx, eip).await?;
    Ok(if ip.is_some() { Action::await_change() } else { Action::requeue(Duration::from_secs(5)) })
}

/// `status.usedBy` (the UsedBy column): the rules naming this Eip, from
/// the caches; the rule watches bring the Eip back here when they change.
async fn report_users(ctx: &Ctx, eip: &Eip) -> Result<(), Error> {
    let users = crate::deps::describe(&users(&ctx.stores, &eip.name_any()));
    let current = eip.status.as_ref().and_then(|s| s.used_by.clone()).unwrap_or_default();
    if users == current {
        return Ok(());
    }
    patch_status::<Eip>(ctx, "natgw-controller/users", &eip.name_any(), serde_json::json!({ "usedBy": users })).await
}

/// The rules that name Eip `name`, sorted; nothing is copied.
fn users(stores: &crate::Stores, name: &str) -> Vec<ObjectRef> {
    let mut out: Vec<ObjectRef> = naming(&stores.floating_ips, |f| &f.spec.eip, name)
        .chain(naming(&stores.snat_rules, |r| &r.spec.eip, name))
        .chain(naming(&stores.dnat_rules, |r| &r.spec.eip, name))
        .collect();
    out.sort();
    out
}

fn naming<K: KindResource>(
    store: &Store<K>,
    eip: fn(&K) -> &String,
    name: &str,
) -> impl Iterator<Item = ObjectRef> + use<K> {
    let name = name.to_string();
    store.state().into_iter().filter(move |o| *eip(o) == name).map(|o| ObjectRef::new(K::KIND, o.name_any()))
}
