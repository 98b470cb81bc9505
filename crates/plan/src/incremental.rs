//! `GatewayPlanner`: the same plan as `plan_gateway`, kept up to date by
//! re-weighing only the claims a change touches.
//!
//! A FloatingIp's or DnatRule's outcome depends only on the older claims it
//! shares an EIP or (FloatingIps) an internal address with. So a change
//! re-weighs the group of claims linked to it through those keys, and
//! nothing else. The plan's maps are persistent: the new plan shares all
//! but the changed paths with the last one, and the data plane's diff
//! skips what they share. An Eip's change re-weighs the Eips at its old
//! and new address, then the claims and SnatRules that name it. A
//! SnatRule's outcome depends only on the older rules on the same network,
//! and its network's addresses only on the rules inside it and the one
//! around it: a change re-weighs the rules on its old and new network and
//! splices those networks' SNAT ranges. A change of anything else (a
//! gateway, subnet or Vpc) plans the gateway anew.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use natgw_api::{HeldEip, Kind, Name, ObjectRef, ObjectSet};

use crate::gateway::{
    Scope, Weighed, dnat_claim, eip_addr, fip_claim, plan_with_scope, weigh, weigh_eips, weigh_snats,
};
use crate::snat::splice_window;
use crate::{GatewayPlan, PlanError};

/// The keys a claim holds: the Eip it names, the EIP that resolved to,
/// and a FloatingIp's internal address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Keys {
    eip_name: Name,
    eip: Option<Ipv4Addr>,
    internal: Option<Ipv4Addr>,
}

type Group = (BTreeSet<ObjectRef>, BTreeSet<Ipv4Addr>, BTreeSet<Ipv4Addr>);

/// One gateway's plan and what it takes to change it in O(change).
#[derive(Clone, Debug)]
pub struct GatewayPlanner {
    name: String,
    plan: GatewayPlan,
    scope: Scope,
    keys: BTreeMap<ObjectRef, Keys>,
    // Indexes are flat sets of (key, object): a set per key cost a node
    // allocation per EIP, 190 MB at 100k objects.
    by_eip: BTreeSet<(Ipv4Addr, ObjectRef)>,
    by_internal: BTreeSet<(Ipv4Addr, ObjectRef)>,
    by_eip_name: BTreeSet<(Name, ObjectRef)>,
    /// This gateway's Eips with the address each asks for, and by address.
    eip_ips: BTreeMap<Name, Option<Ipv4Addr>>,
    eips_at: BTreeSet<(Ipv4Addr, Name)>,
    /// Each SnatRule's Eip name and network, and both as indexes.
    snat_keys: BTreeMap<ObjectRef, (Name, Ipv4Net)>,
    snat_by_net: BTreeSet<(Ipv4Net, ObjectRef)>,
    snat_by_eip: BTreeSet<(Name, ObjectRef)>,
}

fn keys_of(scope: &Scope, set: &ObjectSet, r: &ObjectRef) -> Option<Keys> {
    match r.kind {
        Kind::FloatingIp => set.floating_ips.get(r.name.as_str()).map(|f| Keys {
            eip_name: f.spec.eip.as_str().into(),
            eip: scope.eips.get(f.spec.eip.as_str()).copied(),
            internal: Some(f.spec.internal_ip),
        }),
        Kind::DnatRule => set.dnat_rules.get(r.name.as_str()).map(|d| Keys {
            eip_name: d.spec.eip.as_str().into(),
            eip: scope.eips.get(d.spec.eip.as_str()).copied(),
            internal: None,
        }),
        _ => None,
    }
}

fn claim<'a>(set: &'a ObjectSet, r: &ObjectRef) -> Option<Weighed<'a>> {
    match r.kind {
        Kind::FloatingIp => set.floating_ips.get(r.name.as_str()).map(|f| fip_claim(f)),
        Kind::DnatRule => set.dnat_rules.get(r.name.as_str()).map(|d| dnat_claim(d)),
        _ => None,
    }
}

