//! What the kernel holds for one gateway, and how it differs from a plan
//! (pure, so `audit` and `sync` agree by construction).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use imbl::OrdSet;
use ipnet::Ipv4Net;

use natgw_plan::{GatewayPlan, IfAddr, NatTables, Route, holds_address as holds};

use crate::conntrack::policy::CtEntry;
use crate::nft::elements::GATEWAY;
use crate::nft::{KernelTable, expected_skeleton};
use crate::route::marks::{LanRule, wanted_rules};

/// The kernel's side, read in one pass.
#[derive(Clone, Debug, Default)]
pub struct KernelState {
    pub table: KernelTable,
    /// IPv4 addresses on every interface, with whether natgw owns them
    /// (natgw no longer adds any: an owned one is left by an earlier
    /// version and goes).
    pub addresses: BTreeMap<IfAddr, bool>,
    /// Routes natgw owns.
    pub routes: BTreeSet<Route>,
    /// EIPs natgw holds: its local routes, each a `/32`.
    pub locals: BTreeSet<IfAddr>,
    /// Link routes natgw holds for the EIPs' subnets.
    pub subnets: BTreeSet<IfAddr>,
    /// The same EIPs as a plan spells them (`held_eips`): what a change
    /// is diffed against. After a sync it is the plan's own set, so the
    /// next plan derived from that one differs from it in O(change).
    pub eips: OrdSet<IfAddr>,
    /// Policy rules natgw owns.
    pub rules: BTreeSet<LanRule>,
    pub forwarding: bool,
    /// Interfaces with net.ipv4.conf.<if>.promote_secondaries=1.
    pub promote_secondaries: BTreeSet<String>,
}

impl KernelState {
    /// Every address natgw holds or translates to: the EIPs it must keep
    /// conntrack clean for.
    pub fn our_addresses(&self) -> BTreeSet<Ipv4Addr> {
        let mut ours: BTreeSet<Ipv4Addr> =
            self.addresses.iter().filter(|(_, owned)| **owned).map(|(a, _)| a.addr.addr()).collect();
        ours.extend(self.locals.iter().map(|a| a.addr.addr()));
        eips_of(&self.table.nat, &mut ours);
        ours
    }
}

/// The local routes a plan needs: one `/32` per EIP.
pub fn wanted_locals(plan: &GatewayPlan) -> BTreeSet<IfAddr> {
    plan.addresses
        .iter()
        .map(|a| IfAddr { interface: a.interface.clone(), addr: Ipv4Net::from(a.addr.addr()) })
        .collect()
}

/// The link routes a plan needs: each EIP's subnet, once. The planner
/// gives every EIP of an interface its subnet's prefix, and EIPs come
/// sorted, so one lookup per subnet skips that subnet's EIPs: O(subnets
/// × log EIPs), not a walk of every EIP on each change.
pub fn wanted_subnets(plan: &GatewayPlan) -> BTreeSet<IfAddr> {
    use std::ops::Bound::{Excluded, Unbounded};
    let mut out = BTreeSet::new();
    let mut next = plan.addresses.get_min().cloned();
    while let Some(a) = next {
        let last = if a.addr.prefix_len() < 32 {
            let net = a.addr.trunc();
            out.insert(IfAddr { interface: a.interface.clone(), addr: net });
            IfAddr { interface: a.interface, addr: Ipv4Net::new(net.broadcast(), 32).unwrap_or(a.addr) }
        } else {
            a
        };
        next = plan.addresses.range::<_, IfAddr>((Excluded(&last), Unbounded)).next().cloned();
    }
    out
}

/// The EIPs natgw holds, as a plan spells them: each local route with the
/// prefix of its subnet route on the same interface (`/32` without one).
pub fn held_eips(locals: &BTreeSet<IfAddr>, subnets: &BTreeSet<IfAddr>) -> OrdSet<IfAddr> {
    locals
        .iter()
        .map(|l| {
            let eip = l.addr.addr();
            let net = subnets.iter().find(|s| s.interface == l.interface && s.addr.contains(&eip));
            let addr = net.map_or(l.addr, |n| Ipv4Net::new(eip, n.addr.prefix_len()).unwrap_or(l.addr));
            IfAddr { interface: l.interface.clone(), addr }
        })
        .collect()
}

