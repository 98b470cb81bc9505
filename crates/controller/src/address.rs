//! EIP addresses. An address belongs to the Eip that created its claim, a
//! ConfigMap `natgw-eip-A-B-C-D` in the controller's namespace: the API
//! server's unique names make two Eips holding one address impossible,
//! whichever controller instance is leading. A claim is deleted only when
//! its Eip object is gone, and the gateway agent lets an Eip go only after
//! its address left the gateway: an address is reused only once it is off.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use natgw_api::{Eip, ObjectSet, SubnetSpec, parse_ip_range};

/// Label on every claim, for listing them.
pub const CLAIM_LABEL: &str = "natgw.io/eip-claim";

pub fn claim_name(ip: Ipv4Addr) -> String {
    format!("natgw-eip-{}", ip.to_string().replace('.', "-"))
}

/// Addresses an Eip may get, lowest first: not the network, broadcast or
/// router address, nor any `excludeIps` entry.
pub fn usable(subnet: &SubnetSpec) -> impl Iterator<Item = Ipv4Addr> + '_ {
    let net: Ipv4Net = subnet.cidr;
    let excluded: Vec<(Ipv4Addr, Ipv4Addr)> =
        subnet.exclude_ips.iter().filter_map(|e| parse_ip_range(e).ok()).collect();
    let edge = net.prefix_len() < 31;
    net.hosts().filter(move |ip| {
        *ip != subnet.gateway
            && !(edge && (*ip == net.network() || *ip == net.broadcast()))
            && !excluded.iter().any(|(a, b)| a <= ip && ip <= b)
    })
}

/// The lowest usable address not in `taken`.
pub fn pick(subnet: &SubnetSpec, taken: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    usable(subnet).find(|ip| !taken.contains(ip))
}

/// What the controller decided for one Eip.
pub enum Outcome {
    /// The Eip holds this address (its claim is persisted).
    Held(Ipv4Addr),
    /// Its fixed address belongs to another Eip.
    Taken { ip: Ipv4Addr, by: String },
    /// The external subnet has no free address left.
    Exhausted,
    /// The gateway or its external subnet does not exist (yet).
    NoSubnet,
}

/// Claims an address for `eip`: its fixed `spec.ip`, its current
/// `status.ip`, or the lowest free one.
pub async fn ensure(client: &Client, ns: &str, set: &ObjectSet, eip: &Eip) -> Result<Outcome, kube::Error> {
    let Some(subnet) = set.gateways.get(&eip.spec.gateway).and_then(|g| set.subnets.get(&g.spec.external_subnet))
    else {
        return Ok(Outcome::NoSubnet);
    };
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let uid = eip.uid().unwrap_or_default();
    let wanted = eip.spec.ip.or_else(|| eip.status.as_ref().and_then(|s| s.ip));
    if let Some(ip) = wanted {
        return match claim(&api, ip, eip, &uid).await? {
            None => Ok(Outcome::Held(ip)),
            Some(by) if eip.spec.ip.is_some() => Ok(Outcome::Taken { ip, by }),
            // An allocated address lost to another Eip: allocate anew.
            Some(_) => allocate(&api, &subnet.spec, eip, &uid).await,
        };
    }
    allocate(&api, &subnet.spec, eip, &uid).await
}

async fn allocate(api: &Api<ConfigMap>, subnet: &SubnetSpec, eip: &Eip, uid: &str) -> Result<Outcome, kube::Error> {
    let all = claims(api).await?;
    // Idempotent per Eip: a reconcile working from a cached copy older than
    // its own status.ip write must get the same address back, not a second.
    if let Some((ip, _)) = all.iter().find(|(_, (_, u))| u == uid) {
        return Ok(Outcome::Held(*ip));
    }
    let mut taken: BTreeSet<Ipv4Addr> = all.into_keys().collect();
    while let Some(ip) = pick(subnet, &taken) {
        match claim(api, ip, eip, uid).await? {
            None => return Ok(Outcome::Held(ip)),
            // Someone claimed it since the list: try the next one.
            Some(_) => drop(taken.insert(ip)),
        }
    }
    Ok(Outcome::Exhausted)
}

/// Creates the claim of `ip` for `eip`; returns the holder's name if
/// another Eip holds it.
async fn claim(api: &Api<ConfigMap>, ip: Ipv4Addr, eip: &Eip, uid: &str) -> Result<Option<String>, kube::Error> {
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": { "name": claim_name(ip), "labels": { CLAIM_LABEL: "true" } },
        "data": { "eip": eip.name_any(), "uid": uid, "ip": ip.to_string() },
    }))
    .map_err(kube::Error::SerdeError)?;
    match api.create(&PostParams::default(), &cm).await {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let existing = api.get(&claim_name(ip)).await?;
            let data = existing.data.unwrap_or_default();
            if data.get("uid").map(String::as_str) == Some(uid) {
                Ok(None)
            } else {
                Ok(Some(data.get("eip").cloned().unwrap_or_default()))
            }
        }
        Err(e) => Err(e),
    }
}

/// Every claim: address -> (Eip name, Eip uid).
pub async fn claims(api: &Api<ConfigMap>) -> Result<BTreeMap<Ipv4Addr, (String, String)>, kube::Error> {
    let list = api.list(&ListParams::default().labels(&format!("{CLAIM_LABEL}=true"))).await?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|cm| {
            let d = cm.data?;
            Some((d.get("ip")?.parse().ok()?, (d.get("eip")?.clone(), d.get("uid")?.clone())))
        })
        .collect())
}

/// Deletes claims whose Eip no longer exists. Asks the API server, not a
/// cache: a claim must never go while its Eip is still there.
pub async fn release_orphans(client: &Client, ns: &str) -> Result<usize, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let claims = claims(&api).await?;
    if claims.is_empty() {
        return Ok(0);
    }
    // One list per sweep, not one read per claim.
    let alive: BTreeSet<(String, String)> = Api::<Eip>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|e| (e.name_any(), e.uid().unwrap_or_default()))
        .collect();
    let mut released = 0;
    for (ip, owner) in claims {
        if !alive.contains(&owner) {
            api.delete(&claim_name(ip), &DeleteParams::default()).await?;
            released += 1;
        }
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(cidr: &str, gw: &str, exclude: &[&str]) -> SubnetSpec {
        SubnetSpec {
            cidr: cidr.parse().unwrap(),
            gateway: gw.parse().unwrap(),
            exclude_ips: exclude.iter().map(|s| s.to_string()).collect(),
            vpc: None,
        }
    }

    #[test]
    fn picks_the_lowest_usable_address() {
        let s = subnet("198.51.100.0/24", "198.51.100.1", &["198.51.100.2..198.51.100.9", "198.51.100.11"]);
        let taken: BTreeSet<Ipv4Addr> = ["198.51.100.10".parse().unwrap()].into();
        assert_eq!(pick(&s, &BTreeSet::new()), Some("198.51.100.10".parse().unwrap()));
        assert_eq!(pick(&s, &taken), Some("198.51.100.12".parse().unwrap()));
    }

    #[test]
    fn never_hands_out_network_broadcast_or_router() {
        let s = subnet("192.0.2.0/30", "192.0.2.1", &[]);
        let all: Vec<Ipv4Addr> = usable(&s).collect();
        assert_eq!(all, ["192.0.2.2".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(pick(&s, &all.iter().copied().collect()), None);
    }
}
