//! One nftables model for every table natgw owns (the gateway's `natgw`,
//! the node's `natgw_egress`), in the manner of knftables: tables, sets,
//! maps and chains as typed values that render one `nft -f` script.
//!
//! - The fixed part (sets, chains, rules) is declared once and gives both
//!   the script and the skeleton expected back from the kernel. Each rule
//!   carries a comment with a hash of its text, so a rule edited, removed
//!   or added by hand no longer matches and the table is rebuilt.
//! - Everything that varies is elements. Both tables' maps and sets are
//!   described once each in `elements`, which gives every form of an
//!   element (nft text, netlink bytes, `nft -j` atoms, audit lines) and
//!   one typed diff. Only what changed is rendered (O(change) text per
//!   sync); `Table::script` turns the changes into one transaction.
//! - `Mirror` is what the last successful transaction left: unknown means
//!   a full write.
//!
//! Another family (`ip6`, `inet`) or a new map is a few more lines here.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Elements per `add element` statement, to keep lines bounded.
const CHUNK: usize = 2000;

/// A set (`value` is `None`) or a map.
#[derive(Clone, Debug)]
pub struct Set {
    pub name: &'static str,
    /// Key type, e.g. `ipv4_addr . inet_proto . inet_service`.
    pub key: &'static str,
    pub value: Option<&'static str>,
    /// Interval sets are replaced whole when they differ: nftables refuses
    /// overlapping intervals, even transiently inside one transaction.
    pub interval: bool,
}

/// A fixed rule and the role its comment names.
#[derive(Clone, Debug)]
pub struct Rule {
    pub role: &'static str,
    pub text: String,
}

/// A base chain.
#[derive(Clone, Debug)]
pub struct Chain {
    pub name: &'static str,
    /// `nat` or `filter`.
    pub kind: &'static str,
    pub hook: &'static str,
    /// Numeric, as `nft -j` reports it (dstnat -100, srcnat 100, filter 0).
    pub priority: i32,
    pub rules: Vec<Rule>,
}

/// An nftables address family, as nft spells it and netlink numbers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Ip,
    Ip6,
    Inet,
}

impl Family {
    /// NFPROTO_*: what netlink messages carry.
    pub fn nfproto(self) -> u8 {
        match self {
            Family::Inet => 1,
            Family::Ip => 2,
            Family::Ip6 => 10,
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
            Family::Inet => "inet",
        })
    }
}

/// Which table: what netlink reads and writes are addressed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableId {
    pub family: Family,
    pub name: &'static str,
}

/// A table natgw owns whole.
#[derive(Clone, Debug)]
pub struct Table {
    pub family: Family,
    pub name: &'static str,
    pub comment: &'static str,
    pub sets: Vec<Set>,
    pub chains: Vec<Chain>,
}

/// What one set or map needs to go from one content to another.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub set: &'static str,
    /// Empty the set first (interval sets are replaced whole).
    pub flush: bool,
    pub delete: Vec<String>,
    pub add: Vec<String>,
}

/// A set replaced whole when it differs (intervals that must never
/// overlap, even inside one transaction).
pub fn whole_change<T: PartialEq>(set: &'static str, have: &[T], want: &[T], element: impl Fn(&T) -> String) -> Change {
    if have == want {
        return Change { set, ..Default::default() };
    }
    Change { set, flush: !have.is_empty(), delete: Vec::new(), add: want.iter().map(element).collect() }
}

/// The fixed part as the kernel reports it; equal exactly when no rebuild
/// is needed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Skeleton {
    pub sets: BTreeMap<String, String>,
    pub chains: BTreeMap<String, String>,
    pub rules: BTreeMap<String, Vec<String>>,
}

impl Rule {
    pub fn new(role: &'static str, text: impl Into<String>) -> Rule {
        Rule { role, text: text.into() }
    }

    pub fn comment(&self) -> String {
        format!("natgw {} {:08x}", self.role, natgw_api::fnv1a(self.text.as_bytes()))
    }
}

