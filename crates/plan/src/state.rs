//! The desired state of one gateway. The kernel side reads what the kernel
//! holds into the same shapes, so comparing the two is plain equality.

use std::collections::BTreeSet;

use imbl::{OrdMap, OrdSet};
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use natgw_api::{Name, ObjectRef, Protocol};
use serde::Serialize;

use crate::snat::SnatRange;

/// An address on an interface, with its prefix length.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct IfAddr {
    /// Inline (an interface name is at most 15 bytes): one per EIP.
    pub interface: Name,
    pub addr: Ipv4Net,
}

/// A route natgw installs in the main table.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Route {
    pub dst: Ipv4Net,
    pub via: Ipv4Addr,
    pub interface: String,
}

/// Key of a port forward: (EIP, protocol, external port).
pub type PortKey = (Ipv4Addr, Protocol, u16);
/// Target of a port forward: (internal IP, internal port).
pub type Target = (Ipv4Addr, u16);

/// The content of natgw's nftables table: maps and sets only. The rules that
/// use them are fixed per (LAN, external) interface pair. The maps are
/// persistent: a plan derived from another shares its structure, so
/// cloning is cheap and a diff visits only what changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NatTables {
    /// FloatingIp, inbound: EIP -> internal IP.
    pub fip_dnat: OrdMap<Ipv4Addr, Ipv4Addr>,
    /// FloatingIp, outbound: internal IP -> EIP.
    pub fip_snat: OrdMap<Ipv4Addr, Ipv4Addr>,
    /// DnatRule: (EIP, protocol, port) -> (internal IP, port).
    #[serde(serialize_with = "as_pairs")]
    pub port_fwd: OrdMap<PortKey, Target>,
    /// SnatRule, split into disjoint ranges where the longest prefix wins.
    pub snat: Vec<SnatRange>,
    /// VPC-side networks as merged inclusive ranges, for hairpin NAT.
    pub internal_nets: Vec<(Ipv4Addr, Ipv4Addr)>,
}

impl NatTables {
    pub fn element_count(&self) -> usize {
        self.fip_dnat.len() + self.fip_snat.len() + self.port_fwd.len() + self.snat.len() + self.internal_nets.len()
    }
}

/// Why an object is not (fully) in the plan.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Conflict {
    pub object: ObjectRef,
    /// The field at fault, as in validation errors.
    pub field: String,
    pub reason: String,
    /// True when the object waits for something that may still appear
    /// (an Eip without an address yet, a missing parent) rather than
    /// contradicting another object.
    pub pending: bool,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.pending { "pending" } else { "conflict" };
        write!(f, "{what}: {}: {}: {}", self.object, self.field, self.reason)
    }
}

/// Everything one gateway should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GatewayPlan {
    pub gateway: String,
    pub lan_interface: String,
    pub external_interface: String,
    pub addresses: OrdSet<IfAddr>,
    pub routes: BTreeSet<Route>,
    pub nat: NatTables,
    /// Objects whose state this plan carries.
    pub programmed: OrdSet<ObjectRef>,
    /// Sorted, so by object first: one object's are found by bisection.
    pub conflicts: Vec<Conflict>,
}

impl GatewayPlan {
    /// The plan a standby replica holds: every translation, so that a
    /// takeover is only addresses and state, and its sweeps judge the
    /// connections it was given by the same translations; no address, so
    /// that it answers ARP for none of them.
    pub fn standby(&self) -> GatewayPlan {
        GatewayPlan { addresses: OrdSet::new(), ..self.clone() }
    }

    /// The plan as one replica runs it: the LAN address (a gateway with
    /// replicas moves it) is left to the LAN attachment, which sets it.
    /// O(log n): the agent derives it in every round.
    pub fn single_replica(&self) -> GatewayPlan {
        let lan: Vec<IfAddr> = self.addresses_on(&self.lan_interface).cloned().collect();
        let mut plan = self.clone();
        for a in lan {
            plan.addresses.remove(&a);
        }
        plan
    }

    /// The addresses on `interface`: one range of the sorted set.
    pub fn addresses_on<'a>(&'a self, interface: &str) -> impl Iterator<Item = &'a IfAddr> + 'a {
        let at = |addr| IfAddr { interface: interface.into(), addr };
        let (first, last) = (at(Ipv4Net::default()), at(Ipv4Net::from(Ipv4Addr::BROADCAST)));
        self.addresses.range(first..=last)
    }

    /// Whether `ip` is one of this plan's EIPs (they are all on the
    /// external interface): one lookup.
    pub fn holds_eip(&self, ip: Ipv4Addr) -> bool {
        holds_address(&self.addresses, &self.external_interface, ip)
    }
}

/// Whether `set` has `ip` on `interface`, with any prefix: one range
/// lookup (addresses sort by interface, then address, then prefix).
pub fn holds_address(set: &OrdSet<IfAddr>, interface: &str, ip: Ipv4Addr) -> bool {
    let at =
        |prefix| IfAddr { interface: interface.into(), addr: Ipv4Net::new(ip, prefix).unwrap_or(Ipv4Net::from(ip)) };
    set.range(at(0)..=at(32)).next().is_some()
}

impl fmt::Display for GatewayPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "gateway {} (lan {}, external {})", self.gateway, self.lan_interface, self.external_interface)?;
        for a in &self.addresses {
            writeln!(f, "  address {} dev {}", a.addr, a.interface)?;
        }
        for r in &self.routes {
            writeln!(f, "  route {} via {} dev {}", r.dst, r.via, r.interface)?;
        }
        for (eip, ip) in &self.nat.fip_dnat {
            writeln!(f, "  floating-ip {eip} <-> {ip}")?;
        }
        for ((eip, proto, port), (ip, to)) in &self.nat.port_fwd {
            writeln!(f, "  dnat {proto} {eip}:{port} -> {ip}:{to}")?;
        }
        for r in &self.nat.snat {
            writeln!(f, "  snat {}-{} -> {}", r.first, r.last, r.eip)?;
        }
        for (a, b) in &self.nat.internal_nets {
            writeln!(f, "  internal {a}-{b}")?;
        }
        for c in &self.conflicts {
            writeln!(f, "  {c}")?;
        }
        Ok(())
    }
}

/// JSON object keys must be strings; tuple-keyed maps become pair lists.
fn as_pairs<S: serde::Serializer, K: Serialize + Ord, V: Serialize>(m: &OrdMap<K, V>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(m.iter())
}
