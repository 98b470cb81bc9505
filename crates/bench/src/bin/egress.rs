//! `natgw-egress-bench`: Service egress on one node. 500 Services with 20
//! endpoints each by default:
//! - the full sync of the egress table (plan + one transaction);
//! - endpoint-change-to-kernel latency through a real kube-apiserver and
//!   the node agent (an EndpointSlice patched, the element appears);
//! - kube-vip's approach in the same run: one `iptables` process per rule
//!   (a MARK in mangle and an SNAT in nat per endpoint), for the ratio.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams};
use natgw_dataplane::egress::Egress;
use natgw_plan::{EgressInput, EgressService, plan_egress};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 500)]
    services: u32,
    #[arg(long, default_value_t = 20)]
    endpoints: u32,
    /// Endpoints programmed rule by rule with iptables (it is quadratic:
    /// the full size takes very long).
    #[arg(long, default_value_t = 2000)]
    baseline_endpoints: u32,
    /// Endpoint changes timed through the API.
    #[arg(long, default_value_t = 50)]
    samples: u32,
    #[arg(long, default_value = "iptables-legacy")]
    iptables: String,
}

fn pod(s: u32, e: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 80, 0, 0)) + s * 32 + e)
}

fn vip(s: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 70, 0, 0)) + s)
}

fn input(services: u32, endpoints: u32) -> EgressInput {
    EgressInput {
        cluster_nets: vec![
            "10.80.0.0/16".parse().unwrap_or_else(|_| unreachable!()),
            "10.0.0.0/16".parse().unwrap_or_else(|_| unreachable!()),
        ],
        pod_nets: vec!["10.80.0.0/16".parse().unwrap_or_else(|_| unreachable!())],
        node_addresses: Default::default(),
        local_vips: None,
        services: (0..services)
            .map(|s| EgressService {
                name: format!("bench/s{s}"),
                vip: Some(vip(s)),
                endpoints: (0..endpoints).map(|e| pod(s, e)).collect(),
                ..Default::default()
            })
            .collect(),
        fail_closed: false,
    }
}

