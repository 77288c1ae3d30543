//! BuildKit's Dockerfile build checks (its linter's rules), by the same
//! names, triggers and messages, so `# check=skip=...`, `--check` output
//! and CI scripts that read them work as with buildx.
//!
//! Rules BuildKit runs while parsing look at every stage; the rules it
//! runs while converting a stage look at the stages that are built (every
//! stage under `--check`). The rules that need variables expanded
//! (UndefinedVar, UndefinedArgInFrom) are the planner's
//! ([`super::plan`]); InvalidBaseImagePlatform is the engine's, which
//! knows what a base image was pulled for.

use std::collections::{BTreeMap, BTreeSet};

use super::dockerignore::Matcher;
use super::parser::{Ast, Node};
use super::plan::PlanWarning;
use super::shell::{Env, Lexer};

/// One rule: its name, what it is about, and whether it only runs when
/// named in `# check=experimental=`.
pub struct Rule {
    pub name: &'static str,
    pub description: &'static str,
    pub experimental: bool,
}

const fn rule(name: &'static str, description: &'static str) -> Rule {
    Rule {
        name,
        description,
        experimental: false,
    }
}

/// BuildKit's rules, as its linter's rule set names and describes them.
pub const RULES: &[Rule] = &[
    rule("StageNameCasing", "Stage names should be lowercase"),
    rule("FromAsCasing", "The 'as' keyword should match the case of the 'from' keyword"),
    rule("NoEmptyContinuation", "Empty continuation lines will become errors in a future release"),
    rule("ConsistentInstructionCasing", "All commands within the Dockerfile should use the same casing (either upper or lower)"),
    rule("DuplicateStageName", "Stage names should be unique"),
    rule("ReservedStageName", "Reserved words should not be used as stage names"),
    rule("JSONArgsRecommended", "JSON arguments recommended for ENTRYPOINT/CMD to prevent unintended behavior related to OS signals"),
    rule("MaintainerDeprecated", "The MAINTAINER instruction is deprecated, use a label instead to define an image author"),
    rule("UndefinedArgInFrom", "FROM command must use declared ARGs"),
    rule("WorkdirRelativePath", "Relative workdir without an absolute workdir declared within the build can have unexpected results if the base image changes"),
    rule("UndefinedVar", "Variables should be defined before their use"),
    rule("MultipleInstructionsDisallowed", "Multiple instructions of the same type should not be used in the same stage"),
    rule("LegacyKeyValueFormat", "Legacy key/value format with whitespace separator should not be used"),
    rule("InvalidBaseImagePlatform", "Base image platform does not match expected target platform"),
    rule("RedundantTargetPlatform", "Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this is the default behavior"),
    rule("SecretsUsedInArgOrEnv", "Sensitive data should not be used in the ARG or ENV commands"),
    rule("InvalidDefaultArgInFrom", "Default value for global ARG results in an empty or invalid base image name"),
    rule("FromPlatformFlagConstDisallowed", "FROM --platform flag should not use a constant value"),
    rule("CopyIgnoredFile", "Attempting to Copy file that is excluded by .dockerignore"),
    Rule {
        name: "InvalidDefinitionDescription",
        description: "Comment for build stage or argument should follow the format: `# <arg/stage name> <description>`. If this is not intended to be a description comment, add an empty line or comment between the instruction and the comment.",
        experimental: true,
    },
    rule("ExposeProtoCasing", "Protocol in EXPOSE instruction should be lowercase"),
    rule("ExposeInvalidFormat", "IP address and host-port mapping should not be used in EXPOSE instruction. This will become an error in a future release"),
];

/// The rule named `name`.
pub fn find(name: &str) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.name == name)
}

