//! The baseline: Kube-OVN's VPC NAT gateway programming, one process per
//! rule into linear iptables chains (kubeovn/kube-ovn's
//! `dist/images/vpcnatgateway/nat-gateway.sh`). Kept favourable to the baseline: no
//! `iptables-save` greps, no version probes, no arping, no pod exec.

use std::process::Command;

use anyhow::{Result, bail};
use natgw_api::ObjectSet;

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program).args(args).output()?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `nat-gateway.sh init`: the chain layout, linear chains off the hooks.
pub fn init(iptables: &str) -> Result<()> {
    for chain in ["DNAT_FILTER", "SNAT_FILTER", "EXCLUSIVE_DNAT", "EXCLUSIVE_SNAT", "SHARED_DNAT", "SHARED_SNAT"] {
        run(iptables, &["-t", "nat", "-N", chain])?;
    }
    run(iptables, &["-t", "nat", "-A", "PREROUTING", "-j", "DNAT_FILTER"])?;
    run(iptables, &["-t", "nat", "-A", "DNAT_FILTER", "-j", "EXCLUSIVE_DNAT"])?;
    run(iptables, &["-t", "nat", "-A", "DNAT_FILTER", "-j", "SHARED_DNAT"])?;
    run(iptables, &["-t", "nat", "-A", "POSTROUTING", "-j", "SNAT_FILTER"])?;
    run(iptables, &["-t", "nat", "-A", "SNAT_FILTER", "-j", "EXCLUSIVE_SNAT"])?;
    run(iptables, &["-t", "nat", "-A", "SNAT_FILTER", "-j", "SHARED_SNAT"])?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{}/promote_secondaries", natgw_lab::EXT_IF), "1")?;
    Ok(())
}

/// The commands Kube-OVN runs for one object, in creation order.
pub fn commands(set: &ObjectSet, ext_prefix: u8) -> Vec<(String, Vec<String>)> {
    let ext = natgw_lab::EXT_IF;
    let mut out = Vec::new();
    let eip_ip = |name: &str| set.eips.get(name).and_then(|e| e.spec.ip).map(|ip| ip.to_string()).unwrap_or_default();
    let cmd = |p: &str, a: &[&str]| (p.to_string(), a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    for e in set.eips.values() {
        if let Some(ip) = e.spec.ip {
            out.push(cmd("ip", &["addr", "replace", &format!("{ip}/{ext_prefix}"), "dev", ext]));
        }
    }
    for f in set.floating_ips.values() {
        let (eip, ip) = (eip_ip(&f.spec.eip), f.spec.internal_ip.to_string());
        out.push(cmd("IPT", &["-t", "nat", "-A", "EXCLUSIVE_DNAT", "-d", &eip, "-j", "DNAT", "--to-destination", &ip]));
        out.push(cmd("IPT", &["-t", "nat", "-A", "EXCLUSIVE_SNAT", "-s", &ip, "-j", "SNAT", "--to-source", &eip]));
    }
    for d in set.dnat_rules.values() {
        let (eip, port) = (eip_ip(&d.spec.eip), d.spec.external_port.to_string());
        let to = format!("{}:{}", d.spec.internal_ip, d.spec.internal_port);
        let proto = d.spec.protocol.as_str();
        out.push(cmd(
            "IPT",
            &[
                "-t",
                "nat",
                "-A",
                "SHARED_DNAT",
                "-p",
                proto,
                "-d",
                &eip,
                "--dport",
                &port,
                "-j",
                "DNAT",
                "--to-destination",
                &to,
            ],
        ));
    }
    for s in set.snat_rules.values() {
        let (eip, cidr) = (eip_ip(&s.spec.eip), s.spec.internal_cidr.to_string());
        out.push(cmd(
            "IPT",
            &["-t", "nat", "-A", "SHARED_SNAT", "-o", ext, "-s", &cidr, "-j", "SNAT", "--to-source", &eip],
        ));
    }
    out
}

/// Runs commands one process each, as Kube-OVN does.
pub fn execute(iptables: &str, cmds: &[(String, Vec<String>)]) -> Result<()> {
    for (program, args) in cmds {
        let program = if program == "IPT" { iptables } else { program.as_str() };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(program, &args)?;
    }
    Ok(())
}

/// Loads commands fast with one restore (set-up only, not measured).
pub fn restore(iptables: &str, cmds: &[(String, Vec<String>)]) -> Result<()> {
    use std::io::Write;
    let mut text = String::from("*nat\n");
    for (program, args) in cmds.iter().filter(|(p, _)| p == "IPT") {
        let _ = program;
        text.push_str(&args[2..].join(" "));
        text.push('\n');
    }
    text.push_str("COMMIT\n");
    let mut child =
        Command::new(format!("{iptables}-restore")).arg("--noflush").stdin(std::process::Stdio::piped()).spawn()?;
    child.stdin.take().map(|mut s| s.write_all(text.as_bytes())).transpose()?;
    if !child.wait()?.success() {
        bail!("{iptables}-restore failed");
    }
    for (program, args) in cmds.iter().filter(|(p, _)| p == "ip") {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(program, &args)?;
    }
    Ok(())
}
