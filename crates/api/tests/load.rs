//! Manifest loading and validation messages.

use std::path::Path;

use natgw_api::{LoadError, load_str};

fn err(text: &str) -> String {
    match load_str(Path::new("m.yaml"), text) {
        Ok(_) => panic!("accepted: {text}"),
        Err(e) => e.to_string(),
    }
}

const VPC: &str = "apiVersion: natgw.io/v1alpha1\nkind: Vpc\nmetadata: {name: v}\n---\n";

#[test]
fn valid_documents_load() {
    let (set, sources) = load_str(
        Path::new("m.yaml"),
        &format!("{VPC}apiVersion: natgw.io/v1alpha1\nkind: Subnet\nmetadata: {{name: s}}\nspec: {{vpc: v, cidr: 10.0.0.0/24, gateway: 10.0.0.1, excludeIps: [10.0.0.2, 10.0.0.10..10.0.0.20]}}\n"),
    )
    .unwrap();
    assert_eq!(set.len(), 2);
    assert_eq!(sources.values().map(|s| s.document).collect::<Vec<_>>(), [2, 1]);
}

#[test]
fn errors_name_the_field() {
    let subnet =
        |spec: &str| format!("{VPC}apiVersion: natgw.io/v1alpha1\nkind: Subnet\nmetadata: {{name: s}}\nspec: {spec}\n");
    let cases = [
        (subnet("{vpc: v, cidr: 10.0.0.0/24, gateway: 10.0.1.1}"), "Subnet/s: spec.gateway: 10.0.1.1 is outside spec.cidr"),
        (subnet("{vpc: v, cidr: 10.0.0.0/24, gateway: 10.0.0.1, excludeIps: [10.0.0.9..10.0.0.3]}"), "spec.excludeIps[0]: range"),
        (subnet("{vpc: v, cidr: 10.0.0.0/24, gateway: 10.0.0.1, excludeIps: [nope]}"), "spec.excludeIps[0]: \"nope\" is not an IPv4 address"),
        (subnet("{vpc: v, cidr: 10.0.0.0/24}"), "missing field `gateway`"),
        (subnet("{vpc: nope, cidr: 10.0.0.0/24, gateway: 10.0.0.1}"), "Subnet/s: spec.vpc: Vpc \"nope\" does not exist"),
        (format!("{VPC}apiVersion: natgw.io/v1alpha1\nkind: Vpc\nmetadata: {{name: Bad_Name}}\n"), "metadata.name"),
        (format!("{VPC}apiVersion: natgw.io/v1\nkind: Vpc\nmetadata: {{name: x}}\n"), "apiVersion is \"natgw.io/v1\""),
        (
            "apiVersion: natgw.io/v1alpha1\nkind: NatGateway\nmetadata: {name: g}\nspec: {vpc: v, lanInterface: eth0, externalInterface: a/b, externalSubnet: e}\n".into(),
            "spec.externalInterface: \"a/b\" is not a valid interface name",
        ),
        (
            "apiVersion: natgw.io/v1alpha1\nkind: NatGateway\nmetadata: {name: g}\nspec: {vpc: v, lanInterface: eth0, externalInterface: net1, externalSubnet: e, routes: [{cidr: 10.0.0.0/8, via: 10.0.0.1}]}\n".into(),
            "spec.routes[0].via: unknown field",
        ),
        // Item 18: what nft would read as a wildcard, refused as in the CRD.
        (
            "apiVersion: natgw.io/v1alpha1\nkind: NatGateway\nmetadata: {name: g}\nspec: {vpc: v, lanInterface: \"eth*\", externalInterface: net1, externalSubnet: e}\n".into(),
            "spec.lanInterface: \"eth*\" is not a valid interface name",
        ),
        // Item 9: excludeIps in the CRD's grammar, with messages that say how.
        (subnet("{vpc: v, cidr: 10.0.0.0/24, gateway: 10.0.0.1, excludeIps: [10.0.0.0/28]}"), "is a CIDR; write the addresses as a range A..B"),
        (subnet("{vpc: v, cidr: 10.0.0.0/24, gateway: 10.0.0.1, excludeIps: [10.0.0.2-10.0.0.9]}"), "a range is written A..B"),
        // Item 8: a gateway name longer than a label value.
        (
            format!("apiVersion: natgw.io/v1alpha1\nkind: NatGateway\nmetadata: {{name: {}}}\nspec: {{vpc: v, lanInterface: eth0, externalInterface: net1, externalSubnet: e}}\n", "g".repeat(64)),
            "at most 63 characters",
        ),
        // HA: more replicas than supported, or two without the address
        // they move.
        (
            "apiVersion: natgw.io/v1alpha1\nkind: NatGateway\nmetadata: {name: g}\nspec: {vpc: v, lanInterface: eth0, externalInterface: net1, externalSubnet: e, lanIp: 10.0.0.1, replicas: 3}\n".into(),
            "spec.replicas: 3 is not supported: 1, or 2",
        ),
        (
            "apiVersion: natgw.io/v1alpha1\nkind: NatGateway\nmetadata: {name: g}\nspec: {vpc: v, lanInterface: eth0, externalInterface: net1, externalSubnet: e, replicas: 2}\n".into(),
            "spec.lanIp: required with spec.replicas 2",
        ),
    ];
    for (text, want) in cases {
        let got = err(&text);
        assert!(got.contains(want), "want {want:?} in {got:?}");
        assert!(got.contains("m.yaml"), "no file name in {got:?}");
    }
}

