//! Warning Events. Each call creates a new Event: kube-runtime's Recorder
//! counts a repeat of the same reason and keeps the first message, which
//! hid the current reason once the reason changed. Callers say a message
//! once per change.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::Api;

/// Who reports: `natgw.io/<component>`, one instance of it.
#[derive(Clone, Debug)]
pub struct Reporter {
    pub component: String,
    pub instance: String,
}

/// Publishes a Warning Event about `regarding`.
pub async fn warning(
    client: &kube::Client,
    reporter: &Reporter,
    regarding: ObjectReference,
    reason: &str,
    action: &str,
    note: &str,
) -> Result<(), kube::Error> {
    let ns = regarding.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
    let now = k8s_openapi::jiff::Timestamp::now();
    let prefix: String = regarding.name.clone().unwrap_or_default().chars().take(200).collect();
    let event = Event {
        metadata: ObjectMeta {
            name: Some(format!("{prefix}.{:x}", now.as_nanosecond())),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some("Warning".into()),
        reason: Some(reason.into()),
        action: Some(action.into()),
        note: Some(note.chars().take(1024).collect()),
        reporting_controller: Some(format!("natgw.io/{}", reporter.component)),
        reporting_instance: Some(reporter.instance.clone()),
        regarding: Some(regarding),
        ..Default::default()
    };
    let api = Api::<Event>::namespaced(client.clone(), &ns);
    // An Event is often the only trace of why a finalizer went, so a
    // transient refusal is retried a little; never for long, because the
    // caller waits.
    let mut delays = RETRY_DELAYS.iter();
    loop {
        match api.create(&Default::default(), &event).await {
            Ok(_) => return Ok(()),
            Err(e) => match delays.next() {
                Some(d) if transient(&e) => tokio::time::sleep(*d).await,
                _ => return Err(e),
            },
        }
    }
}

const RETRY_DELAYS: [std::time::Duration; 2] =
    [std::time::Duration::from_millis(200), std::time::Duration::from_millis(800)];

/// Worth one more try: the server is busy or restarting, (403) its RBAC
/// cache has not yet seen the grant the chart just created, or (404) the
/// namespace is not there yet (an API server that just started creates
/// `default` a moment after it says it is ready).
fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 403 || s.code == 404 || s.code == 429 || s.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}
