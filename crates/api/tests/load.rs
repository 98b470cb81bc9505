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
