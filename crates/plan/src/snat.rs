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

/// Brings `ranges` (as `longest_prefix_ranges` gave them) up to a change
/// of the rules inside `window`: `rules` are the rules within it now,
/// with the window itself mapped to the EIP of the rule around it when no
/// rule of its own holds it. Addresses outside the window keep their
/// ranges, so a change costs the rules it covers, not all of them.
pub fn splice_window(ranges: &mut Vec<SnatRange>, window: Ipv4Net, rules: &[(Ipv4Net, Ipv4Addr)]) {
    let (ws, we) = (u32::from(window.network()), u32::from(window.broadcast()));
    let i = ranges.partition_point(|r| u32::from(r.last) < ws);
    let j = ranges.partition_point(|r| u32::from(r.first) <= we);
    // The neighbours either side join the seams when they may merge.
    let (from, to) = (i.saturating_sub(1), (j + 1).min(ranges.len()));
    let mut out: Vec<SnatRange> = Vec::with_capacity(to - from + rules.len());
    let push =
        |out: &mut Vec<SnatRange>, r: SnatRange| emit(out, u32::from(r.first) as u64, u32::from(r.last) as u64, r.eip);
    if from < i {
        push(&mut out, ranges[from]);
    }
    if let Some(r) = ranges.get(i).filter(|r| i < j && u32::from(r.first) < ws) {
        push(&mut out, SnatRange { last: Ipv4Addr::from(ws - 1), ..*r });
    }
    for r in longest_prefix_ranges(rules) {
        push(&mut out, r);
    }
    if let Some(r) = j.checked_sub(1).and_then(|k| ranges.get(k)).filter(|r| i < j && u32::from(r.last) > we) {
        push(&mut out, SnatRange { first: Ipv4Addr::from(we + 1), ..*r });
    }
    if j < to {
        push(&mut out, ranges[j]);
    }
    ranges.splice(from..to, out);
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

    /// The rules a window holds after a change, as `splice_window` takes
    /// them: those inside it, and the window under the rule around it.
    fn in_window(rules: &[(Ipv4Net, Ipv4Addr)], w: Ipv4Net) -> Vec<(Ipv4Net, Ipv4Addr)> {
        let mut out: Vec<_> = rules.iter().filter(|(n, _)| w.contains(n)).copied().collect();
        if !out.iter().any(|(n, _)| *n == w)
            && let Some((_, e)) =
                rules.iter().filter(|(n, _)| n.contains(&w) && *n != w).max_by_key(|(n, _)| n.prefix_len())
        {
            out.push((w, *e));
        }
        out
    }

    #[test]
    fn a_spliced_window_keeps_its_neighbours_merged() {
        let (a, b) = (ip("1.1.1.1"), ip("2.2.2.2"));
        let before = [(net("10.0.0.0/16"), a), (net("10.0.1.0/24"), b)];
        let after = [(net("10.0.0.0/16"), a)];
        let mut ranges = longest_prefix_ranges(&before);
        splice_window(&mut ranges, net("10.0.1.0/24"), &in_window(&after, net("10.0.1.0/24")));
        assert_eq!(ranges, longest_prefix_ranges(&after));
        splice_window(&mut ranges, net("10.0.1.0/24"), &in_window(&before, net("10.0.1.0/24")));
        assert_eq!(ranges, longest_prefix_ranges(&before));
    }

    proptest! {
        /// One rule added, removed or moved to another EIP: splicing its
        /// network's window gives what planning all of them gives.
        #[test]
        fn splicing_a_window_gives_the_whole_walk(rules in arb_rules(), pick in any::<prop::sample::Index>(), eip in 0u8..5) {
            let Some(&(w, _)) = (!rules.is_empty()).then(|| &rules[pick.index(rules.len())]) else { return Ok(()) };
            let mut after: Vec<_> = rules.iter().filter(|(n, _)| *n != w).copied().collect();
            if eip < 4 {
                after.push((w, Ipv4Addr::new(192, 0, 2, eip)));
            }
            let mut ranges = longest_prefix_ranges(&rules);
            splice_window(&mut ranges, w, &in_window(&after, w));
            prop_assert_eq!(&ranges, &longest_prefix_ranges(&after));
            // And a network no rule had, added.
            let fresh = Ipv4Net::new(Ipv4Addr::from((10u32 << 24) | (u32::from(eip) << 12)), 22).unwrap();
            if !after.iter().any(|(n, _)| *n == fresh) {
                let mut more = after.clone();
                more.push((fresh, Ipv4Addr::new(192, 0, 2, 9)));
                splice_window(&mut ranges, fresh, &in_window(&more, fresh));
                prop_assert_eq!(ranges, longest_prefix_ranges(&more));
            }
        }

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
