//! EIP addresses. An address belongs to the Eip that created its claim, a
//! ConfigMap `natgw-eip-A-B-C-D` in the controller's namespace: the API
//! server's unique names make two Eips holding one address impossible,
//! whichever controller instance is leading. A claim is deleted only when
//! its Eip object is gone, and the gateway agent lets an Eip go only after
//! its address left the gateway: an address is reused only once it is off.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use natgw_api::{Eip, SubnetSpec, parse_ip_range};

pub use natgw_kube_support::claims::{CLAIM_LABEL, Holder, claim_name, holder_of};

/// Why a subnet hands out no address at all: an `excludeIps` entry that
/// does not parse (an object from before the CRD's rule). Refusing is
/// safer than dropping the entry: that would hand out fenced-off addresses.
pub fn exclusions(subnet: &SubnetSpec) -> Result<Vec<(u32, u32)>, String> {
    let mut out = Vec::new();
    for (i, entry) in subnet.exclude_ips.iter().enumerate() {
        let (a, b) = parse_ip_range(entry).map_err(|e| format!("spec.excludeIps[{i}]: {e}"))?;
        out.push((u32::from(a), u32::from(b)));
    }
    Ok(out)
}

/// Addresses never handed out: the exclusions, the router, and the
/// network and broadcast addresses; sorted and merged.
fn blocked(subnet: &SubnetSpec, excluded: &[(u32, u32)]) -> Vec<(u32, u32)> {
    let net: Ipv4Net = subnet.cidr;
    let gw = u32::from(subnet.gateway);
    let mut ranges: Vec<(Ipv4Addr, Ipv4Addr)> =
        excluded.iter().map(|(a, b)| (Ipv4Addr::from(*a), Ipv4Addr::from(*b))).collect();
    ranges.push((Ipv4Addr::from(gw), Ipv4Addr::from(gw)));
    if net.prefix_len() < 31 {
        ranges.push((net.network(), net.network()));
        ranges.push((net.broadcast(), net.broadcast()));
    }
    natgw_plan::merge_ranges(ranges).into_iter().map(|(a, b)| (u32::from(a), u32::from(b))).collect()
}

/// Why `ip` may not be held in `subnet`, if it may not.
pub fn refused(subnet: &SubnetSpec, excluded: &[(u32, u32)], ip: Ipv4Addr) -> Option<String> {
    let n = u32::from(ip);
    if !subnet.cidr.contains(&ip) {
        return Some(format!("{ip} is outside the external subnet {}", subnet.cidr));
    }
    if let Some((a, b)) = excluded.iter().find(|(a, b)| *a <= n && n <= *b) {
        let range = if a == b {
            Ipv4Addr::from(*a).to_string()
        } else {
            format!("{}..{}", Ipv4Addr::from(*a), Ipv4Addr::from(*b))
        };
        return Some(format!("{ip} is excluded by the external subnet's excludeIps ({range})"));
    }
    blocked(subnet, &[])
        .iter()
        .any(|(a, b)| *a <= n && n <= *b)
        .then(|| format!("{ip} is the external subnet's router, network or broadcast address"))
}

/// The lowest address of `subnet` that is neither blocked nor `taken`,
/// and how many jumps finding it took. It jumps over whole blocked ranges
/// and runs of taken addresses, so its cost grows with the number of
/// exclusions and claims, never with the size of the subnet.
pub fn lowest_free<V>(
    subnet: &SubnetSpec,
    excluded: &[(u32, u32)],
    taken: &BTreeMap<Ipv4Addr, V>,
) -> (Option<Ipv4Addr>, usize) {
    lowest_free_from(subnet, excluded, taken, 0)
}

/// `lowest_free`, for a caller that knows every address below `from` is
/// blocked or taken.
fn lowest_free_from<V>(
    subnet: &SubnetSpec,
    excluded: &[(u32, u32)],
    taken: &BTreeMap<Ipv4Addr, V>,
    from: u64,
) -> (Option<Ipv4Addr>, usize) {
    let blocked = blocked(subnet, excluded);
    let (first, last) = (u32::from(subnet.cidr.network()) as u64, u32::from(subnet.cidr.broadcast()) as u64);
    let mut candidate = first.max(from);
    let mut jumps = 0;
    while candidate <= last {
        jumps += 1;
        let c = candidate as u32;
        // The blocked range holding c, if any (ranges are sorted, disjoint).
        let i = blocked.partition_point(|(_, b)| *b < c);
        if let Some((a, b)) = blocked.get(i)
            && *a <= c
        {
            candidate = *b as u64 + 1;
            continue;
        }
        let mut next = candidate;
        for (ip, _) in taken.range(Ipv4Addr::from(c)..) {
            if u32::from(*ip) as u64 != next {
                break;
            }
            next += 1;
        }
        if next == candidate {
            return (Some(Ipv4Addr::from(c)), jumps);
        }
        candidate = next;
    }
    (None, jumps)
}

