//! natgw repairs its own state and never touches anyone else's.

mod common;

use common::*;
use natgw_dataplane::Gateway;
use proptest::prelude::*;

fn rules() -> String {
    eip("egress", EGRESS_EIP)
        + &eip("web", WEB_EIP)
        + &eip("ports", PORTS_EIP)
        + &snat("vpc", "egress", "10.77.0.0/24")
        + &fip("int1", "web", INT1)
        + &dnat("int2-tcp", "ports", "tcp", 80, INT2, 8080)
}

#[test]
fn one_sync_repairs_natgw_state_and_leaves_foreign_state_alone() {
    let lab = lab("drift");
    let ns = lab.ns("gw");
    let gw = Gateway::open(Some(&ns)).unwrap();
    let p = converge(&gw, &objects(&rules()));

    // Someone else's table, address and route in the same namespace.
    sh(&ns, "nft add table ip foreign; nft add chain ip foreign c '{ type nat hook postrouting priority 50; }'");
    sh(&ns, "nft add rule ip foreign c oifname ext0 masquerade");
    sh(&ns, "ip addr add 198.51.100.200/24 dev ext0; ip route add 192.0.2.0/24 via 10.77.0.12");
    // Drift inside natgw's table: a lost element, a stray one, a stray rule.
    sh(&ns, "nft delete element ip natgw fip_dnat '{ 198.51.100.11 }'");
    sh(&ns, "nft add element ip natgw port_fwd '{ 198.51.100.12 . tcp . 443 : 10.77.0.12 . 443 }'");
    let drift = gw.audit(&p).unwrap();
    assert_eq!(drift.len(), 2, "{drift:?}");
    gw.resync(&p).unwrap();
    assert_clean(&gw, &p);

    sh(&ns, "nft add rule ip natgw prerouting counter");
    assert!(!gw.audit(&p).unwrap().is_empty(), "a stray rule in natgw's chain must show as drift");
    gw.resync(&p).unwrap();
    assert_clean(&gw, &p);

    // The whole table deleted by hand.
    sh(&ns, "nft delete table ip natgw");
    gw.resync(&p).unwrap();
    assert_clean(&gw, &p);

    // natgw's EIP and subnet routes removed by hand come back; the foreign
    // address (in the same subnet) stays.
    sh(&ns, "ip route del local 198.51.100.11 dev ext0 table local proto 110 metric 7476");
    sh(&ns, "ip route del 198.51.100.0/24 dev ext0 proto 110 metric 7476");
    gw.resync(&p).unwrap();
    assert_clean(&gw, &p);
    let foreign = sh(&ns, "nft list table ip foreign; ip -4 addr show dev ext0; ip route");
    assert!(foreign.contains("masquerade"), "{foreign}");
    assert!(foreign.contains("198.51.100.200/24"), "{foreign}");
    assert!(foreign.contains("192.0.2.0/24 via 10.77.0.12"), "{foreign}");

    // Teardown removes natgw's state only.
    gw.teardown().unwrap();
    let after = sh(&ns, "nft list ruleset; ip -4 addr show dev ext0; ip route show table all proto 110; ip route");
    assert!(!after.contains("natgw"), "{after}");
    assert!(!after.contains("198.51.100.11") && !after.contains("default via"), "{after}");
    assert!(
        after.contains("masquerade") && after.contains("198.51.100.200/24") && after.contains("192.0.2.0/24"),
        "{after}"
    );
}

#[test]
fn a_sync_from_the_mirror_that_fails_retries_from_the_kernel() {
    let lab = lab("mirror");
    let ns = lab.ns("gw");
    let gw = Gateway::open(Some(&ns)).unwrap();
    converge(&gw, &objects(&rules()));
    // The table goes behind natgw's back; the next change would patch
    // elements of a table that no longer exists.
    sh(&ns, "nft delete table ip natgw");
    let changed = rules() + &fip("int2", "egress", INT2);
    let p = plan(&objects(&changed.replace(&snat("vpc", "egress", "10.77.0.0/24"), "")));
    let report = gw.sync(&p).unwrap();
    assert!(report.table_rebuilt, "{report:?}");
    assert_clean(&gw, &p);
}

#[test]
fn a_second_sync_of_the_same_input_changes_nothing() {
    let lab = lab("idem");
    let ns = lab.ns("gw");
    let gw = Gateway::open(Some(&ns)).unwrap();
    let set = objects(&rules());
    converge(&gw, &set);
    let before = kernel_dump(&ns);
    let report = gw.sync(&plan(&set)).unwrap();
    assert!(!report.changed, "{report:?}");
    assert_eq!(report.nft_statements, 0);
    assert_eq!(kernel_dump(&ns), before, "handles, addresses or routes changed");
}

