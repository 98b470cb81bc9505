//! What the agent holds of the cluster: a watch cache of every kind, the
//! set a round plans from (an `ObjectSet` sharing the caches' objects) and
//! one entry per Eip and rule. A round takes in only the objects the watches saw change since
//! the last one, so its cost follows the change, not the number of objects
//! (walking 10,000 objects was most of a round). The first round, a resync
//! and any relist of a watch walk everything.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use futures::StreamExt;
use kube::Client;
use kube::runtime::watcher::{self, Event as WatchEvent};
use natgw_api::*;
use natgw_kube_support::KindResource;
use natgw_kube_support::claims::held_address;

use crate::claims::Claims;
use crate::dirty::{DirtyCell, mark_one, mark_relisted};
use crate::store::{Changed, Store};

/// Caches of every kind.
#[derive(Clone)]
pub struct Caches {
    /// The controller's address claims: an Eip's `status.ip` is used only
    /// when its claim names the Eip (status alone could be forged).
    pub claims: Claims,
    pub vpcs: Store<Vpc>,
    /// The gateway's VPC's subnets.
    pub subnets: Store<Subnet>,
    /// Subnets of no VPC: external subnets. A second watch, so a second
    /// store (a relist replaces a store whole).
    pub externals: Store<Subnet>,
    pub gateways: Store<NatGateway>,
    pub eips: Store<Eip>,
    pub fips: Store<FloatingIp>,
    pub snats: Store<SnatRule>,
    pub dnats: Store<DnatRule>,
    pub dirty: DirtyCell,
}

/// A cache of K and the future that feeds it; each change marks its
/// object, after the cache holds it, and wakes a round.
pub fn watch<K: KindResource + Project>(
    client: &Client,
    config: watcher::Config,
    dirty: &DirtyCell,
    tx: tokio::sync::mpsc::Sender<()>,
    received: prometheus_client::metrics::counter::Counter,
) -> (Store<K>, impl std::future::Future<Output = ()> + use<K>)
where
    HeldOf<K>: Send + Sync,
{
    let store = Store::<K>::default();
    let lookup = store.clone();
    // Only its name is read, to delete it.
    let cached_of = move |name: &str| lookup.get(name).map(|h| K::named(name, h.spec.clone()));
    let mut stream = natgw_kube_support::decoded_events(client, None, config, "gateway-agent", cached_of);
    let (cache, dirty) = (store.clone(), dirty.clone());
    let fut = async move {
        while let Some(ev) = stream.next().await {
            if let Ok(WatchEvent::InitApply(_) | WatchEvent::Apply(_) | WatchEvent::Delete(_)) = &ev {
                received.inc();
            }
            match ev.map(|ev| cache.apply(ev)) {
                Ok(Changed::One(name)) => mark_one(&dirty, ObjectRef::new(K::KIND, name)),
                Ok(Changed::All) => mark_relisted(&dirty),
                Ok(Changed::Nothing) => continue,
                Err(e) => tracing::warn!(kind = K::kind(&()).as_ref(), error = %e, "watch error"),
            }
            let _ = tx.try_send(());
        }
    };
    (store, fut)
}

/// What an entry reads of its held object.
trait Cached: Send + Sync {
    fn meta(&self) -> &Meta;
    /// A rule's Eip.
    fn eip(&self) -> Option<&str> {
        None
    }
    /// An Eip's gateway.
    fn gateway(&self) -> Option<&str> {
        None
    }
}

impl Cached for HeldEip {
    fn meta(&self) -> &Meta {
        &self.meta
    }
    fn gateway(&self) -> Option<&str> {
        Some(&self.spec.gateway)
    }
}

macro_rules! rule {
    ($spec:ident) => {
        impl Cached for Held<$spec> {
            fn meta(&self) -> &Meta {
                &self.meta
            }
            fn eip(&self) -> Option<&str> {
                Some(&self.spec.eip)
            }
        }
    };
}
rule!(FloatingIpSpec);
rule!(SnatRuleSpec);
rule!(DnatRuleSpec);

