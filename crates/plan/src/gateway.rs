//! `plan_gateway`: objects in, one gateway's desired state out.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use natgw_api::{DnatRule, FloatingIp, Kind, ObjectRef, ObjectSet, age_key};

use crate::snat::longest_prefix_ranges;
use crate::state::{Conflict, GatewayPlan, IfAddr, Route};

/// The gateway itself cannot be planned. Callers must then leave the
/// kernel as it is: an empty plan would tear down working state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("NatGateway {0:?} does not exist")]
    NoGateway(String),
    #[error("NatGateway {gateway:?}: spec.externalSubnet: Subnet {subnet:?} does not exist")]
    NoExternalSubnet { gateway: String, subnet: String },
}

struct Planner<'a> {
    set: &'a ObjectSet,
    plan: GatewayPlan,
}

impl Planner<'_> {
    fn conflict(&mut self, object: ObjectRef, field: &str, reason: String) {
        self.plan.conflicts.push(Conflict { object, field: field.into(), reason, pending: false });
    }
    fn pending(&mut self, object: ObjectRef, field: &str, reason: String) {
        self.plan.conflicts.push(Conflict { object, field: field.into(), reason, pending: true });
    }
}

/// Computes everything gateway `name` should hold. Deterministic: when two
/// objects claim the same thing, the older one wins (creation time, then
/// name) and the other is reported in `conflicts`.
pub fn plan_gateway(set: &ObjectSet, name: &str) -> Result<GatewayPlan, PlanError> {
    let gw = set.gateways.get(name).ok_or_else(|| PlanError::NoGateway(name.into()))?;
    let ext = set
        .subnets
        .get(&gw.spec.external_subnet)
        .ok_or_else(|| PlanError::NoExternalSubnet { gateway: name.into(), subnet: gw.spec.external_subnet.clone() })?;
    let mut p = Planner {
        set,
        plan: GatewayPlan {
            gateway: name.into(),
            lan_interface: gw.spec.lan_interface.clone(),
            external_interface: gw.spec.external_interface.clone(),
            ..Default::default()
        },
    };
    let internal: Vec<Ipv4Net> = set
        .subnets
        .values()
        .filter(|s| s.spec.vpc.as_deref() == Some(gw.spec.vpc.as_str()))
        .map(|s| s.spec.cidr)
        .collect();
    p.plan.nat.internal_nets = merge_ranges(internal.iter().map(|n| (n.network(), n.broadcast())));
    p.plan.routes.insert(Route {
        dst: Ipv4Net::default(),
        via: ext.spec.gateway,
        interface: gw.spec.external_interface.clone(),
    });
    for (i, r) in gw.spec.routes.iter().enumerate() {
        // A route the API server should have refused (an object from
        // before the CEL rule) is reported and skipped, never a failing sync.
        if let Some(e) = natgw_api::check_route(i, r).into_iter().next() {
            p.conflict(ObjectRef::new(Kind::NatGateway, name), &e.field, e.message);
            continue;
        }
        p.plan.routes.insert(Route { dst: r.cidr, via: r.next_hop, interface: gw.spec.lan_interface.clone() });
    }

    let eips = plan_eips(&mut p, name, ext.spec.cidr, ext.spec.gateway);
    let in_vpc = |ip: Ipv4Addr| internal.iter().any(|n| n.contains(&ip));

    // Claims on a whole EIP (FloatingIp) and on EIP ports (DnatRule) are
    // weighed together, oldest first.
    enum Claim<'a> {
        Fip(&'a FloatingIp),
        Dnat(&'a DnatRule),
    }
    let mut claims: Vec<((Option<String>, String), ObjectRef, Claim)> = Vec::new();
    for f in set.floating_ips.values() {
        claims.push((age_key(f), ObjectRef::new(Kind::FloatingIp, kube::ResourceExt::name_any(f)), Claim::Fip(f)));
    }
    for d in set.dnat_rules.values() {
        claims.push((age_key(d), ObjectRef::new(Kind::DnatRule, kube::ResourceExt::name_any(d)), Claim::Dnat(d)));
    }
    claims.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut whole: BTreeMap<Ipv4Addr, ObjectRef> = BTreeMap::new();
    let mut ports: BTreeMap<Ipv4Addr, ObjectRef> = BTreeMap::new();
    let mut fip_internal: BTreeMap<Ipv4Addr, ObjectRef> = BTreeMap::new();
    let mut port_owner: BTreeMap<crate::PortKey, ObjectRef> = BTreeMap::new();
    for (_, r, claim) in &claims {
        let eip_name = match claim {
            Claim::Fip(f) => &f.spec.eip,
            Claim::Dnat(d) => &d.spec.eip,
        };
        let Some(eip) = resolve(&mut p, &eips, r, eip_name) else { continue };
        match claim {
            Claim::Fip(f) => {
                let internal_ip = f.spec.internal_ip;
                if let Some(other) = whole.get(&eip).or_else(|| ports.get(&eip)) {
                    p.conflict(r.clone(), "spec.eip", format!("Eip {eip_name:?} ({eip}) is already used by {other}"));
                } else if !in_vpc(internal_ip) {
                    p.conflict(
                        r.clone(),
                        "spec.internalIp",
                        format!("{internal_ip} is outside every subnet of Vpc {:?}", gw.spec.vpc),
                    );
                } else if let Some(other) = fip_internal.get(&internal_ip) {
                    p.conflict(
                        r.clone(),
                        "spec.internalIp",
                        format!("{internal_ip} already has a floating IP through {other}"),
                    );
                } else {
                    whole.insert(eip, r.clone());
                    fip_internal.insert(internal_ip, r.clone());
                    p.plan.nat.fip_dnat.insert(eip, internal_ip);
                    p.plan.nat.fip_snat.insert(internal_ip, eip);
                    p.plan.programmed.insert(r.clone());
                }
            }
            Claim::Dnat(d) => {
                let key = (eip, d.spec.protocol, d.spec.external_port);
                if let Some(other) = whole.get(&eip) {
                    p.conflict(r.clone(), "spec.eip", format!("Eip {eip_name:?} ({eip}) is taken whole by {other}"));
                } else if let Some(other) = port_owner.get(&key) {
                    let what = format!(
                        "{} port {} of Eip {eip_name:?} is already forwarded by {other}",
                        d.spec.protocol, d.spec.external_port
                    );
                    p.conflict(r.clone(), "spec.externalPort", what);
                } else if !in_vpc(d.spec.internal_ip) {
                    let what = format!("{} is outside every subnet of Vpc {:?}", d.spec.internal_ip, gw.spec.vpc);
                    p.conflict(r.clone(), "spec.internalIp", what);
                } else {
                    ports.entry(eip).or_insert_with(|| r.clone());
                    port_owner.insert(key, r.clone());
                    p.plan.nat.port_fwd.insert(key, (d.spec.internal_ip, d.spec.internal_port));
                    p.plan.programmed.insert(r.clone());
                }
            }
        }
    }

    // SnatRule: identical networks conflict, overlapping ones nest.
    let mut snat_rules: Vec<_> = set.snat_rules.values().collect();
    snat_rules.sort_by_key(|s| age_key(*s));
    let mut by_net: BTreeMap<Ipv4Net, (Ipv4Addr, ObjectRef)> = BTreeMap::new();
    for s in snat_rules {
        let r = ObjectRef::new(Kind::SnatRule, kube::ResourceExt::name_any(s));
        let Some(eip) = resolve(&mut p, &eips, &r, &s.spec.eip) else { continue };
        let net = s.spec.internal_cidr;
        if let Some((_, other)) = by_net.get(&net) {
            p.conflict(r, "spec.internalCidr", format!("{net} is already translated by {other}"));
        } else if !internal.iter().any(|n| n.contains(&net)) {
            // Inside one subnet: a rule must never translate addresses
            // outside the VPC (0.0.0.0/0 would take other tenants' traffic).
            p.conflict(r, "spec.internalCidr", format!("{net} is not inside a subnet of Vpc {:?}", gw.spec.vpc));
        } else {
            p.plan.programmed.insert(r.clone());
            by_net.insert(net, (eip, r));
        }
    }
    let rules: Vec<(Ipv4Net, Ipv4Addr)> = by_net.iter().map(|(n, (e, _))| (*n, *e)).collect();
    p.plan.nat.snat = longest_prefix_ranges(&rules);
    p.plan.conflicts.sort();
    Ok(p.plan)
}

/// Eips of this gateway with a usable address, by name.
fn plan_eips(p: &mut Planner, gateway: &str, cidr: Ipv4Net, router: Ipv4Addr) -> BTreeMap<String, Ipv4Addr> {
    let mut mine: Vec<_> = p.set.eips.values().filter(|e| e.spec.gateway == gateway).collect();
    mine.sort_by_key(|e| age_key(*e));
    let mut by_ip: BTreeMap<Ipv4Addr, ObjectRef> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for e in mine {
        let name = kube::ResourceExt::name_any(e);
        let r = ObjectRef::new(Kind::Eip, name.clone());
        let Some(ip) = ObjectSet::eip_address(e) else {
            p.pending(r, "spec.ip", "no address allocated yet".into());
            continue;
        };
        let field = if e.spec.ip.is_some() { "spec.ip" } else { "status.ip" };
        if !cidr.contains(&ip) {
            p.conflict(r, field, format!("{ip} is outside the external subnet {cidr}"));
        } else if ip == router || (cidr.prefix_len() < 31 && (ip == cidr.network() || ip == cidr.broadcast())) {
            p.conflict(r, field, format!("{ip} is the external subnet's gateway, network or broadcast address"));
        } else if let Some(other) = by_ip.get(&ip) {
            p.conflict(r, field, format!("{ip} is already held by {other}"));
        } else {
            let addr = Ipv4Net::new(ip, cidr.prefix_len()).unwrap_or(Ipv4Net::from(ip));
            p.plan.addresses.insert(IfAddr { interface: p.plan.external_interface.clone(), addr });
            p.plan.programmed.insert(r.clone());
            by_ip.insert(ip, r);
            out.insert(name, ip);
        }
    }
    out
}

/// The address of the Eip a rule names, if the Eip is on this gateway and
/// usable. Rules of other gateways are skipped silently (not ours);
/// rules on a missing or unusable Eip are reported as pending.
fn resolve(p: &mut Planner, eips: &BTreeMap<String, Ipv4Addr>, r: &ObjectRef, eip_name: &str) -> Option<Ipv4Addr> {
    if let Some(ip) = eips.get(eip_name) {
        return Some(*ip);
    }
    match p.set.eips.get(eip_name) {
        Some(e) if e.spec.gateway != p.plan.gateway => None,
        Some(_) => {
            p.pending(r.clone(), "spec.eip", format!("Eip {eip_name:?} has no usable address"));
            None
        }
        None => {
            p.pending(r.clone(), "spec.eip", format!("Eip {eip_name:?} does not exist"));
            None
        }
    }
}

/// Sorts inclusive ranges and joins the ones that overlap or touch.
pub fn merge_ranges(ranges: impl IntoIterator<Item = (Ipv4Addr, Ipv4Addr)>) -> Vec<(Ipv4Addr, Ipv4Addr)> {
    let mut v: Vec<(u32, u32)> = ranges.into_iter().map(|(a, b)| (u32::from(a), u32::from(b))).collect();
    v.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if (last.1 as u64) + 1 >= a as u64 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out.into_iter().map(|(a, b)| (Ipv4Addr::from(a), Ipv4Addr::from(b))).collect()
}
