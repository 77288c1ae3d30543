//! A corpus of tricky real-world-style Dockerfiles (tests/corpus/NAME/),
//! each with an `expect` file of checks on its plan:
//!
//! - `platform = P`, `target = T`, `build-arg = K=V`, `image-env = REF K=V`:
//!   plan options;
//! - `stages = 0 2 1`: Dockerfile indexes of the planned stages, in order;
//! - `contains = TEXT`: the plan's compact JSON contains TEXT;
//! - `warning = TEXT`: some warning contains TEXT;
//! - `error = TEXT`: planning fails with a message containing TEXT.

use std::fs;
use std::path::Path;

use kiln_builder::frontend::{parse, plan, PlanOptions, Platform};

#[test]
fn corpus() {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus"));
    let mut cases: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cases.sort();
    assert!(cases.len() >= 8, "corpus went missing: {}", dir.display());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let src = fs::read(case.join("Dockerfile")).unwrap();
        let expect = fs::read_to_string(case.join("expect")).unwrap();
        let mut opts = PlanOptions {
            build_platform: Platform::parse("linux/amd64").unwrap(),
            ..PlanOptions::default()
        };
        let mut checks = Vec::new();
        for line in expect.lines().filter(|l| !l.trim().is_empty()) {
            let (k, v) = line
                .split_once(" = ")
                .unwrap_or_else(|| panic!("{name}: bad expect line {line:?}"));
            match k {
                "platform" => opts.target_platform = Some(Platform::parse(v).unwrap()),
                "target" => opts.target = Some(v.to_string()),
                "build-arg" => {
                    let (a, b) = v.split_once('=').unwrap();
                    opts.build_args.insert(a.into(), b.into());
                }
                "image-env" => {
                    let (r, kv) = v.split_once(' ').unwrap();
                    let (a, b) = kv.split_once('=').unwrap();
                    opts.image_env
                        .entry(r.to_string())
                        .or_default()
                        .push((a.into(), b.into()));
                }
                _ => checks.push((k.to_string(), v.to_string())),
            }
        }
        let ast = match parse(&src, &format!("{name}/Dockerfile")) {
            Ok(a) => a,
            Err(e) => {
                failures.push(format!("{name}: parse failed: {e}"));
                continue;
            }
        };
        let result = plan(&ast, &opts);
        for (k, v) in &checks {
            let ok = match (k.as_str(), &result) {
                ("error", Err(e)) => e.to_string().contains(v.as_str()),
                ("error", Ok(_)) => false,
                (_, Err(e)) => {
                    failures.push(format!("{name}: plan failed: {e}"));
                    break;
                }
                ("stages", Ok(p)) => {
                    let got: Vec<String> = p.stages.iter().map(|s| s.index.to_string()).collect();
                    got.join(" ") == *v
                }
                ("contains", Ok(p)) => serde_json::to_string(p).unwrap().contains(v.as_str()),
                ("warning", Ok(p)) => p.warnings.iter().any(|w| w.message.contains(v.as_str())),
                (other, _) => panic!("{name}: unknown check {other}"),
            };
            if !ok {
                let got = match &result {
                    Ok(p) => serde_json::to_string(p).unwrap(),
                    Err(e) => e.to_string(),
                };
                failures.push(format!("{name}: {k} = {v}\n  plan: {got}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
