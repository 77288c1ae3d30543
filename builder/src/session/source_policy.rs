//! Source policies, as BuildKit applies them and buildx sends them (the
//! JSON file named by `EXPERIMENTAL_BUILDKIT_SOURCE_POLICY`): rules that
//! allow, deny or convert the sources a build reads, by identifier
//! (`docker-image://docker.io/library/alpine:latest`, `https://host/f`,
//! `git://host/repo`, `local://NAME` for the context and named context
//! directories). Rules are tried in order: the last ALLOW or DENY that
//! matches decides, and a matching CONVERT rewrites the source and starts
//! over (at most 20 times). An identifier matches a selector exactly, by
//! wildcard (`*`, the default) or by regular expression; a conversion's
//! identifier may use the wildcard's or expression's groups (`$1`).
//!
//! Nothing here fetches anything: callers give a source and use what
//! comes back.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// Why a policy could not be read or refused a source.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("source policy {path}: {why}")]
    Read { path: String, why: String },
    #[error("source {0:?} denied by policy")]
    Denied(String),
    #[error("source {0:?}: too many conversions by the source policy (a loop?)")]
    TooMany(String),
    #[error("source {ident:?}: the source policy converts it to {to:?}, which {why}")]
    Unsupported {
        ident: String,
        to: String,
        why: String,
    },
}

/// A source as the policy sees it: its identifier and attributes (for
/// HTTP, `http.checksum`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub identifier: String,
    pub attrs: BTreeMap<String, String>,
}

impl Source {
    pub fn new(identifier: impl Into<String>) -> Source {
        Source {
            identifier: identifier.into(),
            attrs: BTreeMap::new(),
        }
    }

    /// A git source as BuildKit names it: `git://` and the repository
    /// without its scheme or user (`git@host:path` as `host/path`), then
    /// `#` and the fragment of `url` when it has one.
    pub fn git(url: &str, remote: &str) -> Source {
        let mut r = remote;
        for scheme in ["https://", "http://", "ssh://", "git://"] {
            r = r.strip_prefix(scheme).unwrap_or(r);
        }
        let r = r.split_once('@').map_or(r, |(_, rest)| rest);
        let r = match r.split_once(':') {
            Some((host, path)) if !path.starts_with(|c: char| c.is_ascii_digit()) => {
                format!("{host}/{path}")
            }
            _ => r.to_string(),
        };
        let fragment = url.split_once('#').map(|(_, f)| f);
        Source::new(match fragment {
            Some(f) => format!("git://{r}#{f}"),
            None => format!("git://{r}"),
        })
    }

    /// An image reference as BuildKit names its source: normalised
    /// (`docker-image://docker.io/library/alpine:latest`).
    pub fn image(reference: &str) -> Source {
        let name =
            crate::image::reference::normalize(reference).unwrap_or_else(|_| reference.into());
        Source::new(format!("docker-image://{name}"))
    }
}

