//! A gateway's objects as its agent programs them, read once from the API
//! server: what `natgw audit` compares the kernel with inside a gateway
//! pod, so that `kubectl exec POD -- natgw audit` is the whole command.
//! The agent's rules apply: an Eip or rule counts once it carries the
//! agent's finalizer and until the controller released it, and an Eip's
//! address only with a claim naming the Eip.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, ObjectMeta};
use kube::{Client, Resource};
use natgw_api::{
    CONTROLLER_FINALIZER, DnatRule, Eip, FloatingIp, GATEWAY_LABEL, NatGateway, Object, ObjectSet, SnatRule, Subnet,
    Vpc, gateway_finalizer,
};
use natgw_kube_support::claims::{Holder, claims_of, holder_of};

/// The objects of gateway `gw`; claims are read in `claims_namespace`.
pub async fn objects(client: &Client, gw: &str, claims_namespace: &str) -> Result<ObjectSet, kube::Error> {
    let all = ListParams::default();
    let mine = ListParams::default().labels(&format!("{GATEWAY_LABEL}={gw}"));
    let mut set = ObjectSet::default();
    for v in Api::<Vpc>::all(client.clone()).list(&all).await? {
        set.insert(Object::Vpc(v));
    }
    for s in Api::<Subnet>::all(client.clone()).list(&all).await? {
        set.insert(Object::Subnet(s));
    }
    if let Some(g) = Api::<NatGateway>::all(client.clone()).get_opt(gw).await? {
        set.insert(Object::NatGateway(g));
    }
    let agent = gateway_finalizer(gw);
    let counts = |m: &ObjectMeta| {
        let fins = m.finalizers.as_deref().unwrap_or_default();
        let released = m.deletion_timestamp.is_some() && !fins.iter().any(|f| f == CONTROLLER_FINALIZER);
        fins.contains(&agent) && !released
    };
    let claims = ListParams::default().labels(&claims_of(gw));
    let held: BTreeMap<Ipv4Addr, Holder> = Api::<ConfigMap>::namespaced(client.clone(), claims_namespace)
        .list(&claims)
        .await?
        .items
        .iter()
        .filter_map(holder_of)
        .collect();
    for mut e in Api::<Eip>::all(client.clone()).list(&mine).await?.items.into_iter().filter(|e| counts(e.meta())) {
        let backed = e.address().and_then(|ip| held.get(&ip)).is_some_and(|h| e.metadata.uid.as_ref() == Some(&h.uid));
        if !backed {
            // As the agent holds it: no address it may program.
            e.spec.ip = None;
            e.status = None;
        }
        set.insert(Object::Eip(e));
    }
    for f in Api::<FloatingIp>::all(client.clone()).list(&mine).await? {
        if counts(f.meta()) {
            set.insert(Object::FloatingIp(f));
        }
    }
    for s in Api::<SnatRule>::all(client.clone()).list(&mine).await? {
        if counts(s.meta()) {
            set.insert(Object::SnatRule(s));
        }
    }
    for d in Api::<DnatRule>::all(client.clone()).list(&mine).await? {
        if counts(d.meta()) {
            set.insert(Object::DnatRule(d));
        }
    }
    Ok(set)
}
