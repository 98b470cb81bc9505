//! `natgw`: one binary for every role: standalone gateway mode, the lab,
//! the controller, the gateway agent and the node agent.

mod standalone;
mod top;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "natgw", version, about = "NAT gateway that leaves nothing behind")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the desired state of a gateway; touches no kernel.
    Plan {
        #[arg(short = 'f', long = "file")]
        path: PathBuf,
        /// Which NatGateway (needed when the manifests hold several).
        #[arg(long)]
        gateway: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One sync of the manifests into a network namespace, all or nothing.
    Apply {
        #[arg(long)]
        netns: String,
        #[arg(short = 'f', long = "file")]
        path: PathBuf,
        #[arg(long)]
        gateway: Option<String>,
    },
    /// Keep a namespace converged with a directory of manifests.
    Run {
        #[arg(long)]
        netns: String,
        #[arg(short = 'f', long = "file")]
        path: PathBuf,
        #[arg(long)]
        gateway: Option<String>,
        /// Seconds between drift repairs when nothing changed.
        #[arg(long, default_value_t = 30)]
        resync: u64,
        /// Milliseconds between looks at the manifest files.
        #[arg(long, default_value_t = 500)]
        poll_ms: u64,
        /// Serve /metrics, /healthz and /readyz here (the replica's metrics
        /// when it runs as one).
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        #[command(flatten)]
        ha: standalone::HaArgs,
    },
    /// Compare kernel and manifests: exit 0 when converged, 1 otherwise.
    Audit {
        /// The namespace to audit; without it, the current one (inside a
        /// gateway pod, where entering a namespace is not allowed).
        #[arg(long)]
        netns: Option<String>,
        /// The objects; without it, inside a gateway pod, its gateway's
        /// objects as the agent programs them, read from the API server
        /// (`kubectl exec POD -- natgw audit`).
        #[arg(short = 'f', long = "file")]
        path: Option<PathBuf>,
        #[arg(long, env = "NATGW_GATEWAY")]
        gateway: Option<String>,
        /// The namespace is a standby replica's: every translation, no
        /// address (the LAN address and EIPs are the active's).
        #[arg(long)]
        standby: bool,
    },
    /// Show the busiest EIPs, their busiest destinations and how many of
    /// their source ports are in use, live (inside a gateway pod without
    /// --netns).
    Top {
        #[arg(long)]
        netns: Option<String>,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2)]
        interval: u64,
        /// (EIP, protocol) rows shown.
        #[arg(long, default_value_t = 20)]
        rows: usize,
        /// Destinations shown per row.
        #[arg(long, default_value_t = 3)]
        destinations: usize,
        /// Print once and exit.
        #[arg(long)]
        once: bool,
    },
    /// Who held an EIP (or EIP:port) at a moment: the translations in force
    /// then, from a translation log (`natgw agent --translation-log`).
    Logs {
        /// The log file (a rotated one too; give each file in turn).
        #[arg(long)]
        file: PathBuf,
        /// `198.51.100.10` or `198.51.100.10:1024`.
        #[arg(long)]
        eip: String,
        /// RFC 3339 UTC, as the log writes it: 2026-11-28T10:00:00Z.
        #[arg(long)]
        at: String,
    },
    /// Remove everything natgw owns from a namespace.
    Teardown {
        #[arg(long)]
        netns: String,
    },
    /// Print the CustomResourceDefinitions (what deploy/crds.yaml holds).
    Crd,
    /// Wait until the API server admits a write of natgw's objects (a
    /// dry-run create): the chart's post-install hook, so that `helm
    /// install` does not succeed while natgw's policies still refuse
    /// every write. Exit 1, with the last refusal, after the timeout.
    InstallCheck {
        #[arg(long, default_value_t = 300)]
        timeout_seconds: u64,
    },
    /// Run the gateway agent: keep one NatGateway's namespace equal to its
    /// objects, finalizer first. Without --netns it programs its own.
    Agent(natgw_agent::Args),
    /// Run the cluster controller (finalizers, deletion order, EIP
    /// addresses, gateway workloads), leader-elected on a Lease. Uses the
    /// in-cluster config or KUBECONFIG; stops on SIGTERM/SIGINT and hands
    /// the Lease over.
    Controller(natgw_controller::Args),
    /// Run the node agent: Service egress SNAT for this node (see the
    /// README's "Service egress"). Uses the in-cluster config or
    /// KUBECONFIG; on SIGTERM removes its egress table unless
    /// --keep-on-exit.
    NodeAgent(natgw_node_agent::Args),
    /// The demo and test topology of network namespaces.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
}

