//! An advert as it travels on the heartbeat path: one UDP datagram of
//! text, readable in a capture:
//!
//! ```text
//! natgw-ha/1 gateway=gw1 from=gw1-0 priority=200 active=1 term=7 handover=-
//! ```
//!
//! The gateway's name comes first after the version, so that replicas of
//! several gateways can share a path and ignore each other. Anything
//! malformed is refused with the field at fault, never read as a default.

use crate::Advert;

const VERSION: &str = "natgw-ha/1";
/// A datagram longer than this is not an advert.
pub const MAX_LEN: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not a natgw-ha/1 advert")]
    Version,
    #[error("field {0}: missing or malformed")]
    Field(&'static str),
    #[error("longer than {MAX_LEN} bytes")]
    TooLong,
}

/// The datagram for `advert` of gateway `gateway`.
pub fn encode(gateway: &str, a: &Advert) -> String {
    format!(
        "{VERSION} gateway={gateway} from={} priority={} active={} term={} handover={}",
        a.from,
        a.priority,
        u8::from(a.active),
        a.term,
        a.handover_to.as_deref().unwrap_or("-"),
    )
}

/// The gateway and advert a datagram carries.
pub fn decode(datagram: &[u8]) -> Result<(String, Advert), WireError> {
    if datagram.len() > MAX_LEN {
        return Err(WireError::TooLong);
    }
    let text = std::str::from_utf8(datagram).map_err(|_| WireError::Version)?;
    let mut words = text.split_ascii_whitespace();
    if words.next() != Some(VERSION) {
        return Err(WireError::Version);
    }
    let mut field = |name: &'static str| -> Result<&str, WireError> {
        words
            .next()
            .and_then(|w| w.strip_prefix(name)?.strip_prefix('='))
            .filter(|v| !v.is_empty())
            .ok_or(WireError::Field(name))
    };
    let gateway = field("gateway")?.to_string();
    let from = field("from")?.to_string();
    let priority = field("priority")?.parse().map_err(|_| WireError::Field("priority"))?;
    let active = match field("active")? {
        "1" => true,
        "0" => false,
        _ => return Err(WireError::Field("active")),
    };
    let term = field("term")?.parse().map_err(|_| WireError::Field("term"))?;
    let handover_to = match field("handover")? {
        "-" => None,
        peer => Some(peer.to_string()),
    };
    Ok((gateway, Advert { from, priority, active, term, handover_to }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_advert_reads_back_as_written() {
        let a = Advert { from: "gw1-0".into(), priority: 200, active: true, term: 7, handover_to: None };
        let text = encode("gw1", &a);
        assert_eq!(text, "natgw-ha/1 gateway=gw1 from=gw1-0 priority=200 active=1 term=7 handover=-");
        assert_eq!(decode(text.as_bytes()), Ok(("gw1".to_string(), a.clone())));
        let handover = Advert { active: false, handover_to: Some("gw1-1".into()), ..a };
        assert_eq!(decode(encode("gw1", &handover).as_bytes()).map(|(_, a)| a), Ok(handover));
    }

    #[test]
    fn a_malformed_advert_names_its_field() {
        let good = "natgw-ha/1 gateway=g from=a priority=1 active=1 term=1 handover=-";
        assert!(decode(good.as_bytes()).is_ok());
        for (bad, why) in [
            ("natgw-ha/2 gateway=g from=a priority=1 active=1 term=1 handover=-", WireError::Version),
            ("natgw-ha/1 gateway=g from=a priority=300 active=1 term=1 handover=-", WireError::Field("priority")),
            ("natgw-ha/1 gateway=g from=a priority=1 active=yes term=1 handover=-", WireError::Field("active")),
            ("natgw-ha/1 gateway=g from=a priority=1 active=1 term=-1 handover=-", WireError::Field("term")),
            ("natgw-ha/1 gateway=g from= priority=1 active=1 term=1 handover=-", WireError::Field("from")),
            ("natgw-ha/1 gateway=g priority=1 active=1 term=1 handover=-", WireError::Field("from")),
            ("natgw-ha/1 gateway=g from=a priority=1 active=1 term=1", WireError::Field("handover")),
        ] {
            assert_eq!(decode(bad.as_bytes()), Err(why), "{bad}");
        }
        assert_eq!(decode(&[0xff, 0xfe]), Err(WireError::Version));
        assert_eq!(decode(&vec![b'a'; MAX_LEN + 1]), Err(WireError::TooLong));
    }
}
