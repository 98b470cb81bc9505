//! Which gateway programs an object: the `natgw.io/gateway` label, taken
//! from an Eip's `spec.gateway` (its own, or that of the Eip a rule
//! names). Each agent watches only its own label value, so it holds its
//! gateway's objects and nothing else.

use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use natgw_api::GATEWAY_LABEL;

use crate::Kind;

/// Sets the label when it differs; a steady object costs no write.
pub async fn label<K: Kind>(client: &Client, obj: &K, gateway: &str) -> Result<(), kube::Error> {
    if obj.labels().get(GATEWAY_LABEL).map(String::as_str) == Some(gateway) {
        return Ok(());
    }
    let patch = serde_json::json!({ "metadata": { "labels": { GATEWAY_LABEL: gateway } } });
    Api::<K>::all(client.clone()).patch(&obj.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// The Eip a rule names, for the three rule kinds.
pub fn rule_eip(obj: &dyn std::any::Any) -> Option<&str> {
    use natgw_api::{DnatRule, FloatingIp, SnatRule};
    if let Some(f) = obj.downcast_ref::<FloatingIp>() {
        return Some(&f.spec.eip);
    }
    if let Some(s) = obj.downcast_ref::<SnatRule>() {
        return Some(&s.spec.eip);
    }
    obj.downcast_ref::<DnatRule>().map(|d| d.spec.eip.as_str())
}
