//! End-to-end tests of COPY and ADD, run as the unprivileged test user:
//! every source and destination form, owners and modes, archives, and the
//! cache key. Results are checked by reading the built filesystem back
//! (`type=local` for content and modes, `type=tar` for owners).

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_vm_tests::{kiln, run_checked, test_dir};

/// A context directory and a state directory owned by the test user.
struct Project {
    dir: PathBuf,
}

impl Project {
    fn new(name: &str, dockerfile: &str) -> Project {
        let dir = test_dir(name);
        std::fs::create_dir_all(dir.join("ctx")).unwrap();
        std::fs::write(dir.join("ctx/Dockerfile"), dockerfile).unwrap();
        Project { dir }
    }

    fn ctx(&self) -> PathBuf {
        self.dir.join("ctx")
    }

    fn write(&self, rel: &str, content: &str) {
        let p = self.ctx().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    fn chmod(&self, rel: &str, mode: u32) {
        std::fs::set_permissions(self.ctx().join(rel), std::fs::Permissions::from_mode(mode))
            .unwrap();
    }

    /// Make everything readable and owned by the test user.
    fn chown(&self) {
        kiln_vm_tests::give_to_test_user(&self.dir);
    }

    fn build(&self, extra: &[&str]) -> Output {
        let mut args: Vec<String> = vec![
            "--root".into(),
            self.dir.join("state").display().to_string(),
            "build".into(),
            "--progress".into(),
            "plain".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(self.ctx().display().to_string());
        kiln(&args).output().expect("run kiln build")
    }

    /// Build into a fresh local directory `name` and return its path.
    fn build_local(&self, name: &str) -> PathBuf {
        let out = self.dir.join(name);
        ok(self.build(&["-o", &format!("type=local,dest={}", out.display())]));
        out
    }
}

fn ok(o: Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success(),
        "kiln build failed: {:?}\nstdout:\n{}\nstderr:\n{err}",
        o.status,
        String::from_utf8_lossy(&o.stdout)
    );
    err
}

fn failed(o: Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "kiln build should have failed:\n{err}");
    err
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

const FORMS: &str = r#"FROM scratch
COPY a.txt /file-renamed
COPY a.txt /into-dir/
COPY dir /dir-contents
COPY dir/ /dir-contents-slash/
COPY *.txt /globbed/
COPY a.txt b.txt /several/
COPY d?r/sub/*.md /glob-deep/
WORKDIR /work
COPY a.txt relative/
COPY b.txt .
COPY <<EOF /heredoc.txt
hello $HOME_VAR
EOF
COPY <<one <<two /heredocs/
first
one
second
two
COPY --parents dir/sub/c.md /parents/
COPY --parents dir/./sub/c.md /pivot/
COPY --parents */sub/*.md /parents-glob/
COPY --exclude=*.log --exclude=sub/skip.md dir/ /excluded/
COPY --exclude=b.txt *.txt /glob-excluded/
COPY --link a.txt /linked.txt
COPY --chmod=u=rwX,go=rX dir/ /symbolic/
COPY --chmod=0600 dir/ /octal/
COPY --chmod=go-rwx,u+x a.txt /sym-file
COPY links/ /links/
COPY links/rel /followed
COPY linkdir /through-linkdir/
"#;

fn forms_project(name: &str) -> Project {
    let p = Project::new(name, FORMS);
    p.write("a.txt", "a\n");
    p.write("b.txt", "b\n");
    p.write("dir/top.txt", "top\n");
    p.write("dir/run.sh", "#!/bin/sh\n");
    p.write("dir/noise.log", "log\n");
    p.write("dir/sub/c.md", "c\n");
    p.write("dir/sub/skip.md", "skip\n");
    std::fs::create_dir_all(p.ctx().join("links")).unwrap();
    std::os::unix::fs::symlink("../a.txt", p.ctx().join("links/rel")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", p.ctx().join("links/abs")).unwrap();
    std::os::unix::fs::symlink("dir/sub", p.ctx().join("linkdir")).unwrap();
    p.chown();
    p.chmod("dir/top.txt", 0o640);
    p.chmod("dir/run.sh", 0o700);
    p.chmod("dir/sub", 0o700);
    p
}

#[test]
fn copy_sources_and_destinations_in_every_form() {
    let p = forms_project("copy-forms");
    let out = p.build_local("out");
    assert_eq!(read(&out.join("file-renamed")), "a\n");
    assert_eq!(read(&out.join("into-dir/a.txt")), "a\n");
    // A directory source copies its contents, with or without a slash.
    for d in ["dir-contents", "dir-contents-slash"] {
        assert_eq!(read(&out.join(d).join("top.txt")), "top\n");
        assert_eq!(read(&out.join(d).join("sub/c.md")), "c\n");
        assert!(!exists(&out.join(d).join("dir")), "{d} holds the contents");
    }
    assert_eq!(read(&out.join("globbed/a.txt")), "a\n");
    assert_eq!(read(&out.join("globbed/b.txt")), "b\n");
    assert_eq!(read(&out.join("several/b.txt")), "b\n");
    assert_eq!(read(&out.join("glob-deep/c.md")), "c\n");
    assert_eq!(read(&out.join("glob-deep/skip.md")), "skip\n");
    // Relative destinations are under WORKDIR; `.` is WORKDIR itself.
    assert_eq!(read(&out.join("work/relative/a.txt")), "a\n");
    assert_eq!(read(&out.join("work/b.txt")), "b\n");
    // Heredocs are files named by the destination or by their delimiter.
    assert_eq!(read(&out.join("heredoc.txt")), "hello \n");
    assert_eq!(mode(&out.join("heredoc.txt")), 0o644);
    assert_eq!(read(&out.join("heredocs/one")), "first\n");
    assert_eq!(read(&out.join("heredocs/two")), "second\n");
    // --parents keeps the source's parents, from a `./` on when there is one.
    assert_eq!(read(&out.join("parents/dir/sub/c.md")), "c\n");
    assert_eq!(read(&out.join("pivot/sub/c.md")), "c\n");
    assert!(!exists(&out.join("pivot/dir")));
    assert_eq!(read(&out.join("parents-glob/dir/sub/c.md")), "c\n");
    // --exclude, relative to the copied directory, and among glob matches.
    assert!(exists(&out.join("excluded/top.txt")));
    assert!(exists(&out.join("excluded/sub/c.md")));
    assert!(!exists(&out.join("excluded/noise.log")));
    assert!(!exists(&out.join("excluded/sub/skip.md")));
    assert!(exists(&out.join("glob-excluded/a.txt")));
    assert!(!exists(&out.join("glob-excluded/b.txt")));
    assert_eq!(read(&out.join("linked.txt")), "a\n");
    // Modes: kept without --chmod, symbolic with X per file, octal for all.
    assert_eq!(mode(&out.join("dir-contents/top.txt")), 0o640);
    assert_eq!(mode(&out.join("dir-contents/run.sh")), 0o700);
    assert_eq!(mode(&out.join("dir-contents/sub")), 0o700);
    assert_eq!(mode(&out.join("symbolic/top.txt")), 0o644);
    assert_eq!(mode(&out.join("symbolic/run.sh")), 0o755);
    assert_eq!(mode(&out.join("symbolic/sub")), 0o755);
    assert_eq!(mode(&out.join("symbolic/sub/c.md")), 0o644);
    assert_eq!(mode(&out.join("octal/run.sh")), 0o600);
    assert_eq!(mode(&out.join("octal/sub")), 0o600);
    assert_eq!(mode(&out.join("sym-file")), 0o700);
    // Symlinks are copied as symlinks, targets untouched.
    assert_eq!(
        std::fs::read_link(out.join("links/rel")).unwrap(),
        Path::new("../a.txt")
    );
    assert_eq!(
        std::fs::read_link(out.join("links/abs")).unwrap(),
        Path::new("/etc/shadow")
    );
    // A symlink named as the source is followed, inside the context.
    assert_eq!(read(&out.join("followed")), "a\n");
    assert!(std::fs::symlink_metadata(out.join("followed"))
        .unwrap()
        .is_file());
    assert_eq!(read(&out.join("through-linkdir/c.md")), "c\n");
}

/// `path -> (mode string, "uid/gid")` of every entry of a tar, as GNU tar
/// lists it.
fn tar_listing(tar: &Path) -> BTreeMap<String, (String, String)> {
    let out = run_checked(
        Command::new("tar")
            .arg("--numeric-owner")
            .arg("-tvf")
            .arg(tar),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = f.get(5)?.trim_start_matches("./").trim_end_matches('/');
            Some((name.to_string(), (f[0].to_string(), f[1].to_string())))
        })
        .collect()
}

#[test]
fn chown_resolves_names_in_the_destination_image() {
    let p = Project::new(
        "copy-chown",
        "FROM scratch\nCOPY etc/ /etc/\nCOPY --chown=app a.txt /by-name\nCOPY --chown=app:staff a.txt /by-names\nCOPY --chown=7:8 a.txt /by-ids\nCOPY --chown=9 a.txt /by-uid\nCOPY --chown=app dir/ /new/parent/\nCOPY a.txt /default\n",
    );
    p.write(
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\napp:x:1234:999:app:/home/app:/bin/sh\n",
    );
    p.write("etc/group", "root:x:0:\nstaff:x:50:\n");
    p.write("a.txt", "a\n");
    p.write("dir/f", "f\n");
    p.chown();
    let tar = p.dir.join("image.tar");
    ok(p.build(&["-o", &format!("type=tar,dest={}", tar.display())]));
    let list = tar_listing(&tar);
    let owner = |path: &str| {
        list.get(path)
            .unwrap_or_else(|| panic!("{path} missing from {list:?}"))
            .1
            .clone()
    };
    // A user alone sets gid = uid, as BuildKit does.
    assert_eq!(owner("by-name"), "1234/1234");
    assert_eq!(owner("by-names"), "1234/50");
    assert_eq!(owner("by-ids"), "7/8");
    assert_eq!(owner("by-uid"), "9/9");
    assert_eq!(owner("new/parent/f"), "1234/1234");
    assert_eq!(owner("new"), "1234/1234", "created parents get the owner");
    assert_eq!(owner("default"), "0/0");

    let bad = Project::new(
        "copy-chown-missing",
        "FROM scratch\nCOPY etc/ /etc/\nCOPY --chown=nosuchuser a.txt /x\n",
    );
    bad.write("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n");
    bad.write("etc/group", "root:x:0:\n");
    bad.write("a.txt", "a\n");
    bad.chown();
    let err = failed(bad.build(&[]));
    assert!(
        err.contains("Dockerfile:3") && err.contains("nosuchuser"),
        "{err}"
    );
}

/// Make `ctx/NAME` from `ctx/tree` with `tar` and `flags` (compression).
fn make_archive(p: &Project, name: &str, flags: &[&str]) {
    run_checked(
        Command::new("tar")
            .args(flags)
            .arg("-cf")
            .arg(p.ctx().join(name))
            .arg("-C")
            .arg(p.ctx().join("tree"))
            .arg("."),
    );
}

#[test]
fn add_copies_local_files_and_extracts_local_archives() {
    let p = Project::new(
        "add-local",
        "FROM scratch\nADD a.txt /a\nADD tree/ /tree-copy/\nADD plain.tar /plain/\nADD t.tgz /gz\nADD t.tbz2 /bz2/\nADD t.txz /xz/\nADD t.tzst /zst/\nADD --unpack=false plain.tar /kept/\nADD fake.tar.gz /fake/\nADD --chown=5:6 --chmod=0750 t.tgz /owned/\nADD <<EOF /add-heredoc\nfrom a heredoc\nEOF\n",
    );
    p.write("a.txt", "a\n");
    p.write("tree/top.txt", "top\n");
    p.write("tree/sub/deep.txt", "deep\n");
    p.write("fake.tar.gz", "not an archive at all\n");
    std::os::unix::fs::symlink("top.txt", p.ctx().join("tree/link")).unwrap();
    p.chown();
    p.chmod("tree/top.txt", 0o600);
    make_archive(&p, "plain.tar", &["--owner=21", "--group=22"]);
    make_archive(&p, "t.tgz", &["-z", "--owner=21", "--group=22"]);
    make_archive(&p, "t.tbz2", &["-j"]);
    make_archive(&p, "t.txz", &["-J"]);
    make_archive(&p, "t.tzst", &["--zstd"]);
    p.chown();
    let out = p.build_local("out");
    assert_eq!(read(&out.join("a")), "a\n");
    assert_eq!(read(&out.join("tree-copy/sub/deep.txt")), "deep\n");
    for d in ["plain", "gz", "bz2", "xz", "zst"] {
        let d = out.join(d);
        assert_eq!(read(&d.join("top.txt")), "top\n", "{}", d.display());
        assert_eq!(read(&d.join("sub/deep.txt")), "deep\n", "{}", d.display());
        assert_eq!(mode(&d.join("top.txt")), 0o600, "{}", d.display());
        assert_eq!(
            std::fs::read_link(d.join("link")).unwrap(),
            Path::new("top.txt")
        );
    }
    // --unpack=false and a file that only looks like an archive by name
    // are copied as they are.
    assert!(out.join("kept/plain.tar").is_file());
    assert_eq!(
        read(&out.join("fake/fake.tar.gz")),
        "not an archive at all\n"
    );
    assert_eq!(read(&out.join("add-heredoc")), "from a heredoc\n");
    assert_eq!(mode(&out.join("owned/top.txt")), 0o750);

    // An archive's owners are kept unless --chown is given.
    let tar = p.dir.join("image.tar");
    ok(p.build(&["-o", &format!("type=tar,dest={}", tar.display())]));
    let list = tar_listing(&tar);
    assert_eq!(list["plain/top.txt"].1, "21/22", "{list:?}");
    assert_eq!(list["gz/sub/deep.txt"].1, "21/22");
    assert_eq!(list["owned/sub/deep.txt"].1, "5/6");
    assert_eq!(list["a"].1, "0/0");
}

#[test]
fn add_of_a_git_repository_over_ssh_without_an_agent_is_a_clear_error() {
    let src = "git@example.com:org/repo.git";
    let p = Project::new("add-remote", &format!("FROM scratch\n\nADD {src} /dest/\n"));
    p.chown();
    let err = failed(p.build(&[]));
    assert!(err.contains("Dockerfile:3"), "{err}");
    assert!(err.contains(src), "names the source: {err}");
    assert!(
        err.contains("git over SSH needs an agent: give --ssh default"),
        "{err}"
    );
}

#[test]
fn errors_name_the_line_and_the_source() {
    let p = Project::new(
        "copy-errors",
        "FROM scratch\nCOPY a.txt /a\nCOPY missing-file.txt /b\n",
    );
    p.write("a.txt", "a\n");
    p.chown();
    let err = failed(p.build(&[]));
    assert!(
        err.contains("Dockerfile:3") && err.contains("missing-file.txt"),
        "{err}"
    );
    // a wildcard that matches nothing copies nothing, as in BuildKit, and
    // the destination directory is still made
    let p = Project::new("copy-errors-glob", "FROM scratch\nCOPY nothing-*.txt /b/\n");
    p.chown();
    let out = p.build_local("out");
    assert!(out.join("b").is_dir());
    assert_eq!(std::fs::read_dir(out.join("b")).unwrap().count(), 0);
    let p = Project::new(
        "copy-errors-many",
        "FROM scratch\nCOPY a.txt b.txt /notdir\n",
    );
    p.write("a.txt", "a\n");
    p.write("b.txt", "b\n");
    p.chown();
    let err = failed(p.build(&[]));
    assert!(
        err.contains("Dockerfile:2") && err.contains("/notdir"),
        "{err}"
    );
}

fn cached(err: &str) -> usize {
    let line = err
        .lines()
        .rev()
        .find(|l| l.contains(" cached"))
        .unwrap_or_else(|| panic!("no summary in {err}"));
    let before = line.split(" cached").next().unwrap();
    before
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{line}"))
}

#[test]
fn cache_key_covers_copied_content_modes_and_link_targets_not_mtime() {
    let p = Project::new(
        "copy-cache",
        "FROM scratch\nCOPY dir/ /dir/\nCOPY other.txt /other\nADD t.tgz /x/\n",
    );
    p.write("dir/f", "f\n");
    p.write("other.txt", "o\n");
    p.write("unrelated.txt", "u\n");
    std::os::unix::fs::symlink("f", p.ctx().join("dir/l")).unwrap();
    p.write("tree/t", "t\n");
    make_archive(&p, "t.tgz", &["-z"]);
    p.chown();
    ok(p.build(&[]));
    assert_eq!(cached(&ok(p.build(&[]))), 3, "nothing changed");
    // mtime and files no step copies do not matter.
    run_checked(
        Command::new("touch")
            .arg("-d")
            .arg("2001-01-01")
            .arg(p.ctx().join("dir/f")),
    );
    p.write("unrelated.txt", "changed\n");
    assert_eq!(cached(&ok(p.build(&[]))), 3, "mtime is not in the key");
    // A mode change re-runs the first COPY and what follows it.
    p.chmod("dir/f", 0o600);
    assert_eq!(cached(&ok(p.build(&[]))), 0, "mode is in the key");
    assert_eq!(cached(&ok(p.build(&[]))), 3);
    // A link target is content.
    std::fs::remove_file(p.ctx().join("dir/l")).unwrap();
    std::os::unix::fs::symlink("g", p.ctx().join("dir/l")).unwrap();
    assert_eq!(cached(&ok(p.build(&[]))), 0, "link target is in the key");
    // A changed byte of the last source re-runs only that step.
    p.write("other.txt", "O\n");
    assert_eq!(cached(&ok(p.build(&[]))), 1, "bytes are in the key");
    // The archive's bytes are in the key of the ADD.
    p.write("tree/t", "T\n");
    std::fs::remove_file(p.ctx().join("t.tgz")).unwrap();
    make_archive(&p, "t.tgz", &["-z"]);
    assert_eq!(cached(&ok(p.build(&[]))), 2, "archive bytes are in the key");
}

fn tar_entry(name: &str, kind: u8, link: &str, data: &[u8]) -> Vec<u8> {
    kiln_vm_tests::rawtar::entry(name, kind, link, data, 0o644)
}

fn tar_of(entries: &[Vec<u8>]) -> Vec<u8> {
    kiln_vm_tests::rawtar::archive(entries)
}

#[test]
fn malicious_archives_are_refused_and_the_host_is_unchanged() {
    let base = test_dir("evil-host");
    let host = base.join("host");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o777)).unwrap();
    let host_str = host.display().to_string();
    let dotdots = "../".repeat(12);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            tar_of(&[tar_entry(
                &format!(
                    "{dotdots}{}/dotdot-escape",
                    host_str.trim_start_matches('/')
                ),
                b'0',
                "",
                b"x",
            )]),
            "..",
        ),
        (
            "absolute",
            tar_of(&[tar_entry(
                &format!("{host_str}/absolute-escape"),
                b'0',
                "",
                b"x",
            )]),
            "absolute",
        ),
        (
            "symlink",
            tar_of(&[
                tar_entry("evil", b'2', &host_str, b""),
                tar_entry("evil/symlink-escape", b'0', "", b"x"),
            ]),
            "symlink",
        ),
        (
            "hardlink",
            tar_of(&[tar_entry("evil", b'1', "/etc/passwd", b"")]),
            "hard link",
        ),
    ];
    for (name, bytes, word) in cases {
        let p = Project::new(
            &format!("add-evil-{name}"),
            "FROM scratch\nADD evil.tar /unpacked/\n",
        );
        std::fs::write(p.ctx().join("evil.tar"), &bytes).unwrap();
        let err = failed(p.build(&[]));
        assert!(err.contains("Dockerfile:2"), "{name}: {err}");
        assert!(err.contains("evil.tar"), "{name}: {err}");
        assert!(err.contains(word), "{name}: {err}");
        let left: Vec<_> = std::fs::read_dir(&host).unwrap().collect();
        assert!(left.is_empty(), "{name}: the host directory was written");
        // Nothing escaped into the state directory either.
        let found = Command::new("find")
            .arg(p.dir.join("state"))
            .arg("-name")
            .arg("*-escape")
            .output()
            .unwrap();
        assert!(found.stdout.is_empty(), "{name}: {found:?}");
    }
}

#[test]
fn local_export_strips_setid_bits_unless_asked_to_keep_them() {
    let p = Project::new(
        "local-setid",
        "FROM scratch\nCOPY files/ /files/\nCOPY --chmod=4755 files/run /suid\nCOPY --chmod=2755 files/run /sgid\n",
    );
    p.write("files/run", "#!/bin/sh\n");
    p.write("files/shared/x", "x\n");
    p.chown();
    p.chmod("files/shared", 0o2775);
    let out = p.build_local("out");
    assert_eq!(
        mode(&out.join("suid")),
        0o755,
        "setuid kept on the caller's file"
    );
    assert_eq!(
        mode(&out.join("sgid")),
        0o755,
        "setgid kept on the caller's file"
    );
    // a setgid directory gives no privilege: kept
    assert_eq!(mode(&out.join("files/shared")), 0o2775);
    let kept = p.dir.join("kept");
    ok(p.build(&[
        "-o",
        &format!("type=local,dest={},keep-setid=true", kept.display()),
    ]));
    assert_eq!(mode(&kept.join("suid")), 0o4755);
    assert_eq!(mode(&kept.join("sgid")), 0o2755);
}

/// Write `text` to `path`, then set its mtime to `mtime`.
fn write_with_mtime(path: &Path, text: &str, mtime: std::time::SystemTime) {
    std::fs::write(path, text).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(mtime).unwrap();
}

/// The stat cache (engine::statcache) lets a rebuild skip hashing files
/// whose stat is unchanged; a file rewritten in place with its old size
/// and mtime has a new ctime, and one renamed over it a new inode, so both
/// are hashed again. A hundred files take the parallel hash and copy.
#[test]
fn the_stat_cache_sees_a_file_rewritten_with_its_old_size_and_mtime() {
    let p = Project::new("copy-statcache", "FROM scratch\nCOPY . /ctx/\n");
    for i in 0..100 {
        p.write(&format!("many/d{}/f{i}", i % 7), &format!("file {i}\n"));
    }
    p.write("f", "aaaa\n");
    p.write("g", "gggg\n");
    p.chown();
    // files changed in the last 2 s are hashed but not remembered
    std::thread::sleep(std::time::Duration::from_secs(3));
    let first = p.build_local("out1");
    for i in 0..100 {
        assert_eq!(
            read(&first.join(format!("ctx/many/d{}/f{i}", i % 7))),
            format!("file {i}\n")
        );
    }
    let again = ok(p.build(&[]));
    assert_eq!(cached(&again), 1, "{again}");
    assert!(
        again.contains("checksum 0.0 MB"),
        "a rebuild reads no unchanged file:\n{again}"
    );

    // same size, mtime put back: only the ctime moved
    let f = p.ctx().join("f");
    let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
    write_with_mtime(&f, "bbbb\n", mtime);
    let out = p.build_local("out2");
    assert_eq!(
        read(&out.join("ctx/f")),
        "bbbb\n",
        "a stale checksum was used"
    );

    // a new inode renamed over g with g's size and mtime
    let g = p.ctx().join("g");
    let mtime = std::fs::metadata(&g).unwrap().modified().unwrap();
    let tmp = p.ctx().join("g.new");
    write_with_mtime(&tmp, "hhhh\n", mtime);
    std::fs::rename(&tmp, &g).unwrap();
    p.chown();
    let out = p.build_local("out3");
    assert_eq!(
        read(&out.join("ctx/g")),
        "hhhh\n",
        "a stale checksum was used"
    );
}

#[test]
fn an_archive_is_extracted_through_the_images_directory_links_never_out_of_it() {
    use kiln_vm_tests::rawtar::{archive, entry};
    let p = Project::new(
        "add-through-links",
        "FROM scratch\nADD base.tar /\nADD payload.tar /\n",
    );
    // the image: /real a directory, /abs -> /real, /up -> a path that
    // climbs out of any root, /file -> /real/f (not a directory)
    let base = archive(&[
        entry("real/", b'5', "", b"", 0o755),
        entry("abs", b'2', "/real", b"", 0o777),
        entry(
            "up",
            b'2',
            "../../../../../../../../tmp/kiln-through-links",
            b"",
            0o777,
        ),
    ]);
    // the payload names those links as directories
    let payload = archive(&[
        entry("abs/", b'5', "", b"", 0o755),
        entry("abs/a.txt", b'0', "", b"through\n", 0o644),
        entry("up/", b'5', "", b"", 0o755),
        entry("up/b.txt", b'0', "", b"not out\n", 0o644),
    ]);
    std::fs::write(p.ctx().join("base.tar"), base).unwrap();
    std::fs::write(p.ctx().join("payload.tar"), payload).unwrap();
    p.chown();
    let _ = std::fs::remove_dir_all("/tmp/kiln-through-links");
    let out = p.build_local("out");
    // a link to a directory is written through and kept
    assert_eq!(read(&out.join("real/a.txt")), "through\n");
    assert_eq!(
        std::fs::read_link(out.join("abs")).unwrap(),
        Path::new("/real")
    );
    // a link to nothing in the image is replaced, as docker's untar does;
    // nothing is written outside the image
    assert_eq!(read(&out.join("up/b.txt")), "not out\n");
    assert!(!Path::new("/tmp/kiln-through-links").exists());
}
