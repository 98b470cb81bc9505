//! Each map and set of natgw's tables described once: its name, its key
//! and value types, and where the plan keeps it. One typed diff per map,
//! and every form of an element from the same description: the nft text
//! a script writes, the netlink batch's bytes, what a dump or `nft -j`
//! reads back, the lines `audit` reports. The gateway's table (`GATEWAY`,
//! over `NatTables`) and a node's egress table (`EGRESS`, over
//! `EgressTables`) both go through here; no other code names a map.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use imbl::OrdMap;
use imbl::ordmap::DiffItem;
use natgw_plan::egress::Range;
use natgw_plan::{EgressTables, NatTables, PortKey, SnatRange, Target};

use crate::gateway::state::Drift;
use crate::nft::fields::{Bytes, Field, atom_addr, interval, pair};
use crate::nft::listing::Atom;
use crate::nft::model::{Change, Set, whole_change};
use crate::nft::netlink::MapChange;
use crate::nft::range;

/// Where a plan keeps one map's or set's elements (a set's value is `()`).
pub trait Elements<K, V> {
    /// What goes from `self` to `want`.
    fn diff<'a>(&'a self, want: &'a Self) -> Diff<'a, K, V>;
    fn put(&mut self, k: K, v: V);
    fn pairs(&self) -> Box<dyn Iterator<Item = (&K, &V)> + '_>;
}

/// A typed element change: deletions (a changed value is deleted, then
/// added) and additions, each in key order.
pub struct Diff<'a, K, V> {
    pub delete: Vec<(&'a K, &'a V)>,
    pub add: Vec<(&'a K, &'a V)>,
}

/// A persistent map: the diff skips the subtrees two plans share, so a
/// plan derived from the last one costs O(change).
impl<K: Ord + Clone, V: Clone + PartialEq> Elements<K, V> for OrdMap<K, V> {
    fn diff<'a>(&'a self, want: &'a Self) -> Diff<'a, K, V> {
        let mut d = Diff { delete: Vec::new(), add: Vec::new() };
        for item in OrdMap::diff(self, want) {
            match item {
                DiffItem::Add(k, v) => d.add.push((k, v)),
                DiffItem::Update { old, new } => {
                    d.delete.push(old);
                    d.add.push(new);
                }
                DiffItem::Remove(k, v) => d.delete.push((k, v)),
            }
        }
        d
    }
    fn put(&mut self, k: K, v: V) {
        self.insert(k, v);
    }
    fn pairs(&self) -> Box<dyn Iterator<Item = (&K, &V)> + '_> {
        Box::new(self.iter())
    }
}

/// Two sorted walks side by side.
fn merged<'a, K: Ord, V: PartialEq>(
    have: impl Iterator<Item = (&'a K, &'a V)>,
    want: impl Iterator<Item = (&'a K, &'a V)>,
) -> Diff<'a, K, V> {
    let mut d = Diff { delete: Vec::new(), add: Vec::new() };
    let (mut have, mut want) = (have.peekable(), want.peekable());
    loop {
        match (have.peek().copied(), want.peek().copied()) {
            (Some(h), Some(w)) if h.0 == w.0 => {
                if h.1 != w.1 {
                    d.delete.push(h);
                    d.add.push(w);
                }
                have.next();
                want.next();
            }
            (Some(h), Some(w)) if h.0 > w.0 => {
                d.add.push(w);
                want.next();
            }
            (Some(h), _) => {
                d.delete.push(h);
                have.next();
            }
            (None, Some(w)) => {
                d.add.push(w);
                want.next();
            }
            (None, None) => return d,
        }
    }
}

impl<K: Ord, V: PartialEq> Elements<K, V> for BTreeMap<K, V> {
    fn diff<'a>(&'a self, want: &'a Self) -> Diff<'a, K, V> {
        merged(self.iter(), want.iter())
    }
    fn put(&mut self, k: K, v: V) {
        self.insert(k, v);
    }
    fn pairs(&self) -> Box<dyn Iterator<Item = (&K, &V)> + '_> {
        Box::new(self.iter())
    }
}

impl<K: Ord> Elements<K, ()> for BTreeSet<K> {
    fn diff<'a>(&'a self, want: &'a Self) -> Diff<'a, K, ()> {
        merged(self.iter().map(|k| (k, &())), want.iter().map(|k| (k, &())))
    }
    fn put(&mut self, k: K, _: ()) {
        self.insert(k);
    }
    fn pairs(&self) -> Box<dyn Iterator<Item = (&K, &())> + '_> {
        Box::new(self.iter().map(|k| (k, &())))
    }
}