/// What the agent holds of an Eip or rule: the cached object itself
/// (shared with the cache, not copied), and whether the controller
/// released it for deletion.
pub struct Entry {
    pub object: ObjectRef,
    cached: Arc<dyn Cached>,
    pub released: bool,
}

impl Entry {
    fn new(kind: Kind, o: Arc<dyn Cached>) -> Entry {
        let m = o.meta();
        let released = m.deleting && !m.finalizers.iter().any(|f| f == CONTROLLER_FINALIZER);
        Entry { object: ObjectRef::new(kind, m.name.clone()), cached: o, released }
    }

    pub fn finalizers(&self) -> &[String] {
        &self.cached.meta().finalizers
    }

    pub fn resource_version(&self) -> Option<&str> {
        self.cached.meta().resource_version.as_deref()
    }

    pub fn generation(&self) -> Option<i64> {
        self.cached.meta().generation
    }

    /// The agent's own conditions as the cache last saw them.
    pub fn own(&self) -> Own {
        self.cached.meta().own
    }

    /// A rule's Eip.
    pub fn eip(&self) -> Option<&str> {
        self.cached.eip()
    }

    /// An Eip's gateway.
    pub fn gateway(&self) -> Option<&str> {
        self.cached.gateway()
    }
}

/// Each cached Eip's and rule's entry, kept until its resourceVersion
/// moves, and the rules that name each Eip (an Eip that comes or goes
/// changes whose its rules are).
#[derive(Default)]
pub struct Entries {
    /// Hashed: a B-tree filled in order was half-empty nodes, about 8 MB
    /// more at 100k. Walks sort what they take.
    by_ref: HashMap<ObjectRef, Arc<Entry>>,
    /// (Eip, rule) pairs, one ordered set: a set per Eip was a B-tree node
    /// of about 400 bytes for one rule, 50 MB at 100k FloatingIps.
    rules_of: BTreeSet<(Name, ObjectRef)>,
}

/// The kinds that name an Eip.
const RULE_KINDS: [Kind; 3] = [Kind::FloatingIp, Kind::SnatRule, Kind::DnatRule];

impl Entries {
    pub fn get(&self, r: &ObjectRef) -> Option<&Arc<Entry>> {
        self.by_ref.get(r)
    }

    /// Every entry, in no order.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.by_ref.values()
    }

    pub fn rules_of(&self, eip: &str) -> impl Iterator<Item = &ObjectRef> {
        // The lowest ref an Eip's rule can have: where its pairs begin.
        let lowest = RULE_KINDS.into_iter().min().unwrap_or(Kind::FloatingIp);
        self.rules_of
            .range((Name::from(eip), ObjectRef::new(lowest, ""))..)
            .take_while(move |(e, _)| e == eip)
            .map(|(_, r)| r)
    }

    fn put(&mut self, e: Entry) {
        self.remove(&e.object);
        if let Some(eip) = e.eip() {
            self.rules_of.insert((eip.into(), e.object.clone()));
        }
        self.by_ref.insert(e.object.clone(), Arc::new(e));
    }

    fn remove(&mut self, r: &ObjectRef) {
        let Some(old) = self.by_ref.remove(r) else { return };
        if let Some(eip) = old.eip() {
            self.rules_of.remove(&(eip.into(), r.clone()));
        }
    }
}

/// What a refresh found.
pub struct Refreshed {
    /// Objects taken anew into the set or removed from it.
    pub changed: BTreeSet<ObjectRef>,
    /// Whether any of them changed what the plan reads (a status write
    /// alone does not).
    pub planned: bool,
    /// Whether every object was looked at.
    pub full: bool,
}

