//! Service egress (pure): which local pods leave the cluster with which
//! VIP. The node agent turns Services, EndpointSlices, Pods and Nodes into
//! an `EgressInput`; `plan_egress` gives the whole content of the egress
//! table and what to tell about each Service.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use natgw_api::Protocol;

use crate::merge_ranges;

/// One egress Service as this node sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressService {
    /// `namespace/name`.
    pub name: String,
    pub vip: Option<Ipv4Addr>,
    /// Destination ports to translate; empty means all traffic.
    pub ports: Vec<(Protocol, u16)>,
    /// Destinations to translate; empty means everywhere outside the cluster.
    pub allowed: Vec<Ipv4Net>,
    /// Destinations never translated.
    pub denied: Vec<Ipv4Net>,
    /// Ready endpoints on this node.
    pub endpoints: Vec<Ipv4Addr>,
    /// Pods on this node that the selector picks, ready or not (fail-closed).
    pub selected: Vec<Ipv4Addr>,
    /// Creation time (RFC 3339): between two Services with one VIP, the
    /// older keeps it.
    pub created: Option<String>,
}

/// Networks at most in one egress annotation: each becomes one element per
/// pod, so a list of thousands would blow up the table.
pub const MAX_NETWORKS: usize = 64;
/// Ports at most in `natgw.io/egress-ports`.
pub const MAX_PORTS: usize = 64;

#[derive(Clone, Debug, Default)]
pub struct EgressInput {
    /// Pod and service CIDRs: never translated.
    pub cluster_nets: Vec<Ipv4Net>,
    /// Pod CIDRs: only endpoints inside them are pods that may be
    /// translated (a hostNetwork backend has the node's address).
    pub pod_nets: Vec<Ipv4Net>,
    /// This node's own addresses: never a pod, never translated.
    pub node_addresses: BTreeSet<Ipv4Addr>,
    /// VIPs this node holds; `None` when the check is off.
    pub local_vips: Option<BTreeSet<Ipv4Addr>>,
    pub services: Vec<EgressService>,
    /// Drop outside-bound traffic of selected pods until their SNAT is in.
    pub fail_closed: bool,
}

/// Inclusive address range of a destination.
pub type Range = (Ipv4Addr, Ipv4Addr);

/// The content of the egress table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressTables {
    pub cluster_nets: Vec<Range>,
    /// Pod -> VIP, every destination port.
    pub snat_all: BTreeMap<Ipv4Addr, Ipv4Addr>,
    /// (pod, protocol, destination port) -> VIP.
    pub snat_ports: BTreeMap<(Ipv4Addr, Protocol, u16), Ipv4Addr>,
    /// Pods translated only toward `allow`.
    pub allow_only: BTreeSet<Ipv4Addr>,
    pub allow: BTreeSet<(Ipv4Addr, Range)>,
    pub deny: BTreeSet<(Ipv4Addr, Range)>,
    /// Pods whose outside-bound traffic is dropped (fail-closed).
    pub hold: BTreeSet<Ipv4Addr>,
}

impl EgressTables {
    /// Nothing to program: the table need not exist at all.
    pub fn is_idle(&self) -> bool {
        self.snat_all.is_empty() && self.snat_ports.is_empty() && self.hold.is_empty()
    }

    /// The VIP a pod's traffic leaves with, if any (for conntrack).
    pub fn vip_of(&self, pod: Ipv4Addr) -> Option<Ipv4Addr> {
        self.snat_all.get(&pod).copied().or_else(|| {
            self.snat_ports.range((pod, Protocol::Tcp, 0)..=(pod, Protocol::Udp, u16::MAX)).next().map(|(_, v)| *v)
        })
    }

    /// The VIP a new flow gets, exactly as the table's rules decide it;
    /// `None` when it leaves untranslated.
    pub fn translation(&self, pod: Ipv4Addr, proto: u8, dst: Ipv4Addr, dport: u16) -> Option<Ipv4Addr> {
        let in_cluster = self.cluster_nets.iter().any(|(a, b)| *a <= dst && dst <= *b);
        let allowed = !self.allow_only.contains(&pod) || pod_range_has(&self.allow, pod, dst);
        if in_cluster || pod_range_has(&self.deny, pod, dst) || !allowed {
            return None;
        }
        let by_port = match proto {
            6 => self.snat_ports.get(&(pod, Protocol::Tcp, dport)),
            17 => self.snat_ports.get(&(pod, Protocol::Udp, dport)),
            _ => None,
        };
        by_port.or_else(|| self.snat_all.get(&pod)).copied()
    }

