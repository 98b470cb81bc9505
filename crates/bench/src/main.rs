//! `natgw-bench`: the data plane's figures next to the Kube-OVN iptables
//! baseline, both measured in the same run on the same machine.

mod baseline;
mod failover;
mod ha;
mod heap;
mod objects;
mod plot;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use natgw_api::{Eip, EipSpec, FloatingIp, FloatingIpSpec, Kind, Object, ObjectRef, ObjectSet, SnatRule, SnatRuleSpec};
use natgw_dataplane::Gateway;
use natgw_lab::Lab;
use natgw_lab::traffic::in_ns;
use natgw_plan::{GatewayPlanner, plan_gateway};
use objects::{Scale, build, eip_ip};

#[derive(Parser)]
#[command(about = "Benchmark natgw's data plane against Kube-OVN's iptables approach")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    fips: u32,
    #[arg(long, default_value_t = 2_000)]
    dnats: u32,
    #[arg(long, default_value_t = 200)]
    snats: u32,
    /// Single changes measured on top of each full set.
    #[arg(long, default_value_t = 20)]
    changes: u32,
    /// Give the objects what an agent's cache holds of them once served
    /// and programmed (uid, resourceVersion, finalizers, the agent's
    /// conditions), so the memory figures are an agent's.
    #[arg(long)]
    as_cached: bool,
    /// As --as-cached, and hold them as an agent does: its watch caches
    /// (listed as it holds them), its address claims, and the set and
    /// entries a full round builds from the caches, so the memory figures
    /// are a whole agent's (the caches' keys and entries included).
    #[arg(long)]
    as_agent: bool,
    /// Seconds of new connections per connection-rate run.
    #[arg(long, default_value_t = 3)]
    rate_seconds: u64,
    /// iptables flavour of the baseline (Kube-OVN prefers legacy).
    #[arg(long, default_value = "iptables-legacy")]
    iptables: String,
    /// Skip the slow full-scale baseline sync (minutes).
    #[arg(long)]
    skip_baseline_full: bool,
    /// Measure natgw only (no baseline, no connection rates).
    #[arg(long)]
    natgw_only: bool,
    /// Skip the `ip -batch` address floor (209 s at 100,000 addresses).
    #[arg(long)]
    skip_floor: bool,
    /// Measure full sync and one change at several scales instead, natgw
    /// and the baseline, and draw them into this SVG file.
    #[arg(long)]
    curve: Option<std::path::PathBuf>,
    /// With --curve: the largest scale (FloatingIps) the baseline's full
    /// sync runs at (one process per rule: minutes beyond).
    #[arg(long, default_value_t = 2_500)]
    curve_baseline_full_max: u32,
    /// Measure only natgw's new-connection rate with 1 and with --fips
    /// FloatingIps (three runs each, alternating).
    #[arg(long)]
    rates_only: bool,
    /// Planning alone: one SnatRule added and removed among `--snats`
    /// SnatRules, and among 200 in the same run (`--changes` times each).
    #[arg(long)]
    snat_change: bool,
    /// Measure the translation log instead: new connections per second
    /// through one FloatingIp without and with it, for this many seconds.
    #[arg(long)]
    translog_seconds: Option<u64>,
    /// With --curve: the largest scale (FloatingIps) the baseline runs at.
    #[arg(long, default_value_t = 10_000)]
    curve_baseline_max: u32,
    /// Planned switchovers between two gateway replicas instead, this
    /// many: the longest silence a probe every 10 ms sees (`natgw lab up
    /// --ha`; the data plane's part only).
    #[arg(long)]
    ha_switch: Option<u32>,
    /// Failovers of two `natgw run` replicas instead, this many rounds of
    /// each kind (planned, link loss, node loss, agent kill -9): what a
    /// probe every 10 ms sees and how many sessions are kept. Needs the
    /// `natgw` binary beside this one.
    #[arg(long)]
    ha_failover: Option<u32>,
    /// What replicating connections costs instead: the SNAT connection
    /// rate with and without a standby receiving them, for this many
    /// seconds each, and the standby's lag.
    #[arg(long)]
    ha_replication: Option<u64>,
    /// With --ha-failover: established TCP sessions held across each.
    #[arg(long, default_value_t = 1000)]
    ha_sessions: usize,
}

