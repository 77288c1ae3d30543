//! Word expansion and splitting by BuildKit's shell-lexer rules.
//!
//! This is not a shell: it processes quotes, the escape character and the
//! `$V` / `${V...}` forms the Dockerfile reference documents, and nothing
//! else (no command substitution, no globbing, no arithmetic). It never looks
//! at the process environment; callers pass the variables explicitly.
//!
//! Nesting (`${a:-${b:-...}}`) is bounded by [`MAX_NESTING`] so that hostile
//! input cannot exhaust the stack; everything else is linear in the input.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use regex::Regex;

/// Deepest `${...}` nesting accepted.
pub const MAX_NESTING: usize = 64;

/// Errors from expanding one word.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShellError {
    /// A `'` was opened and never closed.
    #[error("unexpected end of statement while looking for matching single-quote in {input:?}; close the quote")]
    UnterminatedSingleQuote { input: String },
    /// A `"` was opened and never closed.
    #[error("unexpected end of statement while looking for matching double-quote in {input:?}; close the quote")]
    UnterminatedDoubleQuote { input: String },
    /// A `${` without its `}`.
    #[error("syntax error: missing '}}' in {input:?}")]
    MissingBrace { input: String },
    /// `${V/p/r}` without the second `/`.
    #[error("syntax error: missing '/' in ${{}} in {input:?}")]
    MissingSlash { input: String },
    /// `${}`, `${:...}`, `${{...}`.
    #[error("syntax error: bad substitution in {input:?}")]
    BadSubstitution { input: String },
    /// `${V:x...}` and other operators BuildKit does not know.
    #[error("unsupported modifier ({modifier}) in substitution in {input:?}; use one of :- - :+ + :? ? # ## % %% / //")]
    UnsupportedModifier { modifier: String, input: String },
    /// `${V?msg}` / `${V:?msg}` on an unset (or empty) variable.
    #[error("{name}: {message}")]
    Required { name: String, message: String },
    /// A `${V#p}`-style pattern that cannot be used.
    #[error("invalid pattern ({pattern}) in substitution: {reason}")]
    InvalidPattern { pattern: String, reason: String },
    /// Hostile nesting depth.
    #[error("variable substitutions nested deeper than {MAX_NESTING} levels in {input:?}")]
    TooDeep { input: String },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, ShellError>;

/// Variables visible to an expansion.
pub trait Env {
    /// The value of `name`, or `None` when unset (set-but-empty is `Some("")`).
    fn lookup(&self, name: &str) -> Option<&str>;
}

impl Env for BTreeMap<String, String> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

impl Env for HashMap<String, String> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

/// `KEY=VALUE` pairs, later entries winning, as BuildKit's env lists.
impl Env for [(String, String)] {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Env for Vec<(String, String)> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.as_slice().lookup(name)
    }
}

/// No variables at all.
pub struct NoEnv;

impl Env for NoEnv {
    fn lookup(&self, _: &str) -> Option<&str> {
        None
    }
}

/// The outcome of expanding one word.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expansion {
    /// The whole expanded text (quotes removed, spaces kept).
    pub word: String,
    /// The text split into words on unquoted whitespace.
    pub words: Vec<String>,
    /// Variables that were referenced and set.
    pub matched: BTreeSet<String>,
    /// Variables that were referenced and unset.
    pub unmatched: BTreeSet<String>,
}

/// The lexer's settings; [`Lexer::new`] gives the ones used for Dockerfile
/// instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lexer {
    /// The escape character: `\` or, after `# escape=\``, a backtick.
    pub escape: char,
    /// Keep quote characters in the output.
    pub raw_quotes: bool,
    /// Keep escape characters in the output.
    pub raw_escapes: bool,
    /// Treat quotes as ordinary characters.
    pub skip_process_quotes: bool,
    /// Leave references to unset variables as written.
    pub skip_unset_env: bool,
}

impl Lexer {
    /// A lexer with escape character `escape` and BuildKit's defaults.
    pub fn new(escape: char) -> Self {
        Lexer {
            escape,
            raw_quotes: false,
            raw_escapes: false,
            skip_process_quotes: false,
            skip_unset_env: false,
        }
    }

