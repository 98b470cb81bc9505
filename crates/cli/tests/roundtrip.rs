//! The two forms of natgw's table agree: what the nft text form writes,
//! the netlink reader reads back equal, and what the netlink writer
//! writes, nft's own listing reads back equal. Random tables (empty maps
//! included) and one at the largest size the benchmarks use, in a real
//! kernel, inside a lab namespace.

mod common;

use std::net::Ipv4Addr;

use natgw_api::Protocol;
use natgw_dataplane::Gateway;
use natgw_dataplane::egress;
use natgw_dataplane::nft::elements::GATEWAY;
use natgw_dataplane::nft::{self, netlink};
use natgw_plan::{EgressTables, NatTables, longest_prefix_ranges, merge_ranges};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const LAN: &str = "lan0";
const EXT: &str = "ext0";

fn eip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0xCB00_7100 + i)
}

fn internal(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0A4D_0000 + i)
}

/// A table as a plan could hold it: FloatingIps one to one, port
/// forwards, longest-prefix SNAT ranges and merged internal networks.
fn tables() -> impl Strategy<Value = NatTables> {
    let fips = prop::collection::btree_map(0u32..4096, 0u32..4096, 0..40);
    let ports = prop::collection::btree_map((0u32..64, any::<bool>(), 1u16..=65535), (0u32..4096, 1u16..=65535), 0..40);
    let snats = prop::collection::btree_map((0u32..256, 20u8..=32), 0u32..8, 0..12);
    let nets = prop::collection::vec((0u32..256, 16u8..=30), 0..4);
    (fips, ports, snats, nets).prop_map(|(fips, ports, snats, nets)| {
        let mut t = NatTables::default();
        for (e, i) in fips {
            if !t.fip_snat.contains_key(&internal(i)) {
                t.fip_dnat.insert(eip(e), internal(i));
                t.fip_snat.insert(internal(i), eip(e));
            }
        }
        for ((e, udp, port), (i, to)) in ports {
            let proto = if udp { Protocol::Udp } else { Protocol::Tcp };
            t.port_fwd.insert((eip(4096 + e), proto, port), (internal(i), to));
        }
        let net = |a: u32, len: u8| ipnet::Ipv4Net::new(internal(a << 8), len).map(|n| n.trunc()).ok();
        let mut rules: Vec<_> =
            snats.into_iter().filter_map(|((a, len), e)| Some((net(a, len)?, eip(8192 + e)))).collect();
        rules.sort();
        rules.dedup_by_key(|(n, _)| *n);
        t.snat = longest_prefix_ranges(&rules);
        t.internal_nets =
            merge_ranges(nets.into_iter().filter_map(|(a, len)| net(a, len)).map(|n| (n.network(), n.broadcast())));
        t
    })
}

/// What the kernel holds, read over netlink and from `nft -j`: both must
/// be `want`.
fn holds(want: &NatTables, how: &str) -> Result<(), String> {
    let dumped = nft::read().map_err(|e| format!("{how}: netlink read: {e}"))?;
    let listing = nft::read_listing(nft::ID).map_err(|e| e.to_string())?.ok_or(format!("{how}: no table"))?;
    let listed = nft::parse_table(listing).map_err(|e| format!("{how}: nft listing: {e}"))?;
    if dumped.nat != *want {
        return Err(format!("{how}: netlink read\n{:?}\nwanted\n{want:?}", dumped.nat));
    }
    if listed.nat != *want {
        return Err(format!("{how}: nft listing\n{:?}\nwanted\n{want:?}", listed.nat));
    }
    Ok(())
}

fn apply(script: &str) -> Result<(), String> {
    if script.is_empty() { Ok(()) } else { nft::apply(script).map_err(|e| format!("{e}\n{script}")) }
}

fn over_netlink(changes: &[netlink::MapChange]) -> Result<(), String> {
    let socket = netlink::Nfnl::open().map_err(|e| e.to_string())?;
    socket.apply(nft::ID, changes).map_err(|e| e.to_string())
}

