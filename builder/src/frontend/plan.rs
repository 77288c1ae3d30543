//! The planner: from a parsed Dockerfile and build options to the stages a
//! build needs, in dependency order, with checked and expanded instructions.
//!
//! It owns ARG/ENV scoping (global ARGs before the first FROM, redeclaration
//! inside a stage, inheritance by child stages, build-arg overrides, the
//! automatic platform and proxy args), the stage graph (FROM of an earlier
//! stage, `COPY --from`, `RUN --mount from=`, ONBUILD triggers of a parent
//! stage), `--target` pruning and the checks on it (unknown stage, cycle,
//! duplicate name, missing FROM, an image name outside the reference
//! grammar of [`crate::image::reference::is_valid`]). It never pulls an
//! image: when a stage's base image configuration matters for expansion,
//! the caller passes it in [`PlanOptions::image_env`] /
//! [`PlanOptions::image_workdir`], and steps that referenced variables the
//! plan could not see list them in [`Step::unresolved`] (re-plan once the
//! base images are resolved).
//!
//! Where kiln differs from BuildKit on purpose: a duplicate stage name is an
//! error (BuildKit only warns and binds the last one), and an unused
//! `--build-arg` is reported as a warning (BuildKit says nothing).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::clean_path;
use super::instructions::{self, check, Expander, Instruction};
use super::location::Location;
use super::mount_flags::Mount;
use super::parser::{Ast, Node};
use super::platform::{Platform, PlatformError};
use super::shell::Env;
use super::{Error, ErrorKind};
use crate::image::reference;

/// Why a plan could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No FROM at all.
    #[error(
        "the Dockerfile has no FROM instruction; add `FROM image` before the first build step"
    )]
    NoFrom,
    /// An instruction other than ARG before the first FROM.
    #[error("{0} is not allowed before the first FROM; only ARG may come before it")]
    BeforeFrom(String),
    /// `--target` names no stage.
    #[error("target stage {target:?} could not be found{hint}; stages are: {available}")]
    UnknownTarget {
        target: String,
        available: String,
        /// ` (did you mean x?)` for a near miss, else empty.
        hint: String,
    },
    /// Stages that need each other.
    #[error("circular dependency detected between stages: {0}")]
    Cycle(String),
    /// `--from=N` pointing at this stage or a later one.
    #[error("--from={0} refers to the current or a later stage by index; only earlier stages can be used by index")]
    LaterStageIndex(String),
    /// `COPY --from=x` naming a stage defined further down.
    #[error(
        "cannot copy from stage {from:?}, it needs to be defined before current stage {current:?}"
    )]
    LaterStage { from: String, current: String },
    /// `--from=x` naming the stage itself.
    #[error("stage {0:?} cannot use itself in --from or --mount from=")]
    SelfReference(String),
    /// Neither a stage, a named context nor a valid image reference.
    #[error("{0:?} is not a build stage, a named context or a valid image reference; check the spelling (image names are lower-case)")]
    InvalidReference(String),
    /// `# check=error=true` and a lint rule fired.
    #[error("lint violation found for rules: {0}")]
    LintViolation(String),
    /// A base image's ONBUILD trigger that does not parse.
    #[error("an ONBUILD trigger of the base image: {0}")]
    Trigger(String),
    /// A BUILDKIT_DOCKERFILE_CHECK build arg that does not parse.
    #[error("--build-arg BUILDKIT_DOCKERFILE_CHECK: invalid option {0:?}; use skip=RULE,...;error=true|false;experimental=RULE,...")]
    CheckArg(String),
    /// A FROM --platform or option platform that does not parse.
    #[error(transparent)]
    Platform(#[from] PlatformError),
}

/// Options for [`plan`].
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// `--build-arg K=V`.
    pub build_args: BTreeMap<String, String>,
    /// `--target`; the last stage when None.
    pub target: Option<String>,
    /// `--platform`; the build platform when None.
    pub target_platform: Option<Platform>,
    /// Where the build runs (BUILDPLATFORM).
    pub build_platform: Platform,
    /// `--build-context name=source`.
    pub named_contexts: BTreeMap<String, String>,
    /// Config environment of base images, by reference as written in FROM.
    pub image_env: BTreeMap<String, Vec<(String, String)>>,
    /// Config working directory of base images, by reference as written in
    /// FROM (an image listed in `image_env` but not here starts in `/`).
    pub image_workdir: BTreeMap<String, String>,
    /// ONBUILD triggers of base images, by reference as written in FROM
    /// (an image named by `--build-context`: by its source): planned as
    /// the first steps of the stages built on them.
    pub image_onbuild: BTreeMap<String, Vec<String>>,
    /// Report the lint findings of every stage, not only of those built
    /// (`--check`).
    pub lint_all: bool,
    /// The context's .dockerignore (the CopyIgnoredFile rule).
    pub ignore: Option<crate::frontend::dockerignore::Matcher>,
    /// Base images whose platform is not the one asked for: (reference,
    /// platform asked for) -> the image's (InvalidBaseImagePlatform).
    pub base_platforms: BTreeMap<(String, String), String>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            build_args: BTreeMap::new(),
            target: None,
            target_platform: None,
            build_platform: Platform::host(),
            named_contexts: BTreeMap::new(),
            image_env: BTreeMap::new(),
            image_workdir: BTreeMap::new(),
            image_onbuild: BTreeMap::new(),
            lint_all: false,
            ignore: None,
            base_platforms: BTreeMap::new(),
        }
    }
}

/// What a stage starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Base {
    /// `FROM scratch`.
    Scratch,
    /// A registry image.
    Image {
        /// The reference as written (expanded).
        reference: String,
    },
    /// An earlier stage.
    Stage {
        /// Its index in the Dockerfile.
        index: usize,
    },
    /// A `--build-context` given on the command line.
    Context {
        /// The context's name.
        name: String,
        /// Where it comes from (directory, image, URL).
        source: String,
    },
}

/// What a `--from` / `from=` reference resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceRef {
    /// Another stage.
    Stage {
        /// Its index.
        index: usize,
    },
    /// A named build context.
    Context {
        /// Name.
        name: String,
        /// Source.
        source: String,
    },
    /// An image reference.
    Image {
        /// Reference.
        reference: String,
    },
}

