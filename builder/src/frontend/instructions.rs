//! Checked instructions: one typed struct per Dockerfile instruction, with
//! every flag validated and variables expanded where BuildKit expands them.
//!
//! [`check`] turns one raw [`Node`] into an [`Instruction`] given the
//! variables in scope (an [`Expander`]), through a table holding one
//! checker function per instruction (`check_from`, `check_run`, ...). It
//! rejects unknown instructions and flags, wrong argument counts and
//! malformed values. It does not know about other stages or the build
//! context; the planner resolves those.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;

use super::mount_flags::{parse_mount, Mount, MountError};
use super::parser::{parse_heredoc, Node};
use super::platform::PlatformError;
use super::shell::{Env, Lexer, ShellError};

/// Why an instruction was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstructionError {
    /// Not a Dockerfile instruction.
    #[error("unknown instruction: {0}{hint}", hint = instruction_hint(.0))]
    UnknownInstruction(String),
    /// `ENV =x`, `ARG =x`, `LABEL =x`.
    #[error("{0} names can not be blank")]
    BlankName(&'static str),
    /// `ADD --checksum` with a local file or several sources.
    #[error("ADD --checksum needs exactly one source, an HTTP(S) URL or a Git repository")]
    ChecksumSource,
    /// A flag the instruction does not take.
    #[error("unknown flag: --{flag} for {instruction}{hint}")]
    UnknownFlag {
        instruction: String,
        flag: String,
        /// ` (did you mean X?)` for a near miss, else empty
        hint: String,
    },
    /// `--flag` without `=value` for a flag that needs one.
    #[error("missing a value on flag: --{0}; write --{0}=VALUE")]
    FlagNeedsValue(String),
    /// `--link=maybe`.
    #[error("expecting boolean value for flag --{flag}, not: {value}")]
    FlagNotBool { flag: String, value: String },
    /// A single-valued flag given twice.
    #[error("duplicate flag specified: --{0}")]
    DuplicateFlag(String),
    /// `--` or `--=x`.
    #[error("invalid flag {0:?}")]
    BadFlag(String),
    /// No arguments at all.
    #[error("{0} requires at least one argument")]
    NoArguments(&'static str),
    /// More or fewer than one argument.
    #[error("{0} requires exactly one argument")]
    ExactlyOne(&'static str),
    /// COPY/ADD with fewer than a source and a destination.
    #[error("{0} requires at least two arguments, but only one was provided; a destination could not be determined")]
    NeedsDestination(&'static str),
    /// `FROM a b`.
    #[error("FROM requires either one or three arguments: FROM image [AS name]")]
    FromArgs,
    /// A stage name outside `[a-z][a-z0-9-_.]*`.
    #[error(
        "invalid name for build stage: {0:?}, name can't start with a number or contain symbols"
    )]
    InvalidStageName(String),
    /// `FROM $EMPTY`.
    #[error("base name ({0}) should not be blank; check the ARG it uses")]
    EmptyImage(String),
    /// SHELL in shell form.
    #[error("SHELL requires the arguments to be in JSON form, e.g. SHELL [\"/bin/sh\", \"-c\"]")]
    ShellNotJson,
    /// `VOLUME ""`.
    #[error("VOLUME specified can not be an empty string")]
    EmptyVolume,
    /// ONBUILD holding ONBUILD, FROM or MAINTAINER.
    #[error("{0} isn't allowed as an ONBUILD trigger")]
    OnbuildForbidden(String),
    /// `--network=x`.
    #[error("unsupported network mode {0:?}; use default, sandbox, none or host")]
    Network(String),
    /// `--security=x`.
    #[error("unsupported security mode {0:?}; use sandbox or insecure")]
    Security(String),
    /// `--chmod=x`.
    #[error(
        "invalid chmod {0:?}; use an octal mode such as 0755 or a symbolic one such as u=rwX,go=rX"
    )]
    Chmod(String),
    /// `--checksum=x`.
    #[error("invalid checksum {0:?}; use sha256:<64 hex digits> for a URL, or the commit for a Git source")]
    Checksum(String),
    /// `COPY https://...`.
    #[error("source can't be a URL for COPY; use ADD to download {0:?}")]
    CopyUrl(String),
    /// `COPY git@...`.
    #[error("source can't be a git ref for COPY; use ADD for {0:?}")]
    CopyGit(String),
    /// `EXPOSE x`.
    #[error(
        "invalid containerPort: {0}; use PORT, PORT-PORT, optionally with /tcp, /udp or /sctp"
    )]
    Port(String),
    /// A HEALTHCHECK duration.
    #[error("invalid duration {value:?} for --{flag}; use a Go duration such as 30s or 1m30s")]
    Duration { flag: String, value: String },
    /// A duration shorter than a millisecond.
    #[error("interval {value:?} for --{flag} cannot be less than 1ms")]
    DurationTooShort { flag: String, value: String },
    /// `--retries=x`.
    #[error("invalid --retries {0:?}; use a number of at least 0")]
    Retries(String),
    /// `HEALTHCHECK FOO`.
    #[error("unknown type {0:?} in HEALTHCHECK (try CMD)")]
    HealthcheckType(String),
    /// `COPY --from=$X`.
    #[error("variable expansion is not supported for --from ({0:?}); define a new stage with FROM using ARG from global scope as a workaround")]
    FromExpansion(String),
    /// `STOPSIGNAL SIGFOO`.
    #[error("invalid signal: {0}; use a name such as SIGTERM or a nonzero number")]
    Signal(String),
    /// `RUN --device=,x`.
    #[error("invalid --device value {0:?}; use NAME or NAME,required")]
    Device(String),
    /// `COPY a <<EOF`.
    #[error("{0} cannot accept a heredoc as destination")]
    HeredocDestination(&'static str),
    /// `HEALTHCHECK NONE x`.
    #[error("HEALTHCHECK NONE takes no arguments")]
    HealthcheckNoneArgs,
    /// `HEALTHCHECK CMD` alone.
    #[error("missing command after HEALTHCHECK CMD")]
    HealthcheckMissingCmd,
    /// A bad `--platform`.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// A bad `--mount`.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// A variable could not be expanded.
    #[error(transparent)]
    Expansion(#[from] ShellError),
}

/// An [`InstructionError`] and the text it is about, for the caret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckError {
    /// What went wrong.
    pub kind: InstructionError,
    /// The token at fault (a flag, an argument); empty for the whole line.
    pub token: String,
}

impl<E: Into<InstructionError>> From<E> for CheckError {
    fn from(e: E) -> Self {
        CheckError {
            kind: e.into(),
            token: String::new(),
        }
    }
}

fn at(kind: impl Into<InstructionError>, token: &str) -> CheckError {
    CheckError {
        kind: kind.into(),
        token: token.to_string(),
    }
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, CheckError>;

/// Expands words with the variables in scope and remembers which were used.
pub struct Expander<'a> {
    lexer: Lexer,
    env: &'a dyn Env,
    /// Variables referenced and set.
    pub matched: BTreeSet<String>,
    /// Variables referenced and unset.
    pub unmatched: BTreeSet<String>,
}

impl<'a> Expander<'a> {
    /// An expander with escape character `escape` over `env`.
    pub fn new(escape: char, env: &'a dyn Env) -> Self {
        Expander {
            lexer: Lexer::new(escape),
            env,
            matched: BTreeSet::new(),
            unmatched: BTreeSet::new(),
        }
    }

