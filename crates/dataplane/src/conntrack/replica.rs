//! Connections as a standby replica installs them: each entry the active
//! made, with its exact translation. The kernel refuses NAT status bits
//! from userspace, so the translation is given as a NAT range of one
//! address and one port (`CTA_NAT_SRC`, `CTA_NAT_DST`), as conntrackd
//! does: the new entry translates exactly as the active's did, with the
//! source port the active chose at random, and the session's next packet
//! through the standby finds it.

use netlink_packet_core::{DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
use netlink_packet_netfilter::conntrack::{ConntrackAttribute, ConntrackMessage, ProtoInfo, ProtoInfoTCP};

use super::policy::{CtEntry, Tuple};
use super::{Conntrack, ConntrackError, Dumped, encode_tuple, receive, send};

const CTA_NAT_SRC: u16 = 6;
const CTA_NAT_DST: u16 = 13;
const CTA_NAT_V4_MINIP: u16 = 1;
const CTA_NAT_V4_MAXIP: u16 = 2;
const CTA_NAT_PROTO: u16 = 3;
const CTA_PROTONAT_PORT_MIN: u16 = 1;
const CTA_PROTONAT_PORT_MAX: u16 = 2;
const TCP: u8 = 6;
const TCP_CONNTRACK_ESTABLISHED: u8 = 3;

/// An address and port a flow was translated to.
pub type To = (std::net::Ipv4Addr, u16);

/// Where an entry's source and destination were translated to (pure):
/// the reply tuple says where replies go (the source as translated) and
/// where they come from (the destination as translated).
pub fn translation(e: &CtEntry) -> (Option<To>, Option<To>) {
    let (o, r) = (e.orig, e.reply);
    let src = (r.dst != o.src || r.dport != o.sport).then_some((r.dst, r.dport));
    let dst = (r.src != o.dst || r.sport != o.dport).then_some((r.src, r.sport));
    (src, dst)
}

/// A nested NAT range of exactly one address and port.
fn nat_range(kind: u16, (ip, port): To) -> ConntrackAttribute {
    let mut proto = Vec::new();
    attr(&mut proto, CTA_PROTONAT_PORT_MIN, &port.to_be_bytes());
    attr(&mut proto, CTA_PROTONAT_PORT_MAX, &port.to_be_bytes());
    let mut range = Vec::new();
    attr(&mut range, CTA_NAT_V4_MINIP, &ip.octets());
    attr(&mut range, CTA_NAT_V4_MAXIP, &ip.octets());
    attr(&mut range, CTA_NAT_PROTO, &proto);
    ConntrackAttribute::Other(DefaultNla::new(kind, range))
}

fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    buf.extend(((4 + payload.len()) as u16).to_ne_bytes());
    buf.extend(kind.to_ne_bytes());
    buf.extend(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

impl Conntrack {
    /// Installs `entries` as the active replica holds them, each living
    /// `timeout_secs` until traffic refreshes it; TCP ones as established.
    /// An entry already present is replaced: the active's view is the
    /// fresher one (a replica that carried the flow before, and let go,
    /// still has its old entry, whose TCP window tracking would now find
    /// the session's packets out of window).
    pub fn install(&self, entries: &[CtEntry], timeout_secs: u32) -> Result<usize, ConntrackError> {
        let mut installed = 0;
        for e in entries {
            // The tuples before translation: the kernel computes the reply
            // tuple from the original one and the NAT ranges.
            let mut attrs = vec![
                ConntrackAttribute::CtaTupleOrig(encode_tuple(e.proto, &e.orig)),
                ConntrackAttribute::CtaTupleReply(encode_tuple(e.proto, &untranslated(&e.orig))),
                ConntrackAttribute::CtaTimeout(timeout_secs),
            ];
            let (src, dst) = translation(e);
            attrs.extend(src.map(|s| nat_range(CTA_NAT_SRC, s)));
            attrs.extend(dst.map(|d| nat_range(CTA_NAT_DST, d)));
            if e.proto == TCP {
                let state = ProtoInfoTCP::State(TCP_CONNTRACK_ESTABLISHED);
                attrs.push(ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![state])]));
            }
            let create = |attrs| {
                // EXCL: without it the kernel would try to change the
                // existing entry, and refuse to change its NAT.
                let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
                send(&self.socket, flags, ConntrackMessage::New(attrs))?;
                receive(&self.socket, |_| {})
            };
            match create(attrs.clone()) {
                Ok(()) => {}
                Err(ConntrackError::Kernel(c)) if c == -libc::EEXIST => {
                    let old = Dumped { entry: *e, orig: encode_tuple(e.proto, &e.orig) };
                    self.delete(std::slice::from_ref(&old))?;
                    create(attrs)?;
                }
                Err(e) => return Err(e),
            }
            installed += 1;
        }
        Ok(installed)
    }
}

/// The reply tuple of an untranslated flow.
fn untranslated(o: &Tuple) -> Tuple {
    Tuple { src: o.dst, dst: o.src, sport: o.dport, dport: o.sport }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
        Tuple { src: src.parse().unwrap(), dst: dst.parse().unwrap(), sport, dport }
    }

    #[test]
    fn the_reply_tuple_tells_each_translation() {
        // SNAT to an EIP with a random port.
        let snat = CtEntry {
            proto: 6,
            orig: t("10.77.0.12", 40000, "198.51.100.1", 9000),
            reply: t("198.51.100.1", 9000, "198.51.100.10", 61234),
        };
        assert_eq!(translation(&snat), (Some(("198.51.100.10".parse().unwrap(), 61234)), None));
        // A port forward.
        let dnat = CtEntry {
            proto: 17,
            orig: t("198.51.100.1", 5000, "198.51.100.12", 53),
            reply: t("10.77.0.12", 5353, "198.51.100.1", 5000),
        };
        assert_eq!(translation(&dnat), (None, Some(("10.77.0.12".parse().unwrap(), 5353))));
        let plain = CtEntry { proto: 6, orig: t("10.0.0.1", 1, "10.0.0.2", 2), reply: t("10.0.0.2", 2, "10.0.0.1", 1) };
        assert_eq!(translation(&plain), (None, None));
    }
}