#[test]
fn removing_every_eip_keeps_the_routes() {
    let lab = lab("noeip");
    let gw = Gateway::open(Some(&lab.ns("gw"))).unwrap();
    converge(&gw, &objects(&rules()));
    // The kernel drops routes through an interface with no address left.
    converge(&gw, &objects(""));
    assert!(sh(&lab.ns("gw"), "ip route show table 7476").contains("default via 198.51.100.1 dev ext0"));
}

/// Earlier versions put EIPs on the interface as marked addresses. An
/// upgraded agent replaces them with local routes: the traffic's EIPs are
/// never missing, the marked addresses go, the operator's stays.
#[test]
fn eip_addresses_left_by_an_earlier_version_become_local_routes() {
    use natgw_dataplane::route::Links;
    let lab = lab("upgrade");
    let ns = lab.ns("gw");
    let gw = Gateway::open(Some(&ns)).unwrap();
    sh(&ns, "ip addr add 198.51.100.200/24 dev ext0");
    gw.run(|| {
        let links = Links::open().unwrap();
        let ext0 = links.interfaces().unwrap()["ext0"].index;
        let old = ["198.51.100.10/24", "198.51.100.11/24", "198.51.100.99/24"].map(|a| (ext0, a.parse().unwrap()));
        links.add_addresses(&old).unwrap();
    })
    .unwrap();
    let p = plan(&objects(&rules()));
    gw.sync(&p).unwrap();
    assert_clean(&gw, &p);
    let addrs = sh(&ns, "ip -4 -o addr show dev ext0");
    assert!(addrs.contains("198.51.100.200/24") && !addrs.contains("198.51.100.1"), "{addrs}");
    // Without the operator's address the interface empties, and the
    // kernel drops routes through it: natgw's come back in the same sync.
    sh(&ns, "ip addr del 198.51.100.200/24 dev ext0");
    gw.run(|| {
        let links = Links::open().unwrap();
        let ext0 = links.interfaces().unwrap()["ext0"].index;
        links.add_addresses(&[(ext0, "198.51.100.10/24".parse().unwrap())]).unwrap();
    })
    .unwrap();
    gw.resync(&p).unwrap();
    assert_clean(&gw, &p);
    assert!(sh(&ns, "ip -4 -o addr show dev ext0").is_empty());
}

#[test]
fn a_changed_target_replaces_the_element_in_one_transaction() {
    let lab = lab("retarget");
    let gw = Gateway::open(Some(&lab.ns("gw"))).unwrap();
    converge(&gw, &objects(&rules()));
    let moved = rules().replace("internalIp: 10.77.0.11", "internalIp: 10.77.0.12");
    let report = gw.sync(&plan(&objects(&moved))).unwrap();
    assert!(!report.table_rebuilt);
    assert_clean(&gw, &plan(&objects(&moved)));
}

/// A pool of objects; each step of the property test keeps a random subset.
fn pool() -> Vec<String> {
    let mut v = Vec::new();
    for i in 0..6u8 {
        v.push(eip(&format!("e{i}"), std::net::Ipv4Addr::new(198, 51, 100, 20 + i)));
    }
    for i in 0..6u8 {
        v.push(fip(&format!("f{i}"), &format!("e{i}"), std::net::Ipv4Addr::new(10, 77, 0, 100 + i)));
        v.push(dnat(&format!("d{i}"), &format!("e{}", (i + 3) % 6), "tcp", 1000 + u16::from(i), INT2, 80));
        v.push(dnat(&format!("u{i}"), &format!("e{}", (i + 3) % 6), "udp", 1000 + u16::from(i), INT1, 53));
    }
    v.push(snat("s0", "e0", "10.77.0.0/24"));
    v.push(snat("s1", "e1", "10.77.0.128/25"));
    v.push(snat("s2", "e2", "10.77.0.64/26"));
    v.push(snat("s3", "e3", "10.77.0.200/32"));
    v
}

/// Keeps only objects whose Eip is also kept, so every step is valid input.
fn step_set(keep: &[bool]) -> natgw_api::ObjectSet {
    let pool = pool();
    let kept_eips: Vec<String> = (0..6).filter(|i| keep[*i]).map(|i| format!("eip: e{i},")).collect();
    let text: String = pool
        .iter()
        .zip(keep)
        .enumerate()
        .filter(|(i, (doc, k))| **k && (*i < 6 || kept_eips.iter().any(|e| doc.contains(e.as_str()))))
        .map(|(_, (doc, _))| doc.as_str())
        .collect();
    objects(&text)
}