/// What the plan reads of an object beyond its spec (which `generation`
/// stands for): identity, deletion, and an Eip's address in use.
type PlanKey = (Option<Uid>, Option<i64>, bool, Option<Name>, Option<Ipv4Addr>);

fn plan_key(m: &Meta, address: Option<Ipv4Addr>) -> PlanKey {
    let version = m.generation.is_none().then(|| m.resource_version.clone()).flatten();
    (m.uid.clone(), m.generation, m.deleting, version, address)
}

/// How one kind is taken into the set: whether the set's object still
/// fits the cached one (beyond its resourceVersion), the copy to use
/// instead of the cached object when it must say something else, its
/// address. The set shares the cache's objects: only a fixed one is a copy.
type Same<'a, K> = Box<dyn Fn(&K, &K) -> bool + 'a>;
type Fix<'a, K> = Box<dyn Fn(&K) -> Option<K> + 'a>;

struct Intake<'a, K> {
    kind: Kind,
    same: Same<'a, K>,
    fix: Fix<'a, K>,
    address: fn(&K) -> Option<Ipv4Addr>,
}

impl<S: Clone, T: Clone> Intake<'_, Held<S, T>> {
    fn plain(kind: Kind) -> Self {
        Intake { kind, same: Box::new(|_, _| true), fix: Box::new(|_| None), address: |_| None }
    }

    /// Brings the set's object `name` up to `cached`.
    fn take(
        &self,
        map: &mut BTreeMap<Name, Arc<Held<S, T>>>,
        name: &str,
        cached: Option<Arc<Held<S, T>>>,
        out: &mut Refreshed,
    ) {
        match (map.get(name), cached) {
            (Some(have), Some(o)) if have.meta.resource_version == o.meta.resource_version && (self.same)(have, &o) => {
            }
            (have, Some(o)) => {
                let o = match (self.fix)(&o) {
                    Some(fixed) => Arc::new(fixed),
                    None => o,
                };
                let key = plan_key(&o.meta, (self.address)(&o));
                out.planned |= have.is_none_or(|h| plan_key(&h.meta, (self.address)(h)) != key);
                map.insert(name.into(), o);
                out.changed.insert(ObjectRef::new(self.kind, name));
            }
            (Some(_), None) => {
                map.remove(name);
                out.planned = true;
                out.changed.insert(ObjectRef::new(self.kind, name));
            }
            (None, None) => {}
        }
    }

    /// Every object of the kind.
    fn walk<K>(&self, map: &mut BTreeMap<Name, Arc<Held<S, T>>>, store: &Store<K>, out: &mut Refreshed)
    where
        K: KindResource + Project<Spec = S, Status = T>,
    {
        self.walk_where(map, store, out, |_| true)
    }

    /// `walk` over the cached objects `keep` picks; the others count as
    /// absent.
    fn walk_where<K>(
        &self,
        map: &mut BTreeMap<Name, Arc<Held<S, T>>>,
        store: &Store<K>,
        out: &mut Refreshed,
        keep: impl Fn(&Held<S, T>) -> bool,
    ) where
        K: KindResource + Project<Spec = S, Status = T>,
    {
        self.walk_state(map, store.state(), out, keep)
    }

    /// `walk_where` over objects of one kind from any number of stores.
    fn walk_state(
        &self,
        map: &mut BTreeMap<Name, Arc<Held<S, T>>>,
        state: Vec<Arc<Held<S, T>>>,
        out: &mut Refreshed,
        keep: impl Fn(&Held<S, T>) -> bool,
    ) {
        let mut seen = HashSet::with_capacity(state.len());
        for o in state.into_iter().filter(|o| keep(o)) {
            let name = o.meta.name.clone();
            self.take(map, &name, Some(o), out);
            seen.insert(name);
        }
        let gone: Vec<Name> = map.keys().filter(|n| !seen.contains(n.as_str())).cloned().collect();
        for name in gone {
            self.take(map, &name, None, out);
        }
    }

    /// Only `name`.
    fn one<K>(&self, map: &mut BTreeMap<Name, Arc<Held<S, T>>>, store: &Store<K>, name: &str, out: &mut Refreshed)
    where
        K: KindResource + Project<Spec = S, Status = T>,
    {
        self.take(map, name, store.get(name), out);
    }
}

