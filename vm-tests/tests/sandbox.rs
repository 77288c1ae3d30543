//! End-to-end tests of the rootless sandbox (`kiln sandbox`): the real kiln
//! binary, run as an unprivileged user with a subordinate id range, against
//! a busybox rootfs and the real kernel.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kiln_vm_tests::{
    busybox_rootfs, kiln, run_checked, running_as_root, test_dir, test_ids, test_subuid_start,
};

/// A busybox rootfs with the syscall probe, owned by the test user, shared
/// by the tests of this process.
fn rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        let dir = test_dir("sandbox-rootfs").join("rootfs");
        busybox_rootfs(&dir);
        std::fs::copy(env!("KILN_PROBE"), dir.join("bin/probe")).expect("copy probe");
        run_checked(
            std::process::Command::new("chmod")
                .arg("755")
                .arg(dir.join("bin/probe")),
        );
        if running_as_root() {
            let (uid, gid) = test_ids();
            run_checked(
                std::process::Command::new("chown")
                    .arg("-R")
                    .arg(format!("{uid}:{gid}"))
                    .arg(&dir),
            );
        }
        dir
    })
}

fn sandbox(extra: &[&str], cmd: &[&str]) -> Output {
    let root = rootfs().to_str().expect("utf-8 path").to_string();
    let mut args = vec!["sandbox".to_string(), "--rootfs".into(), root];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--".into());
    args.extend(cmd.iter().map(|s| s.to_string()));
    kiln(&args).output().expect("run kiln")
}

