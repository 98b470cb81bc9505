//! The sync and audit procedures. They run on the namespace's worker
//! thread, where every socket and child process lives in the gateway's
//! namespace.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use natgw_plan::{GatewayPlan, IfAddr, Route};

use crate::ctpolicy::is_stale;
use crate::link::{Interface, LinkError, Links};
use crate::state::{Drift, KernelState, drift, eips_of};
use crate::{SyncError, SyncReport, conntrack, garp, nft};

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
    // One netlink connection and one ARP socket per worker thread, opened
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
    let state = KernelState {
        table: nft::read()?,
        addresses: links.addresses(&names)?,
        routes: links.owned_routes(&names)?,
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

fn with_index(s: &Snapshot, addrs: &[&IfAddr]) -> Result<Vec<(u32, ipnet::Ipv4Net)>, SyncError> {
    addrs.iter().map(|a| Ok((index(s, &a.interface)?, a.addr))).collect()
}

fn index(s: &Snapshot, name: &str) -> Result<u32, SyncError> {
    s.interfaces.get(name).map(|i| i.index).ok_or_else(|| SyncError::Link(LinkError::NoInterface(name.into())))
}

/// Converges the namespace to `plan`, from `mirrored` (what the previous
/// sync left) or, without it, from a kernel read; returns what the kernel
/// holds after. `sweep_conntrack` forces a conntrack pass even when
/// nothing changed (first sync after start). A sync from the mirror that
/// fails is retried once from a fresh kernel read: the kernel may have
/// changed behind natgw's back.
pub fn sync(
    plan: &GatewayPlan,
    sweep_conntrack: bool,
    mirrored: Option<Snapshot>,
    fail_sweep: bool,
) -> Result<(SyncReport, Snapshot), SyncError> {
    let started = Instant::now();
    with_links(|links| {
        let from_mirror = mirrored.is_some();
        let snap = match mirrored {
            Some(s) => s,
            None => read(links)?,
        };
        let result = match converge(links, &snap, plan, sweep_conntrack, fail_sweep) {
            Err(e) if from_mirror => {
                tracing::warn!(error = %e, "sync from the mirror failed; retrying from a kernel read");
                let fresh = read(links)?;
                // The failed attempt may have changed the kernel: sweep.
                converge(links, &fresh, plan, true, fail_sweep).map(|r| (r, fresh))
            }
            other => other.map(|r| (r, snap)),
        };
        let (mut report, before) = result?;
        report.duration = started.elapsed();
        Ok((report, after(&before, plan)))
    })
}

/// The kernel state a successful sync of `plan` leaves behind.
fn after(before: &Snapshot, plan: &GatewayPlan) -> Snapshot {
    let k = &before.state;
    let mut addresses: BTreeMap<IfAddr, bool> = k
        .addresses
        .iter()
        .filter(|(a, owned)| !**owned || plan.addresses.contains(*a))
        .map(|(a, o)| (a.clone(), *o))
        .collect();
    for a in &plan.addresses {
        addresses.entry(a.clone()).or_insert(true);
    }
    let mut promote = k.promote_secondaries.clone();
    promote.extend(k.addresses.keys().chain(plan.addresses.iter()).map(|a| a.interface.clone()));
    Snapshot {
        state: KernelState {
            table: nft::KernelTable {
                present: true,
                skeleton: nft::expected_skeleton(&plan.lan_interface, &plan.external_interface),
                nat: plan.nat.clone(),
            },
            addresses,
            routes: plan.routes.clone(),
            rules: crate::state::wanted_rules(plan),
            forwarding: true,
            promote_secondaries: promote,
        },
        interfaces: before.interfaces.clone(),
    }
}

fn converge(
    links: &Links,
    snap: &Snapshot,
    plan: &GatewayPlan,
    sweep_conntrack: bool,
    fail_sweep: bool,
) -> Result<SyncReport, SyncError> {
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
    let managed: BTreeSet<&String> = plan.addresses.iter().chain(k.addresses.keys()).map(|a| &a.interface).collect();
    for name in managed.into_iter().filter(|n| !k.promote_secondaries.contains(*n) && snap.interfaces.contains_key(*n))
    {
        std::fs::write(promote_path(name), "1").map_err(SyncError::Sysctl)?;
        report.changed = true;
    }
    // Additions first: a new translation never points at a missing
    // address, and nothing is removed before the table commits.
    let added: Vec<&IfAddr> = plan.addresses.iter().filter(|a| !k.addresses.contains_key(*a)).collect();
    links.add_addresses(&with_index(snap, &added)?)?;
    report.addresses_added = added.into_iter().cloned().collect();
    let announce = report.addresses_added.clone();
    lap(&mut report, "addresses-add");
    let skeleton = nft::expected_skeleton(&plan.lan_interface, &plan.external_interface);
    let script = if !k.table.present || k.table.skeleton != skeleton {
        report.table_rebuilt = true;
        nft::full_script(&plan.lan_interface, &plan.external_interface, &plan.nat)
    } else {
        nft::diff_script(&k.table.nat, &plan.nat)
    };
    if !script.is_empty() {
        nft::apply(&script)?;
        report.nft_statements = script.lines().count();
    }
    lap(&mut report, "nft");
    let leaked: Vec<&IfAddr> =
        k.addresses.iter().filter(|(a, owned)| **owned && !plan.addresses.contains(*a)).map(|(a, _)| a).collect();
    links.del_addresses(&with_index(snap, &leaked)?)?;
    report.addresses_removed = leaked.into_iter().cloned().collect();
    // Routes last: removing an interface's last address makes the
    // kernel drop every route through it, so re-read them then.
    lap(&mut report, "addresses-remove");
    let emptied = report.addresses_removed.iter().any(|gone| {
        let left = |a: &IfAddr| a.interface == gone.interface && !report.addresses_removed.contains(a);
        !k.addresses.keys().chain(plan.addresses.iter()).any(left)
    });
    let routes = if !emptied {
        k.routes.clone()
    } else {
        let names: BTreeMap<u32, String> = snap.interfaces.iter().map(|(n, i)| (i.index, n.clone())).collect();
        links.owned_routes(&names)?
    };
    for r in plan.routes.difference(&routes) {
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
    let rules = crate::state::wanted_rules(plan);
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
        || !report.addresses_added.is_empty()
        || !report.addresses_removed.is_empty()
        || !report.routes_added.is_empty()
        || !report.routes_removed.is_empty();
    if report.changed || sweep_conntrack {
        if fail_sweep {
            let injected = std::io::Error::other("injected by a test");
            return Err(SyncError::Conntrack(conntrack::ConntrackError::Io(injected)));
        }
        let mut ours = k.our_addresses();
        eips_of(&plan.nat, &mut ours);
        ours.extend(plan.addresses.iter().map(|a| a.addr.addr()));
        let local = local_nets(k);
        let ct = conntrack::Conntrack::open()?;
        let stale: Vec<_> = ct.dump()?.into_iter().filter(|d| is_stale(&d.entry, plan, &ours, &local)).collect();
        report.conntrack_deleted = ct.delete(&stale)?;
    }
    lap(&mut report, "conntrack");
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
                if let Some(i) = snap.interfaces.get(&a.interface)
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

/// Every address of the namespace with its prefix: what tells the
/// gateway's own and broadcast traffic from forwarded traffic.
fn local_nets(k: &KernelState) -> Vec<ipnet::Ipv4Net> {
    k.addresses.keys().map(|a| a.addr).collect()
}

/// Every difference between `plan` and the kernel, conntrack included.
pub fn audit(plan: &GatewayPlan) -> Result<Vec<Drift>, SyncError> {
    with_links(|links| {
        let snap = read(links)?;
        let mut ours = snap.state.our_addresses();
        eips_of(&plan.nat, &mut ours);
        ours.extend(plan.addresses.iter().map(|a| a.addr.addr()));
        let local = local_nets(&snap.state);
        let dumped = conntrack::Conntrack::open()?.dump()?;
        let stale: Vec<_> = dumped.into_iter().map(|d| d.entry).filter(|e| is_stale(e, plan, &ours, &local)).collect();
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
        for a in snap.state.addresses.keys() {
            let _ = std::fs::write(promote_path(&a.interface), "1");
        }
        if snap.state.table.present {
            nft::delete_table()?;
            report.table_rebuilt = true;
        }
        let owned: Vec<&IfAddr> = snap.state.addresses.iter().filter(|(_, owned)| **owned).map(|(a, _)| a).collect();
        links.del_addresses(&with_index(&snap, &owned)?)?;
        report.addresses_removed = owned.into_iter().cloned().collect();
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
        let stale: Vec<_> = ct
            .dump()?
            .into_iter()
            .filter(|d| {
                [d.entry.orig.src, d.entry.orig.dst, d.entry.reply.src, d.entry.reply.dst]
                    .iter()
                    .any(|a| mine.contains(a))
            })
            .collect();
        report.conntrack_deleted = ct.delete(&stale)?;
        report.changed = true;
        Ok(report)
    })
}

/// The kernel state as read, for tests and `natgw audit -v`.
pub fn snapshot() -> Result<KernelState, SyncError> {
    with_links(|links| Ok(read(links)?.state))
}
