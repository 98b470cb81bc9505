//! A Service, its EndpointSlices and Pods, as this node's egress sees them
//! (pure). Every annotation is checked; a bad one is an error that names
//! it, and the Service is left out rather than guessed at.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use natgw_api::Protocol;
use natgw_plan::EgressService;
use natgw_plan::egress::{MAX_NETWORKS, MAX_PORTS};

/// `"true"` turns egress on for a Service of type LoadBalancer.
pub const EGRESS: &str = "natgw.io/egress";
/// `tcp:443,udp:53`: translate only these destination ports.
pub const PORTS: &str = "natgw.io/egress-ports";
/// `203.0.113.0/24,198.51.100.7/32`: translate only toward these.
pub const ALLOWED: &str = "natgw.io/egress-allowed-networks";
/// Never translate toward these.
pub const DENIED: &str = "natgw.io/egress-denied-networks";

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Service {service}: {field}: {reason}")]
pub struct ServiceError {
    pub service: String,
    /// The annotation or field at fault.
    pub field: String,
    pub reason: String,
}

pub fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

/// Whether the Service asks for egress at all.
pub fn wants_egress(s: &Service) -> bool {
    s.metadata.annotations.as_ref().and_then(|a| a.get(EGRESS)).is_some_and(|v| v == "true")
}

fn parse_list<T>(
    svc: &str,
    field: &str,
    value: Option<&String>,
    max: usize,
    one: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, ServiceError> {
    let Some(value) = value else { return Ok(Vec::new()) };
    let count = value.split(',').count();
    if count > max {
        return Err(ServiceError {
            service: svc.to_string(),
            field: format!("annotation {field}"),
            reason: format!("{count} entries: at most {max} are allowed"),
        });
    }
    value
        .split(',')
        .map(str::trim)
        .map(|item| {
            one(item).map_err(|reason| ServiceError {
                service: svc.to_string(),
                field: format!("annotation {field}"),
                reason: format!("{item:?}: {reason}"),
            })
        })
        .collect()
}

fn port(item: &str) -> Result<(Protocol, u16), String> {
    let (proto, port) = item.split_once(':').ok_or("expected PROTOCOL:PORT, e.g. tcp:443")?;
    let proto = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => return Err(format!("protocol {other:?} is neither tcp nor udp")),
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((proto, p)),
        _ => Err(format!("port {port:?} is not between 1 and 65535")),
    }
}

fn net(item: &str) -> Result<Ipv4Net, String> {
    let n: Ipv4Net = item.parse().map_err(|_| "not an IPv4 CIDR such as 203.0.113.0/24".to_string())?;
    if n.trunc() != n {
        return Err("host bits are set".into());
    }
    Ok(n)
}

