//! The incremental planner gives exactly the plan `plan_gateway` gives,
//! after any sequence of FloatingIp, DnatRule, SnatRule and Eip changes,
//! and its maps share structure with the plan before the change.

use std::collections::BTreeSet;
use std::path::Path;

use natgw_api::{DnatRule, FloatingIp, Kind, ObjectRef, ObjectSet, SnatRule, load_str};
use natgw_plan::{GatewayPlanner, plan_gateway};
use proptest::prelude::*;
use serde_json::json;

const NETWORK: &str = r#"
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
kind: NatGateway
metadata: {name: other}
spec: {vpc: v, lanInterface: eth1, externalInterface: net2, externalSubnet: ext}
---
apiVersion: natgw.io/v1alpha1
kind: Eip
metadata: {name: a}
spec: {gateway: gw, ip: 192.0.2.10}
---
apiVersion: natgw.io/v1alpha1
kind: Eip
metadata: {name: b}
spec: {gateway: gw, ip: 192.0.2.11}
---
apiVersion: natgw.io/v1alpha1
kind: Eip
metadata: {name: c}
spec: {gateway: gw, ip: 192.0.2.12}
---
apiVersion: natgw.io/v1alpha1
kind: Eip
metadata: {name: elsewhere}
spec: {gateway: other, ip: 192.0.2.20}
---
apiVersion: natgw.io/v1alpha1
kind: Eip
metadata: {name: unusable}
spec: {gateway: gw, ip: 192.0.2.1}
---
apiVersion: natgw.io/v1alpha1
kind: SnatRule
metadata: {name: egress}
spec: {eip: b, internalCidr: 10.0.0.0/24}
"#;

// Names shared by both kinds and with a long common prefix; Eips that
// are usable, another gateway's, unusable or missing; internal addresses
// that collide, and one outside the VPC.
const NAMES: [&str; 4] = ["rule-with-a-long-shared-prefix-1", "rule-with-a-long-shared-prefix-2", "x", "y"];
const EIPS: [&str; 6] = ["a", "b", "c", "elsewhere", "unusable", "missing"];
const INTERNALS: [&str; 4] = ["10.0.0.5", "10.0.0.6", "10.0.0.7", "172.16.0.9"];
// SnatRules: the one of NETWORK and others; networks nested in each other
// at shared and at distinct starts, one the fenced Eip allows, one
// outside the VPC.
const SNAT_NAMES: [&str; 3] = ["egress", "egress-2", "z"];
const CIDRS: [&str; 7] =
    ["10.0.0.0/24", "10.0.0.0/25", "10.0.0.128/25", "10.0.0.4/30", "10.0.0.4/31", "10.0.0.6/32", "10.1.0.0/24"];

#[derive(Clone, Debug)]
enum Op {
    Fip {
        name: usize,
        eip: usize,
        internal: usize,
        age: Option<u8>,
    },
    Dnat {
        name: usize,
        eip: usize,
        udp: bool,
        port: u16,
        internal: usize,
        age: Option<u8>,
    },
    Delete {
        dnat: bool,
        name: usize,
    },
    /// `fenced`: its rules may reach only 10.0.0.4/31 (internalCidrs).
    Eip {
        name: usize,
        other_gateway: bool,
        ip: usize,
        age: Option<u8>,
        fenced: bool,
    },
    DeleteEip {
        name: usize,
    },
    Snat {
        name: usize,
        eip: usize,
        cidr: usize,
        age: Option<u8>,
    },
    DeleteSnat {
        name: usize,
    },
}

// Addresses an Eip asks for: two good ones, the router, one outside the
// external subnet, and none yet.
const EIP_IPS: [Option<&str>; 5] =
    [Some("192.0.2.10"), Some("192.0.2.11"), Some("192.0.2.1"), Some("198.51.100.5"), None];

fn op() -> impl Strategy<Value = Op> {
    let age = prop::option::of(0u8..4);
    prop_oneof![
        (0..NAMES.len(), 0..EIPS.len(), 0..INTERNALS.len(), age.clone())
            .prop_map(|(name, eip, internal, age)| Op::Fip { name, eip, internal, age }),
        (0..NAMES.len(), 0..EIPS.len(), any::<bool>(), 80u16..83, 0..INTERNALS.len(), age)
            .prop_map(|(name, eip, udp, port, internal, age)| Op::Dnat { name, eip, udp, port, internal, age }),
        (any::<bool>(), 0..NAMES.len()).prop_map(|(dnat, name)| Op::Delete { dnat, name }),
        (0..EIPS.len(), any::<bool>(), 0..EIP_IPS.len(), prop::option::of(0u8..4), any::<bool>())
            .prop_map(|(name, other_gateway, ip, age, fenced)| Op::Eip { name, other_gateway, ip, age, fenced }),
        (0..EIPS.len()).prop_map(|name| Op::DeleteEip { name }),
        (0..SNAT_NAMES.len(), 0..EIPS.len(), 0..CIDRS.len(), prop::option::of(0u8..4))
            .prop_map(|(name, eip, cidr, age)| Op::Snat { name, eip, cidr, age }),
        (0..SNAT_NAMES.len()).prop_map(|name| Op::DeleteSnat { name }),
    ]
}

