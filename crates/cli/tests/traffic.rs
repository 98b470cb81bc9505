//! Real packets through a real gateway namespace: every translation kind,
//! hairpin, and removal that cuts live sessions.

mod common;

use common::*;
use natgw_dataplane::Gateway;
use natgw_lab::traffic::{tcp_connect, tcp_server, tcp_source, udp_server, udp_source};

fn full_set() -> natgw_api::ObjectSet {
    let rules = std::fs::read_to_string(examples_dir().join("10-eips.yaml")).unwrap()
        + "\n---\n"
        + &std::fs::read_to_string(examples_dir().join("20-rules.yaml")).unwrap();
    objects(&rules)
}

#[test]
fn snat_shows_the_eip_to_external_servers() {
    let lab = lab("snat");
    let gw = Gateway::open(Some(&lab.ns("gw"))).unwrap();
    converge(&gw, &full_set());
    let _tcp = tcp_server(&lab.ns("ext1"), EXT1, 9000).unwrap();
    let _udp = udp_server(&lab.ns("ext1"), EXT1, 9000).unwrap();
    assert_eq!(tcp_source(&lab.ns("int2"), EXT1, 9000).unwrap(), EGRESS_EIP);
    assert_eq!(udp_source(&lab.ns("int2"), EXT1, 9000).unwrap(), EGRESS_EIP);
}

/// A gateway pod has its own default route (eth0, the cluster network,
/// where the API server is). natgw's default lives in its own table and
/// serves only traffic from the LAN, so both keep working.
#[test]
fn the_pods_own_default_route_stays_and_only_lan_traffic_takes_natgws() {
    let lab = lab("podroute");
    let ns = lab.ns("gw");
    sh(
        &ns,
        "ip link add c0 type veth peer name c1; ip addr add 10.244.9.1/24 dev c0; ip link set c0 up; ip link set c1 up",
    );
    sh(&ns, "ip route add default via 10.244.9.2 dev c0");
    let gw = Gateway::open(Some(&ns)).unwrap();
    let p = converge(&gw, &full_set());
    let _tcp = tcp_server(&lab.ns("ext1"), EXT1, 9000).unwrap();
    assert_eq!(tcp_source(&lab.ns("int2"), EXT1, 9000).unwrap(), EGRESS_EIP);
    assert!(sh(&ns, "ip route show default").contains("via 10.244.9.2 dev c0"));
    assert!(sh(&ns, "ip route show table 7476").contains("default via 198.51.100.1 dev ext0"));
    assert!(sh(&ns, "ip rule").contains("iif lan0 lookup main suppress_prefixlength 0"));
    assert_clean(&gw, &p);
    // A rule deleted by hand is drift, and comes back.
    sh(&ns, "ip rule del priority 7471");
    assert!(!gw.audit(&p).unwrap().is_empty());
    gw.resync(&p).unwrap();
    assert_clean(&gw, &p);
    gw.teardown().unwrap();
    assert!(!sh(&ns, "ip rule").contains("lan0"), "teardown leaves no rule");
    assert!(sh(&ns, "ip route show default").contains("via 10.244.9.2 dev c0"));
}

#[test]
fn floating_ip_translates_both_ways() {
    let lab = lab("fip");
    let gw = Gateway::open(Some(&lab.ns("gw"))).unwrap();
    converge(&gw, &full_set());
    let _inside = tcp_server(&lab.ns("int1"), INT1, 22).unwrap();
    let _outside = tcp_server(&lab.ns("ext1"), EXT1, 9000).unwrap();
    // Inbound: the internal host sees the real client.
    assert_eq!(tcp_source(&lab.ns("ext1"), WEB_EIP, 22).unwrap(), EXT1);
    // Outbound: the floating IP wins over the VPC-wide SNAT rule.
    assert_eq!(tcp_source(&lab.ns("int1"), EXT1, 9000).unwrap(), WEB_EIP);
}

#[test]
fn dnat_forwards_tcp_and_udp_separately() {
    let lab = lab("dnat");
    let gw = Gateway::open(Some(&lab.ns("gw"))).unwrap();
    converge(&gw, &full_set());
    let _tcp = tcp_server(&lab.ns("int2"), INT2, 8080).unwrap();
    let _udp = udp_server(&lab.ns("int2"), INT2, 5353).unwrap();
    assert_eq!(tcp_source(&lab.ns("ext1"), PORTS_EIP, 80).unwrap(), EXT1);
    assert_eq!(udp_source(&lab.ns("ext1"), PORTS_EIP, 53).unwrap(), EXT1);
    // Only the forwarded port and protocol pass.
    assert!(tcp_source(&lab.ns("ext1"), PORTS_EIP, 53).is_err());
}

