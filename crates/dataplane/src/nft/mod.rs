//! natgw's nftables table: rendering (pure), reading back (over netlink,
//! `dump`, and JSON from `nft` for the small parts) and applying one
//! script as one atomic transaction. The parts: `model` (tables, sets and
//! chains as values), `elements` (each map of both tables described
//! once), `fields` (key and value types in each form), `netlink`
//! (element batches), `dump` (reading back), `listing` (nft's JSON),
//! `write` (which way a sync writes the table).
//!
//! The table holds a handful of fixed rules; everything that varies with
//! the objects lives in maps and sets, so a packet costs one lookup per
//! rule and an update touches only the changed elements. Each fixed rule
//! carries a comment with a hash of its text: a rule edited, removed or
//! added by hand no longer matches and the table is rebuilt.

pub mod dump;
pub mod elements;
pub mod fields;
mod listing;
pub mod model;
pub mod netlink;
pub(crate) mod write;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use natgw_plan::NatTables;
use serde_json::Value;

use crate::nft::elements::{FIP_DNAT, FIP_SNAT, GATEWAY, INTERNAL_NETS, PORT_FWD, SNAT_NETS};
pub use crate::nft::listing::{Atom, Listing};
use crate::nft::model::{Chain, Change, Family, Rule, Set, Table, TableId};

pub const FAMILY: Family = Family::Ip;
pub const TABLE: &str = "natgw";
/// natgw's table in a gateway, as netlink addresses it.
pub const ID: TableId = TableId { family: FAMILY, name: TABLE };

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft: {0} (is the nftables package installed?)")]
    Spawn(std::io::Error),
    #[error("nft rejected the transaction (nothing was applied): {0}")]
    Rejected(String),
    #[error("nft list failed: {0}")]
    List(String),
    #[error("nft did not finish within {0:?} and was killed (nothing was applied)")]
    TimedOut(std::time::Duration),
    #[error("unexpected nft JSON output: {0}")]
    Parse(String),
    #[error("cannot parse nft JSON output")]
    Json(#[source] serde_json::Error),
    #[error("reading natgw's table: {0}")]
    Dump(#[from] crate::nft::dump::DumpError),
}

pub use crate::nft::model::Skeleton;

/// What the kernel holds in natgw's table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelTable {
    pub present: bool,
    pub skeleton: Skeleton,
    pub nat: NatTables,
}

/// The maps and sets: the same whatever the interfaces.
fn sets() -> Vec<Set> {
    GATEWAY.iter().map(|s| s.set()).collect()
}

/// natgw's table for a gateway with these interfaces.
pub fn table(lan: &str, ext: &str) -> Table {
    Table {
        family: FAMILY,
        name: TABLE,
        comment: "owned by natgw: changes by hand are reverted",
        sets: sets(),
        chains: vec![
            Chain {
                name: "prerouting",
                kind: "nat",
                hook: "prerouting",
                priority: -100,
                rules: vec![
                    Rule::new(
                        "port-fwd",
                        format!("dnat ip to ip daddr . meta l4proto . th dport map @{}", PORT_FWD.name),
                    ),
                    Rule::new("fip-dnat", format!("dnat ip to ip daddr map @{}", FIP_DNAT.name)),
                ],
            },
            Chain {
                name: "postrouting",
                kind: "nat",
                hook: "postrouting",
                priority: 100,
                rules: vec![
                    // Hairpin: an internal host reaching another through its
                    // EIP gets the EIP as source, so the reply comes back
                    // through the gateway.
                    Rule::new(
                        "hairpin",
                        format!(
                            "oifname \"{lan}\" ip saddr @{} ct status dnat snat ip to ct original ip daddr",
                            INTERNAL_NETS.name
                        ),
                    ),
                    Rule::new("fip-snat", format!("oifname \"{ext}\" snat ip to ip saddr map @{}", FIP_SNAT.name)),
                    Rule::new(
                        "snat",
                        format!("oifname \"{ext}\" snat ip to ip saddr map @{} fully-random", SNAT_NETS.name),
                    ),
                ],
            },
            forward_chain(lan, ext),
            input_chain(lan, ext),
        ],
    }
}

