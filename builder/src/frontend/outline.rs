//! What buildx's `--call outline`, `--call targets` and
//! `--call subrequests.describe` print: the parameters a build target
//! takes (the build args it uses, with their values and documentation,
//! and the secrets and SSH agents it mounts), the stages a Dockerfile
//! defines, and the list of these requests. The JSON has BuildKit's
//! shape (`result.json` of the frontend's subrequests) and the text is
//! its tables, so scripts written against buildx read kiln's output.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use base64::Engine;
use serde::Serialize;

use super::instructions::{self, Expander, Instruction};
use super::mount_flags::Mount;
use super::parser::{Ast, Node};
use super::plan::{Base, Plan, Stage};

/// A source range, as BuildKit's `pb.Location` marshals: lines only
/// (columns are 0 and omitted).
#[derive(Debug, Clone, Serialize)]
pub struct Location {
    ranges: Vec<Range>,
}

#[derive(Debug, Clone, Serialize)]
struct Range {
    start: Position,
    end: Position,
}

#[derive(Debug, Clone, Serialize)]
struct Position {
    line: usize,
}

impl Location {
    fn of(node: &Node) -> Location {
        Location {
            ranges: vec![Range {
                start: Position {
                    line: node.start_line,
                },
                end: Position {
                    line: node.end_line,
                },
            }],
        }
    }

    fn line(&self) -> usize {
        self.ranges.first().map_or(0, |r| r.start.line)
    }
}

/// `--call outline`: what the target needs from the caller.
#[derive(Debug, Serialize)]
pub struct Outline {
    #[serde(skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    description: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    args: Vec<OutlineArg>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    secrets: Vec<Needed>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ssh: Vec<Needed>,
    #[serde(serialize_with = "base64_sources")]
    sources: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, Serialize)]
struct OutlineArg {
    name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    description: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    value: String,
    location: Location,
}

/// A secret or SSH agent a step mounts.
#[derive(Debug, Clone, Serialize)]
struct Needed {
    name: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    required: bool,
    location: Location,
}

/// `--call targets`: every stage.
#[derive(Debug, Serialize)]
pub struct Targets {
    targets: Vec<Target>,
    #[serde(serialize_with = "base64_sources")]
    sources: Vec<Vec<u8>>,
}

#[derive(Debug, Serialize)]
struct Target {
    #[serde(skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    default: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    description: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    base: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    platform: String,
    location: Location,
}

fn base64_sources<S: serde::Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
    let e = base64::engine::general_purpose::STANDARD;
    s.collect_seq(v.iter().map(|b| e.encode(b)))
}

/// The text after `NAME ` in the first comment above a definition that
/// starts so (BuildKit's doc comments: `# NAME does this`).
fn doc_comment(node: &Node, name: &str) -> String {
    if name.is_empty() {
        return String::new();
    }
    let prefix = format!("{name} ");
    node.comments
        .iter()
        .find_map(|c| c.strip_prefix(&prefix).map(str::to_string))
        .unwrap_or_default()
}

fn from_nodes(ast: &Ast) -> Vec<&Node> {
    ast.nodes
        .iter()
        .filter(|n| n.instruction == "from")
        .collect()
}

/// A stage name from FROM's arguments (`IMAGE AS NAME`).
fn stage_name(node: &Node) -> String {
    match node.args.as_slice() {
        [_, kw, name] if kw.eq_ignore_ascii_case("as") => name.clone(),
        _ => String::new(),
    }
}

/// `--call targets` of `ast`, whose bytes are `source`: each stage as
/// written (base and platform unexpanded), the last one the default.
pub fn targets(ast: &Ast, source: &[u8]) -> Targets {
    let froms = from_nodes(ast);
    let last = froms.len().saturating_sub(1);
    let targets = froms
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let name = stage_name(n);
            Target {
                description: doc_comment(n, &name),
                name,
                default: i == last,
                base: n.args.first().cloned().unwrap_or_default(),
                platform: n
                    .flags
                    .iter()
                    .find_map(|f| f.strip_prefix("--platform="))
                    .unwrap_or("")
                    .to_string(),
                location: Location::of(n),
            }
        })
        .collect();
    Targets {
        targets,
        sources: vec![source.to_vec()],
    }
}

/// A global ARG as BuildKit's outline knows it: its value, where it was
/// (last) declared and the global ARGs its default used.
struct GlobalArg {
    value: String,
    /// false for `ARG NAME` without a default or build arg
    set: bool,
    node: usize,
    key: String,
    deps: BTreeSet<String>,
}

