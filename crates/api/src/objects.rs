//! A typed bag of objects, the input of planning.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use crate::types::*;

/// Any natgw object.
#[derive(Clone, Debug)]
pub enum Object {
    Vpc(Vpc),
    Subnet(Subnet),
    NatGateway(NatGateway),
    Eip(Eip),
    FloatingIp(FloatingIp),
    SnatRule(SnatRule),
    DnatRule(DnatRule),
}

/// Every kind natgw serves. Matches on it list every kind: a new kind
/// does not compile until each place says what it does with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Kind {
    Vpc,
    Subnet,
    NatGateway,
    Eip,
    FloatingIp,
    SnatRule,
    DnatRule,
}

impl Kind {
    /// In dependency order (parents first).
    pub const ALL: [Kind; 7] =
        [Kind::Vpc, Kind::Subnet, Kind::NatGateway, Kind::Eip, Kind::FloatingIp, Kind::SnatRule, Kind::DnatRule];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Vpc => "Vpc",
            Kind::Subnet => "Subnet",
            Kind::NatGateway => "NatGateway",
            Kind::Eip => "Eip",
            Kind::FloatingIp => "FloatingIp",
            Kind::SnatRule => "SnatRule",
            Kind::DnatRule => "DnatRule",
        }
    }

    /// The kind named `name` (a manifest's `kind`).
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// By name, as kinds sorted when they were strings: reports keep their order.
impl Ord for Kind {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for Kind {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Kind and name: the identity of a cluster-scoped object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ObjectRef {
    pub kind: Kind,
    /// Inline up to 24 bytes: refs are kept in many indexes and sets, and
    /// a heap copy of the name per ref was a fifth of the planner at 100k.
    pub name: Name,
}

/// An object's name as natgw keeps it in its own structures.
pub type Name = compact_str::CompactString;

impl ObjectRef {
    pub fn new(kind: Kind, name: impl Into<Name>) -> Self {
        ObjectRef { kind, name: name.into() }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Vpc(_) => Kind::Vpc,
            Object::Subnet(_) => Kind::Subnet,
            Object::NatGateway(_) => Kind::NatGateway,
            Object::Eip(_) => Kind::Eip,
            Object::FloatingIp(_) => Kind::FloatingIp,
            Object::SnatRule(_) => Kind::SnatRule,
            Object::DnatRule(_) => Kind::DnatRule,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Vpc(o) => &o.metadata,
            Object::Subnet(o) => &o.metadata,
            Object::NatGateway(o) => &o.metadata,
            Object::Eip(o) => &o.metadata,
            Object::FloatingIp(o) => &o.metadata,
            Object::SnatRule(o) => &o.metadata,
            Object::DnatRule(o) => &o.metadata,
        }
    }

    pub fn name(&self) -> String {
        self.meta().name.clone().unwrap_or_default()
    }

    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(self.kind(), self.name())
    }
}

/// All objects, each kind keyed by name. BTreeMaps keep every walk over the
/// set deterministic, which planning relies on. Objects are shared (`Arc`),
/// so a set built from watch caches holds no second copy of them.
#[derive(Clone, Debug, Default)]
pub struct ObjectSet {
    pub vpcs: BTreeMap<Name, Arc<Vpc>>,
    pub subnets: BTreeMap<Name, Arc<Subnet>>,
    pub gateways: BTreeMap<Name, Arc<NatGateway>>,
    pub eips: BTreeMap<Name, Arc<Eip>>,
    pub floating_ips: BTreeMap<Name, Arc<FloatingIp>>,
    pub snat_rules: BTreeMap<Name, Arc<SnatRule>>,
    pub dnat_rules: BTreeMap<Name, Arc<DnatRule>>,
}