fn sh(script: &str) -> Output {
    sandbox(&[], &["/bin/sh", "-c", script])
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "kiln failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

#[test]
fn root_inside_is_the_caller_outside() {
    let (uid, _) = test_ids();
    let sub = test_subuid_start().expect("the test user has a subuid range");
    let root = rootfs().to_str().unwrap().to_string();
    let mut child = kiln([
        "sandbox",
        "--rootfs",
        &root,
        "--",
        "/bin/sh",
        "-c",
        "id -u; exec sleep 7.31",
    ])
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut first,
    )
    .unwrap();
    assert_eq!(first.trim(), "0", "uid 0 inside");
    // Seen from the host, the same process is the caller, and the step's
    // user namespace maps 0 to the caller and 1..65535 to the subordinate
    // range.
    let deadline = Instant::now() + Duration::from_secs(5);
    let pid = loop {
        if let Some(pid) = host_pids_matching("sleep 7.31").into_iter().next() {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "the step is visible from the host"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    let map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        uid_line.split_whitespace().nth(1),
        Some(uid.to_string().as_str()),
        "{uid_line}"
    );
    let map: Vec<Vec<u32>> = map
        .lines()
        .map(|l| l.split_whitespace().map(|w| w.parse().unwrap()).collect())
        .collect();
    assert_eq!(map, vec![vec![0, uid, 1], vec![1, sub, 65535]]);
}

#[test]
fn files_land_with_mapped_owners_on_the_host() {
    let (uid, _) = test_ids();
    let sub = test_subuid_start().expect("subuid range");
    let name = format!("owned-{}", std::process::id());
    ok(sh(&format!(
        "touch /tmp/{name}.root /tmp/{name}.user && chown 1000:1000 /tmp/{name}.user"
    )));
    let root_file = std::fs::metadata(rootfs().join(format!("tmp/{name}.root"))).unwrap();
    assert_eq!(
        root_file.uid(),
        uid,
        "a file made by root inside belongs to the caller"
    );
    let user_file = std::fs::metadata(rootfs().join(format!("tmp/{name}.user"))).unwrap();
    assert_eq!(
        user_file.uid(),
        sub + 999,
        "uid 1000 inside is subuid start + 999 outside"
    );
    assert_eq!(user_file.gid(), sub + 999);
}

#[test]
fn user_flag_resolves_names_from_the_rootfs() {
    let out = ok(sandbox(
        &["--user", "user"],
        &[
            "/bin/sh",
            "-c",
            "id -u; id -g; id -G; echo $HOME; grep CapEff /proc/self/status",
        ],
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..2], ["1000", "1000"]);
    assert_eq!(lines[3], "/home/user");
    assert_eq!(
        lines[4], "CapEff:\t0000000000000000",
        "a non-root user has no effective capabilities"
    );
    let out = ok(sandbox(
        &["--user", "1000:10"],
        &["/bin/sh", "-c", "id -u; id -g"],
    ));
    assert_eq!(out, "1000\n10\n");
    let o = sandbox(&["--user", "nosuchuser"], &["true"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nosuchuser"), "{}", stderr(&o));
}

/// The answer of every probed syscall, as documented in SECURITY.md.
const EXPECTED_PROBES: &[(&str, &str)] = &[
    ("mount", "EPERM"),
    ("umount2", "EPERM"),
    ("pivot_root", "EPERM"),
    ("unshare_user", "EPERM"),
    ("unshare_mount", "EPERM"),
    ("clone_newuser", "EPERM"),
    ("clone_newns", "EPERM"),
    ("clone_newpid", "EPERM"),
    ("clone_newnet", "EPERM"),
    ("clone_newuts", "EPERM"),
    ("clone_newipc", "EPERM"),
    ("clone_newcgroup", "EPERM"),
    ("clone_plain", "OK"),
    ("clone3", "ENOSYS"),
    ("setns", "EPERM"),
    ("fsopen", "EPERM"),
    ("open_tree", "EPERM"),
    ("move_mount", "EPERM"),
    ("keyctl", "EPERM"),
    ("add_key", "EPERM"),
    ("request_key", "EPERM"),
    ("bpf", "EPERM"),
    ("perf_event_open", "EPERM"),
    ("userfaultfd", "EPERM"),
    ("io_uring_setup", "EPERM"),
    ("kexec_load", "EPERM"),
    ("kexec_file_load", "EPERM"),
    ("init_module", "EPERM"),
    ("finit_module", "EPERM"),
    ("delete_module", "EPERM"),
    ("open_by_handle_at", "EPERM"),
    ("name_to_handle_at", "EPERM"),
    ("iopl", "EPERM"),
    ("ioperm", "EPERM"),
    ("swapon", "EPERM"),
    ("swapoff", "EPERM"),
    ("reboot", "EPERM"),
    ("acct", "EPERM"),
    ("settimeofday", "EPERM"),
    ("clock_settime", "EPERM"),
    ("personality_default", "OK"),
    ("personality_other", "EPERM"),
    ("socket_alg", "EPERM"),
    ("socket_vsock", "EPERM"),
    ("socket_inet", "OK"),
    ("tiocsti", "EPERM"),
    ("tiocsti_high", "EPERM"),
    ("x32_getpid", "EPERM"),
    ("ptrace_init", "EPERM"),
    ("proc1_exe_write", "EACCES"),
    ("proc1_fd_open", "EACCES"),
    ("proc1_mem_open", "EACCES"),
    ("proc1_vm_write", "EPERM"),
    ("self_exe_write", "ETXTBSY"),
];

#[test]
fn denied_syscalls_answer_as_documented() {
    let out = ok(sandbox(&[], &["/bin/probe"]));
    let got: Vec<(String, String)> = out
        .lines()
        .map(|l| {
            let (a, b) = l.split_once(' ').expect("probe line");
            (a.to_string(), b.to_string())
        })
        .collect();
    let want: Vec<(String, String)> = EXPECTED_PROBES
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(got, want);
    // The same through real tools.
    let o = sh("mount -t tmpfs none /mnt 2>&1; unshare -U true 2>&1; echo done");
    let text = stdout(&o);
    assert!(
        text.contains("unshare(0x10000000): Operation not permitted"),
        "{text}"
    );
    assert!(text.contains("permission denied"), "{text}");
}

#[test]
fn unconfined_profile_lifts_the_filter_but_not_the_namespace() {
    let out = ok(sandbox(
        &["--seccomp", "unconfined"],
        &[
            "/bin/sh",
            "-c",
            "grep Seccomp: /proc/self/status; probe keyctl clone3",
        ],
    ));
    assert!(out.contains("Seccomp:\t0"), "{out}");
    assert!(
        out.contains("clone3 OK") || out.contains("clone3 EPERM"),
        "{out}"
    );
}

#[test]
fn posture_of_a_step() {
    // grep is the sandbox's command itself: a shell would change its
    // children's signal dispositions.
    let pattern = "^(NoNewPrivs|Seccomp|Cap(Inh|Prm|Eff|Bnd|Amb)|Sig(Blk|Ign)):";
    let out = ok(sandbox(&[], &["grep", "-E", pattern, "/proc/self/status"]));
    // Docker's default set without NET_RAW: CHOWN DAC_OVERRIDE FOWNER FSETID
    // KILL SETGID SETUID SETPCAP NET_BIND_SERVICE SYS_CHROOT MKNOD
    // AUDIT_WRITE SETFCAP.
    let caps = "00000000a80405fb";
    let expected = format!(
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\nCapInh:\t0000000000000000\nCapPrm:\t{caps}\nCapEff:\t{caps}\nCapBnd:\t{caps}\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n"
    );
    assert_eq!(out, expected);
}

#[test]
fn proc_is_masked_and_read_only_where_oci_says() {
    let out = ok(sh(
        "for f in /proc/keys /proc/timer_list /proc/sched_debug /proc/latency_stats /proc/interrupts; do \
         [ -e $f ] && echo \"$f $(wc -c < $f)\"; done; \
         [ -e /proc/kcore ] && echo \"kcore $(wc -c < /proc/kcore)\"; \
         cat /proc/acpi/* /proc/scsi/* 2>/dev/null | wc -l; \
         echo 1 > /proc/sys/kernel/ns_last_pid 2>&1 && echo WRITABLE; \
         echo x > /proc/sysrq-trigger 2>&1 && echo WRITABLE; \
         mount | grep -E ' /proc/(sys|bus|fs|irq) ' | grep -c '(ro,' ",
    ));
    assert!(!out.contains("WRITABLE"), "{out}");
    for line in out.lines() {
        if let Some((path, size)) = line.rsplit_once(' ') {
            if path.starts_with('/') || path == "kcore" {
                assert_eq!(size, "0", "{path} is masked: {out}");
            }
        }
    }
    if Path::new("/proc/kcore").exists() {
        assert!(out.contains("kcore 0"), "/proc/kcore reads as empty: {out}");
    }
    let last: Vec<&str> = out.lines().rev().take(2).collect();
    assert_eq!(last[1], "0", "masked directories are empty: {out}");
    assert_eq!(last[0], "4", "read-only proc paths: {out}");
}

#[test]
fn dev_holds_only_safe_devices() {
    let out = ok(sh(
        "ls /dev | sort | tr '\\n' ' '; echo; echo hi > /dev/null && head -c 4 /dev/zero | wc -c",
    ));
    assert_eq!(
        out.lines().next().unwrap().trim(),
        "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero"
    );
    assert!(out.contains("\n4\n"), "{out}");
}

#[test]
fn the_host_filesystem_is_unreachable() {
    // A canary on the host, readable by the test user.
    let dir = test_dir("canary");
    let canary = dir.join("canary-file");
    std::fs::write(&canary, "host secret").unwrap();
    run_checked(
        std::process::Command::new("chmod")
            .arg("-R")
            .arg("a+rX")
            .arg(&dir),
    );
    let c = canary.to_str().unwrap();
    let script = format!(
        "cat {c} /proc/1/root{c} /proc/self/root{c} /../../..{c} /proc/1/cwd{c} 2>/dev/null; \
         ls /proc | grep -cE '^[0-9]+$'; \
         readlink /proc/1/exe 2>/dev/null || echo denied; \
         cat /proc/self/mountinfo | wc -l; ls /"
    );
    let out = ok(sh(&script));
    assert!(!out.contains("host secret"), "host file reached: {out}");
    let lines: Vec<&str> = out.lines().collect();
    let pids: u32 = lines[0].parse().unwrap();
    assert!(
        pids <= 6,
        "only the sandbox's own processes are visible: {out}"
    );
    assert_eq!(
        lines[1], "denied",
        "init's exe link is not even readable: {out}"
    );
    assert!(!out.contains("vm-tests"), "{out}");
    // The old root is gone: nothing but the rootfs's own top level.
    let top: Vec<&str> = lines[3..].to_vec();
    assert_eq!(
        top,
        ["bin", "dev", "etc", "home", "proc", "root", "sys", "tmp"],
        "{out}"
    );
}

#[test]
fn only_loopback_without_network() {
    let out = ok(sh(
        "ls /sys/class/net; cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '",
    ));
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["lo", "lo"],
        "{out}"
    );
    let host = ok(sandbox(
        &["--network", "host"],
        &["/bin/sh", "-c", "cat /proc/net/dev | tail -n +3 | wc -l"],
    ));
    let host_ifaces = std::fs::read_to_string("/proc/net/dev")
        .unwrap()
        .lines()
        .count()
        - 2;
    assert_eq!(
        host.trim(),
        host_ifaces.to_string(),
        "network=host shares the host's interfaces"
    );
}

#[test]
fn exit_codes_and_signals_propagate() {
    assert_eq!(sh("exit 7").status.code(), Some(7));
    assert_eq!(
        sh("kill -TERM $$").status.code(),
        Some(143),
        "death by SIGTERM is 128+15"
    );
    assert_eq!(sh("kill -KILL $$").status.code(), Some(137));
    let o = sandbox(&[], &["/no/such/binary"]);
    assert_eq!(o.status.code(), Some(127));
    assert!(
        stderr(&o).contains("/no/such/binary") && stderr(&o).contains("not found"),
        "{}",
        stderr(&o)
    );
    let o = sandbox(&[], &["nosuchcommand"]);
    assert_eq!(o.status.code(), Some(127));
    let o = sandbox(&[], &["/etc/passwd"]);
    assert_eq!(o.status.code(), Some(126), "{}", stderr(&o));
}

#[test]
fn sandbox_failures_exit_125_with_a_clear_message() {
    let o = kiln(["sandbox", "--rootfs", "/nonexistent-rootfs", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("rootfs /nonexistent-rootfs does not exist"),
        "{}",
        stderr(&o)
    );
    let o = sandbox(&["--cwd", "/no/such/dir"], &["true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("working directory"), "{}", stderr(&o));
}

#[test]
fn zombies_are_reaped() {
    // The inner shell exits at once, orphaning `sleep`, which init adopts;
    // when it exits it must be reaped, not left as a zombie.
    let out = ok(sh(
        "sh -c 'sleep 0.2 &'; sleep 1; ps -o stat,comm | grep -c '^Z' || true",
    ));
    assert_eq!(out.trim(), "0", "no zombie left: {out}");
}

fn host_pids_matching(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmdline)
                .replace('\0', " ")
                .trim_end()
                == needle
            {
                pids.push(pid);
            }
        }
    }
    pids
}

fn host_processes_matching(needle: &str) -> usize {
    host_pids_matching(needle).len()
}

#[test]
fn leftover_processes_die_with_the_command() {
    let start = Instant::now();
    let o = sh("sleep 31.25 & sleep 31.25 & echo started");
    assert_eq!(ok(o).trim(), "started");
    assert!(start.elapsed() < Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        host_processes_matching("sleep 31.25"),
        0,
        "background processes were killed"
    );
}

#[test]
fn timeout_kills_grandchildren() {
    let start = Instant::now();
    let o = sandbox(
        &["--timeout", "1"],
        &["/bin/sh", "-c", "sh -c 'sleep 41.5' & sleep 41.5"],
    );
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(stderr(&o).contains("timed out"), "{}", stderr(&o));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        host_processes_matching("sleep 41.5"),
        0,
        "the whole PID namespace was killed"
    );
}

#[test]
fn fork_bomb_stops_at_rlimit_nproc() {
    let start = Instant::now();
    let o = sandbox(
        &["--rlimit", "nproc=40", "--timeout", "20"],
        // The inner shell aborts when fork fails; the outer one counts the
        // survivors with builtins only, since it cannot fork either.
        &[
            "/bin/sh",
            "-c",
            "sh -c 'i=0; while [ $i -lt 200 ]; do sleep 30 & i=$((i+1)); done' 2>/dev/null; \
             n=0; for p in /proc/[0-9]*; do n=$((n+1)); done; echo $n",
        ],
    );
    let out = ok(o);
    let n: u32 = out.trim().parse().unwrap();
    assert!(
        (30..40).contains(&n),
        "the bomb forked until RLIMIT_NPROC=40 stopped it: {n} processes"
    );
    assert!(start.elapsed() < Duration::from_secs(15));
}

#[test]
fn no_core_dump_before_the_command_execs() {
    // kiln's own setup processes share or copy kiln's memory: a crash there
    // must not write it into the step. PID 1 (kiln-init) keeps core dumps
    // off; the command gets the spec's limit.
    let o = sandbox(
        &["--rlimit", "core=2048:8192"],
        &[
            "/bin/sh",
            "-c",
            "grep 'core file' /proc/1/limits /proc/self/limits",
        ],
    );
    let out = ok(o);
    let soft = |who: &str| {
        out.lines()
            .find(|l| l.starts_with(who))
            .and_then(|l| l.split_whitespace().nth(4))
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(soft("/proc/1/"), "0", "{out}");
    assert_eq!(soft("/proc/self/"), "2048", "{out}");
}

#[test]
fn host_fds_do_not_leak_in() {
    // The shell opens fd 7 on a host file without close-on-exec and runs
    // kiln: the step must see only 0, 1 and 2.
    let root = rootfs().to_str().unwrap().to_string();
    let kiln_path = kiln_vm_tests::stage_file(&kiln_vm_tests::kiln_binary());
    let script = format!(
        "exec 7</etc/hostname; exec {} sandbox --rootfs {root} -- /bin/probe fds",
        kiln_path.display()
    );
    let o = kiln_vm_tests::unprivileged(Path::new("/bin/sh"))
        .args(["-c", &script])
        .output()
        .unwrap();
    assert_eq!(stdout(&o).trim(), "0 1 2", "{}", stderr(&o));
}

#[test]
fn init_cannot_be_overwritten_and_kiln_is_untouched() {
    // runc CVE-2019-5736 with kiln as a user has it: a binary the user
    // owns (the user a step's root is, outside its namespaces), which a
    // step that could reach it could write
    let bin = kiln_vm_tests::owned_by_test_user(&kiln_vm_tests::kiln_binary());
    let before = std::fs::read(&bin).unwrap();
    // the check can fail: the user kiln runs as may write this binary
    let writable = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            kiln_vm_tests::TEST_USER,
            "--regid",
            kiln_vm_tests::TEST_USER,
        ])
        .args(["--init-groups", "--", "test", "-w"])
        .arg(&bin)
        .status()
        .unwrap();
    assert!(
        writable.success() || !running_as_root(),
        "the test user cannot write its own kiln binary"
    );
    let root = rootfs().to_str().expect("utf-8 path").to_string();
    let script = "probe proc1_exe_write proc1_fd_open proc1_mem_open ptrace_init proc1_vm_write self_exe_write; \
         echo x > /proc/1/exe 2>/dev/null && echo WROTE; cat /proc/1/exe > /dev/null 2>&1 && echo READ; \
         for p in /proc/[0-9]*; do (echo x > $p/exe) 2>/dev/null && echo WROTE-$p; done; true";
    let out = ok(kiln_vm_tests::as_test_user(&bin)
        .args(["sandbox", "--rootfs", &root, "--", "/bin/sh", "-c", script])
        .output()
        .unwrap());
    assert_eq!(
        out,
        "ptrace_init EPERM\nproc1_exe_write EACCES\nproc1_fd_open EACCES\nproc1_mem_open EACCES\nproc1_vm_write EPERM\nself_exe_write ETXTBSY\n"
    );
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        before,
        "the kiln binary is unchanged"
    );
}