/// The global ARGs (before the first FROM), by name; `build_args` given
/// on the command line win over defaults.
fn global_args(ast: &Ast, build_args: &BTreeMap<String, String>) -> BTreeMap<String, GlobalArg> {
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    let mut infos: BTreeMap<String, GlobalArg> = BTreeMap::new();
    for (i, node) in ast.nodes.iter().enumerate() {
        if node.instruction == "from" {
            break;
        }
        let empty = BTreeMap::new();
        let mut ex = Expander::new(ast.escape, &empty);
        let Ok(Instruction::Arg(decls)) = instructions::check(node, &mut ex) else {
            continue;
        };
        for d in decls {
            let mut deps = BTreeSet::new();
            let value = match (build_args.get(&d.key), &d.default) {
                (Some(v), _) => Some(v.clone()),
                (None, Some(raw)) => {
                    let mut ex = Expander::new(ast.escape, &values);
                    let v = ex.word(raw).unwrap_or_default();
                    deps = ex.matched;
                    // a redefinition using itself keeps what it used
                    if deps.remove(&d.key) {
                        if let Some(old) = infos.get(&d.key) {
                            deps.extend(old.deps.iter().cloned());
                        }
                    }
                    Some(v)
                }
                (None, None) => None,
            };
            if let Some(v) = &value {
                values.insert(d.key.clone(), v.clone());
            }
            infos.insert(
                d.key.clone(),
                GlobalArg {
                    set: value.is_some(),
                    value: value.unwrap_or_default(),
                    node: i,
                    key: d.key,
                    deps,
                },
            );
        }
    }
    infos
}

/// The values of the global ARGs that have one (build args win over
/// defaults).
pub(crate) fn global_values(
    ast: &Ast,
    build_args: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    global_args(ast, build_args)
        .into_iter()
        .filter(|(_, g)| g.set)
        .map(|(k, g)| (k, g.value))
        .collect()
}

/// The stages of `plan` in BuildKit's outline order: the target, then
/// its base stages, then the stages it copies or mounts from.
fn outline_order(plan: &Plan) -> Vec<&Stage> {
    let by_index: BTreeMap<usize, &Stage> = plan.stages.iter().map(|s| (s.index, s)).collect();
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    let mut stack = vec![plan.target];
    while let Some(i) = stack.pop() {
        let Some(s) = by_index.get(&i).filter(|_| seen.insert(i)) else {
            continue;
        };
        out.push(*s);
        // pushed in reverse so the base comes out first
        for d in s.deps.iter().rev() {
            stack.push(*d);
        }
        if let Base::Stage { index } = s.base {
            stack.push(index);
        }
    }
    out
}

/// The secrets and SSH agents the stages mount, each name once.
#[derive(Default)]
struct Needs {
    secrets: Vec<Needed>,
    ssh: Vec<Needed>,
    secret_seen: BTreeSet<String>,
    ssh_seen: BTreeSet<String>,
}

