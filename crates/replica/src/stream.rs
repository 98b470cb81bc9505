//! The connection stream between replicas. Each replica sends its peers
//! the connections its kernel translated, as they are made and end (the
//! kernel's conntrack events), after a whole dump on every connect. Each
//! keeps what its peers sent: the entries a takeover installs, so that a
//! session keeps its translation (an SNAT source port the active chose at
//! random) on the replica that takes over.
//!
//! Sending is role-blind: a standby's kernel translates nothing, so it
//! sends nothing until it takes over. One TCP connection per peer; a line
//! per entry:
//!
//! ```text
//! + 6 10.77.0.12:40001>198.51.100.1:9000 198.51.100.1:9000>198.51.100.10:61034
//! - 6 10.77.0.12:40001>198.51.100.1:9000 198.51.100.1:9000>198.51.100.10:61034
//! =
//! .
//! ```
//!
//! The receiver speaks first, a nonce; the sender's first line is the
//! MAC of it under the gateway's HA key (`auth`), or the receiver hangs
//! up. `=` ends the dump: what the peer sent before it is replaced then, not
//! before (a peer that dies mid-dump leaves the last whole view). `.`
//! says the sender is there, when it has had nothing to say for 200 ms.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use natgw_dataplane::conntrack::events::{Events, Read, entry_event};
use natgw_dataplane::conntrack::policy::{CtEntry, Tuple};
use natgw_dataplane::conntrack::replica::translation;
use natgw_dataplane::conntrack::{Conntrack, ConntrackError};

use crate::auth;

/// An entry's identity: protocol and original tuple.
type Key = (u8, Ipv4Addr, u16, Ipv4Addr, u16);

fn key(e: &CtEntry) -> Key {
    (e.proto, e.orig.src, e.orig.sport, e.orig.dst, e.orig.dport)
}

fn tuple_text(t: &Tuple) -> String {
    format!("{}:{}>{}:{}", t.src, t.sport, t.dst, t.dport)
}

/// The line for an entry made (`+`) or ended (`-`).
pub fn line(made: bool, e: &CtEntry) -> String {
    format!("{} {} {} {}\n", if made { '+' } else { '-' }, e.proto, tuple_text(&e.orig), tuple_text(&e.reply))
}

fn parse_tuple(text: &str) -> Option<Tuple> {
    let (src, dst) = text.split_once('>')?;
    let (src, sport) = src.split_once(':')?;
    let (dst, dport) = dst.split_once(':')?;
    Some(Tuple {
        src: src.parse().ok()?,
        sport: sport.parse().ok()?,
        dst: dst.parse().ok()?,
        dport: dport.parse().ok()?,
    })
}

/// What a line says.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Made(CtEntry),
    Ended(CtEntry),
    DumpDone,
    /// Nothing happened; the sender is there.
    Alive,
}

/// Reads a line; `None` for anything malformed (the sender is natgw: a
/// malformed line is a bug or not natgw, and is skipped and counted).
pub fn parse(text: &str) -> Option<Line> {
    let text = text.trim_end();
    match text {
        "=" => return Some(Line::DumpDone),
        "." => return Some(Line::Alive),
        _ => {}
    }
    let mut words = text.split(' ');
    let sign = words.next()?;
    let proto = words.next()?.parse().ok()?;
    let orig = parse_tuple(words.next()?)?;
    let reply = parse_tuple(words.next()?)?;
    if words.next().is_some() {
        return None;
    }
    let e = CtEntry { proto, orig, reply };
    match sign {
        "+" => Some(Line::Made(e)),
        "-" => Some(Line::Ended(e)),
        _ => None,
    }
}

/// Whether an entry is a translation worth sending (the gateway's own
/// untranslated flows, such as the heartbeat, are not).
fn translated(e: &CtEntry) -> bool {
    translation(e) != (None, None)
}

/// What the peers sent, and counters for metrics.
#[derive(Default)]
pub struct Received {
    entries: Mutex<BTreeMap<Key, CtEntry>>,
    pub lines: AtomicU64,
    pub malformed: AtomicU64,
    /// Whole dumps received (one per connect of a peer).
    pub dumps: AtomicU64,
    /// Connections that did not prove the key.
    pub refused: AtomicU64,
}

/// What a sender signs to prove the key: the receiver's nonce.
fn challenge(nonce: &str) -> String {
    format!("natgw-stream/1 {nonce}")
}

