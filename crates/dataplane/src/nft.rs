//! natgw's nftables table: rendering (pure), reading back (JSON from `nft`)
//! and applying one script as one atomic transaction.
//!
//! The table holds a handful of fixed rules; everything that varies with
//! the objects lives in maps and sets, so a packet costs one lookup per
//! rule and an update touches only the changed elements. Each fixed rule
//! carries a comment with a hash of its text: a rule edited, removed or
//! added by hand no longer matches and the table is rebuilt.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use natgw_api::Protocol;
use natgw_plan::{NatTables, SnatRange};
use serde_json::Value;

pub const FAMILY: &str = "ip";
pub const TABLE: &str = "natgw";
/// Elements per `add element` statement, to keep lines bounded.
const CHUNK: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft: {0} (is the nftables package installed?)")]
    Spawn(std::io::Error),
    #[error("nft rejected the transaction (nothing was applied): {0}")]
    Rejected(String),
    #[error("nft list failed: {0}")]
    List(String),
    #[error("cannot parse nft JSON output: {0}")]
    Parse(String),
}

/// The fixed part of the table as the kernel reports it; two views are
/// equal exactly when no rebuild is needed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Skeleton {
    pub sets: BTreeMap<String, String>,
    pub chains: BTreeMap<String, String>,
    pub rules: BTreeMap<String, Vec<String>>,
}

/// What the kernel holds in natgw's table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelTable {
    pub present: bool,
    pub skeleton: Skeleton,
    pub nat: NatTables,
}

struct RuleDef {
    chain: &'static str,
    role: &'static str,
    text: String,
}

fn rule_defs(lan: &str, ext: &str) -> Vec<RuleDef> {
    let r = |chain, role, text: String| RuleDef { chain, role, text };
    vec![
        r("prerouting", "port-fwd", "dnat ip to ip daddr . meta l4proto . th dport map @port_fwd".into()),
        r("prerouting", "fip-dnat", "dnat ip to ip daddr map @fip_dnat".into()),
        // Hairpin: an internal host reaching another through its EIP gets
        // the EIP as source, so the reply comes back through the gateway.
        r(
            "postrouting",
            "hairpin",
            format!("oifname \"{lan}\" ip saddr @internal_nets ct status dnat snat ip to ct original ip daddr"),
        ),
        r("postrouting", "fip-snat", format!("oifname \"{ext}\" snat ip to ip saddr map @fip_snat")),
        r("postrouting", "snat", format!("oifname \"{ext}\" snat ip to ip saddr map @snat_nets fully-random")),
    ]
}

fn comment(def: &RuleDef) -> String {
    format!("natgw {} {:08x}", def.role, natgw_api::fnv1a(def.text.as_bytes()))
}

/// The skeleton natgw wants for a gateway with these interfaces.
pub fn expected_skeleton(lan: &str, ext: &str) -> Skeleton {
    let mut s = Skeleton::default();
    for (name, ty, map, flags) in [
        ("fip_dnat", "ipv4_addr", "ipv4_addr", ""),
        ("fip_snat", "ipv4_addr", "ipv4_addr", ""),
        ("port_fwd", "ipv4_addr . inet_proto . inet_service", "ipv4_addr . inet_service", ""),
        ("snat_nets", "ipv4_addr", "ipv4_addr", "interval"),
        ("internal_nets", "ipv4_addr", "", "interval"),
    ] {
        s.sets.insert(name.into(), format!("{ty}|{map}|{flags}"));
    }
    s.chains.insert("prerouting".into(), "nat|prerouting|-100|accept".into());
    s.chains.insert("postrouting".into(), "nat|postrouting|100|accept".into());
    for def in rule_defs(lan, ext) {
        s.rules.entry(def.chain.into()).or_default().push(comment(&def));
    }
    s
}

/// A script that replaces the whole table with the desired one.
pub fn full_script(lan: &str, ext: &str, nat: &NatTables) -> String {
    let mut s = String::new();
    // add+delete makes the delete succeed whether or not the table exists.
    let _ = writeln!(s, "add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\ntable {FAMILY} {TABLE} {{");
    let _ = writeln!(s, "  comment \"owned by natgw: changes by hand are reverted\"");
    s.push_str("  map fip_dnat { type ipv4_addr : ipv4_addr; }\n");
    s.push_str("  map fip_snat { type ipv4_addr : ipv4_addr; }\n");
    s.push_str("  map port_fwd { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }\n");
    s.push_str("  map snat_nets { type ipv4_addr : ipv4_addr; flags interval; }\n");
    s.push_str("  set internal_nets { type ipv4_addr; flags interval; }\n");
    let defs = rule_defs(lan, ext);
    for (chain, hook, prio) in [("prerouting", "prerouting", "dstnat"), ("postrouting", "postrouting", "srcnat")] {
        let _ = writeln!(s, "  chain {chain} {{\n    type nat hook {hook} priority {prio}; policy accept;");
        for def in defs.iter().filter(|d| d.chain == chain) {
            let _ = writeln!(s, "    {} comment \"{}\"", def.text, comment(def));
        }
        s.push_str("  }\n");
    }
    s.push_str("}\n");
    add_elements(&mut s, &NatTables::default(), nat);
    s
}

