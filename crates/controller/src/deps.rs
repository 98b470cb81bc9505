//! Deletion order (pure): what must be gone before an object may go.

use natgw_api::{Kind, ObjectRef, ObjectSet};

/// Objects that still depend on `target`, sorted. Deletion waits until
/// this is empty: Vpc ← Subnets and NatGateways; Subnet ← NatGateways
/// using it as external subnet and Eips of those gateways; NatGateway ←
/// Eips; Eip ← FloatingIps, SnatRules and DnatRules.
pub fn blockers(set: &ObjectSet, target: &ObjectRef) -> Vec<ObjectRef> {
    let name = target.name.as_str();
    let mut out: Vec<ObjectRef> = match target.kind {
        Kind::Vpc => {
            let subnets = set
                .subnets
                .iter()
                .filter(|(_, s)| s.spec.vpc.as_deref() == Some(name))
                .map(|(n, _)| ObjectRef::new(Kind::Subnet, n));
            let gateways = set
                .gateways
                .iter()
                .filter(|(_, g)| g.spec.vpc == name)
                .map(|(n, _)| ObjectRef::new(Kind::NatGateway, n));
            subnets.chain(gateways).collect()
        }
        Kind::Subnet => {
            let gws: Vec<&String> =
                set.gateways.iter().filter(|(_, g)| g.spec.external_subnet == name).map(|(n, _)| n).collect();
            let eips = set
                .eips
                .iter()
                .filter(|(_, e)| gws.contains(&&e.spec.gateway))
                .map(|(n, _)| ObjectRef::new(Kind::Eip, n));
            gws.iter().map(|n| ObjectRef::new(Kind::NatGateway, n.as_str())).chain(eips).collect()
        }
        Kind::NatGateway => {
            set.eips.iter().filter(|(_, e)| e.spec.gateway == name).map(|(n, _)| ObjectRef::new(Kind::Eip, n)).collect()
        }
        Kind::Eip => {
            let f = set
                .floating_ips
                .iter()
                .filter(|(_, f)| f.spec.eip == name)
                .map(|(n, _)| ObjectRef::new(Kind::FloatingIp, n));
            let s = set
                .snat_rules
                .iter()
                .filter(|(_, s)| s.spec.eip == name)
                .map(|(n, _)| ObjectRef::new(Kind::SnatRule, n));
            let d = set
                .dnat_rules
                .iter()
                .filter(|(_, d)| d.spec.eip == name)
                .map(|(n, _)| ObjectRef::new(Kind::DnatRule, n));
            f.chain(s).chain(d).collect()
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
    use natgw_api::load_str;

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
