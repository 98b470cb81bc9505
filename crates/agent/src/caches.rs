//! What the agent holds of the cluster: a watch cache of every kind, the
//! set a round plans from (an `ObjectSet` sharing the caches' objects) and
//! one entry per Eip and rule. A round takes in only the objects the watches saw change since
//! the last one, so its cost follows the change, not the number of objects
//! (walking 10,000 objects was most of a round). The first round, a resync
//! and any relist of a watch walk everything.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt};
use natgw_api::*;
use natgw_kube_support::KindResource;
use natgw_kube_support::claims::held_address;

use crate::claims::Claims;
use crate::own::Own;
use crate::store::{Changed, Store};

/// The objects the watches saw change since the last round took them in.
#[derive(Default)]
pub struct Dirty {
    objects: BTreeSet<ObjectRef>,
    /// A watch listed anew: objects deleted meanwhile were never seen go.
    all: bool,
}

pub type DirtyCell = Arc<Mutex<Dirty>>;

fn mark(cell: &DirtyCell, f: impl FnOnce(&mut Dirty)) {
    f(&mut cell.lock().unwrap_or_else(|p| p.into_inner()));
}

/// Marks Eips by name (their address claims changed).
pub fn mark_eips(cell: &DirtyCell, eips: impl IntoIterator<Item = String>) {
    mark(cell, |d| d.objects.extend(eips.into_iter().map(|n| ObjectRef::new(Kind::Eip, n))));
}

/// Marks everything: a watch listed anew.
pub fn mark_relisted(cell: &DirtyCell) {
    mark(cell, |d| d.all = true);
}

/// Caches of every kind.
#[derive(Clone)]
pub struct Caches {
    /// The controller's address claims: an Eip's `status.ip` is used only
    /// when its claim names the Eip (status alone could be forged).
    pub claims: Claims,
    pub vpcs: Store<Vpc>,
    pub subnets: Store<Subnet>,
    pub gateways: Store<NatGateway>,
    pub eips: Store<Eip>,
    pub fips: Store<FloatingIp>,
    pub snats: Store<SnatRule>,
    pub dnats: Store<DnatRule>,
    pub dirty: DirtyCell,
}

/// A cache of K and the future that feeds it; each change marks its
/// object, after the cache holds it, and wakes a round.
pub fn watch<K: KindResource>(
    client: &Client,
    config: watcher::Config,
    dirty: &DirtyCell,
    tx: tokio::sync::mpsc::Sender<()>,
) -> (Store<K>, impl std::future::Future<Output = ()> + use<K>) {
    let store = Store::<K>::default();
    let lookup = store.clone();
    let cached_of = move |name: &str| lookup.get(name).map(|k| (*k).clone());
    let mut stream = natgw_kube_support::decoded_events(client, None, config, "gateway-agent", trim::<K>, cached_of);
    let (cache, dirty) = (store.clone(), dirty.clone());
    let fut = async move {
        while let Some(ev) = stream.next().await {
            match ev.map(|ev| cache.apply(ev)) {
                Ok(Changed::One(name)) => mark(&dirty, |d| {
                    d.objects.insert(ObjectRef::new(K::KIND, name));
                }),
                Ok(Changed::All) => mark_relisted(&dirty),
                Ok(Changed::Nothing) => continue,
                Err(e) => tracing::warn!(kind = K::kind(&()).as_ref(), error = %e, "watch error"),
            }
            let _ = tx.try_send(());
        }
    };
    (store, fut)
}

/// What the agent's caches leave out beyond what every cache does: labels
/// and annotations (the watches select by label, and nothing the agent
/// plans or reports reads them; one label is a map node of about 540
/// bytes) and the conditions other managers own. Its own conditions are
/// kept as `Own` packs them. Trimming twice changes nothing.
pub fn trim<K: KindResource>(o: &mut K) {
    let m = o.meta_mut();
    m.labels = None;
    m.annotations = None;
    if let Some(conditions) = o.conditions_mut() {
        *conditions = Own::cached(conditions).pack().into_iter().collect();
    }
}

/// What an entry reads of its cached object.
trait Cached: Send + Sync {
    fn meta(&self) -> &ObjectMeta;
    fn conditions(&self) -> &[Condition];
    fn typed(&self) -> natgw_kube_support::Typed<'_>;
}

impl<K: KindResource> Cached for K {
    fn meta(&self) -> &ObjectMeta {
        Resource::meta(self)
    }
    fn conditions(&self) -> &[Condition] {
        KindResource::conditions(self)
    }
    fn typed(&self) -> natgw_kube_support::Typed<'_> {
        KindResource::typed(self)
    }
}

