//! The `natgw.io/v1alpha1` API: the objects operators write, the checks that
//! belong to a single object, the checks between objects, and loading them
//! from YAML manifests. The same types back the CRDs and the standalone mode.

mod crd;
mod held;
mod manifest;
mod objects;
mod own;
mod types;
mod validate;

pub use crd::{crds, crds_yaml};
pub use held::{AgeKey, Finalizers, Held, HeldEip, HeldOf, Meta, Name, Project, Uid};
pub use manifest::{
    LoadError, MAX_DOCUMENTS, MAX_FILE_BYTES, Source, load_path, load_str, load_texts, manifest_files, parse_object,
};
pub use objects::{Kind, Object, ObjectRef, ObjectSet};
pub use own::{AGENT_CONDITIONS, Own, Said};
pub use types::*;
pub use validate::{FieldError, SetError, check_route, parse_ip_range, validate_object, validate_set};

/// The API group of every natgw kind.
pub const GROUP: &str = "natgw.io";
/// The only version served so far.
pub const VERSION: &str = "v1alpha1";

/// The controller's finalizer on every natgw object: held until its
/// deletion may proceed (deletion order).
pub const CONTROLLER_FINALIZER: &str = "natgw.io/controller";

/// The gateway agent's finalizer for NatGateway `gw`: "this object's state
/// may be in that gateway's kernel".
pub fn gateway_finalizer(gw: &str) -> String {
    // The part after the slash is a qualified name of at most 63 bytes.
    format!("natgw.io/{}", bounded_name("gateway-", gw, 63))
}

/// `prefix` + `name` when that fits in `max` bytes; otherwise a cut of it
/// and a hash of the whole name, so that two long names sharing their
/// first characters never give the same result. A name that fits but
/// ends as a hashed one does (`-` and eight hex digits) is hashed too: a
/// short name could otherwise be chosen to equal a long name's cut and
/// hash, and two gateways would share a workload or a finalizer.
pub fn bounded_name(prefix: &str, name: &str, max: usize) -> String {
    let whole = format!("{prefix}{name}");
    if whole.len() <= max && !looks_hashed(&whole) {
        return whole;
    }
    let hash = format!("{:08x}", fnv1a(name.as_bytes()));
    let keep = max.saturating_sub(hash.len() + 1);
    let cut: String = whole.chars().take(keep).collect();
    format!("{}-{hash}", cut.trim_end_matches(['-', '.']))
}

/// Whether `s` ends as `bounded_name`'s hashed form does.
fn looks_hashed(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() > 9
        && b[b.len() - 9] == b'-'
        && b[b.len() - 8..].iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// FNV-1a: a small stable fingerprint for names (not for security).
pub fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c9dc5u32, |h, b| (h ^ *b as u32).wrapping_mul(0x01000193))
}

/// Label the controller puts on every Eip and rule: the gateway that
/// programs it. Each agent watches only objects with its own value.
pub const GATEWAY_LABEL: &str = "natgw.io/gateway";

/// Prefix shared by every gateway agent's finalizer.
pub const GATEWAY_FINALIZER_PREFIX: &str = "natgw.io/gateway-";

#[cfg(test)]
mod tests {
    use super::*;

    /// Second round, item 19: a short name chosen to equal a long name's
    /// cut and hash gets a name of its own.
    #[test]
    fn round2_item19_a_short_name_never_equals_a_long_names_hash() {
        let long = "g".repeat(70);
        let hashed = gateway_finalizer(&long);
        let forged = hashed.trim_start_matches("natgw.io/gateway-");
        assert!(forged.len() <= 63 - "gateway-".len(), "the forged name fits unhashed: {forged}");
        assert_ne!(gateway_finalizer(forged), hashed);
        assert_ne!(bounded_name("natgw-gw-", forged, 52), bounded_name("natgw-gw-", &long, 52));
        // Ordinary names stay as they are.
        assert_eq!(gateway_finalizer("web-2"), "natgw.io/gateway-web-2");
        assert_eq!(gateway_finalizer("gw-deadbeefx"), "natgw.io/gateway-gw-deadbeefx");
    }

    #[test]
    fn item8_long_names_sharing_a_prefix_never_collide() {
        let a = format!("{}-one", "x".repeat(60));
        let b = format!("{}-two", "x".repeat(60));
        assert_ne!(gateway_finalizer(&a), gateway_finalizer(&b));
        for n in [&a, &b] {
            let fin = gateway_finalizer(n);
            assert!(fin.len() - "natgw.io/".len() <= 63, "{fin}");
        }
        // Short names keep their plain, readable form.
        assert_eq!(gateway_finalizer("demo-gw"), "natgw.io/gateway-demo-gw");
    }
}
