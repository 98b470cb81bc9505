//! Map element changes over nf_tables netlink, on a socket kept open by
//! the namespace's worker: the fast path of a single change. Spawning
//! `nft` costs a process and, for a deletion, about 11 ms more: closing an
//! nf_tables socket waits for an RCU grace period after a commit that
//! removed something. The kernel commits the batch inside `sendmsg`, so
//! the translation is in force when the acknowledgements are read.
//!
//! Only the hash maps (FloatingIps and port forwards) go this way; interval
//! sets, whose elements nft splits and merges, and whole-table writes still
//! go through `nft -f`.

use std::cell::Cell;
use std::os::fd::AsRawFd as _;

use netlink_sys::Socket;

use crate::nft::elements::TableSet;
use crate::nft::model::TableId;

#[derive(Debug, thiserror::Error)]
pub enum NfnlError {
    #[error("nf_tables netlink: {0}")]
    Io(#[from] std::io::Error),
    #[error("nf_tables refused the change to set {set} (errno {errno}); nothing was applied")]
    Refused { set: String, errno: i32 },
}

pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLMSG_ERROR: u16 = 0x2;
const NLA_F_NESTED: u16 = 0x8000;
const LIST_TABLE: u16 = 1;
const LIST_SET: u16 = 2;
const LIST_ELEMENTS: u16 = 3;
const LIST_ELEM: u16 = 1;
const ELEM_KEY: u16 = 1;
const ELEM_DATA: u16 = 2;
const DATA_VALUE: u16 = 1;
/// Elements per message: their list is one attribute, whose length has
/// 16 bits (1,024 port forwards take 41 KB).
const CHUNK: usize = 1024;
/// The socket buffers' default size (`net.core.wmem_default`): a batch is
/// one `sendmsg`, refused with EMSGSIZE beyond the send buffer.
const DEFAULT_BUFFER: usize = 212_992;
/// What one acknowledgement takes of the receive buffer, generously: the
/// kernel queues them all before the first is read.
const ACK_ROOM: usize = 2048;

/// One element: its key and, for a map, its value, as the kernel stores
/// them (each field of a concatenation padded to four bytes).
pub type Element = (Vec<u8>, Vec<u8>);

/// The element changes of one map.
#[derive(Debug, Default, PartialEq)]
pub struct MapChange {
    pub set: &'static str,
    pub delete: Vec<Element>,
    pub add: Vec<Element>,
}

/// The element changes of `sets` from `have` to `want`, or `None` when
/// an interval set changes too (nft splits and merges intervals; the
/// whole change then goes through `nft -f`, in one transaction).
pub fn changes<T>(sets: &[&dyn TableSet<T>], have: &T, want: &T) -> Option<Vec<MapChange>> {
    if sets.iter().any(|s| s.interval() && s.differs(have, want)) {
        return None;
    }
    Some(map_changes(sets, have, want))
}

/// The hash maps' and sets' changes from `have` to `want`, the unchanged
/// left out.
pub fn map_changes<T>(sets: &[&dyn TableSet<T>], have: &T, want: &T) -> Vec<MapChange> {
    sets.iter()
        .filter_map(|s| s.netlink_change(have, want))
        .filter(|c| !c.delete.is_empty() || !c.add.is_empty())
        .collect()
}

thread_local! {
    // One nf_tables socket per namespace worker thread, opened on first
    // use and kept: it lives in the worker's namespace.
    static HERE: std::cell::RefCell<Option<Nfnl>> = const { std::cell::RefCell::new(None) };
}

/// Applies `changes` to `table` in one transaction on the calling
/// thread's socket (a namespace worker's).
pub fn apply_here(table: TableId, changes: &[MapChange]) -> Result<(), NfnlError> {
    HERE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let socket = match slot.take() {
            Some(s) => s,
            None => Nfnl::open()?,
        };
        let result = socket.apply(table, changes);
        *slot = Some(socket);
        result
    })
}

