//! The agent's watch caches: its objects by name alone, each as natgw
//! holds it (`natgw_api::Held`: the spec and what is read of the rest).
//! kube's reflector keeps whole objects, each keyed by a reference holding
//! copies of its name, namespace, uid and resourceVersion; natgw's kinds
//! are cluster-scoped and the agent looks them up by name.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use kube::runtime::watcher::Event;
use kube::{Resource, ResourceExt};
use natgw_api::{HeldOf, Name, Project};
use natgw_kube_support::ready::Listed;

/// A map a watch fills. A new list is built aside and takes the map's
/// place once complete: until then the old list answers, as a
/// reflector's store does. The agent's stores and its claims book are
/// both one.
pub(crate) struct Listing<K, V> {
    now: HashMap<K, V>,
    relisting: Option<HashMap<K, V>>,
    /// Whether a list has completed once.
    pub(crate) listed: bool,
}

impl<K, V> Default for Listing<K, V> {
    fn default() -> Self {
        Listing { now: HashMap::new(), relisting: None, listed: false }
    }
}

impl<K: std::hash::Hash + Eq, V> Listing<K, V> {
    /// A map that has listed `now`.
    pub(crate) fn listed(now: HashMap<K, V>) -> Self {
        Listing { now, relisting: None, listed: true }
    }

    /// A new list begins.
    pub(crate) fn begin(&mut self) {
        self.relisting = Some(HashMap::new());
    }

    /// One entry of the new list.
    pub(crate) fn add(&mut self, k: K, v: V) {
        self.relisting.get_or_insert_default().insert(k, v);
    }

    /// The new list is complete and takes the map's place.
    pub(crate) fn finish(&mut self) {
        if let Some(mut fresh) = self.relisting.take() {
            fresh.shrink_to_fit();
            self.now = fresh;
        }
        self.listed = true;
    }
}

impl<K, V> std::ops::Deref for Listing<K, V> {
    type Target = HashMap<K, V>;
    fn deref(&self) -> &HashMap<K, V> {
        &self.now
    }
}

impl<K, V> std::ops::DerefMut for Listing<K, V> {
    fn deref_mut(&mut self) -> &mut HashMap<K, V> {
        &mut self.now
    }
}

/// A cache of one kind, shared between its watch and the rounds.
pub struct Store<K: Project>(Arc<RwLock<Listing<Name, Arc<HeldOf<K>>>>>);

impl<K: Project> Clone for Store<K> {
    fn clone(&self) -> Self {
        Store(self.0.clone())
    }
}

impl<K: Project> Default for Store<K> {
    fn default() -> Self {
        Store(Arc::new(RwLock::new(Listing::default())))
    }
}

/// What a watch event changed in a store.
#[derive(Debug, PartialEq, Eq)]
pub enum Changed {
    /// This object came, changed or went.
    One(Name),
    /// A new list took the old one's place.
    All,
    Nothing,
}

impl<K: Resource + Project> Store<K> {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Listing<Name, Arc<HeldOf<K>>>> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, name: &str) -> Option<Arc<HeldOf<K>>> {
        self.read().get(name).cloned()
    }

    /// A store that has listed `objects`.
    pub fn listed(objects: impl IntoIterator<Item = (Name, Arc<HeldOf<K>>)>) -> Self {
        Store(Arc::new(RwLock::new(Listing::listed(objects.into_iter().collect()))))
    }

    /// Every object, in no order.
    pub fn state(&self) -> Vec<Arc<HeldOf<K>>> {
        self.read().values().cloned().collect()
    }

    /// Takes in one watch event. An object without a name is not kept.
    pub fn apply(&self, ev: Event<K>) -> Changed {
        let mut objects = self.0.write().unwrap_or_else(|p| p.into_inner());
        match ev {
            Event::Init => {
                objects.begin();
                Changed::Nothing
            }
            Event::InitApply(o) => {
                if let Some(name) = o.meta().name.as_deref().map(Name::from) {
                    objects.add(name, Arc::new(o.project()));
                }
                Changed::Nothing
            }
            Event::InitDone => {
                objects.finish();
                Changed::All
            }
            Event::Apply(o) => {
                let Some(name) = o.meta().name.as_deref().map(Name::from) else { return Changed::Nothing };
                objects.insert(name.clone(), Arc::new(o.project()));
                Changed::One(name)
            }
            Event::Delete(o) => {
                let name = Name::from(o.name_any());
                objects.remove(&name);
                Changed::One(name)
            }
        }
    }
}

impl<K: Project> Listed for Store<K>
where
    HeldOf<K>: Send + Sync,
{
    fn listed(&self) -> bool {
        self.0.read().unwrap_or_else(|p| p.into_inner()).listed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natgw_api::{Eip, EipSpec};

    fn eip(name: &str, version: &str) -> Eip {
        let mut e = Eip::new(name, EipSpec { gateway: "gw".into(), ip: None, internal_cidrs: Vec::new() });
        e.metadata.resource_version = Some(version.into());
        e
    }

    fn version(s: &Store<Eip>, name: &str) -> Option<String> {
        s.get(name).and_then(|e| e.meta.resource_version.as_deref().map(String::from))
    }

    #[test]
    fn a_store_answers_only_once_listed_and_follows_changes() {
        let s = Store::default();
        assert!(!s.listed());
        assert_eq!(s.apply(Event::Init), Changed::Nothing);
        assert_eq!(s.apply(Event::InitApply(eip("a", "1"))), Changed::Nothing);
        assert!(!s.listed());
        assert_eq!(s.apply(Event::InitDone), Changed::All);
        assert!(s.listed());
        assert_eq!(version(&s, "a").as_deref(), Some("1"));
        assert_eq!(s.apply(Event::Apply(eip("a", "2"))), Changed::One("a".into()));
        assert_eq!(version(&s, "a").as_deref(), Some("2"));
        assert_eq!(s.apply(Event::Delete(eip("a", "3"))), Changed::One("a".into()));
        assert_eq!(s.get("a").map(|_| ()), None);
        assert!(s.state().is_empty());
    }

    #[test]
    fn a_new_list_answers_only_once_complete_and_drops_what_went_meanwhile() {
        let s = Store::default();
        for ev in [Event::Init, Event::InitApply(eip("a", "1")), Event::InitApply(eip("b", "1")), Event::InitDone] {
            s.apply(ev);
        }
        s.apply(Event::Init);
        s.apply(Event::InitApply(eip("b", "5")));
        // Mid-list, the old list answers.
        assert_eq!(version(&s, "a").as_deref(), Some("1"));
        assert_eq!(version(&s, "b").as_deref(), Some("1"));
        s.apply(Event::InitDone);
        assert_eq!(s.get("a").map(|_| ()), None);
        assert_eq!(version(&s, "b").as_deref(), Some("5"));
        assert_eq!(s.state().len(), 1);
    }

    #[test]
    fn names_sharing_a_long_prefix_are_kept_apart() {
        let s = Store::default();
        let long = "x".repeat(253);
        let (a, b) = (long.clone(), format!("{}y", &long[..252]));
        s.apply(Event::Apply(eip(&a, "1")));
        s.apply(Event::Apply(eip(&b, "2")));
        assert_eq!(version(&s, &a).as_deref(), Some("1"));
        assert_eq!(version(&s, &b).as_deref(), Some("2"));
    }
}
