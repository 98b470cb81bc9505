//! The gateway agent's command line (`natgw agent --help`).

/// Every setting of the gateway agent, with its environment variable.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// The NatGateway this agent programs.
    #[arg(long, env = "NATGW_GATEWAY")]
    pub gateway: String,
    /// Network namespace path or name under /run/netns; the agent's own
    /// (the gateway pod's) without it.
    #[arg(long)]
    pub netns: Option<String>,
    /// The controller's namespace, where address claims live (the gateway
    /// pod runs there).
    #[arg(long, env = "POD_NAMESPACE")]
    pub claims_namespace: String,
    /// Where /healthz, /readyz and /metrics are served. Ready means: the
    /// caches listed and the first full sync is in the kernel.
    #[arg(long, env = "NATGW_HEALTH_ADDR", default_value = "0.0.0.0:9478")]
    pub health_addr: std::net::SocketAddr,
    #[command(flatten)]
    pub ports: crate::ports::PortArgs,
}
