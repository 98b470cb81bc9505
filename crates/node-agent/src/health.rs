//! The node agent's metrics and readiness, served by
//! `natgw_kube_support::health` (`/healthz`, `/readyz`, `/metrics`).

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use natgw_kube_support::health::{Labels, labels};
pub use natgw_kube_support::health::{Probe, get_blocking as get, serve, set_now};

/// Everything the node agent reports.
#[derive(Clone, Default)]
pub struct Metrics {
    pub cidrs_known: Gauge,
    syncs: Family<Labels, Counter>,
    pub last_sync_seconds: Gauge<f64, AtomicU64>,
    pub last_full_sync: Gauge<f64, AtomicU64>,
    services: Family<Labels, Gauge>,
    pods: Family<Labels, Gauge>,
    pub conntrack_deleted: Counter,
    pub plan_kept: Gauge,
}

impl Metrics {
    /// The metrics and a probe serving them.
    pub fn new() -> (Metrics, Probe) {
        let m = Metrics::default();
        let mut r = Registry::default();
        r.register(
            "natgw_egress_cidrs_known",
            "1 when the pod and service CIDRs are known; 0 means no egress is programmed",
            m.cidrs_known.clone(),
        );
        r.register("natgw_egress_syncs", "Syncs of the egress table, by result", m.syncs.clone());
        r.register("natgw_egress_last_sync_seconds", "Duration of the last sync", m.last_sync_seconds.clone());
        r.register(
            "natgw_egress_last_full_sync_timestamp_seconds",
            "When the table was last written whole (Unix time)",
            m.last_full_sync.clone(),
        );
        r.register("natgw_egress_services", "Egress Services, by state", m.services.clone());
        r.register("natgw_egress_pods", "Pods translated or held", m.pods.clone());
        r.register("natgw_egress_conntrack_deleted", "Conntrack entries deleted", m.conntrack_deleted.clone());
        r.register(
            "natgw_egress_plan_kept",
            "1 while the agent cannot compute the egress plan (addresses, cluster CIDRs) and keeps what it last programmed",
            m.plan_kept.clone(),
        );
        (m, Probe::new(r))
    }

    pub fn sync(&self, ok: bool) {
        self.syncs.get_or_create(&labels(&[("result", if ok { "ok" } else { "error" })])).inc();
    }

    pub fn services(&self, programmed: usize, invalid: usize) {
        self.services.get_or_create(&labels(&[("state", "programmed")])).set(programmed as i64);
        self.services.get_or_create(&labels(&[("state", "invalid")])).set(invalid as i64);
    }

    pub fn pods(&self, translated: usize, held: usize) {
        self.pods.get_or_create(&labels(&[("state", "translated")])).set(translated as i64);
        self.pods.get_or_create(&labels(&[("state", "held")])).set(held as i64);
    }
}
