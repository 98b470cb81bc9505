//! `natgw top`: the busiest EIPs and their destinations, live; `natgw
//! logs`: who held an EIP at a moment.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use natgw_dataplane::conntrack::ports::{PORTS, proto_name};
use natgw_dataplane::{Gateway, PortReport};

/// The screen for one report: the `rows` busiest (EIP, protocol) pairs.
pub fn render(report: &PortReport, rows: usize) -> String {
    let mut s = String::new();
    let failures = report.insert_failures.map_or("n/a".to_string(), |n| n.to_string());
    let _ = writeln!(
        s,
        "conntrack entries {}   port allocation failures (insert_failed) {failures}   source ports per destination {PORTS}\n",
        report.entries
    );
    let _ = writeln!(
        s,
        "{:<16} {:<5} {:>8}  {:<22} {:>8} {:>7}",
        "EIP", "PROTO", "CONNS", "BUSIEST DESTINATION", "CONNS", "PORTS%"
    );
    for u in report.usage.iter().take(rows) {
        let (dest, n) = match u.destinations.first() {
            Some((d, n)) => (format!("{}:{}", d.addr, d.port), n.to_string()),
            None => ("(inbound only)".to_string(), "-".to_string()),
        };
        let _ = writeln!(
            s,
            "{:<16} {:<5} {:>8}  {:<22} {:>8} {:>6.2}%",
            u.eip.to_string(),
            proto_name(u.proto),
            u.connections,
            dest,
            n,
            u.saturation() * 100.0
        );
        for (d, n) in u.destinations.iter().skip(1) {
            let _ = writeln!(s, "{:<32}  {:<22} {:>8}", "", format!("{}:{}", d.addr, d.port), n);
        }
    }
    if report.usage.is_empty() {
        let _ = writeln!(s, "(no translated connection)");
    }
    s
}

/// Refreshes every `interval` until interrupted, or prints once.
pub fn top(netns: Option<&str>, interval: Duration, rows: usize, destinations: usize, once: bool) -> Result<ExitCode> {
    let gw = Gateway::open(netns)?;
    loop {
        let report = gw.port_usage(destinations)?;
        let screen = render(&report, rows);
        if once {
            print!("{screen}");
            return Ok(ExitCode::SUCCESS);
        }
        // Clear and home: a terminal shows the latest figures in place.
        print!("\x1b[2J\x1b[H{screen}");
        std::thread::sleep(interval);
    }
}

/// Prints the translations of `eip` in force at `at`, from a log file.
pub fn logs(file: &std::path::Path, eip: &str, at: &str) -> Result<ExitCode> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(file).with_context(|| format!("--file {}", file.display()))?;
    let held = natgw_dataplane::conntrack::translog::held_at(&text, eip, at);
    for l in &held {
        println!("{}", serde_json::to_string(l)?);
    }
    if held.is_empty() {
        eprintln!("no translation of {eip} was in force at {at} in {}", file.display());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
