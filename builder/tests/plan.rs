//! The planner: ARG/ENV scoping, predefined args, the stage graph,
//! `--target` pruning, and the errors a user gets for broken graphs.

use std::collections::BTreeMap;

use kiln_builder::frontend::instructions::{CommandLine, Instruction, Source};
use kiln_builder::frontend::mount_flags::Mount;
use kiln_builder::frontend::plan::{Base, PlanError, SourceRef};
use kiln_builder::frontend::{parse, plan, ErrorKind, Plan, PlanOptions, Platform};

fn opts() -> PlanOptions {
    PlanOptions {
        build_platform: Platform::parse("linux/amd64").unwrap(),
        ..PlanOptions::default()
    }
}

fn with_args(args: &[(&str, &str)]) -> PlanOptions {
    PlanOptions {
        build_args: args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..opts()
    }
}

fn plan_of(src: &str, o: &PlanOptions) -> Plan {
    let ast = parse(src.as_bytes(), "Dockerfile").unwrap();
    plan(&ast, o).unwrap_or_else(|e| panic!("{e}"))
}

fn plan_err(src: &str, o: &PlanOptions) -> kiln_builder::frontend::Error {
    let ast = parse(src.as_bytes(), "Dockerfile").unwrap_or_else(|e| panic!("{src:?}: {e}"));
    plan(&ast, o).expect_err("plan should fail")
}