/// What reaches the gateway itself from the LAN or the external side:
/// replies to its own traffic and ICMP (ping, path MTU), nothing else. An
/// EIP is a local route, so without this a host on either side reached
/// every socket of the gateway (its metrics, with every tenant's busiest
/// destinations) through any EIP or the LAN address. The pod's own
/// network (eth0: kubelet probes, Prometheus) is not natgw's.
fn input_chain(lan: &str, ext: &str) -> Chain {
    Chain {
        name: "input",
        kind: "filter",
        hook: "input",
        priority: 0,
        rules: vec![
            Rule::new("replies", "ct state established,related accept"),
            Rule::new("icmp-lan", format!("iifname \"{lan}\" meta l4proto icmp accept")),
            Rule::new("icmp-external", format!("iifname \"{ext}\" meta l4proto icmp accept")),
            Rule::new("refuse-lan", format!("iifname \"{lan}\" counter drop")),
            Rule::new("refuse-external", format!("iifname \"{ext}\" counter drop")),
        ],
    }
}

/// What a drop rule of the forward chain counts, by its role: the
/// direction `natgw_forward_dropped_total` reports.
pub const FORWARD_DROPS: [(&str, &str); 4] =
    [("drop-lan", "lan"), ("drop-external", "external"), ("drop-to-lan", "other"), ("drop-to-external", "other")];

/// The gateway forwards only what it translates. Without this chain a
/// host on the external side that routes a VPC CIDR via an EIP reaches
/// every VPC host untranslated, and a VPC host reaches the pod's eth0
/// network the same way. Between the LAN and the external side it lets
/// through: replies (established, related); what a FloatingIp or DnatRule
/// translated inward (`ct status dnat`); new flows from the LAN whose
/// source a FloatingIp or SnatRule translates on the way out (`ct state
/// new`: an invalid packet is never translated, so it would leave with
/// its internal address). Traffic within the LAN (hairpin, routes to
/// other VPC subnets) stays. Everything else from or to the two
/// interfaces is counted and dropped; forwarding between other
/// interfaces is not natgw's.
fn forward_chain(lan: &str, ext: &str) -> Chain {
    Chain {
        name: "forward",
        kind: "filter",
        hook: "forward",
        priority: 0,
        rules: vec![
            Rule::new("replies", "ct state established,related accept"),
            Rule::new("within-lan", format!("iifname \"{lan}\" oifname \"{lan}\" accept")),
            Rule::new("inbound", format!("iifname \"{ext}\" oifname \"{lan}\" ct status dnat accept")),
            Rule::new(
                "fip-out",
                format!("iifname \"{lan}\" oifname \"{ext}\" ct state new ip saddr @{} accept", FIP_SNAT.name),
            ),
            Rule::new(
                "snat-out",
                format!("iifname \"{lan}\" oifname \"{ext}\" ct state new ip saddr @{} accept", SNAT_NETS.name),
            ),
            Rule::new("drop-lan", format!("iifname \"{lan}\" counter drop")),
            Rule::new("drop-external", format!("iifname \"{ext}\" counter drop")),
            Rule::new("drop-to-lan", format!("oifname \"{lan}\" counter drop")),
            Rule::new("drop-to-external", format!("oifname \"{ext}\" counter drop")),
        ],
    }
}

/// Packets the forward chain dropped since the table was written, by
/// direction (`lan`, `external`, `other`); `None` without natgw's table.
pub fn forward_drops() -> Result<Option<BTreeMap<&'static str, u64>>, NftError> {
    let socket = dump::socket()?;
    if !dump::table_exists(&socket, ID)? {
        return Ok(None);
    }
    let mut out: BTreeMap<&'static str, u64> = FORWARD_DROPS.iter().map(|(_, d)| (*d, 0)).collect();
    for (comment, packets) in dump::rule_counters(&socket, ID, "forward")? {
        let role = comment.strip_prefix("natgw ").and_then(|r| r.split(' ').next());
        if let Some((_, direction)) = FORWARD_DROPS.iter().find(|(r, _)| Some(*r) == role) {
            *out.entry(direction).or_default() += packets;
        }
    }
    Ok(Some(out))
}

/// The skeleton natgw wants for a gateway with these interfaces.
pub fn expected_skeleton(lan: &str, ext: &str) -> Skeleton {
    table(lan, ext).skeleton()
}

/// What each map and set needs to go from `have` to `want`.
fn changes(have: &NatTables, want: &NatTables) -> Vec<Change> {
    GATEWAY.iter().map(|s| s.text_change(have, want)).collect()
}

