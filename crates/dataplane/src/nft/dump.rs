//! natgw's table read back over nf_tables netlink. `nft -j list table`
//! builds its whole cache first: at 222,000 map elements it took 1.7 to
//! 2.4 s and 260 MB of its own, every resync, beside the agent. Dumps
//! stream: the declarations, the rules' comments and the hash maps'
//! elements come straight from the kernel, each decoded as it arrives.

use std::collections::BTreeMap;

use netlink_sys::Socket;

use crate::nft::model::TableId;
use crate::nft::netlink::{NFNL_SUBSYS_NFTABLES, NLM_F_REQUEST, NLMSG_ERROR, attr, cstr, message, messages};

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("nf_tables netlink: {0}")]
    Io(#[from] std::io::Error),
    #[error("nf_tables refused to list {what} (errno {errno})")]
    Refused { what: &'static str, errno: i32 },
    #[error("unexpected nf_tables reply for {what}: {why}")]
    Malformed { what: String, why: String },
}

/// A netfilter netlink socket for dumps, with the receive deadline every
/// kernel call has.
pub fn socket() -> Result<Socket, DumpError> {
    Ok(crate::conntrack::netfilter_socket()?)
}

const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_GETSETELEM: u16 = 13;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 3;
const ENOENT: i32 = 2;

const TABLE_NAME: u16 = 1;
const RULE_TABLE: u16 = 1;
const RULE_CHAIN: u16 = 2;
const RULE_EXPRESSIONS: u16 = 4;
const RULE_USERDATA: u16 = 7;
const LIST_ELEM: u16 = 1;
const EXPR_NAME: u16 = 1;
const EXPR_DATA: u16 = 2;
const COUNTER_PACKETS: u16 = 2;
/// nftables' rule userdata: type-length-value, the comment is type 0.
const UDATA_RULE_COMMENT: u8 = 0;
const SET_TABLE: u16 = 1;
const SET_NAME: u16 = 2;
const SET_FLAGS: u16 = 3;
const SET_KEY_TYPE: u16 = 4;
const SET_DATA_TYPE: u16 = 6;
const SET_F_INTERVAL: u32 = 0x4;
const SET_F_MAP: u32 = 0x8;
/// Set by some nft versions for a concatenated key: the key type says it.
const SET_F_CONCAT: u32 = 0x80;
const ELEM_LIST_TABLE: u16 = 1;
const ELEM_LIST_SET: u16 = 2;
const ELEM_LIST_ELEMENTS: u16 = 3;
const ELEM_KEY: u16 = 1;
const ELEM_DATA: u16 = 2;
const DATA_VALUE: u16 = 1;
/// The type of a verdict map's values.
const DATA_VERDICT: u32 = 0xffff_ff00;

/// Sends one request and hands each reply's attributes to `each`, until
/// the dump is done. `Ok(false)`: the kernel has no such object.
fn request(
    socket: &Socket,
    table: TableId,
    what: &'static str,
    kind: u16,
    flags: u16,
    body: &[u8],
    mut each: impl FnMut(&[u8]) -> Result<(), DumpError>,
) -> Result<bool, DumpError> {
    let mut buf = Vec::new();
    message(&mut buf, NFNL_SUBSYS_NFTABLES << 8 | kind, NLM_F_REQUEST | flags, 1, table.family.nfproto(), 0, body);
    socket.send(&buf, 0)?;
    let dump = flags & NLM_F_DUMP != 0;
    // The kernel fills dump datagrams up to 32 KiB.
    let mut reply = vec![0u8; 1 << 16];
    loop {
        let size = socket.recv(&mut &mut reply[..], 0)?;
        let mut whole = 0;
        for m in messages(&reply[..size]) {
            whole += m.bytes.len().next_multiple_of(4);
            match m.kind {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    return match m.errno() {
                        Some(0) => Ok(true),
                        Some(ENOENT) => Ok(false),
                        errno => Err(DumpError::Refused { what, errno: errno.unwrap_or(0) }),
                    };
                }
                // Past the netlink header and nfgenmsg's four bytes.
                _ if m.bytes.len() >= 20 => {
                    each(&m.bytes[20..])?;
                    if !dump {
                        return Ok(true);
                    }
                }
                _ => {}
            }
        }
        if whole < size {
            let why = format!("{} of {size} bytes are no whole message", size - whole);
            return Err(DumpError::Malformed { what: what.into(), why });
        }
    }
}

/// Attributes as (type without its flags, payload); stops at the first
/// one that does not fit.
fn attributes(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        Some((kind, payload))
    })
}

fn find(b: &[u8], kind: u16) -> Option<&[u8]> {
    attributes(b).find(|(k, _)| *k == kind).map(|(_, p)| p)
}

fn text(p: &[u8]) -> String {
    String::from_utf8_lossy(p.split(|c| *c == 0).next().unwrap_or_default()).into_owned()
}

fn be32(p: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(p.get(..4)?.try_into().ok()?))
}