/// `a` as one nft script, then to `b` with the hash maps over netlink and
/// the rest as an nft diff, back to `a` as an nft diff alone, then `b`
/// written in stages into an absent table: read back both ways each time.
fn round_trip(a: &NatTables, b: &NatTables) -> Result<(), String> {
    nft::delete_table().map_err(|e| e.to_string())?;
    apply(&nft::full_script(LAN, EXT, a))?;
    holds(a, "a whole nft script")?;
    let mut halfway = b.clone();
    halfway.snat = a.snat.clone();
    halfway.internal_nets = a.internal_nets.clone();
    over_netlink(&netlink::map_changes(&GATEWAY, a, b))?;
    holds(&halfway, "hash maps over netlink")?;
    apply(&nft::diff_script(&halfway, b))?;
    holds(b, "then interval sets as an nft diff")?;
    apply(&nft::diff_script(b, a))?;
    holds(a, "back as an nft diff")?;
    nft::delete_table().map_err(|e| e.to_string())?;
    let staged = nft::staged(LAN, EXT, b);
    apply(&staged.declare)?;
    over_netlink(&staged.maps)?;
    apply(&staged.hook)?;
    holds(b, "written in stages")
}

#[test]
fn what_one_form_writes_the_other_reads_back_equal() {
    let lab = common::lab("roundtrip");
    let gw = Gateway::open(Some(&lab.ns("gw"))).expect("gateway handle");
    let mut runner = TestRunner::new(Config { cases: 24, failure_persistence: None, ..Config::default() });
    // Empty both ways first, then random pairs.
    let empty = NatTables::default();
    gw.run(move || round_trip(&empty, &NatTables::default())).unwrap().unwrap();
    let result = runner.run(&(tables(), tables()), |(a, b)| {
        let outcome = gw.run(move || round_trip(&a, &b)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        outcome.map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The natgw-bench size: 100,000 FloatingIps, 20,000 port forwards and
/// 2,000 SNAT ranges (222,000 elements), in stages and read back both
/// ways, then 1,000 changes over netlink and 1,000 more as an nft diff.
#[test]
fn the_largest_table_reads_back_equal_both_ways() {
    let lab = common::lab("roundtripbig");
    let gw = Gateway::open(Some(&lab.ns("gw"))).expect("gateway handle");
    let mut big = NatTables::default();
    for i in 0..100_000u32 {
        big.fip_dnat.insert(eip(i), internal(i));
        big.fip_snat.insert(internal(i), eip(i));
    }
    for i in 0..20_000u32 {
        let proto = if i % 2 == 0 { Protocol::Tcp } else { Protocol::Udp };
        big.port_fwd.insert((eip(200_000 + i / 100), proto, 1 + (i % 100) as u16), (internal(i), (1024 + i) as u16));
    }
    let rules: Vec<_> = (0..2_000u32)
        .map(|i| (ipnet::Ipv4Net::new(Ipv4Addr::from(0x0B00_0000 + (i << 8)), 24).unwrap(), eip(300_000 + i % 7)))
        .collect();
    big.snat = longest_prefix_ranges(&rules);
    big.internal_nets = vec![(Ipv4Addr::new(10, 0, 0, 0), Ipv4Addr::new(11, 255, 255, 255))];
    let mut changed = big.clone();
    for i in 0..1_000u32 {
        changed.fip_dnat.remove(&eip(i));
        changed.fip_snat.remove(&internal(i));
        changed.fip_dnat.insert(eip(400_000 + i), internal(500_000 + i));
        changed.fip_snat.insert(internal(500_000 + i), eip(400_000 + i));
    }
    let mut text = changed.clone();
    for i in 0..1_000u32 {
        text.port_fwd.insert((eip(210_000 + i), Protocol::Tcp, 443), (internal(i), 8443));
    }
    gw.run(move || -> Result<(), String> {
        nft::delete_table().map_err(|e| e.to_string())?;
        let staged = nft::staged(LAN, EXT, &big);
        apply(&staged.declare)?;
        over_netlink(&staged.maps)?;
        apply(&staged.hook)?;
        holds(&big, "222,000 elements in stages")?;
        over_netlink(&netlink::map_changes(&GATEWAY, &big, &changed))?;
        holds(&changed, "1,000 changes over netlink")?;
        apply(&nft::diff_script(&changed, &text))?;
        holds(&text, "1,000 more as an nft diff")
    })
    .unwrap()
    .unwrap();
}

/// An egress table as a node's plan could hold it: pods translated on
/// every port or some, allow and deny lists of disjoint ranges per pod,
/// held pods and the cluster's networks.
fn egress_tables() -> impl Strategy<Value = EgressTables> {
    let pod = |i: u32| Ipv4Addr::from(0x0A80_0000 + i);
    let vip = |i: u32| Ipv4Addr::from(0xC633_6400 + i);
    let dest = |i: u8| (Ipv4Addr::new(203, 0, i, 0), Ipv4Addr::new(203, 0, i, 255));
    let all = prop::collection::btree_map(0u32..64, 0u32..8, 0..20);
    let ports = prop::collection::btree_map((0u32..64, any::<bool>(), 1u16..=65535), 0u32..8, 0..20);
    let lists = prop::collection::btree_set((0u32..16, 0u8..32, any::<bool>()), 0..20);
    let pods = prop::collection::btree_set(0u32..64, 0..8);
    let nets = prop::collection::vec((0u32..256, 8u8..=24), 0..4);
    (all, ports, lists, pods.clone(), pods, nets).prop_map(move |(all, ports, lists, only, hold, nets)| {
        let mut t = EgressTables {
            snat_all: all.into_iter().map(|(p, v)| (pod(p), vip(v))).collect(),
            snat_ports: ports
                .into_iter()
                .map(|((p, udp, port), v)| ((pod(p), if udp { Protocol::Udp } else { Protocol::Tcp }, port), vip(v)))
                .collect(),
            allow_only: only.into_iter().map(pod).collect(),
            hold: hold.into_iter().map(pod).collect(),
            ..EgressTables::default()
        };
        for (p, d, deny) in lists {
            let to = if deny { &mut t.deny } else { &mut t.allow };
            to.insert((pod(p), dest(d)));
        }
        let net = |a: u32, len: u8| ipnet::Ipv4Net::new(Ipv4Addr::from(0x0A00_0000 + (a << 16)), len).ok();
        t.cluster_nets = merge_ranges(
            nets.into_iter().filter_map(|(a, len)| net(a, len)).map(|n| (n.trunc().network(), n.trunc().broadcast())),
        );
        t
    })
}

/// The egress table holds `want`, read over netlink and from `nft -j`.
fn egress_holds(want: &EgressTables, how: &str) -> Result<(), String> {
    let read = egress::read_tables().map_err(|e| format!("{how}: {e}"))?.ok_or(format!("{how}: no table"))?;
    let listed = egress::list_tables().map_err(|e| format!("{how}: {e}"))?.ok_or(format!("{how}: no table"))?;
    for (form, got) in [("netlink", read), ("nft -j", listed)] {
        if got != *want {
            return Err(format!("{how}: {form} read\n{got:?}\nwanted\n{want:?}"));
        }
    }
    Ok(())
}

/// `a` whole, then `b`'s hash sets over netlink, then `b`'s interval sets
/// as an nft diff, then back to `a`: read back both ways each time.
fn egress_round_trip(a: &EgressTables, b: &EgressTables) -> Result<(), String> {
    let err = |e: natgw_dataplane::SyncError| e.to_string();
    apply(&format!("add table ip {0}\ndelete table ip {0}\n", egress::TABLE))?;
    egress::write_tables(None, a).map_err(err)?;
    egress_holds(a, "a whole nft script")?;
    let mut halfway = b.clone();
    halfway.cluster_nets = a.cluster_nets.clone();
    halfway.allow = a.allow.clone();
    halfway.deny = a.deny.clone();
    egress::write_tables(Some(a), &halfway).map_err(err)?;
    egress_holds(&halfway, "hash sets over netlink")?;
    egress::write_tables(Some(&halfway), b).map_err(err)?;
    egress_holds(b, "then interval sets as an nft diff")?;
    egress::write_tables(Some(b), a).map_err(err)?;
    egress_holds(a, "back")
}

#[test]
fn what_the_egress_table_writes_either_way_reads_back_equal() {
    let lab = common::lab("roundtripeg");
    let node = egress::Egress::open(Some(&lab.ns("gw"))).expect("egress handle");
    let empty = EgressTables::default();
    node.in_ns(move || egress_round_trip(&empty, &EgressTables::default())).unwrap().unwrap();
    let mut runner = TestRunner::new(Config { cases: 24, failure_persistence: None, ..Config::default() });
    let result = runner.run(&(egress_tables(), egress_tables()), |(a, b)| {
        let outcome = node.in_ns(move || egress_round_trip(&a, &b)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        outcome.map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