const PREFIX: &str = "nbench";
const SMALL: Scale = Scale { fips: 80, dnats: 15, snats: 5 };

fn lab() -> Result<Lab> {
    let lab = Lab::up(PREFIX)?;
    // The benchmark's external subnet lives beside the lab's own.
    let ext1 = lab.ns("ext1");
    let out =
        std::process::Command::new("ip").args(["-n", &ext1, "addr", "add", "100.64.0.1/14", "dev", "eth0"]).status()?;
    anyhow::ensure!(out.success(), "cannot address ext1");
    Ok(lab)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// One more FloatingIp (and its Eip) on top of a set.
fn with_extra_fip(set: &ObjectSet, n: u32) -> ObjectSet {
    let mut s = set.clone();
    add_extra_fip(&mut s, n);
    s
}

/// The change measured: a FloatingIp with its own new Eip. Returns the
/// objects it changed.
fn add_extra_fip(s: &mut ObjectSet, n: u32) -> BTreeSet<ObjectRef> {
    let eip = format!("extra-eip-{n}");
    let ip = eip_ip(240_000 + n);
    s.insert(Object::Eip(Eip::new(
        &eip,
        EipSpec { gateway: "demo-gw".into(), ip: Some(ip), internal_cidrs: Vec::new() },
    )));
    let spec = FloatingIpSpec { eip: eip.clone(), internal_ip: Ipv4Addr::new(10, 83, 255, n as u8) };
    let fip = format!("extra-{n}");
    s.insert(Object::FloatingIp(FloatingIp::new(&fip, spec)));
    [ObjectRef::new(Kind::Eip, eip), ObjectRef::new(Kind::FloatingIp, fip)].into()
}

/// Plans one SnatRule (with its own Eip, a /32 of the bulk subnet) in and
/// out among `snats` others, as the agent would; p50 and p99 in ms.
fn snat_change_ms(snats: u32, changes: u32) -> Result<(f64, f64, f64)> {
    let mut set = build(&Scale { fips: 0, dnats: 0, snats });
    let t = Instant::now();
    let mut planner = GatewayPlanner::new(&set, "demo-gw")?;
    let whole = ms(t.elapsed());
    anyhow::ensure!(planner.plan().conflicts.is_empty(), "conflicts: {:?}", &planner.plan().conflicts[..1]);
    let mut times = Vec::new();
    for n in 0..changes {
        let eip = format!("extra-snat-eip-{n}");
        let rule = format!("extra-snat-{n}");
        let refs: BTreeSet<ObjectRef> = [ObjectRef::new(Kind::Eip, &eip), ObjectRef::new(Kind::SnatRule, &rule)].into();
        set.insert(Object::Eip(Eip::new(
            &eip,
            EipSpec { gateway: "demo-gw".into(), ip: Some(eip_ip(240_000 + n)), internal_cidrs: Vec::new() },
        )));
        let cidr = ipnet::Ipv4Net::new(Ipv4Addr::new(10, 83, 254, n as u8), 32)?;
        set.insert(Object::SnatRule(SnatRule::new(&rule, SnatRuleSpec { eip, internal_cidr: cidr })));
        let t = Instant::now();
        planner.update(&set, &refs)?;
        times.push(ms(t.elapsed()));
        for r in &refs {
            set.remove(r);
        }
        let t = Instant::now();
        planner.update(&set, &refs)?;
        times.push(ms(t.elapsed()));
    }
    Ok((percentile(&mut times, 0.5), percentile(&mut times, 0.99), whole))
}

fn snat_change(args: &Args) -> Result<()> {
    println!("machine: {}", machine());
    let (small_p50, small_p99, small_whole) = snat_change_ms(200, args.changes)?;
    let (p50, p99, whole) = snat_change_ms(args.snats, args.changes)?;
    let us = |ms: f64| ms * 1000.0;
    println!("| SnatRules | one SnatRule change, plan p50 / p99 (µs) | whole plan (ms) |\n|---|---|---|");
    println!("| 200 | {:.1} / {:.1} | {small_whole:.1} |", us(small_p50), us(small_p99));
    println!("| {} | {:.1} / {:.1} | {whole:.1} |", args.snats, us(p50), us(p99));
    println!(
        "one change: {} / 200 = {:.1}x; whole plan / one change at {}: {:.0}x",
        args.snats,
        p50 / small_p50,
        args.snats,
        whole / p50
    );
    Ok(())
}

/// Takes the change back out.
fn remove_extra_fip(s: &mut ObjectSet, n: u32) -> BTreeSet<ObjectRef> {
    let refs =
        [ObjectRef::new(Kind::Eip, format!("extra-eip-{n}")), ObjectRef::new(Kind::FloatingIp, format!("extra-{n}"))];
    for r in &refs {
        s.remove(r);
    }
    refs.into()
}

struct NatgwFigures {
    plan_ms: f64,
    /// Full sync into an empty gateway until the translation is in force.
    full_ms: f64,
    /// The conntrack sweep that follows it.
    full_sweep_ms: f64,
    /// One change until the translation is in force (the sweep runs
    /// beside the next change).
    change_p50: f64,
    change_p99: f64,
    change_max: f64,
    /// One change's conntrack sweep, p50.
    sweep_p50: f64,
    plan_change_p50: f64,
    /// p50 per sync phase of the single changes.
    phases: Vec<(&'static str, f64)>,
    full_phases: Vec<(&'static str, f64)>,
    /// Peak resident memory of this process over the agent's steps
    /// (objects, plan, mirror, full sync, resync and changes).
    peak_mb: f64,
}

fn natgw_run(set: &mut ObjectSet, changes: u32) -> Result<NatgwFigures> {
    memory("objects built");
    let t = Instant::now();
    let planner = GatewayPlanner::new(set, "demo-gw")?;
    let plan_ms = ms(t.elapsed());
    let plan = planner.plan().clone();
    memory("+ plan");
    anyhow::ensure!(plan.conflicts.is_empty(), "benchmark objects conflict: {:?}", &plan.conflicts[..1]);
    let lab = lab()?;
    let gw = Gateway::open(Some(&lab.ns("gw")))?;
    let report = gw.program(&plan)?;
    let full_ms = ms(report.duration);
    let t = Instant::now();
    gw.sweep()?;
    let full_sweep_ms = ms(t.elapsed());
    let full_phases = report.phases.iter().map(|(p, d)| (*p, ms(*d))).collect();
    memory("+ full sync (mirror)");
    let t = Instant::now();
    anyhow::ensure!(gw.audit(&plan)?.is_empty(), "full sync did not converge");
    // The kernel read back whole, as `natgw audit` reads it.
    memory(&format!("+ kernel read back (audit, {:.0} ms)", ms(t.elapsed())));
    // A resync, as the agent runs one every 30 s: the old planner and plan
    // let go, the gateway planned from scratch, the kernel read back and
    // converged. Its peak is the agent's.
    drop((plan, planner));
    anyhow::ensure!(gw.release_plan(), "the full sync's sweep ran, so nothing needs its plan");
    let t = Instant::now();
    natgw_kube_support::heap::trim();
    memory(&format!("+ heap trimmed ({:.0} ms)", ms(t.elapsed())));
    let t = Instant::now();
    let mut planner = GatewayPlanner::new(set, "demo-gw")?;
    let plan = planner.plan().clone();
    gw.reprogram(&plan)?;
    memory(&format!("+ resync (planned anew, kernel read back and converged, {:.0} ms)", ms(t.elapsed())));
    let (mut sync_times, mut plan_sync_times, mut sweeps) = (Vec::new(), Vec::new(), Vec::new());
    let mut phases: std::collections::BTreeMap<&'static str, Vec<f64>> = Default::default();
    // Each change is planned incrementally, as the agent does: the plan
    // shares all but the change with the one before.
    for n in 0..changes {
        for add in [true, false] {
            let changed = if add { add_extra_fip(set, n) } else { remove_extra_fip(set, n) };
            let t = Instant::now();
            planner.update(set, &changed)?;
            let r = gw.program(planner.plan())?;
            plan_sync_times.push(ms(t.elapsed()));
            sync_times.push(ms(r.duration));
            for (p, d) in &r.phases {
                phases.entry(p).or_default().push(ms(*d));
            }
            let t = Instant::now();
            gw.sweep()?;
            sweeps.push(ms(t.elapsed()));
        }
    }
    // Before the check below: the agent never reads the kernel beside its
    // mirror (`natgw audit` does, in a process of its own).
    let peak_mb = peak_mb();
    anyhow::ensure!(gw.audit(&plan)?.is_empty(), "changes did not converge");
    let change_max = sync_times.iter().cloned().fold(0.0, f64::max);
    Ok(NatgwFigures {
        plan_ms,
        full_ms,
        full_sweep_ms,
        change_p50: percentile(&mut sync_times, 0.5),
        change_p99: percentile(&mut sync_times, 0.99),
        change_max,
        sweep_p50: percentile(&mut sweeps, 0.5),
        plan_change_p50: percentile(&mut plan_sync_times, 0.5),
        phases: phases.into_iter().map(|(p, mut v)| (p, percentile(&mut v, 0.5))).collect(),
        full_phases,
        peak_mb,
    })
}

/// One memory line: resident now, peak, and the live heap.
fn memory(step: &str) {
    eprintln!(
        "memory: {step} {:.0} MB (peak {:.0}, live heap {:.0}, at most {:.0} since the last step)",
        rss_mb(),
        peak_mb(),
        heap::live_mb(),
        heap::live_peak_mb()
    );
}

/// VmRSS of this process now, in MB.
fn rss_mb() -> f64 {
    status_mb("VmRSS:")
}

/// A memory line of /proc/self/status, in MB.
fn status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// VmHWM of this process, in MB.
fn peak_mb() -> f64 {
    status_mb("VmHWM:")
}

struct BaselineFigures {
    full_ms: Option<f64>,
    change_p50: f64,
}

fn baseline_run(set: &ObjectSet, iptables: &str, changes: u32, full: bool) -> Result<BaselineFigures> {
    let lab = lab()?;
    let gw = Gateway::open(Some(&lab.ns("gw")))?;
    let ipt = iptables.to_string();
    let cmds = baseline::commands(set, 16);
    let full_ms = gw.run(move || -> Result<Option<f64>> {
        baseline::init(&ipt)?;
        if full {
            let t = Instant::now();
            baseline::execute(&ipt, &cmds)?;
            Ok(Some(ms(t.elapsed())))
        } else {
            baseline::restore(&ipt, &cmds)?;
            Ok(None)
        }
    })??;
    let mut times = Vec::new();
    for n in 0..changes {
        let cmds = baseline::commands(&with_extra_fip(&ObjectSet::default(), n), 16);
        let ipt = iptables.to_string();
        times.push(gw.run(move || -> Result<f64> {
            let t = Instant::now();
            baseline::execute(&ipt, &cmds)?;
            Ok(ms(t.elapsed()))
        })??);
    }
    Ok(BaselineFigures { full_ms, change_p50: percentile(&mut times, 0.5) })
}

/// New TCP connections per second from ext1 to FloatingIp 0 (int1).
fn connection_rate(lab: &Lab, seconds: u64) -> Result<f64> {
    connection_rate_with(lab, seconds, 1, None)
}

/// Same, from `clients` threads at once, each paced to its share of
/// `offered` connections per second when given.
fn connection_rate_with(lab: &Lab, seconds: u64, clients: usize, offered: Option<f64>) -> Result<f64> {
    let server = (lab.ns("int1"), SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 11), 7000));
    let target = SocketAddrV4::new(eip_ip(0), 7000);
    let count = connections(server, (&lab.ns("ext1"), target), seconds, clients, offered)?;
    Ok(count as f64 / seconds as f64)
}

/// TCP connections made from namespace `client.0` to `client.1` for
/// `seconds` by `clients` threads (each paced to its share of `offered`
/// a second when given), to a server in `server.0` listening on
/// `server.1` that closes each at once: how many were made.
pub(crate) fn connections(
    server: (String, SocketAddrV4),
    client: (&str, SocketAddrV4),
    seconds: u64,
    clients: usize,
    offered: Option<f64>,
) -> Result<u64> {
    let listen = server.1;
    let listener = in_ns(&server.0, move || TcpListener::bind(listen))??;
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    listener.set_nonblocking(true)?;
    let server = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((c, _)) => drop(c),
                Err(_) => std::thread::sleep(Duration::from_micros(50)),
            }
        }
    });
    let target = client.1;
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let ns = client.0.to_string();
            std::thread::spawn(move || {
                in_ns(&ns, move || {
                    let start = Instant::now();
                    let end = start + Duration::from_secs(seconds);
                    let gap = offered.map(|r| Duration::from_secs_f64(clients as f64 / r));
                    let mut n = 0u64;
                    while Instant::now() < end {
                        if let Some(gap) = gap {
                            let due = start + gap * n as u32;
                            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                            }
                        }
                        if let Ok(mut c) = TcpStream::connect_timeout(&target.into(), Duration::from_secs(1)) {
                            let _ = std::io::Read::read(&mut c, &mut [0u8; 1]);
                            n += 1;
                        }
                    }
                    n
                })
            })
        })
        .collect();
    let mut count = 0;
    for t in threads {
        count += t.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    Ok(count)
}

