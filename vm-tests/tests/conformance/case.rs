//! The case format of the BuildKit conformance suite: one TOML file per
//! BuildKit test file under `vm-tests/conformance/buildkit/`, one
//! `[[case]]` per BuildKit test function or subtest. The format is kiln's
//! own; `vm-tests/conformance/README.md` documents every key.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// One TOML file: the cases translated from one BuildKit test file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    /// The BuildKit test file, e.g. `dockerfile_add_test.go`.
    pub source: String,
    #[serde(default, rename = "case")]
    pub cases: Vec<Case>,
}

/// What the runner does with a case and how the table counts it.
#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Run; must pass.
    #[default]
    Run,
    /// Run; asserts kiln's behaviour where it differs from BuildKit on
    /// purpose (`reason` says why). Counts as a pass.
    Differs,
    /// Run; known to fail (`reason` says what kiln lacks). A pass is an
    /// error, so the table cannot go stale.
    Fails,
    /// Not applicable to kiln (`reason` says why); not run.
    Na,
    /// Applicable once a feature lands (`reason` names it); not run.
    Pending,
}

/// A case: its identity, then its first build (the same keys as a
/// [`Build`]), then more builds in `[[case.then]]`.
#[derive(Deserialize)]
pub struct Case {
    /// The BuildKit test function, `testName` or `testName/subtest`.
    pub name: String,
    #[serde(default)]
    pub status: Status,
    #[serde(default)]
    pub reason: String,
    /// A note from the translation (what the Go test checks that this
    /// case does differently, and why). Not printed.
    #[serde(default)]
    #[allow(dead_code)]
    pub note: String,
    /// Build on a state directory of the case's own (cache tests);
    /// otherwise the state directory is shared by all cases.
    #[serde(default)]
    pub own_state: bool,
    /// Files the case's HTTP server serves at `$HTTP/PATH`.
    #[serde(default)]
    pub serve: Vec<Served>,
    /// Git repositories served at `$HTTP/git/NAME.git`.
    #[serde(default)]
    pub repo: Vec<Repo>,
    #[serde(flatten)]
    pub first: Build,
    #[serde(default)]
    pub then: Vec<Build>,
}

pub const CASE_KEYS: &[&str] = &[
    "name",
    "status",
    "reason",
    "note",
    "own_state",
    "serve",
    "repo",
    "then",
];

/// One `kiln build` and what it must produce.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Build {
    /// The Dockerfile, written to `file` (default `Dockerfile`) in the
    /// context, `@HTTP@` substituted. A later build without it keeps the
    /// previous one.
    pub dockerfile: Option<String>,
    /// The Dockerfile's path relative to the context directory, passed
    /// as `-f` when set.
    pub file: Option<String>,
    /// Files written before the build (on top of earlier builds' files).
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// A shell script run (`sh -e`, in the case directory, before the
    /// files are written) to make what `files` cannot: archives, hard
    /// links, many files. `@DIR@` and `@HTTP@` are substituted.
    pub setup: Option<String>,
    /// Paths removed before the build (relative to the case directory's
    /// `ctx/` unless they start with another directory name and `in`).
    #[serde(default)]
    pub remove: Vec<String>,
    /// More `kiln build` arguments; `@DIR@` is the case directory, `@CTX@`
    /// its context, `@HTTP@` the case's HTTP server.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment of the kiln process, `K=V` (same substitutions).
    #[serde(default)]
    pub env: Vec<String>,
    /// The context directory, a directory of the case (default `ctx`),
    /// or `-` for a tar of `ctx` on standard input.
    pub context: Option<String>,
    /// Run `kiln prune --all` on the state directory first (BuildKit's
    /// `ensurePruneAll`); use with `own_state`.
    #[serde(default)]
    pub prune: bool,
    /// The exit status kiln must end with (default 0; with `error`,
    /// any failure).
    pub exit: Option<i32>,
    /// The build must fail, with this text in its error output.
    pub error: Option<String>,
    /// Texts the error output must contain (warnings, progress).
    #[serde(default)]
    pub stderr: Vec<String>,
    /// Texts the error output must not contain.
    #[serde(default)]
    pub not_stderr: Vec<String>,
    /// Texts the standard output must contain.
    #[serde(default)]
    pub stdout: Vec<String>,
    /// Checks of the exported filesystem.
    #[serde(default)]
    pub expect: Vec<FileCheck>,
    /// JSON pointers into `{"index", "manifest", "image"}` of the OCI
    /// output (index.json, the image manifest, the image config) and the
    /// value each must have.
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
    /// JSON pointers whose string value must contain the text.
    #[serde(default)]
    pub config_contains: BTreeMap<String, String>,
    /// JSON pointers that must be absent (or null).
    #[serde(default)]
    pub config_absent: Vec<String>,
    /// JSON pointers to arrays and the length each must have.
    #[serde(default)]
    pub config_len: BTreeMap<String, usize>,
    /// Steps (text of their progress line) that must be cached.
    #[serde(default)]
    pub cached: Vec<String>,
    /// Steps that must not be cached.
    #[serde(default)]
    pub not_cached: Vec<String>,
}