/// The documentation page of a rule, as BuildKit links it (none for
/// InvalidBaseImagePlatform).
pub fn url(name: &str) -> Option<String> {
    if name == "InvalidBaseImagePlatform" {
        return None;
    }
    let mut kebab = String::new();
    let chars: Vec<char> = name.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            // JSONArgs -> json-args: a capital starts a word when the one
            // before is lower case, or the one after is
            let prev_lower = chars[i - 1].is_ascii_lowercase();
            let next_lower = chars.get(i + 1).is_some_and(char::is_ascii_lowercase);
            if prev_lower || (next_lower && chars[i - 1].is_ascii_uppercase()) {
                kebab.push('-');
            }
        }
        kebab.push(c.to_ascii_lowercase());
    }
    Some(format!(
        "https://docs.docker.com/go/dockerfile/rule/{kebab}/"
    ))
}

/// A finding of `rule` about `node`.
fn finding(rule: &'static str, node: &Node, message: String) -> PlanWarning {
    PlanWarning {
        line: Some(node.start_line),
        end_line: Some(node.end_line),
        rule: Some(rule),
        message,
    }
}

/// The instruction keyword as written (`From`, `COPY`).
fn keyword(node: &Node) -> &str {
    node.original.split_whitespace().next().unwrap_or("")
}

fn self_consistent(s: &str) -> bool {
    s == s.to_lowercase() || s == s.to_uppercase()
}

/// What the rules that need more than the Dockerfile are given.
pub struct Inputs<'a> {
    /// The global ARGs' defaults (InvalidDefaultArgInFrom expands base
    /// names with them only, as if no build arg were given).
    pub global_defaults: &'a BTreeMap<String, String>,
    /// `$TARGETPLATFORM` as the build sets it.
    pub target_platform: &'a str,
    /// The context's .dockerignore (CopyIgnoredFile).
    pub ignore: Option<&'a Matcher>,
}

/// The findings of the rules BuildKit runs while parsing (every stage)
/// and while converting the stages `dispatched` says are built.
pub fn findings(
    ast: &Ast,
    dispatched: &dyn Fn(usize) -> bool,
    inputs: &Inputs<'_>,
) -> Vec<PlanWarning> {
    let Some(first_from) = ast.nodes.iter().position(|n| n.instruction == "from") else {
        return Vec::new();
    };
    let mut stages: Vec<&[Node]> = Vec::new();
    let mut start = first_from;
    for i in first_from + 1..=ast.nodes.len() {
        if i == ast.nodes.len() || ast.nodes[i].instruction == "from" {
            stages.push(&ast.nodes[start..i]);
            start = i;
        }
    }
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    for stage in &stages {
        parse_rules(stage, &mut names, &mut out);
    }
    casing(&stages, &mut out);
    for node in &ast.nodes[..first_from] {
        if node.instruction == "arg" {
            arg_rules(node, &mut out);
        }
    }
    let (inherited, bases) = stage_inherited(&stages);
    for (i, stage) in stages.iter().enumerate() {
        if dispatched(i) {
            let base = bases[i].map(|j| inherited[j]).unwrap_or_default();
            dispatch_rules(stage, base, inherited[i].shell, inputs, &mut out);
        }
    }
    from_rules(&stages, inputs, &mut out);
    out
}

/// FROM's stage name rules, MAINTAINER, and definition comments.
fn parse_rules(stage: &[Node], names: &mut BTreeSet<String>, out: &mut Vec<PlanWarning>) {
    let from = &stage[0];
    if let [_, as_, name] = from.args.as_slice() {
        if name != &name.to_lowercase() {
            out.push(finding(
                "StageNameCasing",
                from,
                format!("Stage name '{name}' should be lowercase"),
            ));
        }
        let kw = keyword(from);
        let matches = if kw == kw.to_lowercase() {
            as_ == &as_.to_lowercase()
        } else if kw == kw.to_uppercase() {
            as_ == &as_.to_uppercase()
        } else {
            true
        };
        if !matches {
            out.push(finding(
                "FromAsCasing",
                from,
                format!("'{as_}' and '{kw}' keywords' casing do not match"),
            ));
        }
        let lower = name.to_lowercase();
        if lower == "context" || lower == "scratch" {
            out.push(finding(
                "ReservedStageName",
                from,
                format!("Stage name should not use the same name as reserved stage \"{lower}\""),
            ));
        }
        if !names.insert(lower.clone()) {
            out.push(finding(
                "DuplicateStageName",
                from,
                format!("Duplicate stage name \"{lower}\", stage names should be unique"),
            ));
        }
        description_rule("FROM", &[lower], from, out);
    }
    for node in stage {
        if node.instruction == "maintainer" {
            out.push(finding(
                "MaintainerDeprecated",
                node,
                "Maintainer instruction is deprecated in favor of using label".into(),
            ));
        }
        if node.instruction == "arg" {
            arg_rules(node, out);
        }
    }
}