fn meta(name: &str, age: Option<u8>) -> serde_json::Value {
    match age {
        Some(s) => json!({"name": name, "creationTimestamp": format!("2026-11-28T10:00:0{s}Z")}),
        None => json!({"name": name}),
    }
}

/// Applies `op` to `set` and returns the object it changed.
fn apply(set: &mut ObjectSet, op: &Op) -> ObjectRef {
    match op {
        Op::Fip { name, eip, internal, age } => {
            let f: FloatingIp = serde_json::from_value(json!({
                "apiVersion": "natgw.io/v1alpha1", "kind": "FloatingIp", "metadata": meta(NAMES[*name], *age),
                "spec": {"eip": EIPS[*eip], "internalIp": INTERNALS[*internal]}
            }))
            .expect("FloatingIp");
            set.floating_ips.insert(NAMES[*name].into(), std::sync::Arc::new(natgw_api::Project::project(f)));
            ObjectRef::new(Kind::FloatingIp, NAMES[*name])
        }
        Op::Dnat { name, eip, udp, port, internal, age } => {
            let d: DnatRule = serde_json::from_value(json!({
                "apiVersion": "natgw.io/v1alpha1", "kind": "DnatRule", "metadata": meta(NAMES[*name], *age),
                "spec": {"eip": EIPS[*eip], "protocol": if *udp { "udp" } else { "tcp" }, "externalPort": port,
                         "internalIp": INTERNALS[*internal], "internalPort": 8080}
            }))
            .expect("DnatRule");
            set.dnat_rules.insert(NAMES[*name].into(), std::sync::Arc::new(natgw_api::Project::project(d)));
            ObjectRef::new(Kind::DnatRule, NAMES[*name])
        }
        Op::Eip { name, other_gateway, ip, age, fenced } => {
            let mut spec = match EIP_IPS[*ip] {
                Some(ip) => json!({"gateway": if *other_gateway { "other" } else { "gw" }, "ip": ip}),
                None => json!({"gateway": if *other_gateway { "other" } else { "gw" }}),
            };
            if *fenced {
                spec["internalCidrs"] = json!(["10.0.0.4/31"]);
            }
            let e: natgw_api::Eip = serde_json::from_value(json!({
                "apiVersion": "natgw.io/v1alpha1", "kind": "Eip", "metadata": meta(EIPS[*name], *age), "spec": spec
            }))
            .expect("Eip");
            set.eips.insert(EIPS[*name].into(), std::sync::Arc::new(natgw_api::Project::project(e)));
            ObjectRef::new(Kind::Eip, EIPS[*name])
        }
        Op::Snat { name, eip, cidr, age } => {
            let r: SnatRule = serde_json::from_value(json!({
                "apiVersion": "natgw.io/v1alpha1", "kind": "SnatRule", "metadata": meta(SNAT_NAMES[*name], *age),
                "spec": {"eip": EIPS[*eip], "internalCidr": CIDRS[*cidr]}
            }))
            .expect("SnatRule");
            set.snat_rules.insert(SNAT_NAMES[*name].into(), std::sync::Arc::new(natgw_api::Project::project(r)));
            ObjectRef::new(Kind::SnatRule, SNAT_NAMES[*name])
        }
        Op::DeleteSnat { name } => {
            let r = ObjectRef::new(Kind::SnatRule, SNAT_NAMES[*name]);
            set.remove(&r);
            r
        }
        Op::DeleteEip { name } => {
            let r = ObjectRef::new(Kind::Eip, EIPS[*name]);
            set.remove(&r);
            r
        }
        Op::Delete { dnat, name } => {
            let kind = if *dnat { Kind::DnatRule } else { Kind::FloatingIp };
            let r = ObjectRef::new(kind, NAMES[*name]);
            set.remove(&r);
            r
        }
    }
}

fn network() -> ObjectSet {
    load_str(Path::new("t.yaml"), NETWORK).expect("valid").0
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// After every batch of changes, the planner's plan is the full plan.
    #[test]
    fn incremental_plan_equals_the_full_plan(
        start in prop::collection::vec(op(), 0..8),
        batches in prop::collection::vec(prop::collection::vec(op(), 1..4), 1..8),
    ) {
        let mut set = network();
        for o in &start {
            apply(&mut set, o);
        }
        let mut planner = GatewayPlanner::new(&set, "gw").expect("plan");
        prop_assert_eq!(planner.plan(), &plan_gateway(&set, "gw").expect("plan"));
        for batch in &batches {
            let changed: BTreeSet<ObjectRef> = batch.iter().map(|o| apply(&mut set, o)).collect();
            planner.update(&set, &changed).expect("update");
            prop_assert_eq!(planner.plan(), &plan_gateway(&set, "gw").expect("plan"));
        }
    }
}

