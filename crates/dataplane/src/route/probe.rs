//! ARP probes (RFC 5227's address conflict detection): does another host
//! on this segment hold any of these addresses? A standby replica asks
//! before it takes a gateway's addresses, and an active one asks to find
//! a second holder it cannot hear (`natgw-ha`). The kernel of a host that
//! holds an address, as an interface address or a `local` route (natgw's
//! EIPs), answers a probe even when no process of it runs.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::route::garp::{ETH_P_ARP, REPLY, REQUEST, broadcast, link, packet};

/// A packet socket bound to one interface for ARP, sending probes and
/// reading what answers them.
pub struct Prober {
    fd: OwnedFd,
    index: u32,
    mac: [u8; 6],
}

/// Who answered for an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
}

impl Prober {
    /// A prober on interface `index`, whose own hardware address is `mac`
    /// (its own answers are not conflicts).
    pub fn open(index: u32, mac: [u8; 6]) -> std::io::Result<Self> {
        // SAFETY: plain socket(2); ownership passes to OwnedFd at once.
        let fd = unsafe {
            libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, i32::from(ETH_P_ARP.to_be()))
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut addr = link_addr(index);
        addr.sll_protocol = ETH_P_ARP.to_be();
        // SAFETY: addr outlives the call; its length is the struct's.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if bound < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Prober { fd, index, mac })
    }

    /// A prober on interface `name` of the calling thread's namespace.
    pub fn on(name: &str) -> std::io::Result<Self> {
        let (index, mac) = link(name)?;
        Prober::open(index, mac)
    }

    /// Sends a probe for each of `ips` (sender address 0.0.0.0, so no
    /// neighbour learns anything from it) and waits up to `wait` for an
    /// answer from another hardware address: a reply, or another host's
    /// own announcement of one of them. Returns the first holder found.
    pub fn probe(&self, ips: &[Ipv4Addr], wait: Duration) -> std::io::Result<Option<Holder>> {
        self.drain()?;
        for ip in ips {
            self.send(*ip)?;
        }
        self.next_claim(ips, Instant::now() + wait)
    }

    /// Every claim on one of `ips` heard for `wait`, without asking: who
    /// announces or answers for them (a watch of a segment in tests).
    pub fn listen(&self, ips: &[Ipv4Addr], wait: Duration) -> std::io::Result<Vec<Holder>> {
        let until = Instant::now() + wait;
        let mut heard = Vec::new();
        while let Some(h) = self.next_claim(ips, until)? {
            heard.push(h);
        }
        Ok(heard)
    }

    /// The next claim on one of `ips` from another hardware address,
    /// before `until`.
    fn next_claim(&self, ips: &[Ipv4Addr], until: Instant) -> std::io::Result<Option<Holder>> {
        let mut buf = [0u8; 64];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            // SAFETY: one pollfd, valid for the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ready < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if ready == 0 {
                return Ok(None);
            }
            // SAFETY: buf outlives the call and its length is passed.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(h) = holder(&buf[..n as usize], ips, self.mac) {
                return Ok(Some(h));
            }
        }
    }

    /// Drops what arrived before this probe.
    fn drain(&self) -> std::io::Result<()> {
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: buf outlives the call and its length is passed.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return if e.kind() == std::io::ErrorKind::WouldBlock { Ok(()) } else { Err(e) };
            }
        }
    }

    fn send(&self, ip: Ipv4Addr) -> std::io::Result<()> {
        broadcast(&self.fd, self.index, &packet(REQUEST, self.mac, Ipv4Addr::UNSPECIFIED, ip))
    }
}

fn link_addr(index: u32) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid start value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index as i32;
    addr
}

/// The holder an ARP packet reveals (pure): a reply, or a request another
/// host sends from one of `ips` (an announcement), from a hardware
/// address not `own`. Probes (sender 0.0.0.0) reveal nothing.
fn holder(pkt: &[u8], ips: &[Ipv4Addr], own: [u8; 6]) -> Option<Holder> {
    if pkt.len() < 28 || pkt[0..2] != [0, 1] || pkt[2..4] != [8, 0] || pkt[4] != 6 || pkt[5] != 4 {
        return None;
    }
    let op = u16::from_be_bytes([pkt[6], pkt[7]]);
    let mac: [u8; 6] = pkt[8..14].try_into().ok()?;
    let sender = Ipv4Addr::new(pkt[14], pkt[15], pkt[16], pkt[17]);
    let claims = matches!(op, REQUEST | REPLY) && !sender.is_unspecified() && ips.contains(&sender);
    (claims && mac != own).then_some(Holder { ip: sender, mac })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_or_an_announcement_from_another_host_is_a_holder() {
        let (own, other) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let eip = Ipv4Addr::new(198, 51, 100, 50);
        let reply = packet(REPLY, other, eip, Ipv4Addr::UNSPECIFIED);
        assert_eq!(holder(&reply, &[eip], own), Some(Holder { ip: eip, mac: other }));
        let announce = packet(REQUEST, other, eip, eip);
        assert!(holder(&announce, &[eip], own).is_some());
        // Our own answer, another host's probe, another address: no.
        assert_eq!(holder(&packet(REPLY, own, eip, eip), &[eip], own), None);
        assert_eq!(holder(&packet(REQUEST, other, Ipv4Addr::UNSPECIFIED, eip), &[eip], own), None);
        assert_eq!(holder(&packet(REPLY, other, Ipv4Addr::new(198, 51, 100, 51), eip), &[eip], own), None);
        assert_eq!(holder(&reply[..20], &[eip], own), None, "truncated");
    }
}
