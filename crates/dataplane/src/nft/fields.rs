//! The types of map keys and values, each in every form it takes: the
//! nft text a script writes, the bytes a netlink batch writes and a dump
//! reads back, and the atoms of `nft -j`.

use std::net::Ipv4Addr;

use natgw_api::Protocol;
use natgw_plan::egress::Range;
use natgw_plan::{PortKey, Target};

use crate::nft::listing::Atom;
use crate::nft::range;

/// A key or a value of an element, as text and as `nft -j` lists it.
pub trait Field: Sized + Clone + Ord {
    /// nft's type, e.g. `ipv4_addr . inet_proto . inet_service`; empty
    /// for the value of a set (its elements are keys alone).
    const TYPE: &'static str;
    fn text(&self) -> String;
    fn from_atom(a: &Atom) -> Result<Self, String>;
}

/// A field as the kernel stores it: each part of a concatenation padded
/// to four bytes. Interval elements have none here: they are written
/// through nft, which splits and merges them.
pub trait Bytes: Field {
    fn bytes(&self) -> Vec<u8>;
    fn from_bytes(b: &[u8]) -> Result<Self, String>;
}

fn addr_at(b: &[u8], at: usize) -> Result<Ipv4Addr, String> {
    let octets: [u8; 4] = b.get(at..at + 4).and_then(|o| o.try_into().ok()).ok_or("an address shorter than 4 bytes")?;
    Ok(Ipv4Addr::from(octets))
}

fn port_at(b: &[u8], at: usize) -> Result<u16, String> {
    let p: [u8; 2] = b.get(at..at + 2).and_then(|p| p.try_into().ok()).ok_or("a port shorter than 2 bytes")?;
    Ok(u16::from_be_bytes(p))
}

pub(crate) fn atom_addr(v: &Atom) -> Result<Ipv4Addr, String> {
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

pub(crate) fn pair(e: &Atom) -> Result<(Atom, Atom), String> {
    e.two().ok_or_else(|| format!("expected [key, value], got {e}"))
}

impl Field for Ipv4Addr {
    const TYPE: &'static str = "ipv4_addr";
    fn text(&self) -> String {
        self.to_string()
    }
    fn from_atom(a: &Atom) -> Result<Self, String> {
        atom_addr(a)
    }
}

impl Bytes for Ipv4Addr {
    fn bytes(&self) -> Vec<u8> {
        self.octets().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Result<Self, String> {
        addr_at(b, 0)
    }
}

impl Field for PortKey {
    const TYPE: &'static str = "ipv4_addr . inet_proto . inet_service";
    fn text(&self) -> String {
        format!("{} . {} . {}", self.0, self.1, self.2)
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

impl Bytes for PortKey {
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
}

impl Field for Target {
    const TYPE: &'static str = "ipv4_addr . inet_service";
    fn text(&self) -> String {
        format!("{} . {}", self.0, self.1)
    }
    fn from_atom(a: &Atom) -> Result<Self, String> {
        let v = parts(a, 2)?;
        Ok((atom_addr(&v[0])?, atom_port(&v[1])?))
    }
}

impl Bytes for Target {
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
}

/// The value of a set's element: there is none.
impl Field for () {
    const TYPE: &'static str = "";
    fn text(&self) -> String {
        String::new()
    }
    fn from_atom(_: &Atom) -> Result<Self, String> {
        Ok(())
    }
}

impl Bytes for () {
    fn bytes(&self) -> Vec<u8> {
        Vec::new()
    }
    fn from_bytes(_: &[u8]) -> Result<Self, String> {
        Ok(())
    }
}

/// A pod and a range of destinations (egress allow and deny lists).
impl Field for (Ipv4Addr, Range) {
    const TYPE: &'static str = "ipv4_addr . ipv4_addr";
    fn text(&self) -> String {
        format!("{} . {}", self.0, range(self.1.0, self.1.1))
    }
    fn from_atom(a: &Atom) -> Result<Self, String> {
        let (pod, to) = a.two().ok_or_else(|| format!("expected pod . range, got {a}"))?;
        Ok((atom_addr(&pod)?, interval(&to)?))
    }
}

/// An interval as `nft -j` lists it: a prefix, a range or one address.
pub(crate) fn interval(v: &Atom) -> Result<(Ipv4Addr, Ipv4Addr), String> {
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
        assert!(().bytes().is_empty() && <()>::from_bytes(&[]).is_ok());
    }
}