/// One instruction of a stage, ready for the build engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// First line in the Dockerfile (for an ONBUILD trigger, the line of
    /// the ONBUILD in the parent stage).
    pub line: usize,
    /// Last line (heredocs included).
    pub end_line: usize,
    /// The instruction as written (continuations joined).
    pub original: String,
    /// The checked instruction, expanded where BuildKit expands it.
    pub instruction: Instruction,
    /// What `COPY --from` or each `RUN --mount from=` refers to, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceRef>,
    /// The working directory the step runs in, when the plan can know it
    /// (from WORKDIR in this stage or its parents, or the base image's
    /// config in [`PlanOptions::image_workdir`]). Relative RUN mount targets
    /// are already joined to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// For RUN: the ARGs in scope, passed to the command as environment.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<(String, String)>,
    /// Variables this step referenced that are neither ARG nor ENV in the
    /// Dockerfile; they may come from the base image's environment, which
    /// was not given in [`PlanOptions::image_env`]. Re-plan with it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unresolved: Vec<String>,
    /// This step is an ONBUILD trigger of the parent stage, run before the
    /// stage's own instructions.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub trigger: bool,
}

/// A build stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stage {
    /// Position among the Dockerfile's stages (0-based).
    pub index: usize,
    /// `AS name`, lower-cased.
    pub name: Option<String>,
    /// Line of its FROM.
    pub line: usize,
    /// What it starts from.
    pub base: Base,
    /// The platform it builds for.
    pub platform: Platform,
    /// Indexes of the stages it needs, ascending.
    pub deps: Vec<usize>,
    /// Its instructions after FROM.
    pub steps: Vec<Step>,
}

/// A non-fatal finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanWarning {
    /// Line it concerns, when it concerns one.
    pub line: Option<usize>,
    /// The last line of the instruction it concerns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_line: Option<usize>,
    /// BuildKit's lint rule name (`UndefinedVar`, ...), which
    /// `# check=skip=...` and `# check=error=true` refer to; None for
    /// kiln's own notices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<&'static str>,
    /// What and what to do.
    pub message: String,
}

/// The resolved build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// `# syntax=` if given.
    pub syntax: Option<String>,
    /// The escape character (`# escape=`).
    pub escape: char,
    /// Where the build runs.
    pub build_platform: Platform,
    /// What it builds for.
    pub target_platform: Platform,
    /// Index of the target stage.
    pub target: usize,
    /// The needed stages, every stage after the stages it depends on.
    pub stages: Vec<Stage>,
    /// Proxy build args: given to RUN steps, kept out of history and cache keys.
    pub proxy_args: BTreeMap<String, String>,
    /// Warnings: parser findings, unused build args, and undefined variables
    /// in the stages that are built.
    pub warnings: Vec<PlanWarning>,
    /// `# check=error=true` and these rules fired: the build fails after
    /// their warnings are shown ([`Plan::lint_error`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lint_violation: Option<LintViolation>,
}

/// The rules that fired under `# check=error=true`, and the line of the
/// first finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LintViolation {
    pub rules: String,
    pub line: Option<usize>,
}

impl Plan {
    /// The error a `# check=error=true` violation is.
    pub fn lint_error(&self, ast: &Ast) -> Option<Error> {
        let v = self.lint_violation.as_ref()?;
        Some(Error {
            location: v.line.map(|l| Box::new(ast.source.find(l, ""))),
            kind: PlanError::LintViolation(v.rules.clone()).into(),
        })
    }

    /// The stage with Dockerfile index `index`, if it is part of the plan.
    pub fn stage(&self, index: usize) -> Option<&Stage> {
        self.stages.iter().find(|s| s.index == index)
    }
}

/// The PATH BuildKit gives stages whose base image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const PROXY_ARGS: [&str; 10] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Proxy args are recognised in any letter case.
fn is_proxy_arg(k: &str) -> bool {
    PROXY_ARGS.iter().any(|p| p.eq_ignore_ascii_case(k))
}

/// Variables for expansion: the first map that has a name wins. Layering
/// instead of merging keeps planning linear in the number of instructions.
struct Scope<'a>([&'a BTreeMap<String, String>; 2]);

impl Env for Scope<'_> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.0.iter().find_map(|m| m.get(name).map(String::as_str))
    }
}

struct StageDraft {
    name: Option<String>,
    line: usize,
    base: Base,
    platform: Platform,
    deps: BTreeSet<usize>,
    steps: Vec<Step>,
    triggers: Vec<Node>,
    env: BTreeMap<String, String>,
    env_complete: bool,
    workdir: Option<String>,
    args: BTreeMap<String, String>,
    /// the ARGs' names in the order they were first declared
    arg_order: Vec<String>,
    warnings: Vec<PlanWarning>,
    used_globals: BTreeSet<String>,
    declared: BTreeSet<String>,
}

struct Planner<'a> {
    ast: &'a Ast,
    opts: &'a PlanOptions,
    target_platform: Platform,
    names: BTreeMap<String, (usize, usize)>,
    /// every stage of each name, in order
    all_names: BTreeMap<String, Vec<usize>>,
    globals: BTreeMap<String, String>,
    global_declared: BTreeSet<String>,
    predefined: BTreeMap<String, String>,
    warnings: Vec<PlanWarning>,
}

