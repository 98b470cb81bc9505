//! What every natgw role needs from Kubernetes, in one place: the
//! controller, the gateway agent and the node agent depend on this crate
//! and never on each other.
//!
//! - `cache`: watch caches that survive undecodable objects;
//! - `ready`: whether a set of caches has listed;
//! - `kind`: what natgw needs to know about each of its kinds;
//! - `status`: conditions and status written with per-writer field managers;
//! - `events`: Warning Events whose message is always the current one;
//! - `claims`: the ConfigMaps that say which Eip holds an address;
//! - `identity`: each gateway agent's own ServiceAccount and bindings;
//! - `health`: /healthz, /readyz and /metrics;
//! - `untyped`: objects as the watches decode them, managedFields skipped;
//! - `backoff`: retries that double their wait, up to a cap;
//! - `heap`: the allocator's upkeep in long-running processes (arenas
//!   capped, freed pages handed back).

pub mod admission;
pub mod backoff;
pub mod cache;
pub mod claims;
pub mod events;
pub mod health;
pub mod heap;
pub mod identity;
pub mod kind;
pub mod ready;
pub mod status;
pub mod untyped;

pub use cache::{Events, cached, cached_events_in, cached_in, decoded_events, undecodable_total};
pub use kind::{KindResource, Typed};
pub use ready::{Listed, all_listed, is_ready};

/// The API client every role uses: the in-cluster config or KUBECONFIG,
/// with deadlines. Without a read timeout a stalled connection hangs a
/// request forever (kube's default); 300 s is past the 290 s a watch asks
/// the server for, so an idle watch is never cut.
pub async fn client() -> Result<kube::Client, kube::Error> {
    let mut config = kube::Config::infer().await.map_err(kube::Error::InferConfig)?;
    config.connect_timeout = Some(std::time::Duration::from_secs(10));
    config.read_timeout = Some(std::time::Duration::from_secs(300));
    config.write_timeout = Some(std::time::Duration::from_secs(30));
    kube::Client::try_from(config)
}

/// An error with its sources, `outer: inner: innermost`, for logs and
/// conditions (a library error keeps its source instead of a string).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

/// `obj` as a server-side apply body: with its apiVersion and kind, which
/// typed k8s-openapi objects leave out when serialized.
pub fn apply_body<K>(obj: &K) -> Result<serde_json::Value, kube::Error>
where
    K: kube::Resource<DynamicType = ()> + serde::Serialize,
{
    let mut body = serde_json::to_value(obj).map_err(kube::Error::SerdeError)?;
    body["apiVersion"] = K::api_version(&()).into();
    body["kind"] = K::kind(&()).into();
    Ok(body)
}