/// The interval sets' changes: nft splits and merges their intervals, so
/// they always go through it.
fn interval_changes(have: &NatTables, want: &NatTables) -> Vec<Change> {
    GATEWAY.iter().filter(|s| s.interval()).map(|s| s.text_change(have, want)).collect()
}

/// A script that replaces the whole table with the desired one.
pub fn full_script(lan: &str, ext: &str, nat: &NatTables) -> String {
    table(lan, ext).full_script(&changes(&NatTables::default(), nat))
}

/// A whole table written in stages, for a gateway whose table translates
/// nothing yet (absent, or without chains): nft would hold every element
/// of the maps in its own memory (198 MB at 220,000 elements), so they go
/// over netlink between two small scripts. The first declares the table
/// empty; the second hooks the chains and fills the interval sets, so the
/// whole table comes into force at once, with its second commit.
pub struct Staged {
    pub declare: String,
    pub maps: Vec<crate::nft::netlink::MapChange>,
    pub hook: String,
}

pub fn staged(lan: &str, ext: &str, nat: &NatTables) -> Staged {
    let t = table(lan, ext);
    let empty = NatTables::default();
    let mut hook = t.chains_script();
    hook.push_str(&t.script(&interval_changes(&empty, nat)));
    Staged { declare: t.declare_script(), maps: crate::nft::netlink::map_changes(&GATEWAY, &empty, nat), hook }
}

/// For a table whose sets are as natgw declares them but whose chains are
/// not (a rule edited by hand, other interfaces): the chains replaced and
/// the elements diffed, in one script. nft then holds only the change, not
/// every element, as a whole rebuild would make it (205 MB at 226,000).
pub fn rechain_script(lan: &str, ext: &str, kernel: &KernelTable, want: &NatTables) -> String {
    let mut s = table(lan, ext).rechain_script(kernel.skeleton.chains.keys().map(String::as_str));
    s.push_str(&diff_script(&kernel.nat, want));
    s
}

/// A script that turns the kernel's elements into the desired ones, or an
/// empty string when they already match.
pub fn diff_script(have: &NatTables, want: &NatTables) -> String {
    let elements = Table { family: FAMILY, name: TABLE, comment: "", sets: sets(), chains: Vec::new() };
    elements.script(&changes(have, want))
}

/// An inclusive range as nft spells it: `a-b`, or `a` alone.
pub(crate) fn range(first: Ipv4Addr, last: Ipv4Addr) -> String {
    if first == last { first.to_string() } else { format!("{first}-{last}") }
}

/// Applies a script with `nft -f -`: all of it or, on error, none of it.
pub fn apply(script: &str) -> Result<(), NftError> {
    start(script.to_string())?.wait()
}

/// An `nft -f -` running in the background: the caller does its netlink
/// work while nft parses and commits.
pub struct Running {
    child: std::process::Child,
    writer: std::thread::JoinHandle<std::io::Result<()>>,
    watchdog: crate::deadline::Watchdog,
}

/// Waits for an `nft` child its watchdog guards: its output, or
/// `TimedOut` when the watchdog had to kill it.
pub(crate) fn finish(
    child: std::process::Child,
    watchdog: &crate::deadline::Watchdog,
) -> Result<std::process::Output, NftError> {
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if watchdog.fired() {
        return Err(NftError::TimedOut(crate::deadline::NFT));
    }
    Ok(out)
}

/// Starts `nft -f -` on `script` in the calling thread's namespace.
pub fn start(script: String) -> Result<Running, NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    let stdin = child.stdin.take();
    // A large script fills the pipe before nft reads it all.
    let writer = std::thread::spawn(move || match stdin {
        Some(mut stdin) => stdin.write_all(script.as_bytes()),
        None => Ok(()),
    });
    let watchdog = crate::deadline::Watchdog::watch(&child, crate::deadline::NFT);
    Ok(Running { child, writer, watchdog })
}

