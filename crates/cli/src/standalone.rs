//! Standalone mode: manifests on disk, one network namespace, no cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use natgw_api::{ObjectSet, load_path, load_texts, manifest_files};
use natgw_dataplane::{Gateway, SyncReport};
use natgw_kube_support::health::Probe;
use natgw_plan::{GatewayPlan, plan_gateway};

/// The gateway to plan: the one named, or the only one in the set.
fn pick_gateway(set: &ObjectSet, wanted: Option<&str>) -> Result<String> {
    if let Some(name) = wanted {
        return Ok(name.to_string());
    }
    let names: Vec<&natgw_api::Name> = set.gateways.keys().collect();
    match names.as_slice() {
        [one] => Ok(one.to_string()),
        [] => bail!("the manifests define no NatGateway"),
        many => bail!(
            "the manifests define several NatGateways ({}); choose one with --gateway",
            many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn load_plan(path: &Path, gateway: Option<&str>) -> Result<GatewayPlan> {
    let (set, _) = load_path(path)?;
    plan_set(&set, gateway)
}

fn plan_set(set: &ObjectSet, gateway: Option<&str>) -> Result<GatewayPlan> {
    let name = pick_gateway(set, gateway)?;
    let plan = plan_gateway(set, &name)?;
    for c in &plan.conflicts {
        eprintln!("warning: {c}");
    }
    Ok(plan)
}

pub fn plan(path: &Path, gateway: Option<&str>, json: bool) -> Result<ExitCode> {
    let plan = load_plan(path, gateway)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{plan}");
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(r: &SyncReport) -> String {
    if !r.changed {
        return format!("no change ({} ms)", r.duration.as_millis());
    }
    format!(
        "{} nft statements{}, +{} -{} addresses, +{} -{} routes, {} conntrack entries deleted ({} ms)",
        r.nft_statements,
        if r.table_rebuilt { " (table rebuilt)" } else { "" },
        r.addresses_added.len(),
        r.addresses_removed.len(),
        r.routes_added.len(),
        r.routes_removed.len(),
        r.conntrack_deleted,
        r.duration.as_millis()
    )
}

pub fn apply(netns: &str, path: &Path, gateway: Option<&str>) -> Result<ExitCode> {
    // Everything is loaded and planned before the kernel is touched.
    let plan = load_plan(path, gateway)?;
    let gw = Gateway::open(Some(netns))?;
    let report = gw.sync(&plan).with_context(|| format!("sync of gateway {} into {netns}", plan.gateway))?;
    for (phase, took) in &report.phases {
        tracing::debug!(phase, ms = took.as_secs_f64() * 1000.0, "sync phase");
    }
    println!("{}: {}", plan.gateway, describe(&report));
    Ok(ExitCode::SUCCESS)
}

/// The plan a replica's kernel should hold: a standby's has no address.
fn as_replica(plan: GatewayPlan, standby: bool) -> GatewayPlan {
    if standby { plan.standby() } else { plan }
}

pub fn audit(netns: Option<&str>, path: &Path, gateway: Option<&str>, standby: bool) -> Result<ExitCode> {
    report_drift(netns, &as_replica(load_plan(path, gateway)?, standby))
}

/// `audit` of objects already read (from the API server), inside a
/// gateway pod: a cluster runs the gateway as one replica (the agent's
/// plan leaves the LAN address to the attachment).
pub fn audit_set(netns: Option<&str>, set: &ObjectSet, gateway: &str, standby: bool) -> Result<ExitCode> {
    report_drift(netns, &as_replica(plan_set(set, Some(gateway))?.single_replica(), standby))
}

fn report_drift(netns: Option<&str>, plan: &GatewayPlan) -> Result<ExitCode> {
    let drift = Gateway::open(netns)?.audit(plan)?;
    if drift.is_empty() {
        println!("{}: converged", plan.gateway);
        return Ok(ExitCode::SUCCESS);
    }
    for d in &drift {
        println!("{d}");
    }
    println!("{}: {} differences", plan.gateway, drift.len());
    Ok(ExitCode::from(1))
}

pub fn teardown(netns: &str) -> Result<ExitCode> {
    let report = Gateway::open(Some(netns))?.teardown()?;
    println!(
        "removed: table, {} addresses, {} routes, {} conntrack entries",
        report.addresses_removed.len(),
        report.routes_removed.len(),
        report.conntrack_deleted
    );
    Ok(ExitCode::SUCCESS)
}

/// How long a file must stay missing before `run` treats it as deleted:
/// an editor's save (rename the old file away, write the new one) or a
/// sync tool's swap makes a file vanish for a moment.
pub const MISSING_GRACE: Duration = Duration::from_secs(2);

/// Manifest texts in force, per file. A file's new content replaces the
/// old one only once two looks in a row read it the same (a file being
/// written in place reads as a valid prefix of itself: taken at once, the
/// objects it has not reached yet would be torn down), and only if the
/// whole set still loads; otherwise the last good version stays in force
/// and the error is reported once. A file that cannot be read keeps its
/// last good version; one that is missing counts as deleted only after
/// `MISSING_GRACE`.
#[derive(Default)]
pub struct Manifests {
    good: BTreeMap<PathBuf, String>,
    rejected: BTreeMap<PathBuf, Option<String>>,
    missing_since: BTreeMap<PathBuf, Instant>,
    unreadable: BTreeMap<PathBuf, String>,
    /// New content seen once, waiting for a second look to match.
    settling: BTreeMap<PathBuf, String>,
}

impl Manifests {
    /// Looks at the files; returns the object set if anything was accepted.
    pub fn refresh(&mut self, dir: &Path) -> Result<Option<ObjectSet>> {
        self.refresh_at(dir, Instant::now())
    }

    /// `refresh` as if the time were `now` (tests).
    pub fn refresh_at(&mut self, dir: &Path, now: Instant) -> Result<Option<ObjectSet>> {
        // A single file given with -f may be the one that vanished.
        let listed = if dir.exists() { manifest_files(dir)? } else { Vec::new() };
        let mut seen: BTreeMap<PathBuf, Option<String>> = BTreeMap::new();
        self.unreadable.retain(|f, _| listed.contains(f));
        for f in listed {
            match std::fs::read_to_string(&f) {
                Ok(text) => {
                    self.unreadable.remove(&f);
                    seen.insert(f, Some(text));
                }
                Err(e) => {
                    // Never a deletion: keep what is in force and say why once.
                    if self.unreadable.insert(f.clone(), e.to_string()).as_deref() != Some(&e.to_string()) {
                        tracing::error!(file = %f.display(), "cannot read the manifest ({e}); its last good version stays in force");
                    }
                }
            }
        }
        for f in self.good.keys() {
            if seen.contains_key(f) || self.unreadable.contains_key(f) {
                self.missing_since.remove(f);
                continue;
            }
            let since = *self.missing_since.entry(f.clone()).or_insert(now);
            if now.duration_since(since) >= MISSING_GRACE {
                seen.insert(f.clone(), None);
            }
        }
        let mut accepted = false;
        for (file, content) in seen {
            if self.good.get(&file) == content.as_ref() || self.rejected.get(&file) == Some(&content) {
                self.settling.remove(&file);
                continue;
            }
            if let Some(text) = &content
                && self.settling.insert(file.clone(), text.clone()).as_ref() != Some(text)
            {
                continue;
            }
            self.settling.remove(&file);
            let mut candidate = self.good.clone();
            match &content {
                Some(text) => candidate.insert(file.clone(), text.clone()),
                None => candidate.remove(&file),
            };
            let texts: Vec<(PathBuf, String)> = candidate.clone().into_iter().collect();
            match load_texts(&texts) {
                Ok(_) => {
                    self.good = candidate;
                    self.rejected.remove(&file);
                    self.missing_since.remove(&file);
                    accepted = true;
                    tracing::info!(file = %file.display(), "accepted manifest change");
                }
                Err(e) => {
                    let kept = if self.good.contains_key(&file) {
                        "the last good version stays in force"
                    } else {
                        "the file is not used"
                    };
                    tracing::error!(file = %file.display(), "rejected manifest change ({kept}): {e}");
                    self.rejected.insert(file, content);
                }
            }
        }
        if !accepted {
            return Ok(None);
        }
        let texts: Vec<(PathBuf, String)> = self.good.clone().into_iter().collect();
        Ok(Some(load_texts(&texts)?.0))
    }
}

/// `natgw run` as one replica of a gateway with `spec.replicas: 2`.
#[derive(clap::Args, Debug, Default)]
pub struct HaArgs {
    /// This replica's name, unique within the gateway (adverts carry it).
    #[arg(long, requires_all = ["ha_listen", "ha_peer", "ha_key_file"])]
    pub ha_name: Option<String>,
    /// A file of at least 16 random bytes, the same for both replicas:
    /// adverts are signed with it and the connection stream proves it
    /// (`head -c 32 /dev/urandom > FILE`).
    #[arg(long, requires = "ha_name")]
    pub ha_key_file: Option<PathBuf>,
    /// This replica's address and port on the heartbeat path (UDP adverts,
    /// TCP connection stream): a link of the replicas' own, never the
    /// gateway's LAN or external interface.
    #[arg(long, requires = "ha_name")]
    pub ha_listen: Option<std::net::SocketAddrV4>,
    /// The other replica's heartbeat address and port.
    #[arg(long, requires = "ha_name")]
    pub ha_peer: Vec<std::net::SocketAddrV4>,
    /// Higher takes over first after a start and wins ties.
    #[arg(long, default_value_t = 100)]
    pub ha_priority: u8,
    /// Milliseconds between adverts.
    #[arg(long, default_value_t = 100)]
    pub ha_advert_ms: u64,
    /// Milliseconds without an advert before the active is suspected gone.
    #[arg(long, default_value_t = 300)]
    pub ha_dead_ms: u64,
    /// Milliseconds an ARP probe waits for a holder of the addresses.
    #[arg(long, default_value_t = 100)]
    pub ha_probe_ms: u64,
    /// A JSON file kept up to date with this replica's role, term, last
    /// takeover and connections held (replaced whole on each change).
    #[arg(long, requires = "ha_name")]
    pub ha_status_file: Option<PathBuf>,
}

/// The status file's content.
fn status_json(s: &natgw_replica::Status) -> serde_json::Value {
    let since = s.since.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    serde_json::json!({
        "role": natgw_replica::role_name(s.role),
        "term": s.term,
        "sinceUnix": since,
        "reason": s.reason,
        "takeovers": s.takeovers,
        "fenced": s.fenced,
        "linksUp": s.links_up,
        "peer": s.peer.as_ref().map(|(name, _)| name),
        "peerAlive": s.peer_alive,
        "peerHeardMsAgo": s.peer.as_ref().map(|(_, ago)| ago.as_millis() as u64),
        "sessionsHeld": s.sessions_held,
        "sessionsInstalled": s.sessions_installed,
        "sessionEventsLost": s.sessions_lost_events,
        "refusedDatagrams": s.refused_datagrams,
        "refusedStreams": s.refused_streams,
    })
}

fn write_status(path: &Path, value: &serde_json::Value) {
    let tmp = path.with_extension("tmp");
    let written = std::fs::write(&tmp, value.to_string()).and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        tracing::warn!(file = %path.display(), error = %e, "cannot write the status file");
    }
}

/// SIGTERM and SIGINT, blocked in every thread started after this call
/// and awaited by one: a stop is then a planned one (an active replica
/// hands over before it exits).
fn stop_on_signal() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    // SAFETY: a sigset built by the libc calls meant for it, and
    // pthread_sigmask/sigwait on it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let flag = stop.clone();
        std::thread::spawn(move || {
            let mut sig = 0;
            libc::sigwait(&set, &mut sig);
            flag.store(true, Ordering::Relaxed);
        });
    }
    stop
}

/// The replica to run, if the gateway asks for replicas: refuses a
/// mismatch between the objects and the flags either way.
fn start_replica(
    netns: &str,
    set: &ObjectSet,
    gateway: Option<&str>,
    ha: HaArgs,
    gw: Arc<Gateway>,
    registry: &mut prometheus_client::registry::Registry,
) -> Result<Option<natgw_replica::Replica>> {
    let name = pick_gateway(set, gateway)?;
    let Some(spec) = set.gateways.get(name.as_str()).map(|g| g.spec.clone()) else {
        bail!("the manifests define no NatGateway {name:?}")
    };
    match (spec.replica_count() > 1, ha.ha_name) {
        (false, None) => Ok(None),
        (false, Some(_)) => bail!(
            "--ha-name is given, but NatGateway {name:?} has spec.replicas {}: set spec.replicas: 2 (and spec.lanIp) to run it as a pair",
            spec.replica_count()
        ),
        (true, None) => bail!(
            "NatGateway {name:?} has spec.replicas {}: run each replica with --ha-name, --ha-listen, --ha-peer and --ha-key-file",
            spec.replica_count()
        ),
        (true, Some(replica)) => {
            let Some(listen) = ha.ha_listen else { bail!("--ha-listen is required with --ha-name") };
            let Some(key_file) = ha.ha_key_file else { bail!("--ha-key-file is required with --ha-name") };
            let key = natgw_replica::auth::Key::load(&key_file)?;
            let settings = natgw_replica::Settings {
                gateway: name,
                name: replica,
                priority: ha.ha_priority,
                listen,
                peers: ha.ha_peer,
                advert_ms: ha.ha_advert_ms,
                dead_ms: ha.ha_dead_ms,
                probe_ms: ha.ha_probe_ms,
                tenant_interfaces: [spec.lan_interface, spec.external_interface],
                key,
            };
            let path = natgw_dataplane::netns::netns_path(netns);
            let metrics = natgw_replica::metrics::Metrics::new(registry, &settings.gateway, &settings.name);
            Ok(Some(natgw_replica::Replica::start(settings, gw, Some(path), metrics)?))
        }
    }
}

/// Serves `registry` with /healthz and /readyz on `addr`, from a thread
/// of its own; binding fails here, loudly.
fn serve_metrics(addr: std::net::SocketAddr, registry: prometheus_client::registry::Registry) -> Result<Probe> {
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("--metrics-addr {addr}"))?;
    listener.set_nonblocking(true)?;
    let probe = Probe::new(registry);
    let served = probe.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
        match runtime {
            Ok(rt) => rt.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => natgw_kube_support::health::serve(l, served).await,
                    Err(e) => tracing::error!(error = %e, "cannot serve metrics"),
                }
            }),
            Err(e) => tracing::error!(error = %e, "cannot serve metrics"),
        }
    });
    Ok(probe)
}

