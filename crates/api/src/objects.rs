//! A typed bag of objects, the input of planning.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::held::{Held, HeldEip, HeldOf, Name, Project};
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

/// All objects as natgw holds them (`Held`), each kind keyed by name.
/// BTreeMaps keep every walk over the set deterministic, which planning
/// relies on. Objects are shared (`Arc`), so a set built from watch caches
/// holds no second copy of them.
#[derive(Clone, Debug, Default)]
pub struct ObjectSet {
    pub vpcs: BTreeMap<Name, Arc<Held<VpcSpec>>>,
    pub subnets: BTreeMap<Name, Arc<Held<SubnetSpec>>>,
    pub gateways: BTreeMap<Name, Arc<Held<NatGatewaySpec>>>,
    pub eips: BTreeMap<Name, Arc<HeldEip>>,
    pub floating_ips: BTreeMap<Name, Arc<Held<FloatingIpSpec>>>,
    pub snat_rules: BTreeMap<Name, Arc<Held<SnatRuleSpec>>>,
    pub dnat_rules: BTreeMap<Name, Arc<Held<DnatRuleSpec>>>,
}

impl ObjectSet {
    /// Adds an object; whether it replaced one (same kind and name).
    pub fn insert(&mut self, object: Object) -> bool {
        fn put<K: Project>(map: &mut BTreeMap<Name, Arc<HeldOf<K>>>, o: K) -> bool {
            let held = o.project();
            map.insert(held.meta.name.clone(), Arc::new(held)).is_some()
        }
        match object {
            Object::Vpc(o) => put(&mut self.vpcs, o),
            Object::Subnet(o) => put(&mut self.subnets, o),
            Object::NatGateway(o) => put(&mut self.gateways, o),
            Object::Eip(o) => put(&mut self.eips, o),
            Object::FloatingIp(o) => put(&mut self.floating_ips, o),
            Object::SnatRule(o) => put(&mut self.snat_rules, o),
            Object::DnatRule(o) => put(&mut self.dnat_rules, o),
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

    /// Every object with its name and spec, parents first: what a
    /// manifest creates.
    pub fn objects(&self) -> impl Iterator<Item = Object> + '_ {
        fn each<'a, K: Project + 'a, T>(
            map: &'a BTreeMap<Name, Arc<Held<K::Spec, T>>>,
            wrap: fn(K) -> Object,
        ) -> impl Iterator<Item = Object> + 'a {
            map.iter().map(move |(n, o)| wrap(K::named(n, o.spec.clone())))
        }
        each(&self.vpcs, Object::Vpc)
            .chain(each(&self.subnets, Object::Subnet))
            .chain(each(&self.gateways, Object::NatGateway))
            .chain(each(&self.eips, Object::Eip))
            .chain(each(&self.floating_ips, Object::FloatingIp))
            .chain(each(&self.snat_rules, Object::SnatRule))
            .chain(each(&self.dnat_rules, Object::DnatRule))
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
