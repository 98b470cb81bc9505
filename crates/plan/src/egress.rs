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
}

#[derive(Clone, Debug, Default)]
pub struct EgressInput {
    /// Pod and service CIDRs: never translated.
    pub cluster_nets: Vec<Ipv4Net>,
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

    /// Every pod that is translated or held.
    pub fn pods(&self) -> BTreeSet<Ipv4Addr> {
        let mut p: BTreeSet<Ipv4Addr> = self.snat_all.keys().copied().collect();
        p.extend(self.snat_ports.keys().map(|k| k.0));
        p.extend(self.hold.iter().copied());
        p
    }
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
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPlan {
    pub tables: EgressTables,
    pub services: BTreeMap<String, ServiceState>,
    /// A pod in two egress Services leaves with the first one's VIP (by
    /// name): (the other Service, why) for each such pod.
    pub conflicts: Vec<(String, String)>,
}

pub fn plan_egress(input: &EgressInput) -> EgressPlan {
    let mut plan = EgressPlan::default();
    let t = &mut plan.tables;
    t.cluster_nets = merge_ranges(input.cluster_nets.iter().map(|n| (n.network(), n.broadcast())));
    let mut services: Vec<&EgressService> = input.services.iter().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    let mut owner: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
    for s in &services {
        let state = match s.vip {
            None => ServiceState::NoVip,
            Some(vip) if input.local_vips.as_ref().is_some_and(|l| !l.contains(&vip)) => {
                ServiceState::VipElsewhere(vip)
            }
            Some(_) if s.endpoints.is_empty() => ServiceState::NoLocalEndpoints,
            Some(vip) => {
                let allowed = merge_ranges(s.allowed.iter().map(|n| (n.network(), n.broadcast())));
                let denied = merge_ranges(s.denied.iter().map(|n| (n.network(), n.broadcast())));
                let mut pods = 0;
                for pod in s.endpoints.iter().copied().collect::<BTreeSet<_>>() {
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
                if !owner.contains_key(pod) {
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
    fn nothing_to_do_is_idle() {
        assert!(plan_egress(&input(vec![])).tables.is_idle());
    }
}