#[test]
fn hostname_and_environment_come_from_the_flags() {
    let out = ok(sandbox(
        &["--hostname", "builder-1", "--env", "A=b c", "--cwd", "/tmp"],
        &["/bin/sh", "-c", "hostname; echo \"$A\"; pwd; echo $PATH"],
    ));
    assert_eq!(
        out,
        "builder-1\nb c\n/tmp\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    );
}

#[test]
fn read_only_rootfs() {
    let o = sandbox(&["--read-only"], &["/bin/sh", "-c", "touch /ro-test"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("Read-only file system"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn without_subordinate_ids_only_root_is_mapped_with_one_notice() {
    let Some(mut cmd) = kiln_vm_tests::unprivileged_without_subids(&kiln_vm_tests::kiln_binary())
    else {
        // Not root: the test user cannot make a second user. The mapping
        // decision itself is unit-tested in kiln-runtime's idmap module.
        kiln_vm_tests::missing_prerequisite("creating a user without subordinate ids needs root");
        return;
    };
    let dir = test_dir("nosub");
    let rootfs = dir.join("rootfs");
    busybox_rootfs(&rootfs);
    let o = cmd
        .args([
            "sandbox",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            "id -u; cat /proc/self/uid_map",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().next(), Some("0"));
    assert_eq!(
        out.lines().skip(1).count(),
        1,
        "a single mapping line: {out}"
    );
    let err = stderr(&o);
    assert_eq!(err.matches("only uid/gid 0 is mapped").count(), 1, "{err}");
    assert!(err.contains("/etc/subuid"), "{err}");
    let mut cmd =
        kiln_vm_tests::unprivileged_without_subids(&kiln_vm_tests::kiln_binary()).unwrap();
    let o = cmd
        .args([
            "sandbox",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--user",
            "1000",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("uid 1000 is not mapped"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn real_root_never_runs_steps_as_root() {
    if !kiln_vm_tests::root_for("running kiln as real root") {
        return;
    }
    let o = std::process::Command::new(kiln_vm_tests::kiln_binary())
        .args([
            "sandbox",
            "--rootfs",
            rootfs().to_str().unwrap(),
            "--",
            "cat",
            "/proc/self/uid_map",
        ])
        .output()
        .unwrap();
    let out = ok(o);
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(fields[0], "0");
    assert_ne!(
        fields[1], "0",
        "container root must not be host root: {out}"
    );
}

#[test]
fn steps_share_one_kiln_namespace_that_is_recreated_when_killed() {
    let (uid, _) = test_ids();
    let ns_of_step = || {
        // The parent namespace of the step's own: kiln's namespace, seen
        // through the pause process kiln records.
        ok(sh("true"));
        let pid_file = format!("/tmp/kiln-run-{uid}/pause.pid");
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .expect(&pid_file)
            .trim()
            .parse()
            .unwrap();
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/user")).expect("pause process alive");
        (pid, ns)
    };
    let (pid1, ns1) = ns_of_step();
    let (pid2, ns2) = ns_of_step();
    assert_eq!(
        (pid1, &ns1),
        (pid2, &ns2),
        "a second kiln process joins the same namespace"
    );
    // As the user would: kill the pause process; the next kiln makes a new one.
    let _ = kiln_vm_tests::unprivileged(Path::new("/bin/kill"))
        .arg(pid1.to_string())
        .status();
    std::thread::sleep(Duration::from_millis(100));
    let (pid3, _) = ns_of_step();
    assert_ne!(pid3, pid1, "a new pause process replaces the killed one");
}
