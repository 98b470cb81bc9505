//! The controller's command line (`natgw controller --help`).

use std::time::Duration;

use k8s_openapi::api::core::v1::ResourceRequirements;

use crate::workload::{GatewayPod, TranslationLog};
use crate::{Election, Options};

/// Every setting of the controller, with its environment variable.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// This instance's unique identity (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pub instance: String,
    /// Namespace of the leader-election Lease, the address claims and the
    /// gateway workloads (the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "NATGW_LEASE", default_value = "natgw-controller")]
    pub lease: String,
    /// Image for the gateway workloads (runs `natgw agent`). Without it,
    /// every NatGateway says `WorkloadReady=False`.
    #[arg(long, env = "NATGW_AGENT_IMAGE")]
    pub agent_image: Option<String>,
    /// Image pull policy of the gateway pods.
    #[arg(long, env = "NATGW_GATEWAY_PULL_POLICY")]
    pub gateway_pull_policy: Option<String>,
    /// NetworkAttachmentDefinition (namespace/name) of the external side
    /// for NatGateways without spec.externalNetwork.
    #[arg(long, env = "NATGW_GATEWAY_EXTERNAL_NETWORK")]
    pub gateway_external_network: Option<String>,
    /// The gateway pods' resources, as JSON (a ResourceRequirements).
    #[arg(long, env = "NATGW_GATEWAY_RESOURCES")]
    pub gateway_resources: Option<String>,
    /// The gateway pods' node selector, as a JSON object.
    #[arg(long, env = "NATGW_GATEWAY_NODE_SELECTOR")]
    pub gateway_node_selector: Option<String>,
    /// The gateway pods' tolerations, as a JSON list.
    #[arg(long, env = "NATGW_GATEWAY_TOLERATIONS")]
    pub gateway_tolerations: Option<String>,
    /// The gateway agents' translation logs: `off` or `stdout` (their root
    /// filesystem is read only).
    #[arg(long, env = "NATGW_GATEWAY_TRANSLATION_LOG", default_value = "off")]
    pub gateway_translation_log: String,
    /// Their lines per second at most, in all and per EIP (unset: the
    /// agent's defaults).
    #[arg(long, env = "NATGW_GATEWAY_TRANSLATION_LOG_RATE")]
    pub gateway_translation_log_rate: Option<u32>,
    #[arg(long, env = "NATGW_GATEWAY_TRANSLATION_LOG_EIP_RATE")]
    pub gateway_translation_log_eip_rate: Option<u32>,
    /// Seconds a NatGateway being deleted may go without a ready agent
    /// before the controller releases the agent's finalizers itself.
    #[arg(long, env = "NATGW_RELEASE_AFTER", default_value_t = 300)]
    pub release_after: u64,
    /// Reconciles in flight per kind (each holds an API connection).
    #[arg(long, env = "NATGW_WORKERS", default_value_t = crate::DEFAULT_WORKERS,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: u16,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, env = "NATGW_HEALTH_ADDR", default_value = "0.0.0.0:9477")]
    pub health_addr: std::net::SocketAddr,
    /// Apply natgw's CRDs as this binary knows them when it starts to lead
    /// (`helm upgrade` never updates a chart's CRDs).
    #[arg(long, env = "NATGW_APPLY_CRDS")]
    pub apply_crds: bool,
}

/// A JSON flag: absent or empty is the default; anything unreadable is an
/// error naming the flag.
fn json<T: serde::de::DeserializeOwned + Default>(flag: &str, value: &Option<String>) -> Result<T, String> {
    match value.as_deref().map(str::trim) {
        None | Some("") | Some("null") => Ok(T::default()),
        Some(v) => serde_json::from_str(v).map_err(|e| format!("--{flag}: {e} in {v:?}")),
    }
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.trim().is_empty())
}

