//! Failovers of a gateway run as two `natgw run` replicas, as traffic sees
//! them (`natgw-bench --ha-failover N`). Each round builds `natgw lab up
//! --ha` afresh with `examples-ha`, opens `--ha-sessions` established TCP
//! sessions (SNAT, FloatingIp and DNAT in turn), waits until the standby
//! has them all, starts a UDP probe every 10 ms in each direction (inbound
//! to a FloatingIp, outbound through SNAT), breaks the active one way, and
//! reports the longest silence either probe saw, how long the standby
//! took to hold the addresses, and how many sessions still exchange a
//! line afterwards.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use natgw_lab::replica::Process;
use natgw_lab::traffic::{Conn, Server, in_ns, tcp_connect, tcp_server, udp_server};
use natgw_lab::{GW1_HA_IP, GW2_HA_IP, Lab};

const WEB_EIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const PORTS_EIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 12);
const INT1: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 11);
const INT2: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 12);
const EXT1: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// SIGTERM to the active: it hands over.
    Planned,
    /// The active's external link down.
    LinkLoss,
    /// kill -9 of the active and its links gone: its node lost.
    NodeLoss,
    /// kill -9 of the active's agent alone: its kernel serves on.
    AgentKill,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Planned => "planned switchover (SIGTERM)",
            Kind::LinkLoss => "the active's external link down",
            Kind::NodeLoss => "the active's node lost (kill -9, links gone)",
            Kind::AgentKill => "kill -9 of the active's agent (its kernel stays)",
        }
    }
}

struct Round {
    silence: Duration,
    takeover: Option<Duration>,
    kept: usize,
    sessions: usize,
}

/// The `natgw` binary beside this one (both come from one `cargo build`).
fn natgw_bin() -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("natgw");
    if !bin.exists() {
        bail!("{} is missing: build it first (cargo build --release --bin natgw)", bin.display());
    }
    Ok(bin)
}

fn examples() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples-ha")).to_path_buf()
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(start.elapsed())
}

/// A UDP probe from `ns` to `to`, one datagram every 10 ms; the instants
/// of the replies.
fn probe(ns: &str, to: SocketAddrV4, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<Vec<Instant>>> {
    let sock = in_ns(ns, || UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)))??;
    sock.connect(to)?;
    sock.set_read_timeout(Some(Duration::from_millis(2)))?;
    Ok(std::thread::spawn(move || {
        let mut replies = Vec::new();
        let mut next = Instant::now();
        let mut buf = [0u8; 128];
        while !stop.load(Ordering::Relaxed) {
            if Instant::now() >= next {
                let _ = sock.send(b"probe");
                next += Duration::from_millis(10);
            }
            if sock.recv(&mut buf).is_ok() {
                replies.push(Instant::now());
            }
        }
        replies
    }))
}

/// The longest silence around `from`: between replies from 100 ms before
/// it to the end, or from then to the end when no reply came after it.
fn silence(replies: &[Instant], from: Instant, end: Instant) -> Duration {
    let start = from - Duration::from_millis(100);
    let mut seen: Vec<Instant> = replies.iter().copied().filter(|t| *t >= start).collect();
    if seen.last().is_none_or(|t| *t < from) {
        return end - start;
    }
    seen.insert(0, start);
    seen.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
}

