//! The gateway workload: one StatefulSet per NatGateway running
//! `natgw agent --gateway NAME` in the controller's namespace.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, Pod,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext, Sysctl,
    Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
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

/// The sysctls a gateway pod needs; a kubelet must allow them
/// (`allowedUnsafeSysctls`) on the nodes that run gateways.
pub const SYSCTLS: [&str; 2] = ["net.ipv4.ip_forward", "net.ipv4.conf.all.promote_secondaries"];

/// Where the agent serves /healthz, /readyz and /metrics in a gateway pod.
pub const HEALTH_PORT: i32 = 9478;

/// The gateway pods' settings, from the controller's flags (the chart's
/// `gateway.*` values).
#[derive(Clone, Debug, Default)]
pub struct GatewayPod {
    pub image: Option<String>,
    pub pull_policy: Option<String>,
    /// `namespace/name` for gateways without spec.externalNetwork.
    pub external_network: Option<String>,
    pub resources: Option<ResourceRequirements>,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    /// The agent's translation log (`stdout`: its root filesystem is read
    /// only) and its rates, in all and per EIP; `None` leaves it off.
    pub translation_log: Option<TranslationLog>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TranslationLog {
    pub rate: Option<u32>,
    pub eip_rate: Option<u32>,
}

/// A NetworkAttachmentDefinition the pod needs: (namespace, name, which
/// field named it).
pub type Network<'a> = (&'a str, &'a str, &'static str);

/// The NetworkAttachmentDefinitions a gateway's pod attaches, or why
/// they cannot be named.
pub fn networks<'a>(gw: &'a NatGateway, pod: &'a GatewayPod) -> Result<Vec<Network<'a>>, String> {
    let external = gw.spec.external_network.as_deref().or(pod.external_network.as_deref()).ok_or(
        "spec.externalNetwork is not set and the controller has no default (--gateway-external-network, the \
         chart's gateway.externalNetwork): the gateway pod would have no external interface",
    )?;
    let mut out = vec![split(external, "spec.externalNetwork")?];
    if let Some(lan) = gw.spec.lan_network.as_deref() {
        out.push(split(lan, "spec.lanNetwork")?);
    }
    Ok(out)
}

fn split<'a>(reference: &'a str, field: &'static str) -> Result<Network<'a>, String> {
    match reference.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Ok((ns, name, field)),
        _ => Err(format!("{field} {reference:?} is not namespace/name")),
    }
}

/// The agent's translation log settings as its environment.
fn translation_env(log: Option<&TranslationLog>) -> Vec<EnvVar> {
    let Some(log) = log else { return Vec::new() };
    let var = |name: &str, value: String| EnvVar { name: name.into(), value: Some(value), ..Default::default() };
    let mut env = vec![var("NATGW_TRANSLATION_LOG", "stdout".into())];
    env.extend(log.rate.map(|r| var("NATGW_TRANSLATION_LOG_RATE", r.to_string())));
    env.extend(log.eip_rate.map(|r| var("NATGW_TRANSLATION_LOG_EIP_RATE", r.to_string())));
    env
}

