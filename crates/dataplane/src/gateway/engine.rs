//! The sync and audit procedures. They run on the namespace's worker
//! thread, where every socket and child process lives in the gateway's
//! namespace.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use natgw_plan::{GatewayPlan, IfAddr, Route};

use crate::conntrack::policy::is_stale;
use crate::gateway::state::{
    Drift, KernelState, drift, eip_diff, eips_of, held_eips, touched_eips, wanted_locals, wanted_subnets,
};
use crate::nft::netlink;
use crate::nft::write::{TableWrite, table_write};
use crate::route::garp;
use crate::route::{EipRoute, Interface, LinkError, Links};
use crate::{SyncError, SyncReport, conntrack, nft};

const FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Without it, deleting an interface's primary address deletes all its
/// secondary addresses too: removing one EIP would take the others along.
fn promote_path(interface: &str) -> String {
    format!("/proc/sys/net/ipv4/conf/{interface}/promote_secondaries")
}

fn sysctl_on(path: &str) -> bool {
    std::fs::read_to_string(path).map(|s| s.trim() == "1").unwrap_or(false)
}

thread_local! {
    // One rtnetlink connection and one ARP socket per worker thread, opened
    // on first use and kept: both live in the worker's namespace.
    static LINKS: RefCell<Option<Links>> = const { RefCell::new(None) };
    static ANNOUNCER: RefCell<Option<garp::Announcer>> = const { RefCell::new(None) };
}

fn with_links<R>(f: impl FnOnce(&Links) -> Result<R, SyncError>) -> Result<R, SyncError> {
    LINKS.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Links::open()?);
        }
        match slot.as_ref() {
            Some(links) => f(links),
            None => Err(SyncError::Link(LinkError::Io(std::io::Error::other("netlink not open")))),
        }
    })
}

/// What a sync read or left: the mirror of the kernel between syncs.
pub struct Snapshot {
    state: KernelState,
    interfaces: BTreeMap<String, Interface>,
}

fn read(links: &Links) -> Result<Snapshot, SyncError> {
    let interfaces = links.interfaces()?;
    let names: BTreeMap<u32, String> = interfaces.iter().map(|(n, i)| (i.index, n.clone())).collect();
    let owned = links.owned_routes(&names)?;
    let state = KernelState {
        table: nft::read()?,
        addresses: links.addresses(&names)?,
        eips: held_eips(&owned.locals, &owned.subnets),
        routes: owned.routes,
        locals: owned.locals,
        subnets: owned.subnets,
        rules: links.owned_rules()?,
        forwarding: sysctl_on(FORWARD),
        // The kernel promotes when `all` or the interface says so. In a pod,
        // /proc/sys is read-only and `all` comes from the pod's sysctls.
        promote_secondaries: {
            let all = sysctl_on(&promote_path("all"));
            interfaces.keys().filter(|n| all || sysctl_on(&promote_path(n))).cloned().collect()
        },
    };
    Ok(Snapshot { state, interfaces })
}

fn with_index<'a>(
    s: &Snapshot,
    addrs: impl IntoIterator<Item = &'a IfAddr>,
) -> Result<Vec<(u32, ipnet::Ipv4Net)>, SyncError> {
    addrs.into_iter().map(|a| Ok((index(s, &a.interface)?, a.addr))).collect()
}

/// Those of `addrs` whose interface still exists (one that vanished took
/// its routes along).
fn existing<'a>(s: &Snapshot, addrs: impl IntoIterator<Item = &'a IfAddr>) -> Vec<(u32, ipnet::Ipv4Net)> {
    addrs.into_iter().filter_map(|a| s.interfaces.get(a.interface.as_str()).map(|i| (i.index, a.addr))).collect()
}

fn index(s: &Snapshot, name: &str) -> Result<u32, SyncError> {
    s.interfaces.get(name).map(|i| i.index).ok_or_else(|| SyncError::Link(LinkError::NoInterface(name.into())))
}