impl Received {
    pub fn entries(&self) -> Vec<CtEntry> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).values().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads one peer's stream until it ends, once the peer has proved it
    /// holds the key.
    fn read_from(&self, mut stream: TcpStream, key: &auth::Key) {
        let Ok(nonce) = auth::nonce() else { return };
        if writeln!(stream, "natgw-stream/1 nonce={nonce}").is_err() {
            return;
        }
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let Ok(read_half) = stream.try_clone() else { return };
        let mut reader = BufReader::new(read_half);
        let mut answer = String::new();
        let proved = reader.read_line(&mut answer).is_ok()
            && answer.trim_end().strip_prefix("auth=").is_some_and(|mac| key.verify(challenge(&nonce).as_bytes(), mac));
        if !proved {
            self.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("refused a connection stream that did not prove the HA key");
            return;
        }
        let _ = stream.set_read_timeout(None);
        self.read_lines(reader);
    }

    fn read_lines(&self, reader: impl BufRead) {
        // Until the first dump is whole, changes go to `dump`.
        let mut dump: Option<BTreeMap<Key, CtEntry>> = Some(BTreeMap::new());
        for text in reader.lines() {
            let Ok(text) = text else { return };
            self.lines.fetch_add(1, Ordering::Relaxed);
            let mut held = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let into = dump.as_mut().unwrap_or(&mut held);
            match parse(&text) {
                Some(Line::Made(e)) => {
                    into.insert(key(&e), e);
                }
                Some(Line::Ended(e)) => {
                    into.remove(&key(&e));
                }
                Some(Line::DumpDone) => {
                    if let Some(whole) = dump.take() {
                        *held = whole;
                        self.dumps.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Line::Alive) => {}
                None => {
                    self.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Counters of the sending side.
#[derive(Default)]
pub struct Sent {
    pub lines: AtomicU64,
    /// Times the kernel's queue dropped events: each time the stream
    /// starts over with a whole dump.
    pub lost: AtomicU64,
    pub connects: AtomicU64,
}

/// Accepts peers' streams on `listen` (a thread in the namespace),
/// keeping what they send in `into`. Connections from other addresses
/// than `peers` are refused.
pub fn receive(
    listener: TcpListener,
    peers: Vec<Ipv4Addr>,
    key: auth::Key,
    into: Arc<Received>,
    stop: Arc<AtomicBool>,
) {
    let _ = listener.set_nonblocking(true);
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, SocketAddr::V4(from))) if peers.contains(from.ip()) => {
                let _ = stream.set_nonblocking(false);
                let (into, key) = (into.clone(), key.clone());
                std::thread::spawn(move || into.read_from(stream, &key));
            }
            Ok((_, from)) => tracing::warn!(%from, "refused a connection stream from an address that is not a peer"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection stream failed");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Sends this namespace's translated connections to `peer` for as long as
/// `stop` is unset: connects (again after any failure), dumps, then
/// follows the events. Runs on a thread in the namespace.
pub fn send(peer: SocketAddrV4, key: auth::Key, sent: Arc<Sent>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = send_once(peer, &key, &sent, &stop) {
            tracing::debug!(%peer, error = %e, "connection stream to the peer ended; reconnecting");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Conntrack(#[from] ConntrackError),
}

fn send_once(peer: SocketAddrV4, key: &auth::Key, sent: &Sent, stop: &AtomicBool) -> Result<(), SendError> {
    let mut stream = TcpStream::connect_timeout(&peer.into(), Duration::from_millis(500))?;
    let _ = stream.set_nodelay(true);
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut hello = String::new();
    BufReader::new(stream.try_clone()?).read_line(&mut hello)?;
    let Some(nonce) = hello.trim_end().strip_prefix("natgw-stream/1 nonce=") else {
        return Err(SendError::Io(std::io::Error::other(format!("not a natgw stream: {hello:?}"))));
    };
    writeln!(stream, "auth={}", key.mac_hex(challenge(nonce).as_bytes()))?;
    sent.connects.fetch_add(1, Ordering::Relaxed);
    // Subscribed before the dump: an entry made during it comes as an
    // event too (a repeat is harmless), none falls in between.
    let mut events = Events::subscribe(Duration::from_millis(200))?;
    let mut out = String::new();
    for d in Conntrack::open()?.dump_where(translated)? {
        out.push_str(&line(true, &d.entry));
    }
    out.push_str("=\n");
    stream.write_all(out.as_bytes())?;
    while !stop.load(Ordering::Relaxed) {
        out.clear();
        let read = events.read(|msg| {
            if let Some((made, e)) = entry_event(&msg)
                && translated(&e)
            {
                out.push_str(&line(made, &e));
            }
        })?;
        if let Read::Lost = read {
            // The peer's view misses what was dropped: start over with a
            // whole dump (what was read so far goes first).
            sent.lost.fetch_add(1, Ordering::Relaxed);
            stream.write_all(out.as_bytes())?;
            return Err(SendError::Io(std::io::Error::other("the kernel dropped conntrack events; dumping again")));
        }
        if !out.is_empty() {
            stream.write_all(out.as_bytes())?;
            sent.lines.fetch_add(out.lines().count() as u64, Ordering::Relaxed);
        } else if let Read::Idle = read {
            // Nothing to say: a write finds out whether the peer went
            // away (a restarted peer answers with a reset, and gets a
            // dump on the next connect).
            stream.write_all(b".\n")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
        Tuple { src: src.parse().unwrap(), dst: dst.parse().unwrap(), sport, dport }
    }

    #[test]
    fn a_line_reads_back_as_the_entry_it_was() {
        let e = CtEntry {
            proto: 6,
            orig: t("10.77.0.12", 40001, "198.51.100.1", 9000),
            reply: t("198.51.100.1", 9000, "198.51.100.10", 61034),
        };
        assert_eq!(parse(&line(true, &e)), Some(Line::Made(e)));
        assert_eq!(parse(&line(false, &e)), Some(Line::Ended(e)));
        assert_eq!(parse("=\n"), Some(Line::DumpDone));
        for bad in [
            "",
            "+",
            "* 6 1.2.3.4:1>5.6.7.8:2 5.6.7.8:2>1.2.3.4:1",
            "+ 6 1.2.3.4:1>5.6.7.8:2",
            "+ 6 1.2.3.4>5.6.7.8:2 x",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_peer_that_dies_mid_dump_leaves_the_last_whole_view() {
        let r = Received::default();
        let e = |port| CtEntry {
            proto: 17,
            orig: t("10.77.0.11", port, "198.51.100.1", 53),
            reply: t("198.51.100.1", 53, "198.51.100.10", port),
        };
        // Fed as a connection would feed it, line by line.
        let apply = |r: &Received, text: &str| r.read_lines(std::io::Cursor::new(text.to_string()));
        apply(&r, &(line(true, &e(1)) + &line(true, &e(2)) + "=\n" + &line(false, &e(1))));
        assert_eq!(r.entries(), [e(2)]);
        // A second connect whose dump never ends: the view stays.
        apply(&r, &line(true, &e(3)));
        assert_eq!(r.entries(), [e(2)]);
        apply(&r, &(line(true, &e(3)) + "=\n"));
        assert_eq!(r.entries(), [e(3)]);
        assert_eq!(r.dumps.load(Ordering::Relaxed), 2);
    }

    use proptest::prelude::*;

    /// What the peer does: its connections made and ended, and the
    /// stream's life: cut (what happens until the next connect is never
    /// sent, as when the kernel's queue overflows or the path is down),
    /// made again (a whole dump first), or a connect cut mid-dump.
    #[derive(Clone, Debug)]
    enum Step {
        Made(u16),
        Ended(u16),
        Cut,
        Reconnect,
        CutMidDump(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u16..40).prop_map(Step::Made),
            3 => (0u16..40).prop_map(Step::Ended),
            1 => Just(Step::Cut),
            1 => Just(Step::Reconnect),
            1 => (0usize..40).prop_map(Step::CutMidDump),
        ]
    }

    proptest! {
        /// Whatever the peer does, and however its stream is cut and made
        /// again, the receiver holds exactly the peer's connections once a
        /// dump is whole and the events after it are in; a dump cut short
        /// changes nothing. (Merging a dump instead of replacing the view
        /// with it, or taking a dump's lines before it is whole, fails.)
        #[test]
        fn the_receiver_holds_what_the_peer_holds(steps in proptest::collection::vec(step(), 1..80)) {
            let e = |port: u16| CtEntry {
                proto: 17,
                orig: t("10.77.0.11", 1000 + port, "198.51.100.1", 53),
                reply: t("198.51.100.1", 53, "198.51.100.10", 30000 + port),
            };
            let dump = |peer: &std::collections::BTreeSet<u16>| {
                peer.iter().map(|p| line(true, &e(*p))).collect::<String>() + "=\n"
            };
            let deliver = |r: &Received, text: String| r.read_lines(std::io::Cursor::new(text));
            let r = Received::default();
            let mut peer: std::collections::BTreeSet<u16> = Default::default();
            // What the connection in progress has sent, if one is up.
            let mut current: Option<String> = Some(dump(&peer));
            for s in steps {
                match s {
                    Step::Made(p) => {
                        peer.insert(p);
                        if let Some(c) = current.as_mut() {
                            c.push_str(&line(true, &e(p)));
                        }
                    }
                    Step::Ended(p) => {
                        if peer.remove(&p)
                            && let Some(c) = current.as_mut()
                        {
                            c.push_str(&line(false, &e(p)));
                        }
                    }
                    Step::Cut => {
                        if let Some(c) = current.take() {
                            deliver(&r, c);
                        }
                    }
                    Step::Reconnect => {
                        if let Some(c) = current.take() {
                            deliver(&r, c);
                        }
                        current = Some(dump(&peer));
                    }
                    Step::CutMidDump(n) => {
                        if let Some(c) = current.take() {
                            deliver(&r, c);
                        }
                        let before = r.entries();
                        let partial: String =
                            dump(&peer).lines().take(n.min(peer.len())).map(|l| format!("{l}\n")).collect();
                        deliver(&r, partial);
                        prop_assert_eq!(r.entries(), before, "a dump cut short changed the view");
                    }
                }
            }
            if let Some(c) = current.take() {
                deliver(&r, c);
            }
            deliver(&r, dump(&peer));
            let want: Vec<CtEntry> = peer.iter().map(|p| e(*p)).collect();
            prop_assert_eq!(r.entries(), want);
        }
    }
}
