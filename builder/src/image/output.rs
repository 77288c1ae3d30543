//! `--output` specifications: BuildKit's CSV syntax
//! (`type=oci,dest=out.tar,compression=zstd`) parsed into an [`OutputSpec`].
//!
//! Fields are comma-separated `key=value` pairs, split by
//! [`crate::options`] with [`Quotes::Anywhere`]: a field or value in double
//! quotes may hold commas (`"name=a,b"`, `name="a,b"`), and `name=` may list
//! several names separated by commas. Without any `=`, the
//! spec is BuildKit's shorthand: `-` is `type=tar,dest=-` and anything else
//! `type=local,dest=THAT`.
//!
//! Which keys a type takes: `dest` for oci, docker, local and tar (required
//! there; `-` is standard output for oci, docker and tar); `name`,
//! `compression`, `compression-level`, `force-compression`, `oci-mediatypes`
//! and `rewrite-timestamp` for image, oci and docker; `tar` for oci; `push`
//! for image; `keep-setid` for local. Any other key, or a key a type does not take, is
//! an error naming it, as is a value outside its set.
//!
//! This module only parses: it never touches a file or a store.

use std::path::PathBuf;

use kiln_snapshotter::compression::Compression;

use super::reference;
use crate::options::{self, Quotes};

/// Errors of `--output` parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("--output {spec:?}: unterminated double quote")]
    Quote { spec: String },
    #[error("--output {spec:?}: field {field:?} is not key=value")]
    Field { spec: String, field: String },
    #[error("--output {spec:?}: key {key:?} is given twice")]
    Duplicate { spec: String, key: String },
    #[error("--output {spec:?}: {key:?}: {why}")]
    Annotation {
        spec: String,
        key: String,
        why: String,
    },
    #[error("--output {spec:?}: type= is missing; use type=image, oci, docker, local or tar")]
    MissingType { spec: String },
    #[error(
        "--output {spec:?}: unknown type {value:?}; use image, registry, oci, docker, local or tar"
    )]
    UnknownType { spec: String, value: String },
    #[error("--output {spec:?}: type=registry always pushes (use type=image for push=false)")]
    RegistryPush { spec: String },
    #[error("--output {spec:?}: push-by-digest=true says how to push: add push=true, or use type=registry")]
    ByDigestWithoutPush { spec: String },
    #[error("--output {spec:?}: unknown key {key:?} for type={kind}; it takes {allowed}")]
    UnknownKey {
        spec: String,
        key: String,
        kind: &'static str,
        allowed: &'static str,
    },
    #[error("--output {spec:?}: {key}={value:?} is invalid: expected {expected}")]
    Value {
        spec: String,
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("--output {spec:?}: type={kind} needs dest=PATH{stdout}")]
    MissingDest {
        spec: String,
        kind: &'static str,
        stdout: &'static str,
    },
    #[error(
        "--output {spec:?}: type={kind} cannot write to standard output (dest=-); give a directory"
    )]
    StdoutNotAllowed { spec: String, kind: &'static str },
    #[error("--output {spec:?}: compression-level={level} is outside {range} for {compression}")]
    Level {
        spec: String,
        level: i64,
        range: &'static str,
        compression: &'static str,
    },
    #[error("--output {spec:?}: compression-level has no meaning with compression=uncompressed")]
    LevelWithoutCompression { spec: String },
    #[error("--output {spec:?}: compression=estargz is not supported by kiln; use gzip, zstd or uncompressed")]
    Estargz { spec: String },
    /// A name in `name=` (or `-t`) is not an image name; the source says
    /// why.
    #[error("--output {spec:?}")]
    Name {
        spec: String,
        source: reference::Error,
    },
}

/// Result type of `--output` parsing.
pub type Result<T> = std::result::Result<T, Error>;

/// The exporter an output uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputType {
    /// the local image store
    Image,
    /// an OCI image layout, as a tar or a directory
    Oci,
    /// a docker-archive tar (`docker load`, `podman load`)
    Docker,
    /// the final root filesystem as a directory
    Local,
    /// the final root filesystem as a tar stream
    Tar,
}

