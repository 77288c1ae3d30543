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
    apt_mirror_host, busybox_rootfs, give_to_test_user, kiln, kiln_binary, missing_prerequisite,
    root_for, run_checked, running_as_root, stage_file, test_dir, unprivileged,
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

/// `script` in a `--network sandbox` sandbox on `root` with `stack`; its
/// output (the run must succeed).
fn in_sandbox(stack: &str, root: &Path, script: &str) -> String {
    ok(&kiln_env(
        &with_stack(stack),
        &sandbox_args(root, &["--network", "sandbox"], script),
    ))
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
        let out = in_sandbox(stack, &root, "ip route; ls /sys/class/net");
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

/// What the sandbox's resolv.conf should name first under pasta (the
/// default stack): its forwarder, standing for the host's first resolver
/// whatever its address (pasta rewrites that resolver's answers, so the
/// resolver's own address would never answer).
const PASTA_FORWARDER: &str = "169.254.1.1";

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
    let first = resolv.lines().find_map(|l| l.strip_prefix("nameserver "));
    assert_eq!(first, Some(PASTA_FORWARDER), "{resolv}");
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

/// A network namespace with a veth pair to the host (10.213.`net`.1/30
/// and fd53:`net`::1/64 here, .2 and ::2 inside: another host on the
/// network), removed when dropped, also on panic.
struct TestNetns {
    name: String,
    veth: String,
    server: Option<std::process::Child>,
}

impl TestNetns {
    fn new(net: u8) -> TestNetns {
        let id = std::process::id() % 10_000;
        let ns = TestNetns {
            name: format!("kiln-nt-{id}-{net}"),
            veth: format!("knt{id}h{net}"),
            server: None,
        };
        let peer = format!("knt{id}n{net}");
        let ip = |args: &[&str]| {
            run_checked(Command::new("ip").args(args));
        };
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link", "add", &ns.veth, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("10.213.{net}.1/30"),
            "dev",
            &ns.veth,
        ]);
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("fd53:{net}::1/64"),
            "dev",
            &ns.veth,
            "nodad",
        ]);
        ip(&["link", "set", &ns.veth, "up"]);
        let nsip = |args: &[&str]| {
            run_checked(
                Command::new("ip")
                    .args(["netns", "exec", &ns.name, "ip"])
                    .args(args),
            );
        };
        nsip(&["addr", "add", &format!("10.213.{net}.2/30"), "dev", &peer]);
        nsip(&[
            "-6",
            "addr",
            "add",
            &format!("fd53:{net}::2/64"),
            "dev",
            &peer,
            "nodad",
        ]);
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
    if !root_for("making a test network namespace") {
        return;
    }
    let mut ns = TestNetns::new(0);
    let root = rootfs("net-routed");
    for (i, stack) in ["pasta", "slirp4netns"].into_iter().enumerate() {
        let port = 47_300 + u16::try_from(i).unwrap();
        let marker = format!("routed-through-{stack}");
        ns.serve(port, &marker);
        // busybox's server may repeat the line: the first is enough
        let out = in_sandbox(
            stack,
            &root,
            &format!("timeout 5 nc 10.213.0.2 {port} </dev/null | head -n 1"),
        );
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

/// The IPv4 addresses the host itself resolves `name` to.
fn host_addresses(name: &str) -> Vec<String> {
    let o = run_checked(Command::new("getent").args(["ahostsv4", name]));
    let mut out: Vec<String> = text(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    out.dedup();
    out
}

/// The addresses in the answer part of busybox nslookup's output (after
/// the first `Name:`; the server's own `Address:` line comes before).
fn answers(nslookup: &str) -> Vec<String> {
    let Some((_, answer)) = nslookup.split_once("Name:") else {
        return Vec::new();
    };
    answer
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Address:"))
        .map(|a| a.trim().to_string())
        .collect()
}

/// A step under `--network sandbox` resolves a real name through the
/// machine's own resolver (not on loopback on these machines, as on most
/// cloud VMs), with both stacks: the Debian mirror apt is configured with.
#[test]
fn sandbox_resolves_the_apt_mirror_through_the_host_resolver() {
    let Some(host) = apt_mirror_host() else {
        missing_prerequisite("no http(s) mirror named in /etc/apt/sources.list*");
        return;
    };
    let want = host_addresses(&host);
    assert!(!want.is_empty(), "the host itself cannot resolve {host}");
    let root = rootfs("net-dns-mirror");
    for stack in ["pasta", "slirp4netns"] {
        let out = in_sandbox(
            stack,
            &root,
            &format!("cat /etc/resolv.conf; nslookup -type=a {host}"),
        );
        let got = answers(&out);
        assert!(
            got.iter().any(|a| want.contains(a)),
            "{stack}: {host} resolved to {got:?} in the step, {want:?} on the host:\n{out}"
        );
    }
}

/// A dnsmasq answering `which.kiln.test` with `answer` on `listen`, port
/// 53, in the test network namespace `netns` or the host's; stopped when
/// dropped.
struct Dnsmasq(std::process::Child);

impl Dnsmasq {
    fn start(netns: Option<&str>, listen: &str, answer: &str) -> Dnsmasq {
        assert!(
            Path::new("/usr/sbin/dnsmasq").exists(),
            "dnsmasq is missing: run scripts/setup-host.sh (apt-get install dnsmasq-base)"
        );
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "/usr/sbin/dnsmasq"]);
                c
            }
            None => Command::new("/usr/sbin/dnsmasq"),
        };
        let pid_file = test_dir(&format!("dnsmasq-{listen}")).join("pid");
        cmd.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--port=53",
            "--user=root",
        ])
        .arg(format!("--listen-address={listen}"))
        .arg(format!("--host-record=which.kiln.test,{answer}"))
        .arg(format!("--pid-file={}", pid_file.display()))
        .stdout(std::process::Stdio::null());
        let d = Dnsmasq(cmd.spawn().expect("start dnsmasq"));
        for _ in 0..50 {
            let mut q = match netns {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns, "busybox"]);
                    c
                }
                None => Command::new("busybox"),
            };
            let o = q
                .args(["nslookup", "-type=a", "which.kiln.test", listen])
                .output()
                .unwrap();
            if answers(&text(&o.stdout)).iter().any(|a| a == answer) {
                return d;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("dnsmasq on {listen} does not answer");
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `kiln ARGS` as the test user in a private mount namespace whose
/// /etc/resolv.conf is `resolv`: the host kiln and its network helper see.
fn kiln_with_resolv_conf(resolv: &str, env: &[(&str, String)], args: &[String]) -> Output {
    let file = test_dir("dns-layout-resolv").join(format!("resolv-{}", std::process::id()));
    std::fs::write(&file, resolv).unwrap();
    give_to_test_user(file.parent().unwrap());
    let mut inner = unprivileged(Path::new("/usr/bin/env"));
    for (k, v) in env {
        inner.arg(format!("{k}={v}"));
    }
    inner.arg(stage_file(&kiln_binary())).args(args);
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount --bind \"$1\" /etc/resolv.conf && shift && exec \"$@\"")
        .arg("sh")
        .arg(&file)
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    if let Some(dir) = inner.get_current_dir() {
        cmd.current_dir(dir);
    }
    cmd.output().expect("run kiln")
}

