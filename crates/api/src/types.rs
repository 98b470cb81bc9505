//! Cluster-scoped custom resources. Field names are the contract shared by
//! manifests, CRDs and the controller: rename nothing without a new version.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Status shared by kinds that only report how they were handled.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommonStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Keyed by type, so the controller and the gateway agent each own
    /// their own conditions under server-side apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// A routing domain. Subnets and NAT gateways belong to one.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[kube(group = "natgw.io", version = "v1alpha1", kind = "Vpc", shortname = "vpc")]
#[kube(status = "VpcStatus")]
#[kube(printcolumn = r#"{"name":"Subnets","type":"string","jsonPath":".status.subnets"}"#)]
#[kube(printcolumn = r#"{"name":"Gateways","type":"string","jsonPath":".status.gateways"}"#)]
#[serde(rename_all = "camelCase")]
pub struct VpcSpec {
    /// Free text for operators; natgw does not interpret it (at most 1,024
    /// characters: every controller and agent caches it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VpcStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    #[serde(flatten)]
    pub common: CommonStatus,
}

/// An IPv4 subnet. With `vpc` it is a VPC-side subnet; without, it can be a
/// gateway's external subnet (where EIPs come from).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(group = "natgw.io", version = "v1alpha1", kind = "Subnet", shortname = "subnet")]
#[kube(status = "CommonStatus")]
#[kube(printcolumn = r#"{"name":"CIDR","type":"string","jsonPath":".spec.cidr"}"#)]
#[kube(printcolumn = r#"{"name":"Gateway","type":"string","jsonPath":".spec.gateway"}"#)]
#[kube(printcolumn = r#"{"name":"VPC","type":"string","jsonPath":".spec.vpc"}"#)]
// A gateway agent watches only its VPC's subnets (`spec.vpc=V`) and the
// external ones (`spec.vpc=`: an absent field reads as empty).
#[kube(selectable = ".spec.vpc")]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("cidr(self.cidr).containsIP(self.gateway)").message("spec.gateway must lie inside spec.cidr"))]
#[x_kube(validation = Rule::new("!has(self.excludeIps) || self.excludeIps.all(x, x.split('..').all(p, !isIP(p) || cidr(self.cidr).containsIP(p)))").message("spec.excludeIps: every address must lie inside spec.cidr"))]
#[x_kube(validation = Rule::new("cidr(self.cidr) == cidr(self.cidr).masked()").message("spec.cidr has host bits set"))]
#[x_kube(validation = Rule::new("self.cidr == oldSelf.cidr").message("spec.cidr is immutable"))]
pub struct SubnetSpec {
    #[x_kube(validation = Rule::new("isCIDR(self) && cidr(self).ip().family() == 4 && string(cidr(self)) == self").message("must be an IPv4 CIDR in canonical form"))]
    #[schemars(length(max = 18))]
    pub cidr: Ipv4Net,
    #[x_kube(validation = Rule::new("isIP(self) && ip(self).family() == 4 && ip.isCanonical(self)").message("must be an IPv4 address in canonical form (no leading zeros, no IPv6 notation)"))]
    #[schemars(length(max = 15))]
    pub gateway: Ipv4Addr,
    /// Addresses never handed out: single IPs (`10.0.0.5`) or inclusive
    /// ranges (`10.0.0.10..10.0.0.20`). CIDRs are not accepted: write a
    /// network as a range.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 33)))]
    #[x_kube(validation = Rule::new("self.all(x, x.split('..').size() <= 2 && x.split('..').all(p, isIP(p) && ip(p).family() == 4 && ip.isCanonical(p)))").message("each entry must be an IPv4 address or a range A..B of canonical IPv4 addresses (no CIDRs)"))]
    // CEL has no order on addresses: each side as its 32-bit number.
    #[x_kube(validation = Rule::new(REVERSED_RANGE).message("a range A..B must not end before it starts"))]
    pub exclude_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpc: Option<String>,
}

/// An `excludeIps` range's first address is not above its last. An entry
/// that is not two IPv4 addresses fails to evaluate here and is refused
/// by name by the rule before (a guard would exceed the cost budget).
const REVERSED_RANGE: &str = "self.all(x, x.split('..').size() != 2 \
    || x.split('..').map(p, p.split('.')).map(o, int(o[0]) * 16777216 + int(o[1]) * 65536 + int(o[2]) * 256 + int(o[3]))[0] \
    <= x.split('..').map(p, p.split('.')).map(o, int(o[0]) * 16777216 + int(o[1]) * 65536 + int(o[2]) * 256 + int(o[3]))[1])";

