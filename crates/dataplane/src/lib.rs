//! The kernel side of a gateway, in thin layers around the pure plan:
//! `nft` (natgw's nftables tables: model, elements, netlink, dump),
//! `route` (EIPs, routes and rules over rtnetlink, natgw's marks, GARP),
//! `conntrack` (netlink, the stale-flow policy, port use, translation
//! logs), `gateway` (its kernel state and the sync, audit and teardown
//! that tie the rest together) and `egress` (a node's table). `Gateway`
//! is the handle callers use.

pub mod conntrack;
pub mod deadline;
pub mod egress;
mod gateway;
pub mod netns;
pub mod nft;
pub mod route;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use natgw_plan::{GatewayPlan, IfAddr, Route};

use crate::conntrack::{ports, translog};
use crate::gateway::{engine, state};
use crate::nft::model::Mirror;

pub use gateway::state::{Drift, KernelState};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error(transparent)]
    Nft(#[from] nft::NftError),
    #[error(transparent)]
    Nfnl(#[from] nft::netlink::NfnlError),
    #[error(transparent)]
    Link(#[from] route::LinkError),
    #[error(transparent)]
    Conntrack(#[from] conntrack::ConntrackError),
    #[error("cannot enable net.ipv4.ip_forward: {0}")]
    Sysctl(std::io::Error),
    #[error("cannot list the interfaces' addresses: {0}")]
    Addresses(std::io::Error),
}

/// What one sync changed.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    pub changed: bool,
    pub table_rebuilt: bool,
    pub nft_statements: usize,
    pub addresses_added: Vec<IfAddr>,
    pub addresses_removed: Vec<IfAddr>,
    pub routes_added: Vec<Route>,
    pub routes_removed: Vec<Route>,
    pub conntrack_deleted: usize,
    pub duration: Duration,
    /// Time spent per phase, for logs and metrics.
    pub phases: Vec<(&'static str, Duration)>,
}

impl Shared {
    /// Runs the owed sweep on the sweeper thread and waits.
    fn sweep(shared: &Arc<Shared>) -> Result<usize, SyncError> {
        let s = shared.clone();
        shared.sweeper.run(move || Shared::sweep_here(&s))?
    }

    /// The sweep itself, on the sweeper thread: walks conntrack without
    /// holding anything, then deletes under the sync lock, re-judging each
    /// entry against the plan in force.
    fn sweep_here(shared: &Arc<Shared>) -> Result<usize, SyncError> {
        let (generation, plan, scope) = {
            let sweeps = shared.sweeps.lock().unwrap_or_else(|p| p.into_inner());
            match (&sweeps.plan, sweeps.settled()) {
                (Some(plan), false) => (sweeps.generation, plan.clone(), sweeps.scope.clone()),
                _ => return Ok(0),
            }
        };
        if shared.fail_next_sweep.swap(false, Ordering::Relaxed) {
            let injected = std::io::Error::other("injected by a test");
            return Err(SyncError::Conntrack(conntrack::ConntrackError::Io(injected)));
        }
        let candidates = engine::stale_entries(&plan, &scope)?;
        let _sync = shared.mirror.lock().unwrap_or_else(|p| p.into_inner());
        let (latest, scope) = {
            let sweeps = shared.sweeps.lock().unwrap_or_else(|p| p.into_inner());
            (sweeps.plan.clone().unwrap_or(plan), sweeps.scope.clone())
        };
        let deleted = engine::delete_stale(&latest, &scope, candidates)?;
        let mut sweeps = shared.sweeps.lock().unwrap_or_else(|p| p.into_inner());
        sweeps.done = sweeps.done.max(generation);
        if sweeps.settled() {
            // Every change is swept: addresses held before no longer matter.
            sweeps.scope.ours.clear();
        }
        Ok(deleted)
    }
}

/// Port use of a gateway's EIPs at one moment.
#[derive(Clone, Debug, Default)]
pub struct PortReport {
    /// Busiest EIP first.
    pub usage: Vec<ports::EipUsage>,
    /// Conntrack insert failures so far (port exhaustion drops), when the
    /// kernel reports them.
    pub insert_failures: Option<u64>,
    /// Conntrack entries of the namespace.
    pub entries: usize,
}

/// A gateway's network namespace, driven from a dedicated thread; conntrack
/// sweeps run on a second one, so a sweep never delays the next change.
pub struct Gateway {
    worker: netns::NetnsWorker,
    shared: Arc<Shared>,
}

struct Shared {
    sweeper: netns::NetnsWorker,
    /// What the last successful sync left in the kernel (kube-proxy keeps
    /// the same kind of mirror): normal syncs diff against it instead of
    /// listing thousands of elements; `resync` reads the kernel instead.
    /// Held for the whole sync, and by a sweep while it deletes: a sweep
    /// never judges entries against a plan older than the kernel's.
    mirror: Mutex<Mirror<engine::Snapshot>>,
    sweeps: Mutex<Sweeps>,
    /// Tests: make the next sweep fail.
    fail_next_sweep: AtomicBool,
}

/// Conntrack sweeps owed and done. Every sync that changed the kernel owes
/// one (and the first sync after start: flows from before). A sweep uses
/// the latest plan, so one sweep settles every sync before it started.
/// Only a successful sweep settles: a finalizer released once `swept()`
/// never leaves flows of the removed rule behind.
#[derive(Default)]
struct Sweeps {
    /// Syncs so far.
    generation: u64,
    /// The generation a sweep must reach.
    owed: u64,
    /// The generation the last successful sweep started at.
    done: u64,
    plan: Option<Arc<GatewayPlan>>,
    scope: engine::SweepScope,
    /// A background sweep is queued or running.
    running: bool,
}

impl Sweeps {
    fn settled(&self) -> bool {
        self.done >= self.owed
    }
}

/// Called by a background sweep when it finished: `Ok(deleted)` or the error.
pub type SweepDone = Arc<dyn Fn(Result<usize, String>) + Send + Sync>;

impl Gateway {
    /// Opens the namespace at `netns` (a path, or a name under
    /// /run/netns), or the current one with `None`.
    pub fn open(netns: Option<&str>) -> Result<Self, SyncError> {
        let path: Option<PathBuf> = netns.map(netns::netns_path);
        let sweeps = Sweeps { owed: 1, ..Default::default() };
        Ok(Gateway {
            worker: netns::NetnsWorker::start(path.clone())?,
            shared: Arc::new(Shared {
                sweeper: netns::NetnsWorker::start(path)?,
                mirror: Mutex::new(Mirror::Unknown),
                sweeps: Mutex::new(sweeps),
                fail_next_sweep: AtomicBool::new(false),
            }),
        })
    }

    /// Whether both namespace threads still run (liveness).
    pub fn alive(&self) -> bool {
        self.worker.alive() && self.shared.sweeper.alive()
    }

    /// One sync, conntrack sweep included: the kernel ends up holding
    /// exactly `plan` and no flow of a removed translation. Diffs against
    /// what the previous sync left (cheap: O(change)); the first sync of a
    /// handle reads the kernel and sweeps conntrack entries from before.
    pub fn sync(&self, plan: &GatewayPlan) -> Result<SyncReport, SyncError> {
        let mut report = self.program(plan)?;
        report.conntrack_deleted = self.sweep()?;
        Ok(report)
    }

    /// Like `sync`, but reads the whole kernel state first, so anything
    /// changed behind natgw's back is repaired. Run it periodically.
    pub fn resync(&self, plan: &GatewayPlan) -> Result<SyncReport, SyncError> {
        let mut report = self.reprogram(plan)?;
        report.conntrack_deleted = self.sweep()?;
        Ok(report)
    }

    /// Converges the kernel to `plan` and returns once the translation is
    /// in force; the conntrack sweep it owes is left to [`Gateway::sweep`]
    /// or [`Gateway::sweep_in_background`].
    pub fn program(&self, plan: &GatewayPlan) -> Result<SyncReport, SyncError> {
        self.program_with(plan, false)
    }

    /// `program` from a kernel read.
    pub fn reprogram(&self, plan: &GatewayPlan) -> Result<SyncReport, SyncError> {
        self.program_with(plan, true)
    }

    fn program_with(&self, plan: &GatewayPlan, read_kernel: bool) -> Result<SyncReport, SyncError> {
        let owned = Arc::new(plan.clone());
        let mut mirror = self.shared.mirror.lock().unwrap_or_else(|p| p.into_inner());
        // Taken out: a failed sync leaves it unknown, so the next one reads.
        let have = mirror.take().filter(|_| !read_kernel);
        let p = owned.clone();
        let result = self.worker.run(move || engine::sync(&p, have)).map_err(SyncError::from);
        let mut sweeps = self.shared.sweeps.lock().unwrap_or_else(|p| p.into_inner());
        sweeps.generation += 1;
        sweeps.plan = Some(owned);
        match result.and_then(|r| r) {
            Ok((report, after, scope)) => {
                *mirror = Mirror::Known(after);
                if report.changed || !sweeps.settled() {
                    sweeps.owed = sweeps.generation;
                }
                sweeps.scope.merge(scope);
                Ok(report)
            }
            Err(e) => {
                // The kernel may have changed before the failure.
                sweeps.owed = sweeps.generation;
                Err(e)
            }
        }
    }

    /// Lets go of the last plan programmed, unless a sweep still needs it
    /// to judge flows; returns whether it went. A caller about to plan a
    /// whole gateway from scratch calls it first, so two whole plans that
    /// share nothing are never held at once (30 MB at 226,000 objects).
    /// Until the next sync, `port_usage` reads the EIPs from the kernel.
    pub fn release_plan(&self) -> bool {
        let mut sweeps = self.shared.sweeps.lock().unwrap_or_else(|p| p.into_inner());
        if !sweeps.settled() {
            return false;
        }
        sweeps.plan = None;
        true
    }

    /// Whether every change programmed so far has been swept.
    pub fn swept(&self) -> bool {
        self.shared.sweeps.lock().unwrap_or_else(|p| p.into_inner()).settled()
    }

    /// Runs the sweep owed, if any, and waits for it.
    pub fn sweep(&self) -> Result<usize, SyncError> {
        Shared::sweep(&self.shared)
    }

    /// Starts the sweep owed on the sweeper thread, unless one is already
    /// queued or running (it takes the latest plan when it starts); `done`
    /// is called when it finished. Returns at once.
    pub fn sweep_in_background(&self, done: SweepDone) {
        let shared = self.shared.clone();
        {
            let mut sweeps = shared.sweeps.lock().unwrap_or_else(|p| p.into_inner());
            if sweeps.settled() || sweeps.running {
                return;
            }
            sweeps.running = true;
        }
        let s = shared.clone();
        let job = move || {
            let result = Shared::sweep_here(&s);
            s.sweeps.lock().unwrap_or_else(|p| p.into_inner()).running = false;
            if result.is_err() {
                // No tight loop of failing sweeps.
                std::thread::sleep(Duration::from_millis(500));
            }
            done(result.map_err(|e| e.to_string()));
        };
        if shared.sweeper.spawn(job).is_err() {
            shared.sweeps.lock().unwrap_or_else(|p| p.into_inner()).running = false;
        }
    }

    /// How the EIPs' ports are used, from a conntrack walk on the sweeper
    /// thread (never in the way of a change). The EIPs are the last
    /// synced plan's or, before any sync, those in the kernel's table.
    pub fn port_usage(&self, top: usize) -> Result<PortReport, SyncError> {
        let plan = self.shared.sweeps.lock().unwrap_or_else(|p| p.into_inner()).plan.clone();
        self.shared.sweeper.run(move || {
            let mut eips = std::collections::BTreeSet::new();
            match plan {
                Some(p) => {
                    state::eips_of(&p.nat, &mut eips);
                    eips.extend(p.addresses.iter().map(|a| a.addr.addr()));
                }
                None => state::eips_of(&nft::read()?.nat, &mut eips),
            }
            let entries = conntrack::Conntrack::open()?.entries()?;
            let stat = std::fs::read_to_string("/proc/net/stat/nf_conntrack").unwrap_or_default();
            Ok(PortReport {
                usage: ports::account(&entries, &eips, top),
                insert_failures: ports::insert_failures(&stat),
                entries: entries.len(),
            })
        })?
    }

    /// Packets the forward chain dropped, by direction (`lan`,
    /// `external`, `other`), cumulative since natgw's table was last
    /// written whole; `None` while there is no table. Read on the sweeper
    /// thread: a dump of one chain's rules.
    pub fn forward_drops(&self) -> Result<Option<std::collections::BTreeMap<&'static str, u64>>, SyncError> {
        Ok(self.shared.sweeper.run(nft::forward_drops)??)
    }

    /// Starts translation logs for this namespace on a thread of their own:
    /// one JSON line per translation created and ended, at most `rate`
    /// lines a second; what is not written is counted in its counts.
    /// The log stops when the returned handle is dropped.
    pub fn start_translation_log(
        &self,
        sink: translog::Sink,
        rates: translog::Rates,
    ) -> Result<translog::Running, SyncError> {
        let path = self.worker.path().map(std::path::Path::to_path_buf);
        let counts = Arc::new(translog::Counts::default());
        let c = counts.clone();
        netns::detached(path, move || {
            if let Err(e) = translog::run(sink, rates, c) {
                tracing::error!(error = %e, "translation log stopped: cannot read conntrack events");
            }
        })?;
        Ok(translog::Running { counts })
    }

    /// Tests: the next conntrack sweep fails, as a netlink error would.
    #[doc(hidden)]
    pub fn fail_next_sweep(&self) {
        self.shared.fail_next_sweep.store(true, Ordering::Relaxed);
    }

    /// Differences between `plan` and the kernel; empty when converged.
    pub fn audit(&self, plan: &GatewayPlan) -> Result<Vec<Drift>, SyncError> {
        let plan = plan.clone();
        self.worker.run(move || engine::audit(&plan))?
    }

    /// Removes all natgw state from the namespace.
    pub fn teardown(&self) -> Result<SyncReport, SyncError> {
        *self.shared.mirror.lock().unwrap_or_else(|p| p.into_inner()) = Mirror::Unknown;
        self.worker.run(engine::teardown)?
    }

    pub fn snapshot(&self) -> Result<KernelState, SyncError> {
        self.worker.run(engine::snapshot)?
    }

    /// Runs any closure inside the namespace (tests, tools).
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R, SyncError> {
        Ok(self.worker.run(f)?)
    }
}
