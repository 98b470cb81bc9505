//! The gateway agent: the process beside (in production: inside) one
//! gateway's network namespace. It keeps the kernel equal to the plan of
//! its NatGateway, with its own finalizer on every object it programs:
//!
//! - an object's state enters the kernel only after the agent's finalizer
//!   on it is persisted (a write with a resourceVersion precondition; a
//!   conflict or a vanished object means nothing is programmed);
//! - the finalizer is removed only after a sync whose result no longer
//!   holds the object (conntrack included);
//! - an object counts as deleted once the controller released it (its
//!   finalizer is gone), so an Eip whose deletion waits for rules stays.

mod args;
mod caches;
mod claims;
mod dirty;
mod metrics;
pub mod ports;
mod round;
pub mod snapshot;
mod status;
mod store;

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::api::Api;
use kube::runtime::watcher;
use natgw_api::*;
use natgw_dataplane::Gateway;

use caches::{Caches, watch};
use round::{Cluster, Planning, round};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Sync(#[from] natgw_dataplane::SyncError),
    /// The gateway cannot be planned: the kernel is left as it is.
    #[error("cannot plan; the kernel is left as it is")]
    Plan(#[from] natgw_plan::PlanError),
    #[error("a blocking task died")]
    Task(#[from] tokio::task::JoinError),
}

/// The agent's finalizer for gateway `gw`.
pub use args::Args;
pub use caches::{Holdings, holdings};
pub use natgw_api::gateway_finalizer as finalizer;

/// Runs the agent for gateway `gw` in namespace `netns` until `shutdown`.
/// `claims` is the controller's namespace, where address claims live.
pub async fn run(
    client: Client,
    gw: String,
    netns: Option<String>,
    claims: String,
    health: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    run_with(client, gw, netns, claims, health, ports::PortArgs::default(), shutdown).await
}

/// `run` with port accounting settings.
pub async fn run_with(
    client: Client,
    gw: String,
    netns: Option<String>,
    claims: String,
    health: Option<tokio::net::TcpListener>,
    port_args: ports::PortArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let (metrics, probe) = metrics::Metrics::new();
    let server = {
        let probe = probe.clone();
        async move {
            match health {
                Some(l) => natgw_kube_support::health::serve(l, probe).await,
                None => std::future::pending().await,
            }
        }
    };
    let ns = netns.clone();
    let gateway = Arc::new(tokio::task::spawn_blocking(move || Gateway::open(ns.as_deref())).await??);
    // Lives as long as the agent runs.
    let _translation_log = match port_args.translation_sink() {
        Some(sink) => {
            let log = gateway.start_translation_log(sink, port_args.translation_rates())?;
            metrics.translation_log(log.counts.clone());
            Some(log)
        }
        None => None,
    };
    tokio::pin!(server, shutdown);
    // spec.vpc is immutable: the VPC is fixed for the agent's life.
    let vpc = tokio::select! {
        vpc = vpc_of(&client, &gw, &probe) => vpc,
        _ = &mut server => return Ok(()),
        _ = &mut shutdown => return Ok(()),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    // Only what concerns this gateway: its own NatGateway (every other
    // gateway's status write would wake it), its VPC, that VPC's subnets,
    // the external subnets, and the Eips and rules the controller bound
    // to it. Other tenants' objects never reach it.
    let itself = watcher::Config::default().fields(&format!("metadata.name={gw}"));
    let its_vpc = watcher::Config::default().fields(&format!("metadata.name={vpc}"));
    let in_vpc = watcher::Config::default().fields(&format!("spec.vpc={vpc}"));
    let external = watcher::Config::default().fields("spec.vpc=");
    let mine = watcher::Config::default().labels(&format!("{GATEWAY_LABEL}={gw}"));
    let dirty = dirty::DirtyCell::default();
    let (vpcs, w1) = watch::<Vpc>(&client, its_vpc, &dirty, tx.clone(), metrics.received("Vpc"));
    let (subnets, w2) = watch::<Subnet>(&client, in_vpc, &dirty, tx.clone(), metrics.received("Subnet"));
    let (externals, w8) = watch::<Subnet>(&client, external, &dirty, tx.clone(), metrics.received("Subnet"));
    let (gateways, w3) = watch::<NatGateway>(&client, itself, &dirty, tx.clone(), metrics.received("NatGateway"));
    let (eips, w4) = watch::<Eip>(&client, mine.clone(), &dirty, tx.clone(), metrics.received("Eip"));
    let (fips, w5) = watch::<FloatingIp>(&client, mine.clone(), &dirty, tx.clone(), metrics.received("FloatingIp"));
    let (snats, w6) = watch::<SnatRule>(&client, mine.clone(), &dirty, tx.clone(), metrics.received("SnatRule"));
    let (dnats, w7) = watch::<DnatRule>(&client, mine, &dirty, tx.clone(), metrics.received("DnatRule"));
    let (claims_book, w0) = claims::watch(&client, &claims, &gw, &dirty, tx.clone(), metrics.received("claim"));
    let eips_cache = eips.clone();
    let caches = Caches { claims: claims_book, vpcs, subnets, externals, gateways, eips, fips, snats, dnats, dirty };
    let sweep_done: natgw_dataplane::SweepDone = {
        let (tx, metrics) = (tx.clone(), metrics.clone());
        Arc::new(move |result| {
            match result {
                Ok(deleted) => {
                    metrics.swept(deleted);
                    if deleted > 0 {
                        tracing::info!(deleted, "conntrack swept");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "conntrack sweep failed; finalizers wait for the next one");
                    metrics.failed();
                }
            }
            let _ = tx.try_send(());
        })
    };
    let writes = Cluster::new(client.clone(), &gw);
    let watches = async {
        futures::join!(w0, w1, w2, w3, w4, w5, w6, w7, w8);
    };
    let work = async {
        // The first round reads the kernel: a restarted gateway is fully
        // re-programmed and stale conntrack entries are swept.
        let mut resync = true;
        let mut last_full = tokio::time::Instant::now();
        // The last plan, the key of the objects it came from, the planner.
        let mut planning = Planning::default();
        // The objects as the last round saw them (refreshed, not copied).
        let mut objects = ObjectSet::default();
        // Failed rounds in a row: each waits twice as long (500 ms to 30 s).
        let mut failures = 0u32;
        loop {
            // A round starts at least every 30 s plus the longest retry
            // wait, but a first round at 100,000 objects writes statuses
            // for minutes: a loop that has not come back in 15 minutes is
            // stuck (every kernel call has its own deadline besides).
            probe.beat(Duration::from_secs(900));
            if !gateway.alive() {
                probe.dead("the gateway's namespace worker stopped");
            }
            let ctx = round::Ctx {
                kernel: &gateway,
                writes: &writes,
                caches: &caches,
                gw: &gw,
                metrics: &metrics,
                sweep_done: &sweep_done,
            };
            match round(ctx, resync, &mut planning, &mut objects).await {
                // The caches listed and the kernel holds the plan (the
                // first sync of a handle, and the one after any failure,
                // reads the kernel whole).
                Ok(()) => {
                    failures = 0;
                    probe.ready();
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let wait = natgw_kube_support::backoff::delay(ROUND_RETRY.0, ROUND_RETRY.1, failures);
                    let why = natgw_kube_support::chain(&e);
                    tracing::warn!(error = %why, ?wait, "round failed; retrying");
                    metrics.failed();
                    probe.not_ready(why);
                    tokio::time::sleep(wait).await;
                    let _ = tx.try_send(());
                }
            }
            if resync {
                last_full = tokio::time::Instant::now();
            }
            let until_full = RESYNC.saturating_sub(last_full.elapsed());
            // Owed writes are retried soon; only the resync reads the kernel,
            // and it comes when due even if events keep arriving.
            let wait = if planning.owes() { until_full.min(ROUND_RETRY.0) } else { until_full };
            let _ = tokio::time::timeout(wait, rx.recv()).await;
            resync = last_full.elapsed() >= RESYNC;
        }
    };
    let accounting = ports::run(client.clone(), gateway.clone(), eips_cache, metrics.clone(), port_args);
    let drops = count_forward_drops(gateway.clone(), metrics.clone());
    tokio::select! {
        _ = watches => {}
        _ = work => {}
        _ = accounting => {}
        _ = drops => {}
        _ = server => {}
        _ = shutdown => {}
    }
    Ok(())
}

/// The VPC of gateway `gw`, once its NatGateway exists. Until then the
/// agent is not ready and says why.
async fn vpc_of(client: &Client, gw: &str, probe: &natgw_kube_support::health::Probe) -> String {
    let api = Api::<NatGateway>::all(client.clone());
    let mut failures = 0u32;
    loop {
        let why = match api.get_opt(gw).await {
            Ok(Some(g)) => return g.spec.vpc,
            Ok(None) => format!("NatGateway {gw} does not exist"),
            Err(e) => format!("cannot read NatGateway {gw}: {}", natgw_kube_support::chain(&e)),
        };
        failures = failures.saturating_add(1);
        if failures == 1 {
            tracing::warn!(reason = %why, "waiting for the gateway's VPC");
        }
        probe.not_ready(why);
        tokio::time::sleep(natgw_kube_support::backoff::delay(ROUND_RETRY.0, ROUND_RETRY.1, failures)).await;
    }
}

/// How often a round reads every object and the whole kernel.
const RESYNC: Duration = Duration::from_secs(30);

/// The first and longest waits before a failed round is tried again.
const ROUND_RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

/// Copies the forward chain's drop counters into the metrics every 10 s.
async fn count_forward_drops(gateway: Arc<Gateway>, metrics: metrics::Metrics) {
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let g = gateway.clone();
        match tokio::task::spawn_blocking(move || g.forward_drops()).await {
            Ok(Ok(Some(drops))) => metrics.forward_dropped(&drops),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the forward chain's counters"),
            Err(_) => {}
        }
    }
}