/// Every resolver layout a host has, with both stacks: the host's resolver
/// on its loopback (systemd-resolved), on another host, IPv6 only, several
/// with the first one down, and a search domain. Each dnsmasq answers the
/// test name with its own address, so the answer says which resolver the
/// step reached.
#[test]
fn sandbox_dns_for_every_resolver_layout() {
    if !running_as_root() {
        missing_prerequisite("the resolver layouts need root (a test network, dnsmasq on port 53)");
        return;
    }
    let ns = TestNetns::new(1);
    let _lo = Dnsmasq::start(None, "127.53.0.1", "10.99.0.1");
    let _remote = Dnsmasq::start(Some(&ns.name), "10.213.1.2", "10.99.0.2");
    let _remote6 = Dnsmasq::start(Some(&ns.name), "fd53:1::2", "10.99.0.3");
    let root = rootfs("net-dns-layouts");
    // (layout, host's resolv.conf, stacks, the answer the step must get)
    let cases: &[(&str, &str, &[&str], &str)] = &[
        (
            "loopback",
            "nameserver 127.53.0.1\n",
            &["pasta", "slirp4netns"],
            "10.99.0.1",
        ),
        (
            "another host",
            "nameserver 10.213.1.2\n",
            &["pasta", "slirp4netns"],
            "10.99.0.2",
        ),
        (
            "IPv6 only (slirp4netns has no IPv6 here)",
            "nameserver fd53:1::2\n",
            &["pasta"],
            "10.99.0.3",
        ),
        (
            "several, the first one down",
            "nameserver 127.53.0.9\nnameserver 10.213.1.2\n",
            &["pasta", "slirp4netns"],
            "10.99.0.2",
        ),
        (
            "several, IPv6 first",
            "nameserver fd53:1::2\nnameserver 127.53.0.1\n",
            &["pasta"],
            "10.99.0.3",
        ),
    ];
    for (layout, resolv, stacks, want) in cases {
        for stack in *stacks {
            let resolv = format!("search kiln.test\noptions timeout:2\n{resolv}");
            let out = ok(&kiln_with_resolv_conf(
                &resolv,
                &with_stack(stack),
                &sandbox_args(
                    &root,
                    &["--network", "sandbox"],
                    // the short name: the search line must have been kept
                    "cat /etc/resolv.conf; nslookup -type=a which",
                ),
            ));
            assert!(
                out.contains("search kiln.test\n") && out.contains("options timeout:2\n"),
                "{layout}, {stack}: search and options lost:\n{out}"
            );
            assert_eq!(
                answers(&out),
                [want.to_string()],
                "{layout}, {stack}: the step did not reach the resolver it should:\n{out}"
            );
        }
    }
}

