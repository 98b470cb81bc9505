//! The address claims as the agent reads them: which Eip (name and uid)
//! holds each address. A claim is a ConfigMap, one per Eip, about 2 KB in
//! a watch cache; the agent watches only those labelled with its gateway
//! (1,000 gateways must not each list every claim of the cluster) and
//! keeps three strings of each.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use natgw_kube_support::claims::{Holder, claim_ip, claims_of, holder_of};
use natgw_kube_support::ready::Listed;

use crate::dirty::{DirtyCell, mark_eips, mark_relisted};
use crate::store::Listing;

/// The holders by address, as the watch last saw them.
#[derive(Default)]
struct Book {
    held: Listing<Ipv4Addr, Holder>,
}

/// What an event changed: the Eips whose claim came, went or moved, or
/// every Eip after a new list.
#[derive(Debug, PartialEq, Eq)]
enum Changed {
    Eips(Vec<String>),
    All,
    Nothing,
}

/// The address a claim is for and its holder, only when the name and the
/// data agree: a claim edited to say another address backs neither.
fn read(cm: &ConfigMap) -> (Option<Ipv4Addr>, Option<Holder>) {
    let named = claim_ip(&cm.name_any());
    let holder = holder_of(cm).filter(|(ip, _)| Some(*ip) == named).map(|(_, h)| h);
    (named, holder)
}

impl Book {
    fn apply(&mut self, ev: Event<ConfigMap>) -> Changed {
        match ev {
            Event::Init => {
                self.held.begin();
                Changed::Nothing
            }
            Event::InitApply(cm) => {
                if let (Some(ip), Some(h)) = read(&cm) {
                    self.held.add(ip, h);
                }
                Changed::Nothing
            }
            Event::InitDone => {
                self.held.finish();
                Changed::All
            }
            Event::Apply(cm) => {
                let (Some(ip), holder) = read(&cm) else { return Changed::Nothing };
                let old = match holder {
                    Some(h) => self.held.insert(ip, h.clone()),
                    None => self.held.remove(&ip),
                };
                self.moved(old, self.held.get(&ip).cloned())
            }
            Event::Delete(cm) => {
                let (Some(ip), _) = read(&cm) else { return Changed::Nothing };
                let old = self.held.remove(&ip);
                self.moved(old, None)
            }
        }
    }

    fn moved(&self, old: Option<Holder>, new: Option<Holder>) -> Changed {
        if old == new {
            return Changed::Nothing;
        }
        let mut eips: Vec<String> = old.into_iter().chain(new).map(|h| h.eip).collect();
        eips.dedup();
        Changed::Eips(eips)
    }
}

/// The claims book, shared between its watch and the rounds.
#[derive(Clone, Default)]
pub struct Claims(Arc<RwLock<Book>>);

impl Claims {
    /// Who holds `ip`'s claim.
    pub fn holder(&self, ip: Ipv4Addr) -> Option<Holder> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).held.get(&ip).cloned()
    }

    fn apply(&self, ev: Event<ConfigMap>) -> Changed {
        self.0.write().unwrap_or_else(|p| p.into_inner()).apply(ev)
    }

    /// A book that has listed `held` (for measuring the agent without an
    /// API server).
    pub fn listed(held: HashMap<Ipv4Addr, Holder>) -> Claims {
        Claims(Arc::new(RwLock::new(Book { held: Listing::listed(held) })))
    }
}

impl Listed for Claims {
    fn listed(&self) -> bool {
        self.0.read().unwrap_or_else(|p| p.into_inner()).held.listed
    }
}

