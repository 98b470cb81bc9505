//! Two `natgw run` processes as the replicas of one gateway
//! (`examples-ha` on `natgw lab up --ha`), with live sessions of every
//! kind through them: a FloatingIp TCP session, an SNAT'd TCP session and
//! UDP flow (random source ports chosen by the active), and a DNAT'd
//! inbound TCP session. Each test breaks the pair one way and checks that
//! every session goes on, and that one replica holds the addresses.

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use natgw_dataplane::route::probe::{Holder, Prober};

use common::{EXT1, INT1, INT2, PORTS_EIP, WEB_EIP};
use natgw_lab::replica::Process;
use natgw_lab::traffic::{Conn, Server, UdpFlow, tcp_connect, tcp_server, udp_server};
use natgw_lab::{GW1_HA_IP, GW2_HA_IP, Lab};

/// Live sessions of every kind, and their servers.
struct Sessions {
    _servers: Vec<Server>,
    fip: Conn,
    snat: Conn,
    dnat: Conn,
    udp: UdpFlow,
    udp_seen: String,
}

impl Sessions {
    fn open(lab: &Lab) -> Sessions {
        let (ext1, int1, int2) = (lab.ns("ext1"), lab.ns("int1"), lab.ns("int2"));
        let servers = vec![
            tcp_server(&int1, INT1, 22).unwrap(),
            tcp_server(&ext1, EXT1, 9000).unwrap(),
            tcp_server(&int2, INT2, 8080).unwrap(),
            udp_server(&ext1, EXT1, 9001).unwrap(),
        ];
        let mut fip = tcp_connect(&ext1, WEB_EIP, 22).unwrap();
        let mut snat = tcp_connect(&int2, EXT1, 9000).unwrap();
        let mut dnat = tcp_connect(&ext1, PORTS_EIP, 80).unwrap();
        let udp = UdpFlow::open(&int2, EXT1, 9001).unwrap();
        let udp_seen = udp.seen_as().unwrap();
        for c in [&mut fip, &mut snat, &mut dnat] {
            c.echo("opened").unwrap();
        }
        assert!(snat.seen_as.starts_with("198.51.100.10:"), "SNAT through the egress EIP: {}", snat.seen_as);
        assert!(udp_seen.starts_with("198.51.100.10:"), "{udp_seen}");
        Sessions { _servers: servers, fip, snat, dnat, udp, udp_seen }
    }

    /// Every session still carries data both ways, with its translation.
    fn check(&mut self, when: &str) {
        for (what, c) in [("FloatingIp", &mut self.fip), ("SNAT", &mut self.snat), ("DNAT", &mut self.dnat)] {
            c.echo(&format!("still here {when}")).unwrap_or_else(|e| panic!("the {what} session {when}: {e}"));
        }
        let seen = self.udp.seen_as().unwrap_or_else(|e| panic!("the UDP flow {when}: {e}"));
        assert_eq!(seen, self.udp_seen, "the UDP flow keeps its translated port {when}");
    }
}

/// Every ARP claim (an answer or an announcement) on the gateway's
/// addresses, heard from the external host and a LAN host for the whole
/// test, with the replica it came from.
struct Watch {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<(Instant, Holder)>>>,
}

impl Watch {
    fn start(lab: &Lab) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let lan: Ipv4Addr = natgw_lab::GW_LAN_IP.parse().unwrap();
        let sides = [(lab.ns("ext1"), vec![common::EGRESS_EIP, WEB_EIP, PORTS_EIP]), (lab.ns("int1"), vec![lan])];
        let threads = sides
            .into_iter()
            .map(|(ns, ips)| {
                let stop = stop.clone();
                let prober = natgw_lab::traffic::in_ns(&ns, || Prober::on("eth0")).unwrap().unwrap();
                std::thread::spawn(move || {
                    let mut heard = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let claims = prober.listen(&ips, Duration::from_millis(50)).unwrap();
                        heard.extend(claims.into_iter().map(|h| (Instant::now(), h)));
                    }
                    heard
                })
            })
            .collect();
        Watch { stop, threads }
    }

    /// The claims heard, in time order.
    fn stop(self) -> Vec<(Instant, Holder)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<(Instant, Holder)> = self.threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        all.sort_by_key(|(t, _)| *t);
        all
    }
}