/// The VIP: `status.loadBalancer.ingress[].ip`, which only the load
/// balancer writes. `spec.loadBalancerIP` is a request any tenant can
/// write, so it never counts.
pub fn vip(s: &Service) -> Option<Ipv4Addr> {
    let ingress = s.status.as_ref().and_then(|st| st.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
    ingress.into_iter().flatten().filter_map(|i| i.ip.as_deref()?.parse().ok()).next()
}

/// This node's pods and the cluster's EndpointSlices, indexed once per
/// round: each Service looks up its own. Walking all of them for every
/// Service (and copying each pod's labels) made a round O(Services x
/// pods): 500 Services over 16,000 pods took seconds.
pub struct Index<'a> {
    node: &'a str,
    /// Pods on the node, by namespace and name, with their addresses.
    pods: HashMap<(&'a str, &'a str), Vec<Ipv4Addr>>,
    /// Pods on the node by namespace and one label: a selector's first
    /// pair finds its candidates.
    labelled: HashMap<(&'a str, &'a str, &'a str), Vec<&'a Pod>>,
    /// EndpointSlices by namespace and Service name.
    slices: HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
}

impl<'a> Index<'a> {
    pub fn new(slices: &[&'a EndpointSlice], pods: &[&'a Pod], node: &'a str) -> Index<'a> {
        let mut index = Index { node, pods: HashMap::new(), labelled: HashMap::new(), slices: HashMap::new() };
        for p in pods.iter().filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)) {
            let ns = p.metadata.namespace.as_deref().unwrap_or_default();
            if let Some(name) = p.metadata.name.as_deref() {
                let status = p.status.as_ref();
                let ips = status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten().map(|i| i.ip.as_str());
                let addrs =
                    ips.chain(status.and_then(|s| s.pod_ip.as_deref())).filter_map(|a| a.parse::<Ipv4Addr>().ok());
                index.pods.entry((ns, name)).or_default().extend(addrs);
            }
            for (k, v) in p.metadata.labels.iter().flatten() {
                index.labelled.entry((ns, k.as_str(), v.as_str())).or_default().push(*p);
            }
        }
        for slice in slices.iter().filter(|s| s.address_type == "IPv4") {
            let labels = slice.metadata.labels.as_ref();
            let Some(service) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else { continue };
            let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
            index.slices.entry((ns, service.as_str())).or_default().push(*slice);
        }
        index
    }

    /// The Service's IPv4 EndpointSlices.
    fn slices_of<'s>(&'s self, s: &'s Service) -> &'s [&'s EndpointSlice] {
        // The index's keys live as long as the round; a lookup's as long
        // as the Service (the maps are covariant).
        let me: &'s Index<'s> = self;
        let ns = s.metadata.namespace.as_deref().unwrap_or_default();
        let name = s.metadata.name.as_deref().unwrap_or_default();
        me.slices.get(&(ns, name)).map(Vec::as_slice).unwrap_or_default()
    }

    /// The addresses of pod `name` of `ns` on the node.
    fn pod<'s>(&'s self, ns: &'s str, name: &'s str) -> Option<&'s Vec<Ipv4Addr>> {
        let me: &'s Index<'s> = self;
        me.pods.get(&(ns, name))
    }

    /// Pods of `ns` on the node labelled `k=v`.
    fn labelled<'s>(&'s self, ns: &'s str, k: &'s str, v: &'s str) -> &'s [&'s Pod] {
        let me: &'s Index<'s> = self;
        me.labelled.get(&(ns, k, v)).map(Vec::as_slice).unwrap_or_default()
    }
}

/// Whether the Service has an endpoint on the index's node: the node that
/// speaks for it (its Events), so that one edit makes one Event per node
/// that serves the Service, not one per node of the cluster.
pub fn endpoints_on(s: &Service, index: &Index) -> bool {
    index.slices_of(s).iter().any(|slice| slice.endpoints.iter().any(|e| e.node_name.as_deref() == Some(index.node)))
}

