//! A NatGateway's workload and the validity of what the API server stored.

use kube::ResourceExt;
use kube::runtime::controller::Action;
use natgw_api::*;

use crate::conditions::set_condition;
use crate::{Ctx, Error, KindResource, workload};

/// Applies the gateway's StatefulSet, or says why it cannot.
pub async fn ensure_workload(ctx: &Ctx, gw: &NatGateway) -> Result<Action, Error> {
    let (status, reason, message) = match workload::desired(gw, &ctx.namespace, ctx.options.agent_image.as_deref()) {
        Ok(body) => {
            workload::apply(&ctx.client, &ctx.namespace, &body).await?;
            ("True", "Applied", format!("StatefulSet {}/{}", ctx.namespace, workload::name(&gw.name_any())))
        }
        Err(why) => ("False", "NotConfigured", why),
    };
    report_validity(ctx, gw).await?;
    let manager = "natgw-controller/workload";
    set_condition(ctx, gw, manager, ("WorkloadReady", status, reason, message), "CreateWorkload").await?;
    Ok(Action::await_change())
}

/// `Valid` on a NatGateway: an object stored before a CEL rule existed
/// (a route with host bits, a bad next hop) is named here; the planner
/// skips what is invalid instead of failing every sync.
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