/// The value of every ENV and WORKDIR of the last stage, in order.
fn values(p: &Plan) -> Vec<String> {
    let last = p.stages.last().unwrap();
    last.steps
        .iter()
        .filter_map(|s| match &s.instruction {
            Instruction::Env(kv) => Some(
                kv.iter()
                    .map(|k| format!("{}={}", k.key, k.value))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            Instruction::Workdir(w) => Some(w.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn global_args_reach_from_and_only_redeclared_into_stages() {
    let src = "ARG TAG=3.19\nARG UNUSED_HERE=x\nFROM alpine:$TAG\nWORKDIR /a/$TAG\nARG TAG\nWORKDIR /b/$TAG\n";
    let p = plan_of(src, &opts());
    assert_eq!(
        p.stages[0].base,
        Base::Image {
            reference: "alpine:3.19".into()
        }
    );
    assert_eq!(values(&p), ["/a/", "/b/3.19"]);
    let p = plan_of(src, &with_args(&[("TAG", "edge")]));
    assert_eq!(
        p.stages[0].base,
        Base::Image {
            reference: "alpine:edge".into()
        }
    );
    assert_eq!(values(&p), ["/a/", "/b/edge"]);
}

#[test]
fn arg_precedence_build_arg_then_stage_default_then_global() {
    let src = "ARG V=global\nFROM scratch\nARG V=stage\nENV A=$V\n";
    assert_eq!(values(&plan_of(src, &opts())), ["A=stage"]);
    assert_eq!(
        values(&plan_of(src, &with_args(&[("V", "cli")]))),
        ["A=cli"]
    );
}

#[test]
fn env_overrides_arg_and_is_visible_from_the_next_instruction() {
    let src = "FROM scratch\nARG X=arg\nENV X=env Y=$X\nENV Z=$X\n";
    assert_eq!(values(&plan_of(src, &opts())), ["X=env Y=arg", "Z=env"]);
}

#[test]
fn a_later_arg_sets_a_name_again_after_env() {
    let src = "FROM scratch\nENV X=env\nARG X=arg\nENV Y=$X\n";
    assert_eq!(values(&plan_of(src, &opts())), ["X=env", "Y=arg"]);
}

#[test]
fn env_and_args_are_inherited_from_a_parent_stage() {
    let src = "FROM scratch AS base\nARG A=1\nENV E=from-base\nFROM base\nENV F=$E-$A\n";
    assert_eq!(values(&plan_of(src, &opts())), ["F=from-base-1"]);
}

#[test]
fn platform_args_are_global_and_need_redeclaring() {
    let o = PlanOptions {
        target_platform: Some(Platform::parse("linux/arm/v7").unwrap()),
        ..opts()
    };
    let src = "FROM --platform=$BUILDPLATFORM alpine AS b\nENV T=$TARGETARCH\nARG TARGETARCH TARGETVARIANT BUILDOS TARGETPLATFORM TARGETSTAGE\nENV T=$TARGETARCH V=$TARGETVARIANT O=$BUILDOS P=$TARGETPLATFORM S=$TARGETSTAGE\n";
    let p = plan_of(src, &o);
    assert_eq!(p.stages[0].platform.to_string(), "linux/amd64");
    assert_eq!(values(&p), ["T=", "T=arm V=v7 O=linux P=linux/arm/v7 S=b"]);
    let p = plan_of("FROM scratch\n", &o);
    assert_eq!(
        p.stages[0].platform.to_string(),
        "linux/arm/v7",
        "stages default to the target platform"
    );
}

#[test]
fn run_steps_carry_args_in_scope() {
    let p = plan_of(
        "FROM scratch\nARG A=1\nRUN echo $A\nARG B\nRUN x\n",
        &opts(),
    );
    let runs: Vec<_> = p.stages[0]
        .steps
        .iter()
        .filter(|s| matches!(s.instruction, Instruction::Run(_)))
        .collect();
    assert_eq!(runs[0].args, [("A".to_string(), "1".to_string())]);
    assert_eq!(
        runs[1].args,
        [("A".to_string(), "1".to_string())],
        "an ARG without value or build-arg is unset"
    );
}

#[test]
fn unused_build_args_warn_and_proxies_do_not() {
    let p = plan_of(
        "ARG G\nFROM scratch\nARG USED\n",
        &with_args(&[
            ("USED", "1"),
            ("NOPE", "2"),
            ("HTTP_PROXY", "http://p"),
            ("G", "3"),
        ]),
    );
    let w: Vec<&str> = p.warnings.iter().map(|w| w.message.as_str()).collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("[G NOPE]"), "{w:?}");
    assert_eq!(
        p.proxy_args.get("HTTP_PROXY").map(String::as_str),
        Some("http://p")
    );
}

#[test]
fn from_with_undefined_variable_warns() {
    let p = plan_of("FROM alpine${SUFFIX}\n", &opts());
    assert!(p
        .warnings
        .iter()
        .any(|w| w.message == "FROM argument 'SUFFIX' is not declared" && w.line == Some(1)));
}

#[test]
fn graph_edges_and_dependency_order() {
    let src = "\
FROM alpine AS deps
RUN fetch
FROM golang AS build
COPY --from=deps /d /d
RUN --mount=type=bind,from=tools,target=/t --mount=type=cache,target=/c,from=0 make
FROM busybox AS tools
FROM build AS test
FROM scratch
COPY --from=build /app /app
COPY --from=nginx:1.25 /etc/nginx /etc/nginx
";
    let p = plan_of(src, &opts());
    let order: Vec<usize> = p.stages.iter().map(|s| s.index).collect();
    assert_eq!(
        order,
        [0, 2, 1, 4],
        "dependencies first; the unused `test` stage is pruned"
    );
    assert_eq!(p.target, 4);
    assert_eq!(p.stage(1).unwrap().deps, [0, 2]);
    assert_eq!(p.stage(4).unwrap().deps, [1]);
    let last = p.stage(4).unwrap();
    assert_eq!(
        last.steps[1].sources,
        [SourceRef::Image {
            reference: "nginx:1.25".into()
        }]
    );
    let build = p.stage(1).unwrap();
    assert_eq!(
        build.steps[1].sources,
        [SourceRef::Stage { index: 2 }, SourceRef::Stage { index: 0 }]
    );
}

#[test]
fn target_selects_a_stage_and_what_it_needs() {
    let src = "FROM alpine AS a\nFROM a AS b\nFROM alpine AS c\nRUN ${BROKEN:?this stage is not needed}\n";
    let p = plan_of(
        src,
        &PlanOptions {
            target: Some("B".into()),
            ..opts()
        },
    );
    assert_eq!(p.stages.iter().map(|s| s.index).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(p.stages[1].base, Base::Stage { index: 0 });
}

#[test]
fn unneeded_stage_errors_do_not_fail_but_needed_ones_do() {
    let src = "FROM alpine AS a\nENV X=${NEED:?set-NEED}\nFROM alpine AS b\n";
    plan_of(src, &opts());
    let e = plan_err(
        src,
        &PlanOptions {
            target: Some("a".into()),
            ..opts()
        },
    );
    assert_eq!(e.location.as_ref().unwrap().line, 2);
    assert!(e.to_string().contains("NEED: set-NEED"), "{e}");
}

#[test]
fn graph_errors() {
    let cases: &[(&str, &str, usize)] = &[
        (
            "FROM alpine AS a\nRUN --mount=from=b,target=/b x\nFROM alpine AS b\nRUN --mount=from=a,target=/a y\n",
            "circular dependency detected between stages: b -> a -> b",
            0,
        ),
        (
            "FROM alpine AS a\nCOPY --from=b / /\nFROM alpine AS b\nRUN --mount=from=a,target=/a x\n",
            "cannot copy from stage \"b\", it needs to be defined before current stage \"a\"",
            2,
        ),
        (
            "FROM alpine\nCOPY --from=1 / /\nFROM alpine\nCOPY --from=0 / /\n",
            "--from=1 refers to the current or a later stage",
            2,
        ),
        (
            "FROM alpine AS me\nCOPY --from=me / /\n",
            "cannot use itself",
            2,
        ),
        (
            "FROM alpine\nCOPY --from=Not_An_Image / /\n",
            "\"Not_An_Image\" is not a build stage",
            2,
        ),
        (
            "FROM Alpine\n",
            "\"Alpine\" is not a build stage, a named context or a valid image reference",
            1,
        ),
        (
            "RUN x\nFROM a\n",
            "RUN is not allowed before the first FROM",
            1,
        ),
        ("ARG A\n", "has no FROM", 0),
        (
            "FROM alpine\nRUN --mount=from=$X,target=/x y\n",
            "'from' doesn't support variable expansion",
            2,
        ),
        ("FROM --platform=linux//x alpine\n", "invalid platform", 1),
    ];
    for (src, want, line) in cases {
        let e = plan_err(src, &opts());
        assert!(e.to_string().contains(want), "{src:?}: {e}");
        if *line > 0 {
            assert_eq!(
                e.location.as_ref().map(|l| l.line),
                Some(*line),
                "{src:?}: {e}"
            );
        }
    }
    let e = plan_err(
        "FROM a AS one\n",
        &PlanOptions {
            target: Some("two".into()),
            ..opts()
        },
    );
    assert!(matches!(
        e.kind,
        ErrorKind::Plan(PlanError::UnknownTarget { .. })
    ));
    assert_eq!(
        e.to_string(),
        "target stage \"two\" could not be found; stages are: one"
    );
    let e = plan_err(
        "FROM a AS build\nFROM b AS test\n",
        &PlanOptions {
            target: Some("tset".into()),
            ..opts()
        },
    );
    assert_eq!(
        e.to_string(),
        "target stage \"tset\" could not be found (did you mean test?); stages are: build, test"
    );
}

#[test]
fn named_contexts_replace_images() {
    let o = PlanOptions {
        named_contexts: BTreeMap::from([
            (
                "alpine".to_string(),
                "docker-image://alpine:edge".to_string(),
            ),
            ("src".into(), "../src".into()),
        ]),
        ..opts()
    };
    let p = plan_of("FROM alpine\nCOPY --from=src . /s\n", &o);
    assert_eq!(
        p.stages[0].base,
        Base::Context {
            name: "alpine".into(),
            source: "docker-image://alpine:edge".into()
        }
    );
    assert_eq!(
        p.stages[0].steps[0].sources,
        [SourceRef::Context {
            name: "src".into(),
            source: "../src".into()
        }]
    );
}

#[test]
fn image_env_is_used_and_missing_env_is_reported() {
    let src = "FROM python:3\nENV PATH=/venv/bin:$PATH\nCMD python\n";
    let p = plan_of(src, &opts());
    assert_eq!(values(&p), ["PATH=/venv/bin:"]);
    assert_eq!(p.stages[0].steps[0].unresolved, ["PATH"]);
    let o = PlanOptions {
        image_env: BTreeMap::from([(
            "python:3".to_string(),
            vec![("PATH".to_string(), "/usr/bin".to_string())],
        )]),
        ..opts()
    };
    let p = plan_of(src, &o);
    assert_eq!(values(&p), ["PATH=/venv/bin:/usr/bin"]);
    assert!(p.stages[0].steps[0].unresolved.is_empty());
    assert_eq!(
        p.stages[0].steps[1].instruction,
        Instruction::Cmd(CommandLine::Shell("python".into()))
    );
}

#[test]
fn copy_heredoc_is_expanded_with_stage_variables() {
    let p = plan_of(
        "FROM scratch\nARG NAME=kiln\nCOPY <<EOF <<'RAW' /\nhello $NAME\nEOF\n$NAME\nRAW\n",
        &opts(),
    );
    let Instruction::Copy(c) = &p.stages[0].steps[1].instruction else {
        panic!()
    };
    assert_eq!(
        c.sources,
        [
            Source::Heredoc {
                name: "EOF".into(),
                content: "hello kiln\n".into()
            },
            Source::Heredoc {
                name: "RAW".into(),
                content: "$NAME\n".into()
            },
        ]
    );
}

#[test]
fn plan_serializes_to_json() {
    let p = plan_of(
        "FROM alpine AS a\nRUN --mount=type=secret,id=x true\n",
        &opts(),
    );
    let v = serde_json::to_value(&p).unwrap();
    assert_eq!(v["stages"][0]["name"], "a");
    assert_eq!(v["stages"][0]["base"]["kind"], "image");
    assert_eq!(
        v["stages"][0]["steps"][0]["instruction"]["instruction"],
        "run"
    );
    assert_eq!(
        v["stages"][0]["steps"][0]["instruction"]["args"]["mounts"][0]["type"],
        "secret"
    );
}

#[test]
fn workdir_is_tracked_and_relative_mount_targets_join_it() {
    let src = "FROM scratch AS a\nWORKDIR /src\nWORKDIR app/../pkg\nRUN --mount=type=cache,target=.cache --mount=type=bind,target=/abs x\nFROM a AS child\nRUN --mount=type=tmpfs,target=tmp y\nFROM alpine\nWORKDIR rel\n";
    let p = plan_of(
        src,
        &PlanOptions {
            target: Some("a".into()),
            ..opts()
        },
    );
    let steps = &p.stages[0].steps;
    assert_eq!(steps[0].workdir.as_deref(), Some("/"));
    assert_eq!(steps[1].workdir.as_deref(), Some("/src"));
    assert_eq!(steps[2].workdir.as_deref(), Some("/src/pkg"));
    let targets: Vec<&str> = steps[2]
        .mounts()
        .iter()
        .map(|m| match m {
            Mount::Cache { target, .. } | Mount::Bind { target, .. } => target.as_str(),
            _ => "",
        })
        .collect();
    assert_eq!(targets, ["/src/pkg/.cache", "/abs"]);
    let p = plan_of(
        src,
        &PlanOptions {
            target: Some("child".into()),
            ..opts()
        },
    );
    let child = p.stage(1).unwrap();
    assert!(
        matches!(&child.steps[0].mounts()[0], Mount::Tmpfs { target, .. } if target == "/src/pkg/tmp")
    );
    // An image whose config was not given: the working directory is unknown.
    let p = plan_of(src, &opts());
    let last = p.stage(2).unwrap();
    assert_eq!(last.steps[0].workdir, None);
    let o = PlanOptions {
        image_workdir: BTreeMap::from([("alpine".to_string(), "/home".to_string())]),
        ..opts()
    };
    let p = plan_of(
        "FROM alpine\nWORKDIR rel\nRUN --mount=type=bind,target=m x\n",
        &o,
    );
    assert_eq!(p.stages[0].steps[1].workdir.as_deref(), Some("/home/rel"));
    assert!(
        matches!(&p.stages[0].steps[1].mounts()[0], Mount::Bind { target, .. } if target == "/home/rel/m")
    );
}

#[test]
fn undefined_variables_warn_only_when_everything_is_known() {
    let p = plan_of(
        "FROM scratch\nENV A=$NOPE\nFROM alpine AS other\nENV B=$MAYBE_IN_IMAGE\n",
        &PlanOptions {
            target: Some("other".into()),
            ..opts()
        },
    );
    assert!(
        p.warnings.iter().all(|w| !w.message.contains("$NOPE")),
        "stage 0 is not built"
    );
    assert!(
        p.warnings
            .iter()
            .all(|w| !w.message.contains("MAYBE_IN_IMAGE")),
        "may come from the image"
    );
    assert_eq!(p.stages[0].steps[0].unresolved, ["MAYBE_IN_IMAGE"]);
    let p = plan_of("FROM scratch\nENV A=$NOPE\n", &opts());
    assert!(p
        .warnings
        .iter()
        .any(|w| w.message == "Usage of undefined variable '$NOPE'" && w.line == Some(2)));
}

#[test]
fn arg_defaults_are_evaluated_only_without_a_build_arg() {
    let src = "ARG G=${G:?set-G}\nFROM scratch\nARG X=${X:?set-X} Y=$X-y\nENV V=$X$Y\n";
    let e = plan_err(src, &opts());
    assert!(e.to_string().contains("G: set-G"), "{e}");
    let e = plan_err(src, &with_args(&[("G", "1")]));
    assert!(e.to_string().contains("X: set-X"), "{e}");
    assert_eq!(e.location.as_ref().unwrap().line, 3);
    let p = plan_of(src, &with_args(&[("G", "1"), ("X", "x")]));
    assert_eq!(
        values(&p),
        ["V=xx-y"],
        "later defaults see earlier ARGs of the same line"
    );
    let Instruction::Arg(decls) = &p.stages[0].steps[0].instruction else {
        panic!()
    };
    assert_eq!(decls[0].default.as_deref(), Some("${X:?set-X}"));
    assert_eq!(decls[0].value.as_deref(), Some("x"));
    assert_eq!(decls[1].value.as_deref(), Some("x-y"));
}

#[test]
fn automatic_args_target_stage_and_overrides() {
    let src =
        "FROM alpine:$TARGETARCH\nARG TARGETSTAGE TARGETARCH\nENV S=$TARGETSTAGE A=$TARGETARCH\n";
    let p = plan_of(src, &opts());
    assert_eq!(
        p.stages[0].base,
        Base::Image {
            reference: "alpine:amd64".into()
        }
    );
    assert_eq!(
        values(&p),
        ["S=default A=amd64"],
        "an unnamed target is `default`"
    );
    let p = plan_of(src, &with_args(&[("TARGETARCH", "riscv64")]));
    assert_eq!(
        p.stages[0].base,
        Base::Image {
            reference: "alpine:riscv64".into()
        }
    );
    assert_eq!(values(&p), ["S=default A=riscv64"]);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn platform_of_child_and_scratch_stages() {
    let o = PlanOptions {
        target_platform: Some(Platform::parse("linux/arm64").unwrap()),
        ..opts()
    };
    let src = "FROM --platform=linux/amd64 alpine AS a\nFROM --platform=linux/s390x a AS b\nFROM --platform=linux/ppc64le scratch AS c\nCOPY --from=b / /\n";
    let p = plan_of(src, &o);
    let plat = |i: usize| p.stage(i).unwrap().platform.to_string();
    assert_eq!(plat(0), "linux/amd64");
    assert_eq!(
        plat(1),
        "linux/amd64",
        "a child stage keeps its parent's platform"
    );
    assert_eq!(
        plat(2),
        "linux/arm64",
        "FROM --platform does not apply to scratch"
    );
}

#[test]
fn default_path_for_scratch_and_images_without_one() {
    let p = plan_of("FROM scratch\nENV P=$PATH\n", &opts());
    assert_eq!(
        values(&p),
        ["P=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    );
    let o = PlanOptions {
        image_env: BTreeMap::from([(
            "busybox".to_string(),
            vec![("HOME".to_string(), "/root".to_string())],
        )]),
        ..opts()
    };
    let p = plan_of("FROM busybox\nENV P=$PATH:$HOME\n", &o);
    assert_eq!(
        values(&p),
        ["P=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/root"]
    );
}

#[test]
fn a_named_context_replaces_a_stage_of_the_same_name() {
    let o = PlanOptions {
        named_contexts: BTreeMap::from([(
            "base".to_string(),
            "docker-image://alpine:edge".to_string(),
        )]),
        ..opts()
    };
    let p = plan_of(
        "FROM alpine AS base\nRUN never\nFROM base\nCOPY --from=base / /\n",
        &o,
    );
    assert_eq!(
        p.stages.iter().map(|s| s.index).collect::<Vec<_>>(),
        [1],
        "the replaced stage is not built"
    );
    assert!(matches!(&p.stages[0].base, Base::Context { name, .. } if name == "base"));
    assert!(matches!(
        &p.stages[0].steps[0].sources[0],
        SourceRef::Context { .. }
    ));
}

#[test]
fn onbuild_triggers_run_first_in_child_stages_only() {
    let src = "\
FROM alpine AS assets
FROM alpine AS base
ONBUILD ARG MODE=debug
ONBUILD COPY --from=assets /a /a
ONBUILD RUN echo $MODE
RUN base-only
FROM base AS child
RUN child
FROM child AS grandchild
";
    let p = plan_of(src, &opts());
    assert_eq!(
        p.stages.iter().map(|s| s.index).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    let base = p.stage(1).unwrap();
    assert_eq!(
        base.deps,
        Vec::<usize>::new(),
        "a trigger is not run where it is declared"
    );
    let child = p.stage(2).unwrap();
    assert_eq!(child.deps, [0, 1]);
    let summary: Vec<(usize, bool, &str)> = child
        .steps
        .iter()
        .map(|s| (s.line, s.trigger, s.original.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (3, true, "ARG MODE=debug"),
            (4, true, "COPY --from=assets /a /a"),
            (5, true, "RUN echo $MODE"),
            (8, false, "RUN child"),
        ]
    );
    assert_eq!(
        child.steps[2].args,
        [("MODE".to_string(), "debug".to_string())]
    );
    assert!(
        p.stage(3).unwrap().steps.is_empty(),
        "grandchildren do not inherit triggers"
    );
}

#[test]
fn check_directive_skips_rules_or_makes_them_errors() {
    let body = "FROM scratch\nARG DECLARED\nENV A=$NOPE B=$DECLARED\n";
    let p = plan_of(body, &opts());
    let rules: Vec<_> = p.warnings.iter().map(|w| (w.rule, w.line)).collect();
    assert_eq!(
        rules,
        [(Some("UndefinedVar"), Some(3))],
        "a declared ARG is not undefined"
    );
    let p = plan_of(&format!("# check=skip=UndefinedVar\n{body}"), &opts());
    assert!(p.warnings.is_empty());
    let src = format!("# check=error=true\n{body}");
    let ast = parse(src.as_bytes(), "Dockerfile").unwrap();
    let p = plan(&ast, &opts()).unwrap();
    assert_eq!(p.warnings.len(), 1, "the findings are kept for the report");
    let e = p.lint_error(&ast).expect("error=true makes them an error");
    assert!(
        e.to_string()
            .starts_with("Dockerfile:4:1: lint violation found for rules: UndefinedVar"),
        "{e}"
    );
    plan_of(
        "# check=error=true\nFROM scratch\nENV A=1\n",
        &with_args(&[("UNUSED", "x")]),
    );
    let e = plan_err("# check=error=maybe\nFROM scratch\n", &opts());
    assert!(
        e.to_string()
            .contains("invalid check option \"error=maybe\""),
        "{e}"
    );
}
