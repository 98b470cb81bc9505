//! Port accounting on real flows: connections through an EIP counted per
//! destination, as `natgw top` and the agent's metrics show them.

mod common;

use common::*;
use natgw_dataplane::Gateway;
use natgw_lab::traffic::{UdpFlow, udp_server};

#[test]
fn flows_through_an_eip_are_counted_per_destination_and_top_shows_them() {
    let lab = lab("ports");
    let gw = Gateway::open(Some(&lab.ns("gw"))).unwrap();
    let rules = eip("egress", EGRESS_EIP) + &snat("vpc", "egress", "10.77.0.0/24");
    converge(&gw, &objects(&rules));
    let _dns = udp_server(&lab.ns("ext1"), EXT1, 5353).unwrap();
    let _ntp = udp_server(&lab.ns("ext1"), EXT1, 1123).unwrap();
    // 12 flows to one destination, 3 to another, each from its own port.
    let mut flows = Vec::new();
    for (port, n) in [(5353, 12), (1123, 3)] {
        for _ in 0..n {
            let f = UdpFlow::open(&lab.ns("int2"), EXT1, port).unwrap();
            assert_eq!(f.source().unwrap(), EGRESS_EIP);
            flows.push(f);
        }
    }
    let report = gw.port_usage(5).unwrap();
    let u = report.usage.iter().find(|u| u.eip == EGRESS_EIP && u.proto == 17).expect("the EIP is accounted");
    assert_eq!(u.connections, 15, "{u:?}");
    assert_eq!(u.destinations[0].0.port, 5353);
    assert_eq!((u.destinations[0].1, u.destinations[1].1), (12, 3));
    assert!(report.insert_failures.is_some(), "the namespace's conntrack statistics are read");
    // A handle that never synced takes the EIPs from the kernel's table:
    // what `natgw top` does in a gateway pod or on a lab namespace.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_natgw"))
        .args(["top", "--once", "--netns", &lab.ns("gw")])
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(screen.contains("198.51.100.10") && screen.contains("198.51.100.1:5353"), "{screen}");
}