impl OutputType {
    /// The name used in `type=`.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputType::Image => "image",
            OutputType::Oci => "oci",
            OutputType::Docker => "docker",
            OutputType::Local => "local",
            OutputType::Tar => "tar",
        }
    }

    fn allowed(self) -> &'static str {
        match self {
            OutputType::Image => "name, name-canonical, push, push-by-digest, compression, compression-level, force-compression, oci-mediatypes, rewrite-timestamp, annotation.KEY",
            OutputType::Oci => "dest, tar, name, compression, compression-level, force-compression, oci-mediatypes, rewrite-timestamp, annotation.KEY",
            OutputType::Docker => "dest, name, compression, compression-level, force-compression, oci-mediatypes, rewrite-timestamp, annotation.KEY",
            OutputType::Local => "dest, keep-setid",
            OutputType::Tar => "dest",
        }
    }

    fn takes(self, key: &str) -> bool {
        let image_keys = [
            "name",
            "compression",
            "compression-level",
            "force-compression",
            "oci-mediatypes",
            "rewrite-timestamp",
        ];
        match self {
            OutputType::Image => {
                key == "push"
                    || key == "push-by-digest"
                    || key == "name-canonical"
                    || image_keys.contains(&key)
            }
            OutputType::Oci => key == "dest" || key == "tar" || image_keys.contains(&key),
            OutputType::Docker => key == "dest" || image_keys.contains(&key),
            OutputType::Local => key == "dest" || key == "keep-setid",
            OutputType::Tar => key == "dest",
        }
    }
}

/// Where an output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// `dest=-`
    Stdout,
    Path(PathBuf),
}

/// A parsed `--output`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSpec {
    pub kind: OutputType,
    /// required for every type but `image`
    pub dest: Option<Dest>,
    /// normalised image names (`name=`)
    pub names: Vec<String>,
    /// `None`: keep each layer as it is stored
    pub compression: Option<Compression>,
    /// recompress layers already in the requested compression too
    pub force_compression: bool,
    /// OCI media types (`true`) or docker schema 2 ones; default `true`
    /// except for type=docker
    pub oci_mediatypes: bool,
    /// clamp file mtimes in re-written layers to SOURCE_DATE_EPOCH
    pub rewrite_timestamp: bool,
    /// type=oci only: `Some(false)` forces a directory layout, `Some(true)`
    /// a tar; `None` decides by the destination (see the exporter)
    pub tar: Option<bool>,
    /// type=image: push the names to their registries after storing
    pub push: bool,
    /// push under the manifest's digest only, leaving tags as they are
    /// (`push-by-digest=true`, for the split multi-platform pattern)
    pub push_by_digest: bool,
    /// type=image: also name the image `repo@digest` in the store
    /// (`name-canonical=true`)
    pub name_canonical: bool,
    /// `--annotation`s, for the image outputs (image, oci, docker)
    pub annotations: Vec<Annotation>,
    /// type=local: keep setuid/setgid bits on the files written (they
    /// are the caller's files there; stripped by default)
    pub keep_setid: bool,
}

impl OutputSpec {
    /// Parse one `--output` value.
    pub fn parse(spec: &str) -> Result<Self> {
        if !spec.contains('=') {
            return Self::shorthand(spec);
        }
        let pairs = key_values(spec)?;
        let kind = output_type(spec, &pairs)?;
        let mut out = OutputSpec::new(kind, None);
        let mut compression = CompressionRequest::default();
        for (k, v) in pairs.iter().filter(|(k, _)| k != "type") {
            out.set(spec, k, v, &mut compression)?;
        }
        out.compression = compression.resolve(spec)?;
        out.check_dest(spec)?;
        if pairs.iter().any(|(k, v)| k == "type" && v == "registry") {
            if pairs
                .iter()
                .any(|(k, v)| k == "push" && parse_bool(v) == Some(false))
            {
                return Err(Error::RegistryPush { spec: spec.into() });
            }
            out.push = true;
        }
        if out.push_by_digest && !out.push {
            return Err(Error::ByDigestWithoutPush { spec: spec.into() });
        }
        if kind == OutputType::Docker && !pairs.iter().any(|(k, _)| k == "oci-mediatypes") {
            out.oci_mediatypes = false;
        }
        Ok(out)
    }

