//! Kernel items of the hardening issue: real nftables, netlink and
//! conntrack in network namespaces, real packets.

mod common;

use std::net::{Ipv4Addr, UdpSocket};

use common::*;
use natgw_dataplane::Gateway;
use natgw_lab::traffic::{UdpFlow, in_ns, udp_server};

#[test]
fn item11_a_failed_conntrack_sweep_stays_owed_until_it_succeeds() {
    let lab = lab("sweep");
    let ns = lab.ns("gw");
    let gw = Gateway::open(Some(&ns)).unwrap();
    converge(&gw, &objects(&(eip("web", WEB_EIP) + &fip("int1", "web", INT1))));
    let _server = udp_server(&lab.ns("ext1"), EXT1, 5353).unwrap();
    let flow = UdpFlow::open(&lab.ns("int1"), EXT1, 5353).unwrap();
    assert_eq!(flow.source().unwrap(), WEB_EIP);
    // The floating IP goes; the kernel changes, then the sweep fails.
    let p = plan(&objects(&eip("web", WEB_EIP)));
    gw.fail_next_sweep();
    assert!(gw.sync(&p).is_err(), "the injected failure is reported");
    // The kernel already holds the plan, but the sweep is still owed: a
    // finalizer released now must not leave the flow behind.
    let report = gw.sync(&p).expect("sync");
    assert!(report.conntrack_deleted >= 1, "{report:?}");
    assert_clean(&gw, &p);
}

#[test]
fn item19_audit_ignores_the_gateways_own_and_multicast_traffic_on_a_bridged_lan() {
    let lab = lab("igmp");
    lab.bridge_lan().unwrap();
    let ns = lab.ns("gw");
    let gw = Gateway::open(Some(&ns)).unwrap();
    let rules = eip("egress", EGRESS_EIP) + &snat("vpc", "egress", "10.77.0.0/24");
    let p = converge(&gw, &objects(&rules));
    // The gateway joins a group on its LAN bridge (an IGMP report from
    // 10.77.0.1, inside the SNAT rule's CIDR), a LAN host sends mDNS, and
    // the gateway broadcasts on the LAN.
    let lan = Ipv4Addr::new(10, 77, 0, 1);
    let joined = in_ns(&ns, move || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind((lan, 0))?;
        s.join_multicast_v4(&Ipv4Addr::new(239, 1, 2, 3), &lan)?;
        s.set_broadcast(true)?;
        s.send_to(b"hello", (Ipv4Addr::new(10, 77, 0, 255), 9))?;
        Ok(s)
    })
    .unwrap()
    .unwrap();
    let mdns = in_ns(&lab.ns("int1"), || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind((INT1, 5353))?;
        s.send_to(b"query", (Ipv4Addr::new(224, 0, 0, 251), 5353))?;
        Ok(s)
    })
    .unwrap()
    .unwrap();
    let entries = sh(&ns, "conntrack -L 2>/dev/null");
    assert!(entries.contains("dst=224.0.0.251"), "the LAN's multicast is tracked:\n{entries}");
    assert_clean(&gw, &p);
    // A sync deletes none of them either.
    let report = gw.resync(&p).unwrap();
    assert_eq!(report.conntrack_deleted, 0, "{report:?}");
    drop((joined, mdns));
}

#[test]
fn item17_the_kernel_keeps_the_address_mark_and_the_probe_leaves_nothing() {
    let lab = lab("probe");
    let ns = lab.ns("gw");
    let gw = Gateway::open(Some(&ns)).unwrap();
    // IPv4 only: IPv6 link-local addresses of a new lab leave their
    // "tentative" state meanwhile (seen on a loaded machine).
    let before = sh(&ns, "ip -4 -d addr");
    gw.check_kernel().expect("Linux 5.18 or later keeps IFA_PROTO");
    assert_eq!(sh(&ns, "ip -4 -d addr"), before, "the probe address is gone again");
    // What an older kernel gets told.
    let e = natgw_dataplane::link::LinkError::NoAddressMark.to_string();
    assert!(e.contains("Linux 5.18") && e.contains("refuses to run"), "{e}");
}
