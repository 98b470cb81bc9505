//! `plan_gateway`: objects in, one gateway's desired state out.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use natgw_api::{AgeKey, DnatRuleSpec, FloatingIpSpec, Held, HeldEip, Kind, Name, ObjectRef, ObjectSet, SnatRuleSpec};

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

fn conflict(plan: &mut GatewayPlan, object: ObjectRef, field: &str, reason: String) {
    plan.conflicts.push(Conflict { object, field: field.into(), reason, pending: false });
}

/// What claims on EIPs are weighed against, fixed by the gateway, its
/// subnets and its Eips: a change of any of these plans the gateway anew.
#[derive(Clone, Debug)]
pub(crate) struct Scope {
    pub(crate) vpc: String,
    /// The VPC's subnets.
    pub(crate) internal: Vec<Ipv4Net>,
    /// The gateway's own LAN addresses (spec.lanIp, the VPC subnets'
    /// routers) and what each is: never a rule's target, which would open
    /// the gateway's own services (its metrics) to the outside.
    pub(crate) own: BTreeMap<Ipv4Addr, String>,
    /// Eips of this gateway with a usable address, by name.
    pub(crate) eips: BTreeMap<Name, Ipv4Addr>,
    /// The external subnet and its router.
    pub(crate) cidr: Ipv4Net,
    pub(crate) router: Ipv4Addr,
    /// The SnatRule that translates each network, and to which EIP.
    pub(crate) snat: BTreeMap<Ipv4Net, (Ipv4Addr, ObjectRef)>,
}

/// A claim on a whole EIP (FloatingIp) or on EIP ports (DnatRule).
pub(crate) enum Claim<'a> {
    Fip(&'a Held<FloatingIpSpec>),
    Dnat(&'a Held<DnatRuleSpec>),
}

impl Claim<'_> {
    fn eip_name(&self) -> &str {
        match self {
            Claim::Fip(f) => &f.spec.eip,
            Claim::Dnat(d) => &d.spec.eip,
        }
    }
}

/// A claim with what orders it: age, then kind and name.
pub(crate) type Weighed<'a> = (AgeKey<'a>, ObjectRef, Claim<'a>);

pub(crate) fn fip_claim(f: &Held<FloatingIpSpec>) -> Weighed<'_> {
    (f.age_key(), ObjectRef::new(Kind::FloatingIp, f.name()), Claim::Fip(f))
}

pub(crate) fn dnat_claim(d: &Held<DnatRuleSpec>) -> Weighed<'_> {
    (d.age_key(), ObjectRef::new(Kind::DnatRule, d.name()), Claim::Dnat(d))
}

/// Computes everything gateway `name` should hold. Deterministic: when two
/// objects claim the same thing, the older one wins (creation time, then
/// name) and the other is reported in `conflicts`.
pub fn plan_gateway(set: &ObjectSet, name: &str) -> Result<GatewayPlan, PlanError> {
    plan_with_scope(set, name).map(|(plan, _)| plan)
}