    /// Every address this table translates to.
    pub fn vips(&self) -> BTreeSet<Ipv4Addr> {
        self.snat_all.values().chain(self.snat_ports.values()).copied().collect()
    }

    /// Every pod that is translated or held.
    pub fn pods(&self) -> BTreeSet<Ipv4Addr> {
        let mut p: BTreeSet<Ipv4Addr> = self.snat_all.keys().copied().collect();
        p.extend(self.snat_ports.keys().map(|k| k.0));
        p.extend(self.hold.iter().copied());
        p
    }
}

/// Whether one of `pod`'s ranges in `set` holds `dst`.
fn pod_range_has(set: &BTreeSet<(Ipv4Addr, Range)>, pod: Ipv4Addr, dst: Ipv4Addr) -> bool {
    let lo = (pod, (Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED));
    let hi = (pod, (Ipv4Addr::BROADCAST, Ipv4Addr::BROADCAST));
    set.range(lo..=hi).any(|(_, (a, b))| *a <= dst && dst <= *b)
}

/// What happened to one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceState {
    /// Its local endpoints leave with the VIP.
    Programmed { vip: Ipv4Addr, pods: usize },
    /// Neither `status.loadBalancer.ingress` nor `spec.loadBalancerIP`.
    NoVip,
    /// Another node holds the VIP: this node may not translate to it.
    VipElsewhere(Ipv4Addr),
    /// No ready endpoint on this node.
    NoLocalEndpoints,
    /// An older Service has the same VIP: one tenant must never leave with
    /// another's address.
    VipTaken { vip: Ipv4Addr, by: String },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPlan {
    pub tables: EgressTables,
    pub services: BTreeMap<String, ServiceState>,
    /// A pod in two egress Services leaves with the first one's VIP (by
    /// name), and of two Services with one VIP the older keeps it:
    /// (the Service to warn, why) for each.
    pub conflicts: Vec<(String, String)>,
    /// Endpoints left out because they are not pods: (Service, address).
    pub not_pods: Vec<(String, Ipv4Addr)>,
}