/// A hash map or set of a table over `T`, kept in a `C`: written element
/// by element, over netlink or as nft text.
pub struct Map<T: 'static, K: 'static, V: 'static, C: 'static> {
    pub name: &'static str,
    of: fn(&T) -> &C,
    of_mut: fn(&mut T) -> &mut C,
    /// The public address (EIP, VIP) an element translates to or from.
    public: fn(&K, &V) -> Option<Ipv4Addr>,
}

/// An interval set whose elements never overlap, changed element by
/// element, always through nft (it splits and merges intervals).
pub struct Spans<T: 'static, K: 'static> {
    pub name: &'static str,
    of: fn(&T) -> &BTreeSet<K>,
    of_mut: fn(&mut T) -> &mut BTreeSet<K>,
}

/// An interval set or map whose elements must never overlap, even inside
/// one transaction: replaced whole when it changes, written only through
/// nft.
pub struct Intervals<T: 'static, I: 'static> {
    pub name: &'static str,
    key: &'static str,
    value: Option<&'static str>,
    of: fn(&T) -> &Vec<I>,
    of_mut: fn(&mut T) -> &mut Vec<I>,
    text: fn(&I) -> String,
    /// As `audit` reports it.
    line: fn(&I) -> String,
    atom: fn(&Atom) -> Result<I, String>,
    public: fn(&I) -> Option<Ipv4Addr>,
}

/// One map or set of a table over `T`, whatever its types.
pub trait TableSet<T>: Sync {
    fn name(&self) -> &'static str;
    /// Its declaration.
    fn set(&self) -> Set;
    fn interval(&self) -> bool;
    fn differs(&self, have: &T, want: &T) -> bool;
    /// The change as nft text.
    fn text_change(&self, have: &T, want: &T) -> Change;
    /// The change as netlink elements: hash maps and sets only.
    fn netlink_change(&self, have: &T, want: &T) -> Option<MapChange>;
    /// One element as a dump returns it (hash maps and sets only).
    fn read_bytes(&self, into: &mut T, key: &[u8], value: &[u8]) -> Result<(), String>;
    /// One element as `nft -j` lists it.
    fn read_atom(&self, into: &mut T, element: &Atom) -> Result<(), String>;
    /// The differences `audit` reports.
    fn drift(&self, have: &T, want: &T, out: &mut Vec<Drift>);
    /// The public addresses whose translation the change touches.
    fn touched(&self, have: &T, want: &T, out: &mut BTreeSet<Ipv4Addr>);
    /// Every public address the set translates to or from.
    fn public(&self, of: &T, out: &mut BTreeSet<Ipv4Addr>);
}

/// An element as nft writes it: `key` or `key : value`.
fn element<K: Field, V: Field>(k: &K, v: &V) -> String {
    if V::TYPE.is_empty() { k.text() } else { format!("{} : {}", k.text(), v.text()) }
}

impl<T, K: Field, V: Field, C: Elements<K, V>> Map<T, K, V, C> {
    pub fn diff<'a>(&self, have: &'a T, want: &'a T) -> Diff<'a, K, V> {
        (self.of)(have).diff((self.of)(want))
    }

    fn line(&self, k: &K, v: &V) -> String {
        format!("nft {} element {}", self.name, element(k, v))
    }
}

