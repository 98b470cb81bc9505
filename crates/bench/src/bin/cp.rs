//! `natgw-cp-bench`: the control plane end to end. A real kube-apiserver,
//! `natgw controller` and `natgw agent` as processes of their own (so
//! their memory can be read apart), a lab gateway.
//! Creates N FloatingIps (each with an auto-allocated Eip) at once and
//! measures the time until all are Ready and in the kernel, then the
//! create-to-programmed latency of single FloatingIps on top, then the
//! time to delete them all at once.

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use futures::StreamExt;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
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
    /// Measure the API server alone: the same creates with no natgw
    /// process running (the floor of the bulk figures on this machine).
    #[arg(long)]
    api_floor: bool,
    /// Write a CPU profile of the API server during the FloatingIp burst
    /// here (`go tool pprof -top FILE` reads it).
    #[arg(long)]
    api_profile: Option<std::path::PathBuf>,
    /// Leave the objects in place at the end: skip the deletion phase
    /// (at 50,000 FloatingIps it takes longer than the creations).
    #[arg(long)]
    keep: bool,
    /// Many gateways instead: G NatGateways (each with its own Vpc and
    /// LAN Subnet) of `--fips` FloatingIps each. One agent runs, for the
    /// lab's gateway; the others' workloads are StatefulSets the API
    /// server stores and no kubelet runs. Reports what that agent
    /// receives alone and among the others, and the controller's memory
    /// and per-gateway reconcile latency.
    #[arg(long)]
    gateways: Option<u32>,
    /// An annotation of this many KiB on every FloatingIp: what a tenant
    /// can put on its rules, which natgw must not keep.
    #[arg(long, default_value_t = 0)]
    annotation_kib: usize,
    /// Seconds to wait before reading memory, so that both processes have
    /// trimmed their heaps once (every 30 s) after the bursts.
    #[arg(long, default_value_t = 0)]
    settle_secs: u64,
}

/// `--annotation-kib`, for `fip`.
static ANNOTATION_KIB: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How long a bulk phase over `n` objects may take before the bench gives
/// up: 10 minutes, more above 24,000 objects (40 a second).
fn patience(n: usize) -> Duration {
    Duration::from_secs(600.max(n as u64 / 40))
}

use natgw_testenv::{create, natgw_object as obj};

#[path = "cp/many.rs"]
mod many;

fn internal(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 78, 0, 10)) + i)
}

async fn eip(client: &Client, i: u32) -> Result<()> {
    create(client, &obj::<Eip>("Eip", &format!("e{i}"), serde_json::json!({"gateway": "demo-gw"}))?).await?;
    Ok(())
}

async fn fip(client: &Client, i: u32) -> Result<()> {
    let spec = serde_json::json!({"eip": format!("e{i}"), "internalIp": internal(i)});
    let mut f = obj::<FloatingIp>("FloatingIp", &format!("f{i}"), spec)?;
    let kib = ANNOTATION_KIB.load(std::sync::atomic::Ordering::Relaxed);
    if kib > 0 {
        f.metadata.annotations = Some([("bench.natgw.io/ballast".to_string(), "x".repeat(kib << 10))].into());
    }
    create(client, &f).await?;
    Ok(())
}

/// A live copy of every object of a kind, fed by a watch: listing 25,000
/// objects every 100 ms to count them loaded the API server it measured.
async fn watched<K>(api: Api<K>) -> Result<kube::runtime::reflector::Store<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    use kube::runtime::WatchStreamExt;
    use kube::runtime::{reflector, watcher};
    let (reader, writer) = reflector::store::<K>();
    // With a backoff: once the API server is gone at the end, a watch
    // retrying at once kept a core busy and the process from exiting.
    let stream = reflector::reflector(writer, watcher::watcher(api, watcher::Config::default()).default_backoff());
    tokio::spawn(stream.for_each(|_| futures::future::ready(())));
    reader.wait_until_ready().await?;
    Ok(reader)
}

