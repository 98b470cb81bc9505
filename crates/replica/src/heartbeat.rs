//! The heartbeat path: adverts as UDP datagrams (`natgw_ha::wire`),
//! signed (`auth`), to each peer, from a socket bound in the gateway's
//! namespace.

use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use natgw_ha::{Advert, wire};

use crate::auth::Key;

pub struct Heartbeat {
    socket: UdpSocket,
    gateway: String,
    peers: Vec<SocketAddrV4>,
    key: Key,
    /// The next advert's sequence number.
    seq: AtomicU64,
    /// The last sequence number taken from each sender.
    last: std::sync::Mutex<BTreeMap<String, u64>>,
    /// Datagrams refused: malformed, unsigned, replayed, from elsewhere,
    /// or of no peer.
    pub refused: AtomicU64,
}

impl Heartbeat {
    /// `socket` bound in the namespace; a receive waits at most `wait`.
    pub fn new(
        socket: UdpSocket,
        gateway: &str,
        peers: Vec<SocketAddrV4>,
        key: Key,
        wait: Duration,
    ) -> std::io::Result<Self> {
        socket.set_read_timeout(Some(wait))?;
        // Above anything sent before a restart (unless the clock went back).
        let start = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        Ok(Heartbeat {
            socket,
            gateway: gateway.into(),
            peers,
            key,
            seq: AtomicU64::new(start),
            last: Default::default(),
            refused: AtomicU64::new(0),
        })
    }

    /// Sends `a` to every peer; a peer that cannot be reached is left to
    /// the timers (its replica decides on silence).
    pub fn send(&self, a: &Advert) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let text = self.key.sign(&wire::encode(&self.gateway, a), seq);
        for p in &self.peers {
            if let Err(e) = self.socket.send_to(text.as_bytes(), p) {
                tracing::debug!(peer = %p, error = %e, "advert not sent");
            }
        }
    }

    /// The next advert of this gateway from a peer, waiting at most the
    /// socket's wait; `None` when none came.
    pub fn receive(&self) -> Option<Advert> {
        // The advert, its sequence number and its MAC.
        let mut buf = [0u8; wire::MAX_LEN + 128];
        loop {
            let (n, from) = self.socket.recv_from(&mut buf).ok()?;
            let SocketAddr::V4(from) = from else { continue };
            if !self.peers.iter().any(|p| p.ip() == from.ip()) {
                self.refuse(&format!("from {from}, not a peer"));
                continue;
            }
            match self.verify(&buf[..n]) {
                Ok(a) => return Some(a),
                Err(why) => self.refuse(&format!("from {from}: {why}")),
            }
        }
    }

    /// The advert a datagram carries, if it is signed with the key, of
    /// this gateway, and newer than the last taken from its sender.
    fn verify(&self, datagram: &[u8]) -> Result<Advert, String> {
        let Some((text, seq)) = std::str::from_utf8(datagram).ok().and_then(|t| self.key.open(t)) else {
            return Err("not signed with this gateway's HA key".into());
        };
        let (gateway, a) = wire::decode(text.as_bytes()).map_err(|e| e.to_string())?;
        if gateway != self.gateway {
            return Err(format!("an advert of gateway {gateway:?}"));
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let before = last.entry(a.from.clone()).or_insert(0);
        if seq <= *before {
            return Err(format!("sequence {seq} not above the last taken (a replay)"));
        }
        *before = seq;
        Ok(a)
    }

    fn refuse(&self, why: &str) {
        // Said once, then counted: a noisy sender must not flood the log.
        if self.refused.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!("refused a heartbeat datagram ({why}); further ones are only counted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_advert_is_taken_once_signed_for_this_gateway_and_never_again() {
        // Bound nowhere: only `verify` is used.
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        let key = Key::new(b"0123456789abcdef".to_vec());
        let h = Heartbeat::new(socket, "g", vec![], key.clone(), Duration::from_millis(1)).unwrap();
        let a = Advert { from: "a".into(), priority: 1, active: true, term: 2, handover_to: None };
        let signed = |gateway: &str, seq| key.sign(&wire::encode(gateway, &a), seq);
        assert_eq!(h.verify(signed("g", 10).as_bytes()), Ok(a.clone()));
        let replay = h.verify(signed("g", 10).as_bytes()).unwrap_err();
        assert!(replay.contains("replay"), "{replay}");
        assert!(h.verify(signed("g", 9).as_bytes()).is_err(), "an older one");
        assert_eq!(h.verify(signed("g", 11).as_bytes()), Ok(a.clone()));
        assert!(h.verify(signed("other", 12).as_bytes()).unwrap_err().contains("gateway \"other\""));
        let forged = Key::new(b"fedcba9876543210".to_vec()).sign(&wire::encode("g", &a), 13);
        assert!(h.verify(forged.as_bytes()).unwrap_err().contains("not signed"));
    }
}
