//! Escape and posture tests of `kiln build`, run as the unprivileged test
//! user: each attacks kiln the way a known exploit attacked runc, BuildKit
//! or Buildah (see SECURITY.md), and checks host canaries afterwards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_vm_tests::{
    busybox_rootfs, expect_failure, expect_success, give_to_test_user, kiln, run_checked, test_dir,
    Project,
};

/// A build project whose busybox tree also holds the syscall probe.
fn project(name: &str, dockerfile: &str) -> Project {
    let p = Project::new(name, dockerfile);
    std::fs::copy(env!("KILN_PROBE"), p.ctx().join("rootfs/bin/probe")).unwrap();
    give_to_test_user(&p.dir);
    p
}

/// Build arguments with plain progress on state directory `state`.
fn plain(p: &Project, state: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--progress", "plain"];
    args.extend_from_slice(extra);
    p.build_args(state, &args)
}

fn ok(o: Output) -> String {
    expect_success(o).1
}

fn failed(o: Output) -> String {
    expect_failure(o)
}

/// A host file and directory owned by the test user that no step may
/// touch; `check` panics if either changed.
struct Canary {
    dir: PathBuf,
}

impl Canary {
    fn new(name: &str) -> Canary {
        let dir = test_dir(name);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("file"), "canary\n").unwrap();
        std::fs::write(dir.join("sub/inner"), "inner\n").unwrap();
        give_to_test_user(&dir);
        Canary { dir }
    }

    fn check(&self) {
        assert_eq!(
            std::fs::read_to_string(self.dir.join("file")).unwrap(),
            "canary\n"
        );
        assert_eq!(
            std::fs::read_to_string(self.dir.join("sub/inner")).unwrap(),
            "inner\n"
        );
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["file", "sub"],
            "something was created in the canary"
        );
    }
}

fn status_fields(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Docker's default capability set without NET_RAW (SECURITY.md).
const CAPS: &str = "00000000a80405fb";

#[test]
fn every_run_step_has_the_documented_posture_inside_and_seen_from_the_host() {
    let marker = format!("kiln-posture-{}", std::process::id());
    let p = project(
        "security-posture",
        &format!(
            r#"FROM scratch
COPY rootfs/ /
RUN grep -E '^(NoNewPrivs|Seccomp|Cap(Inh|Prm|Eff|Bnd|Amb)):' /proc/self/status > /status && cat /proc/self/uid_map > /uid_map && cat /proc/self/gid_map > /gid_map && probe fds > /fds && probe > /probes
RUN sleep 4; : {marker}
"#
        ),
    );
    let child = kiln(plain(&p, "state", &["-o", &p.local_out()]))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // From the host: find the step's shell by its command line while it
    // sleeps, and read its status and namespaces.
    let kiln_pid = child.id();
    let started = Instant::now();
    let step_pid = loop {
        let found = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd);
            (cmd.contains(&marker) && cmd.starts_with("/bin/sh")).then_some(pid)
        });
        if let Some(pid) = found {
            break pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the step never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let host_status =
        status_fields(&std::fs::read_to_string(format!("/proc/{step_pid}/status")).unwrap());
    let ns = |pid: u32, n: &str| std::fs::read_link(format!("/proc/{pid}/ns/{n}")).ok();
    let mut same = Vec::new();
    for n in ["user", "mnt", "pid", "ipc", "uts", "net", "cgroup"] {
        let (step, ours) = (ns(step_pid, n), ns(kiln_pid, n));
        assert!(
            step.is_some() && ours.is_some(),
            "cannot read {n} namespaces"
        );
        if step == ours {
            same.push(n);
        }
    }
    let host_map = std::fs::read_to_string(format!("/proc/{step_pid}/uid_map")).unwrap();
    ok(child.wait_with_output().unwrap());
    assert!(
        same.is_empty(),
        "the step shares namespaces with kiln: {same:?}"
    );
    for (k, v) in [
        ("NoNewPrivs", "1"),
        ("Seccomp", "2"),
        ("CapInh", "0000000000000000"),
        ("CapPrm", CAPS),
        ("CapEff", CAPS),
        ("CapBnd", CAPS),
        ("CapAmb", "0000000000000000"),
    ] {
        assert_eq!(
            host_status.get(k).map(String::as_str),
            Some(v),
            "{k} from the host"
        );
    }

    // From inside: the same sets, exactly 0, 1 and 2 open, and the id map
    // kiln wrote: 0 is the caller (as seen from kiln's own namespace, where
    // the caller is 0), 1..65535 the subordinate range.
    let inside = status_fields(&p.out("status"));
    for k in [
        "NoNewPrivs",
        "Seccomp",
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
    ] {
        assert_eq!(inside.get(k), host_status.get(k), "{k} inside");
    }
    assert_eq!(p.out("fds"), "0 1 2\n");
    // Every probed syscall answers in a RUN step exactly as in `kiln
    // sandbox`, whose answers `sandbox.rs` pins to SECURITY.md's table.
    let rootfs = p.ctx().join("rootfs").display().to_string();
    let (sandboxed, _) = expect_success(
        kiln(["sandbox", "--rootfs", &rootfs, "--", "/bin/probe"])
            .output()
            .unwrap(),
    );
    assert_eq!(p.out("probes"), sandboxed);
    assert!(sandboxed.contains("clone3 ENOSYS"), "{sandboxed}");
    for map in [p.out("uid_map"), p.out("gid_map")] {
        let rows: Vec<Vec<&str>> = map
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows[0][0], "0", "{map}");
        assert_eq!(rows[0][2], "1", "{map}");
        if rows.len() > 1 {
            assert_eq!((rows[1][0], rows[1][2]), ("1", "65535"), "{map}");
        }
    }
    assert!(!host_map.is_empty());
}