/// `plan_gateway`, and the scope its claims were weighed in.
pub(crate) fn plan_with_scope(set: &ObjectSet, name: &str) -> Result<(GatewayPlan, Scope), PlanError> {
    let gw = set.gateways.get(name).ok_or_else(|| PlanError::NoGateway(name.into()))?;
    let ext = set
        .subnets
        .get(gw.spec.external_subnet.as_str())
        .ok_or_else(|| PlanError::NoExternalSubnet { gateway: name.into(), subnet: gw.spec.external_subnet.clone() })?;
    let mut plan = GatewayPlan {
        gateway: name.into(),
        lan_interface: gw.spec.lan_interface.clone(),
        external_interface: gw.spec.external_interface.clone(),
        ..Default::default()
    };
    let internal: Vec<Ipv4Net> = set
        .subnets
        .values()
        .filter(|s| s.spec.vpc.as_deref() == Some(gw.spec.vpc.as_str()))
        .map(|s| s.spec.cidr)
        .collect();
    plan.nat.internal_nets = merge_ranges(internal.iter().map(|n| (n.network(), n.broadcast())));
    plan.routes.insert(Route {
        dst: Ipv4Net::default(),
        via: ext.spec.gateway,
        interface: gw.spec.external_interface.clone(),
    });
    for (i, r) in gw.spec.routes.iter().enumerate() {
        // A route the API server should have refused (an object from
        // before the CEL rule) is reported and skipped, never a failing sync.
        if let Some(e) = natgw_api::check_route(i, r).into_iter().next() {
            conflict(&mut plan, ObjectRef::new(Kind::NatGateway, name), &e.field, e.message);
            continue;
        }
        plan.routes.insert(Route { dst: r.cidr, via: r.next_hop, interface: gw.spec.lan_interface.clone() });
    }

    let mut own: BTreeMap<Ipv4Addr, String> = set
        .subnets
        .values()
        .filter(|s| s.spec.vpc.as_deref() == Some(gw.spec.vpc.as_str()))
        .map(|s| (s.spec.gateway, format!("the router address of Subnet {:?}", s.name())))
        .collect();
    if let Some(ip) = gw.spec.lan_ip {
        own.insert(ip, format!("NatGateway {name:?}'s own spec.lanIp"));
        // With replicas, the LAN address moves with the active: natgw holds
        // it (a /32 local route, as an EIP), each replica keeping its own
        // address for the heartbeat. With one, the LAN attachment sets it.
        if gw.spec.replica_count() > 1 {
            plan.addresses.insert(IfAddr { interface: gw.spec.lan_interface.as_str().into(), addr: ip.into() });
        }
    }
    let mut scope = Scope {
        vpc: gw.spec.vpc.clone(),
        internal,
        own,
        eips: BTreeMap::new(),
        cidr: ext.spec.cidr,
        router: ext.spec.gateway,
        snat: BTreeMap::new(),
    };
    let mine: Vec<&HeldEip> = set.eips.values().map(|e| &**e).filter(|e| e.spec.gateway == name).collect();
    weigh_eips(&mut plan, &mut scope, mine);
    let mut claims: Vec<Weighed> = set.floating_ips.values().map(|f| fip_claim(f)).collect();
    claims.extend(set.dnat_rules.values().map(|d| dnat_claim(d)));
    weigh(&mut plan, set, &scope, claims);

    weigh_snats(&mut plan, set, &mut scope, set.snat_rules.values().map(|s| &**s).collect());
    let rules: Vec<(Ipv4Net, Ipv4Addr)> = scope.snat.iter().map(|(n, (e, _))| (*n, *e)).collect();
    plan.nat.snat = longest_prefix_ranges(&rules);
    plan.conflicts.sort();
    Ok((plan, scope))
}

/// Weighs SnatRules, oldest first, into `plan` and `scope.snat`:
/// identical networks conflict, overlapping ones nest. `rules` must hold
/// every SnatRule on the networks of any of them; the ranges are left to
/// the caller.
pub(crate) fn weigh_snats(
    plan: &mut GatewayPlan,
    set: &ObjectSet,
    scope: &mut Scope,
    mut rules: Vec<&Held<SnatRuleSpec>>,
) {
    rules.sort_by_key(|s| s.age_key());
    for s in rules {
        let r = ObjectRef::new(Kind::SnatRule, s.name());
        let Some(eip) = resolve(plan, set, &scope.eips, &r, &s.spec.eip) else { continue };
        let net = s.spec.internal_cidr;
        if let Some(why) = beyond_eip(set, &s.spec.eip, net) {
            conflict(plan, r, "spec.internalCidr", why);
        } else if let Some((_, other)) = scope.snat.get(&net) {
            conflict(plan, r, "spec.internalCidr", format!("{net} is already translated by {other}"));
        } else if !scope.internal.iter().any(|n| n.contains(&net)) {
            // Inside one subnet: a rule must never translate addresses
            // outside the VPC (0.0.0.0/0 would take other tenants' traffic).
            conflict(plan, r, "spec.internalCidr", format!("{net} is not inside a subnet of Vpc {:?}", scope.vpc));
        } else {
            plan.programmed.insert(r.clone());
            scope.snat.insert(net, (eip, r));
        }
    }
}

