//! The CRDs on a real kube-apiserver: they install, valid objects are
//! accepted, and the API server itself rejects bad ones naming the field.

use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::{Client, Resource};
use natgw_testenv::TestEnv;

async fn install_crds(client: &Client) {
    natgw_testenv::install_crds(client, &natgw_api::crds()).await.expect("CRDs");
}

/// Posts an object untyped, so that even values the Rust types cannot
/// hold reach the API server; its error text on failure.
async fn create<K>(client: &Client, yaml: &str) -> Result<DynamicObject, String>
where
    K: Resource<DynamicType = ()>,
{
    let ar = ApiResource::erase::<K>(&());
    let obj: DynamicObject = serde_json::from_value(serde_saphyr_value(yaml)).map_err(|e| format!("test YAML: {e}"))?;
    Api::<DynamicObject>::all_with(client.clone(), &ar)
        .create(&PostParams::default(), &obj)
        .await
        .map_err(|e| e.to_string())
}

/// The natgw loader would reject some of these inputs; build objects
/// straight from JSON so the API server is the one that judges.
fn serde_saphyr_value(yaml: &str) -> serde_json::Value {
    let mut v = serde_json::Map::new();
    for line in yaml.lines().filter(|l| !l.trim().is_empty()) {
        let (k, val) = line.split_once(':').expect("key: value");
        v.insert(
            k.trim().into(),
            serde_json::from_str(val.trim()).unwrap_or_else(|_| serde_json::Value::String(val.trim().into())),
        );
    }
    v.into()
}

