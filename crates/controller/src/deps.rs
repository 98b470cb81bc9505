//! Deletion order (pure): what must be gone before an object may go.

use std::sync::Arc;

use kube::ResourceExt;
use natgw_api::{DnatRule, Eip, FloatingIp, Kind, NatGateway, ObjectRef, SnatRule, Subnet};

/// What deletion order reads, one kind at a time: a deletion reads only
/// the kinds that may depend on it (none for a rule), so deleting many
/// objects at once costs no copy of everything per object.
pub trait Objects {
    fn subnets(&self) -> Vec<Arc<Subnet>>;
    fn gateways(&self) -> Vec<Arc<NatGateway>>;
    fn eips(&self) -> Vec<Arc<Eip>>;
    fn floating_ips(&self) -> Vec<Arc<FloatingIp>>;
    fn snat_rules(&self) -> Vec<Arc<SnatRule>>;
    fn dnat_rules(&self) -> Vec<Arc<DnatRule>>;
}

/// The objects of `all` that `keep` accepts, as references of `kind`.
fn refs<K: ResourceExt>(kind: Kind, all: Vec<Arc<K>>, keep: impl Fn(&K) -> bool) -> Vec<ObjectRef> {
    all.iter().filter(|o| keep(o)).map(|o| ObjectRef::new(kind, o.name_any())).collect()
}

/// Objects that still depend on `target`, sorted. Deletion waits until
/// this is empty: Vpc ← Subnets and NatGateways; Subnet ← NatGateways
/// using it as external subnet and Eips of those gateways; NatGateway ←
/// Eips; Eip ← FloatingIps, SnatRules and DnatRules.
pub fn blockers(set: &impl Objects, target: &ObjectRef) -> Vec<ObjectRef> {
    let name = target.name.as_str();
    let mut out: Vec<ObjectRef> = match target.kind {
        Kind::Vpc => {
            let mut out = refs(Kind::Subnet, set.subnets(), |s| s.spec.vpc.as_deref() == Some(name));
            out.extend(refs(Kind::NatGateway, set.gateways(), |g| g.spec.vpc == name));
            out
        }
        Kind::Subnet => {
            let mut out = refs(Kind::NatGateway, set.gateways(), |g| g.spec.external_subnet == name);
            let gws: Vec<&str> = out.iter().map(|r| r.name.as_str()).collect();
            let eips = refs(Kind::Eip, set.eips(), |e| gws.contains(&e.spec.gateway.as_str()));
            out.extend(eips);
            out
        }
        Kind::NatGateway => refs(Kind::Eip, set.eips(), |e| e.spec.gateway == name),
        Kind::Eip => {
            let mut out = refs(Kind::FloatingIp, set.floating_ips(), |f| f.spec.eip == name);
            out.extend(refs(Kind::SnatRule, set.snat_rules(), |s| s.spec.eip == name));
            out.extend(refs(Kind::DnatRule, set.dnat_rules(), |d| d.spec.eip == name));
            out
        }
        // Nothing depends on a rule.
        Kind::FloatingIp | Kind::SnatRule | Kind::DnatRule => Vec::new(),
    };
    out.sort();
    out
}

/// "Subnet/a, NatGateway/gw" for conditions and Events, bounded in length.
pub fn describe(blockers: &[ObjectRef]) -> String {
    const SHOWN: usize = 10;
    let mut names: Vec<String> = blockers.iter().take(SHOWN).map(|r| r.to_string()).collect();
    if blockers.len() > SHOWN {
        names.push(format!("and {} more", blockers.len() - SHOWN));
    }
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use natgw_api::{Held, Name, ObjectSet, Project, load_str};
    use std::collections::BTreeMap;

    const SET: &str = r#"
apiVersion: natgw.io/v1alpha1
kind: Vpc
metadata: {name: v}
---
apiVersion: natgw.io/v1alpha1
kind: Subnet
metadata: {name: lan}
spec: {vpc: v, cidr: 10.0.0.0/24, gateway: 10.0.0.1}
---
apiVersion: natgw.io/v1alpha1
kind: Subnet
metadata: {name: ext}
spec: {cidr: 192.0.2.0/24, gateway: 192.0.2.1}
---
apiVersion: natgw.io/v1alpha1
kind: NatGateway
metadata: {name: gw}
spec: {vpc: v, lanInterface: eth0, externalInterface: net1, externalSubnet: ext}
---
apiVersion: natgw.io/v1alpha1
kind: Eip
metadata: {name: e}
spec: {gateway: gw, ip: 192.0.2.10}
---
apiVersion: natgw.io/v1alpha1
kind: FloatingIp
metadata: {name: f}
spec: {eip: e, internalIp: 10.0.0.5}
---
apiVersion: natgw.io/v1alpha1
kind: DnatRule
metadata: {name: d}
spec: {eip: e, protocol: tcp, externalPort: 80, internalIp: 10.0.0.6, internalPort: 80}
"#;

    /// The objects of a manifest, rebuilt from how they are held.
    impl Objects for ObjectSet {
        fn subnets(&self) -> Vec<Arc<Subnet>> {
            rebuilt(&self.subnets)
        }
        fn gateways(&self) -> Vec<Arc<NatGateway>> {
            rebuilt(&self.gateways)
        }
        fn eips(&self) -> Vec<Arc<Eip>> {
            rebuilt(&self.eips)
        }
        fn floating_ips(&self) -> Vec<Arc<FloatingIp>> {
            rebuilt(&self.floating_ips)
        }
        fn snat_rules(&self) -> Vec<Arc<SnatRule>> {
            rebuilt(&self.snat_rules)
        }
        fn dnat_rules(&self) -> Vec<Arc<DnatRule>> {
            rebuilt(&self.dnat_rules)
        }
    }

    fn rebuilt<K: Project, T>(map: &BTreeMap<Name, Arc<Held<K::Spec, T>>>) -> Vec<Arc<K>> {
        map.iter().map(|(n, o)| Arc::new(K::named(n, o.spec.clone()))).collect()
    }

    fn names(kind: Kind, name: &str) -> Vec<String> {
        let set = load_str(std::path::Path::new("t.yaml"), SET).unwrap().0;
        blockers(&set, &ObjectRef::new(kind, name)).iter().map(|r| r.to_string()).collect()
    }

    #[test]
    fn each_kind_waits_for_its_dependents() {
        assert_eq!(names(Kind::Vpc, "v"), ["NatGateway/gw", "Subnet/lan"]);
        assert_eq!(names(Kind::Subnet, "ext"), ["Eip/e", "NatGateway/gw"]);
        assert!(names(Kind::Subnet, "lan").is_empty());
        assert_eq!(names(Kind::NatGateway, "gw"), ["Eip/e"]);
        assert_eq!(names(Kind::Eip, "e"), ["DnatRule/d", "FloatingIp/f"]);
        assert!(names(Kind::FloatingIp, "f").is_empty());
    }

    #[test]
    fn long_lists_are_cut() {
        let many: Vec<ObjectRef> = (0..15).map(|i| ObjectRef::new(Kind::FloatingIp, format!("f{i}"))).collect();
        assert!(describe(&many).ends_with("and 5 more"));
    }
}
