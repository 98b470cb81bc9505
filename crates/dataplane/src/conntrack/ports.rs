//! Port accounting (pure): from conntrack entries, how many translated
//! connections each EIP carries per protocol and destination, and how
//! close each (EIP, protocol, destination) is to running out of source
//! ports. The kernel needs one free source port per (EIP, destination
//! address, destination port, protocol): that, not the EIP alone, is what
//! saturates.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::conntrack::policy::CtEntry;

/// Source ports SNAT may use: nf_nat keeps a source port below 1024 below
/// 1024 and maps the others into 1024-65535.
pub const PORTS: u32 = 65535 - 1024 + 1;

/// A destination as seen from an EIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Destination {
    pub addr: Ipv4Addr,
    pub port: u16,
}

/// One EIP's use, per protocol number.
#[derive(Clone, Debug, PartialEq)]
pub struct EipUsage {
    pub eip: Ipv4Addr,
    pub proto: u8,
    /// Translated connections through this EIP (both directions).
    pub connections: u32,
    /// The busiest destinations of connections leaving through the EIP,
    /// most connections first, at most `top` of them.
    pub destinations: Vec<(Destination, u32)>,
}

impl EipUsage {
    /// The busiest destination's share of the source ports, 0 to 1.
    pub fn saturation(&self) -> f64 {
        self.destinations.first().map_or(0.0, |(_, n)| f64::from(*n) / f64::from(PORTS))
    }
}

/// Counts the entries that natgw translated through one of `eips`:
/// outbound (source translated to an EIP: SNAT and FloatingIps) by
/// destination, inbound (destination is an EIP) in the total only.
/// Returns the EIPs, busiest first.
pub fn account(entries: &[CtEntry], eips: &BTreeSet<Ipv4Addr>, top: usize) -> Vec<EipUsage> {
    let mut out: BTreeMap<(Ipv4Addr, u8), (u32, BTreeMap<Destination, u32>)> = BTreeMap::new();
    for e in entries {
        let snatted = e.orig.src != e.reply.dst && eips.contains(&e.reply.dst);
        let inbound = eips.contains(&e.orig.dst);
        if snatted {
            let slot = out.entry((e.reply.dst, e.proto)).or_default();
            slot.0 += 1;
            // The destination as the kernel keys the port: the reply's source.
            *slot.1.entry(Destination { addr: e.reply.src, port: e.reply.sport }).or_default() += 1;
        } else if inbound {
            out.entry((e.orig.dst, e.proto)).or_default().0 += 1;
        }
    }
    let mut usage: Vec<EipUsage> = out
        .into_iter()
        .map(|((eip, proto), (connections, dest))| {
            let mut destinations: Vec<(Destination, u32)> = dest.into_iter().collect();
            destinations.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            destinations.truncate(top);
            EipUsage { eip, proto, connections, destinations }
        })
        .collect();
    usage.sort_by(|a, b| b.connections.cmp(&a.connections).then((a.eip, a.proto).cmp(&(b.eip, b.proto))));
    usage
}

/// Conntrack insert failures of the namespace, summed over CPUs: packets
/// dropped because no unique translated tuple was free (source port
/// exhaustion), and the rare clash of two CPUs racing for one.
pub fn insert_failures(stat: &str) -> Option<u64> {
    let mut lines = stat.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let column = header.iter().position(|h| *h == "insert_failed")?;
    lines
        .map(|l| l.split_whitespace().nth(column).and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0))
        .sum::<u64>()
        .into()
}

/// Protocol number as a name.
pub fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::policy::Tuple;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn snat(src: &str, sport: u16, dst: &str, dport: u16, eip: &str, eport: u16) -> CtEntry {
        CtEntry {
            proto: 6,
            orig: Tuple { src: ip(src), dst: ip(dst), sport, dport },
            reply: Tuple { src: ip(dst), dst: ip(eip), sport: dport, dport: eport },
        }
    }

    #[test]
    fn outbound_connections_count_per_destination_and_the_busiest_lead() {
        let eips: BTreeSet<Ipv4Addr> = [ip("198.51.100.10"), ip("198.51.100.11")].into();
        let mut entries = Vec::new();
        for p in 0..30 {
            entries.push(snat("10.0.0.5", 40000 + p, "203.0.113.1", 443, "198.51.100.10", 1024 + p));
        }
        for p in 0..5 {
            entries.push(snat("10.0.0.6", 40000 + p, "203.0.113.2", 53, "198.51.100.10", 2000 + p));
        }
        entries.push(snat("10.0.0.7", 5000, "203.0.113.1", 443, "198.51.100.11", 5000));
        // Inbound to a FloatingIp: counted, no destination.
        entries.push(CtEntry {
            proto: 6,
            orig: Tuple { src: ip("203.0.113.9"), dst: ip("198.51.100.11"), sport: 1111, dport: 22 },
            reply: Tuple { src: ip("10.0.0.7"), dst: ip("203.0.113.9"), sport: 22, dport: 1111 },
        });
        // Not through an EIP: ignored.
        entries.push(snat("10.0.0.8", 1, "203.0.113.1", 443, "192.0.2.1", 1));
        let u = account(&entries, &eips, 1);
        assert_eq!(u.len(), 2);
        assert_eq!((u[0].eip, u[0].connections), (ip("198.51.100.10"), 35));
        assert_eq!(u[0].destinations, vec![(Destination { addr: ip("203.0.113.1"), port: 443 }, 30)]);
        assert!((u[0].saturation() - 30.0 / 64512.0).abs() < 1e-12);
        assert_eq!((u[1].connections, u[1].destinations.len()), (2, 1));
    }

    #[test]
    fn insert_failures_sum_the_cpus_hex_columns() {
        let stat = "entries  clashres found invalid insert insert_failed drop early_drop\n\
                    00000010 00000000 00000000 00000000 00000000 0000000a 0000000a 00000000\n\
                    00000010 00000000 00000000 00000000 00000000 00000001 00000001 00000000\n";
        assert_eq!(insert_failures(stat), Some(11));
        assert_eq!(insert_failures("nothing here"), None);
    }
}