#[test]
fn workdir_on_a_proc_fd_fails_and_no_step_starts_outside_its_root() {
    // runc CVE-2024-21626: a working directory of /proc/self/fd/N, where N
    // is a descriptor of the runtime's, started the process outside the
    // container. Every N from 3 to 63 must fail the build.
    let p = project("security-workdir-fd", "FROM scratch\n");
    let ctx = p.dir.join("ctx");
    let mut children = Vec::new();
    let mut results = Vec::new();
    for n in 3..64 {
        let df = ctx.join(format!("Dockerfile.{n}"));
        std::fs::write(
            &df,
            format!("FROM scratch\nCOPY rootfs/ /\nWORKDIR /proc/self/fd/{n}\nRUN pwd; ls ../../../ > /escaped\n"),
        )
        .unwrap();
        give_to_test_user(&df);
        let args = p.build_args(
            &format!("state-{}", n % 4),
            &["-f", &df.display().to_string()],
        );
        children.push((
            n,
            kiln(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ));
        if children.len() == 8 {
            for (n, c) in children.drain(..) {
                results.push((n, c.wait_with_output().unwrap()));
            }
        }
    }
    for (n, c) in children.drain(..) {
        results.push((n, c.wait_with_output().unwrap()));
    }
    for (n, o) in results {
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            !o.status.success(),
            "WORKDIR /proc/self/fd/{n} built:\n{err}"
        );
        assert!(err.contains("working directory"), "fd {n}: {err}");
        assert!(!err.contains("unreachable"), "fd {n}: {err}");
    }
    // An ordinary WORKDIR's getcwd is a path inside the root.
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nWORKDIR /app/sub\nRUN pwd > /pwd\n",
    )
    .unwrap();
    give_to_test_user(&ctx);
    ok(p.build(&["-o", &p.local_out()]));
    assert_eq!(p.out("pwd"), "/app/sub\n");
}

/// `kiln import` a busybox tree changed by `edit` as image `name`.
fn import_image(p: &Project, name: &str, edit: impl FnOnce(&Path)) {
    let tree = p.dir.join(format!("tree-{name}"));
    busybox_rootfs(&tree);
    edit(&tree);
    give_to_test_user(&tree);
    let state = p.dir.join("state").display().to_string();
    let tree_s = tree.display().to_string();
    let out = kiln(["--root", &state, "import", &tree_s, "-t", name])
        .output()
        .unwrap();
    ok(out);
}

