//! Generated object sets at benchmark scale.

use std::net::Ipv4Addr;

use natgw_api::*;

/// The external subnet of the benchmark: room for 250,000 EIPs.
pub const EXT_NET: &str = "100.64.0.0/14";
pub const EXT_ROUTER: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
/// Internal addresses of FloatingIps beyond the lab's hosts.
pub const BULK_NET: &str = "10.80.0.0/14";

pub struct Scale {
    pub fips: u32,
    pub dnats: u32,
    pub snats: u32,
}

/// The n-th EIP address, above the router and the low addresses.
pub fn eip_ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(EXT_ROUTER) + 100 + n)
}

/// The n-th bulk internal address.
fn bulk_ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 80, 0, 10)) + n)
}

/// FloatingIp 0 maps eip_ip(0) to the lab's int1, so it carries real
/// traffic; the others map to unused internal addresses.
pub fn build(s: &Scale) -> ObjectSet {
    let mut set = ObjectSet::default();
    set.insert(Object::Vpc(Vpc::new("demo", VpcSpec::default())));
    let subnet = |vpc: Option<&str>, cidr: &str, gw: Ipv4Addr| SubnetSpec {
        cidr: cidr.parse().unwrap_or_default(),
        gateway: gw,
        exclude_ips: vec![],
        vpc: vpc.map(str::to_string),
    };
    set.insert(Object::Subnet(Subnet::new(
        "demo-lan",
        subnet(Some("demo"), natgw_lab::LAN_CIDR, Ipv4Addr::new(10, 77, 0, 1)),
    )));
    set.insert(Object::Subnet(Subnet::new("bulk", subnet(Some("demo"), BULK_NET, Ipv4Addr::new(10, 80, 0, 1)))));
    set.insert(Object::Subnet(Subnet::new("external", subnet(None, EXT_NET, EXT_ROUTER))));
    set.insert(Object::NatGateway(NatGateway::new(
        "demo-gw",
        NatGatewaySpec {
            vpc: "demo".into(),
            lan_interface: natgw_lab::LAN_IF.into(),
            external_interface: natgw_lab::EXT_IF.into(),
            external_subnet: "external".into(),
            routes: vec![],
            external_network: None,
            lan_network: None,
            lan_ip: None,
            replicas: None,
        },
    )));
    let mut next_eip = 0;
    let mut add_eip = |set: &mut ObjectSet| {
        let name = format!("eip-{next_eip}");
        set.insert(Object::Eip(Eip::new(
            &name,
            EipSpec { gateway: "demo-gw".into(), ip: Some(eip_ip(next_eip)), internal_cidrs: Vec::new() },
        )));
        next_eip += 1;
        name
    };
    for i in 0..s.fips {
        let eip = add_eip(&mut set);
        let internal = if i == 0 { Ipv4Addr::new(10, 77, 0, 11) } else { bulk_ip(i) };
        set.insert(Object::FloatingIp(FloatingIp::new(
            &format!("fip-{i}"),
            FloatingIpSpec { eip, internal_ip: internal },
        )));
    }
    // Port forwards: ten ports per EIP, alternating TCP and UDP.
    let mut eip = String::new();
    for i in 0..s.dnats {
        if i % 10 == 0 {
            eip = add_eip(&mut set);
        }
        let protocol = if i % 2 == 0 { Protocol::Tcp } else { Protocol::Udp };
        let spec = DnatRuleSpec {
            eip: eip.clone(),
            protocol,
            external_port: 1000 + (i % 10) as u16,
            internal_ip: bulk_ip(150_000 + i),
            internal_port: 80,
        };
        set.insert(Object::DnatRule(DnatRule::new(&format!("dnat-{i}"), spec)));
    }
    // SNAT: one /26 of the bulk subnet per rule, plus the whole subnet as
    // a catch-all so prefixes nest; beyond 4,096 rules, /30s inside them.
    for i in 0..s.snats {
        let eip = add_eip(&mut set);
        let bulk = u32::from(Ipv4Addr::new(10, 80, 0, 0));
        let cidr = match i {
            0 => BULK_NET.parse().unwrap_or_default(),
            1..4096 => ipnet::Ipv4Net::new(Ipv4Addr::from(bulk + i * 64), 26).unwrap_or_default(),
            _ => ipnet::Ipv4Net::new(Ipv4Addr::from(bulk + (i - 4096) * 4), 30).unwrap_or_default(),
        };
        let spec = SnatRuleSpec { eip, internal_cidr: cidr };
        set.insert(Object::SnatRule(SnatRule::new(&format!("snat-{i}"), spec)));
    }
    set
}

/// Gives every Eip and rule what the API server serves of it once natgw
/// has programmed it: a uid, a resourceVersion, a generation, a creation
/// time, both finalizers and the agent's own three conditions, each then
/// held as natgw holds it (`natgw_api::Project`). Without it the objects
/// are as small as a manifest makes them.
pub fn as_served(set: &mut ObjectSet) {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
    let mut version = 4_000_000u64;
    let mut meta = |m: &mut ObjectMeta| {
        version += 1;
        m.uid = Some(format!("6f1c2a7e-0b3d-4e5f-9a8b-{version:012x}"));
        m.resource_version = Some(version.to_string());
        m.generation = Some(1);
        m.creation_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::from_second(1_764_700_000).unwrap_or_default()));
        m.finalizers = Some(vec![CONTROLLER_FINALIZER.to_string(), gateway_finalizer("demo-gw")]);
    };
    let conditions = || -> Vec<Condition> {
        let at = Time(k8s_openapi::jiff::Timestamp::from_second(1_764_700_001).unwrap_or_default());
        let c = |t: &str, s: &str, reason: &str, message: &str| Condition {
            type_: t.into(),
            status: s.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: Some(1),
            last_transition_time: at.clone(),
        };
        vec![
            c("Programmed", "True", "InKernel", "programmed in gateway demo-gw"),
            c("Conflict", "False", "NoConflict", ""),
            c("Ready", "True", "InKernel", "programmed in gateway demo-gw"),
        ]
    };
    let common = || CommonStatus { observed_generation: Some(1), conditions: conditions() };
    serve(&mut set.eips, &mut meta, |e: &mut Eip| {
        e.status = Some(EipStatus { ip: e.spec.ip, used_by: Some("fip".into()), common: common() })
    });
    serve(&mut set.floating_ips, &mut meta, |f: &mut FloatingIp| f.status = Some(common()));
    serve(&mut set.dnat_rules, &mut meta, |d: &mut DnatRule| d.status = Some(common()));
    serve(&mut set.snat_rules, &mut meta, |s: &mut SnatRule| s.status = Some(common()));
}

/// Each object of a kind served with `meta` and `status`, then held.
fn serve<K: kube::Resource + Project>(
    objects: &mut std::collections::BTreeMap<Name, std::sync::Arc<HeldOf<K>>>,
    meta: &mut impl FnMut(&mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta),
    status: impl Fn(&mut K),
) {
    for (name, o) in objects.iter_mut() {
        let mut served = K::named(name, o.spec.clone());
        meta(served.meta_mut());
        status(&mut served);
        *o = std::sync::Arc::new(served.project());
    }
}