/// Converges the namespace to `plan`, from `mirrored` (what the previous
/// sync left) or, without it, from a kernel read; returns what the kernel
/// holds after, and what a conntrack sweep of this change must know. A
/// sync from the mirror that fails is retried once from a fresh kernel
/// read: the kernel may have changed behind natgw's back.
pub fn sync(plan: &GatewayPlan, mirrored: Option<Snapshot>) -> Result<(SyncReport, Snapshot, SweepScope), SyncError> {
    let started = Instant::now();
    with_links(|links| {
        let from_mirror = mirrored.is_some();
        let snap = match mirrored {
            Some(s) => s,
            None => read(links)?,
        };
        let result = match converge(links, &snap, plan) {
            Err(e) if from_mirror => {
                tracing::warn!(error = %e, "sync from the mirror failed; retrying from a kernel read");
                let fresh = read(links)?;
                converge(links, &fresh, plan).map(|r| (r, fresh, false))
            }
            other => other.map(|r| (r, snap, from_mirror)),
        };
        let (mut report, before, mirrored) = result?;
        report.duration = started.elapsed();
        // From the mirror, the flows to judge are those through what this
        // change touched (earlier changes owe their own sweeps); from a
        // kernel read, through anything natgw holds: flows from before.
        let ours = if mirrored { touched(&before.state, plan, &report) } else { ours(&before.state, plan) };
        let scope = SweepScope { ours, local: local_nets(&before.state) };
        let after = after(before, plan, &report);
        Ok((report, after, scope))
    })
}

/// What a conntrack sweep needs besides the plan.
#[derive(Clone, Debug, Default)]
pub struct SweepScope {
    /// Every address natgw holds, held or translates to (EIPs): a flow
    /// through one that the plan no longer wants is stale.
    pub ours: BTreeSet<std::net::Ipv4Addr>,
    /// Every address of the namespace, with its prefix.
    pub local: Vec<ipnet::Ipv4Net>,
}

impl SweepScope {
    /// Both changes' addresses: a sweep owed for several changes covers
    /// them all.
    pub fn merge(&mut self, other: SweepScope) {
        self.ours.extend(other.ours);
        self.local = other.local;
    }
}

/// The EIPs a change from `k` to `plan` touched: O(change).
fn touched(k: &KernelState, plan: &GatewayPlan, report: &SyncReport) -> BTreeSet<std::net::Ipv4Addr> {
    let mut out = BTreeSet::new();
    touched_eips(&k.table.nat, &plan.nat, &mut out);
    out.extend(report.addresses_added.iter().chain(&report.addresses_removed).map(|a| a.addr.addr()));
    out
}

fn ours(k: &KernelState, plan: &GatewayPlan) -> BTreeSet<std::net::Ipv4Addr> {
    let mut ours = k.our_addresses();
    eips_of(&plan.nat, &mut ours);
    ours.extend(plan.addresses.iter().map(|a| a.addr.addr()));
    ours
}

/// The conntrack entries stale under `plan` (a walk of the whole table:
/// the slow part of a sweep, run without holding anything).
pub fn stale_entries(plan: &GatewayPlan, scope: &SweepScope) -> Result<Vec<conntrack::Dumped>, SyncError> {
    let ct = conntrack::Conntrack::open()?;
    Ok(ct.dump_where(|e| is_stale(e, plan, &scope.ours, &scope.local))?)
}

/// Deletes those of `candidates` still stale under `plan`.
pub fn delete_stale(
    plan: &GatewayPlan,
    scope: &SweepScope,
    candidates: Vec<conntrack::Dumped>,
) -> Result<usize, SyncError> {
    let stale: Vec<_> =
        candidates.into_iter().filter(|d| is_stale(&d.entry, plan, &scope.ours, &scope.local)).collect();
    if stale.is_empty() {
        return Ok(0);
    }
    Ok(conntrack::Conntrack::open()?.delete(&stale)?)
}

