//! The heartbeat path: adverts as UDP datagrams (`natgw_ha::wire`) to
//! each peer, from a socket bound in the gateway's namespace.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use natgw_ha::{Advert, wire};

pub struct Heartbeat {
    socket: UdpSocket,
    gateway: String,
    peers: Vec<SocketAddrV4>,
    /// Datagrams refused: malformed, from elsewhere, or of no peer.
    pub refused: AtomicU64,
}

impl Heartbeat {
    /// `socket` bound in the namespace; a receive waits at most `wait`.
    pub fn new(socket: UdpSocket, gateway: &str, peers: Vec<SocketAddrV4>, wait: Duration) -> std::io::Result<Self> {
        socket.set_read_timeout(Some(wait))?;
        Ok(Heartbeat { socket, gateway: gateway.into(), peers, refused: AtomicU64::new(0) })
    }

    /// Sends `a` to every peer; a peer that cannot be reached is left to
    /// the timers (its replica decides on silence).
    pub fn send(&self, a: &Advert) {
        let text = wire::encode(&self.gateway, a);
        for p in &self.peers {
            if let Err(e) = self.socket.send_to(text.as_bytes(), p) {
                tracing::debug!(peer = %p, error = %e, "advert not sent");
            }
        }
    }

    /// The next advert of this gateway from a peer, waiting at most the
    /// socket's wait; `None` when none came.
    pub fn receive(&self) -> Option<Advert> {
        let mut buf = [0u8; wire::MAX_LEN + 1];
        loop {
            let (n, from) = self.socket.recv_from(&mut buf).ok()?;
            let SocketAddr::V4(from) = from else { continue };
            if !self.peers.iter().any(|p| p.ip() == from.ip()) {
                self.refuse(&format!("from {from}, not a peer"));
                continue;
            }
            match wire::decode(&buf[..n]) {
                Ok((gateway, a)) if gateway == self.gateway => return Some(a),
                Ok((gateway, _)) => self.refuse(&format!("from {from}: an advert of gateway {gateway:?}")),
                Err(e) => self.refuse(&format!("from {from}: {e}")),
            }
        }
    }

    fn refuse(&self, why: &str) {
        // Said once, then counted: a noisy sender must not flood the log.
        if self.refused.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!("refused a heartbeat datagram ({why}); further ones are only counted");
        }
    }
}
