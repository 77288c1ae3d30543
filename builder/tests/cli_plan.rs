//! `kiln debug plan` end to end: the binary prints the plan as JSON, and a
//! broken Dockerfile gives a located error and a failing exit status.

use std::process::Command;

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

#[test]
fn prints_the_plan_as_json() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        "ARG BASE=alpine\nFROM $BASE AS deps\nRUN echo\nFROM scratch AS unused\nFROM busybox\nCOPY --from=deps / /\n",
    )
    .unwrap();
    std::fs::write(dir.path().join(".dockerignore"), "*.log\n").unwrap();
    let out = kiln()
        .args([
            "debug",
            "plan",
            "--build-arg",
            "BASE=debian",
            "--build-arg",
            "EXTRA=1",
            "--platform",
            "linux/arm64",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stages = v["plan"]["stages"].as_array().unwrap();
    let idx: Vec<u64> = stages
        .iter()
        .map(|s| s["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, [0, 2]);
    assert_eq!(stages[0]["base"]["reference"], "debian");
    assert_eq!(stages[1]["deps"], serde_json::json!([0]));
    assert_eq!(stages[1]["platform"]["architecture"], "arm64");
    assert_eq!(v["dockerignore"], serde_json::json!(["*.log"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("[EXTRA] were not consumed"), "{stderr}");
}

#[test]
fn reads_stdin_and_reports_errors_with_a_caret() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = kiln()
        .args(["debug", "plan", "-f", "-", "--target", "nope"])
        .arg(dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"FROM alpine AS a\nCOPY --bogus x y\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("target stage \"nope\" could not be found; stages are: a"),
        "{stderr}"
    );

    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM alpine\nCOPY --bogus x y\n",
    )
    .unwrap();
    let out = kiln()
        .args(["debug", "plan"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Dockerfile:2:6: unknown flag: --bogus for COPY"),
        "{stderr}"
    );
    assert!(
        stderr.contains("2 | COPY --bogus x y\n  |      ^"),
        "{stderr}"
    );
}

#[test]
fn syntax_tree_flag_prints_the_buildkit_dump() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM a\nCOPY --from=b x y\nFROB\n",
    )
    .unwrap();
    let out = kiln()
        .args(["debug", "plan", "--syntax-tree"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "(from \"a\")\n(copy [\"--from=b\"] \"x\" \"y\")\n(frob \"\")\n"
    );
}