#[test]
fn images_with_symlinked_or_missing_proc_dev_and_sys_fail_closed_or_are_masked() {
    // runc CVE-2019-19921, CVE-2025-31133, CVE-2025-52565, CVE-2025-52881:
    // an image whose /proc, /sys or /dev entries are symlinks must not make
    // the runtime mount or write through them.
    let canary = Canary::new("security-image-canary");
    let c = canary.dir.display().to_string();
    let core_pattern = std::fs::read("/proc/sys/kernel/core_pattern").unwrap();
    let p = project("security-image-links", "FROM scratch\n");
    type Edit = Box<dyn Fn(&Path)>;
    let link = |at: &'static str, to: String| -> Edit {
        Box::new(move |t: &Path| {
            let path = t.join(at);
            let _ = std::fs::remove_dir_all(&path);
            let _ = std::fs::remove_file(&path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(&to, &path).unwrap();
        })
    };
    let cases: Vec<(&str, Edit, bool)> = vec![
        // (image, change, must fail)
        ("proc-to-x", link("proc", "/x".into()), true),
        ("proc-to-canary", link("proc", c.clone()), true),
        ("sys-to-canary", link("sys", c.clone()), true),
        ("dev-to-canary", link("dev", c.clone()), true),
        (
            "null-to-core-pattern",
            link("dev/null", "/proc/sys/kernel/core_pattern".into()),
            false,
        ),
        (
            "console-to-file",
            link("dev/console", format!("{c}/file")),
            false,
        ),
        ("pts-to-canary", link("dev/pts", c.clone()), false),
        (
            "missing-all",
            Box::new(|t: &Path| {
                for d in ["proc", "dev", "sys"] {
                    std::fs::remove_dir_all(t.join(d)).unwrap();
                }
            }),
            false,
        ),
    ];
    for (name, edit, must_fail) in cases {
        import_image(&p, name, edit);
        std::fs::write(
            p.dir.join("ctx/Dockerfile"),
            format!(
                "FROM {name}\nRUN echo pwned > /dev/null; echo pwned > /dev/console; ls /proc/self > /dev/null\n"
            ),
        )
        .unwrap();
        give_to_test_user(&p.dir.join("ctx"));
        let dest = p.dir.join(format!("out-{name}"));
        let out = kiln(plain(
            &p,
            "state",
            &["-o", &format!("type=local,dest={}", dest.display())],
        ))
        .output()
        .unwrap();
        if must_fail {
            let err = failed(out);
            assert!(
                err.contains("/proc") || err.contains("/sys") || err.contains("/dev"),
                "{name}: {err}"
            );
        } else {
            ok(out);
        }
        canary.check();
        assert_eq!(
            std::fs::read("/proc/sys/kernel/core_pattern").unwrap(),
            core_pattern,
            "{name}"
        );
        if name == "missing-all" {
            // the mount points kiln had to make are not in the image
            for d in ["proc", "dev", "sys"] {
                assert!(
                    !p.dir.join("out").join(d).exists(),
                    "/{d} left in the image"
                );
            }
        }
    }
}

#[test]
fn a_racer_in_a_shared_cache_cannot_redirect_other_steps_mounts() {
    // runc CVE-2021-30465 / CVE-2024-45310 class: one step swaps a
    // directory and a symlink to /tmp inside a shared cache mount as fast
    // as it can while other stages start and mount that directory as their
    // cache source. Their writes must land in the cache, never in /tmp.
    let marker = format!("kiln-race-{}", std::process::id());
    let mut stages = String::new();
    let mut copies = String::new();
    for i in 0..6 {
        stages.push_str(&format!(
            "FROM base AS m{i}\nRUN --mount=type=cache,id=race,target=/m,source=d,sharing=shared for j in 1 2 3 4 5 6 7 8; do touch /m/{marker}-{i}-$j; sleep 0.2; done; ls / > /root-listing\n\n"
        ));
        copies.push_str(&format!("COPY --from=m{i} /root-listing /listing-{i}\n"));
    }
    let p = project(
        "security-race",
        &format!(
            r#"FROM scratch AS base
COPY rootfs/ /

FROM base AS racer
RUN --mount=type=cache,id=race,target=/c,sharing=shared mkdir -p /c/d /c/tmp && ln -sfn /tmp /c/l && probe exchange /c/d /c/l 6 > /exchanged

{stages}
FROM base
COPY --from=racer /exchanged /exchanged
{copies}"#
        ),
    );
    ok(p.build(&["-j", "8", "-o", &p.local_out()]));
    assert!(p.out("exchanged").starts_with("exchanged "));
    let in_host_tmp: Vec<String> = std::fs::read_dir("/tmp")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&marker))
        .collect();
    assert!(
        in_host_tmp.is_empty(),
        "written through the racer's symlink: {in_host_tmp:?}"
    );
    for i in 0..6 {
        let listing = p.out(&format!("listing-{i}"));
        assert!(
            listing.contains("bin") && !listing.contains("usr"),
            "{listing}"
        );
    }
}

