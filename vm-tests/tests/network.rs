//! End-to-end tests of the network modes (`sandbox`, `none`, `host`), run
//! as the unprivileged test user against the real kernel: what a step can
//! reach (never the host's loopback unless allowed), the DNS files it gets
//! and leaves behind (none), the entitlement check, and both user-mode
//! network stacks (pasta and the slirp4netns fallback).
//!
//! Every address these tests aim at is on the host's loopback or in a
//! network namespace a test makes itself.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use kiln_vm_tests::{
    busybox_rootfs, give_to_test_user, kiln, kiln_binary, run_checked, running_as_root, stage_file,
    test_dir, unprivileged,
};

/// A busybox rootfs owned by the test user, one per test.
fn rootfs(name: &str) -> PathBuf {
    let dir = test_dir(name);
    busybox_rootfs(&dir.join("rootfs"));
    give_to_test_user(&dir);
    dir.join("rootfs")
}

/// A directory holding only the named host programs, to build a PATH that
/// lacks the others.
fn path_with(name: &str, programs: &[&str]) -> PathBuf {
    let dir = test_dir(name).join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    for p in programs {
        std::os::unix::fs::symlink(Path::new("/usr/bin").join(p), dir.join(p)).unwrap();
    }
    give_to_test_user(&dir);
    dir
}

/// `kiln ARGS` as the test user with these environment variables (setpriv
/// resets the environment, so they go through env(1)).
fn kiln_env(env: &[(&str, String)], args: &[String]) -> Output {
    let mut cmd = unprivileged(Path::new("/usr/bin/env"));
    for (k, v) in env {
        cmd.arg(format!("{k}={v}"));
    }
    cmd.arg(stage_file(&kiln_binary()));
    cmd.args(args);
    cmd.output().expect("run kiln")
}

/// `kiln sandbox` on `root` with `extra` flags, running `script` in sh.
fn sandbox_args(root: &Path, extra: &[&str], script: &str) -> Vec<String> {
    let mut args = vec![
        "sandbox".to_string(),
        "--rootfs".into(),
        root.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["--".into(), "/bin/sh".into(), "-c".into(), script.into()]);
    args
}