/// The desired StatefulSet, or why there cannot be one. `lan_prefix` is
/// the prefix length of the VPC subnet holding spec.lanIp.
pub fn desired(
    gw: &NatGateway,
    namespace: &str,
    pod: &GatewayPod,
    lan_prefix: Option<u8>,
) -> Result<StatefulSet, String> {
    let image = pod.image.as_deref().ok_or("the controller has no agent image (--agent-image / NATGW_AGENT_IMAGE)")?;
    let nets = networks(gw, pod)?;
    let gname = gw.name_any();
    let labels: BTreeMap<String, String> = [(WORKLOAD_LABEL.0, WORKLOAD_LABEL.1), (GATEWAY_LABEL, gname.as_str())]
        .map(|(k, v)| (k.into(), v.into()))
        .into();
    let mut attachments = vec![serde_json::json!({
        "name": nets[0].1, "namespace": nets[0].0, "interface": gw.spec.external_interface
    })];
    if let Some((ns, name, _)) = nets.get(1) {
        let mut lan = serde_json::json!({ "name": name, "namespace": ns, "interface": gw.spec.lan_interface });
        if let Some(ip) = gw.spec.lan_ip {
            let prefix = lan_prefix.ok_or(format!("spec.lanIp {ip} lies in no subnet of VPC {}", gw.spec.vpc))?;
            lan["ips"] = serde_json::json!([format!("{ip}/{prefix}")]);
        }
        attachments.push(lan);
    }
    let attachment = serde_json::Value::Array(attachments);
    let http = |path: &str| HTTPGetAction {
        path: Some(path.into()),
        port: IntOrString::Int(HEALTH_PORT),
        ..Default::default()
    };
    let container = Container {
        name: "agent".into(),
        image: Some(image.into()),
        image_pull_policy: pod.pull_policy.clone(),
        args: Some(["agent", "--gateway", &gname].map(String::from).to_vec()),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: HEALTH_PORT,
            ..Default::default()
        }]),
        resources: pod.resources.clone(),
        env: Some(
            [
                // Where the address claims live: the agent trusts an Eip's
                // status.ip only with a claim behind it.
                field_env("POD_NAMESPACE", "metadata.namespace"),
                // Its gateway, for `kubectl exec POD -- natgw audit` too.
                EnvVar { name: "NATGW_GATEWAY".into(), value: Some(gname.clone()), ..Default::default() },
                // Health and metrics on the pod's own address (eth0) only,
                // never on the LAN or external side.
                field_env("POD_IP", "status.podIP"),
                EnvVar {
                    name: "NATGW_HEALTH_ADDR".into(),
                    value: Some(format!("$(POD_IP):{HEALTH_PORT}")),
                    ..Default::default()
                },
            ]
            .into_iter()
            .chain(translation_env(pod.translation_log.as_ref()))
            .collect(),
        ),
        // The image's user is unprivileged (for the controller); the agent
        // runs as root with only the capabilities it uses.
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            allow_privilege_escalation: Some(false),
            // The agent writes nothing to its files (a translation log to
            // a file needs a volume).
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        // Ready only once the kernel holds the plan (the agent's /readyz).
        readiness_probe: Some(Probe { http_get: Some(http("/readyz")), period_seconds: Some(1), ..Default::default() }),
        liveness_probe: Some(Probe {
            http_get: Some(http("/healthz")),
            period_seconds: Some(10),
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
            // A new pod is a new network namespace: every translated session
            // ends. An upgrade (a new image) waits until the operator deletes
            // the pod, so `helm upgrade` never cuts a gateway's sessions.
            update_strategy: Some(StatefulSetUpdateStrategy { type_: Some("OnDelete".into()), ..Default::default() }),
            selector: LabelSelector { match_labels: Some(labels.clone()), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some([("k8s.v1.cni.cncf.io/networks".to_string(), attachment.to_string())].into()),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    // /proc/sys is read-only in a pod: what the gateway needs
                    // comes from the pod's sysctls (the kubelet must allow
                    // them: allowedUnsafeSysctls).
                    security_context: Some(PodSecurityContext {
                        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
                        sysctls: Some(
                            SYSCTLS.iter().map(|n| Sysctl { name: (*n).into(), value: "1".into() }).collect(),
                        ),
                        ..Default::default()
                    }),
                    // Its own account: the admission policy lets it write
                    // only this gateway's objects.
                    service_account_name: Some(natgw_kube_support::identity::account(&gname)),
                    containers: vec![container],
                    node_selector: (!pod.node_selector.is_empty()).then(|| pod.node_selector.clone()),
                    tolerations: (!pod.tolerations.is_empty()).then(|| pod.tolerations.clone()),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    })
}

