//! Planning rules, from manifests to desired state. No kernel involved.

use std::net::Ipv4Addr;
use std::path::Path;

use natgw_api::{ObjectSet, load_str};
use natgw_plan::{GatewayPlan, plan_gateway};

const NETWORK: &str = r#"
apiVersion: natgw.io/v1alpha1
kind: Vpc
metadata: {name: v}
---
apiVersion: natgw.io/v1alpha1
kind: Subnet
metadata: {name: lan}
spec: {vpc: v, cidr: 10.0.0.0/16, gateway: 10.0.0.1}
---
apiVersion: natgw.io/v1alpha1
kind: Subnet
metadata: {name: ext}
spec: {cidr: 192.0.2.0/24, gateway: 192.0.2.1}
---
apiVersion: natgw.io/v1alpha1
kind: NatGateway
metadata: {name: gw}
spec: {vpc: v, lanInterface: eth0, externalInterface: net1, externalSubnet: ext}
---
apiVersion: natgw.io/v1alpha1
kind: Eip
metadata: {name: a}
spec: {gateway: gw, ip: 192.0.2.10}
---
apiVersion: natgw.io/v1alpha1
kind: Eip
metadata: {name: b}
spec: {gateway: gw, ip: 192.0.2.11}
"#;

fn set(extra: &str) -> ObjectSet {
    load_str(Path::new("t.yaml"), &format!("{NETWORK}\n---\n{extra}")).expect("valid").0
}

fn plan(extra: &str) -> GatewayPlan {
    plan_gateway(&set(extra), "gw").expect("plan")
}

