//! Which conntrack entries must go (pure). An entry is stale when it
//! carries a translation through one of natgw's addresses that the plan no
//! longer contains, or when it bypassed a translation the plan now wants
//! (a flow that started before its rule existed). Deleting it makes the
//! next packet take the current rules; a flow through a removed FloatingIp
//! or DnatRule simply stops.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use natgw_api::Protocol;
use natgw_plan::{GatewayPlan, NatTables};

/// One direction of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

/// A conntrack entry: the original and the reply direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    pub proto: u8,
    pub orig: Tuple,
    pub reply: Tuple,
}

fn snat_lookup(nat: &NatTables, ip: Ipv4Addr) -> Option<Ipv4Addr> {
    nat.fip_snat.get(&ip).copied().or_else(|| nat.snat.iter().find(|r| r.first <= ip && ip <= r.last).map(|r| r.eip))
}

fn in_ranges(ranges: &[(Ipv4Addr, Ipv4Addr)], ip: Ipv4Addr) -> bool {
    ranges.iter().any(|(a, b)| *a <= ip && ip <= *b)
}

fn proto(n: u8) -> Option<Protocol> {
    match n {
        6 => Some(Protocol::Tcp),
        17 => Some(Protocol::Udp),
        _ => None,
    }
}

fn dnat_target(nat: &NatTables, e: &CtEntry) -> Option<(Ipv4Addr, Option<u16>)> {
    if let Some(p) = proto(e.proto)
        && let Some((ip, port)) = nat.port_fwd.get(&(e.orig.dst, p, e.orig.dport))
    {
        return Some((*ip, Some(*port)));
    }
    nat.fip_dnat.get(&e.orig.dst).map(|ip| (*ip, None))
}

/// Whether a flow is the gateway's own or not forwarded at all: sent from
/// one of its addresses (IGMP reports of a bridge with an address, ARP
/// helpers), or to a multicast or broadcast address. natgw neither
/// translates nor should translate such flows.
fn not_forwarded(e: &CtEntry, local: &[Ipv4Net]) -> bool {
    let dst = e.orig.dst;
    dst.is_multicast()
        || dst.is_broadcast()
        || local.iter().any(|n| n.addr() == e.orig.src || (n.prefix_len() < 31 && n.broadcast() == dst))
}

