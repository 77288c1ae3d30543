//! `.dockerignore` files: reading them and matching context paths against
//! them, as BuildKit and Docker do.
//!
//! Rules: a UTF-8 BOM is stripped, lines starting with `#` are comments,
//! lines are trimmed and cleaned (`path.Clean`), a leading `/` is dropped,
//! `!` negates, patterns use Go `filepath.Match` syntax (`*`, `?`, `[...]`,
//! `\` escapes) plus `**` for any number of directories, and the last
//! matching line wins. A path also matches when one of its parent
//! directories does. A `NAME.dockerignore` beside a Dockerfile named `NAME`
//! replaces the context's `.dockerignore` (they are not merged).
//!
//! This module only decides; it never walks or reads the context itself,
//! except [`load`], which reads the ignore file.

use std::path::{Path, PathBuf};

use regex::Regex;

use super::clean_path;

/// Why ignore patterns could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DockerignoreError {
    /// A line holding only `!`.
    #[error("illegal exclusion pattern: \"!\" on line {0}; write !PATTERN")]
    IllegalExclusion(usize),
    /// A pattern `filepath.Match` would reject, e.g. an unclosed `[`.
    #[error("syntax error in pattern {pattern:?} on line {line}: {reason}")]
    BadPattern {
        line: usize,
        pattern: String,
        reason: String,
    },
    /// An error in the ignore file `path` (the source says which): the
    /// build stops rather than send what the file meant to exclude.
    #[error("{path}")]
    InFile {
        path: PathBuf,
        source: Box<DockerignoreError>,
    },
    /// The ignore file exists but cannot be read (the source says why).
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, DockerignoreError>;

#[derive(Debug, Clone)]
struct Pattern {
    text: String,
    exclusion: bool,
    regex: Regex,
}

/// A compiled list of ignore patterns.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    patterns: Vec<Pattern>,
}

/// The patterns of a `.dockerignore` file, cleaned, in order (`!` kept).
pub fn read_patterns(text: &[u8]) -> Vec<String> {
    numbered_patterns(text)
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

/// [`read_patterns`] with the line each pattern is on.
fn numbered_patterns(text: &[u8]) -> Vec<(usize, String)> {
    let text = String::from_utf8_lossy(text);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        // A comment is a `#` in the first column; an indented `#` is a name.
        if line.starts_with('#') {
            continue;
        }
        let mut p = line.trim();
        if p.is_empty() {
            continue;
        }
        let invert = p.starts_with('!');
        if invert {
            p = p[1..].trim();
        }
        let mut cleaned = String::new();
        if !p.is_empty() {
            cleaned = clean_path(p);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
        }
        out.push((
            n + 1,
            if invert {
                format!("!{cleaned}")
            } else {
                cleaned
            },
        ));
    }
    out
}

fn compile(pattern: &str) -> std::result::Result<Regex, String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut re = String::from("(?s)^");
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                if i == chars.len() {
                    re.push_str(".*");
                } else {
                    re.push_str("(.*/)?");
                }
            }
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            '\\' => match chars.get(i) {
                Some(n) => {
                    re.push_str(&regex::escape(&n.to_string()));
                    i += 1;
                }
                None => re.push_str("\\\\"),
            },
            '[' => {
                // A bracket expression, passed to the regex with Go's
                // negation `^` kept and `\` escapes preserved.
                let start = i;
                let mut j = i;
                if chars.get(j) == Some(&'^') {
                    j += 1;
                }
                let mut closed = false;
                while j < chars.len() {
                    match chars[j] {
                        '\\' => j += 2,
                        ']' if j > start => {
                            closed = true;
                            break;
                        }
                        _ => j += 1,
                    }
                }
                if !closed {
                    return Err("missing closing ]".into());
                }
                let body: String = chars[start..j].iter().collect();
                if body.is_empty() || body == "^" {
                    return Err("empty character class".into());
                }
                re.push('[');
                for (k, ch) in body.chars().enumerate() {
                    if ch == '[' || (ch == '&' || ch == '~' || ch == '-') && k == 0 {
                        re.push('\\');
                    }
                    re.push(ch);
                }
                re.push(']');
                i = j + 1;
            }
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    Regex::new(&re).map_err(|e| e.to_string())
}

