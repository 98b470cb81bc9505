//! The standalone command-line contract: plan, apply, audit, run.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::*;

fn natgw(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_natgw")).args(args).output().expect("run natgw")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A scratch manifest directory holding the example network.
fn manifest_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("natgw-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["00-network.yaml", "10-eips.yaml", "20-rules.yaml"] {
        std::fs::copy(examples_dir().join(f), dir.join(f)).unwrap();
    }
    dir
}

#[test]
fn plan_prints_the_desired_state_without_a_kernel() {
    let o = natgw(&["plan", "-f", examples_dir().to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("address 198.51.100.11/24 dev ext0"), "{out}");
    assert!(out.contains("dnat udp 198.51.100.12:53 -> 10.77.0.12:5353"), "{out}");
    let json = natgw(&["plan", "--json", "-f", examples_dir().to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON plan");
    assert_eq!(v["gateway"], "demo-gw");
}

/// Each case: a file name, its content, and words the error must contain.
fn bad_inputs() -> Vec<(&'static str, String, Vec<&'static str>)> {
    let fip = |ip: &str| {
        format!(
            "apiVersion: natgw.io/v1alpha1\nkind: FloatingIp\nmetadata: {{name: bad}}\nspec: {{eip: web, internalIp: \"{ip}\"}}\n"
        )
    };
    vec![
        ("broken.yaml", "kind: [FloatingIp\n".into(), vec!["broken.yaml", "malformed YAML"]),
        (
            "kind.yaml",
            "apiVersion: natgw.io/v1alpha1\nkind: FloatingIP\nmetadata: {name: x}\nspec: {}\n".into(),
            vec!["kind.yaml", "unknown kind \"FloatingIP\""],
        ),
        ("ip.yaml", fip("10.77.0.300"), vec!["ip.yaml", "FloatingIp/bad", "spec.internalIp", "invalid"]),
        (
            "cidr.yaml",
            "apiVersion: natgw.io/v1alpha1\nkind: SnatRule\nmetadata: {name: bad}\nspec: {eip: web, internalCidr: 10.77.0.0/33}\n".into(),
            vec!["cidr.yaml", "SnatRule/bad", "spec.internalCidr"],
        ),
        (
            "hostbits.yaml",
            "apiVersion: natgw.io/v1alpha1\nkind: SnatRule\nmetadata: {name: bad}\nspec: {eip: web, internalCidr: 10.77.0.5/24}\n".into(),
            vec!["hostbits.yaml", "SnatRule/bad", "spec.internalCidr", "did you mean 10.77.0.0/24"],
        ),
        (
            "port.yaml",
            "apiVersion: natgw.io/v1alpha1\nkind: DnatRule\nmetadata: {name: bad}\nspec: {eip: ports, protocol: tcp, externalPort: 70000, internalIp: 10.77.0.12, internalPort: 80}\n".into(),
            vec!["port.yaml", "DnatRule/bad", "spec.externalPort"],
        ),
        (
            "port0.yaml",
            "apiVersion: natgw.io/v1alpha1\nkind: DnatRule\nmetadata: {name: bad}\nspec: {eip: ports, protocol: tcp, externalPort: 0, internalIp: 10.77.0.12, internalPort: 80}\n".into(),
            vec!["port0.yaml", "DnatRule/bad", "spec.externalPort", "between 1 and 65535"],
        ),
        (
            "proto.yaml",
            "apiVersion: natgw.io/v1alpha1\nkind: DnatRule\nmetadata: {name: bad}\nspec: {eip: ports, protocol: sctp, externalPort: 80, internalIp: 10.77.0.12, internalPort: 80}\n".into(),
            vec!["proto.yaml", "DnatRule/bad", "spec.protocol"],
        ),
        (
            "dangling.yaml",
            "apiVersion: natgw.io/v1alpha1\nkind: FloatingIp\nmetadata: {name: bad}\nspec: {eip: nowhere, internalIp: 10.77.0.11}\n".into(),
            vec!["dangling.yaml", "FloatingIp/bad", "spec.eip", "Eip \"nowhere\" does not exist"],
        ),
        (
            "typo.yaml",
            "apiVersion: natgw.io/v1alpha1\nkind: Eip\nmetadata: {name: bad}\nspec: {gateway: demo-gw, ipAddress: 198.51.100.30}\n".into(),
            vec!["typo.yaml", "Eip/bad", "spec.ipAddress", "unknown field"],
        ),
    ]
}

#[test]
fn bad_input_names_file_object_and_field_and_leaves_the_kernel_unchanged() {
    let lab = lab("badin");
    let ns = lab.ns("gw");
    let dir = manifest_dir("bad");
    let o = natgw(&["apply", "--netns", &ns, "-f", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let before = kernel_dump(&ns);
    for (file, content, words) in bad_inputs() {
        let path = dir.join(file);
        std::fs::write(&path, &content).unwrap();
        let o = natgw(&["apply", "--netns", &ns, "-f", dir.to_str().unwrap()]);
        let out = text(&o);
        assert!(!o.status.success(), "{file} was accepted: {out}");
        for w in words {
            assert!(out.contains(w), "{file}: error lacks {w:?}: {out}");
        }
        assert_eq!(kernel_dump(&ns), before, "{file} changed the kernel");
        std::fs::remove_file(&path).unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn audit_exits_one_and_lists_leaks_after_manifests_shrink() {
    let lab = lab("audit");
    let ns = lab.ns("gw");
    let dir = manifest_dir("audit");
    assert!(natgw(&["apply", "--netns", &ns, "-f", dir.to_str().unwrap()]).status.success());
    let o = natgw(&["audit", "--netns", &ns, "-f", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    std::fs::remove_file(dir.join("20-rules.yaml")).unwrap();
    let o = natgw(&["audit", "--netns", &ns, "-f", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("leaked:   nft fip_dnat element 198.51.100.11 : 10.77.0.11"), "{out}");
    assert!(out.contains("leaked:   nft port_fwd element 198.51.100.12 . tcp . 80"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

struct Running(Child);
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn audit_ok(ns: &str, path: &Path) -> bool {
    natgw(&["audit", "--netns", ns, "-f", path.to_str().unwrap()]).status.success()
}

#[test]
fn run_follows_edits_and_keeps_the_last_good_version_of_a_bad_file() {
    let lab = lab("run");
    let ns = lab.ns("gw");
    let dir = manifest_dir("run");
    let child = Command::new(env!("CARGO_BIN_EXE_natgw"))
        .args(["run", "--netns", &ns, "-f", dir.to_str().unwrap(), "--poll-ms", "100", "--resync", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _running = Running(child);
    wait_until("initial convergence", || audit_ok(&ns, &dir));

    // A bad edit: the rules file keeps its last good content in force.
    let rules = dir.join("20-rules.yaml");
    let good = std::fs::read_to_string(&rules).unwrap();
    std::fs::write(&rules, good.replace("internalIp: 10.77.0.11", "internalIp: 10.77.0.999")).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let shadow = manifest_dir("run-shadow");
    assert!(audit_ok(&ns, &shadow), "a bad edit changed the kernel");

    // A good edit is applied.
    std::fs::write(&rules, good.replace("internalIp: 10.77.0.11", "internalIp: 10.77.0.13")).unwrap();
    wait_until("the edit to be applied", || audit_ok(&ns, &dir));

    // Drift is repaired by the periodic resync.
    sh(&ns, "nft delete table ip natgw");
    wait_until("drift repair", || audit_ok(&ns, &dir));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&shadow);
}