/// `ours`: the addresses (EIPs) whose flows to judge; `local`: every
/// address of the namespace's interfaces, with its prefix. A flow from an
/// EIP is the gateway's own.
pub fn is_stale(e: &CtEntry, plan: &GatewayPlan, ours: &BTreeSet<Ipv4Addr>, local: &[Ipv4Net]) -> bool {
    let nat = &plan.nat;
    if not_forwarded(e, local) || plan.holds_eip(e.orig.src) {
        return false;
    }
    let dnatted = e.orig.dst != e.reply.src;
    let snatted = e.orig.src != e.reply.dst;
    if dnatted && ours.contains(&e.orig.dst) {
        let ok = match dnat_target(nat, e) {
            Some((ip, Some(port))) => ip == e.reply.src && port == e.reply.sport,
            Some((ip, None)) => ip == e.reply.src,
            None => false,
        };
        if !ok {
            return true;
        }
    }
    if snatted && ours.contains(&e.reply.dst) {
        let hairpin = dnatted && e.reply.dst == e.orig.dst && in_ranges(&nat.internal_nets, e.orig.src);
        if !hairpin && snat_lookup(nat, e.orig.src) != Some(e.reply.dst) {
            return true;
        }
    }
    if !dnatted && !snatted {
        // Inbound to an EIP that now forwards, but the flow was accepted
        // locally before the rule existed.
        if ours.contains(&e.orig.dst) && dnat_target(nat, e).is_some() {
            return true;
        }
        // Outbound from a translated source that left untranslated.
        let leaves = !in_ranges(&nat.internal_nets, e.orig.dst)
            && !plan.routes.iter().any(|r| r.dst.prefix_len() > 0 && r.dst.contains(&e.orig.dst));
        if leaves && snat_lookup(nat, e.orig.src).is_some() {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn t(src: &str, dst: &str, sport: u16, dport: u16) -> Tuple {
        Tuple { src: ip(src), dst: ip(dst), sport, dport }
    }
    fn plan() -> GatewayPlan {
        let mut p = GatewayPlan::default();
        p.nat.fip_dnat.insert(ip("198.51.100.10"), ip("10.0.0.5"));
        p.nat.fip_snat.insert(ip("10.0.0.5"), ip("198.51.100.10"));
        p.nat.port_fwd.insert((ip("198.51.100.11"), Protocol::Tcp, 80), (ip("10.0.0.6"), 8080));
        p.nat.internal_nets = vec![(ip("10.0.0.0"), ip("10.0.0.255"))];
        p
    }
    fn ours() -> BTreeSet<Ipv4Addr> {
        [ip("198.51.100.10"), ip("198.51.100.11"), ip("198.51.100.12")].into()
    }

    #[test]
    fn live_translations_are_kept() {
        let inbound = CtEntry {
            proto: 6,
            orig: t("198.51.100.1", "198.51.100.10", 4000, 22),
            reply: t("10.0.0.5", "198.51.100.1", 22, 4000),
        };
        let outbound = CtEntry {
            proto: 6,
            orig: t("10.0.0.5", "198.51.100.1", 4000, 22),
            reply: t("198.51.100.1", "198.51.100.10", 22, 4000),
        };
        let fwd = CtEntry {
            proto: 6,
            orig: t("198.51.100.1", "198.51.100.11", 4000, 80),
            reply: t("10.0.0.6", "198.51.100.1", 8080, 4000),
        };
        for e in [inbound, outbound, fwd] {
            assert!(!is_stale(&e, &plan(), &ours(), &[]), "{e:?}");
        }
    }

    #[test]
    fn removed_translations_in_both_directions_are_stale() {
        let mut p = plan();
        p.nat.fip_dnat.clear();
        p.nat.fip_snat.clear();
        let inbound = CtEntry {
            proto: 6,
            orig: t("198.51.100.1", "198.51.100.10", 4000, 22),
            reply: t("10.0.0.5", "198.51.100.1", 22, 4000),
        };
        let outbound = CtEntry {
            proto: 17,
            orig: t("10.0.0.5", "198.51.100.1", 4000, 53),
            reply: t("198.51.100.1", "198.51.100.10", 53, 4000),
        };
        assert!(is_stale(&inbound, &p, &ours(), &[]));
        assert!(is_stale(&outbound, &p, &ours(), &[]));
    }

    #[test]
    fn changed_port_forward_target_is_stale() {
        let e = CtEntry {
            proto: 6,
            orig: t("198.51.100.1", "198.51.100.11", 4000, 80),
            reply: t("10.0.0.7", "198.51.100.1", 8080, 4000),
        };
        assert!(is_stale(&e, &plan(), &ours(), &[]));
    }

    #[test]
    fn untranslated_flow_of_a_translated_source_is_stale() {
        let e = CtEntry {
            proto: 6,
            orig: t("10.0.0.5", "198.51.100.1", 4000, 22),
            reply: t("198.51.100.1", "10.0.0.5", 22, 4000),
        };
        assert!(is_stale(&e, &plan(), &ours(), &[]));
        let internal =
            CtEntry { proto: 6, orig: t("10.0.0.5", "10.0.0.9", 4000, 22), reply: t("10.0.0.9", "10.0.0.5", 22, 4000) };
        assert!(!is_stale(&internal, &plan(), &ours(), &[]));
    }

    #[test]
    fn foreign_translations_are_left_alone() {
        let e = CtEntry {
            proto: 6,
            orig: t("172.16.0.2", "203.0.113.1", 4000, 22),
            reply: t("203.0.113.1", "192.0.2.99", 22, 4000),
        };
        assert!(!is_stale(&e, &plan(), &ours(), &[]));
    }

    #[test]
    fn item19_the_gateways_own_multicast_and_broadcast_flows_never_count() {
        let mut p = plan();
        p.nat.snat =
            vec![natgw_plan::SnatRange { first: ip("10.0.0.0"), last: ip("10.0.0.255"), eip: ip("198.51.100.10") }];
        let local: Vec<Ipv4Net> = vec!["10.0.0.254/24".parse().unwrap(), "198.51.100.10/24".parse().unwrap()];
        let flow =
            |src: &str, dst: &str, proto: u8| CtEntry { proto, orig: t(src, dst, 0, 0), reply: t(dst, src, 0, 0) };
        // IGMP report of the LAN bridge, mDNS, a subnet broadcast.
        for e in [
            flow("10.0.0.254", "224.0.0.22", 2),
            flow("10.0.0.9", "224.0.0.251", 17),
            flow("10.0.0.9", "10.0.0.255", 17),
        ] {
            assert!(!is_stale(&e, &p, &ours(), &local), "{e:?}");
        }
        // A forwarded host that left untranslated still counts.
        assert!(is_stale(&flow("10.0.0.9", "203.0.113.1", 6), &p, &ours(), &local));
    }

    #[test]
    fn hairpin_is_kept() {
        let e = CtEntry {
            proto: 6,
            orig: t("10.0.0.9", "198.51.100.10", 4000, 22),
            reply: t("10.0.0.5", "198.51.100.10", 22, 4000),
        };
        assert!(!is_stale(&e, &plan(), &ours(), &[]));
    }
}