/// ARG: its definition comment.
fn arg_rules(node: &Node, out: &mut Vec<PlanWarning>) {
    let keys: Vec<String> = node
        .args
        .iter()
        .map(|a| a.split('=').next().unwrap_or("").to_string())
        .collect();
    description_rule("ARG", &keys, node, out);
}

/// InvalidDefinitionDescription: a comment right above FROM ... AS name
/// or ARG must start with the name it describes.
fn description_rule(instruction: &str, keys: &[String], node: &Node, out: &mut Vec<PlanWarning>) {
    let Some(last) = node.comments.last() else {
        return;
    };
    if keys.is_empty() {
        return;
    }
    let first = last.split(' ').next().unwrap_or("");
    if keys.iter().any(|k| k == first) {
        return;
    }
    let example = if keys.len() > 1 {
        "<arg_key>"
    } else {
        keys[0].as_str()
    };
    out.push(finding(
        "InvalidDefinitionDescription",
        node,
        format!("Comment for {instruction} should follow the format: `# {example} <description>`"),
    ));
}

/// ConsistentInstructionCasing: every keyword of the stages (FROM
/// included, global ARGs not) in one casing, the majority's.
fn casing(stages: &[&[Node]], out: &mut Vec<PlanWarning>) {
    let (mut lower, mut upper) = (0, 0);
    for node in stages.iter().flat_map(|s| s.iter()) {
        let kw = keyword(node);
        if self_consistent(kw) {
            if kw == kw.to_lowercase() {
                lower += 1;
            } else {
                upper += 1;
            }
        }
    }
    let majority_lower = lower > upper;
    for node in stages.iter().flat_map(|s| s.iter()) {
        let kw = keyword(node);
        let want = if majority_lower && kw != kw.to_lowercase() {
            "lowercase"
        } else if !majority_lower && kw != kw.to_uppercase() {
            "uppercase"
        } else {
            continue;
        };
        out.push(finding(
            "ConsistentInstructionCasing",
            node,
            format!("Command '{kw}' should match the case of the command majority ({want})"),
        ));
    }
}

/// What a stage has from its own instructions or a stage it is built
/// FROM: a SHELL (JSONArgsRecommended only asks for JSON without one) and
/// an absolute WORKDIR (WorkdirRelativePath only fires before one).
#[derive(Clone, Copy, Default)]
struct Inherited {
    shell: bool,
    workdir: bool,
}

/// Each stage's, and the stage each is built FROM, if one.
fn stage_inherited(stages: &[&[Node]]) -> (Vec<Inherited>, Vec<Option<usize>>) {
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut out: Vec<Inherited> = Vec::new();
    let mut bases = Vec::new();
    for (i, stage) in stages.iter().enumerate() {
        let from = &stage[0];
        let base_index = from
            .args
            .first()
            .and_then(|b| names.get(&b.to_lowercase()))
            .copied();
        bases.push(base_index);
        let base = base_index.map(|j| out[j]).unwrap_or_default();
        out.push(Inherited {
            shell: base.shell || stage.iter().any(|n| n.instruction == "shell"),
            workdir: base.workdir
                || stage.iter().any(|n| {
                    n.instruction == "workdir" && n.args.first().is_some_and(|p| p.starts_with('/'))
                }),
        });
        if let [_, _, name] = from.args.as_slice() {
            names.insert(name.to_lowercase(), i);
        }
    }
    (out, bases)
}

