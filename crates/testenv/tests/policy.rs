//! Who may do what (items 15 and 16 of the hardening issue): the roles
//! and admission policies in deploy/ on a real kube-apiserver.

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use natgw_api::*;
use natgw_testenv::{TestEnv, apply_yaml, natgw_object};

async fn tenant(env: &TestEnv, admin: &Client, user: &str, eips: &[&str]) -> Client {
    let names = eips.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", ");
    let yaml = format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {user}-rules}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: natgw-rule-editor}}\n\
         subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {{name: {user}-eips}}\n\
         rules: [{{apiGroups: [natgw.io], resources: [eips], verbs: [use], resourceNames: [{names}]}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {user}-eips}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {user}-eips}}\n\
         subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}]\n"
    );
    apply_yaml(admin, &yaml).await.unwrap();
    env.client(&env.identity(user, &[]).unwrap()).await.unwrap()
}

fn fip(name: &str, eip: &str, ip: &str) -> FloatingIp {
    natgw_object("FloatingIp", name, serde_json::json!({"eip": eip, "internalIp": ip})).unwrap()
}

async fn network(admin: &Client) {
    let yaml = "apiVersion: natgw.io/v1alpha1\nkind: Vpc\nmetadata: {name: v}\nspec: {}\n---\n\
        apiVersion: natgw.io/v1alpha1\nkind: Subnet\nmetadata: {name: lan}\nspec: {vpc: v, cidr: 10.77.0.0/24, gateway: 10.77.0.1}\n---\n\
        apiVersion: natgw.io/v1alpha1\nkind: Subnet\nmetadata: {name: ext}\nspec: {cidr: 192.0.2.0/24, gateway: 192.0.2.1}\n---\n\
        apiVersion: natgw.io/v1alpha1\nkind: NatGateway\nmetadata: {name: gw}\nspec: {vpc: v, lanInterface: lan0, externalInterface: ext0, externalSubnet: ext}\n---\n\
        apiVersion: natgw.io/v1alpha1\nkind: Eip\nmetadata: {name: a-web}\nspec: {gateway: gw, ip: 192.0.2.10}\n---\n\
        apiVersion: natgw.io/v1alpha1\nkind: Eip\nmetadata: {name: b-web}\nspec: {gateway: gw, ip: 192.0.2.11}\n";
    apply_yaml(admin, yaml).await.unwrap();
}