fn ready(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> bool {
    conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Creates objects `ids` with `parallel` requests in flight, then waits
/// until `done` counts all of them; returns (created, all done) times.
async fn burst<F, D>(
    what: &str,
    ids: std::ops::Range<u32>,
    parallel: usize,
    make: impl Fn(u32) -> F,
    done: impl Fn() -> D,
    alive: impl Fn() -> Result<()>,
) -> Result<(Duration, Duration)>
where
    F: std::future::Future<Output = Result<()>>,
    D: std::future::Future<Output = Result<usize>>,
{
    let n = ids.len();
    eprintln!("creating {n} {what}, {parallel} requests in flight");
    let start = Instant::now();
    let results: Vec<Result<()>> = futures::stream::iter(ids).map(make).buffer_unordered(parallel).collect().await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    let created = start.elapsed();
    let mut last_report = Instant::now();
    loop {
        let d = done().await?;
        // A natgw that died makes nothing done: say so now, with its log.
        alive()?;
        if d >= n {
            return Ok((created, start.elapsed()));
        }
        if last_report.elapsed() > Duration::from_secs(2) {
            last_report = Instant::now();
            eprintln!("{:5.1} s: {d} of {n} {what} done", start.elapsed().as_secs_f64());
        }
        anyhow::ensure!(start.elapsed() < patience(n), "only {d} of {n} {what} done after {:?}", patience(n));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.api_profile.is_some() {
        // SAFETY: no other thread exists yet (the runtime starts below).
        unsafe { std::env::set_var("NATGW_APISERVER_PROFILING", "1") };
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(run(args));
    // Tasks still watching are dropped, not waited for.
    runtime.shutdown_background();
    result
}

async fn run(args: Args) -> Result<()> {
    ANNOTATION_KIB.store(args.annotation_kib, std::sync::atomic::Ordering::Relaxed);
    let lab = natgw_lab::Lab::up("ncpb")?;
    let env = natgw_testenv::TestEnv::start().await?;
    let admin = env.install_natgw(&natgw_api::crds()).await?;
    let natgw = std::env::current_exe()?.with_file_name("natgw");
    anyhow::ensure!(natgw.exists(), "{} is missing: cargo build --release --bins", natgw.display());
    let spawn = |sa: &str, args: &[&str]| -> Result<Child> {
        let kubeconfig = env.kubeconfig_file(&env.service_account("natgw-system", sa)?)?;
        let log_path = env.dir().join(format!("{sa}.log"));
        let log = std::fs::File::create(&log_path)?;
        // NATGW_CP_BENCH_WRAP="heaptrack -o /tmp/h" runs both under a
        // profiler (their memory figures are then the wrapper's).
        let wrap = std::env::var("NATGW_CP_BENCH_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut c = std::process::Command::new(program);
                c.args(words).arg(&natgw);
                c
            }
            None => std::process::Command::new(&natgw),
        };
        let child = command
            .args(args)
            .process_group(0)
            .env("KUBECONFIG", kubeconfig)
            // NATGW_CP_BENCH_LOG=info,natgw_agent=debug shows each round.
            .env("RUST_LOG", std::env::var("NATGW_CP_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Child { process: child, log: log_path })
    };
    if args.api_floor {
        return api_floor(&admin, &args).await;
    }
    if let Some(g) = args.gateways {
        return many::run(&admin, &lab, g, &args, spawn).await;
    }
    let controller = spawn("natgw-controller", &["controller", "--instance", "bench", "--namespace", "natgw-system"])?;
    let gw_ns = lab.ns("gw");
    // The gateway's own account, as the controller binds it (the bench
    // runs the agent itself, not a workload).
    natgw_kube_support::identity::apply(&admin, "demo-gw", "uid", "natgw-system").await?;
    let account = natgw_kube_support::identity::account("demo-gw");
    let agent =
        spawn(&account, &["agent", "--gateway", "demo-gw", "--netns", &gw_ns, "--claims-namespace", "natgw-system"])?;
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
            // /15s: room for 100,000 FloatingIps (a /16 held 65,533).
            serde_json::json!({"vpc": "demo", "cidr": "10.78.0.0/15", "gateway": "10.78.0.1"}),
        )?,
    )
    .await?;
    create(
        &admin,
        &obj::<Subnet>("Subnet", "external", serde_json::json!({"cidr": "100.64.0.0/15", "gateway": "100.64.0.1"}))?,
    )
    .await?;
    let gw = serde_json::json!({"vpc": "demo", "lanInterface": "lan0", "externalInterface": "ext0", "externalSubnet": "external"});
    create(&admin, &obj::<NatGateway>("NatGateway", "demo-gw", gw)?).await?;
    let kernel = Gateway::open(Some(&lab.ns("gw")))?;
    let fips_api: Api<FloatingIp> = Api::all(admin.clone());
    let eips_api: Api<Eip> = Api::all(admin.clone());
    let n = args.fips;
    // The Eips first (those of the single samples too): an Eip is done
    // when its address is claimed and on the gateway.
    let eips_seen = watched(eips_api.clone()).await?;
    let eips_done = || async {
        let state = eips_seen.state();
        Ok(state.iter().filter(|e| e.status.as_ref().is_some_and(|s| ready(&s.common.conditions))).count())
    };
    let (eips_created, eips_ready) = burst(
        "Eips",
        0..n + args.samples,
        args.parallel,
        |i| eip(&admin, i),
        eips_done,
        || both_alive(&controller, &agent),
    )
    .await?;
    // A FloatingIp is done when it is Ready and its DNAT is in the kernel.
    let fips_seen = watched(fips_api.clone()).await?;
    let fips_done = || async {
        let state = fips_seen.state();
        let ready = state.iter().filter(|f| f.status.as_ref().is_some_and(|s| ready(&s.conditions))).count();
        // The kernel read (every element as JSON) only once all are Ready.
        if ready < n as usize {
            return Ok(ready);
        }
        Ok(ready.min(kernel_fips(&kernel)?))
    };
    let before = ApiTally::read(&admin).await?;
    let profile = args.api_profile.clone().map(|to| {
        let admin = admin.clone();
        tokio::spawn(async move {
            let req = http::Request::get("/debug/pprof/profile?seconds=30").body(Vec::new())?;
            let mut body = admin.request_stream(req).await?;
            let mut bytes = Vec::new();
            futures::AsyncReadExt::read_to_end(&mut body, &mut bytes).await?;
            std::fs::write(&to, &bytes)?;
            anyhow::Ok(to)
        })
    });
    let (fips_created, fips_ready) =
        burst("FloatingIps", 0..n, args.parallel, |i| fip(&admin, i), fips_done, || both_alive(&controller, &agent))
            .await?;
    let tally = ApiTally::read(&admin).await?.since(&before);
    if let Some(p) = profile {
        eprintln!("API server profile: {}", p.await??.display());
    }

    eprintln!("timing {} single FloatingIps", args.samples);
    let mut lat = Vec::new();
    for s in 0..args.samples {
        let i = n + s;
        let t = Instant::now();
        fip(&admin, i).await?;
        // One element asked for, not the whole table listed: a poll every
        // few milliseconds must not load the 2 cores it measures.
        let element = format!("{{ {} }}", internal(i));
        loop {
            let e = element.clone();
            let found = kernel.run(move || {
                std::process::Command::new("nft")
                    .args(["get", "element", "ip", "natgw", natgw_dataplane::nft::elements::FIP_SNAT.name, &e])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })?;
            if found {
                break;
            }
            anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "FloatingIp f{i} never programmed");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    if std::env::var("NATGW_CP_BENCH_LOG").is_ok() {
        for sa in ["natgw-controller", account.as_str()] {
            let to = std::env::temp_dir().join(format!("natgw-cp-bench-{sa}.log"));
            std::fs::copy(env.dir().join(format!("{sa}.log")), &to)?;
            eprintln!("log: {}", to.display());
        }
    }
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    // Memory now, before the deletions below.
    let memory = [("controller", controller.memory()?), ("agent", agent.memory()?)];
    // Everything deleted at once, as an operator clearing a gateway does:
    // rules first (the Eips wait for them otherwise), then the Eips. Done
    // when the API no longer holds them, which the finalizers allow only
    // once the kernel no longer does.
    let cpu_before = controller.cpu_seconds()?;
    let deletions = if args.keep {
        None
    } else {
        let fips_gone = gone("FloatingIps", &fips_api, &fips_seen, args.parallel, || kernel_fips(&kernel)).await?;
        let eips_gone = gone("Eips", &eips_api, &eips_seen, args.parallel, || Ok(0)).await?;
        Some((fips_gone, eips_gone, controller.cpu_seconds()? - cpu_before))
    };
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    let total = 2 * n + args.samples + 5;
    println!("| figure | natgw | target |");
    println!("|---|---|---|");
    println!(
        "| {} Eips created at once ({} requests in flight) | {:.1} s | |",
        n + args.samples,
        args.parallel,
        eips_created.as_secs_f64()
    );
    println!("| same, until all have an address and are Ready | {:.1} s | |", eips_ready.as_secs_f64());
    println!("| {n} FloatingIps created at once | {:.1} s | |", fips_created.as_secs_f64());
    println!("| same, until all Ready and in the kernel | {:.1} s | 10,000 in < 30 s |", fips_ready.as_secs_f64());
    println!("| create-to-programmed of one FloatingIp with {total} objects present, p50 | {:.0} ms | |", pct(0.5));
    println!("| same, p99 of {} | {:.0} ms | < 250 ms |", args.samples, pct(0.99));
    for (name, (rss, peak)) in memory {
        println!("| {name} memory, now / peak | {rss:.0} / {peak:.0} MB | < 120 MB |");
    }
    if let Some((fips_gone, eips_gone, deletion_cpu)) = deletions {
        println!(
            "| all {} FloatingIps deleted at once ({} requests in flight), until gone from the API and the kernel | {:.1} s | |",
            n + args.samples,
            args.parallel,
            fips_gone.as_secs_f64()
        );
        println!("| then all {} Eips, until gone | {:.1} s | |", n + args.samples, eips_gone.as_secs_f64());
        println!("| controller CPU time, both deletions | {deletion_cpu:.1} s | |");
    }
    for (name, c) in [("controller", &controller), ("agent", &agent)] {
        println!("| {name} CPU time, whole run | {:.1} s | |", c.cpu_seconds()?);
    }
    println!("| API server CPU time, FloatingIp burst | {:.1} s | |", tally.cpu_seconds);
    println!();
    println!("Writes the API server served during the FloatingIp burst, per FloatingIp created:");
    println!();
    println!("| verb | resource | writes per FloatingIp |");
    println!("|---|---|---|");
    for ((verb, resource), count) in &tally.writes {
        println!("| {verb} | {resource} | {:.2} |", count / n as f64);
    }
    Ok(())
}

/// The FloatingIps the kernel holds (every element read as JSON).
fn kernel_fips(kernel: &Gateway) -> Result<usize> {
    Ok(kernel.snapshot()?.table.nat.fip_dnat.len())
}

/// Deletes every object `seen` holds, `parallel` requests in flight (as
/// `kubectl delete --all` does, one request per object), then waits until
/// `seen` and `in_kernel` count none; returns the time that took.
async fn gone<K>(
    what: &str,
    api: &Api<K>,
    seen: &kube::runtime::reflector::Store<K>,
    parallel: usize,
    in_kernel: impl Fn() -> Result<usize>,
) -> Result<Duration>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    use kube::ResourceExt;
    let start = Instant::now();
    let names: Vec<String> = seen.state().iter().map(|o| o.name_any()).collect();
    eprintln!("deleting {} {what}, {parallel} requests in flight", names.len());
    let results: Vec<Result<(), kube::Error>> = futures::stream::iter(&names)
        .map(|n| async move { api.delete(n, &Default::default()).await.map(drop) })
        .buffer_unordered(parallel)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    let mut last_report = Instant::now();
    loop {
        let left = seen.state().len();
        if left == 0 && in_kernel()? == 0 {
            return Ok(start.elapsed());
        }
        if last_report.elapsed() > Duration::from_secs(2) {
            last_report = Instant::now();
            eprintln!("{:5.1} s: {left} {what} left", start.elapsed().as_secs_f64());
        }
        let limit = patience(names.len());
        anyhow::ensure!(start.elapsed() < limit, "{left} {what} left after {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Counters read off the API server's own /metrics: what natgw asked of
/// it, by verb and resource, and the CPU it spent.
#[derive(Default)]
struct ApiTally {
    writes: std::collections::BTreeMap<(String, String), f64>,
    cpu_seconds: f64,
}

impl ApiTally {
    async fn read(client: &Client) -> Result<ApiTally> {
        let req = http::Request::get("/metrics").body(Vec::new())?;
        let text = client.request_text(req).await?;
        let mut out = ApiTally::default();
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("process_cpu_seconds_total ") {
                out.cpu_seconds = v.trim().parse().unwrap_or(0.0);
            }
            let Some(rest) = line.strip_prefix("apiserver_request_total{") else { continue };
            let Some((labels, value)) = rest.rsplit_once("} ") else { continue };
            let label = |k: &str| {
                labels.split(',').find_map(|kv| kv.strip_prefix(&format!("{k}=\"")).map(|v| v.trim_end_matches('"')))
            };
            let verb = label("verb").unwrap_or_default();
            if !matches!(verb, "POST" | "PUT" | "PATCH" | "APPLY" | "DELETE") {
                continue;
            }
            let mut resource = label("resource").unwrap_or_default().to_string();
            if let Some(sub) = label("subresource").filter(|s| !s.is_empty()) {
                resource = format!("{resource}/{sub}");
            }
            *out.writes.entry((verb.to_string(), resource)).or_default() += value.trim().parse::<f64>().unwrap_or(0.0);
        }
        Ok(out)
    }

    fn since(mut self, before: &ApiTally) -> ApiTally {
        for (k, v) in self.writes.iter_mut() {
            *v -= before.writes.get(k).copied().unwrap_or(0.0);
        }
        self.writes.retain(|_, v| *v > 0.0);
        self.cpu_seconds -= before.cpu_seconds;
        self
    }
}

/// The same creates with no natgw process: what the API server alone
/// takes on this machine.
async fn api_floor(admin: &Client, args: &Args) -> Result<()> {
    let n = args.fips;
    let created = || async { Ok(usize::MAX) };
    println!(
        "| each write over {n} objects, {} requests in flight, no natgw process running | API server alone |",
        args.parallel
    );
    println!("|---|---|");
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    // The creates, then each kind of write natgw makes: what it costs the
    // API server, one kind at a time over every FloatingIp (or Eip).
    for write in Write::ALL {
        let before = ApiTally::read(admin).await?;
        let (took, _) = burst(write.what(), 0..n, args.parallel, |i| write.make(admin, i), created, || Ok(())).await?;
        let cpu = ApiTally::read(admin).await?.since(&before).cpu_seconds;
        println!(
            "| {} | {:.1} s ({:.0}/s), API server CPU {:.2} ms each |",
            write.what(),
            took.as_secs_f64(),
            rate(took),
            cpu * 1000.0 / n as f64
        );
    }
    Ok(())
}

/// The writes a FloatingIp takes: its (and its Eip's) create, then
/// those natgw makes.
#[derive(Clone, Copy)]
enum Write {
    CreateEip,
    CreateFip,
    /// The controller's finalizers and gateway label, one merge patch.
    Metadata,
    /// The agent's Ready condition, a server-side apply of the status.
    StatusApply,
    /// The same condition as a merge patch (which would replace the
    /// conditions other managers own: measured for comparison only).
    StatusMerge,
    /// The controller's `status.usedBy` of the Eip.
    EipUsedBy,
}

impl Write {
    const ALL: [Write; 6] =
        [Write::CreateEip, Write::CreateFip, Write::Metadata, Write::StatusApply, Write::StatusMerge, Write::EipUsedBy];

    fn what(self) -> &'static str {
        match self {
            Write::CreateEip => "Eip create",
            Write::CreateFip => "FloatingIp create",
            Write::Metadata => "FloatingIp metadata merge patch (finalizers, label)",
            Write::StatusApply => "FloatingIp status server-side apply (Ready)",
            Write::StatusMerge => "FloatingIp status merge patch (Ready)",
            Write::EipUsedBy => "Eip status server-side apply (usedBy)",
        }
    }

    async fn make(self, client: &Client, i: u32) -> Result<()> {
        use natgw_kube_support::status::{apply_status, condition};
        let ready = || serde_json::json!([condition("Ready", "True", "InKernel", "in the kernel".into(), Some(1))]);
        let fips: Api<FloatingIp> = Api::all(client.clone());
        let fip = format!("f{i}");
        match self {
            Write::CreateEip => eip(client, i).await?,
            Write::CreateFip => self::fip(client, i).await?,
            Write::Metadata => {
                let finalizers = [CONTROLLER_FINALIZER.to_string(), gateway_finalizer("demo-gw")];
                let meta =
                    serde_json::json!({"metadata": {"finalizers": finalizers, "labels": {GATEWAY_LABEL: "demo-gw"}}});
                fips.patch(&fip, &PatchParams::default(), &Patch::Merge(&meta)).await?;
            }
            Write::StatusApply => {
                let status = serde_json::json!({"observedGeneration": 1, "conditions": ready()});
                apply_status::<FloatingIp>(client, "bench", &fip, status).await?;
            }
            Write::StatusMerge => {
                let body = serde_json::json!({"status": {"observedGeneration": 2, "conditions": ready()}});
                fips.patch_status(&fip, &PatchParams::default(), &Patch::Merge(&body)).await?;
            }
            Write::EipUsedBy => {
                let status = serde_json::json!({"usedBy": format!("FloatingIp/{fip}")});
                apply_status::<Eip>(client, "bench", &format!("e{i}"), status).await?;
            }
        }
        Ok(())
    }
}

/// A natgw process, killed when the benchmark ends.
struct Child {
    process: std::process::Child,
    log: std::path::PathBuf,
}

fn both_alive(controller: &Child, agent: &Child) -> Result<()> {
    controller.alive()?;
    agent.alive()
}

impl Child {
    /// The fields of `/proc/PID/stat` after the command name (which may
    /// hold spaces); empty once the process is reaped.
    fn stat_fields(&self) -> Vec<String> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.process.id())).unwrap_or_default();
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        rest.split_whitespace().map(str::to_owned).collect()
    }

    /// An error with the end of the process's log once it has exited
    /// (a zombie: the benchmark has not reaped it).
    fn alive(&self) -> Result<()> {
        let fields = self.stat_fields();
        if matches!(fields.first().map(String::as_str), Some("Z") | None) {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(20)..];
            anyhow::bail!("natgw exited; the end of its log ({}):\n{}", self.log.display(), tail.join("\n"));
        }
        Ok(())
    }

    /// User and system CPU time so far, in seconds.
    fn cpu_seconds(&self) -> Result<f64> {
        let f = self.stat_fields();
        anyhow::ensure!(!f.is_empty(), "no /proc stat for {}: has the process died?", self.process.id());
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // utime and stime are fields 14 and 15 of stat: 11 and 12 here.
        let hz = 100.0; // USER_HZ on Linux
        Ok((ticks(11) + ticks(12)) / hz)
    }

    /// Resident and peak resident memory, in MB.
    fn memory(&self) -> Result<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.id()))?;
        let kb = |key: &str| -> Result<f64> {
            let line = status.lines().find(|l| l.starts_with(key));
            let n = line.and_then(|l| l.split_whitespace().nth(1)).and_then(|n| n.parse::<f64>().ok());
            n.ok_or_else(|| anyhow::anyhow!("no {key} in /proc status: has the process died?"))
        };
        Ok((kb("VmRSS:")? / 1024.0, kb("VmHWM:")? / 1024.0))
    }
}

impl Drop for Child {
    /// Ends natgw in the child's process group with SIGTERM, so a wrapping
    /// profiler gets to write its data, then kills whatever is left.
    fn drop(&mut self) {
        let group = self.process.id().to_string();
        let signal = |sig: &str, name: &[&str]| {
            let _ = std::process::Command::new("pkill").args([sig, "-g", &group]).args(name).status();
        };
        signal("-TERM", &["-x", "natgw"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && matches!(self.process.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        signal("-KILL", &[]);
        let _ = self.process.wait();
    }
}