impl Running {
    pub fn wait(self) -> Result<(), NftError> {
        let out = finish(self.child, &self.watchdog)?;
        let written = self.writer.join().unwrap_or_else(|_| Err(std::io::Error::other("nft writer panicked")));
        if !out.status.success() {
            return Err(NftError::Rejected(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        written.map_err(NftError::Spawn)
    }
}

/// Reads natgw's table; `present: false` when it does not exist. The
/// declarations, rule comments and hash maps come over netlink
/// (`nfdump`); nft lists the chains and the interval sets, which are
/// small and which it lists without reading the maps (it splits and
/// merges intervals, which natgw leaves to it).
pub fn read() -> Result<KernelTable, NftError> {
    let socket = dump::socket()?;
    if !dump::table_exists(&socket, ID)? {
        return Ok(KernelTable::default());
    }
    let mut t = KernelTable { present: true, ..Default::default() };
    t.skeleton.sets = dump::sets(&socket, ID)?;
    t.skeleton.rules = dump::rule_comments(&socket, ID)?;
    if let Some(mut listing) = list(&["chains", &FAMILY.to_string()])? {
        listing.nftables.retain(|i| i.chain.as_ref().is_some_and(|c| c.table == TABLE));
        t.skeleton.chains = parse_raw(listing).0.chains;
    }
    for set in GATEWAY {
        // A set natgw did not declare so makes the skeleton differ, and the
        // table is rebuilt: its elements are not read.
        let name = set.name();
        if t.skeleton.sets.get(name) != Some(&set.set().describe()) {
            continue;
        }
        if set.interval() {
            let what = if set.set().value.is_some() { "map" } else { "set" };
            if let Some(listing) = list(&[what, &FAMILY.to_string(), TABLE, name])? {
                for (name, elems) in parse_raw(listing).1 {
                    parse_elements(&name, &elems, &mut t.nat).map_err(|e| NftError::Parse(format!("{name}: {e}")))?;
                }
            }
        } else {
            dump::elements(&socket, ID, name, |k, v| set.read_bytes(&mut t.nat, k, v))?;
        }
    }
    t.nat.snat.sort();
    t.nat.internal_nets.sort();
    Ok(t)
}

/// `nft -j list table FAMILY NAME`, or `None` when the table does not
/// exist: how natgw reads its other tables (egress) back.
pub fn read_listing(table: TableId) -> Result<Option<Listing>, NftError> {
    list(&["table", &table.family.to_string(), table.name])
}

/// `nft -j list WHAT...`, or `None` when what it names does not exist.
/// Parsed as it comes out of the pipe: the whole output is never held.
fn list(what: &[&str]) -> Result<Option<Listing>, NftError> {
    let mut child = Command::new("nft")
        .args(["-j", "list"])
        .args(what)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    let watchdog = crate::deadline::Watchdog::watch(&child, crate::deadline::NFT);
    let parsed = child.stdout.take().map(|out| serde_json::from_reader::<_, Listing>(std::io::BufReader::new(out)));
    let out = finish(child, &watchdog)?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(NftError::List(err.trim().to_string()));
    }
    match parsed {
        Some(listing) => listing.map(Some).map_err(NftError::Json),
        None => Err(NftError::List("nft gave no output".into())),
    }
}

/// The sets, maps, chains and rule comments of a listed table, and each
/// set's elements.
pub fn parse_raw(listing: Listing) -> (Skeleton, BTreeMap<String, Vec<Atom>>) {
    let mut skeleton = Skeleton::default();
    let mut elements = BTreeMap::new();
    for item in listing.nftables {
        if let Some(set) = item.map.or(item.set) {
            let ty = match &set.ty {
                Value::Array(parts) => parts.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" . "),
                x => x.as_str().unwrap_or("").to_string(),
            };
            let flags = set.flags.as_array().map(|f| f.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","));
            let map = set.map.as_str().unwrap_or("");
            skeleton.sets.insert(set.name.clone(), format!("{ty}|{map}|{}", flags.unwrap_or_default()));
            elements.insert(set.name, set.elem);
        } else if let Some(c) = item.chain {
            let prio = if c.prio.is_null() { String::new() } else { c.prio.to_string() };
            let text = |s: Option<String>| s.unwrap_or_default();
            let desc = format!("{}|{}|{prio}|{}", text(c.ty), text(c.hook), text(c.policy));
            skeleton.chains.insert(c.name, desc);
        } else if let Some(r) = item.rule {
            let comment = r.comment.unwrap_or_else(|| "(no comment)".to_string());
            skeleton.rules.entry(r.chain).or_default().push(comment);
        }
    }
    (skeleton, elements)
}

/// Removes natgw's table if it exists (uninstall, tests).
pub fn delete_table() -> Result<(), NftError> {
    apply(&format!("add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"))
}