impl GatewayPlanner {
    /// Plans gateway `name` from scratch.
    pub fn new(set: &ObjectSet, name: &str) -> Result<Self, PlanError> {
        let (plan, scope) = plan_with_scope(set, name)?;
        let mut planner = GatewayPlanner {
            name: name.into(),
            plan,
            scope,
            keys: BTreeMap::new(),
            by_eip: BTreeSet::new(),
            by_internal: BTreeSet::new(),
            by_eip_name: BTreeSet::new(),
            eip_ips: BTreeMap::new(),
            eips_at: BTreeSet::new(),
            snat_keys: BTreeMap::new(),
            snat_by_net: BTreeSet::new(),
            snat_by_eip: BTreeSet::new(),
        };
        for s in set.snat_rules.values() {
            planner.index_snat(
                ObjectRef::new(Kind::SnatRule, s.name()),
                s.spec.eip.as_str().into(),
                s.spec.internal_cidr,
            );
        }
        for e in set.eips.values().filter(|e| e.spec.gateway == name) {
            planner.index_eip(e.name().into(), e.address());
        }
        let refs = set
            .floating_ips
            .keys()
            .map(|n| ObjectRef::new(Kind::FloatingIp, n.as_str()))
            .chain(set.dnat_rules.keys().map(|n| ObjectRef::new(Kind::DnatRule, n.as_str())));
        for r in refs {
            if let Some(k) = keys_of(&planner.scope, set, &r) {
                planner.index(r, k);
            }
        }
        Ok(planner)
    }

    /// The plan as of the last update.
    pub fn plan(&self) -> &GatewayPlan {
        &self.plan
    }

    /// Brings the plan up to `set`, in which the objects `changed` were
    /// added, modified or removed since the last update. FloatingIps and
    /// DnatRules are re-weighed with the claims they share keys with,
    /// SnatRules with the rules on their networks, Eips with the Eips they
    /// share an address with (and the claims and SnatRules that name
    /// them); any other kind plans the gateway anew. An error leaves the
    /// plan as it was.
    pub fn update(&mut self, set: &ObjectSet, changed: &BTreeSet<ObjectRef>) -> Result<(), PlanError> {
        if changed.iter().any(|r| !matches!(r.kind, Kind::FloatingIp | Kind::DnatRule | Kind::Eip | Kind::SnatRule)) {
            *self = GatewayPlanner::new(set, &self.name)?;
            return Ok(());
        }
        let of = |kind: Kind| -> BTreeSet<ObjectRef> { changed.iter().filter(|r| r.kind == kind).cloned().collect() };
        let eips: BTreeSet<&Name> = changed.iter().filter(|r| r.kind == Kind::Eip).map(|r| &r.name).collect();
        let mut claims: BTreeSet<ObjectRef> = of(Kind::FloatingIp);
        claims.extend(of(Kind::DnatRule));
        let mut snats = of(Kind::SnatRule);
        if !eips.is_empty() {
            for name in self.reweigh_eips(set, eips) {
                claims.extend(at(&self.by_eip_name, &name, lowest()).cloned());
                snats.extend(at(&self.snat_by_eip, &name, lowest()).cloned());
            }
        }
        self.reweigh_claims(set, &claims);
        self.reweigh_snats(set, &snats);
        Ok(())
    }

    /// Re-weighs the SnatRules `changed` with every rule on their old and
    /// new networks, and splices those networks' SNAT ranges.
    fn reweigh_snats(&mut self, set: &ObjectSet, changed: &BTreeSet<ObjectRef>) {
        if changed.is_empty() {
            return;
        }
        let mut nets = BTreeSet::new();
        for r in changed {
            if let Some((eip, net)) = self.snat_keys.remove(r) {
                self.snat_by_net.remove(&(net, r.clone()));
                self.snat_by_eip.remove(&(eip, r.clone()));
                nets.insert(net);
            }
            if let Some(s) = set.snat_rules.get(r.name.as_str()) {
                self.index_snat(r.clone(), s.spec.eip.as_str().into(), s.spec.internal_cidr);
                nets.insert(s.spec.internal_cidr);
            }
        }
        let mut group: BTreeSet<ObjectRef> = changed.clone();
        for net in &nets {
            group.extend(at(&self.snat_by_net, net, lowest()).cloned());
            self.scope.snat.remove(net);
        }
        for r in &group {
            self.plan.programmed.remove(r);
        }
        self.plan.conflicts.retain(|c| !group.contains(&c.object));
        let rules = group.iter().filter_map(|r| set.snat_rules.get(r.name.as_str()).map(|s| &**s)).collect();
        weigh_snats(&mut self.plan, set, &mut self.scope, rules);
        for net in nets {
            let window = net.trunc();
            let rules = self.snat_in(window);
            splice_window(&mut self.plan.nat.snat, window, &rules);
        }
        self.plan.conflicts.sort();
    }