impl ObjectSet {
    /// Adds an object, returning the one it replaced (same kind and name).
    pub fn insert(&mut self, object: Object) -> Option<Object> {
        let name: Name = object.name().into();
        match object {
            Object::Vpc(o) => self.vpcs.insert(name, Arc::new(o)).map(|o| Object::Vpc(Arc::unwrap_or_clone(o))),
            Object::Subnet(o) => {
                self.subnets.insert(name, Arc::new(o)).map(|o| Object::Subnet(Arc::unwrap_or_clone(o)))
            }
            Object::NatGateway(o) => {
                self.gateways.insert(name, Arc::new(o)).map(|o| Object::NatGateway(Arc::unwrap_or_clone(o)))
            }
            Object::Eip(o) => self.eips.insert(name, Arc::new(o)).map(|o| Object::Eip(Arc::unwrap_or_clone(o))),
            Object::FloatingIp(o) => {
                self.floating_ips.insert(name, Arc::new(o)).map(|o| Object::FloatingIp(Arc::unwrap_or_clone(o)))
            }
            Object::SnatRule(o) => {
                self.snat_rules.insert(name, Arc::new(o)).map(|o| Object::SnatRule(Arc::unwrap_or_clone(o)))
            }
            Object::DnatRule(o) => {
                self.dnat_rules.insert(name, Arc::new(o)).map(|o| Object::DnatRule(Arc::unwrap_or_clone(o)))
            }
        }
    }

    /// Removes the object `r` names; whether it was there.
    pub fn remove(&mut self, r: &ObjectRef) -> bool {
        let n = r.name.as_str();
        match r.kind {
            Kind::Vpc => self.vpcs.remove(n).is_some(),
            Kind::Subnet => self.subnets.remove(n).is_some(),
            Kind::NatGateway => self.gateways.remove(n).is_some(),
            Kind::Eip => self.eips.remove(n).is_some(),
            Kind::FloatingIp => self.floating_ips.remove(n).is_some(),
            Kind::SnatRule => self.snat_rules.remove(n).is_some(),
            Kind::DnatRule => self.dnat_rules.remove(n).is_some(),
        }
    }

    /// Whether the object `r` names is in the set.
    pub fn contains(&self, r: &ObjectRef) -> bool {
        let n = r.name.as_str();
        match r.kind {
            Kind::Vpc => self.vpcs.contains_key(n),
            Kind::Subnet => self.subnets.contains_key(n),
            Kind::NatGateway => self.gateways.contains_key(n),
            Kind::Eip => self.eips.contains_key(n),
            Kind::FloatingIp => self.floating_ips.contains_key(n),
            Kind::SnatRule => self.snat_rules.contains_key(n),
            Kind::DnatRule => self.dnat_rules.contains_key(n),
        }
    }

    pub fn len(&self) -> usize {
        self.vpcs.len()
            + self.subnets.len()
            + self.gateways.len()
            + self.eips.len()
            + self.floating_ips.len()
            + self.snat_rules.len()
            + self.dnat_rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every object, parents first.
    pub fn iter(&self) -> impl Iterator<Item = Object> + '_ {
        let v = self.vpcs.values().map(|o| Object::Vpc((**o).clone()));
        let s = self.subnets.values().map(|o| Object::Subnet((**o).clone()));
        let g = self.gateways.values().map(|o| Object::NatGateway((**o).clone()));
        let e = self.eips.values().map(|o| Object::Eip((**o).clone()));
        let f = self.floating_ips.values().map(|o| Object::FloatingIp((**o).clone()));
        let sn = self.snat_rules.values().map(|o| Object::SnatRule((**o).clone()));
        let d = self.dnat_rules.values().map(|o| Object::DnatRule((**o).clone()));
        v.chain(s).chain(g).chain(e).chain(f).chain(sn).chain(d)
    }

    /// The address an Eip holds (`Eip::address`).
    pub fn eip_address(eip: &Eip) -> Option<std::net::Ipv4Addr> {
        eip.address()
    }
}

impl FromIterator<Object> for ObjectSet {
    fn from_iter<I: IntoIterator<Item = Object>>(iter: I) -> Self {
        let mut set = ObjectSet::default();
        for o in iter {
            set.insert(o);
        }
        set
    }
}

/// Sort key giving older objects precedence in conflicts; objects without a
/// creation time (manifests) fall back to name order.
pub fn age_key<K: ResourceExt>(o: &K) -> (Option<String>, String) {
    let ts = o.meta().creation_timestamp.as_ref().map(|t| t.0.to_string());
    (ts, o.name_any())
}
