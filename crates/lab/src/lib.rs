//! The lab: a documented topology of network namespaces for demos and
//! tests, and helpers that send real packets between them.
//!
//! ```text
//!  PREFIX-int1 eth0 10.77.0.11 ─┐
//!                               ├─ PREFIX-sw (bridge br0) ─ lan0 10.77.0.1  PREFIX-gw  ext0 ── eth0 198.51.100.1 PREFIX-ext1
//!  PREFIX-int2 eth0 10.77.0.12 ─┘                                          (EIPs 198.51.100.0/24)
//! ```
//! Internal hosts route via 10.77.0.1; the external host has no route to
//! the VPC, so only NAT lets the two sides talk. `second_gateway` (`natgw
//! lab up --ha`) adds PREFIX-gw2 with its own `lan0` on `br0` and an
//! `ext0`, and makes the external side a bridge `br1` joining both
//! gateways and the external host: two replicas on the same segments.

pub mod replica;
pub mod traffic;

use std::process::Command;

pub const LAN_CIDR: &str = "10.77.0.0/24";
pub const GW_LAN_IP: &str = "10.77.0.1";
/// With `--ha`, each replica's own LAN address (heartbeats, connection
/// stream); `GW_LAN_IP` is then held by the active replica.
pub const GW1_OWN_LAN_IP: &str = "10.77.0.2";
pub const GW2_OWN_LAN_IP: &str = "10.77.0.3";
/// With `--ha`, the replicas' dedicated link (`ha0`, a veth between gw and
/// gw2): the heartbeat and the connection stream, out of tenants' reach.
pub const HA_IF: &str = "ha0";
pub const GW1_HA_IP: &str = "10.255.77.1";
pub const GW2_HA_IP: &str = "10.255.77.2";
pub const INT1_IP: &str = "10.77.0.11";
pub const INT2_IP: &str = "10.77.0.12";
pub const EXT_CIDR: &str = "198.51.100.0/24";
pub const EXT1_IP: &str = "198.51.100.1";
/// Interface names inside the gateway namespace.
pub const LAN_IF: &str = "lan0";
pub const EXT_IF: &str = "ext0";

const ROLES: [&str; 5] = ["gw", "sw", "int1", "int2", "ext1"];
/// Roles a test adds on demand; `down` removes them too.
const OPTIONAL_ROLES: [&str; 2] = ["pod", "gw2"];
/// The gateway pod's own network (eth0 in a cluster), as `cluster_side` builds it.
pub const POD_IF: &str = "c0";
pub const POD_GW_IP: &str = "10.244.9.1";
pub const POD_PEER_IP: &str = "10.244.9.2";

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("cannot run ip: {0} (is iproute2 installed?)")]
    Spawn(std::io::Error),
}