/// A script that turns the kernel's elements into the desired ones, or an
/// empty string when they already match.
pub fn diff_script(have: &NatTables, want: &NatTables) -> String {
    let mut s = String::new();
    delete_map_elements(&mut s, "fip_dnat", &have.fip_dnat, &want.fip_dnat, |k| k.to_string());
    delete_map_elements(&mut s, "fip_snat", &have.fip_snat, &want.fip_snat, |k| k.to_string());
    delete_map_elements(&mut s, "port_fwd", &have.port_fwd, &want.port_fwd, port_key);
    // Interval contents are small; replace them whole when they differ, so
    // that old and new ranges can never overlap inside one transaction.
    if have.snat != want.snat {
        let _ = writeln!(s, "flush map {FAMILY} {TABLE} snat_nets");
    }
    if have.internal_nets != want.internal_nets {
        let _ = writeln!(s, "flush set {FAMILY} {TABLE} internal_nets");
    }
    add_elements(&mut s, have, want);
    s
}

fn port_key((eip, proto, port): &natgw_plan::PortKey) -> String {
    format!("{eip} . {proto} . {port}")
}

fn delete_map_elements<K: Ord, V: PartialEq>(
    s: &mut String,
    map: &str,
    have: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    key: impl Fn(&K) -> String,
) {
    let gone: Vec<String> = have.iter().filter(|(k, v)| want.get(*k) != Some(*v)).map(|(k, _)| key(k)).collect();
    element_lines(s, "delete", TABLE, map, &gone);
}

/// `add element` / `delete element` statements for `items` of one set or
/// map, in lines of bounded length.
pub(crate) fn element_lines(s: &mut String, verb: &str, table: &str, set: &str, items: &[String]) {
    for chunk in items.chunks(CHUNK) {
        let _ = writeln!(s, "{verb} element {FAMILY} {table} {set} {{ {} }}", chunk.join(", "));
    }
}

fn add_elements(s: &mut String, have: &NatTables, want: &NatTables) {
    fn added<'a, K: Ord, V: PartialEq>(
        have: &'a BTreeMap<K, V>,
        want: &'a BTreeMap<K, V>,
    ) -> impl Iterator<Item = (&'a K, &'a V)> {
        want.iter().filter(move |(k, v)| have.get(*k) != Some(*v))
    }
    let mut emit = |map: &str, items: Vec<String>| element_lines(s, "add", TABLE, map, &items);
    emit("fip_dnat", added(&have.fip_dnat, &want.fip_dnat).map(|(k, v)| format!("{k} : {v}")).collect());
    emit("fip_snat", added(&have.fip_snat, &want.fip_snat).map(|(k, v)| format!("{k} : {v}")).collect());
    emit(
        "port_fwd",
        added(&have.port_fwd, &want.port_fwd)
            .map(|(k, (ip, port))| format!("{} : {ip} . {port}", port_key(k)))
            .collect(),
    );
    if have.snat != want.snat {
        emit("snat_nets", want.snat.iter().map(|r| format!("{} : {}", range(r.first, r.last), r.eip)).collect());
    }
    if have.internal_nets != want.internal_nets {
        emit("internal_nets", want.internal_nets.iter().map(|(a, b)| range(*a, *b)).collect());
    }
}

/// An inclusive range as nft spells it: `a-b`, or `a` alone.
pub(crate) fn range(first: Ipv4Addr, last: Ipv4Addr) -> String {
    if first == last { first.to_string() } else { format!("{first}-{last}") }
}

/// Applies a script with `nft -f -`: all of it or, on error, none of it.
pub fn apply(script: &str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Rejected(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// Reads natgw's table; `present: false` when it does not exist.
pub fn read() -> Result<KernelTable, NftError> {
    let out = Command::new("nft").args(["-j", "list", "table", FAMILY, TABLE]).output().map_err(NftError::Spawn)?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file or directory") {
            return Ok(KernelTable::default());
        }
        return Err(NftError::List(err.trim().to_string()));
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| NftError::Parse(e.to_string()))?;
    parse_table(&v)
}

/// Removes natgw's table if it exists (uninstall, tests).
pub fn delete_table() -> Result<(), NftError> {
    apply(&format!("add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"))
}

