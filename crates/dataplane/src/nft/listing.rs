//! `nft -j list table` read straight into typed items and compact set
//! elements. Read as a `serde_json::Value` tree first, 100k translations
//! took about 90 MB more at the peak of every kernel read (each element
//! an array of tagged values and heap strings); an element here is its
//! addresses and numbers, parsed as they are read.

use std::fmt;
use std::net::Ipv4Addr;

use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// The listing: its items in order. Items natgw does not read (metainfo,
/// the table itself) have none of the fields below.
#[derive(Debug, Deserialize)]
pub struct Listing {
    pub nftables: Vec<Item>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Item {
    pub set: Option<SetItem>,
    pub map: Option<SetItem>,
    pub chain: Option<ChainItem>,
    pub rule: Option<RuleItem>,
}

/// A set or map. Its type, value type and flags are small and vary in
/// shape (a string or an array of them): kept as JSON.
#[derive(Debug, Deserialize)]
pub struct SetItem {
    pub name: String,
    #[serde(rename = "type", default)]
    pub ty: Value,
    #[serde(default)]
    pub map: Value,
    #[serde(default)]
    pub flags: Value,
    #[serde(default)]
    pub elem: Vec<Atom>,
}

#[derive(Debug, Deserialize)]
pub struct ChainItem {
    pub name: String,
    /// `list chains` lists every table's.
    #[serde(default)]
    pub table: String,
    #[serde(rename = "type", default)]
    pub ty: Option<String>,
    #[serde(default)]
    pub hook: Option<String>,
    #[serde(default)]
    pub prio: Value,
    #[serde(default)]
    pub policy: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RuleItem {
    pub chain: String,
    #[serde(default)]
    pub comment: Option<String>,
}

/// One value of a set element, as nft lists it: an address, a number, a
/// word (`tcp`), a list (a `[key, value]` pair, a concatenation, a range)
/// or a prefix. A list of two addresses (most elements: a FloatingIp's
/// map entry) is a `Pair`, with nothing on the heap. An element with attributes (`{"elem": {"val": ..,
/// "counter": ..}}`) is its value. Anything else is `Other`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Atom {
    Addr(Ipv4Addr),
    Num(u64),
    Word(Box<str>),
    List(Vec<Atom>),
    Pair(Ipv4Addr, Ipv4Addr),
    Prefix(Ipv4Addr, u8),
    Other,
}

impl Atom {
    /// The two parts of a list of two.
    pub fn two(&self) -> Option<(Atom, Atom)> {
        match self {
            Atom::Pair(a, b) => Some((Atom::Addr(*a), Atom::Addr(*b))),
            Atom::List(l) if l.len() == 2 => Some((l[0].clone(), l[1].clone())),
            _ => None,
        }
    }
}

impl fmt::Display for Atom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Atom::Addr(a) => write!(f, "{a}"),
            Atom::Num(n) => write!(f, "{n}"),
            Atom::Word(w) => write!(f, "{w:?}"),
            Atom::List(l) => {
                f.write_str("[")?;
                for (i, a) in l.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{a}")?;
                }
                f.write_str("]")
            }
            Atom::Pair(a, b) => write!(f, "[{a}, {b}]"),
            Atom::Prefix(a, len) => write!(f, "{a}/{len}"),
            Atom::Other => f.write_str("(other)"),
        }
    }
}

impl<'de> Deserialize<'de> for Atom {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Atom, D::Error> {
        d.deserialize_any(AtomVisitor)
    }
}

struct AtomVisitor;

#[derive(Deserialize)]
struct PrefixBody {
    addr: Atom,
    len: u8,
}

#[derive(Deserialize)]
struct WrappedBody {
    val: Atom,
}