impl Matcher {
    /// Compile cleaned patterns (as from [`read_patterns`]); errors give
    /// a pattern's place in the list as its line.
    pub fn new<S: AsRef<str>>(patterns: impl IntoIterator<Item = S>) -> Result<Self> {
        Matcher::numbered(patterns.into_iter().enumerate().map(|(n, p)| (n + 1, p)))
    }

    fn numbered<S: AsRef<str>>(patterns: impl IntoIterator<Item = (usize, S)>) -> Result<Self> {
        let mut out = Vec::new();
        for (line, p) in patterns {
            // cleaned patterns are taken as they are: a space can be a
            // path component (`a/ ` names the directory ` ` in `a`), and
            // trimming it would make `a/ ` the pattern `a`
            let p = p.as_ref();
            if p.trim().is_empty() {
                continue;
            }
            let (exclusion, body) = match p.strip_prefix('!') {
                Some("") => return Err(DockerignoreError::IllegalExclusion(line)),
                Some(b) => (true, clean_path(b)),
                None => (false, clean_path(p)),
            };
            let regex = compile(&body).map_err(|reason| DockerignoreError::BadPattern {
                line,
                pattern: p.to_string(),
                reason,
            })?;
            out.push(Pattern {
                text: body,
                exclusion,
                regex,
            });
        }
        Ok(Matcher { patterns: out })
    }

    /// Read and compile the text of a `.dockerignore` file.
    pub fn from_dockerignore(text: &[u8]) -> Result<Self> {
        Matcher::numbered(numbered_patterns(text))
    }

    /// No patterns: nothing is ignored.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The compiled patterns, `!` included, in order.
    pub fn patterns(&self) -> Vec<String> {
        self.patterns
            .iter()
            .map(|p| {
                if p.exclusion {
                    format!("!{}", p.text)
                } else {
                    p.text.clone()
                }
            })
            .collect()
    }

    /// Is `path` (relative to the context root, `/`-separated) ignored?
    pub fn matches(&self, path: &str) -> bool {
        let cleaned = clean_path(path);
        let file = cleaned.trim_start_matches('/');
        let parent = match file.rfind('/') {
            Some(i) => self.dir_hits(&file[..i]),
            None => self.no_hits(),
        };
        self.decide(file, &parent)
    }

    /// [`Matcher::matches`] of `path`, an entry of the directory `parent`
    /// describes: a walk pays one regex match per pattern and path instead
    /// of one per parent directory too.
    pub fn matches_in(&self, parent: &DirHits, path: &str) -> bool {
        let cleaned = clean_path(path);
        self.decide(cleaned.trim_start_matches('/'), parent)
    }

    /// Which patterns match no directory: those of the context root.
    pub fn no_hits(&self) -> DirHits {
        DirHits(vec![false; self.patterns.len()])
    }

    /// Which patterns match the directory `dir` or one of its parents.
    pub fn dir_hits(&self, dir: &str) -> DirHits {
        let cleaned = clean_path(dir);
        let dir = cleaned.trim_start_matches('/');
        let mut hits = self.no_hits();
        if dir.is_empty() || dir == "." {
            return hits;
        }
        let mut prefix = String::new();
        for (i, d) in dir.split('/').enumerate() {
            if i > 0 {
                prefix.push('/');
            }
            prefix.push_str(d);
            hits = DirHits(
                self.patterns
                    .iter()
                    .zip(&hits.0)
                    .map(|(p, &hit)| hit || p.regex.is_match(&prefix))
                    .collect(),
            );
        }
        hits
    }

    /// The hits of the directory `dir`, a child of the one `parent`
    /// describes.
    pub fn child_hits(&self, parent: &DirHits, dir: &str) -> DirHits {
        let cleaned = clean_path(dir);
        let dir = cleaned.trim_start_matches('/');
        DirHits(
            self.patterns
                .iter()
                .zip(&parent.0)
                .map(|(p, &hit)| hit || p.regex.is_match(dir))
                .collect(),
        )
    }