    /// The programmed SnatRules inside `window`, and the window itself
    /// under the EIP of the longest rule around it when none holds it.
    fn snat_in(&self, window: Ipv4Net) -> Vec<(Ipv4Net, Ipv4Addr)> {
        let at = |addr: Ipv4Addr, len: u8| Ipv4Net::new(addr, len).unwrap_or(window);
        let span = at(window.network(), 0)..=at(window.broadcast(), 32);
        let won = &self.scope.snat;
        let mut rules: Vec<(Ipv4Net, Ipv4Addr)> = won
            .range(span)
            .filter(|(n, _)| n.prefix_len() >= window.prefix_len())
            .map(|(n, (e, _))| (*n, *e))
            .collect();
        if !won.contains_key(&window) {
            let around = (0..window.prefix_len()).rev().find_map(|len| won.get(&at(window.network(), len).trunc()));
            rules.extend(around.map(|(e, _)| (window, *e)));
        }
        rules
    }

    /// Re-weighs the Eips `changed` with every Eip of this gateway at
    /// their old or new address; returns the names whose outcome may
    /// have changed.
    fn reweigh_eips(&mut self, set: &ObjectSet, changed: BTreeSet<&Name>) -> BTreeSet<Name> {
        let gateway = self.name.clone();
        let mine = |n: &Name| set.eips.get(n.as_str()).map(|e| &**e).filter(|e| e.spec.gateway == gateway);
        let mut ips = BTreeSet::new();
        for n in &changed {
            ips.extend(self.eip_ips.get(*n).copied().flatten());
            ips.extend(mine(n).and_then(HeldEip::address));
        }
        let mut names: BTreeSet<Name> = changed.into_iter().cloned().collect();
        for ip in &ips {
            names.extend(at(&self.eips_at, ip, Name::default()).cloned());
        }
        for n in &names {
            self.unindex_eip(n);
            if let Some(ip) = self.scope.eips.remove(n.as_str()) {
                let addr = eip_addr(&self.plan, &self.scope, ip);
                self.plan.addresses.remove(&addr);
            }
            self.plan.programmed.remove(&ObjectRef::new(Kind::Eip, n.clone()));
        }
        self.plan.conflicts.retain(|c| c.object.kind != Kind::Eip || !names.contains(&c.object.name));
        let group: Vec<&HeldEip> = names.iter().filter_map(mine).collect();
        for e in &group {
            self.index_eip(e.name().into(), e.address());
        }
        weigh_eips(&mut self.plan, &mut self.scope, group);
        names
    }

    /// Re-weighs the claims `changed` with every claim they share an EIP
    /// or an internal address with.
    fn reweigh_claims(&mut self, set: &ObjectSet, changed: &BTreeSet<ObjectRef>) {
        // The keys the changed claims held and hold now.
        let (mut eips, mut internals) = (BTreeSet::new(), BTreeSet::new());
        for r in changed {
            if let Some(old) = self.unindex(r) {
                eips.extend(old.eip);
                internals.extend(old.internal.filter(|_| old.eip.is_some()));
            }
            if let Some(new) = keys_of(&self.scope, set, r) {
                eips.extend(new.eip);
                internals.extend(new.internal.filter(|_| new.eip.is_some()));
                self.index(r.clone(), new);
            }
        }
        let (group, eips, internals) = self.group(changed, eips, internals);
        // Out with what the group produced (every entry at its keys is
        // the group's), then weigh it again.
        let nat = &mut self.plan.nat;
        for e in &eips {
            nat.fip_dnat.remove(e);
            // Tcp is the lowest protocol: the range starts at this EIP.
            let ports: Vec<_> = nat
                .port_fwd
                .range((*e, natgw_api::Protocol::Tcp, 0)..)
                .take_while(|(p, _)| p.0 == *e)
                .map(|(p, _)| *p)
                .collect();
            for p in ports {
                nat.port_fwd.remove(&p);
            }
        }
        for i in &internals {
            nat.fip_snat.remove(i);
        }
        for r in &group {
            self.plan.programmed.remove(r);
        }
        self.plan.conflicts.retain(|c| !group.contains(&c.object));
        let claims: Vec<Weighed> = group.iter().filter_map(|r| claim(set, r)).collect();
        weigh(&mut self.plan, set, &self.scope, claims);
        self.plan.conflicts.sort();
    }

