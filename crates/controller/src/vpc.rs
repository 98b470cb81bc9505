//! A Vpc's members in its status.

use kube::ResourceExt;
use kube::runtime::controller::Action;
use natgw_api::{Kind, ObjectRef, Vpc};

use crate::conditions::patch_status;
use crate::{Ctx, Error};

/// Lists the Vpc's Subnets and NatGateways in its status.
pub async fn report_members(ctx: &Ctx, vpc: &Vpc) -> Result<Action, Error> {
    ctx.stores.ready().await;
    let name = vpc.name_any();
    // A Vpc's dependents are its members.
    let members = crate::deps::blockers(&ctx.stores, &ObjectRef::new(Kind::Vpc, &name));
    let of = |kind: Kind| -> Vec<&str> { members.iter().filter(|r| r.kind == kind).map(|r| r.name.as_str()).collect() };
    let (subnets, gateways) = (of(Kind::Subnet), of(Kind::NatGateway));
    let status = serde_json::json!({ "subnets": subnets, "gateways": gateways });
    patch_status::<Vpc>(ctx, "natgw-controller/members", &name, status).await?;
    Ok(Action::await_change())
}