impl Set {
    /// How the skeleton spells this set (`type|map|flags`).
    pub fn describe(&self) -> String {
        format!("{}|{}|{}", self.key, self.value.unwrap_or(""), if self.interval { "interval" } else { "" })
    }
}

impl Chain {
    pub fn describe(&self) -> String {
        format!("{}|{}|{}|accept", self.kind, self.hook, self.priority)
    }
}

impl Table {
    pub fn id(&self) -> TableId {
        TableId { family: self.family, name: self.name }
    }

    /// Makes the table absent, whether or not it exists (add + delete).
    pub fn delete_script(&self) -> String {
        format!("add table {f} {n}\ndelete table {f} {n}\n", f = self.family, n = self.name)
    }

    /// Replaces the whole table: the fixed part, then `changes` (made
    /// against empty contents), in one script.
    pub fn full_script(&self, changes: &[Change]) -> String {
        let mut s = self.declare_script();
        s.push_str(&self.chains_script());
        s.push_str(&self.script(changes));
        s
    }

    /// Replaces the table with one that declares its sets and maps, empty,
    /// and has no chain: it does nothing to packets yet.
    pub fn declare_script(&self) -> String {
        let mut s = self.delete_script();
        let _ = writeln!(s, "table {} {} {{", self.family, self.name);
        let _ = writeln!(s, "  comment \"{}\"", self.comment);
        for set in &self.sets {
            let (what, ty) = match set.value {
                Some(v) => ("map", format!("{} : {v}", set.key)),
                None => ("set", set.key.to_string()),
            };
            let flags = if set.interval { " flags interval;" } else { "" };
            let _ = writeln!(s, "  {what} {} {{ type {ty};{flags} }}", set.name);
        }
        s.push_str("}\n");
        s
    }

    /// Adds the chains and their rules to a declared table: from their
    /// commit on, the table translates.
    pub fn chains_script(&self) -> String {
        let mut s = format!("table {} {} {{\n", self.family, self.name);
        for chain in &self.chains {
            let _ = writeln!(
                s,
                "  chain {} {{\n    type {} hook {} priority {}; policy accept;",
                chain.name, chain.kind, chain.hook, chain.priority
            );
            for rule in &chain.rules {
                let _ = writeln!(s, "    {} comment \"{}\"", rule.text, rule.comment());
            }
            s.push_str("  }\n");
        }
        s.push_str("}\n");
        s
    }

    /// Replaces every chain of the table (`kernel_chains`, as read back)
    /// with its own, leaving the sets and their elements in place: flushed
    /// first, so that jumps between them go before the chains do.
    pub fn rechain_script<'a>(&self, kernel_chains: impl Iterator<Item = &'a str> + Clone) -> String {
        let mut s = String::new();
        for verb in ["flush", "delete"] {
            for c in kernel_chains.clone() {
                let _ = writeln!(s, "{verb} chain {} {} {c}", self.family, self.name);
            }
        }
        s.push_str(&self.chains_script());
        s
    }

    /// The element statements of `changes`: every flush and delete before
    /// any add; empty when nothing changes.
    pub fn script(&self, changes: &[Change]) -> String {
        let mut s = String::new();
        for c in changes {
            if c.flush {
                let what = if self.sets.iter().any(|s| s.name == c.set && s.value.is_some()) { "map" } else { "set" };
                let _ = writeln!(s, "flush {what} {} {} {}", self.family, self.name, c.set);
            }
            self.element_lines(&mut s, "delete", c.set, &c.delete);
        }
        for c in changes {
            self.element_lines(&mut s, "add", c.set, &c.add);
        }
        s
    }

    /// The skeleton natgw writes.
    pub fn skeleton(&self) -> Skeleton {
        let mut sk = Skeleton::default();
        for set in &self.sets {
            sk.sets.insert(set.name.into(), set.describe());
        }
        for chain in &self.chains {
            sk.chains.insert(chain.name.into(), chain.describe());
            for rule in &chain.rules {
                sk.rules.entry(chain.name.into()).or_default().push(rule.comment());
            }
        }
        sk
    }

    fn element_lines(&self, s: &mut String, verb: &str, set: &str, items: &[String]) {
        for chunk in items.chunks(CHUNK) {
            let _ = writeln!(s, "{verb} element {} {} {set} {{ {} }}", self.family, self.name, chunk.join(", "));
        }
    }
}