impl Caches {
    pub async fn ready(&self) {
        natgw_kube_support::all_listed(&[
            &self.claims,
            &self.vpcs,
            &self.subnets,
            &self.externals,
            &self.gateways,
            &self.eips,
            &self.fips,
            &self.snats,
            &self.dnats,
        ])
        .await
    }

    /// The address `eip` holds: only one the controller claimed for it. A
    /// fixed spec.ip that another Eip holds, or a status.ip that no claim
    /// of this Eip backs, must not be programmed.
    fn held(&self, eip: &HeldEip) -> Option<Ipv4Addr> {
        held_address(eip, |ip| self.claims.holder(ip))
    }

    /// Brings `set` and `entries` up to the caches: the objects the watches
    /// marked and `also` (objects a round dropped from the set and owes a
    /// retry), or all of them when `full` (or a watch listed anew).
    pub fn refresh(
        &self,
        set: &mut ObjectSet,
        entries: &mut Entries,
        full: bool,
        also: &BTreeSet<ObjectRef>,
    ) -> Refreshed {
        let mut dirty = crate::dirty::take(&self.dirty);
        dirty.objects.extend(also.iter().cloned());
        let full = full || dirty.all;
        let mut out = Refreshed { changed: BTreeSet::new(), planned: false, full };
        // Few, and a change to any replans the gateway: always walked. Of
        // the network, only what the gateway's plan reads is taken (its
        // VPC, that VPC's subnets, its external subnet): another tenant's
        // new VPC must not replan every gateway of the cluster.
        Intake::plain(Kind::NatGateway).walk(&mut set.gateways, &self.gateways, &mut out);
        // (The watch holds one gateway; a measured holding may hold more.)
        let gws = self.gateways.state();
        let vpcs: HashSet<&str> = gws.iter().map(|g| g.spec.vpc.as_str()).collect();
        let externals: HashSet<&str> = gws.iter().map(|g| g.spec.external_subnet.as_str()).collect();
        Intake::plain(Kind::Vpc)
            .walk_where(&mut set.vpcs, &self.vpcs, &mut out, |v| vpcs.contains(v.meta.name.as_str()));
        let subnets = [self.subnets.state(), self.externals.state()].concat();
        Intake::plain(Kind::Subnet).walk_state(&mut set.subnets, subnets, &mut out, |s| {
            s.spec.vpc.as_deref().is_some_and(|v| vpcs.contains(v)) || externals.contains(s.meta.name.as_str())
        });
        let eips = Intake::<HeldEip> {
            kind: Kind::Eip,
            // Claims change apart from Eips: an Eip whose address is no
            // longer (or now) held is taken again.
            same: Box::new(|have, cached| have.address() == self.held(cached)),
            fix: Box::new(|e| {
                let unheld = e.address().is_some() && e.address() != self.held(e);
                unheld.then(|| {
                    let mut e = e.clone();
                    e.spec.ip = None;
                    e.status = None;
                    e
                })
            }),
            address: |e| e.address(),
        };
        let fips = Intake::plain(Kind::FloatingIp);
        let snats = Intake::plain(Kind::SnatRule);
        let dnats = Intake::plain(Kind::DnatRule);
        if full {
            eips.walk(&mut set.eips, &self.eips, &mut out);
            fips.walk(&mut set.floating_ips, &self.fips, &mut out);
            snats.walk(&mut set.snat_rules, &self.snats, &mut out);
            dnats.walk(&mut set.dnat_rules, &self.dnats, &mut out);
        } else {
            for r in &dirty.objects {
                match r.kind {
                    Kind::Eip => eips.one(&mut set.eips, &self.eips, &r.name, &mut out),
                    Kind::FloatingIp => fips.one(&mut set.floating_ips, &self.fips, &r.name, &mut out),
                    Kind::SnatRule => snats.one(&mut set.snat_rules, &self.snats, &r.name, &mut out),
                    Kind::DnatRule => dnats.one(&mut set.dnat_rules, &self.dnats, &r.name, &mut out),
                    Kind::Vpc | Kind::Subnet | Kind::NatGateway => {}
                }
            }
        }
        // Entries follow the caches (not the set, which a round trims).
        let cached_entry = |r: &ObjectRef| -> Option<Entry> {
            fn of<K: KindResource + Project>(store: &Store<K>, name: &str) -> Option<Entry>
            where
                HeldOf<K>: Cached + 'static,
            {
                store.get(name).map(|o| Entry::new(K::KIND, o))
            }
            match r.kind {
                Kind::Eip => of(&self.eips, &r.name),
                Kind::FloatingIp => of(&self.fips, &r.name),
                Kind::SnatRule => of(&self.snats, &r.name),
                Kind::DnatRule => of(&self.dnats, &r.name),
                Kind::Vpc | Kind::Subnet | Kind::NatGateway => None,
            }
        };
        // Every cached object is taken in once it changes (a watch marks
        // it) and on a walk, so `changed` is all that needs a new entry:
        // an object a round dropped from the set is taken back by the
        // next walk.
        for r in &out.changed {
            match cached_entry(r) {
                Some(e) => entries.put(e),
                None => entries.remove(r),
            }
        }
        out
    }
}

