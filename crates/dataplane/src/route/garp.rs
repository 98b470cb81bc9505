//! Gratuitous ARP: announce an address that just appeared, so neighbours
//! (the upstream router, a switch) learn its new owner at once instead of
//! after their cache expires.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub(crate) const ETH_P_ARP: u16 = 0x0806;

/// A packet socket that only sends (protocol 0: no receive hook). Closing
/// a packet socket waits for an RCU grace period (about 10 ms here), so
/// one socket per namespace worker is kept open rather than one per
/// announcement: per announcement it made 1,000 EIPs take 13 s.
pub struct Announcer {
    fd: OwnedFd,
}

impl Announcer {
    pub fn open() -> std::io::Result<Self> {
        // SAFETY: plain socket(2); ownership passes to OwnedFd at once.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Announcer { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// `announce` from interface `name` of the calling thread's namespace.
    pub fn announce_on(&self, name: &str, ip: Ipv4Addr) -> std::io::Result<()> {
        let (index, mac) = link(name)?;
        self.announce(index, mac, ip)
    }

    /// Sends one gratuitous ARP request for `ip` from interface `index`
    /// with hardware address `mac`.
    pub fn announce(&self, index: u32, mac: [u8; 6], ip: Ipv4Addr) -> std::io::Result<()> {
        // Target = sender: gratuitous.
        broadcast(&self.fd, index, &packet(REQUEST, mac, ip, ip))
    }
}

/// Interface `name` of the calling thread's namespace: its index and
/// hardware address.
pub fn link(name: &str) -> std::io::Result<(u32, [u8; 6])> {
    let index = nix::net::if_::if_nametoindex(name).map_err(std::io::Error::from)?;
    let mac = nix::ifaddrs::getifaddrs()
        .map_err(std::io::Error::from)?
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address?.as_link_addr()?.addr())
        .ok_or_else(|| std::io::Error::other(format!("{name} has no hardware address")))?;
    Ok((index, mac))
}

pub(crate) const REQUEST: u16 = 1;
pub(crate) const REPLY: u16 = 2;

/// An ARP packet for Ethernet and IPv4 (pure).
pub(crate) fn packet(op: u16, sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> [u8; 28] {
    let mut pkt = [0u8; 28];
    pkt[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    pkt[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    pkt[4] = 6;
    pkt[5] = 4;
    pkt[6..8].copy_from_slice(&op.to_be_bytes());
    pkt[8..14].copy_from_slice(&sender_mac);
    pkt[14..18].copy_from_slice(&sender.octets());
    pkt[24..28].copy_from_slice(&target.octets());
    pkt
}

/// Sends `pkt` as an ARP frame to the broadcast address from interface
/// `index`, on packet socket `fd`.
pub(crate) fn broadcast(fd: &OwnedFd, index: u32, pkt: &[u8; 28]) -> std::io::Result<()> {
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid start value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ARP.to_be();
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: pkt and addr outlive the call; lengths match the buffers.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if sent < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}
