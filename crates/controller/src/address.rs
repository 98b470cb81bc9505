//! EIP addresses. An address belongs to the Eip that created its claim, a
//! ConfigMap `natgw-eip-A-B-C-D` in the controller's namespace: the API
//! server's unique names make two Eips holding one address impossible,
//! whichever controller instance is leading. A claim is deleted only when
//! its Eip object is gone, and the gateway agent lets an Eip go only after
//! its address left the gateway: an address is reused only once it is off.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use natgw_api::{Eip, SubnetSpec, parse_ip_range};

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

/// The lowest usable address not taken.
pub fn pick(subnet: &SubnetSpec, taken: impl Fn(&Ipv4Addr) -> bool) -> Option<Ipv4Addr> {
    usable(subnet).find(|ip| !taken(ip))
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

/// Who holds a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub eip: String,
    pub uid: String,
}

/// The claims this controller knows of: one list per leadership term, then
/// its own writes. Without it, N Eips created at once each listed every
/// claim and raced for the same lowest address: O(N²) requests. The API
/// server stays the arbiter: a stale entry costs a retry, never a double
/// allocation.
#[derive(Default)]
pub struct Book {
    cell: tokio::sync::OnceCell<std::sync::Mutex<Claims>>,
}

#[derive(Default)]
struct Claims {
    by_ip: BTreeMap<Ipv4Addr, Holder>,
    by_uid: HashMap<String, Ipv4Addr>,
}

impl Claims {
    fn record(&mut self, ip: Ipv4Addr, h: Holder) {
        self.by_uid.insert(h.uid.clone(), ip);
        if let Some(old) = self.by_ip.insert(ip, h.clone())
            && old.uid != h.uid
            && self.by_uid.get(&old.uid) == Some(&ip)
        {
            self.by_uid.remove(&old.uid);
        }
    }

    fn forget(&mut self, ip: Ipv4Addr) {
        if let Some(h) = self.by_ip.remove(&ip)
            && self.by_uid.get(&h.uid) == Some(&ip)
        {
            self.by_uid.remove(&h.uid);
        }
    }
}

impl Book {
    async fn claims(&self, api: &Api<ConfigMap>) -> Result<&std::sync::Mutex<Claims>, kube::Error> {
        self.cell
            .get_or_try_init(|| async {
                let mut c = Claims::default();
                for (ip, h) in claims(api).await? {
                    c.record(ip, h);
                }
                Ok(std::sync::Mutex::new(c))
            })
            .await
    }

    fn with<T>(&self, f: impl FnOnce(&mut Claims) -> T) -> Option<T> {
        Some(f(&mut lock(self.cell.get()?)))
    }
}

fn lock(m: &std::sync::Mutex<Claims>) -> std::sync::MutexGuard<'_, Claims> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Claims an address for `eip`: its fixed `spec.ip`, its current
/// `status.ip`, or the lowest free one.
pub async fn ensure(
    client: &Client,
    ns: &str,
    book: &Book,
    subnet: Option<&SubnetSpec>,
    eip: &Eip,
) -> Result<Outcome, kube::Error> {
    let Some(subnet) = subnet else {
        return Ok(Outcome::NoSubnet);
    };
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let me = Holder { eip: eip.name_any(), uid: eip.uid().unwrap_or_default() };
    let claims = book.claims(&api).await?;
    let wanted = eip.spec.ip.or_else(|| eip.status.as_ref().and_then(|s| s.ip));
    if let Some(ip) = wanted {
        if lock(claims).by_ip.get(&ip) == Some(&me) {
            return Ok(Outcome::Held(ip));
        }
        return match claim(&api, ip, &me).await? {
            Ok(()) => {
                lock(claims).record(ip, me);
                Ok(Outcome::Held(ip))
            }
            Err(other) => {
                let by = other.eip.clone();
                lock(claims).record(ip, other);
                if eip.spec.ip.is_some() {
                    Ok(Outcome::Taken { ip, by })
                } else {
                    // An allocated address lost to another Eip: allocate anew.
                    allocate(&api, claims, subnet, me).await
                }
            }
        };
    }
    allocate(&api, claims, subnet, me).await
}