#[tokio::test]
async fn item15_a_tenant_uses_only_its_own_eips_and_never_a_cluster_network() {
    let env = TestEnv::start().await.expect("control plane");
    let admin = env.install_natgw(&crds()).await.unwrap();
    network(&admin).await;
    let a = tenant(&env, &admin, "alice", &["a-web", "a-later"]).await;
    let b = tenant(&env, &admin, "bob", &["b-web"]).await;
    let (fa, fb): (Api<FloatingIp>, Api<FloatingIp>) = (Api::all(a.clone()), Api::all(b.clone()));
    let pp = PostParams::default();
    fa.create(&pp, &fip("alice-web", "a-web", "10.77.0.11")).await.expect("alice uses her Eip");
    // Bob can neither take Alice's Eip, nor squat the one she will create.
    for (name, eip) in [("bob-steals", "a-web"), ("bob-squats", "a-later")] {
        let err = fb.create(&pp, &fip(name, eip, "10.77.0.12")).await.unwrap_err().to_string();
        assert!(err.contains(&format!("you may not use Eip {eip}")), "{err}");
    }
    fb.create(&pp, &fip("bob-web", "b-web", "10.77.0.12")).await.expect("bob uses his");
    // Nor delete Alice's rule.
    let err = fb.delete("alice-web", &DeleteParams::default()).await.unwrap_err().to_string();
    assert!(err.contains("you may not use Eip a-web"), "{err}");
    // Targets inside the cluster's networks: the API server's ClusterIP,
    // a pod; and a SNAT of everything.
    let dnats: Api<DnatRule> = Api::all(a.clone());
    let to_api: DnatRule = natgw_object(
        "DnatRule",
        "to-apiserver",
        serde_json::json!({"eip": "a-web", "protocol": "tcp", "externalPort": 443, "internalIp": "10.96.0.1", "internalPort": 443}),
    )
    .unwrap();
    let err = dnats.create(&pp, &to_api).await.unwrap_err().to_string();
    assert!(err.contains("lies in a cluster network"), "{err}");
    let err = fa.create(&pp, &fip("to-pod", "a-web", "10.244.3.7")).await.unwrap_err().to_string();
    assert!(err.contains("lies in a cluster network"), "{err}");
    let everything: SnatRule =
        natgw_object("SnatRule", "everything", serde_json::json!({"eip": "a-web", "internalCidr": "0.0.0.0/0"}))
            .unwrap();
    let err = Api::<SnatRule>::all(a.clone()).create(&pp, &everything).await.unwrap_err().to_string();
    assert!(err.contains("overlaps a cluster network"), "{err}");
    // A tenant cannot create the network itself.
    let vpc: Vpc = natgw_object("Vpc", "mine", serde_json::json!({})).unwrap();
    assert!(Api::<Vpc>::all(a.clone()).create(&pp, &vpc).await.is_err(), "rule editors do not own VPCs");
    // Without the cluster networks configured, nothing is guessed: refused.
    let networks: Api<natgw_api::ClusterNetworks> = Api::all(admin.clone());
    networks.delete("natgw", &DeleteParams::default()).await.unwrap();
    let mut refused = false;
    for _ in 0..100 {
        if fa.create(&pp, &fip("alice-2", "a-web", "10.77.0.13")).await.is_err() {
            refused = true;
            break;
        }
        let _ = fa.delete("alice-2", &DeleteParams::default()).await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(refused, "without natgw-cluster-networks, rules are refused");
}

#[tokio::test]
async fn item16_the_gateway_agent_may_touch_only_its_finalizer_and_conditions() {
    let env = TestEnv::start().await.expect("control plane");
    let admin = env.install_natgw(&crds()).await.unwrap();
    network(&admin).await;
    let agent = env.natgw_client("natgw-gateway").await.unwrap();
    let eips: Api<Eip> = Api::all(agent.clone());
    let pp = PatchParams::default();
    // Its finalizer: allowed.
    let fin = serde_json::json!({"metadata": {"finalizers": [gateway_finalizer("gw")]}});
    eips.patch("a-web", &pp, &Patch::Merge(&fin)).await.expect("the finalizer");
    // A spec or a label: refused.
    let spec = serde_json::json!({"spec": {"ip": "192.0.2.99"}});
    let err = eips.patch("b-web", &pp, &Patch::Merge(&spec)).await.unwrap_err().to_string();
    assert!(err.contains("only its finalizer") || err.contains("immutable"), "{err}");
    let label = serde_json::json!({"metadata": {"labels": {"natgw.io/gateway": "other"}}});
    let dry = PatchParams { dry_run: true, ..Default::default() };
    let mut refused = String::new();
    // Policies take effect a moment after they are created.
    for _ in 0..100 {
        if let Err(e) = eips.patch("b-web", &dry, &Patch::Merge(&label)).await {
            refused = e.to_string();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(refused.contains("only its finalizer"), "{refused}");
    let err = eips.patch("b-web", &pp, &Patch::Merge(&label)).await.unwrap_err().to_string();
    assert!(err.contains("only its finalizer"), "{err}");
    // Its conditions: allowed; a forged status.ip: refused.
    let ssa = PatchParams::apply("natgw-gateway-gw").force();
    let ok = serde_json::json!({"apiVersion": "natgw.io/v1alpha1", "kind": "Eip", "status": {
        "conditions": [{"type": "Programmed", "status": "True", "reason": "InKernel", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    eips.patch_status("a-web", &ssa, &Patch::Apply(&ok)).await.expect("its own conditions");
    let forged = serde_json::json!({"apiVersion": "natgw.io/v1alpha1", "kind": "Eip", "status": {"ip": "192.0.2.200"}});
    let err = eips.patch_status("b-web", &ssa, &Patch::Apply(&forged)).await.unwrap_err().to_string();
    assert!(err.contains("only its Programmed, Conflict and Ready conditions"), "{err}");
    let bound = serde_json::json!({"apiVersion": "natgw.io/v1alpha1", "kind": "Eip", "status": {
        "conditions": [{"type": "AddressAssigned", "status": "True", "reason": "Claimed", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    let err = eips.patch_status("b-web", &ssa, &Patch::Apply(&bound)).await.unwrap_err().to_string();
    assert!(err.contains("only its Programmed"), "{err}");
    assert_eq!(Api::<Eip>::all(admin).get("b-web").await.unwrap().labels().get("natgw.io/gateway"), None);
}

/// An uninstall deletes the bindings; a reinstall creates them again. With
/// a ConfigMap as the parameter, the API server's shared ConfigMap
/// informer for policies stops with the last binding and never restarts,
/// and every natgw write was refused ("no params found") until the API
/// server restarted: found by `helm uninstall` then `helm install` on a
/// real cluster. The parameter is a natgw kind, which survives this.
#[tokio::test]
async fn the_cluster_networks_policy_survives_an_uninstall_and_reinstall() {
    let env = TestEnv::start().await.unwrap();
    let admin = env.install_natgw(&crds()).await.unwrap();
    let policy = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/policy.yaml")).unwrap();
    let networks = "apiVersion: natgw.io/v1alpha1\nkind: ClusterNetworks\nmetadata: {name: natgw}\nspec: {cidrs: [10.244.0.0/16]}\n";
    let gvk = |kind: &str| {
        kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind))
    };
    for _ in 0..2 {
        // Uninstall: the bindings, the policies and the parameter go.
        for kind in ["ValidatingAdmissionPolicyBinding", "ValidatingAdmissionPolicy"] {
            let api: Api<kube::api::DynamicObject> = Api::all_with(admin.clone(), &gvk(kind));
            for name in ["natgw-gateway-agent", "natgw-eip-use", "natgw-cluster-networks"] {
                api.delete(name, &DeleteParams::default()).await.unwrap();
            }
        }
        Api::<ClusterNetworks>::all(admin.clone()).delete("natgw", &DeleteParams::default()).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        // Reinstall, in the order helm uses (the parameter first).
        apply_yaml(&admin, networks).await.unwrap();
        apply_yaml(&admin, &policy).await.unwrap();
        let subnets: Api<Subnet> = Api::all(admin.clone());
        let pp = PostParams { dry_run: true, ..Default::default() };
        let ok: Subnet = natgw_object(
            "Subnet",
            "ok",
            serde_json::json!({"vpc": "v", "cidr": "10.77.0.0/24", "gateway": "10.77.0.1"}),
        )
        .unwrap();
        let bad: Subnet = natgw_object(
            "Subnet",
            "bad",
            serde_json::json!({"vpc": "v", "cidr": "10.244.1.0/24", "gateway": "10.244.1.1"}),
        )
        .unwrap();
        let mut last = String::new();
        let mut enforced = false;
        for _ in 0..100 {
            let allowed = subnets.create(&pp, &ok).await;
            let refused = subnets.create(&pp, &bad).await;
            last = format!("{:?} / {:?}", allowed.as_ref().err(), refused.as_ref().err());
            if allowed.is_ok() && refused.is_err_and(|e| e.to_string().contains("overlaps a cluster network")) {
                enforced = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(enforced, "after a reinstall the policy must allow and refuse as before: {last}");
    }
}
