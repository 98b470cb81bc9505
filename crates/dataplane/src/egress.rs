//! The egress table `ip natgw_egress` on a node: fixed rules, and sets and
//! maps that hold everything that varies (a packet costs one lookup per
//! rule; an update touches only the changed elements). The table exists
//! only while there is something to translate or hold, so a node without
//! egress holds no natgw state at all.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use natgw_plan::EgressTables;

use crate::conntrack::Conntrack;
use crate::conntrack::policy::CtEntry;
use crate::nft::elements::{ALLOW, ALLOW_ONLY, CLUSTER_NETS, DENY, EGRESS, HOLD, SNAT_ALL, SNAT_PORTS, TableSet};
use crate::nft::model::{Chain, Change, Family, Mirror, Rule, Table, TableId};
use crate::nft::{self, NftError, dump, netlink};
use crate::{SyncError, netns};

pub const TABLE: &str = "natgw_egress";
/// The egress table on a node, as netlink addresses it.
pub const ID: TableId = TableId { family: Family::Ip, name: TABLE };

/// What one sync did.
#[derive(Clone, Debug, Default)]
pub struct EgressReport {
    pub changed: bool,
    /// The table was written whole (first sync, resync, or after a failure).
    pub full: bool,
    /// nft statements, or elements written over netlink.
    pub statements: usize,
    pub conntrack_deleted: usize,
    pub duration: Duration,
}

/// What the kernel holds: no table (`None`) or this content.
type Known = Mirror<Option<EgressTables>>;

/// A node's network namespace, driven from a dedicated thread.
pub struct Egress {
    worker: netns::NetnsWorker,
    /// What the last successful transaction left in the kernel.
    mirror: Mutex<Known>,
}

/// The egress table: fixed rules, and the sets and maps of `EGRESS` for
/// what varies.
fn table() -> Table {
    let (cluster, deny, allow, allow_only) = (CLUSTER_NETS.name, DENY.name, ALLOW.name, ALLOW_ONLY.name);
    Table {
        family: Family::Ip,
        name: TABLE,
        comment: "owned by natgw node-agent: changes by hand are reverted",
        sets: EGRESS.iter().map(|s| s.set()).collect(),
        chains: vec![
            // Before the usual srcnat chains (CNI masquerade at 100): the
            // first NAT chain that binds wins.
            Chain {
                name: "postrouting",
                kind: "nat",
                hook: "postrouting",
                priority: 99,
                rules: vec![
                    Rule::new("cluster", format!("ip daddr @{cluster} return")),
                    Rule::new("deny", format!("ip saddr . ip daddr @{deny} return")),
                    Rule::new("allow", format!("ip saddr @{allow_only} ip saddr . ip daddr != @{allow} return")),
                    Rule::new(
                        "snat-ports",
                        format!("snat ip to ip saddr . meta l4proto . th dport map @{}", SNAT_PORTS.name),
                    ),
                    Rule::new("snat-all", format!("snat ip to ip saddr map @{}", SNAT_ALL.name)),
                ],
            },
            Chain {
                name: "forward",
                kind: "filter",
                hook: "forward",
                priority: -1,
                rules: vec![Rule::new("hold", format!("ip saddr @{} ip daddr != @{cluster} counter drop", HOLD.name))],
            },
        ],
    }
}

/// What each set and map needs to go from `have` to `want`, as nft text.
fn changes(have: &EgressTables, want: &EgressTables) -> Vec<Change> {
    EGRESS.iter().map(|s| s.text_change(have, want)).collect()
}

/// The whole table, replacing whatever is there, in one transaction.
pub fn full_script(t: &EgressTables) -> String {
    table().full_script(&changes(&EgressTables::default(), t))
}

/// Only the elements that differ; empty when nothing does. A changed
/// map value is a delete and an add in the same transaction.
pub fn diff_script(have: &EgressTables, want: &EgressTables) -> String {
    table().script(&changes(have, want))
}

