//! Watch caches that survive objects natgw cannot decode. One object the
//! API server accepted but the Rust types refuse (stored before a CEL rule
//! existed, or written by a newer version) must not fail the whole list:
//! the cache would never become ready and nothing could be judged. Such
//! an object is left out (an earlier good version stays), counted, logged
//! and reported with a Warning Event on it.

use std::collections::HashSet;
use std::fmt::Debug;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ApiResource};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::runtime::{WatchStreamExt, watcher as watch_api};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::events::{Reporter, warning};
use crate::untyped::Untyped;

/// A kind a watch cache can hold.
pub trait Watched: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static {}
impl<K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static> Watched for K {}

/// Objects left out of a cache because they could not be decoded, since
/// the process started (the `natgw_objects_undecodable_total` metric).
pub fn undecodable_total() -> u64 {
    crate::health::undecodable_counter().get()
}

/// A cache of every K (cluster-wide, filtered by `config`) and the stream
/// of its changed objects, `slim`. `reporter` names who publishes the
/// Warning Events about undecodable objects.
pub fn cached<K: Watched>(
    client: &Client,
    config: watcher::Config,
    reporter: &'static str,
) -> (Store<K>, futures::stream::BoxStream<'static, Result<K, watcher::Error>>) {
    cached_in(client, None, config, reporter)
}

/// Leaves each object as `slim` left it.
fn untrimmed<K>(_: &mut K) {}

/// `cached`, for one namespace when `namespace` is given.
pub fn cached_in<K: Watched>(
    client: &Client,
    namespace: Option<&str>,
    config: watcher::Config,
    reporter: &'static str,
) -> (Store<K>, futures::stream::BoxStream<'static, Result<K, watcher::Error>>) {
    let (reader, events) = cached_events_in(client, namespace, config, reporter, untrimmed);
    (reader, events.applied_objects().boxed())
}

pub type Events<K> = futures::stream::BoxStream<'static, Result<WatchEvent<K>, watcher::Error>>;

/// A cache and its stream of watch events themselves, each after the
/// cache took it: for a consumer that must tell a deletion or a relist
/// from a change. `trim` takes out of each object, after `slim`, what
/// this consumer never reads.
pub fn cached_events_in<K: Watched>(
    client: &Client,
    namespace: Option<&str>,
    config: watcher::Config,
    reporter: &'static str,
    trim: fn(&mut K),
) -> (Store<K>, Events<K>) {
    let (reader, writer) = reflector::store();
    let lookup: Store<K> = reader.clone();
    let cached_of = move |name: &str| lookup.get(&reflector::ObjectRef::new(name)).map(|k| (*k).clone());
    let stream = decoded_events(client, namespace, config, reporter, cached_of).modify(trim).reflect(writer).boxed();
    (reader, stream)
}

/// `cached_events_in`'s stream without its cache: each object decoded and
/// slimmed, for a consumer that keeps a cache of its own (holding less of
/// each object than others do).
/// `cached_of` gives the cache's version of an object by name: a deleted
/// object that can no longer be decoded is deleted as that version.
pub fn decoded_events<K: Watched>(
    client: &Client,
    namespace: Option<&str>,
    config: watcher::Config,
    reporter: &'static str,
    cached_of: impl Fn(&str) -> Option<K> + Send + 'static,
) -> Events<K> {
    let cfg = config.page_size(LIST_PAGE);
    // natgw reads no annotation of its own kinds: a tenant's are skipped
    // unread (a Service's egress settings are annotations, so others keep them).
    if K::group(&()) == natgw_api::GROUP {
        events(api::<K, false>(client, namespace), cfg, reporter, cached_of)
    } else {
        events(api::<K, true>(client, namespace), cfg, reporter, cached_of)
    }
}