impl Args {
    /// The gateway pods' settings; a bad JSON flag is an error naming it.
    pub fn gateway_pod(&self) -> Result<GatewayPod, String> {
        let resources: ResourceRequirements = json("gateway-resources", &self.gateway_resources)?;
        Ok(GatewayPod {
            image: non_empty(self.agent_image.clone()),
            pull_policy: non_empty(self.gateway_pull_policy.clone()),
            external_network: non_empty(self.gateway_external_network.clone()),
            resources: (resources != ResourceRequirements::default()).then_some(resources),
            node_selector: json("gateway-node-selector", &self.gateway_node_selector)?,
            tolerations: json("gateway-tolerations", &self.gateway_tolerations)?,
            translation_log: match self.gateway_translation_log.trim() {
                "" | "off" => None,
                "stdout" => Some(TranslationLog {
                    rate: self.gateway_translation_log_rate,
                    eip_rate: self.gateway_translation_log_eip_rate,
                }),
                other => {
                    return Err(format!(
                        "--gateway-translation-log: {other:?} is neither off nor stdout (a gateway pod's root filesystem is read only)"
                    ));
                }
            },
        })
    }

    pub fn election(self) -> Result<Election, String> {
        let gateway_pod = self.gateway_pod()?;
        Ok(Election {
            namespace: self.namespace,
            lease: self.lease,
            identity: self.instance,
            duration_secs: 15,
            grace_secs: 5,
            options: Options {
                gateway_pod,
                release_after: Duration::from_secs(self.release_after),
                health: Default::default(),
                workers: self.workers,
                apply_crds: self.apply_crds,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: super::Args,
    }

    fn parse(extra: &[&str]) -> super::Args {
        let base = ["natgw", "--instance", "a", "--namespace", "natgw-system"];
        Cli::parse_from(base.iter().chain(extra)).args
    }

    #[test]
    fn gateway_pod_settings_come_from_json_flags_and_bad_json_names_the_flag() {
        let args = parse(&[
            "--agent-image=natgw:1",
            r#"--gateway-resources={"limits":{"memory":"256Mi"}}"#,
            r#"--gateway-node-selector={"natgw.io/gateway":"true"}"#,
            r#"--gateway-tolerations=[{"operator":"Exists"}]"#,
            "--gateway-external-network=",
        ]);
        let pod = args.gateway_pod().unwrap();
        assert_eq!(pod.image.as_deref(), Some("natgw:1"));
        assert_eq!(pod.node_selector["natgw.io/gateway"], "true");
        assert_eq!(pod.tolerations.len(), 1);
        assert!(pod.resources.is_some());
        // An empty value (the chart's default) is no setting, never "".
        assert_eq!(pod.external_network, None);
        let bad = parse(&["--gateway-tolerations={oops"]);
        assert!(bad.gateway_pod().unwrap_err().starts_with("--gateway-tolerations: "));
        // The chart's empty values are the defaults.
        let empty = parse(&["--gateway-resources={}", "--gateway-node-selector={}", "--gateway-tolerations=[]"]);
        let pod = empty.gateway_pod().unwrap();
        assert!(pod.resources.is_none() && pod.node_selector.is_empty() && pod.tolerations.is_empty());
    }

    #[test]
    fn translation_logs_go_to_stdout_with_their_rates_or_nowhere() {
        assert_eq!(parse(&[]).gateway_pod().unwrap().translation_log, None);
        let on = parse(&["--gateway-translation-log=stdout", "--gateway-translation-log-eip-rate=100"]);
        let log = on.gateway_pod().unwrap().translation_log.unwrap();
        assert_eq!((log.rate, log.eip_rate), (None, Some(100)));
        let file = parse(&["--gateway-translation-log=/var/log/t"]).gateway_pod().unwrap_err();
        assert!(file.starts_with("--gateway-translation-log: ") && file.contains("read only"), "{file}");
    }

    #[test]
    fn workers_are_bounded_and_zero_is_refused() {
        assert_eq!(parse(&[]).workers, crate::DEFAULT_WORKERS);
        assert_eq!(parse(&["--workers=4"]).election().unwrap().options.workers, 4);
        let zero = Cli::try_parse_from(["natgw", "--instance", "a", "--namespace", "n", "--workers=0"]);
        assert!(zero.err().is_some_and(|e| e.to_string().contains("--workers")));
    }
}