fn natgw_rate(set: &ObjectSet, seconds: u64) -> Result<f64> {
    let lab = lab()?;
    let gw = Gateway::open(Some(&lab.ns("gw")))?;
    gw.sync(&plan_gateway(set, "demo-gw")?)?;
    connection_rate(&lab, seconds)
}

fn baseline_rate(set: &ObjectSet, iptables: &str, seconds: u64) -> Result<f64> {
    let lab = lab()?;
    let gw = Gateway::open(Some(&lab.ns("gw")))?;
    // The FloatingIp that carries traffic is the newest: last in the chains.
    let mut cmds = baseline::commands(set, 16);
    let live = cmds.iter().position(|(_, a)| a.iter().any(|x| x == "10.77.0.11")).context("live rule")?;
    let dnat = cmds.remove(live);
    let snat = cmds.remove(live);
    cmds.extend([dnat, snat]);
    cmds.push((
        "ip".into(),
        ["route", "replace", "default", "via", "100.64.0.1", "dev", natgw_lab::EXT_IF, "onlink"]
            .map(String::from)
            .to_vec(),
    ));
    let ipt = iptables.to_string();
    gw.run(move || -> Result<()> {
        baseline::init(&ipt)?;
        baseline::restore(&ipt, &cmds)
    })??;
    connection_rate(&lab, seconds)
}