    /// Expand to one word.
    pub fn word(&mut self, s: &str) -> std::result::Result<String, ShellError> {
        let e = self.lexer.process(s, self.env)?;
        self.matched.extend(e.matched);
        self.unmatched.extend(e.unmatched);
        Ok(e.word)
    }

    /// Expand and split into words.
    pub fn words(&mut self, s: &str) -> std::result::Result<Vec<String>, ShellError> {
        let e = self.lexer.process(s, self.env)?;
        self.matched.extend(e.matched);
        self.unmatched.extend(e.unmatched);
        Ok(e.words)
    }
}

/// Exec form (a JSON array) or shell form (one string for the shell).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandLine {
    /// `["prog", "arg"]`: run directly.
    Exec(Vec<String>),
    /// `prog arg`: run through SHELL.
    Shell(String),
}

impl CommandLine {
    fn from_node(node: &Node) -> Self {
        if node.json {
            CommandLine::Exec(node.args.clone())
        } else {
            CommandLine::Shell(node.args.first().cloned().unwrap_or_default())
        }
    }
}

/// What a RUN executes once heredocs are taken into account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunCommand {
    /// Exec form.
    Exec(Vec<String>),
    /// A shell script for SHELL (heredocs already appended to it).
    Shell(String),
    /// `RUN <<EOF` alone: the body is the script, never expanded by the
    /// frontend. With a `#!` line BuildKit writes it, mode 0755, to a
    /// read-only mount at `/dev/pipes/<name>` and runs SHELL with that path
    /// (so the kernel honours the interpreter line); otherwise the body
    /// itself is SHELL's `-c` script.
    Heredoc {
        /// Heredoc name (used as the file name).
        name: String,
        /// Body, tabs already stripped for `<<-`.
        content: String,
        /// The body starts with `#!`.
        shebang: bool,
    },
}

/// `RUN --network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// The sandbox's usual network.
    Default,
    /// A network namespace of its own with outbound access through a
    /// user-mode network stack.
    Sandbox,
    /// No network.
    None,
    /// The host's network (needs the `network.host` entitlement).
    Host,
}

/// `RUN --security`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SecurityMode {
    /// The usual sandbox.
    Sandbox,
    /// Privileged (needs the `security.insecure` entitlement).
    Insecure,
}

/// `FROM [--platform=P] image [AS name]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FromStage {
    /// Image reference, stage name or `scratch`, expanded.
    pub image: String,
    /// `--platform`, expanded.
    pub platform: Option<String>,
    /// Stage name, lower-cased.
    pub name: Option<String>,
}

/// `RUN`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Run {
    /// What to execute.
    pub command: RunCommand,
    /// `--mount`s, in order.
    pub mounts: Vec<Mount>,
    /// `--network`.
    pub network: Option<NetworkMode>,
    /// `--security`.
    pub security: Option<SecurityMode>,
    /// `--device`s (CDI device names).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<Device>,
}

/// `RUN --device=name[,required]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Device {
    /// CDI device name, e.g. `vendor.com/gpu=0`.
    pub name: String,
    /// Fail when the device is not available.
    pub required: bool,
}

fn parse_device(s: &str) -> std::result::Result<Device, InstructionError> {
    let mut parts = s.split(',');
    let name = parts.next().unwrap_or_default().trim().to_string();
    if name.is_empty() {
        return Err(InstructionError::Device(s.to_string()));
    }
    let mut required = false;
    for p in parts {
        required = match p.trim().to_ascii_lowercase().as_str() {
            "required" | "required=true" => true,
            "required=false" => false,
            _ => return Err(InstructionError::Device(s.to_string())),
        };
    }
    Ok(Device { name, required })
}

/// `--chmod` value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Chmod {
    /// `0755`.
    Octal(u32),
    /// `u=rwX,go=rX`.
    Symbolic(String),
}

/// A COPY/ADD source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A path or glob in the context (or `--from`), or for ADD a URL/git ref.
    Path(String),
    /// An inline file from a heredoc.
    Heredoc {
        /// File name (the heredoc's name).
        name: String,
        /// Content, expanded unless the delimiter was quoted.
        content: String,
    },
}

/// `COPY`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Copy {
    /// Sources.
    pub sources: Vec<Source>,
    /// Destination; a trailing `/` matters.
    pub dest: String,
    /// `--from`: stage name/index, named context or image.
    pub from: Option<String>,
    /// `--chown`.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<Chmod>,
    /// `--link`.
    pub link: bool,
    /// `--parents`.
    pub parents: bool,
    /// `--exclude` patterns.
    pub excludes: Vec<String>,
}

/// `ADD`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Add {
    /// Sources (paths, URLs, git refs, heredocs).
    pub sources: Vec<Source>,
    /// Destination.
    pub dest: String,
    /// `--chown`.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<Chmod>,
    /// `--link`.
    pub link: bool,
    /// `--keep-git-dir`.
    pub keep_git_dir: bool,
    /// `--checksum`.
    pub checksum: Option<String>,
    /// `--unpack` (None: extract local archives only).
    pub unpack: Option<bool>,
    /// `--exclude` patterns.
    pub excludes: Vec<String>,
}

/// An `ENV`/`LABEL` pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyValue {
    /// Name.
    pub key: String,
    /// Value, expanded.
    pub value: String,
}

/// One `ARG` declaration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArgDecl {
    /// Name, taken literally.
    pub key: String,
    /// Default as written; None for `ARG NAME`. BuildKit expands it only
    /// when no build arg gives the value, so the planner does that.
    pub default: Option<String>,
    /// The value in force after this ARG (build arg, expanded default or
    /// global value), filled in by the planner; None when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// An `EXPOSE` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Port {
    /// First port.
    pub start: u16,
    /// Last port (same as start for one port).
    pub end: u16,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
}

/// `HEALTHCHECK`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Healthcheck {
    /// `HEALTHCHECK NONE`: disable the inherited check.
    None,
    /// `HEALTHCHECK [options] CMD ...`.
    Cmd {
        /// The test command.
        command: CommandLine,
        /// `--interval` (default 30s when None).
        interval: Option<Duration>,
        /// `--timeout` (default 30s).
        timeout: Option<Duration>,
        /// `--start-period` (default 0s).
        start_period: Option<Duration>,
        /// `--start-interval` (default 5s).
        start_interval: Option<Duration>,
        /// `--retries` (default 3).
        retries: Option<u32>,
    },
}

/// `ONBUILD`: a trigger stored for images built FROM this one. It is checked
/// now but expanded when it fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Onbuild {
    /// The trigger as written, e.g. `COPY . /app`.
    pub expression: String,
    /// Its instruction keyword, lower-case.
    pub instruction: String,
}

/// A checked Dockerfile instruction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "instruction", content = "args", rename_all = "lowercase")]
pub enum Instruction {
    From(FromStage),
    Run(Run),
    Cmd(CommandLine),
    Entrypoint(CommandLine),
    Shell(Vec<String>),
    Env(Vec<KeyValue>),
    Arg(Vec<ArgDecl>),
    Label(Vec<KeyValue>),
    Expose(Vec<Port>),
    Workdir(String),
    User(String),
    Volume(Vec<String>),
    Copy(Copy),
    Add(Add),
    Onbuild(Onbuild),
    Healthcheck(Healthcheck),
    StopSignal(String),
    Maintainer(String),
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Bool,
    Str,
    List,
}

