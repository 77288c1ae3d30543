//! A corpus of malicious layer tars, applied through every way an image's
//! bytes reach kiln: `kiln load` of a docker-archive holding the layer, a
//! build `FROM` that image, and `ADD` of the tar from a build context. Each
//! either fails with an error naming the layer or archive, or gives the
//! documented safe result; the host canaries (a directory the test user
//! owns, which a step could otherwise write) are never touched.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_vm_tests::rawtar::{archive, entry, header, pax};
use kiln_vm_tests::{busybox_rootfs, give_to_test_user, kiln, run_checked, test_dir};

struct Canary {
    dir: PathBuf,
}

impl Canary {
    fn new() -> Canary {
        let dir = test_dir("malicious-canary");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("file"), "canary\n").unwrap();
        give_to_test_user(&dir);
        // writable by anyone, as a careless host directory might be
        run_checked(Command::new("chmod").arg("-R").arg("a+rwX").arg(&dir));
        Canary { dir }
    }

    fn check(&self, case: &str) {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["file", "sub"],
            "{case}: the canary directory changed"
        );
        assert_eq!(
            std::fs::read_to_string(self.dir.join("file")).unwrap(),
            "canary\n",
            "{case}"
        );
        assert_eq!(
            std::fs::read_dir(self.dir.join("sub")).unwrap().count(),
            0,
            "{case}"
        );
    }
}