/// `kiln build --network none` is a ceiling: a step that asks for more, or
/// an ADD of a URL, fails the build before any step runs, naming the line
/// and the flag, even with the network.host entitlement.
#[test]
fn network_none_build_is_a_ceiling_no_step_raises() {
    for (name, line3) in [
        ("sandbox", "RUN --network=sandbox touch /second"),
        ("host", "RUN --network=host touch /second"),
        ("add-url", "ADD http://127.0.0.1:9/x /x"),
    ] {
        let p = Project::new(
            &format!("net-ceiling-{name}"),
            &format!("FROM scratch\nCOPY rootfs/ /\n{line3}\nRUN touch /third\n"),
        );
        let local = p.local_out();
        let err = failed(&p.build(&[
            "--network",
            "none",
            "--allow",
            "network.host",
            "--progress",
            "plain",
            "-o",
            &local,
        ]));
        assert!(err.contains("Dockerfile:3:"), "{name}: {err}");
        assert!(err.contains("--network=none"), "{name}: {err}");
        // no step started: the plain progress has no step line
        assert!(
            !err.lines().any(|l| l.starts_with('#')),
            "{name}: a step ran before the check:\n{err}"
        );
        assert!(!p.out_dir().exists(), "{name}: an output was written");
        // lowering is always allowed
        if name == "sandbox" {
            let p = Project::new(
                "net-ceiling-lower",
                "FROM scratch\nCOPY rootfs/ /\nRUN --network=none ls /sys/class/net > /ifaces\n",
            );
            let local = p.local_out();
            ok(&p.build(&["-o", &local]));
            assert_eq!(
                std::fs::read_to_string(p.out_dir().join("ifaces")).unwrap(),
                "lo\n"
            );
        }
    }
}

/// `--add-host` (buildx's flag) adds to every RUN step's /etc/hosts, under
/// any network, and leaves no hosts file in the image.
#[test]
fn add_host_reaches_every_step_hosts_file() {
    let p = Project::new(
        "net-add-host",
        "FROM scratch\nCOPY rootfs/ /\n\
         RUN cat /etc/hosts > /out-sandbox\n\
         RUN --network=none cat /etc/hosts > /out-none\n",
    );
    let local = p.local_out();
    ok(&p.build(&[
        "--add-host",
        "db:10.9.8.7",
        "--add-host",
        "v6=[2001:db8::1]",
        "-o",
        &local,
    ]));
    for f in ["out-sandbox", "out-none"] {
        let hosts = std::fs::read_to_string(p.out_dir().join(f)).unwrap();
        assert!(hosts.contains("10.9.8.7\tdb\n"), "{f}: {hosts}");
        assert!(hosts.contains("2001:db8::1\tv6\n"), "{f}: {hosts}");
        assert!(hosts.contains("127.0.0.1\tlocalhost"), "{f}: {hosts}");
    }
    assert!(
        !p.out_dir().join("etc/hosts").exists(),
        "hosts left in the image"
    );
    let err = failed(&p.build(&["--add-host", "db:not-an-ip"]));
    assert!(
        err.contains("--add-host") && err.contains("not an IP address"),
        "{err}"
    );
}

/// The host's primary address: the source of its route to the outside.
fn primary_address() -> Option<String> {
    let o = Command::new("ip")
        .args(["-4", "route", "get", "192.0.2.123"])
        .output()
        .ok()?;
    let t = text(&o.stdout);
    let mut words = t.split_whitespace();
    words.find(|w| *w == "src")?;
    words.next().map(str::to_string)
}

/// An address on the host's loopback device for one test, removed when
/// dropped (these machines have no dummy interface module).
struct LoAddress(String);