#[test]
fn hairpin_reaches_an_internal_host_through_its_eip() {
    let lab = lab("hairpin");
    let gw = Gateway::open(Some(&lab.ns("gw"))).unwrap();
    converge(&gw, &full_set());
    let _web = tcp_server(&lab.ns("int1"), INT1, 22).unwrap();
    let _fwd = tcp_server(&lab.ns("int2"), INT2, 8080).unwrap();
    // int2 -> int1's floating IP, and int1 -> int2's port forward: the
    // gateway rewrites the source to the EIP so replies come back through it.
    assert_eq!(tcp_source(&lab.ns("int2"), WEB_EIP, 22).unwrap(), WEB_EIP);
    assert_eq!(tcp_source(&lab.ns("int1"), PORTS_EIP, 80).unwrap(), PORTS_EIP);
}

#[test]
fn removing_a_floating_ip_cuts_its_sessions_both_ways() {
    let lab = lab("rmfip");
    let gw = Gateway::open(Some(&lab.ns("gw"))).unwrap();
    converge(&gw, &full_set());
    let _web = tcp_server(&lab.ns("int1"), INT1, 22).unwrap();
    let _out = tcp_server(&lab.ns("ext1"), EXT1, 9000).unwrap();
    let mut inbound = tcp_connect(&lab.ns("ext1"), WEB_EIP, 22).unwrap();
    let mut outbound = tcp_connect(&lab.ns("int1"), EXT1, 9000).unwrap();
    inbound.echo("before").unwrap();
    outbound.echo("before").unwrap();

    let mut set = full_set();
    set.floating_ips.clear();
    converge(&gw, &set);
    assert!(inbound.echo("after").is_err(), "inbound session survived the removal");
    assert!(outbound.echo("after").is_err(), "outbound session kept the EIP");
    assert!(tcp_source(&lab.ns("ext1"), WEB_EIP, 22).is_err());
    // int1 now leaves through the VPC-wide SNAT rule.
    assert_eq!(tcp_source(&lab.ns("int1"), EXT1, 9000).unwrap(), EGRESS_EIP);
}

#[test]
fn removing_a_dnat_rule_cuts_its_sessions() {
    let lab = lab("rmdnat");
    let gw = Gateway::open(Some(&lab.ns("gw"))).unwrap();
    converge(&gw, &full_set());
    let _fwd = tcp_server(&lab.ns("int2"), INT2, 8080).unwrap();
    let mut session = tcp_connect(&lab.ns("ext1"), PORTS_EIP, 80).unwrap();
    session.echo("before").unwrap();
    let mut set = full_set();
    set.dnat_rules.remove("int2-tcp");
    converge(&gw, &set);
    assert!(session.echo("after").is_err(), "session survived the removal");
    assert!(tcp_source(&lab.ns("ext1"), PORTS_EIP, 80).is_err());
}

#[test]
fn removing_a_snat_rule_cuts_its_sessions() {
    let lab = lab("rmsnat");
    let gw = Gateway::open(Some(&lab.ns("gw"))).unwrap();
    converge(&gw, &full_set());
    let _out = tcp_server(&lab.ns("ext1"), EXT1, 9000).unwrap();
    let mut session = tcp_connect(&lab.ns("int2"), EXT1, 9000).unwrap();
    session.echo("before").unwrap();
    let mut set = full_set();
    set.snat_rules.clear();
    converge(&gw, &set);
    assert!(session.echo("after").is_err(), "session kept the EIP after its rule went");
}

#[test]
fn removing_one_eip_removes_exactly_its_local_route() {
    let lab = lab("rmeip");
    let gw = Gateway::open(Some(&lab.ns("gw"))).unwrap();
    converge(&gw, &full_set());
    let mut set = full_set();
    set.snat_rules.clear();
    set.eips.remove("egress");
    converge(&gw, &set);
    // One line per EIP, each ending in a space after the address: .10 is
    // not a prefix of .100.
    let eips = sh(&lab.ns("gw"), "ip -4 -o route show table local proto 110 dev ext0");
    assert!(!eips.contains("local 198.51.100.10 "), "{eips}");
    assert!(eips.contains("local 198.51.100.11 ") && eips.contains("local 198.51.100.12 "), "{eips}");
    // The subnet stays while EIPs are in it.
    assert!(sh(&lab.ns("gw"), "ip -4 -o route show proto 110 dev ext0").contains("198.51.100.0/24"));
}