async fn allocate(
    api: &Api<ConfigMap>,
    claims: &std::sync::Mutex<Claims>,
    subnet: &SubnetSpec,
    me: Holder,
) -> Result<Outcome, kube::Error> {
    loop {
        let ip = {
            let mut c = lock(claims);
            // Idempotent per Eip: a reconcile working from a cached copy
            // older than its own status.ip write gets the same address back.
            if let Some(ip) = c.by_uid.get(&me.uid) {
                return Ok(Outcome::Held(*ip));
            }
            let Some(ip) = pick(subnet, |ip| c.by_ip.contains_key(ip)) else {
                return Ok(Outcome::Exhausted);
            };
            // Reserved before the request, so concurrent allocations pick
            // other addresses.
            c.record(ip, me.clone());
            ip
        };
        match claim(api, ip, &me).await {
            Ok(Ok(())) => return Ok(Outcome::Held(ip)),
            // Someone else's since we last knew: try the next one.
            Ok(Err(other)) => lock(claims).record(ip, other),
            Err(e) => {
                lock(claims).forget(ip);
                return Err(e);
            }
        }
    }
}

/// Creates the claim of `ip` for `me`; the inner error is the holder if
/// another Eip holds it.
async fn claim(api: &Api<ConfigMap>, ip: Ipv4Addr, me: &Holder) -> Result<Result<(), Holder>, kube::Error> {
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": { "name": claim_name(ip), "labels": { CLAIM_LABEL: "true" } },
        "data": { "eip": me.eip, "uid": me.uid, "ip": ip.to_string() },
    }))
    .map_err(kube::Error::SerdeError)?;
    match api.create(&PostParams::default(), &cm).await {
        Ok(_) => Ok(Ok(())),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let data = api.get(&claim_name(ip)).await?.data.unwrap_or_default();
            let field = |k: &str| data.get(k).cloned().unwrap_or_default();
            let holder = Holder { eip: field("eip"), uid: field("uid") };
            Ok(if holder.uid == me.uid { Ok(()) } else { Err(holder) })
        }
        Err(e) => Err(e),
    }
}

/// Every claim by address.
pub async fn claims(api: &Api<ConfigMap>) -> Result<BTreeMap<Ipv4Addr, Holder>, kube::Error> {
    let list = api.list(&ListParams::default().labels(&format!("{CLAIM_LABEL}=true"))).await?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|cm| {
            let d = cm.data?;
            Some((d.get("ip")?.parse().ok()?, Holder { eip: d.get("eip")?.clone(), uid: d.get("uid")?.clone() }))
        })
        .collect())
}

/// Deletes claims whose Eip no longer exists. Asks the API server, not a
/// cache: a claim must never go while its Eip is still there.
pub async fn release_orphans(client: &Client, ns: &str, book: &Book) -> Result<usize, kube::Error> {
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
        if !alive.contains(&(owner.eip, owner.uid)) {
            api.delete(&claim_name(ip), &DeleteParams::default()).await?;
            book.with(|c| c.forget(ip));
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
        assert_eq!(pick(&s, |_| false), Some("198.51.100.10".parse().unwrap()));
        assert_eq!(pick(&s, |ip| taken.contains(ip)), Some("198.51.100.12".parse().unwrap()));
    }

    #[test]
    fn never_hands_out_network_broadcast_or_router() {
        let s = subnet("192.0.2.0/30", "192.0.2.1", &[]);
        let all: Vec<Ipv4Addr> = usable(&s).collect();
        assert_eq!(all, ["192.0.2.2".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(pick(&s, |ip| all.contains(ip)), None);
    }
}