struct Flags {
    values: Vec<(&'static str, Vec<Option<String>>)>,
}

impl Flags {
    fn parse(instruction: &str, raw: &[String], spec: &[(&'static str, Kind)]) -> Result<Self> {
        let mut values: Vec<(&'static str, Vec<Option<String>>)> =
            spec.iter().map(|(n, _)| (*n, Vec::new())).collect();
        for f in raw {
            let body = f.strip_prefix("--").unwrap_or(f);
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            if name.is_empty() {
                return Err(at(InstructionError::BadFlag(f.clone()), f));
            }
            let Some(i) = spec.iter().position(|(n, _)| *n == name) else {
                let names: Vec<&str> = spec.iter().map(|(n, _)| *n).collect();
                let hint = crate::frontend::lint::suggest(name, &names)
                    .map(|m| format!(" (did you mean {m}?)"))
                    .unwrap_or_default();
                return Err(at(
                    InstructionError::UnknownFlag {
                        instruction: instruction.to_uppercase(),
                        flag: name.to_string(),
                        hint,
                    },
                    f,
                ));
            };
            let kind = spec[i].1;
            match (kind, &value) {
                (Kind::Str | Kind::List, None) => {
                    return Err(at(InstructionError::FlagNeedsValue(name.into()), f))
                }
                (Kind::Bool, Some(v))
                    if !matches!(v.to_ascii_lowercase().as_str(), "true" | "false") =>
                {
                    return Err(at(
                        InstructionError::FlagNotBool {
                            flag: name.into(),
                            value: v.clone(),
                        },
                        f,
                    ))
                }
                _ => {}
            }
            if kind != Kind::List && !values[i].1.is_empty() {
                return Err(at(InstructionError::DuplicateFlag(name.into()), f));
            }
            values[i].1.push(value);
        }
        Ok(Flags { values })
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.iter().flatten().cloned().collect())
            .unwrap_or_default()
    }

    fn get(&self, name: &str) -> Option<String> {
        self.all(name).into_iter().next()
    }

    fn set(&self, name: &str) -> bool {
        self.values.iter().any(|(n, v)| *n == name && !v.is_empty())
    }

    fn bool(&self, name: &str) -> bool {
        self.opt_bool(name).unwrap_or(false)
    }

    fn opt_bool(&self, name: &str) -> Option<bool> {
        let (_, v) = self.values.iter().find(|(n, _)| *n == name)?;
        let v = v.first()?;
        Some(v.as_deref().is_none_or(|s| s.eq_ignore_ascii_case("true")))
    }
}

/// Is `s` a signal Linux knows: a number, `RTMIN+n`, or a name with or
/// without `SIG`, in any case?
pub fn valid_signal(s: &str) -> bool {
    const NAMES: [&str; 33] = [
        "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT",
        "KILL", "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM",
        "TRAP", "TSTP", "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU",
    ];
    if let Ok(n) = s.parse::<i64>() {
        return n != 0;
    }
    let up = s.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    if let Some(rt) = name
        .strip_prefix("RTMIN+")
        .or_else(|| name.strip_prefix("RTMAX-"))
    {
        return rt.parse::<u32>().is_ok_and(|n| n <= 30);
    }
    NAMES.contains(&name) || name == "XFSZ" || name == "RTMIN" || name == "RTMAX"
}

/// Does `s` hold a `$` with something after it (BuildKit's `\$.` test for
/// the `--from` values it refuses to expand)?
pub fn has_variable(s: &str) -> bool {
    s.find('$').is_some_and(|i| i + 1 < s.len())
}

/// Is an ADD source a URL or Git repository rather than a context path?
pub fn is_remote(src: &str) -> bool {
    let lower = src.to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://") || is_git(src)
}

/// Is an ADD source a Git repository (`git@`, `git://`, `ssh://`, or an
/// HTTP(S) URL whose path ends in `.git`)?
pub fn is_git(src: &str) -> bool {
    let lower = src.to_ascii_lowercase();
    lower.starts_with("git@")
        || lower.starts_with("git://")
        || lower.starts_with("ssh://")
        || lower
            .split(['#', '?'])
            .next()
            .is_some_and(|u| u.ends_with(".git") && u.contains("://"))
}

const INSTRUCTIONS: [&str; 18] = [
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "MAINTAINER",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
];

/// "; did you mean X?" for a near miss, else the list of instructions.
fn instruction_hint(name: &str) -> String {
    let upper = name.to_uppercase();
    let best = INSTRUCTIONS
        .iter()
        .map(|i| (edit_distance(&upper, i), *i))
        .min()
        .filter(|(d, _)| *d <= 2);
    match best {
        Some((_, i)) => format!("; did you mean {i}?"),
        None => format!("; expected one of {}", INSTRUCTIONS.join(", ")),
    }
}

/// Levenshtein distance, for "did you mean" hints.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Is `name` a valid stage name (`^[a-z][a-z0-9-_.]*$`)?
pub fn valid_stage_name(name: &str) -> bool {
    let mut c = name.chars();
    c.next().is_some_and(|f| f.is_ascii_lowercase())
        && c.all(|ch| {
            ch.is_ascii_lowercase() || ch.is_ascii_digit() || matches!(ch, '-' | '_' | '.')
        })
}

/// Parse a `--chmod` value.
pub fn parse_chmod(s: &str) -> std::result::Result<Chmod, InstructionError> {
    let bad = || InstructionError::Chmod(s.to_string());
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
        let m = u32::from_str_radix(s, 8).map_err(|_| bad())?;
        return if m <= 0o7777 {
            Ok(Chmod::Octal(m))
        } else {
            Err(bad())
        };
    }
    // [ugoa]*([-+=]([rwxXst]*|[ugo]))+ per clause, comma separated.
    for clause in s.split(',') {
        let who = clause.trim_start_matches(['u', 'g', 'o', 'a']);
        if who.is_empty() {
            return Err(bad());
        }
        let mut rest = who;
        while !rest.is_empty() {
            let Some(r) = rest.strip_prefix(['+', '-', '=']) else {
                return Err(bad());
            };
            let perms_end = r.find(['+', '-', '=']).unwrap_or(r.len());
            let perms = &r[..perms_end];
            let ok = perms.chars().all(|c| "rwxXst".contains(c))
                || (perms.len() == 1 && "ugo".contains(perms));
            if !ok {
                return Err(bad());
            }
            rest = &r[perms_end..];
        }
    }
    Ok(Chmod::Symbolic(s.to_string()))
}

/// A checksum for an HTTP source is `sha256:<64 hex>`; for a Git source it
/// is the commit (a hex object name, optionally prefixed by its algorithm).
fn parse_checksum(s: &str, git: bool) -> std::result::Result<String, InstructionError> {
    let hex = |h: &str, lens: &[usize]| {
        lens.contains(&h.len()) && h.chars().all(|c| c.is_ascii_hexdigit())
    };
    let ok = if git {
        let h = s
            .strip_prefix("sha1:")
            .or_else(|| s.strip_prefix("sha256:"))
            .unwrap_or(s);
        (7..=64).contains(&h.len()) && hex(h, &[h.len()])
    } else {
        s.strip_prefix("sha256:").is_some_and(|h| hex(h, &[64]))
    };
    if ok {
        Ok(s.to_string())
    } else {
        Err(InstructionError::Checksum(s.to_string()))
    }
}

/// Parse one EXPOSE word: `80`, `80/udp`, `8000-8010/tcp`.
pub fn parse_port(s: &str) -> std::result::Result<Port, InstructionError> {
    let bad = || InstructionError::Port(s.to_string());
    let (range, proto) = match s.split_once('/') {
        Some((r, p)) => (r, p.to_ascii_lowercase()),
        None => (s, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(bad());
    }
    // An `ip:` prefix is accepted and ignored, as Docker does.
    let range = range.rsplit(':').next().unwrap_or(range);
    let (a, b) = range.split_once('-').unwrap_or((range, range));
    let start: u16 = a.parse().map_err(|_| bad())?;
    let end: u16 = b.parse().map_err(|_| bad())?;
    if end < start {
        return Err(bad());
    }
    Ok(Port {
        start,
        end,
        protocol: proto,
    })
}

/// Parse a Go duration (`300ms`, `1.5h`, `2h45m`).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.is_empty() || rest.starts_with('-') {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_end == 0 {
            return None;
        }
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).ok()
}

