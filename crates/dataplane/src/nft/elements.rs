//! The gateway table's maps and sets, each described once: its name, its
//! key and value types, and where the plan keeps it. One typed diff per
//! map, and every form of an element from the same description: the nft
//! text a script writes, the bytes a netlink batch writes and a dump reads
//! back, the atoms of `nft -j`, and the lines `audit` reports. The script
//! writer (`nft`), the netlink batch (`nfnl`), the kernel reader and the
//! audit (`state`) all go through `GATEWAY`; no other code names a map.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use imbl::OrdMap;
use imbl::ordmap::DiffItem;
use natgw_api::Protocol;
use natgw_plan::{NatTables, PortKey, SnatRange, Target};

use crate::gateway::state::Drift;
use crate::nft::listing::Atom;
use crate::nft::model::{Change, Set, whole_change};
use crate::nft::netlink::MapChange;
use crate::nft::range;

/// A key or a value of an element, in each of its forms.
pub trait Field: Sized + Clone + Ord {
    /// nft's type, e.g. `ipv4_addr . inet_proto . inet_service`.
    const TYPE: &'static str;
    fn text(&self) -> String;
    /// As the kernel stores it: each part of a concatenation padded to
    /// four bytes.
    fn bytes(&self) -> Vec<u8>;
    fn from_bytes(b: &[u8]) -> Result<Self, String>;
    fn from_atom(a: &Atom) -> Result<Self, String>;
}

fn addr_at(b: &[u8], at: usize) -> Result<Ipv4Addr, String> {
    let octets: [u8; 4] = b.get(at..at + 4).and_then(|o| o.try_into().ok()).ok_or("an address shorter than 4 bytes")?;
    Ok(Ipv4Addr::from(octets))
}

fn port_at(b: &[u8], at: usize) -> Result<u16, String> {
    let p: [u8; 2] = b.get(at..at + 2).and_then(|p| p.try_into().ok()).ok_or("a port shorter than 2 bytes")?;
    Ok(u16::from_be_bytes(p))
}

fn atom_addr(v: &Atom) -> Result<Ipv4Addr, String> {
    match v {
        Atom::Addr(a) => Ok(*a),
        _ => Err(format!("expected IPv4 address, got {v}")),
    }
}

fn atom_port(v: &Atom) -> Result<u16, String> {
    match v {
        Atom::Num(p) => u16::try_from(*p).map_err(|_| format!("expected port, got {v}")),
        _ => Err(format!("expected port, got {v}")),
    }
}

fn parts(v: &Atom, n: usize) -> Result<Vec<Atom>, String> {
    match (v, v.two()) {
        (Atom::List(l), _) if l.len() == n => Ok(l.clone()),
        (_, Some((a, b))) if n == 2 => Ok(vec![a, b]),
        _ => Err(format!("expected {n}-part concatenation, got {v}")),
    }
}

fn pair(e: &Atom) -> Result<(Atom, Atom), String> {
    e.two().ok_or_else(|| format!("expected [key, value], got {e}"))
}