    /// BuildKit's shorthand without `=`: `-` is `type=tar,dest=-`, anything
    /// else `type=local,dest=THAT`.
    fn shorthand(spec: &str) -> Result<Self> {
        if spec.is_empty() {
            return Err(Error::MissingType { spec: spec.into() });
        }
        let (kind, dest) = if spec == "-" {
            (OutputType::Tar, Dest::Stdout)
        } else {
            (OutputType::Local, Dest::Path(PathBuf::from(spec)))
        };
        Ok(OutputSpec::new(kind, Some(dest)))
    }

    /// Apply `key=value` (not `type`) to an output of this spec's type: the
    /// table of keys and how each value reads.
    fn set(
        &mut self,
        spec: &str,
        key: &str,
        value: &str,
        compression: &mut CompressionRequest,
    ) -> Result<()> {
        if key.starts_with("annotation")
            && matches!(
                self.kind,
                OutputType::Image | OutputType::Oci | OutputType::Docker
            )
        {
            let a = Annotation::from_output_key(key, value).map_err(|why| Error::Annotation {
                spec: spec.into(),
                key: key.into(),
                why,
            })?;
            self.annotations.push(a);
            return Ok(());
        }
        if !self.kind.takes(key) {
            return Err(Error::UnknownKey {
                spec: spec.into(),
                key: key.into(),
                kind: self.kind.as_str(),
                allowed: self.kind.allowed(),
            });
        }
        let invalid = |expected| value_error(spec, key, value, expected);
        let boolean = || parse_bool(value).ok_or_else(|| invalid("true or false"));
        match key {
            "dest" if value.is_empty() => return Err(invalid("a path, or - for standard output")),
            "dest" if value == "-" => self.dest = Some(Dest::Stdout),
            "dest" => self.dest = Some(Dest::Path(PathBuf::from(value))),
            "name" => self.add_names(spec, value)?,
            "compression" => compression.set_name(spec, value)?,
            "compression-level" => {
                let n = value
                    .parse()
                    .map_err(|_| invalid("an integer (gzip 0-9, zstd 0-22)"))?;
                compression.level = Some(n);
            }
            "force-compression" => self.force_compression = boolean()?,
            "oci-mediatypes" => self.oci_mediatypes = boolean()?,
            "rewrite-timestamp" => self.rewrite_timestamp = boolean()?,
            "tar" => self.tar = Some(boolean()?),
            "push" => self.push = boolean()?,
            "push-by-digest" => self.push_by_digest = boolean()?,
            "name-canonical" => self.name_canonical = boolean()?,
            "keep-setid" => self.keep_setid = boolean()?,
            _ => unreachable!("takes() lists every key handled here"),
        }
        Ok(())
    }

    /// `name=a,b`: normalised, each once; at least one.
    fn add_names(&mut self, spec: &str, value: &str) -> Result<()> {
        for n in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let full = reference::normalize(n).map_err(|source| Error::Name {
                spec: spec.into(),
                source,
            })?;
            if !self.names.contains(&full) {
                self.names.push(full);
            }
        }
        if self.names.is_empty() {
            return Err(value_error(spec, "name", value, "one or more image names"));
        }
        Ok(())
    }

    /// Every type but `image` writes somewhere, and not every destination
    /// can be standard output.
    fn check_dest(&self, spec: &str) -> Result<()> {
        match (self.kind, &self.dest) {
            (OutputType::Image, _) => {}
            (OutputType::Local, Some(Dest::Stdout)) => {
                return Err(Error::StdoutNotAllowed {
                    spec: spec.into(),
                    kind: self.kind.as_str(),
                })
            }
            (kind, None) => {
                return Err(Error::MissingDest {
                    spec: spec.into(),
                    kind: kind.as_str(),
                    stdout: if kind == OutputType::Local {
                        ""
                    } else {
                        " (or dest=- for standard output)"
                    },
                })
            }
            _ => {}
        }
        if self.tar == Some(false) && self.dest == Some(Dest::Stdout) {
            return Err(Error::StdoutNotAllowed {
                spec: spec.into(),
                kind: "oci with tar=false",
            });
        }
        Ok(())
    }

    /// The output of `kiln build -t NAME...` without `--output`: the local
    /// image store under every name, layers as built.
    pub fn image_store<S: AsRef<str>>(names: &[S]) -> Result<Self> {
        let mut out = OutputSpec::new(OutputType::Image, None);
        for n in names {
            let full = reference::normalize(n.as_ref()).map_err(|source| Error::Name {
                spec: format!("-t {}", n.as_ref()),
                source,
            })?;
            if !out.names.contains(&full) {
                out.names.push(full);
            }
        }
        Ok(out)
    }

    fn new(kind: OutputType, dest: Option<Dest>) -> Self {
        OutputSpec {
            kind,
            dest,
            names: Vec::new(),
            compression: None,
            force_compression: false,
            oci_mediatypes: true,
            rewrite_timestamp: false,
            tar: None,
            push: false,
            push_by_digest: false,
            name_canonical: false,
            annotations: Vec::new(),
            keep_setid: false,
        }
    }
}