/// The stack to force, as [`kiln_runtime`]'s `KILN_NETWORK_STACK`.
fn with_stack(stack: &str) -> Vec<(&'static str, String)> {
    vec![("KILN_NETWORK_STACK", stack.to_string())]
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "kiln failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

fn failed(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "kiln should have failed:\nstdout:\n{}\nstderr:\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stderr)
}

/// A TCP server on the host's 127.0.0.1 that answers every connection with
/// a marker line and counts the connections it accepted.
struct LoopbackServer {
    port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl LoopbackServer {
    fn start() -> LoopbackServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().unwrap().port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = std::sync::Arc::clone(&accepted);
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = s.write_all(b"host-loopback-reached\n");
            }
        });
        LoopbackServer { port, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A script that tries the server at 127.0.0.1 (the sandbox's own
/// loopback) and at the gateway address, printing what came back.
fn probe_script(port: u16, gateway: &str) -> String {
    format!(
        "gw={gateway}; [ -n \"$gw\" ] || gw=$(ip route | awk '/^default/ {{print $3}}'); \
         echo \"gateway=$gw\"; \
         echo lo:$(timeout 3 nc 127.0.0.1 {port} </dev/null 2>&1); \
         echo gw:$(timeout 3 nc $gw {port} </dev/null 2>&1)"
    )
}

/// The host's loopback is out of reach under `sandbox`, and reachable
/// through the gateway only with --allow-host-loopback, with `stack`.
fn host_loopback(stack: &str, gateway: &str) {
    let root = rootfs(&format!("net-loopback-{stack}"));
    let server = LoopbackServer::start();
    let script = probe_script(server.port, gateway);

    let out = ok(&kiln_env(
        &with_stack(stack),
        &sandbox_args(&root, &["--network", "sandbox"], &script),
    ));
    assert!(
        !out.contains("host-loopback-reached"),
        "{stack}: the sandbox reached the host's loopback:\n{out}"
    );
    assert!(out.contains("gateway="), "{out}");
    assert_eq!(
        server.accepted(),
        0,
        "{stack}: a connection got through:\n{out}"
    );

    let out = ok(&kiln_env(
        &with_stack(stack),
        &sandbox_args(
            &root,
            &["--network", "sandbox", "--allow-host-loopback"],
            &script,
        ),
    ));
    let gw_line = out.lines().find(|l| l.starts_with("gw:")).unwrap_or("");
    let lo_line = out.lines().find(|l| l.starts_with("lo:")).unwrap_or("");
    assert!(
        gw_line.contains("host-loopback-reached"),
        "{stack}: --allow-host-loopback should reach the host's loopback through the gateway:\n{out}"
    );
    assert!(
        !lo_line.contains("host-loopback-reached"),
        "{stack}: the sandbox's own 127.0.0.1 must stay its own:\n{out}"
    );
}

#[test]
fn pasta_keeps_the_host_loopback_out_unless_allowed() {
    host_loopback("pasta", "");
}

#[test]
fn slirp4netns_keeps_the_host_loopback_out_unless_allowed() {
    host_loopback("slirp4netns", "10.0.2.2");
}

#[test]
fn network_none_has_only_loopback_and_reaches_nothing() {
    let root = rootfs("net-none");
    let server = LoopbackServer::start();
    let out = ok(&kiln(sandbox_args(
        &root,
        &["--network", "none"],
        &format!(
            "ls /sys/class/net; echo lo:$(timeout 3 nc 127.0.0.1 {} </dev/null 2>&1)",
            server.port
        ),
    ))
    .output()
    .unwrap());
    let ifaces: Vec<&str> = out.lines().take_while(|l| !l.starts_with("lo:")).collect();
    assert_eq!(ifaces, ["lo"], "{out}");
    assert!(!out.contains("host-loopback-reached"), "{out}");
    assert_eq!(server.accepted(), 0);
}

#[test]
fn the_sandbox_stack_is_up_before_the_command_runs() {
    // The very first thing the command does is look at its interfaces: the
    // helper must have configured them before the child was released.
    let root = rootfs("net-ready");
    for stack in ["pasta", "slirp4netns"] {
        let out = ok(&kiln_env(
            &with_stack(stack),
            &sandbox_args(
                &root,
                &["--network", "sandbox"],
                "ip route; ls /sys/class/net",
            ),
        ));
        assert!(
            out.contains("default via"),
            "{stack}: no default route at start:\n{out}"
        );
        assert!(
            out.lines().any(|l| l != "lo" && !l.contains(' ')),
            "{stack}: no interface but lo:\n{out}"
        );
    }
}

#[test]
fn slirp4netns_is_the_fallback_when_pasta_is_missing() {
    let root = rootfs("net-fallback");
    let bin = path_with("net-fallback-path", &["slirp4netns"]);
    let out = ok(&kiln_env(
        &[("PATH", bin.display().to_string())],
        &sandbox_args(
            &root,
            &["--network", "sandbox"],
            "ls /sys/class/net; cat /etc/resolv.conf",
        ),
    ));
    // slirp4netns names its interface tap0; pasta copies the host's
    assert!(out.lines().any(|l| l == "tap0"), "{out}");
}

#[test]
fn no_network_stack_is_a_clear_error_before_the_command_runs() {
    let root = rootfs("net-missing");
    let bin = path_with("net-missing-path", &[]);
    let err = failed(&kiln_env(
        &[("PATH", bin.display().to_string())],
        &sandbox_args(&root, &["--network", "sandbox"], "touch /ran"),
    ));
    assert!(err.contains("apt-get install passt"), "{err}");
    assert!(err.contains("slirp4netns"), "{err}");
    assert!(
        !root.join("ran").exists(),
        "the command ran without a network"
    );
    assert!(!root.join("etc/resolv.conf").exists(), "a stub was left");
}

/// A context with a busybox tree under `rootfs/` and a state directory.
struct Project {
    dir: PathBuf,
}

impl Project {
    fn new(name: &str, dockerfile: &str) -> Project {
        let dir = test_dir(name);
        busybox_rootfs(&dir.join("ctx/rootfs"));
        std::fs::write(dir.join("ctx/Dockerfile"), dockerfile).unwrap();
        give_to_test_user(&dir);
        Project { dir }
    }

    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--root".into(),
            self.dir.join("state").display().to_string(),
            "build".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(self.dir.join("ctx").display().to_string());
        args
    }

    fn build(&self, extra: &[&str]) -> Output {
        kiln(self.args(extra)).output().expect("run kiln build")
    }

    fn out_dir(&self) -> PathBuf {
        self.dir.join("out")
    }

    fn local_out(&self) -> String {
        format!("type=local,dest={}", self.out_dir().display())
    }
}

/// What the sandbox's resolv.conf should name: the host's reachable
/// resolvers, or the stack's forwarder when they are all on loopback.
fn expected_nameservers() -> Vec<String> {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let servers: Vec<String> = host
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .map(|s| s.trim().to_string())
        .filter(|s| {
            s.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| !ip.is_loopback() && !ip.is_unspecified())
        })
        .collect();
    if servers.is_empty() {
        vec!["169.254.1.1".into()]
    } else {
        servers
    }
}

