//! One replica of an HA gateway: the edges around `natgw-ha`'s state
//! machine. A driver thread feeds it the adverts heard on the heartbeat
//! socket, the gateway's links, the answers to its ARP probes and a tick
//! every 10 ms, and carries out what it answers: send an advert, probe,
//! take the addresses (installing the peer's connections first), drop
//! them.
//!
//! The caller's sync loop goes through [`Replica::sync`]: the kernel gets
//! the whole plan while this replica holds the addresses, and the plan
//! without addresses (`GatewayPlan::standby`) otherwise. One lock covers
//! the role and the sync, so a takeover never races a sync of the other
//! role.
//!
//! The heartbeat and the connection stream must not use the gateway's LAN
//! or external interface: natgw's input chain refuses everything there
//! but replies and ICMP (so that no tenant reaches the gateway, nor could
//! forge an advert). A dedicated link between the replicas, or the pod
//! network, carries them.

pub mod auth;
mod heartbeat;
pub mod metrics;
pub mod stream;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use natgw_dataplane::conntrack::Conntrack;
use natgw_dataplane::netns::NetnsWorker;
use natgw_dataplane::route::Links;
use natgw_dataplane::route::probe::Prober;
use natgw_dataplane::{Gateway, SyncError, SyncReport};
use natgw_ha::{Action, Event, Role};
use natgw_plan::GatewayPlan;

use heartbeat::Heartbeat;
use metrics::Takeover;
use stream::{Received, Sent};

/// How a replica is set up.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The NatGateway: adverts of other gateways on the same path are
    /// ignored.
    pub gateway: String,
    /// This replica's name, unique within the gateway.
    pub name: String,
    /// Higher takes over first after a start, and wins ties.
    pub priority: u8,
    /// This replica's address on the heartbeat path: UDP for adverts and
    /// TCP for the connection stream, both on this port.
    pub listen: SocketAddrV4,
    pub peers: Vec<SocketAddrV4>,
    pub advert_ms: u64,
    pub dead_ms: u64,
    pub probe_ms: u64,
    /// The gateway's LAN and external interfaces: the heartbeat must not
    /// use them.
    pub tenant_interfaces: [String; 2],
    /// Shared by the replicas: signs adverts and opens the stream.
    pub key: auth::Key,
}

impl std::fmt::Debug for auth::Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("the heartbeat address {0}: {1}")]
    Listen(SocketAddrV4, String),
    #[error(
        "the heartbeat address {addr} is on interface {interface}, the gateway's {side} interface: natgw's input chain refuses everything there but replies and ICMP (no tenant may reach the gateway); give the replicas a link of their own, or the pod network"
    )]
    TenantSide { addr: Ipv4Addr, interface: String, side: &'static str },
    #[error("no peers: give the address of the other replica's heartbeat")]
    NoPeers,
    #[error("{0} is not a timer that works: {1}")]
    Timers(&'static str, String),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error("namespace: {0}")]
    Netns(String),
}

/// What a replica reports: for logs, status and metrics.
#[derive(Clone, Debug)]
pub struct Status {
    pub role: Role,
    pub term: u64,
    /// When it last took or dropped the addresses.
    pub since: SystemTime,
    /// Why the last change happened.
    pub reason: String,
    pub takeovers: u64,
    /// Probes of a suspecting standby that found the addresses held: the
    /// fence at work (a frozen peer, a cut heartbeat path).
    pub fenced: u64,
    /// Both of the gateway's links up (`None` before the first look).
    pub links_up: Option<bool>,
    /// The peer last heard, and how long ago.
    pub peer: Option<(String, Duration)>,
    /// The peer was heard within the dead interval.
    pub peer_alive: bool,
    /// Connections received from the peer, ready to install.
    pub sessions_held: usize,
    /// Connections installed by the last takeover.
    pub sessions_installed: usize,
    pub sessions_lost_events: u64,
    pub refused_datagrams: u64,
    /// Stream connections that did not prove the key.
    pub refused_streams: u64,
}

pub fn role_name(r: Role) -> &'static str {
    match r {
        Role::Standby => "standby",
        Role::Probing => "probing",
        Role::Active => "active",
        Role::Stopped => "stopped",
    }
}