impl Planner<'_> {
    fn err_at(&self, node: &Node, kind: impl Into<ErrorKind>, token: &str) -> Error {
        Error {
            location: Some(Box::new(self.loc(node, token))),
            kind: kind.into(),
        }
    }

    fn loc(&self, node: &Node, token: &str) -> Location {
        self.ast
            .source
            .find_in(node.start_line, node.end_line, token)
    }

    fn check(
        &self,
        node: &Node,
        env: &dyn Env,
    ) -> Result<(Instruction, BTreeSet<String>, BTreeSet<String>), Error> {
        let mut ex = Expander::new(self.ast.escape, env);
        let ins = check(node, &mut ex).map_err(|e| self.err_at(node, e.kind, &e.token))?;
        Ok((ins, ex.matched, ex.unmatched))
    }

    /// Expand one word at `node` in `scope`, returning the unset names too.
    fn expand(
        &self,
        node: &Node,
        raw: &str,
        scope: &dyn Env,
    ) -> Result<(String, BTreeSet<String>), Error> {
        let mut ex = Expander::new(self.ast.escape, scope);
        let v = ex
            .word(raw)
            .map_err(|e| self.err_at(node, instructions::InstructionError::from(e), raw))?;
        Ok((v, ex.unmatched))
    }

    /// Resolve a `--from` / `from=` value seen in stage `current`;
    /// `earlier_only` refuses stages defined after it (COPY's rule).
    fn resolve(
        &self,
        node: &Node,
        value: &str,
        current: usize,
        earlier_only: bool,
    ) -> Result<SourceRef, Error> {
        // A named context replaces a stage or image of the same name.
        if let Some(src) = self.opts.named_contexts.get(value) {
            return Ok(SourceRef::Context {
                name: value.into(),
                source: src.clone(),
            });
        }
        if !value.is_empty() && value.chars().all(|c| c.is_ascii_digit()) {
            return match value.parse::<usize>() {
                Ok(i) if i < current => Ok(SourceRef::Stage { index: i }),
                _ => Err(self.err_at(node, PlanError::LaterStageIndex(value.into()), value)),
            };
        }
        if let Some(&(i, _)) = self.names.get(&value.to_lowercase()) {
            if i == current {
                return Err(self.err_at(node, PlanError::SelfReference(value.into()), value));
            }
            if earlier_only && i > current {
                let here = stage_label(self, current);
                return Err(self.err_at(
                    node,
                    PlanError::LaterStage {
                        from: value.into(),
                        current: here,
                    },
                    value,
                ));
            }
            return Ok(SourceRef::Stage { index: i });
        }
        if reference::is_valid(value) {
            return Ok(SourceRef::Image {
                reference: value.into(),
            });
        }
        Err(self.err_at(node, PlanError::InvalidReference(value.into()), value))
    }

    /// Check stage `index` (its FROM and the `nodes` after it), given the
    /// stages before it in `done`; `build_args_used` gathers the build
    /// args its ARGs took.
    fn stage(
        &self,
        index: usize,
        nodes: &[Node],
        done: &[Option<StageDraft>],
        build_args_used: &mut BTreeSet<String>,
    ) -> Result<StageDraft, Error> {
        let mut draft = self.stage_from(index, &nodes[0], done)?;
        // A stage built FROM another stage first runs that stage's ONBUILD
        // triggers (its own only: BuildKit clears inherited ones).
        // A stage FROM an image runs the image's triggers, planned here so
        // that a trigger naming a stage (COPY --from=build) finds this
        // Dockerfile's stage, as BuildKit resolves it.
        let inherited = match &draft.base {
            Base::Stage { index: i } => done[*i]
                .as_ref()
                .map(|p| p.triggers.clone())
                .unwrap_or_default(),
            // an image named by --build-context: keyed by its source
            Base::Image { reference: key } | Base::Context { source: key, .. } => {
                match self.opts.image_onbuild.get(key) {
                    Some(triggers) => image_triggers(triggers, &nodes[0])?,
                    None => Vec::new(),
                }
            }
            _ => Vec::new(),
        };
        for (k, node) in inherited.iter().chain(&nodes[1..]).enumerate() {
            if let Some(t) = onbuild_trigger(node) {
                draft.triggers.push(t);
            }
            let trigger = k < inherited.len();
            let step = self.step(index, node, trigger, &mut draft, build_args_used)?;
            draft.steps.push(step);
        }
        if draft.steps.iter().any(|s| !s.unresolved.is_empty()) {
            draft.env_complete = false;
        }
        Ok(draft)
    }

    /// A stage as its FROM leaves it, before any step.
    fn stage_from(
        &self,
        index: usize,
        node: &Node,
        done: &[Option<StageDraft>],
    ) -> Result<StageDraft, Error> {
        let scope = Scope([&self.globals, &self.predefined]);
        let (ins, matched, unmatched) = self.check(node, &scope)?;
        let Instruction::From(from) = ins else {
            unreachable!("stages start with FROM");
        };
        let undeclared = unmatched.iter().any(|v| !self.global_declared.contains(v));
        let options: Vec<&str> = if undeclared && self.global_declared.len() <= 1000 {
            self.global_declared
                .iter()
                .map(String::as_str)
                .chain(self.predefined.keys().map(String::as_str))
                .collect()
        } else {
            Vec::new()
        };
        let warnings = unmatched
            .iter()
            .filter(|v| !self.global_declared.contains(*v))
            .map(|v| PlanWarning {
                line: Some(node.start_line),
                end_line: Some(node.end_line),
                rule: Some("UndefinedArgInFrom"),
                message: format!(
                    "FROM argument '{v}' is not declared{}",
                    did_you_mean(v, &options, "")
                ),
            })
            .collect();
        let platform = match &from.platform {
            Some(p) => Platform::parse(p).map_err(|e| self.err_at(node, PlanError::from(e), p))?,
            None => self.target_platform.clone(),
        };
        let start = self.start(index, node, &from, platform, done)?;
        Ok(StageDraft {
            name: from.name,
            line: node.start_line,
            base: start.base,
            platform: start.platform,
            deps: start.deps,
            steps: Vec::new(),
            triggers: Vec::new(),
            env: start.env,
            env_complete: start.env_complete,
            workdir: start.workdir,
            args: start.args,
            arg_order: start.arg_order,
            warnings,
            used_globals: matched,
            declared: BTreeSet::new(),
        })
    }

    /// What FROM `from` of stage `index` starts from, in the order BuildKit
    /// resolves it: a named context, an earlier stage, scratch, then a
    /// registry image. `platform` is the FROM's (or the target) platform.
    fn start(
        &self,
        index: usize,
        node: &Node,
        from: &instructions::FromStage,
        platform: Platform,
        done: &[Option<StageDraft>],
    ) -> Result<Start, Error> {
        let lower = from.image.to_lowercase();
        if let Some(src) = self.opts.named_contexts.get(&from.image) {
            return Ok(Start::context(&from.image, src, platform));
        }
        let earlier = self
            .all_names
            .get(&lower)
            .and_then(|all| all.iter().rev().find(|&&i| i < index));
        if let Some(&i) = earlier {
            return Ok(Start::stage(i, done[i].as_ref(), platform));
        }
        if lower == "scratch" {
            // FROM --platform does not apply to scratch.
            return Ok(Start::scratch(self.target_platform.clone()));
        }
        if !reference::is_valid(&from.image) {
            return Err(self.err_at(
                node,
                PlanError::InvalidReference(from.image.clone()),
                &from.image,
            ));
        }
        Ok(Start::image(self.opts, &from.image, platform))
    }

    /// Check one instruction of stage `index` (`trigger`: an ONBUILD
    /// trigger of its parent) and carry its effects into `d`: ARG and ENV
    /// values, dependencies, the working directory, warnings.
    fn step(
        &self,
        index: usize,
        node: &Node,
        trigger: bool,
        d: &mut StageDraft,
        build_args_used: &mut BTreeSet<String>,
    ) -> Result<Step, Error> {
        // `d.env` is the stage's environment as BuildKit keeps it: the
        // base's, then every ENV and valued ARG in order, the latest
        // definition of a name winning.
        let (mut ins, _matched, mut unmatched) = self.check(node, &d.env)?;
        match &mut ins {
            Instruction::Arg(decls) => {
                for decl in decls {
                    let missing = self.declare_arg(node, decl, d, build_args_used)?;
                    unmatched.extend(missing);
                }
            }
            Instruction::Env(kvs) => {
                for kv in kvs {
                    d.env.insert(kv.key.clone(), kv.value.clone());
                }
            }
            _ => {}
        }
        let sources = self.sources(node, &ins, index)?;
        d.deps.extend(sources.iter().filter_map(|s| match s {
            SourceRef::Stage { index } => Some(*index),
            _ => None,
        }));
        let step_workdir = d.workdir.clone();
        match &mut ins {
            Instruction::Workdir(w) => d.workdir = change_dir(d.workdir.take(), w),
            Instruction::Run(r) => join_mount_targets(r, step_workdir.as_deref()),
            _ => {}
        }
        let unresolved = self.unresolved(node, unmatched, d);
        let args = match ins {
            // in the order they were declared, as BuildKit's history
            // prefix (`RUN |2 a=1 b=2 ...`) lists them
            Instruction::Run(_) => d
                .arg_order
                .iter()
                .filter_map(|k| d.args.get(k).map(|v| (k.clone(), v.clone())))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Step {
            line: node.start_line,
            end_line: node.end_line,
            original: node.original.trim().to_string(),
            instruction: ins,
            sources,
            args,
            workdir: step_workdir,
            unresolved,
            trigger,
        })
    }

    /// An ARG in a stage: its value is the build arg, else its default
    /// (expanded now), else the global ARG or automatic arg of that name.
    /// Returns the unset names its default referenced.
    fn declare_arg(
        &self,
        node: &Node,
        decl: &mut instructions::ArgDecl,
        d: &mut StageDraft,
        build_args_used: &mut BTreeSet<String>,
    ) -> Result<BTreeSet<String>, Error> {
        d.declared.insert(decl.key.clone());
        let mut missing = BTreeSet::new();
        let value = if let Some(v) = self.opts.build_args.get(&decl.key) {
            build_args_used.insert(decl.key.clone());
            Some(v.clone())
        } else if let Some(raw) = &decl.default {
            // Evaluated only now, and only without a build
            // arg, so `${X:?msg}` fails only when it should.
            let (v, unset) = self.expand(node, raw, &d.env)?;
            missing = unset;
            Some(v)
        } else if let Some(v) = self.globals.get(&decl.key) {
            Some(v.clone())
        } else {
            self.predefined.get(&decl.key).cloned()
        };
        decl.value.clone_from(&value);
        // An ARG without a value leaves an earlier one in place.
        if let Some(v) = value {
            d.env.insert(decl.key.clone(), v.clone());
            if d.args.insert(decl.key.clone(), v).is_none() {
                d.arg_order.push(decl.key.clone());
            }
        }
        Ok(missing)
    }

    /// What `COPY --from` or each `RUN --mount from=` of stage `index`
    /// refers to.
    fn sources(
        &self,
        node: &Node,
        ins: &Instruction,
        index: usize,
    ) -> Result<Vec<SourceRef>, Error> {
        match ins {
            Instruction::Copy(c) => c
                .from
                .iter()
                .map(|f| self.resolve(node, f, index, true))
                .collect(),
            Instruction::Run(r) => r
                .mounts
                .iter()
                .filter_map(Mount::from)
                .map(|f| self.resolve(node, f, index, false))
                .collect(),
            _ => Ok(Vec::new()),
        }
    }

    /// The variables a step referenced that were unset: when the stage's
    /// whole environment is known they are really unset (warned about,
    /// as BuildKit's UndefinedVar rule does, and not returned); otherwise
    /// they are returned, to be looked up in the base image's config.
    fn unresolved(
        &self,
        node: &Node,
        unmatched: BTreeSet<String>,
        d: &mut StageDraft,
    ) -> Vec<String> {
        if !d.env_complete {
            return unmatched.into_iter().collect();
        }
        // A declared ARG without a value is not reported.
        let undefined: Vec<&String> = unmatched
            .iter()
            .filter(|v| !d.declared.contains(*v))
            .collect();
        if undefined.is_empty() {
            return Vec::new();
        }
        // suggestions among a bounded number of names (lint::suggest)
        let options: Vec<&str> = if d.env.len() + d.args.len() <= 1000 {
            d.env
                .keys()
                .chain(d.args.keys())
                .map(String::as_str)
                .collect()
        } else {
            Vec::new()
        };
        for v in undefined {
            d.warnings.push(PlanWarning {
                line: Some(node.start_line),
                end_line: Some(node.end_line),
                rule: Some("UndefinedVar"),
                message: format!(
                    "Usage of undefined variable '${v}'{}",
                    did_you_mean(v, &options, "$")
                ),
            });
        }
        Vec::new()
    }
}

