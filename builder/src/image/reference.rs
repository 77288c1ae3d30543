//! Image names: parsing and normalising references the way docker does, so
//! `busybox` and `docker.io/library/busybox:latest` name the same image.
//!
//! Rules (distribution/reference): the first path component is a registry
//! when it contains `.` or `:` or is `localhost`, otherwise the registry is
//! `docker.io`; a single-component name on docker.io gets `library/`; the
//! tag defaults to `latest` unless a digest is given. Repository components
//! are lower-case `[a-z0-9]` runs joined by `.`, `_`, `__` or dashes; tags are
//! `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
//!
//! [`is_valid`] checks a name against the reference grammar as written,
//! without normalising it: what the Dockerfile frontend accepts as an image.
//!
//! This module is pure string handling: it never touches a store.

use std::fmt;

/// Errors of reference parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid image name {0:?}: the name is empty")]
    Empty(String),
    #[error("invalid image name {0:?}: repository names must be lower-case")]
    Uppercase(String),
    #[error("invalid image name {name:?}: path component {component:?} may only hold a-z, 0-9 and single separators (., _, __, -) between them")]
    Component { name: String, component: String },
    #[error(
        "invalid image name {name:?}: tag {tag:?} must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"
    )]
    Tag { name: String, tag: String },
    #[error("invalid image name {name:?}: digest {digest:?} must be sha256: and 64 lower-case hex digits")]
    Digest { name: String, digest: String },
    #[error(
        "invalid image name {name:?}: registry {domain:?} is not a host name with an optional port"
    )]
    Domain { name: String, domain: String },
    #[error("invalid image name {0:?}: longer than 255 characters")]
    TooLong(String),
}

/// Result type of reference parsing.
pub type Result<T> = std::result::Result<T, Error>;

/// The registry docker assumes for names without one.
pub const DEFAULT_DOMAIN: &str = "docker.io";

/// A normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// registry host (and port), e.g. `docker.io`, `localhost:5000`
    pub domain: String,
    /// repository path, e.g. `library/busybox`
    pub path: String,
    /// tag; `latest` when neither tag nor digest was given
    pub tag: Option<String>,
    /// `sha256:<hex>`
    pub digest: Option<String>,
}

impl Reference {
    /// Parse and normalise `name`.
    pub fn parse(name: &str) -> Result<Self> {
        if name.is_empty() {
            return Err(Error::Empty(name.into()));
        }
        let (rest, digest) = match name.split_once('@') {
            Some((r, d)) => {
                if !is_sha256_digest(d) {
                    return Err(Error::Digest {
                        name: name.into(),
                        digest: d.into(),
                    });
                }
                (r, Some(d.to_string()))
            }
            None => (name, None),
        };
        // a tag is after the last ':' that follows the last '/'
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (repo, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if repo.is_empty() {
            return Err(Error::Empty(name.into()));
        }
        if repo.len() > 255 {
            return Err(Error::TooLong(name.into()));
        }
        if let Some(t) = tag {
            if !is_tag(t) {
                return Err(Error::Tag {
                    name: name.into(),
                    tag: t.into(),
                });
            }
        }
        let (domain, path) = match repo.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DEFAULT_DOMAIN.to_string(), repo.to_string()),
        };
        if !is_domain(&domain) {
            return Err(Error::Domain {
                name: name.into(),
                domain,
            });
        }
        let domain = if domain == "index.docker.io" {
            DEFAULT_DOMAIN.to_string()
        } else {
            domain
        };
        if path.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(Error::Uppercase(name.into()));
        }
        for component in path.split('/') {
            if !is_component(component) {
                return Err(Error::Component {
                    name: name.into(),
                    component: component.into(),
                });
            }
        }
        let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// `domain/path` (no tag or digest).
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The repository as docker shows it: `busybox` for
    /// `docker.io/library/busybox`, `user/app` for `docker.io/user/app`.
    pub fn familiar_repository(&self) -> String {
        if self.domain == DEFAULT_DOMAIN {
            self.path
                .strip_prefix("library/")
                .filter(|p| !p.contains('/'))
                .unwrap_or(&self.path)
                .to_string()
        } else {
            self.repository()
        }
    }

    /// The familiar form with tag: `busybox:latest` (what `docker save`
    /// writes in RepoTags).
    pub fn familiar(&self) -> String {
        let mut s = self.familiar_repository();
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d);
        }
        s
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.repository())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Normalise a name to the full form kiln stores it under:
/// `busybox` -> `docker.io/library/busybox:latest`.
pub fn normalize(name: &str) -> Result<String> {
    Reference::parse(name).map(|r| r.to_string())
}