/// The kernel state a successful sync of `plan` leaves behind. The EIPs'
/// local routes are the ones before, less those removed, plus those
/// added: O(change), where rebuilding them cost one allocation per EIP on
/// every sync.
fn after(before: Snapshot, plan: &GatewayPlan, report: &SyncReport) -> Snapshot {
    let Snapshot { state: mut k, interfaces } = before;
    let mut locals = std::mem::take(&mut k.locals);
    let local = |a: &IfAddr| IfAddr { interface: a.interface.clone(), addr: ipnet::Ipv4Net::from(a.addr.addr()) };
    for a in &report.addresses_removed {
        locals.remove(&local(a));
    }
    locals.extend(report.addresses_added.iter().map(local));
    // After the kernel flushed an emptied interface the old set is no
    // base: one entry per EIP or a rebuild.
    if locals.len() != plan.addresses.len() {
        locals = wanted_locals(plan);
    }
    let addresses = k.addresses.iter().filter(|(_, owned)| !**owned).map(|(a, o)| (a.clone(), *o)).collect();
    let mut promote = k.promote_secondaries.clone();
    promote.extend(k.addresses.iter().filter(|(_, owned)| **owned).map(|(a, _)| a.interface.to_string()));
    Snapshot {
        state: KernelState {
            table: nft::KernelTable {
                present: true,
                skeleton: nft::expected_skeleton(&plan.lan_interface, &plan.external_interface),
                nat: plan.nat.clone(),
            },
            addresses,
            routes: plan.routes.clone(),
            eips: plan.addresses.clone(),
            locals,
            subnets: wanted_subnets(plan),
            rules: crate::route::marks::wanted_rules(plan),
            forwarding: true,
            promote_secondaries: promote,
        },
        interfaces,
    }
}

