//! Loading objects from YAML manifests (files or directories). Errors name
//! the file, the document, the object and the field.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::objects::{Kind, Object, ObjectRef, ObjectSet};
use crate::types::*;
use crate::validate::{FieldError, validate_object, validate_set};

/// Where an object came from: file and 1-based document number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub file: PathBuf,
    pub document: usize,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {})", self.file.display(), self.document)
    }
}

/// The largest manifest file natgw reads: the bound that protects memory
/// (parsing needs a few times the text). 64 MiB holds about 300,000
/// objects.
pub const MAX_FILE_BYTES: usize = 64 << 20;
/// Documents per file at most. The YAML parser's default (1,024) refused
/// real inventories; within `MAX_FILE_BYTES` this never binds first for
/// natgw objects.
pub const MAX_DOCUMENTS: usize = 1_000_000;

/// Parser limits sized for `MAX_FILE_BYTES` of natgw objects.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: MAX_DOCUMENTS,
            max_nodes: 50_000_000,
            max_events: 100_000_000,
            max_total_scalar_bytes: MAX_FILE_BYTES,
        },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{file}: {size} bytes; a manifest file holds at most {max} (split it into several files)", max = MAX_FILE_BYTES)]
    TooLarge { file: PathBuf, size: usize },
    #[error("{file}: malformed YAML: {source}")]
    Yaml { file: PathBuf, source: Box<serde_saphyr::Error> },
    #[error("{at}: {message}")]
    Document { at: Source, message: String },
    #[error("{at}: {object}: {error}")]
    Field { at: Source, object: String, error: FieldError },
    #[error("{object} is defined twice: in {first} and in {second}")]
    Duplicate { object: ObjectRef, first: Source, second: Source },
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Many(Vec<LoadError>),
}

/// Loads every `.yaml`, `.yml` and `.json` file under `path` (or the file
/// itself), validates each object and the references between them, and
/// returns the whole set or every error found.
pub fn load_path(path: &Path) -> Result<(ObjectSet, BTreeMap<ObjectRef, Source>), LoadError> {
    let mut docs = Vec::new();
    for file in manifest_files(path)? {
        let size = std::fs::metadata(&file).map_err(|source| LoadError::Io { path: file.clone(), source })?.len();
        if size > MAX_FILE_BYTES as u64 {
            return Err(LoadError::TooLarge { file, size: size as usize });
        }
        let text = std::fs::read_to_string(&file).map_err(|source| LoadError::Io { path: file.clone(), source })?;
        docs.push((file, text));
    }
    load_texts(&docs)
}

/// The manifest files under `path` (or `path` itself), sorted.
pub fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let mut files = Vec::new();
    collect_files(path, &mut files)?;
    Ok(files)
}

/// Like `load_path` for texts already read: (file name, content) pairs.
pub fn load_texts(texts: &[(PathBuf, String)]) -> Result<(ObjectSet, BTreeMap<ObjectRef, Source>), LoadError> {
    load_documents(texts.iter().map(|(f, t)| (f.as_path(), t.as_str())))
}

/// Like `load_path` for one in-memory text.
pub fn load_str(file: &Path, text: &str) -> Result<(ObjectSet, BTreeMap<ObjectRef, Source>), LoadError> {
    load_documents(std::iter::once((file, text)))
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let io = |source| LoadError::Io { path: path.to_path_buf(), source };
    if !path.is_dir() {
        std::fs::metadata(path).map_err(io)?;
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(path).map_err(io)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for entry in entries {
        let hidden = entry.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if entry.is_dir() {
            collect_files(&entry, out)?;
        } else if matches!(entry.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
            out.push(entry);
        }
    }
    Ok(())
}

fn load_documents<'a>(
    files: impl Iterator<Item = (&'a Path, &'a str)>,
) -> Result<(ObjectSet, BTreeMap<ObjectRef, Source>), LoadError> {
    let mut errors = Vec::new();
    let mut set = ObjectSet::default();
    let mut sources: BTreeMap<ObjectRef, Source> = BTreeMap::new();
    for (file, text) in files {
        if text.len() > MAX_FILE_BYTES {
            errors.push(LoadError::TooLarge { file: file.to_path_buf(), size: text.len() });
            continue;
        }
        let docs: Vec<Value> = match serde_saphyr::from_multiple_with_options(text, yaml_options()) {
            Ok(d) => d,
            Err(e) => {
                errors.push(LoadError::Yaml { file: file.to_path_buf(), source: Box::new(e) });
                continue;
            }
        };
        let items = docs.into_iter().enumerate().filter(|(_, d)| !d.is_null()).flat_map(|(i, d)| list_items(i, d));
        for (i, doc) in items {
            let source = Source { file: file.to_path_buf(), document: i + 1 };
            match parse_object(doc, &source) {
                Ok(object) => {
                    let r = object.object_ref();
                    if let Some(first) = sources.get(&r) {
                        errors.push(LoadError::Duplicate { object: r, first: first.clone(), second: source });
                        continue;
                    }
                    sources.insert(r, source);
                    set.insert(object);
                }
                Err(e) => errors.push(e),
            }
        }
    }
    for e in validate_set(&set) {
        let source = sources.get(&e.object).cloned().unwrap_or(Source { file: PathBuf::new(), document: 0 });
        errors.push(LoadError::Field { at: source, object: e.object.to_string(), error: e.error });
    }
    match errors.len() {
        0 => Ok((set, sources)),
        1 => Err(errors.remove(0)),
        _ => Err(LoadError::Many(errors)),
    }
}