/// The kernel alone adding the same EIP addresses with one `ip -batch`:
/// the floor under any full sync that puts EIPs on an interface.
fn address_floor(set: &ObjectSet) -> Result<f64> {
    let lab = lab()?;
    let batch: String = set
        .eips
        .values()
        .filter_map(|e| e.spec.ip)
        .map(|ip| format!("addr add {ip}/16 dev {}\n", natgw_lab::EXT_IF))
        .collect();
    let file = std::env::temp_dir().join("natgw-bench-addrs.batch");
    std::fs::write(&file, batch)?;
    let t = Instant::now();
    let ok = std::process::Command::new("ip").args(["-n", &lab.ns("gw"), "-batch"]).arg(&file).status()?.success();
    let took = ms(t.elapsed());
    let _ = std::fs::remove_file(&file);
    anyhow::ensure!(ok, "ip -batch failed");
    Ok(took)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let nft = std::process::Command::new("nft")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{cores} cores, {cpu}, kernel {}, {nft}", kernel.trim())
}

fn row(name: &str, natgw: f64, base: Option<f64>, unit: &str, target: &str) {
    let (b, r) = match base {
        Some(b) => (format!("{b:.1} {unit}"), format!("{:.1}x", b / natgw)),
        None => ("(skipped)".into(), "".into()),
    };
    println!("| {name} | {natgw:.1} {unit} | {b} | {r} | {target} |");
}