/// The fields of `spec` as (lower-case key, value) pairs, each key once.
fn key_values(spec: &str) -> Result<Vec<(String, String)>> {
    let fields = options::pairs(spec, Quotes::Anywhere).map_err(|e| match e {
        options::Error::UnterminatedQuote(_) => Error::Quote { spec: spec.into() },
        options::Error::NotKeyValue { item } => Error::Field {
            spec: spec.into(),
            field: item,
        },
    })?;
    let mut pairs: Vec<(String, String)> = Vec::new();
    for (k, v) in fields {
        let k = k.trim().to_ascii_lowercase();
        if pairs.iter().any(|(seen, _)| *seen == k) {
            return Err(Error::Duplicate {
                spec: spec.into(),
                key: k,
            });
        }
        pairs.push((k, v));
    }
    Ok(pairs)
}

/// The `type=` of `spec`.
fn output_type(spec: &str, pairs: &[(String, String)]) -> Result<OutputType> {
    let Some((_, v)) = pairs.iter().find(|(k, _)| k == "type") else {
        return Err(Error::MissingType { spec: spec.into() });
    };
    Ok(match v.as_str() {
        // buildx's shorthand for type=image,push=true
        "image" | "registry" => OutputType::Image,
        "oci" => OutputType::Oci,
        "docker" => OutputType::Docker,
        "local" => OutputType::Local,
        "tar" => OutputType::Tar,
        other => {
            return Err(Error::UnknownType {
                spec: spec.into(),
                value: other.into(),
            })
        }
    })
}

fn value_error(spec: &str, key: &str, value: &str, expected: &'static str) -> Error {
    Error::Value {
        spec: spec.into(),
        key: key.into(),
        value: value.into(),
        expected,
    }
}

/// `compression=` and `compression-level=` of another option than
/// `--output` (a `--cache-to`), read as an output reads them; `spec`
/// names the option in errors. None when neither is given.
pub fn parse_compression(
    spec: &str,
    name: Option<&str>,
    level: Option<&str>,
) -> Result<Option<Compression>> {
    let mut c = CompressionRequest::default();
    if let Some(n) = name {
        c.set_name(spec, n)?;
    }
    if let Some(l) = level {
        c.level = Some(l.parse().map_err(|_| {
            value_error(
                spec,
                "compression-level",
                l,
                "an integer (gzip 0-9, zstd 0-22)",
            )
        })?);
    }
    c.resolve(spec)
}

/// `compression=` and `compression-level=` as given, resolved together
/// once every field is read.
#[derive(Default)]
struct CompressionRequest {
    /// `gzip`, `zstd` or `uncompressed`.
    name: Option<&'static str>,
    level: Option<i64>,
}

impl CompressionRequest {
    fn set_name(&mut self, spec: &str, value: &str) -> Result<()> {
        self.name = Some(match value {
            "gzip" => "gzip",
            "zstd" => "zstd",
            "uncompressed" => "uncompressed",
            "estargz" => return Err(Error::Estargz { spec: spec.into() }),
            _ => {
                return Err(value_error(
                    spec,
                    "compression",
                    value,
                    "gzip, zstd or uncompressed",
                ))
            }
        });
        Ok(())
    }