/// What the controller decided for one Eip.
pub enum Outcome {
    /// The Eip holds this address (its claim is persisted).
    Held(Ipv4Addr),
    /// Its fixed address belongs to another Eip.
    Taken { ip: Ipv4Addr, by: String },
    /// The external subnet has no free address left.
    Exhausted,
    /// The gateway or its external subnet does not exist (yet).
    NoSubnet,
    /// The external subnet's `excludeIps` cannot be read: nothing is handed out.
    BadSubnet(String),
    /// The fixed `spec.ip` may not be held: excluded, outside the subnet,
    /// or its router, network or broadcast address.
    Refused(String),
}

/// The claims this controller knows of: one list per leadership term, then
/// its own writes. Without it, N Eips created at once each listed every
/// claim and raced for the same lowest address: O(N²) requests. The API
/// server stays the arbiter: a stale entry costs a retry, never a double
/// allocation.
#[derive(Default)]
pub struct Book {
    cell: tokio::sync::OnceCell<std::sync::Mutex<Claims>>,
    /// Where the names of Eips waiting on a full subnet go when an address
    /// is let go or a subnet changes (the Eip controller's triggers).
    wake: Option<futures::channel::mpsc::UnboundedSender<String>>,
}

#[derive(Default)]
struct Claims {
    by_ip: BTreeMap<Ipv4Addr, Holder>,
    by_uid: HashMap<String, Ipv4Addr>,
    /// Per subnet (and its exclusions), an address below which every one
    /// is blocked or taken. Scanning from the network address walked every
    /// claim below the first free one: a burst of n Eips cost O(n²), and
    /// 34,500 Eips waiting on a full /16 kept the controller at 100% CPU,
    /// each retry walking 65,533 claims.
    scan_from: HashMap<ScanKey, u64>,
    /// Eips told their subnet is full: woken by a release or a subnet's
    /// change instead of polling.
    waiting: BTreeSet<String>,
    /// Claims listed without their Eip's gateway label (written before
    /// claims had it): labelled when their Eip is next reconciled, because
    /// an agent watches only its gateway's claims.
    unlabelled: BTreeSet<Ipv4Addr>,
}

type ScanKey = (ipnet::Ipv4Net, Ipv4Addr, Vec<(u32, u32)>);

impl Claims {
    fn record(&mut self, ip: Ipv4Addr, h: Holder) {
        self.by_uid.insert(h.uid.clone(), ip);
        if let Some(old) = self.by_ip.insert(ip, h.clone())
            && old.uid != h.uid
            && self.by_uid.get(&old.uid) == Some(&ip)
        {
            self.by_uid.remove(&old.uid);
        }
    }

    fn forget(&mut self, ip: Ipv4Addr) {
        if let Some(h) = self.by_ip.remove(&ip)
            && self.by_uid.get(&h.uid) == Some(&ip)
        {
            self.by_uid.remove(&h.uid);
        }
        for ((cidr, _, _), from) in self.scan_from.iter_mut() {
            if cidr.contains(&ip) {
                *from = (*from).min(u32::from(ip) as u64);
            }
        }
    }

    /// The lowest free address of `subnet`, scanned from where the last
    /// scan of it stopped.
    fn lowest_free(&mut self, subnet: &SubnetSpec, excluded: &[(u32, u32)]) -> (Option<Ipv4Addr>, usize) {
        let key = (subnet.cidr, subnet.gateway, excluded.to_vec());
        let from = self.scan_from.get(&key).copied().unwrap_or(0);
        let (found, jumps) = lowest_free_from(subnet, excluded, &self.by_ip, from);
        let past_the_end = u32::from(subnet.cidr.broadcast()) as u64 + 1;
        self.scan_from.insert(key, found.map_or(past_the_end, |ip| u32::from(ip) as u64));
        (found, jumps)
    }
}

impl Book {
    /// A book that sends the names of waiting Eips to `wake`.
    pub fn waking(wake: futures::channel::mpsc::UnboundedSender<String>) -> Self {
        Self { cell: Default::default(), wake: Some(wake) }
    }