/// What the agent holds of an Eip or rule: the cached object itself
/// (shared with the cache, not copied), and whether the controller
/// released it for deletion.
pub struct Entry {
    pub object: ObjectRef,
    cached: Arc<dyn Cached>,
    pub released: bool,
}

impl Entry {
    fn new<K: KindResource>(o: Arc<K>) -> Entry {
        let m = Resource::meta(&*o);
        let released =
            m.deletion_timestamp.is_some() && !m.finalizers.iter().flatten().any(|f| f == CONTROLLER_FINALIZER);
        let object = ObjectRef::new(K::KIND, m.name.clone().unwrap_or_default());
        Entry { object, cached: o, released }
    }

    pub fn finalizers(&self) -> &[String] {
        self.cached.meta().finalizers.as_deref().unwrap_or_default()
    }

    pub fn resource_version(&self) -> &Option<String> {
        &self.cached.meta().resource_version
    }

    pub fn generation(&self) -> Option<i64> {
        self.cached.meta().generation
    }

    /// The agent's own conditions as the cache last saw them.
    pub fn own(&self) -> Own {
        Own::cached(self.cached.conditions())
    }

    /// A rule's Eip.
    pub fn eip(&self) -> Option<&str> {
        self.cached.typed().rule_eip()
    }

    /// An Eip's gateway.
    pub fn gateway(&self) -> Option<&str> {
        match self.cached.typed() {
            natgw_kube_support::Typed::Eip(e) => Some(&e.spec.gateway),
            _ => None,
        }
    }
}