/// An environment variable from a field of the pod.
fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A pod of the gateway that runs another agent image than `sts` asks for,
/// as the message of `ImageCurrent=False`: gateways update `OnDelete`, so
/// after an upgrade each keeps its old image until its pod is deleted.
pub fn image_skew(sts: &StatefulSet, pods: &[Pod]) -> Option<String> {
    let agent = |c: &[k8s_openapi::api::core::v1::Container]| {
        c.iter().find(|c| c.name == "agent").and_then(|c| c.image.clone())
    };
    let wanted = agent(&sts.spec.as_ref()?.template.spec.as_ref()?.containers)?;
    pods.iter().find_map(|p| {
        let running = agent(&p.spec.as_ref()?.containers)?;
        (running != wanted).then(|| {
            format!("pod {} runs {running}; the gateway asks for {wanted}: delete the pod to move it", p.name_any())
        })
    })
}

/// Whether the workload serves, from the applied StatefulSet and its pods:
/// (status, reason, message) of `WorkloadReady`.
pub fn readiness(sts: &StatefulSet, pods: &[Pod]) -> (&'static str, String, String) {
    let ready = sts.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
    let n = sts.name_any();
    if ready > 0 {
        return ("True", "Ready".into(), format!("StatefulSet {n}: the gateway pod is ready"));
    }
    // One replica: its pod, if any, says why.
    if let Some(pod) = pods.first() {
        let p = pod.name_any();
        let status = pod.status.as_ref();
        let waiting = status
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .find_map(|c| c.state.as_ref().and_then(|s| s.waiting.as_ref()));
        if let Some(w) = waiting {
            let reason = w.reason.clone().unwrap_or_else(|| "Waiting".into());
            if reason != "ContainerCreating" {
                let msg = w.message.clone().unwrap_or_default();
                return ("False", reason.clone(), format!("pod {p}: {reason}: {msg}").trim_end_matches(": ").into());
            }
        }
        // A pod the kubelet refused (SysctlForbidden, ...).
        if let Some(reason) = status.and_then(|s| s.reason.clone()) {
            let msg = status.and_then(|s| s.message.clone()).unwrap_or_default();
            return ("False", reason, format!("pod {p}: {msg}"));
        }
        let unschedulable = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False");
        if let Some(c) = unschedulable {
            let msg = c.message.clone().unwrap_or_default();
            return ("False", "Unschedulable".into(), format!("pod {p}: {msg}"));
        }
        let phase = status.and_then(|s| s.phase.clone()).unwrap_or_else(|| "Pending".into());
        return ("False", "Starting".into(), format!("pod {p} is {phase}, not ready yet"));
    }
    ("False", "NoPod".into(), format!("StatefulSet {n} has no pod yet"))
}

pub async fn apply(client: &Client, namespace: &str, sts: &StatefulSet) -> Result<StatefulSet, kube::Error> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    let n = sts.name_any();
    let body = natgw_kube_support::apply_body(sts)?;
    api.patch(&n, &PatchParams::apply("natgw-controller/workload").force(), &Patch::Apply(&body)).await
}

