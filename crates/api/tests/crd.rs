//! deploy/crds.yaml must be what the types generate.

#[test]
fn committed_crds_are_up_to_date() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/crds.yaml");
    let committed = std::fs::read_to_string(path).expect("deploy/crds.yaml");
    let generated = natgw_api::crds_yaml().expect("render CRDs");
    assert!(committed == generated, "deploy/crds.yaml is stale: run scripts/render and commit it");
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../../charts/natgw/crds/natgw.io.yaml");
    let in_chart = std::fs::read_to_string(chart).expect("charts/natgw/crds/natgw.io.yaml");
    assert!(in_chart == generated, "the chart's CRDs are stale: run scripts/render and commit them");
}

#[test]
fn every_kind_has_a_short_name_and_printer_columns() {
    for crd in natgw_api::crds() {
        let names = &crd.spec.names;
        // The policy's parameter: one object, no status.
        if names.kind == "ClusterNetworks" {
            continue;
        }
        assert!(names.short_names.as_ref().is_some_and(|s| !s.is_empty()), "{} lacks a short name", names.kind);
        let v = &crd.spec.versions[0];
        assert_eq!(crd.spec.scope, "Cluster");
        assert!(
            v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(),
            "{} lacks a status subresource",
            names.kind
        );
        if names.kind != "Vpc" {
            assert!(
                v.additional_printer_columns.as_ref().is_some_and(|c| c.len() >= 2),
                "{} lacks printer columns",
                names.kind
            );
        }
    }
}