    /// The compression to apply; `None` keeps layers as stored.
    fn resolve(self, spec: &str) -> Result<Option<Compression>> {
        let out_of_range = |level, range, compression| Error::Level {
            spec: spec.into(),
            level,
            range,
            compression,
        };
        Ok(match (self.name, self.level) {
            (None, None) => None,
            (Some("uncompressed"), Some(_)) => {
                return Err(Error::LevelWithoutCompression { spec: spec.into() })
            }
            (Some("uncompressed"), None) => Some(Compression::None),
            // BuildKit applies a bare level to the default, gzip
            (Some("gzip") | None, level) => Some(Compression::Gzip {
                level: match level {
                    None => 6,
                    Some(n) => u32::try_from(n)
                        .ok()
                        .filter(|n| *n <= 9)
                        .ok_or_else(|| out_of_range(n, "0-9", "gzip"))?,
                },
            }),
            (Some(_zstd), level) => Some(Compression::Zstd {
                level: match level {
                    // zstd level 0 means its default, 3
                    None | Some(0) => 3,
                    Some(n) => i32::try_from(n)
                        .ok()
                        .filter(|n| (1..=22).contains(n))
                        .ok_or_else(|| out_of_range(n, "0-22", "zstd"))?,
                },
            }),
        })
    }
}

/// Where an `--annotation` goes, as buildx names the levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnnotationLevel {
    /// the image manifest (each platform's, in a multi-platform build)
    Manifest,
    /// the image index of a multi-platform build
    Index,
    /// the manifest's descriptor: in the index, and in an OCI layout's
    /// index.json
    ManifestDescriptor,
    /// the index's descriptor in an OCI layout's index.json
    IndexDescriptor,
}

/// One `--annotation [LEVEL[,LEVEL...]][\[PLATFORM\]]:KEY=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotation {
    pub levels: Vec<AnnotationLevel>,
    /// only the manifests (and their descriptors) of this platform
    pub platform: Option<String>,
    pub key: String,
    pub value: String,
}

impl Annotation {
    /// An exporter's `annotation[-LEVEL][[PLATFORM]].KEY=VALUE` key of
    /// `-o` (BuildKit's form; no level means the manifest; a platform
    /// only for the manifest levels).
    pub fn from_output_key(k: &str, value: &str) -> std::result::Result<Self, String> {
        let re =
            regex::Regex::new(r"^annotation(?:-([a-z-]+))?(?:\[([A-Za-z0-9_/()._-]+)\])?\.(\S+)$")
                .expect("a valid expression");
        let c = re
            .captures(k)
            .ok_or_else(|| "a key of the form annotation[-LEVEL][[PLATFORM]].KEY".to_string())?;
        let level = match c.get(1).map(|m| m.as_str()) {
            None | Some("manifest") => AnnotationLevel::Manifest,
            Some("manifest-descriptor") => AnnotationLevel::ManifestDescriptor,
            Some("index") => AnnotationLevel::Index,
            Some("index-descriptor") => AnnotationLevel::IndexDescriptor,
            Some(other) => {
                return Err(format!(
                    "unknown level {other:?}; use manifest, index, manifest-descriptor or index-descriptor"
                ))
            }
        };
        let platform = match c.get(2) {
            Some(p)
                if matches!(
                    level,
                    AnnotationLevel::Index | AnnotationLevel::IndexDescriptor
                ) =>
            {
                return Err(format!(
                    "a platform ({}) applies only to manifest levels",
                    p.as_str()
                ))
            }
            Some(p) => Some(
                crate::frontend::Platform::parse(p.as_str())
                    .map_err(|e| e.to_string())?
                    .to_string(),
            ),
            None => None,
        };
        Ok(Annotation {
            levels: vec![level],
            platform,
            key: c[3].to_string(),
            value: value.to_string(),
        })
    }

