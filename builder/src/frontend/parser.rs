//! The raw Dockerfile parser: bytes to a syntax tree of instructions.
//!
//! This layer matches BuildKit's `parser` package: it handles parser
//! directives, comments, line continuations, JSON-versus-shell form, flags
//! before the arguments, and heredoc bodies, and records where each
//! instruction starts and ends. It does not know what an instruction means:
//! unknown instructions and flags pass through here and are rejected by
//! [`super::instructions`]. [`Ast::dump`] prints the tree in BuildKit's
//! `result` format so the two parsers can be compared byte for byte.
//!
//! Every step is linear in the input: lines are scanned once, continuation
//! lines and heredoc bodies are appended to growable buffers, and no regex
//! with backtracking is involved.

use serde::Serialize;

use super::location::{Location, SourceMap};
use super::shell::{is_space, Lexer, NoEnv};

/// Why a Dockerfile could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Nothing but comments and blank lines.
    #[error("file with no instructions; a Dockerfile needs at least a FROM line")]
    NoInstructions,
    /// `# escape=x` with something other than `\` or a backtick.
    #[error(
        "invalid escape token '{0}' does not match ` or \\; use `# escape=\\` or `# escape=``"
    )]
    InvalidEscape(String),
    /// The same directive twice.
    #[error("only one {0} parser directive can be used; remove the second one")]
    DuplicateDirective(String),
    /// `ENV name` / `LABEL name` without a value.
    #[error("{0} must have two arguments; write `{0} name=value`")]
    MissingValue(String),
    /// `ENV a=b c` in the `k=v` form.
    #[error("syntax error - can't find = in {0:?}; must be of the form name=value")]
    MissingEquals(String),
    /// A JSON array holding something other than strings.
    #[error("when using JSON array syntax, arrays must be comprised of strings only")]
    NotStringArray,
    /// Hundreds of ONBUILDs in one line.
    #[error("ONBUILD nested more than {MAX_ONBUILD_NESTING} times; ONBUILD cannot hold ONBUILD")]
    OnbuildTooDeep,
    /// A physical line longer than BuildKit's scanner accepts.
    #[error("dockerfile line greater than max allowed size of {MAX_LINE}; split it with line continuations")]
    LineTooLong,
    /// `# check=` with an option BuildKit does not know.
    #[error("invalid check option {0:?}; use skip=RULE,... or skip=all, error=true|false, experimental=RULE,...")]
    CheckOption(String),
    /// A heredoc without its terminator line.
    #[error("unterminated heredoc {0:?}; end it with a line holding only {0}")]
    UnterminatedHeredoc(String),
}

/// A parse failure and where it happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {kind}\n{}", location.snippet())]
pub struct LocatedParseError {
    /// Where.
    pub location: Location,
    /// What.
    pub kind: ParseError,
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, LocatedParseError>;

/// Longest physical line, as BuildKit's line scanner allows.
pub const MAX_LINE: usize = 65535;

/// Deepest `ONBUILD ONBUILD ...` chain the raw parser builds.
pub const MAX_ONBUILD_NESTING: usize = 32;

/// A parser directive from the top of the file (`# syntax=...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Directive {
    /// Lower-case name: `syntax`, `escape` or `check`.
    pub name: String,
    /// The value, trimmed.
    pub value: String,
    /// 1-based line.
    pub line: usize,
}

/// A heredoc attached to an instruction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Heredoc {
    /// The delimiter word, quotes removed.
    pub name: String,
    /// The file descriptor before `<<` (`3<<EOF`), 0 when absent.
    pub fd: u32,
    /// Whether the body is expanded (false when the delimiter was quoted).
    pub expand: bool,
    /// `<<-`: leading tabs are stripped from the body.
    pub chomp: bool,
    /// The body, line endings included, terminator excluded.
    pub content: String,
}

impl Heredoc {
    /// The body with leading tabs removed when the heredoc is `<<-`.
    pub fn body(&self) -> String {
        if !self.chomp {
            return self.content.clone();
        }
        let mut out = String::with_capacity(self.content.len());
        for line in self.content.split_inclusive('\n') {
            out.push_str(line.trim_start_matches('\t'));
        }
        out
    }
}