/// The EIPs a plan has and the kernel lacks, and those the kernel holds
/// and the plan no longer has, compared by interface and address (a new
/// prefix is a subnet route's business, not the EIP's). The diff skips
/// what the two sets share: O(change) for a plan derived from the held
/// one.
pub fn eip_diff<'a>(held: &'a OrdSet<IfAddr>, want: &'a OrdSet<IfAddr>) -> (Vec<&'a IfAddr>, Vec<&'a IfAddr>) {
    use imbl::ordset::DiffItem;
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for d in held.diff(want) {
        match d {
            DiffItem::Add(a) if !holds(held, &a.interface, a.addr.addr()) => added.push(a),
            DiffItem::Remove(a) if !holds(want, &a.interface, a.addr.addr()) => removed.push(a),
            _ => {}
        }
    }
    (added, removed)
}

/// The EIPs whose translation differs between two tables, on either side:
/// the addresses a sweep of that change must judge flows through.
pub fn touched_eips(have: &NatTables, want: &NatTables, out: &mut BTreeSet<Ipv4Addr>) {
    for set in GATEWAY {
        set.touched(have, want, out);
    }
}

pub fn eips_of(nat: &NatTables, out: &mut BTreeSet<Ipv4Addr>) {
    for set in GATEWAY {
        set.public(nat, out);
    }
}

/// One difference between plan and kernel.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Drift {
    /// natgw's state the plan does not want.
    Leaked(String),
    /// State the plan wants that the kernel lacks.
    Missing(String),
    /// natgw's fixed rules differ from what natgw writes.
    Modified(String),
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::Leaked(s) => write!(f, "leaked:   {s}"),
            Drift::Missing(s) => write!(f, "missing:  {s}"),
            Drift::Modified(s) => write!(f, "modified: {s}"),
        }
    }
}

