//! Who may speak for a replica: adverts and the connection stream carry an
//! HMAC-SHA256 under a key the replicas share. Whoever else can send on the
//! heartbeat path (a tenant's pod on a pod network, a host on a shared
//! link) could otherwise forge a handover or a later term and move the
//! addresses, or feed a standby connections to install.
//!
//! - An advert goes out as `<advert> seq=<n> mac=<hex>`, the MAC over all
//!   before ` mac=`. `seq` grows with every advert (microseconds since the
//!   epoch at start, plus one per advert), and a receiver refuses any not
//!   above the last it took from that sender: a captured advert replayed
//!   later is refused.
//! - A stream connection starts with the receiver's random nonce; the
//!   sender answers with the MAC of it, before any line.

use std::path::Path;

use sha2::{Digest, Sha256};

/// The shared key.
#[derive(Clone)]
pub struct Key(Vec<u8>);

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the HA key file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error(
        "the HA key file {0} holds {1} bytes: give at least 16 random bytes, the same on both replicas (head -c 32 /dev/urandom > FILE)"
    )]
    Short(String, usize),
}

const BLOCK: usize = 64;

impl Key {
    pub fn new(bytes: Vec<u8>) -> Key {
        Key(bytes)
    }

    /// Reads a key file (its bytes as they are; a trailing newline is
    /// part of the key on both sides alike).
    pub fn load(path: &Path) -> Result<Key, KeyError> {
        let bytes =
            std::fs::read(path).map_err(|source| KeyError::Read { path: path.display().to_string(), source })?;
        if bytes.len() < 16 {
            return Err(KeyError::Short(path.display().to_string(), bytes.len()));
        }
        Ok(Key(bytes))
    }

    /// HMAC-SHA256 of `msg` (RFC 2104).
    pub fn mac(&self, msg: &[u8]) -> [u8; 32] {
        let mut block = [0u8; BLOCK];
        if self.0.len() > BLOCK {
            block[..32].copy_from_slice(&Sha256::digest(&self.0));
        } else {
            block[..self.0.len()].copy_from_slice(&self.0);
        }
        let pad = |byte: u8| block.map(|b| b ^ byte);
        let inner = Sha256::new().chain_update(pad(0x36)).chain_update(msg).finalize();
        Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
    }

    pub fn mac_hex(&self, msg: &[u8]) -> String {
        hex(&self.mac(msg))
    }

    /// Whether `hex_mac` is the MAC of `msg`, compared in constant time.
    pub fn verify(&self, msg: &[u8], hex_mac: &str) -> bool {
        let want = self.mac_hex(msg);
        want.len() == hex_mac.len() && want.bytes().zip(hex_mac.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// `text` signed with sequence number `seq`.
    pub fn sign(&self, text: &str, seq: u64) -> String {
        let signed = format!("{text} seq={seq}");
        let mac = self.mac_hex(signed.as_bytes());
        format!("{signed} mac={mac}")
    }

    /// The text and sequence number of a signed datagram, if its MAC holds.
    pub fn open<'a>(&self, datagram: &'a str) -> Option<(&'a str, u64)> {
        let (signed, mac) = datagram.rsplit_once(" mac=")?;
        if !self.verify(signed.as_bytes(), mac) {
            return None;
        }
        let (text, seq) = signed.rsplit_once(" seq=")?;
        Some((text, seq.parse().ok()?))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 16 random bytes from the kernel, as hex: a stream connection's nonce.
pub fn nonce() -> std::io::Result<String> {
    let mut buf = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut buf)?;
    Ok(hex(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // Test case 2: key "Jefe".
        let k = Key::new(b"Jefe".to_vec());
        assert_eq!(
            k.mac_hex(b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than a block.
        let k = Key::new(vec![0xaa; 131]);
        assert_eq!(
            k.mac_hex(b"Test Using Larger Than Block-Size Key - Hash Key First"),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn a_signed_advert_opens_only_under_its_key_and_unchanged() {
        let k = Key::new(b"0123456789abcdef".to_vec());
        let d = k.sign("natgw-ha/1 gateway=g from=a priority=1 active=1 term=3 handover=-", 42);
        assert_eq!(k.open(&d), Some(("natgw-ha/1 gateway=g from=a priority=1 active=1 term=3 handover=-", 42)));
        assert_eq!(Key::new(b"another key, 16b".to_vec()).open(&d), None, "another key");
        assert_eq!(k.open(&d.replace("term=3", "term=9")), None, "changed");
        assert_eq!(k.open(&d.replace("seq=42", "seq=43")), None, "a new seq on an old advert");
        assert_eq!(k.open("natgw-ha/1 gateway=g from=a priority=1 active=1 term=3 handover=-"), None, "unsigned");
    }

    #[test]
    fn a_short_key_file_is_refused_saying_how_to_make_one() {
        let path = std::env::temp_dir().join(format!("natgw-key-{}", std::process::id()));
        std::fs::write(&path, b"short").unwrap();
        let e = Key::load(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("holds 5 bytes") && e.contains("/dev/urandom"), "{e}");
        let _ = std::fs::remove_file(&path);
    }
}