/// The `# check=` directive: which lint rules to skip and whether lint
/// findings fail the build.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CheckOptions {
    /// Rules not to report (`all` skips every rule).
    pub skip: Vec<String>,
    /// Findings are errors.
    pub error: bool,
    /// Experimental rules to enable.
    pub experimental: Vec<String>,
}

impl CheckOptions {
    /// Parse `skip=A,B;error=true;experimental=C`, as the `# check=`
    /// directive and the BUILDKIT_DOCKERFILE_CHECK build arg give it; the
    /// error is the option at fault.
    pub fn parse(value: &str) -> std::result::Result<CheckOptions, String> {
        let bad = |opt: &str| opt.to_string();
        let mut out = CheckOptions::default();
        for opt in value.split(';').map(str::trim).filter(|o| !o.is_empty()) {
            let Some((k, v)) = opt.split_once('=') else {
                return Err(bad(opt));
            };
            let list = || -> Vec<String> {
                v.split(',')
                    .map(str::trim)
                    .filter(|r| !r.is_empty())
                    .map(str::to_string)
                    .collect()
            };
            match k.trim().to_ascii_lowercase().as_str() {
                "skip" => out.skip = list(),
                "experimental" => out.experimental = list(),
                "error" => {
                    out.error = match v.trim().to_ascii_lowercase().as_str() {
                        "1" | "t" | "true" => true,
                        "0" | "f" | "false" => false,
                        _ => return Err(bad(opt)),
                    }
                }
                _ => return Err(bad(opt)),
            }
        }
        Ok(out)
    }

    /// Is `rule` switched off?
    pub fn skips(&self, rule: &str) -> bool {
        self.skip.iter().any(|s| s == "all" || s == rule)
    }

    /// Is `rule` reported? An experimental rule only when named in
    /// `experimental=` (or `all`), which `skip=` does not change.
    pub fn reports(&self, rule: &str, experimental: bool) -> bool {
        if experimental {
            self.experimental.iter().any(|e| e == "all" || e == rule)
        } else {
            !self.skips(rule)
        }
    }
}

/// A non-fatal finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// 1-based line.
    pub line: usize,
    /// What is wrong and what to do.
    pub message: String,
}

/// One instruction of the raw tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    /// Lower-case instruction keyword as written (may be unknown).
    pub instruction: String,
    /// `--flag[=value]` words before the arguments, quotes removed.
    pub flags: Vec<String>,
    /// The arguments: JSON elements, whitespace-separated words, the rest of
    /// the line, or key/value/separator triples for ENV and LABEL.
    pub args: Vec<String>,
    /// For ONBUILD, the instruction it holds.
    pub sub: Option<Box<Node>>,
    /// The arguments came from a JSON array (exec form).
    pub json: bool,
    /// Heredoc bodies, in order.
    pub heredocs: Vec<Heredoc>,
    /// The logical line after joining continuations.
    pub original: String,
    /// First physical line (1-based).
    pub start_line: usize,
    /// Last physical line, heredoc bodies included.
    pub end_line: usize,
    /// Comment lines directly above the instruction.
    pub comments: Vec<String>,
}

impl Node {
    /// BuildKit's s-expression for this node (without the surrounding parens).
    pub fn dump(&self) -> String {
        let mut s = self.instruction.to_lowercase();
        if !self.flags.is_empty() {
            s.push_str(" [");
            for (i, f) in self.flags.iter().enumerate() {
                if i > 0 {
                    s.push(' ');
                }
                s.push_str(&go_quote(f));
            }
            s.push(']');
        }
        if let Some(sub) = &self.sub {
            s.push_str(" (");
            s.push_str(&sub.dump());
            s.push(')');
        }
        for a in &self.args {
            s.push(' ');
            s.push_str(&go_quote(a));
        }
        s.trim_matches(is_space).to_string()
    }
}

/// A parsed Dockerfile.
#[derive(Debug, Clone)]
pub struct Ast {
    /// Parser directives found at the top.
    pub directives: Vec<Directive>,
    /// The escape character in force.
    pub escape: char,
    /// The instructions in order.
    pub nodes: Vec<Node>,
    /// Findings that do not stop the build.
    pub warnings: Vec<Warning>,
    /// The source, for error locations.
    pub source: SourceMap,
}

