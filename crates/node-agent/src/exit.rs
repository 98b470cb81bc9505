//! What a SIGTERM means for this node's egress. A restart (helm upgrade,
//! rollout restart, eviction) keeps the table and its flows: the next
//! agent converges from the kernel it finds, so no established
//! connection is cut and new ones keep leaving with the VIP meanwhile.
//! The end of egress on this node (the DaemonSet deleted or gone, or its
//! node selector no longer picking this node) removes everything.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};

/// Why the agent stops.
#[derive(Debug, PartialEq, Eq)]
pub enum Leaving {
    /// The DaemonSet will run an agent here again.
    Restart,
    /// It will not; the reason, for the log.
    End(String),
}

/// Asks the API server which it is.
pub async fn restarting(client: &Client, namespace: &str, name: &str, node: &str) -> Result<Leaving, kube::Error> {
    let Some(ds) = Api::<DaemonSet>::namespaced(client.clone(), namespace).get_opt(name).await? else {
        return Ok(Leaving::End(format!("the DaemonSet {namespace}/{name} is gone")));
    };
    let labels = Api::<Node>::all(client.clone()).get_opt(node).await?.and_then(|n| n.metadata.labels);
    Ok(judge(&ds, labels.as_ref()))
}

/// The pure part: a DaemonSet being deleted, or whose node selector no
/// longer matches this node's labels (or a node that is gone), ends
/// egress here. Affinity and taints are not judged: the chart sets a
/// node selector, and a wrong guess only keeps the table until the next
/// agent (or `natgw node-agent` teardown) removes it.
pub fn judge(ds: &DaemonSet, node_labels: Option<&BTreeMap<String, String>>) -> Leaving {
    if ds.metadata.deletion_timestamp.is_some() {
        return Leaving::End("the DaemonSet is being deleted".into());
    }
    let Some(labels) = node_labels else {
        return Leaving::End("this Node is gone".into());
    };
    let selector = ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()).and_then(|p| p.node_selector.as_ref());
    for (k, v) in selector.into_iter().flatten() {
        if labels.get(k) != Some(v) {
            return Leaving::End(format!("the DaemonSet no longer selects this node ({k}={v})"));
        }
    }
    Leaving::Restart
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(selector: &[(&str, &str)], deleting: bool) -> DaemonSet {
        let mut d: DaemonSet = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "natgw-node-agent"},
            "spec": {"selector": {}, "template": {"spec": {"containers": [],
                "nodeSelector": selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()}}}
        }))
        .unwrap();
        if deleting {
            d.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        }
        d
    }

    fn labels(l: &[(&str, &str)]) -> BTreeMap<String, String> {
        l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_restart_keeps_and_an_end_removes() {
        let node = labels(&[("egress", "on"), ("zone", "a")]);
        assert_eq!(judge(&ds(&[], false), Some(&node)), Leaving::Restart);
        assert_eq!(judge(&ds(&[("egress", "on")], false), Some(&node)), Leaving::Restart);
        assert!(matches!(judge(&ds(&[], true), Some(&node)), Leaving::End(_)), "being deleted");
        assert!(matches!(judge(&ds(&[("egress", "off")], false), Some(&node)), Leaving::End(_)), "label changed");
        assert!(matches!(judge(&ds(&[("gpu", "yes")], false), Some(&node)), Leaving::End(_)), "label gone");
        assert!(matches!(judge(&ds(&[], false), None), Leaving::End(_)), "node gone");
    }
}
