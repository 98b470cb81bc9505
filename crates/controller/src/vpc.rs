//! A Vpc's members in its status.

use kube::ResourceExt;
use kube::runtime::controller::Action;
use natgw_api::Vpc;

use crate::conditions::patch_status;
use crate::{Ctx, Error};

/// Lists the Vpc's Subnets and NatGateways in its status.
pub async fn report_members(ctx: &Ctx, vpc: &Vpc) -> Result<Action, Error> {
    ctx.stores.ready().await;
    let set = ctx.stores.snapshot();
    let name = vpc.name_any();
    let subnets: Vec<&String> =
        set.subnets.iter().filter(|(_, s)| s.spec.vpc.as_deref() == Some(name.as_str())).map(|(n, _)| n).collect();
    let gateways: Vec<&String> = set.gateways.iter().filter(|(_, g)| g.spec.vpc == name).map(|(n, _)| n).collect();
    let status = serde_json::json!({ "subnets": subnets, "gateways": gateways });
    patch_status::<Vpc>(ctx, "natgw-controller/members", &name, status).await?;
    Ok(Action::await_change())
}
