//! What natgw needs to know about each of its kinds, as Rust types.

use std::fmt::Debug;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Resource;
use kube::core::ClusterResourceScope;
use natgw_api::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A natgw kind as a Kubernetes resource: cluster-scoped, with conditions
/// in its status.
pub trait KindResource:
    Resource<DynamicType = (), Scope = ClusterResourceScope>
    + Clone
    + DeserializeOwned
    + Serialize
    + Debug
    + Send
    + Sync
    + 'static
{
    const KIND: Kind;
    fn conditions(&self) -> &[Condition];
    /// Its status's conditions, if it has a status.
    fn conditions_mut(&mut self) -> Option<&mut Vec<Condition>>;
    /// The object as its own type, for code that differs per kind.
    fn typed(&self) -> Typed<'_>;
}

/// A borrowed natgw object of any kind.
pub enum Typed<'a> {
    Vpc(&'a Vpc),
    Subnet(&'a Subnet),
    NatGateway(&'a NatGateway),
    Eip(&'a Eip),
    FloatingIp(&'a FloatingIp),
    SnatRule(&'a SnatRule),
    DnatRule(&'a DnatRule),
}

impl<'a> Typed<'a> {
    /// The Eip a rule names; `None` for the other kinds.
    pub fn rule_eip(&self) -> Option<&'a str> {
        match self {
            Typed::FloatingIp(f) => Some(&f.spec.eip),
            Typed::SnatRule(s) => Some(&s.spec.eip),
            Typed::DnatRule(d) => Some(&d.spec.eip),
            Typed::Vpc(_) | Typed::Subnet(_) | Typed::NatGateway(_) | Typed::Eip(_) => None,
        }
    }
}

macro_rules! kind {
    ($t:ident, $($field:ident).+) => {
        impl KindResource for $t {
            const KIND: Kind = Kind::$t;
            fn conditions(&self) -> &[Condition] {
                self.status.as_ref().map(|s| s.$($field).+.as_slice()).unwrap_or_default()
            }
            fn conditions_mut(&mut self) -> Option<&mut Vec<Condition>> {
                self.status.as_mut().map(|s| &mut s.$($field).+)
            }
            fn typed(&self) -> Typed<'_> {
                Typed::$t(self)
            }
        }
    };
}
kind!(Vpc, common.conditions);
kind!(Subnet, conditions);
kind!(NatGateway, conditions);
kind!(Eip, common.conditions);
kind!(FloatingIp, conditions);
kind!(SnatRule, conditions);
kind!(DnatRule, conditions);

/// Calls the generic `f::<K>(args)` for the type of `kind` (an
/// `natgw_api::Kind` known only at run time), awaiting it.
#[macro_export]
macro_rules! with_kind {
    ($kind:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $kind {
            natgw_api::Kind::Vpc => $f::<natgw_api::Vpc>($($arg),*).await,
            natgw_api::Kind::Subnet => $f::<natgw_api::Subnet>($($arg),*).await,
            natgw_api::Kind::NatGateway => $f::<natgw_api::NatGateway>($($arg),*).await,
            natgw_api::Kind::Eip => $f::<natgw_api::Eip>($($arg),*).await,
            natgw_api::Kind::FloatingIp => $f::<natgw_api::FloatingIp>($($arg),*).await,
            natgw_api::Kind::SnatRule => $f::<natgw_api::SnatRule>($($arg),*).await,
            natgw_api::Kind::DnatRule => $f::<natgw_api::DnatRule>($($arg),*).await,
        }
    };
}
