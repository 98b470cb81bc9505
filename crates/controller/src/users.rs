//! Which rules name each Eip (`status.usedBy`), kept as the rules' caches
//! change: walking every rule per Eip reconcile made a burst of new rules
//! quadratic (most of the controller's CPU at 50,000 objects).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use kube::runtime::reflector::{ObjectRef as CacheRef, Store};
use natgw_api::{Kind, ObjectRef};
use natgw_kube_support::KindResource;

use crate::Stores;

/// Eip name → the rules seen naming it. Entries are candidates: a lookup
/// checks each against its cache, so an entry a relist left behind (a rule
/// deleted while the watch was down) is dropped there.
#[derive(Clone, Default)]
pub struct Users(Arc<Mutex<HashMap<String, BTreeSet<ObjectRef>>>>);

impl Users {
    /// Takes a rule the cache `store` has just taken in (or dropped).
    pub fn touched<K: KindResource>(&self, store: &Store<K>, rule: &K) {
        let Some(eip) = rule.typed().rule_eip().map(str::to_string) else { return };
        let name = rule.meta().name.clone().unwrap_or_default();
        let present = eip_of(store, &name).as_ref() == Some(&eip);
        let r = ObjectRef::new(K::KIND, name);
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if present {
            map.entry(eip).or_default().insert(r);
        } else if let Some(set) = map.get_mut(&eip) {
            set.remove(&r);
            if set.is_empty() {
                map.remove(&eip);
            }
        }
    }

    /// The rules that name Eip `eip`, sorted, as the caches hold them now.
    pub fn of(&self, stores: &Stores, eip: &str) -> Vec<ObjectRef> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(set) = map.get_mut(eip) else { return Vec::new() };
        set.retain(|r| names(stores, r) == Some(eip.to_string()));
        let out: Vec<ObjectRef> = set.iter().cloned().collect();
        if set.is_empty() {
            map.remove(eip);
        }
        out
    }
}

/// The Eip that rule `name` names in `store`, if the cache holds it.
fn eip_of<K: KindResource>(store: &Store<K>, name: &str) -> Option<String> {
    store.get(&CacheRef::new(name))?.typed().rule_eip().map(str::to_string)
}

/// The Eip that rule `r` names in its cache, if the cache holds it.
fn names(stores: &Stores, r: &ObjectRef) -> Option<String> {
    match r.kind {
        Kind::FloatingIp => eip_of(&stores.floating_ips, &r.name),
        Kind::SnatRule => eip_of(&stores.snat_rules, &r.name),
        Kind::DnatRule => eip_of(&stores.dnat_rules, &r.name),
        _ => None,
    }
}
