//! Conntrack events of the calling thread's namespace: every entry made
//! and ended, as the kernel reports them. Read by the translation log and
//! by the connection stream a replica sends its peer.

use std::io::ErrorKind;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::conntrack::{ConntrackAttribute, ConntrackMessage};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use super::decode_tuple;
use super::policy::CtEntry;

/// NFNLGRP_CONNTRACK_NEW and NFNLGRP_CONNTRACK_DESTROY as bind groups.
const GROUPS: u32 = 1 | 4;

/// What one read gave.
pub enum Read {
    /// This many messages were handed over.
    Messages(usize),
    /// Nothing arrived within the wait: look at whether to stop.
    Idle,
    /// The kernel's queue overflowed: events were lost (how many is
    /// unknown, at least one).
    Lost,
}

/// A subscription to the namespace's conntrack events.
pub struct Events {
    socket: Socket,
    buf: Vec<u8>,
}

impl Events {
    /// Subscribes in the calling thread's namespace; a read waits at most
    /// `wait` for an event.
    pub fn subscribe(wait: std::time::Duration) -> std::io::Result<Events> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind(&SocketAddr::new(0, GROUPS))?;
        // A deep queue rides out bursts; beyond it the kernel drops.
        let _ = socket.set_rx_buf_sz(8 << 20);
        let timeout = libc::timeval {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(wait.subsec_micros()),
        };
        // SAFETY: a valid socket descriptor and a timeval of the right size.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Events { socket, buf: vec![0u8; 1 << 17] })
    }

    /// Reads what the kernel has queued and hands each conntrack message
    /// to `f`.
    pub fn read(&mut self, mut f: impl FnMut(ConntrackMessage)) -> std::io::Result<Read> {
        let size = match self.socket.recv(&mut &mut self.buf[..], 0) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Ok(Read::Idle),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(Read::Lost),
            Err(e) => return Err(e),
        };
        let (mut offset, mut count) = (0, 0);
        while offset < size {
            let Ok(msg) = NetlinkMessage::<NetfilterMessage>::deserialize(&self.buf[offset..size]) else { break };
            let len = msg.header.length as usize;
            if let NetlinkPayload::InnerMessage(m) = msg.payload
                && let NetfilterMessageInner::Conntrack(ct) = m.inner
            {
                f(ct);
                count += 1;
            }
            if len == 0 {
                break;
            }
            offset += len.next_multiple_of(4);
        }
        Ok(Read::Messages(count))
    }
}

/// An event as an entry: `(true, e)` made, `(false, e)` ended.
pub fn entry_event(msg: &ConntrackMessage) -> Option<(bool, CtEntry)> {
    let (new, attrs) = match msg {
        ConntrackMessage::New(a) => (true, a),
        ConntrackMessage::Delete(a) => (false, a),
        _ => return None,
    };
    let (mut orig, mut reply) = (None, None);
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = decode_tuple(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = decode_tuple(t),
            _ => {}
        }
    }
    let ((proto, orig), (_, reply)) = (orig?, reply?);
    Some((new, CtEntry { proto, orig, reply }))
}
