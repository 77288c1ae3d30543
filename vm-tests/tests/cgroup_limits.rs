//! `--memory`, `--pids-limit` and `--cpus` where the host delegates
//! cgroup v2 controllers to the user. These test machines have hybrid
//! cgroups (no controller in cgroup v2), so the test boots Debian 12's
//! kernel under qemu (TCG, about 5 s) with an initramfs holding busybox,
//! the kiln under test and newuidmap: cgroup2 mounted alone, a subtree
//! `/user` handed to an unprivileged user (as systemd's `Delegate=yes`
//! does), and each build started in a fresh cgroup of that subtree (as
//! `systemd-run --user --scope` does). The user runs kiln, which must put
//! every RUN step in a cgroup of its own with the limits, and remove it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_vm_tests::{busybox_rootfs, kiln_binary, run_checked, test_dir};

/// The kernel `scripts/setup-host.sh` unpacks from Debian 12's
/// linux-image-amd64.
fn kernel() -> Option<PathBuf> {
    fs::read_dir("/var/tmp/kiln-fixtures/kernel/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
# the initramfs root cannot be pivot_root's old root: move to a tmpfs
if [ ! -e /.stage2 ]; then
    mkdir /newroot; mount -t tmpfs -o size=800m root /newroot
    for d in bin etc home lib lib64 usr ctx init; do cp -a /$d /newroot/; done
    mkdir -p /newroot/proc /newroot/sys /newroot/dev /newroot/tmp; touch /newroot/.stage2
    exec switch_root /newroot /init
fi
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t cgroup2 none /sys/fs/cgroup
mount -t tmpfs -o mode=1777 tmp /tmp
chown -R 1000:1000 /home/user /ctx
# delegation, as systemd's Delegate=yes gives user@.service
echo "+cpu +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control
mkdir /sys/fs/cgroup/user
chown -R 1000:1000 /sys/fs/cgroup/user
echo "+cpu +memory +pids" > /sys/fs/cgroup/user/cgroup.subtree_control
# each kiln in a fresh cgroup of its own, as systemd-run --user --scope
N=0
K() {
    N=$((N+1)); mkdir /sys/fs/cgroup/user/job$N; chown -R 1000:1000 /sys/fs/cgroup/user/job$N
    (echo $(sh -c 'echo $PPID') > /sys/fs/cgroup/user/job$N/cgroup.procs
     exec su -s /bin/sh user -c "cd /home/user && exec /bin/kiln --root /tmp/state $*")
}
K info > /tmp/info.log 2>&1; echo "KILN-INFO $(grep 'Step limits' /tmp/info.log)"
K build --network none --progress plain --memory 64m -f /ctx/Dockerfile.mem /ctx > /tmp/mem.log 2>&1
echo "KILN-MEM rc=$?"; sed 's/^/KILN-MEM-LOG /' /tmp/mem.log
K build --network none --progress plain --pids-limit 20 -f /ctx/Dockerfile.pids /ctx > /tmp/pids.log 2>&1
echo "KILN-PIDS rc=$?"; sed 's/^/KILN-PIDS-LOG /' /tmp/pids.log
( for i in $(seq 1 600); do
    s=$(ls -d /sys/fs/cgroup/user/job*/step-* 2>/dev/null | head -1)
    if [ -n "$s" ]; then echo "KILN-CPUMAX $(cat $s/cpu.max)"; break; fi
    sleep 0.05
  done ) &
K build --network none --progress plain --cpus 0.5 -f /ctx/Dockerfile.cpu /ctx > /tmp/cpu.log 2>&1
echo "KILN-CPU rc=$?"; sed 's/^/KILN-CPU-LOG /' /tmp/cpu.log
echo "KILN-LEFT $(ls -d /sys/fs/cgroup/user/job*/step-* 2>/dev/null | wc -l)"
poweroff -f
"#;

const DOCKERFILES: [(&str, &str); 3] = [
    (
        "Dockerfile.mem",
        "FROM scratch\nCOPY rootfs/ /\n\
         RUN --mount=type=tmpfs,target=/t,size=300m dd if=/dev/zero of=/t/small bs=1M count=8 && echo small-fits\n\
         RUN --mount=type=tmpfs,target=/t,size=300m dd if=/dev/zero of=/t/big bs=1M count=200 && echo big-fits\n",
    ),
    (
        "Dockerfile.pids",
        "FROM scratch\nCOPY rootfs/ /\nRUN i=0; while [ $i -lt 40 ]; do sleep 2 & i=$((i+1)); done; wait; echo pids-done\n",
    ),
    (
        "Dockerfile.cpu",
        "FROM scratch\nCOPY rootfs/ /\nRUN sleep 3; echo cpu-done\n",
    ),
];

/// The initramfs: busybox, kiln, newuidmap/newgidmap (setuid root), a
/// user 1000 with a subordinate range, the contexts, and INIT.
fn initramfs(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let root = dir.join("initramfs");
    busybox_rootfs(&root);
    kiln_vm_tests::install_with_libs(&root, &kiln_binary(), "/bin/kiln", true);
    for helper in ["/usr/bin/newuidmap", "/usr/bin/newgidmap"] {
        kiln_vm_tests::install_with_libs(&root, Path::new(helper), helper, false);
        let to = root.join(helper.trim_start_matches('/'));
        fs::set_permissions(&to, fs::Permissions::from_mode(0o4755)).unwrap();
    }
    fs::write(root.join("etc/subuid"), "user:100000:65536\n").unwrap();
    fs::write(root.join("etc/subgid"), "user:100000:65536\n").unwrap();
    let ctx = root.join("ctx");
    busybox_rootfs(&ctx.join("rootfs"));
    for (name, text) in DOCKERFILES {
        fs::write(ctx.join(name), text).unwrap();
    }
    fs::write(root.join("init"), INIT).unwrap();
    fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755)).unwrap();
    let archive = dir.join("initramfs.cpio");
    // busybox's cpio writes the newc format the kernel unpacks
    run_checked(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
        "find . | busybox cpio -o -H newc > {} 2>/dev/null",
        archive.display()
    )));
    archive
}

