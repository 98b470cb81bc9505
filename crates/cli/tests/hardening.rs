//! Kernel items of the hardening issue: real nftables, netlink and
//! conntrack in network namespaces, real packets.

mod common;

use std::net::{Ipv4Addr, UdpSocket};

use common::*;
use natgw_dataplane::Gateway;
use natgw_lab::traffic::{UdpFlow, in_ns, udp_server};

#[test]
fn item11_a_failed_conntrack_sweep_stays_owed_until_it_succeeds() {
    let lab = lab("sweep");
    let ns = lab.ns("gw");
    let gw = Gateway::open(Some(&ns)).unwrap();
    converge(&gw, &objects(&(eip("web", WEB_EIP) + &fip("int1", "web", INT1))));
    let _server = udp_server(&lab.ns("ext1"), EXT1, 5353).unwrap();
    let flow = UdpFlow::open(&lab.ns("int1"), EXT1, 5353).unwrap();
    assert_eq!(flow.source().unwrap(), WEB_EIP);
    // The floating IP goes; the kernel changes, then the sweep fails.
    let p = plan(&objects(&eip("web", WEB_EIP)));
    gw.fail_next_sweep();
    assert!(gw.sync(&p).is_err(), "the injected failure is reported");
    // The kernel already holds the plan, but the sweep is still owed: a
    // finalizer released now must not leave the flow behind.
    let report = gw.sync(&p).expect("sync");
    assert!(report.conntrack_deleted >= 1, "{report:?}");
    assert_clean(&gw, &p);
}

#[test]
fn item19_audit_ignores_the_gateways_own_and_multicast_traffic_on_a_bridged_lan() {
    let lab = lab("igmp");
    lab.bridge_lan().unwrap();
    let ns = lab.ns("gw");
    let gw = Gateway::open(Some(&ns)).unwrap();
    let rules = eip("egress", EGRESS_EIP) + &snat("vpc", "egress", "10.77.0.0/24");
    let p = converge(&gw, &objects(&rules));
    // The gateway joins a group on its LAN bridge (an IGMP report from
    // 10.77.0.1, inside the SNAT rule's CIDR), a LAN host sends mDNS, and
    // the gateway broadcasts on the LAN.
    let lan = Ipv4Addr::new(10, 77, 0, 1);
    let joined = in_ns(&ns, move || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind((lan, 0))?;
        s.join_multicast_v4(&Ipv4Addr::new(239, 1, 2, 3), &lan)?;
        s.set_broadcast(true)?;
        s.send_to(b"hello", (Ipv4Addr::new(10, 77, 0, 255), 9))?;
        Ok(s)
    })
    .unwrap()
    .unwrap();
    let mdns = in_ns(&lab.ns("int1"), || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind((INT1, 5353))?;
        s.send_to(b"query", (Ipv4Addr::new(224, 0, 0, 251), 5353))?;
        Ok(s)
    })
    .unwrap()
    .unwrap();
    let entries = sh(&ns, "conntrack -L 2>/dev/null");
    assert!(entries.contains("dst=224.0.0.251"), "the LAN's multicast is tracked:\n{entries}");
    assert_clean(&gw, &p);
    // A sync deletes none of them either.
    let report = gw.resync(&p).unwrap();
    assert_eq!(report.conntrack_deleted, 0, "{report:?}");
    drop((joined, mdns));
}

/// Second round, item 19: EIPs are routes, so natgw adds no interface
/// address at all, and the start-up probe that refused kernels older than
/// 5.18 (which drop the address mark) is gone: a whole sync, a change and
/// a teardown leave the namespace's addresses exactly as they were.
#[test]
fn round2_item19_natgw_adds_no_address_so_no_kernel_is_refused_for_the_address_mark() {
    let lab = lab("noaddr");
    let ns = lab.ns("gw");
    let gw = Gateway::open(Some(&ns)).unwrap();
    // IPv4 only: IPv6 link-local addresses of a new lab leave their
    // "tentative" state meanwhile (seen on a loaded machine).
    let before = sh(&ns, "ip -4 -d addr");
    converge(&gw, &objects(&(eip("web", WEB_EIP) + &fip("int1", "web", INT1) + &snat("out", "web", "10.77.0.0/24"))));
    assert_eq!(sh(&ns, "ip -4 -d addr"), before, "a sync added an address");
    converge(&gw, &objects(&eip("web", WEB_EIP)));
    gw.teardown().unwrap();
    assert_eq!(sh(&ns, "ip -4 -d addr"), before, "a change or the teardown left an address");
}

/// A memory cgroup (v1 or v2) that the processes spawned into it share,
/// removed on drop.
struct MemoryCgroup {
    dir: std::path::PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    fn new(name: &str, limit: u64) -> MemoryCgroup {
        let v1 = std::path::Path::new("/sys/fs/cgroup/memory");
        let (root, v2) = if v1.join("memory.limit_in_bytes").exists() {
            (v1.to_path_buf(), false)
        } else {
            let root = std::path::PathBuf::from("/sys/fs/cgroup");
            let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            assert!(controllers.contains("memory"), "no memory cgroup (v1 or v2) on this machine");
            (root, true)
        };
        let dir = root.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the cgroup");
        let file = if v2 { "memory.max" } else { "memory.limit_in_bytes" };
        std::fs::write(dir.join(file), limit.to_string()).expect("set the limit");
        MemoryCgroup { dir, v2 }
    }