/// Parses `nft -j list table` output into the plan's shapes.
pub fn parse_table(v: &Value) -> Result<KernelTable, NftError> {
    let items =
        v.get("nftables").and_then(Value::as_array).ok_or_else(|| NftError::Parse("no nftables array".into()))?;
    let mut t = KernelTable { present: true, ..Default::default() };
    for item in items {
        if let Some(set) = item.get("map").or_else(|| item.get("set")) {
            let name = str_of(set, "name");
            let ty = match set.get("type") {
                Some(Value::Array(parts)) => parts.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" . "),
                Some(x) => x.as_str().unwrap_or("").to_string(),
                None => String::new(),
            };
            let flags = set
                .get("flags")
                .and_then(Value::as_array)
                .map(|f| f.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","));
            let map = set.get("map").and_then(Value::as_str).unwrap_or("");
            t.skeleton.sets.insert(name.clone(), format!("{ty}|{map}|{}", flags.unwrap_or_default()));
            let elems = set.get("elem").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
            parse_elements(&name, elems, &mut t.nat).map_err(|e| NftError::Parse(format!("{name}: {e}")))?;
        } else if let Some(c) = item.get("chain") {
            let desc = format!(
                "{}|{}|{}|{}",
                str_of(c, "type"),
                str_of(c, "hook"),
                c.get("prio").map(|p| p.to_string()).unwrap_or_default(),
                str_of(c, "policy")
            );
            t.skeleton.chains.insert(str_of(c, "name"), desc);
        } else if let Some(r) = item.get("rule") {
            let comment = r.get("comment").and_then(Value::as_str).unwrap_or("(no comment)").to_string();
            t.skeleton.rules.entry(str_of(r, "chain")).or_default().push(comment);
        }
    }
    t.nat.snat.sort();
    t.nat.internal_nets.sort();
    Ok(t)
}

/// The IPv4 values of the named maps in `nft -j` output.
pub fn map_values(v: &Value, maps: &[&str]) -> std::collections::BTreeSet<Ipv4Addr> {
    let items = v.get("nftables").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
    items
        .iter()
        .filter_map(|i| i.get("map"))
        .filter(|m| maps.contains(&str_of(m, "name").as_str()))
        .flat_map(|m| m.get("elem").and_then(Value::as_array).cloned().unwrap_or_default())
        .filter_map(|e| {
            let e = e.get("elem").and_then(|x| x.get("val")).cloned().unwrap_or(e);
            pair(&e).ok().and_then(|(_, v)| ip(v).ok())
        })
        .collect()
}

fn str_of(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or("").to_string()
}

fn parse_elements(name: &str, elems: &[Value], nat: &mut NatTables) -> Result<(), String> {
    for e in elems {
        // Elements with extra attributes come wrapped as {"elem": {"val": ..}}.
        let e = e.get("elem").and_then(|x| x.get("val")).unwrap_or(e);
        match name {
            "fip_dnat" | "fip_snat" => {
                let (k, v) = pair(e)?;
                let (k, v) = (ip(k)?, ip(v)?);
                if name == "fip_dnat" {
                    nat.fip_dnat.insert(k, v)
                } else {
                    nat.fip_snat.insert(k, v)
                };
            }
            "port_fwd" => {
                let (k, v) = pair(e)?;
                let k = concat(k, 3)?;
                let v = concat(v, 2)?;
                let proto = match &k[1] {
                    Value::String(s) if s == "tcp" => Protocol::Tcp,
                    Value::String(s) if s == "udp" => Protocol::Udp,
                    Value::Number(n) if n.as_u64() == Some(6) => Protocol::Tcp,
                    Value::Number(n) if n.as_u64() == Some(17) => Protocol::Udp,
                    other => return Err(format!("unexpected protocol {other}")),
                };
                nat.port_fwd.insert((ip(&k[0])?, proto, port(&k[2])?), (ip(&v[0])?, port(&v[1])?));
            }
            "snat_nets" => {
                let (k, v) = pair(e)?;
                let (first, last) = interval(k)?;
                nat.snat.push(SnatRange { first, last, eip: ip(v)? });
            }
            "internal_nets" => nat.internal_nets.push(interval(e)?),
            _ => return Err("unexpected set in natgw's table".into()),
        }
    }
    Ok(())
}

fn pair(e: &Value) -> Result<(&Value, &Value), String> {
    match e.as_array().map(Vec::as_slice) {
        Some([k, v]) => Ok((k, v)),
        _ => Err(format!("expected [key, value], got {e}")),
    }
}

fn concat(v: &Value, n: usize) -> Result<&Vec<Value>, String> {
    v.get("concat")
        .and_then(Value::as_array)
        .filter(|a| a.len() == n)
        .ok_or_else(|| format!("expected {n}-part concatenation, got {v}"))
}

fn ip(v: &Value) -> Result<Ipv4Addr, String> {
    v.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| format!("expected IPv4 address, got {v}"))
}

fn port(v: &Value) -> Result<u16, String> {
    v.as_u64().and_then(|p| u16::try_from(p).ok()).ok_or_else(|| format!("expected port, got {v}"))
}

fn interval(v: &Value) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    if let Some(p) = v.get("prefix") {
        let addr = ip(p.get("addr").unwrap_or(&Value::Null))?;
        let len = p.get("len").and_then(Value::as_u64).unwrap_or(32) as u8;
        let net = ipnet::Ipv4Net::new(addr, len).map_err(|e| e.to_string())?;
        return Ok((net.network(), net.broadcast()));
    }
    if let Some(Value::Array(r)) = v.get("range")
        && let [a, b] = r.as_slice()
    {
        return Ok((ip(a)?, ip(b)?));
    }
    let a = ip(v)?;
    Ok((a, a))
}