/// Full sync and one change at growing scales (FloatingIps; DnatRules and
/// SnatRules in the proportions of the main run), drawn into `path`.
fn curve(args: &Args, path: &std::path::Path) -> Result<()> {
    let mut points = Vec::new();
    for fips in [100u32, 1_000, 2_500, 10_000, 100_000] {
        let scale = Scale { fips, dnats: fips / 5, snats: (fips / 50).max(1) };
        let mut set = build(&scale);
        eprintln!("curve: {} objects", set.len());
        let n = natgw_run(&mut set, args.changes)?;
        let (mut base_full, mut base_change) = (None, None);
        if fips <= args.curve_baseline_max {
            let b = baseline_run(&set, &args.iptables, args.changes, fips <= args.curve_baseline_full_max)?;
            base_full = b.full_ms;
            base_change = Some(b.change_p50);
        }
        println!(
            "| {} | {:.1} | {} | {:.2} | {} |",
            set.len(),
            n.full_ms,
            base_full.map_or("".into(), |v| format!("{v:.0}")),
            n.change_p50,
            base_change.map_or("".into(), |v| format!("{v:.1}"))
        );
        points.push(plot::Point {
            objects: set.len(),
            natgw_full: n.full_ms,
            natgw_change: n.change_p50,
            baseline_full: base_full,
            baseline_change: base_change,
        });
        plot::draw(&points, &machine(), path)?;
    }
    Ok(())
}