/// The rules BuildKit runs as it converts a stage's instructions.
fn dispatch_rules(
    stage: &[Node],
    base: Inherited,
    has_shell: bool,
    inputs: &Inputs<'_>,
    out: &mut Vec<PlanWarning>,
) {
    let mut workdir_set = base.workdir;
    let mut used_once: BTreeMap<&str, &Node> = BTreeMap::new();
    for node in &stage[1..] {
        match node.instruction.as_str() {
            "env" | "label" => {
                let kw = if node.instruction == "env" {
                    "ENV"
                } else {
                    "LABEL"
                };
                let legacy = node
                    .args
                    .chunks(3)
                    .any(|t| t.get(2).is_some_and(String::is_empty));
                if legacy {
                    out.push(finding(
                        "LegacyKeyValueFormat",
                        node,
                        format!("\"{kw} key=value\" should be used instead of legacy \"{kw} key value\" format"),
                    ));
                }
                if node.instruction == "env" {
                    for t in node.args.chunks(3) {
                        secret_rule("ENV", &t[0], node, out);
                    }
                }
            }
            "arg" => {
                for a in &node.args {
                    secret_rule("ARG", a.split('=').next().unwrap_or(""), node, out);
                }
            }
            "workdir" => {
                let path = node.args.first().map(String::as_str).unwrap_or("");
                if !workdir_set && !path.starts_with('/') && !path.starts_with('$') {
                    out.push(finding(
                        "WorkdirRelativePath",
                        node,
                        format!("Relative workdir \"{path}\" can have unexpected results if the base image changes"),
                    ));
                }
                workdir_set = true;
            }
            "cmd" | "entrypoint" | "healthcheck" => {
                let kw = node.instruction.to_uppercase();
                if let Some(prev) = used_once.insert(node_kind(node), node) {
                    out.push(finding(
                        "MultipleInstructionsDisallowed",
                        prev,
                        format!("Multiple {kw} instructions should not be used in the same stage because only the last one will be used"),
                    ));
                }
                if node.instruction != "healthcheck" && !node.json && !has_shell {
                    out.push(finding(
                        "JSONArgsRecommended",
                        node,
                        format!("JSON arguments recommended for {kw} to prevent unintended behavior related to OS signals"),
                    ));
                }
            }
            "expose" => expose_rules(node, out),
            "copy" | "add" => ignored_file_rule(node, inputs.ignore, out),
            _ => {}
        }
    }
}

fn node_kind(node: &Node) -> &'static str {
    match node.instruction.as_str() {
        "cmd" => "cmd",
        "entrypoint" => "entrypoint",
        _ => "healthcheck",
    }
}

/// SecretsUsedInArgOrEnv: a key with a word such as `password`, `token`
/// or `secret` (and none of `public`, `file`, `version`).
fn secret_rule(instruction: &str, key: &str, node: &Node, out: &mut Vec<PlanWarning>) {
    const DENY: [&str; 10] = [
        "apikey",
        "auth",
        "credential",
        "credentials",
        "key",
        "password",
        "pword",
        "passwd",
        "secret",
        "token",
    ];
    const ALLOW: [&str; 3] = ["public", "file", "version"];
    let lower = key.to_lowercase();
    let words: Vec<&str> = lower.split('_').collect();
    // BuildKit's pattern: the whole key, or its first or last word
    let hit = |list: &[&str]| {
        list.iter()
            .any(|w| lower == *w || words.first() == Some(w) || words.last() == Some(w))
    };
    if hit(&DENY) && !hit(&ALLOW) {
        out.push(finding(
            "SecretsUsedInArgOrEnv",
            node,
            format!(
                "Do not use ARG or ENV instructions for sensitive data ({instruction} \"{key}\")"
            ),
        ));
    }
}

