//! The agent's conditions on each Eip and rule (Programmed, Conflict,
//! Ready): what the plan says of an object, which objects a status pass
//! must look at, and the writes where the cache shows something else.

use std::collections::BTreeSet;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use natgw_api::{AGENT_CONDITIONS, ObjectRef};
use natgw_plan::GatewayPlan;

use crate::caches::Entry;
use crate::metrics::Metrics;
use crate::round::{WRITES, Writes};

/// The objects whose conditions may differ from what the status pass of
/// `before` wrote: those changed since, and those `plan` programs, stops
/// programming or reports differently. The plans share structure, so the
/// diff of `programmed` is O(change).
pub fn status_scope(before: &GatewayPlan, plan: &GatewayPlan, changed: &BTreeSet<ObjectRef>) -> BTreeSet<ObjectRef> {
    use imbl::ordset::DiffItem;
    let mut out = changed.clone();
    for d in before.programmed.diff(&plan.programmed) {
        match d {
            DiffItem::Add(r) | DiffItem::Remove(r) => out.insert(r.clone()),
        };
    }
    let (old, new): (BTreeSet<_>, BTreeSet<_>) = (before.conflicts.iter().collect(), plan.conflicts.iter().collect());
    out.extend(old.symmetric_difference(&new).map(|c| c.object.clone()));
    out
}

/// (type, status, reason, message) of the conditions the agent owns.
type Want = [(&'static str, &'static str, String, String); 3];

fn wanted(plan: &GatewayPlan, object: &ObjectRef) -> Want {
    let programmed = plan.programmed.contains(object);
    // Conflicts are sorted by object: a lookup, not a walk per object
    // (quadratic while thousands of new rules wait for their Eips).
    let at = plan.conflicts.partition_point(|c| &c.object < object);
    let conflict = plan.conflicts.get(at).filter(|c| &c.object == object);
    let (p_reason, p_msg) = match conflict {
        _ if programmed => ("InKernel".to_string(), format!("programmed in gateway {}", plan.gateway)),
        Some(c) if c.pending => ("Pending".to_string(), format!("{}: {}", c.field, c.reason)),
        Some(c) => ("Conflict".to_string(), format!("{}: {}", c.field, c.reason)),
        None => ("Pending".to_string(), "waiting for the agent's finalizer".to_string()),
    };
    let (c_status, c_reason, c_msg) = match conflict {
        Some(c) if !c.pending => ("True", "Conflict".to_string(), format!("{}: {}", c.field, c.reason)),
        _ => ("False", "NoConflict".to_string(), String::new()),
    };
    let s = |b: bool| if b { "True" } else { "False" };
    [
        (AGENT_CONDITIONS[0], s(programmed), p_reason.clone(), p_msg.clone()),
        (AGENT_CONDITIONS[1], c_status, c_reason, c_msg),
        (AGENT_CONDITIONS[2], s(programmed), p_reason, p_msg),
    ]
}

/// The status each of `mine` should get where its conditions differ from
/// what `plan` says of it: a steady gateway writes nothing.
pub fn status_writes<'a>(plan: &GatewayPlan, mine: &[&'a Entry]) -> Vec<(&'a ObjectRef, serde_json::Value)> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    mine.iter()
        .filter_map(|e| {
            let want = wanted(plan, &e.object);
            let have = e.own();
            if have.says(want.iter().map(|(_, st, reason, msg)| (*st, reason.as_str(), msg.as_str())), e.generation()) {
                return None;
            }
            let conditions: Vec<Condition> = want
                .iter()
                .enumerate()
                .map(|(i, (t, st, reason, msg))| {
                    // Keep the transition time when the status did not flip.
                    let since = have.since(i, st);
                    Condition {
                        type_: t.to_string(),
                        status: st.to_string(),
                        reason: reason.clone(),
                        message: msg.clone(),
                        observed_generation: e.generation(),
                        last_transition_time: since.unwrap_or_else(|| now.clone()),
                    }
                })
                .collect();
            let status = serde_json::json!({ "observedGeneration": e.generation(), "conditions": conditions });
            Some((&e.object, status))
        })
        .collect()
}

/// Writes Programmed, Conflict and Ready where they changed; returns the
/// objects whose write failed.
pub async fn report_status(
    writes: &impl Writes,
    plan: &GatewayPlan,
    mine: &[&Entry],
    metrics: &Metrics,
) -> BTreeSet<ObjectRef> {
    let failed = std::sync::Mutex::new(BTreeSet::new());
    futures::stream::iter(status_writes(plan, mine))
        .for_each_concurrent(WRITES, |(object, status)| {
            let failed = &failed;
            async move {
                let result = writes.apply_status(object, status).await;
                metrics.status_written(result.is_ok());
                if let Err(err) = result {
                    tracing::info!(object = %object, error = %err, "status not written");
                    failed.lock().unwrap_or_else(|p| p.into_inner()).insert(object.clone());
                }
            }
        })
        .await;
    failed.into_inner().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use natgw_api::Kind;
    use natgw_plan::Conflict;

    fn fip(name: &str) -> ObjectRef {
        ObjectRef::new(Kind::FloatingIp, name)
    }

    #[test]
    fn a_status_pass_looks_at_what_changed_and_what_the_plan_changed_for() {
        let mut before = GatewayPlan::default();
        before.programmed.insert(fip("kept"));
        before.programmed.insert(fip("dropped"));
        let conflict = |o: &str, reason: &str| Conflict {
            object: fip(o),
            field: "spec.eip".into(),
            reason: reason.into(),
            pending: false,
        };
        before.conflicts = vec![conflict("loser", "taken by a"), conflict("steady", "taken by b")];
        let mut plan = before.clone();
        plan.programmed.remove(&fip("dropped"));
        plan.programmed.insert(fip("new"));
        plan.conflicts = vec![conflict("loser", "taken by c"), conflict("steady", "taken by b")];
        let changed: BTreeSet<ObjectRef> = [fip("edited")].into();
        let scope = status_scope(&before, &plan, &changed);
        let want: BTreeSet<ObjectRef> = [fip("edited"), fip("dropped"), fip("new"), fip("loser")].into();
        assert_eq!(scope, want);
    }

    #[test]
    fn conflicts_are_found_by_bisection() {
        let mut plan = GatewayPlan::default();
        for name in ["a", "b", "c"] {
            plan.conflicts.push(Conflict {
                object: fip(name),
                field: "spec.eip".into(),
                reason: format!("reason {name}"),
                pending: name == "b",
            });
        }
        let [(_, _, reason, _), ..] = wanted(&plan, &fip("b"));
        assert_eq!(reason, "Pending");
        let [(_, status, _, _), ..] = wanted(&plan, &fip("zz"));
        assert_eq!(status, "False");
    }
}