/// How a stage starts: what FROM gives it before its first step.
struct Start {
    base: Base,
    platform: Platform,
    deps: BTreeSet<usize>,
    env: BTreeMap<String, String>,
    /// `env` holds everything the base sets (false for images whose
    /// config was not given).
    env_complete: bool,
    workdir: Option<String>,
    args: BTreeMap<String, String>,
    arg_order: Vec<String>,
}

impl Start {
    /// A `--build-context`: nothing is known about it.
    fn context(name: &str, source: &str, platform: Platform) -> Self {
        Start {
            base: Base::Context {
                name: name.into(),
                source: source.into(),
            },
            platform,
            deps: BTreeSet::new(),
            env: BTreeMap::new(),
            env_complete: false,
            workdir: None,
            args: BTreeMap::new(),
            arg_order: Vec::new(),
        }
    }

    /// Earlier stage `i`: a child builds on its parent's platform, ARGs,
    /// environment and working directory.
    fn stage(i: usize, parent: Option<&StageDraft>, platform: Platform) -> Self {
        Start {
            base: Base::Stage { index: i },
            platform: parent.map_or(platform, |p| p.platform.clone()),
            deps: BTreeSet::from([i]),
            env: parent.map(|p| p.env.clone()).unwrap_or_default(),
            env_complete: parent.is_some_and(|p| p.env_complete),
            workdir: parent.and_then(|p| p.workdir.clone()),
            args: parent.map(|p| p.args.clone()).unwrap_or_default(),
            arg_order: parent.map(|p| p.arg_order.clone()).unwrap_or_default(),
        }
    }

    /// `FROM scratch`: an empty environment but for the default PATH.
    fn scratch(platform: Platform) -> Self {
        Start {
            base: Base::Scratch,
            env: with_default_path(BTreeMap::new(), &platform.os),
            platform,
            deps: BTreeSet::new(),
            env_complete: true,
            workdir: Some("/".into()),
            args: BTreeMap::new(),
            arg_order: Vec::new(),
        }
    }

    /// A registry image, with its config's environment and working
    /// directory when the caller gave them.
    fn image(opts: &PlanOptions, reference: &str, platform: Platform) -> Self {
        let env = opts.image_env.get(reference);
        let workdir = match opts.image_workdir.get(reference) {
            Some(w) if !w.is_empty() => Some(clean_path(w)),
            _ if env.is_some() => Some("/".into()),
            _ => None,
        };
        Start {
            base: Base::Image {
                reference: reference.into(),
            },
            env: match env {
                Some(e) => with_default_path(e.iter().cloned().collect(), &platform.os),
                None => BTreeMap::new(),
            },
            env_complete: env.is_some(),
            platform,
            deps: BTreeSet::new(),
            workdir,
            args: BTreeMap::new(),
            arg_order: Vec::new(),
        }
    }
}

