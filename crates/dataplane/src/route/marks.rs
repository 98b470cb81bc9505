//! natgw's marks and places in the routing system, in one place: the
//! protocol number its addresses and routes carry, its routing table, and
//! the policy rules that send LAN traffic there. `link` writes them,
//! `state` compares them.

use std::collections::BTreeSet;
use std::fmt;

use natgw_plan::GatewayPlan;

/// "n" for natgw; unused by the kernel and by common routing daemons.
pub const NATGW_PROTO: u8 = 110;
/// natgw's routing table: the gateway's default route, used only by
/// traffic from the LAN (see [`LanRule`]).
pub const NATGW_TABLE: u32 = 7476;

/// A policy rule for traffic arriving on the LAN: natgw's default route
/// lives in its own table ([`NATGW_TABLE`]), so the gateway
/// pod's own default route (to the cluster network, the API server) stays
/// as it is and only VPC traffic leaves through the external side.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LanRule {
    pub priority: u32,
    pub iif: String,
}

/// Before the main table's default: the main table without its default
/// routes (connected and VPC routes still win).
pub const RULE_MAIN: u32 = 7470;
/// Then natgw's table, which holds only the default route.
pub const RULE_EXIT: u32 = 7471;

/// The rules a plan needs: none without a default route.
pub fn wanted_rules(plan: &GatewayPlan) -> BTreeSet<LanRule> {
    if !plan.routes.iter().any(|r| r.dst.prefix_len() == 0) {
        return BTreeSet::new();
    }
    [RULE_MAIN, RULE_EXIT].map(|priority| LanRule { priority, iif: plan.lan_interface.clone() }).into()
}

impl fmt::Display for LanRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.priority {
            RULE_MAIN => write!(f, "rule {} iif {} lookup main suppress_prefixlength 0", self.priority, self.iif),
            p => write!(f, "rule {p} iif {} lookup {}", self.iif, NATGW_TABLE),
        }
    }
}
