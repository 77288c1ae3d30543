//! BuildKit's own parser and word-expansion cases, read from
//! `../shared/conformance/buildkit` beside the repository.

use std::fs;
use std::path::{Path, PathBuf};

use kiln_builder::frontend::parser;
use kiln_builder::frontend::shell::Lexer;

fn root() -> PathBuf {
    let p = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/conformance/buildkit"
    ));
    assert!(
        p.is_dir(),
        "BuildKit conformance data not found: looked in {} (shared/ must sit beside the repository)",
        p.display()
    );
    p.to_path_buf()
}

fn dirs(p: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

#[test]
fn parser_testfiles_dump_matches_result() {
    let cases = dirs(&root().join("parser/testfiles"));
    let mut failures = Vec::new();
    for case in &cases {
        let df = fs::read(case.join("Dockerfile")).unwrap();
        let want = fs::read_to_string(case.join("result")).unwrap();
        match parser::parse(&df, "Dockerfile") {
            Ok(ast) if ast.dump() == want => {}
            Ok(ast) => failures.push(format!(
                "{}:\n--- want\n{want}--- got\n{}",
                case.display(),
                ast.dump()
            )),
            Err(e) => failures.push(format!("{}: {e}", case.display())),
        }
    }
    println!(
        "parser/testfiles: {}/{} pass",
        cases.len() - failures.len(),
        cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        cases.len() >= 30,
        "expected BuildKit's ~33 cases, found {}",
        cases.len()
    );
}

#[test]
fn parser_testfiles_negative_are_rejected() {
    let cases = dirs(&root().join("parser/testfiles-negative"));
    let mut accepted = Vec::new();
    for case in &cases {
        let df = fs::read(case.join("Dockerfile")).unwrap();
        if parser::parse(&df, "Dockerfile").is_ok() {
            accepted.push(case.display().to_string());
        }
    }
    println!(
        "parser/testfiles-negative: {}/{} rejected",
        cases.len() - accepted.len(),
        cases.len()
    );
    assert!(accepted.is_empty(), "accepted: {accepted:?}");
    assert!(!cases.is_empty());
}

#[test]
fn parser_testfile_line_numbers() {
    let df = fs::read(root().join("parser/testfile-line/Dockerfile")).unwrap();
    let ast = parser::parse(&df, "Dockerfile").unwrap();
    let lines: Vec<(usize, usize)> = ast
        .nodes
        .iter()
        .map(|n| (n.start_line, n.end_line))
        .collect();
    // The ranges BuildKit's TestParseLineNumber asserts for this file.
    assert_eq!(lines, [(5, 5), (11, 12), (17, 31)]);
}

fn env_list(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn shell_env_var_test() {
    let text = fs::read_to_string(root().join("shell/envVarTest")).unwrap();
    let env = env_list(&[
        ("PWD", "/home"),
        ("SHELL", "bash"),
        ("KOREAN", "한국어"),
        ("NULL", ""),
    ]);
    let lex = Lexer::new('\\');
    let (mut total, mut failures) = (0, Vec::new());
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split('|').collect();
        assert_eq!(f.len(), 3, "envVarTest line {}: {line}", n + 1);
        let (platform, input, want) = (f[0].trim(), f[1].trim(), f[2].trim());
        if platform != "A" && platform != "U" {
            continue;
        }
        total += 1;
        let got = lex.process_word(input, &env);
        let ok = match (&got, want) {
            (Err(_), "error") => true,
            (Ok(g), w) => g == w,
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "line {}: {input:?}: want {want:?}, got {got:?}",
                n + 1
            ));
        }
    }
    println!("shell/envVarTest: {}/{total} pass", total - failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(total > 200);
}

#[test]
fn shell_words_test() {
    let text = fs::read_to_string(root().join("shell/wordsTest")).unwrap();
    let mut env: Vec<(String, String)> = Vec::new();
    let lex = Lexer::new('\\');
    let (mut total, mut failures) = (0, Vec::new());
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') {
            continue;
        }
        if let Some(kv) = line.strip_prefix("ENV ") {
            let kv = kv.trim_start_matches(' ');
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            env.push((k.to_string(), v.to_string()));
            continue;
        }
        let Some((input, want)) = line.split_once('|') else {
            continue;
        };
        total += 1;
        let want: Vec<&str> = want.trim_start_matches(' ').split(',').collect();
        let got = lex.process_words(input.trim(), &env);
        let ok = match (&got, want.as_slice()) {
            (Err(_), ["error"]) => true,
            (Ok(g), w) => g.iter().map(String::as_str).eq(w.iter().copied()),
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "line {}: {input:?}: want {want:?}, got {got:?}",
                n + 1
            ));
        }
    }
    println!("shell/wordsTest: {}/{total} pass", total - failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(total > 20);
}