    /// The patterns in order, as Docker applies them: the last one that
    /// matches `file` or one of its parents decides.
    fn decide(&self, file: &str, parent: &DirHits) -> bool {
        if file.is_empty() || file == "." {
            return false;
        }
        let mut matched = false;
        for (p, &parent_hit) in self.patterns.iter().zip(&parent.0) {
            // An include that already matched, or an exclusion with nothing
            // to undo, cannot change the outcome.
            if p.exclusion != matched {
                continue;
            }
            if parent_hit || p.regex.is_match(file) {
                matched = !p.exclusion;
            }
        }
        matched
    }
}

/// Which patterns of a [`Matcher`] match a directory or one of its
/// parents, for [`Matcher::matches_in`].
#[derive(Clone, Default)]
pub struct DirHits(Vec<bool>);

/// Where the ignore file for `dockerfile` in `context` is: `NAME.dockerignore`
/// beside the Dockerfile if it exists, else `CONTEXT/.dockerignore`.
pub fn ignore_file(context: &Path, dockerfile: &Path) -> PathBuf {
    if let Some(name) = dockerfile.file_name() {
        let mut specific = name.to_os_string();
        specific.push(".dockerignore");
        let candidate = dockerfile.with_file_name(specific);
        if candidate.is_file() {
            return candidate;
        }
    }
    context.join(".dockerignore")
}

