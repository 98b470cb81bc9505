//! `--gateways G`: many gateways on one cluster. What one gateway's agent
//! receives and holds must follow its own objects, not the cluster's;
//! the controller must keep up with G gateways.

use std::time::{Duration, Instant};

use anyhow::Result;
use kube::Client;
use kube::api::Api;
use natgw_api::*;
use natgw_dataplane::Gateway;

use crate::{Child, burst, create, obj, ready, watched};

/// What an agent received and holds, read once its first full sync is done.
#[derive(Clone, Copy, Default)]
struct Intake {
    objects: f64,
    bytes: f64,
    rss_mb: f64,
    peak_mb: f64,
}

/// The lab's gateway is `demo-gw` (VPC `demo`, LAN 10.77.0.0/24); gateway
/// i > 0 is `g{i}` in VPC `v{i}`, LAN 172.16.0.0/12 cut in /24s.
fn other_lan(i: u32) -> String {
    format!("172.{}.{}.0/24", 16 + i / 256, i % 256)
}

async fn other_gateway(admin: &Client, i: u32) -> Result<()> {
    let lan = other_lan(i);
    let router = lan.replace(".0/24", ".1");
    create(admin, &obj::<Vpc>("Vpc", &format!("v{i}"), serde_json::json!({}))?).await?;
    let subnet = serde_json::json!({"vpc": format!("v{i}"), "cidr": lan, "gateway": router});
    create(admin, &obj::<Subnet>("Subnet", &format!("lan{i}"), subnet)?).await?;
    let gw = serde_json::json!({"vpc": format!("v{i}"), "lanInterface": "lan0", "externalInterface": "ext0",
                                "externalSubnet": "external"});
    create(admin, &obj::<NatGateway>("NatGateway", &format!("g{i}"), gw)?).await?;
    Ok(())
}

/// Eip and FloatingIp `j` of gateway `i` (> 0).
async fn other_pair(admin: &Client, i: u32, j: u32) -> Result<()> {
    create(admin, &obj::<Eip>("Eip", &format!("g{i}-e{j}"), serde_json::json!({"gateway": format!("g{i}")}))?).await?;
    let internal = other_lan(i).replace(".0/24", &format!(".{}", 10 + j % 240));
    let spec = serde_json::json!({"eip": format!("g{i}-e{j}"), "internalIp": internal});
    create(admin, &obj::<FloatingIp>("FloatingIp", &format!("g{i}-f{j}"), spec)?).await?;
    Ok(())
}

fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Bytes the process has received on its open TCP connections (to the
/// API server: TLS, as sent), from the kernel's tcp_info via `ss`. A
/// connection closed since is not counted; watches keep theirs open.
fn received_bytes(pid: u32) -> Result<f64> {
    let out = std::process::Command::new("ss").args(["-tinpH", "state", "established"]).output()?;
    anyhow::ensure!(out.status.success(), "ss failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let owner = format!("pid={pid},");
    let mut total = 0.0;
    let mut mine = false;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            mine = line.contains(&owner);
        } else if mine {
            let n = line.split_whitespace().find_map(|w| w.strip_prefix("bytes_received:"));
            total += n.and_then(|n| n.parse::<f64>().ok()).unwrap_or(0.0);
        }
    }
    Ok(total)
}

fn health_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    natgw_kube_support::health::get_blocking(addr, path).unwrap_or((0, String::new()))
}

/// Reads `agent` now.
fn intake(agent: &Child, health: std::net::SocketAddr) -> Result<Intake> {
    let (_, text) = health_get(health, "/metrics");
    let (rss_mb, peak_mb) = agent.memory()?;
    Ok(Intake {
        objects: metric_sum(&text, "natgw_watch_events_total"),
        bytes: received_bytes(agent.process.id())?,
        rss_mb,
        peak_mb,
    })
}

