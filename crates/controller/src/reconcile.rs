//! The reconciler every kind shares: the `natgw.io/controller` finalizer
//! around per-kind work (`apply`) and deletion order (`deletion`).

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Error as FinalizerError, Event, finalizer};
use kube::runtime::reflector::ObjectRef as CacheRef;
use natgw_kube_support::Typed;

use crate::{BLOCKED_RETRY, Ctx, Error, FINALIZER, KindResource, deletion, eip, gateway, rule, vpc};

/// First and longest waits after a failed reconcile: a conflict (409, 422:
/// the cache was behind) usually heals at once, anything else may take
/// long; either doubles with each failure in a row.
const CONFLICT_RETRY: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(30));
const ERROR_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(300));

pub async fn reconcile<K: KindResource>(obj: Arc<K>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let key = (K::KIND, obj.name_any());
    let result = reconcile_once(obj, &ctx).await;
    if result.is_ok() {
        ctx.retries.succeeded(&key);
    }
    result
}

async fn reconcile_once<K: KindResource>(obj: Arc<K>, ctx: &Ctx) -> Result<Action, Error> {
    let api: Api<K> = Api::all(ctx.client.clone());
    if let Some((gateway, agent_there)) = new_object_gateway(ctx, &*obj) {
        // A new Eip, or a new rule whose Eip is known: the finalizers and
        // the gateway label in one write (the agent waits for the label;
        // writes in sequence multiplied a create's latency and the API
        // server's load). The resourceVersion makes the write fail rather
        // than overwrite a concurrent change of the finalizers.
        let mut finalizers = obj.finalizers().to_vec();
        finalizers.push(FINALIZER.to_string());
        // A rule on an Eip the gateway's agent has programmed gets the
        // agent's finalizer here too, before the label shows it to the
        // agent: the agent then programs it in its first round without a
        // write of its own. Deleting it waits for that agent, as for any
        // object it programmed. Elsewhere the agent adds it itself.
        let agent = natgw_api::gateway_finalizer(&gateway);
        if agent_there && !finalizers.contains(&agent) {
            finalizers.push(agent);
        }
        let patch = serde_json::json!({ "metadata": {
            "resourceVersion": obj.resource_version(),
            "finalizers": finalizers,
            "labels": { natgw_api::GATEWAY_LABEL: gateway },
        }});
        return match api.patch(&obj.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(Action::await_change()),
            Err(e) if is_conflict(&e) => Err(Error::Conflict(e)),
            Err(e) => Err(Error::Finalizer(Box::new(FinalizerError::AddFinalizer(e)))),
        };
    }
    // The helper adds the finalizer before Apply runs and removes it only
    // when Cleanup returns Ok.
    finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Event::Apply(o) => apply(ctx, &*o).await,
            Event::Cleanup(o) => deletion::cleanup(ctx, &*o).await,
        }
    })
    .await
    .map_err(|e| match e {
        FinalizerError::CleanupFailed(Error::Blocked(m)) => Error::Blocked(m),
        FinalizerError::AddFinalizer(k) | FinalizerError::RemoveFinalizer(k) if is_conflict(&k) => Error::Conflict(k),
        other => Error::Finalizer(Box::new(other)),
    })
}

/// The gateway that programs an Eip or rule that has neither the
/// controller's finalizer nor a pending deletion (an Eip's own, or that of
/// the Eip a rule names when it is in the cache), and whether that
/// gateway's agent has programmed the rule's Eip (it says Ready).
fn new_object_gateway<K: KindResource>(ctx: &Ctx, obj: &K) -> Option<(String, bool)> {
    if obj.meta().deletion_timestamp.is_some() || obj.finalizers().iter().any(|f| f == FINALIZER) {
        return None;
    }
    match obj.typed() {
        Typed::Eip(e) => Some((e.spec.gateway.clone(), false)),
        t => {
            let eip = ctx.stores.eips.get(&CacheRef::new(t.rule_eip()?))?;
            let ready = eip.conditions().iter().any(|c| c.type_ == "Ready" && c.status == "True");
            let agent = natgw_api::gateway_finalizer(&eip.spec.gateway);
            let programmed = ready && eip.finalizers().contains(&agent);
            Some((eip.spec.gateway.clone(), programmed))
        }
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 || s.code == 422)
}

/// Per-kind work: every kind is listed, so a new kind says what it does.
async fn apply<K: KindResource>(ctx: &Ctx, obj: &K) -> Result<Action, Error> {
    match obj.typed() {
        Typed::Eip(e) => eip::assign_address(ctx, e).await,
        Typed::NatGateway(g) => gateway::ensure_workload(ctx, g).await,
        Typed::FloatingIp(_) | Typed::SnatRule(_) | Typed::DnatRule(_) => rule::bind(ctx, obj).await,
        Typed::Vpc(v) => vpc::report_members(ctx, v).await,
        // A Subnet only carries the finalizer, and may have room now for
        // Eips waiting on it.
        Typed::Subnet(_) => {
            ctx.book.wake_waiting();
            Ok(Action::await_change())
        }
    }
}

pub fn error_policy<K: KindResource>(obj: Arc<K>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let key = (K::KIND, obj.name_any());
    match err {
        Error::Blocked(_) => Action::requeue(BLOCKED_RETRY),
        Error::Conflict(m) => {
            let wait = ctx.retries.failed(key, CONFLICT_RETRY.0, CONFLICT_RETRY.1);
            tracing::debug!(kind = %K::KIND, name = %obj.name_any(), conflict = %m, ?wait, "retrying");
            Action::requeue(wait)
        }
        e => {
            let wait = ctx.retries.failed(key, ERROR_RETRY.0, ERROR_RETRY.1);
            let error = natgw_kube_support::chain(e);
            tracing::warn!(kind = %K::KIND, name = %obj.name_any(), %error, ?wait, "reconcile failed; retrying");
            Action::requeue(wait)
        }
    }
}
