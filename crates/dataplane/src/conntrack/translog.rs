//! Translation logs: one JSON line per translation created and ended, from
//! conntrack events of the gateway's namespace. Rate-limited; every line
//! not written (over the rate, lost by the kernel's event queue, or failed
//! to write) is counted, and translation never waits for the log.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use netlink_packet_core::{DefaultNla, Nla};
use netlink_packet_netfilter::conntrack::{ConntrackAttribute, ConntrackMessage};
use serde::{Deserialize, Serialize};

use crate::conntrack::decode_tuple;
use crate::conntrack::events::{Events, Read};
use crate::conntrack::policy::Tuple;

const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_ID: u16 = 12;
const CTA_COUNTERS_BYTES: u16 = 2;

/// One log line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Line {
    /// RFC 3339 UTC.
    pub time: String,
    /// "new" or "end".
    pub event: String,
    /// Conntrack id: pairs a translation's new and end lines.
    pub id: u32,
    pub proto: String,
    pub internal: String,
    pub eip: String,
    pub remote: String,
    /// "snat" (leaving through the EIP) or "dnat" (arriving at it).
    pub direction: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bytes_out: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bytes_in: Option<u64>,
}

fn endpoint(ip: Ipv4Addr, port: u16) -> String {
    format!("{ip}:{port}")
}

/// The line for a conntrack event, or `None` when nothing was translated.
pub fn line(
    time: SystemTime,
    new: bool,
    id: u32,
    proto: u8,
    orig: Tuple,
    reply: Tuple,
    bytes: [Option<u64>; 2],
) -> Option<Line> {
    let (direction, internal, eip, remote) = if orig.src != reply.dst {
        ("snat", endpoint(orig.src, orig.sport), endpoint(reply.dst, reply.dport), endpoint(orig.dst, orig.dport))
    } else if orig.dst != reply.src {
        ("dnat", endpoint(reply.src, reply.sport), endpoint(orig.dst, orig.dport), endpoint(orig.src, orig.sport))
    } else {
        return None;
    };
    Some(Line {
        time: rfc3339(time),
        event: if new { "new" } else { "end" }.into(),
        id,
        proto: crate::conntrack::ports::proto_name(proto),
        internal,
        eip,
        remote,
        direction: direction.into(),
        bytes_out: bytes[0],
        bytes_in: bytes[1],
    })
}

/// UTC, microseconds, without a date library: days to civil date.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// What a log counts, for metrics.
#[derive(Debug, Default)]
pub struct Counts {
    pub written: AtomicU64,
    /// Over the rate limit.
    pub dropped_rate: AtomicU64,
    /// Lost in the kernel's event queue (ENOBUFS: events came faster than
    /// read).
    pub dropped_kernel: AtomicU64,
    /// The destination refused them (full disk, unwritable file).
    pub dropped_write: AtomicU64,
    /// Set to stop the log's thread (it looks every half second).
    pub stop: std::sync::atomic::AtomicBool,
}

/// A running translation log; dropping it stops the log's thread.
pub struct Running {
    pub counts: Arc<Counts>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.counts.stop.store(true, Ordering::Relaxed);
    }
}

/// Where lines go: stdout, or a file rotated at `max_bytes` keeping
/// `keep` old files (FILE.1 newest).
pub enum Sink {
    Stdout,
    File { path: PathBuf, max_bytes: u64, keep: usize, file: Option<std::fs::File>, size: u64 },
}

impl Sink {
    pub fn file(path: PathBuf, max_bytes: u64, keep: usize) -> Sink {
        Sink::File { path, max_bytes, keep, file: None, size: 0 }
    }