impl Field for Ipv4Addr {
    const TYPE: &'static str = "ipv4_addr";
    fn text(&self) -> String {
        self.to_string()
    }
    fn bytes(&self) -> Vec<u8> {
        self.octets().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Result<Self, String> {
        addr_at(b, 0)
    }
    fn from_atom(a: &Atom) -> Result<Self, String> {
        atom_addr(a)
    }
}

impl Field for PortKey {
    const TYPE: &'static str = "ipv4_addr . inet_proto . inet_service";
    fn text(&self) -> String {
        format!("{} . {} . {}", self.0, self.1, self.2)
    }
    fn bytes(&self) -> Vec<u8> {
        let p = match self.1 {
            Protocol::Tcp => 6u8,
            Protocol::Udp => 17,
        };
        let mut k = self.0.bytes();
        k.extend([p, 0, 0, 0]);
        k.extend(self.2.to_be_bytes());
        k.extend([0, 0]);
        k
    }
    fn from_bytes(b: &[u8]) -> Result<Self, String> {
        if b.len() != 12 {
            return Err(format!("a key of {} bytes", b.len()));
        }
        let proto = match b[4] {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            other => return Err(format!("unexpected protocol {other}")),
        };
        Ok((addr_at(b, 0)?, proto, port_at(b, 8)?))
    }
    fn from_atom(a: &Atom) -> Result<Self, String> {
        let k = parts(a, 3)?;
        let proto = match &k[1] {
            Atom::Word(s) if &**s == "tcp" => Protocol::Tcp,
            Atom::Word(s) if &**s == "udp" => Protocol::Udp,
            Atom::Num(6) => Protocol::Tcp,
            Atom::Num(17) => Protocol::Udp,
            other => return Err(format!("unexpected protocol {other}")),
        };
        Ok((atom_addr(&k[0])?, proto, atom_port(&k[2])?))
    }
}

impl Field for Target {
    const TYPE: &'static str = "ipv4_addr . inet_service";
    fn text(&self) -> String {
        format!("{} . {}", self.0, self.1)
    }
    fn bytes(&self) -> Vec<u8> {
        let mut v = self.0.bytes();
        v.extend(self.1.to_be_bytes());
        v.extend([0, 0]);
        v
    }
    fn from_bytes(b: &[u8]) -> Result<Self, String> {
        if b.len() != 8 {
            return Err(format!("a value of {} bytes", b.len()));
        }
        Ok((addr_at(b, 0)?, port_at(b, 4)?))
    }
    fn from_atom(a: &Atom) -> Result<Self, String> {
        let v = parts(a, 2)?;
        Ok((atom_addr(&v[0])?, atom_port(&v[1])?))
    }
}

/// A hash map of the gateway's table.
pub struct Map<K: 'static, V: 'static> {
    pub name: &'static str,
    of: fn(&NatTables) -> &OrdMap<K, V>,
    of_mut: fn(&mut NatTables) -> &mut OrdMap<K, V>,
    /// The EIP an element translates to or from.
    eip: fn(&K, &V) -> Ipv4Addr,
}

/// An interval set or map: elements that must never overlap, so it is
/// replaced whole when it changes and written only through nft.
pub struct Intervals<T: 'static> {
    pub name: &'static str,
    key: &'static str,
    value: Option<&'static str>,
    of: fn(&NatTables) -> &Vec<T>,
    of_mut: fn(&mut NatTables) -> &mut Vec<T>,
    text: fn(&T) -> String,
    /// As `audit` reports it.
    line: fn(&T) -> String,
    atom: fn(&Atom) -> Result<T, String>,
    eip: fn(&T) -> Option<Ipv4Addr>,
}

/// One map or set of the gateway's table, whatever its types.
pub trait TableSet: Sync {
    fn name(&self) -> &'static str;
    /// Its declaration.
    fn set(&self) -> Set;
    fn interval(&self) -> bool;
    fn differs(&self, have: &NatTables, want: &NatTables) -> bool;
    /// The change as nft text.
    fn text_change(&self, have: &NatTables, want: &NatTables) -> Change;
    /// The change as netlink elements: hash maps only.
    fn netlink_change(&self, have: &NatTables, want: &NatTables) -> Option<MapChange>;
    /// One element as a dump returns it (hash maps only).
    fn read_bytes(&self, nat: &mut NatTables, key: &[u8], value: &[u8]) -> Result<(), String>;
    /// One element as `nft -j` lists it.
    fn read_atom(&self, nat: &mut NatTables, element: &Atom) -> Result<(), String>;
    /// The differences `audit` reports.
    fn drift(&self, have: &NatTables, want: &NatTables, out: &mut Vec<Drift>);
    /// The EIPs whose translation the change touches.
    fn touched(&self, have: &NatTables, want: &NatTables, out: &mut BTreeSet<Ipv4Addr>);
    /// Every EIP the set translates to or from.
    fn eips(&self, nat: &NatTables, out: &mut BTreeSet<Ipv4Addr>);
}

/// A typed element change: deletions (a changed value is deleted, then
/// added) and additions.
pub struct Diff<'a, K, V> {
    pub delete: Vec<(&'a K, &'a V)>,
    pub add: Vec<(&'a K, &'a V)>,
}