/// Whether a flow must go because its translation is not the one the
/// table now gives it (pure). `vips`: every address natgw translated to,
/// now or before (the mirror, the kernel's table at a full write, the
/// plan). `local`: the node's own addresses. A flow keeps running exactly
/// when the plan would translate it the same way again, so a periodic
/// full write never cuts a connection.
///
/// The flow is judged where the kernel sent it: the reply tuple's source,
/// after any DNAT (kube-proxy's for a LoadBalancer VIP, externalIP or
/// NodePort, portmap's for a hostPort), which is what the table's rules
/// see in postrouting. Judged by the original destination, every such
/// flow looked untranslated against the rules and was cut at each write.
/// A flow delivered to the node itself never reaches postrouting.
pub fn is_stale(e: &CtEntry, want: &EgressTables, vips: &BTreeSet<Ipv4Addr>, local: &BTreeSet<Ipv4Addr>) -> bool {
    let (o, r) = (e.orig, e.reply);
    let (dst, dport) = (r.src, r.sport);
    if local.contains(&dst) || want.cluster_nets.iter().any(|(a, b)| *a <= dst && dst <= *b) {
        return false;
    }
    if want.hold.contains(&o.src) {
        return true;
    }
    let have = (r.dst != o.src).then_some(r.dst);
    match want.translation(o.src, e.proto, dst, dport) {
        Some(vip) => have != Some(vip),
        // Untranslated or masqueraded by someone else: not natgw's.
        None => have.is_some_and(|a| vips.contains(&a)),
    }
}

/// Deletes the flows `is_stale` picks; their next packet takes the rules
/// now in force (or none).
fn sweep(want: &EgressTables, vips: &BTreeSet<Ipv4Addr>) -> Result<usize, SyncError> {
    // Nothing translated, held or ever translated to: no flow can be
    // stale, and the host's table (every flow of the node) is not walked.
    if want.is_idle() && vips.is_empty() {
        return Ok(0);
    }
    let local = addresses_here(true, true).map_err(SyncError::Addresses)?;
    let ct = Conntrack::open()?;
    let stale = ct.dump_where(|e| is_stale(e, want, vips, &local))?;
    Ok(ct.delete(&stale)?)
}

/// kube-proxy in IPVS mode puts every Service address of the cluster on
/// this dummy interface of every node: none of them is a VIP this node
/// holds.
pub const IPVS_INTERFACE: &str = "kube-ipvs0";

/// The IPv4 addresses of the calling thread's namespace, loopback ones
/// only with `loopback`, those on `IPVS_INTERFACE` only with `ipvs`.
fn addresses_here(loopback: bool, ipvs: bool) -> Result<BTreeSet<Ipv4Addr>, std::io::Error> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
    Ok(addrs
        .filter(|a| ipvs || a.interface_name != IPVS_INTERFACE)
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
        .filter(|ip: &Ipv4Addr| loopback || !ip.is_loopback())
        .collect())
}

/// The addresses the kernel's egress table translates to: what an earlier
/// instance may have left flows behind with. `None` without a table. Read
/// over netlink, as the gateway's table is (no `nft` process).
fn kernel_vips() -> Result<Option<BTreeSet<Ipv4Addr>>, NftError> {
    let socket = dump::socket()?;
    if !dump::table_exists(&socket, ID)? {
        return Ok(None);
    }
    let mut read = EgressTables::default();
    for map in [&SNAT_ALL as &dyn TableSet<EgressTables>, &SNAT_PORTS] {
        dump::elements(&socket, ID, map.name(), |k, v| map.read_bytes(&mut read, k, v))?;
    }
    Ok(Some(read.vips()))
}

/// The egress table's elements as the kernel holds them, read over
/// netlink (hash maps and sets) and from `nft -j` (interval sets, which
/// only nft assembles); `None` without a table. For tests and audits.
pub fn read_tables() -> Result<Option<EgressTables>, NftError> {
    read_back(true)
}

/// `nft -j`'s reading of the same table: every set from the listing.
pub fn list_tables() -> Result<Option<EgressTables>, NftError> {
    read_back(false)
}