/// Weighs claims on EIPs (FloatingIps take an EIP whole, DnatRules take
/// ports of one), oldest first, into `plan`. `claims` must hold every
/// claim that shares an EIP or an internal address with any of them: the
/// outcome of one depends only on the older ones it shares those with.
pub(crate) fn weigh(plan: &mut GatewayPlan, set: &ObjectSet, scope: &Scope, mut claims: Vec<Weighed>) {
    claims.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let in_vpc = |ip: Ipv4Addr| scope.internal.iter().any(|n| n.contains(&ip));
    let vpc = &scope.vpc;
    let mut whole: BTreeMap<Ipv4Addr, ObjectRef> = BTreeMap::new();
    let mut ports: BTreeMap<Ipv4Addr, ObjectRef> = BTreeMap::new();
    let mut fip_internal: BTreeMap<Ipv4Addr, ObjectRef> = BTreeMap::new();
    let mut port_owner: BTreeMap<crate::PortKey, ObjectRef> = BTreeMap::new();
    for (_, r, claim) in &claims {
        let eip_name = claim.eip_name();
        let Some(eip) = resolve(plan, set, &scope.eips, r, eip_name) else { continue };
        match claim {
            Claim::Fip(f) => {
                let internal_ip = f.spec.internal_ip;
                if let Some(why) = beyond_eip(set, eip_name, Ipv4Net::from(internal_ip)) {
                    conflict(plan, r.clone(), "spec.internalIp", why);
                } else if let Some(what) = scope.own.get(&internal_ip) {
                    conflict(plan, r.clone(), "spec.internalIp", format!("{internal_ip} is {what}"));
                } else if let Some(other) = whole.get(&eip).or_else(|| ports.get(&eip)) {
                    let what = format!("Eip {eip_name:?} ({eip}) is already used by {other}");
                    conflict(plan, r.clone(), "spec.eip", what);
                } else if !in_vpc(internal_ip) {
                    let what = format!("{internal_ip} is outside every subnet of Vpc {vpc:?}");
                    conflict(plan, r.clone(), "spec.internalIp", what);
                } else if let Some(other) = fip_internal.get(&internal_ip) {
                    let what = format!("{internal_ip} already has a floating IP through {other}");
                    conflict(plan, r.clone(), "spec.internalIp", what);
                } else {
                    whole.insert(eip, r.clone());
                    fip_internal.insert(internal_ip, r.clone());
                    plan.nat.fip_dnat.insert(eip, internal_ip);
                    plan.nat.fip_snat.insert(internal_ip, eip);
                    plan.programmed.insert(r.clone());
                }
            }
            Claim::Dnat(d) => {
                let key = (eip, d.spec.protocol, d.spec.external_port);
                if let Some(why) = beyond_eip(set, eip_name, Ipv4Net::from(d.spec.internal_ip)) {
                    conflict(plan, r.clone(), "spec.internalIp", why);
                } else if let Some(what) = scope.own.get(&d.spec.internal_ip) {
                    conflict(plan, r.clone(), "spec.internalIp", format!("{} is {what}", d.spec.internal_ip));
                } else if let Some(other) = whole.get(&eip) {
                    let what = format!("Eip {eip_name:?} ({eip}) is taken whole by {other}");
                    conflict(plan, r.clone(), "spec.eip", what);
                } else if let Some(other) = port_owner.get(&key) {
                    let what = format!(
                        "{} port {} of Eip {eip_name:?} is already forwarded by {other}",
                        d.spec.protocol, d.spec.external_port
                    );
                    conflict(plan, r.clone(), "spec.externalPort", what);
                } else if !in_vpc(d.spec.internal_ip) {
                    let what = format!("{} is outside every subnet of Vpc {vpc:?}", d.spec.internal_ip);
                    conflict(plan, r.clone(), "spec.internalIp", what);
                } else {
                    ports.entry(eip).or_insert_with(|| r.clone());
                    port_owner.insert(key, r.clone());
                    plan.nat.port_fwd.insert(key, (d.spec.internal_ip, d.spec.internal_port));
                    plan.programmed.insert(r.clone());
                }
            }
        }
    }
}