/// Whether the kernel holds the addresses, and the plan in force.
struct Held {
    holds: bool,
    plan: Option<Arc<GatewayPlan>>,
}

struct Shared {
    settings: Settings,
    metrics: metrics::Metrics,
    gw: Arc<Gateway>,
    held: Mutex<Held>,
    status: Mutex<Status>,
    received: Arc<Received>,
    sent: Arc<Sent>,
    stop: Arc<AtomicBool>,
}

/// A running replica. Dropping it without [`Replica::stop`] stops its
/// threads without handing over (what a crash does).
pub struct Replica {
    shared: Arc<Shared>,
    planned_stop: mpsc::Sender<mpsc::Sender<()>>,
    driver: Option<std::thread::JoinHandle<()>>,
}

/// The connections installed at a takeover live this long without
/// traffic (traffic then keeps them as the kernel keeps any).
const TCP_TIMEOUT_SECS: u32 = 7200;
const UDP_TIMEOUT_SECS: u32 = 180;

fn check(settings: &Settings) -> Result<(), ReplicaError> {
    if settings.peers.is_empty() {
        return Err(ReplicaError::NoPeers);
    }
    let t = |what, why: String| Err(ReplicaError::Timers(what, why));
    if settings.advert_ms == 0 || settings.advert_ms > 10_000 {
        return t("the advert interval", format!("{} ms (1 to 10000)", settings.advert_ms));
    }
    if settings.dead_ms < 2 * settings.advert_ms {
        return t(
            "the dead interval",
            format!(
                "{} ms with adverts every {} ms: one lost advert would start a takeover (give at least twice the advert interval)",
                settings.dead_ms, settings.advert_ms
            ),
        );
    }
    if settings.probe_ms < 10 || settings.probe_ms > settings.dead_ms {
        return t("the probe wait", format!("{} ms (10 to the dead interval)", settings.probe_ms));
    }
    Ok(())
}