fn read_back(hash_over_netlink: bool) -> Result<Option<EgressTables>, NftError> {
    let Some(listing) = nft::read_listing(ID)? else { return Ok(None) };
    let (_, listed) = nft::parse_raw(listing);
    let socket = if hash_over_netlink { Some(dump::socket()?) } else { None };
    let mut read = EgressTables::default();
    for set in EGRESS {
        match &socket {
            Some(s) if !set.interval() => dump::elements(s, ID, set.name(), |k, v| set.read_bytes(&mut read, k, v))?,
            _ => {
                for e in listed.get(set.name()).into_iter().flatten() {
                    set.read_atom(&mut read, e).map_err(|e| NftError::Parse(format!("{}: {e}", set.name())))?;
                }
            }
        }
    }
    read.cluster_nets.sort();
    Ok(Some(read))
}

/// Writes `want` into a table that holds `have`, as a sync does: hash
/// sets over netlink when nothing else changed, else an nft diff; a whole
/// script without `have`. Returns the statements or elements written.
pub fn write_tables(have: Option<&EgressTables>, want: &EgressTables) -> Result<usize, SyncError> {
    Ok(match have.map(|h| (h, netlink::changes(&EGRESS, h, want))) {
        Some((_, Some(maps))) => {
            let n = maps.iter().map(|c| c.delete.len() + c.add.len()).sum();
            if n > 0 {
                netlink::apply_here(ID, &maps)?;
            }
            n
        }
        Some((h, None)) => write_script(&diff_script(h, want))?,
        None => write_script(&full_script(want))?,
    })
}

fn table_exists() -> Result<bool, NftError> {
    let socket = dump::socket()?;
    Ok(dump::table_exists(&socket, ID)?)
}

/// Applies `script`; returns its statements.
fn write_script(script: &str) -> Result<usize, NftError> {
    if !script.is_empty() {
        nft::apply(script)?;
    }
    Ok(script.lines().count())
}

fn converge(mirror: &Known, want: &EgressTables, full: bool) -> Result<(Known, EgressReport), SyncError> {
    let start = Instant::now();
    let mut report = EgressReport::default();
    // Read before the table is replaced: after a crash, only the kernel
    // knows which VIPs the old instance used.
    let mut vips = want.vips();
    if let Some(Some(t)) = mirror.known() {
        vips.extend(t.vips());
    }
    // Whether the table exists: read now, or else what the mirror says.
    let mut present = mirror.known().map(Option::is_some);
    if full || mirror.known().is_none() {
        let kernel = kernel_vips()?;
        present = Some(kernel.is_some());
        vips.extend(kernel.unwrap_or_default());
    }
    let have = match mirror.known() {
        Some(Some(t)) if !full => Some(t),
        _ => None,
    };
    let next = if want.is_idle() {
        if mirror.known() != Some(&None) || full {
            report.changed = present.unwrap_or(true);
            nft::apply(&table().delete_script())?;
            report.full = true;
        }
        Mirror::Known(None)
    } else {
        // Elements alone go over netlink, as the gateway's do; a change
        // to an interval set, and a whole write, go through nft.
        report.full = have.is_none();
        let written = write_tables(have, want)?;
        if written > 0 {
            report.statements = written;
            report.changed = true;
        }
        Mirror::Known(Some(want.clone()))
    };
    if report.changed || report.full {
        report.conntrack_deleted = sweep(want, &vips)?;
    }
    report.duration = start.elapsed();
    Ok((next, report))
}

impl Egress {
    /// Opens the namespace at `netns` (a path, or a name under /run/netns),
    /// or the current one with `None`.
    pub fn open(netns: Option<&str>) -> Result<Self, SyncError> {
        let path: Option<PathBuf> = netns.map(netns::netns_path);
        Ok(Egress { worker: netns::NetnsWorker::start(path)?, mirror: Mutex::new(Mirror::Unknown) })
    }