/// Images get the default PATH when their config has none (not on
/// Windows); scratch always has it.
fn with_default_path(mut env: BTreeMap<String, String>, os: &str) -> BTreeMap<String, String> {
    if os != "windows" && !env.contains_key("PATH") {
        env.insert("PATH".into(), DEFAULT_PATH.into());
    }
    env
}

/// The instruction an ONBUILD holds, placed at the ONBUILD's lines.
fn onbuild_trigger(node: &Node) -> Option<Node> {
    let (Some(sub), "onbuild") = (&node.sub, node.instruction.as_str()) else {
        return None;
    };
    let mut t = (**sub).clone();
    t.start_line = node.start_line;
    t.end_line = node.end_line;
    t.heredocs.clone_from(&node.heredocs);
    Some(t)
}

/// A base image's ONBUILD triggers as instructions of the stage built on
/// it, each at the line of its FROM.
fn image_triggers(triggers: &[String], from: &Node) -> Result<Vec<Node>, Error> {
    let text = format!("{}\n", triggers.join("\n"));
    let ast = crate::frontend::parse(text.as_bytes(), "ONBUILD triggers of the base image")
        .map_err(|e| Error {
            location: e.location.clone(),
            kind: PlanError::Trigger(e.kind.to_string()).into(),
        })?;
    Ok(ast
        .nodes
        .into_iter()
        .map(|mut n| {
            n.start_line = from.start_line;
            n.end_line = from.end_line;
            n
        })
        .collect())
}

/// The working directory after `WORKDIR w` in `cur` (unknown stays
/// unknown for a relative `w`).
fn change_dir(cur: Option<String>, w: &str) -> Option<String> {
    if w.starts_with('/') {
        Some(clean_path(w))
    } else {
        cur.map(|cur| clean_path(&format!("{cur}/{w}")))
    }
}

/// Join a RUN's relative mount targets to the step's working directory,
/// when it is known.
fn join_mount_targets(run: &mut instructions::Run, workdir: Option<&str>) {
    let Some(cur) = workdir else {
        return;
    };
    for m in &mut run.mounts {
        if let Some(t) = m.target_mut().filter(|t| !t.starts_with('/')) {
            *t = clean_path(&format!("{cur}/{t}"));
        }
    }
}

/// Every stage checked, in Dockerfile order.
struct CheckedStages {
    /// A stage's draft, or None when it failed.
    drafts: Vec<Option<StageDraft>>,
    /// Why a stage failed, by index.
    failures: BTreeMap<usize, Error>,
    /// The build args each stage's ARGs took.
    build_args_used: Vec<BTreeSet<String>>,
}

impl<'a> Planner<'a> {
    fn new(ast: &'a Ast, opts: &'a PlanOptions, target_platform: Platform) -> Self {
        Planner {
            ast,
            opts,
            target_platform,
            names: BTreeMap::new(),
            all_names: BTreeMap::new(),
            globals: BTreeMap::new(),
            global_declared: BTreeSet::new(),
            predefined: BTreeMap::new(),
            warnings: ast
                .warnings
                .iter()
                .map(|w| PlanWarning {
                    line: Some(w.line),
                    end_line: None,
                    rule: Some("NoEmptyContinuation"),
                    message: "Empty continuation line".into(),
                })
                .collect(),
        }
    }
}

impl Planner<'_> {
    /// Record each `FROM ... AS name`.
    fn name_stages(&mut self, stage_nodes: &[&[Node]]) -> Result<(), Error> {
        for (i, nodes) in stage_nodes.iter().enumerate() {
            let n = &nodes[0];
            let [_, as_, name] = n.args.as_slice() else {
                continue;
            };
            if !as_.eq_ignore_ascii_case("as") {
                continue;
            }
            // A name used twice is BuildKit's DuplicateStageName warning:
            // `--from` and `--target` find the last stage of that name, a
            // FROM the last one before it.
            let name = name.to_lowercase();
            self.all_names.entry(name.clone()).or_default().push(i);
            self.names.insert(name, (i, n.start_line));
        }
        Ok(())
    }

    /// The index of `--target` stage `t`, or an error listing the stages
    /// with a hint for a near miss.
    fn find_target(&self, t: &str) -> Result<usize, Error> {
        let lower = t.to_lowercase();
        if let Some(&(i, _)) = self.names.get(&lower) {
            return Ok(i);
        }
        let hint = self
            .names
            .keys()
            .map(|n| (instructions::edit_distance(&lower, n), n))
            .min()
            .filter(|(d, _)| *d <= 2)
            .map(|(_, n)| format!(" (did you mean {n}?)"))
            .unwrap_or_default();
        let mut available: Vec<&str> = self.names.keys().map(String::as_str).collect();
        if available.is_empty() {
            available.push("(none are named)");
        }
        Err(Error {
            location: None,
            kind: PlanError::UnknownTarget {
                target: t.to_string(),
                available: available.join(", "),
                hint,
            }
            .into(),
        })
    }

    /// The automatic args, TARGETSTAGE naming stage `target`; a build arg
    /// of the same name overrides each.
    fn set_predefined(&mut self, target: usize) {
        let mut predefined = platform_args(&self.opts.build_platform, &self.target_platform);
        let target_name = self
            .names
            .iter()
            .find(|(_, &(i, _))| i == target)
            .map_or_else(|| "default".to_string(), |(n, _)| n.clone());
        predefined.insert("TARGETSTAGE".into(), target_name);
        for (k, v) in predefined.iter_mut() {
            if let Some(b) = self.opts.build_args.get(k) {
                v.clone_from(b);
            }
        }
        self.predefined = predefined;
    }

    /// The ARGs before the first FROM (`nodes`; anything else there is an
    /// error): each takes its build arg, else its expanded default.
    fn global_args(&mut self, nodes: &[Node]) -> Result<(), Error> {
        for node in nodes {
            if node.instruction != "arg" {
                return Err(self.err_at(node, before_from_error(node), ""));
            }
            let scope = Scope([&self.globals, &self.predefined]);
            let (ins, _, _) = self.check(node, &scope)?;
            let Instruction::Arg(decls) = ins else {
                continue;
            };
            for d in decls {
                self.global_declared.insert(d.key.clone());
                let v = match (self.opts.build_args.get(&d.key), &d.default) {
                    (Some(v), _) => Some(v.clone()),
                    (None, Some(raw)) => {
                        let scope = Scope([&self.globals, &self.predefined]);
                        Some(self.expand(node, raw, &scope)?.0)
                    }
                    (None, None) => None,
                };
                match v {
                    Some(v) => self.globals.insert(d.key, v),
                    None => self.globals.remove(&d.key),
                };
            }
        }
        Ok(())
    }

    /// Check every stage, in order (a FROM can only name an earlier
    /// stage); a failure is kept, not returned.
    fn check_stages(&self, stage_nodes: &[&[Node]]) -> CheckedStages {
        let mut checked = CheckedStages {
            drafts: Vec::new(),
            failures: BTreeMap::new(),
            build_args_used: Vec::new(),
        };
        for (i, nodes) in stage_nodes.iter().enumerate() {
            let mut used = BTreeSet::new();
            match self.stage(i, nodes, &checked.drafts, &mut used) {
                Ok(d) => checked.drafts.push(Some(d)),
                Err(e) => {
                    checked.failures.insert(i, e);
                    checked.drafts.push(None);
                }
            }
            checked.build_args_used.push(used);
        }
        checked
    }

    /// The build args the stages in `order` consumed: taken by a stage ARG,
    /// or a global or automatic arg a stage used, or declared by one.
    fn consumed_build_args(&self, order: &[usize], checked: &CheckedStages) -> BTreeSet<String> {
        let mut consumed: BTreeSet<String> = BTreeSet::new();
        for &i in order {
            consumed.extend(checked.build_args_used[i].iter().cloned());
            let Some(d) = &checked.drafts[i] else {
                continue;
            };
            consumed.extend(
                d.used_globals
                    .iter()
                    .filter(|g| {
                        self.global_declared.contains(*g) || self.predefined.contains_key(*g)
                    })
                    .cloned(),
            );
            consumed.extend(
                d.declared
                    .iter()
                    .filter(|k| self.opts.build_args.contains_key(*k))
                    .cloned(),
            );
        }
        consumed
    }
}