fn converge(links: &Links, snap: &Snapshot, plan: &GatewayPlan) -> Result<SyncReport, SyncError> {
    let mut clock = Instant::now();
    let mut lap = |report: &mut SyncReport, phase: &'static str| {
        report.phases.push((phase, clock.elapsed()));
        clock = Instant::now();
    };
    for name in [&plan.lan_interface, &plan.external_interface] {
        index(snap, name)?;
    }
    let k = &snap.state;
    let mut report = SyncReport::default();
    if !k.forwarding {
        std::fs::write(FORWARD, "1").map_err(SyncError::Sysctl)?;
        report.changed = true;
    }
    // Interface addresses natgw owns are left by an earlier version (EIPs
    // are local routes now): they go, and removing one must not take the
    // others along.
    let old: Vec<&IfAddr> = k.addresses.iter().filter(|(_, owned)| **owned).map(|(a, _)| a).collect();
    let managed: BTreeSet<&str> = old.iter().map(|a| a.interface.as_str()).collect();
    for name in managed.into_iter().filter(|n| !k.promote_secondaries.contains(*n) && snap.interfaces.contains_key(*n))
    {
        std::fs::write(promote_path(name), "1").map_err(SyncError::Sysctl)?;
        report.changed = true;
    }
    // Additions first: a new translation never points at a missing EIP,
    // and nothing is removed before the table commits. nft parses and
    // commits while the EIPs go in over netlink.
    let skeleton = nft::expected_skeleton(&plan.lan_interface, &plan.external_interface);
    let subnets = wanted_subnets(plan);
    let (new_eips, gone_eips) = eip_diff(&k.eips, &plan.addresses);
    let write = table_write(&k.table, &skeleton, &plan.nat);
    report.table_rebuilt = matches!(write, TableWrite::Staged | TableWrite::Rechain | TableWrite::Rebuild);
    match write {
        TableWrite::Elements(maps) => {
            eip_routes(links, snap, &k.subnets, &subnets, &new_eips)?;
            lap(&mut report, "eips-add");
            netlink::apply_here(nft::ID, &maps)?;
            report.nft_statements = maps.iter().map(|m| m.delete.len() + m.add.len()).sum();
        }
        TableWrite::Staged => {
            // The maps fill (on a socket of this namespace, from a helper
            // thread) while the EIPs go in here.
            let staged = nft::staged(&plan.lan_interface, &plan.external_interface, &plan.nat);
            let declare = nft::start(staged.declare)?;
            let socket = netlink::Nfnl::open()?;
            let maps = &staged.maps;
            let (added, filled) = std::thread::scope(|scope| {
                let filler = scope.spawn(move || -> Result<(), SyncError> {
                    declare.wait()?;
                    Ok(socket.apply(nft::ID, maps)?)
                });
                let added = eip_routes(links, snap, &k.subnets, &subnets, &new_eips);
                let filled = filler.join().unwrap_or_else(|_| {
                    Err(netlink::NfnlError::Io(std::io::Error::other("the map writer panicked")).into())
                });
                (added, filled)
            });
            lap(&mut report, "eips-add");
            added?;
            filled?;
            report.nft_statements = maps.iter().map(|m| m.add.len()).sum::<usize>() + staged.hook.lines().count();
            nft::apply(&staged.hook)?;
        }
        TableWrite::Diff | TableWrite::Rechain | TableWrite::Rebuild => {
            let rechain = write == TableWrite::Rechain;
            let full = || nft::full_script(&plan.lan_interface, &plan.external_interface, &plan.nat);
            let script = match write {
                TableWrite::Diff => nft::diff_script(&k.table.nat, &plan.nat),
                TableWrite::Rechain => {
                    nft::rechain_script(&plan.lan_interface, &plan.external_interface, &k.table, &plan.nat)
                }
                _ => full(),
            };
            report.nft_statements = script.lines().count();
            let nft = if script.is_empty() { None } else { Some(nft::start(script)?) };
            let added = eip_routes(links, snap, &k.subnets, &subnets, &new_eips);
            lap(&mut report, "eips-add");
            let committed = nft.map(nft::Running::wait).transpose();
            added?;
            match committed {
                // Chains made by hand in ways the replacement cannot undo:
                // the whole table goes, as one transaction still.
                Err(e) if rechain => {
                    tracing::warn!(error = %e, "replacing natgw's chains failed; rebuilding the whole table");
                    // A phase of its own, so logs and metrics show the fallback.
                    lap(&mut report, "nft-rechain-failed");
                    let script = full();
                    report.nft_statements = script.lines().count();
                    nft::apply(&script)?;
                }
                other => {
                    other?;
                }
            }
        }
    }
    report.addresses_added = new_eips.into_iter().cloned().collect();
    let announce = report.addresses_added.clone();
    lap(&mut report, "nft");
    links.del_addresses(&with_index(snap, old.iter().copied())?)?;
    // Removing an interface's last address makes the kernel drop every
    // route through it: re-read them then, and put natgw's back.
    let emptied = old.iter().any(|gone| !k.addresses.iter().any(|(a, owned)| !owned && a.interface == gone.interface));
    let reread;
    let reheld;
    let (routes, have_eips, have_subnets) = if !emptied {
        (&k.routes, &k.eips, &k.subnets)
    } else {
        let names: BTreeMap<u32, String> = snap.interfaces.iter().map(|(n, i)| (i.index, n.clone())).collect();
        reread = links.owned_routes(&names)?;
        reheld = held_eips(&reread.locals, &reread.subnets);
        eip_routes(links, snap, &reread.subnets, &subnets, &eip_diff(&reheld, &plan.addresses).0)?;
        (&reread.routes, &reheld, &reread.subnets)
    };
    let stale_locals = if emptied { eip_diff(have_eips, &plan.addresses).1 } else { gone_eips };
    let stale_routes: Vec<IfAddr> = stale_locals.iter().map(|a| as_local(a)).collect();
    links.del_eip_routes(EipRoute::Local, &existing(snap, &stale_routes))?;
    report.addresses_removed = stale_locals.into_iter().cloned().collect();
    links.del_eip_routes(EipRoute::Subnet, &existing(snap, have_subnets.difference(&subnets)))?;
    lap(&mut report, "eips-remove");
    for r in plan.routes.difference(routes) {
        links.add_route(index(snap, &r.interface)?, r)?;
        if !k.routes.contains(r) {
            report.routes_added.push(r.clone());
        }
    }
    let stale_routes: Vec<&Route> = routes.difference(&plan.routes).collect();
    for r in stale_routes {
        // An interface that vanished took its routes along.
        if let Ok(i) = index(snap, &r.interface) {
            links.del_route(i, r)?;
        }
        report.routes_removed.push(r.clone());
    }
    // Rules after routes: a rule never points at an empty table.
    let rules = crate::route::marks::wanted_rules(plan);
    for r in rules.difference(&k.rules) {
        links.add_rule(r)?;
        report.changed = true;
    }
    for r in k.rules.difference(&rules) {
        links.del_rule(r)?;
        report.changed = true;
    }
    lap(&mut report, "routes");
    report.changed |= report.nft_statements > 0
        || !old.is_empty()
        || !report.addresses_added.is_empty()
        || !report.addresses_removed.is_empty()
        || k.subnets != subnets
        || !report.routes_added.is_empty()
        || !report.routes_removed.is_empty();
    // Best effort: an unannounced address still works once neighbours'
    // caches expire.
    if !announce.is_empty() {
        ANNOUNCER.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                match garp::Announcer::open() {
                    Ok(a) => *slot = Some(a),
                    Err(e) => tracing::warn!(error = %e, "cannot open a packet socket for gratuitous ARP"),
                }
            }
            let Some(announcer) = slot.as_ref() else { return };
            for a in &announce {
                if let Some(i) = snap.interfaces.get(a.interface.as_str())
                    && let Some(mac) = i.mac
                    && let Err(e) = announcer.announce(i.index, mac, a.addr.addr())
                {
                    tracing::warn!(address = %a.addr, error = %e, "gratuitous ARP failed");
                }
            }
        });
    }
    lap(&mut report, "garp");
    Ok(report)
}