/// What the last successful transaction left in the kernel. `Unknown` at
/// start and after any failure: the next write is a full one.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Mirror<T> {
    #[default]
    Unknown,
    Known(T),
}

impl<T> Mirror<T> {
    /// Takes the state out, leaving `Unknown`: a sync that fails before it
    /// puts a new state back leaves the mirror unknown.
    pub fn take(&mut self) -> Option<T> {
        match std::mem::take(self) {
            Mirror::Known(t) => Some(t),
            Mirror::Unknown => None,
        }
    }

    pub fn known(&self) -> Option<&T> {
        match self {
            Mirror::Known(t) => Some(t),
            Mirror::Unknown => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table {
            family: Family::Ip,
            name: "t",
            comment: "test",
            sets: vec![
                Set { name: "m", key: "ipv4_addr", value: Some("ipv4_addr"), interval: false },
                Set { name: "r", key: "ipv4_addr", value: None, interval: true },
            ],
            chains: vec![Chain {
                name: "post",
                kind: "nat",
                hook: "postrouting",
                priority: 99,
                rules: vec![Rule { role: "snat", text: "snat ip to ip saddr map @m".into() }],
            }],
        }
    }

    #[test]
    fn changes_render_only_what_changed_and_intervals_whole() {
        let t = table();
        // A changed value is a delete and an add; an interval set is
        // flushed and filled anew.
        let m = Change {
            set: "m",
            flush: false,
            delete: vec!["10.0.0.1".into()],
            add: vec!["10.0.0.1 : 192.0.2.9".into(), "10.0.0.3 : 192.0.2.3".into()],
        };
        let r = whole_change("r", &["10.0.0.0-10.0.0.255"], &["10.0.1.0-10.0.1.255"], |e| e.to_string());
        assert_eq!(
            t.script(&[m, r]),
            "delete element ip t m { 10.0.0.1 }\n\
             flush set ip t r\n\
             add element ip t m { 10.0.0.1 : 192.0.2.9, 10.0.0.3 : 192.0.2.3 }\n\
             add element ip t r { 10.0.1.0-10.0.1.255 }\n"
        );
        let same = Change { set: "m", ..Default::default() };
        assert_eq!(t.script(&[same, whole_change("r", &[1], &[1], |e| e.to_string())]), "");
    }

    #[test]
    fn the_full_script_and_the_skeleton_agree_on_the_fixed_part() {
        let t = table();
        let s = t.full_script(&[]);
        assert!(s.starts_with("add table ip t\ndelete table ip t\ntable ip t {"), "{s}");
        let comment = t.chains[0].rules[0].comment();
        assert!(s.contains(&format!("snat ip to ip saddr map @m comment \"{comment}\"")), "{s}");
        assert_eq!(t.skeleton().rules["post"], vec![comment]);
        assert_eq!(t.skeleton().chains["post"], "nat|postrouting|99|accept");
    }

    #[test]
    fn a_staged_write_declares_first_and_hooks_chains_last() {
        let t = table();
        let (declare, chains) = (t.declare_script(), t.chains_script());
        assert!(declare.contains("map m {") && !declare.contains("chain"), "{declare}");
        assert!(chains.contains("chain post {") && !chains.contains("map m {"), "{chains}");
        assert_eq!(t.full_script(&[]), declare + &chains);
    }

    #[test]
    fn rechaining_flushes_every_chain_before_deleting_any() {
        let s = table().rechain_script(["post", "stray"].into_iter());
        assert!(
            s.starts_with(
                "flush chain ip t post\nflush chain ip t stray\ndelete chain ip t post\ndelete chain ip t stray\n"
            ),
            "{s}"
        );
        assert!(s.ends_with(&table().chains_script()), "{s}");
    }
}