    /// A RUN's command line as BuildKit names its step: the variables set
    /// in `env` expanded, unset ones and quotes left as written, the
    /// instruction's name in capitals; `text` itself if it does not lex.
    pub fn display_command(escape: char, text: &str, env: &(impl Env + ?Sized)) -> String {
        let lex = Lexer {
            raw_quotes: true,
            skip_unset_env: true,
            ..Lexer::new(escape)
        };
        let expanded = lex
            .process_word(text, env)
            .unwrap_or_else(|_| text.to_string());
        match expanded.split_once(' ') {
            Some((ins, rest)) => format!("{} {rest}", ins.to_uppercase()),
            None => expanded.to_uppercase(),
        }
    }

    /// Expand `input` into one word (as ENV, WORKDIR, COPY arguments do).
    pub fn process_word(&self, input: &str, env: &(impl Env + ?Sized)) -> Result<String> {
        Ok(self.process(input, env)?.word)
    }

    /// Expand `input` and split it into words (as EXPOSE and heredoc names do).
    pub fn process_words(&self, input: &str, env: &(impl Env + ?Sized)) -> Result<Vec<String>> {
        Ok(self.process(input, env)?.words)
    }

    /// Expand `input`, returning the word, the words and the variables used.
    pub fn process(&self, input: &str, env: &(impl Env + ?Sized)) -> Result<Expansion> {
        let mut st = State {
            lex: self,
            env: &|name: &str| env.lookup(name).map(str::to_string),
            input,
            chars: input.chars().collect(),
            pos: 0,
            raw_escapes: self.raw_escapes,
            depth: 0,
            matched: BTreeSet::new(),
            unmatched: BTreeSet::new(),
        };
        let raw = st.raw_escapes;
        let (word, words) = st.process_stop_on(None, raw)?;
        Ok(Expansion {
            word,
            words,
            matched: st.matched,
            unmatched: st.unmatched,
        })
    }
}

/// Go's `unicode.IsSpace`: Rust's `White_Space` property is the same set.
pub(crate) fn is_space(c: char) -> bool {
    c.is_whitespace()
}

#[derive(Default)]
struct Words {
    word: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, c: char) {
        if is_space(c) {
            if self.in_word && !self.word.is_empty() {
                self.words.push(std::mem::take(&mut self.word));
                self.in_word = false;
            }
        } else {
            self.add_raw_char(c);
        }
    }
    fn add_raw_char(&mut self, c: char) {
        self.word.push(c);
        self.in_word = true;
    }
    fn add_string(&mut self, s: &str) {
        s.chars().for_each(|c| self.add_char(c));
    }
    fn add_raw_string(&mut self, s: &str) {
        self.word.push_str(s);
        self.in_word = true;
    }
    fn finish(mut self) -> Vec<String> {
        if !self.word.is_empty() {
            self.words.push(self.word);
        }
        self.words
    }
}

type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

struct State<'a> {
    lex: &'a Lexer,
    env: Lookup<'a>,
    input: &'a str,
    chars: Vec<char>,
    pos: usize,
    raw_escapes: bool,
    depth: usize,
    matched: BTreeSet<String>,
    unmatched: BTreeSet<String>,
}

