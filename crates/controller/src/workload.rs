//! The gateway workload: one StatefulSet per NatGateway running
//! `natgw agent --gateway NAME` in the controller's namespace.

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use natgw_api::NatGateway;

/// StatefulSet names stay within 52 bytes (the StatefulSet controller
/// adds a revision hash to a label value of at most 63). A long gateway
/// name is cut and hashed, so two gateways never share a workload.
pub fn name(gw: &str) -> String {
    natgw_api::bounded_name("natgw-gw-", gw, 52)
}

/// Label on every gateway workload, for watching them.
pub const WORKLOAD_LABEL: (&str, &str) = ("app.kubernetes.io/name", "natgw-gateway");

/// The desired StatefulSet, or why there cannot be one.
pub fn desired(gw: &NatGateway, namespace: &str, image: Option<&str>) -> Result<serde_json::Value, String> {
    let image = image.ok_or("the controller has no agent image (--agent-image / NATGW_AGENT_IMAGE)")?;
    let network = gw
        .spec
        .external_network
        .as_deref()
        .ok_or("spec.externalNetwork is not set: the gateway pod would have no external interface")?;
    let (nad_ns, nad) =
        network.split_once('/').ok_or(format!("spec.externalNetwork {network:?} is not namespace/name"))?;
    let gname = gw.name_any();
    let labels = serde_json::json!({ "app.kubernetes.io/name": "natgw-gateway", "natgw.io/gateway": gname });
    let attachment = serde_json::json!([{ "name": nad, "namespace": nad_ns, "interface": gw.spec.external_interface }]);
    Ok(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": name(&gname),
            "namespace": namespace,
            "labels": labels,
            // Garbage collection where a controller-manager runs; the
            // controller also deletes it itself.
            "ownerReferences": [{
                "apiVersion": NatGateway::api_version(&()),
                "kind": NatGateway::kind(&()),
                "name": gname,
                "uid": gw.uid().unwrap_or_default(),
            }],
        },
        "spec": {
            "replicas": 1,
            "serviceName": name(&gname),
            "selector": { "matchLabels": labels },
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": { "k8s.v1.cni.cncf.io/networks": attachment.to_string() },
                },
                "spec": {
                    "serviceAccountName": "natgw-gateway",
                    "containers": [{
                        "name": "agent",
                        "image": image,
                        "args": ["agent", "--gateway", gname],
                        // Where the address claims live: the agent trusts an
                        // Eip's status.ip only with a claim behind it.
                        "env": [{ "name": "POD_NAMESPACE", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } }],
                        "securityContext": { "capabilities": { "add": ["NET_ADMIN", "NET_RAW"] } },
                        "readinessProbe": { "exec": { "command": ["natgw", "--version"] } },
                    }],
                },
            },
        },
    }))
}

pub async fn apply(client: &Client, namespace: &str, body: &serde_json::Value) -> Result<(), kube::Error> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    let n = body["metadata"]["name"].as_str().unwrap_or_default().to_string();
    api.patch(&n, &PatchParams::apply("natgw-controller/workload").force(), &Patch::Apply(body)).await.map(drop)
}

pub async fn remove(client: &Client, namespace: &str, gw: &str) -> Result<(), kube::Error> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    match api.delete(&name(gw), &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}
