//! Standalone mode: manifests on disk, one network namespace, no cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use natgw_api::{ObjectSet, load_path, load_texts, manifest_files};
use natgw_dataplane::{Gateway, SyncReport};
use natgw_plan::{GatewayPlan, plan_gateway};

/// The gateway to plan: the one named, or the only one in the set.
fn pick_gateway(set: &ObjectSet, wanted: Option<&str>) -> Result<String> {
    if let Some(name) = wanted {
        return Ok(name.to_string());
    }
    let names: Vec<&String> = set.gateways.keys().collect();
    match names.as_slice() {
        [one] => Ok((*one).clone()),
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

pub fn audit(netns: &str, path: &Path, gateway: Option<&str>) -> Result<ExitCode> {
    let plan = load_plan(path, gateway)?;
    let drift = Gateway::open(Some(netns))?.audit(&plan)?;
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

/// Manifest texts in force, per file. A file's new content replaces the
/// old one only if the whole set still loads; otherwise the last good
/// version stays in force and the error is reported once.
#[derive(Default)]
pub struct Manifests {
    good: BTreeMap<PathBuf, String>,
    rejected: BTreeMap<PathBuf, Option<String>>,
}

impl Manifests {
    /// Looks at the files; returns the object set if anything was accepted.
    pub fn refresh(&mut self, dir: &Path) -> Result<Option<ObjectSet>> {
        let mut seen: BTreeMap<PathBuf, Option<String>> = BTreeMap::new();
        for f in manifest_files(dir)? {
            seen.insert(f.clone(), std::fs::read_to_string(&f).ok());
        }
        for f in self.good.keys() {
            seen.entry(f.clone()).or_insert(None);
        }
        let mut accepted = false;
        for (file, content) in seen {
            if self.good.get(&file) == content.as_ref() || self.rejected.get(&file) == Some(&content) {
                continue;
            }
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

pub fn run(netns: &str, dir: &Path, gateway: Option<&str>, resync: u64, poll_ms: u64) -> Result<ExitCode> {
    let gw = Gateway::open(Some(netns))?;
    let mut manifests = Manifests::default();
    let mut set = manifests.refresh(dir)?.unwrap_or_default();
    let mut last_sync: Option<Instant> = None;
    let mut dirty = true;
    tracing::info!(netns, dir = %dir.display(), "keeping the namespace converged");
    loop {
        if let Some(new) = manifests.refresh(dir)? {
            set = new;
            dirty = true;
        }
        let due = last_sync.is_none_or(|t| t.elapsed() >= Duration::from_secs(resync));
        if dirty || due {
            // Edits diff against the last sync; the periodic round reads the
            // kernel to repair drift.
            let sync = |plan: &GatewayPlan| if due { gw.resync(plan) } else { gw.sync(plan) };
            match plan_set(&set, gateway).and_then(|plan| Ok((sync(&plan)?, plan))) {
                Ok((report, plan)) => {
                    if report.changed || dirty {
                        tracing::info!(gateway = %plan.gateway, "{}", describe(&report));
                    }
                }
                // A failed sync leaves the kernel as the last good one did;
                // the next round tries again.
                Err(e) => tracing::error!("sync failed: {e:#}"),
            }
            dirty = false;
            last_sync = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(poll_ms));
    }
}