/// What an agent holds once its watches listed `objects` (each Eip's
/// address claimed for it) and a full round took them in: for measuring
/// its memory without an API server.
pub struct Holdings {
    pub caches: Caches,
    pub set: ObjectSet,
    pub entries: Entries,
}

/// `Holdings` of `objects`, held as a watch's store holds them.
pub fn holdings(objects: ObjectSet) -> Holdings {
    let holders = objects.eips.values().filter_map(|e| {
        let holder = natgw_kube_support::claims::Holder { eip: e.name().into(), uid: e.meta.uid.as_ref()?.to_string() };
        Some((e.address()?, holder))
    });
    let claims = Claims::listed(holders.collect());
    let (lan, external): (Vec<_>, Vec<_>) = objects.subnets.into_iter().partition(|(_, s)| s.spec.vpc.is_some());
    let caches = Caches {
        claims,
        vpcs: Store::listed(objects.vpcs),
        subnets: Store::listed(lan),
        externals: Store::listed(external),
        gateways: Store::listed(objects.gateways),
        eips: Store::listed(objects.eips),
        fips: Store::listed(objects.floating_ips),
        snats: Store::listed(objects.snat_rules),
        dnats: Store::listed(objects.dnat_rules),
        dirty: DirtyCell::default(),
    };
    let (mut set, mut entries) = (ObjectSet::default(), Entries::default());
    caches.refresh(&mut set, &mut entries, true, &BTreeSet::new());
    Holdings { caches, set, entries }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_tenants_network_is_not_taken_in_and_replans_nothing() {
        let text = "apiVersion: natgw.io/v1alpha1\nkind: Vpc\nmetadata: {name: a}\n---\n\
                    apiVersion: natgw.io/v1alpha1\nkind: Vpc\nmetadata: {name: ab}\n---\n\
                    apiVersion: natgw.io/v1alpha1\nkind: Subnet\nmetadata: {name: a-lan}\nspec: {vpc: a, cidr: 10.1.0.0/24, gateway: 10.1.0.1}\n---\n\
                    apiVersion: natgw.io/v1alpha1\nkind: Subnet\nmetadata: {name: ab-lan}\nspec: {vpc: ab, cidr: 10.2.0.0/24, gateway: 10.2.0.1}\n---\n\
                    apiVersion: natgw.io/v1alpha1\nkind: Subnet\nmetadata: {name: ext}\nspec: {cidr: 192.0.2.0/24, gateway: 192.0.2.1}\n---\n\
                    apiVersion: natgw.io/v1alpha1\nkind: Subnet\nmetadata: {name: ext-b}\nspec: {cidr: 198.51.100.0/24, gateway: 198.51.100.1}\n---\n\
                    apiVersion: natgw.io/v1alpha1\nkind: NatGateway\nmetadata: {name: gw}\nspec: {vpc: a, lanInterface: lan0, externalInterface: ext0, externalSubnet: ext}\n";
        let (objects, _) = load_str(std::path::Path::new("t.yaml"), text).unwrap();
        let h = holdings(objects);
        // Its VPC, not the one whose name it prefixes; its VPC's subnet
        // and its external subnet only.
        assert_eq!(h.set.vpcs.keys().map(|n| n.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(h.set.subnets.keys().map(|n| n.as_str()).collect::<Vec<_>>(), ["a-lan", "ext"]);
        // Another tenant's VPC, new: not taken, no replan.
        let (mut set, mut entries) = (h.set, h.entries);
        let mut other = Vpc::new("c", Default::default());
        other.metadata.resource_version = Some("9".into());
        h.caches.vpcs.apply(WatchEvent::Apply(other));
        let r = h.caches.refresh(&mut set, &mut entries, true, &BTreeSet::new());
        assert!(!r.planned && r.changed.is_empty());
        assert!(!set.vpcs.contains_key("c"));
    }

    #[test]
    fn the_rules_of_an_eip_are_its_own_even_when_names_share_a_prefix() {
        let fip = |name: &str, eip: &str| {
            let mut f =
                FloatingIp::new(name, FloatingIpSpec { eip: eip.into(), internal_ip: Ipv4Addr::new(10, 0, 0, 1) });
            f.metadata.resource_version = Some("1".into());
            Entry::new(Kind::FloatingIp, Arc::new(f.project()))
        };
        let dnat = |name: &str, eip: &str| {
            let spec: DnatRuleSpec = serde_json::from_value(serde_json::json!({
                "eip": eip, "externalPort": 80, "internalIp": "10.0.0.2", "internalPort": 8080, "protocol": "tcp"
            }))
            .unwrap();
            Entry::new(Kind::DnatRule, Arc::new(DnatRule::new(name, spec).project()))
        };
        let mut entries = Entries::default();
        let long = "eip-with-a-long-shared-prefix-0123456789";
        entries.put(fip("f1", "e"));
        entries.put(fip("f2", "e-1"));
        entries.put(dnat("d1", "e"));
        entries.put(fip("f3", &format!("{long}-a")));
        entries.put(dnat("d2", &format!("{long}-ab")));
        let of = |e: &Entries, eip: &str| e.rules_of(eip).map(|r| r.to_string()).collect::<Vec<_>>();
        assert_eq!(of(&entries, "e"), ["DnatRule/d1", "FloatingIp/f1"]);
        assert_eq!(of(&entries, "e-1"), ["FloatingIp/f2"]);
        assert_eq!(of(&entries, &format!("{long}-a")), ["FloatingIp/f3"]);
        assert_eq!(of(&entries, &format!("{long}-ab")), ["DnatRule/d2"]);
        assert!(of(&entries, "").is_empty());
        // A rule that moves to another Eip leaves the first.
        entries.put(fip("f1", "e-1"));
        assert_eq!(of(&entries, "e"), ["DnatRule/d1"]);
        assert_eq!(of(&entries, "e-1"), ["FloatingIp/f1", "FloatingIp/f2"]);
        entries.remove(&ObjectRef::new(Kind::DnatRule, "d1"));
        assert!(of(&entries, "e").is_empty());
    }
}