/// Every difference, sorted. `stale` are conntrack entries found stale.
pub fn drift(plan: &GatewayPlan, k: &KernelState, stale: &[CtEntry]) -> Vec<Drift> {
    let mut out = Vec::new();
    if !k.table.present {
        out.push(Drift::Missing(format!("nft table {} {}", crate::nft::FAMILY, crate::nft::TABLE)));
    } else if k.table.skeleton != expected_skeleton(&plan.lan_interface, &plan.external_interface) {
        out.push(Drift::Modified(format!(
            "nft table {} {}: sets, chains or fixed rules differ",
            crate::nft::FAMILY,
            crate::nft::TABLE
        )));
    }
    for set in GATEWAY {
        set.drift(&k.table.nat, &plan.nat, &mut out);
    }
    for (a, owned) in &k.addresses {
        if *owned {
            out.push(Drift::Leaked(format!("address {} dev {}", a.addr, a.interface)));
        }
    }
    let show = |what: &str, a: &IfAddr| format!("{what} {} dev {}", a.addr, a.interface);
    let locals = wanted_locals(plan);
    out.extend(k.locals.difference(&locals).map(|a| Drift::Leaked(show("eip local", a))));
    out.extend(locals.difference(&k.locals).map(|a| Drift::Missing(show("eip local", a))));
    let subnets = wanted_subnets(plan);
    out.extend(k.subnets.difference(&subnets).map(|a| Drift::Leaked(show("eip subnet route", a))));
    out.extend(subnets.difference(&k.subnets).map(|a| Drift::Missing(show("eip subnet route", a))));
    for r in k.routes.difference(&plan.routes) {
        out.push(Drift::Leaked(format!("route {} via {} dev {}", r.dst, r.via, r.interface)));
    }
    for r in plan.routes.difference(&k.routes) {
        out.push(Drift::Missing(format!("route {} via {} dev {}", r.dst, r.via, r.interface)));
    }
    let rules = wanted_rules(plan);
    out.extend(k.rules.difference(&rules).map(|r| Drift::Leaked(r.to_string())));
    out.extend(rules.difference(&k.rules).map(|r| Drift::Missing(r.to_string())));
    if !k.forwarding {
        out.push(Drift::Missing("net.ipv4.ip_forward=1".into()));
    }
    for e in stale {
        out.push(Drift::Leaked(format!(
            "conntrack proto {} {}:{} -> {}:{} (reply {}:{} -> {}:{})",
            e.proto,
            e.orig.src,
            e.orig.sport,
            e.orig.dst,
            e.orig.dport,
            e.reply.src,
            e.reply.sport,
            e.reply.dst,
            e.reply.dport
        )));
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn eips(items: &[(u8, u8, u8)]) -> BTreeSet<IfAddr> {
        items
            .iter()
            .map(|(i, host, prefix)| IfAddr {
                interface: format!("ext{}", i % 2).into(),
                addr: Ipv4Net::new(Ipv4Addr::new(198, 51, 100, *host), 24 + prefix % 9).unwrap(),
            })
            .collect()
    }

    fn local(a: &IfAddr) -> IfAddr {
        IfAddr { interface: a.interface.clone(), addr: Ipv4Net::from(a.addr.addr()) }
    }

    /// One plan entry per address, as the planner guarantees.
    fn one_per_address(set: BTreeSet<IfAddr>) -> OrdSet<IfAddr> {
        let mut seen = BTreeSet::new();
        set.into_iter().filter(|a| seen.insert((a.interface.clone(), a.addr.addr()))).collect()
    }

    proptest! {
        /// The diff of held and wanted EIPs equals the set differences of
        /// their local routes, whatever prefixes either side spells.
        #[test]
        fn eip_diff_is_the_set_difference(want in prop::collection::vec(any::<(u8, u8, u8)>(), 0..40),
                                          have in prop::collection::vec(any::<(u8, u8, u8)>(), 0..40),
                                          edits in prop::collection::vec(any::<(bool, u8, u8, u8)>(), 0..6)) {
            let held = one_per_address(eips(&have));
            let plan = one_per_address(eips(&want));
            let locals: BTreeSet<IfAddr> = held.iter().map(local).collect();
            // A plan derived from the held set shares its structure.
            let mut derived = held.clone();
            for (add, i, host, prefix) in edits {
                let a = eips(&[(i, host, prefix)]).into_iter().next().unwrap();
                if add && !holds(&derived, &a.interface, a.addr.addr()) { derived.insert(a); } else { derived.remove(&a); }
            }
            for want in [plan, derived] {
                let want_locals = wanted_locals(&GatewayPlan { addresses: want.clone(), ..Default::default() });
                let (added, removed) = eip_diff(&held, &want);
                let added: BTreeSet<IfAddr> = added.into_iter().map(local).collect();
                let removed: BTreeSet<IfAddr> = removed.into_iter().map(local).collect();
                prop_assert_eq!(added, want_locals.difference(&locals).cloned().collect::<BTreeSet<_>>());
                prop_assert_eq!(removed, locals.difference(&want_locals).cloned().collect::<BTreeSet<_>>());
            }
        }

        /// Jumping from subnet to subnet finds the subnets a walk finds, when
        /// every EIP of an interface has one prefix (as planned).
        #[test]
        fn wanted_subnets_jumps_to_each_subnet(want in prop::collection::vec(any::<(u8, u8)>(), 0..60),
                                               prefixes in any::<(u8, u8)>()) {
            let items: Vec<(u8, u8, u8)> =
                want.iter().map(|(i, h)| (*i, *h, if i % 2 == 0 { prefixes.0 } else { prefixes.1 })).collect();
            let plan = GatewayPlan { addresses: one_per_address(eips(&items)), ..Default::default() };
            let walked: BTreeSet<IfAddr> = plan
                .addresses
                .iter()
                .filter(|a| a.addr.prefix_len() < 32)
                .map(|a| IfAddr { interface: a.interface.clone(), addr: a.addr.trunc() })
                .collect();
            prop_assert_eq!(wanted_subnets(&plan), walked);
        }

        /// The EIPs held back from local routes and subnet routes are the
        /// plan's when the kernel holds what the plan wants.
        #[test]
        fn held_eips_read_back_the_plan(want in prop::collection::vec(any::<(u8, u8)>(), 0..60), prefix in any::<u8>()) {
            let items: Vec<(u8, u8, u8)> = want.iter().map(|(i, h)| (*i, *h, prefix)).collect();
            let plan = GatewayPlan { addresses: one_per_address(eips(&items)), ..Default::default() };
            prop_assert_eq!(held_eips(&wanted_locals(&plan), &wanted_subnets(&plan)), plan.addresses);
        }
    }
}