impl Ast {
    /// The tree in the format of BuildKit's `parser/testfiles/*/result`.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            out.push('(');
            out.push_str(&n.dump());
            out.push_str(")\n");
        }
        out
    }

    /// The `# check=` directive, parsed; defaults when absent.
    pub fn check_options(&self) -> std::result::Result<CheckOptions, LocatedParseError> {
        let Some(d) = self.directives.iter().find(|d| d.name == "check") else {
            return Ok(CheckOptions::default());
        };
        CheckOptions::parse(&d.value).map_err(|opt| LocatedParseError {
            location: self.source.find(d.line, &opt),
            kind: ParseError::CheckOption(opt),
        })
    }

    /// The value of directive `name`, if present.
    pub fn directive(&self, name: &str) -> Option<&str> {
        self.directives
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.value.as_str())
    }
}

/// Quote `s` the way Go's `strconv.Quote` does.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if go_is_print(c) => out.push(c),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if (c as u32) < 0x10000 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('"');
    out
}

/// Go's `unicode.IsPrint`, close enough for dumps: graphic characters and
/// the ASCII space, not other spaces, controls, format or private-use ones.
fn go_is_print(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    let u = c as u32;
    !matches!(u,
        0xad | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x180e | 0x200b..=0x200f
        | 0x202a..=0x202e | 0x2060..=0x206f | 0xd800..=0xdfff | 0xe000..=0xf8ff
        | 0xfeff | 0xfff9..=0xfffb | 0xfffe | 0xffff | 0xf0000..)
}

/// Go's `strings.TrimSpace`.
fn trim_space(s: &str) -> &str {
    s.trim_matches(is_space)
}

/// BuildKit's `[\t\v\f\r ]` whitespace class.
fn is_token_space(c: char) -> bool {
    matches!(c, '\t' | '\u{b}' | '\u{c}' | '\r' | ' ')
}

/// Split on the first run of token whitespace.
fn split_first_token(s: &str) -> (&str, Option<&str>) {
    match s.find(is_token_space) {
        None => (s, None),
        Some(i) => (&s[..i], Some(s[i..].trim_start_matches(is_token_space))),
    }
}

/// Split on every run of token whitespace (like Go's `regexp.Split(s, -1)`).
fn split_token_space(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        match rest.find(is_token_space) {
            None => {
                out.push(rest.to_string());
                return out;
            }
            Some(i) => {
                out.push(rest[..i].to_string());
                rest = rest[i..].trim_start_matches(is_token_space);
            }
        }
    }
}

struct Directives {
    escape: char,
    done: bool,
    seen: Vec<String>,
    found: Vec<Directive>,
}

impl Directives {
    /// Look for `# key=value` while still at the top of the file.
    fn observe(&mut self, line: &str, lineno: usize) -> std::result::Result<bool, ParseError> {
        if self.done {
            return Ok(false);
        }
        let Some(rest) = line.strip_prefix('#') else {
            self.done = true;
            return Ok(false);
        };
        let rest = rest.trim_start_matches(is_space);
        let Some((key, value)) = parse_directive(rest) else {
            self.done = true;
            return Ok(false);
        };
        let key = key.to_ascii_lowercase();
        if !matches!(key.as_str(), "syntax" | "escape" | "check") {
            self.done = true;
            return Ok(false);
        }
        if self.seen.contains(&key) {
            return Err(ParseError::DuplicateDirective(key));
        }
        self.seen.push(key.clone());
        if key == "escape" {
            self.escape = match value {
                "\\" => '\\',
                "`" => '`',
                other => return Err(ParseError::InvalidEscape(other.to_string())),
            };
        }
        self.found.push(Directive {
            name: key,
            value: value.to_string(),
            line: lineno,
        });
        Ok(true)
    }
}

/// `^([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$` by hand.
fn parse_directive(s: &str) -> Option<(&str, &str)> {
    let go_s = |c: char| matches!(c, '\t' | '\n' | '\u{c}' | '\r' | ' ');
    let mut chars = s.char_indices();
    let (_, first) = chars.next()?;
    if !first.is_ascii_alphabetic() {
        return None;
    }
    let end = s
        .char_indices()
        .find(|&(_, c)| !c.is_ascii_alphanumeric())
        .map_or(s.len(), |(i, _)| i);
    let key = &s[..end];
    let rest = s[end..].trim_start_matches(go_s).strip_prefix('=')?;
    let value = rest.trim_matches(go_s);
    if value.is_empty() || value.contains('\n') {
        return None;
    }
    Some((key, value))
}