fn duration_flag(flags: &Flags, name: &str) -> Result<Option<Duration>> {
    let Some(v) = flags.get(name) else {
        return Ok(None);
    };
    let d = parse_go_duration(&v).ok_or_else(|| {
        at(
            InstructionError::Duration {
                flag: name.into(),
                value: v.clone(),
            },
            &v,
        )
    })?;
    if d != Duration::ZERO && d < Duration::from_millis(1) {
        return Err(at(
            InstructionError::DurationTooShort {
                flag: name.into(),
                value: v.clone(),
            },
            &v,
        ));
    }
    Ok(Some(d))
}

fn no_flags(node: &Node) -> Result<()> {
    Flags::parse(&node.instruction, &node.flags, &[]).map(|_| ())
}

fn upper(name: &str) -> &'static str {
    match name {
        "from" => "FROM",
        "run" => "RUN",
        "cmd" => "CMD",
        "entrypoint" => "ENTRYPOINT",
        "shell" => "SHELL",
        "env" => "ENV",
        "arg" => "ARG",
        "label" => "LABEL",
        "expose" => "EXPOSE",
        "workdir" => "WORKDIR",
        "user" => "USER",
        "volume" => "VOLUME",
        "copy" => "COPY",
        "add" => "ADD",
        "onbuild" => "ONBUILD",
        "healthcheck" => "HEALTHCHECK",
        "stopsignal" => "STOPSIGNAL",
        "maintainer" => "MAINTAINER",
        _ => "instruction",
    }
}

/// Is `name` (lower-case) a Dockerfile instruction?
pub fn is_instruction(name: &str) -> bool {
    upper(name) != "instruction"
}

/// Checks one instruction of a known kind.
type Checker = fn(&Node, &mut Expander<'_>) -> Result<Instruction>;

/// The checker of each instruction, by lower-case keyword.
const CHECKERS: [(&str, Checker); 18] = [
    ("from", check_from),
    ("run", check_run),
    ("cmd", check_cmd),
    ("entrypoint", check_entrypoint),
    ("shell", check_shell),
    ("env", check_env),
    ("label", check_label),
    ("arg", check_arg),
    ("expose", check_expose),
    ("workdir", check_workdir),
    ("user", check_user),
    ("stopsignal", check_stopsignal),
    ("maintainer", check_maintainer),
    ("volume", check_volume),
    ("copy", check_copy),
    ("add", check_add),
    ("onbuild", check_onbuild),
    ("healthcheck", check_healthcheck),
];

/// Check `node` and expand it with `ex`.
pub fn check(node: &Node, ex: &mut Expander<'_>) -> Result<Instruction> {
    let name = node.instruction.as_str();
    match CHECKERS.iter().find(|(n, _)| *n == name) {
        Some((_, checker)) => checker(node, ex),
        None => Err(at(
            InstructionError::UnknownInstruction(name.to_uppercase()),
            name,
        )),
    }
}

/// Expand `raw` as one word; an error points at `raw`.
fn expand(ex: &mut Expander<'_>, raw: &str) -> Result<String> {
    ex.word(raw).map_err(|e| at(e, raw))
}

/// Refuse an instruction without arguments.
fn require_args(node: &Node) -> Result<()> {
    if node.args.is_empty() {
        return Err(InstructionError::NoArguments(upper(&node.instruction)).into());
    }
    Ok(())
}

/// The only argument of an instruction that takes no flags and one argument.
fn single_arg(node: &Node) -> Result<String> {
    no_flags(node)?;
    let up = upper(&node.instruction);
    match node.args.as_slice() {
        [a] => Ok(a.clone()),
        [] => Err(InstructionError::NoArguments(up).into()),
        _ => Err(InstructionError::ExactlyOne(up).into()),
    }
}

fn check_from(node: &Node, ex: &mut Expander<'_>) -> Result<Instruction> {
    let flags = Flags::parse(&node.instruction, &node.flags, &[("platform", Kind::Str)])?;
    let (image, stage) = match node.args.as_slice() {
        [image] => (image, None),
        [image, as_, stage] if as_.eq_ignore_ascii_case("as") => (image, Some(stage)),
        _ => return Err(InstructionError::FromArgs.into()),
    };
    let name = match stage {
        Some(s) => {
            let lower = s.to_lowercase();
            if !valid_stage_name(&lower) {
                return Err(at(InstructionError::InvalidStageName(s.clone()), s));
            }
            Some(lower)
        }
        None => None,
    };
    let expanded = expand(ex, image)?;
    if expanded.is_empty() {
        return Err(at(InstructionError::EmptyImage(image.clone()), image));
    }
    let platform = match flags.get("platform") {
        Some(p) => Some(expand(ex, &p)?),
        None => None,
    };
    Ok(Instruction::From(FromStage {
        image: expanded,
        platform,
        name,
    }))
}

fn check_run(node: &Node, ex: &mut Expander<'_>) -> Result<Instruction> {
    let flags = Flags::parse(
        &node.instruction,
        &node.flags,
        &[
            ("mount", Kind::List),
            ("network", Kind::Str),
            ("security", Kind::Str),
            ("device", Kind::List),
        ],
    )?;
    let devices = flags
        .all("device")
        .iter()
        .map(|d| parse_device(d).map_err(|e| at(e, d)))
        .collect::<Result<Vec<_>>>()?;
    let mounts = run_mounts(&flags.all("mount"), ex)?;
    let network = flags.get("network").map(|n| network_mode(&n)).transpose()?;
    let security = flags
        .get("security")
        .map(|s| security_mode(&s))
        .transpose()?;
    require_args(node)?;
    Ok(Instruction::Run(Run {
        command: run_command(node),
        mounts,
        network,
        security,
        devices,
    }))
}

/// RUN's `--mount`s; SSH mounts are numbered in order for their sockets.
fn run_mounts(values: &[String], ex: &mut Expander<'_>) -> Result<Vec<Mount>> {
    let mut mounts = Vec::new();
    let mut ssh = 0;
    for m in values {
        let mount = parse_mount(m, &mut |v| ex.word(v), ssh).map_err(|e| at(e, m))?;
        if matches!(mount, Mount::Ssh { .. }) {
            ssh += 1;
        }
        mounts.push(mount);
    }
    Ok(mounts)
}

fn network_mode(n: &str) -> Result<NetworkMode> {
    Ok(match n {
        "default" => NetworkMode::Default,
        "sandbox" => NetworkMode::Sandbox,
        "none" => NetworkMode::None,
        "host" => NetworkMode::Host,
        _ => return Err(at(InstructionError::Network(n.to_string()), n)),
    })
}

fn security_mode(s: &str) -> Result<SecurityMode> {
    Ok(match s {
        "sandbox" => SecurityMode::Sandbox,
        "insecure" => SecurityMode::Insecure,
        _ => return Err(at(InstructionError::Security(s.to_string()), s)),
    })
}

fn check_cmd(node: &Node, _: &mut Expander<'_>) -> Result<Instruction> {
    no_flags(node)?;
    Ok(Instruction::Cmd(CommandLine::from_node(node)))
}

fn check_entrypoint(node: &Node, _: &mut Expander<'_>) -> Result<Instruction> {
    no_flags(node)?;
    Ok(Instruction::Entrypoint(CommandLine::from_node(node)))
}

fn check_shell(node: &Node, _: &mut Expander<'_>) -> Result<Instruction> {
    no_flags(node)?;
    require_args(node)?;
    if !node.json {
        return Err(InstructionError::ShellNotJson.into());
    }
    Ok(Instruction::Shell(node.args.clone()))
}

fn check_env(node: &Node, ex: &mut Expander<'_>) -> Result<Instruction> {
    Ok(Instruction::Env(key_values(node, ex)?))
}

fn check_label(node: &Node, ex: &mut Expander<'_>) -> Result<Instruction> {
    Ok(Instruction::Label(key_values(node, ex)?))
}

/// ENV's and LABEL's pairs (the parser gives key, value, separator
/// triples), both sides expanded.
fn key_values(node: &Node, ex: &mut Expander<'_>) -> Result<Vec<KeyValue>> {
    no_flags(node)?;
    require_args(node)?;
    // Every pair sees the variables as they were before this
    // instruction: within one instruction a variable keeps one value.
    let mut kvs = Vec::new();
    for t in node.args.chunks(3) {
        let (k, v) = (&t[0], t.get(1).map_or("", String::as_str));
        let key = expand(ex, k)?;
        if key.is_empty() {
            return Err(at(InstructionError::BlankName(upper(&node.instruction)), k));
        }
        let value = expand(ex, v)?;
        kvs.push(KeyValue { key, value });
    }
    Ok(kvs)
}

fn check_arg(node: &Node, _: &mut Expander<'_>) -> Result<Instruction> {
    no_flags(node)?;
    require_args(node)?;
    let mut decls = Vec::new();
    for a in &node.args {
        let (k, v) = match a.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (a.as_str(), None),
        };
        // BuildKit takes ARG names literally; only defaults expand, and
        // the planner expands them.
        if k.is_empty() {
            return Err(at(InstructionError::BlankName("ARG"), a));
        }
        decls.push(ArgDecl {
            key: k.to_string(),
            default: v.map(str::to_string),
            value: None,
        });
    }
    Ok(Instruction::Arg(decls))
}