/// A replica's hardware addresses on both segments.
fn macs(ns: &str) -> Vec<[u8; 6]> {
    ["ext0", "lan0"]
        .iter()
        .map(|dev| {
            let text = common::sh(ns, &format!("cat /sys/class/net/{dev}/address"));
            let mut mac = [0u8; 6];
            for (i, part) in text.trim().split(':').enumerate() {
                mac[i] = u8::from_str_radix(part, 16).unwrap();
            }
            mac
        })
        .collect()
}

/// Polls `cond` every 10 ms for up to 10 s.
fn wait_for(what: &str, pair: &Pair, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !cond() {
        if Instant::now() > until {
            panic!("timed out waiting for {what}\n--- a ---\n{}\n--- b ---\n{}", pair.a.log(), pair.b.log());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The lab and its two replicas: `a` in gw (priority 200, active first),
/// `b` in gw2.
struct Pair {
    a: Process,
    b: Process,
    lab: Lab,
}

impl Pair {
    fn up(test: &str) -> Pair {
        Pair::up_in(test, common::ha_examples_dir())
    }

    /// The pair on the manifests in `dir`.
    fn up_in(test: &str, dir: &Path) -> Pair {
        let lab = common::lab(test);
        lab.second_gateway().unwrap();
        let bin = Path::new(env!("CARGO_BIN_EXE_natgw"));
        let a = Process::spawn(bin, lab.ns("gw"), dir, "a", (GW1_HA_IP, GW2_HA_IP), 200).unwrap();
        let b = Process::spawn(bin, lab.ns("gw2"), dir, "b", (GW2_HA_IP, GW1_HA_IP), 100).unwrap();
        let pair = Pair { a, b, lab };
        pair.active(&pair.a, "a to take the addresses");
        wait_for("b to stand by with the plan", &pair, || pair.b.status()["role"] == "standby");
        pair
    }

    /// Waits until `who`'s peer has received every translated session.
    fn replicated(&self, to: &Process, at_least: u64) {
        wait_for("the sessions to reach the standby", self, || {
            to.status()["sessionsHeld"].as_u64().is_some_and(|n| n >= at_least)
        });
    }

    /// Waits until `p` holds the addresses and says it is active.
    fn active(&self, p: &Process, what: &str) {
        wait_for(what, self, || p.active(WEB_EIP));
    }

    /// Checks `invariant` until `p`'s probes have found the addresses held
    /// `times` more times: it suspected its peer and was fenced off.
    fn fenced_while(&self, p: &Process, times: u64, mut invariant: impl FnMut()) {
        let fenced = |p: &Process| p.status()["fenced"].as_u64().unwrap_or(0);
        let start = fenced(p);
        wait_for("the standby's probes to be answered", self, || {
            invariant();
            fenced(p) >= start + times
        });
    }

    /// Exactly one of the two holds the addresses: `a` if `a_holds`.
    fn one_holder(&self, a_holds: bool, when: &str) {
        assert_eq!(
            (self.a.holds(WEB_EIP), self.b.holds(WEB_EIP)),
            (a_holds, !a_holds),
            "who holds the addresses {when}"
        );
    }
}

#[test]
fn a_planned_switchover_keeps_every_session() {
    let mut pair = Pair::up("hapl");
    let mut s = Sessions::open(&pair.lab);
    pair.replicated(&pair.b, 4);
    stop(&mut pair.a);
    pair.active(&pair.b, "b to take over");
    pair.one_holder(false, "after the handover");
    assert!(pair.b.status()["reason"].as_str().unwrap_or("").contains("handed over by a"), "{}", pair.b.status());
    s.check("after a planned switchover");
    // What an operator's dashboard sees: b active, taken by a handover,
    // with the connections it installed.
    wait_for("b's metrics to say it is active", &pair, || {
        let m = pair.b.metrics_text();
        m.contains(r#"natgw_gateway_active{gateway="demo-gw",replica="b"} 1"#)
            && m.contains(r#"natgw_gateway_takeovers_total{gateway="demo-gw",replica="b",reason="handover"} 1"#)
    });
    let m = pair.b.metrics_text();
    let installed = m
        .lines()
        .find(|l| l.starts_with("natgw_replica_sessions_installed{"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert!(installed.is_some_and(|n| n >= 4), "{m}");
    // a comes back as the standby and gets b's sessions; b stops: back to a.
    pair.a.start().unwrap();
    wait_for("a to stand by", &pair, || pair.a.status()["role"] == "standby");
    pair.replicated(&pair.a, 4);
    stop(&mut pair.b);
    pair.active(&pair.a, "a to take over again");
    pair.one_holder(true, "after the second handover");
    s.check("after a second switchover");
}

#[test]
fn kill_9_of_the_active_agent_leaves_its_kernel_serving_and_it_resumes() {
    let mut pair = Pair::up("hak9");
    let mut s = Sessions::open(&pair.lab);
    pair.replicated(&pair.b, 4);
    pair.a.kill();
    // Its kernel still holds and forwards: b suspects a, probes, hears a's
    // kernel answer, and waits. Three times over.
    s.check("with the active's agent dead");
    pair.fenced_while(&pair.b, 3, || pair.one_holder(true, "while the active's agent is dead"));
    pair.a.start().unwrap();
    wait_for("a to resume as the active", &pair, || pair.a.status()["role"] == "active");
    pair.one_holder(true, "after the restart");
    s.check("after the active's agent restarted");
}

#[test]
fn the_actives_external_link_down_hands_every_session_to_the_standby() {
    let pair = Pair::up("halink");
    let watch = Watch::start(&pair.lab);
    let mut s = Sessions::open(&pair.lab);
    pair.replicated(&pair.b, 4);
    common::sh(&pair.a.ns, "ip link set ext0 down");
    pair.active(&pair.b, "b to take over");
    wait_for("a to let go", &pair, || !pair.a.holds(WEB_EIP));
    s.check("after the active's external link went down");
    assert!(pair.b.status()["reason"].as_str().unwrap_or("").contains("a let go"), "{}", pair.b.status());
    // The link back: a stays the standby (no preemption), b keeps serving.
    assert_eq!(pair.a.status()["linksUp"], false);
    common::sh(&pair.a.ns, "ip link set ext0 up");
    wait_for("a to see its link back", &pair, || pair.a.status()["linksUp"] == true);
    pair.one_holder(false, "once the link is back");
    s.check("once the link is back");
    // One holder at a time as neighbours saw it: once b claims, a never
    // claims again.
    let claims = watch.stop();
    let b = macs(&pair.b.ns);
    let first_b = claims.iter().position(|(_, h)| b.contains(&h.mac)).expect("b announced what it took");
    let a_after: Vec<_> = claims[first_b..].iter().filter(|(_, h)| !b.contains(&h.mac)).collect();
    assert!(a_after.is_empty(), "a claimed after b took over: {a_after:?}");
}

#[test]
fn the_active_node_lost_whole_hands_every_session_to_the_standby() {
    let mut pair = Pair::up("hanode");
    let mut s = Sessions::open(&pair.lab);
    pair.replicated(&pair.b, 4);
    // A node lost: its agent and its links gone at once.
    pair.a.kill();
    common::sh(&pair.a.ns, "ip link del ext0; ip link del lan0; ip link del ha0");
    pair.active(&pair.b, "b to take over");
    let status = pair.b.status();
    assert!(status["reason"].as_str().unwrap_or("").contains("silent"), "{status}");
    assert!(status["sessionsInstalled"].as_u64().is_some_and(|n| n >= 4), "{status}");
    s.check("after the active's node was lost");
}

#[test]
fn a_frozen_active_or_a_cut_heartbeat_never_makes_a_second_holder() {
    let pair = Pair::up("hafreeze");
    let watch = Watch::start(&pair.lab);
    let mut s = Sessions::open(&pair.lab);
    pair.replicated(&pair.b, 4);
    // SIGSTOP: adverts stop, the kernel forwards on. b suspects a, probes,
    // hears its kernel answer, and waits.
    pair.a.signal(libc::SIGSTOP).unwrap();
    pair.fenced_while(&pair.b, 3, || pair.one_holder(true, "while the active is frozen"));
    s.check("while the active is frozen");
    pair.a.signal(libc::SIGCONT).unwrap();
    // The heartbeat path cut while both live: the same.
    common::sh(&pair.a.ns, "ip link set ha0 down");
    pair.fenced_while(&pair.b, 3, || pair.one_holder(true, "with the heartbeat path cut"));
    s.check("with the heartbeat path cut");
    common::sh(&pair.a.ns, "ip link set ha0 up");
    // Neighbours asked and were answered throughout, by a alone.
    let claims = watch.stop();
    assert!(!claims.is_empty(), "the segments were watched");
    let b = macs(&pair.b.ns);
    let by_b: Vec<_> = claims.iter().filter(|(_, h)| b.contains(&h.mac)).collect();
    assert!(by_b.is_empty(), "the standby claimed an address: {by_b:?}");
}

/// A planned stop, which must end in a clean exit.
fn stop(p: &mut Process) {
    let status = p.stop().unwrap();
    assert!(status.success(), "{}: planned stop exited {status}", p.name);
}

/// Whether `natgw audit` finds `p`'s kernel equal to the manifests in
/// `dir` (as a standby's when `standby`).
fn audit_clean(p: &Process, dir: &Path, standby: bool) -> bool {
    let mut args = vec!["audit", "--netns", &p.ns, "-f", dir.to_str().unwrap()];
    if standby {
        args.push("--standby");
    }
    Command::new(env!("CARGO_BIN_EXE_natgw")).args(&args).output().unwrap().status.success()
}

/// FloatingIps created, then deleted in part just as the active stops and
/// in whole once the other replica holds the addresses: once both run
/// again, neither kernel holds anything of them (`natgw audit` clean on
/// both, each in its role), and the other sessions went on throughout.
#[test]
fn floating_ips_made_and_deleted_across_a_failover_leave_nothing_on_either_replica() {
    let dir = std::env::temp_dir().join(format!("natgw-ha-churn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["00-network.yaml", "10-eips.yaml", "20-rules.yaml"] {
        std::fs::copy(common::ha_examples_dir().join(f), dir.join(f)).unwrap();
    }
    let churn = |n: u8| -> String {
        (0..n)
            .map(|i| {
                common::eip(&format!("churn-{i}"), Ipv4Addr::new(198, 51, 100, 100 + i))
                    + &common::fip(&format!("churn-{i}"), &format!("churn-{i}"), Ipv4Addr::new(10, 77, 0, 100 + i))
            })
            .collect()
    };
    let mut pair = Pair::up_in("hachurn", &dir);
    let mut s = Sessions::open(&pair.lab);
    std::fs::write(dir.join("30-churn.yaml"), churn(40)).unwrap();
    wait_for("a to program the FloatingIps", &pair, || audit_clean(&pair.a, &dir, false));
    pair.replicated(&pair.b, 4);
    // Half of them go just as a hands over; the rest once b holds.
    std::fs::write(dir.join("30-churn.yaml"), churn(20)).unwrap();
    stop(&mut pair.a);
    pair.active(&pair.b, "b to take over");
    std::fs::write(dir.join("30-churn.yaml"), "").unwrap();
    pair.a.start().unwrap();
    wait_for("both kernels to hold exactly the manifests", &pair, || {
        audit_clean(&pair.b, &dir, false) && audit_clean(&pair.a, &dir, true)
    });
    pair.one_holder(false, "after the churn");
    s.check("after FloatingIps came and went across a failover");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whoever else can send on the heartbeat path, even from the active's
/// own address, cannot move the addresses or feed the standby
/// connections without the pair's key: an unsigned handover, one signed
/// with another key, and a stream that cannot prove the key are refused
/// and counted, and nothing moves.
#[test]
fn forged_adverts_and_streams_without_the_key_are_refused() {
    use std::io::{BufRead, Write};
    let pair = Pair::up("haforge");
    let mut s = Sessions::open(&pair.lab);
    pair.replicated(&pair.b, 4);
    let held = pair.b.status()["sessionsHeld"].as_u64().unwrap();
    let to = std::net::SocketAddrV4::new(GW2_HA_IP.parse().unwrap(), natgw_lab::replica::PORT);
    let from = std::net::SocketAddrV4::new(GW1_HA_IP.parse().unwrap(), 0);
    let forged = "natgw-ha/1 gateway=demo-gw from=a priority=255 active=0 term=99 handover=b";
    let other = natgw_replica::auth::Key::new(b"not the pair's key at all".to_vec());
    let sock = natgw_lab::traffic::in_ns(&pair.a.ns, move || std::net::UdpSocket::bind(from)).unwrap().unwrap();
    for datagram in [forged.to_string(), format!("{forged} seq=1 mac=00"), other.sign(forged, u64::MAX)] {
        sock.send_to(datagram.as_bytes(), to).unwrap();
    }
    wait_for("b to refuse the three datagrams", &pair, || {
        pair.b.status()["refusedDatagrams"].as_u64().is_some_and(|n| n >= 3)
    });
    // A stream that answers the nonce with another key's MAC.
    let mut conn = natgw_lab::traffic::in_ns(&pair.a.ns, move || std::net::TcpStream::connect(to)).unwrap().unwrap();
    let mut hello = String::new();
    std::io::BufReader::new(conn.try_clone().unwrap()).read_line(&mut hello).unwrap();
    let nonce = hello.trim_end().trim_start_matches("natgw-stream/1 nonce=");
    let line = format!("auth={}\n+ 6 10.77.0.99:1>198.51.100.1:2 198.51.100.1:2>198.51.100.10:3\n=\n", {
        other.mac_hex(format!("natgw-stream/1 {nonce}").as_bytes())
    });
    let _ = conn.write_all(line.as_bytes());
    wait_for("b to refuse the stream", &pair, || pair.b.status()["refusedStreams"].as_u64().is_some_and(|n| n >= 1));
    pair.one_holder(true, "after the forgeries");
    assert_eq!(pair.b.status()["role"], "standby");
    assert_eq!(pair.b.status()["sessionsHeld"].as_u64(), Some(held), "nothing taken from the forged stream");
    s.check("after the forgeries");
}

/// A replica without a usable key does not start, and says how to make one.
#[test]
fn a_replica_without_a_usable_key_refuses_to_start() {
    let lab = common::lab("hakey");
    lab.second_gateway().unwrap();
    let key = std::env::temp_dir().join(format!("natgw-short-key-{}", std::process::id()));
    std::fs::write(&key, "short").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_natgw"))
        .args(["run", "--netns", &lab.ns("gw"), "-f", common::ha_examples_dir().to_str().unwrap()])
        .args([
            "--ha-name",
            "a",
            "--ha-listen",
            &format!("{GW1_HA_IP}:7946"),
            "--ha-peer",
            &format!("{GW2_HA_IP}:7946"),
        ])
        .args(["--ha-key-file", key.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&key);
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("holds 5 bytes") && text.contains("/dev/urandom"), "{text}");
    // The address stays unheld: nothing was programmed.
    assert!(common::sh(&lab.ns("gw"), &format!("ip route show table local {WEB_EIP}")).trim().is_empty());
}

/// The standby cut off from both segments and from the active (its
/// switch ports and the heartbeat link gone, its own links still up):
/// it hears no holder, but neither does the external router answer it, so
/// it never takes the addresses and soon knows it cannot serve; the
/// active serves on throughout.
#[test]
fn a_standby_cut_off_from_the_segments_never_takes_the_addresses() {
    let pair = Pair::up("haisle");
    let mut s = Sessions::open(&pair.lab);
    pair.replicated(&pair.b, 4);
    let sw = pair.lab.ns("sw");
    common::sh(&sw, "ip link set gw2 nomaster; ip link set gw2x nomaster");
    common::sh(&pair.a.ns, "ip link set ha0 down");
    wait_for("b to find it cannot serve", &pair, || {
        pair.one_holder(true, "while the standby is cut off");
        pair.b.status()["linksUp"] == false
    });
    s.check("while the standby is cut off");
    common::sh(&sw, "ip link set gw2 master br0; ip link set gw2x master br1");
    common::sh(&pair.a.ns, "ip link set ha0 up");
    wait_for("b to hear a and see the router again", &pair, || {
        pair.b.status()["peerAlive"] == true && pair.b.status()["linksUp"] == true
    });
    pair.one_holder(true, "once the standby is back");
    s.check("once the standby is back");
}

/// The active cut off from the external segment (its switch port gone,
/// its link up): the standby still sees the router and no holder, takes
/// the addresses, and the active lets go on hearing its later term; every
/// session goes on through the standby, and once the port is back the
/// active stays the standby.
#[test]
fn an_active_cut_off_from_the_external_segment_hands_over() {
    let pair = Pair::up("haport");
    let mut s = Sessions::open(&pair.lab);
    pair.replicated(&pair.b, 4);
    let sw = pair.lab.ns("sw");
    common::sh(&sw, "ip link set gwx nomaster");
    pair.active(&pair.b, "b to take over");
    wait_for("a to let go", &pair, || !pair.a.holds(WEB_EIP));
    s.check("after the active's switch port went");
    common::sh(&sw, "ip link set gwx master br1");
    wait_for("a to stand by", &pair, || pair.a.status()["role"] == "standby");
    pair.one_holder(false, "once the port is back");
    s.check("once the port is back");
}