    /// Parse one `--annotation` value (buildx's syntax; no level means the
    /// manifest).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let bad = |why: &str| format!("--annotation {s:?}: {why}");
        let (k, value) = s.split_once('=').ok_or_else(|| bad("expected KEY=VALUE"))?;
        let (prefix, key) = match k.split_once(':') {
            Some((p, key)) => (Some(p), key),
            None => (None, k),
        };
        if key.is_empty() {
            return Err(bad("the key is empty"));
        }
        let (types, platform) = match prefix {
            Some(p) => match p.split_once('[') {
                Some((t, rest)) => {
                    let plat = rest.strip_suffix(']').ok_or_else(|| {
                        bad("a platform goes in brackets: manifest[linux/amd64]:K=V")
                    })?;
                    let plat =
                        crate::frontend::Platform::parse(plat).map_err(|e| bad(&e.to_string()))?;
                    (t, Some(plat.to_string()))
                }
                None => (p, None),
            },
            None => ("", None),
        };
        let mut levels = Vec::new();
        for t in types.split(',').filter(|t| !t.is_empty()) {
            levels.push(match t {
                "manifest" => AnnotationLevel::Manifest,
                "index" => AnnotationLevel::Index,
                "manifest-descriptor" => AnnotationLevel::ManifestDescriptor,
                "index-descriptor" => AnnotationLevel::IndexDescriptor,
                other => {
                    return Err(bad(&format!(
                        "unknown level {other:?}; use manifest, index, manifest-descriptor or index-descriptor"
                    )))
                }
            });
        }
        if levels.is_empty() {
            levels.push(AnnotationLevel::Manifest);
        }
        Ok(Annotation {
            levels,
            platform,
            key: key.to_string(),
            value: value.to_string(),
        })
    }
}

impl OutputSpec {
    /// The annotations for `level`, of every platform or of `platform`
    /// (`os/arch[/variant]`); later ones win.
    pub fn annotations_at(
        &self,
        level: AnnotationLevel,
        platform: Option<&str>,
    ) -> Option<std::collections::HashMap<String, String>> {
        let map: std::collections::HashMap<String, String> = self
            .annotations
            .iter()
            .filter(|a| a.levels.contains(&level))
            .filter(|a| a.platform.is_none() || a.platform.as_deref() == platform)
            .map(|a| (a.key.clone(), a.value.clone()))
            .collect();
        (!map.is_empty()).then_some(map)
    }
}