/// Whether `name` follows the distribution reference grammar as written,
/// before any normalising: `[host[:port]/]path[:tag][@digest]`, with path
/// components as in [`Reference::parse`] and at most 255 bytes before the
/// `@`. This is what the frontend accepts as an image in `FROM` and
/// `--from`; it is looser than [`Reference::parse`], by which kiln pulls
/// and stores, in three ways the grammar allows: a first component that is
/// a valid host name is a host even without `.` or `:` (`Foo/bar`), a
/// digest may use any algorithm with 32 or more hex digits, and a host may
/// be a bracketed IPv6 address (`[::1]:5000/x`).
pub fn is_valid(name: &str) -> bool {
    let (rest, digest) = match name.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (name, None),
    };
    if rest.len() > 255 || !digest.is_none_or(is_digest) {
        return false;
    }
    // a tag is after the ':' that follows the last '/'
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let repo = match rest[last_slash..].rfind(':') {
        Some(i) => {
            if !is_tag(&rest[last_slash + i + 1..]) {
                return false;
            }
            &rest[..last_slash + i]
        }
        None => rest,
    };
    let components: Vec<&str> = repo.split('/').collect();
    let path_from = |i: usize| components[i..].iter().all(|c| is_component(c));
    path_from(0) || (components.len() > 1 && is_host(components[0]) && path_from(1))
}

/// The digest grammar: `algorithm:hex`, an algorithm such as `sha256` or
/// `multihash+base58` and at least 32 hex digits (either case).
fn is_digest(d: &str) -> bool {
    let Some((algorithm, hex)) = d.split_once(':') else {
        return false;
    };
    let part = |p: &str| {
        let mut b = p.bytes();
        b.next().is_some_and(|c| c.is_ascii_alphabetic()) && b.all(|c| c.is_ascii_alphanumeric())
    };
    algorithm.split(['-', '_', '+', '.']).all(part)
        && hex.len() >= 32
        && hex.bytes().all(|c| c.is_ascii_hexdigit())
}

/// A registry host: a host name or a bracketed IPv6 address, with an
/// optional port.
fn is_host(h: &str) -> bool {
    let Some(v6) = h.strip_prefix('[') else {
        return is_domain(h);
    };
    let Some((addr, port)) = v6.split_once(']') else {
        return false;
    };
    let port_ok = match port.strip_prefix(':') {
        Some(p) => !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()),
        None => port.is_empty(),
    };
    port_ok && !addr.is_empty() && addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':')
}

/// Whether `s` is `sha256:` and 64 lower-case hex digits.
pub fn is_sha256_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn is_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || b"_.-".contains(&c))
}