fn ip(args: &[&str]) -> Result<(), LabError> {
    let out = Command::new("ip").args(args).output().map_err(LabError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Ip { args: args.join(" "), stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}

/// A running lab. Dropping it removes every namespace it made, also when
/// a test fails; `keep` leaves it running (for `natgw lab up`).
pub struct Lab {
    prefix: String,
    keep: bool,
}

impl Lab {
    /// Builds the topology; on any error removes what it made.
    pub fn up(prefix: &str) -> Result<Lab, LabError> {
        let lab = Lab { prefix: prefix.to_string(), keep: false };
        Lab::down(prefix)?;
        lab.build()?;
        Ok(lab)
    }

    fn build(&self) -> Result<(), LabError> {
        for role in ROLES {
            ip(&["netns", "add", &self.ns(role)])?;
            ip(&["-n", &self.ns(role), "link", "set", "lo", "up"])?;
        }
        let (gw, sw, int1, int2, ext1) =
            (self.ns("gw"), self.ns("sw"), self.ns("int1"), self.ns("int2"), self.ns("ext1"));
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        let pair = |a: &str, ans: &str, b: &str, bns: &str| {
            ip(&["link", "add", "name", a, "netns", ans, "type", "veth", "peer", "name", b, "netns", bns])
        };
        pair(LAN_IF, &gw, "gw", &sw)?;
        pair("eth0", &int1, "int1", &sw)?;
        pair("eth0", &int2, "int2", &sw)?;
        pair(EXT_IF, &gw, "eth0", &ext1)?;
        for port in ["gw", "int1", "int2"] {
            ip(&["-n", &sw, "link", "set", port, "master", "br0", "up"])?;
        }
        ip(&["-n", &gw, "addr", "add", &format!("{GW_LAN_IP}/24"), "dev", LAN_IF])?;
        ip(&["-n", &gw, "link", "set", LAN_IF, "up"])?;
        ip(&["-n", &gw, "link", "set", EXT_IF, "up"])?;
        for (ns, addr) in [(&int1, INT1_IP), (&int2, INT2_IP)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", ns, "route", "add", "default", "via", GW_LAN_IP])?;
        }
        ip(&["-n", &ext1, "addr", "add", &format!("{EXT1_IP}/24"), "dev", "eth0"])?;
        ip(&["-n", &ext1, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// Turns the gateway's LAN side into a bridge with an address, as on
    /// many real gateways: `lan0` becomes a bridge holding 10.77.0.1 with
    /// the former veth (`lan0p`) as its port. A bridge with an address
    /// sends the gateway's own IGMP reports and receives the LAN's
    /// multicast and broadcast.
    pub fn bridge_lan(&self) -> Result<(), LabError> {
        let gw = self.ns("gw");
        let n = |args: &[&str]| {
            let mut all = vec!["-n", gw.as_str()];
            all.extend_from_slice(args);
            ip(&all)
        };
        n(&["addr", "flush", "dev", LAN_IF])?;
        n(&["link", "set", LAN_IF, "down"])?;
        n(&["link", "set", LAN_IF, "name", "lan0p"])?;
        n(&["link", "add", LAN_IF, "type", "bridge"])?;
        n(&["link", "set", "lan0p", "master", LAN_IF, "up"])?;
        n(&["link", "set", LAN_IF, "up"])?;
        n(&["addr", "add", &format!("{GW_LAN_IP}/24"), "dev", LAN_IF])
    }

    /// Gives the gateway a third interface, as a gateway pod's eth0 (the
    /// cluster network): `c0` 10.244.9.1/24 to a host `pod` at
    /// 10.244.9.2, which routes the VPC back through the gateway (the
    /// worst case: a reply would find its way).
    pub fn cluster_side(&self) -> Result<(), LabError> {
        let (gw, pod) = (self.ns("gw"), self.ns("pod"));
        ip(&["netns", "add", &pod])?;
        ip(&["-n", &pod, "link", "set", "lo", "up"])?;
        ip(&["link", "add", "name", POD_IF, "netns", &gw, "type", "veth", "peer", "name", "eth0", "netns", &pod])?;
        ip(&["-n", &gw, "addr", "add", &format!("{POD_GW_IP}/24"), "dev", POD_IF])?;
        ip(&["-n", &gw, "link", "set", POD_IF, "up"])?;
        ip(&["-n", &pod, "addr", "add", &format!("{POD_PEER_IP}/24"), "dev", "eth0"])?;
        ip(&["-n", &pod, "link", "set", "eth0", "up"])?;
        ip(&["-n", &pod, "route", "add", LAN_CIDR, "via", POD_GW_IP])?;
        ip(&["-n", &pod, "route", "add", EXT_CIDR, "via", POD_GW_IP])
    }

    /// A second gateway replica, `PREFIX-gw2`, on the same two segments:
    /// its `lan0` is a port of the LAN bridge, and the external side
    /// becomes a bridge `br1` in `PREFIX-sw` joining both gateways' `ext0`
    /// and the external host. Each replica gets its own LAN address
    /// (`GW1_OWN_LAN_IP`, `GW2_OWN_LAN_IP`); `GW_LAN_IP`, the hosts' next
    /// hop, is left to the active replica (`examples-ha`). A veth `ha0`
    /// joins the two directly for the heartbeat (`GW1_HA_IP`,
    /// `GW2_HA_IP`). Both replicas' MACs differ, so neighbours see a
    /// takeover.
    pub fn second_gateway(&self) -> Result<(), LabError> {
        let (gw, gw2, sw, ext1) = (self.ns("gw"), self.ns("gw2"), self.ns("sw"), self.ns("ext1"));
        ip(&["netns", "add", &gw2])?;
        ip(&["-n", &gw2, "link", "set", "lo", "up"])?;
        let pair = |a: &str, ans: &str, b: &str, bns: &str| {
            ip(&["link", "add", "name", a, "netns", ans, "type", "veth", "peer", "name", b, "netns", bns])
        };
        pair(LAN_IF, &gw2, "gw2", &sw)?;
        ip(&["-n", &sw, "link", "set", "gw2", "master", "br0", "up"])?;
        // The external link becomes a segment.
        ip(&["-n", &gw, "link", "del", EXT_IF])?;
        ip(&["-n", &sw, "link", "add", "br1", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br1", "up"])?;
        pair(EXT_IF, &gw, "gwx", &sw)?;
        pair(EXT_IF, &gw2, "gw2x", &sw)?;
        pair("eth0", &ext1, "ext1", &sw)?;
        for port in ["gwx", "gw2x", "ext1"] {
            ip(&["-n", &sw, "link", "set", port, "master", "br1", "up"])?;
        }
        for ns in [&gw, &gw2] {
            ip(&["-n", ns, "link", "set", EXT_IF, "up"])?;
            ip(&["-n", ns, "link", "set", LAN_IF, "up"])?;
        }
        ip(&["-n", &ext1, "addr", "add", &format!("{EXT1_IP}/24"), "dev", "eth0"])?;
        ip(&["-n", &ext1, "link", "set", "eth0", "up"])?;
        // The LAN address now moves with the active (a gateway with
        // `replicas: 2` holds it); each replica has its own beside it.
        ip(&["-n", &gw, "addr", "del", &format!("{GW_LAN_IP}/24"), "dev", LAN_IF])?;
        ip(&["-n", &gw, "addr", "add", &format!("{GW1_OWN_LAN_IP}/24"), "dev", LAN_IF])?;
        ip(&["-n", &gw2, "addr", "add", &format!("{GW2_OWN_LAN_IP}/24"), "dev", LAN_IF])?;
        pair(HA_IF, &gw, HA_IF, &gw2)?;
        for (ns, addr) in [(&gw, GW1_HA_IP), (&gw2, GW2_HA_IP)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", HA_IF])?;
            ip(&["-n", ns, "link", "set", HA_IF, "up"])?;
        }
        Ok(())
    }

    /// Namespace name of a role: gw, sw, int1, int2, ext1 (or pod, gw2).
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Leaves the namespaces in place when the handle goes.
    pub fn keep(mut self) -> Self {
        self.keep = true;
        self
    }

    /// Removes every namespace of a lab with this prefix, if present.
    pub fn down(prefix: &str) -> Result<(), LabError> {
        for role in ROLES.iter().chain(&OPTIONAL_ROLES) {
            let ns = format!("{prefix}-{role}");
            if std::path::Path::new("/run/netns").join(&ns).exists() {
                ip(&["netns", "del", &ns])?;
            }
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.keep {
            let _ = Lab::down(&self.prefix);
        }
    }
}