    fn write(&mut self, text: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout => std::io::stdout().lock().write_all(text),
            Sink::File { path, max_bytes, keep, file, size } => {
                if *size + text.len() as u64 > *max_bytes && file.is_some() {
                    *file = None;
                    for n in (1..*keep).rev() {
                        let _ = std::fs::rename(rotated(path, n), rotated(path, n + 1));
                    }
                    if *keep > 0 {
                        std::fs::rename(&*path, rotated(path, 1))?;
                    } else {
                        std::fs::remove_file(&*path)?;
                    }
                }
                if file.is_none() {
                    let f = std::fs::OpenOptions::new().create(true).append(true).open(&*path)?;
                    *size = f.metadata()?.len();
                    *file = Some(f);
                }
                let f = file.as_mut().ok_or_else(|| std::io::Error::other("log file not open"))?;
                f.write_all(text)?;
                *size += text.len() as u64;
                Ok(())
            }
        }
    }
}

fn rotated(path: &std::path::Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// How many lines a second the log writes: in all, and for any one EIP
/// (so that one tenant's burst cannot spend the whole budget of its
/// gateway's other tenants).
#[derive(Clone, Copy, Debug)]
pub struct Rates {
    pub total: u32,
    pub per_eip: u32,
}

/// A bucket per EIP, then the gateway's.
pub struct Limits {
    total: Limiter,
    per_eip: std::collections::HashMap<Ipv4Addr, Limiter>,
    eip_rate: u32,
}

impl Limits {
    pub fn new(rates: Rates) -> Limits {
        Limits { total: Limiter::new(rates.total), per_eip: Default::default(), eip_rate: rates.per_eip }
    }

    /// Whether a line about `eip` may be written now; a line refused by its
    /// EIP's bucket takes nothing from the gateway's.
    pub fn allow(&mut self, eip: Ipv4Addr, now: Instant) -> bool {
        if self.per_eip.len() >= 4096 && !self.per_eip.contains_key(&eip) {
            // Full buckets are idle ones: forgetting them changes nothing.
            self.per_eip.retain(|_, l| l.refill(now) < l.rate);
        }
        let rate = self.eip_rate;
        self.per_eip.entry(eip).or_insert_with(|| Limiter::new(rate)).allow(now) && self.total.allow(now)
    }
}

/// A token bucket: `rate` lines per second, bursts of one second's worth.
pub struct Limiter {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Limiter {
    pub fn new(rate: u32) -> Limiter {
        Limiter { rate: f64::from(rate), tokens: f64::from(rate), last: Instant::now() }
    }

    /// The tokens as of `now`.
    fn refill(&mut self, now: Instant) -> f64 {
        self.tokens = (self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
        self.tokens
    }

    pub fn allow(&mut self, now: Instant) -> bool {
        if self.refill(now) >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn value(nla: &DefaultNla) -> Vec<u8> {
    let mut v = vec![0; nla.value_len()];
    nla.emit_value(&mut v);
    v
}

fn counters(nla: &DefaultNla) -> Option<u64> {
    // Nested CTA_COUNTERS_*: CTA_COUNTERS_BYTES is a big-endian u64.
    let v = value(nla);
    let mut at = 0;
    while at + 4 <= v.len() {
        let len = u16::from_ne_bytes([v[at], v[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([v[at + 2], v[at + 3]]) & 0x3fff;
        if len < 4 {
            return None;
        }
        if kind == CTA_COUNTERS_BYTES && len >= 12 {
            return v.get(at + 4..at + 12).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes);
        }
        at += len.next_multiple_of(4);
    }
    None
}

fn event_line(msg: ConntrackMessage, now: SystemTime) -> Option<Line> {
    let (new, attrs) = match msg {
        ConntrackMessage::New(a) => (true, a),
        ConntrackMessage::Delete(a) => (false, a),
        _ => return None,
    };
    let (mut orig, mut reply, mut id, mut bytes) = (None, None, 0, [None, None]);
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = decode_tuple(&t),
            ConntrackAttribute::CtaTupleReply(t) => reply = decode_tuple(&t),
            ConntrackAttribute::Other(n) if n.kind() == CTA_ID => {
                id = value(&n).get(..4).and_then(|b| <[u8; 4]>::try_from(b).ok()).map_or(0, u32::from_be_bytes)
            }
            ConntrackAttribute::Other(n) if n.kind() & 0x3fff == CTA_COUNTERS_ORIG => bytes[0] = counters(&n),
            ConntrackAttribute::Other(n) if n.kind() & 0x3fff == CTA_COUNTERS_REPLY => bytes[1] = counters(&n),
            _ => {}
        }
    }
    let ((proto, o), (_, r)) = (orig?, reply?);
    line(now, new, id, proto, o, r, bytes)
}

/// Reads the namespace's conntrack events and writes translation lines
/// until the socket fails. Runs on a thread inside the namespace.
pub fn run(mut sink: Sink, rates: Rates, counts: Arc<Counts>) -> std::io::Result<()> {
    // Wakes up twice a second to see whether to stop.
    let mut events = Events::subscribe(std::time::Duration::from_millis(500))?;
    let mut limits = Limits::new(rates);
    while !counts.stop.load(Ordering::Relaxed) {
        let (mut out, mut lines) = (Vec::new(), 0u64);
        // Stamped when the kernel's message is read, not when the wait
        // for it began (up to half a second earlier).
        let mut stamp: Option<(SystemTime, Instant)> = None;
        let read = events.read(|ct| {
            let (now, instant) = *stamp.get_or_insert_with(|| (SystemTime::now(), Instant::now()));
            let Some(l) = event_line(ct, now) else { return };
            let eip = l.eip.split(':').next().and_then(|a| a.parse().ok()).unwrap_or(Ipv4Addr::UNSPECIFIED);
            if limits.allow(eip, instant) {
                if let Ok(text) = serde_json::to_string(&l) {
                    out.extend(text.as_bytes());
                    out.push(b'\n');
                    lines += 1;
                }
            } else {
                counts.dropped_rate.fetch_add(1, Ordering::Relaxed);
            }
        })?;
        if let Read::Lost = read {
            counts.dropped_kernel.fetch_add(1, Ordering::Relaxed);
        }
        if !out.is_empty() {
            let outcome = if sink.write(&out).is_ok() { &counts.written } else { &counts.dropped_write };
            outcome.fetch_add(lines, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// The translations of `eip` (address, or address:port) in force at `at`
/// (RFC 3339, compared as text: the log writes one format), from log text:
/// every "new" line whose translation had not ended by then.
pub fn held_at(text: &str, eip: &str, at: &str) -> Vec<Line> {
    // The log always writes microseconds: `...:00Z` means `...:00.000000Z`.
    let at =
        if at.ends_with('Z') && !at.contains('.') { format!("{}.000000Z", &at[..at.len() - 1]) } else { at.into() };
    let at = at.as_str();
    let matches = |l: &Line| l.eip == eip || l.eip.split(':').next() == Some(eip);
    let mut open: std::collections::BTreeMap<u32, Line> = Default::default();
    let mut out = Vec::new();
    for l in text.lines().filter_map(|t| serde_json::from_str::<Line>(t).ok()).filter(matches) {
        if l.time.as_str() > at {
            break;
        }
        if l.event == "new" {
            open.insert(l.id, l);
        } else {
            open.remove(&l.id);
        }
    }
    out.extend(open.into_values());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
        Tuple { src: src.parse().unwrap(), dst: dst.parse().unwrap(), sport, dport }
    }

    #[test]
    fn dates_are_rfc3339_utc() {
        let t = UNIX_EPOCH + std::time::Duration::from_micros(1_795_872_896_123_456);
        assert_eq!(rfc3339(t), "2026-11-28T13:34:56.123456Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn snat_and_dnat_lines_name_internal_eip_and_remote() {
        let now = UNIX_EPOCH;
        let s = line(
            now,
            true,
            7,
            6,
            t("10.0.0.5", 4000, "203.0.113.1", 443),
            t("203.0.113.1", 443, "198.51.100.10", 1024),
            [None, None],
        )
        .unwrap();
        assert_eq!(
            (s.direction.as_str(), s.internal.as_str(), s.eip.as_str(), s.remote.as_str()),
            ("snat", "10.0.0.5:4000", "198.51.100.10:1024", "203.0.113.1:443")
        );
        let d = line(
            now,
            false,
            8,
            17,
            t("203.0.113.9", 5000, "198.51.100.11", 53),
            t("10.0.0.7", 5353, "203.0.113.9", 5000),
            [Some(10), Some(20)],
        )
        .unwrap();
        assert_eq!(
            (d.direction.as_str(), d.internal.as_str(), d.eip.as_str()),
            ("dnat", "10.0.0.7:5353", "198.51.100.11:53")
        );
        assert_eq!((d.bytes_out, d.bytes_in), (Some(10), Some(20)));
        assert!(
            line(now, true, 9, 6, t("10.0.0.5", 1, "10.0.0.6", 2), t("10.0.0.6", 2, "10.0.0.5", 1), [None, None])
                .is_none()
        );
    }

    #[test]
    fn who_held_an_eip_port_at_a_time() {
        let mk = |time: &str, event: &str, id: u32, eip: &str| {
            serde_json::to_string(&Line {
                time: time.into(),
                event: event.into(),
                id,
                proto: "tcp".into(),
                internal: format!("10.0.0.{id}:4000"),
                eip: eip.into(),
                remote: "203.0.113.1:443".into(),
                direction: "snat".into(),
                bytes_out: None,
                bytes_in: None,
            })
            .unwrap()
        };
        let log = [
            mk("2026-11-28T10:00:00.000000Z", "new", 1, "198.51.100.10:1024"),
            mk("2026-11-28T10:00:01.000000Z", "new", 2, "198.51.100.10:1025"),
            mk("2026-11-28T10:00:02.000000Z", "end", 1, "198.51.100.10:1024"),
            mk("2026-11-28T10:00:03.000000Z", "new", 3, "198.51.100.10:1024"),
        ]
        .join("\n");
        let who = |eip: &str, at: &str| held_at(&log, eip, at).iter().map(|l| l.internal.clone()).collect::<Vec<_>>();
        assert_eq!(who("198.51.100.10:1024", "2026-11-28T10:00:01.500000Z"), ["10.0.0.1:4000"]);
        assert_eq!(who("198.51.100.10:1024", "2026-11-28T10:00:04.000000Z"), ["10.0.0.3:4000"]);
        assert_eq!(who("198.51.100.10", "2026-11-28T10:00:01.500000Z").len(), 2);
        assert!(who("198.51.100.10:1024", "2026-11-28T09:00:00.000000Z").is_empty());
    }

    #[test]
    fn the_limiter_allows_the_rate_and_counts_the_rest_out() {
        let mut l = Limiter::new(10);
        let start = Instant::now();
        assert_eq!((0..25).filter(|_| l.allow(start)).count(), 10);
        assert!(l.allow(start + std::time::Duration::from_millis(150)));
    }

    #[test]
    fn one_eips_burst_does_not_spend_the_other_eips_budget() {
        let mut l = Limits::new(Rates { total: 100, per_eip: 30 });
        let (a, b) = (Ipv4Addr::new(198, 51, 100, 10), Ipv4Addr::new(198, 51, 100, 11));
        let now = Instant::now();
        // a floods: it gets its own 30, the gateway's budget keeps 70.
        assert_eq!((0..1000).filter(|_| l.allow(a, now)).count(), 30);
        assert_eq!((0..50).filter(|_| l.allow(b, now)).count(), 30);
        // Many EIPs at once still stop at the gateway's total.
        let many = (0..200u32).filter(|i| l.allow(Ipv4Addr::from(0x0A00_0000 + i), now)).count();
        assert_eq!(many, 40);
    }

    #[test]
    fn an_unwritable_file_is_an_error_the_caller_counts() {
        let mut s = Sink::file(PathBuf::from("/proc/natgw-no-such-dir/log"), 1 << 20, 2);
        assert!(s.write(b"x\n").is_err());
    }

    #[test]
    fn files_rotate_at_their_size() {
        let dir = std::env::temp_dir().join(format!("natgw-translog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        let mut s = Sink::file(path.clone(), 10, 2);
        for _ in 0..4 {
            s.write(b"12345678\n").unwrap();
        }
        assert!(path.exists() && rotated(&path, 1).exists() && rotated(&path, 2).exists());
        assert!(!rotated(&path, 3).exists(), "only two old files are kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