/// The egress of one annotated Service on the index's node.
pub fn egress_service(s: &Service, index: &Index) -> Result<EgressService, ServiceError> {
    let node = index.node;
    let ns = s.metadata.namespace.clone().unwrap_or_default();
    let name = key(&ns, s.metadata.name.as_deref().unwrap_or_default());
    let spec = s.spec.clone().unwrap_or_default();
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind != "LoadBalancer" {
        return Err(ServiceError {
            service: name,
            field: "spec.type".into(),
            reason: format!("is {kind}: {EGRESS} needs type LoadBalancer"),
        });
    }
    let annotations = s.metadata.annotations.clone().unwrap_or_default();
    let ports = parse_list(&name, PORTS, annotations.get(PORTS), MAX_PORTS, port)?;
    let allowed = parse_list(&name, ALLOWED, annotations.get(ALLOWED), MAX_NETWORKS, net)?;
    let denied = parse_list(&name, DENIED, annotations.get(DENIED), MAX_NETWORKS, net)?;
    let mut endpoints = Vec::new();
    for slice in index.slices_of(s) {
        for e in &slice.endpoints {
            // A missing ready condition means ready (EndpointSlice API).
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            // Only pods of this namespace on this node, at their own
            // addresses: an EndpointSlice is writable by anyone who may
            // write them in the namespace, and a manually written endpoint
            // (no target, a target of another kind, another namespace's
            // pod, an address the pod does not have) is never translated.
            let target = e
                .target_ref
                .as_ref()
                .filter(|t| t.kind.as_deref() == Some("Pod") && t.namespace.as_deref().is_none_or(|n| n == ns));
            let Some(addrs) = target.and_then(|t| index.pod(&ns, t.name.as_deref()?)) else { continue };
            if ready && e.node_name.as_deref() == Some(node) {
                let mine = e.addresses.iter().filter_map(|a| a.parse::<Ipv4Addr>().ok()).filter(|a| addrs.contains(a));
                endpoints.extend(mine);
            }
        }
    }
    let selector: BTreeMap<String, String> = spec.selector.clone().unwrap_or_default();
    let candidates = match selector.iter().next() {
        Some((k, v)) => index.labelled(&ns, k, v),
        None => &[],
    };
    let selected = candidates
        .iter()
        .filter(|p| {
            let labels = p.metadata.labels.as_ref();
            selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
        .filter_map(|p| p.status.as_ref()?.pod_ip.as_deref()?.parse().ok())
        .collect();
    let created = s.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string());
    Ok(EgressService { name, vip: vip(s), ports, allowed, denied, endpoints, selected, created })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(annotations: serde_json::Value) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "web", "annotations": annotations},
            "spec": {"type": "LoadBalancer", "selector": {"app": "web"}, "loadBalancerIP": "192.0.2.9"},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}},
        }))
        .unwrap()
    }

    fn slice(node: &str, ip: &str, ready: Option<bool>) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "web-1", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "nodeName": node, "conditions": {"ready": ready},
                           "targetRef": {"kind": "Pod", "namespace": "shop", "name": format!("p-{ip}")}}],
        }))
        .unwrap()
    }

    /// Pod `p-IP` of `ns` on `node` with address IP.
    fn pod(ns: &str, node: &str, ip: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": format!("p-{ip}")},
            "spec": {"nodeName": node, "containers": []},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
        }))
        .unwrap()
    }

    #[test]
    fn reads_vip_ports_networks_and_local_ready_endpoints() {
        let s = service(serde_json::json!({EGRESS: "true", PORTS: "tcp:443, udp:53", DENIED: "198.51.100.0/24"}));
        let slices = [
            slice("a", "10.244.1.5", None),
            slice("b", "10.244.2.5", Some(true)),
            slice("a", "10.244.1.6", Some(false)),
        ];
        let pods = [pod("shop", "a", "10.244.1.5"), pod("shop", "b", "10.244.2.5"), pod("shop", "a", "10.244.1.6")];
        let (slices, pods): (Vec<_>, Vec<_>) = (slices.iter().collect(), pods.iter().collect());
        let e = egress_service(&s, &Index::new(&slices, &pods, "a")).unwrap();
        assert_eq!(e.name, "shop/web");
        assert_eq!(e.vip, Some("192.0.2.10".parse().unwrap()), "status, never spec.loadBalancerIP");
        assert_eq!(e.ports, vec![(Protocol::Tcp, 443), (Protocol::Udp, 53)]);
        assert_eq!(e.endpoints, vec!["10.244.1.5".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(e.denied.len(), 1);
    }

    #[test]
    fn a_bad_annotation_names_itself() {
        for (ann, value, words) in [
            (PORTS, "tcp:0", "between 1 and 65535"),
            (PORTS, "sctp:5", "neither tcp nor udp"),
            (PORTS, "443", "PROTOCOL:PORT"),
            (ALLOWED, "203.0.113.1/24", "host bits"),
            (DENIED, "fe80::/10", "IPv4 CIDR"),
        ] {
            let err =
                egress_service(&service(serde_json::json!({EGRESS: "true", ann: value})), &Index::new(&[], &[], "a"))
                    .expect_err(value);
            assert_eq!(err.field, format!("annotation {ann}"));
            assert!(err.to_string().contains(words), "{err}");
        }
    }

    #[test]
    fn only_load_balancers() {
        let mut s = service(serde_json::json!({EGRESS: "true"}));
        s.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        assert_eq!(egress_service(&s, &Index::new(&[], &[], "a")).unwrap_err().field, "spec.type");
    }

    #[test]
    fn item5_spec_load_balancer_ip_is_never_the_vip() {
        // Any tenant can write spec.loadBalancerIP; only the load balancer
        // writes the status.
        let mut s = service(serde_json::json!({EGRESS: "true"}));
        s.status = None;
        assert_eq!(vip(&s), None);
    }

    #[test]
    fn item6_endpoints_without_a_pod_target_and_huge_annotations_are_refused() {
        let s = service(serde_json::json!({EGRESS: "true"}));
        let mut manual = slice("a", "10.244.1.7", Some(true));
        manual.endpoints[0].target_ref = None;
        let e = egress_service(&s, &Index::new(&[&manual], &[], "a")).unwrap();
        assert!(e.endpoints.is_empty(), "an endpoint written by hand is not a pod");
        let many: Vec<String> = (0..=MAX_NETWORKS).map(|i| format!("203.0.{}.0/24", i % 256)).collect();
        let s = service(serde_json::json!({EGRESS: "true", DENIED: many.join(",")}));
        let err = egress_service(&s, &Index::new(&[], &[], "a")).unwrap_err();
        assert_eq!(err.field, format!("annotation {DENIED}"));
        assert!(err.reason.contains(&format!("at most {MAX_NETWORKS}")), "{err}");
    }

    /// The pods a Service selects come from the index by the selector's
    /// first label and must carry every other: only this node's, only the
    /// Service's namespace.
    #[test]
    fn selected_pods_match_every_label_of_the_selector_on_this_node() {
        let mut s = service(serde_json::json!({EGRESS: "true"}));
        s.spec.as_mut().unwrap().selector = Some([("app".into(), "web".into()), ("tier".into(), "a".into())].into());
        let labelled = |ns: &str, node: &str, ip: &str, labels: serde_json::Value| -> Pod {
            let mut p = pod(ns, node, ip);
            p.metadata.labels = serde_json::from_value(labels).unwrap();
            p
        };
        let pods = [
            labelled("shop", "a", "10.244.1.5", serde_json::json!({"app": "web", "tier": "a"})),
            labelled("shop", "a", "10.244.1.6", serde_json::json!({"app": "web", "tier": "b"})),
            labelled("shop", "b", "10.244.2.5", serde_json::json!({"app": "web", "tier": "a"})),
            labelled("bank", "a", "10.244.1.7", serde_json::json!({"app": "web", "tier": "a"})),
        ];
        let pods: Vec<&Pod> = pods.iter().collect();
        let e = egress_service(&s, &Index::new(&[], &pods, "a")).unwrap();
        assert_eq!(e.selected, vec!["10.244.1.5".parse::<Ipv4Addr>().unwrap()]);
        s.spec.as_mut().unwrap().selector = None;
        assert!(egress_service(&s, &Index::new(&[], &pods, "a")).unwrap().selected.is_empty(), "no selector");
    }

    /// Second round, item 14: an EndpointSlice anyone in the namespace can
    /// write names only this namespace's pods, at their own addresses.
    #[test]
    fn round2_item14_an_endpoint_counts_only_as_a_real_pod_of_the_namespace() {
        let s = service(serde_json::json!({EGRESS: "true"}));
        let ok = slice("a", "10.244.1.5", Some(true));
        let theirs = pod("bank", "a", "10.244.1.5");
        let mine = pod("shop", "a", "10.244.1.5");
        let on =
            |pods: &[&Pod], sl: &EndpointSlice| egress_service(&s, &Index::new(&[sl], pods, "a")).unwrap().endpoints;
        assert_eq!(on(&[&mine], &ok), vec!["10.244.1.5".parse::<Ipv4Addr>().unwrap()]);
        assert!(on(&[&theirs], &ok).is_empty(), "another namespace's pod");
        assert!(on(&[], &ok).is_empty(), "no such pod on this node");
        let mut elsewhere = ok.clone();
        elsewhere.endpoints[0].target_ref.as_mut().unwrap().namespace = Some("bank".into());
        assert!(on(&[&theirs, &mine], &elsewhere).is_empty(), "a target in another namespace");
        let mut forged = ok.clone();
        forged.endpoints[0].addresses = vec!["10.244.1.99".into()];
        assert!(on(&[&mine], &forged).is_empty(), "an address the pod does not have");
    }
}