/// Every address of the namespace's interfaces with its prefix: what
/// tells the gateway's own and broadcast traffic from forwarded traffic
/// (EIPs are asked of the plan).
fn local_nets(k: &KernelState) -> Vec<ipnet::Ipv4Net> {
    k.addresses.keys().map(|a| a.addr).collect()
}

/// An EIP's local route: the address alone.
fn as_local(a: &IfAddr) -> IfAddr {
    IfAddr { interface: a.interface.clone(), addr: ipnet::Ipv4Net::from(a.addr.addr()) }
}

/// Adds the subnet routes `want` has and `have` lacks, then local routes
/// for `eips`.
fn eip_routes(
    links: &Links,
    snap: &Snapshot,
    have: &BTreeSet<IfAddr>,
    want: &BTreeSet<IfAddr>,
    eips: &[&IfAddr],
) -> Result<(), SyncError> {
    links.add_eip_routes(EipRoute::Subnet, &with_index(snap, want.difference(have))?)?;
    let locals: Vec<(u32, ipnet::Ipv4Net)> = eips
        .iter()
        .map(|a| Ok((index(snap, &a.interface)?, ipnet::Ipv4Net::from(a.addr.addr()))))
        .collect::<Result<_, SyncError>>()?;
    links.add_eip_routes(EipRoute::Local, &locals)?;
    Ok(())
}

/// Every difference between `plan` and the kernel, conntrack included.
pub fn audit(plan: &GatewayPlan) -> Result<Vec<Drift>, SyncError> {
    with_links(|links| {
        let snap = read(links)?;
        let ours = ours(&snap.state, plan);
        let local = local_nets(&snap.state);
        let dumped = conntrack::Conntrack::open()?.dump_where(|e| is_stale(e, plan, &ours, &local))?;
        let stale: Vec<_> = dumped.into_iter().map(|d| d.entry).collect();
        Ok(drift(plan, &snap.state, &stale))
    })
}

/// Removes everything natgw owns in this namespace: its table, its
/// addresses and routes, and conntrack entries through its addresses.
pub fn teardown() -> Result<SyncReport, SyncError> {
    with_links(|links| {
        let snap = read(links)?;
        let mut report = SyncReport::default();
        let ours = snap.state.our_addresses();
        for (a, _) in snap.state.addresses.iter().filter(|(_, owned)| **owned) {
            let _ = std::fs::write(promote_path(&a.interface), "1");
        }
        if snap.state.table.present {
            nft::delete_table()?;
            report.table_rebuilt = true;
        }
        let owned: Vec<&IfAddr> = snap.state.addresses.iter().filter(|(_, owned)| **owned).map(|(a, _)| a).collect();
        links.del_addresses(&with_index(&snap, owned.iter().copied())?)?;
        links.del_eip_routes(EipRoute::Local, &existing(&snap, &snap.state.locals))?;
        links.del_eip_routes(EipRoute::Subnet, &existing(&snap, &snap.state.subnets))?;
        report.addresses_removed = owned.into_iter().chain(&snap.state.locals).cloned().collect();
        for r in &snap.state.routes {
            if let Ok(i) = index(&snap, &r.interface) {
                links.del_route(i, r)?;
            }
            report.routes_removed.push(r.clone());
        }
        for r in &snap.state.rules {
            links.del_rule(r)?;
        }
        let mine: BTreeSet<_> = ours;
        let ct = conntrack::Conntrack::open()?;
        let stale =
            ct.dump_where(|e| [e.orig.src, e.orig.dst, e.reply.src, e.reply.dst].iter().any(|a| mine.contains(a)))?;
        report.conntrack_deleted = ct.delete(&stale)?;
        report.changed = true;
        Ok(report)
    })
}

/// The kernel state as read, for tests and `natgw audit -v`.
pub fn snapshot() -> Result<KernelState, SyncError> {
    with_links(|links| Ok(read(links)?.state))
}
