//! Who may do what (items 15 and 16 of the hardening issue): the roles
//! and admission policies in deploy/ on a real kube-apiserver.

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use natgw_api::*;
use natgw_testenv::{NATGW_NAMESPACE, TestEnv, apply_yaml, natgw_object};

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

/// A tenant with the same role (bob) may not rewrite another tenant's
/// rule: not its spec (pointing alice's public port anywhere in the VPC),
/// nor its labels, annotations or finalizers. Alice's own edit works, and
/// natgw's controller and gateway agent still write their finalizers.
#[tokio::test]
async fn round2_item2_a_tenant_cannot_rewrite_another_tenants_rule() {
    let env = TestEnv::start().await.expect("control plane");
    let admin = env.install_natgw(&crds()).await.unwrap();
    network(&admin).await;
    let a = tenant(&env, &admin, "alice", &["a-web"]).await;
    let b = tenant(&env, &admin, "bob", &["b-web"]).await;
    let web: DnatRule = natgw_object(
        "DnatRule",
        "alice-web",
        serde_json::json!({"eip": "a-web", "protocol": "tcp", "externalPort": 443, "internalIp": "10.77.0.11", "internalPort": 8443}),
    )
    .unwrap();
    Api::<DnatRule>::all(a.clone()).create(&PostParams::default(), &web).await.expect("alice writes her rule");
    let (da, db): (Api<DnatRule>, Api<DnatRule>) = (Api::all(a.clone()), Api::all(b.clone()));
    let pp = PatchParams::default();
    let edits = [
        ("spec", serde_json::json!({"spec": {"internalIp": "10.77.0.99", "internalPort": 22}})),
        ("labels", serde_json::json!({"metadata": {"labels": {"owner": "bob"}}})),
        ("annotations", serde_json::json!({"metadata": {"annotations": {"note": "bob was here"}}})),
        ("finalizers", serde_json::json!({"metadata": {"finalizers": ["example.com/hold"]}})),
    ];
    for (what, patch) in &edits {
        let err = db.patch("alice-web", &pp, &Patch::Merge(patch)).await.expect_err(what).to_string();
        assert!(err.contains("you may not use Eip a-web"), "bob's {what} patch: {err}");
    }
    // Bob's edits left no trace.
    let now = da.get("alice-web").await.unwrap();
    assert_eq!(now.spec.internal_port, 8443);
    assert!(now.labels().get("owner").is_none() && now.annotations().get("note").is_none());
    assert!(now.finalizers().is_empty());
    // Alice edits her own rule.
    for (what, patch) in &edits[..3] {
        da.patch("alice-web", &pp, &Patch::Merge(patch)).await.unwrap_or_else(|e| panic!("alice's {what}: {e}"));
    }
    assert_eq!(da.get("alice-web").await.unwrap().spec.internal_port, 22);
    // natgw's own identities add their finalizers without `use`.
    let gateway = natgw_kube_support::identity::account("gw");
    natgw_kube_support::identity::apply(&admin, "gw", "uid-of-gw", NATGW_NAMESPACE).await.unwrap();
    let label = serde_json::json!({"metadata": {"labels": {"natgw.io/gateway": "gw"}}});
    Api::<DnatRule>::all(admin.clone()).patch("alice-web", &pp, &Patch::Merge(&label)).await.unwrap();
    for (account, finalizer) in
        [("natgw-controller", CONTROLLER_FINALIZER.to_string()), (gateway.as_str(), gateway_finalizer("gw"))]
    {
        let api: Api<DnatRule> = Api::all(env.natgw_client(account).await.unwrap());
        let mut finalizers = api.get("alice-web").await.unwrap().finalizers().to_vec();
        finalizers.push(finalizer);
        let body = serde_json::json!({"metadata": {"finalizers": finalizers}});
        api.patch("alice-web", &pp, &Patch::Merge(&body)).await.unwrap_or_else(|e| panic!("{account}: {e}"));
    }
}

