//! SOURCE_DATE_EPOCH as BuildKit resolves it: a number of seconds; or
//! `context`, the time of the build context; or the name of a named
//! context or of a source-only stage (FROM scratch, ARGs and one ADD of a
//! URL or git repository), the time of that source. A source's time is
//! its commit's committer time, its Last-Modified header, or the newest
//! file of the archive it is; a local directory has none, and the epoch
//! is then unset.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};

use crate::frontend::instructions::{self, Expander, Instruction, Source};
use crate::frontend::parser::Ast;

/// The times of the sources fetched before the build.
#[derive(Default)]
pub struct SourceTimes {
    /// the build context's (None for a local directory)
    pub context: Option<i64>,
    /// each `--build-context NAME=...`'s (None for a directory or image)
    pub named: BTreeMap<String, Option<i64>>,
}

/// Resolve `value` (the SOURCE_DATE_EPOCH build arg, environment variable
/// or Dockerfile default) for the Dockerfile at `dockerfile`; a stage's
/// source is fetched with `remote`. None: the build has no epoch.
pub fn resolve(
    value: &str,
    times: &SourceTimes,
    dockerfile: &Path,
    build_args: &BTreeMap<String, String>,
    remote: &super::context_input::Remote<'_>,
) -> anyhow::Result<Option<i64>> {
    if value.is_empty() {
        return Ok(None);
    }
    if let Ok(n) = value.parse::<i64>() {
        return Ok(Some(n));
    }
    if value == "context" {
        return Ok(times.context);
    }
    if let Some(t) = times.named.get(value) {
        return Ok(*t);
    }
    let text = std::fs::read(dockerfile).with_context(|| dockerfile.display().to_string())?;
    let file = dockerfile
        .file_name()
        .map_or_else(|| "Dockerfile".into(), |f| f.to_string_lossy().into_owned());
    let ast = crate::frontend::parse(&text, &file)?;
    let Some(url) = stage_source(&ast, value, build_args)
        .with_context(|| format!("SOURCE_DATE_EPOCH stage {value}"))?
    else {
        bail!(
            "SOURCE_DATE_EPOCH {value:?} is not a number of seconds, `context`, a named context or a stage"
        );
    };
    remote.time_of(
        &url,
        &format!("the source of SOURCE_DATE_EPOCH stage {value} ({url})"),
    )
}

/// The URL a source-only stage named `name` adds; None when no stage has
/// that name, an error when the stage is not source-only.
fn stage_source(
    ast: &Ast,
    name: &str,
    build_args: &BTreeMap<String, String>,
) -> anyhow::Result<Option<String>> {
    let Some(first_from) = ast.nodes.iter().position(|n| n.instruction == "from") else {
        return Ok(None);
    };
    // the global ARGs without SOURCE_DATE_EPOCH, as BuildKit expands the stage
    let mut globals = crate::frontend::outline::global_values(ast, build_args);
    globals.remove("SOURCE_DATE_EPOCH");
    let stages = crate::frontend::plan::split_stages(&ast.nodes, first_from);
    let Some(nodes) = stages.into_iter().find(|nodes| {
        matches!(nodes[0].args.as_slice(), [_, kw, n] if kw.eq_ignore_ascii_case("as") && n.eq_ignore_ascii_case(name))
    }) else {
        return Ok(None);
    };
    let mut env = globals;
    let mut ex = Expander::new(ast.escape, &env);
    let from = match instructions::check(&nodes[0], &mut ex) {
        Ok(Instruction::From(f)) => f,
        _ => bail!("its FROM does not parse"),
    };
    if from.image != "scratch" {
        bail!("a SOURCE_DATE_EPOCH stage must use FROM scratch");
    }
    let mut url = None;
    for node in &nodes[1..] {
        let mut ex = Expander::new(ast.escape, &env);
        let ins = instructions::check(node, &mut ex)
            .map_err(|e| anyhow::anyhow!("line {}: {}", node.start_line, e.kind))?;
        match ins {
            Instruction::Arg(decls) => {
                for d in decls {
                    let v = match (build_args.get(&d.key), &d.default) {
                        (Some(v), _) => v.clone(),
                        (None, Some(raw)) => Expander::new(ast.escape, &env)
                            .word(raw)
                            .map_err(|e| anyhow::anyhow!("line {}: {e}", node.start_line))?,
                        (None, None) => continue,
                    };
                    env.insert(d.key, v);
                }
            }
            Instruction::Add(add) if url.is_none() => match add.sources.as_slice() {
                [Source::Path(p)] if instructions::is_remote(p) => url = Some(p.clone()),
                _ => bail!(
                    "line {}: a SOURCE_DATE_EPOCH stage must ADD exactly one HTTP(S) URL or git repository",
                    node.start_line
                ),
            },
            Instruction::Add(_) => bail!(
                "line {}: a SOURCE_DATE_EPOCH stage must contain exactly one ADD",
                node.start_line
            ),
            _ => bail!(
                "line {}: a SOURCE_DATE_EPOCH stage does not meet source-only requirements: {} is not ARG or ADD",
                node.start_line,
                node.instruction.to_uppercase()
            ),
        }
    }
    url.map(Some)
        .ok_or_else(|| anyhow::anyhow!("a SOURCE_DATE_EPOCH stage must contain exactly one ADD"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(df: &str, name: &str) -> anyhow::Result<Option<String>> {
        let ast = crate::frontend::parse(df.as_bytes(), "Dockerfile").unwrap();
        stage_source(&ast, name, &BTreeMap::new())
    }

    #[test]
    fn a_source_only_stage_gives_its_url_expanded() {
        let df = "ARG HOST=example.com\nARG SOURCE_DATE_EPOCH=src\nFROM scratch AS Src\nARG F=a.tar\nADD https://${HOST}/${F} /\nFROM scratch\n";
        assert_eq!(
            source(df, "src").unwrap().as_deref(),
            Some("https://example.com/a.tar")
        );
        assert_eq!(source(df, "other").unwrap(), None);
    }

    #[test]
    fn a_stage_that_is_not_source_only_is_an_error_naming_why() {
        let e = source("FROM busybox AS s\nADD https://h/a /\n", "s").unwrap_err();
        assert!(e.to_string().contains("FROM scratch"), "{e}");
        let e = source("FROM scratch AS s\nCOPY a /\n", "s").unwrap_err();
        assert!(e.to_string().contains("COPY is not ARG or ADD"), "{e}");
        let e = source("FROM scratch AS s\nADD a /\n", "s").unwrap_err();
        assert!(e.to_string().contains("exactly one HTTP(S) URL"), "{e}");
        let e = source("FROM scratch AS s\nARG X=1\n", "s").unwrap_err();
        assert!(e.to_string().contains("exactly one ADD"), "{e}");
    }
}
