//! Objects as natgw holds them to plan: the spec, and of the metadata and
//! status only what planning and the gateway agent read. kube's
//! `ObjectMeta` is 360 bytes inline before any of its strings; at 100k
//! objects the whole objects were most of a gateway agent's memory.

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, Weak};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use k8s_openapi::jiff::Timestamp;

use crate::own::Own;
use crate::types::*;

/// An object's name as natgw keeps it in its own structures.
pub type Name = compact_str::CompactString;

/// An object as natgw holds it: what is read of its metadata, its spec,
/// and what is read of its status (`()` for most kinds).
#[derive(Clone, Debug, PartialEq)]
pub struct Held<S, T = ()> {
    pub meta: Meta,
    pub spec: S,
    pub status: T,
}

/// Orders objects by age: creation time, then name.
pub type AgeKey<'a> = (Option<Timestamp>, &'a str);

/// How kind K is held.
pub type HeldOf<K> = Held<<K as Project>::Spec, <K as Project>::Status>;

/// An Eip keeps the address its status says it holds.
pub type HeldEip = Held<EipSpec, Option<Ipv4Addr>>;

impl<S, T> Held<S, T> {
    pub fn name(&self) -> &str {
        &self.meta.name
    }

    /// Sort key giving older objects precedence in conflicts; objects
    /// without a creation time (manifests) fall back to name order.
    pub fn age_key(&self) -> AgeKey<'_> {
        (self.meta.created, &self.meta.name)
    }
}

impl HeldEip {
    /// The address this Eip asks for (`Eip::address`).
    pub fn address(&self) -> Option<Ipv4Addr> {
        self.spec.ip.or(self.status)
    }
}

/// What is held of an object's metadata.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Meta {
    pub name: Name,
    pub uid: Option<Uid>,
    pub resource_version: Option<Name>,
    pub generation: Option<i64>,
    pub created: Option<Timestamp>,
    /// A deletion timestamp is set.
    pub deleting: bool,
    pub finalizers: Finalizers,
    /// The gateway agent's conditions.
    pub own: Own,
}

impl Meta {
    /// From an object's metadata and its status's conditions.
    pub fn of(m: &ObjectMeta, conditions: &[Condition]) -> Meta {
        Meta {
            name: m.name.as_deref().unwrap_or_default().into(),
            uid: m.uid.as_deref().map(Uid::new),
            resource_version: m.resource_version.as_deref().map(Name::from),
            generation: m.generation,
            created: m.creation_timestamp.as_ref().map(|t| t.0),
            deleting: m.deletion_timestamp.is_some(),
            finalizers: Finalizers::new(m.finalizers.as_deref().unwrap_or_default()),
            own: Own::of(conditions),
        }
    }
}

/// An object's uid: 16 bytes when it is a UUID in its canonical form, as
/// the API server makes them; kept as written otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uid {
    /// Bytes, not a u128: its 16-byte alignment made every held object 8
    /// bytes larger.
    Uuid([u8; 16]),
    Other(Box<str>),
}

impl Uid {
    pub fn new(s: &str) -> Uid {
        match parse_uuid(s) {
            Some(n) => Uid::Uuid(n.to_be_bytes()),
            None => Uid::Other(s.into()),
        }
    }

    /// Whether this is the uid written `s`.
    pub fn is(&self, s: &str) -> bool {
        *self == Uid::new(s)
    }
}

/// Lower-case hex in groups of 8-4-4-4-12: the only form that formats back
/// to the same text.
fn parse_uuid(s: &str) -> Option<u128> {
    let b = s.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let mut n: u128 = 0;
    for (i, &c) in b.iter().enumerate() {
        if [8, 13, 18, 23].contains(&i) {
            continue;
        }
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        n = (n << 4) | d as u128;
    }
    Some(n)
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Uid::Uuid(b) => {
                let hex = format!("{:032x}", u128::from_be_bytes(*b));
                write!(f, "{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
            }
            Uid::Other(s) => f.write_str(s),
        }
    }
}

/// An object's finalizers, one list shared by every object that has the
/// same (nearly all have the controller's and their gateway's): three
/// heap strings an object were about 22 MB at 100k.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Finalizers(Option<Arc<[String]>>);

/// Lists in use; one whose objects are all gone is dropped when the table
/// has doubled since it was last swept.
struct Table {
    lists: HashMap<Vec<String>, Weak<[String]>>,
    swept_at: usize,
}

static TABLE: Mutex<Option<Table>> = Mutex::new(None);

impl Finalizers {
    pub fn new(list: &[String]) -> Finalizers {
        if list.is_empty() {
            return Finalizers(None);
        }
        let mut guard = TABLE.lock().unwrap_or_else(|p| p.into_inner());
        let table = guard.get_or_insert_with(|| Table { lists: HashMap::new(), swept_at: 0 });
        if let Some(shared) = table.lists.get(list).and_then(Weak::upgrade) {
            return Finalizers(Some(shared));
        }
        let shared: Arc<[String]> = list.into();
        table.lists.insert(list.to_vec(), Arc::downgrade(&shared));
        if table.lists.len() > 2 * table.swept_at + 64 {
            table.lists.retain(|_, w| w.strong_count() > 0);
            table.swept_at = table.lists.len();
        }
        Finalizers(Some(shared))
    }
}

