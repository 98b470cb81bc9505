//! Routes, EIPs, policy rules and addresses over rtnetlink. Everything
//! natgw adds carries protocol number `NATGW_PROTO` (rtm_protocol on
//! routes, FRA_PROTOCOL on rules, IFA_PROTO on the interface addresses
//! earlier versions used for EIPs): that mark is how natgw knows what it
//! owns, and it never removes anything without it. The marks, natgw's
//! routing table and its policy rules are in `marks`; gratuitous ARP for
//! new EIPs is `garp`; ARP probes for who holds an address, `probe`.

pub mod garp;
pub mod marks;
pub mod probe;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use futures::{StreamExt, TryStreamExt};
use ipnet::Ipv4Net;
use natgw_plan::{IfAddr, Route};
use rtnetlink::IpVersion;
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};

use crate::route::marks::{LanRule, NATGW_PROTO, NATGW_TABLE, RULE_MAIN};
use rtnetlink::packet_route::address::{AddressAttribute, AddressProtocol};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteProtocol, RouteScope, RouteType};
use rtnetlink::{Handle, RouteMessageBuilder};

/// Netlink requests in flight at once.
const IN_FLIGHT: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("netlink: {0}")]
    Io(#[from] std::io::Error),
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("rtnetlink did not answer within {0:?}")]
    TimedOut(std::time::Duration),
    #[error("interface {0:?} does not exist in the gateway's network namespace")]
    NoInterface(String),
}

/// An interface as natgw needs it.
#[derive(Clone, Debug)]
pub struct Interface {
    pub index: u32,
    pub mac: Option<[u8; 6]>,
    /// Administratively up with a carrier: it can carry traffic.
    pub up: bool,
}

