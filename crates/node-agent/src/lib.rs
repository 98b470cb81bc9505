//! The node agent: Service egress SNAT for one node. Level-triggered on
//! Services, EndpointSlices, Pods, Nodes and ServiceCIDRs: every round
//! computes the whole egress table from the caches and converges the
//! kernel in one transaction. Missing cluster CIDRs program nothing and
//! say so (log, Event, metric, readiness); on SIGTERM the agent removes
//! what it owns unless told to keep it.

mod args;
pub mod cidrs;
pub mod exit;
pub mod health;
pub mod service;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::OptionFuture;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};
use natgw_dataplane::egress::Egress;
use natgw_kube_support::events::Reporter;
use natgw_kube_support::is_ready as ready;
use natgw_plan::{EgressInput, ServiceState, plan_egress};

pub use args::Args;
pub use natgw_dataplane::egress::TABLE;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Sync(#[from] natgw_dataplane::SyncError),
    #[error("a blocking task died")]
    Task(#[from] tokio::task::JoinError),
}

#[derive(Clone, Debug)]
pub struct Config {
    /// This node's name (the Node object).
    pub node: String,
    /// Namespace to program (tests); `None` is the agent's own (hostNetwork).
    pub netns: Option<String>,
    pub overrides: cidrs::Overrides,
    /// Leave the egress table in place on SIGTERM, whatever the reason.
    pub keep_on_exit: bool,
    /// The DaemonSet that runs this agent (namespace, name): on SIGTERM
    /// the agent asks it whether this is a restart (the table and the
    /// flows stay for the next agent) or the end of egress on this node
    /// (the DaemonSet deleted or gone, or this node no longer selected:
    /// everything goes). Without it, SIGTERM removes everything.
    pub daemonset: Option<(String, String)>,
    /// Drop outside-bound traffic of a Service's pods until their SNAT is in.
    pub fail_closed: bool,
    /// Translate only to VIPs this node holds (off for announcers that do
    /// not put the VIP on an interface).
    pub vip_check: bool,
    /// How often the table is written whole, repairing hand edits
    /// (`RESYNC` in production).
    pub resync: Duration,
}

/// How often the kernel is written whole by default.
pub const RESYNC: Duration = Duration::from_secs(30);
/// How often the VIPs this node holds are looked at again.
const TICK: Duration = Duration::from_secs(1);

type Errors = Arc<Mutex<BTreeMap<&'static str, String>>>;

/// A cache of kind K; a failing watch leaves its reason in `errors`.
fn watch<K>(
    client: &Client,
    config: watcher::Config,
    kind: &'static str,
    errors: &Errors,
    tx: &tokio::sync::mpsc::Sender<()>,
) -> (Store<K>, impl std::future::Future<Output = ()> + use<K>)
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (reader, stream) = natgw_kube_support::cached(client, config, "node-agent");
    let (errors, tx) = (errors.clone(), tx.clone());
    let fut = async move {
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            let mut e = errors.lock().unwrap_or_else(|p| p.into_inner());
            match ev {
                Ok(_) => drop(e.remove(kind)),
                Err(err) => {
                    tracing::warn!(kind, error = %err, "watch failed");
                    e.insert(kind, err.to_string());
                }
            }
            let _ = tx.try_send(());
        }
    };
    (reader, fut)
}

/// A watch that runs only when wanted: what is not needed is not watched,
/// so RBAC can be exact.
fn optional<S, F>(w: Option<(S, F)>) -> (Option<S>, OptionFuture<F>) {
    match w {
        Some((store, fut)) => (Some(store), Some(fut).into()),
        None => (None, None.into()),
    }
}

struct Caches {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Option<Store<Pod>>,
    nodes: Option<Store<Node>>,
    service_cidrs: Option<Store<ServiceCIDR>>,
    errors: Errors,
}

impl Caches {
    fn error(&self, kind: &str) -> Option<String> {
        self.errors.lock().unwrap_or_else(|p| p.into_inner()).get(kind).cloned()
    }

    /// A list the agent cannot do without, or why it is missing.
    fn discovered<K, T>(&self, store: &Option<Store<K>>, kind: &str, f: impl Fn(&K) -> Vec<T>) -> Result<Vec<T>, String>
    where
        K: reflector::Lookup<DynamicType = ()> + Clone + 'static,
    {
        let Some(store) = store else { return Ok(Vec::new()) };
        if !ready(store) {
            return Err(self.error(kind).unwrap_or_else(|| format!("{kind} not listed yet")));
        }
        Ok(store.state().iter().flat_map(|o| f(o)).collect())
    }
}

