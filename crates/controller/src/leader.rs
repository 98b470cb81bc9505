//! Leader election on a Lease: the controllers run only while this
//! instance holds it.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};

use crate::{Error, MANAGER, Options, run};

/// Where the controller's leader election happens.
#[derive(Clone, Debug)]
pub struct Election {
    pub namespace: String,
    pub lease: String,
    /// This instance's identity (the pod name): must be unique.
    pub identity: String,
    pub duration_secs: u64,
    pub grace_secs: u64,
    pub options: Options,
}

/// Runs the controllers only while this instance holds the Lease; stops
/// them as soon as it is lost and waits to win it again. A failing lease
/// watcher is logged and rebuilt, never a silent exit.
pub async fn run_elected(
    client: Client,
    election: Election,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    tokio::pin!(shutdown);
    loop {
        let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &election.lease)
            .with_namespace(&election.namespace)
            .with_identity(&election.identity)
            .with_duration(election.duration_secs)
            .with_grace(election.grace_secs)
            .with_field_manager(MANAGER)
            .build()
            .await;
        let manager = match manager {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(lease = %election.lease, namespace = %election.namespace, error = %e, "cannot set up leader election; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                    _ = &mut shutdown => return Ok(()),
                }
            }
        };
        let (mut leader, mut task) = manager.watch().await;
        let stopped = lead_while_elected(&client, &election, &mut leader, &mut shutdown).await;
        election.options.health.leading(false);
        drop(leader);
        // The manager releases the Lease when the channel goes; one stuck
        // on a stalled connection is not waited for.
        match tokio::time::timeout(RELEASE_WITHIN, &mut task).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "leader election failed; starting over"),
            Ok(Err(e)) => tracing::error!(error = %e, "leader election task died; starting over"),
            Err(_) => {
                task.abort();
                tracing::warn!("the lease manager did not stop in time; starting over");
            }
        }
        if stopped {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// How often a leader confirms that its Lease is being renewed, and how
/// long one look may take.
const CONFIRM_EVERY: Duration = Duration::from_millis(250);
const CONFIRM_WITHIN: Duration = Duration::from_secs(2);
/// How long the lease manager may take to let go after stepping down.
const RELEASE_WITHIN: Duration = Duration::from_secs(5);

/// Resolves once this instance cannot be sure it still holds the Lease:
/// no renewal of it seen (its renewTime moving, with this instance as
/// holder) for the lease's duration less half its grace, or another
/// holder. The lease manager's own renewal has no deadline: on a stalled
/// connection it hangs, still saying "leader", while the Lease expires
/// and a standby takes it. Stepping down first leaves a margin of half
/// the grace (2.5 s by default) before anyone else may lead.
async fn until_unsure(client: &Client, election: &Election) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &election.namespace);
    let limit = Duration::from_millis(election.duration_secs * 1000 - election.grace_secs * 500);
    let mut renewed = Instant::now();
    let mut last = None;
    loop {
        tokio::time::sleep(CONFIRM_EVERY).await;
        // A look never outlasts the time left: a stalled read must not
        // carry this instance past the point where it has to let go.
        let left = limit.saturating_sub(renewed.elapsed());
        let read = tokio::time::timeout(CONFIRM_WITHIN.min(left), api.get(&election.lease)).await;
        if let Ok(Ok(lease)) = read {
            let spec = lease.spec.unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(election.identity.as_str()) {
                tracing::warn!(holder = ?spec.holder_identity, "the Lease names another holder: stepping down");
                return;
            }
            let renew = spec.renew_time.map(|t| t.0);
            if renew != last {
                (renewed, last) = (Instant::now(), renew);
            }
        }
        if renewed.elapsed() >= limit {
            tracing::warn!(since = ?renewed.elapsed(), "no renewal of the Lease seen: stepping down before it expires");
            return;
        }
    }
}

/// Returns true on shutdown, false when the election channel closed or
/// this instance stepped down.
async fn lead_while_elected(
    client: &Client,
    election: &Election,
    leader: &mut tokio::sync::watch::Receiver<bool>,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> bool {
    let health = &election.options.health;
    loop {
        health.leading(false);
        health.probe.ready();
        while !*leader.borrow_and_update() {
            tokio::select! {
                changed = leader.changed() => if changed.is_err() { return false },
                _ = shutdown.as_mut() => return true,
            }
        }
        tracing::info!(identity = %election.identity, "leading");
        health.leading(true);
        health.probe.not_ready("leading: waiting for the caches to list");
        let mut rx = leader.clone();
        let lost = async move {
            while rx.changed().await.is_ok() {
                if !*rx.borrow() {
                    break;
                }
            }
        };
        tokio::select! {
            _ = run(client.clone(), Some(election.identity.clone()), election.namespace.clone(), election.options.clone(), lost) => {
                tracing::warn!(identity = %election.identity, "lost the lease; controllers stopped");
            }
            _ = until_unsure(client, election) => {
                tracing::warn!(identity = %election.identity, "controllers stopped; the election starts over");
                return false;
            }
            // Dropping the channel afterwards releases the lease for a quick handover.
            _ = shutdown.as_mut() => return true,
        }
    }
}