fn check_expose(node: &Node, ex: &mut Expander<'_>) -> Result<Instruction> {
    no_flags(node)?;
    require_args(node)?;
    let mut ports = Vec::new();
    for a in &node.args {
        for w in ex.words(a).map_err(|e| at(e, a))? {
            ports.push(parse_port(&w).map_err(|e| at(e, a))?);
        }
    }
    Ok(Instruction::Expose(ports))
}

fn check_workdir(node: &Node, ex: &mut Expander<'_>) -> Result<Instruction> {
    let raw = single_arg(node)?;
    Ok(Instruction::Workdir(expand(ex, &raw)?))
}

fn check_user(node: &Node, ex: &mut Expander<'_>) -> Result<Instruction> {
    let raw = single_arg(node)?;
    Ok(Instruction::User(expand(ex, &raw)?))
}

fn check_stopsignal(node: &Node, ex: &mut Expander<'_>) -> Result<Instruction> {
    let raw = single_arg(node)?;
    let v = expand(ex, &raw)?;
    if !valid_signal(&v) {
        return Err(at(InstructionError::Signal(v), &raw));
    }
    Ok(Instruction::StopSignal(v))
}

/// MAINTAINER is taken as written, never expanded.
fn check_maintainer(node: &Node, _: &mut Expander<'_>) -> Result<Instruction> {
    Ok(Instruction::Maintainer(single_arg(node)?))
}

fn check_volume(node: &Node, ex: &mut Expander<'_>) -> Result<Instruction> {
    no_flags(node)?;
    require_args(node)?;
    let mut vols = Vec::new();
    for a in &node.args {
        let v = expand(ex, a)?;
        if v.trim().is_empty() {
            return Err(InstructionError::EmptyVolume.into());
        }
        vols.push(v);
    }
    Ok(Instruction::Volume(vols))
}

/// ONBUILD: the trigger is checked for what it may be, and kept as written
/// to be expanded when it fires.
fn check_onbuild(node: &Node, _: &mut Expander<'_>) -> Result<Instruction> {
    no_flags(node)?;
    let Some(sub) = &node.sub else {
        return Err(InstructionError::NoArguments("ONBUILD").into());
    };
    match sub.instruction.as_str() {
        "onbuild" | "from" | "maintainer" => {
            return Err(at(
                InstructionError::OnbuildForbidden(upper(&sub.instruction).into()),
                &sub.instruction,
            ))
        }
        i if !is_instruction(i) => {
            return Err(at(
                InstructionError::UnknownInstruction(i.to_uppercase()),
                i,
            ))
        }
        _ => {}
    }
    // a heredoc's body and terminator are part of the trigger, as BuildKit
    // stores it in the image's OnBuild
    let mut expression = sub.original.trim().to_string();
    let heredocs = if sub.heredocs.is_empty() {
        &node.heredocs
    } else {
        &sub.heredocs
    };
    for h in heredocs {
        expression.push('\n');
        expression.push_str(&h.content);
        if !h.content.is_empty() && !h.content.ends_with('\n') {
            expression.push('\n');
        }
        expression.push_str(&h.name);
    }
    Ok(Instruction::Onbuild(Onbuild {
        expression,
        instruction: sub.instruction.clone(),
    }))
}

fn check_healthcheck(node: &Node, _: &mut Expander<'_>) -> Result<Instruction> {
    let flags = Flags::parse(
        &node.instruction,
        &node.flags,
        &[
            ("interval", Kind::Str),
            ("timeout", Kind::Str),
            ("start-period", Kind::Str),
            ("start-interval", Kind::Str),
            ("retries", Kind::Str),
        ],
    )?;
    let args = &node.args;
    let Some(typ) = args.first() else {
        return Err(InstructionError::NoArguments("HEALTHCHECK").into());
    };
    match typ.to_uppercase().as_str() {
        "NONE" => {
            // Flags are accepted and ignored here, as BuildKit does.
            if args.len() > 1 {
                return Err(InstructionError::HealthcheckNoneArgs.into());
            }
            Ok(Instruction::Healthcheck(Healthcheck::None))
        }
        "CMD" => healthcheck_cmd(node, &flags),
        _ => Err(at(InstructionError::HealthcheckType(typ.clone()), typ)),
    }
}