fn is_comment(line: &str) -> bool {
    line.trim_start_matches(is_space).starts_with('#')
}

fn trim_newline(s: &str) -> &str {
    s.trim_end_matches(['\r', '\n'])
}

/// Strip a trailing escape (plus blanks) that continues the line. An escape
/// preceded by another escape does not continue, matching BuildKit's
/// `([^\\])\\[ \t]*$|^\\[ \t]*$`.
fn trim_continuation(line: &str, escape: char) -> (&str, bool) {
    let body = line.trim_end_matches([' ', '\t']);
    let Some(before) = body.strip_suffix(escape) else {
        return (line, true);
    };
    if before.ends_with(escape) {
        return (line, true);
    }
    (before, false)
}

/// Parse Dockerfile bytes. `file` names the file in error messages.
pub fn parse(src: &[u8], file: &str) -> Result<Ast> {
    let text = String::from_utf8_lossy(src);
    let source = SourceMap::new(file, &text);
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    if let Some(i) = lines.iter().position(|l| trim_newline(l).len() > MAX_LINE) {
        return Err(LocatedParseError {
            location: source.at(i + 1, MAX_LINE + 1),
            kind: ParseError::LineTooLong,
        });
    }
    let mut scanner = Scanner {
        lines,
        next: 0,
        current: 0,
        source: &source,
        dirs: Directives {
            escape: '\\',
            done: false,
            seen: Vec::new(),
            found: Vec::new(),
        },
        comments: Vec::new(),
        warnings: Vec::new(),
    };
    let mut nodes = Vec::new();
    while let Some((start, line)) = scanner.logical_line()? {
        nodes.push(scanner.node(start, &line)?);
    }
    if nodes.is_empty() {
        return Err(LocatedParseError {
            location: source.at(scanner.current.max(1), 1),
            kind: ParseError::NoInstructions,
        });
    }
    Ok(Ast {
        directives: scanner.dirs.found,
        escape: scanner.dirs.escape,
        nodes,
        warnings: scanner.warnings,
        source,
    })
}

/// Reads physical lines into instructions, keeping count of lines, the
/// parser directives at the top and the comments above each instruction.
struct Scanner<'a> {
    lines: Vec<&'a str>,
    /// Index of the next physical line to read.
    next: usize,
    /// 1-based number of the last physical line read.
    current: usize,
    source: &'a SourceMap,
    dirs: Directives,
    /// Comment lines since the last instruction or blank comment.
    comments: Vec<String>,
    warnings: Vec<Warning>,
}