fn table_body(table: TableId, kind: u16) -> Vec<u8> {
    let mut b = Vec::new();
    attr(&mut b, kind, &cstr(table.name));
    b
}

/// Whether `table` exists.
pub fn table_exists(socket: &Socket, table: TableId) -> Result<bool, DumpError> {
    request(socket, table, "the table", NFT_MSG_GETTABLE, 0, &table_body(table, TABLE_NAME), |_| Ok(()))
}

/// A datatype as nft spells it in a set's `type`; concatenations are six
/// bits a part, the first part highest.
fn type_name(id: u32) -> String {
    if id == DATA_VERDICT {
        return "verdict".into();
    }
    let one = |t: u32| match t {
        7 => "ipv4_addr".to_string(),
        12 => "inet_proto".to_string(),
        13 => "inet_service".to_string(),
        other => format!("type {other}"),
    };
    let (mut parts, mut rest) = (Vec::new(), id);
    while rest != 0 {
        parts.push(one(rest & 0x3f));
        rest >>= 6;
    }
    parts.reverse();
    parts.join(" . ")
}

/// Each set of `table` as the skeleton spells it (`type|map|flags`).
pub fn sets(socket: &Socket, table: TableId) -> Result<BTreeMap<String, String>, DumpError> {
    let mut out = BTreeMap::new();
    request(socket, table, "sets", NFT_MSG_GETSET, NLM_F_DUMP, &table_body(table, SET_TABLE), |m| {
        let name = find(m, SET_NAME).map(text).unwrap_or_default();
        let flags = find(m, SET_FLAGS).and_then(be32).unwrap_or(0);
        let key = find(m, SET_KEY_TYPE).and_then(be32);
        let data = find(m, SET_DATA_TYPE).and_then(be32);
        out.insert(name, describe(flags, key, data));
        Ok(())
    })?;
    Ok(out)
}

/// A set as the skeleton spells it (`type|map|flags`, as
/// `model::Set::describe`). Flags other than a map's and an interval's
/// (constant, timeout, dynamic...) are not natgw's: spelt out, so they
/// differ.
fn describe(flags: u32, key: Option<u32>, data: Option<u32>) -> String {
    let key = key.map(type_name).unwrap_or_default();
    let value = match data {
        Some(t) if flags & SET_F_MAP != 0 => type_name(t),
        _ => String::new(),
    };
    let mut shown: Vec<String> = Vec::new();
    if flags & SET_F_INTERVAL != 0 {
        shown.push("interval".into());
    }
    let rest = flags & !(SET_F_MAP | SET_F_INTERVAL | SET_F_CONCAT);
    if rest != 0 {
        shown.push(format!("{rest:#x}"));
    }
    format!("{key}|{value}|{}", shown.join(","))
}

/// The comment of each rule, by chain, in the chain's order.
pub fn rule_comments(socket: &Socket, table: TableId) -> Result<BTreeMap<String, Vec<String>>, DumpError> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    request(socket, table, "rules", NFT_MSG_GETRULE, NLM_F_DUMP, &table_body(table, RULE_TABLE), |m| {
        let chain = find(m, RULE_CHAIN).map(text).unwrap_or_default();
        let comment = find(m, RULE_USERDATA).and_then(udata_comment);
        out.entry(chain).or_default().push(comment.unwrap_or_else(|| "(no comment)".into()));
        Ok(())
    })?;
    Ok(out)
}

/// Each rule of `chain` in `table`: its comment and the packets its
/// counter saw (0 for a rule without one).
pub fn rule_counters(socket: &Socket, table: TableId, chain: &str) -> Result<Vec<(String, u64)>, DumpError> {
    let mut body = table_body(table, RULE_TABLE);
    attr(&mut body, RULE_CHAIN, &cstr(chain));
    let mut out = Vec::new();
    request(socket, table, "rules", NFT_MSG_GETRULE, NLM_F_DUMP, &body, |m| {
        let comment = find(m, RULE_USERDATA).and_then(udata_comment).unwrap_or_else(|| "(no comment)".into());
        out.push((comment, find(m, RULE_EXPRESSIONS).map(counter_packets).unwrap_or(0)));
        Ok(())
    })?;
    Ok(out)
}

/// The packets of the first `counter` among a rule's expressions.
fn counter_packets(expressions: &[u8]) -> u64 {
    attributes(expressions)
        .filter(|(k, _)| *k == LIST_ELEM)
        .find(|(_, e)| find(e, EXPR_NAME).map(text).as_deref() == Some("counter"))
        .and_then(|(_, e)| find(e, EXPR_DATA))
        .and_then(|d| find(d, COUNTER_PACKETS))
        .and_then(|p| Some(u64::from_be_bytes(p.get(..8)?.try_into().ok()?)))
        .unwrap_or(0)
}

fn udata_comment(mut u: &[u8]) -> Option<String> {
    while u.len() >= 2 {
        let (kind, len) = (u[0], u[1] as usize);
        let value = u.get(2..2 + len)?;
        if kind == UDATA_RULE_COMMENT {
            return Some(text(value));
        }
        u = &u[2 + len..];
    }
    None
}