impl<K: Field, V: Field> Map<K, V> {
    /// The diff of two persistent maps: it skips the subtrees they share,
    /// so a plan derived from the last one costs O(change).
    pub fn diff<'a>(&self, have: &'a NatTables, want: &'a NatTables) -> Diff<'a, K, V> {
        let mut d = Diff { delete: Vec::new(), add: Vec::new() };
        for item in (self.of)(have).diff((self.of)(want)) {
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

    fn line(&self, k: &K, v: &V) -> String {
        format!("nft {} element {} : {}", self.name, k.text(), v.text())
    }
}

impl<K: Field + Send + Sync, V: Field + Send + Sync> TableSet for Map<K, V> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn set(&self) -> Set {
        Set { name: self.name, key: K::TYPE, value: Some(V::TYPE), interval: false }
    }
    fn interval(&self) -> bool {
        false
    }
    fn differs(&self, have: &NatTables, want: &NatTables) -> bool {
        (self.of)(have) != (self.of)(want)
    }
    fn text_change(&self, have: &NatTables, want: &NatTables) -> Change {
        let d = self.diff(have, want);
        Change {
            set: self.name,
            flush: false,
            delete: d.delete.iter().map(|(k, _)| k.text()).collect(),
            add: d.add.iter().map(|(k, v)| format!("{} : {}", k.text(), v.text())).collect(),
        }
    }
    fn netlink_change(&self, have: &NatTables, want: &NatTables) -> Option<MapChange> {
        let d = self.diff(have, want);
        Some(MapChange {
            set: self.name,
            delete: d.delete.iter().map(|(k, v)| (k.bytes(), v.bytes())).collect(),
            add: d.add.iter().map(|(k, v)| (k.bytes(), v.bytes())).collect(),
        })
    }
    fn read_bytes(&self, nat: &mut NatTables, key: &[u8], value: &[u8]) -> Result<(), String> {
        (self.of_mut)(nat).insert(K::from_bytes(key)?, V::from_bytes(value)?);
        Ok(())
    }
    fn read_atom(&self, nat: &mut NatTables, element: &Atom) -> Result<(), String> {
        let (k, v) = pair(element)?;
        (self.of_mut)(nat).insert(K::from_atom(&k)?, V::from_atom(&v)?);
        Ok(())
    }
    fn drift(&self, have: &NatTables, want: &NatTables, out: &mut Vec<Drift>) {
        let d = self.diff(have, want);
        out.extend(d.delete.iter().map(|(k, v)| Drift::Leaked(self.line(k, v))));
        out.extend(d.add.iter().map(|(k, v)| Drift::Missing(self.line(k, v))));
    }
    fn touched(&self, have: &NatTables, want: &NatTables, out: &mut BTreeSet<Ipv4Addr>) {
        let d = self.diff(have, want);
        out.extend(d.delete.iter().chain(&d.add).map(|(k, v)| (self.eip)(k, v)));
    }
    fn eips(&self, nat: &NatTables, out: &mut BTreeSet<Ipv4Addr>) {
        out.extend((self.of)(nat).iter().map(|(k, v)| (self.eip)(k, v)));
    }
}

impl<T: PartialEq + Send + Sync> TableSet for Intervals<T> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn set(&self) -> Set {
        Set { name: self.name, key: self.key, value: self.value, interval: true }
    }
    fn interval(&self) -> bool {
        true
    }
    fn differs(&self, have: &NatTables, want: &NatTables) -> bool {
        (self.of)(have) != (self.of)(want)
    }
    fn text_change(&self, have: &NatTables, want: &NatTables) -> Change {
        whole_change(self.name, (self.of)(have), (self.of)(want), self.text)
    }
    fn netlink_change(&self, _: &NatTables, _: &NatTables) -> Option<MapChange> {
        None
    }
    fn read_bytes(&self, _: &mut NatTables, _: &[u8], _: &[u8]) -> Result<(), String> {
        Err(format!("{} is an interval set: nft lists it", self.name))
    }
    fn read_atom(&self, nat: &mut NatTables, element: &Atom) -> Result<(), String> {
        let item = (self.atom)(element)?;
        (self.of_mut)(nat).push(item);
        Ok(())
    }
    fn drift(&self, have: &NatTables, want: &NatTables, out: &mut Vec<Drift>) {
        let (have, want) = ((self.of)(have), (self.of)(want));
        let line = |x: &T| format!("nft {} element {}", self.name, (self.line)(x));
        out.extend(have.iter().filter(|x| !want.contains(x)).map(|x| Drift::Leaked(line(x))));
        out.extend(want.iter().filter(|x| !have.contains(x)).map(|x| Drift::Missing(line(x))));
    }
    fn touched(&self, have: &NatTables, want: &NatTables, out: &mut BTreeSet<Ipv4Addr>) {
        if self.differs(have, want) {
            out.extend((self.of)(have).iter().chain((self.of)(want)).filter_map(self.eip));
        }
    }
    fn eips(&self, nat: &NatTables, out: &mut BTreeSet<Ipv4Addr>) {
        out.extend((self.of)(nat).iter().filter_map(self.eip));
    }
}

