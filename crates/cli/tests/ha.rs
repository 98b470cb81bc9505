//! The pieces of an HA gateway in a real kernel: the ARP probe a standby
//! sends before it takes a gateway's addresses sees whoever holds them,
//! as an interface address or as natgw's EIP `local` route, and sees
//! nothing once they are gone.

mod common;

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use natgw_dataplane::netns::NetnsWorker;
use natgw_dataplane::route::probe::Prober;
use natgw_lab::{EXT1_IP, GW_LAN_IP};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Who answers a probe for `ips` on `interface` of namespace `ns`.
fn answered(ns: &str, interface: &'static str, ips: Vec<Ipv4Addr>) -> Option<Ipv4Addr> {
    let worker = NetnsWorker::start(Some(natgw_dataplane::netns::netns_path(ns))).expect("namespace worker");
    worker
        .run(move || {
            let p = Prober::on(interface)?;
            p.probe(&ips, Duration::from_millis(200))
        })
        .expect("ran in the namespace")
        .expect("probed")
        .map(|h| h.ip)
}

#[test]
fn a_probe_sees_who_holds_an_address_and_nothing_once_it_is_gone() {
    let lab = common::lab("haprobe");
    let (gw, ext1, int1) = (lab.ns("gw"), lab.ns("ext1"), lab.ns("int1"));
    let lan: Ipv4Addr = GW_LAN_IP.parse().unwrap();
    let eip = Ipv4Addr::new(198, 51, 100, 50);
    let free = Ipv4Addr::new(10, 77, 0, 99);
    // The LAN address, held as an interface address by the gateway.
    assert_eq!(answered(&int1, "eth0", vec![free, lan]), Some(lan));
    assert_eq!(answered(&int1, "eth0", vec![free]), None, "nobody holds it");
    // An EIP as natgw holds it: a local route, no interface address.
    assert_eq!(answered(&ext1, "eth0", vec![eip]), None);
    ip(&["-n", &gw, "route", "add", "local", &format!("{eip}/32"), "dev", "ext0", "table", "local"]);
    assert_eq!(answered(&ext1, "eth0", vec![eip]), Some(eip));
    // The prober's own addresses are not conflicts.
    assert_eq!(answered(&ext1, "eth0", vec![EXT1_IP.parse().unwrap()]), None);
    ip(&["-n", &gw, "route", "del", "local", &format!("{eip}/32"), "dev", "ext0", "table", "local"]);
    assert_eq!(answered(&ext1, "eth0", vec![eip]), None, "gone with its route");
}
