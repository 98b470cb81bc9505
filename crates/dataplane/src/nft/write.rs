//! How natgw's table goes from what the kernel holds to the plan: the one
//! choice a sync makes about the table, made here from data alone so that
//! every case is a unit test. `engine::converge` carries it out.

use natgw_plan::NatTables;

use crate::nft::KernelTable;
use crate::nft::elements::GATEWAY;
use crate::nft::model::Skeleton;
use crate::nft::netlink::{self, MapChange};

/// One of the ways to write the table.
#[derive(Debug, PartialEq)]
pub enum TableWrite {
    /// The table is as declared and only hash-map elements change: they
    /// go over netlink on the namespace's socket, with no `nft` process.
    Elements(Vec<MapChange>),
    /// Nothing of the table translates yet (absent, or declared and never
    /// hooked): declare it, fill its maps over netlink while the EIPs go
    /// in, then hook its chains.
    Staged,
    /// The table is as declared and an interval set changes (nft splits
    /// and merges intervals): an `nft -f` script of the element diff.
    Diff,
    /// The sets are as declared but the chains are not (edited by hand,
    /// another interface pair): the chains are replaced in place, keeping
    /// the elements. If nft refuses, the whole table is rebuilt.
    Rechain,
    /// Anything else: the whole table, in one transaction.
    Rebuild,
}

/// The write from `have` to `want`, where `skeleton` is the fixed part the
/// plan's interfaces ask for.
pub fn table_write(have: &KernelTable, skeleton: &Skeleton, want: &NatTables) -> TableWrite {
    if have.present && have.skeleton == *skeleton {
        return match netlink::changes(&GATEWAY, &have.nat, want) {
            Some(maps) => TableWrite::Elements(maps),
            None => TableWrite::Diff,
        };
    }
    if !have.present || have.skeleton.chains.is_empty() {
        TableWrite::Staged
    } else if have.skeleton.sets == skeleton.sets {
        TableWrite::Rechain
    } else {
        TableWrite::Rebuild
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use natgw_plan::SnatRange;

    use super::*;
    use crate::nft::expected_skeleton;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// A table as the kernel holds it after a sync of `nat`.
    fn synced(nat: &NatTables) -> KernelTable {
        KernelTable { present: true, skeleton: expected_skeleton("lan0", "ext0"), nat: nat.clone() }
    }

    fn one_fip() -> NatTables {
        let mut nat = NatTables::default();
        nat.fip_dnat.insert(ip("192.0.2.10"), ip("10.0.0.5"));
        nat.fip_snat.insert(ip("10.0.0.5"), ip("192.0.2.10"));
        nat
    }

    fn one_snat() -> NatTables {
        let mut nat = one_fip();
        nat.snat = vec![SnatRange { first: ip("10.0.0.0"), last: ip("10.0.0.255"), eip: ip("192.0.2.11") }];
        nat
    }

    #[test]
    fn a_floating_ip_change_is_elements_over_netlink() {
        let want = one_fip();
        let w = table_write(&synced(&NatTables::default()), &expected_skeleton("lan0", "ext0"), &want);
        let TableWrite::Elements(maps) = w else { panic!("{w:?}") };
        assert_eq!(maps.iter().map(|m| m.set).collect::<Vec<_>>(), ["fip_dnat", "fip_snat"]);
    }

    #[test]
    fn nothing_to_change_is_no_elements() {
        let nat = one_snat();
        assert_eq!(table_write(&synced(&nat), &expected_skeleton("lan0", "ext0"), &nat), TableWrite::Elements(vec![]));
    }

    #[test]
    fn an_interval_change_is_an_nft_diff() {
        let w = table_write(&synced(&one_fip()), &expected_skeleton("lan0", "ext0"), &one_snat());
        assert_eq!(w, TableWrite::Diff);
    }

    #[test]
    fn an_absent_or_unhooked_table_is_written_in_stages() {
        let skeleton = expected_skeleton("lan0", "ext0");
        assert_eq!(table_write(&KernelTable::default(), &skeleton, &one_fip()), TableWrite::Staged);
        // Declared, and the agent died before the chains went in.
        let mut declared = synced(&NatTables::default());
        declared.skeleton.chains.clear();
        declared.skeleton.rules.clear();
        assert_eq!(table_write(&declared, &skeleton, &one_fip()), TableWrite::Staged);
    }

    #[test]
    fn chains_edited_by_hand_or_for_other_interfaces_are_replaced_in_place() {
        let mut edited = synced(&one_fip());
        if let Some(rules) = edited.skeleton.rules.values_mut().next() {
            rules.push("natgw hand-made 00000000".into());
        }
        assert_eq!(table_write(&edited, &expected_skeleton("lan0", "ext0"), &one_fip()), TableWrite::Rechain);
        let renamed = synced(&one_fip());
        assert_eq!(table_write(&renamed, &expected_skeleton("lan1", "ext0"), &one_fip()), TableWrite::Rechain);
    }

    #[test]
    fn a_set_of_another_shape_rebuilds_the_table() {
        let mut old = synced(&one_fip());
        old.skeleton.sets.insert("fip_dnat".into(), "ipv4_addr|inet_service|".into());
        assert_eq!(table_write(&old, &expected_skeleton("lan0", "ext0"), &one_fip()), TableWrite::Rebuild);
        let mut missing = synced(&one_fip());
        missing.skeleton.sets.remove("snat_nets");
        assert_eq!(table_write(&missing, &expected_skeleton("lan0", "ext0"), &one_fip()), TableWrite::Rebuild);
    }
}
