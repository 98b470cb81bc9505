//! What the kernel holds for one gateway, and how it differs from a plan
//! (pure, so `audit` and `sync` agree by construction).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use natgw_plan::{GatewayPlan, IfAddr, NatTables, Route};

use crate::ctpolicy::CtEntry;
use crate::nft::{KernelTable, expected_skeleton};

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

/// A policy rule for traffic arriving on the LAN: natgw's default route
/// lives in its own table ([`crate::link::NATGW_TABLE`]), so the gateway
/// pod's own default route (to the cluster network, the API server) stays
/// as it is and only VPC traffic leaves through the external side.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LanRule {
    pub priority: u32,
    pub iif: String,
}

/// Before the main table's default: the main table without its default
/// routes (connected and VPC routes still win).
pub const RULE_MAIN: u32 = 7470;
/// Then natgw's table, which holds only the default route.
pub const RULE_EXIT: u32 = 7471;

/// The rules a plan needs: none without a default route.
pub fn wanted_rules(plan: &GatewayPlan) -> BTreeSet<LanRule> {
    if !plan.routes.iter().any(|r| r.dst.prefix_len() == 0) {
        return BTreeSet::new();
    }
    [RULE_MAIN, RULE_EXIT].map(|priority| LanRule { priority, iif: plan.lan_interface.clone() }).into()
}

impl fmt::Display for LanRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.priority {
            RULE_MAIN => write!(f, "rule {} iif {} lookup main suppress_prefixlength 0", self.priority, self.iif),
            p => write!(f, "rule {p} iif {} lookup {}", self.iif, crate::link::NATGW_TABLE),
        }
    }
}

/// The local routes a plan needs: one `/32` per EIP.
pub fn wanted_locals(plan: &GatewayPlan) -> BTreeSet<IfAddr> {
    plan.addresses
        .iter()
        .map(|a| IfAddr { interface: a.interface.clone(), addr: Ipv4Net::from(a.addr.addr()) })
        .collect()
}

/// The link routes a plan needs: each EIP's subnet, once.
pub fn wanted_subnets(plan: &GatewayPlan) -> BTreeSet<IfAddr> {
    let mut out = BTreeSet::new();
    let mut last: Option<(&str, Ipv4Net)> = None;
    for a in plan.addresses.iter().filter(|a| a.addr.prefix_len() < 32) {
        // EIPs come sorted: a subnet's come together, one allocation each.
        let net = a.addr.trunc();
        if last != Some((a.interface.as_str(), net)) {
            out.insert(IfAddr { interface: a.interface.clone(), addr: net });
            last = Some((a.interface.as_str(), net));
        }
    }
    out
}

/// The EIPs a plan has and the kernel's local routes lack, and the local
/// routes the plan no longer has: one merge of two sorted sets, no
/// allocation, so a change costs little however many EIPs there are.
pub fn eip_diff<'a>(eips: &'a BTreeSet<IfAddr>, locals: &'a BTreeSet<IfAddr>) -> (Vec<&'a IfAddr>, Vec<&'a IfAddr>) {
    let key = |a: &'a IfAddr| (a.interface.as_str(), a.addr.addr());
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let (mut e, mut l) = (eips.iter().peekable(), locals.iter().peekable());
    loop {
        match (e.peek(), l.peek()) {
            (Some(a), Some(b)) => match key(a).cmp(&key(b)) {
                std::cmp::Ordering::Less => added.extend(e.next()),
                std::cmp::Ordering::Greater => removed.extend(l.next()),
                std::cmp::Ordering::Equal => {
                    e.next();
                    l.next();
                }
            },
            (Some(_), None) => added.extend(e.next()),
            (None, Some(_)) => removed.extend(l.next()),
            (None, None) => return (added, removed),
        }
    }
}

pub fn eips_of(nat: &NatTables, out: &mut BTreeSet<Ipv4Addr>) {
    out.extend(nat.fip_dnat.keys().copied());
    out.extend(nat.fip_snat.values().copied());
    out.extend(nat.port_fwd.keys().map(|(eip, _, _)| *eip));
    out.extend(nat.snat.iter().map(|r| r.eip));
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

fn map_drift<K: Ord, V: PartialEq>(
    out: &mut Vec<Drift>,
    name: &str,
    have: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    show: impl Fn(&K, &V) -> String,
) {
    for (k, v) in have {
        if want.get(k) != Some(v) {
            out.push(Drift::Leaked(format!("nft {name} element {}", show(k, v))));
        }
    }
    for (k, v) in want {
        if have.get(k) != Some(v) {
            out.push(Drift::Missing(format!("nft {name} element {}", show(k, v))));
        }
    }
}

fn list_drift<T: PartialEq>(out: &mut Vec<Drift>, name: &str, have: &[T], want: &[T], show: impl Fn(&T) -> String) {
    for x in have.iter().filter(|x| !want.contains(x)) {
        out.push(Drift::Leaked(format!("nft {name} element {}", show(x))));
    }
    for x in want.iter().filter(|x| !have.contains(x)) {
        out.push(Drift::Missing(format!("nft {name} element {}", show(x))));
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
    let (have, want) = (&k.table.nat, &plan.nat);
    map_drift(&mut out, "fip_dnat", &have.fip_dnat, &want.fip_dnat, |k, v| format!("{k} : {v}"));
    map_drift(&mut out, "fip_snat", &have.fip_snat, &want.fip_snat, |k, v| format!("{k} : {v}"));
    map_drift(&mut out, "port_fwd", &have.port_fwd, &want.port_fwd, |(e, p, pt), (ip, to)| {
        format!("{e} . {p} . {pt} : {ip} . {to}")
    });
    list_drift(&mut out, "snat_nets", &have.snat, &want.snat, |r| format!("{}-{} : {}", r.first, r.last, r.eip));
    list_drift(&mut out, "internal_nets", &have.internal_nets, &want.internal_nets, |(a, b)| format!("{a}-{b}"));
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
                interface: format!("ext{}", i % 2),
                addr: Ipv4Net::new(Ipv4Addr::new(198, 51, 100, *host), 24 + prefix % 9).unwrap(),
            })
            .collect()
    }

    proptest! {
        /// The merge equals the set differences it replaces.
        #[test]
        fn eip_diff_is_the_set_difference(want in prop::collection::vec(any::<(u8, u8, u8)>(), 0..40),
                                          have in prop::collection::vec(any::<(u8, u8, u8)>(), 0..40)) {
            let plan = eips(&want);
            let locals: BTreeSet<IfAddr> = eips(&have)
                .into_iter()
                .map(|a| IfAddr { interface: a.interface, addr: Ipv4Net::from(a.addr.addr()) })
                .collect();
            // One plan entry per address, as the planner guarantees.
            let mut seen = BTreeSet::new();
            let plan: BTreeSet<IfAddr> =
                plan.into_iter().filter(|a| seen.insert((a.interface.clone(), a.addr.addr()))).collect();
            let p = GatewayPlan { addresses: plan.clone(), ..Default::default() };
            let want_locals = wanted_locals(&p);
            let (added, removed) = eip_diff(&plan, &locals);
            let added: BTreeSet<IfAddr> =
                added.into_iter().map(|a| IfAddr { interface: a.interface.clone(), addr: Ipv4Net::from(a.addr.addr()) }).collect();
            let removed: BTreeSet<IfAddr> = removed.into_iter().cloned().collect();
            prop_assert_eq!(added, want_locals.difference(&locals).cloned().collect::<BTreeSet<_>>());
            prop_assert_eq!(removed, locals.difference(&want_locals).cloned().collect::<BTreeSet<_>>());
        }
    }
}