impl LoAddress {
    fn add(addr: &str) -> LoAddress {
        // left over from an interrupted run
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{addr}/32"), "dev", "lo"])
            .stderr(std::process::Stdio::null())
            .status();
        run_checked(Command::new("ip").args(["addr", "add", &format!("{addr}/32"), "dev", "lo"]));
        LoAddress(addr.to_string())
    }
}

impl Drop for LoAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{}/32", self.0), "dev", "lo"])
            .status();
    }
}

/// Under `sandbox`, a step reaches neither the cloud metadata address
/// (169.254.169.254, link-local) nor the host's own addresses (a service
/// bound to 0.0.0.0 on the runner), with either stack, while its DNS
/// forwarder still answers; `--allow-host-loopback` opens both. pasta gives
/// the step the host's primary address as its own, so there that address
/// is the step's and never the host's.
#[test]
fn sandbox_cannot_reach_link_local_or_the_host_addresses() {
    if !root_for("adding 169.254.169.254 to the host's loopback") {
        return;
    }
    let Some(primary) = primary_address() else {
        missing_prerequisite("the host has no IPv4 route to the outside");
        return;
    };
    let Some(mirror) = apt_mirror_host() else {
        missing_prerequisite("no http(s) mirror named in /etc/apt/sources.list*");
        return;
    };
    let _metadata = LoAddress::add("169.254.169.254");
    // a second address of the host's (as docker0 or a VPN would give it)
    let _second = LoAddress::add("10.77.0.1");
    // one server on every host address: 0.0.0.0
    let listener = TcpListener::bind("0.0.0.0:0").expect("bind 0.0.0.0");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(b"host-service-reached\n");
        }
    });
    let root = rootfs("net-link-local");
    let script = format!(
        "echo md:$(timeout 3 nc 169.254.169.254 {port} </dev/null 2>&1); \
         echo host:$(timeout 3 nc {primary} {port} </dev/null 2>&1); \
         echo second:$(timeout 3 nc 10.77.0.1 {port} </dev/null 2>&1); \
         fwd=$(awk '/^nameserver/ {{print $2; exit}}' /etc/resolv.conf); \
         echo dns:$(nslookup -type=a {mirror} $fwd 2>&1 | grep -c 'Address: [0-9]')"
    );
    // the probe's lines, with and without --allow-host-loopback
    let probe = |stack: &str, allow: bool| {
        let mut flags = vec!["--network", "sandbox"];
        if allow {
            flags.push("--allow-host-loopback");
        }
        let out = ok(&kiln_env(
            &with_stack(stack),
            &sandbox_args(&root, &flags, &script),
        ));
        let line = |p: &str| {
            out.lines()
                .find(|l| l.starts_with(p))
                .unwrap_or("")
                .to_string()
        };
        (
            line("md:"),
            line("host:"),
            line("second:"),
            line("dns:"),
            out,
        )
    };
    for stack in ["pasta", "slirp4netns"] {
        let (md, host, second, dns, out) = probe(stack, false);
        assert!(
            md.contains("Permission denied"),
            "{stack}: the metadata address was not refused:\n{out}"
        );
        assert!(
            !host.contains("host-service-reached"),
            "{stack}: the host's own address was reached:\n{out}"
        );
        assert!(
            second.contains("Permission denied"),
            "{stack}: the host's second address was not refused:\n{out}"
        );
        assert_ne!(
            dns, "dns:0",
            "{stack}: the DNS forwarder is blocked:\n{out}"
        );

        let (md, host, second, _, out) = probe(stack, true);
        assert!(
            md.contains("host-service-reached") && second.contains("host-service-reached"),
            "{stack}: --allow-host-loopback should open link-local and the host's addresses:\n{out}"
        );
        if stack == "slirp4netns" {
            assert!(
                host.contains("host-service-reached"),
                "{stack}: --allow-host-loopback should open the host's addresses:\n{out}"
            );
        }
    }
}

