//! charts/natgw is the one source of the deployment: it lints clean,
//! deploy/ is what it renders, its grants are deploy/rbac.yaml's, and
//! values that cannot work fail the install with a reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn helm(args: &[&str]) -> (bool, String) {
    let out = Command::new(natgw_testenv::bin_dir().join("helm"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("helm: run scripts/k8s/build.sh helm");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

const NETWORKS: &str = "clusterNetworks={10.244.0.0/16,10.96.0.0/12}";

/// `helm template` of the chart with the cluster networks and `extra`.
fn template(extra: &[&str]) -> (bool, String) {
    let mut args = vec!["template", "natgw", "charts/natgw", "--set", NETWORKS];
    args.extend(extra);
    helm(&args)
}

#[test]
fn the_chart_lints_clean() {
    let (ok, out) = helm(&["lint", "--strict", "charts/natgw", "--set", NETWORKS]);
    assert!(ok, "{out}");
    let (ok, out) = helm(&["lint", "--strict", "charts/natgw", "--set", NETWORKS, "--set", "egress.enabled=true"]);
    assert!(ok, "{out}");
}

#[test]
fn deploy_is_what_the_chart_renders() {
    let out = Command::new("bash").arg("scripts/render").arg("--check").current_dir(root()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// (kind, name) -> what it grants or binds, from a multi-document YAML.
fn grants(yaml: &str) -> BTreeMap<(String, String), serde_json::Value> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml).expect("YAML");
    docs.into_iter()
        .filter(|d| {
            let kind = d["kind"].as_str().unwrap_or_default();
            ["ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding", "ServiceAccount"].contains(&kind)
        })
        .map(|d| {
            let key = (d["kind"].as_str().unwrap_or_default().to_string(), d["metadata"]["name"].to_string());
            let what = serde_json::json!({
                "namespace": d["metadata"]["namespace"],
                "rules": d["rules"],
                "aggregationRule": d["aggregationRule"],
                "roleRef": d["roleRef"],
                "subjects": d["subjects"],
            });
            (key, what)
        })
        .collect()
}

#[test]
fn a_default_install_grants_exactly_what_deploy_rbac_yaml_grants() {
    let (ok, rendered) = template(&["--namespace", "natgw-system"]);
    assert!(ok, "{rendered}");
    let chart = grants(&rendered);
    let deploy = std::fs::read_to_string(root().join("deploy/rbac.yaml")).unwrap()
        + "\n---\n"
        + &std::fs::read_to_string(root().join("deploy/roles.yaml")).unwrap();
    let deploy = grants(&deploy);
    assert!(chart.len() >= 10, "{:?}", chart.keys());
    assert_eq!(chart, deploy);
}

#[test]
fn values_that_cannot_work_fail_the_install_with_the_reason() {
    let (ok, out) = helm(&["template", "natgw", "charts/natgw"]);
    assert!(!ok);
    assert!(out.contains("clusterNetworks is required"), "{out}");
}

/// The controller gets the gateway pods' settings from the values, and
/// runs restricted; the node agent gets only NET_ADMIN.
#[test]
fn the_rendered_workloads_carry_the_values_and_least_privilege() {
    let (ok, out) = template(&[
        "--set",
        "egress.enabled=true",
        "--set",
        "gateway.externalNetwork=natgw-system/ext",
        "--set-string",
        "gateway.nodeSelector.natgw\\.io/gateway=true",
        "--set",
        "image.tag=t1",
        "--set",
        "gateway.translationLog.enabled=true",
        "--set",
        "gateway.translationLog.eipRate=100",
    ]);
    assert!(ok, "{out}");
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&out).unwrap();
    let find = |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}")).clone();
    let deploy = find("Deployment");
    assert_eq!(deploy["spec"]["replicas"], 2);
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "natgw.invalid/natgw:t1");
    let env: BTreeMap<String, serde_json::Value> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e["value"].clone()))
        .collect();
    assert_eq!(env["NATGW_AGENT_IMAGE"], "natgw.invalid/natgw:t1");
    assert_eq!(env["NATGW_GATEWAY_EXTERNAL_NETWORK"], "natgw-system/ext");
    assert_eq!(env["NATGW_GATEWAY_NODE_SELECTOR"], r#"{"natgw.io/gateway":"true"}"#);
    // Translation logs from the chart, with a per-EIP rate; the total left
    // to the agent's default.
    assert_eq!(env["NATGW_GATEWAY_TRANSLATION_LOG"], "stdout");
    assert_eq!(env["NATGW_GATEWAY_TRANSLATION_LOG_EIP_RATE"], "100");
    assert!(!env.contains_key("NATGW_GATEWAY_TRANSLATION_LOG_RATE"));
    assert!(c["args"].as_array().unwrap().iter().any(|a| a == "--apply-crds"), "the leader applies the CRDs");
    assert_eq!(deploy["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let ds = find("DaemonSet");
    let a = &ds["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(a["securityContext"]["capabilities"]["add"], serde_json::json!(["NET_ADMIN"]));
    assert_eq!(ds["spec"]["template"]["spec"]["hostNetwork"], true);
    find("PodDisruptionBudget");
}

/// Every metric the Grafana dashboard queries is one a natgw role
/// registers (a renamed metric would leave a silently empty panel), and
/// the chart ships the dashboard as valid JSON.
#[test]
fn the_dashboard_queries_only_metrics_natgw_registers() {
    let text = std::fs::read_to_string(root().join("charts/natgw/dashboards/natgw.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut registered = String::new();
    for dir in std::fs::read_dir(root().join("crates")).unwrap() {
        let src = dir.unwrap().path().join("src");
        for file in std::fs::read_dir(&src).into_iter().flatten() {
            registered += &std::fs::read_to_string(file.unwrap().path()).unwrap_or_default();
        }
    }
    let mut queried = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (start, _) in expr.match_indices("natgw_") {
                let name: String = expr[start..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                let base =
                    ["_bucket", "_total", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
                assert!(
                    registered.contains(&format!("\"{base}\"")),
                    "{:?} queries {name}, which no role registers",
                    panel["title"]
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 10);
    let (ok, out) =
        template(&["--set", "metrics.grafanaDashboard.enabled=true", "--show-only", "templates/dashboard.yaml"]);
    assert!(ok, "{out}");
    let cm: serde_json::Value = serde_saphyr::from_str(&out).unwrap();
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: serde_json::Value = serde_json::from_str(cm["data"]["natgw.json"].as_str().unwrap()).unwrap();
    assert_eq!(shipped, dash);
}