impl<'a> Scanner<'a> {
    fn next_line(&mut self) -> Option<&'a str> {
        let raw = self.lines.get(self.next).copied()?;
        self.next += 1;
        Some(raw)
    }

    fn err(&self, kind: ParseError, line: usize, token: &str) -> LocatedParseError {
        LocatedParseError {
            location: self.source.find(line, token),
            kind,
        }
    }

    /// The next logical line (continuations joined, comments and blank
    /// lines skipped) and the number of its first physical line.
    fn logical_line(&mut self) -> Result<Option<(usize, String)>> {
        while let Some(mut raw) = self.next_line() {
            if self.current == 0 {
                raw = raw.strip_prefix('\u{feff}').unwrap_or(raw);
            }
            if is_comment(raw) {
                let c = trim_space(&trim_space(raw)[1..]);
                if c.is_empty() {
                    self.comments.clear();
                } else {
                    self.comments.push(c.to_string());
                }
            }
            let line = trim_newline(raw).trim_start_matches(is_space);
            let is_directive = self
                .dirs
                .observe(line, self.current + 1)
                .map_err(|k| self.err(k, self.current + 1, ""))?;
            if is_directive {
                self.comments.pop();
            }
            let line = if is_comment(line) { "" } else { line };
            self.current += 1;
            let start = self.current;
            let (first, eol) = trim_continuation(line, self.dirs.escape);
            if eol && first.is_empty() {
                continue;
            }
            let mut buf = String::from(first);
            if !eol {
                self.continuation(&mut buf)?;
            }
            return Ok(Some((start, buf)));
        }
        Ok(None)
    }

    /// Append the continuation lines of a logical line to `buf`: comment
    /// lines are dropped, and empty ones are dropped with a warning.
    fn continuation(&mut self, buf: &mut String) -> Result<()> {
        let mut empty_continuation = false;
        while let Some(raw) = self.next_line() {
            let l = trim_newline(raw);
            self.dirs
                .observe(l, self.current + 1)
                .map_err(|k| self.err(k, self.current + 1, ""))?;
            self.current += 1;
            if is_comment(raw) {
                continue;
            }
            if l.trim_start_matches(is_space).is_empty() {
                empty_continuation = true;
                continue;
            }
            let (part, eol) = trim_continuation(l, self.dirs.escape);
            buf.push_str(part);
            if eol {
                break;
            }
        }
        if empty_continuation {
            self.warnings.push(Warning {
                line: self.current,
                message: format!(
                    "empty continuation line found in: {buf}; empty continuation lines will become errors in a future release"
                ),
            });
        }
        Ok(())
    }

    /// The node for logical line `line` starting on line `start`, with the
    /// bodies of the heredocs it opens read from the lines that follow.
    fn node(&mut self, start: usize, line: &str) -> Result<Node> {
        let mut node =
            node_from_line(line, self.dirs.escape, 0).map_err(|k| self.err(k, start, ""))?;
        if can_contain_heredoc(&node) && line.contains("<<") {
            for doc in heredocs_from_line(line) {
                let doc = self.heredoc_body(doc, start)?;
                node.heredocs.push(doc);
            }
        }
        node.start_line = start;
        node.end_line = self.current;
        node.comments = std::mem::take(&mut self.comments);
        Ok(node)
    }

    /// Read `doc`'s body up to its terminator line.
    fn heredoc_body(&mut self, mut doc: Heredoc, start: usize) -> Result<Heredoc> {
        while let Some(raw) = self.next_line() {
            self.current += 1;
            let mut candidate = trim_newline(raw);
            if doc.chomp {
                candidate = candidate.trim_start_matches('\t');
            }
            if candidate == doc.name {
                return Ok(doc);
            }
            doc.content.push_str(raw);
        }
        Err(self.err(ParseError::UnterminatedHeredoc(doc.name), start, "<<"))
    }
}

fn can_contain_heredoc(node: &Node) -> bool {
    let n = match (&node.sub, node.instruction.as_str()) {
        (Some(sub), "onbuild") => sub,
        _ => node,
    };
    matches!(n.instruction.as_str(), "add" | "copy" | "run") && !n.json
}

/// The heredocs a logical line opens, in order.
fn heredocs_from_line(line: &str) -> Vec<Heredoc> {
    let lex = Lexer {
        raw_quotes: true,
        raw_escapes: true,
        skip_unset_env: true,
        ..Lexer::new('\\')
    };
    // BuildKit ignores a line it cannot split: it simply has no heredocs.
    let words = lex.process_words(line, &NoEnv).unwrap_or_default();
    words.iter().filter_map(|w| parse_heredoc(w)).collect()
}

/// Recognise `[fd]<<[-]WORD` (BuildKit's `^(\d*)<<(-?)([^<]*)$`).
pub fn parse_heredoc(word: &str) -> Option<Heredoc> {
    let digits = word.len() - word.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let rest = word[digits..].strip_prefix("<<")?;
    let (chomp, rest) = match rest.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    // BuildKit's pattern allows blanks between `<<-` and the name.
    let rest = rest.trim_start_matches(['\t', '\n', '\u{c}', '\r', ' ']);
    if rest.is_empty() || rest.contains('<') {
        return None;
    }
    let fd = word[..digits].parse::<u32>().unwrap_or(0);
    let cooked = Lexer {
        skip_unset_env: true,
        ..Lexer::new('\\')
    };
    let words = cooked.process_words(rest, &NoEnv).ok()?;
    let [name] = words.as_slice() else {
        return None;
    };
    let raw = Lexer {
        raw_quotes: true,
        ..cooked
    };
    let raw_words = raw.process_words(rest, &NoEnv).ok()?;
    let quotes = |s: &str| s.matches(['\'', '"']).count();
    // A quote anywhere in the delimiter turns expansion off.
    let expand = raw_words.len() == 1 && quotes(name) == quotes(&raw_words[0]);
    Some(Heredoc {
        name: name.clone(),
        fd,
        expand,
        chomp,
        content: String::new(),
    })
}