/// Every element of `set`, key and value as the kernel stores them (each
/// part of a concatenation padded to four bytes), handed to `each`.
pub fn elements(
    socket: &Socket,
    table: TableId,
    set: &str,
    mut each: impl FnMut(&[u8], &[u8]) -> Result<(), String>,
) -> Result<(), DumpError> {
    let mut body = Vec::new();
    attr(&mut body, ELEM_LIST_TABLE, &cstr(table.name));
    attr(&mut body, ELEM_LIST_SET, &cstr(set));
    let bad = |why: String| DumpError::Malformed { what: format!("set {set}"), why };
    request(socket, table, "set elements", NFT_MSG_GETSETELEM, NLM_F_DUMP, &body, |m| {
        decode_elements(m, &mut each).map_err(bad)
    })?;
    Ok(())
}

/// The elements of one NEWSETELEM message.
fn decode_elements(m: &[u8], each: &mut impl FnMut(&[u8], &[u8]) -> Result<(), String>) -> Result<(), String> {
    let Some(list) = find(m, ELEM_LIST_ELEMENTS) else { return Ok(()) };
    for (_, elem) in attributes(list) {
        let value = |kind| find(elem, kind).and_then(|d| find(d, DATA_VALUE));
        let key = value(ELEM_KEY).ok_or("an element without a key")?;
        each(key, value(ELEM_DATA).unwrap_or_default())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_read_as_nft_spells_them() {
        assert_eq!(type_name(7), "ipv4_addr");
        assert_eq!(type_name((7 << 12) | (12 << 6) | 13), "ipv4_addr . inet_proto . inet_service");
        assert_eq!(type_name((7 << 6) | 13), "ipv4_addr . inet_service");
        assert_eq!(type_name(9), "type 9");
        assert_eq!(type_name(DATA_VERDICT), "verdict");
    }

    #[test]
    fn sets_are_described_as_natgw_declares_them() {
        let port_fwd = (7 << 12) | (12 << 6) | 13;
        assert_eq!(
            describe(SET_F_MAP | SET_F_CONCAT, Some(port_fwd), Some((7 << 6) | 13)),
            "ipv4_addr . inet_proto . inet_service|ipv4_addr . inet_service|"
        );
        assert_eq!(describe(SET_F_INTERVAL | SET_F_MAP, Some(7), Some(7)), "ipv4_addr|ipv4_addr|interval");
        assert_eq!(describe(SET_F_INTERVAL, Some(7), None), "ipv4_addr||interval");
        // A constant set (0x2) is not one of natgw's.
        assert_eq!(describe(0x2 | SET_F_MAP, Some(7), Some(7)), "ipv4_addr|ipv4_addr|0x2");
    }

    #[test]
    fn elements_read_back_what_a_batch_writes() {
        // A NEWSETELEM reply carries the same attributes as the request
        // natgw sends to add them.
        let items = vec![(vec![198, 51, 100, 7], vec![10, 0, 0, 7]), (vec![198, 51, 100, 8], vec![10, 0, 0, 8])];
        let body = crate::nft::netlink::elements(crate::nft::ID, "fip_dnat", &items, true);
        let mut seen = Vec::new();
        decode_elements(&body, &mut |k, v| {
            seen.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, items);
    }

    #[test]
    fn a_rule_comment_is_found_among_other_userdata() {
        let mut u = vec![1, 4, 0, 0, 0, 1];
        u.extend([UDATA_RULE_COMMENT, 6]);
        u.extend(b"natgw\0");
        assert_eq!(udata_comment(&u).as_deref(), Some("natgw"));
        assert_eq!(udata_comment(&[0, 9, 1]), None, "a length past the end is no comment");
    }

    #[test]
    fn a_rules_counter_is_found_among_its_expressions() {
        let expr = |name: &str, data: &[u8]| {
            let mut e = Vec::new();
            attr(&mut e, EXPR_NAME, &cstr(name));
            attr(&mut e, EXPR_DATA, data);
            let mut l = Vec::new();
            attr(&mut l, LIST_ELEM, &e);
            l
        };
        let mut counter = Vec::new();
        attr(&mut counter, 1, &999u64.to_be_bytes());
        attr(&mut counter, COUNTER_PACKETS, &42u64.to_be_bytes());
        let mut all = expr("meta", &[0, 0, 0, 0]);
        all.extend(expr("counter", &counter));
        all.extend(expr("immediate", &[]));
        assert_eq!(counter_packets(&all), 42);
        assert_eq!(counter_packets(&expr("meta", &[])), 0, "a rule without a counter");
    }

    #[test]
    fn attributes_stop_at_a_truncated_one() {
        let mut b = Vec::new();
        attr(&mut b, 2, b"abc\0");
        b.extend([40, 0, 1, 0]);
        let all: Vec<_> = attributes(&b).collect();
        assert_eq!(all, vec![(2, &b"abc\0"[..])]);
    }
}