#[test]
fn duplicates_name_both_places() {
    let e = err(&format!("{VPC}{VPC}"));
    assert!(e.contains("Vpc/v is defined twice"), "{e}");
}

#[test]
fn every_error_is_reported_not_only_the_first() {
    let bad = "apiVersion: natgw.io/v1alpha1\nkind: Eip\nmetadata: {name: e1}\nspec: {gateway: g}\n---\napiVersion: natgw.io/v1alpha1\nkind: Eip\nmetadata: {name: e2}\nspec: {gateway: g}\n";
    match load_str(Path::new("m.yaml"), bad) {
        Err(LoadError::Many(v)) => assert_eq!(v.len(), 2),
        other => panic!("{other:?}"),
    }
}

/// Item 20: a file of 20,000 objects loads (the YAML parser's default
/// budget stopped at 1,024 documents); the bound that protects memory is
/// the file size, and it is said clearly.
#[test]
fn item20_a_file_of_twenty_thousand_objects_loads_and_a_huge_one_is_refused_clearly() {
    let mut text = String::from(
        "apiVersion: natgw.io/v1alpha1\nkind: Vpc\nmetadata: {name: v}\n---\n\
         apiVersion: natgw.io/v1alpha1\nkind: Subnet\nmetadata: {name: lan}\nspec: {vpc: v, cidr: 10.0.0.0/8, gateway: 10.0.0.1}\n---\n\
         apiVersion: natgw.io/v1alpha1\nkind: Subnet\nmetadata: {name: ext}\nspec: {cidr: 100.64.0.0/10, gateway: 100.64.0.1}\n---\n\
         apiVersion: natgw.io/v1alpha1\nkind: NatGateway\nmetadata: {name: gw}\nspec: {vpc: v, lanInterface: lan0, externalInterface: ext0, externalSubnet: ext}\n",
    );
    for i in 0..10_000u32 {
        let (a, b) = (i / 250, i % 250 + 2);
        text.push_str(&format!(
            "---\napiVersion: natgw.io/v1alpha1\nkind: Eip\nmetadata: {{name: e{i}}}\nspec: {{gateway: gw, ip: 100.64.{a}.{b}}}\n\
             ---\napiVersion: natgw.io/v1alpha1\nkind: FloatingIp\nmetadata: {{name: f{i}}}\nspec: {{eip: e{i}, internalIp: 10.1.{a}.{b}}}\n"
        ));
    }
    let (set, _) = load_str(Path::new("big.yaml"), &text).expect("20,000 objects load");
    assert_eq!(set.eips.len() + set.floating_ips.len(), 20_000);
    let huge = "#".repeat(natgw_api::MAX_FILE_BYTES + 1);
    let e = err(&huge);
    assert!(e.contains("at most") && e.contains("split it"), "{e}");
}