pub const BUILD_KEYS: &[&str] = &[
    "dockerfile",
    "file",
    "files",
    "remove",
    "setup",
    "args",
    "env",
    "context",
    "prune",
    "exit",
    "error",
    "stderr",
    "not_stderr",
    "stdout",
    "expect",
    "config",
    "config_contains",
    "config_absent",
    "config_len",
    "cached",
    "not_cached",
];

/// A file the case's HTTP server serves.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Served {
    /// The URL path, e.g. `/foo.tar`.
    pub path: String,
    pub data: Option<String>,
    /// Binary contents, base64.
    pub base64: Option<String>,
    /// The status line's code and reason (default `200 OK`).
    pub status: Option<String>,
    /// More response headers, `Name: value`.
    #[serde(default)]
    pub headers: Vec<String>,
}

/// A git repository the case's HTTP server serves: `script` runs with
/// `sh -e` in a fresh repository (`git init`, user set, dates fixed).
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Repo {
    pub name: String,
    pub script: String,
    /// The initial branch (default `master`).
    pub branch: Option<String>,
}

/// A file, directory or symlink of a context.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub path: String,
    /// Contents of a regular file (`@HTTP@` substituted).
    pub data: Option<String>,
    /// Binary contents, base64.
    pub base64: Option<String>,
    /// Permission bits (default 0644 for files, 0755 for directories).
    pub mode: Option<u32>,
    /// Make a symlink to this target instead.
    pub symlink: Option<String>,
    /// Make a directory instead.
    #[serde(default)]
    pub dir: bool,
    /// The case directory it goes in (default `ctx`).
    #[serde(rename = "in")]
    pub in_dir: Option<String>,
}

/// A check of one path of the exported filesystem. Checks that read
/// owners (`uid`, `gid`) read the `type=tar` output, the others the
/// `type=local` one.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileCheck {
    pub path: String,
    /// Exact contents.
    pub content: Option<String>,
    /// A text the contents contain.
    pub contains: Option<String>,
    /// A text the contents do not contain.
    pub not_contains: Option<String>,
    /// The path must not exist.
    #[serde(default)]
    pub absent: bool,
    /// The path must be a directory.
    #[serde(default)]
    pub dir: bool,
    /// Permission bits (& 0o7777).
    pub mode: Option<u32>,
    /// A symlink with this target.
    pub link: Option<String>,
    pub uid: Option<u64>,
    pub gid: Option<u64>,
    /// The same contents as in build N's output (0 is the first build).
    pub same_as: Option<usize>,
    /// Other contents than in build N's output.
    pub differs_from: Option<usize>,
    /// Which output the path is in: `local` (the default), `oci` (the
    /// OCI layout directory: `index.json`, `blobs/...`) or `tar` (owner
    /// checks always read `tar`).
    pub output: Option<String>,
    /// A directory whose entries are exactly these names.
    pub entries: Option<Vec<String>>,
}

/// Read and check one suite file: unknown keys anywhere are an error
/// naming the file and case, so a typo never drops an expectation.
pub fn load(path: &Path) -> Result<Suite, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value: toml::Table = text
        .parse()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(cases) = value.get("case").and_then(toml::Value::as_array) {
        for c in cases {
            let t = c.as_table().ok_or("a case is not a table")?;
            let name = t.get("name").and_then(toml::Value::as_str).unwrap_or("?");
            for k in t.keys() {
                if !CASE_KEYS.contains(&k.as_str()) && !BUILD_KEYS.contains(&k.as_str()) {
                    return Err(format!(
                        "{}: case {name}: unknown key {k:?}",
                        path.display()
                    ));
                }
            }
        }
    }
    let suite: Suite = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    for c in &suite.cases {
        let needs_reason = matches!(
            c.status,
            Status::Differs | Status::Fails | Status::Na | Status::Pending
        );
        if needs_reason && c.reason.trim().is_empty() {
            return Err(format!(
                "{}: case {}: status {:?} needs a reason",
                path.display(),
                c.name,
                c.status
            ));
        }
        let runs = matches!(c.status, Status::Run | Status::Differs | Status::Fails);
        let remote = c
            .first
            .context
            .as_deref()
            .is_some_and(|x| x.contains("://") || x.starts_with("git@"));
        if runs && c.first.dockerfile.is_none() && !remote {
            return Err(format!(
                "{}: case {}: no dockerfile",
                path.display(),
                c.name
            ));
        }
    }
    Ok(suite)
}
