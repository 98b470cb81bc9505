//! Whether caches have listed once. Nothing may be judged from a cache
//! that has not: a restarted controller would see no dependents.

use std::time::Duration;

use kube::runtime::reflector::{Lookup, Store};

/// Whether a cache has listed once, without waiting on it: in kube-runtime
/// 5.0 a store wakes only its last waiter (DelayedInit over a oneshot), and
/// a Controller waits on the same store, so awaiting `wait_until_ready`
/// could sleep forever (seen after a restart).
pub fn is_ready<K>(store: &Store<K>) -> bool
where
    K: Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
}

/// A cache that can say whether it has listed.
pub trait Listed: Sync {
    fn listed(&self) -> bool;
}

impl<K> Listed for Store<K>
where
    K: Lookup + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    fn listed(&self) -> bool {
        is_ready(self)
    }
}

/// Waits until every cache has listed (polled: see `is_ready`).
pub async fn all_listed(caches: &[&dyn Listed]) {
    while !caches.iter().all(|c| c.listed()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