    /// Runs `natgw ARGS` inside the cgroup to its end.
    fn run(&self, args: &[&str]) -> std::process::Output {
        use std::os::unix::process::CommandExt;
        let procs = self.dir.join("cgroup.procs");
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_natgw"));
        command.args(args);
        // SAFETY: between fork and exec only a write of the child's own pid.
        unsafe {
            command.pre_exec(move || std::fs::write(&procs, std::process::id().to_string()));
        }
        command.output().expect("run natgw")
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// The most memory its processes held at once, in MiB.
    fn peak_mib(&self) -> f64 {
        let file = if self.v2 { "memory.peak" } else { "memory.max_usage_in_bytes" };
        self.read(file).trim().parse::<f64>().unwrap_or(f64::NAN) / (1024.0 * 1024.0)
    }

    /// Processes the kernel killed for want of memory.
    fn oom_kills(&self) -> u64 {
        let file = if self.v2 { "memory.events" } else { "memory.oom_control" };
        let text = self.read(file);
        text.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The kernel's table limit raised for one test (it is global: a
/// namespace cannot raise its own), then put back.
struct ConntrackMax(String);

impl ConntrackMax {
    const FILE: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

    fn at_least(n: u64) -> ConntrackMax {
        let old = std::fs::read_to_string(Self::FILE).expect("nf_conntrack_max");
        if old.trim().parse::<u64>().unwrap_or(0) < n {
            std::fs::write(Self::FILE, n.to_string()).expect("raise nf_conntrack_max");
        }
        ConntrackMax(old)
    }
}

impl Drop for ConntrackMax {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::FILE, self.0.trim());
    }
}

/// Second round, item 8: a conntrack table of 300,000 flows is walked
/// while it is read, never held whole. `natgw apply` (which sweeps the
/// flows a change made stale) and `natgw audit` (which reads every entry)
/// run under a 128 MiB memory limit, as the chart limits a gateway: both
/// finish, nothing is killed, and the sweep removes exactly the stale
/// flows. The peak is printed (run with --nocapture).
#[test]
fn round2_item8_300k_flows_are_swept_and_audited_under_128_mib() {
    use natgw_dataplane::conntrack::Conntrack;
    use natgw_dataplane::conntrack::policy::{CtEntry, Tuple};
    const OTHERS: u32 = 300_000;
    const STALE: u16 = 1_000;
    let _max = ConntrackMax::at_least(400_000);
    let lab = lab("ct300k");
    let ns = lab.ns("gw");
    let dir = std::env::temp_dir().join(format!("natgw-ct300k-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let with_fip = dir.join("with.yaml");
    let without = dir.join("without.yaml");
    let base = std::fs::read_to_string(examples_dir().join("00-network.yaml")).unwrap();
    std::fs::write(&with_fip, format!("{base}\n---\n{}{}", eip("web", WEB_EIP), fip("int1", "web", INT1))).unwrap();
    std::fs::write(&without, format!("{base}\n---\n{}", eip("web", WEB_EIP))).unwrap();
    let natgw = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_natgw")).args(args).output().unwrap();
    let out = natgw(&["apply", "--netns", &ns, "-f", with_fip.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // 300,000 flows natgw has nothing to do with (neither from its LAN nor
    // to its addresses), and 1,000 that int1's FloatingIp translated.
    let others = (0..OTHERS).map(|i| {
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i / 50_000);
        let orig = Tuple { src, dst: Ipv4Addr::new(192, 0, 2, 53), sport: 10_000 + (i % 50_000) as u16, dport: 53 };
        CtEntry { proto: 17, orig, reply: Tuple { src: orig.dst, dst: orig.src, sport: 53, dport: orig.sport } }
    });
    let translated = (0..STALE).map(|p| {
        let orig = Tuple { src: INT1, dst: EXT1, sport: 20_000 + p, dport: 5353 };
        CtEntry { proto: 17, orig, reply: Tuple { src: EXT1, dst: WEB_EIP, sport: 5353, dport: 20_000 + p } }
    });
    let entries: Vec<CtEntry> = others.chain(translated).collect();
    let gw = Gateway::open(Some(&ns)).unwrap();
    gw.run(move || Conntrack::open().and_then(|ct| ct.insert(&entries, 3600))).unwrap().expect("insert");
    let count = |gw: &Gateway| gw.run(|| Conntrack::open().and_then(|ct| ct.entries())).unwrap().unwrap();
    assert!(count(&gw).len() >= (OTHERS + u32::from(STALE)) as usize, "the table holds every flow inserted");

    let cgroup = MemoryCgroup::new("natgw-ct300k", 128 << 20);
    // The FloatingIp goes: its 1,000 flows are stale, the rest are not.
    let applied = cgroup.run(&["apply", "--netns", &ns, "-f", without.to_str().unwrap()]);
    let audited = cgroup.run(&["audit", "--netns", &ns, "-f", without.to_str().unwrap()]);
    eprintln!(
        "{} flows: natgw apply and natgw audit under 128 MiB, peak {:.1} MiB; apply said: {}",
        OTHERS + u32::from(STALE),
        cgroup.peak_mib(),
        String::from_utf8_lossy(&applied.stdout).trim()
    );
    assert_eq!(cgroup.oom_kills(), 0, "killed for want of memory");
    assert!(applied.status.success(), "apply: {}", String::from_utf8_lossy(&applied.stderr));
    assert!(audited.status.success(), "audit: {}", String::from_utf8_lossy(&audited.stdout));
    let left = count(&gw);
    assert!(!left.iter().any(|e| e.reply.dst == WEB_EIP), "a stale flow through the EIP survived the sweep");
    let kept = left.iter().filter(|e| e.orig.dst == Ipv4Addr::new(192, 0, 2, 53)).count();
    assert_eq!(kept, OTHERS as usize, "the sweep touched flows that are not natgw's");
    let _ = std::fs::remove_dir_all(&dir);
}