/// Waits for `attempt` to be refused with `want` in the message (a new
/// policy or binding takes effect a moment after it is created); the
/// last message otherwise.
async fn refused<F: std::future::Future<Output = Result<(), kube::Error>>>(
    want: &str,
    mut attempt: impl FnMut() -> F,
) -> String {
    let mut last = String::from("accepted");
    for _ in 0..100 {
        match attempt().await {
            Err(e) if e.to_string().contains(want) => return e.to_string(),
            Err(e) => last = e.to_string(),
            Ok(()) => last = "accepted".into(),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("wanted a refusal with {want:?}; last: {last}");
}

/// Second round, item 4 (and the first round's item 16): each gateway's
/// agent runs as its own account, bound as the controller binds it, and
/// may add and remove its finalizer and write its own conditions on its
/// own gateway's Eips and rules, nothing else: no spec, label, owner
/// reference or other finalizer, no other gateway's objects, no write on
/// Vpcs, Subnets or NatGateways.
#[tokio::test]
async fn round2_item4_a_gateway_agent_may_touch_only_its_own_finalizer_and_conditions() {
    let env = TestEnv::start().await.expect("control plane");
    let admin = env.install_natgw(&crds()).await.unwrap();
    network(&admin).await;
    // The controller's part: gateway labels, its finalizer, the identity.
    let all: Api<Eip> = Api::all(admin.clone());
    for (eip, gw) in [("a-web", "gw"), ("b-web", "gw2")] {
        let body =
            serde_json::json!({"metadata": {"labels": {"natgw.io/gateway": gw}, "finalizers": [CONTROLLER_FINALIZER]}});
        all.patch(eip, &PatchParams::default(), &Patch::Merge(&body)).await.unwrap();
    }
    natgw_kube_support::identity::apply(&admin, "gw", "uid-of-gw", NATGW_NAMESPACE).await.unwrap();
    let agent = env.natgw_client(&natgw_kube_support::identity::account("gw")).await.unwrap();
    let eips: Api<Eip> = Api::all(agent.clone());
    let pp = PatchParams::default();
    let merge = |eip: &'static str, body: serde_json::Value| {
        let eips = eips.clone();
        move || {
            let (eips, body) = (eips.clone(), body.clone());
            async move { eips.patch(eip, &PatchParams::default(), &Patch::Merge(&body)).await.map(|_| ()) }
        }
    };
    // Its finalizer, on its own Eip: allowed (once the binding is in force).
    let mine = serde_json::json!({"metadata": {"finalizers": [CONTROLLER_FINALIZER, gateway_finalizer("gw")]}});
    let mut written = Err(String::new());
    for _ in 0..100 {
        written = eips.patch("a-web", &pp, &Patch::Merge(&mine)).await.map(|_| ()).map_err(|e| e.to_string());
        if written.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    written.expect("its own finalizer");
    // Its own Eip, anything but the finalizer: refused.
    let own = "the gateway agent may change only its finalizer";
    refused(own, merge("a-web", serde_json::json!({"metadata": {"labels": {"x": "y"}}}))).await;
    refused(own, merge("a-web", serde_json::json!({"metadata": {"annotations": {"x": "y"}}}))).await;
    let owner = serde_json::json!({"metadata": {"ownerReferences": [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "doomed", "uid": "0c5c7a4e-0000-4000-8000-000000000001"}]}});
    refused(own, merge("a-web", owner)).await;
    let stripped = serde_json::json!({"metadata": {"finalizers": [gateway_finalizer("gw")]}});
    refused(own, merge("a-web", stripped)).await;
    let spec = serde_json::json!({"spec": {"ip": "192.0.2.99"}});
    let err = eips.patch("a-web", &pp, &Patch::Merge(&spec)).await.unwrap_err().to_string();
    assert!(err.contains(own) || err.contains("immutable"), "{err}");
    // Another gateway's Eip: refused, finalizer and conditions alike.
    let theirs = "gateway gw may write only its own objects";
    let other = serde_json::json!({"metadata": {"finalizers": [CONTROLLER_FINALIZER, gateway_finalizer("gw")]}});
    refused(theirs, merge("b-web", other)).await;
    refused(theirs, merge("a-web", serde_json::json!({"metadata": {"labels": {"natgw.io/gateway": "gw2"}}}))).await;
    let ssa = PatchParams::apply("natgw-gateway-gw").force();
    let ready = serde_json::json!({"apiVersion": "natgw.io/v1alpha1", "kind": "Eip", "status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "InKernel", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    let err = eips.patch_status("b-web", &ssa, &Patch::Apply(&ready)).await.unwrap_err().to_string();
    assert!(err.contains(theirs), "{err}");
    // Its own conditions: allowed; a forged status.ip or another writer's
    // condition: refused.
    eips.patch_status("a-web", &ssa, &Patch::Apply(&ready)).await.expect("its own conditions");
    let forged = serde_json::json!({"apiVersion": "natgw.io/v1alpha1", "kind": "Eip", "status": {"ip": "192.0.2.200"}});
    let err = eips.patch_status("a-web", &ssa, &Patch::Apply(&forged)).await.unwrap_err().to_string();
    assert!(err.contains("only its Programmed, Conflict and Ready conditions"), "{err}");
    let bound = serde_json::json!({"apiVersion": "natgw.io/v1alpha1", "kind": "Eip", "status": {
        "conditions": [{"type": "AddressAssigned", "status": "True", "reason": "Claimed", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    let err = eips.patch_status("a-web", &ssa, &Patch::Apply(&bound)).await.unwrap_err().to_string();
    assert!(err.contains("only its Programmed"), "{err}");
    // The network is read-only to it (RBAC): an external subnet's router,
    // a gateway, a VPC.
    let router = serde_json::json!({"spec": {"gateway": "192.0.2.10"}});
    let err = Api::<Subnet>::all(agent.clone()).patch("ext", &pp, &Patch::Merge(&router)).await.unwrap_err();
    assert!(err.to_string().contains("forbidden"), "{err}");
    let note = serde_json::json!({"metadata": {"annotations": {"x": "y"}}});
    for err in [
        Api::<NatGateway>::all(agent.clone()).patch("gw", &pp, &Patch::Merge(&note)).await.unwrap_err(),
        Api::<Vpc>::all(agent.clone()).patch("v", &pp, &Patch::Merge(&note)).await.unwrap_err(),
    ] {
        assert!(err.to_string().contains("forbidden"), "{err}");
    }
    let now = Api::<Eip>::all(admin).get("b-web").await.unwrap();
    assert_eq!(now.labels().get("natgw.io/gateway").map(String::as_str), Some("gw2"));
    assert_eq!(now.finalizers(), [CONTROLLER_FINALIZER]);
}

/// Second round, item 4: the controller creates each gateway's bindings
/// and may write no other binding (its RBAC grant is by verb).
#[tokio::test]
async fn round2_item4_the_controller_writes_only_gateway_bindings() {
    use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
    let env = TestEnv::start().await.expect("control plane");
    let admin = env.install_natgw(&crds()).await.unwrap();
    let controller = env.natgw_client("natgw-controller").await.unwrap();
    // Its own job: allowed (once the policy is in force).
    natgw_kube_support::identity::apply(&controller, "gw", "uid-of-gw", NATGW_NAMESPACE)
        .await
        .expect("gateway bindings");
    let bindings: Api<ClusterRoleBinding> = Api::all(controller.clone());
    let escalate: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "natgw-gateway-evil"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "natgw-gateway"},
        "subjects": [{"kind": "User", "name": "mallory"}]}))
    .unwrap();
    let dry = PostParams { dry_run: true, ..Default::default() };
    refused("may write only a gateway's bindings", || {
        let (b, e, dry) = (bindings.clone(), escalate.clone(), dry.clone());
        async move { b.create(&dry, &e).await.map(|_| ()) }
    })
    .await;
    // Someone else's binding: never deleted.
    let err = bindings.delete("system:basic-user", &DeleteParams::default()).await.unwrap_err().to_string();
    assert!(err.contains("may write only a gateway's bindings"), "{err}");
    assert!(Api::<ClusterRoleBinding>::all(admin).get_opt("system:basic-user").await.unwrap().is_some());
    natgw_kube_support::identity::remove(&controller, "gw", NATGW_NAMESPACE).await.expect("removed with the gateway");
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
    for _ in 0..2 {
        uninstall(&admin).await;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        // Reinstall, in the order helm uses (the parameter first).
        apply_yaml(&admin, networks).await.unwrap();
        apply_yaml(&admin, &policy).await.unwrap();
        let subnets: Api<Subnet> = Api::all(admin.clone());
        let pp = PostParams { dry_run: true, ..Default::default() };
        let (ok, bad) = subnets_either_side();
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

/// Second round, item 21: right after an API server restart, a reinstall
/// (CRDs kept, as helm keeps them) can find every natgw write refused for
/// minutes: the policy's parameter kind, a CRD, is resolved through
/// discovery that the restarted server has not refreshed yet
/// (kubernetes/kubernetes#122658). The chart's post-install hook runs
/// `natgw install-check`, which waits here; once it returns, writes are
/// admitted and the policy enforces, at the first try.
#[tokio::test]
async fn round2_item21_after_an_api_server_restart_the_install_check_returns_only_once_writes_pass() {
    let mut env = TestEnv::start().await.unwrap();
    let admin = env.install_natgw(&crds()).await.unwrap();
    let policy = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/policy.yaml")).unwrap();
    let networks = "apiVersion: natgw.io/v1alpha1\nkind: ClusterNetworks\nmetadata: {name: natgw}\nspec: {cidrs: [10.244.0.0/16]}\n";
    uninstall(&admin).await;
    env.restart_apiserver().await.unwrap();
    let admin = env.admin().await.unwrap();
    apply_yaml(&admin, networks).await.unwrap();
    apply_yaml(&admin, &policy).await.unwrap();
    // As the hook runs it: its own account, which may only dry-run.
    let check = env.natgw_client("natgw-install-check").await.unwrap();
    let waited = natgw_kube_support::admission::wait_writable(
        &check,
        std::time::Duration::from_secs(300),
        std::time::Duration::from_millis(200),
    )
    .await
    .unwrap();
    eprintln!("refused {} dry runs over {:?} first: {:?}", waited.refused, waited.took, waited.first_refusal);
    let subnets: Api<Subnet> = Api::all(admin.clone());
    let pp = PostParams { dry_run: true, ..Default::default() };
    let (ok, bad) = subnets_either_side();
    subnets.create(&pp, &ok).await.expect("a write once the check passed");
    let refused = subnets.create(&pp, &bad).await.expect_err("a cluster network once the check passed");
    assert!(refused.to_string().contains("overlaps a cluster network"), "{refused}");
    let real = Api::<Subnet>::all(check.clone()).create(&PostParams::default(), &ok).await;
    assert!(real.is_err_and(|e| e.to_string().contains("may only dry-run")), "the check's account wrote for real");
    // Without the ClusterNetworks object the check fails, loudly, naming why.
    Api::<ClusterNetworks>::all(admin.clone()).delete("natgw", &DeleteParams::default()).await.unwrap();
    let err = natgw_kube_support::admission::wait_writable(
        &admin,
        std::time::Duration::from_secs(3),
        std::time::Duration::from_millis(200),
    )
    .await
    .expect_err("no parameter, no write");
    assert!(err.last.contains("ClusterNetworks object natgw does not exist"), "{err}");
}

/// A VPC Subnet the cluster-networks policy admits, and one inside the
/// cluster network it must refuse (10.244.0.0/16).
fn subnets_either_side() -> (Subnet, Subnet) {
    let subnet = |name: &str, cidr: &str, gateway: &str| -> Subnet {
        natgw_object("Subnet", name, serde_json::json!({"vpc": "v", "cidr": cidr, "gateway": gateway})).unwrap()
    };
    (subnet("ok", "10.77.0.0/24", "10.77.0.1"), subnet("bad", "10.244.1.0/24", "10.244.1.1"))
}

/// What `helm uninstall` removes of natgw's admission (CRDs stay).
async fn uninstall(admin: &Client) {
    let gvk = |kind: &str| {
        kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind))
    };
    for kind in ["ValidatingAdmissionPolicyBinding", "ValidatingAdmissionPolicy"] {
        let api: Api<kube::api::DynamicObject> = Api::all_with(admin.clone(), &gvk(kind));
        for name in [
            "natgw-gateway-agent",
            "natgw-eip-use",
            "natgw-cluster-networks",
            "natgw-controller-bindings",
            "natgw-install-check-dry-run",
        ] {
            api.delete(name, &DeleteParams::default()).await.unwrap();
        }
    }
    Api::<ClusterNetworks>::all(admin.clone()).delete("natgw", &DeleteParams::default()).await.unwrap();
}