impl<T, K, V, C> TableSet<T> for Map<T, K, V, C>
where
    K: Bytes + Send + Sync,
    V: Bytes + Send + Sync,
    C: Elements<K, V> + PartialEq,
{
    fn name(&self) -> &'static str {
        self.name
    }
    fn set(&self) -> Set {
        Set { name: self.name, key: K::TYPE, value: (!V::TYPE.is_empty()).then_some(V::TYPE), interval: false }
    }
    fn interval(&self) -> bool {
        false
    }
    fn differs(&self, have: &T, want: &T) -> bool {
        (self.of)(have) != (self.of)(want)
    }
    fn text_change(&self, have: &T, want: &T) -> Change {
        let d = self.diff(have, want);
        Change {
            set: self.name,
            flush: false,
            delete: d.delete.iter().map(|(k, _)| k.text()).collect(),
            add: d.add.iter().map(|(k, v)| element(*k, *v)).collect(),
        }
    }
    fn netlink_change(&self, have: &T, want: &T) -> Option<MapChange> {
        let d = self.diff(have, want);
        Some(MapChange {
            set: self.name,
            delete: d.delete.iter().map(|(k, v)| (k.bytes(), v.bytes())).collect(),
            add: d.add.iter().map(|(k, v)| (k.bytes(), v.bytes())).collect(),
        })
    }
    fn read_bytes(&self, into: &mut T, key: &[u8], value: &[u8]) -> Result<(), String> {
        (self.of_mut)(into).put(K::from_bytes(key)?, V::from_bytes(value)?);
        Ok(())
    }
    fn read_atom(&self, into: &mut T, element: &Atom) -> Result<(), String> {
        let (k, v) = if V::TYPE.is_empty() { (element.clone(), Atom::Num(0)) } else { pair(element)? };
        (self.of_mut)(into).put(K::from_atom(&k)?, V::from_atom(&v)?);
        Ok(())
    }
    fn drift(&self, have: &T, want: &T, out: &mut Vec<Drift>) {
        let d = self.diff(have, want);
        out.extend(d.delete.iter().map(|(k, v)| Drift::Leaked(self.line(k, v))));
        out.extend(d.add.iter().map(|(k, v)| Drift::Missing(self.line(k, v))));
    }
    fn touched(&self, have: &T, want: &T, out: &mut BTreeSet<Ipv4Addr>) {
        let d = self.diff(have, want);
        out.extend(d.delete.iter().chain(&d.add).filter_map(|(k, v)| (self.public)(k, v)));
    }
    fn public(&self, of: &T, out: &mut BTreeSet<Ipv4Addr>) {
        out.extend((self.of)(of).pairs().filter_map(|(k, v)| (self.public)(k, v)));
    }
}

impl<T, K: Field + Send + Sync> TableSet<T> for Spans<T, K> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn set(&self) -> Set {
        Set { name: self.name, key: K::TYPE, value: None, interval: true }
    }
    fn interval(&self) -> bool {
        true
    }
    fn differs(&self, have: &T, want: &T) -> bool {
        (self.of)(have) != (self.of)(want)
    }
    fn text_change(&self, have: &T, want: &T) -> Change {
        let d = (self.of)(have).diff((self.of)(want));
        Change {
            set: self.name,
            flush: false,
            delete: d.delete.iter().map(|(k, _)| k.text()).collect(),
            add: d.add.iter().map(|(k, _)| k.text()).collect(),
        }
    }
    fn netlink_change(&self, _: &T, _: &T) -> Option<MapChange> {
        None
    }
    fn read_bytes(&self, _: &mut T, _: &[u8], _: &[u8]) -> Result<(), String> {
        Err(format!("{} is an interval set: nft lists it", self.name))
    }
    fn read_atom(&self, into: &mut T, element: &Atom) -> Result<(), String> {
        (self.of_mut)(into).insert(K::from_atom(element)?);
        Ok(())
    }
    fn drift(&self, have: &T, want: &T, out: &mut Vec<Drift>) {
        let d = (self.of)(have).diff((self.of)(want));
        let line = |k: &K| format!("nft {} element {}", self.name, k.text());
        out.extend(d.delete.iter().map(|(k, _)| Drift::Leaked(line(k))));
        out.extend(d.add.iter().map(|(k, _)| Drift::Missing(line(k))));
    }
    fn touched(&self, _: &T, _: &T, _: &mut BTreeSet<Ipv4Addr>) {}
    fn public(&self, _: &T, _: &mut BTreeSet<Ipv4Addr>) {}
}