    /// Wakes every Eip waiting on a full subnet: an address was let go,
    /// or a subnet changed (wider, fewer exclusions).
    pub fn wake_waiting(&self) {
        let names = self.with(|c| std::mem::take(&mut c.waiting)).unwrap_or_default();
        if let Some(wake) = &self.wake {
            for name in names {
                let _ = wake.unbounded_send(name);
            }
        }
    }

    /// Forgets a deleted Eip's wait (a set of every name ever full would
    /// grow with churn).
    pub fn stop_waiting(&self, eip: &str) {
        self.with(|c| c.waiting.remove(eip));
    }

    async fn claims(&self, api: &Api<ConfigMap>) -> Result<&std::sync::Mutex<Claims>, kube::Error> {
        self.cell
            .get_or_try_init(|| async {
                let mut c = Claims::default();
                for (ip, h, labelled) in claims(api).await? {
                    c.record(ip, h);
                    if !labelled {
                        c.unlabelled.insert(ip);
                    }
                }
                Ok(std::sync::Mutex::new(c))
            })
            .await
    }

    fn with<T>(&self, f: impl FnOnce(&mut Claims) -> T) -> Option<T> {
        Some(f(&mut lock(self.cell.get()?)))
    }
}

fn lock(m: &std::sync::Mutex<Claims>) -> std::sync::MutexGuard<'_, Claims> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Claims an address for `eip`: its fixed `spec.ip`, its current
/// `status.ip`, or the lowest free one.
pub async fn ensure(
    client: &Client,
    ns: &str,
    book: &Book,
    subnet: Option<&SubnetSpec>,
    eip: &Eip,
) -> Result<Outcome, kube::Error> {
    let Some(subnet) = subnet else {
        return Ok(Outcome::NoSubnet);
    };
    let excluded = match exclusions(subnet) {
        Ok(e) => e,
        Err(why) => return Ok(Outcome::BadSubnet(why)),
    };
    if let Some(ip) = eip.spec.ip
        && let Some(why) = refused(subnet, &excluded, ip)
    {
        return Ok(Outcome::Refused(format!("spec.ip: {why}")));
    }
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let me = Holder { eip: eip.name_any(), uid: eip.uid().unwrap_or_default() };
    let claims = book.claims(&api).await?;
    let wanted = eip.address();
    let gateway = eip.spec.gateway.as_str();
    if let Some(ip) = wanted {
        // Held already; an old claim is labelled on the way.
        let held = {
            let c = lock(claims);
            (c.by_ip.get(&ip) == Some(&me)).then(|| c.unlabelled.contains(&ip))
        };
        if let Some(unlabelled) = held {
            if unlabelled {
                label(&api, ip, gateway).await?;
                lock(claims).unlabelled.remove(&ip);
            }
            return Ok(Outcome::Held(ip));
        }
        return match claim(&api, ip, &me, gateway).await? {
            Ok(()) => {
                lock(claims).record(ip, me);
                Ok(Outcome::Held(ip))
            }
            Err(other) => {
                let by = other.eip.clone();
                lock(claims).record(ip, other);
                if eip.spec.ip.is_some() {
                    Ok(Outcome::Taken { ip, by })
                } else {
                    // An allocated address lost to another Eip: allocate anew.
                    allocate(&api, claims, subnet, &excluded, me, gateway).await
                }
            }
        };
    }
    allocate(&api, claims, subnet, &excluded, me, gateway).await
}

/// Gives an old claim its Eip's gateway label (a merge patch: the name,
/// holder and address stay as they are).
async fn label(api: &Api<ConfigMap>, ip: Ipv4Addr, gateway: &str) -> Result<(), kube::Error> {
    let patch = serde_json::json!({"metadata": {"labels": natgw_kube_support::claims::claim_labels(gateway)}});
    api.patch(&claim_name(ip), &PatchParams::default(), &Patch::Merge(&patch)).await.map(drop)
}

async fn allocate(
    api: &Api<ConfigMap>,
    claims: &std::sync::Mutex<Claims>,
    subnet: &SubnetSpec,
    excluded: &[(u32, u32)],
    me: Holder,
    gateway: &str,
) -> Result<Outcome, kube::Error> {
    loop {
        let ip = {
            let mut c = lock(claims);
            // Idempotent per Eip: a reconcile working from a cached copy
            // older than its own status.ip write gets the same address back.
            if let Some(ip) = c.by_uid.get(&me.uid) {
                return Ok(Outcome::Held(*ip));
            }
            let Some(ip) = c.lowest_free(subnet, excluded).0 else {
                c.waiting.insert(me.eip);
                return Ok(Outcome::Exhausted);
            };
            c.waiting.remove(&me.eip);
            // Reserved before the request, so concurrent allocations pick
            // other addresses.
            c.record(ip, me.clone());
            ip
        };
        match claim(api, ip, &me, gateway).await {
            Ok(Ok(())) => return Ok(Outcome::Held(ip)),
            // Someone else's since we last knew: try the next one.
            Ok(Err(other)) => lock(claims).record(ip, other),
            Err(e) => {
                lock(claims).forget(ip);
                return Err(e);
            }
        }
    }
}

