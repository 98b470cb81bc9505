//! Longest-prefix-wins SNAT as disjoint ranges. nftables interval maps
//! refuse overlapping elements, so overlapping rules are split here: each
//! address maps to the EIP of the most specific rule containing it.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Serialize;

/// An inclusive address range and the EIP its sources are translated to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct SnatRange {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
    pub eip: Ipv4Addr,
}

/// Splits rules into sorted, disjoint, maximal ranges. Rules must have
/// distinct networks (the planner resolves duplicates before).
pub fn longest_prefix_ranges(rules: &[(Ipv4Net, Ipv4Addr)]) -> Vec<SnatRange> {
    // Every start and one-past-end of a network is a boundary; between two
    // boundaries the most specific covering rule cannot change.
    let mut bounds: Vec<u64> = rules
        .iter()
        .flat_map(|(net, _)| [u32::from(net.network()) as u64, u32::from(net.broadcast()) as u64 + 1])
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut out: Vec<SnatRange> = Vec::new();
    for pair in bounds.windows(2) {
        let (start, end) = (pair[0], pair[1] - 1);
        let probe = Ipv4Addr::from(start as u32);
        let best = rules.iter().filter(|(net, _)| net.contains(&probe)).max_by_key(|(net, _)| net.prefix_len());
        let Some((_, eip)) = best else { continue };
        match out.last_mut() {
            Some(last) if last.eip == *eip && u32::from(last.last) as u64 + 1 == start => {
                last.last = Ipv4Addr::from(end as u32);
            }
            _ => out.push(SnatRange { first: probe, last: Ipv4Addr::from(end as u32), eip: *eip }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn nested_prefix_splits_outer() {
        let r = longest_prefix_ranges(&[(net("10.0.0.0/16"), ip("1.1.1.1")), (net("10.0.1.0/24"), ip("2.2.2.2"))]);
        assert_eq!(
            r,
            vec![
                SnatRange { first: ip("10.0.0.0"), last: ip("10.0.0.255"), eip: ip("1.1.1.1") },
                SnatRange { first: ip("10.0.1.0"), last: ip("10.0.1.255"), eip: ip("2.2.2.2") },
                SnatRange { first: ip("10.0.2.0"), last: ip("10.0.255.255"), eip: ip("1.1.1.1") },
            ]
        );
    }

    #[test]
    fn whole_space_and_host_routes() {
        let r = longest_prefix_ranges(&[(net("0.0.0.0/0"), ip("1.1.1.1")), (net("255.255.255.255/32"), ip("2.2.2.2"))]);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1], SnatRange { first: ip("255.255.255.255"), last: ip("255.255.255.255"), eip: ip("2.2.2.2") });
    }

    #[test]
    fn adjacent_same_eip_merge() {
        let r = longest_prefix_ranges(&[(net("10.0.0.0/25"), ip("1.1.1.1")), (net("10.0.0.128/25"), ip("1.1.1.1"))]);
        assert_eq!(r, vec![SnatRange { first: ip("10.0.0.0"), last: ip("10.0.0.255"), eip: ip("1.1.1.1") }]);
    }

    fn arb_rules() -> impl Strategy<Value = Vec<(Ipv4Net, Ipv4Addr)>> {
        // Few distinct networks in a small space so that they overlap often.
        proptest::collection::btree_map((0u32..64, 20u8..=32), 0u8..4, 0..12).prop_map(|m| {
            let mut seen = std::collections::BTreeSet::new();
            m.into_iter()
                .filter_map(|((a, len), e)| {
                    let n = Ipv4Net::new(Ipv4Addr::from((10u32 << 24) | (a << 10)), len).ok()?.trunc();
                    seen.insert(n).then_some((n, Ipv4Addr::new(192, 0, 2, e)))
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn every_address_gets_its_longest_prefix(rules in arb_rules(), probes in proptest::collection::vec(0u32..(1 << 17), 50)) {
            let ranges = longest_prefix_ranges(&rules);
            for w in ranges.windows(2) {
                prop_assert!(w[0].last < w[1].first, "ranges overlap or are unsorted");
                prop_assert!(!(w[0].eip == w[1].eip && u32::from(w[0].last) + 1 == u32::from(w[1].first)), "not merged");
            }
            for p in probes {
                let addr = Ipv4Addr::from((10u32 << 24) + p * 4);
                let want = rules.iter().filter(|(n, _)| n.contains(&addr)).max_by_key(|(n, _)| n.prefix_len()).map(|(_, e)| *e);
                let got = ranges.iter().find(|r| r.first <= addr && addr <= r.last).map(|r| r.eip);
                prop_assert_eq!(want, got, "address {}", addr);
            }
        }
    }
}