/// Split a logical line into a node: keyword, flags, arguments.
fn node_from_line(line: &str, escape: char, depth: usize) -> std::result::Result<Node, ParseError> {
    let (cmd, rest) = split_first_token(trim_space(line));
    let cmd = cmd.to_lowercase();
    let (args, flags) = match rest {
        Some(r) => extract_flags(r),
        None => (String::new(), Vec::new()),
    };
    let args = trim_space(&args).to_string();
    let mut node = Node {
        instruction: cmd.clone(),
        flags,
        args: Vec::new(),
        sub: None,
        json: false,
        heredocs: Vec::new(),
        original: line.to_string(),
        start_line: 0,
        end_line: 0,
        comments: Vec::new(),
    };
    match cmd.as_str() {
        "add" | "copy" | "volume" => match parse_json(&args)? {
            Some(v) => {
                node.args = v;
                node.json = true;
            }
            None => node.args = whitespace_list(&args),
        },
        "cmd" | "entrypoint" | "run" | "shell" => (node.args, node.json) = maybe_json(&args)?,
        "arg" => node.args = parse_words(&args, escape),
        "env" => node.args = name_val(&args, "ENV", escape)?,
        "label" => node.args = name_val(&args, "LABEL", escape)?,
        "expose" | "from" => node.args = whitespace_list(&args),
        "maintainer" | "stopsignal" | "user" | "workdir" => {
            if !args.is_empty() {
                node.args = vec![args];
            }
        }
        "healthcheck" => {
            let a = args.as_str();
            let sep = a.find(is_space).unwrap_or(a.len());
            if sep > 0 {
                let rest = a[sep..].trim_start_matches(is_space);
                let (cmd, json) = maybe_json(rest)?;
                node.args = std::iter::once(a[..sep].to_string()).chain(cmd).collect();
                node.json = json;
            }
        }
        "onbuild" => {
            if !args.is_empty() {
                // ONBUILD ONBUILD ... is rejected by the checker anyway; the
                // cap only keeps hostile input from exhausting the stack.
                if depth >= MAX_ONBUILD_NESTING {
                    return Err(ParseError::OnbuildTooDeep);
                }
                let mut sub = node_from_line(&args, escape, depth + 1)?;
                sub.original = args.clone();
                node.sub = Some(Box::new(sub));
            }
        }
        // Unknown instructions keep no arguments (BuildKit's parseIgnore
        // leaves one empty word); the checker reports them.
        _ => node.args = vec![String::new()],
    }
    Ok(node)
}

fn whitespace_list(args: &str) -> Vec<String> {
    if args.is_empty() {
        return Vec::new();
    }
    split_token_space(args)
}

/// JSON array of strings, `None` when `args` is not JSON at all.
fn parse_json(args: &str) -> std::result::Result<Option<Vec<String>>, ParseError> {
    let rest = args.trim_start_matches(is_space);
    if !rest.starts_with('[') {
        return Ok(None);
    }
    let Ok(serde_json::Value::Array(items)) = serde_json::from_str::<serde_json::Value>(rest)
    else {
        return Ok(None);
    };
    items
        .into_iter()
        .map(|v| match v {
            serde_json::Value::String(s) => Ok(s),
            _ => Err(ParseError::NotStringArray),
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Some)
}

/// Exec form when the arguments are a JSON string array, else one shell string.
fn maybe_json(args: &str) -> std::result::Result<(Vec<String>, bool), ParseError> {
    if args.is_empty() {
        return Ok((Vec::new(), false));
    }
    Ok(match parse_json(args)? {
        Some(v) => (v, true),
        None => (vec![args.to_string()], false),
    })
}

/// `ENV`/`LABEL` arguments as key, value, separator triples.
fn name_val(rest: &str, key: &str, escape: char) -> std::result::Result<Vec<String>, ParseError> {
    let words = parse_words(rest, escape);
    let Some(first) = words.first() else {
        return Ok(Vec::new());
    };
    if !first.contains('=') {
        let (k, v) = split_first_token(rest);
        return match v {
            Some(v) => Ok(vec![k.to_string(), v.to_string(), String::new()]),
            None => Err(ParseError::MissingValue(key.to_string())),
        };
    }
    let mut out = Vec::with_capacity(words.len() * 3);
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            return Err(ParseError::MissingEquals(w));
        };
        out.extend([k.to_string(), v.to_string(), "=".to_string()]);
    }
    Ok(out)
}

