//! A NatGateway's workload and the validity of what the API server stored.

use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::controller::Action;
use natgw_api::*;

use crate::conditions::set_condition;
use crate::{Ctx, Error, KindResource, workload};

/// How often a gateway whose NetworkAttachmentDefinition is missing is
/// looked at again (nothing watches those). A pod or StatefulSet that is
/// not ready needs no retry: both are watched. 1,000 gateways retried
/// every 5 s kept the controller too busy to reconcile a new one.
const NETWORK_MISSING_RETRY: Duration = Duration::from_secs(30);

/// How long a NetworkAttachmentDefinition's lookup answers for every
/// gateway that names it.
const NETWORK_LOOKUP_FRESH: Duration = Duration::from_secs(10);

/// Applies the gateway's StatefulSet, or says why it cannot; then says
/// whether its pod serves (`WorkloadReady`), with the pod's own reason.
pub async fn ensure_workload(ctx: &Ctx, gw: &NatGateway) -> Result<Action, Error> {
    let pod = &ctx.options.gateway_pod;
    let (status, reason, message) = match workload::desired(gw, &ctx.namespace, pod, lan_prefix(ctx, gw)) {
        Err(why) => ("False", "NotConfigured".to_string(), why),
        Ok(body) => {
            ensure_identity(ctx, gw).await?;
            let applied = apply_if_changed(ctx, gw, &body).await?;
            match missing_network(ctx, gw).await? {
                Some(why) => ("False", "NetworkMissing".to_string(), why),
                None => {
                    let name = gw.name_any();
                    let pods: Vec<_> = ctx
                        .pods
                        .state()
                        .iter()
                        .filter(|p| p.labels().get(GATEWAY_LABEL) == Some(&name))
                        .map(|p| (**p).clone())
                        .collect();
                    report_image(ctx, gw, &applied, &pods).await?;
                    workload::readiness(&applied, &pods)
                }
            }
        }
    };
    report_validity(ctx, gw).await?;
    report_replicas(ctx, gw).await?;
    let manager = "natgw-controller/workload";
    set_condition(ctx, gw, manager, ("WorkloadReady", status, &reason, message), "CreateWorkload").await?;
    Ok(if reason == "NetworkMissing" {
        Action::requeue(spread(NETWORK_MISSING_RETRY, gw))
    } else {
        Action::await_change()
    })
}

/// `ImageCurrent` and `natgw_gateway_image_skew`: whether the gateway's
/// pod runs the image its StatefulSet asks for.
async fn report_image(
    ctx: &Ctx,
    gw: &NatGateway,
    sts: &k8s_openapi::api::apps::v1::StatefulSet,
    pods: &[k8s_openapi::api::core::v1::Pod],
) -> Result<(), Error> {
    if pods.is_empty() {
        return Ok(());
    }
    let skew = workload::image_skew(sts, pods);
    ctx.options.health.image_skew(&gw.name_any(), Some(skew.is_some()));
    let condition = match skew {
        Some(why) => ("ImageCurrent", "False", "ImageSkew", why),
        None => ("ImageCurrent", "True", "Current", "the gateway's pod runs the image it asks for".to_string()),
    };
    set_condition(ctx, gw, "natgw-controller/image", condition, "UpgradeGateway").await
}

/// `base` plus up to a tenth more, by gateway: gateways created in one
/// burst would otherwise all come back in the same second.
fn spread(base: Duration, gw: &NatGateway) -> Duration {
    base + base.mul_f64((crate::digest(gw.uid()) % 1000) as f64 / 10_000.0)
}

/// Applies `body` unless the cache shows the StatefulSet this controller
/// last applied from the same body (a change by anyone else gives it a
/// new resourceVersion, so drift is still repaired).
async fn apply_if_changed(
    ctx: &Ctx,
    gw: &NatGateway,
    body: &k8s_openapi::api::apps::v1::StatefulSet,
) -> Result<k8s_openapi::api::apps::v1::StatefulSet, Error> {
    let uid = gw.uid().unwrap_or_default();
    let digest = crate::digest(serde_json::to_string(body).unwrap_or_default());
    let cached =
        ctx.statefulsets.get(&kube::runtime::reflector::ObjectRef::new(&body.name_any()).within(&ctx.namespace));
    let memo = ctx.applied.lock().unwrap_or_else(|p| p.into_inner()).get(&uid).cloned();
    if let (Some(sts), Some((d, version))) = (&cached, &memo)
        && *d == digest
        && sts.metadata.resource_version == *version
    {
        return Ok((**sts).clone());
    }
    let applied = workload::apply(&ctx.client, &ctx.namespace, body).await?;
    let version = applied.metadata.resource_version.clone();
    ctx.applied.lock().unwrap_or_else(|p| p.into_inner()).insert(uid, (digest, version));
    Ok(applied)
}