pub fn plan_egress(input: &EgressInput) -> EgressPlan {
    let mut plan = EgressPlan::default();
    let t = &mut plan.tables;
    t.cluster_nets = merge_ranges(input.cluster_nets.iter().map(|n| (n.network(), n.broadcast())));
    let mut services: Vec<&EgressService> = input.services.iter().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    // Of two Services with one VIP, the older (then the first by name)
    // keeps it; both are told.
    let mut by_age: Vec<&EgressService> = services.clone();
    by_age.sort_by(|a, b| (a.created.is_none(), &a.created, &a.name).cmp(&(b.created.is_none(), &b.created, &b.name)));
    let mut vip_owner: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
    let mut taken: BTreeMap<&str, (Ipv4Addr, &str)> = BTreeMap::new();
    for s in &by_age {
        let Some(vip) = s.vip else { continue };
        match vip_owner.get(&vip) {
            Some(first) => {
                let why = format!("VIP {vip} is also the VIP of {first} (older): {} gets no egress", s.name);
                plan.conflicts.push((first.to_string(), why.clone()));
                plan.conflicts.push((s.name.clone(), why));
                taken.insert(&s.name, (vip, first));
            }
            None => drop(vip_owner.insert(vip, &s.name)),
        }
    }
    let is_pod = |ip: &Ipv4Addr| input.pod_nets.iter().any(|n| n.contains(ip)) && !input.node_addresses.contains(ip);
    let mut owner: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
    for s in &services {
        let state = match s.vip {
            None => ServiceState::NoVip,
            Some(_) if taken.contains_key(s.name.as_str()) => {
                let (vip, by) = taken[s.name.as_str()];
                ServiceState::VipTaken { vip, by: by.to_string() }
            }
            Some(vip) if input.local_vips.as_ref().is_some_and(|l| !l.contains(&vip)) => {
                ServiceState::VipElsewhere(vip)
            }
            Some(_) if s.endpoints.is_empty() => ServiceState::NoLocalEndpoints,
            Some(vip) => {
                let allowed = merge_ranges(s.allowed.iter().map(|n| (n.network(), n.broadcast())));
                let denied = merge_ranges(s.denied.iter().map(|n| (n.network(), n.broadcast())));
                let mut pods = 0;
                for pod in s.endpoints.iter().copied().collect::<BTreeSet<_>>() {
                    if !is_pod(&pod) {
                        plan.not_pods.push((s.name.clone(), pod));
                        continue;
                    }
                    if let Some(first) = owner.get(&pod) {
                        let why =
                            format!("pod {pod} is an endpoint of {first} and {}: it leaves with {first}'s VIP", s.name);
                        plan.conflicts.push((s.name.clone(), why));
                        continue;
                    }
                    owner.insert(pod, &s.name);
                    pods += 1;
                    if s.ports.is_empty() {
                        t.snat_all.insert(pod, vip);
                    }
                    for (proto, port) in &s.ports {
                        t.snat_ports.insert((pod, *proto, *port), vip);
                    }
                    if !allowed.is_empty() {
                        t.allow_only.insert(pod);
                        t.allow.extend(allowed.iter().map(|r| (pod, *r)));
                    }
                    t.deny.extend(denied.iter().map(|r| (pod, *r)));
                }
                ServiceState::Programmed { vip, pods }
            }
        };
        plan.services.insert(s.name.clone(), state);
    }
    if input.fail_closed {
        for s in &services {
            for pod in s.selected.iter().chain(&s.endpoints) {
                if !owner.contains_key(pod) && is_pod(pod) {
                    t.hold.insert(*pod);
                }
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn svc(name: &str, vip: &str, endpoints: &[&str]) -> EgressService {
        EgressService {
            name: name.into(),
            vip: Some(ip(vip)),
            endpoints: endpoints.iter().map(|e| ip(e)).collect(),
            ..Default::default()
        }
    }

    fn input(services: Vec<EgressService>) -> EgressInput {
        EgressInput {
            cluster_nets: vec!["10.244.0.0/16".parse().unwrap(), "10.96.0.0/12".parse().unwrap()],
            pod_nets: vec!["10.244.0.0/16".parse().unwrap()],
            node_addresses: [ip("10.244.1.1"), ip("192.0.2.2"), ip("192.0.2.10"), ip("192.0.2.11")].into(),
            local_vips: Some([ip("192.0.2.10"), ip("192.0.2.11")].into()),
            services,
            fail_closed: false,
        }
    }

    #[test]
    fn local_endpoints_leave_with_the_vip() {
        let p = plan_egress(&input(vec![svc("ns/a", "192.0.2.10", &["10.244.1.5", "10.244.1.6"])]));
        assert_eq!(p.tables.snat_all.len(), 2);
        assert_eq!(p.tables.vip_of(ip("10.244.1.5")), Some(ip("192.0.2.10")));
        assert_eq!(p.services["ns/a"], ServiceState::Programmed { vip: ip("192.0.2.10"), pods: 2 });
        assert_eq!(
            p.tables.cluster_nets,
            vec![(ip("10.96.0.0"), ip("10.111.255.255")), (ip("10.244.0.0"), ip("10.244.255.255"))]
        );
    }

    #[test]
    fn a_vip_held_elsewhere_or_missing_programs_nothing() {
        let mut no_vip = svc("ns/b", "192.0.2.10", &["10.244.1.7"]);
        no_vip.vip = None;
        let p = plan_egress(&input(vec![svc("ns/a", "192.0.2.99", &["10.244.1.5"]), no_vip]));
        assert!(p.tables.is_idle());
        assert_eq!(p.services["ns/a"], ServiceState::VipElsewhere(ip("192.0.2.99")));
        assert_eq!(p.services["ns/b"], ServiceState::NoVip);
        let mut off = input(vec![svc("ns/a", "192.0.2.99", &["10.244.1.5"])]);
        off.local_vips = None;
        assert_eq!(plan_egress(&off).tables.snat_all.len(), 1, "with the check off any VIP is used");
    }

    #[test]
    fn ports_and_networks_restrict_the_translation() {
        let mut s = svc("ns/a", "192.0.2.10", &["10.244.1.5"]);
        s.ports = vec![(Protocol::Tcp, 443), (Protocol::Udp, 53)];
        s.allowed = vec!["203.0.113.0/25".parse().unwrap(), "203.0.113.128/25".parse().unwrap()];
        s.denied = vec!["203.0.113.7/32".parse().unwrap()];
        let t = plan_egress(&input(vec![s])).tables;
        assert!(t.snat_all.is_empty());
        assert_eq!(t.snat_ports.len(), 2);
        assert!(t.allow_only.contains(&ip("10.244.1.5")));
        // Adjacent networks merge into one range.
        assert_eq!(
            t.allow.iter().collect::<Vec<_>>(),
            vec![&(ip("10.244.1.5"), (ip("203.0.113.0"), ip("203.0.113.255")))]
        );
        assert_eq!(t.deny.len(), 1);
    }

    #[test]
    fn a_pod_in_two_services_takes_the_first_and_says_so() {
        let p = plan_egress(&input(vec![
            svc("ns/b", "192.0.2.11", &["10.244.1.5"]),
            svc("ns/a", "192.0.2.10", &["10.244.1.5"]),
        ]));
        assert_eq!(p.tables.vip_of(ip("10.244.1.5")), Some(ip("192.0.2.10")));
        assert_eq!(p.conflicts.len(), 1);
        assert_eq!(p.conflicts[0].0, "ns/b");
        assert!(p.conflicts[0].1.contains("ns/a"));
    }

    #[test]
    fn fail_closed_holds_selected_pods_until_they_are_translated() {
        let mut s = svc("ns/a", "192.0.2.10", &["10.244.1.5"]);
        s.selected = vec![ip("10.244.1.5"), ip("10.244.1.6")];
        let mut i = input(vec![s]);
        assert!(plan_egress(&i).tables.hold.is_empty(), "off by default");
        i.fail_closed = true;
        let t = plan_egress(&i).tables;
        assert_eq!(t.hold, [ip("10.244.1.6")].into());
        // With the VIP elsewhere, every selected pod is held.
        i.local_vips = Some(BTreeSet::new());
        assert_eq!(plan_egress(&i).tables.hold.len(), 2);
    }

    #[test]
    fn item5_two_services_with_one_vip_the_older_keeps_it_and_both_are_told() {
        let mut a = svc("tenant-a/web", "192.0.2.10", &["10.244.1.5"]);
        a.created = Some("2026-01-01T00:00:00Z".into());
        let mut b = svc("tenant-b/steal", "192.0.2.10", &["10.244.1.6"]);
        b.created = Some("2026-02-01T00:00:00Z".into());
        let p = plan_egress(&input(vec![b, a]));
        assert_eq!(p.tables.vip_of(ip("10.244.1.5")), Some(ip("192.0.2.10")));
        assert_eq!(p.tables.vip_of(ip("10.244.1.6")), None, "the younger Service never leaves with it");
        assert_eq!(
            p.services["tenant-b/steal"],
            ServiceState::VipTaken { vip: ip("192.0.2.10"), by: "tenant-a/web".into() }
        );
        let told: BTreeSet<&str> = p.conflicts.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(told, ["tenant-a/web", "tenant-b/steal"].into());
    }

    #[test]
    fn item6_endpoints_that_are_not_pods_are_never_translated() {
        // A hostNetwork backend has the node's address; another endpoint
        // lies outside every pod CIDR.
        let p = plan_egress(&input(vec![svc(
            "ns/a",
            "192.0.2.10",
            &["192.0.2.2", "10.244.1.1", "172.16.0.9", "10.244.1.5"],
        )]));
        assert_eq!(p.tables.snat_all.keys().copied().collect::<Vec<_>>(), vec![ip("10.244.1.5")]);
        assert_eq!(p.not_pods.len(), 3);
        let mut i = input(vec![svc("ns/a", "192.0.2.10", &["192.0.2.2"])]);
        i.fail_closed = true;
        assert!(plan_egress(&i).tables.hold.is_empty(), "nor held");
    }

    #[test]
    fn translation_follows_the_rules_of_the_table() {
        let mut s = svc("ns/a", "192.0.2.10", &["10.244.1.5"]);
        s.ports = vec![(Protocol::Tcp, 443)];
        s.denied = vec!["203.0.113.7/32".parse().unwrap()];
        let mut all = svc("ns/b", "192.0.2.11", &["10.244.1.6"]);
        all.allowed = vec!["203.0.113.0/24".parse().unwrap()];
        let t = plan_egress(&input(vec![s, all])).tables;
        let (p5, p6) = (ip("10.244.1.5"), ip("10.244.1.6"));
        assert_eq!(t.translation(p5, 6, ip("203.0.113.1"), 443), Some(ip("192.0.2.10")));
        assert_eq!(t.translation(p5, 6, ip("203.0.113.1"), 80), None, "port not listed");
        assert_eq!(t.translation(p5, 17, ip("203.0.113.1"), 443), None, "protocol not listed");
        assert_eq!(t.translation(p5, 6, ip("203.0.113.7"), 443), None, "denied");
        assert_eq!(t.translation(p6, 6, ip("203.0.113.1"), 80), Some(ip("192.0.2.11")));
        assert_eq!(t.translation(p6, 6, ip("198.51.100.1"), 80), None, "outside the allowed networks");
        assert_eq!(t.translation(p6, 6, ip("10.244.9.9"), 80), None, "inside the cluster");
        assert_eq!(t.vips(), [ip("192.0.2.10"), ip("192.0.2.11")].into());
    }

    #[test]
    fn nothing_to_do_is_idle() {
        assert!(plan_egress(&input(vec![])).tables.is_idle());
    }
}
