//! Translation logs from real flows: one line when a translation starts
//! and one when it ends, and `natgw logs` answers who held the EIP.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use natgw_dataplane::Gateway;
use natgw_dataplane::conntrack::translog::{Rates, Sink};
use natgw_lab::traffic::{UdpFlow, udp_server};

#[test]
fn translations_are_logged_and_logs_answer_who_held_an_eip() {
    let lab = lab("tlog");
    let gw = Gateway::open(Some(&lab.ns("gw"))).unwrap();
    let rules = eip("egress", EGRESS_EIP) + &snat("vpc", "egress", "10.77.0.0/24");
    converge(&gw, &objects(&rules));
    let dir = std::env::temp_dir().join(format!("natgw-tlog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("translations.log");
    let _log =
        gw.start_translation_log(Sink::file(file.clone(), 1 << 20, 1), Rates { total: 1000, per_eip: 1000 }).unwrap();
    // A log that cannot be written: translation goes on, the loss counts.
    let unwritable = gw
        .start_translation_log(
            Sink::file("/proc/no-such-dir/log".into(), 1 << 20, 1),
            Rates { total: 1000, per_eip: 1000 },
        )
        .unwrap();
    let lost = unwritable.counts.clone();
    let _server = udp_server(&lab.ns("ext1"), EXT1, 5353).unwrap();
    let flow = UdpFlow::open(&lab.ns("int2"), EXT1, 5353).unwrap();
    assert_eq!(flow.source().unwrap(), EGRESS_EIP);
    // A line's time is when the log read the kernel's event, a little after
    // the packet: ask about a moment the log has already seen. Asking right
    // after the first packet failed on a loaded CI machine.
    let text = wait_for_line(&file, |l| l.contains("\"event\":\"new\"") && l.contains("198.51.100.10:"));
    let during = natgw_dataplane::conntrack::translog::rfc3339(std::time::SystemTime::now());
    // The SnatRule goes: the sweep ends the flow's translation.
    converge(&gw, &objects(&eip("egress", EGRESS_EIP)));
    wait_for_line(&file, |l| l.contains("\"event\":\"end\"") && l.contains("\"internal\":\"10.77.0.12:"));
    assert!(text.lines().all(|l| !l.contains("\"event\":\"end\"")), "ended before the rule went: {text}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while lost.dropped_write.load(Ordering::Relaxed) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(lost.dropped_write.load(Ordering::Relaxed) >= 2 && lost.written.load(Ordering::Relaxed) == 0);
    let logs = |at: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_natgw"))
            .args(["logs", "--file", file.to_str().unwrap(), "--eip", "198.51.100.10", "--at", at])
            .output()
            .unwrap()
    };
    let held = logs(&during);
    assert!(held.status.success() && String::from_utf8_lossy(&held.stdout).contains("10.77.0.12:"));
    let after = natgw_dataplane::conntrack::translog::rfc3339(std::time::SystemTime::now());
    assert!(!logs(&after).status.success(), "nobody holds it after the flow ended");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The log's text once a line matches, within 5 s (the reader thread may be
/// slow to run on a busy machine).
fn wait_for_line(file: &std::path::Path, matches: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.lines().any(&matches) {
            return text;
        }
        assert!(std::time::Instant::now() < deadline, "no such line in 5 s: {text}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