/// Creates the claim of `ip` for `me`; the inner error is the holder if
/// another Eip holds it.
async fn claim(
    api: &Api<ConfigMap>,
    ip: Ipv4Addr,
    me: &Holder,
    gateway: &str,
) -> Result<Result<(), Holder>, kube::Error> {
    let cm = natgw_kube_support::claims::claim(ip, me, gateway);
    match api.create(&PostParams::default(), &cm).await {
        Ok(_) => Ok(Ok(())),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let data = api.get(&claim_name(ip)).await?.data.unwrap_or_default();
            let field = |k: &str| data.get(k).cloned().unwrap_or_default();
            let holder = Holder { eip: field("eip"), uid: field("uid") };
            Ok(if holder.uid == me.uid { Ok(()) } else { Err(holder) })
        }
        Err(e) => Err(e),
    }
}

/// Every claim: its address, its holder, and whether it carries a gateway
/// label.
pub async fn claims(api: &Api<ConfigMap>) -> Result<Vec<(Ipv4Addr, Holder, bool)>, kube::Error> {
    let list = api.list(&ListParams::default().labels(&format!("{CLAIM_LABEL}=true"))).await?;
    Ok(list
        .items
        .iter()
        .filter_map(|cm| {
            let (ip, h) = holder_of(cm)?;
            Some((ip, h, natgw_kube_support::claims::gateway_of(cm).is_some()))
        })
        .collect())
}