pub fn run(
    netns: &str,
    dir: &Path,
    gateway: Option<&str>,
    (resync, poll_ms): (u64, u64),
    metrics_addr: Option<std::net::SocketAddr>,
    ha: HaArgs,
) -> Result<ExitCode> {
    let stop = stop_on_signal();
    let gw = Arc::new(Gateway::open(Some(netns))?);
    let mut manifests = Manifests::default();
    let mut set = manifests.refresh(dir)?.unwrap_or_default();
    // Decided once the manifests name the gateway, before its first sync.
    let status_file = ha.ha_status_file.clone();
    let mut last_status = serde_json::Value::Null;
    let mut ha = Some(ha);
    let mut replica = None;
    let mut probe: Option<Probe> = None;
    let mut last_sync: Option<Instant> = None;
    let mut last_role: Option<(natgw_ha::Role, u64)> = None;
    let mut dirty = true;
    tracing::info!(netns, dir = %dir.display(), "keeping the namespace converged");
    while !stop.load(Ordering::Relaxed) {
        match manifests.refresh(dir) {
            Ok(Some(new)) => {
                set = new;
                dirty = true;
            }
            Ok(None) => {}
            // An unreadable directory changes nothing in force.
            Err(e) => tracing::error!("cannot look at the manifests: {e:#}"),
        }
        if !set.gateways.is_empty()
            && let Some(args) = ha.take()
        {
            let mut registry = prometheus_client::registry::Registry::default();
            replica = start_replica(netns, &set, gateway, args, gw.clone(), &mut registry)?;
            if let Some(addr) = metrics_addr {
                probe = Some(serve_metrics(addr, registry)?);
            }
        }
        let due = last_sync.is_none_or(|t| t.elapsed() >= Duration::from_secs(resync));
        if ha.is_none() && (dirty || due) {
            // Edits diff against the last sync; the periodic round reads the
            // kernel to repair drift.
            let sync = |plan: &GatewayPlan| match &replica {
                Some(r) => r.sync(plan, due),
                None if due => gw.resync(plan),
                None => gw.sync(plan),
            };
            match plan_set(&set, gateway).and_then(|plan| Ok((sync(&plan)?, plan))) {
                Ok((report, plan)) => {
                    if report.changed || dirty {
                        tracing::info!(gateway = %plan.gateway, "{}", describe(&report));
                    }
                    if let Some(p) = &probe {
                        p.ready();
                    }
                }
                // A failed sync leaves the kernel as the last good one did;
                // the next round tries again.
                Err(e) => {
                    tracing::error!("sync failed: {e:#}");
                    if let Some(p) = &probe {
                        p.not_ready(format!("the last sync failed: {e:#}"));
                    }
                }
            }
            dirty = false;
            last_sync = Some(Instant::now());
        }
        if let Some(r) = &replica {
            let s = r.status();
            if let Some(path) = &status_file {
                // Compared without the age of the last advert, which
                // changes always.
                let value = status_json(&s);
                let mut compared = value.clone();
                compared["peerHeardMsAgo"] = serde_json::Value::Null;
                if compared != last_status {
                    last_status = compared;
                    write_status(path, &value);
                }
            }
            if last_role != Some((s.role, s.term)) {
                last_role = Some((s.role, s.term));
                tracing::info!(
                    role = natgw_replica::role_name(s.role),
                    term = s.term,
                    reason = %s.reason,
                    sessions_held = s.sessions_held,
                    "replica"
                );
            }
        }
        if let Some(p) = &probe {
            p.beat(Duration::from_millis(poll_ms) + Duration::from_secs(resync.max(1)));
        }
        // Short naps: a signal is seen within 50 ms.
        let until = Instant::now() + Duration::from_millis(poll_ms);
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(poll_ms.min(50)));
        }
    }
    if let Some(r) = replica {
        tracing::info!("stopping: handing over to the peer");
        r.stop();
    }
    tracing::info!("stopped; the kernel keeps what it holds");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET: &str = "apiVersion: natgw.io/v1alpha1\nkind: Vpc\nmetadata: {name: v}\n";
    const MORE: &str = "apiVersion: natgw.io/v1alpha1\nkind: Vpc\nmetadata: {name: w}\n";

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("natgw-manifests-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A file is taken once two looks read it the same: look twice.
    fn settled(m: &mut Manifests, d: &Path, at: Instant) -> Option<ObjectSet> {
        let first = m.refresh_at(d, at).unwrap();
        first.or_else(|| m.refresh_at(d, at).unwrap())
    }

    /// Second round, item 19: a manifest caught half-written (a valid
    /// prefix of itself) is never taken; the whole file is, once it stays.
    #[test]
    fn round2_item19_a_half_written_manifest_is_never_taken() {
        let d = dir("half");
        let f = d.join("all.yaml");
        std::fs::write(&f, format!("{NET}---\n{MORE}")).unwrap();
        let mut m = Manifests::default();
        let t0 = Instant::now();
        assert_eq!(settled(&mut m, &d, t0).unwrap().vpcs.len(), 2);
        // Rewritten in place: the first look sees only its first document.
        std::fs::write(&f, NET).unwrap();
        assert!(m.refresh_at(&d, t0 + Duration::from_secs(1)).unwrap().is_none(), "a prefix is not taken at once");
        std::fs::write(
            &f,
            format!("{NET}---\n{MORE}---\napiVersion: natgw.io/v1alpha1\nkind: Vpc\nmetadata: {{name: x}}\n"),
        )
        .unwrap();
        assert!(m.refresh_at(&d, t0 + Duration::from_secs(2)).unwrap().is_none(), "still changing");
        let set = m.refresh_at(&d, t0 + Duration::from_secs(3)).unwrap().expect("the whole file, once it stays");
        assert_eq!(set.vpcs.len(), 3);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn item21_an_editors_save_or_an_unreadable_file_never_tears_down_state() {
        let d = dir("save");
        let (a, b) = (d.join("a.yaml"), d.join("b.yaml"));
        std::fs::write(&a, NET).unwrap();
        std::fs::write(&b, MORE).unwrap();
        let mut m = Manifests::default();
        let t0 = Instant::now();
        assert_eq!(settled(&mut m, &d, t0).unwrap().vpcs.len(), 2);
        // The editor renames the old file away before writing the new one.
        std::fs::rename(&a, d.join(".a.yaml.swp")).unwrap();
        assert!(
            m.refresh_at(&d, t0 + Duration::from_millis(500)).unwrap().is_none(),
            "no change while briefly missing"
        );
        std::fs::write(&a, NET).unwrap();
        assert!(m.refresh_at(&d, t0 + Duration::from_secs(1)).unwrap().is_none(), "same content: nothing to do");
        // Unreadable (not UTF-8, e.g. half written by a tool): kept.
        std::fs::write(&a, [0xff, 0xfe, 0x00]).unwrap();
        assert!(m.refresh_at(&d, t0 + Duration::from_secs(10)).unwrap().is_none(), "unreadable keeps the last good");
        // Gone for longer than the grace: deleted.
        std::fs::remove_file(&a).unwrap();
        assert!(m.refresh_at(&d, t0 + Duration::from_secs(11)).unwrap().is_none());
        let set = m.refresh_at(&d, t0 + Duration::from_secs(11) + MISSING_GRACE).unwrap().expect("deletion accepted");
        assert_eq!(set.vpcs.keys().collect::<Vec<_>>(), ["w"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn item21_a_single_file_that_vanishes_briefly_is_kept() {
        let d = dir("single");
        let f = d.join("all.yaml");
        std::fs::write(&f, NET).unwrap();
        let mut m = Manifests::default();
        let t0 = Instant::now();
        assert!(settled(&mut m, &f, t0).is_some());
        std::fs::remove_file(&f).unwrap();
        assert!(m.refresh_at(&f, t0 + Duration::from_millis(100)).unwrap().is_none());
        std::fs::write(&f, NET).unwrap();
        assert!(m.refresh_at(&f, t0 + Duration::from_secs(5)).unwrap().is_none(), "back before it counted as deleted");
        let _ = std::fs::remove_dir_all(&d);
    }
}