impl<T, I: PartialEq + Send + Sync> TableSet<T> for Intervals<T, I> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn set(&self) -> Set {
        Set { name: self.name, key: self.key, value: self.value, interval: true }
    }
    fn interval(&self) -> bool {
        true
    }
    fn differs(&self, have: &T, want: &T) -> bool {
        (self.of)(have) != (self.of)(want)
    }
    fn text_change(&self, have: &T, want: &T) -> Change {
        whole_change(self.name, (self.of)(have), (self.of)(want), self.text)
    }
    fn netlink_change(&self, _: &T, _: &T) -> Option<MapChange> {
        None
    }
    fn read_bytes(&self, _: &mut T, _: &[u8], _: &[u8]) -> Result<(), String> {
        Err(format!("{} is an interval set: nft lists it", self.name))
    }
    fn read_atom(&self, into: &mut T, element: &Atom) -> Result<(), String> {
        let item = (self.atom)(element)?;
        (self.of_mut)(into).push(item);
        Ok(())
    }
    fn drift(&self, have: &T, want: &T, out: &mut Vec<Drift>) {
        let (have, want) = ((self.of)(have), (self.of)(want));
        let line = |x: &I| format!("nft {} element {}", self.name, (self.line)(x));
        out.extend(have.iter().filter(|x| !want.contains(x)).map(|x| Drift::Leaked(line(x))));
        out.extend(want.iter().filter(|x| !have.contains(x)).map(|x| Drift::Missing(line(x))));
    }
    fn touched(&self, have: &T, want: &T, out: &mut BTreeSet<Ipv4Addr>) {
        if self.differs(have, want) {
            out.extend((self.of)(have).iter().chain((self.of)(want)).filter_map(self.public));
        }
    }
    fn public(&self, of: &T, out: &mut BTreeSet<Ipv4Addr>) {
        out.extend((self.of)(of).iter().filter_map(self.public));
    }
}

/// A map of the gateway's table.
type GatewayMap<K, V> = Map<NatTables, K, V, OrdMap<K, V>>;

/// FloatingIp, inbound: EIP -> internal address.
pub static FIP_DNAT: GatewayMap<Ipv4Addr, Ipv4Addr> =
    Map { name: "fip_dnat", of: |t| &t.fip_dnat, of_mut: |t| &mut t.fip_dnat, public: |k, _| Some(*k) };
/// FloatingIp, outbound: internal address -> EIP.
pub static FIP_SNAT: GatewayMap<Ipv4Addr, Ipv4Addr> =
    Map { name: "fip_snat", of: |t| &t.fip_snat, of_mut: |t| &mut t.fip_snat, public: |_, v| Some(*v) };
/// DnatRule: EIP . protocol . port -> internal address . port.
pub static PORT_FWD: GatewayMap<PortKey, Target> =
    Map { name: "port_fwd", of: |t| &t.port_fwd, of_mut: |t| &mut t.port_fwd, public: |k, _| Some(k.0) };
/// SnatRule: source ranges -> EIP, longest prefix already resolved.
pub static SNAT_NETS: Intervals<NatTables, SnatRange> = Intervals {
    name: "snat_nets",
    key: "ipv4_addr",
    value: Some("ipv4_addr"),
    of: |t| &t.snat,
    of_mut: |t| &mut t.snat,
    text: |r| format!("{} : {}", range(r.first, r.last), r.eip),
    line: |r| format!("{}-{} : {}", r.first, r.last, r.eip),
    atom: |e| {
        let (k, v) = pair(e)?;
        let (first, last) = interval(&k)?;
        Ok(SnatRange { first, last, eip: atom_addr(&v)? })
    },
    public: |r| Some(r.eip),
};
/// The VPC's networks, for hairpin NAT.
pub static INTERNAL_NETS: Intervals<NatTables, Range> = Intervals {
    name: "internal_nets",
    key: "ipv4_addr",
    value: None,
    of: |t| &t.internal_nets,
    of_mut: |t| &mut t.internal_nets,
    text: |(a, b)| range(*a, *b),
    line: |(a, b)| format!("{a}-{b}"),
    atom: interval,
    public: |_| None,
};

/// Every map and set of the gateway's table, in declaration order.
pub static GATEWAY: [&dyn TableSet<NatTables>; 5] = [&FIP_DNAT, &FIP_SNAT, &PORT_FWD, &SNAT_NETS, &INTERNAL_NETS];

/// The gateway's map or set called `name`.
pub fn named(name: &str) -> Option<&'static dyn TableSet<NatTables>> {
    GATEWAY.iter().copied().find(|s| s.name() == name)
}

/// A map or set of a node's egress table.
type EgressMap<K, V> = Map<EgressTables, K, V, BTreeMap<K, V>>;
type EgressSet<K> = Map<EgressTables, K, (), BTreeSet<K>>;