/// Split into words on unquoted whitespace, keeping quotes and escapes (they
/// are processed later by the shell lexer).
pub(crate) fn parse_words(rest: &str, escape: char) -> Vec<String> {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote(char),
    }
    let chars: Vec<char> = rest.chars().collect();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut blank_ok = false;
    let mut word = String::new();
    let mut pos = 0;
    while pos <= chars.len() {
        let at_end = pos == chars.len();
        let mut ch = chars.get(pos).copied().unwrap_or('\0');
        if phase == Phase::Spaces {
            if at_end {
                break;
            }
            if is_space(ch) {
                pos += 1;
                continue;
            }
            phase = Phase::Word;
        }
        if at_end {
            if blank_ok || !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            break;
        }
        match phase {
            Phase::Word => {
                if is_space(ch) {
                    phase = Phase::Spaces;
                    if blank_ok || !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    }
                    word.clear();
                    blank_ok = false;
                    pos += 1;
                    continue;
                }
                if ch == '\'' || ch == '"' {
                    phase = Phase::Quote(ch);
                    blank_ok = true;
                }
                if ch == escape {
                    if pos + 1 == chars.len() {
                        pos += 1;
                        continue;
                    }
                    word.push(ch);
                    pos += 1;
                    ch = chars[pos];
                }
                word.push(ch);
            }
            Phase::Quote(q) => {
                if ch == q {
                    phase = Phase::Word;
                }
                if ch == escape && q != '\'' {
                    if pos + 1 == chars.len() {
                        phase = Phase::Word;
                        pos += 1;
                        continue;
                    }
                    pos += 1;
                    word.push(ch);
                    ch = chars[pos];
                }
                word.push(ch);
            }
            Phase::Spaces => {}
        }
        pos += 1;
    }
    words
}