/// Scan a stage's steps: its own ARG definitions (the last declaration
/// of a name winning) are returned, every ARG name is added to `used`,
/// and the secrets and agents its RUNs mount go to `needs`.
fn stage_steps(
    ast: &Ast,
    stage: &Stage,
    build_args: &BTreeMap<String, String>,
    used: &mut BTreeSet<String>,
    needs: &mut Needs,
) -> BTreeMap<String, OutlineArg> {
    // the stage's own ARGs, the last declaration of a name winning
    let mut own: BTreeMap<String, OutlineArg> = BTreeMap::new();
    for step in stage.steps.iter().filter(|s| !s.trigger) {
        let node = ast.nodes.iter().find(|n| n.start_line == step.line);
        let location = node.map(Location::of);
        match &step.instruction {
            Instruction::Arg(decls) => {
                for d in decls {
                    used.insert(d.key.clone());
                    // `ARG NAME` taking a global or automatic arg's
                    // value is that arg, not a definition
                    let inherited = d.default.is_none()
                        && !build_args.contains_key(&d.key)
                        && d.value.is_some();
                    if inherited {
                        continue;
                    }
                    own.insert(
                        d.key.clone(),
                        OutlineArg {
                            name: d.key.clone(),
                            description: node.map(|n| doc_comment(n, &d.key)).unwrap_or_default(),
                            value: d.value.clone().unwrap_or_default(),
                            location: location.clone().unwrap_or(Location { ranges: vec![] }),
                        },
                    );
                }
            }
            Instruction::Run(r) => {
                let Some(location) = location else { continue };
                for m in &r.mounts {
                    let (list, seen, name, required) = match m {
                        Mount::Secret { id, required, .. } => {
                            (&mut needs.secrets, &mut needs.secret_seen, id, *required)
                        }
                        Mount::Ssh { id, required, .. } => {
                            (&mut needs.ssh, &mut needs.ssh_seen, id, *required)
                        }
                        _ => continue,
                    };
                    if seen.insert(name.clone()) {
                        list.push(Needed {
                            name: name.clone(),
                            required,
                            location: location.clone(),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    own
}

/// `--call outline` of the target of `plan` (made from `ast` with
/// `build_args`), whose Dockerfile bytes are `source`.
pub fn outline(
    ast: &Ast,
    plan: &Plan,
    build_args: &BTreeMap<String, String>,
    source: &[u8],
) -> Outline {
    let globals = global_args(ast, build_args);
    let global_values = global_values(ast, build_args);
    let froms = from_nodes(ast);
    let mut args = Vec::new();
    let mut needs = Needs::default();
    let mut arg_seen = BTreeSet::new();
    for stage in outline_order(plan) {
        let Some(from) = froms.get(stage.index) else {
            continue;
        };
        // the global ARGs FROM used
        let mut used = BTreeSet::new();
        let mut ex = Expander::new(ast.escape, &global_values);
        if instructions::check(from, &mut ex).is_ok() {
            used.extend(ex.matched);
        }
        let mut own = stage_steps(ast, stage, build_args, &mut used, &mut needs);
        // what the used global ARGs used, transitively
        let mut stack: Vec<String> = used.iter().cloned().collect();
        while let Some(k) = stack.pop() {
            if own.contains_key(&k) {
                continue;
            }
            if let Some(g) = globals.get(&k) {
                for d in &g.deps {
                    if used.insert(d.clone()) {
                        stack.push(d.clone());
                    }
                }
            }
        }
        for k in used {
            if !arg_seen.insert(k.clone()) {
                continue;
            }
            if let Some(a) = own.remove(&k) {
                args.push(a);
            } else if let Some(g) = globals.get(&k) {
                let node = &ast.nodes[g.node];
                args.push(OutlineArg {
                    name: g.key.clone(),
                    description: doc_comment(node, &g.key),
                    value: g.value.clone(),
                    location: Location::of(node),
                });
            } else {
                arg_seen.remove(&k);
            }
        }
    }
    args.sort_by_key(|a| a.location.line());
    let Needs {
        mut secrets,
        mut ssh,
        ..
    } = needs;
    secrets.sort_by_key(|a| a.location.line());
    ssh.sort_by_key(|a| a.location.line());
    let target = froms.get(plan.target);
    let name = target.map(|n| stage_name(n)).unwrap_or_default();
    Outline {
        description: target.map(|n| doc_comment(n, &name)).unwrap_or_default(),
        name,
        args,
        secrets,
        ssh,
        sources: vec![source.to_vec()],
    }
}

/// Rows as Go's tabwriter aligns them (flags 0): every cell but the last
/// of a row padded to its column's widest cell plus `padding`.
fn table(rows: &[Vec<String>], padding: usize) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate().take(r.len().saturating_sub(1)) {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i + 1 < r.len() {
                let _ = write!(out, "{c:<w$}", w = widths[i] + padding);
            } else {
                out.push_str(c);
            }
        }
        out.push('\n');
    }
    out
}

impl Outline {
    /// The text buildx prints for `--call outline`.
    pub fn text(&self) -> String {
        let mut out = String::new();
        if !self.name.is_empty() || !self.description.is_empty() {
            let name = if self.name.is_empty() {
                "(default)"
            } else {
                &self.name
            };
            let mut rows = vec![vec!["TARGET:".to_string(), name.to_string()]];
            if !self.description.is_empty() {
                rows.push(vec!["DESCRIPTION:".into(), self.description.clone()]);
            }
            out.push_str(&table(&rows, 1));
            out.push('\n');
        }
        if !self.args.is_empty() {
            let mut rows = vec![vec![
                "BUILD ARG".to_string(),
                "VALUE".into(),
                "DESCRIPTION".into(),
            ]];
            rows.extend(
                self.args
                    .iter()
                    .map(|a| vec![a.name.clone(), a.value.clone(), a.description.clone()]),
            );
            out.push_str(&table(&rows, 3));
            out.push('\n');
        }
        for (title, list) in [("SECRET", &self.secrets), ("SSH", &self.ssh)] {
            if list.is_empty() {
                continue;
            }
            let mut rows = vec![vec![title.to_string(), "REQUIRED".into()]];
            rows.extend(list.iter().map(|s| {
                let r = if s.required { "true" } else { "" };
                vec![s.name.clone(), r.to_string()]
            }));
            out.push_str(&table(&rows, 3));
            out.push('\n');
        }
        out
    }
}

impl Targets {
    /// The text buildx prints for `--call targets`.
    pub fn text(&self) -> String {
        let mut rows = vec![vec!["TARGET".to_string(), "DESCRIPTION".into()]];
        for t in &self.targets {
            let name = match (t.name.is_empty(), t.default) {
                (true, true) => "(default)".to_string(),
                (false, true) => format!("{} (default)", t.name),
                _ => t.name.clone(),
            };
            rows.push(vec![name, t.description.clone()]);
        }
        table(&rows, 1)
    }
}

/// One request `--call` can make, as BuildKit's frontends describe them.
#[derive(Debug, Serialize)]
pub struct Request {
    name: &'static str,
    version: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    description: &'static str,
    opts: Option<Vec<Named>>,
    inputs: Option<Vec<Named>>,
    metadata: Option<Vec<Named>>,
    refs: Option<Vec<Named>>,
}

#[derive(Debug, Serialize)]
struct Named {
    name: &'static str,
    description: &'static str,
}

fn results() -> Option<Vec<Named>> {
    Some(vec![
        Named {
            name: "result.json",
            description: "",
        },
        Named {
            name: "result.txt",
            description: "",
        },
    ])
}

/// `--call subrequests.describe`: the requests kiln answers besides a
/// build (`check` too, which BuildKit's Dockerfile frontend does not list).
pub fn describe() -> Vec<Request> {
    vec![
        Request {
            name: "frontend.outline",
            version: "1.0.0",
            kind: "rpc",
            description: "List all parameters current build target supports",
            opts: Some(vec![Named {
                name: "target",
                description: "Target build stage",
            }]),
            inputs: None,
            metadata: results(),
            refs: None,
        },
        Request {
            name: "frontend.targets",
            version: "1.0.0",
            kind: "rpc",
            description: "List all targets current build supports",
            opts: Some(Vec::new()),
            inputs: None,
            metadata: results(),
            refs: None,
        },
        Request {
            name: "frontend.subrequests.describe",
            version: "1.0.0",
            kind: "rpc",
            description: "List available subrequest types",
            opts: None,
            inputs: None,
            metadata: results(),
            refs: None,
        },
    ]
}

/// The text buildx prints for `--call subrequests.describe`.
pub fn describe_text(reqs: &[Request]) -> String {
    let mut rows = vec![vec![
        "NAME".to_string(),
        "VERSION".into(),
        "DESCRIPTION".into(),
    ]];
    for r in reqs {
        rows.push(vec![
            r.name.trim_start_matches("frontend.").to_string(),
            r.version.to_string(),
            r.description.to_string(),
        ]);
    }
    table(&rows, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::{parse, plan, PlanOptions};

    fn outline_of(src: &str, opts: &PlanOptions) -> Outline {
        let ast = parse(src.as_bytes(), "Dockerfile").unwrap();
        let p = plan(&ast, opts).unwrap();
        outline(&ast, &p, &opts.build_args, src.as_bytes())
    }

    #[test]
    fn used_global_args_follow_their_dependencies() {
        let src = "ARG A=1\nARG B=${A}2\nARG C=3\nFROM scratch${B}\nARG D=4\n";
        let o = outline_of(src, &PlanOptions::default());
        let names: Vec<(&str, &str)> = o
            .args
            .iter()
            .map(|a| (a.name.as_str(), a.value.as_str()))
            .collect();
        assert_eq!(names, [("A", "1"), ("B", "12"), ("D", "4")]);
    }

    #[test]
    fn doc_comments_name_the_definition() {
        let src =
            "# base is the start\nFROM scratch AS base\n# X is a thing\n# Y is not\nARG X=1\n";
        let o = outline_of(src, &PlanOptions::default());
        assert_eq!(o.description, "is the start");
        assert_eq!(o.args[0].description, "is a thing");
        assert!(o
            .text()
            .starts_with("TARGET:      base\nDESCRIPTION: is the start\n\n"));
    }

    #[test]
    fn tables_pad_all_but_the_last_column() {
        let rows = vec![
            vec!["AB".to_string(), "C".into(), "".into()],
            vec!["A".into(), "CDE".into(), "x".into()],
        ];
        assert_eq!(table(&rows, 3), "AB   C     \nA    CDE   x\n");
    }
}
