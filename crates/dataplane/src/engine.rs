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
    // One netlink connection per worker thread, opened on first use.
    static LINKS: RefCell<Option<Links>> = const { RefCell::new(None) };
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

struct Snapshot {
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
        forwarding: sysctl_on(FORWARD),
        promote_secondaries: interfaces.keys().filter(|n| sysctl_on(&promote_path(n))).cloned().collect(),
    };
    Ok(Snapshot { state, interfaces })
}

fn index(s: &Snapshot, name: &str) -> Result<u32, SyncError> {
    s.interfaces.get(name).map(|i| i.index).ok_or_else(|| SyncError::Link(LinkError::NoInterface(name.into())))
}

/// Converges the namespace to `plan`. `sweep_conntrack` forces a conntrack
/// pass even when nothing changed (first sync after start).
pub fn sync(plan: &GatewayPlan, sweep_conntrack: bool) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    with_links(|links| {
        let snap = read(links)?;
        for name in [&plan.lan_interface, &plan.external_interface] {
            index(&snap, name)?;
        }
        let k = &snap.state;
        let mut report = SyncReport::default();
        if !k.forwarding {
            std::fs::write(FORWARD, "1").map_err(SyncError::Sysctl)?;
            report.changed = true;
        }
        let managed: BTreeSet<&String> =
            plan.addresses.iter().chain(k.addresses.keys()).map(|a| &a.interface).collect();
        for name in
            managed.into_iter().filter(|n| !k.promote_secondaries.contains(*n) && snap.interfaces.contains_key(*n))
        {
            std::fs::write(promote_path(name), "1").map_err(SyncError::Sysctl)?;
            report.changed = true;
        }
        // Additions first: a new translation never points at a missing
        // address, and nothing is removed before the table commits.
        let mut announce = Vec::new();
        for a in plan.addresses.iter().filter(|a| !k.addresses.contains_key(*a)) {
            links.add_address(index(&snap, &a.interface)?, a.addr)?;
            report.addresses_added.push(a.clone());
            announce.push(a.clone());
        }
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
        let leaked: Vec<&IfAddr> =
            k.addresses.iter().filter(|(a, owned)| **owned && !plan.addresses.contains(*a)).map(|(a, _)| a).collect();
        for a in leaked {
            links.del_address(index(&snap, &a.interface)?, a.addr)?;
            report.addresses_removed.push(a.clone());
        }
        // Routes last, from a fresh read: removing an interface's last
        // address makes the kernel drop every route through it.
        let names: BTreeMap<u32, String> = snap.interfaces.iter().map(|(n, i)| (i.index, n.clone())).collect();
        let routes = links.owned_routes(&names)?;
        for r in plan.routes.difference(&routes) {
            links.add_route(index(&snap, &r.interface)?, r)?;
            if !k.routes.contains(r) {
                report.routes_added.push(r.clone());
            }
        }
        let stale_routes: Vec<&Route> = routes.difference(&plan.routes).collect();
        for r in stale_routes {
            // An interface that vanished took its routes along.
            if let Ok(i) = index(&snap, &r.interface) {
                links.del_route(i, r)?;
            }
            report.routes_removed.push(r.clone());
        }
        report.changed |= report.nft_statements > 0
            || !report.addresses_added.is_empty()
            || !report.addresses_removed.is_empty()
            || !report.routes_added.is_empty()
            || !report.routes_removed.is_empty();
        if report.changed || sweep_conntrack {
            let mut ours = k.our_addresses();
            eips_of(&plan.nat, &mut ours);
            ours.extend(plan.addresses.iter().map(|a| a.addr.addr()));
            let stale: Vec<_> = conntrack::dump()?.into_iter().filter(|d| is_stale(&d.entry, plan, &ours)).collect();
            report.conntrack_deleted = conntrack::delete(&stale)?;
        }
        for a in announce {
            if let Some(mac) = snap.interfaces.get(&a.interface).and_then(|i| i.mac) {
                // Best effort: an unannounced address still works once
                // neighbours' caches expire.
                if let Err(e) = garp::announce(index(&snap, &a.interface)?, mac, a.addr.addr()) {
                    tracing::warn!(address = %a.addr, error = %e, "gratuitous ARP failed");
                }
            }
        }
        report.duration = started.elapsed();
        Ok(report)
    })
}

/// Every difference between `plan` and the kernel, conntrack included.
pub fn audit(plan: &GatewayPlan) -> Result<Vec<Drift>, SyncError> {
    with_links(|links| {
        let snap = read(links)?;
        let mut ours = snap.state.our_addresses();
        eips_of(&plan.nat, &mut ours);
        ours.extend(plan.addresses.iter().map(|a| a.addr.addr()));
        let stale: Vec<_> =
            conntrack::dump()?.into_iter().map(|d| d.entry).filter(|e| is_stale(e, plan, &ours)).collect();
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
        for (a, _) in snap.state.addresses.iter().filter(|(_, owned)| **owned) {
            links.del_address(index(&snap, &a.interface)?, a.addr)?;
            report.addresses_removed.push(a.clone());
        }
        for r in &snap.state.routes {
            if let Ok(i) = index(&snap, &r.interface) {
                links.del_route(i, r)?;
            }
            report.routes_removed.push(r.clone());
        }
        let mine: BTreeSet<_> = ours;
        let stale: Vec<_> = conntrack::dump()?
            .into_iter()
            .filter(|d| {
                [d.entry.orig.src, d.entry.orig.dst, d.entry.reply.src, d.entry.reply.dst]
                    .iter()
                    .any(|a| mine.contains(a))
            })
            .collect();
        report.conntrack_deleted = conntrack::delete(&stale)?;
        report.changed = true;
        Ok(report)
    })
}

/// The kernel state as read, for tests and `natgw audit -v`.
pub fn snapshot() -> Result<KernelState, SyncError> {
    with_links(|links| Ok(read(links)?.state))
}