#[test]
fn a_new_eip_is_announced_with_gratuitous_arp() {
    let lab = lab("garp");
    let gw = Gateway::open(Some(&lab.ns("gw"))).unwrap();
    converge(&gw, &objects(""));
    // ext1 has never talked to the gateway; like an upstream router it
    // accepts gratuitous ARP, so its neighbour table learns the EIP only
    // from the announcement.
    sh(&lab.ns("ext1"), "sysctl -qw net.ipv4.conf.eth0.arp_accept=1");
    converge(&gw, &objects(&eip("web", WEB_EIP)));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let neigh = sh(&lab.ns("ext1"), "ip neigh show 198.51.100.11");
    assert!(neigh.contains("lladdr"), "no neighbour entry from GARP: {neigh:?}");
}

/// The gateway is no open router: a host on the external side that routes
/// the VPC through an EIP, and a VPC host that aims at the pod's own
/// network (eth0 in a cluster), get nothing through untranslated, and the
/// drops are counted by direction; the translated paths keep working in
/// the same lab.
#[test]
fn the_gateway_forwards_only_what_it_translates() {
    let lab = lab("openrouter");
    lab.cluster_side().unwrap();
    let gw = Gateway::open(Some(&lab.ns("gw"))).unwrap();
    let p = converge(&gw, &full_set());
    let pod: std::net::Ipv4Addr = natgw_lab::POD_PEER_IP.parse().unwrap();
    let _hidden = tcp_server(&lab.ns("int2"), INT2, 9001).unwrap();
    let _pod = tcp_server(&lab.ns("pod"), pod, 9002).unwrap();
    let _fwd = tcp_server(&lab.ns("int2"), INT2, 8080).unwrap();
    let _web = tcp_server(&lab.ns("int1"), INT1, 22).unwrap();
    let _out = tcp_server(&lab.ns("ext1"), EXT1, 9000).unwrap();
    let _udp = udp_server(&lab.ns("ext1"), EXT1, 9000).unwrap();
    // The external host routes the whole VPC via an EIP.
    sh(&lab.ns("ext1"), &format!("ip route add 10.77.0.0/24 via {EGRESS_EIP}"));

    assert!(tcp_source(&lab.ns("ext1"), INT2, 9001).is_err(), "the external side reached a VPC host untranslated");
    assert!(tcp_source(&lab.ns("int2"), pod, 9002).is_err(), "a VPC host reached the pod's network");
    assert!(tcp_source(&lab.ns("pod"), INT2, 9001).is_err(), "the pod's network reached a VPC host");
    // Item 9: the gateway's own sockets (its metrics port, on every
    // address) answer only on the pod's own network.
    let any = std::net::Ipv4Addr::UNSPECIFIED;
    let _metrics = tcp_server(&lab.ns("gw"), any, 9478).unwrap();
    let gw_lan: std::net::Ipv4Addr = natgw_lab::GW_LAN_IP.parse().unwrap();
    let gw_pod: std::net::Ipv4Addr = natgw_lab::POD_GW_IP.parse().unwrap();
    assert!(tcp_source(&lab.ns("int2"), gw_lan, 9478).is_err(), "the LAN reached the gateway's own port");
    assert!(tcp_source(&lab.ns("ext1"), EGRESS_EIP, 9478).is_err(), "the external side reached it through an EIP");
    assert!(tcp_source(&lab.ns("int2"), gw_pod, 9478).is_err(), "the LAN reached it through the pod's address");
    assert_eq!(tcp_source(&lab.ns("pod"), gw_pod, 9478).unwrap(), pod, "the pod's network (kubelet, Prometheus)");

    // Translated paths, both ways, in the same lab.
    assert_eq!(tcp_source(&lab.ns("ext1"), WEB_EIP, 22).unwrap(), EXT1, "FloatingIp inbound");
    assert_eq!(tcp_source(&lab.ns("int1"), EXT1, 9000).unwrap(), WEB_EIP, "FloatingIp outbound");
    assert_eq!(tcp_source(&lab.ns("ext1"), PORTS_EIP, 80).unwrap(), EXT1, "DnatRule");
    assert_eq!(tcp_source(&lab.ns("int2"), EXT1, 9000).unwrap(), EGRESS_EIP, "SnatRule");
    assert_eq!(udp_source(&lab.ns("int2"), EXT1, 9000).unwrap(), EGRESS_EIP, "SnatRule, UDP");
    assert_eq!(tcp_source(&lab.ns("int2"), WEB_EIP, 22).unwrap(), WEB_EIP, "hairpin");

    let drops = gw.forward_drops().unwrap().expect("natgw's table");
    for direction in ["external", "lan", "other"] {
        assert!(drops[direction] > 0, "no drop counted from {direction}: {drops:?}");
    }
    assert_clean(&gw, &p);
    // A host with no translation leaves with nothing once its rule goes.
    let mut set = full_set();
    set.snat_rules.clear();
    let p = converge(&gw, &set);
    assert!(tcp_source(&lab.ns("int2"), EXT1, 9000).is_err(), "left untranslated without its SnatRule");
    assert_clean(&gw, &p);
}