impl Replica {
    /// Starts the replica of the gateway in namespace `netns` (`None`: the
    /// current one). Call before the first sync: a replica whose kernel
    /// still holds the addresses (its agent was killed and restarted)
    /// resumes holding them, and the first sync must not drop them.
    pub fn start(
        settings: Settings,
        gw: Arc<Gateway>,
        netns: Option<PathBuf>,
        metrics: metrics::Metrics,
    ) -> Result<Replica, ReplicaError> {
        check(&settings)?;
        let worker = NetnsWorker::start(netns.clone()).map_err(|e| ReplicaError::Netns(e.to_string()))?;
        let listen = settings.listen;
        let (udp, tcp) = worker
            .run(move || Ok::<_, std::io::Error>((UdpSocket::bind(listen)?, TcpListener::bind(listen)?)))
            .map_err(|e| ReplicaError::Netns(e.to_string()))?
            .map_err(|e| ReplicaError::Listen(listen, e.to_string()))?;
        let (ip, tenant) = (*listen.ip(), settings.tenant_interfaces.clone());
        let on = worker
            .run(move || {
                let links = Links::open().ok()?;
                let names = links.interfaces().ok()?.into_iter().map(|(n, i)| (i.index, n)).collect();
                let addresses = links.addresses(&names).ok()?;
                addresses.into_keys().find(|a| a.addr.addr() == ip).map(|a| a.interface.to_string())
            })
            .map_err(|e| ReplicaError::Netns(e.to_string()))?;
        if let Some(interface) = on
            && let Some(side) = tenant.iter().position(|t| *t == interface)
        {
            return Err(ReplicaError::TenantSide { addr: ip, interface, side: ["LAN", "external"][side] });
        }
        let heartbeat = Heartbeat::new(
            udp,
            &settings.gateway,
            settings.peers.clone(),
            settings.key.clone(),
            Duration::from_millis(10),
        )
        .map_err(|e| ReplicaError::Listen(listen, e.to_string()))?;
        let holds = !gw.snapshot()?.locals.is_empty();
        let now = SystemTime::now();
        let shared = Arc::new(Shared {
            settings: settings.clone(),
            metrics,
            gw,
            held: Mutex::new(Held { holds, plan: None }),
            status: Mutex::new(Status {
                role: if holds { Role::Active } else { Role::Standby },
                term: 0,
                since: now,
                reason: if holds { "resumed: the kernel holds the addresses".into() } else { "started".into() },
                takeovers: 0,
                fenced: 0,
                links_up: None,
                peer: None,
                peer_alive: false,
                sessions_held: 0,
                sessions_installed: 0,
                sessions_lost_events: 0,
                refused_datagrams: 0,
                refused_streams: 0,
            }),
            received: Arc::new(Received::default()),
            sent: Arc::new(Sent::default()),
            stop: Arc::new(AtomicBool::new(false)),
        });
        let peers: Vec<Ipv4Addr> = settings.peers.iter().map(|p| *p.ip()).collect();
        let (received, stop, key) = (shared.received.clone(), shared.stop.clone(), settings.key.clone());
        natgw_dataplane::netns::detached(netns.clone(), move || stream::receive(tcp, peers, key, received, stop))
            .map_err(|e| ReplicaError::Netns(e.to_string()))?;
        for peer in settings.peers.clone() {
            let (sent, stop, key) = (shared.sent.clone(), shared.stop.clone(), settings.key.clone());
            natgw_dataplane::netns::detached(netns.clone(), move || stream::send(peer, key, sent, stop))
                .map_err(|e| ReplicaError::Netns(e.to_string()))?;
        }
        let (planned_stop, stops) = mpsc::channel();
        let driver = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("natgw-replica".into())
                .spawn(move || Driver::new(shared, heartbeat, worker, holds).run(stops))
                .map_err(|e| ReplicaError::Netns(e.to_string()))?
        };
        tracing::info!(
            replica = %settings.name,
            listen = %settings.listen,
            role = if holds { "active (resumed)" } else { "standby" },
            "replica started"
        );
        Ok(Replica { shared, planned_stop, driver: Some(driver) })
    }

    /// Syncs `plan` (a kernel read first when `read_kernel`): whole while
    /// this replica holds the addresses, without them otherwise.
    pub fn sync(&self, plan: &GatewayPlan, read_kernel: bool) -> Result<SyncReport, SyncError> {
        let mut held = self.shared.held.lock().unwrap_or_else(|p| p.into_inner());
        check_addresses(&self.shared.settings, plan);
        held.plan = Some(Arc::new(plan.clone()));
        let standby;
        let effective = if held.holds {
            plan
        } else {
            standby = plan.standby();
            &standby
        };
        if read_kernel { self.shared.gw.resync(effective) } else { self.shared.gw.sync(effective) }
    }

    /// Whether this replica holds the addresses now.
    pub fn holds(&self) -> bool {
        self.shared.held.lock().unwrap_or_else(|p| p.into_inner()).holds
    }

    pub fn status(&self) -> Status {
        // The driver's report keeps it current every 10 ms.
        self.shared.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A planned stop: an active replica drops its addresses, then tells
    /// the peer to take over at once; then every thread stops.
    pub fn stop(mut self) {
        let (done, wait) = mpsc::channel();
        if self.planned_stop.send(done).is_ok() {
            let _ = wait.recv_timeout(Duration::from_secs(5));
        }
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(d) = self.driver.take() {
            let _ = d.join();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// Says once if a plan's LAN address is missing: a gateway run as a
/// replica moves it, so its objects must ask for replicas.
fn check_addresses(settings: &Settings, plan: &GatewayPlan) {
    static SAID: AtomicBool = AtomicBool::new(false);
    let lan = plan.addresses_on(&plan.lan_interface).next().is_some();
    if !lan && !SAID.swap(true, Ordering::Relaxed) {
        tracing::error!(
            gateway = %settings.gateway,
            "run as a replica, but the plan holds no LAN address to move: set spec.replicas: 2 and spec.lanIp on the NatGateway"
        );
    }
}

/// The addresses a probe asks for: the LAN address and a few EIPs (all
/// move together, so a few tell who holds them), per interface.
fn probe_targets(plan: &GatewayPlan) -> Vec<(String, Vec<Ipv4Addr>)> {
    let on = |interface: &str| {
        let ips: Vec<Ipv4Addr> = plan.addresses_on(interface).map(|a| a.addr.addr()).take(4).collect();
        (interface.to_string(), ips)
    };
    let mut out = vec![on(&plan.lan_interface), on(&plan.external_interface)];
    out.retain(|(_, ips)| !ips.is_empty());
    out
}

/// The external router counts as lost after this many unanswered probes
/// in a row (one every 100 ms); one answer brings it back.
const ROUTER_MISSES: u32 = 3;

/// Whether the external router answers, as the upstream watcher last saw.
#[derive(Default)]
struct Upstream {
    misses: std::sync::atomic::AtomicU32,
}

/// ARP-probes the external router every 100 ms, for as long as the replica
/// runs: an active whose link is up but whose switch port or path to the
/// router is gone cannot serve, and must say so (keepalived tracks its
/// gateway for the same reason).
fn watch_upstream(shared: Arc<Shared>, worker: Arc<NetnsWorker>, upstream: Arc<Upstream>) {
    let mut prober: Option<(String, Prober)> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let plan = shared.held.lock().unwrap_or_else(|p| p.into_inner()).plan.clone();
        if let Some((plan, router)) = plan.and_then(|p| upstream_of(&p).map(|r| (p, r))) {
            let external = plan.external_interface.clone();
            if prober.as_ref().is_none_or(|(i, _)| *i != external) {
                let name = external.clone();
                prober = worker.run(move || Prober::on(&name)).ok().and_then(Result::ok).map(|p| (external, p));
            }
            let answered = prober
                .as_ref()
                .is_some_and(|(_, p)| matches!(p.probe(&[router], Duration::from_millis(90)), Ok(Some(_))));
            if answered {
                upstream.misses.store(0, Ordering::Relaxed);
            } else {
                upstream.misses.fetch_add(1, Ordering::Relaxed);
                // A prober on an interface that went away is opened anew.
                prober = None;
            }
        }
        if let Some(rest) = Duration::from_millis(100).checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

/// The external router: the default route's next hop.
fn upstream_of(plan: &GatewayPlan) -> Option<Ipv4Addr> {
    plan.routes.iter().find(|r| r.dst.prefix_len() == 0 && r.interface == plan.external_interface).map(|r| r.via)
}

fn ms_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

struct Driver {
    shared: Arc<Shared>,
    heartbeat: Heartbeat,
    /// Probes and link checks, in the namespace, off the gateway's sync
    /// thread (a long sync must not hold up a probe).
    worker: Arc<NetnsWorker>,
    machine: natgw_ha::Replica,
    clock: Instant,
    probing: bool,
    probes: (mpsc::Sender<bool>, mpsc::Receiver<bool>),
    links_up: Option<bool>,
    links_checked: Option<Instant>,
    peer: Option<(String, Instant)>,
    cause: Option<Cause>,
    upstream: Arc<Upstream>,
}

/// Why a standby takes over: the last telling thing its peer said.
enum Cause {
    HandedOver(String),
    LetGo(String),
    /// Heard active, last at this instant.
    Active(String, Instant),
}

impl Driver {
    fn new(shared: Arc<Shared>, heartbeat: Heartbeat, worker: NetnsWorker, holds: bool) -> Driver {
        let s = &shared.settings;
        let cfg = natgw_ha::Config {
            name: s.name.clone(),
            priority: s.priority,
            advert_ms: s.advert_ms,
            dead_ms: s.dead_ms,
            probe_ms: s.probe_ms,
        };
        let machine = if holds { natgw_ha::Replica::resume(cfg, 0, 0) } else { natgw_ha::Replica::new(cfg, 0) };
        Driver {
            shared,
            heartbeat,
            worker: Arc::new(worker),
            machine,
            clock: Instant::now(),
            probing: false,
            probes: mpsc::channel(),
            links_up: None,
            links_checked: None,
            peer: None,
            cause: None,
            upstream: Arc::new(Upstream::default()),
        }
    }

    fn run(mut self, stops: mpsc::Receiver<mpsc::Sender<()>>) {
        {
            let (shared, worker, upstream) = (self.shared.clone(), self.worker.clone(), self.upstream.clone());
            std::thread::spawn(move || watch_upstream(shared, worker, upstream));
        }
        while !self.shared.stop.load(Ordering::Relaxed) {
            if let Ok(done) = stops.try_recv() {
                let to = self.peer.as_ref().map(|(name, _)| name.clone());
                self.feed(Event::Stop { to });
                let _ = done.send(());
                return;
            }
            // Waits up to 10 ms: the loop's pace.
            while let Some(a) = self.heartbeat.receive() {
                self.peer = Some((a.from.clone(), Instant::now()));
                self.note_cause(&a);
                self.feed(Event::Heard(a));
            }
            if let Ok(answered) = self.probes.1.try_recv() {
                self.probing = false;
                if answered && self.machine.role() == Role::Probing {
                    self.shared.status.lock().unwrap_or_else(|p| p.into_inner()).fenced += 1;
                }
                self.feed(Event::Probed { answered });
            }
            if self.links_checked.is_none_or(|t| t.elapsed() >= Duration::from_millis(50)) {
                self.links_checked = Some(Instant::now());
                let router = self.upstream.misses.load(Ordering::Relaxed) < ROUTER_MISSES;
                if let Some(links) = self.links()
                    && self.links_up != Some(links && router)
                {
                    let up = links && router;
                    if !links {
                        tracing::warn!("a link of this replica is down: it cannot serve");
                    } else if !router {
                        tracing::warn!(
                            "the external router has not answered {ROUTER_MISSES} ARP probes in a row: this replica cannot serve"
                        );
                    }
                    self.links_up = Some(up);
                    self.feed(Event::Links { up });
                }
            }
            self.feed(Event::Tick);
            self.report();
        }
    }

    /// What a takeover that follows would be owed to.
    fn note_cause(&mut self, a: &natgw_ha::Advert) {
        if a.handover_to.as_deref() == Some(self.shared.settings.name.as_str()) {
            self.cause = Some(Cause::HandedOver(a.from.clone()));
        } else if a.active {
            self.cause = Some(Cause::Active(a.from.clone(), Instant::now()));
        } else if matches!(&self.cause, Some(Cause::Active(name, _)) if *name == a.from) {
            self.cause = Some(Cause::LetGo(a.from.clone()));
        }
    }

    fn feed(&mut self, event: Event) {
        let now = ms_since(self.clock);
        for action in self.machine.on(now, event) {
            match action {
                Action::Send(a) => self.heartbeat.send(&a),
                Action::Probe => self.probe(),
                Action::Take { term } => self.take(term),
                Action::Drop { why } => self.drop_addresses(why),
                Action::Announce => self.announce(),
            }
        }
    }

    fn plan(&self) -> Option<Arc<GatewayPlan>> {
        self.shared.held.lock().unwrap_or_else(|p| p.into_inner()).plan.clone()
    }

    /// Both links of the plan up; `None` before a plan or if unreadable.
    fn links(&self) -> Option<bool> {
        let plan = self.plan()?;
        let names = [plan.lan_interface.clone(), plan.external_interface.clone()];
        let up = self.worker.run(move || {
            thread_local! {
                static LINKS: std::cell::RefCell<Option<Links>> = const { std::cell::RefCell::new(None) };
            }
            LINKS.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.is_none() {
                    *slot = Links::open().ok();
                }
                let all = slot.as_ref()?.interfaces().ok()?;
                Some(names.iter().all(|n| all.get(n).is_some_and(|i| i.up)))
            })
        });
        up.ok().flatten()
    }

    /// Probes on a thread of its own; the answer comes back as an event.
    fn probe(&mut self) {
        if self.probing {
            return;
        }
        let Some(plan) = self.plan() else {
            // Nothing known to probe for: a standby does not take blind.
            if self.machine.role() == Role::Probing {
                let _ = self.probes.0.send(true);
                self.probing = true;
            }
            return;
        };
        self.probing = true;
        let (worker, tx) = (self.worker.clone(), self.probes.0.clone());
        let wait = Duration::from_millis(self.shared.settings.probe_ms);
        // A standby about to take must also see the external router: one
        // cut off from the segments hears no holder, and could serve no one.
        let router = (self.machine.role() == Role::Probing).then(|| upstream_of(&plan)).flatten();
        std::thread::spawn(move || {
            let targets = probe_targets(&plan);
            let external = plan.external_interface.clone();
            // Probers are opened in the namespace, then probe in parallel.
            let probers = worker.run(move || {
                let held = targets
                    .into_iter()
                    .map(|(i, ips)| Prober::on(&i).map(|p| (p, ips)))
                    .collect::<std::io::Result<Vec<_>>>()?;
                let router = router.map(|r| Prober::on(&external).map(|p| (p, r))).transpose()?;
                Ok::<_, std::io::Error>((held, router))
            });
            let answered = match probers {
                Ok(Ok((held, router))) => std::thread::scope(|s| {
                    let handles: Vec<_> = held.iter().map(|(p, ips)| s.spawn(move || p.probe(ips, wait))).collect();
                    let seen = router.as_ref().map(|(p, r)| s.spawn(move || p.probe(&[*r], wait)));
                    // A probe that fails answers "held": never take blind.
                    let held = handles.into_iter().any(|h| !matches!(h.join(), Ok(Ok(None))));
                    let isolated = seen.is_some_and(|h| !matches!(h.join(), Ok(Ok(Some(_)))));
                    if isolated && !held {
                        let router = router.as_ref().map(|(_, r)| *r);
                        tracing::warn!(?router, "the external router does not answer: not taking over");
                    }
                    held || isolated
                }),
                _ => true,
            };
            let _ = tx.send(answered);
        });
    }

    fn take(&mut self, term: u64) {
        let entries = self.shared.received.entries();
        let count = entries.len();
        let installed = self.worker.run(move || {
            let (tcp, udp): (Vec<_>, Vec<_>) = entries.into_iter().partition(|e| e.proto == 6);
            let ct = Conntrack::open()?;
            Ok::<_, natgw_dataplane::conntrack::ConntrackError>(
                ct.install(&tcp, TCP_TIMEOUT_SECS)? + ct.install(&udp, UDP_TIMEOUT_SECS)?,
            )
        });
        let installed = match installed {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "installing the peer's connections failed; taking over without them");
                0
            }
            Err(e) => {
                tracing::error!(error = %e, "installing the peer's connections failed; taking over without them");
                0
            }
        };
        let mut held = self.shared.held.lock().unwrap_or_else(|p| p.into_inner());
        held.holds = true;
        if let Some(plan) = held.plan.clone()
            && let Err(e) = self.shared.gw.program(&plan)
        {
            tracing::error!(error = %e, "taking the addresses failed; the next sync tries again");
        }
        drop(held);
        let (why, reason) = match self.cause.take() {
            Some(Cause::HandedOver(name)) => (Takeover::Handover, format!("handed over by {name} (a planned stop)")),
            Some(Cause::LetGo(name)) => (Takeover::LetGo, format!("{name} let go of the addresses")),
            Some(Cause::Active(name, t)) => (
                Takeover::Silent,
                format!("{name} silent for {} ms, and no host answered for the addresses", t.elapsed().as_millis()),
            ),
            None => (Takeover::Start, "no active replica heard, and no host answered for the addresses".to_string()),
        };
        self.shared.metrics.took(why, installed);
        tracing::info!(term, installed, of = count, %reason, "took over the addresses");
        let mut s = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
        s.since = SystemTime::now();
        s.reason = reason;
        s.takeovers += 1;
        s.sessions_installed = installed;
    }

    /// Gratuitous ARP for every address held, from this namespace.
    fn announce(&self) {
        let Some(plan) = self.plan() else { return };
        let addresses: Vec<(String, Ipv4Addr)> =
            plan.addresses.iter().map(|a| (a.interface.to_string(), a.addr.addr())).collect();
        let sent = self.worker.run(move || {
            let announcer = natgw_dataplane::route::garp::Announcer::open()?;
            addresses.iter().try_for_each(|(interface, ip)| announcer.announce_on(interface, *ip))
        });
        match sent {
            Ok(Ok(())) => tracing::info!("another holder was heard: announced the addresses again"),
            Ok(Err(e)) => tracing::warn!(error = %e, "announcing the addresses failed"),
            Err(e) => tracing::warn!(error = %e, "announcing the addresses failed"),
        }
    }

    fn drop_addresses(&mut self, why: &str) {
        let mut held = self.shared.held.lock().unwrap_or_else(|p| p.into_inner());
        held.holds = false;
        if let Some(plan) = held.plan.clone()
            && let Err(e) = self.shared.gw.program(&plan.standby())
        {
            tracing::error!(error = %e, "dropping the addresses failed; the next sync tries again");
        }
        drop(held);
        tracing::warn!(why, "dropped the addresses");
        let mut s = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
        s.since = SystemTime::now();
        s.reason = why.to_string();
    }

    fn report(&mut self) {
        let mut s = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
        s.role = self.machine.role();
        s.term = self.machine.term();
        s.links_up = self.links_up;
        s.peer = self.peer.as_ref().map(|(n, t)| (n.clone(), t.elapsed()));
        let dead = Duration::from_millis(self.shared.settings.dead_ms);
        let alive = self.peer.as_ref().is_some_and(|(_, t)| t.elapsed() < dead);
        if alive != s.peer_alive {
            // Said at each change: without a peer, a failure of this
            // replica ends the gateway's sessions.
            match (&self.peer, alive) {
                (Some((name, _)), true) => tracing::info!(peer = %name, "the peer is heard"),
                (Some((name, _)), false) => tracing::warn!(
                    peer = %name,
                    "the peer is not heard: if this replica fails now, nothing takes over"
                ),
                (None, _) => {}
            }
        }
        s.peer_alive = alive;
        s.refused_datagrams = self.heartbeat.refused.load(Ordering::Relaxed);
        s.refused_streams = self.shared.received.refused.load(Ordering::Relaxed);
        s.sessions_held = self.shared.received.len();
        let lost = self.shared.sent.lost.load(Ordering::Relaxed);
        if lost > s.sessions_lost_events {
            tracing::warn!(
                lost,
                "the kernel dropped conntrack events before they were sent: the stream to the peer starts over with a whole dump"
            );
            s.sessions_lost_events = lost;
        }
        self.shared.metrics.observe(&s);
    }
}
