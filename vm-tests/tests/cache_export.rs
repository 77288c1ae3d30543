//! End-to-end tests of `--cache-to` / `--cache-from`: a cache exported by
//! one build lets a build on an empty state directory skip the steps it
//! covers; a damaged cache costs a rebuild, never a wrong result.

use std::path::PathBuf;
use std::process::Output;

use kiln_vm_tests::{busybox_rootfs, give_to_test_user, kiln, test_dir};

const DOCKERFILE: &str = r#"FROM scratch AS builder
COPY rootfs/ /
RUN echo built-in-builder > /artifact && echo not-copied > /other

FROM scratch
COPY rootfs/ /
COPY --from=builder /artifact /artifact
RUN cat /artifact > /final && echo final-step-$((6*7))
"#;

struct Project {
    dir: PathBuf,
}

impl Project {
    fn new(name: &str) -> Project {
        let dir = test_dir(name);
        busybox_rootfs(&dir.join("ctx/rootfs"));
        std::fs::write(dir.join("ctx/Dockerfile"), DOCKERFILE).unwrap();
        give_to_test_user(&dir);
        Project { dir }
    }

    fn build(&self, state: &str, extra: &[&str]) -> (String, String) {
        let mut args = vec![
            "--root".to_string(),
            self.dir.join(state).display().to_string(),
            "build".into(),
            "--progress".into(),
            "plain".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(self.dir.join("ctx").display().to_string());
        ok(kiln(&args).output().unwrap())
    }

    fn cache(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

fn ok(o: Output) -> (String, String) {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success(),
        "kiln failed: {:?}\nstdout:\n{out}\nstderr:\n{err}",
        o.status
    );
    (out, err)
}

#[test]
fn an_exported_cache_warms_an_empty_state_directory() {
    let p = Project::new("cache-export");
    let max = p.cache("cache-max");
    let min = p.cache("cache-min");
    let (digest, err) = p.build(
        "state-1",
        &[
            "--cache-to",
            &format!("type=local,dest={max},mode=max"),
            "--cache-to",
            &format!("type=local,dest={min}"),
        ],
    );
    assert!(err.contains("2 steps run"), "{err}");
    assert!(
        std::path::Path::new(&max).join("index.json").is_file(),
        "{err}"
    );

    // mode=max: a fresh state directory runs nothing and gives the same
    // image.
    let (digest2, err) = p.build(
        "state-2",
        &["--cache-from", &format!("type=local,src={max}")],
    );
    assert!(err.contains("0 steps run"), "{err}");
    assert!(!err.contains("final-step-42"), "{err}");
    assert_eq!(digest, digest2);

    // mode=min holds only the final image's steps: the builder stage's
    // RUN runs again, the final stage's is a hit.
    let (digest3, err) = p.build(
        "state-3",
        &["--cache-from", &format!("type=local,src={min}")],
    );
    assert!(err.contains("1 steps run"), "{err}");
    assert!(!err.contains("final-step-42"), "{err}");
    assert_eq!(digest, digest3);
}

#[test]
fn a_damaged_or_missing_cache_only_costs_a_rebuild() {
    let p = Project::new("cache-export-damaged");
    let dir = p.cache("cache");
    p.build(
        "state-1",
        &["--cache-to", &format!("type=local,dest={dir},mode=max")],
    );
    // Flip a byte in every layer blob: their digests no longer hold.
    let blobs = std::path::Path::new(&dir).join("blobs/sha256");
    for e in std::fs::read_dir(&blobs).unwrap().flatten() {
        let mut bytes = std::fs::read(e.path()).unwrap();
        if bytes.len() > 1000 {
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
            std::fs::write(e.path(), bytes).unwrap();
        }
    }
    let (_, err) = p.build(
        "state-2",
        &["--cache-from", &format!("type=local,src={dir}")],
    );
    assert!(err.contains("WARNING: --cache-from"), "{err}");
    assert!(err.contains("final-step-42"), "{err}");
    assert!(err.contains("2 steps run"), "{err}");

    // A cache directory that does not exist: a warning, a full build.
    let (_, err) = p.build(
        "state-3",
        &["--cache-from", &format!("type=local,src={dir}-missing")],
    );
    assert!(err.contains("WARNING: --cache-from"), "{err}");
    assert!(err.contains("2 steps run"), "{err}");
}