impl<'de> Visitor<'de> for AtomVisitor {
    type Value = Atom;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an nftables set element")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Atom, E> {
        Ok(s.parse().map(Atom::Addr).unwrap_or_else(|_| Atom::Word(s.into())))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Atom, E> {
        Ok(Atom::Num(n))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Atom, E> {
        Ok(u64::try_from(n).map(Atom::Num).unwrap_or(Atom::Other))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Atom, E> {
        Ok(Atom::Other)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Atom, E> {
        Ok(Atom::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Atom, E> {
        Ok(Atom::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Atom, A::Error> {
        let mut list = Vec::new();
        while let Some(a) = seq.next_element()? {
            if let ([Atom::Addr(x)], Atom::Addr(y)) = (list.as_slice(), &a) {
                let (x, y) = (*x, *y);
                match seq.next_element()? {
                    None => return Ok(Atom::Pair(x, y)),
                    Some(third) => list.extend([Atom::Addr(y), third]),
                }
            } else {
                list.push(a);
            }
        }
        Ok(Atom::List(list))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Atom, A::Error> {
        let mut out = Atom::Other;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "concat" | "range" => out = map.next_value()?,
                "prefix" => {
                    let p: PrefixBody = map.next_value()?;
                    out = match p.addr {
                        Atom::Addr(a) => Atom::Prefix(a, p.len),
                        _ => Atom::Other,
                    };
                }
                "elem" => out = map.next_value::<WrappedBody>()?.val,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn atom(v: Value) -> Atom {
        serde_json::from_value(v).expect("an atom")
    }

    #[test]
    fn elements_are_read_in_every_shape_nft_lists() {
        use serde_json::json;
        let a = |s: &str| Atom::Addr(s.parse().unwrap());
        let pair = Atom::Pair("198.51.100.1".parse().unwrap(), "10.0.0.1".parse().unwrap());
        assert_eq!(atom(json!(["198.51.100.1", "10.0.0.1"])), pair);
        assert_eq!(
            atom(json!({"elem": {"val": ["198.51.100.1", "10.0.0.1"], "counter": {"packets": 3, "bytes": 9}}})),
            pair
        );
        assert_eq!(pair.two(), Some((a("198.51.100.1"), a("10.0.0.1"))));
        // Lists of other lengths or parts stay lists, in order.
        assert_eq!(atom(json!(["10.0.0.1"])), Atom::List(vec![a("10.0.0.1")]));
        assert_eq!(
            atom(json!(["10.0.0.1", "10.0.0.2", "10.0.0.3"])),
            Atom::List(vec![a("10.0.0.1"), a("10.0.0.2"), a("10.0.0.3")])
        );
        assert_eq!(atom(json!(["10.0.0.1", 80])), Atom::List(vec![a("10.0.0.1"), Atom::Num(80)]));
        assert_eq!(atom(json!([80, "10.0.0.1"])), Atom::List(vec![Atom::Num(80), a("10.0.0.1")]));
        assert_eq!(atom(json!([])), Atom::List(vec![]));
        assert_eq!(
            atom(json!({"concat": ["198.51.100.2", "tcp", 80]})),
            Atom::List(vec![a("198.51.100.2"), Atom::Word("tcp".into()), Atom::Num(80)])
        );
        assert_eq!(
            atom(json!({"prefix": {"addr": "10.0.0.0", "len": 24}})),
            Atom::Prefix("10.0.0.0".parse().unwrap(), 24)
        );
        assert_eq!(
            atom(json!({"range": ["10.1.0.5", "10.1.0.9"]})),
            Atom::Pair("10.1.0.5".parse().unwrap(), "10.1.0.9".parse().unwrap())
        );
        // What natgw never writes is read, not refused: its caller says
        // what it expected.
        for odd in [json!(-1), json!(1.5), json!(null), json!(true), json!({"set": "x"})] {
            assert_eq!(atom(odd), Atom::Other);
        }
        assert_eq!(atom(json!("010.0.0.1")), Atom::Word("010.0.0.1".into()));
        assert_eq!(atom(json!({"prefix": {"addr": "::1", "len": 128}})), Atom::Other);
    }
}