#[test]
fn a_change_of_another_kind_plans_anew() {
    let mut set = network();
    apply(&mut set, &Op::Fip { name: 0, eip: 0, internal: 0, age: None });
    let mut planner = GatewayPlanner::new(&set, "gw").expect("plan");
    set.eips.remove("a");
    planner.update(&set, &[ObjectRef::new(Kind::Eip, "a")].into()).expect("update");
    assert_eq!(planner.plan(), &plan_gateway(&set, "gw").expect("plan"));
    assert!(planner.plan().nat.fip_dnat.is_empty());
}

#[test]
fn a_change_shares_the_rest_of_the_plan() {
    let mut set = network();
    for i in 0..200u32 {
        let e: natgw_api::Eip = serde_json::from_value(json!({
            "apiVersion": "natgw.io/v1alpha1", "kind": "Eip", "metadata": {"name": format!("e{i}")},
            "spec": {"gateway": "gw", "ip": format!("192.0.2.{}", 30 + i)}
        }))
        .expect("Eip");
        set.eips.insert(format!("e{i}").into(), std::sync::Arc::new(natgw_api::Project::project(e)));
        let f: FloatingIp = serde_json::from_value(json!({
            "apiVersion": "natgw.io/v1alpha1", "kind": "FloatingIp", "metadata": {"name": format!("f{i}")},
            "spec": {"eip": format!("e{i}"), "internalIp": format!("10.0.0.{}", 20 + i)}
        }))
        .expect("FloatingIp");
        set.floating_ips.insert(format!("f{i}").into(), std::sync::Arc::new(natgw_api::Project::project(f)));
    }
    let mut planner = GatewayPlanner::new(&set, "gw").expect("plan");
    assert_eq!(planner.plan().nat.fip_dnat.len(), 200);
    let before = planner.plan().clone();
    apply(&mut set, &Op::Fip { name: 2, eip: 1, internal: 1, age: None });
    planner.update(&set, &[ObjectRef::new(Kind::FloatingIp, NAMES[2])].into()).expect("update");
    let after = planner.plan();
    assert_eq!(after, &plan_gateway(&set, "gw").expect("plan"));
    assert_eq!(before.nat.fip_dnat.diff(&after.nat.fip_dnat).count(), 1);
    assert_eq!(before.addresses.diff(&after.addresses).count(), 0);
}

/// Names are kept inline up to 24 bytes and on the heap beyond: names
/// that share a long prefix, and one of the longest Kubernetes allows,
/// plan and update as short ones do.
#[test]
fn long_names_sharing_a_prefix_plan_and_update_like_short_ones() {
    let mut set = network();
    let prefix = "tenant-production-eu-west-floating-ip-";
    let longest = "f".repeat(253);
    let names = [format!("{prefix}1"), format!("{prefix}2"), longest.clone()];
    for (i, name) in names.iter().enumerate() {
        let eip = format!("{prefix}eip-{i}");
        let e: natgw_api::Eip = serde_json::from_value(json!({
            "apiVersion": "natgw.io/v1alpha1", "kind": "Eip", "metadata": {"name": eip},
            "spec": {"gateway": "gw", "ip": format!("192.0.2.{}", 100 + i)}
        }))
        .expect("Eip");
        set.insert(natgw_api::Object::Eip(e));
        let f: FloatingIp = serde_json::from_value(json!({
            "apiVersion": "natgw.io/v1alpha1", "kind": "FloatingIp", "metadata": {"name": name},
            "spec": {"eip": eip, "internalIp": format!("10.0.0.{}", 100 + i)}
        }))
        .expect("FloatingIp");
        set.insert(natgw_api::Object::FloatingIp(f));
    }
    let mut planner = GatewayPlanner::new(&set, "gw").expect("plan");
    for name in &names {
        assert!(planner.plan().programmed.contains(&ObjectRef::new(Kind::FloatingIp, name.as_str())), "{name}");
    }
    // The refs sort as their names do.
    let mut sorted = names.clone();
    sorted.sort();
    let refs: Vec<String> = planner
        .plan()
        .programmed
        .iter()
        .filter(|r| r.kind == Kind::FloatingIp && names.contains(&r.name.to_string()))
        .map(|r| r.name.to_string())
        .collect();
    assert_eq!(refs, sorted);
    // Removing the second leaves the first (one character apart) alone.
    let gone = ObjectRef::new(Kind::FloatingIp, names[1].as_str());
    set.remove(&gone);
    planner.update(&set, &[gone.clone()].into()).expect("update");
    assert_eq!(planner.plan(), &plan_gateway(&set, "gw").expect("plan"));
    assert!(!planner.plan().programmed.contains(&gone));
    assert!(planner.plan().programmed.contains(&ObjectRef::new(Kind::FloatingIp, names[0].as_str())));
    assert!(planner.plan().programmed.contains(&ObjectRef::new(Kind::FloatingIp, longest.as_str())));
}
