//! The agent's /metrics and readiness: ready once its caches listed and
//! its first full sync is in the kernel.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;

use natgw_kube_support::health::{Labels, Probe, labels, set_now};
use natgw_plan::GatewayPlan;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone)]
pub struct Metrics {
    sync_seconds: Histogram,
    objects: Family<Labels, Gauge>,
    conntrack_deleted: Counter,
    syncs_failed: Counter,
    last_full_sync: Gauge<f64, AtomicU64>,
    eip_connections: Family<Labels, Gauge>,
    destination_connections: Family<Labels, Gauge>,
    port_saturation: Family<Labels, Gauge<f64, AtomicU64>>,
    insert_failures: Counter,
    /// The kernel's cumulative count at the last read.
    insert_failures_seen: std::sync::Arc<AtomicU64>,
    eips_omitted: Gauge,
    translation_lines: Family<Labels, Counter>,
    status_writes: Family<Labels, Counter>,
    forward_dropped: Family<Labels, Counter>,
    watch_events: Family<Labels, Counter>,
    /// The kernel's counts at the last read, by direction.
    forward_seen: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>>,
}

impl Metrics {
    pub fn new() -> (Metrics, Probe) {
        let m = Metrics {
            // 1 ms to about 16 s.
            sync_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            objects: Family::default(),
            conntrack_deleted: Counter::default(),
            syncs_failed: Counter::default(),
            last_full_sync: Gauge::default(),
            eip_connections: Family::default(),
            destination_connections: Family::default(),
            port_saturation: Family::default(),
            insert_failures: Counter::default(),
            insert_failures_seen: Default::default(),
            eips_omitted: Gauge::default(),
            translation_lines: Family::default(),
            status_writes: Family::default(),
            forward_dropped: Family::default(),
            watch_events: Family::default(),
            forward_seen: Default::default(),
        };
        let mut r = Registry::default();
        r.register("natgw_sync_duration_seconds", "Duration of a gateway sync", m.sync_seconds.clone());
        r.register("natgw_objects", "Objects of this gateway by kind and state", m.objects.clone());
        r.register("natgw_conntrack_deleted", "Conntrack entries deleted by sweeps", m.conntrack_deleted.clone());
        r.register("natgw_syncs_failed", "Rounds that failed (planning, API or kernel)", m.syncs_failed.clone());
        r.register(
            "natgw_last_full_sync_timestamp_seconds",
            "When the kernel was last read and repaired whole (Unix time)",
            m.last_full_sync.clone(),
        );
        r.register(
            "natgw_eip_connections",
            "Translated connections per EIP and protocol (the busiest EIPs; see natgw_port_metrics_eips_omitted)",
            m.eip_connections.clone(),
        );
        r.register(
            "natgw_eip_destination_connections",
            "Connections leaving through an EIP to its busiest destinations (address:port), top K per EIP and protocol",
            m.destination_connections.clone(),
        );
        r.register(
            "natgw_eip_port_saturation",
            "Share of the source ports in use towards an EIP's busiest destination (1 = no port left)",
            m.port_saturation.clone(),
        );
        r.register(
            "natgw_nat_insert_failures",
            "Conntrack insert failures: packets dropped because no translated source port was free",
            m.insert_failures.clone(),
        );
        r.register(
            "natgw_port_metrics_eips_omitted",
            "EIPs with connections left out of the per-EIP metrics by the cardinality limit",
            m.eips_omitted.clone(),
        );
        r.register(
            "natgw_translation_log_lines",
            "Translation log lines since start, by outcome: written, or dropped over the rate, lost by the kernel's event queue, refused by the destination",
            m.translation_lines.clone(),
        );
        r.register(
            "natgw_status_writes",
            "Status writes by outcome (written, failed); a steady gateway, or one restarted over written statuses, adds none",
            m.status_writes.clone(),
        );
        r.register(
            "natgw_forward_dropped",
            "Packets the gateway refused to forward untranslated, by the side they came from (lan, external, other: another interface toward either)",
            m.forward_dropped.clone(),
        );
        r.register(
            "natgw_watch_events",
            "Objects the agent's watches received, by kind (listed, changed or deleted); they follow its own gateway's objects, not the cluster's",
            m.watch_events.clone(),
        );
        (m, Probe::new(r))
    }