/// The claims of `gateway`'s Eips in `namespace` and the future that
/// keeps them; each change marks the Eips it concerns, once the book holds
/// it, and wakes a round.
pub fn watch(
    client: &Client,
    namespace: &str,
    gateway: &str,
    dirty: &DirtyCell,
    tx: tokio::sync::mpsc::Sender<()>,
    received: prometheus_client::metrics::counter::Counter,
) -> (Claims, impl std::future::Future<Output = ()> + use<>) {
    let claims = Claims::default();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let config = watcher::Config::default().labels(&claims_of(gateway));
    let (book, dirty) = (claims.clone(), dirty.clone());
    let fut = async move {
        let mut stream = watcher::watcher(api, config).default_backoff().boxed();
        while let Some(ev) = stream.next().await {
            if let Ok(Event::InitApply(_) | Event::Apply(_) | Event::Delete(_)) = &ev {
                received.inc();
            }
            match ev.map(|ev| book.apply(ev)) {
                Ok(Changed::Nothing) => continue,
                Ok(Changed::Eips(eips)) => mark_eips(&dirty, eips),
                Ok(Changed::All) => mark_relisted(&dirty),
                Err(e) => tracing::warn!(kind = "ConfigMap", error = %e, "watch error"),
            }
            let _ = tx.try_send(());
        }
    };
    (claims, fut)
}

#[cfg(test)]
mod tests {
    use super::*;
    use natgw_kube_support::claims::{claim, claim_name};

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 1, 69, last)
    }

    fn holder(eip: &str) -> Holder {
        Holder { eip: eip.into(), uid: format!("uid-{eip}") }
    }

    fn listed(claims: &[(u8, &str)]) -> Book {
        let mut b = Book::default();
        b.apply(Event::Init);
        for (last, eip) in claims {
            b.apply(Event::InitApply(claim(ip(*last), &holder(eip), "gw")));
        }
        assert_eq!(b.apply(Event::InitDone), Changed::All);
        b
    }

    #[test]
    fn a_claim_backs_its_holder_until_it_is_deleted() {
        let mut b = listed(&[(205, "a")]);
        assert!(b.held.listed);
        assert_eq!(b.held.get(&ip(205)), Some(&holder("a")));
        assert_eq!(b.apply(Event::Apply(claim(ip(7), &holder("b"), "gw"))), Changed::Eips(vec!["b".into()]));
        // The same claim again (a status write elsewhere, a resync): no Eip moved.
        assert_eq!(b.apply(Event::Apply(claim(ip(7), &holder("b"), "gw"))), Changed::Nothing);
        assert_eq!(b.apply(Event::Delete(claim(ip(205), &holder("a"), "gw"))), Changed::Eips(vec!["a".into()]));
        assert_eq!(b.held.get(&ip(205)), None);
        assert_eq!(b.held.get(&ip(7)), Some(&holder("b")));
    }

    #[test]
    fn a_claim_edited_to_say_another_address_backs_nobody() {
        let mut b = listed(&[(205, "a")]);
        // By hand: the name is 10.1.69.205's, the data says .0 (the
        // seed's eip-del with the network address).
        let mut edited = claim(ip(205), &holder("a"), "gw");
        edited.data.get_or_insert_default().insert("ip".into(), ip(0).to_string());
        assert_eq!(b.apply(Event::Apply(edited)), Changed::Eips(vec!["a".into()]));
        assert!(b.held.is_empty());
        // Nor does a ConfigMap with the label but not a claim's name.
        let mut other = claim(ip(9), &holder("c"), "gw");
        other.metadata.name = Some("natgw-eip-10-1-69-009".into());
        assert_eq!(b.apply(Event::Apply(other)), Changed::Nothing);
        assert!(b.held.is_empty());
    }

    #[test]
    fn a_claim_taken_over_marks_both_eips() {
        let mut b = listed(&[(205, "a")]);
        assert_eq!(
            b.apply(Event::Apply(claim(ip(205), &holder("b"), "gw"))),
            Changed::Eips(vec!["a".into(), "b".into()])
        );
    }

    #[test]
    fn a_new_list_answers_only_once_it_is_complete_and_drops_what_went_meanwhile() {
        let mut b = listed(&[(1, "a"), (2, "b")]);
        b.apply(Event::Init);
        b.apply(Event::InitApply(claim(ip(2), &holder("b"), "gw")));
        // Mid-list, the old list still answers.
        assert_eq!(b.held.get(&ip(1)), Some(&holder("a")));
        assert_eq!(b.apply(Event::InitDone), Changed::All);
        assert_eq!(b.held.get(&ip(1)), None);
        assert_eq!(b.held.get(&ip(2)), Some(&holder("b")));
        assert_eq!(claim_name(ip(2)), "natgw-eip-10-1-69-2");
    }
}
