//! Address claims. An address belongs to the Eip that created its claim,
//! a ConfigMap `natgw-eip-A-B-C-D` in the controller's namespace: the API
//! server's unique names make two holders impossible. The controller
//! writes claims; the gateway agent reads them to trust an Eip's address.
//! Each claim carries its Eip's gateway as a label, so that an agent reads
//! the claims of its own gateway only, not every claim in the cluster.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::ConfigMap;

/// Label on every claim, for listing and watching them.
pub const CLAIM_LABEL: &str = "natgw.io/eip-claim";

pub fn claim_name(ip: Ipv4Addr) -> String {
    format!("natgw-eip-{}", ip.to_string().replace('.', "-"))
}

/// The address a claim's name is for: `claim_name`'s inverse, `None` for
/// any other name.
pub fn claim_ip(name: &str) -> Option<Ipv4Addr> {
    let ip: Ipv4Addr = name.strip_prefix("natgw-eip-")?.replace('-', ".").parse().ok()?;
    // Only the one spelling claim_name gives (no leading zeros).
    (claim_name(ip) == name).then_some(ip)
}

/// Who holds a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub eip: String,
    pub uid: String,
}

/// The labels of a claim for an Eip of `gateway`.
pub fn claim_labels(gateway: &str) -> std::collections::BTreeMap<String, String> {
    [(CLAIM_LABEL.to_string(), "true".to_string()), (natgw_api::GATEWAY_LABEL.to_string(), gateway.to_string())].into()
}

/// The selector of the claims of `gateway`'s Eips.
pub fn claims_of(gateway: &str) -> String {
    format!("{CLAIM_LABEL}=true,{}={gateway}", natgw_api::GATEWAY_LABEL)
}

/// The gateway label a claim carries.
pub fn gateway_of(cm: &ConfigMap) -> Option<&str> {
    cm.metadata.labels.as_ref()?.get(natgw_api::GATEWAY_LABEL).map(String::as_str)
}

/// The claim of `ip` for `holder`, an Eip of `gateway`, as the controller
/// creates it.
pub fn claim(ip: Ipv4Addr, holder: &Holder, gateway: &str) -> ConfigMap {
    ConfigMap {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(claim_name(ip)),
            labels: Some(claim_labels(gateway)),
            ..Default::default()
        },
        data: Some(
            [("eip", holder.eip.clone()), ("uid", holder.uid.clone()), ("ip", ip.to_string())]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        ),
        ..Default::default()
    }
}

/// The address `eip` holds: the one it asks for (`Eip::address`), and only
/// when the claim of that address names this Eip. Anything else (a fixed
/// address another Eip holds, a status written by someone else) is not
/// the Eip's to use. `claim_of` finds the holder of an address's claim.
pub fn held_address(eip: &natgw_api::HeldEip, claim_of: impl Fn(Ipv4Addr) -> Option<Holder>) -> Option<Ipv4Addr> {
    let ip = eip.address()?;
    let uid = eip.meta.uid.as_ref()?;
    claim_of(ip).filter(|h| uid.is(&h.uid)).map(|_| ip)
}

/// The address a claim ConfigMap is for, and its holder.
pub fn holder_of(cm: &ConfigMap) -> Option<(Ipv4Addr, Holder)> {
    let d = cm.data.as_ref()?;
    Some((d.get("ip")?.parse().ok()?, Holder { eip: d.get("eip")?.clone(), uid: d.get("uid")?.clone() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_name_gives_back_its_address_and_nothing_else_does() {
        for ip in [Ipv4Addr::new(10, 1, 69, 205), Ipv4Addr::new(0, 0, 0, 0), Ipv4Addr::new(255, 255, 255, 255)] {
            assert_eq!(claim_ip(&claim_name(ip)), Some(ip));
        }
        for name in ["natgw-eip-10-1-69", "natgw-eip-10-1-69-205-1", "natgw-eip-010-1-69-205", "eip-10-1-69-205", ""] {
            assert_eq!(claim_ip(name), None, "{name}");
        }
    }
}
