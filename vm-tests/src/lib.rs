//! Shared harness for kiln's end-to-end tests: everything here exists so that
//! a test runs kiln (or a test helper) the way a user would, as an
//! unprivileged user with a subordinate id range, against the real kernel.
//!
//! When the test process is root (as on CI), commands are dropped to the
//! dedicated user `kiln-test`, created on first use with its own
//! /etc/subuid and /etc/subgid ranges. Binaries and fixtures are copied to
//! a world-readable scratch directory first, because the clone may live
//! under a 0700 home.
//!
//! This harness must never make a test pass that should fail: every setup
//! step that cannot be done panics with the reason.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// Name of the unprivileged user tests run as when started by root.
pub const TEST_USER: &str = "kiln-test";
/// First subordinate id given to [`TEST_USER`], and how many.
const TEST_SUBID_START: u32 = 300_000;
const TEST_SUBID_COUNT: u32 = 65_536;

/// Where binaries and fixtures are staged so the test user can read them.
pub fn scratch_root() -> PathBuf {
    PathBuf::from("/tmp/kiln-vm-tests")
}

/// Whether the test process runs as real root (then commands are dropped to
/// [`TEST_USER`]).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The uid and gid tests run kiln as: `kiln-test` when root, else ourselves.
pub fn test_ids() -> (u32, u32) {
    if running_as_root() {
        ensure_test_user();
        let out = run_checked(Command::new("id").arg("-u").arg(TEST_USER));
        let uid = parse_u32(&out);
        let out = run_checked(Command::new("id").arg("-g").arg(TEST_USER));
        (uid, parse_u32(&out))
    } else {
        let uid = parse_u32(&run_checked(Command::new("id").arg("-u")));
        let gid = parse_u32(&run_checked(Command::new("id").arg("-g")));
        (uid, gid)
    }
}

/// The first id of the test user's subordinate range, as /etc/subuid says.
pub fn test_subuid_start() -> Option<u32> {
    let (uid, _) = test_ids();
    let name =
        String::from_utf8(run_checked(Command::new("id").arg("-un").arg(uid.to_string())).stdout)
            .expect("user name is utf-8");
    let name = name.trim();
    let subuid = fs::read_to_string("/etc/subuid").ok()?;
    subuid.lines().find_map(|l| {
        let mut f = l.split(':');
        let who = f.next()?;
        let start = f.next()?.parse().ok()?;
        (who == name || who == uid.to_string()).then_some(start)
    })
}

/// Create the local user `name` unless it exists.
fn create_user(name: &str) {
    let exists = Command::new("id")
        .arg(name)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !exists {
        run_checked(Command::new("useradd").args(["--create-home", "--shell", "/bin/sh", name]));
    }
}

/// Create [`TEST_USER`] with a subordinate id range and make /dev/fuse usable,
/// once per machine. Only called when running as root.
fn ensure_test_user() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let _lock = FileLock::acquire(Path::new("/tmp/kiln-vm-tests.lock"));
        create_user(TEST_USER);
        for file in ["/etc/subuid", "/etc/subgid"] {
            let text = fs::read_to_string(file).unwrap_or_default();
            if !text
                .lines()
                .any(|l| l.starts_with(&format!("{TEST_USER}:")))
            {
                let mut f = fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o644)
                    .open(file)
                    .expect(file);
                writeln!(f, "{TEST_USER}:{TEST_SUBID_START}:{TEST_SUBID_COUNT}").expect(file);
            }
        }
        // Debian ships /dev/fuse 0666; some CI machines have 0600.
        if let Ok(meta) = fs::metadata("/dev/fuse") {
            if meta.permissions().mode() & 0o666 != 0o666 {
                fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(0o20666))
                    .expect("chmod /dev/fuse");
            }
        }
    });
}

/// Copy `src` (a binary or fixture file) into the scratch directory, readable
/// and executable by everyone, and return the copy's path. Each source is
/// staged once per test process.
pub fn stage_file(src: &Path) -> PathBuf {
    static STAGED: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());
    let mut staged = STAGED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, dst)) = staged.iter().find(|(s, _)| s == src) {
        return dst.clone();
    }
    let dir = scratch_root()
        .join("bin")
        .join(std::process::id().to_string());
    fs::create_dir_all(&dir).expect("create scratch dir");
    for d in [scratch_root(), scratch_root().join("bin"), dir.clone()] {
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod scratch");
    }
    let name = src.file_name().expect("file name");
    let dst = dir.join(name);
    // Copy in a child process: a write descriptor held by this (threaded)
    // process could leak into a concurrent fork and make exec of the copy
    // fail with ETXTBSY.
    run_checked(Command::new("cp").arg(src).arg(&dst));
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).expect("chmod staged file");
    staged.push((src.to_path_buf(), dst.clone()));
    dst
}

