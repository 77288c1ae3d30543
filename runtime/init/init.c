/*
 * kiln-init: PID 1 of every sandbox.
 *
 * Why C and not the kiln binary: the init process is visible to the step as
 * /proc/1, and the kiln binary is usually owned by the very user that the
 * step's root maps to. runc CVE-2019-5736 overwrote the runtime through
 * /proc/PID/exe. This program is compiled into kiln, copied into a sealed
 * memfd and executed from there, so /proc/1/exe is an anonymous, sealed,
 * executing file; it also makes itself non-dumpable first thing, so a step
 * (which has no CAP_SYS_PTRACE) cannot open /proc/1/fd/N, /proc/1/mem or
 * ptrace it.
 *
 * Why no libc: the program is copied into a memfd for every kiln process
 * and executed for every step; a static glibc binary is 700 KB and costs
 * milliseconds to copy and map, this one is a few KB. It makes raw system
 * calls through the two small inline-assembly wrappers below.
 *
 * Protocol (set up by the runtime before exec):
 *   argv[1]  the PID (in this namespace) of the command process, already
 *            forked and waiting on fd 4
 *   fd 3     write end of the status pipe: the raw wait status of the
 *            command (4 bytes, native endian) is written here once
 *   fd 4     write end of the ready pipe: closed once this process is
 *            non-dumpable and its signal mask is set, which releases the
 *            command
 * With the single argument "pause" it instead keeps kiln's shared user
 * namespace alive (see runtime/src/userns.rs): it holds a lock on fd 3 and
 * sleeps until killed.
 *
 * It forwards SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and
 * SIGWINCH to the command, reaps every zombie, and exits with the command's
 * status (128+N when killed by signal N). When it exits the kernel kills
 * every process left in the PID namespace.
 */
#include <asm/unistd.h>
#include <linux/prctl.h>
#include <linux/wait.h>

#define EINTR 4
#define SIGHUP 1
#define SIGINT 2
#define SIGQUIT 3
#define SIGUSR1 10
#define SIGUSR2 12
#define SIGTERM 15
#define SIGCHLD 17
#define SIGWINCH 28
#define SIG_BLOCK 0

typedef unsigned long sigset_k; /* the kernel's 64-bit signal set */

#if defined(__x86_64__)
static long sys6(long n, long a, long b, long c, long d, long e, long f) {
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
__asm__(".text\n.global _start\n_start:\n"
        "  xor %rbp, %rbp\n  mov %rsp, %rdi\n  and $-16, %rsp\n  call start_c\n  hlt\n");
#elif defined(__aarch64__)
static long sys6(long n, long a, long b, long c, long d, long e, long f) {
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    register long x4 __asm__("x4") = e;
    register long x5 __asm__("x5") = f;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5) : "memory");
    return x0;
}
__asm__(".text\n.global _start\n_start:\n  mov x0, sp\n  bl start_c\n  brk #0\n");
#else
#error "kiln-init supports x86_64 and aarch64"
#endif

#define sys0(n) sys6(n, 0, 0, 0, 0, 0, 0)
#define sys1(n, a) sys6(n, (long)(a), 0, 0, 0, 0, 0)
#define sys2(n, a, b) sys6(n, (long)(a), (long)(b), 0, 0, 0, 0)
#define sys4(n, a, b, c, d) sys6(n, (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)

static __attribute__((noreturn)) void die(int code) {
    for (;;)
        sys1(__NR_exit_group, code);
}

static void write_all(int fd, const char *p, long len) {
    while (len > 0) {
        long n = sys6(__NR_write, fd, (long)p, len, 0, 0, 0);
        if (n == -EINTR)
            continue;
        if (n < 0)
            return;
        p += n;
        len -= n;
    }
}

static int is_pause(const char *s) {
    const char *want = "pause";
    while (*s && *s == *want) {
        s++;
        want++;
    }
    return *s == 0 && *want == 0;
}

static long parse_pid(const char *s) {
    long v = 0;
    if (!*s)
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9' || v > 4194304)
            return -1;
        v = v * 10 + (*s - '0');
    }
    return v;
}

#define BIT(sig) (1UL << ((sig) - 1))

__attribute__((noreturn, used)) void start_c(long *sp) {
    long argc = sp[0];
    char **argv = (char **)(sp + 1);

    if (sys6(__NR_prctl, PR_SET_DUMPABLE, 0, 0, 0, 0, 0) != 0)
        die(125);
    if (argc == 2 && is_pause(argv[1])) {
        /* Pause mode: fd 3 holds the lock that tells kiln this process is
         * alive; nothing else to do until someone kills it. */
        for (;;)
            sys0(__NR_pause);
    }
    if (argc != 2)
        die(125);
    long command = parse_pid(argv[1]);
    if (command <= 0)
        die(125);

    sigset_k set = BIT(SIGINT) | BIT(SIGTERM) | BIT(SIGHUP) | BIT(SIGQUIT) | BIT(SIGUSR1) |
                   BIT(SIGUSR2) | BIT(SIGWINCH) | BIT(SIGCHLD);
    if (sys4(__NR_rt_sigprocmask, SIG_BLOCK, &set, 0, sizeof set) != 0)
        die(125);
    sys1(__NR_close, 4);

    for (;;) {
        long sig = sys4(__NR_rt_sigtimedwait, &set, 0, 0, sizeof set);
        if (sig < 0)
            continue;
        if (sig != SIGCHLD) {
            sys2(__NR_kill, command, sig);
            continue;
        }
        for (;;) {
            int status = 0;
            long pid = sys4(__NR_wait4, -1, &status, WNOHANG, 0);
            if (pid <= 0)
                break;
            if (pid == command) {
                write_all(3, (const char *)&status, sizeof status);
                if ((status & 0x7f) == 0)
                    die((status >> 8) & 0xff);
                die(128 + (status & 0x7f));
            }
        }
    }
}
