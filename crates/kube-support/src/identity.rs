//! Each gateway's own identity. Its agent runs as the ServiceAccount
//! `natgw-gateway-NAME`, bound to the ClusterRole `natgw-gateway` (read
//! the network, patch Eips and rules) and the Role
//! `natgw-gateway-claims` (read the address claims). One account per
//! gateway is what lets the admission policy `natgw-gateway-agent` read
//! the gateway's name from the request's user and refuse writes to any
//! other gateway's objects: with one account for all, a compromised
//! gateway pod could write every gateway's objects.
//!
//! A gateway name has at most 63 characters, so the account's name
//! (at most 77, of 253 allowed) is never cut: the policy can compute it.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource};

/// Every gateway account's name starts so; the policy keys on it.
pub const ACCOUNT_PREFIX: &str = "natgw-gateway-";
/// The ClusterRole every gateway account is bound to.
pub const CLUSTER_ROLE: &str = "natgw-gateway";
/// The Role (in natgw's namespace) for the address claims.
pub const CLAIMS_ROLE: &str = "natgw-gateway-claims";
const MANAGER: &str = "natgw-controller/identity";

/// The ServiceAccount of gateway `gw`; also the name of its bindings.
pub fn account(gw: &str) -> String {
    format!("{ACCOUNT_PREFIX}{gw}")
}

/// The account and its two bindings, owned by the gateway (garbage
/// collection where a controller-manager runs; the controller also
/// removes them itself).
pub fn desired(gw: &str, uid: &str, namespace: &str) -> (ServiceAccount, ClusterRoleBinding, RoleBinding) {
    let name = account(gw);
    let owner = OwnerReference {
        api_version: natgw_api::NatGateway::api_version(&()).into(),
        kind: natgw_api::NatGateway::kind(&()).into(),
        name: gw.into(),
        uid: uid.into(),
        ..Default::default()
    };
    let meta = |ns: Option<&str>| ObjectMeta {
        name: Some(name.clone()),
        namespace: ns.map(str::to_string),
        labels: Some([(natgw_api::GATEWAY_LABEL.to_string(), gw.to_string())].into()),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    };
    let subject = Subject {
        kind: "ServiceAccount".into(),
        name: name.clone(),
        namespace: Some(namespace.into()),
        ..Default::default()
    };
    let role = |kind: &str, role: &str| RoleRef {
        api_group: "rbac.authorization.k8s.io".into(),
        kind: kind.into(),
        name: role.into(),
    };
    (
        ServiceAccount { metadata: meta(Some(namespace)), ..Default::default() },
        ClusterRoleBinding {
            metadata: meta(None),
            role_ref: role("ClusterRole", CLUSTER_ROLE),
            subjects: Some(vec![subject.clone()]),
        },
        RoleBinding {
            metadata: meta(Some(namespace)),
            role_ref: role("Role", CLAIMS_ROLE),
            subjects: Some(vec![subject]),
        },
    )
}

/// Writes the account and its bindings (server-side apply: unchanged
/// objects cost nothing).
pub async fn apply(client: &Client, gw: &str, uid: &str, namespace: &str) -> Result<(), kube::Error> {
    let (sa, crb, rb) = desired(gw, uid, namespace);
    let name = account(gw);
    let pp = PatchParams::apply(MANAGER).force();
    let sa = body(&sa, "v1", "ServiceAccount")?;
    let crb = body(&crb, "rbac.authorization.k8s.io/v1", "ClusterRoleBinding")?;
    let rb = body(&rb, "rbac.authorization.k8s.io/v1", "RoleBinding")?;
    Api::<ServiceAccount>::namespaced(client.clone(), namespace).patch(&name, &pp, &Patch::Apply(&sa)).await?;
    Api::<ClusterRoleBinding>::all(client.clone()).patch(&name, &pp, &Patch::Apply(&crb)).await?;
    Api::<RoleBinding>::namespaced(client.clone(), namespace).patch(&name, &pp, &Patch::Apply(&rb)).await?;
    Ok(())
}

/// Removes the account and its bindings; gone already is fine.
pub async fn remove(client: &Client, gw: &str, namespace: &str) -> Result<(), kube::Error> {
    let name = account(gw);
    let dp = DeleteParams::background();
    gone(Api::<RoleBinding>::namespaced(client.clone(), namespace).delete(&name, &dp).await)?;
    gone(Api::<ClusterRoleBinding>::all(client.clone()).delete(&name, &dp).await)?;
    gone(Api::<ServiceAccount>::namespaced(client.clone(), namespace).delete(&name, &dp).await)
}

fn gone<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other.map(|_| ()),
    }
}

/// An object as server-side apply takes it: with its type in the body.
fn body(object: &impl serde::Serialize, api_version: &str, kind: &str) -> Result<serde_json::Value, kube::Error> {
    let mut v = serde_json::to_value(object).map_err(kube::Error::SerdeError)?;
    v["apiVersion"] = api_version.into();
    v["kind"] = kind.into();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateways_account_is_never_cut_and_its_bindings_name_it() {
        let long = "g".repeat(63);
        let (sa, crb, rb) = desired(&long, "u", "natgw-system");
        assert_eq!(sa.metadata.name.as_deref(), Some(format!("natgw-gateway-{long}").as_str()));
        for subjects in [crb.subjects.as_ref(), rb.subjects.as_ref()] {
            assert_eq!(subjects.unwrap()[0].name, account(&long));
        }
        assert_eq!((crb.role_ref.name.as_str(), rb.role_ref.name.as_str()), (CLUSTER_ROLE, CLAIMS_ROLE));
        // Two gateways sharing a prefix have two accounts.
        assert_ne!(account("web"), account("web-2"));
    }
}