#[test]
fn random_sequences_of_object_sets_converge_exactly() {
    let lab = lab("prop");
    let gw = Gateway::open(Some(&lab.ns("gw"))).unwrap();
    let n = pool().len();
    let config = ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() };
    proptest!(config, |(steps in proptest::collection::vec(proptest::collection::vec(any::<bool>(), n), 1..6))| {
        for keep in steps {
            let set = step_set(&keep);
            let p = natgw_plan::plan_gateway(&set, "demo-gw").unwrap();
            gw.resync(&p).unwrap();
            let drift = gw.audit(&p).unwrap();
            prop_assert!(drift.is_empty(), "after sync: {:?}", drift);
        }
    });
}

/// Thousands of FloatingIps arriving in one round (50,000 objects created
/// at once) are more than the socket's default buffer carries: every round
/// failed with EMSGSIZE until the buffer grew with the batch.
#[test]
fn a_map_change_larger_than_the_default_socket_buffer_converges() {
    let lab = lab("bigmap");
    let gw = Gateway::open(Some(&lab.ns("gw"))).unwrap();
    let small = plan(&objects(&rules()));
    converge(&gw, &objects(&rules()));
    let mut big = small.clone();
    for i in 0..20_000u32 {
        let eip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(100, 80, 0, 1)) + i);
        let internal = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 78, 0, 1)) + i);
        big.nat.fip_dnat.insert(eip, internal);
        big.nat.fip_snat.insert(internal, eip);
    }
    gw.sync(&big).expect("20,000 new map elements in one sync");
    assert_clean(&gw, &big);
    gw.sync(&small).expect("20,000 map elements removed in one sync");
    assert_clean(&gw, &small);
}

/// 20,000 FloatingIps and 2,000 port forwards, as a file of objects:
/// with `n` of each.
fn many(mut p: natgw_plan::GatewayPlan, n: u32) -> natgw_plan::GatewayPlan {
    use std::net::Ipv4Addr;
    let at = |base: Ipv4Addr, i: u32| Ipv4Addr::from(u32::from(base) + i);
    for i in 0..n {
        let (eip, internal) = (at(Ipv4Addr::new(100, 80, 0, 1), i), at(Ipv4Addr::new(10, 78, 0, 1), i));
        p.nat.fip_dnat.insert(eip, internal);
        p.nat.fip_snat.insert(internal, eip);
    }
    for i in 0..n / 10 {
        let proto = if i % 2 == 0 { natgw_api::Protocol::Tcp } else { natgw_api::Protocol::Udp };
        p.nat
            .port_fwd
            .insert((Ipv4Addr::new(100, 90, 0, 1), proto, 1000 + i as u16), (at(Ipv4Addr::new(10, 79, 0, 1), i), 80));
    }
    p
}

/// A gateway whose table translates nothing yet gets it in stages, so nft
/// never holds the maps: declared empty, the maps' 42,000 elements over
/// netlink, then the chains. What lands is what nft lists. A staged write
/// cut short (the table declared and filled, no chains) translates
/// nothing, and the next sync takes it up the same way.
#[test]
fn a_whole_table_is_written_in_stages_and_one_cut_short_is_taken_up() {
    use natgw_dataplane::nft;
    let (_lab, ns, gw, p, report) = twenty_thousand("staged");
    assert!(report.table_rebuilt, "{report:?}");
    assert_clean(&gw, &p);
    let (read, listed) = gw
        .run(|| {
            let listed = nft::read_listing(nft::ID).unwrap().expect("natgw's table");
            (nft::read().unwrap(), nft::parse_table(listed).unwrap())
        })
        .unwrap();
    assert_eq!(read, listed);
    assert_eq!((read.nat.fip_dnat.len(), read.nat.port_fwd.len()), (20_001, 2_001));

    sh(&ns, "nft delete chain ip natgw prerouting && nft delete chain ip natgw postrouting");
    rebuilt_on_resync(&gw, &p);
}

/// A lab whose gateway was synced with 20,000 FloatingIps (and 2,000
/// port forwards) more than `rules()`, and that sync's report.
fn twenty_thousand(
    name: &str,
) -> (natgw_lab::Lab, String, Gateway, natgw_plan::GatewayPlan, natgw_dataplane::SyncReport) {
    let lab = lab(name);
    let ns = lab.ns("gw");
    let gw = Gateway::open(Some(&ns)).unwrap();
    let p = many(plan(&objects(&rules())), 20_000);
    let report = gw.sync(&p).unwrap();
    (lab, ns, gw, p, report)
}

/// A resync that finds natgw's table changed rewrites its fixed part and
/// leaves the gateway clean.
fn rebuilt_on_resync(gw: &Gateway, p: &natgw_plan::GatewayPlan) -> natgw_dataplane::SyncReport {
    let report = gw.resync(p).unwrap();
    assert!(report.table_rebuilt, "{report:?}");
    assert_clean(gw, p);
    report
}

