//! The agent's /metrics and readiness: ready once its caches listed and
//! its first full sync is in the kernel.

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
        (m, Probe::new(r))
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

    pub fn failed(&self) {
        self.syncs_failed.inc();
    }
}
