#!/usr/bin/env python3
"""Write deploy/seccomp.json: the seccomp profile for the container kiln
runs in (podman/docker --security-opt seccomp=deploy/seccomp.json).

It is the syscall set Moby's default profile allows every container
without added capabilities, plus exactly what kiln's sandbox setup calls.
vm-tests/tests/in_container.rs builds with this profile; each addition
was checked by removing it (2026-12-08, rootless Podman 4.3, runc): the
build then fails, except for fsopen, fsconfig and fsmount, which only an
overlay view of more layers than one page of mount options lists needs
(the test's chains are short). Rules that Moby's profile
grants only with a capability kiln's container does not get (CAP_SYS_ADMIN,
CAP_SYS_PTRACE, ...) are left out, except chroot (CAP_SYS_CHROOT is in
every container's default set): the profile is no wider than Moby's for
anything but kiln's additions. It is no narrower than kiln's own step
profile either (--check verifies): the two filters stack.

Run it after changing the lists; scripts/test.sh runs it with --check.
"""
import json
import pathlib
import sys

# Moby's default profile (profiles/seccomp/default.json), its unconditional
# allow list, as of Moby 27 (the last line: calls of newer kernels it
# added).
MOBY_ALLOWED = """
accept accept4 access adjtimex alarm bind brk capget capset chdir chmod chown
chown32 clock_adjtime clock_adjtime64 clock_getres clock_getres_time64
clock_gettime clock_gettime64 clock_nanosleep clock_nanosleep_time64 close
close_range connect copy_file_range creat dup dup2 dup3 epoll_create
epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait
epoll_wait_old eventfd eventfd2 execve execveat exit exit_group faccessat
faccessat2 fadvise64 fadvise64_64 fallocate fanotify_mark fchdir fchmod
fchmodat fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr
flistxattr flock fork fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs
fstatfs64 fsync ftruncate ftruncate64 futex futex_time64 futex_waitv futimesat
getcpu getcwd getdents getdents64 getegid getegid32 geteuid geteuid32 getgid
getgid32 getgroups getgroups32 getitimer getpeername getpgid getpgrp getpid
getppid getpriority getrandom getresgid getresgid32 getresuid getresuid32
getrlimit get_robust_list getrusage getsid getsockname getsockopt
get_thread_area gettid gettimeofday getuid getuid32 getxattr
inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl
io_destroy io_getevents io_pgetevents io_pgetevents_time64 ioprio_get
ioprio_set io_setup io_submit io_uring_enter io_uring_register io_uring_setup
ipc kill landlock_add_rule landlock_create_ruleset landlock_restrict_self
lchown lchown32 lgetxattr link linkat listen listxattr llistxattr _llseek
lremovexattr lseek lsetxattr lstat lstat64 madvise membarrier memfd_create
memfd_secret mincore mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap
mmap2 mprotect mq_getsetattr mq_notify mq_open mq_timedreceive
mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink mremap
msgctl msgget msgrcv msgsnd msync munlock munlockall munmap name_to_handle_at
nanosleep newfstatat _newselect open openat openat2 pause pidfd_open
pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll
ppoll_time64 prctl pread64 preadv preadv2 prlimit64 process_mrelease pselect6
pselect6_time64 pwrite64 pwritev pwritev2 read readahead readlink readlinkat
readv recv recvfrom recvmmsg recvmmsg_time64 recvmsg remap_file_pages
removexattr rename renameat renameat2 restart_syscall rmdir rseq rt_sigaction
rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend
rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo sched_getaffinity
sched_getattr sched_getparam sched_get_priority_max sched_get_priority_min
sched_getscheduler sched_rr_get_interval sched_rr_get_interval_time64
sched_setaffinity sched_setattr sched_setparam sched_setscheduler sched_yield
seccomp select semctl semget semop semtimedop semtimedop_time64 send sendfile
sendfile64 sendmmsg sendmsg sendto setfsgid setfsgid32 setfsuid setfsuid32
setgid setgid32 setgroups setgroups32 setitimer setpgid setpriority setregid
setregid32 setresgid setresgid32 setresuid setresuid32 setreuid setreuid32
setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address
setuid setuid32 setxattr shmat shmctl shmdt shmget shutdown sigaltstack
signalfd signalfd4 sigprocmask sigreturn socketcall socketpair splice stat
stat64 statfs statfs64 statx symlink symlinkat sync sync_file_range syncfs
sysinfo tee tgkill time timer_create timer_delete timer_getoverrun
timer_gettime timer_gettime64 timer_settime timer_settime64 timerfd_create
timerfd_gettime timerfd_gettime64 timerfd_settime timerfd_settime64 times
tkill truncate truncate64 ugetrlimit umask uname unlink unlinkat utime
utimensat utimensat_time64 utimes vfork vmsplice wait4 waitid waitpid write
writev
process_vm_readv process_vm_writev ptrace
cachestat fchmodat2 futex_requeue futex_wait futex_wake map_shadow_stack mseal
""".split()