/// Load the matcher for `dockerfile` building `context`; empty when there is
/// no ignore file.
pub fn load(context: &Path, dockerfile: &Path) -> Result<Matcher> {
    let path = ignore_file(context, dockerfile);
    match std::fs::read(&path) {
        Ok(text) => Matcher::from_dockerignore(&text).map_err(|e| DockerignoreError::InFile {
            path,
            source: Box::new(e),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Matcher::default()),
        Err(source) => Err(DockerignoreError::Io { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(file: &str) -> Matcher {
        Matcher::from_dockerignore(file.as_bytes()).unwrap()
    }

    #[test]
    fn a_walk_with_directory_hits_decides_as_whole_paths_do() {
        let files = [
            "*.log\n!keep/*.log\nbuild\n!build/out\n",
            "a\n!a\na/b\n",
            "**/x\n!y/**/x\n",
            "src/*/gen\n!src/keep/gen\ntmp*\n",
        ];
        let dirs = [
            "",
            "a",
            "a/b",
            "keep",
            "build",
            "y",
            "y/z",
            "src",
            "src/keep",
            "src/other",
        ];
        let names = ["x", "b", "gen", "out", "z.log", "tmp1", "a"];
        for f in files {
            let matcher = m(f);
            for dir in dirs {
                let hits = matcher.dir_hits(dir);
                // the hits of a child directory, built one level down
                for name in names {
                    let path = if dir.is_empty() {
                        name.to_string()
                    } else {
                        format!("{dir}/{name}")
                    };
                    assert_eq!(
                        matcher.matches_in(&hits, &path),
                        matcher.matches(&path),
                        "{f:?} {path}"
                    );
                    let child = matcher.child_hits(&hits, &path);
                    for leaf in names {
                        let deeper = format!("{path}/{leaf}");
                        assert_eq!(
                            matcher.matches_in(&child, &deeper),
                            matcher.matches(&deeper),
                            "{f:?} {deeper}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn reading_cleans_and_skips_comments() {
        assert_eq!(
            read_patterns(
                "\u{feff}# c\n  \n/abs/./x/\n !  keep \n  #notcomment\na/../b\n".as_bytes()
            ),
            ["abs/x", "!keep", "#notcomment", "b"]
        );
    }

    #[test]
    fn globs_and_double_star() {
        let t = m("*.md\n**/*.log\ndocs/**\nbuild/?\n[a-c]x\n");
        for yes in [
            "README.md",
            "a.log",
            "x/y/z.log",
            "docs/a/b",
            "build/1",
            "bx",
        ] {
            assert!(t.matches(yes), "{yes}");
        }
        for no in [
            "sub/README.md",
            "build/12",
            "dx",
            "src/main.rs",
            "doc",
            "docs",
        ] {
            assert!(!t.matches(no), "{no}");
        }
    }

    #[test]
    fn parents_and_exceptions_in_order() {
        let t = m("node_modules\n*.txt\n!keep.txt\n");
        assert!(t.matches("node_modules/a/b.js"));
        assert!(t.matches("a.txt"));
        assert!(!t.matches("keep.txt"));
        let t = m("!keep.txt\n*.txt\n");
        assert!(t.matches("keep.txt"), "the last matching line wins");
        let t = m("dir\n!dir/keep\n");
        assert!(t.matches("dir/other"));
        assert!(!t.matches("dir/keep"));
        assert!(
            !t.matches("dir/keep/deeper"),
            "an exception covers what is under it"
        );
    }

    #[test]
    fn paths_are_cleaned() {
        let t = m("a/b\n");
        assert!(t.matches("./a/b"));
        assert!(t.matches("/a//b/"));
        assert!(t.matches("a/c/../b"));
        assert!(!t.matches("."));
    }

    #[test]
    fn escapes_and_errors() {
        let t = m("\\*literal\nq\\?\n");
        assert!(t.matches("*literal"));
        assert!(!t.matches("xliteral"));
        assert!(t.matches("q?"));
        assert!(!t.matches("qx"));
        assert!(matches!(
            Matcher::new(["!"]),
            Err(DockerignoreError::IllegalExclusion(1))
        ));
        assert!(matches!(
            Matcher::new(["[abc"]),
            Err(DockerignoreError::BadPattern { .. })
        ));
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(".dockerignore");
        std::fs::write(&file, "# secrets\n\nsecret.key\n[abc\n").unwrap();
        let err = load(dir.path(), &dir.path().join("Dockerfile")).unwrap_err();
        assert_eq!(err.to_string(), file.display().to_string());
        assert_eq!(
            kiln_sys::error_chain(&err),
            format!(
                "{}: syntax error in pattern \"[abc\" on line 4: missing closing ]",
                file.display()
            )
        );
        std::fs::write(&file, "a\n!\n").unwrap();
        let err = load(dir.path(), &dir.path().join("Dockerfile")).unwrap_err();
        assert!(
            kiln_sys::error_chain(&err).ends_with("on line 2; write !PATTERN"),
            "{err}"
        );
    }

    #[test]
    fn an_unreadable_ignore_file_says_so_and_why() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: it exists but cannot be read.
        std::fs::create_dir(dir.path().join(".dockerignore")).unwrap();
        let err = load(dir.path(), &dir.path().join("Dockerfile")).unwrap_err();
        let path = dir.path().join(".dockerignore");
        assert_eq!(err.to_string(), format!("cannot read {}", path.display()));
        let why = std::fs::read(&path).unwrap_err();
        assert_eq!(
            kiln_sys::error_chain(&err),
            format!("cannot read {}: {why}", path.display())
        );
    }

    #[test]
    fn dockerfile_specific_ignore_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".dockerignore"), "root-only\n").unwrap();
        let df = dir.path().join("sub/app.Dockerfile");
        std::fs::create_dir_all(df.parent().unwrap()).unwrap();
        std::fs::write(&df, "FROM a\n").unwrap();
        let root = load(dir.path(), &df).unwrap();
        assert!(root.matches("root-only"));
        std::fs::write(
            dir.path().join("sub/app.Dockerfile.dockerignore"),
            "specific\n",
        )
        .unwrap();
        let specific = load(dir.path(), &df).unwrap();
        assert!(specific.matches("specific"));
        assert!(!specific.matches("root-only"), "not merged");
        assert!(load(
            &dir.path().join("none"),
            &dir.path().join("none/Dockerfile")
        )
        .unwrap()
        .is_empty());
    }
}
#[cfg(test)]
mod fuzz_regressions {
    use super::*;

    /// Found by the dockerignore fuzz target: a pattern ending in a
    /// space component matched differently once its cleaned text was
    /// compiled again (the space was trimmed away).
    #[test]
    fn cleaned_patterns_compile_to_the_same_matcher() {
        let m = Matcher::from_dockerignore(b"a/ /  /\n.b//!/\xfb").unwrap();
        let again = Matcher::new(m.patterns()).unwrap();
        for path in ["a/b~", "a/ ", "a/ /x", "a"] {
            assert_eq!(m.matches(path), again.matches(path), "{path:?}");
        }
        assert!(!again.matches("a/b~"));
    }
}
