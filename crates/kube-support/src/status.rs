//! Conditions and status. Each writer applies its own part with its own
//! server-side-apply field manager: an apply removes the fields its manager
//! applied before and leaves out now, and never touches another writer's.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};

use crate::KindResource;

/// A condition whose status changed now.
pub fn condition(type_: &str, status: &str, reason: &str, message: String, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
        observed_generation: generation,
    }
}

/// Applies `status` (a part of the status) to object `name` of kind K as
/// field manager `manager`.
pub async fn apply_status<K: KindResource>(
    client: &kube::Client,
    manager: &str,
    name: &str,
    status: serde_json::Value,
) -> Result<(), kube::Error> {
    let api: Api<K> = Api::all(client.clone());
    let body = serde_json::json!({ "apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status });
    api.patch_status(name, &PatchParams::apply(manager).force(), &Patch::Apply(&body)).await.map(drop)
}
