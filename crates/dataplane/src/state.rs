//! What the kernel holds for one gateway, and how it differs from a plan
//! (pure, so `audit` and `sync` agree by construction).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use natgw_plan::{GatewayPlan, IfAddr, NatTables, Route};

use crate::ctpolicy::CtEntry;
use crate::nft::{KernelTable, expected_skeleton};

/// The kernel's side, read in one pass.
#[derive(Clone, Debug, Default)]
pub struct KernelState {
    pub table: KernelTable,
    /// IPv4 addresses on every interface, with whether natgw owns them.
    pub addresses: BTreeMap<IfAddr, bool>,
    /// Routes natgw owns.
    pub routes: BTreeSet<Route>,
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
        if *owned && !plan.addresses.contains(a) {
            out.push(Drift::Leaked(format!("address {} dev {}", a.addr, a.interface)));
        }
    }
    for a in &plan.addresses {
        if !k.addresses.contains_key(a) {
            out.push(Drift::Missing(format!("address {} dev {}", a.addr, a.interface)));
        }
    }
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
    let interfaces: BTreeSet<&String> = plan.addresses.iter().map(|a| &a.interface).collect();
    for name in interfaces.into_iter().filter(|n| !k.promote_secondaries.contains(*n)) {
        out.push(Drift::Missing(format!("net.ipv4.conf.{name}.promote_secondaries=1")));
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