/// A small HTTP server that answers each path of `routes` with its raw
/// response (anything else: 404) and counts the connections it accepted;
/// bound to `addr` in the test network namespace `netns` (its thread joins
/// it first) or in the host's.
struct HttpServer {
    port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl HttpServer {
    fn start(netns: Option<&str>, addr: &str, routes: Vec<(String, String)>) -> HttpServer {
        use std::io::{BufRead, BufReader};
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = std::sync::Arc::clone(&accepted);
        let (tx, rx) = std::sync::mpsc::channel();
        let (netns, addr) = (netns.map(str::to_string), addr.to_string());
        std::thread::spawn(move || {
            if let Some(ns) = netns {
                let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("open the netns");
                // SAFETY: `f` is an open namespace file; setns changes only
                // this thread's network namespace.
                let rc =
                    unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns into {ns}");
            }
            let listener = TcpListener::bind((addr.as_str(), 0)).expect("bind the server");
            tx.send(listener.local_addr().unwrap().port()).unwrap();
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut request = String::new();
                let _ = reader.read_line(&mut request);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                let path = request.split(' ').nth(1).unwrap_or("");
                let response = routes
                    .iter()
                    .find(|(p, _)| p == path)
                    .map(|(_, r)| r.clone())
                    .unwrap_or_else(|| {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .into()
                    });
                let _ = conn.write_all(response.as_bytes());
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the server started");
        HttpServer { port, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn http_ok(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn http_redirect(to: &str) -> String {
    format!(
        "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

/// `ADD <url>` obeys the network policy of a RUN step: under `sandbox` it
/// reaches another host, but neither the host's loopback nor the metadata
/// address, not even through a redirect, with either stack;
/// `--allow-host-loopback` opens the metadata address; `--add-max-size`
/// bounds what it takes.
#[test]
fn add_url_obeys_the_sandbox_network_policy() {
    if !root_for("a test network and an address on lo for ADD") {
        return;
    }
    let ns = TestNetns::new(2);
    // (not 169.254.169.254: the step test adds that one, at the same time)
    let _md = LoAddress::add("169.254.170.2");
    let _second = LoAddress::add("10.77.0.2");
    let metadata = HttpServer::start(
        None,
        "169.254.170.2",
        vec![("/secret".into(), http_ok("metadata-secret\n"))],
    );
    let local = HttpServer::start(
        None,
        "127.0.0.1",
        vec![("/secret".into(), http_ok("loopback-secret\n"))],
    );
    let md_url = format!("http://169.254.170.2:{}/secret", metadata.port);
    let second = HttpServer::start(
        None,
        "10.77.0.2",
        vec![("/secret".into(), http_ok("host-secret\n"))],
    );
    let second_url = format!("http://10.77.0.2:{}/secret", second.port);
    let local_url = format!("http://127.0.0.1:{}/secret", local.port);
    let remote = HttpServer::start(
        Some(&ns.name),
        "10.213.2.2",
        vec![
            ("/hello".into(), http_ok("hello from another host\n")),
            ("/to-metadata".into(), http_redirect(&md_url)),
            ("/to-loopback".into(), http_redirect(&local_url)),
        ],
    );
    let remote_url = |p: &str| format!("http://10.213.2.2:{}{p}", remote.port);
    let build = |name: &str, url: &str, env: &[(&str, String)], extra: &[&str]| {
        let p = Project::new(
            &format!("net-add-{name}"),
            &format!("FROM scratch\nADD {url} /got\n"),
        );
        let local_out = p.local_out();
        let mut args = vec!["-o", local_out.as_str()];
        args.extend_from_slice(extra);
        let o = kiln_env(env, &p.args(&args));
        let got = std::fs::read_to_string(p.out_dir().join("got")).ok();
        (o, got)
    };
    for stack in ["pasta", "slirp4netns"] {
        let env = with_stack(stack);
        let (o, got) = build(&format!("remote-{stack}"), &remote_url("/hello"), &env, &[]);
        ok(&o);
        assert_eq!(got.as_deref(), Some("hello from another host\n"), "{stack}");
        for (what, url) in [
            ("metadata", md_url.clone()),
            ("loopback", local_url.clone()),
            ("host-address", second_url.clone()),
            ("redirect-metadata", remote_url("/to-metadata")),
            ("redirect-loopback", remote_url("/to-loopback")),
        ] {
            let (o, got) = build(&format!("{what}-{stack}"), &url, &env, &[]);
            let err = failed(&o);
            assert!(err.contains("ADD "), "{stack}, {what}: {err}");
            assert_eq!(got, None, "{stack}, {what}: the file arrived");
        }
    }
    assert_eq!(metadata.accepted(), 0, "the metadata server was reached");
    assert_eq!(second.accepted(), 0, "the host's own address was reached");
    assert_eq!(
        local.accepted(),
        0,
        "the host's loopback server was reached"
    );
    // --allow-host-loopback opens link-local, redirects included
    let (o, got) = build(
        "redirect-metadata-allowed",
        &remote_url("/to-metadata"),
        &[],
        &["--allow-host-loopback"],
    );
    ok(&o);
    assert_eq!(got.as_deref(), Some("metadata-secret\n"));
    // the size limit
    let (o, _) = build(
        "too-large",
        &remote_url("/hello"),
        &[],
        &["--add-max-size", "10B"],
    );
    let err = failed(&o);
    assert!(err.contains("larger than the limit of 10 bytes"), "{err}");
}