pub async fn remove(client: &Client, namespace: &str, gw: &str) -> Result<(), kube::Error> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    match api.delete(&name(gw), &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "natgw-gw-a-0"}, "status": status})).unwrap()
    }

    fn sts(ready: i32) -> StatefulSet {
        serde_json::from_value(
            serde_json::json!({"metadata": {"name": "natgw-gw-a"}, "status": {"replicas": 1, "readyReplicas": ready}}),
        )
        .unwrap()
    }

    #[test]
    fn workload_readiness_carries_the_pods_own_reason() {
        assert_eq!(readiness(&sts(1), &[]).0, "True");
        assert_eq!(readiness(&sts(0), &[]).1, "NoPod");
        let missing_image =
            pod(serde_json::json!({"phase": "Pending", "containerStatuses": [{"name": "agent", "ready": false,
            "restartCount": 0, "image": "natgw:x", "imageID": "", "state": {"waiting": {"reason": "ErrImageNeverPull",
            "message": "Container image \"natgw:x\" is not present with pull policy of Never"}}}]}));
        let (status, reason, message) = readiness(&sts(0), &[missing_image]);
        assert_eq!((status, reason.as_str()), ("False", "ErrImageNeverPull"));
        assert!(message.contains("natgw:x"), "{message}");
        let unschedulable = pod(serde_json::json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
            "status": "False", "reason": "Unschedulable", "message": "0/1 nodes are available"}]}));
        assert_eq!(readiness(&sts(0), &[unschedulable]).1, "Unschedulable");
        let creating = pod(
            serde_json::json!({"phase": "Pending", "containerStatuses": [{"name": "agent", "ready": false,
            "restartCount": 0, "image": "natgw:x", "imageID": "", "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
        );
        assert_eq!(readiness(&sts(0), &[creating]).1, "Starting");
        let refused = pod(serde_json::json!({"phase": "Failed", "reason": "SysctlForbidden",
            "message": "Pod forbidden sysctl: \"net.ipv4.ip_forward\" not allowlisted"}));
        let (_, reason, message) = readiness(&sts(0), &[refused]);
        assert_eq!(reason, "SysctlForbidden");
        assert!(message.contains("not allowlisted"), "{message}");
    }

    #[test]
    fn the_lan_attachment_asks_for_the_fixed_address_with_its_subnets_prefix() {
        let gw: NatGateway = serde_json::from_value(serde_json::json!({
            "apiVersion": "natgw.io/v1alpha1", "kind": "NatGateway", "metadata": {"name": "a", "uid": "u"},
            "spec": {"vpc": "v", "lanInterface": "lan0", "externalInterface": "ext0", "externalSubnet": "ext",
                     "lanNetwork": "natgw-system/vpc1", "lanIp": "10.0.1.254"}}))
        .unwrap();
        let pod = GatewayPod {
            image: Some("natgw:1".into()),
            external_network: Some("natgw-system/ext".into()),
            ..Default::default()
        };
        let sts = desired(&gw, "natgw-system", &pod, Some(24)).unwrap();
        let meta = sts.spec.unwrap().template.metadata.unwrap();
        let nets: serde_json::Value =
            serde_json::from_str(&meta.annotations.unwrap()["k8s.v1.cni.cncf.io/networks"]).unwrap();
        assert_eq!(
            nets,
            serde_json::json!([
            {"name": "ext", "namespace": "natgw-system", "interface": "ext0"},
            {"name": "vpc1", "namespace": "natgw-system", "interface": "lan0", "ips": ["10.0.1.254/24"]}])
        );
        // A lanIp outside the VPC's subnets is refused, with the field.
        assert!(desired(&gw, "natgw-system", &pod, None).unwrap_err().contains("spec.lanIp 10.0.1.254"));
        // The chart's translation log reaches the agent as its environment.
        let env_of = |pod: &GatewayPod| -> BTreeMap<String, String> {
            let sts = desired(&gw, "natgw-system", pod, Some(24)).unwrap();
            let c = sts.spec.unwrap().template.spec.unwrap().containers.remove(0);
            c.env.unwrap().into_iter().filter_map(|e| Some((e.name, e.value?))).collect()
        };
        assert!(!env_of(&pod).contains_key("NATGW_TRANSLATION_LOG"));
        let logged = GatewayPod { translation_log: Some(TranslationLog { rate: None, eip_rate: Some(100) }), ..pod };
        let env = env_of(&logged);
        assert_eq!(env.get("NATGW_TRANSLATION_LOG").map(String::as_str), Some("stdout"));
        assert_eq!(env.get("NATGW_TRANSLATION_LOG_EIP_RATE").map(String::as_str), Some("100"));
        assert!(!env.contains_key("NATGW_TRANSLATION_LOG_RATE"));
    }
}