# Allowed by Moby's profile with CAP_SYS_CHROOT, which is in the default
# capability set of Docker and Podman containers.
MOBY_WITH_DEFAULT_CAPS = ["chroot"]

# What kiln's sandbox setup calls that Moby's profile allows only with
# CAP_SYS_ADMIN (which a rootless container's kiln has only in the user
# namespaces it makes, where these calls are confined to them).
KILN = [
    ("clone", "a step's namespaces (user, mount, PID, IPC, UTS, network): Moby allows clone only without namespace flags"),
    ("clone3", "the same, where the C library or kiln's runtime uses clone3"),
    ("unshare", "kiln's own user namespace and the FUSE server's mount namespace"),
    ("setns", "joining kiln's user namespace (kept by its pause process) and a step's network namespace (pasta)"),
    ("mount", "a step's root, /proc, /dev, /sys, tmpfs and bind mounts, inside its own mount namespace"),
    ("umount2", "detaching the old root after pivot_root (kiln's and pasta's own sandbox)"),
    ("pivot_root", "entering the step's root (and pasta's own sandbox)"),
    ("sethostname", "the step's host name, in its own UTS namespace"),
    ("open_tree", "detached bind mounts (the new mount API)"),
    ("move_mount", "attaching them"),
    ("mount_setattr", "read-only and idmapped mounts"),
    ("fsopen", "an overlay view of a chain whose lower directories do not fit one page of mount options"),
    ("fsconfig", "its lower directories, one at a time"),
    ("fsmount", "its mount"),
]


def profile():
    return {
        "comment": "kiln's outer-container profile: Moby's default allow list, no capability-gated rules, plus kiln's sandbox setup calls; written by deploy/make-seccomp.py",
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "archMap": [
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
        ],
        "syscalls": [
            {
                "names": MOBY_ALLOWED,
                "action": "SCMP_ACT_ALLOW",
                "comment": "Moby's default: what every container may call",
            },
            {
                "names": MOBY_WITH_DEFAULT_CAPS,
                "action": "SCMP_ACT_ALLOW",
                "comment": "Moby's default with CAP_SYS_CHROOT, which containers get by default",
            },
            {
                "names": ["socket"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}],
                "comment": "Moby's default: every address family but AF_VSOCK",
            },
        ]
        + [
            {
                "names": ["personality"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": v, "op": "SCMP_CMP_EQ"}],
                "comment": "Moby's default: PER_LINUX, PER_LINUX32, UNAME26 variants and the query",
            }
            for v in (0, 8, 131072, 131080, 4294967295)
        ]
        + [
            {
                "names": ["arch_prctl", "modify_ldt"],
                "action": "SCMP_ACT_ALLOW",
                "includes": {"arches": ["amd64", "x32", "x86"]},
                "comment": "Moby's default on x86",
            },
            {
                "names": ["arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2", "breakpoint", "cacheflush", "set_tls"],
                "action": "SCMP_ACT_ALLOW",
                "includes": {"arches": ["arm", "arm64"]},
                "comment": "Moby's default on ARM",
            },
        ]
        + [
            {"names": [name], "action": "SCMP_ACT_ALLOW", "comment": f"kiln: {why}"}
            for name, why in KILN
        ],
    }


if __name__ == "__main__":
    out = pathlib.Path(__file__).with_name("seccomp.json")
    text = json.dumps(profile(), indent=2) + "\n"
    if sys.argv[1:] == ["--check"]:
        if out.read_text() != text:
            sys.exit(f"{out} is not what {sys.argv[0]} writes: run it and commit the result")
        # the outer filter must not take back what kiln's own step
        # profile gives a step (filters stack: the stricter answer wins)
        step = json.loads((out.parent.parent / "seccomp-profiles/default.json").read_text())
        step_calls = {f["syscall"] for sec in step.values() for f in sec.get("filter", [])}
        outer = {n for r in profile()["syscalls"] for n in r["names"]}
        missing = sorted(step_calls - outer)
        if missing:
            sys.exit(f"{out} refuses what kiln's step profile allows: {' '.join(missing)}")
    else:
        out.write_text(text)