impl State<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }
    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }
    fn input(&self) -> String {
        self.input.to_string()
    }

    fn get_env(&mut self, name: &str) -> Option<String> {
        let v = (self.env)(name);
        if v.is_some() {
            self.matched.insert(name.to_string());
        } else {
            self.unmatched.insert(name.to_string());
        }
        v
    }

    fn process_stop_on(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Result<(String, Vec<String>)> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(ShellError::TooDeep {
                input: self.input(),
            });
        }
        let saved = self.raw_escapes;
        self.raw_escapes = raw_escapes;
        let r = self.stop_on_inner(stop);
        self.raw_escapes = saved;
        self.depth -= 1;
        r
    }

    fn stop_on_inner(&mut self, stop: Option<char>) -> Result<(String, Vec<String>)> {
        let mut result = String::new();
        let mut words = Words::default();
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                self.next();
                return Ok((result, words.finish()));
            }
            let quotes = !self.lex.skip_process_quotes;
            if c == '$' {
                let tmp = self.process_dollar()?;
                result.push_str(&tmp);
                words.add_string(&tmp);
            } else if quotes && c == '\'' {
                let tmp = self.single_quote()?;
                result.push_str(&tmp);
                words.add_raw_string(&tmp);
            } else if quotes && c == '"' {
                let tmp = self.double_quote()?;
                result.push_str(&tmp);
                words.add_raw_string(&tmp);
            } else {
                self.next();
                if c == self.lex.escape {
                    if self.raw_escapes {
                        words.add_raw_char(c);
                        result.push(c);
                    }
                    match self.next() {
                        None => break,
                        Some(e) => {
                            words.add_raw_char(e);
                            result.push(e);
                        }
                    }
                } else {
                    words.add_char(c);
                    result.push(c);
                }
            }
        }
        match stop {
            // BuildKit reports a missing `}` / `/` in the caller, which knows
            // which one it wanted.
            Some('}') => Err(ShellError::MissingBrace {
                input: self.input(),
            }),
            Some(_) => Err(ShellError::MissingSlash {
                input: self.input(),
            }),
            None => Ok((result, words.finish())),
        }
    }

    fn single_quote(&mut self) -> Result<String> {
        let mut out = String::new();
        let q = self.next();
        if self.lex.raw_quotes {
            out.extend(q);
        }
        loop {
            match self.next() {
                None => {
                    return Err(ShellError::UnterminatedSingleQuote {
                        input: self.input(),
                    })
                }
                Some('\'') => {
                    if self.lex.raw_quotes {
                        out.push('\'');
                    }
                    return Ok(out);
                }
                Some(c) => out.push(c),
            }
        }
    }

    fn double_quote(&mut self) -> Result<String> {
        let mut out = String::new();
        let q = self.next();
        if self.lex.raw_quotes {
            out.extend(q);
        }
        loop {
            match self.peek() {
                None => {
                    return Err(ShellError::UnterminatedDoubleQuote {
                        input: self.input(),
                    })
                }
                Some('"') => {
                    self.next();
                    if self.lex.raw_quotes {
                        out.push('"');
                    }
                    return Ok(out);
                }
                Some('$') => {
                    let v = self.process_dollar()?;
                    out.push_str(&v);
                }
                Some(_) => {
                    let mut c = self.next().unwrap_or_default();
                    if c == self.lex.escape {
                        if self.raw_escapes {
                            out.push(c);
                        }
                        match self.peek() {
                            // An escape at the very end is dropped; the
                            // missing quote is reported next time round.
                            None => continue,
                            Some(n) if n == '"' || n == '$' || n == self.lex.escape => {
                                c = n;
                                self.next();
                            }
                            Some(_) => {}
                        }
                    }
                    out.push(c);
                }
            }
        }
    }

    fn process_name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if name.is_empty() && c.is_numeric() {
                while let Some(d) = self.peek().filter(|d| d.is_numeric()) {
                    name.push(d);
                    self.next();
                }
                return name;
            }
            if name.is_empty() && matches!(c, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.next();
                return c.to_string();
            }
            if !c.is_alphanumeric() && c != '_' {
                break;
            }
            name.push(c);
            self.next();
        }
        name
    }

    /// Expand the `$...` at the cursor.
    fn process_dollar(&mut self) -> Result<String> {
        self.next(); // the '$'
        if self.peek() != Some('{') {
            return Ok(self.plain_variable());
        }
        self.next(); // the '{'
        match self.peek() {
            None => {
                return Err(ShellError::MissingBrace {
                    input: self.input(),
                })
            }
            Some('{' | '}' | ':') => {
                return Err(ShellError::BadSubstitution {
                    input: self.input(),
                })
            }
            Some(_) => {}
        }
        let name = self.process_name();
        let Some(op) = self.next() else {
            return Err(ShellError::MissingBrace {
                input: self.input(),
            });
        };
        match op {
            '}' => Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.lex.skip_unset_env => format!("${{{name}}}"),
                None => String::new(),
            }),
            ':' | '+' | '-' | '?' | '#' | '%' => self.modified_variable(name, op),
            '/' => self.substituted_variable(&name),
            _ => Err(ShellError::UnsupportedModifier {
                modifier: op.to_string(),
                input: self.input(),
            }),
        }
    }

    /// `$NAME` (the `$` read): its value; a lone `$` stays.
    fn plain_variable(&mut self) -> String {
        let name = self.process_name();
        if name.is_empty() {
            return "$".into();
        }
        match self.get_env(&name) {
            Some(v) => v,
            None if self.lex.skip_unset_env => format!("${name}"),
            None => String::new(),
        }
    }

    /// `${NAME<op>word}` with `op` one of `:-`, `-`, `:+`, `+`, `:?`, `?`,
    /// `#`, `##`, `%`, `%%` (`op`, the first character, already read).
    fn modified_variable(&mut self, name: String, mut op: char) -> Result<String> {
        let mut modifier = op.to_string();
        // With `:`, an empty value counts as unset.
        let null_is_unset = op == ':';
        if null_is_unset {
            let Some(n) = self.next() else {
                return Err(ShellError::MissingBrace {
                    input: self.input(),
                });
            };
            op = n;
            modifier.push(n);
        }
        let raw = op == '#' || op == '%';
        let (word, _) = self.process_stop_on(Some('}'), raw)?;
        let Some(value) = self.get_env(&name) else {
            if self.lex.skip_unset_env {
                return Ok(format!("${{{name}{modifier}{word}}}"));
            }
            return self.apply_unset(op, &name, &modifier, word);
        };
        let empty = null_is_unset && value.is_empty();
        self.apply_set(op, name, value, empty, modifier, word)
    }

    /// The value of `${name<op>word}` when `name` is set to `value`
    /// (`empty`: set but empty, under a `:` modifier).
    fn apply_set(
        &self,
        op: char,
        name: String,
        value: String,
        empty: bool,
        modifier: String,
        mut word: String,
    ) -> Result<String> {
        match op {
            '-' => Ok(if empty { word } else { value }),
            '+' => Ok(if empty { String::new() } else { word }),
            '?' if empty => Err(ShellError::Required {
                name,
                message: if word.is_empty() {
                    "is not allowed to be empty".into()
                } else {
                    word
                },
            }),
            '?' => Ok(value),
            '#' | '%' => {
                let greedy = word.starts_with(op);
                if greedy {
                    word.remove(0);
                }
                if op == '%' {
                    trim_suffix(&word, &value, greedy)
                } else {
                    trim_prefix(&word, &value, greedy)
                }
            }
            _ => Err(ShellError::UnsupportedModifier {
                modifier,
                input: self.input(),
            }),
        }
    }

    /// `${NAME/pattern/replacement}` and `${NAME//pattern/replacement}`
    /// (the first `/` read).
    fn substituted_variable(&mut self, name: &str) -> Result<String> {
        let all = self.peek() == Some('/');
        if all {
            self.next();
        }
        let (pattern, _) = self.process_stop_on(Some('/'), true)?;
        let (replacement, _) = self.process_stop_on(Some('}'), true)?;
        let Some(value) = self.get_env(name) else {
            if self.lex.skip_unset_env {
                return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
            }
            return Ok(String::new());
        };
        let re = pattern_regex(&pattern, true, false)?;
        Ok(if all {
            re.replace_all(&value, replacement.as_str()).into_owned()
        } else {
            re.replace(&value, replacement.as_str()).into_owned()
        })
    }

    /// The value of `${name<op>word}` when `name` is unset.
    fn apply_unset(&self, op: char, name: &str, modifier: &str, word: String) -> Result<String> {
        match op {
            '-' => Ok(word),
            '+' | '#' | '%' => Ok(String::new()),
            '?' => Err(ShellError::Required {
                name: name.to_string(),
                message: if word.is_empty() {
                    "is not allowed to be unset".into()
                } else {
                    word
                },
            }),
            _ => Err(ShellError::UnsupportedModifier {
                modifier: modifier.to_string(),
                input: self.input(),
            }),
        }
    }
}