/// What `kubectl get vpcs,subnets,natgateways,eips,... -o yaml` prints: a
/// `v1` List whose items carry the server's metadata and status; an
/// allocated address lives in `status.ip` only.
const KUBECTL_LIST: &str = r#"apiVersion: v1
kind: List
metadata:
  resourceVersion: ""
items:
- apiVersion: natgw.io/v1alpha1
  kind: Vpc
  metadata:
    creationTimestamp: "2026-12-07T10:00:00Z"
    finalizers: [natgw.io/controller]
    generation: 1
    managedFields:
    - apiVersion: natgw.io/v1alpha1
      fieldsType: FieldsV1
      fieldsV1: {f:spec: {}}
      manager: kubectl
      operation: Update
      time: "2026-12-07T10:00:00Z"
    name: v
    resourceVersion: "812"
    uid: 6a1e8b36-3f0c-4d49-9c55-0d4b8f1e2a11
  spec: {}
  status:
    conditions:
    - {lastTransitionTime: "2026-12-07T10:00:01Z", message: "", observedGeneration: 1, reason: Members, status: "True", type: Ready}
- apiVersion: natgw.io/v1alpha1
  kind: Subnet
  metadata: {name: ext, uid: 7c1d2e3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f, resourceVersion: "813"}
  spec: {cidr: 192.0.2.0/24, gateway: 192.0.2.1}
- apiVersion: natgw.io/v1alpha1
  kind: NatGateway
  metadata: {name: gw, generation: 2}
  spec: {vpc: v, lanInterface: lan0, externalInterface: ext0, externalSubnet: ext}
  status:
    conditions:
    - {lastTransitionTime: "2026-12-07T10:00:03Z", message: "1/1 ready", reason: PodReady, status: "True", type: WorkloadReady}
- apiVersion: natgw.io/v1alpha1
  kind: Eip
  metadata:
    labels: {natgw.io/gateway: gw}
    name: web
    uid: 0b4f2d7e-5c4a-4b8e-8f3e-2d9c6b1a7e55
  spec: {gateway: gw}
  status:
    ip: 192.0.2.23
    usedBy: fip
    conditions:
    - {lastTransitionTime: "2026-12-07T10:00:02Z", message: "", reason: Claimed, status: "True", type: AddressAssigned}
"#;

#[test]
fn round2_item20_kubectls_list_output_loads_with_allocated_addresses_from_status() {
    let (set, sources) = load_str(Path::new("list.yaml"), KUBECTL_LIST).expect("kubectl's List loads");
    assert_eq!(set.len(), 4);
    let web = set.eips.get("web").expect("the Eip");
    assert_eq!(web.address(), Some("192.0.2.23".parse().unwrap()), "the address comes from status.ip");
    assert!(sources.values().all(|s| s.document == 1), "items are reported as their List's document");
    // The same List as JSON (`-o json`).
    let value: serde_json::Value = serde_saphyr::from_str(KUBECTL_LIST).unwrap();
    let (set, _) = load_str(Path::new("list.json"), &serde_json::to_string_pretty(&value).unwrap()).unwrap();
    assert_eq!(set.eips.get("web").and_then(|e| e.address()), Some("192.0.2.23".parse().unwrap()));
    // A bad item still names its field.
    let bad = KUBECTL_LIST.replace("spec: {gateway: gw}", "spec: {gateway: gw, ipp: 192.0.2.9}");
    assert!(err(&bad).contains("Eip/web: spec.ipp: unknown field"), "{}", err(&bad));
    // Any other v1 kind is still refused by name.
    assert!(err("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n").contains("apiVersion is \"v1\""));
}