/// Take `--flag[=value]` words off the front of `line`; returns the rest
/// and the flags. A `--` word ends the flags and is dropped.
fn extract_flags(line: &str) -> (String, Vec<String>) {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote(char),
    }
    let chars: Vec<(usize, char)> = line.char_indices().collect();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut blank_ok = false;
    let mut word = String::new();
    let mut pos = 0;
    while pos <= chars.len() {
        let at_end = pos == chars.len();
        let (byte, mut ch) = chars.get(pos).copied().unwrap_or((line.len(), '\0'));
        if phase == Phase::Spaces {
            if at_end {
                break;
            }
            if is_space(ch) {
                pos += 1;
                continue;
            }
            let dash2 = ch == '-' && chars.get(pos + 1).map(|c| c.1) == Some('-');
            if !dash2 {
                return (line[byte..].to_string(), words);
            }
            phase = Phase::Word;
        }
        if at_end {
            if word != "--" && (blank_ok || !word.is_empty()) {
                words.push(word);
            }
            break;
        }
        match phase {
            Phase::Word => {
                if is_space(ch) {
                    phase = Phase::Spaces;
                    if word == "--" {
                        return (line[byte..].to_string(), words);
                    }
                    if blank_ok || !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    }
                    blank_ok = false;
                    pos += 1;
                    continue;
                }
                if ch == '\'' || ch == '"' {
                    phase = Phase::Quote(ch);
                    blank_ok = true;
                    pos += 1;
                    continue;
                }
                if ch == '\\' {
                    if pos + 1 == chars.len() {
                        pos += 1;
                        continue;
                    }
                    pos += 1;
                    ch = chars[pos].1;
                }
                word.push(ch);
            }
            Phase::Quote(q) => {
                if ch == q {
                    phase = Phase::Word;
                    pos += 1;
                    continue;
                }
                if ch == '\\' {
                    if pos + 1 == chars.len() {
                        phase = Phase::Word;
                        pos += 1;
                        continue;
                    }
                    pos += 1;
                    ch = chars[pos].1;
                }
                word.push(ch);
            }
            Phase::Spaces => {}
        }
        pos += 1;
    }
    (String::new(), words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump(src: &str) -> String {
        parse(src.as_bytes(), "Dockerfile").unwrap().dump()
    }

    #[test]
    fn heredoc_forms() {
        let ast = parse(
            b"FROM a\nRUN <<EOF 3<<-'END'\necho $x\nEOF\n\tquoted\n\tEND\nRUN ok\n",
            "Dockerfile",
        )
        .unwrap();
        let run = &ast.nodes[1];
        assert_eq!(run.heredocs.len(), 2);
        assert_eq!(run.heredocs[0].name, "EOF");
        assert!(run.heredocs[0].expand);
        assert_eq!(run.heredocs[0].content, "echo $x\n");
        assert_eq!(run.heredocs[1].fd, 3);
        assert!(run.heredocs[1].chomp && !run.heredocs[1].expand);
        assert_eq!(run.heredocs[1].body(), "quoted\n");
        assert_eq!((run.start_line, run.end_line), (2, 6));
        assert_eq!(ast.nodes[2].start_line, 7);
    }

    #[test]
    fn overlong_lines_are_rejected_like_buildkit() {
        let ok = format!("FROM a\nRUN {}\n", "x".repeat(MAX_LINE - 4));
        assert!(parse(ok.as_bytes(), "D").is_ok());
        let long = format!("FROM a\nRUN {}\n", "x".repeat(MAX_LINE));
        let e = parse(long.as_bytes(), "D").unwrap_err();
        assert_eq!((e.kind, e.location.line), (ParseError::LineTooLong, 2));
    }

    #[test]
    fn unterminated_heredoc_is_an_error() {
        let e = parse(b"FROM a\nRUN <<EOF\nx\n", "D").unwrap_err();
        assert_eq!(e.kind, ParseError::UnterminatedHeredoc("EOF".into()));
        assert_eq!(e.location.line, 2);
    }

    #[test]
    fn json_heredoc_is_not_a_heredoc() {
        let ast = parse(b"FROM a\nRUN [\"<<EOF\"]\nFROM b\n", "D").unwrap();
        assert!(ast.nodes[1].heredocs.is_empty());
        assert_eq!(ast.nodes.len(), 3);
    }

    #[test]
    fn directives_only_at_top() {
        let ast = parse(
            b"# syntax=docker/dockerfile:1\n# check=skip=all\nFROM a\n# escape=`\n",
            "D",
        )
        .unwrap();
        assert_eq!(ast.directive("syntax"), Some("docker/dockerfile:1"));
        assert_eq!(ast.directive("check"), Some("skip=all"));
        assert_eq!(ast.escape, '\\');
        let e = parse(b"# escape=\\\n# escape=`\nFROM a\n", "D").unwrap_err();
        assert_eq!(e.kind, ParseError::DuplicateDirective("escape".into()));
        let e = parse(b"# escape=x\nFROM a\n", "D").unwrap_err();
        assert_eq!(e.kind, ParseError::InvalidEscape("x".into()));
    }

    #[test]
    fn check_directive_options() {
        let ast = parse(
            b"# check=skip=UndefinedVar,JSONArgsRecommended;error=true\nFROM a\n",
            "D",
        )
        .unwrap();
        let c = ast.check_options().unwrap();
        assert!(c.error && c.skips("UndefinedVar") && !c.skips("Other"));
        let ast = parse(b"# check=skip=all\nFROM a\n", "D").unwrap();
        assert!(ast.check_options().unwrap().skips("Anything"));
        let ast = parse(b"# check=bogus\nFROM a\n", "D").unwrap();
        assert_eq!(
            ast.check_options().unwrap_err().kind,
            ParseError::CheckOption("bogus".into())
        );
        let ast = parse(b"FROM a\n", "D").unwrap();
        assert_eq!(ast.check_options().unwrap(), CheckOptions::default());
    }

    #[test]
    fn onbuild_and_flags_dump() {
        assert_eq!(
            dump("FROM a\nONBUILD COPY --from=b x y\nfoo bar\n"),
            "(from \"a\")\n(onbuild (copy [\"--from=b\"] \"x\" \"y\"))\n(foo \"\")\n"
        );
    }

    #[test]
    fn go_quote_matches_strconv() {
        assert_eq!(
            go_quote("a\"\\\u{0}\u{7f}\u{85}é\u{feff}"),
            "\"a\\\"\\\\\\x00\\x7f\\u0085é\\ufeff\""
        );
    }
}
