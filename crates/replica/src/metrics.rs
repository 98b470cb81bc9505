//! A replica's metrics, for whichever role serves them (`natgw run
//! --metrics-addr`; the agent once it runs replicas).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Why a replica took the addresses: a bounded label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Takeover {
    /// The active handed over (a planned stop).
    Handover,
    /// The active said it let go (a link or its router lost).
    LetGo,
    /// The active fell silent (its pod, agent or node gone).
    Silent,
    /// No active was heard since this replica started.
    Start,
}

impl Takeover {
    pub fn label(self) -> &'static str {
        match self {
            Takeover::Handover => "handover",
            Takeover::LetGo => "let_go",
            Takeover::Silent => "silent",
            Takeover::Start => "start",
        }
    }
}

#[derive(Clone, Default)]
pub struct Metrics {
    labels: Labels,
    active: Family<Labels, Gauge>,
    takeovers: Family<Labels, Counter>,
    peer_heard: Family<Labels, Gauge>,
    sessions_held: Family<Labels, Gauge>,
    sessions_installed: Family<Labels, Gauge>,
    events_lost: Family<Labels, Counter>,
    refused: Family<Labels, Counter>,
}

impl Metrics {
    /// The metrics of replica `replica` of gateway `gateway`, registered.
    pub fn new(registry: &mut Registry, gateway: &str, replica: &str) -> Metrics {
        let m = Metrics {
            labels: vec![("gateway".into(), gateway.into()), ("replica".into(), replica.into())],
            ..Default::default()
        };
        registry.register(
            "natgw_gateway_active",
            "1 while this replica holds the gateway's addresses",
            m.active.clone(),
        );
        registry.register(
            "natgw_gateway_takeovers",
            "Times this replica took the addresses, by why (handover, let_go, silent, start)",
            m.takeovers.clone(),
        );
        registry.register("natgw_replica_peer_heard", "1 while the peer's adverts are heard", m.peer_heard.clone());
        registry.register(
            "natgw_replica_sessions_held",
            "Connections received from the peer, ready to install at a takeover (the replication backlog)",
            m.sessions_held.clone(),
        );
        registry.register(
            "natgw_replica_sessions_installed",
            "Connections installed at the last takeover",
            m.sessions_installed.clone(),
        );
        registry.register(
            "natgw_replica_events_lost",
            "Times the kernel dropped conntrack events before they were streamed (each time a whole dump follows)",
            m.events_lost.clone(),
        );
        registry.register(
            "natgw_replica_refused",
            "Adverts and streams refused (unsigned, replayed, from no peer), by what",
            m.refused.clone(),
        );
        m
    }

    fn with(&self, extra: &[(&str, &str)]) -> Labels {
        let mut l = self.labels.clone();
        l.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        l
    }

    pub(crate) fn took(&self, why: Takeover, installed: usize) {
        self.takeovers.get_or_create(&self.with(&[("reason", why.label())])).inc();
        self.sessions_installed.get_or_create(&self.labels).set(installed as i64);
    }

    /// Brings the gauges and counters to what `s` says.
    pub(crate) fn observe(&self, s: &crate::Status) {
        let gauge = |f: &Family<Labels, Gauge>, v: i64| {
            f.get_or_create(&self.labels).set(v);
        };
        gauge(&self.active, i64::from(s.role == natgw_ha::Role::Active));
        gauge(&self.peer_heard, i64::from(s.peer_alive));
        gauge(&self.sessions_held, s.sessions_held as i64);
        let catch_up = |c: &Counter, to: u64| {
            let now = c.get();
            if to > now {
                c.inc_by(to - now);
            }
        };
        catch_up(&self.events_lost.get_or_create(&self.labels), s.sessions_lost_events);
        catch_up(&self.refused.get_or_create(&self.with(&[("what", "advert")])), s.refused_datagrams);
        catch_up(&self.refused.get_or_create(&self.with(&[("what", "stream")])), s.refused_streams);
    }
}