#[derive(Subcommand)]
enum LabAction {
    /// Create the namespaces (PREFIX-gw, -sw, -int1, -int2, -ext1).
    Up {
        #[arg(long, default_value = "ngw")]
        prefix: String,
        /// A second gateway replica, PREFIX-gw2, on the same LAN and
        /// external segments (the external side becomes a bridge).
        #[arg(long)]
        ha: bool,
    },
    /// Remove them.
    Down {
        #[arg(long, default_value = "ngw")]
        prefix: String,
    },
    /// Send real traffic: a server in one lab host, a client in another;
    /// prints the source address the server saw.
    Probe {
        #[arg(long, default_value = "ngw")]
        prefix: String,
        /// Client role: int1, int2 or ext1.
        #[arg(long)]
        from: String,
        /// Server role: int1, int2 or ext1.
        #[arg(long)]
        server: String,
        /// Address the server listens on inside its namespace.
        #[arg(long)]
        listen: std::net::SocketAddrV4,
        /// Address the client connects to.
        #[arg(long)]
        to: std::net::SocketAddrV4,
        #[arg(long)]
        udp: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The agent's threads take turns on one large state; the controller's
    // run side by side.
    natgw_kube_support::heap::cap_arenas(if matches!(cli.command, Command::Agent(_)) { 1 } else { 2 });
    natgw_kube_support::heap::fix_mmap_threshold();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Plan { path, gateway, json } => standalone::plan(&path, gateway.as_deref(), json),
        Command::Apply { netns, path, gateway } => standalone::apply(&netns, &path, gateway.as_deref()),
        Command::Run { netns, path, gateway, resync, poll_ms, metrics_addr, ha } => {
            standalone::run(&netns, &path, gateway.as_deref(), (resync, poll_ms), metrics_addr, ha)
        }
        Command::Audit { netns, path: Some(path), gateway, standby } => {
            standalone::audit(netns.as_deref(), &path, gateway.as_deref(), standby)
        }
        Command::Audit { netns, path: None, gateway, standby } => {
            audit_from_cluster(netns.as_deref(), gateway.as_deref(), standby)
        }
        Command::Teardown { netns } => standalone::teardown(&netns),
        Command::Logs { file, eip, at } => top::logs(&file, &eip, &at),
        Command::Top { netns, interval, rows, destinations, once } => {
            top::top(netns.as_deref(), std::time::Duration::from_secs(interval.max(1)), rows, destinations, once)
        }
        Command::Controller(args) => {
            let addr = args.health_addr;
            args.election().map_err(anyhow::Error::msg).and_then(|election| controller(election, addr))
        }
        Command::Agent(args) => agent(args),
        Command::InstallCheck { timeout_seconds } => install_check(timeout_seconds),
        Command::NodeAgent(args) => node_agent(args),
        Command::Crd => natgw_api::crds_yaml()
            .map(|y| {
                print!("{y}");
                ExitCode::SUCCESS
            })
            .map_err(Into::into),
        Command::Lab { action: LabAction::Up { prefix, ha } } => natgw_lab::Lab::up(&prefix)
            .and_then(|lab| {
                if ha {
                    lab.second_gateway()?;
                }
                let lab = lab.keep();
                let roles: &[&str] = if ha {
                    &["gw", "gw2", "sw", "int1", "int2", "ext1"]
                } else {
                    &["gw", "sw", "int1", "int2", "ext1"]
                };
                let names: Vec<String> = roles.iter().map(|r| lab.ns(r)).collect();
                println!("lab {} is up: namespaces {}", lab.prefix(), names.join(" "));
                Ok(ExitCode::SUCCESS)
            })
            .map_err(Into::into),
        Command::Lab { action: LabAction::Down { prefix } } => {
            natgw_lab::Lab::down(&prefix).map(|_| ExitCode::SUCCESS).map_err(Into::into)
        }
        Command::Lab { action: LabAction::Probe { prefix, from, server, listen, to, udp } } => {
            probe(&prefix, &from, &server, listen, to, udp)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn probe(
    prefix: &str,
    from: &str,
    server: &str,
    listen: std::net::SocketAddrV4,
    to: std::net::SocketAddrV4,
    udp: bool,
) -> anyhow::Result<ExitCode> {
    use natgw_lab::traffic;
    let (client_ns, server_ns) = (format!("{prefix}-{from}"), format!("{prefix}-{server}"));
    let proto = if udp { "udp" } else { "tcp" };
    let seen = if udp {
        let _s = traffic::udp_server(&server_ns, *listen.ip(), listen.port())?;
        traffic::udp_source(&client_ns, *to.ip(), to.port())
    } else {
        let _s = traffic::tcp_server(&server_ns, *listen.ip(), listen.port())?;
        traffic::tcp_source(&client_ns, *to.ip(), to.port())
    };
    match seen {
        Ok(src) => {
            println!("{proto} {from} -> {to} (server in {server} on {listen}): server saw source {src}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("{proto} {from} -> {to} (server in {server} on {listen}): no connection ({e})");
            Ok(ExitCode::from(1))
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn stop_signal() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping");
}

fn controller(election: natgw_controller::Election, health_addr: std::net::SocketAddr) -> anyhow::Result<ExitCode> {
    natgw_kube_support::heap::start_trimming();
    tokio::runtime::Runtime::new()?.block_on(async {
        let listener = bind(health_addr).await?;
        let client = natgw_kube_support::client().await?;
        let probe = election.options.health.probe.clone();
        // The health server lives exactly as long as the controller.
        tokio::select! {
            r = natgw_controller::run_elected(client, election, stop_signal()) => r?,
            _ = natgw_kube_support::health::serve(listener, probe) => {}
        }
        Ok(ExitCode::SUCCESS)
    })
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("--health-addr {addr}: {e}"))
}

/// `natgw audit` in a gateway pod: its gateway's objects from the API
/// server (the pod's own account may read them), as its agent programs
/// them.
fn audit_from_cluster(netns: Option<&str>, gateway: Option<&str>, standby: bool) -> anyhow::Result<ExitCode> {
    let gw = gateway.ok_or_else(|| {
        anyhow::anyhow!("-f FILE, or inside a gateway pod --gateway (NATGW_GATEWAY, which the pod sets)")
    })?;
    let namespace = std::env::var("POD_NAMESPACE")
        .map_err(|_| anyhow::anyhow!("POD_NAMESPACE is not set: the claims' namespace is unknown (use -f FILE)"))?;
    let set = tokio::runtime::Runtime::new()?.block_on(async {
        let client = natgw_kube_support::client().await?;
        anyhow::Ok(natgw_agent::snapshot::objects(&client, gw, &namespace).await?)
    })?;
    standalone::audit_set(netns, &set, gw, standby)
}

fn install_check(timeout_seconds: u64) -> anyhow::Result<ExitCode> {
    tokio::runtime::Runtime::new()?.block_on(async {
        let client = natgw_kube_support::client().await?;
        let timeout = std::time::Duration::from_secs(timeout_seconds);
        let waited =
            natgw_kube_support::admission::wait_writable(&client, timeout, std::time::Duration::from_secs(1)).await?;
        match waited.first_refusal {
            Some(first) => println!(
                "natgw's objects can be written, after {} refused dry runs over {:.1}s; the first refusal: {first}",
                waited.refused,
                waited.took.as_secs_f64()
            ),
            None => println!("natgw's objects can be written"),
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn agent(a: natgw_agent::Args) -> anyhow::Result<ExitCode> {
    natgw_kube_support::heap::start_trimming();
    tokio::runtime::Runtime::new()?.block_on(async {
        let client = natgw_kube_support::client().await?;
        let listener = bind(a.health_addr).await?;
        a.ports.check().map_err(anyhow::Error::msg)?;
        let (gw, ns, claims) = (a.gateway, a.netns, a.claims_namespace);
        natgw_agent::run_with(client, gw, ns, claims, Some(listener), a.ports, stop_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

fn node_agent(a: natgw_node_agent::Args) -> anyhow::Result<ExitCode> {
    natgw_kube_support::heap::start_trimming();
    let config = a.config().map_err(anyhow::Error::msg)?;
    let health_addr = a.health_addr;
    tokio::runtime::Runtime::new()?.block_on(async {
        let listener = bind(health_addr).await?;
        let client = natgw_kube_support::client().await?;
        natgw_node_agent::run(client, config, Some(listener), stop_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}