/// Resolve `ast` with `opts` into the stages to build.
pub fn plan(ast: &Ast, opts: &PlanOptions) -> Result<Plan, Error> {
    let target_platform = opts
        .target_platform
        .clone()
        .unwrap_or_else(|| opts.build_platform.clone());
    let Some(first_from) = ast.nodes.iter().position(|n| n.instruction == "from") else {
        return Err(no_from_error(ast));
    };
    let stage_nodes = split_stages(&ast.nodes, first_from);
    let mut planner = Planner::new(ast, opts, target_platform.clone());
    // Name the stages up front so `COPY --from` can refer to a stage
    // defined later.
    planner.name_stages(&stage_nodes)?;
    // The target, known before expansion so TARGETSTAGE can be set.
    let target = match &opts.target {
        None => stage_nodes.len() - 1,
        Some(t) => planner.find_target(t)?,
    };
    planner.set_predefined(target);
    planner.global_args(&ast.nodes[..first_from])?;
    let mut checked = planner.check_stages(&stage_nodes);
    // Needed stages, dependencies first; a stage that failed to check only
    // fails the build when it is needed.
    let mut order = Vec::new();
    let mut state = vec![0u8; checked.drafts.len()]; // 0 new, 1 in progress, 2 done
    let mut path = Vec::new();
    visit(
        target,
        &checked.drafts,
        &mut state,
        &mut order,
        &mut path,
        &checked.failures,
        &planner,
    )?;
    let consumed = planner.consumed_build_args(&order, &checked);
    let mut warnings = std::mem::take(&mut planner.warnings);
    // Findings about stages that are not built are not the user's concern
    // now (under --check they all are).
    let built: BTreeSet<usize> = order.iter().copied().collect();
    let linted = |i: usize| opts.lint_all || built.contains(&i);
    for (i, d) in checked.drafts.iter_mut().enumerate() {
        if let Some(d) = d.as_mut().filter(|_| linted(i)) {
            warnings.append(&mut d.warnings);
        }
    }
    for (i, d) in checked.drafts.iter().enumerate() {
        let Some(d) = d.as_ref().filter(|_| built.contains(&i)) else {
            continue;
        };
        let Base::Image { reference } = &d.base else {
            continue;
        };
        let expected = d.platform.to_string();
        if let Some(actual) = opts
            .base_platforms
            .get(&(reference.clone(), expected.clone()))
        {
            warnings.push(PlanWarning {
                line: Some(d.line),
                end_line: Some(d.line),
                rule: Some("InvalidBaseImagePlatform"),
                message: format!(
                    "Base image {reference} was pulled with platform \"{actual}\", expected \"{expected}\" for current build"
                ),
            });
        }
    }
    let defaults = global_defaults(ast, first_from, &planner.predefined);
    let target_platform_text = target_platform.to_string();
    let inputs = super::lint::Inputs {
        global_defaults: &defaults,
        target_platform: &target_platform_text,
        ignore: opts.ignore.as_ref(),
    };
    warnings.extend(super::lint::findings(ast, &linted, &inputs));
    warnings.sort_by_key(|w| w.line.unwrap_or(0));
    let lint_violation = apply_check_directive(ast, opts, &mut warnings)?;
    warnings.extend(unused_build_args_warning(opts, &consumed));
    warnings.extend(ast.directive("syntax").and_then(other_frontend_warning));
    Ok(Plan {
        syntax: ast.directive("syntax").map(str::to_string),
        escape: ast.escape,
        build_platform: opts.build_platform.clone(),
        target_platform,
        target,
        stages: into_stages(&order, checked.drafts),
        proxy_args: opts
            .build_args
            .iter()
            .filter(|(k, _)| is_proxy_arg(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        warnings,
        lint_violation,
    })
}

/// The findings of the rules BuildKit runs while parsing (every stage),
/// for a Dockerfile that does not plan: they are reported before its
/// error, as BuildKit reports what it found before it stopped.
pub fn findings_before_error(ast: &Ast, opts: &PlanOptions) -> Vec<PlanWarning> {
    let defaults = BTreeMap::new();
    let inputs = super::lint::Inputs {
        global_defaults: &defaults,
        target_platform: "",
        ignore: None,
    };
    let mut warnings: Vec<PlanWarning> = super::lint::findings(ast, &|_| false, &inputs)
        .into_iter()
        .filter(|w| {
            !matches!(
                w.rule,
                Some(
                    "RedundantTargetPlatform"
                        | "FromPlatformFlagConstDisallowed"
                        | "InvalidDefaultArgInFrom"
                )
            )
        })
        .collect();
    warnings.extend(undeclared_in_from(ast, opts));
    warnings.sort_by_key(|w| w.line.unwrap_or(0));
    // a check directive that does not parse is the error itself
    let _ = apply_check_directive(ast, opts, &mut warnings);
    warnings
}

/// UndefinedArgInFrom for every FROM, from the Dockerfile alone (for a
/// Dockerfile that does not plan): the variables its base name and
/// `--platform` use that no global ARG declares and no platform arg is.
fn undeclared_in_from(ast: &Ast, opts: &PlanOptions) -> Vec<PlanWarning> {
    let Some(first_from) = ast.nodes.iter().position(|n| n.instruction == "from") else {
        return Vec::new();
    };
    let tp = opts
        .target_platform
        .clone()
        .unwrap_or_else(|| opts.build_platform.clone());
    let mut known = platform_args(&opts.build_platform, &tp);
    known.insert("TARGETSTAGE".into(), String::new());
    for node in ast.nodes[..first_from]
        .iter()
        .filter(|n| n.instruction == "arg")
    {
        for a in &node.args {
            let (k, v) = a.split_once('=').unwrap_or((a, ""));
            known.insert(k.to_string(), v.to_string());
        }
    }
    let lex = crate::frontend::shell::Lexer::new(ast.escape);
    let names: Vec<&str> = known.keys().map(String::as_str).collect();
    let mut out = Vec::new();
    for node in ast.nodes.iter().filter(|n| n.instruction == "from") {
        let words = node
            .flags
            .iter()
            .filter_map(|f| f.strip_prefix("--platform="))
            .chain(node.args.first().map(String::as_str));
        let mut unmatched = BTreeSet::new();
        for w in words {
            if let Ok(x) = lex.process(w, &Scope([&known, &BTreeMap::new()])) {
                unmatched.extend(x.unmatched);
            }
        }
        for v in unmatched {
            out.push(PlanWarning {
                line: Some(node.start_line),
                end_line: Some(node.end_line),
                rule: Some("UndefinedArgInFrom"),
                message: format!(
                    "FROM argument '{v}' is not declared{}",
                    did_you_mean(&v, &names, "")
                ),
            });
        }
    }
    out
}

/// The error for a Dockerfile without FROM: what stands where it should
/// be, or that there is nothing at all.
fn no_from_error(ast: &Ast) -> Error {
    let Some(n) = ast.nodes.iter().find(|n| n.instruction != "arg") else {
        return Error {
            location: None,
            kind: PlanError::NoFrom.into(),
        };
    };
    Error {
        location: Some(Box::new(ast.source.find(n.start_line, ""))),
        kind: before_from_error(n),
    }
}

/// Why `node` cannot come before the first FROM.
fn before_from_error(node: &Node) -> ErrorKind {
    let name = node.instruction.to_uppercase();
    if instructions::is_instruction(&node.instruction) {
        PlanError::BeforeFrom(name).into()
    } else {
        instructions::InstructionError::UnknownInstruction(name).into()
    }
}

/// The nodes of each stage, from its FROM to the next.
/// The nodes of each stage: its FROM and what follows up to the next.
pub(crate) fn split_stages(nodes: &[Node], first_from: usize) -> Vec<&[Node]> {
    let mut stages: Vec<&[Node]> = Vec::new();
    let mut start = first_from;
    for i in first_from + 1..=nodes.len() {
        if i == nodes.len() || nodes[i].instruction == "from" {
            stages.push(&nodes[start..i]);
            start = i;
        }
    }
    stages
}

/// The automatic platform args, for a build on `bp` for `tp`.
fn platform_args(bp: &Platform, tp: &Platform) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("BUILDPLATFORM".into(), bp.without_os_version()),
        ("BUILDOS".into(), bp.os.clone()),
        ("BUILDARCH".into(), bp.architecture.clone()),
        (
            "BUILDVARIANT".into(),
            bp.variant.clone().unwrap_or_default(),
        ),
        ("TARGETPLATFORM".into(), tp.to_string()),
        ("TARGETOS".into(), tp.os.clone()),
        ("TARGETARCH".into(), tp.architecture.clone()),
        (
            "TARGETVARIANT".into(),
            tp.variant.clone().unwrap_or_default(),
        ),
        (
            "BUILDOSVERSION".into(),
            bp.os_version.clone().unwrap_or_default(),
        ),
        (
            "TARGETOSVERSION".into(),
            tp.os_version.clone().unwrap_or_default(),
        ),
    ])
}