    fn run(&self, want: &EgressTables, full: bool) -> Result<EgressReport, SyncError> {
        let mut mirror = self.mirror.lock().unwrap_or_else(|p| p.into_inner());
        let have = mirror.clone();
        let want = want.clone();
        match self.worker.run(move || converge(&have, &want, full))? {
            Ok((next, report)) => {
                *mirror = next;
                Ok(report)
            }
            Err(e) => {
                // The kernel may hold anything now: the next sync writes whole.
                *mirror = Mirror::Unknown;
                Err(e)
            }
        }
    }

    /// The kernel ends up holding exactly `want`, changing only what
    /// differs from the previous sync.
    pub fn sync(&self, want: &EgressTables) -> Result<EgressReport, SyncError> {
        self.run(want, false)
    }

    /// Writes the table whole, repairing anything changed behind natgw's
    /// back. Run it periodically.
    pub fn resync(&self, want: &EgressTables) -> Result<EgressReport, SyncError> {
        self.run(want, true)
    }

    /// Removes the table and the flows it translated.
    pub fn teardown(&self) -> Result<EgressReport, SyncError> {
        self.run(&EgressTables::default(), false)
    }

    /// Whether the egress table exists.
    pub fn present(&self) -> Result<bool, SyncError> {
        Ok(self.worker.run(table_exists)??)
    }

    /// The IPv4 addresses of the namespace's interfaces (which VIPs this
    /// node holds), leaving out kube-proxy's `IPVS_INTERFACE`: in IPVS mode
    /// every node has every VIP there, and each would have translated its
    /// pods to a VIP whose replies reach only the node that really holds it.
    pub fn local_addresses(&self) -> Result<BTreeSet<Ipv4Addr>, SyncError> {
        self.worker.run(|| addresses_here(false, false))?.map_err(SyncError::Addresses)
    }