/// ExposeProtoCasing and ExposeInvalidFormat.
fn expose_rules(node: &Node, out: &mut Vec<PlanWarning>) {
    for raw in &node.args {
        let (addr, container) = match raw.rsplit_once(':') {
            Some((a, c)) => (a, c),
            None => ("", raw.as_str()),
        };
        let proto = container.split_once('/').map(|(_, p)| p).unwrap_or("");
        if proto != proto.to_lowercase() {
            out.push(finding(
                "ExposeProtoCasing",
                node,
                format!("Defined protocol '{raw}' in EXPOSE instruction should be lowercase"),
            ));
        }
        if !addr.is_empty() {
            out.push(finding(
                "ExposeInvalidFormat",
                node,
                format!("EXPOSE instruction should not define an IP address or host-port mapping, found '{raw}'"),
            ));
        }
    }
}

/// CopyIgnoredFile: a COPY or ADD source from the context that the
/// .dockerignore excludes (not checked when it has `!` exceptions).
fn ignored_file_rule(node: &Node, ignore: Option<&Matcher>, out: &mut Vec<PlanWarning>) {
    let Some(ignore) = ignore else {
        return;
    };
    let patterns = ignore.patterns();
    if patterns.is_empty() || patterns.iter().any(|p| p.starts_with('!')) {
        return;
    }
    if node.flags.iter().any(|f| f.starts_with("--from")) {
        return;
    }
    let cmd = if node.instruction == "add" {
        "Add"
    } else {
        "Copy"
    };
    let n = node.args.len();
    if n < 2 || !node.heredocs.is_empty() {
        return;
    }
    for src in &node.args[..n - 1] {
        if super::instructions::is_remote(src) {
            continue;
        }
        let clean = super::clean_path(src);
        let clean = clean.trim_start_matches('/');
        let clean = if clean.is_empty() { "." } else { clean };
        let hit = if clean == "." {
            // the context root is only reported when a pattern takes
            // every entry of it
            patterns
                .iter()
                .any(|p| matches!(p.as_str(), "*" | "**" | "**/*"))
        } else {
            ignore.matches(clean)
        };
        if hit {
            out.push(finding(
                "CopyIgnoredFile",
                node,
                format!("Attempting to {cmd} file \"{clean}\" that is excluded by .dockerignore"),
            ));
        }
    }
}

/// Variables for expanding FROM with global ARG defaults only.
struct Defaults<'a>(&'a BTreeMap<String, String>);

impl Env for Defaults<'_> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

/// The FROM rules that expand words: RedundantTargetPlatform,
/// FromPlatformFlagConstDisallowed and InvalidDefaultArgInFrom.
fn from_rules(stages: &[&[Node]], inputs: &Inputs<'_>, out: &mut Vec<PlanWarning>) {
    let lex = Lexer::new('\\');
    let mut env = inputs.global_defaults.clone();
    env.insert("TARGETPLATFORM".into(), inputs.target_platform.into());
    let mut names = BTreeSet::new();
    for stage in stages {
        let from = &stage[0];
        let stage_name = match from.args.as_slice() {
            [_, _, n] => n.to_lowercase(),
            _ => String::new(),
        };
        if let Some(p) = from
            .flags
            .iter()
            .find_map(|f| f.strip_prefix("--platform="))
        {
            if let Ok(x) = lex.process(p, &Defaults(&env)) {
                let only_target = x.matched.len() == 1
                    && x.matched.contains("TARGETPLATFORM")
                    && x.unmatched.is_empty();
                if only_target && x.word == inputs.target_platform {
                    out.push(finding(
                        "RedundantTargetPlatform",
                        from,
                        format!("Setting platform to predefined {p} in FROM is redundant as this is the default behavior"),
                    ));
                }
                if x.matched.is_empty() && x.unmatched.is_empty() {
                    let mut parts = x.word.split('/');
                    let (os, arch) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                    let named_for = (!os.is_empty() && stage_name.contains(os))
                        || (!arch.is_empty() && stage_name.contains(arch));
                    if !os.is_empty() && !arch.is_empty() && !named_for {
                        out.push(finding(
                            "FromPlatformFlagConstDisallowed",
                            from,
                            format!(
                                "FROM --platform flag should not use constant value \"{}\"",
                                x.word
                            ),
                        ));
                    }
                }
            }
        }
        if let Some(base) = from.args.first() {
            let lower = base.to_lowercase();
            let is_stage = names.contains(&lower) || lower == "scratch";
            if !is_stage && base.contains('$') {
                if let Ok(word) = lex.process_word(base, &Defaults(inputs.global_defaults)) {
                    if !crate::image::reference::is_valid(&word) {
                        out.push(finding(
                            "InvalidDefaultArgInFrom",
                            from,
                            format!("Default value for ARG {base} results in empty or invalid base image name"),
                        ));
                    }
                }
            }
        }
        if !stage_name.is_empty() {
            names.insert(stage_name);
        }
    }
}