/// A static route on the gateway's VPC side.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("cidr(self.cidr) == cidr(self.cidr).masked()").message("cidr has host bits set"))]
pub struct GatewayRoute {
    #[x_kube(validation = Rule::new("isCIDR(self) && cidr(self).ip().family() == 4 && string(cidr(self)) == self").message("must be an IPv4 CIDR in canonical form"))]
    #[schemars(length(max = 18))]
    pub cidr: Ipv4Net,
    #[x_kube(validation = Rule::new("isIP(self) && ip(self).family() == 4 && ip.isCanonical(self)").message("must be an IPv4 address in canonical form (no leading zeros, no IPv6 notation)"))]
    #[schemars(length(max = 15))]
    #[x_kube(validation = Rule::new("ip(self).isGlobalUnicast()").message("must be a unicast address (not loopback, link-local, multicast, broadcast or unspecified)"))]
    pub next_hop: Ipv4Addr,
}

/// The NAT gateway of a VPC: one network namespace with a LAN interface on
/// the VPC side and an external interface on the external subnet.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(group = "natgw.io", version = "v1alpha1", kind = "NatGateway", shortname = "ngw")]
#[kube(validation = Rule::new("self.metadata.name.size() <= 63").message("metadata.name: a NatGateway name has at most 63 characters (it is a label value)"))]
#[kube(status = "CommonStatus")]
#[kube(printcolumn = r#"{"name":"VPC","type":"string","jsonPath":".spec.vpc"}"#)]
#[kube(printcolumn = r#"{"name":"External","type":"string","jsonPath":".spec.externalSubnet"}"#)]
#[kube(printcolumn = r#"{"name":"LAN IP","type":"string","jsonPath":".spec.lanIp"}"#)]
#[kube(
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"WorkloadReady\")].status"}"#
)]
#[kube(
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"WorkloadReady\")].reason"}"#
)]
#[kube(
    printcolumn = r#"{"name":"Image Current","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"ImageCurrent\")].status"}"#
)]
#[kube(printcolumn = r#"{"name":"Replicas","type":"integer","priority":1,"jsonPath":".spec.replicas"}"#)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.lanInterface != self.externalInterface").message("spec.externalInterface must differ from spec.lanInterface"))]
#[x_kube(validation = Rule::new("self.vpc == oldSelf.vpc").message("spec.vpc is immutable"))]
#[x_kube(validation = Rule::new("!has(self.replicas) || self.replicas == 1 || has(self.lanIp)").message("spec.lanIp is required with spec.replicas above 1: it is the address the active replica holds and a takeover moves"))]
pub struct NatGatewaySpec {
    pub vpc: String,
    /// Letters, digits, `_`, `.` and `-`, starting with a letter or digit
    /// (no `*` or `\\`, which nft reads as wildcards).
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$"), length(min = 1, max = 15))]
    pub lan_interface: String,
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$"), length(min = 1, max = 15))]
    pub external_interface: String,
    /// A Subnet name: its CIDR gives the EIP prefix length, its gateway the
    /// default route.
    pub external_subnet: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub routes: Vec<GatewayRoute>,
    /// The NetworkAttachmentDefinition (`namespace/name`) that gives the
    /// gateway pod its external interface; without it, the controller's
    /// default (`--gateway-external-network`). Standalone mode ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"), length(max = 317))]
    pub external_network: Option<String>,
    /// The NetworkAttachmentDefinition (`namespace/name`) of the VPC side:
    /// it gives the gateway pod its LAN interface. Without it the pod has
    /// no LAN interface unless something else adds one. Standalone mode
    /// ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"), length(max = 317))]
    pub lan_network: Option<String>,
    /// The gateway's fixed address on the VPC side, inside one of the VPC's
    /// subnets: VPC hosts route through it. The controller asks for it in
    /// the LAN attachment (the NetworkAttachmentDefinition's IPAM must be
    /// `static`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isIP(self) && ip(self).family() == 4 && ip.isCanonical(self)").message("must be an IPv4 address in canonical form (no leading zeros, no IPv6 notation)"))]
    #[schemars(length(max = 15))]
    #[x_kube(validation = Rule::new("ip(self).isGlobalUnicast()").message("must be a unicast address (not loopback, link-local, multicast, broadcast or unspecified)"))]
    pub lan_ip: Option<Ipv4Addr>,
    /// How many replicas run the gateway: 1, or 2 for an active and a
    /// standby on another node that holds every translation and the
    /// active's connections, and takes over the EIPs and `lanIp` when the
    /// active fails. Absent means 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2))]
    pub replicas: Option<u8>,
}