/// New connections per second without and with a translation log to a
/// file, and what the log wrote and dropped: as fast as three clients go,
/// and paced at 10,000 per second.
fn translog_bench(seconds: u64) -> Result<()> {
    println!("machine: {}", machine());
    println!(
        "| offered | connections/s without the log | with it | ratio | lines written/s | dropped (rate / kernel / write) |"
    );
    println!("|---|---|---|---|---|---|");
    for offered in [None, Some(10_000.0)] {
        translog_run(seconds, offered)?;
    }
    Ok(())
}

fn translog_run(seconds: u64, offered: Option<f64>) -> Result<()> {
    let one = build(&Scale { fips: 1, dnats: 0, snats: 0 });
    let clients = 3;
    let off = {
        let lab = lab()?;
        let gw = Gateway::open(Some(&lab.ns("gw")))?;
        gw.sync(&plan_gateway(&one, "demo-gw")?)?;
        connection_rate_with(&lab, seconds, clients, offered)?
    };
    let lab = lab()?;
    let gw = Gateway::open(Some(&lab.ns("gw")))?;
    gw.sync(&plan_gateway(&one, "demo-gw")?)?;
    let file = std::env::temp_dir().join("natgw-bench-translations.log");
    let _ = std::fs::remove_file(&file);
    let log = gw.start_translation_log(
        natgw_dataplane::conntrack::translog::Sink::file(file.clone(), 1 << 30, 1),
        natgw_dataplane::conntrack::translog::Rates { total: 1_000_000, per_eip: 1_000_000 },
    )?;
    let on = connection_rate_with(&lab, seconds, clients, offered)?;
    std::thread::sleep(Duration::from_millis(700));
    let c = &log.counts;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "| {} | {off:.0} | {on:.0} | {:.3} | {:.0} | {} / {} / {} |",
        offered.map_or(format!("as fast as {clients} clients go"), |r| format!("{r:.0}/s")),
        on / off,
        load(&c.written) as f64 / seconds as f64,
        load(&c.dropped_rate),
        load(&c.dropped_kernel),
        load(&c.dropped_write)
    );
    drop(log);
    let _ = std::fs::remove_file(&file);
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.as_agent {
        // As the agent runs (before any thread starts).
        natgw_kube_support::heap::cap_arenas(1);
        natgw_kube_support::heap::fix_mmap_threshold();
    }
    if let Some(seconds) = args.translog_seconds {
        return translog_bench(seconds);
    }
    if let Some(seconds) = args.ha_replication {
        return failover::replication(seconds.max(1));
    }
    if let Some(rounds) = args.ha_failover {
        return failover::run(rounds.max(1), args.ha_sessions);
    }
    if let Some(switches) = args.ha_switch {
        return ha::run(switches.max(1));
    }
    if args.snat_change {
        return snat_change(&args);
    }
    if args.rates_only {
        let one = build(&Scale { fips: 1, dnats: 0, snats: 0 });
        let many = build(&Scale { fips: args.fips, dnats: 0, snats: 0 });
        println!("machine: {}", machine());
        let (mut r1, mut rn) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            r1.push(natgw_rate(&one, args.rate_seconds)?);
            rn.push(natgw_rate(&many, args.rate_seconds)?);
        }
        let (m1, mn) = (percentile(&mut r1, 0.5), percentile(&mut rn, 0.5));
        println!("new TCP connections/s through FloatingIp 0, median of 3 runs of {} s:", args.rate_seconds);
        println!(
            "| 1 FloatingIp | {} FloatingIps | ratio |\n|---|---|---|\n| {m1:.0} | {mn:.0} | {:.3} |",
            args.fips,
            mn / m1
        );
        println!("runs: 1: {r1:.0?}; {}: {rn:.0?}", args.fips);
        return Ok(());
    }
    if let Some(path) = &args.curve {
        println!("machine: {}\n", machine());
        println!(
            "| objects | natgw full sync (ms) | baseline full sync (ms) | natgw one change p50 (ms) | baseline one change p50 (ms) |"
        );
        println!("|---|---|---|---|---|");
        return curve(&args, path);
    }
    let mut big = build(&Scale { fips: args.fips, dnats: args.dnats, snats: args.snats });
    let mut small = build(&SMALL);
    if args.as_cached || args.as_agent {
        objects::as_served(&mut big);
        objects::as_served(&mut small);
    }
    // The agent's caches and entries stay alive through the run; the set
    // its round built is what is planned.
    let mut held = args.as_agent.then(|| natgw_agent::holdings(std::mem::take(&mut big)));
    if let Some(h) = held.as_mut() {
        big = std::mem::take(&mut h.set);
        small = natgw_agent::holdings(small).set;
    }
    eprintln!("machine: {}", machine());
    eprintln!(
        "natgw: full scale ({} FloatingIps, {} DnatRules, {} SnatRules, {} Eips)",
        args.fips,
        args.dnats,
        args.snats,
        big.eips.len()
    );
    let n_big = natgw_run(&mut big, args.changes)?;
    eprintln!("natgw: 100 objects");
    let n_small = natgw_run(&mut small, args.changes)?;
    let floor = if args.skip_floor { f64::NAN } else { address_floor(&big)? };
    let show = |v: &[(&str, f64)]| v.iter().map(|(p, d)| format!("{p} {d:.1}")).collect::<Vec<_>>().join(", ");
    eprintln!("full sync phases (ms): {}", show(&n_big.full_phases));
    if args.natgw_only {
        println!(
            "full sync {:.1} ms to translation in force, then sweep {:.1} ms: {}",
            n_big.full_ms,
            n_big.full_sweep_ms,
            show(&n_big.full_phases)
        );
        println!("kernel floor: ip -batch of the same {} addresses {floor:.1} ms", big.eips.len());
        println!(
            "one change to translation in force: p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms: {}; its sweep p50 {:.1} ms",
            n_big.change_p50,
            n_big.change_p99,
            n_big.change_max,
            show(&n_big.phases),
            n_big.sweep_p50
        );
        println!("plan {:.1} ms; plan+sync p50 {:.2} ms", n_big.plan_ms, n_big.plan_change_p50);
        println!(
            "one change on 100 objects p50 {:.2} ms; ratio {:.2}",
            n_small.change_p50,
            n_big.change_p50 / n_small.change_p50
        );
        println!("peak memory of the benchmark process {:.0} MB", n_big.peak_mb);
        return Ok(());
    }
    eprintln!(
        "baseline ({}): full scale{}",
        args.iptables,
        if args.skip_baseline_full { " (restore only)" } else { ", one process per rule: minutes" }
    );
    let b_big = baseline_run(&big, &args.iptables, args.changes, !args.skip_baseline_full)?;
    eprintln!("baseline: 100 objects");
    let b_small = baseline_run(&small, &args.iptables, args.changes, true)?;
    eprintln!("connection rates ({} s each)", args.rate_seconds);
    let one = build(&Scale { fips: 1, dnats: 0, snats: 0 });
    let many = build(&Scale { fips: args.fips, dnats: 0, snats: 0 });
    let (nr1, nrn) = (natgw_rate(&one, args.rate_seconds)?, natgw_rate(&many, args.rate_seconds)?);
    let (br1, brn) = (
        baseline_rate(&one, &args.iptables, args.rate_seconds)?,
        baseline_rate(&many, &args.iptables, args.rate_seconds)?,
    );

    println!("machine: {}\n", machine());
    println!("| figure | natgw | baseline ({}) | baseline / natgw | target |", args.iptables);
    println!("|---|---|---|---|---|");
    println!("| plan of {} objects (pure, no kernel) | {:.1} ms | | | |", big.len(), n_big.plan_ms);
    row("full sync into an empty gateway", n_big.full_ms, b_big.full_ms, "ms", "natgw < 300 ms at 10k, < 3 s at 100k");
    row(
        "one change (add/remove a FloatingIp) on the full set, to translation in force, p50",
        n_big.change_p50,
        Some(b_big.change_p50),
        "ms",
        "natgw < 10 ms",
    );
    println!("| same, max of {} | {:.1} ms | | | |", 2 * args.changes, n_big.change_max);
    println!("| same, p99 | {:.1} ms | | | |", n_big.change_p99);
    println!("| its conntrack sweep (beside the next change), p50 | {:.1} ms | | | |", n_big.sweep_p50);
    println!("| full sync: the conntrack sweep after it | {:.1} ms | | | |", n_big.full_sweep_ms);
    println!("| peak memory of the benchmark process | {:.0} MB | | | |", n_big.peak_mb);
    println!("| same, plan + sync p50 | {:.1} ms | | | |", n_big.plan_change_p50);
    println!("| same, p50 per phase (ms) | {} | | | |", show(&n_big.phases));
    println!("| full sync, per phase (ms) | {} | | | |", show(&n_big.full_phases));
    println!("| kernel alone: `ip -batch` adding the same {} addresses | {floor:.1} ms | | | |", big.eips.len());
    row("one change on 100 objects, p50", n_small.change_p50, Some(b_small.change_p50), "ms", "");
    println!(
        "| one change: full set / 100 objects | {:.2}x | {:.2}x | | natgw within 1.5x |",
        n_big.change_p50 / n_small.change_p50,
        b_big.change_p50 / b_small.change_p50
    );
    row("full sync of 100 objects", n_small.full_ms, b_small.full_ms, "ms", "");
    println!("| new connections/s through 1 FloatingIp | {nr1:.0} | {br1:.0} | | |");
    println!("| new connections/s with {} FloatingIps | {nrn:.0} | {brn:.0} | | |", args.fips);
    println!(
        "| rate with {} / rate with 1 | {:.2} | {:.2} | | natgw within 5% (>= 0.95) |",
        args.fips,
        nrn / nr1,
        brn / br1
    );
    Ok(())
}