fn is_component(c: &str) -> bool {
    // [a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_domain(d: &str) -> bool {
    let (host, port) = match d.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    if let Some(p) = port {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_docker() {
        for (input, want) in [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("library/busybox", "docker.io/library/busybox:latest"),
            ("user/app:v1", "docker.io/user/app:v1"),
            ("docker.io/busybox", "docker.io/library/busybox:latest"),
            ("index.docker.io/busybox", "docker.io/library/busybox:latest"),
            ("localhost/x", "localhost/x:latest"),
            ("localhost:5000/a/b:t", "localhost:5000/a/b:t"),
            ("quay.io/org/img", "quay.io/org/img:latest"),
            ("my-app_x.y", "docker.io/library/my-app_x.y:latest"),
            ("a__b--c", "docker.io/library/a__b--c:latest"),
            (
                "busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "docker.io/library/busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ),
            (
                "busybox:1@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "docker.io/library/busybox:1@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ),
        ] {
            assert_eq!(normalize(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn familiar_forms() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.familiar(), "busybox:latest");
        assert_eq!(r.familiar_repository(), "busybox");
        let r = Reference::parse("user/app:v1").unwrap();
        assert_eq!(r.familiar(), "user/app:v1");
        let r = Reference::parse("localhost/x").unwrap();
        assert_eq!(r.familiar(), "localhost/x:latest");
    }

    #[test]
    fn grammar_check_is_looser_than_parse_where_docker_is() {
        let hex64 = "0123456789abcdef".repeat(4);
        for ok in [
            "busybox",
            "alpine:3.19",
            "localhost:5000/a/b:t",
            "quay.io/org/img",
            "a__b--c/d.e_f",
            "Foo/bar",
            "[::1]:5000/x",
            "[fe80::1]/x:t",
            "a.b_c/x",
            "localhost:5000",
            &format!("busybox:1@sha256:{hex64}"),
            &format!("busybox@sha512:{}", hex64.repeat(2)),
            &format!("busybox@sha256:{}", hex64.to_uppercase()),
            &format!("b@multihash+base58:{}", &hex64[..32]),
        ] {
            assert!(is_valid(ok), "{ok}");
        }
        for bad in [
            "",
            "Alpine",
            "Not_An_Image",
            "a//b",
            "/a",
            "a/",
            "a:",
            "a:-x",
            "a:b:c",
            "a@",
            "a@sha256:abc",
            "a@sha256",
            &format!("a@1sha:{hex64}"),
            &format!("a@sha256:{}x", &hex64[..40]),
            "-a.io/x",
            "[::1/x",
            "[]/x",
            "[::1]:/x",
            "[::g]/x",
            "a.io:/x",
            "x:tag\u{e9}",
            &format!("{}:t", "a".repeat(254)),
        ] {
            assert!(!is_valid(bad), "{bad}");
        }
        assert!(is_valid(&"a".repeat(255)));
        assert!(!is_valid(&"a".repeat(256)));
    }

    #[test]
    fn rejects_bad_names_with_the_reason() {
        assert!(matches!(Reference::parse(""), Err(Error::Empty(_))));
        assert!(matches!(Reference::parse(":tag"), Err(Error::Empty(_))));
        assert!(matches!(
            Reference::parse("BusyBox"),
            Err(Error::Uppercase(_))
        ));
        assert!(matches!(
            Reference::parse("a//b"),
            Err(Error::Component { .. })
        ));
        assert!(matches!(
            Reference::parse("a-"),
            Err(Error::Component { .. })
        ));
        assert!(matches!(
            Reference::parse("a..b"),
            Err(Error::Component { .. })
        ));
        assert!(matches!(Reference::parse("a:-x"), Err(Error::Tag { .. })));
        assert!(matches!(
            Reference::parse(&format!("a:{}", "t".repeat(129))),
            Err(Error::Tag { .. })
        ));
        assert!(matches!(
            Reference::parse("a@sha256:abc"),
            Err(Error::Digest { .. })
        ));
        assert!(matches!(
            Reference::parse("a@md5:0123"),
            Err(Error::Digest { .. })
        ));
        assert!(matches!(
            Reference::parse("bad_host.io:x/y"),
            Err(Error::Tag { .. } | Error::Domain { .. })
        ));
        assert!(matches!(
            Reference::parse("ex-.com/y"),
            Err(Error::Domain { .. })
        ));
        assert!(matches!(
            Reference::parse(&"a".repeat(256)),
            Err(Error::TooLong(_))
        ));
        let e = Reference::parse("BusyBox").unwrap_err().to_string();
        assert!(e.contains("\"BusyBox\"") && e.contains("lower-case"), "{e}");
    }
}