/// The policy file's form (BuildKit's `sourcepolicy/pb` Policy as JSON).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    #[allow(dead_code)]
    version: Option<i64>,
    #[serde(default)]
    rules: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    action: Option<Enum>,
    selector: SelectorFile,
    #[serde(default)]
    updates: Option<UpdateFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectorFile {
    #[serde(default)]
    identifier: String,
    #[serde(default, alias = "matchType")]
    match_type: Option<Enum>,
    #[serde(default)]
    constraints: Vec<ConstraintFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConstraintFile {
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    condition: Option<Enum>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateFile {
    #[serde(default)]
    identifier: String,
    #[serde(default)]
    attrs: BTreeMap<String, String>,
}

/// A protobuf enum as JSON: its name or its number.
#[derive(Deserialize)]
#[serde(untagged)]
enum Enum {
    Name(String),
    Number(i64),
}

impl Enum {
    /// The value among `names` (in number order).
    fn pick(&self, names: &[&str], what: &str) -> Result<usize, String> {
        match self {
            Enum::Name(n) => names
                .iter()
                .position(|x| x.eq_ignore_ascii_case(n))
                .ok_or_else(|| format!("unknown {what} {n:?}; use one of {}", names.join(", "))),
            Enum::Number(i) => usize::try_from(*i)
                .ok()
                .filter(|i| *i < names.len())
                .ok_or_else(|| format!("unknown {what} {i}")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
    Convert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Condition {
    Equal,
    NotEqual,
    Matches,
}

/// How a selector's identifier matches.
#[derive(Debug)]
enum Matcher {
    Exact,
    /// a wildcard, as the anchored expression it stands for
    Wildcard(regex::Regex),
    Regex(regex::Regex),
}

#[derive(Debug)]
struct Rule {
    action: Action,
    identifier: String,
    matcher: Matcher,
    constraints: Vec<(String, String, Condition, Option<regex::Regex>)>,
    update: Option<(String, BTreeMap<String, String>)>,
}

/// A loaded source policy.
#[derive(Debug, Default)]
pub struct SourcePolicy {
    rules: Vec<Rule>,
}

/// The most bytes of a policy file read.
const MAX_FILE: u64 = 1 << 20;

impl SourcePolicy {
    /// Read the policy at `path`; every rule is checked now, so a bad
    /// one is an error naming it before anything is built.
    pub fn load(path: &Path) -> Result<SourcePolicy, PolicyError> {
        let err = |why: String| PolicyError::Read {
            path: path.display().to_string(),
            why,
        };
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        if meta.len() > MAX_FILE {
            return Err(err(format!("larger than {MAX_FILE} bytes")));
        }
        let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        Self::parse(&text).map_err(err)
    }

    /// Parse a policy's JSON.
    pub fn parse(text: &[u8]) -> Result<SourcePolicy, String> {
        let file: PolicyFile = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        let rules = file
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| compile(r).map_err(|e| format!("rule {}: {e}", i + 1)))
            .collect::<Result<_, _>>()?;
        Ok(SourcePolicy { rules })
    }

    /// Apply the policy to `src`: an error when it is denied, else the
    /// source to read (converted, or as it was).
    pub fn evaluate(&self, src: &Source) -> Result<Source, PolicyError> {
        let mut src = src.clone();
        for _ in 0..=20 {
            if !self.evaluate_once(&mut src)? {
                return Ok(src);
            }
        }
        Err(PolicyError::TooMany(src.identifier))
    }

    /// One pass over the rules; whether a conversion changed `src`.
    fn evaluate_once(&self, src: &mut Source) -> Result<bool, PolicyError> {
        let mut deny = false;
        for rule in &self.rules {
            if !rule.matches(src) {
                continue;
            }
            match rule.action {
                Action::Allow => deny = false,
                Action::Deny => deny = true,
                Action::Convert => {
                    if rule.convert(src) {
                        return Ok(true);
                    }
                }
            }
        }
        if deny {
            return Err(PolicyError::Denied(src.identifier.clone()));
        }
        Ok(false)
    }
}

fn compile(r: RuleFile) -> Result<Rule, String> {
    let action = match &r.action {
        Some(a) => a.pick(&["ALLOW", "DENY", "CONVERT"], "action")?,
        None => 0,
    };
    let action = [Action::Allow, Action::Deny, Action::Convert][action];
    let kind = match &r.selector.match_type {
        Some(m) => m.pick(&["WILDCARD", "EXACT", "REGEX"], "match type")?,
        None => 0,
    };
    let identifier = r.selector.identifier;
    let matcher = match kind {
        1 => Matcher::Exact,
        2 => Matcher::Regex(
            regex::Regex::new(&identifier).map_err(|e| format!("regex {identifier:?}: {e}"))?,
        ),
        _ => Matcher::Wildcard(wildcard(&identifier)?),
    };
    let constraints = r
        .selector
        .constraints
        .into_iter()
        .map(|c| {
            let cond = match &c.condition {
                Some(x) => x.pick(&["EQUAL", "NOTEQUAL", "MATCHES"], "condition")?,
                None => 0,
            };
            let cond = [Condition::Equal, Condition::NotEqual, Condition::Matches][cond];
            let re = match cond {
                Condition::Matches => Some(
                    regex::Regex::new(&c.value)
                        .map_err(|e| format!("constraint {}: regex {:?}: {e}", c.key, c.value))?,
                ),
                _ => None,
            };
            Ok((c.key, c.value, cond, re))
        })
        .collect::<Result<_, String>>()?;
    let update = match (action, r.updates) {
        (Action::Convert, None) => return Err("a CONVERT rule needs updates".into()),
        (_, u) => u.map(|u| (u.identifier, u.attrs)),
    };
    Ok(Rule {
        action,
        identifier,
        matcher,
        constraints,
        update,
    })
}

/// A wildcard (`*` any text, `**` refused) as an anchored expression
/// whose groups are its stars.
fn wildcard(w: &str) -> Result<regex::Regex, String> {
    if w.contains("**") {
        return Err(format!("invalid wildcard {w:?}: \"**\""));
    }
    let body: Vec<String> = w.split('*').map(regex::escape).collect();
    regex::Regex::new(&format!("^{}$", body.join("(.*)")))
        .map_err(|e| format!("wildcard {w:?}: {e}"))
}

impl Rule {
    fn matches(&self, src: &Source) -> bool {
        let attr = |k: &str| src.attrs.get(k).map_or("", String::as_str);
        let constraints_hold = self.constraints.iter().all(|(k, v, cond, re)| match cond {
            Condition::Equal => attr(k) == v,
            Condition::NotEqual => attr(k) != v,
            Condition::Matches => re.as_ref().is_some_and(|re| re.is_match(attr(k))),
        });
        if !constraints_hold {
            return false;
        }
        if self.identifier == src.identifier {
            return true;
        }
        match &self.matcher {
            Matcher::Exact => false,
            Matcher::Wildcard(re) | Matcher::Regex(re) => re.is_match(&src.identifier),
        }
    }

    /// Apply a CONVERT rule; whether it changed `src`.
    fn convert(&self, src: &mut Source) -> bool {
        let Some((to, attrs)) = &self.update else {
            return false;
        };
        let template = if to.is_empty() { &self.identifier } else { to };
        let dest = match &self.matcher {
            Matcher::Exact => template.clone(),
            Matcher::Regex(re) => re
                .replace_all(&src.identifier, template.as_str())
                .into_owned(),
            Matcher::Wildcard(re) => match re.captures(&src.identifier) {
                Some(c) => {
                    let mut out = String::new();
                    c.expand(template, &mut out);
                    out
                }
                None => src.identifier.clone(),
            },
        };
        let mut changed = false;
        if !dest.is_empty() && dest != src.identifier {
            src.identifier = dest;
            changed = true;
        }
        for (k, v) in attrs {
            if src.attrs.get(k) != Some(v) {
                src.attrs.insert(k.clone(), v.clone());
                changed = true;
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: &str) -> SourcePolicy {
        SourcePolicy::parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn the_last_allow_or_deny_that_matches_decides() {
        let p = policy(
            r#"{"rules":[
              {"action":"DENY","selector":{"identifier":"docker-image://*"}},
              {"action":"ALLOW","selector":{"identifier":"docker-image://docker.io/library/alpine:*"}}
            ]}"#,
        );
        assert!(p.evaluate(&Source::image("alpine:3.20")).is_ok());
        let e = p.evaluate(&Source::image("busybox")).unwrap_err();
        assert!(
            e.to_string()
                .contains("docker.io/library/busybox:latest\" denied"),
            "{e}"
        );
        assert!(p.evaluate(&Source::new("https://example.com/f")).is_ok());
    }

    #[test]
    fn conversions_use_the_groups_and_set_attributes() {
        let p = policy(
            r#"{"rules":[
              {"action":"CONVERT","selector":{"identifier":"docker-image://docker.io/library/*:latest"},
               "updates":{"identifier":"docker-image://mirror.local/$1:stable"}},
              {"action":"CONVERT","selector":{"identifier":"https://(.*)/old/(.*)","match_type":"REGEX"},
               "updates":{"identifier":"https://$1/new/$2","attrs":{"http.checksum":"sha256:ab"}}}
            ]}"#,
        );
        assert_eq!(
            p.evaluate(&Source::image("alpine")).unwrap().identifier,
            "docker-image://mirror.local/alpine:stable"
        );
        let s = p.evaluate(&Source::new("https://h/old/f.tar")).unwrap();
        assert_eq!(s.identifier, "https://h/new/f.tar");
        assert_eq!(s.attrs["http.checksum"], "sha256:ab");
    }

    #[test]
    fn git_sources_are_named_as_buildkit_names_them() {
        let id = |u: &str, r: &str| Source::git(u, r).identifier;
        assert_eq!(
            id(
                "https://github.com/moby/buildkit.git#v0.1",
                "https://github.com/moby/buildkit.git"
            ),
            "git://github.com/moby/buildkit.git#v0.1"
        );
        assert_eq!(
            id("git@host:org/repo.git", "git@host:org/repo.git"),
            "git://host/org/repo.git"
        );
        assert_eq!(
            id("ssh://git@host:22/r", "ssh://git@host:22/r"),
            "git://host:22/r"
        );
    }

    #[test]
    fn a_conversion_loop_and_bad_rules_are_errors() {
        let p = policy(
            r#"{"rules":[
              {"action":"CONVERT","selector":{"identifier":"local://a"},"updates":{"identifier":"local://b"}},
              {"action":"CONVERT","selector":{"identifier":"local://b"},"updates":{"identifier":"local://a"}}
            ]}"#,
        );
        assert!(matches!(
            p.evaluate(&Source::new("local://a")),
            Err(PolicyError::TooMany(_))
        ));
        for bad in [
            r#"{"rules":[{"action":"MAYBE","selector":{"identifier":"x"}}]}"#,
            r#"{"rules":[{"action":"CONVERT","selector":{"identifier":"x"}}]}"#,
            r#"{"rules":[{"selector":{"identifier":"a**b"}}]}"#,
            r#"{"rules":[{"selector":{"identifier":"x","match_type":"REGEX","constraints":[]},"extra":1}]}"#,
        ] {
            assert!(SourcePolicy::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
