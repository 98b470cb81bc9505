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
///
/// Two CIDR blocks are nested or disjoint, so one walk in address order
/// with a stack of the blocks open at that point does it: O(S log S). It
/// looked up every rule at every boundary before, O(S²), which made a
/// change to one of 20,000 SnatRules cost seconds.
pub fn longest_prefix_ranges(rules: &[(Ipv4Net, Ipv4Addr)]) -> Vec<SnatRange> {
    let mut blocks: Vec<(u64, u64, u8, Ipv4Addr)> = rules
        .iter()
        .map(|(net, eip)| (u32::from(net.network()) as u64, u32::from(net.broadcast()) as u64, net.prefix_len(), *eip))
        .collect();
    // By start, the wider block first: a block opens inside the one below it.
    blocks.sort_unstable_by_key(|&(start, _, len, _)| (start, len));
    let mut out: Vec<SnatRange> = Vec::new();
    // Open blocks (last address, EIP), innermost on top; `at` is the first
    // address not yet given out.
    let mut open: Vec<(u64, Ipv4Addr)> = Vec::new();
    let mut at: u64 = 0;
    for (start, end, _, eip) in blocks {
        close_before(&mut open, &mut at, start, &mut out);
        if let Some(&(_, outer)) = open.last()
            && at < start
        {
            emit(&mut out, at, start - 1, outer);
        }
        at = start;
        open.push((end, eip));
    }
    close_before(&mut open, &mut at, u64::MAX, &mut out);
    out
}

/// Closes every open block that ends before `next`, giving out its rest.
fn close_before(open: &mut Vec<(u64, Ipv4Addr)>, at: &mut u64, next: u64, out: &mut Vec<SnatRange>) {
    while let Some(&(end, eip)) = open.last() {
        if end >= next {
            return;
        }
        if *at <= end {
            emit(out, *at, end, eip);
            *at = end + 1;
        }
        open.pop();
    }
}

/// Appends `first..=last` to `eip`, merged with the range before when
/// they touch and share the EIP.
fn emit(out: &mut Vec<SnatRange>, first: u64, last: u64, eip: Ipv4Addr) {
    match out.last_mut() {
        Some(prev) if prev.eip == eip && u32::from(prev.last) as u64 + 1 == first => {
            prev.last = Ipv4Addr::from(last as u32);
        }
        _ => out.push(SnatRange { first: Ipv4Addr::from(first as u32), last: Ipv4Addr::from(last as u32), eip }),
    }
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

    /// The first implementation: the most specific rule looked up at every
    /// boundary, O(S²). The oracle of the one above.
    fn reference(rules: &[(Ipv4Net, Ipv4Addr)]) -> Vec<SnatRange> {
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
            emit(&mut out, start, end, *eip);
        }
        out
    }

    #[test]
    fn twenty_thousand_rules_take_one_sort() {
        // /24s in a /8 of their own, a /16 around each 256 of them.
        let eip = |i: u32| Ipv4Addr::from(0xC000_0200 + (i % 200));
        let mut rules: Vec<(Ipv4Net, Ipv4Addr)> = (0..20_000u32)
            .map(|i| (Ipv4Net::new(Ipv4Addr::from((10 << 24) | (i << 8)), 24).unwrap(), eip(i)))
            .collect();
        rules.extend((0..79u32).map(|j| (Ipv4Net::new(Ipv4Addr::from((10 << 24) | (j << 16)), 16).unwrap(), eip(7))));
        let ranges = longest_prefix_ranges(&rules);
        assert!(ranges.len() >= 19_000, "{}", ranges.len());
        assert!(ranges.windows(2).all(|w| w[0].last < w[1].first));
    }

    proptest! {
        #[test]
        fn the_walk_gives_what_the_lookup_gave(rules in arb_rules()) {
            prop_assert_eq!(longest_prefix_ranges(&rules), reference(&rules));
        }

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
