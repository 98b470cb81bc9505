//! The kernel side of a gateway, in thin layers around the pure plan:
//! `nft` (natgw's nftables table), `link` (addresses and routes over
//! rtnetlink), `conntrack` (netlink), `garp`, and `engine`, which ties them
//! into sync, audit and teardown. `Gateway` is the handle callers use.

pub mod conntrack;
pub mod ctpolicy;
pub mod egress;
mod engine;
pub mod garp;
pub mod link;
pub mod model;
pub mod netns;
pub mod nft;
pub mod state;

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use natgw_plan::{GatewayPlan, IfAddr, Route};

use crate::model::Mirror;

pub use state::{Drift, KernelState};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error(transparent)]
    Nft(#[from] nft::NftError),
    #[error(transparent)]
    Link(#[from] link::LinkError),
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

/// A gateway's network namespace, driven from a dedicated thread.
pub struct Gateway {
    worker: netns::NetnsWorker,
    /// A conntrack sweep is owed: at start (flows from before), and after
    /// any failed sync (the kernel may have changed before the sweep ran).
    /// Only a successful sweep clears it, so a finalizer released after a
    /// successful sync never leaves flows of the removed rule behind.
    sweep_pending: AtomicBool,
    /// Tests: make the next sweep fail.
    fail_next_sweep: AtomicBool,
    /// What the last successful sync left in the kernel (kube-proxy keeps
    /// the same kind of mirror): normal syncs diff against it instead of
    /// listing thousands of elements; `resync` reads the kernel instead.
    mirror: Mutex<Mirror<engine::Snapshot>>,
}

impl Gateway {
    /// Opens the namespace at `netns` (a path, or a name under
    /// /run/netns), or the current one with `None`.
    pub fn open(netns: Option<&str>) -> Result<Self, SyncError> {
        let path: Option<PathBuf> = netns.map(netns::netns_path);
        Ok(Gateway {
            worker: netns::NetnsWorker::start(path)?,
            sweep_pending: AtomicBool::new(true),
            fail_next_sweep: AtomicBool::new(false),
            mirror: Mutex::new(Mirror::Unknown),
        })
    }

    /// Refuses to work on a kernel that cannot mark addresses as natgw's
    /// (before Linux 5.18). Call it once at start, before any sync.
    pub fn check_kernel(&self) -> Result<(), SyncError> {
        Ok(self.worker.run(|| link::Links::open().and_then(|l| l.check_address_mark()))??)
    }

    /// One sync: the kernel ends up holding exactly `plan`. Diffs against
    /// what the previous sync left (cheap: O(change)); the first sync of a
    /// handle reads the kernel and sweeps conntrack entries from before.
    pub fn sync(&self, plan: &GatewayPlan) -> Result<SyncReport, SyncError> {
        self.sync_with(plan, false)
    }

    /// Like `sync`, but reads the whole kernel state first, so anything
    /// changed behind natgw's back is repaired. Run it periodically.
    pub fn resync(&self, plan: &GatewayPlan) -> Result<SyncReport, SyncError> {
        self.sync_with(plan, true)
    }

    fn sync_with(&self, plan: &GatewayPlan, read_kernel: bool) -> Result<SyncReport, SyncError> {
        let plan = plan.clone();
        let sweep = self.sweep_pending.load(Ordering::Relaxed);
        let fail = self.fail_next_sweep.swap(false, Ordering::Relaxed);
        let mut mirror = self.mirror.lock().unwrap_or_else(|p| p.into_inner());
        // Taken out: a failed sync leaves it unknown, so the next one reads.
        let have = mirror.take().filter(|_| !read_kernel);
        let result = self.worker.run(move || engine::sync(&plan, sweep, have, fail)).map_err(SyncError::from);
        match result.and_then(|r| r) {
            Ok((report, after)) => {
                *mirror = Mirror::Known(after);
                self.sweep_pending.store(false, Ordering::Relaxed);
                Ok(report)
            }
            Err(e) => {
                self.sweep_pending.store(true, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Tests: the next conntrack sweep fails, as a netlink error would.
    #[doc(hidden)]
    pub fn fail_next_sweep(&self) {
        self.fail_next_sweep.store(true, Ordering::Relaxed);
    }

    /// Differences between `plan` and the kernel; empty when converged.
    pub fn audit(&self, plan: &GatewayPlan) -> Result<Vec<Drift>, SyncError> {
        let plan = plan.clone();
        self.worker.run(move || engine::audit(&plan))?
    }

    /// Removes all natgw state from the namespace.
    pub fn teardown(&self) -> Result<SyncReport, SyncError> {
        *self.mirror.lock().unwrap_or_else(|p| p.into_inner()) = Mirror::Unknown;
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
