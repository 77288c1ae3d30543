//! `kiln build --check` (`--call check`) and the build checks' findings
//! after a build, printed as buildx prints them: the check report on
//! standard output (each finding with its rule's page and the Dockerfile
//! lines it concerns), the short list on standard error after a build.

use std::fmt::Write;

use crate::frontend::lint;
use crate::frontend::plan::PlanWarning;

/// The report of `--check`: how many findings, then each with its rule,
/// detail and source lines (BuildKit's order: by line).
pub fn report(findings: &[PlanWarning], file: &str, source: &str) -> String {
    let mut out = String::new();
    match findings.len() {
        0 => {
            out.push_str("Check complete, no warnings found.\n");
            return out;
        }
        1 => out.push_str("Check complete, 1 warning has been found!\n"),
        n => {
            let _ = writeln!(out, "Check complete, {n} warnings have been found!");
        }
    }
    let mut sorted: Vec<&PlanWarning> = findings.iter().collect();
    sorted.sort_by_key(|w| w.line.unwrap_or(0));
    let lines: Vec<&str> = source.split('\n').collect();
    for w in sorted {
        let rule = w.rule.unwrap_or("");
        let _ = write!(out, "\nWARNING: {rule}");
        if let Some(url) = lint::url(rule) {
            let _ = write!(out, " - {url}");
        }
        let _ = writeln!(out, "\n{}", w.message);
        if let Some(start) = w.line {
            snippet(&mut out, file, &lines, start, w.end_line.unwrap_or(start));
        }
    }
    out
}

/// The lines `start..=end` of `lines` with context, marked, as BuildKit
/// prints a source range.
pub(crate) fn snippet(out: &mut String, file: &str, lines: &[&str], start: usize, end: usize) {
    if start < 1 || start > lines.len() {
        return;
    }
    let end = end.max(start).min(lines.len());
    let (first, last) = (start, end);
    let pad = if end == start { 4 } else { 2 };
    let (mut from, mut to, mut p) = (start, end, 0);
    while p < pad {
        if from > 1 {
            from -= 1;
            p += 1;
        }
        if to != lines.len() {
            to += 1;
            p += 1;
        }
        p += 1;
    }
    let _ = write!(out, "{file}:{first}\n--------------------\n");
    for i in from..=to {
        let marker = if (first..=last).contains(&i) {
            ">>>"
        } else {
            "   "
        };
        let _ = writeln!(out, " {i:>3} | {marker} {}", lines[i - 1]);
    }
    out.push_str("--------------------\n");
}

/// What buildx prints after a build: how many findings, then one line
/// each (`RULE: DETAIL (line N)`).
pub fn summary(findings: &[PlanWarning]) -> Option<String> {
    if findings.is_empty() {
        return None;
    }
    let mut sorted: Vec<&PlanWarning> = findings.iter().collect();
    sorted.sort_by_key(|w| w.line.unwrap_or(0));
    let count = match findings.len() {
        1 => "1 warning found".to_string(),
        n => format!("{n} warnings found"),
    };
    let mut out = format!("\n {count} (use --check to see each with its Dockerfile lines):\n");
    for w in sorted {
        let at = w.line.map(|l| format!(" (line {l})")).unwrap_or_default();
        let _ = writeln!(out, " - {}: {}{at}", w.rule.unwrap_or(""), w.message);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(rule: &'static str, line: usize, message: &str) -> PlanWarning {
        PlanWarning {
            line: Some(line),
            end_line: Some(line),
            rule: Some(rule),
            message: message.into(),
        }
    }

    #[test]
    fn the_report_is_buildx_s() {
        let src = "FROM scratch as base\nCOPY a b\n";
        let r = report(
            &[finding(
                "FromAsCasing",
                1,
                "'as' and 'FROM' keywords' casing do not match",
            )],
            "Dockerfile",
            src,
        );
        assert_eq!(
            r,
            "Check complete, 1 warning has been found!\n\nWARNING: FromAsCasing - https://docs.docker.com/go/dockerfile/rule/from-as-casing/\n'as' and 'FROM' keywords' casing do not match\nDockerfile:1\n--------------------\n   1 | >>> FROM scratch as base\n   2 |     COPY a b\n   3 |     \n--------------------\n"
        );
        assert_eq!(
            report(&[], "Dockerfile", src),
            "Check complete, no warnings found.\n"
        );
    }

    #[test]
    fn the_summary_lists_rule_detail_and_line() {
        let s = summary(&[
            finding("UndefinedVar", 4, "Usage of undefined variable '$foo'"),
            finding("StageNameCasing", 2, "Stage name 'A' should be lowercase"),
        ])
        .unwrap();
        assert!(s.contains(" 2 warnings found"), "{s}");
        let a = s
            .find(" - StageNameCasing: Stage name 'A' should be lowercase (line 2)")
            .unwrap();
        let b = s
            .find(" - UndefinedVar: Usage of undefined variable '$foo' (line 4)")
            .unwrap();
        assert!(a < b);
        assert!(summary(&[]).is_none());
    }
}
