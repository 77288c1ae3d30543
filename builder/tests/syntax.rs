//! The raw syntax layer on tricky inputs: each Dockerfile must dump to the
//! given BuildKit-format tree, or be rejected with the given message.

use kiln_builder::frontend::parser::parse;

const DUMPS: &[(&str, &str)] = &[
    // Instruction names are case-insensitive; the dump is lower-case.
    ("from Alpine\nRuN echo", "(from \"Alpine\")\n(run \"echo\")\n"),
    // Backtick escape from the directive, continuation with it.
    ("# escape=`\nFROM a\nRUN dir c:\\ `\n  && echo", "(from \"a\")\n(run \"dir c:\\\\   && echo\")\n"),
    // A directive after a comment is just a comment.
    ("# hello\n# escape=`\nFROM a\nRUN a \\\n b", "(from \"a\")\n(run \"a  b\")\n"),
    // A directive after a blank line is a comment too.
    ("\n# escape=`\nFROM a\nRUN a \\\n b", "(from \"a\")\n(run \"a  b\")\n"),
    // Comment lines and blank lines inside a continuation are dropped.
    ("FROM a\nRUN a \\\n# note\n\n  b", "(from \"a\")\n(run \"a   b\")\n"),
    // CRLF line endings.
    ("FROM a\r\nRUN a \\\r\n  b\r\n", "(from \"a\")\n(run \"a   b\")\n"),
    // A BOM at the start is ignored.
    ("\u{feff}FROM a", "(from \"a\")\n"),
    // Leading whitespace before instructions.
    ("   FROM a\n\t\tRUN x", "(from \"a\")\n(run \"x\")\n"),
    // Flags: quoted values, `--` ends flags.
    ("FROM a\nCOPY --chown=\"a b\" --from='x' -- --notaflag /d", "(from \"a\")\n(copy [\"--chown=a b\" \"--from=x\"] \"--notaflag\" \"/d\")\n"),
    // JSON that is not a string array of the right shape falls back to shell form.
    ("FROM a\nCMD [\"a\" \"b\"]", "(from \"a\")\n(cmd \"[\\\"a\\\" \\\"b\\\"]\")\n"),
    ("FROM a\nCMD [\"a\"] trailing", "(from \"a\")\n(cmd \"[\\\"a\\\"] trailing\")\n"),
    // Heredocs are not part of the dump; the next instruction follows them.
    ("FROM a\nRUN <<EOF\nFROM not-an-instruction\nEOF\nRUN b", "(from \"a\")\n(run \"<<EOF\")\n(run \"b\")\n"),
    ("FROM a\nCOPY <<-X <<Y /d/\n\tx\n\tX\ny\nY\nRUN z", "(from \"a\")\n(copy \"<<-X\" \"<<Y\" \"/d/\")\n(run \"z\")\n"),
    // A heredoc in an ONBUILD trigger.
    ("FROM a\nONBUILD RUN <<E\nhi\nE\nRUN x", "(from \"a\")\n(onbuild (run \"<<E\"))\n(run \"x\")\n"),
    // `<<` inside quotes is not a heredoc.
    ("FROM a\nRUN echo '<<EOF'\nRUN b", "(from \"a\")\n(run \"echo '<<EOF'\")\n(run \"b\")\n"),
    // ENV/LABEL triples, ARG words, EXPOSE list.
    ("FROM a\nENV a=b c=\"d e\"\nLABEL x y z\nARG p q=r\nEXPOSE 1 2/udp",
     "(from \"a\")\n(env \"a\" \"b\" \"=\" \"c\" \"\\\"d e\\\"\" \"=\")\n(label \"x\" \"y z\" \"\")\n(arg \"p\" \"q=r\")\n(expose \"1\" \"2/udp\")\n"),
    // Healthcheck forms.
    ("FROM a\nHEALTHCHECK NONE\nHEALTHCHECK --retries=1 CMD [\"x\"]",
     "(from \"a\")\n(healthcheck \"NONE\")\n(healthcheck [\"--retries=1\"] \"CMD\" \"x\")\n"),
    // Unknown instructions parse (the checker rejects them).
    ("FROM a\nFROB x y", "(from \"a\")\n(frob \"\")\n"),
    // Non-ASCII and control characters are quoted like Go's %q.
    ("FROM a\nLABEL k=\"☃\u{1}\"", "(from \"a\")\n(label \"k\" \"\\\"☃\\x01\\\"\" \"=\")\n"),
];

const REJECTED: &[(&str, &str)] = &[
    ("", "file with no instructions"),
    ("# only\n\n# comments\n", "file with no instructions"),
    ("FROM a\nENV X", "ENV must have two arguments"),
    ("FROM a\nLABEL X", "LABEL must have two arguments"),
    ("FROM a\nENV a=b c", "can't find = in \"c\""),
    (
        "FROM a\nCMD [\"a\", {\"b\": 1}]",
        "arrays must be comprised of strings only",
    ),
    ("# escape=x\nFROM a", "invalid escape token 'x'"),
    (
        "# syntax=a\n# SYNTAX=b\nFROM a",
        "only one syntax parser directive",
    ),
    (
        "FROM a\nRUN <<EOF\nno end\n",
        "unterminated heredoc \"EOF\"",
    ),
];

#[test]
fn dumps() {
    let mut failures = Vec::new();
    for (src, want) in DUMPS {
        match parse(src.as_bytes(), "Dockerfile") {
            Ok(ast) if ast.dump() == *want => {}
            Ok(ast) => failures.push(format!("{src:?}\n  want {want:?}\n   got {:?}", ast.dump())),
            Err(e) => failures.push(format!("{src:?}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn rejections_name_the_problem() {
    for (src, want) in REJECTED {
        match parse(src.as_bytes(), "Dockerfile") {
            Ok(ast) => panic!("{src:?} was accepted: {}", ast.dump()),
            Err(e) => assert!(e.to_string().contains(want), "{src:?}: {e}"),
        }
    }
}

#[test]
fn error_renders_like_a_compiler() {
    let e = parse(b"FROM a\n\nENV PATH\n", "app/Dockerfile").unwrap_err();
    assert_eq!(
        e.to_string(),
        "app/Dockerfile:3:1: ENV must have two arguments; write `ENV name=value`\n  |\n3 | ENV PATH\n  | ^"
    );
}

#[test]
fn line_ranges_cover_continuations_and_heredocs() {
    let ast = parse(
        b"FROM a\nRUN a \\\n  b \\\n  c\nCOPY <<EOF /x\n1\n2\nEOF\nUSER me\n",
        "D",
    )
    .unwrap();
    let r: Vec<_> = ast
        .nodes
        .iter()
        .map(|n| (n.start_line, n.end_line))
        .collect();
    assert_eq!(r, [(1, 1), (2, 4), (5, 8), (9, 9)]);
    assert_eq!(ast.nodes[2].heredocs[0].content, "1\n2\n");
}