/// What a round found.
enum Gathered {
    /// A cache has not listed yet: nothing may be judged, said or written.
    NotListed(String),
    /// Everything listed, but egress cannot be programmed; the reason.
    Failed(String),
    Ready(EgressInput),
}

struct Round {
    input: Gathered,
    invalid: Vec<service::ServiceError>,
    /// Egress Services with an endpoint on this node: the ones this node
    /// reports on.
    speaks_for: std::collections::BTreeSet<String>,
}

impl Caches {
    /// Whether `kind`'s cache has listed; a cache whose watch fails is not
    /// waited for silently: the failure is the reason.
    fn listed<K>(&self, store: &Option<Store<K>>, kind: &str) -> Result<bool, String>
    where
        K: reflector::Lookup<DynamicType = ()> + Clone + 'static,
    {
        match store {
            Some(s) if !ready(s) => match self.error(kind) {
                Some(e) => Err(format!("cannot list {kind}s: {e}")),
                None => Ok(false),
            },
            _ => Ok(true),
        }
    }
}

fn gather(c: &Caches, cfg: &Config, local: &std::collections::BTreeSet<std::net::Ipv4Addr>) -> Round {
    let failed = |why: String| Round { input: Gathered::Failed(why), invalid: vec![], speaks_for: Default::default() };
    let mut waiting = Vec::new();
    let checks = [
        ("Service", c.listed(&Some(c.services.clone()), "Service")),
        ("EndpointSlice", c.listed(&Some(c.slices.clone()), "EndpointSlice")),
        ("Pod", c.listed(&c.pods, "Pod")),
        ("Node", c.listed(&c.nodes, "Node")),
        ("ServiceCIDR", c.listed(&c.service_cidrs, "ServiceCIDR")),
    ];
    for (kind, listed) in checks {
        match listed {
            Ok(true) => {}
            Ok(false) => waiting.push(kind),
            // Failing discovery is reported by `resolve`, naming the flag.
            Err(_) if kind == "Node" || kind == "ServiceCIDR" => {}
            Err(e) => return failed(e),
        }
    }
    if !waiting.is_empty() {
        let why = format!("waiting for the first list of {}", waiting.join(", "));
        return Round { input: Gathered::NotListed(why), invalid: vec![], speaks_for: Default::default() };
    }
    let pods = c.discovered(&c.nodes, "Node", |n: &Node| {
        cidrs::v4(n.spec.as_ref().and_then(|s| s.pod_cidrs.clone()).unwrap_or_default())
    });
    let services = c.discovered(&c.service_cidrs, "ServiceCIDR", |s: &ServiceCIDR| {
        cidrs::v4(s.spec.as_ref().and_then(|s| s.cidrs.clone()).unwrap_or_default())
    });
    let nets = match cidrs::resolve(&cfg.overrides, cidrs::Discovered { pod_cidrs: pods, service_cidrs: services }) {
        Ok(n) => n,
        Err(e) => return failed(e),
    };
    let selected: Vec<Arc<Pod>> = c.pods.as_ref().map(|p| p.state()).unwrap_or_default();
    let pods: Vec<&Pod> = selected.iter().map(|p| &**p).collect();
    let slices = c.slices.state();
    let slices: Vec<&EndpointSlice> = slices.iter().map(|s| &**s).collect();
    let mut input = EgressInput {
        cluster_nets: nets.all(),
        pod_nets: nets.pods,
        node_addresses: local.clone(),
        local_vips: cfg.vip_check.then(|| local.clone()),
        services: vec![],
        fail_closed: cfg.fail_closed,
    };
    let mut invalid = Vec::new();
    let mut speaks_for = std::collections::BTreeSet::new();
    let index = service::Index::new(&slices, &pods, &cfg.node);
    for s in c.services.state().iter().filter(|s| service::wants_egress(s)) {
        let speaks = service::endpoints_on(s, &index);
        if speaks {
            let ns = s.metadata.namespace.as_deref().unwrap_or_default();
            speaks_for.insert(service::key(ns, s.metadata.name.as_deref().unwrap_or_default()));
        }
        match service::egress_service(s, &index) {
            Ok(e) => input.services.push(e),
            Err(e) if speaks => invalid.push(e),
            Err(_) => {}
        }
    }
    Round { input: Gathered::Ready(input), invalid, speaks_for }
}