/// `HEALTHCHECK [flags] CMD ...`.
fn healthcheck_cmd(node: &Node, flags: &Flags) -> Result<Instruction> {
    let rest = &node.args[1..];
    if rest.is_empty() || (!node.json && rest[0].is_empty()) {
        return Err(InstructionError::HealthcheckMissingCmd.into());
    }
    let command = if node.json {
        CommandLine::Exec(rest.to_vec())
    } else {
        CommandLine::Shell(rest[0].clone())
    };
    let retries = match flags.get("retries") {
        None => None,
        Some(r) => Some(
            r.parse::<u32>()
                .map_err(|_| at(InstructionError::Retries(r.clone()), &r))?,
        ),
    };
    Ok(Instruction::Healthcheck(Healthcheck::Cmd {
        command,
        interval: duration_flag(flags, "interval")?,
        timeout: duration_flag(flags, "timeout")?,
        start_period: duration_flag(flags, "start-period")?,
        start_interval: duration_flag(flags, "start-interval")?,
        retries,
    }))
}

fn run_command(node: &Node) -> RunCommand {
    if node.json {
        return RunCommand::Exec(node.args.clone());
    }
    let line = node.args.first().cloned().unwrap_or_default();
    if node.heredocs.is_empty() {
        return RunCommand::Shell(line);
    }
    if let (Some(_), [doc]) = (parse_heredoc(&line), node.heredocs.as_slice()) {
        let content = doc.body();
        return RunCommand::Heredoc {
            name: doc.name.clone(),
            shebang: content.starts_with("#!"),
            content,
        };
    }
    // Several heredocs, or one inside a longer command: hand the shell the
    // reconstituted script and let it read the heredocs itself.
    let mut full = line;
    for doc in &node.heredocs {
        full.push('\n');
        full.push_str(&doc.content);
        full.push_str(&doc.name);
    }
    RunCommand::Shell(full)
}

/// COPY's flags.
const COPY_FLAGS: &[(&str, Kind)] = &[
    ("from", Kind::Str),
    ("chown", Kind::Str),
    ("chmod", Kind::Str),
    ("link", Kind::Bool),
    ("parents", Kind::Bool),
    ("exclude", Kind::List),
];

/// ADD's flags.
const ADD_FLAGS: &[(&str, Kind)] = &[
    ("chown", Kind::Str),
    ("chmod", Kind::Str),
    ("link", Kind::Bool),
    ("keep-git-dir", Kind::Bool),
    ("checksum", Kind::Str),
    ("unpack", Kind::Bool),
    ("exclude", Kind::List),
];

/// What COPY and ADD have in common, checked and expanded.
struct Transfer {
    flags: Flags,
    sources: Vec<Source>,
    dest: String,
    chown: Option<String>,
    chmod: Option<Chmod>,
    /// `--exclude`, not expanded (BuildKit does not expand them).
    excludes: Vec<String>,
}

fn check_copy(node: &Node, ex: &mut Expander<'_>) -> Result<Instruction> {
    let t = check_transfer(node, ex, "COPY", COPY_FLAGS)?;
    for src in &t.sources {
        if let Source::Path(p) = src {
            if is_git(p) {
                return Err(at(InstructionError::CopyGit(p.clone()), p));
            }
            if is_remote(p) {
                return Err(at(InstructionError::CopyUrl(p.clone()), p));
            }
        }
    }
    let from = t.flags.get("from");
    if let Some(f) = from.as_deref().filter(|f| has_variable(f)) {
        return Err(at(InstructionError::FromExpansion(f.to_string()), f));
    }
    Ok(Instruction::Copy(Copy {
        from,
        link: t.flags.bool("link"),
        parents: t.flags.bool("parents"),
        sources: t.sources,
        dest: t.dest,
        chown: t.chown,
        chmod: t.chmod,
        excludes: t.excludes,
    }))
}

fn check_add(node: &Node, ex: &mut Expander<'_>) -> Result<Instruction> {
    let t = check_transfer(node, ex, "ADD", ADD_FLAGS)?;
    let checksum = match expand_flag(&t.flags, ex, "checksum")? {
        Some(c) => Some(add_checksum(&c, &t.sources)?),
        None => None,
    };
    Ok(Instruction::Add(Add {
        link: t.flags.bool("link"),
        keep_git_dir: t.flags.bool("keep-git-dir"),
        checksum,
        unpack: if t.flags.set("unpack") {
            t.flags.opt_bool("unpack")
        } else {
            None
        },
        sources: t.sources,
        dest: t.dest,
        chown: t.chown,
        chmod: t.chmod,
        excludes: t.excludes,
    }))
}

/// ADD `--checksum`: only for a single remote source.
fn add_checksum(checksum: &str, sources: &[Source]) -> Result<String> {
    let [Source::Path(src)] = sources else {
        return Err(at(InstructionError::ChecksumSource, "--checksum"));
    };
    if !is_remote(src) {
        return Err(at(InstructionError::ChecksumSource, "--checksum"));
    }
    parse_checksum(checksum, is_git(src)).map_err(|e| at(e, checksum))
}