#[test]
fn a_step_cannot_reach_a_host_abstract_socket_even_with_host_network() {
    // containerd CVE-2020-15257: the shim's abstract unix socket was
    // reachable from containers sharing the host's network namespace.
    // kiln steps have their own network namespace by default, and Landlock
    // scoping (Linux 6.12+) keeps even network=host steps out.
    let name = format!("kiln-abstract-{}", std::process::id());
    let listener = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        std::os::unix::net::UnixListener::bind_addr(&addr).unwrap()
    };
    listener.set_nonblocking(true).unwrap();
    let p = project(
        "security-abstract",
        &format!(
            "FROM scratch\nCOPY rootfs/ /\nRUN probe connect-abstract {name} > /default\nRUN --network=host probe connect-abstract {name} > /host\n"
        ),
    );
    ok(p.build(&["--allow", "network.host", "-o", &p.local_out()]));
    assert!(
        listener.accept().is_err(),
        "a step connected to the host's socket"
    );
    assert!(!p.out("default").contains("OK"), "{}", p.out("default"));
    let abi = landlock_abi();
    if abi >= 6 {
        assert!(!p.out("host").contains("OK"), "{}", p.out("host"));
    } else {
        eprintln!("Landlock ABI {abi}: no scoping, network=host reaches abstract sockets");
    }
}

fn landlock_abi() -> i64 {
    // SAFETY: the version query of landlock_create_ruleset.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32,
        )
    }
}