/// Parses `nft -j list table` output into the plan's shapes.
pub fn parse_table(listing: Listing) -> Result<KernelTable, NftError> {
    let (skeleton, elements) = parse_raw(listing);
    let mut t = KernelTable { present: true, skeleton, ..Default::default() };
    for (name, elems) in &elements {
        parse_elements(name, elems, &mut t.nat).map_err(|e| NftError::Parse(format!("{name}: {e}")))?;
    }
    t.nat.snat.sort();
    t.nat.internal_nets.sort();
    Ok(t)
}

fn parse_elements(name: &str, elems: &[Atom], nat: &mut NatTables) -> Result<(), String> {
    let set = crate::nft::elements::named(name).ok_or("unexpected set in natgw's table")?;
    elems.iter().try_for_each(|e| set.read_atom(nat, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use natgw_api::Protocol;

    /// A listing as `nft -j list table` prints it: elements plain and
    /// wrapped (an element with attributes), concatenations, prefixes and
    /// ranges, chains and rules.
    #[test]
    fn a_listing_is_read_into_the_plans_shapes() {
        let listing = serde_json::json!({"nftables": [
            {"metainfo": {"json_schema_version": 1}},
            {"table": {"family": "ip", "name": "natgw"}},
            {"map": {"family": "ip", "name": "fip_dnat", "table": "natgw", "type": "ipv4_addr", "map": "ipv4_addr",
                "elem": [["198.51.100.10", "10.0.0.10"],
                         {"elem": {"val": ["198.51.100.11", "10.0.0.11"], "counter": {"packets": 0, "bytes": 0}}}]}},
            {"map": {"family": "ip", "name": "port_fwd", "table": "natgw",
                "type": ["ipv4_addr", "inet_proto", "inet_service"], "map": "ipv4_addr . inet_service",
                "elem": [[{"concat": ["198.51.100.12", "tcp", 80]}, {"concat": ["10.0.0.12", 8080]}],
                         [{"concat": ["198.51.100.12", 17, 53]}, {"concat": ["10.0.0.13", 53]}]]}},
            {"set": {"family": "ip", "name": "internal_nets", "table": "natgw", "type": "ipv4_addr",
                "flags": ["interval"],
                "elem": [{"prefix": {"addr": "10.0.0.0", "len": 24}}, {"range": ["10.1.0.5", "10.1.0.9"]}]}},
            {"chain": {"family": "ip", "table": "natgw", "name": "pre", "type": "nat", "hook": "prerouting",
                "prio": -100, "policy": "accept"}},
            {"rule": {"family": "ip", "table": "natgw", "chain": "pre", "comment": "floating ips"}},
        ]});
        let t = parse_table(serde_json::from_value(listing).expect("a listing")).expect("parses");
        assert!(t.present);
        assert_eq!(t.nat.fip_dnat.len(), 2);
        assert_eq!(t.nat.fip_dnat.get(&Ipv4Addr::new(198, 51, 100, 11)), Some(&Ipv4Addr::new(10, 0, 0, 11)));
        let eip = Ipv4Addr::new(198, 51, 100, 12);
        assert_eq!(t.nat.port_fwd.get(&(eip, Protocol::Tcp, 80)), Some(&(Ipv4Addr::new(10, 0, 0, 12), 8080)));
        assert_eq!(t.nat.port_fwd.get(&(eip, Protocol::Udp, 53)), Some(&(Ipv4Addr::new(10, 0, 0, 13), 53)));
        let nets = [
            (Ipv4Addr::new(10, 0, 0, 0), Ipv4Addr::new(10, 0, 0, 255)),
            (Ipv4Addr::new(10, 1, 0, 5), Ipv4Addr::new(10, 1, 0, 9)),
        ];
        assert_eq!(t.nat.internal_nets, nets);
        assert_eq!(t.skeleton.chains.get("pre").map(String::as_str), Some("nat|prerouting|-100|accept"));
        assert_eq!(t.skeleton.rules.get("pre"), Some(&vec!["floating ips".to_string()]));
        assert!(t.skeleton.sets.contains_key("internal_nets"));
    }

    #[test]
    fn a_listing_without_its_array_is_an_error() {
        for v in [serde_json::json!({"other": []}), serde_json::json!([]), serde_json::json!({"nftables": 1})] {
            assert!(serde_json::from_value::<Listing>(v).is_err());
        }
    }
}