fn ns_cmd(ns: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(["netns", "exec", ns]).args(args).output()?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

struct Netns(String);

impl Netns {
    fn new(name: &str) -> Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let out = Command::new("ip").args(["netns", "add", name]).output()?;
        if !out.status.success() {
            bail!("ip netns add {name}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Netns(name.to_string()))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// kube-vip's iptables egress for `n` endpoints (20 per Service).
fn baseline(ns: &str, ipt: &str, n: u32, per: u32) -> Result<Duration> {
    let c = "a3ViZS12aXAK=kube-vip-bench";
    let start = Instant::now();
    ns_cmd(ns, &[ipt, "-t", "mangle", "-N", "KUBE-VIP-EGRESS"])?;
    ns_cmd(
        ns,
        &[ipt, "-t", "mangle", "-I", "PREROUTING", "1", "-j", "KUBE-VIP-EGRESS", "-m", "comment", "--comment", c],
    )?;
    for net in ["10.80.0.0/16", "10.0.0.0/16"] {
        ns_cmd(
            ns,
            &[ipt, "-t", "mangle", "-A", "KUBE-VIP-EGRESS", "-d", net, "-j", "RETURN", "-m", "comment", "--comment", c],
        )?;
    }
    for i in 0..n {
        let (s, e) = (i / per, i % per);
        let src = format!("{}/32", pod(s, e));
        let to = vip(s).to_string();
        ns_cmd(
            ns,
            &[
                ipt,
                "-t",
                "mangle",
                "-A",
                "KUBE-VIP-EGRESS",
                "-s",
                &src,
                "-j",
                "MARK",
                "--set-mark",
                "64/64",
                "-m",
                "comment",
                "--comment",
                c,
            ],
        )?;
        ns_cmd(
            ns,
            &[
                ipt,
                "-t",
                "nat",
                "-I",
                "POSTROUTING",
                "1",
                "-s",
                &src,
                "-m",
                "mark",
                "--mark",
                "64/64",
                "-j",
                "SNAT",
                "--to-source",
                &to,
                "-m",
                "comment",
                "--comment",
                c,
            ],
        )?;
    }
    Ok(start.elapsed())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let total = a.services * a.endpoints;
    // NATGW_EGRESS_BENCH_LOG=info,natgw_node_agent=debug shows the node
    // agent's rounds.
    if let Ok(filter) = std::env::var("NATGW_EGRESS_BENCH_LOG") {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }

    // 1. The data plane alone: plan + one transaction.
    let node = Netns::new("negb-node")?;
    let eg = Egress::open(Some(&node.0))?;
    let t = Instant::now();
    let plan = plan_egress(&input(a.services, a.endpoints));
    let planned = t.elapsed();
    let report = eg.sync(&plan.tables)?;
    let full = t.elapsed();
    eprintln!("full sync of {total} endpoints: {:.1} ms ({} statements)", ms(full), report.statements);
    // Same-size comparison with the baseline.
    let small = Netns::new("negb-small")?;
    let eg_small = Egress::open(Some(&small.0))?;
    let t = Instant::now();
    eg_small.sync(&plan_egress(&input(a.baseline_endpoints / a.endpoints, a.endpoints)).tables)?;
    let natgw_small = t.elapsed();
    drop(eg_small);
    let base = Netns::new("negb-base")?;
    eprintln!("baseline: {} endpoints rule by rule with {}", a.baseline_endpoints, a.iptables);
    let base_time = baseline(&base.0, &a.iptables, a.baseline_endpoints, a.endpoints)?;
    drop(eg);

    // 2. Through the API: the node agent against a real kube-apiserver.
    let env = natgw_testenv::TestEnv::start().await?;
    let admin = env.install_natgw(&natgw_api::crds()).await?;
    natgw_testenv::apply_yaml(&admin, "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n").await?;
    let client = env.natgw_client("natgw-node-agent").await?;
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(admin.clone(), "bench");
    let slices: Api<EndpointSlice> = Api::namespaced(admin.clone(), "bench");
    let slice = |s: u32, moved: Option<u32>| -> Result<EndpointSlice> {
        let eps: Vec<serde_json::Value> = (0..a.endpoints)
            .map(|e| {
                let k = if moved == Some(e) { 20 + e % 12 } else { e };
                serde_json::json!({"addresses": [pod(s, k).to_string()], "nodeName": "bench-node", "conditions": {"ready": true},
                                   "targetRef": {"kind": "Pod", "namespace": "bench", "name": format!("p{s}-{k}")}})
            })
            .collect();
        Ok(serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("s{s}-1"), "namespace": "bench", "labels": {"kubernetes.io/service-name": format!("s{s}")}},
            "addressType": "IPv4", "endpoints": eps, "ports": [{"port": 80, "protocol": "TCP"}],
        }))?)
    };
    eprintln!("creating {} Services, their pods and EndpointSlices", a.services);
    // An endpoint counts only as a pod of the namespace on the node, at
    // its own address (as the kubelet reports it): each Service's block of
    // 32 addresses, the spares being where a moved endpoint goes.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(admin.clone(), "bench");
    let pod_creates = futures::stream::iter((0..a.services).flat_map(|s| (0..32).map(move |k| (s, k)))).map(|(s, k)| {
        let pods = pods.clone();
        async move {
            let name = format!("p{s}-{k}");
            let body = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "bench"},
                "spec": {"nodeName": "bench-node", "containers": [{"name": "c", "image": "bench"}]}});
            pods.patch(&name, &PatchParams::apply("bench").force(), &Patch::Apply(&body)).await?;
            let ip = pod(s, k).to_string();
            let status = serde_json::json!({"status": {"podIP": ip, "podIPs": [{"ip": ip}]}});
            pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await?;
            anyhow::Ok(())
        }
    });
    use futures::StreamExt;
    let results: Vec<Result<()>> = pod_creates.buffer_unordered(32).collect().await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    let creates = futures::stream::iter(0..a.services).map(|s| {
        let (services, slices, slice) = (services.clone(), slices.clone(), &slice);
        async move {
            let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("s{s}"), "namespace": "bench", "annotations": {"natgw.io/egress": "true"}},
                "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
            }))?;
            services.create(&Default::default(), &svc).await?;
            // The VIP, as a load balancer would publish it.
            let status = serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": vip(s).to_string()}]}}});
            services.patch_status(&format!("s{s}"), &PatchParams::default(), &Patch::Merge(&status)).await?;
            slices.create(&Default::default(), &slice(s, None)?).await?;
            anyhow::Ok(())
        }
    });
    let results: Vec<Result<()>> = creates.buffer_unordered(32).collect().await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    let api_ns = Netns::new("negb-api")?;
    let cfg = natgw_node_agent::Config {
        node: "bench-node".into(),
        netns: Some(api_ns.0.clone()),
        overrides: natgw_node_agent::cidrs::Overrides {
            pod_cidrs: Some(vec!["10.80.0.0/16".parse()?]),
            service_cidrs: Some(vec!["10.0.0.0/16".parse()?]),
        },
        keep_on_exit: false,
        daemonset: None,
        fail_closed: false,
        vip_check: false,
        resync: natgw_node_agent::RESYNC,
    };
    let agent = tokio::spawn(natgw_node_agent::run(client, cfg, None, std::future::pending()));
    let has = |ip: Ipv4Addr| {
        let el = format!("{{ {ip} }}");
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &api_ns.0,
                "nft",
                "get",
                "element",
                "ip",
                natgw_node_agent::TABLE,
                natgw_dataplane::nft::elements::SNAT_ALL.name,
                &el,
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let t = Instant::now();
    while !has(pod(a.services - 1, a.endpoints - 1)) {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(120), "the agent never programmed the last Service");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("timing {} endpoint changes", a.samples);
    let mut lat = Vec::new();
    for i in 0..a.samples {
        let s = (i * 7) % a.services;
        let moved = pod(s, 20 + i % 12);
        let t = Instant::now();
        slices
            .patch(&format!("s{s}-1"), &PatchParams::apply("bench").force(), &Patch::Apply(&slice(s, Some(i % 12))?))
            .await?;
        while !has(moved) {
            anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "endpoint {moved} never programmed");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        lat.push(ms(t.elapsed()));
        // Back to the original, so the next sample starts from the full set.
        slices.patch(&format!("s{s}-1"), &PatchParams::apply("bench").force(), &Patch::Apply(&slice(s, None)?)).await?;
        while has(moved) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    agent.abort();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    let per_base = ms(base_time) / a.baseline_endpoints as f64;
    println!("| figure | natgw | kube-vip style iptables | target |");
    println!("|---|---|---|---|");
    println!(
        "| full sync, {} Services x {} endpoints ({total}) | {:.0} ms (plan {:.1} ms) | not run at this size | < 1 s |",
        a.services,
        a.endpoints,
        ms(full),
        ms(planned)
    );
    println!(
        "| full sync, {} endpoints | {:.0} ms | {:.1} s ({:.0}x) | |",
        a.baseline_endpoints,
        ms(natgw_small),
        base_time.as_secs_f64(),
        ms(base_time) / ms(natgw_small)
    );
    println!("| baseline per endpoint at that size | | {per_base:.1} ms (grows with the chain) | |");
    println!("| endpoint change to kernel through the API, p50 | {:.0} ms | | |", pct(0.5));
    println!("| same, p99 of {} | {:.0} ms | | < 200 ms |", a.samples, pct(0.99));
    Ok(())
}