/// A rule edited by hand in a table of 20,000 FloatingIps, and a chain
/// added by hand that natgw's chain jumps to: the chains are replaced and
/// the elements only diffed, in one script, so nft holds the change and
/// not the maps (a whole rebuild took 205 MB of nft's own at 226,000).
#[test]
fn a_chain_edited_by_hand_is_replaced_without_rewriting_the_maps() {
    let (_lab, ns, gw, p, _) = twenty_thousand("rechain");
    sh(&ns, "nft add chain ip natgw stray && nft add rule ip natgw stray counter");
    sh(&ns, "nft insert rule ip natgw prerouting jump stray");
    sh(&ns, "nft delete element ip natgw fip_dnat '{ 100.80.0.1 }'");
    assert!(!gw.audit(&p).unwrap().is_empty());
    let report = rebuilt_on_resync(&gw, &p);
    // The chains' rules (NAT, forward, input: about 45 lines) and the one
    // element, not 20,000.
    assert!(report.nft_statements < 80, "{} lines: the maps were written whole", report.nft_statements);
    assert!(!sh(&ns, "nft list chains ip").contains("stray"));
}

/// A chain nft's own syntax cannot name (a keyword, made through nft's
/// JSON input as libnftables tools do): replacing the chains fails, and
/// the same resync rebuilds the whole table instead.
#[test]
fn a_chain_nft_cannot_name_makes_the_resync_rebuild_the_whole_table() {
    let (_lab, ns, gw, p, _) = twenty_thousand("rechain-kw");
    let chain = r#"{"nftables":[{"add":{"chain":{"family":"ip","table":"natgw","name":"log"}}}]}"#;
    sh(&ns, &format!("echo '{chain}' | nft -j -f -"));
    assert!(sh(&ns, "nft list chains ip").contains("chain log"));
    let report = rebuilt_on_resync(&gw, &p);
    assert!(report.phases.iter().any(|(name, _)| *name == "nft-rechain-failed"), "{:?}", report.phases);
    assert!(!sh(&ns, "nft list chains ip").contains("chain log"));
}

/// natgw reads its table back over netlink (`nfdump`) and nft only for
/// the chains and interval sets: what it reads is what nft lists whole,
/// with names sharing a prefix, both protocols on one port and nested
/// SNAT prefixes. A set added by hand (which the JSON parse refused)
/// shows as drift and goes with the next resync.
#[test]
fn the_table_read_over_netlink_is_what_nft_lists() {
    use natgw_dataplane::nft;
    let lab = lab("nlread");
    let ns = lab.ns("gw");
    let gw = Gateway::open(Some(&ns)).unwrap();
    let objects_text = rules()
        + &dnat("int2-udp", "ports", "udp", 80, INT2, 8080)
        + &dnat("int2-udp-long-name-sharing-a-prefix", "ports", "udp", 53, INT2, 5353)
        + &snat("vpc-host", "web", "10.77.0.12/32");
    let p = converge(&gw, &objects(&objects_text));
    let (read, listed) = gw
        .run(|| {
            let listed = nft::read_listing(nft::ID).unwrap().expect("natgw's table");
            (nft::read().unwrap(), nft::parse_table(listed).unwrap())
        })
        .unwrap();
    assert_eq!(read, listed);
    assert_eq!(read.nat.port_fwd.len(), 3, "{:?}", read.nat.port_fwd);
    assert_eq!(read.nat.snat.len(), 3, "the nested prefix splits the outer one: {:?}", read.nat.snat);

    sh(&ns, "nft add set ip natgw extra '{ type ipv4_addr; elements = { 192.0.2.1 } }'");
    let drift = gw.audit(&p).unwrap();
    assert!(!drift.is_empty(), "a set added to natgw's table by hand must show as drift");
    gw.resync(&p).unwrap();
    assert_clean(&gw, &p);
    assert!(!sh(&ns, "nft list table ip natgw").contains("extra"));
}

/// Before a resync plans a whole gateway anew, the last plan is let go
/// (two at once were the agent's peak memory), but never while a sweep
/// still needs it to judge flows. Port accounting then reads the EIPs
/// from the kernel's table.
#[test]
fn the_last_plan_is_let_go_only_once_swept() {
    let lab = lab("release");
    let ns = lab.ns("gw");
    let gw = Gateway::open(Some(&ns)).unwrap();
    let p = plan(&objects(&rules()));
    gw.program(&p).unwrap();
    assert!(!gw.swept(), "the first sync of a process owes a sweep");
    assert!(!gw.release_plan(), "the plan went while a sweep still needed it");
    gw.sweep().unwrap();
    assert!(gw.release_plan());
    // No flows here: what counts is that the kernel's read serves.
    assert!(gw.port_usage(5).unwrap().usage.is_empty());
    gw.resync(&p).unwrap();
    assert_clean(&gw, &p);
}