    /// Runs any closure inside the namespace (tests, tools).
    pub fn in_ns<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R, SyncError> {
        Ok(self.worker.run(f)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natgw_api::Protocol;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn a_changed_vip_is_a_delete_and_an_add() {
        let mut a = EgressTables::default();
        a.snat_all.insert(ip("10.0.0.5"), ip("192.0.2.10"));
        let mut b = a.clone();
        b.snat_all.insert(ip("10.0.0.5"), ip("192.0.2.11"));
        b.snat_ports.insert((ip("10.0.0.6"), Protocol::Tcp, 443), ip("192.0.2.10"));
        let s = diff_script(&a, &b);
        assert_eq!(
            s,
            "delete element ip natgw_egress snat_all { 10.0.0.5 }\n\
             add element ip natgw_egress snat_all { 10.0.0.5 : 192.0.2.11 }\n\
             add element ip natgw_egress snat_ports { 10.0.0.6 . tcp . 443 : 192.0.2.10 }\n"
        );
        assert_eq!(diff_script(&b, &b), "");
    }

    fn flow(proto: u8, pod: &str, dst: &str, dport: u16, seen_as: &str) -> CtEntry {
        dnat_flow(proto, pod, (dst, dport), (dst, dport), seen_as)
    }

    /// A flow to `asked`, sent by a DNAT to `to`.
    fn dnat_flow(proto: u8, pod: &str, asked: (&str, u16), to: (&str, u16), seen_as: &str) -> CtEntry {
        use crate::conntrack::policy::Tuple;
        CtEntry {
            proto,
            orig: Tuple { src: ip(pod), dst: ip(asked.0), sport: 40000, dport: asked.1 },
            reply: Tuple { src: ip(to.0), dst: ip(seen_as), sport: to.1, dport: 40000 },
        }
    }

    /// Item 6 of the second hardening round: flows DNATed by kube-proxy
    /// or portmap are judged where the kernel sent them.
    #[test]
    fn round2_item6_a_flow_is_judged_by_its_destination_after_dnat() {
        let mut t = EgressTables::default();
        t.snat_all.insert(ip("10.0.0.5"), ip("192.0.2.10"));
        t.cluster_nets = vec![(ip("10.0.0.0"), ip("10.0.255.255"))];
        let vips: BTreeSet<Ipv4Addr> = [ip("192.0.2.10")].into();
        let node: BTreeSet<Ipv4Addr> = [ip("198.51.100.2"), ip("127.0.0.1")].into();
        let none = BTreeSet::new();
        // A LoadBalancer VIP, an externalIP, a NodePort: DNATed to a pod,
        // never SNATed.
        let lb = dnat_flow(6, "10.0.0.5", ("198.51.100.201", 80), ("10.0.3.7", 8080), "10.0.0.5");
        assert!(!is_stale(&lb, &t, &vips, &none), "a Service's backend is inside the cluster");
        let node_port = dnat_flow(6, "10.0.0.5", ("198.51.100.3", 30080), ("10.0.3.7", 8080), "10.0.0.5");
        assert!(!is_stale(&node_port, &t, &vips, &none));
        // A node-local daemon, asked directly or through a hostPort DNAT.
        assert!(!is_stale(&flow(6, "10.0.0.5", "198.51.100.2", 10250, "10.0.0.5"), &t, &vips, &node));
        let host_port = dnat_flow(6, "10.0.0.5", ("198.51.100.4", 53), ("127.0.0.1", 5353), "10.0.0.5");
        assert!(!is_stale(&host_port, &t, &vips, &node));
        // DNATed outside the cluster: translated there, judged there.
        let out = dnat_flow(6, "10.0.0.5", ("10.0.9.9", 443), ("203.0.113.1", 443), "192.0.2.10");
        assert!(!is_stale(&out, &t, &vips, &none));
        let bypassed = dnat_flow(6, "10.0.0.5", ("10.0.9.9", 443), ("203.0.113.1", 443), "10.0.0.5");
        assert!(is_stale(&bypassed, &t, &vips, &none), "should have left with the VIP");
    }

    #[test]
    fn item1_a_correctly_translated_flow_is_never_stale() {
        let mut t = EgressTables::default();
        t.snat_all.insert(ip("10.0.0.5"), ip("192.0.2.10"));
        t.cluster_nets = vec![(ip("10.0.0.0"), ip("10.0.255.255"))];
        let vips: BTreeSet<Ipv4Addr> = [ip("192.0.2.10"), ip("192.0.2.11")].into();
        let none = BTreeSet::new();
        assert!(!is_stale(&flow(6, "10.0.0.5", "203.0.113.1", 443, "192.0.2.10"), &t, &vips, &none));
        assert!(is_stale(&flow(6, "10.0.0.5", "203.0.113.1", 443, "192.0.2.11"), &t, &vips, &none), "wrong VIP");
        assert!(is_stale(&flow(6, "10.0.0.5", "203.0.113.1", 443, "10.0.0.5"), &t, &vips, &none), "bypassed the rule");
        assert!(is_stale(&flow(6, "10.0.0.5", "203.0.113.1", 443, "198.51.100.2"), &t, &vips, &none), "masqueraded");
        assert!(!is_stale(&flow(6, "10.0.0.5", "10.0.1.9", 443, "10.0.0.5"), &t, &vips, &none), "inside the cluster");
        // A pod natgw does not translate: only flows through natgw's VIPs go.
        assert!(
            is_stale(&flow(17, "10.0.0.6", "203.0.113.1", 53, "192.0.2.11"), &t, &vips, &none),
            "no longer translated"
        );
        assert!(
            !is_stale(&flow(17, "10.0.0.6", "203.0.113.1", 53, "198.51.100.2"), &t, &vips, &none),
            "CNI masquerade"
        );
        assert!(!is_stale(&flow(17, "10.0.0.6", "203.0.113.1", 53, "10.0.0.6"), &t, &vips, &none), "untranslated");
        t.hold.insert(ip("10.0.0.6"));
        assert!(is_stale(&flow(17, "10.0.0.6", "203.0.113.1", 53, "198.51.100.2"), &t, &vips, &none), "held pod");
    }
}