#[test]
fn copy_keeps_symlinks_as_links_and_never_reads_host_files_through_them() {
    // docker cp CVE-2018-15664 class: a context symlink to a host file is
    // copied as a link; a stage's symlinks to / resolve in the stage.
    let canary = Canary::new("security-copy-canary");
    let p = project(
        "security-copy-links",
        r#"FROM scratch AS stage
COPY rootfs/ /
RUN ln -s / /rootlink && ln -s /etc/passwd /passwdlink

FROM scratch
COPY rootfs/ /
COPY dir/ /copied/
COPY --from=stage /rootlink /from-stage-rootlink
COPY --from=stage /passwdlink /from-stage-passwdlink
RUN cat /copied/hostlink > /through-link 2>&1 || echo dangling > /through-link
"#,
    );
    std::fs::create_dir_all(p.dir.join("ctx/dir")).unwrap();
    std::os::unix::fs::symlink(canary.dir.join("file"), p.dir.join("ctx/dir/hostlink")).unwrap();
    give_to_test_user(&p.dir);
    ok(p.build(&["-o", &p.local_out()]));
    let out = p.dir.join("out");
    assert_eq!(
        std::fs::read_link(out.join("copied/hostlink")).unwrap(),
        canary.dir.join("file")
    );
    // A source named in COPY --from that is a symlink is followed as
    // BuildKit does, but inside the stage's root: / is the stage's root and
    // /etc/passwd the stage's file, never the host's.
    let listing: Vec<String> = std::fs::read_dir(out.join("from-stage-rootlink"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        listing.contains(&"bin".to_string()) && !listing.contains(&"usr".to_string()),
        "{listing:?}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("from-stage-passwdlink")).unwrap(),
        std::fs::read_to_string(p.dir.join("ctx/rootfs/etc/passwd")).unwrap()
    );
    // Inside the step the link resolves in the image, where the host's
    // canary path does not exist.
    assert_eq!(p.out("through-link"), "dangling\n");
    canary.check();
}

#[test]
fn entitlements_and_unknown_modes_fail_closed() {
    // BuildKit CVE-2024-23653 class: privileges a Dockerfile asks for need
    // the build's grant, and a mode kiln does not know is an error.
    let p = project(
        "security-entitlements",
        "FROM scratch\nCOPY rootfs/ /\nRUN --network=host echo host-$((1+1))\n",
    );
    let err = failed(p.build(&[]));
    assert!(err.contains("network.host"), "{err}");
    assert!(!err.contains("host-2"), "{err}");
    for (df, what) in [
        ("RUN --security=insecure true", "insecure"),
        ("RUN --network=weird true", "weird"),
        ("RUN --security=weird true", "weird"),
    ] {
        std::fs::write(
            p.dir.join("ctx/Dockerfile"),
            format!("FROM scratch\nCOPY rootfs/ /\n{df}\n"),
        )
        .unwrap();
        give_to_test_user(&p.dir.join("ctx"));
        let err = failed(p.build(&["--allow", "network.host"]));
        assert!(err.contains(what), "{df}: {err}");
    }
    let err = failed(p.build(&["--allow", "security.insecure"]));
    assert!(err.contains("security.insecure"), "{err}");
    let err = failed(p.build(&["--allow", "bogus.thing"]));
    assert!(err.contains("bogus.thing"), "{err}");
}

#[test]
fn the_kiln_binary_is_unchanged_after_the_escape_tests_run() {
    // runc CVE-2019-5736: nothing a step does may reach the kiln binary,
    // here one the test user owns (as a user's own build of kiln is)
    let bin = kiln_vm_tests::owned_by_test_user(&kiln_vm_tests::kiln_binary());
    let before = run_checked(Command::new("sha256sum").arg(&bin)).stdout;
    let p = project(
        "security-exe",
        "FROM scratch\nCOPY rootfs/ /\nRUN probe proc1_vm_write self_exe_write; for p in /proc/[0-9]*; do (echo x > $p/exe) 2>/dev/null && echo WROTE-INTO-$p; for f in $p/fd/*; do (echo x >> $f) 2>/dev/null; done; done; true\n",
    );
    let err = ok(kiln_vm_tests::as_test_user(&bin)
        .args(plain(&p, "state", &[]))
        .output()
        .unwrap());
    assert!(
        err.contains("proc1_vm_write EPERM") && err.contains("self_exe_write ETXTBSY"),
        "{err}"
    );
    assert!(!err.contains("WROTE-INTO-/proc"), "{err}");
    assert_eq!(
        run_checked(Command::new("sha256sum").arg(&bin)).stdout,
        before
    );
}

#[test]
fn kiln_info_reports_the_security_facts() {
    let state = test_dir("security-info");
    let state_s = state.display().to_string();
    let (out, _) = expect_success(
        kiln(["--root", &state_s, "info", "--format", "json"])
            .output()
            .unwrap(),
    );
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    let sha = info["seccomp"]["default_profile_sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64, "{info}");
    assert!(info["seccomp"]["instructions"].as_u64().unwrap() > 100);
    assert!(["overlay", "fuse", "copy"].contains(&info["snapshotter"].as_str().unwrap()));
    assert_eq!(
        info["landlock"]["abi"].as_i64().unwrap(),
        landlock_abi().max(0)
    );
    // what a confined thread of each component got, checked by kiln
    for c in [
        "layer apply",
        "layer diff",
        "FUSE server",
        "context copy",
        "local export",
    ] {
        let status = info["landlock"]["components"][c].as_str().unwrap_or("");
        if landlock_abi() >= 5 {
            assert!(status.starts_with("enforced"), "{c}: {info}");
        } else {
            assert!(!status.is_empty(), "{c}: {info}");
        }
    }
    assert!(info["user"]["uid_map"][0]
        .as_str()
        .unwrap()
        .starts_with("0:"));
    assert_eq!(info["kernel"]["user_namespaces"], true);
    // The text form names the same facts.
    let (text, _) = expect_success(kiln(["--root", &state_s, "info"]).output().unwrap());
    for heading in [
        "Kernel:",
        "User:",
        "Snapshotter:",
        "Landlock:",
        "Seccomp:",
        "Platforms:",
    ] {
        assert!(text.contains(heading), "{text}");
    }
}