/// How long an applied identity is trusted before it is applied again
/// (someone may have deleted the account or a binding).
const IDENTITY_REFRESH: Duration = Duration::from_secs(600);

/// The gateway's account and bindings, before the pod that runs as it:
/// applied once, then again every `IDENTITY_REFRESH`.
async fn ensure_identity(ctx: &Ctx, gw: &NatGateway) -> Result<(), Error> {
    let uid = gw.uid().unwrap_or_default();
    let fresh = |m: &std::collections::HashMap<String, std::time::Instant>| {
        m.get(&uid).is_some_and(|at| at.elapsed() < IDENTITY_REFRESH)
    };
    if fresh(&ctx.identities.lock().unwrap_or_else(|p| p.into_inner())) {
        return Ok(());
    }
    natgw_kube_support::identity::apply(&ctx.client, &gw.name_any(), &uid, &ctx.namespace).await?;
    ctx.identities.lock().unwrap_or_else(|p| p.into_inner()).insert(uid, std::time::Instant::now());
    Ok(())
}

/// The prefix length of the VPC subnet holding spec.lanIp.
fn lan_prefix(ctx: &Ctx, gw: &NatGateway) -> Option<u8> {
    let ip = gw.spec.lan_ip?;
    ctx.stores
        .subnets
        .state()
        .iter()
        .filter(|s| s.spec.vpc.as_deref() == Some(gw.spec.vpc.as_str()))
        .find(|s| s.spec.cidr.contains(&ip))
        .map(|s| s.spec.cidr.prefix_len())
}

/// What a lookup of a NetworkAttachmentDefinition found.
#[derive(Clone, Copy)]
pub enum Network {
    Exists,
    Missing,
    NoSuchKind,
}

/// A NetworkAttachmentDefinition the gateway pod needs and the API server
/// does not have: the pod would wait in ContainerCreating without a word.
async fn missing_network(ctx: &Ctx, gw: &NatGateway) -> Result<Option<String>, Error> {
    let Ok(nets) = workload::networks(gw, &ctx.options.gateway_pod) else { return Ok(None) };
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("k8s.cni.cncf.io", "v1", "NetworkAttachmentDefinition"),
        "network-attachment-definitions",
    );
    for (ns, name, field) in nets {
        let key = (ns.to_string(), name.to_string());
        let known = ctx.networks.lock().unwrap_or_else(|p| p.into_inner()).get(&key).copied();
        let state = match known {
            Some((at, state)) if at.elapsed() < NETWORK_LOOKUP_FRESH => state,
            _ => {
                let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &ar);
                let state = match api.get_opt(name).await {
                    Ok(Some(_)) => Network::Exists,
                    Ok(None) => Network::Missing,
                    // The type itself is unknown: a bare 404 without a Status.
                    Err(kube::Error::Api(s)) if s.code == 404 => Network::NoSuchKind,
                    Err(e) => return Err(e.into()),
                };
                ctx.networks.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (std::time::Instant::now(), state));
                state
            }
        };
        match state {
            Network::Exists => {}
            Network::Missing => {
                return Ok(Some(format!("{field}: NetworkAttachmentDefinition {ns}/{name} does not exist")));
            }
            Network::NoSuchKind => {
                return Ok(Some(format!(
                    "{field}: the API server serves no NetworkAttachmentDefinitions (is Multus installed?)"
                )));
            }
        }
    }
    Ok(None)
}

/// `Valid` on a NatGateway: an object stored before a CEL rule existed
/// (a route with host bits, a bad next hop) is named here; the planner
/// skips what is invalid instead of failing every sync.
/// `Replicas`: whether the gateway runs as many replicas as it asks. A
/// pair runs in standalone mode only so far (`natgw run --ha-*`); in a
/// cluster the gateway serves with one pod and says so, rather than
/// running two that would both hold its addresses.
async fn report_replicas(ctx: &Ctx, gw: &NatGateway) -> Result<(), Error> {
    let asked = gw.spec.replica_count();
    let condition = if asked > 1 {
        (
            "Replicas",
            "False",
            "OneReplicaRuns",
            format!(
                "spec.replicas is {asked}, but in a cluster a gateway runs one pod for now: HA pairs run in \
                 standalone mode (natgw run --ha-*); this gateway serves with one replica"
            ),
        )
    } else if gw.conditions().iter().any(|c| c.type_ == "Replicas") {
        ("Replicas", "True", "AsAsked", "one replica, as spec.replicas asks".to_string())
    } else {
        return Ok(());
    };
    set_condition(ctx, gw, "natgw-controller/replicas", condition, "RunReplicas").await
}

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