/// Translate a shell pattern (`*`, `?`, `\` escapes; no brackets) to a regex.
fn pattern_regex(pattern: &str, greedy: bool, anchored: bool) -> Result<Regex> {
    let invalid = |reason: String| ShellError::InvalidPattern {
        pattern: pattern.to_string(),
        reason,
    };
    let mut out = String::with_capacity(pattern.len() + 4);
    if anchored {
        out.push('^');
    }
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => out.push_str(if greedy { ".*" } else { ".*?" }),
            '?' => out.push('.'),
            '\\' => {
                // `\}` and `\/` only protect the delimiters of `${}`; the
                // backslash is not part of the pattern.
                if matches!(chars.peek(), Some('}' | '/')) {
                    continue;
                }
                match chars.next() {
                    Some(e @ ('*' | '?' | '\\')) => {
                        out.push('\\');
                        out.push(e);
                    }
                    Some(e) => return Err(invalid(format!("invalid escape '\\{e}'"))),
                    None => return Err(invalid("invalid escape at end of pattern".into())),
                }
            }
            '[' | ']' | '{' | '}' | '.' | '+' | '(' | ')' | '|' | '^' | '$' | '#' | '&' | '-'
            | '~' => {
                out.push('\\');
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    Regex::new(&out).map_err(|e| invalid(e.to_string()))
}

fn trim_prefix(pattern: &str, value: &str, greedy: bool) -> Result<String> {
    let re = pattern_regex(pattern, greedy, true)?;
    Ok(match re.find(value) {
        Some(m) => value[m.end()..].to_string(),
        None => value.to_string(),
    })
}

/// Reverse a pattern but keep each `\x` escape pair in order.
fn reverse_pattern(pattern: &str) -> String {
    let p: Vec<char> = pattern.chars().collect();
    let mut out = vec!['\0'; p.len()];
    let last = p.len().wrapping_sub(1);
    let mut i = 0;
    while i < p.len() {
        let at = last - i;
        if p[i] == '\\' && i != last {
            out[at - 1] = '\\';
            out[at] = p[i + 1];
            i += 2;
        } else {
            out[at] = p[i];
            i += 1;
        }
    }
    out.into_iter().collect()
}

fn trim_suffix(pattern: &str, value: &str, greedy: bool) -> Result<String> {
    // A regex cannot find the shortest rightmost match, so search the
    // reversed value with the reversed pattern from the left instead.
    let rev: String = value.chars().rev().collect();
    let trimmed = trim_prefix(&reverse_pattern(pattern), &rev, greedy)?;
    Ok(trimmed.chars().rev().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Vec<(String, String)> {
        [("V", "foo/bar/baz.tar.gz"), ("E", ""), ("S", "a b")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn w(s: &str) -> Result<String> {
        Lexer::new('\\').process_word(s, &env())
    }

    #[test]
    fn every_form() {
        let cases = [
            ("$V", "foo/bar/baz.tar.gz"),
            ("${V}", "foo/bar/baz.tar.gz"),
            ("${X:-w}", "w"),
            ("${E:-w}", "w"),
            ("${E-w}", ""),
            ("${V:+w}", "w"),
            ("${E:+w}", ""),
            ("${E+w}", "w"),
            ("${X+w}", ""),
            ("${V?m}", "foo/bar/baz.tar.gz"),
            ("${E?m}", ""),
            ("${V#*/}", "bar/baz.tar.gz"),
            ("${V##*/}", "baz.tar.gz"),
            ("${V%.*}", "foo/bar/baz.tar"),
            ("${V%%.*}", "foo/bar/baz"),
            ("${V/bar/qux}", "foo/qux/baz.tar.gz"),
            ("${V//a/A}", "foo/bAr/bAz.tAr.gz"),
            ("${V/\\/b/_}", "foo_ar/baz.tar.gz"),
            ("\\$V", "$V"),
            ("${X#a}", ""),
        ];
        for (input, want) in cases {
            assert_eq!(w(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn required_messages() {
        assert_eq!(w("${X:?no X}").unwrap_err().to_string(), "X: no X");
        assert_eq!(
            w("${E:?}").unwrap_err().to_string(),
            "E: is not allowed to be empty"
        );
        assert_eq!(
            w("${X?}").unwrap_err().to_string(),
            "X: is not allowed to be unset"
        );
    }

    #[test]
    fn words_split_unquoted_expansions_only() {
        let lex = Lexer::new('\\');
        assert_eq!(
            lex.process_words("x${S}y \"$S\"", &env()).unwrap(),
            ["xa", "by", "a b"]
        );
    }

    #[test]
    fn backtick_escape() {
        let lex = Lexer::new('`');
        assert_eq!(lex.process_word("a`$V\\x", &env()).unwrap(), "a$V\\x");
    }

    #[test]
    fn skip_unset_keeps_text() {
        let lex = Lexer {
            skip_unset_env: true,
            ..Lexer::new('\\')
        };
        assert_eq!(
            lex.process_word("$X ${X} ${X:-a} ${X/a/b} $V", &env())
                .unwrap(),
            "$X ${X} ${X:-a} ${X/a/b} foo/bar/baz.tar.gz"
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let input = "${a:-".repeat(10_000) + &"}".repeat(10_000);
        assert!(matches!(w(&input), Err(ShellError::TooDeep { .. })));
    }
}