/// Destinations inside the cluster: never translated.
pub static CLUSTER_NETS: Intervals<EgressTables, Range> = Intervals {
    name: "cluster_nets",
    key: "ipv4_addr",
    value: None,
    of: |t| &t.cluster_nets,
    of_mut: |t| &mut t.cluster_nets,
    text: |(a, b)| range(*a, *b),
    line: |(a, b)| format!("{a}-{b}"),
    atom: interval,
    public: |_| None,
};
/// Pod -> VIP, every destination port.
pub static SNAT_ALL: EgressMap<Ipv4Addr, Ipv4Addr> =
    Map { name: "snat_all", of: |t| &t.snat_all, of_mut: |t| &mut t.snat_all, public: |_, v| Some(*v) };
/// Pod . protocol . destination port -> VIP.
pub static SNAT_PORTS: EgressMap<PortKey, Ipv4Addr> =
    Map { name: "snat_ports", of: |t| &t.snat_ports, of_mut: |t| &mut t.snat_ports, public: |_, v| Some(*v) };
/// Pods translated only toward `ALLOW`.
pub static ALLOW_ONLY: EgressSet<Ipv4Addr> =
    Map { name: "allow_only", of: |t| &t.allow_only, of_mut: |t| &mut t.allow_only, public: |_, _| None };
/// Pod . destination range: translated (for pods in `ALLOW_ONLY`).
pub static ALLOW: Spans<EgressTables, (Ipv4Addr, Range)> =
    Spans { name: "allow", of: |t| &t.allow, of_mut: |t| &mut t.allow };
/// Pod . destination range: never translated.
pub static DENY: Spans<EgressTables, (Ipv4Addr, Range)> =
    Spans { name: "deny", of: |t| &t.deny, of_mut: |t| &mut t.deny };
/// Pods whose traffic out of the cluster is dropped (fail-closed).
pub static HOLD: EgressSet<Ipv4Addr> =
    Map { name: "hold", of: |t| &t.hold, of_mut: |t| &mut t.hold, public: |_, _| None };

/// Every map and set of the egress table, in declaration order.
pub static EGRESS: [&dyn TableSet<EgressTables>; 7] =
    [&CLUSTER_NETS, &SNAT_ALL, &SNAT_PORTS, &ALLOW_ONLY, &ALLOW, &DENY, &HOLD];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        let names: BTreeSet<&str> = GATEWAY.iter().map(|s| s.name()).chain(EGRESS.iter().map(|s| s.name())).collect();
        assert_eq!(names.len(), GATEWAY.len() + EGRESS.len());
        assert!(named("port_fwd").is_some_and(|s| !s.interval()));
        assert!(named("snat_nets").is_some_and(|s| s.interval()));
        assert!(named("port").is_none());
    }

    #[test]
    fn a_sorted_walk_diffs_as_a_persistent_map_does() {
        let a: BTreeMap<u8, u8> = [(1, 1), (2, 2), (4, 4)].into();
        let b: BTreeMap<u8, u8> = [(2, 3), (3, 3), (4, 4), (5, 5)].into();
        let oa: OrdMap<u8, u8> = a.clone().into_iter().collect();
        let ob: OrdMap<u8, u8> = b.clone().into_iter().collect();
        type Pairs = Vec<(u8, u8)>;
        fn flat(d: Diff<u8, u8>) -> (Pairs, Pairs) {
            let f = |v: Vec<(&u8, &u8)>| v.into_iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>();
            (f(d.delete), f(d.add))
        }
        assert_eq!(flat(Elements::diff(&a, &b)), flat(Elements::diff(&oa, &ob)));
        assert_eq!(flat(Elements::diff(&a, &b)), (vec![(1, 1), (2, 2)], vec![(2, 3), (3, 3), (5, 5)]));
        let (s, t): (BTreeSet<u8>, BTreeSet<u8>) = ([1, 2].into(), [2, 3].into());
        let d = Elements::diff(&s, &t);
        assert_eq!((d.delete.len(), d.add.len()), (1, 1));
    }

    #[test]
    fn a_set_has_no_value_and_its_elements_are_keys() {
        let mut want = EgressTables::default();
        want.hold.insert(Ipv4Addr::new(10, 0, 0, 6));
        assert_eq!(HOLD.set().value, None);
        assert_eq!(HOLD.text_change(&EgressTables::default(), &want).add, ["10.0.0.6"]);
        let c = HOLD.netlink_change(&EgressTables::default(), &want).unwrap_or_default();
        assert_eq!(c.add, [(vec![10, 0, 0, 6], vec![])]);
    }
}