/// Weighs Eips of this gateway, oldest first, into `plan` and
/// `scope.eips`. `eips` must hold every Eip of the gateway that shares an
/// address with any of them.
pub(crate) fn weigh_eips(plan: &mut GatewayPlan, scope: &mut Scope, mut eips: Vec<&HeldEip>) {
    let (cidr, router) = (scope.cidr, scope.router);
    eips.sort_by_key(|e| e.age_key());
    let mut by_ip: BTreeMap<Ipv4Addr, ObjectRef> = BTreeMap::new();
    for e in eips {
        let r = ObjectRef::new(Kind::Eip, e.name());
        let Some(ip) = e.address() else {
            plan.conflicts.push(Conflict {
                object: r,
                field: "spec.ip".into(),
                reason: "no address allocated yet".into(),
                pending: true,
            });
            continue;
        };
        let field = if e.spec.ip.is_some() { "spec.ip" } else { "status.ip" };
        if !cidr.contains(&ip) {
            conflict(plan, r, field, format!("{ip} is outside the external subnet {cidr}"));
        } else if ip == router || (cidr.prefix_len() < 31 && (ip == cidr.network() || ip == cidr.broadcast())) {
            conflict(plan, r, field, format!("{ip} is the external subnet's gateway, network or broadcast address"));
        } else if let Some(other) = by_ip.get(&ip) {
            conflict(plan, r, field, format!("{ip} is already held by {other}"));
        } else {
            plan.addresses.insert(eip_addr(plan, scope, ip));
            plan.programmed.insert(r.clone());
            scope.eips.insert(r.name.clone(), ip);
            by_ip.insert(ip, r);
        }
    }
}

/// An EIP as the plan holds it: on the external interface, with the
/// external subnet's prefix.
pub(crate) fn eip_addr(plan: &GatewayPlan, scope: &Scope, ip: Ipv4Addr) -> IfAddr {
    let addr = Ipv4Net::new(ip, scope.cidr.prefix_len()).unwrap_or(Ipv4Net::from(ip));
    IfAddr { interface: plan.external_interface.as_str().into(), addr }
}

/// The address of the Eip a rule names, if the Eip is on this gateway and
/// usable. Rules of other gateways are skipped silently (not ours);
/// rules on a missing or unusable Eip are reported as pending.
/// Why `target` is not for rules on Eip `eip_name`: outside its
/// `internalCidrs`, when it lists any. Checked before anything else, so a
/// refused rule takes no EIP or port from a rule that may have it.
fn beyond_eip(set: &ObjectSet, eip_name: &str, target: Ipv4Net) -> Option<String> {
    let allowed = &set.eips.get(eip_name)?.spec.internal_cidrs;
    if allowed.is_empty() || allowed.iter().any(|n| n.contains(&target)) {
        return None;
    }
    let list = allowed.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ");
    let what = if target.prefix_len() == 32 { target.addr().to_string() } else { target.to_string() };
    Some(format!("{what} is outside the internalCidrs of Eip {eip_name:?} ({list})"))
}

pub(crate) fn resolve(
    plan: &mut GatewayPlan,
    set: &ObjectSet,
    eips: &BTreeMap<Name, Ipv4Addr>,
    r: &ObjectRef,
    eip_name: &str,
) -> Option<Ipv4Addr> {
    if let Some(ip) = eips.get(eip_name) {
        return Some(*ip);
    }
    let reason = match set.eips.get(eip_name) {
        Some(e) if e.spec.gateway != plan.gateway => return None,
        Some(_) => format!("Eip {eip_name:?} has no usable address"),
        None => format!("Eip {eip_name:?} does not exist"),
    };
    plan.conflicts.push(Conflict { object: r.clone(), field: "spec.eip".into(), reason, pending: true });
    None
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