pub(crate) fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    buf.extend(((4 + payload.len()) as u16).to_ne_bytes());
    buf.extend(kind.to_ne_bytes());
    buf.extend(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// A nested attribute whose content `inner` writes.
fn nested(buf: &mut Vec<u8>, kind: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend([0u8; 4]);
    inner(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    buf[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
}

pub(crate) fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// One netlink message: header, nfgenmsg, attributes.
pub(crate) fn message(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: u8, res_id: u16, body: &[u8]) {
    let len = (16 + 4 + body.len()) as u32;
    buf.extend(len.to_ne_bytes());
    buf.extend(kind.to_ne_bytes());
    buf.extend(flags.to_ne_bytes());
    buf.extend(seq.to_ne_bytes());
    buf.extend(0u32.to_ne_bytes());
    buf.extend([family, 0]);
    buf.extend(res_id.to_be_bytes());
    buf.extend(body);
}

/// One netlink message of a reply: its type and its bytes, header included.
pub(crate) struct Msg<'a> {
    pub kind: u16,
    pub bytes: &'a [u8],
}

impl Msg<'_> {
    /// The 32-bit word at `at`, in host order.
    pub fn word(&self, at: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(self.bytes.get(at..at + 4)?.try_into().ok()?))
    }

    /// An error message's errno, positive (0 is an acknowledgement).
    pub fn errno(&self) -> Option<i32> {
        self.word(16).map(|e| -(e as i32))
    }
}

/// The messages of one datagram; stops at one whose length does not fit.
pub(crate) fn messages(mut buf: &[u8]) -> impl Iterator<Item = Msg<'_>> {
    std::iter::from_fn(move || {
        let len = u32::from_ne_bytes(buf.get(..4)?.try_into().ok()?) as usize;
        if len < 16 || len > buf.len() {
            return None;
        }
        let m = Msg { kind: u16::from_ne_bytes([buf[4], buf[5]]), bytes: &buf[..len] };
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some(m)
    })
}

/// A deletion names the key only.
pub(crate) fn elements(table: TableId, set: &str, items: &[Element], with_data: bool) -> Vec<u8> {
    let mut body = Vec::new();
    attr(&mut body, LIST_TABLE, &cstr(table.name));
    attr(&mut body, LIST_SET, &cstr(set));
    nested(&mut body, LIST_ELEMENTS, |b| {
        for (key, value) in items {
            nested(b, LIST_ELEM, |e| {
                nested(e, ELEM_KEY, |k| attr(k, DATA_VALUE, key));
                if with_data && !value.is_empty() {
                    nested(e, ELEM_DATA, |d| attr(d, DATA_VALUE, value));
                }
            });
        }
    });
    body
}

