//! Port accounting of the gateway's EIPs: every few seconds a conntrack
//! walk (on the namespace's sweeper thread, never in a change's way) feeds
//! bounded-cardinality metrics, and a Warning Event names an Eip whose
//! busiest destination crosses the saturation threshold.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use crate::store::Store;
use kube::Client;
use natgw_api::{Eip, HeldEip};
use natgw_dataplane::Gateway;
use natgw_dataplane::conntrack::ports::{EipUsage, proto_name};

use crate::metrics::Metrics;

/// Port accounting settings (`natgw agent --help`).
#[derive(clap::Args, Clone, Debug)]
pub struct PortArgs {
    /// Seconds between conntrack walks for port accounting; 0 turns it off.
    #[arg(long, env = "NATGW_PORT_ACCOUNTING_SECONDS", default_value_t = 15)]
    pub port_accounting_seconds: u64,
    /// Destinations exported per EIP and protocol (the busiest).
    #[arg(long, env = "NATGW_PORT_TOP_DESTINATIONS", default_value_t = 5)]
    pub port_top_destinations: usize,
    /// EIPs exported at most (the busiest); the rest are counted in
    /// natgw_port_metrics_eips_omitted.
    #[arg(long, env = "NATGW_PORT_METRICS_EIPS", default_value_t = 50)]
    pub port_metrics_eips: usize,
    /// Share of an (EIP, protocol, destination)'s source ports in use that
    /// raises a PortsSaturated Warning Event on the Eip.
    #[arg(long, env = "NATGW_PORT_SATURATION_WARNING", default_value_t = 0.8)]
    pub port_saturation_warning: f64,
    /// Translation logs: `off`, `stdout`, or a file path (rotated). One
    /// JSON line per translation created and ended.
    #[arg(long, env = "NATGW_TRANSLATION_LOG", default_value = "off")]
    pub translation_log: String,
    /// Translation log lines per second at most; the rest are counted in
    /// natgw_translation_log_dropped_total{reason="rate"}.
    #[arg(long, env = "NATGW_TRANSLATION_LOG_RATE", default_value_t = 50_000)]
    pub translation_log_rate: u32,
    /// Of those, for any one EIP at most: one tenant's burst does not
    /// spend its gateway's whole budget.
    #[arg(long, env = "NATGW_TRANSLATION_LOG_EIP_RATE", default_value_t = 5_000)]
    pub translation_log_eip_rate: u32,
    /// A log file is rotated at this size (MB), keeping
    /// --translation-log-keep old files.
    #[arg(long, env = "NATGW_TRANSLATION_LOG_MAX_MB", default_value_t = 100)]
    pub translation_log_max_mb: u64,
    #[arg(long, env = "NATGW_TRANSLATION_LOG_KEEP", default_value_t = 5)]
    pub translation_log_keep: usize,
}

impl Default for PortArgs {
    fn default() -> Self {
        PortArgs {
            port_accounting_seconds: 15,
            port_top_destinations: 5,
            port_metrics_eips: 50,
            port_saturation_warning: 0.8,
            translation_log: "off".into(),
            translation_log_rate: 50_000,
            translation_log_eip_rate: 5_000,
            translation_log_max_mb: 100,
            translation_log_keep: 5,
        }
    }
}

impl PortArgs {
    /// Refuses settings that cannot work, naming the flag.
    pub fn check(&self) -> Result<(), String> {
        if !(self.port_saturation_warning > 0.0 && self.port_saturation_warning <= 1.0) {
            return Err(format!(
                "--port-saturation-warning {}: must be above 0 and at most 1",
                self.port_saturation_warning
            ));
        }
        if self.port_top_destinations == 0 || self.port_metrics_eips == 0 {
            return Err("--port-top-destinations and --port-metrics-eips must be at least 1".into());
        }
        if self.translation_log.is_empty()
            || self.translation_log_rate == 0
            || self.translation_log_eip_rate == 0
            || self.translation_log_max_mb == 0
        {
            return Err("--translation-log must be off, stdout or a path, with rates and a size above 0".into());
        }
        Ok(())
    }

    /// The translation log's rates.
    pub fn translation_rates(&self) -> natgw_dataplane::conntrack::translog::Rates {
        natgw_dataplane::conntrack::translog::Rates {
            total: self.translation_log_rate,
            per_eip: self.translation_log_eip_rate,
        }
    }

    /// Where translation logs go, or `None` when off.
    pub fn translation_sink(&self) -> Option<natgw_dataplane::conntrack::translog::Sink> {
        use natgw_dataplane::conntrack::translog::Sink;
        match self.translation_log.as_str() {
            "off" => None,
            "stdout" => Some(Sink::Stdout),
            path => Some(Sink::file(path.into(), self.translation_log_max_mb << 20, self.translation_log_keep)),
        }
    }
}

/// The Eip holding `ip`, from the cache.
fn eip_named(eips: &Store<Eip>, ip: Ipv4Addr) -> Option<Arc<HeldEip>> {
    eips.state().into_iter().find(|e| e.status.or(e.spec.ip) == Some(ip))
}

pub async fn run(client: Client, gateway: Arc<Gateway>, eips: Store<Eip>, metrics: Metrics, args: PortArgs) {
    if args.port_accounting_seconds == 0 {
        return std::future::pending().await;
    }
    let reporter = natgw_kube_support::events::Reporter {
        component: "gateway-agent".into(),
        instance: std::env::var("POD_NAME").unwrap_or_else(|_| "natgw-agent".into()),
    };
    // Warned once per crossing: again only after it fell below.
    let mut saturated: BTreeSet<(Ipv4Addr, u8)> = BTreeSet::new();
    loop {
        tokio::time::sleep(Duration::from_secs(args.port_accounting_seconds)).await;
        let g = gateway.clone();
        let top = args.port_top_destinations;
        let report = match tokio::task::spawn_blocking(move || g.port_usage(top)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "port accounting failed");
                continue;
            }
            Err(_) => continue,
        };
        metrics.ports(&report, args.port_metrics_eips);
        let now: BTreeSet<(Ipv4Addr, u8)> = report
            .usage
            .iter()
            .filter(|u| u.saturation() >= args.port_saturation_warning)
            .map(|u| (u.eip, u.proto))
            .collect();
        for u in
            report.usage.iter().filter(|u| now.contains(&(u.eip, u.proto)) && !saturated.contains(&(u.eip, u.proto)))
        {
            warn(&client, &reporter, &eips, u).await;
        }
        saturated = now;
    }
}

async fn warn(client: &Client, reporter: &natgw_kube_support::events::Reporter, eips: &Store<Eip>, u: &EipUsage) {
    let Some((dest, n)) = u.destinations.first() else { return };
    let note = format!(
        "EIP {} has {n} {} connections to {}:{} ({:.0}% of the {} source ports); new connections to it will fail",
        u.eip,
        proto_name(u.proto),
        dest.addr,
        dest.port,
        u.saturation() * 100.0,
        natgw_dataplane::conntrack::ports::PORTS
    );
    tracing::warn!(eip = %u.eip, "{note}");
    let Some(eip) = eip_named(eips, u.eip) else { return };
    let regarding = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("natgw.io/v1alpha1".into()),
        kind: Some("Eip".into()),
        name: Some(eip.name().into()),
        uid: eip.meta.uid.as_ref().map(|u| u.to_string()),
        ..Default::default()
    };
    if let Err(e) =
        natgw_kube_support::events::warning(client, reporter, regarding, "PortsSaturated", "Translate", &note).await
    {
        tracing::info!(error = %e, "cannot publish the PortsSaturated Event");
    }
}
