//! The controller's command line (`natgw controller --help`).

use std::time::Duration;

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
    /// Seconds a NatGateway being deleted may go without a ready agent
    /// before the controller releases the agent's finalizers itself.
    #[arg(long, env = "NATGW_RELEASE_AFTER", default_value_t = 300)]
    pub release_after: u64,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, env = "NATGW_HEALTH_ADDR", default_value = "0.0.0.0:9477")]
    pub health_addr: std::net::SocketAddr,
}

impl Args {
    pub fn election(self) -> Election {
        Election {
            namespace: self.namespace,
            lease: self.lease,
            identity: self.instance,
            duration_secs: 15,
            grace_secs: 5,
            options: Options {
                agent_image: self.agent_image,
                release_after: Duration::from_secs(self.release_after),
                health: Default::default(),
            },
        }
    }
}
