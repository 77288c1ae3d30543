/*
 * kiln-probe: run inside a sandbox, it tries one syscall per line of its
 * table and prints "name errno-name" (OK when the call succeeded), in the
 * spirit of bubblewrap's try-syscall. Arguments are chosen so that a call
 * the sandbox allowed fails harmlessly (EFAULT, EINVAL, EBADF) rather than
 * doing anything, so the answer shows what the filter and the kernel
 * decided, not what the call would have done.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>
#include <sys/ptrace.h>
#include <sys/un.h>
#include <sys/uio.h>
#include <stddef.h>
#include <time.h>
#define PTRACE_ATTACH_VALUE PTRACE_ATTACH

#ifndef __X32_SYSCALL_BIT
#define __X32_SYSCALL_BIT 0x40000000
#endif

static const char *errname(int e) {
    switch (e) {
    case 0: return "OK";
    case EPERM: return "EPERM";
    case ENOSYS: return "ENOSYS";
    case EACCES: return "EACCES";
    case EINVAL: return "EINVAL";
    case EFAULT: return "EFAULT";
    case EBADF: return "EBADF";
    case ENOENT: return "ENOENT";
    case ESRCH: return "ESRCH";
    case ENOTTY: return "ENOTTY";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case ETXTBSY: return "ETXTBSY";
    case EROFS: return "EROFS";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    default: return strerror(e);
    }
}

static long r(long rc) { return rc < 0 ? errno : 0; }

/* process_vm_writev into `pid` at an address no process maps: allowed,
 * it fails with EFAULT; refused, EPERM (or ENOSYS from the filter) */
static long try_vm_write(int pid) {
    char byte = 0;
    struct iovec local = {&byte, 1}, remote = {(void *)8, 1};
    return r(syscall(SYS_process_vm_writev, pid, &local, 1UL, &remote, 1UL, 0UL));
}

/* clone with a namespace flag: the child exits at once if it was created */
static long try_clone(int flag) {
    long pid = syscall(SYS_clone, flag | SIGCHLD, 0, 0, 0, 0);
    if (pid == 0) _exit(0);
    if (pid < 0) return errno;
    waitpid((pid_t)pid, NULL, 0);
    return 0;
}

static long try_clone3(void) {
    char args[88] = {0};
    long pid = syscall(SYS_clone3, args, sizeof args);
    if (pid == 0) _exit(0);
    if (pid < 0) return errno;
    waitpid((pid_t)pid, NULL, 0);
    return 0;
}

static long try_socket(int family) {
    int fd = socket(family, SOCK_STREAM, 0);
    if (fd < 0) {
        int e = errno;
        /* a family the filter allowed but the kernel lacks is not a denial */
        return e;
    }
    close(fd);
    return 0;
}

static long try_tiocsti(unsigned long high) {
    char c = ' ';
    return r(syscall(SYS_ioctl, 0, high | TIOCSTI, &c));
}

struct probe { const char *name; long (*fn)(void); };

#define P(n, expr) static long p_##n(void) { return (expr); }
P(mount, r(mount("none", "/tmp", "tmpfs", 0, NULL)))
P(umount2, r(umount2("/proc", MNT_DETACH)))
P(pivot_root, r(syscall(SYS_pivot_root, "/", "/")))
P(unshare_user, r(unshare(CLONE_NEWUSER)))
P(unshare_mount, r(unshare(CLONE_NEWNS)))
P(clone_newuser, try_clone(CLONE_NEWUSER))
P(clone_newns, try_clone(CLONE_NEWNS))
P(clone_newpid, try_clone(CLONE_NEWPID))
P(clone_newnet, try_clone(CLONE_NEWNET))
P(clone_newuts, try_clone(CLONE_NEWUTS))
P(clone_newipc, try_clone(CLONE_NEWIPC))
P(clone_newcgroup, try_clone(CLONE_NEWCGROUP))
P(clone_plain, try_clone(0))
P(clone3, try_clone3())
P(setns, r(syscall(SYS_setns, -1, 0)))
P(fsopen, r(syscall(SYS_fsopen, "tmpfs", 0)))
P(open_tree, r(syscall(SYS_open_tree, AT_FDCWD, "/", 0)))
P(move_mount, r(syscall(SYS_move_mount, -1, "", AT_FDCWD, "/tmp", 0)))
P(keyctl, r(syscall(SYS_keyctl, 0, 0, 0, 0, 0)))
P(add_key, r(syscall(SYS_add_key, "user", "k", "v", 1, -2)))
P(request_key, r(syscall(SYS_request_key, "user", "k", NULL, 0)))
P(bpf, r(syscall(SYS_bpf, 0, NULL, 0)))
P(perf_event_open, r(syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0)))
P(userfaultfd, r(syscall(SYS_userfaultfd, 0)))
P(io_uring_setup, r(syscall(SYS_io_uring_setup, 1, NULL)))
P(kexec_load, r(syscall(SYS_kexec_load, 0, 0, NULL, 0)))
P(kexec_file_load, r(syscall(SYS_kexec_file_load, -1, -1, 0, NULL, 0)))
P(init_module, r(syscall(SYS_init_module, NULL, 0, "")))
P(finit_module, r(syscall(SYS_finit_module, -1, "", 0)))
P(delete_module, r(syscall(SYS_delete_module, "x", 0)))
P(open_by_handle_at, r(syscall(SYS_open_by_handle_at, -1, NULL, 0)))
P(name_to_handle_at, r(syscall(SYS_name_to_handle_at, AT_FDCWD, "/", NULL, NULL, 0)))
P(iopl, r(syscall(SYS_iopl, 3)))
P(ioperm, r(syscall(SYS_ioperm, 0, 1, 1)))
P(swapon, r(syscall(SYS_swapon, "/nonexistent", 0)))
P(swapoff, r(syscall(SYS_swapoff, "/nonexistent")))
P(reboot, r(syscall(SYS_reboot, 0, 0, 0, NULL)))
P(acct, r(syscall(SYS_acct, NULL)))
P(settimeofday, r(syscall(SYS_settimeofday, NULL, NULL)))
P(clock_settime, r(syscall(SYS_clock_settime, 0, NULL)))
P(personality_default, r(personality(PER_LINUX)))
P(personality_other, r(personality(READ_IMPLIES_EXEC)))
P(socket_alg, try_socket(38))
P(socket_vsock, try_socket(40))
P(socket_inet, try_socket(AF_INET))
P(tiocsti, try_tiocsti(0))
P(tiocsti_high, try_tiocsti(0x100000000UL))
P(x32_getpid, r(syscall(__X32_SYSCALL_BIT | SYS_getpid)))
P(ptrace_init, r(syscall(SYS_ptrace, PTRACE_ATTACH_VALUE, 1, NULL, NULL)))
P(proc1_exe_write, r(open("/proc/1/exe", O_WRONLY)))
P(proc1_fd_open, r(open("/proc/1/fd/3", O_WRONLY)))
P(proc1_mem_open, r(open("/proc/1/mem", O_RDWR)))
P(proc1_vm_write, try_vm_write(1))
P(self_exe_write, r(open("/proc/self/exe", O_WRONLY)))
#undef P

