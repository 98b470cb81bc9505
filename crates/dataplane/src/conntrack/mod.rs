//! Conntrack over netfilter netlink: dump the table, delete entries by
//! their original tuple. Runs in the namespace of the calling thread.
//! Which entries are stale is `policy` (pure); what flows use per EIP is
//! `ports`; the kernel's events of entries made and ended, `events`;
//! translation logs from them are `translog`; the
//! connections a standby replica installs with their translation, `replica`.

pub mod events;
pub mod policy;
pub mod ports;
pub mod replica;
pub mod translog;

use std::net::IpAddr;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use policy::CtEntry;

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("conntrack netlink: {0}")]
    Io(#[from] std::io::Error),
    #[error("conntrack netlink: cannot decode reply")]
    Decode(#[source] netlink_packet_core::DecodeError),
    #[error("conntrack netlink: kernel error {0}")]
    Kernel(i32),
}

/// A dumped entry with the raw tuple needed to delete it.
pub struct Dumped {
    pub entry: CtEntry,
    orig: Vec<Tuple>,
}

/// One netlink socket for a dump and the deletes that follow it.
pub struct Conntrack {
    socket: Socket,
}

/// A netfilter netlink socket talking to the kernel, in the namespace of
/// the calling thread.
pub(crate) fn netfilter_socket() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    crate::deadline::bound_receives(&socket)?;
    Ok(socket)
}

impl Conntrack {
    pub fn open() -> Result<Self, ConntrackError> {
        Ok(Conntrack { socket: netfilter_socket()? })
    }

    /// The IPv4 entries `keep` picks, judged as each message is decoded:
    /// only those are held, whatever the size of the table (a whole dump
    /// held about 0.5 KB an entry, 150 MB at 300,000).
    pub fn dump_where(&self, mut keep: impl FnMut(&CtEntry) -> bool) -> Result<Vec<Dumped>, ConntrackError> {
        let mut out = Vec::new();
        dump(&self.socket, |d| {
            if keep(&d.entry) {
                out.push(d);
            }
        })?;
        Ok(out)
    }

    /// Every IPv4 entry's addresses and ports only (28 bytes each).
    pub fn entries(&self) -> Result<Vec<CtEntry>, ConntrackError> {
        let mut out = Vec::new();
        dump(&self.socket, |d| out.push(d.entry))?;
        Ok(out)
    }

    /// Deletes entries; one already gone counts as deleted.
    pub fn delete(&self, entries: &[Dumped]) -> Result<usize, ConntrackError> {
        delete(&self.socket, entries)
    }

    /// Creates entries (as `conntrack -I` does, one message each) that
    /// live `timeout_secs`: how tests fill a table with 300,000 flows in
    /// seconds instead of 300,000 processes.
    pub fn insert(&self, entries: &[CtEntry], timeout_secs: u32) -> Result<(), ConntrackError> {
        for e in entries {
            let attrs = vec![
                ConntrackAttribute::CtaTupleOrig(encode_tuple(e.proto, &e.orig)),
                ConntrackAttribute::CtaTupleReply(encode_tuple(e.proto, &e.reply)),
                ConntrackAttribute::CtaTimeout(timeout_secs),
            ];
            send(&self.socket, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE, ConntrackMessage::New(attrs))?;
            receive(&self.socket, |_| {})?;
        }
        Ok(())
    }
}

fn encode_tuple(proto: u8, t: &policy::Tuple) -> Vec<Tuple> {
    vec![
        Tuple::Ip(vec![IPTuple::SourceAddress(IpAddr::V4(t.src)), IPTuple::DestinationAddress(IpAddr::V4(t.dst))]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(Protocol::from(proto)),
            ProtoTuple::SourcePort(t.sport),
            ProtoTuple::DestinationPort(t.dport),
        ]),
    ]
}

fn send(s: &Socket, flags: u16, msg: ConntrackMessage) -> Result<(), ConntrackError> {
    let mut hdr = NetlinkHeader::default();
    hdr.flags = flags;
    let mut packet = NetlinkMessage::new(
        hdr,
        NetlinkPayload::from(NetfilterMessage::new(NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0), msg)),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf[..]);
    s.send(&buf, 0)?;
    Ok(())
}

/// Reads replies until Done (dump) or the ack (request); calls `each` on
/// every conntrack message.
fn receive(s: &Socket, mut each: impl FnMut(ConntrackMessage)) -> Result<(), ConntrackError> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let size = s.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let msg =
                NetlinkMessage::<NetfilterMessage>::deserialize(&buf[offset..size]).map_err(ConntrackError::Decode)?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(()),
                        Some(c) => Err(ConntrackError::Kernel(c.get())),
                    };
                }
                NetlinkPayload::InnerMessage(m) => {
                    if let netlink_packet_netfilter::NetfilterMessageInner::Conntrack(ct) = m.inner {
                        each(ct);
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// Walks the table, handing each entry to `each` as it is decoded.
fn dump(s: &Socket, mut each: impl FnMut(Dumped)) -> Result<(), ConntrackError> {
    send(s, NLM_F_REQUEST | NLM_F_DUMP, ConntrackMessage::Get(vec![]))?;
    receive(s, |msg| {
        if let ConntrackMessage::New(attrs) = msg {
            let mut orig = None;
            let mut reply = None;
            for a in attrs {
                match a {
                    ConntrackAttribute::CtaTupleOrig(t) => orig = Some(t),
                    ConntrackAttribute::CtaTupleReply(t) => reply = Some(t),
                    _ => {}
                }
            }
            if let (Some(o), Some(r)) = (orig, reply)
                && let (Some((proto, ot)), Some((_, rt))) = (decode_tuple(&o), decode_tuple(&r))
            {
                each(Dumped { entry: CtEntry { proto, orig: ot, reply: rt }, orig: o });
            }
        }
    })
}

/// A netlink tuple as (protocol number, addresses and ports).
pub fn decode_tuple(tuple: &[Tuple]) -> Option<(u8, policy::Tuple)> {
    let (mut src, mut dst, mut sport, mut dport, mut proto) = (None, None, 0, 0, None);
    for t in tuple {
        match t {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(IpAddr::V4(a)) => src = Some(*a),
                        IPTuple::DestinationAddress(IpAddr::V4(a)) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(Protocol::Other(n)) => proto = Some(*n),
                        ProtoTuple::Protocol(p) => proto = Some(u8::from(*p)),
                        ProtoTuple::SourcePort(x) => sport = *x,
                        ProtoTuple::DestinationPort(x) => dport = *x,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((proto?, policy::Tuple { src: src?, dst: dst?, sport, dport }))
}

fn delete(s: &Socket, entries: &[Dumped]) -> Result<usize, ConntrackError> {
    let mut deleted = 0;
    for d in entries {
        send(
            s,
            NLM_F_REQUEST | NLM_F_ACK,
            ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(d.orig.clone())]),
        )?;
        match receive(s, |_| {}) {
            Ok(()) => deleted += 1,
            Err(ConntrackError::Kernel(c)) if c == -libc::ENOENT => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}
