//! Leader election on a Lease: the controllers run only while this
//! instance holds it.

use std::time::Duration;

use kube::Client;

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
        let (mut leader, task) = manager.watch().await;
        let stopped = lead_while_elected(&client, &election, &mut leader, &mut shutdown).await;
        drop(leader);
        match task.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "leader election failed; starting over"),
            Err(e) => tracing::error!(error = %e, "leader election task died; starting over"),
        }
        if stopped {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Returns true on shutdown, false when the election channel closed.
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
            // Dropping the channel afterwards releases the lease for a quick handover.
            _ = shutdown.as_mut() => return true,
        }
    }
}