/// Go's strconv.ParseBool.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> OutputSpec {
        OutputSpec::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    fn e(s: &str) -> Error {
        OutputSpec::parse(s).expect_err(s)
    }

    #[test]
    fn registry_type_is_an_image_output_that_pushes() {
        // buildx's type=registry is an image output that always pushes
        let o = p("type=registry,name=r/x:1");
        assert_eq!((o.kind, o.push), (OutputType::Image, true));
        assert!(matches!(
            e("type=registry,name=r/x:1,push=false"),
            Error::RegistryPush { .. }
        ));
        assert!(p("type=registry,name=r/x,push-by-digest=true").push_by_digest);
        assert!(matches!(
            e("type=image,name=r/x,push-by-digest=true"),
            Error::ByDigestWithoutPush { .. }
        ));
    }

    #[test]
    fn annotations_parse_as_buildx() {
        let a = Annotation::parse("org.opencontainers.image.title=kiln").unwrap();
        assert_eq!(a.levels, vec![AnnotationLevel::Manifest]);
        assert_eq!(
            (a.key.as_str(), a.value.as_str()),
            ("org.opencontainers.image.title", "kiln")
        );
        let a = Annotation::parse("index,manifest-descriptor[linux/arm64]:k=v=w").unwrap();
        assert_eq!(
            a.levels,
            vec![AnnotationLevel::Index, AnnotationLevel::ManifestDescriptor]
        );
        assert_eq!(a.platform.as_deref(), Some("linux/arm64"));
        assert_eq!(a.value, "v=w");
        for bad in [
            "novalue",
            "blob:k=v",
            "manifest[linux/amd64:k=v",
            "manifest:=v",
        ] {
            assert!(Annotation::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn image_store_output_for_tags() {
        let o = OutputSpec::image_store(&["a", "docker.io/library/a:latest", "b:1"]).unwrap();
        assert_eq!(o.kind, OutputType::Image);
        assert_eq!(
            o.names,
            vec!["docker.io/library/a:latest", "docker.io/library/b:1"]
        );
        assert!(matches!(
            OutputSpec::image_store(&["A"]),
            Err(Error::Name { .. })
        ));
    }

    #[test]
    fn shorthands() {
        let o = p("-");
        assert_eq!((o.kind, o.dest), (OutputType::Tar, Some(Dest::Stdout)));
        let o = p("out/dir");
        assert_eq!(
            (o.kind, o.dest),
            (OutputType::Local, Some(Dest::Path("out/dir".into())))
        );
        assert!(matches!(e(""), Error::MissingType { .. }));
    }

    #[test]
    fn every_key() {
        let o = p("type=oci,dest=o.tar,name=busybox,compression=zstd,compression-level=19,force-compression=true,oci-mediatypes=false,rewrite-timestamp=1,tar=false");
        assert_eq!(o.kind, OutputType::Oci);
        assert_eq!(o.dest, Some(Dest::Path("o.tar".into())));
        assert_eq!(o.names, vec!["docker.io/library/busybox:latest"]);
        assert_eq!(o.compression, Some(Compression::Zstd { level: 19 }));
        assert!(o.force_compression && o.rewrite_timestamp && !o.oci_mediatypes);
        assert_eq!(o.tar, Some(false));

        let o = p("type=docker,dest=-");
        assert_eq!(o.dest, Some(Dest::Stdout));
        assert!(!o.oci_mediatypes, "docker defaults to docker media types");
        assert_eq!(o.compression, None);
        assert!(p("type=docker,dest=x,oci-mediatypes=true").oci_mediatypes);

        let o = p("type=image,\"name=a,localhost/b:t\",push=false");
        assert_eq!(o.names, vec!["docker.io/library/a:latest", "localhost/b:t"]);
        assert_eq!(p("type=image,name=\"a,b\"").names.len(), 2);
        assert!(p("type=image").names.is_empty());

        assert_eq!(
            p("type=oci,dest=x,compression=gzip").compression,
            Some(Compression::Gzip { level: 6 })
        );
        assert_eq!(
            p("type=oci,dest=x,compression-level=1").compression,
            Some(Compression::Gzip { level: 1 })
        );
        assert_eq!(
            p("type=oci,dest=x,compression=zstd").compression,
            Some(Compression::Zstd { level: 3 })
        );
        assert_eq!(
            p("type=oci,dest=x,compression=zstd,compression-level=0").compression,
            Some(Compression::Zstd { level: 3 })
        );
        assert_eq!(
            p("type=oci,dest=x,compression=uncompressed").compression,
            Some(Compression::None)
        );
        assert_eq!(
            p("TYPE=local,Dest=d").dest,
            Some(Dest::Path("d".into())),
            "keys are case-insensitive"
        );
        assert_eq!(p("type=tar,dest=-").dest, Some(Dest::Stdout));
        assert_eq!(
            p("type=oci,dest=a\"\"b").dest,
            Some(Dest::Path("ab".into()))
        );
    }

    #[test]
    fn a_bad_name_names_the_output_and_has_the_reason_as_source() {
        let name = e("type=image,name=Upper");
        assert!(matches!(name, Error::Name { .. }));
        assert_eq!(name.to_string(), "--output \"type=image,name=Upper\"");
        let why = std::error::Error::source(&name).map(ToString::to_string);
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains("\"Upper\"") && w.contains("lower-case")),
            "{why:?}"
        );
    }

    #[test]
    fn exporter_annotation_keys_name_their_level_and_platform() {
        let o = OutputSpec::parse(
            "type=image,annotation.a=1,annotation-index.b=2,annotation-manifest[linux/arm64].c=3,annotation-index-descriptor.d=4",
        )
        .unwrap();
        let got: Vec<(AnnotationLevel, Option<&str>, &str, &str)> = o
            .annotations
            .iter()
            .map(|a| {
                (
                    a.levels[0],
                    a.platform.as_deref(),
                    a.key.as_str(),
                    a.value.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (AnnotationLevel::Manifest, None, "a", "1"),
                (AnnotationLevel::Index, None, "b", "2"),
                (AnnotationLevel::Manifest, Some("linux/arm64"), "c", "3"),
                (AnnotationLevel::IndexDescriptor, None, "d", "4"),
            ]
        );
        for bad in [
            "type=image,annotation-oops.a=1",
            "type=image,annotation-index[linux/amd64].a=1",
            "type=image,annotation.=1",
            "type=local,dest=x,annotation.a=1",
        ] {
            assert!(OutputSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_error() {
        assert!(matches!(e("type=oci,dest=\"x"), Error::Quote { .. }));
        assert!(matches!(e("type=oci,dest"), Error::Field { .. }));
        assert!(matches!(e("type=oci,dest=x,"), Error::Field { .. }));
        assert!(matches!(
            e("type=oci,type=tar,dest=x"),
            Error::Duplicate { .. }
        ));
        assert!(matches!(e("dest=x,name=y"), Error::MissingType { .. }));
        assert!(matches!(e("type=gha"), Error::UnknownType { .. }));
        assert!(matches!(
            e("type=oci,dest=x,colour=red"),
            Error::UnknownKey { .. }
        ));
        assert!(matches!(
            e("type=local,dest=x,name=y"),
            Error::UnknownKey { .. }
        ));
        assert!(matches!(
            e("type=tar,dest=x,compression=gzip"),
            Error::UnknownKey { .. }
        ));
        assert!(matches!(e("type=image,dest=x"), Error::UnknownKey { .. }));
        assert!(matches!(
            e("type=docker,dest=x,tar=true"),
            Error::UnknownKey { .. }
        ));
        assert!(matches!(
            e("type=oci,dest=x,push=false"),
            Error::UnknownKey { .. }
        ));
        assert!(matches!(e("type=oci,dest="), Error::Value { .. }));
        assert!(matches!(
            e("type=oci,dest=x,compression=lz4"),
            Error::Value { .. }
        ));
        assert!(matches!(
            e("type=oci,dest=x,compression-level=high"),
            Error::Value { .. }
        ));
        assert!(matches!(
            e("type=oci,dest=x,force-compression=yes"),
            Error::Value { .. }
        ));
        assert!(matches!(
            e("type=oci,dest=x,oci-mediatypes=2"),
            Error::Value { .. }
        ));
        assert!(matches!(
            e("type=oci,dest=x,rewrite-timestamp=on"),
            Error::Value { .. }
        ));
        assert!(matches!(
            e("type=oci,dest=x,tar=maybe"),
            Error::Value { .. }
        ));
        assert!(matches!(e("type=image,name="), Error::Value { .. }));
        assert!(matches!(e("type=image,push=nope"), Error::Value { .. }));
        assert!(matches!(e("type=oci"), Error::MissingDest { .. }));
        assert!(matches!(e("type=docker"), Error::MissingDest { .. }));
        assert!(matches!(e("type=local"), Error::MissingDest { .. }));
        assert!(matches!(e("type=tar"), Error::MissingDest { .. }));
        assert!(matches!(
            e("type=local,dest=-"),
            Error::StdoutNotAllowed { .. }
        ));
        assert!(matches!(
            e("type=oci,dest=x,compression-level=10"),
            Error::Level { .. }
        ));
        assert!(matches!(
            e("type=oci,dest=x,compression-level=-1"),
            Error::Level { .. }
        ));
        assert!(matches!(
            e("type=oci,dest=x,compression=zstd,compression-level=23"),
            Error::Level { .. }
        ));
        assert!(matches!(
            e("type=oci,dest=x,compression=uncompressed,compression-level=1"),
            Error::LevelWithoutCompression { .. }
        ));
        assert!(matches!(
            e("type=oci,dest=x,compression=estargz"),
            Error::Estargz { .. }
        ));
        assert!(p("type=image,name=localhost:5000/x,push=true").push);
        assert!(matches!(e("type=image,name=Upper"), Error::Name { .. }));
        let msg = e("type=oci,dest=x,colour=red").to_string();
        assert!(
            msg.contains("\"colour\"") && msg.contains("type=oci"),
            "{msg}"
        );
    }
}