/// `# check=`: drop the warnings of skipped rules, and with `error=true`
/// say which rules left are a violation.
fn apply_check_directive(
    ast: &Ast,
    opts: &PlanOptions,
    warnings: &mut Vec<PlanWarning>,
) -> Result<Option<LintViolation>, Error> {
    // the BUILDKIT_DOCKERFILE_CHECK build arg replaces the directive
    let check = match opts.build_args.get("BUILDKIT_DOCKERFILE_CHECK") {
        Some(v) => crate::frontend::parser::CheckOptions::parse(v).map_err(|opt| Error {
            location: None,
            kind: PlanError::CheckArg(opt).into(),
        })?,
        None => ast.check_options()?,
    };
    let nodes: BTreeMap<usize, &Node> = ast.nodes.iter().map(|n| (n.start_line, n)).collect();
    warnings.retain(|w| {
        w.rule.is_none_or(|r| {
            let experimental = super::lint::find(r).is_some_and(|x| x.experimental);
            // a `# check=` comment right above an instruction adds to the
            // file's for that instruction only
            let local = w
                .line
                .and_then(|l| nodes.get(&l))
                .and_then(|n| local_check(n));
            let skipped_here = local.as_ref().is_some_and(|c| !experimental && c.skips(r));
            let enabled_here = local
                .as_ref()
                .is_some_and(|c| experimental && c.reports(r, true));
            (check.reports(r, experimental) || enabled_here) && !skipped_here
        })
    });
    if !check.error {
        return Ok(None);
    }
    let mut rules: Vec<&str> = warnings.iter().filter_map(|w| w.rule).collect();
    rules.sort_unstable();
    rules.dedup();
    if rules.is_empty() {
        return Ok(None);
    }
    let line = warnings
        .iter()
        .find(|w| w.rule.is_some())
        .and_then(|w| w.line);
    Ok(Some(LintViolation {
        rules: rules.join(", "),
        line,
    }))
}

/// The `# check=` comment right above `node` (its
/// value up to the first space, as BuildKit reads it), if any.
fn local_check(node: &Node) -> Option<crate::frontend::parser::CheckOptions> {
    node.comments.iter().find_map(|c| {
        let (name, value) = c.split_once('=')?;
        if name.trim() != "check" {
            return None;
        }
        let value = value.split(' ').next().unwrap_or("");
        crate::frontend::parser::CheckOptions::parse(value).ok()
    })
}

