//! The node agent's command line (`natgw node-agent --help`).

use std::time::Duration;

use crate::{Config, RESYNC, cidrs};

/// Every setting of the node agent, with its environment variable.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// Network namespace path or name under /run/netns (tests); the
    /// agent's own namespace (hostNetwork) without it.
    #[arg(long)]
    pub netns: Option<String>,
    /// Pod CIDRs, comma-separated; overrides discovery from Node.spec.podCIDRs.
    #[arg(long, env = "NATGW_POD_CIDRS")]
    pub pod_cidrs: Option<String>,
    /// Service CIDRs, comma-separated; overrides discovery from ServiceCIDR objects.
    #[arg(long, env = "NATGW_SERVICE_CIDRS")]
    pub service_cidrs: Option<String>,
    /// Leave the egress table in place on exit, whatever the reason.
    #[arg(long, env = "NATGW_KEEP_ON_EXIT")]
    pub keep_on_exit: bool,
    /// The DaemonSet running this agent, in POD_NAMESPACE: on SIGTERM the
    /// table and its flows stay when the DaemonSet will start an agent
    /// here again (a restart), and go when it is deleted or no longer
    /// selects this node. Without it, SIGTERM removes everything.
    #[arg(long, env = "NATGW_DAEMONSET", requires = "pod_namespace")]
    pub daemonset: Option<String>,
    /// The agent's own namespace (the chart sets it from the pod).
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// Drop outside-bound traffic of an egress Service's pods until their
    /// SNAT is programmed.
    #[arg(long, env = "NATGW_FAIL_CLOSED")]
    pub fail_closed: bool,
    /// Translate to a VIP even when this node does not hold it (for
    /// announcers that never put the VIP on an interface).
    #[arg(long, env = "NATGW_NO_VIP_CHECK")]
    pub no_vip_check: bool,
    /// Seconds between full writes of the egress table (drift repair).
    #[arg(long, env = "NATGW_RESYNC", default_value_t = RESYNC.as_secs())]
    pub resync: u64,
    /// Where /readyz and /metrics are served.
    #[arg(long, env = "NATGW_HEALTH_ADDR", default_value = "0.0.0.0:9476")]
    pub health_addr: std::net::SocketAddr,
}

impl Args {
    /// The agent's configuration; a bad CIDR list is an error naming its flag.
    pub fn config(&self) -> Result<Config, String> {
        let parse = |flag: &str, v: &Option<String>| v.as_deref().map(|v| cidrs::parse(flag, v)).transpose();
        Ok(Config {
            node: self.node.clone(),
            netns: self.netns.clone(),
            overrides: cidrs::Overrides {
                pod_cidrs: parse(cidrs::POD_FLAG, &self.pod_cidrs)?,
                service_cidrs: parse(cidrs::SERVICE_FLAG, &self.service_cidrs)?,
            },
            keep_on_exit: self.keep_on_exit,
            daemonset: match (&self.pod_namespace, &self.daemonset) {
                (Some(ns), Some(name)) => Some((ns.clone(), name.clone())),
                _ => None,
            },
            fail_closed: self.fail_closed,
            vip_check: !self.no_vip_check,
            resync: Duration::from_secs(self.resync),
        })
    }
}