impl NatGatewaySpec {
    /// The replicas asked for (absent: one).
    pub fn replica_count(&self) -> u8 {
        self.replicas.unwrap_or(1)
    }
}

/// An elastic IP on a gateway's external interface.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(group = "natgw.io", version = "v1alpha1", kind = "Eip", shortname = "eip")]
#[kube(status = "EipStatus")]
#[kube(printcolumn = r#"{"name":"Gateway","type":"string","jsonPath":".spec.gateway"}"#)]
#[kube(printcolumn = r#"{"name":"IP","type":"string","jsonPath":".status.ip"}"#)]
#[kube(printcolumn = r#"{"name":"UsedBy","type":"string","jsonPath":".status.usedBy"}"#)]
#[kube(
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.gateway == oldSelf.gateway").message("spec.gateway is immutable"))]
#[x_kube(validation = Rule::new("!has(oldSelf.ip) || (has(self.ip) && self.ip == oldSelf.ip)").message("spec.ip is immutable once set"))]
pub struct EipSpec {
    /// The NatGateway's name; it becomes the label value
    /// `natgw.io/gateway` on the Eip and its rules.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("must name a NatGateway: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit (it becomes a label value)"))]
    #[schemars(length(max = 63))]
    pub gateway: String,
    /// Fixed address; empty means the controller allocates one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isIP(self) && ip(self).family() == 4 && ip.isCanonical(self)").message("must be an IPv4 address in canonical form (no leading zeros, no IPv6 notation)"))]
    #[schemars(length(max = 15))]
    #[x_kube(validation = Rule::new("ip(self).isGlobalUnicast()").message("must be a unicast address (not loopback, link-local, multicast, broadcast or unspecified)"))]
    pub ip: Option<Ipv4Addr>,
    /// The internal networks rules on this Eip may reach: a FloatingIp's
    /// or DnatRule's `internalIp`, a SnatRule's `internalCidr`. Empty: the
    /// whole VPC. In a VPC shared by tenants, the platform admin lists
    /// each tenant's networks here: `use` on the Eip grants the EIP, this
    /// list the hosts behind it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 18)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c) && cidr(c).ip().family() == 4 && string(cidr(c)) == c && cidr(c) == cidr(c).masked())").message("each entry must be an IPv4 CIDR in canonical form without host bits"))]
    pub internal_cidrs: Vec<Ipv4Net>,
}

impl Eip {
    /// The address this Eip asks for: its fixed `spec.ip`, else what the
    /// controller allocated into `status.ip`. The one rule for it: the
    /// controller claims it, the agent checks the claim
    /// (`natgw_kube_support::claims::held_address`), the planner uses it.
    pub fn address(&self) -> Option<Ipv4Addr> {
        self.spec.ip.or_else(|| self.status.as_ref().and_then(|s| s.ip))
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EipStatus {
    /// The address in force (equal to `spec.ip` when that is set). Held to
    /// the same form as `spec.ip`: `format: ipv4` alone let in `010.0.0.5`,
    /// which natgw cannot read, and the Eip dropped out of every cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isIP(self) && ip(self).family() == 4 && ip.isCanonical(self)").message("must be an IPv4 address in canonical form (no leading zeros, no IPv6 notation)"))]
    #[schemars(length(max = 15))]
    pub ip: Option<Ipv4Addr>,
    /// Kinds of rules using this EIP, e.g. `fip` or `dnat,snat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by: Option<String>,
    #[serde(flatten)]
    pub common: CommonStatus,
}

/// 1:1 NAT between an EIP and one internal address, both directions.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(group = "natgw.io", version = "v1alpha1", kind = "FloatingIp", shortname = "fip")]
#[kube(status = "CommonStatus")]
#[kube(printcolumn = r#"{"name":"EIP","type":"string","jsonPath":".spec.eip"}"#)]
#[kube(printcolumn = r#"{"name":"InternalIP","type":"string","jsonPath":".spec.internalIp"}"#)]
#[kube(
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.eip == oldSelf.eip").message("spec.eip is immutable: delete the rule and create a new one"))]
pub struct FloatingIpSpec {
    pub eip: String,
    #[x_kube(validation = Rule::new("isIP(self) && ip(self).family() == 4 && ip.isCanonical(self)").message("must be an IPv4 address in canonical form (no leading zeros, no IPv6 notation)"))]
    #[schemars(length(max = 15))]
    #[x_kube(validation = Rule::new("ip(self).isGlobalUnicast()").message("must be a unicast address (not loopback, link-local, multicast, broadcast or unspecified)"))]
    pub internal_ip: Ipv4Addr,
}

/// Source NAT of a VPC CIDR to an EIP. Between overlapping rules the
/// longest prefix wins.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(group = "natgw.io", version = "v1alpha1", kind = "SnatRule", shortname = "snat")]
#[kube(status = "CommonStatus")]
#[kube(printcolumn = r#"{"name":"EIP","type":"string","jsonPath":".spec.eip"}"#)]
#[kube(printcolumn = r#"{"name":"InternalCIDR","type":"string","jsonPath":".spec.internalCidr"}"#)]
#[kube(
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("cidr(self.internalCidr) == cidr(self.internalCidr).masked()").message("spec.internalCidr has host bits set"))]
#[x_kube(validation = Rule::new("self.eip == oldSelf.eip").message("spec.eip is immutable: delete the rule and create a new one"))]
pub struct SnatRuleSpec {
    pub eip: String,
    #[x_kube(validation = Rule::new("isCIDR(self) && cidr(self).ip().family() == 4 && string(cidr(self)) == self").message("must be an IPv4 CIDR in canonical form"))]
    #[schemars(length(max = 18))]
    pub internal_cidr: Ipv4Net,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A port forward from `eip:externalPort` to `internalIp:internalPort`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(group = "natgw.io", version = "v1alpha1", kind = "DnatRule", shortname = "dnat")]
