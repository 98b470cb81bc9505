//! Pure planning. `plan_gateway` turns a set of objects into the complete
//! desired state of one gateway: the addresses on its external interface,
//! its routes and the content of its NAT tables. No I/O happens here, so
//! every rule about conflicts and precedence is tested without a kernel.
//! `GatewayPlanner` keeps that plan up to date in O(change).

pub mod egress;
mod gateway;
mod incremental;
mod snat;
mod state;

pub use egress::{EgressInput, EgressPlan, EgressService, EgressTables, ServiceState, plan_egress};
pub use gateway::{PlanError, merge_ranges, plan_gateway};
pub use incremental::GatewayPlanner;
pub use snat::{SnatRange, longest_prefix_ranges};
pub use state::{Conflict, GatewayPlan, IfAddr, NatTables, PortKey, Route, Target, holds_address};