#[test]
fn build_defaults_to_sandbox_with_host_resolvers_and_leaves_no_dns_files() {
    let p = Project::new(
        "net-build",
        r#"FROM scratch
COPY rootfs/ /
RUN cat /etc/resolv.conf > /out-resolv && cat /etc/hosts > /out-hosts && ls /sys/class/net > /out-ifaces
RUN --network=none ls /sys/class/net > /out-none
"#,
    );
    let local = p.local_out();
    ok(&p.build(&["-o", &local]));
    let out = p.out_dir();
    let resolv = std::fs::read_to_string(out.join("out-resolv")).unwrap();
    for ns in expected_nameservers() {
        assert!(resolv.contains(&format!("nameserver {ns}\n")), "{resolv}");
    }
    assert!(!resolv.contains("nameserver 127."), "{resolv}");
    let hosts = std::fs::read_to_string(out.join("out-hosts")).unwrap();
    assert!(hosts.contains("127.0.0.1\tlocalhost"), "{hosts}");
    let ifaces = std::fs::read_to_string(out.join("out-ifaces")).unwrap();
    assert!(ifaces.lines().count() >= 2, "sandbox: only {ifaces:?}");
    let none = std::fs::read_to_string(out.join("out-none")).unwrap();
    assert_eq!(none, "lo\n", "RUN --network=none");
    // the DNS files were mounted, never written into a layer
    assert!(
        !out.join("etc/resolv.conf").exists(),
        "resolv.conf left in the image"
    );
    assert!(!out.join("etc/hosts").exists(), "hosts left in the image");
}

#[test]
fn run_network_host_needs_the_entitlement() {
    let p = Project::new(
        "net-entitlement",
        "FROM scratch\nCOPY rootfs/ /\nRUN --network=host true\n",
    );
    let err = failed(&p.build(&[]));
    assert!(err.contains("network.host"), "{err}");
    assert!(err.contains("--allow network.host"), "{err}");
    // the build-level flag goes through the same check
    let err = failed(&p.build(&["--network", "host"]));
    assert!(err.contains("--allow network.host"), "{err}");
    ok(&p.build(&["--allow", "network.host"]));
}

#[test]
fn unknown_network_and_security_modes_are_errors() {
    let p = Project::new(
        "net-unknown",
        "FROM scratch\nCOPY rootfs/ /\nRUN --network=foo true\n",
    );
    let err = failed(&p.build(&[]));
    assert!(err.contains("unsupported network mode \"foo\""), "{err}");
    let err = failed(&p.build(&["--network", "foo"]));
    assert!(err.contains("unknown network mode \"foo\""), "{err}");
    let p = Project::new(
        "net-unknown-sec",
        "FROM scratch\nCOPY rootfs/ /\nRUN --security=foo true\n",
    );
    let err = failed(&p.build(&[]));
    assert!(err.contains("unsupported security mode \"foo\""), "{err}");
    let root = rootfs("net-unknown-sandbox");
    let err = failed(
        &kiln(sandbox_args(&root, &["--network", "bridge"], "true"))
            .output()
            .unwrap(),
    );
    assert!(err.contains("unknown network mode \"bridge\""), "{err}");
}

/// A network namespace with a veth pair to the host (10.213.0.1/30 here,
/// .2 inside), removed when dropped, also on panic.
struct TestNetns {
    name: String,
    veth: String,
    server: Option<std::process::Child>,
}

