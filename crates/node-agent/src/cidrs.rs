//! The cluster's pod and service CIDRs: from explicit configuration, else
//! discovered from `Node.spec.podCIDRs` and `networking.k8s.io/v1`
//! ServiceCIDRs. There are no built-in defaults: without an answer, egress
//! programs nothing and says why.

use ipnet::Ipv4Net;

/// Explicit configuration: each list overrides discovery of its kind.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub pod_cidrs: Option<Vec<Ipv4Net>>,
    pub service_cidrs: Option<Vec<Ipv4Net>>,
}

/// Flag / environment names, for messages and the docs.
pub const POD_FLAG: &str = "--pod-cidrs (NATGW_POD_CIDRS)";
pub const SERVICE_FLAG: &str = "--service-cidrs (NATGW_SERVICE_CIDRS)";

/// Parses `a/b,c/d` (a flag's value), naming the flag on error.
pub fn parse(flag: &str, value: &str) -> Result<Vec<Ipv4Net>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<Ipv4Net>().map_err(|_| format!("{flag}: {s:?} is not an IPv4 CIDR")))
        .collect::<Result<Vec<_>, _>>()
        .and_then(|v| if v.is_empty() { Err(format!("{flag}: empty list")) } else { Ok(v) })
}

/// What discovery saw; `Err` carries why a list could not be read.
pub struct Discovered {
    pub pod_cidrs: Result<Vec<Ipv4Net>, String>,
    pub service_cidrs: Result<Vec<Ipv4Net>, String>,
}

/// The cluster's networks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNets {
    pub pods: Vec<Ipv4Net>,
    pub services: Vec<Ipv4Net>,
}

impl ClusterNets {
    /// Pods and services together: never translated.
    pub fn all(&self) -> Vec<Ipv4Net> {
        self.pods.iter().chain(&self.services).copied().collect()
    }
}

/// The cluster networks, or every reason they are unknown.
pub fn resolve(o: &Overrides, d: Discovered) -> Result<ClusterNets, String> {
    let pick = |over: &Option<Vec<Ipv4Net>>, found: Result<Vec<Ipv4Net>, String>, what: &str, flag: &str| match over {
        Some(v) => Ok(v.clone()),
        None => match found {
            Ok(v) if !v.is_empty() => Ok(v),
            Ok(_) => Err(format!("no {what} found and {flag} is not set")),
            Err(e) => Err(format!("cannot discover {what} ({e}) and {flag} is not set")),
        },
    };
    let pods = pick(&o.pod_cidrs, d.pod_cidrs, "pod CIDR (Node.spec.podCIDRs)", POD_FLAG);
    let services =
        pick(&o.service_cidrs, d.service_cidrs, "service CIDR (networking.k8s.io/v1 ServiceCIDR)", SERVICE_FLAG);
    match (pods, services) {
        (Ok(pods), Ok(services)) => Ok(ClusterNets { pods, services }),
        (Err(a), Err(b)) => Err(format!("{a}; {b}")),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// IPv4 CIDRs out of API strings (IPv6 ones are skipped: egress is IPv4).
pub fn v4(list: impl IntoIterator<Item = String>) -> Vec<Ipv4Net> {
    list.into_iter().filter_map(|s| s.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &str) -> Vec<Ipv4Net> {
        parse("test", s).unwrap()
    }

    #[test]
    fn flags_override_discovery() {
        let o = Overrides { pod_cidrs: Some(nets("10.1.0.0/16")), service_cidrs: None };
        let d = Discovered { pod_cidrs: Ok(nets("10.244.0.0/16")), service_cidrs: Ok(nets("10.96.0.0/12")) };
        assert_eq!(resolve(&o, d).unwrap().all(), nets("10.1.0.0/16,10.96.0.0/12"));
    }

    #[test]
    fn nothing_found_is_an_error_naming_the_flag_never_a_default() {
        let d = Discovered { pod_cidrs: Ok(vec![]), service_cidrs: Err("forbidden".into()) };
        let e = resolve(&Overrides::default(), d).unwrap_err();
        assert!(e.contains("no pod CIDR") && e.contains(POD_FLAG), "{e}");
        assert!(e.contains("forbidden") && e.contains(SERVICE_FLAG), "{e}");
    }

    #[test]
    fn bad_flags_are_named() {
        assert!(parse("--pod-cidrs", "10.0.0.0/8,nope").unwrap_err().contains("--pod-cidrs: \"nope\""));
        assert!(parse("--pod-cidrs", " ").unwrap_err().contains("empty"));
    }
}
