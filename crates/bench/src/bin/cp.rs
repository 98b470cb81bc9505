//! `natgw-cp-bench`: the control plane end to end. A real kube-apiserver,
//! the controller and the gateway agent in this process, a lab gateway.
//! Creates N FloatingIps (each with an auto-allocated Eip) at once and
//! measures the time until all are Ready and in the kernel, then the
//! create-to-programmed latency of single FloatingIps on top.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use futures::StreamExt;
use kube::Client;
use kube::api::Api;
use natgw_api::*;
use natgw_dataplane::Gateway;

#[derive(Parser)]
struct Args {
    /// FloatingIps (and Eips) created at once.
    #[arg(long, default_value_t = 1000)]
    fips: u32,
    /// Single FloatingIps timed one by one afterwards.
    #[arg(long, default_value_t = 50)]
    samples: u32,
    /// Requests in flight while creating.
    #[arg(long, default_value_t = 32)]
    parallel: usize,
}

use natgw_testenv::{create, natgw_object as obj};

fn internal(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 78, 0, 10)) + i)
}

async fn pair(client: &Client, i: u32) -> Result<()> {
    create(client, &obj::<Eip>("Eip", &format!("e{i}"), serde_json::json!({"gateway": "demo-gw"}))?).await?;
    let spec = serde_json::json!({"eip": format!("e{i}"), "internalIp": internal(i)});
    create(client, &obj::<FloatingIp>("FloatingIp", &format!("f{i}"), spec)?).await?;
    Ok(())
}

fn ready(f: &FloatingIp) -> bool {
    f.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let lab = natgw_lab::Lab::up("ncpb")?;
    let env = natgw_testenv::TestEnv::start().await?;
    let admin = env.install_natgw(&natgw_api::crds()).await?;
    let controller = env.natgw_client("natgw-controller").await?;
    let agent = env.natgw_client("natgw-gateway").await?;
    let c = tokio::spawn(natgw_controller::run(controller, None, "natgw-system".into(), None, std::future::pending()));
    let netns = lab.ns("gw");
    let a =
        tokio::spawn(
            async move { natgw_agent::run(agent, "demo-gw".into(), Some(netns), std::future::pending()).await },
        );
    create(&admin, &obj::<Vpc>("Vpc", "demo", serde_json::json!({}))?).await?;
    create(
        &admin,
        &obj::<Subnet>(
            "Subnet",
            "lan",
            serde_json::json!({"vpc": "demo", "cidr": "10.77.0.0/24", "gateway": "10.77.0.1"}),
        )?,
    )
    .await?;
    create(
        &admin,
        &obj::<Subnet>(
            "Subnet",
            "bulk",
            serde_json::json!({"vpc": "demo", "cidr": "10.78.0.0/16", "gateway": "10.78.0.1"}),
        )?,
    )
    .await?;
    create(
        &admin,
        &obj::<Subnet>("Subnet", "external", serde_json::json!({"cidr": "100.64.0.0/16", "gateway": "100.64.0.1"}))?,
    )
    .await?;
    let gw = serde_json::json!({"vpc": "demo", "lanInterface": "lan0", "externalInterface": "ext0", "externalSubnet": "external"});
    create(&admin, &obj::<NatGateway>("NatGateway", "demo-gw", gw)?).await?;
    let kernel = Gateway::open(Some(&lab.ns("gw")))?;
    let fips: Api<FloatingIp> = Api::all(admin.clone());

    eprintln!("creating {} Eips and FloatingIps, {} requests in flight", args.fips, args.parallel);
    let start = Instant::now();
    let results: Vec<Result<()>> =
        futures::stream::iter(0..args.fips).map(|i| pair(&admin, i)).buffer_unordered(args.parallel).collect().await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    let created = start.elapsed();
    loop {
        let n_ready = fips.list(&Default::default()).await?.items.iter().filter(|f| ready(f)).count();
        let in_kernel = kernel.snapshot()?.table.nat.fip_dnat.len();
        if n_ready == args.fips as usize && in_kernel == args.fips as usize {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "only {n_ready} Ready, {in_kernel} in the kernel after 10 min"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_ready = start.elapsed();

    eprintln!("timing {} single FloatingIps", args.samples);
    let mut lat = Vec::new();
    for s in 0..args.samples {
        let i = 60_000 + s;
        let t = Instant::now();
        pair(&admin, i).await?;
        loop {
            let k = kernel.snapshot()?;
            if k.table.nat.fip_snat.contains_key(&internal(i)) {
                break;
            }
            anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "FloatingIp f{i} never programmed");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    println!("| figure | natgw | target |");
    println!("|---|---|---|");
    println!(
        "| {} Eips + {} FloatingIps created ({} in flight) | {:.1} s | |",
        args.fips,
        args.fips,
        args.parallel,
        created.as_secs_f64()
    );
    println!("| same, until all Ready and in the kernel | {:.1} s | < 10 s |", all_ready.as_secs_f64());
    println!(
        "| create-to-programmed of one Eip + FloatingIp with {} objects present, p50 | {:.0} ms | |",
        2 * args.fips + 5,
        pct(0.5)
    );
    println!("| same, p99 of {} | {:.0} ms | < 500 ms |", args.samples, pct(0.99));
    c.abort();
    a.abort();
    Ok(())
}
