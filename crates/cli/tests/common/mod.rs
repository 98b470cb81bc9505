//! Shared set-up for kernel tests: a lab per test and the example network.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use natgw_api::{ObjectSet, load_str};
use natgw_dataplane::Gateway;
use natgw_lab::Lab;
use natgw_plan::{GatewayPlan, plan_gateway};

pub const EGRESS_EIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const WEB_EIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
pub const PORTS_EIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 12);
pub const INT1: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 11);
pub const INT2: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 12);
pub const EXT1: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

/// A lab whose namespaces are unique to this test process and test.
pub fn lab(test: &str) -> Lab {
    static N: AtomicU32 = AtomicU32::new(0);
    let prefix = format!("t{}{}-{test}", std::process::id() % 10000, N.fetch_add(1, Ordering::Relaxed));
    Lab::up(&prefix).expect("lab up")
}

pub fn examples_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples"))
}

/// The example network plus `extra` YAML documents.
pub fn objects(extra: &str) -> ObjectSet {
    objects_in(examples_dir(), extra)
}

/// `examples-ha`: the example network with a gateway of two replicas.
#[allow(dead_code)]
pub fn ha_examples_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples-ha"))
}

/// The network of `dir` plus `extra` YAML documents.
pub fn objects_in(dir: &Path, extra: &str) -> ObjectSet {
    let base = std::fs::read_to_string(dir.join("00-network.yaml")).expect("examples");
    let text = format!("{base}\n---\n{extra}");
    load_str(Path::new("test.yaml"), &text).expect("valid manifests").0
}

pub fn eip(name: &str, ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: natgw.io/v1alpha1\nkind: Eip\nmetadata: {{name: {name}}}\nspec: {{gateway: demo-gw, ip: {ip}}}\n---\n"
    )
}
pub fn fip(name: &str, eip: &str, internal: Ipv4Addr) -> String {
    format!(
        "apiVersion: natgw.io/v1alpha1\nkind: FloatingIp\nmetadata: {{name: {name}}}\nspec: {{eip: {eip}, internalIp: {internal}}}\n---\n"
    )
}
pub fn snat(name: &str, eip: &str, cidr: &str) -> String {
    format!(
        "apiVersion: natgw.io/v1alpha1\nkind: SnatRule\nmetadata: {{name: {name}}}\nspec: {{eip: {eip}, internalCidr: {cidr}}}\n---\n"
    )
}
pub fn dnat(name: &str, eip: &str, proto: &str, port: u16, internal: Ipv4Addr, to: u16) -> String {
    format!(
        "apiVersion: natgw.io/v1alpha1\nkind: DnatRule\nmetadata: {{name: {name}}}\nspec: {{eip: {eip}, protocol: {proto}, externalPort: {port}, internalIp: {internal}, internalPort: {to}}}\n---\n"
    )
}

pub fn plan(set: &ObjectSet) -> GatewayPlan {
    let p = plan_gateway(set, "demo-gw").expect("plan");
    assert!(p.conflicts.is_empty(), "unexpected conflicts: {:?}", p.conflicts);
    p
}

/// Syncs and asserts the kernel then holds exactly the plan.
pub fn converge(gw: &Gateway, set: &ObjectSet) -> GatewayPlan {
    let p = plan(set);
    gw.sync(&p).expect("sync");
    assert_clean(gw, &p);
    p
}

pub fn assert_clean(gw: &Gateway, p: &GatewayPlan) {
    let drift = gw.audit(p).expect("audit");
    assert!(
        drift.is_empty(),
        "kernel differs from plan:\n{}",
        drift.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n")
    );
}

/// `cmd` run inside a namespace; its stdout.
pub fn sh(ns: &str, cmd: &str) -> String {
    let out = Command::new("ip").args(["netns", "exec", ns, "sh", "-c", cmd]).output().expect("ip netns exec");
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The whole kernel state a test may compare before and after.
pub fn kernel_dump(ns: &str) -> String {
    sh(ns, "nft -a list ruleset; ip -d addr; ip -d route show table all; ip rule; sysctl net.ipv4.ip_forward")
}