static const struct probe probes[] = {
#define E(n) {#n, p_##n},
    E(mount) E(umount2) E(pivot_root) E(unshare_user) E(unshare_mount)
    E(clone_newuser) E(clone_newns) E(clone_newpid) E(clone_newnet) E(clone_newuts) E(clone_newipc)
    E(clone_newcgroup) E(clone_plain) E(clone3) E(setns) E(fsopen) E(open_tree) E(move_mount)
    E(keyctl) E(add_key) E(request_key) E(bpf) E(perf_event_open) E(userfaultfd) E(io_uring_setup)
    E(kexec_load) E(kexec_file_load) E(init_module) E(finit_module) E(delete_module)
    E(open_by_handle_at) E(name_to_handle_at) E(iopl) E(ioperm) E(swapon) E(swapoff) E(reboot)
    E(acct) E(settimeofday) E(clock_settime) E(personality_default) E(personality_other)
    E(socket_alg) E(socket_vsock) E(socket_inet) E(tiocsti) E(tiocsti_high) E(x32_getpid)
    E(ptrace_init) E(proc1_exe_write) E(proc1_fd_open) E(proc1_mem_open) E(proc1_vm_write)
    E(self_exe_write)
#undef E
};

/* "fds": the open descriptors of this process, minus the one reading the list */
static int list_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    if (!d) return 1;
    int seen[1024], n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 1024) {
        if (e->d_name[0] == '.') continue;
        int fd = atoi(e->d_name);
        if (fd != dirfd(d)) seen[n++] = fd;
    }
    closedir(d);
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++)
            if (seen[j] < seen[i]) { int t = seen[i]; seen[i] = seen[j]; seen[j] = t; }
    for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", seen[i]);
    printf("\n");
    return 0;
}

/* Swap two paths with renameat2(RENAME_EXCHANGE) for `seconds`: a racer
 * that turns a directory into a symlink and back while other steps mount it
 * (runc CVE-2021-30465 class). */
static int exchange(const char *a, const char *b, int seconds) {
    time_t end = time(NULL) + seconds;
    long n = 0;
    while (time(NULL) < end) {
        if (syscall(SYS_renameat2, AT_FDCWD, a, AT_FDCWD, b, 2 /* RENAME_EXCHANGE */) == 0)
            n++;
    }
    printf("exchanged %ld times\n", n);
    return n > 0 ? 0 : 1;
}

/* Connect to the abstract unix socket @name: prints OK or the errno. */
static int connect_abstract(const char *name) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    size_t len = strlen(name);
    if (len + 1 > sizeof addr.sun_path) return 2;
    memcpy(addr.sun_path + 1, name, len);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0) { printf("socket %s\n", errname(errno)); return 0; }
    int r = connect(s, (struct sockaddr *)&addr, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len));
    printf("connect_abstract %s\n", r == 0 ? "OK" : errname(errno));
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "fds") == 0)
        return list_fds();
    if (argc == 5 && strcmp(argv[1], "exchange") == 0)
        return exchange(argv[2], argv[3], atoi(argv[4]));
    if (argc == 3 && strcmp(argv[1], "connect-abstract") == 0)
        return connect_abstract(argv[2]);
    for (size_t i = 0; i < sizeof probes / sizeof probes[0]; i++) {
        if (argc > 1) {
            int wanted = 0;
            for (int a = 1; a < argc; a++)
                if (strcmp(argv[a], probes[i].name) == 0) wanted = 1;
            if (!wanted) continue;
        }
        errno = 0;
        long e = probes[i].fn();
        printf("%s %s\n", probes[i].name, errname((int)e));
    }
    return 0;
}