    /// The counter of objects a watch of `kind` received.
    pub fn received(&self, kind: &str) -> Counter {
        self.watch_events.get_or_create(&labels(&[("kind", kind)])).clone()
    }

    pub fn swept(&self, conntrack_deleted: usize) {
        self.conntrack_deleted.inc_by(conntrack_deleted as u64);
    }

    pub fn synced(&self, seconds: f64, full: bool, plan: &GatewayPlan) {
        self.sync_seconds.observe(seconds);
        if full {
            set_now(&self.last_full_sync);
        }
        self.objects.clear();
        for r in &plan.programmed {
            self.objects.get_or_create(&labels(&[("kind", r.kind.as_str()), ("state", "programmed")])).inc();
        }
        for c in plan.conflicts.iter().filter(|c| !c.pending) {
            self.objects.get_or_create(&labels(&[("kind", c.object.kind.as_str()), ("state", "conflict")])).inc();
        }
    }

    /// Replaces the port series with `report`'s, at most `max_eips` EIPs
    /// (the busiest): the label sets stay bounded.
    pub fn ports(&self, report: &natgw_dataplane::PortReport, max_eips: usize) {
        use std::sync::atomic::Ordering;
        self.eip_connections.clear();
        self.destination_connections.clear();
        self.port_saturation.clear();
        let mut eips = BTreeSet::new();
        for u in &report.usage {
            if !eips.contains(&u.eip) && eips.len() >= max_eips {
                continue;
            }
            eips.insert(u.eip);
            let (eip, proto) = (u.eip.to_string(), natgw_dataplane::conntrack::ports::proto_name(u.proto));
            let base = [("eip", eip.as_str()), ("proto", proto.as_str())];
            self.eip_connections.get_or_create(&labels(&base)).set(i64::from(u.connections));
            self.port_saturation.get_or_create(&labels(&base)).set(u.saturation());
            for (d, n) in &u.destinations {
                let dest = format!("{}:{}", d.addr, d.port);
                let l = labels(&[base[0], base[1], ("destination", dest.as_str())]);
                self.destination_connections.get_or_create(&l).set(i64::from(*n));
            }
        }
        let all: BTreeSet<_> = report.usage.iter().map(|u| u.eip).collect();
        self.eips_omitted.set((all.len() - eips.len()) as i64);
        if let Some(total) = report.insert_failures {
            let before = self.insert_failures_seen.swap(total, Ordering::Relaxed);
            self.insert_failures.inc_by(total.saturating_sub(before));
        }
    }

    /// Exposes a translation log's counts, copied every second: the log's
    /// thread never touches the registry.
    pub fn translation_log(&self, counts: std::sync::Arc<natgw_dataplane::conntrack::translog::Counts>) {
        let family = self.translation_lines.clone();
        tokio::spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            let mut seen = [0u64; 4];
            loop {
                for (i, (outcome, n)) in [
                    ("written", &counts.written),
                    ("dropped_rate", &counts.dropped_rate),
                    ("dropped_kernel", &counts.dropped_kernel),
                    ("dropped_write", &counts.dropped_write),
                ]
                .into_iter()
                .enumerate()
                {
                    let now = n.load(Relaxed);
                    family.get_or_create(&labels(&[("outcome", outcome)])).inc_by(now.saturating_sub(seen[i]));
                    seen[i] = now;
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
    }

    /// Adds what the kernel's drop counters gained since the last read; a
    /// count lower than before means the table was written anew.
    pub fn forward_dropped(&self, now: &std::collections::BTreeMap<&'static str, u64>) {
        let mut seen = self.forward_seen.lock().unwrap_or_else(|p| p.into_inner());
        for (direction, n) in now {
            let before = seen.insert(direction, *n).unwrap_or(0);
            let gained = if *n >= before { n - before } else { *n };
            self.forward_dropped.get_or_create(&labels(&[("direction", direction)])).inc_by(gained);
        }
    }

    pub fn status_written(&self, ok: bool) {
        let outcome = if ok { "written" } else { "failed" };
        self.status_writes.get_or_create(&labels(&[("outcome", outcome)])).inc();
    }

    pub fn failed(&self) {
        self.syncs_failed.inc();
    }
}