/// Each cached Eip's and rule's entry, kept until its resourceVersion
/// moves, and the rules that name each Eip (an Eip that comes or goes
/// changes whose its rules are).
#[derive(Default)]
pub struct Entries {
    by_ref: BTreeMap<ObjectRef, Arc<Entry>>,
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
type PlanKey = (Option<String>, Option<i64>, bool, Option<String>, Option<Ipv4Addr>);

fn plan_key<K: Resource>(o: &K, address: Option<Ipv4Addr>) -> PlanKey {
    let m = o.meta();
    let version = m.generation.is_none().then(|| m.resource_version.clone()).flatten();
    (m.uid.clone(), m.generation, m.deletion_timestamp.is_some(), version, address)
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

impl<K: Resource<DynamicType = ()> + Clone> Intake<'_, K> {
    fn plain(kind: Kind) -> Self {
        Intake { kind, same: Box::new(|_, _| true), fix: Box::new(|_| None), address: |_| None }
    }

    /// Brings the set's object `name` up to `cached`.
    fn take(&self, map: &mut BTreeMap<Name, Arc<K>>, name: &str, cached: Option<Arc<K>>, out: &mut Refreshed) {
        match (map.get(name), cached) {
            (Some(have), Some(o))
                if have.meta().resource_version == o.meta().resource_version && (self.same)(have, &o) => {}
            (have, Some(o)) => {
                let o = match (self.fix)(&o) {
                    Some(fixed) => Arc::new(fixed),
                    None => o,
                };
                let key = plan_key(&*o, (self.address)(&o));
                out.planned |= have.is_none_or(|h| plan_key(&**h, (self.address)(h)) != key);
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
    fn walk(&self, map: &mut BTreeMap<Name, Arc<K>>, store: &Store<K>, out: &mut Refreshed) {
        let state = store.state();
        let mut seen = HashSet::with_capacity(state.len());
        for o in state {
            let name = o.name_any();
            self.take(map, &name, Some(o), out);
            seen.insert(name);
        }
        let gone: Vec<Name> = map.keys().filter(|n| !seen.contains(n.as_str())).cloned().collect();
        for name in gone {
            self.take(map, &name, None, out);
        }
    }

    /// Only `name`.
    fn one(&self, map: &mut BTreeMap<Name, Arc<K>>, store: &Store<K>, name: &str, out: &mut Refreshed) {
        self.take(map, name, store.get(name), out);
    }
}

impl Caches {
    pub async fn ready(&self) {
        natgw_kube_support::all_listed(&[
            &self.claims,
            &self.vpcs,
            &self.subnets,
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
    fn held(&self, eip: &Eip) -> Option<Ipv4Addr> {
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
        let mut dirty = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()));
        dirty.objects.extend(also.iter().cloned());
        let full = full || dirty.all;
        let mut out = Refreshed { changed: BTreeSet::new(), planned: false, full };
        // Few, and a change to any replans the gateway: always walked.
        Intake::plain(Kind::Vpc).walk(&mut set.vpcs, &self.vpcs, &mut out);
        Intake::plain(Kind::Subnet).walk(&mut set.subnets, &self.subnets, &mut out);
        Intake::plain(Kind::NatGateway).walk(&mut set.gateways, &self.gateways, &mut out);
        let eips = Intake::<Eip> {
            kind: Kind::Eip,
            // Claims change apart from Eips: an Eip whose address is no
            // longer (or now) held is taken again.
            same: Box::new(|have, cached| have.address() == self.held(cached)),
            fix: Box::new(|e| {
                let unheld = e.address().is_some() && e.address() != self.held(e);
                unheld.then(|| {
                    let mut e = e.clone();
                    e.spec.ip = None;
                    if let Some(s) = e.status.as_mut() {
                        s.ip = None;
                    }
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
            fn of<K: KindResource>(store: &Store<K>, name: &str) -> Option<Entry> {
                store.get(name).map(Entry::new)
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

/// `Holdings` of `objects`, each passed through the cache's `trim` as a
/// watch would.
pub fn holdings(objects: ObjectSet) -> Holdings {
    fn list<K: KindResource>(objects: BTreeMap<Name, Arc<K>>) -> Store<K> {
        let store = Store::default();
        store.apply(Event::Init);
        for o in objects.into_values() {
            let mut o = Arc::unwrap_or_clone(o);
            trim(&mut o);
            store.apply(Event::InitApply(o));
        }
        store.apply(Event::InitDone);
        store
    }
    let holders = objects.eips.values().filter_map(|e| {
        let holder = natgw_kube_support::claims::Holder { eip: e.name_any(), uid: e.metadata.uid.clone()? };
        Some((e.address()?, holder))
    });
    let claims = Claims::listed(holders.collect());
    let caches = Caches {
        claims,
        vpcs: list(objects.vpcs),
        subnets: list(objects.subnets),
        gateways: list(objects.gateways),
        eips: list(objects.eips),
        fips: list(objects.floating_ips),
        snats: list(objects.snat_rules),
        dnats: list(objects.dnat_rules),
        dirty: DirtyCell::default(),
    };
    let (mut set, mut entries) = (ObjectSet::default(), Entries::default());
    caches.refresh(&mut set, &mut entries, true, &BTreeSet::new());
    Holdings { caches, set, entries }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn the_agent_caches_no_labels_annotations_or_conditions_it_does_not_own() {
        let condition = |t: &str| {
            serde_json::json!({"type": t, "status": "True", "reason": "R", "message": "",
            "lastTransitionTime": "2026-12-02T18:00:00Z"})
        };
        let mut fip: FloatingIp = serde_json::from_value(serde_json::json!({
            "apiVersion": "natgw.io/v1alpha1", "kind": "FloatingIp",
            "metadata": {"name": "f", "labels": {GATEWAY_LABEL: "gw"}, "annotations": {"note": "x"},
                "creationTimestamp": "2026-12-02T18:00:00Z"},
            "spec": {"eip": "e", "internalIp": "10.0.1.5"},
            "status": {"conditions": [condition("Bound"), condition("Programmed"), condition("Ready")]},
        }))
        .unwrap();
        trim(&mut fip);
        assert_eq!(fip.metadata.labels, None);
        assert_eq!(fip.metadata.annotations, None);
        // Conflict precedence reads the creation time: kept.
        assert!(fip.metadata.creation_timestamp.is_some());
        assert_eq!(KindResource::conditions(&fip).len(), 1, "packed into one");
        let own = Own::cached(KindResource::conditions(&fip));
        let at = Time(k8s_openapi::jiff::Timestamp::from_second(1_796_234_400).unwrap());
        assert_eq!(
            (own.since(0, "True"), own.since(1, "True"), own.since(2, "True")),
            (Some(at.clone()), None, Some(at))
        );
        // Trimmed again (a deleted object's cached version): the same.
        let once = fip.clone();
        trim(&mut fip);
        assert_eq!(serde_json::to_value(&fip).unwrap(), serde_json::to_value(&once).unwrap());
    }

    #[test]
    fn the_rules_of_an_eip_are_its_own_even_when_names_share_a_prefix() {
        let fip = |name: &str, eip: &str| {
            let mut f =
                FloatingIp::new(name, FloatingIpSpec { eip: eip.into(), internal_ip: Ipv4Addr::new(10, 0, 0, 1) });
            f.metadata.resource_version = Some("1".into());
            Entry::new(Arc::new(f))
        };
        let dnat = |name: &str, eip: &str| {
            let spec: DnatRuleSpec = serde_json::from_value(serde_json::json!({
                "eip": eip, "externalPort": 80, "internalIp": "10.0.0.2", "internalPort": 8080, "protocol": "tcp"
            }))
            .unwrap();
            Entry::new(Arc::new(DnatRule::new(name, spec)))
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
