//! Whether natgw's objects can be written yet, and its policies enforce.
//! Right after an install, most of all on an API server that has just
//! restarted, the API server may not yet resolve the ClusterNetworks CRD
//! that the `natgw-cluster-networks` policy takes its parameters from,
//! and refuses every matching write ("failed to find resource referenced
//! by paramKind", kubernetes/kubernetes#122658 and #124237) for up to a
//! few minutes; and a policy just created may not be in force yet. The
//! chart's post-install hook waits here, so that `helm install` does not
//! report success before natgw can be used as documented.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use kube::api::{Api, PostParams};
use natgw_api::{ClusterNetworks, Subnet, SubnetSpec};

/// A VPC Subnet of `cidr` (its first address the router), for a dry run.
fn subnet(name: &str, cidr: Ipv4Net) -> Subnet {
    let gateway = if cidr.prefix_len() < 32 { Ipv4Addr::from(u32::from(cidr.network()) + 1) } else { cidr.network() };
    let spec = SubnetSpec { cidr, gateway, exclude_ips: Vec::new(), vpc: Some("natgw-install-check".into()) };
    Subnet::new(name, spec)
}

/// The two probes: a Subnet the policies must admit, and (when the
/// cluster has an IPv4 network) one inside a cluster network that they
/// must refuse. Documentation ranges first, away from the cluster's.
pub fn probes(cluster: &[String]) -> (Subnet, Option<Subnet>) {
    let nets: Vec<Ipv4Net> = cluster.iter().filter_map(|c| c.parse().ok()).collect();
    let clear = ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "100.64.0.0/24"]
        .iter()
        .filter_map(|c| c.parse::<Ipv4Net>().ok())
        .find(|c| !nets.iter().any(|n| n.contains(c) || c.contains(n)))
        .unwrap_or_default();
    let inside = nets.first().map(|n| {
        let sized = Ipv4Net::new(n.network(), n.prefix_len().max(24)).unwrap_or(*n);
        subnet("natgw-install-check-refused", sized)
    });
    (subnet("natgw-install-check", clear), inside)
}

/// What the wait saw: how many rounds found natgw not yet usable before
/// one found it usable, and the first such finding.
#[derive(Debug, Default)]
pub struct Waited {
    pub refused: u32,
    pub first_refusal: Option<String>,
    pub took: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("natgw is not usable after {}s ({refused} tries); the last: {last}", .took.as_secs())]
pub struct NotWritable {
    pub refused: u32,
    pub took: Duration,
    pub last: String,
}

/// One try: `None` when the allowed probe is admitted and the other
/// refused by the cluster-networks policy; otherwise what was wrong.
async fn try_once(client: &kube::Client) -> Option<String> {
    let networks = match Api::<ClusterNetworks>::all(client.clone()).get_opt("natgw").await {
        Ok(Some(n)) => n.spec.cidrs,
        Ok(None) => return Some("the ClusterNetworks object natgw does not exist".into()),
        Err(e) => return Some(format!("cannot read ClusterNetworks natgw: {e}")),
    };
    let api: Api<Subnet> = Api::all(client.clone());
    let dry = PostParams { dry_run: true, ..Default::default() };
    let (allowed, refused) = probes(&networks);
    match api.create(&dry, &allowed).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 && s.reason == "AlreadyExists" => {}
        Err(e) => return Some(format!("a Subnet of {} was refused: {e}", allowed.spec.cidr)),
    }
    let refused = refused?;
    match api.create(&dry, &refused).await {
        Err(kube::Error::Api(s)) if s.message.contains("cluster network") => None,
        Err(e) => {
            Some(format!("a Subnet of {} in a cluster network was refused for another reason: {e}", refused.spec.cidr))
        }
        Ok(_) => Some(format!(
            "a Subnet of {} in a cluster network was admitted: natgw-cluster-networks is not in force yet",
            refused.spec.cidr
        )),
    }
}

/// Tries every `every` until natgw's writes are admitted and its
/// cluster-networks policy refuses what it must, or until `timeout`.
pub async fn wait_writable(client: &kube::Client, timeout: Duration, every: Duration) -> Result<Waited, NotWritable> {
    let start = Instant::now();
    let mut waited = Waited::default();
    loop {
        let Some(why) = try_once(client).await else {
            waited.took = start.elapsed();
            return Ok(waited);
        };
        waited.refused += 1;
        if waited.first_refusal.is_none() {
            tracing::warn!(error = %why, "natgw cannot be used yet; retrying");
            waited.first_refusal = Some(why.clone());
        }
        if start.elapsed() >= timeout {
            return Err(NotWritable { refused: waited.refused, took: start.elapsed(), last: why });
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probes_stay_clear_of_and_inside_the_cluster_networks() {
        let (ok, bad) = probes(&["10.244.0.0/16".into(), "fd00::/64".into()]);
        assert_eq!(ok.spec.cidr.to_string(), "192.0.2.0/24");
        assert_eq!(bad.map(|b| b.spec.cidr.to_string()).as_deref(), Some("10.244.0.0/24"));
        // A cluster that uses the first documentation range, and a /32.
        let (ok, bad) = probes(&["192.0.2.7/32".into()]);
        assert_eq!(ok.spec.cidr.to_string(), "198.51.100.0/24");
        let bad = bad.unwrap();
        assert_eq!((bad.spec.cidr.to_string(), bad.spec.gateway), ("192.0.2.7/32".into(), Ipv4Addr::new(192, 0, 2, 7)));
        // IPv6 only: nothing to refuse.
        assert!(probes(&["fd00::/64".into()]).1.is_none());
    }
}
