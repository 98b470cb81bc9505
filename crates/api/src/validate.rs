//! Checks on one object (`validate_object`) and between objects
//! (`validate_set`). Each error names the field, so an operator can find it.
//! The CRDs carry the single-object rules as CEL as well.

use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::objects::{Kind, Object, ObjectRef, ObjectSet};
use crate::types::*;

/// A problem with one field of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path such as `spec.internalIp` or `spec.routes[1].nextHop`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError { field: field.into(), message: message.into() }
}

/// A field problem located in a particular object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetError {
    pub object: ObjectRef,
    pub error: FieldError,
}

impl fmt::Display for SetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.error)
    }
}

/// Rules that need nothing but the object itself.
pub fn validate_object(object: &Object) -> Vec<FieldError> {
    let mut errors = Vec::new();
    check_name(object.meta().name.as_deref(), &mut errors);
    match object {
        Object::Vpc(_) => {}
        Object::Subnet(s) => check_subnet(&s.spec, &mut errors),
        Object::NatGateway(g) => {
            if g.metadata.name.as_ref().is_some_and(|n| n.len() > 63) {
                errors.push(err("metadata.name", "a NatGateway name has at most 63 characters (it is a label value)"));
            }
            check_gateway(&g.spec, &mut errors)
        }
        Object::Eip(e) => {
            if let Some(ip) = e.spec.ip {
                check_unicast("spec.ip", ip, &mut errors);
            }
            check_ref("spec.gateway", &e.spec.gateway, &mut errors);
            for (i, net) in e.spec.internal_cidrs.iter().enumerate() {
                check_canonical(&format!("spec.internalCidrs[{i}]"), *net, &mut errors);
            }
        }
        Object::FloatingIp(f) => {
            check_ref("spec.eip", &f.spec.eip, &mut errors);
            check_unicast("spec.internalIp", f.spec.internal_ip, &mut errors);
        }
        Object::SnatRule(s) => {
            check_ref("spec.eip", &s.spec.eip, &mut errors);
            check_canonical("spec.internalCidr", s.spec.internal_cidr, &mut errors);
        }
        Object::DnatRule(d) => {
            check_ref("spec.eip", &d.spec.eip, &mut errors);
            check_unicast("spec.internalIp", d.spec.internal_ip, &mut errors);
            check_port("spec.externalPort", d.spec.external_port, &mut errors);
            check_port("spec.internalPort", d.spec.internal_port, &mut errors);
        }
    }
    errors
}

fn check_name(name: Option<&str>, errors: &mut Vec<FieldError>) {
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        errors.push(err("metadata.name", "is required"));
        return;
    };
    let ok_chars = name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    let ok_ends =
        name.starts_with(|c: char| c.is_ascii_alphanumeric()) && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if name.len() > 253 || !ok_chars || !ok_ends {
        errors.push(err(
            "metadata.name",
            format!("{name:?} is not a DNS subdomain name (lower-case letters, digits, '-' and '.', at most 253)"),
        ));
    }
}

fn check_ref(field: &str, value: &str, errors: &mut Vec<FieldError>) {
    if value.is_empty() {
        errors.push(err(field, "is required"));
    }
}

fn check_port(field: &str, port: u16, errors: &mut Vec<FieldError>) {
    if port == 0 {
        errors.push(err(field, "must be between 1 and 65535"));
    }
}

/// Loopback, link-local (169.254.169.254 is a metadata service),
/// multicast, broadcast and unspecified addresses are never a NAT target
/// or next hop; the CRDs say the same with CEL's `isGlobalUnicast`.
fn check_unicast(field: &str, ip: Ipv4Addr, errors: &mut Vec<FieldError>) {
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() || ip.is_link_local() {
        errors.push(err(
            field,
            format!("{ip} is not a unicast address (not loopback, link-local, multicast, broadcast or unspecified)"),
        ));
    }
}

fn check_canonical(field: &str, net: Ipv4Net, errors: &mut Vec<FieldError>) {
    if net.addr() != net.network() {
        errors.push(err(field, format!("{net} has host bits set; did you mean {}?", net.trunc())));
    }
}