/// Deletes claims whose Eip no longer exists. Candidates come from the
/// book and the Eip cache (no list per sweep); each is confirmed with the
/// API server before it goes: a claim must never go while its Eip is there.
pub async fn release_orphans(
    client: &Client,
    ns: &str,
    book: &Book,
    cached: impl Fn(&str) -> Option<String>,
) -> Result<usize, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let all = lock(book.claims(&api).await?).by_ip.clone();
    let eips: Api<Eip> = Api::all(client.clone());
    let mut released = 0;
    for (ip, owner) in all {
        if cached(&owner.eip).as_deref() == Some(owner.uid.as_str()) {
            continue;
        }
        let alive = eips.get_opt(&owner.eip).await?.is_some_and(|e| e.uid().as_deref() == Some(owner.uid.as_str()));
        if alive {
            continue;
        }
        match api.delete(&claim_name(ip), &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
        book.with(|c| c.forget(ip));
        released += 1;
    }
    if released > 0 {
        book.wake_waiting();
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(cidr: &str, gw: &str, exclude: &[&str]) -> SubnetSpec {
        SubnetSpec {
            cidr: cidr.parse().unwrap(),
            gateway: gw.parse().unwrap(),
            exclude_ips: exclude.iter().map(|s| s.to_string()).collect(),
            vpc: None,
        }
    }

    fn pick(s: &SubnetSpec, taken: &[&str]) -> Option<Ipv4Addr> {
        let taken: BTreeMap<Ipv4Addr, ()> = taken.iter().map(|t| (t.parse().unwrap(), ())).collect();
        lowest_free(s, &exclusions(s).unwrap(), &taken).0
    }

    #[test]
    fn picks_the_lowest_usable_address() {
        let s = subnet("198.51.100.0/24", "198.51.100.1", &["198.51.100.2..198.51.100.9", "198.51.100.11"]);
        assert_eq!(pick(&s, &[]), Some("198.51.100.10".parse().unwrap()));
        assert_eq!(pick(&s, &["198.51.100.10"]), Some("198.51.100.12".parse().unwrap()));
        assert_eq!(
            pick(&s, &["198.51.100.10", "198.51.100.12", "198.51.100.13"]),
            Some("198.51.100.14".parse().unwrap())
        );
    }

    #[test]
    fn never_hands_out_network_broadcast_or_router() {
        let s = subnet("192.0.2.0/30", "192.0.2.1", &[]);
        assert_eq!(pick(&s, &[]), Some("192.0.2.2".parse().unwrap()));
        assert_eq!(pick(&s, &["192.0.2.2"]), None);
    }

    #[test]
    fn item9_bad_exclusions_refuse_everything_and_fixed_ips_respect_them() {
        for bad in ["10.0.0.9..10.0.0.3", "10.0.0.1-10.0.0.5", "10.0.0.0/28", "nope"] {
            let s = subnet("10.0.0.0/24", "10.0.0.1", &["10.0.0.2", bad]);
            let err = exclusions(&s).unwrap_err();
            assert!(err.starts_with("spec.excludeIps[1]"), "{bad}: {err}");
        }
        let s = subnet("10.0.0.0/24", "10.0.0.1", &["10.0.0.10..10.0.0.20"]);
        let ex = exclusions(&s).unwrap();
        let ip = |t: &str| t.parse::<Ipv4Addr>().unwrap();
        assert!(refused(&s, &ex, ip("10.0.0.15")).unwrap().contains("excluded"));
        assert!(refused(&s, &ex, ip("10.0.1.5")).unwrap().contains("outside"));
        assert!(refused(&s, &ex, ip("10.0.0.255")).unwrap().contains("broadcast"));
        assert_eq!(refused(&s, &ex, ip("10.0.0.21")), None);
    }

    #[test]
    fn item13_allocation_jumps_over_ranges_instead_of_scanning_addresses() {
        // A /8 excluded but for its last usable address: two jumps, not 16M.
        let s = subnet("10.0.0.0/8", "10.0.0.1", &["10.0.0.2..10.255.255.253"]);
        let none: BTreeMap<Ipv4Addr, ()> = BTreeMap::new();
        let (ip, jumps) = lowest_free(&s, &exclusions(&s).unwrap(), &none);
        assert_eq!(ip, Some("10.255.255.254".parse().unwrap()));
        assert!(jumps <= 3, "{jumps} jumps");
        // Exhausted: the same, with the last address taken.
        let taken: BTreeMap<Ipv4Addr, ()> = [("10.255.255.254".parse().unwrap(), ())].into();
        let (ip, jumps) = lowest_free(&s, &exclusions(&s).unwrap(), &taken);
        assert_eq!(ip, None);
        assert!(jumps <= 4, "{jumps} jumps");
    }

    fn holder(n: u32) -> Holder {
        Holder { eip: format!("eip-{n}"), uid: format!("uid-{n}") }
    }

    #[test]
    fn a_burst_fills_a_slash_16_in_linear_time_and_a_full_one_answers_at_once() {
        let s = subnet("100.64.0.0/16", "100.64.0.1", &[]);
        let ex = exclusions(&s).unwrap();
        let mut c = Claims::default();
        let mut total = 0;
        let mut n = 0;
        while let (Some(ip), jumps) = c.lowest_free(&s, &ex) {
            c.record(ip, holder(n));
            total += jumps;
            n += 1;
        }
        assert_eq!(n, 65_533);
        assert!(total < 3 * n as usize, "{total} jumps for {n} addresses");
        for _ in 0..1000 {
            assert_eq!(c.lowest_free(&s, &ex), (None, 0), "a full subnet is known full");
        }
        // An address let go is the next one handed out.
        c.forget("100.64.3.7".parse().unwrap());
        assert_eq!(c.lowest_free(&s, &ex).0, Some("100.64.3.7".parse().unwrap()));
    }

    proptest::proptest! {
        /// Whatever was claimed and let go, and whichever exclusions apply,
        /// the scan from where the last one stopped finds what a scan of
        /// the whole subnet finds.
        #[test]
        fn scanning_from_the_last_stop_finds_the_lowest_free(
            steps in proptest::collection::vec((proptest::bool::ANY, 0u32..64), 1..200),
            exclude in proptest::bool::ANY,
        ) {
            let excludes: &[&str] = if exclude { &["10.9.0.20..10.9.0.29"] } else { &[] };
            let s = subnet("10.9.0.0/26", "10.9.0.1", excludes);
            let ex = exclusions(&s).unwrap();
            let mut c = Claims::default();
            for (n, (take, offset)) in steps.into_iter().enumerate() {
                let whole = lowest_free(&s, &ex, &c.by_ip).0;
                proptest::prop_assert_eq!(c.lowest_free(&s, &ex).0, whole);
                if take {
                    if let Some(ip) = whole {
                        c.record(ip, holder(n as u32));
                    }
                } else {
                    c.forget(Ipv4Addr::from(u32::from(s.cidr.network()) + offset));
                }
            }
        }
    }
}