/// The `kiln` binary under test: `$KILN_BIN`, or `kiln` in the cargo target
/// directory these tests were built into (build it with `cargo build --bins`).
pub fn kiln_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/kiln
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("kiln"))
        .expect("target dir");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --bins` before the tests, or set KILN_BIN",
        bin.display()
    );
    bin
}

/// `kiln ARGS...` as the unprivileged test user.
pub fn kiln<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = unprivileged(&kiln_binary());
    cmd.args(args);
    cmd
}

/// Remove the scratch directories (`work/NAME-PID`, `bin/PID`) of test
/// processes that have ended, once per process: a test that fails keeps
/// its directory for a look, but no run leaves it forever.
fn sweep_dead_runs() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        for (sub, pid_of) in [
            (
                "work",
                (|n: &str| n.rsplit('-').next().map(String::from)) as fn(&str) -> Option<String>,
            ),
            ("bin", |n: &str| Some(n.to_string())),
        ] {
            let Ok(entries) = fs::read_dir(scratch_root().join(sub)) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(pid) = pid_of(&name).filter(|p| p.parse::<u32>().is_ok()) else {
                    continue;
                };
                if !Path::new("/proc").join(&pid).exists() {
                    // best effort: a busy leftover waits for a later run
                    try_remove_tree(&e.path());
                }
            }
        }
    });
}

/// A fresh scratch directory owned by the test user, for state and outputs.
pub fn test_dir(name: &str) -> PathBuf {
    sweep_dead_runs();
    let dir = scratch_root()
        .join("work")
        .join(format!("{name}-{}", std::process::id()));
    if dir.exists() {
        remove_tree(&dir);
    }
    fs::create_dir_all(&dir).expect("create test dir");
    fs::set_permissions(scratch_root(), fs::Permissions::from_mode(0o755)).expect("chmod scratch");
    fs::set_permissions(
        scratch_root().join("work"),
        fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    if running_as_root() {
        let (uid, gid) = test_ids();
        run_checked(Command::new("chown").arg(format!("{uid}:{gid}")).arg(&dir));
    }
    dir
}

/// Remove a tree that the test user (and its subordinate ids) may own parts
/// of. As root plain removal works; as a user, files owned by subordinate ids
/// are removed from inside a user namespace.
pub fn remove_tree(dir: &Path) {
    assert!(try_remove_tree(dir), "cannot remove {}", dir.display());
}

/// [`remove_tree`] that says whether it worked instead of panicking.
fn try_remove_tree(dir: &Path) -> bool {
    if fs::remove_dir_all(dir).is_ok() || !dir.exists() {
        return true;
    }
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("u+rwx")
        .arg(dir)
        .status();
    if fs::remove_dir_all(dir).is_ok() {
        return true;
    }
    Command::new("unshare")
        .args(["--user", "--map-root-user", "--map-auto", "--", "rm", "-rf"])
        .arg(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A command that runs `program` as the unprivileged test user. When the
/// test process is not root it runs as ourselves; when root, the program is
/// staged and started through `setpriv` as [`TEST_USER`], with a clean
/// environment a login would give.
pub fn unprivileged(program: &Path) -> Command {
    if !running_as_root() {
        return Command::new(program);
    }
    ensure_test_user();
    as_test_user(&stage_file(program))
}

/// A copy of `program` owned by [`TEST_USER`] (when root; else by us):
/// the real situation of a user who built kiln, whose own steps run as
/// that user outside their namespaces, so a step that reached the binary
/// could write it.
pub fn owned_by_test_user(program: &Path) -> PathBuf {
    let dir = scratch_root()
        .join("bin")
        .join(std::process::id().to_string())
        .join("owned");
    fs::create_dir_all(&dir).expect("create scratch dir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod scratch");
    let dst = dir.join(program.file_name().expect("file name"));
    if !dst.exists() {
        run_checked(Command::new("cp").arg(program).arg(&dst));
        if running_as_root() {
            ensure_test_user();
            run_checked(Command::new("chown").arg(format!("{TEST_USER}:")).arg(&dst));
        }
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).expect("chmod copy");
    }
    dst
}

/// Run `staged` (a path the test user can execute) as [`TEST_USER`] when
/// root, else as ourselves.
pub fn as_test_user(staged: &Path) -> Command {
    if !running_as_root() {
        return Command::new(staged);
    }
    let home = format!("/home/{TEST_USER}");
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid",
        TEST_USER,
        "--regid",
        TEST_USER,
        "--init-groups",
        "--reset-env",
        "--",
    ])
    .arg(staged)
    .env("HOME", &home)
    .current_dir("/");
    cmd
}

/// A second unprivileged user that has no subordinate id range, to test
/// kiln's single-id fallback. Only exists when the tests run as root.
pub const NOSUB_USER: &str = "kiln-nosub";

/// `program` as [`NOSUB_USER`]; `None` when the tests do not run as root
/// (then no such user can be made).
pub fn unprivileged_without_subids(program: &Path) -> Option<Command> {
    if !running_as_root() {
        return None;
    }
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let _lock = FileLock::acquire(Path::new("/tmp/kiln-vm-tests.lock"));
        create_user(NOSUB_USER);
        for file in ["/etc/subuid", "/etc/subgid"] {
            let text = fs::read_to_string(file).unwrap_or_default();
            let kept: String = text
                .lines()
                .filter(|l| !l.starts_with(&format!("{NOSUB_USER}:")))
                .map(|l| format!("{l}\n"))
                .collect();
            if kept != text {
                fs::write(file, kept).expect(file);
            }
        }
    });
    let staged = stage_file(program);
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid",
        NOSUB_USER,
        "--regid",
        NOSUB_USER,
        "--init-groups",
        "--reset-env",
        "--",
    ])
    .arg(staged)
    .current_dir("/");
    Some(cmd)
}

/// Like [`unprivileged`], but the program starts as uid 0 of a new user
/// namespace mapping the test user to 0 and its subordinate range to
/// 1..65536, in a private mount namespace (util-linux `unshare --map-auto`).
pub fn in_userns(program: &Path) -> Command {
    let mut cmd = unprivileged(Path::new("/usr/bin/unshare"));
    cmd.args([
        "--user",
        "--map-root-user",
        "--map-auto",
        "--mount",
        "--propagation",
        "private",
        "--",
    ]);
    if running_as_root() {
        cmd.arg(stage_file(program));
    } else {
        cmd.arg(program);
    }
    cmd
}

/// Run a command and panic with its output when it fails to start or exits
/// non-zero.
pub fn run_checked(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn parse_u32(out: &Output) -> u32 {
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric id")
}

/// An exclusive lock on a file, held until dropped.
struct FileLock(#[allow(dead_code)] fs::File);

impl FileLock {
    fn acquire(path: &Path) -> Self {
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open lock file");
        // SAFETY: `f` owns a valid open file descriptor for the whole call.
        let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {}", path.display());
        FileLock(f)
    }
}

/// Build a minimal rootfs from Debian's busybox-static at `dir`: /bin with
/// busybox and a link per applet, /etc/passwd and /etc/group with root and
/// user 1000, and empty /proc, /dev, /sys, /tmp. Readable by the test user.
pub fn busybox_rootfs(dir: &Path) {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing: install Debian's busybox-static (apt-get install busybox-static)"
    );
    for d in [
        "bin",
        "etc",
        "proc",
        "dev",
        "sys",
        "tmp",
        "root",
        "home/user",
    ] {
        fs::create_dir_all(dir.join(d)).expect("mkdir rootfs");
    }
    fs::copy(busybox, dir.join("bin/busybox")).expect("copy busybox");
    let list = run_checked(Command::new(busybox).arg("--list"));
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = dir.join("bin").join(applet);
        if applet != "busybox" && !link.exists() {
            std::os::unix::fs::symlink("busybox", &link).expect("applet link");
        }
    }
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n").expect("passwd");
    fs::write(
        dir.join("etc/group"),
        "root:x:0:\nuser:x:1000:\nwheel:x:10:user\nnogroup:x:65534:\n",
    )
    .expect("group");
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777)).expect("chmod tmp");
    run_checked(Command::new("chmod").arg("-R").arg("a+rX").arg(dir));
}

/// Make `dir` readable by everyone and, when the tests run as root, owned
/// by the test user, so kiln (run as that user) can use it.
pub fn give_to_test_user(dir: &Path) {
    run_checked(Command::new("chmod").arg("-R").arg("a+rX").arg(dir));
    if running_as_root() {
        let (uid, gid) = test_ids();
        run_checked(
            Command::new("chown")
                .arg("-R")
                .arg(format!("{uid}:{gid}"))
                .arg(dir),
        );
    }
}

/// Debian's docker-registry serving `config` as the test user, returned
/// once it accepts connections on 127.0.0.1:`port`.
pub fn spawn_registry(config: &Path, port: u16) -> std::process::Child {
    let child = unprivileged(Path::new("/usr/bin/docker-registry"))
        .arg("serve")
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start docker-registry (apt-get install docker-registry)");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "docker-registry did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child
}

/// Rootless podman as the test user, with its storage under `dir` (vfs,
/// cgroupfs: this host's hybrid cgroups stop podman's default setup).
/// `tag` keeps the run directory of concurrent test binaries apart; podman
/// limits that path to 50 characters.
pub fn podman(dir: &Path, tag: &str, args: &[&str]) -> Output {
    assert!(
        Path::new("/usr/bin/podman").exists(),
        "podman is missing: run scripts/setup-host.sh (apt-get install podman runc)"
    );
    let mut cmd = unprivileged(Path::new("/usr/bin/podman"));
    cmd.arg("--root")
        .arg(dir.join("podman-root"))
        .arg("--runroot")
        .arg(podman_runroot(tag))
        .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
        .args(args);
    cmd.output().expect("run podman")
}

/// The run directory [`podman`] uses for `tag` in this process.
pub fn podman_runroot(tag: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/kiln-{tag}-run-{}", std::process::id()))
}

/// The libtest arguments that run exactly the one test `name` of a test
/// binary, ignored or not, its output shown, on one thread.
pub fn one_test_args(name: &str) -> [&str; 5] {
    [
        name,
        "--exact",
        "--nocapture",
        "--test-threads=1",
        "--include-ignored",
    ]
}

/// Whether this process runs in a user namespace other than the initial
/// one (a test re-run by [`rerun_in_userns`] or [`run_inner_test`]).
pub fn inside_userns() -> bool {
    let map = fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    !map.split_whitespace()
        .collect::<Vec<_>>()
        .starts_with(&["0", "0", "4294967295"])
}

/// Run the test `name` of this very test binary in a fresh user namespace
/// as the test user (see [`in_userns`]), with `extra` arguments after
/// libtest's, and panic with its output unless exactly that test passed.
/// The user switch resets the environment, so the test's settings
/// (`KILN_*`) and `CI` are passed on through env(1). Returns the inner
/// run's stderr. One at a time per process: staging copies the binary to
/// a fixed path, and it keeps a shared machine calm.
fn run_test_in_userns(name: &str, extra: &[&std::ffi::OsStr]) -> String {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = in_userns(Path::new("/usr/bin/env"));
    for (k, v) in std::env::vars() {
        if k.starts_with("KILN_") || k == "CI" {
            cmd.arg(format!("{k}={v}"));
        }
    }
    if running_as_root() {
        cmd.arg(stage_file(&exe));
    } else {
        cmd.arg(&exe);
    }
    let out = cmd
        .args(one_test_args(name))
        .args(extra)
        .output()
        .expect("run test in user namespace");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name} failed inside the user namespace ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stderr.into_owned()
}

/// Re-run the test `name` (the caller itself) inside a fresh user
/// namespace as the unprivileged test user, the way kiln runs (uid 0 = the
/// test user, 1..65536 = its subordinate ids, a private mount namespace).
/// Returns true when the caller already runs inside and should run its
/// body; otherwise runs it there, panics if it fails, echoes the inner
/// run's stderr lines that start with one of `echo` (a test's own summary
/// lines), and returns false.
pub fn rerun_in_userns(name: &str, echo: &[&str]) -> bool {
    if inside_userns() {
        return true;
    }
    let stderr = run_test_in_userns(name, &[]);
    for l in stderr
        .lines()
        .filter(|l| echo.iter().any(|p| l.starts_with(p)))
    {
        eprintln!("{l}");
    }
    false
}

/// Run the ignored test `inner` of this test binary inside a fresh user
/// namespace (see [`rerun_in_userns`]), passing the scratch directory `dir`
/// as an extra argument the inner test reads with [`inner_test_dir`];
/// panics with the inner output when it fails, and removes `dir` after.
pub fn run_inner_test(inner: &str, dir: &Path) {
    run_test_in_userns(inner, &[dir.as_os_str()]);
    remove_tree(dir);
}

/// In an inner test started by [`run_inner_test`]: its scratch directory.
pub fn inner_test_dir() -> Option<PathBuf> {
    std::env::args()
        .skip(1)
        .find(|a| a.starts_with('/'))
        .map(PathBuf::from)
}

/// Tar archives built header by header, for the malformed and malicious
/// entries honest tar writers refuse to produce.
pub mod rawtar {
    /// One ustar header block (plus data, padded) with raw fields.
    pub fn entry(name: &str, kind: u8, link: &str, data: &[u8], mode: u32) -> Vec<u8> {
        header(name, kind, link, data.len(), mode, data)
    }

    /// As [`entry`], but the header claims `size` whatever `data` holds
    /// (for headers that disagree with their PAX records).
    pub fn header(
        name: &str,
        kind: u8,
        link: &str,
        size: usize,
        mode: u32,
        data: &[u8],
    ) -> Vec<u8> {
        assert!(
            name.len() < 100 && link.len() < 100,
            "{name} fits a ustar name"
        );
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(format!("{mode:07o}\0").as_bytes());
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let mut out = h.to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    /// PAX extended header records (`len key=value\n`) as one entry.
    pub fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (k, v) in records {
            let rest = k.len() + v.len() + 3; // ' ', '=', '\n'
            let mut len = rest + 1;
            while len != rest + len.to_string().len() {
                len = rest + len.to_string().len();
            }
            body.extend_from_slice(format!("{len} {k}=").as_bytes());
            body.extend_from_slice(v);
            body.push(b'\n');
        }
        entry("PaxHeaders/x", b'x', "", &body, 0o644)
    }

    /// The entries followed by the two zero blocks that end an archive.
    pub fn archive(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut out: Vec<u8> = entries.concat();
        out.extend_from_slice(&[0u8; 1024]);
        out
    }
}

/// A build project for end-to-end tests: a context at `ctx/` holding a
/// busybox tree at `ctx/rootfs/` and a Dockerfile, with state directories
/// and outputs beside it, all owned by the test user.
pub struct Project {
    pub dir: PathBuf,
}

impl Project {
    pub fn new(name: &str, dockerfile: &str) -> Project {
        let dir = test_dir(name);
        busybox_rootfs(&dir.join("ctx/rootfs"));
        fs::write(dir.join("ctx/Dockerfile"), dockerfile).expect("write Dockerfile");
        give_to_test_user(&dir);
        Project { dir }
    }

    pub fn ctx(&self) -> PathBuf {
        self.dir.join("ctx")
    }

    /// Write a file of the context (parents made) and give it to the
    /// test user.
    pub fn write(&self, rel: &str, text: &str) {
        let p = self.ctx().join(rel);
        fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
        fs::write(&p, text).expect("write context file");
        give_to_test_user(&self.ctx());
    }

    /// The state directory `name` (created by kiln on first use).
    pub fn state(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// `--root STATE build EXTRA... CONTEXT`
    pub fn build_args(&self, state: &str, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["--root".to_string(), self.state(state), "build".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(self.ctx().display().to_string());
        args
    }

    /// `kiln build EXTRA...` on the state directory `state`.
    pub fn build(&self, extra: &[&str]) -> Output {
        kiln(self.build_args("state", extra))
            .output()
            .expect("run kiln build")
    }

    /// `-o type=local,dest=DIR/out`
    pub fn local_out(&self) -> String {
        format!("type=local,dest={}", self.dir.join("out").display())
    }

    /// A file of the `out/` local output.
    pub fn out(&self, rel: &str) -> String {
        fs::read_to_string(self.dir.join("out").join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }
}

/// The stdout and stderr of a kiln run that must have succeeded.
pub fn expect_success(o: Output) -> (String, String) {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success(),
        "kiln failed: {:?}\nstdout:\n{out}\nstderr:\n{err}",
        o.status
    );
    (out, err)
}

/// The stderr of a kiln run that must have failed.
pub fn expect_failure(o: Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "kiln should have failed:\n{err}");
    err
}

/// A test whose prerequisite is missing (root, a tool, an address): under
/// CI (`CI=true`) that is a failure with the reason, since a skipped test
/// proves nothing; elsewhere the test says why it did not run. Returns
/// only when the test may skip.
pub fn missing_prerequisite(reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("prerequisite missing under CI: {reason}");
    }
    eprintln!("skipped: {reason}");
    // listed at the end of scripts/test.sh, so a skip is never mistaken
    // for a pass
    let test = std::thread::current()
        .name()
        .unwrap_or("(unnamed test)")
        .to_string();
    let _ = fs::create_dir_all(scratch_root());
    if let Ok(mut f) = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(skipped_list())
    {
        use std::io::Write;
        let _ = writeln!(f, "{test}: {}", reason.replace('\n', " "));
    }
}

/// Where skipped tests are listed (`missing_prerequisite`).
pub fn skipped_list() -> PathBuf {
    scratch_root().join("skipped")
}

/// The host name of the first http(s) Debian mirror the machine's apt
/// sources name (one-line `.list` or deb822 `.sources` files).
pub fn apt_mirror_host() -> Option<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    files.iter().find_map(|f| {
        let text = fs::read_to_string(f).ok()?;
        text.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .flat_map(str::split_whitespace)
            .find_map(|w| {
                let rest = w
                    .strip_prefix("http://")
                    .or_else(|| w.strip_prefix("https://"))?;
                let host = rest.split(['/', ':']).next()?;
                (!host.is_empty()).then(|| host.to_string())
            })
    })
}

/// Whether the test runs as root; if not, [`missing_prerequisite`] says
/// that `what` needs root (a failure under CI).
pub fn root_for(what: &str) -> bool {
    if running_as_root() {
        return true;
    }
    missing_prerequisite(&format!("{what} needs root"));
    false
}

/// Copies of `needle` in the writable memory of process `pid` (as root).
pub fn copies_in_memory(pid: u32, needle: &[u8]) -> usize {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let Ok(mut mem) = std::fs::File::open(format!("/proc/{pid}/mem")) else {
        return 0;
    };
    let mut n = 0;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut buf = vec![0u8; usize::try_from(b - a).unwrap()];
        if mem.seek(SeekFrom::Start(a)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        n += buf.windows(needle.len()).filter(|w| *w == needle).count();
    }
    n
}

/// A field of `/proc/PID/status`, trimmed ("" when absent).
pub fn status_field(pid: u32, field: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Wait (at most a minute) until some process has `arg` among its
/// arguments; whether one did.
pub fn wait_for_process_with_arg(arg: &str) -> bool {
    let start = std::time::Instant::now();
    loop {
        let found = fs::read_dir("/proc").unwrap().flatten().any(|e| {
            fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
        });
        if found || start.elapsed().as_secs() > 60 {
            return found;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The `mediaType` of every layer of an image manifest (JSON).
pub fn layer_media_types(manifest: &serde_json::Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l["mediaType"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Processes whose command line is `sleep SECS` (a test's marker: pick
/// a number no other test sleeps).
pub fn sleepers(secs: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
        if cmdline == format!("sleep\0{secs}\0").as_bytes() {
            out.push(pid);
        }
    }
    out
}

/// Copy `bin` to `at` under `root` (with `strip`, its debug info left
/// out: an initramfs stays small), with the shared libraries ldd names
/// for it at their own paths.
pub fn install_with_libs(root: &Path, bin: &Path, at: &str, strip: bool) {
    let dest = root.join(at.trim_start_matches('/'));
    fs::create_dir_all(dest.parent().expect("a parent")).expect("mkdir");
    if strip {
        run_checked(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(bin)
                .arg(&dest),
        );
    } else {
        fs::copy(bin, &dest).expect("copy the binary");
    }
    let ldd = run_checked(Command::new("ldd").arg(bin));
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let to = root.join(lib.trim_start_matches('/'));
        if !to.exists() {
            fs::create_dir_all(to.parent().expect("a parent")).expect("mkdir");
            fs::copy(lib, &to).expect("copy a library");
        }
    }
}