fn doc(kind: &str, name: &str, spec: &str) -> String {
    format!("apiVersion: natgw.io/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec: {spec}\n---\n")
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn conflict_names(p: &GatewayPlan) -> Vec<String> {
    p.conflicts.iter().map(|c| format!("{} {}", c.object, c.field)).collect()
}

#[test]
fn eips_become_exact_addresses_with_the_external_prefix() {
    let p = plan("");
    let addrs: Vec<String> = p.addresses.iter().map(|a| format!("{} {}", a.interface, a.addr)).collect();
    assert_eq!(addrs, ["net1 192.0.2.10/24", "net1 192.0.2.11/24"]);
    let routes: Vec<String> = p.routes.iter().map(|r| format!("{} via {} dev {}", r.dst, r.via, r.interface)).collect();
    assert_eq!(routes, ["0.0.0.0/0 via 192.0.2.1 dev net1"]);
}

#[test]
fn two_floating_ips_on_one_eip_first_wins() {
    let p = plan(
        &(doc("FloatingIp", "x2", "{eip: a, internalIp: 10.0.0.5}")
            + &doc("FloatingIp", "x1", "{eip: a, internalIp: 10.0.0.6}")),
    );
    assert_eq!(p.nat.fip_dnat.get(&ip("192.0.2.10")), Some(&ip("10.0.0.6")));
    assert_eq!(conflict_names(&p), ["FloatingIp/x2 spec.eip"]);
    assert!(p.conflicts[0].reason.contains("already used by FloatingIp/x1"));
}

#[test]
fn floating_ip_and_dnat_on_one_eip_conflict() {
    let p = plan(
        &(doc("FloatingIp", "a-f", "{eip: a, internalIp: 10.0.0.5}")
            + &doc(
                "DnatRule",
                "b-d",
                "{eip: a, protocol: tcp, externalPort: 80, internalIp: 10.0.0.6, internalPort: 80}",
            )),
    );
    assert_eq!(conflict_names(&p), ["DnatRule/b-d spec.eip"]);
    assert!(p.nat.port_fwd.is_empty());
    // The older claim wins even when it is the DnatRule.
    let p = plan(
        &(doc("DnatRule", "a-d", "{eip: a, protocol: tcp, externalPort: 80, internalIp: 10.0.0.6, internalPort: 80}")
            + &doc("FloatingIp", "b-f", "{eip: a, internalIp: 10.0.0.5}")),
    );
    assert_eq!(conflict_names(&p), ["FloatingIp/b-f spec.eip"]);
}

#[test]
fn dnat_identity_includes_the_protocol() {
    let p = plan(
        &(doc(
            "DnatRule",
            "t",
            "{eip: a, protocol: tcp, externalPort: 3389, internalIp: 10.0.0.6, internalPort: 3389}",
        ) + &doc(
            "DnatRule",
            "u",
            "{eip: a, protocol: udp, externalPort: 3389, internalIp: 10.0.0.6, internalPort: 3389}",
        ) + &doc(
            "DnatRule",
            "v",
            "{eip: a, protocol: udp, externalPort: 3389, internalIp: 10.0.0.7, internalPort: 3389}",
        )),
    );
    assert_eq!(p.nat.port_fwd.len(), 2);
    assert_eq!(conflict_names(&p), ["DnatRule/v spec.externalPort"]);
}

#[test]
fn internal_addresses_outside_the_vpc_are_rejected() {
    let p = plan(
        &(doc("FloatingIp", "f", "{eip: a, internalIp: 172.16.0.5}")
            + &doc(
                "DnatRule",
                "d",
                "{eip: b, protocol: tcp, externalPort: 80, internalIp: 172.16.0.6, internalPort: 80}",
            )
            + &doc("SnatRule", "s", "{eip: b, internalCidr: 172.16.0.0/24}")),
    );
    assert_eq!(
        conflict_names(&p),
        ["DnatRule/d spec.internalIp", "FloatingIp/f spec.internalIp", "SnatRule/s spec.internalCidr"]
    );
    assert!(p.nat.fip_dnat.is_empty() && p.nat.port_fwd.is_empty() && p.nat.snat.is_empty());
}

/// Second round, item 3: in a VPC shared by tenants, an Eip's
/// internalCidrs bound the hosts its rules reach, so a tenant with `use`
/// on its Eip cannot put a FloatingIp, DnatRule or SnatRule on another
/// tenant's host; a refused rule takes no EIP or port from a rule that
/// may have it.
#[test]
fn round2_item3_an_eips_internal_cidrs_bound_the_hosts_its_rules_reach() {
    let fenced = doc("Eip", "alice", "{gateway: gw, ip: 192.0.2.20, internalCidrs: [10.0.1.0/24]}");
    let p = plan(
        &(fenced.clone()
            + &doc("FloatingIp", "onto-bob", "{eip: alice, internalIp: 10.0.2.5}")
            + &doc("FloatingIp", "own", "{eip: alice, internalIp: 10.0.1.5}")
            + &doc(
                "DnatRule",
                "d",
                "{eip: alice, protocol: tcp, externalPort: 80, internalIp: 10.0.2.6, internalPort: 80}",
            )
            + &doc("SnatRule", "wide", "{eip: alice, internalCidr: 10.0.0.0/16}")
            + &doc("SnatRule", "narrow", "{eip: alice, internalCidr: 10.0.1.128/25}")),
    );
    assert_eq!(
        conflict_names(&p),
        ["DnatRule/d spec.internalIp", "FloatingIp/onto-bob spec.internalIp", "SnatRule/wide spec.internalCidr"]
    );
    let why = &p.conflicts.iter().find(|c| c.object.name == "onto-bob").unwrap().reason;
    assert!(why.contains("10.0.2.5 is outside the internalCidrs of Eip \"alice\" (10.0.1.0/24)"), "{why}");
    assert_eq!(p.nat.fip_dnat.get(&ip("192.0.2.20")), Some(&ip("10.0.1.5")), "the refused one took nothing");
    // Without internalCidrs, the whole VPC (one VPC, one tenant).
    assert!(plan(&doc("FloatingIp", "any", "{eip: a, internalIp: 10.0.2.5}")).conflicts.is_empty());
    // Host bits in the list are refused when loading, naming the field.
    let bad = doc("Eip", "c", "{gateway: gw, ip: 192.0.2.21, internalCidrs: [10.0.1.1/24]}");
    let err = load_str(Path::new("t.yaml"), &format!("{NETWORK}\n---\n{bad}")).unwrap_err().to_string();
    assert!(err.contains("spec.internalCidrs[0]"), "{err}");
}

/// Second round, item 9: a FloatingIp or DnatRule aimed at the gateway
/// itself would open its own services (its metrics port) to the
/// external side.
#[test]
fn round2_item9_a_rule_never_targets_the_gateways_own_address() {
    let p = plan(
        &(doc("FloatingIp", "f", "{eip: a, internalIp: 10.0.0.1}")
            + &doc(
                "DnatRule",
                "d",
                "{eip: b, protocol: tcp, externalPort: 9478, internalIp: 10.0.0.1, internalPort: 9478}",
            )),
    );
    assert_eq!(conflict_names(&p), ["DnatRule/d spec.internalIp", "FloatingIp/f spec.internalIp"]);
    assert!(p.conflicts[0].reason.contains("10.0.0.1 is the router address of Subnet \"lan\""), "{:?}", p.conflicts);
    assert!(p.nat.fip_dnat.is_empty() && p.nat.port_fwd.is_empty());
}

#[test]
fn eips_outside_the_external_subnet_or_on_its_router_are_rejected() {
    let p = plan(
        &(doc("Eip", "far", "{gateway: gw, ip: 203.0.113.5}")
            + &doc("Eip", "router", "{gateway: gw, ip: 192.0.2.1}")
            + &doc("Eip", "twin", "{gateway: gw, ip: 192.0.2.10}")),
    );
    assert_eq!(conflict_names(&p), ["Eip/far spec.ip", "Eip/router spec.ip", "Eip/twin spec.ip"]);
    assert_eq!(p.addresses.len(), 2);
}

#[test]
fn an_eip_without_an_address_and_its_rules_are_pending() {
    let p =
        plan(&(doc("Eip", "later", "{gateway: gw}") + &doc("FloatingIp", "f", "{eip: later, internalIp: 10.0.0.5}")));
    assert!(p.conflicts.iter().all(|c| c.pending), "{:?}", p.conflicts);
    assert_eq!(conflict_names(&p), ["Eip/later spec.ip", "FloatingIp/f spec.eip"]);
}

#[test]
fn longest_prefix_wins_between_snat_rules() {
    let p = plan(
        &(doc("SnatRule", "wide", "{eip: a, internalCidr: 10.0.0.0/16}")
            + &doc("SnatRule", "narrow", "{eip: b, internalCidr: 10.0.5.0/24}")),
    );
    let lookup = |x: &str| p.nat.snat.iter().find(|r| r.first <= ip(x) && ip(x) <= r.last).map(|r| r.eip);
    assert_eq!(lookup("10.0.4.255"), Some(ip("192.0.2.10")));
    assert_eq!(lookup("10.0.5.7"), Some(ip("192.0.2.11")));
    assert_eq!(lookup("10.0.6.0"), Some(ip("192.0.2.10")));
    let dup = plan(
        &(doc("SnatRule", "one", "{eip: a, internalCidr: 10.0.0.0/16}")
            + &doc("SnatRule", "two", "{eip: b, internalCidr: 10.0.0.0/16}")),
    );
    assert_eq!(conflict_names(&dup), ["SnatRule/two spec.internalCidr"]);
}

#[test]
fn objects_of_other_gateways_are_ignored() {
    let other = doc("NatGateway", "gw2", "{vpc: v, lanInterface: eth0, externalInterface: net1, externalSubnet: ext}")
        + &doc("Eip", "c", "{gateway: gw2, ip: 192.0.2.50}")
        + &doc("FloatingIp", "f", "{eip: c, internalIp: 10.0.0.5}");
    let p = plan(&other);
    assert!(p.conflicts.is_empty(), "{:?}", p.conflicts);
    assert!(p.nat.fip_dnat.is_empty());
    assert_eq!(plan_gateway(&set(&other), "gw2").unwrap().nat.fip_dnat.len(), 1);
}

#[test]
fn a_missing_gateway_or_external_subnet_is_an_error_not_an_empty_plan() {
    assert!(plan_gateway(&set(""), "nope").is_err());
    let mut s = set("");
    s.subnets.remove("ext");
    assert!(plan_gateway(&s, "gw").is_err());
}

#[test]
fn planning_is_deterministic_whatever_the_input_order() {
    let a = doc("FloatingIp", "fx", "{eip: a, internalIp: 10.0.0.5}")
        + &doc("FloatingIp", "fy", "{eip: a, internalIp: 10.0.0.6}");
    let b = doc("FloatingIp", "fy", "{eip: a, internalIp: 10.0.0.6}")
        + &doc("FloatingIp", "fx", "{eip: a, internalIp: 10.0.0.5}");
    assert_eq!(plan(&a), plan(&b));
}

/// Item 10: a route the API server should have refused (stored before the
/// CEL rule) is skipped and reported, never a plan that fails every sync.
#[test]
fn item10_an_invalid_route_is_skipped_and_reported() {
    let mut objects = set("");
    let gw = std::sync::Arc::make_mut(objects.gateways.get_mut("gw").unwrap());
    gw.spec.routes = vec![
        natgw_api::GatewayRoute { cidr: "10.9.0.1/16".parse().unwrap(), next_hop: "10.0.0.254".parse().unwrap() },
        natgw_api::GatewayRoute { cidr: "10.8.0.0/16".parse().unwrap(), next_hop: "255.255.255.255".parse().unwrap() },
        natgw_api::GatewayRoute { cidr: "10.7.0.0/16".parse().unwrap(), next_hop: "10.0.0.254".parse().unwrap() },
    ];
    let p = plan_gateway(&objects, "gw").expect("the gateway still plans");
    assert_eq!(p.routes.iter().filter(|r| r.dst.prefix_len() > 0).count(), 1, "only the valid route");
    let fields: Vec<&str> =
        p.conflicts.iter().filter(|c| c.object.kind == natgw_api::Kind::NatGateway).map(|c| c.field.as_str()).collect();
    assert_eq!(fields, ["spec.routes[0].cidr", "spec.routes[1].nextHop"]);
}

/// With two replicas the LAN address is natgw's to move: the active's plan
/// holds it beside the EIPs, the standby's holds neither.
#[test]
fn an_ha_gateway_holds_its_lan_address_with_the_eips_and_its_standby_neither() {
    let ha = NETWORK.replace("externalSubnet: ext}", "externalSubnet: ext, lanIp: 10.0.0.1, replicas: 2}");
    let set = load_str(Path::new("t.yaml"), &ha).expect("valid").0;
    let p = plan_gateway(&set, "gw").expect("plan");
    let held: Vec<String> = p.addresses.iter().map(|a| format!("{} {}", a.interface, a.addr)).collect();
    assert_eq!(held, ["eth0 10.0.0.1/32", "net1 192.0.2.10/24", "net1 192.0.2.11/24"]);
    assert!(!p.holds_eip(ip("10.0.0.1")), "not an EIP");
    assert!(p.standby().addresses.is_empty());
    // Run as one replica (a cluster, so far), the attachment sets it.
    let held: Vec<String> =
        p.single_replica().addresses.iter().map(|a| format!("{} {}", a.interface, a.addr)).collect();
    assert_eq!(held, ["net1 192.0.2.10/24", "net1 192.0.2.11/24"]);
    // One replica: the LAN attachment sets the address, natgw does not.
    let one = NETWORK.replace("externalSubnet: ext}", "externalSubnet: ext, lanIp: 10.0.0.1}");
    let single = plan_gateway(&load_str(Path::new("t.yaml"), &one).expect("valid").0, "gw").expect("plan");
    assert!(single.addresses.iter().all(|a| a.interface.as_str() == "net1"));
}