/// The global ARGs' default values and the platform args, as BuildKit's
/// InvalidDefaultArgInFrom rule expands FROM with them (no build arg
/// given).
fn global_defaults(
    ast: &Ast,
    first_from: usize,
    predefined: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let lex = crate::frontend::shell::Lexer::new(ast.escape);
    // the platform args (TARGETARCH...) are set as in any build
    let mut out: BTreeMap<String, String> = predefined.clone();
    for node in ast.nodes[..first_from]
        .iter()
        .filter(|n| n.instruction == "arg")
    {
        for a in &node.args {
            if let Some((k, v)) = a.split_once('=') {
                let v = lex
                    .process_word(v, &Scope([&out, &BTreeMap::new()]))
                    .unwrap_or_default();
                out.insert(k.to_string(), v);
            }
        }
    }
    out
}

/// BuildKit's ` (did you mean X?)` after an undefined name, or nothing.
fn did_you_mean(name: &str, options: &[&str], sigil: &str) -> String {
    match super::lint::suggest(name, options) {
        Some(m) => format!(" (did you mean {sigil}{m}?)"),
        None => String::new(),
    }
}

/// `# syntax=` naming a frontend image other than BuildKit's Dockerfile
/// frontend (`docker/dockerfile`, `docker/dockerfile-upstream`, any tag
/// or digest): kiln never pulls and runs a frontend image, so the build
/// is its built-in Dockerfile frontend's, and the user is told.
fn other_frontend_warning(syntax: &str) -> Option<PlanWarning> {
    let name = syntax.split(['@']).next().unwrap_or(syntax);
    let repo = match name.rsplit_once(':') {
        Some((r, tag)) if !tag.contains('/') => r,
        _ => name,
    };
    let repo = repo
        .strip_prefix("docker.io/")
        .or_else(|| repo.strip_prefix("index.docker.io/"))
        .unwrap_or(repo);
    if matches!(repo, "docker/dockerfile" | "docker/dockerfile-upstream") {
        return None;
    }
    Some(PlanWarning {
        line: Some(1),
        end_line: None,
        rule: None,
        message: format!(
            "# syntax={syntax} names a frontend image kiln does not run: the build uses kiln's built-in Dockerfile frontend"
        ),
    })
}

/// kiln's notice about `--build-arg`s no built stage consumed (proxy args,
/// `BUILDKIT_*` and `SOURCE_DATE_EPOCH` are never reported).
fn unused_build_args_warning(
    opts: &PlanOptions,
    consumed: &BTreeSet<String>,
) -> Option<PlanWarning> {
    let unused: Vec<&str> = opts
        .build_args
        .keys()
        .filter(|k| {
            !consumed.contains(*k)
                && !is_proxy_arg(k)
                && !k.starts_with("BUILDKIT_")
                && *k != "SOURCE_DATE_EPOCH"
        })
        .map(String::as_str)
        .collect();
    if unused.is_empty() {
        return None;
    }
    Some(PlanWarning {
        line: None,
        end_line: None,
        rule: None,
        message: format!(
            "one or more build-args [{}] were not consumed; declare them with ARG in a stage that is built",
            unused.join(" ")
        ),
    })
}

/// The needed stages, in `order`, out of their drafts.
fn into_stages(order: &[usize], mut drafts: Vec<Option<StageDraft>>) -> Vec<Stage> {
    order
        .iter()
        .map(|&i| {
            let d = drafts[i].take().expect("needed stages were checked");
            Stage {
                index: i,
                name: d.name,
                line: d.line,
                base: d.base,
                platform: d.platform,
                deps: d.deps.into_iter().collect(),
                steps: d.steps,
            }
        })
        .collect()
}

fn visit(
    i: usize,
    drafts: &[Option<StageDraft>],
    state: &mut [u8],
    order: &mut Vec<usize>,
    path: &mut Vec<usize>,
    failures: &BTreeMap<usize, Error>,
    p: &Planner<'_>,
) -> Result<(), Error> {
    // Iterative DFS so a long chain of stages cannot overflow the stack.
    let mut stack: Vec<(usize, Vec<usize>)> = Vec::new();
    let deps_of = |i: usize| -> Result<Vec<usize>, Error> {
        match (&drafts[i], failures.get(&i)) {
            (Some(d), _) => Ok(d.deps.iter().rev().copied().collect()),
            (None, Some(e)) => Err(e.clone()),
            (None, None) => Ok(Vec::new()),
        }
    };
    if state[i] == 2 {
        return Ok(());
    }
    state[i] = 1;
    path.push(i);
    stack.push((i, deps_of(i)?));
    while let Some((node, pending)) = stack.last_mut() {
        let node = *node;
        match pending.pop() {
            Some(d) if state[d] == 2 => {}
            Some(d) if state[d] == 1 => {
                let start = path.iter().position(|&x| x == d).unwrap_or(0);
                let names: Vec<String> = path[start..]
                    .iter()
                    .chain(std::iter::once(&d))
                    .map(|&s| stage_label(p, s))
                    .collect();
                let from = drafts[node].as_ref().map_or(0, |d| d.line);
                return Err(Error {
                    location: Some(Box::new(p.ast.source.find(from, ""))),
                    kind: PlanError::Cycle(names.join(" -> ")).into(),
                });
            }
            Some(d) => {
                state[d] = 1;
                path.push(d);
                let deps = deps_of(d)?;
                stack.push((d, deps));
            }
            None => {
                state[node] = 2;
                order.push(node);
                path.pop();
                stack.pop();
            }
        }
    }
    Ok(())
}

fn stage_label(p: &Planner<'_>, i: usize) -> String {
    p.names
        .iter()
        .find(|(_, &(s, _))| s == i)
        .map_or_else(|| format!("stage {i}"), |(n, _)| n.clone())
}

impl Step {
    /// The mounts of a RUN step, empty for other instructions.
    pub fn mounts(&self) -> &[Mount] {
        match &self.instruction {
            Instruction::Run(r) => &r.mounts,
            _ => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::other_frontend_warning;

    #[test]
    fn only_other_frontends_than_dockerfile_are_warned_about() {
        for ok in [
            "docker/dockerfile:1",
            "docker/dockerfile:1.7-labs",
            "docker.io/docker/dockerfile:1",
            "docker/dockerfile-upstream:master",
            "docker/dockerfile@sha256:ac85f380a63b13dfcefa89046420e1781752bab202122f8f50032edf31be0021",
            "docker/dockerfile",
        ] {
            assert!(other_frontend_warning(ok).is_none(), "{ok}");
        }
        for other in [
            "tonistiigi/dockerfile:master",
            "example.com:5000/docker/dockerfile:1",
            "ghcr.io/acme/frontend",
        ] {
            let w = other_frontend_warning(other).expect(other);
            assert!(w.message.contains(other), "{}", w.message);
            assert!(w.message.contains("built-in Dockerfile frontend"));
        }
    }
}