/// The flags, sources and destination of COPY or ADD (`up`), with `spec`
/// the flags it takes.
fn check_transfer(
    node: &Node,
    ex: &mut Expander<'_>,
    up: &'static str,
    spec: &[(&'static str, Kind)],
) -> Result<Transfer> {
    let flags = Flags::parse(&node.instruction, &node.flags, spec)?;
    let args = &node.args;
    if args.len() < 2 {
        return Err(at(
            InstructionError::NeedsDestination(up),
            args.first().map_or("", String::as_str),
        ));
    }
    let (srcs, dest) = args.split_at(args.len() - 1);
    if !node.json && parse_heredoc(&dest[0]).is_some() {
        return Err(at(InstructionError::HeredocDestination(up), &dest[0]));
    }
    let dest = expand(ex, &dest[0])?;
    let sources = transfer_sources(node, srcs, ex)?;
    let chown = expand_flag(&flags, ex, "chown")?;
    let chmod = match expand_flag(&flags, ex, "chmod")? {
        Some(c) => Some(parse_chmod(&c).map_err(|e| at(e, &c))?),
        None => None,
    };
    let excludes = flags.all("exclude");
    Ok(Transfer {
        flags,
        sources,
        dest,
        chown,
        chmod,
        excludes,
    })
}

/// COPY/ADD sources: a `<<NAME` word takes the next heredoc's body
/// (expanded unless its delimiter was quoted); other words are expanded
/// paths.
fn transfer_sources(node: &Node, srcs: &[String], ex: &mut Expander<'_>) -> Result<Vec<Source>> {
    let mut docs = node.heredocs.iter();
    let mut sources = Vec::new();
    for s in srcs {
        if !node.json && parse_heredoc(s).is_some() {
            if let Some(doc) = docs.next() {
                let body = doc.body();
                let content = if doc.expand {
                    ex.word_raw_quotes(&body).map_err(|e| at(e, s))?
                } else {
                    body
                };
                sources.push(Source::Heredoc {
                    name: doc.name.clone(),
                    content,
                });
                continue;
            }
        }
        sources.push(Source::Path(expand(ex, s)?));
    }
    Ok(sources)
}

/// Flag `name`, expanded, if given.
fn expand_flag(flags: &Flags, ex: &mut Expander<'_>, name: &str) -> Result<Option<String>> {
    flags.get(name).map(|v| expand(ex, &v)).transpose()
}

impl Expander<'_> {
    /// Expand a heredoc body as BuildKit does: quotes are file content and
    /// stay, variables are expanded, and a backslash escapes the next
    /// character (so `\$X` gives `$X`), whatever the file's escape token.
    pub fn word_raw_quotes(&mut self, s: &str) -> std::result::Result<String, ShellError> {
        let lex = Lexer {
            skip_process_quotes: true,
            ..Lexer::new('\\')
        };
        let e = lex.process(s, self.env)?;
        self.matched.extend(e.matched);
        self.unmatched.extend(e.unmatched);
        Ok(e.word)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::parser::parse;

    fn env() -> Vec<(String, String)> {
        vec![("V".into(), "val".into()), ("P".into(), "8080".into())]
    }

    fn one(line: &str) -> Result<Instruction> {
        let ast = parse(line.as_bytes(), "Dockerfile").expect("parses");
        let env = env();
        let mut ex = Expander::new('\\', &env);
        check(&ast.nodes[0], &mut ex)
    }

    fn err(line: &str) -> InstructionError {
        one(line).unwrap_err().kind
    }

    #[test]
    fn unknown_things_are_named() {
        assert_eq!(
            err("FORM x"),
            InstructionError::UnknownInstruction("FORM".into())
        );
        assert_eq!(
            err("COPY --bogus=1 a b"),
            InstructionError::UnknownFlag {
                instruction: "COPY".into(),
                flag: "bogus".into(),
                hint: String::new()
            }
        );
        assert_eq!(
            err("ADD --from=x a b"),
            InstructionError::UnknownFlag {
                instruction: "ADD".into(),
                flag: "from".into(),
                hint: String::new()
            }
        );
        assert_eq!(
            err("COPY --from a b"),
            InstructionError::FlagNeedsValue("from".into())
        );
        assert_eq!(
            err("COPY --from=a --from=b a b"),
            InstructionError::DuplicateFlag("from".into())
        );
        assert!(matches!(
            err("COPY --link=maybe a b"),
            InstructionError::FlagNotBool { .. }
        ));
        assert_eq!(
            err("ONBUILD FROM x"),
            InstructionError::OnbuildForbidden("FROM".into())
        );
        assert_eq!(
            err("ONBUILD ONBUILD RUN x"),
            InstructionError::OnbuildForbidden("ONBUILD".into())
        );
        assert_eq!(
            err("ONBUILD MAINTAINER x"),
            InstructionError::OnbuildForbidden("MAINTAINER".into())
        );
        assert_eq!(
            err("ONBUILD FOO x"),
            InstructionError::UnknownInstruction("FOO".into())
        );
    }

    #[test]
    fn from_forms() {
        assert_eq!(
            one("FROM --platform=$V alpine:${V} AS Build").unwrap(),
            Instruction::From(FromStage {
                image: "alpine:val".into(),
                platform: Some("val".into()),
                name: Some("build".into())
            })
        );
        assert_eq!(err("FROM a b"), InstructionError::FromArgs);
        assert_eq!(
            err("FROM a AS 1x"),
            InstructionError::InvalidStageName("1x".into())
        );
        assert_eq!(
            err("FROM $NOPE"),
            InstructionError::EmptyImage("$NOPE".into())
        );
    }

    #[test]
    fn env_label_arg() {
        assert_eq!(
            one("ENV A=$V B=\"x y\" C=${V}2").unwrap(),
            Instruction::Env(vec![
                KeyValue {
                    key: "A".into(),
                    value: "val".into()
                },
                KeyValue {
                    key: "B".into(),
                    value: "x y".into()
                },
                KeyValue {
                    key: "C".into(),
                    value: "val2".into()
                },
            ])
        );
        assert_eq!(
            one("ENV SCUBA \"1 DUBA 3\"").unwrap(),
            Instruction::Env(vec![KeyValue {
                key: "SCUBA".into(),
                value: "1 DUBA 3".into()
            }])
        );
        assert_eq!(
            one("LABEL a.b=\"c d\" e=f").unwrap(),
            Instruction::Label(vec![
                KeyValue {
                    key: "a.b".into(),
                    value: "c d".into()
                },
                KeyValue {
                    key: "e".into(),
                    value: "f".into()
                },
            ])
        );
        assert_eq!(
            one("ARG a b=\"1 2\" c=$V").unwrap(),
            Instruction::Arg(vec![
                ArgDecl {
                    key: "a".into(),
                    default: None,
                    value: None,
                },
                ArgDecl {
                    key: "b".into(),
                    default: Some("\"1 2\"".into()),
                    value: None,
                },
                ArgDecl {
                    key: "c".into(),
                    default: Some("$V".into()),
                    value: None,
                },
            ])
        );
        assert_eq!(err("ENV"), InstructionError::NoArguments("ENV"));
    }

    #[test]
    fn run_forms() {
        let Instruction::Run(r) =
            one("RUN --mount=type=cache,target=/c --network=none --security=insecure make")
                .unwrap()
        else {
            panic!()
        };
        assert_eq!(r.command, RunCommand::Shell("make".into()));
        assert_eq!(r.network, Some(NetworkMode::None));
        assert_eq!(r.security, Some(SecurityMode::Insecure));
        assert_eq!(r.mounts.len(), 1);
        assert_eq!(
            one("RUN [\"a\", \"b\"]").unwrap(),
            Instruction::Run(Run {
                command: RunCommand::Exec(vec!["a".into(), "b".into()]),
                mounts: vec![],
                network: None,
                security: None,
                devices: vec![],
            })
        );
        let Instruction::Run(r) =
            one("RUN --device=nvidia.com/gpu=all --device=x,required true").unwrap()
        else {
            panic!()
        };
        assert_eq!(
            r.devices,
            [
                Device {
                    name: "nvidia.com/gpu=all".into(),
                    required: false
                },
                Device {
                    name: "x".into(),
                    required: true
                },
            ]
        );
        assert!(matches!(
            err("RUN --device=,required x"),
            InstructionError::Device(_)
        ));
        assert_eq!(
            err("COPY a <<EOF\nx\nEOF\n"),
            InstructionError::HeredocDestination("COPY")
        );
        assert!(matches!(
            err("RUN --network=bridge x"),
            InstructionError::Network(_)
        ));
        assert!(matches!(
            err("RUN --security=x y"),
            InstructionError::Security(_)
        ));
        assert!(matches!(
            err("RUN --mount=type=nope,target=/x y"),
            InstructionError::Mount(_)
        ));
        let Instruction::Run(r) =
            one("RUN <<EOF\n#!/usr/bin/env python3\nprint(1)\nEOF\n").unwrap()
        else {
            panic!()
        };
        assert_eq!(
            r.command,
            RunCommand::Heredoc {
                name: "EOF".into(),
                content: "#!/usr/bin/env python3\nprint(1)\n".into(),
                shebang: true
            }
        );
        let Instruction::Run(r) = one("RUN cat <<A <<B\na\nA\nb\nB\n").unwrap() else {
            panic!()
        };
        assert_eq!(
            r.command,
            RunCommand::Shell("cat <<A <<B\na\nA\nb\nB".into())
        );
    }

    #[test]
    fn copy_and_add() {
        let Instruction::Copy(c) = one("COPY --from=build --chown=$V:1 --chmod=0644 --link --parents --exclude=*.md --exclude=$V a/$V b/ /dst/").unwrap() else { panic!() };
        assert_eq!(c.from.as_deref(), Some("build"));
        assert_eq!(c.chown.as_deref(), Some("val:1"));
        assert_eq!(c.excludes, ["*.md", "$V"], "--exclude is not expanded");
        assert_eq!(
            err("COPY --from=$V a b"),
            InstructionError::FromExpansion("$V".into())
        );
        assert_eq!(c.chmod, Some(Chmod::Octal(0o644)));
        assert!(c.link && c.parents);
        assert_eq!(
            c.sources,
            [Source::Path("a/val".into()), Source::Path("b/".into())]
        );
        assert_eq!(c.dest, "/dst/");
        let Instruction::Copy(c) =
            one("COPY --chmod=u=rwX,go=rX <<EOF <<'RAW' /x/\n$V \"q\" '$V' \\$V\nEOF\n$V\nRAW\n")
                .unwrap()
        else {
            panic!()
        };
        assert_eq!(c.chmod, Some(Chmod::Symbolic("u=rwX,go=rX".into())));
        assert_eq!(
            c.sources,
            [
                Source::Heredoc {
                    name: "EOF".into(),
                    content: "val \"q\" 'val' $V\n".into()
                },
                Source::Heredoc {
                    name: "RAW".into(),
                    content: "$V\n".into()
                }
            ]
        );
        let Instruction::Add(a) = one(&format!(
            "ADD --checksum=sha256:{} --keep-git-dir --unpack=false https://x/y.tgz /",
            "a".repeat(64)
        ))
        .unwrap() else {
            panic!()
        };
        assert!(a.keep_git_dir);
        assert_eq!(a.unpack, Some(false));
        assert!(matches!(
            err("COPY https://example.com/x /x"),
            InstructionError::CopyUrl(_)
        ));
        assert!(matches!(
            err("COPY git@github.com:a/b.git /x"),
            InstructionError::CopyGit(_)
        ));
        assert!(one("ADD --checksum=0123abc git@github.com:a/b.git#v1 /x").is_ok());
        assert!(matches!(
            err("ADD --checksum=sha512:00 https://x/y /x"),
            InstructionError::Checksum(_)
        ));
        assert!(matches!(
            err("ADD --checksum=md5:x https://x/a b"),
            InstructionError::Checksum(_)
        ));
        assert!(matches!(
            err("COPY --chmod=z+q a b"),
            InstructionError::Chmod(_)
        ));
        assert_eq!(err("COPY a"), InstructionError::NeedsDestination("COPY"));
        assert_eq!(
            err("RUN --mont=type=tmpfs,target=/t true").to_string(),
            "unknown flag: --mont for RUN (did you mean mount?)"
        );
        assert_eq!(
            err("ADD --parents a b"),
            InstructionError::UnknownFlag {
                instruction: "ADD".into(),
                flag: "parents".into(),
                hint: String::new()
            }
        );
    }

    #[test]
    fn small_instructions() {
        assert_eq!(
            one("EXPOSE $P 53/udp 9000-9010/tcp").unwrap(),
            Instruction::Expose(vec![
                Port {
                    start: 8080,
                    end: 8080,
                    protocol: "tcp".into()
                },
                Port {
                    start: 53,
                    end: 53,
                    protocol: "udp".into()
                },
                Port {
                    start: 9000,
                    end: 9010,
                    protocol: "tcp".into()
                },
            ])
        );
        assert!(matches!(err("EXPOSE 80/icmp"), InstructionError::Port(_)));
        assert_eq!(
            one("WORKDIR /a/$V").unwrap(),
            Instruction::Workdir("/a/val".into())
        );
        assert_eq!(one("USER $V:g").unwrap(), Instruction::User("val:g".into()));
        assert_eq!(
            err("STOPSIGNAL SIG$V"),
            InstructionError::Signal("SIGval".into())
        );
        for ok in ["SIGTERM", "term", "9", "SIGRTMIN+3", "SIGWINCH"] {
            assert_eq!(
                one(&format!("STOPSIGNAL {ok}")).unwrap(),
                Instruction::StopSignal(ok.into())
            );
        }
        assert!(matches!(err("STOPSIGNAL 0"), InstructionError::Signal(_)));
        assert_eq!(
            one("STOPSIGNAL 99").unwrap(),
            Instruction::StopSignal("99".into())
        );
        assert_eq!(
            one("MAINTAINER Me <m@e>").unwrap(),
            Instruction::Maintainer("Me <m@e>".into())
        );
        assert_eq!(
            one("VOLUME [\"/a\", \"/$V\"]").unwrap(),
            Instruction::Volume(vec!["/a".into(), "/val".into()])
        );
        assert_eq!(err("VOLUME [\"\"]"), InstructionError::EmptyVolume);
        assert_eq!(
            one("SHELL [\"bash\", \"-c\"]").unwrap(),
            Instruction::Shell(vec!["bash".into(), "-c".into()])
        );
        assert_eq!(err("SHELL bash -c"), InstructionError::ShellNotJson);
        assert_eq!(
            one("CMD echo $V").unwrap(),
            Instruction::Cmd(CommandLine::Shell("echo $V".into()))
        );
        assert_eq!(
            one("ENTRYPOINT [\"x\"]").unwrap(),
            Instruction::Entrypoint(CommandLine::Exec(vec!["x".into()]))
        );
        assert_eq!(
            one("ONBUILD RUN echo $V").unwrap(),
            Instruction::Onbuild(Onbuild {
                expression: "RUN echo $V".into(),
                instruction: "run".into()
            })
        );
    }

    #[test]
    fn healthcheck_forms() {
        assert_eq!(
            one("HEALTHCHECK NONE").unwrap(),
            Instruction::Healthcheck(Healthcheck::None)
        );
        assert_eq!(
            one("HEALTHCHECK --interval=5s --timeout=1m30s --start-period=0s --start-interval=100ms --retries=4 CMD curl -f x").unwrap(),
            Instruction::Healthcheck(Healthcheck::Cmd {
                command: CommandLine::Shell("curl -f x".into()),
                interval: Some(Duration::from_secs(5)),
                timeout: Some(Duration::from_secs(90)),
                start_period: Some(Duration::ZERO),
                start_interval: Some(Duration::from_millis(100)),
                retries: Some(4),
            })
        );
        assert_eq!(
            err("HEALTHCHECK CONNECT TCP 7000"),
            InstructionError::HealthcheckType("CONNECT".into())
        );
        assert_eq!(
            err("HEALTHCHECK NONE x"),
            InstructionError::HealthcheckNoneArgs
        );
        assert_eq!(
            one("HEALTHCHECK --interval=5s NONE").unwrap(),
            Instruction::Healthcheck(Healthcheck::None)
        );
        assert_eq!(
            err("HEALTHCHECK CMD"),
            InstructionError::HealthcheckMissingCmd
        );
        assert_eq!(
            err("HEALTHCHECK"),
            InstructionError::NoArguments("HEALTHCHECK")
        );
        assert!(matches!(
            err("HEALTHCHECK --interval=5 CMD x"),
            InstructionError::Duration { .. }
        ));
        assert!(matches!(
            err("HEALTHCHECK --interval=1us CMD x"),
            InstructionError::DurationTooShort { .. }
        ));
        assert!(matches!(
            err("HEALTHCHECK --retries=-1 CMD x"),
            InstructionError::Retries(_)
        ));
    }
}