/// A netlink connection bound to the namespace of the thread that opened it.
pub struct Links {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

impl Links {
    /// Must be called on the namespace's worker thread.
    pub fn open() -> Result<Self, LinkError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            Ok::<_, std::io::Error>(handle)
        })?;
        Ok(Links { rt, handle })
    }

    /// Runs one request to its end, or fails at the deadline.
    fn block<T>(&self, f: impl std::future::Future<Output = Result<T, LinkError>>) -> Result<T, LinkError> {
        self.rt.block_on(async {
            tokio::time::timeout(crate::deadline::NETLINK, f)
                .await
                .map_err(|_| LinkError::TimedOut(crate::deadline::NETLINK))?
        })
    }

    /// Every interface by name.
    pub fn interfaces(&self) -> Result<BTreeMap<String, Interface>, LinkError> {
        self.block(async {
            let mut out = BTreeMap::new();
            let mut links = self.handle.link().get().execute();
            while let Some(msg) = links.try_next().await? {
                let mut name = None;
                let mut mac = None;
                for a in &msg.attributes {
                    match a {
                        LinkAttribute::IfName(n) => name = Some(n.clone()),
                        LinkAttribute::Address(m) if m.len() == 6 => mac = <[u8; 6]>::try_from(m.as_slice()).ok(),
                        _ => {}
                    }
                }
                if let Some(name) = name {
                    let flags = msg.header.flags;
                    let up = flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::LowerUp);
                    out.insert(name, Interface { index: msg.header.index, mac, up });
                }
            }
            Ok(out)
        })
    }

    /// IPv4 addresses on all interfaces: (address, owned by natgw).
    pub fn addresses(&self, names: &BTreeMap<u32, String>) -> Result<BTreeMap<IfAddr, bool>, LinkError> {
        self.block(async {
            let mut out = BTreeMap::new();
            let mut addrs = self.handle.address().get().execute();
            while let Some(msg) = addrs.try_next().await? {
                let mut ip = None;
                let mut owned = false;
                for a in &msg.attributes {
                    match a {
                        AddressAttribute::Local(IpAddr::V4(v)) => ip = Some(*v),
                        AddressAttribute::Address(IpAddr::V4(v)) if ip.is_none() => ip = Some(*v),
                        AddressAttribute::Protocol(p) => owned = u8::from(*p) == NATGW_PROTO,
                        _ => {}
                    }
                }
                let (Some(ip), Some(name)) = (ip, names.get(&msg.header.index)) else { continue };
                let Ok(addr) = Ipv4Net::new(ip, msg.header.prefix_len) else { continue };
                out.insert(IfAddr { interface: name.as_str().into(), addr }, owned);
            }
            Ok(out)
        })
    }

    /// Adds addresses marked as natgw's, many requests in flight. The
    /// kernel's own cost dominates: each address added to an interface
    /// costs time proportional to the addresses already on it.
    pub fn add_addresses(&self, items: &[(u32, Ipv4Net)]) -> Result<(), LinkError> {
        self.block(async {
            futures::stream::iter(items.iter().map(|(index, addr)| {
                let mut req = self.handle.address().add(*index, IpAddr::V4(addr.addr()), addr.prefix_len());
                req.message_mut().attributes.push(AddressAttribute::Protocol(AddressProtocol::Other(NATGW_PROTO)));
                async move { req.execute().await.or_else(ignore_errno(libc::EEXIST)) }
            }))
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<()>()
            .await
        })
    }

    pub fn del_addresses(&self, items: &[(u32, Ipv4Net)]) -> Result<(), LinkError> {
        self.block(async {
            futures::stream::iter(items.iter().map(|(index, addr)| {
                let msg = rtnetlink::AddressMessageBuilder::<Ipv4Addr>::new()
                    .index(*index)
                    .address(addr.addr(), addr.prefix_len())
                    .build();
                let req = self.handle.address().del(msg);
                async move { req.execute().await.or_else(ignore_errno(libc::EADDRNOTAVAIL)) }
            }))
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<()>()
            .await
        })
    }

    /// Everything natgw owns in the routing tables: its routes (the default
    /// in its own table, the others in main), its EIPs (local routes) and
    /// the subnets they sit in (link routes).
    pub fn owned_routes(&self, names: &BTreeMap<u32, String>) -> Result<OwnedRoutes, LinkError> {
        self.block(async {
            let mut out = OwnedRoutes::default();
            let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
            let mut routes = self.handle.route().get(filter).execute();
            while let Some(msg) = routes.try_next().await? {
                if msg.header.protocol != RouteProtocol::Other(NATGW_PROTO) {
                    continue;
                }
                let (mut dst, mut via, mut oif) = (Ipv4Addr::UNSPECIFIED, None, None);
                let mut table = u32::from(msg.header.table);
                for a in &msg.attributes {
                    match a {
                        RouteAttribute::Table(t) => table = *t,
                        RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = Some(*g),
                        RouteAttribute::Oif(i) => oif = names.get(i).cloned(),
                        _ => {}
                    }
                }
                let (Some(interface), Ok(dst)) = (oif, Ipv4Net::new(dst, msg.header.destination_prefix_length)) else {
                    continue;
                };
                match (via, msg.header.kind) {
                    (None, RouteType::Local) if table == TABLE_LOCAL => {
                        out.locals.insert(IfAddr { interface: interface.into(), addr: dst });
                    }
                    (None, RouteType::Unicast) if table == TABLE_MAIN => {
                        out.subnets.insert(IfAddr { interface: interface.into(), addr: dst });
                    }
                    (Some(via), RouteType::Unicast) if table == table_of(dst) => {
                        out.routes.insert(Route { dst, via, interface });
                    }
                    _ => {}
                }
            }
            Ok(out)
        })
    }

    /// Adds EIPs (`/32`, as local routes) or subnets (as link routes),
    /// many requests in flight: the kernel inserts each in time
    /// logarithmic in the table, where an interface address costs time
    /// proportional to the addresses already there.
    pub fn add_eip_routes(&self, kind: EipRoute, items: &[(u32, Ipv4Net)]) -> Result<(), LinkError> {
        self.eip_route_batch(kind, items, true)
    }

    pub fn del_eip_routes(&self, kind: EipRoute, items: &[(u32, Ipv4Net)]) -> Result<(), LinkError> {
        self.eip_route_batch(kind, items, false)
    }

    fn eip_route_batch(&self, kind: EipRoute, items: &[(u32, Ipv4Net)], add: bool) -> Result<(), LinkError> {
        // Already there, already gone: both count as done.
        let done = if add { libc::EEXIST } else { libc::ESRCH };
        self.block(async {
            futures::stream::iter(items.iter().map(|(index, dst)| {
                let msg = eip_route(kind, *index, *dst);
                let handle = self.handle.route();
                async move {
                    let sent = if add { handle.add(msg).execute().await } else { handle.del(msg).execute().await };
                    sent.or_else(ignore_errno(done))
                }
            }))
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<()>()
            .await
        })
    }

    pub fn add_route(&self, index: u32, r: &Route) -> Result<(), LinkError> {
        self.block(async {
            let msg = route_message(index, r);
            self.handle.route().add(msg).execute().await.or_else(ignore_errno(libc::EEXIST))
        })
    }

    pub fn del_route(&self, index: u32, r: &Route) -> Result<(), LinkError> {
        self.block(async {
            self.handle.route().del(route_message(index, r)).execute().await.or_else(ignore_errno(libc::ESRCH))
        })
    }
}

/// What natgw owns in the routing tables, read in one dump.
#[derive(Clone, Debug, Default)]
pub struct OwnedRoutes {
    pub routes: BTreeSet<Route>,
    /// EIPs: `local` routes (`/32`) in the local table. The kernel answers
    /// ARP for them and delivers what is not translated, as for an address.
    pub locals: BTreeSet<IfAddr>,
    /// The subnets of the EIPs, as link routes in the main table: what an
    /// interface address's connected route gave before.
    pub subnets: BTreeSet<IfAddr>,
}