    /// The changed claims and every claim linked to them through an EIP or
    /// an internal address, transitively; and those EIPs and addresses.
    fn group(
        &self,
        changed: &BTreeSet<ObjectRef>,
        mut eips: BTreeSet<Ipv4Addr>,
        mut internals: BTreeSet<Ipv4Addr>,
    ) -> Group {
        let mut group: BTreeSet<ObjectRef> = changed.clone();
        let (mut seen_eips, mut seen_internals) = (BTreeSet::new(), BTreeSet::new());
        while !eips.is_empty() || !internals.is_empty() {
            let mut found = Vec::new();
            for e in std::mem::take(&mut eips) {
                if seen_eips.insert(e) {
                    found.extend(at(&self.by_eip, &e, lowest()));
                }
            }
            for i in std::mem::take(&mut internals) {
                if seen_internals.insert(i) {
                    found.extend(at(&self.by_internal, &i, lowest()));
                }
            }
            for r in found {
                if group.insert(r.clone())
                    && let Some(k) = self.keys.get(r)
                {
                    eips.extend(k.eip.filter(|e| !seen_eips.contains(e)));
                    internals.extend(k.internal.filter(|i| k.eip.is_some() && !seen_internals.contains(i)));
                }
            }
        }
        (group, seen_eips, seen_internals)
    }

    fn index_eip(&mut self, name: Name, ip: Option<Ipv4Addr>) {
        if let Some(ip) = ip {
            self.eips_at.insert((ip, name.clone()));
        }
        self.eip_ips.insert(name, ip);
    }

    fn unindex_eip(&mut self, name: &Name) {
        if let Some(Some(ip)) = self.eip_ips.remove(name) {
            self.eips_at.remove(&(ip, name.clone()));
        }
    }

    fn index_snat(&mut self, r: ObjectRef, eip: Name, net: Ipv4Net) {
        self.snat_by_net.insert((net, r.clone()));
        self.snat_by_eip.insert((eip.clone(), r.clone()));
        self.snat_keys.insert(r, (eip, net));
    }

    fn index(&mut self, r: ObjectRef, k: Keys) {
        self.by_eip_name.insert((k.eip_name.clone(), r.clone()));
        // A claim on no EIP of this gateway shares nothing: it is weighed
        // alone (pending, or another gateway's).
        if let Some(e) = k.eip {
            self.by_eip.insert((e, r.clone()));
            if let Some(i) = k.internal {
                self.by_internal.insert((i, r.clone()));
            }
        }
        self.keys.insert(r, k);
    }

    fn unindex(&mut self, r: &ObjectRef) -> Option<Keys> {
        let k = self.keys.remove(r)?;
        if let Some(e) = k.eip {
            self.by_eip.remove(&(e, r.clone()));
            if let Some(i) = k.internal {
                self.by_internal.remove(&(i, r.clone()));
            }
        }
        self.by_eip_name.remove(&(k.eip_name.clone(), r.clone()));
        Some(k)
    }
}

/// The lowest object reference: where a range over one key starts.
fn lowest() -> ObjectRef {
    ObjectRef::new(Kind::ALL.iter().copied().min().unwrap_or(Kind::Vpc), Name::default())
}

/// The values an index holds under `key`; `first` sorts before all of them.
fn at<'a, K: Ord + Clone, V: Ord>(
    index: &'a BTreeSet<(K, V)>,
    key: &K,
    first: V,
) -> impl Iterator<Item = &'a V> + use<'a, K, V> {
    let key = key.clone();
    index.range((key.clone(), first)..).take_while(move |(k, _)| *k == key).map(|(_, v)| v)
}
