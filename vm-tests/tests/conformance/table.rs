//! The README table of the BuildKit conformance suite: per BuildKit test
//! file, how many cases are translated, pass, fail, are not applicable or
//! pending, and why.

use super::case::Status;
use std::collections::BTreeMap;

/// How one case ended.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Outcome {
    Pass,
    Fail(String),
    NotRun,
}

/// A case in the table: its name, status, reason and how it ended.
pub type CaseRow = (String, Status, String, Outcome);

pub struct Row {
    pub file: String,
    /// BuildKit test functions in the Go file.
    pub go_tests: usize,
    /// Go test functions with no case.
    pub untranslated: Vec<String>,
    /// (case, status, reason, outcome)
    pub cases: Vec<CaseRow>,
}

pub const BEGIN: &str =
    "<!-- buildkit-conformance:begin (made by vm-tests/tests/conformance_buildkit.rs) -->";
pub const END: &str = "<!-- buildkit-conformance:end -->";

pub fn render(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(BEGIN);
    s.push('\n');
    s.push_str("| BuildKit test file | tests | cases | pass | fail | n/a | pending |\n");
    s.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    let mut tot = [0usize; 6];
    let mut reasons: BTreeMap<(&str, String), Vec<String>> = BTreeMap::new();
    for r in rows {
        let count = |f: &dyn Fn(&CaseRow) -> bool| r.cases.iter().filter(|c| f(c)).count();
        let pass = count(&|c| c.3 == Outcome::Pass);
        let fail = count(&|c| matches!(c.3, Outcome::Fail(_)));
        let na = count(&|c| c.1 == Status::Na);
        let pending = count(&|c| c.1 == Status::Pending);
        let row = [r.go_tests, r.cases.len(), pass, fail, na, pending];
        for (t, v) in tot.iter_mut().zip(row) {
            *t += v;
        }
        s.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} | {} |\n",
            r.file, row[0], row[1], row[2], row[3], row[4], row[5]
        ));
        for (name, status, reason, outcome) in &r.cases {
            let kind = match (status, outcome) {
                (Status::Na, _) => "Not applicable",
                (Status::Pending, _) => "Pending",
                (Status::Differs, _) => {
                    "Differs from BuildKit on purpose (the case asserts kiln's behaviour)"
                }
                (_, Outcome::Fail(_)) => "Failing",
                _ => continue,
            };
            let why = if reason.is_empty() {
                "(no reason given)".to_string()
            } else {
                reason.clone()
            };
            reasons
                .entry((kind, why))
                .or_default()
                .push(format!("`{name}`"));
        }
    }
    s.push_str(&format!(
        "| **all** | {} | {} | {} | {} | {} | {} |\n",
        tot[0], tot[1], tot[2], tot[3], tot[4], tot[5]
    ));
    let applicable = tot[1] - tot[4];
    s.push_str(&format!(
        "\n{applicable} of {} cases ({}%) are applicable (everything but n/a); {} of them pass.\n",
        tot[1],
        (applicable * 100).checked_div(tot[1]).unwrap_or(0),
        tot[2]
    ));
    let mut last = "";
    for ((kind, why), names) in &reasons {
        if *kind != last {
            s.push_str(&format!("\n{kind}:\n"));
            last = kind;
        }
        s.push_str(&format!(
            "- {why} ({}): {}\n",
            names.len(),
            names.join(", ")
        ));
    }
    let untranslated: Vec<String> = rows
        .iter()
        .flat_map(|r| r.untranslated.iter().map(move |t| format!("`{}`", t)))
        .collect();
    if !untranslated.is_empty() {
        s.push_str(&format!(
            "\nNot yet translated ({}): {}\n",
            untranslated.len(),
            untranslated.join(", ")
        ));
    }
    s.push_str(END);
    s.push('\n');
    s
}

/// `readme` with its table replaced by `table` (appended to the
/// conformance section when it has none yet).
pub fn splice(readme: &str, table: &str) -> Option<String> {
    let b = readme.find(BEGIN)?;
    let e = readme[b..].find(END)? + b + END.len();
    let e = if readme[e..].starts_with('\n') {
        e + 1
    } else {
        e
    };
    Some(format!("{}{}{}", &readme[..b], table, &readme[e..]))
}