/// Publishes each distinct warning once, on the object it is about. A
/// changed message is a new Event: kube-runtime's Recorder would only
/// count the repeat and keep the first message, hiding the current reason.
struct Warnings {
    client: Client,
    node: String,
    said: HashMap<String, String>,
}

impl Warnings {
    async fn say(&mut self, about: ObjectReference, key: String, reason: &str, message: String) {
        if self.said.get(&key) == Some(&message) {
            return;
        }
        tracing::warn!(object = %key, reason, "{message}");
        if let Err(e) = self.publish(about, reason, &message).await {
            tracing::warn!(error = %e, "cannot publish Event");
        }
        self.said.insert(key, message);
    }

    async fn publish(&self, about: ObjectReference, reason: &str, note: &str) -> Result<(), kube::Error> {
        let who = Reporter { component: "node-agent".into(), instance: self.node.clone() };
        natgw_kube_support::events::warning(&self.client, &who, about, reason, "ProgramEgress", note).await
    }
}

fn node_ref(node: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node.into()),
        ..Default::default()
    }
}

fn service_ref(key: &str) -> ObjectReference {
    let (ns, name) = key.split_once('/').unwrap_or(("", key));
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        namespace: Some(ns.into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

/// Runs the node agent until `shutdown`; `health` serves /readyz and
/// /metrics when given.
pub async fn run(
    client: Client,
    cfg: Config,
    health: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let ns = cfg.netns.clone();
    let egress = Arc::new(tokio::task::spawn_blocking(move || Egress::open(ns.as_deref())).await??);
    let errors: Errors = Arc::default();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let all = watcher::Config::default;
    let (services, w1) = watch::<Service>(&client, all(), "Service", &errors, &tx);
    let (slices, w2) = watch::<EndpointSlice>(&client, all(), "EndpointSlice", &errors, &tx);
    let mine = all().fields(&format!("spec.nodeName={}", cfg.node));
    // This node's pods: an endpoint counts only as one of them, and
    // --fail-closed holds the ones a Service selects.
    let (pods, w3) = optional(Some(watch::<Pod>(&client, mine, "Pod", &errors, &tx)));
    let (nodes, w4) =
        optional(cfg.overrides.pod_cidrs.is_none().then(|| watch::<Node>(&client, all(), "Node", &errors, &tx)));
    let (service_cidrs, w5) = optional(
        cfg.overrides
            .service_cidrs
            .is_none()
            .then(|| watch::<ServiceCIDR>(&client, all(), "ServiceCIDR", &errors, &tx)),
    );
    let caches = Caches { services, slices, pods, nodes, service_cidrs, errors };
    let (metrics, probe) = health::Metrics::new();
    let server = {
        let probe = probe.clone();
        async move {
            match health {
                Some(l) => health::serve(l, probe).await,
                None => std::future::pending().await,
            }
        }
    };
    let watches = async {
        futures::join!(w1, w2, w3, w4, w5);
    };
    let mut warnings = Warnings { client: client.clone(), node: cfg.node.clone(), said: HashMap::new() };
    let work = async {
        let mut last_full: Option<Instant> = None;
        // Nothing is written before the first complete gather: an empty
        // plan from unlisted caches would drop fail-closed holds and a
        // table kept over a restart.
        let mut gathered = false;
        loop {
            // A round every second (TICK); stuck for five minutes is not
            // alive.
            probe.beat(Duration::from_secs(300));
            let e = egress.clone();
            let read = tokio::task::spawn_blocking(move || e.local_addresses()).await;
            let local = read.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string()));
            let round = match &local {
                Ok(local) => gather(&caches, &cfg, local),
                Err(e) => Round {
                    input: Gathered::Failed(format!("cannot read this node's addresses: {e}")),
                    invalid: vec![],
                    speaks_for: Default::default(),
                },
            };
            let full = last_full.is_none_or(|t| t.elapsed() >= cfg.resync);
            let known = match (&round.input, &local) {
                (Gathered::Ready(_), _) => Some(1),
                (Gathered::Failed(_), Ok(_)) => Some(0),
                _ => None,
            };
            if let Some(k) = known {
                metrics.cidrs_known.set(k);
            }
            let (tables, plan) = match &round.input {
                Gathered::Ready(input) => {
                    gathered = true;
                    let plan = plan_egress(input);
                    (plan.tables.clone(), plan)
                }
                // The agent's own failure never becomes "translate
                // nothing": the kernel keeps what the last good round
                // wrote (or, before any, what it holds), and the agent
                // says why in its readiness, a metric and an Event.
                Gathered::Failed(why) => {
                    let why = if gathered {
                        format!("egress keeps its last programmed state: {why}")
                    } else {
                        format!("egress is not programmed: {why}")
                    };
                    metrics.plan_kept.set(i64::from(gathered));
                    warnings
                        .say(node_ref(&cfg.node), format!("Node/{}", cfg.node), "EgressNotProgrammed", why.clone())
                        .await;
                    probe.not_ready(why);
                    let _ = tokio::time::timeout(TICK, rx.recv()).await;
                    continue;
                }
                Gathered::NotListed(why) => {
                    probe.not_ready(why.clone());
                    let _ = tokio::time::timeout(TICK, rx.recv()).await;
                    continue;
                }
            };
            metrics.plan_kept.set(0);
            warnings.said.remove(&format!("Node/{}", cfg.node));
            let mut current = std::collections::BTreeSet::new();
            for e in &round.invalid {
                current.insert(e.service.clone());
                warnings.say(service_ref(&e.service), e.service.clone(), "InvalidEgress", e.to_string()).await;
            }
            for (svc, why) in plan.conflicts.iter().filter(|(svc, _)| round.speaks_for.contains(svc.as_str())) {
                let key = format!("conflict {svc} {why}");
                current.insert(key.clone());
                warnings.say(service_ref(svc), key, "EgressConflict", why.clone()).await;
            }
            // What is fixed, deleted or moved away is forgotten: said again
            // if it comes back.
            warnings.said.retain(|k, _| k.starts_with("Node/") || current.contains(k));
            for (svc, ip) in &plan.not_pods {
                tracing::debug!(service = %svc, endpoint = %ip, "endpoint is not a pod address; not translated");
            }
            let e = egress.clone();
            let t = tables.clone();
            let result = tokio::task::spawn_blocking(move || if full { e.resync(&t) } else { e.sync(&t) }).await;
            let programmed = plan.services.values().filter(|s| matches!(s, ServiceState::Programmed { .. })).count();
            metrics.services(programmed, round.invalid.len());
            let translated = tables.snat_all.len()
                + tables.snat_ports.keys().map(|k| k.0).collect::<std::collections::BTreeSet<_>>().len();
            metrics.pods(translated, tables.hold.len());
            let failed = match result {
                Ok(Ok(report)) => {
                    metrics.sync(true);
                    metrics.last_sync_seconds.set(report.duration.as_secs_f64());
                    metrics.conntrack_deleted.inc_by(report.conntrack_deleted as u64);
                    if full {
                        last_full = Some(Instant::now());
                        health::set_now(&metrics.last_full_sync);
                    }
                    if report.changed {
                        tracing::info!(
                            ms = report.duration.as_millis() as u64,
                            statements = report.statements,
                            conntrack = report.conntrack_deleted,
                            translated,
                            held = tables.hold.len(),
                            "egress synced"
                        );
                    }
                    None
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "egress sync failed; retrying");
                    Some(format!("egress sync failed: {e}"))
                }
                Err(e) => Some(format!("egress sync failed: {e}")),
            };
            if failed.is_some() {
                metrics.sync(false);
            }
            match failed {
                Some(why) => probe.not_ready(why),
                None => probe.ready(),
            }
            let _ = tokio::time::timeout(TICK, rx.recv()).await;
        }
    };
    tokio::select! {
        _ = watches => {}
        _ = work => {}
        _ = server => {}
        _ = shutdown => {}
    }
    if cfg.keep_on_exit {
        tracing::info!("keeping the egress table for the next start (--keep-on-exit)");
        return Ok(());
    }
    if let Some((namespace, name)) = &cfg.daemonset {
        match exit::restarting(&client, namespace, name, &cfg.node).await {
            Ok(exit::Leaving::Restart) => {
                tracing::info!(daemonset = %name, "a restart: the egress table and its flows stay for the next agent");
                return Ok(());
            }
            Ok(exit::Leaving::End(why)) => tracing::info!(daemonset = %name, "{why}: removing the egress table"),
            Err(e) => tracing::warn!(
                daemonset = %name, error = %e,
                "cannot tell a restart from an uninstall: removing the egress table, so that nothing is left behind"
            ),
        }
    }
    let e = egress.clone();
    let report = tokio::task::spawn_blocking(move || e.teardown()).await??;
    tracing::info!(conntrack = report.conntrack_deleted, "egress removed");
    Ok(())
}
