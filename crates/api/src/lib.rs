//! The `natgw.io/v1alpha1` API: the objects operators write, the checks that
//! belong to a single object, the checks between objects, and loading them
//! from YAML manifests. The same types back the CRDs and the standalone mode.

mod crd;
mod manifest;
mod objects;
mod types;
mod validate;

pub use crd::{crds, crds_yaml};
pub use manifest::{LoadError, Source, load_path, load_str, load_texts, manifest_files, parse_object};
pub use objects::{KINDS, Object, ObjectRef, ObjectSet, age_key};
pub use types::*;
pub use validate::{FieldError, SetError, parse_ip_range, validate_object, validate_set};

/// The API group of every natgw kind.
pub const GROUP: &str = "natgw.io";
/// The only version served so far.
pub const VERSION: &str = "v1alpha1";

/// The gateway agent's finalizer for NatGateway `gw`: "this object's state
/// may be in that gateway's kernel".
pub fn gateway_finalizer(gw: &str) -> String {
    // The part after the slash is a qualified name of at most 63 bytes.
    let mut name = format!("gateway-{gw}");
    name.truncate(63);
    format!("natgw.io/{}", name.trim_end_matches(['-', '.']))
}

/// Label the controller puts on every Eip and rule: the gateway that
/// programs it. Each agent watches only objects with its own value.
pub const GATEWAY_LABEL: &str = "natgw.io/gateway";

/// Prefix shared by every gateway agent's finalizer.
pub const GATEWAY_FINALIZER_PREFIX: &str = "natgw.io/gateway-";