#[test]
fn step_limits_go_into_a_cgroup_of_each_step_where_the_host_delegates() {
    let Some(kernel) = kernel() else {
        kiln_vm_tests::missing_prerequisite(
            "no Debian kernel in /var/tmp/kiln-fixtures/kernel: run scripts/setup-host.sh",
        );
        return;
    };
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    if !qemu.exists() {
        kiln_vm_tests::missing_prerequisite(
            "qemu-system-x86_64 is missing: run scripts/setup-host.sh (apt-get install qemu-system-x86)",
        );
        return;
    }
    let dir = test_dir("cgroup-limits");
    let initrd = initramfs(&dir);
    let out = Command::new("timeout")
        .arg("600")
        .arg(qemu)
        .args([
            "-m",
            "1536",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
            "-kernel",
        ])
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .output()
        .expect("run qemu");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = |tag: &str| {
        console
            .lines()
            .find_map(|l| l.split_once(tag).map(|(_, rest)| rest.trim().to_string()))
            .unwrap_or_else(|| panic!("no {tag} line on the console:\n{console}"))
    };
    let log = |tag: &str| -> String {
        console
            .lines()
            .filter_map(|l| l.split_once(tag).map(|(_, rest)| rest))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        line("KILN-INFO").contains("cgroup v2 under /sys/fs/cgroup/user/job1 (delegated"),
        "{console}"
    );
    // memory: a step within the limit runs, one past it is killed, and
    // the error says why
    let mem = log("KILN-MEM-LOG ");
    assert_eq!(line("KILN-MEM rc="), "1", "{mem}");
    assert!(mem.contains("small-fits"), "{mem}");
    assert!(
        mem.contains("killed for using more than its memory limit (67108864 bytes"),
        "{mem}"
    );
    // tasks: the 21st cannot start
    let pids = log("KILN-PIDS-LOG ");
    assert!(pids.contains("can't fork"), "{pids}");
    assert_ne!(line("KILN-PIDS rc="), "0", "{pids}");
    // CPU: half a CPU as cpu.max, and the build passes
    assert_eq!(line("KILN-CPUMAX"), "50000 100000", "{console}");
    assert_eq!(line("KILN-CPU rc="), "0", "{}", log("KILN-CPU-LOG "));
    // every step's cgroup is gone after its step
    assert_eq!(line("KILN-LEFT"), "0", "{console}");
}