/// The batch: deletions first, then additions, all in one transaction.
/// Returns the bytes and, per acknowledged message, its set.
pub fn batch(table: TableId, changes: &[MapChange]) -> (Vec<u8>, Vec<&'static str>) {
    let mut buf = Vec::new();
    let mut acked = Vec::new();
    let mut seq = 0;
    message(&mut buf, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, &[]);
    let kinds = [
        (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
        (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE),
    ];
    for (kind, flags) in kinds {
        for c in changes {
            let items = if kind == NFT_MSG_DELSETELEM { &c.delete } else { &c.add };
            for chunk in items.chunks(CHUNK) {
                seq += 1;
                let body = elements(table, c.set, chunk, kind == NFT_MSG_NEWSETELEM);
                message(&mut buf, NFNL_SUBSYS_NFTABLES << 8 | kind, flags, seq, table.family.nfproto(), 0, &body);
                acked.push(c.set);
            }
        }
    }
    message(&mut buf, NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + 1, 0, NFNL_SUBSYS_NFTABLES, &[]);
    (buf, acked)
}

/// An nf_tables netlink socket in the namespace of the thread that opened it.
pub struct Nfnl {
    socket: Socket,
    /// The size both buffers were last given.
    room: Cell<usize>,
}

fn setsockopt(socket: &Socket, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: the pointer and length describe `value`, alive for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

impl Nfnl {
    pub fn open() -> Result<Self, NfnlError> {
        let socket = crate::conntrack::netfilter_socket()?;
        // Errors echo only the header of the refused message, not its
        // thousand elements.
        setsockopt(&socket, libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1)?;
        Ok(Nfnl { socket, room: Cell::new(DEFAULT_BUFFER) })
    }

    /// Grows both socket buffers, as nft does, for a batch of `bytes` and
    /// `messages`: the whole of it is one `sendmsg` and one transaction,
    /// however large (220,000 elements take about 7 MB).
    fn make_room(&self, bytes: usize, messages: usize) -> Result<(), NfnlError> {
        let want = bytes.max(messages * ACK_ROOM).max(DEFAULT_BUFFER);
        if want > self.room.get() {
            let size = i32::try_from(want).map_err(|_| std::io::Error::from_raw_os_error(libc::EMSGSIZE))?;
            // The *FORCE options pass the sysctl maxima (CAP_NET_ADMIN,
            // which programming nftables needs anyway).
            setsockopt(&self.socket, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, size)?;
            setsockopt(&self.socket, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, size)?;
            self.room.set(want);
        }
        Ok(())
    }

    /// Applies the changes to `table` in one transaction: all or nothing.
    pub fn apply(&self, table: TableId, changes: &[MapChange]) -> Result<(), NfnlError> {
        let (buf, acked) = batch(table, changes);
        if acked.is_empty() {
            return Ok(());
        }
        self.make_room(buf.len(), acked.len())?;
        self.socket.send(&buf, 0)?;
        // One acknowledgement per message; after a refusal the kernel
        // rolls the whole batch back and reports only the errors.
        let mut seen = 0;
        let mut reply = vec![0u8; 1 << 16];
        while seen < acked.len() {
            let size = self.socket.recv(&mut &mut reply[..], 0)?;
            for m in messages(&reply[..size]) {
                if m.kind == NLMSG_ERROR {
                    let errno = m.errno().unwrap_or(0);
                    if errno != 0 {
                        let seq = m.word(16 + 4 + 8).unwrap_or(0) as usize;
                        let set = acked.get(seq.saturating_sub(1)).copied().unwrap_or("?").to_string();
                        return Err(NfnlError::Refused { set, errno });
                    }
                    seen += 1;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::elements::GATEWAY;
    use natgw_api::Protocol;
    use natgw_plan::NatTables;

    #[test]
    fn messages_split_a_datagram_and_stop_at_a_length_that_does_not_fit() {
        let mut buf = Vec::new();
        message(&mut buf, 7, 0, 1, crate::nft::model::Family::Ip.nfproto(), 0, &[1, 2, 3]);
        message(&mut buf, 8, 0, 2, crate::nft::model::Family::Ip.nfproto(), 0, &[]);
        let first_len = 16 + 4 + 3;
        buf.splice(first_len..first_len, [0u8]); // pad the first to four bytes
        let kinds: Vec<u16> = messages(&buf).map(|m| m.kind).collect();
        assert_eq!(kinds, vec![7, 8]);
        let mut bad = buf.clone();
        bad[24..28].copy_from_slice(&999u32.to_ne_bytes());
        assert_eq!(messages(&bad).count(), 1, "a length past the end ends the datagram");
    }

    #[test]
    fn concatenated_fields_are_padded_as_nft_stores_them() {
        // What `nft --debug=netlink` shows for 1.2.3.4 . tcp . 80 :
        // 10.0.0.1 . 8080.
        use crate::nft::fields::Bytes;
        let key: natgw_plan::PortKey = ("1.2.3.4".parse().unwrap(), Protocol::Tcp, 80);
        assert_eq!(key.bytes(), [1, 2, 3, 4, 6, 0, 0, 0, 0, 0x50, 0, 0]);
        let target: natgw_plan::Target = ("10.0.0.1".parse().unwrap(), 8080);
        assert_eq!(target.bytes(), [10, 0, 0, 1, 0x1f, 0x90, 0, 0]);
    }

    #[test]
    fn only_map_changes_take_the_fast_path() {
        let mut have = NatTables::default();
        have.fip_dnat.insert("198.51.100.1".parse().unwrap(), "10.0.0.1".parse().unwrap());
        let mut want = have.clone();
        want.fip_dnat.insert("198.51.100.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let c = changes(&GATEWAY, &have, &want).unwrap();
        assert_eq!((c.len(), c[0].delete.len(), c[0].add.len()), (1, 1, 1));
        assert_eq!(changes(&GATEWAY, &want, &want).unwrap(), vec![]);
        want.internal_nets.push(("10.0.0.0".parse().unwrap(), "10.0.0.255".parse().unwrap()));
        assert!(changes(&GATEWAY, &have, &want).is_none());
    }

    #[test]
    fn a_message_of_port_forwards_fits_one_attribute() {
        let items: Vec<Element> = (0..CHUNK as u32)
            .map(|i| {
                use crate::nft::fields::Bytes;
                let (key, target): (natgw_plan::PortKey, natgw_plan::Target) =
                    ((i.into(), Protocol::Udp, 65535), (i.into(), 65535));
                (key.bytes(), target.bytes())
            })
            .collect();
        let body = elements(crate::nft::ID, "port_fwd", &items, true);
        assert!(body.len() < u16::MAX as usize, "{} bytes", body.len());
    }

    #[test]
    fn every_map_change_takes_netlink_however_large() {
        let have = NatTables::default();
        let mut want = have.clone();
        for i in 0..5000u32 {
            want.fip_dnat.insert(i.into(), i.into());
            want.fip_snat.insert(i.into(), i.into());
        }
        let c = changes(&GATEWAY, &have, &want).expect("maps only");
        let (buf, acked) = batch(crate::nft::ID, &c);
        assert_eq!(acked.len(), 2 * 5000usize.div_ceil(CHUNK));
        assert!(buf.len() > DEFAULT_BUFFER, "this batch needs its buffer grown: {} bytes", buf.len());
    }

    #[test]
    fn a_batch_is_framed_and_every_element_message_is_acknowledged() {
        let c = MapChange { set: "fip_dnat", delete: vec![(vec![1, 2, 3, 4], vec![5, 6, 7, 8])], add: vec![] };
        let (buf, acked) = batch(crate::nft::ID, &[c]);
        assert_eq!(acked, ["fip_dnat"]);
        let first = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        assert_eq!(first, 20);
        let kind = u16::from_ne_bytes([buf[first + 4], buf[first + 5]]);
        assert_eq!(kind, NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_DELSETELEM);
        assert_eq!(buf.len() % 4, 0);
    }

    /// The same writer addresses any table: the egress table, or one of
    /// another family (nfgenmsg's first byte) whose name shares a prefix.
    #[test]
    fn a_batch_names_its_table_and_family() {
        use crate::nft::model::{Family, TableId};
        let c = MapChange { set: "m", delete: vec![], add: vec![(vec![1, 2, 3, 4], vec![5, 6, 7, 8])] };
        for table in [crate::egress::ID, TableId { family: Family::Ip6, name: "natgw6" }] {
            let (buf, _) = batch(table, std::slice::from_ref(&c));
            let element = messages(&buf).nth(1).expect("the element message");
            assert_eq!(element.bytes[16], table.family.nfproto(), "{table:?}");
            let name = cstr(table.name);
            assert!(element.bytes.windows(name.len()).any(|w| w == name.as_slice()), "{table:?}");
        }
        assert_eq!(Family::Ip6.nfproto(), 10);
        assert_eq!(Family::Inet.to_string(), "inet");
    }
}