impl std::ops::Deref for Finalizers {
    type Target = [String];
    fn deref(&self) -> &[String] {
        self.0.as_deref().unwrap_or_default()
    }
}

/// A kind as natgw holds it.
pub trait Project: Sized {
    type Spec: Clone;
    type Status;
    fn project(self) -> Held<Self::Spec, Self::Status>;
    /// An object with only a name and a spec (a stand-in to delete by name).
    fn named(name: &str, spec: Self::Spec) -> Self;
}

macro_rules! project {
    ($t:ident, $spec:ident, $status:ty, |$s:ident| $conditions:expr, |$st:ident| $kept:expr) => {
        impl Project for $t {
            type Spec = $spec;
            type Status = $status;
            fn project(self) -> Held<$spec, $status> {
                let conditions: &[Condition] =
                    self.status.as_ref().map(|$s| $conditions.as_slice()).unwrap_or_default();
                let meta = Meta::of(&self.metadata, conditions);
                let $st = self.status.as_ref();
                Held { meta, spec: self.spec, status: $kept }
            }
            fn named(name: &str, spec: $spec) -> $t {
                $t::new(name, spec)
            }
        }
    };
}

project!(Vpc, VpcSpec, (), |s| s.common.conditions, |_s| ());
project!(Subnet, SubnetSpec, (), |s| s.conditions, |_s| ());
project!(NatGateway, NatGatewaySpec, (), |s| s.conditions, |_s| ());
project!(Eip, EipSpec, Option<Ipv4Addr>, |s| s.common.conditions, |s| s.and_then(|s| s.ip));
project!(FloatingIp, FloatingIpSpec, (), |s| s.conditions, |_s| ());
project!(SnatRule, SnatRuleSpec, (), |s| s.conditions, |_s| ());
project!(DnatRule, DnatRuleSpec, (), |s| s.conditions, |_s| ());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_is_kept_exactly_as_written() {
        for s in [
            "0f6e8a3c-1d2b-4c5e-9f70-123456789abc",
            "00000000-0000-0000-0000-000000000000",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
        ] {
            let u = Uid::new(s);
            assert!(matches!(u, Uid::Uuid(_)), "{s}");
            assert_eq!(u.to_string(), s);
            assert!(u.is(s));
        }
        // Odd but accepted: upper case, braces, short, hyphens moved.
        for s in [
            "0F6E8A3C-1D2B-4C5E-9F70-123456789ABC",
            "{0f6e8a3c-1d2b-4c5e-9f70-123456789ab}",
            "0f6e8a3c",
            "0f6e8a3c1-d2b-4c5e-9f70-123456789abc",
            "",
        ] {
            let u = Uid::new(s);
            assert!(matches!(u, Uid::Other(_)), "{s}");
            assert_eq!(u.to_string(), s);
        }
        let lower = Uid::new("0f6e8a3c-1d2b-4c5e-9f70-123456789abc");
        assert!(!lower.is("0F6E8A3C-1D2B-4C5E-9F70-123456789ABC"));
    }

    #[test]
    fn objects_with_the_same_finalizers_share_one_list() {
        let list = vec!["natgw.io/controller".to_string(), "natgw.io/gateway-a".to_string()];
        let (a, b) = (Finalizers::new(&list), Finalizers::new(&list.clone()));
        assert_eq!(&*a, list.as_slice());
        let (Some(x), Some(y)) = (&a.0, &b.0) else { panic!("both hold a list") };
        assert!(Arc::ptr_eq(x, y));
        // Order is kept: another order is another list.
        let reversed: Vec<String> = list.iter().rev().cloned().collect();
        assert_eq!(&*Finalizers::new(&reversed), reversed.as_slice());
        assert!(Finalizers::new(&[]).is_empty());
        // Lists nobody holds any more are swept, not kept forever.
        for i in 0..1000 {
            drop(Finalizers::new(&[format!("natgw.io/gateway-{i}")]));
        }
        let kept = TABLE.lock().unwrap().as_ref().map_or(0, |t| t.lists.len());
        assert!(kept < 300, "{kept} lists kept");
    }

    #[test]
    fn an_eip_keeps_the_address_its_status_says() {
        let mut e = Eip::new("e", EipSpec { gateway: "gw".into(), ip: None, internal_cidrs: Vec::new() });
        e.status = Some(EipStatus { ip: Some(Ipv4Addr::new(192, 0, 2, 7)), ..Default::default() });
        e.metadata.finalizers = Some(vec!["natgw.io/controller".into()]);
        let at = Timestamp::from_second(1_764_700_000).unwrap();
        e.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at));
        let condition = |t: &str| Condition {
            type_: t.into(),
            status: "True".into(),
            reason: "R".into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at),
        };
        let conditions: Vec<Condition> = ["Bound", "Programmed", "Conflict", "Ready"].map(condition).into();
        if let Some(s) = e.status.as_mut() {
            s.common.conditions = conditions.clone();
        }
        let held = e.clone().project();
        assert_eq!(held.address(), e.address());
        assert_eq!(held.name(), "e");
        assert_eq!(&*held.meta.finalizers, ["natgw.io/controller"]);
        assert!(!held.meta.deleting);
        // Conflicts are weighed by age: the creation time is kept.
        assert_eq!(held.age_key(), (Some(at), "e"));
        assert_eq!(held.meta.own, Own::of(&conditions));
        assert!(held.meta.own.since(2, "True").is_some());
    }
}