impl TestNetns {
    fn new() -> TestNetns {
        let id = std::process::id() % 100_000;
        let ns = TestNetns {
            name: format!("kiln-nt-{id}"),
            veth: format!("knt{id}h"),
            server: None,
        };
        let peer = format!("knt{id}n");
        let ip = |args: &[&str]| {
            run_checked(Command::new("ip").args(args));
        };
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link", "add", &ns.veth, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &ns.name]);
        ip(&["addr", "add", "10.213.0.1/30", "dev", &ns.veth]);
        ip(&["link", "set", &ns.veth, "up"]);
        let nsip = |args: &[&str]| {
            run_checked(
                Command::new("ip")
                    .args(["netns", "exec", &ns.name, "ip"])
                    .args(args),
            );
        };
        nsip(&["addr", "add", "10.213.0.2/30", "dev", &peer]);
        nsip(&["link", "set", &peer, "up"]);
        nsip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A one-shot server at 10.213.0.2:`port` answering `marker`.
    fn serve(&mut self, port: u16, marker: &str) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, "busybox", "nc", "-l", "-p"])
            .arg(port.to_string())
            .args(["-e", "echo", marker])
            .spawn()
            .expect("start the server in the test namespace");
        self.server = Some(child);
        // until it listens
        for _ in 0..50 {
            let o = Command::new("ip")
                .args(["netns", "exec", &self.name, "busybox", "netstat", "-ltn"])
                .output()
                .unwrap();
            if text(&o.stdout).contains(&format!(":{port} ")) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the server in {} did not start", self.name);
    }

    fn stop_server(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        self.stop_server();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn sandbox_routes_outbound_to_another_host() {
    if !running_as_root() {
        eprintln!("skipped: making a test network namespace needs root");
        return;
    }
    let mut ns = TestNetns::new();
    let root = rootfs("net-routed");
    for (i, stack) in ["pasta", "slirp4netns"].into_iter().enumerate() {
        let port = 47_300 + u16::try_from(i).unwrap();
        let marker = format!("routed-through-{stack}");
        ns.serve(port, &marker);
        let out = ok(&kiln_env(
            &with_stack(stack),
            &sandbox_args(
                &root,
                &["--network", "sandbox"],
                // busybox's server may repeat the line: the first is enough
                &format!("timeout 5 nc 10.213.0.2 {port} </dev/null | head -n 1"),
            ),
        ));
        assert!(out.contains(&marker), "{stack}: {out}");
        ns.stop_server();
    }
    // and `none` cannot
    ns.serve(47_310, "must-not-arrive");
    let o = kiln(sandbox_args(
        &root,
        &["--network", "none"],
        "timeout 3 nc 10.213.0.2 47310 </dev/null; echo rc=$?",
    ))
    .output()
    .unwrap();
    // the sandbox ran the command (rc= printed), and nothing arrived
    let out = text(&o.stdout);
    assert!(out.contains("rc="), "{out}\n{}", text(&o.stderr));
    assert!(!out.contains("must-not-arrive"), "{out}");
}

/// Every process below `pid`, with its command line.
fn descendants(pid: u32) -> Vec<(u32, String)> {
    let mut parent = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // the field after the parenthesised command name
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u32>().ok())
        else {
            continue;
        };
        parent.insert(p, ppid);
    }
    let mut out = Vec::new();
    for (&p, _) in parent.iter() {
        let mut cur = p;
        while let Some(&pp) = parent.get(&cur) {
            if pp == pid {
                let cmd = std::fs::read(format!("/proc/{p}/cmdline"))
                    .map(|b| text(&b).replace('\0', " "))
                    .unwrap_or_default();
                out.push((p, cmd));
                break;
            }
            if pp <= 1 {
                break;
            }
            cur = pp;
        }
    }
    out
}

/// The helper goes with the sandbox, and with a SIGKILLed kiln.
#[test]
fn the_helper_dies_with_kiln() {
    let root = rootfs("net-helper-exit");
    for stack in ["pasta", "slirp4netns"] {
        let mut cmd = unprivileged(Path::new("/usr/bin/env"));
        cmd.arg(format!("KILN_NETWORK_STACK={stack}"))
            .arg(stage_file(&kiln_binary()))
            .args(sandbox_args(&root, &["--network", "sandbox"], "sleep 60"))
            .stdout(std::process::Stdio::null());
        let mut kiln_proc = cmd.spawn().expect("start kiln");
        let pid = kiln_proc.id();
        let mut helper = None;
        for _ in 0..100 {
            helper = descendants(pid)
                .into_iter()
                .find(|(_, c)| c.contains(stack) && c.contains("ns/net"));
            if helper.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let (helper, cmdline) = helper.unwrap_or_else(|| panic!("no {stack} below kiln"));
        assert!(
            descendants(pid).iter().any(|(_, c)| c.contains("sleep 60")),
            "{stack}: the command is not running"
        );
        let _ = kiln_proc.kill(); // SIGKILL: no cleanup code of kiln runs
        let _ = kiln_proc.wait();
        let mut gone = false;
        for _ in 0..50 {
            let state = std::fs::read_to_string(format!("/proc/{helper}/stat")).unwrap_or_default();
            // gone, or a zombie waiting for a reaper
            if state.is_empty()
                || state
                    .rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            {
                gone = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            gone,
            "{stack} outlived a SIGKILLed kiln: {helper} {cmdline}"
        );
    }
}