#[kube(status = "CommonStatus")]
#[kube(printcolumn = r#"{"name":"EIP","type":"string","jsonPath":".spec.eip"}"#)]
#[kube(printcolumn = r#"{"name":"Protocol","type":"string","jsonPath":".spec.protocol"}"#)]
#[kube(printcolumn = r#"{"name":"ExternalPort","type":"integer","jsonPath":".spec.externalPort"}"#)]
#[kube(printcolumn = r#"{"name":"InternalIP","type":"string","jsonPath":".spec.internalIp"}"#)]
#[kube(printcolumn = r#"{"name":"InternalPort","type":"integer","jsonPath":".spec.internalPort"}"#)]
#[kube(
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.externalPort >= 1 && self.internalPort >= 1").message("spec.externalPort and spec.internalPort must be between 1 and 65535"))]
#[x_kube(validation = Rule::new("self.eip == oldSelf.eip").message("spec.eip is immutable: delete the rule and create a new one"))]
pub struct DnatRuleSpec {
    pub eip: String,
    pub protocol: Protocol,
    pub external_port: u16,
    #[x_kube(validation = Rule::new("isIP(self) && ip(self).family() == 4 && ip.isCanonical(self)").message("must be an IPv4 address in canonical form (no leading zeros, no IPv6 notation)"))]
    #[schemars(length(max = 15))]
    #[x_kube(validation = Rule::new("ip(self).isGlobalUnicast()").message("must be a unicast address (not loopback, link-local, multicast, broadcast or unspecified)"))]
    pub internal_ip: Ipv4Addr,
    pub internal_port: u16,
}

/// The cluster's pod and service networks, which no VPC subnet, rule
/// target or SNAT source may touch: the parameter of the admission policy
/// `natgw-cluster-networks` (one object, named `natgw`). A CRD rather than
/// a ConfigMap: kube-apiserver keeps one shared informer per built-in
/// parameter kind and never restarts it once the last binding using it is
/// deleted, so a `helm uninstall` and reinstall would leave every natgw
/// write refused until the API server restarts (kubernetes#133827).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[kube(group = "natgw.io", version = "v1alpha1", kind = "ClusterNetworks", plural = "clusternetworks")]
#[kube(printcolumn = r#"{"name":"CIDRs","type":"string","jsonPath":".spec.cidrs"}"#)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworksSpec {
    /// Pod and service CIDRs (kube-controller-manager --cluster-cidr,
    /// kube-apiserver --service-cluster-ip-range).
    #[schemars(length(min = 1, max = 64), inner(length(max = 43)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c))").message("each entry must be a CIDR such as 10.244.0.0/16"))]
    pub cidrs: Vec<String>,
}
