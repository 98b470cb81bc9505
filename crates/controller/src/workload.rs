//! The gateway workload: one StatefulSet per NatGateway running
//! `natgw agent --gateway NAME` in the controller's namespace.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EnvVarSource, ExecAction, ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe,
    SecurityContext,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use natgw_api::{GATEWAY_LABEL, NatGateway};

/// StatefulSet names stay within 52 bytes (the StatefulSet controller
/// adds a revision hash to a label value of at most 63). A long gateway
/// name is cut and hashed, so two gateways never share a workload.
pub fn name(gw: &str) -> String {
    natgw_api::bounded_name("natgw-gw-", gw, 52)
}

/// Label on every gateway workload, for watching them.
pub const WORKLOAD_LABEL: (&str, &str) = ("app.kubernetes.io/name", "natgw-gateway");

/// The desired StatefulSet, or why there cannot be one.
pub fn desired(gw: &NatGateway, namespace: &str, image: Option<&str>) -> Result<StatefulSet, String> {
    let image = image.ok_or("the controller has no agent image (--agent-image / NATGW_AGENT_IMAGE)")?;
    let network = gw
        .spec
        .external_network
        .as_deref()
        .ok_or("spec.externalNetwork is not set: the gateway pod would have no external interface")?;
    let (nad_ns, nad) =
        network.split_once('/').ok_or(format!("spec.externalNetwork {network:?} is not namespace/name"))?;
    let gname = gw.name_any();
    let labels: BTreeMap<String, String> = [(WORKLOAD_LABEL.0, WORKLOAD_LABEL.1), (GATEWAY_LABEL, gname.as_str())]
        .map(|(k, v)| (k.into(), v.into()))
        .into();
    let attachment = serde_json::json!([{ "name": nad, "namespace": nad_ns, "interface": gw.spec.external_interface }]);
    let container = Container {
        name: "agent".into(),
        image: Some(image.into()),
        args: Some(["agent", "--gateway", &gname].map(String::from).to_vec()),
        // Where the address claims live: the agent trusts an Eip's
        // status.ip only with a claim behind it.
        env: Some(vec![EnvVar {
            name: "POD_NAMESPACE".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector { field_path: "metadata.namespace".into(), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        // The image's user is unprivileged (for the controller); the agent
        // runs as root with only the capabilities it uses.
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        readiness_probe: Some(Probe {
            exec: Some(ExecAction { command: Some(vec!["natgw".into(), "--version".into()]) }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(StatefulSet {
        metadata: ObjectMeta {
            name: Some(name(&gname)),
            namespace: Some(namespace.into()),
            labels: Some(labels.clone()),
            // Garbage collection where a controller-manager runs; the
            // controller also deletes it itself.
            owner_references: Some(vec![OwnerReference {
                api_version: NatGateway::api_version(&()).into(),
                kind: NatGateway::kind(&()).into(),
                name: gname.clone(),
                uid: gw.uid().unwrap_or_default(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(name(&gname)),
            selector: LabelSelector { match_labels: Some(labels.clone()), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some([("k8s.v1.cni.cncf.io/networks".to_string(), attachment.to_string())].into()),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some("natgw-gateway".into()),
                    containers: vec![container],
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    })
}

pub async fn apply(client: &Client, namespace: &str, sts: &StatefulSet) -> Result<(), kube::Error> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    let n = sts.name_any();
    // Server-side apply needs the type in the body.
    let mut body = serde_json::to_value(sts).map_err(kube::Error::SerdeError)?;
    body["apiVersion"] = "apps/v1".into();
    body["kind"] = "StatefulSet".into();
    api.patch(&n, &PatchParams::apply("natgw-controller/workload").force(), &Patch::Apply(&body)).await.map(drop)
}

pub async fn remove(client: &Client, namespace: &str, gw: &str) -> Result<(), kube::Error> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    match api.delete(&name(gw), &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}