/// Starts the lab gateway's agent and waits for its first full sync.
async fn fresh_agent(
    spawn: &impl Fn(&str, &[&str]) -> Result<Child>,
    gw_ns: &str,
    health: std::net::SocketAddr,
) -> Result<Child> {
    let account = natgw_kube_support::identity::account("demo-gw");
    let addr = health.to_string();
    let args = [
        "agent",
        "--gateway",
        "demo-gw",
        "--netns",
        gw_ns,
        "--claims-namespace",
        "natgw-system",
        "--health-addr",
        &addr,
    ];
    let agent = spawn(&account, &args)?;
    let start = Instant::now();
    loop {
        agent.alive()?;
        if tokio::task::spawn_blocking(move || health_get(health, "/readyz").0).await? == 200 {
            return Ok(agent);
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(300), "the agent was not ready after 300 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn free_port() -> Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

pub async fn run(
    admin: &Client,
    lab: &natgw_lab::Lab,
    gateways: u32,
    args: &crate::Args,
    spawn: impl Fn(&str, &[&str]) -> Result<Child>,
) -> Result<()> {
    anyhow::ensure!(gateways >= 1 && args.fips <= 240, "--gateways at least 1, --fips at most 240 per gateway here");
    // With an image, the controller gives every gateway its identity and
    // StatefulSet, as on a cluster; no kubelet runs them here.
    let controller = spawn(
        "natgw-controller",
        &[
            "controller",
            "--instance",
            "bench",
            "--namespace",
            "natgw-system",
            "--agent-image",
            "natgw:bench",
            "--gateway-external-network",
            "kube-system/ext",
        ],
    )?;
    natgw_kube_support::identity::apply(admin, "demo-gw", "uid", "natgw-system").await?;
    create(admin, &obj::<Vpc>("Vpc", "demo", serde_json::json!({}))?).await?;
    let lan = serde_json::json!({"vpc": "demo", "cidr": "10.78.0.0/15", "gateway": "10.78.0.1"});
    create(admin, &obj::<Subnet>("Subnet", "bulk", lan)?).await?;
    let ext = serde_json::json!({"cidr": "100.64.0.0/15", "gateway": "100.64.0.1"});
    create(admin, &obj::<Subnet>("Subnet", "external", ext)?).await?;
    let gw = serde_json::json!({"vpc": "demo", "lanInterface": "lan0", "externalInterface": "ext0", "externalSubnet": "external"});
    create(admin, &obj::<NatGateway>("NatGateway", "demo-gw", gw)?).await?;
    let n = args.fips;
    let kernel = Gateway::open(Some(&lab.ns("gw")))?;
    let gw_ns = lab.ns("gw");

    // The lab gateway's own objects, programmed by a first agent.
    let health = free_port()?;
    let first = fresh_agent(&spawn, &gw_ns, health).await?;
    let fips_seen = watched(Api::<FloatingIp>::all(admin.clone())).await?;
    let (_, own_ready) = burst(
        "Eips and FloatingIps of demo-gw",
        0..n,
        args.parallel,
        |i| async move {
            crate::eip(admin, i).await?;
            crate::fip(admin, i).await
        },
        || async {
            let ready =
                fips_seen.state().iter().filter(|f| f.status.as_ref().is_some_and(|s| ready(&s.conditions))).count();
            Ok(if ready < n as usize { ready } else { ready.min(kernel.snapshot()?.table.nat.fip_dnat.len()) })
        },
        || first.alive().and(controller.alive()),
    )
    .await?;
    drop(first);
    let alone = intake(&fresh_agent(&spawn, &gw_ns, health).await?, health)?;

    // The same agent keeps running while the other gateways come.
    let health = free_port()?;
    let watching = fresh_agent(&spawn, &gw_ns, health).await?;
    let before = intake(&watching, health)?;
    let eips_seen = watched(Api::<Eip>::all(admin.clone())).await?;
    let others = gateways - 1;
    let started = Instant::now();
    burst(
        "other NatGateways",
        1..gateways,
        args.parallel,
        |i| other_gateway(admin, i),
        || async { Ok(usize::MAX) },
        || controller.alive(),
    )
    .await?;
    let total_eips = (n * gateways) as usize;
    let (_, others_allocated) = burst(
        "Eips and FloatingIps of the other gateways",
        0..others * n,
        args.parallel,
        |k| other_pair(admin, 1 + k / n, k % n),
        || async {
            let state = eips_seen.state();
            let allocated = state.iter().filter(|e| e.status.as_ref().is_some_and(|s| s.ip.is_some())).count();
            // demo-gw's own were allocated before.
            Ok(allocated.saturating_sub(n as usize))
        },
        || watching.alive().and(controller.alive()),
    )
    .await?;
    anyhow::ensure!(eips_seen.state().len() >= total_eips, "not every Eip was seen");
    let others_took = started.elapsed();
    let during = intake(&watching, health)?;
    drop(watching);
    let health = free_port()?;
    let among = intake(&fresh_agent(&spawn, &gw_ns, health).await?, health)?;
    let controller_after_burst = controller.memory()?;

    // The controller's latency per gateway with all of them present: a
    // new NatGateway, created alone, until its WorkloadReady condition
    // says what became of its workload (identity and StatefulSet applied).
    let gws: Api<NatGateway> = Api::all(admin.clone());
    let mut lat = Vec::new();
    for s in 0..args.samples {
        let i = gateways + s;
        let t = Instant::now();
        other_gateway(admin, i).await?;
        loop {
            let g = gws.get(&format!("g{i}")).await?;
            if g.status.is_some_and(|st| st.conditions.iter().any(|c| c.type_ == "WorkloadReady")) {
                break;
            }
            anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "gateway g{i} never reconciled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(f64::NAN);
    let controller_now = controller.memory()?;
    println!("| figure | value |");
    println!("|---|---|");
    println!("| demo-gw's {n} FloatingIps Ready and in the kernel | {:.1} s |", own_ready.as_secs_f64());
    println!(
        "| {others} other gateways with {n} Eips and {n} FloatingIps each, until every Eip has its address | {:.1} s ({:.1} s for the Eips and FloatingIps) |",
        others_took.as_secs_f64(),
        others_allocated.as_secs_f64()
    );
    let row = |what: &str, a: &Intake| {
        println!(
            "| {what}: objects received / bytes received / memory now, peak | {:.0} / {:.0} KB / {:.0}, {:.0} MB |",
            a.objects,
            a.bytes / 1e3,
            a.rss_mb,
            a.peak_mb
        );
    };
    row("demo-gw's agent started alone, after its first full sync", &alone);
    row(&format!("the same started among {gateways} gateways"), &among);
    println!(
        "| demo-gw's running agent, while the other gateways' {} objects came: objects received / bytes received | {:.0} / {:.0} KB |",
        others * (2 * n + 3),
        during.objects - before.objects,
        (during.bytes - before.bytes) / 1e3
    );
    println!(
        "| controller memory after the burst / now, peak | {:.0} MB / {:.0}, {:.0} MB |",
        controller_after_burst.0, controller_now.0, controller_now.1
    );
    println!("| one more NatGateway until WorkloadReady, among {gateways}, p50 | {:.0} ms |", pct(0.5));
    println!("| same, p99 of {} | {:.0} ms |", args.samples, pct(0.99));
    let slowest: Vec<String> = lat.iter().rev().take(5).map(|l| format!("{l:.0}")).collect();
    println!("| the five slowest | {} ms |", slowest.join(", "));
    println!("| controller CPU time, whole run | {:.1} s |", controller.cpu_seconds()?);
    Ok(())
}
