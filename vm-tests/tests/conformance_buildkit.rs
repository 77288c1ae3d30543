//! BuildKit's Dockerfile integration tests (`../shared/conformance/
//! buildkit/integration/*_test.go`), translated into kiln's own case
//! files under `vm-tests/conformance/buildkit/`, built with the real
//! `kiln` binary as the unprivileged test user and checked.
//!
//! `KILN_CONFORMANCE=FILE[:CASE]` runs one file (its stem, e.g.
//! `dockerfile_add`) or one case; `KILN_CONFORMANCE_JOBS` sets how many
//! cases build at once (default 2); `KILN_CONFORMANCE_UPDATE=1` writes
//! the table into README.md instead of failing when it is stale.

mod conformance;

use conformance::case::{self, Case, Status, Suite};
use conformance::run::{run_case, Place};
use conformance::table::{self, Outcome, Row};
use kiln_vm_tests::{busybox_rootfs, give_to_test_user, kiln, missing_prerequisite, test_dir};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn go_tests_dir() -> PathBuf {
    repo().join("../shared/conformance/buildkit/integration")
}

/// The `testXxx(t, sb)` functions of one Go test file.
fn go_tests(file: &Path) -> Vec<String> {
    let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    text.lines()
        .filter_map(|l| l.strip_prefix("func test"))
        .filter(|l| l.contains("(t *testing.T, sb integration.Sandbox)"))
        .map(|l| format!("test{}", &l[..l.find('(').unwrap()]))
        .collect()
}