/// Interface names natgw accepts: 1 to 15 letters, digits, `_`, `.` and
/// `-`, starting with a letter or digit. Stricter than Linux on purpose:
/// nft reads `*` and `\` in an interface name as wildcards. The CRDs use
/// the same pattern.
pub fn valid_interface_name(name: &str) -> bool {
    name.len() <= 15
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn check_subnet(spec: &SubnetSpec, errors: &mut Vec<FieldError>) {
    check_canonical("spec.cidr", spec.cidr, errors);
    if !spec.cidr.contains(&spec.gateway) {
        errors.push(err("spec.gateway", format!("{} is outside spec.cidr {}", spec.gateway, spec.cidr)));
    }
    if let Some(vpc) = &spec.vpc {
        check_ref("spec.vpc", vpc, errors);
    }
    for (i, entry) in spec.exclude_ips.iter().enumerate() {
        let field = format!("spec.excludeIps[{i}]");
        match parse_ip_range(entry) {
            Ok((first, last)) => {
                if !spec.cidr.contains(&first) || !spec.cidr.contains(&last) {
                    errors.push(err(field, format!("{entry} is outside spec.cidr {}", spec.cidr)));
                }
            }
            Err(message) => errors.push(err(field, message)),
        }
    }
}

/// Parses `A` or `A..B` (inclusive) into (first, last): the one grammar
/// of `excludeIps`, in the CRD's CEL as here. CIDRs are refused, so that
/// an entry reads the same to everyone.
pub fn parse_ip_range(entry: &str) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let parse = |s: &str| {
        s.parse::<Ipv4Addr>().map_err(|_| {
            if s.contains('/') {
                format!("{s:?} is a CIDR; write the addresses as a range A..B")
            } else if s.contains('-') {
                format!("{s:?} is not an IPv4 address; a range is written A..B")
            } else {
                format!("{s:?} is not an IPv4 address")
            }
        })
    };
    if entry.matches("..").count() > 1 {
        return Err(format!("{entry:?} is not an IPv4 address or a range A..B"));
    }
    match entry.split_once("..") {
        None => parse(entry).map(|ip| (ip, ip)),
        Some((a, b)) => {
            let (first, last) = (parse(a)?, parse(b)?);
            if first > last {
                return Err(format!("range {entry} ends before it starts"));
            }
            Ok((first, last))
        }
    }
}

fn check_gateway(spec: &NatGatewaySpec, errors: &mut Vec<FieldError>) {
    check_ref("spec.vpc", &spec.vpc, errors);
    check_ref("spec.externalSubnet", &spec.external_subnet, errors);
    for (field, name) in
        [("spec.lanInterface", &spec.lan_interface), ("spec.externalInterface", &spec.external_interface)]
    {
        if !valid_interface_name(name) {
            errors.push(err(
                field,
                format!(
                    "{name:?} is not a valid interface name (1 to 15 letters, digits, '_', '.' or '-', starting with a letter or digit)"
                ),
            ));
        }
    }
    if spec.lan_interface == spec.external_interface {
        errors.push(err("spec.externalInterface", "must differ from spec.lanInterface"));
    }
    for (i, route) in spec.routes.iter().enumerate() {
        errors.extend(check_route(i, route));
    }
    match spec.replica_count() {
        1 => {}
        2 if spec.lan_ip.is_none() => errors.push(err(
            "spec.lanIp",
            "required with spec.replicas 2: it is the address the active replica holds and a takeover moves",
        )),
        2 => {}
        n => errors.push(err("spec.replicas", format!("{n} is not supported: 1, or 2 (an active and a standby)"))),
    }
}

/// The problems of route `i`: host bits in the CIDR, a next hop that is
/// not unicast. The planner skips such a route instead of failing.
pub fn check_route(i: usize, route: &GatewayRoute) -> Vec<FieldError> {
    let mut errors = Vec::new();
    check_canonical(&format!("spec.routes[{i}].cidr"), route.cidr, &mut errors);
    check_unicast(&format!("spec.routes[{i}].nextHop"), route.next_hop, &mut errors);
    errors
}

/// References between objects: every name an object points to must exist
/// and be of the right sort. The standalone mode refuses a set that fails
/// here; the controller instead waits (the reference may appear later).
pub fn validate_set(set: &ObjectSet) -> Vec<SetError> {
    let mut errors = Vec::new();
    let mut push = |kind: Kind, name: &str, field: &str, message: String| {
        errors.push(SetError { object: ObjectRef::new(kind, name), error: err(field, message) });
    };
    for (name, s) in &set.subnets {
        if let Some(vpc) = &s.spec.vpc
            && !set.vpcs.contains_key(vpc.as_str())
        {
            push(Kind::Subnet, name, "spec.vpc", format!("Vpc {vpc:?} does not exist"));
        }
    }
    for (name, g) in &set.gateways {
        if !set.vpcs.contains_key(g.spec.vpc.as_str()) {
            push(Kind::NatGateway, name, "spec.vpc", format!("Vpc {:?} does not exist", g.spec.vpc));
        }
        match set.subnets.get(g.spec.external_subnet.as_str()) {
            None => push(
                Kind::NatGateway,
                name,
                "spec.externalSubnet",
                format!("Subnet {:?} does not exist", g.spec.external_subnet),
            ),
            Some(s) if s.spec.vpc.is_some() => push(
                Kind::NatGateway,
                name,
                "spec.externalSubnet",
                format!("Subnet {:?} belongs to a VPC and cannot be an external subnet", g.spec.external_subnet),
            ),
            Some(_) => {}
        }
    }
    for (name, e) in &set.eips {
        if !set.gateways.contains_key(e.spec.gateway.as_str()) {
            push(Kind::Eip, name, "spec.gateway", format!("NatGateway {:?} does not exist", e.spec.gateway));
        }
    }
    let rules = set
        .floating_ips
        .iter()
        .map(|(n, f)| (Kind::FloatingIp, n, &f.spec.eip))
        .chain(set.snat_rules.iter().map(|(n, s)| (Kind::SnatRule, n, &s.spec.eip)))
        .chain(set.dnat_rules.iter().map(|(n, d)| (Kind::DnatRule, n, &d.spec.eip)));
    for (kind, name, eip) in rules {
        if !set.eips.contains_key(eip.as_str()) {
            push(kind, name, "spec.eip", format!("Eip {eip:?} does not exist"));
        }
    }
    errors
}
