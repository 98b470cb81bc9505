//! natgw's CRDs as this binary knows them, applied by the leader. Helm
//! installs a chart's `crds/` once and never upgrades them, so a CEL rule
//! added in a later release never reached an upgraded cluster; the
//! leading controller applies its own at the start of its term (server-
//! side apply, taking the fields over from Helm's first create).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

const MANAGER: &str = "natgw-controller/crds";

/// Applies every natgw CRD; returns their names.
pub async fn apply(client: &Client) -> Result<Vec<String>, kube::Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for crd in natgw_api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let body = natgw_kube_support::apply_body(&crd)?;
        api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body)).await?;
        names.push(name);
    }
    Ok(names)
}
