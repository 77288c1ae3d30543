//! End-to-end tests of `FROM` a named build context, run as the
//! unprivileged test user: a directory becomes the stage's root
//! filesystem, an `oci-layout://` directory is an image base.

use std::path::PathBuf;
use std::process::Output;

use kiln_vm_tests::{busybox_rootfs, kiln, test_dir};

/// A context directory with a Dockerfile, a state directory, and a
/// busybox tree under `rootfs/` to use as a named context.
struct Project {
    dir: PathBuf,
}

impl Project {
    fn new(name: &str, dockerfile: &str) -> Project {
        let dir = test_dir(name);
        busybox_rootfs(&dir.join("rootfs"));
        std::fs::create_dir_all(dir.join("ctx")).unwrap();
        std::fs::write(dir.join("ctx/Dockerfile"), dockerfile).unwrap();
        let p = Project { dir };
        p.chown();
        p
    }

    fn chown(&self) {
        kiln_vm_tests::give_to_test_user(&self.dir);
    }

    fn path(&self, rel: &str) -> String {
        self.dir.join(rel).display().to_string()
    }

    fn kiln(&self, args: &[&str]) -> Output {
        let mut all = vec!["--root".to_string(), self.path("state")];
        all.extend(args.iter().map(|s| s.to_string()));
        kiln(&all).output().expect("run kiln")
    }

    fn build(&self, extra: &[&str]) -> Output {
        let mut args = vec!["build"];
        args.extend_from_slice(extra);
        let ctx = self.path("ctx");
        args.push(&ctx);
        self.kiln(&args)
    }
}

fn ok(o: Output) -> (String, String) {
    kiln_vm_tests::expect_success(o)
}

#[test]
fn from_a_directory_context_then_run_in_it() {
    let p = Project::new(
        "ctx-from-dir",
        "FROM base\nRUN echo ran > /ran && cat /marker > /copied\n",
    );
    std::fs::write(p.dir.join("rootfs/marker"), "from the directory\n").unwrap();
    p.chown();
    let out = p.path("out");
    ok(p.build(&[
        "--progress",
        "plain",
        "--build-context",
        &format!("base={}", p.path("rootfs")),
        "-o",
        &format!("type=local,dest={out}"),
    ]));
    let out = p.dir.join("out");
    assert_eq!(std::fs::read_to_string(out.join("ran")).unwrap(), "ran\n");
    assert_eq!(
        std::fs::read_to_string(out.join("copied")).unwrap(),
        "from the directory\n"
    );
    assert!(
        out.join("bin/busybox").exists(),
        "the directory is the root"
    );
}

#[test]
fn from_an_oci_layout_context_saved_by_kiln() {
    let p = Project::new(
        "ctx-from-layout",
        "FROM scratch\nCOPY rootfs/ /\nRUN echo base > /made\n",
    );
    // the source image, built from a context holding the busybox tree
    std::fs::rename(p.dir.join("rootfs"), p.dir.join("ctx/rootfs")).unwrap();
    ok(p.build(&["--progress", "quiet", "-t", "layout-src"]));
    let layout = p.path("layout");
    ok(p.kiln(&[
        "save",
        "layout-src",
        "--output",
        &format!("type=oci,dest={layout}/"),
    ]));
    assert!(
        p.dir.join("layout/index.json").exists(),
        "a layout directory"
    );
    std::fs::write(
        p.dir.join("ctx/Dockerfile.two"),
        "FROM base\nRUN cat /made > /again\n",
    )
    .unwrap();
    p.chown();
    let out = p.path("out");
    let dockerfile = p.path("ctx/Dockerfile.two");
    // a fresh state directory: the base can only come from the layout
    let o = kiln([
        "--root",
        &p.path("state2"),
        "build",
        "--progress",
        "plain",
        "-f",
        &dockerfile,
        "--build-context",
        &format!("base=oci-layout://{layout}"),
        "-o",
        &format!("type=local,dest={out}"),
        &p.path("ctx"),
    ])
    .output()
    .unwrap();
    ok(o);
    assert_eq!(
        std::fs::read_to_string(p.dir.join("out/again")).unwrap(),
        "base\n"
    );

    // a tag the layout does not hold is a clear error naming it
    let o = kiln([
        "--root",
        &p.path("state2"),
        "build",
        "--progress",
        "plain",
        "-f",
        &dockerfile,
        "--build-context",
        &format!("base=oci-layout://{layout}:no-such-tag"),
        &p.path("ctx"),
    ])
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a missing tag must fail:\n{err}");
    assert!(
        err.contains("no-such-tag"),
        "the error names the tag:\n{err}"
    );
    assert!(
        err.contains("base=oci-layout://"),
        "and the context:\n{err}"
    );
}
