//! An object of any kind as the caches' watches decode it: kube's
//! `DynamicObject` without the managedFields. Decoding them was about a
//! seventh of the controller's CPU while thousands of objects changed, and
//! no cache keeps them; they are skipped while the bytes are read. So are
//! the annotations of a kind natgw never reads them from (`Untyped<false>`):
//! a tenant's 250 KiB annotation was otherwise copied three times over
//! per event before a cache dropped it.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::ApiResource;
use kube::core::{DynamicResourceScope, TypeMeta};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Untyped<const ANNOTATIONS: bool = true> {
    #[serde(flatten, default)]
    pub types: Option<TypeMeta>,
    #[serde(default, deserialize_with = "without_managed_fields::<ANNOTATIONS, _>")]
    pub metadata: ObjectMeta,
    #[serde(flatten)]
    pub data: serde_json::Value,
}

/// ObjectMeta with its managedFields (and, unless `ANNOTATIONS`, its
/// annotations) skipped unread: the rest of the metadata (a few hundred
/// bytes) goes through a JSON map first.
fn without_managed_fields<'de, const ANNOTATIONS: bool, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    struct Meta<const ANNOTATIONS: bool>;
    impl<'de, const ANNOTATIONS: bool> Visitor<'de> for Meta<ANNOTATIONS> {
        type Value = serde_json::Map<String, serde_json::Value>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("object metadata")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = serde_json::Map::new();
            while let Some(key) = map.next_key::<String>()? {
                if key == "managedFields" || (!ANNOTATIONS && key == "annotations") {
                    map.next_value::<IgnoredAny>()?;
                } else {
                    out.insert(key, map.next_value()?);
                }
            }
            Ok(out)
        }
    }
    let fields = d.deserialize_map(Meta::<ANNOTATIONS>)?;
    ObjectMeta::deserialize(serde_json::Value::Object(fields)).map_err(serde::de::Error::custom)
}

impl<const ANNOTATIONS: bool> kube::Resource for Untyped<ANNOTATIONS> {
    type DynamicType = ApiResource;
    type Scope = DynamicResourceScope;

    fn group(dt: &ApiResource) -> Cow<'_, str> {
        dt.group.as_str().into()
    }
    fn version(dt: &ApiResource) -> Cow<'_, str> {
        dt.version.as_str().into()
    }
    fn kind(dt: &ApiResource) -> Cow<'_, str> {
        dt.kind.as_str().into()
    }
    fn api_version(dt: &ApiResource) -> Cow<'_, str> {
        dt.api_version.as_str().into()
    }
    fn plural(dt: &ApiResource) -> Cow<'_, str> {
        dt.plural.as_str().into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managed_fields_are_skipped_and_the_rest_is_kept() {
        let text = r#"{"apiVersion": "natgw.io/v1alpha1", "kind": "FloatingIp",
            "metadata": {"name": "f", "uid": "u-1", "resourceVersion": "7", "generation": 2,
                "finalizers": ["natgw.io/controller"], "labels": {"natgw.io/gateway": "gw"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:spec": {"f:eip": {}}}}]},
            "spec": {"eip": "e", "internalIp": "10.0.0.5"}}"#;
        let o: Untyped = serde_json::from_str(text).unwrap();
        assert_eq!(o.metadata.managed_fields, None);
        assert_eq!(o.metadata.name.as_deref(), Some("f"));
        assert_eq!(o.metadata.uid.as_deref(), Some("u-1"));
        assert_eq!(o.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(o.metadata.generation, Some(2));
        assert_eq!(o.metadata.finalizers, Some(vec!["natgw.io/controller".to_string()]));
        assert_eq!(o.types.as_ref().map(|t| t.kind.as_str()), Some("FloatingIp"));
        assert_eq!(o.data["spec"]["eip"], "e");
    }

    #[test]
    fn annotations_are_skipped_only_when_asked() {
        let text = r#"{"metadata": {"name": "f", "annotations": {"note": "ballast"}, "labels": {"a": "b"}}}"#;
        let kept: Untyped = serde_json::from_str(text).unwrap();
        assert_eq!(kept.metadata.annotations, Some([("note".to_string(), "ballast".to_string())].into()));
        let bare: Untyped<false> = serde_json::from_str(text).unwrap();
        assert_eq!(bare.metadata.annotations, None);
        assert_eq!(bare.metadata.labels, Some([("a".to_string(), "b".to_string())].into()));
    }

    #[test]
    fn bad_metadata_is_an_error_naming_the_field() {
        let text = r#"{"metadata": {"name": "f", "generation": "two"}}"#;
        let err = serde_json::from_str::<Untyped>(text).unwrap_err().to_string();
        assert!(err.contains("generation") || err.contains("invalid type"), "{err}");
    }

    #[test]
    fn no_metadata_is_empty_metadata() {
        let o: Untyped = serde_json::from_str(r#"{"kind": "X", "apiVersion": "v1"}"#).unwrap();
        assert_eq!(o.metadata, ObjectMeta::default());
    }
}