#[derive(Clone, Copy, Debug)]
pub enum EipRoute {
    Local,
    Subnet,
}

const TABLE_MAIN: u32 = RouteHeader::RT_TABLE_MAIN as u32;
const TABLE_LOCAL: u32 = 255;
/// The metric of natgw's EIP and subnet routes: an operator's address
/// for the same EIP or subnet (metric 0) lives beside them, never
/// collides, and is never removed by natgw.
pub const NATGW_METRIC: u32 = 7476;

fn eip_route(kind: EipRoute, index: u32, dst: Ipv4Net) -> rtnetlink::packet_route::route::RouteMessage {
    let (table, scope, route_type) = match kind {
        EipRoute::Local => (TABLE_LOCAL, RouteScope::Host, RouteType::Local),
        EipRoute::Subnet => (TABLE_MAIN, RouteScope::Link, RouteType::Unicast),
    };
    RouteMessageBuilder::<Ipv4Addr>::new()
        .table_id(table)
        .destination_prefix(dst.network(), dst.prefix_len())
        .output_interface(index)
        .protocol(RouteProtocol::Other(NATGW_PROTO))
        .scope(scope)
        .kind(route_type)
        .priority(NATGW_METRIC)
        .build()
}

fn table_of(dst: Ipv4Net) -> u32 {
    if dst.prefix_len() == 0 { NATGW_TABLE } else { TABLE_MAIN }
}

fn route_message(index: u32, r: &Route) -> rtnetlink::packet_route::route::RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .table_id(table_of(r.dst))
        .destination_prefix(r.dst.network(), r.dst.prefix_len())
        .gateway(r.via)
        .output_interface(index)
        .protocol(RouteProtocol::Other(NATGW_PROTO))
        // On-link: the external next hop is reachable before any EIP (and
        // so any connected route) exists on the interface.
        .onlink()
        .build()
}

impl Links {
    /// IPv4 policy rules natgw owns (the LAN rules).
    pub fn owned_rules(&self) -> Result<BTreeSet<LanRule>, LinkError> {
        self.block(async {
            let mut out = BTreeSet::new();
            let mut rules = self.handle.rule().get(IpVersion::V4).execute();
            while let Some(msg) = rules.try_next().await? {
                let mut rule = (None, None, false);
                for a in &msg.attributes {
                    match a {
                        RuleAttribute::Protocol(p) => rule.2 = *p == RouteProtocol::Other(NATGW_PROTO),
                        RuleAttribute::Priority(p) => rule.0 = Some(*p),
                        RuleAttribute::Iifname(n) => rule.1 = Some(n.clone()),
                        _ => {}
                    }
                }
                if let (Some(priority), Some(iif), true) = rule {
                    out.insert(LanRule { priority, iif });
                }
            }
            Ok(out)
        })
    }

    pub fn add_rule(&self, r: &LanRule) -> Result<(), LinkError> {
        self.block(async {
            let table = if r.priority == RULE_MAIN { u32::from(RouteHeader::RT_TABLE_MAIN) } else { NATGW_TABLE };
            let mut req = self
                .handle
                .rule()
                .add()
                .v4()
                .priority(r.priority)
                .input_interface(r.iif.clone())
                .table_id(table)
                .action(RuleAction::ToTable);
            let msg = req.message_mut();
            msg.attributes.push(RuleAttribute::Protocol(RouteProtocol::Other(NATGW_PROTO)));
            if r.priority == RULE_MAIN {
                msg.attributes.push(RuleAttribute::SuppressPrefixLen(0));
            }
            req.execute().await.or_else(ignore_errno(libc::EEXIST))
        })
    }

    pub fn del_rule(&self, r: &LanRule) -> Result<(), LinkError> {
        self.block(async {
            let mut msg = RuleMessage::default();
            msg.header.family = rtnetlink::packet_route::AddressFamily::Inet;
            msg.attributes.push(RuleAttribute::Priority(r.priority));
            msg.attributes.push(RuleAttribute::Iifname(r.iif.clone()));
            msg.attributes.push(RuleAttribute::Protocol(RouteProtocol::Other(NATGW_PROTO)));
            self.handle.rule().del(msg).execute().await.or_else(ignore_errno(libc::ENOENT))
        })
    }
}

/// Treats one errno as success (already there, already gone).
fn ignore_errno(errno: i32) -> impl Fn(rtnetlink::Error) -> Result<(), LinkError> {
    move |e| match &e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno => Ok(()),
        _ => Err(e.into()),
    }
}