fn one_round(bin: &Path, kind: Kind, count: usize) -> Result<Round> {
    let lab = Lab::up("nbfo")?;
    lab.second_gateway()?;
    let dir = examples();
    let mut a = Process::spawn(bin, lab.ns("gw"), &dir, "a", (GW1_HA_IP, GW2_HA_IP), 200)?;
    let b = Process::spawn(bin, lab.ns("gw2"), &dir, "b", (GW2_HA_IP, GW1_HA_IP), 100)?;
    wait_for("a to take the addresses", Duration::from_secs(10), || a.active(WEB_EIP))?;
    wait_for("b to stand by", Duration::from_secs(10), || b.status()["role"] == "standby")?;
    let (ext1, int1, int2) = (lab.ns("ext1"), lab.ns("int1"), lab.ns("int2"));
    let _servers: Vec<Server> = vec![
        tcp_server(&int1, INT1, 22)?,
        tcp_server(&ext1, EXT1, 9000)?,
        tcp_server(&int2, INT2, 8080)?,
        udp_server(&int1, INT1, 7000)?,
        udp_server(&ext1, EXT1, 7001)?,
    ];
    let mut conns: Vec<Conn> = Vec::with_capacity(count);
    for i in 0..count {
        let c = match i % 3 {
            0 => tcp_connect(&int2, EXT1, 9000),
            1 => tcp_connect(&ext1, WEB_EIP, 22),
            _ => tcp_connect(&ext1, PORTS_EIP, 80),
        };
        conns.push(c.with_context(|| format!("session {i}"))?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let probes = [
        probe(&ext1, SocketAddrV4::new(WEB_EIP, 7000), stop.clone())?,
        probe(&int2, SocketAddrV4::new(EXT1, 7001), stop.clone())?,
    ];
    // Every session and both probe flows at the standby.
    let want = count as u64 + 2;
    wait_for("the sessions to reach the standby", Duration::from_secs(30), || {
        b.status()["sessionsHeld"].as_u64().is_some_and(|n| n >= want)
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let broke = Instant::now();
    match kind {
        Kind::Planned => {
            a.signal(libc::SIGTERM)?;
        }
        Kind::LinkLoss => lab_ip(&["-n", &a.ns, "link", "set", "ext0", "down"])?,
        Kind::NodeLoss => {
            a.kill();
            for dev in ["ext0", "lan0", "ha0"] {
                lab_ip(&["-n", &a.ns, "link", "del", dev])?;
            }
        }
        Kind::AgentKill => a.kill(),
    }
    let takeover = match kind {
        Kind::AgentKill => None,
        _ => Some(wait_for("b to take over", Duration::from_secs(10), || b.holds(WEB_EIP))?),
    };
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let end = Instant::now();
    let mut worst = Duration::ZERO;
    for p in probes {
        let replies = p.join().map_err(|_| anyhow::anyhow!("probe thread panicked"))?;
        worst = worst.max(silence(&replies, broke, end));
    }
    let kept = conns.iter_mut().map(|c| c.echo("x").is_ok()).filter(|ok| *ok).count();
    Ok(Round { silence: worst, takeover, kept, sessions: count })
}

fn lab_ip(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("ip").args(args).output()?;
    anyhow::ensure!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn median_worst(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() - 1])
}

pub fn run(rounds: u32, sessions: usize) -> Result<()> {
    let bin = natgw_bin()?;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("machine: {}", crate::machine());
    println!(
        "failovers of two `natgw run` replicas, {rounds} per kind, {sessions} established TCP sessions (SNAT, FloatingIp, DNAT), a UDP probe every 10 ms each way:"
    );
    println!(
        "| what breaks | longest silence, median / worst | standby holds the addresses after, median / worst | sessions kept (worst round) |"
    );
    println!("|---|---|---|---|");
    for kind in [Kind::Planned, Kind::LinkLoss, Kind::NodeLoss, Kind::AgentKill] {
        let mut results = Vec::new();
        for i in 0..rounds {
            results.push(one_round(&bin, kind, sessions).with_context(|| format!("{} round {i}", kind.name()))?);
        }
        let (s_med, s_worst) = median_worst(results.iter().map(|r| ms(r.silence)).collect());
        let takeovers: Vec<f64> = results.iter().filter_map(|r| r.takeover.map(ms)).collect();
        let takeover = if takeovers.is_empty() {
            "none (its kernel serves on)".to_string()
        } else {
            let (m, w) = median_worst(takeovers);
            format!("{m:.0} / {w:.0} ms")
        };
        let worst = results.iter().min_by_key(|r| r.kept).map_or((0, 0), |r| (r.kept, r.sessions));
        println!("| {} | {s_med:.0} / {s_worst:.0} ms | {takeover} | {} of {} |", kind.name(), worst.0, worst.1);
    }
    Ok(())
}

/// New SNAT'd TCP connections per second from int2 to ext1 for `seconds`,
/// from `clients` threads, each connection closed at once. Each run its
/// own `port`: a reused 4-tuple would meet the server's TIME_WAIT socket
/// and wait out a retransmission.
fn snat_rate(lab: &Lab, seconds: u64, clients: usize, port: u16) -> Result<u64> {
    let at = SocketAddrV4::new(EXT1, port);
    Ok(crate::connections((lab.ns("ext1"), at), (&lab.ns("int2"), at), seconds, clients, None)? / seconds)
}

/// Makes `rate` translated UDP entries a second for `seconds` in the
/// calling thread's conntrack, in batches every 10 ms; how long it took.
fn inject(rate: u32, seconds: u32) -> Result<Duration> {
    use natgw_dataplane::conntrack::Conntrack;
    use natgw_dataplane::conntrack::policy::{CtEntry, Tuple};
    let ct = Conntrack::open()?;
    let start = Instant::now();
    let per_batch = rate / 100;
    for batch in 0..seconds * 100 {
        let due = start + Duration::from_millis(u64::from(batch) * 10);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let entries: Vec<CtEntry> = (0..per_batch)
            .map(|i| {
                let n = batch * per_batch + i;
                let host = Ipv4Addr::new(10, 77, 1 + (n >> 16) as u8, (n >> 8) as u8);
                let port = 1024 + (n & 0xff) as u16 * 200;
                CtEntry {
                    proto: 17,
                    orig: Tuple { src: host, dst: EXT1, sport: port, dport: 53 },
                    reply: Tuple {
                        src: EXT1,
                        dst: Ipv4Addr::new(198, 51, 100, 10),
                        sport: 53,
                        dport: 1024 + (n % 60000) as u16,
                    },
                }
            })
            .collect();
        ct.insert(&entries, 600)?;
    }
    Ok(start.elapsed())
}

/// How many translated connections `ns`'s kernel holds.
fn translated(ns: &str) -> Result<u64> {
    use natgw_dataplane::conntrack::{Conntrack, replica::translation};
    let n = in_ns(ns, || Conntrack::open()?.dump_where(|e| translation(e) != (None, None)).map(|d| d.len()))??;
    Ok(n as u64)
}

/// What the connection stream costs (`natgw-bench --ha-replication S`):
/// the SNAT connection rate through the active alone (no peer to stream
/// to), then with the standby up and receiving every connection, and how
/// long after the last connection the standby held them all.
pub fn replication(seconds: u64) -> Result<()> {
    let bin = natgw_bin()?;
    let lab = Lab::up("nbrep")?;
    lab.second_gateway()?;
    let dir = examples();
    let a = Process::spawn(&bin, lab.ns("gw"), &dir, "a", (GW1_HA_IP, GW2_HA_IP), 200)?;
    wait_for("a to take the addresses", Duration::from_secs(10), || a.active(WEB_EIP))?;
    let clients = 4;
    let alone = snat_rate(&lab, seconds, clients, 7100)?;
    let b = Process::spawn(&bin, lab.ns("gw2"), &dir, "b", (GW2_HA_IP, GW1_HA_IP), 100)?;
    wait_for("b to stand by", Duration::from_secs(10), || b.status()["role"] == "standby")?;
    // The first dump holds what a's kernel holds (closed connections stay
    // in TIME_WAIT; a reused client port replaces its entry).
    let held = |p: &Process| p.status()["sessionsHeld"].as_u64().unwrap_or(0);
    let have = translated(&lab.ns("gw"))?;
    let before = wait_for("b's first dump", Duration::from_secs(30), || held(&b) >= have)
        .with_context(|| format!("a holds {have} connections, b says {}", b.status()))?;
    let held_before = held(&b);
    let streamed = snat_rate(&lab, seconds, clients, 7101)?;
    let have = translated(&lab.ns("gw"))?;
    let lag = wait_for("b to hold every connection", Duration::from_secs(60), || held(&b) >= have)
        .with_context(|| format!("a holds {have} connections, b says {}", b.status()))?;
    // 10,000 new connections a second for 5 s, made in a's conntrack
    // directly (the lab's hosts cannot open that many): how far behind
    // the standby is once the last one is made.
    let rate_entries = 10_000u32;
    let inject = in_ns(&lab.ns("gw"), move || inject(rate_entries, 5))??;
    let have = translated(&lab.ns("gw"))?;
    let injected_lag = wait_for("b to hold the injected connections", Duration::from_secs(60), || held(&b) >= have)
        .with_context(|| format!("a holds {have} connections, b says {}", b.status()))?;
    let lost = a.status()["sessionEventsLost"].as_u64().unwrap_or(0);
    println!("machine: {}", crate::machine());
    println!("connection stream cost: SNAT'd TCP connections, {clients} clients, {seconds} s each run:");
    println!("| figure | value |\n|---|---|");
    println!("| new connections per second, active alone | {alone} |");
    println!("| new connections per second, streamed to the standby | {streamed} |");
    println!("| streamed / alone | {:.2} |", streamed as f64 / alone.max(1) as f64);
    // The standby's status file is written every 50 ms: finer is unseen.
    let lag_text = |d: Duration| {
        if d < Duration::from_millis(50) { "under 50 ms".to_string() } else { format!("{} ms", d.as_millis()) }
    };
    println!("| standby holds every connection, after the last one | {} |", lag_text(lag));
    println!("| first dump of {held_before} connections, held after the standby stood by | {} |", lag_text(before));
    println!(
        "| {} connections made at {rate_entries}/s in the active's conntrack (took {} ms): the standby holds them all, after the last one | {} |",
        rate_entries * 5,
        inject.as_millis(),
        lag_text(injected_lag)
    );
    println!("| kernel events lost by the sender | {lost} |");
    Ok(())
}
