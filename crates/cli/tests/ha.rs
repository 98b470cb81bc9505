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

/// `ns`'s interface `dev`: its index and hardware address.
fn link(ns: &str, dev: &str) -> (u32, [u8; 6]) {
    let index: u32 = common::sh(ns, &format!("cat /sys/class/net/{dev}/ifindex")).trim().parse().unwrap();
    let text = common::sh(ns, &format!("cat /sys/class/net/{dev}/address"));
    let mut mac = [0u8; 6];
    for (i, part) in text.trim().split(':').enumerate() {
        mac[i] = u8::from_str_radix(part, 16).unwrap();
    }
    (index, mac)
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Waits until `ns`'s neighbour cache maps `addr` to `mac` on `dev`.
fn neighbour_learns(ns: &str, dev: &str, addr: Ipv4Addr, mac: [u8; 6]) {
    let want = mac_text(mac);
    for _ in 0..100 {
        if common::sh(ns, &format!("ip neigh show {addr} dev {dev}")).contains(&want) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{ns} never learnt {addr} at {want}");
}

/// Two replicas of the example HA gateway (`examples-ha`) on `natgw lab up
/// --ha`: gw active with the whole plan (EIPs and the LAN address), gw2 a
/// standby with every translation and no address.
struct Pair {
    lab: natgw_lab::Lab,
    plan: natgw_plan::GatewayPlan,
    standby: natgw_plan::GatewayPlan,
    active: natgw_dataplane::Gateway,
    other: natgw_dataplane::Gateway,
}

impl Pair {
    fn up(test: &str) -> Pair {
        let lab = common::lab(test);
        lab.second_gateway().unwrap();
        let dir = common::ha_examples_dir();
        let rules = std::fs::read_to_string(dir.join("10-eips.yaml")).unwrap()
            + "\n---\n"
            + &std::fs::read_to_string(dir.join("20-rules.yaml")).unwrap();
        let plan = common::plan(&common::objects_in(dir, &rules));
        let standby = plan.standby();
        let active = natgw_dataplane::Gateway::open(Some(&lab.ns("gw"))).unwrap();
        let other = natgw_dataplane::Gateway::open(Some(&lab.ns("gw2"))).unwrap();
        active.sync(&plan).unwrap();
        other.sync(&standby).unwrap();
        Pair { lab, plan, standby, active, other }
    }

    /// The switch to gw2, in the order a takeover makes it: gw lets go of
    /// the EIPs and the LAN address, gw2 takes them and announces each
    /// (`lan_host` learns the LAN address's new owner from that).
    fn switch(&self, lan_host: &str) {
        self.active.sync(&self.standby).unwrap();
        self.other.sync(&self.plan).unwrap();
        let (_, mac) = link(&self.lab.ns("gw2"), "lan0");
        neighbour_learns(&self.lab.ns(lan_host), "eth0", GW_LAN_IP.parse().unwrap(), mac);
    }
}

/// A FloatingIp session moves to the other replica, which held the whole
/// nft plan and no address: it takes the EIPs and the LAN address, and
/// the established session goes on (the same translation, picked up
/// mid-stream by its conntrack), as does a new one.
#[test]
fn a_floating_ip_session_goes_on_through_the_replica_that_takes_over() {
    use common::{EXT1, INT1, WEB_EIP};
    use natgw_lab::traffic::{tcp_connect, tcp_server, tcp_source};
    let pair = Pair::up("haswitch");
    let (gw, gw2, ext1, int1) = (pair.lab.ns("gw"), pair.lab.ns("gw2"), pair.lab.ns("ext1"), pair.lab.ns("int1"));
    let _server = tcp_server(&int1, INT1, 22).unwrap();
    let mut conn = tcp_connect(&ext1, WEB_EIP, 22).unwrap();
    conn.echo("before").unwrap();
    let (_, gw_mac) = link(&gw, "ext0");
    let (_, gw2_mac) = link(&gw2, "ext0");
    let holder = |ns: &str| {
        let p = natgw_dataplane::netns::NetnsWorker::start(Some(natgw_dataplane::netns::netns_path(ns))).unwrap();
        p.run(move || Prober::on("eth0")?.probe(&[WEB_EIP], Duration::from_millis(200))).unwrap().unwrap()
    };
    assert_eq!(holder(&ext1).map(|h| h.mac), Some(gw_mac));

    pair.switch("int1");
    // The EIP is announced by the gateway as it takes it: one gratuitous
    // ARP overrides ext1's entry for the old holder, fresh as it is (the
    // kernel lets a gratuitous ARP past the neighbour's lock time).
    neighbour_learns(&ext1, "eth0", WEB_EIP, gw2_mac);
    assert_eq!(holder(&ext1).map(|h| h.mac), Some(gw2_mac), "only the new replica answers");

    conn.echo("once switched").unwrap();
    assert_eq!(tcp_source(&ext1, WEB_EIP, 22).unwrap(), EXT1, "a new session too");
}

/// The connections `ns`'s kernel translated, as a standby would receive
/// them from the active.
fn translated_flows(ns: &str) -> Vec<natgw_dataplane::conntrack::policy::CtEntry> {
    use natgw_dataplane::conntrack::{Conntrack, replica::translation};
    natgw_lab::traffic::in_ns(ns, || {
        let ct = Conntrack::open()?;
        let dumped = ct.dump_where(|e| translation(e) != (None, None))?;
        Ok::<_, natgw_dataplane::conntrack::ConntrackError>(dumped.into_iter().map(|d| d.entry).collect())
    })
    .unwrap()
    .unwrap()
}

/// An SNAT session's source port was chosen at random by the active: a
/// standby cannot compute it. With the active's connections installed on
/// the standby (their exact translation), the session goes on through
/// the new replica with the same port; one that was not installed gets a
/// new port there and is reset.
#[test]
fn an_snat_session_keeps_its_random_port_through_the_replica_that_takes_over() {
    use common::{EGRESS_EIP, EXT1};
    use natgw_dataplane::conntrack::Conntrack;
    use natgw_lab::traffic::{tcp_connect, tcp_server};
    let pair = Pair::up("hasnat");
    let (gw, gw2, ext1, int2) = (pair.lab.ns("gw"), pair.lab.ns("gw2"), pair.lab.ns("ext1"), pair.lab.ns("int2"));
    let (b, standby) = (&pair.other, &pair.standby);
    let _server = tcp_server(&ext1, EXT1, 9000).unwrap();
    let mut kept = tcp_connect(&int2, EXT1, 9000).unwrap();
    kept.echo("before").unwrap();
    assert!(kept.seen_as.starts_with(&format!("{EGRESS_EIP}:")), "{}", kept.seen_as);
    // What the standby receives from the active: this session, not the
    // one opened after.
    let flows = translated_flows(&gw);
    assert!(!flows.is_empty());
    let installed = natgw_lab::traffic::in_ns(&gw2, move || Conntrack::open()?.install(&flows, 300)).unwrap().unwrap();
    assert!(installed >= 1);
    // The standby's own syncs and their sweeps keep them: they are judged
    // by the plan's translations, which it holds whole. (A change, then a
    // resync, so that both sweep.)
    let other = natgw_plan::GatewayPlan {
        nat: natgw_plan::NatTables { port_fwd: Default::default(), ..standby.nat.clone() },
        ..standby.clone()
    };
    assert_eq!(b.sync(&other).unwrap().conntrack_deleted, 0);
    assert_eq!(b.resync(standby).unwrap().conntrack_deleted, 0);
    let mut lost = tcp_connect(&int2, EXT1, 9000).unwrap();
    lost.echo("before").unwrap();

    pair.switch("int2");
    neighbour_learns(&ext1, "eth0", EGRESS_EIP, link(&gw2, "ext0").1);

    kept.echo("once switched").unwrap();
    assert!(lost.echo("once switched").is_err(), "a session the standby did not know is cut");
}