/// BuildKit's suggestion for a misspelled name: the option at the
/// smallest edit distance below 3 (None on an exact match).
pub fn suggest(val: &str, options: &[&str]) -> Option<String> {
    // bounded work for a hostile Dockerfile: no suggestion among more
    // names than any real one has
    if options.len() > 1000 {
        return None;
    }
    let mut best = None;
    let mut min = 3;
    for o in options {
        if *o == val {
            return None;
        }
        let d = levenshtein(val, o);
        if d < min {
            min = d;
            best = Some(o.to_string());
        }
    }
    best
}

fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lint(text: &str) -> Vec<(String, usize, String)> {
        let ast = crate::frontend::parse(text.as_bytes(), "Dockerfile").unwrap();
        let defaults = BTreeMap::new();
        let inputs = Inputs {
            global_defaults: &defaults,
            target_platform: "linux/amd64",
            ignore: None,
        };
        findings(&ast, &|_| true, &inputs)
            .into_iter()
            .map(|w| (w.rule.unwrap().to_string(), w.line.unwrap(), w.message))
            .collect()
    }

    #[test]
    fn urls_are_the_rules_pages() {
        assert_eq!(
            url("JSONArgsRecommended").unwrap(),
            "https://docs.docker.com/go/dockerfile/rule/json-args-recommended/"
        );
        assert_eq!(
            url("FromAsCasing").unwrap(),
            "https://docs.docker.com/go/dockerfile/rule/from-as-casing/"
        );
        assert!(url("InvalidBaseImagePlatform").is_none());
    }

    #[test]
    fn casing_rules_fire_as_buildkit_words_them() {
        let f = lint("FROM scratch as Builder\nCOPY a b\n");
        assert!(
            f.contains(&(
                "StageNameCasing".into(),
                1,
                "Stage name 'Builder' should be lowercase".into()
            )),
            "{f:?}"
        );
        assert!(
            f.contains(&(
                "FromAsCasing".into(),
                1,
                "'as' and 'FROM' keywords' casing do not match".into()
            )),
            "{f:?}"
        );
        let f = lint("FROM scratch\ncopy a b\nCOPY c d\nCMD [\"x\"]\n");
        assert_eq!(
            f,
            vec![(
                "ConsistentInstructionCasing".into(),
                2,
                "Command 'copy' should match the case of the command majority (uppercase)".into()
            )]
        );
    }

    #[test]
    fn dispatch_rules_fire_as_buildkit_words_them() {
        let f = lint("FROM scratch\nENV a b\nWORKDIR app\nCMD echo\nCMD [\"x\"]\nARG API_TOKEN\nEXPOSE 127.0.0.1:80:80/TCP\n");
        let rules: Vec<&str> = f.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(
            rules,
            [
                "LegacyKeyValueFormat",
                "WorkdirRelativePath",
                "JSONArgsRecommended",
                "MultipleInstructionsDisallowed",
                "SecretsUsedInArgOrEnv",
                "ExposeProtoCasing",
                "ExposeInvalidFormat"
            ]
        );
        assert_eq!(
            suggest("BUIDPLATFORM", &["BUILDPLATFORM", "TARGETOS"]).as_deref(),
            Some("BUILDPLATFORM")
        );
    }
}