/// The objects of one document: a `v1` List (what `kubectl get -o yaml`
/// prints for several objects) gives its items, each counted as its
/// document; anything else is one object.
fn list_items(document: usize, doc: Value) -> Vec<(usize, Value)> {
    let is_list = doc.get("apiVersion").and_then(Value::as_str) == Some("v1")
        && doc.get("kind").and_then(Value::as_str) == Some("List");
    match doc {
        Value::Object(mut map) if is_list => match map.remove("items") {
            Some(Value::Array(items)) => items.into_iter().map(|item| (document, item)).collect(),
            _ => Vec::new(),
        },
        other => vec![(document, other)],
    }
}

/// Turns one YAML document into a validated object.
pub fn parse_object(doc: Value, source: &Source) -> Result<Object, LoadError> {
    let doc_err = |message: String| LoadError::Document { at: source.clone(), message };
    let mut doc = doc;
    let Value::Object(map) = &mut doc else {
        return Err(doc_err("expected a mapping with apiVersion, kind, metadata and spec".into()));
    };
    // A missing spec reads as empty, so required fields are reported by name.
    map.entry("spec").or_insert_with(|| Value::Object(Default::default()));
    let map = &*map;
    let api_version = map.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = map.get("kind").and_then(Value::as_str).unwrap_or("").to_string();
    let name = map.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("").to_string();
    let expected = format!("{}/{}", crate::GROUP, crate::VERSION);
    if api_version != expected {
        return Err(doc_err(format!("apiVersion is {api_version:?}, expected {expected:?}")));
    }
    let label = format!("{kind}/{name}");
    let field_err = |field: String, message: String| LoadError::Field {
        at: source.clone(),
        object: label.clone(),
        error: FieldError { field, message },
    };
    if let Some(spec) = map.get("spec") {
        check_unknown_fields(&kind, spec).map_err(|f| field_err(f, "unknown field".into()))?;
    }
    let Some(known) = Kind::from_name(&kind) else {
        let served = Kind::ALL.map(Kind::as_str).join(", ");
        return Err(doc_err(format!("unknown kind {kind:?}; natgw.io/v1alpha1 serves {served}")));
    };
    let object = match known {
        Kind::Vpc => typed::<Vpc>(doc).map(Object::Vpc),
        Kind::Subnet => typed::<Subnet>(doc).map(Object::Subnet),
        Kind::NatGateway => typed::<NatGateway>(doc).map(Object::NatGateway),
        Kind::Eip => typed::<Eip>(doc).map(Object::Eip),
        Kind::FloatingIp => typed::<FloatingIp>(doc).map(Object::FloatingIp),
        Kind::SnatRule => typed::<SnatRule>(doc).map(Object::SnatRule),
        Kind::DnatRule => typed::<DnatRule>(doc).map(Object::DnatRule),
    }
    .map_err(|(field, message)| field_err(field, message))?;
    match validate_object(&object).into_iter().next() {
        Some(e) => Err(field_err(e.field, e.message)),
        None => Ok(object),
    }
}

/// Deserializes with the path of the failing field.
fn typed<T: DeserializeOwned>(doc: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "(object)".to_string() } else { path };
        // Ports are u16 in the types; say what that means to an operator.
        let message = e.inner().to_string().replace("expected u16", "expected a port from 1 to 65535");
        (field, message)
    })
}

/// Serde ignores fields it does not know; a typo in an optional field would
/// then pass unnoticed. Compare against the schema instead.
fn check_unknown_fields(kind: &str, spec: &Value) -> Result<(), String> {
    let Some(kind) = Kind::from_name(kind) else { return Ok(()) };
    let known: &[&str] = match kind {
        Kind::Vpc => &["description"],
        Kind::Subnet => &["cidr", "gateway", "excludeIps", "vpc"],
        Kind::NatGateway => &[
            "vpc",
            "lanInterface",
            "externalInterface",
            "externalSubnet",
            "routes",
            "externalNetwork",
            "lanNetwork",
            "lanIp",
            "replicas",
        ],
        Kind::Eip => &["gateway", "ip", "internalCidrs"],
        Kind::FloatingIp => &["eip", "internalIp"],
        Kind::SnatRule => &["eip", "internalCidr"],
        Kind::DnatRule => &["eip", "protocol", "externalPort", "internalIp", "internalPort"],
    };
    if let Value::Object(fields) = spec {
        if let Some(unknown) = fields.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!("spec.{unknown}"));
        }
        if let Some(Value::Array(routes)) = fields.get("routes") {
            for (i, r) in routes.iter().enumerate() {
                if let Some(k) =
                    r.as_object().and_then(|o| o.keys().find(|k| !["cidr", "nextHop"].contains(&k.as_str())))
                {
                    return Err(format!("spec.routes[{i}].{k}"));
                }
            }
        }
    }
    Ok(())
}