/// The corpus: (name, layer tar).
fn corpus(canary: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let c = canary.display().to_string();
    let c_rel = c.trim_start_matches('/').to_string();
    let up = "../".repeat(8);
    vec![
        (
            "dotdot",
            archive(&[entry(&format!("{up}{c_rel}/dotdot"), b'0', "", b"x", 0o644)]),
        ),
        (
            "absolute",
            archive(&[entry(&format!("{c}/absolute"), b'0', "", b"x", 0o644)]),
        ),
        (
            "symlink-then-through",
            archive(&[
                entry("a", b'2', &c, b"", 0o777),
                entry("a/through", b'0', "", b"x", 0o644),
            ]),
        ),
        (
            "etc-then-passwd",
            archive(&[
                entry("etc", b'2', "/etc", b"", 0o777),
                entry("etc/passwd", b'0', "", b"root::0:0::/:/bin/sh\n", 0o644),
            ]),
        ),
        (
            "dotdot-link-then-deep",
            archive(&[
                entry("a", b'2', "..", b"", 0o777),
                entry("a/x/y", b'0', "", b"x", 0o644),
            ]),
        ),
        (
            "hardlink-shadow",
            archive(&[entry("shadow", b'1', "/etc/shadow", b"", 0o644)]),
        ),
        (
            "hardlink-up",
            archive(&[entry("x", b'1', &format!("../../{c_rel}/file"), b"", 0o644)]),
        ),
        (
            "duplicate-names",
            archive(&[
                entry("d", b'0', "", b"first", 0o644),
                entry("d", b'2', &c, b"", 0o777),
                entry("d", b'0', "", b"second", 0o644),
            ]),
        ),
        (
            "whiteout-under-symlink",
            archive(&[
                entry("s", b'2', &c, b"", 0o777),
                entry("s/.wh.file", b'0', "", b"", 0o644),
            ]),
        ),
        (
            // TARmageddon class: PAX says 0 bytes, ustar says 1024; a
            // reader that trusts the wrong one sees a hidden entry.
            "pax-ustar-size-disagree",
            {
                let hidden = entry(&format!("{up}{c_rel}/smuggled"), b'0', "", b"x", 0o644);
                archive(&[
                    pax(&[("size", b"0")]),
                    header("outer", b'0', "", hidden.len(), 0o644, &hidden),
                ])
            },
        ),
        (
            "devices-and-fifo",
            archive(&[
                entry("null", b'3', "", b"", 0o666),
                entry("disk", b'4', "", b"", 0o666),
                entry("fifo", b'6', "", b"", 0o644),
            ]),
        ),
        (
            "setuid-and-capability",
            archive(&[
                pax(&[(
                    "SCHILY.xattr.security.capability",
                    &[1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                )]),
                entry("capped", b'0', "", b"#!/bin/sh\n", 0o755),
                entry("suid", b'0', "", b"#!/bin/sh\n", 0o4755),
            ]),
        ),
    ]
}

fn sha256(path: &Path) -> String {
    let out = run_checked(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A docker-archive holding one image whose only layer is `layer`.
fn docker_archive(dir: &Path, name: &str, layer: &[u8]) -> PathBuf {
    let work = dir.join(format!("archive-{name}"));
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("layer.tar"), layer).unwrap();
    let diff_id = sha256(&work.join("layer.tar"));
    std::fs::write(
        work.join("config.json"),
        format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["sha256:{diff_id}"]}}}}"#
        ),
    )
    .unwrap();
    std::fs::write(
        work.join("manifest.json"),
        format!(r#"[{{"Config":"config.json","RepoTags":["evil-{name}:latest"],"Layers":["layer.tar"]}}]"#),
    )
    .unwrap();
    let tar = dir.join(format!("evil-{name}.tar"));
    run_checked(
        Command::new("tar")
            .arg("-C")
            .arg(&work)
            .arg("-cf")
            .arg(&tar)
            .args(["manifest.json", "config.json", "layer.tar"]),
    );
    tar
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn malicious_layers_through_load_from_and_add_leave_the_host_untouched() {
    let canary = Canary::new();
    let dir = test_dir("malicious-layers");
    let ctx = dir.join("ctx");
    busybox_rootfs(&ctx.join("rootfs"));
    let state = dir.join("state").display().to_string();
    let mut loaded = Vec::new();
    for (name, layer) in corpus(&canary.dir) {
        let tar = docker_archive(&dir, name, &layer);
        std::fs::write(ctx.join(format!("{name}.tar")), &layer).unwrap();
        give_to_test_user(&dir);

        // kiln load
        let tar_s = tar.display().to_string();
        let out = kiln(["--root", &state, "load", "-i", &tar_s])
            .output()
            .unwrap();
        canary.check(&format!("{name} (load)"));
        if out.status.success() {
            loaded.push(name);
        } else {
            let err = text(&out);
            assert!(
                err.contains("layer") || err.contains("sha256"),
                "{name}: {err}"
            );
        }

        // FROM the loaded image, then a step that looks around
        if out.status.success() {
            std::fs::write(
                ctx.join("Dockerfile"),
                format!("FROM evil-{name}\nCOPY rootfs/ /kiln-tools/\nRUN /kiln-tools/bin/sh -c 'echo step-ran'\n"),
            )
            .unwrap();
            give_to_test_user(&ctx);
            let ctx_s = ctx.display().to_string();
            let out = kiln(["--root", &state, "build", &ctx_s]).output().unwrap();
            canary.check(&format!("{name} (FROM)"));
            if !out.status.success() {
                let err = text(&out);
                assert!(err.contains("Dockerfile:"), "{name} FROM: {err}");
            }
        }

        // ADD of the same tar from the context
        std::fs::write(
            ctx.join("Dockerfile"),
            format!("FROM scratch\nADD {name}.tar /unpacked/\n"),
        )
        .unwrap();
        give_to_test_user(&ctx);
        let ctx_s = ctx.display().to_string();
        let out = kiln(["--root", &state, "build", &ctx_s]).output().unwrap();
        canary.check(&format!("{name} (ADD)"));
        eprintln!(
            "{name}: load {}, ADD {}",
            if loaded.contains(&name) {
                "ok"
            } else {
                "refused"
            },
            if out.status.success() {
                "ok"
            } else {
                "refused"
            }
        );
        if !out.status.success() {
            let err = text(&out);
            assert!(
                err.contains("Dockerfile:2") && err.contains(&format!("{name}.tar")),
                "{name} ADD: {err}"
            );
        }
    }
    // Nothing a layer named landed outside the state directory.
    for marker in ["dotdot", "absolute", "through", "smuggled"] {
        let found = run_checked(Command::new("find").arg(&dir).arg("-name").arg(marker));
        let found = String::from_utf8_lossy(&found.stdout);
        assert!(
            found.lines().all(|l| l.contains("/state/")),
            "{marker} outside the state directory: {found}"
        );
    }
    // The honest special cases load (documented: devices and fifos are
    // skipped, setuid bits and file capabilities are kept; no_new_privs
    // keeps them from raising a step's privileges).
    assert!(loaded.contains(&"setuid-and-capability"), "{loaded:?}");
    assert!(loaded.contains(&"devices-and-fifo"), "{loaded:?}");
}

/// A layer whose GNU long name header declares 1 GiB (the body is cut
/// short: what matters is that kiln refuses the header before reading
/// it), and the layer limits of the command line, through `kiln load`.
#[test]
fn long_name_headers_and_layer_limits_are_refused_by_load() {
    let dir = test_dir("layer-limits");
    let state = dir.join("state").display().to_string();
    let mut bomb = header("././@LongLink", b'L', "", 1 << 30, 0o644, &[b'a'; 4 << 20]);
    bomb.extend(entry("f", b'0', "", b"x", 0o644));
    let bomb = archive(&[bomb]);
    let bomb_tar = docker_archive(&dir, "longname", &bomb);
    let files: Vec<Vec<u8>> = (0..5)
        .map(|i| entry(&format!("f{i}"), b'0', "", b"x", 0o644))
        .collect();
    let five = docker_archive(&dir, "five", &archive(&files));
    give_to_test_user(&dir);

    let load = |flags: &[&str], tar: &str| {
        let mut args = vec!["--root", state.as_str()];
        args.extend_from_slice(flags);
        args.extend(["load", "-i", tar]);
        let out = kiln(args).output().unwrap();
        (out.status.success(), text(&out))
    };
    let (ok, err) = load(&[], &bomb_tar.display().to_string());
    assert!(!ok, "a 1 GiB long name loaded");
    assert!(
        err.contains("GNU long name header declares 1073741824 bytes"),
        "{err}"
    );
    let five = five.display().to_string();
    let (ok, err) = load(&["--max-layer-entries", "4"], &five);
    assert!(!ok, "5 entries loaded under a limit of 4");
    assert!(
        err.contains("over 4 entries") && err.contains("after entry f3"),
        "{err}"
    );
    let (ok, err) = load(&["--max-layer-size", "2KiB"], &five);
    assert!(!ok, "a 3.5 KiB layer loaded under 2 KiB");
    assert!(err.contains("over 2048 bytes"), "{err}");
    // within the limits it loads
    let (ok, err) = load(&["--max-layer-entries", "5"], &five);
    assert!(ok, "{err}");
}