/// K's objects, in `namespace` or cluster-wide, read as `Untyped`.
fn api<K: Watched, const ANNOTATIONS: bool>(client: &Client, namespace: Option<&str>) -> Api<Untyped<ANNOTATIONS>> {
    let ar = ApiResource::erase::<K>(&());
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

/// `decoded_events` from `api`, whose objects keep their annotations when
/// `ANNOTATIONS`. A list page is held whole while it decodes: 500 objects
/// a page (the default) carrying 250 KiB of annotations each were 125 MB
/// at once, hence `LIST_PAGE`.
fn events<K: Watched, const ANNOTATIONS: bool>(
    api: Api<Untyped<ANNOTATIONS>>,
    config: watcher::Config,
    reporter: &'static str,
    cached_of: impl Fn(&str) -> Option<K> + Send + 'static,
) -> Events<K> {
    let events = api.clone().into_client();
    let mut reported: HashSet<(String, String)> = HashSet::new();
    watch_api(api, config)
        .default_backoff()
        .filter_map(move |ev| {
            let decoded = ev.map(|ev| decode::<K, ANNOTATIONS>(ev, &cached_of));
            let warn = match &decoded {
                Ok(Err(bad)) => {
                    let (obj, err) = &**bad;
                    let key = (obj.uid().unwrap_or_default(), obj.resource_version().unwrap_or_default());
                    reported.insert(key).then(|| (obj.clone(), err.clone()))
                }
                _ => None,
            };
            let events = events.clone();
            async move {
                if let Some((obj, err)) = warn {
                    report::<K, ANNOTATIONS>(&events, &obj, &err, reporter).await;
                }
                match decoded {
                    Ok(Ok(Some(ev))) => Some(Ok(ev)),
                    Ok(Ok(None)) | Ok(Err(_)) => None,
                    Err(e) => Some(Err(e)),
                }
            }
        })
        .modify(slim)
        // Boxed: seven of these in one future overflowed a test thread's stack.
        .boxed()
}

/// What a cache leaves out of each object: managedFields (which `Untyped`
/// never decodes; cleared here too for objects built otherwise) and the
/// copy of the object `kubectl apply` keeps in an annotation. Most of an
/// object's bytes, and never read by natgw.
fn slim<K: Resource>(o: &mut K) {
    let m = o.meta_mut();
    m.managed_fields = None;
    if let Some(a) = m.annotations.as_mut() {
        a.remove(LAST_APPLIED);
        if a.is_empty() {
            m.annotations = None;
        }
    }
}

/// Objects per list page of every watch.
pub const LIST_PAGE: u32 = 200;

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

type Decoded<K, const A: bool> = Result<Option<WatchEvent<K>>, Box<(Untyped<A>, String)>>;

/// The typed event, `None` when there is nothing to tell the cache, or the
/// object that could not be decoded.
fn decode<K, const A: bool>(ev: WatchEvent<Untyped<A>>, cached_of: impl Fn(&str) -> Option<K>) -> Decoded<K, A>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + 'static,
{
    let typed = |o: &Untyped<A>| -> Result<K, String> {
        let value = serde_json::to_value(o).map_err(|e| e.to_string())?;
        serde_path_to_error::deserialize(value).map_err(|e| format!("{}: {}", e.path(), e.inner()))
    };
    Ok(match ev {
        WatchEvent::Init => Some(WatchEvent::Init),
        WatchEvent::InitDone => Some(WatchEvent::InitDone),
        WatchEvent::Apply(o) => Some(WatchEvent::Apply(typed(&o).map_err(|e| Box::new((o, e)))?)),
        WatchEvent::InitApply(o) => Some(WatchEvent::InitApply(typed(&o).map_err(|e| Box::new((o, e)))?)),
        WatchEvent::Delete(o) => match typed(&o) {
            Ok(k) => Some(WatchEvent::Delete(k)),
            // Gone for good: drop the version the cache holds, if any.
            Err(_) => cached_of(&o.name_any()).map(WatchEvent::Delete),
        },
    })
}

async fn report<K: Resource<DynamicType = ()>, const A: bool>(
    client: &Client,
    obj: &Untyped<A>,
    err: &str,
    reporter: &str,
) {
    crate::health::undecodable_counter().inc();
    let (kind, name) = (K::kind(&()).to_string(), obj.name_any());
    tracing::error!(kind, name, error = err, "object cannot be decoded; left out until it is fixed");
    let regarding = ObjectReference {
        api_version: Some(K::api_version(&()).to_string()),
        kind: Some(kind),
        name: Some(name),
        namespace: obj.namespace(),
        uid: obj.uid(),
        ..Default::default()
    };
    let who = Reporter { component: reporter.into(), instance: reporter.into() };
    let note = format!("natgw ignores this object until it is fixed: {err}");
    if let Err(e) = warning(client, &who, regarding, "Undecodable", "Decode", &note).await {
        tracing::warn!(error = %e, "cannot publish Event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;

    #[test]
    fn a_cached_object_leaves_out_what_kubectl_apply_and_field_managers_add() {
        let mut svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web",
                "annotations": {LAST_APPLIED: "{\"a\":1}", "natgw.io/egress": "true"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
            }
        }))
        .unwrap();
        slim(&mut svc);
        assert_eq!(svc.metadata.managed_fields, None);
        let kept: Vec<&String> = svc.metadata.annotations.iter().flat_map(|a| a.keys()).collect();
        assert_eq!(kept, ["natgw.io/egress"]);
        let mut only: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x", "annotations": {LAST_APPLIED: "{}"}}
        }))
        .unwrap();
        slim(&mut only);
        assert_eq!(only.metadata.annotations, None);
    }
}