fn suites() -> Vec<(String, Suite)> {
    let dir = repo().join("vm-tests/conformance/buildkit");
    let mut out = Vec::new();
    for e in fs::read_dir(&dir).expect("conformance dir") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "toml") {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            out.push((stem, case::load(&p).unwrap_or_else(|e| panic!("{e}"))));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The shared state directory, with the base images the cases name:
/// `busybox` (also as `busybox:stable`) and `alpine`, both a tree of
/// Debian's busybox-static, since no container registry is reachable,
/// with the busybox image's /etc/passwd and /etc/group and shell scripts
/// for the `adduser` and `addgroup` applets Debian's build lacks
/// (`vm-tests/conformance/base/`).
fn shared_state(dir: &Path) -> PathBuf {
    let rootfs = dir.join("busybox-rootfs");
    busybox_rootfs(&rootfs);
    let base = repo().join("vm-tests/conformance/base");
    for (f, to) in [
        ("passwd", "etc/passwd"),
        ("group", "etc/group"),
        ("adduser", "bin/adduser"),
        ("addgroup", "bin/addgroup"),
    ] {
        let dst = rootfs.join(to);
        let _ = fs::remove_file(&dst);
        fs::copy(base.join(f), &dst).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    fs::remove_dir_all(rootfs.join("home/user")).expect("no /home/user");
    give_to_test_user(dir);
    let state = dir.join("state");
    import_bases(&state, &rootfs);
    state
}

fn import_bases(state: &Path, rootfs: &Path) {
    let mut args = vec![
        "--root".to_string(),
        state.display().to_string(),
        "import".into(),
        rootfs.display().to_string(),
    ];
    for t in [
        "busybox:latest",
        "busybox:stable",
        "busybox:glibc",
        "alpine:latest",
    ] {
        args.push("-t".into());
        args.push(t.into());
    }
    let out = kiln(&args).output().expect("run kiln import");
    assert!(
        out.status.success(),
        "kiln import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether a case names `@REGISTRY@` anywhere.
fn uses_registry(c: &Case) -> bool {
    std::iter::once(&c.first).chain(&c.then).any(|b| {
        b.args
            .iter()
            .chain(&b.env)
            .chain(b.dockerfile.iter())
            .chain(b.setup.iter())
            .any(|s| s.contains("@REGISTRY@"))
    })
}

/// Debian's docker-registry on 127.0.0.1 (plain HTTP), run as the test
/// user for the cases that push and pull; killed on drop.
struct Registry {
    child: Child,
    host: String,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let rdir = dir.join("registry");
        fs::create_dir_all(rdir.join("data")).unwrap();
        let config = rdir.join("registry.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                rdir.join("data").display()
            ),
        )
        .unwrap();
        give_to_test_user(&rdir);
        let child = kiln_vm_tests::spawn_registry(&config, port);
        Registry {
            child,
            host: format!("127.0.0.1:{port}"),
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn buildkit_dockerfile_integration_tests() {
    if !go_tests_dir().is_dir() {
        missing_prerequisite(&format!("{} is missing", go_tests_dir().display()));
        return;
    }
    let filter = std::env::var("KILN_CONFORMANCE").ok();
    let (file_filter, case_filter) = match &filter {
        Some(f) => match f.split_once(':') {
            Some((a, b)) => (Some(a.to_string()), Some(b.to_string())),
            None => (Some(f.clone()), None),
        },
        None => (None, None),
    };
    let suites: Vec<(String, Suite)> = suites()
        .into_iter()
        .filter(|(stem, _)| file_filter.as_ref().is_none_or(|f| f == stem))
        .collect();
    let dir = test_dir("bk-conformance");
    let state = shared_state(&dir);
    let mut jobs: Vec<(usize, usize, &Case)> = Vec::new();
    for (si, (_, s)) in suites.iter().enumerate() {
        for (ci, c) in s.cases.iter().enumerate() {
            if case_filter.as_ref().is_some_and(|f| *f != c.name) {
                continue;
            }
            if matches!(c.status, Status::Run | Status::Differs | Status::Fails) {
                jobs.push((si, ci, c));
            }
        }
    }
    let outcomes: Mutex<Vec<Vec<Outcome>>> = Mutex::new(
        suites
            .iter()
            .map(|(_, s)| vec![Outcome::NotRun; s.cases.len()])
            .collect(),
    );
    let next = AtomicUsize::new(0);
    let registry: OnceLock<Registry> = OnceLock::new();
    let workers: usize = std::env::var("KILN_CONFORMANCE_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    std::thread::scope(|scope| {
        for _ in 0..workers.max(1) {
            scope.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                let Some(&(si, ci, c)) = jobs.get(n) else {
                    break;
                };
                let case_dir = dir.join(format!("{}-{ci}", suites[si].0));
                fs::create_dir_all(&case_dir).expect("case dir");
                let mut place = Place {
                    http: String::new(),
                    registry: if uses_registry(c) {
                        registry.get_or_init(|| Registry::start(&dir)).host.clone()
                    } else {
                        String::new()
                    },
                    state: if c.own_state {
                        case_dir.join("state")
                    } else {
                        state.clone()
                    },
                    dir: case_dir,
                };
                if c.own_state {
                    give_to_test_user(&place.dir);
                    import_bases(&place.state, &dir.join("busybox-rootfs"));
                }
                let outcome = match run_case(c, &mut place) {
                    Ok(()) => Outcome::Pass,
                    Err(e) => Outcome::Fail(e),
                };
                match &outcome {
                    Outcome::Fail(e) => {
                        let short: String = e.chars().take(1500).collect();
                        eprintln!(
                            "FAIL {}:{} ({:?})\n  {}",
                            suites[si].0,
                            c.name,
                            c.status,
                            short.replace('\n', "\n  ")
                        );
                    }
                    _ => eprintln!("pass {}:{}", suites[si].0, c.name),
                }
                outcomes.lock().unwrap()[si][ci] = outcome;
            });
        }
    });
    let outcomes = outcomes.into_inner().unwrap();
    let mut errors = Vec::new();
    for ((stem, s), outs) in suites.iter().zip(&outcomes) {
        for (c, o) in s.cases.iter().zip(outs) {
            match (c.status, o) {
                (Status::Fails, Outcome::Pass) => errors.push(format!(
                    "{stem}:{} passes now: set its status to run (it was marked fails: {})",
                    c.name, c.reason
                )),
                (Status::Run | Status::Differs, Outcome::Fail(e)) => {
                    errors.push(format!("{stem}:{} failed: {e}", c.name));
                }
                _ => {}
            }
        }
    }
    if filter.is_none() {
        check_table(&suites, &outcomes, &mut errors);
    }
    assert!(
        errors.is_empty(),
        "{} problems:\n\n{}",
        errors.len(),
        errors.join("\n\n")
    );
}

/// Every Go test translated, and README's table as this run found it.
fn check_table(suites: &[(String, Suite)], outcomes: &[Vec<Outcome>], errors: &mut Vec<String>) {
    let mut go_files: Vec<PathBuf> = fs::read_dir(go_tests_dir())
        .expect("go tests")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with("_test.go"))
        .collect();
    go_files.sort();
    let mut rows = Vec::new();
    for gf in go_files {
        let name = gf.file_name().unwrap().to_string_lossy().into_owned();
        let tests = go_tests(&gf);
        if tests.is_empty() {
            continue;
        }
        let found = suites
            .iter()
            .zip(outcomes)
            .find(|((_, s), _)| s.source == name);
        let (cases, untranslated) = match found {
            Some(((_, s), outs)) => {
                let cases: Vec<_> = s
                    .cases
                    .iter()
                    .zip(outs)
                    .map(|(c, o)| (c.name.clone(), c.status, c.reason.clone(), o.clone()))
                    .collect();
                let untranslated = tests
                    .iter()
                    .filter(|t| {
                        !s.cases
                            .iter()
                            .any(|c| c.name == **t || c.name.starts_with(&format!("{t}/")))
                    })
                    .cloned()
                    .collect();
                for c in &s.cases {
                    let func = c.name.split('/').next().unwrap();
                    if !tests.iter().any(|t| t == func) {
                        errors.push(format!(
                            "{name}: case {} names no test function of the file",
                            c.name
                        ));
                    }
                }
                (cases, untranslated)
            }
            None => (Vec::new(), tests.clone()),
        };
        rows.push(Row {
            file: name,
            go_tests: tests.len(),
            untranslated,
            cases,
        });
    }
    let text = table::render(&rows);
    let readme_path = repo().join("README.md");
    let readme = fs::read_to_string(&readme_path).expect("README.md");
    let Some(updated) = table::splice(&readme, &text) else {
        errors.push(format!(
            "README.md has no conformance table markers ({})",
            table::BEGIN
        ));
        return;
    };
    if updated != readme {
        if std::env::var("KILN_CONFORMANCE_UPDATE").is_ok_and(|v| v == "1") {
            fs::write(&readme_path, updated).expect("write README.md");
        } else {
            errors.push(format!(
                "README.md's conformance table is stale; rerun with KILN_CONFORMANCE_UPDATE=1. This run:\n{text}"
            ));
        }
    }
}