#[tokio::test]
async fn crds_install_and_the_api_server_validates_fields() {
    let env = TestEnv::start().await.expect("control plane");
    let admin = env.admin().await.unwrap();
    install_crds(&admin).await;

    use natgw_api::*;
    let obj = |kind: &str, name: &str, spec: &str| {
        format!(
            "apiVersion: \"natgw.io/v1alpha1\"\nkind: \"{kind}\"\nmetadata: {{\"name\": \"{name}\"}}\nspec: {spec}\n"
        )
    };
    create::<Vpc>(&admin, &obj("Vpc", "v", "{}")).await.unwrap();
    create::<Subnet>(&admin, &obj("Subnet", "lan", r#"{"vpc": "v", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"}"#))
        .await
        .unwrap();
    create::<Subnet>(&admin, &obj("Subnet", "ext", r#"{"cidr": "192.0.2.0/24", "gateway": "192.0.2.1"}"#))
        .await
        .unwrap();
    let gw = r#"{"vpc": "v", "lanInterface": "eth0", "externalInterface": "net1", "externalSubnet": "ext"}"#;
    create::<NatGateway>(&admin, &obj("NatGateway", "gw", gw)).await.unwrap();
    create::<Eip>(&admin, &obj("Eip", "e", r#"{"gateway": "gw", "ip": "192.0.2.10"}"#)).await.unwrap();
    create::<FloatingIp>(&admin, &obj("FloatingIp", "f", r#"{"eip": "e", "internalIp": "10.0.0.5"}"#)).await.unwrap();

    let rejected = [
        (create::<Subnet>(&admin, &obj("Subnet", "b1", r#"{"cidr": "10.1.0.0/24", "gateway": "10.2.0.1"}"#)).await.err(), "spec.gateway must lie inside spec.cidr"),
        (create::<Subnet>(&admin, &obj("Subnet", "b2", r#"{"cidr": "10.1.0.5/24", "gateway": "10.1.0.1"}"#)).await.err(), "spec.cidr has host bits set"),
        (create::<SnatRule>(&admin, &obj("SnatRule", "b3", r#"{"eip": "e", "internalCidr": "10.0.0.7/24"}"#)).await.err(), "spec.internalCidr has host bits set"),
        (
            create::<DnatRule>(&admin, &obj("DnatRule", "b4", r#"{"eip": "e", "protocol": "tcp", "externalPort": 0, "internalIp": "10.0.0.5", "internalPort": 80}"#)).await.err(),
            "spec.externalPort and spec.internalPort must be between 1 and 65535",
        ),
        (
            create::<NatGateway>(&admin, &obj("NatGateway", "b5", r#"{"vpc": "v", "lanInterface": "eth0", "externalInterface": "eth0", "externalSubnet": "ext"}"#)).await.err(),
            "spec.externalInterface must differ from spec.lanInterface",
        ),
    ];
    for (err, want) in rejected {
        let err = err.unwrap_or_else(|| panic!("accepted; wanted {want:?}"));
        assert!(err.contains(want), "want {want:?} in {err}");
    }
    // Syntax comes from the schema: formats and patterns name the field.
    let bad_ip = create::<FloatingIp>(&admin, &obj("FloatingIp", "b6", r#"{"eip": "e", "internalIp": "10.0.0.300"}"#))
        .await
        .unwrap_err();
    assert!(bad_ip.contains("spec.internalIp"), "{bad_ip}");
    let bad_if = create::<NatGateway>(
        &admin,
        &obj(
            "NatGateway",
            "b7",
            r#"{"vpc": "v", "lanInterface": "a/b", "externalInterface": "net1", "externalSubnet": "ext"}"#,
        ),
    )
    .await
    .unwrap_err();
    assert!(bad_if.contains("spec.lanInterface"), "{bad_if}");

    // Transition rules: what must not change after creation.
    let eips: Api<Eip> = Api::all(admin.clone());
    let mut e = eips.get("e").await.unwrap();
    e.spec.gateway = "other".into();
    let err = eips.replace("e", &PostParams::default(), &e).await.unwrap_err().to_string();
    assert!(err.contains("spec.gateway is immutable"), "{err}");
    let mut e = eips.get("e").await.unwrap();
    e.spec.ip = Some("192.0.2.11".parse().unwrap());
    let err = eips.replace("e", &PostParams::default(), &e).await.unwrap_err().to_string();
    assert!(err.contains("spec.ip is immutable once set"), "{err}");
}

#[tokio::test]
async fn rbac_is_enforced_for_service_accounts() {
    let env = TestEnv::start().await.expect("control plane");
    let admin = env.admin().await.unwrap();
    install_crds(&admin).await;
    let nobody = env.client(&env.service_account("natgw-system", "nobody").unwrap()).await.unwrap();
    let err = Api::<natgw_api::Eip>::all(nobody).list(&Default::default()).await.unwrap_err().to_string();
    assert!(err.contains("forbidden") || err.contains("Forbidden"), "{err}");
    assert!(err.contains("system:serviceaccount:natgw-system:nobody"), "{err}");
}

/// Items 7, 9, 10, 15 and 18 of the hardening issue: what the API server
/// itself refuses, so that no object natgw cannot decode or must not
/// program gets stored.
#[tokio::test]
async fn item7_9_10_18_the_api_server_refuses_odd_but_valid_looking_input() {
    use natgw_api::*;
    let env = TestEnv::start().await.expect("control plane");
    let admin = env.admin().await.unwrap();
    install_crds(&admin).await;
    let obj = |kind: &str, name: &str, spec: &str| {
        format!(
            "apiVersion: \"natgw.io/v1alpha1\"\nkind: \"{kind}\"\nmetadata: {{\"name\": \"{name}\"}}\nspec: {spec}\n"
        )
    };
    let gw = |name: &str, extra: &str| {
        obj(
            "NatGateway",
            name,
            &format!(
                r#"{{"vpc": "v", "lanInterface": "eth0", "externalInterface": "net1", "externalSubnet": "ext"{extra}}}"#
            ),
        )
    };
    // Accepted first: the same objects written canonically.
    create::<Eip>(&admin, &obj("Eip", "ok", r#"{"gateway": "gw", "ip": "192.0.2.10"}"#)).await.unwrap();
    // A range whose ends compare the other way as text (9 > 200).
    let range = r#"{"cidr": "10.1.0.0/24", "gateway": "10.1.0.1", "excludeIps": ["10.1.0.9..10.1.0.200", "10.1.0.7..10.1.0.7"]}"#;
    create::<Subnet>(&admin, &obj("Subnet", "ok", range)).await.unwrap();
    let fenced = r#"{"gateway": "gw", "ip": "192.0.2.13", "internalCidrs": ["10.0.1.0/24", "10.0.9.7/32"]}"#;
    create::<Eip>(&admin, &obj("Eip", "fenced", fenced)).await.unwrap();
    create::<NatGateway>(
        &admin,
        &gw(&"g".repeat(63), r#", "routes": [{"cidr": "10.9.0.0/16", "nextHop": "10.0.0.254"}]"#),
    )
    .await
    .unwrap();
    let cases: Vec<(Result<DynamicObject, String>, &str)> = vec![
        // Item 7: forms `format: ipv4` accepts but Rust refuses.
        (create::<Eip>(&admin, &obj("Eip", "b1", r#"{"gateway": "gw", "ip": "010.0.0.5"}"#)).await, "spec.ip"),
        (
            create::<FloatingIp>(&admin, &obj("FloatingIp", "b2", r#"{"eip": "e", "internalIp": "::ffff:10.0.0.5"}"#))
                .await,
            "spec.internalIp",
        ),
        (
            create::<SnatRule>(&admin, &obj("SnatRule", "b3", r#"{"eip": "e", "internalCidr": "010.0.0.0/24"}"#)).await,
            "spec.internalCidr",
        ),
        (
            create::<Subnet>(&admin, &obj("Subnet", "b4", r#"{"cidr": "10.1.0.0/24", "gateway": "10.1.0.01"}"#)).await,
            "spec.gateway",
        ),
        // Item 9: excludeIps in one grammar: IPs and A..B ranges, inside the CIDR.
        (
            create::<Subnet>(
                &admin,
                &obj(
                    "Subnet",
                    "b5",
                    r#"{"cidr": "10.1.0.0/24", "gateway": "10.1.0.1", "excludeIps": ["10.1.0.5-10.1.0.9"]}"#,
                ),
            )
            .await,
            "spec.excludeIps",
        ),
        (
            create::<Subnet>(
                &admin,
                &obj(
                    "Subnet",
                    "b6",
                    r#"{"cidr": "10.1.0.0/24", "gateway": "10.1.0.1", "excludeIps": ["10.1.0.0/28"]}"#,
                ),
            )
            .await,
            "spec.excludeIps",
        ),
        (
            create::<Subnet>(
                &admin,
                &obj("Subnet", "b7", r#"{"cidr": "10.1.0.0/24", "gateway": "10.1.0.1", "excludeIps": ["10.2.0.5"]}"#),
            )
            .await,
            "every address must lie inside spec.cidr",
        ),
        // Second round, item 19: a reversed range.
        (
            create::<Subnet>(
                &admin,
                &obj(
                    "Subnet",
                    "b14",
                    r#"{"cidr": "10.1.0.0/24", "gateway": "10.1.0.1", "excludeIps": ["10.1.0.20..10.1.0.3"]}"#,
                ),
            )
            .await,
            "must not end before it starts",
        ),
        // Second round, item 3: an Eip's internal networks, canonical.
        (
            create::<Eip>(&admin, &obj("Eip", "b17", r#"{"gateway": "gw", "internalCidrs": ["10.0.1.1/24"]}"#)).await,
            "spec.internalCidrs",
        ),
        // Second round, item 15: a gateway name that cannot be a label value.
        (create::<Eip>(&admin, &obj("Eip", "b15", r#"{"gateway": "gw/1", "ip": "192.0.2.11"}"#)).await, "spec.gateway"),
        (create::<Eip>(&admin, &obj("Eip", "b16", r#"{"gateway": "-gw", "ip": "192.0.2.12"}"#)).await, "spec.gateway"),
        // Item 10: routes as standalone checks them.
        (
            create::<NatGateway>(
                &admin,
                &gw("b8", r#", "routes": [{"cidr": "10.9.0.1/16", "nextHop": "10.0.0.254"}]"#),
            )
            .await,
            "cidr has host bits set",
        ),
        (
            create::<NatGateway>(&admin, &gw("b9", r#", "routes": [{"cidr": "10.9.0.0/16", "nextHop": "127.0.0.1"}]"#))
                .await,
            "nextHop",
        ),
        (
            create::<NatGateway>(
                &admin,
                &gw("b10", r#", "routes": [{"cidr": "10.9.0.0/16", "nextHop": "224.0.0.5"}]"#),
            )
            .await,
            "nextHop",
        ),
        (
            create::<NatGateway>(
                &admin,
                &gw("b11", r#", "routes": [{"cidr": "10.9.0.0/16", "nextHop": "255.255.255.255"}]"#),
            )
            .await,
            "nextHop",
        ),
        // Item 8: a gateway name longer than a label value.
        (create::<NatGateway>(&admin, &gw(&"g".repeat(64), "")).await, "at most 63 characters"),
        // Item 15: a link-local target (a metadata service).
        (
            create::<FloatingIp>(&admin, &obj("FloatingIp", "b12", r#"{"eip": "e", "internalIp": "169.254.169.254"}"#))
                .await,
            "spec.internalIp",
        ),
    ];
    for (i, (result, want)) in cases.into_iter().enumerate() {
        let err = result.err().unwrap_or_else(|| panic!("case {i} accepted; wanted {want:?}"));
        assert!(err.contains(want), "case {i}: want {want:?} in {err}");
    }
    // Item 18: wildcard characters in interface names.
    let wild = obj(
        "NatGateway",
        "b13",
        r#"{"vpc": "v", "lanInterface": "eth*", "externalInterface": "net1", "externalSubnet": "ext"}"#,
    );
    let err = create::<NatGateway>(&admin, &wild).await.unwrap_err();
    assert!(err.contains("spec.lanInterface"), "{err}");
    // Second round, item 19: status.ip is held to spec.ip's form; the
    // API server's format alone let in what natgw cannot read.
    let eips: kube::Api<Eip> = kube::Api::all(admin.clone());
    let odd = serde_json::json!({"status": {"ip": "010.0.0.5"}});
    let pp = kube::api::PatchParams::default();
    let err = eips.patch_status("ok", &pp, &kube::api::Patch::Merge(&odd)).await.unwrap_err().to_string();
    assert!(err.contains("status.ip"), "{err}");
    let fine = serde_json::json!({"status": {"ip": "192.0.2.10"}});
    eips.patch_status("ok", &pp, &kube::api::Patch::Merge(&fine)).await.expect("a canonical status.ip");
    // So is a condition's time: the API server's date-time parser takes
    // `2026-12-07T10:00` (no seconds, no offset), natgw's does not.
    let condition = |time: &str| {
        serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "R",
            "message": "", "lastTransitionTime": time}]}})
    };
    let err = eips.patch_status("ok", &pp, &kube::api::Patch::Merge(&condition("2026-12-07T10:00"))).await;
    let err = err.unwrap_err().to_string();
    assert!(err.contains("lastTransitionTime"), "{err}");
    for time in ["2026-12-07T10:00:00Z", "2026-12-07T10:00:00.5+01:00"] {
        eips.patch_status("ok", &pp, &kube::api::Patch::Merge(&condition(time))).await.expect(time);
        let back = eips.get("ok").await.expect("natgw reads the time back");
        assert_eq!(back.status.unwrap().common.conditions.len(), 1);
    }
}
