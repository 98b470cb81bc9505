//! Planned switchovers between two gateway replicas, as traffic sees them
//! (`natgw-bench --ha-switch N`): `natgw lab up --ha`, the standby holding
//! the whole plan and no address (`examples-ha`); a UDP probe every 10 ms
//! from the external host to a FloatingIp, answered from the LAN; each
//! switch moves the EIPs and the LAN address to the other replica, in the
//! order a takeover makes it. Reported: the longest silence around each switch.
//! The data plane's part only: no election, no replication (UDP to a
//! FloatingIp needs none).

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use natgw_dataplane::Gateway;
use natgw_lab::Lab;
use natgw_lab::traffic::{in_ns, udp_server};

const WEB_EIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const INT1: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 11);

fn examples() -> Result<natgw_api::ObjectSet> {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples-ha"));
    let mut text = String::new();
    for f in ["00-network.yaml", "10-eips.yaml", "20-rules.yaml"] {
        text += &std::fs::read_to_string(dir.join(f))?;
        text += "\n---\n";
    }
    Ok(natgw_api::load_str(std::path::Path::new("examples"), &text)?.0)
}

pub fn run(switches: u32) -> Result<()> {
    let lab = Lab::up("nbha")?;
    lab.second_gateway()?;
    let plan = natgw_plan::plan_gateway(&examples()?, "demo-gw")?;
    let standby = plan.standby();
    let names = [lab.ns("gw"), lab.ns("gw2")];
    let gws = [Gateway::open(Some(&names[0]))?, Gateway::open(Some(&names[1]))?];
    gws[0].sync(&plan)?;
    gws[1].sync(&standby)?;
    let _server = udp_server(&lab.ns("int1"), INT1, 7000)?;
    let sock = in_ns(&lab.ns("ext1"), || UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)))??;
    sock.connect(SocketAddrV4::new(WEB_EIP, 7000))?;
    sock.set_read_timeout(Some(Duration::from_millis(2)))?;
    let replies = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let (replies, stop) = (replies.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut next = Instant::now();
            let mut buf = [0u8; 128];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if Instant::now() >= next {
                    let _ = sock.send(b"probe");
                    next += Duration::from_millis(10);
                }
                if sock.recv(&mut buf).is_ok() {
                    replies.lock().unwrap_or_else(|p| p.into_inner()).push(Instant::now());
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut gaps = Vec::new();
    let mut took = Vec::new();
    for i in 0..switches as usize {
        let (from, to) = (i % 2, (i + 1) % 2);
        let start = Instant::now();
        gws[from].sync(&standby)?;
        gws[to].sync(&plan)?;
        took.push(start.elapsed());
        std::thread::sleep(Duration::from_millis(700));
        let seen: Vec<Instant> = replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .filter(|t| *t + Duration::from_millis(100) >= start)
            .collect();
        let gap = seen.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(Duration::from_secs(1));
        anyhow::ensure!(seen.last().is_some_and(|t| *t > start + took[i]), "no reply after switch {i}");
        gaps.push(gap);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = probe.join();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let mut g: Vec<f64> = gaps.iter().map(ms).collect();
    let mut t: Vec<f64> = took.iter().map(ms).collect();
    g.sort_by(f64::total_cmp);
    t.sort_by(f64::total_cmp);
    println!("machine: {}", crate::machine());
    println!("planned switchovers (data plane only), {switches}, a UDP probe every 10 ms through a FloatingIp:");
    println!("| figure | median | worst |\n|---|---|---|");
    println!("| longest silence around a switch | {:.0} ms | {:.0} ms |", g[g.len() / 2], g[g.len() - 1]);
    println!("| the switch itself (release, take) | {:.0} ms | {:.0} ms |", t[t.len() / 2], t[t.len() - 1]);
    Ok(())
}