/// An interval as `nft -j` lists it: a prefix, a range or one address.
fn interval(v: &Atom) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    match v {
        Atom::Prefix(addr, len) => {
            let net = ipnet::Ipv4Net::new(*addr, *len).map_err(|e| e.to_string())?;
            Ok((net.network(), net.broadcast()))
        }
        Atom::Pair(a, b) => Ok((*a, *b)),
        _ => {
            let a = atom_addr(v)?;
            Ok((a, a))
        }
    }
}

/// FloatingIp, inbound: EIP -> internal address.
pub static FIP_DNAT: Map<Ipv4Addr, Ipv4Addr> =
    Map { name: "fip_dnat", of: |t| &t.fip_dnat, of_mut: |t| &mut t.fip_dnat, eip: |k, _| *k };
/// FloatingIp, outbound: internal address -> EIP.
pub static FIP_SNAT: Map<Ipv4Addr, Ipv4Addr> =
    Map { name: "fip_snat", of: |t| &t.fip_snat, of_mut: |t| &mut t.fip_snat, eip: |_, v| *v };
/// DnatRule: EIP . protocol . port -> internal address . port.
pub static PORT_FWD: Map<PortKey, Target> =
    Map { name: "port_fwd", of: |t| &t.port_fwd, of_mut: |t| &mut t.port_fwd, eip: |k, _| k.0 };
/// SnatRule: source ranges -> EIP, longest prefix already resolved.
pub static SNAT_NETS: Intervals<SnatRange> = Intervals {
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
    eip: |r| Some(r.eip),
};
/// The VPC's networks, for hairpin NAT.
pub static INTERNAL_NETS: Intervals<(Ipv4Addr, Ipv4Addr)> = Intervals {
    name: "internal_nets",
    key: "ipv4_addr",
    value: None,
    of: |t| &t.internal_nets,
    of_mut: |t| &mut t.internal_nets,
    text: |(a, b)| range(*a, *b),
    line: |(a, b)| format!("{a}-{b}"),
    atom: interval,
    eip: |_| None,
};

/// Every map and set of the gateway's table, in declaration order.
pub static GATEWAY: [&dyn TableSet; 5] = [&FIP_DNAT, &FIP_SNAT, &PORT_FWD, &SNAT_NETS, &INTERNAL_NETS];

/// The map or set called `name`.
pub fn named(name: &str) -> Option<&'static dyn TableSet> {
    GATEWAY.iter().copied().find(|s| s.name() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_field_reads_back_its_own_bytes() {
        let key: PortKey = (Ipv4Addr::new(198, 51, 100, 7), Protocol::Udp, 65535);
        assert_eq!(PortKey::from_bytes(&key.bytes()), Ok(key));
        let target: Target = (Ipv4Addr::new(10, 0, 0, 1), 1);
        assert_eq!(Target::from_bytes(&target.bytes()), Ok(target));
        assert_eq!(key.bytes().len(), 12, "each part padded to four bytes");
        assert!(PortKey::from_bytes(&[0; 8]).is_err());
    }

    #[test]
    fn names_are_unique_and_found() {
        let names: BTreeSet<&str> = GATEWAY.iter().map(|s| s.name()).collect();
        assert_eq!(names.len(), GATEWAY.len());
        assert!(named("port_fwd").is_some_and(|s| !s.interval()));
        assert!(named("snat_nets").is_some_and(|s| s.interval()));
        assert!(named("port").is_none());
    }
}
